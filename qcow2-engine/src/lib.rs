//! # qcow2-engine
//!
//! The qcow2 image engine (metadata caches, allocator, refcounts, read/write, discard and
//! zero policy, check and map), built on `qcow2-format` and `host-io`. Filled by the
//! engine issue; empty until then.
#![forbid(unsafe_code)]
