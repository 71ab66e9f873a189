//! I/O through damaged or shared metadata, and the L2 entries write-zeroes and
//! copy-on-write leave, compared with QEMU on twin images. The scenarios follow cases of
//! QEMU's own regression suite (named in each test), written here from what each case does;
//! qemu-io runs one twin (with `overlap-check=all`, as the iotests), the engine the other,
//! and the outcome must match: the request's success, the corrupt bit, what a later open
//! allows, the L2 entries' kinds and subcluster bitmaps, and the guest content.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_engine::{Image, OpenOptions};
use support::ops::Op;
use support::*;

/// qemu-io on `image` with `opts` (runtime options); true when every command succeeded.
fn qemu_ok(image: &Path, opts: &str, cmds: &[String], read_only: bool) -> bool {
    let mut spec = format!("driver=qcow2,file.filename={}", image.display());
    if !opts.is_empty() {
        spec += ",";
        spec += opts;
    }
    let mut c = Command::new("qemu-io");
    if read_only {
        c.arg("-r");
    }
    c.args(["--image-opts", &spec]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.output().expect("qemu-io (install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.status.success() && !text.contains("failed") && !text.contains("can't open")
}

fn incompatible(p: &Path) -> u64 {
    file_be64(p, 72)
}

const CORRUPT: u64 = 2;
const RT: u64 = 0x10000;
const RB: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

/// A 64 MiB twin pair made by qemu-img, prepared by `setup` (qemu-io commands, then
/// byte patches), in a directory of its own.
struct Twins {
    _dir: TempDir,
    qemu: PathBuf,
    ours: PathBuf,
}

fn twins(
    name: &str,
    create: &[&str],
    size: &str,
    setup: &[&str],
    patches: &[(u64, &[u8])],
) -> Twins {
    let dir = TempDir::new(name);
    let mk = |n: &str| {
        let p = dir.path(n);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.push(p.to_str().unwrap());
        args.push(size);
        qemu_img(&args);
        if !setup.is_empty() {
            qemu_io(
                &[],
                &p,
                &setup.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            );
        }
        for (off, bytes) in patches {
            patch_file(&p, *off, bytes);
        }
        p
    };
    let (qemu, ours) = (mk("q.qcow2"), mk("o.qcow2"));
    Twins {
        _dir: dir,
        qemu,
        ours,
    }
}

/// Run `ops` on both twins (the engine opened with `opts`); the outcome of each request and
/// the corrupt bit must match.
fn same_outcome(case: &str, t: &Twins, opts: &str, ops: &[Op]) {
    let q = qemu_ok(
        &t.qemu,
        &format!(
            "overlap-check=all{}{opts}",
            if opts.is_empty() { "" } else { "," }
        ),
        &ops.iter().map(Op::qemu).collect::<Vec<_>>(),
        false,
    );
    let o = match Image::open(&t.ours, &OpenOptions::parse(opts).unwrap()) {
        Ok(img) => {
            let ok = ops.iter().all(|op| op.engine(&img).is_ok());
            drop(img);
            ok
        }
        Err(e) => panic!("{case}: the engine refused the read/write open QEMU allows: {e}"),
    };
    assert_eq!(
        o, q,
        "{case}: requests succeeded in QEMU: {q}, in the engine: {o}"
    );
    assert_eq!(
        incompatible(&t.ours) & CORRUPT,
        incompatible(&t.qemu) & CORRUPT,
        "{case}: the corrupt bit differs from QEMU's"
    );
}

fn be(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// iotest 060, "L2 reference into L1": the first L1 entry names the L1 table as its L2
/// table. A write marks the image corrupt; a read/write open is refused afterwards, a
/// read-only one still reads.
#[test]
fn iotest_060_l2_table_in_l1() {
    let t = twins(
        "060-l2l1",
        &[],
        "64M",
        &[],
        &[(L1, &be(0x8000_0000_0003_0000))],
    );
    same_outcome(
        "060 L2 reference into L1",
        &t,
        "",
        &[Op::Write(0, 512, 0x2a)],
    );
    assert!(incompatible(&t.ours) & CORRUPT != 0);
    assert!(Image::open(&t.ours, &OpenOptions::default()).is_err());
    let ro = Image::open(
        &t.ours,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    ro.read_at(&mut [0u8; 512], 0).unwrap();
}

/// iotest 060, "cluster data reference into refcount block" and "into inactive L2 table"
/// (the snapshot's table survives: the write is refused, as with QEMU's
/// overlap-check=all), and "unallocated image header" (cluster 0's refcount is 0: the
/// allocator must not hand the header out).
#[test]
fn iotest_060_data_onto_metadata() {
    let t = twins("060-rb", &[], "64M", &[], &[]);
    for p in [&t.qemu, &t.ours] {
        // An L2 table past the end (the file is extended to hold it), its first entry
        // naming the refcount block as data, and that cluster's refcount set.
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(L2 + 65536).unwrap();
        patch_file(p, L1, &be(0x8000_0000_0004_0000));
        patch_file(p, RB + 8, &[0, 1]);
        patch_file(p, L2, &be(0x8000_0000_0002_0000));
    }
    same_outcome(
        "060 data into refcount block",
        &t,
        "",
        &[Op::Write(0, 512, 0x2a)],
    );

    let dir = TempDir::new("060-snap");
    let mk = |n: &str| {
        let p = dir.path(n);
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
        qemu_io(&[], &p, &["write -q -P 1 0 512".into()]);
        qemu_img(&["snapshot", "-c", "foo", p.to_str().unwrap()]);
        qemu_io(&[], &p, &["write -q -P 2 0 512".into()]);
        // The snapshot's (now inactive) L2 table stays at 0x40000; the active table moved.
        let active = file_be64(&p, L1) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(active, L2, "setup: the active L2 table moved");
        patch_file(&p, active, &be(0x8000_0000_0004_0000));
        p
    };
    let t = Twins {
        qemu: mk("q.qcow2"),
        ours: mk("o.qcow2"),
        _dir: dir,
    };
    same_outcome("060 data into inactive L2", &t, "", &[Op::Write(0, 512, 3)]);
    assert!(incompatible(&t.ours) & CORRUPT != 0, "refused and marked");
    // The snapshot is intact: apply it read-only and compare with QEMU's twin.
    qemu_img(&["check", "-q", "-r", "all", t.ours.to_str().unwrap()]);
    qemu_img(&["snapshot", "-a", "foo", t.ours.to_str().unwrap()]);
    qemu_io(&["-r"], &t.ours, &["read -P 1 0 512".into()]);

    let t = twins("060-hdr", &[], "64M", &["write -q 0 64k"], &[(RB, &[0, 0])]);
    same_outcome(
        "060 unallocated image header",
        &t,
        "",
        &[Op::Write(65536, 65536, 7)],
    );
}

/// A damaged-image case: name, qemu-io setup, byte patches, requests.
type Case<'a> = (&'a str, &'a [&'a str], Vec<(u64, [u8; 8])>, Vec<Op>);

/// iotest 060: unaligned L1, L2 and refcount table entries met in use mark the image
/// corrupt (reads included, on a read/write open); a discard of a cluster with an
/// unaligned offset is a non-fatal corruption (done, not freed, no corrupt bit), and a
/// later read of another damaged entry is fatal; a read-only open fails the read and sets
/// nothing; a write to an unaligned preallocated zero cluster is fatal; a discard meeting
/// an unaligned refcount block is fatal.
#[test]
fn iotest_060_unaligned_entries() {
    let w64 = &["write -q 0 64k"][..];
    let w128 = &["write -q 0 128k"][..];
    let cases: Vec<Case> = vec![
        (
            "unaligned L1 entry, read",
            w64,
            vec![(L1, be(0x8000_0000_0004_2a00))],
            vec![Op::Read(0, 65536)],
        ),
        (
            "unaligned L2 entry, read",
            w64,
            vec![(L2, be(0x8000_0000_0005_2a00))],
            vec![Op::Read(0, 65536)],
        ),
        (
            "unaligned reftable entry, write",
            &[],
            vec![(RT, be(0x2_2a00))],
            vec![Op::Write(0, 65536, 1)],
        ),
        (
            "non-fatal corruption on freeing",
            w64,
            vec![(L2, be(0x8000_0000_0005_2a00))],
            vec![Op::Discard(0, 65536)],
        ),
        (
            "non-fatal then fatal",
            w128,
            vec![
                (L2, be(0x8000_0000_0005_2a00)),
                (L2 + 8, be(0x8000_0000_0006_2a00)),
            ],
            vec![Op::Discard(0, 65536), Op::Read(65536, 65536)],
        ),
        (
            "write to an unaligned preallocated zero cluster",
            &["write -q 0 64k", "discard -q 0 64k"],
            vec![(L2, be(0x8000_0000_0000_2a01))],
            vec![Op::Write(0, 65536, 2)],
        ),
        (
            "discard with an unaligned refblock",
            w128,
            vec![(RT, be(0x2a00))],
            vec![Op::Discard(0, 65537)],
        ),
        (
            "empty refcount table",
            &[],
            vec![(RT, be(0))],
            vec![Op::Write(0, 65536, 3)],
        ),
        (
            "empty refcount table, valid L1 and L2",
            w64,
            vec![(RT, be(0))],
            vec![Op::Write(0, 131072, 3)],
        ),
        (
            "empty refcount block",
            &[],
            vec![(RB, be(0))],
            vec![Op::Write(0, 65536, 4)],
        ),
        (
            "incorrect refcount table offset",
            &[],
            vec![(48, be(0))],
            vec![Op::Write(0, 65536, 5)],
        ),
    ];
    for (name, setup, patches, ops) in cases {
        let p: Vec<(u64, &[u8])> = patches.iter().map(|(o, b)| (*o, &b[..])).collect();
        let t = twins("060-ua", &[], "64M", setup, &p);
        same_outcome(&format!("060 {name}"), &t, "", &ops);
    }
    // Read-only: the read fails, nothing is marked.
    let t = twins(
        "060-ro",
        &[],
        "64M",
        w64,
        &[(L2, &be(0x8000_0000_0005_2a00))],
    );
    assert!(!qemu_ok(&t.qemu, "", &["read -q 0 64k".into()], true));
    let ro = Image::open(
        &t.ours,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ro.read_at(&mut vec![0; 65536], 0).is_err());
    drop(ro);
    assert_eq!(incompatible(&t.ours) & CORRUPT, 0);
}

/// iotest 271: extended L2 entries QEMU still serves: reserved bit 0 set (read, write),
/// and a compressed cluster with a nonzero bitmap (read); an allocated subcluster that is
/// also marked zero is corruption in both.
#[test]
fn iotest_271_entries_qemu_serves() {
    let ext = &["-o", "extended_l2=on"][..];
    let t = twins("271-bit0", ext, "1M", &["write -q -P 1 0 64k"], &[]);
    let l2 = file_be64(&t.ours, file_be64(&t.ours, 40)) & 0x00ff_ffff_ffff_fe00;
    for p in [&t.qemu, &t.ours] {
        let w = file_be64(p, l2);
        patch_file(p, l2, &be(w | 1));
    }
    same_outcome(
        "271 reserved bit 0",
        &t,
        "",
        &[Op::Read(0, 65536), Op::Write(0, 4096, 2), Op::Read(0, 4096)],
    );
    assert_check_clean(&t.ours);

    let t = twins("271-cbm", ext, "1M", &["write -q -c -P 1 0 64k"], &[]);
    for p in [&t.qemu, &t.ours] {
        patch_file(p, l2 + 8, &be(1));
    }
    same_outcome(
        "271 compressed cluster with a bitmap",
        &t,
        "",
        &[Op::Read(0, 65536)],
    );

    let t = twins("271-both", ext, "1M", &["write -q -P 1 0 64k"], &[]);
    for p in [&t.qemu, &t.ours] {
        patch_file(p, l2 + 8, &be(0x0000_0001_ffff_ffff));
    }
    same_outcome("271 allocated and zero", &t, "", &[Op::Read(0, 65536)]);
}

/// The L2 entry of guest cluster `c` of a one-table image: (kind letter, COPIED, bitmap).
fn entry(p: &Path, c: u64, extended: bool) -> (char, bool, u64) {
    let l2 = file_be64(p, file_be64(p, 40)) & 0x00ff_ffff_ffff_fe00;
    if l2 == 0 {
        return ('-', false, 0);
    }
    let size = if extended { 16 } else { 8 };
    let w = file_be64(p, l2 + c * size);
    let b = if extended {
        file_be64(p, l2 + c * size + 8)
    } else {
        0
    };
    let kind = if w >> 62 & 1 == 1 {
        'C'
    } else if w & 0x00ff_ffff_ffff_fe00 != 0 {
        'A'
    } else if w & 1 == 1 && !extended {
        'Z'
    } else {
        '-'
    };
    (kind, w >> 63 == 1, b)
}

/// Replay requests on twin extended-L2 images (compressed writes through qemu-io on
/// both), comparing every entry's kind and bitmap, the content, and check after each.
fn replay_ext(case: &str, size: &str, backing: bool, opts: &str, steps: &[Op]) {
    let dir = TempDir::new("271-replay");
    let mk = |n: &str| {
        let p = dir.path(n);
        let ps = p.to_str().unwrap();
        if backing {
            let b = dir.path("base.raw");
            std::fs::write(&b, vec![0xffu8; parse_size(size) as usize]).unwrap();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on",
                "-F",
                "raw",
                "-b",
                "base.raw",
                ps,
                size,
            ]);
        } else {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on",
                ps,
                size,
            ]);
        }
        p
    };
    let (q, o) = (mk("q.qcow2"), mk("o.qcow2"));
    let clusters = parse_size(size).div_ceil(65536);
    for op in steps {
        assert!(
            qemu_ok(&q, opts, &[op.qemu()], false),
            "{case}: qemu-io {}",
            op.qemu()
        );
        if let Op::Compress(..) = op {
            assert!(qemu_ok(&o, opts, &[op.qemu()], false));
        } else {
            let img = Image::open(&o, &OpenOptions::parse(opts).unwrap()).unwrap();
            assert!(op.engine(&img).is_ok(), "{case}: engine {op:?}");
            img.close().unwrap();
        }
        for c in 0..clusters {
            let (a, b) = (entry(&q, c, true), entry(&o, c, true));
            assert!(
                a.0 == b.0 && a.2 == b.2,
                "{case} [{opts}] after `{}`: cluster {c}: QEMU {a:x?}, engine {b:x?}",
                op.qemu()
            );
        }
        assert_identical(&q, &o);
        assert_check_clean(&o);
    }
}

