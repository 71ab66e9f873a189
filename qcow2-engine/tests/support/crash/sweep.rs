//! The crash sweep over a recorded [`Workload`]: rebuild the disk after a crash before
//! every recorded operation, under a crash policy rotating over the four kinds, and require
//! of each image: it opens read-write (a dirty image is repaired by the open), the engine's
//! check finds no corruption, and every guest byte reads as the model allows. The model at
//! crash point `n`: the content after the last barrier (flush, FUA write, close) completed
//! before `n` is exact; a step begun after it (and before `n`) may or may not have reached
//! the disk, so each byte it touched may hold its durable value or the value of any such
//! step. On a deterministic sample of points (and every point of a workload marked so) the
//! crash image also goes through `qemu-img check`, whose corruption and leak counters must
//! match the engine's check of the same bytes. Persistent bitmaps of the workload are
//! checked at every point (`bitmaps.rs`): consistent, marking at least what changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use host_io::{CrashPolicy, MemStorage, Storage};
use qcow2_engine::{Image, OpenOptions, Repair};

use super::{apply, Effect, StepRec, Workload};
use crate::support::{qemu_img, qemu_img_status, Rng};

/// How a sweep samples the qemu-img oracle.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// Run qemu-img check on points whose global index is a multiple of this.
    pub qemu_every: u64,
    /// Run it on every point of this workload.
    pub qemu_all: bool,
    /// Rotates the crash policies (so workloads do not all start on the same one).
    pub salt: u64,
    /// Crash images per position: 1 rotates the policies over the positions; 4 tries every
    /// policy at every position; more adds random subsets and torn writes with further
    /// seeds (for short targeted workloads).
    pub per_point: u64,
}

/// What a sweep did.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Operation positions crashed at.
    pub positions: u64,
    /// Crash images checked (positions times images per position).
    pub points: u64,
    /// Points per policy: drop, keep, random subset, torn last write.
    pub per_policy: [u64; 4],
    /// Points also checked by qemu-img.
    pub qemu_checked: u64,
    /// Failures (first few of each kind in full).
    pub failures: Vec<String>,
    /// Number of failing points.
    pub failed: u64,
    /// Failing points by kind (see [`Kind`]).
    pub by_kind: [u64; 4],
}

/// Why a crash point failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The image does not open, or I/O on it fails.
    Io = 0,
    /// A check (engine or qemu-img) finds corruption, or a snapshot changed.
    Corrupt = 1,
    /// A guest byte reads a value the model does not allow.
    Data = 2,
    /// The engine's check counters disagree with qemu-img's on the same bytes.
    Oracle = 3,
}

type PointResult = Result<(), (Kind, String)>;

fn io(e: impl std::fmt::Display) -> (Kind, String) {
    (Kind::Io, e.to_string())
}

impl Stats {
    /// Add another sweep's counts.
    pub fn add(&mut self, o: &Stats) {
        self.positions += o.positions;
        self.points += o.points;
        for i in 0..4 {
            self.per_policy[i] += o.per_policy[i];
        }
        self.qemu_checked += o.qemu_checked;
        self.failed += o.failed;
        for i in 0..4 {
            self.by_kind[i] += o.by_kind[i];
        }
        self.failures.extend(o.failures.iter().cloned());
    }

    /// Fail the test if any point failed or the sweep was smaller than `min_points`.
    pub fn assert_ok(&self, what: &str, min_points: u64) {
        eprintln!(
            "{what}: {} crash points at {} op positions (drop {}, keep {}, subset {}, torn {}), \
             {} also under qemu-img check, {} failed (io {}, corrupt {}, data {}, oracle {})",
            self.points,
            self.positions,
            self.per_policy[0],
            self.per_policy[1],
            self.per_policy[2],
            self.per_policy[3],
            self.qemu_checked,
            self.failed,
            self.by_kind[0],
            self.by_kind[1],
            self.by_kind[2],
            self.by_kind[3]
        );
        assert!(
            self.failed == 0,
            "{what}: {} crash points failed; first failures:\n{}",
            self.failed,
            self.failures.join("\n")
        );
        assert!(
            self.points >= min_points,
            "{what}: only {} crash points, the suite intends at least {min_points}",
            self.points
        );
        // Every policy must be tried at a fair share of the positions (targeted sweeps add
        // many random-subset and torn images per position on top of the rotation).
        assert!(
            self.per_policy.iter().all(|&p| p * 8 >= self.positions),
            "{what}: a crash policy is under-represented: {:?} over {} positions",
            self.per_policy,
            self.positions
        );
    }
}

