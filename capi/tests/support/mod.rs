//! Shared helpers for the C ABI tests: temp dirs, C strings, the last error, the
//! qemu-img oracle, and thin wrappers that call the exports the way a C program does.
#![allow(dead_code)]

use std::ffi::{c_char, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use qcowprov::*;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, unique directory.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qcowprov-capi-{tag}-{}-{}",
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

/// A C string from a path.
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

/// A C string.
pub fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// A static or library-owned C string as Rust text.
pub fn text(p: *const c_char) -> String {
    assert!(!p.is_null(), "the library returned NULL");
    // SAFETY: the library returns NUL-terminated strings valid at least until the next
    // failing call on this thread; we copy it at once.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// This thread's last error message.
pub fn last_error() -> String {
    text(qcowprov_last_error())
}

/// `qcowprov_strerror` as Rust text.
pub fn strerror(code: i32) -> String {
    text(qcowprov_strerror(code))
}

/// Create an image; the return code.
pub fn create(path: &Path, options: &str, size: u64) -> i32 {
    let (p, o) = (cpath(path), c(options));
    // SAFETY: both are valid NUL-terminated strings.
    unsafe { qcowprov_create(p.as_ptr(), o.as_ptr(), size) }
}

/// Open an image: the handle, or the error code and message.
pub fn open(path: &Path, options: &str, flags: u32) -> Result<*mut QcowprovImage, (i32, String)> {
    let (p, o) = (cpath(path), c(options));
    let mut img: *mut QcowprovImage = std::ptr::null_mut();
    // SAFETY: valid strings and a valid out pointer.
    let r = unsafe { qcowprov_open(p.as_ptr(), o.as_ptr(), flags, &mut img) };
    if r == 0 {
        assert!(!img.is_null());
        Ok(img)
    } else {
        assert!(r < 0, "errors are negative: {r}");
        assert!(img.is_null(), "out written on failure");
        Err((r, last_error()))
    }
}

/// Close a handle; the return code.
pub fn close(img: *mut QcowprovImage) -> i32 {
    // SAFETY: the tests pass live handles they own, once.
    unsafe { qcowprov_close(img) }
}

/// pread into a fresh buffer.
pub fn pread(img: *mut QcowprovImage, len: usize, off: u64) -> Result<Vec<u8>, i64> {
    let mut buf = vec![0u8; len];
    // SAFETY: live handle; `buf` is writable for `len` bytes.
    let r = unsafe { qcowprov_pread(img, buf.as_mut_ptr().cast(), len, off) };
    if r == len as i64 {
        Ok(buf)
    } else {
        Err(r)
    }
}

/// pwrite; the return value.
pub fn pwrite(img: *mut QcowprovImage, data: &[u8], off: u64, flags: u32) -> i64 {
    // SAFETY: live handle; `data` is readable for its length.
    unsafe { qcowprov_pwrite(img, data.as_ptr().cast(), data.len(), off, flags) }
}

/// get_info; panics on failure.
pub fn info(img: *mut QcowprovImage) -> QcowprovInfo {
    let mut i = QcowprovInfo::default();
    // SAFETY: live handle; `i` is a whole struct with struct_size set.
    let r = unsafe { qcowprov_get_info(img, &mut i) };
    assert_eq!(r, 0, "get_info: {}", last_error());
    i
}

/// A NUL-terminated char array as Rust text.
pub fn field(a: &[c_char]) -> String {
    let bytes: Vec<u8> = a
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Run qemu-img check on a closed image: (exit code, output).
pub fn qemu_img_check(path: &Path) -> (i32, String) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-img ({e}); install qemu-utils (apt-get install -y qemu-utils)")
        });
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Run qemu-img with arguments; its stdout, panicking on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}); install qemu-utils"));
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A deterministic byte pattern for offset `off`.
pub fn pattern(len: usize, off: u64, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (off + i).wrapping_mul(2_654_435_761) >> 7;
            (x as u8) ^ seed
        })
        .collect()
}
