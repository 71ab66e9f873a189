//! The asynchronous executor: the queue's thread. It takes submitted requests, plans them
//! under the metadata lock (the same planners as the synchronous API), hands their host
//! I/O to the backend (io_uring or a thread pool), reaps, finishes the plans under the lock
//! and posts completions. Nothing here waits for another request: a write whose first
//! cluster is claimed is deferred until a plan of this queue finishes (or, for a claim of
//! someone else, until a helper thread saw it end). What would block this thread on
//! something other than metadata I/O runs on helper threads (`async_jobs.rs`): discard,
//! write-zeroes and flush (the synchronous engine code, which may wait for claims), reads
//! through a backing file or of compressed clusters, copy-on-write from them, and reads
//! that kept racing with cluster reuse.
//!
//! A request's state lives in a slab; a backend operation's tag is the request's slot and
//! a sub-tag saying what the operation was (plain, advisory host effect, or the read
//! phase of a copy-on-write run whose write follows).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use host_io::aio::{AioBackend, AioDone, AioOp, IoBuf, Notify, Piece};
use host_io::ZeroMode;

use super::async_jobs::Jobs;
use super::async_queue::{errno_error, AioCompletion, AioRequest, QShared, ECANCELED};
use super::host_write::{write_steps, Step};
use crate::changes::ChangeKind;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::plan::{Fill, HostIo, Plan};
use crate::provision::action::HostEffect;
use crate::provision::policy::DetectZeroes;
use crate::request::read::Src;

/// Sub-tag of an operation whose failure fails the request.
const SUB_PLAIN: u64 = 0;
/// Sub-tag of an advisory host effect (a failure is counted, as the sync executor does).
const SUB_ADVISORY: u64 = 0xffff;

/// What a helper job hands back.
enum JobOut {
    /// The request is done with this result.
    Done(Result<u64>),
    /// A synchronous read into the request's buffer.
    Read(Result<()>, IoBuf),
    /// A plan carried out by the synchronous executor.
    Plan(Box<Plan>, Result<u64>),
    /// The claim a write waited for has ended: plan again.
    Unclaimed,
}

struct JobDone {
    id: usize,
    out: JobOut,
}

struct ReadSt {
    off: u64,
    len: u64,
    gen: u64,
    tries: u32,
    fast: bool,
}

struct WriteSt {
    off: u64,
    len: usize,
    buf: Arc<IoBuf>,
    /// Bytes planned so far.
    pos: usize,
    /// Start of the batch being carried out (in the buffer).
    base: usize,
    fua: bool,
    plan: Option<Plan>,
    /// What waits for a first operation of the current plan (see `Then`).
    then: Vec<Then>,
    detect_checked: bool,
}

enum St {
    New(AioRequest),
    Read(ReadSt),
    Write(WriteSt),
    /// Waiting for a helper job only.
    Job,
    Gone,
}

struct Req {
    user: u64,
    st: St,
    /// Backend operations and jobs outstanding.
    pending: usize,
    err: Option<Error>,
    /// Advisory host effects that failed in the current plan.
    failures: u64,
    /// Something of it may have reached the image: it is never cancelled.
    started: bool,
    /// Guest clusters its begun plan claims.
    claim: Option<(u64, u64)>,
}

struct Exec {
    q: Arc<QShared>,
    img: Arc<Image>,
    backend: Box<dyn AioBackend>,
    notifier: Arc<dyn Notify>,
    reqs: Vec<Option<Req>>,
    free: Vec<usize>,
    live: usize,
    ready: VecDeque<usize>,
    deferred: Vec<usize>,
    tx: Sender<JobDone>,
    rx: Receiver<JobDone>,
    stash: Vec<JobDone>,
    /// Helpers that never wait for claims (so plans holding claims always finish).
    io_jobs: Jobs,
    /// Helpers running synchronous requests, which may wait for claims.
    claim_jobs: Jobs,
    jobs_pending: usize,
    done: Vec<AioCompletion>,
    bits: u32,
    align: usize,
    closing: bool,
    broken: bool,
}

