//! QEMU's iotest 154 ("write-zeroes with backing files") as our own scenarios: a 4 KiB
//! cluster overlay over a base of 512-byte clusters (so a base cluster holding data and
//! unallocated base clusters share one overlay cluster), qemu-io on one overlay and the
//! engine on its twin, both over the same base. After each case the twins must agree
//! exactly: every L1 and L2 entry word (host offsets and extended-L2 bitmaps included), the
//! refcount of every host cluster, `qemu-img map --output=json` with offsets, guest content
//! (`qemu-img compare`), and `qemu-img check` clean on both.
//!
//! The point of the case list is QEMU's zero test for a partial write-zeroes: the rest of
//! the (sub)cluster "reads zero" by block status, not by its bytes. Cases covered (154's
//! section names):
//! - "backing file contains zeros": tail unaligned, head unaligned, both unaligned, both
//!   over two clusters -> `section_backing_contains_zeros`
//! - "backing file contains non-zero data before write_zeroes" (at the cluster start, not
//!   at the start) -> `section_data_before`
//! - "... non-zero data after write_zeroes" (directly after, not directly after)
//!   -> `section_data_after`
//! - "write_zeroes covers non-zero data" (front, end, same size, smaller than the request)
//!   -> `section_covers_data`
//! - "spanning two clusters, non-zero before / after request", "spanning two clusters,
//!   partially overwriting backing file" -> `section_two_clusters`
//! - "spanning multiple clusters, non-zero in first / intermediate / final cluster,
//!   partially overwriting" -> `section_multiple_clusters`
//! - "unaligned image tail cluster, no allocation needed" (front, back, middle, entire
//!   cluster; without a backing file, over an unallocated backing cluster of a shorter
//!   backing file, over a zeroed one; the preallocated cluster made partly and wholly
//!   zero) -> `section_tail_no_allocation`
//! - "unaligned image tail cluster, allocation required" (a write beyond the backing
//!   file's end must copy; writes at both ends of the partial cluster keep its middle)
//!   -> `section_tail_allocation_required`
//!
//! Beyond 154 (the differences the zero test makes, and resize):
//! - backing data clusters written with zero bytes (`write -P 0`) next to a partial
//!   write-zeroes, against unallocated and zero backing clusters, for a qcow2 base and a
//!   raw base (written zero bytes vs a hole): QEMU allocates and writes zeros next to zero
//!   *data*; `provision=` modes zero as metadata there (the documented deviation)
//!   -> `zero_bytes_vs_holes_*`
//! - an overlay grown past its shorter backing file's end (`qemu-img resize` against
//!   `Image::resize`), then writes and write-zeroes around the backing file's end; and an
//!   overlay smaller than its backing file grown (QEMU zeroes the new area so the backing
//!   data does not show) -> `resize_*`

mod support;

use std::path::{Path, PathBuf};

use qcow2_engine::{Image, OpenOptions};
use support::ops::Op;
use support::prov::*;
use support::*;

const K: u64 = 1024;
/// 154's image size.
const SIZE: u64 = 128 << 20;

