//! QEMU's image locking protocol, so that this library and QEMU's tools (qemu-io, qemu-img,
//! qemu-nbd, qemu-system, qemu-storage-daemon) exclude each other in both directions, and
//! two handles on one image in one process exclude each other too.
//!
//! The protocol (QEMU's `block/file-posix.c`, since 2.10): each block permission
//! ([`Perms`], numbered as in QEMU's `include/block/block-common.h`) has two lock bytes in
//! the image file. An opener takes a shared (`F_RDLCK`) open-file-description lock on byte
//! `100 + i` for each permission `i` it uses, and on byte `200 + i` for each permission it
//! does **not** share with others. Then it tests, without taking them, that no other open
//! file description holds byte `200 + i` for a permission it wants, nor byte `100 + i` for
//! a permission it does not share. Locks first, test second: of two openers racing for
//! conflicting permissions at least one sees the other (both may fail; neither wrongly
//! succeeds). Only shared locks are ever taken, so taking never fails on a conflict; the
//! test (`F_OFD_GETLK` for an exclusive lock) is what detects one.
//!
//! The locks belong to the open file description (OFD locks, Linux 3.15+): they live as
//! long as the descriptor the image is accessed through, go away with the process that
//! holds them (a killed holder leaves nothing behind), and a second `open()` of the file in
//! the same process is a different owner, so two handles in one process conflict as two
//! processes do. POSIX (`F_SETLK`) locks would do neither: they belong to the process and
//! are dropped when it closes *any* descriptor of the file.
//!
//! What QEMU's tools take on the image file, measured in `/proc/locks` with QEMU 10:
//!
//! | open | permission bytes | unshared bytes |
//! |---|---|---|
//! | read/write (`qemu-io`, `qemu-img check -r`) | 100 read, 101 write, 103 resize | 201 write, 203 resize |
//! | read-only (`qemu-io -r`, `qemu-img info`), and every backing file | 100 read | 201 write, 203 resize |
//! | read-only with force-share (`-U`) | 100 read | none |
//!
//! and `qemu-img create` takes write and resize, sharing everything but resize, while it
//! truncates the file. [`LockRequest`] has the first three as constants, and a creator
//! that shares nothing (see [`LockRequest::CREATOR`]).

use std::fmt;
use std::fs::File;
use std::io;

use crate::error::with_context;
use crate::sys::{self, LockType};

/// First byte of the permission locks (QEMU's `RAW_LOCK_PERM_BASE`).
pub const LOCK_PERM_BASE: u64 = 100;
/// First byte of the unshared-permission locks (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const LOCK_SHARED_BASE: u64 = 200;

/// The errno a lock conflict is reported with (`EBUSY`, "Device or resource busy"), so
/// that a C caller can tell "in use" from every other open failure.
pub const LOCK_CONFLICT_ERRNO: i32 = libc::EBUSY;

