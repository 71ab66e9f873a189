//! Writing: clusters already owned (COPIED, all touched subclusters allocated) are written
//! in place outside the metadata lock; everything else is planned, allocated and written
//! under it, with copy-on-write of the untouched part from the old content.

use qcow2_format::l2::{bitmap, BITMAP_ALL_ALLOC, OFLAG_COPIED};
use qcow2_format::{ClusterKind, L2Entry, SubclusterKind};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::l2map::L2Slot;
use crate::meta::Meta;
use crate::policy::{DetectZeroes, FreeReason};
use crate::read::{pin, Extent, Src};

/// Host writes for one cluster: (host offset, bytes).
type HostWrites = Vec<(u64, Vec<u8>)>;

/// Clusters handled by one allocating batch at most.
const MAX_BATCH: usize = 512;

/// What one guest cluster of an allocating write needs.
struct Plan {
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
        let detect = self.lock().policy.detect_zeroes;
        if detect != DetectZeroes::Off && !buf.is_empty() && buf.iter().all(|&b| b == 0) {
            return self.write_zeroes(off, buf.len() as u64, detect == DetectZeroes::Unmap);
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = off + pos as u64;
            let rest = &buf[pos..];
            let mut m = self.lock();
            m.prepare_first_write()?;
            let (exts, n) = self.plan_in_place(&mut m, g, rest.len() as u64)?;
            if n > 0 {
                for e in &exts {
                    if let Src::Host(h) = e.src {
                        m.check_overlap(h, e.len, None, "guest data")?;
                    }
                }
                let pinned = pin(&mut m, &exts);
                drop(m);
                let r = self.write_extents(&exts, &rest[..n as usize]);
                let mut m = self.lock();
                for c in pinned {
                    m.inflight_remove(c);
                }
                r?;
                pos += n as usize;
            } else {
                pos += self.write_alloc(&mut m, g, rest)?;
            }
        }
        Ok(())
    }

    /// Write with the metadata lock held (zero bytes from write-zeroes fallbacks).
    pub(crate) fn write_locked(&self, m: &mut Meta, buf: &[u8], off: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = off + pos as u64;
            let rest = &buf[pos..];
            let (exts, n) = self.plan_in_place(m, g, rest.len() as u64)?;
            if n > 0 {
                for e in &exts {
                    if let Src::Host(h) = e.src {
                        m.check_overlap(h, e.len, None, "guest data")?;
                    }
                }
                self.write_extents(&exts, &rest[..n as usize])?;
                pos += n as usize;
            } else {
                pos += self.write_alloc(m, g, rest)?;
            }
        }
        Ok(())
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

    fn write_extents(&self, exts: &[Extent], data: &[u8]) -> Result<()> {
        let mut at = 0usize;
        for e in exts {
            if let Src::Host(h) = e.src {
                self.storage
                    .write_at(&data[at..at + e.len as usize], h)
                    .map_err(Error::io_lazy(|| {
                        format!("writing data at host offset {h:#x}")
                    }))?;
            }
            at += e.len as usize;
        }
        Ok(())
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

    /// The longest prefix of `[g, g+len)` writable in place, as host extents.
    fn plan_in_place(&self, m: &mut Meta, g: u64, len: u64) -> Result<(Vec<Extent>, u64)> {
        let cs = self.geo.cluster_size();
        let mut exts: Vec<Extent> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let pos = g + done;
            let cl = self.geo.align_down(pos);
            let a = pos - cl;
            let b = (a + (len - done)).min(cs);
            let (entry, kind, _) = m.l2_kind(pos)?;
            if !self.in_place(&entry, kind, a, b) {
                break;
            }
            let ClusterKind::Normal { offset } = kind else {
                unreachable!()
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

    /// Allocating write of a batch of clusters from `g`; returns the bytes consumed.
    fn write_alloc(&self, m: &mut Meta, g: u64, data: &[u8]) -> Result<usize> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut plans: Vec<Plan> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() && plans.len() < MAX_BATCH {
            let p = g + pos as u64;
            let cl = geo.align_down(p);
            let a = p - cl;
            let b = (a + (data.len() - pos) as u64).min(cs);
            let slot = m.l2_slot_for_write(p)?;
            let (entry, kind, _) = m.l2_kind(p)?;
            if !plans.is_empty() && self.in_place(&entry, kind, a, b) {
                break;
            }
            let reuse = match kind {
                ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }
                    if entry.copied() =>
                {
                    Some(offset)
                }
                _ => None,
            };
            plans.push(Plan {
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
        let need = plans.iter().filter(|p| p.reuse.is_none()).count() as u64;
        // Clusters at or past `alloc_end` were never written since open and lay beyond
        // the file's end then: they read zero without a syscall to ask the file length.
        let zero_from = m.alloc_end;
        let runs = if need > 0 {
            m.alloc_clusters(need)?
        } else {
            Vec::new()
        };
        let mut hosts = runs
            .iter()
            .flat_map(|r| (0..r.count).map(move |i| r.off + i * cs));
        let mut writes: HostWrites = Vec::new();
        let mut updates: Vec<(L2Slot, L2Entry)> = Vec::new();
        let result = (|| -> Result<()> {
            for p in &plans {
                let fresh = p.reuse.is_none();
                let host = match p.reuse {
                    Some(h) => h,
                    None => hosts.next().expect("allocated enough"),
                };
                let d = &data[p.data_at..p.data_at + (p.b - p.a) as usize];
                let (w, e) = self.cluster_write(m, p, host, fresh && host >= zero_from, d)?;
                writes.extend(w);
                updates.push((p.slot, e));
            }
            for (h, buf) in merge(writes.drain(..)) {
                m.write_host(&buf, h, None, "guest data")?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing points at the new clusters yet: give them back.
            for r in &runs {
                let _ = m.free_clusters(r.off, r.count, FreeReason::Never);
            }
            return Err(e);
        }
        for (slot, e) in updates {
            m.l2_set(slot, e)?;
        }
        for p in &plans {
            if p.reuse.is_some() {
                continue;
            }
            match p.kind {
                ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset } => {
                    m.free_clusters(offset, 1, FreeReason::Never)?
                }
                ClusterKind::Compressed(d) => {
                    for h in d.host_clusters(&geo) {
                        m.free_clusters(h, 1, FreeReason::Never)?;
                    }
                }
                ClusterKind::Unallocated | ClusterKind::ZeroPlain => {}
            }
        }
        Ok(pos)
    }

    /// Host writes and the new L2 entry for one planned cluster written to `host`.
    /// `zero_host`: the host cluster is known to read zeros (fresh, past the old EOF).
    fn cluster_write(
        &self,
        m: &mut Meta,
        p: &Plan,
        host: u64,
        zero_host: bool,
        data: &[u8],
    ) -> Result<(HostWrites, L2Entry)> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let full = p.a == 0 && p.b == cs;
        if p.reuse.is_some() {
            // Rewriting a cluster in place while its entry changes (e.g. zero-allocated to
            // data): the old bytes (stale, pre-zeroing) must not become visible through a
            // new entry that reaches the disk before the data does.
            m.l2_needs_sync = true;
        }
        let old_is_zero = match p.kind {
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc { .. } => true,
            ClusterKind::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if !geo.extended_l2() {
            let entry = L2Entry::new(host | OFLAG_COPIED, 0);
            if full || (old_is_zero && zero_host) {
                return Ok((vec![(host + p.a, data.to_vec())], entry));
            }
            let mut content = vec![0u8; cs as usize];
            if !old_is_zero {
                self.read_locked(m, &mut content, p.cl)?;
            }
            content[p.a as usize..p.b as usize].copy_from_slice(data);
            // The untouched part must be durable before the entry that exposes it.
            m.l2_needs_sync = true;
            return Ok((vec![(host, content)], entry));
        }
        // Extended L2: allocate at subcluster granularity.
        let sc = geo.subcluster_size();
        let (first, last) = ((p.a / sc) as u32, p.b.div_ceil(sc) as u32);
        let mut content = vec![0u8; cs as usize];
        let touched_start = first as u64 * sc;
        let touched_end = last as u64 * sc;
        let fresh = p.reuse.is_none();
        let old_bitmap = if fresh { 0 } else { p.entry.bitmap };
        let mut bm = old_bitmap;
        // Untouched subclusters of a replaced cluster keep their meaning.
        let (copy_start, copy_end) = if fresh {
            (0, cs)
        } else {
            (touched_start, touched_end)
        };
        if !(old_is_zero && zero_host && fresh) || p.a != touched_start || p.b != touched_end {
            self.read_locked(
                m,
                &mut content[copy_start as usize..copy_end as usize],
                p.cl + copy_start,
            )?;
        }
        content[p.a as usize..p.b as usize].copy_from_slice(data);
        if fresh {
            for i in 0..32u32 {
                if (first..last).contains(&i) {
                    continue;
                }
                match p.entry.subcluster_kind(p.kind, &geo, i) {
                    SubclusterKind::Normal | SubclusterKind::Compressed => {
                        bm |= bitmap::alloc_range(i, 1)
                    }
                    SubclusterKind::ZeroAlloc | SubclusterKind::ZeroPlain => {
                        bm |= bitmap::zero_range(i, 1)
                    }
                    _ => {}
                }
            }
        }
        bm &= !bitmap::zero_range(first, last - first);
        bm |= bitmap::alloc_range(first, last - first);
        let entry = L2Entry::new(host | OFLAG_COPIED, bm);
        let mut out = Vec::new();
        if fresh {
            // Write every allocated subcluster (the whole span keeps it one request).
            let lo = (0..32u32).find(|&i| bm & (1 << i) != 0).unwrap_or(first) as u64 * sc;
            let hi = (0..32u32)
                .rev()
                .find(|&i| bm & (1 << i) != 0)
                .map_or(last, |i| i + 1) as u64
                * sc;
            out.push((host + lo, content[lo as usize..hi as usize].to_vec()));
            if bm & BITMAP_ALL_ALLOC != bitmap::alloc_range(first, last - first)
                || p.a != lo
                || p.b != hi
            {
                m.l2_needs_sync = true;
            }
        } else {
            out.push((
                host + touched_start,
                content[touched_start as usize..touched_end as usize].to_vec(),
            ));
            if p.a != touched_start || p.b != touched_end {
                m.l2_needs_sync = true;
            }
        }
        Ok((out, entry))
    }
}

/// Merge host-contiguous writes into single requests.
fn merge(writes: impl Iterator<Item = (u64, Vec<u8>)>) -> HostWrites {
    let mut out: HostWrites = Vec::new();
    for (h, buf) in writes {
        if let Some((lh, lbuf)) = out.last_mut() {
            if *lh + lbuf.len() as u64 == h {
                lbuf.extend_from_slice(&buf);
                continue;
            }
        }
        out.push((h, buf));
    }
    out
}
