//! Header state: cluster 0 as parsed, and the feature bits this handle manages: dirty
//! (lazy refcounts), corrupt, autoclear. Header fields change on disk first (the first
//! sector only, so a torn write cannot damage the extensions) and in memory once the write
//! succeeded.

use host_io::Storage;
use qcow2_format::extensions::{extension_offsets, BitmapsExt, HeaderExtension};
use qcow2_format::features::{autoclear, incompatible};
use qcow2_format::{Header, HeaderArea};

use crate::error::{Error, Result};

/// The unit a host writes atomically (the crash model tears writes at this boundary).
const SECTOR: usize = 512;

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

    /// Whether the first metadata change has done its header bookkeeping.
    pub(crate) fn first_write_done(&self) -> bool {
        self.first_write_done
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
    /// handle does not maintain (all but `keep`), set the dirty bit when lazy refcounts are
    /// on. Durable before any metadata it vouches for changes.
    pub(crate) fn prepare_first_write(&mut self, storage: &dyn Storage, keep: u64) -> Result<()> {
        if self.first_write_done {
            return Ok(());
        }
        let h = &self.area.header;
        let clear_autoclear = h.version >= 3 && h.autoclear_features & !keep != 0;
        let set_dirty = h.lazy_refcounts() && !h.is_dirty();
        if clear_autoclear || set_dirty {
            self.update(storage, |h| {
                if clear_autoclear {
                    h.autoclear_features &= keep;
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

    /// The bitmaps extension, if present.
    pub(crate) fn bitmaps_ext(&self) -> Option<BitmapsExt> {
        self.area.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(*b),
            _ => None,
        })
    }

    /// Set or clear autoclear bit 0 (the bitmaps extension is trusted) on disk, synced.
    pub(crate) fn set_bitmaps_bit(&mut self, storage: &dyn Storage, on: bool) -> Result<()> {
        if (self.area.header.autoclear_features & autoclear::BITMAPS != 0) == on {
            return Ok(());
        }
        self.update(storage, |h| {
            if on {
                h.autoclear_features |= autoclear::BITMAPS;
            } else {
                h.autoclear_features &= !autoclear::BITMAPS;
            }
        })?;
        sync(storage)
    }

    /// Byte offsets in cluster 0 of each extension and of the end marker.
    fn ext_layout(&self) -> (Vec<usize>, usize) {
        extension_offsets(&self.area.extensions, self.area.header.extensions_start())
    }

    fn write(storage: &dyn Storage, buf: &[u8], off: usize) -> Result<()> {
        storage
            .write_at(buf, off as u64)
            .map_err(Error::io("writing the header extensions"))
    }

    /// Point the (existing) bitmaps extension at another directory, durably. The 24-byte
    /// payload is one write: inside one sector it is atomic, and a crash leaves the old or
    /// the new directory. A payload straddling a sector boundary (not QEMU's layouts) is
    /// written with bit 0 cleared around it: a crash then leaves the bitmaps untrusted
    /// (QEMU and this library drop them), never a mix of two directories.
    pub(crate) fn switch_bitmaps_ext(
        &mut self,
        storage: &dyn Storage,
        new: BitmapsExt,
    ) -> Result<()> {
        let (offs, _) = self.ext_layout();
        let idx = self
            .area
            .extensions
            .iter()
            .position(|e| matches!(e, HeaderExtension::Bitmaps(_)))
            .expect("switch_bitmaps_ext needs the extension");
        let p = offs[idx] + 8;
        let window = p / SECTOR != (p + 23) / SECTOR
            && self.area.header.autoclear_features & autoclear::BITMAPS != 0;
        if window {
            self.set_bitmaps_bit(storage, false)?;
        }
        Self::write(storage, &new.to_payload(), p)?;
        sync(storage)?;
        self.area.extensions[idx] = HeaderExtension::Bitmaps(new);
        if window {
            self.set_bitmaps_bit(storage, true)?;
        }
        Ok(())
    }

    /// Add the bitmaps extension (there is none) after the last extension, then set bit 0.
    /// Every step is durable before the next, and each intermediate state opens: the
    /// backing file name moves first if it is in the way (its copy is written, then the
    /// header points at it); the bytes the extension will cover are zeroed; the extension
    /// appears while bit 0 is clear (QEMU ignores its content then); bit 0 is set last.
    pub(crate) fn add_bitmaps_ext(&mut self, storage: &dyn Storage, new: BitmapsExt) -> Result<()> {
        let cs = 1usize << self.area.header.cluster_bits.min(31);
        let (_, end) = self.ext_layout();
        // The new extension at `end` (32 bytes), the end marker after it.
        let need_end = end + 32 + 8;
        self.set_bitmaps_bit(storage, false)?;
        if let Some(name) = self.area.backing_file.clone() {
            let o = self.area.header.backing_file_offset as usize;
            if o < need_end {
                let f = (o + name.len()).max(need_end).div_ceil(8) * 8;
                if f + name.len() > cs {
                    return Err(Error::Unsupported(format!(
                        "no room in the {cs}-byte header cluster for the bitmaps extension"
                    )));
                }
                Self::write(storage, &name, f)?;
                sync(storage)?;
                self.update(storage, |h| h.backing_file_offset = f as u64)?;
                sync(storage)?;
            }
        } else if need_end > cs {
            return Err(Error::Unsupported(format!(
                "no room in the {cs}-byte header cluster for the bitmaps extension"
            )));
        }
        Self::write(storage, &[0u8; 32], end + 8)?;
        sync(storage)?;
        let mut ext = [0u8; 32];
        ext[0..4].copy_from_slice(&qcow2_format::extensions::EXT_BITMAPS.to_be_bytes());
        ext[4..8].copy_from_slice(&24u32.to_be_bytes());
        ext[8..].copy_from_slice(&new.to_payload());
        Self::write(storage, &ext, end)?;
        sync(storage)?;
        self.area.extensions.push(HeaderExtension::Bitmaps(new));
        self.set_bitmaps_bit(storage, true)
    }

    /// Remove the bitmaps extension and bit 0 (no bitmap left, or the extension is not
    /// trusted). Bit 0 is cleared first, so the extension's content no longer counts; the
    /// last extension is then cut off by an end marker written over it (8 bytes, atomic).
    /// When other extensions follow it, they are moved up in one write.
    pub(crate) fn remove_bitmaps_ext(&mut self, storage: &dyn Storage) -> Result<()> {
        let Some(idx) = self
            .area
            .extensions
            .iter()
            .position(|e| matches!(e, HeaderExtension::Bitmaps(_)))
        else {
            return self.set_bitmaps_bit(storage, false);
        };
        self.set_bitmaps_bit(storage, false)?;
        let (offs, _) = self.ext_layout();
        let mut rest = self.area.extensions.clone();
        rest.remove(idx);
        if idx + 1 == self.area.extensions.len() {
            Self::write(storage, &[0u8; 8], offs[idx])?;
        } else {
            let bytes = qcow2_format::extensions::serialize_extensions(&rest[idx..]);
            Self::write(storage, &bytes, offs[idx])?;
        }
        sync(storage)?;
        self.area.extensions = rest;
        Ok(())
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

fn sync(storage: &dyn Storage) -> Result<()> {
    storage
        .flush()
        .map_err(Error::io("flushing the image file"))
}
