//! Asynchronous I/O for event loops: submit without blocking, learn of completions through
//! a descriptor to poll, reap them (or have a callback called).
//!
//! Conventions follow libnbd's `nbd_aio_*` and io_uring: each request carries a 64-bit
//! cookie of the caller's choosing; a completion is the cookie and a result (bytes, or a
//! negative errno). The queue belongs to the image handle and starts on the first
//! `qcowprov_aio_*` call; its backend (io_uring or a thread pool) was chosen at open
//! (`aio=` option) and is reported by `qcowprov_get_info`.
//!
//! The contract, in the header:
//! - a submission returns 0 once the request is queued (it completes exactly once later),
//!   or a negative errno and nothing is queued (no completion): `-EAGAIN` when
//!   `aio-queue-depth` requests are submitted and not reaped, `-EINVAL` for NULL buffers,
//!   ranges past the end or (with `cache.direct=on`) buffers, offsets or lengths not
//!   aligned to `qcowprov_info.aio_alignment`, `-EROFS` for writes to a read-only image;
//! - a buffer belongs to the library from a successful submission until its completion is
//!   reaped or handed to the callback;
//! - requests in flight together may complete and apply in any order; requests that do
//!   not overlap never interfere; overlapping ones are the caller's to order (wait for one
//!   before submitting the other), as in the block layer;
//! - a flush covers every request that completed before the flush was submitted; FUA
//!   covers its own write;
//! - `qcowprov_close` with requests in flight: those not started complete with
//!   `-ECANCELED`, started ones run to their end, then the image is flushed and closed;
//!   completions not reaped by then are dropped (a callback still receives them), and the
//!   library never touches a request's memory after `qcowprov_close` returns.

use std::ffi::{c_int, c_void};
use std::mem::{offset_of, size_of};
use std::sync::Arc;
use std::time::Duration;

use libc::iovec;
use qcow2_engine::{AioCompletion, AioRequest, IoBuf, ZeroFlags};
use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::error::{CResult, Failure};
use crate::handle::QcowprovImage;
use crate::io::{QCOWPROV_WRITE_FUA, QCOWPROV_ZERO_MAY_UNMAP, QCOWPROV_ZERO_NO_FALLBACK};
use crate::tag::{handle, Handle};

/// A completed asynchronous request, as `qcowprov_aio_reap` returns it. Its layout is
/// fixed (16 bytes, like an io_uring CQE) and will not grow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QcowprovAioCompletion {
    /// The cookie the request was submitted with.
    pub cookie: u64,
    /// Bytes read or written (0 for discard, write-zeroes and flush), or a negative errno
    /// (`-ECANCELED` for a request cancelled by `qcowprov_close`).
    pub result: i64,
}

const_assert_eq!(size_of::<QcowprovAioCompletion>(), 16);
const_assert_eq!(offset_of!(QcowprovAioCompletion, cookie), 0);
const_assert_eq!(offset_of!(QcowprovAioCompletion, result), 8);

/// A completion callback: called once per completed request, with the `opaque` pointer
/// given to `qcowprov_aio_set_callback`, the request's cookie and its result (as
/// `qcowprov_aio_completion.result`). It runs on a thread of the library, one call at a
/// time; it may submit further requests but must not call `qcowprov_close` on the image.
pub type QcowprovAioCb =
    Option<unsafe extern "C" fn(opaque: *mut c_void, cookie: u64, result: i64)>;

fn result_of(c: &AioCompletion) -> i64 {
    match &c.result {
        Ok(n) => i64::try_from(*n).unwrap_or(i64::MAX),
        Err(e) => {
            let errno = e.errno();
            -i64::from(if errno > 0 { errno } else { libc::EIO })
        }
    }
}

/// Queue `req` on the image's queue.
///
/// # Safety
/// `img` is NULL or a handle not closed during the call.
unsafe fn submit(img: *mut QcowprovImage, cookie: u64, req: AioRequest) -> CResult<c_int> {
    // SAFETY: forwarded from the caller.
    let h: &Handle = unsafe { handle(img) }?;
    h.queue()?.submit(cookie, req)?;
    Ok(0)
}

