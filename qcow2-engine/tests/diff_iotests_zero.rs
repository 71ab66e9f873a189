//! Write-zeroes, discard and copy-on-write with QEMU-style options, compared with qemu-io
//! on twin images, following cases of QEMU's own regression suite (our own scenarios,
//! written from what each case does; qemu-io and qemu-img live as the oracle):
//! - 033 "unaligned requests" -> `iotest_033_unaligned_writes_and_zeroes` (and the file
//!   length after a first 512-byte write: a whole new cluster, the file ends on a
//!   cluster boundary, as QEMU's)
//! - 034 "copy-on-write over a backing file, unaligned" -> `iotest_034_cow_over_backing`
//! - 066 "discarding preallocated zero clusters" -> `iotest_066_discard_prealloc_zero`
//! - 154 "write-zeroes with a backing file" (head/tail partial clusters over backing
//!   data and over unallocated ranges, base and overlay of one cluster size)
//!   -> `iotest_154_zeroes_over_backing`; 154's own sections (a base of smaller clusters,
//!   unaligned image tails, shorter backing files, raw entries compared) and resize are in
//!   `diff_iotests_154.rs`
//! - 179 "write zeroes with unmap" (every step, base and overlay) -> `iotest_179_*`
//! - 290 "discard on v2 and v3, with and without a backing file" -> `iotest_290_discard`
//! - tests/write-zeroes-unmap (a raw image under qemu-system's monitor there; here its
//!   qcow2 analogue through qemu-io): write-zeroes with and without unmap and zero-byte
//!   writes under QEMU's defaults, `discard=off`, `discard=on`, `detect-zeroes=on` and
//!   both, over written data -> `write_zeroes_unmap_host_usage` (same entries and the same
//!   host usage)
//!
//! After each step both twins are compared: every active L2 entry's kind and COPIED flag,
//! `qemu-img compare` (guest content, backing included), `qemu-img map --output=json`
//! (offsets reduced to present/absent), and `qemu-img check` clean on both.
//! Not covered: 179's "cache optimization" part (blkdebug error injection on L2 updates).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_engine::{Image, OpenOptions};
use support::ops::Op;
use support::prov::*;
use support::*;

/// qemu-io's defaults, as the iotests run it: guest discards reach the qcow2 layer
/// (`discard=unmap`; `discard=ignore` would drop them).
const QEMU_DEFAULT: &str = "discard=unmap";

/// Twin images (and, with a base, twin backing files: each overlay has its own).
struct Twins {
    _dir: TempDir,
    q: PathBuf,
    o: PathBuf,
    qb: Option<PathBuf>,
    ob: Option<PathBuf>,
}

fn create(p: &Path, opts: &str, size: &str, backing: Option<&Path>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    let b;
    if let Some(bp) = backing {
        b = bp.file_name().unwrap().to_str().unwrap().to_string();
        args.extend_from_slice(&["-F", "qcow2", "-b", &b]);
    }
    args.extend_from_slice(&[p.to_str().unwrap(), size]);
    qemu_img(&args);
}

fn twins(tag: &str, opts: &str, size: &str, with_base: bool) -> Twins {
    let d = TempDir::new(tag);
    let (qb, ob) = if with_base {
        let (qb, ob) = (d.path("qb.qcow2"), d.path("ob.qcow2"));
        // The base has the overlay's cluster size here; bases of smaller clusters (154's
        // setup, where one overlay cluster spans base data and unallocated base clusters)
        // are in `diff_iotests_154.rs`.
        create(&qb, opts, size, None);
        create(&ob, opts, size, None);
        (Some(qb), Some(ob))
    } else {
        (None, None)
    };
    let (q, o) = (d.path("q.qcow2"), d.path("o.qcow2"));
    create(&q, opts, size, qb.as_deref());
    create(&o, opts, size, ob.as_deref());
    Twins {
        _dir: d,
        q,
        o,
        qb,
        ob,
    }
}

/// qemu-io on `p` with QEMU's default options; every request must succeed.
fn qemu_run(p: &Path, ops: &[Op]) {
    qemu_run_with(p, QEMU_DEFAULT, ops)
}

/// qemu-io on `p` with runtime options `opts`; every request must succeed.
fn qemu_run_with(p: &Path, opts: &str, ops: &[Op]) {
    let spec = format!("driver=qcow2,file.filename={},{opts}", p.display());
    let mut c = Command::new("qemu-io");
    c.args(["--image-opts", &spec]);
    for op in ops {
        c.args(["-c", &op.qemu()]);
    }
    let out = c.output().expect("qemu-io (install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {ops:?} on {}: {text}",
        p.display()
    );
}

