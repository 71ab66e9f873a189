//! A lock-free cache of L2 entries for reads: direct-mapped by guest cluster, each slot a
//! small seqlock of atomics (no `unsafe`). Readers take no lock; the mapping component,
//! under the metadata lock, fills a slot after a locked lookup and invalidates it whenever
//! the cluster's L2 entry changes. A reader that raced with an invalidation may still use
//! the old entry: it was the mapping when the read began, which is a valid outcome of
//! concurrent requests. What could make it wrong, the old host cluster being freed and
//! reused meanwhile, is caught by the free generation the reader checks around its I/O.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use qcow2_format::L2Entry;

/// Slots per image (32 bytes each): 128 KiB, enough for sequential and moderately random
/// reads to hit; misses take the locked path, which refills.
const SLOTS: usize = 4096;

#[derive(Default)]
struct Slot {
    /// Even: stable; odd: being written.
    seq: AtomicU64,
    /// Guest cluster index + 1 (0: empty).
    key: AtomicU64,
    word: AtomicU64,
    bitmap: AtomicU64,
}

/// The cache. One writer at a time (the metadata lock holder); any number of readers.
pub(crate) struct FastMap {
    slots: Box<[Slot]>,
}

impl Default for FastMap {
    fn default() -> Self {
        FastMap {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }
}

impl FastMap {
    fn slot(&self, cluster: u64) -> &Slot {
        &self.slots[(cluster as usize) & (SLOTS - 1)]
    }

    /// The cached L2 entry of guest cluster index `cluster`, if present.
    #[inline]
    pub(crate) fn get(&self, cluster: u64) -> Option<L2Entry> {
        let s = self.slot(cluster);
        let seq = s.seq.load(Ordering::Acquire);
        if seq & 1 != 0 {
            return None;
        }
        let key = s.key.load(Ordering::Relaxed);
        let word = s.word.load(Ordering::Relaxed);
        let bitmap = s.bitmap.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) != seq || key != cluster.wrapping_add(1) {
            return None;
        }
        Some(L2Entry::new(word, bitmap))
    }

    fn store(&self, cluster_key: u64, e: L2Entry, idx: usize) {
        let s = &self.slots[idx];
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        s.key.store(cluster_key, Ordering::Relaxed);
        s.word.store(e.word, Ordering::Relaxed);
        s.bitmap.store(e.bitmap, Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Cache the entry of `cluster` (caller holds the metadata lock).
    pub(crate) fn put(&self, cluster: u64, e: L2Entry) {
        self.store(cluster.wrapping_add(1), e, (cluster as usize) & (SLOTS - 1));
    }

    /// Forget `cluster` (its entry is changing; caller holds the metadata lock).
    pub(crate) fn invalidate(&self, cluster: u64) {
        let idx = (cluster as usize) & (SLOTS - 1);
        if self.slots[idx].key.load(Ordering::Relaxed) == cluster.wrapping_add(1) {
            self.store(0, L2Entry::UNALLOCATED, idx);
        }
    }

    /// Forget everything (an L1 entry changed meaning; caller holds the metadata lock).
    pub(crate) fn clear(&self) {
        for idx in 0..SLOTS {
            if self.slots[idx].key.load(Ordering::Relaxed) != 0 {
                self.store(0, L2Entry::UNALLOCATED, idx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn put_get_invalidate() {
        let f = FastMap::default();
        assert_eq!(f.get(7), None);
        f.put(7, L2Entry::new(0x8000_0000_0005_0000, 3));
        assert_eq!(f.get(7), Some(L2Entry::new(0x8000_0000_0005_0000, 3)));
        // Same slot, other cluster: a miss, never the wrong entry.
        assert_eq!(f.get(7 + SLOTS as u64), None);
        f.invalidate(7 + SLOTS as u64);
        assert!(f.get(7).is_some());
        f.invalidate(7);
        assert_eq!(f.get(7), None);
        f.put(9, L2Entry::UNALLOCATED);
        f.clear();
        assert_eq!(f.get(9), None);
    }

    #[test]
    fn readers_never_see_a_torn_slot() {
        // The writer keeps word and bitmap equal to a function of the key; readers check it.
        let f = Arc::new(FastMap::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (f, stop) = (f.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut hits = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for c in [5u64, 5 + SLOTS as u64] {
                            if let Some(e) = f.get(c) {
                                assert_eq!(e.word, c * 3);
                                assert_eq!(e.bitmap, !c);
                                hits += 1;
                            }
                        }
                    }
                    hits
                })
            })
            .collect();
        for i in 0..200_000u64 {
            let c = if i % 2 == 0 { 5 } else { 5 + SLOTS as u64 };
            f.put(c, L2Entry::new(c * 3, !c));
            if i % 7 == 0 {
                f.invalidate(c);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let hits: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(hits > 0);
    }
}
