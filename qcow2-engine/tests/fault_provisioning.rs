//! Host errors in the middle of allocation, discard, write-zeroes and refcount-table
//! growth, under every provisioning mode and QEMU's `discard=unmap` (with and without
//! `discard-no-unref=on`).
//!
//! A base image with data (flushed) is reopened on a [`FaultyStorage`] and a seeded
//! workload runs over it: allocating and overwriting writes, discards and write-zeroes
//! (with and without may-unmap) that free or anchor clusters and issue host discards and
//! zeroing, and flushes. A dry run counts the host operations of each kind; then one run
//! per fault injects, in turn, EIO and ENOSPC into every host write (`FailNth`), EIO into
//! every flush, host discard, host zeroing and `set_len`, two short writes at every write
//! position (`ShortWrite`: a prefix cut at a sector boundary, and the whole write landing
//! with EIO reported anyway), and a full disk at a series of limits (`NoSpaceBeyond`).
//! Host discards and zeroing are advisory: a fault there may pass unreported. Each run
//! requires:
//!
//! * a call that fails reports the injected errno (`Error::errno()` 5 or 28), and a fault
//!   that fired on a write, flush or `set_len` is reported by some call (never swallowed);
//! * the range of the failing call reads either its old or its new content, and nothing
//!   else changes: every byte acknowledged before or after the fault reads back;
//! * the file as it is right after the first fault (what a crash then would leave) has no
//!   corruption, per the engine's check and, sampled, `qemu-img check`;
//! * once the fault is lifted, more I/O works, flush and close succeed, and the closed
//!   image has no corruption and holds exactly the model.

mod support;

use std::sync::Arc;

use host_io::{Fault, FaultyStorage, MemStorage, OpKind};
use qcow2_engine::{create_on, CreateOptions, Image, OpenOptions, Repair};
use support::faults::*;
use support::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

/// A base image (bytes, guest content) and the workload to run over it.
struct Setup {
    name: String,
    opts: &'static str,
    base: Vec<u8>,
    model: Vec<u8>,
    cs: u64,
    ops: Vec<Op>,
}

/// Create an image on memory, write `prefill` bytes of data at the start (in 64 KiB
/// writes), discard and zero some of it, flush and close.
fn setup(name: &str, create: &str, opts: &'static str, size: u64, prefill: u64) -> Setup {
    let mem = Arc::new(MemStorage::new());
    let mut o = CreateOptions::parse(create).unwrap();
    o.size = Some(size);
    create_on(mem.clone(), &o, None).unwrap();
    let (cs, model) = support::faults::prefill(&mem, opts, size, prefill);
    Setup {
        name: format!("{name} {opts}"),
        opts,
        base: mem.to_vec(),
        model,
        cs,
        ops: Vec::new(),
    }
}

/// A seeded workload over `[0, size)`, its allocating writes aimed at `[grow_from, size)`.
fn workload(seed: u64, size: u64, cs: u64, grow_from: u64, n: usize) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut grow = grow_from;
    let unit = cs.max(8192);
    (0..n)
        .map(|i| {
            let tag = (i as u8).wrapping_mul(37) | 1;
            match rng.below(20) {
                0..=5 if grow + 9 * unit <= size => {
                    let len = (1 + rng.below(8)) * unit - rng.below(300);
                    let op = Op::Write(grow + rng.below(200), len, tag);
                    grow += len + cs;
                    op
                }
                0..=8 => {
                    let len = 1 + rng.below(3 * cs);
                    Op::Write(rng.below(size - len), len, tag)
                }
                9..=11 => {
                    let k = 1 + rng.below(6);
                    Op::Discard(rng.below(size / cs - k) * cs, k * cs)
                }
                12..=14 => {
                    let k = 1 + rng.below(6);
                    Op::Zero(rng.below(size / cs - k) * cs, k * cs, rng.below(2) == 0)
                }
                15 => {
                    let len = 1 + rng.below(2 * cs);
                    Op::Zero(rng.below(size - len), len, rng.below(2) == 0)
                }
                16 => {
                    let len = 1 + rng.below(4 * cs);
                    Op::Discard(rng.below(size - len), len)
                }
                _ => Op::Flush,
            }
        })
        .collect()
}

/// What one run saw.
#[derive(Default)]
struct Outcome {
    /// Calls that failed.
    errors: usize,
    /// Host operations attempted, per kind (Write, Flush, Discard, WriteZeroes, SetLen).
    counts: [u64; 5],
    /// The file right after the first failing call.
    after_fault: Option<MemStorage>,
    /// The file after close.
    fin: Option<MemStorage>,
}

