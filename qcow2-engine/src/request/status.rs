//! Block status and maps: what each guest range is (data, zero, unallocated, compressed),
//! at which layer of the backing chain, and where its bytes live on the host. The rules
//! follow `qemu-img map`, so that its JSON output can be rebuilt from [`Image::map`].

use qcow2_format::{ClusterKind, SubclusterKind};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::lifecycle::backing::Backing;
use crate::request::pieces::pieces;

/// The status of a guest range, as one layer of the chain reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status (at least 1 for a non-empty query).
    pub len: u64,
    /// The range is defined by the layer at `depth` (qemu-img map's `present`): data, zero
    /// clusters, or (for raw backing files) any byte of the file.
    pub present: bool,
    /// The range reads as stored data (not known to be zero).
    pub data: bool,
    /// The range reads as zeros.
    pub zero: bool,
    /// The data is a compressed cluster (no plain host offset).
    pub compressed: bool,
    /// The layer that answered: 0 for this image, 1 for its backing file, and so on.
    pub depth: u32,
    /// Host offset of the range in the file of the layer at `depth`, when it has one
    /// (allocated clusters, including zero-allocated ones; raw backing files).
    pub host_offset: Option<u64>,
}

impl BlockStatus {
    /// The range's content comes from a backing file.
    pub fn from_backing(&self) -> bool {
        self.depth > 0
    }

    /// Whether `next` continues `self` with the same status (qemu-img map's merge rule:
    /// same flags and layer, and host offsets contiguous when there are any).
    pub fn mergeable(&self, next: &BlockStatus) -> bool {
        self.present == next.present
            && self.data == next.data
            && self.zero == next.zero
            && self.compressed == next.compressed
            && self.depth == next.depth
            && match (self.host_offset, next.host_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.len == b,
                _ => false,
            }
    }
}

/// One entry of a map: a guest range and its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the range.
    pub start: u64,
    /// Its status; `status.len` is the length.
    pub status: BlockStatus,
}

impl Image {
    /// The status of the range starting at `off`, up to `len` bytes (clipped to the image):
    /// the returned `len` says how far the same status extends.
    pub fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus> {
        if len == 0 {
            return Err(crate::error::invalid_arg!(
                "block status of an empty range at {off:#x}"
            ));
        }
        self.check_range(off, 1)?;
        let len = len.min(self.virtual_size() - off);
        self.status_at_depth(off, len, 0)
    }

