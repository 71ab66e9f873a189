//! The clusters persistent dirty bitmaps own, for check: the bitmap directory, each
//! bitmap's table and the data clusters the tables name. Counted only while the bitmaps
//! extension is marked consistent (autoclear bit 0), as qemu-img does; once a writer that
//! does not maintain bitmaps has cleared that bit, those clusters are leaks.

use qcow2_format::bitmaps::{self, MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAP_TABLE_SIZE};
use qcow2_format::extensions::HeaderExtension;

use crate::error::Result;
use crate::integrity::check::CheckReport;
use crate::meta::Meta;

/// Receives each host region a bitmap structure occupies: offset, length, what it is.
pub(crate) type OnRegion<'a> = &'a mut dyn FnMut(&mut CheckReport, u64, u64, &'static str);

/// Report every region the bitmaps own to `f`. Damage is reported in `rep` as a
/// corruption (the part that could be read is still counted). Memory stays bounded by one
/// cluster of table at a time plus the directory (at most 64 MiB by QEMU's limit, never
/// more than the part inside the file), and time by the file: tables are read only while
/// their total stays within the file's length (more means they overlap).
pub(crate) fn bitmap_regions(
    m: &Meta,
    rep: &mut CheckReport,
    file_len: u64,
    f: OnRegion<'_>,
) -> Result<()> {
    if !m.header.bitmaps_consistent() {
        return Ok(());
    }
    let Some(ext) = m.header.area().extensions.iter().find_map(|e| match e {
        HeaderExtension::Bitmaps(b) => Some(*b),
        _ => None,
    }) else {
        return Ok(());
    };
    let cs = m.geo.cluster_size();
    let corrupt = |rep: &mut CheckReport, msg: String| {
        rep.corruptions += 1;
        rep.messages.push(format!("ERROR {msg}"));
    };
    f(
        rep,
        ext.directory_offset,
        ext.directory_size,
        "bitmap directory",
    );
    if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE || ext.directory_offset % cs != 0 {
        corrupt(
            rep,
            format!(
                "bitmap directory at {:#x} size {:#x}: unaligned or larger than QEMU allows",
                ext.directory_offset, ext.directory_size
            ),
        );
        return Ok(());
    }
    let in_file = ext
        .directory_size
        .min(file_len.saturating_sub(ext.directory_offset));
    let mut dir = vec![0u8; in_file as usize];
    m.read_host(&mut dir, ext.directory_offset, "bitmap directory")?;
    let entries = match bitmaps::parse_directory(&dir, ext.nb_bitmaps) {
        Ok(v) => v,
        Err(e) => {
            corrupt(rep, format!("bitmap directory: {e}"));
            return Ok(());
        }
    };
    let mut chunk = vec![0u8; cs as usize];
    let mut table_bytes_read = 0u64;
    for (i, b) in entries.iter().enumerate() {
        let name = String::from_utf8_lossy(&b.name);
        if b.table_offset % cs != 0 || b.table_size > MAX_BITMAP_TABLE_SIZE {
            corrupt(
                rep,
                format!(
                    "bitmap {i} '{name}': table at {:#x} with {} entries is unaligned or too large",
                    b.table_offset, b.table_size
                ),
            );
            continue;
        }
        f(rep, b.table_offset, b.table_bytes(), "bitmap table");
        // Only the part of the table inside the file is read, a cluster at a time.
        let readable = b.table_bytes().min(file_len.saturating_sub(b.table_offset));
        table_bytes_read += readable;
        if table_bytes_read > file_len {
            let msg = format!("bitmap {i} '{name}': the bitmap tables overlap");
            corrupt(rep, msg);
            return Ok(());
        }
        let mut at = 0u64;
        while at < readable {
            let n = (readable - at).min(cs) as usize / 8 * 8;
            if n == 0 {
                break;
            }
            m.read_host(&mut chunk[..n], b.table_offset + at, "bitmap table")?;
            for (j, raw) in qcow2_format::l1::decode_table(&chunk[..n])
                .into_iter()
                .enumerate()
            {
                match bitmaps::table_entry(raw) {
                    Ok(Some(off)) if off % cs == 0 => f(rep, off, cs, "bitmap data cluster"),
                    Ok(Some(_)) | Err(_) => corrupt(
                        rep,
                        format!(
                            "bitmap {i} '{name}': table entry {} ({raw:#x}) is invalid",
                            at / 8 + j as u64
                        ),
                    ),
                    Ok(None) => {}
                }
            }
            at += n as u64;
        }
    }
    Ok(())
}
