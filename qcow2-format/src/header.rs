//! The fixed header at byte 0: v2 (72 bytes) and v3 (`header_length` bytes, at least 104).

use crate::bytes::{be32, be64, need, put32, put64};
use crate::error::{invalid, FormatError, Result};
use crate::features::{autoclear, compatible, incompatible};
use crate::geometry::{Geometry, MAX_BACKING_NAME, MAX_L1_BYTES, MAX_SNAPSHOTS};

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Size of a v2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Smallest v3 header.
pub const V3_HEADER_MIN_LEN: usize = 104;
/// Header length QEMU writes for v3 (compression type byte plus padding).
pub const V3_HEADER_LEN: usize = 112;
/// Snapshot table entries are at least this long (used for the table offset check).
pub const SNAPSHOT_ENTRY_MIN_LEN: u64 = 40;

/// Compression algorithm of compressed clusters (byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionType {
    /// Raw deflate (QEMU's "zlib").
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The on-disk byte.
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        }
    }
    /// QEMU's name: `zlib` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The header fields, exactly as on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Byte offset of the backing file name in cluster 0; 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3; 0 on v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3; 0 on v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3; 0 on v2).
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order (v2: always 4).
    pub refcount_order: u32,
    /// Header length in bytes (v2: 72).
    pub header_length: u32,
    /// Byte 104, present when `header_length > 104`.
    pub compression_type: u8,
    /// Bytes 105..header_length (padding and unknown future fields), kept byte-exact.
    pub tail: Vec<u8>,
}