/// Lend the caller's `len` bytes at `buf` to a request.
///
/// # Safety
/// `buf` is non-NULL and valid for reads and writes of `len` bytes until the request's
/// completion is reaped.
unsafe fn lend(buf: *const c_void, len: usize) -> CResult<IoBuf> {
    args::byte_count(len, "len")?;
    // SAFETY: forwarded from the caller (the library writes into it only for reads).
    Ok(unsafe { IoBuf::from_raw_parts(buf.cast_mut().cast::<u8>(), len) })
}

/// The write of `buf` at `offset`, durable at completion with `QCOWPROV_WRITE_FUA` in
/// `flags` (already checked for unknown bits).
fn write_request(offset: u64, buf: IoBuf, flags: u32) -> AioRequest {
    AioRequest::Write {
        off: offset,
        buf,
        fua: flags & QCOWPROV_WRITE_FUA != 0,
    }
}

/// Lend the caller's iovec buffers to a request.
///
/// # Safety
/// `iov` is NULL or `iovcnt` readable entries whose buffers stay valid (and, for reads,
/// writable and disjoint) until the request's completion is reaped.
unsafe fn lend_iov(iov: *const iovec, iovcnt: c_int) -> CResult<IoBuf> {
    args::non_null(iov, "iov")?;
    let cnt = usize::try_from(iovcnt).map_err(|_| {
        Failure::invalid(format!("invalid argument: iovcnt is negative ({iovcnt})"))
    })?;
    // SAFETY: `iov` is non-NULL and the caller guarantees `iovcnt` readable entries.
    let v = unsafe { std::slice::from_raw_parts(iov, cnt) };
    let mut total: usize = 0;
    let mut parts = Vec::with_capacity(cnt);
    for (i, e) in v.iter().enumerate() {
        if e.iov_len == 0 {
            continue;
        }
        if e.iov_base.is_null() {
            return Err(Failure::invalid(format!(
                "invalid argument: iov[{i}].iov_base is NULL with iov_len {}",
                e.iov_len
            )));
        }
        total = total
            .checked_add(e.iov_len)
            .ok_or_else(|| Failure::invalid("invalid argument: the iovec total overflows"))?;
        parts.push((e.iov_base.cast::<u8>(), e.iov_len));
    }
    args::byte_count(total, "total iovec length")?;
    // SAFETY: every part is non-NULL; the caller keeps them valid until the completion.
    Ok(unsafe { IoBuf::from_iovecs(&parts) })
}

/// Returns the descriptor to poll for completions (starting the image's queue if this is
/// the first asynchronous call): it is readable (`POLLIN`) exactly while completions wait
/// to be reaped. Do not read from it, write to it or close it: `qcowprov_aio_reap` resets
/// it, `qcowprov_close` closes it.
///
/// Thread-safety: thread-safe.
///
/// Returns the descriptor (>= 0). Errors: `-EINVAL` for NULL `img`; `-EBADF` for a closed
/// handle; `-ENOTSUP` when the backend chosen at open cannot start; `-ENOMEM`, ... when
/// its threads or ring cannot be created.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_fd(img: *mut QcowprovImage) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let h = unsafe { handle(img) }?;
        Ok(h.queue()?.fd())
    })
}

/// Submits a read of `len` bytes of guest data at `offset` into `buf`; the completion's
/// result is `len`.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors (nothing queued): `-EINVAL` for NULL `img` or `buf`, a
/// range beyond the virtual size, or (with `cache.direct=on`) `buf`, `len` or `offset` not
/// aligned to `qcowprov_info.aio_alignment`; `-EAGAIN` when the queue is full (reap
/// first); `-EBADF` for a closed handle.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `buf` NULL or valid for writes of
/// `len` bytes, not accessed by anyone else until the completion is reaped.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_pread(
    img: *mut QcowprovImage,
    buf: *mut c_void,
    len: usize,
    offset: u64,
    cookie: u64,
) -> c_int {
    guard(|| {
        args::non_null(buf, "buf")?;
        // SAFETY: non-NULL; the caller guarantees `len` writable bytes until the completion.
        let buf = unsafe { lend(buf, len) }?;
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, AioRequest::Read { off: offset, buf }) }
    })
}

