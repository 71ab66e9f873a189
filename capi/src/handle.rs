//! The opaque image handle and its lifetime: create, open, close; flush, resize and
//! runtime options.

use std::ffi::{c_char, c_int};

use qcow2_engine::{CreateOptions, Image, OpenOptions};

use crate::args;
use crate::boundary::guard;
use crate::error::{CResult, Failure};

/// Open read-only: every write, discard, write-zeroes and resize fails with `-EROFS`.
pub const QCOWPROV_OPEN_RDONLY: u32 = 1;
/// Bypass the host page cache (`O_DIRECT`, QEMU's `cache=none`).
pub const QCOWPROV_OPEN_DIRECT: u32 = 2;
/// Do not open the backing file: unallocated ranges then read as zeros.
pub const QCOWPROV_OPEN_NO_BACKING: u32 = 4;
/// Open for `qcowprov_check` with a fix flag (QEMU's `BDRV_O_CHECK`, as `qemu-img check -r`):
/// an image with the corrupt bit set opens read/write, guest writes stay refused with
/// `-EIO`, and a repair that leaves no corruption clears the bit.
pub const QCOWPROV_OPEN_CHECK: u32 = 8;

/// An open qcow2 image (opaque). Obtained from `qcowprov_open`, released with
/// `qcowprov_close`. One handle may be used from several threads at once.
pub struct QcowprovImage {
    pub(crate) inner: Image,
}

static_assertions::assert_impl_all!(QcowprovImage: Send, Sync);

/// The image behind a handle argument.
///
/// # Safety
/// `img` is NULL or a handle returned by `qcowprov_open` and not yet closed.
pub(crate) unsafe fn image<'a>(img: *const QcowprovImage) -> CResult<&'a Image> {
    args::non_null(img, "img")?;
    // SAFETY: non-NULL checked above; the caller guarantees a live handle, which is a
    // `Box<QcowprovImage>` leaked by `qcowprov_open` and only freed by `qcowprov_close`.
    Ok(unsafe { &(*img).inner })
}

/// Returns the library version as a static string, e.g. "0.1.0".
///
/// Thread-safety: thread-safe.
///
/// Returns a NUL-terminated static string, never NULL. Do not free it.
#[no_mangle]
pub extern "C" fn qcowprov_version() -> *const c_char {
    let version: *const c_char = concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast();
    // Nothing here can panic; the boundary is kept for uniformity with every export.
    std::panic::catch_unwind(|| version).unwrap_or(c"".as_ptr())
}

/// Creates a qcow2 image file at `path`.
///
/// `options` takes `qemu-img create -o` options, comma-separated `key=value`:
/// `size`, `cluster_size`, `compat` (0.10 or 1.1), `refcount_bits`, `extended_l2`,
/// `lazy_refcounts`, `compression_type` (zlib, zstd), `backing_file`, `backing_fmt`
/// (qcow2, raw; required with `backing_file`), `preallocation` (off, metadata, falloc,
/// full). `,,` is a literal comma. NULL or "" means the defaults (64 KiB clusters,
/// version 3, 16-bit refcounts). `size` is the virtual size in bytes (rounded up to 512);
/// nonzero, it overrides a `size=` option. 0 takes `size=` from `options`, else the backing
/// file's size when `backing_file` is given, else creates an empty (0-byte) disk.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success; on failure no file is left behind. Errors: `-EEXIST` if `path`
/// exists (a block device too: this function only creates new files); `-EINVAL` for
/// NULL `path`, an unknown option (the message names it) or an invalid combination;
/// `-EFBIG` for a size beyond the format's limits; other negative errnos from the file
/// system (`-ENOENT`, `-EACCES`, `-ENOSPC`, ...). See `qcowprov_last_error`.
///
/// # Safety
/// `path` must be a NUL-terminated string; `options` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_create(
    path: *const c_char,
    options: *const c_char,
    size: u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `path` is a C string.
        let path = unsafe { args::path(path, "path") }?;
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::options(options, "options") }?;
        let mut opts = CreateOptions::parse(options)?;
        if size != 0 {
            opts.size = Some(size);
        } else if opts.size.is_none() && opts.backing_file.is_none() {
            opts.size = Some(0);
        }
        opts.validate()?;
        // The engine's `create` overwrites an existing file; the C API promises -EEXIST.
        // Claim the name atomically (O_CREAT | O_EXCL) and let the engine fill the empty
        // file; remove it again if that fails.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                Failure::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("creating '{}': {e}", path.display()),
                )
            })?;
        if let Err(e) = qcow2_engine::create(path, &opts) {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
        }
        Ok(0)
    })
}

