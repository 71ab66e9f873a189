//! The mixed replay, shared by its test, benchmark and example: 20,000 seeded requests on
//! a 64 MiB image with 64 KiB clusters, 70% 4 KiB writes at 4 KiB-aligned offsets and 30%
//! 64 KiB discards at cluster-aligned offsets, then a close. It frees and reallocates
//! clusters constantly, which is what the quarantine is for.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use qcow2_engine::{CreateOptions, Image, OpenOptions};

/// Virtual size.
pub const VSIZE: u64 = 64 << 20;
/// Requests.
pub const REQUESTS: usize = 20_000;

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write 4 KiB of `pattern` at `off`.
    Write { off: u64, pattern: u8 },
    /// Discard the 64 KiB cluster at `off`.
    Discard { off: u64 },
}

/// The requests for `seed`.
pub fn ops(seed: u64) -> Vec<Op> {
    let mut rng = host_io::SplitMix64::new(seed);
    (0..REQUESTS)
        .map(|i| {
            if rng.below(10) < 7 {
                Op::Write {
                    off: rng.below(VSIZE / 4096) * 4096,
                    pattern: (i % 250) as u8 + 1,
                }
            } else {
                Op::Discard {
                    off: rng.below(VSIZE / 65536) * 65536,
                }
            }
        })
        .collect()
}

/// What a run measured.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Open to close (create excluded).
    pub time: Duration,
    /// Host flushes (fdatasync) the image issued, close included.
    pub flushes: u64,
    /// Quarantine releases.
    pub releases: u64,
    /// File length after close.
    pub len: u64,
}

/// Run the replay through the engine on a new image at `path` opened with `options`.
pub fn run_engine(path: &Path, options: &str, ops: &[Op]) -> Run {
    let _ = std::fs::remove_file(path);
    let co = CreateOptions {
        size: Some(VSIZE),
        ..Default::default()
    };
    qcow2_engine::create(path, &co).expect("create");
    let t = Instant::now();
    let img = Image::open(path, &OpenOptions::parse(options).expect("options")).expect("open");
    let mut buf = [0u8; 4096];
    for op in ops {
        match *op {
            Op::Write { off, pattern } => {
                buf.fill(pattern);
                img.write_at(&buf, off).expect("write");
            }
            Op::Discard { off } => img.discard(off, 65536).expect("discard"),
        }
    }
    img.flush().expect("flush");
    let st = img.stats().expect("stats");
    let storage = img.storage().clone();
    img.close().expect("close");
    Run {
        time: t.elapsed(),
        flushes: storage.flush_count(),
        releases: st.quarantine_releases,
        len: std::fs::metadata(path).unwrap().len(),
    }
}

/// What the guest reads afterwards: per 4 KiB block, the pattern (0: zero).
pub fn model(ops: &[Op]) -> Vec<u8> {
    let mut m = vec![0u8; (VSIZE / 4096) as usize];
    for op in ops {
        match *op {
            Op::Write { off, pattern } => m[(off / 4096) as usize] = pattern,
            Op::Discard { off } => {
                for b in off / 4096..(off + 65536) / 4096 {
                    m[b as usize] = 0;
                }
            }
        }
    }
    m
}

/// Percent of the virtual size.
pub fn pct(bytes: u64) -> f64 {
    bytes as f64 * 100.0 / VSIZE as f64
}
