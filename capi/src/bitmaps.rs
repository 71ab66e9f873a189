//! Persistent dirty bitmaps: list them, add, remove, clear, enable, disable and merge them
//! (QEMU's `qemu-img bitmap` and `block-dirty-bitmap-*`), and walk a bitmap's dirty
//! extents the way `qcowprov_block_status` walks a range, so a backup tool reads only
//! what changed. Every change is durable when the call returns.

use std::ffi::{c_char, c_int};
use std::mem::{offset_of, size_of};

use qcow2_engine::BitmapInfo;
use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::error::{CResult, Failure};
use crate::handle::{image, QcowprovImage};

/// The longest bitmap name in bytes, without the terminating NUL (QEMU's limit).
pub const QCOWPROV_BITMAP_NAME_MAX: usize = 1023;

/// Bitmap flag: the bitmap records writes (QEMU's "auto").
pub const QCOWPROV_BITMAP_ENABLED: u32 = 1;
/// Bitmap flag: the image flags the bitmap in use (QEMU's "in-use"): the program that
/// maintained it did not close the image. This library never sets that flag, not even
/// while the image is open.
pub const QCOWPROV_BITMAP_IN_USE: u32 = 2;
/// Bitmap flag: the bitmap's content cannot be trusted (it was in use when the image was
/// opened). It is not tracked and only `qcowprov_bitmap_remove` accepts it: take a full
/// backup, remove it and add it again.
pub const QCOWPROV_BITMAP_INCONSISTENT: u32 = 4;

/// `qcowprov_bitmap_add` flag: the new bitmap does not record writes until
/// `qcowprov_bitmap_enable` (qemu-img's `--add --disable`).
pub const QCOWPROV_BITMAP_ADD_DISABLED: u32 = 1;

/// A persistent dirty bitmap, filled by `qcowprov_bitmap_get`. Set
/// `struct_size = sizeof(struct qcowprov_bitmap)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QcowprovBitmap {
    /// Set by the caller to `sizeof(struct qcowprov_bitmap)`; left unchanged.
    pub struct_size: u32,
    /// `QCOWPROV_BITMAP_ENABLED`, `QCOWPROV_BITMAP_IN_USE`, `QCOWPROV_BITMAP_INCONSISTENT`.
    pub flags: u32,
    /// Guest bytes per bit (a power of two, 512 to 2 GiB).
    pub granularity: u64,
    /// Bytes marked dirty: set bits times the granularity (QEMU's "count"; 0 for an
    /// inconsistent bitmap).
    pub dirty_bytes: u64,
    /// The name, NUL-terminated.
    pub name: [c_char; 1024],
}

const_assert_eq!(size_of::<QcowprovBitmap>(), 1048);
const_assert_eq!(QCOWPROV_BITMAP_NAME_MAX + 1, 1024);
const_assert_eq!(offset_of!(QcowprovBitmap, struct_size), 0);
const_assert_eq!(offset_of!(QcowprovBitmap, flags), 4);
const_assert_eq!(offset_of!(QcowprovBitmap, granularity), 8);
const_assert_eq!(offset_of!(QcowprovBitmap, dirty_bytes), 16);
const_assert_eq!(offset_of!(QcowprovBitmap, name), 24);

/// Size of the first version of `struct qcowprov_bitmap`, the smallest accepted
/// `struct_size`.
const BITMAP_V1_SIZE: usize = 1048;

impl Default for QcowprovBitmap {
    /// Zeros, with `struct_size` set (for Rust callers).
    fn default() -> Self {
        QcowprovBitmap {
            struct_size: size_of::<QcowprovBitmap>() as u32,
            flags: 0,
            granularity: 0,
            dirty_bytes: 0,
            name: [0; QCOWPROV_BITMAP_NAME_MAX + 1],
        }
    }
}

