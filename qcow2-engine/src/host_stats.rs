//! Counts of the host requests an open image issues that change durability or allocation
//! (flush, discard, write-zeroes), so a caller can see what a provisioning policy costs
//! without tracing system calls.
//!
//! The counting sits in a [`Storage`] wrapper under the image's metadata (`Meta`), which
//! issues every flush, discard and write-zeroes of an open image (data writes reach a
//! flush through it too). Guest data reads and writes use the unwrapped storage, so the
//! data path pays nothing: wrapping it cost 9 instructions per cached 4 KiB read (905 vs
//! 896, callgrind). Reads, writes and queries through the wrapper are forwarded uncounted.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use host_io::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};

use crate::image::Image;

/// Host requests an open image has issued since it was opened. Each request counts once
/// as the engine issued it (merged ranges are one request), whether or not the host
/// carried it out: an unsupported or failed discard still counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Flushes (fdatasync on files, a cache flush on block devices).
    pub flushes: u64,
    /// Discards (punch hole on files, BLKDISCARD on block devices).
    pub discards: u64,
    /// Bytes covered by those discards.
    pub discard_bytes: u64,
    /// Write-zeroes requests (anchoring: zero the range and keep it allocated, or zero it
    /// and let the host release it).
    pub zeroes: u64,
    /// Bytes covered by those write-zeroes requests.
    pub zero_bytes: u64,
}

/// The live counters, shared by the wrapper and the image.
#[derive(Debug, Default)]
pub(crate) struct HostCounters {
    flushes: AtomicU64,
    discards: AtomicU64,
    discard_bytes: AtomicU64,
    zeroes: AtomicU64,
    zero_bytes: AtomicU64,
}

impl HostCounters {
    fn add(counter: &AtomicU64, n: u64) {
        // Counters only: no ordering with other memory is needed.
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values (each exact; not one atomic snapshot while requests run).
    pub(crate) fn snapshot(&self) -> HostStats {
        HostStats {
            flushes: self.flushes.load(Ordering::Relaxed),
            discards: self.discards.load(Ordering::Relaxed),
            discard_bytes: self.discard_bytes.load(Ordering::Relaxed),
            zeroes: self.zeroes.load(Ordering::Relaxed),
            zero_bytes: self.zero_bytes.load(Ordering::Relaxed),
        }
    }
}

/// `inner`, with its flush, discard and write-zeroes requests counted in `counters`.
#[derive(Debug)]
pub(crate) struct CountingStorage {
    inner: Arc<dyn Storage>,
    counters: Arc<HostCounters>,
}

impl CountingStorage {
    /// Wrap `inner`; returns the wrapped storage and its counters.
    pub(crate) fn wrap(inner: Arc<dyn Storage>) -> (Arc<dyn Storage>, Arc<HostCounters>) {
        let counters = Arc::new(HostCounters::default());
        let s = CountingStorage {
            inner,
            counters: counters.clone(),
        };
        (Arc::new(s), counters)
    }
}

impl Storage for CountingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        HostCounters::add(&self.counters.flushes, 1);
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn is_empty(&self) -> io::Result<bool> {
        self.inner.is_empty()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        HostCounters::add(&self.counters.discards, 1);
        HostCounters::add(&self.counters.discard_bytes, len);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        HostCounters::add(&self.counters.zeroes, 1);
        HostCounters::add(&self.counters.zero_bytes, len);
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

impl Image {
    /// Host requests (flushes, discards, write-zeroes) this handle has issued since it
    /// was opened; see [`HostStats`].
    pub fn host_stats(&self) -> HostStats {
        self.host_counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_on, CreateOptions, OpenOptions};
    use host_io::MemStorage;

    fn image(options: &str) -> Image {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let co = CreateOptions {
            size: Some(4 << 20),
            ..CreateOptions::default()
        };
        create_on(mem.clone(), &co, None).unwrap();
        Image::open_storage(mem, &OpenOptions::parse(options).unwrap(), None).unwrap()
    }

    #[test]
    fn counts_what_each_policy_sends_to_the_host() {
        let cs = 65536u64;
        // (options, discards, zeroes) for discarding two allocated clusters, then a flush.
        for (opts, discards, zeroes) in [
            ("provision=off", 0, 0),
            ("provision=full", 0, 1),
            ("provision=metadata", 1, 0),
            ("provision=thin", 1, 0),
            ("provision=reuse", 0, 0),
        ] {
            let img = image(opts);
            assert_eq!(img.host_stats(), HostStats::default(), "{opts}: fresh open");
            img.write_at(&vec![7u8; 2 * cs as usize], 0).unwrap();
            img.flush().unwrap();
            let before = img.host_stats();
            assert!(before.flushes >= 1, "{opts}: {before:?}");
            img.discard(0, 2 * cs).unwrap();
            img.flush().unwrap();
            let after = img.host_stats();
            assert_eq!(
                after.discards - before.discards,
                discards,
                "{opts}: {after:?}"
            );
            assert_eq!(after.zeroes - before.zeroes, zeroes, "{opts}: {after:?}");
            // The two clusters are adjacent on the host: one merged request each.
            assert_eq!(
                after.discard_bytes - before.discard_bytes,
                discards * 2 * cs
            );
            assert_eq!(after.zero_bytes - before.zero_bytes, zeroes * 2 * cs);
            assert!(after.flushes > before.flushes, "{opts}: {after:?}");
        }
    }

    #[test]
    fn a_flush_with_nothing_pending_is_one_host_flush() {
        let img = image("provision=thin");
        img.write_at(&[1u8; 512], 0).unwrap();
        img.flush().unwrap();
        let before = img.host_stats().flushes;
        img.flush().unwrap();
        assert_eq!(img.host_stats().flushes, before + 1);
    }
}
