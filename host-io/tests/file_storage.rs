//! FileStorage on real regular files (buffered): I/O, holes, discard, zeroing and fallbacks.

mod common;

use common::{allocated, mounted_as, pattern, TempDir};
use host_io::{
    raw_os_error_of, DiscardOutcome, FileOptions, FileStorage, Primitive, Storage, ZeroMethod,
    ZeroMode,
};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// A new file of `len` pattern bytes, flushed so st_blocks is settled.
fn filled(dir: &TempDir, name: &str, len: u64, mut opts: FileOptions) -> FileStorage {
    opts.create = true;
    opts.truncate = true;
    let s = FileStorage::open(dir.join(name), &opts).unwrap();
    s.write_at(&pattern(0, len as usize, 7), 0).unwrap();
    s.flush().unwrap();
    s
}

fn read(s: &dyn Storage, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0xEEu8; len as usize];
    s.read_at(&mut v, off).unwrap();
    v
}

#[test]
fn read_write_roundtrip_and_zeros_past_eof() {
    let d = TempDir::new("rw");
    let s = FileStorage::open(d.join("a"), &FileOptions::create_new()).unwrap();
    assert!(s.is_empty().unwrap());
    let data = pattern(100, 10_000, 1);
    s.write_at(&data, 100).unwrap();
    assert_eq!(s.len().unwrap(), 10_100);
    assert_eq!(read(&s, 100, 10_000), data);
    // Straddling end of file: tail reads zero; entirely past: all zero.
    let v = read(&s, 10_000, 300);
    assert_eq!(&v[..100], &data[9_900..]);
    assert!(v[100..].iter().all(|&b| b == 0));
    assert!(read(&s, 1 << 40, 4096).iter().all(|&b| b == 0));
    // The hole before the first write reads zero.
    assert!(read(&s, 0, 100).iter().all(|&b| b == 0));
    // Overflowing ranges are refused, not a panic.
    let mut b = [0u8; 8];
    assert_eq!(
        s.read_at(&mut b, u64::MAX - 2).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        s.write_at(&b, u64::MAX - 2).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
}

#[test]
fn vectored_io_matches_plain_io() {
    let d = TempDir::new("vec");
    let s = FileStorage::open(d.join("a"), &FileOptions::create_new()).unwrap();
    let parts: Vec<Vec<u8>> = [1usize, 4096, 0, 333, 70_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64 * 7, n, i as u8))
        .collect();
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    s.write_vectored_at(&refs, 5).unwrap();
    let flat = parts.concat();
    assert_eq!(read(&s, 5, flat.len() as u64), flat);
    // Vectored read straddling end of file zero-fills the tail buffers.
    let mut a = vec![0xEEu8; 1000];
    let mut b = vec![0xEEu8; flat.len()];
    {
        let mut bufs: Vec<&mut [u8]> = vec![&mut a, &mut b];
        s.read_vectored_at(&mut bufs, 5).unwrap();
    }
    assert_eq!(a, flat[..1000]);
    assert_eq!(&b[..flat.len() - 1000], &flat[1000..]);
    assert!(b[flat.len() - 1000..].iter().all(|&x| x == 0));
    // More buffers than IOV_MAX.
    let many: Vec<Vec<u8>> = (0..1500).map(|i| vec![(i % 251) as u8 + 1; 3]).collect();
    let refs: Vec<&[u8]> = many.iter().map(|p| p.as_slice()).collect();
    s.write_vectored_at(&refs, 0).unwrap();
    assert_eq!(read(&s, 0, 4500), many.concat());
}

#[test]
fn discard_punches_a_hole_that_reads_zero() {
    let d = TempDir::new("discard");
    let s = filled(&d, "a", M, FileOptions::new());
    let before = allocated(s.path());
    assert!(
        before >= M,
        "file should be allocated, st_blocks says {before}"
    );
    assert_eq!(
        s.discard(256 * K, 256 * K).unwrap(),
        DiscardOutcome::Released
    );
    s.flush().unwrap();
    let after = allocated(s.path());
    assert!(
        after <= before - 256 * K,
        "punch must release: {before} -> {after}"
    );
    assert_eq!(s.next_hole(0).unwrap(), Some(256 * K));
    assert_eq!(s.next_data(256 * K).unwrap(), Some(512 * K));
    assert!(read(&s, 256 * K, 256 * K).iter().all(|&b| b == 0));
    assert_eq!(read(&s, 512 * K, 4096), pattern(512 * K, 4096, 7));
    assert_eq!(s.len().unwrap(), M, "discard keeps the size");
    let caps = s.capabilities();
    assert!(caps.discard && caps.discard_reads_zero && caps.discard_granularity >= 512);
}

