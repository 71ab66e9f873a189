//! Host I/O for libqcowprov: the storage under a qcow2 image, behind one trait.
//!
//! # The trait
//! [`Storage`] is what the engine needs from a file or block device: positioned and
//! vectored read/write (reads past the end return zeros), `flush` (fdatasync), length,
//! `set_len`, `allocate` (`fallocate(0)`), advisory [`discard`](Storage::discard), and
//! [`write_zeroes`](Storage::write_zeroes) with a [`ZeroMode`]: `Unmap` may release the
//! range, `KeepAllocated` must leave it allocated ("anchor"); no fallback ever turns
//! `KeepAllocated` into a release. The primitive that did the zeroing is returned as a
//! [`ZeroMethod`]; [`Capabilities`] says what the backend can do as far as probed.
//!
//! # Backends
//! * [`FileStorage`]: regular files and block devices, opened by path or from a descriptor
//!   the caller already has ([`FileOptions`]: read-only, `O_DIRECT`, create/truncate, image
//!   locks). Files use `fallocate` (`PUNCH_HOLE`, `ZERO_RANGE`,
//!   `FALLOC_FL_WRITE_ZEROES`, mode 0); devices use `BLKDISCARD`, `BLKZEROOUT`,
//!   `BLKGETSIZE64`, `BLKSSZGET` and sysfs queue limits. In direct mode any offset/length
//!   works: unaligned requests are bounced through an [`AlignedBuf`] with read-modify-write
//!   of edge blocks.
//! * [`MemStorage`]: sparse in-memory storage tracking allocation per 4 KiB block, with
//!   configurable capabilities ([`MemOptions`]) to drive the engine down every fallback.
//! * [`FaultyStorage`]: wraps any storage and injects errno failures ([`Fault`]): fail the
//!   n-th operation of a kind, fail from the n-th on, `ENOSPC` beyond an offset, short
//!   writes. Operation counters let a test fail at every position in turn.
//! * [`CrashStorage`]: records every mutation and flush over an in-memory image and
//!   rebuilds the image after a crash at any operation under a [`CrashPolicy`].
//!
//! `Arc<S>` and `Box<S>` implement [`Storage`] too, so a test can hand the engine one handle
//! and keep another (e.g. to call [`CrashStorage::crash_image`] afterwards).
//!
//! # Probing
//! Each host primitive is tried when first needed and its availability remembered in an
//! atomic (sticky, like QEMU's `has_discard`/`has_write_zeroes`): `ENOTSUP`/`EOPNOTSUPP`/
//! `ENOTTY`/`ENOSYS` disable it for the life of the storage, `EINVAL` only makes that call
//! fall back, other errors are returned. The fallback chains are documented in
//! `file_zero.rs`; in short, for `KeepAllocated` on a file:
//! `FALLOC_FL_WRITE_ZEROES` (range inside the file) → `ZERO_RANGE` → punch + `fallocate(0)`
//! → zero buffers written in 1 MiB chunks. [`FileOptions::disabled`] and
//! [`FileStorage::disable_primitive`] force a path.
//!
//! # Crash model
//! A flush is a barrier. The image after a crash before operation `n` holds every
//! operation issued before the last flush preceding `n`; the unflushed operations before
//! `n` are all dropped, all kept, a seeded random subset kept, or all kept but the last
//! write torn at a 512-byte sector boundary ([`CrashPolicy`]). Randomness comes from the
//! self-contained [`SplitMix64`], so a failing seed reproduces.
//!
//! # Image locks
//! A [`FileStorage`] can hold QEMU's image locks ([`LockRequest`], [`Locking`]): byte-range
//! open-file-description locks on bytes 100.. and 200.. of the file, taken at open (before
//! any truncation) and released when the storage is dropped, so this library and QEMU's
//! tools exclude each other. A refused open is an `io::Error` holding a [`LockConflict`]
//! (errno [`LOCK_CONFLICT_ERRNO`]). The protocol is described in `lock.rs`.
//!
//! # Errors
//! I/O paths return `io::Error::from_raw_os_error(errno)` unchanged so the C API can
//! report errno. Where context (such as a path) is added, it is wrapped in a
//! [`ContextError`]; [`raw_os_error_of`] finds the errno through the wrapper, and
//! [`error_text`] words an error as a C library would (no " (os error N)" suffix).
//!
//! # Asynchronous I/O
//! [`aio`]: operations submitted with a tag and reaped later, over io_uring (files and
//! block devices) or a thread pool (any storage); see the module for the contract.
//!
//! `unsafe` code lives in the private `sys` module (thin wrappers over `fallocate`,
//! block-device ioctls, `lseek`, `preadv`/`pwritev`, `fcntl` locks and flags, and
//! `strerror_r`) and in three modules of `aio` that allow it on their `mod` line:
//! `uring` (io_uring submissions), `eventfd` (the eventfd syscalls) and `buf` (the caller
//! memory an [`aio::IoBuf`] may lend to the kernel), each block with a SAFETY comment. The
//! crate denies `unsafe_code` everywhere else.
//!
//! # Test backends
//! [`MemStorage`], [`FaultyStorage`] and [`CrashStorage`] exist with the `testing` feature
//! only (the engine's and the C API's tests turn it on): a production build of the library
//! carries none of them.
#![deny(unsafe_code)]

pub mod aio;
mod aligned_buf;
mod blockdev;
#[cfg(feature = "testing")]
mod crash;
mod error;
#[cfg(feature = "testing")]
mod faulty;
mod file;
mod file_io;
mod file_zero;
mod forward;
mod lock;
#[cfg(feature = "testing")]
mod mem;
mod op;
mod prng;
mod probe;
mod storage;
#[allow(unsafe_code)] // the home of system calls (io_uring's and eventfd's are in `aio`)
mod sys;

pub use aligned_buf::AlignedBuf;
#[cfg(feature = "testing")]
pub use crash::{CrashPolicy, CrashStorage, OpRecord, TORN_SECTOR};
pub use error::{error_text, raw_os_error_of, with_context, ContextError};
#[cfg(feature = "testing")]
pub use faulty::{Fault, FaultyStorage};
pub use file::{FileOptions, FileStorage, Primitive};
pub use lock::{
    LockConflict, LockRequest, Locking, Perms, LOCK_CONFLICT_ERRNO, LOCK_PERM_BASE,
    LOCK_SHARED_BASE,
};
#[cfg(feature = "testing")]
pub use mem::{MemOptions, MemStorage, DISCARD_FILL, MEM_BLOCK_SIZE};
pub use op::OpKind;
pub use prng::SplitMix64;
pub use storage::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};
