//! The one decision per cluster: what a discard or write-zeroes does to one whole cluster,
//! as a value. `decide` is pure — (request, policy, what the cluster is) in, an action out —
//! and nothing below it asks the policy again: the planner applies the entry edit, hands
//! the dropped reference to the allocator with the host effect already decided, and puts a
//! host effect on a kept cluster into the plan when the cluster is owned alone.
//!
//! Deviations from QEMU, all on the safe side:
//! - a cluster shared with a snapshot (refcount > 1) is never discarded or zeroed on the
//!   host, even with discard-no-unref (QEMU punches it and destroys the snapshot's data);
//! - when a cluster that is already zero-but-allocated is discarded again (or zeroed with
//!   may-unmap) under an anchoring policy, its host range is still released or anchored
//!   when it is owned alone, so stale data does not linger (QEMU skips it);
//! - a discard that changes nothing does not allocate an L2 table (QEMU does);
//! - the host discard of a cluster the qcow2 layer freed (refcount 0) happens once the
//!   change that freed it is durable, and is dropped if the cluster is allocated again
//!   first: its new data overwrites it, so the punch would only cost time. Clusters kept
//!   allocated (anchoring, discard-no-unref) are released or anchored at once.
//! - in modes whose host layer is `unmap` (`metadata`, `thin`), the part of a new cluster
//!   a first write does not cover stays a hole on the host, and the file may end inside
//!   its last cluster (qemu-img map reports the hole as zeros); with QEMU-style options
//!   and host layers `full` / `anchor` a new cluster is allocated whole, as in QEMU.
//! - a write-zeroes covering part of a (sub)cluster zeroes the whole (sub)cluster as
//!   metadata when the rest of it reads zero. With QEMU-style options "reads zero" is
//!   QEMU's block-status test (`is_zero`): a zero subcluster, or an unallocated one over a
//!   backing range that is unallocated down the chain, zero, a raw file's hole or past
//!   the backing file's end; a backing data cluster holding zero bytes is data, and QEMU
//!   allocates the cluster and writes zeros. `provision=` modes read the rest of the
//!   subcluster instead: zero bytes are zero, so no cluster is allocated for them.

use qcow2_format::l2::{BITMAP_ALL_ZEROES, OFLAG_ZERO};
use qcow2_format::{ClusterKind, L2Entry};

use super::policy::{FreeReason, Layer, Mode, Policy};
use crate::meta::OnFree;

/// What a request asks of one whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// A guest discard, by the policy's qcow2 layer.
    Discard,
    /// A release whatever the policy's discard layer says: write-zeroes on a version 2
    /// image without a backing file, which QEMU turns into a discard.
    Release,
    /// Write-zeroes; `may_unmap` as the guest asked.
    Zero {
        /// The request allows releasing space.
        may_unmap: bool,
    },
}

/// What the decision needs to know about a cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClusterFacts {
    /// Its current kind.
    pub kind: ClusterKind,
    /// The image has a backing file (unallocated clusters show its data).
    pub has_backing: bool,
    /// Version 3 (zero clusters exist).
    pub v3: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
}

/// How the L2 entry changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryEdit {
    /// Unchanged.
    Keep,
    /// Keep the host offset, read zero (zero flag, or an all-zero bitmap).
    MarkZero,
    /// Drop the host offset and read zero (v3) or become unallocated (v2).
    Unref,
}

/// A host effect on a cluster that stays allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostEffect {
    /// Release the range (punch hole / BLKDISCARD).
    Discard,
    /// Zero the range, keeping it allocated.
    Anchor,
}

/// The decision for one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClusterAction {
    /// The entry edit.
    pub edit: EntryEdit,
    /// The old entry's references are dropped; what the host does when one was the last.
    pub unref: Option<OnFree>,
    /// Host effect on the kept cluster, to carry out only if it is owned alone.
    pub host_if_owned: Option<HostEffect>,
}

const NOTHING: ClusterAction = ClusterAction {
    edit: EntryEdit::Keep,
    unref: None,
    host_if_owned: None,
};

