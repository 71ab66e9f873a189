//! The overlap test a repair write passes, computed from the metadata as the image states
//! it (QEMU's pre-write overlap check with its default set): on a damaged image the
//! overlap map built at open leaves out whatever collided, so a repair that rewrites a
//! table asks here whether that table also holds other metadata. Cost: one pass over the
//! L1 table, the refcount table and the snapshot list, per repair write (a handful per
//! check).

use qcow2_format::l1::L1E_OFFSET_MASK;
use qcow2_format::refcount::REFT_OFFSET_MASK;

use crate::meta::Meta;

/// Which table a repair writes (it may overlap its own kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writing {
    /// An active L1 entry.
    ActiveL1,
    /// An active L2 table.
    ActiveL2,
    /// A snapshot's L2 table (which must not be an active one).
    InactiveL2,
}

/// The metadata `[start, start+len)` overlaps, other than what is being written.
pub(crate) fn overlap(m: &Meta, start: u64, len: u64, writing: Writing) -> Option<&'static str> {
    let cs = m.cluster_size();
    let hits = |off: u64, n: u64| {
        n > 0 && off < start.saturating_add(len) && start < off.saturating_add(n)
    };
    if hits(0, cs) {
        return Some("qcow2 header");
    }
    let h = m.header.get();
    if writing != Writing::ActiveL1 && hits(h.l1_table_offset, m.mapping.l1().len() as u64 * 8) {
        return Some("active L1 table");
    }
    if writing != Writing::ActiveL2
        && m.mapping
            .l1()
            .iter()
            .map(|&e| e & L1E_OFFSET_MASK)
            .any(|off| off != 0 && hits(off, cs))
    {
        return Some("active L2 table");
    }
    if hits(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    ) {
        return Some("refcount table");
    }
    if m.refcounts
        .table()
        .iter()
        .map(|&e| e & REFT_OFFSET_MASK)
        .any(|off| off != 0 && hits(off, cs))
    {
        return Some("refcount block");
    }
    if h.nb_snapshots > 0 {
        let len: u64 = m
            .snapshots
            .iter()
            .map(|s| s.to_bytes().map(|b| b.len() as u64).unwrap_or(0))
            .sum();
        if hits(h.snapshots_offset, len) {
            return Some("snapshot table");
        }
    }
    if m.snapshots
        .iter()
        .any(|s| hits(s.l1_table_offset, u64::from(s.l1_size) * 8))
    {
        return Some("inactive L1 table");
    }
    None
}