fn parse_size(s: &str) -> u64 {
    let (n, m) = s.split_at(s.len() - 1);
    n.parse::<u64>().unwrap() * if m == "M" { 1 << 20 } else { 1 << 10 }
}

const K: u64 = 1024;

/// iotest 271's write-zeroes patterns with QEMU-style options, with and without a backing
/// file: unallocated, allocated and compressed clusters, cluster- and subcluster-aligned
/// and unaligned requests (a compressed cluster that cannot be partly zeroed sends the
/// whole piece to zero bytes, as in QEMU), and a last cluster the image ends inside (its
/// zero bits stop at the end).
#[test]
fn iotest_271_write_zeroes_entries() {
    for opts in [
        "discard=unmap",
        "discard=unmap,discard-no-unref=on",
        "discard=ignore",
    ] {
        for backing in [true, false] {
            for unmap in [false, true] {
                let z = |o: u64, l: u64| {
                    if unmap {
                        Op::ZeroUnmap(o, l)
                    } else {
                        Op::Zero(o, l)
                    }
                };
                let mut steps = vec![];
                if !unmap {
                    steps.extend([
                        z(0, 192 * K),
                        z(3 * 64 * K + 32 * K, 128 * K),
                        z(6 * 64 * K + 31 * K, 128 * K),
                    ]);
                }
                steps.push(Op::Write(9 * 64 * K, 576 * K, 1));
                steps.extend([
                    z(9 * 64 * K, 192 * K),
                    z(12 * 64 * K + 32 * K, 128 * K),
                    z(15 * 64 * K + 31 * K, 128 * K),
                ]);
                for c in 18..29 {
                    steps.push(Op::Compress(c * 64 * K, 64 * K, c as u8));
                }
                steps.extend([
                    z(18 * 64 * K, 192 * K),
                    z(21 * 64 * K + 32 * K, 128 * K),
                    z(24 * 64 * K + 31 * K, 129 * K),
                    z(27 * 64 * K + 31 * K, 128 * K),
                    z(30 * 64 * K + 31 * K, 8 * K),
                    z(32 * 64 * K, 35 * K),
                ]);
                replay_ext("271 writing zeroes", "2083K", backing, opts, &steps);
            }
        }
    }
}

