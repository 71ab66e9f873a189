//! The cluster allocator and the freed-cluster quarantine.
//!
//! Allocation is first-fit from a free-cluster hint: data allocations fill holes (several
//! runs) before extending the file; metadata takes contiguous runs. A pinned cluster (data
//! I/O in flight) is never handed out, and a cluster whose refcount says free but which
//! overlaps known metadata is reported as corruption instead of being reused.
//!
//! Freeing never touches a refcount at once. A cluster that lost a reference goes into the
//! quarantine; its refcount drops only when the quarantine is released, which first makes
//! every L2 and L1 change durable (one barrier for the whole quarantine). So the rule "an
//! entry that no longer points at a cluster is durable before that cluster holds other
//! data" costs one barrier per release instead of one per free-then-reallocate cycle. The
//! quarantine is released at every flush, when it holds many clusters, and when growing
//! the file instead of reusing quarantined clusters would take it more than a bounded
//! slack past what immediate reuse would have left.

use super::cache::OffsetMap;
use super::{Meta, MetaKind, Which};
use crate::error::{corrupt, Error, Result};

/// Quarantined references released at once when this many are held.
const MAX_QUARANTINE: usize = 65536;

/// A run of allocated host clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Host byte offset of the first cluster.
    pub off: u64,
    /// Number of clusters.
    pub count: u64,
}

/// What happens on the host when a quarantined reference was the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFree {
    /// Nothing: the bytes stay until the cluster is reused.
    Keep,
    /// Discard the host range (deferred; dropped if the cluster is reused first).
    Discard,
}

/// The allocator's state.
pub(crate) struct Allocator {
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// First byte past every allocated cluster (cluster aligned, never shrinks).
    end: u64,
    /// Host clusters with data I/O in flight: never reallocated meanwhile.
    pins: OffsetMap<u32>,
    /// References dropped but not yet subtracted: (host cluster index, host effect).
    quarantine: Vec<(u64, OnFree)>,
    /// An upper bound of how many clusters longer the file is than immediate reuse of
    /// freed clusters would have left it; kept within `slack`.
    excess: u64,
    /// How far the file may grow before the quarantine is released instead.
    slack: u64,
    /// Quarantine releases so far (statistics).
    releases: u64,
}

impl Allocator {
    pub(crate) fn new(end: u64, slack_clusters: u64) -> Self {
        Allocator {
            free_hint: 0,
            end,
            pins: OffsetMap::default(),
            quarantine: Vec::new(),
            excess: 0,
            slack: slack_clusters,
            releases: 0,
        }
    }

    /// First byte past every allocated cluster.
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Clusters from `off` on are in use (a table placed past the end, a rebuild).
    pub(crate) fn extend_end(&mut self, off: u64) {
        self.end = self.end.max(off);
    }

    /// Scan for free clusters from the start again (a repair moved things).
    pub(crate) fn reset_hint(&mut self) {
        self.free_hint = 0;
    }

    /// Change the growth slack (the virtual size changed).
    pub(crate) fn set_slack(&mut self, clusters: u64) {
        self.slack = clusters;
    }

    /// Pin host cluster `c` against reuse.
    pub(crate) fn pin(&mut self, c: u64) {
        *self.pins.entry(c).or_insert(0) += 1;
    }

    /// Undo one `pin`.
    pub(crate) fn unpin(&mut self, c: u64) {
        if let Some(n) = self.pins.get_mut(&c) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&c);
            }
        }
    }

    /// Whether `c` is pinned.
    pub(crate) fn is_pinned(&self, c: u64) -> bool {
        self.pins.contains_key(&c)
    }

    /// Hold a dropped reference to cluster `c` until the next release.
    pub(crate) fn quarantine(&mut self, c: u64, on_free: OnFree) {
        self.quarantine.push((c, on_free));
    }

    /// References waiting in the quarantine.
    pub(crate) fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// Quarantine releases so far.
    pub(crate) fn releases(&self) -> u64 {
        self.releases
    }
}

