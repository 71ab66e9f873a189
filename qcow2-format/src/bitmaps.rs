//! Persistent dirty bitmaps: the bitmap directory, bitmap table entries, and QEMU's
//! constraints on them (`block/qcow2-bitmap.c`).
//!
//! A bitmap of granularity `g` has one bit per `g` guest bytes; bit `i` is bit `i % 8` of
//! byte `i / 8` of the bitmap's data. Its table has one entry per cluster of data: a data
//! cluster, or none (all zeros, or all ones when bit 0 is set).

use crate::bytes::{be16, be32, be64, need, pad8, put16, put32, put64};
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

/// QEMU's `BME_MAX_PHYS_SIZE`: bytes of bitmap data (table size times cluster size).
pub const MAX_BITMAP_PHYS_SIZE: u64 = 0x2000_0000;
/// QEMU's `BME_MIN_GRANULARITY_BITS`: 512 bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// QEMU's `BME_MAX_GRANULARITY_BITS`: 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;

/// Directory entry flag: the bitmap was in use (its content is not trustworthy).
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap tracks writes (QEMU's "auto", i.e. enabled).
pub const BME_FLAG_AUTO: u32 = 1 << 1;
/// Directory entry flag: extra data may be ignored.
pub const BME_FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Directory entry flags QEMU refuses (it defines only in-use and auto).
pub const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
/// Bitmap type: dirty tracking (the only one defined).
pub const BT_DIRTY_TRACKING: u8 = 1;
/// Bit 0 of a table entry without a data cluster: the cluster's bits are all ones.
pub const BME_TABLE_ENTRY_ALL_ONES: u64 = 1;

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
    /// Bytes of extra data between the fixed part and the name.
    pub extra_data_size: u32,
    /// Byte offset of the entry inside the directory.
    pub at: usize,
}

impl BitmapDirEntry {
    /// Bytes the bitmap table occupies.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * 8
    }

    /// Bytes this entry takes in a directory written without extra data (padded to 8).
    pub fn encoded_len(name_len: usize) -> usize {
        pad8(BITMAP_DIR_ENTRY_FIXED_LEN + name_len)
    }

    /// QEMU's `check_dir_entry` for an image of `virtual_size` bytes with `cluster_size`
    /// clusters: why the entry is unusable, if it is. A bitmap that is not in use must
    /// have a table large enough for the virtual size.
    pub fn check(&self, cluster_size: u64, virtual_size: u64) -> std::result::Result<(), String> {
        if self.table_size == 0 || self.table_offset == 0 || self.table_offset % cluster_size != 0 {
            return Err(format!(
                "bitmap table at {:#x} with {} entries",
                self.table_offset, self.table_size
            ));
        }
        if self.table_size > MAX_BITMAP_TABLE_SIZE {
            return Err(format!("bitmap table of {} entries", self.table_size));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return Err(format!("granularity bits {}", self.granularity_bits));
        }
        if self.flags & BME_RESERVED_FLAGS != 0 {
            return Err(format!("reserved flags {:#x}", self.flags));
        }
        if self.kind != BT_DIRTY_TRACKING {
            return Err(format!("type {}", self.kind));
        }
        if self.extra_data_size != 0 {
            return Err("extra data (QEMU does not support it)".into());
        }
        let phys = u64::from(self.table_size) * cluster_size;
        if phys > MAX_BITMAP_PHYS_SIZE {
            return Err(format!("{phys} bytes of bitmap data"));
        }
        let covered = (phys * 8).checked_shl(u32::from(self.granularity_bits));
        if self.flags & BME_FLAG_IN_USE == 0 && covered.is_some_and(|c| virtual_size > c) {
            return Err(format!(
                "a table of {} entries is too small for the virtual size",
                self.table_size
            ));
        }
        Ok(())
    }
}

/// Bits a bitmap of granularity `1 << gran_bits` has over `virtual_size` bytes.
pub fn bits_for(virtual_size: u64, gran_bits: u8) -> u64 {
    virtual_size.div_ceil(1u64 << gran_bits)
}

/// Table entries (data clusters) a bitmap of `bits` bits needs: exactly what QEMU
/// requires of a bitmap it loads.
pub fn table_size_for(bits: u64, cluster_size: u64) -> u64 {
    bits.div_ceil(8).div_ceil(cluster_size)
}

