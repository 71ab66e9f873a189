//! `CrashStorage`: a recording backend that can rebuild "the disk after a crash at op N".
//!
//! Crash model: a `flush` is a barrier. A crash just before operation `n` (0-based, counting
//! every recorded operation including flushes) keeps everything issued before the last
//! flush that precedes `n`; the operations between that flush and `n` were in a volatile
//! cache and survive according to a [`CrashPolicy`]. Reads are not recorded. Operations
//! that failed on the live image are not recorded either.

use std::io;
use std::sync::{Mutex, MutexGuard};

use crate::error::{errno, len64};
use crate::mem::{MemOptions, MemStorage};
use crate::op::OpKind;
use crate::prng::SplitMix64;
use crate::storage::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};

/// Sector size at which a torn write is cut.
pub const TORN_SECTOR: u64 = 512;

/// What happens to the unflushed operations before the crash point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPolicy {
    /// None of them reached the disk.
    DropUnflushed,
    /// All of them reached the disk, in order.
    KeepUnflushed,
    /// A seeded random subset reached the disk (applied in issue order): models a cache
    /// that wrote back some writes and not others.
    RandomSubset {
        /// PRNG seed; the same seed picks the same subset.
        seed: u64,
    },
    /// All of them reached the disk except the last unflushed write, of which only a seeded
    /// prefix ending on a [`TORN_SECTOR`] boundary (possibly empty, never all of it) did.
    TornLastWrite {
        /// PRNG seed choosing the cut.
        seed: u64,
    },
}

/// One recorded operation. For `SetLen`, `offset` is the new length and `len` is 0; for
/// `Flush` both are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpRecord {
    /// Position in the log (0-based); the crash point `n` means "before this op".
    pub seq: u64,
    /// Kind of operation (never `Read`).
    pub kind: OpKind,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

#[derive(Debug, Clone)]
enum Payload {
    Write(Vec<u8>),
    Discard,
    Zero(ZeroMode),
    SetLen,
    Allocate,
    Flush,
}

#[derive(Debug, Clone)]
struct Logged {
    rec: OpRecord,
    payload: Payload,
}

impl Logged {
    /// Replay onto `img`, optionally only the first `limit` bytes of a write.
    fn apply(&self, img: &MemStorage, limit: Option<u64>) -> io::Result<()> {
        let r = &self.rec;
        match &self.payload {
            Payload::Write(data) => {
                let keep = limit.unwrap_or(len64(data)).min(len64(data)) as usize;
                img.write_at(&data[..keep], r.offset)
            }
            Payload::Discard => img.discard(r.offset, r.len).map(|_| ()),
            Payload::Zero(mode) => img.write_zeroes(r.offset, r.len, *mode).map(|_| ()),
            Payload::SetLen => img.set_len(r.offset),
            Payload::Allocate => img.allocate(r.offset, r.len),
            Payload::Flush => Ok(()),
        }
    }
}

/// A [`Storage`] on an in-memory image that records every mutation and flush, and can
/// produce the image as it would be after a crash at any point.
#[derive(Debug)]
pub struct CrashStorage {
    initial: MemStorage,
    live: MemStorage,
    log: Mutex<Vec<Logged>>,
}

impl CrashStorage {
    /// Record on top of a file-like image holding `initial`.
    pub fn new(initial: Vec<u8>) -> Self {
        Self::from_mem(MemStorage::from_vec(initial))
    }

    /// Record on top of an image holding `initial` with the given behaviour.
    pub fn with_options(initial: Vec<u8>, opts: MemOptions) -> Self {
        Self::from_mem(MemStorage::from_vec_with(initial, opts))
    }

    /// Record on top of `initial` (its content, allocation and options).
    pub fn from_mem(initial: MemStorage) -> Self {
        Self {
            live: initial.snapshot(),
            initial,
            log: Mutex::new(Vec::new()),
        }
    }

