//! A lock-free cache of L2 entries for reads: direct-mapped by guest cluster, each slot a
//! small seqlock of atomics (no `unsafe`). Readers take no lock; the mapping component,
//! under the metadata lock, fills a slot after a locked lookup and invalidates it whenever
//! the cluster's L2 entry changes. A reader that raced with an invalidation may still use
//! the old entry: it was the mapping when the read began, which is a valid outcome of
//! concurrent requests. What could make it wrong, the old host cluster being freed and
//! reused meanwhile, is caught by the free generation the reader checks around its I/O.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use qcow2_format::L2Entry;

/// Fewest slots per image (32 bytes each: 128 KiB).
const MIN_SLOTS: usize = 4096;
/// Most slots per image (2 MiB): a whole 4 GiB image of 64 KiB clusters. Random reads
/// over more than the map holds miss, and a miss takes the locked path, which refills
/// (a 1 GiB image read at random through 4,096 slots missed three times in four).
const MAX_SLOTS: usize = 65536;

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
    /// Slot count - 1 (a power of two).
    mask: usize,
}

impl Default for FastMap {
    fn default() -> Self {
        FastMap::for_clusters(0)
    }
}

impl FastMap {
    /// A map sized for an image of `clusters` guest clusters (one slot each, between the
    /// bounds above).
    pub(crate) fn for_clusters(clusters: u64) -> FastMap {
        let n = usize::try_from(clusters)
            .unwrap_or(MAX_SLOTS)
            .clamp(MIN_SLOTS, MAX_SLOTS)
            .next_power_of_two();
        FastMap {
            slots: (0..n).map(|_| Slot::default()).collect(),
            mask: n - 1,
        }
    }

    fn slot(&self, cluster: u64) -> &Slot {
        &self.slots[(cluster as usize) & self.mask]
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
        self.store(cluster.wrapping_add(1), e, (cluster as usize) & self.mask);
    }

    /// Forget `cluster` (its entry is changing; caller holds the metadata lock).
    pub(crate) fn invalidate(&self, cluster: u64) {
        let idx = (cluster as usize) & self.mask;
        if self.slots[idx].key.load(Ordering::Relaxed) == cluster.wrapping_add(1) {
            self.store(0, L2Entry::UNALLOCATED, idx);
        }
    }

    /// Forget everything (an L1 entry changed meaning; caller holds the metadata lock).
    pub(crate) fn clear(&self) {
        for idx in 0..self.slots.len() {
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
    fn one_slot_per_cluster_between_the_bounds() {
        let n = |c| FastMap::for_clusters(c).slots.len();
        assert_eq!(n(0), MIN_SLOTS);
        assert_eq!(n(16384), 16384);
        assert_eq!(n(16385), 32768);
        assert_eq!(n(u64::MAX), MAX_SLOTS);
        let f = FastMap::for_clusters(16384);
        f.put(16383, L2Entry::new(0x8000_0000_0001_0000, 0));
        assert!(f.get(16383).is_some());
        assert_eq!(f.get(16383 + 16384), None, "same slot, other cluster");
    }

    #[test]
    fn put_get_invalidate() {
        let f = FastMap::default();
        assert_eq!(f.get(7), None);
        f.put(7, L2Entry::new(0x8000_0000_0005_0000, 3));
        assert_eq!(f.get(7), Some(L2Entry::new(0x8000_0000_0005_0000, 3)));
        // Same slot, other cluster: a miss, never the wrong entry.
        assert_eq!(f.get(7 + MIN_SLOTS as u64), None);
        f.invalidate(7 + MIN_SLOTS as u64);
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
        let hits = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (f, stop, hits) = (f.clone(), stop.clone(), hits.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for c in [5u64, 5 + MIN_SLOTS as u64] {
                            if let Some(e) = f.get(c) {
                                assert_eq!(e.word, c * 3);
                                assert_eq!(e.bitmap, !c);
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        // Keep writing until the readers have checked many entries (however the threads
        // are scheduled on a loaded machine), at least 200,000 writes.
        let mut i = 0u64;
        while i < 200_000 || hits.load(Ordering::Relaxed) < 10_000 {
            let c = if i % 2 == 0 { 5 } else { 5 + MIN_SLOTS as u64 };
            f.put(c, L2Entry::new(c * 3, !c));
            if i % 7 == 0 {
                f.invalidate(c);
            }
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }
}