/// Decide what `req` does to a cluster described by `f` under `policy`.
pub(crate) fn decide(policy: &Policy, req: Request, f: &ClusterFacts) -> ClusterAction {
    let compressed = matches!(f.kind, ClusterKind::Compressed(_));
    let has_host = matches!(
        f.kind,
        ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. }
    );
    let allocated = has_host || compressed;
    // (qcow2 layer releases, reference kept, entry touched at all)
    let (unmap, keep, act) = match req {
        Request::Discard | Request::Release => {
            let layer = match req {
                Request::Release => Layer::Unmap,
                _ => policy.discard_layer(),
            };
            if layer == Layer::Full {
                return NOTHING;
            }
            (
                true,
                layer == Layer::Anchor && !compressed,
                f.has_backing || allocated,
            )
        }
        Request::Zero { may_unmap } => {
            let unmap = f.v3 && policy.zero_may_unmap(may_unmap);
            (
                compressed || (unmap && allocated),
                policy.zero_keeps_reference() && !compressed,
                true,
            )
        }
    };
    let edit = match (act, unmap && !keep) {
        (false, _) => EntryEdit::Keep,
        (true, true) => EntryEdit::Unref,
        (true, false) if f.v3 => EntryEdit::MarkZero,
        (true, false) => EntryEdit::Keep,
    };
    let unref = (edit == EntryEdit::Unref && allocated).then(|| {
        if policy.passes(FreeReason::Request) {
            OnFree::Discard
        } else {
            OnFree::Keep
        }
    });
    // Host effect on a cluster that stays allocated: may-unmap requests follow the
    // policy's host layer; plain write-zeroes anchor in provisioning modes so stale data
    // does not linger.
    let stays_allocated = has_host && (!unmap || keep);
    let host_layer = if !stays_allocated {
        Layer::Full
    } else if unmap {
        policy.host_for_anchor()
    } else {
        zero_host_layer(policy)
    };
    let host_if_owned = match host_layer {
        Layer::Unmap => Some(HostEffect::Discard),
        Layer::Anchor => Some(HostEffect::Anchor),
        Layer::Full => None,
    };
    ClusterAction {
        edit,
        unref,
        host_if_owned,
    }
}

/// Host layer for write-zeroes without may-unmap on a kept cluster: QEMU does no host
/// I/O; a provisioning mode with a host layer anchors (zero, keep allocated).
fn zero_host_layer(policy: &Policy) -> Layer {
    match policy.mode {
        Mode::Qemu { .. } => Layer::Full,
        Mode::Provision(p) => match p.layers().1 {
            Layer::Full => Layer::Full,
            _ => Layer::Anchor,
        },
    }
}

