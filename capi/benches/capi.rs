//! Criterion benchmarks of the C ABI: what the boundary (argument checks, panic guard,
//! errno mapping, thread-local error) adds to the engine's cost per request.
//!
//! - `pread_4k`: `qcowprov_pread` of 4 KiB from an allocated cluster (page cache warm),
//!   beside `Image::read_at` on the same file through the engine's Rust API;
//! - `pwrite_4k_overwrite`: `qcowprov_pwrite` over allocated clusters;
//! - `block_status`: `qcowprov_block_status_depth` on an allocated range;
//! - `open_close` and `open_close_locking_off`: `qcowprov_open` + `qcowprov_close` of the
//!   image read-only, with QEMU's image locks (taken at open, released at close) and
//!   without them, so the difference is what locking costs an open.
//!
//! Run with `cargo bench -p qcowprov --bench capi`. The image is a 64 MiB temp file,
//! fully allocated before timing, removed afterwards.

// `criterion_group!` and `criterion_main!` generate undocumented public items.
#![allow(missing_docs)]

use std::ffi::CString;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcow2_engine::{Image, OpenOptions};
use qcowprov::*;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 64 * MIB;

/// A fully allocated image in a temp file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new() -> Self {
        let p =
            std::env::temp_dir().join(format!("qcowprov-capi-bench-{}.qcow2", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = CString::new(p.to_str().expect("utf-8 temp dir")).expect("no NUL");
        // SAFETY: `c` is a NUL-terminated string; NULL options are allowed.
        let rc = unsafe { qcowprov_create(c.as_ptr(), std::ptr::null(), SIZE) };
        assert_eq!(rc, 0, "create");
        let img = Image::open(&p, &OpenOptions::default()).expect("open");
        let chunk = vec![0x5au8; MIB as usize];
        for off in (0..SIZE).step_by(MIB as usize) {
            img.write_at(&chunk, off).expect("fill");
        }
        img.close().expect("close");
        TempImage(p)
    }

    fn open(&self) -> *mut QcowprovImage {
        let c = CString::new(self.0.to_str().expect("utf-8")).expect("no NUL");
        let mut h: *mut QcowprovImage = std::ptr::null_mut();
        // SAFETY: `c` is a C string, NULL options are allowed, `h` is a valid out-pointer.
        let rc = unsafe { qcowprov_open(c.as_ptr(), std::ptr::null(), 0, &mut h) };
        assert_eq!(rc, 0, "open");
        h
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Offsets of 4 KiB requests walking the image sequentially.
fn next(off: &mut u64) -> u64 {
    let o = *off;
    *off = (*off + 4096) % SIZE;
    o
}

fn bench(c: &mut Criterion) {
    let t = TempImage::new();
    let h = t.open();
    let mut buf = vec![0u8; 4096];
    let mut g = c.benchmark_group("capi");
    g.throughput(Throughput::Bytes(4096));
    let mut off = 0;
    g.bench_function("pread_4k", |b| {
        b.iter(|| {
            // SAFETY: `h` is live; `buf` is valid for 4096 bytes and ours alone.
            let rc = unsafe { qcowprov_pread(h, buf.as_mut_ptr().cast(), 4096, next(&mut off)) };
            assert_eq!(rc, 4096);
        })
    });
    // A second read/write open in this process would be refused by the image locks
    // (`h` holds them): this one does not lock.
    let img =
        Image::open(&t.0, &OpenOptions::parse("locking=off").expect("options")).expect("open");
    g.bench_function("engine_read_at_4k", |b| {
        b.iter(|| {
            img.read_at(black_box(&mut buf), next(&mut off))
                .expect("read")
        })
    });
    drop(img);
    g.bench_function("pwrite_4k_overwrite", |b| {
        b.iter(|| {
            // SAFETY: `h` is live; `buf` is valid for 4096 bytes.
            let rc = unsafe { qcowprov_pwrite(h, buf.as_ptr().cast(), 4096, next(&mut off), 0) };
            assert_eq!(rc, 4096);
        })
    });
    g.bench_function("block_status", |b| {
        let mut st = QcowprovStatus {
            struct_size: std::mem::size_of::<QcowprovStatus>() as u32,
            flags: 0,
            len: 0,
            host_offset: 0,
            depth: 0,
            _reserved: 0,
        };
        b.iter(|| {
            // SAFETY: `h` is live; `st` is a valid, sized status struct.
            let rc = unsafe { qcowprov_block_status_depth(h, next(&mut off), 65536, &mut st) };
            assert_eq!(rc, 0);
        })
    });
    g.finish();
    // SAFETY: `h` is live and not used afterwards.
    assert_eq!(unsafe { qcowprov_close(h) }, 0);

    let mut g = c.benchmark_group("capi_open");
    let p = CString::new(t.0.to_str().expect("utf-8")).expect("no NUL");
    for (name, opts) in [
        ("open_close", c""),
        ("open_close_locking_off", c"locking=off"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut h: *mut QcowprovImage = std::ptr::null_mut();
                // SAFETY: C strings and a valid out-pointer; the handle is closed at once.
                let rc = unsafe {
                    qcowprov_open(p.as_ptr(), opts.as_ptr(), QCOWPROV_OPEN_RDONLY, &mut h)
                };
                assert_eq!(rc, 0);
                // SAFETY: `h` is the handle just opened.
                assert_eq!(unsafe { qcowprov_close(h) }, 0);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
