//! Crash-sweep harness shared by `crash_provisioning.rs` and `crash_growth.rs`.
//!
//! A [`Workload`] drives one image on a [`CrashStorage`] and records every guest step
//! (write, write-zeroes, discard, flush, FUA write, resize, option change) with the storage
//! operation count before and after it, plus the step's guest-visible effect. The effects
//! are checked against the live image as they happen, so the model is known to be right
//! before any crash is simulated. The sweep over the recorded operations is in `sweep.rs`.
#![allow(dead_code)]

mod bitmaps;
mod sweep;

use std::sync::Arc;

use host_io::CrashStorage;
use qcow2_engine::{
    create_on, AioQueue, AioRequest, CreateOptions, Image, IoBuf, Mode, OpenOptions, Provision,
    ZeroFlags,
};

use crate::support::{Rng, TempDir};
#[allow(unused_imports)] // not every test binary runs a sweep
pub use sweep::*;

/// What a completed step did to the guest view.
#[derive(Debug, Clone)]
pub enum Effect {
    /// These bytes at this offset.
    Bytes(u64, Vec<u8>),
    /// Zeros over `[off, off+len)`.
    Zero(u64, u64),
    /// The virtual size became this.
    Resize(u64),
}

/// One recorded guest step.
#[derive(Debug, Clone)]
pub struct StepRec {
    /// Storage op count before the step.
    pub start: u64,
    /// Storage op count after it.
    pub end: u64,
    /// The step is a barrier once complete (flush, FUA write, close).
    pub barrier: bool,
    /// Guest-visible effects, in order.
    pub effects: Vec<Effect>,
    /// For messages.
    pub what: String,
    /// Guest bytes the request names (a write, write-zeroes, or a discard the policy
    /// carries out): persistent bitmaps mark them (QEMU's semantics).
    pub range: Option<(u64, u64)>,
}

/// A workload on one image, being recorded.
pub struct Workload {
    /// Name for messages.
    pub name: String,
    /// The recording backend.
    pub storage: Arc<CrashStorage>,
    img: Option<Arc<Image>>,
    /// The asynchronous queue, once an async step started it.
    queue: Option<AioQueue>,
    /// Recorded steps.
    pub steps: Vec<StepRec>,
    /// Guest content now (sized to `max_size`; zeros past the virtual size).
    pub model: Vec<u8>,
    /// Current virtual size.
    pub size: u64,
    /// Guest content and size when recording began.
    pub initial: Vec<u8>,
    /// Virtual size when recording began.
    pub initial_size: u64,
    /// Op count when recording began: the first crash point.
    pub first_op: u64,
    /// Open options used for the workload and for every crash image.
    pub opts: String,
    /// Holds the backing file (if any) and the crash images given to qemu-img.
    pub dir: TempDir,
    /// Internal snapshot name and its guest content, verified at sampled points.
    pub snapshot: Option<(String, Vec<u8>)>,
    /// Cluster size.
    pub cs: u64,
    discard_zeroes: bool,
    /// Ranges recently discarded or zeroed (targets for rewrites).
    pub released: Vec<(u64, u64)>,
    /// Persistent bitmaps to verify at every crash point (`support/crash/bitmaps.rs`):
    /// (name, enabled); each is clean when recording begins.
    pub bitmaps: Vec<(String, bool)>,
}

fn discard_zeroes(mode: Mode) -> bool {
    !matches!(
        mode,
        Mode::Provision(Provision::Off) | Mode::Qemu { unmap: false, .. }
    )
}

impl Workload {
    /// A fresh image made by the engine on an empty recording backend.
    pub fn create(name: &str, create_opts: &str, size: u64, max_size: u64, opts: &str) -> Self {
        let storage = Arc::new(CrashStorage::new(Vec::new()));
        let mut o = CreateOptions::parse(create_opts).expect("create options");
        o.size = Some(size);
        create_on(storage.clone(), &o, None).expect("create");
        let dir = TempDir::new("crashprov");
        Self::start(name, storage, opts, dir, vec![0; max_size as usize], None)
    }

    /// An image over a backing file that lives in `dir` (named by `create_opts`, relative to
    /// `dir`); the guest content starts as `initial` (the backing file's content, zeros past
    /// its end). Crash images are written into `dir` too, so qemu-img finds the backing file.
    pub fn over_backing(
        name: &str,
        create_opts: &str,
        size: u64,
        opts: &str,
        dir: TempDir,
        initial: Vec<u8>,
    ) -> Self {
        let storage = Arc::new(CrashStorage::new(Vec::new()));
        let mut o = CreateOptions::parse(create_opts).expect("create options");
        o.size = Some(size);
        create_on(storage.clone(), &o, Some(&dir.0)).expect("create over backing");
        Self::start(name, storage, opts, dir, initial, None)
    }

