//! Bad input through the C ABI: NULL for every pointer argument, bad options, bad files,
//! bad flags and struct sizes. Every failure must be a negative errno with a message, and
//! out-parameters must stay untouched.

mod support;

use std::ffi::c_char;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::ptr::{null, null_mut};

use qcowprov::*;
use support::*;

const MIB: u64 = 1 << 20;
const EINVAL: i32 = -libc::EINVAL;
const EINVAL64: i64 = -(libc::EINVAL as i64);

/// A fresh 4 MiB image with data in its first MiB, opened read-write.
fn fixture(dir: &TempDir) -> (std::path::PathBuf, *mut QcowprovImage) {
    let path = dir.path("a.qcow2");
    assert_eq!(create(&path, "", 4 * MIB), 0, "{}", last_error());
    let img = open(&path, "", 0).expect("open");
    assert_eq!(pwrite(img, &pattern(MIB as usize, 0, 3), 0, 0), MIB as i64);
    (path, img)
}

/// The last error names `what`.
#[track_caller]
fn says(what: &str) {
    let e = last_error();
    assert!(e.contains(what), "last error {e:?} should mention {what:?}");
}

#[test]
fn null_pointers_give_einval_with_a_message() {
    let dir = TempDir::new("nulls");
    let (path, img) = fixture(&dir);
    let p = cpath(&path);
    let mut buf = [0u8; 16];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let (mut pnum, mut flags, mut host) = (0u64, 0u32, 0u64);
    let mut st = QcowprovStatus::default();
    let mut info = QcowprovInfo::default();
    let mut res = QcowprovCheckResult::default();
    let opts = c("provision=thin");
    let nimg: *mut QcowprovImage = null_mut();

    // SAFETY: (all calls below) every non-NULL pointer is valid; NULL is what is tested,
    // and the library promises -EINVAL for it.
    unsafe {
        assert_eq!(qcowprov_create(null(), null(), MIB), EINVAL);
        says("'path' is NULL");

        let mut out: *mut QcowprovImage = 0xdead0 as *mut _;
        assert_eq!(qcowprov_open(null(), null(), 0, &mut out), EINVAL);
        says("'path' is NULL");
        assert_eq!(out, 0xdead0 as *mut _, "out untouched on failure");
        assert_eq!(qcowprov_open(p.as_ptr(), null(), 0, null_mut()), EINVAL);
        says("'out' is NULL");

        assert_eq!(qcowprov_close(nimg), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_flush(nimg), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_resize(nimg, 8 * MIB), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_discard(nimg, 0, MIB), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_write_zeroes(nimg, 0, MIB, 0), EINVAL);
        says("'img' is NULL");

        assert_eq!(
            qcowprov_pread(nimg, buf.as_mut_ptr().cast(), 16, 0),
            EINVAL64
        );
        says("'img' is NULL");
        assert_eq!(qcowprov_pread(img, null_mut(), 16, 0), EINVAL64);
        says("'buf' is NULL");
        assert_eq!(qcowprov_pread(img, null_mut(), 0, 0), EINVAL64);
        says("'buf' is NULL");
        assert_eq!(
            qcowprov_pwrite(nimg, buf.as_ptr().cast(), 16, 0, 0),
            EINVAL64
        );
        says("'img' is NULL");
        assert_eq!(qcowprov_pwrite(img, null(), 16, 0, 0), EINVAL64);
        says("'buf' is NULL");

        assert_eq!(qcowprov_preadv(nimg, iov.as_ptr(), 1, 0), EINVAL64);
        says("'img' is NULL");
        assert_eq!(qcowprov_preadv(img, null(), 1, 0), EINVAL64);
        says("'iov' is NULL");
        assert_eq!(qcowprov_pwritev(nimg, iov.as_ptr(), 1, 0, 0), EINVAL64);
        says("'img' is NULL");
        assert_eq!(qcowprov_pwritev(img, null(), 1, 0, 0), EINVAL64);
        says("'iov' is NULL");
        let bad = [libc::iovec {
            iov_base: null_mut(),
            iov_len: 8,
        }];
        assert_eq!(qcowprov_preadv(img, bad.as_ptr(), 1, 0), EINVAL64);
        says("iov[0].iov_base is NULL");
        assert_eq!(qcowprov_pwritev(img, bad.as_ptr(), 1, 0, 0), EINVAL64);
        says("iov[0].iov_base is NULL");

        let r = qcowprov_block_status(nimg, 0, MIB, &mut pnum, &mut flags, &mut host);
        assert_eq!(r, EINVAL);
        says("'img' is NULL");
        pnum = 7;
        flags = 7;
        host = 7;
        let r = qcowprov_block_status(img, 0, MIB, null_mut(), &mut flags, &mut host);
        assert_eq!(r, EINVAL);
        says("'pnum' is NULL");
        let r = qcowprov_block_status(img, 0, MIB, &mut pnum, null_mut(), &mut host);
        assert_eq!(r, EINVAL);
        says("'flags' is NULL");
        let r = qcowprov_block_status(img, 0, MIB, &mut pnum, &mut flags, null_mut());
        assert_eq!(r, EINVAL);
        says("'host_offset' is NULL");
        assert_eq!((pnum, flags, host), (7, 7, 7), "other out-params untouched");

        assert_eq!(qcowprov_block_status_depth(nimg, 0, MIB, &mut st), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_block_status_depth(img, 0, MIB, null_mut()), EINVAL);
        says("'st' is NULL");

        assert_eq!(qcowprov_get_info(nimg, &mut info), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_get_info(img, null_mut()), EINVAL);
        says("'info' is NULL");

        assert_eq!(qcowprov_set_options(nimg, opts.as_ptr()), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_set_options(img, null()), EINVAL);
        says("'options' is NULL");

        assert_eq!(qcowprov_check(nimg, 0, &mut res, None, null_mut()), EINVAL);
        says("'img' is NULL");
        assert_eq!(qcowprov_check(img, 0, null_mut(), None, null_mut()), EINVAL);
        says("'result' is NULL");
        // NULL progress and user_data are allowed.
        assert_eq!(qcowprov_check(img, 0, &mut res, None, null_mut()), 0);
    }
    assert_eq!(close(img), 0);
}

