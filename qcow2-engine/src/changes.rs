//! The one point where every change of guest-visible content is announced: writes,
//! write-zeroes, discards, preallocation, resize and repair all pass it, under the
//! metadata lock, before the change is carried out. Dirty tracking subscribes here.

use std::sync::Arc;

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
