//! # libqcowprov C ABI
//!
//! The only crate exporting `extern "C"` symbols: `libqcowprov.so.1` (plus a static
//! library and this rlib) and, generated from these sources by cbindgen, the committed
//! header `include/qcowprov.h`.
//!
//! Conventions, as in rustls-ffi and hyper's C API:
//! - an opaque handle, `struct qcowprov_image`, from `qcowprov_open`, freed by
//!   `qcowprov_close`; one handle may be used from several threads; every call checks
//!   the handle's tag word, so a closed or foreign handle gives `-EBADF` (`tag.rs`);
//! - functions return 0 (or a byte count) on success and a negative errno on failure,
//!   with a message for `qcowprov_last_error` on the calling thread;
//! - out-parameters are written only on success; NULL pointers give `-EINVAL`;
//! - structs passed by pointer start with `struct_size`, set by the caller;
//! - every export runs behind a panic boundary: a panic becomes `-EIO` with the message
//!   "internal error: ...", never an unwind into C.
//!
//! Layout: `error` (errno, last error, strerror), `boundary` (panics), `args` (argument
//! checks), `tag` (the handle's memory and its check), `handle`
//! (open/close/create/format/flush/resize/options), `io` (reads, writes, discard,
//! write-zeroes), `aio` (the asynchronous queue for event loops), `status` (block status),
//! `info`, `check`, `stats` (host request counters), `bitmaps` (persistent dirty bitmaps).

// Declaration order is the order of the header (cbindgen follows it): errors, the
// handle's lifetime, I/O, block status, info, check, stats, bitmaps.
mod error;

mod handle;

mod io;

mod aio;

mod status;

mod info;

mod check;

mod stats;

mod bitmaps;

mod args;
mod boundary;
mod tag;

pub use aio::{
    qcowprov_aio_discard, qcowprov_aio_fd, qcowprov_aio_flush, qcowprov_aio_in_flight,
    qcowprov_aio_pread, qcowprov_aio_preadv, qcowprov_aio_pwrite, qcowprov_aio_pwritev,
    qcowprov_aio_reap, qcowprov_aio_set_callback, qcowprov_aio_wait, qcowprov_aio_write_zeroes,
    QcowprovAioCb, QcowprovAioCompletion,
};
pub use bitmaps::{
    qcowprov_bitmap_add, qcowprov_bitmap_clear, qcowprov_bitmap_count, qcowprov_bitmap_dirty,
    qcowprov_bitmap_disable, qcowprov_bitmap_enable, qcowprov_bitmap_get, qcowprov_bitmap_merge,
    qcowprov_bitmap_remove, qcowprov_bitmap_warning, QcowprovBitmap, QCOWPROV_BITMAP_ADD_DISABLED,
    QCOWPROV_BITMAP_ENABLED, QCOWPROV_BITMAP_INCONSISTENT, QCOWPROV_BITMAP_IN_USE,
    QCOWPROV_BITMAP_NAME_MAX,
};
pub use check::{
    qcowprov_check, QcowprovCheckResult, QcowprovProgressCb, QCOWPROV_CHECK_FIX_ALL,
    QCOWPROV_CHECK_FIX_LEAKS,
};
pub use error::{qcowprov_last_error, qcowprov_strerror};
pub use handle::{
    qcowprov_close, qcowprov_create, qcowprov_flush, qcowprov_format, qcowprov_format_fd,
    qcowprov_open, qcowprov_open_fd, qcowprov_resize, qcowprov_set_options, qcowprov_version,
    QcowprovImage, QCOWPROV_OPEN_CHECK, QCOWPROV_OPEN_DIRECT, QCOWPROV_OPEN_FORCE_SHARE,
    QCOWPROV_OPEN_NO_BACKING, QCOWPROV_OPEN_RDONLY,
};
pub use info::{
    qcowprov_get_info, qcowprov_highest_offset, QcowprovDetectZeroes, QcowprovInfo,
    QcowprovProvision, QCOWPROV_AIO_IO_URING, QCOWPROV_AIO_THREADS, QCOWPROV_INFO_COMPRESSION_ZSTD,
    QCOWPROV_INFO_EXTENDED_L2, QCOWPROV_INFO_FORCE_SHARE, QCOWPROV_INFO_HAS_BACKING,
    QCOWPROV_INFO_LAZY_REFCOUNTS, QCOWPROV_INFO_LOCKED, QCOWPROV_INFO_READ_ONLY,
};
pub use io::{
    qcowprov_discard, qcowprov_pread, qcowprov_preadv, qcowprov_pwrite, qcowprov_pwritev,
    qcowprov_write_zeroes, QCOWPROV_WRITE_FUA, QCOWPROV_ZERO_MAY_UNMAP, QCOWPROV_ZERO_NO_FALLBACK,
};
pub use stats::{qcowprov_get_stats, QcowprovStats};
pub use status::{
    qcowprov_block_status, qcowprov_block_status_depth, QcowprovStatus, QCOWPROV_STATUS_ALLOCATED,
    QCOWPROV_STATUS_BACKING, QCOWPROV_STATUS_COMPRESSED, QCOWPROV_STATUS_DATA,
    QCOWPROV_STATUS_OFFSET_VALID, QCOWPROV_STATUS_ZERO,
};
