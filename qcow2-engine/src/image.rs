//! The image handle: open options, what it reports about itself, and the frame every
//! request runs in — plan under the metadata lock, execute without it, commit — with the
//! claims that keep overlapping plans apart and the failed state a panic leaves behind.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use host_io::{FileStorage, Locking, Storage};
use qcow2_format::{CompressionType, Geometry};

use crate::changes::{Changes, ContentWatcher};
use crate::error::{invalid_arg, Error, Result};
use crate::lifecycle::backing::Backing;
use crate::meta::{FastMap, Meta, OnFree};
use crate::options::{format_size, parse_bool, parse_size, split_options, CacheOptions};
use crate::plan::{Commit, Plan};
use crate::provision::policy::{DiscardOptions, FreeReason, Policy};
use crate::request::claims::Claims;

/// How to open an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Do not open the backing file (unallocated clusters then read as zeros).
    pub no_backing: bool,
    /// Metadata cache sizes.
    pub cache: CacheOptions,
    /// Discard / write-zeroes options (QEMU's names, or `provision=`).
    pub discard: DiscardOptions,
    /// Open for check and repair (QEMU's `BDRV_O_CHECK`, what `qemu-img check -r` does):
    /// a read/write open of an image with the corrupt bit set is allowed, guest writes
    /// stay refused, and a repair that leaves no corruption clears the bit.
    pub check: bool,
    /// QEMU's image locks (`locking`, alias `file.locking`): `Auto` (the default) and `On`
    /// take them on the image and its backing files; `Off` neither takes nor tests them.
    pub locking: Locking,
    /// QEMU's `force-share` (qemu-img's `-U`): a read-only open that shares every
    /// permission, so it coexists with a writer (and may read inconsistent data).
    /// Read-only opens only.
    pub force_share: bool,
    /// `quarantine-slack`: how many bytes the file may grow past what immediate reuse of
    /// freed clusters would leave, while they wait for one barrier to release them all.
    /// `None`: a sixteenth of the virtual size. `Some(0)`: reuse as soon as needed (one
    /// barrier per reuse, the file never grows for it).
    pub quarantine_slack: Option<u64>,
    /// `aio`: the backend of the asynchronous queue ([`AioQueue`](crate::AioQueue)):
    /// `io_uring`, `threads`, or `auto` (io_uring where the kernel allows it, else
    /// threads). Chosen at open and reported in [`ImageInfo::aio`].
    pub aio: crate::AioMode,
    /// `aio-queue-depth`: requests an [`AioQueue`](crate::AioQueue) takes before they are
    /// reaped; more are refused with `EAGAIN`. 0: the default, 1024.
    pub aio_queue_depth: u32,
}

impl OpenOptions {
    /// Parse `key=value,...` runtime options: `read-only`, `cache.direct`,
    /// `l2-cache-size`, `l2-cache-entry-size`, `refcount-cache-size`, `quarantine-slack`,
    /// `locking` (alias `file.locking`: on, off, auto), `force-share`, `aio` (auto,
    /// io_uring, threads), `aio-queue-depth`, and the discard
    /// options (`discard`, `pass-discard-request|snapshot|other`, `discard-no-unref`,
    /// `detect-zeroes`, `provision`). Unknown keys are an error.
    pub fn parse(s: &str) -> Result<OpenOptions> {
        let mut o = OpenOptions::default();
        let rest = o.discard.take(split_options(s)?)?;
        for (k, v) in rest {
            match k.as_str() {
                "read-only" => o.read_only = parse_bool(&k, &v)?,
                "cache.direct" => o.direct = parse_bool(&k, &v)?,
                "l2-cache-size" => o.cache.l2_cache_size = parse_size(&k, &v)?,
                "l2-cache-entry-size" => o.cache.l2_cache_entry_size = parse_size(&k, &v)?,
                "refcount-cache-size" => o.cache.refcount_cache_size = parse_size(&k, &v)?,
                "quarantine-slack" => o.quarantine_slack = Some(parse_size(&k, &v)?),
                "locking" | "file.locking" => {
                    o.locking = match v.as_str() {
                        "on" => Locking::On,
                        "off" => Locking::Off,
                        "auto" => Locking::Auto,
                        _ => return Err(invalid_arg!("{k}: '{v}' is not on, off or auto")),
                    }
                }
                "force-share" => o.force_share = parse_bool(&k, &v)?,
                "aio" => o.aio = crate::AioMode::parse(&v)?,
                "aio-queue-depth" => {
                    o.aio_queue_depth = v
                        .parse::<u32>()
                        .ok()
                        .filter(|&d| (1..=crate::exec::async_queue::MAX_DEPTH).contains(&d))
                        .ok_or_else(|| {
                            invalid_arg!(
                                "{k}: '{v}' is not a number from 1 to {}",
                                crate::exec::async_queue::MAX_DEPTH
                            )
                        })?
                }
                _ => return Err(invalid_arg!("unknown open option '{k}'")),
            }
        }
        Ok(o)
    }
}

