//! Cluster geometry and the limits QEMU enforces: index math for L1/L2/refcount tables,
//! alignment helpers and size limits, all derived from `cluster_bits`, the L2 entry width
//! and the refcount order.

use crate::error::{invalid, FormatError, Result};

/// Smallest cluster size QEMU accepts: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB (32 subclusters of 512 bytes).
pub const MIN_EXTL2_CLUSTER_BITS: u32 = 14;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// QEMU's `QCOW_MAX_L1_SIZE`: the active L1 table is at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: the refcount table is at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
pub const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// QEMU's limit on the backing file name length.
pub const MAX_BACKING_NAME: u64 = 1023;
/// Highest refcount order: 64-bit refcounts.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Host offsets are 56 bits wide in L1/L2 entries.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// The shape of an image's tables. Cheap to copy; every index helper is pure arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
    refcount_order: u32,
}

impl Geometry {
    /// Validate and build a geometry.
    pub fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32) -> Result<Self> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                cluster_bits.into(),
                format!("between {MIN_CLUSTER_BITS} (512 B) and {MAX_CLUSTER_BITS} (2 MiB)"),
            ));
        }
        if extended_l2 && cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return Err(invalid(
                "cluster_bits",
                cluster_bits.into(),
                "at least 14 (16 KiB) with extended L2 entries",
            ));
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(invalid(
                "refcount_order",
                refcount_order.into(),
                "at most 6 (64-bit refcounts)",
            ));
        }
        Ok(Geometry {
            cluster_bits,
            extended_l2,
            refcount_order,
        })
    }

    /// Geometry for a cluster size in bytes (must be a power of two).
    pub fn from_cluster_size(
        cluster_size: u64,
        extended_l2: bool,
        refcount_bits: u64,
    ) -> Result<Self> {
        if !cluster_size.is_power_of_two() {
            return Err(invalid("cluster_size", cluster_size, "a power of two"));
        }
        if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
            return Err(invalid(
                "refcount_bits",
                refcount_bits,
                "a power of two between 1 and 64",
            ));
        }
        Self::new(
            cluster_size.trailing_zeros(),
            extended_l2,
            refcount_bits.trailing_zeros(),
        )
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are extended (128 bits, with subcluster bitmaps).
    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// Subclusters per cluster: 32 with extended L2, else 1.
    pub fn subclusters_per_cluster(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        }
    }
    /// log2 of the subcluster size.
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }
    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// log2 of the number of entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }
    /// Guest bytes covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.l2_bits() + self.cluster_bits)
    }
    /// Refcount order (refcount_bits = 1 << order).
    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Bits per refcount.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Largest refcount value representable.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }
    /// log2 of refcounts per refcount block.
    pub fn refcount_block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// Refcounts per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        1 << self.refcount_block_bits()
    }
    /// Host bytes whose refcounts one refcount block holds.
    pub fn refcount_block_coverage(&self) -> u64 {
        1 << (self.refcount_block_bits() + self.cluster_bits)
    }

    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.l2_bits() + self.cluster_bits)
    }
    /// Index into the L2 table for a guest offset.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }
    /// Byte offset inside the cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    /// Index of the subcluster inside its cluster.
    pub fn subcluster_index(&self, guest: u64) -> u32 {
        (self.offset_in_cluster(guest) >> self.subcluster_bits()) as u32
    }
    /// Cluster index of a byte offset (guest or host).
    pub fn cluster_index(&self, off: u64) -> u64 {
        off >> self.cluster_bits
    }
    /// Refcount table index for a host offset.
    pub fn reftable_index(&self, host: u64) -> u64 {
        host >> (self.refcount_block_bits() + self.cluster_bits)
    }
    /// Index inside the refcount block for a host offset.
    pub fn refblock_index(&self, host: u64) -> u64 {
        (host >> self.cluster_bits) & (self.refcount_block_entries() - 1)
    }
    /// Whether `off` is a multiple of the cluster size.
    pub fn is_cluster_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }
    /// Round down to a cluster boundary.
    pub fn align_down(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }
    /// Round up to a cluster boundary (saturating at the highest aligned u64).
    pub fn align_up(&self, off: u64) -> u64 {
        let mask = self.cluster_size() - 1;
        off.checked_add(mask).map_or(!mask, |v| v & !mask)
    }
    /// Number of clusters needed to hold `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// L1 entries needed to map a virtual size (QEMU's `size_to_l1`).
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_coverage())
    }
    /// Largest L1 table QEMU accepts, in entries.
    pub fn max_l1_entries(&self) -> u64 {
        MAX_L1_BYTES / 8
    }
    /// Largest virtual size this geometry can map within QEMU's L1 limit (and i64 range).
    pub fn max_virtual_size(&self) -> u64 {
        let by_l1 = (self.max_l1_entries() as u128) * (self.l2_coverage() as u128);
        by_l1.min(i64::MAX as u128) as u64
    }
    /// Largest refcount table QEMU accepts, in clusters.
    pub fn max_reftable_clusters(&self) -> u64 {
        (MAX_REFTABLE_BYTES / self.cluster_size()).max(1)
    }

    /// Check a virtual size against this geometry's limits.
    pub fn check_virtual_size(&self, size: u64) -> Result<()> {
        let max = self.max_virtual_size();
        if size > max {
            return Err(FormatError::LimitExceeded {
                field: "size",
                value: size,
                max,
                limit: "QCOW_MAX_L1_SIZE: L1 table at most 32 MiB; use a larger cluster size",
            });
        }
        Ok(())
    }

    /// Check that a metadata offset is cluster-aligned and below the 56-bit host limit.
    pub fn check_table_offset(&self, what: &'static str, off: u64) -> Result<()> {
        if !self.is_cluster_aligned(off) {
            return Err(FormatError::Unaligned {
                what,
                offset: off,
                align: self.cluster_size(),
            });
        }
        if off >= MAX_HOST_OFFSET {
            return Err(FormatError::LimitExceeded {
                field: what,
                value: off,
                max: MAX_HOST_OFFSET - 1,
                limit: "host offsets are 56 bits",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_math() {
        let g = Geometry::new(16, false, 4).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.refcount_block_entries(), 32768);
        assert_eq!(g.refcount_max(), 65535);
        assert_eq!(g.l1_index((512 << 20) + 70000), 1);
        assert_eq!(g.l2_index((512 << 20) + 70000), 1);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.max_virtual_size(), 1 << 51);
        assert_eq!(g.reftable_index(32768 * 65536), 1);
    }

    #[test]
    fn extended_l2_geometry() {
        let g = Geometry::new(16, true, 4).unwrap();
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_index(65536 + 4096 + 5), 2);
        assert!(Geometry::new(13, true, 4).is_err());
    }

    #[test]
    fn limits_are_named() {
        assert!(Geometry::new(8, false, 4).is_err());
        assert!(Geometry::new(22, false, 4).is_err());
        assert!(Geometry::new(16, false, 7).is_err());
        let g = Geometry::new(9, false, 4).unwrap();
        let err = g.check_virtual_size(1 << 40).unwrap_err().to_string();
        assert!(err.contains("QCOW_MAX_L1_SIZE"), "{err}");
        assert_eq!(g.refcount_max(), 65535);
        assert_eq!(
            Geometry::new(16, false, 6).unwrap().refcount_max(),
            u64::MAX
        );
        assert_eq!(Geometry::new(16, false, 0).unwrap().refcount_max(), 1);
    }

    #[test]
    fn align_up_saturates() {
        let g = Geometry::new(16, false, 4).unwrap();
        assert_eq!(g.align_up(1), 65536);
        assert_eq!(g.align_up(u64::MAX), !65535u64);
    }
}
