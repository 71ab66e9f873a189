//! Checking C arguments: NULL pointers, C strings, flag words, versioned structs.

use std::ffi::{c_char, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{CResult, Failure};

/// Fail with `-EINVAL` if `p` is NULL.
#[inline(always)]
pub(crate) fn non_null<T>(p: *const T, arg: &str) -> CResult<()> {
    if p.is_null() {
        Err(Failure::null(arg))
    } else {
        Ok(())
    }
}

/// A required C string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, arg: &str) -> CResult<&'a CStr> {
    non_null(p, arg)?;
    // SAFETY: non-NULL checked above; the caller guarantees NUL termination and lifetime.
    Ok(unsafe { CStr::from_ptr(p) })
}

/// A required UTF-8 string argument (options).
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn utf8<'a>(p: *const c_char, arg: &str) -> CResult<&'a str> {
    // SAFETY: forwarded from the caller.
    let s = unsafe { c_str(p, arg) }?;
    s.to_str()
        .map_err(|_| Failure::invalid(format!("invalid argument: '{arg}' is not UTF-8")))
}

/// An optional options string: NULL means "".
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn options<'a>(p: *const c_char, arg: &str) -> CResult<&'a str> {
    if p.is_null() {
        return Ok("");
    }
    // SAFETY: forwarded from the caller.
    unsafe { utf8(p, arg) }
}

/// A path argument (any bytes but NUL, as the kernel takes them).
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn path<'a>(p: *const c_char, arg: &str) -> CResult<&'a Path> {
    // SAFETY: forwarded from the caller.
    let s = unsafe { c_str(p, arg) }?;
    if s.is_empty() {
        return Err(Failure::new(
            libc::ENOENT,
            format!("'{arg}' is an empty string"),
        ));
    }
    Ok(Path::new(OsStr::from_bytes(s.to_bytes())))
}

/// Fail with `-EINVAL` if `flags` has bits outside `known`.
pub(crate) fn known_flags(flags: u32, known: u32, arg: &str) -> CResult<()> {
    let unknown = flags & !known;
    if unknown != 0 {
        return Err(Failure::invalid(format!(
            "invalid argument: unknown bits {unknown:#x} in '{arg}'"
        )));
    }
    Ok(())
}

/// Check the `struct_size` a caller put at the start of a versioned struct: it must cover
/// at least the first version of the struct (`min` bytes). Returns it.
///
/// # Safety
/// `p` is NULL or points to a readable, aligned `u32`.
pub(crate) unsafe fn struct_size(p: *const u32, arg: &str, min: usize) -> CResult<u32> {
    non_null(p, arg)?;
    // SAFETY: non-NULL checked above; the caller guarantees the struct is readable.
    let have = unsafe { p.read() };
    if (have as usize) < min {
        return Err(Failure::invalid(format!(
            "invalid argument: {arg}->struct_size is {have}, at least {min} is needed \
             (set it to sizeof the struct)"
        )));
    }
    Ok(have)
}

/// A byte count as the `int64_t` the I/O functions return.
pub(crate) fn byte_count(len: usize, arg: &str) -> CResult<i64> {
    i64::try_from(len).map_err(|_| {
        Failure::invalid(format!(
            "invalid argument: '{arg}' ({len}) exceeds INT64_MAX"
        ))
    })
}
