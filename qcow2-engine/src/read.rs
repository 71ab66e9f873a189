//! Reading: resolve a guest range to extents under the metadata lock, then do the data I/O
//! outside it, optimistically (retried if a cluster was freed meanwhile; pinned against
//! reallocation after repeated races).

use qcow2_format::{ClusterKind, CompressedDescriptor, SubclusterKind};

use crate::compress::decompress_cluster;
use crate::error::{invalid_arg, Error, Result};
use crate::image::Image;
use crate::l2map::pieces;
use crate::meta::Meta;

/// Where a piece of guest data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    /// Host bytes at this offset.
    Host(u64),
    /// Zeros.
    Zero,
    /// The backing file (zeros without one).
    Backing,
    /// Part of a compressed cluster, starting at this offset inside the cluster.
    Compressed(CompressedDescriptor, u64),
}

/// A guest range of `len` bytes from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub len: u64,
    pub src: Src,
}

/// Extents kept inline before spilling to the heap: a 4 KiB read resolves to one or two.
const INLINE: usize = 2;

/// The extents of one request, without a heap allocation in the common case (an
/// allocation per cached read costed a fifth of its instructions).
pub(crate) enum Extents {
    Inline([Extent; INLINE], usize),
    Heap(Vec<Extent>),
}

impl Extents {
    fn new() -> Self {
        let empty = Extent {
            len: 0,
            src: Src::Zero,
        };
        Extents::Inline([empty; INLINE], 0)
    }

    fn last_mut(&mut self) -> Option<&mut Extent> {
        match self {
            Extents::Inline(a, n) => a[..*n].last_mut(),
            Extents::Heap(v) => v.last_mut(),
        }
    }

    /// Append, merging with the last extent where contiguous.
    fn push(&mut self, len: u64, src: Src) {
        if let Some(last) = self.last_mut() {
            let merged = match (last.src, src) {
                (Src::Host(a), Src::Host(b)) => a + last.len == b,
                (Src::Zero, Src::Zero) | (Src::Backing, Src::Backing) => true,
                _ => false,
            };
            if merged {
                last.len += len;
                return;
            }
        }
        let e = Extent { len, src };
        match self {
            Extents::Inline(a, n) if *n < INLINE => {
                a[*n] = e;
                *n += 1;
            }
            Extents::Inline(a, _) => {
                let mut v = a.to_vec();
                v.push(e);
                *self = Extents::Heap(v);
            }
            Extents::Heap(v) => v.push(e),
        }
    }
}

impl std::ops::Deref for Extents {
    type Target = [Extent];
    fn deref(&self) -> &[Extent] {
        match self {
            Extents::Inline(a, n) => &a[..*n],
            Extents::Heap(v) => v,
        }
    }
}

