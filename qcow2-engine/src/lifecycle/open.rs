//! Opening an image: read and validate cluster 0, check every table against the file,
//! load L1 and the refcount table, map the metadata for overlap checks, size the caches,
//! and open the backing chain. Cost is proportional to the L1 and refcount tables, never
//! to the image's data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use host_io::Storage;
use qcow2_format::features::{describe_incompatible, incompatible};
use qcow2_format::header::Header;
use qcow2_format::l1::decode_table;
use qcow2_format::snapshot::{SnapshotEntry, SNAPSHOT_FIXED_LEN};
use qcow2_format::{refcount, Geometry, HeaderArea, L1Entry};

use crate::changes::Changes;
use crate::error::{corrupt, invalid_arg, Error, Result};
use crate::image::{Image, OpenOptions, State};
use crate::lifecycle::backing::open_backing;
use crate::meta::cache::TableCache;
use crate::meta::{
    Allocator, FastMap, HeaderState, HostOps, Mapping, Meta, MetaKind, Refcounts, Regions,
    WriteOrder,
};
use crate::provision::policy::FreeReason;
use crate::request::claims::Claims;

/// QEMU's default ceiling for the L2 cache.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

impl Image {
    pub(crate) fn open_storage_in_chain(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        dir: Option<&Path>,
        chain: &[PathBuf],
    ) -> Result<Image> {
        Self::open_once(storage, opts, dir, chain, false)
    }

