//! Guest clusters claimed by a request whose plan is running without the metadata lock
//! (an allocating write between its allocation and its L2 commit, a discard between its
//! L2 edit and its host effect). Another request touching a claimed cluster waits until
//! the claim ends, so a cluster's entry never changes under a plan that relies on it; the
//! order of overlapping requests stays the submitter's business, as in the block layer.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use crate::meta::cache::OffsetHasher;

/// Claimed guest cluster indices.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    set: HashSet<u64, BuildHasherDefault<OffsetHasher>>,
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
}
