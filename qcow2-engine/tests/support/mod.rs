//! Shared helpers for the engine's integration tests: temp dirs, the qemu-img/qemu-io
//! oracle, and a seeded PRNG (this file); persistent bitmaps through QEMU's eyes
//! (`bitmaps`), the crash sweep (`crash`), the fault sweeps' checks (`faults`), guest requests as
//! qemu-io commands and engine calls (`ops`), provisioning-mode
//! host inspection (`prov`), the shared workloads (`frag`, `replay`) and the policy list
//! (`policies`). Tests fail (not skip) when qemu-utils is missing.
//!
//! Test binaries are named `<technique>_<subject>.rs`: `api_` behaviour through the public
//! API, `diff_` the same operations through QEMU's tools as the oracle, `crash_` crash
//! sweeps, `fault_` injected host errors, `fuzz_` fuzzing regressions, `hostile_` damaged
//! images, `stress_` concurrency against a model, `workload_` sized workloads.
#![allow(dead_code)]

pub mod bitmaps;
pub mod crash;
pub mod faults;
pub mod frag;
pub mod ops;
pub mod policies;
pub mod prov;
pub mod replay;

#[allow(unused_imports)] // not every test binary runs every policy
pub use policies::POLICIES;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, unique directory.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qcowprov-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}); install qemu-utils (apt-get install -y qemu-utils)")
    })
}

/// Run qemu-img; panics with its stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let o = run("qemu-img", args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run qemu-img, returning (exit code, stdout, stderr) without judging.
pub fn qemu_img_status(args: &[&str]) -> (i32, String, String) {
    let o = run("qemu-img", args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// What a check concluded, in qemu-img check's terms: exit status class (0 clean,
/// 1 could not check, 2 corruptions, 3 leaks only; 124 when qemu-img was killed by the
/// timeout), the counts, and the image end offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckVerdict {
    pub rc: i32,
    pub corruptions: u64,
    pub leaks: u64,
    pub end: u64,
}

/// `qemu-img check -U --output=json`, killed after `timeout_secs` (qemu-img follows a
/// backing-file loop without end).
pub fn qemu_check_verdict(image: &Path, timeout_secs: u32) -> CheckVerdict {
    let t = timeout_secs.to_string();
    let out = Command::new("timeout")
        .args(["-s", "KILL", &t, "qemu-img", "check", "-U", "--output=json"])
        .arg(image)
        .output()
        .expect("run qemu-img check under timeout");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    CheckVerdict {
        // Killed by `timeout` (a signal, or 137 from timeout itself): "could not check".
        rc: match out.status.code() {
            None | Some(124 | 137) => 124,
            Some(c) => c,
        },
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        end: n("image-end-offset"),
    }
}

/// The engine's check on a read-only open: the verdict and its first message, or the
/// open's or check's error as rc 1 with the error text.
pub fn engine_check_verdict(image: &Path) -> (CheckVerdict, String) {
    let opts = qcow2_engine::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let report = qcow2_engine::Image::open(image, &opts)
        .and_then(|img| img.check(qcow2_engine::Repair::None));
    match report {
        Err(e) => {
            let v = CheckVerdict {
                rc: 1,
                corruptions: 0,
                leaks: 0,
                end: 0,
            };
            (v, e.to_string())
        }
        Ok(r) => (
            CheckVerdict {
                // As qemu-img: internal errors fail the check, whatever else it found.
                rc: if r.check_errors > 0 { 1 } else { r.exit_code() },
                corruptions: r.corruptions,
                leaks: r.leaks,
                end: r.image_end_offset,
            },
            r.messages.first().cloned().unwrap_or_default(),
        ),
    }
}

/// Run qemu-io with the given commands (fed on stdin, one per line) and extra args.
pub fn qemu_io(extra: &[&str], image: &Path, cmds: &[String]) {
    use std::io::Write;
    let mut args: Vec<&str> = extra.to_vec();
    let img = image.to_str().expect("utf-8 path");
    args.push(img);
    let mut child = Command::new("qemu-io")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-io ({e}); install qemu-utils"));
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for c in cmds {
            writeln!(stdin, "{c}").expect("write qemu-io command");
        }
    }
    let o = child.wait_with_output().expect("qemu-io");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && !out.contains("failed")
            && !err.contains("failed")
            && !out.contains("error"),
        "qemu-io {args:?} failed: {out}{err}"
    );
}

