//! Growth of the refcount structures: a new refcount block placed inside the range it
//! describes (so it counts itself), and a larger refcount table moved to a fresh area at
//! the end of the image together with the blocks that describe that area.

use qcow2_format::refcount;

use super::{Meta, MetaKind, NewTable, Which};
use crate::error::{corrupt, Error, Result};

impl Meta {
    /// Make sure every cluster in `[first, first+n)` has a refcount block. Returns true if
    /// any block was created (the caller's free-space view is then stale).
    pub(crate) fn ensure_refblocks(&mut self, first: u64, n: u64) -> Result<bool> {
        let bits = self.geo.refcount_block_bits();
        let mut created = false;
        let (lo, hi) = (first >> bits, (first + n - 1) >> bits);
        for ti in lo..=hi {
            if self.refblock(ti << bits)? == 0 {
                self.create_refblock(ti)?;
                created = true;
            }
        }
        Ok(created)
    }

    /// Create the refcount block for table index `ti`, placed in the range it describes
    /// (at its first cluster not pinned), so it counts itself.
    fn create_refblock(&mut self, ti: u64) -> Result<()> {
        if ti as usize >= self.refcounts.table().len() {
            self.grow_reftable(ti + 1)?;
            if self
                .refcounts
                .block_for(ti << self.geo.refcount_block_bits())?
                != 0
            {
                return Ok(()); // growth placed a block here already
            }
        }
        let bits = self.geo.refcount_block_bits();
        let range_start = ti << bits;
        let mut c = range_start;
        while self.alloc.is_pinned(c) || c == 0 {
            c += 1;
        }
        if c >= range_start + (1 << bits) {
            return Err(corrupt!("no room for a refcount block in its own range"));
        }
        let cs = self.cluster_size();
        let off = c * cs;
        self.host_ops.cancel(c);
        if let Some((s, e, k)) = self.regions.overlapping(off, cs) {
            return Err(corrupt!(
                "refcount block placement at {off:#x} overlaps {k:?} at {s:#x}..{e:#x} (cluster in use without a refcount)"
            ));
        }
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        refcount::set(
            &mut block,
            (c - range_start) as usize,
            self.geo.refcount_order(),
            1,
        )?;
        self.regions.add(off, cs, MetaKind::RefcountBlock);
        // The cluster may hold bytes from here on, whatever happens.
        self.alloc.extend_end(off + cs);
        if let Err(e) = self.write_meta(&block, off, MetaKind::RefcountBlock, "new refcount block")
        {
            // Not linked: the range is free space again, not metadata.
            self.regions.remove(off);
            return Err(e);
        }
        let entry_off = self.header.get().refcount_table_offset + ti * 8;
        let linked = self.sync().and_then(|()| {
            self.write_meta(
                &off.to_be_bytes(),
                entry_off,
                MetaKind::RefcountTable,
                "refcount table entry",
            )
        });
        if let Err(e) = linked {
            // Unreferenced: the block only counted itself.
            self.regions.remove(off);
            return Err(e);
        }
        self.refcounts.set_table_entry(ti as usize, off);
        self.install(Which::Refcount, off, block, false)?;
        Ok(())
    }

