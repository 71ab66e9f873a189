//! Host errors under the asynchronous queue ([`AioQueue`], thread-pool backend) with many
//! requests in flight, in every provisioning mode and QEMU's `discard=unmap` (with and
//! without `discard-no-unref=on`): the fault sweep of `fault_provisioning.rs`, through the
//! second executor.
//!
//! A base image with data is reopened on a [`FaultyStorage`] (so the queue runs the thread
//! pool: io_uring needs a file descriptor, and its reads and writes go from the kernel to
//! the file without passing through a `Storage` a test could fault) with small metadata
//! caches, and rounds of up to 24 requests go in flight together over disjoint cluster
//! spans: allocating writes, overwrites and unaligned writes (copy-on-write), FUA writes,
//! discards, write-zeroes with and without may-unmap, reads, flushes. A dry run counts the
//! host operations of each kind; then each run injects one fault: EIO (and ENOSPC, and two
//! short writes) at a write position, EIO at a read, flush, host discard, host zeroing or
//! `set_len` position, a full disk at a series of limits, and a device that goes away (every
//! write or flush from some position on fails; then close fails). The order of host
//! operations of concurrent requests varies from run to run, so a position hits whichever
//! request got there. Each run requires:
//!
//! * every completion comes (no hang), exactly once; a failed request carries the injected
//!   errno (never "handle failed"), and no thread of the library panicked;
//! * a failed request's range reads its old or its new content, byte by byte; every other
//!   request's result stands: completed reads return the model, and every acknowledged
//!   byte reads back;
//! * a fault on a write, flush or `set_len` is reported by some request (never swallowed);
//! * the file as it is the moment the first failure is reaped (requests still in flight:
//!   what a crash then would leave) has no corruption, per the engine's check and, sampled,
//!   `qemu-img check`;
//! * once the fault is lifted, the same queue keeps working (the handle is usable, as the
//!   synchronous path leaves it), flush and close succeed, and the closed image has no
//!   corruption (leaks allowed, as in the synchronous sweep) and holds exactly the model;
//!   when the device stays gone, close fails with the errno and the file as left has no
//!   corruption.
//!
//! The full list of fault positions is sampled to keep the test to about a minute on two
//! cores (`QCOWPROV_AIO_FAULTS_ALL=1` runs all of them); the test prints how many ran.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use host_io::{Fault, FaultyStorage, MemStorage, OpKind};
use qcow2_engine::{
    create_on, AioCompletion, AioKind, AioQueue, AioRequest, CreateOptions, Error, Image, IoBuf,
    OpenOptions, Repair, ZeroFlags,
};
use support::faults::*;
use support::*;

/// Requests in flight together, at most.
const DEPTH: u64 = 24;

#[derive(Debug, Clone, Copy)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u8, bool),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

struct Setup {
    name: String,
    opts: String,
    base: Vec<u8>,
    model: Vec<u8>,
    cs: u64,
    rounds: Vec<Vec<Op>>,
}

/// Create an image on memory, write `prefill` bytes of data at the start, discard and zero
/// some of it, flush and close.
fn setup(name: &str, create: &str, policy: &str, size: u64, prefill: u64) -> Setup {
    let mem = Arc::new(MemStorage::new());
    let mut o = CreateOptions::parse(create).unwrap();
    o.size = Some(size);
    create_on(mem.clone(), &o, None).unwrap();
    let opts = format!(
        "{policy},aio=threads,aio-queue-depth={DEPTH},l2-cache-size=16K,refcount-cache-size=8K"
    );
    let (cs, model) = support::faults::prefill(&mem, &opts, size, prefill);
    Setup {
        name: format!("{name} {policy}"),
        opts,
        base: mem.to_vec(),
        model,
        cs,
        rounds: Vec::new(),
    }
}

