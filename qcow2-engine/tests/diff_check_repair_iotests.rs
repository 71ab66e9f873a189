//! Check and repair against qemu-img check on the damaged images of QEMU's own iotests
//! (060, 108, 138, 271; our own scenarios, QEMU's tools live as the oracle). Each image
//! is made with qemu-img / qemu-io and byte pokes, then checked on twin copies by
//! `qemu-img check [-r leaks|all] --output=json` and by the engine (a check-open, as
//! `qcowprov-img check` does): the exit code and every counter must match, a repair must
//! leave a file no longer than qemu-img's, the same `qemu-img check` verdict afterwards,
//! and the same guest data (or, where QEMU refuses to read the damaged image, the same
//! L1 and L2 entries: a repair never changes an entry qemu-img leaves alone).
//!
//! Covered iotest cases (name in QEMU's test -> scenario here):
//! - 060 "L2 reference into L1" -> `l2_into_l1` (qemu-img's repair fails: same exit 1)
//! - 060 "cluster data reference into refcount block" -> `data_into_refblock` (2 errors)
//! - 060 "cluster data reference into inactive L2 table" -> `data_into_inactive_l2`, then
//!   the snapshot still applies and reads back
//! - 060 "unallocated image header" -> `unallocated_header`
//! - 060 "unaligned L1 entry" -> `unaligned_l1_entry` (left alone, garbage L2 counted)
//! - 060 "unaligned L2 entry" -> `unaligned_l2_entry` (data: left alone, exit 2)
//! - 060 "unaligned pre-allocated zero cluster" -> `unaligned_prealloc_zero`
//! - 060 "writing to an unaligned preallocated zero cluster" -> `unaligned_zero_in_header`
//! - 060 "unaligned reftable entry" -> `unaligned_reftable_entry` (qemu-img cannot repair:
//!   its rebuild trips over the damaged entry; ours rebuilds, see `Qemu::Fails`)
//! - 060 "empty refcount table", "... with valid L1 and L2 tables", "empty refcount
//!   block", "... with compressed write" -> `empty_reftable*`, `empty_refblock*`
//! - 060 "zero refcount table size" -> `zero_reftable_size`
//! - 060 "incorrect refcount table offset" -> `reftable_offset_zero` (qemu-img grows the
//!   file to 4 GiB; ours rebuilds in place: same counts, shorter file)
//! - 060 "dirty corrupt image" -> `dirty_corrupt` (check -r all) and
//!   `a_dirty_corrupt_image_is_repaired_on_open` (QEMU repairs at open, fails half-way)
//! - 060 "discarding with an unaligned refblock" (the repair part) -> `unaligned_refblock`
//! - 060 "discarding an out-of-bounds refblock", "a non-covered in-bounds refblock", "a
//!   refblock covered by an unaligned refblock" (the repair parts) -> `refblock_far_out`,
//!   `refblock_not_covered`, `refblock_covered_by_unaligned`
//! - 108 "repairing an image without any refcount table" -> `no_reftable`
//! - 108 "repairing unreferenced data cluster in new refblock area" -> `data_in_new_refblock_area`
//! - 108 "repairing refblock beyond the image end": otherwise clean / refblock is
//!   unallocated / signed / unsigned overflow -> `refblock_beyond_end_*`
//! - 108 "does the image size increase?" -> `rebuild_keeps_file_size`
//! - 138 "check on an image with a multiple of 2^32 clusters" -> `data_at_32_pib`
//! - 271 "detect and repair unaligned clusters" (both) -> `ext_l2_unaligned_with_data`,
//!   `ext_l2_unaligned_without_data` (the one qemu-img repairs; backing data shows through)
//! - 271 "corrupted L2 entries" (check side: zero bit, both bits, allocated bit on an
//!   unallocated cluster, compressed with a bitmap) -> `ext_l2_*`
//!
//! Not covered here, with what they need: 060's overlap-while-COW-in-flight (in
//! `diff_iotests_inflight.rs`), its shrinking resizes (`qemu-img resize --shrink`; the check parts are
//! covered), amend to compat=0.10 (`amend`), the QMP cases (qemu-system); 108's reftable
//! placed in a prepared hole of a 9 MiB image (covered by the placement rule, not by that
//! exact layout) and its block-device case (a non-growable export or loop device);
//! 060/271's guest-I/O corruption cases belong to the request paths.

