//! Crash consistency of discard, write-zeroes and allocation under every provisioning
//! mode (`provision=off|full|metadata|thin|reuse`) and QEMU's `discard=unmap` with and
//! without `discard-no-unref=on`.
//!
//! Each workload is a seeded mix (see `support::crash::Workload::random_step`) of unaligned
//! and whole-cluster writes, FUA writes, write-zeroes with and without may-unmap, discards
//! and flushes, with whole-cluster rewrites aimed at ranges just released (so anchored and
//! freed clusters get reused). The image kinds:
//!
//! * plain images made by the engine (4 KiB clusters, so L2 tables and refcount blocks are
//!   shared by many operations), also with the policy changing mid-workload, and with
//!   metadata caches too small for the image (write-back by eviction, not only at flush);
//! * images over a backing file (raw, and qcow2 with holes made by qemu-img), where every
//!   partial write copies backing data up and released ranges must read zero, not the
//!   backing data;
//! * images with an internal snapshot taken by `qemu-img snapshot -c`, so writes copy
//!   shared clusters and releases only drop references; the snapshot's content is
//!   verified with `qemu-img convert -l` at every qemu-img-sampled point.
//!
//! Every operation point of every workload is crashed under one of the four crash policies
//! (rotating) and checked as `crash_support` describes; the counts are asserted so a
//! workload that silently shrinks fails. A short targeted workload (a zeroed but still
//! allocated cluster rewritten in whole) is crashed at every point under every policy and
//! 36 more random subsets and torn writes. The last test holds the engine's check to
//! qemu-img's leak count on a file with a refcount past its end, as the sweeps compare.

mod support;

use support::crash::*;
use support::*;

/// qemu-img check on every point whose global index is a multiple of this.
const QEMU_EVERY: u64 = 25;

fn sampling(salt: u64, qemu_all: bool) -> Sampling {
    Sampling {
        qemu_every: QEMU_EVERY,
        qemu_all,
        salt,
        per_point: 1,
    }
}

#[test]
fn crash_plain_images_every_mode() {
    let mut total = Stats::default();
    for (i, opts) in POLICIES.iter().enumerate() {
        let mut w = Workload::create(
            &format!("plain 4k {opts}"),
            "cluster_size=4k",
            2 << 20,
            2 << 20,
            opts,
        );
        w.random_steps(&mut Rng(100 + i as u64), 400);
        w.verify_all();
        w.close();
        // Every point of the thin workload also goes through qemu-img.
        total.add(&sweep(&w, sampling(i as u64, *opts == "provision=thin")));
    }
    total.assert_ok("plain images", 3500);
}

/// Metadata caches of two L2 tables and four refcount blocks on 1 KiB clusters with 64-bit
/// refcounts (an L2 table maps 128 KiB, a refcount block covers 128 KiB of file): tables
/// are evicted and written back in the middle of requests, not only at flushes, so the
/// write-back ordering between L2 tables, refcount blocks and data is what is crashed.
#[test]
fn crash_with_small_metadata_caches_every_mode() {
    let mut total = Stats::default();
    for (i, opts) in POLICIES.iter().enumerate() {
        let opts = format!("{opts},l2-cache-size=2k,refcount-cache-size=4k");
        let mut w = Workload::create(
            &format!("small caches 1k/rc64 {opts}"),
            "cluster_size=1k,refcount_bits=64",
            2 << 20,
            2 << 20,
            &opts,
        );
        w.random_steps(&mut Rng(150 + i as u64), 200);
        w.verify_all();
        w.close();
        total.add(&sweep(&w, sampling(i as u64 + 5, false)));
    }
    total.assert_ok("small caches", 2500);
}

/// The discard policy changes between steps (like QEMU's reopen), over all seven.
#[test]
fn crash_policy_changes_mid_workload() {
    let mut w = Workload::create(
        "policy hopping 16k",
        "cluster_size=16k",
        2 << 20,
        2 << 20,
        "provision=thin",
    );
    let mut rng = Rng(77);
    for round in 0..3 {
        for (i, opts) in POLICIES.iter().enumerate() {
            w.set_options(opts);
            w.random_steps(&mut rng, 15 + (round * 7 + i) % 10);
        }
    }
    w.verify_all();
    w.close();
    sweep(&w, sampling(3, false)).assert_ok("policy changes", 450);
}

