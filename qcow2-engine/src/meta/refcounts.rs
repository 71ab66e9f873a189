//! The refcount component: the refcount table and the refcount block cache, and the one
//! computation of how many refcount table and block clusters a layout needs. Loading a
//! block and the ordering of write-back are the metadata layer's (`order.rs`); growth of
//! the structures is `growth.rs`.

use qcow2_format::{refcount, Geometry};

use super::cache::TableCache;
use crate::error::{corrupt, Error, Result};

/// The refcount component.
pub(crate) struct Refcounts {
    geo: Geometry,
    /// Refcount table, raw entries.
    table: Vec<u64>,
    /// Refcount blocks by host offset.
    pub(super) blocks: TableCache,
}

impl Refcounts {
    pub(crate) fn new(geo: Geometry, table: Vec<u64>, blocks: TableCache) -> Self {
        Refcounts { geo, table, blocks }
    }

    /// The refcount table's raw entries.
    pub(crate) fn table(&self) -> &[u64] {
        &self.table
    }

    /// Offset of the refcount block covering host cluster index `c`, or 0.
    pub(crate) fn block_for(&self, c: u64) -> Result<u64> {
        let ti = (c >> self.geo.refcount_block_bits()) as usize;
        match self.table.get(ti) {
            None | Some(0) => Ok(0),
            Some(&raw) => Ok(refcount::reftable_entry(raw, &self.geo)?),
        }
    }

    fn index_in_block(&self, c: u64) -> usize {
        (c & (self.geo.refcount_block_entries() - 1)) as usize
    }

    /// Refcount of `c` from its block, which the caller loaded.
    pub(crate) fn get_loaded(&mut self, block: u64, c: u64) -> u64 {
        let idx = self.index_in_block(c);
        let order = self.geo.refcount_order();
        let data = self.blocks.get(block).expect("block loaded by the caller");
        refcount::get(data, idx, order)
    }

    /// Set the refcount of `c` in its block, which the caller loaded.
    pub(crate) fn set_loaded(&mut self, block: u64, c: u64, value: u64) -> Result<()> {
        let idx = self.index_in_block(c);
        let order = self.geo.refcount_order();
        let data = self
            .blocks
            .get_mut(block)
            .expect("block loaded by the caller");
        refcount::set(data, idx, order, value)?;
        Ok(())
    }

    /// `cur + delta` within the refcount width, or why not.
    pub(crate) fn checked(&self, c: u64, cur: u64, delta: i64) -> Result<u64> {
        let bits = self.geo.refcount_bits();
        refcount::checked_add(cur, delta, self.geo.refcount_max(), bits).map_err(|e| match e {
            qcow2_format::FormatError::RefcountOverflow { .. } => Error::TooLarge(format!(
                "refcount of cluster {:#x} would exceed {bits}-bit refcounts",
                c << self.geo.cluster_bits()
            )),
            other => corrupt!("cluster {:#x}: {other}", c << self.geo.cluster_bits()),
        })
    }

    /// Set table entry `ti` in memory (the caller wrote it to disk).
    pub(crate) fn set_table_entry(&mut self, ti: usize, off: u64) {
        self.table[ti] = off;
    }

    /// Replace the table (a larger copy, or a rebuilt one). `fresh_cache`: the blocks were
    /// rebuilt elsewhere, drop every cached block.
    pub(crate) fn replace_table(&mut self, table: Vec<u64>, fresh_cache: bool) {
        self.table = table;
        if fresh_cache {
            self.blocks = TableCache::new(self.blocks.entry_size(), self.blocks.capacity());
        }
    }

    /// Forget a cached block (its cluster was freed).
    pub(crate) fn forget_block(&mut self, off: u64) {
        self.blocks.remove(off);
    }
}

/// How many refcount table clusters and refcount block clusters count `fixed` clusters of
/// other content plus themselves: the smallest (table, blocks) fixpoint. Used by create,
/// the repair rebuild, and nothing else should compute it differently.
pub(crate) fn structure_size(geo: &Geometry, fixed: u64) -> (u64, u64) {
    let per_block = geo.refcount_block_entries();
    let cs = geo.cluster_size();
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let blocks = (fixed + rt + rb).div_ceil(per_block);
        let table = (blocks * 8).div_ceil(cs).max(1);
        if (table, blocks) == (rt, rb) {
            return (rt, rb);
        }
        (rt, rb) = (table, blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_counts_itself() {
        for (bits, order, fixed) in [
            (16, 4, 1u64),
            (9, 6, 5000),
            (12, 0, 100_000),
            (16, 4, 1 << 20),
        ] {
            let geo = Geometry::new(bits, false, order).unwrap();
            let (rt, rb) = structure_size(&geo, fixed);
            let per = geo.refcount_block_entries();
            assert!(rb * per >= fixed + rt + rb, "blocks cover everything");
            assert!(rt * geo.cluster_size() / 8 >= rb, "table covers the blocks");
            // Minimal: one block fewer would not do.
            assert!((rb - 1) * per < fixed + rt + rb - 1 || rb == 1);
        }
    }
}