mod support;

use std::path::{Path, PathBuf};

use qcow2_engine::{CheckReport, Image, OpenOptions, Repair};
use support::*;

/// qemu-img check's outcome: exit code and its JSON counters (absent: 0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Verdict {
    rc: i32,
    corruptions: u64,
    leaks: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    check_errors: u64,
    image_end: u64,
    total: u64,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

impl Verdict {
    /// The counters a second run reports (the repaired ones aside).
    fn state(&self) -> Verdict {
        Verdict {
            corruptions_fixed: 0,
            leaks_fixed: 0,
            ..self.clone()
        }
    }
}

fn mode_args(m: Repair) -> &'static [&'static str] {
    match m {
        Repair::None => &[],
        Repair::Leaks => &["-r", "leaks"],
        Repair::All => &["-r", "all"],
    }
}

fn qemu_check(p: &Path, m: Repair) -> Verdict {
    let mut args = vec!["check"];
    args.extend_from_slice(mode_args(m));
    args.extend_from_slice(&["--output=json", p.to_str().unwrap()]);
    let (rc, out, _) = qemu_img_status(&args);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Verdict {
        rc,
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        corruptions_fixed: n("corruptions-fixed"),
        leaks_fixed: n("leaks-fixed"),
        check_errors: n("check-errors"),
        image_end: n("image-end-offset"),
        total: n("total-clusters"),
        allocated: n("allocated-clusters"),
        fragmented: n("fragmented-clusters"),
        compressed: n("compressed-clusters"),
    }
}

/// The engine as `qcowprov-img check` drives it: a check-open (read-only unless
/// repairing), the check, and after a repair that fixed something a second check whose
/// counters are reported with the first one's repaired counts. Exit 1 when the open or
/// the check fails or had internal errors.
fn our_check(p: &Path, m: Repair) -> Verdict {
    let opts = OpenOptions {
        check: true,
        read_only: m == Repair::None,
        ..Default::default()
    };
    let fail = Verdict {
        rc: 1,
        ..Default::default()
    };
    let Ok(img) = Image::open(p, &opts) else {
        return fail;
    };
    let Ok(first) = img.check(m) else {
        return fail;
    };
    let mut r: CheckReport = first.clone();
    if first.corruptions_fixed > 0 || first.leaks_fixed > 0 {
        let Ok(second) = img.check(Repair::None) else {
            return fail;
        };
        r = CheckReport {
            corruptions_fixed: first.corruptions_fixed,
            leaks_fixed: first.leaks_fixed,
            ..second
        };
        // The second run repaired nothing: what it found is what is left.
        r.corruptions += r.corruptions_fixed;
        r.leaks += r.leaks_fixed;
    }
    if img.close().is_err() {
        return fail;
    }
    let left = |found: u64, fixed: u64| found - fixed;
    Verdict {
        rc: if r.check_errors > 0 { 1 } else { r.exit_code() },
        corruptions: left(r.corruptions, r.corruptions_fixed),
        leaks: left(r.leaks, r.leaks_fixed),
        corruptions_fixed: r.corruptions_fixed,
        leaks_fixed: r.leaks_fixed,
        check_errors: r.check_errors,
        image_end: r.image_end_offset,
        total: r.total_clusters,
        allocated: r.allocated_clusters,
        fragmented: r.fragmented_clusters,
        compressed: r.compressed_clusters,
    }
}

/// What qemu-img's `check -r all` does with a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qemu {
    /// Repairs (or reports) in one run: ours must give the same verdict.
    Same,
    /// Its first run fails half-way (its own overlap check marks the image corrupt while
    /// it rebuilds) and a second run finishes: ours finishes in one run, exit 0, ending
    /// where qemu-img's second run ends.
    NeedsTwoRuns,
    /// Never repairs it: ours must (exit 0, a clean image, the guest data kept).
    Fails,
    /// Repairs in one run by growing the file to where a damaged refcount table entry
    /// points (4 GiB, 64 GiB): ours rebuilds inside the file instead, so every counter is
    /// the same but the image end, which must be no later than qemu-img's.
    GrowsFile,
    /// As `NeedsTwoRuns`, and qemu-img's runs grow the file as in `GrowsFile`.
    NeedsTwoRunsGrowsFile,
}

