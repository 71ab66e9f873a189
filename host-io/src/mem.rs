//! `MemStorage`: an in-memory, sparse backend that tracks allocation per 4 KiB block, with
//! configurable capabilities so tests can drive the engine down every fallback path.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use crate::error::{end_of, errno, len64};
use crate::storage::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};

/// Allocation-tracking granularity of [`MemStorage`] in bytes.
pub const MEM_BLOCK_SIZE: u64 = 4096;

/// Byte written over blocks discarded on a backend whose discards do not read back zero,
/// so code that wrongly relies on zeros after a discard sees garbage.
pub const DISCARD_FILL: u8 = 0xA5;

/// Behaviour of a [`MemStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOptions {
    /// `discard` releases blocks; if false it returns `DiscardOutcome::Unsupported`.
    pub discard: bool,
    /// `write_zeroes(KeepAllocated)` has a cheap primitive; if false the backend reports
    /// `ZeroMethod::WroteZeroBuffers` (the effect is the same: zero and allocated).
    pub zero_keep: bool,
    /// `write_zeroes(Unmap)` may release blocks; if false it falls back to the keep path.
    pub zero_unmap: bool,
    /// Discarded blocks read back zero; if false they read [`DISCARD_FILL`].
    pub discard_reads_zero: bool,
    /// Behave like a block device: fixed size, writes past the end fail with `ENOSPC`,
    /// `set_len` to another size fails with `EOPNOTSUPP`.
    pub block_device: bool,
    /// Refuse every mutation with `EROFS`.
    pub read_only: bool,
    /// Largest length the storage may grow to; beyond it writes fail with `EFBIG`.
    pub max_len: u64,
}

impl MemOptions {
    /// Like a regular file on ext4/xfs: everything supported, discards read zero.
    pub fn file_like() -> Self {
        Self {
            discard: true,
            zero_keep: true,
            zero_unmap: true,
            discard_reads_zero: true,
            block_device: false,
            read_only: false,
            max_len: 1 << 40,
        }
    }

    /// Like a thin-provisioned block device: discard works but does not promise zeros,
    /// zeroing keeps allocation, the size is fixed.
    pub fn device_like() -> Self {
        Self {
            discard: true,
            zero_keep: true,
            zero_unmap: false,
            discard_reads_zero: false,
            block_device: true,
            read_only: false,
            max_len: 1 << 40,
        }
    }

    /// Like a filesystem without any discard or zeroing primitive (e.g. old NFS).
    pub fn no_primitives() -> Self {
        Self {
            discard: false,
            zero_keep: false,
            zero_unmap: false,
            discard_reads_zero: false,
            ..Self::file_like()
        }
    }
}

impl Default for MemOptions {
    fn default() -> Self {
        Self::file_like()
    }
}

/// One 4 KiB block: its bytes and whether the host would count it as allocated.
#[derive(Debug, Clone)]
struct Block {
    data: Box<[u8]>,
    allocated: bool,
}