#[test]
fn unknown_option_keys_are_named() {
    let dir = TempDir::new("unknown");
    let (path, img) = fixture(&dir);
    let (code, msg) = open(&path, "provision=thin,bogus-key=1", 0).unwrap_err();
    assert_eq!(code, EINVAL);
    assert!(msg.contains("bogus-key"), "{msg}");
    assert_eq!(create(&dir.path("b.qcow2"), "nonsense_opt=3", MIB), EINVAL);
    says("nonsense_opt");
    assert!(
        !dir.path("b.qcow2").exists(),
        "nothing created on an option error"
    );
    // Runtime options: refused, and nothing changes.
    let before = field(&info(img).policy);
    let o = c("frobnicate=on");
    // SAFETY: live handle, valid string.
    assert_eq!(unsafe { qcowprov_set_options(img, o.as_ptr()) }, EINVAL);
    says("frobnicate");
    assert_eq!(field(&info(img).policy), before);
    // Open-only keys are not runtime options.
    let o = c("read-only=on");
    // SAFETY: live handle, valid string.
    assert_eq!(unsafe { qcowprov_set_options(img, o.as_ptr()) }, EINVAL);
    says("read-only");
    // Bad values and malformed strings.
    assert_eq!(open(&path, "provision=sparse", 0).unwrap_err().0, EINVAL);
    says("sparse");
    assert_eq!(open(&path, "noequals", 0).unwrap_err().0, EINVAL);
    says("noequals");
    // Options must be UTF-8.
    let p = cpath(&path);
    let bad = [0xffu8 as c_char, b'=' as c_char, b'1' as c_char, 0];
    let mut out = null_mut();
    // SAFETY: valid strings and out pointer.
    let r = unsafe { qcowprov_open(p.as_ptr(), bad.as_ptr(), 0, &mut out) };
    assert_eq!(r, EINVAL);
    says("UTF-8");
    assert!(out.is_null());
    assert_eq!(close(img), 0);
}

