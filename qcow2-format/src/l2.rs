//! L2 table entries, standard (64-bit) and extended (128-bit with a subcluster bitmap), and
//! the cluster and subcluster kinds they encode.

use crate::compressed::{CompressedDescriptor, OFLAG_COMPRESSED};
use crate::error::{FormatError, Result};
use crate::geometry::Geometry;

/// Bits 9..=55: host cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard entry.
pub const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of an extended entry's first word that make it invalid. Bit 0 (the zero
/// flag of standard entries) is reserved there too, but QEMU neither reads nor checks it
/// (qemu-img check passes such an entry and the guest reads it), so it is ignored here.
pub const L2E_RESERVED_MASK_EXTENDED: u64 = 0x3f00_0000_0000_01fe;
/// Bit 0 (standard entries only): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Bit 63: refcount is exactly 1, so the cluster may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Extended bitmap: every subcluster reads zero.
pub const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Extended bitmap: every subcluster allocated.
pub const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;

/// What a whole cluster is, by its L2 entry (QEMU's cluster types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// No data here: reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads zeros; no host cluster.
    ZeroPlain,
    /// Reads zeros; a host cluster stays allocated at `offset` (an "anchor").
    ZeroAlloc {
        /// Host offset kept allocated.
        offset: u64,
    },
    /// Data at `offset`.
    Normal {
        /// Host cluster offset.
        offset: u64,
    },
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

/// What one subcluster is (extended L2), or the whole cluster without extended L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterKind {
    /// Data in the allocated host cluster.
    Normal,
    /// Reads zero; the host cluster is allocated.
    ZeroAlloc,
    /// Reads zero; no host cluster.
    ZeroPlain,
    /// Reads from backing; the host cluster is allocated (other subclusters use it).
    UnallocatedAlloc,
    /// Reads from backing; no host cluster.
    UnallocatedPlain,
    /// Part of a compressed cluster.
    Compressed,
}

/// One L2 entry. `bitmap` is the second word of an extended entry, 0 for standard ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// First word: offset and flags.
    pub word: u64,
    /// Subcluster bitmap (extended L2 only): bits 0..31 allocated, 32..63 zero.
    pub bitmap: u64,
}

impl L2Entry {
    /// Unallocated, no flags.
    pub const UNALLOCATED: L2Entry = L2Entry { word: 0, bitmap: 0 };

    /// Build from the raw words.
    pub fn new(word: u64, bitmap: u64) -> Self {
        L2Entry { word, bitmap }
    }

    /// Host offset field (0 when none).
    pub fn host_offset(&self) -> u64 {
        self.word & L2E_OFFSET_MASK
    }
    /// Whether COPIED is set.
    pub fn copied(&self) -> bool {
        self.word & OFLAG_COPIED != 0
    }
    /// Whether the entry is compressed.
    pub fn is_compressed(&self) -> bool {
        self.word & OFLAG_COMPRESSED != 0
    }

    /// Decode the cluster kind, checking reserved bits, alignment and the bitmap.
    pub fn kind(&self, geo: &Geometry) -> Result<ClusterKind> {
        if self.is_compressed() {
            if self.copied() {
                return Err(FormatError::ReservedBits {
                    what: "compressed L2 entry (COPIED set)",
                    value: self.word,
                    mask: OFLAG_COPIED,
                });
            }
            if geo.extended_l2() && self.bitmap != 0 {
                return Err(FormatError::BadSubclusterBitmap {
                    entry: self.word,
                    bitmap: self.bitmap,
                    reason: "compressed clusters must have an empty bitmap",
                });
            }
            return Ok(ClusterKind::Compressed(CompressedDescriptor::decode(
                self.word, geo,
            )));
        }
        let reserved = if geo.extended_l2() {
            L2E_RESERVED_MASK_EXTENDED
        } else {
            L2E_RESERVED_MASK
        };
        let r = self.word & reserved;
        if r != 0 {
            return Err(FormatError::ReservedBits {
                what: "L2 entry",
                value: self.word,
                mask: r,
            });
        }
        let off = self.host_offset();
        if off != 0 && !geo.is_cluster_aligned(off) {
            return Err(FormatError::Unaligned {
                what: "data cluster",
                offset: off,
                align: geo.cluster_size(),
            });
        }
        let zero = !geo.extended_l2() && self.word & OFLAG_ZERO != 0;
        let kind = match (off, zero) {
            (0, true) => ClusterKind::ZeroPlain,
            (0, false) => ClusterKind::Unallocated,
            (o, true) => ClusterKind::ZeroAlloc { offset: o },
            (o, false) => ClusterKind::Normal { offset: o },
        };
        if geo.extended_l2() {
            self.check_bitmap(kind)?;
        }
        Ok(kind)
    }