const KINDS: [OpKind; 5] = [
    OpKind::Write,
    OpKind::Flush,
    OpKind::Discard,
    OpKind::WriteZeroes,
    OpKind::SetLen,
];

/// Run the workload with `fault` (if any); `errno` is what failing calls must report.
/// `scratch` is a buffer of at least the virtual size, reused between runs. Errors name
/// the first failing call (which host write the fault hit).
fn run(s: &Setup, fault: Option<Fault>, errno: i32, scratch: &mut [u8]) -> Result<Outcome, String> {
    let mut first = None;
    run_inner(s, fault, errno, scratch, &mut first).map_err(|e| match first {
        Some(f) => format!("{e} [first failing call: {f}]"),
        None => e,
    })
}

fn run_inner(
    s: &Setup,
    fault: Option<Fault>,
    errno: i32,
    scratch: &mut [u8],
    first: &mut Option<String>,
) -> Result<Outcome, String> {
    let faulty = Arc::new(FaultyStorage::new(MemStorage::from_vec(s.base.clone())));
    let opts = OpenOptions::parse(s.opts).unwrap();
    let img = Image::open_storage(faulty.clone(), &opts, None).map_err(|e| e.to_string())?;
    let dz = discard_zeroes(&img);
    let cs = s.cs;
    faulty.reset_counters();
    if let Some(f) = fault {
        faulty.add_fault(f);
    }
    let mut model = s.model.clone();
    let mut out = Outcome::default();
    for (i, op) in s.ops.iter().enumerate() {
        let (r, lo, new): (_, u64, Vec<u8>) = match *op {
            Op::Write(o, l, p) => {
                let d = vec![p; l as usize];
                (img.write_at(&d, o), o, d)
            }
            Op::Zero(o, l, u) => (img.write_zeroes(o, l, u), o, vec![0; l as usize]),
            Op::Discard(o, l) => {
                let (a, b) = (o.div_ceil(cs) * cs, (o + l) / cs * cs);
                let mut d = model[o as usize..(o + l) as usize].to_vec();
                if dz && a < b {
                    d[(a - o) as usize..(b - o) as usize].fill(0);
                }
                (img.discard(o, l), o, d)
            }
            Op::Flush => (img.flush(), 0, Vec::new()),
        };
        let range = lo as usize..lo as usize + new.len();
        match r {
            Ok(()) => model[range].copy_from_slice(&new),
            Err(e) => {
                if e.errno() != errno {
                    return Err(format!("op {i} {op:?}: errno {} ({e})", e.errno()));
                }
                out.errors += 1;
                if first.is_none() {
                    *first = Some(format!("op {i} {op:?}: {e}"));
                }
                if out.after_fault.is_none() {
                    out.after_fault = Some(faulty.inner().snapshot());
                }
                // The failed range holds its old or its new content, byte by byte.
                let mut b = vec![0u8; new.len()];
                img.read_at(&mut b, lo)
                    .map_err(|e| format!("read after failed op {i}: {e}"))?;
                for (k, &x) in b.iter().enumerate() {
                    if x != model[range.start + k] && x != new[k] {
                        return Err(format!(
                            "op {i} {op:?} failed; byte {:#x} reads {x:#x}, old {:#x}, new {:#x}",
                            range.start + k,
                            model[range.start + k],
                            new[k]
                        ));
                    }
                }
                model[range].copy_from_slice(&b);
            }
        }
    }
    for (k, kind) in KINDS.iter().enumerate() {
        out.counts[k] = faulty.count(*kind);
    }
    // The fault is lifted: more I/O, then everything must be durable and readable.
    faulty.clear_faults();
    let size = model.len() as u64;
    let after = |e: qcow2_engine::Error| format!("I/O after the fault was lifted: {e}");
    let at = size - 8292;
    img.write_at(&[0x3c; 5000], at).map_err(after)?;
    model[at as usize..][..5000].fill(0x3c);
    img.write_zeroes(cs, cs, true).map_err(after)?;
    model[cs as usize..2 * cs as usize].fill(0);
    img.flush().map_err(after)?;
    let all = &mut scratch[..size as usize];
    img.read_at(all, 0).map_err(after)?;
    if let Some(k) = (0..all.len()).find(|&k| all[k] != model[k]) {
        return Err(format!(
            "live image: byte {k:#x} reads {:#x}, model {:#x}",
            all[k], model[k]
        ));
    }
    img.close().map_err(|e| format!("close: {e}"))?;
    let fin = faulty.inner().snapshot();
    let img = Image::open_storage(Arc::new(fin.snapshot()), &opts, None)
        .map_err(|e| format!("reopen: {e}"))?;
    out.fin = Some(fin);
    let rep = img.check(Repair::None).map_err(|e| e.to_string())?;
    if rep.corruptions != 0 {
        return Err(format!("closed image: {}", first_messages(&rep.messages)));
    }
    img.read_at(all, 0).map_err(|e| e.to_string())?;
    if *all != model[..] {
        return Err("closed image differs from the model".into());
    }
    Ok(out)
}