/// The verdict without the image end, and whether ours ends no later than qemu-img's.
fn same_but_shorter(q: &Verdict, o: &Verdict) -> bool {
    o.image_end <= q.image_end
        && Verdict {
            image_end: 0,
            ..q.clone()
        } == Verdict {
            image_end: 0,
            ..o.clone()
        }
}

struct Case {
    name: &'static str,
    make: fn(&Path),
    qemu: Qemu,
}

fn poke(p: &Path, off: u64, hex: &str) {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    patch_file(p, off, &bytes);
}

fn create(p: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    args.extend_from_slice(&[p.to_str().unwrap(), size]);
    qemu_img(&args);
}

fn io(p: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    qemu_io(&["-f", "qcow2"], p, &cmds);
}

/// A qemu-io write the damage makes QEMU refuse (it marks the image corrupt), as the
/// iotests do before repairing.
fn io_refused(p: &Path, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, p.to_str().unwrap()])
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("failed") || text.contains("can't open") || !out.status.success(),
        "qemu-io {cmd} was expected to be refused: {text}"
    );
}

fn set_len(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// 64 MiB, 64 KiB clusters: refcount table at 0x10000, refcount block at 0x20000, L1
/// table at 0x30000, the first L2 table at 0x40000, data from 0x50000.
fn img64(p: &Path) {
    create(p, "", "64M");
}

/// An extended-L2 image over a raw backing file of 0xff bytes (271's repair cases).
fn ext_l2_over_backing(p: &Path) {
    let base = p.with_file_name("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "128k"]);
    qemu_io(&["-f", "raw"], &base, &["write -q -P 0xff 0 128k".into()]);
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
        p.to_str().unwrap(),
    ]);
    io(p, &["write -q -P 1 4k 2k"]);
}