/// Seeded rounds of requests on disjoint cluster spans of `[0, size)`; a third of them are
/// writes allocating fresh space, from `grow_from` on (as long as it lasts).
fn rounds(seed: u64, size: u64, cs: u64, grow_from: u64, n: usize) -> Vec<Vec<Op>> {
    let mut rng = Rng(seed);
    let clusters = size / cs;
    let mut grow = grow_from.div_ceil(cs);
    let unit = cs.max(8192) / cs;
    (0..n)
        .map(|r| {
            let mut taken: Vec<(u64, u64)> = Vec::new();
            let mut ops = Vec::new();
            let want = 8 + rng.below(DEPTH - 8);
            for i in 0..want * 3 {
                if ops.len() as u64 >= want {
                    break;
                }
                if rng.below(12) == 0 {
                    ops.push(Op::Flush);
                    continue;
                }
                let ka = (1 + rng.below(4)) * unit;
                let allocating = rng.below(3) == 0 && grow + ka <= clusters;
                let (c, k) = if allocating {
                    (grow, ka)
                } else {
                    let k = 1 + rng.below(4);
                    (rng.below(clusters - k + 1), k)
                };
                if taken.iter().any(|&(a, b)| c < b && a < c + k) {
                    continue;
                }
                taken.push((c, c + k));
                if allocating {
                    grow += k + 1;
                    let (off, len) = (c * cs + rng.below(200), k * cs - rng.below(300) - 200);
                    let tag = ((r * 31 + i as usize) as u8).wrapping_mul(37) | 1;
                    ops.push(Op::Write(off, len, tag, rng.below(5) == 0));
                    continue;
                }
                let (start, span) = (c * cs, k * cs);
                let (off, len) = if rng.below(2) == 0 {
                    (start, span)
                } else {
                    let len = 1 + rng.below(span);
                    (start + rng.below(span - len + 1), len)
                };
                let tag = ((r * 31 + i as usize) as u8).wrapping_mul(37) | 1;
                ops.push(match rng.below(12) {
                    0..=5 => Op::Write(off, len, tag, rng.below(5) == 0),
                    6 | 7 => Op::Discard(off, len),
                    8 | 9 => Op::Zero(off, len, rng.below(2) == 0),
                    _ => Op::Read(off, len),
                });
            }
            ops
        })
        .collect()
}

/// Panics on the library's threads (the queue's, its helpers', the pool's): the executor
/// catches them and fails the handle, so they are counted here to be reported as what
/// they are.
static LIBRARY_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_library_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let t = std::thread::current();
            if t.name().is_some_and(|n| n.starts_with("qcowprov")) {
                LIBRARY_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info)
        }));
    });
}

const KINDS: [OpKind; 6] = [
    OpKind::Read,
    OpKind::Write,
    OpKind::Flush,
    OpKind::Discard,
    OpKind::WriteZeroes,
    OpKind::SetLen,
];

#[derive(Default)]
struct Outcome {
    /// Requests that failed.
    errors: usize,
    /// Host operations attempted per kind (as `KINDS`), during the rounds.
    counts: [u64; 6],
    /// The file when the first failure was reaped.
    after_fault: Option<MemStorage>,
    /// The file after close.
    fin: Option<MemStorage>,
}

/// Submit `reqs` and reap all their completions (in completion order); `first` is called
/// on the first failed completion as soon as it is reaped, while others may still run.
fn round_trip(
    q: &AioQueue,
    reqs: Vec<(u64, AioRequest)>,
    mut first: impl FnMut(),
) -> Result<Vec<AioCompletion>, String> {
    let count = reqs.len();
    let (queued, err) = q.submit_many(reqs);
    if let Some(e) = err {
        return Err(format!("submission refused after {queued}: {e}"));
    }
    let mut done: Vec<AioCompletion> = Vec::new();
    let mut failed = false;
    while done.len() < count {
        q.wait(1, Some(Duration::from_secs(30)));
        let before = done.len();
        q.reap(usize::MAX, &mut done);
        if done.len() == before {
            return Err(format!("hung: {} of {count} completions", done.len()));
        }
        if !failed && done.iter().any(|c| c.result.is_err()) {
            failed = true;
            first();
        }
    }
    let mut users: Vec<u64> = done.iter().map(|c| c.user).collect();
    users.sort_unstable();
    users.dedup();
    if users.len() != count {
        return Err(format!("{} completions for {count} requests", done.len()));
    }
    Ok(done)
}

/// What a failed request's error must be.
fn expected_error(e: &Error, errno: i32) -> Result<(), String> {
    if matches!(e, Error::Failed(_)) {
        return Err(format!("the handle failed: {e}"));
    }
    if e.errno() != errno {
        return Err(format!("errno {} ({e}), expected {errno}", e.errno()));
    }
    Ok(())
}

