//! Loading the bitmaps at open, with QEMU's checks (`bitmap_list_load`,
//! `check_dir_entry`, `check_table_entry`, `load_bitmap_data`). Damage never fails the
//! open: the bitmaps are then reported as damaged and not maintained (QEMU refuses such an
//! image, guest data included). Memory is bounded by QEMU's limits and a cap on the sum.

use host_io::Storage;
use qcow2_format::bitmaps::{
    bits_for, parse_directory, table_size_for, BitmapDirEntry, TableEntry, BME_FLAG_AUTO,
    BME_FLAG_IN_USE, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE,
};
use qcow2_format::{Geometry, HeaderArea};

use super::{Bitmap, Bitmaps, Bits, Status, CHUNK_BITS};
use crate::error::{Error, Result};
use crate::meta::MetaKind;

/// Most memory all bitmaps of one image may take (QEMU caps each at 512 MiB).
const MAX_TOTAL_BITMAP_BYTES: u64 = 4 << 30;

/// Host ranges the bitmaps occupy, for the overlap map.
pub(crate) type BitmapRegions = Vec<(u64, u64, MetaKind)>;

/// What QEMU prints when the extension is not vouched for.
const UNTRUSTED: &str = "a program lacking bitmap support modified this file, so all \
     bitmaps are now considered inconsistent; some clusters may be leaked, run 'qemu-img \
     check -r' on the image file to fix (the bitmaps extension is dropped at the first write)";

/// Read the bitmaps of an image whose cluster 0 is `area`.
pub(crate) fn load(
    storage: &dyn Storage,
    area: &HeaderArea,
    geo: &Geometry,
    file_len: u64,
) -> Result<(Bitmaps, BitmapRegions)> {
    let mut out = Bitmaps::absent();
    let h = &area.header;
    let Some(ext) = area.extensions.iter().find_map(|e| match e {
        qcow2_format::HeaderExtension::Bitmaps(b) => Some(*b),
        _ => None,
    }) else {
        return Ok((out, Vec::new()));
    };
    if h.version < 3 || h.autoclear_features & qcow2_format::features::autoclear::BITMAPS == 0 {
        out.status = Status::Untrusted;
        out.warnings.push(UNTRUSTED.into());
        return Ok((out, Vec::new()));
    }
    let mut regions = Vec::new();
    match read(storage, ext, geo, h.size, file_len, &mut out, &mut regions) {
        Ok(()) => {
            out.status = Status::Loaded;
            out.dir = Some((ext.directory_offset, ext.directory_size));
        }
        Err(Damage(why)) => {
            out.mark_damaged(why);
            regions.clear();
        }
        Err(Io(e)) => return Err(e),
    }
    out.refresh();
    Ok((out, regions))
}

/// Why loading stopped.
enum Stop {
    Damage(String),
    Io(Error),
}
use Stop::{Damage, Io};

fn damage(s: impl Into<String>) -> Stop {
    Damage(s.into())
}

fn read_exact(
    storage: &dyn Storage,
    buf: &mut [u8],
    off: u64,
    file_len: u64,
    what: &str,
) -> std::result::Result<(), Stop> {
    if off.saturating_add(buf.len() as u64) > file_len {
        return Err(damage(format!(
            "{what} at {off:#x} (+{:#x}) is past the end of the file",
            buf.len()
        )));
    }
    storage
        .read_at(buf, off)
        .map_err(|e| Io(Error::io(format!("reading the {what} at {off:#x}"))(e)))
}

