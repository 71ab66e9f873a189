//! The cluster allocator: first-fit from a free-cluster hint, refcount-based. Data
//! allocations fill holes (several runs) before extending the file; metadata takes
//! contiguous runs. A cluster with data I/O in flight is never handed out, and a cluster
//! whose refcount says free but which overlaps known metadata is reported as corruption
//! instead of being reused.

use crate::error::{corrupt, Error, Result};
use crate::meta::Meta;
use crate::policy::FreeReason;

/// A run of allocated host clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Host byte offset of the first cluster.
    pub off: u64,
    /// Number of clusters.
    pub count: u64,
}

impl Meta {
    fn is_free(&mut self, c: u64) -> Result<bool> {
        if c == 0 || self.inflight.contains_key(&c) {
            return Ok(false);
        }
        // A whole refcount range without a block is free; skip the lookup.
        if self.refcount(c)? != 0 {
            return Ok(false);
        }
        let cs = self.cluster_size();
        if let Some((s, e, k)) = self.overlapping_meta(c * cs, cs) {
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
        // Queued host operations of this request go first. Deferred discards of freed
        // clusters stay queued; the clusters handed out below drop theirs.
        self.run_host_ops()?;
        let cbits = self.geo.cluster_bits();
        let max_cluster = qcow2_format::geometry::MAX_HOST_OFFSET >> cbits;
        'retry: loop {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut got = 0u64;
            let mut c = self.free_hint.max(1);
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
                } else if !contiguous && first_skipped.is_none() && self.inflight.contains_key(&c) {
                    first_skipped = Some(c);
                }
                c += 1;
            }
            let mut created = false;
            for &(s, k) in &runs {
                created |= self.ensure_refblocks(s, k)?;
            }
            if created {
                continue 'retry;
            }
            for &(s, k) in &runs {
                self.update_refcounts(s << cbits, k, 1)?;
                for c in s..s + k {
                    self.cancel_deferred_discard(c);
                }
            }
            let last = runs.last().map(|(s, k)| s + k).unwrap_or(c);
            if !contiguous {
                self.free_hint = first_skipped.unwrap_or(last);
            } else if runs[0].0 == self.free_hint.max(1) {
                self.free_hint = last;
            }
            self.alloc_end = self.alloc_end.max(last << cbits);
            return Ok(runs
                .into_iter()
                .map(|(s, k)| Run {
                    off: s << cbits,
                    count: k,
                })
                .collect());
        }
    }

    /// Drop one reference from each of `n` clusters at `off`. Clusters whose refcount
    /// reaches zero are queued for a host discard if the policy passes `reason` down.
    pub(crate) fn free_clusters(&mut self, off: u64, n: u64, reason: FreeReason) -> Result<()> {
        let freed = self.update_refcounts(off, n, -1)?;
        if !freed.is_empty() {
            self.free_gen
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        if self.policy.passes(reason) {
            for c in freed {
                // Metadata clusters are punched only once the switch away from them is
                // durable; guest data may go at once (the guest gave it up). Deferred: a
                // cluster allocated again before the discard is issued is not punched.
                self.defer_discard(c, reason != FreeReason::Request)?;
            }
        }
        Ok(())
    }
}
