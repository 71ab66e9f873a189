//! Metadata state of an open image, guarded by the image's one metadata lock: header, L1
//! and refcount tables in memory, the L2 and refcount-block caches, and the write-back
//! ordering between them.
//!
//! Ordering (as QEMU's cache dependencies):
//! - allocation: refcount blocks reach disk and are synced before L2 entries that point at
//!   the new clusters (`Dep::L2AfterRefcounts`);
//! - freeing: L2 entries reach disk and are synced before the refcount decrements
//!   (`Dep::RefcountsAfterL2`);
//! - copy-on-write / zero-fill data must be durable before the L2 entry that exposes it
//!   (`l2_needs_sync`).
//!
//! Switching direction writes the pending side first.

use std::collections::BTreeMap;
use std::sync::Arc;

use host_io::Storage;
use qcow2_format::{Geometry, HeaderArea, SnapshotEntry};

use crate::cache::TableCache;
use crate::error::{corrupt, Error, Result};

/// Which write-back order is currently required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dep {
    None,
    /// L2 slices may only be written after refcount blocks are written and synced.
    L2AfterRefcounts,
    /// Refcount blocks may only be written after L2 slices are written and synced.
    RefcountsAfterL2,
}

/// Which cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    L2,
    Refcount,
}

/// What a metadata range holds (for overlap checks and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    SnapshotL1,
}

/// A host operation queued by the discard/zero policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostOpKind {
    /// Release the range (PUNCH_HOLE / BLKDISCARD).
    Discard,
    /// Zero the range, keeping it allocated (anchor).
    ZeroKeep,
}

/// A queued host operation on whole clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostOp {
    pub off: u64,
    pub len: u64,
    pub kind: HostOpKind,
}

/// The metadata of an open image.
pub(crate) struct Meta {
    pub storage: Arc<dyn Storage>,
    pub geo: Geometry,
    pub area: HeaderArea,
    pub read_only: bool,
    /// Active L1 table, raw entries.
    pub l1: Vec<u64>,
    /// Entries from this index on lie past the end of the file (read-only opens of a
    /// damaged image only): lookups there fail instead of reading as unallocated.
    pub l1_past_eof: usize,
    /// Refcount table, raw entries.
    pub reftable: Vec<u64>,
    pub l2_cache: TableCache,
    pub rb_cache: TableCache,
    pub dep: Dep,
    pub l2_needs_sync: bool,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// First byte past every allocated cluster (cluster aligned, never shrinks).
    pub alloc_end: u64,
    /// Host clusters with lock-free data I/O in flight: never reallocated meanwhile.
    pub inflight: crate::cache::OffsetMap<u32>,
    /// Metadata ranges: start -> (end, kind).
    pub meta_ranges: BTreeMap<u64, (u64, MetaKind)>,
    pub snapshots: Vec<SnapshotEntry>,
    /// Set once an inconsistency was found; all further writes are refused.
    pub corrupt: bool,
    /// The first metadata change has done its header bookkeeping (autoclear, dirty bit).
    pub first_write_done: bool,
    /// This handle set the dirty bit (lazy refcounts) and clears it on clean close.
    pub dirty_set_by_us: bool,
    /// The discard / write-zeroes policy in force.
    pub policy: crate::policy::Policy,
    /// Host operations waiting to be issued (merged when issued).
    pub host_ops: Vec<HostOp>,
    /// Some queued operation needs the metadata durable first (freed metadata clusters).
    pub host_ops_need_sync: bool,
    /// Host operations issued and failed (advisory: counted, not fatal).
    pub host_op_failures: u64,
    /// Freed clusters (refcount 0) whose host discard is deferred: issued at flush, when
    /// many are pending, or never if the cluster is allocated again first (its new data
    /// overwrites it, so punching it would only cost time).
    pub deferred_discards: std::collections::BTreeSet<u64>,
    /// A deferred discard frees metadata: the metadata must be durable before it is issued.
    pub deferred_need_sync: bool,
    /// Bumped whenever a cluster's refcount drops to zero (it may then be reused). Readers
    /// resolve under the lock, read without it, and retry if this moved meanwhile.
    pub free_gen: Arc<std::sync::atomic::AtomicU64>,
}

/// Deferred host discards are issued once this many clusters wait.
const MAX_DEFERRED_CLUSTERS: usize = 4096;

impl Meta {
    pub(crate) fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Read bytes from the host, naming what for in the error.
    pub(crate) fn read_host(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.storage
            .read_at(buf, off)
            .map_err(Error::io_lazy(|| format!("reading {what} at {off:#x}")))
    }

