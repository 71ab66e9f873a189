//! FileStorage on a loop block device: BLKGETSIZE64, BLKSSZGET, BLKDISCARD, BLKZEROOUT.
//! Skips (saying why) when no loop device can be created.

mod common;

use common::{allocated, pattern, LoopDevice, TempDir};
use host_io::{DiscardOutcome, FileOptions, FileStorage, Storage, ZeroMethod, ZeroMode};

const M: u64 = 1024 * 1024;
const SIZE: u64 = 64 * M;

fn read(s: &dyn Storage, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0xEEu8; len as usize];
    s.read_at(&mut v, off).unwrap();
    v
}

fn with_loop(tag: &str, f: impl FnOnce(&LoopDevice)) {
    let d = TempDir::new(tag);
    match LoopDevice::create(&d, SIZE) {
        Ok(dev) => f(&dev),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

#[test]
fn size_block_size_discard_and_zeroout() {
    with_loop("bdev", |lo| {
        let s = FileStorage::open(&lo.dev, &FileOptions::new()).unwrap();
        assert!(s.is_block_device());
        assert_eq!(s.len().unwrap(), SIZE, "BLKGETSIZE64");
        let caps = s.capabilities();
        assert!(caps.is_block_device && !caps.discard_reads_zero);
        assert_eq!(
            caps.logical_block_size, 512,
            "loop devices default to 512 (BLKSSZGET)"
        );
        assert_eq!(caps.io_alignment, 1);

        s.write_at(&pattern(0, (16 * M) as usize, 5), 0).unwrap();
        s.flush().unwrap();
        let full = allocated(&lo.backing);
        assert!(full >= 16 * M, "backing file holds the data: {full}");

        // BLKDISCARD: the loop driver punches the backing file.
        if caps.discard {
            assert!(caps.discard_granularity > 0);
            assert_eq!(s.discard(M, 2 * M).unwrap(), DiscardOutcome::Released);
            s.flush().unwrap();
            let after = allocated(&lo.backing);
            assert!(
                after <= full - 2 * M,
                "discard released nothing: {full} -> {after}"
            );
        } else {
            eprintln!("note: loop device reports no discard; BLKDISCARD not exercised");
            assert_eq!(s.discard(M, 2 * M).unwrap(), DiscardOutcome::Unsupported);
        }
        let base = allocated(&lo.backing);

        // BLKZEROOUT keeps the range allocated and reads zero.
        let m = s
            .write_zeroes(4 * M, 2 * M, ZeroMode::KeepAllocated)
            .unwrap();
        assert_eq!(m, ZeroMethod::BlkZeroOut);
        s.flush().unwrap();
        assert!(allocated(&lo.backing) >= base, "BLKZEROOUT released space");
        assert!(read(&s, 4 * M, 2 * M).iter().all(|&b| b == 0));
        assert_eq!(read(&s, 6 * M, 4096), pattern(6 * M, 4096, 5));

        // Unmap may release (unmapping zeroout) and must read zero either way.
        let m = s.write_zeroes(8 * M, 2 * M, ZeroMode::Unmap).unwrap();
        assert!(
            matches!(m, ZeroMethod::PunchHole | ZeroMethod::BlkZeroOut),
            "{m:?}"
        );
        eprintln!("loop device: {caps:?}; Unmap zeroing used {m:?}");
        assert!(read(&s, 8 * M, 2 * M).iter().all(|&b| b == 0));

        // Unaligned edges are written as zero buffers, neighbours intact.
        s.write_zeroes(12 * M + 100, 5000, ZeroMode::KeepAllocated)
            .unwrap();
        let v = read(&s, 12 * M, 8192);
        assert_eq!(&v[..100], &pattern(12 * M, 100, 5)[..]);
        assert!(v[100..5100].iter().all(|&b| b == 0));
        assert_eq!(&v[5100..], &pattern(12 * M + 5100, 8192 - 5100, 5)[..]);

        // Fixed size.
        s.set_len(SIZE).unwrap();
        assert_eq!(
            s.set_len(SIZE - 512).unwrap_err().kind(),
            std::io::ErrorKind::Unsupported
        );
        assert!(s.write_at(b"x", SIZE).is_err());
        assert_eq!(
            s.write_zeroes(SIZE - 512, 1024, ZeroMode::Unmap)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert!(read(&s, SIZE - 10, 100)[10..].iter().all(|&b| b == 0));
    });
}

#[test]
fn direct_mode_on_a_device_roundtrips_unaligned() {
    with_loop("bdev-direct", |lo| {
        let s = FileStorage::open(&lo.dev, &FileOptions::new().direct(true)).unwrap();
        let caps = s.capabilities();
        assert_eq!(caps.io_alignment, caps.logical_block_size);
        let data = pattern(777, 100_000, 8);
        s.write_at(&data, 777).unwrap();
        assert_eq!(read(&s, 777, 100_000), data);
        assert!(read(&s, 0, 777).iter().all(|&b| b == 0));
        assert_eq!(s.len().unwrap(), SIZE, "a device never changes size");
    });
}

#[test]
fn image_locks_on_a_device_node() {
    use host_io::{raw_os_error_of, LockRequest, LOCK_CONFLICT_ERRNO};
    with_loop("bdev-lock", |lo| {
        let w = FileOptions::new().lock(Some(LockRequest::WRITER));
        let a = FileStorage::open(&lo.dev, &w).unwrap();
        let e = FileStorage::open(&lo.dev, &w).unwrap_err();
        assert_eq!(raw_os_error_of(&e), Some(LOCK_CONFLICT_ERRNO), "{e}");
        // Formatting a device in use is refused too (create_new never truncates a device,
        // but it must not write a new image over one in use either).
        let e = FileStorage::open(&lo.dev, &FileOptions::create_new()).unwrap_err();
        assert_eq!(raw_os_error_of(&e), Some(LOCK_CONFLICT_ERRNO), "{e}");
        drop(a);
        let s = FileStorage::open(&lo.dev, &FileOptions::create_new()).unwrap();
        assert_eq!(s.len().unwrap(), SIZE, "a device is not truncated");
    });
}