    /// An image whose bytes were made elsewhere (qemu-img), with its guest content.
    pub fn from_bytes(
        name: &str,
        bytes: Vec<u8>,
        opts: &str,
        initial: Vec<u8>,
        snapshot: Option<(String, Vec<u8>)>,
    ) -> Self {
        let storage = Arc::new(CrashStorage::new(bytes));
        let dir = TempDir::new("crashsnap");
        Self::start(name, storage, opts, dir, initial, snapshot)
    }

    fn start(
        name: &str,
        storage: Arc<CrashStorage>,
        opts: &str,
        dir: TempDir,
        initial: Vec<u8>,
        snapshot: Option<(String, Vec<u8>)>,
    ) -> Self {
        let o = OpenOptions::parse(opts).expect("open options");
        let img = Image::open_storage(storage.clone(), &o, Some(&dir.0)).expect("open");
        let size = img.virtual_size();
        let cs = img.cluster_size();
        let dz = discard_zeroes(img.info().mode);
        let first_op = storage.op_count();
        let w = Workload {
            name: name.to_string(),
            storage,
            img: Some(Arc::new(img)),
            queue: None,
            steps: Vec::new(),
            model: initial.clone(),
            size,
            initial,
            initial_size: size,
            first_op,
            opts: opts.to_string(),
            dir,
            snapshot,
            cs,
            discard_zeroes: dz,
            released: Vec::new(),
            bitmaps: Vec::new(),
        };
        w.verify_live(0, size);
        w
    }

    /// The live image.
    pub fn img(&self) -> &Image {
        self.img.as_ref().expect("image open")
    }

    fn record(
        &mut self,
        what: String,
        barrier: bool,
        range: Option<(u64, u64)>,
        f: impl FnOnce(&Image) -> Vec<Effect>,
    ) {
        let start = self.storage.op_count();
        let effects = f(self.img());
        let end = self.storage.op_count();
        for e in &effects {
            apply(&mut self.model, &mut self.size, e);
        }
        self.steps.push(StepRec {
            start,
            end,
            barrier,
            effects,
            what,
            range,
        });
    }

    /// Write `len` bytes at `off`; the content depends on the step and the position, so
    /// misplaced or stale data is told apart.
    pub fn write(&mut self, off: u64, len: u64, fua: bool) {
        let tag = (self.steps.len() as u64 * 0x9e37 + 1) as u8 | 1;
        let data: Vec<u8> = (off..off + len)
            .map(|p| tag.wrapping_add(((p >> 9) as u8).wrapping_mul(29)))
            .collect();
        self.record(
            format!("write{} {off:#x}+{len:#x}", if fua { "_fua" } else { "" }),
            fua,
            Some((off, len)),
            |img| {
                if fua {
                    img.write_at_fua(&data, off).expect("write_at_fua");
                } else {
                    img.write_at(&data, off).expect("write_at");
                }
                vec![Effect::Bytes(off, data.clone())]
            },
        );
        self.verify_live(off, len);
    }

    /// Write-zeroes over `[off, off+len)`.
    pub fn zero(&mut self, off: u64, len: u64, may_unmap: bool) {
        self.record(
            format!("write_zeroes {off:#x}+{len:#x} unmap={may_unmap}"),
            false,
            Some((off, len)),
            |img| {
                img.write_zeroes(off, len, may_unmap).expect("write_zeroes");
                vec![Effect::Zero(off, len)]
            },
        );
        self.released.push((off, len));
        self.verify_live(off, len);
    }

    /// Discard `[off, off+len)`: whole clusters read zero afterwards unless the policy
    /// ignores discards; partial clusters are left alone.
    pub fn discard(&mut self, off: u64, len: u64) {
        let cs = self.cs;
        let (a, b) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
        let zeroes = self.discard_zeroes && a < b;
        // A discard the policy ignores marks nothing (QEMU's discard=ignore).
        let range = self.discard_zeroes.then_some((off, len));
        self.record(format!("discard {off:#x}+{len:#x}"), false, range, |img| {
            img.discard(off, len).expect("discard");
            if zeroes {
                vec![Effect::Zero(a, b - a)]
            } else {
                Vec::new()
            }
        });
        self.released.push((off, len));
        self.verify_live(off, len);
    }

    /// A guest flush.
    pub fn flush(&mut self) {
        self.record("flush".into(), true, None, |img| {
            img.flush().expect("flush");
            Vec::new()
        });
    }

