//! Images made by qemu-img / qemu-io must read identically through this library.
//!
//! Each case creates an image with qemu-img (one creation option set per case), fills it
//! with qemu-io writes of several kinds (data from random source files and patterns, at
//! aligned and unaligned offsets, `write -z`, `write -z -u`, `discard`, compressed writes,
//! sub-cluster writes with extended L2), and sometimes internal snapshots or a backing
//! chain. The oracle is `qemu-img convert -O raw`; the whole image is then read through
//! `Image::open(.., read_only)` in odd-sized chunks (so reads straddle clusters and
//! subclusters), again with a tiny sliced L2 cache, and at every cluster boundary of the
//! interesting area, and compared byte for byte. `img.info()` is checked against
//! `qemu-img info --output=json`.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qcow2_engine::{CacheOptions, Image, ImageInfo, OpenOptions};
use serde_json::Value;
use support::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// First full-image pass: 1 MiB + 4093 bytes, so chunk edges drift across every alignment.
const CHUNK_A: usize = (1 << 20) + 4093;
/// Second pass (with a tiny L2 cache): 192 KiB + 511 bytes.
const CHUNK_B: usize = 3 * 65536 + 511;

/// A scratch directory with the random/compressible source files qemu-io writes from.
struct Work {
    dir: TempDir,
}

