//! Block status: what a guest range is (data, zero, unallocated, compressed), which layer
//! of the backing chain answers, and where it lives on the host.

use std::ffi::c_int;
use std::mem::{offset_of, size_of};

use qcow2_engine::BlockStatus;
use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::handle::{image, QcowprovImage};

/// Block status flag: the range reads as stored data (not known to be zero).
pub const QCOWPROV_STATUS_DATA: u32 = 1;
/// Block status flag: the range reads as zeros.
pub const QCOWPROV_STATUS_ZERO: u32 = 2;
/// Block status flag: the range is defined by some layer of the chain (data or zero
/// clusters; qemu-img map's "present"). Without it the range is unallocated everywhere.
pub const QCOWPROV_STATUS_ALLOCATED: u32 = 4;
/// Block status flag: the data is a compressed cluster (no plain host offset).
pub const QCOWPROV_STATUS_COMPRESSED: u32 = 8;
/// Block status flag: a backing file answered (depth > 0).
pub const QCOWPROV_STATUS_BACKING: u32 = 16;
/// Block status flag: the host offset is meaningful (an offset in the file of the layer
/// that answered).
pub const QCOWPROV_STATUS_OFFSET_VALID: u32 = 32;

/// The status of a guest range, filled by `qcowprov_block_status_depth`. Set
/// `struct_size = sizeof(struct qcowprov_status)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QcowprovStatus {
    /// Set by the caller to `sizeof(struct qcowprov_status)`; left unchanged.
    pub struct_size: u32,
    /// `QCOWPROV_STATUS_*` flags.
    pub flags: u32,
    /// Bytes from the queried offset that share this status (at least 1).
    pub len: u64,
    /// Host offset of the range in the file of the layer at `depth` when `flags` has
    /// `QCOWPROV_STATUS_OFFSET_VALID`, else 0.
    pub host_offset: u64,
    /// The layer that answered: 0 for this image, 1 for its backing file, and so on
    /// (qemu-img map's "depth").
    pub depth: u32,
    /// Reserved; written as 0.
    pub _reserved: u32,
}

const_assert_eq!(size_of::<QcowprovStatus>(), 32);
const_assert_eq!(offset_of!(QcowprovStatus, struct_size), 0);
const_assert_eq!(offset_of!(QcowprovStatus, flags), 4);
const_assert_eq!(offset_of!(QcowprovStatus, len), 8);
const_assert_eq!(offset_of!(QcowprovStatus, host_offset), 16);
const_assert_eq!(offset_of!(QcowprovStatus, depth), 24);
const_assert_eq!(offset_of!(QcowprovStatus, _reserved), 28);

/// Size of the first version of `struct qcowprov_status`, the smallest accepted
/// `struct_size`.
const STATUS_V1_SIZE: usize = 32;

impl Default for QcowprovStatus {
    /// Zeros, with `struct_size` set (for Rust callers).
    fn default() -> Self {
        QcowprovStatus {
            struct_size: size_of::<QcowprovStatus>() as u32,
            flags: 0,
            len: 0,
            host_offset: 0,
            depth: 0,
            _reserved: 0,
        }
    }
}

/// The `QCOWPROV_STATUS_*` flags of an engine status.
fn flags_of(st: &BlockStatus) -> u32 {
    let mut f = 0;
    for (on, bit) in [
        (st.data, QCOWPROV_STATUS_DATA),
        (st.zero, QCOWPROV_STATUS_ZERO),
        (st.present, QCOWPROV_STATUS_ALLOCATED),
        (st.compressed, QCOWPROV_STATUS_COMPRESSED),
        (st.depth > 0, QCOWPROV_STATUS_BACKING),
        (st.host_offset.is_some(), QCOWPROV_STATUS_OFFSET_VALID),
    ] {
        if on {
            f |= bit;
        }
    }
    f
}

/// Reports the status of the guest range starting at `offset`, looking at up to `len`
/// bytes: `*pnum` receives how many bytes from `offset` share the status (at least 1,
/// at most `len`), `*flags` the `QCOWPROV_STATUS_*` flags and `*host_offset` the host
/// offset (0 unless `QCOWPROV_STATUS_OFFSET_VALID`). Call again at `offset + *pnum` to
/// walk a range.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success; the out-parameters are written only then. Errors: `-EINVAL` for
/// a NULL pointer argument, `len` 0 or `offset` at or beyond the virtual size; `-EIO` for
/// a corrupt image or host failure.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `pnum`, `flags` and
/// `host_offset` NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_block_status(
    img: *mut QcowprovImage,
    offset: u64,
    len: u64,
    pnum: *mut u64,
    flags: *mut u32,
    host_offset: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        args::non_null(pnum, "pnum")?;
        args::non_null(flags, "flags")?;
        args::non_null(host_offset, "host_offset")?;
        let st = img.block_status(offset, len)?;
        // SAFETY: all three are non-NULL (checked above) and the caller guarantees they
        // are valid for writes.
        unsafe {
            pnum.write(st.len);
            flags.write(flags_of(&st));
            host_offset.write(st.host_offset.unwrap_or(0));
        }
        Ok(0)
    })
}

/// As `qcowprov_block_status`, filling `*st`, which also gives the depth of the layer
/// that answered (for `qemu-img map` compatible output). The caller sets
/// `st->struct_size = sizeof(struct qcowprov_status)` first.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success; `*st` is written only then (all fields but `struct_size`).
/// Errors: `-EINVAL` for NULL `img` or `st`, `st->struct_size` smaller than the first
/// version of the struct, `len` 0 or `offset` at or beyond the virtual size; `-EIO` for a
/// corrupt image or host failure.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `st` NULL or valid for reads
/// and writes of `st->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_block_status_depth(
    img: *mut QcowprovImage,
    offset: u64,
    len: u64,
    st: *mut QcowprovStatus,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: `struct_size` is the first field; the caller guarantees `st` is NULL or
        // readable.
        let caller_size = unsafe { args::struct_size(st.cast::<u32>(), "st", STATUS_V1_SIZE) }?;
        let s = img.block_status(offset, len)?;
        let out = QcowprovStatus {
            struct_size: caller_size,
            flags: flags_of(&s),
            len: s.len,
            host_offset: s.host_offset.unwrap_or(0),
            depth: s.depth,
            _reserved: 0,
        };
        // SAFETY: `st` is non-NULL (checked by `struct_size`), covers at least this version
        // of the struct, and the caller guarantees it is writable.
        unsafe { st.write(out) };
        Ok(0)
    })
}
