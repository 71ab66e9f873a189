//! Statistics of an open image: the host requests it has issued (`struct qcowprov_stats`),
//! so a program can see what a provisioning policy costs on the host.

use std::ffi::c_int;
use std::mem::{offset_of, size_of};

use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::handle::{image, QcowprovImage};

/// Host requests an image handle has issued since `qcowprov_open`, filled by
/// `qcowprov_get_stats`. Set `struct_size = sizeof(struct qcowprov_stats)` before the call.
///
/// Each request counts once as the library issued it (adjacent ranges merged into one
/// request count once), whether or not the host carried it out: a discard the file
/// system does not support still counts. `qcowprov_create` and a backing file's own
/// requests are not counted.
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
    /// Bytes covered by `host_discards`.
    pub host_discard_bytes: u64,
    /// Host write-zeroes requests (a range zeroed and kept allocated, or zeroed and
    /// released, as the policy says).
    pub host_zeroes: u64,
    /// Bytes covered by `host_zeroes`.
    pub host_zero_bytes: u64,
}

const_assert_eq!(size_of::<QcowprovStats>(), 48);
const_assert_eq!(offset_of!(QcowprovStats, struct_size), 0);
const_assert_eq!(offset_of!(QcowprovStats, _reserved), 4);
const_assert_eq!(offset_of!(QcowprovStats, host_flushes), 8);
const_assert_eq!(offset_of!(QcowprovStats, host_discards), 16);
const_assert_eq!(offset_of!(QcowprovStats, host_discard_bytes), 24);
const_assert_eq!(offset_of!(QcowprovStats, host_zeroes), 32);
const_assert_eq!(offset_of!(QcowprovStats, host_zero_bytes), 40);

/// Size of the first version of `struct qcowprov_stats`, the smallest accepted
/// `struct_size`.
const STATS_V1_SIZE: usize = 48;

impl Default for QcowprovStats {
    /// Zeros, with `struct_size` set (for Rust callers).
    fn default() -> Self {
        QcowprovStats {
            struct_size: size_of::<QcowprovStats>() as u32,
            _reserved: 0,
            host_flushes: 0,
            host_discards: 0,
            host_discard_bytes: 0,
            host_zeroes: 0,
            host_zero_bytes: 0,
        }
    }
}

/// Fills `*stats` with the host requests `img` has issued since it was opened (flushes,
/// discards, write-zeroes). Read-only: it changes nothing and issues no I/O. The caller
/// sets `stats->struct_size = sizeof(struct qcowprov_stats)` first.
///
/// Thread-safety: thread-safe. Each counter is exact, but while other threads issue
/// requests the counters are not read as one atomic snapshot.
///
/// Returns 0 on success; `*stats` is written only then (all fields but `struct_size`).
/// Errors: `-EINVAL` for NULL `img` or `stats`, or `stats->struct_size` smaller than the
/// first version of the struct.
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
        let s = img.host_stats();
        let out = QcowprovStats {
            struct_size: caller_size,
            _reserved: 0,
            host_flushes: s.flushes,
            host_discards: s.discards,
            host_discard_bytes: s.discard_bytes,
            host_zeroes: s.zeroes,
            host_zero_bytes: s.zero_bytes,
        };
        // SAFETY: `stats` is non-NULL (checked by `struct_size`), covers at least this
        // version of the struct, and the caller guarantees it is writable.
        unsafe { stats.write(out) };
        Ok(0)
    })
}
