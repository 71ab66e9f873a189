//! The panic boundary every export goes through: a panic never unwinds into C, it becomes
//! `-EIO` with the message "internal error: <panic message>".

use std::any::Any;
use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{set_last_error, CResult, Failure};

/// A return type that can carry a negative errno.
pub(crate) trait Ret: Copy {
    /// The return value for the positive errno `e`.
    fn from_errno(e: c_int) -> Self;
}

impl Ret for c_int {
    fn from_errno(e: c_int) -> Self {
        -e
    }
}

impl Ret for i64 {
    fn from_errno(e: c_int) -> Self {
        -i64::from(e)
    }
}

/// Run the Rust side of an export: its value on success; on failure (or a panic) the
/// negative errno, with the message recorded for `qcowprov_last_error`.
pub(crate) fn guard<T: Ret>(f: impl FnOnce() -> CResult<T>) -> T {
    // Unwind safety: after a panic the handle is still usable as far as memory safety
    // goes (the engine recovers poisoned locks); the caller gets -EIO and decides.
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return v,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(
            libc::EIO,
            format!("internal error: {}", panic_message(payload.as_ref())),
        ),
    };
    // Recording the message must not unwind into C either.
    let _ = catch_unwind(|| set_last_error(&failure.message));
    T::from_errno(if failure.errno > 0 {
        failure.errno
    } else {
        libc::EIO
    })
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "panic with a non-string payload"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: qcowprov_last_error returns a NUL-terminated string valid until the next
        // failing call on this thread.
        unsafe { CStr::from_ptr(crate::error::qcowprov_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn panics_become_eio() {
        let r: c_int = guard(|| panic!("boom {}", 7));
        assert_eq!(r, -libc::EIO);
        assert_eq!(last(), "internal error: boom 7");
        let r: i64 = guard(|| std::panic::panic_any(42u8));
        assert_eq!(r, -i64::from(libc::EIO));
        assert_eq!(last(), "internal error: panic with a non-string payload");
    }

    #[test]
    fn failures_and_successes() {
        let r: c_int = guard(|| Err(Failure::new(libc::ENOSPC, "full")));
        assert_eq!(r, -libc::ENOSPC);
        assert_eq!(last(), "full");
        let r: i64 = guard(|| Ok(5));
        assert_eq!(r, 5);
        assert_eq!(last(), "full", "success leaves the message");
        let r: c_int = guard(|| Err(Failure::new(0, "no errno")));
        assert_eq!(r, -libc::EIO);
    }
}
