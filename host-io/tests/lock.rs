//! QEMU's image locks on FileStorage: which bytes each request holds (probed as QEMU probes
//! them, compared with what QEMU 10's tools hold), who excludes whom, force-share, locking
//! off, lock-before-truncate, descriptors from the caller, and a killed holder.
//! Interoperation with qemu-io and qemu-img runs in examples/tests/t-lock.sh.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

use common::TempDir;
use host_io::{
    raw_os_error_of, FileOptions, FileStorage, LockConflict, LockRequest, Locking, Perms, Storage,
    LOCK_CONFLICT_ERRNO,
};

fn image(d: &TempDir) -> std::path::PathBuf {
    let p = d.join("img");
    std::fs::write(&p, vec![7u8; 4096]).unwrap();
    p
}

fn open(p: &Path, req: LockRequest) -> std::io::Result<FileStorage> {
    let ro = req.perm == Perms::CONSISTENT_READ;
    FileStorage::open(p, &FileOptions::new().read_only(ro).lock(Some(req)))
}

/// The lock bytes held on `p`'s inode by anyone: (first, last) ranges, sorted, merged.
///
/// Asked byte by byte with `F_OFD_GETLK` from a fresh open file description, as QEMU's
/// `raw_check_lock_bytes` asks. Not read from /proc/locks: that file is a seq_file walked by
/// index across read() calls, so while other tests (or processes) release locks an entry can
/// be skipped, and a held byte looked free (a CI run failed that way).
fn held_bytes(p: &Path) -> Vec<(u64, u64)> {
    let probe = std::fs::File::open(p).unwrap();
    let mut held: Vec<(u64, u64)> = Vec::new();
    for byte in 0..512u64 {
        // SAFETY: flock is plain old data; zeroed is a valid value of it.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        // SAFETY: a valid descriptor we own and a valid, writable struct flock for
        // F_OFD_GETLK, which only reads and writes that struct.
        let rc = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        if fl.l_type == libc::F_UNLCK as libc::c_short {
            continue;
        }
        assert_eq!(
            fl.l_type,
            libc::F_RDLCK as libc::c_short,
            "only shared locks are ever taken (byte {byte})"
        );
        match held.last_mut() {
            Some(r) if r.1 + 1 == byte => r.1 = byte,
            _ => held.push((byte, byte)),
        }
    }
    held
}

fn conflict(r: std::io::Result<FileStorage>) -> (LockConflict, String) {
    let e = r.expect_err("the open must be refused");
    assert_eq!(raw_os_error_of(&e), Some(LOCK_CONFLICT_ERRNO), "{e}");
    let c = *LockConflict::of(&e).unwrap_or_else(|| panic!("not a lock conflict: {e}"));
    (c, e.to_string())
}

#[test]
fn bytes_held_match_qemu_tools() {
    let d = TempDir::new("lock-bytes");
    let p = image(&d);
    // What QEMU 10 holds (measured): qemu-io rw, qemu-io -r (and backing files),
    // qemu-io -r -U; and our creator, which shares nothing.
    for (req, want) in [
        (
            LockRequest::WRITER,
            vec![(100, 101), (103, 103), (201, 201), (203, 203)],
        ),
        (
            LockRequest::READER,
            vec![(100, 100), (201, 201), (203, 203)],
        ),
        (LockRequest::SHARING_READER, vec![(100, 100)]),
        (
            LockRequest::CREATOR,
            vec![(101, 101), (103, 103), (200, 203)],
        ),
    ] {
        let s = FileStorage::open(&p, &FileOptions::new().lock(Some(req))).unwrap();
        assert_eq!(held_bytes(&p), want, "{req:?}");
        assert_eq!(s.held_lock(), Some(req));
        drop(s);
        assert_eq!(
            held_bytes(&p),
            vec![],
            "dropping the storage releases {req:?}"
        );
    }
}