#[test]
fn keep_allocated_anchors_and_unmap_releases() {
    let d = TempDir::new("zero");
    let s = filled(&d, "a", M, FileOptions::new());
    let before = allocated(s.path());

    let m = s
        .write_zeroes(128 * K, 128 * K, ZeroMode::KeepAllocated)
        .unwrap();
    assert!(
        matches!(m, ZeroMethod::WriteZeroesFlag | ZeroMethod::ZeroRange),
        "ext4/xfs have a keep-allocated primitive, got {m:?}"
    );
    s.flush().unwrap();
    assert!(
        allocated(s.path()) >= before,
        "KeepAllocated released space"
    );
    assert!(read(&s, 128 * K, 128 * K).iter().all(|&b| b == 0));
    assert_eq!(read(&s, 124 * K, 4 * K), pattern(124 * K, 4096, 7));
    assert_eq!(read(&s, 256 * K, 4 * K), pattern(256 * K, 4096, 7));
    // The WRITE_ZEROES flag was probed first and its outcome remembered.
    if m == ZeroMethod::ZeroRange {
        assert!(!s.primitive_usable(Primitive::WriteZeroesFlag));
    } else {
        assert!(s.primitive_known_working(Primitive::WriteZeroesFlag));
    }

    let m = s.write_zeroes(512 * K, 256 * K, ZeroMode::Unmap).unwrap();
    assert_eq!(m, ZeroMethod::PunchHole);
    s.flush().unwrap();
    assert!(allocated(s.path()) <= before - 256 * K);
    assert!(read(&s, 512 * K, 256 * K).iter().all(|&b| b == 0));
    assert_eq!(s.len().unwrap(), M);
}

#[test]
fn zeroing_at_and_past_eof_extends() {
    let d = TempDir::new("eof");
    let s = filled(&d, "a", 8 * K, FileOptions::new());
    let before = allocated(s.path());
    assert_eq!(
        s.write_zeroes(16 * K, 64 * K, ZeroMode::KeepAllocated)
            .unwrap(),
        ZeroMethod::ExtendedPastEof
    );
    assert_eq!(s.len().unwrap(), 80 * K);
    assert!(
        allocated(s.path()) >= before + 64 * K,
        "past-EOF keep must allocate"
    );
    assert_eq!(
        s.write_zeroes(100 * K, 20 * K, ZeroMode::Unmap).unwrap(),
        ZeroMethod::ExtendedPastEof
    );
    assert_eq!(s.len().unwrap(), 120 * K);
    // A range crossing EOF: zeroed inside, file grows to its end.
    let m = s
        .write_zeroes(4 * K, 200 * K, ZeroMode::KeepAllocated)
        .unwrap();
    assert_ne!(m, ZeroMethod::PunchHole);
    assert_eq!(s.len().unwrap(), 204 * K);
    assert!(read(&s, 0, 204 * K)[4096..].iter().all(|&b| b == 0));
    assert_eq!(read(&s, 0, 4096), pattern(0, 4096, 7));
    let m = s.write_zeroes(200 * K, 8 * K, ZeroMode::Unmap).unwrap();
    assert_eq!(m, ZeroMethod::PunchHole);
    assert_eq!(s.len().unwrap(), 208 * K);
}

#[test]
fn forced_fallbacks_never_release_for_keep_allocated() {
    let d = TempDir::new("fallback");
    let cases = [
        (
            vec![Primitive::WriteZeroesFlag, Primitive::ZeroRange],
            ZeroMethod::PunchThenAllocate,
        ),
        (
            vec![
                Primitive::WriteZeroesFlag,
                Primitive::ZeroRange,
                Primitive::Fallocate,
            ],
            ZeroMethod::WroteZeroBuffers,
        ),
        (
            vec![
                Primitive::WriteZeroesFlag,
                Primitive::ZeroRange,
                Primitive::PunchHole,
            ],
            ZeroMethod::WroteZeroBuffers,
        ),
    ];
    for (i, (disabled, want)) in cases.into_iter().enumerate() {
        let opts = FileOptions {
            disabled,
            ..FileOptions::new()
        };
        let s = filled(&d, &format!("f{i}"), 4 * M, opts);
        let before = allocated(s.path());
        // 3 MiB so the buffer path needs several 1 MiB chunks.
        let got = s.write_zeroes(100, 3 * M, ZeroMode::KeepAllocated).unwrap();
        assert_eq!(got, want, "case {i}");
        s.flush().unwrap();
        assert!(allocated(s.path()) >= before, "case {i}: released space");
        assert!(read(&s, 100, 3 * M).iter().all(|&b| b == 0), "case {i}");
        assert_eq!(read(&s, 0, 100), pattern(0, 100, 7), "case {i}");
        assert_eq!(read(&s, 3 * M + 100, 4096), pattern(3 * M + 100, 4096, 7));
        // With punching disabled, Unmap falls back to the keep chain.
        if !s.primitive_usable(Primitive::PunchHole) {
            assert_eq!(s.discard(0, 4096).unwrap(), DiscardOutcome::Unsupported);
            assert_eq!(
                read(&s, 0, 100),
                pattern(0, 100, 7),
                "unsupported discard changed data"
            );
            let m = s.write_zeroes(0, 64 * K, ZeroMode::Unmap).unwrap();
            assert_ne!(m, ZeroMethod::PunchHole);
            assert!(!s.capabilities().discard && !s.capabilities().zero_unmap);
        }
    }
}

