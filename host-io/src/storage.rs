//! The storage trait: what the qcow2 engine needs from the file or device under an image.

use std::io;

/// How `write_zeroes` may treat the host allocation of the zeroed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ZeroMode {
    /// The range must read zero afterwards and may be released (punched / discarded).
    Unmap,
    /// The range must read zero afterwards and must stay allocated ("anchor"). No fallback
    /// ever turns this into a release.
    KeepAllocated,
}

/// Which primitive actually zeroed a range; returned so callers and tests can see the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ZeroMethod {
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` (range released).
    PunchHole,
    /// `fallocate(FALLOC_FL_ZERO_RANGE)` (range kept allocated, as unwritten extents).
    ZeroRange,
    /// `fallocate(FALLOC_FL_WRITE_ZEROES)` (Linux 6.17+; range allocated as written extents).
    WriteZeroesFlag,
    /// `ioctl(BLKZEROOUT)` on a block device (kernel never deallocates).
    BlkZeroOut,
    /// `PUNCH_HOLE` followed by `fallocate(mode 0)` to allocate the range again.
    PunchThenAllocate,
    /// The range lay at or beyond end of file: extended with `fallocate(0)` / `set_len`.
    ExtendedPastEof,
    /// Explicit zero buffers were written.
    WroteZeroBuffers,
    /// In-memory backend bookkeeping (tests).
    Memory,
}

/// Result of a host discard, which is advisory: an unsupported discard is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardOutcome {
    /// The range was handed back to the filesystem or device.
    Released,
    /// The backend cannot discard (probed or known); nothing happened.
    Unsupported,
}

/// What a backend can do. Probed lazily: a primitive that fails with
/// ENOTSUP/EOPNOTSUPP/ENOTTY is remembered as unavailable, so this may change after the
/// first discard or zero request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `discard` may release space.
    pub discard: bool,
    /// `write_zeroes(KeepAllocated)` has a primitive cheaper than writing zero buffers.
    pub zero_keep_allocated: bool,
    /// `write_zeroes(Unmap)` has a releasing primitive.
    pub zero_unmap: bool,
    /// A discarded range is guaranteed to read back as zeros (regular files with punch
    /// holes: yes; block devices: never assumed).
    pub discard_reads_zero: bool,
    /// Discard granularity in bytes (block devices: sysfs `discard_granularity`; files: the
    /// filesystem block size). 0 if unknown.
    pub discard_granularity: u32,
    /// Logical block size in bytes (512 for files unless opened O_DIRECT on a 4Kn device).
    pub logical_block_size: u32,
    /// Required alignment (bytes) of buffers, offsets and lengths for I/O (1 when buffered).
    pub io_alignment: u32,
    /// The backend is a block device (size fixed, `set_len` refused).
    pub is_block_device: bool,
    /// Opened read-only.
    pub read_only: bool,
}

/// Storage under an image: a regular file, a block device, or a test backend.
///
/// Offsets and lengths are bytes. All methods take `&self` and must be safe to call from
/// several threads at once; writes to disjoint ranges may run concurrently.
/// Reads past the end of the storage return zeros for the part past the end (as QEMU's
/// file-posix does), never an error.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fill `buf` from `offset`. The part of the range past the end reads as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write all of `buf` at `offset`, extending a regular file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Vectored read: fill the buffers in order, starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Vectored write: write the buffers in order, starting at `offset`.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Make every completed write durable (fdatasync on files, a cache flush on devices).
    fn flush(&self) -> io::Result<()>;

    /// Flushes issued through this backend so far (statistics: how many barriers a
    /// workload cost). Backends that do not count report 0.
    fn flush_count(&self) -> u64 {
        0
    }

    /// `discard` calls through this backend so far (statistics, as `flush_count`; an
    /// unsupported or failed discard counts too). Backends that do not count report 0.
    fn discard_count(&self) -> u64 {
        0
    }

    /// `write_zeroes` calls through this backend so far (statistics, as `discard_count`).
    fn zero_count(&self) -> u64 {
        0
    }

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Set the length (truncate or extend with a sparse tail). Block devices refuse with
    /// `ErrorKind::Unsupported` unless `len` equals the device size.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Allocate the range without changing its content where it already holds data
    /// (`fallocate(0)`); used for `preallocation=falloc`. Falls back to writing zeros over
    /// the part past the end where fallocate is unsupported.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Release the range (PUNCH_HOLE|KEEP_SIZE on files, BLKDISCARD on devices). Advisory:
    /// an unsupported discard returns `Ok(DiscardOutcome::Unsupported)`.
    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome>;

    /// Make the range read zero. `mode` says whether the allocation may be released.
    /// Returns the primitive that did it.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod>;

    /// What the backend can do, as far as probed so far.
    fn capabilities(&self) -> Capabilities;

    /// Whether `offset` lies in stored data (`true`) or in a hole (`false`), and how many
    /// bytes from `offset` (at most `len`) share that state. Used to report holes of raw
    /// files in block status and to count host extents. Backends that cannot tell report
    /// everything as data, which is always safe.
    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }

    /// The file or block device under this storage, if it is one and I/O may go to its
    /// descriptor directly (io_uring). Wrappers that change what operations do (fault
    /// injection, crash recording) must not expose it.
    fn as_file(&self) -> Option<&crate::FileStorage> {
        None
    }

    /// Bytes the backend actually allocates (a file's `st_blocks * 512`), if it can tell.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
}
