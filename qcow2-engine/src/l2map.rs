//! Guest-to-host mapping through L1 and L2: entry lookup, entry updates, and allocation or
//! copy-on-write of L2 tables.

use qcow2_format::{ClusterKind, Geometry, L1Entry, L2Entry, SubclusterKind};

use crate::error::{corrupt, Result};
use crate::meta::{Meta, MetaKind, Which};
use crate::policy::FreeReason;

/// Where an L2 entry lives in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct L2Slot {
    /// Host offset of the cached slice holding the entry.
    pub slice: u64,
    /// Index of the entry inside the slice.
    pub index: usize,
}

impl Meta {
    fn entries_per_slice(&self) -> u64 {
        self.l2_cache.entry_size() as u64 / self.geo.l2_entry_size()
    }

    /// Validated L1 entry for a guest offset.
    pub(crate) fn l1_entry(&self, guest: u64) -> Result<L1Entry> {
        let i = self.geo.l1_index(guest) as usize;
        let raw = *self
            .l1
            .get(i)
            .ok_or_else(|| corrupt!("guest offset {guest:#x} is beyond the L1 table"))?;
        if i >= self.l1_past_eof {
            return Err(corrupt!(
                "L1 entry {i} (guest offset {guest:#x}) lies past the end of the file"
            ));
        }
        let e = L1Entry(raw);
        e.validate(&self.geo)
            .map_err(|err| corrupt!("L1 entry {i}: {err}"))?;
        Ok(e)
    }

    /// The slot of entry `index` of the L2 table at `l2_table`.
    pub(crate) fn slot_at(&self, l2_table: u64, index: usize) -> L2Slot {
        let per = self.entries_per_slice() as usize;
        L2Slot {
            slice: l2_table + (index / per) as u64 * self.l2_cache.entry_size() as u64,
            index: index % per,
        }
    }

    fn slot_for(&self, l2_table: u64, guest: u64) -> L2Slot {
        let idx = self.geo.l2_index(guest);
        let per = self.entries_per_slice();
        L2Slot {
            slice: l2_table + (idx / per) * self.l2_cache.entry_size() as u64,
            index: (idx % per) as usize,
        }
    }

    /// The L2 entry mapping `guest`, and where it lives (None: no L2 table).
    pub(crate) fn l2_lookup(&mut self, guest: u64) -> Result<(L2Entry, Option<L2Slot>)> {
        let l1 = self.l1_entry(guest)?;
        if l1.is_unallocated() {
            return Ok((L2Entry::UNALLOCATED, None));
        }
        let slot = self.slot_for(l1.l2_offset(), guest);
        // A hit costs one lookup; only a miss goes through `load`.
        if let Some(data) = self.l2_cache.get(slot.slice) {
            return Ok((L2Entry::read(data, slot.index, &self.geo), Some(slot)));
        }
        self.load(Which::L2, slot.slice)?;
        let data = self.l2_cache.get(slot.slice).expect("loaded");
        Ok((L2Entry::read(data, slot.index, &self.geo), Some(slot)))
    }

    /// The L2 entry mapping `guest`, decoded; a bad entry is reported as corruption.
    pub(crate) fn l2_kind(&mut self, guest: u64) -> Result<(L2Entry, ClusterKind, Option<L2Slot>)> {
        let (entry, slot) = self.l2_lookup(guest)?;
        let kind = entry.kind(&self.geo).map_err(|e| {
            let cl = self.geo.align_down(guest);
            corrupt!("L2 entry for guest offset {cl:#x}: {e}")
        })?;
        Ok((entry, kind, slot))
    }

    /// Update an entry in an active, exclusively owned L2 table.
    pub(crate) fn l2_set(&mut self, slot: L2Slot, e: L2Entry) -> Result<()> {
        self.load(Which::L2, slot.slice)?;
        let geo = self.geo;
        let data = self.l2_cache.get_mut(slot.slice).expect("loaded");
        e.write(data, slot.index, &geo);
        Ok(())
    }

    /// The slot for `guest` in a writable L2 table: allocates a table, or copies a table
    /// shared with a snapshot, as needed.
    pub(crate) fn l2_slot_for_write(&mut self, guest: u64) -> Result<L2Slot> {
        let l1 = self.l1_entry(guest)?;
        if !l1.is_unallocated() && l1.copied() {
            return Ok(self.slot_for(l1.l2_offset(), guest));
        }
        let i = self.geo.l1_index(guest) as usize;
        let table = self.l2_allocate(i, l1)?;
        Ok(self.slot_for(table, guest))
    }

    /// Give L1 entry `i` a fresh, exclusively owned L2 table (zeroed, or a copy of the
    /// shared one). Durable order: refcount and table content, sync, then the L1 entry.
    fn l2_allocate(&mut self, i: usize, old: L1Entry) -> Result<u64> {
        let cs = self.cluster_size() as usize;
        let mut content = vec![0u8; cs];
        if !old.is_unallocated() {
            let slice = self.l2_cache.entry_size();
            for (k, chunk) in content.chunks_mut(slice).enumerate() {
                let off = old.l2_offset() + (k * slice) as u64;
                match self.l2_cache.peek(off) {
                    Some(d) => chunk.copy_from_slice(d),
                    None => self.read_host(chunk, off, "shared L2 table")?,
                }
            }
        }
        let new = self.alloc_contiguous(1)?;
        self.add_meta(new, cs as u64, MetaKind::ActiveL2);
        let linked = (|| -> Result<()> {
            self.write_back(Which::Refcount)?;
            self.write_host(&content, new, Some(MetaKind::ActiveL2), "new L2 table")?;
            self.sync()?;
            self.set_l1_entry(i, L1Entry::new(new, true).0)
        })();
        // On failure the L1 entry may still have reached the disk (a write can land and
        // report an error): the table's cluster is kept (a leak at worst), never reused.
        linked?;
        let slice = self.l2_cache.entry_size();
        for (k, chunk) in content.chunks(slice).enumerate() {
            let off = new + (k * slice) as u64;
            self.install(Which::L2, off, chunk.to_vec().into_boxed_slice(), false)?;
        }
        if !old.is_unallocated() {
            let o = old.l2_offset();
            self.l2_cache.remove_range(o, o + cs as u64);
            if let Some((s, _, MetaKind::ActiveL2)) = self.overlapping_meta(o, 1) {
                self.remove_meta(s);
            }
            self.free_clusters(o, 1, FreeReason::Other)?;
        }
        Ok(new)
    }
}

/// The pieces of `[pos, cl_end)`, inside the cluster at `cl` mapped by `entry`, that share
/// one (sub)cluster kind: `(start, end, kind)`. One piece without extended L2 entries, one
/// per subcluster touched with them.
pub(crate) fn pieces(
    geo: Geometry,
    entry: L2Entry,
    kind: ClusterKind,
    cl: u64,
    mut pos: u64,
    cl_end: u64,
) -> impl Iterator<Item = (u64, u64, SubclusterKind)> {
    let sc = geo.subcluster_size();
    std::iter::from_fn(move || {
        if pos >= cl_end {
            return None;
        }
        let end = if geo.extended_l2() {
            (cl + ((pos - cl) / sc + 1) * sc).min(cl_end)
        } else {
            cl_end
        };
        let piece = (
            pos,
            end,
            entry.subcluster_kind(kind, &geo, geo.subcluster_index(pos)),
        );
        pos = end;
        Some(piece)
    })
}