    /// Open; `repaired`: a dirty image was repaired already (do not try again).
    fn open_once(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        dir: Option<&Path>,
        chain: &[PathBuf],
        repaired: bool,
    ) -> Result<Image> {
        let file_len = storage
            .len()
            .map_err(Error::io("reading the image length"))?;
        if file_len < 72 {
            return Err(invalid_arg!(
                "file is {file_len} bytes, too short for a qcow2 header"
            ));
        }
        // The fixed v2 part tells the cluster size; the whole header (header_length may be
        // up to a cluster) is then decoded from cluster 0.
        let mut first = [0u8; 72];
        storage
            .read_at(&mut first, 0)
            .map_err(Error::io("reading the image header"))?;
        let magic = u32::from_be_bytes(first[0..4].try_into().expect("4 bytes"));
        if magic != qcow2_format::header::QCOW_MAGIC {
            return Err(qcow2_format::FormatError::BadMagic { found: magic }.into());
        }
        let cluster_bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
        let geo = Geometry::new(cluster_bits, false, 4)?;
        let cs = geo.cluster_size();
        let mut cluster0 = vec![0u8; cs.min(file_len) as usize];
        storage
            .read_at(&mut cluster0, 0)
            .map_err(Error::io("reading cluster 0"))?;
        let header = Header::decode(&cluster0).map_err(|e| match e {
            qcow2_format::FormatError::Truncated { need, .. } if need as u64 > cs => {
                invalid_arg!("header_length {need} exceeds the cluster size {cs}")
            }
            e => e.into(),
        })?;
        // As QEMU, only a check-open accepts an image without a refcount table.
        let area = if opts.check {
            header.validate_for_check()?;
            HeaderArea::parse_for_check(&cluster0)?
        } else {
            header.validate()?;
            HeaderArea::parse(&cluster0)?
        };
        let geo = area.header.geometry()?;
        let h = &area.header;
        // A check-open may be read/write on a corrupt image: `corrupt` below keeps guest
        // writes refused until a repair clears the bit.
        refuse_unsupported(h, opts.read_only || opts.check)?;
        if h.is_dirty() && !opts.read_only && !opts.check && !repaired {
            // Refcounts may be stale (lazy refcounts, an unclean shutdown) or damaged:
            // QEMU repairs a dirty image at a read/write open. The repair runs on a
            // check-open (which accepts what a normal open refuses), then the image
            // opens as usual.
            repair_dirty(storage.clone(), opts, dir, chain)?;
            return Self::open_once(storage, opts, dir, chain, true);
        }

        // Tables are read as far as they lie inside the file (the rest reads as zeros);
        // their sizes are bounded by QEMU's limits (32 MiB L1, 8 MiB refcount table).
        let read_table = |what: &str, off: u64, len: u64| -> Result<Vec<u64>> {
            let mut buf = vec![0u8; len as usize];
            let n = len.min(file_len.saturating_sub(off)) as usize;
            storage
                .read_at(&mut buf[..n], off)
                .map_err(Error::io_lazy(|| format!("reading the {what}")))?;
            Ok(decode_table(&buf))
        };
        let l1_bytes = u64::from(h.l1_size) * 8;
        let l1 = read_table("L1 table", h.l1_table_offset, l1_bytes)?;
        let l1_in_file = file_len.saturating_sub(h.l1_table_offset) / 8;
        let l1_past_eof = if l1_in_file < l1.len() as u64 {
            l1_in_file as usize
        } else {
            usize::MAX // all of it: the table may grow later
        };
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        let reftable = read_table("refcount table", h.refcount_table_offset, rt_bytes)?;
        let snapshots = read_snapshots(&*storage, h, &geo, file_len)?;

        // Tables past the end of the file, or L1 entries naming L2 tables there, refuse a
        // read/write open. Read-only (so that check can report it as qemu-img does) and
        // for check and repair (QEMU's BDRV_O_CHECK) the image opens; a read/write
        // check-open then refuses guest writes until a repair leaves no such problem.
        // Overlapping metadata is left out of the overlap map, so that the first write
        // that would damage it is refused and marks the image corrupt, as QEMU does.
        let mut ranges = map_metadata(&*storage, &geo, h, &l1, &reftable, &snapshots, file_len)?;
        let distrust = match ranges.problems.first() {
            Some(p) if !(opts.read_only || opts.check) => return Err(corrupt!("{p}")),
            Some(_) => !opts.read_only,
            None => false,
        };
        // Damaged bitmaps never refuse an open (they hold no guest data): they are
        // reported and left alone.
        let (mut bitmaps, bitmap_regions) =
            crate::meta::bitmaps::load(&*storage, &area, &geo, file_len)?;
        if let Some((s, l, k)) = bitmap_regions
            .iter()
            .find(|&&(s, l, _)| ranges.regions.overlapping(s, l).is_some())
        {
            bitmaps.mark_damaged(format!("{k:?} at {s:#x} (+{l:#x}) overlaps other metadata"));
        } else {
            for (s, l, k) in bitmap_regions {
                ranges.regions.add(s, l, k);
            }
        }

        let (l2_entry, l2_entries, rb_entries) = cache_sizes(&opts.cache, &geo, h.size)?;
        let virtual_size = h.size;
        let compression = h.compression()?;
        let backing = match (&area.backing_file, opts.no_backing) {
            (Some(name), false) => {
                Some(open_backing(name, area.backing_format(), dir, chain, opts)?)
            }
            _ => None,
        };
        let free_gen = Arc::new(AtomicU64::new(0));
        let fast = Arc::new(FastMap::for_clusters(geo.clusters_for(virtual_size)));
        let policy = opts.discard.resolve(h.version)?;
        let version = h.version;
        let mut header = HeaderState::new(area);
        if distrust {
            header.restore_corrupt(true);
        }
        let meta = Meta {
            storage: storage.clone(),
            geo,
            read_only: opts.read_only,
            mapping: Mapping::new(
                geo,
                l1,
                l1_past_eof,
                TableCache::new(l2_entry, l2_entries),
                fast.clone(),
            ),
            refcounts: Refcounts::new(geo, reftable, TableCache::new(cs as usize, rb_entries)),
            alloc: Allocator::new(
                geo.align_up(file_len),
                growth_slack(&geo, virtual_size, opts.quarantine_slack),
            ),
            order: WriteOrder::default(),
            host_ops: HostOps::default(),
            regions: ranges.regions,
            snapshots,
            bitmaps,
            metadata_on_free: if policy.passes(FreeReason::Other) {
                crate::meta::OnFree::Discard
            } else {
                crate::meta::OnFree::Keep
            },
            free_gen: free_gen.clone(),
            header,
        };
        let aio = crate::exec::async_queue::choose_backend(&storage, opts, geo)?;
        let img = Image {
            state: Mutex::new(State {
                meta,
                policy,
                claims: Claims::default(),
                changes: Changes::default(),
            }),
            claims_ended: Condvar::new(),
            storage,
            backing,
            geo,
            version,
            size: AtomicU64::new(virtual_size),
            compression,
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
            looks_preallocated: OnceLock::new(),
            free_gen,
            fast,
            quarantine_slack: opts.quarantine_slack,
            opts: opts.clone(),
            locked: false,
            aio,
        };
        Ok(img)
    }
}