impl Image {
    /// Check a guest range against the virtual size.
    pub(crate) fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(invalid_arg!(
                "request {off:#x}+{len:#x} is beyond the end of the image ({size:#x})"
            )),
        }
    }

    /// The source of one piece of a cluster, by its (sub)cluster kind.
    fn src_of(&self, sk: SubclusterKind, kind: ClusterKind, in_cluster: u64) -> Src {
        match (sk, kind) {
            (SubclusterKind::Normal, ClusterKind::Normal { offset }) => {
                Src::Host(offset + in_cluster)
            }
            (SubclusterKind::Compressed, ClusterKind::Compressed(d)) => {
                Src::Compressed(d, in_cluster)
            }
            (SubclusterKind::ZeroAlloc | SubclusterKind::ZeroPlain, _) => Src::Zero,
            _ if self.backing.is_some() => Src::Backing,
            _ => Src::Zero,
        }
    }

    /// Resolve `[guest, guest+len)` to extents (merged where contiguous).
    pub(crate) fn resolve(&self, m: &mut Meta, guest: u64, len: u64) -> Result<Extents> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut out = Extents::new();
        if len > 0 && !geo.extended_l2() && geo.align_down(guest) == geo.align_down(guest + len - 1)
        {
            // One cluster without subclusters: one source (the common cached read).
            let (entry, kind, _) = m.l2_kind(guest)?;
            let sk = entry.subcluster_kind(kind, &geo, 0);
            out.push(len, self.src_of(sk, kind, guest - geo.align_down(guest)));
            return Ok(out);
        }
        let mut pos = guest;
        let end = guest + len;
        while pos < end {
            let cl = geo.align_down(pos);
            let cl_end = (cl + cs).min(end);
            let (entry, kind, _) = m.l2_kind(pos)?;
            for (start, end, sk) in pieces(geo, entry, kind, cl, pos, cl_end) {
                out.push(end - start, self.src_of(sk, kind, start - cl));
            }
            pos = cl_end;
        }
        Ok(out)
    }

    /// Carry out reads of resolved extents into `buf` (guest offset `guest`).
    pub(crate) fn read_extents(&self, exts: &[Extent], buf: &mut [u8], guest: u64) -> Result<()> {
        let mut at = 0usize;
        for e in exts {
            let part = &mut buf[at..at + e.len as usize];
            let g = guest + at as u64;
            match e.src {
                Src::Host(h) => self.storage.read_at(part, h).map_err(Error::io_lazy(|| {
                    format!("reading data at host offset {h:#x}")
                }))?,
                Src::Zero => part.fill(0),
                Src::Backing => match &self.backing {
                    Some(b) => b.read_at(part, g)?,
                    None => part.fill(0),
                },
                Src::Compressed(d, in_cl) => {
                    let cluster = self.decompress(&d)?;
                    part.copy_from_slice(&cluster[in_cl as usize..in_cl as usize + part.len()]);
                }
            }
            at += e.len as usize;
        }
        Ok(())
    }

    /// Read and decompress one compressed cluster.
    pub(crate) fn decompress(&self, d: &CompressedDescriptor) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size() as usize;
        let (start, end) = d.host_range();
        let mut input = vec![0u8; (end - start) as usize];
        self.storage
            .read_at(&mut input, start)
            .map_err(Error::io_lazy(|| {
                format!("reading compressed cluster at {start:#x}")
            }))?;
        let mut out = vec![0u8; cs];
        decompress_cluster(self.compression, &input, &mut out)?;
        Ok(out)
    }

    /// Read guest bytes at `off`. Data I/O runs without the metadata lock.
    ///
    /// Optimistic first: resolve under the lock, read without it, and accept the result if
    /// no cluster was freed meanwhile (a freed cluster could have been reused, so the bytes
    /// read might be someone else's). After a few such races, pin the clusters instead.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.check_range(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        for _ in 0..3 {
            let (exts, gen) = {
                let mut m = self.lock();
                let exts = self.resolve(&mut m, off, buf.len() as u64)?;
                (exts, self.free_gen.load(Ordering::Acquire))
            };
            let r = self.read_extents(&exts, buf, off);
            if self.free_gen.load(Ordering::Acquire) == gen {
                return r;
            }
        }
        self.read_pinned(buf, off)
    }

    /// Read with the host clusters pinned against reuse for the duration of the I/O.
    fn read_pinned(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let pinned;
        let exts;
        {
            let mut m = self.lock();
            exts = self.resolve(&mut m, off, buf.len() as u64)?;
            pinned = pin(&mut m, &exts);
        }
        let r = self.read_extents(&exts, buf, off);
        let mut m = self.lock();
        for c in pinned {
            m.inflight_remove(c);
        }
        r
    }

    /// Read with the metadata lock already held (copy-on-write sources).
    pub(crate) fn read_locked(&self, m: &mut Meta, buf: &mut [u8], off: u64) -> Result<()> {
        let exts = self.resolve(m, off, buf.len() as u64)?;
        self.read_extents(&exts, buf, off)
    }

    /// Vectored read: the buffers are filled in order from `off`.
    pub fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(off, total)?;
        let mut pos = off;
        for b in bufs.iter_mut() {
            self.read_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
}

/// Pin the host clusters the extents touch; returns them for unpinning.
pub(crate) fn pin(m: &mut Meta, exts: &[Extent]) -> Vec<u64> {
    let bits = m.geo.cluster_bits();
    let mut v = Vec::new();
    for e in exts {
        match e.src {
            Src::Host(h) => v.extend((h >> bits)..=((h + e.len - 1) >> bits)),
            Src::Compressed(d, _) => {
                let (s, end) = d.host_range();
                v.extend((s >> bits)..=((end - 1) >> bits));
            }
            _ => {}
        }
    }
    for &c in &v {
        m.inflight_add(c);
    }
    v
}