/// The engine on `p` with the same options, one open for the steps (as one qemu-io
/// run); returns each request's result.
fn engine_run(p: &Path, ops: &[Op]) -> Vec<bool> {
    engine_run_with(p, QEMU_DEFAULT, ops)
}

/// The engine on `p` with runtime options `opts`.
fn engine_run_with(p: &Path, opts: &str, ops: &[Op]) -> Vec<bool> {
    let img = Image::open(p, &OpenOptions::parse(opts).unwrap()).expect("open");
    let r = ops.iter().map(|op| op.engine(&img).is_ok()).collect();
    img.close().expect("close");
    r
}

/// Both twins (or both bases) run `ops`; every request must succeed on ours too.
fn step(q: &Path, o: &Path, ops: &[Op]) {
    qemu_run(q, ops);
    let ok = engine_run(o, ops);
    assert!(
        ok.iter().all(|&b| b),
        "engine failed one of {ops:?}: {ok:?}"
    );
}

/// Every L2 entry of the active tree: (kind letter, COPIED) per guest cluster.
fn entries(p: &Path) -> Vec<(char, bool)> {
    let cs = 1u64 << file_be32(p, 20);
    let l1_size = u64::from(file_be32(p, 36));
    let l1 = file_be64(p, 40);
    let per = cs / 8;
    let mut out = Vec::new();
    for i in 0..l1_size {
        let l2 = file_be64(p, l1 + i * 8) & 0x00ff_ffff_ffff_fe00;
        for j in 0..per {
            if l2 == 0 {
                out.push(('-', false));
                continue;
            }
            let w = file_be64(p, l2 + j * 8);
            let kind = if w >> 62 & 1 == 1 {
                'C'
            } else if w & 1 == 1 {
                if w & 0x00ff_ffff_ffff_fe00 != 0 {
                    'z' // preallocated zero
                } else {
                    'Z'
                }
            } else if w & 0x00ff_ffff_ffff_fe00 != 0 {
                'A'
            } else {
                '-'
            };
            out.push((kind, w >> 63 == 1));
        }
    }
    out
}

/// The twins agree: entries, content, map, and both are clean.
fn same(q: &Path, o: &Path, what: &str) {
    let (eq, eo) = (entries(q), entries(o));
    if let Some(i) = (0..eq.len()).find(|&i| eq[i] != eo[i]) {
        panic!(
            "{what}: L2 entries differ first at guest cluster {i}: qemu {:?}, ours {:?}",
            eq[i], eo[i]
        );
    }
    assert_eq!(eq.len(), eo.len(), "{what}: L1 sizes differ");
    assert_identical(q, o);
    assert_check_clean(q);
    assert_check_clean(o);
    let (mq, mo) = (
        normalize(&without_recursed_zero(&qemu_map(q, &[]))),
        normalize(&without_recursed_zero(&qemu_map(o, &[]))),
    );
    assert_eq!(
        mq,
        mo,
        "{what}: maps differ\nqemu:\n{}\nours:\n{}",
        show(&mq),
        show(&mo)
    );
}

const M: u64 = 1 << 20;

