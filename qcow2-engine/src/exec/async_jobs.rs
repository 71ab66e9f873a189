//! Helper threads of the asynchronous executor: they run what would block its thread —
//! requests carried out by the synchronous engine code (discard, write-zeroes, flush,
//! reads through a backing file), and plans whose copy-on-write sources need a backing
//! file or decompression. A pool starts threads as jobs wait (up to its maximum) and keeps
//! them until it is shut down.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
    stop: bool,
}

struct Inner {
    q: Mutex<Queue>,
    cv: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pool of helper threads.
pub(crate) struct Jobs {
    inner: Arc<Inner>,
    name: &'static str,
    max: usize,
    handles: Vec<JoinHandle<()>>,
}

impl Jobs {
    pub(crate) fn new(name: &'static str, max: usize) -> Jobs {
        Jobs {
            inner: Arc::new(Inner {
                q: Mutex::new(Queue::default()),
                cv: Condvar::new(),
            }),
            name,
            max: max.max(1),
            handles: Vec::new(),
        }
    }

    /// Run `job` on a helper thread. If no thread can be started, it runs on this one.
    pub(crate) fn spawn(&mut self, job: impl FnOnce() + Send + 'static) {
        let start = {
            let mut q = self.inner.lock();
            q.jobs.push_back(Box::new(job));
            let start = q.idle < q.jobs.len() && q.threads < self.max;
            if start {
                q.threads += 1;
            }
            start
        };
        if start {
            let inner = self.inner.clone();
            match std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || worker(&inner))
            {
                Ok(h) => self.handles.push(h),
                Err(_) => self.inner.lock().threads -= 1,
            }
        }
        self.inner.cv.notify_one();
        let orphan = {
            let mut q = self.inner.lock();
            if q.threads == 0 {
                q.jobs.pop_front()
            } else {
                None
            }
        };
        if let Some(job) = orphan {
            job();
        }
    }

    /// Let the threads finish the queued jobs, then stop them.
    pub(crate) fn shutdown(&mut self) {
        self.inner.lock().stop = true;
        self.inner.cv.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(inner: &Inner) {
    loop {
        let job = {
            let mut q = inner.lock();
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.stop {
                    q.threads -= 1;
                    return;
                }
                q.idle += 1;
                q = inner.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                q.idle -= 1;
            }
        };
        // A panicking job reports its own failure (the executor wraps jobs); the thread
        // goes on serving.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}