#[test]
fn provision_conflicts_with_qemu_discard_options() {
    let dir = TempDir::new("conflict");
    let (path, img) = fixture(&dir);
    let (code, msg) = open(&path, "provision=thin,discard=unmap", 0).unwrap_err();
    assert_eq!(code, EINVAL);
    assert!(
        msg.contains("provision=thin") && msg.contains("discard"),
        "{msg}"
    );
    let before = field(&info(img).policy);
    let o = c("provision=thin,discard=unmap");
    // SAFETY: live handle, valid string.
    assert_eq!(unsafe { qcowprov_set_options(img, o.as_ptr()) }, EINVAL);
    says("provision=thin");
    assert_eq!(field(&info(img).policy), before, "nothing changes on error");
    assert_eq!(close(img), 0);
}

#[test]
fn bad_files() {
    let dir = TempDir::new("files");
    // Missing file, empty path.
    assert_eq!(
        open(&dir.path("missing.qcow2"), "", 0).unwrap_err().0,
        -libc::ENOENT
    );
    says("missing.qcow2");
    let empty = c("");
    let mut out = null_mut();
    // SAFETY: valid strings and out pointer.
    let r = unsafe { qcowprov_open(empty.as_ptr(), null(), 0, &mut out) };
    assert_eq!(r, -libc::ENOENT);
    // A directory.
    let (code, msg) = open(&dir.0, "", 0).unwrap_err();
    assert_eq!(code, -libc::EISDIR, "{msg}");
    assert!(!msg.is_empty());
    assert_eq!(create(&dir.0, "", MIB), -libc::EEXIST);
    // An existing file is not overwritten.
    let (path, img) = fixture(&dir);
    assert_eq!(close(img), 0);
    assert_eq!(create(&path, "", MIB), -libc::EEXIST);
    says("a.qcow2");
    // Not qcow2 at all.
    let junk = dir.path("junk.img");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    let (code, msg) = open(&junk, "", 0).unwrap_err();
    assert_eq!(code, EINVAL, "{msg}");
    // Truncated: an empty file and a cut header.
    for keep in [0u64, 40, 100] {
        let t = dir.path(&format!("trunc{keep}.qcow2"));
        std::fs::copy(&path, &t).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&t)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let (code, msg) = open(&t, "", 0).unwrap_err();
        assert!(code < 0 && !msg.is_empty(), "{keep}: {code} {msg}");
    }
}

#[test]
fn read_only_files() {
    let dir = TempDir::new("rofile");
    let (path, img) = fixture(&dir);
    assert_eq!(close(img), 0);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        eprintln!("running as root: file permissions are not enforced; testing RDONLY opens only");
    } else {
        let (code, msg) = open(&path, "", 0).unwrap_err();
        assert_eq!(code, -libc::EACCES, "{msg}");
    }
    let img = open(&path, "", QCOWPROV_OPEN_RDONLY).expect("read-only open");
    assert_eq!(
        pread(img, MIB as usize, 0).unwrap(),
        pattern(MIB as usize, 0, 3)
    );
    let erofs = -libc::EROFS;
    assert_eq!(pwrite(img, &[1, 2, 3], 0, 0), i64::from(erofs));
    says("read-only");
    // SAFETY: live handle.
    unsafe {
        assert_eq!(qcowprov_discard(img, 0, MIB), erofs);
        assert_eq!(qcowprov_write_zeroes(img, 0, MIB, 0), erofs);
        assert_eq!(qcowprov_resize(img, 8 * MIB), erofs);
        assert_eq!(qcowprov_flush(img), 0);
    }
    assert_eq!(close(img), 0);
    // "read-only=on" in the options works as the flag does.
    let img = open(&path, "read-only=on", 0).expect("read-only open by option");
    assert_eq!(pwrite(img, &[1], 0, 0), i64::from(erofs));
    assert_eq!(close(img), 0);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(qemu_img_check(&path).0, 0);
}