    /// Write bytes to the host after checking that they do not land on metadata other than
    /// `allowed` (the structure being written).
    pub(crate) fn write_host(
        &mut self,
        buf: &[u8],
        off: u64,
        allowed: Option<MetaKind>,
        what: &str,
    ) -> Result<()> {
        self.check_overlap(off, buf.len() as u64, allowed, what)?;
        self.storage
            .write_at(buf, off)
            .map_err(Error::io_lazy(|| format!("writing {what} at {off:#x}")))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(Error::io("flushing the image file"))
    }

    // ---- overlap checks ----

    pub(crate) fn add_meta(&mut self, start: u64, len: u64, kind: MetaKind) {
        if len > 0 {
            self.meta_ranges.insert(start, (start + len, kind));
        }
    }

    pub(crate) fn remove_meta(&mut self, start: u64) {
        self.meta_ranges.remove(&start);
    }

    /// The metadata range overlapping `[start, start+len)`, if any.
    pub(crate) fn overlapping_meta(&self, start: u64, len: u64) -> Option<(u64, u64, MetaKind)> {
        let end = start.checked_add(len)?;
        let (&s, &(e, k)) = self.meta_ranges.range(..end).next_back()?;
        (e > start).then_some((s, e, k))
    }

    /// Refuse (and mark the image corrupt) a write that would land on metadata, or guest
    /// data (`allowed` is `None`) that would land past the image's clusters: every cluster
    /// in use lies inside the file or was allocated since open, so an L2 entry pointing
    /// further is corrupt, and following it would grow the file to whatever it claims.
    pub(crate) fn check_overlap(
        &mut self,
        start: u64,
        len: u64,
        allowed: Option<MetaKind>,
        what: &str,
    ) -> Result<()> {
        if allowed.is_none() && start.saturating_add(len) > self.alloc_end {
            let msg = format!(
                "preventing {what} write at {start:#x}+{len:#x}: past the end of the image ({:#x})",
                self.alloc_end
            );
            self.mark_corrupt();
            return Err(corrupt!("{msg}"));
        }
        if let Some((s, e, k)) = self.overlapping_meta(start, len) {
            if Some(k) == allowed && s <= start && start + len <= e {
                return Ok(());
            }
            let msg = format!(
                "preventing {what} write at {start:#x}+{len:#x}: it overlaps {k:?} at {s:#x}..{e:#x}"
            );
            self.mark_corrupt();
            return Err(corrupt!("{msg}"));
        }
        Ok(())
    }

    /// Set the corrupt bit on disk (best effort) and refuse further writes.
    pub(crate) fn mark_corrupt(&mut self) {
        if self.corrupt || self.read_only {
            self.corrupt = true;
            return;
        }
        self.corrupt = true;
        if self.area.header.version >= 3 {
            self.area.header.incompatible_features |= qcow2_format::features::incompatible::CORRUPT;
            let bytes = self.area.header.to_bytes();
            let _ = self.storage.write_at(&bytes, 0);
            let _ = self.storage.flush();
        }
    }

    /// Clear the corrupt bit after a repair left no corruption (QEMU does the same).
    pub(crate) fn clear_corrupt(&mut self) -> Result<()> {
        if self.area.header.is_corrupt() {
            self.update_header(|h| {
                h.incompatible_features &= !qcow2_format::features::incompatible::CORRUPT
            })?;
            self.sync()?;
        }
        self.corrupt = false;
        Ok(())
    }

    // ---- caches ----

    pub(crate) fn rb_cache_capacity(&self) -> usize {
        self.rb_cache.capacity()
    }

    fn cache(&mut self, w: Which) -> &mut TableCache {
        match w {
            Which::L2 => &mut self.l2_cache,
            Which::Refcount => &mut self.rb_cache,
        }
    }

    /// Make sure the entry at `off` is cached, reading it from disk (evicting as needed).
    pub(crate) fn load(&mut self, w: Which, off: u64) -> Result<()> {
        if self.cache(w).contains(off) {
            return Ok(());
        }
        let size = self.cache(w).entry_size();
        let mut buf = vec![0u8; size].into_boxed_slice();
        let what = match w {
            Which::L2 => "L2 table",
            Which::Refcount => "refcount block",
        };
        // Only a damaged image opened read-only names a table there (read/write opens
        // refuse it): reading it as zeros would hide the damage.
        if off >= self.alloc_end {
            return Err(corrupt!("{what} at {off:#x} is past the end of the file"));
        }
        self.read_host(&mut buf, off, what)?;
        self.make_room(w)?;
        self.cache(w).insert(off, buf, false);
        Ok(())
    }

    /// Insert fresh content (e.g. a new table) as a dirty or clean entry.
    pub(crate) fn install(
        &mut self,
        w: Which,
        off: u64,
        data: Box<[u8]>,
        dirty: bool,
    ) -> Result<()> {
        if !self.cache(w).contains(off) {
            self.make_room(w)?;
        }
        self.cache(w).insert(off, data, dirty);
        Ok(())
    }