fn flags_of(b: &BitmapInfo) -> u32 {
    let mut f = 0;
    for (on, bit) in [
        (b.enabled, QCOWPROV_BITMAP_ENABLED),
        (b.in_use, QCOWPROV_BITMAP_IN_USE),
        (b.inconsistent, QCOWPROV_BITMAP_INCONSISTENT),
    ] {
        if on {
            f |= bit;
        }
    }
    f
}

/// A bitmap name argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn name<'a>(p: *const c_char, arg: &str) -> CResult<&'a str> {
    // SAFETY: forwarded from the caller.
    unsafe { args::utf8(p, arg) }
}

/// Returns the number of persistent bitmaps of `img` (0 when there are none, or when the
/// image's bitmaps are damaged or were left behind by a program without bitmap support:
/// `qcowprov_bitmap_warning` then says so).
///
/// Thread-safety: thread-safe (another thread may add or remove bitmaps meanwhile).
///
/// Returns the count, or a negative errno: `-EINVAL` for NULL `img`, `-EIO` for a handle
/// that failed earlier.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`).
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_count(img: *mut QcowprovImage) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        Ok(img.bitmaps()?.len() as c_int)
    })
}

/// Fills `*out` with bitmap number `index` (0 to `qcowprov_bitmap_count() - 1`, in the
/// order of the image's bitmap directory): name, granularity, flags, dirty bytes. The
/// caller sets `out->struct_size = sizeof(struct qcowprov_bitmap)` first.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success; `*out` is written only then (all fields but `struct_size`).
/// Errors: `-ENOENT` for an index past the last bitmap; `-EINVAL` for NULL `img` or
/// `out`, or `out->struct_size` smaller than the first version of the struct.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `out` NULL or valid for reads and writes of `out->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_get(
    img: *mut QcowprovImage,
    index: u32,
    out: *mut QcowprovBitmap,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: `struct_size` is the first field; the caller guarantees `out` is NULL or
        // readable.
        let caller_size = unsafe { args::struct_size(out.cast::<u32>(), "out", BITMAP_V1_SIZE) }?;
        let list = img.bitmaps()?;
        let b = list.get(index as usize).ok_or_else(|| {
            Failure::new(
                libc::ENOENT,
                format!("no bitmap number {index} (the image has {})", list.len()),
            )
        })?;
        let mut v = QcowprovBitmap {
            struct_size: caller_size,
            flags: flags_of(b),
            granularity: b.granularity,
            dirty_bytes: b.dirty_bytes,
            ..QcowprovBitmap::default()
        };
        for (d, &s) in v
            .name
            .iter_mut()
            .zip(b.name.as_bytes().iter().take(QCOWPROV_BITMAP_NAME_MAX))
        {
            *d = s as c_char;
        }
        // SAFETY: `out` is non-NULL (checked by `struct_size`), covers at least this
        // version of the struct, and the caller guarantees it is writable.
        unsafe { out.write(v) };
        Ok(0)
    })
}

/// Copies warning number `index` about `img`'s bitmaps into `buf` (`size` bytes,
/// NUL-terminated, truncated if needed): what opening found that a user should hear, as
/// QEMU prints it (a bitmaps extension a program without bitmap support left behind,
/// which the first write drops; damaged bitmaps, which are not maintained).
///
/// Thread-safety: thread-safe.
///
/// Returns the warning's full length in bytes (as `snprintf`; `buf` may be NULL with
/// `size` 0 to ask for it), or a negative errno: `-ENOENT` past the last warning,
/// `-EINVAL` for NULL `img`, or NULL `buf` with a nonzero `size`.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `buf` NULL or valid for writes of `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_warning(
    img: *mut QcowprovImage,
    index: u32,
    buf: *mut c_char,
    size: usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        if size > 0 {
            args::non_null(buf, "buf")?;
        }
        let w = img.bitmap_warnings();
        let text = w.get(index as usize).ok_or_else(|| {
            Failure::new(
                libc::ENOENT,
                format!("no warning number {index} (there are {})", w.len()),
            )
        })?;
        if size > 0 {
            let n = text.len().min(size - 1);
            // SAFETY: `buf` is non-NULL (checked above) and the caller guarantees `size`
            // writable bytes; `n < size`.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n);
                buf.add(n).write(0);
            }
        }
        Ok(c_int::try_from(text.len()).unwrap_or(c_int::MAX))
    })
}

