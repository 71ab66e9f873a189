//! An LRU write-back cache of fixed-size metadata slices (L2 table slices or refcount
//! blocks), keyed by host offset. It holds bytes only: reading, writing back and the
//! ordering between caches are the metadata layer's job (`meta.rs`).

use std::collections::HashMap;

struct Slot {
    data: Box<[u8]>,
    dirty: bool,
    used: u64,
}

/// The cache. Capacity is in entries; each entry is `entry_size` bytes.
pub(crate) struct TableCache {
    entry_size: usize,
    capacity: usize,
    slots: HashMap<u64, Slot>,
    tick: u64,
}

impl TableCache {
    pub(crate) fn new(entry_size: usize, capacity: usize) -> Self {
        TableCache {
            entry_size,
            capacity: capacity.max(2),
            slots: HashMap::new(),
            tick: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn entry_size(&self) -> usize {
        self.entry_size
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Look up an entry and mark it recently used.
    pub(crate) fn get(&mut self, off: u64) -> Option<&[u8]> {
        let t = self.touch();
        self.slots.get_mut(&off).map(|s| {
            s.used = t;
            &s.data[..]
        })
    }

    /// Look up an entry for modification; marks it dirty.
    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut [u8]> {
        let t = self.touch();
        self.slots.get_mut(&off).map(|s| {
            s.used = t;
            s.dirty = true;
            &mut s.data[..]
        })
    }

    pub(crate) fn contains(&self, off: u64) -> bool {
        self.slots.contains_key(&off)
    }

    /// Whether inserting a new entry requires evicting one first.
    pub(crate) fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used entry: (offset, dirty).
    pub(crate) fn victim(&self) -> Option<(u64, bool)> {
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(o, s)| (*o, s.dirty))
    }

    /// Insert an entry (the caller made room). Replaces an existing one.
    pub(crate) fn insert(&mut self, off: u64, data: Box<[u8]>, dirty: bool) {
        debug_assert_eq!(data.len(), self.entry_size);
        let used = self.touch();
        self.slots.insert(off, Slot { data, dirty, used });
    }

    /// Drop an entry without writing it (its cluster was freed).
    pub(crate) fn remove(&mut self, off: u64) {
        self.slots.remove(&off);
    }

    /// Drop every entry inside `[start, end)`.
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) {
        self.slots.retain(|&o, _| o < start || o >= end);
    }

    /// Offsets of dirty entries, ascending (so write-back is sequential).
    pub(crate) fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    pub(crate) fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// The bytes of an entry, without touching its LRU position.
    pub(crate) fn peek(&self, off: u64) -> Option<&[u8]> {
        self.slots.get(&off).map(|s| &s.data[..])
    }

    pub(crate) fn mark_clean(&mut self, off: u64) {
        if let Some(s) = self.slots.get_mut(&off) {
            s.dirty = false;
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_victim_and_dirty_tracking() {
        let mut c = TableCache::new(4, 2);
        c.insert(0, vec![0; 4].into(), false);
        c.insert(4, vec![1; 4].into(), false);
        assert!(c.is_full());
        c.get(0);
        assert_eq!(c.victim(), Some((4, false)));
        c.get_mut(4).unwrap()[0] = 9;
        assert_eq!(c.dirty_offsets(), vec![4]);
        assert_eq!(c.peek(4).unwrap()[0], 9);
        c.mark_clean(4);
        assert!(!c.has_dirty());
        c.remove_range(0, 4);
        assert_eq!(c.len(), 1);
        assert!(c.contains(4));
    }
}
