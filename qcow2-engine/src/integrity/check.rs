//! Consistency check with qemu-img check's rules and counters: count every reference the
//! metadata makes (header, tables, L2 tables, data, compressed ranges, refcount
//! structures, persistent bitmaps) and compare with the stored refcounts; check COPIED
//! flags and entries. Memory is one u32 per host cluster of the file; L2 tables are read
//! one at a time.

use qcow2_format::l2::OFLAG_COPIED;
use qcow2_format::{refcount, ClusterKind, L1Entry, L2Entry};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::integrity::walk::{self, L1Table, Visitor};
use crate::meta::{Meta, Which};

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

/// An L2 entry the walk found unusable, for repair: (L1 index, L2 table offset, index).
pub(crate) type BadEntry = (usize, u64, usize);

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
        let mut st = self.lock_quiet()?;
        let m = &mut st.meta;
        let was_corrupt = if repair != Repair::None {
            // Repairs may free or move clusters: optimistic readers must re-resolve.
            m.bump_free_gen();
            // A repair allocates (refcount rebuild) even on an image flagged corrupt.
            m.header.suspend_corrupt()
        } else {
            false
        };
        let r = self.check_locked(&mut st, repair, progress);
        let m = &mut st.meta;
        match &r {
            // As qemu-img: a repair that leaves no corruption makes the image trusted.
            Ok(rep)
                if repair != Repair::None
                    && rep.corruptions <= rep.corruptions_fixed
                    && rep.check_errors == 0 =>
            {
                let storage = m.storage.clone();
                m.header.clear_corrupt(&*storage)?
            }
            _ => m.header.restore_corrupt(was_corrupt),
        }
        r
    }

    fn check_locked(
        &self,
        st: &mut crate::image::State,
        repair: Repair,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        let m = &mut st.meta;
        if !m.read_only {
            m.flush()?;
        }
        if repair != Repair::None && m.header.get().autoclear_features != 0 {
            // Sound persistent bitmaps are counted and survive a repair (it changes no
            // guest data). Anything else an autoclear bit vouches for is dropped first,
            // as the first write does, so that a repair frees its clusters as leaks and
            // nothing still trusts it afterwards.
            let file_len = m
                .storage
                .len()
                .map_err(Error::io("reading the image length"))?;
            let mut probe = CheckReport::default();
            crate::integrity::bitmaps::bitmap_regions(
                m,
                &mut probe,
                file_len,
                &mut |_, _, _, _| {},
            )?;
            let keep = if probe.corruptions == 0 {
                qcow2_format::features::autoclear::BITMAPS
            } else {
                0
            };
            let storage = m.storage.clone();
            m.header.restrict_autoclear(&*storage, keep)?;
            if keep == 0 {
                m.bitmaps
                    .forget("a repair found the bitmaps extension damaged");
            }
        }
        let mut rep = CheckReport {
            total_clusters: self.virtual_size().div_ceil(self.geo.cluster_size()),
            ..Default::default()
        };
        let counted = self.count_refs(m, &mut rep, progress, true)?;
        self.compare_refcounts(m, &mut rep, &counted, repair)?;
        if repair == Repair::All {
            self.repair_all(st, &mut rep, &counted)?;
        }
        let m = &mut st.meta;
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
        let mut c = Counter {
            refs: Refs {
                refs: vec![0u32; nb as usize],
                bad_entries: Vec::new(),
                bad_l1: Vec::new(),
            },
            rep,
            file_len,
            cs,
            progress,
            done: 0,
            total: walk::l2_tables(m, true, file_len)?,
            sound: true,
        };
        let h = m.header.get().clone();
        c.inc(0, cs, "header");
        if with_refcount_structures {
            c.inc(
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
            c.inc(h.snapshots_offset, len, "snapshot table");
        }
        {
            let Counter { refs, rep, .. } = &mut c;
            crate::integrity::bitmaps::bitmap_regions(
                m,
                rep,
                file_len,
                &mut |rep, off, len, what| count(refs, rep, file_len, cs, off, len, what),
            )?;
        }
        for (i, &raw) in m.refcounts.table().to_vec().iter().enumerate() {
            match refcount::reftable_entry(raw, &geo) {
                Ok(0) => {}
                Ok(off) if with_refcount_structures => c.inc(off, cs, "refcount block"),
                Ok(_) => {}
                Err(e) => {
                    c.rep.corruptions += 1;
                    c.rep.messages.push(format!(
                        "ERROR refcount block {i}: {e}; refcount table entry corrupted"
                    ));
                }
            }
        }
        walk::walk(m, true, file_len, &mut c)?;
        Ok(c.refs)
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
                if repair != Repair::None && m.refcounts.block_for(c)? != 0 {
                    m.drop_leaked_refs(c, have - want)?;
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
        // The walk reads tables from the file: it must hold what the cache holds.
        m.write_back(Which::L2)?;
        let file_len = m
            .storage
            .len()
            .map_err(Error::io("reading the image length"))?;
        let mut v = CopiedCheck {
            rep,
            fix,
            table_owned: false,
        };
        walk::walk(m, false, file_len, &mut v)
    }
}

/// qemu-img's rule: a region ending a cluster or more past the end of the file is a
/// corruption and is not counted; one ending less than a cluster past it is counted (the
/// last cluster may be partly allocated).
fn count(
    r: &mut Refs,
    rep: &mut CheckReport,
    file_len: u64,
    cs: u64,
    off: u64,
    len: u64,
    what: &str,
) {
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
}

/// The reference counter: a walk visitor.
struct Counter<'a> {
    refs: Refs,
    rep: &'a mut CheckReport,
    file_len: u64,
    cs: u64,
    progress: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
    /// The current L1 entry is sound (its table's bad entries may be repaired in place).
    sound: bool,
}