/// Submits a read of guest data at `offset` into the `iovcnt` buffers of `iov`, in order;
/// the completion's result is their total length. The `iov` array itself may be reused
/// once the call returns; the buffers it names may not.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors: as `qcowprov_aio_pread`, and `-EINVAL` for NULL `iov`, a
/// negative `iovcnt` or a NULL `iov_base` with a nonzero `iov_len`.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `iov` NULL or `iovcnt` readable
/// entries, each buffer valid for writes of `iov_len` bytes, disjoint, and not accessed by
/// anyone else until the completion is reaped.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_preadv(
    img: *mut QcowprovImage,
    iov: *const iovec,
    iovcnt: c_int,
    offset: u64,
    cookie: u64,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let buf = unsafe { lend_iov(iov, iovcnt) }?;
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, AioRequest::Read { off: offset, buf }) }
    })
}

/// Submits a write of `len` bytes from `buf` at guest `offset`; `flags`: 0 or
/// `QCOWPROV_WRITE_FUA` (durable when it completes). The completion's result is `len`.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors: as `qcowprov_aio_pread`, `-EINVAL` for unknown flags,
/// and `-EROFS` on a read-only image.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `buf` NULL or valid for reads of
/// `len` bytes, not modified until the completion is reaped.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_pwrite(
    img: *mut QcowprovImage,
    buf: *const c_void,
    len: usize,
    offset: u64,
    flags: u32,
    cookie: u64,
) -> c_int {
    guard(|| {
        args::non_null(buf, "buf")?;
        args::known_flags(flags, QCOWPROV_WRITE_FUA, "flags")?;
        // SAFETY: non-NULL; the caller guarantees `len` readable bytes until the completion
        // (a write only reads them).
        let buf = unsafe { lend(buf, len) }?;
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, write_request(offset, buf, flags)) }
    })
}

/// Submits a write of the `iovcnt` buffers of `iov`, in order, at guest `offset`;
/// `flags`: 0 or `QCOWPROV_WRITE_FUA`. The `iov` array may be reused once the call
/// returns; the buffers it names may not.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors: as `qcowprov_aio_pwrite` and `qcowprov_aio_preadv`.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `iov` NULL or `iovcnt` readable
/// entries, each buffer valid for reads of `iov_len` bytes and not modified until the
/// completion is reaped.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_pwritev(
    img: *mut QcowprovImage,
    iov: *const iovec,
    iovcnt: c_int,
    offset: u64,
    flags: u32,
    cookie: u64,
) -> c_int {
    guard(|| {
        args::known_flags(flags, QCOWPROV_WRITE_FUA, "flags")?;
        // SAFETY: forwarded from the caller (a write only reads the buffers).
        let buf = unsafe { lend_iov(iov, iovcnt) }?;
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, write_request(offset, buf, flags)) }
    })
}

/// Submits a discard of guest bytes `[offset, offset + len)` (as `qcowprov_discard`).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors: `-EINVAL` for NULL `img` or a range beyond the virtual
/// size; `-EROFS` on a read-only image; `-EAGAIN` when the queue is full.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_discard(
    img: *mut QcowprovImage,
    offset: u64,
    len: u64,
    cookie: u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, AioRequest::Discard { off: offset, len }) }
    })
}

/// Submits a write-zeroes of guest bytes `[offset, offset + len)` (as
/// `qcowprov_write_zeroes`; `flags`: `QCOWPROV_ZERO_MAY_UNMAP`, `QCOWPROV_ZERO_NO_FALLBACK`).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors: as `qcowprov_aio_discard`, and `-EINVAL` for unknown
/// flags.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_write_zeroes(
    img: *mut QcowprovImage,
    offset: u64,
    len: u64,
    flags: u32,
    cookie: u64,
) -> c_int {
    guard(|| {
        args::known_flags(
            flags,
            QCOWPROV_ZERO_MAY_UNMAP | QCOWPROV_ZERO_NO_FALLBACK,
            "flags",
        )?;
        let flags = ZeroFlags {
            may_unmap: flags & QCOWPROV_ZERO_MAY_UNMAP != 0,
            no_fallback: flags & QCOWPROV_ZERO_NO_FALLBACK != 0,
        };
        let req = AioRequest::WriteZeroes {
            off: offset,
            len,
            flags,
        };
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, req) }
    })
}