impl EntryEdit {
    /// The new entry from `old`.
    pub(crate) fn apply(self, old: L2Entry, f: &ClusterFacts) -> L2Entry {
        let mut new = match self {
            EntryEdit::Keep => return old,
            EntryEdit::MarkZero => old,
            EntryEdit::Unref => L2Entry::UNALLOCATED,
        };
        if f.extended_l2 {
            new.bitmap = BITMAP_ALL_ZEROES;
        } else if f.v3 {
            new.word |= OFLAG_ZERO;
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::policy::DiscardOptions;

    fn policy(s: &str) -> Policy {
        DiscardOptions::parse(s).unwrap().resolve(3).unwrap()
    }

    fn facts(kind: ClusterKind) -> ClusterFacts {
        ClusterFacts {
            kind,
            has_backing: false,
            v3: true,
            extended_l2: false,
        }
    }

    const NORMAL: ClusterKind = ClusterKind::Normal { offset: 0x50000 };
    const ZALLOC: ClusterKind = ClusterKind::ZeroAlloc { offset: 0x50000 };

    /// QEMU's result matrix (v3, no backing file) for a NORMAL cluster, one row per
    /// option set: default discard, DNU discard, write -z, write -z -u, DNU write -z -u.
    #[test]
    fn qemu_matrix_for_a_normal_cluster() {
        let d = Request::Discard;
        let z = Request::Zero { may_unmap: false };
        let zu = Request::Zero { may_unmap: true };
        let f = facts(NORMAL);
        let unmap = policy("discard=unmap");
        let dnu = policy("discard=unmap,discard-no-unref=on");
        let a = decide(&unmap, d, &f);
        assert_eq!((a.edit, a.unref), (EntryEdit::Unref, Some(OnFree::Discard)));
        let a = decide(&dnu, d, &f);
        assert_eq!(a.edit, EntryEdit::MarkZero);
        assert_eq!(
            (a.unref, a.host_if_owned),
            (None, Some(HostEffect::Discard))
        );
        let a = decide(&unmap, z, &f);
        assert_eq!(
            (a.edit, a.unref, a.host_if_owned),
            (EntryEdit::MarkZero, None, None)
        );
        assert_eq!(decide(&unmap, zu, &f).edit, EntryEdit::Unref);
        let a = decide(&dnu, zu, &f);
        assert_eq!(
            (a.edit, a.host_if_owned),
            (EntryEdit::MarkZero, Some(HostEffect::Discard))
        );
        // discard=ignore strips may-unmap: write -z -u keeps the data (case c6).
        let a = decide(&policy("discard=ignore"), zu, &f);
        assert_eq!(
            (a.edit, a.unref, a.host_if_owned),
            (EntryEdit::MarkZero, None, None)
        );
        // pass-discard-request=off keeps the host bytes (case b2b).
        let a = decide(
            &policy("discard=unmap,discard-no-unref=on,pass-discard-request=off"),
            d,
            &f,
        );
        assert_eq!(a.host_if_owned, None);
    }

    #[test]
    fn compressed_clusters_are_always_unreferenced() {
        let d = crate::meta::OnFree::Discard;
        let c = ClusterKind::Compressed(
            qcow2_format::CompressedDescriptor::for_data(
                0x50000,
                100,
                &qcow2_format::Geometry::new(16, false, 4).unwrap(),
            )
            .unwrap(),
        );
        for p in [
            "discard=unmap,discard-no-unref=on",
            "provision=full",
            "provision=metadata",
        ] {
            let a = decide(&policy(p), Request::Zero { may_unmap: false }, &facts(c));
            assert_eq!(a.edit, EntryEdit::Unref, "{p}");
            assert_eq!(a.host_if_owned, None);
            assert!(a.unref.is_some());
        }
        let a = decide(&policy("provision=thin"), Request::Discard, &facts(c));
        assert_eq!(a.unref, Some(d));
    }

    #[test]
    fn provisioning_modes() {
        let f = facts(NORMAL);
        let d = Request::Discard;
        let a = decide(&policy("provision=off"), d, &f);
        assert_eq!(a, NOTHING);
        let a = decide(&policy("provision=full"), d, &f);
        assert_eq!(
            (a.edit, a.host_if_owned),
            (EntryEdit::MarkZero, Some(HostEffect::Anchor))
        );
        let a = decide(&policy("provision=metadata"), d, &f);
        assert_eq!(
            (a.edit, a.host_if_owned),
            (EntryEdit::MarkZero, Some(HostEffect::Discard))
        );
        let a = decide(&policy("provision=thin"), d, &f);
        assert_eq!((a.edit, a.unref), (EntryEdit::Unref, Some(OnFree::Discard)));
        let a = decide(&policy("provision=reuse"), d, &f);
        assert_eq!((a.edit, a.unref), (EntryEdit::Unref, Some(OnFree::Keep)));
        // Plain write-zeroes anchor in modes with a host layer, so stale data goes.
        let a = decide(
            &policy("provision=thin"),
            Request::Zero { may_unmap: false },
            &f,
        );
        assert_eq!(
            (a.edit, a.host_if_owned),
            (EntryEdit::MarkZero, Some(HostEffect::Anchor))
        );
        // Re-discarding a zero-allocated cluster still releases its host range.
        let a = decide(&policy("provision=metadata"), d, &facts(ZALLOC));
        assert_eq!(a.host_if_owned, Some(HostEffect::Discard));
    }

    #[test]
    fn unallocated_and_zero_plain() {
        let p = policy("discard=unmap");
        let a = decide(&p, Request::Discard, &facts(ClusterKind::Unallocated));
        assert_eq!(a, NOTHING, "nothing to discard without a backing file");
        let with_backing = ClusterFacts {
            has_backing: true,
            ..facts(ClusterKind::Unallocated)
        };
        let a = decide(&p, Request::Discard, &with_backing);
        assert_eq!(a.edit, EntryEdit::Unref);
        assert_eq!(a.unref, None, "nothing was referenced");
        let z = decide(
            &p,
            Request::Zero { may_unmap: false },
            &facts(ClusterKind::Unallocated),
        );
        assert_eq!(
            z.edit
                .apply(L2Entry::UNALLOCATED, &facts(ClusterKind::Unallocated)),
            L2Entry::new(1, 0)
        );
        // Extended L2: an all-zero bitmap, the offset kept or dropped.
        let ext = ClusterFacts {
            extended_l2: true,
            ..facts(NORMAL)
        };
        let old = L2Entry::new(0x8000_0000_0005_0000, 0xffff_ffff);
        assert_eq!(
            EntryEdit::MarkZero.apply(old, &ext),
            L2Entry::new(old.word, BITMAP_ALL_ZEROES)
        );
        assert_eq!(
            EntryEdit::Unref.apply(old, &ext),
            L2Entry::new(0, BITMAP_ALL_ZEROES)
        );
        // Version 2: no zero flag.
        let v2 = ClusterFacts {
            v3: false,
            ..facts(NORMAL)
        };
        assert_eq!(EntryEdit::Unref.apply(old, &v2), L2Entry::UNALLOCATED);
    }
}
