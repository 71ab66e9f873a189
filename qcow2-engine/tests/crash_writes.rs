//! Crash simulation: run a workload on the recording backend, then rebuild the disk as it
//! would be after a power failure before every recorded operation (unflushed writes
//! dropped, kept, a random subset kept, or the last one torn). Every such image must pass
//! `qemu-img check` without corruptions (leaks allowed), open read-write, and return every
//! byte that was written before the last completed flush.

mod support;

use std::sync::Arc;

use host_io::{CrashPolicy, CrashStorage, Storage};
use qcow2_engine::{create_on, CreateOptions, Image, OpenOptions};
use support::*;

/// A workload step: a write (offset, length, pattern) or a flush.
#[derive(Clone, Copy)]
enum Step {
    Write(u64, u64, u8),
    Flush,
}

struct Recorded {
    storage: Arc<CrashStorage>,
    /// (op count after the step, step)
    steps: Vec<(u64, Step)>,
    size: u64,
    /// Image bytes right after creation (flushed).
    created_ops: u64,
}

fn record(opts: &str, size: u64, seed: u64, n: usize) -> Recorded {
    let storage = Arc::new(CrashStorage::new(Vec::new()));
    let mut o = CreateOptions::parse(opts).unwrap();
    o.size = Some(size);
    create_on(storage.clone(), &o, None).expect("create");
    let created_ops = storage.op_count();
    let img = Image::open_storage(storage.clone(), &OpenOptions::default(), None).expect("open");
    let cs = img.cluster_size();
    let mut rng = Rng(seed);
    let mut steps = Vec::new();
    for _ in 0..n {
        let step = if rng.below(6) == 0 {
            img.flush().expect("flush");
            Step::Flush
        } else {
            let len = if rng.below(2) == 0 {
                cs * (1 + rng.below(2))
            } else {
                1 + rng.below(cs + 777)
            };
            let off = rng.below(size - len);
            let p = (1 + rng.below(254)) as u8;
            img.write_at(&vec![p; len as usize], off).expect("write");
            Step::Write(off, len, p)
        };
        steps.push((storage.op_count(), step));
    }
    img.close().expect("close");
    Recorded {
        storage,
        steps,
        size,
        created_ops,
    }
}

/// For a crash before op `n`: the content guaranteed durable, and which bytes may hold
/// either old or new data (written after the last completed flush).
fn expectation(r: &Recorded, n: u64) -> (Vec<u8>, Vec<bool>) {
    let mut durable = vec![0u8; r.size as usize];
    let mut uncertain = vec![false; r.size as usize];
    let mut pending: Vec<(u64, u64, u8)> = Vec::new();
    for &(after, step) in &r.steps {
        let done = after <= n;
        match step {
            Step::Flush if done => {
                for (o, l, p) in pending.drain(..) {
                    durable[o as usize..(o + l) as usize].fill(p);
                }
            }
            Step::Flush => {}
            Step::Write(o, l, p) => pending.push((o, l, p)),
        }
        if !done {
            // Steps not finished before the crash may have partly reached the disk.
        }
    }
    for (o, l, _) in pending {
        uncertain[o as usize..(o + l) as usize].fill(true);
    }
    (durable, uncertain)
}

fn verify_point(r: &Recorded, n: u64, policy: CrashPolicy, dir: &TempDir) {
    let bytes = r.storage.crash_bytes(n, policy).expect("crash image");
    let path = dir.path("crash.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let code = assert_no_corruption(&path);
    let _ = code;
    let mem = Arc::new(host_io::MemStorage::from_vec(bytes));
    let img = Image::open_storage(
        mem.clone() as Arc<dyn Storage>,
        &OpenOptions::default(),
        None,
    )
    .unwrap_or_else(|e| panic!("crash at op {n} ({policy:?}): open failed: {e}"));
    let (durable, uncertain) = expectation(r, n);
    let mut buf = vec![0u8; r.size as usize];
    img.read_at(&mut buf, 0).expect("read back");
    for i in 0..buf.len() {
        if !uncertain[i] && buf[i] != durable[i] {
            panic!(
                "crash at op {n} ({policy:?}): byte {i:#x} reads {:#x}, flushed data was {:#x}",
                buf[i], durable[i]
            );
        }
    }
    // The recovered image stays writable and consistent.
    img.write_at(&[0xee; 5000], r.size / 3)
        .expect("write after crash");
    img.close().expect("close after crash");
    std::fs::write(&path, mem.to_vec()).unwrap();
    assert_no_corruption(&path);
}

fn sweep(opts: &str, size: u64, seed: u64, steps: usize) -> u64 {
    let r = record(opts, size, seed, steps);
    let dir = TempDir::new("crash");
    let total = r.storage.op_count();
    let mut points = 0;
    for n in r.created_ops..=total {
        let policy = match n % 4 {
            0 => CrashPolicy::DropUnflushed,
            1 => CrashPolicy::KeepUnflushed,
            2 => CrashPolicy::RandomSubset { seed: n * 7 + seed },
            _ => CrashPolicy::TornLastWrite {
                seed: n * 13 + seed,
            },
        };
        verify_point(&r, n, policy, &dir);
        points += 1;
    }
    points
}

#[test]
fn crash_at_every_op_default_geometry() {
    let n = sweep("", 8 << 20, 11, 40);
    eprintln!("crash points checked: {n}");
    assert!(n > 50);
}

#[test]
fn crash_at_every_op_small_clusters_refcount_table_growth() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, the table
    // grows repeatedly during the workload.
    let n = sweep("cluster_size=512,refcount_bits=64", 1 << 20, 5, 40);
    eprintln!("crash points checked: {n}");
    assert!(n > 50);
}

#[test]
fn crash_at_every_op_extended_l2() {
    let n = sweep("extended_l2=on,cluster_size=16k", 4 << 20, 3, 40);
    eprintln!("crash points checked: {n}");
}
