//! Discard / write-zeroes scenarios against qemu-io on twin images, beyond the per-cluster
//! matrix of `discard_matrix.rs`: unaligned heads and tails, a partial cluster at an
//! unaligned image end, requests crossing L2 tables, qcow2 and raw backing files,
//! compressed clusters, extended L2 subclusters, version 2 images, and seeded random
//! mixes, each under QEMU's option sets.
//!
//! Both twins are created by qemu-img with the same `-o` and prepared by the same qemu-io
//! commands; then the scenario runs through qemu-io (`--image-opts` with the runtime
//! options) on one and through the engine (`OpenOptions::parse` of the same string) on the
//! other. Compared afterwards:
//! * `qemu-img compare` says identical, and `qemu-img check` is clean on both;
//! * `qemu-img map --output=json` of both twins, normalized (offsets reduced to present or
//!   absent, adjacent equal rows merged), is equal;
//! * the engine's own [`Image::map`] equals `qemu-img map --output=json` of the same image,
//!   offsets included, on each twin, over the whole image and over unaligned windows.
//!
//! Two things are normalized away, both QEMU artefacts rather than engine behaviour:
//! `zero: true, data: true` rows from QEMU's metadata-preallocation heuristic (see
//! `support::prov::without_recursed_zero`), and filled holes from copying: twins are forked
//! with a sparse copy, because a raw backing file's holes are part of its block status (a
//! partial write-zeroes next to a hole zeroes the whole cluster; next to zero *bytes*, data
//! to block status, QEMU allocates the cluster and writes zero bytes, and so does the
//! engine with these QEMU-style options: `backing_case` has both).
//! Version 2 with a backing file is the one place where results differ by design: QEMU's
//! block layer swallows the driver's ENOTSUP for discard, the engine returns it.

mod support;

use std::path::{Path, PathBuf};

use qcow2_engine::{Error, Image, OpenOptions};
use support::prov::*;
use support::*;

/// QEMU's option sets the scenarios run under.
const QEMU_SETS: &[&str] = &[
    "discard=ignore",
    "discard=unmap",
    "discard=unmap,discard-no-unref=on",
    "detect-zeroes=unmap,discard=unmap",
];

/// One guest request, spelled for both sides.
#[derive(Debug, Clone, Copy)]
enum Req {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Zero(u64, u64),
    ZeroUnmap(u64, u64),
}

impl Req {
    fn qemu(&self) -> String {
        match *self {
            Req::Write(o, l, p) => format!("write -P {p} {o} {l}"),
            Req::Discard(o, l) => format!("discard {o} {l}"),
            Req::Zero(o, l) => format!("write -z {o} {l}"),
            Req::ZeroUnmap(o, l) => format!("write -z -u {o} {l}"),
        }
    }
    fn engine(&self, img: &Image) -> Result<(), Error> {
        match *self {
            Req::Write(o, l, p) => img.write_at(&vec![p; l as usize], o),
            Req::Discard(o, l) => img.discard(o, l),
            Req::Zero(o, l) => img.write_zeroes(o, l, false),
            Req::ZeroUnmap(o, l) => img.write_zeroes(o, l, true),
        }
    }
}

/// Twin images in one directory, with an optional backing file both refer to.
struct Twins {
    dir: TempDir,
    ours: PathBuf,
    theirs: PathBuf,
}

/// Backing file for [`twins`]: format and qemu-io commands that fill it (a raw file is
/// created sparse and filled with plain writes, so it keeps holes).
struct Base<'a> {
    fmt: &'a str,
    cmds: &'a [&'a str],
}

fn twins(tag: &str, create_opts: &str, size: u64, base: Option<Base>) -> Twins {
    let dir = TempDir::new(tag);
    let ours = dir.path("ours.qcow2");
    let theirs = dir.path("theirs.qcow2");
    let size_s = size.to_string();
    let mut extra: Vec<String> = Vec::new();
    if let Some(b) = base {
        let name = format!("base.{}", b.fmt);
        let bp = dir.path(&name);
        qemu_img(&["create", "-q", "-f", b.fmt, bp.to_str().unwrap(), &size_s]);
        let cmds: Vec<String> = b.cmds.iter().map(|s| s.to_string()).collect();
        qemu_io(&["-f", b.fmt], &bp, &cmds);
        extra.extend(["-b".into(), name, "-F".into(), b.fmt.into()]);
    }
    for p in [&ours, &theirs] {
        let mut a: Vec<&str> = vec!["create", "-q", "-f", "qcow2"];
        if !create_opts.is_empty() {
            a.extend(["-o", create_opts]);
        }
        a.extend(extra.iter().map(String::as_str));
        a.extend([p.to_str().unwrap(), size_s.as_str()]);
        qemu_img(&a);
    }
    Twins { dir, ours, theirs }
}