    /// Grow the virtual size.
    pub fn resize(&mut self, new_size: u64) {
        assert!(new_size as usize <= self.model.len(), "model too small");
        let old = self.size;
        self.record(
            format!("resize {old:#x} -> {new_size:#x}"),
            false,
            None,
            |img| {
                img.resize(new_size).expect("resize");
                vec![Effect::Resize(new_size)]
            },
        );
        assert_eq!(self.img().virtual_size(), new_size);
        self.verify_live(old, new_size - old);
    }

    /// Change the discard policy (like QEMU's reopen).
    pub fn set_options(&mut self, opts: &str) {
        self.record(format!("set_options {opts}"), false, None, |img| {
            img.set_options(opts).expect("set_options");
            Vec::new()
        });
        self.discard_zeroes = discard_zeroes(self.img().info().mode);
    }

    /// Close the image (a barrier: it flushes).
    pub fn close(&mut self) {
        self.queue = None;
        let img = Arc::try_unwrap(self.img.take().expect("open")).expect("the queue let go");
        let start = self.storage.op_count();
        img.close().expect("close");
        let end = self.storage.op_count();
        self.steps.push(StepRec {
            start,
            end,
            barrier: true,
            effects: Vec::new(),
            what: "close".into(),
            range: None,
        });
    }

    /// The live image must read as the model over `[off, off+len)` (whole clusters).
    fn verify_live(&self, off: u64, len: u64) {
        let cs = self.cs;
        let a = off / cs * cs;
        let b = ((off + len).div_ceil(cs) * cs).min(self.size);
        let mut buf = vec![0u8; (b - a) as usize];
        self.img().read_at(&mut buf, a).expect("live read");
        if let Some(i) = (0..buf.len()).find(|&i| buf[i] != self.model[a as usize + i]) {
            panic!(
                "{}: the live image disagrees with the model at {:#x} after step {} ({}): \
                 reads {:#x}, model {:#x}",
                self.name,
                a + i as u64,
                self.steps.len(),
                self.steps.last().map_or("-", |s| s.what.as_str()),
                buf[i],
                self.model[a as usize + i]
            );
        }
    }

    /// Up to `n` requests in flight together through the asynchronous queue (on the
    /// recording storage: the thread-pool backend), on disjoint cluster spans: unaligned
    /// writes (some FUA), write-zeroes (with and without may-unmap) and discards. One
    /// step whose effects are the batch's (each may or may not be durable at a crash
    /// inside it); every request must succeed.
    pub fn async_batch(&mut self, rng: &mut Rng, n: usize) {
        let cs = self.cs;
        let clusters = self.size / cs;
        let tag = (self.steps.len() as u64 * 0x9e37 + 1) as u8 | 1;
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut reqs: Vec<(u64, AioRequest)> = Vec::new();
        let mut effects = Vec::new();
        let mut what = Vec::new();
        let mut released = Vec::new();
        for _ in 0..n * 3 {
            if reqs.len() >= n {
                break;
            }
            let k = 1 + rng.below(3.min(clusters));
            let c = rng.below(clusters - k + 1);
            if taken.iter().any(|&(a, b)| c < b && a < c + k) {
                continue;
            }
            taken.push((c, c + k));
            let span = k * cs;
            let len = 1 + rng.below(span);
            let off = c * cs + rng.below(span - len + 1);
            let user = reqs.len() as u64;
            match rng.below(6) {
                0..=3 => {
                    let data: Vec<u8> = (off..off + len)
                        .map(|p| tag.wrapping_add(((p >> 9) as u8).wrapping_mul(29)))
                        .collect();
                    let fua = rng.below(4) == 0;
                    let buf = IoBuf::copy_of(&data).expect("buffer");
                    reqs.push((user, AioRequest::Write { off, buf, fua }));
                    what.push(format!(
                        "write{} {off:#x}+{len:#x}",
                        if fua { "_fua" } else { "" }
                    ));
                    effects.push(Effect::Bytes(off, data));
                }
                4 => {
                    let may_unmap = rng.below(2) == 0;
                    let flags = ZeroFlags {
                        may_unmap,
                        ..Default::default()
                    };
                    reqs.push((user, AioRequest::WriteZeroes { off, len, flags }));
                    what.push(format!("write_zeroes {off:#x}+{len:#x} unmap={may_unmap}"));
                    effects.push(Effect::Zero(off, len));
                    released.push((off, len));
                }
                _ => {
                    let (a, b) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
                    reqs.push((user, AioRequest::Discard { off, len }));
                    what.push(format!("discard {off:#x}+{len:#x}"));
                    if self.discard_zeroes && a < b {
                        effects.push(Effect::Zero(a, b - a));
                    }
                    released.push((off, len));
                }
            }
        }
        let count = reqs.len();
        let touched = taken.clone();
        let img = self.img.as_ref().expect("image open").clone();
        let q = self
            .queue
            .get_or_insert_with(|| AioQueue::start(img).expect("start the queue"));
        let start = self.storage.op_count();
        let (queued, err) = q.submit_many(reqs);
        assert!(err.is_none() && queued == count, "submission: {err:?}");
        let mut done = Vec::new();
        while done.len() < count {
            q.wait(count - done.len(), Some(std::time::Duration::from_secs(60)));
            let before = done.len();
            q.reap(usize::MAX, &mut done);
            assert!(done.len() > before, "{}: async batch hung", self.name);
        }
        for c in &done {
            if let Err(e) = &c.result {
                panic!("{}: async {}: {e}", self.name, what[c.user as usize]);
            }
        }
        let end = self.storage.op_count();
        for e in &effects {
            apply(&mut self.model, &mut self.size, e);
        }
        self.steps.push(StepRec {
            start,
            end,
            barrier: false,
            effects,
            what: format!("async batch [{}]", what.join(", ")),
            // A batch names many ranges; the bitmap sweeps (crash_bitmaps) do not use
            // the asynchronous queue, and their check reads this field only.
            range: None,
        });
        self.released.extend(released);
        for (a, b) in touched {
            self.verify_live(a * cs, (b - a) * cs);
        }
    }