/// Run the workload with `fault`; `errno` is what failing requests must report. With
/// `stays`, the fault is never lifted (a device that went away): the run ends with close,
/// which may fail.
fn run(s: &Setup, fault: Option<Fault>, errno: i32, stays: bool) -> Result<Outcome, String> {
    let faulty = Arc::new(FaultyStorage::new(MemStorage::from_vec(s.base.clone())));
    let opts = OpenOptions::parse(&s.opts).unwrap();
    let img =
        Arc::new(Image::open_storage(faulty.clone(), &opts, None).map_err(|e| e.to_string())?);
    if img.info().aio != AioKind::Threads {
        return Err(format!("backend {}", img.info().aio));
    }
    let dz = discard_zeroes(&img);
    let cs = s.cs;
    let q = AioQueue::start(img.clone()).map_err(|e| format!("start: {e}"))?;
    faulty.reset_counters();
    if let Some(f) = fault {
        faulty.add_fault(f);
    }
    let mut model = s.model.clone();
    let mut out = Outcome::default();
    for (r, ops) in s.rounds.iter().enumerate() {
        let reqs: Vec<(u64, AioRequest)> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let req = match *op {
                    Op::Read(off, len) => AioRequest::Read {
                        off,
                        buf: IoBuf::new(len as usize, 1).unwrap(),
                    },
                    Op::Write(off, len, p, fua) => AioRequest::Write {
                        off,
                        buf: IoBuf::copy_of(&vec![p; len as usize]).unwrap(),
                        fua,
                    },
                    Op::Zero(off, len, u) => AioRequest::WriteZeroes {
                        off,
                        len,
                        flags: ZeroFlags {
                            may_unmap: u,
                            ..Default::default()
                        },
                    },
                    Op::Discard(off, len) => AioRequest::Discard { off, len },
                    Op::Flush => AioRequest::Flush,
                };
                (i as u64, req)
            })
            .collect();
        let mut snap = None;
        let done = round_trip(&q, reqs, || snap = Some(faulty.inner().snapshot()))
            .map_err(|e| format!("round {r}: {e}"))?;
        if out.after_fault.is_none() {
            out.after_fault = snap;
        }
        // Apply what completed; collect what failed (ranges are disjoint within a round).
        let mut failed: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        for c in done {
            let i = c.user as usize;
            let op = ops[i];
            let (lo, new): (u64, Vec<u8>) = match op {
                Op::Write(o, l, p, _) => (o, vec![p; l as usize]),
                Op::Zero(o, l, _) => (o, vec![0; l as usize]),
                Op::Discard(o, l) => {
                    let (a, b) = (o.div_ceil(cs) * cs, (o + l) / cs * cs);
                    let mut d = model[o as usize..(o + l) as usize].to_vec();
                    if dz && a < b {
                        d[(a - o) as usize..(b - o) as usize].fill(0);
                    }
                    (o, d)
                }
                Op::Read(..) | Op::Flush => (0, Vec::new()),
            };
            match c.result {
                Ok(n) => {
                    let want = match op {
                        Op::Write(_, l, ..) | Op::Read(_, l) => l,
                        _ => 0,
                    };
                    if n != want {
                        return Err(format!("round {r} {op:?}: {n} bytes, expected {want}"));
                    }
                    if let Op::Read(o, l) = op {
                        let got = c.buf.as_ref().expect("a read's buffer").to_vec();
                        let m = &model[o as usize..(o + l) as usize];
                        if let Some(k) = (0..got.len()).find(|&k| got[k] != m[k]) {
                            return Err(format!(
                                "round {r} {op:?}: byte {:#x} reads {:#x}, model {:#x}",
                                o + k as u64,
                                got[k],
                                m[k]
                            ));
                        }
                    } else if !new.is_empty() {
                        model[lo as usize..lo as usize + new.len()].copy_from_slice(&new);
                    }
                }
                Err(e) => {
                    expected_error(&e, errno).map_err(|m| format!("round {r} {op:?}: {m}"))?;
                    out.errors += 1;
                    if !new.is_empty() {
                        failed.push((i, lo, new));
                    }
                }
            }
        }
        // A failed request's range holds its old or its new content, byte by byte.
        for (i, lo, new) in failed {
            let mut b = vec![0u8; new.len()];
            let mut tries = 0;
            let read = loop {
                match img.read_at(&mut b, lo) {
                    // The fault may hit this read itself (a read fault fires once).
                    Err(e) if e.errno() == errno && tries < 2 && !stays => tries += 1,
                    r => break r,
                }
            };
            if let Err(e) = read {
                if stays && e.errno() == errno {
                    continue;
                }
                return Err(format!("round {r}: read after failed {:?}: {e}", ops[i]));
            }
            let m = &mut model[lo as usize..lo as usize + new.len()];
            for (k, &x) in b.iter().enumerate() {
                if x != m[k] && x != new[k] {
                    return Err(format!(
                        "round {r}: {:?} failed; byte {:#x} reads {x:#x}, old {:#x}, new {:#x}",
                        ops[i],
                        lo + k as u64,
                        m[k],
                        new[k]
                    ));
                }
            }
            m.copy_from_slice(&b);
        }
    }
    for (k, kind) in KINDS.iter().enumerate() {
        out.counts[k] = faulty.count(*kind);
    }
    let size = model.len() as u64;
    if stays {
        // The device is gone: close must not claim success if something could not be
        // written (a clean handle may close), and the file as left must be consistent.
        let _ = q.shutdown();
        drop(q);
        let img = Arc::try_unwrap(img).map_err(|_| "the queue kept the image".to_string())?;
        match img.close() {
            Ok(()) => {}
            Err(e) => expected_error(&e, errno).map_err(|m| format!("close: {m}"))?,
        }
        out.fin = Some(faulty.inner().snapshot());
        return Ok(out);
    }
    // The fault is lifted: the same queue goes on; then everything must read back.
    faulty.clear_faults();
    let after = |e: String| format!("I/O after the fault was lifted: {e}");
    let at = size - 8292;
    let more = vec![
        (
            0,
            AioRequest::Write {
                off: at,
                buf: IoBuf::copy_of(&[0x3c; 5000]).unwrap(),
                fua: false,
            },
        ),
        (
            1,
            AioRequest::WriteZeroes {
                off: cs,
                len: cs,
                flags: ZeroFlags {
                    may_unmap: true,
                    ..Default::default()
                },
            },
        ),
    ];
    for c in round_trip(&q, more, || {}).map_err(after)? {
        c.result.map_err(|e| after(e.to_string()))?;
    }
    model[at as usize..][..5000].fill(0x3c);
    model[cs as usize..2 * cs as usize].fill(0);
    for c in round_trip(&q, vec![(0, AioRequest::Flush)], || {}).map_err(after)? {
        c.result.map_err(|e| after(e.to_string()))?;
    }
    let all = AioRequest::Read {
        off: 0,
        buf: IoBuf::new(size as usize, 1).unwrap(),
    };
    let c = round_trip(&q, vec![(0, all)], || {})
        .map_err(after)?
        .pop()
        .expect("one completion");
    c.result.map_err(|e| after(e.to_string()))?;
    let live = c.buf.expect("a read's buffer").to_vec();
    if let Some(k) = (0..live.len()).find(|&k| live[k] != model[k]) {
        return Err(format!(
            "live image: byte {k:#x} reads {:#x}, model {:#x}",
            live[k], model[k]
        ));
    }
    q.shutdown().map_err(|e| format!("shutdown: {e}"))?;
    drop(q);
    let img = Arc::try_unwrap(img).map_err(|_| "the queue kept the image".to_string())?;
    img.close().map_err(|e| format!("close: {e}"))?;
    let fin = faulty.inner().snapshot();
    let img = Image::open_storage(Arc::new(fin.snapshot()), &opts, None)
        .map_err(|e| format!("reopen: {e}"))?;
    out.fin = Some(fin);
    let rep = img.check(Repair::None).map_err(|e| e.to_string())?;
    if rep.corruptions != 0 {
        return Err(format!("closed image: {}", first_messages(&rep.messages)));
    }
    let mut back = vec![0u8; size as usize];
    img.read_at(&mut back, 0).map_err(|e| e.to_string())?;
    if back != model {
        return Err("closed image differs from the model".into());
    }
    Ok(out)
}

