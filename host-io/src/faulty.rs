//! `FaultyStorage`: a wrapper that injects errno failures, `ENOSPC` limits and short writes
//! into any [`Storage`], and counts operations so tests can fail at every position.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{end_of, errno, len64};
use crate::op::OpKind;
use crate::storage::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};

/// One fault rule. Operation indices are 0-based per kind: `n == 0` is the first operation
/// of that kind since the counters were last reset. Every attempted operation counts,
/// including those that fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail the `n`-th operation of kind `op` with `errno`; the inner storage is untouched.
    FailNth {
        /// Which operations.
        op: OpKind,
        /// Index of the failing operation.
        n: u64,
        /// The errno returned (e.g. `libc::EIO`).
        errno: i32,
    },
    /// Fail the `n`-th and every later operation of kind `op` (a device that went away).
    FailFrom {
        /// Which operations.
        op: OpKind,
        /// Index of the first failing operation.
        n: u64,
        /// The errno returned.
        errno: i32,
    },
    /// Writes, zeroing, allocation and growth whose end lies beyond `limit` bytes fail with
    /// `ENOSPC` (a full disk).
    NoSpaceBeyond {
        /// First byte offset that cannot be stored.
        limit: u64,
    },
    /// The `n`-th write stores only its first `keep` bytes, then fails with `errno`.
    ShortWrite {
        /// Index of the torn write.
        n: u64,
        /// Bytes that reach the inner storage.
        keep: usize,
        /// The errno returned.
        errno: i32,
    },
}

/// A [`Storage`] wrapper failing operations on command. Vectored writes are gathered and
/// count as one write.
#[derive(Debug)]
pub struct FaultyStorage<S: Storage> {
    inner: S,
    faults: Mutex<Vec<Fault>>,
    counters: [AtomicU64; OpKind::ALL.len()],
}

impl<S: Storage> FaultyStorage<S> {
    /// Wrap `inner` with no faults.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Mutex::new(Vec::new()),
            counters: Default::default(),
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwrap.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Add a rule.
    pub fn add_fault(&self, fault: Fault) {
        self.rules().push(fault);
    }

    /// Remove every rule.
    pub fn clear_faults(&self) {
        self.rules().clear();
    }

    /// How many operations of `kind` were attempted since the last reset.
    pub fn count(&self, kind: OpKind) -> u64 {
        self.counters[kind.index()].load(Ordering::SeqCst)
    }

    /// Set every counter back to zero.
    pub fn reset_counters(&self) {
        for c in &self.counters {
            c.store(0, Ordering::SeqCst);
        }
    }

    fn rules(&self) -> MutexGuard<'_, Vec<Fault>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one `kind` operation touching up to `end` (None: does not store bytes) and
    /// decide its fate: `Err` to fail it outright, `Ok(Some((keep, errno)))` for a short
    /// write, `Ok(None)` to pass it through.
    fn check(&self, kind: OpKind, end: Option<u64>) -> io::Result<Option<(usize, i32)>> {
        let idx = self.counters[kind.index()].fetch_add(1, Ordering::SeqCst);
        let mut short = None;
        for f in self.rules().iter() {
            match *f {
                Fault::FailNth { op, n, errno: e } if op == kind && n == idx => {
                    return Err(errno(e))
                }
                Fault::FailFrom { op, n, errno: e } if op == kind && idx >= n => {
                    return Err(errno(e))
                }
                Fault::NoSpaceBeyond { limit } if end.is_some_and(|end| end > limit) => {
                    return Err(errno(libc::ENOSPC))
                }
                Fault::ShortWrite { n, keep, errno: e } if kind == OpKind::Write && n == idx => {
                    short = Some((keep, e));
                }
                _ => {}
            }
        }
        Ok(short)
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(OpKind::Read, None)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, len64(buf))?;
        if let Some((keep, e)) = self.check(OpKind::Write, Some(end))? {
            let keep = keep.min(buf.len());
            self.inner.write_at(&buf[..keep], offset)?;
            return Err(errno(e));
        }
        self.inner.write_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        self.check(OpKind::Read, None)?;
        self.inner.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_at(&bufs.concat(), offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.check(OpKind::Flush, None)?;
        self.inner.flush()
    }

    fn flush_count(&self) -> u64 {
        self.inner.flush_count()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Shrinking never needs space.
        let grows = len > self.inner.len()?;
        self.check(OpKind::SetLen, grows.then_some(len))?;
        self.inner.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(OpKind::Allocate, Some(end_of(offset, len)?))?;
        self.inner.allocate(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        self.check(OpKind::Discard, None)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        self.check(OpKind::WriteZeroes, Some(end_of(offset, len)?))?;
        self.inner.write_zeroes(offset, len, mode)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.data_run(offset, len)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
}