/// A set of QEMU block permissions (`BLK_PERM_*`; bit `i` locks bytes `100 + i` and
/// `200 + i`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// `BLK_PERM_CONSISTENT_READ`: reads see consistent data (byte 100 / 200).
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    /// `BLK_PERM_WRITE`: may change the visible data (byte 101 / 201).
    pub const WRITE: Perms = Perms(0x02);
    /// `BLK_PERM_WRITE_UNCHANGED`: may write data that does not change what is read
    /// (byte 102 / 202).
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    /// `BLK_PERM_RESIZE`: may change the size (byte 103 / 203).
    pub const RESIZE: Perms = Perms(0x08);
    /// `BLK_PERM_ALL`. QEMU 6.1 and older also had 0x10 ("change children"); QEMU 10 does
    /// not lock its bytes any more, and neither does this library.
    pub const ALL: Perms = Perms(0x0f);

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set with these bits, or `None` if a bit is not a permission.
    pub const fn from_bits(bits: u8) -> Option<Perms> {
        if bits & !Self::ALL.0 == 0 {
            Some(Perms(bits))
        } else {
            None
        }
    }

    /// Both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// The permissions not in `self`.
    pub const fn complement(self) -> Perms {
        Perms(Self::ALL.0 & !self.0)
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The single permissions in the set with their index (lock byte offset), lowest first.
    pub fn iter(self) -> impl Iterator<Item = (u64, Perms)> {
        (0..4u64)
            .map(|i| (i, Perms(1 << i)))
            .filter(move |&(_, p)| self.contains(p))
    }

    /// QEMU's name of a single permission ("consistent read", "write", "write unchanged",
    /// "resize"); for a set, the names joined with ", " as QEMU's `bdrv_perm_names`.
    pub fn names(self) -> String {
        self.iter()
            .map(|(_, p)| match p.0 {
                0x01 => "consistent read",
                0x02 => "write",
                0x04 => "write unchanged",
                _ => "resize",
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perms({:#x}: {})", self.0, self.names())
    }
}

/// What an opener uses (`perm`) and lets others use at the same time (`shared`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockRequest {
    /// Permissions taken.
    pub perm: Perms,
    /// Permissions others may take meanwhile.
    pub shared: Perms,
}

impl LockRequest {
    /// A qcow2 image opened read/write: reads, writes and grows the file; lets others read
    /// and write-unchanged only (QEMU's metadata child of a writable format node).
    pub const WRITER: LockRequest = LockRequest {
        perm: Perms(0x01 | 0x02 | 0x08),
        shared: Perms(0x01 | 0x04),
    };
    /// A qcow2 image (or a backing file) opened read-only: reads; nobody may write or
    /// resize it meanwhile (its metadata must stay consistent).
    pub const READER: LockRequest = LockRequest {
        perm: Perms(0x01),
        shared: Perms(0x01 | 0x04),
    };
    /// A read-only open with force-share (`qemu-img -U`, `force-share=on`): shares
    /// everything, so it neither blocks nor is blocked by a writer; the data it reads
    /// may change (or be inconsistent) under it.
    pub const SHARING_READER: LockRequest = LockRequest {
        perm: Perms(0x01),
        shared: Perms::ALL,
    };
    /// Creating or formatting an image: writes and resizes, shares nothing. Taken before
    /// the file is truncated or written. Stricter than QEMU's `raw_co_create` (which
    /// shares everything but resize): formatting destroys the content, so it is refused
    /// while anyone holds the file at all, a force-share reader or a raw user that
    /// shares writes included (`qemu-img create` writes a qcow2 header over a device
    /// `qemu-io -f raw` has open before its own open fails).
    pub const CREATOR: LockRequest = LockRequest {
        perm: Perms(0x02 | 0x08),
        shared: Perms::NONE,
    };
}

/// QEMU's `file.locking` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Locking {
    /// Lock; fail if the kernel has no OFD locks.
    On,
    /// Neither take nor test locks (the caller guarantees exclusion by other means).
    Off,
    /// Lock where the kernel has OFD locks (every Linux since 3.15), else do not lock.
    #[default]
    Auto,
}

impl Locking {
    /// The option value: "on", "off" or "auto".
    pub fn name(self) -> &'static str {
        match self {
            Locking::On => "on",
            Locking::Off => "off",
            Locking::Auto => "auto",
        }
    }
}

/// Another open file description holds a lock this open conflicts with: another process
/// (QEMU or this library) or another handle in this process is using the image. Found
/// inside the `io::Error` (kind `ResourceBusy`) of a refused open; its errno, through
/// [`raw_os_error_of`](crate::raw_os_error_of), is [`LOCK_CONFLICT_ERRNO`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct LockConflict {
    /// The permission that conflicts.
    pub perm: Perms,
    /// `false`: someone else does not share `perm`, which this open wants (QEMU: 'Failed
    /// to get "write" lock'). `true`: someone else uses `perm`, which this open does not
    /// share (QEMU: 'Failed to get shared "write" lock').
    pub shared: bool,
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = if self.shared { "shared " } else { "" };
        write!(f, "Failed to get {shared}\"{}\" lock", self.perm.names())
    }
}

impl LockConflict {
    /// The conflict inside `err`, if it is one (looking through context wrappers).
    pub fn of(err: &io::Error) -> Option<&LockConflict> {
        let inner = err.get_ref()?;
        if let Some(c) = inner.downcast_ref::<LockConflict>() {
            return Some(c);
        }
        inner
            .downcast_ref::<crate::ContextError>()
            .and_then(|c| LockConflict::of(&c.source))
    }
}

/// The lock bytes one open file description holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Held {
    /// Permission bytes (`100 + i`).
    pub(crate) perm: Perms,
    /// Unshared-permission bytes (`200 + i`).
    pub(crate) unshared: Perms,
}

impl Held {
    fn of(req: LockRequest) -> Held {
        Held {
            perm: req.perm,
            unshared: req.shared.complement(),
        }
    }

    /// The request these bytes stand for.
    pub(crate) fn request(self) -> LockRequest {
        LockRequest {
            perm: self.perm,
            shared: self.unshared.complement(),
        }
    }

    fn union(self, other: Held) -> Held {
        Held {
            perm: self.perm.union(other.perm),
            unshared: self.unshared.union(other.unshared),
        }
    }

    /// The bytes of a set as (offset, length) runs, so adjacent bytes take one call.
    fn runs(base: u64, set: Perms) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, _) in set.iter() {
            match out.last_mut() {
                Some((s, n)) if *s + *n == base + i => *n += 1,
                _ => out.push((base + i, 1)),
            }
        }
        out
    }
}

/// The permissions whose bytes `len` bytes from `base + first` cover.
fn span(first: u64, len: u64) -> Perms {
    Perms((((1u16 << len) - 1) << first) as u8)
}

