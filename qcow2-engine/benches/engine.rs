//! Criterion benchmarks for the engine's I/O paths, 64 KiB clusters, default caches:
//!
//! - `cached_l2_lookup`: 4 KiB reads inside one allocated cluster whose L2 slice is
//!   cached, on `MemStorage` (metadata path plus a memcpy) and on a buffered temp file
//!   (plus one `pread` from the page cache).
//! - `read_allocated`: sequential 4 KiB and 64 KiB reads across a fully allocated 64 MiB
//!   image in a temp file, page cache warm.
//! - `allocating_write`: 4 KiB writes at a 64 KiB stride (every write allocates a cluster;
//!   the rest of the cluster is known to read zero, so nothing is copied) and 64 KiB
//!   full-cluster allocating writes, on fresh temp-file images. The L2 table is allocated
//!   before timing starts; image creation, the final flush and close are not timed, so
//!   the figures are the steady-state per-write cost with metadata write-back deferred.
//! - `overwrite`: 4 KiB and 64 KiB writes over clusters that are already allocated (the
//!   in-place path: data I/O outside the metadata lock).
//! - `cow`: 4 KiB writes into unallocated clusters of an overlay whose qcow2 backing file
//!   has data there, so each write reads the cluster from the backing file and writes the
//!   whole 64 KiB; fresh overlays as they fill (creation not timed). A 64 KiB full-cluster
//!   write over the same backing file (nothing to copy) is measured for comparison.
//!
//! Throughput is per request (`Throughput::Bytes` of the request size), so criterion's
//! MB/s is guest bytes per second and its time is time per request.
//!
//! Run with `cargo bench -p qcow2-engine --bench engine`. Temp files go under
//! `std::env::temp_dir()` with unique names and are removed afterwards.

// `criterion_group!` and `criterion_main!` generate undocumented public items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use host_io::{MemStorage, Storage};
use qcow2_engine::{create, create_on, CreateOptions, Image, OpenOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CLUSTER: u64 = 64 * KIB;
/// Image size for the read and overwrite benchmarks (fully allocated).
const FULL_IMAGE: u64 = 64 * MIB;
/// Virtual size of the images the allocating and copy-on-write benchmarks fill; a fresh
/// one is created (untimed) when one is full.
const FILL_IMAGE: u64 = 256 * MIB;

/// A unique path under the temp directory.
fn temp_path(tag: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "qcow2-engine-bench-{}-{n}-{tag}.qcow2",
        std::process::id()
    ))
}

/// An image in a temp file; closed and removed on drop.
struct TempImage {
    img: Option<Image>,
    path: PathBuf,
}

impl TempImage {
    /// Create and open a fresh image of `size` bytes (or the backing file's size).
    fn create(tag: &str, size: Option<u64>, backing: Option<&Path>) -> TempImage {
        let path = temp_path(tag);
        let opts = CreateOptions {
            size,
            cluster_size: CLUSTER,
            backing_file: backing.map(|p| p.to_str().expect("UTF-8 temp path").to_string()),
            backing_fmt: backing.map(|_| "qcow2".to_string()),
            ..Default::default()
        };
        create(&path, &opts).expect("create image");
        let img = Image::open(&path, &OpenOptions::default()).expect("open image");
        TempImage {
            img: Some(img),
            path,
        }
    }

    fn img(&self) -> &Image {
        self.img.as_ref().expect("open")
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if let Some(img) = self.img.take() {
            let _ = img.close();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A fixed, non-zero pattern (so nothing can be mistaken for a zero cluster).
fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

/// Write the whole image with data in 1 MiB requests, flush it, and read it back once so
/// the page cache holds it.
fn fill(img: &Image) {
    let chunk = pattern(MIB);
    let size = img.virtual_size();
    let mut off = 0;
    while off < size {
        img.write_at(&chunk, off).expect("fill");
        off += MIB;
    }
    img.flush().expect("flush");
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        img.read_at(&mut buf, off).expect("warm read");
        off += MIB;
    }
}

/// Advance a cursor by `step`, wrapping at `end`.
fn advance(pos: &mut u64, step: u64, end: u64) -> u64 {
    let at = *pos;
    *pos += step;
    if *pos + step > end {
        *pos = 0;
    }
    at
}

fn bench_cached_l2_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("cached_l2_lookup");
    g.throughput(Throughput::Bytes(4 * KIB));
    let data = pattern(CLUSTER);

    // In memory: the metadata path (lock, L1, cached L2 slice, pin/unpin) plus a memcpy.
    let mem = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        size: Some(FILL_IMAGE),
        cluster_size: CLUSTER,
        ..Default::default()
    };
    create_on(Arc::clone(&mem) as Arc<dyn Storage>, &opts, None).expect("create in memory");
    let img = Image::open_storage(mem, &OpenOptions::default(), None).expect("open in memory");
    img.write_at(&data, 0).expect("allocate cluster 0");
    let mut buf = vec![0u8; 4 * KIB as usize];
    img.read_at(&mut buf, 0).expect("prime the L2 cache");
    let mut pos = 0;
    g.bench_function("mem_4KiB", |b| {
        b.iter(|| {
            let off = advance(&mut pos, 4 * KIB, CLUSTER);
            img.read_at(black_box(&mut buf), black_box(off)).unwrap();
        })
    });
    drop(img);

