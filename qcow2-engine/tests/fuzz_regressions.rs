//! Regressions found by the whole-image fuzz targets (`qcow2-engine/fuzz`) and while
//! checking their seed images. Each input is built here programmatically (the fuzzers' own
//! crashing inputs are large and mostly zeros), then run through the operation that failed.

mod support;

use std::sync::Arc;

use host_io::{MemStorage, Storage};
use qcow2_engine::{create_on, CreateOptions, Image, OpenOptions, Repair};
use qcow2_format::l2::{L2E_OFFSET_MASK, OFLAG_COPIED};
use support::{assert_check_clean, file_be64, patch_be64, qemu_img, qemu_io, TempDir};

const H_L1_TABLE_OFFSET: usize = 40;
const H_NB_SNAPSHOTS: usize = 60;
const H_SNAPSHOTS_OFFSET: usize = 64;

/// Run the named test of this binary again in a child whose address space is capped with
/// `ulimit -v` (KiB): an allocation proportional to a claimed size then fails the child.
/// Returns true in the child (the caller runs the body), false in the parent.
fn in_capped_child(test: &str, limit_kib: u64) -> bool {
    if std::env::var_os("QCOWPROV_CAPPED_CHILD").is_some() {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {limit_kib} && exec \"$0\" \"$@\""))
        .arg(&exe)
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("QCOWPROV_CAPPED_CHILD", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{test} under ulimit -v {limit_kib}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A fresh 64 KiB image with 512-byte clusters in memory.
fn tiny_image(refcount_bits: u64) -> Arc<MemStorage> {
    let mem = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        size: Some(64 * 1024),
        cluster_size: 512,
        refcount_bits,
        ..CreateOptions::default()
    };
    create_on(mem.clone(), &opts, None).unwrap();
    mem
}

