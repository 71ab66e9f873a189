//! # qcow2-engine
//!
//! The qcow2 image engine on top of `qcow2-format` (structures) and `host-io` (storage):
//! create and open images, read and write at any offset, discard and write-zeroes under
//! QEMU's options or a provisioning mode, copy-on-write over backing files, snapshots and
//! compressed clusters, block status, check and repair, persistent dirty bitmaps kept up
//! to date (and safe across a crash).
//!
//! ## Where things live
//!
//! | folder / file | what |
//! |---|---|
//! | `image.rs` | the handle: open options, info, the plan / execute / commit frame |
//! | `request/` | guest requests, each planned under the lock: `read`, `write`, `zero` (discard and write-zeroes), `status` (block status, map), `claims` |
//! | `plan.rs` | a planned request as a value: host I/O, pins, claims, commit edits |
//! | `exec/` | executors that carry out plans (`sync`; `async_*`: the queue-depth API over io_uring or a thread pool), decompression |
//! | `meta/` | metadata components: header, mapping (L1, L2 cache, lock-free entry cache), refcounts, allocator and quarantine, write-back order, host-op queue, overlap regions, persistent bitmaps (`meta/bitmaps/`: exact bits, tables, write intent); the highest allocated offset |
//! | `provision/` | the discard / write-zeroes policy and the pure per-cluster decision |
//! | `integrity/` | the L1/L2 walker, check, repair |
//! | `lifecycle/` | open (and the image locks it takes), create, resize, backing files |
//! | `changes.rs` | the one point where every content change is announced (bitmaps marked, watchers told) |
//! | `bitmaps.rs` | persistent dirty bitmaps through the handle: list, add, remove, clear, enable, disable, merge, dirty extents |
//!
//! ## Locking, ordering and durability (the protocol, in one place)
//!
//! **Locks.** One mutex per image guards the metadata ([`image`]'s `State`: the
//! components, the policy, the claims, the change subscribers). Requests are planned under
//! it and carried out without it:
//! - *reads* of a single cluster first try the lock-free entry cache (a seqlock per slot,
//!   filled and invalidated under the lock); otherwise they resolve under the lock. The
//!   data is read without the lock and accepted only if the free generation did not move
//!   meanwhile (a freed cluster could have been reused); after three races the clusters
//!   are pinned instead.
//! - *writes* to owned clusters pin their host clusters and write without the lock;
//!   *allocating writes* allocate and claim their guest clusters under the lock, write the
//!   data (with copy-on-write pieces) without it, and commit the L2 entries under it.
//! - *discard and write-zeroes* edit entries and refcounts under the lock in batches of at
//!   most 512 clusters, then run host effects on kept clusters without it, claimed.
//! - A request touching a claimed guest cluster waits until the claim ends. Check, repair,
//!   resize and option changes wait until no claim is held.
//! - Lock order over a backing chain: an image's lock is never held while a backing
//!   file's lock is taken for I/O; backing files are read-only and are read without the
//!   overlay's lock (copy-on-write sources are read by the executor). Locks are never
//!   nested.
//! - Bitmap operations (add, remove, clear, enable, disable, merge) wait until no claim
//!   is held and no plan has host I/O in flight (`lock_idle`), so that every request begun
//!   before them is accounted for.
//! - Operations that wait on host I/O under the lock: cache misses and evictions,
//!   allocation that grows the refcount structures, table moves, barriers (flush, the
//!   quarantine release), deferred host discards, check and repair. Guest data I/O never
//!   runs under it, except the read of the rest of a subcluster an unaligned
//!   write-zeroes checks in `provision=` modes (QEMU-style options ask block status).
//! - A panic while the lock is held, or while a plan runs, fails the handle: every later
//!   call returns EIO and nothing half-updated is ever flushed.
//!
//! **Ordering** (QEMU's cache dependencies, plus a quarantine):
//! - allocation: refcount blocks counting new clusters are written and synced before any
//!   L2 slice pointing at them;
//! - data an L2 entry newly exposes (copy-on-write, a rewritten zero cluster) is synced
//!   before that entry's slice is written;
//! - a new table (L2, L1, refcount table or block) is written and synced before the entry
//!   or header that links it; the header moves in one sector write;
//! - freeing: a dropped reference waits in the quarantine; its refcount is subtracted only
//!   after one barrier made every L2/L1 change durable, so a cluster never holds new data
//!   while a durable entry still points at it. The quarantine is released at every flush,
//!   when it is large, and when allocation would grow the file past a slack of 1/16 of
//!   the virtual size;
//! - host discards of freed clusters run after that release, and are dropped if the
//!   cluster is reallocated first;
//! - persistent bitmaps (write intent, md's model): every content change is announced
//!   under the lock before it is planned (`changes.rs`), which marks the bitmaps in memory
//!   and, where a touched chunk (a sector of bitmap data) is not known to be set on disk,
//!   writes it as all ones and syncs (a new data cluster: refcount and content synced
//!   before the table entry that names it, synced again) before returning. So no data
//!   write, L2 edit or host effect of the request can reach the disk before the bits
//!   covering it; the on-disk bitmaps are a superset of every change that may have reached
//!   the disk, never flagged in use. Idle chunks are cleared lazily at a flush; close
//!   stores the exact bits after the final flush (clearing bits is safe once the data is
//!   durable). The directory changes by writing a new one, syncing, and switching the
//!   extension's 24-byte payload in one write (bit 0 cleared around it only where the
//!   payload straddles a sector, or a table must grow with the virtual size).
//!
//! **Durability.** `flush` releases the quarantine, issues deferred discards, writes every
//! dirty table in order and syncs: every write completed before it is durable. A crash
//! leaves leaks at worst (never a cluster referenced with a refcount below its uses), and
//! every persistent bitmap consistent and marking at least what changed. Bitmap
//! operations are durable when they return.
#![forbid(unsafe_code)]

mod bitmaps;
mod changes;
pub mod error;
mod exec;
mod image;
mod integrity;
mod lifecycle;
mod meta;
pub mod options;
mod plan;
pub mod provision;
mod request;

pub use bitmaps::{BitmapInfo, MAX_BITMAP_NAME};
pub use changes::{ChangeKind, ContentWatcher};
pub use error::{Error, Result};
pub use exec::async_queue::{AioCompletion, AioMode, AioQueue, AioRequest};
pub use host_io::aio::{AioKind, IoBuf};
pub use host_io::Locking;
pub use image::{Image, ImageInfo, ImageStats, OpenOptions};
pub use integrity::check::{CheckReport, Repair};
pub use lifecycle::backing::MAX_BACKING_DEPTH;
pub use lifecycle::create::{create, create_fd, create_on};
pub use options::{CacheOptions, CreateOptions, Preallocation};
pub use provision::policy::{DetectZeroes, DiscardOptions, Layer, Mode, Policy, Provision};
pub use request::status::{BlockStatus, MapEntry};
pub use request::zero::ZeroFlags;

/// The discard / write-zeroes policy types (also at the crate root).
pub mod policy {
    pub use crate::provision::policy::*;
}
