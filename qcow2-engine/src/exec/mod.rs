//! Executors: what carries out a plan's host I/O. `sync` runs it on the calling thread;
//! `compress` decodes compressed clusters for any of them.

pub(crate) mod compress;
pub(crate) mod sync;