/// The queue's thread.
pub(crate) fn run(q: Arc<QShared>, backend: Box<dyn AioBackend>) {
    let (tx, rx) = channel();
    let img = q.img.clone();
    let notifier = backend.notifier();
    let mut ex = Exec {
        bits: img.geo.cluster_bits(),
        align: img.storage.capabilities().io_alignment.max(1) as usize,
        q,
        img,
        backend,
        notifier,
        reqs: Vec::new(),
        free: Vec::new(),
        live: 0,
        ready: VecDeque::new(),
        deferred: Vec::new(),
        tx,
        rx,
        stash: Vec::new(),
        io_jobs: Jobs::new("qcowprov-io", 8),
        claim_jobs: Jobs::new("qcowprov-req", 8),
        jobs_pending: 0,
        done: Vec::new(),
        closing: false,
        broken: false,
    };
    ex.main_loop();
    ex.io_jobs.shutdown();
    ex.claim_jobs.shutdown();
    ex.q.mark_exited();
}

impl Exec {
    fn main_loop(&mut self) {
        let mut comps: Vec<AioDone> = Vec::new();
        loop {
            self.take_submissions();
            while let Some(id) = self.ready.pop_front() {
                self.guarded(|ex| ex.step(id));
            }
            if let Err(e) = self.backend.poll(false, &mut comps) {
                self.backend_failed(e);
            }
            self.absorb(&mut comps);
            self.q.post(&mut self.done);
            if !self.ready.is_empty() {
                continue;
            }
            if self.closing
                && self.live == 0
                && self.backend.in_flight() == 0
                && self.jobs_pending == 0
            {
                return;
            }
            // Sleep, unless work arrived since the last look (a submitter that saw
            // `sleeping` set wakes the backend's poll).
            self.q.sleeping.store(true, Ordering::SeqCst);
            let work = {
                let s = self.q.lock_sub();
                !s.reqs.is_empty() || s.closing != self.closing
            } || self.peek_jobs();
            if !work {
                if let Err(e) = self.backend.poll(true, &mut comps) {
                    self.backend_failed(e);
                }
            }
            self.q.sleeping.store(false, Ordering::SeqCst);
            self.absorb(&mut comps);
            self.q.post(&mut self.done);
        }
    }

    /// Whether a job result waits (kept for `absorb`).
    fn peek_jobs(&mut self) -> bool {
        while let Ok(j) = self.rx.try_recv() {
            self.stash.push(j);
        }
        !self.stash.is_empty()
    }

    /// Handle backend completions and job results.
    fn absorb(&mut self, comps: &mut Vec<AioDone>) {
        for c in comps.drain(..) {
            self.guarded(|ex| ex.on_io(c));
        }
        self.peek_jobs();
        for j in std::mem::take(&mut self.stash) {
            self.jobs_pending -= 1;
            self.guarded(|ex| ex.on_job(j));
        }
    }

    fn take_submissions(&mut self) {
        let (new, closing) = {
            let mut s = self.q.lock_sub();
            (std::mem::take(&mut s.reqs), s.closing)
        };
        for (user, r) in new {
            let id = self.insert(user, St::New(r));
            self.ready.push_back(id);
        }
        if closing && !self.closing {
            self.closing = true;
            // Requests that changed nothing yet are cancelled.
            let waiting: Vec<usize> = self
                .ready
                .drain(..)
                .chain(self.deferred.drain(..))
                .collect();
            for id in waiting {
                let r = self.reqs[id].as_ref().expect("live request");
                if r.started || r.pending > 0 {
                    self.ready.push_back(id);
                } else {
                    let buf = self.take_buf(id);
                    self.complete(
                        id,
                        Err(errno_error(ECANCELED, "cancelled: the image was closed")),
                        buf,
                    );
                }
            }
        }
    }

    fn insert(&mut self, user: u64, st: St) -> usize {
        let r = Req {
            user,
            st,
            pending: 0,
            err: None,
            failures: 0,
            started: false,
            claim: None,
        };
        self.live += 1;
        match self.free.pop() {
            Some(id) => {
                self.reqs[id] = Some(r);
                id
            }
            None => {
                self.reqs.push(Some(r));
                self.reqs.len() - 1
            }
        }
    }

    fn req(&mut self, id: usize) -> &mut Req {
        self.reqs[id].as_mut().expect("live request")
    }