/// Guest content of a backing file: position-dependent bytes with zero holes.
fn backing_content(len: usize) -> Vec<u8> {
    (0..len)
        .map(|p| {
            if (p >> 16) % 5 == 3 {
                0
            } else {
                (((p >> 9) as u32 * 13 + 0x40) % 251) as u8 | 0x80
            }
        })
        .collect()
}

/// Over a raw backing file (64 KiB clusters) and over a qcow2 backing file with holes
/// (16 KiB clusters with subclusters); the overlay is larger than its backing file.
#[test]
fn crash_over_backing_files_every_mode() {
    let size = 4u64 << 20;
    let base_len = (3 << 20) + 12345;
    let mut total = Stats::default();
    for (i, opts) in POLICIES.iter().enumerate() {
        for qcow2_base in [false, true] {
            let dir = TempDir::new("crashback");
            let content = backing_content(base_len);
            std::fs::write(dir.path("base.raw"), &content).unwrap();
            let create = if qcow2_base {
                qemu_img(&[
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=16k",
                    dir.path("base.raw").to_str().unwrap(),
                    dir.path("base.qcow2").to_str().unwrap(),
                ]);
                "cluster_size=16k,extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2"
            } else {
                "backing_file=base.raw,backing_fmt=raw"
            };
            let mut initial = content;
            initial.resize(size as usize, 0);
            let name = format!(
                "backing {} {opts}",
                if qcow2_base {
                    "qcow2/16k-ext"
                } else {
                    "raw/64k"
                }
            );
            let mut w = Workload::over_backing(&name, create, size, opts, dir, initial);
            w.random_steps(&mut Rng(200 + i as u64 * 2 + u64::from(qcow2_base)), 170);
            w.verify_all();
            w.close();
            total.add(&sweep(&w, sampling(i as u64 + 1, false)));
        }
    }
    total.assert_ok("backing files", 2500);
}

