//! Check and repair against qemu-img check: the same verdict and counts on clean images,
//! leaked clusters and refcount corruption; repair leaves qemu-img check clean with the
//! guest data intact; a dirty image (lazy refcounts, crash) is repaired on open.

mod support;

use std::sync::Arc;

use host_io::{CrashPolicy, CrashStorage, MemStorage, Storage};
use qcow2_engine::{create_on, CheckReport, CreateOptions, Image, OpenOptions, Repair};
use support::*;

fn json_field(json: &str, key: &str) -> u64 {
    let k = format!("\"{key}\": ");
    json.find(&k)
        .map(|i| {
            json[i + k.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap()
        })
        .unwrap_or(0)
}

fn ours(path: &std::path::Path, repair: Repair) -> CheckReport {
    let ro = repair == Repair::None;
    let img = Image::open(
        path,
        &OpenOptions {
            read_only: ro,
            ..Default::default()
        },
    )
    .unwrap();
    let r = img.check(repair).unwrap();
    img.close().unwrap();
    r
}

fn assert_same_counts(path: &std::path::Path, what: &str) -> CheckReport {
    let r = ours(path, Repair::None);
    let (code, json, _) = qemu_img_status(&["check", "--output=json", path.to_str().unwrap()]);
    assert_eq!(
        r.exit_code(),
        code,
        "{what}: exit code; ours {r:#?} qemu {json}"
    );
    for (k, v) in [
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("total-clusters", r.total_clusters),
        ("image-end-offset", r.image_end_offset),
    ] {
        assert_eq!(
            json_field(&json, k),
            v,
            "{what}: {k}; ours {r:#?}\nqemu {json}"
        );
    }
    r
}

fn populated(dir: &TempDir, name: &str, opts: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = p.to_str().unwrap().to_string();
    args.extend([ps.as_str(), "8M"]);
    qemu_img(&args);
    qemu_io(
        &[],
        &p,
        &[
            "write -P 1 0 256k".into(),
            "write -P 2 1M 64k".into(),
            "write -c -P 3 2M 64k".into(),
            "write -P 4 3M 100k".into(),
            "write -P 5 6005000 3000".into(),
        ],
    );
    p
}

fn l2_entry_offset(path: &std::path::Path, guest_cluster: u64) -> u64 {
    let b = std::fs::read(path).unwrap();
    let be = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (l2 + 8 * guest_cluster as usize) as u64
}

#[test]
fn clean_images_agree_with_qemu_img() {
    let dir = TempDir::new("chk-clean");
    for opts in [
        "",
        "cluster_size=4k,refcount_bits=8",
        "extended_l2=on",
        "compat=0.10",
    ] {
        let p = populated(&dir, "c.qcow2", opts);
        let r = assert_same_counts(&p, opts);
        assert_eq!(r.exit_code(), 0);
        qemu_img(&["snapshot", "-c", "s", p.to_str().unwrap()]);
        qemu_io(&[], &p, &["write -P 9 0 64k".into()]);
        assert_same_counts(&p, &format!("{opts} + snapshot"));
    }
}

#[test]
fn leak_found_counted_and_repaired() {
    let dir = TempDir::new("chk-leak");
    let p = populated(&dir, "l.qcow2", "");
    // Drop the L2 reference of guest cluster 16 (1M): its data cluster leaks.
    let at = l2_entry_offset(&p, 16);
    let mut b = std::fs::read(&p).unwrap();
    b[at as usize..at as usize + 8].fill(0);
    std::fs::write(&p, &b).unwrap();
    let r = assert_same_counts(&p, "leak");
    assert_eq!((r.leaks, r.exit_code()), (1, 3));
    let fixed = ours(&p, Repair::Leaks);
    assert_eq!(fixed.leaks_fixed, 1);
    assert_check_clean(&p);
    qemu_io(
        &[],
        &p,
        &[
            "read -P 1 0 256k".into(),
            "read -P 4 3M 100k".into(),
            "read -P 0 1M 64k".into(),
        ],
    );
}

#[test]
fn refcount_corruption_found_and_rebuilt() {
    let dir = TempDir::new("chk-corrupt");
    let p = populated(&dir, "k.qcow2", "");
    // Zero the refcount of the data cluster behind guest cluster 0.
    let b = std::fs::read(&p).unwrap();
    let be = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let data = be(l2_entry_offset(&p, 0) as usize) & 0x00ff_ffff_ffff_fe00;
    let rt = be(48) as usize;
    let rb = be(rt) as usize;
    let mut b2 = b.clone();
    let i = rb + 2 * (data / 65536) as usize;
    b2[i..i + 2].fill(0);
    std::fs::write(&p, &b2).unwrap();
    let r = assert_same_counts(&p, "corrupt");
    assert_eq!(r.exit_code(), 2);
    assert!(
        r.messages
            .iter()
            .any(|m| m.contains("refcount=0 reference=1")),
        "{:?}",
        r.messages
    );
    let fixed = ours(&p, Repair::All);
    assert!(
        fixed.messages.iter().any(|m| m.contains("Rebuilding")),
        "{:?}",
        fixed.messages
    );
    assert_check_clean(&p);
    qemu_io(
        &[],
        &p,
        &[
            "read -P 1 0 256k".into(),
            "read -P 2 1M 64k".into(),
            "read -P 3 2M 64k".into(),
            "read -P 4 3M 100k".into(),
        ],
    );
    // The repaired image keeps working.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[6u8; 200_000], 4 << 20).unwrap();
    img.close().unwrap();
    assert_check_clean(&p);
}

#[test]
fn dirty_image_from_a_lazy_refcounts_crash_is_repaired_on_open() {
    let storage = Arc::new(CrashStorage::new(Vec::new()));
    let o = CreateOptions {
        size: Some(4 << 20),
        lazy_refcounts: true,
        cluster_size: 4096,
        ..Default::default()
    };
    create_on(storage.clone(), &o, None).unwrap();
    let img = Image::open_storage(storage.clone(), &OpenOptions::default(), None).unwrap();
    let mut rng = Rng(7);
    for i in 0..40u8 {
        let len = 1 + rng.below(30000);
        let off = rng.below((4 << 20) - len);
        img.write_at(&vec![i; len as usize], off).unwrap();
        if i == 20 {
            img.flush().unwrap();
        }
    }
    let total = storage.op_count();
    std::mem::forget(img); // power failure: no clean close
    let dir = TempDir::new("chk-dirty");
    let path = dir.path("d.qcow2");
    let mut dirty_seen = 0;
    for n in (total / 3..=total).step_by(7) {
        let bytes = storage
            .crash_bytes(n, CrashPolicy::RandomSubset { seed: n })
            .unwrap();
        let mem = Arc::new(MemStorage::from_vec(bytes));
        let dirty = mem.to_vec()[72..80].iter().any(|&b| b & 1 != 0);
        dirty_seen += dirty as u32;
        let img = Image::open_storage(
            mem.clone() as Arc<dyn Storage>,
            &OpenOptions::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("op {n}: {e}"));
        img.close().unwrap();
        let out = mem.to_vec();
        assert_eq!(out[79] & 1, 0, "op {n}: dirty bit still set after repair");
        std::fs::write(&path, out).unwrap();
        assert_check_clean(&path);
    }
    assert!(dirty_seen > 0, "no crash image had the dirty bit set");
}
