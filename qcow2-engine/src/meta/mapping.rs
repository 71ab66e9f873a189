//! The guest-to-host mapping: the active L1 table, the L2 slice cache, and the lock-free
//! entry cache readers use. Every change of an L2 entry passes `set_entry`, which keeps
//! the lock-free cache honest; L1 entries change through `set_l1`, after the caller wrote
//! them to disk.

use std::sync::Arc;

use qcow2_format::{Geometry, L1Entry, L2Entry};

use super::cache::TableCache;
use super::fast_map::FastMap;
use crate::error::{corrupt, Result};

/// Where an L2 entry lives in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct L2Slot {
    /// Host offset of the cached slice holding the entry.
    pub slice: u64,
    /// Index of the entry inside the slice.
    pub index: usize,
}

/// The mapping component.
pub(crate) struct Mapping {
    geo: Geometry,
    /// Active L1 table, raw entries.
    l1: Vec<u64>,
    /// Entries from this index on lie past the end of the file (read-only opens of a
    /// damaged image only): lookups there fail instead of reading as unallocated.
    l1_past_eof: usize,
    /// L2 table slices by host offset.
    pub(super) l2: TableCache,
    /// Entries for lock-free reads.
    fast: Arc<FastMap>,
}

impl Mapping {
    pub(crate) fn new(
        geo: Geometry,
        l1: Vec<u64>,
        l1_past_eof: usize,
        l2: TableCache,
        fast: Arc<FastMap>,
    ) -> Self {
        Mapping {
            geo,
            l1,
            l1_past_eof,
            l2,
            fast,
        }
    }

    /// The active L1 table's raw entries.
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Whether L1 entry `i` lies past the end of the file.
    pub(crate) fn l1_past_eof(&self, i: usize) -> bool {
        i >= self.l1_past_eof
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
        e.validate_for_io(&self.geo)
            .map_err(|err| corrupt!("L1 entry {i}: {err}"))?;
        Ok(e)
    }

    /// Set L1 entry `i` in memory (the caller wrote it to disk). `same_content` says the
    /// new table holds the same entries as the old one (a new or copied table), so cached
    /// entries stay valid.
    pub(crate) fn set_l1(&mut self, i: usize, value: u64, same_content: bool) {
        self.l1[i] = value;
        if !same_content {
            self.fast.clear();
        }
    }

    /// Replace the whole L1 table (a larger one; entries unchanged).
    pub(crate) fn replace_l1(&mut self, table: Vec<u64>) {
        debug_assert!(table.len() >= self.l1.len());
        self.l1 = table;
    }

    /// L2 entries per cached slice.
    fn entries_per_slice(&self) -> u64 {
        self.l2.entry_size() as u64 / self.geo.l2_entry_size()
    }

    /// The slot of entry `index` of the L2 table at `l2_table`.
    pub(crate) fn slot_at(&self, l2_table: u64, index: usize) -> L2Slot {
        let per = self.entries_per_slice() as usize;
        L2Slot {
            slice: l2_table + (index / per) as u64 * self.l2.entry_size() as u64,
            index: index % per,
        }
    }

    /// The slot mapping `guest` in the L2 table at `l2_table`.
    pub(crate) fn slot_for(&self, l2_table: u64, guest: u64) -> L2Slot {
        self.slot_at(l2_table, self.geo.l2_index(guest) as usize)
    }

    /// The entry at `slot`, if its slice is cached (marks it recently used).
    pub(crate) fn cached_entry(&mut self, slot: L2Slot) -> Option<L2Entry> {
        let geo = self.geo;
        self.l2
            .get(slot.slice)
            .map(|data| L2Entry::read(data, slot.index, &geo))
    }

    /// Change the entry at `slot` (its slice is cached) for guest offset `guest`.
    pub(crate) fn set_entry(&mut self, slot: L2Slot, guest: u64, e: L2Entry) {
        let geo = self.geo;
        let data = self
            .l2
            .get_mut(slot.slice)
            .expect("slice loaded by the caller");
        e.write(data, slot.index, &geo);
        self.fast.invalidate(guest >> geo.cluster_bits());
    }

    /// Remember a resolved entry for lock-free reads.
    pub(crate) fn remember(&self, guest: u64, e: L2Entry) {
        self.fast.put(guest >> self.geo.cluster_bits(), e);
    }

    /// Remember, for lock-free reads, up to `n` entries after the one at `slot` (mapping
    /// `guest`) in the same cached slice, so that sequential reads keep hitting.
    pub(crate) fn remember_ahead(&self, slot: L2Slot, guest: u64, n: usize) {
        let Some(data) = self.l2.peek(slot.slice) else {
            return;
        };
        let per = self.entries_per_slice() as usize;
        let first = guest >> self.geo.cluster_bits();
        for i in 1..=n.min(per - 1 - slot.index) {
            let e = L2Entry::read(data, slot.index + i, &self.geo);
            if matches!(e.kind(&self.geo), Ok(k) if !matches!(k, qcow2_format::ClusterKind::Compressed(_)))
            {
                self.fast.put(first + i as u64, e);
            }
        }
    }

    /// The slice cache's entry size in bytes.
    pub(crate) fn slice_size(&self) -> usize {
        self.l2.entry_size()
    }

    /// Drop cached slices of a freed table in `[start, end)`.
    pub(crate) fn forget_tables(&mut self, start: u64, end: u64) {
        self.l2.remove_range(start, end);
    }

    /// A cached slice's bytes, without touching its recency.
    pub(crate) fn peek_slice(&self, off: u64) -> Option<&[u8]> {
        self.l2.peek(off)
    }
}