    // Buffered temp file: the same plus one pread served by the page cache.
    let t = TempImage::create("l2lookup", Some(FILL_IMAGE), None);
    t.img().write_at(&data, 0).expect("allocate cluster 0");
    t.img().flush().expect("flush");
    t.img().read_at(&mut buf, 0).expect("prime the L2 cache");
    let mut pos = 0;
    g.bench_function("file_4KiB", |b| {
        b.iter(|| {
            let off = advance(&mut pos, 4 * KIB, CLUSTER);
            t.img()
                .read_at(black_box(&mut buf), black_box(off))
                .unwrap();
        })
    });
    g.finish();
}

fn bench_read_allocated(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_allocated");
    let t = TempImage::create("read", Some(FULL_IMAGE), None);
    fill(t.img());
    for len in [4 * KIB, 64 * KIB] {
        g.throughput(Throughput::Bytes(len));
        let mut buf = vec![0u8; len as usize];
        let mut pos = 0;
        g.bench_function(
            BenchmarkId::new("sequential", format!("{}KiB", len / KIB)),
            |b| {
                b.iter(|| {
                    let off = advance(&mut pos, len, FULL_IMAGE);
                    t.img().read_at(black_box(&mut buf), off).unwrap();
                })
            },
        );
    }
    g.finish();
}

/// Time `iters` writes of `len` bytes, each at the start of a fresh, unallocated cluster
/// (cluster 0 is written during setup so the L2 table exists), moving to a new image from
/// `make` when one is full. Creation, setup and close are not timed.
fn timed_fresh_cluster_writes(iters: u64, len: u64, make: &dyn Fn() -> TempImage) -> Duration {
    let data = pattern(len);
    let clusters = FILL_IMAGE / CLUSTER;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let t = make();
        t.img().write_at(&data, 0).expect("allocate the L2 table");
        let n = left.min(clusters - 1);
        let start = Instant::now();
        for k in 1..=n {
            t.img().write_at(black_box(&data), k * CLUSTER).unwrap();
        }
        total += start.elapsed();
        left -= n;
        drop(t);
    }
    total
}

fn bench_allocating_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocating_write");
    for len in [4 * KIB, 64 * KIB] {
        g.throughput(Throughput::Bytes(len));
        let name = if len == CLUSTER {
            "64KiB_full_cluster".to_string()
        } else {
            format!("{}KiB_stride_64KiB", len / KIB)
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed_fresh_cluster_writes(iters, len, &|| {
                    TempImage::create("alloc", Some(FILL_IMAGE), None)
                })
            })
        });
    }
    g.finish();
}

fn bench_overwrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("overwrite");
    let t = TempImage::create("overwrite", Some(FULL_IMAGE), None);
    fill(t.img());
    for len in [4 * KIB, 64 * KIB] {
        g.throughput(Throughput::Bytes(len));
        let data = pattern(len);
        let mut pos = 0;
        g.bench_function(
            BenchmarkId::new("sequential", format!("{}KiB", len / KIB)),
            |b| {
                b.iter(|| {
                    let off = advance(&mut pos, len, FULL_IMAGE);
                    t.img().write_at(black_box(&data), off).unwrap();
                })
            },
        );
    }
    g.finish();
}

fn bench_cow(c: &mut Criterion) {
    let mut g = c.benchmark_group("cow");
    let mut base = TempImage::create("cow-base", Some(FILL_IMAGE), None);
    fill(base.img());
    // Close it: the overlays open it as their backing file, which its writer lock (held
    // while open read/write) would refuse.
    base.img.take().expect("open").close().expect("close base");
    let base_path = base.path.clone();
    for len in [4 * KIB, 64 * KIB] {
        g.throughput(Throughput::Bytes(len));
        let name = if len == CLUSTER {
            "64KiB_full_cluster_no_copy".to_string()
        } else {
            format!("{}KiB_copies_cluster", len / KIB)
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed_fresh_cluster_writes(iters, len, &|| {
                    TempImage::create("cow-overlay", None, Some(&base_path))
                })
            })
        });
    }
    g.finish();
    drop(base);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_cached_l2_lookup, bench_read_allocated, bench_allocating_write,
        bench_overwrite, bench_cow
}
criterion_main!(benches);
