//! Positioned and vectored reads/writes of `FileStorage`, buffered and `O_DIRECT`.
//!
//! Short transfers are looped and `EINTR` retried. Reads past the end fill zeros. In direct
//! mode, requests whose buffer address, offset or length is not aligned go through an
//! [`AlignedBuf`] bounce buffer in chunks of at most [`BOUNCE_CHUNK`]; unaligned writes
//! read-modify-write their partial edge blocks under the storage's exclusive lock and then
//! restore the exact file length, so any offset/length works in either mode.

use std::io;
use std::os::unix::fs::FileExt;

use crate::aligned_buf::{is_aligned, AlignedBuf};
use crate::error::{end_of, errno, len64};
use crate::file::FileStorage;
use crate::sys;

/// Largest bounce buffer used for one direct-mode chunk (and for zero-buffer writes).
pub(crate) const BOUNCE_CHUNK: u64 = 1 << 20;

impl FileStorage {
    /// `pread` until `buf` is full or end of file; the rest is zero-filled.
    fn pread_fill(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // A direct read only stops short of a block at end of file; the next
                    // (unaligned) read would fail with EINVAL instead of returning 0.
                    if self.direct && (done as u64) % self.align != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if done < buf.len() {
            buf[done..].fill(0);
        }
        Ok(())
    }

    /// `pwrite` until all of `buf` is written. Returns the bytes written before an aligned
    /// direct write stopped at an unaligned count (which the caller must finish).
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.write_at(&buf[done..], offset + done as u64) {
                Ok(0) => return Err(errno(libc::ENOSPC)),
                Ok(n) => {
                    done += n;
                    if self.direct && (done as u64) % self.align != 0 && done < buf.len() {
                        return Ok(done);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn aligned_request(&self, buf: &[u8], offset: u64) -> bool {
        offset % self.align == 0 && is_aligned(buf, self.align as usize)
    }

    /// Read entry point (`Storage::read_at`).
    pub(crate) fn do_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        end_of(offset, len64(buf))?;
        if !self.direct || self.aligned_request(buf, offset) {
            return self.pread_fill(buf, offset);
        }
        self.read_bounced(buf, offset)
    }

    /// Direct-mode read of an unaligned request through a bounce buffer.
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let a = self.align;
        let end = offset + len64(buf);
        let start = offset / a * a;
        let stop = end.div_ceil(a) * a;
        let chunk = BOUNCE_CHUNK.max(a);
        let mut bounce = AlignedBuf::new((stop - start).min(chunk) as usize, a as usize)?;
        let mut pos = start;
        while pos < stop {
            let n = (stop - pos).min(chunk);
            let b = &mut bounce[..n as usize];
            self.pread_fill(b, pos)?;
            let (s, e) = (pos.max(offset), (pos + n).min(end));
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&b[(s - pos) as usize..(e - pos) as usize]);
            pos += n;
        }
        Ok(())
    }

    /// Write entry point (`Storage::write_at`).
    pub(crate) fn do_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        end_of(offset, len64(buf))?;
        if !self.direct {
            self.pwrite_all(buf, offset)?;
            return Ok(());
        }
        if self.aligned_request(buf, offset) {
            let done = {
                let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
                self.pwrite_all(buf, offset)?
            };
            if done == buf.len() {
                return Ok(());
            }
            return self.write_rmw(&buf[done..], offset + done as u64);
        }
        self.write_rmw(buf, offset)
    }

    /// Direct-mode write of an unaligned request: read the partial edge blocks, merge, write
    /// whole blocks, then cut the file back to its exact new length.
    fn write_rmw(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _excl = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        let a = self.align;
        let end = offset + len64(buf);
        let start = offset / a * a;
        let stop = end.div_ceil(a) * a;
        let old_len = if self.block_device {
            None
        } else {
            Some(self.file.metadata()?.len())
        };
        let chunk = BOUNCE_CHUNK.max(a);
        let mut bounce = AlignedBuf::new((stop - start).min(chunk) as usize, a as usize)?;
        let mut pos = start;
        while pos < stop {
            let n = (stop - pos).min(chunk);
            let b = &mut bounce[..n as usize];
            if pos < offset {
                self.pread_fill(&mut b[..a as usize], pos)?;
            }
            if pos + n > end && (n > a || pos >= offset) {
                let last = (n - a) as usize;
                self.pread_fill(&mut b[last..], pos + n - a)?;
            }
            let (s, e) = (pos.max(offset), (pos + n).min(end));
            b[(s - pos) as usize..(e - pos) as usize]
                .copy_from_slice(&buf[(s - offset) as usize..(e - offset) as usize]);
            if self.pwrite_all(b, pos)? != b.len() {
                // Aligned whole-block writes never stop at an unaligned count in practice;
                // if one does, report it rather than loop on a half-written block.
                return Err(errno(libc::EIO));
            }
            pos += n;
        }
        if let Some(old_len) = old_len {
            let want = old_len.max(end);
            if old_len.max(stop) != want {
                self.file.set_len(want)?;
            }
        }
        Ok(())
    }

    /// Vectored read entry point: `preadv` in buffered mode, per-buffer in direct mode.
    pub(crate) fn do_read_vectored(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| len64(b)).sum();
        end_of(offset, total)?;
        let mut pos = offset;
        if self.direct {
            for b in bufs.iter_mut() {
                self.do_read(b, pos)?;
                pos += len64(b);
            }
            return Ok(());
        }
        for group in bufs.chunks_mut(sys::IOV_MAX) {
            let want: u64 = group.iter().map(|b| len64(b)).sum();
            let got = {
                let mut iov: Vec<io::IoSliceMut<'_>> =
                    group.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
                sys::preadv(&self.file, &mut iov, pos)? as u64
            };
            if got < want {
                // Short (end of file or a partial transfer): finish buffer by buffer.
                let mut skip = got;
                let mut p = pos;
                for b in group.iter_mut() {
                    let l = len64(b);
                    if skip >= l {
                        skip -= l;
                    } else {
                        self.pread_fill(&mut b[skip as usize..], p + skip)?;
                        skip = 0;
                    }
                    p += l;
                }
            }
            pos += want;
        }
        Ok(())
    }

    /// Vectored write entry point: `pwritev` in buffered mode, per-buffer in direct mode.
    pub(crate) fn do_write_vectored(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let total: u64 = bufs.iter().map(|b| len64(b)).sum();
        end_of(offset, total)?;
        let mut pos = offset;
        if self.direct {
            for b in bufs {
                self.do_write(b, pos)?;
                pos += len64(b);
            }
            return Ok(());
        }
        for group in bufs.chunks(sys::IOV_MAX) {
            let want: u64 = group.iter().map(|b| len64(b)).sum();
            let iov: Vec<io::IoSlice<'_>> = group.iter().map(|b| io::IoSlice::new(b)).collect();
            let got = sys::pwritev(&self.file, &iov, pos)? as u64;
            if got < want {
                let mut skip = got;
                let mut p = pos;
                for b in group {
                    let l = len64(b);
                    if skip >= l {
                        skip -= l;
                    } else {
                        self.pwrite_all(&b[skip as usize..], p + skip)?;
                        skip = 0;
                    }
                    p += l;
                }
            }
            pos += want;
        }
        Ok(())
    }
}
