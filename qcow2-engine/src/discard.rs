//! Guest discard and write-zeroes: what they do to L2 entries, refcounts and the host,
//! by the policy in force (QEMU's knobs or a provisioning mode).
//!
//! Deviations from QEMU, all on the safe side:
//! - a cluster shared with a snapshot (refcount > 1) is never discarded or zeroed on the
//!   host, even with discard-no-unref (QEMU punches it and destroys the snapshot's data);
//! - when a cluster that is already zero-but-allocated is discarded again (or zeroed with
//!   may-unmap) under an anchoring policy, its host range is still released or anchored
//!   when it is owned alone, so stale data does not linger (QEMU skips it);
//! - a discard that changes nothing does not allocate an L2 table (QEMU does);
//! - the host discard of a cluster the qcow2 layer freed (refcount 0) is deferred to the
//!   next flush (or until many are pending) and dropped if the cluster is allocated again
//!   first: its new data overwrites it, so the punch would only cost time. Clusters kept
//!   allocated (anchoring, discard-no-unref) are released or anchored at once.

use qcow2_format::l2::{bitmap, BITMAP_ALL_ZEROES, OFLAG_ZERO};
use qcow2_format::{ClusterKind, L2Entry, SubclusterKind};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::meta::{HostOpKind, Meta};
use crate::policy::{FreeReason, Layer};

/// What to do with one whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterOp {
    /// Guest discard: the qcow2 layer acts as `Layer`.
    Discard(Layer),
    /// Write-zeroes: `unmap` (may-unmap after policy), `keep` (keep the reference).
    Zero { unmap: bool, keep: bool },
}

/// How a write-zeroes request treats whole clusters, fixed once per request.
#[derive(Debug, Clone, Copy)]
struct ZeroHow {
    /// May-unmap after the policy.
    unmap: bool,
    /// Keep references (discard-no-unref or an anchoring mode).
    keep: bool,
    /// Version 2 image (no zero clusters).
    v2: bool,
}