/// The `j`-th crash policy tried at position `n`: the first rotates over the four kinds
/// with `i`; further ones (targeted sweeps) are random subsets and torn writes with fresh
/// seeds. Returns the policy and its kind index.
fn policy_for(i: u64, n: u64, j: u64) -> (CrashPolicy, usize) {
    let seed = Rng(n.wrapping_mul(0x1000_0001) ^ (j << 40) ^ i).next();
    let kind = if j < 4 {
        (i + j) % 4
    } else if j % 3 == 2 {
        3
    } else {
        2
    };
    let p = match kind {
        0 => CrashPolicy::DropUnflushed,
        1 => CrashPolicy::KeepUnflushed,
        2 => CrashPolicy::RandomSubset { seed },
        _ => CrashPolicy::TornLastWrite { seed },
    };
    (p, kind as usize)
}

/// Sweep every crash point of a closed workload (two worker threads, each taking every
/// other position).
pub fn sweep(w: &Workload, s: Sampling) -> Stats {
    assert!(w.img.is_none(), "close the workload before sweeping");
    const WORKERS: u64 = 2;
    let t0 = Instant::now();
    let parts: Vec<Stats> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..WORKERS)
            .map(|k| sc.spawn(move || sweep_part(w, s, k, WORKERS)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("sweep worker panicked"))
            .collect()
    });
    let mut st = Stats::default();
    for p in &parts {
        st.add(p);
    }
    eprintln!(
        "  {}: {} ops, {} steps, {} points, {} qemu-img checks, {} failed, {:.1} s",
        w.name,
        w.storage.op_count() - w.first_op,
        w.steps.len(),
        st.points,
        st.qemu_checked,
        st.failed,
        t0.elapsed().as_secs_f64()
    );
    st
}

/// The positions `first_op + k, first_op + k + step, ...` of a sweep.
fn sweep_part(w: &Workload, s: Sampling, k: u64, step: u64) -> Stats {
    let total = w.storage.op_count();
    let mut st = Stats::default();
    let mut durable = w.initial.clone();
    let mut durable_size = w.initial_size;
    let mut applied = 0usize;
    // Reused between points: fresh multi-MiB buffers per point cost more in page faults
    // than the checks themselves.
    let mut scratch = (vec![0u8; w.model.len()], vec![0u8; w.model.len()]);
    for n in (w.first_op + k..=total).step_by(step as usize) {
        // Fold every step up to the last barrier completed before `n` into `durable`.
        let last_barrier = w.steps.iter().rposition(|s| s.barrier && s.end <= n);
        if let Some(b) = last_barrier {
            while applied <= b {
                for e in &w.steps[applied].effects {
                    apply(&mut durable, &mut durable_size, e);
                }
                applied += 1;
            }
        }
        let pending: Vec<&StepRec> = w.steps[applied..]
            .iter()
            .take_while(|s| s.start < n)
            .collect();
        st.positions += 1;
        for j in 0..s.per_point.max(1) {
            let i = n + s.salt;
            let (policy, kind_index) = policy_for(i, n, j);
            let qemu = s.qemu_all || (j == 0 && i % s.qemu_every == 0);
            let r = check_point(
                w,
                k,
                n,
                policy,
                qemu,
                (&durable, durable_size, &pending),
                &mut scratch,
            );
            st.points += 1;
            st.per_policy[kind_index] += 1;
            st.qemu_checked += u64::from(qemu);
            if let Err((kind, e)) = r {
                keep_failed(w, n, policy);
                st.failed += 1;
                st.by_kind[kind as usize] += 1;
                if st.by_kind[kind as usize] <= 2 {
                    st.failures.push(format!(
                        "{} [{kind:?}]: crash before op {n} of {total} ({policy:?}): {e}",
                        w.name
                    ));
                }
            }
        }
    }
    st
}

/// With `QCOWPROV_KEEP_FAILED=<dir>` set, a failing crash image is saved there for a
/// reproduction (`qemu-img check`, the engine) outside the test.
fn keep_failed(w: &Workload, n: u64, policy: CrashPolicy) {
    if let Some(d) = std::env::var_os("QCOWPROV_KEEP_FAILED") {
        let name = format!("{}-op{n}.qcow2", w.name.replace([' ', '=', ','], "_"));
        let bytes = w.storage.crash_bytes(n, policy).expect("crash image");
        let _ = std::fs::create_dir_all(&d);
        let _ = std::fs::write(std::path::Path::new(&d).join(name), bytes);
    }
}

