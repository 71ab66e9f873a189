//! `FileStorage`: the backend for regular files and block devices, its open options, and
//! the `Storage` impl. Reads/writes live in `file_io.rs`, discard/zeroing in `file_zero.rs`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::blockdev::{queue_limits, QueueLimits};
use crate::error::{errno, with_context};
use crate::lock::{self, Held, LockRequest, Locking};
use crate::probe::Probe;
use crate::storage::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};
use crate::sys;

/// How to open a [`FileStorage`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open read-only; every mutation then fails with `EROFS`.
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the page cache). Any offset/length still works: unaligned
    /// requests are bounced through an [`AlignedBuf`](crate::AlignedBuf).
    pub direct: bool,
    /// Create the file if it does not exist (new images).
    pub create: bool,
    /// Truncate an existing regular file to zero length (new images), after `lock` is
    /// taken: an image in use is never truncated. Block devices are not truncated.
    pub truncate: bool,
    /// QEMU's image locks to take right after opening (see [`LockRequest`]); `None` takes
    /// none. Held until the storage is dropped.
    pub lock: Option<LockRequest>,
    /// Whether `lock` is honoured (QEMU's `file.locking`; default `Auto`).
    pub locking: Locking,
    /// Primitives to treat as unsupported from the start (e.g. to force a fallback path or
    /// to honour a "no discard" setting).
    pub disabled: Vec<Primitive>,
}

impl FileOptions {
    /// Options for opening an existing image read-write, buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Options for creating (or truncating) a new image read-write. Takes QEMU's
    /// [`LockRequest::CREATOR`] locks before truncating, as `qemu-img create` does.
    pub fn create_new() -> Self {
        Self {
            create: true,
            truncate: true,
            lock: Some(LockRequest::CREATOR),
            ..Self::default()
        }
    }

    /// Set `read_only`.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Set `direct`.
    pub fn direct(mut self, yes: bool) -> Self {
        self.direct = yes;
        self
    }

    /// Set `lock`.
    pub fn lock(mut self, req: Option<LockRequest>) -> Self {
        self.lock = req;
        self
    }

    /// Set `locking`.
    pub fn locking(mut self, mode: Locking) -> Self {
        self.locking = mode;
        self
    }

    /// Add a primitive to `disabled`.
    pub fn disable(mut self, p: Primitive) -> Self {
        self.disabled.push(p);
        self
    }
}

/// A host primitive whose availability is probed and remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Primitive {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a regular file.
    PunchHole,
    /// `fallocate(ZERO_RANGE)` on a regular file.
    ZeroRange,
    /// `fallocate(FALLOC_FL_WRITE_ZEROES)` on a regular file (Linux 6.17+).
    WriteZeroesFlag,
    /// `fallocate(0)` on a regular file.
    Fallocate,
    /// `ioctl(BLKDISCARD)` on a block device.
    BlkDiscard,
    /// `ioctl(BLKZEROOUT)` on a block device.
    BlkZeroOut,
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a block device (unmapping zeroout).
    BlkUnmapZero,
}

/// Sticky availability of every primitive.
#[derive(Debug, Default)]
pub(crate) struct Probes {
    pub(crate) punch: Probe,
    pub(crate) zero_range: Probe,
    pub(crate) write_zeroes_flag: Probe,
    pub(crate) fallocate: Probe,
    pub(crate) blk_discard: Probe,
    pub(crate) blk_zeroout: Probe,
    pub(crate) blk_unmap_zero: Probe,
}

impl Probes {
    pub(crate) fn get(&self, p: Primitive) -> &Probe {
        match p {
            Primitive::PunchHole => &self.punch,
            Primitive::ZeroRange => &self.zero_range,
            Primitive::WriteZeroesFlag => &self.write_zeroes_flag,
            Primitive::Fallocate => &self.fallocate,
            Primitive::BlkDiscard => &self.blk_discard,
            Primitive::BlkZeroOut => &self.blk_zeroout,
            Primitive::BlkUnmapZero => &self.blk_unmap_zero,
        }
    }
}