#[test]
fn iotest_179_write_zeroes_with_unmap() {
    require_qemu_tools();
    let t = twins("iot179", "", "64M", true);
    let (qb, ob) = (t.qb.clone().unwrap(), t.ob.clone().unwrap());
    // On the base: aligned zeroes on unallocated clusters (with and without unmap) mark
    // them zero without allocating.
    step(&qb, &ob, &[Op::ZeroUnmap(2 * M, 2 * M)]);
    step(&qb, &ob, &[Op::Zero(6 * M, 2 * M)]);
    same(&qb, &ob, "179 aligned zeroes on unallocated clusters");
    // Unaligned zeroes over clusters that already read as zero.
    step(&qb, &ob, &[Op::ZeroUnmap(10 * M + 1, 2 * M - 2)]);
    step(&qb, &ob, &[Op::Zero(14 * M + 1, 2 * M - 2)]);
    same(&qb, &ob, "179 unaligned zeroes on zero clusters");
    // Zeroes on data: unmap deallocates, without unmap the mapping stays.
    step(&qb, &ob, &[Op::Write(18 * M, 14 * M, 0xcd)]);
    step(&qb, &ob, &[Op::ZeroUnmap(20 * M, 2 * M)]);
    step(&qb, &ob, &[Op::Zero(24 * M, 6 * M)]);
    same(&qb, &ob, "179 zeroes on data");
    // Zeroes on zero clusters that are still mapped.
    step(&qb, &ob, &[Op::ZeroUnmap(26 * M, 2 * M)]);
    step(&qb, &ob, &[Op::Zero(28 * M, 2 * M)]);
    same(&qb, &ob, "179 zeroes on mapped zero clusters");
    // Zeroes on unmapped zeroes do not allocate.
    step(&qb, &ob, &[Op::Zero(32 * M, 8 * M)]);
    step(&qb, &ob, &[Op::ZeroUnmap(34 * M, 2 * M)]);
    step(&qb, &ob, &[Op::Zero(36 * M, 2 * M)]);
    same(&qb, &ob, "179 zeroes on unmapped zeroes");
    // The overlay: zeroes override the backing file, whatever the backing cluster is.
    step(
        &qb,
        &ob,
        &[Op::Zero(40 * M, 8 * M), Op::Write(48 * M, 8 * M, 0xcd)],
    );
    step(
        &t.q,
        &t.o,
        &[
            Op::ZeroUnmap(42 * M, 2 * M),
            Op::Zero(44 * M, 2 * M),
            Op::ZeroUnmap(50 * M, 2 * M),
            Op::Zero(52 * M, 2 * M),
            Op::ZeroUnmap(58 * M, 2 * M),
            Op::Zero(60 * M, 2 * M),
        ],
    );
    same(&qb, &ob, "179 base at the end");
    same(&t.q, &t.o, "179 overlay over backing data and zeroes");
}

#[test]
fn iotest_290_discard() {
    require_qemu_tools();
    let k = 1024;
    for compat in ["0.10", "1.1"] {
        let t = twins(
            &format!("iot290-{compat}"),
            &format!("compat={compat}"),
            "128k",
            false,
        );
        step(&t.q, &t.o, &[Op::Write(0, 128 * k, 1)]);
        step(&t.q, &t.o, &[Op::Discard(0, 128 * k)]);
        same(
            &t.q,
            &t.o,
            &format!("290 compat={compat} without a backing file"),
        );
    }
    for compat in ["0.10", "1.1"] {
        let t = twins(
            &format!("iot290b-{compat}"),
            &format!("compat={compat}"),
            "128k",
            true,
        );
        step(
            t.qb.as_deref().unwrap(),
            t.ob.as_deref().unwrap(),
            &[Op::Write(0, 128 * k, 0xff)],
        );
        step(&t.q, &t.o, &[Op::Write(0, 128 * k, 1)]);
        // v3 zeroes the clusters; v2 cannot without exposing the backing file, so the
        // discard changes nothing (QEMU's block layer hides the driver's ENOTSUP; ours
        // reports it, the documented difference).
        qemu_run(&t.q, &[Op::Discard(0, 128 * k)]);
        let ok = engine_run(&t.o, &[Op::Discard(0, 128 * k)]);
        assert_eq!(
            ok,
            [compat == "1.1"],
            "290 compat={compat}: our discard's result"
        );
        same(
            &t.q,
            &t.o,
            &format!("290 compat={compat} over a backing file"),
        );
    }
}

#[test]
fn iotest_066_discard_prealloc_zero() {
    require_qemu_tools();
    let t = twins("iot066", "compat=1.1", "64M", false);
    step(
        &t.q,
        &t.o,
        &[
            Op::Write(0, 256 * 1024, 0xcd),
            Op::Zero(0, 256 * 1024),
            Op::Discard(0, 256 * 1024),
        ],
    );
    same(&t.q, &t.o, "066 discarded preallocated zero clusters");
}

