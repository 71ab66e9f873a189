//! Four threads on one image handle, in every provisioning mode and with QEMU's
//! `discard=unmap` (with and without `discard-no-unref=on`), on a real file.
//!
//! The guest space is cut into 64 KiB chunks dealt round-robin to the threads, so each
//! thread owns a disjoint set of chunks (its model is exact) while the L2 tables and
//! refcount blocks covering neighbouring chunks are shared and contended. Each thread runs
//! a seeded mix of reads, unaligned writes, discards (aligned and not), write-zeroes (with
//! and without may-unmap) and occasional flushes inside its own chunks, and checks every
//! range it changes right away plus random reads of its own chunks against its model.
//!
//! Geometries: 64 KiB clusters (a chunk is one cluster; one L2 table serves all threads),
//! 4 KiB clusters (a chunk is sixteen clusters, four L2 tables) with metadata caches too
//! small to hold them, and 16 KiB clusters with subclusters. At the end the handle is flushed and closed; `qemu-img check` must find
//! the image clean (no corruption, no leak), and the whole disk, read through the engine
//! after reopening and through `qemu-img convert` to raw, must equal the threads' models.

mod support;

use std::path::Path;

use qcow2_engine::{create, CreateOptions, Image, Mode, OpenOptions, Provision};
use support::*;

const THREADS: u64 = 4;
const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 8 << 20;
const OPS: u64 = 800;

/// One thread's work on its chunks (`chunk % THREADS == t`); returns its model of the
/// whole disk (only its own chunks are meaningful).
fn worker(img: &Image, t: u64, seed: u64, discard_zeroes: bool) -> Result<Vec<u8>, String> {
    let cs = img.cluster_size();
    let mut rng = Rng(seed * 97 + t);
    let mut model = vec![0u8; SIZE as usize];
    let own: Vec<u64> = (0..SIZE / CHUNK).filter(|c| c % THREADS == t).collect();
    let check = |model: &[u8], off: u64, len: u64, what: &str| -> Result<(), String> {
        let mut b = vec![0u8; len as usize];
        img.read_at(&mut b, off)
            .map_err(|e| format!("thread {t}: read {off:#x}+{len:#x}: {e}"))?;
        match (0..b.len()).find(|&i| b[i] != model[off as usize + i]) {
            None => Ok(()),
            Some(i) => Err(format!(
                "thread {t}: after {what}: byte {:#x} reads {:#x}, model {:#x}",
                off + i as u64,
                b[i],
                model[off as usize + i]
            )),
        }
    };
    for op in 0..OPS {
        let base = own[rng.below(own.len() as u64) as usize] * CHUNK;
        let len = 1 + rng.below(CHUNK);
        let off = base + rng.below(CHUNK - len + 1);
        let e = |what: &str, r: qcow2_engine::Result<()>| {
            r.map_err(|e| format!("thread {t} op {op}: {what} {off:#x}+{len:#x}: {e}"))
        };
        let what = match rng.below(20) {
            0..=7 => {
                let p = (t as u8) << 6 | (op % 61) as u8;
                let d: Vec<u8> = (off..off + len)
                    .map(|x| p ^ ((x >> 9) as u8).wrapping_mul(7))
                    .collect();
                e("write", img.write_at(&d, off))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                "write"
            }
            8..=10 => {
                let (a, b) = if rng.below(2) == 0 {
                    (off.div_ceil(cs) * cs, (off + len) / cs * cs)
                } else {
                    (base, base + CHUNK)
                };
                let (o, l) = if rng.below(2) == 0 {
                    (off, len)
                } else {
                    (a, b.saturating_sub(a))
                };
                e("discard", img.discard(o, l))?;
                let (za, zb) = (o.div_ceil(cs) * cs, (o + l) / cs * cs);
                if discard_zeroes && za < zb {
                    model[za as usize..zb as usize].fill(0);
                }
                "discard"
            }
            11..=13 => {
                let unmap = rng.below(2) == 0;
                e("write_zeroes", img.write_zeroes(off, len, unmap))?;
                model[off as usize..(off + len) as usize].fill(0);
                "write_zeroes"
            }
            14 => {
                e("flush", img.flush())?;
                "flush"
            }
            _ => "read",
        };
        check(&model, off, len, what)?;
        if op % 50 == 49 {
            for &c in &own {
                check(&model, c * CHUNK, CHUNK, "a sweep over its chunks")?;
            }
        }
    }
    Ok(model)
}

fn stress(dir: &Path, create_opts: &str, opts: &str, seed: u64) {
    let p = dir.join(format!("s{seed}.qcow2"));
    let mut o = CreateOptions::parse(create_opts).unwrap();
    o.size = Some(SIZE);
    create(&p, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::parse(opts).unwrap()).unwrap();
    let dz = !matches!(
        img.info().mode,
        Mode::Provision(Provision::Off) | Mode::Qemu { unmap: false, .. }
    );
    let models: Vec<Result<Vec<u8>, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let img = &img;
                s.spawn(move || worker(img, t, seed, dz))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let case = format!("{create_opts} {opts}");
    let mut want = vec![0u8; SIZE as usize];
    for (t, m) in models.into_iter().enumerate() {
        let m = m.unwrap_or_else(|e| panic!("{case}: {e}"));
        for c in (0..SIZE / CHUNK).filter(|c| c % THREADS == t as u64) {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            want[r.clone()].copy_from_slice(&m[r]);
        }
    }
    img.flush().unwrap();
    img.close().unwrap();
    let out = assert_check_clean(&p);
    assert!(!out.is_empty(), "{case}");
    let img = Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut all = vec![0u8; SIZE as usize];
    img.read_at(&mut all, 0).unwrap();
    assert_same(&case, "the engine after reopening", &all, &want);
    let raw = dir.join(format!("s{seed}.raw"));
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let theirs = std::fs::read(&raw).unwrap();
    assert_same(&case, "qemu-img convert", &theirs, &want);
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&p);
}

fn assert_same(case: &str, who: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{case}: {who}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{case}: {who}: byte {i:#x} (chunk {}, thread {}) reads {:#x}, model {:#x}",
            i as u64 / CHUNK,
            i as u64 / CHUNK % THREADS,
            got[i],
            want[i]
        );
    }
}

#[test]
fn four_threads_64k_clusters_every_mode() {
    let dir = TempDir::new("stress64k");
    for (i, opts) in POLICIES.iter().enumerate() {
        stress(&dir.0, "cluster_size=64k", opts, 10 + i as u64);
    }
}

/// With metadata caches of two L2 tables and four refcount blocks, so tables are evicted
/// and written back in the middle of other threads' requests.
#[test]
fn four_threads_4k_clusters_small_caches_every_mode() {
    let dir = TempDir::new("stress4k");
    for (i, opts) in POLICIES.iter().enumerate() {
        let opts = format!("{opts},l2-cache-size=8k,refcount-cache-size=16k");
        stress(&dir.0, "cluster_size=4k", &opts, 20 + i as u64);
    }
}

#[test]
fn four_threads_subclusters_every_mode() {
    let dir = TempDir::new("stress16k");
    for (i, opts) in POLICIES.iter().enumerate() {
        stress(
            &dir.0,
            "cluster_size=16k,extended_l2=on",
            opts,
            30 + i as u64,
        );
    }
}
