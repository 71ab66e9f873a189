//! The host-operation queue: discards of clusters whose last reference went away (after
//! the quarantine released them, so the metadata that dropped them is already durable).
//! They are issued at flush or when many wait, merged into ranges, and dropped for a
//! cluster that is allocated again first: its new data overwrites it, so punching it would
//! only cost time. Host effects on clusters that stay allocated (anchoring, discard of a
//! kept cluster) are not queued here: they are part of the request's plan.

use std::collections::BTreeSet;

use super::Meta;
use crate::error::Result;

/// Deferred discards are issued once this many clusters wait.
const MAX_DEFERRED: usize = 4096;

/// Queued host discards and the count of failed host operations.
#[derive(Debug, Default)]
pub(crate) struct HostOps {
    deferred: BTreeSet<u64>,
    failures: u64,
}

impl HostOps {
    /// A cluster is being allocated again: its deferred discard is dropped.
    pub(crate) fn cancel(&mut self, cluster: u64) {
        if !self.deferred.is_empty() {
            self.deferred.remove(&cluster);
        }
    }

    /// Count a failed (advisory) host operation.
    pub(crate) fn failed(&mut self) {
        self.failures += 1;
    }

    /// Host operations that failed so far (advisory: the metadata is right regardless).
    pub(crate) fn failures(&self) -> u64 {
        self.failures
    }
}

impl Meta {
    /// Queue the host discard of freed cluster index `cluster`.
    pub(crate) fn defer_discard(&mut self, cluster: u64) -> Result<()> {
        if (cluster << self.geo.cluster_bits()) >= self.alloc.end() {
            return Ok(());
        }
        self.host_ops.deferred.insert(cluster);
        if self.host_ops.deferred.len() >= MAX_DEFERRED {
            self.run_deferred_discards();
        }
        Ok(())
    }

    /// Issue the deferred discards, merged into ranges. Advisory, as in QEMU: a failure is
    /// counted; the metadata is already right.
    pub(crate) fn run_deferred_discards(&mut self) {
        if self.host_ops.deferred.is_empty() {
            return;
        }
        let cbits = self.geo.cluster_bits();
        let clusters = std::mem::take(&mut self.host_ops.deferred);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in clusters {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        for (s, n) in runs {
            if self.storage.discard(s << cbits, n << cbits).is_err() {
                self.host_ops.failed();
            }
        }
    }
}