/// Repair a dirty image before a read/write open, as QEMU does (`qemu-img check -r all`
/// on a check-open, without the backing chain). A repair that leaves corruptions (which
/// qemu-img would leave too) does not stop the open; one that cannot run does.
fn repair_dirty(
    storage: Arc<dyn Storage>,
    opts: &OpenOptions,
    dir: Option<&Path>,
    chain: &[PathBuf],
) -> Result<()> {
    let o = OpenOptions {
        check: true,
        no_backing: true,
        ..opts.clone()
    };
    let img = Image::open_once(storage, &o, dir, chain, true)?;
    let rep = img
        .check(crate::integrity::check::Repair::All)
        .map_err(|e| corrupt!("could not repair the dirty image: {e}"))?;
    if rep.check_errors > 0 {
        return Err(corrupt!(
            "could not repair the dirty image: {} internal errors during the check",
            rep.check_errors
        ));
    }
    img.close()
}

/// Refuse what this library cannot handle safely.
fn refuse_unsupported(h: &Header, read_only: bool) -> Result<()> {
    let unknown = h.unknown_incompatible();
    if unknown != 0 {
        return Err(Error::Unsupported(format!(
            "unknown incompatible feature bits {:#x} ({})",
            unknown,
            describe_incompatible(unknown).join(", ")
        )));
    }
    if h.crypt_method != 0 {
        return Err(Error::Unsupported(format!(
            "encrypted images (crypt_method {})",
            h.crypt_method
        )));
    }
    if h.incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0 {
        return Err(Error::Unsupported(
            "images with an external data file".into(),
        ));
    }
    if !read_only && h.is_corrupt() {
        return Err(Error::Corrupt(
            "the image has the corrupt bit set and cannot be opened read/write".into(),
        ));
    }
    Ok(())
}

fn read_snapshots(
    s: &dyn Storage,
    h: &Header,
    geo: &Geometry,
    file_len: u64,
) -> Result<Vec<SnapshotEntry>> {
    let mut out = Vec::new();
    let mut at = h.snapshots_offset;
    for index in 0..h.nb_snapshots as usize {
        let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
        if at + SNAPSHOT_FIXED_LEN as u64 > file_len {
            return Err(corrupt!(
                "snapshot table entry {index} at {at:#x} is past the end of the file"
            ));
        }
        s.read_at(&mut fixed, at)
            .map_err(Error::io("reading the snapshot table"))?;
        let extra = u64::from(u32::from_be_bytes(fixed[36..40].try_into().expect("4")));
        let id = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        // The last entry is not padded in the file; entries start 8-aligned.
        let total = SNAPSHOT_FIXED_LEN as u64 + extra.min(4096) + id + name;
        if at + total > file_len {
            return Err(corrupt!(
                "snapshot table entry {index} at {at:#x} is past the end of the file"
            ));
        }
        let mut buf = vec![0u8; total as usize];
        s.read_at(&mut buf, at)
            .map_err(Error::io("reading the snapshot table"))?;
        let (e, _) = SnapshotEntry::parse(&buf, index, (at - h.snapshots_offset) as usize)?;
        let len = total.div_ceil(8) * 8;
        if e.l1_size as u64 > qcow2_format::geometry::MAX_L1_BYTES / 8 {
            return Err(corrupt!(
                "snapshot {index}: L1 table too large ({} entries)",
                e.l1_size
            ));
        }
        geo.check_table_offset("snapshot L1 table", e.l1_table_offset)?;
        out.push(e);
        at += len;
    }
    Ok(out)
}