/// Adds the persistent bitmap `name` to `img`, recording writes from now on unless
/// `flags` has `QCOWPROV_BITMAP_ADD_DISABLED` (qemu-img's `bitmap --add [-g GRANULARITY]
/// [--disable]`). `granularity` is the guest bytes per bit, a power of two from 512 to
/// 2 GiB; 0 means QEMU's default (the cluster size, within 4 KiB to 64 KiB). The bitmap
/// is on disk when the call returns. A bitmaps extension that is damaged, or that a
/// program without bitmap support left behind, is dropped first (as by any first write).
///
/// Thread-safety: thread-safe; waits until requests in flight on other threads finish.
///
/// Returns 0 on success. Errors: `-EEXIST` for a name in use; `-ENAMETOOLONG` for a name
/// longer than `QCOWPROV_BITMAP_NAME_MAX` bytes; `-ENOSPC` when the image holds 65535
/// bitmaps or the bitmap directory would exceed 64 MiB; `-EINVAL` for NULL `img` or
/// `name`, an empty or non-UTF-8 name, a bad granularity, unknown flags, a bitmap that
/// would exceed QEMU's size limit (use a larger granularity) or a 0-byte image;
/// `-ENOTSUP` for a version 2 image; `-EROFS` for a read-only image; host errors.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `name` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_add(
    img: *mut QcowprovImage,
    name: *const c_char,
    granularity: u64,
    flags: u32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `name` is NULL or a C string.
        let name = unsafe { self::name(name, "name") }?;
        args::known_flags(flags, QCOWPROV_BITMAP_ADD_DISABLED, "flags")?;
        let g = (granularity != 0).then_some(granularity);
        img.bitmap_add(name, g, flags & QCOWPROV_BITMAP_ADD_DISABLED == 0)?;
        Ok(0)
    })
}

/// Runs one bitmap operation on a named bitmap.
///
/// # Safety
/// As the exports that call it.
unsafe fn named(
    img: *mut QcowprovImage,
    name: *const c_char,
    op: impl FnOnce(&qcow2_engine::Image, &str) -> qcow2_engine::Result<()>,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `name` is NULL or a C string.
        let name = unsafe { self::name(name, "name") }?;
        op(img, name)?;
        Ok(0)
    })
}

/// Removes the persistent bitmap `name` (consistent or not) and frees its clusters
/// (qemu-img's `bitmap --remove`).
///
/// Thread-safety: thread-safe; waits until requests in flight on other threads finish.
///
/// Returns 0 on success. Errors: `-ENOENT` for no such bitmap; `-EINVAL` for NULL `img`
/// or `name`; `-EROFS` for a read-only image; host errors.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `name` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_remove(
    img: *mut QcowprovImage,
    name: *const c_char,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { named(img, name, |i, n| i.bitmap_remove(n)) }
}

/// Clears the persistent bitmap `name`: no byte is dirty (qemu-img's `bitmap --clear`; a
/// backup tool clears after copying what was dirty). Every write completed before the
/// call is made durable first, so that after a crash the image holds what a backup read
/// before the clear.
///
/// Thread-safety: thread-safe; waits until requests in flight on other threads finish.
///
/// Returns 0 on success. Errors: `-ENOENT` for no such bitmap; `-EINVAL` for NULL `img`
/// or `name`, or an inconsistent bitmap; `-EROFS` for a read-only image; host errors.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `name` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_clear(
    img: *mut QcowprovImage,
    name: *const c_char,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { named(img, name, |i, n| i.bitmap_clear(n)) }
}

