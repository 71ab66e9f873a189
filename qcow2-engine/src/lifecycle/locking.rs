//! Image locks at open (QEMU's protocol, implemented in host-io's `lock.rs`): which lock
//! request an open takes on the image file and on its backing files, and how a refusal
//! reads.
//!
//! As QEMU: a read/write open takes what a writer takes, a read-only open what a reader
//! takes, a force-share open (`force-share=on`, qemu-img's `-U`, read-only only) shares
//! everything, and backing files are locked as read-only opens (force-share passes down).
//! `locking=off` (or `file.locking=off`) takes and tests nothing.

use std::io;

use host_io::{FileOptions, LockConflict, LockRequest};

use crate::error::{invalid_arg, Error, Result};
use crate::image::OpenOptions;

/// Refuse option combinations QEMU refuses.
pub(crate) fn validate(opts: &OpenOptions) -> Result<()> {
    if opts.force_share && !opts.read_only {
        return Err(invalid_arg!(
            "force-share=on can only be used with read-only images"
        ));
    }
    Ok(())
}

/// The lock an open of the image (or, with `backing`, of one of its backing files) takes.
pub(crate) fn request(opts: &OpenOptions, backing: bool) -> LockRequest {
    if !(opts.read_only || backing) {
        LockRequest::WRITER
    } else if opts.force_share {
        LockRequest::SHARING_READER
    } else {
        LockRequest::READER
    }
}

/// The host-io options of the image file (or of a backing file, always read-only).
pub(crate) fn file_options(opts: &OpenOptions, backing: bool) -> FileOptions {
    FileOptions::new()
        .read_only(opts.read_only || backing)
        .direct(opts.direct)
        .lock(Some(request(opts, backing)))
        .locking(opts.locking)
}

/// An open failure of an image file. A lock conflict becomes [`Error::InUse`], naming the
/// image, the permission and the way out; `what` prefixes the message ("Could not open
/// backing file").
pub(crate) fn open_error(e: io::Error, what: Option<&str>) -> Error {
    let prefix = what.map(|w| format!("{w}: ")).unwrap_or_default();
    if LockConflict::of(&e).is_some() {
        return Error::InUse(format!(
            "{prefix}{}. Is another process, or another handle in this process, using \
             the image? A read-only open with force-share=on (-U) can look at it anyway",
            host_io::error_text(&e)
        ));
    }
    Error::Io {
        context: what.unwrap_or_default().to_string(),
        source: e,
    }
}
