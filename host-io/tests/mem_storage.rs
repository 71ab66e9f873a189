//! MemStorage: allocation tracking, configurable capabilities, fallbacks, edge cases.

use host_io::{
    DiscardOutcome, MemOptions, MemStorage, Storage, ZeroMethod, ZeroMode, DISCARD_FILL,
    MEM_BLOCK_SIZE,
};

const B: u64 = MEM_BLOCK_SIZE;

fn read(s: &MemStorage, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0xEEu8; len as usize];
    s.read_at(&mut v, off).unwrap();
    v
}

#[test]
fn tracks_allocation_and_discard_reads_zero_on_file_like() {
    let s = MemStorage::from_vec(vec![0x11; (16 * B) as usize]);
    assert_eq!(s.allocated_bytes(), 16 * B);
    // Whole blocks 2..6 released, the partial edges are zeroed but stay allocated.
    assert_eq!(
        s.discard(2 * B - 100, 4 * B + 200).unwrap(),
        DiscardOutcome::Released
    );
    assert_eq!(s.allocated_in(2 * B, 4 * B), 0);
    assert_eq!(s.allocated_bytes(), 12 * B);
    let v = read(&s, 0, 16 * B);
    assert!(v[(2 * B - 100) as usize..(6 * B + 100) as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(v[(2 * B - 101) as usize], 0x11);
    assert_eq!(v[(6 * B + 100) as usize], 0x11);
    assert_eq!(s.len().unwrap(), 16 * B);
}

#[test]
fn device_like_discard_does_not_read_zero() {
    let s = MemStorage::from_vec_with(vec![0x22; (8 * B) as usize], MemOptions::device_like());
    let caps = s.capabilities();
    assert!(caps.discard && !caps.discard_reads_zero && caps.is_block_device);
    s.discard(B, 2 * B).unwrap();
    assert_eq!(s.allocated_in(B, 2 * B), 0);
    assert!(read(&s, B, 2 * B).iter().all(|&b| b == DISCARD_FILL));
    // Fixed size.
    assert_eq!(
        s.write_at(b"x", 8 * B).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    assert_eq!(
        s.set_len(B).unwrap_err().kind(),
        std::io::ErrorKind::Unsupported
    );
    s.set_len(8 * B).unwrap();
    // Zeroing keeps allocation and reads zero even where discarded garbage was.
    assert_eq!(
        s.write_zeroes(0, 4 * B, ZeroMode::Unmap).unwrap(),
        ZeroMethod::Memory
    );
    assert_eq!(s.allocated_in(0, 4 * B), 4 * B);
    assert!(read(&s, 0, 4 * B).iter().all(|&b| b == 0));
}

#[test]
fn keep_allocated_never_releases_under_any_capabilities() {
    for bits in 0..32u32 {
        let opts = MemOptions {
            discard: bits & 1 != 0,
            zero_keep: bits & 2 != 0,
            zero_unmap: bits & 4 != 0,
            discard_reads_zero: bits & 8 != 0,
            block_device: bits & 16 != 0,
            ..MemOptions::file_like()
        };
        let s = MemStorage::from_vec_with(vec![0x33; (8 * B) as usize], opts);
        let m = s
            .write_zeroes(B + 10, 3 * B, ZeroMode::KeepAllocated)
            .unwrap();
        let want = if opts.zero_keep {
            ZeroMethod::Memory
        } else {
            ZeroMethod::WroteZeroBuffers
        };
        assert_eq!(m, want, "{opts:?}");
        assert_eq!(s.allocated_bytes(), 8 * B, "{opts:?}");
        assert!(read(&s, B + 10, 3 * B).iter().all(|&b| b == 0));
        assert_eq!(read(&s, B + 9, 1), [0x33]);
        assert_eq!(read(&s, 4 * B + 10, 1), [0x33]);

        let m = s.write_zeroes(5 * B, 2 * B, ZeroMode::Unmap).unwrap();
        assert!(read(&s, 5 * B, 2 * B).iter().all(|&b| b == 0), "{opts:?}");
        if opts.zero_unmap {
            assert_eq!(s.allocated_in(5 * B, 2 * B), 0, "{opts:?}");
        } else {
            assert_eq!(m, want, "{opts:?}");
            assert_eq!(s.allocated_in(5 * B, 2 * B), 2 * B, "{opts:?}");
        }
        let d = s.discard(0, B).unwrap();
        if opts.discard {
            assert_eq!(d, DiscardOutcome::Released);
            assert_eq!(s.allocated_in(0, B), 0);
        } else {
            assert_eq!(d, DiscardOutcome::Unsupported);
            assert_eq!(read(&s, 0, 1), [0x33], "unsupported discard touched data");
        }
        let caps = s.capabilities();
        assert_eq!(caps.discard, opts.discard);
        assert_eq!(caps.zero_keep_allocated, opts.zero_keep);
        assert_eq!(caps.zero_unmap, opts.zero_unmap);
    }
}

#[test]
fn sparse_growth_truncate_and_snapshots() {
    let s = MemStorage::new();
    s.write_at(b"abc", 10 * B).unwrap();
    assert_eq!(s.len().unwrap(), 10 * B + 3);
    assert_eq!(
        s.allocated_bytes(),
        B,
        "only the written block is allocated"
    );
    let snap = s.snapshot();
    s.set_len(10 * B + 1).unwrap();
    s.set_len(12 * B).unwrap();
    assert_eq!(
        read(&s, 10 * B, 3),
        [b'a', 0, 0],
        "bytes cut by truncate read zero"
    );
    assert_eq!(read(&snap, 10 * B, 3), *b"abc", "snapshot is independent");
    s.set_len(0).unwrap();
    assert_eq!(s.allocated_bytes(), 0);
    s.allocate(B, 2 * B).unwrap();
    assert_eq!(s.len().unwrap(), 3 * B);
    assert_eq!(s.allocated_in(0, 3 * B), 2 * B);
    assert_eq!(s.to_vec(), vec![0u8; (3 * B) as usize]);
    let v: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    assert_eq!(MemStorage::from_vec(v.clone()).to_vec(), v);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let s = MemStorage::new();
    let mut b = [0u8; 4];
    assert_eq!(
        s.read_at(&mut b, u64::MAX).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        s.write_zeroes(u64::MAX - 1, 5, ZeroMode::Unmap)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        s.write_at(&b, 1 << 50).unwrap_err().raw_os_error(),
        Some(libc::EFBIG)
    );
    assert_eq!(
        s.discard(1 << 50, 1 << 20).unwrap(),
        DiscardOutcome::Released
    );
    let ro = MemStorage::with_options(MemOptions {
        read_only: true,
        ..MemOptions::file_like()
    });
    assert_eq!(
        ro.write_at(&b, 0).unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    assert!(ro.capabilities().read_only);
}

#[test]
fn data_run_reports_data_and_holes() {
    let s = MemStorage::new();
    s.write_at(&vec![1u8; 2 * B as usize], 4 * B).unwrap();
    // Before the data: a hole up to it.
    assert_eq!(s.data_run(0, 100 * B).unwrap(), (false, 4 * B));
    assert_eq!(s.data_run(B + 7, 100 * B).unwrap(), (false, 3 * B - 7));
    // Inside the data: data up to its end, capped by len.
    assert_eq!(s.data_run(4 * B, 100 * B).unwrap(), (true, 2 * B));
    assert_eq!(s.data_run(4 * B + 1, B).unwrap(), (true, B));
    // After it: a hole to the requested end.
    assert_eq!(s.data_run(6 * B, 1 << 40).unwrap(), (false, 1 << 40));
    s.discard(4 * B, B).unwrap();
    assert_eq!(s.data_run(4 * B, 100 * B).unwrap(), (false, B));
}