/// One base (shared read-only by both overlays) and the twin overlays.
struct Twins {
    _dir: TempDir,
    base: Option<(PathBuf, &'static str)>,
    q: PathBuf,
    o: PathBuf,
}

/// Create `p` with qemu-img: format, `-o` options, backing (name, format), size.
fn create(p: &Path, fmt: &str, opts: &str, backing: Option<(&str, &str)>, size: u64) {
    let size = size.to_string();
    let mut a = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    if let Some((name, bfmt)) = backing {
        a.extend(["-b", name, "-F", bfmt]);
    }
    a.extend([p.to_str().unwrap(), &size]);
    qemu_img(&a);
}

/// Twin overlays of `size` with `opts`, over a base of `base_size` (format, `-o`) if any.
fn twins(tag: &str, opts: &str, size: u64, base: Option<(&'static str, &str, u64)>) -> Twins {
    let dir = TempDir::new(tag);
    let base = base.map(|(fmt, bopts, bsize)| {
        let name = format!("base.{fmt}");
        create(&dir.path(&name), fmt, bopts, None, bsize);
        (name, fmt)
    });
    let (q, o) = (dir.path("q.qcow2"), dir.path("o.qcow2"));
    for p in [&q, &o] {
        create(
            p,
            "qcow2",
            opts,
            base.as_ref().map(|(n, f)| (n.as_str(), *f)),
            size,
        );
    }
    let base = base.map(|(n, f)| (dir.path(&n), f));
    Twins {
        _dir: dir,
        base,
        q,
        o,
    }
}

impl Twins {
    /// qemu-io commands on the base (the same base under both overlays).
    fn base(&self, cmds: &[&str]) {
        let (p, fmt) = self.base.as_ref().expect("a base");
        let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
        qemu_io(&["-f", fmt], p, &cmds);
    }

    /// `ops` through qemu-io on one overlay and through the engine on the other, each
    /// side in one open, with runtime options `opts` (QEMU's `--image-opts` spelling).
    fn run_with(&self, opts: &str, ops: &[Op]) {
        let spec = format!("driver=qcow2,file.filename={},{opts}", self.q.display());
        let cmds: Vec<String> = ops.iter().map(Op::qemu).collect();
        qemu_io(&["--image-opts"], Path::new(&spec), &cmds);
        let img = Image::open(&self.o, &OpenOptions::parse(opts).unwrap()).expect("open");
        for op in ops {
            op.engine(&img)
                .unwrap_or_else(|e| panic!("engine {}: {e}", op.qemu()));
        }
        img.close().expect("close");
    }

    /// `ops` under QEMU's defaults as the iotests run them.
    fn run(&self, ops: &[Op]) {
        self.run_with("discard=unmap", ops)
    }

    /// Resize both overlays: `qemu-img resize` and `Image::resize`.
    fn resize(&self, size: u64) {
        qemu_img(&["resize", "-q", self.q.to_str().unwrap(), &size.to_string()]);
        let img = Image::open(&self.o, &OpenOptions::default()).expect("open");
        img.resize(size).expect("Image::resize");
        img.close().expect("close");
    }

    /// The module doc's comparison.
    fn same(&self, what: &str) {
        assert_exact_twins(&self.q, &self.o, what);
    }
}

/// The header fields the comparisons need.
struct Geometry {
    cs: u64,
    extended: bool,
    l1: u64,
    l1_size: u64,
}

fn geometry(p: &Path) -> Geometry {
    let version = file_be32(p, 4);
    let incompat = if version >= 3 { file_be64(p, 72) } else { 0 };
    Geometry {
        cs: 1u64 << file_be32(p, 20),
        extended: incompat & (1 << 4) != 0,
        l1: file_be64(p, 40),
        l1_size: u64::from(file_be32(p, 36)),
    }
}

/// Every L1 entry word, then every L2 entry of the active tree as (word, bitmap), raw.
fn raw_tables(p: &Path) -> (Vec<u64>, Vec<(u64, u64)>) {
    let g = geometry(p);
    let esize = if g.extended { 16 } else { 8 };
    let per = g.cs / esize;
    let mut l1 = Vec::new();
    let mut l2 = Vec::new();
    for i in 0..g.l1_size {
        let e = file_be64(p, g.l1 + i * 8);
        l1.push(e);
        let t = e & 0x00ff_ffff_ffff_fe00;
        for j in 0..per {
            if t == 0 {
                l2.push((0, 0));
            } else {
                let w = file_be64(p, t + j * esize);
                let bm = if g.extended {
                    file_be64(p, t + j * esize + 8)
                } else {
                    0
                };
                l2.push((w, bm));
            }
        }
    }
    (l1, l2)
}

/// The refcount of every host cluster up to the end of the longer file.
fn refcounts(p: &Path, clusters: u64) -> Vec<u64> {
    let cs = geometry(p).cs;
    (0..clusters).map(|c| refcount_of(p, c * cs)).collect()
}

/// Twins agree exactly: raw L1/L2 entries, refcounts, map with offsets, content, and
/// both are clean.
fn assert_exact_twins(q: &Path, o: &Path, what: &str) {
    assert_check_clean(q);
    assert_check_clean(o);
    assert_identical(q, o);
    let ((l1q, l2q), (l1o, l2o)) = (raw_tables(q), raw_tables(o));
    assert_eq!(l1q.len(), l1o.len(), "{what}: L1 sizes differ");
    if let Some(i) = (0..l2q.len()).find(|&i| l2q[i] != l2o[i]) {
        panic!(
            "{what}: L2 entries differ first at guest cluster {i}: qemu {:#018x}/{:#018x}, \
             ours {:#018x}/{:#018x}",
            l2q[i].0, l2q[i].1, l2o[i].0, l2o[i].1
        );
    }
    assert_eq!(l1q, l1o, "{what}: L1 entries differ");
    let cs = geometry(q).cs;
    let len = |p: &Path| std::fs::metadata(p).unwrap().len().div_ceil(cs);
    let n = len(q).max(len(o));
    let (rq, ro) = (refcounts(q, n), refcounts(o, n));
    if let Some(c) = (0..n as usize).find(|&c| rq[c] != ro[c]) {
        panic!(
            "{what}: refcounts differ first at host cluster {c}: qemu {}, ours {}",
            rq[c], ro[c]
        );
    }
    let (mq, mo) = (
        without_recursed_zero(&qemu_map(q, &[])),
        without_recursed_zero(&qemu_map(o, &[])),
    );
    assert!(
        mq == mo,
        "{what}: maps differ\nqemu:\n{}\nours:\n{}",
        show(&mq),
        show(&mo)
    );
}

/// The kind of the L2 entry of guest cluster `idx` ('A' data, 'Z' zero, 'z' zero with an
/// offset, '-' unallocated), standard L2 entries only.
fn kind(p: &Path, idx: usize) -> char {
    let w = raw_tables(p).1[idx].0;
    match (w & 1 == 1, w & 0x00ff_ffff_ffff_fe00 != 0) {
        (true, false) => 'Z',
        (true, true) => 'z',
        (false, true) => 'A',
        (false, false) => '-',
    }
}

/// 154's twins: a 4 KiB cluster overlay of 128 MiB over a 512-byte cluster qcow2 base.
fn twins_154(tag: &str) -> Twins {
    require_qemu_tools();
    twins(
        tag,
        "cluster_size=4096",
        SIZE,
        Some(("qcow2", "cluster_size=512", SIZE)),
    )
}

#[test]
fn section_backing_contains_zeros() {
    let t = twins_154("i154-zeros");
    // Tail unaligned, head unaligned, both unaligned, both over two clusters; the base is
    // unallocated everywhere: each partial cluster becomes a zero cluster.
    t.run(&[Op::Zero(0, 2 * K)]);
    t.run(&[Op::Zero(10 * K, 2 * K)]);
    t.run(&[Op::Zero(17 * K, 2 * K)]);
    t.run(&[Op::Zero(27 * K, 2 * K)]);
    t.same("154 backing file contains zeros");
    for i in [0, 2, 4, 6, 7] {
        assert_eq!(kind(&t.o, i), 'Z', "154 zeros: cluster {i}");
    }
}

#[test]
fn section_data_before() {
    let t = twins_154("i154-before");
    // Data at the start of the overlay cluster, zeroes after it; then data not at the
    // start: the cluster is allocated and the base data copied.
    t.base(&["write -q -P 0x11 32k 1k"]);
    t.run(&[Op::Zero(34 * K, K)]);
    t.base(&["write -q -P 0x11 65k 1k"]);
    t.run(&[Op::Zero(66 * K, K)]);
    t.same("154 non-zero data before write_zeroes");
    assert_eq!(kind(&t.o, 8), 'A');
    assert_eq!(kind(&t.o, 16), 'A');
}

#[test]
fn section_data_after() {
    let t = twins_154("i154-after");
    t.base(&["write -q -P 0x11 34k 1k"]);
    t.run(&[Op::Zero(33 * K, K)]);
    t.base(&["write -q -P 0x11 43k 1k"]);
    t.run(&[Op::Zero(41 * K, K)]);
    t.same("154 non-zero data after write_zeroes");
}

#[test]
fn section_covers_data() {
    let t = twins_154("i154-covers");
    // Data at the front of the request, at its end, of its size, smaller than it.
    t.base(&["write -q -P 0x11 5k 1k"]);
    t.run(&[Op::Zero(5 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 14k 1k"]);
    t.run(&[Op::Zero(13 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 21k 2k"]);
    t.run(&[Op::Zero(21 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 30208 1k"]);
    t.run(&[Op::Zero(29 * K, 2 * K)]);
    t.same("154 write_zeroes covers non-zero data");
}

#[test]
fn section_two_clusters() {
    let t = twins_154("i154-two");
    // Non-zero before the request: at the cluster start, between unallocated space,
    // directly before.
    t.base(&["write -q -P 0x11 32k 1k"]);
    t.run(&[Op::Zero(35 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 49k 1k"]);
    t.run(&[Op::Zero(51 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 66k 1k"]);
    t.run(&[Op::Zero(67 * K, 2 * K)]);
    t.same("154 spanning two clusters, non-zero before request");
    let t = twins_154("i154-two-after");
    // Non-zero after: directly after, between unallocated space, at the cluster end.
    t.base(&["write -q -P 0x11 37k 1k"]);
    t.run(&[Op::Zero(35 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 54k 1k"]);
    t.run(&[Op::Zero(51 * K, 2 * K)]);
    t.base(&["write -q -P 0x11 71k 1k"]);
    t.run(&[Op::Zero(67 * K, 2 * K)]);
    t.same("154 spanning two clusters, non-zero after request");
    let t = twins_154("i154-two-over");
    t.base(&["write -q -P 0x11 2k 4k"]);
    t.run(&[Op::Zero(3 * K, 2 * K)]);
    t.same("154 spanning two clusters, partially overwriting backing file");
}

#[test]
fn section_multiple_clusters() {
    for (tag, base, what) in [
        (
            "first",
            "write -q -P 0x11 64k 2k",
            "non-zero in first cluster",
        ),
        (
            "mid",
            "write -q -P 0x11 69k 2k",
            "non-zero in intermediate cluster",
        ),
        (
            "final",
            "write -q -P 0x11 74k 2k",
            "non-zero in final cluster",
        ),
        (
            "over",
            "write -q -P 0x11 65k 10k",
            "partially overwriting backing file",
        ),
    ] {
        let t = twins_154(&format!("i154-multi-{tag}"));
        t.base(&[base]);
        t.run(&[Op::Zero(66 * K, 7 * K)]);
        t.same(&format!("154 spanning multiple clusters, {what}"));
    }
}

#[test]
fn section_tail_no_allocation() {
    require_qemu_tools();
    // The four requests on the partial cluster at the image's end (2 KiB of a 4 KiB
    // cluster): front, back, middle, entire.
    let reqs = [
        Op::Zero(SIZE, 512),
        Op::Zero(SIZE + 1536, 512),
        Op::Zero(SIZE + 512, K),
        Op::Zero(SIZE, 2 * K),
    ];
    for (i, r) in reqs.iter().enumerate() {
        let t = twins(
            &format!("i154-tail-{i}"),
            "cluster_size=4096",
            SIZE + 2 * K,
            None,
        );
        t.run(&[*r]);
        t.same(&format!(
            "154 unaligned tail, no backing file: {}",
            r.qemu()
        ));
    }
    // Over a shorter backing file (2 KiB clusters, 1 KiB past 128 MiB) whose last cluster
    // is unallocated, then zeroed.
    for zeroed in [false, true] {
        for (i, r) in reqs.iter().enumerate() {
            let t = twins(
                &format!("i154-tailb-{zeroed}-{i}"),
                "cluster_size=4096",
                SIZE + 2 * K,
                Some(("qcow2", "cluster_size=2048", SIZE + K)),
            );
            if zeroed {
                t.base(&[&format!("write -q -z {SIZE} 512")]);
            }
            t.run(&[*r]);
            t.same(&format!(
                "154 unaligned tail over a shorter backing file (last cluster {}): {}",
                if zeroed { "zeroed" } else { "unallocated" },
                r.qemu()
            ));
        }
    }
    // A preallocated (written) partial tail cluster stays allocated when partly zeroed,
    // and becomes a zero cluster when wholly zeroed.
    let t = twins("i154-tail-alloc", "cluster_size=4096", SIZE + K, None);
    t.run(&[Op::Write(SIZE, K, 1), Op::Zero(SIZE + 512, 512)]);
    t.same("154 unaligned tail, written cluster partly zeroed");
    t.run(&[Op::Zero(SIZE, K)]);
    t.same("154 unaligned tail, written cluster wholly zeroed");
}

#[test]
fn section_tail_allocation_required() {
    require_qemu_tools();
    let base = Some(("qcow2", "cluster_size=512", SIZE + K));
    // Zeroes beyond the backing file's end in a cluster that starts with backing data:
    // the cluster is allocated and the data copied.
    let t = twins("i154-tailcow", "cluster_size=4096", SIZE + 2 * K, base);
    t.base(&[&format!("write -q -P 1 {SIZE} 512")]);
    t.run(&[Op::Zero(SIZE + K, 512)]);
    t.same("154 unaligned tail: write beyond the backing file must copy");
    // Zeroes at both ends of the partial cluster keep the backing data in its middle.
    let t = twins("i154-tailends", "cluster_size=4096", SIZE + 2 * K, base);
    t.base(&[&format!("write -q -P 1 {} 512", SIZE + 512)]);
    t.run(&[Op::Zero(SIZE, 512)]);
    t.same("154 unaligned tail: zeroes at the start keep mid-cluster data");
    t.run(&[Op::Zero(SIZE + 1536, 512)]);
    t.same("154 unaligned tail: zeroes at the end keep mid-cluster data");
}

/// Partial write-zeroes next to backing ranges that read zero in four ways: written zero
/// bytes (data), unallocated (qcow2) or a hole (raw), a zero cluster (qcow2), past the
/// backing file's end. Returns the twins after the requests.
fn zero_bytes_vs_holes(base_fmt: &'static str, opts: &str) -> Twins {
    require_qemu_tools();
    let base_opts = if base_fmt == "qcow2" {
        "cluster_size=4096"
    } else {
        ""
    };
    // 64 KiB overlay clusters (and 2 KiB subclusters with extended L2), 4 MiB base.
    let t = twins(
        &format!("i154-zb-{base_fmt}"),
        opts,
        8 << 20,
        Some((base_fmt, base_opts, 4 << 20)),
    );
    let mut cmds = vec!["write -q -P 0 0 256k".to_string()];
    if base_fmt == "qcow2" {
        cmds.push("write -q -z 512k 256k".into());
    }
    t.base(&cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let sc = if opts.contains("extended_l2=on") {
        2 * K
    } else {
        64 * K
    };
    let mut ops = Vec::new();
    // Over zero bytes (0..256k), unallocated or a hole (256k..512k; a raw file's first
    // block is data: qemu-img allocates it at create), zero clusters (512k..768k).
    for base in [0, 256 * K, 512 * K] {
        ops.push(Op::Zero(base + 64 * K + 100, 1000)); // inside one subcluster
        ops.push(Op::ZeroUnmap(base + 128 * K + sc - 512, K)); // across two subclusters
        ops.push(Op::Zero(base + 192 * K, sc - 512)); // the subcluster's head
    }
    // Straddling the backing file's end, and past it.
    ops.push(Op::Zero((4 << 20) - 512, K));
    ops.push(Op::Zero((5 << 20) + 100, 100));
    t.run(&ops);
    t
}

#[test]
fn zero_bytes_vs_holes_qcow2_base() {
    for opts in ["", "extended_l2=on"] {
        let t = zero_bytes_vs_holes("qcow2", opts);
        t.same(&format!("zero bytes vs holes, qcow2 base [{opts}]"));
        if opts.is_empty() {
            // QEMU allocates next to written zero bytes, zeroes as metadata elsewhere.
            assert_eq!(kind(&t.o, 1), 'A', "next to zero bytes");
            assert_eq!(kind(&t.o, 5), 'Z', "next to unallocated base clusters");
            assert_eq!(kind(&t.o, 9), 'Z', "next to base zero clusters");
            assert_eq!(kind(&t.o, 80), 'Z', "past the backing file's end");
        }
    }
}

#[test]
fn zero_bytes_vs_holes_raw_base() {
    for opts in ["", "extended_l2=on"] {
        let t = zero_bytes_vs_holes("raw", opts);
        t.same(&format!("zero bytes vs holes, raw base [{opts}]"));
        if opts.is_empty() {
            assert_eq!(kind(&t.o, 1), 'A', "next to written zero bytes");
            assert_eq!(kind(&t.o, 5), 'Z', "next to a hole");
        }
    }
}

/// Provisioning modes keep the better result: a partial write-zeroes next to zero bytes
/// zeroes the cluster as metadata (the deviation documented in `provision::action`).
#[test]
fn zero_bytes_provision_modes_zero_as_metadata() {
    require_qemu_tools();
    for mode in ["full", "metadata", "thin", "reuse"] {
        let t = twins(
            &format!("i154-prov-{mode}"),
            "",
            8 << 20,
            Some(("qcow2", "cluster_size=4096", 4 << 20)),
        );
        t.base(&["write -q -P 0 0 256k", "write -q -P 7 256k 64k"]);
        let img = Image::open(
            &t.o,
            &OpenOptions::parse(&format!("provision={mode}")).unwrap(),
        )
        .unwrap();
        img.write_zeroes(64 * K + 100, 1000, false).unwrap();
        img.write_zeroes(256 * K + 100, 1000, false).unwrap();
        img.close().unwrap();
        assert!(
            matches!(kind(&t.o, 1), 'Z' | 'z'),
            "provision={mode}: next to zero bytes"
        );
        assert_eq!(kind(&t.o, 4), 'A', "provision={mode}: next to data");
        assert_check_clean(&t.o);
        let mut buf = vec![0u8; 64 * 1024];
        let img = Image::open(&t.o, &OpenOptions::default()).unwrap();
        img.read_at(&mut buf, 256 * K).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 7) && buf[100..1100].iter().all(|&b| b == 0));
        assert!(buf[1100..].iter().all(|&b| b == 7));
    }
}

/// qemu-img's virtual size of `p`.
fn virtual_size(p: &Path) -> u64 {
    qemu_img_info_json(p)["virtual-size"].as_u64().unwrap()
}

#[test]
fn resize_past_shorter_backing_file() {
    require_qemu_tools();
    // The base ends 1 KiB into a 4 KiB overlay cluster; the overlay starts as large as the
    // base and grows past it, then requests land around the base's end.
    let bsize = (1 << 20) + K;
    for (opts, base_opts) in [
        ("cluster_size=4096", "cluster_size=512"),
        ("extended_l2=on", ""),
    ] {
        let t = twins(
            &format!("i154-resize-{}", opts.len()),
            opts,
            bsize,
            Some(("qcow2", base_opts, bsize)),
        );
        t.base(&[&format!("write -q -P 0x5a 0 {bsize}")]);
        // The overlay's last, partial cluster written before the resize (copy-on-write
        // up to the image's end).
        t.run(&[Op::Write((1 << 20) + 512, 256, 0x11)]);
        t.resize(3 << 20);
        assert_eq!(virtual_size(&t.o), 3 << 20);
        t.same(&format!(
            "resize: grown past the backing file's end [{opts}]"
        ));
        t.run(&[
            Op::Zero((1 << 20) - 512, 2 * K),  // straddles the backing end
            Op::Write(bsize + 512, 512, 0x22), // just past it, same cluster as data
            Op::Zero((2 << 20) + 100, 300),    // far past it: reads zero already
            Op::ZeroUnmap((1 << 20) + 4 * K, 8 * K),
            Op::Write((3 << 20) - 700, 700, 0x33), // the new end
        ]);
        t.same(&format!(
            "resize: requests around the backing file's end [{opts}]"
        ));
    }
}

#[test]
fn resize_overlay_shorter_than_backing_file() {
    require_qemu_tools();
    // An overlay created smaller than its backing file, grown: QEMU zeroes the new area
    // (the base's data there must not appear), as zero clusters with an explicitly
    // written unaligned head.
    for (size, opts) in [
        (512 * K, "cluster_size=4096"),
        (512 * K + 1536, "cluster_size=4096"),
        (300 * K + 512, "extended_l2=on"),
    ] {
        let t = twins(
            &format!("i154-grow-{size}"),
            opts,
            size,
            Some(("qcow2", "", 2 << 20)),
        );
        t.base(&["write -q -P 0x5a 0 2M"]);
        t.run(&[Op::Write(size - 512, 512, 0x11)]);
        t.resize(3 << 20);
        t.same(&format!(
            "resize: overlay of {size} grown over a longer base [{opts}]"
        ));
        let img = Image::open(&t.o, &OpenOptions::default()).unwrap();
        let mut buf = vec![0xffu8; (3 << 20) - size as usize];
        img.read_at(&mut buf, size).unwrap();
        img.close().unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "the grown area shows the backing data"
        );
        t.run(&[Op::Zero(size - 100, 200), Op::Write(size + 100, 100, 0x22)]);
        t.same(&format!("resize: requests at the old end [{opts}]"));
    }
}

#[test]
fn resize_v2_overlay_shorter_than_backing_file() {
    require_qemu_tools();
    // Version 2 has no zero clusters: QEMU cannot zero whole new clusters and fails the
    // resize; growing inside the last subcluster (explicit zero bytes only) works.
    let t = twins(
        "i154-grow-v2",
        "compat=0.10",
        512 * K,
        Some(("qcow2", "compat=0.10", 2 << 20)),
    );
    t.base(&["write -q -P 0x5a 0 2M"]);
    let (code, _, err) = qemu_img_status(&["resize", t.q.to_str().unwrap(), "3M"]);
    assert_ne!(code, 0, "qemu-img resize of a v2 overlay: {err}");
    let img = Image::open(&t.o, &OpenOptions::default()).unwrap();
    let e = img.resize(3 << 20).unwrap_err();
    assert!(
        e.to_string().contains("Failed to zero out new clusters"),
        "{e}"
    );
    assert_eq!(img.virtual_size(), 512 * K);
    img.close().unwrap();
    assert_eq!(virtual_size(&t.q), 512 * K);
    assert_check_clean(&t.o);
    assert_identical(&t.q, &t.o);
    let t = twins(
        "i154-grow-v2-head",
        "compat=0.10",
        1536,
        Some(("qcow2", "compat=0.10", 2 << 20)),
    );
    t.base(&["write -q -P 0x5a 0 2M"]);
    t.resize(2048);
    t.same("resize: v2 overlay grown inside its last cluster");
}

#[test]
fn resize_over_longer_backing_file_dirties_no_bitmap() {
    require_qemu_tools();
    // QEMU's zeroing of the new area is part of the truncate, not a guest write: a
    // persistent bitmap stays clean there (and grows clean), on both sides.
    let t = twins(
        "i154-grow-bitmap",
        "cluster_size=4096",
        512 * K + 1536,
        Some(("qcow2", "", 2 << 20)),
    );
    t.base(&["write -q -P 0x5a 0 2M"]);
    for p in [&t.q, &t.o] {
        qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    }
    t.run(&[Op::Write(100 * K, 4 * K, 0x11)]);
    t.resize(3 << 20);
    assert_identical(&t.q, &t.o);
    assert_check_clean(&t.o);
    let (mq, mo) = (
        support::bitmaps::qemu_dirty_map(&t.q, "b0"),
        support::bitmaps::qemu_dirty_map(&t.o, "b0"),
    );
    assert_eq!(mo, mq, "dirty maps after the resize (ours, qemu's)");
    assert!(
        mq.iter().all(|&(o, l, d)| !d || o + l <= 512 * K),
        "QEMU dirtied the grown area: {mq:?}"
    );
}