/// iotest 271's standard write tests, and copy-on-write of a cluster shared with an
/// internal snapshot: QEMU copies from the first to the last allocated subcluster (and
/// the written ones), turning zero subclusters in between into data.
#[test]
fn iotest_271_writes_and_shared_cluster_cow() {
    for backing in [true, false] {
        let steps = [
            Op::Write(0, K, 1),
            Op::Write(3 * K, 512, 2),
            Op::Write(5 * K, K, 3),
            Op::Write(6 * K, 2 * K, 4),
            Op::Write(8 * K, 6 * K, 5),
            Op::Write(15 * K, 4 * K, 6),
            Op::Write(32 * K, K, 7),
            Op::Write(63 * K, 4 * K, 8),
            Op::Zero(2 * K, 2 * K),
            Op::Zero(0, 64 * K),
            Op::Write(0, 64 * K, 9),
            Op::ZeroUnmap(0, 32 * K),
            Op::ZeroUnmap(0, 64 * K),
            Op::Write(3 * K, 512, 10),
            Op::Write(0, 64 * K, 11),
            Op::Discard(0, 64 * K),
            Op::Compress(0, 64 * K, 12),
            Op::Write(3 * K, 512, 13),
        ];
        replay_ext(
            "271 standard writes",
            "1M",
            backing,
            "discard=unmap",
            &steps,
        );
    }
    for (setup, write) in [
        (
            &["write -q -P 1 4k 2k", "write -q -P 2 20k 2k"][..],
            Op::Write(10 * K, 2 * K, 3),
        ),
        (
            &["write -q -P 1 4k 2k", "write -q -P 2 20k 2k"][..],
            Op::Write(40 * K, 2 * K, 3),
        ),
        (
            &["write -q -P 1 0 64k", "write -q -z 8k 4k"][..],
            Op::Write(30 * K, K, 3),
        ),
    ] {
        let t = twins("271-cow", &["-o", "extended_l2=on"], "1M", setup, &[]);
        for p in [&t.qemu, &t.ours] {
            qemu_img(&["snapshot", "-c", "s", p.to_str().unwrap()]);
        }
        assert!(qemu_ok(&t.qemu, "", &[write.qemu()], false));
        let img = Image::open(&t.ours, &OpenOptions::parse("discard=unmap").unwrap()).unwrap();
        assert!(write.engine(&img).is_ok());
        img.close().unwrap();
        let (a, b) = (entry(&t.qemu, 0, true), entry(&t.ours, 0, true));
        assert_eq!(
            (a.0, a.2),
            (b.0, b.2),
            "shared-cluster COW after {setup:?}: QEMU {a:x?}, engine {b:x?}"
        );
        assert_identical(&t.qemu, &t.ours);
        assert_check_clean(&t.ours);
    }
}