    /// The buffer of a request that has not started (to hand back on cancellation).
    fn take_buf(&mut self, id: usize) -> Option<IoBuf> {
        match std::mem::replace(&mut self.req(id).st, St::Gone) {
            St::New(AioRequest::Read { buf, .. }) | St::New(AioRequest::Write { buf, .. }) => {
                Some(buf)
            }
            St::Write(w) => Arc::try_unwrap(w.buf).ok(),
            _ => None,
        }
    }

    fn complete(&mut self, id: usize, result: Result<u64>, buf: Option<IoBuf>) {
        let r = self.reqs[id].take().expect("live request");
        self.free.push(id);
        self.live -= 1;
        self.done.push(AioCompletion {
            user: r.user,
            result,
            buf,
        });
    }

    /// Run `f`; a panic fails the image (as a panic in the synchronous API does) and
    /// every request with it, and releases the claims of begun plans.
    fn guarded(&mut self, f: impl FnOnce(&mut Exec)) {
        if catch_unwind(AssertUnwindSafe(|| f(self))).is_err() {
            self.broken = true;
            self.img.failed.store(true, Ordering::Release);
            if let Ok(mut st) = self.img.state.lock() {
                for r in self.reqs.iter_mut().flatten() {
                    if let Some((first, n)) = r.claim.take() {
                        st.claims.release(first, n);
                    }
                }
            }
            self.img.claims_ended.notify_all();
            let idle: Vec<usize> = (0..self.reqs.len())
                .filter(|&i| self.reqs[i].as_ref().is_some_and(|r| r.pending == 0))
                .collect();
            for id in idle {
                self.ready.retain(|&x| x != id);
                self.deferred.retain(|&x| x != id);
                self.complete(id, Err(failed()), None);
            }
        }
    }

    fn backend_failed(&mut self, e: std::io::Error) {
        // The ring itself failed (not an operation): nothing more can be trusted to
        // complete. Fail the image so that every later request fails too.
        self.img.failed.store(true, Ordering::Release);
        self.broken = true;
        let _ = e;
    }

    fn submit_op(&mut self, id: usize, sub: u64, op: AioOp) {
        self.req(id).pending += 1;
        self.backend.submit(((id as u64) << 16) | sub, op);
    }

    /// Run `work` on a helper thread; its result comes back to `on_job`.
    fn job(
        &mut self,
        id: usize,
        may_wait_for_claims: bool,
        work: impl FnOnce(&Image) -> JobOut + Send + 'static,
    ) {
        self.req(id).pending += 1;
        self.jobs_pending += 1;
        let img = self.img.clone();
        let tx = self.tx.clone();
        let notifier = self.notifier.clone();
        let f = move || {
            let out = catch_unwind(AssertUnwindSafe(|| work(&img)))
                .unwrap_or_else(|_| JobOut::Done(Err(failed())));
            let _ = tx.send(JobDone { id, out });
            notifier.notify();
        };
        if may_wait_for_claims {
            self.claim_jobs.spawn(f);
        } else {
            self.io_jobs.spawn(f);
        }
    }

    /// Advance a request that is ready.
    fn step(&mut self, id: usize) {
        if self.broken {
            let buf = self.take_buf(id);
            return self.complete(id, Err(failed()), buf);
        }
        match std::mem::replace(&mut self.req(id).st, St::Gone) {
            St::New(AioRequest::Read { off, buf }) => self.read_start(id, off, buf),
            St::New(AioRequest::Write { off, buf, fua }) => {
                if buf.is_empty() {
                    return self.sync_request(id, fua, move |_| Ok(0), Some(buf));
                }
                self.req(id).st = St::Write(WriteSt {
                    off,
                    len: buf.len(),
                    buf: Arc::new(buf),
                    pos: 0,
                    base: 0,
                    fua,
                    plan: None,
                    then: Vec::new(),
                    detect_checked: false,
                });
                self.write_batch(id);
            }
            St::New(AioRequest::Discard { off, len }) => self.sync_request(
                id,
                false,
                move |img| img.discard(off, len).map(|()| 0),
                None,
            ),
            St::New(AioRequest::WriteZeroes { off, len, flags }) => self.sync_request(
                id,
                false,
                move |img| img.write_zeroes_with(off, len, flags).map(|()| 0),
                None,
            ),
            St::New(AioRequest::Flush) => {
                self.req(id).st = St::Job;
                self.job(id, false, |img| JobOut::Done(img.flush().map(|()| 0)));
            }
            st @ St::Write(_) => {
                self.req(id).st = st;
                self.write_batch(id);
            }
            _ => unreachable!("only new and deferred requests are ready"),
        }
    }

