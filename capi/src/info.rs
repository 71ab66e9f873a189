//! What an open image reports about itself: `struct qcowprov_info`.

use std::ffi::{c_char, c_int};
use std::mem::{offset_of, size_of};

use qcow2_engine::{DetectZeroes, Mode, Provision};
use static_assertions::const_assert_eq;

use crate::args;
use crate::boundary::guard;
use crate::error::{CResult, Failure};
use crate::handle::{image, QcowprovImage};

/// `qcowprov_info.flags`: extended L2 entries (subclusters).
pub const QCOWPROV_INFO_EXTENDED_L2: u32 = 1;
/// `qcowprov_info.flags`: lazy refcounts.
pub const QCOWPROV_INFO_LAZY_REFCOUNTS: u32 = 2;
/// `qcowprov_info.flags`: the image was opened read-only.
pub const QCOWPROV_INFO_READ_ONLY: u32 = 4;
/// `qcowprov_info.flags`: the image names a backing file.
pub const QCOWPROV_INFO_HAS_BACKING: u32 = 8;
/// `qcowprov_info.flags`: compressed clusters use zstd (else zlib).
pub const QCOWPROV_INFO_COMPRESSION_ZSTD: u32 = 16;
/// `qcowprov_info.flags`: QEMU's image locks are held on the image file (not with
/// `locking=off`).
pub const QCOWPROV_INFO_LOCKED: u32 = 32;
/// `qcowprov_info.flags`: opened with force-share (`QCOWPROV_OPEN_FORCE_SHARE`).
pub const QCOWPROV_INFO_FORCE_SHARE: u32 = 64;

/// `detect-zeroes` in force, as `qcowprov_info.detect_zeroes` reports it.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QcowprovDetectZeroes {
    /// All-zero writes are written as data.
    Off = 0,
    /// All-zero writes become write-zeroes.
    On = 1,
    /// All-zero writes become write-zeroes that may unmap.
    Unmap = 2,
}

/// The discard policy of an open image, as `qcowprov_info.provision` reports it.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QcowprovProvision {
    /// `provision=off`: discards are ignored (qcow2 full / host full).
    Off = 0,
    /// `provision=full`: discarded ranges are zeroed but stay allocated, in the image and
    /// on the host (anchor / anchor).
    Full = 1,
    /// `provision=metadata`: qcow2 clusters stay allocated as zero clusters, host space is
    /// released (anchor / unmap).
    Metadata = 2,
    /// `provision=thin`: clusters are freed and host space released (unmap / unmap).
    Thin = 3,
    /// `provision=reuse`: clusters are freed for reuse, host space kept (unmap / full).
    Reuse = 4,
    /// QEMU-style options (`discard=`, `discard-no-unref=`, ...) were given instead of a
    /// provisioning mode; `qcowprov_info.policy` spells them out.
    Qemu = 5,
}