/// `qemu-img check` must find no corruptions and no leaks; returns the JSON text.
pub fn assert_check_clean(image: &Path) -> String {
    let p = image.to_str().expect("utf-8 path");
    let (code, out, err) = qemu_img_status(&["check", "--output=json", p]);
    assert!(
        code == 0,
        "qemu-img check {p} exit {code}: {out}{err}\nhuman: {}",
        qemu_img_status(&["check", p]).1
    );
    assert!(
        !out.contains("\"corruptions\"") && !out.contains("\"leaks\""),
        "{out}"
    );
    out
}

/// `qemu-img check` must find no corruptions (leaks allowed); returns the exit code.
pub fn assert_no_corruption(image: &Path) -> i32 {
    let p = image.to_str().expect("utf-8 path");
    let (code, out, err) = qemu_img_status(&["check", p]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check {p} exit {code}: {out}{err}"
    );
    code
}

/// `qemu-img compare` says the two images read identically.
pub fn assert_identical(a: &Path, b: &Path) {
    let (code, out, err) = qemu_img_status(&[
        "compare",
        a.to_str().expect("utf-8"),
        b.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "images differ: {out}{err}");
}

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- Added for qemu_images.rs and hostile_images.rs (additions only) ----

/// Fail (not skip) with a clear message unless both qemu-img and qemu-io can be run.
pub fn require_qemu_tools() {
    for tool in ["qemu-img", "qemu-io"] {
        match Command::new(tool).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "{tool} --version failed ({}): these tests need a working {tool} (QEMU >= 8)",
                o.status
            ),
            Err(e) => panic!(
                "{tool} is required by these tests but cannot be run ({e}); \
                 install qemu-utils (apt-get install -y qemu-utils)"
            ),
        }
    }
}

/// `qemu-img info --output=json <image>`, parsed.
pub fn qemu_img_info_json(image: &Path) -> serde_json::Value {
    let p = image.to_str().expect("utf-8 path");
    let out = qemu_img(&["info", "--output=json", p]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info JSON for {p}: {e}\n{out}"))
}

/// Host offset of the persistent bitmap directory, found by walking the header
/// extensions from `header_length` (the image must have the bitmaps extension).
pub fn bitmap_directory_offset(p: &Path) -> u64 {
    let mut at = u64::from(file_be32(p, 100));
    loop {
        let (magic, len) = (file_be32(p, at), u64::from(file_be32(p, at + 4)));
        assert_ne!(magic, 0, "no bitmaps extension in {}", p.display());
        if magic == 0x2385_2875 {
            return file_be64(p, at + 8 + 16);
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// Big-endian u16 at `off` of a file.
pub fn file_be16(path: &Path, off: u64) -> u16 {
    let mut b = [0u8; 2];
    read_file_at(path, &mut b, off);
    u16::from_be_bytes(b)
}

/// Big-endian u32 at `off` in the file.
pub fn file_be32(path: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    read_file_at(path, &mut b, off);
    u32::from_be_bytes(b)
}

/// Big-endian u64 at `off` in the file.
pub fn file_be64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    read_file_at(path, &mut b, off);
    u64::from_be_bytes(b)
}

/// Exactly `buf.len()` bytes at `off` (panics on a short file).
pub fn read_file_at(path: &Path, buf: &mut [u8], off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.read_exact_at(buf, off).unwrap_or_else(|e| {
        panic!(
            "read {} bytes at {off:#x} of {}: {e}",
            buf.len(),
            path.display()
        )
    });
}

/// Overwrite bytes at `off` in the file (no truncation).
pub fn patch_file(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for patching: {e}", path.display()));
    f.write_all_at(bytes, off)
        .unwrap_or_else(|e| panic!("patch {} at {off:#x}: {e}", path.display()));
}

/// Write a big-endian u32 at `off`.
pub fn patch_be32(path: &Path, off: u64, v: u32) {
    patch_file(path, off, &v.to_be_bytes());
}

/// Write a big-endian u64 at `off`.
pub fn patch_be64(path: &Path, off: u64, v: u64) {
    patch_file(path, off, &v.to_be_bytes());
}

/// The text of a panic payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Run `f` on its own thread: a panic becomes `Err("... panicked: ...")` and running past
/// `secs` becomes `Err("... hung ...")`, both naming `case`. (A hung thread is left behind;
/// the test fails anyway.)
pub fn guarded<T: Send + 'static>(
    case: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r.map_err(|p| panic_text(&*p)));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(msg)) => Err(format!("case {case}: the library panicked: {msg}")),
        Err(_) => Err(format!("case {case}: hung (no result within {secs} s)")),
    }
}
