//! Writing, planned per batch under the metadata lock and carried out without it.
//!
//! - Clusters already owned (COPIED, every touched subcluster allocated) are written in
//!   place: the plan is the host extents, pinned while the I/O runs; nothing to commit.
//! - Everything else is an allocating batch: new clusters are allocated (their refcounts
//!   counted), the guest clusters claimed, and the plan holds each new cluster's bytes —
//!   the caller's data plus the untouched part copied from the old content (host cluster,
//!   backing file, compressed cluster or zeros), resolved now and read by the executor. The
//!   commit points the L2 entries at the new clusters and drops the old references.

use qcow2_format::l2::{bitmap, BITMAP_ALL_ALLOC, OFLAG_COPIED};
use qcow2_format::{ClusterKind, L2Entry, SubclusterKind};

use crate::changes::ChangeKind;
use crate::error::{Error, Result};
use crate::image::{Image, State};
use crate::meta::L2Slot;
use crate::plan::{Commit, Fill, Piece, Plan};
use crate::provision::policy::DetectZeroes;
use crate::request::read::{Extent, Src};

/// Clusters handled by one allocating batch at most.
const MAX_BATCH: u64 = 512;

/// What one guest cluster of an allocating write needs.
struct Target {
    /// Guest offset of the cluster.
    cl: u64,
    /// Written byte range inside the cluster.
    a: u64,
    b: u64,
    slot: L2Slot,
    entry: L2Entry,
    kind: ClusterKind,
    /// Offset of this cluster's data in the caller's buffer.
    data_at: usize,
    /// Host cluster kept (an owned cluster with zero or unallocated parts).
    reuse: Option<u64>,
}

