//! `AlignedBuf`: a zero-initialised byte buffer whose start is aligned for `O_DIRECT`.

use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};

/// A heap buffer of `len` bytes whose first byte is aligned to `align` (a power of two),
/// as `O_DIRECT` requires. Built on an over-allocated `Vec<u8>`, so it needs no `unsafe`.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align`. Fails with `EINVAL` if `align` is
    /// not a power of two and with `ENOMEM` if the allocation fails.
    pub fn new(len: usize, align: usize) -> io::Result<Self> {
        if !align.is_power_of_two() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let total = len
            .checked_add(align - 1)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let mut storage = Vec::new();
        storage
            .try_reserve_exact(total)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        storage.resize(total, 0);
        let addr = storage.as_ptr() as usize;
        let start = (align - addr % align) % align;
        Ok(Self {
            storage,
            start,
            len,
            align,
        })
    }

    /// The alignment of the first byte.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Number of usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Set every byte to zero.
    pub fn fill_zero(&mut self) {
        self.as_mut_slice().fill(0);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

/// Whether `buf` starts at an address aligned to `align` and its length is a multiple of it.
pub(crate) fn is_aligned(buf: &[u8], align: usize) -> bool {
    (buf.as_ptr() as usize) % align == 0 && buf.len() % align == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for align in [1usize, 512, 4096, 65536] {
            for len in [0usize, 1, 511, 4096, 70000] {
                let b = AlignedBuf::new(len, align).unwrap();
                assert_eq!(b.len(), len);
                assert_eq!(b.as_ptr() as usize % align, 0, "align {align} len {len}");
                assert!(b.iter().all(|&x| x == 0));
            }
        }
    }

    #[test]
    fn rejects_bad_alignment_and_huge_sizes() {
        assert_eq!(
            AlignedBuf::new(10, 3).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(
            AlignedBuf::new(usize::MAX, 4096)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOMEM)
        );
    }

    #[test]
    fn writes_stay_inside() {
        let mut b = AlignedBuf::new(8, 4096).unwrap();
        b.copy_from_slice(b"abcdefgh");
        assert_eq!(&*b, b"abcdefgh");
        b.fill_zero();
        assert_eq!(&*b, &[0u8; 8]);
    }
}
