//! The metadata of an open image, as components that own their state:
//!
//! | component | owns |
//! |---|---|
//! | `header` ([`HeaderState`]) | cluster 0, dirty / corrupt / autoclear bookkeeping |
//! | `mapping` ([`Mapping`]) | active L1, L2 slice cache, the lock-free entry cache |
//! | `refcounts` ([`Refcounts`]) | refcount table, refcount block cache |
//! | `alloc` ([`Allocator`]) | free hint, end of allocation, pins, the freed-cluster quarantine |
//! | `order` ([`WriteOrder`]) | what must precede the next L2 write-back |
//! | `host_ops` ([`HostOps`]) | deferred host discards of freed clusters |
//! | `regions` ([`Regions`]) | the overlap map of every metadata range |
//! | `bitmaps` ([`Bitmaps`]) | persistent dirty bitmaps: exact bits, on-disk tables, write intent |
//!
//! [`Meta`] holds them, guarded by the image's metadata lock, and carries out what needs
//! several at once (allocation, loading and write-back, table moves). It never asks the
//! discard policy anything: callers tell it what to do with freed clusters.

mod allocator;
pub(crate) mod bitmaps;
pub(crate) mod cache;
mod fast_map;
mod growth;
mod header;
mod host_ops;
mod mapping;
mod order;
mod refcounts;
mod regions;
mod report;
mod tables;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use host_io::Storage;
use qcow2_format::{Geometry, SnapshotEntry};

pub(crate) use allocator::{Allocator, OnFree, Run};
pub(crate) use bitmaps::Bitmaps;
pub(crate) use fast_map::FastMap;
pub(crate) use header::HeaderState;
pub(crate) use host_ops::HostOps;
pub(crate) use mapping::{L2Slot, Mapping};
pub(crate) use order::{Which, WriteOrder};
pub(crate) use refcounts::{structure_size, Refcounts};
pub(crate) use regions::{MetaKind, Regions};
pub(crate) use tables::NewTable;

use crate::error::{corrupt, Error, Result};

/// The metadata of an open image.
pub(crate) struct Meta {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) geo: Geometry,
    pub(crate) read_only: bool,
    pub(crate) header: HeaderState,
    pub(crate) mapping: Mapping,
    pub(crate) refcounts: Refcounts,
    pub(crate) alloc: Allocator,
    pub(crate) order: WriteOrder,
    pub(crate) host_ops: HostOps,
    pub(crate) regions: Regions,
    pub(crate) snapshots: Vec<SnapshotEntry>,
    pub(crate) bitmaps: Bitmaps,
    /// What happens on the host to freed metadata clusters (`pass-discard-other`).
    pub(crate) metadata_on_free: OnFree,
    /// Bumped whenever clusters may have become free (they may then be reused). Readers
    /// resolve, read without the lock, and retry if this moved meanwhile.
    pub(crate) free_gen: Arc<AtomicU64>,
}

impl Meta {
    pub(crate) fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Write metadata of `kind` at `off`, refusing (and marking the image corrupt) if it
    /// would land on other metadata.
    pub(crate) fn write_meta(
        &mut self,
        buf: &[u8],
        off: u64,
        kind: MetaKind,
        what: &str,
    ) -> Result<()> {
        self.check_overlap(off, buf.len() as u64, Some(kind), what)?;
        self.storage
            .write_at(buf, off)
            .map_err(Error::io_lazy(|| format!("writing {what} at {off:#x}")))
    }

    /// Refuse (and mark the image corrupt) a write that would land on metadata other than
    /// `allowed`, or guest data (`allowed` is `None`) that would land past the image's
    /// clusters: every cluster in use lies inside the file or was allocated since open, so
    /// an L2 entry pointing further is corrupt, and following it would grow the file to
    /// whatever it claims.
    pub(crate) fn check_overlap(
        &mut self,
        start: u64,
        len: u64,
        allowed: Option<MetaKind>,
        what: &str,
    ) -> Result<()> {
        if allowed.is_none() && start.saturating_add(len) > self.alloc.end() {
            let msg = format!(
                "preventing {what} write at {start:#x}+{len:#x}: past the end of the image ({:#x})",
                self.alloc.end()
            );
            self.mark_corrupt();
            return Err(corrupt!("{msg}"));
        }
        if let Some(why) = self.regions.conflict(start, len, allowed) {
            let msg = format!("preventing {what} write at {start:#x}+{len:#x}: {why}");
            self.mark_corrupt();
            return Err(corrupt!("{msg}"));
        }
        Ok(())
    }

    /// Sync the image file.
    pub(crate) fn sync(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(Error::io("flushing the image file"))
    }

    /// Set the corrupt bit on disk (best effort) and refuse further writes.
    pub(crate) fn mark_corrupt(&mut self) {
        let storage = self.storage.clone();
        self.header.mark_corrupt(&*storage, self.read_only);
    }

    /// Refuse writes on read-only or corrupt images.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if self.header.is_corrupt() {
            return Err(corrupt!(
                "an inconsistency was found earlier; writes are refused"
            ));
        }
        Ok(())
    }

    /// Header bookkeeping before the first metadata change: autoclear bit 0 stays set
    /// only while the bitmaps are maintained; an extension that is not (not trusted, or
    /// damaged) is dropped, as QEMU does.
    pub(crate) fn prepare_first_write(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.header.first_write_done() && !self.bitmaps.needs_first_write() {
            return Ok(());
        }
        let storage = self.storage.clone();
        let keep = if self.bitmaps.maintained() {
            qcow2_format::features::autoclear::BITMAPS
        } else {
            0
        };
        self.header.prepare_first_write(&*storage, keep)?;
        self.bitmaps_first_write()
    }

    /// Everything durable: the quarantine released, deferred discards issued, every dirty
    /// table written, one sync. Then the bitmaps' idle chunks are cleared lazily (made
    /// durable by a later barrier).
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.read_only {
            self.release_quarantine()?;
            self.run_deferred_discards();
            self.write_back_all()?;
        }
        self.sync()?;
        if !self.read_only {
            self.bitmaps_lazy_clear()?;
        }
        Ok(())
    }

    /// Whether nothing waits to be made durable: no quarantined or deferred work, no
    /// dirty table.
    pub(crate) fn is_clean(&self) -> bool {
        self.alloc.quarantined() == 0
            && self.host_ops.is_empty()
            && !self.mapping.l2.has_dirty()
            && !self.refcounts.blocks.has_dirty()
    }

    /// After a successful flush on close: clear the dirty bit this handle set.
    pub(crate) fn finish_clean_close(&mut self) -> Result<()> {
        let storage = self.storage.clone();
        self.header.finish_clean_close(&*storage)
    }

    /// Change header fields on disk, then in memory.
    pub(crate) fn update_header(
        &mut self,
        f: impl FnOnce(&mut qcow2_format::Header),
    ) -> Result<()> {
        let storage = self.storage.clone();
        self.header.update(&*storage, f)
    }
}
