//! Refcount reads and updates, new refcount blocks, and growth of the refcount table.

use qcow2_format::refcount;

use crate::error::{corrupt, Error, Result};
use crate::meta::{Dep, Meta, MetaKind, Which};

impl Meta {
    /// Offset of the refcount block covering host cluster index `c`, or 0.
    pub(crate) fn refblock_for(&self, c: u64) -> Result<u64> {
        let ti = (c >> self.geo.refcount_block_bits()) as usize;
        match self.reftable.get(ti) {
            None | Some(0) => Ok(0),
            Some(&raw) => Ok(refcount::reftable_entry(raw, &self.geo)?),
        }
    }

    /// Refcount of host cluster index `c`.
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let block = self.refblock_for(c)?;
        if block == 0 {
            return Ok(0);
        }
        self.load(Which::Refcount, block)?;
        let idx = (c & (self.geo.refcount_block_entries() - 1)) as usize;
        let order = self.geo.refcount_order();
        let data = self.rb_cache.get(block).expect("just loaded");
        Ok(refcount::get(data, idx, order))
    }

    fn set_refcount_raw(&mut self, c: u64, value: u64) -> Result<()> {
        let block = self.refblock_for(c)?;
        if block == 0 {
            return Err(corrupt!(
                "no refcount block for cluster {:#x}",
                c * self.cluster_size()
            ));
        }
        self.load(Which::Refcount, block)?;
        let idx = (c & (self.geo.refcount_block_entries() - 1)) as usize;
        let order = self.geo.refcount_order();
        let data = self.rb_cache.get_mut(block).expect("just loaded");
        refcount::set(data, idx, order, value)?;
        Ok(())
    }

    /// Add `delta` to the refcounts of `n` clusters from host offset `off`. All or nothing:
    /// an overflow, underflow or missing block fails before anything changes. Refcount
    /// blocks for increments must exist (see `ensure_refblocks`).
    pub(crate) fn update_refcounts(&mut self, off: u64, n: u64, delta: i64) -> Result<Vec<u64>> {
        let first = off >> self.geo.cluster_bits();
        let max = self.geo.refcount_max();
        let bits = self.geo.refcount_bits();
        let mut new = Vec::with_capacity(n as usize);
        for c in first..first + n {
            let cur = self.refcount(c)?;
            let v = refcount::checked_add(cur, delta, max, bits).map_err(|e| match e {
                qcow2_format::FormatError::RefcountOverflow { .. } => Error::TooLarge(format!(
                    "refcount of cluster {:#x} would exceed {bits}-bit refcounts",
                    c * self.cluster_size()
                )),
                other => corrupt!("cluster {:#x}: {other}", c * self.cluster_size()),
            })?;
            if delta > 0 && self.refblock_for(c)? == 0 {
                return Err(corrupt!(
                    "no refcount block for cluster {:#x}",
                    c * self.cluster_size()
                ));
            }
            if v == 0 && delta < 0 && self.is_active_l2_table(c) {
                // Another reference to a cluster the active L1 uses as an L2 table (a
                // refcount too low for its references): freeing it would let the
                // allocator hand the table out as a data cluster.
                self.mark_corrupt();
                return Err(corrupt!(
                    "cluster {:#x} is an L2 table in use, but dropping another reference to it would free it",
                    c * self.cluster_size()
                ));
            }
            new.push(v);
        }
        self.set_dep(if delta > 0 {
            Dep::L2AfterRefcounts
        } else {
            Dep::RefcountsAfterL2
        })?;
        let mut freed = Vec::new();
        for (i, v) in new.into_iter().enumerate() {
            let c = first + i as u64;
            self.set_refcount_raw(c, v)?;
            if v == 0 {
                self.cluster_freed(c);
                freed.push(c);
            }
        }
        Ok(freed)
    }

    /// Whether host cluster index `c` holds an L2 table that the active L1 points at.
    fn is_active_l2_table(&self, c: u64) -> bool {
        let off = c << self.geo.cluster_bits();
        matches!(self.overlapping_meta(off, self.cluster_size()), Some((s, _, MetaKind::ActiveL2)) if s == off)
            && self.l1.iter().any(|&e| {
                let e = qcow2_format::L1Entry(e);
                !e.is_unallocated() && e.l2_offset() == off
            })
    }

    /// A cluster's refcount reached zero: it may be reused, and any cached copy of it as
    /// metadata is stale.
    fn cluster_freed(&mut self, c: u64) {
        let off = c << self.geo.cluster_bits();
        self.free_hint = self.free_hint.min(c);
        self.l2_cache.remove_range(off, off + self.cluster_size());
        self.rb_cache.remove(off);
        if let Some((s, _, k)) = self.overlapping_meta(off, self.cluster_size()) {
            if s == off && matches!(k, MetaKind::ActiveL2) {
                self.remove_meta(s);
            }
        }
    }

    /// Make sure every cluster in `[first, first+n)` has a refcount block. Returns true if
    /// any block was created (the caller's free-space view is then stale).
    pub(crate) fn ensure_refblocks(&mut self, first: u64, n: u64) -> Result<bool> {
        let bits = self.geo.refcount_block_bits();
        let mut created = false;
        let (lo, hi) = (first >> bits, (first + n - 1) >> bits);
        for ti in lo..=hi {
            if self.refblock_for(ti << bits)? == 0 {
                self.create_refblock(ti)?;
                created = true;
            }
        }
        Ok(created)
    }

    /// Create the refcount block for table index `ti`, placed in the range it describes
    /// (at its first cluster not in flight), so it counts itself.
    fn create_refblock(&mut self, ti: u64) -> Result<()> {
        if ti as usize >= self.reftable.len() {
            self.grow_reftable(ti + 1)?;
            if self.refblock_for(ti << self.geo.refcount_block_bits())? != 0 {
                return Ok(()); // growth placed a block here already
            }
        }
        let bits = self.geo.refcount_block_bits();
        let range_start = ti << bits;
        let mut c = range_start;
        while self.inflight.contains_key(&c) || c == 0 {
            c += 1;
        }
        if c >= range_start + (1 << bits) {
            return Err(corrupt!("no room for a refcount block in its own range"));
        }
        let cs = self.cluster_size();
        let off = c * cs;
        self.cancel_deferred_discard(c);
        if let Some((s, e, k)) = self.overlapping_meta(off, cs) {
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
        self.add_meta(off, cs, MetaKind::RefcountBlock);
        // The cluster may hold bytes from here on, whatever happens.
        self.alloc_end = self.alloc_end.max(off + cs);
        if let Err(e) = self.write_host(
            &block,
            off,
            Some(MetaKind::RefcountBlock),
            "new refcount block",
        ) {
            // Not linked: the range is free space again, not metadata.
            self.remove_meta(off);
            return Err(e);
        }
        let entry_off = self.area.header.refcount_table_offset + ti * 8;
        let linked = self.sync().and_then(|()| {
            self.write_host(
                &off.to_be_bytes(),
                entry_off,
                Some(MetaKind::RefcountTable),
                "refcount table entry",
            )
        });
        if let Err(e) = linked {
            // Unreferenced: the block only counted itself.
            self.remove_meta(off);
            return Err(e);
        }
        self.reftable[ti as usize] = off;
        self.install(Which::Refcount, off, block, false)?;
        Ok(())
    }

    /// Grow the refcount table to at least `min_entries`, moving it into a fresh area at
    /// the end of the image that also holds the refcount blocks describing that area.
    pub(crate) fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let old_len = self.reftable.len() as u64;
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
        let start = self.alloc_end.max(self.storage_len_aligned()?) >> cbits;
        // Area: [start, start+clusters) table, then `nb` new blocks; iterate to a fixpoint.
        let mut nb = 0u64;
        let ranges = loop {
            let end = start + clusters + nb;
            let missing: Vec<u64> = ((start >> bbits)..=((end - 1) >> bbits))
                .filter(|&ti| self.reftable.get(ti as usize).copied().unwrap_or(0) == 0)
                .collect();
            if missing.len() as u64 == nb {
                break missing;
            }
            nb = missing.len() as u64;
        };
        let end = start + clusters + nb;
        for c in start..end {
            self.cancel_deferred_discard(c);
        }
        if (end >> bbits) >= entries {
            return Err(Error::TooLarge(
                "refcount table growth does not cover its own area".into(),
            ));
        }
        let order = self.geo.refcount_order();
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        let mut new_blocks: Vec<(u64, Box<[u8]>)> = Vec::new();
        for (i, &ti) in ranges.iter().enumerate() {
            let off = (start + clusters + i as u64) << cbits;
            table[ti as usize] = off;
            new_blocks.push((ti, vec![0u8; cs as usize].into_boxed_slice()));
        }
        // Count the area's clusters in the new blocks, or in existing blocks via the cache.
        for c in start..end {
            let ti = c >> bbits;
            let idx = (c & ((1 << bbits) - 1)) as usize;
            if let Some((_, b)) = new_blocks.iter_mut().find(|(t, _)| *t == ti) {
                refcount::set(b, idx, order, 1)?;
            } else {
                let block = self.refblock_for(c)?;
                self.load(Which::Refcount, block)?;
                let data = self.rb_cache.get_mut(block).expect("loaded");
                if refcount::get(data, idx, order) != 0 {
                    return Err(corrupt!(
                        "cluster {:#x} past the end of the image is in use",
                        c << cbits
                    ));
                }
                refcount::set(data, idx, order, 1)?;
            }
        }
        // From here the area holds bytes even if a write fails: never treat it as fresh
        // (known-zero) space, and retry growth past it.
        self.alloc_end = self.alloc_end.max(end << cbits);
        // Durable order: existing blocks and new blocks and new table, sync, header, sync.
        let table_off = start << cbits;
        let written = (|| -> Result<()> {
            self.write_back(Which::Refcount)?;
            for (i, (_, b)) in new_blocks.iter().enumerate() {
                let off = (start + clusters + i as u64) << cbits;
                self.add_meta(off, cs, MetaKind::RefcountBlock);
                self.write_host(b, off, Some(MetaKind::RefcountBlock), "new refcount block")?;
            }
            self.add_meta(table_off, clusters * cs, MetaKind::RefcountTable);
            let raw = qcow2_format::l1::encode_table(&table);
            self.write_host(
                &raw,
                table_off,
                Some(MetaKind::RefcountTable),
                "new refcount table",
            )?;
            self.sync()
        })();
        if let Err(e) = written {
            // Nothing links the new area; its clusters may be reused (not as fresh space).
            self.remove_meta(table_off);
            for i in 0..new_blocks.len() as u64 {
                self.remove_meta((start + clusters + i) << cbits);
            }
            return Err(e);
        }
        let old_off = self.area.header.refcount_table_offset;
        let old_clusters = u64::from(self.area.header.refcount_table_clusters);
        if let Err(e) = self.update_header(|h| {
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = clusters as u32;
        }) {
            // The old table is still the one on disk; the new area is unreferenced, and
            // counts for it in existing blocks are leaks at worst.
            self.remove_meta(table_off);
            for i in 0..new_blocks.len() as u64 {
                self.remove_meta((start + clusters + i) << cbits);
            }
            return Err(e);
        }
        self.sync()?;
        self.reftable = table;
        self.remove_meta(old_off);
        for (i, (_, b)) in new_blocks.into_iter().enumerate() {
            let off = (start + clusters + i as u64) << cbits;
            self.install(Which::Refcount, off, b, false)?;
        }
        self.alloc_end = self.alloc_end.max(end << cbits);
        self.free_clusters(old_off, old_clusters, crate::policy::FreeReason::Other)?;
        Ok(())
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
