//! Counting references, as qemu-img check does (its in-memory refcount table): every
//! cluster the header, the L1 and L2 tables (active and snapshots'), the snapshot table,
//! the refcount structures and the persistent bitmaps use, with QEMU's rules for damaged
//! entries: what counts as a corruption, which clusters a damaged entry still counts, and
//! the one entry a full repair fixes while counting (an unaligned preallocated cluster
//! holding no data becomes a zero cluster). Entries QEMU leaves alone stay as they are:
//! a repair never changes what the guest reads there.
//!
//! While counting, `CheckReport::corruptions` and `leaks` hold what is found and not
//! repaired (qemu-img's counters); `check.rs` adds the repaired ones at the end.

use std::collections::BTreeMap;

use qcow2_format::compressed::{CompressedDescriptor, OFLAG_COMPRESSED};
use qcow2_format::l1::{L1E_OFFSET_MASK, L1E_RESERVED_MASK};
use qcow2_format::l2::{
    BITMAP_ALL_ALLOC, BITMAP_ALL_ZEROES, L2E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO,
};
use qcow2_format::refcount::{REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use qcow2_format::{Geometry, L2Entry};

use crate::error::{corrupt, Error, Result};
use crate::integrity::check::CheckReport;
use crate::integrity::overlap::{overlap, Writing};
use crate::integrity::walk::{self, L1Table, Visitor};
use crate::meta::{Meta, Which};

/// Reserved bits of a standard (uncompressed) L2 entry as qemu-img check tests them: bit 0
/// is the zero flag, ignored (not reserved) in extended L2 entries.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// The largest file QEMU can grow an image to when it repairs a refcount block past the
/// end of the file (ext4 with 4 KiB blocks: 16 TiB minus a block). Past it the resize
/// fails (EFBIG) and qemu-img counts the entry as not repaired; this repair never grows
/// the file (it rebuilds instead) but counts as qemu-img does.
pub(crate) const QEMU_GROWABLE_FILE: u64 = (1 << 44) - 4096;

/// The counted references and what counting found.
pub(crate) struct Counted {
    /// References per host cluster: the file's clusters (and a counted, partly allocated
    /// last one), as qemu-img's in-memory refcount table.
    pub refs: Vec<u32>,
    /// References qemu-img would count past the end of the file after growing the file
    /// to hold a refcount block there (full repair only): cluster index -> count.
    pub beyond: BTreeMap<u64, u32>,
    /// The refcount structures must be rebuilt (damaged refcount table entries).
    pub rebuild: bool,
    /// Guest ranges (offset, length) of active entries repaired while counting.
    pub repaired: Vec<(u64, u64)>,
}

/// Count every reference. `fix`: repair what qemu-img check -r all repairs while counting
/// (unaligned preallocated clusters without data, refcount blocks past the end of the
/// file).
pub(crate) fn count_refs(
    m: &mut Meta,
    rep: &mut CheckReport,
    progress: &mut dyn FnMut(u64, u64),
    fix: bool,
) -> Result<Counted> {
    let geo = m.geo;
    let cs = geo.cluster_size();
    let file_len = m
        .storage
        .len()
        .map_err(Error::io("reading the image length"))?;
    let max = geo.refcount_max();
    let mut c = Counter {
        counted: Counted {
            refs: vec![0u32; (geo.align_up(file_len) / cs) as usize],
            beyond: BTreeMap::new(),
            rebuild: false,
            repaired: Vec::new(),
        },
        rep,
        geo,
        file_len,
        cs,
        max,
        fix,
        progress,
        done: 0,
        total: walk::l2_tables(m, true, file_len)?,
    };
    c.inc(0, cs, "header");
    // The active L1 table and its L2 tables, then each snapshot's.
    walk::walk(m, true, file_len, &mut c)?;
    let h = m.header.get().clone();
    if h.nb_snapshots > 0 {
        let len: u64 = m
            .snapshots
            .iter()
            .map(|s| s.to_bytes().map(|b| b.len() as u64).unwrap_or(0))
            .sum();
        c.inc(h.snapshots_offset, len, "snapshot table");
    }
    c.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        "refcount table",
    );
    {
        let Counter {
            counted, rep, max, ..
        } = &mut c;
        crate::integrity::bitmaps::bitmap_regions(m, rep, file_len, &mut |rep, off, len, what| {
            inc(&mut counted.refs, rep, file_len, cs, *max, off, len, what)
        })?;
    }
    c.refcount_blocks(m);
    Ok(c.counted)
}