impl Work {
    fn new(tag: &str) -> Work {
        require_qemu_tools();
        let dir = TempDir::new(&format!("qemu-images-{tag}"));
        let w = Work { dir };
        // Three different random sources (so equal-length writes differ) and one
        // compressible, position-dependent text source. 8 MiB covers 4 clusters of 2 MiB.
        for (i, seed) in [(1u64, 0x1111u64), (2, 0x2222), (3, 0x3333)] {
            let mut rng = Rng(seed);
            let mut v = Vec::with_capacity((8 * MIB) as usize);
            while v.len() < (8 * MIB) as usize {
                v.extend_from_slice(&rng.next().to_le_bytes());
            }
            std::fs::write(w.path(&format!("rand{i}.bin")), v).expect("write source file");
        }
        let mut t = String::with_capacity((8 * MIB) as usize);
        let mut i = 0u64;
        while t.len() < (8 * MIB) as usize {
            t.push_str(&format!("line {i:010} of the compressible source\n"));
            i += 1;
        }
        std::fs::write(w.path("text.bin"), t).expect("write text source");
        w
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    fn src(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8").to_string()
    }

    /// `qemu-img create -f qcow2 [-o opts] <name> <size>`.
    fn create(&self, name: &str, opts: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let ps = p.to_str().expect("utf-8").to_string();
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([ps.as_str(), size.as_str()]);
        qemu_img(&args);
        p
    }

    /// An overlay on `backing` (named relative to the overlay's directory).
    fn create_overlay(
        &self,
        name: &str,
        backing: &str,
        fmt: &str,
        opts: &str,
        size: Option<u64>,
    ) -> PathBuf {
        let p = self.path(name);
        let ps = p.to_str().expect("utf-8").to_string();
        let size = size.map(|s| s.to_string());
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(ps.as_str());
        if let Some(s) = &size {
            args.push(s.as_str());
        }
        qemu_img(&args);
        p
    }

    fn io(&self, image: &Path, cmds: &[String]) {
        qemu_io(&["-f", "qcow2"], image, cmds);
    }
}

/// The standard workload for cluster size `c` and virtual size `vs` (needs vs >= 28 c).
/// Every command lands on a defined state; the comments say which cluster kind results.
fn standard_workload(w: &Work, c: u64, vs: u64, compressed: bool) -> Vec<String> {
    assert!(vs >= 28 * c, "workload needs at least 28 clusters");
    let (r1, r2, r3, t) = (
        w.src("rand1.bin"),
        w.src("rand2.bin"),
        w.src("rand3.bin"),
        w.src("text.bin"),
    );
    let mut v = vec![
        // Normal clusters 0..3, random content (each cluster distinct).
        format!("write -s {r1} 0 {}", 4 * c),
        // Unaligned overwrite straddling two cluster boundaries.
        format!("write -P 0x22 {} {}", c + c / 3 + 1, 2 * c + 3),
        // A 14-byte write straddling the boundary of two unallocated clusters (5, 6).
        format!("write -s {r2} {} 14", 6 * c - 7),
        // Data, then zeroed without unmap: zero clusters that keep their host cluster (v3).
        format!("write -s {r3} {} {}", 8 * c, 2 * c),
        format!("write -z {} {}", 8 * c, 2 * c),
        // Data, then zero with unmap on the first cluster: a plain zero cluster.
        format!("write -s {r1} {} {}", 12 * c, 2 * c),
        format!("write -z -u {} {}", 12 * c, c),
        // Data, then discard of the first cluster: unallocated again.
        format!("write -s {r2} {} {}", 16 * c, 2 * c),
        format!("discard {} {}", 16 * c, c),
        // Unaligned zeroing inside allocated data.
        format!("write -s {r3} {} {}", 20 * c, 2 * c),
        format!("write -z {} {}", 20 * c + c / 4 + 1, c),
        // A tiny unaligned zero write into an unallocated cluster.
        format!("write -z {} 9", 23 * c + 5),
    ];
    if compressed {
        v.extend([
            // Compressed clusters (cluster aligned, full cluster), pattern and text.
            format!("write -c -P 0x44 {} {}", 24 * c, c),
            format!("write -c -s {t} {} {}", 25 * c, c),
            format!("write -c -s {t} {} {}", 26 * c, c),
            // A partial overwrite of a compressed cluster (decompress + COW by qemu).
            format!("write -P 0x55 {} 100", 26 * c + c / 2),
        ]);
    }
    v.extend([
        // The unaligned last 4093 bytes of the image, and a run in the middle.
        format!("write -s {r2} {} 4093", vs - 4093),
        format!("write -s {r1} {} 70001", vs / 2 + 12345),
        format!("write -P 0x66 {} {}", vs - 3 * c, c),
    ]);
    v
}

/// Sub-cluster writes for extended L2, in clusters 0..2 (allocated) and 28..31 (fresh).
fn subcluster_workload(w: &Work, c: u64) -> Vec<String> {
    let sc = c / 32;
    let b = 28 * c;
    let r1 = w.src("rand1.bin");
    let mut v = Vec::new();
    if c == 64 * KIB {
        // The literal examples: a data subcluster and a zero subcluster in allocated clusters.
        v.push("write -P 0x33 68k 4k".to_string());
        v.push("write -z 100k 2k".to_string());
    }
    v.extend([
        // Two data subclusters in a fresh cluster: the other 30 stay unallocated.
        format!("write -P 0x33 {} {}", b + 2 * sc, 2 * sc),
        // A zero subcluster in a fresh cluster (no host cluster at all).
        format!("write -z {} {}", b + c + 18 * sc, sc),
        // Unaligned within subclusters (COW inside the subcluster).
        format!("write -s {r1} {} {}", b + c + 3 * sc + 100, sc),
        // Whole cluster of data, then zero and discard some of its subclusters.
        format!("write -P 0x34 {} {}", b + 2 * c, c),
        format!("write -z {} {}", b + 2 * c + 4 * sc, 3 * sc),
        format!("discard {} {}", b + 2 * c + 10 * sc, 2 * sc),
        // Zero a subcluster run straddling the boundary of two clusters.
        format!("write -z {} {}", b + 3 * c - 2 * sc, 4 * sc),
    ]);
    v
}

/// Guest ranges at every cluster (and, with extended L2, subcluster) boundary of the
/// first 32 clusters and around the middle and end of the image: 11-byte reads across each.
fn boundary_reads(info: &ImageInfo) -> Vec<(u64, u64)> {
    let vs = info.virtual_size;
    let step = info.subcluster_size;
    let mut v = Vec::new();
    let mut push_around = |center: u64| {
        let start = center.saturating_sub(5);
        let end = (center + 6).min(vs);
        if start < end {
            v.push((start, end - start));
        }
    };
    let limit = (32 * info.cluster_size).min(vs);
    let mut x = step;
    while x < limit {
        push_around(x);
        x += step;
    }
    for center in [
        vs / 2,
        vs / 2 + 12345,
        vs / 2 + 12345 + 70001,
        vs - 4093,
        vs - 1,
    ] {
        let aligned = center / info.cluster_size * info.cluster_size;
        push_around(center);
        push_around(aligned);
        push_around(aligned + info.cluster_size);
    }
    v.push((vs - 1, 1));
    v
}

fn raw_read(raw: &std::fs::File, buf: &mut [u8], off: u64) {
    // The raw oracle is exactly virtual_size bytes long (qemu-img convert -O raw).
    raw.read_exact_at(buf, off).expect("read raw oracle");
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn describe_diff(label: &str, what: &str, base: u64, got: &[u8], want: &[u8], cs: u64) -> String {
    let i = first_diff(got, want).expect("differs");
    let at = base + i as u64;
    let n = got.len().min(i + 16);
    let last = got[i..]
        .iter()
        .zip(&want[i..])
        .rposition(|(x, y)| x != y)
        .unwrap_or(0)
        + i;
    format!(
        "{label}: {what}: first difference at guest offset {at:#x} (cluster {}, +{:#x}); \
         last difference in this read at {:#x}; library {:02x?} vs qemu {:02x?}",
        at / cs,
        at % cs,
        base + last as u64,
        &got[i..n],
        &want[i..n],
    )
}

/// Read the whole image through the library with `opts` in `chunk`-sized reads and
/// compare with the raw oracle.
fn compare_full(label: &str, image: &Path, raw: &Path, opts: &OpenOptions, chunk: usize) {
    let img = Image::open(image, opts)
        .unwrap_or_else(|e| panic!("{label}: open {}: {e}", image.display()));
    let rawf = std::fs::File::open(raw).expect("open raw oracle");
    let raw_len = rawf.metadata().expect("stat raw").len();
    let vs = img.virtual_size();
    assert_eq!(
        vs, raw_len,
        "{label}: virtual size vs qemu-img convert -O raw length"
    );
    let cs = img.cluster_size();
    let mut got = vec![0u8; chunk];
    let mut want = vec![0u8; chunk];
    let mut off = 0u64;
    while off < vs {
        let n = (vs - off).min(chunk as u64) as usize;
        // Poison the buffer so a read that leaves bytes untouched cannot pass.
        got[..n].fill(0xa5);
        img.read_at(&mut got[..n], off)
            .unwrap_or_else(|e| panic!("{label}: read {n} bytes at {off:#x}: {e}"));
        raw_read(&rawf, &mut want[..n], off);
        if got[..n] != want[..n] {
            panic!(
                "{}",
                describe_diff(
                    label,
                    &format!("chunk {chunk} at {off:#x}"),
                    off,
                    &got[..n],
                    &want[..n],
                    cs
                )
            );
        }
        off += n as u64;
    }
    // Reads past the end are refused, not zero-filled.
    let mut one = [0u8; 1];
    let e = img
        .read_at(&mut one, vs)
        .expect_err("a read at virtual_size must fail");
    assert_eq!(e.errno(), 22, "{label}: read past the end: {e}");
    img.close()
        .unwrap_or_else(|e| panic!("{label}: close: {e}"));
}

/// Short reads across cluster and subcluster boundaries.
fn compare_boundaries(label: &str, image: &Path, raw: &Path) {
    let img = Image::open(image, &read_only()).expect("open");
    let info = img.info();
    let rawf = std::fs::File::open(raw).expect("open raw oracle");
    for (off, len) in boundary_reads(&info) {
        let mut got = vec![0xa5u8; len as usize];
        let mut want = vec![0u8; len as usize];
        img.read_at(&mut got, off)
            .unwrap_or_else(|e| panic!("{label}: boundary read {len} at {off:#x}: {e}"));
        raw_read(&rawf, &mut want, off);
        if got != want {
            panic!(
                "{}",
                describe_diff(
                    label,
                    &format!("boundary read {len} at {off:#x}"),
                    off,
                    &got,
                    &want,
                    info.cluster_size
                )
            );
        }
    }
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

/// Check `img.info()` against `qemu-img info --output=json`.
fn compare_info(label: &str, image: &Path) {
    let j = qemu_img_info_json(image);
    let img = Image::open(image, &read_only()).unwrap_or_else(|e| panic!("{label}: open: {e}"));
    let info = img.info();
    let d = &j["format-specific"]["data"];
    let u = |v: &Value, what: &str| {
        v.as_u64()
            .unwrap_or_else(|| panic!("{label}: qemu-img info lacks {what}: {j}"))
    };
    assert_eq!(
        info.virtual_size,
        u(&j["virtual-size"], "virtual-size"),
        "{label}: virtual size"
    );
    assert_eq!(
        img.virtual_size(),
        info.virtual_size,
        "{label}: virtual_size()"
    );
    assert_eq!(
        info.cluster_size,
        u(&j["cluster-size"], "cluster-size"),
        "{label}: cluster size"
    );
    let version = match d["compat"].as_str() {
        Some("0.10") => 2,
        Some("1.1") => 3,
        other => panic!("{label}: unexpected compat {other:?}"),
    };
    assert_eq!(info.version, version, "{label}: version");
    assert_eq!(
        u64::from(info.refcount_bits),
        u(&d["refcount-bits"], "refcount-bits"),
        "{label}: refcount bits"
    );
    let flag = |k: &str| d[k].as_bool().unwrap_or(false);
    assert_eq!(
        info.lazy_refcounts,
        flag("lazy-refcounts"),
        "{label}: lazy refcounts"
    );
    assert_eq!(
        info.extended_l2,
        flag("extended-l2"),
        "{label}: extended L2"
    );
    let sub = if info.extended_l2 {
        info.cluster_size / 32
    } else {
        info.cluster_size
    };
    assert_eq!(info.subcluster_size, sub, "{label}: subcluster size");
    let ct = d["compression-type"].as_str().unwrap_or("zlib");
    assert_eq!(
        info.compression_type.name(),
        ct,
        "{label}: compression type"
    );
    assert_eq!(
        info.backing_file.as_deref(),
        j["backing-filename"].as_str(),
        "{label}: backing file name"
    );
    assert_eq!(
        info.backing_format.as_deref(),
        j["backing-filename-format"].as_str(),
        "{label}: backing format"
    );
    let snaps = j["snapshots"].as_array().map_or(0, Vec::len);
    assert_eq!(info.snapshots, snaps, "{label}: number of snapshots");
    // Feature bits as qemu-img reports them: dirty (0), corrupt (1), compression type (3),
    // extended L2 (4); compatible: lazy refcounts (0).
    let dirty = j["dirty-flag"].as_bool().unwrap_or(false);
    let mut incompat = 0u64;
    if dirty {
        incompat |= 1;
    }
    if flag("corrupt") {
        incompat |= 2;
    }
    if ct == "zstd" {
        incompat |= 8;
    }
    if info.extended_l2 {
        incompat |= 16;
    }
    assert_eq!(
        info.incompatible_features, incompat,
        "{label}: incompatible features"
    );
    assert_eq!(
        info.compatible_features,
        u64::from(info.lazy_refcounts),
        "{label}: compatible features"
    );
    assert!(info.read_only, "{label}: info().read_only");
}

/// The full comparison: info, oracle, two full passes, boundary reads.
fn check_image(label: &str, image: &Path) {
    compare_info(label, image);
    let raw = image.with_extension("oracle.raw");
    let (i, r) = (image.to_str().expect("utf-8"), raw.to_str().expect("utf-8"));
    qemu_img(&["convert", "-O", "raw", i, r]);
    compare_full(label, image, &raw, &read_only(), CHUNK_A);
    // Second pass: the smallest L2 cache, in slices, so tables are evicted and reloaded.
    let cs = qemu_img_info_json(image)["cluster-size"]
        .as_u64()
        .expect("cluster-size");
    let small = OpenOptions {
        read_only: true,
        cache: CacheOptions {
            l2_cache_size: 1,
            l2_cache_entry_size: cs.min(4096),
            refcount_cache_size: 1,
        },
        ..OpenOptions::default()
    };
    compare_full(
        &format!("{label} (tiny sliced L2 cache)"),
        image,
        &raw,
        &small,
        CHUNK_B,
    );
    compare_boundaries(label, image, &raw);
    let _ = std::fs::remove_file(&raw);
}

/// One creation option set: create, standard workload (+ sub-cluster writes), compare.
fn option_case(tag: &str, opts: &str, cs: u64, size: u64, compressed: bool) {
    let w = Work::new(tag);
    let img = w.create("img.qcow2", opts, size);
    let mut cmds = standard_workload(&w, cs, size, compressed);
    if opts.contains("extended_l2=on") {
        cmds.extend(subcluster_workload(&w, cs));
    }
    w.io(&img, &cmds);
    check_image(tag, &img);
}

#[test]
fn cluster_size_512() {
    option_case("c512", "cluster_size=512", 512, 8 * MIB, true);
}

#[test]
fn cluster_size_4k() {
    option_case("c4k", "cluster_size=4k", 4 * KIB, 8 * MIB, true);
}

#[test]
fn cluster_size_64k() {
    option_case("c64k", "cluster_size=64k", 64 * KIB, 16 * MIB, true);
}

#[test]
fn cluster_size_2m() {
    option_case("c2M", "cluster_size=2M", 2 * MIB, 64 * MIB, true);
}

#[test]
fn compat_0_10() {
    option_case("v2", "compat=0.10", 64 * KIB, 16 * MIB, true);
}

#[test]
fn compat_0_10_cluster_4k() {
    option_case(
        "v2-c4k",
        "compat=0.10,cluster_size=4k",
        4 * KIB,
        8 * MIB,
        true,
    );
}

#[test]
fn compat_1_1() {
    option_case("v3", "compat=1.1", 64 * KIB, 16 * MIB, true);
}

#[test]
fn refcount_bits_1() {
    option_case("rc1", "refcount_bits=1", 64 * KIB, 16 * MIB, true);
}

#[test]
fn refcount_bits_8() {
    option_case(
        "rc8",
        "refcount_bits=8,cluster_size=4k",
        4 * KIB,
        8 * MIB,
        true,
    );
}

#[test]
fn refcount_bits_64() {
    option_case("rc64", "refcount_bits=64", 64 * KIB, 16 * MIB, true);
}

#[test]
fn extended_l2_16k() {
    option_case(
        "extl2-16k",
        "extended_l2=on,cluster_size=16k",
        16 * KIB,
        8 * MIB,
        true,
    );
}

#[test]
fn extended_l2_64k() {
    option_case(
        "extl2-64k",
        "extended_l2=on,cluster_size=64k",
        64 * KIB,
        16 * MIB,
        true,
    );
}

#[test]
fn compression_type_zlib() {
    option_case("zlib", "compression_type=zlib", 64 * KIB, 16 * MIB, true);
}

#[test]
fn compression_type_zstd() {
    option_case("zstd", "compression_type=zstd", 64 * KIB, 16 * MIB, true);
}

#[test]
fn compression_type_zstd_extended_l2() {
    option_case(
        "zstd-extl2",
        "compression_type=zstd,extended_l2=on,cluster_size=32k",
        32 * KIB,
        8 * MIB,
        true,
    );
}

#[test]
fn lazy_refcounts_clean_close() {
    option_case("lazy", "lazy_refcounts=on", 64 * KIB, 16 * MIB, true);
}

// Compressed writes need unallocated clusters (qemu refuses them over preallocated ones).
#[test]
fn preallocation_metadata() {
    option_case(
        "prealloc-metadata",
        "preallocation=metadata",
        64 * KIB,
        16 * MIB,
        false,
    );
}

#[test]
fn preallocation_falloc() {
    option_case(
        "prealloc-falloc",
        "preallocation=falloc",
        64 * KIB,
        16 * MIB,
        false,
    );
}

#[test]
fn preallocation_full() {
    option_case(
        "prealloc-full",
        "preallocation=full,cluster_size=4k",
        4 * KIB,
        8 * MIB,
        false,
    );
}

#[test]
fn preallocation_metadata_extended_l2() {
    option_case(
        "prealloc-extl2",
        "preallocation=metadata,extended_l2=on",
        64 * KIB,
        16 * MIB,
        false,
    );
}

/// A raw source with compressible text, incompressible random data, zero runs and an
/// unaligned tail, converted with `qemu-img convert -c`.
fn convert_compressed_case(tag: &str, opts: &str) {
    let w = Work::new(tag);
    let size = 8 * MIB + 3 * 512;
    let mut src = vec![0u8; size as usize];
    let text = std::fs::read(w.path("text.bin")).expect("text");
    let rand = std::fs::read(w.path("rand1.bin")).expect("rand");
    // [0, 3M) text; [3M, 4M) random; [4M, 5M) zero; [5M + 777, 7M) text; tail random.
    src[..(3 * MIB) as usize].copy_from_slice(&text[..(3 * MIB) as usize]);
    src[(3 * MIB) as usize..(4 * MIB) as usize].copy_from_slice(&rand[..MIB as usize]);
    let a = (5 * MIB + 777) as usize;
    let b = (7 * MIB) as usize;
    src[a..b].copy_from_slice(&text[(MIB as usize)..(MIB as usize + b - a)]);
    let t = (7 * MIB + 100) as usize;
    src[t..].copy_from_slice(&rand[..size as usize - t]);
    let raw_src = w.path("src.raw");
    std::fs::write(&raw_src, &src).expect("write raw source");
    let img = w.path("img.qcow2");
    let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let (s, d) = (
        raw_src.to_str().expect("utf-8"),
        img.to_str().expect("utf-8"),
    );
    args.extend([s, d]);
    qemu_img(&args);
    // The source itself is an oracle too (independent of qemu's read path).
    compare_full(
        &format!("{tag} vs source"),
        &img,
        &raw_src,
        &read_only(),
        CHUNK_A,
    );
    check_image(tag, &img);
}

#[test]
fn convert_compressed_zlib() {
    convert_compressed_case("convert-c-zlib", "");
}

#[test]
fn convert_compressed_zstd() {
    convert_compressed_case("convert-c-zstd", "compression_type=zstd");
}

#[test]
fn convert_compressed_zstd_16k_extended_l2() {
    convert_compressed_case(
        "convert-c-zstd-16k-extl2",
        "compression_type=zstd,cluster_size=16k,extended_l2=on",
    );
}

#[test]
fn convert_compressed_zlib_512() {
    convert_compressed_case("convert-c-zlib-512", "cluster_size=512");
}

/// Internal snapshots: clusters shared with snapshots are then COW'd by further writes.
fn snapshot_case(tag: &str, opts: &str, cs: u64, size: u64) {
    let w = Work::new(tag);
    let img = w.create("img.qcow2", opts, size);
    let ip = img.to_str().expect("utf-8").to_string();
    let mut cmds = standard_workload(&w, cs, size, true);
    if opts.contains("extended_l2=on") {
        cmds.extend(subcluster_workload(&w, cs));
    }
    w.io(&img, &cmds);
    qemu_img(&["snapshot", "-c", "s1", &ip]);
    let r3 = w.src("rand3.bin");
    w.io(
        &img,
        &[
            // Partial and whole overwrites of shared clusters (COW), over the same ranges.
            format!("write -s {r3} {} {}", cs / 2 + 3, 2 * cs),
            format!("write -z {} {}", 3 * cs, cs),
            format!("discard {} {}", 2 * cs, cs),
            format!("write -P 0x67 {} 100", 8 * cs + 7),
            format!("write -P 0x68 {} {}", 24 * cs, cs),
            format!("write -P 0x69 {} 33", 25 * cs + 1),
            format!("write -P 0x6a {} 5000", size - 5000),
        ],
    );
    qemu_img(&["snapshot", "-c", "s2", &ip]);
    w.io(
        &img,
        &[
            format!("write -P 0x6b {} {}", cs + 17, cs),
            format!("write -z -u {} {}", 12 * cs, 2 * cs),
        ],
    );
    qemu_img(&["snapshot", "-c", "s3", &ip]);
    // Deleting a snapshot drops refcounts; the active layer must not change.
    qemu_img(&["snapshot", "-d", "s1", &ip]);
    w.io(&img, &[format!("write -P 0x6c {} 4096", 16 * cs + 5)]);
    check_image(tag, &img);
}

#[test]
fn snapshots_64k() {
    snapshot_case("snap-64k", "", 64 * KIB, 16 * MIB);
}

#[test]
fn snapshots_v2_4k() {
    snapshot_case(
        "snap-v2-4k",
        "compat=0.10,cluster_size=4k",
        4 * KIB,
        8 * MIB,
    );
}

#[test]
fn snapshots_extended_l2_refcount_8() {
    snapshot_case(
        "snap-extl2-rc8",
        "extended_l2=on,refcount_bits=8",
        64 * KIB,
        16 * MIB,
    );
}

/// Overlay workload: COW from the backing file at unaligned offsets, zeroes that hide
/// backing data, discards.
fn overlay_workload(w: &Work, c: u64) -> Vec<String> {
    let r3 = w.src("rand3.bin");
    vec![
        format!("write -s {r3} {} {}", c / 3, 100),
        format!("write -P 0x81 {} {}", 2 * c - 50, 100),
        format!("write -z {} {}", 4 * c, c),
        format!("write -z -u {} {}", 8 * c, c),
        format!("discard {} {}", 9 * c, c),
        format!("write -z {} 77", 12 * c + 5),
        format!("write -P 0x82 {} {}", 20 * c + 1, c),
    ]
}

#[test]
fn backing_qcow2_relative_name() {
    let w = Work::new("backing-qcow2");
    let size = 16 * MIB;
    let base = w.create("base.qcow2", "", size);
    w.io(&base, &standard_workload(&w, 64 * KIB, size, true));
    let top = w.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", None);
    w.io(&top, &overlay_workload(&w, 64 * KIB));
    let info = Image::open(&top, &read_only())
        .expect("open overlay")
        .info();
    assert_eq!(
        info.backing_file.as_deref(),
        Some("base.qcow2"),
        "relative backing name kept"
    );
    // Opening from another working directory must still resolve the relative name.
    check_image("backing-qcow2", &top);
}

#[test]
fn backing_raw() {
    let w = Work::new("backing-raw");
    // An odd-sized raw base (not a multiple of 512): the tail past it reads zero.
    let base = w.path("base.raw");
    let rand = std::fs::read(w.path("rand2.bin")).expect("rand");
    std::fs::write(&base, &rand[..(3 * MIB + 1000) as usize]).expect("write raw base");
    let top = w.create_overlay(
        "top.qcow2",
        "base.raw",
        "raw",
        "cluster_size=4k",
        Some(8 * MIB),
    );
    let mut cmds = overlay_workload(&w, 4 * KIB);
    // A write straddling the end of the raw base.
    cmds.push(format!("write -P 0x83 {} 2000", 3 * MIB));
    w.io(&top, &cmds);
    check_image("backing-raw", &top);
}

#[test]
fn backing_chain_three_deep_mixed_geometry() {
    let w = Work::new("chain3");
    let size = 8 * MIB;
    let base = w.create("base.qcow2", "compat=0.10", size);
    w.io(&base, &standard_workload(&w, 64 * KIB, size, true));
    let mid = w.create_overlay(
        "mid.qcow2",
        "base.qcow2",
        "qcow2",
        "cluster_size=16k,extended_l2=on",
        None,
    );
    let mut cmds = overlay_workload(&w, 16 * KIB);
    // Sub-cluster writes in the middle layer: the other subclusters read from the base.
    cmds.extend(subcluster_workload(&w, 16 * KIB));
    w.io(&mid, &cmds);
    let top = w.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=4k", None);
    w.io(&top, &overlay_workload(&w, 4 * KIB));
    check_image("chain3", &top);
    check_image("chain3-mid", &mid);
}

#[test]
fn overlay_larger_than_base() {
    let w = Work::new("overlay-larger");
    let base_size = 4 * MIB;
    let base = w.create("base.qcow2", "", base_size);
    let r1 = w.src("rand1.bin");
    // Base data right up to its end.
    w.io(&base, &[format!("write -s {r1} 0 {base_size}")]);
    let top = w.create_overlay(
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "extended_l2=on",
        Some(12 * MIB),
    );
    w.io(
        &top,
        &[
            // Straddles the base's end: COW fill from the base, zeros past it.
            format!("write -P 0x91 {} 3000", base_size - 1000),
            // A sub-cluster write in the last base cluster: the rest of it reads from the base.
            format!("write -P 0x92 {} 2048", base_size - 64 * KIB + 4096),
            format!("write -P 0x93 {} 4096", 10 * MIB),
        ],
    );
    check_image("overlay-larger", &top);
    // And explicitly: past the base's end, untouched clusters read zero.
    let img = Image::open(&top, &read_only()).expect("open");
    let mut buf = vec![0xa5u8; (MIB) as usize];
    img.read_at(&mut buf, 6 * MIB)
        .expect("read past the base end");
    assert!(
        buf.iter().all(|&b| b == 0),
        "past the base's end must read zero"
    );
    let mut buf = vec![0u8; 2000];
    img.read_at(&mut buf, base_size - 1000)
        .expect("read across the base end");
    assert!(
        buf.iter().all(|&b| b == 0x91),
        "overlay data across the base's end"
    );
}
