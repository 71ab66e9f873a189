//! Compressed cluster descriptors: a host byte offset and a count of 512-byte sectors,
//! with the split point depending on the cluster size.

use crate::error::{FormatError, Result};
use crate::geometry::Geometry;

/// Compressed data is accounted in 512-byte sectors.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;

/// Where a compressed cluster's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub offset: u64,
    /// Number of 512-byte sectors the data touches, at least 1.
    pub sectors: u64,
}

fn shift(geo: &Geometry) -> u32 {
    62 - (geo.cluster_bits() - 8)
}

impl CompressedDescriptor {
    /// Decode bits 0..=61 of an L2 entry.
    pub fn decode(entry: u64, geo: &Geometry) -> CompressedDescriptor {
        let s = shift(geo);
        let offset = entry & ((1u64 << s) - 1);
        let mask = (1u64 << (geo.cluster_bits() - 8)) - 1;
        let sectors = ((entry >> s) & mask) + 1;
        CompressedDescriptor { offset, sectors }
    }

    /// Bytes that may hold compressed data: from `offset` to the end of its last sector.
    pub fn max_len(&self) -> u64 {
        self.sectors * COMPRESSED_SECTOR_SIZE - (self.offset & (COMPRESSED_SECTOR_SIZE - 1))
    }

    /// Host byte range `[start, end)` the data may occupy.
    pub fn host_range(&self) -> (u64, u64) {
        (self.offset, self.offset + self.max_len())
    }

    /// Descriptor for `len` compressed bytes at `offset`.
    pub fn for_data(offset: u64, len: u64, geo: &Geometry) -> Result<Self> {
        if len == 0 {
            return Err(FormatError::Unencodable {
                what: "compressed descriptor",
                reason: "empty compressed data".into(),
            });
        }
        // `offset + len - 1` overflows for hostile inputs; such data cannot be encoded.
        let last_byte = offset
            .checked_add(len - 1)
            .ok_or_else(|| FormatError::Unencodable {
                what: "compressed descriptor",
                reason: format!("{len} bytes at {offset:#x} run past the end of the address space"),
            })?;
        let first = offset / COMPRESSED_SECTOR_SIZE;
        let last = last_byte / COMPRESSED_SECTOR_SIZE;
        let d = CompressedDescriptor {
            offset,
            sectors: last - first + 1,
        };
        d.encode(geo)?;
        Ok(d)
    }

    /// Encode as an L2 entry (bit 62 set, COPIED clear).
    pub fn encode(&self, geo: &Geometry) -> Result<u64> {
        let s = shift(geo);
        let mask = (1u64 << (geo.cluster_bits() - 8)) - 1;
        if self.offset >= 1u64 << s {
            return Err(FormatError::Unencodable {
                what: "compressed descriptor",
                reason: format!("offset {:#x} needs more than {s} bits", self.offset),
            });
        }
        if self.sectors == 0 || self.sectors - 1 > mask {
            return Err(FormatError::Unencodable {
                what: "compressed descriptor",
                reason: format!(
                    "{} sectors exceed the field ({} max)",
                    self.sectors,
                    mask + 1
                ),
            });
        }
        Ok(OFLAG_COMPRESSED | ((self.sectors - 1) << s) | self.offset)
    }

    /// Host clusters (aligned offsets) the data touches; each holds one reference.
    pub fn host_clusters(&self, geo: &Geometry) -> impl Iterator<Item = u64> {
        let (start, end) = self.host_range();
        let cs = geo.cluster_size();
        let first = start / cs;
        let last = (end - 1) / cs;
        (first..=last).map(move |c| c * cs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_cluster_size() {
        for bits in 9..=21 {
            let g = Geometry::new(bits, false, 4).unwrap();
            for (off, len) in [
                (0x50000u64, 1u64),
                (0x50123, 700),
                (0x7_ffff_fe00, 1 << bits),
            ] {
                let d = CompressedDescriptor::for_data(off, len, &g).unwrap();
                let e = d.encode(&g).unwrap();
                assert_eq!(e >> 62, 1, "bits {bits}");
                let back = CompressedDescriptor::decode(e, &g);
                assert_eq!(back, d);
                assert!(back.max_len() >= len);
                assert!(back.max_len() < len + 1024);
            }
        }
    }

    #[test]
    fn straddling_data_touches_two_host_clusters() {
        let g = Geometry::new(16, false, 4).unwrap();
        let d = CompressedDescriptor::for_data(0x5ff00, 0x200, &g).unwrap();
        assert_eq!(
            d.host_clusters(&g).collect::<Vec<_>>(),
            vec![0x50000, 0x60000]
        );
    }

    #[test]
    fn too_large_is_an_error() {
        let g = Geometry::new(9, false, 4).unwrap();
        // 512-byte clusters: 1 size bit, so at most 2 sectors.
        assert!(CompressedDescriptor::for_data(0, 1025, &g).is_err());
        assert!(CompressedDescriptor::for_data(1 << 61, 1, &g).is_err());
    }

    #[test]
    fn for_data_near_u64_max_is_an_error_not_an_overflow() {
        // Found by the l2_refcount fuzz target: `offset + len - 1` overflowed.
        let g = Geometry::new(16, false, 4).unwrap();
        for (off, len) in [(u64::MAX, 2), (u64::MAX - 10, 100), (u64::MAX, 1)] {
            assert!(matches!(
                CompressedDescriptor::for_data(off, len, &g),
                Err(FormatError::Unencodable { .. })
            ));
        }
    }
}
