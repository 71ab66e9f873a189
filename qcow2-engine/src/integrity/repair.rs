//! Rebuilding the refcount structures from a fresh count (qemu-img check -r all, when a
//! used cluster has refcount 0 or a refcount table entry is damaged), placed as qemu-img
//! places them: each refcount block in the first free cluster at or after the start of
//! the range it describes, then the refcount table in the first free run from the start
//! of the file, again (and the blocks describing it) while the table grows. Free means
//! unused in the count, which includes the old structures: nothing live is overwritten,
//! so a crash before the header switch leaves the image as it was. The old structures
//! are leaks afterwards, repaired in the same check. The file grows only where qemu-img's
//! would; the whole layout is decided in memory and each block is written once.

use qcow2_format::refcount;

use crate::error::{Error, Result};
use crate::meta::{Meta, MetaKind, NewTable};

/// The refcount table being laid out: entry `i` holds block `i`'s cluster index (0: none).
struct Layout<'a> {
    refs: &'a mut Vec<u32>,
    per_block: u64,
    entries_per_cluster: u64,
    table: Vec<u64>,
}

impl Layout<'_> {
    /// First fit of `count` free clusters at or after `*first_free`, growing the count
    /// past the end as needed, marked used. `*first_free` moves to the first free
    /// cluster seen (qemu-img's rule).
    fn place(&mut self, first_free: &mut u64, count: u64) -> u64 {
        let mut c = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while c < self.refs.len() as u64 && run < count {
            if self.refs[c as usize] == 0 {
                run += 1;
                if first_gap {
                    *first_free = c;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        if run < count {
            self.refs.resize((c + count - run) as usize, 0);
        }
        let start = c - run;
        for k in start..start + count {
            self.refs[k as usize] = 1;
        }
        start
    }

    /// Give every block range in `[first, end)` holding a used cluster a block; returns
    /// whether the table grew.
    fn place_blocks(&mut self, first: u64, end: u64) -> bool {
        let mut end = end;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut c = first;
        while c < end {
            if self.refs.get(c as usize).copied().unwrap_or(0) == 0 {
                c += 1;
                continue;
            }
            let idx = c / self.per_block;
            let start = idx * self.per_block;
            if self.table.get(idx as usize).copied().unwrap_or(0) == 0 {
                // Never inside a range whose block is already laid out.
                first_free = first_free.max(start);
                let b = self.place(&mut first_free, 1);
                if b >= end {
                    end = b + 1; // the range holding the block needs its block too
                }
                if self.table.len() as u64 <= idx {
                    let n = (idx + 1).div_ceil(self.entries_per_cluster) * self.entries_per_cluster;
                    self.table.resize(n as usize, 0);
                    grown = true;
                }
                self.table[idx as usize] = b;
            }
            c = start + self.per_block;
        }
        grown
    }
}

/// Write new refcount structures holding `refs` (the count of every cluster in use, the
/// old refcount structures included) and switch the header to them. `refs` gains the
/// new structures' clusters.
pub(crate) fn rebuild_refcounts(m: &mut Meta, refs: &mut Vec<u32>) -> Result<()> {
    let geo = m.geo;
    let cs = geo.cluster_size();
    let mut l = Layout {
        refs,
        per_block: geo.refcount_block_entries(),
        entries_per_cluster: cs / 8,
        table: Vec::new(),
    };
    let n = l.refs.len() as u64;
    l.place_blocks(0, n);
    let (table_at, table_clusters) = loop {
        let clusters = (l.table.len() as u64)
            .div_ceil(l.entries_per_cluster)
            .max(1);
        let mut first_free = 0;
        let at = l.place(&mut first_free, clusters);
        if !l.place_blocks(at, at + clusters) {
            break (at, clusters);
        }
    };
    if table_clusters > geo.max_reftable_clusters() {
        return Err(Error::TooLarge(
            "the rebuilt refcount table exceeds QEMU's limit".into(),
        ));
    }
    let Layout {
        refs,
        per_block,
        table,
        ..
    } = l;
    let order = geo.refcount_order();
    let max = geo.refcount_max();
    // The old structures stop being metadata (the new ones avoid them anyway).
    for s in m
        .regions
        .starts_where(|k| matches!(k, MetaKind::RefcountBlock | MetaKind::RefcountTable))
    {
        m.regions.remove(s);
    }
    let mut end = (table_at + table_clusters) * cs;
    let mut block = vec![0u8; cs as usize];
    for (idx, &b) in table.iter().enumerate() {
        if b == 0 {
            continue;
        }
        block.fill(0);
        let first = idx as u64 * per_block;
        for k in 0..per_block {
            let v = u64::from(refs.get((first + k) as usize).copied().unwrap_or(0));
            if v > max {
                return Err(Error::TooLarge(format!(
                    "cluster {} has {v} references, more than {}-bit refcounts hold",
                    first + k,
                    geo.refcount_bits()
                )));
            }
            refcount::set(&mut block, k as usize, order, v)?;
        }
        let off = b * cs;
        m.regions.add(off, cs, MetaKind::RefcountBlock);
        m.alloc.extend_end(off + cs);
        m.write_meta(
            &block,
            off,
            MetaKind::RefcountBlock,
            "rebuilt refcount block",
        )?;
        end = end.max(off + cs);
    }
    let offsets: Vec<u64> = table.iter().map(|&b| b * cs).collect();
    let mut bytes = qcow2_format::l1::encode_table(&offsets);
    bytes.resize((table_clusters * cs) as usize, 0);
    let table_off = table_at * cs;
    m.alloc.extend_end(end);
    let synced = m.switch_table(
        NewTable {
            kind: MetaKind::RefcountTable,
            off: table_off,
            bytes: &bytes,
            what: "rebuilt refcount table",
        },
        |h| {
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = table_clusters as u32;
        },
    )?;
    // The header names the new table: use it even if the switch's sync failed.
    let mut entries = offsets;
    entries.resize((table_clusters * cs / 8) as usize, 0);
    m.refcounts.replace_table(entries, true);
    m.alloc.reset_hint();
    synced
}