/// Refuse bad option combinations before the file is touched (an option error is
/// `EINVAL` even for an image in use). Version-dependent rules wait for the header.
fn check_options(opts: &OpenOptions) -> Result<()> {
    crate::lifecycle::locking::validate(opts)?;
    opts.discard.resolve(3).map(|_| ())
}

/// What an open image reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Subcluster size (the cluster size without extended L2).
    pub subcluster_size: u64,
    /// qcow2 version, 2 or 3.
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing file format, if named.
    pub backing_format: Option<String>,
    /// Number of internal snapshots.
    pub snapshots: usize,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// Granularity a guest should be told for discard: the cluster size (partial clusters
    /// are ignored).
    pub discard_granularity: u64,
    /// Alignment write-zeroes is efficient at: the subcluster size.
    pub write_zeroes_alignment: u64,
    /// The effective discard policy, e.g. `provision=metadata`.
    pub policy: String,
    /// The effective policy in structured form.
    pub mode: crate::provision::policy::Mode,
    /// `detect-zeroes` in force.
    pub detect_zeroes: crate::provision::policy::DetectZeroes,
    /// Every runtime option in force, as `key=value,...` that [`OpenOptions::parse`]
    /// accepts: the discard policy, `detect-zeroes`, `pass-discard-snapshot|other`,
    /// `read-only`, `cache.direct`, `locking` (`on` when locks are held), `force-share`,
    /// the effective cache sizes, `quarantine-slack`, `aio` (the backend chosen) and
    /// `aio-queue-depth`.
    pub options: String,
    /// Whether QEMU's image locks are held on the image file.
    pub locked: bool,
    /// The backend asynchronous requests run on (chosen at open, see
    /// [`OpenOptions::aio`]).
    pub aio: crate::AioKind,
    /// Requests an [`AioQueue`](crate::AioQueue) takes before they are reaped.
    pub aio_queue_depth: u32,
    /// The alignment asynchronous requests need of buffer addresses, lengths and offsets:
    /// the direct I/O alignment with `cache.direct=on`, else 1.
    pub aio_alignment: u64,
}

/// Counters an open image keeps about its own work on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Host flushes (fdatasync) issued through the image file.
    pub host_flushes: u64,
    /// Host discards (punch hole, BLKDISCARD) issued through the image file, merged ranges
    /// counting once.
    pub host_discards: u64,
    /// Host write-zeroes (anchoring a range, or zeroing it with leave to release) issued
    /// through the image file.
    pub host_zeroes: u64,
    /// Releases of the freed-cluster quarantine (each one barrier).
    pub quarantine_releases: u64,
    /// References waiting in the quarantine now.
    pub quarantined: u64,
    /// Host operations (discard, anchor) that failed (advisory).
    pub host_op_failures: u64,
    /// First byte past every allocated host cluster.
    pub allocation_end: u64,
}

/// What the metadata lock guards: the metadata components, the policy in force, the
/// claims of running plans, and the change subscribers.
pub(crate) struct State {
    pub meta: Meta,
    pub policy: Policy,
    pub claims: Claims,
    pub changes: Changes,
}

impl State {
    /// What happens on the host to clusters freed for `reason`.
    pub(crate) fn on_free(&self, reason: FreeReason) -> OnFree {
        if self.policy.passes(reason) {
            OnFree::Discard
        } else {
            OnFree::Keep
        }
    }
}

