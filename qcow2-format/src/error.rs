//! The one error type of the format crate: every validation failure names the field, the
//! value found and what was expected.

use thiserror::Error;

/// A structure failed to parse or validate, or a value cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The input buffer ends before the structure does.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image: magic is {found:#010x}, expected 0x514649fb")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {found} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// A field holds a value the format or QEMU does not allow.
    #[error("invalid {field}: {value:#x} ({expected})")]
    InvalidField {
        /// The field's name, as in the specification.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What was expected instead.
        expected: String,
    },
    /// A field exceeds a limit QEMU enforces (named in `limit`).
    #[error("{field} too large: {value} > {max} ({limit})")]
    LimitExceeded {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// The largest value allowed.
        max: u64,
        /// The limit, as QEMU names it.
        limit: &'static str,
    },
    /// Reserved bits are set in a table entry.
    #[error("{what} {value:#018x} has reserved bits set ({mask:#018x})")]
    ReservedBits {
        /// The kind of entry.
        what: &'static str,
        /// The raw entry.
        value: u64,
        /// The reserved bits that are set.
        mask: u64,
    },
    /// An offset that must be aligned is not.
    #[error("{what} offset {offset:#x} is not aligned to {align} bytes")]
    Unaligned {
        /// What the offset points at.
        what: &'static str,
        /// The offset found.
        offset: u64,
        /// The required alignment.
        align: u64,
    },
    /// A header extension is malformed.
    #[error("header extension {magic:#010x} at byte {at}: {reason}")]
    BadExtension {
        /// The extension's magic.
        magic: u32,
        /// Its byte position in cluster 0.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// A refcount would exceed the width's maximum.
    #[error("refcount overflow: {value} does not fit in {bits} bits")]
    RefcountOverflow {
        /// The value that does not fit.
        value: u64,
        /// The refcount width.
        bits: u32,
    },
    /// A snapshot table entry is malformed.
    #[error("snapshot table entry {index} at byte {at}: {reason}")]
    BadSnapshot {
        /// The entry's index.
        index: usize,
        /// Its byte offset inside the table.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// A bitmap directory entry is malformed.
    #[error("bitmap directory entry {index} at byte {at}: {reason}")]
    BadBitmap {
        /// The entry's index.
        index: usize,
        /// Its byte offset inside the directory.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// An extended L2 bitmap is invalid for its entry.
    #[error("invalid extended L2 bitmap {bitmap:#018x} for entry {entry:#018x}: {reason}")]
    BadSubclusterBitmap {
        /// The L2 entry's first word.
        entry: u64,
        /// The bitmap word.
        bitmap: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A value does not fit in the field it would be written to.
    #[error("cannot encode {what}: {reason}")]
    Unencodable {
        /// What was being encoded.
        what: &'static str,
        /// Why it does not fit.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &'static str, value: u64, expected: impl Into<String>) -> FormatError {
    FormatError::InvalidField {
        field,
        value,
        expected: expected.into(),
    }
}
