//! host-io vs plain `std::fs` on a temp file: 4 KiB / 64 KiB positioned reads and writes,
//! and 64 KiB discard / zeroing against writing zeros by hand.
//!
//! The zeroing group is stateful: each function walks the file in 64 KiB strides over what
//! the previous function left (data, holes or unwritten extents). A release (punch) that
//! meets extents costs far more (ext4 writes dirty pages back and frees extents) than one
//! that meets a hole, so compare figures with that order in mind.
//!
//! `image_locks`: taking and releasing QEMU's image locks on an open file, and an open
//! (plus close) with and without the writer lock.
//!
//! Short by default (10 samples, 2 s). Run: `cargo bench -p host-io --bench storage`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use host_io::{FileOptions, FileStorage, LockRequest, Storage, ZeroMode};

const FILE_SIZE: u64 = 64 << 20;

/// A 64 MiB file of data in a fresh temp dir, removed on drop.
struct Fixture {
    dir: PathBuf,
    path: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("host-io-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create bench dir");
        let path = dir.join("img");
        let f = File::create(&path).expect("create bench file");
        let chunk = vec![0x5Au8; 1 << 20];
        for i in 0..FILE_SIZE / (1 << 20) {
            f.write_all_at(&chunk, i << 20).expect("fill bench file");
        }
        f.sync_all().expect("sync bench file");
        Fixture { dir, path }
    }

    fn std_file(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .expect("open std")
    }

    fn storage(&self) -> FileStorage {
        FileStorage::open(&self.path, &FileOptions::new()).expect("open host-io")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Offsets walking the file in `step` strides.
fn next_offset(i: &mut u64, step: u64) -> u64 {
    *i = (*i + step) % (FILE_SIZE - step);
    *i / step * step
}

fn rw(c: &mut Criterion) {
    let fx = Fixture::new("rw");
    let std_f = fx.std_file();
    let hio = fx.storage();
    for size in [4096usize, 65536] {
        let mut g = c.benchmark_group(format!("pwrite_{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let buf = vec![0xA5u8; size];
        let mut i = 0;
        g.bench_function(BenchmarkId::new("std_fs", size), |b| {
            b.iter(|| {
                std_f
                    .write_all_at(&buf, next_offset(&mut i, size as u64))
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("host_io", size), |b| {
            b.iter(|| {
                hio.write_at(&buf, next_offset(&mut i, size as u64))
                    .unwrap()
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("pread_{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0u8; size];
        g.bench_function(BenchmarkId::new("std_fs", size), |b| {
            b.iter(|| {
                std_f
                    .read_exact_at(&mut buf, next_offset(&mut i, size as u64))
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("host_io", size), |b| {
            b.iter(|| {
                hio.read_at(&mut buf, next_offset(&mut i, size as u64))
                    .unwrap()
            })
        });
        g.finish();
    }
}

fn zeroing(c: &mut Criterion) {
    let fx = Fixture::new("zero");
    let std_f = fx.std_file();
    let hio = fx.storage();
    let len = 65536u64;
    let zeros = vec![0u8; len as usize];
    let mut g = c.benchmark_group("zero_64k");
    g.throughput(Throughput::Bytes(len));
    let mut i = 0;
    g.bench_function("std_fs_write_zero_buffer", |b| {
        b.iter(|| {
            std_f
                .write_all_at(&zeros, next_offset(&mut i, len))
                .unwrap()
        })
    });
    g.bench_function("host_io_zero_unmap", |b| {
        b.iter(|| {
            hio.write_zeroes(next_offset(&mut i, len), len, ZeroMode::Unmap)
                .unwrap()
        })
    });
    g.bench_function("host_io_zero_keep_allocated", |b| {
        b.iter(|| {
            hio.write_zeroes(next_offset(&mut i, len), len, ZeroMode::KeepAllocated)
                .unwrap()
        })
    });
    g.bench_function("host_io_discard", |b| {
        b.iter(|| hio.discard(next_offset(&mut i, len), len).unwrap())
    });
    g.finish();
}

/// QEMU's image locks: what taking them costs an open, and a test alone (the part that
/// repeats if a caller polls whether an image is free).
fn locks(c: &mut Criterion) {
    let fx = Fixture::new("locks");
    let hio = fx.storage();
    let mut g = c.benchmark_group("image_locks");
    for (name, req) in [
        ("writer_lock_unlock", LockRequest::WRITER),
        ("reader_lock_unlock", LockRequest::READER),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                assert!(hio.lock(req).unwrap());
                hio.unlock().unwrap();
            })
        });
    }
    g.bench_function("open_close_no_lock", |b| {
        b.iter(|| FileStorage::open(&fx.path, &FileOptions::new()).unwrap())
    });
    g.bench_function("open_close_writer_lock", |b| {
        b.iter(|| {
            FileStorage::open(
                &fx.path,
                &FileOptions::new().lock(Some(LockRequest::WRITER)),
            )
            .unwrap()
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, minus their undocumented pub fn.
    let mut c = config().configure_from_args();
    rw(&mut c);
    zeroing(&mut c);
    locks(&mut c);
    c.final_summary();
}