/// A directory entry to write: the fields QEMU writes (no extra data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDirEntry<'a> {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the table.
    pub table_size: u32,
    /// Flags (in use, auto).
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Name (1 to 1023 bytes).
    pub name: &'a [u8],
}

/// Serialize a bitmap directory (each entry padded to 8 bytes).
pub fn serialize_directory(entries: &[NewDirEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let at = out.len();
        out.resize(at + BitmapDirEntry::encoded_len(e.name.len()), 0);
        let b = &mut out[at..];
        put64(b, 0, e.table_offset);
        put32(b, 8, e.table_size);
        put32(b, 12, e.flags);
        b[16] = BT_DIRTY_TRACKING;
        b[17] = e.granularity_bits;
        put16(b, 18, e.name.len() as u16);
        put32(b, 20, 0);
        b[BITMAP_DIR_ENTRY_FIXED_LEN..BITMAP_DIR_ENTRY_FIXED_LEN + e.name.len()]
            .copy_from_slice(e.name);
    }
    out
}

/// A bitmap table entry, checked as QEMU's `check_table_entry` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// No data cluster: the bits read zero.
    Zeros,
    /// No data cluster: the bits read one.
    Ones,
    /// The bits are in the data cluster at this host offset.
    Cluster(u64),
}

impl TableEntry {
    /// Decode a raw entry; reserved bits, an unaligned offset or bit 0 beside an offset
    /// are errors.
    pub fn decode(raw: u64, cluster_size: u64) -> Result<TableEntry> {
        let bad = || FormatError::ReservedBits {
            what: "bitmap table entry",
            value: raw,
            mask: BME_TABLE_RESERVED_MASK,
        };
        if raw & BME_TABLE_RESERVED_MASK != 0 {
            return Err(bad());
        }
        let off = raw & BME_TABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(if raw & BME_TABLE_ENTRY_ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeros
            });
        }
        if raw & BME_TABLE_ENTRY_ALL_ONES != 0 || off % cluster_size != 0 {
            return Err(bad());
        }
        Ok(TableEntry::Cluster(off))
    }

    /// The raw entry.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => BME_TABLE_ENTRY_ALL_ONES,
            TableEntry::Cluster(off) => off,
        }
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
            extra_data_size: extra as u32,
            at,
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
    fn serialized_directory_parses_back() {
        let names: [&[u8]; 2] = [b"b0", b"a-much-longer-name"];
        let entries: Vec<NewDirEntry> = names
            .iter()
            .enumerate()
            .map(|(i, n)| NewDirEntry {
                table_offset: 0x10000 * (i as u64 + 1),
                table_size: 1,
                flags: BME_FLAG_AUTO,
                granularity_bits: 16,
                name: n,
            })
            .collect();
        let d = serialize_directory(&entries);
        assert_eq!(d.len(), 32 + 48);
        let v = parse_directory(&d, 2).unwrap();
        assert_eq!((v[1].name.as_slice(), v[1].at), (names[1], 32));
        assert_eq!((v[0].flags, v[0].granularity_bits), (BME_FLAG_AUTO, 16));
        assert!(v[0].check(65536, 1 << 30).is_ok());
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB.
        assert!(v[0].check(65536, 33 << 30).is_err());
        let mut in_use = v[0].clone();
        in_use.flags |= BME_FLAG_IN_USE;
        assert!(
            in_use.check(65536, 33 << 30).is_ok(),
            "in-use bitmaps may be short"
        );
        assert_eq!(table_size_for(bits_for(32 << 30, 16), 65536), 1);
        assert_eq!(table_size_for(bits_for((32 << 30) + 1, 16), 65536), 2);
    }

    #[test]
    fn strict_table_entries() {
        let cs = 65536;
        assert_eq!(TableEntry::decode(0, cs).unwrap(), TableEntry::Zeros);
        assert_eq!(TableEntry::decode(1, cs).unwrap(), TableEntry::Ones);
        assert_eq!(
            TableEntry::decode(0x5_0000, cs).unwrap(),
            TableEntry::Cluster(0x5_0000)
        );
        assert!(
            TableEntry::decode(0x5_0001, cs).is_err(),
            "bit 0 beside an offset"
        );
        assert!(TableEntry::decode(0x5_0200, cs).is_err(), "unaligned");
        assert!(TableEntry::decode(2, cs).is_err());
        assert_eq!(TableEntry::Cluster(0x5_0000).encode(), 0x5_0000);
        assert_eq!(TableEntry::Ones.encode(), 1);
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
