//! Helpers shared by the integration tests: a temp dir, allocation probes, a loop device.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory under the process temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("host-io-{tag}-{}-{n}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Bytes allocated to `path` on disk (`st_blocks * 512`).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

/// A deterministic pattern byte for offset `i` (never zero).
pub fn pat(i: u64, salt: u8) -> u8 {
    ((i.wrapping_mul(31) ^ (i >> 9)) as u8 | 1).wrapping_add(salt) | 1
}

pub fn pattern(offset: u64, len: usize, salt: u8) -> Vec<u8> {
    (0..len as u64).map(|i| pat(offset + i, salt)).collect()
}

/// Whether `mount_point` is mounted with filesystem type `fstype` (from /proc/mounts).
pub fn mounted_as(mount_point: &str, fstype: &str) -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == mount_point && f[2] == fstype
            })
        })
        .unwrap_or(false)
}

/// A loop device over a backing file, detached on drop.
pub struct LoopDevice {
    pub dev: PathBuf,
    pub backing: PathBuf,
}

impl LoopDevice {
    /// Attach a loop device to a new sparse file of `size` bytes in `dir`, or explain why not.
    pub fn create(dir: &TempDir, size: u64) -> Result<LoopDevice, String> {
        let backing = dir.join("loop-backing.img");
        let f = fs::File::create(&backing).map_err(|e| format!("create backing file: {e}"))?;
        f.set_len(size)
            .map_err(|e| format!("size backing file: {e}"))?;
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup unavailable: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        if !dev.exists() {
            return Err(format!("losetup printed {dev:?}, which does not exist"));
        }
        Ok(LoopDevice { dev, backing })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
