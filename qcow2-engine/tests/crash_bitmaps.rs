//! Persistent dirty bitmaps across a crash: the write-intent model (a chunk of bitmap bits
//! is made durable as all ones before any data it covers is written; idle chunks are
//! cleared lazily at flushes; close stores the exact bits) must leave, at every crash
//! point, every bitmap consistent (never in use, as QEMU sees it too), each enabled one
//! marking at least every range whose new data may have reached the disk and at most the
//! chunks requests touched, each disabled one unchanged (`support/crash/bitmaps.rs`).
//!
//! Workloads (`support::crash::Workload::random_step`: unaligned and whole-cluster writes,
//! FUA writes, write-zeroes with and without may-unmap, discards, flushes, rewrites of
//! released ranges) run on images whose bitmaps are made first: 512-byte clusters with a
//! 512-byte-granularity bitmap (one chunk per data cluster: every first touch allocates
//! one), a coarse 64 KiB one and a disabled one; 16 KiB clusters with extended L2 and a
//! `discard=ignore` policy (discards mark nothing); a bitmap made by `qemu-img bitmap`;
//! a growing image. A short targeted workload (lazy clearing, then the exact store at
//! close) is crashed at every point under many policies. Then a writer process is killed
//! with SIGKILL mid-workload, several times: QEMU must find the bitmap consistent and
//! marking every changed cluster.

mod support;

use std::sync::Arc;

use host_io::MemStorage;
use qcow2_engine::{create_on, CreateOptions, Image, OpenOptions};
use support::bitmaps::*;
use support::crash::*;
use support::*;

const QEMU_EVERY: u64 = 40;

fn sampling(salt: u64, per_point: u64) -> Sampling {
    Sampling {
        qemu_every: QEMU_EVERY,
        qemu_all: false,
        salt,
        per_point,
    }
}

/// An image made by the engine with `bitmaps` (name, granularity, enabled) added, as bytes.
fn image_with_bitmaps(create: &str, size: u64, bitmaps: &[(&str, u64, bool)]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let mut o = CreateOptions::parse(create).expect("create options");
    o.size = Some(size);
    create_on(mem.clone(), &o, None).expect("create");
    let img = Image::open_storage(mem.clone(), &OpenOptions::default(), None).expect("open");
    for &(name, g, on) in bitmaps {
        img.bitmap_add(name, Some(g), on).expect("bitmap_add");
    }
    img.close().expect("close");
    mem.to_vec()
}

fn workload(
    name: &str,
    bytes: Vec<u8>,
    size: u64,
    opts: &str,
    bitmaps: &[(&str, bool)],
) -> Workload {
    let mut w = Workload::from_bytes(name, bytes, opts, vec![0; size as usize], None);
    w.bitmaps = bitmaps.iter().map(|(n, e)| (n.to_string(), *e)).collect();
    w
}

#[test]
fn crash_bitmaps_fine_granularity_every_allocation() {
    let size = 8 << 20;
    let bytes = image_with_bitmaps(
        "cluster_size=512",
        size,
        &[
            ("fine", 512, true),
            ("coarse", 65536, true),
            ("off", 4096, false),
        ],
    );
    let mut w = workload(
        "512-byte clusters, fine/coarse/off",
        bytes,
        size,
        "provision=metadata",
        &[("fine", true), ("coarse", true), ("off", false)],
    );
    w.random_steps(&mut Rng(17), 260);
    w.verify_all();
    w.close();
    sweep(&w, sampling(1, 1)).assert_ok("fine granularity", 900);
}

#[test]
fn crash_bitmaps_extended_l2_discard_ignored() {
    let size = 4 << 20;
    let bytes = image_with_bitmaps(
        "cluster_size=16k,extended_l2=on",
        size,
        &[("b", 512, true), ("b64k", 65536, true)],
    );
    for (i, opts) in ["discard=ignore", "provision=thin"].iter().enumerate() {
        let mut w = workload(
            &format!("16k extended L2 {opts}"),
            bytes.clone(),
            size,
            opts,
            &[("b", true), ("b64k", true)],
        );
        w.random_steps(&mut Rng(40 + i as u64), 220);
        w.verify_all();
        w.close();
        sweep(&w, sampling(2 + i as u64, 1)).assert_ok(opts, 340);
    }
}

