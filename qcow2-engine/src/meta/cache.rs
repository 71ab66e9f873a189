//! An LRU write-back cache of fixed-size metadata slices (L2 table slices or refcount
//! blocks), keyed by host offset. It holds bytes only: reading, writing back and the
//! ordering between caches are the metadata layer's job (`meta.rs`).
//!
//! Recency is a queue of (tick, offset) records appended on every use; stale records (the
//! entry was used again later, or removed) are skipped when the victim is sought and the
//! queue is compacted when it grows past a few times the capacity, so finding the victim
//! is amortized O(1) instead of a scan of the whole cache.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Hasher for cluster-aligned host offsets: one multiply, no SipHash. The keys are not
/// attacker-chosen in a way that matters (they come from validated metadata, and a bad
/// distribution costs time, not correctness).
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Offsets are multiples of the entry size: fold the high bits of the product down.
        let x = (v ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
}

/// A `HashMap` keyed by host offsets.
pub(crate) type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

struct Slot {
    data: Box<[u8]>,
    dirty: bool,
    used: u64,
}

/// The cache. Capacity is in entries; each entry is `entry_size` bytes.
pub(crate) struct TableCache {
    entry_size: usize,
    capacity: usize,
    slots: OffsetMap<Slot>,
    /// (tick, offset) in use order; a record is live iff the slot's `used` equals its tick.
    order: VecDeque<(u64, u64)>,
    dirty: usize,
    tick: u64,
}

impl TableCache {
    pub(crate) fn new(entry_size: usize, capacity: usize) -> Self {
        TableCache {
            entry_size,
            capacity: capacity.max(2),
            slots: OffsetMap::default(),
            order: VecDeque::new(),
            dirty: 0,
            tick: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn entry_size(&self) -> usize {
        self.entry_size
    }

    /// Record a use of `off` at a new tick, returning it.
    fn touch(&mut self, off: u64) -> u64 {
        self.tick += 1;
        self.order.push_back((self.tick, off));
        if self.order.len() > 4 * self.capacity + 16 {
            self.compact();
        }
        self.tick
    }

    /// Drop stale records (O(n), once per ~3n uses).
    fn compact(&mut self) {
        let slots = &self.slots;
        let last = self.tick;
        self.order.retain(|&(t, o)| {
            // The record just pushed has no slot yet when called from insert.
            t == last || slots.get(&o).is_some_and(|s| s.used == t)
        });
    }

    /// Look up an entry and mark it recently used.
    pub(crate) fn get(&mut self, off: u64) -> Option<&[u8]> {
        self.use_slot(off, false).map(|s| &s.data[..])
    }

    /// Look up an entry for modification; marks it dirty.
    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut [u8]> {
        self.use_slot(off, true).map(|s| &mut s.data[..])
    }

    /// One hash lookup per use. A use of the entry that is already the most recent one
    /// (sequential I/O within one slice) records nothing new.
    fn use_slot(&mut self, off: u64, dirty: bool) -> Option<&mut Slot> {
        if self.order.len() > 4 * self.capacity + 16 {
            self.compact();
        }
        let s = self.slots.get_mut(&off)?;
        if s.used != self.tick {
            self.tick += 1;
            s.used = self.tick;
            self.order.push_back((self.tick, off));
        }
        if dirty && !s.dirty {
            s.dirty = true;
            self.dirty += 1;
        }
        Some(s)
    }

    /// Whether an entry is cached (no LRU effect).
    pub(crate) fn contains(&self, off: u64) -> bool {
        self.slots.contains_key(&off)
    }

    /// Whether inserting a new entry requires evicting one first.
    pub(crate) fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used entry: (offset, dirty).
    pub(crate) fn victim(&mut self) -> Option<(u64, bool)> {
        while let Some(&(t, o)) = self.order.front() {
            match self.slots.get(&o) {
                Some(s) if s.used == t => return Some((o, s.dirty)),
                _ => {
                    self.order.pop_front();
                }
            }
        }
        None
    }

    /// Insert an entry (the caller made room). Replaces an existing one.
    pub(crate) fn insert(&mut self, off: u64, data: Box<[u8]>, dirty: bool) {
        debug_assert_eq!(data.len(), self.entry_size);
        let used = self.touch(off);
        self.dirty += usize::from(dirty);
        if let Some(old) = self.slots.insert(off, Slot { data, dirty, used }) {
            self.dirty -= usize::from(old.dirty);
        }
    }

    /// Drop an entry without writing it (its cluster was freed).
    pub(crate) fn remove(&mut self, off: u64) {
        if let Some(old) = self.slots.remove(&off) {
            self.dirty -= usize::from(old.dirty);
        }
    }

    /// Drop every entry inside `[start, end)`.
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) {
        let dirty = &mut self.dirty;
        self.slots.retain(|&o, s| {
            let keep = o < start || o >= end;
            if !keep && s.dirty {
                *dirty -= 1;
            }
            keep
        });
    }

    /// Offsets of dirty entries, ascending (so write-back is sequential).
    pub(crate) fn dirty_offsets(&self) -> Vec<u64> {
        if self.dirty == 0 {
            return Vec::new();
        }
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
        self.dirty > 0
    }

    /// The bytes of an entry, without touching its LRU position.
    pub(crate) fn peek(&self, off: u64) -> Option<&[u8]> {
        self.slots.get(&off).map(|s| &s.data[..])
    }

    pub(crate) fn mark_clean(&mut self, off: u64) {
        if let Some(s) = self.slots.get_mut(&off) {
            if s.dirty {
                s.dirty = false;
                self.dirty -= 1;
            }
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

    #[test]
    fn victim_is_the_least_recently_used_under_churn() {
        // Against a simple model: a Vec in use order.
        let mut c = TableCache::new(1, 8);
        let mut model: Vec<u64> = Vec::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 33) % 13;
            if c.contains(off) {
                if x & 1 == 0 {
                    c.get(off);
                } else {
                    c.get_mut(off);
                }
                model.retain(|&o| o != off);
            } else {
                if c.is_full() {
                    let (v, _) = c.victim().unwrap();
                    assert_eq!(v, model[0], "victim must be the LRU entry");
                    c.remove(v);
                    model.remove(0);
                }
                c.insert(off, vec![0].into(), false);
            }
            model.push(off);
            assert!(c.order.len() <= 4 * 8 + 17);
        }
        let dirty = c.dirty_offsets().len();
        assert_eq!(c.has_dirty(), dirty > 0);
        for o in c.dirty_offsets() {
            c.mark_clean(o);
        }
        assert!(!c.has_dirty());
    }
}
