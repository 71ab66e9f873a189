//! The image handle: open options, lifetime (flush, close), and what it reports about
//! itself. Reading, writing and opening live in their own files.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use host_io::{FileStorage, Locking, Storage};
use qcow2_format::{CompressionType, Geometry};

use crate::backing::Backing;
use crate::error::invalid_arg;
use crate::error::Result;
use crate::meta::Meta;
use crate::options::{format_size, parse_bool, parse_size, split_options, CacheOptions};
use crate::policy::DiscardOptions;

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
}

impl OpenOptions {
    /// Parse `key=value,...` runtime options: `read-only`, `cache.direct`,
    /// `l2-cache-size`, `l2-cache-entry-size`, `refcount-cache-size`, `locking` (alias
    /// `file.locking`: on, off, auto), `force-share`, and the discard options (`discard`,
    /// `pass-discard-request|snapshot|other`, `discard-no-unref`, `detect-zeroes`,
    /// `provision`). Unknown keys are an error.
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
                "locking" | "file.locking" => {
                    o.locking = match v.as_str() {
                        "on" => Locking::On,
                        "off" => Locking::Off,
                        "auto" => Locking::Auto,
                        _ => return Err(invalid_arg!("{k}: '{v}' is not on, off or auto")),
                    }
                }
                "force-share" => o.force_share = parse_bool(&k, &v)?,
                _ => return Err(invalid_arg!("unknown open option '{k}'")),
            }
        }
        Ok(o)
    }
}

/// Refuse bad option combinations before the file is touched (an option error is
/// `EINVAL` even for an image in use). Version-dependent rules wait for the header.
fn check_options(opts: &OpenOptions) -> Result<()> {
    crate::locking::validate(opts)?;
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
    pub mode: crate::policy::Mode,
    /// `detect-zeroes` in force.
    pub detect_zeroes: crate::policy::DetectZeroes,
    /// Every runtime option in force, as `key=value,...` that [`OpenOptions::parse`]
    /// accepts: the discard policy, `detect-zeroes`, `pass-discard-snapshot|other`,
    /// `read-only`, `cache.direct`, `locking` (`on` when locks are held), `force-share`
    /// and the effective cache sizes.
    pub options: String,
    /// Whether QEMU's image locks are held on the image file.
    pub locked: bool,
}

/// An open qcow2 image. All methods take `&self`; one handle may be used from several
/// threads. Metadata changes are serialized by one lock; data I/O on clusters that are
/// already allocated runs outside it.
pub struct Image {
    pub(crate) meta: Mutex<Meta>,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) backing: Option<Backing>,
    pub(crate) geo: Geometry,
    pub(crate) size: std::sync::atomic::AtomicU64,
    pub(crate) compression: CompressionType,
    pub(crate) read_only: bool,
    pub(crate) closed: std::sync::atomic::AtomicBool,
    /// Whether the image looks metadata-preallocated (decided at the first block status
    /// query, as QEMU does): data clusters are then checked for holes in the file.
    pub(crate) looks_preallocated: std::sync::OnceLock<bool>,
    /// Shared with the metadata: see `Meta::free_gen`.
    pub(crate) free_gen: Arc<std::sync::atomic::AtomicU64>,
    /// The options the image was opened with.
    pub(crate) opts: OpenOptions,
    /// Whether image locks are held on the image file.
    pub(crate) locked: bool,
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
        let storage = FileStorage::open(path, &crate::locking::file_options(opts, false))
            .map_err(|e| crate::locking::open_error(e, None))?;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Self::open_file(storage, opts, canon)
    }

    /// Open the image on a descriptor the caller already has, taking ownership of it (see
    /// [`FileStorage::from_fd`] for what the descriptor must allow). Locks as
    /// [`open`](Self::open); relative backing file names resolve against the directory
    /// of the file the descriptor refers to.
    pub fn open_fd(fd: OwnedFd, opts: &OpenOptions) -> Result<Image> {
        check_options(opts)?;
        let storage = FileStorage::from_fd(fd, &crate::locking::file_options(opts, false))
            .map_err(|e| crate::locking::open_error(e, None))?;
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock leaves metadata possibly half-updated in memory;
        // the on-disk state is still ordered, so continuing with the guard is no worse
        // than the crash the ordering protects against.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
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

    /// What the image reports about itself.
    pub fn info(&self) -> ImageInfo {
        let m = self.lock();
        let h = &m.area.header;
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
            backing_file: s(m.area.backing_file.as_deref()),
            backing_format: s(m.area.backing_format()),
            snapshots: m.snapshots.len(),
            incompatible_features: h.incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            read_only: self.read_only,
            discard_granularity: self.geo.cluster_size(),
            write_zeroes_alignment: self.geo.subcluster_size(),
            policy: m.policy.describe(),
            mode: m.policy.mode,
            detect_zeroes: m.policy.detect_zeroes,
            options: self.runtime_options(&m),
            locked: self.locked,
        }
    }

    /// See [`ImageInfo::options`].
    fn runtime_options(&self, m: &Meta) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let l2_entry = m.l2_cache.entry_size() as u64;
        format!(
            "{},read-only={},cache.direct={},locking={},force-share={},l2-cache-size={},\
             l2-cache-entry-size={},refcount-cache-size={}",
            m.policy.describe_all(),
            on(self.read_only),
            on(self.opts.direct),
            on(self.locked),
            on(self.opts.force_share),
            format_size(l2_entry * m.l2_cache.capacity() as u64),
            format_size(l2_entry),
            format_size(m.rb_cache.entry_size() as u64 * m.rb_cache.capacity() as u64),
        )
    }

    /// Change the discard / write-zeroes options of an open image (like QEMU's reopen):
    /// the keys given replace their current values, the others keep theirs
    /// ([`DiscardOptions::merged`]: `provision` and QEMU's `discard` family replace each
    /// other). Other keys are refused; on error nothing changes. Pending host discards are
    /// issued under the old policy first.
    pub fn set_options(&self, options: &str) -> Result<()> {
        let d = DiscardOptions::parse(options)?;
        let mut m = self.lock();
        let policy = m.policy.options.merged(d).resolve(m.area.header.version)?;
        if !m.read_only {
            m.run_host_ops()?;
            m.run_deferred_discards()?;
        }
        m.policy = policy;
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.lock().flush()
    }

    /// Flush and close, reporting a flush error (dropping an image flushes silently).
    pub fn close(self) -> Result<()> {
        let r = self.close_inner();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        r
    }

    fn close_inner(&self) -> Result<()> {
        let mut m = self.lock();
        if m.read_only {
            return Ok(());
        }
        m.flush()?;
        m.finish_clean_close()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed.load(std::sync::atomic::Ordering::Acquire) {
            let _ = self.close_inner();
        }
    }
}
