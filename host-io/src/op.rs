//! `OpKind`: the kinds of storage operations, shared by fault injection and crash recording.

/// One kind of [`Storage`](crate::Storage) operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// `read_at` / `read_vectored_at`.
    Read,
    /// `write_at` / `write_vectored_at`.
    Write,
    /// `flush`.
    Flush,
    /// `discard`.
    Discard,
    /// `write_zeroes`.
    WriteZeroes,
    /// `set_len`.
    SetLen,
    /// `allocate`.
    Allocate,
}

impl OpKind {
    /// Every kind, in declaration order.
    pub const ALL: [OpKind; 7] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::SetLen,
        OpKind::Allocate,
    ];

    /// Position in [`OpKind::ALL`], for per-kind counters (the fault backend's).
    #[cfg(feature = "testing")]
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}