/// Counters parsed from `qemu-img check --output=json`.
fn qemu_counters(path: &std::path::Path) -> Result<(u64, u64, u64), String> {
    let p = path.to_str().expect("utf-8");
    let (code, out, err) = qemu_img_status(&["check", "--output=json", p]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("qemu-img check exit {code}, no JSON ({e}): {out}{err}"))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Ok((get("corruptions"), get("leaks"), get("check-errors")))
}

/// The model at a crash point: durable content and size, and the steps pending.
type Expect<'a> = (&'a [u8], u64, &'a [&'a StepRec]);

fn check_point(
    w: &Workload,
    worker: u64,
    n: u64,
    policy: CrashPolicy,
    qemu: bool,
    (durable, durable_size, pending): Expect<'_>,
    (buf, newest): &mut (Vec<u8>, Vec<u8>),
) -> PointResult {
    let mem = w.storage.crash_image(n, policy).map_err(io)?;
    let opts = OpenOptions::parse(&w.opts).expect("open options");
    let dir = Some(w.dir.0.as_path());
    if qemu {
        oracle(w, worker, &mem, &opts)?;
    }
    let mem = Arc::new(mem);
    let img = Image::open_storage(mem.clone() as Arc<dyn Storage>, &opts, dir)
        .map_err(|e| io(format!("read-write open failed: {e}")))?;
    let rep = img.check(Repair::None).map_err(io)?;
    if rep.corruptions != 0 || rep.check_errors != 0 {
        return Err((
            Kind::Corrupt,
            format!(
                "engine check: {} corruptions, {} errors: {}",
                rep.corruptions,
                rep.check_errors,
                first_messages(&rep.messages)
            ),
        ));
    }
    let v = img.virtual_size();
    let sizes: Vec<u64> = std::iter::once(durable_size)
        .chain(pending.iter().flat_map(|s| {
            s.effects.iter().filter_map(|e| match e {
                Effect::Resize(x) => Some(*x),
                _ => None,
            })
        }))
        .collect();
    if !sizes.contains(&v) {
        return Err((
            Kind::Data,
            format!("virtual size {v:#x}, expected one of {sizes:x?}"),
        ));
    }
    let buf = &mut buf[..v as usize];
    img.read_at(buf, 0).map_err(io)?;
    compare(buf, durable, pending, &mut newest[..v as usize])
        .map_err(|(i, e)| (Kind::Data, e + &history(w, n, i)))?;
    super::bitmaps::check(w, &img, n, buf).map_err(|e| (Kind::Data, e))?;
    // Every fifth point: the recovered image takes new writes and stays consistent.
    if n % 5 == 0 {
        let cs = w.cs;
        let off = (n * 7919 % (v / cs)) * cs;
        let data = vec![0xeeu8; (cs + 1000).min(v - off) as usize];
        img.write_at(&data, off)
            .and_then(|()| img.discard(off, cs))
            .and_then(|()| img.write_zeroes(off / 2, 3000.min(v - off / 2), true))
            .map_err(|e| io(format!("I/O after recovery failed: {e}")))?;
        let r = img.check(Repair::None).map_err(io)?;
        if r.corruptions != 0 {
            return Err((
                Kind::Corrupt,
                format!(
                    "corrupt after recovery I/O: {}",
                    first_messages(&r.messages)
                ),
            ));
        }
    }
    img.close().map_err(|e| io(format!("close failed: {e}")))
}

