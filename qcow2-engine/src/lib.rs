//! # qcow2-engine
//!
//! The qcow2 image engine on top of `qcow2-format` (structures) and `host-io` (storage):
//! create and open images, read and write at any offset, with metadata caches, a
//! refcount-based allocator that fills holes, copy-on-write over backing files, snapshots
//! and compressed clusters, and crash-safe write ordering.
//!
//! Concurrency: an [`Image`] is shared by reference between threads. One metadata lock
//! serializes metadata changes; reads and writes of clusters that are already allocated
//! do their data I/O outside it, with the clusters pinned so that they cannot be freed and
//! reallocated underneath.
#![forbid(unsafe_code)]

mod alloc;
mod backing;
mod cache;
mod check;
mod check_bitmaps;
mod compress;
mod create;
mod discard;
pub mod error;
mod host_end;
mod image;
mod l2map;
mod locking;
mod map;
mod meta;
mod open;
pub mod options;
pub mod policy;
mod read;
mod refcounts;
mod repair;
mod resize;
mod write;

pub use check::{CheckReport, Repair};
pub use create::{create, create_fd, create_on};
pub use error::{Error, Result};
pub use host_io::Locking;
pub use image::{Image, ImageInfo, OpenOptions};
pub use map::{BlockStatus, MapEntry};
pub use options::{CacheOptions, CreateOptions, Preallocation};
pub use policy::{DetectZeroes, DiscardOptions, Layer, Mode, Policy, Provision};