impl Counter<'_> {
    fn inc(&mut self, off: u64, len: u64, what: &str) {
        count(
            &mut self.refs,
            self.rep,
            self.file_len,
            self.cs,
            off,
            len,
            what,
        );
    }
}

impl Visitor for Counter<'_> {
    fn l1_table(&mut self, _m: &mut Meta, t: &L1Table) -> Result<()> {
        self.inc(t.offset, t.bytes, "L1 table");
        Ok(())
    }

    fn l1_entry(&mut self, m: &mut Meta, t: &L1Table, i: usize) -> Result<Option<u64>> {
        let raw = t.entries[i];
        let e = L1Entry(raw);
        // A damaged entry is reported and, as qemu-img does, its table is still walked
        // and counted (masked offset); a repair drops the entry, so its table's entries
        // are never repaired in place.
        self.sound = match e.validate(&m.geo) {
            Ok(()) => true,
            Err(err) => {
                self.rep.corruptions += 1;
                self.rep.messages.push(format!(
                    "ERROR L1 entry {i} ({raw:#x}): {err}; L1 entry corrupted"
                ));
                if t.active {
                    self.refs.bad_l1.push(i);
                }
                false
            }
        };
        if e.is_unallocated() {
            return Ok(None);
        }
        let l2 = e.l2_offset();
        self.inc(l2, self.cs, "L2 table");
        self.done += 1;
        (self.progress)(self.done, self.total);
        Ok(Some(l2))
    }

    fn l2_table(
        &mut self,
        m: &mut Meta,
        t: &L1Table,
        i: usize,
        l2_off: u64,
        table: std::io::Result<&[u8]>,
    ) -> Result<()> {
        let geo = m.geo;
        let cs = self.cs;
        let buf = match table {
            Ok(b) => b,
            Err(err) => {
                self.rep.check_errors += 1;
                self.rep
                    .messages
                    .push(format!("ERROR reading L2 table at {l2_off:#x}: {err}"));
                return Ok(());
            }
        };
        // qemu-img tracks contiguity within one L2 table.
        let mut next_contiguous = 0;
        for j in 0..geo.l2_entries() as usize {
            let entry = L2Entry::read(buf, j, &geo);
            let kind = entry.kind(&geo).or_else(|err| {
                self.rep.corruptions += 1;
                self.rep.messages.push(format!(
                    "ERROR L2 entry {j} of table {l2_off:#x} ({:#x}): {err}",
                    entry.word
                ));
                if t.active && self.sound {
                    self.refs.bad_entries.push((i, l2_off, j));
                }
                // qemu-img still counts the cluster a damaged uncompressed entry names
                // (masked offset), not a damaged compressed one.
                match entry.host_offset() {
                    o if o != 0 && !entry.is_compressed() => Ok(ClusterKind::Normal { offset: o }),
                    _ => Err(()),
                }
            });
            match kind {
                Err(()) => {}
                Ok(ClusterKind::Compressed(d)) => {
                    let (s, end) = d.host_range();
                    self.inc(s, end - s, "compressed cluster");
                    if t.active {
                        self.rep.allocated_clusters += 1;
                        self.rep.compressed_clusters += 1;
                        // Compressed clusters count as fragmented, as qemu-img.
                        self.rep.fragmented_clusters += 1;
                    }
                }
                Ok(ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }) => {
                    self.inc(offset, cs, "data cluster");
                    if t.active {
                        self.rep.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.rep.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }
}

/// The COPIED check over the active tree: a walk visitor.
struct CopiedCheck<'a> {
    rep: &'a mut CheckReport,
    fix: bool,
    /// The current L2 table's refcount is 1 (its entries may be fixed in place).
    table_owned: bool,
}

impl Visitor for CopiedCheck<'_> {
    fn l1_table(&mut self, _m: &mut Meta, _t: &L1Table) -> Result<()> {
        Ok(())
    }

    fn l1_entry(&mut self, m: &mut Meta, t: &L1Table, i: usize) -> Result<Option<u64>> {
        let geo = m.geo;
        let e = L1Entry(t.entries[i]);
        if e.is_unallocated() || e.validate(&geo).is_err() || m.mapping.l1_past_eof(i) {
            return Ok(None);
        }
        let rc = m.refcount(e.l2_offset() >> geo.cluster_bits())?;
        if (rc == 1) != e.copied() {
            self.rep.corruptions += 1;
            self.rep.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={rc}",
                e.0
            ));
            if self.fix && rc > 0 {
                m.set_l1_entry(i, L1Entry::new(e.l2_offset(), rc == 1).0, true)?;
                self.rep.corruptions_fixed += 1;
            }
        }
        if e.l2_offset() >= m.alloc.end() {
            return Ok(None); // a table past the end of the file was reported while counting
        }
        self.table_owned = rc == 1;
        Ok(Some(e.l2_offset()))
    }

    fn l2_table(
        &mut self,
        m: &mut Meta,
        _t: &L1Table,
        i: usize,
        l2_off: u64,
        table: std::io::Result<&[u8]>,
    ) -> Result<()> {
        let geo = m.geo;
        let Ok(buf) = table else {
            return Ok(()); // reported while counting
        };
        for j in 0..geo.l2_entries() as usize {
            let entry = L2Entry::read(buf, j, &geo);
            let offset = match entry.kind(&geo) {
                Ok(ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset }) => offset,
                _ => continue,
            };
            let rc = m.refcount(offset >> geo.cluster_bits())?;
            if (rc == 1) == entry.copied() {
                continue;
            }
            self.rep.corruptions += 1;
            self.rep.messages.push(format!(
                "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                entry.word
            ));
            if self.fix && rc > 0 && self.table_owned {
                let word = if rc == 1 {
                    entry.word | OFLAG_COPIED
                } else {
                    entry.word & !OFLAG_COPIED
                };
                let guest = ((i as u64) << (geo.l2_bits() + geo.cluster_bits()))
                    | ((j as u64) << geo.cluster_bits());
                let slot = m.mapping.slot_at(l2_off, j);
                m.set_l2(slot, guest, L2Entry::new(word, entry.bitmap))?;
                self.rep.corruptions_fixed += 1;
            }
        }
        Ok(())
    }
}