/// Which faults a sweep injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Faults {
    /// EIO and ENOSPC at every write, EIO at every flush, host discard, host zeroing and
    /// `set_len`, and a full disk at a series of limits.
    Errors,
    /// Short writes (a sector-aligned prefix lands, then EIO) at every write; a prefix
    /// as long as the write means the write landed but EIO was reported anyway.
    Short,
    /// Both.
    All,
}

/// Every fault position of `s` (two worker threads); returns (runs, runs in which a call
/// failed, failure messages).
fn sweep(s: &Setup, which: Faults, qemu_every: usize) -> (usize, usize, Vec<String>) {
    let dir = TempDir::new("faultprov");
    let mut scratch = vec![0u8; s.model.len()];
    let dry = run(s, None, 0, &mut scratch).unwrap_or_else(|e| panic!("{}: dry run: {e}", s.name));
    let c = dry.counts;
    assert!(
        c[0] > 20 && c[1] > 5,
        "{}: workload too small: {c:?}",
        s.name
    );
    let mut faults: Vec<(Fault, i32)> = Vec::new();
    let errors = which != Faults::Short;
    for n in 0..=c[0] {
        if errors {
            for errno in [EIO, ENOSPC] {
                faults.push((
                    Fault::FailNth {
                        op: OpKind::Write,
                        n,
                        errno,
                    },
                    errno,
                ));
            }
        }
        if which != Faults::Errors {
            // A prefix cut at a sector boundary (as a disk tears: the crash model's 512
            // bytes), and the whole write landing with EIO reported all the same.
            let keep = 512 * (n as usize % 3);
            faults.push((
                Fault::ShortWrite {
                    n,
                    keep,
                    errno: EIO,
                },
                EIO,
            ));
            let keep = usize::MAX;
            faults.push((
                Fault::ShortWrite {
                    n,
                    keep,
                    errno: EIO,
                },
                EIO,
            ));
        }
    }
    if errors {
        for (k, kind) in KINDS.iter().enumerate().skip(1) {
            for n in 0..=c[k] {
                faults.push((
                    Fault::FailNth {
                        op: *kind,
                        n,
                        errno: EIO,
                    },
                    EIO,
                ));
            }
        }
        let end = s.base.len() as u64;
        for k in 0..12 {
            faults.push((
                Fault::NoSpaceBeyond {
                    limit: end + k * k * s.cs,
                },
                ENOSPC,
            ));
        }
    }
    let one = |i: usize, fault: Fault, errno: i32, path: &std::path::Path, buf: &mut [u8]| {
        let o = run(s, Some(fault), errno, buf)?;
        let fired = match fault {
            Fault::FailNth { op, n, .. } => {
                let k = KINDS.iter().position(|x| *x == op).unwrap();
                o.counts[k] > n
            }
            Fault::ShortWrite { n, .. } => o.counts[0] > n,
            _ => false,
        };
        let advisory = matches!(
            fault,
            Fault::FailNth {
                op: OpKind::Discard | OpKind::WriteZeroes,
                ..
            }
        );
        if fired && !advisory && o.errors == 0 {
            return Err("the fault fired but no call reported it".to_string());
        }
        if let Some(b) = &o.after_fault {
            consistent(
                b,
                "the image as left by the fault",
                (i % qemu_every == 0).then_some(path),
            )?;
        }
        if i % qemu_every == 0 {
            std::fs::write(path, o.fin.as_ref().expect("closed").to_vec()).unwrap();
            qemu_no_corruption(path, "the closed image")?;
        }
        Ok(o.errors > 0)
    };
    let results: Vec<(usize, usize, Vec<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|w| {
                let (faults, dir, one) = (&faults, &dir, &one);
                sc.spawn(move || {
                    let path = dir.path(&format!("f{w}.qcow2"));
                    let mut buf = vec![0u8; s.model.len()];
                    let (mut runs, mut hit, mut fails) = (0, 0, Vec::new());
                    for (i, &(fault, errno)) in faults.iter().enumerate().skip(w).step_by(2) {
                        runs += 1;
                        match one(i, fault, errno, &path, &mut buf) {
                            Ok(h) => hit += usize::from(h),
                            Err(e) => fails.push(format!("{}: {fault:?}: {e}", s.name)),
                        }
                    }
                    (runs, hit, fails)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut runs, mut hit, mut failures) = (0, 0, Vec::new());
    for (r, h, f) in results {
        runs += r;
        hit += h;
        failures.extend(f);
    }
    eprintln!(
        "  {}: ops {c:?}, {runs} fault runs, {hit} with a failing call, {} failed",
        s.name,
        failures.len()
    );
    (runs, hit, failures)
}

/// Fail the test if any run failed or too few faults surfaced. The message lists the first
/// eight failures, or all of them with `QCOWPROV_ALL_FAILURES=1`.
fn assert_swept(what: &str, (runs, hits, failures): (usize, usize, Vec<String>)) {
    eprintln!(
        "{what}: {runs} fault runs, {hits} with a failing call, {} failed",
        failures.len()
    );
    let shown = match std::env::var_os("QCOWPROV_ALL_FAILURES") {
        Some(_) => failures.len(),
        None => failures.len().min(8),
    };
    assert!(
        failures.is_empty(),
        "{what}: {} of {runs} fault runs failed; first:\n{}",
        failures.len(),
        failures[..shown].join("\n")
    );
    assert!(
        hits * 2 > runs,
        "{what}: faults were not exercised: {hits} of {runs}"
    );
}

fn add(a: &mut (usize, usize, Vec<String>), b: (usize, usize, Vec<String>)) {
    a.0 += b.0;
    a.1 += b.1;
    a.2.extend(b.2);
}

/// 4 KiB clusters, 3 MiB (two L2 tables): allocation into fresh space (including a new L2
/// table), discards and zeroing of data; every kind of fault.
#[test]
fn faults_during_allocation_discard_and_zeroing_every_mode() {
    let mut all = (0, 0, Vec::new());
    for (i, opts) in POLICIES.iter().enumerate() {
        let mut s = setup("4k", "cluster_size=4k", opts, 3 << 20, 1 << 20);
        s.ops = workload(900 + i as u64, 3 << 20, s.cs, 1900 << 10, 70);
        add(
            &mut all,
            sweep(&s, Faults::All, if i == 3 { 1 } else { 10 }),
        );
    }
    assert_swept("allocation/discard/zeroing", all);
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and one
/// refcount-table cluster 2 MiB of file; an L2 table maps 32 KiB. The base file stops just
/// short of 2 MiB, so the workload's allocations create L2 tables and refcount blocks and
/// move the refcount table.
fn growth_setups() -> Vec<Setup> {
    ["provision=thin", "provision=metadata", "provision=full"]
        .iter()
        .enumerate()
        .map(|(i, opts)| {
            let create = "cluster_size=512,refcount_bits=64";
            let size = 2304 << 10;
            let mut s = setup("512b/rc64", create, opts, size, 1900 << 10);
            assert!(s.base.len() < 2 << 20, "base file {} bytes", s.base.len());
            s.ops = workload(950 + i as u64, size, s.cs, 1900 << 10, 32);
            let dry = run(&s, None, 0, &mut vec![0u8; size as usize]).unwrap();
            assert_ne!(
                file_reftable(&dry.fin.expect("closed").to_vec()),
                file_reftable(&s.base),
                "{}: the workload did not move the refcount table",
                s.name
            );
            s
        })
        .collect()
}

/// EIO and ENOSPC at every write, EIO at every other host operation, and a full disk,
/// while L2 tables, refcount blocks and the refcount table are created.
#[test]
fn faults_during_refcount_table_growth() {
    let mut all = (0, 0, Vec::new());
    for s in growth_setups() {
        add(&mut all, sweep(&s, Faults::Errors, 10));
    }
    assert_swept("refcount-table growth", all);
}

/// Short writes at every write position while the metadata grows: part of the write, or
/// all of it, reaches the disk and EIO is reported. The engine must not assume that a
/// failed write left the old bytes in place.
#[test]
fn short_writes_during_metadata_growth() {
    let mut all = (0, 0, Vec::new());
    for s in growth_setups() {
        add(&mut all, sweep(&s, Faults::Short, 10));
    }
    assert_swept("short writes during growth", all);
}

/// The header's refcount table offset.
fn file_reftable(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[48..56].try_into().unwrap())
}
