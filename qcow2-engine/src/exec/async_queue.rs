//! The asynchronous queue of an image: requests submitted without blocking, carried out on
//! the queue's own thread (`async_exec.rs`) over io_uring or a thread pool, and reaped
//! later — through an eventfd an event loop polls, a reap call, or a callback.
//!
//! The contract (also in `include/qcowprov.h`):
//! - **Submission** only queues: checks the arguments, counts the request against the
//!   queue depth (`EAGAIN` when full) and wakes the queue's thread. Planning, metadata cache
//!   misses and barriers happen on the queue's thread (or its helpers), never on the
//!   caller's.
//! - **Completion**: every accepted request completes exactly once, with its byte count or
//!   an error; it counts against the depth until reaped (or handed to the callback).
//! - **Overlapping requests** in flight together complete in any order and may apply in
//!   any order (as in the block layer); requests that do not overlap never interfere.
//! - **Flush** covers every request that completed before the flush was submitted; requests
//!   still in flight when it is submitted may or may not be covered. FUA covers its own
//!   write.
//! - **Shutdown** (close): requests not yet started complete with `ECANCELED`; started
//!   ones run to their end; completions nobody reaped are dropped (a callback still gets
//!   them). After it, the queue never touches a request's memory again.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use host_io::aio::{io_uring_supported, AioKind, EventFd, IoBuf, Notify};
use host_io::Storage;
use qcow2_format::Geometry;

use crate::error::{invalid_arg, Error, Result};
use crate::image::{Image, OpenOptions};
use crate::request::zero::ZeroFlags;

/// Largest `aio-queue-depth`.
pub const MAX_DEPTH: u32 = 65536;
/// `aio-queue-depth` when not given.
const DEFAULT_DEPTH: u32 = 1024;

pub(crate) use libc::ECANCELED;
use libc::{EAGAIN, EBUSY, EDEADLK, EROFS, ESHUTDOWN};

/// An error with an errno and a message.
pub(crate) fn errno_error(errno: i32, what: impl Into<String>) -> Error {
    Error::Io {
        context: what.into(),
        source: std::io::Error::from_raw_os_error(errno),
    }
}

/// The `aio` open option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring where the kernel allows it and the storage is a file or block device,
    /// else a thread pool.
    #[default]
    Auto,
    /// io_uring, or fail the open.
    IoUring,
    /// A thread pool (QEMU's `aio=threads`).
    Threads,
}

impl AioMode {
    /// Parse `auto`, `io_uring` or `threads`.
    pub fn parse(v: &str) -> Result<AioMode> {
        match v {
            "auto" => Ok(AioMode::Auto),
            "io_uring" => Ok(AioMode::IoUring),
            "threads" => Ok(AioMode::Threads),
            "native" => Err(invalid_arg!(
                "aio: 'native' (Linux AIO) is not implemented; use io_uring, threads or auto"
            )),
            _ => Err(invalid_arg!("aio: '{v}' is not auto, io_uring or threads")),
        }
    }
}

impl fmt::Display for AioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AioMode::Auto => "auto",
            AioMode::IoUring => "io_uring",
            AioMode::Threads => "threads",
        })
    }
}

/// The effective `aio-queue-depth`.
pub(crate) fn depth_of(opts: &OpenOptions) -> u32 {
    if opts.aio_queue_depth == 0 {
        DEFAULT_DEPTH
    } else {
        opts.aio_queue_depth
    }
}

/// The alignment asynchronous requests need (direct I/O's, else 1).
pub(crate) fn alignment_of(img: &Image) -> u64 {
    if img.opts.direct {
        u64::from(img.storage.capabilities().io_alignment.max(1))
    } else {
        1
    }
}

/// Whether this process runs under valgrind (its preload libraries are in LD_PRELOAD).
/// valgrind 3.19 runs io_uring_enter's wait while holding its big lock, so no other thread
/// runs and the queue deadlocks; `aio=auto` takes the thread pool there (an explicit
/// `aio=io_uring` is honoured).
fn under_valgrind() -> bool {
    std::env::var_os("LD_PRELOAD").is_some_and(|v| v.to_string_lossy().contains("/vgpreload_"))
}