impl Block {
    fn zeroed() -> Self {
        Self {
            data: vec![0u8; MEM_BLOCK_SIZE as usize].into_boxed_slice(),
            allocated: true,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Inner {
    len: u64,
    /// Absent blocks read zero and are unallocated.
    blocks: BTreeMap<u64, Block>,
}

/// Split `[offset, end)` into per-block pieces: (block index, start in block, end in block).
fn pieces(offset: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / MEM_BLOCK_SIZE;
        let start = pos % MEM_BLOCK_SIZE;
        let stop = (end - idx * MEM_BLOCK_SIZE).min(MEM_BLOCK_SIZE);
        pos = idx * MEM_BLOCK_SIZE + stop;
        Some((idx, start as usize, stop as usize))
    })
}

impl Inner {
    fn read(&self, buf: &mut [u8], offset: u64) {
        buf.fill(0);
        let end = offset.saturating_add(len64(buf)).min(self.len);
        let mut done = 0usize;
        for (idx, s, e) in pieces(offset, end.max(offset)) {
            if let Some(b) = self.blocks.get(&idx) {
                buf[done..done + (e - s)].copy_from_slice(&b.data[s..e]);
            }
            done += e - s;
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) {
        let mut done = 0usize;
        for (idx, s, e) in pieces(offset, offset + len64(buf)) {
            let b = self.blocks.entry(idx).or_insert_with(Block::zeroed);
            b.data[s..e].copy_from_slice(&buf[done..done + (e - s)]);
            b.allocated = true;
            done += e - s;
        }
        self.len = self.len.max(offset + len64(buf));
    }

    /// Zero `[offset, end)` leaving every touched block allocated.
    fn zero_keep(&mut self, offset: u64, end: u64) {
        for (idx, s, e) in pieces(offset, end) {
            let b = self.blocks.entry(idx).or_insert_with(Block::zeroed);
            b.data[s..e].fill(0);
            b.allocated = true;
        }
        self.len = self.len.max(end);
    }

    /// Release whole blocks inside `[offset, end)` (clipped to the length). Partial blocks
    /// are zeroed if `zero_partial`. Released blocks read zero if `reads_zero`, else
    /// [`DISCARD_FILL`].
    fn release(&mut self, offset: u64, end: u64, zero_partial: bool, reads_zero: bool) {
        let end = end.min(self.len);
        for (idx, s, e) in pieces(offset, end.max(offset)) {
            let whole = s == 0
                && (e == MEM_BLOCK_SIZE as usize || idx * MEM_BLOCK_SIZE + e as u64 == self.len);
            if whole {
                if reads_zero {
                    self.blocks.remove(&idx);
                } else {
                    let mut data = vec![DISCARD_FILL; MEM_BLOCK_SIZE as usize].into_boxed_slice();
                    // Bytes past the length must stay zero (they read zero after growth).
                    let valid = (self.len - idx * MEM_BLOCK_SIZE).min(MEM_BLOCK_SIZE) as usize;
                    data[valid..].fill(0);
                    self.blocks.insert(
                        idx,
                        Block {
                            data,
                            allocated: false,
                        },
                    );
                }
            } else if zero_partial {
                if let Some(b) = self.blocks.get_mut(&idx) {
                    b.data[s..e].fill(0);
                }
            }
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            let first_gone = len.div_ceil(MEM_BLOCK_SIZE);
            self.blocks.split_off(&first_gone);
            let tail = (len % MEM_BLOCK_SIZE) as usize;
            if tail != 0 {
                if let Some(b) = self.blocks.get_mut(&(len / MEM_BLOCK_SIZE)) {
                    b.data[tail..].fill(0);
                }
            }
        }
        self.len = len;
    }

    fn allocate(&mut self, offset: u64, end: u64) {
        for (idx, _, _) in pieces(offset, end) {
            self.blocks
                .entry(idx)
                .or_insert_with(Block::zeroed)
                .allocated = true;
        }
        self.len = self.len.max(end);
    }

    fn data_run(&self, offset: u64, end: u64) -> (bool, u64) {
        let first = offset / MEM_BLOCK_SIZE;
        let state = self.blocks.get(&first).is_some_and(|b| b.allocated);
        let mut stop = first + 1;
        if state {
            // Extend over consecutive allocated blocks.
            for (&i, b) in self.blocks.range(first + 1..) {
                if i != stop || !b.allocated || i * MEM_BLOCK_SIZE >= end {
                    break;
                }
                stop = i + 1;
            }
        } else {
            // A hole lasts until the next allocated block.
            stop = self
                .blocks
                .range(first + 1..)
                .find(|(_, b)| b.allocated)
                .map_or(u64::MAX / MEM_BLOCK_SIZE, |(&i, _)| i);
        }
        (state, stop.saturating_mul(MEM_BLOCK_SIZE).min(end) - offset)
    }

    fn allocated_in(&self, offset: u64, end: u64) -> u64 {
        if end <= offset {
            return 0;
        }
        let first = offset / MEM_BLOCK_SIZE;
        let last = (end - 1) / MEM_BLOCK_SIZE;
        self.blocks
            .range(first..=last)
            .filter(|(_, b)| b.allocated)
            .count() as u64
            * MEM_BLOCK_SIZE
    }
}

/// In-memory storage for tests. Sparse (absent blocks cost nothing), allocation tracked per
/// [`MEM_BLOCK_SIZE`] block so tests can tell punched ranges from anchored ones.
#[derive(Debug, Default)]
pub struct MemStorage {
    inner: Mutex<Inner>,
    opts: MemOptions,
    flushes: std::sync::atomic::AtomicU64,
}

impl MemStorage {
    /// An empty, file-like storage.
    pub fn new() -> Self {
        Self::with_options(MemOptions::file_like())
    }

    /// An empty storage with the given behaviour. For a `block_device` storage use
    /// [`MemStorage::from_vec_with`] or [`MemStorage::device`] to give it a size.
    pub fn with_options(opts: MemOptions) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            flushes: Default::default(),
            opts,
        }
    }

    /// A device-like storage of `size` bytes, all unallocated and zero.
    pub fn device(size: u64) -> Self {
        let s = Self::with_options(MemOptions::device_like());
        s.lock().len = size;
        s
    }