/// Take the bytes of `want` not yet in `*held` (QEMU's `raw_apply_lock_bytes`).
fn apply(file: &File, held: &mut Held, want: Held) -> io::Result<()> {
    for (off, len) in Held::runs(LOCK_PERM_BASE, Perms(want.perm.0 & !held.perm.0)) {
        sys::ofd_setlk(file, off, len, LockType::Read)
            .map_err(|e| with_context(e, format!("Failed to lock byte {off}")))?;
        held.perm = held.perm.union(span(off - LOCK_PERM_BASE, len));
    }
    for (off, len) in Held::runs(LOCK_SHARED_BASE, Perms(want.unshared.0 & !held.unshared.0)) {
        sys::ofd_setlk(file, off, len, LockType::Read)
            .map_err(|e| with_context(e, format!("Failed to lock byte {off}")))?;
        held.unshared = held.unshared.union(span(off - LOCK_SHARED_BASE, len));
    }
    Ok(())
}

/// Release the bytes of `*held` not in `keep`.
fn release(file: &File, held: &mut Held, keep: Held) -> io::Result<()> {
    let drop_perm = Perms(held.perm.0 & !keep.perm.0);
    let drop_unshared = Perms(held.unshared.0 & !keep.unshared.0);
    for (off, len) in Held::runs(LOCK_PERM_BASE, drop_perm)
        .into_iter()
        .chain(Held::runs(LOCK_SHARED_BASE, drop_unshared))
    {
        sys::ofd_setlk(file, off, len, LockType::Unlock)
            .map_err(|e| with_context(e, format!("Failed to unlock byte {off}")))?;
    }
    held.perm = Perms(held.perm.0 & keep.perm.0);
    held.unshared = Perms(held.unshared.0 & keep.unshared.0);
    Ok(())
}

/// Test that nobody else holds what `req` conflicts with (QEMU's `raw_check_lock_bytes`,
/// in its order, so the first conflict named is the one QEMU names). Adjacent bytes are
/// tested in one call; only a run with a conflict is tested byte by byte, to name it.
fn check(file: &File, req: LockRequest) -> io::Result<()> {
    for (base, set, shared) in [
        (LOCK_SHARED_BASE, req.perm, false),
        (LOCK_PERM_BASE, req.shared.complement(), true),
    ] {
        for (off, len) in Held::runs(base, set) {
            if test(file, off, len)? {
                for byte in off..off + len {
                    if len == 1 || test(file, byte, 1)? {
                        let perm = span(byte - base, 1);
                        return Err(io::Error::new(
                            io::ErrorKind::ResourceBusy,
                            LockConflict { perm, shared },
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether another open file description holds a lock on `len` bytes at `off`.
fn test(file: &File, off: u64, len: u64) -> io::Result<bool> {
    let conflict = sys::ofd_getlk(file, off, len, LockType::Write)
        .map_err(|e| with_context(e, format!("Failed to test lock byte {off}")))?;
    Ok(conflict.is_some())
}

/// Take `req` on `file` (already holding `*held`): apply, test, then drop the bytes no
/// longer needed. On failure `*held` is what it was before. Returns `false` when
/// `locking` is `Auto` and the kernel has no OFD locks (nothing is held then).
pub(crate) fn acquire(
    file: &File,
    held: &mut Held,
    req: LockRequest,
    locking: Locking,
) -> io::Result<bool> {
    let before = *held;
    let target = Held::of(req);
    // Only dropping permissions or sharing more: nothing to test (QEMU's shortcut).
    let narrowing = before.perm.contains(target.perm) && before.unshared.contains(target.unshared);
    if !narrowing {
        if let Err(e) = apply(file, held, before.union(target)) {
            let _ = release(file, held, before);
            // EINVAL on the very first lock: no OFD locks in this kernel.
            if crate::raw_os_error_of(&e) == Some(libc::EINVAL) && before == Held::default() {
                if locking == Locking::Auto {
                    return Ok(false);
                }
                return Err(with_context(
                    e,
                    "locking=on: the kernel has no open file description locks (Linux 3.15+); \
                     use locking=off",
                ));
            }
            return Err(e);
        }
        if let Err(e) = check(file, req) {
            let _ = release(file, held, before);
            return Err(e);
        }
    }
    release(file, held, target)?;
    Ok(true)
}

/// Release every byte in `*held`: both lock areas in one call each (only this
/// description's locks are touched).
pub(crate) fn release_all(file: &File, held: &mut Held) -> io::Result<()> {
    for base in [LOCK_PERM_BASE, LOCK_SHARED_BASE] {
        sys::ofd_setlk(file, base, 4, LockType::Unlock)
            .map_err(|e| with_context(e, format!("Failed to unlock byte {base}")))?;
    }
    *held = Held::default();
    Ok(())
}