    /// A request carried out by the synchronous engine code on a helper (it may wait for
    /// claims there), then flushed for FUA.
    fn sync_request(
        &mut self,
        id: usize,
        fua: bool,
        work: impl FnOnce(&Image) -> Result<u64> + Send + 'static,
        buf: Option<IoBuf>,
    ) {
        self.req(id).started = true;
        self.req(id).st = St::Job;
        self.job(id, true, move |img| {
            let r = work(img);
            let r = match (r, fua) {
                (Ok(n), true) => img.flush().map(|()| n),
                (r, _) => r,
            };
            match buf {
                // Hand an empty write's buffer back through the read path's variant.
                Some(b) => JobOut::Read(r.map(|_| ()), b),
                None => JobOut::Done(r),
            }
        });
    }

    // ---- reads ----

    fn read_start(&mut self, id: usize, off: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        if len == 0 {
            return self.complete(id, Ok(0), Some(buf));
        }
        let gen = self.img.free_gen.load(Ordering::Acquire);
        if let Some(h) = self.img.fast_host(len, off) {
            self.req(id).st = St::Read(ReadSt {
                off,
                len,
                gen,
                tries: 0,
                fast: true,
            });
            let pieces = vec![Piece {
                at: 0,
                off: h,
                len: len as usize,
            }];
            return self.submit_op(id, SUB_PLAIN, AioOp::Read { buf, pieces });
        }
        self.read_resolve(id, off, buf, 0);
    }

    fn read_resolve(&mut self, id: usize, off: u64, mut buf: IoBuf, tries: u32) {
        let len = buf.len() as u64;
        let sync_read = |ex: &mut Exec, buf: IoBuf| {
            ex.req(id).st = St::Job;
            ex.job(id, false, move |img| {
                let mut buf = buf;
                let r = img.read_vectored_at(&mut buf.slices_mut(), off);
                JobOut::Read(r, buf)
            });
        };
        if tries >= 3 {
            // Raced with cluster reuse three times: the synchronous path pins clusters.
            return sync_read(self, buf);
        }
        let gen = self.img.free_gen.load(Ordering::Acquire);
        let exts = match self.img.resolve_fast(off, len) {
            Some(e) => Ok(e),
            None => self
                .img
                .lock()
                .and_then(|mut st| self.img.resolve(&mut st.meta, off, len)),
        };
        let exts = match exts {
            Ok(e) => e,
            Err(e) => return self.complete(id, Err(e), Some(buf)),
        };
        if exts
            .iter()
            .any(|e| matches!(e.src, Src::Backing | Src::Compressed(..)))
        {
            return sync_read(self, buf);
        }
        let mut pieces = Vec::with_capacity(exts.len());
        let mut at = 0usize;
        for e in exts.iter() {
            match e.src {
                Src::Host(h) => pieces.push(Piece {
                    at,
                    off: h,
                    len: e.len as usize,
                }),
                _ => buf.zero(at, e.len as usize),
            }
            at += e.len as usize;
        }
        self.req(id).st = St::Read(ReadSt {
            off,
            len,
            gen,
            tries,
            fast: false,
        });
        if pieces.is_empty() {
            return self.read_done(id, Ok(()), buf);
        }
        self.submit_op(id, SUB_PLAIN, AioOp::Read { buf, pieces });
    }

    fn read_done(&mut self, id: usize, result: std::io::Result<()>, buf: IoBuf) {
        let St::Read(r) = std::mem::replace(&mut self.req(id).st, St::Gone) else {
            unreachable!("a read's completion")
        };
        match result {
            // The lock-free path retries on the general one, which reports errors.
            Err(_) if r.fast => self.read_resolve(id, r.off, buf, 0),
            Err(e) => self.complete(
                id,
                Err(Error::Io {
                    context: format!("reading guest data at {:#x}", r.off),
                    source: e,
                }),
                Some(buf),
            ),
            Ok(()) if self.img.free_gen.load(Ordering::Acquire) == r.gen => {
                self.complete(id, Ok(r.len), Some(buf))
            }
            // A cluster may have been freed and reused meanwhile: read again.
            Ok(()) => self.read_resolve(id, r.off, buf, r.tries + 1),
        }
    }

