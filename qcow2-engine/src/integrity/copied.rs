//! The COPIED check, as qemu-img's: over the active L1 table and the L2 tables it names,
//! COPIED must be set exactly where the stored refcount is 1. It runs after the
//! refcounts were compared (and repaired), so a repair here uses the final refcounts. A
//! full repair always fixes the flags; a leaks-only repair only when nothing else is
//! wrong. A fix that would write into other metadata (an L1 table that doubles as an L2
//! table) fails the check instead, as in qemu-img.

use qcow2_format::l1::{L1E_OFFSET_MASK, OFLAG_COPIED as L1_COPIED};
use qcow2_format::l2::{L2E_OFFSET_MASK, OFLAG_COPIED};
use qcow2_format::L2Entry;

use crate::error::{corrupt, Error, Result};
use crate::integrity::check::CheckReport;
use crate::integrity::overlap::{overlap, Writing};
use crate::integrity::stored::stored_refcount;
use crate::integrity::walk::{self, L1Table, Visitor};
use crate::meta::{Meta, Which};

/// Check (and with `repair`, fix) the COPIED flags of the active tree.
pub(crate) fn check_copied(m: &mut Meta, rep: &mut CheckReport, repair: bool) -> Result<()> {
    // The walk reads tables from the file: it must hold what the cache holds.
    m.write_back(Which::L2)?;
    let file_len = m
        .storage
        .len()
        .map_err(Error::io("reading the image length"))?;
    let mut v = CopiedCheck {
        rep,
        repair,
        file_len,
    };
    walk::walk(m, false, file_len, &mut v)
}

/// A walk visitor.
struct CopiedCheck<'a> {
    rep: &'a mut CheckReport,
    repair: bool,
    file_len: u64,
}

impl CopiedCheck<'_> {
    fn verb(&self) -> &'static str {
        if self.repair {
            "Repairing"
        } else {
            "ERROR"
        }
    }
}

impl Visitor for CopiedCheck<'_> {
    fn l1_table(&mut self, _m: &mut Meta, _t: &L1Table) -> Result<()> {
        Ok(())
    }

    fn l1_entry(&mut self, m: &mut Meta, t: &L1Table, i: usize) -> Result<Option<u64>> {
        let cs = m.cluster_size();
        let e = t.entries[i];
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            return Ok(None);
        }
        // An unreadable refcount is not reported here (counting did); as qemu-img, the
        // table is then not looked at.
        let Some(rc) = stored_refcount(m, l2 / cs, self.file_len)? else {
            return Ok(None);
        };
        if (rc == 1) != (e & L1_COPIED != 0) {
            self.rep.corruptions += 1;
            self.rep.messages.push(format!(
                "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                self.verb()
            ));
            if self.repair {
                let fixed = if rc == 1 {
                    e | L1_COPIED
                } else {
                    e & !L1_COPIED
                };
                // QEMU writes the 512-byte sector holding the entry.
                let sector = (m.header.get().l1_table_offset + i as u64 * 8) & !511;
                if let Some(what) = overlap(m, sector, 512, Writing::ActiveL1) {
                    self.rep.check_errors += 1;
                    m.mark_corrupt();
                    return Err(corrupt!(
                        "cannot repair L1 entry {i}: the L1 table overlaps the {what}"
                    ));
                }
                m.set_l1_entry(i, fixed, true)?;
                self.rep.corruptions -= 1;
                self.rep.corruptions_fixed += 1;
            }
        }
        Ok(Some(l2))
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
        let cs = geo.cluster_size();
        let buf = match table {
            Ok(b) => b,
            Err(err) => {
                self.rep.check_errors += 1;
                return Err(Error::Io {
                    context: format!("reading the L2 table at {l2_off:#x}"),
                    source: err,
                });
            }
        };
        let mut fixes = Vec::new();
        for j in 0..geo.l2_entries() as usize {
            let entry = L2Entry::read(buf, j, &geo);
            let w = entry.word;
            // Normal and preallocated zero clusters, as qemu-img classifies them.
            if w & qcow2_format::compressed::OFLAG_COMPRESSED != 0 || w & L2E_OFFSET_MASK == 0 {
                continue;
            }
            let Some(rc) = stored_refcount(m, (w & L2E_OFFSET_MASK) / cs, self.file_len)? else {
                continue;
            };
            if (rc == 1) == (w & OFLAG_COPIED != 0) {
                continue;
            }
            self.rep.corruptions += 1;
            self.rep.messages.push(format!(
                "{} OFLAG_COPIED data cluster: l2_entry={w:x} refcount={rc}",
                self.verb()
            ));
            if self.repair {
                let word = if rc == 1 {
                    w | OFLAG_COPIED
                } else {
                    w & !OFLAG_COPIED
                };
                fixes.push((j, L2Entry::new(word, entry.bitmap)));
            }
        }
        if fixes.is_empty() {
            return Ok(());
        }
        if let Some(what) = overlap(m, l2_off, cs, Writing::ActiveL2) {
            self.rep.check_errors += 1;
            m.mark_corrupt();
            return Err(corrupt!(
                "cannot repair the L2 table at {l2_off:#x}: it overlaps the {what}"
            ));
        }
        let n = fixes.len() as u64;
        for (j, e) in fixes {
            let guest = ((i as u64) << (geo.l2_bits() + geo.cluster_bits()))
                | ((j as u64) << geo.cluster_bits());
            let slot = m.mapping.slot_at(l2_off, j);
            m.set_l2(slot, guest, e)?;
        }
        m.write_back(Which::L2)?;
        self.rep.corruptions -= n;
        self.rep.corruptions_fixed += n;
        Ok(())
    }
}