/// A regular file or block device under an image.
///
/// Positioned I/O only (no shared file position), so it is `Sync` and disjoint writes may run
/// concurrently. In direct mode, unaligned writes do a read-modify-write of their edge
/// blocks under an internal exclusive lock; aligned writes take it shared.
#[derive(Debug)]
pub struct FileStorage {
    pub(crate) file: File,
    path: PathBuf,
    pub(crate) block_device: bool,
    pub(crate) read_only: bool,
    pub(crate) direct: bool,
    /// Alignment of offsets, lengths and buffers for I/O: 1 when buffered.
    pub(crate) align: u64,
    /// Logical block size of a block device (512 for files).
    pub(crate) logical_block_size: u32,
    /// Filesystem block size of a regular file (`st_blksize`).
    fs_block_size: u32,
    pub(crate) queue: QueueLimits,
    pub(crate) probes: Probes,
    /// Serialises direct-mode read-modify-write against other writes and length changes.
    pub(crate) rmw: RwLock<()>,
    /// QEMU's image lock bytes held through this descriptor.
    held: Mutex<Held>,
    /// Whether locks are taken (`FileOptions::locking`).
    locking: Locking,
    /// Flushes issued (statistics).
    flushes: std::sync::atomic::AtomicU64,
    /// Discard and write-zeroes calls (statistics).
    discards: std::sync::atomic::AtomicU64,
    zeroes: std::sync::atomic::AtomicU64,
}

impl FileStorage {
    /// Open `path` (a regular file or a block device). Errors name the path once ("Could
    /// not open 'PATH': ...") and keep the errno (see [`raw_os_error_of`](crate::raw_os_error_of)).
    pub fn open(path: impl AsRef<Path>, opts: &FileOptions) -> io::Result<Self> {
        let path = path.as_ref();
        Self::open_inner(path, opts).map_err(|e| {
            let verb = if opts.create { "create" } else { "open" };
            with_context(e, format!("Could not {verb} '{}'", path.display()))
        })
    }

