//! Discard, zeroing and preallocation of `FileStorage`, with probing and fallback chains.
//!
//! Every primitive's availability is remembered in a sticky [`Probe`](crate::probe::Probe):
//! `ENOTSUP`/`EOPNOTSUPP`/`ENOTTY`/`ENOSYS` disable it for good, `EINVAL` falls back for the
//! one call only, any other error (EIO, ENOSPC, ...) is returned.
//!
//! Chains (first usable primitive wins):
//!
//! * discard, file: `PUNCH_HOLE|KEEP_SIZE`, else `Unsupported`.
//! * discard, device: `BLKDISCARD` on the logical-block-aligned interior, else `Unsupported`.
//!   A range with no whole logical block is a successful no-op (`Released`).
//! * zero `Unmap`, file: range at/after EOF: `ftruncate` (sparse extension);
//!   otherwise `PUNCH_HOLE|KEEP_SIZE` (plus `ftruncate` for a tail past EOF); else the keep
//!   chain.
//! * zero `KeepAllocated`, file: range at/after EOF: `fallocate(0)`, else zero buffers;
//!   otherwise `FALLOC_FL_WRITE_ZEROES` (only when the range ends inside the file) →
//!   `ZERO_RANGE` → `PUNCH_HOLE` + `fallocate(0)` → zero buffers. If the re-allocation after
//!   a punch fails, zero buffers are written so the range never stays a hole.
//! * zero, device: unaligned head/tail written as zero buffers; interior: `Unmap` tries
//!   `fallocate(PUNCH_HOLE|KEEP_SIZE)` (the kernel's unmapping zeroout, only offered when
//!   sysfs reports a zeroing offload), then `BLKZEROOUT` (never deallocates), then buffers.
//!
//! `FALLOC_FL_WRITE_ZEROES` is tried first for `KeepAllocated` because it leaves *written*
//! extents: the engine anchors clusters that it will overwrite later, and overwriting an
//! unwritten extent (what `ZERO_RANGE` leaves) costs an extent conversion and a journal
//! transaction on every first write. Where it is unsupported (ext4 on 6.18 answers
//! `EOPNOTSUPP`) the cost is one failed syscall per storage, since the result is sticky.

use std::io;

use crate::aligned_buf::AlignedBuf;
use crate::error::{end_of, errno};
use crate::file::FileStorage;
use crate::file_io::BOUNCE_CHUNK;
use crate::probe::{Failure, Probe};
use crate::storage::{DiscardOutcome, ZeroMethod, ZeroMode};
use crate::sys::{self, FALLOC_FL_WRITE_ZEROES};

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// What one attempt of a primitive concluded.
enum Attempt {
    /// It worked.
    Done,
    /// Unsupported or refused for this call: try the next primitive.
    Next,
}

/// Run `op` if `probe` allows it, record the outcome, and turn fatal errors into `Err`.
fn attempt(probe: &Probe, op: impl FnOnce() -> io::Result<()>) -> io::Result<Attempt> {
    if !probe.usable() {
        return Ok(Attempt::Next);
    }
    let r = op();
    match probe.record(&r) {
        None => Ok(Attempt::Done),
        Some(Failure::Unsupported) | Some(Failure::ThisCall) => Ok(Attempt::Next),
        Some(Failure::Fatal) => r.map(|()| Attempt::Done),
    }
}

impl FileStorage {
    /// Write explicit zeros over `[offset, offset + len)` in bounded chunks.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<ZeroMethod> {
        let chunk = len.min(BOUNCE_CHUNK.max(self.align));
        let zeros = AlignedBuf::new(chunk as usize, self.align as usize)?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(chunk);
            self.do_write(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(ZeroMethod::WroteZeroBuffers)
    }

