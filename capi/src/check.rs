//! Consistency check and repair with qemu-img check's rules and counters.

use std::ffi::{c_int, c_void};
use std::mem::{offset_of, size_of};

use qcow2_engine::Repair;
use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::handle::{image, QcowprovImage};

/// `qcowprov_check` fix flag: repair leaked clusters (qemu-img check `-r leaks`).
pub const QCOWPROV_CHECK_FIX_LEAKS: u32 = 1;
/// `qcowprov_check` fix flag: repair everything, leaks included (qemu-img check `-r all`).
pub const QCOWPROV_CHECK_FIX_ALL: u32 = 2;

/// What `qcowprov_check` found, with qemu-img check's counters. Set
/// `struct_size = sizeof(struct qcowprov_check_result)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QcowprovCheckResult {
    /// Set by the caller to `sizeof(struct qcowprov_check_result)`; left unchanged.
    pub struct_size: u32,
    /// qemu-img check's exit code class: 0 clean, 2 corruptions left, 3 only leaks left.
    pub exit_code: u32,
    /// Inconsistencies that can lose data (refcount below references, bad entries).
    pub corruptions: u64,
    /// Clusters whose refcount exceeds their references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that stopped part of the check (I/O).
    pub check_errors: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with host data (active L1 table only).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their guest predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use in the image file.
    pub image_end_offset: u64,
}

const_assert_eq!(size_of::<QcowprovCheckResult>(), 88);
const_assert_eq!(offset_of!(QcowprovCheckResult, struct_size), 0);
const_assert_eq!(offset_of!(QcowprovCheckResult, exit_code), 4);
const_assert_eq!(offset_of!(QcowprovCheckResult, corruptions), 8);
const_assert_eq!(offset_of!(QcowprovCheckResult, leaks), 16);
const_assert_eq!(offset_of!(QcowprovCheckResult, corruptions_fixed), 24);
const_assert_eq!(offset_of!(QcowprovCheckResult, leaks_fixed), 32);
const_assert_eq!(offset_of!(QcowprovCheckResult, check_errors), 40);
const_assert_eq!(offset_of!(QcowprovCheckResult, total_clusters), 48);
const_assert_eq!(offset_of!(QcowprovCheckResult, allocated_clusters), 56);
const_assert_eq!(offset_of!(QcowprovCheckResult, fragmented_clusters), 64);
const_assert_eq!(offset_of!(QcowprovCheckResult, compressed_clusters), 72);
const_assert_eq!(offset_of!(QcowprovCheckResult, image_end_offset), 80);

/// Size of the first version of `struct qcowprov_check_result`, the smallest accepted
/// `struct_size`.
const CHECK_RESULT_V1_SIZE: usize = 88;

impl Default for QcowprovCheckResult {
    /// Zeros, with `struct_size` set (for Rust callers).
    fn default() -> Self {
        QcowprovCheckResult {
            struct_size: size_of::<QcowprovCheckResult>() as u32,
            exit_code: 0,
            corruptions: 0,
            leaks: 0,
            corruptions_fixed: 0,
            leaks_fixed: 0,
            check_errors: 0,
            total_clusters: 0,
            allocated_clusters: 0,
            fragmented_clusters: 0,
            compressed_clusters: 0,
            image_end_offset: 0,
        }
    }
}

/// Progress callback of `qcowprov_check`: `percent` goes from 0 to 100, never
/// decreasing; `user_data` is the pointer given to `qcowprov_check`.
pub type QcowprovProgressCb = Option<unsafe extern "C" fn(percent: f64, user_data: *mut c_void)>;

/// Checks the image's consistency as `qemu-img check` does and, with `fix_flags`,
/// repairs it: 0 only reports, `QCOWPROV_CHECK_FIX_LEAKS` fixes leaked clusters,
/// `QCOWPROV_CHECK_FIX_ALL` fixes everything. Pending writes are flushed first. The
/// caller sets `result->struct_size = sizeof(struct qcowprov_check_result)` first.
///
/// `progress`, if not NULL, is called on the calling thread with percentages from 0 to
/// 100 and `user_data`. It runs while the image's metadata lock is held: it must not call
/// any function on `img` (that would deadlock).
///
/// Thread-safety: thread-safe, but other calls on `img` wait until the check is done.
///
/// Returns 0 when the check ran, whatever it found: see `result->exit_code`, written (as
/// all fields but `struct_size`) only on success. Errors: `-EINVAL` for NULL `img` or
/// `result`, a too small `result->struct_size` or unknown fix flags; `-EROFS` for a repair
/// on a read-only image; `-EIO` and other host errors when the check could not run.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `result` NULL or valid for
/// reads and writes of `result->struct_size` bytes; `progress` NULL or a function safe to
/// call with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_check(
    img: *mut QcowprovImage,
    fix_flags: u32,
    result: *mut QcowprovCheckResult,
    progress: QcowprovProgressCb,
    user_data: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: `struct_size` is the first field; the caller guarantees `result` is NULL
        // or readable.
        let caller_size =
            unsafe { args::struct_size(result.cast::<u32>(), "result", CHECK_RESULT_V1_SIZE) }?;
        args::known_flags(
            fix_flags,
            QCOWPROV_CHECK_FIX_LEAKS | QCOWPROV_CHECK_FIX_ALL,
            "fix_flags",
        )?;
        let repair = if fix_flags & QCOWPROV_CHECK_FIX_ALL != 0 {
            Repair::All
        } else if fix_flags & QCOWPROV_CHECK_FIX_LEAKS != 0 {
            Repair::Leaks
        } else {
            Repair::None
        };
        let mut last = -1.0f64;
        let mut report = |percent: f64| {
            let percent = percent.clamp(0.0, 100.0);
            if let Some(cb) = progress {
                if percent > last {
                    last = percent;
                    // SAFETY: the caller guarantees `progress` may be called with
                    // `user_data`.
                    unsafe { cb(percent, user_data) };
                }
            }
        };
        report(0.0);
        let rep = img.check_with_progress(repair, &mut |done, total| {
            if total > 0 {
                report(done as f64 * 100.0 / total as f64);
            }
        })?;
        report(100.0);
        let out = QcowprovCheckResult {
            struct_size: caller_size,
            exit_code: rep.exit_code() as u32,
            corruptions: rep.corruptions,
            leaks: rep.leaks,
            corruptions_fixed: rep.corruptions_fixed,
            leaks_fixed: rep.leaks_fixed,
            check_errors: rep.check_errors,
            total_clusters: rep.total_clusters,
            allocated_clusters: rep.allocated_clusters,
            fragmented_clusters: rep.fragmented_clusters,
            compressed_clusters: rep.compressed_clusters,
            image_end_offset: rep.image_end_offset,
        };
        // SAFETY: `result` is non-NULL (checked by `struct_size`), covers at least this
        // version of the struct, and the caller guarantees it is writable.
        unsafe { result.write(out) };
        Ok(0)
    })
}