impl Twins {
    /// The same qemu-io commands on both twins (default options).
    fn prep(&self, cmds: &[&str]) {
        let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
        qemu_io(&[], &self.ours, &cmds);
        qemu_io(&[], &self.theirs, &cmds);
    }

    /// A byte-exact copy of both twins into a fresh pair (to run several option sets from
    /// one prepared state).
    fn fork(&self, tag: &str) -> Twins {
        let dir = TempDir::new(tag);
        for e in std::fs::read_dir(&self.dir.0).unwrap() {
            let e = e.unwrap();
            sparse_copy(&e.path(), &dir.0.join(e.file_name()));
        }
        Twins {
            ours: dir.path("ours.qcow2"),
            theirs: dir.path("theirs.qcow2"),
            dir,
        }
    }

    /// Run `reqs` under `runtime` options: qemu-io on theirs, the engine on ours.
    fn run(&self, runtime: &str, reqs: &[Req]) {
        let spec = format!(
            "driver=qcow2,file.filename={},{runtime}",
            self.theirs.display()
        );
        let cmds: Vec<String> = reqs.iter().map(Req::qemu).collect();
        qemu_io(&["--image-opts"], Path::new(&spec), &cmds);
        let img = Image::open(&self.ours, &OpenOptions::parse(runtime).unwrap())
            .unwrap_or_else(|e| panic!("[{runtime}] open: {e}"));
        for r in reqs {
            r.engine(&img)
                .unwrap_or_else(|e| panic!("[{runtime}] {}: {e}", r.qemu()));
        }
        img.close().unwrap();
    }

    /// The comparisons of the module doc.
    fn compare(&self, what: &str) {
        assert_check_clean(&self.ours);
        assert_check_clean(&self.theirs);
        assert_identical(&self.ours, &self.theirs);
        let a = normalize(&without_recursed_zero(&qemu_map(&self.ours, &[])));
        let b = normalize(&without_recursed_zero(&qemu_map(&self.theirs, &[])));
        assert!(
            a == b,
            "{what}: normalized maps differ\nours (engine):\n{}\ntheirs (qemu-io):\n{}",
            show(&a),
            show(&b)
        );
        for p in [&self.ours, &self.theirs] {
            assert_engine_map_matches_qemu(p, what);
        }
    }
}

