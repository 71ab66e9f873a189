//! FaultyStorage: errno injection, ENOSPC limits, short writes, counters.

mod common;

use common::TempDir;
use host_io::{
    Fault, FaultyStorage, FileOptions, FileStorage, MemStorage, OpKind, Storage, ZeroMode,
};

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.unwrap_err().raw_os_error().expect("errno")
}

/// A small "engine-like" sequence of five writes and two flushes.
fn workload(s: &dyn Storage) -> std::io::Result<()> {
    for i in 0..5u64 {
        s.write_at(&[i as u8 + 1; 100], i * 100)?;
        if i % 2 == 1 {
            s.flush()?;
        }
    }
    Ok(())
}

#[test]
fn fail_nth_and_fail_from() {
    let f = FaultyStorage::new(MemStorage::new());
    f.add_fault(Fault::FailNth {
        op: OpKind::Write,
        n: 2,
        errno: libc::EIO,
    });
    f.write_at(b"a", 0).unwrap();
    f.write_at(b"b", 1).unwrap();
    assert_eq!(errno_of(f.write_at(b"c", 2)), libc::EIO);
    f.write_at(b"d", 3).unwrap();
    assert_eq!(f.count(OpKind::Write), 4);
    assert_eq!(f.inner().to_vec(), b"ab\0d");

    f.add_fault(Fault::FailFrom {
        op: OpKind::Flush,
        n: 1,
        errno: libc::EIO,
    });
    f.flush().unwrap();
    assert_eq!(errno_of(f.flush()), libc::EIO);
    assert_eq!(errno_of(f.flush()), libc::EIO);
    f.clear_faults();
    f.flush().unwrap();
    assert_eq!(f.count(OpKind::Flush), 4);

    for (op, run) in [
        (
            OpKind::Discard,
            Box::new(|f: &FaultyStorage<MemStorage>| f.discard(0, 1).map(|_| ()))
                as Box<dyn Fn(&FaultyStorage<MemStorage>) -> std::io::Result<()>>,
        ),
        (
            OpKind::WriteZeroes,
            Box::new(|f: &FaultyStorage<MemStorage>| {
                f.write_zeroes(0, 1, ZeroMode::Unmap).map(|_| ())
            }),
        ),
        (
            OpKind::SetLen,
            Box::new(|f: &FaultyStorage<MemStorage>| f.set_len(1)),
        ),
        (
            OpKind::Allocate,
            Box::new(|f: &FaultyStorage<MemStorage>| f.allocate(0, 1)),
        ),
        (
            OpKind::Read,
            Box::new(|f: &FaultyStorage<MemStorage>| f.read_at(&mut [0u8; 1], 0)),
        ),
    ] {
        f.reset_counters();
        f.clear_faults();
        f.add_fault(Fault::FailNth {
            op,
            n: 0,
            errno: libc::ENOSPC,
        });
        assert_eq!(errno_of(run(&f)), libc::ENOSPC, "{op:?}");
        run(&f).unwrap();
        assert_eq!(f.count(op), 2);
    }
}

#[test]
fn no_space_beyond_limit() {
    let f = FaultyStorage::new(MemStorage::new());
    f.add_fault(Fault::NoSpaceBeyond { limit: 1000 });
    f.write_at(&[1; 1000], 0).unwrap();
    assert_eq!(errno_of(f.write_at(&[1; 2], 999)), libc::ENOSPC);
    assert_eq!(
        errno_of(f.write_zeroes(900, 200, ZeroMode::KeepAllocated)),
        libc::ENOSPC
    );
    assert_eq!(errno_of(f.allocate(0, 1001)), libc::ENOSPC);
    assert_eq!(errno_of(f.set_len(1001)), libc::ENOSPC);
    f.set_len(10).unwrap();
    f.discard(0, 1 << 20).unwrap();
    assert_eq!(f.inner().len().unwrap(), 10);
}

#[test]
fn short_write_stores_a_prefix_then_fails() {
    let f = FaultyStorage::new(MemStorage::new());
    f.add_fault(Fault::ShortWrite {
        n: 1,
        keep: 100,
        errno: libc::EIO,
    });
    f.write_at(&[1; 4096], 0).unwrap();
    assert_eq!(errno_of(f.write_at(&[2; 4096], 0)), libc::EIO);
    let v = f.inner().to_vec();
    assert!(v[..100].iter().all(|&b| b == 2));
    assert!(v[100..].iter().all(|&b| b == 1));
    // A vectored write counts as one write.
    f.write_vectored_at(&[&[3u8; 10], &[4u8; 10]], 0).unwrap();
    assert_eq!(f.count(OpKind::Write), 3);
}

#[test]
fn fail_at_every_write_position() {
    let probe = FaultyStorage::new(MemStorage::new());
    workload(&probe).unwrap();
    let n = probe.count(OpKind::Write);
    assert_eq!(n, 5);
    for i in 0..n {
        let f = FaultyStorage::new(MemStorage::new());
        f.add_fault(Fault::FailNth {
            op: OpKind::Write,
            n: i,
            errno: libc::EIO,
        });
        assert_eq!(errno_of(workload(&f)), libc::EIO, "position {i}");
        assert_eq!(f.count(OpKind::Write), i + 1);
        // Exactly the writes before position i landed.
        let v = f.inner().to_vec();
        assert_eq!(v.len() as u64, i * 100);
        for j in 0..i {
            assert!(v[(j * 100) as usize..((j + 1) * 100) as usize]
                .iter()
                .all(|&b| b == j as u8 + 1));
        }
    }
}

#[test]
fn wraps_a_real_file_and_keeps_errno() {
    let d = TempDir::new("faulty");
    let s = FileStorage::open(d.join("a"), &FileOptions::create_new()).unwrap();
    let f = FaultyStorage::new(s);
    f.add_fault(Fault::FailNth {
        op: OpKind::Flush,
        n: 0,
        errno: libc::EIO,
    });
    f.write_at(b"data", 0).unwrap();
    assert_eq!(errno_of(f.flush()), libc::EIO);
    f.flush().unwrap();
    assert!(f.capabilities().discard);
    assert_eq!(f.into_inner().len().unwrap(), 4);
}