impl Header {
    /// Decode the fields without validating them (magic, version and length are checked).
    pub fn decode(buf: &[u8]) -> Result<Header> {
        need(buf, V2_HEADER_LEN, "qcow2 header")?;
        let magic = be32(buf, 0);
        if magic != QCOW_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            tail: Vec::new(),
        };
        if version == 3 {
            need(buf, V3_HEADER_MIN_LEN, "qcow2 v3 header")?;
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let len = h.header_length as usize;
            if len < V3_HEADER_MIN_LEN {
                return Err(invalid(
                    "header_length",
                    len as u64,
                    "at least 104 for version 3",
                ));
            }
            // Bounded by the caller's buffer: a huge claimed length fails here, not in an
            // allocation.
            need(buf, len, "qcow2 v3 header (header_length)")?;
            if len > V3_HEADER_MIN_LEN {
                h.compression_type = buf[104];
                h.tail = buf[105..len].to_vec();
            }
        }
        Ok(h)
    }

    /// Decode and validate.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let h = Self::decode(buf)?;
        h.validate()?;
        Ok(h)
    }

    /// The geometry the header describes.
    pub fn geometry(&self) -> Result<Geometry> {
        Geometry::new(self.cluster_bits, self.extended_l2(), self.refcount_order)
    }

    /// Check every field against the format and QEMU's limits. File-size-dependent checks
    /// (tables past the end of the file) belong to the engine.
    pub fn validate(&self) -> Result<()> {
        self.validate_fields(true)
    }

    /// As [`Header::validate`], but an image without a refcount table
    /// (`refcount_table_clusters` 0) passes: QEMU opens one for check and repair only
    /// (`BDRV_O_CHECK`), where a repair rebuilds the table.
    pub fn validate_for_check(&self) -> Result<()> {
        self.validate_fields(false)
    }

    fn validate_fields(&self, require_reftable: bool) -> Result<()> {
        if self.version == 2 && self.refcount_order != 4 {
            return Err(invalid(
                "refcount_order",
                self.refcount_order.into(),
                "4 (16-bit refcounts) on version 2 images",
            ));
        }
        let geo = self.geometry()?;
        let cs = geo.cluster_size();
        if self.version == 3 {
            if self.header_length % 8 != 0 {
                return Err(invalid(
                    "header_length",
                    self.header_length.into(),
                    "a multiple of 8",
                ));
            }
            if u64::from(self.header_length) > cs {
                return Err(invalid(
                    "header_length",
                    self.header_length.into(),
                    format!("at most the cluster size {cs} (qcow2 header exceeds cluster size)"),
                ));
            }
        }
        if self.crypt_method > 2 {
            return Err(invalid(
                "crypt_method",
                self.crypt_method.into(),
                "0 (none), 1 (AES) or 2 (LUKS)",
            ));
        }
        self.compression()?;
        if self.size > i64::MAX as u64 {
            return Err(invalid("size", self.size, "at most 2^63 - 1"));
        }
        let max_l1 = MAX_L1_BYTES / 8;
        if u64::from(self.l1_size) > max_l1 {
            return Err(FormatError::LimitExceeded {
                field: "l1_size",
                value: self.l1_size.into(),
                max: max_l1,
                limit: "QCOW_MAX_L1_SIZE: active L1 table too large",
            });
        }
        let needed = geo.l1_entries_for(self.size);
        if u64::from(self.l1_size) < needed {
            return Err(invalid(
                "l1_size",
                self.l1_size.into(),
                format!(
                    "at least {needed} entries to map size {} (L1 table is too small)",
                    self.size
                ),
            ));
        }
        if self.l1_size > 0 {
            geo.check_table_offset("l1_table_offset", self.l1_table_offset)?;
        }
        if require_reftable && self.refcount_table_clusters == 0 {
            return Err(invalid(
                "refcount_table_clusters",
                0,
                "at least 1 (image does not contain a reference count table)",
            ));
        }
        let max_rt = geo.max_reftable_clusters();
        if u64::from(self.refcount_table_clusters) > max_rt {
            return Err(FormatError::LimitExceeded {
                field: "refcount_table_clusters",
                value: self.refcount_table_clusters.into(),
                max: max_rt,
                limit: "QCOW_MAX_REFTABLE_SIZE: reference count table too large",
            });
        }
        geo.check_table_offset("refcount_table_offset", self.refcount_table_offset)?;
        if u64::from(self.nb_snapshots) > MAX_SNAPSHOTS {
            return Err(FormatError::LimitExceeded {
                field: "nb_snapshots",
                value: self.nb_snapshots.into(),
                max: MAX_SNAPSHOTS,
                limit: "QCOW_MAX_SNAPSHOTS: too many snapshots",
            });
        }
        if self.nb_snapshots > 0 {
            geo.check_table_offset("snapshots_offset", self.snapshots_offset)?;
        }
        if self.backing_file_offset != 0 {
            let room = cs.saturating_sub(self.backing_file_offset);
            let max = room.min(MAX_BACKING_NAME);
            // QEMU refuses only `backing_file_offset > cluster_size`: an empty name may sit
            // exactly at the end of cluster 0 (and `HeaderArea::to_bytes` can put it there).
            if self.backing_file_offset > cs || u64::from(self.backing_file_size) > max {
                return Err(FormatError::LimitExceeded {
                    field: "backing_file_size",
                    value: self.backing_file_size.into(),
                    max,
                    limit: "backing file name too long or past cluster 0",
                });
            }
        }
        Ok(())
    }

    /// The compression type, validated against the feature bit.
    pub fn compression(&self) -> Result<CompressionType> {
        let bit = self.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (self.compression_type, bit) {
            (0, false) => Ok(CompressionType::Deflate),
            (0, true) => Err(invalid(
                "incompatible_features",
                self.incompatible_features,
                "compression type bit clear when the compression type is zlib",
            )),
            (1, true) => Ok(CompressionType::Zstd),
            (1, false) => Err(invalid(
                "compression_type",
                1,
                "zlib unless the compression type feature bit is set",
            )),
            (t, _) => Err(invalid(
                "compression_type",
                t.into(),
                "0 (zlib) or 1 (zstd)",
            )),
        }
    }

    /// Serialize to `header_length` bytes (72 for v2).
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            (self.header_length as usize).max(V3_HEADER_MIN_LEN)
        };
        let mut b = vec![0u8; len];
        put32(&mut b, 0, QCOW_MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, len as u32);
            if len > V3_HEADER_MIN_LEN {
                b[104] = self.compression_type;
                let n = self.tail.len().min(len - 105);
                b[105..105 + n].copy_from_slice(&self.tail[..n]);
            }
        }
        b
    }

    /// Dirty bit (refcounts may be stale).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompatible::DIRTY != 0
    }
    /// Corrupt bit.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompatible::CORRUPT != 0
    }
    /// Extended L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }
    /// External data file.
    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0
    }
    /// Lazy refcounts.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compatible::LAZY_REFCOUNTS != 0
    }
    /// Incompatible bits this crate does not know (the engine must refuse the image).
    pub fn unknown_incompatible(&self) -> u64 {
        self.incompatible_features & !incompatible::KNOWN
    }
    /// Compatible bits this crate does not know (safe to ignore).
    pub fn unknown_compatible(&self) -> u64 {
        self.compatible_features & !compatible::KNOWN
    }
    /// Autoclear bits this crate does not know (a writer clears them).
    pub fn unknown_autoclear(&self) -> u64 {
        self.autoclear_features & !autoclear::KNOWN
    }
    /// Where header extensions start: right after the header.
    pub fn extensions_start(&self) -> usize {
        if self.version == 2 {
            V2_HEADER_LEN
        } else {
            self.header_length as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_v3() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            tail: vec![0; 7],
        }
    }

    #[test]
    fn v3_round_trip() {
        let h = sample_v3();
        let b = h.to_bytes();
        assert_eq!(b.len(), 112);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn v2_round_trip() {
        let mut h = sample_v3();
        h.version = 2;
        h.header_length = 72;
        h.tail.clear();
        let b = h.to_bytes();
        assert_eq!(b.len(), 72);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn future_header_fields_preserved() {
        let mut h = sample_v3();
        h.header_length = 128;
        h.tail = (0..23).collect();
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap().tail, h.tail);
    }

    #[test]
    fn hostile_headers_give_named_errors() {
        let good = sample_v3().to_bytes();
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, vec![0, 0, 0, 0], "magic"),
            (4, 4u32.to_be_bytes().to_vec(), "version 4"),
            (20, 8u32.to_be_bytes().to_vec(), "cluster_bits"),
            (20, 22u32.to_be_bytes().to_vec(), "cluster_bits"),
            (36, u32::MAX.to_be_bytes().to_vec(), "QCOW_MAX_L1_SIZE"),
            (36, 1u32.to_be_bytes().to_vec(), "L1 table is too small"),
            (40, 0x30001u64.to_be_bytes().to_vec(), "l1_table_offset"),
            (56, 1000u32.to_be_bytes().to_vec(), "QCOW_MAX_REFTABLE_SIZE"),
            (56, 0u32.to_be_bytes().to_vec(), "reference count table"),
            (96, 7u32.to_be_bytes().to_vec(), "refcount_order"),
            (100, 4096u32.to_be_bytes().to_vec(), "truncated"),
            (100, 100u32.to_be_bytes().to_vec(), "at least 104"),
            (104, vec![2], "compression_type"),
            (104, vec![1], "compression type feature bit"),
            (32, 3u32.to_be_bytes().to_vec(), "crypt_method"),
            (60, 70000u32.to_be_bytes().to_vec(), "QCOW_MAX_SNAPSHOTS"),
            (24, u64::MAX.to_be_bytes().to_vec(), "size"),
        ];
        for (at, bytes, want) in cases {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let err = Header::parse(&b).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "patch at {at}: got {err:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn truncated_buffers_never_panic() {
        let good = sample_v3().to_bytes();
        for n in 0..good.len() {
            assert!(Header::parse(&good[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn backing_name_limits() {
        let mut h = sample_v3();
        h.backing_file_offset = 0x200;
        h.backing_file_size = 1024;
        assert!(Header::parse(&h.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("backing"));
        h.backing_file_size = 1023;
        Header::parse(&h.to_bytes()).unwrap();
        h.backing_file_offset = 65536;
        h.backing_file_size = 1;
        assert!(Header::parse(&h.to_bytes()).is_err());
        h.backing_file_size = 0;
        Header::parse(&h.to_bytes()).unwrap();
        h.backing_file_offset = 65537;
        assert!(Header::parse(&h.to_bytes()).is_err());
    }
}