    /// Discard entry point (`Storage::discard`).
    pub(crate) fn do_discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        self.check_writable()?;
        let end = end_of(offset, len)?;
        if len == 0 {
            return Ok(DiscardOutcome::Released);
        }
        let done = if self.block_device {
            if !self.queue.can_discard() {
                return Ok(DiscardOutcome::Unsupported);
            }
            let lbs = u64::from(self.logical_block_size.max(1));
            let (s, e) = (offset.div_ceil(lbs) * lbs, end / lbs * lbs);
            if s >= e {
                return Ok(DiscardOutcome::Released);
            }
            attempt(&self.probes.blk_discard, || {
                sys::blk_discard(&self.file, s, e - s)
            })?
        } else {
            attempt(&self.probes.punch, || {
                self.fallocate_shared(PUNCH, offset, len)
            })?
        };
        Ok(match done {
            Attempt::Done => DiscardOutcome::Released,
            Attempt::Next => DiscardOutcome::Unsupported,
        })
    }

    /// Zeroing entry point (`Storage::write_zeroes`).
    pub(crate) fn do_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> io::Result<ZeroMethod> {
        self.check_writable()?;
        let end = end_of(offset, len)?;
        if len == 0 {
            return Ok(ZeroMethod::WroteZeroBuffers);
        }
        if self.block_device {
            return self.zero_device(offset, end, mode);
        }
        let eof = self.len_shared()?;
        if mode == ZeroMode::Unmap {
            if offset >= eof {
                self.extend_to(end)?;
                return Ok(ZeroMethod::ExtendedPastEof);
            }
            let inside = end.min(eof) - offset;
            if let Attempt::Done = attempt(&self.probes.punch, || {
                self.fallocate_shared(PUNCH, offset, inside)
            })? {
                if end > eof {
                    self.extend_to(end)?;
                }
                return Ok(ZeroMethod::PunchHole);
            }
        }
        self.zero_file_keep(offset, end, eof)
    }

    /// Grow a regular file to `len` unless something else already made it longer.
    fn extend_to(&self, len: u64) -> io::Result<()> {
        let _guard = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        if self.raw_len()? < len {
            self.file.set_len(len)?;
        }
        Ok(())
    }

    /// `fallocate` holding the direct-mode lock shared, so a size-changing call cannot
    /// interleave with a read-modify-write that restores the file length.
    fn fallocate_shared(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let _guard = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        sys::fallocate(&self.file, mode, offset, len)
    }

    /// Length under the shared direct-mode lock.
    fn len_shared(&self) -> io::Result<u64> {
        let _guard = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        self.raw_len()
    }

    /// The `KeepAllocated` chain for a regular file.
    fn zero_file_keep(&self, offset: u64, end: u64, eof: u64) -> io::Result<ZeroMethod> {
        let len = end - offset;
        let p = &self.probes;
        if offset >= eof {
            if let Attempt::Done = attempt(&p.fallocate, || self.fallocate_shared(0, offset, len))?
            {
                return Ok(ZeroMethod::ExtendedPastEof);
            }
            return self.write_zero_buffers(offset, len);
        }
        if end <= eof {
            if let Attempt::Done = attempt(&p.write_zeroes_flag, || {
                self.fallocate_shared(FALLOC_FL_WRITE_ZEROES, offset, len)
            })? {
                return Ok(ZeroMethod::WriteZeroesFlag);
            }
        }
        if let Attempt::Done = attempt(&p.zero_range, || {
            self.fallocate_shared(libc::FALLOC_FL_ZERO_RANGE, offset, len)
        })? {
            return Ok(ZeroMethod::ZeroRange);
        }
        if p.punch.usable() && p.fallocate.usable() {
            let inside = end.min(eof) - offset;
            if let Attempt::Done =
                attempt(&p.punch, || self.fallocate_shared(PUNCH, offset, inside))?
            {
                // The range now reads zero but is a hole: it must end allocated.
                return match attempt(&p.fallocate, || self.fallocate_shared(0, offset, len)) {
                    Ok(Attempt::Done) => Ok(ZeroMethod::PunchThenAllocate),
                    Ok(Attempt::Next) | Err(_) => self.write_zero_buffers(offset, len),
                };
            }
        }
        self.write_zero_buffers(offset, len)
    }

    /// Zeroing on a block device.
    fn zero_device(&self, offset: u64, end: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        if end > self.raw_len()? {
            return Err(errno(libc::ENOSPC));
        }
        let lbs = u64::from(self.logical_block_size.max(1));
        let s = (offset.div_ceil(lbs) * lbs).min(end);
        let e = (end / lbs * lbs).max(s);
        if s > offset {
            self.write_zero_buffers(offset, s - offset)?;
        }
        if end > e {
            self.write_zero_buffers(e, end - e)?;
        }
        if s == e {
            return Ok(ZeroMethod::WroteZeroBuffers);
        }
        let p = &self.probes;
        if mode == ZeroMode::Unmap && self.queue.write_zeroes_max_bytes != Some(0) {
            if let Attempt::Done =
                attempt(&p.blk_unmap_zero, || self.fallocate_shared(PUNCH, s, e - s))?
            {
                return Ok(ZeroMethod::PunchHole);
            }
        }
        if let Attempt::Done = attempt(&p.blk_zeroout, || sys::blk_zeroout(&self.file, s, e - s))? {
            return Ok(ZeroMethod::BlkZeroOut);
        }
        self.write_zero_buffers(s, e - s)
    }

    /// Preallocation entry point (`Storage::allocate`).
    pub(crate) fn do_allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let end = end_of(offset, len)?;
        if self.block_device {
            return if end > self.raw_len()? {
                Err(errno(libc::ENOSPC))
            } else {
                Ok(())
            };
        }
        if len == 0 {
            return Ok(());
        }
        if let Attempt::Done = attempt(&self.probes.fallocate, || {
            self.fallocate_shared(0, offset, len)
        })? {
            return Ok(());
        }
        // No fallocate: zero-fill only the part past the end, never overwrite data.
        let eof = self.len_shared()?;
        if end > eof {
            let from = offset.max(eof);
            self.write_zero_buffers(from, end - from)?;
        }
        Ok(())
    }
}