/// qemu-img check of the crash image must find no corruption and count what the engine's
/// check of the same bytes counts; an internal snapshot must still hold its content.
fn oracle(w: &Workload, worker: u64, mem: &MemStorage, opts: &OpenOptions) -> PointResult {
    let path: PathBuf = w.dir.path(&format!("crash-{worker}.qcow2"));
    let bytes = mem.to_vec();
    std::fs::write(&path, &bytes).expect("write crash image");
    let (qc, ql, qe) = qemu_counters(&path).map_err(io)?;
    let ro = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    let ro_img = Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        &ro,
        Some(w.dir.0.as_path()),
    )
    .map_err(|e| io(format!("read-only open failed: {e}")))?;
    let eng = ro_img.check(Repair::None).map_err(io)?;
    let maps: Vec<(String, crate::support::bitmaps::DirtyMap)> = w
        .bitmaps
        .iter()
        .filter(|b| b.1 && ro_img.bitmaps_maintained())
        .map(|(name, _)| {
            (
                name.clone(),
                crate::support::bitmaps::engine_dirty_map(&ro_img, name),
            )
        })
        .collect();
    drop(ro_img);
    super::bitmaps::oracle(w, &maps, &path).map_err(|e| (Kind::Oracle, e))?;
    if qc != 0 || qe != 0 {
        return Err((
            Kind::Corrupt,
            format!(
                "qemu-img check: {qc} corruptions, {qe} check errors (engine: {} / {}): {}",
                eng.corruptions,
                eng.check_errors,
                qemu_img_status(&["check", path.to_str().expect("utf-8")]).1
            ),
        ));
    }
    if (eng.corruptions, eng.leaks) != (qc, ql) {
        return Err((
            Kind::Oracle,
            format!(
                "engine check (corruptions {}, leaks {}) disagrees with qemu-img check \
                 (corruptions {qc}, leaks {ql}) on the same bytes (file length {:#x}): {}",
                eng.corruptions,
                eng.leaks,
                mem.len().unwrap_or(0),
                first_messages(&eng.messages)
            ),
        ));
    }
    if let Some((name, want)) = &w.snapshot {
        let raw = w.dir.path(&format!("snap-{worker}.raw"));
        let l = format!("snapshot.name={name}");
        qemu_img(&[
            "convert",
            "-l",
            &l,
            "-O",
            "raw",
            path.to_str().expect("utf-8"),
            raw.to_str().expect("utf-8"),
        ]);
        let got = std::fs::read(&raw).expect("read converted snapshot");
        if got != *want {
            let i = got.iter().zip(want).position(|(a, b)| a != b);
            return Err((
                Kind::Corrupt,
                format!("internal snapshot {name} changed (first difference at {i:?})"),
            ));
        }
    }
    Ok(())
}

/// Every byte must equal its durable value or the value some pending step gave it.
fn compare(
    buf: &[u8],
    durable: &[u8],
    pending: &[&StepRec],
    newest: &mut [u8],
) -> Result<(), (u64, String)> {
    newest.copy_from_slice(&durable[..buf.len()]);
    for s in pending {
        for e in &s.effects {
            match e {
                Effect::Resize(_) => {}
                e => apply_clipped(newest, e),
            }
        }
    }
    const CHUNK: usize = 4096;
    for start in (0..buf.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(buf.len());
        let (b, d, nw) = (&buf[start..end], &durable[start..end], &newest[start..end]);
        if b == d || b == nw {
            continue;
        }
        for i in start..end {
            let x = buf[i];
            if x == durable[i] || x == newest[i] {
                continue;
            }
            let ok = pending
                .iter()
                .flat_map(|s| s.effects.iter())
                .any(|e| value_at(e, i as u64) == Some(x));
            if !ok {
                let touching: Vec<&str> = pending
                    .iter()
                    .filter(|s| s.effects.iter().any(|e| value_at(e, i as u64).is_some()))
                    .map(|s| s.what.as_str())
                    .collect();
                return Err((
                    i as u64,
                    format!(
                        "guest byte {i:#x} reads {x:#x}; durable {:#x}, pending steps touching \
                         it: {touching:?} (newest {:#x}); {} steps pending",
                        durable[i],
                        newest[i],
                        pending.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The first few check messages, and how many there were.
fn first_messages(m: &[String]) -> String {
    format!("{:?} ({} messages)", &m[..m.len().min(4)], m.len())
}

/// The last steps begun before op `n` that touched guest byte `i`, for messages.
fn history(w: &Workload, n: u64, i: u64) -> String {
    let mut h: Vec<String> = w
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.start < n && s.effects.iter().any(|e| value_at(e, i).is_some()))
        .map(|(k, s)| {
            let v = s.effects.iter().rev().find_map(|e| value_at(e, i));
            format!(
                "#{k} {} (ops {}..{}) -> {:#x}",
                s.what,
                s.start,
                s.end,
                v.unwrap_or(0)
            )
        })
        .collect();
    let barrier = w.steps.iter().rposition(|s| s.barrier && s.end <= n);
    let cut = h.len().saturating_sub(4);
    h.drain(..cut);
    format!("; history of the byte: {h:?}; last completed barrier: step {barrier:?}")
}

fn apply_clipped(model: &mut [u8], e: &Effect) {
    let len = model.len() as u64;
    match e {
        Effect::Bytes(o, d) if *o < len => {
            let n = (d.len() as u64).min(len - o) as usize;
            model[*o as usize..*o as usize + n].copy_from_slice(&d[..n]);
        }
        Effect::Zero(o, l) if *o < len => model[*o as usize..(*o + *l).min(len) as usize].fill(0),
        _ => {}
    }
}

fn value_at(e: &Effect, i: u64) -> Option<u8> {
    match e {
        Effect::Bytes(o, d) if i >= *o && i < o + d.len() as u64 => Some(d[(i - o) as usize]),
        Effect::Zero(o, l) if i >= *o && i < o + l => Some(0),
        _ => None,
    }
}