    fn check_bitmap(&self, kind: ClusterKind) -> Result<()> {
        let b = self.bitmap;
        let bad = |reason| {
            Err(FormatError::BadSubclusterBitmap {
                entry: self.word,
                bitmap: b,
                reason,
            })
        };
        if (b >> 32) & b & BITMAP_ALL_ALLOC != 0 {
            return bad("a subcluster is marked both allocated and zero");
        }
        if matches!(kind, ClusterKind::Unallocated) && b & BITMAP_ALL_ALLOC != 0 {
            return bad("allocated subclusters in a cluster without a host offset");
        }
        Ok(())
    }

    /// Kind of subcluster `index` (0 without extended L2). Call after `kind` succeeded.
    pub fn subcluster_kind(&self, kind: ClusterKind, geo: &Geometry, index: u32) -> SubclusterKind {
        if !geo.extended_l2() {
            return match kind {
                ClusterKind::Unallocated => SubclusterKind::UnallocatedPlain,
                ClusterKind::ZeroPlain => SubclusterKind::ZeroPlain,
                ClusterKind::ZeroAlloc { .. } => SubclusterKind::ZeroAlloc,
                ClusterKind::Normal { .. } => SubclusterKind::Normal,
                ClusterKind::Compressed(_) => SubclusterKind::Compressed,
            };
        }
        let alloc = self.bitmap & (1u64 << index) != 0;
        let zero = self.bitmap & (1u64 << (index + 32)) != 0;
        match kind {
            ClusterKind::Compressed(_) => SubclusterKind::Compressed,
            ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. } => {
                if zero {
                    SubclusterKind::ZeroAlloc
                } else if alloc {
                    SubclusterKind::Normal
                } else {
                    SubclusterKind::UnallocatedAlloc
                }
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => {
                if zero {
                    SubclusterKind::ZeroPlain
                } else {
                    SubclusterKind::UnallocatedPlain
                }
            }
        }
    }

    /// Decode a whole L2 table (or slice) of `geo`'s entry width.
    pub fn decode_table(buf: &[u8], geo: &Geometry) -> Vec<L2Entry> {
        let w = geo.l2_entry_size() as usize;
        buf.chunks_exact(w)
            .map(|c| {
                let word = u64::from_be_bytes(c[..8].try_into().expect("8 bytes"));
                let bitmap = if w == 16 {
                    u64::from_be_bytes(c[8..16].try_into().expect("8 bytes"))
                } else {
                    0
                };
                L2Entry { word, bitmap }
            })
            .collect()
    }

    /// Read entry `index` of a raw table buffer.
    pub fn read(buf: &[u8], index: usize, geo: &Geometry) -> L2Entry {
        let w = geo.l2_entry_size() as usize;
        let at = index * w;
        let word = u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let bitmap = if w == 16 {
            u64::from_be_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes"))
        } else {
            0
        };
        L2Entry { word, bitmap }
    }

    /// Write this entry at `index` of a raw table buffer.
    pub fn write(&self, buf: &mut [u8], index: usize, geo: &Geometry) {
        let w = geo.l2_entry_size() as usize;
        let at = index * w;
        buf[at..at + 8].copy_from_slice(&self.word.to_be_bytes());
        if w == 16 {
            buf[at + 8..at + 16].copy_from_slice(&self.bitmap.to_be_bytes());
        }
    }

    /// Encode a table of entries.
    pub fn encode_table(entries: &[L2Entry], geo: &Geometry) -> Vec<u8> {
        let mut out = vec![0u8; entries.len() * geo.l2_entry_size() as usize];
        for (i, e) in entries.iter().enumerate() {
            e.write(&mut out, i, geo);
        }
        out
    }
}

