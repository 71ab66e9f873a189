//! What the five provisioning modes do to real files. For each mode and each release
//! request (discard, write-zeroes with may-unmap, write-zeroes without), on an image whose
//! clusters hold data, the test looks at both layers of the two target clusters:
//!
//! * qcow2 layer (block status, refcount read from the file): `full` leaves a discarded
//!   cluster as it was, `anchor` makes it zero but keeps its host cluster (zero-allocated,
//!   refcount 1), `unmap` frees it (no host offset, refcount 0);
//! * host layer (the old host range of the clusters): `full` leaves the old bytes there,
//!   `anchor` zeroes them and keeps the space allocated (`st_blocks` does not drop),
//!   `unmap` punches a hole (SEEK_DATA finds no data, `st_blocks` drops) — asserted only
//!   where the filesystem supports holes, probed first.
//!
//! The table, as the README states it (qcow2 / host): off = full/full, full =
//! anchor/anchor, metadata = anchor/unmap, thin = unmap/unmap, reuse = unmap/full.
//! A write-zeroes request must always read back zero, so `full` at the qcow2 layer means
//! "zero, keep allocated" for it; without may-unmap nothing may be released, so an `unmap`
//! host layer anchors instead (the engine's rule that stale data does not linger where the
//! host layer is not `full`).
//!
//! Also here: re-discarding an already zero-allocated cluster under an anchoring policy
//! still releases (or anchors) its stale host data, and freed clusters whose host discard is
//! pending never swallow data written right after the discard.

mod support;

use std::path::{Path, PathBuf};

use qcow2_engine::{create, CreateOptions, Image, Layer, OpenOptions, Provision};
use support::prov::*;
use support::*;

const CS: u64 = 65536;
const SIZE: u64 = 1 << 20;
/// Clusters written with data before the request.
const WRITTEN: u64 = 6;
/// The request covers clusters 2 and 3.
const TARGET: u64 = 2;
const TARGET_N: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Discard,
    ZeroUnmap,
    ZeroKeep,
}

/// What the qcow2 layer should show for a target cluster afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qcow2 {
    /// Data and host cluster as before.
    Unchanged,
    /// Reads zero, host cluster kept (refcount 1).
    ZeroAlloc,
    /// Reads zero, no host cluster (refcount 0).
    Freed,
}

/// What the host range of a target cluster should hold afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    /// The old bytes.
    Unchanged,
    /// Zeros, space still allocated.
    Anchored,
    /// A hole.
    Released,
}

fn provision(mode: &str) -> Provision {
    match mode {
        "off" => Provision::Off,
        "full" => Provision::Full,
        "metadata" => Provision::Metadata,
        "thin" => Provision::Thin,
        "reuse" => Provision::Reuse,
        _ => unreachable!("{mode}"),
    }
}

fn host_of(layer: Layer) -> Host {
    match layer {
        Layer::Full => Host::Unchanged,
        Layer::Anchor => Host::Anchored,
        Layer::Unmap => Host::Released,
    }
}

/// The expected effect of `op` under `mode`, from the mode's two layers.
fn expected(mode: &str, op: Op) -> (Qcow2, Host) {
    let (q, h) = provision(mode).layers();
    match op {
        Op::Discard => match q {
            Layer::Full => (Qcow2::Unchanged, Host::Unchanged),
            Layer::Anchor => (Qcow2::ZeroAlloc, host_of(h)),
            Layer::Unmap => (Qcow2::Freed, host_of(h)),
        },
        Op::ZeroUnmap => match q {
            Layer::Full | Layer::Anchor => (Qcow2::ZeroAlloc, host_of(h)),
            Layer::Unmap => (Qcow2::Freed, host_of(h)),
        },
        // Not a release: nothing is freed or punched; stale data is anchored where the
        // host layer is not `full`.
        Op::ZeroKeep => (
            Qcow2::ZeroAlloc,
            if h == Layer::Full {
                Host::Unchanged
            } else {
                Host::Anchored
            },
        ),
    }
}

fn pattern(cluster: u64) -> u8 {
    0x40 + cluster as u8
}

