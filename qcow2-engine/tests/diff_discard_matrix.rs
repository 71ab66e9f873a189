//! The discard / write-zeroes matrix against qemu-io: every starting cluster kind, every
//! operation, under QEMU's options, on twin images prepared by qemu-io. Compared: the raw
//! L2 entry, the refcount of the original host cluster, whether the host range is a hole,
//! guest content (qemu-img compare) and qemu-img check.
//! Known, documented deviation (safe side): under discard-no-unref, discarding an already
//! zero-allocated owned cluster also punches it on the host (QEMU leaves stale data).

mod support;

use std::path::Path;

use host_io::{FileOptions, FileStorage};
use qcow2_engine::{Image, OpenOptions};
use support::*;

const CS: u64 = 65536;
/// Cluster index -> starting kind, as prepared below.
const STATES: &[(u64, &str)] = &[
    (0, "normal"),
    (1, "zero-alloc"),
    (2, "zero-plain"),
    (4, "unallocated"),
    (5, "compressed"),
];

fn prepare(p: &Path, opts: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    let ps = p.to_str().unwrap().to_string();
    a.extend([ps.as_str(), "1M"]);
    qemu_img(&a);
    qemu_io(
        &[],
        p,
        &[
            "write -P 0xaa 0 256k".into(),
            "write -z 64k 64k".into(),
            "write -z -u 128k 64k".into(),
            "write -c -P 0xbb 320k 64k".into(),
        ],
    );
}

fn be64(b: &[u8], o: u64) -> u64 {
    u64::from_be_bytes(b[o as usize..o as usize + 8].try_into().unwrap())
}

/// (L2 entry words, host offset the cluster had before, its refcount, host is a hole)
fn observe(p: &Path, cluster: u64, extl2: bool, host_before: u64) -> (u64, u64, u64, bool) {
    let b = std::fs::read(p).unwrap();
    let l1 = be64(&b, 40);
    let l2 = be64(&b, l1) & 0x00ff_ffff_ffff_fe00;
    let w = if extl2 { 16 } else { 8 };
    let word = be64(&b, l2 + cluster * w);
    let bitmap = if extl2 {
        be64(&b, l2 + cluster * w + 8)
    } else {
        0
    };
    let (rc, hole) = if host_before != 0 {
        let rt = be64(&b, 48);
        let rb = be64(&b, rt);
        let i = (rb + 2 * (host_before / CS)) as usize;
        let rc = u16::from_be_bytes([b[i], b[i + 1]]) as u64;
        let f = FileStorage::open(p, &FileOptions::new().read_only(true)).unwrap();
        let hole = f
            .next_data(host_before)
            .unwrap()
            .is_none_or(|d| d >= host_before + CS);
        (rc, hole)
    } else {
        (0, false)
    };
    (word, bitmap, rc, hole)
}

fn host_of(p: &Path, cluster: u64, extl2: bool) -> u64 {
    let b = std::fs::read(p).unwrap();
    let l1 = be64(&b, 40);
    let l2 = be64(&b, l1) & 0x00ff_ffff_ffff_fe00;
    let w = if extl2 { 16 } else { 8 };
    let e = be64(&b, l2 + cluster * w);
    if e & (1 << 62) != 0 {
        0
    } else {
        e & 0x00ff_ffff_ffff_fe00
    }
}

fn run(create_opts: &str, runtime: &str) -> usize {
    let extl2 = create_opts.contains("extended_l2=on");
    let dir = TempDir::new("matrix");
    let mut cells = 0;
    for &(cluster, state) in STATES {
        for op in ["discard", "write -z", "write -z -u"] {
            let ours = dir.path("ours.qcow2");
            let theirs = dir.path("theirs.qcow2");
            prepare(&ours, create_opts);
            std::fs::copy(&ours, &theirs).unwrap();
            let host = host_of(&ours, cluster, extl2);
            let off = cluster * CS;
            let cmd = format!("{op} {off} {CS}");
            let spec = format!("driver=qcow2,file.filename={},{runtime}", theirs.display());
            qemu_io(
                &["--image-opts"],
                Path::new(&spec),
                std::slice::from_ref(&cmd),
            );
            let img = Image::open(&ours, &OpenOptions::parse(runtime).unwrap()).unwrap();
            match op {
                "discard" => img.discard(off, CS),
                "write -z" => img.write_zeroes(off, CS, false),
                _ => img.write_zeroes(off, CS, true),
            }
            .unwrap_or_else(|e| panic!("{create_opts} {runtime} {state} {op}: {e}"));
            img.close().unwrap();
            let what = format!("[{create_opts}] [{runtime}] {state}: {cmd}");
            let a = observe(&ours, cluster, extl2, host);
            let b = observe(&theirs, cluster, extl2, host);
            let dnu_rediscard = runtime.contains("discard-no-unref=on")
                && state == "zero-alloc"
                && op != "write -z"
                && runtime.contains("discard=unmap")
                && !runtime.contains("pass-discard-request=off");
            if dnu_rediscard {
                assert_eq!((a.0, a.1, a.2), (b.0, b.1, b.2), "{what}: entry/refcount");
                assert!(
                    a.3,
                    "{what}: stale data under an owned zero-allocated cluster must be released"
                );
            } else {
                assert_eq!(
                    a, b,
                    "{what}: (entry, bitmap, refcount, host hole) ours vs qemu-io"
                );
            }
            assert_check_clean(&ours);
            assert_identical(&ours, &theirs);
            cells += 1;
        }
    }
    cells
}

#[test]
fn matrix_v3_standard_l2() {
    let mut n = 0;
    for rt in [
        "discard=unmap",
        "discard=unmap,discard-no-unref=on",
        "discard=unmap,discard-no-unref=on,pass-discard-request=off",
        "discard=unmap,pass-discard-request=off",
        "discard=ignore",
        "discard=ignore,discard-no-unref=on",
    ] {
        n += run("", rt);
    }
    eprintln!("matrix cells: {n}");
}

#[test]
fn matrix_extended_l2() {
    for rt in [
        "discard=unmap",
        "discard=unmap,discard-no-unref=on",
        "discard=ignore",
    ] {
        run("extended_l2=on", rt);
    }
}

#[test]
fn matrix_v2() {
    for rt in [
        "discard=unmap",
        "discard=unmap,pass-discard-request=off",
        "discard=ignore",
    ] {
        run("compat=0.10", rt);
    }
}