    // ---- writes ----

    fn write_st(&mut self, id: usize) -> &mut WriteSt {
        match &mut self.req(id).st {
            St::Write(w) => w,
            _ => unreachable!("a write"),
        }
    }

    /// Whether a plan of this queue claims guest cluster `c` (its finish will retry the
    /// deferred requests).
    fn own_claim(&self, c: u64) -> bool {
        self.reqs
            .iter()
            .flatten()
            .filter_map(|r| r.claim)
            .any(|(first, n)| (first..first + n).contains(&c))
    }

    /// Plan and start the next batch of a write.
    fn write_batch(&mut self, id: usize) {
        let img = self.img.clone();
        let bits = self.bits;
        let w = self.write_st(id);
        let (g, rest) = (w.off + w.pos as u64, w.len - w.pos);
        let mut st = match img.lock() {
            Ok(st) => st,
            Err(e) => return self.fail_write(id, e),
        };
        if !w.detect_checked {
            w.detect_checked = true;
            let detect = st.policy.detect_zeroes;
            if detect != DetectZeroes::Off && w.buf.is_zero() {
                drop(st);
                let (off, len, fua) = (w.off, w.len as u64, w.fua);
                let buf = match std::mem::replace(&mut self.req(id).st, St::Gone) {
                    St::Write(w) => Arc::try_unwrap(w.buf).ok(),
                    _ => None,
                };
                let unmap = detect == DetectZeroes::Unmap;
                return self.sync_request(
                    id,
                    fua,
                    move |img| img.write_zeroes(off, len, unmap).map(|()| len),
                    buf,
                );
            }
        }
        let c = g >> bits;
        if st.claims.is_claimed(c) {
            drop(st);
            if self.own_claim(c) {
                self.deferred.push(id);
            } else {
                // Someone else's claim (a synchronous call, a helper): a helper waits for it.
                self.job(id, true, move |img| {
                    drop(img.lock_unclaimed(c));
                    JobOut::Unclaimed
                });
            }
            return;
        }
        let planned = st
            .meta
            .prepare_first_write()
            .and_then(|()| img.announce(&mut st, g, rest as u64, ChangeKind::Write))
            .and_then(|()| img.plan_write(&mut st, g, rest));
        let (plan, n) = match planned {
            Ok(p) => p,
            Err(e) => {
                drop(st);
                return self.fail_write(id, e);
            }
        };
        img.begin(&mut st, &plan);
        drop(st);
        let r = self.req(id);
        r.started = true;
        r.claim = plan.claim;
        r.failures = 0;
        let w = self.write_st(id);
        w.base = w.pos;
        w.pos += n;
        w.plan = Some(plan);
        self.exec_plan(id);
    }

    fn fail_write(&mut self, id: usize, e: Error) {
        let buf = self.take_buf(id);
        self.complete(id, Err(e), buf);
    }