/// A bitmap QEMU made, on an image QEMU wrote to (its data clusters exist), and a resize
/// that keeps the bitmap table's size (one data cluster covers the new size too).
#[test]
fn crash_qemu_made_bitmap_and_resize() {
    let d = TempDir::new("crashbm-qemu");
    let p = d.path("q.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        ps,
        "2M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "4096", ps, "q"]);
    qemu_io(&["-f", "qcow2"], &p, &["write -P 0x33 64k 200k".into()]);
    qemu_img(&["bitmap", "--clear", ps, "q"]);
    let mut initial = vec![0u8; 3 << 20];
    initial[64 << 10..264 << 10].fill(0x33);
    let mut w = Workload::from_bytes(
        "qemu-made bitmap, resize",
        std::fs::read(&p).unwrap(),
        "provision=metadata",
        initial,
        None,
    );
    w.bitmaps = vec![("q".into(), true)];
    let mut rng = Rng(5);
    w.random_steps(&mut rng, 170);
    w.resize(3 << 20);
    w.random_steps(&mut rng, 170);
    w.verify_all();
    w.close();
    sweep(&w, sampling(4, 1)).assert_ok("qemu-made bitmap", 400);
}

/// Lazy clearing (a chunk idle for two flush intervals is rewritten with its exact bits) and
/// the exact store at close, crashed at every point under 12 policies each.
#[test]
fn crash_bitmaps_lazy_clear_and_close_every_point() {
    let size = 2 << 20;
    let bytes = image_with_bitmaps("cluster_size=512", size, &[("b", 512, true)]);
    let mut w = workload("lazy clear", bytes, size, "provision=thin", &[("b", true)]);
    w.write(1000, 3000, false);
    w.write(1 << 20, 700, false);
    w.flush();
    w.write(1000, 100, false); // the chunk (2 MiB of guest bytes) stays armed
    w.flush();
    w.discard(1 << 20, 4096);
    w.zero(5000, 10000, true);
    w.flush();
    w.flush(); // one interval idle
    w.flush(); // two: the chunk is stored with its exact bits and disarmed
    w.write(1 << 20, 512, false); // armed again
    w.close(); // exact store
    sweep(&w, sampling(5, 12)).assert_ok("lazy clear and close", 300);
}

/// A writer killed with SIGKILL: the bitmap is consistent for QEMU (not in use) and marks
/// every cluster whose content changed.
#[test]
fn kill9_mid_workload() {
    if let Some(path) = std::env::var_os("QCOWPROV_BITMAP_WRITER") {
        writer(std::path::Path::new(&path));
        return;
    }
    let d = TempDir::new("crashbm-kill");
    for round in 0..4u64 {
        let p = d.path(&format!("k{round}.qcow2"));
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", ps, "64M"]);
        qemu_img(&["bitmap", "--add", "-g", "65536", ps, "b"]);
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "kill9_mid_workload",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QCOWPROV_BITMAP_WRITER", &p)
            .env("QCOWPROV_WRITER_SEED", round.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + 120 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let bitmaps = qemu_bitmaps(&p);
        assert_eq!(
            bitmaps,
            vec![("b".to_string(), 65536, vec!["auto".to_string()])]
        );
        assert_no_corruption(&p);
        let map = qemu_dirty_map(&p, "b");
        let img = Image::open(&p, &OpenOptions::parse("read-only=on").unwrap()).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut changed = 0;
        for c in 0..1024u64 {
            img.read_at(&mut buf, c << 16).unwrap();
            if buf.iter().any(|&b| b != 0) {
                changed += 1;
                assert!(
                    map.iter()
                        .any(|&(o, l, dirty)| dirty && o <= c << 16 && c << 16 < o + l),
                    "round {round}: cluster {c} changed but is clean in {map:x?}"
                );
            }
        }
        eprintln!(
            "round {round}: {changed} changed clusters, {} dirty bytes",
            dirty_bytes(&map)
        );
    }
}

/// The child of `kill9_mid_workload`: random writes, discards and flushes until killed.
fn writer(path: &std::path::Path) {
    let seed: u64 = std::env::var("QCOWPROV_WRITER_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let img = Image::open(path, &OpenOptions::parse("discard=unmap").unwrap()).unwrap();
    let mut rng = Rng(seed * 7 + 1);
    let size = img.virtual_size();
    loop {
        let off = rng.below(size / 4096 - 16) * 4096 + rng.below(3000);
        match rng.below(10) {
            0 => img.flush().unwrap(),
            1 => img.discard(off / 65536 * 65536, 65536).unwrap(),
            _ => img
                .write_at(
                    &vec![(1 + rng.below(250)) as u8; 1 + rng.below(20000) as usize],
                    off,
                )
                .unwrap(),
        }
    }
}