    fn make_room(&mut self, w: Which) -> Result<()> {
        while self.cache(w).is_full() {
            let Some((off, dirty)) = self.cache(w).victim() else {
                break;
            };
            if dirty {
                // Writing back one entry may require the other cache first.
                self.prepare_write_back(w)?;
                self.write_entry(w, off)?;
            }
            self.cache(w).remove(off);
        }
        Ok(())
    }

    fn write_entry(&mut self, w: Which, off: u64) -> Result<()> {
        let (data, kind, what) = match w {
            Which::L2 => (self.l2_cache.peek(off), MetaKind::ActiveL2, "L2 table"),
            Which::Refcount => (
                self.rb_cache.peek(off),
                MetaKind::RefcountBlock,
                "refcount block",
            ),
        };
        let Some(data) = data else { return Ok(()) };
        let data = data.to_vec();
        // L2 slices live inside a whole-table range; refcount blocks are whole clusters.
        self.write_host(&data, off, Some(kind), what)?;
        self.cache(w).mark_clean(off);
        Ok(())
    }

    fn write_all(&mut self, w: Which) -> Result<()> {
        for off in self.cache(w).dirty_offsets() {
            self.write_entry(w, off)?;
        }
        Ok(())
    }

    /// Satisfy the ordering rules before writing entries of cache `w`.
    fn prepare_write_back(&mut self, w: Which) -> Result<()> {
        match (w, self.dep) {
            (Which::L2, Dep::L2AfterRefcounts) => {
                self.write_all(Which::Refcount)?;
                self.sync()?;
                self.dep = Dep::None;
                self.l2_needs_sync = false;
            }
            (Which::Refcount, Dep::RefcountsAfterL2) => {
                if self.l2_needs_sync {
                    self.sync()?;
                    self.l2_needs_sync = false;
                }
                self.write_all(Which::L2)?;
                self.sync()?;
                self.dep = Dep::None;
            }
            _ => {}
        }
        if w == Which::L2 && self.l2_needs_sync {
            self.sync()?;
            self.l2_needs_sync = false;
        }
        Ok(())
    }

    /// Write back every dirty entry of cache `w`, honouring the ordering.
    pub(crate) fn write_back(&mut self, w: Which) -> Result<()> {
        if !self.cache(w).has_dirty() {
            return Ok(());
        }
        self.prepare_write_back(w)?;
        self.write_all(w)
    }

    /// Require `dep` for entries dirtied from now on; if the opposite order is pending,
    /// complete it first.
    pub(crate) fn set_dep(&mut self, dep: Dep) -> Result<()> {
        if self.dep == dep || dep == Dep::None {
            return Ok(());
        }
        if self.dep != Dep::None {
            self.write_back_all()?;
            self.sync()?;
        }
        self.dep = dep;
        Ok(())
    }

    /// Write every dirty metadata entry in a valid order (no final sync).
    pub(crate) fn write_back_all(&mut self) -> Result<()> {
        match self.dep {
            Dep::RefcountsAfterL2 => {
                self.write_back(Which::L2)?;
                self.write_back(Which::Refcount)?;
            }
            _ => {
                self.write_back(Which::Refcount)?;
                self.write_back(Which::L2)?;
            }
        }
        self.dep = Dep::None;
        Ok(())
    }

