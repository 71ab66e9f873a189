//! The one walker of the L1/L2 tree: every L1 table (the active one first, then each
//! snapshot's), every non-empty L1 entry, and every L2 table read whole from the file. One
//! table is in memory at a time, and only the part of a table inside the file is read
//! (the rest reads as zeros: unallocated entries), so memory and time stay proportional to
//! the file, not to what the entries claim. Check, repair and future tree work (snapshots,
//! compaction) visit the tree through it.

use qcow2_format::l1::decode_table;

use crate::error::Result;
use crate::meta::Meta;

/// One L1 table of the image.
pub(crate) struct L1Table {
    /// Host offset.
    pub offset: u64,
    /// Size in bytes as the header or snapshot entry states it.
    pub bytes: u64,
    /// Raw entries (the part inside the file; zeros beyond).
    pub entries: Vec<u64>,
    /// The active table (not a snapshot's).
    pub active: bool,
}

/// What a walk reports to.
pub(crate) trait Visitor {
    /// An L1 table, before its entries.
    fn l1_table(&mut self, m: &mut Meta, t: &L1Table) -> Result<()>;

    /// A non-zero L1 entry; returns the L2 table offset to read, or None to skip it.
    fn l1_entry(&mut self, m: &mut Meta, t: &L1Table, index: usize) -> Result<Option<u64>>;

    /// An L2 table as read from the file (an I/O error instead if it could not be read).
    fn l2_table(
        &mut self,
        m: &mut Meta,
        t: &L1Table,
        index: usize,
        l2_offset: u64,
        table: std::io::Result<&[u8]>,
    ) -> Result<()>;
}

/// Walk the active tree, and the snapshots' if `snapshots`.
pub(crate) fn walk(
    m: &mut Meta,
    snapshots: bool,
    file_len: u64,
    v: &mut dyn Visitor,
) -> Result<()> {
    let cs = m.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let count = if snapshots { m.snapshots.len() } else { 0 };
    for k in 0..=count {
        let t = table(m, k, file_len)?;
        v.l1_table(m, &t)?;
        for (i, &raw) in t.entries.iter().enumerate() {
            if raw == 0 {
                continue;
            }
            let Some(l2) = v.l1_entry(m, &t, i)? else {
                continue;
            };
            // A table (partly) past the end of the file reads zeros there.
            let r = m.storage.read_at(&mut buf, l2).map(|()| &buf[..]);
            v.l2_table(m, &t, i, l2, r)?;
        }
    }
    Ok(())
}

/// How many L2 tables a walk visits at most (non-zero L1 entries), for progress.
pub(crate) fn l2_tables(m: &Meta, snapshots: bool, file_len: u64) -> Result<u64> {
    let nonzero = |t: &[u64]| t.iter().filter(|&&e| e != 0).count() as u64;
    let mut n = nonzero(m.mapping.l1());
    if snapshots {
        for k in 1..=m.snapshots.len() {
            n += nonzero(&table(m, k, file_len)?.entries);
        }
    }
    Ok(n)
}

/// L1 table `k`: 0 the active one, `k` snapshot `k - 1`'s.
fn table(m: &Meta, k: usize, file_len: u64) -> Result<L1Table> {
    if k == 0 {
        return Ok(L1Table {
            offset: m.header.get().l1_table_offset,
            bytes: m.mapping.l1().len() as u64 * 8,
            entries: m.mapping.l1().to_vec(),
            active: true,
        });
    }
    let s = &m.snapshots[k - 1];
    let (offset, bytes) = (s.l1_table_offset, u64::from(s.l1_size) * 8);
    let in_file = bytes.min(file_len.saturating_sub(offset)) / 8 * 8;
    let mut buf = vec![0u8; in_file as usize];
    m.read_host(&mut buf, offset, "snapshot L1 table")?;
    Ok(L1Table {
        offset,
        bytes,
        entries: decode_table(&buf),
        active: false,
    })
}
