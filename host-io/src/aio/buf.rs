//! `IoBuf`: memory an asynchronous operation reads into or writes from, either owned (an
//! [`AlignedBuf`]) or the caller's (a C caller's buffer or iovec array, valid by contract
//! until the operation completes). Its bytes are reached only through `&self` / `&mut
//! self`, so an `IoBuf` moved into a read operation is written by nobody else, and one
//! shared (`Arc<IoBuf>`) between write operations is only read.

use std::io;

use crate::aligned_buf::AlignedBuf;

/// One contiguous part of an [`IoBuf`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

#[derive(Debug)]
enum Mem {
    Owned(AlignedBuf),
    Caller(Vec<Seg>),
}

/// Memory for an asynchronous operation: owned, or lent by the caller (see
/// [`IoBuf::from_raw_parts`]). Offsets into it are byte positions in the concatenation of
/// its segments.
#[derive(Debug)]
pub struct IoBuf {
    mem: Mem,
    len: usize,
}

// SAFETY: an owned buffer is a plain heap allocation. Caller memory is, by the contract of
// `from_raw_parts` / `from_iovecs`, valid and reserved for this `IoBuf` until it is dropped,
// from whichever thread: nothing ties it to the thread that made it.
unsafe impl Send for IoBuf {}
// SAFETY: `&IoBuf` only reads the bytes (writes need `&mut IoBuf`), and by the same contract
// nobody else writes caller memory meanwhile.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed owned buffer of `len` bytes whose start is aligned to `align` (a power of
    /// two; 1 for none).
    pub fn new(len: usize, align: usize) -> io::Result<IoBuf> {
        Ok(IoBuf {
            mem: Mem::Owned(AlignedBuf::new(len, align.max(1))?),
            len,
        })
    }

    /// An owned, 4096-aligned copy of `data`.
    pub fn copy_of(data: &[u8]) -> io::Result<IoBuf> {
        let mut b = IoBuf::new(data.len(), 4096)?;
        b.write_from(0, data);
        Ok(b)
    }

    /// The caller's memory `[ptr, ptr + len)`.
    ///
    /// # Safety
    /// Unless `len` is 0, `ptr` must be valid for reads and writes of `len` bytes until the
    /// returned `IoBuf` is dropped, and nothing else may access that memory meanwhile
    /// (except reads, when the buffer is only written from).
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> IoBuf {
        let segs = if len == 0 {
            Vec::new()
        } else {
            vec![Seg { ptr, len }]
        };
        IoBuf {
            mem: Mem::Caller(segs),
            len,
        }
    }

    /// The caller's memory in several parts, in order (an iovec array).
    ///
    /// # Safety
    /// As [`from_raw_parts`](Self::from_raw_parts) for every part, and the parts must not
    /// overlap each other.
    pub unsafe fn from_iovecs(parts: &[(*mut u8, usize)]) -> IoBuf {
        let segs: Vec<Seg> = parts
            .iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(ptr, len)| Seg { ptr, len })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        IoBuf {
            mem: Mem::Caller(segs),
            len,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether every part starts at an address aligned to `align` and has a length that
    /// is a multiple of it (what `O_DIRECT` asks of memory).
    pub fn is_aligned(&self, align: usize) -> bool {
        let align = align.max(1);
        self.segs()
            .iter()
            .all(|s| (s.ptr as usize) % align == 0 && s.len % align == 0)
    }

    /// The parts, as raw segments (owned memory is one part).
    pub(crate) fn segs(&self) -> Vec<Seg> {
        match &self.mem {
            Mem::Owned(b) => {
                if b.is_empty() {
                    Vec::new()
                } else {
                    vec![Seg {
                        ptr: b.as_ptr().cast_mut(),
                        len: b.len(),
                    }]
                }
            }
            Mem::Caller(v) => v.clone(),
        }
    }

    /// The parts covering `[at, at + len)`, as raw segments.
    pub(crate) fn range_segs(&self, at: usize, len: usize) -> Vec<Seg> {
        clip(self.segs(), |s| s.len, at, len)
            .map(|(s, r)| Seg {
                // In bounds of the segment: `r.start < s.len`.
                ptr: s.ptr.wrapping_add(r.start),
                len: r.len(),
            })
            .collect()
    }

    /// The bytes, part by part.
    pub fn slices(&self) -> Vec<&[u8]> {
        match &self.mem {
            Mem::Owned(b) => vec![&b[..]],
            Mem::Caller(v) => v
                .iter()
                .map(|s| {
                    // SAFETY: by the constructor's contract the part is valid for reads for
                    // the life of `self`, and nobody writes it while `&self` is held.
                    unsafe { std::slice::from_raw_parts(s.ptr.cast_const(), s.len) }
                })
                .collect(),
        }
    }

    /// The bytes, part by part, writable.
    pub fn slices_mut(&mut self) -> Vec<&mut [u8]> {
        match &mut self.mem {
            Mem::Owned(b) => vec![&mut b[..]],
            Mem::Caller(v) => v
                .iter()
                .map(|s| {
                    // SAFETY: by the constructor's contract the part is valid for writes and
                    // reserved for this `IoBuf`; parts do not overlap, and `&mut self` makes
                    // these the only references.
                    unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) }
                })
                .collect(),
        }
    }

    /// `[at, at + len)` as slices, part by part.
    pub fn range(&self, at: usize, len: usize) -> Vec<&[u8]> {
        clip(self.slices(), |s| s.len(), at, len)
            .map(|(s, r)| &s[r])
            .collect()
    }

    /// `[at, at + len)` as writable slices, part by part.
    pub fn range_mut(&mut self, at: usize, len: usize) -> Vec<&mut [u8]> {
        clip(self.slices_mut(), |s| s.len(), at, len)
            .map(|(s, r)| &mut s[r])
            .collect()
    }

    /// Zero `[at, at + len)` through raw pointers, while other disjoint parts of the
    /// buffer may be written by the kernel (no reference to the whole buffer is made).
    ///
    /// # Safety
    /// `[at, at + len)` lies inside the buffer and nobody else accesses it meanwhile.
    pub(crate) unsafe fn zero_raw(&self, at: usize, len: usize) {
        for s in self.range_segs(at, len) {
            // SAFETY: the segment lies inside the buffer's memory (valid for writes by the
            // constructors' contracts) and, by this function's contract, is ours alone.
            unsafe { std::ptr::write_bytes(s.ptr, 0, s.len) };
        }
    }

    /// Copy `[at, at + dst.len())` out into `dst`.
    pub fn read_into(&self, at: usize, dst: &mut [u8]) {
        let mut done = 0usize;
        for s in self.range(at, dst.len()) {
            dst[done..done + s.len()].copy_from_slice(s);
            done += s.len();
        }
        assert_eq!(done, dst.len(), "IoBuf::read_into past the end");
    }

    /// Copy `src` into `[at, at + src.len())`.
    pub fn write_from(&mut self, at: usize, src: &[u8]) {
        let mut done = 0usize;
        for s in self.range_mut(at, src.len()) {
            let n = s.len();
            s.copy_from_slice(&src[done..done + n]);
            done += n;
        }
        assert_eq!(done, src.len(), "IoBuf::write_from past the end");
    }

    /// Zero `[at, at + len)`.
    pub fn zero(&mut self, at: usize, len: usize) {
        for s in self.range_mut(at, len) {
            s.fill(0);
        }
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.slices().iter().all(|s| s.iter().all(|&b| b == 0))
    }

    /// The bytes as one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.read_into(0, &mut v);
        v
    }
}

