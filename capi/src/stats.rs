//! Statistics of an open image (`struct qcowprov_stats`): what it has done on the host, so
//! a program can see what a provisioning policy costs there.

use std::ffi::c_int;
use std::mem::{offset_of, size_of};

use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::handle::{image, QcowprovImage};

/// What an image handle has done on the host since `qcowprov_open`, filled by
/// `qcowprov_get_stats`. Set `struct_size = sizeof(struct qcowprov_stats)` before the call.
///
/// Counts are of requests as the library issued them to the host file or device (adjacent
/// ranges merged into one request count once), whether or not the host carried them out.
/// `qcowprov_create` and a backing file's own requests are not counted.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QcowprovStats {
    /// Set by the caller to `sizeof(struct qcowprov_stats)`; left unchanged.
    pub struct_size: u32,
    /// Reserved; written as 0.
    pub _reserved: u32,
    /// Host flushes: fdatasync on files, a cache flush on block devices. Includes the
    /// ones the library issues to order metadata updates, not only `qcowprov_flush`.
    pub host_flushes: u64,
    /// Host discards: punch hole on files, BLKDISCARD on block devices.
    pub host_discards: u64,
    /// Host write-zeroes: a range zeroed and kept allocated (anchored), or zeroed with
    /// leave to release it.
    pub host_zeroes: u64,
    /// Host discards or write-zeroes that failed (advisory: the image stays correct, the
    /// host just keeps the space or the old bytes).
    pub host_op_failures: u64,
    /// Releases of the freed-cluster quarantine (each one barrier): freed clusters wait
    /// there until one flush makes the entries that dropped them durable.
    pub quarantine_releases: u64,
    /// Cluster references waiting in the quarantine now.
    pub quarantined: u64,
    /// First byte past every allocated host cluster: the file length the image needs.
    pub allocation_end: u64,
}

const_assert_eq!(size_of::<QcowprovStats>(), 64);
const_assert_eq!(offset_of!(QcowprovStats, struct_size), 0);
const_assert_eq!(offset_of!(QcowprovStats, _reserved), 4);
const_assert_eq!(offset_of!(QcowprovStats, host_flushes), 8);
const_assert_eq!(offset_of!(QcowprovStats, host_discards), 16);
const_assert_eq!(offset_of!(QcowprovStats, host_zeroes), 24);
const_assert_eq!(offset_of!(QcowprovStats, host_op_failures), 32);
const_assert_eq!(offset_of!(QcowprovStats, quarantine_releases), 40);
const_assert_eq!(offset_of!(QcowprovStats, quarantined), 48);
const_assert_eq!(offset_of!(QcowprovStats, allocation_end), 56);

/// Size of the first version of `struct qcowprov_stats`, the smallest accepted
/// `struct_size`.
const STATS_V1_SIZE: usize = 64;

impl Default for QcowprovStats {
    /// Zeros, with `struct_size` set (for Rust callers).
    fn default() -> Self {
        QcowprovStats {
            struct_size: size_of::<QcowprovStats>() as u32,
            _reserved: 0,
            host_flushes: 0,
            host_discards: 0,
            host_zeroes: 0,
            host_op_failures: 0,
            quarantine_releases: 0,
            quarantined: 0,
            allocation_end: 0,
        }
    }
}

/// Fills `*stats` with what `img` has done on the host since it was opened (flushes,
/// discards, write-zeroes, failed host operations, quarantine barriers, allocation end). Read-only: it changes
/// nothing and issues no I/O. The caller
/// sets `stats->struct_size = sizeof(struct qcowprov_stats)` first.
///
/// Thread-safety: thread-safe. Each counter is exact, but while other threads issue
/// requests the counters are not read as one atomic snapshot.
///
/// Returns 0 on success; `*stats` is written only then (all fields but `struct_size`).
/// Errors: `-EINVAL` for NULL `img` or `stats`, or `stats->struct_size` smaller than the
/// first version of the struct; `-EIO` for a handle that failed earlier.
///
/// # Safety
/// `img` must be NULL or a live handle from `qcowprov_open`; `stats` NULL or valid for
/// reads and writes of `stats->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_get_stats(
    img: *mut QcowprovImage,
    stats: *mut QcowprovStats,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or live.
        let img = unsafe { image(img) }?;
        // SAFETY: `struct_size` is the first field; the caller guarantees `stats` is NULL
        // or readable.
        let caller_size =
            unsafe { args::struct_size(stats.cast::<u32>(), "stats", STATS_V1_SIZE) }?;
        let s = img.stats()?;
        let out = QcowprovStats {
            struct_size: caller_size,
            _reserved: 0,
            host_flushes: s.host_flushes,
            host_discards: s.host_discards,
            host_zeroes: s.host_zeroes,
            host_op_failures: s.host_op_failures,
            quarantine_releases: s.quarantine_releases,
            quarantined: s.quarantined,
            allocation_end: s.allocation_end,
        };
        // SAFETY: `stats` is non-NULL (checked by `struct_size`), covers at least this
        // version of the struct, and the caller guarantees it is writable.
        unsafe { stats.write(out) };
        Ok(0)
    })
}
