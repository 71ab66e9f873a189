//! Reading: resolve a guest range to extents, then do the data I/O without the metadata
//! lock. A single-cluster read first tries the lock-free entry cache (no lock, no
//! allocation); otherwise it resolves under the lock. Either way the data is read
//! optimistically: accepted if no cluster was freed meanwhile, retried if one was, and
//! pinned against reuse after repeated races.

use std::sync::atomic::Ordering;

use qcow2_format::l2::{L2E_OFFSET_MASK, OFLAG_ZERO};
use qcow2_format::{ClusterKind, CompressedDescriptor, L2Entry, SubclusterKind};

use crate::error::{invalid_arg, Result};
use crate::image::Image;
use crate::meta::Meta;
use crate::request::pieces::pieces;

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

/// Entries after a looked-up one remembered for lock-free reads (sequential reads then
/// take the locked path once per this many clusters).
const READ_AHEAD_ENTRIES: usize = 64;

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

    /// Append the extents of `[pos, cl_end)` inside the cluster at `cl` mapped by `entry`.
    fn push_cluster(
        &self,
        out: &mut Extents,
        entry: L2Entry,
        kind: ClusterKind,
        cl: u64,
        pos: u64,
        cl_end: u64,
    ) {
        let geo = self.geo;
        if !geo.extended_l2() {
            let sk = entry.subcluster_kind(kind, &geo, 0);
            out.push(cl_end - pos, self.src_of(sk, kind, pos - cl));
            return;
        }
        for (start, end, sk) in pieces(geo, entry, kind, cl, pos, cl_end) {
            out.push(end - start, self.src_of(sk, kind, start - cl));
        }
    }

    /// Resolve `[guest, guest+len)` to extents (merged where contiguous), remembering the
    /// entries for lock-free reads.
    pub(crate) fn resolve(&self, m: &mut Meta, guest: u64, len: u64) -> Result<Extents> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut out = Extents::new();
        let mut pos = guest;
        let end = guest + len;
        while pos < end {
            let cl = geo.align_down(pos);
            let cl_end = (cl + cs).min(end);
            let (entry, kind, slot) = m.l2_kind(pos)?;
            if !matches!(kind, ClusterKind::Compressed(_)) {
                m.mapping.remember(pos, entry);
            }
            if let Some(slot) = slot {
                m.mapping.remember_ahead(slot, pos, READ_AHEAD_ENTRIES);
            }
            self.push_cluster(&mut out, entry, kind, cl, pos, cl_end);
            pos = cl_end;
        }
        Ok(out)
    }

    /// Extents of a read inside one cluster from the lock-free entry cache, if it knows
    /// the cluster.
    #[inline]
    pub(crate) fn resolve_fast(&self, guest: u64, len: u64) -> Option<Extents> {
        let geo = self.geo;
        let cl = geo.align_down(guest);
        if geo.align_down(guest + len - 1) != cl {
            return None;
        }
        let entry = self.fast.get(guest >> geo.cluster_bits())?;
        let kind = entry.kind(&geo).ok()?;
        let mut out = Extents::new();
        self.push_cluster(&mut out, entry, kind, cl, guest, guest + len);
        Some(out)
    }

    /// Carry out reads of resolved extents into `buf` (guest offset `guest`).
    pub(crate) fn read_extents(&self, exts: &[Extent], buf: &mut [u8], guest: u64) -> Result<()> {
        let mut at = 0usize;
        for e in exts {
            let part = &mut buf[at..at + e.len as usize];
            self.read_src(e.src, part, guest + at as u64)?;
            at += e.len as usize;
        }
        Ok(())
    }

    /// Read guest bytes at `off`. Data I/O runs without the metadata lock.
    ///
    /// Optimistic: resolve (lock-free when the entry is cached, else under the lock), read
    /// without the lock, and accept the result if no cluster was freed meanwhile (a freed
    /// cluster could have been reused, so the bytes read might be someone else's). After a
    /// few such races, pin the clusters instead.
    #[inline]
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        // The commonest read first, with nothing on its way it does not need; anything
        // unusual (zeros, backing file, an I/O error, a race) takes the general path,
        // which also reports errors.
        let gen = self.free_gen.load(Ordering::Acquire);
        if let Some(h) = self.fast_host(buf.len() as u64, off) {
            if self.storage.read_at(buf, h).is_ok() && self.free_gen.load(Ordering::Acquire) == gen
            {
                return Ok(());
            }
        }
        self.read_general(buf, off)
    }

    /// The host offset of `[off, off + len)` if it lies in one data cluster of an image
    /// without extended L2 entries whose entry is cached for lock-free reads. Entries are
    /// cached only after they decoded as valid under the lock, and never compressed ones,
    /// so the entry word alone says where the bytes are.
    #[inline]
    pub(crate) fn fast_host(&self, len: u64, off: u64) -> Option<u64> {
        let geo = self.geo;
        let bits = geo.cluster_bits();
        let end = off.checked_add(len)?;
        if len == 0
            || end > self.virtual_size()
            || geo.extended_l2()
            || (end - 1) >> bits != off >> bits
            || self.failed.load(Ordering::Relaxed)
        {
            return None;
        }
        let word = self.fast.get(off >> bits)?.word;
        let host = word & L2E_OFFSET_MASK;
        (word & OFLAG_ZERO == 0 && host != 0).then(|| host + (off & ((1 << bits) - 1)))
    }

    /// Every read the fast path does not finish.
    #[inline(never)]
    fn read_general(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let gen = self.free_gen.load(Ordering::Acquire);
        if !self.failed.load(Ordering::Relaxed) {
            if let Some(exts) = self.resolve_fast(off, buf.len() as u64) {
                let r = self.read_extents(&exts, buf, off);
                if self.free_gen.load(Ordering::Acquire) == gen {
                    return r;
                }
            }
        }
        for _ in 0..3 {
            let (exts, gen) = {
                let mut st = self.lock()?;
                let exts = self.resolve(&mut st.meta, off, buf.len() as u64)?;
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
            let mut st = self.lock()?;
            exts = self.resolve(&mut st.meta, off, buf.len() as u64)?;
            pinned = host_clusters(&st.meta, &exts);
            for &c in &pinned {
                st.meta.alloc.pin(c);
            }
        }
        let r = self.read_extents(&exts, buf, off);
        let mut st = self.lock()?;
        for c in pinned {
            st.meta.alloc.unpin(c);
        }
        r
    }

    /// Read with the metadata lock already held.
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

/// The host clusters extents touch (to pin them).
pub(crate) fn host_clusters(m: &Meta, exts: &[Extent]) -> Vec<u64> {
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
    v
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use host_io::MemStorage;

    use crate::{create_on, CreateOptions, Image, OpenOptions};

    /// A read of a cluster whose entry is cached completes while another thread holds the
    /// metadata lock; a read after a write sees the new data (the entry was invalidated).
    #[test]
    fn cached_reads_take_no_lock_and_see_new_entries() {
        let mem = Arc::new(MemStorage::new());
        create_on(
            mem.clone(),
            &CreateOptions {
                size: Some(1 << 20),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let img = Arc::new(Image::open_storage(mem, &OpenOptions::default(), None).unwrap());
        img.write_at(&[7u8; 4096], 0).unwrap();
        let mut b = [0u8; 512];
        img.read_at(&mut b, 0).unwrap(); // fills the entry cache
        let held = img.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = img.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 512];
            let r = reader.read_at(&mut b, 1024).map(|()| b[0]);
            tx.send(r.unwrap()).unwrap();
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a cached read waited for the metadata lock");
        assert_eq!(got, 7);
        drop(held);
        img.discard(0, 65536).unwrap();
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0u8; 512], "the discard invalidated the cached entry");
        img.write_at(&[9u8; 512], 0).unwrap();
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [9u8; 512]);
    }
}