fn cases() -> Vec<Case> {
    use Qemu::*;
    vec![
        Case {
            name: "l2_into_l1",
            make: |p| {
                img64(p);
                poke(p, 0x30000, "8000000000030000");
            },
            qemu: Same,
        },
        Case {
            name: "data_into_refblock",
            make: |p| {
                img64(p);
                set_len(p, 0x50000);
                poke(p, 0x30000, "8000000000040000");
                poke(p, 0x20008, "0001");
                poke(p, 0x40000, "8000000000020000");
            },
            qemu: Same,
        },
        Case {
            name: "data_into_inactive_l2",
            make: |p| {
                img64(p);
                io(p, &["write -P 1 0 512"]);
                qemu_img(&["snapshot", "-c", "foo", p.to_str().unwrap()]);
                io(p, &["write -P 2 0 512"]);
                poke(p, 0x80000, "8000000000040000");
            },
            qemu: Same,
        },
        Case {
            name: "unallocated_header",
            make: |p| {
                img64(p);
                io(p, &["write 0 64k"]);
                poke(p, 0x20000, "0000");
                io_refused(p, "write 64k 64k");
            },
            qemu: Same,
        },
        Case {
            name: "unaligned_l1_entry",
            make: |p| {
                img64(p);
                io(p, &["write 0 64k"]);
                poke(p, 0x30000, "8000000000042a00");
            },
            qemu: Same,
        },
        Case {
            name: "unaligned_l2_entry",
            make: |p| {
                img64(p);
                io(p, &["write 0 64k"]);
                poke(p, 0x40000, "8000000000052a00");
                io_refused(p, "read 0 64k");
            },
            qemu: Same,
        },
        Case {
            name: "unaligned_prealloc_zero",
            make: |p| {
                img64(p);
                io(p, &["write 0 64k"]);
                poke(p, 0x40000, "8000000000052a01");
            },
            qemu: Same,
        },
        Case {
            name: "unaligned_zero_in_header",
            make: |p| {
                img64(p);
                io(p, &["write 0 64k", "discard 0 64k"]);
                poke(p, 0x40000, "8000000000002a01");
                io_refused(p, "write 0 64k");
            },
            qemu: Same,
        },
        Case {
            name: "unaligned_reftable_entry",
            make: |p| {
                img64(p);
                poke(p, 0x10000, "0000000000022a00");
            },
            qemu: Fails,
        },
        Case {
            name: "empty_reftable",
            make: |p| {
                img64(p);
                poke(p, 0x10000, "0000000000000000");
                io_refused(p, "write 0 64k");
            },
            qemu: Same,
        },
        Case {
            name: "empty_reftable_with_l1_l2",
            make: |p| {
                img64(p);
                io(p, &["write 0 64k"]);
                poke(p, 0x10000, "0000000000000000");
                io_refused(p, "write 0 128k");
            },
            qemu: Same,
        },
        Case {
            name: "empty_refblock",
            make: |p| {
                img64(p);
                poke(p, 0x20000, "0000000000000000");
                io_refused(p, "write 0 64k");
            },
            qemu: Same,
        },
        Case {
            name: "empty_refblock_compressed",
            make: |p| {
                img64(p);
                io(p, &["write 64k 64k"]);
                poke(p, 0x20000, "0000000000000000");
                io_refused(p, "write -c 0 64k");
            },
            qemu: Same,
        },
        Case {
            name: "zero_reftable_size",
            make: |p| {
                img64(p);
                poke(p, 56, "00000000");
                io_refused(p, "write 0 64k");
            },
            qemu: Same,
        },
        Case {
            name: "reftable_offset_zero",
            make: |p| {
                img64(p);
                poke(p, 48, "0000000000000000");
                io_refused(p, "write 0 64k");
            },
            qemu: GrowsFile,
        },
        Case {
            name: "dirty_corrupt",
            make: |p| {
                img64(p);
                poke(p, 0x10000, "00000000ffff2a00");
                poke(p, 72, "0000000000000001");
            },
            qemu: NeedsTwoRuns,
        },
        Case {
            name: "unaligned_refblock",
            make: |p| {
                img64(p);
                io(p, &["write 0 128k"]);
                poke(p, 0x10000, "0000000000002a00");
                io_refused(p, "discard 0 65537");
            },
            qemu: NeedsTwoRuns,
        },
        Case {
            name: "refblock_far_out",
            make: |p| {
                img64(p);
                poke(p, 0x10008, "00ffffff00000000");
            },
            qemu: Same,
        },
        Case {
            name: "refblock_not_covered",
            make: |p| {
                create(p, "refcount_bits=1", "64M");
                poke(p, 0x10008, "0000001000000000");
            },
            qemu: GrowsFile,
        },
        Case {
            name: "refblock_covered_by_unaligned",
            make: |p| {
                create(p, "refcount_bits=1", "64M");
                poke(p, 0x10008, "0000001000000000");
                poke(p, 0x10010, "0000000000000200");
            },
            qemu: NeedsTwoRunsGrowsFile,
        },
        Case {
            name: "no_reftable",
            make: |p| {
                img64(p);
                io(p, &["write -P 42 0 64k"]);
                poke(p, 0x30, "0000000000000000");
                poke(p, 0x38, "00000000");
            },
            qemu: Same,
        },
        Case {
            name: "data_in_new_refblock_area",
            make: |p| {
                create(p, "cluster_size=512", "64M");
                io(p, &["write 0 0x1b200"]);
                assert_eq!(std::fs::metadata(p).unwrap().len(), 0x20000);
                poke(p, 0x1ccc8, "8000000000020000");
                set_len(p, 0x20200);
                qemu_io(&["-f", "raw"], p, &["write -P 42 128k 512".into()]);
            },
            qemu: Same,
        },
        Case {
            name: "refblock_beyond_end_clean",
            make: |p| {
                img64(p);
                poke(p, 0x10008, "0000000000100000");
                poke(p, 0x20020, "0001");
            },
            qemu: GrowsFile,
        },
        Case {
            name: "refblock_beyond_end_unallocated",
            make: |p| {
                img64(p);
                poke(p, 0x10008, "0000000000100000");
            },
            qemu: Same,
        },
        Case {
            name: "refblock_beyond_end_signed_overflow",
            make: |p| {
                img64(p);
                poke(p, 0x10008, "7fffffffffff0000");
            },
            qemu: Same,
        },
        Case {
            name: "refblock_beyond_end_unsigned_overflow",
            make: |p| {
                img64(p);
                poke(p, 0x10008, "ffffffffffff0000");
            },
            qemu: Same,
        },
        Case {
            name: "rebuild_keeps_file_size",
            make: |p| {
                create(p, "cluster_size=512", "1M");
                io(p, &["write 0 64k"]);
                let len = std::fs::metadata(p).unwrap().len();
                set_len(p, len + 256 * 1024);
                let rt = file_be64(p, 48);
                let rb = file_be64(p, rt);
                poke(p, rb, "0000");
            },
            qemu: Same,
        },
        Case {
            name: "data_at_32_pib",
            make: |p| {
                create(p, "cluster_size=512", "512");
                io(p, &["write 0 512"]);
                poke(p, 2048, "8080000000000000");
            },
            qemu: Same,
        },
        Case {
            name: "ext_l2_unaligned_with_data",
            make: |p| {
                ext_l2_over_backing(p);
                poke(p, 0x40000 + 6, "02");
            },
            qemu: Same,
        },
        Case {
            name: "ext_l2_unaligned_without_data",
            make: |p| {
                ext_l2_over_backing(p);
                io(p, &["write -q -z 4k 2k"]);
                poke(p, 0x40000 + 6, "02");
            },
            qemu: Same,
        },
        Case {
            name: "ext_l2_zero_bit_on_allocated",
            make: |p| {
                create(p, "extended_l2=on", "1M");
                io(p, &["write -q -P 0x11 0 2k"]);
                poke(p, 0x40000 + 7, "01");
            },
            qemu: Same,
        },
        Case {
            name: "ext_l2_zero_and_allocated_bits",
            make: |p| {
                create(p, "extended_l2=on", "1M");
                io(p, &["write -q 32k 128k"]);
                poke(p, 0x40000 + 24, "00000001");
            },
            qemu: Same,
        },
        Case {
            name: "ext_l2_allocated_bit_without_cluster",
            make: |p| {
                create(p, "extended_l2=on", "1M");
                io(p, &["write -q 256k 1k"]);
                poke(p, 0x40000 + 15, "01");
            },
            qemu: Same,
        },
        Case {
            name: "ext_l2_compressed_with_bitmap",
            make: |p| {
                create(p, "extended_l2=on", "1M");
                io(p, &["write -q -P 11 -c 0 64k"]);
                poke(p, 0x40000 + 11, "0180");
            },
            qemu: Same,
        },
    ]
}

