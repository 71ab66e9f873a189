//! Consistency check and repair with qemu-img check's rules, counters and order: count
//! every reference the metadata makes (`count`), compare with the stored refcounts
//! (`stored`), rebuild the refcount structures when a used cluster has none (`repair`),
//! then check the COPIED flags (`copied`). Memory is one u32 per host cluster of the
//! file; L2 tables are read one at a time.
//!
//! Where qemu-img repairs, the repair gives its result: the same counters and exit code,
//! the same layout of rebuilt structures, the leaks a rebuild leaves repaired in the same
//! run. Where qemu-img leaves an entry alone (a damaged L1 entry, an unaligned cluster
//! holding data) it stays, so what the guest reads never changes. Two deliberate
//! differences, both where qemu-img fails or grows the file: a refcount block past the
//! end of the file is rebuilt away instead of growing the file to it (counted as
//! qemu-img counts), and an unaligned refcount block is rebuilt in one run where
//! qemu-img's own overlap check stops it half-way (needing a second run).

use crate::changes::ChangeKind;
use crate::error::{corrupt, Error, Result};
use crate::image::Image;
use crate::integrity::count::{count_refs, Counted};
use crate::integrity::stored::{set_stored_refcount, stored_refcount};
use crate::meta::{Meta, OnFree};

/// How much `check` may repair (qemu-img check's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Fix leaked clusters (refcount larger than the references).
    Leaks,
    /// Fix what qemu-img check -r all fixes: refcounts (rebuilt when needed), COPIED
    /// flags, unaligned preallocated clusters holding no data.
    All,
}

/// What a check found, with qemu-img check's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies found that can lose data (refcount below references, bad
    /// entries), repaired or not.
    pub corruptions: u64,
    /// Clusters found whose refcount exceeds their references, repaired or not.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that stopped part of the check (I/O, unreadable refcounts).
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

/// What comparing stored refcounts with the count found.
struct Compared {
    /// A used cluster has refcount 0: the structures must be rebuilt.
    rebuild: bool,
    /// The last cluster with a reference or a refcount.
    highest: u64,
    /// Clusters whose refcount could not be read (refcount block unaligned or out of reach).
    unreadable: u64,
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
            // As qemu-img: a repair that leaves no corruption makes the image trusted (and
            // clean, if an earlier writer left it dirty), unless the metadata still
            // collides somewhere the check does not count.
            Ok(rep)
                if repair != Repair::None
                    && rep.corruptions <= rep.corruptions_fixed
                    && rep.check_errors == 0 =>
            {
                let problems = crate::lifecycle::open::remap_regions(m)?;
                let storage = m.storage.clone();
                m.header.clear_stale_dirty(&*storage)?;
                if problems.is_empty() {
                    m.header.clear_corrupt(&*storage)?
                } else {
                    m.header.restore_corrupt(true)
                }
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
        let fix_all = repair == Repair::All;
        let mut counted = count_refs(m, &mut rep, progress, fix_all)?;
        // Repairs change guest content: the bitmaps mark it (QEMU's repair does not; a
        // backup then copies what a repair made zero).
        for &(off, len) in &counted.repaired {
            self.announce(st, off, len, ChangeKind::Repair)?;
        }
        let m = &mut st.meta;
        let before_compare = rep.clone();
        let mut cmp = compare(m, &mut rep, &counted, Repair::None)?;
        if (cmp.rebuild || counted.rebuild) && fix_all {
            cmp = rebuild(m, &mut rep, &mut counted, cmp.unreadable)?;
        } else if repair != Repair::None {
            if cmp.rebuild || counted.rebuild {
                rep.check_errors += 1;
                return Err(corrupt!(
                    "a cluster in use has refcount 0 or a refcount table entry is damaged: \
                     the refcount structures need to be rebuilt (repair all); nothing was \
                     changed"
                ));
            }
            if rep.leaks > 0 || rep.corruptions > 0 {
                rep = before_compare;
                cmp = compare(m, &mut rep, &counted, repair)?;
            }
        }
        // qemu-img repairs COPIED flags in a leaks-only repair only when nothing else
        // is wrong (the refcounts are then right).
        let copied_repair = fix_all
            || (repair == Repair::Leaks
                && rep.check_errors == 0
                && rep.corruptions == 0
                && rep.leaks == 0);
        crate::integrity::copied::check_copied(m, &mut rep, copied_repair)?;
        rep.image_end_offset = (cmp.highest + 1) * self.geo.cluster_size();
        if !m.read_only && repair != Repair::None {
            m.flush()?;
        }
        // Found = still there + repaired.
        rep.corruptions += rep.corruptions_fixed;
        rep.leaks += rep.leaks_fixed;
        Ok(rep)
    }
}