#[test]
fn iotest_033_unaligned_writes_and_zeroes() {
    require_qemu_tools();
    // A first 512-byte write allocates its whole cluster on the host: same file length
    // as QEMU's, ending on a cluster boundary.
    let t = twins("iot033-len", "", "128M", false);
    step(&t.q, &t.o, &[Op::Write(0, 512, 0x11)]);
    let (lq, lo) = (
        std::fs::metadata(&t.q).unwrap().len(),
        std::fs::metadata(&t.o).unwrap().len(),
    );
    assert_eq!(lo, lq, "033: file length after a 512-byte write");
    assert_eq!(lo % 65536, 0, "033: the file ends inside a cluster");
    same(&t.q, &t.o, "033 first write");
    // Unaligned writes and zeroes, inside one cluster and across cluster boundaries, on
    // 4 KiB clusters (so that several land in one request).
    for (opts, tag) in [("cluster_size=4096", "4k"), ("", "64k")] {
        let t = twins(&format!("iot033-{tag}"), opts, "128M", false);
        step(
            &t.q,
            &t.o,
            &[
                Op::Write(0x200, 0x400, 0x0a),
                Op::Write(0x3e00, 0x400, 0x0b),
                Op::Zero(0x300, 0x200),
                Op::Write(0x10000 - 0x200, 0x600, 0x0c),
                Op::Zero(0x10000 - 0x100, 0x300),
                Op::Zero(0x20000 + 0x200, 0x1000),
                Op::ZeroUnmap(0x3e00, 0x400),
            ],
        );
        same(
            &t.q,
            &t.o,
            &format!("033 unaligned requests ({tag} clusters)"),
        );
    }
}

#[test]
fn iotest_034_cow_over_backing() {
    require_qemu_tools();
    let t = twins("iot034", "", "64M", true);
    let (qb, ob) = (t.qb.clone().unwrap(), t.ob.clone().unwrap());
    step(&qb, &ob, &[Op::Write(0, 4 * M, 0x11)]);
    // Unaligned writes into the overlay: each copies the rest of its clusters from the
    // backing file (and beyond the backing data, zeros).
    step(
        &t.q,
        &t.o,
        &[
            Op::Write(0x200, 0x400, 0x22),
            Op::Write(0xfe00, 0x400, 0x33),
            Op::Write(3 * M + 0x1234 - 0x34, 0x20000, 0x44),
            Op::Write(4 * M - 0x200, 0x400, 0x55),
            Op::Write(6 * M + 0x200, 0x200, 0x66),
        ],
    );
    same(&qb, &ob, "034 base");
    same(&t.q, &t.o, "034 copy-on-write over the backing file");
}

#[test]
fn iotest_154_zeroes_over_backing() {
    require_qemu_tools();
    let t = twins("iot154", "cluster_size=4096", "128M", true);
    let (qb, ob) = (t.qb.clone().unwrap(), t.ob.clone().unwrap());
    step(
        &qb,
        &ob,
        &[Op::Write(0, 0x4000, 0x11), Op::Write(0x10000, 0x2000, 0x22)],
    );
    // Whole clusters over backing data become zero clusters; partial ones over backing
    // data are allocated (the rest copied); partial ones over unallocated backing ranges
    // read zero already.
    step(
        &t.q,
        &t.o,
        &[
            Op::Zero(0x1000, 0x1000),
            Op::Zero(0x2400, 0x400),
            Op::ZeroUnmap(0x3c00, 0x800),
            Op::Zero(0x8200, 0x400),
            Op::ZeroUnmap(0x10000 + 0x800, 0x1000),
            Op::Zero(0x20000, 0x3000),
        ],
    );
    same(&qb, &ob, "154 base");
    same(&t.q, &t.o, "154 zeroes over a backing file");
}

#[test]
fn write_zeroes_unmap_host_usage() {
    require_qemu_tools();
    // (QEMU's -drive option set, as spelled for both sides; the request)
    let sets: &[(&str, Op)] = &[
        ("discard=ignore", Op::Zero(0, M)),
        ("discard=ignore", Op::ZeroUnmap(0, M)),
        ("discard=ignore", Op::Write(0, M, 0)),
        ("discard=ignore,detect-zeroes=on", Op::Write(0, M, 0)),
        ("discard=unmap,detect-zeroes=unmap", Op::Write(0, M, 0)),
        ("discard=unmap", Op::Zero(0, M)),
        ("discard=unmap", Op::ZeroUnmap(0, M)),
    ];
    for (i, &(opts, op)) in sets.iter().enumerate() {
        let t = twins(&format!("wzu{i}"), "", "1M", false);
        let what = format!("write-zeroes-unmap {opts} {}", op.qemu());
        step(&t.q, &t.o, &[Op::Write(0, M, 0x5a)]);
        qemu_run_with(&t.q, opts, &[op]);
        let ok = engine_run_with(&t.o, opts, &[op]);
        assert_eq!(ok, [true], "{what}");
        same(&t.q, &t.o, &what);
        let (uq, uo) = (allocated_bytes(&t.q), allocated_bytes(&t.o));
        assert_eq!(uo, uq, "{what}: host usage, ours {uo} bytes, qemu's {uq}");
    }
}
