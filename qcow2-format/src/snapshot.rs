//! Internal snapshot table entries, with their extra data, id and name.

use crate::bytes::{be16, be32, be64, need, pad8, put16, put32, put64};
use crate::error::{FormatError, Result};
use crate::geometry::MAX_SNAPSHOT_EXTRA_DATA;

/// Fixed part of a snapshot table entry.
pub const SNAPSHOT_FIXED_LEN: usize = 40;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: Vec<u8>,
    /// Name.
    pub name: Vec<u8>,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit legacy field).
    pub vm_state_size: u32,
    /// Extra data: 64-bit VM state size (bytes 0..8), if present.
    pub vm_state_size_large: Option<u64>,
    /// Extra data: virtual disk size at snapshot time (bytes 8..16), if present.
    pub disk_size: Option<u64>,
    /// Extra data: icount (bytes 16..24), if present.
    pub icount: Option<u64>,
    /// Extra data beyond the known fields, kept byte-exact.
    pub extra_unknown: Vec<u8>,
}

impl SnapshotEntry {
    /// Parse one entry at the start of `buf`; returns it and its padded length.
    pub fn parse(buf: &[u8], index: usize, at: usize) -> Result<(SnapshotEntry, usize)> {
        let bad = |reason: String| FormatError::BadSnapshot { index, at, reason };
        need(buf, SNAPSHOT_FIXED_LEN, "snapshot table entry")?;
        let id_len = be16(buf, 12) as usize;
        let name_len = be16(buf, 14) as usize;
        let extra_len = be32(buf, 36) as u64;
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(bad(format!(
                "extra data size {extra_len} exceeds QCOW_MAX_SNAPSHOT_EXTRA_DATA ({MAX_SNAPSHOT_EXTRA_DATA})"
            )));
        }
        let extra_len = extra_len as usize;
        let total = SNAPSHOT_FIXED_LEN + extra_len + id_len + name_len;
        if buf.len() < total {
            return Err(bad(format!(
                "entry needs {total} bytes, table has {}",
                buf.len()
            )));
        }
        let extra = &buf[SNAPSHOT_FIXED_LEN..SNAPSHOT_FIXED_LEN + extra_len];
        let field = |i: usize| (extra.len() >= (i + 1) * 8).then(|| be64(extra, i * 8));
        let id_at = SNAPSHOT_FIXED_LEN + extra_len;
        let e = SnapshotEntry {
            l1_table_offset: be64(buf, 0),
            l1_size: be32(buf, 8),
            date_sec: be32(buf, 16),
            date_nsec: be32(buf, 20),
            vm_clock_nsec: be64(buf, 24),
            vm_state_size: be32(buf, 32),
            vm_state_size_large: field(0),
            disk_size: field(1),
            icount: field(2),
            extra_unknown: extra.get(24..).map(<[u8]>::to_vec).unwrap_or_default(),
            id: buf[id_at..id_at + id_len].to_vec(),
            name: buf[id_at + id_len..total].to_vec(),
        };
        Ok((e, pad8(total).min(buf.len().max(total))))
    }

    fn extra_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let known = [self.vm_state_size_large, self.disk_size, self.icount];
        let last = known.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        let last = if self.extra_unknown.is_empty() {
            last
        } else {
            3
        };
        for f in &known[..last] {
            v.extend_from_slice(&f.unwrap_or(0).to_be_bytes());
        }
        v.extend_from_slice(&self.extra_unknown);
        v
    }

    /// Serialize, padded to 8 bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let extra = self.extra_bytes();
        if extra.len() as u64 > MAX_SNAPSHOT_EXTRA_DATA
            || self.id.len() > 0xffff
            || self.name.len() > 0xffff
        {
            return Err(FormatError::Unencodable {
                what: "snapshot entry",
                reason: "extra data, id or name too long".into(),
            });
        }
        let total = SNAPSHOT_FIXED_LEN + extra.len() + self.id.len() + self.name.len();
        let mut b = vec![0u8; pad8(total)];
        put64(&mut b, 0, self.l1_table_offset);
        put32(&mut b, 8, self.l1_size);
        put16(&mut b, 12, self.id.len() as u16);
        put16(&mut b, 14, self.name.len() as u16);
        put32(&mut b, 16, self.date_sec);
        put32(&mut b, 20, self.date_nsec);
        put64(&mut b, 24, self.vm_clock_nsec);
        put32(&mut b, 32, self.vm_state_size);
        put32(&mut b, 36, extra.len() as u32);
        let mut at = SNAPSHOT_FIXED_LEN;
        for part in [&extra[..], &self.id[..], &self.name[..]] {
            b[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(b)
    }
}

/// Parse `count` entries from a snapshot table buffer.
pub fn parse_snapshot_table(buf: &[u8], count: usize) -> Result<Vec<SnapshotEntry>> {
    let mut out = Vec::with_capacity(count.min(buf.len() / SNAPSHOT_FIXED_LEN + 1));
    let mut at = 0;
    for index in 0..count {
        let (e, len) = SnapshotEntry::parse(&buf[at.min(buf.len())..], index, at)?;
        out.push(e);
        at += len;
    }
    Ok(out)
}

/// Serialize a snapshot table.
pub fn serialize_snapshot_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.to_bytes()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u8) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x70000 + u64::from(i) * 0x10000,
            l1_size: 2,
            id: format!("{i}").into_bytes(),
            name: format!("snap{i}").into_bytes(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            vm_state_size_large: Some(0),
            disk_size: Some(1 << 30),
            icount: if i % 2 == 0 { Some(u64::MAX) } else { None },
            extra_unknown: Vec::new(),
        }
    }

    #[test]
    fn table_round_trip() {
        let t: Vec<_> = (0..5).map(sample).collect();
        let b = serialize_snapshot_table(&t).unwrap();
        assert_eq!(parse_snapshot_table(&b, 5).unwrap(), t);
        assert_eq!(b.len() % 8, 0);
    }

    #[test]
    fn truncated_and_hostile() {
        let b = serialize_snapshot_table(&[sample(1)]).unwrap();
        for n in 0..b.len() - 7 {
            assert!(parse_snapshot_table(&b[..n], 1).is_err(), "len {n}");
        }
        assert!(parse_snapshot_table(&b, 2).is_err());
        let mut h = b.clone();
        h[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_snapshot_table(&h, 1)
            .unwrap_err()
            .to_string()
            .contains("EXTRA"));
    }
}