/// Submits a flush: when it completes, every request that completed before it was
/// submitted is durable (requests still in flight at submission may or may not be).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 once queued. Errors: `-EINVAL` for NULL `img`; `-EAGAIN` when the queue is
/// full.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_flush(img: *mut QcowprovImage, cookie: u64) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        unsafe { submit(img, cookie, AioRequest::Flush) }
    })
}

/// Moves up to `max` completions into `out[0..]`, oldest first, without blocking. Each
/// reaped request stops counting against the queue depth, and its buffers are the
/// caller's again.
///
/// Thread-safety: thread-safe (completions are handed out once).
///
/// Returns how many were written (0 when none wait). Errors: `-EINVAL` for NULL `img` or
/// `out`; `-EBADF` for a closed handle.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `out` NULL or valid for writes of
/// `max` completions.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_reap(
    img: *mut QcowprovImage,
    out: *mut QcowprovAioCompletion,
    max: u32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let h = unsafe { handle(img) }?;
        args::non_null(out, "out")?;
        let max = (max as usize).min(c_int::MAX as usize);
        let mut done = Vec::new();
        h.queue()?.reap(max, &mut done);
        for (i, c) in done.iter().enumerate() {
            let v = QcowprovAioCompletion {
                cookie: c.user,
                result: result_of(c),
            };
            // SAFETY: `out` is non-NULL and the caller guarantees `max` > `i` writable
            // entries.
            unsafe { out.add(i).write(v) };
        }
        // Lent buffers are dropped here: the library forgets them (they are the caller's).
        Ok(done.len() as c_int)
    })
}

/// Waits until at least `min` completions wait to be reaped (fewer if fewer requests are
/// in flight), or `timeout_ms` passed (-1: no limit; 0: do not wait). For callers without
/// an event loop; an event loop polls `qcowprov_aio_fd` instead.
///
/// Thread-safety: thread-safe.
///
/// Returns how many completions wait. Errors: `-EINVAL` for NULL `img`; `-EBADF` for a
/// closed handle.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_wait(
    img: *mut QcowprovImage,
    min: u32,
    timeout_ms: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let h = unsafe { handle(img) }?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        let n = h.queue()?.wait(min as usize, timeout);
        Ok(n.min(c_int::MAX as usize) as c_int)
    })
}

/// Returns the number of requests submitted and not yet reaped (or handed to the
/// callback).
///
/// Thread-safety: thread-safe.
///
/// Errors: `-EINVAL` for NULL `img`; `-EBADF` for a closed handle.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_in_flight(img: *mut QcowprovImage) -> i64 {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let h = unsafe { handle(img) }?;
        Ok(h.queue.get().map_or(0, |q| q.in_flight()) as i64)
    })
}

/// The callback and its opaque pointer, handed to the callback thread.
struct Callback {
    f: unsafe extern "C" fn(*mut c_void, u64, i64),
    opaque: *mut c_void,
}

// SAFETY: the caller of `qcowprov_aio_set_callback` accepts that the callback runs on a
// library thread with `opaque` (documented there); the pointer is only passed back to it.
unsafe impl Send for Callback {}
// SAFETY: as above; the callback is called from one thread at a time.
unsafe impl Sync for Callback {}

/// Delivers every completion to `cb` instead of `qcowprov_aio_reap`: called on a library
/// thread, one call at a time, with `opaque`. Set it before submitting (completions that
/// were waiting go to it too). It may be set once per image.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success. Errors: `-EINVAL` for NULL `img` or `cb`; `-EBUSY` when a
/// callback is already set; `-EBADF` for a closed handle.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `cb` must be safe to call with
/// `opaque` from another thread until `qcowprov_close` returns.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_aio_set_callback(
    img: *mut QcowprovImage,
    cb: QcowprovAioCb,
    opaque: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let h = unsafe { handle(img) }?;
        let f = cb.ok_or_else(|| Failure::invalid("invalid argument: cb is NULL"))?;
        let c = Callback { f, opaque };
        h.queue()?
            .set_callback(Arc::new(move |done: AioCompletion| {
                let c = &c;
                // SAFETY: the caller of `qcowprov_aio_set_callback` guarantees the callback
                // may be called with `opaque` from this thread.
                unsafe { (c.f)(c.opaque, done.user, result_of(&done)) }
            }))?;
        Ok(0)
    })
}
