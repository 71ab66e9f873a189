//! `qcowprov_get_stats` through the C ABI on real files: what each discard policy sends
//! to the host, flushes counted, bad arguments refused with the out-struct untouched, and
//! larger (newer) structs accepted.

mod support;

use std::ptr::null_mut;

use qcowprov::*;
use support::*;

const MIB: u64 = 1 << 20;
const EINVAL: i32 = -libc::EINVAL;

fn stats(img: *mut QcowprovImage) -> QcowprovStats {
    let mut s = QcowprovStats::default();
    // SAFETY: live handle; a whole struct with struct_size set.
    let r = unsafe { qcowprov_get_stats(img, &mut s) };
    assert_eq!(r, 0, "get_stats: {}", last_error());
    assert_eq!(s.struct_size as usize, std::mem::size_of::<QcowprovStats>());
    s
}

fn flush(img: *mut QcowprovImage) {
    // SAFETY: live handle.
    assert_eq!(unsafe { qcowprov_flush(img) }, 0, "{}", last_error());
}

/// Discarding 1 MiB of data (16 clusters, adjacent on the host: one merged request)
/// under each policy: (options, host discards, host write-zeroes) it issues.
#[test]
fn each_policy_sends_what_its_host_layer_says() {
    let dir = TempDir::new("stats");
    for (i, (opts, discards, zeroes)) in [
        ("provision=off", 0, 0),
        ("provision=full", 0, 1),
        ("provision=metadata", 1, 0),
        ("provision=thin", 1, 0),
        ("provision=reuse", 0, 0),
        ("discard=unmap", 1, 0),
        ("discard=unmap,discard-no-unref=on", 1, 0),
        (
            "discard=unmap,discard-no-unref=on,pass-discard-request=off",
            0,
            0,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path(&format!("{i}.qcow2"));
        assert_eq!(create(&path, "", 4 * MIB), 0, "{}", last_error());
        let img = open(&path, opts, 0).expect("open");
        let fresh = stats(img);
        assert_eq!(fresh.host_flushes, 0, "{opts}: fresh handle: {fresh:?}");
        assert!(fresh.allocation_end > 0, "{opts}: {fresh:?}");
        assert_eq!(pwrite(img, &pattern(MIB as usize, 0, 1), 0, 0), MIB as i64);
        flush(img);
        let s0 = stats(img);
        assert!(s0.host_flushes >= 1, "{opts}: {s0:?}");
        // SAFETY: live handle.
        let r = unsafe { qcowprov_discard(img, 0, MIB) };
        assert_eq!(r, 0, "{}", last_error());
        flush(img);
        let s1 = stats(img);
        assert_eq!(
            s1.host_discards - s0.host_discards,
            discards,
            "{opts}: {s1:?}"
        );
        assert_eq!(s1.host_zeroes - s0.host_zeroes, zeroes, "{opts}: {s1:?}");
        assert_eq!(s1.host_op_failures, 0, "{opts}: {s1:?}");
        assert_eq!(
            s1.quarantined, 0,
            "{opts}: a flush releases the quarantine: {s1:?}"
        );
        // A discard the policy ignores changes nothing, so the flush after it has
        // nothing to make durable and skips the host flush, as QEMU's does; every other
        // policy's discard edits metadata that its flush syncs.
        if opts == "provision=off" {
            assert_eq!(s1.host_flushes, s0.host_flushes, "{opts}: {s1:?}");
        } else {
            assert!(s1.host_flushes > s0.host_flushes, "{opts}: {s1:?}");
        }
        // A flush with nothing pending issues no host flush.
        flush(img);
        assert_eq!(stats(img).host_flushes, s1.host_flushes, "{opts}");
        assert_eq!(close(img), 0);
        let (code, out) = qemu_img_check(&path);
        assert_eq!(code, 0, "{opts}: {out}");
    }
}

#[test]
fn a_read_only_handle_counts_nothing() {
    let dir = TempDir::new("stats-ro");
    let path = dir.path("a.qcow2");
    assert_eq!(create(&path, "", 4 * MIB), 0);
    let img = open(&path, "", QCOWPROV_OPEN_RDONLY).expect("open");
    assert_eq!(pread(img, 4096, 0).map(|b| b.len()), Ok(4096));
    let s = stats(img);
    assert_eq!((s.host_flushes, s.quarantined), (0, 0), "{s:?}");
    assert_eq!(close(img), 0);
}

#[test]
fn bad_arguments_leave_the_struct_alone() {
    let dir = TempDir::new("stats-bad");
    let path = dir.path("a.qcow2");
    assert_eq!(create(&path, "", 4 * MIB), 0);
    let img = open(&path, "", 0).expect("open");
    let sentinel = QcowprovStats {
        struct_size: 47,
        _reserved: 7,
        host_flushes: 7,
        host_discards: 7,
        host_zeroes: 7,
        host_op_failures: 7,
        quarantine_releases: 7,
        quarantined: 7,
        allocation_end: 7,
    };
    let mut s = sentinel;
    // SAFETY: (all calls) NULL where the test says so, else a live handle and a whole
    // struct.
    unsafe {
        assert_eq!(qcowprov_get_stats(img, &mut s), EINVAL);
        assert!(
            last_error().contains("stats->struct_size"),
            "{}",
            last_error()
        );
        assert_eq!(s, sentinel);
        assert_eq!(qcowprov_get_stats(img, null_mut()), EINVAL);
        let mut s = QcowprovStats::default();
        assert_eq!(qcowprov_get_stats(null_mut(), &mut s), EINVAL);
        assert!(last_error().contains("img"), "{}", last_error());
    }
    assert_eq!(close(img), 0);
}

/// A caller compiled against a newer, larger struct: accepted, its tail left alone.
#[test]
fn a_larger_struct_is_accepted() {
    #[repr(C)]
    struct Newer {
        s: QcowprovStats,
        tail: [u8; 24],
    }
    let dir = TempDir::new("stats-newer");
    let path = dir.path("a.qcow2");
    assert_eq!(create(&path, "", 4 * MIB), 0);
    let img = open(&path, "", 0).expect("open");
    assert_eq!(pwrite(img, &[7u8; 512], 0, 0), 512);
    flush(img);
    let mut n = Newer {
        s: QcowprovStats {
            struct_size: std::mem::size_of::<Newer>() as u32,
            ..Default::default()
        },
        tail: [0xab; 24],
    };
    // SAFETY: live handle; the struct is as large as its struct_size says.
    assert_eq!(unsafe { qcowprov_get_stats(img, &mut n.s) }, 0);
    assert_eq!(n.s.struct_size as usize, std::mem::size_of::<Newer>());
    // Every field of the known part is written (a write and its flush synced something);
    // the tail the library does not know stays as the caller left it.
    assert!(n.s.host_flushes >= 1, "{:?}", n.s);
    assert!(n.s.allocation_end > 0, "{:?}", n.s);
    assert_eq!(n.tail, [0xab; 24]);
    assert_eq!(close(img), 0);
}