    /// Hand a begun plan's host I/O to the backend (or to a helper when copy-on-write
    /// needs a backing file or decompression).
    fn exec_plan(&mut self, id: usize) {
        let align = self.align;
        let cheap_zero = self.img.storage.capabilities().zero_keep_allocated;
        let w = self.write_st(id);
        let plan = w.plan.as_ref().expect("begun plan");
        if !plan.has_io() {
            return self.finish_plan(id);
        }
        let blocking = plan.io.iter().any(|io| match io {
            HostIo::Write { pieces, .. } => pieces.iter().any(|p| {
                matches!(
                    p.fill,
                    Fill::Old {
                        src: Src::Backing | Src::Compressed(..),
                        ..
                    }
                )
            }),
            HostIo::Effect { .. } => false,
        });
        if blocking {
            let plan = Box::new(w.plan.take().expect("begun plan"));
            let mut data = vec![0u8; w.pos - w.base];
            w.buf.read_into(w.base, &mut data);
            return self.job(id, false, move |img| {
                let r = img.execute(&plan, &data);
                JobOut::Plan(plan, r)
            });
        }
        let (buf, base) = (w.buf.clone(), w.base);
        let ios = plan.io.clone();
        let mut ops: Vec<(u64, AioOp)> = Vec::new();
        let mut then: Vec<Then> = Vec::new();
        for io in ios {
            match io {
                HostIo::Write { host, pieces } => {
                    let steps = write_steps(host, &pieces, cheap_zero);
                    let mut these = Vec::new();
                    for step in &steps.steps {
                        if let Some((off, at, len)) = step.guest_only(&pieces) {
                            // Straight from the caller's buffer.
                            let pieces = vec![Piece {
                                at: base + at,
                                off,
                                len: len as usize,
                            }];
                            let buf = buf.clone();
                            these.push((SUB_PLAIN, AioOp::Write { buf, pieces }));
                            continue;
                        }
                        match step {
                            Step::Zero { off, len } => these.push((
                                SUB_PLAIN,
                                AioOp::WriteZeroes {
                                    off: *off,
                                    len: *len,
                                    mode: ZeroMode::KeepAllocated,
                                },
                            )),
                            Step::Run { off, range } => these.push(gather(
                                *off,
                                &pieces[range.clone()],
                                &buf,
                                base,
                                align,
                                &mut then,
                            )),
                        }
                    }
                    match steps.first {
                        // The rest waits for the zeroing (see `on_io`).
                        Some((off, len)) => {
                            then.push(Then::Submit(these));
                            ops.push((
                                then.len() as u64,
                                AioOp::WriteZeroes {
                                    off,
                                    len,
                                    mode: ZeroMode::KeepAllocated,
                                },
                            ));
                        }
                        None => ops.extend(these),
                    }
                }
                HostIo::Effect { off, len, effect } => ops.push((
                    SUB_ADVISORY,
                    match effect {
                        HostEffect::Discard => AioOp::Discard { off, len },
                        HostEffect::Anchor => AioOp::WriteZeroes {
                            off,
                            len,
                            mode: ZeroMode::KeepAllocated,
                        },
                    },
                )),
            }
        }
        // A plan covers at most MAX_BATCH clusters: sub-tags stay below SUB_ADVISORY.
        debug_assert!(then.len() < SUB_ADVISORY as usize);
        self.write_st(id).then = then;
        for (sub, op) in ops {
            self.submit_op(id, sub, op);
        }
    }

    /// Finish the current plan under the lock; then plan the next batch, flush for FUA, or
    /// complete.
    fn finish_plan(&mut self, id: usize) {
        let r = self.req(id);
        let result = match r.err.take() {
            Some(e) => Err(e),
            None => Ok(r.failures),
        };
        r.claim = None;
        let plan = self.write_st(id).plan.take().expect("begun plan");
        self.finish_with(id, plan, result);
    }

    fn finish_with(&mut self, id: usize, plan: Plan, result: Result<u64>) {
        let img = self.img.clone();
        self.req(id).claim = None;
        let r = img
            .lock()
            .and_then(|mut st| img.finish(&mut st, plan, result));
        // Claims ended: deferred writes may go on.
        self.ready.extend(self.deferred.drain(..));
        if let Err(e) = r {
            return self.fail_write(id, e);
        }
        let w = self.write_st(id);
        if w.pos < w.len {
            return self.write_batch(id);
        }
        let (fua, len) = (w.fua, w.len as u64);
        let buf = match std::mem::replace(&mut self.req(id).st, St::Job) {
            St::Write(w) => Arc::try_unwrap(w.buf).ok(),
            _ => None,
        };
        if fua {
            self.job(id, false, move |img| match buf {
                Some(b) => JobOut::Read(img.flush(), b),
                None => JobOut::Done(img.flush().map(|()| len)),
            });
        } else {
            self.complete(id, Ok(len), buf);
        }
    }

    // ---- completions ----