/// qemu-img makes an image with data, takes internal snapshot `s1`, and writes more; the
/// engine then runs the workload, copying shared clusters and releasing references.
fn snapshot_image(dir: &TempDir, cs: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let p = dir.path("snap.qcow2");
    let ps = p.to_str().unwrap();
    let o = format!("cluster_size={cs}");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, ps, "2M"]);
    qemu_io(
        &[],
        &p,
        &[
            "write -P 0x11 0 640k".into(),
            "write -P 0x22 1M 320k".into(),
            "write -z 1536k 64k".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", ps]);
    qemu_io(
        &[],
        &p,
        &["write -P 0x33 256k 128k".into(), "discard 1M 64k".into()],
    );
    let raw = |extra: &[&str]| {
        let out = dir.path("out.raw");
        let mut a = vec!["convert", "-O", "raw"];
        a.extend_from_slice(extra);
        a.extend([ps, out.to_str().unwrap()]);
        qemu_img(&a);
        std::fs::read(&out).unwrap()
    };
    let active = raw(&[]);
    let snap = raw(&["-l", "snapshot.name=s1"]);
    (std::fs::read(&p).unwrap(), active, snap)
}

#[test]
fn crash_with_internal_snapshot_every_mode() {
    let mut total = Stats::default();
    for (i, opts) in POLICIES.iter().enumerate() {
        let cs = if i % 2 == 0 { 4096 } else { 65536 };
        let dir = TempDir::new("crashsnapsrc");
        let (bytes, active, snap) = snapshot_image(&dir, cs);
        let name = format!("snapshot {}k {opts}", cs >> 10);
        let mut w = Workload::from_bytes(&name, bytes, opts, active, Some(("s1".into(), snap)));
        w.random_steps(&mut Rng(300 + i as u64), 250);
        w.verify_all();
        w.close();
        total.add(&sweep(&w, sampling(i as u64 + 2, false)));
    }
    total.assert_ok("internal snapshots", 2000);
}

/// A cluster zeroed without may-unmap stays allocated (zero flag, host data untouched
/// where the policy's host layer is `full`); a later whole-cluster write goes into the
/// same host cluster. Crashing while that write is unflushed must show the zeros or the
/// new data, never the data from before the write-zeroes. Every point is tried under every
/// policy with several seeds.
#[test]
fn crash_rewrite_of_zeroed_allocated_cluster() {
    let mut total = Stats::default();
    for (i, opts) in POLICIES.iter().enumerate() {
        for cs in [4096u64, 65536] {
            let mut w = Workload::create(
                &format!("rewrite-zeroed {}k {opts}", cs >> 10),
                &format!("cluster_size={cs}"),
                8 * cs,
                8 * cs,
                opts,
            );
            w.write(0, 4 * cs, false);
            w.flush();
            w.zero(cs, 2 * cs, false);
            w.flush();
            w.write(cs, cs, false);
            w.write(2 * cs, cs, false);
            w.flush();
            w.zero(0, cs, true);
            w.discard(3 * cs, cs);
            w.flush();
            w.write(0, cs, false);
            w.write(3 * cs, cs, false);
            w.flush();
            w.close();
            let mut s = sampling(i as u64, false);
            s.per_point = 40;
            total.add(&sweep(&w, s));
        }
    }
    total.assert_ok("rewrites of zeroed clusters", 1000);
}

/// The freed-cluster quarantine: discarded clusters wait for one barrier before their
/// refcounts drop and they are reused. With a slack of two clusters on a full image, the
/// allocations that follow discards release the quarantine in the middle of requests (not
/// only at flushes), and the released clusters are reused at once. Every point is crashed
/// under every policy: no crash may leave an entry pointing at a cluster that already holds
/// other data, and every flushed byte must survive.
#[test]
fn crash_quarantine_releases_mid_request() {
    let mut total = Stats::default();
    for (i, opts) in ["provision=thin", "discard=unmap", "provision=reuse"]
        .iter()
        .enumerate()
    {
        let cs = 4096u64;
        let opts = format!("{opts},quarantine-slack=8k");
        let mut w = Workload::create(
            &format!("quarantine {opts}"),
            "cluster_size=4k",
            64 * cs,
            64 * cs,
            &opts,
        );
        w.write(0, 64 * cs, false);
        w.flush();
        let releases_before = w.img().stats().unwrap().quarantine_releases;
        for round in 0..6u64 {
            let a = (round * 11) % 56;
            w.discard(a * cs, 4 * cs);
            // Whole-cluster rewrites elsewhere (copy-free) and a partial write into the
            // discarded range (allocates and fills the rest with zeros).
            let b = (a + 20) % 56;
            w.discard(b * cs, 2 * cs);
            w.write(b * cs, 2 * cs, false);
            w.write(a * cs + 512, 1024, false);
            w.write((a + 2) * cs, cs, round % 2 == 0);
        }
        let mid_request = w.img().stats().unwrap().quarantine_releases - releases_before;
        assert!(
            mid_request >= 3,
            "{opts}: the quarantine was released {mid_request} times outside flushes; the \
             workload no longer exercises releases"
        );
        w.flush();
        w.verify_all();
        w.close();
        let mut s = sampling(i as u64 + 11, true);
        s.per_point = 4;
        total.add(&sweep(&w, s));
    }
    total.assert_ok("quarantine releases", 300);
}

/// The engine's check claims qemu-img's counters, which the sweeps compare at sampled
/// points. A refcount on the first cluster past the end of the file is common in crash
/// images (the refcount block reached the disk, the data write that would have extended
/// the file did not); qemu-img compares only clusters inside the file and counts no leak
/// there, so the engine must not either.
#[test]
fn engine_check_leak_count_matches_qemu_img_past_eof() {
    let dir = TempDir::new("leakeof");
    let p = dir.path("l.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        ps,
        "1M",
    ]);
    qemu_io(&[], &p, &["write -P 0x5a 0 64k".into()]);
    let len = std::fs::metadata(&p).unwrap().len();
    let past = len.div_ceil(4096);
    // 16-bit refcounts: the first refcount block holds cluster `past`.
    let reftable = file_be64(&p, 48);
    let block = file_be64(&p, reftable);
    patch_file(&p, block + past * 2, &1u16.to_be_bytes());
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len,
        "patch grew the file"
    );
    let json = qemu_img_status(&["check", "--output=json", ps]).1;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let qemu_leaks = v.get("leaks").and_then(|x| x.as_u64()).unwrap_or(0);
    let img = qcow2_engine::Image::open(
        &p,
        &qcow2_engine::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let r = img.check(qcow2_engine::Repair::None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks),
        (0, qemu_leaks),
        "engine check counts differ from qemu-img check on the same file \
         (file length {len:#x}, refcount 1 on cluster {past}): {:?} vs {json}",
        r.messages
    );
}
