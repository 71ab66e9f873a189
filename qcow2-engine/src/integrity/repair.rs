//! Repair (qemu-img check -r all): drop references that cannot be kept, and rebuild the
//! refcount structure from a fresh count when stored refcounts are too low or damaged.
//! The new refcount table and blocks go after the last cluster in use, describe
//! themselves, and replace the old ones with one header write.

use qcow2_format::l2::BITMAP_ALL_ZEROES;
use qcow2_format::{refcount, L2Entry};

use crate::changes::ChangeKind;
use crate::error::{Error, Result};
use crate::image::{Image, State};
use crate::integrity::check::{CheckReport, Refs};
use crate::meta::{structure_size, Meta, MetaKind, NewTable};

impl Image {
    pub(crate) fn repair_all(
        &self,
        st: &mut State,
        rep: &mut CheckReport,
        counted: &Refs,
    ) -> Result<()> {
        let geo = self.geo;
        let l2_coverage = geo.l2_coverage();
        // Repairs change guest content: the bitmaps mark it (QEMU's repair does not; a
        // backup then copies what a repair made zero).
        for &i in &counted.bad_l1 {
            self.announce(st, i as u64 * l2_coverage, l2_coverage, ChangeKind::Repair)?;
        }
        for &(i, _, j) in &counted.bad_entries {
            let guest = i as u64 * l2_coverage + ((j as u64) << geo.cluster_bits());
            self.announce(st, guest, geo.cluster_size(), ChangeKind::Repair)?;
        }
        let m = &mut st.meta;
        // References that cannot be kept become zero clusters (or unallocated on v2).
        for &i in &counted.bad_l1 {
            m.set_l1_entry(i, 0, false)?;
            rep.corruptions_fixed += 1;
            rep.messages.push(format!(
                "Repairing L1 entry {i}: dropped (unusable L2 table)"
            ));
        }
        for &(i, table, j) in &counted.bad_entries {
            let zero = if geo.extended_l2() {
                L2Entry::new(0, BITMAP_ALL_ZEROES)
            } else if m.header.version() >= 3 {
                L2Entry::new(qcow2_format::l2::OFLAG_ZERO, 0)
            } else {
                L2Entry::UNALLOCATED
            };
            let slot = m.mapping.slot_at(table, j);
            let guest = i as u64 * l2_coverage + ((j as u64) << geo.cluster_bits());
            m.set_l2(slot, guest, zero)?;
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
        if m.refcounts
            .table()
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
        let (rt, rb) = structure_size(&geo, end);
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
        // The old refcount structures stop being metadata (nothing counted them, so the
        // new ones may lie where they were); the new blocks start.
        for s in m
            .regions
            .starts_where(|k| matches!(k, MetaKind::RefcountBlock | MetaKind::RefcountTable))
        {
            m.regions.remove(s);
        }
        m.regions.add(blocks_off, rb * cs, MetaKind::RefcountBlock);
        m.write_meta(
            &blocks,
            blocks_off,
            MetaKind::RefcountBlock,
            "rebuilt refcount blocks",
        )?;
        m.switch_table(
            NewTable {
                kind: MetaKind::RefcountTable,
                off: table_off,
                bytes: &qcow2_format::l1::encode_table(&table),
                what: "rebuilt refcount table",
            },
            |h| {
                h.refcount_table_offset = table_off;
                h.refcount_table_clusters = rt as u32;
            },
        )?;
        m.regions.remove(blocks_off);
        for b in 0..rb {
            m.regions
                .add(blocks_off + b * cs, cs, MetaKind::RefcountBlock);
        }
        m.refcounts.replace_table(table, true);
        m.alloc.reset_hint();
        m.alloc.extend_end((end + rt + rb) * cs);
        Ok(())
    }
}
