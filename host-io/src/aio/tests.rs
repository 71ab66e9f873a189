//! Both backends against the same file: reads (vectored, past the end, direct), writes,
//! write-zeroes, discards, flushes, bad operations, and drop with operations in flight.

use std::sync::Arc;

use super::*;
use crate::{FileOptions, FileStorage, MemStorage};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qcowprov-aio-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&d);
    d
}

fn kinds() -> Vec<AioKind> {
    let mut v = vec![AioKind::Threads];
    assert!(
        io_uring_supported() || std::env::var_os("QCOWPROV_NO_IO_URING").is_some(),
        "io_uring is not available here; set QCOWPROV_NO_IO_URING=1 to test the thread pool only"
    );
    if io_uring_supported() {
        v.push(AioKind::IoUring);
    }
    v
}

fn wait_all(b: &mut dyn AioBackend, n: usize) -> Vec<AioDone> {
    let mut out = Vec::new();
    while out.len() < n {
        b.poll(true, &mut out).unwrap();
    }
    out.sort_by_key(|d| d.user);
    out
}

fn roundtrip(kind: AioKind, direct: bool) {
    let path = tmp(&format!("rt-{kind}-{direct}"));
    std::fs::write(&path, vec![7u8; 3 * 4096 + 100]).unwrap();
    let s = match FileStorage::open(&path, &FileOptions::new().direct(direct)) {
        Ok(s) => Arc::new(s),
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => return, // no O_DIRECT here
        Err(e) => panic!("{e}"),
    };
    let mut b = open_backend(kind, s.clone(), 8).unwrap();
    assert_eq!(b.kind(), kind);
    // Write 8 KiB from two pieces of one buffer, then read across the end of the file.
    let mut w = IoBuf::new(8192, 4096).unwrap();
    w.write_from(0, &[1u8; 4096]);
    w.write_from(4096, &[2u8; 4096]);
    let w = Arc::new(w);
    b.submit(
        1,
        AioOp::Write {
            buf: w.clone(),
            pieces: vec![
                Piece {
                    at: 4096,
                    off: 0,
                    len: 4096,
                },
                Piece {
                    at: 0,
                    off: 8192,
                    len: 4096,
                },
            ],
        },
    );
    let d = wait_all(&mut *b, 1);
    d[0].result.as_ref().unwrap();
    let r = IoBuf::new(5 * 4096, 4096).unwrap();
    b.submit(
        2,
        AioOp::Read {
            buf: r,
            pieces: vec![
                Piece {
                    at: 0,
                    off: 0,
                    len: 3 * 4096,
                },
                Piece {
                    at: 3 * 4096,
                    off: 3 * 4096,
                    len: 2 * 4096,
                },
            ],
        },
    );
    b.submit(3, AioOp::Flush);
    b.submit(
        4,
        AioOp::WriteZeroes {
            off: 4096,
            len: 4096,
            mode: crate::ZeroMode::KeepAllocated,
        },
    );
    let d = wait_all(&mut *b, 3);
    for x in &d {
        x.result.as_ref().unwrap();
    }
    let got = d[0].buf.as_ref().unwrap().to_vec();
    assert_eq!(&got[..4096], &[2u8; 4096][..], "{kind}");
    assert_eq!(&got[8192..12288], &[1u8; 4096][..], "{kind}");
    assert_eq!(&got[12288..12388], &[7u8; 100][..], "{kind}: the old tail");
    assert!(
        got[12388..].iter().all(|&x| x == 0),
        "{kind}: past the end reads zeros"
    );
    let mut z = [9u8; 4096];
    s.read_at(&mut z, 4096).unwrap();
    assert_eq!(z, [0u8; 4096], "{kind}: write-zeroes");
    assert_eq!(b.in_flight(), 0);
    drop(b);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn file_roundtrip_buffered_and_direct() {
    for k in kinds() {
        roundtrip(k, false);
        roundtrip(k, true);
    }
}

#[test]
fn caller_iovecs_and_unaligned_direct_io() {
    for k in kinds() {
        let path = tmp(&format!("iov-{k}"));
        std::fs::write(&path, (0..20000u32).map(|i| i as u8).collect::<Vec<u8>>()).unwrap();
        let s = Arc::new(
            FileStorage::open(&path, &FileOptions::new().direct(true))
                .unwrap_or_else(|_| FileStorage::open(&path, &FileOptions::new()).unwrap()),
        );
        let mut b = open_backend(k, s, 4).unwrap();
        let mut x = vec![0u8; 3];
        let mut y = vec![0u8; 5000];
        // SAFETY: both vectors outlive the operation (waited for below) and are untouched
        // until then.
        let buf = unsafe { IoBuf::from_iovecs(&[(x.as_mut_ptr(), 3), (y.as_mut_ptr(), 5000)]) };
        b.submit(
            9,
            AioOp::Read {
                buf,
                pieces: vec![Piece {
                    at: 0,
                    off: 1,
                    len: 5003,
                }],
            },
        );
        let d = wait_all(&mut *b, 1);
        d[0].result.as_ref().unwrap();
        drop(d);
        assert_eq!(x, [1, 2, 3]);
        assert!(
            y.iter().enumerate().all(|(i, &v)| v == (i + 4) as u8),
            "{k}"
        );
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn bad_operations_fail_and_memory_backends_work() {
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    assert!(
        open_backend(AioKind::IoUring, mem.clone(), 2).is_err(),
        "io_uring needs a file"
    );
    let mut b = open_backend(AioKind::Threads, mem, 2).unwrap();
    let buf = IoBuf::new(100, 1).unwrap();
    b.submit(
        1,
        AioOp::Read {
            buf,
            pieces: vec![
                Piece {
                    at: 0,
                    off: 0,
                    len: 60,
                },
                Piece {
                    at: 50,
                    off: 0,
                    len: 50,
                },
            ],
        },
    );
    b.submit(
        2,
        AioOp::Write {
            buf: Arc::new(IoBuf::new(10, 1).unwrap()),
            pieces: vec![Piece {
                at: 5,
                off: 0,
                len: 6,
            }],
        },
    );
    b.submit(
        3,
        AioOp::Write {
            buf: Arc::new(IoBuf::copy_of(b"abc").unwrap()),
            pieces: vec![Piece {
                at: 0,
                off: 10,
                len: 3,
            }],
        },
    );
    let d = wait_all(&mut *b, 3);
    assert_eq!(
        d[0].result.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EINVAL),
        "overlapping reads"
    );
    assert!(
        d[0].buf.is_some(),
        "a failed read still hands its buffer back"
    );
    assert_eq!(
        d[1].result.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EINVAL),
        "past the buffer"
    );
    d[2].result.as_ref().unwrap();
}

#[test]
fn drop_waits_for_operations_in_flight_and_notify_wakes() {
    for k in kinds() {
        let path = tmp(&format!("drop-{k}"));
        std::fs::write(&path, vec![3u8; 1 << 20]).unwrap();
        let s = Arc::new(FileStorage::open(&path, &FileOptions::new()).unwrap());
        let mut b = open_backend(k, s, 4).unwrap();
        // A wake with nothing in flight ends a waiting poll.
        let n = b.notifier();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            n.notify();
        });
        let mut out = Vec::new();
        b.poll(true, &mut out).unwrap();
        t.join().unwrap();
        for i in 0..64u64 {
            let buf = IoBuf::new(16384, 4096).unwrap();
            b.submit(
                i,
                AioOp::Read {
                    buf,
                    pieces: vec![Piece {
                        at: 0,
                        off: i * 16384,
                        len: 16384,
                    }],
                },
            );
        }
        let mut out = Vec::new();
        b.poll(false, &mut out).unwrap();
        drop(b); // must not free buffers the kernel still fills
        let _ = std::fs::remove_file(&path);
    }
}