/// Makes the persistent bitmap `name` record writes (qemu-img's `bitmap --enable`); an
/// enabled bitmap stays enabled.
///
/// Thread-safety: thread-safe; waits until requests in flight on other threads finish.
///
/// Returns 0 on success. Errors: `-ENOENT` for no such bitmap; `-EINVAL` for NULL `img`
/// or `name`, or an inconsistent bitmap; `-EROFS` for a read-only image; host errors.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `name` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_enable(
    img: *mut QcowprovImage,
    name: *const c_char,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { named(img, name, |i, n| i.bitmap_enable(n)) }
}

/// Makes the persistent bitmap `name` stop recording writes (qemu-img's `bitmap
/// --disable`); its bits are kept.
///
/// Thread-safety: thread-safe; waits until requests in flight on other threads finish.
///
/// Returns 0 on success. Errors: as `qcowprov_bitmap_enable`.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `name` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_disable(
    img: *mut QcowprovImage,
    name: *const c_char,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { named(img, name, |i, n| i.bitmap_disable(n)) }
}

/// Merges the bitmap `source` into the bitmap `target` of `img`: every byte dirty in the
/// source becomes dirty in the target (qemu-img's `bitmap --merge SOURCE [-b FILE]`). The
/// source is a bitmap of `src` (another open image of the same virtual size, e.g. opened
/// read-only), or of `img` itself when `src` is NULL. Granularities may differ.
///
/// Thread-safety: thread-safe; waits until requests in flight on `img` finish.
///
/// Returns 0 on success. Errors: `-ENOENT` for no such bitmap (either); `-EINVAL` for
/// NULL `img`, `target` or `source`, an inconsistent bitmap, or different virtual sizes;
/// `-EROFS` for a read-only `img`; host errors.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `src` NULL or such a handle; `target` and `source` NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_merge(
    img: *mut QcowprovImage,
    target: *const c_char,
    src: *mut QcowprovImage,
    source: *const c_char,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `target` and `source` are NULL or C strings.
        let (target, source) = unsafe { (name(target, "target")?, name(source, "source")?) };
        let other = if src.is_null() {
            None
        } else {
            // SAFETY: the caller guarantees `src` is NULL or a handle, not closed
            // concurrently.
            Some(unsafe { image(src) }?)
        };
        img.bitmap_merge(target, source, other)?;
        Ok(0)
    })
}

/// Reports whether the guest bytes from `offset` are dirty in the bitmap `name`, looking
/// at up to `len` bytes: `*pnum` receives how many bytes from `offset` share that state
/// (at least 1, at most `len`, never past the virtual size), `*dirty` 1 or 0. Call again
/// at `offset + *pnum` to walk a range, as with `qcowprov_block_status`; a backup tool
/// copies the dirty runs. Read-only images answer too (from the bitmap on disk).
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success; the out-parameters are written only then. Errors: `-ENOENT` for
/// no such bitmap; `-EINVAL` for a NULL argument, `len` 0, `offset` at or beyond the
/// virtual size, or an inconsistent bitmap.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`);
/// `name` NULL or a NUL-terminated string; `pnum` and `dirty` NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_bitmap_dirty(
    img: *mut QcowprovImage,
    name: *const c_char,
    offset: u64,
    len: u64,
    pnum: *mut u64,
    dirty: *mut u32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: the caller guarantees `name` is NULL or a C string.
        let name = unsafe { self::name(name, "name") }?;
        args::non_null(pnum, "pnum")?;
        args::non_null(dirty, "dirty")?;
        let (n, d) = img.bitmap_dirty(name, offset, len)?;
        // SAFETY: both are non-NULL (checked above) and the caller guarantees they are
        // valid for writes.
        unsafe {
            pnum.write(n);
            dirty.write(u32::from(d));
        }
        Ok(0)
    })
}