/// `Image::map` of `p` must equal `qemu-img map --output=json` of `p`, offsets included:
/// over the whole image, and over unaligned windows (`--start-offset`, `--max-length`).
fn assert_engine_map_matches_qemu(p: &Path, what: &str) {
    let img = Image::open(
        p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let mut windows = vec![(0, size)];
    if size > 3 * cs + 8 {
        windows.push((cs / 2 + 3, 2 * cs + 1));
        windows.push((size - cs - 5, cs + 5));
    }
    for (off, len) in windows {
        let ours = engine_map_range(&img, off, len);
        let (o, l) = (off.to_string(), len.to_string());
        // Exact: Image::map applies QEMU's metadata-preallocation test and reports host
        // holes under data clusters as zero, as qemu-img map does.
        let theirs = qemu_map(p, &["--start-offset", &o, "--max-length", &l]);
        assert!(
            ours == theirs,
            "{what}: Image::map({off:#x}, {len:#x}) of {} differs from qemu-img map\n\
             Image::map:\n{}\nqemu-img map:\n{}",
            p.display(),
            show(&ours),
            show(&theirs)
        );
    }
}

/// Fork `t` for each option set, run `reqs`, compare.
fn each_set(t: &Twins, sets: &[&str], reqs: &[Req], what: &str) {
    for set in sets {
        let f = t.fork("dd-fork");
        f.run(set, reqs);
        f.compare(&format!("{what} [{set}]"));
    }
}

const K: u64 = 1024;
const CS: u64 = 64 * K;

#[test]
fn unaligned_heads_tails_and_unaligned_image_end() {
    // 1 MiB + 40 KiB: the last cluster is partial.
    let size = 1024 * K + 40 * K;
    let t = twins("dd-unaligned", "", size, None);
    t.prep(&[&format!("write -P 0xaa 0 {size}")]);
    use Req::*;
    let reqs = [
        Discard(4 * K, 60 * K),              // inside one cluster: ignored
        Discard(CS + 4 * K, 100 * K),        // partial head, whole cluster 2, partial tail
        Discard(200 * K, 130 * K),           // whole clusters 4, partial ends
        Zero(340 * K + 100, 5000),           // inside a data cluster: zero bytes
        ZeroUnmap(400 * K, 70 * K),          // whole cluster 7 (448k..512k)? partial ends
        ZeroUnmap(512 * K + 512, CS + 3000), // head and tail partial, no whole cluster
        Zero(640 * K, CS + 1),               // whole cluster 10 and one byte
        Discard(1024 * K, 40 * K),           // the partial last cluster, to the end
        ZeroUnmap(960 * K + 7, 64 * K - 7),  // unaligned start, ends at cluster 16
    ];
    each_set(&t, QEMU_SETS, &reqs, "unaligned");
    // The partial last cluster discarded from an unaligned start (ignored), and write-zeroes
    // ending exactly at the unaligned end.
    let reqs = [
        Discard(1024 * K + 512, 40 * K - 512),
        ZeroUnmap(1024 * K + 4 * K, 36 * K),
        Zero(1000 * K, 64 * K),
    ];
    each_set(&t, QEMU_SETS, &reqs, "unaligned end");
}

#[test]
fn requests_spanning_l2_tables_512_byte_clusters() {
    // 512-byte clusters: one L2 table maps 64 clusters = 32 KiB.
    let size = 256 * K;
    let t = twins("dd-l2-512", "cluster_size=512", size, None);
    t.prep(&["write -P 0x31 0 100k", "write -P 0x32 150k 100k"]);
    use Req::*;
    let reqs = [
        Discard(30 * K, 40 * K),
        ZeroUnmap(60 * K + 100, 70 * K),
        Zero(96 * K - 512, 70 * K),
        Discard(140 * K + 300, 70 * K),
        ZeroUnmap(230 * K, 26 * K),
    ];
    each_set(&t, QEMU_SETS, &reqs, "c512");
}

#[test]
fn requests_spanning_l2_tables_4k_clusters() {
    // 4 KiB clusters: one L2 table maps 2 MiB.
    let size = 6 * 1024 * K;
    let t = twins("dd-l2-4k", "cluster_size=4k", size, None);
    t.prep(&["write -P 0x41 1536k 3M", "write -P 0x42 5M 512k"]);
    use Req::*;
    let reqs = [
        Discard(2048 * K - 8 * K, 16 * K),
        ZeroUnmap(4096 * K - 12 * K, 30 * K),
        Zero(2048 * K - 100, 200),
        Discard(3000 * K + 1, 1200 * K),
        ZeroUnmap(4600 * K, 1000 * K),
    ];
    each_set(&t, QEMU_SETS, &reqs, "c4k");
}

/// Requests over a backing file: over ranges only the backing file defines (they must read
/// zero afterwards), over overlay data, partial clusters that need copy-on-write.
fn backing_case(fmt: &str, create_opts: &str) {
    let size = 1024 * K;
    // Base: data in two areas, written zero bytes in a third, the rest a hole (raw) or
    // unallocated (qcow2).
    let base_cmds = [
        "write -P 0xbb 0 320k",
        "write -P 0 448k 64k",
        "write -P 0xbc 640k 256k",
    ];
    let t = twins(
        "dd-backing",
        create_opts,
        size,
        Some(Base {
            fmt,
            cmds: &base_cmds,
        }),
    );
    t.prep(&["write -P 0xcc 128k 128k", "write -P 0xcd 704k 10k"]);
    use Req::*;
    let reqs = [
        Discard(0, CS),              // backing data only
        Discard(CS + 4 * K, 60 * K), // partial: ignored
        Discard(128 * K, 64 * K),    // overlay data over backing data
        ZeroUnmap(256 * K, 96 * K),  // backing data, then backing hole, partial tail
        Zero(384 * K, 64 * K),       // nowhere allocated
        Zero(448 * K + 100, 1000),   // partial, backing zero bytes: allocated, as QEMU
        ZeroUnmap(600 * K, 1000),    // partial, backing hole: a zero cluster
        ZeroUnmap(650 * K, 20 * K),  // partial cluster over backing data: zero bytes
        Zero(700 * K + 3, 30 * K),   // overlay cluster partly written, unaligned
        Discard(768 * K, 256 * K),   // backing data to the end
    ];
    let what = format!("{fmt} backing [{create_opts}]");
    let sets: &[&str] = if create_opts.contains("compat=0.10") {
        &["discard=ignore", "discard=unmap"]
    } else {
        QEMU_SETS
    };
    let reqs: Vec<Req> = if create_opts.contains("compat=0.10") {
        // v2 with a backing file: discard is refused (tested below); write-zeroes only.
        reqs.iter()
            .copied()
            .filter(|r| !matches!(r, Discard(..)))
            .collect()
    } else {
        reqs.to_vec()
    };
    each_set(&t, sets, &reqs, &what);
}

#[test]
fn backing_file_qcow2() {
    backing_case("qcow2", "");
}

#[test]
fn backing_file_raw() {
    backing_case("raw", "");
}

#[test]
fn backing_file_extended_l2() {
    backing_case("qcow2", "extended_l2=on");
}

#[test]
fn backing_file_v2_write_zeroes() {
    backing_case("qcow2", "compat=0.10");
}

/// v2 with a backing file: QEMU's qcow2 driver refuses discard with ENOTSUP, which the
/// generic block layer turns into a successful no-op. The engine reports ENOTSUP (errno 95)
/// to its caller and changes nothing.
#[test]
fn v2_backing_discard_is_enotsup_and_changes_nothing() {
    let t = twins(
        "dd-v2-backing",
        "compat=0.10",
        512 * K,
        Some(Base {
            fmt: "qcow2",
            cmds: &["write -P 0xbb 0 512k"],
        }),
    );
    t.prep(&["write -P 0xcc 0 128k"]);
    let spec = format!(
        "driver=qcow2,file.filename={},discard=unmap",
        t.theirs.display()
    );
    qemu_io(
        &["--image-opts"],
        Path::new(&spec),
        &["discard 0 512k".into()],
    );
    let before = std::fs::read(&t.ours).unwrap();
    let img = Image::open(&t.ours, &OpenOptions::parse("discard=unmap").unwrap()).unwrap();
    let e = img.discard(0, 512 * K).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert_eq!(e.errno(), 95, "{e}");
    img.close().unwrap();
    assert_eq!(
        std::fs::read(&t.ours).unwrap(),
        before,
        "a refused discard changed the file"
    );
    t.compare("v2 backing discard");
    qemu_io(
        &[],
        &t.ours,
        &[
            "read -P 0xcc 0 128k".into(),
            "read -P 0xbb 128k 384k".into(),
        ],
    );
}

#[test]
fn compressed_clusters() {
    let size = 1024 * K;
    let t = twins("dd-compressed", "", size, None);
    t.prep(&[
        "write -c -P 0xd1 0 64k",
        "write -c -P 0xd2 64k 64k",
        "write -c -P 0xd3 128k 64k",
        "write -c -P 0xd4 192k 64k",
        "write -c -P 0xd5 256k 64k",
        "write -P 0xd6 320k 64k",
        "write -c -P 0xd7 384k 64k",
    ]);
    use Req::*;
    let reqs = [
        Discard(0, 64 * K),             // whole compressed cluster
        Discard(64 * K + 4 * K, 8 * K), // partial: ignored
        Zero(128 * K, 64 * K),          // write-zeroes unmaps compressed clusters always
        Zero(192 * K + 100, 1000),      // partial: zero bytes, decompress and rewrite
        ZeroUnmap(240 * K, 100 * K),    // partial compressed, whole compressed, data
        Discard(384 * K, 64 * K),
    ];
    each_set(&t, QEMU_SETS, &reqs, "compressed");
}

fn extended_l2_case(create_opts: &str, sc: u64) {
    let size = 1024 * K;
    let t = twins("dd-extl2", create_opts, size, None);
    t.prep(&["write -P 0xe1 0 512k", "write -P 0xe2 700k 3k"]);
    use Req::*;
    let reqs = [
        Zero(sc, 2 * sc),                   // subcluster-aligned inside a cluster
        ZeroUnmap(CS + 2 * sc, 2 * sc),     // subclusters, may-unmap (no refcount change)
        Zero(2 * CS + 100, sc + 7),         // unaligned within subclusters: zero bytes
        ZeroUnmap(3 * CS - sc, 2 * sc),     // last subcluster of one cluster, first of next
        Discard(4 * CS + sc, sc),           // partial: ignored
        ZeroUnmap(5 * CS, CS),              // whole cluster
        Discard(6 * CS, CS),                // whole cluster
        Zero(700 * K - sc, 4 * sc),         // partly allocated subclusters
        ZeroUnmap(8 * CS + sc / 2, 3 * sc), // unaligned over unallocated clusters
    ];
    each_set(
        &t,
        QEMU_SETS,
        &reqs,
        &format!("extended L2 [{create_opts}]"),
    );
}

#[test]
fn extended_l2_subclusters_64k() {
    extended_l2_case("extended_l2=on", 2 * K);
}

#[test]
fn extended_l2_subclusters_16k() {
    extended_l2_case("extended_l2=on,cluster_size=16k", 512);
}

#[test]
fn v2_images() {
    let size = 1024 * K;
    let t = twins("dd-v2", "compat=0.10", size, None);
    t.prep(&["write -P 0xf1 0 640k"]);
    use Req::*;
    let reqs = [
        Discard(0, CS),
        Zero(CS, CS),                // no zero clusters in v2: discarded instead
        ZeroUnmap(2 * CS + 512, CS), // partial ends: zero bytes
        Discard(4 * CS + 1, 2 * CS),
        Zero(8 * CS, 3 * CS), // partly never written
        Write(9 * CS, 4096, 0),
    ];
    each_set(
        &t,
        &[
            "discard=ignore",
            "discard=unmap",
            "detect-zeroes=unmap,discard=unmap",
        ],
        &reqs,
        "v2",
    );
    // discard-no-unref needs v3, on both sides.
    let e = Image::open(
        &t.ours,
        &OpenOptions::parse("discard=unmap,discard-no-unref=on").unwrap(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("discard-no-unref is only supported since qcow2 version 3"),
        "{e}"
    );
}

/// A random request on an image of `size` with clusters of `cs`.
fn random_req(rng: &mut Rng, size: u64, cs: u64) -> Req {
    let aligned = rng.below(4) == 0;
    let len = if aligned {
        cs * (1 + rng.below(4))
    } else {
        1 + rng.below(cs * 3)
    };
    let len = len.min(size);
    let mut off = rng.below(size - len + 1);
    if aligned {
        off -= off % cs;
    }
    // Now and then run to the (possibly unaligned) end of the image.
    if rng.below(12) == 0 {
        off = size - len;
    }
    match rng.below(10) {
        0..=2 => Req::Write(off, len, (1 + rng.below(255)) as u8),
        3 => Req::Write(off, len, 0),
        4..=5 => Req::Discard(off, len),
        6..=7 => Req::Zero(off, len),
        _ => Req::ZeroUnmap(off, len),
    }
}

/// ~200 random requests in four rounds, compared after each round. `DD_SEED=<n>` in the
/// environment replaces every case's seed (to explore; failures name the seed).
fn random_case(create_opts: &str, size: u64, seed: u64, base: Option<Base>, sets: &[&str]) {
    let seed = std::env::var("DD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(seed);
    let t = twins("dd-random", create_opts, size, base);
    t.prep(&[&format!("write -P 0x11 0 {}", size / 2)]);
    let cs = Image::open(
        &t.ours,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap()
    .cluster_size();
    for (i, set) in sets.iter().enumerate() {
        let f = t.fork("dd-random-set");
        let mut rng = Rng(seed ^ (i as u64 * 0x9e37));
        for round in 0..4 {
            let reqs: Vec<Req> = (0..50).map(|_| random_req(&mut rng, size, cs)).collect();
            f.run(set, &reqs);
            f.compare(&format!(
                "random [{create_opts}] seed {seed:#x} [{set}] round {round}"
            ));
        }
    }
}

#[test]
fn random_mixes_64k_unaligned_end() {
    random_case("", 1024 * K + 24 * K, 0x5eed_0001, None, QEMU_SETS);
}

#[test]
fn random_mixes_4k_clusters() {
    random_case("cluster_size=4k", 512 * K, 0x5eed_0002, None, QEMU_SETS);
}

#[test]
fn random_mixes_extended_l2() {
    random_case("extended_l2=on", 1024 * K, 0x5eed_0003, None, QEMU_SETS);
}

#[test]
fn random_mixes_over_qcow2_backing() {
    let base = Base {
        fmt: "qcow2",
        cmds: &["write -P 0xb1 0 300k", "write -P 0xb2 500k 400k"],
    };
    random_case("", 1024 * K, 0x5eed_0004, Some(base), QEMU_SETS);
}

#[test]
fn random_mixes_over_raw_backing_4k_clusters() {
    let base = Base {
        fmt: "raw",
        cmds: &["write -P 0xb3 10000 200k", "write -P 0xb4 300k 100k"],
    };
    random_case(
        "cluster_size=4k",
        512 * K,
        0x5eed_0005,
        Some(base),
        QEMU_SETS,
    );
}

#[test]
fn random_mixes_512_byte_clusters() {
    random_case("cluster_size=512", 128 * K, 0x5eed_0006, None, QEMU_SETS);
}

#[test]
fn random_mixes_v2() {
    // discard-no-unref needs v3.
    let sets = [
        "discard=ignore",
        "discard=unmap",
        "detect-zeroes=unmap,discard=unmap",
    ];
    random_case("compat=0.10", 1024 * K + 8 * K, 0x5eed_0007, None, &sets);
}
