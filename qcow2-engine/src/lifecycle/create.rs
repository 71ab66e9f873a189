//! Creating images with qemu-img's options and layout: header and extensions in cluster 0,
//! the refcount table, the refcount blocks, then the L1 table; preallocation runs through
//! the normal allocation paths afterwards.

use std::path::Path;
use std::sync::Arc;

use host_io::{FileOptions, FileStorage, Storage, ZeroMode};
use qcow2_format::extensions::{FeatureName, HeaderExtension};
use qcow2_format::features::{compatible, incompatible};
use qcow2_format::header::{Header, V2_HEADER_LEN, V3_HEADER_LEN};
use qcow2_format::l1::encode_table;
use qcow2_format::{refcount, CompressionType, Geometry, HeaderArea};

use crate::changes::ChangeKind;
use crate::error::{invalid_arg, Error, Result};
use crate::image::{Image, OpenOptions};
use crate::lifecycle::backing::{open_backing, Backing};
use crate::options::{CreateOptions, Preallocation};

/// The feature name table QEMU writes into v3 images (names from the specification).
fn feature_names() -> Vec<FeatureName> {
    let f = |kind: u8, bit: u8, name: &str| FeatureName {
        kind,
        bit,
        name: name.as_bytes().to_vec(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

/// Create an image file at `path` (a block device is overwritten in place).
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    opts.validate()?;
    let dir = std::fs::canonicalize(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
    .map_err(Error::io_lazy(|| {
        format!("resolving the directory of '{}'", path.display())
    }))?;
    // Locked (as qemu-img create) before a regular file is truncated: an image in use is
    // refused with `Error::InUse`, never clobbered.
    let storage = FileStorage::open(path, &FileOptions::create_new())
        .map_err(|e| crate::lifecycle::locking::open_error(e, None))?;
    create_on(Arc::new(storage), opts, Some(&dir))
}

/// Format the file or block device behind a descriptor the caller already has (taking
/// ownership of it; see [`FileStorage::from_fd`]): locked and truncated as [`create`]
/// does. Relative backing file names resolve against the directory of that file.
pub fn create_fd(fd: std::os::fd::OwnedFd, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let fo = FileOptions {
        create: false,
        ..FileOptions::create_new()
    };
    let storage = FileStorage::from_fd(fd, &fo)
        .map_err(|e| crate::lifecycle::locking::open_error(e, None))?;
    let dir = storage.path().parent().map(Path::to_path_buf);
    create_on(Arc::new(storage), opts, dir.as_deref())
}

/// Create an image on any storage; `dir` resolves a relative backing file name.
pub fn create_on(
    storage: Arc<dyn Storage>,
    opts: &CreateOptions,
    dir: Option<&Path>,
) -> Result<()> {
    opts.validate()?;
    let geo = Geometry::from_cluster_size(opts.cluster_size, opts.extended_l2, opts.refcount_bits)
        .map_err(|e| invalid_arg!("{e}"))?;
    let size = match (opts.size, &opts.backing_file) {
        (Some(s), _) => s,
        (None, Some(name)) => {
            let fmt = opts.backing_fmt.as_deref().map(str::as_bytes);
            // Only the size is read: force-share, as qemu-img create, so that an overlay can
            // be made over a base image in use.
            let probe = OpenOptions {
                read_only: true,
                force_share: true,
                ..OpenOptions::default()
            };
            let b: Backing = open_backing(name.as_bytes(), fmt, dir, &[], &probe)?;
            b.size()
        }
        (None, None) => return Err(invalid_arg!("size: an image size is required")),
    };
    let size = size
        .checked_add(511)
        .map(|s| s & !511)
        .ok_or_else(|| invalid_arg!("size {size} is too large"))?;
    geo.check_virtual_size(size)
        .map_err(|_| crate::options::size_too_large(size, &geo))?;
    let cs = geo.cluster_size();
    let l1_entries = geo.l1_entries_for(size);
    // An empty disk has no L1 table at all (offset 0), as qemu-img makes it.
    let l1_clusters = geo.clusters_for(l1_entries * 8);
    // The refcount structures count the header, the L1 table and themselves.
    let (rt, rb) = crate::meta::structure_size(&geo, 1 + l1_clusters);
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = if l1_entries == 0 { 0 } else { rb_off + rb * cs };
    let total = 1 + rt + rb + l1_clusters;

    let mut features = 0u64;
    if opts.extended_l2 {
        features |= incompatible::EXTENDED_L2;
    }
    if opts.compression_type == CompressionType::Zstd {
        features |= incompatible::COMPRESSION_TYPE;
    }
    let v3 = opts.version == 3;
    let header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: geo.cluster_bits(),
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: features,
        compatible_features: if opts.lazy_refcounts {
            compatible::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: geo.refcount_order(),
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN } as u32,
        compression_type: opts.compression_type.to_byte(),
        tail: vec![0; if v3 { V3_HEADER_LEN - 105 } else { 0 }],
    };
    let mut extensions = Vec::new();
    if let Some(fmt) = &opts.backing_fmt {
        extensions.push(HeaderExtension::BackingFormat(fmt.as_bytes().to_vec()));
    }
    // QEMU 10 leaves the table (392 bytes) out of clusters of 4 KiB and less: with it, a
    // 512-byte header cluster has no room for a bitmaps extension or a backing file name.
    if v3 && cs > 4096 {
        extensions.push(HeaderExtension::FeatureNames(feature_names()));
    }
    let area = HeaderArea {
        header,
        extensions,
        backing_file: opts.backing_file.as_ref().map(|b| b.as_bytes().to_vec()),
    };
    let cluster0 = area.to_bytes()?;

    let io = |ctx: &'static str| Error::io(ctx);
    storage
        .set_len(0)
        .or_else(|e| {
            // Block devices keep their size; the image is laid over the start.
            if storage.capabilities().is_block_device {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(io("truncating the new image"))?;
    let mut c0 = vec![0u8; cs as usize];
    c0[..cluster0.len()].copy_from_slice(&cluster0);
    storage.write_at(&c0, 0).map_err(io("writing the header"))?;
    let table: Vec<u64> = (0..rt * cs / 8)
        .map(|i| if i < rb { rb_off + i * cs } else { 0 })
        .collect();
    storage
        .write_at(&encode_table(&table), rt_off)
        .map_err(io("writing the refcount table"))?;
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for c in 0..total {
        let b = (c / geo.refcount_block_entries()) as usize;
        let i = (c % geo.refcount_block_entries()) as usize;
        let blk = &mut blocks[b * cs as usize..(b + 1) * cs as usize];
        refcount::set(blk, i, geo.refcount_order(), 1)?;
    }
    storage
        .write_at(&blocks, rb_off)
        .map_err(io("writing the refcount blocks"))?;
    if l1_entries > 0 {
        let l1 = vec![0u8; (l1_entries * 8) as usize];
        storage
            .write_at(&l1, l1_off)
            .map_err(io("writing the L1 table"))?;
    } else {
        storage
            .set_len(rb_off + rb * cs)
            .or_else(|e| {
                if storage.capabilities().is_block_device {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io("sizing the new image"))?;
    }
    storage.flush().map_err(io("flushing the new image"))?;
    if opts.preallocation != Preallocation::Off {
        let img = Image::open_storage(
            storage,
            &OpenOptions {
                no_backing: true,
                ..Default::default()
            },
            dir,
        )?;
        img.preallocate(opts.preallocation)?;
        img.close()?;
    }
    Ok(())
}

impl Image {
    /// Allocate every L2 table and data cluster (and, for falloc/full, the data's host
    /// space). The data clusters read zeros: the file is sparse or zero-filled there.
    fn preallocate(&self, mode: Preallocation) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let size = self.virtual_size();
        let per_table = geo.l2_entries();
        let mut st = self.lock()?;
        self.announce(&mut st, 0, size, ChangeKind::Preallocate)?;
        let m = &mut st.meta;
        m.prepare_first_write()?;
        let bm = if geo.extended_l2() {
            qcow2_format::l2::BITMAP_ALL_ALLOC
        } else {
            0
        };
        let mut g = 0u64;
        while g < size {
            let n = ((size - g).div_ceil(cs)).min(per_table - geo.l2_index(g));
            m.l2_slot_for_write(g)?;
            let runs = m.alloc_clusters(n)?;
            let mut i = 0u64;
            for r in &runs {
                for k in 0..r.count {
                    let host = r.off + k * cs;
                    let guest = g + i * cs;
                    let slot = m.l2_slot_for_write(guest)?;
                    let e = qcow2_format::L2Entry::new(host | qcow2_format::l2::OFLAG_COPIED, bm);
                    m.set_l2(slot, guest, e)?;
                    i += 1;
                }
                let len = r.count * cs;
                match mode {
                    Preallocation::Falloc => m
                        .storage
                        .allocate(r.off, len)
                        .map_err(Error::io("preallocating data clusters"))?,
                    Preallocation::Full => {
                        m.storage
                            .write_zeroes(r.off, len, ZeroMode::KeepAllocated)
                            .map_err(Error::io("writing zeros over data clusters"))?;
                    }
                    _ => {}
                }
            }
            g += n * cs;
        }
        // The file covers every allocated cluster, as qemu-img leaves it.
        let end = m.alloc.end();
        let len = m
            .storage
            .len()
            .map_err(Error::io("reading the image length"))?;
        if len < end {
            m.storage
                .set_len(end)
                .map_err(Error::io("extending the image"))?;
        }
        m.flush()
    }
}
