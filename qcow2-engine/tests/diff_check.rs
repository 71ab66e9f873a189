//! The engine's check against `qemu-img check` on damaged images where the two once
//! disagreed: truncated files (references past the end of the file), a referenced cluster
//! with refcount 0 under a leaks-only repair (qemu-img refuses and changes nothing), and
//! an empty (0-byte) disk, which has no L1 table; and a damaged bitmap table, which QEMU
//! cannot open and our repair makes usable again; the corrupt bit under a repair.

mod support;

use qcow2_engine::{CreateOptions, Image, OpenOptions, Repair};
use support::*;

/// (corruptions, leaks, image end offset, exit code) from qemu-img check.
fn qemu_counts(p: &std::path::Path) -> (u64, u64, u64, i32) {
    let v = qemu_check_verdict(p, 60);
    (v.corruptions, v.leaks, v.end, v.rc)
}

/// The same from the engine's check (the image must open read-only).
fn engine_counts(p: &std::path::Path) -> (u64, u64, u64, i32) {
    let (v, msg) = engine_check_verdict(p);
    assert_ne!(v.rc, 1, "engine check failed: {msg}");
    (v.corruptions, v.leaks, v.end, v.rc)
}

fn truncated(len: u64) {
    let d = TempDir::new("chk-trunc");
    let p = d.path("t.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_io(&[], &p, &["write -P 1 0 1M".to_string()]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len)
        .unwrap();
    let q = qemu_counts(&p);
    let e = engine_counts(&p);
    assert!(q.0 > 0, "the damage must be visible to qemu-img: {q:?}");
    assert_eq!(
        e, q,
        "engine (corruptions, leaks, end, exit) vs qemu-img at length {len}"
    );
}

#[test]
fn truncated_past_the_data_clusters_matches_qemu_img() {
    // Data clusters start at 0x50000: all sixteen lie a cluster or more past the end.
    truncated(300_000);
}

#[test]
fn truncated_past_the_l2_table_matches_qemu_img() {
    // The L2 table at 0x40000 is itself more than a cluster past the end.
    truncated(200_000);
}

#[test]
fn leaks_only_repair_refuses_when_refcounts_need_a_rebuild() {
    let d = TempDir::new("chk-rebuild");
    let p = d.path("r.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_io(&[], &p, &["write -P 7 0 64k".to_string()]);
    // The data cluster is at 0x50000, counted by the first refcount block at 0x20000
    // (16-bit refcounts): entry 5. Zero it, and add a leaked cluster at the end.
    let rb = file_be64(&p, 0x10000);
    assert_eq!(rb, 0x20000);
    patch_file(&p, rb + 5 * 2, &[0, 0]);
    let len = std::fs::metadata(&p).unwrap().len();
    patch_file(&p, rb + (len / 0x10000) * 2, &[0, 1]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len + 0x10000)
        .unwrap();
    let before = std::fs::read(&p).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).expect("open");
    let err = img
        .check(Repair::Leaks)
        .expect_err("a leaks-only repair must refuse");
    assert!(err.to_string().contains("rebuilt"), "{err}");
    drop(img);
    // The header's dirty/autoclear state aside, nothing was repaired: qemu-img agrees the
    // refcount is still 0 and the leak is still there.
    // qemu-img: the refcount-0 cluster and its wrong COPIED flag (2), the leak (1).
    let q = qemu_counts(&p);
    assert_eq!((q.0, q.1), (2, 1), "{q:?}");
    let e = engine_counts(&p);
    assert_eq!((e.0, e.1), (q.0, q.1), "engine vs qemu-img");
    let (code, _, err) = qemu_img_status(&["check", "-r", "leaks", ps]);
    assert_eq!(code, 1, "qemu-img refuses the same way: {err}");
    let after = std::fs::read(&p).unwrap();
    assert_eq!(before.len(), after.len());
    // A full repair fixes both, keeping the data.
    let img = Image::open(&p, &OpenOptions::default()).expect("open");
    let r = img.check(Repair::All).expect("repair all");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    img.close().unwrap();
    assert_check_clean(&p);
    qemu_io(&[], &p, &["read -P 7 0 64k".to_string()]);
}

#[test]
fn an_empty_disk_has_no_l1_table_and_can_grow() {
    let d = TempDir::new("chk-empty");
    let ours = d.path("ours.qcow2");
    let theirs = d.path("theirs.qcow2");
    let co = CreateOptions {
        size: Some(0),
        ..Default::default()
    };
    qcow2_engine::create(&ours, &co).expect("create");
    qemu_img(&["create", "-q", "-f", "qcow2", theirs.to_str().unwrap(), "0"]);
    assert_check_clean(&ours);
    assert_eq!(file_be64(&ours, 40), 0, "l1_table_offset of an empty disk");
    assert_eq!(
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len()
    );
    let img = Image::open(&ours, &OpenOptions::default()).expect("open");
    img.resize(1 << 20).expect("grow");
    img.write_at(&[9u8; 4096], 4096).expect("write");
    img.close().unwrap();
    assert_check_clean(&ours);
    qemu_io(
        &[],
        &ours,
        &[
            "read -P 9 4096 4096".to_string(),
            "read -P 0 0 4096".to_string(),
        ],
    );
}

/// A bitmap table entry with a reserved bit set: QEMU loads bitmaps at open and refuses
/// the whole image ("Could not read bitmap_table"), guest data included. Ours opens it,
/// reports the corruption, and a full repair drops the untrusted bitmaps and frees their
/// clusters, after which qemu-img checks the image clean and opens it again.
#[test]
fn a_damaged_bitmap_table_is_repaired_by_dropping_the_bitmaps() {
    let d = TempDir::new("chk-bitmap");
    let p = d.path("b.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    qemu_img(&["bitmap", "--add", ps, "b0"]);
    qemu_io(
        &["-f", "qcow2"],
        &p,
        &["write -q -P 0x5a 0 128k".to_string()],
    );
    let table = file_be64(&p, bitmap_directory_offset(&p));
    patch_be64(&p, table, file_be64(&p, table) | 2);
    assert_eq!(qemu_counts(&p).3, 1, "qemu-img cannot open it");
    let (v, msg) = engine_check_verdict(&p);
    assert_eq!((v.rc, v.corruptions), (2, 1), "{msg}");

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let rep = img.check(Repair::All).unwrap();
    assert_eq!(rep.exit_code(), 0, "{rep:?}");
    img.close().unwrap();
    assert_check_clean(&p);
    let mut buf = vec![0u8; 128 * 1024];
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a), "guest data kept");
}

