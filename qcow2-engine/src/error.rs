//! Engine errors. Each carries a message for humans and maps to the errno a C caller sees.

use std::io;

use qcow2_format::FormatError;
use thiserror::Error;

/// Anything the engine can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// The host storage failed; `context` says what the engine was doing (empty when the
    /// host error already says it, e.g. "Could not open 'PATH': ..."). Worded as a C
    /// library would: the errno's `strerror` text, no " (os error N)".
    #[error("{}", io_text(context, source))]
    Io {
        /// What was being done.
        context: String,
        /// The host error (its errno is preserved).
        #[source]
        source: io::Error,
    },
    /// The image's structures are invalid.
    #[error("invalid image: {0}")]
    Format(#[from] FormatError),
    /// The image is inconsistent in a way found during I/O (it gets the corrupt bit).
    #[error("image is corrupt: {0}; repair it with 'qemu-img check -r all'")]
    Corrupt(String),
    /// A feature this library does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A bad argument: option, range, alignment.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A write on a read-only image.
    #[error("image is read-only: {0}")]
    ReadOnly(String),
    /// A limit of the format was hit (L1 or refcount table size, refcount width).
    #[error("too large: {0}")]
    TooLarge(String),
    /// The image is in use: another process or handle holds an image lock that conflicts
    /// with this open (QEMU's image locking). The message names the image, the
    /// permission and the way out; errno `EBUSY`.
    #[error("{0}")]
    InUse(String),
    /// The handle failed earlier (an internal error interrupted a metadata update); it
    /// refuses all I/O.
    #[error("image handle failed: {0}")]
    Failed(String),
}

/// "context: text" (just the text without a context), with the C library's errno text.
fn io_text(context: &str, source: &io::Error) -> String {
    let text = host_io::error_text(source);
    if context.is_empty() {
        text
    } else {
        format!("{context}: {text}")
    }
}

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The negative-errno class of this error, as the C API reports it (positive value).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => host_errno(source),
            Error::Format(_) | Error::InvalidArgument(_) => libc::EINVAL,
            Error::Corrupt(_) | Error::Failed(_) => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::ReadOnly(_) => libc::EROFS,
            Error::TooLarge(_) => libc::EFBIG,
            Error::InUse(_) => host_io::LOCK_CONFLICT_ERRNO,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// As [`Error::io`], formatting the context only if there is an error: on hot paths
    /// an eager `format!` costs more than the rest of a cached 4 KiB read.
    pub(crate) fn io_lazy(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io {
            context: context(),
            source,
        }
    }
}

/// The errno of a host error: its raw OS error, looking through host-io's context
/// wrappers, else the errno its kind stands for, else EIO. The one errno table of the
/// library: the C API reports what this says.
fn host_errno(e: &io::Error) -> i32 {
    use io::ErrorKind as K;
    if let Some(code) = host_io::raw_os_error_of(e) {
        return code;
    }
    match e.kind() {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::AlreadyExists => libc::EEXIST,
        K::InvalidInput => libc::EINVAL,
        K::OutOfMemory => libc::ENOMEM,
        K::Unsupported => libc::ENOTSUP,
        K::Interrupted => libc::EINTR,
        K::WouldBlock => libc::EAGAIN,
        K::TimedOut => libc::ETIMEDOUT,
        _ => libc::EIO,
    }
}

/// Shorthand for `Error::InvalidArgument(format!(..))`.
macro_rules! invalid_arg {
    ($($t:tt)*) => { $crate::error::Error::InvalidArgument(format!($($t)*)) };
}
pub(crate) use invalid_arg;

/// Shorthand for `Error::Corrupt(format!(..))`.
macro_rules! corrupt {
    ($($t:tt)*) => { $crate::error::Error::Corrupt(format!($($t)*)) };
}
pub(crate) use corrupt;
