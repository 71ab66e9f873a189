//! Header state: cluster 0 as parsed, and the feature bits this handle manages: dirty
//! (lazy refcounts), corrupt, autoclear. Header fields change on disk first (the first
//! sector only, so a torn write cannot damage the extensions) and in memory once the write
//! succeeded.

use host_io::Storage;
use qcow2_format::features::{autoclear, incompatible};
use qcow2_format::{Header, HeaderArea};

use crate::error::{Error, Result};

/// The header and the feature-bit bookkeeping of one open image.
pub(crate) struct HeaderState {
    area: HeaderArea,
    /// An inconsistency was found (or the bit was set on disk): guest writes are refused.
    corrupt: bool,
    /// The first metadata change has done its header bookkeeping.
    first_write_done: bool,
    /// This handle set the dirty bit (lazy refcounts) and clears it on a clean close.
    dirty_set_by_us: bool,
}

impl HeaderState {
    pub(crate) fn new(area: HeaderArea) -> Self {
        let corrupt = area.header.is_corrupt();
        HeaderState {
            area,
            corrupt,
            first_write_done: false,
            dirty_set_by_us: false,
        }
    }

    /// Cluster 0 as parsed.
    pub(crate) fn area(&self) -> &HeaderArea {
        &self.area
    }

    /// The header fields.
    pub(crate) fn get(&self) -> &Header {
        &self.area.header
    }

    /// Whether writes are refused because of an inconsistency.
    pub(crate) fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// Lift the in-memory refusal for a repair (the on-disk bit stays until it succeeds).
    pub(crate) fn suspend_corrupt(&mut self) -> bool {
        std::mem::replace(&mut self.corrupt, false)
    }

    /// Restore the refusal after a repair that did not succeed.
    pub(crate) fn restore_corrupt(&mut self, was: bool) {
        self.corrupt |= was;
    }

    /// Change header fields on disk, then in memory.
    pub(crate) fn update(
        &mut self,
        storage: &dyn Storage,
        f: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut h = self.area.header.clone();
        f(&mut h);
        storage
            .write_at(&h.to_bytes(), 0)
            .map_err(Error::io("writing the image header"))?;
        self.area.header = h;
        Ok(())
    }

    /// Set the corrupt bit on disk (best effort) and refuse further writes.
    pub(crate) fn mark_corrupt(&mut self, storage: &dyn Storage, read_only: bool) {
        let already = self.corrupt;
        self.corrupt = true;
        if already || read_only || self.area.header.version < 3 {
            return;
        }
        self.area.header.incompatible_features |= incompatible::CORRUPT;
        let _ = storage.write_at(&self.area.header.to_bytes(), 0);
        let _ = storage.flush();
    }

    /// Clear the corrupt bit after a repair left no corruption (QEMU does the same).
    pub(crate) fn clear_corrupt(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.area.header.is_corrupt() {
            self.update(storage, |h| {
                h.incompatible_features &= !incompatible::CORRUPT
            })?;
            storage
                .flush()
                .map_err(Error::io("flushing the image file"))?;
        }
        self.corrupt = false;
        Ok(())
    }

    /// After a repair left no corruption: clear a dirty bit this handle did not set (an
    /// earlier writer's, whose refcounts the repair has just made right), as QEMU does.
    /// One this handle set stays until its clean close.
    pub(crate) fn clear_stale_dirty(&mut self, storage: &dyn Storage) -> Result<()> {
        if !self.area.header.is_dirty() || self.dirty_set_by_us {
            return Ok(());
        }
        self.update(storage, |h| h.incompatible_features &= !incompatible::DIRTY)?;
        storage
            .flush()
            .map_err(Error::io("flushing the image file"))
    }

    /// Header bookkeeping before the first metadata change: clear the autoclear bits this
    /// library does not maintain, set the dirty bit when lazy refcounts are on. Durable
    /// before any metadata it vouches for changes.
    pub(crate) fn prepare_first_write(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.first_write_done {
            return Ok(());
        }
        let h = &self.area.header;
        let clear_autoclear = h.version >= 3 && h.autoclear_features != 0;
        let set_dirty = h.lazy_refcounts() && !h.is_dirty();
        if clear_autoclear || set_dirty {
            self.update(storage, |h| {
                if clear_autoclear {
                    h.autoclear_features = 0;
                }
                if set_dirty {
                    h.incompatible_features |= incompatible::DIRTY;
                }
            })?;
            storage
                .flush()
                .map_err(Error::io("flushing the image file"))?;
            self.dirty_set_by_us = set_dirty;
        }
        self.first_write_done = true;
        Ok(())
    }

    /// Keep only the autoclear bits in `keep` (a repair drops what it cannot vouch for).
    pub(crate) fn restrict_autoclear(&mut self, storage: &dyn Storage, keep: u64) -> Result<()> {
        if self.area.header.autoclear_features & !keep == 0 {
            return Ok(());
        }
        self.update(storage, |h| h.autoclear_features &= keep)?;
        storage
            .flush()
            .map_err(Error::io("flushing the image file"))
    }

    /// Whether the bitmaps extension is vouched for (autoclear bit 0 on a v3 image).
    pub(crate) fn bitmaps_consistent(&self) -> bool {
        let h = &self.area.header;
        h.version >= 3 && h.autoclear_features & autoclear::BITMAPS != 0
    }

    /// After a successful flush on close: clear the dirty bit this handle set.
    pub(crate) fn finish_clean_close(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.dirty_set_by_us {
            self.update(storage, |h| h.incompatible_features &= !incompatible::DIRTY)?;
            storage
                .flush()
                .map_err(Error::io("flushing the image file"))?;
            self.dirty_set_by_us = false;
        }
        Ok(())
    }
}
