//! Consistency check with qemu-img check's rules and counters: count every reference the
//! metadata makes (header, tables, L2 tables, data, compressed ranges, refcount
//! structures) and compare with the stored refcounts; check COPIED flags and entries.
//! Memory is one u32 per host cluster of the file; L2 tables are read one at a time.

use qcow2_format::l2::OFLAG_COPIED;
use qcow2_format::{refcount, ClusterKind, L1Entry, L2Entry};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::meta::Meta;

/// How much `check` may repair (qemu-img check's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Fix leaked clusters (refcount larger than the references).
    Leaks,
    /// Fix everything: rebuild refcounts, fix COPIED flags, drop unkeepable references.
    All,
}

/// What a check found, with qemu-img check's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data (refcount below references, bad entries).
    pub corruptions: u64,
    /// Clusters whose refcount exceeds their references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that stopped part of the check (I/O).
    pub check_errors: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with host data (active L1 only).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their guest predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Human-readable findings, in qemu-img's wording where it has one.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit code class: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}

/// An L2 entry the walk found unusable: (L2 table offset, index) for repair.
pub(crate) type BadEntry = (u64, usize);

/// The counted references.
pub(crate) struct Refs {
    pub refs: Vec<u32>,
    pub bad_entries: Vec<BadEntry>,
    pub bad_l1: Vec<usize>,
}