#[test]
fn out_params_untouched_on_failure() {
    let dir = TempDir::new("sentinel");
    let (_path, img) = fixture(&dir);
    let size = 4 * MIB;
    // SAFETY: (all calls) live handle and valid pointers to whole structs.
    unsafe {
        let (mut pnum, mut flags, mut host) = (u64::MAX, u32::MAX, u64::MAX);
        for (off, len) in [(size, 1), (0, 0), (u64::MAX, 1)] {
            let r = qcowprov_block_status(img, off, len, &mut pnum, &mut flags, &mut host);
            assert_eq!(r, EINVAL, "{off:#x}+{len}");
            assert_eq!((pnum, flags, host), (u64::MAX, u32::MAX, u64::MAX));
        }
        let sentinel = QcowprovStatus {
            struct_size: std::mem::size_of::<QcowprovStatus>() as u32,
            flags: 0xaaaa,
            len: 0xbbbb,
            host_offset: 0xcccc,
            depth: 0xdddd,
            _reserved: 0xeeee,
        };
        let mut st = sentinel;
        assert_eq!(qcowprov_block_status_depth(img, size, 1, &mut st), EINVAL);
        assert_eq!(st, sentinel);
        let mut st = QcowprovStatus {
            struct_size: 31,
            ..sentinel
        };
        assert_eq!(qcowprov_block_status_depth(img, 0, 1, &mut st), EINVAL);
        says("struct_size is 31");
        assert_eq!(st.len, 0xbbbb);

        let mut i = QcowprovInfo {
            struct_size: 1271,
            version: 99,
            virtual_size: 99,
            ..Default::default()
        };
        assert_eq!(qcowprov_get_info(img, &mut i), EINVAL);
        says("info->struct_size");
        assert_eq!((i.struct_size, i.version, i.virtual_size), (1271, 99, 99));
        let mut i = QcowprovInfo {
            struct_size: 0,
            ..Default::default()
        };
        assert_eq!(qcowprov_get_info(img, &mut i), EINVAL);

        let mut res = QcowprovCheckResult {
            struct_size: 8,
            exit_code: 42,
            leaks: 42,
            ..Default::default()
        };
        assert_eq!(qcowprov_check(img, 0, &mut res, None, null_mut()), EINVAL);
        says("result->struct_size");
        assert_eq!((res.exit_code, res.leaks), (42, 42));
        let mut res = QcowprovCheckResult {
            exit_code: 42,
            ..Default::default()
        };
        assert_eq!(qcowprov_check(img, 4, &mut res, None, null_mut()), EINVAL);
        says("fix_flags");
        assert_eq!(res.exit_code, 42);
    }
    assert_eq!(close(img), 0);
}

/// A caller compiled against a newer, larger version of the structs: accepted, and the
/// bytes past this version are left alone.
#[test]
fn larger_struct_sizes_are_accepted() {
    #[repr(C)]
    struct NewerInfo {
        info: QcowprovInfo,
        tail: [u8; 64],
    }
    #[repr(C)]
    struct NewerStatus {
        st: QcowprovStatus,
        tail: [u8; 16],
    }
    let dir = TempDir::new("newer");
    let (_path, img) = fixture(&dir);
    let mut n = NewerInfo {
        info: QcowprovInfo {
            struct_size: std::mem::size_of::<NewerInfo>() as u32,
            ..Default::default()
        },
        tail: [0xab; 64],
    };
    let mut s = NewerStatus {
        st: QcowprovStatus {
            struct_size: std::mem::size_of::<NewerStatus>() as u32,
            ..Default::default()
        },
        tail: [0xcd; 16],
    };
    // SAFETY: live handle; the structs are as large as their struct_size says.
    unsafe {
        assert_eq!(qcowprov_get_info(img, &mut n.info), 0);
        assert_eq!(qcowprov_block_status_depth(img, 0, MIB, &mut s.st), 0);
    }
    assert_eq!(n.info.virtual_size, 4 * MIB);
    assert_eq!(
        n.info.struct_size as usize,
        std::mem::size_of::<NewerInfo>()
    );
    assert_eq!(n.tail, [0xab; 64]);
    assert_eq!(s.st.len, MIB);
    assert_eq!(s.tail, [0xcd; 16]);
    assert_eq!(close(img), 0);
}

