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
    /// A named object (a persistent bitmap) does not exist; errno `ENOENT`.
    #[error("{0}")]
    NotFound(String),
    /// A named object (a persistent bitmap) already exists; errno `EEXIST`.
    #[error("{0}")]
    Exists(String),
    /// A name longer than the format allows; errno `ENAMETOOLONG`.
    #[error("{0}")]
    NameTooLong(String),
    /// No room for another object (too many bitmaps, a full bitmap directory); errno
    /// `ENOSPC`.
    #[error("{0}")]
    NoSpace(String),
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
            // host-io wraps errors with context; the errno underneath is what counts.
            Error::Io { source, .. } => host_io::raw_os_error_of(source).unwrap_or(libc_eio()),
            Error::Format(_) | Error::InvalidArgument(_) => 22, // EINVAL
            Error::Corrupt(_) => libc_eio(),
            Error::Unsupported(_) => 95, // ENOTSUP
            Error::ReadOnly(_) => 30,    // EROFS
            Error::TooLarge(_) => 27,    // EFBIG
            Error::InUse(_) => host_io::LOCK_CONFLICT_ERRNO,
            Error::NotFound(_) => 2,     // ENOENT
            Error::Exists(_) => 17,      // EEXIST
            Error::NameTooLong(_) => 36, // ENAMETOOLONG
            Error::NoSpace(_) => 28,     // ENOSPC
            Error::Failed(_) => libc_eio(),
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

const fn libc_eio() -> i32 {
    5
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