/// Engine-created image of `SIZE` with clusters `0..WRITTEN` holding `pattern(i)`.
fn prepared(dir: &TempDir, name: &str, open: &str) -> (PathBuf, Image) {
    let p = dir.path(name);
    create(
        &p,
        &CreateOptions {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open(&p, &OpenOptions::parse(open).unwrap()).unwrap();
    for c in 0..WRITTEN {
        img.write_at(&vec![pattern(c); CS as usize], c * CS)
            .unwrap();
    }
    img.flush().unwrap();
    (p, img)
}

/// Host offset of guest cluster `c` (it must have one).
fn host_cluster(img: &Image, c: u64) -> u64 {
    img.block_status(c * CS, CS)
        .unwrap()
        .host_offset
        .unwrap_or_else(|| panic!("cluster {c} has no host offset"))
}

fn run_op(img: &Image, op: Op, off: u64, len: u64) {
    match op {
        Op::Discard => img.discard(off, len),
        Op::ZeroUnmap => img.write_zeroes(off, len, true),
        Op::ZeroKeep => img.write_zeroes(off, len, false),
    }
    .unwrap_or_else(|e| panic!("{op:?} {off:#x}+{len:#x}: {e}"));
}

/// Assert the host effect `want` on `[host, host+CS)` of `p`: its bytes, and for a release
/// a hole (only where `holes` says the filesystem has them). The bytes are read first, on
/// purpose: a punched range stays a hole for SEEK_DATA whatever the page cache holds,
/// while an anchored (ZERO_RANGE, unwritten) range that was just read counts as data on
/// ext4, so an anchor cannot pass for a release. The caller checks `st_blocks` as well.
fn assert_host(p: &Path, host: u64, old: u8, want: Host, holes: &Result<(), String>, what: &str) {
    let bytes = host_bytes(p, host, CS);
    match want {
        Host::Unchanged => assert!(
            bytes.iter().all(|&b| b == old),
            "{what}: host range {host:#x} must still hold the old data {old:#x}"
        ),
        Host::Anchored | Host::Released => {
            if let Some(i) = bytes.iter().position(|&b| b != 0) {
                panic!(
                    "{what}: host range {host:#x} must read zero ({want:?}), byte {i:#x} is {:#x}",
                    bytes[i]
                );
            }
        }
    }
    if want == Host::Released && holes.is_ok() {
        assert!(
            host_is_hole(p, host, CS),
            "{what}: host range {host:#x} must be a hole (released), not merely read zero"
        );
    }
}

fn check_case(mode: &str, op: Op, holes: &Result<(), String>) {
    let what = format!("provision={mode} {op:?}");
    let (want_q, want_h) = expected(mode, op);
    let dir = TempDir::new("prov-host");
    let (p, img) = prepared(&dir, "i.qcow2", &format!("provision={mode}"));
    let hosts: Vec<u64> = (0..WRITTEN).map(|c| host_cluster(&img, c)).collect();
    let before = allocated_bytes(&p);
    run_op(&img, op, TARGET * CS, TARGET_N * CS);
    img.flush().unwrap();
    let after = allocated_bytes(&p);

    // qcow2 layer, through the engine.
    for c in 0..WRITTEN {
        let st = img.block_status(c * CS, CS).unwrap();
        let target = (TARGET..TARGET + TARGET_N).contains(&c);
        let q = if target { want_q } else { Qcow2::Unchanged };
        let mut buf = vec![0u8; CS as usize];
        img.read_at(&mut buf, c * CS).unwrap();
        let expect_byte = if q == Qcow2::Unchanged { pattern(c) } else { 0 };
        assert!(
            buf.iter().all(|&b| b == expect_byte),
            "{what}: guest cluster {c} must read {expect_byte:#x}"
        );
        assert_eq!(st.len, CS, "{what}: cluster {c} status length");
        match q {
            Qcow2::Unchanged => assert!(
                st.data && !st.zero && st.host_offset == Some(hosts[c as usize]),
                "{what}: cluster {c} must keep its data at {:#x}: {st:?}",
                hosts[c as usize]
            ),
            Qcow2::ZeroAlloc => assert!(
                st.zero && !st.data && st.present && st.host_offset == Some(hosts[c as usize]),
                "{what}: cluster {c} must be zero with its host cluster {:#x} kept: {st:?}",
                hosts[c as usize]
            ),
            Qcow2::Freed => assert!(
                st.zero && !st.data && st.host_offset.is_none(),
                "{what}: cluster {c} must be zero without a host cluster: {st:?}"
            ),
        }
    }

    // Host layer, through the file.
    for c in TARGET..TARGET + TARGET_N {
        assert_host(&p, hosts[c as usize], pattern(c), want_h, holes, &what);
    }
    match want_h {
        Host::Released if holes.is_ok() => assert!(
            after + TARGET_N * CS <= before,
            "{what}: releasing {} clusters must shrink the allocation ({before} -> {after})",
            TARGET_N
        ),
        Host::Anchored | Host::Unchanged => assert!(
            after >= before,
            "{what}: the host range must stay allocated ({before} -> {after} bytes)"
        ),
        Host::Released => {}
    }
    img.close().unwrap();

    // Refcounts and consistency, through the file and qemu-img.
    for c in TARGET..TARGET + TARGET_N {
        let rc = refcount_of(&p, hosts[c as usize]);
        let want_rc = if want_q == Qcow2::Freed { 0 } else { 1 };
        assert_eq!(
            rc, want_rc,
            "{what}: refcount of cluster {c}'s host cluster"
        );
    }
    assert_check_clean(&p);
    let cmds: Vec<String> = (0..WRITTEN)
        .map(|c| {
            let byte = if (TARGET..TARGET + TARGET_N).contains(&c) && want_q != Qcow2::Unchanged {
                0
            } else {
                pattern(c)
            };
            format!("read -P {byte} {} {CS}", c * CS)
        })
        .collect();
    qemu_io(&[], &p, &cmds);
}

fn holes_or_note(dir: &TempDir) -> Result<(), String> {
    let r = probe_holes(&dir.0);
    if let Err(why) = &r {
        eprintln!("NOTE: host holes are not asserted on this filesystem: {why}");
    }
    r
}

/// Every mode for `op`; all modes run, the failures are reported together.
fn run_all(op: Op) {
    let dir = TempDir::new("prov-probe");
    let holes = holes_or_note(&dir);
    let failures: Vec<String> = MODES
        .iter()
        .filter_map(|mode| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_case(mode, op, &holes)
            }))
            .err()
            .map(|e| panic_text(&*e))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn discard_in_every_mode() {
    run_all(Op::Discard);
}

#[test]
fn write_zeroes_may_unmap_in_every_mode() {
    run_all(Op::ZeroUnmap);
}

#[test]
fn write_zeroes_without_unmap_in_every_mode() {
    run_all(Op::ZeroKeep);
}

/// The expectation table itself, so that a change to the modes shows up here first.
#[test]
fn expectation_table_matches_the_readme() {
    use Host as H;
    use Qcow2 as Q;
    let rows = [
        (
            "off",
            (Q::Unchanged, H::Unchanged),
            (Q::ZeroAlloc, H::Unchanged),
        ),
        (
            "full",
            (Q::ZeroAlloc, H::Anchored),
            (Q::ZeroAlloc, H::Anchored),
        ),
        (
            "metadata",
            (Q::ZeroAlloc, H::Released),
            (Q::ZeroAlloc, H::Released),
        ),
        ("thin", (Q::Freed, H::Released), (Q::Freed, H::Released)),
        ("reuse", (Q::Freed, H::Unchanged), (Q::Freed, H::Unchanged)),
    ];
    for (mode, discard, zero_unmap) in rows {
        assert_eq!(expected(mode, Op::Discard), discard, "{mode} discard");
        assert_eq!(
            expected(mode, Op::ZeroUnmap),
            zero_unmap,
            "{mode} write -z -u"
        );
    }
    let opts = OpenOptions::parse("provision=thin").unwrap();
    assert_eq!(opts.discard.provision, Some(Provision::Thin));
}

/// A cluster already zero-allocated with its old data still on the host (QEMU-style
/// write-zeroes without may-unmap leaves it there): a discard under an anchoring policy
/// releases (or anchors) that stale range when the cluster is owned alone, although the
/// L2 entry does not change (QEMU skips it and leaves the data).
#[test]
fn rediscard_of_zero_alloc_cluster_releases_stale_host_data() {
    let probe = TempDir::new("prov-probe");
    let holes = holes_or_note(&probe);
    let cases = [
        ("provision=metadata", Op::Discard, Host::Released),
        ("provision=full", Op::Discard, Host::Anchored),
        (
            "discard=unmap,discard-no-unref=on",
            Op::Discard,
            Host::Released,
        ),
        ("provision=full", Op::ZeroUnmap, Host::Anchored),
        (
            "discard=unmap,discard-no-unref=on",
            Op::ZeroUnmap,
            Host::Released,
        ),
    ];
    for (opts, op, want) in cases {
        let what = format!("[{opts}] {op:?} of a zero-allocated cluster");
        let dir = TempDir::new("prov-rediscard");
        let (p, img) = prepared(&dir, "r.qcow2", "discard=unmap,discard-no-unref=on");
        let h = host_cluster(&img, TARGET);
        // Zero without may-unmap: zero-allocated, QEMU-style no host I/O.
        img.write_zeroes(TARGET * CS, CS, false).unwrap();
        img.flush().unwrap();
        let st = img.block_status(TARGET * CS, CS).unwrap();
        assert!(
            st.zero && st.host_offset == Some(h),
            "{what}: setup: {st:?}"
        );
        assert!(
            host_bytes(&p, h, CS).iter().all(|&b| b == pattern(TARGET)),
            "{what}: setup: the old data must still be on the host (QEMU-style write -z)"
        );
        img.set_options(opts).unwrap();
        let before = allocated_bytes(&p);
        run_op(&img, op, TARGET * CS, CS);
        img.flush().unwrap();
        let after = allocated_bytes(&p);
        let st = img.block_status(TARGET * CS, CS).unwrap();
        assert!(
            st.zero && !st.data && st.host_offset == Some(h),
            "{what}: the cluster stays zero-allocated: {st:?}"
        );
        assert_host(&p, h, pattern(TARGET), want, &holes, &what);
        if want == Host::Anchored {
            assert!(after >= before, "{what}: must stay allocated");
        }
        img.close().unwrap();
        assert_eq!(refcount_of(&p, h), 1, "{what}: refcount");
        assert_check_clean(&p);
        qemu_io(&[], &p, &[format!("read -P 0 {} {CS}", TARGET * CS)]);
    }
}

/// thin: discard frees a cluster and queues its punch; the next allocating write takes the
/// same host cluster (first fit). The punch must not land on the new data.
#[test]
fn allocating_write_after_thin_discard_keeps_new_data() {
    let dir = TempDir::new("prov-reuse-write");
    // Immediate reuse (no quarantine slack): the scenario needs the freed cluster reused.
    let (p, img) = prepared(&dir, "t.qcow2", "provision=thin,quarantine-slack=0");
    let freed = host_cluster(&img, 1);
    img.discard(CS, CS).unwrap();
    // Clusters 8 and 9 were never written: this allocates, and fills the hole first.
    img.write_at(&vec![0xc8u8; (CS + 4096) as usize], 8 * CS)
        .unwrap();
    let reused = host_cluster(&img, 8);
    assert_eq!(
        reused, freed,
        "setup: the allocator must reuse the freed host cluster (first fit), else this \
         scenario tests nothing"
    );
    img.discard(3 * CS, CS).unwrap();
    img.write_at(&[0xd3u8; 512], 3 * CS + 512).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    assert_check_clean(&p);
    qemu_io(
        &[],
        &p,
        &[
            format!("read -P {} 0 {CS}", pattern(0)),
            format!("read -P 0 {CS} {CS}"),
            format!("read -P {} {} {CS}", pattern(2), 2 * CS),
            format!("read -P 0 {} 512", 3 * CS),
            format!("read -P 0xd3 {} 512", 3 * CS + 512),
            format!("read -P 0 {} {}", 3 * CS + 1024, CS - 1024),
            format!("read -P 0xc8 {} {}", 8 * CS, CS + 4096),
            format!("read -P 0 {} {}", 9 * CS + 4096, CS - 4096),
        ],
    );
}

/// thin, 4 KiB clusters: freed data clusters are reused for a new L2 table (metadata takes
/// the lowest free run). A late punch there would erase the table.
#[test]
fn new_l2_table_after_thin_discard_survives() {
    let dir = TempDir::new("prov-reuse-l2");
    let p = dir.path("l2.qcow2");
    let size = 8u64 << 20;
    create(
        &p,
        &CreateOptions {
            size: Some(size),
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open(
        &p,
        &OpenOptions::parse("provision=thin,quarantine-slack=0").unwrap(),
    )
    .unwrap();
    img.write_at(&vec![0x61u8; 64 << 10], 0).unwrap();
    img.flush().unwrap();
    let freed: Vec<u64> = (0..4)
        .map(|i| {
            img.block_status(i * 4096, 4096)
                .unwrap()
                .host_offset
                .unwrap()
        })
        .collect();
    img.discard(0, 16 << 10).unwrap();
    // 4 KiB clusters: one L2 table maps 2 MiB, so 6 MiB needs a new table.
    img.write_at(&vec![0x62u8; 8192], 6 << 20).unwrap();
    let new_host = img
        .block_status(6 << 20, 4096)
        .unwrap()
        .host_offset
        .unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    // The new L2 table or the new data went into a freed cluster (lowest free first).
    let l1 = file_be64(&p, 40);
    let l2_of_6m = file_be64(&p, l1 + 8 * 3) & 0x00ff_ffff_ffff_fe00;
    assert!(
        freed.contains(&l2_of_6m) || freed.contains(&new_host),
        "setup: expected a freed cluster {freed:x?} to be reused (L2 {l2_of_6m:#x}, data \
         {new_host:#x})"
    );
    assert_check_clean(&p);
    qemu_io(
        &[],
        &p,
        &[
            "read -P 0 0 16k".into(),
            "read -P 0x61 16k 48k".into(),
            format!("read -P 0x62 {} 8192", 6 << 20),
        ],
    );
}

/// thin over a backing file: one write-zeroes frees whole clusters (punches queued) and
/// then writes zero bytes into a partial cluster the backing file shows through, which
/// allocates. The allocation must not take a cluster whose punch is still pending.
#[test]
fn write_zeroes_tail_allocation_after_freed_body_keeps_data() {
    let dir = TempDir::new("prov-zero-tail");
    let base = dir.path("base.raw");
    std::fs::write(&base, vec![0xbbu8; SIZE as usize]).unwrap();
    let p = dir.path("o.qcow2");
    create(
        &p,
        &CreateOptions {
            size: Some(SIZE),
            backing_file: Some("base.raw".into()),
            backing_fmt: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let img = Image::open(
        &p,
        &OpenOptions::parse("provision=thin,quarantine-slack=0").unwrap(),
    )
    .unwrap();
    img.write_at(&vec![0xccu8; (3 * CS) as usize], 0).unwrap();
    img.flush().unwrap();
    let freed = host_cluster(&img, 0);
    // Body: clusters 0..3 freed; tail: 4 KiB of cluster 3 (backing data) as zero bytes.
    img.write_zeroes(0, 3 * CS + 4096, true).unwrap();
    let tail = host_cluster(&img, 3);
    assert!(
        (freed..freed + 3 * CS).contains(&tail),
        "setup: the tail allocation should reuse a freed cluster (got {tail:#x}, freed from \
         {freed:#x})"
    );
    img.flush().unwrap();
    let mut buf = vec![0u8; CS as usize];
    img.read_at(&mut buf, 3 * CS).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0xbb));
    img.close().unwrap();
    assert_check_clean(&p);
    qemu_io(
        &[],
        &p,
        &[
            format!("read -P 0 0 {}", 3 * CS + 4096),
            format!("read -P 0xbb {} {}", 3 * CS + 4096, SIZE - 3 * CS - 4096),
        ],
    );
}