fn read(
    storage: &dyn Storage,
    ext: qcow2_format::extensions::BitmapsExt,
    geo: &Geometry,
    virtual_size: u64,
    file_len: u64,
    out: &mut Bitmaps,
    regions: &mut BitmapRegions,
) -> std::result::Result<(), Stop> {
    let cs = geo.cluster_size();
    if ext.nb_bitmaps == 0 {
        return Err(damage("found bitmaps extension with zero bitmaps"));
    }
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(damage(format!("{} bitmaps", ext.nb_bitmaps)));
    }
    if ext.directory_size == 0
        || ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE
        || ext.directory_offset % cs != 0
    {
        return Err(damage(format!(
            "bitmap directory at {:#x} of {} bytes",
            ext.directory_offset, ext.directory_size
        )));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    read_exact(
        storage,
        &mut dir,
        ext.directory_offset,
        file_len,
        "bitmap directory",
    )?;
    let entries = parse_directory(&dir, ext.nb_bitmaps)
        .map_err(|e| damage(format!("bitmap directory: {e}")))?;
    let used = entries.last().map_or(0, |e| {
        e.at + BitmapDirEntry::encoded_len(e.name.len() + e.extra_data_size as usize)
    });
    if used as u64 != ext.directory_size {
        return Err(damage(
            "broken bitmap directory (its size does not match its entries)",
        ));
    }
    regions.push((
        ext.directory_offset,
        ext.directory_size,
        MetaKind::BitmapDirectory,
    ));
    let mut total = 0u64;
    for e in &entries {
        let name = String::from_utf8_lossy(&e.name);
        e.check(cs, virtual_size).map_err(|why| {
            damage(format!(
                "bitmap '{name}' doesn't satisfy the constraints: {why}"
            ))
        })?;
        if out.list.iter().any(|b| b.name == e.name) {
            return Err(damage(format!("bitmap '{name}' appears twice")));
        }
        let in_use = e.flags & BME_FLAG_IN_USE != 0;
        let nbits = if in_use {
            0
        } else {
            bits_for(virtual_size, e.granularity_bits)
        };
        if !in_use && table_size_for(nbits, cs) != u64::from(e.table_size) {
            return Err(damage(format!(
                "bitmap '{name}': a table of {} entries does not fit the virtual size",
                e.table_size
            )));
        }
        total += nbits.div_ceil(8);
        if total > MAX_TOTAL_BITMAP_BYTES {
            return Err(damage(format!(
                "the bitmaps would take more than {MAX_TOTAL_BITMAP_BYTES} bytes of memory"
            )));
        }
        let table = match read_table(storage, e, cs, file_len) {
            Ok(t) => t,
            // An in-use bitmap is not loaded (QEMU does not read its table either); it is
            // only removed, its clusters then left as leaks.
            Err(Damage(_)) if in_use => Vec::new(),
            Err(s) => return Err(prefix(s, &name)),
        };
        let mut bits = Bits::new(nbits);
        if !table.is_empty() {
            regions.push((e.table_offset, e.table_bytes(), MetaKind::BitmapTable));
        }
        let mut buf = vec![0u8; cs as usize];
        for (t, entry) in table.iter().enumerate() {
            let first = t as u64 * cs * 8;
            match *entry {
                TableEntry::Zeros => {}
                TableEntry::Ones if in_use => {}
                TableEntry::Ones => bits.set_range(first, first + cs * 8),
                TableEntry::Cluster(off) => {
                    regions.push((off, cs, MetaKind::BitmapData));
                    if !in_use {
                        read_exact(storage, &mut buf, off, file_len, "bitmap data")
                            .map_err(|s| prefix(s, &name))?;
                        bits.load(first, &buf);
                    }
                }
            }
        }
        let chunks = nbits.div_ceil(CHUNK_BITS);
        out.list.push(Bitmap {
            name: e.name.clone(),
            gran_bits: e.granularity_bits,
            enabled: e.flags & BME_FLAG_AUTO != 0,
            in_use,
            bits,
            table_off: e.table_offset,
            table_size: e.table_size,
            table,
            armed: Bits::new(chunks),
            touched: Bits::new(chunks),
            idle: Bits::new(chunks),
        });
    }
    // The bitmaps' own clusters must not overlap each other.
    let mut sorted: Vec<_> = regions
        .iter()
        .map(|&(s, l, _)| (s, s.saturating_add(l)))
        .collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(damage("the bitmaps' clusters overlap each other"));
    }
    Ok(())
}

fn prefix(s: Stop, name: &str) -> Stop {
    match s {
        Damage(why) => Damage(format!("bitmap '{name}': {why}")),
        io => io,
    }
}

/// Read and check a bitmap's table.
fn read_table(
    storage: &dyn Storage,
    e: &BitmapDirEntry,
    cs: u64,
    file_len: u64,
) -> std::result::Result<Vec<TableEntry>, Stop> {
    let mut raw = vec![0u8; e.table_bytes() as usize];
    read_exact(storage, &mut raw, e.table_offset, file_len, "bitmap table")?;
    qcow2_format::l1::decode_table(&raw)
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let t = TableEntry::decode(v, cs)
                .map_err(|err| damage(format!("table entry {i}: {err}")))?;
            if let TableEntry::Cluster(off) = t {
                if off.saturating_add(cs) > file_len {
                    return Err(damage(format!(
                        "table entry {i}: data cluster {off:#x} is past the end of the file"
                    )));
                }
            }
            Ok(t)
        })
        .collect()
}