#[test]
fn who_excludes_whom() {
    let d = TempDir::new("lock-matrix");
    let p = image(&d);
    let (w, r, u) = (
        LockRequest::WRITER,
        LockRequest::READER,
        LockRequest::SHARING_READER,
    );
    // (holder, opener, QEMU's message for the refusal or None)
    let cases = [
        (w, w, Some("Failed to get \"write\" lock")),
        (w, r, Some("Failed to get shared \"write\" lock")),
        (w, u, None),
        (r, w, Some("Failed to get \"write\" lock")),
        (r, r, None),
        (r, u, None),
        (u, w, None),
        (u, r, None),
        (u, u, None),
    ];
    for (holder, opener, refused) in cases {
        let h = open(&p, holder).unwrap();
        let before = held_bytes(&p);
        match refused {
            Some(msg) => {
                let (c, text) = conflict(open(&p, opener));
                assert_eq!(c.to_string(), msg, "{holder:?} then {opener:?}");
                assert!(
                    text.contains(msg) && text.contains("Could not open"),
                    "{text}"
                );
                assert_eq!(c.perm, Perms::WRITE);
                assert_eq!(
                    held_bytes(&p),
                    before,
                    "a refused open leaves no lock behind"
                );
            }
            None => {
                let o = open(&p, opener).unwrap();
                assert!(o.held_lock().is_some());
            }
        }
        drop(h);
    }
}

#[test]
fn locking_off_neither_takes_nor_tests() {
    let d = TempDir::new("lock-off");
    let p = image(&d);
    let w = open(&p, LockRequest::WRITER).unwrap();
    let off = FileOptions::new()
        .lock(Some(LockRequest::WRITER))
        .locking(Locking::Off);
    let s = FileStorage::open(&p, &off).unwrap();
    assert_eq!(s.held_lock(), None);
    assert!(!s.lock(LockRequest::WRITER).unwrap());
    drop(w);
    let on = FileOptions::new()
        .lock(Some(LockRequest::WRITER))
        .locking(Locking::On);
    let s2 = FileStorage::open(&p, &on).unwrap();
    assert_eq!(s2.held_lock(), Some(LockRequest::WRITER));
}

#[test]
fn two_handles_in_one_process_exclude_each_other() {
    // Two opens of one file are two open file descriptions, even in one thread.
    let d = TempDir::new("lock-inproc");
    let p = image(&d);
    let a = open(&p, LockRequest::WRITER).unwrap();
    conflict(open(&p, LockRequest::WRITER));
    // Through a symlink and a hard link too: locks belong to the inode.
    std::os::unix::fs::symlink(&p, d.join("sym")).unwrap();
    std::fs::hard_link(&p, d.join("hard")).unwrap();
    conflict(open(&d.join("sym"), LockRequest::READER));
    conflict(open(&d.join("hard"), LockRequest::READER));
    drop(a);
    open(&p, LockRequest::WRITER).unwrap();
}

#[test]
fn relock_downgrades_and_upgrades() {
    let d = TempDir::new("lock-relock");
    let p = image(&d);
    let a = open(&p, LockRequest::WRITER).unwrap();
    assert!(a.lock(LockRequest::READER).unwrap());
    assert_eq!(held_bytes(&p), vec![(100, 100), (201, 201), (203, 203)]);
    let b = open(&p, LockRequest::READER).unwrap();
    // Upgrading back conflicts with the reader; what was held stays held.
    let e = a.lock(LockRequest::WRITER).unwrap_err();
    assert_eq!(raw_os_error_of(&e), Some(LOCK_CONFLICT_ERRNO));
    assert_eq!(a.held_lock(), Some(LockRequest::READER));
    drop(b);
    assert!(a.lock(LockRequest::WRITER).unwrap());
    a.unlock().unwrap();
    assert_eq!(held_bytes(&p), vec![]);
}

