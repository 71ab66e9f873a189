//! Guest discard and write-zeroes, planned in bounded batches of whole clusters: for each
//! cluster the policy's decision (`provision::action`) is applied to the L2 entry and the
//! refcounts under the lock, and the host effects on kept clusters run afterwards without
//! it, with the clusters claimed. A long request never holds the lock for its whole range.
//! Parts smaller than a (sub)cluster follow QEMU: zeroed as metadata when the rest of the
//! subcluster already reads zero (by block status, as QEMU's `is_zero`, with QEMU-style
//! options; by its bytes in `provision=` modes), otherwise written as zero bytes (or
//! refused with `no_fallback`, QEMU's `BDRV_REQ_NO_FALLBACK`).

use qcow2_format::l2::{bitmap, OFLAG_ZERO};
use qcow2_format::{ClusterKind, L2Entry, SubclusterKind};

use crate::changes::ChangeKind;
use crate::error::{Error, Result};
use crate::image::{Image, State};
use crate::plan::Plan;
use crate::provision::action::{decide, ClusterFacts, Request};
use crate::provision::policy::Layer;

/// Clusters handled by one discard / write-zeroes batch at most (bounds the lock hold).
const MAX_BATCH: u64 = 512;

/// How a write-zeroes request may be carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be released (QEMU's `BDRV_REQ_MAY_UNMAP`), as the policy allows.
    pub may_unmap: bool,
    /// Fail with `Unsupported` (ENOTSUP) instead of writing zero bytes where the range
    /// cannot be zeroed as metadata (QEMU's `BDRV_REQ_NO_FALLBACK`, NBD's fast zero).
    pub no_fallback: bool,
}