/// What an open image reports about itself, filled by `qcowprov_get_info`. Set
/// `struct_size = sizeof(struct qcowprov_info)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QcowprovInfo {
    /// Set by the caller to `sizeof(struct qcowprov_info)`; left unchanged.
    pub struct_size: u32,
    /// qcow2 version: 2 or 3.
    pub version: u32,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Subcluster size in bytes (the cluster size without extended L2 entries).
    pub subcluster_size: u64,
    /// Granularity to advertise for discard: the cluster size (partial clusters are
    /// ignored).
    pub discard_granularity: u64,
    /// Alignment at which write-zeroes is efficient: the subcluster size.
    pub write_zeroes_alignment: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// `QCOWPROV_INFO_*` flags.
    pub flags: u32,
    /// Incompatible feature bits of the header.
    pub incompatible_features: u64,
    /// Compatible feature bits of the header.
    pub compatible_features: u64,
    /// Autoclear feature bits of the header.
    pub autoclear_features: u64,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// The policy as a `qcowprov_provision` value (`QCOWPROV_PROVISION_*`).
    pub provision: u32,
    /// The effective policy, NUL-terminated: e.g. "provision=metadata" or
    /// "discard=unmap,pass-discard-request=on,discard-no-unref=on".
    pub policy: [c_char; 128],
    /// The backing file name as stored in the image, NUL-terminated; "" if none.
    pub backing_file: [c_char; 1024],
    /// The backing file format as stored in the image, NUL-terminated; "" if not named.
    pub backing_format: [c_char; 32],
    /// `detect-zeroes` in force, a `qcowprov_detect_zeroes` value
    /// (`QCOWPROV_DETECT_ZEROES_*`). Since version 2 of the struct (`struct_size` >= 1792).
    pub detect_zeroes: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Every runtime option in force, NUL-terminated, as `key=value,...` that
    /// `qcowprov_open` accepts: the policy, `detect-zeroes`, `pass-discard-snapshot`,
    /// `pass-discard-other`, `read-only`, `cache.direct`, `locking` (`on` when locks are
    /// held), `force-share`, the effective cache sizes, `quarantine-slack`, `aio` and
    /// `aio-queue-depth`. Since version 2.
    pub options: [c_char; 512],
    /// The backend of asynchronous requests, chosen at open (`aio=` option): a
    /// `QCOWPROV_AIO_*` value. Since version 3 of the struct (`struct_size` >= 1808).
    pub aio: u32,
    /// Requests the asynchronous queue takes before they are reaped
    /// (`aio-queue-depth`). Since version 3.
    pub aio_queue_depth: u32,
    /// The alignment asynchronous requests need of buffer addresses, lengths and offsets
    /// (the direct I/O alignment with `cache.direct=on`, else 1). Since version 3.
    pub aio_alignment: u64,
}

/// `qcowprov_info.aio`: io_uring.
pub const QCOWPROV_AIO_IO_URING: u32 = 1;
/// `qcowprov_info.aio`: a thread pool (QEMU's `aio=threads`).
pub const QCOWPROV_AIO_THREADS: u32 = 2;

const_assert_eq!(size_of::<QcowprovInfo>(), 1808);
const_assert_eq!(offset_of!(QcowprovInfo, struct_size), 0);
const_assert_eq!(offset_of!(QcowprovInfo, version), 4);
const_assert_eq!(offset_of!(QcowprovInfo, virtual_size), 8);
const_assert_eq!(offset_of!(QcowprovInfo, cluster_size), 16);
const_assert_eq!(offset_of!(QcowprovInfo, subcluster_size), 24);
const_assert_eq!(offset_of!(QcowprovInfo, discard_granularity), 32);
const_assert_eq!(offset_of!(QcowprovInfo, write_zeroes_alignment), 40);
const_assert_eq!(offset_of!(QcowprovInfo, refcount_bits), 48);
const_assert_eq!(offset_of!(QcowprovInfo, flags), 52);
const_assert_eq!(offset_of!(QcowprovInfo, incompatible_features), 56);
const_assert_eq!(offset_of!(QcowprovInfo, compatible_features), 64);
const_assert_eq!(offset_of!(QcowprovInfo, autoclear_features), 72);
const_assert_eq!(offset_of!(QcowprovInfo, snapshots), 80);
const_assert_eq!(offset_of!(QcowprovInfo, provision), 84);
const_assert_eq!(offset_of!(QcowprovInfo, policy), 88);
const_assert_eq!(offset_of!(QcowprovInfo, backing_file), 216);
const_assert_eq!(offset_of!(QcowprovInfo, backing_format), 1240);
const_assert_eq!(offset_of!(QcowprovInfo, detect_zeroes), 1272);
const_assert_eq!(offset_of!(QcowprovInfo, reserved), 1276);
const_assert_eq!(offset_of!(QcowprovInfo, options), 1280);
const_assert_eq!(offset_of!(QcowprovInfo, aio), 1792);
const_assert_eq!(offset_of!(QcowprovInfo, aio_queue_depth), 1796);
const_assert_eq!(offset_of!(QcowprovInfo, aio_alignment), 1800);
const_assert_eq!(size_of::<QcowprovProvision>(), 4);
const_assert_eq!(size_of::<QcowprovDetectZeroes>(), 4);

