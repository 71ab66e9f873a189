//! Errors as C sees them: a negative errno return plus a thread-local message, and
//! `qcowprov_strerror` / `qcowprov_last_error`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};

/// A failed call: the (positive) errno and the message for `qcowprov_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Positive errno; the export returns its negation.
    pub(crate) errno: c_int,
    /// Human-readable message.
    pub(crate) message: String,
}

impl Failure {
    /// A failure with an explicit errno.
    pub(crate) fn new(errno: c_int, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }

    /// `-EINVAL` with a message.
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(libc::EINVAL, message)
    }

    /// `-EINVAL` for a NULL pointer argument (out of line: callers only test for NULL).
    #[cold]
    #[inline(never)]
    pub(crate) fn null(arg: &str) -> Failure {
        Failure::invalid(format!("invalid argument: '{arg}' is NULL"))
    }
}

impl From<qcow2_engine::Error> for Failure {
    fn from(e: qcow2_engine::Error) -> Failure {
        // The engine owns the errno table (host errors included).
        let errno = e.errno();
        Failure::new(if errno > 0 { errno } else { libc::EIO }, e.to_string())
    }
}

/// Result of the Rust side of an export.
pub(crate) type CResult<T> = Result<T, Failure>;

thread_local! {
    /// The message of the last failure on this thread; "" until the first one.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Record `message` as this thread's last error.
pub(crate) fn set_last_error(message: &str) {
    // Interior NULs would truncate the C string; show them instead.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // The thread-local may already be gone while the thread exits; nothing to record then.
    let _ = LAST_ERROR.try_with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            *slot = c;
        }
    });
}

/// Returns the message of the most recent failed call made on the calling thread.
///
/// Thread-safety: thread-safe; each thread has its own message.
///
/// Returns a NUL-terminated string owned by the library, never NULL: "" if no call has
/// failed on this thread yet. The pointer stays valid until the next failing call on the
/// same thread (successful calls leave the message in place). Do not free it.
#[no_mangle]
pub extern "C" fn qcowprov_last_error() -> *const c_char {
    let empty: *const c_char = c"".as_ptr();
    std::panic::catch_unwind(|| {
        LAST_ERROR
            .try_with(|cell| cell.try_borrow().map(|s| s.as_ptr()).unwrap_or(empty))
            .unwrap_or(empty)
    })
    .unwrap_or(empty)
}

/// Returns a static description of an errno value.
///
/// `code` may be negative (as returned by the library's functions) or positive (as in
/// `errno`); 0 gives "success". Unknown codes give "unknown error".
///
/// Thread-safety: thread-safe.
///
/// Returns a NUL-terminated static string, never NULL. Do not free it.
#[no_mangle]
pub extern "C" fn qcowprov_strerror(code: c_int) -> *const c_char {
    let unknown: *const c_char = c"unknown error".as_ptr();
    std::panic::catch_unwind(|| describe(code).as_ptr()).unwrap_or(unknown)
}

/// The static description of `code` (either sign).
fn describe(code: c_int) -> &'static std::ffi::CStr {
    let Ok(code) = c_int::try_from(code.unsigned_abs()) else {
        return c"unknown error";
    };
    match code {
        0 => c"success",
        libc::EPERM => c"operation not permitted",
        libc::ENOENT => c"no such file or directory",
        libc::EINTR => c"interrupted system call",
        libc::EIO => c"input/output error",
        libc::ENXIO => c"no such device or address",
        libc::E2BIG => c"argument list too long",
        libc::EBADF => c"bad file descriptor",
        libc::EAGAIN => c"resource temporarily unavailable",
        libc::ENOMEM => c"cannot allocate memory",
        libc::EACCES => c"permission denied",
        libc::EFAULT => c"bad address",
        libc::EBUSY => c"device or resource busy",
        libc::EEXIST => c"file exists",
        libc::EXDEV => c"invalid cross-device link",
        libc::ENODEV => c"no such device",
        libc::ENOTDIR => c"not a directory",
        libc::EISDIR => c"is a directory",
        libc::EINVAL => c"invalid argument",
        libc::ENFILE => c"too many open files in system",
        libc::EMFILE => c"too many open files",
        libc::ETXTBSY => c"text file busy",
        libc::EFBIG => c"file too large",
        libc::ENOSPC => c"no space left on device",
        libc::ESPIPE => c"illegal seek",
        libc::EROFS => c"read-only file system",
        libc::EMLINK => c"too many links",
        libc::ERANGE => c"numerical result out of range",
        libc::EDEADLK => c"resource deadlock avoided",
        libc::ENAMETOOLONG => c"file name too long",
        libc::ENOLCK => c"no locks available",
        libc::ENOSYS => c"function not implemented",
        libc::ELOOP => c"too many levels of symbolic links",
        libc::EOVERFLOW => c"value too large for defined data type",
        libc::ENOTSUP => c"operation not supported",
        libc::ETIMEDOUT => c"connection timed out",
        libc::ESTALE => c"stale file handle",
        libc::EDQUOT => c"disk quota exceeded",
        libc::ECANCELED => c"operation canceled",
        _ => c"unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn s(p: *const c_char) -> String {
        // SAFETY: both functions return NUL-terminated strings that live long enough.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    #[test]
    fn both_signs_and_unknown() {
        assert_eq!(s(qcowprov_strerror(-libc::EINVAL)), "invalid argument");
        assert_eq!(s(qcowprov_strerror(libc::EINVAL)), "invalid argument");
        assert_eq!(s(qcowprov_strerror(0)), "success");
        assert_eq!(s(qcowprov_strerror(c_int::MIN)), "unknown error");
        assert_eq!(s(qcowprov_strerror(100_000)), "unknown error");
    }

    #[test]
    fn last_error_is_per_thread() {
        set_last_error("boom\0x");
        assert_eq!(s(qcowprov_last_error()), "boom\\0x");
        std::thread::spawn(|| assert_eq!(s(qcowprov_last_error()), ""))
            .join()
            .unwrap();
    }
}
