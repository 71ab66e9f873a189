//! Guest clusters claimed by a request whose plan is running without the metadata lock
//! (an allocating write between its allocation and its L2 commit, a discard between its
//! L2 edit and its host effect). Another request touching a claimed cluster waits until
//! the claim ends, so a cluster's entry never changes under a plan that relies on it; the
//! order of overlapping requests stays the submitter's business, as in the block layer.
//! Plans with host I/O are also counted while they run, so that bitmap operations can
//! wait until no request has data in flight.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use crate::meta::cache::OffsetHasher;

/// Claimed guest cluster indices.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    set: HashSet<u64, BuildHasherDefault<OffsetHasher>>,
    /// Plans with host I/O begun and not finished.
    running: u64,
    /// Threads waiting for `running` to reach 0.
    idle_waiters: u64,
}

impl Claims {
    /// Whether guest cluster index `c` is claimed.
    pub(crate) fn is_claimed(&self, c: u64) -> bool {
        !self.set.is_empty() && self.set.contains(&c)
    }

    /// Claim `[first, first + n)` (none of which is claimed).
    pub(crate) fn claim(&mut self, first: u64, n: u64) {
        for c in first..first + n {
            let fresh = self.set.insert(c);
            debug_assert!(fresh, "cluster {c} claimed twice");
        }
    }

    /// End the claim on `[first, first + n)`.
    pub(crate) fn release(&mut self, first: u64, n: u64) {
        for c in first..first + n {
            self.set.remove(&c);
        }
    }

    /// Whether nothing is claimed.
    pub(crate) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// A plan with host I/O begins.
    pub(crate) fn plan_started(&mut self) {
        self.running += 1;
    }

    /// A plan with host I/O ended; returns whether someone waits for that (notify then).
    pub(crate) fn plan_ended(&mut self) -> bool {
        self.running -= 1;
        self.running == 0 && self.idle_waiters > 0
    }

    /// Whether nothing is claimed and no plan has I/O in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.set.is_empty() && self.running == 0
    }

    /// Count a thread waiting for [`is_idle`](Self::is_idle) (`delta` +1 or -1).
    pub(crate) fn wait_idle(&mut self, waiting: bool) {
        if waiting {
            self.idle_waiters += 1;
        } else {
            self.idle_waiters -= 1;
        }
    }
}
