//! The opaque image handle and its lifetime: create and format, open (by path or from a
//! descriptor), close; flush, resize and runtime options. The handle's memory and its tag
//! check are in `tag.rs`.

use std::ffi::{c_char, c_int};
use std::os::fd::{FromRawFd, OwnedFd};

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
/// Open for `qcowprov_check` (QEMU's `BDRV_O_CHECK`, as `qemu-img check` opens): damage
/// only a repair can mend does not refuse the open (no refcount table, refcount blocks
/// past the end of the file or unaligned, colliding tables); with
/// `QCOWPROV_OPEN_RDONLY` for a check that only reports, without it for a repair. A
/// read/write check-open of such an image (or one with the corrupt bit set) refuses guest
/// writes with `-EIO` until a repair leaves no corruption; that repair clears the corrupt
/// bit (and an earlier writer's dirty bit). A dirty image is not repaired at a
/// check-open (a read/write open without this flag repairs it, as QEMU does).
pub const QCOWPROV_OPEN_CHECK: u32 = 8;
/// Share the image with writers (QEMU's `force-share=on`, `qemu-img -U`): a read-only
/// open that neither blocks nor is blocked by a writer's lock; what it reads may change
/// or be inconsistent under it. Only with `QCOWPROV_OPEN_RDONLY`.
pub const QCOWPROV_OPEN_FORCE_SHARE: u32 = 16;

/// Every `QCOWPROV_OPEN_*` flag.
const OPEN_FLAGS: u32 = QCOWPROV_OPEN_RDONLY
    | QCOWPROV_OPEN_DIRECT
    | QCOWPROV_OPEN_NO_BACKING
    | QCOWPROV_OPEN_CHECK
    | QCOWPROV_OPEN_FORCE_SHARE;

pub(crate) use crate::tag::image;
pub use crate::tag::QcowprovImage;

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
/// exists (a block device too: this function only creates new files; see
/// `qcowprov_format` for existing ones); `-EINVAL` for
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
        let opts = create_options(options, size)?;
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
                    format!(
                        "Could not create '{}': {}",
                        path.display(),
                        host_io::error_text(&e)
                    ),
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
/// `refcount-cache-size`, `quarantine-slack`, `locking=on|off|auto` (alias `file.locking`),
/// `force-share`, `aio=auto|io_uring|threads` (the backend of the `qcowprov_aio_*` calls:
/// `auto` takes io_uring where the kernel allows it and the process is not under valgrind,
/// which deadlocks on io_uring's waits, else a thread pool; `io_uring` fails
/// the open with `-ENOTSUP` where it cannot be used) and `aio-queue-depth` (requests
/// submitted and not reaped before `qcowprov_aio_*` gives `-EAGAIN`; default 1024).
/// NULL or "" means the defaults (`provision=metadata` on version 3 images,
/// `provision=thin` on version 2, `locking=auto`). `flags` is a combination of the
/// `QCOWPROV_OPEN_*` flags (or 0).
///
/// Image locks: the open takes QEMU's image locks (byte-range locks on the open file
/// description, the same bytes QEMU 2.10 and later take), so that this library and QEMU's
/// tools exclude each other: a read/write open is refused while anyone else (another
/// process, or another handle in this process) has the image or one of its backing files
/// open for writing, or has the image open at all; a read-only open is refused while
/// someone writes it. Backing files are locked as read-only opens. `force-share=on`
/// (or `QCOWPROV_OPEN_FORCE_SHARE`) with a read-only open shares everything; `locking=off`
/// neither takes nor tests locks. The locks go with the handle (and with the process).
///
/// Thread-safety: thread-safe. The handle may then be used from any number of threads.
///
/// Returns 0 on success, with `*out` set; close the handle with `qcowprov_close`. On
/// failure `*out` is not touched. Errors: `-EBUSY` when the image or a backing file is in
/// use (the message names the image, the permission that conflicts, as QEMU's "Failed to
/// get "write" lock", and force-share for a read-only look); `-EINVAL` for NULL `path` or
/// `out`, unknown flag bits, an unknown option (the message names it), conflicting options
/// (e.g. `provision` with `discard`, or force-share on a read/write open) or an invalid
/// image; `-ENOTSUP` for image features this library does not implement; `-ENOENT`,
/// `-EACCES`, `-EISDIR`, ... from opening the file.
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
        let opts = open_options(options, flags)?;
        let inner = Image::open(path, &opts)?;
        // SAFETY: `out` is non-NULL (checked above) and the caller guarantees it is valid
        // for a pointer write.
        unsafe { out.write(crate::tag::new_handle(inner)) };
        Ok(0)
    })
}

