//! The fragmentation workload, shared by its test, its benchmark and its example: a 32 MiB
//! image written cluster by cluster in a shuffled order, then rounds of "discard 1 MiB at a
//! random cluster-aligned offset; rewrite it". Seeded, so every run (ours and qemu-io's)
//! issues the same requests.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qcow2_engine::{CreateOptions, Image, OpenOptions};

/// Virtual size of the workload's image.
pub const VSIZE: u64 = 32 << 20;
/// Cluster size.
pub const CLUSTER: u64 = 64 << 10;
/// Bytes discarded and rewritten per round.
pub const CHUNK: u64 = 1 << 20;
/// Rounds of discard + rewrite.
pub const ROUNDS: usize = 150;

/// One request of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write `len` bytes of `pattern` at `off`.
    Write { off: u64, len: u64, pattern: u8 },
    /// Discard `[off, off+len)`.
    Discard { off: u64, len: u64 },
}

/// The workload's requests for `seed`.
pub fn ops(seed: u64) -> Vec<Op> {
    let mut rng = host_io::SplitMix64::new(seed);
    let n = VSIZE / CLUSTER;
    let mut order: Vec<u64> = (0..n).collect();
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut out: Vec<Op> = order
        .iter()
        .map(|&c| Op::Write {
            off: c * CLUSTER,
            len: CLUSTER,
            pattern: (c % 250) as u8 + 1,
        })
        .collect();
    let slots = (VSIZE - CHUNK) / CLUSTER + 1;
    for r in 0..ROUNDS {
        let off = rng.below(slots) * CLUSTER;
        out.push(Op::Discard { off, len: CHUNK });
        out.push(Op::Write {
            off,
            len: CHUNK,
            pattern: (r % 250) as u8 + 1,
        });
    }
    out
}

/// What the guest should read after `ops`: one pattern byte per cluster.
pub fn model(ops: &[Op]) -> Vec<u8> {
    let mut m = vec![0u8; (VSIZE / CLUSTER) as usize];
    for op in ops {
        match *op {
            Op::Write { off, len, pattern } => {
                for c in off / CLUSTER..(off + len) / CLUSTER {
                    m[c as usize] = pattern;
                }
            }
            Op::Discard { off, len } => {
                for c in off / CLUSTER..(off + len) / CLUSTER {
                    m[c as usize] = 0;
                }
            }
        }
    }
    m
}

/// Run the workload through the engine on a new image at `path`, opened with `options`.
/// Returns the time from open to close (create excluded, as for qemu-io).
pub fn run_engine(path: &Path, options: &str, ops: &[Op]) -> Duration {
    let _ = std::fs::remove_file(path);
    let co = CreateOptions {
        size: Some(VSIZE),
        ..Default::default()
    };
    qcow2_engine::create(path, &co).expect("create");
    let t = Instant::now();
    let img = Image::open(path, &OpenOptions::parse(options).expect("options")).expect("open");
    let mut buf = vec![0u8; CHUNK as usize];
    for op in ops {
        match *op {
            Op::Write { off, len, pattern } => {
                let b = &mut buf[..len as usize];
                b.fill(pattern);
                img.write_at(b, off).expect("write");
            }
            Op::Discard { off, len } => img.discard(off, len).expect("discard"),
        }
    }
    img.close().expect("close");
    t.elapsed()
}

/// The workload as qemu-io commands.
pub fn qemu_io_script(ops: &[Op]) -> String {
    let mut s = String::new();
    for op in ops {
        match *op {
            Op::Write { off, len, pattern } => {
                s += &format!("write -q -P {pattern} {off} {len}\n");
            }
            Op::Discard { off, len } => s += &format!("discard -q {off} {len}\n"),
        }
    }
    s
}

/// Run the workload through qemu-io with QEMU runtime options (e.g. `discard=unmap`) on a
/// new image made by qemu-img. Returns the time qemu-io ran (process start to exit).
pub fn run_qemu_io(path: &Path, qemu_options: &str, ops: &[Op]) -> Duration {
    let _ = std::fs::remove_file(path);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(VSIZE.to_string())
        .status()
        .expect("qemu-img (install qemu-utils)");
    assert!(st.success());
    let mut spec = format!("driver=qcow2,file.filename={}", path.display());
    if !qemu_options.is_empty() {
        spec += ",";
        spec += qemu_options;
    }
    let script = qemu_io_script(ops);
    let t = Instant::now();
    let mut child = Command::new("qemu-io")
        .args(["--image-opts", &spec])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io (install qemu-utils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

/// Host-side footprint of an image file.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    /// File length.
    pub len: u64,
    /// Bytes the filesystem allocated (st_blocks * 512).
    pub allocated: u64,
    /// Number of data extents (SEEK_DATA / SEEK_HOLE runs).
    pub extents: u64,
}

/// Measure the footprint of the file at `path`.
pub fn footprint(path: &Path) -> Footprint {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).unwrap();
    let s = host_io::FileStorage::open(path, &host_io::FileOptions::new().read_only(true)).unwrap();
    let len = md.len();
    let mut extents = 0;
    let mut pos = 0;
    while pos < len {
        let (data, n) = host_io::Storage::data_run(&s, pos, len - pos).unwrap();
        extents += data as u64;
        pos += n.max(1);
    }
    Footprint {
        len,
        allocated: md.blocks() * 512,
        extents,
    }
}

/// Percent of the virtual size.
pub fn pct(bytes: u64) -> f64 {
    bytes as f64 * 100.0 / VSIZE as f64
}