/// The corrupt bit: a read/write open is refused naming the repair; a check-open (QEMU's
/// BDRV_O_CHECK) goes ahead but refuses guest writes, and a repair that leaves no
/// corruption clears the bit, as `qemu-img check -r all` does.
#[test]
fn a_repair_clears_the_corrupt_bit_of_a_check_open() {
    let d = TempDir::new("chk-corrupt-bit");
    let p = d.path("c.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    qemu_io(
        &["-f", "qcow2"],
        &p,
        &["write -q -P 0x5a 0 128k".to_string()],
    );
    patch_be64(&p, 72, file_be64(&p, 72) | 2); // incompatible bit 1: corrupt
    let Err(e) = Image::open(&p, &OpenOptions::default()) else {
        panic!("a read/write open of a corrupt image must be refused");
    };
    assert!(e.to_string().contains("check -r"), "{e}");

    let check = OpenOptions {
        check: true,
        ..Default::default()
    };
    let img = Image::open(&p, &check).unwrap();
    assert!(
        img.write_at(&[1u8; 512], 0).is_err(),
        "guest writes stay refused"
    );
    let rep = img.check(Repair::Leaks).unwrap();
    assert_eq!(rep.exit_code(), 0, "{rep:?}");
    assert_eq!(
        img.info().incompatible_features & 2,
        0,
        "corrupt bit cleared"
    );
    img.write_at(&[1u8; 512], 0).unwrap();
    img.close().unwrap();
    assert_check_clean(&p);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 1) && buf[512..].iter().all(|&b| b == 0x5a));
}
