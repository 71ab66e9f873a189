//! Executors: what carries out a plan's host I/O. `sync` runs it on the calling thread;
//! the asynchronous queue (`async_queue`: submission, completion, the public API) runs
//! requests on its own thread (`async_exec`), over an io_uring or thread-pool backend,
//! with helper threads for what blocks (`async_jobs`); `compress` decodes compressed
//! clusters for any of them; `host_write` cuts a planned host write into host requests
//! for both.

pub(crate) mod async_exec;
pub(crate) mod async_jobs;
pub(crate) mod async_queue;
pub(crate) mod compress;
pub(crate) mod host_write;
pub(crate) mod sync;