/// Cache geometry: (L2 entry size, L2 entries, refcount block entries).
fn cache_sizes(
    c: &crate::options::CacheOptions,
    geo: &Geometry,
    size: u64,
) -> Result<(usize, usize, usize)> {
    let cs = geo.cluster_size();
    let entry = if c.l2_cache_entry_size == 0 {
        cs
    } else {
        c.l2_cache_entry_size
    };
    if !entry.is_power_of_two() || entry < 512 || entry > cs {
        return Err(invalid_arg!(
            "l2-cache-entry-size must be a power of two between 512 and the cluster size ({cs})"
        ));
    }
    let whole = geo.l1_entries_for(size).saturating_mul(cs);
    let l2 = if c.l2_cache_size == 0 {
        whole.min(DEFAULT_L2_CACHE_MAX)
    } else {
        c.l2_cache_size
    }
    .max(2 * cs);
    let rb = if c.refcount_cache_size == 0 {
        l2 / 4
    } else {
        c.refcount_cache_size
    }
    .max(4 * cs);
    Ok((
        entry as usize,
        (l2 / entry).max(2) as usize,
        (rb / cs).max(4) as usize,
    ))
}

/// The overlap map of the metadata the header, the active L1 table, the refcount table
/// and the snapshot list name (with the L2 tables only snapshots name), and the problems
/// a read/write open refuses: tables past the end of the file, L1 entries naming L2
/// tables there. Damaged entries and refcount blocks past the end are left out (found at
/// use, as QEMU finds them).
fn map_metadata(
    storage: &dyn Storage,
    geo: &Geometry,
    h: &Header,
    l1: &[u64],
    reftable: &[u64],
    snapshots: &[SnapshotEntry],
    file_len: u64,
) -> Result<MetaMap> {
    let cs = geo.cluster_size();
    let mut ranges = MetaMap::default();
    let l1_bytes = u64::from(h.l1_size) * 8;
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    for (what, off, len) in [
        ("L1 table", h.l1_table_offset, l1_bytes),
        ("refcount table", h.refcount_table_offset, rt_bytes),
    ] {
        if off.checked_add(len).is_none_or(|e| e > file_len) {
            ranges.problem(format!(
                "{what} at {off:#x} (+{len:#x} bytes) extends past the end of the file ({file_len:#x})"
            ));
        }
    }
    ranges.add(0, cs, MetaKind::Header);
    ranges.add(h.l1_table_offset, l1_bytes, MetaKind::ActiveL1);
    ranges.add(h.refcount_table_offset, rt_bytes, MetaKind::RefcountTable);
    for &raw in reftable {
        match refcount::reftable_entry(raw, geo) {
            Ok(0) => {}
            // Never read or written there (the file would grow to wherever the entry
            // points): using it marks the image corrupt, as QEMU's overlap checks do.
            Ok(off) if off >= file_len => {}
            Ok(off) => ranges.add(off, cs, MetaKind::RefcountBlock),
            // As QEMU: found when the block is used, which marks the image corrupt.
            Err(_) => {}
        }
    }
    for (i, &raw) in l1.iter().enumerate() {
        let e = L1Entry(raw);
        match e.validate_for_io(geo) {
            Ok(()) if e.is_unallocated() => {}
            Ok(()) if e.l2_offset() >= file_len => ranges.problem(format!(
                "L1 entry {i}: L2 table at {:#x} is past the end of the file ({file_len:#x})",
                e.l2_offset()
            )),
            Ok(()) => ranges.add(e.l2_offset(), cs, MetaKind::ActiveL2),
            // As QEMU: found when the entry is used, which marks the image corrupt.
            Err(_) => {}
        }
    }
    if h.nb_snapshots > 0 {
        let len: u64 = snapshots
            .iter()
            .map(|s| s.to_bytes().map(|b| b.len() as u64).unwrap_or(0))
            .sum();
        ranges.add(h.snapshots_offset, len, MetaKind::SnapshotTable);
        for s in snapshots {
            ranges.add(
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
                MetaKind::SnapshotL1,
            );
        }
        snapshot_l2_tables(storage, snapshots, geo, file_len, &mut ranges)?;
    }
    Ok(ranges)
}