    /// Everything durable.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.read_only {
            self.run_host_ops()?;
            self.run_deferred_discards()?;
            self.write_back_all()?;
        }
        self.sync()
    }

    // ---- header and L1 (written through) ----

    /// Change header fields on disk (first sector only, so a torn write cannot damage the
    /// extensions), and in memory only once the write succeeded.
    pub(crate) fn update_header(
        &mut self,
        f: impl FnOnce(&mut qcow2_format::Header),
    ) -> Result<()> {
        let mut h = self.area.header.clone();
        f(&mut h);
        self.storage
            .write_at(&h.to_bytes(), 0)
            .map_err(Error::io("writing the image header"))?;
        self.area.header = h;
        Ok(())
    }

    /// Set L1 entry `index` on disk, then in memory.
    pub(crate) fn set_l1_entry(&mut self, index: usize, value: u64) -> Result<()> {
        let off = self.area.header.l1_table_offset + index as u64 * 8;
        self.write_host(
            &value.to_be_bytes(),
            off,
            Some(MetaKind::ActiveL1),
            "L1 entry",
        )?;
        self.l1[index] = value;
        Ok(())
    }

    /// Refuse writes on read-only or corrupt images.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if self.corrupt {
            return Err(corrupt!(
                "an inconsistency was found earlier; writes are refused"
            ));
        }
        Ok(())
    }

    /// Header bookkeeping before the first metadata change: clear autoclear bits this
    /// library does not maintain, and set the dirty bit when lazy refcounts are on.
    pub(crate) fn prepare_first_write(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.first_write_done {
            return Ok(());
        }
        let h = &self.area.header;
        let clear_autoclear = h.version >= 3 && h.autoclear_features != 0;
        let set_dirty = h.lazy_refcounts() && !h.is_dirty();
        if clear_autoclear || set_dirty {
            self.update_header(|h| {
                if clear_autoclear {
                    h.autoclear_features = 0;
                }
                if set_dirty {
                    h.incompatible_features |= qcow2_format::features::incompatible::DIRTY;
                }
            })?;
            self.sync()?;
            self.dirty_set_by_us = set_dirty;
        }
        self.first_write_done = true;
        Ok(())
    }

    /// After a successful flush on close: clear the dirty bit this handle set.
    pub(crate) fn finish_clean_close(&mut self) -> Result<()> {
        if self.dirty_set_by_us {
            self.update_header(|h| {
                h.incompatible_features &= !qcow2_format::features::incompatible::DIRTY
            })?;
            self.sync()?;
            self.dirty_set_by_us = false;
        }
        Ok(())
    }

    // ---- host discard / zero queue ----

    /// Queue a host operation on `[off, off+len)`.
    pub(crate) fn queue_host_op(&mut self, off: u64, len: u64, kind: HostOpKind, needs_sync: bool) {
        // Past the image's clusters there is nothing to release or anchor (a corrupt
        // reference may point there; zeroing it would grow the file).
        let len = len.min(self.alloc_end.saturating_sub(off));
        if len == 0 {
            return;
        }
        self.host_ops.push(HostOp { off, len, kind });
        self.host_ops_need_sync |= needs_sync;
    }

    /// Issue queued host operations, merged into ranges. Advisory, as in QEMU: a failure
    /// is counted, the metadata is already right.
    /// Defer the host discard of a freed cluster.
    pub(crate) fn defer_discard(&mut self, cluster: u64, needs_sync: bool) -> Result<()> {
        if (cluster << self.geo.cluster_bits()) >= self.alloc_end {
            return Ok(());
        }
        self.deferred_discards.insert(cluster);
        self.deferred_need_sync |= needs_sync;
        if self.deferred_discards.len() >= MAX_DEFERRED_CLUSTERS {
            self.run_deferred_discards()?;
        }
        Ok(())
    }

    /// A cluster is being allocated again: its deferred discard is dropped.
    pub(crate) fn cancel_deferred_discard(&mut self, cluster: u64) {
        self.deferred_discards.remove(&cluster);
    }

    /// Issue the deferred discards, merged into ranges, after the metadata that freed them
    /// is durable when that matters.
    pub(crate) fn run_deferred_discards(&mut self) -> Result<()> {
        if self.deferred_discards.is_empty() {
            return Ok(());
        }
        if self.deferred_need_sync {
            self.write_back_all()?;
            self.sync()?;
            self.deferred_need_sync = false;
        }
        let cbits = self.geo.cluster_bits();
        let clusters = std::mem::take(&mut self.deferred_discards);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in clusters {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        for (s, n) in runs {
            if self.storage.discard(s << cbits, n << cbits).is_err() {
                self.host_op_failures += 1;
            }
        }
        Ok(())
    }

    pub(crate) fn run_host_ops(&mut self) -> Result<()> {
        if self.host_ops.is_empty() {
            return Ok(());
        }
        if self.host_ops_need_sync {
            self.write_back_all()?;
            self.sync()?;
            self.host_ops_need_sync = false;
        }
        let mut ops = std::mem::take(&mut self.host_ops);
        ops.sort_by_key(|o| (o.kind as u8, o.off));
        let mut merged: Vec<HostOp> = Vec::new();
        for o in ops {
            match merged.last_mut() {
                Some(m) if m.kind == o.kind && m.off + m.len >= o.off => {
                    m.len = m.len.max(o.off + o.len - m.off);
                }
                _ => merged.push(o),
            }
        }
        for o in merged {
            let r = match o.kind {
                HostOpKind::Discard => self.storage.discard(o.off, o.len).map(|_| ()),
                HostOpKind::ZeroKeep => self
                    .storage
                    .write_zeroes(o.off, o.len, host_io::ZeroMode::KeepAllocated)
                    .map(|_| ()),
            };
            if r.is_err() {
                self.host_op_failures += 1;
            }
        }
        Ok(())
    }

    // ---- in-flight data I/O ----

    pub(crate) fn inflight_add(&mut self, cluster: u64) {
        *self.inflight.entry(cluster).or_insert(0) += 1;
    }

    pub(crate) fn inflight_remove(&mut self, cluster: u64) {
        if let Some(n) = self.inflight.get_mut(&cluster) {
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(&cluster);
            }
        }
    }
}