/// An open qcow2 image. All methods take `&self`; one handle may be used from several
/// threads. See the crate documentation for the locking and ordering protocol.
pub struct Image {
    pub(crate) state: Mutex<State>,
    /// Signalled when claims end.
    pub(crate) claims_ended: Condvar,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) backing: Option<Backing>,
    pub(crate) geo: Geometry,
    pub(crate) version: u32,
    pub(crate) size: AtomicU64,
    pub(crate) compression: CompressionType,
    pub(crate) read_only: bool,
    pub(crate) closed: AtomicBool,
    /// A panic interrupted metadata work: every call fails, nothing is flushed.
    pub(crate) failed: AtomicBool,
    /// A request completed since the last flush (else a flush with clean metadata has
    /// nothing to make durable and skips the host flush, as QEMU does).
    pub(crate) unsynced: AtomicBool,
    /// Whether the image looks metadata-preallocated (decided at the first block status
    /// query, as QEMU does): data clusters are then checked for holes in the file.
    pub(crate) looks_preallocated: OnceLock<bool>,
    /// Shared with the metadata: bumped when clusters may have been freed.
    pub(crate) free_gen: Arc<AtomicU64>,
    /// Shared with the mapping: L2 entries for lock-free reads.
    pub(crate) fast: Arc<FastMap>,
    /// The `quarantine-slack` option, if given (else it follows the virtual size).
    pub(crate) quarantine_slack: Option<u64>,
    /// The options the image was opened with.
    pub(crate) opts: OpenOptions,
    /// Whether image locks are held on the image file.
    pub(crate) locked: bool,
    /// The asynchronous backend chosen at open.
    pub(crate) aio: crate::AioKind,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("virtual_size", &self.virtual_size())
            .field("cluster_size", &self.geo.cluster_size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Image {
    /// Open the image at `path` (regular file or block device), taking QEMU's image locks
    /// on it and its backing files (see [`OpenOptions::locking`]): an image in use
    /// elsewhere is refused with [`Error::InUse`].
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        check_options(opts)?;
        let path = path.as_ref();
        let storage =
            FileStorage::open(path, &crate::lifecycle::locking::file_options(opts, false))
                .map_err(|e| crate::lifecycle::locking::open_error(e, None))?;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Self::open_file(storage, opts, canon)
    }

    /// Open the image on a descriptor the caller already has, taking ownership of it (see
    /// [`FileStorage::from_fd`] for what the descriptor must allow). Locks as
    /// [`open`](Self::open); relative backing file names resolve against the directory
    /// of the file the descriptor refers to.
    pub fn open_fd(fd: OwnedFd, opts: &OpenOptions) -> Result<Image> {
        check_options(opts)?;
        let storage =
            FileStorage::from_fd(fd, &crate::lifecycle::locking::file_options(opts, false))
                .map_err(|e| crate::lifecycle::locking::open_error(e, None))?;
        let path = storage.path().to_path_buf();
        Self::open_file(storage, opts, path)
    }

    fn open_file(
        storage: FileStorage,
        opts: &OpenOptions,
        canon: std::path::PathBuf,
    ) -> Result<Image> {
        let locked = storage.held_lock().is_some();
        let mut img = Self::open_storage_in_chain(
            Arc::new(storage),
            opts,
            canon.parent(),
            std::slice::from_ref(&canon),
        )?;
        img.locked = locked;
        Ok(img)
    }

    /// Open an image on any storage; `dir` resolves a relative backing file name. No
    /// image lock is taken on `storage` (lock a `FileStorage` yourself with
    /// [`FileStorage::lock`]); backing files opened by name are locked as in
    /// [`open`](Self::open).
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        dir: Option<&Path>,
    ) -> Result<Image> {
        Self::open_storage_in_chain(storage, opts, dir, &[])
    }

    /// The metadata lock. A handle whose metadata work panicked is failed: the half-done
    /// metadata is never used or flushed again.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>> {
        if self.failed.load(Ordering::Acquire) {
            return Err(failed());
        }
        match self.state.lock() {
            Ok(g) => Ok(g),
            Err(_) => {
                self.failed.store(true, Ordering::Release);
                Err(failed())
            }
        }
    }

    /// The metadata lock, once guest cluster index `cluster` is not claimed.
    pub(crate) fn lock_unclaimed(&self, cluster: u64) -> Result<MutexGuard<'_, State>> {
        let mut g = self.lock()?;
        while g.claims.is_claimed(cluster) {
            g = self.wait(g)?;
        }
        Ok(g)
    }

    /// The metadata lock, once no plan is running (check, repair, resize).
    pub(crate) fn lock_quiet(&self) -> Result<MutexGuard<'_, State>> {
        let mut g = self.lock()?;
        while !g.claims.is_empty() {
            g = self.wait(g)?;
        }
        Ok(g)
    }

    fn wait<'a>(&'a self, g: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>> {
        let g = self.claims_ended.wait(g).map_err(|_| {
            self.failed.store(true, Ordering::Release);
            failed()
        })?;
        if self.failed.load(Ordering::Acquire) {
            return Err(failed());
        }
        Ok(g)
    }

    /// The metadata lock, once no plan is running and none has host I/O in flight
    /// (bitmap operations: every request begun before them has finished).
    pub(crate) fn lock_idle(&self) -> Result<MutexGuard<'_, State>> {
        let mut g = self.lock()?;
        while !g.claims.is_idle() {
            g.claims.wait_idle(true);
            let r = self.wait(g);
            g = r?;
            g.claims.wait_idle(false);
        }
        Ok(g)
    }

    /// Take the claims and pins a plan names (its change was announced before it was
    /// planned: `changes.rs`).
    pub(crate) fn begin(&self, st: &mut State, plan: &Plan) {
        if let Some((first, n)) = plan.claim {
            st.claims.claim(first, n);
        }
        for &c in &plan.pins {
            st.meta.alloc.pin(c);
        }
        if plan.has_io() {
            st.claims.plan_started();
        }
    }

    /// Execute a begun plan without the lock, then finish it under the lock.
    pub(crate) fn run(&self, plan: Plan, data: &[u8]) -> Result<()> {
        let mut guard = Running {
            img: self,
            plan: Some(plan),
        };
        let plan_ref = guard.plan.as_ref().expect("set above");
        let result = if plan_ref.has_io() {
            self.execute(plan_ref, data)
        } else {
            Ok(0)
        };
        let plan = guard.plan.take().expect("set above");
        let mut st = self.lock()?;
        self.finish(&mut st, plan, result)
    }

    /// End a plan: drop its pins and claims; commit its edits if the I/O succeeded, give
    /// its fresh clusters back if it failed.
    pub(crate) fn finish(&self, st: &mut State, plan: Plan, result: Result<u64>) -> Result<()> {
        self.unsynced.store(true, Ordering::Release);
        for &c in &plan.pins {
            st.meta.alloc.unpin(c);
        }
        let idle = plan.has_io() && st.claims.plan_ended();
        if let Some((first, n)) = plan.claim {
            st.claims.release(first, n);
            self.claims_ended.notify_all();
        } else if idle {
            self.claims_ended.notify_all();
        }
        let failures = match result {
            Ok(f) => f,
            Err(e) => {
                // Nothing points at the new clusters yet: give them back.
                for r in &plan.fresh {
                    let _ = st.meta.unallocate(r.off, r.count);
                }
                return Err(e);
            }
        };
        for _ in 0..failures {
            st.meta.host_ops.failed();
        }
        if plan.data_first {
            st.meta.require_data_first();
        }
        // A failure part-way leaves later fresh clusters unreferenced: leaks, never reuse.
        for c in plan.commit {
            match c {
                Commit::SetL2 { slot, guest, entry } => st.meta.set_l2(slot, guest, entry)?,
                Commit::Unref(kind) => self.unref(&mut st.meta, kind, OnFree::Keep)?,
            }
        }
        Ok(())
    }

    /// Drop the references an entry of `kind` holds.
    pub(crate) fn unref(
        &self,
        m: &mut Meta,
        kind: qcow2_format::ClusterKind,
        on_free: OnFree,
    ) -> Result<()> {
        use qcow2_format::ClusterKind;
        match kind {
            ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset } => {
                m.free_clusters(offset, 1, on_free)
            }
            ClusterKind::Compressed(d) => {
                for h in d.host_clusters(&self.geo) {
                    m.free_clusters(h, 1, on_free)?;
                }
                Ok(())
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => Ok(()),
        }
    }

    /// Virtual size in bytes.
    #[inline]
    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The geometry (cluster size, L2 width, refcount order).
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Subscribe to every change of guest-visible content (see [`ContentWatcher`]).
    pub fn watch_changes(&self, w: Arc<dyn ContentWatcher>) -> Result<()> {
        self.lock()?.changes.subscribe(w);
        Ok(())
    }

    /// What the image reports about itself (also on a failed handle: it only reads).
    pub fn info(&self) -> ImageInfo {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let area = st.meta.header.area();
        let h = &area.header;
        let s = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
        ImageInfo {
            virtual_size: self.virtual_size(),
            cluster_size: self.geo.cluster_size(),
            subcluster_size: self.geo.subcluster_size(),
            version: h.version,
            refcount_bits: self.geo.refcount_bits(),
            extended_l2: self.geo.extended_l2(),
            lazy_refcounts: h.lazy_refcounts(),
            compression_type: self.compression,
            backing_file: s(area.backing_file.as_deref()),
            backing_format: s(area.backing_format()),
            snapshots: st.meta.snapshots.len(),
            incompatible_features: h.incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            read_only: self.read_only,
            discard_granularity: self.geo.cluster_size(),
            write_zeroes_alignment: self.geo.subcluster_size(),
            policy: st.policy.describe(),
            mode: st.policy.mode,
            detect_zeroes: st.policy.detect_zeroes,
            options: self.runtime_options(&st),
            locked: self.locked,
            aio: self.aio,
            aio_queue_depth: crate::exec::async_queue::depth_of(&self.opts),
            aio_alignment: crate::exec::async_queue::alignment_of(self),
        }
    }

    /// See [`ImageInfo::options`].
    fn runtime_options(&self, st: &State) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let (l2_entry, l2_entries, rb_entry, rb_entries) = st.meta.cache_geometry();
        format!(
            "{},read-only={},cache.direct={},locking={},force-share={},l2-cache-size={},\
             l2-cache-entry-size={},refcount-cache-size={},quarantine-slack={},aio={},\
             aio-queue-depth={}",
            st.policy.describe_all(),
            on(self.read_only),
            on(self.opts.direct),
            on(self.locked),
            on(self.opts.force_share),
            format_size(l2_entry * l2_entries),
            format_size(l2_entry),
            format_size(rb_entry * rb_entries),
            format_size(self.quarantine_slack.unwrap_or(self.virtual_size() / 16)),
            self.aio,
            crate::exec::async_queue::depth_of(&self.opts),
        )
    }

    /// Counters about the image's host work.
    pub fn stats(&self) -> Result<ImageStats> {
        let st = self.lock()?;
        Ok(ImageStats {
            host_flushes: self.storage.flush_count(),
            host_discards: self.storage.discard_count(),
            host_zeroes: self.storage.zero_count(),
            quarantine_releases: st.meta.alloc.releases(),
            quarantined: st.meta.alloc.quarantined() as u64,
            host_op_failures: st.meta.host_ops.failures(),
            allocation_end: st.meta.alloc.end(),
        })
    }

    /// Change the discard / write-zeroes options of an open image (like QEMU's reopen):
    /// the keys given replace their current values, the others keep theirs
    /// ([`DiscardOptions::merged`]: `provision` and QEMU's `discard` family replace each
    /// other). Other keys are refused; on error nothing changes. Pending host discards are
    /// issued under the old policy first.
    pub fn set_options(&self, options: &str) -> Result<()> {
        let d = DiscardOptions::parse(options)?;
        let mut st = self.lock_quiet()?;
        let policy = st.policy.options.merged(d).resolve(self.version)?;
        if !self.read_only {
            st.meta.release_quarantine()?;
            st.meta.run_deferred_discards();
        }
        st.policy = policy;
        st.meta.metadata_on_free = st.on_free(FreeReason::Other);
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        if !self.unsynced.swap(false, Ordering::AcqRel) && st.meta.is_clean() {
            return Ok(());
        }
        st.meta
            .flush()
            .inspect_err(|_| self.unsynced.store(true, Ordering::Release))
    }

    /// Flush and close, reporting a flush error (dropping an image flushes silently).
    pub fn close(self) -> Result<()> {
        let r = self.close_inner();
        self.closed.store(true, Ordering::Release);
        r
    }

    fn close_inner(&self) -> Result<()> {
        let st = self.lock()?;
        if self.read_only {
            return Ok(());
        }
        drop(st);
        self.flush()?;
        let mut st = self.lock()?;
        // Every write is durable now: the bitmaps are stored exactly (their on-disk copy
        // was a superset while the image was open), then made durable.
        if st.meta.bitmaps_store_exact()? {
            st.meta.flush()?;
        }
        st.meta.finish_clean_close()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            let _ = self.close_inner();
        }
    }
}

fn failed() -> Error {
    Error::Failed("an internal error interrupted a metadata update earlier; the handle refuses all I/O and will not flush (reopen the image)".into())
}

/// A plan between its planning and its finish: if the executor panics, the claims end and
/// the handle is failed instead of leaving other requests waiting forever.
struct Running<'a> {
    img: &'a Image,
    plan: Option<Plan>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let Some(plan) = self.plan.take() else {
            return;
        };
        self.img.failed.store(true, Ordering::Release);
        if let Ok(mut st) = self.img.state.lock() {
            if let Some((first, n)) = plan.claim {
                st.claims.release(first, n);
            }
            if plan.has_io() {
                st.claims.plan_ended();
            }
        }
        self.img.claims_ended.notify_all();
    }
}