/// A 64 KiB image with 512-byte clusters whose guest cluster 0 is allocated, with the
/// L2 entry of guest cluster 0 then replaced by `entry`.
fn image_with_l2_entry_0(entry: u64) -> Vec<u8> {
    let mem = tiny_image(16);
    let img = Image::open_storage(mem.clone(), &OpenOptions::default(), None).unwrap();
    img.write_at(&[0x5a; 512], 0).unwrap();
    img.close().unwrap();
    let mut bytes = mem.to_vec();
    let l1 = be64(&bytes, H_L1_TABLE_OFFSET) as usize;
    let l2 = (be64(&bytes, l1) & L2E_OFFSET_MASK) as usize;
    assert_ne!(l2, 0, "builder: guest cluster 0 has an L2 table");
    assert_ne!(be64(&bytes, l2), 0, "builder: guest cluster 0 is allocated");
    bytes[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    bytes
}

fn open(mem: &Arc<MemStorage>, options: &str) -> Image {
    let opts = OpenOptions::parse(options).unwrap();
    Image::open_storage(mem.clone() as Arc<dyn Storage>, &opts, None).unwrap()
}

/// fuzz `open_image`, out-of-memory in `check`: an L2 entry (COPIED) pointed guest cluster
/// 0 at host offset 0xffffff0a00, ~1 TiB past the end of a 40 KiB file. The in-place write
/// path trusted it and wrote there, growing the file to 1 TiB; the next `check` then
/// allocated one counter per host cluster of the file (8 GiB). Writes to a cluster past
/// the image's end are now refused as corruption, and the file does not grow.
#[test]
fn write_through_an_l2_entry_past_the_end_of_the_file_is_refused() {
    let far = 0xff_ffff_0a00u64;
    for options in ["", "provision=full", "provision=thin", "discard=unmap"] {
        let bytes = image_with_l2_entry_0(far | OFLAG_COPIED);
        let len = bytes.len() as u64;
        let mem = Arc::new(MemStorage::from_vec(bytes));
        let img = open(&mem, options);

        // In place (full cluster, partial cluster), and write-zeroes' unaligned fallback
        // that writes zero bytes through the same path.
        let e = img.write_at(&[1; 512], 0).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{options}: {e}");
        assert!(img.write_at(&[2; 100], 10).is_err(), "{options}");
        let _ = img.write_zeroes(10, 100, false);
        let _ = img.write_zeroes(0, 512, false);
        let _ = img.discard(0, 512);
        let _ = img.flush();
        assert!(
            mem.len().unwrap() < 1 << 20,
            "{options}: the file grew to {:#x} (was {len:#x})",
            mem.len().unwrap()
        );
        // Check reports the bad reference and stays proportional to the file.
        let rep = img.check(Repair::None).unwrap();
        assert!(rep.corruptions > 0, "{options}: {rep:?}");
        drop(img);
        assert!(mem.len().unwrap() < 1 << 20, "{options}");
    }
}

/// Seed check of the fuzz corpus: on an image with a persistent bitmap (autoclear bit 0 and
/// the bitmaps extension, made by `qemu-img bitmap --add`) `check` counted the bitmap
/// directory and table as leaks, and a repair freed them while the autoclear bit still
/// made QEMU trust the extension ("refcount=0 reference=1" in `qemu-img check`). Bitmaps
/// are now counted as qemu-img counts them, a repair keeps sound bitmaps, writes maintain
/// them, and once a program without bitmap support has cleared the autoclear bit their
/// clusters are leaks to both tools, which a repair frees.
#[test]
fn bitmap_clusters_are_counted_while_the_extension_is_trusted() {
    for repair in [Repair::Leaks, Repair::All] {
        let dir = TempDir::new("fuzz-bitmap");
        let p = dir.path("bm.qcow2");
        let ps = p.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            ps,
            "64k",
        ]);
        qemu_img(&["bitmap", "--add", ps, "bm0"]);
        qemu_io(&["-f", "qcow2"], &p, &["write -P 0x05 0 4k".to_string()]);
        assert_check_clean(&p);

        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        assert_ne!(
            img.info().autoclear_features,
            0,
            "builder: bitmaps autoclear bit"
        );
        let rep = img.check(Repair::None).unwrap();
        assert_eq!((rep.leaks, rep.corruptions), (0, 0), "{rep:?}");
        let rep = img.check(repair).unwrap();
        assert_eq!((rep.leaks, rep.corruptions), (0, 0), "{repair:?}: {rep:?}");
        assert_ne!(img.info().autoclear_features, 0, "{repair:?}: bitmaps kept");
        img.close().unwrap();
        assert_check_clean(&p);

        // The bitmap is maintained: a write keeps the bit, marks the bitmap, and both
        // tools still find no leak.
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        img.write_at(&[7u8; 512], 8192).unwrap();
        img.flush().unwrap();
        assert_ne!(img.info().autoclear_features, 0, "{repair:?}: bit 0 kept");
        let rep = img.check(Repair::None).unwrap();
        assert_eq!((rep.leaks, rep.corruptions), (0, 0), "{repair:?}: {rep:?}");
        img.close().unwrap();
        assert_check_clean(&p);

        // A program without bitmap support clears the bit (patched here): the extension is
        // dropped at the first write, and the bitmap's clusters (directory, table, its data
        // clusters) are leaks to both tools, which a repair frees.
        patch_be64(&p, 88, file_be64(&p, 88) & !1);
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        assert!(
            img.bitmap_warnings()[0].contains("lacking bitmap support"),
            "{:?}",
            img.bitmap_warnings()
        );
        img.write_at(&[7u8; 512], 8192).unwrap();
        img.flush().unwrap();
        assert_eq!(img.info().autoclear_features, 0);
        let leaks = img.check(Repair::None).unwrap().leaks;
        assert!(leaks >= 3, "{repair:?}: {leaks} leaks");
        let q = std::process::Command::new("qemu-img")
            .args(["check", "-U", ps])
            .output()
            .unwrap();
        assert_eq!(q.status.code(), Some(3), "qemu-img check: leaks only");
        let rep = img.check(repair).unwrap();
        assert_eq!(
            (rep.leaks, rep.leaks_fixed),
            (leaks, leaks),
            "{repair:?}: {rep:?}"
        );
        img.close().unwrap();
        assert_check_clean(&p);
    }
}