/// Map the metadata of an open image again (after a repair changed it, from what the
/// repair flushed) and return what still refuses a read/write open.
pub(crate) fn remap_regions(m: &mut Meta) -> Result<Vec<String>> {
    let file_len = m
        .storage
        .len()
        .map_err(Error::io("reading the image length"))?;
    let map = map_metadata(
        &*m.storage,
        &m.geo,
        m.header.get(),
        m.mapping.l1(),
        m.refcounts.table(),
        &m.snapshots,
        file_len,
    )?;
    // The bitmaps' clusters are not in the tree the map walks: while the bitmaps are
    // maintained they keep their ranges (their component keeps them current); bitmaps a
    // repair dropped own nothing any more.
    let mut regions = map.regions;
    let keep_bitmaps = m.bitmaps.maintained();
    let bitmap_kind = |k| {
        matches!(
            k,
            MetaKind::BitmapDirectory | MetaKind::BitmapTable | MetaKind::BitmapData
        )
    };
    for (s, l, k) in m.regions.ranges_where(|k| keep_bitmaps && bitmap_kind(k)) {
        if regions.overlapping(s, l).is_none() {
            regions.add(s, l, k);
        }
    }
    m.regions = regions;
    Ok(map.problems)
}

/// Metadata ranges being collected. Overlaps are left out of the map (writes that would
/// land on the other structure are then refused at use); problems that refuse a
/// read/write open are recorded.
#[derive(Default)]
struct MetaMap {
    regions: Regions,
    problems: Vec<String>,
}

impl MetaMap {
    fn add(&mut self, start: u64, len: u64, kind: MetaKind) {
        if len == 0 {
            return;
        }
        if self.regions.overlapping(start, len).is_none() {
            self.regions.add(start, len, kind);
        }
    }

    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }
}
/// Put every L2 table a snapshot's L1 names and the active L1 does not into the overlap
/// map, so that no guest write can land on a snapshot's table (QEMU's
/// `overlap-check=all`). Only the part of each snapshot L1 inside the file is read.
fn snapshot_l2_tables(
    storage: &dyn Storage,
    snapshots: &[SnapshotEntry],
    geo: &Geometry,
    file_len: u64,
    ranges: &mut MetaMap,
) -> Result<()> {
    let cs = geo.cluster_size();
    for s in snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        let in_file = bytes.min(file_len.saturating_sub(s.l1_table_offset)) / 8 * 8;
        let mut buf = vec![0u8; in_file as usize];
        storage
            .read_at(&mut buf, s.l1_table_offset)
            .map_err(Error::io("reading a snapshot's L1 table"))?;
        for raw in decode_table(&buf) {
            let e = L1Entry(raw);
            if e.is_unallocated() || e.validate(geo).is_err() || e.l2_offset() >= file_len {
                continue;
            }
            let off = e.l2_offset();
            let known = ranges.regions.starts_at(off, MetaKind::ActiveL2)
                || ranges.regions.starts_at(off, MetaKind::SnapshotL2);
            if !known {
                ranges.add(off, cs, MetaKind::SnapshotL2);
            }
        }
    }
    Ok(())
}

/// How many clusters the file may grow by while freed clusters wait in the quarantine: as
/// the option says, else a sixteenth of the virtual size, so the file stays within a few
/// percent of what it would be with immediate reuse.
pub(crate) fn growth_slack(geo: &Geometry, virtual_size: u64, option: Option<u64>) -> u64 {
    option.unwrap_or(virtual_size / 16) >> geo.cluster_bits()
}
