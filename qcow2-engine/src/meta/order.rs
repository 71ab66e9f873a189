//! Write-back ordering between the two metadata caches and guest data, and the loading
//! and eviction of cached tables that must respect it.
//!
//! Two rules remain once frees go through the quarantine (`allocator.rs`):
//! - refcount blocks that count newly allocated clusters reach the disk and are synced
//!   before any L2 slice that may point at those clusters (`refcounts_first`);
//! - guest data that an L2 entry newly exposes (copy-on-write, a rewritten zero cluster)
//!   is synced before that L2 slice is written (`data_first`).
//!
//! Refcount blocks themselves may be written at any time: decrements are only applied
//! once the L2 change that dropped the reference is durable.

use super::{Meta, MetaKind};
use crate::error::{corrupt, Error, Result};

/// Which cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    L2,
    Refcount,
}

/// What must precede the next L2 write-back.
#[derive(Debug, Default)]
pub(crate) struct WriteOrder {
    refcounts_first: bool,
    data_first: bool,
}

impl Meta {
    fn cache(&mut self, w: Which) -> &mut super::cache::TableCache {
        match w {
            Which::L2 => &mut self.mapping.l2,
            Which::Refcount => &mut self.refcounts.blocks,
        }
    }

    /// Refcount increments are pending: L2 slices wait for them.
    pub(crate) fn require_refcounts_first(&mut self) {
        self.order.refcounts_first = true;
    }

    /// Guest data an L2 change exposes was written: L2 slices wait for a sync.
    pub(crate) fn require_data_first(&mut self) {
        self.order.data_first = true;
    }

    /// Make sure the table slice at `off` is cached, reading it (evicting as needed).
    pub(crate) fn load(&mut self, w: Which, off: u64) -> Result<()> {
        if self.cache(w).contains(off) {
            return Ok(());
        }
        let size = self.cache(w).entry_size();
        let what = match w {
            Which::L2 => "L2 table",
            Which::Refcount => "refcount block",
        };
        // Only a damaged image opened read-only names a table there (read/write opens
        // refuse it): reading it as zeros would hide the damage.
        if off >= self.alloc.end() {
            self.mark_corrupt();
            return Err(corrupt!("{what} at {off:#x} is past the end of the file"));
        }
        let mut buf = vec![0u8; size].into_boxed_slice();
        self.read_host(&mut buf, off, what)?;
        self.make_room(w)?;
        self.cache(w).insert(off, buf, false);
        Ok(())
    }

    /// Insert fresh content (a new table) as a dirty or clean entry.
    pub(crate) fn install(
        &mut self,
        w: Which,
        off: u64,
        data: Box<[u8]>,
        dirty: bool,
    ) -> Result<()> {
        if !self.cache(w).contains(off) {
            self.make_room(w)?;
        }
        self.cache(w).insert(off, data, dirty);
        Ok(())
    }

    fn make_room(&mut self, w: Which) -> Result<()> {
        while self.cache(w).is_full() {
            let Some((off, dirty)) = self.cache(w).victim() else {
                break;
            };
            if dirty {
                self.before_write_back(w)?;
                self.write_entry(w, off)?;
            }
            self.cache(w).remove(off);
        }
        Ok(())
    }

    fn write_entry(&mut self, w: Which, off: u64) -> Result<()> {
        let (kind, what) = match w {
            Which::L2 => (MetaKind::ActiveL2, "L2 table"),
            Which::Refcount => (MetaKind::RefcountBlock, "refcount block"),
        };
        let Some(data) = self.cache(w).peek(off) else {
            return Ok(());
        };
        let data = data.to_vec();
        // L2 slices live inside a whole-table range; refcount blocks are whole clusters.
        self.write_meta(&data, off, kind, what)?;
        self.cache(w).mark_clean(off);
        Ok(())
    }

    fn write_all(&mut self, w: Which) -> Result<()> {
        for off in self.cache(w).dirty_offsets() {
            self.write_entry(w, off)?;
        }
        Ok(())
    }

    /// Satisfy the ordering rules before writing entries of cache `w`.
    fn before_write_back(&mut self, w: Which) -> Result<()> {
        if w != Which::L2 {
            return Ok(());
        }
        if self.order.refcounts_first {
            self.write_all(Which::Refcount)?;
            self.sync()?;
            self.order.refcounts_first = false;
            self.order.data_first = false;
        }
        if self.order.data_first {
            self.sync()?;
            self.order.data_first = false;
        }
        Ok(())
    }

    /// Write back every dirty entry of cache `w`, honouring the ordering.
    pub(crate) fn write_back(&mut self, w: Which) -> Result<()> {
        if !self.cache(w).has_dirty() {
            return Ok(());
        }
        self.before_write_back(w)?;
        self.write_all(w)
    }

    /// Write every dirty metadata entry in a valid order (no final sync).
    pub(crate) fn write_back_all(&mut self) -> Result<()> {
        self.write_back(Which::Refcount)?;
        self.write_back(Which::L2)
    }

    /// Read bytes from the host, naming what for in the error.
    pub(crate) fn read_host(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.storage
            .read_at(buf, off)
            .map_err(Error::io_lazy(|| format!("reading {what} at {off:#x}")))
    }
}
