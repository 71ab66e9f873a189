//! CrashStorage: op log, flush barriers, and the image after a crash under each policy.

use std::collections::HashSet;

use host_io::{CrashPolicy, CrashStorage, MemOptions, OpKind, Storage, ZeroMode, TORN_SECTOR};

const INIT: u8 = 0x5A;

/// initial 16 KiB of INIT; ops:
/// 0 write A@0 (4K) | 1 flush | 2 write B@4K (4K) | 3 discard 12K+4K | 4 flush |
/// 5 write C@8K (4K) | 6 zero keep 0+1K | 7 write D@1000 (3000)
fn scenario() -> CrashStorage {
    let c = CrashStorage::new(vec![INIT; 16384]);
    c.write_at(&[b'A'; 4096], 0).unwrap();
    c.flush().unwrap();
    c.write_at(&[b'B'; 4096], 4096).unwrap();
    c.discard(12288, 4096).unwrap();
    c.flush().unwrap();
    c.write_at(&[b'C'; 4096], 8192).unwrap();
    c.write_zeroes(0, 1024, ZeroMode::KeepAllocated).unwrap();
    c.write_at(&[b'D'; 3000], 1000).unwrap();
    c
}

/// The image after applying the durable prefix (ops 0..=4) and then the chosen unflushed
/// ops among {5: C, 6: zero, 7: D (first `d_bytes` bytes)}.
fn expected(c: bool, zero: bool, d_bytes: usize) -> Vec<u8> {
    let mut v = vec![INIT; 16384];
    v[..4096].fill(b'A');
    v[4096..8192].fill(b'B');
    v[12288..].fill(0);
    if c {
        v[8192..12288].fill(b'C');
    }
    if zero {
        v[..1024].fill(0);
    }
    v[1000..1000 + d_bytes].fill(b'D');
    v
}

#[test]
fn op_log_lists_every_mutation_and_flush() {
    let c = scenario();
    assert_eq!(c.op_count(), 8);
    let ops = c.ops();
    let kinds: Vec<OpKind> = ops.iter().map(|o| o.kind).collect();
    use OpKind::*;
    assert_eq!(
        kinds,
        [
            Write,
            Flush,
            Write,
            Discard,
            Flush,
            Write,
            WriteZeroes,
            Write
        ]
    );
    assert_eq!((ops[3].offset, ops[3].len), (12288, 4096));
    assert_eq!((ops[7].offset, ops[7].len), (1000, 3000));
    assert!(ops.iter().enumerate().all(|(i, o)| o.seq == i as u64));
    // Reads are not recorded; the live image has everything.
    let mut b = [0u8; 4];
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(c.op_count(), 8);
    assert_eq!(c.live().to_vec(), expected(true, true, 3000));
}

#[test]
fn drop_and_keep_policies_respect_barriers() {
    let c = scenario();
    let drop = CrashPolicy::DropUnflushed;
    let keep = CrashPolicy::KeepUnflushed;
    assert_eq!(c.crash_bytes(0, drop).unwrap(), vec![INIT; 16384]);
    // Before the first flush: the first write may or may not be there.
    assert_eq!(c.crash_bytes(1, drop).unwrap(), vec![INIT; 16384]);
    let mut a = vec![INIT; 16384];
    a[..4096].fill(b'A');
    assert_eq!(c.crash_bytes(1, keep).unwrap(), a);
    // Just after the first flush, the first write is durable even when dropping.
    assert_eq!(c.crash_bytes(2, drop).unwrap(), a);
    // Crash at the end.
    assert_eq!(c.crash_bytes(8, drop).unwrap(), expected(false, false, 0));
    assert_eq!(c.crash_bytes(8, keep).unwrap(), expected(true, true, 3000));
    assert_eq!(c.crash_bytes(7, keep).unwrap(), expected(true, true, 0));
    // The discarded range of a file-like image reads zero after replay.
    assert!(c.crash_bytes(5, drop).unwrap()[12288..]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        c.crash_image(9, drop).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
}

#[test]
fn random_subset_is_a_seeded_subset() {
    let c = scenario();
    let mut all = HashSet::new();
    for c_ in [false, true] {
        for z in [false, true] {
            for d in [false, true] {
                all.insert(expected(c_, z, if d { 3000 } else { 0 }));
            }
        }
    }
    let mut seen = HashSet::new();
    for seed in 0..64 {
        let img = c
            .crash_bytes(8, CrashPolicy::RandomSubset { seed })
            .unwrap();
        assert!(
            all.contains(&img),
            "seed {seed} produced an impossible image"
        );
        assert_eq!(
            img,
            c.crash_bytes(8, CrashPolicy::RandomSubset { seed })
                .unwrap(),
            "seed {seed} not reproducible"
        );
        seen.insert(img);
    }
    assert!(
        seen.len() >= 6,
        "only {} of 8 subsets in 64 seeds",
        seen.len()
    );
}

#[test]
fn torn_write_applies_a_sector_prefix() {
    let c = scenario();
    let mut prefixes = HashSet::new();
    for seed in 0..64 {
        let img = c
            .crash_bytes(8, CrashPolicy::TornLastWrite { seed })
            .unwrap();
        // Everything else unflushed was applied; D is cut at a sector boundary.
        let d = img[1000..4000].iter().take_while(|&&b| b == b'D').count();
        assert_eq!(img, expected(true, true, d), "seed {seed}");
        assert!(d < 3000, "a torn write is never complete");
        assert!(d == 0 || (1000 + d as u64) % TORN_SECTOR == 0, "cut at {d}");
        prefixes.insert(d);
    }
    // Cuts possible: 0, 24 (at 1024), 536, 1048, 1560, 2072, 2584.
    assert!(prefixes.len() >= 5, "{prefixes:?}");
    // With no unflushed write, tearing changes nothing.
    assert_eq!(
        c.crash_bytes(5, CrashPolicy::TornLastWrite { seed: 1 })
            .unwrap(),
        expected(false, false, 0)
    );
}

#[test]
fn device_like_images_and_set_len_replay() {
    let c = CrashStorage::with_options(vec![1; 8192], MemOptions::device_like());
    c.discard(0, 4096).unwrap();
    c.flush().unwrap();
    assert_eq!(
        c.set_len(100).unwrap_err().kind(),
        std::io::ErrorKind::Unsupported
    );
    assert_eq!(c.op_count(), 2, "failed ops are not recorded");
    let img = c.crash_image(2, CrashPolicy::DropUnflushed).unwrap();
    assert!(!img.capabilities().discard_reads_zero);
    assert_eq!(img.allocated_in(0, 4096), 0);

    let f = CrashStorage::new(vec![7; 8192]);
    f.set_len(100).unwrap();
    f.flush().unwrap();
    f.set_len(50_000).unwrap();
    f.allocate(60_000, 4096).unwrap();
    assert_eq!(f.ops()[0].offset, 100);
    let img = f.crash_image(4, CrashPolicy::DropUnflushed).unwrap();
    assert_eq!(img.len().unwrap(), 100);
    let img = f.crash_image(4, CrashPolicy::KeepUnflushed).unwrap();
    assert_eq!(img.len().unwrap(), 64_096);
    assert_eq!(img.allocated_in(60_000, 4096), 8192);
}
