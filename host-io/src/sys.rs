//! Thin safe wrappers over the Linux system calls the file backend needs.
//!
//! This is the only module of the crate with `unsafe` code. Every wrapper takes a `&File`
//! (so the descriptor is open for the duration of the call), converts offsets with range
//! checks, retries `EINTR`, and returns the raw OS error unchanged so errno reaches the C
//! API. Open-file-description byte-range locks (`F_OFD_SETLK`/`F_OFD_GETLK`, used for
//! QEMU's image locking protocol in `lock.rs`), the descriptor's status flags and the C
//! library's `strerror` text live here too.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `FALLOC_FL_WRITE_ZEROES` (Linux 6.17+): zero the range and allocate it as written
/// extents. Not combinable with `FALLOC_FL_KEEP_SIZE`. Not yet in the `libc` crate.
pub(crate) const FALLOC_FL_WRITE_ZEROES: i32 = 0x80;

/// `BLKSSZGET`: logical sector size of a block device (`int`).
const BLKSSZGET: libc::Ioctl = libc::_IO(0x12, 104);
/// `BLKGETSIZE64`: size of a block device in bytes (`u64`; the kernel encodes `size_t`).
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<libc::size_t>(0x12, 114);
/// `BLKDISCARD`: discard a byte range (`u64[2]`: start, length).
const BLKDISCARD: libc::Ioctl = libc::_IO(0x12, 119);
/// `BLKZEROOUT`: zero a byte range without deallocating it (`u64[2]`: start, length).
const BLKZEROOUT: libc::Ioctl = libc::_IO(0x12, 127);

/// Convert a byte offset or length to `off64_t`, refusing values the kernel cannot take.
fn to_off(v: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// Run `f` until it does not fail with `EINTR`; map `-1` to the current errno.
fn retry<F: FnMut() -> i64>(mut f: F) -> io::Result<i64> {
    loop {
        let r = f();
        if r != -1 {
            return Ok(r);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// `fallocate(fd, mode, offset, len)`.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (off, l) = (to_off(offset)?, to_off(len)?);
    let fd = file.as_raw_fd();
    retry(|| {
        // SAFETY: `fd` is a valid open descriptor borrowed from `file` for the whole call;
        // fallocate takes only integers and touches no user memory.
        i64::from(unsafe { libc::fallocate64(fd, mode, off, l) })
    })
    .map(|_| ())
}

/// Issue a block-device range ioctl (`BLKDISCARD` / `BLKZEROOUT`) taking `u64[2]`.
fn range_ioctl(file: &File, request: libc::Ioctl, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    let fd = file.as_raw_fd();
    retry(|| {
        // SAFETY: `fd` is valid for the call; the kernel reads exactly two u64 values from
        // the pointer, which points at `range`, a live, properly aligned `[u64; 2]`.
        i64::from(unsafe { libc::ioctl(fd, request, range.as_ptr()) })
    })
    .map(|_| ())
}

/// `ioctl(BLKDISCARD, [offset, len])`.
pub(crate) fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(file, BLKDISCARD, offset, len)
}

/// `ioctl(BLKZEROOUT, [offset, len])`.
pub(crate) fn blk_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(file, BLKZEROOUT, offset, len)
}

/// `ioctl(BLKGETSIZE64)`: device size in bytes.
pub(crate) fn blk_getsize64(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    let fd = file.as_raw_fd();
    retry(|| {
        // SAFETY: `fd` is valid for the call; the kernel writes one u64 (size_t on the
        // 64-bit targets this crate supports) through the pointer, which points at `size`,
        // a live, aligned, exclusively borrowed u64.
        i64::from(unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) })
    })?;
    Ok(size)
}