/// The backend an image opened with `opts` on `storage` gets.
pub(crate) fn choose_backend(
    storage: &Arc<dyn Storage>,
    opts: &OpenOptions,
    geo: Geometry,
) -> Result<AioKind> {
    let why_not = match storage.as_file() {
        None => Some("the storage is not a file or block device".to_string()),
        Some(_) if !io_uring_supported() => {
            Some("this kernel or container does not allow io_uring".to_string())
        }
        Some(f) => {
            let align = u64::from(f.capabilities().io_alignment);
            // Direct I/O smaller than a block is read-modify-written by the storage under
            // its own lock; kernel writes beside it could lose an update.
            (f.is_direct() && geo.cluster_size() < align).then(|| {
                format!(
                    "the cluster size ({}) is below the direct I/O alignment ({align})",
                    geo.cluster_size()
                )
            })
        }
    };
    match (opts.aio, why_not) {
        (AioMode::Threads, _) | (AioMode::Auto, Some(_)) => Ok(AioKind::Threads),
        (AioMode::Auto, None) if under_valgrind() => Ok(AioKind::Threads),
        (_, None) => Ok(AioKind::IoUring),
        (AioMode::IoUring, Some(why)) => Err(Error::Unsupported(format!("aio=io_uring: {why}"))),
    }
}

/// An asynchronous request.
#[derive(Debug)]
pub enum AioRequest {
    /// Read guest bytes at `off` into `buf` (its length); it comes back filled.
    Read {
        /// Guest offset.
        off: u64,
        /// Where the bytes go.
        buf: IoBuf,
    },
    /// Write `buf` at guest offset `off`; with `fua`, durable before it completes.
    Write {
        /// Guest offset.
        off: u64,
        /// The bytes.
        buf: IoBuf,
        /// Force unit access.
        fua: bool,
    },
    /// [`Image::discard`].
    Discard {
        /// Guest offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// [`Image::write_zeroes_with`].
    WriteZeroes {
        /// Guest offset.
        off: u64,
        /// Length.
        len: u64,
        /// May-unmap, no-fallback.
        flags: ZeroFlags,
    },
    /// [`Image::flush`]: every request completed before this one was submitted is durable
    /// when it completes.
    Flush,
}

impl AioRequest {
    fn range(&self) -> Option<(u64, u64, bool)> {
        match self {
            AioRequest::Read { off, buf } => Some((*off, buf.len() as u64, false)),
            AioRequest::Write { off, buf, .. } => Some((*off, buf.len() as u64, true)),
            AioRequest::Discard { off, len } | AioRequest::WriteZeroes { off, len, .. } => {
                Some((*off, *len, true))
            }
            AioRequest::Flush => None,
        }
    }