impl Image {
    /// Check the image; repair as allowed. Flushes first; holds the metadata lock.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.check_with_progress(repair, &mut |_, _| {})
    }

    /// As `check`, reporting progress as (done, total) L2 tables walked.
    pub fn check_with_progress(
        &self,
        repair: Repair,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        if repair != Repair::None && self.read_only {
            return Err(Error::ReadOnly("repair needs a read-write image".into()));
        }
        let mut m = self.lock();
        if !m.read_only {
            m.flush()?;
        }
        let mut rep = CheckReport {
            total_clusters: self.virtual_size().div_ceil(self.geo.cluster_size()),
            ..Default::default()
        };
        let counted = self.count_refs(&mut m, &mut rep, progress, true)?;
        self.compare_refcounts(&mut m, &mut rep, &counted, repair)?;
        if repair == Repair::All {
            self.repair_all(&mut m, &mut rep, &counted)?;
        }
        self.check_copied(&mut m, &mut rep, repair == Repair::All)?;
        if !m.read_only && repair != Repair::None {
            m.flush()?;
        }
        Ok(rep)
    }

    /// Count every reference the metadata makes.
    pub(crate) fn count_refs(
        &self,
        m: &mut Meta,
        rep: &mut CheckReport,
        progress: &mut dyn FnMut(u64, u64),
        with_refcount_structures: bool,
    ) -> Result<Refs> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let file_len = m
            .storage
            .len()
            .map_err(Error::io("reading the image length"))?;
        let nb = geo.align_up(file_len) / cs;
        let mut r = Refs {
            refs: vec![0u32; nb as usize],
            bad_entries: Vec::new(),
            bad_l1: Vec::new(),
        };
        let inc = |r: &mut Refs, rep: &mut CheckReport, off: u64, len: u64, what: &str| {
            if len == 0 {
                return;
            }
            let (first, last) = (off / cs, (off + len - 1) / cs);
            for c in first..=last {
                match r.refs.get_mut(c as usize) {
                    Some(v) => *v = v.saturating_add(1),
                    None => {
                        rep.corruptions += 1;
                        rep.messages.push(format!(
                            "ERROR {what} at {:#x} is beyond the end of the image file ({file_len:#x})",
                            c * cs
                        ));
                        return;
                    }
                }
            }
        };
        let h = m.area.header.clone();
        inc(&mut r, rep, 0, cs, "header");
        if with_refcount_structures {
            inc(
                &mut r,
                rep,
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
                "refcount table",
            );
        }
        if h.nb_snapshots > 0 {
            let len: u64 = m
                .snapshots
                .iter()
                .map(|s| s.to_bytes().map(|b| b.len() as u64).unwrap_or(0))
                .sum();
            inc(&mut r, rep, h.snapshots_offset, len, "snapshot table");
        }
        for (i, &raw) in m.reftable.clone().iter().enumerate() {
            match refcount::reftable_entry(raw, &geo) {
                Ok(0) => {}
                Ok(off) if with_refcount_structures => inc(&mut r, rep, off, cs, "refcount block"),
                Ok(_) => {}
                Err(e) => {
                    rep.corruptions += 1;
                    rep.messages.push(format!(
                        "ERROR refcount block {i}: {e}; refcount table entry corrupted"
                    ));
                }
            }
        }
        // Active L1 first (with allocation statistics), then every snapshot's.
        let mut tables: Vec<(Vec<u64>, u64, bool)> = vec![(m.l1.clone(), h.l1_table_offset, true)];
        for s in m.snapshots.clone() {
            let mut buf = vec![0u8; s.l1_size as usize * 8];
            m.read_host(&mut buf, s.l1_table_offset, "snapshot L1 table")?;
            tables.push((
                qcow2_format::l1::decode_table(&buf),
                s.l1_table_offset,
                false,
            ));
        }
        let total_l2: u64 = tables
            .iter()
            .map(|(t, _, _)| t.iter().filter(|&&e| e != 0).count() as u64)
            .sum();
        let mut done = 0u64;
        let mut next_contiguous;
        let mut l2buf = vec![0u8; cs as usize];
        for (l1, l1_off, active) in tables {
            inc(&mut r, rep, l1_off, l1.len() as u64 * 8, "L1 table");
            for (i, &raw) in l1.iter().enumerate() {
                let e = L1Entry(raw);
                if e.is_unallocated() && raw == 0 {
                    continue;
                }
                if let Err(err) = e.validate(&geo) {
                    rep.corruptions += 1;
                    rep.messages.push(format!(
                        "ERROR L1 entry {i} ({raw:#x}): {err}; L1 entry corrupted"
                    ));
                    if active {
                        r.bad_l1.push(i);
                    }
                    continue;
                }
                if e.is_unallocated() {
                    continue;
                }
                let l2_off = e.l2_offset();
                inc(&mut r, rep, l2_off, cs, "L2 table");
                done += 1;
                progress(done, total_l2);
                if l2_off + cs > file_len {
                    continue; // already counted as a corruption
                }
                if let Err(err) = m.storage.read_at(&mut l2buf, l2_off) {
                    rep.check_errors += 1;
                    rep.messages
                        .push(format!("ERROR reading L2 table at {l2_off:#x}: {err}"));
                    continue;
                }
                // qemu-img tracks contiguity within one L2 table.
                next_contiguous = 0;
                for j in 0..geo.l2_entries() as usize {
                    let entry = L2Entry::read(&l2buf, j, &geo);
                    match entry.kind(&geo) {
                        Err(err) => {
                            rep.corruptions += 1;
                            rep.messages.push(format!(
                                "ERROR L2 entry {j} of table {l2_off:#x} ({:#x}): {err}",
                                entry.word
                            ));
                            if active {
                                r.bad_entries.push((l2_off, j));
                            }
                        }
                        Ok(ClusterKind::Compressed(d)) => {
                            let (s, end) = d.host_range();
                            inc(&mut r, rep, s, end - s, "compressed cluster");
                            if active {
                                rep.allocated_clusters += 1;
                                rep.compressed_clusters += 1;
                                // Compressed clusters count as fragmented, as qemu-img.
                                rep.fragmented_clusters += 1;
                            }
                        }
                        Ok(ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }) => {
                            inc(&mut r, rep, offset, cs, "data cluster");
                            if active {
                                rep.allocated_clusters += 1;
                                if next_contiguous != 0 && offset != next_contiguous {
                                    rep.fragmented_clusters += 1;
                                }
                                next_contiguous = offset + cs;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
        Ok(r)
    }

    /// Compare stored refcounts with the counted references; fix leaks if allowed.
    pub(crate) fn compare_refcounts(
        &self,
        m: &mut Meta,
        rep: &mut CheckReport,
        r: &Refs,
        repair: Repair,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let reach = (m.reftable.len() as u64) << self.geo.refcount_block_bits();
        let n = (r.refs.len() as u64).max(reach.min(r.refs.len() as u64 + 1));
        let mut highest = 0u64;
        for c in 0..n {
            let want = u64::from(r.refs.get(c as usize).copied().unwrap_or(0));
            let have = match m.refcount(c) {
                Ok(v) => v,
                Err(_) => continue, // a bad refcount block, already reported
            };
            if have > 0 || want > 0 {
                highest = c;
            }
            if have == want {
                continue;
            }
            if have < want {
                rep.corruptions += 1;
                rep.messages.push(format!(
                    "ERROR cluster {c} refcount={have} reference={want}"
                ));
            } else {
                rep.leaks += 1;
                rep.messages.push(format!(
                    "Leaked cluster {c} refcount={have} reference={want}"
                ));
                if repair != Repair::None && m.refblock_for(c)? != 0 {
                    m.update_refcounts(c * cs, 1, want as i64 - have as i64)?;
                    rep.leaks_fixed += 1;
                    rep.messages.push(format!(
                        "Repairing cluster {c} refcount={have} reference={want}"
                    ));
                }
            }
        }
        rep.image_end_offset = (highest + 1) * cs;
        Ok(())
    }

    /// COPIED must be set exactly where the refcount is 1 (active L1 and its L2 tables).
    fn check_copied(&self, m: &mut Meta, rep: &mut CheckReport, fix: bool) -> Result<()> {
        let geo = self.geo;
        for i in 0..m.l1.len() {
            let e = L1Entry(m.l1[i]);
            if e.is_unallocated() || e.validate(&geo).is_err() {
                continue;
            }
            let rc = m.refcount(e.l2_offset() >> geo.cluster_bits())?;
            if (rc == 1) != e.copied() {
                rep.corruptions += 1;
                rep.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={rc}",
                    e.0
                ));
                if fix && rc > 0 {
                    m.set_l1_entry(i, L1Entry::new(e.l2_offset(), rc == 1).0)?;
                    rep.corruptions_fixed += 1;
                }
            }
            let table_owned = rc == 1;
            for j in 0..geo.l2_entries() {
                let guest = ((i as u64) << (geo.l2_bits() + geo.cluster_bits()))
                    | (j << geo.cluster_bits());
                let (entry, slot) = m.l2_lookup(guest)?;
                let offset = match entry.kind(&geo) {
                    Ok(ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }) => {
                        offset
                    }
                    _ => continue,
                };
                let rc = m.refcount(offset >> geo.cluster_bits())?;
                if (rc == 1) != entry.copied() {
                    rep.corruptions += 1;
                    rep.messages.push(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                        entry.word
                    ));
                    if fix && rc > 0 && table_owned {
                        let word = if rc == 1 {
                            entry.word | OFLAG_COPIED
                        } else {
                            entry.word & !OFLAG_COPIED
                        };
                        m.l2_set(
                            slot.expect("allocated table"),
                            L2Entry::new(word, entry.bitmap),
                        )?;
                        rep.corruptions_fixed += 1;
                    }
                }
            }
        }
        Ok(())
    }
}
