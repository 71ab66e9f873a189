//! L1 table entries: pointers to L2 tables.

use crate::error::{FormatError, Result};
use crate::geometry::Geometry;

/// Bits 9..=55: the L2 table's host offset.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits that must be zero.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// COPIED: the L2 table's refcount is exactly 1 (accurate only in the active L1).
pub const OFLAG_COPIED: u64 = 1 << 63;

/// One L1 entry, raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at an L2 table.
    pub fn new(l2_offset: u64, copied: bool) -> Self {
        L1Entry((l2_offset & L1E_OFFSET_MASK) | if copied { OFLAG_COPIED } else { 0 })
    }
    /// Host offset of the L2 table; 0 when unallocated.
    pub fn l2_offset(self) -> u64 {
        self.0 & L1E_OFFSET_MASK
    }
    /// Whether the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// Whether no L2 table is allocated.
    pub fn is_unallocated(self) -> bool {
        self.l2_offset() == 0
    }
    /// Check reserved bits and alignment (what a check reports).
    pub fn validate(self, geo: &Geometry) -> Result<()> {
        let r = self.0 & L1E_RESERVED_MASK;
        if r != 0 {
            return Err(FormatError::ReservedBits {
                what: "L1 entry",
                value: self.0,
                mask: r,
            });
        }
        self.validate_for_io(geo)
    }
    /// Check what I/O through the entry depends on: the L2 table's alignment. Reserved
    /// bits are masked off, as QEMU's I/O path does (only a check reports them).
    pub fn validate_for_io(self, geo: &Geometry) -> Result<()> {
        if !geo.is_cluster_aligned(self.l2_offset()) {
            return Err(FormatError::Unaligned {
                what: "L2 table",
                offset: self.l2_offset(),
                align: geo.cluster_size(),
            });
        }
        Ok(())
    }
}

/// Decode a big-endian table of 64-bit entries (L1 or refcount table).
pub fn decode_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Encode a table of 64-bit entries big-endian.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_fields() {
        let g = Geometry::new(16, false, 4).unwrap();
        let e = L1Entry::new(0x50000, true);
        assert_eq!(e.0, 0x8000_0000_0005_0000);
        assert_eq!(e.l2_offset(), 0x50000);
        assert!(e.copied());
        e.validate(&g).unwrap();
        assert!(L1Entry(0x50200)
            .validate(&g)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        assert!(L1Entry(0x0100_0000_0005_0000).validate(&g).is_err());
        assert!(L1Entry(0).is_unallocated());
    }

    #[test]
    fn table_round_trip() {
        let t = vec![0, 0x8000_0000_0005_0000, 42];
        assert_eq!(decode_table(&encode_table(&t)), t);
    }
}