/// The active L1 table and the L2 entries it names (raw), for comparing images QEMU
/// refuses to read.
fn active_entries(p: &Path) -> Vec<u64> {
    let l1_off = file_be64(p, 40);
    let l1_size = u64::from(file_be32(p, 36));
    let cluster_bits = file_be32(p, 20);
    let cs = 1u64 << cluster_bits;
    let len = std::fs::metadata(p).unwrap().len();
    let mut out = Vec::new();
    for i in 0..l1_size {
        let e = file_be64(p, l1_off + i * 8);
        out.push(e);
        let l2 = e & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 || l2 + cs > len {
            continue;
        }
        let mut buf = vec![0u8; cs as usize];
        read_file_at(p, &mut buf, l2);
        out.extend(
            buf.chunks(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap())),
        );
    }
    out
}

fn copy_case(dir: &Path, name: &str, from: &Path) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(from, &p).unwrap();
    p
}

fn run_case(c: &Case) -> Result<(), String> {
    let d = TempDir::new(&format!("iot-{}", c.name));
    let orig = d.path("img.qcow2");
    (c.make)(&orig);
    let mut errs = Vec::new();
    for m in [Repair::None, Repair::Leaks, Repair::All] {
        let q = copy_case(&d.0, &format!("q-{m:?}.qcow2"), &orig);
        let o = copy_case(&d.0, &format!("o-{m:?}.qcow2"), &orig);
        let mut qv = qemu_check(&q, m);
        let ov = our_check(&o, m);
        let mut ctx = format!("{} [{m:?}]", c.name);
        match (m, c.qemu) {
            (Repair::All, Qemu::NeedsTwoRuns | Qemu::NeedsTwoRunsGrowsFile) => {
                if qv.rc != 1 {
                    errs.push(format!(
                        "{ctx}: qemu-img's first run was expected to fail: {qv:?}"
                    ));
                }
                qv = qemu_check(&q, m);
                ctx.push_str(" (qemu-img's second run)");
                let same = if c.qemu == Qemu::NeedsTwoRuns {
                    ov.state() == qv.state()
                } else {
                    same_but_shorter(&qv.state(), &ov.state())
                };
                if ov.rc != 0 || !same {
                    errs.push(format!("{ctx}:\n  qemu {qv:?}\n  ours {ov:?}"));
                }
            }
            (Repair::All, Qemu::GrowsFile) => {
                let grew =
                    std::fs::metadata(&q).unwrap().len() > std::fs::metadata(&orig).unwrap().len();
                if !grew || !same_but_shorter(&qv, &ov) {
                    errs.push(format!(
                        "{ctx} (qemu-img grows the file: {grew}):\n  qemu {qv:?}\n  ours {ov:?}"
                    ));
                }
            }
            (Repair::All, Qemu::Fails) => {
                if qv.rc != 1 {
                    errs.push(format!("{ctx}: qemu-img was expected to fail: {qv:?}"));
                }
                if ov.rc != 0 {
                    errs.push(format!("{ctx}: ours must repair it: {ov:?}"));
                }
                let (rc, out, _) = qemu_img_status(&["check", o.to_str().unwrap()]);
                if rc != 0 {
                    errs.push(format!(
                        "{ctx}: qemu-img check after our repair: {rc} {out}"
                    ));
                }
                let (rc, out, err) =
                    qemu_img_status(&["compare", orig.to_str().unwrap(), o.to_str().unwrap()]);
                if rc != 0 {
                    errs.push(format!("{ctx}: guest data changed: {out}{err}"));
                }
                continue;
            }
            _ => {
                if ov != qv {
                    errs.push(format!("{ctx}:\n  qemu {qv:?}\n  ours {ov:?}"));
                }
            }
        }
        if m == Repair::None {
            continue;
        }
        let (ql, ol) = (
            std::fs::metadata(&q).unwrap().len(),
            std::fs::metadata(&o).unwrap().len(),
        );
        if ol > ql {
            errs.push(format!("{ctx}: our file is {ol} bytes, qemu-img's {ql}"));
        }
        let after_q = qemu_check(&q, Repair::None);
        let after_o = qemu_check(&o, Repair::None);
        if after_q.rc != after_o.rc {
            errs.push(format!(
                "{ctx}: qemu-img check afterwards: of qemu-img's image {after_q:?}, of ours {after_o:?}"
            ));
        }
        let (rc, out, err) =
            qemu_img_status(&["compare", q.to_str().unwrap(), o.to_str().unwrap()]);
        if rc == 1 {
            errs.push(format!("{ctx}: guest data differs: {out}{err}"));
        } else if rc != 0 && active_entries(&q) != active_entries(&o) {
            // QEMU cannot read either image: the entries themselves must be the same.
            errs.push(format!("{ctx}: L1/L2 entries differ after the repair"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

#[test]
fn check_and_repair_agree_with_qemu_img_on_qemus_iotest_images() {
    require_qemu_tools();
    let mut failures = Vec::new();
    let cases = cases();
    for c in &cases {
        let name = c.name;
        let make = c.make;
        let qemu = c.qemu;
        match guarded(name, 300, move || run_case(&Case { name, make, qemu })) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree with qemu-img:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// After the repairs, what the iotests read back: 108's data in the new refblock area
/// and without a refcount table, 271's backing data through an unaligned entry without
/// data, 060's snapshot whose L2 table a data cluster overlapped.
#[test]
fn repaired_images_read_back_as_the_iotests_expect() {
    require_qemu_tools();
    let d = TempDir::new("iot-readback");
    let check_all = |p: &Path| {
        let v = our_check(p, Repair::All);
        assert_eq!(v.rc, 0, "{} {v:?}", p.display());
    };
    let reads = |p: &Path, cmds: &[&str]| {
        let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
        qemu_io(&["-r", "-f", "qcow2"], p, &cmds);
    };
    let p = d.path("no-reftable.qcow2");
    (cases()
        .iter()
        .find(|c| c.name == "no_reftable")
        .unwrap()
        .make)(&p);
    check_all(&p);
    reads(&p, &["read -P 42 0 64k"]);

    let p = d.path("new-refblock-area.qcow2");
    (cases()
        .iter()
        .find(|c| c.name == "data_in_new_refblock_area")
        .unwrap()
        .make)(&p);
    reads(&p, &["read -P 42 0x1b200 512"]);
    check_all(&p);
    reads(&p, &["read -P 42 0x1b200 512"]);

    let p = d.path("ext.qcow2");
    (cases()
        .iter()
        .find(|c| c.name == "ext_l2_unaligned_without_data")
        .unwrap()
        .make)(&p);
    check_all(&p);
    reads(
        &p,
        &[
            "read -P 0xff 0 4k",
            "read -P 0x00 4k 2k",
            "read -P 0xff 6k 122k",
        ],
    );

    let p = d.path("inactive.qcow2");
    (cases()
        .iter()
        .find(|c| c.name == "data_into_inactive_l2")
        .unwrap()
        .make)(&p);
    check_all(&p);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[4u8; 512], 0).unwrap();
    img.close().unwrap();
    assert_check_clean(&p);
    reads(&p, &["read -P 4 0 512"]);
    qemu_img(&["snapshot", "-a", "foo", p.to_str().unwrap()]);
    assert_check_clean(&p);
    reads(&p, &["read -P 1 0 512"]);
}

/// 060 "dirty corrupt image": QEMU repairs a dirty image at a read/write open; there its
/// own overlap check stops the repair half-way and the open fails ("Could not repair
/// dirty image"), leaving a leak for `qemu-img check -r all`. Ours repairs at the open
/// and goes on: a write lands, and the image ends as QEMU's does after the second repair
/// and the same write.
#[test]
fn a_dirty_corrupt_image_is_repaired_on_open() {
    require_qemu_tools();
    let d = TempDir::new("iot-dirty");
    let orig = d.path("img.qcow2");
    img64(&orig);
    poke(&orig, 0x10000, "00000000ffff2a00");
    poke(&orig, 72, "0000000000000001");
    let q = copy_case(&d.0, "q.qcow2", &orig);
    let o = copy_case(&d.0, "o.qcow2", &orig);

    let (rc, _, err) = qemu_img_status(&["info", q.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 7 0 64k", q.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Could not repair dirty image"),
        "QEMU's open was expected to fail: {out:?}"
    );
    assert_eq!(qemu_check(&q, Repair::All).rc, 0);
    io(&q, &["write -P 7 0 64k"]);

    let img = Image::open(&o, &OpenOptions::default()).expect("repaired at open");
    img.write_at(&[7u8; 65536], 0).unwrap();
    img.close().unwrap();
    assert_check_clean(&o);
    assert_check_clean(&q);
    assert_identical(&q, &o);
    let info = qemu_img_info_json(&o);
    assert_eq!(info["dirty-flag"], false, "{info}");
    assert!(
        std::fs::metadata(&o).unwrap().len() <= std::fs::metadata(&q).unwrap().len(),
        "no longer than QEMU's"
    );
}

/// qemu-img check opens the backing chain: a missing backing file fails the check (exit
/// 1, "Could not open backing file"), it is never "No errors".
#[test]
fn a_missing_backing_file_fails_the_check() {
    require_qemu_tools();
    let d = TempDir::new("iot-nobacking");
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    create(&base, "", "1M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    std::fs::remove_file(&base).unwrap();
    let (rc, _, err) = qemu_img_status(&["check", top.to_str().unwrap()]);
    assert_eq!(rc, 1);
    assert!(err.contains("Could not open backing file"), "{err}");
    for m in [Repair::None, Repair::All] {
        let opts = OpenOptions {
            check: true,
            read_only: m == Repair::None,
            ..Default::default()
        };
        let Err(e) = Image::open(&top, &opts) else {
            panic!("a check-open without the backing file must fail ({m:?})");
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("Could not open backing file: Could not open '")
                && msg.contains("No such file or directory"),
            "{msg}"
        );
    }
}
