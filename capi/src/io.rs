//! Guest I/O: reads and writes (plain and vectored), discard, write-zeroes.

use std::ffi::{c_int, c_void};

use libc::iovec;

use crate::args;
use crate::boundary::guard;
use crate::error::{CResult, Failure};
use crate::handle::{image, QcowprovImage};

/// `qcowprov_pwrite` / `qcowprov_pwritev` flag: the data and the metadata that reaches it
/// are stable on return (as after a `qcowprov_flush`).
pub const QCOWPROV_WRITE_FUA: u32 = 1;
/// `qcowprov_write_zeroes` flag: the policy may release the range instead of writing
/// zeros (a discard that guarantees zeros).
pub const QCOWPROV_ZERO_MAY_UNMAP: u32 = 1;
/// `qcowprov_write_zeroes` flag: fail with `-ENOTSUP` instead of writing zero bytes where
/// the range cannot be zeroed as metadata (QEMU's `BDRV_REQ_NO_FALLBACK`; NBD's fast
/// zero). Parts already done stay done: the range then holds zeros or its old data.
pub const QCOWPROV_ZERO_NO_FALLBACK: u32 = 2;

/// Reads `len` bytes of guest data at `offset` into `buf`.
///
/// Thread-safety: thread-safe; concurrent reads and writes on one handle are allowed.
///
/// Returns `len` on success (never a short read). On failure the content of `buf` is
/// unspecified. Errors: `-EINVAL` for NULL `img` or `buf` (even when `len` is 0) or a
/// range beyond the virtual size; `-EIO` for a corrupt image or host failure.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `buf` NULL or valid for
/// writes of `len` bytes, not accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_pread(
    img: *mut QcowprovImage,
    buf: *mut c_void,
    len: usize,
    offset: u64,
) -> i64 {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        args::non_null(buf, "buf")?;
        let n = args::byte_count(len, "len")?;
        // SAFETY: `buf` is non-NULL and the caller guarantees `len` writable bytes that
        // nothing else accesses during the call; `len` <= INT64_MAX = isize::MAX.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        img.read_at(buf, offset)?;
        Ok(n)
    })
}

/// Writes `len` bytes from `buf` at guest `offset`. `flags`: 0 or `QCOWPROV_WRITE_FUA`.
///
/// Thread-safety: thread-safe; concurrent reads and writes on one handle are allowed.
///
/// Returns `len` on success (never a short write). Errors: `-EINVAL` for NULL `img` or
/// `buf` (even when `len` is 0), unknown flags or a range beyond the virtual size;
/// `-EROFS` on a read-only image; `-ENOSPC`, `-EIO`, ... from the host; `-EFBIG` when the
/// image file would exceed the format's limits.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `buf` NULL or valid for
/// reads of `len` bytes, not modified during the call.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_pwrite(
    img: *mut QcowprovImage,
    buf: *const c_void,
    len: usize,
    offset: u64,
    flags: u32,
) -> i64 {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        args::non_null(buf, "buf")?;
        args::known_flags(flags, QCOWPROV_WRITE_FUA, "flags")?;
        let n = args::byte_count(len, "len")?;
        // SAFETY: `buf` is non-NULL and the caller guarantees `len` readable bytes not
        // modified during the call; `len` <= INT64_MAX = isize::MAX.
        let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        if flags & QCOWPROV_WRITE_FUA != 0 {
            img.write_at_fua(buf, offset)?;
        } else {
            img.write_at(buf, offset)?;
        }
        Ok(n)
    })
}

/// The buffers of an iovec array, checked: count, NULL bases, total length.
///
/// # Safety
/// `iov` is NULL or points to `iovcnt` readable `struct iovec`s.
unsafe fn iovecs<'a>(iov: *const iovec, iovcnt: c_int) -> CResult<(&'a [iovec], i64)> {
    args::non_null(iov, "iov")?;
    let cnt = usize::try_from(iovcnt).map_err(|_| {
        Failure::invalid(format!("invalid argument: iovcnt is negative ({iovcnt})"))
    })?;
    // SAFETY: `iov` is non-NULL and the caller guarantees `iovcnt` readable entries.
    let v = unsafe { std::slice::from_raw_parts(iov, cnt) };
    let mut total: usize = 0;
    for (i, e) in v.iter().enumerate() {
        if e.iov_base.is_null() && e.iov_len != 0 {
            return Err(Failure::invalid(format!(
                "invalid argument: iov[{i}].iov_base is NULL with iov_len {}",
                e.iov_len
            )));
        }
        total = total
            .checked_add(e.iov_len)
            .ok_or_else(|| Failure::invalid("invalid argument: the iovec total overflows"))?;
    }
    Ok((v, args::byte_count(total, "total iovec length")?))
}