impl Image {
    /// Discard guest bytes (whole clusters only, as QEMU: partial clusters at either end
    /// are ignored, except a final partial cluster at an unaligned end of the image).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if len == 0 || self.lock()?.policy.discard_layer() == Layer::Full {
            return Ok(());
        }
        if self.version < 3 && self.backing.is_some() {
            return Err(Error::Unsupported(
                "discard on a version 2 image with a backing file (the backing data would show through)".into(),
            ));
        }
        self.announce_request(off, len, ChangeKind::Discard)?;
        let geo = self.geo;
        let size = self.virtual_size();
        let end = off + len;
        let start = geo.align_up(off);
        let stop = if end == size && start <= geo.align_down(size) {
            geo.align_up(size)
        } else {
            geo.align_down(end)
        };
        self.clusters(start, stop, Request::Discard)
    }

    /// Make guest bytes read zero. `may_unmap` lets the policy release space. Unaligned
    /// parts are written as zero bytes unless they already read zero.
    pub fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.write_zeroes_with(
            off,
            len,
            ZeroFlags {
                may_unmap,
                no_fallback: false,
            },
        )
    }

    /// Write-zeroes with all of QEMU's request flags.
    ///
    /// The request is cut as QEMU's block layer cuts it: a head up to the first subcluster
    /// boundary, the aligned bulk without an unaligned tail, and the tail. Each piece is
    /// zeroed as metadata where the format allows, else written as zero bytes (refused
    /// with `no_fallback`).
    pub fn write_zeroes_with(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_range(off, len)?;
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        self.announce_request(off, len, ChangeKind::Zero)?;
        let sc = self.geo.subcluster_size();
        let end = off + len;
        let tail = end % sc;
        let mut pos = off;
        while pos < end {
            let num = if pos % sc != 0 {
                (sc - pos % sc).min(end - pos)
            } else if tail != 0 && end - pos > sc {
                end - pos - tail
            } else {
                end - pos
            };
            if let Some((s, e)) = self.zero_piece(pos, pos + num, flags)? {
                self.zero_bytes(s, e, flags)?;
            }
            pos += num;
        }
        Ok(())
    }

    /// Announce a whole discard or write-zeroes request (QEMU marks the bitmaps over the
    /// whole requested range, parts the request leaves alone included).
    fn announce_request(&self, off: u64, len: u64, kind: ChangeKind) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut st = self.lock()?;
        st.meta.prepare_first_write()?;
        self.announce(&mut st, off, len, kind)
    }

    /// The request a whole cluster of a write-zeroes becomes.
    fn zero_request(&self, flags: ZeroFlags) -> Option<Request> {
        if self.version >= 3 {
            Some(Request::Zero {
                may_unmap: flags.may_unmap,
            })
        } else if self.backing.is_none() {
            // No zero clusters on v2: without a backing file QEMU discards instead.
            Some(Request::Release)
        } else {
            None // zero bytes
        }
    }

    /// One piece of a write-zeroes (QEMU's `qcow2_co_pwrite_zeroes`): a piece inside one
    /// subcluster is zeroed with its whole subcluster when the rest of it already reads
    /// zero; an aligned piece (or one ending at the image's end) as metadata. Returns the
    /// range to write as zero bytes instead, if any.
    fn zero_piece(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<Option<(u64, u64)>> {
        let sc = self.geo.subcluster_size();
        let tail = if e == self.virtual_size() {
            0
        } else {
            e.div_ceil(sc) * sc - e
        };
        if s % sc != 0 || tail != 0 {
            return self.zero_unaligned(s, e, flags);
        }
        self.zeroize(s, e, flags)
    }

    /// Subcluster-aligned `[s, e)` (QEMU's `qcow2_subcluster_zeroize`): a partial first
    /// cluster and a partial last cluster change their bitmap (extended L2), whole clusters
    /// their entry, in batches. A compressed partial cluster cannot be zeroed as metadata:
    /// with QEMU-style options the whole piece is then written as zero bytes (what QEMU
    /// does, after zeroing what it did before); a provisioning mode writes bytes over that
    /// cluster part only (fewer clusters allocated). Returns the range to write as bytes.
    fn zeroize(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<Option<(u64, u64)>> {
        let geo = self.geo;
        let size = self.virtual_size();
        let Some(req) = self.zero_request(flags) else {
            return Ok(Some((s, e)));
        };
        let exact = matches!(
            self.lock()?.policy.mode,
            crate::provision::policy::Mode::Qemu { .. }
        );
        let mut bytes: Option<(u64, u64)> = None;
        // Note that the partial cluster [a, b) cannot be zeroed; true: stop.
        let mut cannot = |a: u64, b: u64| -> bool {
            if exact {
                bytes = Some((s, e));
                true
            } else {
                bytes = Some(match bytes {
                    None => (a, b),
                    Some((x, _)) => (x, b),
                });
                false
            }
        };
        let head_end = e.min(geo.align_up(s));
        let mut pos = s;
        if head_end > s && s % geo.cluster_size() != 0 {
            if !self.zero_subclusters(s, head_end)? && cannot(s, head_end) {
                return Ok(bytes);
            }
            pos = head_end;
        }
        // At the image's end the last cluster counts as whole (no tail), as in QEMU.
        let (whole_end, tail_start) = if e >= size {
            (if pos < e { geo.align_up(e) } else { pos }, e)
        } else {
            let t = pos.max(geo.align_down(e));
            (t, t)
        };
        if pos < whole_end {
            self.clusters(pos, whole_end, req)?;
        }
        if tail_start < e && !self.zero_subclusters(tail_start, e)? {
            cannot(tail_start, e);
        }
        Ok(bytes)
    }

    /// A resize's new area `[start, size)` over a longer backing file, under the lock
    /// (QEMU's truncate with `BDRV_REQ_ZERO_WRITE`: `qcow2_subcluster_zeroize` without
    /// may-unmap, before the new size is visible): a partial first cluster marks its
    /// subclusters zero, whole clusters become zero clusters, the last one counting as
    /// whole. Announces nothing (the resize did; no bitmap is dirtied). Returns the plans
    /// to run once the lock is released (begun: their clusters claimed if they have I/O;
    /// they must run even when the result is an error).
    pub(crate) fn zero_grown_locked(
        &self,
        st: &mut State,
        start: u64,
        size: u64,
    ) -> (Vec<Plan>, Result<()>) {
        let geo = self.geo;
        let mut plans = Vec::new();
        if start >= size {
            return (plans, Ok(()));
        }
        let mut pos = start;
        if start % geo.cluster_size() != 0 {
            let head_end = geo.align_up(start).min(size);
            match self.subclusters_locked(st, start, head_end) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    let e = "Failed to zero out new clusters: the last cluster is compressed";
                    return (plans, Err(Error::Unsupported(e.into())));
                }
                Err(e) => return (plans, Err(e)),
            }
            pos = head_end;
        }
        let stop = geo.align_up(size);
        let req = Request::Zero { may_unmap: false };
        while pos < stop {
            let (plan, next, r) = self.plan_clusters(st, pos, stop, req);
            self.begin(st, &plan);
            plans.push(plan);
            if r.is_err() {
                return (plans, r);
            }
            pos = next;
        }
        (plans, Ok(()))
    }

    /// Whole clusters `[start, stop)`, batch by batch.
    fn clusters(&self, start: u64, stop: u64, req: Request) -> Result<()> {
        let kind = match req {
            Request::Zero { .. } => ChangeKind::Zero,
            _ => ChangeKind::Discard,
        };
        let size = self.virtual_size();
        let mut g = start;
        while g < stop {
            let plan = {
                let mut st = self.lock_unclaimed(g >> self.geo.cluster_bits())?;
                st.meta.prepare_first_write()?;
                let batch_end = stop.min(g + MAX_BATCH * self.geo.cluster_size()).min(size);
                self.announce(&mut st, g, batch_end.saturating_sub(g), kind)?;
                let (plan, next, r) = self.plan_clusters(&mut st, g, stop, req);
                self.begin(&mut st, &plan);
                g = next;
                (plan, r)
            };
            let (plan, r) = plan;
            self.run(plan, &[])?;
            r?;
        }
        Ok(())
    }

    /// Apply the policy's decision to whole clusters from `g` (up to a batch, stopping at
    /// a claimed cluster); returns the plan of host effects, where the batch ended, and an
    /// error that stopped it part-way (the part done is still begun and run).
    fn plan_clusters(
        &self,
        st: &mut State,
        g: u64,
        stop: u64,
        req: Request,
    ) -> (Plan, u64, Result<()>) {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut plan = Plan::default();
        let first = g >> geo.cluster_bits();
        let mut pos = g;
        let mut n = 0u64;
        let mut r = Ok(());
        while pos < stop && n < MAX_BATCH {
            if n > 0 && st.claims.is_claimed(pos >> geo.cluster_bits()) {
                break;
            }
            if let Err(e) = self.plan_one_cluster(st, &mut plan, pos, req) {
                r = Err(e);
                break;
            }
            pos += cs;
            n += 1;
        }
        if plan.has_io() {
            plan.claim = Some((first, n));
        }
        (plan, pos, r)
    }

    /// The policy's decision for the cluster at `pos`: entry and refcounts now, host
    /// effect into `plan`.
    fn plan_one_cluster(
        &self,
        st: &mut State,
        plan: &mut Plan,
        pos: u64,
        req: Request,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let (old, kind, damaged) = self.kind_for_release(st, pos)?;
        let facts = ClusterFacts {
            kind,
            has_backing: self.backing.is_some(),
            v3: self.version >= 3,
            extended_l2: geo.extended_l2(),
        };
        let action = decide(&st.policy, req, &facts);
        let new = action.edit.apply(old, &facts);
        if new != old {
            // Allocates the L2 table, or copies one shared with a snapshot, if needed.
            let slot = st.meta.l2_slot_for_write(pos)?;
            st.meta.set_l2(slot, pos, new)?;
            // A damaged entry's cluster is not freed (QEMU: a non-fatal corruption): a leak.
            if let Some(on_free) = action.unref.filter(|_| !damaged) {
                self.unref(&mut st.meta, kind, on_free)?;
            }
        }
        // Also when the entry did not change (already zero-allocated): stale data on the
        // host is released or anchored (QEMU skips it). Never on a cluster shared with a
        // snapshot.
        if let (
            false,
            Some(effect),
            ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset },
        ) = (damaged, action.host_if_owned, kind)
        {
            if st.meta.refcount(offset >> geo.cluster_bits())? == 1 {
                // Past the image's clusters there is nothing to release or anchor (a
                // corrupt reference may point there; zeroing it would grow the file).
                let len = cs.min(st.meta.alloc.end().saturating_sub(offset));
                plan.effect(offset, len, effect);
            }
        }
        Ok(())
    }

    /// The entry at `pos` and its kind for a discard or write-zeroes, and whether it is
    /// damaged. As QEMU, a standard entry whose only damage is an unaligned host offset or
    /// reserved bits can still be dropped (the cluster is not freed: a leak, reported by
    /// check); anything else damaged fails and marks the image corrupt.
    fn kind_for_release(&self, st: &mut State, pos: u64) -> Result<(L2Entry, ClusterKind, bool)> {
        let geo = self.geo;
        let (entry, _) = st.meta.l2_lookup(pos)?;
        if let Ok(kind) = entry.kind(&geo) {
            return Ok((entry, kind, false));
        }
        if geo.extended_l2() || entry.is_compressed() {
            st.meta.l2_kind(pos)?; // fails, marking the image corrupt
        }
        let offset = entry.host_offset();
        let kind = match (entry.word & OFLAG_ZERO != 0, offset) {
            (true, 0) => ClusterKind::ZeroPlain,
            (true, offset) => ClusterKind::ZeroAlloc { offset },
            (false, 0) => ClusterKind::Unallocated,
            (false, offset) => ClusterKind::Normal { offset },
        };
        Ok((entry, kind, true))
    }

    /// A range inside one subcluster: if the rest of the subcluster reads zero and holds
    /// no data, zero the whole subcluster; otherwise write zero bytes (QEMU's ENOTSUP
    /// fallback).
    ///
    /// "Reads zero" is decided as QEMU decides it with QEMU-style options: by block status
    /// (`is_zero`), never by the bytes. The subcluster must be a zero subcluster, or
    /// unallocated where the backing chain's status says zero (`backing_reads_zero`): a
    /// backing data cluster holding zero bytes is data, so QEMU allocates the cluster and
    /// writes zeros. The chain's status is asked before the lock (the backing files are
    /// read-only), the subcluster's kind under it. Provisioning modes read the rest of
    /// the subcluster under the lock instead and zero it as metadata when its bytes are
    /// zero (fewer clusters allocated; a documented deviation in `provision::action`).
    fn zero_unaligned(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<Option<(u64, u64)>> {
        let geo = self.geo;
        let sc = geo.subcluster_size();
        let sub = s - s % sc;
        let sub_end = (sub + sc).min(self.virtual_size());
        let exact = matches!(
            self.lock()?.policy.mode,
            crate::provision::policy::Mode::Qemu { .. }
        );
        let below_zero = if exact {
            Some(
                self.backing_reads_zero(sub, s - sub)?
                    && self.backing_reads_zero(e, sub_end - e)?,
            )
        } else {
            None
        };
        let plan = {
            let mut st = self.lock_unclaimed(sub >> geo.cluster_bits())?;
            st.meta.prepare_first_write()?;
            self.announce(&mut st, s, e - s, ChangeKind::Zero)?;
            let (entry, kind, _) = st.meta.l2_kind(sub)?;
            let sk = entry.subcluster_kind(kind, &geo, geo.subcluster_index(sub));
            let empty = matches!(
                sk,
                SubclusterKind::UnallocatedPlain
                    | SubclusterKind::UnallocatedAlloc
                    | SubclusterKind::ZeroPlain
                    | SubclusterKind::ZeroAlloc
            );
            let exact = matches!(st.policy.mode, crate::provision::policy::Mode::Qemu { .. });
            let mut rest_zero = false;
            if let (true, Some(below_zero)) = (exact, below_zero) {
                rest_zero = match sk {
                    SubclusterKind::ZeroPlain | SubclusterKind::ZeroAlloc => true,
                    SubclusterKind::UnallocatedPlain | SubclusterKind::UnallocatedAlloc => {
                        below_zero
                    }
                    _ => false,
                };
            } else if empty {
                let mut head = vec![0u8; (s - sub) as usize];
                let mut tail = vec![0u8; (sub_end - e) as usize];
                self.read_locked(&mut st.meta, &mut head, sub)?;
                self.read_locked(&mut st.meta, &mut tail, e)?;
                rest_zero = head.iter().chain(tail.iter()).all(|&b| b == 0);
            }
            // QEMU zeroes the whole subcluster: a whole cluster when the subcluster is one,
            // or when it starts a cluster and reaches the image's end.
            let whole_cluster = sub == geo.align_down(sub)
                && (sc == geo.cluster_size() || sub + sc >= self.virtual_size());
            if !rest_zero {
                None
            } else if !whole_cluster {
                self.subclusters_locked(&mut st, sub, sub_end)?
            } else {
                // The subcluster is the whole cluster (or its end is the image's end).
                match self.zero_request(flags) {
                    Some(req) => {
                        let (plan, _, r) = self.plan_clusters(&mut st, sub, sub_end, req);
                        self.begin(&mut st, &plan);
                        drop(st);
                        self.run(plan, &[])?;
                        return r.map(|()| None);
                    }
                    None => None,
                }
            }
        };
        match plan {
            Some(plan) => self.run(plan, &[]).map(|()| None),
            None => Ok(Some((s, e))),
        }
    }

    /// Extended L2, part of a cluster: mark the subclusters zero (no refcount change, no
    /// host I/O, as QEMU). False: a compressed cluster, which cannot be partly zeroed.
    fn zero_subclusters(&self, s: u64, e: u64) -> Result<bool> {
        let plan = {
            let mut st = self.lock_unclaimed(s >> self.geo.cluster_bits())?;
            st.meta.prepare_first_write()?;
            self.announce(&mut st, s, e - s, ChangeKind::Zero)?;
            self.subclusters_locked(&mut st, s, e)?
        };
        match plan {
            Some(plan) => self.run(plan, &[]).map(|()| true),
            None => Ok(false),
        }
    }

    /// The bitmap edit of `zero_subclusters` under the lock; None: write bytes instead.
    fn subclusters_locked(&self, st: &mut State, s: u64, e: u64) -> Result<Option<Plan>> {
        let geo = self.geo;
        let (_, kind, _) = st.meta.l2_kind(s)?;
        if let ClusterKind::Compressed(_) = kind {
            return Ok(None);
        }
        let slot = st.meta.l2_slot_for_write(s)?;
        let (entry, _) = st.meta.l2_lookup(s)?;
        let first = geo.subcluster_index(s);
        let n = (e - s).div_ceil(geo.subcluster_size()) as u32;
        let bm = (entry.bitmap | bitmap::zero_range(first, n)) & !bitmap::alloc_range(first, n);
        if bm != entry.bitmap {
            st.meta.set_l2(slot, s, L2Entry::new(entry.word, bm))?;
        }
        Ok(Some(Plan::default()))
    }

    /// Write explicit zero bytes through the normal write path, unless refused.
    fn zero_bytes(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<()> {
        if flags.no_fallback {
            return Err(Error::Unsupported(format!(
                "zeroing {s:#x}+{:#x} would write zero bytes (no fallback allowed)",
                e - s
            )));
        }
        let zeros = vec![0u8; (e - s).min(1 << 20) as usize];
        let mut pos = s;
        while pos < e {
            let n = (e - pos).min(zeros.len() as u64) as usize;
            self.write_data(&zeros[..n], pos, ChangeKind::Zero)?;
            pos += n as u64;
        }
        Ok(())
    }
}