/// `ioctl(BLKSSZGET)`: logical block size in bytes.
pub(crate) fn blk_sszget(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    let fd = file.as_raw_fd();
    retry(|| {
        // SAFETY: `fd` is valid for the call; the kernel writes one int through the
        // pointer, which points at `size`, a live, aligned, exclusively borrowed c_int.
        i64::from(unsafe { libc::ioctl(fd, BLKSSZGET, &mut size as *mut libc::c_int) })
    })?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `lseek(fd, offset, SEEK_DATA or SEEK_HOLE)`. `Ok(None)` when `ENXIO` says there is no
/// further data (or `offset` is at/after end of file).
pub(crate) fn seek_data_or_hole(file: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let off = to_off(offset)?;
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is valid for the call; lseek takes only integers. The shared file
    // position it moves is never used by this crate (all I/O is positioned).
    let r = unsafe { libc::lseek64(fd, off, whence) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some(r as u64))
}

/// `preadv` at `offset` into `bufs` (at most `IOV_MAX` of them). Returns bytes read.
pub(crate) fn preadv(
    file: &File,
    bufs: &mut [io::IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    let off = to_off(offset)?;
    let cnt = libc::c_int::try_from(bufs.len().min(IOV_MAX))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = file.as_raw_fd();
    let ptr = bufs.as_mut_ptr() as *const libc::iovec;
    let n = retry(|| {
        // SAFETY: `IoSliceMut` is guaranteed ABI-compatible with `struct iovec` on Unix; the
        // slices are live, exclusively borrowed and at least `cnt` long; the kernel writes
        // only within each iovec's length.
        let r = unsafe { libc::preadv64(fd, ptr, cnt, off) };
        r as i64
    })?;
    Ok(n as usize)
}

/// `pwritev` at `offset` from `bufs` (at most `IOV_MAX` of them). Returns bytes written.
pub(crate) fn pwritev(file: &File, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let off = to_off(offset)?;
    let cnt = libc::c_int::try_from(bufs.len().min(IOV_MAX))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = file.as_raw_fd();
    let ptr = bufs.as_ptr() as *const libc::iovec;
    let n = retry(|| {
        // SAFETY: `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix; the
        // slices are live and at least `cnt` long; the kernel only reads from them.
        let r = unsafe { libc::pwritev64(fd, ptr, cnt, off) };
        r as i64
    })?;
    Ok(n as usize)
}

/// Maximum number of iovecs per `preadv`/`pwritev` call on Linux.
pub(crate) const IOV_MAX: usize = 1024;

/// Major and minor numbers of a device id (`st_rdev`), as glibc's `major()`/`minor()`.
pub(crate) fn dev_major_minor(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// A byte-range lock type (`struct flock.l_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockType {
    /// `F_RDLCK`: shared; any number of open file descriptions may hold it.
    Read,
    /// `F_WRLCK`: exclusive.
    Write,
    /// `F_UNLCK`.
    Unlock,
}

impl LockType {
    fn raw(self) -> libc::c_short {
        (match self {
            LockType::Read => libc::F_RDLCK,
            LockType::Write => libc::F_WRLCK,
            LockType::Unlock => libc::F_UNLCK,
        }) as libc::c_short
    }
}

/// A `struct flock` for `len` bytes at `start` (`l_pid` must be 0 for OFD locks).
fn flock_for(start: u64, len: u64, ty: LockType) -> io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty.raw();
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = to_off(start)?;
    fl.l_len = to_off(len)?;
    Ok(fl)
}

/// `fcntl(F_OFD_SETLK)`: take (or, with `Unlock`, release) a lock on `len` bytes at `start`
/// for the open file description behind `file`, without waiting. A conflicting lock gives
/// `EAGAIN` (or `EACCES`); a kernel without OFD locks (before Linux 3.15) gives `EINVAL`.
pub(crate) fn ofd_setlk(file: &File, start: u64, len: u64, ty: LockType) -> io::Result<()> {
    let fl = flock_for(start, len, ty)?;
    let fd = file.as_raw_fd();
    retry(|| {
        // SAFETY: `fd` is valid for the call; the kernel reads one `struct flock` through
        // the pointer, which points at `fl`, a live, properly aligned `libc::flock`.
        i64::from(unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl as *const libc::flock) })
    })
    .map(|_| ())
}

/// `fcntl(F_OFD_GETLK)`: would a lock of type `ty` on `len` bytes at `start` conflict with
/// a lock held through another open file description? Returns the type of a conflicting
/// lock, or `None`. Locks held through `file`'s own description never conflict.
pub(crate) fn ofd_getlk(
    file: &File,
    start: u64,
    len: u64,
    ty: LockType,
) -> io::Result<Option<LockType>> {
    let mut fl = flock_for(start, len, ty)?;
    let fd = file.as_raw_fd();
    retry(|| {
        // SAFETY: `fd` is valid for the call; the kernel reads and writes one `struct flock`
        // through the pointer, which points at `fl`, a live, aligned, exclusively borrowed
        // `libc::flock`.
        i64::from(unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl as *mut libc::flock) })
    })?;
    Ok(match i32::from(fl.l_type) {
        libc::F_UNLCK => None,
        libc::F_RDLCK => Some(LockType::Read),
        _ => Some(LockType::Write),
    })
}

/// `fcntl(F_GETFL)`: the access mode and status flags of the open file description.
pub(crate) fn status_flags(file: &File) -> io::Result<i32> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is valid for the call; F_GETFL takes no argument and touches no memory.
    let r = retry(|| i64::from(unsafe { libc::fcntl(fd, libc::F_GETFL) }))?;
    Ok(r as i32)
}

/// The C library's description of `errno` (`strerror_r`), e.g. "No such file or directory".
pub(crate) fn strerror(code: i32) -> String {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: `buf` is a live, writable array of the length passed; the XSI `strerror_r`
    // (what the `libc` crate binds on Linux) writes at most that many bytes, NUL included.
    let r = unsafe { libc::strerror_r(code, buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return format!("Unknown error {code}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated string (see above).
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    s.to_string_lossy().into_owned()
}