    /// A file-like storage holding `data`, every block allocated.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self::from_vec_with(data, MemOptions::file_like())
    }

    /// A storage holding `data` with the given behaviour, every block allocated.
    pub fn from_vec_with(data: Vec<u8>, opts: MemOptions) -> Self {
        let mut inner = Inner::default();
        inner.write(&data, 0);
        Self {
            inner: Mutex::new(inner),
            flushes: Default::default(),
            opts,
        }
    }

    /// The behaviour this storage was built with.
    pub fn options(&self) -> MemOptions {
        self.opts
    }

    /// A deep, independent copy (content, allocation and options).
    pub fn snapshot(&self) -> MemStorage {
        MemStorage {
            inner: Mutex::new(self.lock().clone()),
            flushes: Default::default(),
            opts: self.opts,
        }
    }

    /// The whole content as a vector of `len()` bytes. Allocates `len()` bytes, so only
    /// call it on storage of a size that fits in memory.
    pub fn to_vec(&self) -> Vec<u8> {
        let inner = self.lock();
        let mut v = vec![0u8; usize::try_from(inner.len).unwrap_or(usize::MAX)];
        inner.read(&mut v, 0);
        v
    }

    /// Bytes in allocated blocks (a multiple of [`MEM_BLOCK_SIZE`]).
    pub fn allocated_bytes(&self) -> u64 {
        let inner = self.lock();
        inner.blocks.values().filter(|b| b.allocated).count() as u64 * MEM_BLOCK_SIZE
    }

    /// Bytes in allocated blocks among the blocks touching `[offset, offset + len)`. Equal to
    /// the block-rounded range size when the range is fully allocated, 0 when fully released.
    pub fn allocated_in(&self, offset: u64, len: u64) -> u64 {
        self.lock().allocated_in(offset, offset.saturating_add(len))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Common checks for a mutation ending at `end`.
    fn check_mutation(&self, inner: &Inner, end: u64) -> io::Result<()> {
        if self.opts.read_only {
            return Err(errno(libc::EROFS));
        }
        if self.opts.block_device && end > inner.len {
            return Err(errno(libc::ENOSPC));
        }
        if end > self.opts.max_len {
            return Err(errno(libc::EFBIG));
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        end_of(offset, len64(buf))?;
        self.lock().read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, len64(buf))?;
        let mut inner = self.lock();
        self.check_mutation(&inner, end)?;
        inner.write(buf, offset);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn flush_count(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        end_of(len, 0)?;
        let mut inner = self.lock();
        if self.opts.read_only {
            return Err(errno(libc::EROFS));
        }
        if self.opts.block_device {
            return if len == inner.len {
                Ok(())
            } else {
                Err(errno(libc::EOPNOTSUPP))
            };
        }
        if len > self.opts.max_len {
            return Err(errno(libc::EFBIG));
        }
        inner.set_len(len);
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = end_of(offset, len)?;
        let mut inner = self.lock();
        self.check_mutation(&inner, end)?;
        inner.allocate(offset, end);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        let end = end_of(offset, len)?;
        let mut inner = self.lock();
        if self.opts.read_only {
            return Err(errno(libc::EROFS));
        }
        if !self.opts.discard {
            return Ok(DiscardOutcome::Unsupported);
        }
        // Files zero partial blocks when punching; devices leave them alone.
        let reads_zero = self.opts.discard_reads_zero;
        inner.release(offset, end, reads_zero, reads_zero);
        Ok(DiscardOutcome::Released)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        let end = end_of(offset, len)?;
        let mut inner = self.lock();
        self.check_mutation(&inner, end)?;
        if mode == ZeroMode::Unmap && self.opts.zero_unmap {
            inner.release(offset, end, true, true);
            inner.len = inner.len.max(end);
            return Ok(ZeroMethod::Memory);
        }
        inner.zero_keep(offset, end);
        Ok(if self.opts.zero_keep {
            ZeroMethod::Memory
        } else {
            ZeroMethod::WroteZeroBuffers
        })
    }

    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if len == 0 {
            return Ok((true, 0));
        }
        Ok(self.lock().data_run(offset, offset.saturating_add(len)))
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.allocated_bytes()))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            discard: self.opts.discard,
            zero_keep_allocated: self.opts.zero_keep,
            zero_unmap: self.opts.zero_unmap,
            discard_reads_zero: self.opts.discard && self.opts.discard_reads_zero,
            discard_granularity: if self.opts.discard {
                MEM_BLOCK_SIZE as u32
            } else {
                0
            },
            logical_block_size: 512,
            io_alignment: 1,
            is_block_device: self.opts.block_device,
            read_only: self.opts.read_only,
        }
    }
}