    /// Number of recorded operations (flushes included). Valid crash points are
    /// `0..=op_count()`.
    pub fn op_count(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Every recorded operation, in order.
    pub fn ops(&self) -> Vec<OpRecord> {
        self.lock().iter().map(|l| l.rec).collect()
    }

    /// The image as it is now (every operation applied, nothing lost).
    pub fn live(&self) -> &MemStorage {
        &self.live
    }

    /// The image after a crash just before operation `n` under `policy`. Fails with `EINVAL`
    /// if `n > op_count()`.
    pub fn crash_image(&self, n: u64, policy: CrashPolicy) -> io::Result<MemStorage> {
        let log = self.lock();
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= log.len())
            .ok_or_else(|| errno(libc::EINVAL))?;
        let ops = &log[..n];
        let barrier = ops.iter().rposition(|o| o.rec.kind == OpKind::Flush);
        let (durable, unflushed) = match barrier {
            Some(i) => (&ops[..i], &ops[i + 1..]),
            None => (&ops[..0], ops),
        };
        let img = self.initial.snapshot();
        for op in durable {
            op.apply(&img, None)?;
        }
        match policy {
            CrashPolicy::DropUnflushed => {}
            CrashPolicy::KeepUnflushed => {
                for op in unflushed {
                    op.apply(&img, None)?;
                }
            }
            CrashPolicy::RandomSubset { seed } => {
                let mut rng = SplitMix64::new(seed);
                for op in unflushed {
                    if rng.coin() {
                        op.apply(&img, None)?;
                    }
                }
            }
            CrashPolicy::TornLastWrite { seed } => {
                let torn = unflushed.iter().rposition(|o| o.rec.kind == OpKind::Write);
                let mut rng = SplitMix64::new(seed);
                for (i, op) in unflushed.iter().enumerate() {
                    if Some(i) == torn {
                        op.apply(&img, Some(torn_prefix(&op.rec, &mut rng)))?;
                    } else {
                        op.apply(&img, None)?;
                    }
                }
            }
        }
        Ok(img)
    }

    /// [`CrashStorage::crash_image`] as bytes.
    pub fn crash_bytes(&self, n: u64, policy: CrashPolicy) -> io::Result<Vec<u8>> {
        Ok(self.crash_image(n, policy)?.to_vec())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Logged>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `op` on the live image and, if it succeeds, record it (under the log lock, so the
    /// log order is the order the live image saw).
    fn record<T>(
        &self,
        kind: OpKind,
        offset: u64,
        len: u64,
        payload: Payload,
        op: impl FnOnce(&MemStorage) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut log = self.lock();
        let out = op(&self.live)?;
        let seq = log.len() as u64;
        log.push(Logged {
            rec: OpRecord {
                seq,
                kind,
                offset,
                len,
            },
            payload,
        });
        Ok(out)
    }
}

/// Bytes of a torn write that reach the disk: a cut at `offset` or at a sector boundary
/// strictly inside the write, chosen uniformly.
fn torn_prefix(rec: &OpRecord, rng: &mut SplitMix64) -> u64 {
    let end = rec.offset + rec.len;
    let first = (rec.offset / TORN_SECTOR + 1) * TORN_SECTOR;
    let inside = if first >= end {
        0
    } else {
        (end - 1 - first) / TORN_SECTOR + 1
    };
    match rng.below(inside + 1) {
        0 => 0,
        k => first + (k - 1) * TORN_SECTOR - rec.offset,
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(
            OpKind::Write,
            offset,
            len64(buf),
            Payload::Write(buf.to_vec()),
            |s| s.write_at(buf, offset),
        )
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_at(&bufs.concat(), offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.record(OpKind::Flush, 0, 0, Payload::Flush, |s| s.flush())
    }

    fn len(&self) -> io::Result<u64> {
        self.live.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(OpKind::SetLen, len, 0, Payload::SetLen, |s| s.set_len(len))
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(OpKind::Allocate, offset, len, Payload::Allocate, |s| {
            s.allocate(offset, len)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        self.record(OpKind::Discard, offset, len, Payload::Discard, |s| {
            s.discard(offset, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        self.record(OpKind::WriteZeroes, offset, len, Payload::Zero(mode), |s| {
            s.write_zeroes(offset, len, mode)
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.live.capabilities()
    }

    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.live.data_run(offset, len)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.live.allocated_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_prefix_is_sector_aligned_and_never_whole() {
        let mut rng = SplitMix64::new(1);
        for (offset, len) in [
            (0u64, 4096u64),
            (100, 2000),
            (512, 512),
            (10, 5),
            (0, 1 << 20),
        ] {
            let rec = OpRecord {
                seq: 0,
                kind: OpKind::Write,
                offset,
                len,
            };
            let mut seen_nonzero = false;
            for _ in 0..200 {
                let p = torn_prefix(&rec, &mut rng);
                assert!(p < len, "prefix {p} of write {offset}+{len}");
                assert!(p == 0 || (offset + p) % TORN_SECTOR == 0);
                seen_nonzero |= p > 0;
            }
            let has_inner_boundary = (offset / 512 + 1) * 512 < offset + len;
            assert_eq!(seen_nonzero, has_inner_boundary, "{offset}+{len}");
        }
    }
}