#[test]
fn bad_flags_ranges_and_sizes() {
    let dir = TempDir::new("ranges");
    let (path, img) = fixture(&dir);
    let size = 4 * MIB;
    assert_eq!(open(&path, "", 0x80).unwrap_err().0, EINVAL);
    says("0x80");
    let mut buf = [0u8; 512];
    // SAFETY: (all calls) live handle; buffers valid for the lengths given, except where
    // the length is rejected before any access (documented -EINVAL beyond INT64_MAX).
    unsafe {
        assert_eq!(
            qcowprov_pwrite(img, buf.as_ptr().cast(), 512, 0, 2),
            EINVAL64
        );
        says("'flags'");
        // Bit 2 is the first flag write-zeroes does not define.
        assert_eq!(qcowprov_write_zeroes(img, 0, 512, 4), EINVAL);
        assert_eq!(
            qcowprov_pread(img, buf.as_mut_ptr().cast(), 512, size),
            EINVAL64
        );
        says("beyond the end");
        assert_eq!(
            qcowprov_pread(img, buf.as_mut_ptr().cast(), 512, u64::MAX),
            EINVAL64
        );
        assert_eq!(
            qcowprov_pwrite(img, buf.as_ptr().cast(), 512, size - 256, 0),
            EINVAL64
        );
        assert_eq!(qcowprov_discard(img, size, 1), EINVAL);
        assert_eq!(qcowprov_write_zeroes(img, u64::MAX, 2, 0), EINVAL);
        assert_eq!(
            qcowprov_pread(img, buf.as_mut_ptr().cast(), usize::MAX, 0),
            EINVAL64
        );
        says("INT64_MAX");
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: 512,
        }];
        assert_eq!(qcowprov_preadv(img, iov.as_ptr(), -1, 0), EINVAL64);
        says("iovcnt");
        assert_eq!(qcowprov_preadv(img, iov.as_ptr(), 0, 0), 0);
        assert_eq!(qcowprov_pwritev(img, iov.as_ptr(), 1, 0, 8), EINVAL64);
        // Resize: unaligned, shrinking.
        assert_eq!(qcowprov_resize(img, size + 1), EINVAL);
        says("512");
        assert_eq!(qcowprov_resize(img, size - 512), -libc::ENOTSUP);
        says("shrinking");
        assert_eq!(qcowprov_resize(img, size), 0);
        // A zero-length write and read are fine.
        assert_eq!(qcowprov_pwrite(img, buf.as_ptr().cast(), 0, size, 0), 0);
        assert_eq!(qcowprov_pread(img, buf.as_mut_ptr().cast(), 0, size), 0);
    }
    assert_eq!(close(img), 0);
    // Creation option errors.
    assert_eq!(
        create(&dir.path("v2.qcow2"), "compat=0.10,lazy_refcounts=on", MIB),
        EINVAL
    );
    says("lazy_refcounts");
    assert_eq!(
        create(&dir.path("nosize.qcow2"), "backing_fmt=qcow2", 0),
        EINVAL
    );
    assert_eq!(
        create(&dir.path("huge.qcow2"), "", u64::MAX - 511),
        -libc::EFBIG
    );
    assert_eq!(create(&dir.path("nodir/x.qcow2"), "", MIB), -libc::ENOENT);
    assert!(Path::new(&dir.path("v2.qcow2")).symlink_metadata().is_err());
}

#[test]
fn last_error_and_strerror() {
    // Failures set the message; successes leave it; other threads have their own.
    assert_eq!(
        create(Path::new("/nonexistent-dir/x.qcow2"), "", MIB),
        -libc::ENOENT
    );
    let msg = last_error();
    assert!(msg.contains("/nonexistent-dir"), "{msg}");
    let dir = TempDir::new("lasterr");
    let (_path, img) = fixture(&dir);
    assert_eq!(last_error(), msg, "successful calls leave the message");
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    assert_eq!(close(img), 0);

    for (code, want) in [
        (-libc::EINVAL, "invalid argument"),
        (libc::EINVAL, "invalid argument"),
        (-libc::EIO, "input/output error"),
        (-libc::ENOSPC, "no space left on device"),
        (-libc::EROFS, "read-only file system"),
        (-libc::ENOTSUP, "operation not supported"),
        (-libc::EFBIG, "file too large"),
        (-libc::EEXIST, "file exists"),
        (-libc::ENOENT, "no such file or directory"),
        (-libc::ENOMEM, "cannot allocate memory"),
        (-libc::EISDIR, "is a directory"),
        (-libc::EACCES, "permission denied"),
        (0, "success"),
        (-9999, "unknown error"),
        (i32::MIN, "unknown error"),
    ] {
        assert_eq!(strerror(code), want, "strerror({code})");
    }
    // Static: the same pointer every time.
    assert_eq!(qcowprov_strerror(-libc::EIO), qcowprov_strerror(libc::EIO));
}