/// `check` held every snapshot's L1 table in memory at once, each as large as its entry
/// claims (up to 32 MiB, read from past the end of the file as zeros): 64 snapshots made
/// it allocate 2 GiB for a 40 KiB image. Snapshot L1 tables are now walked one at a time.
#[test]
fn check_walks_snapshot_l1_tables_one_at_a_time() {
    // 64 snapshots each claiming a 32 MiB L1 table: holding them all takes 2 GiB; the
    // child may map 1 GiB in all.
    if !in_capped_child("check_walks_snapshot_l1_tables_one_at_a_time", 1 << 20) {
        return;
    }
    const N: usize = 64;
    const L1_ENTRIES: u32 = 4 << 20; // 32 MiB, the largest an L1 table may be
    let mem = tiny_image(16);
    let mut bytes = mem.to_vec();
    let table_at = bytes.len().div_ceil(512) * 512;
    bytes.resize(table_at, 0);
    for i in 0..N {
        let mut e = [0u8; 48]; // 40 fixed bytes, id "i", name "s", padded to 8
        let l1 = (1u64 << 30) + i as u64 * (32 << 20);
        e[0..8].copy_from_slice(&l1.to_be_bytes());
        e[8..12].copy_from_slice(&L1_ENTRIES.to_be_bytes());
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&1u16.to_be_bytes());
        e[40] = b'0' + (i % 10) as u8;
        e[41] = b's';
        bytes.extend_from_slice(&e);
    }
    bytes[H_NB_SNAPSHOTS..H_NB_SNAPSHOTS + 4].copy_from_slice(&(N as u32).to_be_bytes());
    bytes[H_SNAPSHOTS_OFFSET..H_SNAPSHOTS_OFFSET + 8]
        .copy_from_slice(&(table_at as u64).to_be_bytes());
    let len = bytes.len();

    for read_only in [true, false] {
        let mem = Arc::new(MemStorage::from_vec(bytes.clone()));
        let opts = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        // Opening may refuse the image; if it opens, check must stay small.
        let Ok(img) = Image::open_storage(mem.clone() as Arc<dyn Storage>, &opts, None) else {
            continue;
        };
        let rep = img.check(Repair::None);
        assert!(
            rep.is_ok() || read_only,
            "read_only {read_only}: check of a {len}-byte image: {rep:?}"
        );
    }
}

/// fuzz `open_image`, timeout in `check`: L1 entry 0 pointed at an L2 table at 80 GiB in a
/// 22 KiB file. The image opened read/write; the first allocating write updated that table
/// through the cache, whose write-back grew the file to 80 GiB, and `check` then walked 20
/// million clusters. The same holds for a refcount table entry past the end of the file.
/// The L2 table past the end is a problem found at open: read-only opens still work,
/// read/write opens are refused as for other damaged tables. The refcount block past the
/// end is found at use, as QEMU finds it (issue 12): the read/write open succeeds, writes
/// that never need the block work, the file never grows to it, check reports it. (A use
/// of the block fails and marks the image corrupt: diff_iotests_io, iotest 060.)
#[test]
fn tables_past_the_end_of_the_file_never_grow_it() {
    let far = 0x14_0000_0000u64;
    let base = image_with_l2_entry_0(0); // guest cluster 0 unallocated, L2 table present
    let l1 = be64(&base, H_L1_TABLE_OFFSET) as usize;
    let rt = be64(&base, 48) as usize; // refcount_table_offset
    let cases: [(&str, usize, u64, &[&str]); 2] = [
        (
            "L1 entry 0",
            l1,
            far | OFLAG_COPIED,
            &["l1 entry 0", "l2 table", "past the end"],
        ),
        (
            "refcount table entry 1",
            rt + 8,
            far,
            &["refcount table entry 1", "past the end"],
        ),
    ];
    for (name, at, value, keys) in cases {
        let mut bytes = base.clone();
        bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
        let len = bytes.len() as u64;
        let mem = Arc::new(MemStorage::from_vec(bytes.clone()));
        let opened = Image::open_storage(
            mem.clone() as Arc<dyn Storage>,
            &OpenOptions::default(),
            None,
        );
        match (name, opened) {
            ("L1 entry 0", Err(e)) => {
                let msg = e.to_string().to_lowercase();
                for k in keys {
                    assert!(msg.contains(k), "{name}: {e}");
                }
                assert_eq!(mem.to_vec(), bytes, "{name}: a refused open wrote");
            }
            ("refcount table entry 1", Ok(img)) => {
                // Every guest cluster written: the block past the end covers clusters the
                // image never reaches, so nothing uses it; the file stays small, and
                // check reports the entry without walking to it.
                for c in 0..128u64 {
                    img.write_at(&[0x5a; 512], c * 512).unwrap();
                }
                img.flush().unwrap();
                let rep = img.check(Repair::None).unwrap();
                assert!(rep.corruptions > 0, "{name}: {rep:?}");
                drop(img);
                assert!(mem.len().unwrap() < 1 << 20, "{name}: the file grew");
                continue;
            }
            (_, r) => panic!("{name}: unexpected open result {:?}", r.map(|_| ())),
        }

        let img = open(&mem, "read-only=on");
        let mut buf = [0xffu8; 512];
        let _ = img.read_at(&mut buf, 0);
        let rep = img.check(Repair::None).unwrap();
        assert!(rep.corruptions > 0, "{name}: {rep:?}");
        assert_eq!(mem.len().unwrap(), len, "{name}");
    }
}