    /// Use a descriptor the caller already has (management stacks pass descriptors, e.g.
    /// through `SCM_RIGHTS`), taking ownership of it: pass a `dup` to keep your own.
    ///
    /// The descriptor's access mode must allow what `opts` asks (`O_RDWR` unless
    /// `read_only`: else `EBADF`), it must not be `O_APPEND` (`EINVAL`: positioned writes
    /// would append), and `O_DIRECT` is taken from it (`opts.direct` without `O_DIRECT` on
    /// the descriptor is `EINVAL`; the library does not change the status flags, which are
    /// shared with every duplicate). `create` is refused; `truncate` and `lock` work as for
    /// [`open`](Self::open). Locks belong to the open file description, so a duplicate of
    /// this descriptor held elsewhere shares them (it is not excluded); they are released
    /// when the storage is dropped even though the description may live on. The path (for
    /// messages and [`path`](Self::path)) is read from `/proc/self/fd`.
    pub fn from_fd(fd: OwnedFd, opts: &FileOptions) -> io::Result<Self> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let path = std::fs::read_link(format!("/proc/self/fd/{raw}"))
            .unwrap_or_else(|_| PathBuf::from(format!("/proc/self/fd/{raw}")));
        let context = |e| {
            with_context(
                e,
                format!("Could not use '{}' (descriptor {raw})", path.display()),
            )
        };
        let flags = sys::status_flags(&file).map_err(context)?;
        let access = flags & libc::O_ACCMODE;
        let why = if access == libc::O_WRONLY {
            Some((
                libc::EBADF,
                "the descriptor is write-only; it must be readable",
            ))
        } else if access == libc::O_RDONLY && !opts.read_only {
            Some((
                libc::EBADF,
                "the descriptor is read-only; open it O_RDWR or open the image read-only",
            ))
        } else if flags & libc::O_APPEND != 0 {
            Some((
                libc::EINVAL,
                "the descriptor is O_APPEND, so positioned writes would append",
            ))
        } else if opts.direct && flags & libc::O_DIRECT == 0 {
            Some((
                libc::EINVAL,
                "direct I/O was asked for but the descriptor is not O_DIRECT",
            ))
        } else if opts.create || (opts.read_only && opts.truncate) {
            Some((
                libc::EINVAL,
                "create, or truncate of a read-only descriptor, was asked for",
            ))
        } else {
            None
        };
        if let Some((code, why)) = why {
            return Err(context(with_context(errno(code), why)));
        }
        let direct = flags & libc::O_DIRECT != 0;
        Self::finish(file, path.clone(), opts, direct).map_err(context)
    }

    fn open_inner(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        if opts.read_only && (opts.create || opts.truncate) {
            return Err(errno(libc::EINVAL));
        }
        let mut oo = OpenOptions::new();
        // Truncation waits for the locks (in `finish`): an image in use stays intact.
        oo.read(true).write(!opts.read_only).create(opts.create);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        Self::finish(file, path.to_path_buf(), opts, opts.direct)
    }

    /// Probe an open file, take its locks, then truncate it if asked.
    fn finish(file: File, path: PathBuf, opts: &FileOptions, direct: bool) -> io::Result<Self> {
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        if !block_device && !ft.is_file() {
            return Err(errno(libc::EINVAL));
        }
        let (logical_block_size, queue) = if block_device {
            let lbs = sys::blk_sszget(&file)?;
            // Read the size once at open: fails early on a device that cannot report it.
            sys::blk_getsize64(&file)?;
            (lbs, queue_limits(meta.rdev()))
        } else {
            (512, QueueLimits::default())
        };
        let fs_block_size = u32::try_from(meta.blksize())
            .ok()
            .filter(|b| b.is_power_of_two() && (512..=(1 << 20)).contains(b))
            .unwrap_or(4096);
        let align = match (direct, block_device) {
            (false, _) => 1,
            (true, true) => u64::from(logical_block_size.max(512)),
            // The filesystem block size satisfies every filesystem's O_DIRECT rules.
            (true, false) => u64::from(fs_block_size),
        };
        if !align.is_power_of_two() {
            return Err(errno(libc::EINVAL));
        }
        let s = Self {
            file,
            path,
            block_device,
            read_only: opts.read_only,
            direct,
            align,
            logical_block_size,
            fs_block_size,
            queue,
            probes: Probes::default(),
            rmw: RwLock::new(()),
            held: Mutex::new(Held::default()),
            locking: opts.locking,
            flushes: Default::default(),
            discards: Default::default(),
            zeroes: Default::default(),
        };
        for p in &opts.disabled {
            s.disable_primitive(*p);
        }
        if let Some(req) = opts.lock {
            s.lock(req)?;
        }
        if opts.truncate && !block_device {
            s.file.set_len(0)?;
        }
        Ok(s)
    }

    /// Take QEMU's image locks for `req` (or change the ones held to `req`), as
    /// `FileOptions::lock` does at open: apply, then test for conflicts. Returns whether
    /// locks are held: `false` with `locking=off`, or `auto` on a kernel without OFD locks.
    /// A conflict is an error holding a [`LockConflict`](crate::LockConflict); the locks
    /// held before the call are then unchanged.
    pub fn lock(&self, req: LockRequest) -> io::Result<bool> {
        if self.locking == Locking::Off {
            return Ok(false);
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        lock::acquire(&self.file, &mut held, req, self.locking)
    }

    /// Release every image lock held through this storage.
    pub fn unlock(&self) -> io::Result<()> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        lock::release_all(&self.file, &mut held)
    }

    /// The lock request currently held (permissions taken, permissions shared), or `None`
    /// when no lock byte is held.
    pub fn held_lock(&self) -> Option<LockRequest> {
        let held = *self.held.lock().unwrap_or_else(|e| e.into_inner());
        (held != Held::default()).then(|| held.request())
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for `fstat` and the like; do not change its length behind the
    /// storage's back in direct mode).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether this is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether it was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Treat `p` as unsupported from now on (sticky, like a probe that failed).
    pub fn disable_primitive(&self, p: Primitive) {
        self.probes.get(p).disable();
    }

    /// Whether `p` may still be tried (not disabled and not probed unsupported).
    pub fn primitive_usable(&self, p: Primitive) -> bool {
        self.probes.get(p).usable()
    }

    /// Whether `p` has succeeded at least once on this storage.
    pub fn primitive_known_working(&self, p: Primitive) -> bool {
        self.probes.get(p).known_working()
    }

    /// The first offset `>= offset` holding data (`SEEK_DATA`), or `None` if there is no data
    /// after `offset`. Filesystems without hole tracking report everything as data.
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        sys::seek_data_or_hole(&self.file, offset, true)
    }

    /// The first offset `>= offset` inside a hole (`SEEK_HOLE`; end of file counts as a
    /// hole), or `None` if `offset` is at or past the end.
    pub fn next_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        sys::seek_data_or_hole(&self.file, offset, false)
    }

    /// Refuse a mutation on a read-only storage.
    pub(crate) fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Current length without taking the direct-mode lock.
    pub(crate) fn raw_len(&self) -> io::Result<u64> {
        if self.block_device {
            sys::blk_getsize64(&self.file)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// `ftruncate` a regular file, holding the direct-mode lock exclusively.
    pub(crate) fn truncate_locked(&self, len: u64) -> io::Result<()> {
        let _guard = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        self.file.set_len(len)
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Closing the descriptor releases the locks unless the open file description lives
        // on in a duplicate (`from_fd`): release them explicitly.
        let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        if *held != Held::default() {
            let _ = lock::release_all(&self.file, held);
        }
    }
}

impl Storage for FileStorage {
    #[inline]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // One pread fills a buffered read in the common case; short reads (end of file,
        // signals), errors and direct I/O take the general path.
        if !self.direct {
            if let Ok(n) = self.file.read_at(buf, offset) {
                if n == buf.len() {
                    return Ok(());
                }
            }
        }
        self.do_read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.do_write(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        self.do_read_vectored(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.do_write_vectored(bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.file.sync_data()
    }

    fn flush_count(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn discard_count(&self) -> u64 {
        self.discards.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn zero_count(&self) -> u64 {
        self.zeroes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn len(&self) -> io::Result<u64> {
        let _guard = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        self.raw_len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if self.block_device {
            return if len == self.raw_len()? {
                Ok(())
            } else {
                Err(errno(libc::EOPNOTSUPP))
            };
        }
        crate::error::end_of(len, 0)?;
        self.truncate_locked(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.do_allocate(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        self.discards
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.do_discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        self.zeroes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.do_write_zeroes(offset, len, mode)
    }

    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if len == 0 || self.is_block_device() {
            return Ok((true, len));
        }
        let end = offset.saturating_add(len);
        // SEEK_DATA from `offset`: data starting right here means a data run up to the next
        // hole; otherwise a hole up to the next data (or to the end of the file).
        match self.next_data(offset)? {
            Some(d) if d <= offset => {
                let h = self.next_hole(offset)?.unwrap_or(end);
                Ok((true, h.min(end) - offset))
            }
            Some(d) => Ok((false, d.min(end) - offset)),
            None => Ok((false, len)),
        }
    }

    fn as_file(&self) -> Option<&FileStorage> {
        Some(self)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        if self.is_block_device() {
            return Ok(None);
        }
        use std::os::unix::fs::MetadataExt;
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn capabilities(&self) -> Capabilities {
        let p = &self.probes;
        let io_alignment = u32::try_from(self.align).unwrap_or(u32::MAX);
        if self.block_device {
            let discard = self.queue.can_discard() && p.blk_discard.usable();
            let granularity = self
                .queue
                .discard_granularity
                .map(|g| u32::try_from(g).unwrap_or(u32::MAX))
                .unwrap_or(self.logical_block_size);
            Capabilities {
                discard,
                zero_keep_allocated: p.blk_zeroout.usable(),
                zero_unmap: self.queue.write_zeroes_max_bytes != Some(0)
                    && p.blk_unmap_zero.usable(),
                discard_reads_zero: false,
                discard_granularity: if discard { granularity } else { 0 },
                logical_block_size: self.logical_block_size,
                io_alignment,
                is_block_device: true,
                read_only: self.read_only,
            }
        } else {
            let discard = p.punch.usable();
            Capabilities {
                discard,
                zero_keep_allocated: p.write_zeroes_flag.usable()
                    || p.zero_range.usable()
                    || (p.punch.usable() && p.fallocate.usable()),
                zero_unmap: discard,
                discard_reads_zero: discard,
                discard_granularity: if discard { self.fs_block_size } else { 0 },
                logical_block_size: if self.direct { io_alignment } else { 512 },
                io_alignment,
                is_block_device: false,
                read_only: self.read_only,
            }
        }
    }
}