impl Image {
    /// Write guest bytes at `off`.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        let detect = self.lock()?.policy.detect_zeroes;
        if detect != DetectZeroes::Off && !buf.is_empty() && buf.iter().all(|&b| b == 0) {
            return self.write_zeroes(off, buf.len() as u64, detect == DetectZeroes::Unmap);
        }
        self.write_data(buf, off, ChangeKind::Write)
    }

    /// Write, then make it durable before returning (FUA).
    pub fn write_at_fua(&self, buf: &[u8], off: u64) -> Result<()> {
        self.write_at(buf, off)?;
        self.flush()
    }

    /// Vectored write: the buffers are written in order from `off`.
    pub fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(off, total)?;
        let mut pos = off;
        for b in bufs {
            self.write_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    /// Write guest data (no zero detection): plan a batch, run it, repeat. Each batch
    /// announces the rest of the request as `kind` before it is planned.
    pub(crate) fn write_data(&self, buf: &[u8], off: u64, kind: ChangeKind) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = off + pos as u64;
            let rest = &buf[pos..];
            let plan = {
                let mut st = self.lock_unclaimed(g >> self.geo.cluster_bits())?;
                st.meta.prepare_first_write()?;
                self.announce(&mut st, g, rest.len() as u64, kind)?;
                let (plan, n) = self.plan_write(&mut st, g, rest.len())?;
                self.begin(&mut st, &plan);
                pos += n;
                plan
            };
            self.run(plan, rest)?;
        }
        Ok(())
    }

    /// Plan the next batch of a write of `len` bytes at `g` (guest data at offset 0 of the
    /// batch's buffer); returns it and the bytes it covers.
    pub(crate) fn plan_write(&self, st: &mut State, g: u64, len: usize) -> Result<(Plan, usize)> {
        let (exts, n) = self.plan_in_place(st, g, len as u64)?;
        if n == 0 {
            return self.plan_alloc(st, g, len);
        }
        let mut plan = Plan::default();
        let mut at = 0usize;
        for e in &exts {
            if let Src::Host(h) = e.src {
                st.meta.check_overlap(h, e.len, None, "guest data")?;
                plan.write(
                    h,
                    [Piece {
                        len: e.len,
                        fill: Fill::Guest { at },
                    }],
                );
            }
            at += e.len as usize;
        }
        plan.pins = crate::request::read::host_clusters(&st.meta, &exts);
        Ok((plan, n as usize))
    }

    /// Whether a cluster's written range can go straight to its host cluster.
    fn in_place(&self, entry: &L2Entry, kind: ClusterKind, a: u64, b: u64) -> bool {
        let ClusterKind::Normal { .. } = kind else {
            return false;
        };
        if !entry.copied() {
            return false;
        }
        if !self.geo.extended_l2() {
            return true;
        }
        let sc = self.geo.subcluster_size();
        ((a / sc) as u32..b.div_ceil(sc) as u32)
            .all(|i| entry.subcluster_kind(kind, &self.geo, i) == SubclusterKind::Normal)
    }

    /// The longest prefix of `[g, g+len)` writable in place (and not claimed), as host
    /// extents.
    fn plan_in_place(&self, st: &mut State, g: u64, len: u64) -> Result<(Vec<Extent>, u64)> {
        let cs = self.geo.cluster_size();
        let mut exts: Vec<Extent> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let pos = g + done;
            if done > 0 && st.claims.is_claimed(pos >> self.geo.cluster_bits()) {
                break;
            }
            let cl = self.geo.align_down(pos);
            let a = pos - cl;
            let b = (a + (len - done)).min(cs);
            let (entry, kind, _) = st.meta.l2_kind(pos)?;
            if !self.in_place(&entry, kind, a, b) {
                break;
            }
            let ClusterKind::Normal { offset } = kind else {
                unreachable!("in_place checked the kind")
            };
            let h = offset + a;
            match exts.last_mut() {
                Some(Extent {
                    len: l,
                    src: Src::Host(s),
                }) if *s + *l == h => *l += b - a,
                _ => exts.push(Extent {
                    len: b - a,
                    src: Src::Host(h),
                }),
            }
            done += b - a;
        }
        Ok((exts, done))
    }

    /// Plan an allocating batch of clusters from `g`; returns it and the bytes it covers.
    fn plan_alloc(&self, st: &mut State, g: u64, len: usize) -> Result<(Plan, usize)> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut targets: Vec<Target> = Vec::new();
        let mut pos = 0usize;
        while pos < len && (targets.len() as u64) < MAX_BATCH {
            let p = g + pos as u64;
            if !targets.is_empty() && st.claims.is_claimed(p >> geo.cluster_bits()) {
                break;
            }
            let cl = geo.align_down(p);
            let a = p - cl;
            let b = (a + (len - pos) as u64).min(cs);
            let (entry, kind, _) = st.meta.l2_kind(p)?;
            if !targets.is_empty() && self.in_place(&entry, kind, a, b) {
                break;
            }
            let slot = st.meta.l2_slot_for_write(p)?;
            let reuse = match kind {
                ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }
                    if entry.copied() =>
                {
                    Some(offset)
                }
                _ => None,
            };
            targets.push(Target {
                cl,
                a,
                b,
                slot,
                entry,
                kind,
                data_at: pos,
                reuse,
            });
            pos += (b - a) as usize;
        }
        let need = targets.iter().filter(|t| t.reuse.is_none()).count() as u64;
        // Clusters at or past the end of allocation were never written since open and lay
        // beyond the file's end then: they read zero without asking the file.
        let zero_from = st.meta.alloc.end();
        let runs = if need > 0 {
            st.meta.alloc_clusters(need)?
        } else {
            Vec::new()
        };
        let mut plan = Plan {
            fresh: runs.clone(),
            claim: Some((g >> geo.cluster_bits(), targets.len() as u64)),
            ..Plan::default()
        };
        let built = (|| -> Result<()> {
            let mut hosts = runs
                .iter()
                .flat_map(|r| (0..r.count).map(move |i| r.off + i * cs));
            for t in &targets {
                let host = match t.reuse {
                    Some(h) => h,
                    None => hosts.next().expect("allocated enough"),
                };
                let zero_host = t.reuse.is_none() && host >= zero_from;
                let entry = self.plan_cluster(st, &mut plan, t, host, zero_host)?;
                plan.commit.push(Commit::SetL2 {
                    slot: t.slot,
                    guest: t.cl,
                    entry,
                });
                if t.reuse.is_none() {
                    plan.commit.push(Commit::Unref(t.kind));
                }
            }
            Ok(())
        })();
        if let Err(e) = built {
            for r in &runs {
                let _ = st.meta.unallocate(r.off, r.count);
            }
            return Err(e);
        }
        Ok((plan, pos))
    }

    /// The host writes for one target written to `host`, and its new L2 entry.
    /// `zero_host`: the host cluster is known to read zeros (fresh, past the old end).
    fn plan_cluster(
        &self,
        st: &mut State,
        plan: &mut Plan,
        t: &Target,
        host: u64,
        zero_host: bool,
    ) -> Result<L2Entry> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let guest = |at: usize| Piece {
            len: t.b - t.a,
            fill: Fill::Guest { at },
        };
        let zeroes = |len: u64| Piece {
            len,
            fill: Fill::Zeroes,
        };
        // Rewriting a cluster in place while its entry changes (e.g. zero-allocated to
        // data): the old bytes (stale, pre-zeroing) must not become visible through a
        // new entry that reaches the disk before the data does. A fresh cluster too: a
        // barrier of another request between this allocation and the end of its data
        // write (requests in flight together) syncs the refcounts early, and the entry
        // could then reach the disk before data that extends the file (a crash leaves
        // an entry past the end: found by the async crash sweep). Costs no extra sync
        // where refcounts wait for one anyway (one sync serves both).
        plan.data_first = true;
        let old_is_zero = match t.kind {
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc { .. } => true,
            ClusterKind::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if !geo.extended_l2() {
            let entry = L2Entry::new(host | OFLAG_COPIED, 0);
            let full = t.a == 0 && t.b == cs;
            if full || (old_is_zero && zero_host) {
                // A fresh cluster past the old end reads zero: only the data is written,
                // and the rest is allocated on the host (zeroed) where the policy keeps
                // host space allocated, as QEMU does; thin host layers leave holes.
                if !full && st.policy.allocates_whole_clusters() {
                    st.meta.check_overlap(host, cs, None, "guest data")?;
                    plan.write(host, [zeroes(t.a), guest(t.data_at), zeroes(cs - t.b)]);
                } else {
                    st.meta
                        .check_overlap(host + t.a, t.b - t.a, None, "guest data")?;
                    plan.write(host + t.a, [guest(t.data_at)]);
                }
                return Ok(entry);
            }
            // The untouched part must be durable before the entry that exposes it.
            plan.data_first = true;
            let mut pieces = self.old_pieces(st, t.cl, 0, t.a, old_is_zero, t.reuse.is_none())?;
            pieces.push(guest(t.data_at));
            pieces.extend(self.old_pieces(st, t.cl, t.b, cs, old_is_zero, t.reuse.is_none())?);
            st.meta.check_overlap(host, cs, None, "guest data")?;
            plan.write(host, pieces);
            return Ok(entry);
        }
        // Extended L2: allocate at subcluster granularity.
        let sc = geo.subcluster_size();
        let (first, last) = ((t.a / sc) as u32, t.b.div_ceil(sc) as u32);
        let fresh = t.reuse.is_none();
        // The subclusters the new cluster gets, as QEMU's copy-on-write: the touched ones
        // of a kept cluster; for a replaced cluster, from its first to its last allocated
        // subcluster (and the touched ones), copied whole; a compressed cluster whole.
        let (lo_sc, hi_sc) = match t.kind {
            _ if !fresh => (first, last),
            ClusterKind::Compressed(_) => (0, 32),
            ClusterKind::Normal { .. } if t.entry.bitmap & BITMAP_ALL_ALLOC != 0 => {
                let alloc = (t.entry.bitmap & BITMAP_ALL_ALLOC) as u32;
                (
                    first.min(alloc.trailing_zeros()),
                    last.max(32 - alloc.leading_zeros()),
                )
            }
            _ => (first, last),
        };
        // Outside that range every subcluster keeps its zero or unallocated state.
        let old_zero = if matches!(t.kind, ClusterKind::Compressed(_)) {
            0
        } else {
            t.entry.bitmap & !BITMAP_ALL_ALLOC
        };
        let mut bm = if fresh { old_zero } else { t.entry.bitmap };
        bm &= !bitmap::zero_range(lo_sc, hi_sc - lo_sc);
        bm |= bitmap::alloc_range(lo_sc, hi_sc - lo_sc);
        let entry = L2Entry::new(host | OFLAG_COPIED, bm);
        let (lo, hi) = (lo_sc as u64 * sc, hi_sc as u64 * sc);
        if t.a != lo || t.b != hi {
            plan.data_first = true;
        }
        let skip_old = old_is_zero && zero_host && fresh;
        // As above: a fresh cluster is allocated whole on the host where the policy keeps
        // host space allocated.
        let whole = skip_old && st.policy.allocates_whole_clusters();
        let (start, end) = if whole { (0, cs) } else { (lo, hi) };
        let mut pieces = vec![zeroes(lo - start)];
        pieces.extend(self.old_pieces(st, t.cl, lo, t.a, skip_old, t.reuse.is_none())?);
        pieces.push(guest(t.data_at));
        pieces.extend(self.old_pieces(st, t.cl, t.b, hi, skip_old, t.reuse.is_none())?);
        pieces.push(zeroes(end - hi));
        st.meta
            .check_overlap(host + start, end - start, None, "guest data")?;
        plan.write(host + start, pieces);
        Ok(entry)
    }

    /// Pieces holding the old content of cluster `cl` from `a` to `b` (zeros if `zero`).
    /// Zeros bound for a newly allocated cluster (`fresh`) may be zeroed on the host
    /// instead of written: no dirty page cache for the next barrier to write out (on the
    /// 20,000-request replay in thin mode, 30% less time). A kept cluster being rewritten
    /// gets zero bytes, so it stays one written extent (ext4 would split it into
    /// unwritten extents, and later punches of it would cost milliseconds each).
    fn old_pieces(
        &self,
        st: &mut State,
        cl: u64,
        a: u64,
        b: u64,
        zero: bool,
        fresh: bool,
    ) -> Result<Vec<Piece>> {
        if a >= b {
            return Ok(Vec::new());
        }
        let zeros = |guest: u64| {
            if fresh {
                Fill::Zeroes
            } else {
                Fill::Old {
                    guest,
                    src: Src::Zero,
                }
            }
        };
        if zero {
            return Ok(vec![Piece {
                len: b - a,
                fill: zeros(cl + a),
            }]);
        }
        let exts = self.resolve(&mut st.meta, cl + a, b - a)?;
        let mut guest = cl + a;
        let mut out = Vec::with_capacity(exts.len());
        for e in exts.iter() {
            let fill = match e.src {
                Src::Zero => zeros(guest),
                src => Fill::Old { guest, src },
            };
            out.push(Piece { len: e.len, fill });
            guest += e.len;
        }
        Ok(out)
    }
}