    fn on_io(&mut self, c: AioDone) {
        let id = (c.user >> 16) as usize;
        let sub = c.user & 0xffff;
        self.req(id).pending -= 1;
        if self.broken {
            return self.drop_if_idle(id);
        }
        if matches!(self.req(id).st, St::Read(_)) {
            let buf = c.buf.expect("a read hands its buffer back");
            return self.read_done(id, c.result, buf);
        }
        match (sub, c.result) {
            (SUB_ADVISORY, Err(_)) => self.req(id).failures += 1,
            (_, Err(e)) => {
                let r = self.req(id);
                if r.err.is_none() {
                    r.err = Some(Error::Io {
                        context: "writing guest data".into(),
                        source: e,
                    });
                }
            }
            (SUB_PLAIN | SUB_ADVISORY, Ok(())) => {}
            (k, Ok(())) => {
                // A first step is done: submit what waited for it.
                let next = std::mem::replace(
                    &mut self.write_st(id).then[k as usize - 1],
                    Then::Submit(Vec::new()),
                );
                match next {
                    // The old data of a copy-on-write run is in: write the run.
                    Then::WriteRead { host, len } => {
                        let buf = Arc::new(c.buf.expect("a read hands its buffer back"));
                        let pieces = vec![Piece {
                            at: 0,
                            off: host,
                            len,
                        }];
                        self.submit_op(id, SUB_PLAIN, AioOp::Write { buf, pieces });
                    }
                    Then::Submit(ops) => {
                        for (sub, op) in ops {
                            self.submit_op(id, sub, op);
                        }
                    }
                }
            }
        }
        if self.req(id).pending == 0 {
            self.finish_plan(id);
        }
    }

    fn drop_if_idle(&mut self, id: usize) {
        if self.req(id).pending == 0 {
            self.complete(id, Err(failed()), None);
        }
    }

    fn on_job(&mut self, j: JobDone) {
        let id = j.id;
        self.req(id).pending -= 1;
        if self.broken {
            return self.drop_if_idle(id);
        }
        match j.out {
            JobOut::Done(r) => self.complete(id, r, None),
            JobOut::Read(r, buf) => {
                let n = buf.len() as u64;
                self.complete(id, r.map(|()| n), Some(buf))
            }
            JobOut::Plan(plan, r) => {
                self.req(id).claim = None;
                self.finish_with(id, *plan, r)
            }
            JobOut::Unclaimed => {
                if self.closing && !self.req(id).started {
                    let buf = self.take_buf(id);
                    self.complete(
                        id,
                        Err(errno_error(ECANCELED, "cancelled: the image was closed")),
                        buf,
                    );
                } else {
                    self.write_batch(id)
                }
            }
        }
    }
}

/// What follows a first operation (its sub-tag is its index here plus one).
enum Then {
    /// Write the buffer the read handed back at `host` (a copy-on-write run).
    WriteRead {
        /// Host byte offset.
        host: u64,
        /// Length in bytes.
        len: usize,
    },
    /// Submit these (after a new range was zeroed whole).
    Submit(Vec<(u64, AioOp)>),
}

/// Turn a run of pieces into one owned buffer written at host offset `start`: guest bytes
/// copied in, zeros left, old host data read in first (the write then follows its read,
/// see `on_io`). Returns the operation to submit.
fn gather(
    start: u64,
    run: &[crate::plan::Piece],
    guest: &IoBuf,
    base: usize,
    align: usize,
    then: &mut Vec<Then>,
) -> (u64, AioOp) {
    let len: u64 = run.iter().map(|p| p.len).sum();
    let mut buf = match IoBuf::new(len as usize, align) {
        Ok(b) => b,
        Err(_) => IoBuf::new(len as usize, 1).expect("memory for a copy-on-write run"),
    };
    let mut reads = Vec::new();
    let mut at = 0usize;
    for p in run {
        match p.fill {
            Fill::Guest { at: g } => {
                let mut o = at;
                for s in guest.range(base + g, p.len as usize) {
                    buf.write_from(o, s);
                    o += s.len();
                }
            }
            Fill::Zeroes => {}
            Fill::Old { src: Src::Zero, .. } => {}
            Fill::Old {
                src: Src::Host(h), ..
            } => reads.push(Piece {
                at,
                off: h,
                len: p.len as usize,
            }),
            Fill::Old { .. } => unreachable!("blocking sources run on a helper"),
        }
        at += p.len as usize;
    }
    if reads.is_empty() {
        let pieces = vec![Piece {
            at: 0,
            off: start,
            len: len as usize,
        }];
        let buf = Arc::new(buf);
        (SUB_PLAIN, AioOp::Write { buf, pieces })
    } else {
        then.push(Then::WriteRead {
            host: start,
            len: len as usize,
        });
        (then.len() as u64, AioOp::Read { buf, pieces: reads })
    }
}

fn failed() -> Error {
    Error::Failed(
        "an internal error interrupted a request; the handle refuses all I/O (reopen the image)"
            .into(),
    )
}