/// Opens the qcow2 image at `path` (a regular file or a block device) and stores a new
/// handle in `*out`.
///
/// `options` takes runtime options, comma-separated `key=value`: the discard policy
/// (`provision=off|full|metadata|thin|reuse`, or QEMU's `discard=ignore|unmap`,
/// `discard-no-unref`, `pass-discard-request|snapshot|other`), `detect-zeroes=off|on|unmap`,
/// `read-only`, `cache.direct`, `l2-cache-size`, `l2-cache-entry-size`,
/// `refcount-cache-size`. NULL or "" means the defaults (`provision=metadata` on version 3
/// images, `provision=thin` on version 2). `flags` is a combination of the
/// `QCOWPROV_OPEN_*` flags (or 0).
///
/// Thread-safety: thread-safe. The handle may then be used from any number of threads.
///
/// Returns 0 on success, with `*out` set; close the handle with `qcowprov_close`. On
/// failure `*out` is not touched. Errors: `-EINVAL` for NULL `path` or `out`, unknown flag
/// bits, an unknown option (the message names it), conflicting options (e.g. `provision`
/// with `discard`) or an invalid image; `-ENOTSUP` for image features this library does
/// not implement; `-ENOENT`, `-EACCES`, `-EISDIR`, ... from opening the file.
///
/// # Safety
/// `path` must be a NUL-terminated string, `options` NULL or a NUL-terminated string,
/// `out` NULL or a valid pointer to a `qcowprov_image *`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_open(
    path: *const c_char,
    options: *const c_char,
    flags: u32,
    out: *mut *mut QcowprovImage,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `path` is a C string.
        let path = unsafe { args::path(path, "path") }?;
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::options(options, "options") }?;
        args::non_null(out, "out")?;
        args::known_flags(
            flags,
            QCOWPROV_OPEN_RDONLY
                | QCOWPROV_OPEN_DIRECT
                | QCOWPROV_OPEN_NO_BACKING
                | QCOWPROV_OPEN_CHECK,
            "flags",
        )?;
        let mut opts = OpenOptions::parse(options)?;
        opts.read_only |= flags & QCOWPROV_OPEN_RDONLY != 0;
        opts.direct |= flags & QCOWPROV_OPEN_DIRECT != 0;
        opts.no_backing |= flags & QCOWPROV_OPEN_NO_BACKING != 0;
        opts.check |= flags & QCOWPROV_OPEN_CHECK != 0;
        let inner = Image::open(path, &opts)?;
        let handle = Box::into_raw(Box::new(QcowprovImage { inner }));
        // SAFETY: `out` is non-NULL (checked above) and the caller guarantees it is valid
        // for a pointer write.
        unsafe { out.write(handle) };
        Ok(0)
    })
}

/// Flushes and closes an image, freeing the handle.
///
/// Thread-safety: no other call may use `img` during or after this call.
///
/// Returns 0 on success. The handle is freed even when the final flush fails; the flush
/// error is returned (e.g. `-EIO`, `-ENOSPC`). NULL `img` gives `-EINVAL`.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` that has not been closed.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_close(img: *mut QcowprovImage) -> c_int {
    guard(|| {
        args::non_null(img, "img")?;
        // SAFETY: `img` is non-NULL and, as the caller guarantees, the live handle that
        // `qcowprov_open` leaked with `Box::into_raw`; ownership comes back here once.
        let handle = unsafe { Box::from_raw(img) };
        handle.inner.close()?;
        Ok(0)
    })
}

/// Makes every completed write durable (data and metadata), like `fsync`.
///
/// Thread-safety: thread-safe; covers writes completed before the call, by any thread.
///
/// Returns 0 on success. Errors: `-EINVAL` for NULL `img`; `-EIO`, `-ENOSPC`, ... from
/// the host.
///
/// # Safety
/// `img` must be NULL or a live handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_flush(img: *mut QcowprovImage) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or live.
        let img = unsafe { image(img) }?;
        img.flush()?;
        Ok(0)
    })
}

/// Grows the virtual size of an image to `new_size` bytes (a multiple of 512).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success. Errors: `-EINVAL` for NULL `img` or a size not a multiple of
/// 512; `-ENOTSUP` for shrinking or for an image with internal snapshots; `-EFBIG` beyond
/// the format's limits; `-EROFS` on a read-only image; host errors.
///
/// # Safety
/// `img` must be NULL or a live handle from `qcowprov_open`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_resize(img: *mut QcowprovImage, new_size: u64) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or live.
        let img = unsafe { image(img) }?;
        img.resize(new_size)?;
        Ok(0)
    })
}

/// Replaces the discard / write-zeroes options of an open image, like QEMU's reopen.
///
/// `options` holds only policy keys (`provision`, `discard`, `discard-no-unref`,
/// `pass-discard-request|snapshot|other`, `detect-zeroes`); keys not given take their
/// defaults, so "" restores the default policy. Host discards still pending under the old
/// policy are issued first.
///
/// Thread-safety: thread-safe; calls in flight on other threads see either policy.
///
/// Returns 0 on success. On failure nothing changes. Errors: `-EINVAL` for NULL `img` or
/// `options`, an unknown key (the message names it) or conflicting keys; host errors from
/// issuing pending discards.
///
/// # Safety
/// `img` must be NULL or a live handle from `qcowprov_open`; `options` NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_set_options(
    img: *mut QcowprovImage,
    options: *const c_char,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or live.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::utf8(options, "options") }?;
        img.set_options(options).map_err(Failure::from)?;
        Ok(0)
    })
}