/// Size of the first version of `struct qcowprov_info`, the smallest accepted
/// `struct_size`. A caller built against it gets that prefix filled.
const INFO_V1_SIZE: usize = 1272;

impl Default for QcowprovInfo {
    /// Zeros, with `struct_size` set (for Rust callers).
    fn default() -> Self {
        QcowprovInfo {
            struct_size: size_of::<QcowprovInfo>() as u32,
            version: 0,
            virtual_size: 0,
            cluster_size: 0,
            subcluster_size: 0,
            discard_granularity: 0,
            write_zeroes_alignment: 0,
            refcount_bits: 0,
            flags: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            snapshots: 0,
            provision: 0,
            policy: [0; 128],
            backing_file: [0; 1024],
            backing_format: [0; 32],
            detect_zeroes: 0,
            reserved: 0,
            options: [0; 512],
            aio: 0,
            aio_queue_depth: 0,
            aio_alignment: 0,
        }
    }
}

/// Incompatible feature bit 3: a non-default (zstd) compression type is in use.
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;

/// Copy `s` into a fixed C char array with its NUL; `-ERANGE` if it does not fit.
fn fill(dst: &mut [c_char], s: &str, field: &str) -> CResult<()> {
    let bytes = s.as_bytes();
    if bytes.len() >= dst.len() {
        return Err(Failure::new(
            libc::ERANGE,
            format!(
                "{field} ({} bytes) does not fit in qcowprov_info.{field} ({} bytes with the NUL)",
                bytes.len(),
                dst.len()
            ),
        ));
    }
    for (d, &b) in dst.iter_mut().zip(bytes) {
        *d = b as c_char;
    }
    dst[bytes.len()] = 0;
    Ok(())
}

/// The C enum value of a policy mode.
fn provision_of(mode: Mode) -> QcowprovProvision {
    match mode {
        Mode::Provision(Provision::Off) => QcowprovProvision::Off,
        Mode::Provision(Provision::Full) => QcowprovProvision::Full,
        Mode::Provision(Provision::Metadata) => QcowprovProvision::Metadata,
        Mode::Provision(Provision::Thin) => QcowprovProvision::Thin,
        Mode::Provision(Provision::Reuse) => QcowprovProvision::Reuse,
        Mode::Qemu { .. } => QcowprovProvision::Qemu,
    }
}

