//! Damaged bitmap directories (bit 0 still vouching for them), each as QEMU refuses it at
//! open ("Bitmap '...' doesn't satisfy the constraints", "Broken bitmap directory", ...).
//! Where QEMU refuses the whole image, the engine keeps the guest's data usable: a
//! read-only open reads the data, reports the damage, writes nothing; a read/write open
//! reports it, maintains no bitmap, and its first write drops the bitmaps extension (bit 0
//! cleared first), exactly what a program without bitmap support leaves: QEMU then opens
//! the image, finds no corruption (the damaged bitmaps' clusters are leaked, never freed:
//! a damaged directory cannot say which clusters are really its own), and every byte the
//! guest wrote reads back. A new bitmap can then be added. Never a panic.

mod support;

use std::path::{Path, PathBuf};

use qcow2_engine::{Image, OpenOptions};
use support::*;

const MIB: u64 = 1 << 20;

/// Host offset of the bitmaps extension's payload.
fn bitmaps_ext(p: &Path) -> u64 {
    let mut at = u64::from(file_be32(p, 100));
    loop {
        let (magic, len) = (file_be32(p, at), u64::from(file_be32(p, at + 4)));
        assert_ne!(magic, 0, "no bitmaps extension");
        if magic == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// (name, damage, what QEMU says when it refuses the image).
type Damage = (&'static str, fn(&Path), &'static str);

fn damages() -> Vec<Damage> {
    vec![
        (
            "directory past the end of the file",
            |p| patch_be64(p, bitmaps_ext(p) + 16, 1 << 40),
            "doesn't satisfy the constraints",
        ),
        (
            "more bitmaps in the header than in the directory",
            |p| patch_be32(p, bitmaps_ext(p), 5),
            "Less bitmaps found",
        ),
        (
            "directory size 0",
            |p| patch_be64(p, bitmaps_ext(p) + 8, 0),
            "directory size is zero",
        ),
        (
            "empty name",
            |p| {
                let d = bitmap_directory_offset(p);
                patch_file(p, d + 18, &[0, 0]);
            },
            "Broken bitmap directory",
        ),
        (
            "unaligned bitmap table",
            |p| {
                let d = bitmap_directory_offset(p);
                patch_be64(p, d, file_be64(p, d) + 512);
            },
            "doesn't satisfy the constraints",
        ),
        (
            "granularity 2^40",
            |p| {
                let d = bitmap_directory_offset(p);
                patch_file(p, d + 17, &[40]);
            },
            "doesn't satisfy the constraints",
        ),
    ]
}

fn build(dir: &TempDir, i: usize, damage: fn(&Path)) -> PathBuf {
    let p = dir.path(&format!("h{i}.qcow2"));
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    qemu_img(&["bitmap", "--add", ps, "b0"]);
    qemu_io(&[], &p, &["write -P 0x5a 0 128k".into()]);
    damage(&p);
    p
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, off).expect("read");
    b
}

#[test]
fn damaged_bitmap_directories_keep_the_data_and_drop_the_bitmaps() {
    require_qemu_tools();
    let dir = TempDir::new("hostile-bitmaps");
    for (i, (what, damage, qemu_says)) in damages().into_iter().enumerate() {
        let p = build(&dir, i, damage);
        let ps = p.to_str().unwrap();
        let (code, _, err) = qemu_img_status(&["info", ps]);
        assert!(
            code != 0 && err.contains(qemu_says),
            "{what}: QEMU should refuse it: {err}"
        );
        let before = std::fs::read(&p).unwrap();

        let pp = p.clone();
        let ro = guarded(what, 30, move || {
            let img = Image::open(&pp, &OpenOptions::parse("read-only=on").unwrap())
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((
                img.bitmaps_maintained(),
                img.bitmap_warnings(),
                read(&img, 0, 128 << 10),
            ))
        })
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
        assert!(!ro.0, "{what}: bitmaps maintained");
        assert!(!ro.1.is_empty(), "{what}: no warning");
        assert!(ro.2.iter().all(|&b| b == 0x5a), "{what}: data");
        assert!(
            std::fs::read(&p).unwrap() == before,
            "{what}: a read-only open wrote"
        );

        let img = Image::open(&p, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: read/write open: {e}"));
        assert!(!img.bitmaps_maintained(), "{what}");
        assert!(!img.bitmap_warnings().is_empty(), "{what}");
        img.write_at(&[0x77; 4096], MIB).expect("write");
        img.close().expect("close");

        // QEMU opens it now, sees no bitmap, finds no corruption, reads the data.
        assert_no_corruption(&p);
        let info = qemu_img_info_json(&p);
        assert!(
            info["format-specific"]["data"]["bitmaps"].is_null(),
            "{what}: {info}"
        );
        qemu_io(
            &["-r"],
            &p,
            &["read -P 0x5a 0 128k".into(), "read -P 0x77 1M 4k".into()],
        );

        // A new bitmap works on the repaired image.
        let img = Image::open(&p, &OpenOptions::default()).expect("reopen");
        assert!(
            img.bitmap_warnings().is_empty(),
            "{what}: {:?}",
            img.bitmap_warnings()
        );
        img.bitmap_add("fresh", None, true).expect("bitmap_add");
        img.write_at(&[0x11; 512], 2 * MIB).expect("write");
        img.close().expect("close");
        assert_no_corruption(&p);
        let q = qemu_img_info_json(&p);
        assert_eq!(
            q["format-specific"]["data"]["bitmaps"][0]["name"], "fresh",
            "{what}: {q}"
        );
    }
}
