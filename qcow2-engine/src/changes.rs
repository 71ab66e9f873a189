//! The one point where every change of guest-visible content is announced: writes,
//! write-zeroes, discards, preallocation, resize and repair all pass it, under the
//! metadata lock, before the change is planned (so before any of its metadata edits or
//! host I/O). Writes announce each batch's range (the rest of the request) as the batch is
//! planned; write-zeroes and discards announce the whole requested range once (QEMU marks
//! it all, unaligned parts a discard ignores included) and each batch again as it is
//! planned (an operation between batches, e.g. a bitmap cleared, must see the rest). A
//! discard the policy ignores announces nothing. Persistent dirty bitmaps are marked
//! here, their write intent made durable, then the subscribers are told.

use std::sync::Arc;

use crate::error::Result;
use crate::image::{Image, State};

/// What kind of request changes the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Guest data written.
    Write,
    /// Write-zeroes.
    Zero,
    /// Discard.
    Discard,
    /// The virtual size grew: the new range reads zero.
    Resize,
    /// Preallocation at create (content unchanged: it reads zero before and after).
    Preallocate,
    /// A repair dropped references it could not keep.
    Repair,
}

/// Told of every content change of an image it watches.
pub trait ContentWatcher: Send + Sync {
    /// Guest bytes `[off, off + len)` are about to change. Called with the image's
    /// metadata lock held: keep it short and never call back into the image.
    fn will_change(&self, off: u64, len: u64, kind: ChangeKind);
}

/// The subscribers of one image.
#[derive(Default)]
pub(crate) struct Changes {
    watchers: Vec<Arc<dyn ContentWatcher>>,
}

impl Changes {
    /// Add a watcher.
    pub(crate) fn subscribe(&mut self, w: Arc<dyn ContentWatcher>) {
        self.watchers.push(w);
    }

    /// Announce a change.
    pub(crate) fn announce(&self, off: u64, len: u64, kind: ChangeKind) {
        if len == 0 {
            return;
        }
        for w in &self.watchers {
            w.will_change(off, len, kind);
        }
    }
}

impl Image {
    /// Announce that guest bytes `[off, off + len)` are about to change (the one point):
    /// mark the persistent bitmaps (making their write intent durable), then tell the
    /// subscribers. Called under the metadata lock, after the request's first-write header
    /// bookkeeping and before anything of the change is planned. A resize marks nothing
    /// (QEMU's bitmaps grow clean); the bitmaps grow in `resize`.
    pub(crate) fn announce(
        &self,
        st: &mut State,
        off: u64,
        len: u64,
        kind: ChangeKind,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !matches!(kind, ChangeKind::Resize | ChangeKind::Preallocate) {
            st.meta.bitmaps_will_change(off, len)?;
        }
        st.changes.announce(off, len, kind);
        Ok(())
    }
}
