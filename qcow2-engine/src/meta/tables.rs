//! Tables that move: an L2 table given to an L1 entry (fresh, or a private copy of one
//! shared with a snapshot), and the one way a whole table is replaced: write the new
//! table, sync, switch the header to it, sync, then let the old one go.

use qcow2_format::{Header, L1Entry, L2Entry};

use super::{L2Slot, Meta, MetaKind, Which};
use crate::error::Result;

/// A table about to replace the one the header names.
pub(crate) struct NewTable<'a> {
    /// What it is (its overlap-map kind).
    pub kind: MetaKind,
    /// Host offset (already allocated, cluster aligned).
    pub off: u64,
    /// Its bytes, padded to whole clusters by the caller where that matters.
    pub bytes: &'a [u8],
    /// For messages.
    pub what: &'static str,
}

impl Meta {
    /// Write `new`, make it durable, and switch the header to it (one sector write, then a
    /// sync). On failure before the header write (`Err`) nothing names the new table and
    /// it is no longer metadata; its clusters stay allocated (a leak at worst). Once the
    /// header names it (in memory, and on disk unless the write is lost) the switch
    /// stands even if the final sync fails: that error comes back inside `Ok`, for the
    /// caller to return after completing the switch. (Undoing it would leave the header
    /// naming clusters the allocator hands out again.) The caller frees the old table,
    /// through the quarantine, so it stays intact until a later barrier succeeds.
    pub(crate) fn switch_table(
        &mut self,
        new: NewTable<'_>,
        switch: impl FnOnce(&mut Header),
    ) -> Result<Result<()>> {
        let cs = self.cluster_size();
        let len = (new.bytes.len() as u64).div_ceil(cs) * cs;
        self.regions.add(new.off, len, new.kind);
        let r = (|| -> Result<()> {
            self.write_meta(new.bytes, new.off, new.kind, new.what)?;
            self.sync()?;
            let storage = self.storage.clone();
            self.header.update(&*storage, switch)
        })();
        if let Err(e) = r {
            self.regions.remove(new.off);
            return Err(e);
        }
        Ok(self.sync())
    }

    /// The validated L1 entry for `guest`. A damaged entry met in use marks the image
    /// corrupt (on a read/write open), as QEMU does.
    pub(crate) fn l1_entry(&mut self, guest: u64) -> Result<qcow2_format::L1Entry> {
        self.mapping
            .l1_entry(guest)
            .inspect_err(|_| self.mark_corrupt())
    }

    /// The L2 entry mapping `guest`, and where it lives (None: no L2 table).
    pub(crate) fn l2_lookup(&mut self, guest: u64) -> Result<(L2Entry, Option<L2Slot>)> {
        let l1 = self.l1_entry(guest)?;
        if l1.is_unallocated() {
            return Ok((L2Entry::UNALLOCATED, None));
        }
        let slot = self.mapping.slot_for(l1.l2_offset(), guest);
        // A hit costs one lookup; only a miss goes through `load`.
        if let Some(e) = self.mapping.cached_entry(slot) {
            return Ok((e, Some(slot)));
        }
        self.load(Which::L2, slot.slice)?;
        let e = self.mapping.cached_entry(slot).expect("loaded");
        Ok((e, Some(slot)))
    }

    /// The L2 entry mapping `guest`, decoded; a bad entry is corruption, and marks the
    /// image corrupt on a read/write open, as QEMU does.
    pub(crate) fn l2_kind(
        &mut self,
        guest: u64,
    ) -> Result<(L2Entry, qcow2_format::ClusterKind, Option<L2Slot>)> {
        let (mut entry, slot) = self.l2_lookup(guest)?;
        if entry.is_compressed() {
            // QEMU ignores a compressed cluster's subcluster bitmap for I/O (check reports
            // a nonzero one): the guest reads the cluster.
            entry.bitmap = 0;
        }
        match entry.kind(&self.geo) {
            Ok(kind) => Ok((entry, kind, slot)),
            Err(e) => {
                self.mark_corrupt();
                let cl = self.geo.align_down(guest);
                Err(crate::error::corrupt!(
                    "L2 entry for guest offset {cl:#x}: {e}"
                ))
            }
        }
    }

    /// Change the entry at `slot` (mapping guest offset `guest`).
    pub(crate) fn set_l2(&mut self, slot: L2Slot, guest: u64, e: L2Entry) -> Result<()> {
        self.load(Which::L2, slot.slice)?;
        self.mapping.set_entry(slot, guest, e);
        Ok(())
    }

    /// The slot for `guest` in a writable L2 table: allocates a table, or copies a table
    /// shared with a snapshot, as needed.
    pub(crate) fn l2_slot_for_write(&mut self, guest: u64) -> Result<L2Slot> {
        let l1 = self.l1_entry(guest)?;
        if !l1.is_unallocated() && l1.copied() {
            return Ok(self.mapping.slot_for(l1.l2_offset(), guest));
        }
        let i = self.geo.l1_index(guest) as usize;
        let table = self.l2_allocate(i, l1)?;
        Ok(self.mapping.slot_for(table, guest))
    }

    /// Give L1 entry `i` a fresh, exclusively owned L2 table (zeroed, or a copy of the
    /// shared one). Durable order: refcount and table content, sync, then the L1 entry.
    fn l2_allocate(&mut self, i: usize, old: L1Entry) -> Result<u64> {
        let cs = self.cluster_size() as usize;
        let mut content = vec![0u8; cs];
        if !old.is_unallocated() {
            let slice = self.mapping.slice_size();
            for (k, chunk) in content.chunks_mut(slice).enumerate() {
                let off = old.l2_offset() + (k * slice) as u64;
                match self.mapping.peek_slice(off) {
                    Some(d) => chunk.copy_from_slice(d),
                    None => self.read_host(chunk, off, "shared L2 table")?,
                }
            }
        }
        let new = self.alloc_contiguous(1)?;
        self.regions.add(new, cs as u64, MetaKind::ActiveL2);
        let linked = (|| -> Result<()> {
            self.write_back(Which::Refcount)?;
            self.write_meta(&content, new, MetaKind::ActiveL2, "new L2 table")?;
            self.sync()?;
            self.set_l1_entry(i, L1Entry::new(new, true).0, true)
        })();
        // On failure the L1 entry may still have reached the disk (a write can land and
        // report an error): the table's cluster is kept (a leak at worst), never reused.
        linked?;
        let slice = self.mapping.slice_size();
        for (k, chunk) in content.chunks(slice).enumerate() {
            let off = new + (k * slice) as u64;
            self.install(Which::L2, off, chunk.to_vec().into_boxed_slice(), false)?;
        }
        if !old.is_unallocated() {
            let o = old.l2_offset();
            self.mapping.forget_tables(o, o + cs as u64);
            self.regions.remove_if(o, MetaKind::ActiveL2);
            self.free_clusters(o, 1, self.metadata_on_free)?;
        }
        Ok(new)
    }

    /// Set L1 entry `index` on disk, then in memory. `same_content`: the entry now names a
    /// table with the same entries (new or copied), so cached mappings stay valid.
    pub(crate) fn set_l1_entry(
        &mut self,
        index: usize,
        value: u64,
        same_content: bool,
    ) -> Result<()> {
        let off = self.header.get().l1_table_offset + index as u64 * 8;
        self.write_meta(&value.to_be_bytes(), off, MetaKind::ActiveL1, "L1 entry")?;
        self.mapping.set_l1(index, value, same_content);
        Ok(())
    }
}