/// fuzz `open_image`, read-back mismatch: a data L2 entry (without COPIED) pointed at the
/// cluster that L1 entry 1 uses as its L2 table, whose refcount (1) counted only the table.
/// The copy-on-write of that data cluster dropped the refcount to 0, which also forgot the
/// table in the overlap checks; the next allocating write under L1 entry 1 got the table's
/// own cluster as its data cluster, and the table's write-back overwrote the data. Dropping
/// the last reference to an L2 table the active L1 still uses is now refused as corruption.
#[test]
fn freeing_a_data_reference_to_an_active_l2_table_is_refused() {
    let mem = tiny_image(16);
    let img = Image::open_storage(mem.clone(), &OpenOptions::default(), None).unwrap();
    img.write_at(&[0x11; 1024], 0).unwrap(); // L1[0]: guest 0 and 0x200
    img.write_at(&[0x22; 512], 0x8000).unwrap(); // L1[1]: 512-byte clusters, 64 per table
    img.close().unwrap();
    let mut bytes = mem.to_vec();
    let l1 = be64(&bytes, H_L1_TABLE_OFFSET) as usize;
    let t0 = (be64(&bytes, l1) & L2E_OFFSET_MASK) as usize;
    let t1 = be64(&bytes, l1 + 8) & L2E_OFFSET_MASK;
    assert_ne!(t1, 0, "builder: L1 entry 1 has a table");
    // Guest 0x200 now names table 1's cluster as its data, without COPIED.
    bytes[t0 + 8..t0 + 16].copy_from_slice(&t1.to_be_bytes());
    let t1_before = bytes[t1 as usize..t1 as usize + 512].to_vec();

    let mem = Arc::new(MemStorage::from_vec(bytes));
    let img = open(&mem, "");
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    for (off, byte) in [
        (0x200u64, 0x33u8),
        (0x8200, 0x44),
        (0x8400, 0x55),
        (0x8600, 0x66),
    ] {
        let data = vec![byte; 512];
        if img.write_at(&data, off).is_ok() {
            written.push((off, data));
        }
    }
    let _ = img.flush();
    for (off, data) in &written {
        let mut back = vec![0u8; 512];
        img.read_at(&mut back, *off).unwrap();
        assert!(
            &back == data,
            "guest {off:#x} does not read what was written"
        );
    }
    let mut back = vec![0u8; 512];
    img.read_at(&mut back, 0x8000).unwrap();
    assert_eq!(back, vec![0x22; 512], "guest 0x8000 lost its data");
    assert!(
        written.is_empty(),
        "writes were accepted: {:x?}",
        written.iter().map(|w| w.0).collect::<Vec<_>>()
    );
    drop(img);
    assert_eq!(
        mem.to_vec()[t1 as usize..t1 as usize + 512],
        t1_before[..],
        "table 1 was overwritten"
    );
}

/// fuzz `open_image`, "attempt to subtract with overflow" in `check`'s leak repair: with
/// 64-bit refcounts a cluster's refcount may exceed `i64::MAX`, and the repair computed
/// the correction as `want as i64 - have as i64`. Debug builds panicked; release builds
/// wrapped and got a positive delta, so the repair failed with a refcount overflow
/// instead of fixing the leak.
#[test]
fn leak_repair_of_a_refcount_beyond_i64_max() {
    let mem = tiny_image(64);
    let mut bytes = mem.to_vec();
    let rt = be64(&bytes, 48) as usize;
    let rb = (be64(&bytes, rt) & L2E_OFFSET_MASK) as usize;
    assert_eq!(
        be64(&bytes, rb),
        1,
        "builder: the header cluster's refcount"
    );
    for have in [u64::MAX - 15, 1 << 63, u64::MAX] {
        bytes[rb..rb + 8].copy_from_slice(&have.to_be_bytes());
        let mem = Arc::new(MemStorage::from_vec(bytes.clone()));
        let img = open(&mem, "");
        for repair in [Repair::None, Repair::Leaks] {
            let rep = img
                .check(repair)
                .unwrap_or_else(|e| panic!("{have:#x} {repair:?}: {e}"));
            assert_eq!(rep.leaks, 1, "{have:#x} {repair:?}: {rep:?}");
            assert_eq!(rep.corruptions, 0, "{have:#x} {repair:?}: {rep:?}");
        }
        let rep = img.check(Repair::None).unwrap();
        assert_eq!((rep.leaks, rep.corruptions), (0, 0), "{have:#x}: {rep:?}");
        img.close().unwrap();
        assert_eq!(be64(&mem.to_vec(), rb), 1, "{have:#x}");
    }
}
