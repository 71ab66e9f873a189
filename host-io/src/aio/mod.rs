//! Asynchronous host I/O: operations submitted with a tag and completed later, for an
//! executor that keeps many requests in flight from one thread.
//!
//! An [`AioBackend`] is owned by one thread (the executor's). It takes [`AioOp`]s — reads
//! into and writes from parts of one [`IoBuf`], write-zeroes, discards, flushes — each with
//! a `u64` tag, and hands back [`AioDone`]s from [`poll`](AioBackend::poll), which waits
//! for a completion or for a [`Notify`] from another thread. Two backends:
//!
//! * [`AioKind::IoUring`]: an io_uring instance (the `io-uring` crate) for reads and
//!   writes of a [`FileStorage`](crate::FileStorage), buffered or `O_DIRECT`; operations
//!   the kernel cannot take as they are (write-zeroes and discards with their probed
//!   fallback chains, flushes, which the storage counts, and direct I/O that is not
//!   aligned) go to a small internal thread pool that calls the [`Storage`] methods.
//! * [`AioKind::Threads`]: a thread pool over any [`Storage`] (also the in-memory, fault
//!   and crash backends), for systems that forbid io_uring (containers often do).
//!
//! [`io_uring_supported`] probes the kernel once per process; [`open_backend`] picks.

// Caller memory lent to the kernel (the C API's buffers): raw parts, Send/Sync.
#[allow(unsafe_code)]
mod buf;
// The eventfd(2), read(2) and write(2) calls on an eventfd.
#[allow(unsafe_code)]
mod eventfd;
mod pool;
// io_uring submissions: the kernel reads the submitted buffers until completion.
#[allow(unsafe_code)]
mod uring;

use std::fmt;
use std::io;
use std::sync::Arc;

pub use buf::IoBuf;
pub use eventfd::EventFd;

use crate::storage::{Storage, ZeroMode};

/// Which asynchronous backend carries out host I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AioKind {
    /// io_uring.
    IoUring,
    /// A thread pool calling the storage's synchronous methods.
    Threads,
}

impl fmt::Display for AioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AioKind::IoUring => "io_uring",
            AioKind::Threads => "threads",
        })
    }
}

/// A part of a read or write: `len` bytes at byte `at` of the buffer, from or to host
/// offset `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Position in the buffer.
    pub at: usize,
    /// Host byte offset.
    pub off: u64,
    /// Length in bytes.
    pub len: usize,
}

/// An asynchronous operation. The pieces of one read or write run concurrently; the
/// operation completes when all did (with the first error, if any).
#[derive(Debug)]
pub enum AioOp {
    /// Fill the pieces of `buf` from the host (past the end of the storage: zeros). The
    /// pieces must lie inside `buf` and not overlap (else the operation fails with
    /// `EINVAL`). `buf` comes back in the completion.
    Read {
        /// Where the bytes go.
        buf: IoBuf,
        /// What to read.
        pieces: Vec<Piece>,
    },
    /// Write the pieces of `buf` to the host.
    Write {
        /// Where the bytes come from (shared: several writes may send parts of it).
        buf: Arc<IoBuf>,
        /// What to write.
        pieces: Vec<Piece>,
    },
    /// [`Storage::write_zeroes`].
    WriteZeroes {
        /// Host offset.
        off: u64,
        /// Length.
        len: u64,
        /// Whether the range may be released.
        mode: ZeroMode,
    },
    /// [`Storage::discard`] (advisory).
    Discard {
        /// Host offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// [`Storage::flush`].
    Flush,
}

impl AioOp {
    /// Check a read's or write's pieces against the buffer: inside it, and (for reads)
    /// not overlapping, so that concurrent kernel or worker writes never meet.
    pub(crate) fn validate(&self) -> io::Result<()> {
        let (len, pieces, disjoint) = match self {
            AioOp::Read { buf, pieces } => (buf.len(), pieces, true),
            AioOp::Write { buf, pieces } => (buf.len(), pieces, false),
            _ => return Ok(()),
        };
        let bad = || io::Error::from_raw_os_error(libc::EINVAL);
        for p in pieces {
            if p.at.checked_add(p.len).is_none_or(|e| e > len)
                || p.off.checked_add(p.len as u64).is_none()
            {
                return Err(bad());
            }
        }
        if disjoint && pieces.len() > 1 {
            let mut v: Vec<(usize, usize)> = pieces.iter().map(|p| (p.at, p.at + p.len)).collect();
            v.sort_unstable();
            if v.windows(2).any(|w| w[0].1 > w[1].0) {
                return Err(bad());
            }
        }
        Ok(())
    }
}

/// A completed operation.
#[derive(Debug)]
pub struct AioDone {
    /// The tag it was submitted with.
    pub user: u64,
    /// Its result (the first error of its pieces).
    pub result: io::Result<()>,
    /// A read's buffer, filled.
    pub buf: Option<IoBuf>,
}

/// Wakes the thread that owns a backend out of [`AioBackend::poll`].
pub trait Notify: Send + Sync {
    /// Wake the owner (a wake with nobody waiting makes the next wait return at once).
    fn notify(&self);
}

/// An asynchronous backend, owned and driven by one thread. Dropping it waits for the
/// operations in flight (their memory must outlive them).
pub trait AioBackend: Send {
    /// Which backend this is.
    fn kind(&self) -> AioKind;

    /// Queue an operation (it starts at the latest in the next `poll`). Invalid operations
    /// complete with an error; submission itself never fails.
    fn submit(&mut self, user: u64, op: AioOp);

    /// Start queued operations and move completed ones into `out`. With `wait`, block until
    /// at least one operation completed or [`Notify::notify`] was called.
    fn poll(&mut self, wait: bool, out: &mut Vec<AioDone>) -> io::Result<()>;

    /// What other threads call to wake the owner.
    fn notifier(&self) -> Arc<dyn Notify>;

    /// Operations submitted and not yet handed back.
    fn in_flight(&self) -> usize;
}

/// Whether this kernel lets this process use io_uring (probed once: a ring is set up and
/// the read/write opcodes are checked; `kernel.io_uring_disabled` and seccomp filters in
/// containers make this false).
pub fn io_uring_supported() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(uring::probe)
}

/// A backend of `kind` over `storage`. io_uring needs a [`FileStorage`](crate::FileStorage)
/// underneath ([`Storage::as_file`]) and a kernel that allows it: otherwise `ENOTSUP`.
/// `max_threads` bounds the thread pool (of the `Threads` backend; io_uring's own helper
/// pool for write-zeroes, discards and flushes is smaller).
pub fn open_backend(
    kind: AioKind,
    storage: Arc<dyn Storage>,
    max_threads: usize,
) -> io::Result<Box<dyn AioBackend>> {
    match kind {
        AioKind::Threads => Ok(Box::new(pool::PoolBackend::new(
            storage,
            max_threads.max(1),
        ))),
        AioKind::IoUring => {
            if storage.as_file().is_none() || !io_uring_supported() {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            Ok(Box::new(uring::UringBackend::new(storage, 256)?))
        }
    }
}

// The tests lend stack memory to an IoBuf, as the C API does.
#[cfg(test)]
#[allow(unsafe_code)]
mod tests;