/// A fault to inject, the errno it makes requests fail with, and whether it stays.
type Case = (Fault, i32, bool);

/// Every fault position of `s` per its dry run (a few beyond, as the order of concurrent
/// operations makes counts vary).
fn cases(s: &Setup, c: &[u64; 6]) -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let fail = |op, n, errno| Fault::FailNth { op, n, errno };
    for n in 0..c[1] + 2 {
        v.push((fail(OpKind::Write, n, EIO), EIO, false));
        v.push((fail(OpKind::Write, n, ENOSPC), ENOSPC, false));
        let keep = 512 * (n as usize % 3);
        v.push((
            Fault::ShortWrite {
                n,
                keep,
                errno: EIO,
            },
            EIO,
            false,
        ));
        let keep = usize::MAX;
        v.push((
            Fault::ShortWrite {
                n,
                keep,
                errno: EIO,
            },
            EIO,
            false,
        ));
    }
    for (k, kind) in KINDS.iter().enumerate() {
        if *kind == OpKind::Write {
            continue;
        }
        for n in 0..c[k] + 2 {
            v.push((fail(*kind, n, EIO), EIO, false));
        }
    }
    let end = s.base.len() as u64;
    for k in 0..12 {
        let limit = end + k * k * s.cs;
        v.push((Fault::NoSpaceBeyond { limit }, ENOSPC, false));
    }
    // The device goes away: from every 8th write and every flush on, all fail.
    for n in (0..c[1]).step_by(8) {
        let f = Fault::FailFrom {
            op: OpKind::Write,
            n,
            errno: EIO,
        };
        v.push((f, EIO, true));
    }
    for n in 0..c[2] {
        let f = Fault::FailFrom {
            op: OpKind::Flush,
            n,
            errno: EIO,
        };
        v.push((f, EIO, true));
    }
    v
}