/// Bitmap helpers for extended L2 entries.
pub mod bitmap {
    /// Mask of allocation bits for subclusters `first..first+count`.
    pub fn alloc_range(first: u32, count: u32) -> u64 {
        debug_assert!(first + count <= 32);
        if count == 0 {
            return 0;
        }
        (((1u64 << count) - 1) << first) & 0xffff_ffff
    }
    /// Mask of zero bits for subclusters `first..first+count`.
    pub fn zero_range(first: u32, count: u32) -> u64 {
        alloc_range(first, count) << 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_geo() -> Geometry {
        Geometry::new(16, false, 4).unwrap()
    }
    fn ext_geo() -> Geometry {
        Geometry::new(16, true, 4).unwrap()
    }

    #[test]
    fn five_kinds_standard() {
        let g = std_geo();
        assert_eq!(
            L2Entry::new(0, 0).kind(&g).unwrap(),
            ClusterKind::Unallocated
        );
        assert_eq!(L2Entry::new(1, 0).kind(&g).unwrap(), ClusterKind::ZeroPlain);
        assert_eq!(
            L2Entry::new(0x8000_0000_0005_0001, 0).kind(&g).unwrap(),
            ClusterKind::ZeroAlloc { offset: 0x50000 }
        );
        assert_eq!(
            L2Entry::new(0x8000_0000_0005_0000, 0).kind(&g).unwrap(),
            ClusterKind::Normal { offset: 0x50000 }
        );
        let c = CompressedDescriptor::for_data(0x50010, 300, &g).unwrap();
        assert_eq!(
            L2Entry::new(c.encode(&g).unwrap(), 0).kind(&g).unwrap(),
            ClusterKind::Compressed(c)
        );
    }

    #[test]
    fn invalid_standard_entries() {
        let g = std_geo();
        assert!(L2Entry::new(0x8000_0000_0005_0002, 0).kind(&g).is_err());
        assert!(L2Entry::new(0x0100_0000_0005_0000, 0).kind(&g).is_err());
        assert!(L2Entry::new(0x8000_0000_0005_0200, 0)
            .kind(&g)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        assert!(L2Entry::new(OFLAG_COMPRESSED | OFLAG_COPIED, 0)
            .kind(&g)
            .is_err());
    }

    #[test]
    fn extended_subcluster_kinds() {
        let g = ext_geo();
        let e = L2Entry::new(0x8000_0000_0005_0000, 0x0000_000c_ffff_fff3);
        let k = e.kind(&g).unwrap();
        assert_eq!(k, ClusterKind::Normal { offset: 0x50000 });
        assert_eq!(e.subcluster_kind(k, &g, 0), SubclusterKind::Normal);
        assert_eq!(e.subcluster_kind(k, &g, 2), SubclusterKind::ZeroAlloc);
        let e = L2Entry::new(0x8000_0000_0005_0000, 1);
        let k = e.kind(&g).unwrap();
        assert_eq!(
            e.subcluster_kind(k, &g, 1),
            SubclusterKind::UnallocatedAlloc
        );
        let e = L2Entry::new(0, BITMAP_ALL_ZEROES);
        let k = e.kind(&g).unwrap();
        assert_eq!(k, ClusterKind::Unallocated);
        assert_eq!(e.subcluster_kind(k, &g, 31), SubclusterKind::ZeroPlain);
        // Bit 0 is reserved with extended L2, but ignored as QEMU ignores it: the entry
        // decodes as if it were clear; another reserved bit still makes it invalid.
        assert_eq!(
            L2Entry::new(0x8000_0000_0005_0001, 1).kind(&g).unwrap(),
            L2Entry::new(0x8000_0000_0005_0000, 1).kind(&g).unwrap()
        );
        assert!(L2Entry::new(0x8000_0000_0005_0002, 0).kind(&g).is_err());
    }

    #[test]
    fn invalid_bitmaps() {
        let g = ext_geo();
        let both = L2Entry::new(0x8000_0000_0005_0000, 0x0000_0001_0000_0001);
        assert!(both.kind(&g).unwrap_err().to_string().contains("both"));
        let orphan = L2Entry::new(0, 1);
        assert!(orphan.kind(&g).is_err());
        let c = CompressedDescriptor::for_data(0x50000, 100, &g).unwrap();
        assert!(L2Entry::new(c.encode(&g).unwrap(), 1).kind(&g).is_err());
    }

    #[test]
    fn table_round_trip_both_widths() {
        for g in [std_geo(), ext_geo()] {
            let entries: Vec<L2Entry> = (0..g.l2_entries())
                .map(|i| L2Entry::new(i << 16 | 1 << 63, if g.extended_l2() { i } else { 0 }))
                .collect();
            let raw = L2Entry::encode_table(&entries, &g);
            assert_eq!(raw.len() as u64, g.cluster_size());
            assert_eq!(L2Entry::decode_table(&raw, &g), entries);
            assert_eq!(L2Entry::read(&raw, 5, &g), entries[5]);
        }
    }

    #[test]
    fn bitmap_ranges() {
        assert_eq!(bitmap::alloc_range(0, 32), BITMAP_ALL_ALLOC);
        assert_eq!(bitmap::zero_range(0, 32), BITMAP_ALL_ZEROES);
        assert_eq!(bitmap::alloc_range(2, 2), 0xc);
        assert_eq!(bitmap::zero_range(2, 2), 0xc << 32);
        assert_eq!(bitmap::alloc_range(5, 0), 0);
    }
}
