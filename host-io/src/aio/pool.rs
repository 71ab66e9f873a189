//! The thread-pool backend: workers call the [`Storage`] methods, so it works over any
//! storage (files, block devices, the in-memory, fault and crash backends). Also the
//! helper pool of the io_uring backend for what io_uring cannot take as it is.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::{AioBackend, AioDone, AioKind, AioOp, Notify};
use crate::storage::Storage;

#[derive(Default)]
struct State {
    jobs: VecDeque<(u64, AioOp)>,
    done: Vec<AioDone>,
    idle: usize,
    threads: usize,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    storage: Arc<dyn Storage>,
    notify: Arc<dyn Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Worker threads carrying out operations through the storage's synchronous methods.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    max: usize,
    handles: Vec<JoinHandle<()>>,
    /// Submitted, not yet handed back by `take_done`.
    pending: usize,
}

impl Pool {
    /// A pool of at most `max` threads (started when work waits and none is idle);
    /// `notify` is called after every completion.
    pub(crate) fn new(storage: Arc<dyn Storage>, max: usize, notify: Arc<dyn Notify>) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                storage,
                notify,
            }),
            max: max.max(1),
            handles: Vec::new(),
            pending: 0,
        }
    }

    pub(crate) fn submit(&mut self, user: u64, op: AioOp) {
        self.pending += 1;
        let spawn = {
            let mut st = self.shared.lock();
            st.jobs.push_back((user, op));
            let spawn = st.idle < st.jobs.len() && st.threads < self.max;
            if spawn {
                st.threads += 1;
            }
            spawn
        };
        if spawn {
            let shared = self.shared.clone();
            let h = std::thread::Builder::new()
                .name("qcowprov-aio".into())
                .spawn(move || worker(&shared));
            match h {
                Ok(h) => self.handles.push(h),
                Err(_) => self.shared.lock().threads -= 1,
            }
        }
        self.shared.work.notify_one();
        if self.shared.lock().threads == 0 {
            // Not even one worker could be started: fail the jobs rather than hang.
            let mut st = self.shared.lock();
            while let Some((user, op)) = st.jobs.pop_front() {
                st.done
                    .push(failed(user, op, io::Error::from_raw_os_error(libc::EAGAIN)));
            }
            drop(st);
            self.shared.notify.notify();
        }
    }

    /// Move completed operations into `out`; returns how many.
    pub(crate) fn take_done(&mut self, out: &mut Vec<AioDone>) -> usize {
        let mut st = self.shared.lock();
        let n = st.done.len();
        out.append(&mut st.done);
        self.pending -= n;
        n
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Workers finish the queued jobs before they stop: their memory is theirs until then.
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn failed(user: u64, op: AioOp, e: io::Error) -> AioDone {
    let buf = match op {
        AioOp::Read { buf, .. } => Some(buf),
        _ => None,
    };
    AioDone {
        user,
        result: Err(e),
        buf,
    }
}

fn worker(shared: &Shared) {
    loop {
        let (user, op) = {
            let mut st = shared.lock();
            loop {
                if let Some(j) = st.jobs.pop_front() {
                    break j;
                }
                if st.stop {
                    st.threads -= 1;
                    return;
                }
                st.idle += 1;
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle -= 1;
            }
        };
        let done = run(&*shared.storage, user, op);
        shared.lock().done.push(done);
        shared.notify.notify();
    }
}

/// Carry out one operation with the storage's synchronous methods.
pub(crate) fn run(storage: &dyn Storage, user: u64, op: AioOp) -> AioDone {
    if let Err(e) = op.validate() {
        return failed(user, op, e);
    }
    match op {
        AioOp::Read { mut buf, pieces } => {
            let mut result = Ok(());
            for p in &pieces {
                let mut parts = buf.range_mut(p.at, p.len);
                if let Err(e) = storage.read_vectored_at(&mut parts, p.off) {
                    result = Err(e);
                    break;
                }
            }
            AioDone {
                user,
                result,
                buf: Some(buf),
            }
        }
        AioOp::Write { buf, pieces } => {
            let mut result = Ok(());
            for p in &pieces {
                if let Err(e) = storage.write_vectored_at(&buf.range(p.at, p.len), p.off) {
                    result = Err(e);
                    break;
                }
            }
            AioDone {
                user,
                result,
                buf: None,
            }
        }
        AioOp::WriteZeroes { off, len, mode } => AioDone {
            user,
            result: storage.write_zeroes(off, len, mode).map(|_| ()),
            buf: None,
        },
        AioOp::Discard { off, len } => AioDone {
            user,
            result: storage.discard(off, len).map(|_| ()),
            buf: None,
        },
        AioOp::Flush => AioDone {
            user,
            result: storage.flush(),
            buf: None,
        },
    }
}

/// A flag and a condition variable: what the owner of a [`PoolBackend`] waits on.
#[derive(Default)]
struct Signal {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Notify for Signal {
    fn notify(&self) {
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// [`AioKind::Threads`]: a [`Pool`] and the signal its owner waits on.
pub(crate) struct PoolBackend {
    pool: Pool,
    signal: Arc<Signal>,
}

impl PoolBackend {
    pub(crate) fn new(storage: Arc<dyn Storage>, max: usize) -> PoolBackend {
        let signal = Arc::new(Signal::default());
        PoolBackend {
            pool: Pool::new(storage, max, signal.clone()),
            signal,
        }
    }
}

impl AioBackend for PoolBackend {
    fn kind(&self) -> AioKind {
        AioKind::Threads
    }

    fn submit(&mut self, user: u64, op: AioOp) {
        self.pool.submit(user, op);
    }

    fn poll(&mut self, wait: bool, out: &mut Vec<AioDone>) -> io::Result<()> {
        loop {
            // Clear the flag before looking: a completion or wake after this sets it again.
            let was_set =
                std::mem::take(&mut *self.signal.set.lock().unwrap_or_else(|e| e.into_inner()));
            if self.pool.take_done(out) > 0 || !wait || was_set {
                return Ok(());
            }
            let mut set = self.signal.set.lock().unwrap_or_else(|e| e.into_inner());
            while !*set {
                set = self.signal.cv.wait(set).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn notifier(&self) -> Arc<dyn Notify> {
        self.signal.clone()
    }

    fn in_flight(&self) -> usize {
        self.pool.pending()
    }
}