/// The one walk over a buffer's parts: each part (in order, `len_of` giving its length)
/// overlapping `[at, at + len)`, with the overlapping range within it (lazily: a read's
/// hot path allocates nothing for it).
fn clip<T>(
    parts: impl IntoIterator<Item = T>,
    len_of: impl Fn(&T) -> usize,
    at: usize,
    len: usize,
) -> impl Iterator<Item = (T, std::ops::Range<usize>)> {
    let end = at + len;
    parts
        .into_iter()
        .scan(0usize, move |pos, part| {
            let a = *pos;
            *pos += len_of(&part);
            Some((part, a, *pos))
        })
        .take_while(move |&(_, a, _)| a < end)
        .filter(move |&(_, _, b)| b > at)
        .map(move |(part, a, b)| (part, at.max(a) - a..end.min(b) - a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_parts_read_write_and_ranges() {
        let mut a = [0u8; 5];
        let mut b = [0u8; 7];
        // SAFETY: both arrays outlive the buffer and are not touched while it lives.
        let mut buf = unsafe { IoBuf::from_iovecs(&[(a.as_mut_ptr(), 5), (b.as_mut_ptr(), 7)]) };
        assert_eq!(buf.len(), 12);
        buf.write_from(3, &[1, 2, 3, 4]);
        let mut out = [9u8; 6];
        buf.read_into(2, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 0]);
        let r = buf.range_segs(4, 3);
        assert_eq!((r.len(), r[0].len, r[1].len), (2, 1, 2));
        buf.zero(4, 2);
        assert_eq!(buf.to_vec(), [0, 0, 0, 1, 0, 0, 4, 0, 0, 0, 0, 0]);
        drop(buf);
        assert_eq!(a, [0, 0, 0, 1, 0]);
        assert_eq!(b[..2], [0, 4]);
    }

    #[test]
    fn every_range_of_uneven_parts_matches_a_flat_model() {
        // Parts of 3, 0, 5, 1 and 7 bytes, the empty one included.
        let mut mem = [[0u8; 7]; 5];
        let lens = [3usize, 0, 5, 1, 7];
        let parts: Vec<(*mut u8, usize)> = mem
            .iter_mut()
            .zip(lens)
            .map(|(m, n)| (m.as_mut_ptr(), n))
            .collect();
        // SAFETY: `mem` outlives the buffer and is only touched through it.
        let mut buf = unsafe { IoBuf::from_iovecs(&parts) };
        let total: usize = lens.iter().sum();
        let mut model: Vec<u8> = (1..=total as u8).collect();
        buf.write_from(0, &model);
        for at in 0..=total {
            for len in 0..=total - at {
                let got: Vec<u8> = buf.range(at, len).concat();
                assert_eq!(got, model[at..at + len], "range({at}, {len})");
                let segs: usize = buf.range_segs(at, len).iter().map(|s| s.len).sum();
                assert_eq!(segs, len, "range_segs({at}, {len})");
                let mut out = vec![0u8; len];
                buf.read_into(at, &mut out);
                assert_eq!(out, model[at..at + len]);
                // Write a marker, compare, restore.
                let mark: Vec<u8> = (0..len).map(|i| 200 + i as u8).collect();
                buf.write_from(at, &mark);
                let mut want = model.clone();
                want[at..at + len].copy_from_slice(&mark);
                assert_eq!(buf.to_vec(), want, "write_from({at}, {len})");
                buf.zero(at, len);
                want[at..at + len].fill(0);
                assert_eq!(buf.to_vec(), want, "zero({at}, {len})");
                buf.write_from(0, &model);
            }
        }
        model.fill(0);
        buf.zero(0, total);
        assert!(buf.is_zero() && buf.to_vec() == model);
    }

    #[test]
    fn owned_is_aligned_and_zeroed() {
        let b = IoBuf::new(8192, 4096).unwrap();
        assert!(b.is_aligned(4096) && b.is_zero());
        let c = IoBuf::copy_of(b"hello").unwrap();
        assert!(!c.is_aligned(4096));
        assert_eq!(c.to_vec(), b"hello");
    }
}
