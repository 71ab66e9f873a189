//! Helpers shared by the provisioning tests (`provision_host_effects.rs`,
//! `snapshot_safety.rs`, `discard_differential_more.rs`): what the host file holds under a
//! range (hole, allocated blocks, bytes), refcounts read straight from the file, and maps
//! from the engine and from `qemu-img map` in one comparable form.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use host_io::{FileOptions, FileStorage, Storage};
use qcow2_engine::Image;

use crate::support::{file_be64, qemu_img, read_file_at};

/// The five provisioning modes by option value, with their (qcow2, host) layers.
pub const MODES: &[&str] = &["off", "full", "metadata", "thin", "reuse"];

/// Bytes the file occupies on its filesystem (`st_blocks * 512`): anchored (zeroed but
/// allocated, including ext4's unwritten extents) ranges count, punched ones do not.
pub fn allocated_bytes(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .blocks()
        * 512
}

/// Whether `[off, off+len)` of the host file is entirely a hole (SEEK_DATA finds nothing
/// there). ext4 reports unwritten (ZERO_RANGE) extents as holes too, unless their pages
/// were read into the page cache since: read the range first to tell a released range
/// from an anchored one, and use [`allocated_bytes`] as well.
pub fn host_is_hole(p: &Path, off: u64, len: u64) -> bool {
    let f = FileStorage::open(p, &FileOptions::new().read_only(true)).expect("open host file");
    let (data, n) = f.data_run(off, len).expect("data_run");
    !data && n >= len
}

/// Whether `[off, off+len)` of the host file starts with data (SEEK_DATA says data).
pub fn host_is_data(p: &Path, off: u64, len: u64) -> bool {
    let f = FileStorage::open(p, &FileOptions::new().read_only(true)).expect("open host file");
    let (data, n) = f.data_run(off, len).expect("data_run");
    data && n >= len
}

/// `len` bytes of the host file at `off` (zeros past its end).
pub fn host_bytes(p: &Path, off: u64, len: u64) -> Vec<u8> {
    let file_len = std::fs::metadata(p).unwrap().len();
    let mut buf = vec![0u8; len as usize];
    if off < file_len {
        let n = (file_len - off).min(len) as usize;
        read_file_at(p, &mut buf[..n], off);
    }
    buf
}

/// Probe the filesystem under `dir`: punch a hole into a scratch file and check that
/// SEEK_DATA skips it and that `st_blocks` drops. `Err(reason)` when holes are unsupported.
pub fn probe_holes(dir: &Path) -> Result<(), String> {
    let p = dir.join("hole-probe");
    std::fs::write(&p, vec![0x5au8; 256 << 10]).map_err(|e| e.to_string())?;
    let f = FileStorage::open(&p, &FileOptions::new()).map_err(|e| e.to_string())?;
    f.flush().map_err(|e| e.to_string())?;
    let before = allocated_bytes(&p);
    let out = f.discard(64 << 10, 64 << 10).map_err(|e| e.to_string())?;
    f.flush().map_err(|e| e.to_string())?;
    let after = allocated_bytes(&p);
    drop(f);
    let hole = host_is_hole(&p, 64 << 10, 64 << 10);
    let _ = std::fs::remove_file(&p);
    if out != host_io::DiscardOutcome::Released {
        return Err(format!("punching a hole is unsupported here ({out:?})"));
    }
    if !hole {
        return Err("SEEK_DATA does not report punched ranges as holes".into());
    }
    if after + (64 << 10) > before {
        return Err(format!(
            "st_blocks does not drop on a punch ({before} -> {after} bytes)"
        ));
    }
    Ok(())
}

/// Refcount of the host cluster holding `host_off`, read from the file (refcount width and
/// table from the header; 0 when no refcount block covers it).
pub fn refcount_of(p: &Path, host_off: u64) -> u64 {
    let cluster_bits = crate::support::file_be32(p, 20);
    let version = crate::support::file_be32(p, 4);
    let order = if version >= 3 {
        crate::support::file_be32(p, 96)
    } else {
        4
    };
    let cs = 1u64 << cluster_bits;
    let bits = 1u64 << order;
    let per_block = cs * 8 / bits;
    let idx = host_off >> cluster_bits;
    let rt = file_be64(p, 48);
    let rb = file_be64(p, rt + 8 * (idx / per_block)) & !(cs - 1) & ((1 << 56) - 1);
    if rb == 0 {
        return 0;
    }
    let i = idx % per_block;
    if bits < 8 {
        // Sub-byte refcounts are packed from the least significant bit (QEMU's order).
        let mut b = [0u8; 1];
        read_file_at(p, &mut b, rb + i * bits / 8);
        (u64::from(b[0]) >> ((i * bits) % 8)) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let mut b = [0u8; 8];
        read_file_at(p, &mut b[8 - n..], rb + i * bits / 8);
        u64::from_be_bytes(b)
    }
}