#[test]
fn tmpfs_takes_punch_then_allocate_naturally() {
    if !mounted_as("/dev/shm", "tmpfs") {
        eprintln!("skipped: /dev/shm is not a tmpfs mount");
        return;
    }
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let path =
        std::path::Path::new("/dev/shm").join(format!("host-io-test-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(path.clone());
    let s = FileStorage::open(&path, &FileOptions::create_new()).unwrap();
    s.write_at(&pattern(0, 256 * 1024, 3), 0).unwrap();
    let before = allocated(&path);
    let m = s
        .write_zeroes(64 * K, 64 * K, ZeroMode::KeepAllocated)
        .unwrap();
    assert_eq!(m, ZeroMethod::PunchThenAllocate);
    assert!(
        !s.primitive_usable(Primitive::ZeroRange),
        "ENOTSUP must be sticky"
    );
    assert!(allocated(&path) >= before);
    assert!(read(&s, 64 * K, 64 * K).iter().all(|&b| b == 0));
}

#[test]
fn allocate_set_len_and_read_only() {
    let d = TempDir::new("alloc");
    let path = d.join("a");
    let s = FileStorage::open(&path, &FileOptions::create_new()).unwrap();
    s.allocate(0, M).unwrap();
    assert_eq!(s.len().unwrap(), M);
    assert!(allocated(&path) >= M);
    s.set_len(10).unwrap();
    assert_eq!(s.len().unwrap(), 10);
    s.set_len(3 * M).unwrap();
    assert_eq!(s.len().unwrap(), 3 * M);
    assert!(allocated(&path) < M, "set_len grows sparsely");
    s.write_at(b"hello", 0).unwrap();
    s.flush().unwrap();
    drop(s);

    let ro = FileStorage::open(&path, &FileOptions::new().read_only(true)).unwrap();
    assert!(ro.capabilities().read_only);
    assert_eq!(read(&ro, 0, 5), b"hello");
    let erofs = Some(libc::EROFS);
    assert_eq!(ro.write_at(b"x", 0).unwrap_err().raw_os_error(), erofs);
    assert_eq!(ro.discard(0, 4096).unwrap_err().raw_os_error(), erofs);
    assert_eq!(
        ro.write_zeroes(0, 4096, ZeroMode::Unmap)
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(ro.set_len(0).unwrap_err().raw_os_error(), erofs);
    assert_eq!(ro.allocate(0, 1).unwrap_err().raw_os_error(), erofs);
}

#[test]
fn open_errors_name_the_path_and_keep_errno() {
    let d = TempDir::new("open");
    let missing = d.join("missing.qcow2");
    let e = FileStorage::open(&missing, &FileOptions::new()).unwrap_err();
    assert_eq!(raw_os_error_of(&e), Some(libc::ENOENT));
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains("missing.qcow2"), "{e}");
    let e = FileStorage::open(d.path(), &FileOptions::new()).unwrap_err();
    assert!(
        raw_os_error_of(&e).is_some(),
        "directory must be refused: {e}"
    );
    let bad = FileOptions {
        read_only: true,
        create: true,
        ..FileOptions::new()
    };
    let e = FileStorage::open(d.join("x"), &bad).unwrap_err();
    assert_eq!(raw_os_error_of(&e), Some(libc::EINVAL));
}

#[test]
fn concurrent_disjoint_writes() {
    let d = TempDir::new("threads");
    let s =
        std::sync::Arc::new(FileStorage::open(d.join("a"), &FileOptions::create_new()).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = (i * 4 + t) * 1000;
                    s.write_at(&pattern(off, 1000, t as u8), off).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for t in 0..4u64 {
        for i in 0..64u64 {
            let off = (i * 4 + t) * 1000;
            assert_eq!(read(&*s, off, 1000), pattern(off, 1000, t as u8));
        }
    }
}

#[test]
fn data_run_follows_seek_data_and_seek_hole() {
    let d = TempDir::new("datarun");
    let s = filled(&d, "f", 4 * M, FileOptions::new());
    s.discard(M, M).unwrap();
    let (data, len) = s.data_run(0, 4 * M).unwrap();
    assert!(data);
    assert_eq!(len, M);
    // Filesystems without hole tracking report all data; those with it report the hole.
    if s.next_hole(0).unwrap() == Some(M) {
        assert_eq!(s.data_run(M, 4 * M).unwrap(), (false, M));
        assert_eq!(s.data_run(M + 4096, 10).unwrap(), (false, 10));
        assert_eq!(s.data_run(2 * M, 4 * M).unwrap(), (true, 2 * M));
    }
    // Past the end of the file everything is a hole.
    assert_eq!(s.data_run(8 * M, M).unwrap(), (false, M));
}