/// Runtime options from the `options` string and the `QCOWPROV_OPEN_*` flags.
fn open_options(options: &str, flags: u32) -> CResult<OpenOptions> {
    args::known_flags(flags, OPEN_FLAGS, "flags")?;
    let mut opts = OpenOptions::parse(options)?;
    opts.read_only |= flags & QCOWPROV_OPEN_RDONLY != 0;
    opts.direct |= flags & QCOWPROV_OPEN_DIRECT != 0;
    opts.no_backing |= flags & QCOWPROV_OPEN_NO_BACKING != 0;
    opts.check |= flags & QCOWPROV_OPEN_CHECK != 0;
    opts.force_share |= flags & QCOWPROV_OPEN_FORCE_SHARE != 0;
    Ok(opts)
}

/// Creation options from the `options` string and the `size` argument.
fn create_options(options: &str, size: u64) -> CResult<CreateOptions> {
    let mut opts = CreateOptions::parse(options)?;
    if size != 0 {
        opts.size = Some(size);
    } else if opts.size.is_none() && opts.backing_file.is_none() {
        opts.size = Some(0);
    }
    opts.validate()?;
    Ok(opts)
}

/// A duplicate of the caller's descriptor `fd` (close-on-exec), owned by the library.
fn dup_fd(fd: c_int) -> CResult<OwnedFd> {
    if fd < 0 {
        return Err(Failure::new(
            libc::EBADF,
            format!("invalid argument: 'fd' is {fd}, not a file descriptor"),
        ));
    }
    // SAFETY: F_DUPFD_CLOEXEC takes an integer and touches no memory; a descriptor that
    // is not open makes it fail with EBADF.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::new(
            e.raw_os_error().unwrap_or(libc::EBADF),
            format!(
                "Could not duplicate descriptor {fd}: {}",
                host_io::error_text(&e)
            ),
        ));
    }
    // SAFETY: `dup` is a descriptor fcntl just created; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Opens the qcow2 image on a file descriptor the caller already has (management stacks
/// pass descriptors, e.g. over a UNIX socket), and stores a new handle in `*out`.
///
/// The library uses a duplicate of `fd` (`F_DUPFD_CLOEXEC`): the caller keeps `fd` and may
/// close it right after the call. The duplicate shares `fd`'s open file description, so:
/// its access mode must allow the open (`O_RDWR`, or `O_RDONLY` with a read-only open;
/// else `-EBADF`); it must not have `O_APPEND` (`-EINVAL`); `O_DIRECT` is taken from it
/// (`QCOWPROV_OPEN_DIRECT` or `cache.direct=on` without `O_DIRECT` on `fd` is `-EINVAL`;
/// the library never changes the shared status flags). Image locks are taken as by
/// `qcowprov_open`, on that description: they exclude other opens of the file, but not a
/// second handle opened on a duplicate of the same description, and they are released at
/// `qcowprov_close` although the description lives on in the caller's `fd`. Do not take
/// byte-range locks on bytes 100-103 or 200-203 through that description yourself.
/// Relative backing file names resolve against the directory of the file `fd` refers to
/// (`/proc/self/fd`). `options` and `flags` are as for `qcowprov_open`.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success, with `*out` set. On failure `*out` is not touched and `fd` is
/// unchanged. Errors: as `qcowprov_open`, and `-EBADF` for a negative or closed `fd`.
///
/// # Safety
/// `options` must be NULL or a NUL-terminated string, `out` NULL or a valid pointer to a
/// `qcowprov_image *`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_open_fd(
    fd: c_int,
    options: *const c_char,
    flags: u32,
    out: *mut *mut QcowprovImage,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::options(options, "options") }?;
        args::non_null(out, "out")?;
        let opts = open_options(options, flags)?;
        let inner = Image::open_fd(dup_fd(fd)?, &opts)?;
        // SAFETY: `out` is non-NULL (checked above) and the caller guarantees it is valid
        // for a pointer write.
        unsafe { out.write(crate::tag::new_handle(inner)) };
        Ok(0)
    })
}