    /// Grow the refcount table to at least `min_entries`, moving it into a fresh area at
    /// the end of the image that also holds the refcount blocks describing that area.
    pub(crate) fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let old_len = self.refcounts.table().len() as u64;
        let want = min_entries.max(old_len + old_len / 2 + 1);
        let mut clusters = want.div_ceil(per_cluster);
        let max = self.geo.max_reftable_clusters();
        if clusters > max {
            clusters = max;
            if clusters * per_cluster < min_entries {
                return Err(Error::TooLarge(format!(
                    "the refcount table would need more than {max} clusters (QCOW_MAX_REFTABLE_SIZE 8 MiB)"
                )));
            }
        }
        let entries = clusters * per_cluster;
        let cbits = self.geo.cluster_bits();
        let bbits = self.geo.refcount_block_bits();
        let start = self.alloc.end().max(self.storage_len_aligned()?) >> cbits;
        // Area: [start, start+clusters) table, then `nb` new blocks; iterate to a fixpoint.
        let mut nb = 0u64;
        let missing = loop {
            let end = start + clusters + nb;
            let missing: Vec<u64> = ((start >> bbits)..=((end - 1) >> bbits))
                .filter(|&ti| {
                    self.refcounts
                        .table()
                        .get(ti as usize)
                        .copied()
                        .unwrap_or(0)
                        == 0
                })
                .collect();
            if missing.len() as u64 == nb {
                break missing;
            }
            nb = missing.len() as u64;
        };
        let end = start + clusters + nb;
        for c in start..end {
            self.host_ops.cancel(c);
        }
        if (end >> bbits) >= entries {
            return Err(Error::TooLarge(
                "refcount table growth does not cover its own area".into(),
            ));
        }
        let order = self.geo.refcount_order();
        let mut table = self.refcounts.table().to_vec();
        table.resize(entries as usize, 0);
        let mut new_blocks: Vec<(u64, Box<[u8]>)> = Vec::new();
        for (i, &ti) in missing.iter().enumerate() {
            table[ti as usize] = (start + clusters + i as u64) << cbits;
            new_blocks.push((ti, vec![0u8; cs as usize].into_boxed_slice()));
        }
        // Count the area's clusters in the new blocks, or in existing blocks via the cache.
        for c in start..end {
            let ti = c >> bbits;
            let idx = (c & ((1 << bbits) - 1)) as usize;
            if let Some((_, b)) = new_blocks.iter_mut().find(|(t, _)| *t == ti) {
                refcount::set(b, idx, order, 1)?;
            } else {
                let block = self.refblock(c)?;
                self.load(Which::Refcount, block)?;
                if self.refcounts.get_loaded(block, c) != 0 {
                    return Err(corrupt!(
                        "cluster {:#x} past the end of the image is in use",
                        c << cbits
                    ));
                }
                self.refcounts.set_loaded(block, c, 1)?;
            }
        }
        // From here the area holds bytes even if a write fails: never treat it as fresh
        // (known-zero) space, and retry growth past it.
        self.alloc.extend_end(end << cbits);
        let table_off = start << cbits;
        let block_off = |i: usize| (start + clusters + i as u64) << cbits;
        // Durable order: existing blocks, new blocks and new table, sync, header, sync.
        let blocks_written = (|| -> Result<()> {
            self.write_back(Which::Refcount)?;
            for (i, (_, b)) in new_blocks.iter().enumerate() {
                self.regions.add(block_off(i), cs, MetaKind::RefcountBlock);
                self.write_meta(
                    b,
                    block_off(i),
                    MetaKind::RefcountBlock,
                    "new refcount block",
                )?;
            }
            Ok(())
        })();
        let old_off = self.header.get().refcount_table_offset;
        let old_clusters = u64::from(self.header.get().refcount_table_clusters);
        let switched = blocks_written.and_then(|()| {
            self.switch_table(
                NewTable {
                    kind: MetaKind::RefcountTable,
                    off: table_off,
                    bytes: &qcow2_format::l1::encode_table(&table),
                    what: "new refcount table",
                },
                |h| {
                    h.refcount_table_offset = table_off;
                    h.refcount_table_clusters = clusters as u32;
                },
            )
        });
        let synced = match switched {
            Ok(synced) => synced,
            Err(e) => {
                // Nothing links the new area; its clusters may be reused (not as fresh
                // space). Counts for it in existing blocks are leaks at worst.
                for i in 0..new_blocks.len() {
                    self.regions.remove(block_off(i));
                }
                return Err(e);
            }
        };
        // The header names the new table: finish the switch even if its sync failed.
        self.refcounts.replace_table(table, false);
        self.regions.remove(old_off);
        for (i, (_, b)) in new_blocks.into_iter().enumerate() {
            self.install(Which::Refcount, block_off(i), b, false)?;
        }
        self.free_clusters(old_off, old_clusters, self.metadata_on_free)?;
        synced
    }

    /// Storage length rounded up to a cluster.
    pub(crate) fn storage_len_aligned(&self) -> Result<u64> {
        let len = self
            .storage
            .len()
            .map_err(Error::io("reading the image length"))?;
        Ok(self.geo.align_up(len))
    }
}