/// qemu-img's rule: a region ending a cluster or more past the end of the file is a
/// corruption and is not counted; one ending less than a cluster past it is counted (the
/// last cluster may be partly allocated). A refcount already at the width's maximum is a
/// corruption too ("overflow").
#[allow(clippy::too_many_arguments)]
pub(crate) fn inc(
    refs: &mut Vec<u32>,
    rep: &mut CheckReport,
    file_len: u64,
    cs: u64,
    max: u64,
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
            "ERROR: counting reference for region exceeding the end of the file by one \
             cluster or more: offset {off:#x} size {len:#x} ({what})"
        ));
        return;
    }
    let (first, last) = (off / cs, (end - 1) / cs);
    if refs.len() <= last as usize {
        refs.resize(last as usize + 1, 0);
    }
    for c in first..=last {
        let v = &mut refs[c as usize];
        if u64::from(*v) >= max {
            rep.corruptions += 1;
            rep.messages
                .push(format!("ERROR: overflow cluster offset={:#x}", c * cs));
            continue;
        }
        *v += 1;
    }
}

/// The reference counter: a walk visitor.
struct Counter<'a> {
    counted: Counted,
    rep: &'a mut CheckReport,
    geo: Geometry,
    file_len: u64,
    cs: u64,
    max: u64,
    fix: bool,
    progress: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
}