/// Formats `path`, a new or existing regular file or block device, as a new qcow2 image
/// (`qemu-img create` on an existing target, e.g. an LVM logical volume).
///
/// A missing file is created; an existing regular file is truncated first; a block device
/// keeps its size and is written from its start (the image may later need more space than
/// the device has: watch `qcowprov_highest_offset` and grow the volume). QEMU's creation
/// lock is taken before anything is written or truncated, so an image in use (by QEMU or
/// by this library, in any process) is refused with `-EBUSY` and left intact. `options`
/// and `size` are as for `qcowprov_create`.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success. Errors: as `qcowprov_create` (without `-EEXIST`), and `-EBUSY`
/// for an image in use. A failure after truncation leaves the file truncated or partly
/// written (not a valid image).
///
/// # Safety
/// `path` must be a NUL-terminated string; `options` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_format(
    path: *const c_char,
    options: *const c_char,
    size: u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `path` is a C string.
        let path = unsafe { args::path(path, "path") }?;
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::options(options, "options") }?;
        let opts = create_options(options, size)?;
        qcow2_engine::create(path, &opts)?;
        Ok(0)
    })
}

/// Formats the file or block device behind the caller's descriptor `fd` as a new qcow2
/// image: `qcowprov_format` for stacks that pass descriptors. `fd` must be open `O_RDWR`
/// without `O_APPEND`; the library works on a duplicate (the caller keeps `fd`), takes
/// the creation lock on its open file description for the duration of the call, and
/// truncates a regular file. Relative backing file names resolve against the directory
/// of the file `fd` refers to.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success. Errors: as `qcowprov_format`, and `-EBADF` for a negative,
/// closed or read-only `fd`.
///
/// # Safety
/// `options` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_format_fd(fd: c_int, options: *const c_char, size: u64) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::options(options, "options") }?;
        let opts = create_options(options, size)?;
        qcow2_engine::create_fd(dup_fd(fd)?, &opts)?;
        Ok(0)
    })
}

/// Flushes and closes an image, releasing its locks and freeing the handle.
///
/// Asynchronous requests still in flight: those not started complete with `-ECANCELED`,
/// started ones run to their end; then the queue stops. Completions nobody reaped are
/// dropped (a callback set with `qcowprov_aio_set_callback` receives them before this
/// call returns). After it returns the library never touches a request's buffers again.
///
/// Thread-safety: no other call may use `img` during or after this call (nor a completion
/// callback of the image: from there it fails with `-EDEADLK`).
///
/// Returns 0 on success. The handle is closed even when the final flush fails; the flush
/// error is returned (e.g. `-EIO`, `-ENOSPC`). NULL `img` gives `-EINVAL`; a handle closed
/// before (a double close) or a pointer that is not a handle gives `-EBADF`, and so does
/// any other call with such a handle (see "Handles" in the header's introduction).
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (closed or not).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_close(img: *mut QcowprovImage) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, and that no other thread
        // uses it during or after this call.
        let h = unsafe { crate::tag::handle(img) }?;
        if h.queue.get().is_some_and(|q| q.on_callback_thread()) {
            return Err(Failure::new(
                libc::EDEADLK,
                "qcowprov_close cannot be called from the image's completion callback",
            ));
        }
        // SAFETY: as above.
        let handle = unsafe { crate::tag::take(img) }?;
        handle.close()?;
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
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_flush(img: *mut QcowprovImage) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
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
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_resize(img: *mut QcowprovImage, new_size: u64) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        img.resize(new_size)?;
        Ok(0)
    })
}

/// Changes the discard / write-zeroes options of an open image, like QEMU's reopen.
///
/// `options` holds only policy keys (`provision`, `discard`, `discard-no-unref`,
/// `pass-discard-request|snapshot|other`, `detect-zeroes`). The keys given replace their
/// values; every other key keeps its current value (so "" changes nothing, and
/// `detect-zeroes=on` leaves the provisioning mode alone). `provision` and QEMU's
/// `discard`, `pass-discard-request` and `discard-no-unref` set the same two layers:
/// giving one family drops the other's keys (giving both in one call is `-EINVAL`).
/// `qcowprov_get_info` reports the result in `options`. Host discards still pending under
/// the old policy are issued first.
///
/// Thread-safety: thread-safe; calls in flight on other threads see either policy.
///
/// Returns 0 on success. On failure nothing changes. Errors: `-EINVAL` for NULL `img` or
/// `options`, an unknown key (the message names it) or conflicting keys; host errors from
/// issuing pending discards.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `options` NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_set_options(
    img: *mut QcowprovImage,
    options: *const c_char,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `options` is NULL or a C string.
        let options = unsafe { args::utf8(options, "options") }?;
        img.set_options(options).map_err(Failure::from)?;
        Ok(0)
    })
}
