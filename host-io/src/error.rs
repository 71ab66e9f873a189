//! Error helpers: errno-carrying errors, range checks, and an error type adding context
//! (such as a path) without losing the errno.

use std::io;

/// An I/O error with a human-readable context (e.g. "Could not open '/dev/sdb'"). Wrapped
/// in an `io::Error` by [`with_context`]; use [`raw_os_error_of`] to get the errno back.
/// Displays as "context: description" with the C library's description of the errno
/// ([`error_text`]).
#[derive(Debug, thiserror::Error)]
#[error("{context}: {}", error_text(source))]
pub struct ContextError {
    /// What was being done.
    pub context: String,
    /// The underlying error, with its raw OS error intact.
    #[source]
    pub source: io::Error,
}

/// Wrap `err` with `context`, keeping its kind, and its errno reachable through
/// [`raw_os_error_of`].
pub fn with_context(err: io::Error, context: impl Into<String>) -> io::Error {
    let kind = err.kind();
    io::Error::new(
        kind,
        ContextError {
            context: context.into(),
            source: err,
        },
    )
}

/// The errno of `err`, looking through [`ContextError`] wrappers; a
/// [`LockConflict`](crate::LockConflict) is [`LOCK_CONFLICT_ERRNO`](crate::LOCK_CONFLICT_ERRNO).
/// Use this (not `io::Error::raw_os_error`) where errno must reach the C API.
pub fn raw_os_error_of(err: &io::Error) -> Option<i32> {
    if let Some(code) = err.raw_os_error() {
        return Some(code);
    }
    let inner = err.get_ref()?;
    if inner.is::<crate::LockConflict>() {
        return Some(crate::LOCK_CONFLICT_ERRNO);
    }
    inner
        .downcast_ref::<ContextError>()
        .and_then(|ctx| raw_os_error_of(&ctx.source))
}

/// `err` as a C library would word it: an OS error is the C library's `strerror` text
/// ("No such file or directory", without Rust's " (os error 2)"), a wrapped error its
/// context and then that text.
pub fn error_text(err: &io::Error) -> String {
    match (err.raw_os_error(), err.get_ref()) {
        (Some(code), _) => crate::sys::strerror(code),
        (None, Some(inner)) => inner.to_string(),
        (None, None) => err.to_string(),
    }
}

/// An `io::Error` carrying `errno`.
pub(crate) fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// `offset + len`, or `EINVAL` when it overflows `u64` or exceeds the largest file offset
/// (`i64::MAX`).
pub(crate) fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(end),
        _ => Err(errno(libc::EINVAL)),
    }
}

/// Length of a buffer as `u64` (lossless on every supported target).
pub(crate) fn len64(buf: &[u8]) -> u64 {
    buf.len() as u64
}