/// Fills `*info` with what the image reports about itself: version, sizes, features,
/// snapshots, the effective discard policy, every runtime option in force, and the
/// backing file. The caller sets `info->struct_size = sizeof(struct qcowprov_info)` first;
/// a caller built against an older, smaller version of the struct gets that part filled.
///
/// Thread-safety: thread-safe.
///
/// Returns 0 on success; `*info` is written only then (the first `struct_size` bytes,
/// all fields but `struct_size`). Errors: `-EINVAL` for NULL `img` or `info`, or
/// `info->struct_size` smaller than the first version of the struct; `-EBADF` for a
/// closed handle; `-ERANGE` if a name does not fit its field.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open` (a closed one gives `-EBADF`); `info` NULL or valid for
/// reads and writes of `info->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_get_info(
    img: *mut QcowprovImage,
    info: *mut QcowprovInfo,
) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle, not closed concurrently.
        let img = unsafe { image(img) }?;
        // SAFETY: `struct_size` is the first field; the caller guarantees `info` is NULL
        // or readable.
        let caller_size = unsafe { args::struct_size(info.cast::<u32>(), "info", INFO_V1_SIZE) }?;
        let i = img.info();
        let mut flags = 0;
        for (on, bit) in [
            (i.extended_l2, QCOWPROV_INFO_EXTENDED_L2),
            (i.lazy_refcounts, QCOWPROV_INFO_LAZY_REFCOUNTS),
            (i.read_only, QCOWPROV_INFO_READ_ONLY),
            (i.backing_file.is_some(), QCOWPROV_INFO_HAS_BACKING),
            (
                i.incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0,
                QCOWPROV_INFO_COMPRESSION_ZSTD,
            ),
            (i.locked, QCOWPROV_INFO_LOCKED),
            (
                i.options.contains("force-share=on"),
                QCOWPROV_INFO_FORCE_SHARE,
            ),
        ] {
            if on {
                flags |= bit;
            }
        }
        let mut out = QcowprovInfo {
            struct_size: caller_size,
            version: i.version,
            virtual_size: i.virtual_size,
            cluster_size: i.cluster_size,
            subcluster_size: i.subcluster_size,
            discard_granularity: i.discard_granularity,
            write_zeroes_alignment: i.write_zeroes_alignment,
            refcount_bits: i.refcount_bits,
            flags,
            incompatible_features: i.incompatible_features,
            compatible_features: i.compatible_features,
            autoclear_features: i.autoclear_features,
            snapshots: u32::try_from(i.snapshots).unwrap_or(u32::MAX),
            provision: provision_of(i.mode) as u32,
            detect_zeroes: match i.detect_zeroes {
                DetectZeroes::Off => QcowprovDetectZeroes::Off,
                DetectZeroes::On => QcowprovDetectZeroes::On,
                DetectZeroes::Unmap => QcowprovDetectZeroes::Unmap,
            } as u32,
            aio: match i.aio {
                qcow2_engine::AioKind::IoUring => QCOWPROV_AIO_IO_URING,
                qcow2_engine::AioKind::Threads => QCOWPROV_AIO_THREADS,
            },
            aio_queue_depth: i.aio_queue_depth,
            aio_alignment: i.aio_alignment,
            ..QcowprovInfo::default()
        };
        fill(&mut out.options, &i.options, "options")?;
        fill(&mut out.policy, &i.policy, "policy")?;
        fill(
            &mut out.backing_file,
            i.backing_file.as_deref().unwrap_or(""),
            "backing_file",
        )?;
        fill(
            &mut out.backing_format,
            i.backing_format.as_deref().unwrap_or(""),
            "backing_format",
        )?;
        let n = (caller_size as usize).min(size_of::<QcowprovInfo>());
        // SAFETY: `info` is non-NULL (checked by `struct_size`) and, as the caller
        // guarantees, writable for `struct_size` >= `n` bytes; `out` is a local of at least
        // `n` bytes; they do not overlap. Byte copies need no alignment.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&out as *const QcowprovInfo).cast::<u8>(),
                info.cast::<u8>(),
                n,
            )
        };
        Ok(0)
    })
}

/// Stores in `*end` the offset just past the highest host cluster the image uses: the
/// size its file or volume must have. A stack that keeps qcow2 images on volumes it grows
/// (LVM) polls this to extend the volume in time, as QEMU users poll
/// `wr_highest_offset`; unlike that it is exact from the open on, covers allocations
/// whose data is still being written, and goes down when the top clusters are freed (once
/// the next `qcowprov_flush` has made their release safe: until then they count). On an
/// image without leaks it equals `qemu-img check`'s "Image end offset".
///
/// Cost: no check and no I/O in the common case: a scan of the in-memory refcount table
/// and of one refcount block (read once, then cached), under the metadata lock.
///
/// Thread-safety: thread-safe; allocations by other threads after the call may raise it.
///
/// Returns 0 on success, with `*end` set. Errors: `-EINVAL` for NULL `img` or `end`;
/// `-EBADF` for a closed handle; `-EIO` if a refcount block cannot be read.
///
/// # Safety
/// `img` must be NULL or a handle from `qcowprov_open`; `end` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn qcowprov_highest_offset(img: *mut QcowprovImage, end: *mut u64) -> c_int {
    guard(|| {
        // SAFETY: the caller guarantees `img` is NULL or a handle.
        let img = unsafe { image(img) }?;
        args::non_null(end, "end")?;
        let v = img.highest_offset()?;
        // SAFETY: `end` is non-NULL (checked above) and the caller guarantees it writable.
        unsafe { end.write(v) };
        Ok(0)
    })
}