    fn buf(&self) -> Option<&IoBuf> {
        match self {
            AioRequest::Read { buf, .. } | AioRequest::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// A completed request.
#[derive(Debug)]
pub struct AioCompletion {
    /// The tag it was submitted with.
    pub user: u64,
    /// Bytes read or written (0 for discard, write-zeroes and flush), or the error.
    pub result: Result<u64>,
    /// A read's buffer, filled; a write's buffer, handed back.
    pub buf: Option<IoBuf>,
}

/// A completion callback (see [`AioQueue::set_callback`]).
pub type AioCallback = Arc<dyn Fn(AioCompletion) + Send + Sync>;

pub(crate) struct Submissions {
    pub(crate) reqs: Vec<(u64, AioRequest)>,
    pub(crate) closing: bool,
}

/// What the submitters, the queue's thread and the reapers share.
pub(crate) struct QShared {
    pub(crate) img: Arc<Image>,
    pub(crate) sub: Mutex<Submissions>,
    /// The queue's thread is about to wait (or waits): a submitter must wake it.
    pub(crate) sleeping: AtomicBool,
    pub(crate) wake: Mutex<Option<Arc<dyn Notify>>>,
    done: Mutex<VecDeque<AioCompletion>>,
    done_cv: Condvar,
    /// Threads waiting on `done_cv` (changed under `done`'s lock): a post with nobody
    /// waiting skips the wake-up, a futex call per batch.
    done_waiters: AtomicUsize,
    done_fd: EventFd,
    /// Submitted and not yet reaped.
    outstanding: AtomicUsize,
    depth: usize,
    kind: AioKind,
    /// Alignment direct I/O asks of buffers, offsets and lengths (1 when buffered).
    align: u64,
    /// The executor ended (it stopped, or failed to start its backend).
    pub(crate) exited: AtomicBool,
}

impl QShared {
    fn lock_done(&self) -> MutexGuard<'_, VecDeque<AioCompletion>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_sub(&self) -> MutexGuard<'_, Submissions> {
        self.sub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand completions to the reapers (the eventfd becomes readable if it was not).
    pub(crate) fn post(&self, batch: &mut Vec<AioCompletion>) {
        if batch.is_empty() {
            return;
        }
        let mut q = self.lock_done();
        let was_empty = q.is_empty();
        q.extend(batch.drain(..));
        if was_empty {
            self.done_fd.signal();
        }
        let waiters = self.done_waiters.load(Ordering::Relaxed) > 0;
        drop(q);
        if waiters {
            self.done_cv.notify_all();
        }
    }

    /// The executor ended: wake every waiter (set under the lock they check it with, so
    /// none can miss it).
    pub(crate) fn mark_exited(&self) {
        {
            let _q = self.lock_done();
            self.exited.store(true, Ordering::Release);
        }
        self.done_cv.notify_all();
    }

    /// Wait on `done_cv` (at most `timeout`), counted in `done_waiters`.
    fn wait_done<'a>(
        &self,
        q: MutexGuard<'a, VecDeque<AioCompletion>>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, VecDeque<AioCompletion>> {
        self.done_waiters.fetch_add(1, Ordering::Relaxed);
        let q = match timeout {
            None => self.done_cv.wait(q).unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                self.done_cv
                    .wait_timeout(q, t)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
        self.done_waiters.fetch_sub(1, Ordering::Relaxed);
        q
    }

    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            if let Some(w) = &*self.wake.lock().unwrap_or_else(|e| e.into_inner()) {
                w.notify();
            }
        }
    }
}

/// The asynchronous queue of an image (see the module documentation for the contract).
/// One per image is the intended use; it keeps the image alive (`Arc`) until dropped.
pub struct AioQueue {
    shared: Arc<QShared>,
    exec: Mutex<Option<JoinHandle<()>>>,
    callback: Mutex<Option<(JoinHandle<()>, ThreadId)>>,
    cb_stop: Arc<AtomicBool>,
}

impl fmt::Debug for AioQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioQueue")
            .field("kind", &self.shared.kind)
            .field("outstanding", &self.in_flight())
            .finish()
    }
}

impl AioQueue {
    /// Start the queue of `img`: its thread and its backend (the one chosen at open,
    /// [`ImageInfo::aio`](crate::ImageInfo::aio)).
    pub fn start(img: Arc<Image>) -> Result<AioQueue> {
        let kind = img.aio;
        let align = alignment_of(&img);
        let depth = depth_of(&img.opts) as usize;
        let backend = host_io::aio::open_backend(kind, img.storage.clone(), depth.min(64))
            .map_err(Error::io(format!("starting the {kind} backend")))?;
        let shared = Arc::new(QShared {
            img,
            sub: Mutex::new(Submissions {
                reqs: Vec::new(),
                closing: false,
            }),
            sleeping: AtomicBool::new(false),
            wake: Mutex::new(Some(backend.notifier())),
            done: Mutex::new(VecDeque::new()),
            done_cv: Condvar::new(),
            done_waiters: AtomicUsize::new(0),
            done_fd: EventFd::new(true).map_err(Error::io("creating the completion eventfd"))?,
            outstanding: AtomicUsize::new(0),
            depth,
            kind,
            align,
            exited: AtomicBool::new(false),
        });
        let s = shared.clone();
        let exec = std::thread::Builder::new()
            .name("qcowprov-queue".into())
            .spawn(move || super::async_exec::run(s, backend))
            .map_err(Error::io("starting the queue's thread"))?;
        Ok(AioQueue {
            shared,
            exec: Mutex::new(Some(exec)),
            callback: Mutex::new(None),
            cb_stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.shared.img
    }

    /// The backend in use.
    pub fn kind(&self) -> AioKind {
        self.shared.kind
    }

    /// Requests the queue takes before they are reaped.
    pub fn depth(&self) -> usize {
        self.shared.depth
    }

    /// The alignment direct I/O asks of buffers, offsets and lengths (1 when buffered).
    pub fn alignment(&self) -> u64 {
        self.shared.align
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    /// Check a request before it is queued.
    fn check(&self, req: &AioRequest) -> Result<()> {
        let img = &self.shared.img;
        if let Some((off, len, writes)) = req.range() {
            img.check_range(off, len)?;
            if writes && img.read_only {
                return Err(errno_error(EROFS, "image is read-only"));
            }
        }
        if let Some(buf) = req.buf() {
            let a = self.shared.align;
            if a > 1 && (!buf.is_aligned(a as usize) || req.range().is_some_and(|r| r.0 % a != 0)) {
                return Err(invalid_arg!(
                    "with cache.direct=on, buffer addresses, lengths and offsets must be \
                     multiples of {a} bytes"
                ));
            }
        }
        Ok(())
    }

    /// Queue a request tagged `user`. Errors (nothing queued, no completion): `EAGAIN`
    /// when the queue is full, `EINVAL` for a range past the end or (with direct I/O) an
    /// unaligned buffer, `EROFS` for a write to a read-only image, `ESHUTDOWN` after
    /// shutdown.
    pub fn submit(&self, user: u64, req: AioRequest) -> Result<()> {
        let (n, e) = self.submit_many(std::iter::once((user, req)));
        match e {
            Some(e) => Err(e),
            None => {
                debug_assert_eq!(n, 1);
                Ok(())
            }
        }
    }

    /// Queue requests in order until one is refused, waking the queue's thread once.
    /// Returns how many were queued and the refusal, if any.
    pub fn submit_many(
        &self,
        reqs: impl IntoIterator<Item = (u64, AioRequest)>,
    ) -> (usize, Option<Error>) {
        let mut n = 0;
        let mut err = None;
        {
            let mut sub = self.shared.lock_sub();
            for (user, req) in reqs {
                if sub.closing || self.shared.exited.load(Ordering::Acquire) {
                    err = Some(errno_error(ESHUTDOWN, "the queue is shut down"));
                    break;
                }
                if let Err(e) = self.check(&req) {
                    err = Some(e);
                    break;
                }
                let out = self.shared.outstanding.load(Ordering::Acquire);
                if out >= self.shared.depth {
                    err = Some(errno_error(
                        EAGAIN,
                        format!(
                            "the queue is full: {out} requests submitted and not reaped \
                             (aio-queue-depth={})",
                            self.shared.depth
                        ),
                    ));
                    break;
                }
                self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
                sub.reqs.push((user, req));
                n += 1;
            }
        }
        if n > 0 {
            self.shared.wake();
        }
        (n, err)
    }

    /// The descriptor to poll: readable while completions wait to be reaped.
    pub fn fd(&self) -> RawFd {
        self.shared.done_fd.as_raw_fd()
    }

    /// Move up to `max` completions into `out`; returns how many. Never blocks.
    pub fn reap(&self, max: usize, out: &mut Vec<AioCompletion>) -> usize {
        let mut q = self.shared.lock_done();
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        if q.is_empty() {
            // Level-triggered: readable exactly while completions wait.
            self.shared.done_fd.drain();
        }
        drop(q);
        self.shared.outstanding.fetch_sub(n, Ordering::AcqRel);
        n
    }

    /// Wait until at least `min` completions wait to be reaped (at most `min` of what is
    /// in flight), or `timeout` passed. Returns how many wait.
    pub fn wait(&self, min: usize, timeout: Option<Duration>) -> usize {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut q = self.shared.lock_done();
        loop {
            let want = min.min(self.in_flight());
            if q.len() >= want || self.shared.exited.load(Ordering::Acquire) {
                return q.len();
            }
            q = match deadline {
                None => self.shared.wait_done(q, None),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return q.len();
                    }
                    self.shared.wait_done(q, Some(d - now))
                }
            };
        }
    }

    /// Deliver every completion to `cb` instead, on a thread of the queue's own (so the
    /// callback may call anything but [`shutdown`](Self::shutdown) and the image's close).
    /// Set once: a second call fails with `EBUSY`.
    pub fn set_callback(&self, cb: AioCallback) -> Result<()> {
        let mut slot = self.callback.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(errno_error(EBUSY, "a completion callback is already set"));
        }
        let shared = self.shared.clone();
        let stop = self.cb_stop.clone();
        let h = std::thread::Builder::new()
            .name("qcowprov-callback".into())
            .spawn(move || dispatch(&shared, &stop, &*cb))
            .map_err(Error::io("starting the callback thread"))?;
        let id = h.thread().id();
        *slot = Some((h, id));
        Ok(())
    }

