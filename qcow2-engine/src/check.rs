//! Consistency check with qemu-img check's rules and counters: count every reference the
//! metadata makes (header, tables, L2 tables, data, compressed ranges, refcount
//! structures, persistent bitmaps) and compare with the stored refcounts; check COPIED
//! flags and entries. Memory is one u32 per host cluster of the file; L2 tables are read
//! one at a time.

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
        let was_corrupt = m.corrupt;
        if repair != Repair::None {
            // Repairs may free or move clusters: optimistic readers must re-resolve.
            m.free_gen.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            // A repair allocates (refcount rebuild) even on an image flagged corrupt.
            m.corrupt = false;
        }
        let r = self.check_locked(&mut m, repair, progress);
        match &r {
            // As qemu-img: a repair that leaves no corruption makes the image trusted.
            Ok(rep)
                if repair != Repair::None
                    && rep.corruptions <= rep.corruptions_fixed
                    && rep.check_errors == 0 =>
            {
                m.clear_corrupt()?
            }
            _ => m.corrupt |= was_corrupt,
        }
        r
    }

    fn check_locked(
        &self,
        m: &mut Meta,
        repair: Repair,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        if !m.read_only {
            m.flush()?;
        }
        if repair != Repair::None && m.area.header.autoclear_features != 0 {
            // Sound persistent bitmaps are counted and survive a repair (it changes no
            // guest data). Anything else an autoclear bit vouches for is dropped first,
            // as the first write does, so that a repair frees its clusters as leaks and
            // nothing still trusts it afterwards.
            let file_len = m
                .storage
                .len()
                .map_err(Error::io("reading the image length"))?;
            let mut probe = CheckReport::default();
            crate::check_bitmaps::bitmap_regions(m, &mut probe, file_len, &mut |_, _, _, _| {})?;
            let keep = if probe.corruptions == 0 {
                qcow2_format::features::autoclear::BITMAPS
            } else {
                0
            };
            if m.area.header.autoclear_features & !keep != 0 {
                m.update_header(|h| h.autoclear_features &= keep)?;
                m.sync()?;
            }
        }
        let mut rep = CheckReport {
            total_clusters: self.virtual_size().div_ceil(self.geo.cluster_size()),
            ..Default::default()
        };
        let counted = self.count_refs(m, &mut rep, progress, true)?;
        self.compare_refcounts(m, &mut rep, &counted, repair)?;
        if repair == Repair::All {
            self.repair_all(m, &mut rep, &counted)?;
        }
        self.check_copied(m, &mut rep, repair == Repair::All)?;
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
        // qemu-img's rule: a region ending a cluster or more past the end of the file is a
        // corruption and is not counted; one ending less than a cluster past it is counted
        // (the last cluster may be partly allocated).
        let inc = |r: &mut Refs, rep: &mut CheckReport, off: u64, len: u64, what: &str| {
            if len == 0 {
                return;
            }
            let end = off.saturating_add(len);
            if end >= file_len.saturating_add(cs) {
                rep.corruptions += 1;
                rep.messages.push(format!(
                    "ERROR counting reference for region exceeding the end of the file by one \
                     cluster or more: {what} at offset {off:#x} size {len:#x}"
                ));
                return;
            }
            let (first, last) = (off / cs, (end - 1) / cs);
            if r.refs.len() <= last as usize {
                r.refs.resize(last as usize + 1, 0);
            }
            for c in first..=last {
                let v = &mut r.refs[c as usize];
                *v = v.saturating_add(1);
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
        crate::check_bitmaps::bitmap_regions(m, rep, file_len, &mut |rep, off, len, what| {
            inc(&mut r, rep, off, len, what)
        })?;
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
        // Active L1 first (with allocation statistics), then every snapshot's, one table in
        // memory at a time: a snapshot's L1 may claim up to 32 MiB. Only the part inside the
        // file is read (the rest reads as zeros: unallocated entries), so memory and time
        // stay proportional to the file, not to what the entries claim.
        let snap_l1s: Vec<(u64, u64)> = m
            .snapshots
            .iter()
            .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
            .collect();
        let read_l1 = |m: &Meta, off: u64, bytes: u64| -> Result<Vec<u64>> {
            let in_file = bytes.min(file_len.saturating_sub(off)) / 8 * 8;
            let mut buf = vec![0u8; in_file as usize];
            m.read_host(&mut buf, off, "snapshot L1 table")?;
            Ok(qcow2_format::l1::decode_table(&buf))
        };
        let nonzero = |t: &[u64]| t.iter().filter(|&&e| e != 0).count() as u64;
        let mut total_l2 = nonzero(&m.l1);
        for &(off, bytes) in &snap_l1s {
            total_l2 += nonzero(&read_l1(m, off, bytes)?);
        }
        let mut done = 0u64;
        let mut next_contiguous;
        let mut l2buf = vec![0u8; cs as usize];
        for k in 0..=snap_l1s.len() {
            let (l1, l1_off, l1_bytes, active) = match k.checked_sub(1) {
                None => (m.l1.clone(), h.l1_table_offset, m.l1.len() as u64 * 8, true),
                Some(s) => {
                    let (off, bytes) = snap_l1s[s];
                    (read_l1(m, off, bytes)?, off, bytes, false)
                }
            };
            inc(&mut r, rep, l1_off, l1_bytes, "L1 table");
            for (i, &raw) in l1.iter().enumerate() {
                let e = L1Entry(raw);
                if e.is_unallocated() && raw == 0 {
                    continue;
                }
                // A damaged entry is reported and, as qemu-img does, its table is still
                // walked and counted (masked offset); a repair drops the entry, so its
                // table's entries are never repaired in place.
                let sound = e.validate(&geo).map_err(|err| {
                    rep.corruptions += 1;
                    rep.messages.push(format!(
                        "ERROR L1 entry {i} ({raw:#x}): {err}; L1 entry corrupted"
                    ));
                    if active {
                        r.bad_l1.push(i);
                    }
                });
                if e.is_unallocated() {
                    continue;
                }
                let l2_off = e.l2_offset();
                inc(&mut r, rep, l2_off, cs, "L2 table");
                done += 1;
                progress(done, total_l2);
                // A table (partly) past the end of the file reads zeros there, as in qemu-img.
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
                    let kind = entry.kind(&geo).or_else(|err| {
                        rep.corruptions += 1;
                        rep.messages.push(format!(
                            "ERROR L2 entry {j} of table {l2_off:#x} ({:#x}): {err}",
                            entry.word
                        ));
                        if active && sound.is_ok() {
                            r.bad_entries.push((l2_off, j));
                        }
                        // qemu-img still counts the cluster a damaged uncompressed entry
                        // names (masked offset), not a damaged compressed one.
                        match entry.host_offset() {
                            o if o != 0 && !entry.is_compressed() => {
                                Ok(ClusterKind::Normal { offset: o })
                            }
                            _ => Err(()),
                        }
                    });
                    match kind {
                        Err(()) => {}
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
        // Clusters of the file (and a counted, partly allocated last one), as qemu-img.
        let n = r.refs.len() as u64;
        // A referenced cluster with refcount 0 means the refcount structures must be
        // rebuilt, which only a full repair does; a leaks-only repair then changes nothing.
        if repair == Repair::Leaks {
            for c in 0..n {
                if r.refs[c as usize] > 0 && matches!(m.refcount(c), Ok(0)) {
                    rep.check_errors += 1;
                    return Err(Error::Corrupt(format!(
                        "cluster {c} is in use but its refcount is 0: the refcount structures \
                         need to be rebuilt (repair all); nothing was changed"
                    )));
                }
            }
        }
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
                    // A 64-bit refcount may exceed i64::MAX: drop it in steps.
                    let mut excess = have - want;
                    while excess > 0 {
                        let step = excess.min(i64::MAX as u64);
                        m.update_refcounts(c * cs, 1, -(step as i64))?;
                        excess -= step;
                    }
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
            if e.is_unallocated() || e.validate(&geo).is_err() || i >= m.l1_past_eof {
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
            if e.l2_offset() >= m.alloc_end {
                continue; // a table past the end of the file was reported while counting
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