/// Keep about `budget` of `all`, evenly spread (all with `QCOWPROV_AIO_FAULTS_ALL=1`).
/// `QCOWPROV_AIO_FAULTS_ONLY=text` keeps only the faults whose debug form contains it
/// (e.g. `Flush, n: 10,`), to chase one failure.
fn sample(all: Vec<Case>, budget: usize, salt: usize) -> Vec<Case> {
    if let Some(only) = std::env::var_os("QCOWPROV_AIO_FAULTS_ONLY") {
        let only = only.to_string_lossy().into_owned();
        return all
            .into_iter()
            .filter(|c| format!("{:?}", c.0).contains(&only))
            .collect();
    }
    if std::env::var_os("QCOWPROV_AIO_FAULTS_ALL").is_some() || all.len() <= budget {
        return all;
    }
    // Every failing flush runs (they are few, and barriers are where tables switch: a
    // failed sync after the header named a new refcount table once corrupted the image);
    // the other positions are spread evenly over the rest of the budget.
    let (mut keep, rest): (Vec<Case>, Vec<Case>) = all.into_iter().partition(|c| {
        matches!(
            c.0,
            Fault::FailNth {
                op: OpKind::Flush,
                ..
            }
        )
    });
    let budget = budget.saturating_sub(keep.len()).max(1);
    let step = rest.len().div_ceil(budget).max(1);
    keep.extend(rest.into_iter().skip(salt % step).step_by(step));
    keep
}

/// Totals of sweeps: (positions listed, runs, runs in which a request failed, failures).
type Totals = (usize, usize, usize, Vec<String>);

