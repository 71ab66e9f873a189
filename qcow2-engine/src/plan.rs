//! A guest request, planned under the metadata lock: the host I/O to carry out without
//! the lock, and the metadata edits to commit once it succeeded. A plan is a value; the
//! synchronous executor (`exec/sync.rs`) runs it, and another executor could.

use qcow2_format::{ClusterKind, L2Entry};

use crate::meta::{L2Slot, Run};
use crate::provision::action::HostEffect;
use crate::request::read::Src;

/// Where bytes of a host write come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// The caller's buffer, from this byte.
    Guest {
        /// Offset in the caller's buffer.
        at: usize,
    },
    /// Zeros. The executor may zero the range on the host (keeping it allocated) instead
    /// of writing zero bytes, which leaves no dirty data for the next barrier to write.
    Zeroes,
    /// The old content of the guest range at `guest` (a copy-on-write source).
    Old {
        /// Guest offset of the piece.
        guest: u64,
        /// Where the old content lives.
        src: Src,
    },
}

/// A piece of a host write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Length in bytes.
    pub len: u64,
    /// Its source.
    pub fill: Fill,
}

/// Host I/O of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostIo {
    /// Write the pieces, in order, from host offset `host`.
    Write {
        /// Host byte offset.
        host: u64,
        /// What to write.
        pieces: Vec<Piece>,
    },
    /// A host effect on whole clusters that stay allocated (advisory: a failure is
    /// counted, the metadata is right regardless).
    Effect {
        /// Host byte offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// Discard or anchor.
        effect: HostEffect,
    },
}

/// A metadata edit committed after the plan's I/O succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    /// Point the entry at `slot` (for guest offset `guest`) at new data.
    SetL2 {
        /// Where the entry lives.
        slot: L2Slot,
        /// The guest offset it maps.
        guest: u64,
        /// The new entry.
        entry: L2Entry,
    },
    /// Drop the references the replaced entry held (copy-on-write: the next write reuses
    /// the space, so nothing is discarded on the host).
    Unref(ClusterKind),
}

/// A planned request (or one batch of it).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Host I/O, in order.
    pub io: Vec<HostIo>,
    /// Host clusters pinned against reuse until the plan is finished.
    pub pins: Vec<u64>,
    /// Guest clusters `[first, first + count)` claimed until the plan is finished.
    pub claim: Option<(u64, u64)>,
    /// Edits after the I/O.
    pub commit: Vec<Commit>,
    /// Clusters allocated for the plan, given back if the I/O fails.
    pub fresh: Vec<Run>,
    /// The commit exposes data that must be durable before the L2 entries are.
    pub data_first: bool,
}

impl Plan {
    /// Append a host write, merging it with the previous one where host-contiguous.
    pub(crate) fn write(&mut self, host: u64, pieces: impl IntoIterator<Item = Piece>) {
        let pieces: Vec<Piece> = pieces.into_iter().filter(|p| p.len > 0).collect();
        if pieces.is_empty() {
            return;
        }
        if let Some(HostIo::Write {
            host: h,
            pieces: prev,
        }) = self.io.last_mut()
        {
            let prev_len: u64 = prev.iter().map(|p| p.len).sum();
            if *h + prev_len == host {
                prev.extend(pieces);
                return;
            }
        }
        self.io.push(HostIo::Write { host, pieces });
    }

    /// Append a host effect, merging it with the previous one of the same kind where
    /// contiguous.
    pub(crate) fn effect(&mut self, off: u64, len: u64, effect: HostEffect) {
        if len == 0 {
            return;
        }
        if let Some(HostIo::Effect {
            off: o,
            len: l,
            effect: e,
        }) = self.io.last_mut()
        {
            if *e == effect && *o + *l == off {
                *l += len;
                return;
            }
        }
        self.io.push(HostIo::Effect { off, len, effect });
    }

    /// Whether the plan needs to run anything outside the lock.
    pub(crate) fn has_io(&self) -> bool {
        !self.io.is_empty()
    }
}