    /// The map of `[off, off+len)`: consecutive ranges with merged statuses, as
    /// `qemu-img map --output=json` prints them.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<MapEntry>> {
        self.check_range(off, len)?;
        let mut out: Vec<MapEntry> = Vec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let st = self.status_at_depth(pos, end - pos, 0)?;
            match out.last_mut() {
                Some(last) if last.status.mergeable(&st) => last.status.len += st.len,
                _ => out.push(MapEntry {
                    start: pos,
                    status: st,
                }),
            }
            pos += st.len;
        }
        Ok(out)
    }

    /// Status at this image, which is layer `depth` of the chain being queried.
    fn status_at_depth(&self, off: u64, len: u64, depth: u32) -> Result<BlockStatus> {
        let own = self.own_status(off, len, depth)?;
        if own.present {
            return self.with_host_holes(own);
        }
        match &self.backing {
            None => Ok(own),
            Some(b) if off >= b.size() => Ok(own),
            Some(b) => backing_status(b, off, own.len.min(b.size() - off), depth + 1),
        }
    }

    /// QEMU's `is_zero` test below this image (`bdrv_block_status_above` from the backing
    /// file down): whether block status says `[off, off+len)` of the backing chain reads
    /// zero. Zero means no backing file, past a backing file's end, unallocated down the
    /// chain, zero clusters and subclusters, holes of a raw file (SEEK_HOLE), and host
    /// holes under data of a metadata-preallocated image; never the bytes themselves: a
    /// data cluster or a raw extent holding zero bytes is data. The backing chain is
    /// read-only while this image holds it, so the answer does not need this image's lock.
    pub(crate) fn backing_reads_zero(&self, off: u64, len: u64) -> Result<bool> {
        let Some(b) = &self.backing else {
            return Ok(true);
        };
        let end = off.saturating_add(len).min(b.size());
        let mut pos = off;
        while pos < end {
            let st = backing_status(b, pos, end - pos, 1)?;
            if !st.zero {
                return Ok(false);
            }
            pos += st.len.max(1);
        }
        Ok(true)
    }

    /// On an image that looks metadata-preallocated, a data range whose host bytes are a
    /// hole in the file reads zero, and qemu-img map says so (`zero` and `data` both set).
    /// QEMU asks the file only in that case; so do we, to give the same map.
    fn with_host_holes(&self, st: BlockStatus) -> Result<BlockStatus> {
        let Some(host) = st.host_offset else {
            return Ok(st);
        };
        if !st.data || st.zero || !self.looks_preallocated()? {
            return Ok(st);
        }
        let (data, n) = self
            .storage
            .data_run(host, st.len)
            .map_err(Error::io_lazy(|| {
                format!("querying holes at host offset {host:#x}")
            }))?;
        Ok(BlockStatus {
            len: n.clamp(1, st.len),
            zero: !data,
            ..st
        })
    }

    /// QEMU's test for metadata preallocation: at least max(10/9 of the allocated clusters,
    /// allocated + 2) clusters of the file have a refcount. Decided once per open.
    fn looks_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.looks_preallocated.get() {
            return Ok(v);
        }
        let cs = self.geo.cluster_size();
        let io = |what: &'static str| Error::io(what);
        let v = match self
            .storage
            .allocated_size()
            .map_err(io("measuring the file"))?
        {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                let len = self.storage.len().map_err(io("reading the image length"))?;
                let mut st = self.lock()?;
                let m = &mut st.meta;
                let mut count = 0u64;
                let mut c = 0u64;
                while c < len.div_ceil(cs) && count < threshold {
                    count += u64::from(m.refcount(c).unwrap_or(0) > 0);
                    c += 1;
                }
                count >= threshold
            }
        };
        Ok(*self.looks_preallocated.get_or_init(|| v))
    }

    /// What this image's own L2 entries say about `[off, off+len)`, merged over as many
    /// (sub)clusters as share the status. An unallocated range is reported not present and
    /// zero (the caller asks the backing file, if any).
    fn own_status(&self, off: u64, len: u64, depth: u32) -> Result<BlockStatus> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let end = off + len;
        let mut st = self.lock()?;
        let m = &mut st.meta;
        let mut acc: Option<BlockStatus> = None;
        let mut pos = off;
        // Unallocated L1 entries are skipped whole; at most one L2 table's worth of entries
        // is examined per call, which keeps the lock short on huge ranges.
        let mut budget = geo.l2_entries();
        while pos < end && budget > 0 {
            let l1 = m.l1_entry(pos)?;
            if l1.is_unallocated() {
                // The whole L2 range is unallocated.
                let table_end = ((pos / geo.l2_coverage()) + 1).saturating_mul(geo.l2_coverage());
                let st = status_of(
                    SubclusterKind::UnallocatedPlain,
                    ClusterKind::Unallocated,
                    0,
                );
                let piece = BlockStatus {
                    len: table_end.min(end) - pos,
                    depth,
                    ..st
                };
                if !merge(&mut acc, piece) {
                    break;
                }
                pos = table_end.min(end);
                continue;
            }
            budget -= 1;
            let cl = geo.align_down(pos);
            let (entry, kind, _) = m.l2_kind(pos)?;
            let cl_end = (cl + cs).min(end);
            let mut stop = false;
            for (start, piece_end, sk) in pieces(geo, entry, kind, cl, pos, cl_end) {
                let piece = BlockStatus {
                    len: piece_end - start,
                    depth,
                    ..status_of(sk, kind, start - cl)
                };
                if !merge(&mut acc, piece) {
                    stop = true;
                    break;
                }
            }
            if stop {
                break;
            }
            pos = cl_end;
        }
        Ok(acc.expect("a non-empty range has a status"))
    }
}

/// The status of `[off, off+len)` (inside its size) in backing file `b`, layer `depth`.
fn backing_status(b: &Backing, off: u64, len: u64, depth: u32) -> Result<BlockStatus> {
    match b {
        Backing::Qcow2(img) => img.status_at_depth(off, len, depth),
        Backing::Raw(s, _) => {
            let (data, n) = s.data_run(off, len).map_err(Error::io_lazy(|| {
                format!("querying holes of the raw backing file at {off:#x}")
            }))?;
            Ok(BlockStatus {
                len: n.max(1).min(len),
                present: true,
                data,
                zero: !data,
                compressed: false,
                depth,
                host_offset: Some(off),
            })
        }
    }
}

/// Fold `piece` into the accumulated status; false if it starts a different status.
fn merge(acc: &mut Option<BlockStatus>, piece: BlockStatus) -> bool {
    match acc {
        None => {
            *acc = Some(piece);
            true
        }
        Some(a) if a.mergeable(&piece) => {
            a.len += piece.len;
            true
        }
        Some(_) => false,
    }
}

/// The status of one (sub)cluster by its kind (length and depth filled in by the caller).
fn status_of(sk: SubclusterKind, kind: ClusterKind, in_cluster: u64) -> BlockStatus {
    let host = match kind {
        ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset } => {
            Some(offset + in_cluster)
        }
        _ => None,
    };
    let base = BlockStatus {
        len: 0,
        present: true,
        data: false,
        zero: false,
        compressed: false,
        depth: 0,
        host_offset: None,
    };
    match sk {
        SubclusterKind::Normal => BlockStatus {
            data: true,
            host_offset: host,
            ..base
        },
        SubclusterKind::Compressed => BlockStatus {
            data: true,
            compressed: true,
            ..base
        },
        SubclusterKind::ZeroAlloc => BlockStatus {
            zero: true,
            host_offset: host,
            ..base
        },
        SubclusterKind::ZeroPlain => BlockStatus { zero: true, ..base },
        // QEMU reports the host offset of an unallocated subcluster of an allocated cluster.
        SubclusterKind::UnallocatedAlloc => BlockStatus {
            present: false,
            zero: true,
            host_offset: host,
            ..base
        },
        SubclusterKind::UnallocatedPlain => BlockStatus {
            present: false,
            zero: true,
            ..base
        },
    }
}