/// One map entry in `qemu-img map --output=json` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRow {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

/// `qemu-img map --output=json` of the image, parsed (`extra` goes before the file name).
pub fn qemu_map(p: &Path, extra: &[&str]) -> Vec<MapRow> {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(extra);
    args.push(p.to_str().unwrap());
    let out = qemu_img(&args);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map JSON: {e}\n{out}"));
    v.as_array()
        .expect("map is an array")
        .iter()
        .map(|e| {
            let u = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
            let b = |k: &str| e[k].as_bool().unwrap_or_else(|| panic!("{k} in {e}"));
            MapRow {
                start: u("start"),
                length: u("length"),
                depth: u("depth"),
                present: b("present"),
                zero: b("zero"),
                data: b("data"),
                compressed: e["compressed"].as_bool().unwrap_or(false),
                offset: e["offset"].as_u64(),
            }
        })
        .collect()
}

/// The engine's map of the whole image, as rows.
pub fn engine_map(img: &Image) -> Vec<MapRow> {
    engine_map_range(img, 0, img.virtual_size())
}

/// The engine's map of `[off, off+len)`, as rows.
pub fn engine_map_range(img: &Image, off: u64, len: u64) -> Vec<MapRow> {
    img.map(off, len)
        .expect("Image::map")
        .into_iter()
        .map(|e| MapRow {
            start: e.start,
            length: e.status.len,
            depth: e.status.depth as u64,
            present: e.status.present,
            zero: e.status.zero,
            data: e.status.data,
            compressed: e.status.compressed,
            offset: e.status.host_offset,
        })
        .collect()
}

/// Undo QEMU's metadata-preallocation heuristic (`qcow2_detect_metadata_preallocation`):
/// when an image has many more refcounted clusters than the file has blocks (after
/// discard-no-unref punches, say), qemu-img map asks the file layer about data clusters
/// and reports holes inside them as `zero: true, data: true`. The qcow2 layer alone never
/// reports both, and the engine's map does not guess from `st_blocks`, so such rows are
/// read as plain data and re-merged (same flags, contiguous offsets).
pub fn without_recursed_zero(rows: &[MapRow]) -> Vec<MapRow> {
    let mut out: Vec<MapRow> = Vec::new();
    for r in rows {
        let r = MapRow {
            zero: r.zero && !r.data,
            ..*r
        };
        match out.last_mut() {
            Some(l)
                if l.start + l.length == r.start
                    && (l.depth, l.present, l.zero, l.data, l.compressed)
                        == (r.depth, r.present, r.zero, r.data, r.compressed)
                    && match (l.offset, r.offset) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a + l.length == b,
                        _ => false,
                    } =>
            {
                l.length += r.length
            }
            _ => out.push(r),
        }
    }
    out
}

/// Rows with offsets reduced to "has one", adjacent equal rows merged: comparable between
/// twin images whose host layouts differ.
pub fn normalize(rows: &[MapRow]) -> Vec<MapRow> {
    let mut out: Vec<MapRow> = Vec::new();
    for r in rows {
        let r = MapRow {
            offset: r.offset.map(|_| 1),
            ..*r
        };
        match out.last_mut() {
            Some(l)
                if l.start + l.length == r.start
                    && (l.depth, l.present, l.zero, l.data, l.compressed, l.offset)
                        == (r.depth, r.present, r.zero, r.data, r.compressed, r.offset) =>
            {
                l.length += r.length
            }
            _ => out.push(r),
        }
    }
    out
}

/// Render rows one per line for assertion messages.
pub fn show(rows: &[MapRow]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "  {:#x}+{:#x} d{} {}{}{}{} off={}",
                r.start,
                r.length,
                r.depth,
                if r.present { "P" } else { "-" },
                if r.zero { "Z" } else { "-" },
                if r.data { "D" } else { "-" },
                if r.compressed { "C" } else { "-" },
                r.offset.map_or("none".into(), |o| format!("{o:#x}"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Copy a file keeping its holes (`std::fs::copy` may fill them, and a raw backing file's
/// holes are part of what block status reports).
pub fn sparse_copy(src: &Path, dst: &Path) {
    let from = FileStorage::open(src, &FileOptions::new().read_only(true)).expect("open src");
    let len = from.len().expect("len");
    let _ = std::fs::remove_file(dst);
    let to = FileStorage::open(dst, &FileOptions::create_new()).expect("create dst");
    to.set_len(len).expect("set_len");
    let mut pos = 0;
    while pos < len {
        let (data, n) = from.data_run(pos, len - pos).expect("data_run");
        let n = n.max(1);
        if data {
            let mut buf = vec![0u8; n.min(1 << 20) as usize];
            let n = buf.len() as u64;
            from.read_at(&mut buf, pos).expect("read");
            to.write_at(&buf, pos).expect("write");
            pos += n;
        } else {
            pos += n;
        }
    }
    to.flush().expect("flush");
}