/// Run a sample of `s`'s fault positions on two worker threads.
fn sweep(s: &Setup, budget: usize, qemu_every: usize, salt: usize) -> Totals {
    let dir = TempDir::new("faultaio");
    let dry = run(s, None, 0, false).unwrap_or_else(|e| panic!("{}: dry run: {e}", s.name));
    let c = dry.counts;
    assert!(
        c[1] > 20 && c[2] > 3 && c[0] > 5,
        "{}: workload too small: {c:?}",
        s.name
    );
    let all = cases(s, &c);
    let listed = all.len();
    let cases = sample(all, budget, salt);
    let one = |i: usize, (fault, errno, stays): Case, path: &std::path::Path| {
        let o = run(s, Some(fault), errno, stays)?;
        let fired = match fault {
            Fault::FailNth { op, n, .. } | Fault::FailFrom { op, n, .. } => {
                let k = KINDS.iter().position(|x| *x == op).unwrap();
                o.counts[k] > n
            }
            Fault::ShortWrite { n, .. } => o.counts[1] > n,
            _ => false,
        };
        // Host discards and zeroing are advisory; a data read that failed on the lock-free
        // path is retried on the general one (and its error reported only if that fails).
        let advisory = matches!(
            fault,
            Fault::FailNth {
                op: OpKind::Discard | OpKind::WriteZeroes | OpKind::Read,
                ..
            }
        );
        if fired && !advisory && o.errors == 0 && !stays {
            return Err("the fault fired but no request reported it".to_string());
        }
        let qemu = (i % qemu_every == 0).then_some(path);
        if let Some(b) = &o.after_fault {
            consistent(b, "the image when the first failure was reaped", qemu)?;
        }
        let fin = o.fin.as_ref().expect("closed");
        if stays {
            consistent(fin, "the image after close on a failed device", qemu)?;
        } else if let Some(p) = qemu {
            std::fs::write(p, fin.to_vec()).unwrap();
            qemu_no_corruption(p, "the closed image")?;
        }
        Ok(o.errors > 0)
    };
    let results: Vec<(usize, usize, Vec<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|w| {
                let (cases, dir, one) = (&cases, &dir, &one);
                sc.spawn(move || {
                    let path = dir.path(&format!("f{w}.qcow2"));
                    let (mut runs, mut hit, mut fails) = (0, 0, Vec::new());
                    for (i, &case) in cases.iter().enumerate().skip(w).step_by(2) {
                        runs += 1;
                        match one(i, case, &path) {
                            Ok(h) => hit += usize::from(h),
                            Err(e) => fails.push(format!("{}: {:?}: {e}", s.name, case.0)),
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
        "  {}: ops {c:?}, {listed} fault positions, {runs} run, {hit} with a failed request, \
         {} failed",
        s.name,
        failures.len()
    );
    (listed, runs, hit, failures)
}

fn add(a: &mut Totals, b: Totals) {
    a.0 += b.0;
    a.1 += b.1;
    a.2 += b.2;
    a.3.extend(b.3);
}

/// Fail the test if a run failed, a library thread panicked, or too few faults surfaced.
fn assert_swept(what: &str, (listed, runs, hits, failures): Totals) {
    eprintln!(
        "{what}: {listed} fault positions, {runs} run, {hits} with a failed request, {} failed",
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
    assert_eq!(
        LIBRARY_PANICS.load(Ordering::SeqCst),
        0,
        "{what}: a thread of the library panicked"
    );
    assert!(
        hits * 2 > runs,
        "{what}: faults were not exercised: {hits} of {runs}"
    );
}

/// 4 KiB clusters, 3 MiB (two L2 tables, small caches): rounds of requests in flight over
/// data, discarded and zeroed clusters and fresh space, in every policy.
#[test]
fn async_faults_every_mode() {
    require_qemu_tools();
    count_library_panics();
    let mut all: Totals = (0, 0, 0, Vec::new());
    for (i, policy) in POLICIES.iter().enumerate() {
        let mut s = setup("4k", "cluster_size=4k", policy, 3 << 20, 1 << 20);
        s.rounds = rounds(700 + i as u64, 3 << 20, s.cs, 1 << 20, 8);
        add(&mut all, sweep(&s, 200, 12, i));
    }
    assert_swept("async, every mode", all);
}

/// 512-byte clusters with 64-bit refcounts: the rounds' allocations create L2 tables and
/// refcount blocks and move the refcount table while other requests are in flight.
#[test]
fn async_faults_during_metadata_growth() {
    require_qemu_tools();
    count_library_panics();
    let mut all: Totals = (0, 0, 0, Vec::new());
    for (i, policy) in ["provision=thin", "provision=full"].iter().enumerate() {
        let create = "cluster_size=512,refcount_bits=64";
        let size = 2304 << 10;
        let mut s = setup("512b/rc64", create, policy, size, 1900 << 10);
        assert!(s.base.len() < 2 << 20, "base file {} bytes", s.base.len());
        s.rounds = rounds(760 + i as u64, size, s.cs, 1900 << 10, 6);
        let dry = run(&s, None, 0, false).unwrap_or_else(|e| panic!("{}: dry run: {e}", s.name));
        let reftable = |b: &[u8]| u64::from_be_bytes(b[48..56].try_into().unwrap());
        assert_ne!(
            reftable(&dry.fin.expect("closed").to_vec()),
            reftable(&s.base),
            "{}: the rounds did not move the refcount table",
            s.name
        );
        add(&mut all, sweep(&s, 200, 12, i));
    }
    assert_swept("async, metadata growth", all);
}