impl Meta {
    fn is_free(&mut self, c: u64) -> Result<bool> {
        // Cluster 0 is the header: a refcount of 0 there is corruption, found below like
        // any other metadata with refcount 0 (as QEMU's overlap check finds it).
        if self.alloc.is_pinned(c) {
            return Ok(false);
        }
        if self.refcount(c)? != 0 {
            return Ok(false);
        }
        let cs = self.cluster_size();
        if let Some((s, e, k)) = self.regions.overlapping(c * cs, cs) {
            self.mark_corrupt();
            return Err(corrupt!(
                "cluster {:#x} has refcount 0 but holds {k:?} ({s:#x}..{e:#x})",
                c * cs
            ));
        }
        Ok(true)
    }

    /// Allocate `n` clusters, possibly in several runs (lowest free first).
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<Vec<Run>> {
        self.alloc(n, false)
    }

    /// Allocate `n` contiguous clusters; returns the host offset.
    pub(crate) fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        Ok(self.alloc(n, true)?[0].off)
    }

    fn alloc(&mut self, n: u64, contiguous: bool) -> Result<Vec<Run>> {
        debug_assert!(n > 0);
        self.check_writable()?;
        let cbits = self.geo.cluster_bits();
        let max_cluster = qcow2_format::geometry::MAX_HOST_OFFSET >> cbits;
        loop {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut got = 0u64;
            let mut c = self.alloc.free_hint;
            let mut first_skipped: Option<u64> = None;
            while got < n {
                if c >= max_cluster {
                    return Err(Error::TooLarge("image file would exceed 2^56 bytes".into()));
                }
                if self.is_free(c)? {
                    match runs.last_mut() {
                        Some((s, k)) if *s + *k == c => *k += 1,
                        _ => {
                            if contiguous {
                                runs.clear();
                                got = 0;
                            }
                            runs.push((c, 1));
                        }
                    }
                    got += 1;
                } else if !contiguous && first_skipped.is_none() && self.alloc.is_pinned(c) {
                    first_skipped = Some(c);
                }
                c += 1;
            }
            let last = runs.last().map(|(s, k)| s + k).unwrap_or(c);
            let growth = last.saturating_sub(self.alloc.end >> cbits);
            let held = self.alloc.quarantine.len() as u64;
            // The file's excess over immediate reuse, bounded above: it grows by what this
            // growth takes, and never exceeds what immediate reuse could have taken
            // instead (the clusters found below the end plus the quarantined ones).
            let excess = (self.alloc.excess + growth).min(n - growth.min(n) + held);
            if growth > 0 && held > 0 && excess > self.alloc.slack {
                // Reuse what the quarantine holds instead of growing the file further.
                self.release_quarantine()?;
                continue;
            }
            let mut created = false;
            for &(s, k) in &runs {
                created |= self.ensure_refblocks(s, k)?;
            }
            if created {
                continue;
            }
            for &(s, k) in &runs {
                self.add_refs(s, k)?;
                for c in s..s + k {
                    self.host_ops.cancel(c);
                }
            }
            if !contiguous {
                self.alloc.free_hint = first_skipped.unwrap_or(last);
            } else if runs[0].0 == self.alloc.free_hint {
                self.alloc.free_hint = last;
            }
            if growth > 0 {
                self.alloc.excess = excess;
            }
            self.alloc.extend_end(last << cbits);
            return Ok(runs
                .into_iter()
                .map(|(s, k)| Run {
                    off: s << cbits,
                    count: k,
                })
                .collect());
        }
    }

    /// Add one reference to each of `n` clusters from index `first`. All or nothing.
    fn add_refs(&mut self, first: u64, n: u64) -> Result<()> {
        let mut new = Vec::with_capacity(n as usize);
        for c in first..first + n {
            let block = self.refblock(c)?;
            if block == 0 {
                return Err(corrupt!(
                    "no refcount block for cluster {:#x}",
                    c * self.cluster_size()
                ));
            }
            self.load(Which::Refcount, block)?;
            let cur = self.refcounts.get_loaded(block, c);
            new.push((block, c, self.refcounts.checked(c, cur, 1)?));
        }
        self.require_refcounts_first();
        for (block, c, v) in new {
            self.load(Which::Refcount, block)?;
            self.refcounts.set_loaded(block, c, v)?;
        }
        Ok(())
    }

    /// Drop a reference to each of `n` clusters at host offset `off` once the change that
    /// dropped it is durable (see the module doc).
    pub(crate) fn free_clusters(&mut self, off: u64, n: u64, on_free: OnFree) -> Result<()> {
        let first = off >> self.geo.cluster_bits();
        for c in first..first + n {
            if self.is_active_l2_table(c) && self.refcount(c)? <= 1 {
                // A reference besides the L1's to a cluster the active L1 uses as an L2
                // table (its refcount too low for its uses): freeing it would let the
                // allocator hand the table out as a data cluster.
                self.mark_corrupt();
                return Err(corrupt!(
                    "cluster {:#x} is an L2 table in use, but dropping another reference to it would free it",
                    c << self.geo.cluster_bits()
                ));
            }
            self.alloc.quarantine(c, on_free);
        }
        if self.alloc.quarantined() >= MAX_QUARANTINE {
            self.release_quarantine()?;
        }
        Ok(())
    }

    /// Give back clusters no metadata ever pointed at (a failed allocating write): their
    /// references go at once, no ordering needed.
    pub(crate) fn unallocate(&mut self, off: u64, n: u64) -> Result<()> {
        let first = off >> self.geo.cluster_bits();
        for c in first..first + n {
            self.sub_ref(c, OnFree::Keep)?;
        }
        self.bump_free_gen();
        Ok(())
    }

    /// Make every dropped reference durable-safe and subtract it: one barrier (L2 slices
    /// and L1 entries on disk and synced), then the refcounts.
    pub(crate) fn release_quarantine(&mut self) -> Result<()> {
        if self.alloc.quarantine.is_empty() {
            return Ok(());
        }
        self.write_back(Which::L2)?;
        self.sync()?;
        let held = std::mem::take(&mut self.alloc.quarantine);
        self.alloc.releases += 1;
        let mut r = Ok(());
        for (c, on_free) in held {
            // On an error the rest stay referenced: leaks, never a double use.
            if let Err(e) = self.sub_ref(c, on_free) {
                r = Err(e);
                break;
            }
        }
        self.bump_free_gen();
        r
    }

    /// Subtract one reference from cluster `c`; a cluster reaching zero may be reused.
    fn sub_ref(&mut self, c: u64, on_free: OnFree) -> Result<()> {
        let cs = self.cluster_size();
        let block = self.refblock(c)?;
        if block == 0 {
            return Err(corrupt!("no refcount block for cluster {:#x}", c * cs));
        }
        self.load(Which::Refcount, block)?;
        let cur = self.refcounts.get_loaded(block, c);
        let v = self.refcounts.checked(c, cur, -1)?;
        if v == 0 && self.is_active_l2_table(c) {
            // Another reference to a cluster the active L1 uses as an L2 table (a refcount
            // too low for its references): freeing it would let the allocator hand the
            // table out as a data cluster.
            self.mark_corrupt();
            return Err(corrupt!(
                "cluster {:#x} is an L2 table in use, but dropping another reference to it would free it",
                c * cs
            ));
        }
        self.refcounts.set_loaded(block, c, v)?;
        if v == 0 {
            let off = c * cs;
            self.alloc.free_hint = self.alloc.free_hint.min(c);
            self.mapping.forget_tables(off, off + cs);
            self.refcounts.forget_block(off);
            self.regions.remove_if(off, MetaKind::ActiveL2);
            if on_free == OnFree::Discard {
                self.defer_discard(c)?;
            }
        }
        Ok(())
    }

    /// Subtract `delta` from one cluster's refcount directly (leak repair: no reference
    /// exists, so no ordering matters).
    pub(crate) fn drop_leaked_refs(&mut self, c: u64, delta: u64) -> Result<()> {
        let block = self.refblock(c)?;
        if block == 0 {
            return Ok(());
        }
        self.load(Which::Refcount, block)?;
        let cur = self.refcounts.get_loaded(block, c);
        let v = cur.saturating_sub(delta);
        self.refcounts.set_loaded(block, c, v)?;
        if v == 0 {
            self.alloc.free_hint = self.alloc.free_hint.min(c);
            self.bump_free_gen();
        }
        Ok(())
    }

    /// Whether host cluster index `c` holds an L2 table that the active L1 points at.
    fn is_active_l2_table(&self, c: u64) -> bool {
        let off = c << self.geo.cluster_bits();
        self.regions.starts_at(off, MetaKind::ActiveL2)
            && self.mapping.l1().iter().any(|&e| {
                let e = qcow2_format::L1Entry(e);
                !e.is_unallocated() && e.l2_offset() == off
            })
    }

    /// The refcount block covering host cluster index `c` (0: none). A damaged refcount
    /// table entry met in use marks the image corrupt, as QEMU does.
    pub(crate) fn refblock(&mut self, c: u64) -> Result<u64> {
        match self.refcounts.block_for(c) {
            Ok(b) => Ok(b),
            Err(e) => {
                self.mark_corrupt();
                Err(corrupt!(
                    "refcount table entry {}: {e}",
                    c >> self.geo.refcount_block_bits()
                ))
            }
        }
    }

    /// Refcount of host cluster index `c`.
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let block = self.refblock(c)?;
        if block == 0 {
            return Ok(0);
        }
        self.load(Which::Refcount, block)?;
        Ok(self.refcounts.get_loaded(block, c))
    }

    /// Optimistic readers re-resolve: clusters may have been freed.
    pub(crate) fn bump_free_gen(&self) {
        self.free_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use host_io::{MemStorage, Storage};

    use crate::{create_on, CreateOptions, Image, OpenOptions};

    const CS: u64 = 65536;

    fn image(opts: &str, size: u64) -> (Arc<MemStorage>, Image) {
        let mem = Arc::new(MemStorage::new());
        create_on(
            mem.clone(),
            &CreateOptions {
                size: Some(size),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let img =
            Image::open_storage(mem.clone(), &OpenOptions::parse(opts).unwrap(), None).unwrap();
        (mem, img)
    }

    fn host_of(img: &Image, guest: u64) -> u64 {
        img.block_status(guest, 1).unwrap().host_offset.unwrap()
    }

    fn refcount(img: &Image, host: u64) -> u64 {
        img.lock().unwrap().meta.refcount(host / CS).unwrap()
    }

    #[test]
    fn a_freed_cluster_keeps_its_refcount_until_a_barrier() {
        let (mem, img) = image("provision=thin", 1 << 20);
        img.write_at(&vec![1u8; (2 * CS) as usize], 0).unwrap();
        img.flush().unwrap();
        let h = host_of(&img, CS);
        img.discard(CS, CS).unwrap();
        assert_eq!(refcount(&img, h), 1, "still counted while quarantined");
        assert_eq!(img.stats().unwrap().quarantined, 1);
        let flushes = mem.flush_count();
        img.flush().unwrap();
        assert_eq!(refcount(&img, h), 0, "released by the flush");
        assert_eq!(img.stats().unwrap().quarantined, 0);
        assert!(mem.flush_count() > flushes);
        img.close().unwrap();
    }

    #[test]
    fn growth_past_the_slack_releases_the_quarantine() {
        // 16 clusters, slack two clusters: a full image reuses discarded clusters only
        // after growing by two.
        let (_mem, img) = image("provision=thin,quarantine-slack=128k", 16 * CS);
        img.write_at(&vec![1u8; (16 * CS) as usize], 0).unwrap();
        img.flush().unwrap();
        let end0 = img.stats().unwrap().allocation_end;
        let releases0 = img.stats().unwrap().quarantine_releases;
        for round in 0..4u64 {
            img.discard(round * CS, CS).unwrap();
            img.write_at(&vec![2u8; CS as usize], round * CS).unwrap();
        }
        let st = img.stats().unwrap();
        assert_eq!(
            st.allocation_end,
            end0 + 2 * CS,
            "grew by the slack, no more"
        );
        assert!(st.quarantine_releases > releases0, "{st:?}");
        let mut b = vec![0u8; (4 * CS) as usize];
        img.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 2));
        img.close().unwrap();
    }

    #[test]
    fn zero_slack_reuses_at_once() {
        let (_mem, img) = image("provision=thin,quarantine-slack=0", 16 * CS);
        img.write_at(&vec![1u8; (16 * CS) as usize], 0).unwrap();
        img.flush().unwrap();
        let end0 = img.stats().unwrap().allocation_end;
        let h = host_of(&img, 3 * CS);
        img.discard(3 * CS, CS).unwrap();
        img.write_at(&vec![2u8; CS as usize], 3 * CS).unwrap();
        assert_eq!(host_of(&img, 3 * CS), h, "the freed cluster is reused");
        assert_eq!(img.stats().unwrap().allocation_end, end0);
        img.close().unwrap();
    }
}