impl Counter<'_> {
    fn inc(&mut self, off: u64, len: u64, what: &str) {
        inc(
            &mut self.counted.refs,
            self.rep,
            self.file_len,
            self.cs,
            self.max,
            off,
            len,
            what,
        );
    }

    fn corruption(&mut self, msg: String) {
        self.rep.corruptions += 1;
        self.rep.messages.push(msg);
    }

    /// The refcount table's entries, as qemu-img's check of refcount blocks: damaged
    /// entries (reserved bits, unaligned) ask for a rebuild; a block past the end of the
    /// file is a corruption (which qemu-img -r all repairs by growing the file: counted
    /// the same, but rebuilt here instead); a block used by anything else (its count is
    /// not 1) asks for a rebuild.
    fn refcount_blocks(&mut self, m: &Meta) {
        let cs = self.cs;
        for (i, &raw) in m.refcounts.table().iter().enumerate() {
            let off = raw & REFT_OFFSET_MASK;
            let cluster = off / cs;
            if raw & REFT_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.counted.rebuild = true;
                continue;
            }
            if off % cs != 0 {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.counted.rebuild = true;
                continue;
            }
            if cluster >= self.counted.refs.len() as u64 {
                let verb = if self.fix { "Repairing" } else { "ERROR" };
                self.rep
                    .messages
                    .push(format!("{verb} refcount block {i} is outside image"));
                if !self.fix {
                    self.rep.corruptions += 1;
                    continue;
                }
                self.counted.rebuild = true;
                if off > i64::MAX as u64 - cs || off + cs > QEMU_GROWABLE_FILE {
                    self.rep.corruptions += 1;
                    self.rep.messages.push(format!(
                        "ERROR refcount block {i} at {off:#x}: the file cannot grow there"
                    ));
                } else {
                    // Repaired (the entry goes away in the rebuild); as qemu-img, which
                    // grows the file, the block's own cluster now counts as used.
                    self.rep.corruptions_fixed += 1;
                    *self.counted.beyond.entry(cluster).or_insert(0) += 1;
                }
                continue;
            }
            if off != 0 {
                self.inc(off, cs, "refcount block");
                let n = self
                    .counted
                    .refs
                    .get(cluster as usize)
                    .copied()
                    .unwrap_or(0);
                if n != 1 {
                    self.corruption(format!("ERROR refcount block {i} refcount={n}"));
                    self.counted.rebuild = true;
                }
            }
        }
    }

    /// One L2 entry, as qemu-img's check of L2 tables. Returns the entry to write back
    /// when it was repaired.
    fn l2_entry(
        &mut self,
        entry: L2Entry,
        ext: bool,
        active: bool,
        next_contiguous: &mut u64,
    ) -> Option<L2Entry> {
        let cs = self.cs;
        let (word, bitmap) = (entry.word, entry.bitmap);
        if word & OFLAG_COMPRESSED != 0 {
            if word & OFLAG_COPIED != 0 {
                let coffset = CompressedDescriptor::decode(word, &self.geo).offset;
                self.corruption(format!(
                    "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed clusters"
                ));
            }
            if ext && bitmap != 0 {
                self.corruption(format!(
                    "ERROR compressed cluster with non-zero subcluster allocation bitmap, entry={word:#x}"
                ));
                return None;
            }
            let d = CompressedDescriptor::decode(word, &self.geo);
            let (s, e) = d.host_range();
            self.inc(s, e - s, "compressed cluster");
            if active {
                self.rep.allocated_clusters += 1;
                self.rep.compressed_clusters += 1;
                // Compressed clusters count as fragmented, as qemu-img.
                self.rep.fragmented_clusters += 1;
            }
            return None;
        }
        if word & L2E_STD_RESERVED_MASK != 0 {
            self.corruption(format!(
                "ERROR found l2 entry with reserved bits set: {word:x}"
            ));
        }
        let offset = word & L2E_OFFSET_MASK;
        let zero_flag = !ext && word & OFLAG_ZERO != 0;
        if offset == 0 {
            if ext && bitmap & BITMAP_ALL_ALLOC != 0 {
                self.corruption(
                    "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
                );
            }
            return None;
        }
        // A normal or preallocated zero cluster.
        if ext && (bitmap >> 32) & bitmap != 0 {
            self.corruption(format!(
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ));
        }
        let mut fixed = None;
        if offset % cs != 0 {
            let contains_data = if ext {
                bitmap & BITMAP_ALL_ALLOC != 0
            } else {
                !zero_flag
            };
            if contains_data {
                self.corruption(format!(
                    "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
            } else if self.fix {
                // Nothing to lose: the cluster reads as zeros (or, for unallocated
                // subclusters, from the backing file) before and after.
                self.rep.messages.push(format!(
                    "Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
                self.rep.corruptions_fixed += 1;
                fixed = Some(if ext {
                    L2Entry::new(0, (bitmap | (bitmap << 32)) & BITMAP_ALL_ZEROES)
                } else {
                    L2Entry::new(OFLAG_ZERO, 0)
                });
            } else {
                self.corruption(format!(
                    "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
            }
        }
        if fixed.is_some() {
            return fixed; // no longer uses the cluster
        }
        if active {
            self.rep.allocated_clusters += 1;
            if *next_contiguous != 0 && offset != *next_contiguous {
                self.rep.fragmented_clusters += 1;
            }
            *next_contiguous = offset + cs;
        }
        // An unaligned offset counts the two clusters the range touches, as qemu-img.
        self.inc(offset, cs, "data cluster");
        None
    }
}

impl Visitor for Counter<'_> {
    fn l1_table(&mut self, _m: &mut Meta, t: &L1Table) -> Result<()> {
        self.inc(t.offset, t.bytes, "L1 table");
        Ok(())
    }

    fn l1_entry(&mut self, _m: &mut Meta, t: &L1Table, i: usize) -> Result<Option<u64>> {
        let raw = t.entries[i];
        if raw & L1E_RESERVED_MASK != 0 {
            self.corruption(format!(
                "ERROR found L1 entry with reserved bits set: {raw:x}"
            ));
        }
        // As qemu-img: whatever the entry names is counted and read as an L2 table, even
        // unaligned (a damaged entry is reported, never repaired: dropping it would
        // change what the guest reads).
        let l2 = raw & L1E_OFFSET_MASK;
        self.inc(l2, self.cs, "L2 table");
        if l2 % self.cs != 0 {
            self.corruption(format!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
        }
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
        let geo = self.geo;
        let buf = match table {
            Ok(b) => b,
            Err(err) => {
                self.rep.check_errors += 1;
                self.rep.messages.push(format!(
                    "ERROR: I/O error in check_refcounts_l2 (L2 table at {l2_off:#x}): {err}"
                ));
                return Ok(());
            }
        };
        let ext = geo.extended_l2();
        // qemu-img tracks contiguity within one L2 table.
        let mut next_contiguous = 0;
        let mut fixes = Vec::new();
        for j in 0..geo.l2_entries() as usize {
            let entry = L2Entry::read(buf, j, &geo);
            if let Some(e) = self.l2_entry(entry, ext, t.active, &mut next_contiguous) {
                fixes.push((j, e));
            }
        }
        if fixes.is_empty() {
            return Ok(());
        }
        let writing = if t.active {
            Writing::ActiveL2
        } else {
            Writing::InactiveL2
        };
        let es = geo.l2_entry_size();
        for (j, e) in fixes {
            if let Some(what) = overlap(m, l2_off + j as u64 * es, es, writing) {
                self.rep.check_errors += 1;
                return Err(corrupt!(
                    "repairing L2 entry {j} of the table at {l2_off:#x}: the table overlaps the {what}"
                ));
            }
            let guest = ((i as u64) << (geo.l2_bits() + geo.cluster_bits()))
                | ((j as u64) << geo.cluster_bits());
            let slot = m.mapping.slot_at(l2_off, j);
            m.set_l2(slot, guest, e)?;
            if t.active {
                self.counted.repaired.push((guest, self.cs));
            }
        }
        // Written now, as qemu-img does: a snapshot sharing the table reads it next.
        m.write_back(Which::L2)
    }
}
