//! Guest discard and write-zeroes, planned in bounded batches of whole clusters: for each
//! cluster the policy's decision (`provision::action`) is applied to the L2 entry and the
//! refcounts under the lock, and the host effects on kept clusters run afterwards without
//! it, with the clusters claimed. A long request never holds the lock for its whole range.
//! Parts smaller than a (sub)cluster follow QEMU: zeroed as metadata when the rest of the
//! subcluster already reads zero, otherwise written as zero bytes (or refused with
//! `no_fallback`, QEMU's `BDRV_REQ_NO_FALLBACK`).

use qcow2_format::l2::bitmap;
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
    pub fn write_zeroes_with(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_range(off, len)?;
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if len == 0 {
            return Ok(());
        }
        self.announce_request(off, len, ChangeKind::Zero)?;
        let sc = self.geo.subcluster_size();
        let size = self.virtual_size();
        let end = off + len;
        // Head and tail inside one subcluster each; the aligned body between. An end at
        // the (unaligned) end of the image counts as aligned, as in QEMU.
        let up = |x: u64| x.div_ceil(sc) * sc;
        let head_end = if off % sc == 0 { off } else { up(off).min(end) };
        let body_end = if end == size {
            end
        } else {
            (end - end % sc).max(head_end)
        };
        if off < head_end {
            self.zero_unaligned(off, head_end, flags)?;
        }
        if head_end < body_end {
            self.zero_aligned(head_end, body_end, flags)?;
        }
        if body_end < end {
            self.zero_unaligned(body_end, end, flags)?;
        }
        Ok(())
    }

    /// Announce a whole discard or write-zeroes request (QEMU marks the bitmaps over the
    /// whole requested range, parts the request leaves alone included).
    fn announce_request(&self, off: u64, len: u64, kind: ChangeKind) -> Result<()> {
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

    /// Subcluster-aligned range: whole clusters change their entry (in batches); partial
    /// clusters (extended L2) change their bitmap.
    fn zero_aligned(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let size = self.virtual_size();
        let mut pos = s;
        while pos < e {
            let cl = geo.align_down(pos);
            let whole_end = if e == size {
                geo.align_up(e)
            } else {
                geo.align_down(e)
            };
            if pos == cl && whole_end > cl {
                match self.zero_request(flags) {
                    Some(req) => self.clusters(cl, whole_end, req)?,
                    None => self.zero_bytes(pos, whole_end.min(e), flags)?,
                }
                pos = whole_end.min(e);
                continue;
            }
            let cl_end = (cl + cs).min(e);
            if self.version < 3 {
                self.zero_bytes(pos, cl_end, flags)?;
            } else {
                self.zero_subclusters(pos, cl_end, flags)?;
            }
            pos = cl_end;
        }
        Ok(())
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
        let (old, kind, _) = st.meta.l2_kind(pos)?;
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
            if let Some(on_free) = action.unref {
                self.unref(&mut st.meta, kind, on_free)?;
            }
        }
        // Also when the entry did not change (already zero-allocated): stale data on the
        // host is released or anchored (QEMU skips it). Never on a cluster shared with a
        // snapshot.
        if let (Some(effect), ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }) =
            (action.host_if_owned, kind)
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

    /// A range inside one subcluster: if the rest of the subcluster reads zero and holds
    /// no data, zero the whole subcluster; otherwise write zero bytes (QEMU's ENOTSUP
    /// fallback). The test and the zeroing happen under one lock hold.
    fn zero_unaligned(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<()> {
        let geo = self.geo;
        let sc = geo.subcluster_size();
        let sub = s - s % sc;
        let sub_end = (sub + sc).min(self.virtual_size());
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
            let mut rest_zero = false;
            if empty {
                let mut head = vec![0u8; (s - sub) as usize];
                let mut tail = vec![0u8; (sub_end - e) as usize];
                self.read_locked(&mut st.meta, &mut head, sub)?;
                self.read_locked(&mut st.meta, &mut tail, e)?;
                rest_zero = head.iter().chain(tail.iter()).all(|&b| b == 0);
            }
            let whole_cluster = sub == geo.align_down(sub)
                && (sub_end - sub == geo.cluster_size() || sub_end == self.virtual_size());
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
                        return r;
                    }
                    None => None,
                }
            }
        };
        match plan {
            Some(plan) => self.run(plan, &[]),
            None => self.zero_bytes(s, e, flags),
        }
    }

    /// Extended L2, part of a cluster: mark the subclusters zero (no refcount change, no
    /// host I/O, as QEMU). Compressed clusters get zero bytes instead.
    fn zero_subclusters(&self, s: u64, e: u64, flags: ZeroFlags) -> Result<()> {
        let plan = {
            let mut st = self.lock_unclaimed(s >> self.geo.cluster_bits())?;
            st.meta.prepare_first_write()?;
            self.announce(&mut st, s, e - s, ChangeKind::Zero)?;
            self.subclusters_locked(&mut st, s, e)?
        };
        match plan {
            Some(plan) => self.run(plan, &[]),
            None => self.zero_bytes(s, e, flags),
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
        let n = ((e - s) / geo.subcluster_size()) as u32;
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