#[test]
fn create_never_truncates_an_image_in_use() {
    let d = TempDir::new("lock-create");
    let p = image(&d);
    let w = open(&p, LockRequest::WRITER).unwrap();
    let (c, _) = conflict(FileStorage::open(&p, &FileOptions::create_new()));
    assert_eq!(c.perm, Perms::WRITE);
    assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 4096], "data intact");
    drop(w);
    // A reader blocks it too, even one that shares everything (a creator shares nothing).
    let r = open(&p, LockRequest::READER).unwrap();
    conflict(FileStorage::open(&p, &FileOptions::create_new()));
    drop(r);
    let u = open(&p, LockRequest::SHARING_READER).unwrap();
    let (c, _) = conflict(FileStorage::open(&p, &FileOptions::create_new()));
    assert_eq!((c.perm, c.shared), (Perms::CONSISTENT_READ, true));
    drop(u);
    let s = FileStorage::open(&p, &FileOptions::create_new()).unwrap();
    assert_eq!(s.len().unwrap(), 0, "truncated once the locks were had");
}

#[test]
fn descriptor_from_the_caller() {
    let d = TempDir::new("lock-fd");
    let p = image(&d);
    let rw = || -> OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap()
            .into()
    };
    let s =
        FileStorage::from_fd(rw(), &FileOptions::new().lock(Some(LockRequest::WRITER))).unwrap();
    assert_eq!(s.path(), std::fs::canonicalize(&p).unwrap());
    conflict(open(&p, LockRequest::READER));
    drop(s);

    // The caller keeps a duplicate: the description lives on, the locks do not.
    let mine: OwnedFd = rw();
    let dup = mine.try_clone().unwrap();
    let s = FileStorage::from_fd(dup, &FileOptions::new().lock(Some(LockRequest::WRITER))).unwrap();
    conflict(open(&p, LockRequest::WRITER));
    drop(s);
    open(&p, LockRequest::WRITER).expect("released although the caller's fd is open");
    drop(mine);

    // Access modes.
    let ro: OwnedFd = std::fs::File::open(&p).unwrap().into();
    let e = FileStorage::from_fd(ro, &FileOptions::new()).unwrap_err();
    assert_eq!(raw_os_error_of(&e), Some(libc::EBADF), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    let ro: OwnedFd = std::fs::File::open(&p).unwrap().into();
    FileStorage::from_fd(ro, &FileOptions::new().read_only(true)).unwrap();
    let app: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(&p)
        .unwrap()
        .into();
    let e = FileStorage::from_fd(app, &FileOptions::new()).unwrap_err();
    assert_eq!(raw_os_error_of(&e), Some(libc::EINVAL), "{e}");
    assert!(!e.to_string().contains("os error"), "{e}");
}

#[test]
fn messages_read_like_a_c_library() {
    let d = TempDir::new("lock-msg");
    let e = FileStorage::open(d.join("missing"), &FileOptions::new()).unwrap_err();
    let text = e.to_string();
    assert_eq!(
        text,
        format!(
            "Could not open '{}': No such file or directory",
            d.join("missing").display()
        )
    );
    assert_eq!(host_io::error_text(&e), text);
    let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
    assert_eq!(host_io::error_text(&e), "No space left on device");
}

/// Child side of `a_killed_holder_leaves_no_lock`: hold a writer lock on the file named by
/// the environment, say so on stdout, then wait to be killed.
#[test]
fn holder_child() {
    let Ok(p) = std::env::var("HOST_IO_LOCK_HOLD") else {
        return; // run as an ordinary test: nothing to do
    };
    let _s = open(Path::new(&p), LockRequest::WRITER).unwrap();
    println!("holding");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_killed_holder_leaves_no_lock() {
    let d = TempDir::new("lock-kill");
    let p = image(&d);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "holder_child", "--nocapture", "--test-threads=1"])
        .env("HOST_IO_LOCK_HOLD", &p)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("holding") {
        let n = std::io::Read::read(&mut out, &mut buf).unwrap();
        assert!(
            n > 0,
            "the holder exited: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    conflict(open(&p, LockRequest::READER));
    child.kill().unwrap();
    child.wait().unwrap();
    open(&p, LockRequest::WRITER).expect("the lock went with the process");
}