/// Reads guest data at `offset` into the `iovcnt` buffers of `iov`, in order.
///
/// Thread-safety: thread-safe; concurrent reads and writes on one handle are allowed.
///
/// Returns the total length of the buffers on success. On failure the buffers' content is
/// unspecified. Errors: `-EINVAL` for NULL `img` or `iov`, a negative `iovcnt`, a NULL
/// `iov_base` with a nonzero `iov_len`, a total beyond INT64_MAX or a range beyond the
/// virtual size; `-EIO` for a corrupt image or host failure.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `iov` NULL or an array of
/// `iovcnt` entries, each (unless `iov_len` is 0) valid for writes of `iov_len` bytes,
/// not overlapping each other and not accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_preadv(
    img: *mut QcowprovImage,
    iov: *const iovec,
    iovcnt: c_int,
    offset: u64,
) -> i64 {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `iov` is NULL or `iovcnt` readable entries.
        let (v, total) = unsafe { iovecs(iov, iovcnt) }?;
        let mut bufs: Vec<&mut [u8]> = v
            .iter()
            .map(|e| {
                if e.iov_len == 0 {
                    &mut [][..]
                } else {
                    // SAFETY: non-NULL (checked by `iovecs` for nonzero lengths); the
                    // caller guarantees `iov_len` writable bytes, disjoint from the other
                    // entries and unaccessed during the call; the total is <= isize::MAX.
                    unsafe { std::slice::from_raw_parts_mut(e.iov_base.cast::<u8>(), e.iov_len) }
                }
            })
            .collect();
        img.read_vectored_at(&mut bufs, offset)?;
        Ok(total)
    })
}

/// Writes the `iovcnt` buffers of `iov`, in order, at guest `offset`. `flags`: 0 or
/// `QCOWPROV_WRITE_FUA`.
///
/// Thread-safety: thread-safe; concurrent reads and writes on one handle are allowed.
///
/// Returns the total length of the buffers on success. Errors: as `qcowprov_pwrite`, and
/// `-EINVAL` for NULL `iov`, a negative `iovcnt`, a NULL `iov_base` with a nonzero
/// `iov_len` or a total beyond INT64_MAX.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `iov` NULL or an array of
/// `iovcnt` entries, each (unless `iov_len` is 0) valid for reads of `iov_len` bytes and
/// not modified during the call.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_pwritev(
    img: *mut QcowprovImage,
    iov: *const iovec,
    iovcnt: c_int,
    offset: u64,
    flags: u32,
) -> i64 {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `iov` is NULL or `iovcnt` readable entries.
        let (v, total) = unsafe { iovecs(iov, iovcnt) }?;
        args::known_flags(flags, QCOWPROV_WRITE_FUA, "flags")?;
        let bufs: Vec<&[u8]> = v
            .iter()
            .map(|e| {
                if e.iov_len == 0 {
                    &[][..]
                } else {
                    // SAFETY: non-NULL (checked by `iovecs` for nonzero lengths); the
                    // caller guarantees `iov_len` readable bytes not modified during the
                    // call; the total is <= isize::MAX.
                    unsafe { std::slice::from_raw_parts(e.iov_base.cast::<u8>(), e.iov_len) }
                }
            })
            .collect();
        img.write_vectored_at(&bufs, offset)?;
        if flags & QCOWPROV_WRITE_FUA != 0 {
            img.flush()?;
        }
        Ok(total)
    })
}

/// Discards guest bytes `[offset, offset + len)`: what happens follows the image's policy
/// (`provision=` mode or QEMU's discard options; see `qcowprov_open`). Only whole clusters
/// are discarded, as in QEMU; partial clusters at either end are left alone. Discarded
/// ranges read as zeros unless the policy ignores discards (`provision=off`,
/// `discard=ignore`).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success. Errors: `-EINVAL` for NULL `img` or a range beyond the virtual
/// size; `-EROFS` on a read-only image; `-ENOTSUP` on a version 2 image with a backing
/// file; host errors.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_discard(img: *mut QcowprovImage, offset: u64, len: u64) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        img.discard(offset, len)?;
        Ok(0)
    })
}

/// Makes guest bytes `[offset, offset + len)` read as zeros. `flags`: 0 or a combination
/// of `QCOWPROV_ZERO_MAY_UNMAP` (the policy may then release the space) and
/// `QCOWPROV_ZERO_NO_FALLBACK` (fail with `-ENOTSUP` rather than write zero bytes).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success. Errors: `-EINVAL` for NULL `img`, unknown flags or a range beyond
/// the virtual size; `-EROFS` on a read-only image; `-ENOTSUP` with
/// `QCOWPROV_ZERO_NO_FALLBACK` where zero bytes would have to be written (an unaligned part
/// that does not already read zero, a compressed cluster, a version 2 image with a backing
/// file); `-ENOSPC`, `-EIO`, ... from the host.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_write_zeroes(
    img: *mut QcowprovImage,
    offset: u64,
    len: u64,
    flags: u32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        args::known_flags(
            flags,
            QCOWPROV_ZERO_MAY_UNMAP | QCOWPROV_ZERO_NO_FALLBACK,
            "flags",
        )?;
        img.write_zeroes_with(
            offset,
            len,
            qcow2_engine::ZeroFlags {
                may_unmap: flags & QCOWPROV_ZERO_MAY_UNMAP != 0,
                no_fallback: flags & QCOWPROV_ZERO_NO_FALLBACK != 0,
            },
        )?;
        Ok(0)
    })
}