    /// Whether the calling thread is this queue's callback thread.
    pub fn on_callback_thread(&self) -> bool {
        self.callback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(_, id)| *id == std::thread::current().id())
    }

    /// Stop: refuse new requests, cancel those not started (`ECANCELED`), let the others
    /// finish, stop the threads. Completions not reaped are dropped, except that a
    /// callback receives them. Fails with `EDEADLK` when called from the callback.
    pub fn shutdown(&self) -> Result<()> {
        let mut cb = self.callback.lock().unwrap_or_else(|e| e.into_inner());
        if cb
            .as_ref()
            .is_some_and(|(_, id)| *id == std::thread::current().id())
        {
            return Err(errno_error(
                EDEADLK,
                "the queue cannot be shut down (or its image closed) from its callback",
            ));
        }
        self.shared.lock_sub().closing = true;
        self.shared.sleeping.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(h) = self.exec.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        {
            // Under the lock the callback thread checks it with: it cannot miss the wake-up.
            let _q = self.shared.lock_done();
            self.cb_stop.store(true, Ordering::Release);
        }
        self.shared.mark_exited();
        if let Some((h, _)) = cb.take() {
            let _ = h.join();
        }
        let dropped = {
            let mut q = self.shared.lock_done();
            let n = q.len();
            q.clear();
            self.shared.done_fd.drain();
            n
        };
        self.shared.outstanding.fetch_sub(dropped, Ordering::AcqRel);
        Ok(())
    }
}

impl Drop for AioQueue {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The callback thread: reap and call until stopped with nothing left.
fn dispatch(shared: &QShared, stop: &AtomicBool, cb: &(dyn Fn(AioCompletion) + Send + Sync)) {
    loop {
        let batch: Vec<AioCompletion> = {
            let mut q = shared.lock_done();
            while q.is_empty() && !stop.load(Ordering::Acquire) {
                q = shared.wait_done(q, None);
            }
            if q.is_empty() {
                return;
            }
            let v: Vec<_> = q.drain(..).collect();
            shared.done_fd.drain();
            v
        };
        shared.outstanding.fetch_sub(batch.len(), Ordering::AcqRel);
        for c in batch {
            // A panicking callback must not stop the deliveries after it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(c)));
        }
    }
}