    /// A flush through the asynchronous queue (a barrier once it completed).
    pub fn async_flush(&mut self) {
        let img = self.img.as_ref().expect("image open").clone();
        let q = self
            .queue
            .get_or_insert_with(|| AioQueue::start(img).expect("start the queue"));
        let start = self.storage.op_count();
        q.submit(u64::MAX, AioRequest::Flush).expect("submit flush");
        let mut done = Vec::new();
        q.wait(1, Some(std::time::Duration::from_secs(60)));
        q.reap(1, &mut done);
        assert_eq!(done.len(), 1, "{}: async flush hung", self.name);
        done[0].result.as_ref().expect("async flush");
        let end = self.storage.op_count();
        self.steps.push(StepRec {
            start,
            end,
            barrier: true,
            effects: Vec::new(),
            what: "async flush".into(),
            range: None,
        });
    }

    /// Check the whole live image against the model.
    pub fn verify_all(&self) {
        self.verify_live(0, self.size);
    }

    /// `n` random steps (see [`Workload::random_step`]).
    pub fn random_steps(&mut self, rng: &mut Rng, n: usize) {
        for _ in 0..n {
            self.random_step(rng);
        }
    }

    /// One random step: writes (unaligned, whole clusters, FUA), write-zeroes (aligned or
    /// not, with and without may-unmap), discards (aligned or not), flushes, and rewrites of
    /// recently released ranges with whole clusters (reusing anchored or freed clusters).
    pub fn random_step(&mut self, rng: &mut Rng) {
        let cs = self.cs;
        let size = self.size;
        let clusters = size / cs;
        let aligned = |rng: &mut Rng| {
            let k = 1 + rng.below(4.min(clusters));
            let c = rng.below(clusters - k + 1);
            (c * cs, k * cs)
        };
        let unaligned = |rng: &mut Rng| {
            let len = 1 + rng.below(2 * cs + 777).min(size - 1);
            (rng.below(size - len + 1), len)
        };
        match rng.below(100) {
            0..=24 => {
                let (o, l) = unaligned(rng);
                self.write(o, l, false)
            }
            25..=36 => {
                let (o, l) = aligned(rng);
                self.write(o, l, false)
            }
            37..=39 => {
                let (o, l) = unaligned(rng);
                self.write(o, l.min(3 * cs), true)
            }
            40..=49 => {
                let (o, l) = aligned(rng);
                self.zero(o, l, rng.below(2) == 0)
            }
            50..=55 => {
                let (o, l) = unaligned(rng);
                self.zero(o, l, rng.below(2) == 0)
            }
            56..=65 => {
                let (o, l) = aligned(rng);
                self.discard(o, l)
            }
            66..=70 => {
                let (o, l) = unaligned(rng);
                self.discard(o, l)
            }
            71..=84 => self.flush(),
            _ => {
                // Whole clusters over something released lately.
                let (o, l) = match self.released.pop() {
                    Some((o, l)) => {
                        let a = o / cs * cs;
                        let b = ((o + l).div_ceil(cs) * cs).min(size);
                        (a, (b - a).min(4 * cs))
                    }
                    None => aligned(rng),
                };
                self.write(o, l, false)
            }
        }
        if self.released.len() > 8 {
            self.released.remove(0);
        }
    }
}

/// Apply one effect to a model of the guest content and size.
fn apply(model: &mut [u8], size: &mut u64, e: &Effect) {
    match e {
        Effect::Bytes(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Effect::Zero(o, l) => model[*o as usize..(*o + *l) as usize].fill(0),
        Effect::Resize(s) => *size = *s,
    }
}