impl Image {
    /// Discard guest bytes (whole clusters only, as QEMU: partial clusters at either end
    /// are ignored, except a final partial cluster at an unaligned end of the image).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        let mut m = self.lock();
        let layer = m.policy.discard_layer();
        if layer == Layer::Full || len == 0 {
            return Ok(());
        }
        if m.area.header.version < 3 && self.backing.is_some() {
            return Err(Error::Unsupported(
                "discard on a version 2 image with a backing file (the backing data would show through)".into(),
            ));
        }
        m.prepare_first_write()?;
        let geo = self.geo;
        let size = self.virtual_size();
        let end = off + len;
        let start = geo.align_up(off);
        let stop = if end == size && start <= geo.align_down(size) {
            geo.align_up(size)
        } else {
            geo.align_down(end)
        };
        let mut g = start;
        while g < stop {
            self.zero_or_discard_cluster(&mut m, g, ClusterOp::Discard(layer))?;
            g += geo.cluster_size();
        }
        m.run_host_ops()
    }

    /// Make guest bytes read zero. `may_unmap` lets the policy release space. Unaligned
    /// parts are written as zero bytes unless they already read zero.
    pub fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_range(off, len)?;
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if len == 0 {
            return Ok(());
        }
        let geo = self.geo;
        let sc = geo.subcluster_size();
        let size = self.virtual_size();
        let end = off + len;
        let mut m = self.lock();
        m.prepare_first_write()?;
        let v2 = m.area.header.version < 3;
        let how = ZeroHow {
            unmap: !v2 && m.policy.zero_may_unmap(may_unmap),
            keep: m.policy.zero_keeps_reference(),
            v2,
        };
        // Head and tail inside one subcluster each; the aligned body between. An end at
        // the (unaligned) end of the image counts as aligned, as in QEMU.
        let up = |x: u64| x.div_ceil(sc) * sc;
        let head_end = if off % sc == 0 { off } else { up(off).min(end) };
        let body_end = if end == size {
            end
        } else {
            (end - end % sc).max(head_end)
        };
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new(); // (start, end, aligned)
        if off < head_end {
            pieces.push((off, head_end, false));
        }
        if head_end < body_end {
            pieces.push((head_end, body_end, true));
        }
        if body_end < end {
            pieces.push((body_end, end, false));
        }
        for (s, e, aligned) in pieces {
            if aligned {
                self.zero_aligned(&mut m, s, e, how)?;
            } else {
                self.zero_unaligned(&mut m, s, e, how)?;
            }
        }
        m.run_host_ops()
    }

    /// A range inside one subcluster: if the rest of the subcluster reads zero and holds
    /// no data, zero the whole subcluster; otherwise write zero bytes (QEMU's ENOTSUP
    /// fallback).
    fn zero_unaligned(&self, m: &mut Meta, s: u64, e: u64, how: ZeroHow) -> Result<()> {
        let geo = self.geo;
        let sc = geo.subcluster_size();
        let sub = s - s % sc;
        let sub_end = (sub + sc).min(self.virtual_size());
        let (entry, kind, _) = m.l2_kind(sub)?;
        let sk = entry.subcluster_kind(kind, &geo, geo.subcluster_index(sub));
        let empty = matches!(
            sk,
            SubclusterKind::UnallocatedPlain
                | SubclusterKind::UnallocatedAlloc
                | SubclusterKind::ZeroPlain
                | SubclusterKind::ZeroAlloc
        );
        if empty {
            let mut head = vec![0u8; (s - sub) as usize];
            let mut tail = vec![0u8; (sub_end - e) as usize];
            self.read_locked(m, &mut head, sub)?;
            self.read_locked(m, &mut tail, e)?;
            if head.iter().chain(tail.iter()).all(|&b| b == 0) {
                return self.zero_aligned(m, sub, sub_end, how);
            }
        }
        self.write_zero_bytes(m, s, e)
    }

    /// Write explicit zero bytes through the normal write path (allocating as needed).
    fn write_zero_bytes(&self, m: &mut Meta, s: u64, e: u64) -> Result<()> {
        let zeros = vec![0u8; (e - s).min(1 << 20) as usize];
        let mut pos = s;
        while pos < e {
            let n = (e - pos).min(zeros.len() as u64) as usize;
            self.write_locked(m, &zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Subcluster-aligned range: whole clusters change their entry; partial clusters
    /// (extended L2) change their bitmap.
    fn zero_aligned(&self, m: &mut Meta, s: u64, e: u64, how: ZeroHow) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut pos = s;
        while pos < e {
            let cl = geo.align_down(pos);
            let cl_end = (cl + cs).min(e);
            let whole = pos == cl && (cl_end == cl + cs || cl_end == self.virtual_size());
            if how.v2 {
                // No zero clusters on v2: without a backing file QEMU discards instead;
                // with one, zero bytes are written.
                if whole && self.backing.is_none() {
                    self.zero_or_discard_cluster(m, cl, ClusterOp::Discard(Layer::Unmap))?;
                } else {
                    self.write_zero_bytes(m, pos, cl_end)?;
                }
            } else if whole {
                self.zero_or_discard_cluster(
                    m,
                    cl,
                    ClusterOp::Zero {
                        unmap: how.unmap,
                        keep: how.keep,
                    },
                )?;
            } else {
                self.zero_subclusters(m, pos, cl_end)?;
            }
            pos = cl_end;
        }
        Ok(())
    }

    /// Extended L2, part of a cluster: mark the subclusters zero (no refcount change, no
    /// host I/O, as QEMU). Compressed clusters get zero bytes instead.
    fn zero_subclusters(&self, m: &mut Meta, s: u64, e: u64) -> Result<()> {
        let geo = self.geo;
        let (_, kind, _) = m.l2_kind(s)?;
        if let ClusterKind::Compressed(_) = kind {
            return self.write_zero_bytes(m, s, e);
        }
        let slot = m.l2_slot_for_write(s)?;
        let (entry, _) = m.l2_lookup(s)?;
        let first = geo.subcluster_index(s);
        let n = ((e - s) / geo.subcluster_size()) as u32;
        let bm = (entry.bitmap | bitmap::zero_range(first, n)) & !bitmap::alloc_range(first, n);
        if bm != entry.bitmap {
            m.l2_set(slot, L2Entry::new(entry.word, bm))?;
        }
        Ok(())
    }

    /// The new entry for one whole cluster, and the refcount / host effects.
    fn zero_or_discard_cluster(&self, m: &mut Meta, g: u64, op: ClusterOp) -> Result<()> {
        let geo = self.geo;
        let v3 = m.area.header.version >= 3;
        let (old, kind, _) = m.l2_kind(g)?;
        let compressed = matches!(kind, ClusterKind::Compressed(_));
        let allocated = matches!(
            kind,
            ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. } | ClusterKind::Compressed(_)
        );
        let has_host = matches!(
            kind,
            ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. }
        );
        let (unmap, keep, act) = match op {
            ClusterOp::Discard(layer) => {
                let keep = layer == Layer::Anchor && !compressed;
                (true, keep, self.backing.is_some() || allocated)
            }
            ClusterOp::Zero { unmap, keep } => {
                let unmap = compressed || (unmap && allocated);
                (unmap, keep && !compressed, true)
            }
        };
        let mut new = old;
        if act {
            if unmap && !keep {
                new = L2Entry::new(0, 0);
            }
            if geo.extended_l2() {
                new.bitmap = BITMAP_ALL_ZEROES;
            } else if v3 {
                new.word |= OFLAG_ZERO;
            }
        }
        // Host effect on a cluster that stays allocated and is owned alone (never on one
        // shared with a snapshot): may-unmap requests follow the policy's host layer; plain
        // write-zeroes anchor in provisioning modes so stale data does not linger.
        let stays_allocated = has_host && (!unmap || keep);
        let host = if stays_allocated {
            let off = old.host_offset();
            let owned = m.refcount(off >> geo.cluster_bits())? == 1;
            let layer = if unmap {
                m.policy.host_for_anchor()
            } else {
                self.zero_host_layer(m)
            };
            match layer {
                Layer::Unmap if owned => Some((off, HostOpKind::Discard)),
                Layer::Anchor if owned => Some((off, HostOpKind::ZeroKeep)),
                _ => None,
            }
        } else {
            None
        };
        if new != old {
            // Allocates the L2 table, or copies one shared with a snapshot, if needed.
            let slot = m.l2_slot_for_write(g)?;
            m.l2_set(slot, new)?;
            if unmap && !keep {
                match kind {
                    ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset } => {
                        m.free_clusters(offset, 1, FreeReason::Request)?
                    }
                    ClusterKind::Compressed(d) => {
                        for h in d.host_clusters(&geo) {
                            m.free_clusters(h, 1, FreeReason::Request)?;
                        }
                    }
                    _ => {}
                }
            }
        }
        // Also when the entry did not change (already zero-allocated): stale data on the
        // host is released or anchored (QEMU skips it).
        if let Some((off, k)) = host {
            m.queue_host_op(off, geo.cluster_size(), k, false);
        }
        Ok(())
    }

    /// Host layer for write-zeroes without may-unmap on a kept cluster: QEMU does no host
    /// I/O; a provisioning mode with a host layer anchors (zero, keep allocated) so that
    /// stale data does not linger.
    fn zero_host_layer(&self, m: &Meta) -> Layer {
        match m.policy.mode {
            crate::policy::Mode::Qemu { .. } => Layer::Full,
            crate::policy::Mode::Provision(p) => match p.layers().1 {
                Layer::Full => Layer::Full,
                _ => Layer::Anchor,
            },
        }
    }
}
