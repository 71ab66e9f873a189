//! Persistent dirty bitmaps: the bitmap directory and bitmap table entries.
//!
//! Only what is needed to account for the clusters bitmaps own (check, repair) is decoded:
//! each directory entry's table location and name, and each table entry's data cluster.

use crate::bytes::{be16, be32, be64, need, pad8};
use crate::error::{FormatError, Result};

/// Fixed part of a bitmap directory entry.
pub const BITMAP_DIR_ENTRY_FIXED_LEN: usize = 24;
/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`: 1 KiB per bitmap.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's `BME_MAX_TABLE_SIZE`: entries in one bitmap table.
pub const MAX_BITMAP_TABLE_SIZE: u32 = 0x0800_0000;
/// QEMU's `BME_MAX_NAME_SIZE`.
pub const MAX_BITMAP_NAME_SIZE: usize = 1023;

/// Host offset bits of a bitmap table entry (9..=55).
pub const BME_TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a bitmap table entry that must be zero.
pub const BME_TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// One bitmap directory entry, as far as cluster accounting needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries (8 bytes each) in the bitmap table.
    pub table_size: u32,
    /// Flags (bit 0 in use, bit 1 auto, bit 2 extra data compatible).
    pub flags: u32,
    /// Bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Name, not NUL-terminated.
    pub name: Vec<u8>,
}

impl BitmapDirEntry {
    /// Bytes the bitmap table occupies.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * 8
    }
}

fn bad(index: usize, at: usize, reason: String) -> FormatError {
    FormatError::BadBitmap { index, at, reason }
}

/// Parse a bitmap directory of `nb` entries from `buf` (the directory's bytes).
///
/// Entry fields are bounds-checked against `buf`, so a hostile `name_size` or
/// `extra_data_size` cannot make this read or allocate past it.
pub fn parse_directory(buf: &[u8], nb: u32) -> Result<Vec<BitmapDirEntry>> {
    if nb > MAX_BITMAPS {
        return Err(FormatError::LimitExceeded {
            field: "nb_bitmaps",
            value: u64::from(nb),
            max: u64::from(MAX_BITMAPS),
            limit: "QCOW2_MAX_BITMAPS",
        });
    }
    // Every entry takes at least the fixed part, so `nb` is bounded by the buffer too.
    let mut out = Vec::with_capacity((nb as usize).min(buf.len() / BITMAP_DIR_ENTRY_FIXED_LEN));
    let mut at = 0usize;
    for index in 0..nb as usize {
        let rest = &buf[at.min(buf.len())..];
        need(rest, BITMAP_DIR_ENTRY_FIXED_LEN, "bitmap directory entry")
            .map_err(|e| bad(index, at, e.to_string()))?;
        let name_size = be16(rest, 18) as usize;
        let extra = be32(rest, 20) as usize;
        if name_size == 0 || name_size > MAX_BITMAP_NAME_SIZE {
            return Err(bad(index, at, format!("name size {name_size} (1..=1023)")));
        }
        let total = BITMAP_DIR_ENTRY_FIXED_LEN
            .checked_add(extra)
            .and_then(|t| t.checked_add(name_size))
            .filter(|&t| t <= rest.len())
            .ok_or_else(|| bad(index, at, "entry runs past the directory".into()))?;
        let name_at = BITMAP_DIR_ENTRY_FIXED_LEN + extra;
        out.push(BitmapDirEntry {
            table_offset: be64(rest, 0),
            table_size: be32(rest, 8),
            flags: be32(rest, 12),
            kind: rest[16],
            granularity_bits: rest[17],
            name: rest[name_at..total].to_vec(),
        });
        at += pad8(total);
    }
    Ok(out)
}

/// Decode one bitmap table entry: `Some(host offset)` of its data cluster, or `None`
/// when the entry stores no cluster (all zeros, or all ones when bit 0 is set).
pub fn table_entry(raw: u64) -> Result<Option<u64>> {
    if raw & BME_TABLE_RESERVED_MASK != 0 {
        return Err(FormatError::ReservedBits {
            what: "bitmap table entry",
            value: raw,
            mask: BME_TABLE_RESERVED_MASK,
        });
    }
    let off = raw & BME_TABLE_OFFSET_MASK;
    Ok((off != 0).then_some(off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: u64, size: u32, name: &[u8], extra: usize) -> Vec<u8> {
        let mut e = vec![0u8; BITMAP_DIR_ENTRY_FIXED_LEN];
        e[0..8].copy_from_slice(&table.to_be_bytes());
        e[8..12].copy_from_slice(&size.to_be_bytes());
        e[16] = 1;
        e[17] = 16;
        e[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[20..24].copy_from_slice(&(extra as u32).to_be_bytes());
        e.extend(std::iter::repeat_n(0xee, extra));
        e.extend_from_slice(name);
        e.resize(pad8(e.len()), 0);
        e
    }

    #[test]
    fn parses_two_entries_with_padding_and_extra_data() {
        let mut d = entry(0x30000, 1, b"b0", 0);
        d.extend(entry(0x40000, 3, b"second", 5));
        let v = parse_directory(&d, 2).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].table_offset, v[0].table_size), (0x30000, 1));
        assert_eq!(v[1].name, b"second");
        assert_eq!(v[1].table_bytes(), 24);
        assert_eq!((v[1].kind, v[1].granularity_bits), (1, 16));
    }

    #[test]
    fn hostile_sizes_are_errors_not_reads_past_the_buffer() {
        let mut d = entry(0x30000, 1, b"b0", 0);
        d[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_directory(&d, 1).is_err());
        let d = entry(0x30000, 1, b"b0", 0);
        assert!(parse_directory(&d, 2).is_err(), "second entry missing");
        assert!(parse_directory(&d, u32::MAX).is_err());
        let mut d = entry(0x30000, 1, b"b0", 0);
        d[18..20].copy_from_slice(&0u16.to_be_bytes());
        assert!(parse_directory(&d, 1).is_err(), "empty name");
    }

    #[test]
    fn table_entries() {
        assert_eq!(table_entry(0).unwrap(), None);
        assert_eq!(table_entry(1).unwrap(), None, "all ones, no cluster");
        assert_eq!(table_entry(0x5_0000).unwrap(), Some(0x5_0000));
        assert!(table_entry(0x5_0002).is_err());
        assert!(table_entry(1 << 60).is_err());
    }
}