/// The rebuild branch of a full repair, as qemu-img: new structures from the count, a
/// fresh count against them whose leaks (the old structures) are repaired without being
/// reported, and the counters moved from found to repaired.
fn rebuild(
    m: &mut Meta,
    rep: &mut CheckReport,
    counted: &mut Counted,
    unreadable: u64,
) -> Result<Compared> {
    rep.messages.push("Rebuilding refcount structure".into());
    // Refcounts that could not be read are rebuilt, not check errors (qemu-img stops
    // there and needs a second run).
    rep.check_errors -= unreadable;
    let old = rep.clone();
    crate::integrity::repair::rebuild_refcounts(m, &mut counted.refs)?;
    let mut again = CheckReport::default();
    let fresh = count_refs(m, &mut again, &mut |_, _| {}, false)?;
    rep.messages.append(&mut again.messages);
    rep.corruptions = again.corruptions;
    rep.check_errors += again.check_errors;
    rep.leaks = 0;
    let mut leaks = CheckReport::default();
    let cmp = compare(m, &mut leaks, &fresh, Repair::Leaks)?;
    rep.messages.append(&mut leaks.messages);
    if cmp.rebuild {
        rep.messages
            .push("ERROR rebuilt refcount structure is still broken".into());
    }
    rep.check_errors += leaks.check_errors;
    if rep.corruptions < old.corruptions {
        rep.corruptions_fixed += old.corruptions - rep.corruptions;
    }
    if rep.leaks < old.leaks {
        rep.leaks_fixed += old.leaks - rep.leaks;
    }
    rep.leaks += leaks.leaks;
    Ok(cmp)
}

/// Compare stored refcounts with the count, as qemu-img: a used cluster with refcount 0
/// asks for a rebuild; with `fix`, leaks (Leaks, All) and refcounts too low but not 0
/// (All) are set right in place.
fn compare(m: &mut Meta, rep: &mut CheckReport, c: &Counted, fix: Repair) -> Result<Compared> {
    let file_len = m
        .storage
        .len()
        .map_err(Error::io("reading the image length"))?;
    let mut out = Compared {
        rebuild: false,
        highest: 0,
        unreadable: 0,
    };
    let n = c.refs.len() as u64;
    let candidates = (0..n).chain(beyond_candidates(m, c, n, file_len)?);
    for cl in candidates {
        let want = if cl < n {
            u64::from(c.refs[cl as usize])
        } else {
            u64::from(c.beyond.get(&cl).copied().unwrap_or(0))
        };
        let Some(have) = stored_refcount(m, cl, file_len)? else {
            rep.check_errors += 1;
            out.unreadable += 1;
            rep.messages.push(format!(
                "Can't get refcount for cluster {cl}: its refcount block is unaligned or out of reach"
            ));
            continue;
        };
        if have > 0 || want > 0 {
            out.highest = cl;
        }
        if have == want {
            continue;
        }
        let fixing = (have > want && have > 0 && fix != Repair::None)
            || (have < want && have > 0 && fix == Repair::All);
        let verb = if fixing {
            "Repairing"
        } else if have < want {
            "ERROR"
        } else {
            "Leaked"
        };
        rep.messages.push(format!(
            "{verb} cluster {cl} refcount={have} reference={want}"
        ));
        if have == 0 {
            out.rebuild = true;
        }
        if fixing {
            let done = if have > want {
                let ok = m.drop_leaked_refs(cl, have - want).is_ok();
                // A freed leak goes back to the host, as qemu-img's repair discards it
                // (unless the policy keeps freed clusters allocated on the host).
                if ok && want == 0 && m.metadata_on_free == OnFree::Discard {
                    m.defer_discard(cl)?;
                }
                ok
            } else {
                set_stored_refcount(m, cl, want).is_ok()
            };
            if done {
                if have > want {
                    rep.leaks_fixed += 1;
                } else {
                    rep.corruptions_fixed += 1;
                }
                continue;
            }
        }
        if have < want {
            rep.corruptions += 1;
        } else {
            rep.leaks += 1;
        }
    }
    Ok(out)
}

/// Clusters past the count's end that qemu-img, having grown the file to hold a refcount
/// block past its end, would compare too: those blocks' clusters, and any cluster in
/// between whose stored refcount is not 0 (found by scanning the refcount blocks inside
/// the file that cover that range, never the whole range).
fn beyond_candidates(m: &mut Meta, c: &Counted, n: u64, file_len: u64) -> Result<Vec<u64>> {
    let Some(&last) = c.beyond.keys().next_back() else {
        return Ok(Vec::new());
    };
    let geo = m.geo;
    let cs = geo.cluster_size();
    let per = geo.refcount_block_entries();
    let mut out: Vec<u64> = c.beyond.keys().copied().collect();
    let table: Vec<u64> = m.refcounts.table().to_vec();
    for (ti, &raw) in table.iter().enumerate() {
        let off = raw & qcow2_format::refcount::REFT_OFFSET_MASK;
        let (lo, hi) = (ti as u64 * per, (ti as u64 + 1) * per);
        if off == 0 || off % cs != 0 || off >= file_len || hi <= n || lo > last {
            continue;
        }
        for cl in lo.max(n)..hi.min(last + 1) {
            if !c.beyond.contains_key(&cl) && stored_refcount(m, cl, file_len)? != Some(0) {
                out.push(cl);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}
