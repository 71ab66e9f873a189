//! Repair (qemu-img check -r all): drop references that cannot be kept, and rebuild the
//! refcount structure from a fresh count when stored refcounts are too low or damaged.
//! The new refcount table and blocks go after the last cluster in use, describe
//! themselves, and replace the old ones with one header write.

use qcow2_format::l2::BITMAP_ALL_ZEROES;
use qcow2_format::{refcount, L2Entry};

use crate::cache::TableCache;
use crate::check::{CheckReport, Refs};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::meta::{Meta, MetaKind};

impl Image {
    pub(crate) fn repair_all(
        &self,
        m: &mut Meta,
        rep: &mut CheckReport,
        counted: &Refs,
    ) -> Result<()> {
        let geo = self.geo;
        // References that cannot be kept become zero clusters (or unallocated on v2).
        for &i in &counted.bad_l1 {
            m.set_l1_entry(i, 0)?;
            rep.corruptions_fixed += 1;
            rep.messages.push(format!(
                "Repairing L1 entry {i}: dropped (unusable L2 table)"
            ));
        }
        for &(table, j) in &counted.bad_entries {
            let zero = if geo.extended_l2() {
                L2Entry::new(0, BITMAP_ALL_ZEROES)
            } else if m.area.header.version >= 3 {
                L2Entry::new(qcow2_format::l2::OFLAG_ZERO, 0)
            } else {
                L2Entry::UNALLOCATED
            };
            let slot = m.slot_at(table, j);
            m.l2_set(slot, zero)?;
            rep.corruptions_fixed += 1;
            rep.messages.push(format!(
                "Repairing L2 entry {j} of table {table:#x}: made a zero cluster"
            ));
        }
        m.flush()?;
        // Count again without the refcount structures; rebuild if any stored refcount is
        // too low or any refcount block is unusable.
        let mut scratch = CheckReport::default();
        let fresh = self.count_refs(m, &mut scratch, &mut |_, _| {}, false)?;
        let mut needs_rebuild = scratch.corruptions > 0;
        let mut low = 0u64;
        for (c, &want) in fresh.refs.iter().enumerate() {
            match m.refcount(c as u64) {
                Ok(have) if have >= u64::from(want) => {}
                _ => {
                    needs_rebuild = true;
                    low += 1;
                }
            }
        }
        if m.reftable
            .iter()
            .any(|&e| refcount::reftable_entry(e, &geo).is_err())
        {
            needs_rebuild = true;
        }
        if needs_rebuild {
            rep.messages.push("Rebuilding refcount structure".into());
            self.rebuild_refcounts(m, fresh.refs)?;
            rep.corruptions_fixed = rep.corruptions_fixed.max(rep.corruptions).max(low);
            rep.leaks_fixed = rep.leaks;
        }
        Ok(())
    }

    /// Write a new refcount table and blocks holding `refs` (plus themselves) after the
    /// last used cluster, and switch the header to them.
    pub(crate) fn rebuild_refcounts(&self, m: &mut Meta, mut refs: Vec<u32>) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let per_block = geo.refcount_block_entries();
        let end = refs
            .iter()
            .rposition(|&v| v > 0)
            .map_or(1, |i| i as u64 + 1);
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let blocks = (end + rt + rb).div_ceil(per_block);
            let table = (blocks * 8).div_ceil(cs).max(1);
            if (blocks, table) == (rb, rt) {
                break;
            }
            (rb, rt) = (blocks, table);
        }
        if rt > geo.max_reftable_clusters() {
            return Err(Error::TooLarge(
                "the rebuilt refcount table exceeds 8 MiB".into(),
            ));
        }
        refs.resize((rb * per_block) as usize, 0);
        for c in end..end + rt + rb {
            refs[c as usize] = 1;
        }
        let order = geo.refcount_order();
        let max = geo.refcount_max();
        let table_off = end * cs;
        let blocks_off = (end + rt) * cs;
        let mut table = vec![0u64; (rt * cs / 8) as usize];
        let mut blocks = vec![0u8; (rb * cs) as usize];
        for (c, &v) in refs.iter().enumerate() {
            if u64::from(v) > max {
                return Err(Error::TooLarge(format!(
                    "cluster {c} has {v} references, more than {}-bit refcounts hold",
                    geo.refcount_bits()
                )));
            }
            let b = c as u64 / per_block;
            let blk = &mut blocks[(b * cs) as usize..((b + 1) * cs) as usize];
            refcount::set(blk, (c as u64 % per_block) as usize, order, u64::from(v))?;
        }
        for (b, t) in table.iter_mut().enumerate().take(rb as usize) {
            *t = blocks_off + b as u64 * cs;
        }
        // Old refcount structures stop being metadata; the new ones start.
        let stale: Vec<u64> = m
            .meta_ranges
            .iter()
            .filter(|(_, (_, k))| matches!(k, MetaKind::RefcountBlock | MetaKind::RefcountTable))
            .map(|(s, _)| *s)
            .collect();
        m.storage
            .write_at(&blocks, blocks_off)
            .map_err(Error::io("writing rebuilt refcount blocks"))?;
        m.storage
            .write_at(&qcow2_format::l1::encode_table(&table), table_off)
            .map_err(Error::io("writing the rebuilt refcount table"))?;
        m.sync()?;
        m.update_header(|h| {
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = rt as u32;
        })?;
        m.sync()?;
        for s in stale {
            m.remove_meta(s);
        }
        m.add_meta(table_off, rt * cs, MetaKind::RefcountTable);
        for b in 0..rb {
            m.add_meta(blocks_off + b * cs, cs, MetaKind::RefcountBlock);
        }
        m.reftable = table;
        let entries = m.rb_cache_capacity();
        m.rb_cache = TableCache::new(cs as usize, entries);
        m.free_hint = 0;
        m.alloc_end = m.alloc_end.max((end + rt + rb) * cs);
        Ok(())
    }
}
