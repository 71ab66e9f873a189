//! QEMU's iotest 177 ("corner cases with unusual block geometries") as our own scenario:
//! qemu-io runs its requests through blkdebug with a request alignment of 4 KiB and a
//! 64 KiB max-transfer, then a 64 KiB max-transfer with 1 MiB optimal write-zeroes, then
//! non-power-of-2 write-zeroes and discard limits (15 MiB), so QEMU's block layer splits
//! and aligns each request before qcow2 sees it. The engine has no such limits: it runs
//! the same requests whole, and the result must be the same, since splitting must never
//! change what a request does: raw L1/L2 entries, refcounts, guest content (177's verify
//! list, and `qemu-img compare`), `qemu-img check` clean. A 1 MiB cluster overlay of
//! 128 MiB over a base of the same size, as 177; for version 3 and version 2 images.
//! One difference is blkdebug's own: it refuses write-zeroes pieces shorter than its
//! write-zeroes alignment (to exercise the fallback), so QEMU writes zero bytes over
//! those clusters where the engine, given the whole request, makes them zero clusters;
//! those clusters are checked to be exactly that.

mod support;

use std::path::Path;

use qcow2_engine::{Image, OpenOptions};
use support::prov::refcount_of;
use support::*;

const M: u64 = 1 << 20;

/// Every L1 word, then every L2 entry word of the active tree.
fn raw_tables(p: &Path) -> (Vec<u64>, Vec<u64>) {
    let cs = 1u64 << file_be32(p, 20);
    let (l1, n) = (file_be64(p, 40), u64::from(file_be32(p, 36)));
    let mut l1s = Vec::new();
    let mut l2s = Vec::new();
    for i in 0..n {
        let e = file_be64(p, l1 + i * 8);
        l1s.push(e);
        let t = e & 0x00ff_ffff_ffff_fe00;
        for j in 0..cs / 8 {
            l2s.push(if t == 0 { 0 } else { file_be64(p, t + j * 8) });
        }
    }
    (l1s, l2s)
}

/// (block-layer limits for QEMU, the request as qemu-io writes it, the engine's request)
type Step = (&'static str, String, fn(&Image) -> qcow2_engine::Result<()>);

fn steps() -> Vec<Step> {
    vec![
        (
            "align=4k,max-transfer=64k",
            "write -q -P 33 1000 128k".into(),
            |img| img.write_at(&[33u8; 128 * 1024], 1000),
        ),
        (
            "align=512,max-transfer=64k,opt-write-zero=1M",
            "write -q -z 8003584 2093056".into(),
            |img| img.write_zeroes(8003584, 2093056, false),
        ),
        (
            "align=512,opt-write-zero=15M,max-write-zero=15M,opt-discard=15M,max-discard=15M",
            "write -q -z 32M 32M".into(),
            |img| img.write_zeroes(32 * M, 32 * M, false),
        ),
        (
            "align=512,opt-write-zero=15M,max-write-zero=15M,opt-discard=15M,max-discard=15M",
            "discard -q 80000001 30M".into(),
            |img| img.discard(80000001, 30 * M),
        ),
    ]
}

fn case(compat: &str) {
    require_qemu_tools();
    let d = TempDir::new(&format!("iot177-{compat}"));
    let base = d.path("base.qcow2");
    let o = format!("cluster_size=1M,compat={compat}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        base.to_str().unwrap(),
        "128M",
    ]);
    qemu_io(&[], &base, &["write -q -P 11 0 128M".into()]);
    let (q, e) = (d.path("q.qcow2"), d.path("e.qcow2"));
    for p in [&q, &e] {
        let a = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ];
        let mut a = a.to_vec();
        a.extend([p.to_str().unwrap(), "128M"]);
        qemu_img(&a);
        qemu_io(&[], p, &["write -q -P 22 0 128M".into()]);
    }
    for (limits, cmd, ours) in steps() {
        let spec = format!(
            "driver=blkdebug,image.driver=qcow2,image.file.filename={},{limits}",
            q.display()
        );
        qemu_io(
            &["--image-opts"],
            Path::new(&spec),
            std::slice::from_ref(&cmd),
        );
        let img = Image::open(&e, &OpenOptions::parse("discard=unmap").unwrap()).unwrap();
        match ours(&img) {
            // Version 2 over a backing file: QEMU's block layer swallows the driver's
            // ENOTSUP for a discard, the engine reports it (the documented difference);
            // neither changes the image.
            Err(err) if compat == "0.10" && cmd.starts_with("discard") => {
                assert!(err.to_string().contains("version 2"), "{err}")
            }
            r => r.unwrap_or_else(|err| panic!("177 [{compat}] {cmd}: {err}")),
        }
        img.close().unwrap();
    }
    // 177's verify list (v2 keeps discarded clusters showing the overlay's old data).
    let discarded = if compat == "0.10" { 22 } else { 0 };
    let verify: Vec<String> = [
        (22, 0, 1000),
        (33, 1000, 128 * 1024),
        (22, 132072, 7871512),
        (0, 8003584, 2093056),
        (22, 10096640, 23457792),
        (0, 32 * M, 32 * M),
        (22, 64 * M, 13 * M),
        (discarded, 77 * M, 29 * M),
        (22, 106 * M, 22 * M),
    ]
    .iter()
    .map(|(p, o, l)| format!("read -q -P {p} {o} {l}"))
    .collect();
    qemu_io(&["-r"], &q, &verify);
    qemu_io(&["-r"], &e, &verify);
    assert_identical(&q, &e);
    assert_check_clean(&q);
    assert_check_clean(&e);
    let ((l1q, l2q), (l1e, l2e)) = (raw_tables(&q), raw_tables(&e));
    // blkdebug refuses write-zeroes pieces smaller than its write-zeroes alignment (to
    // exercise the block layer's fallback), so QEMU writes zero bytes there: data clusters
    // where the whole request gives the engine zero clusters (with their offsets kept).
    let fallback: Vec<usize> = if compat == "1.1" {
        blkdebug_fallback(32 * M, 64 * M, 15 * M)
    } else {
        Vec::new()
    };
    for &i in &fallback {
        assert_eq!(
            l2q[i],
            l2e[i] & !1,
            "177: cluster {i}: the same data cluster"
        );
        assert_eq!(l2e[i] & 1, 1, "177: cluster {i} is a zero cluster here");
    }
    if let Some(i) = (0..l2q.len()).find(|&i| l2q[i] != l2e[i] && !fallback.contains(&i)) {
        panic!(
            "177 [{compat}]: L2 entries differ first at guest cluster {i}: qemu {:#018x}, ours {:#018x}",
            l2q[i], l2e[i]
        );
    }
    assert_eq!(l1q, l1e, "177 [{compat}]: L1 entries");
    let n = std::fs::metadata(&q)
        .unwrap()
        .len()
        .max(std::fs::metadata(&e).unwrap().len())
        .div_ceil(M);
    for c in 0..n {
        assert_eq!(
            refcount_of(&e, c * M),
            refcount_of(&q, c * M),
            "177 [{compat}]: refcount of host cluster {c} (ours, qemu's)"
        );
    }
}

/// Guest clusters (1 MiB) wholly inside the pieces of write-zeroes `[s, e)` that blkdebug
/// refuses: the request cut at multiples of `align`, pieces shorter than `align`.
fn blkdebug_fallback(s: u64, e: u64, align: u64) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = s;
    while pos < e {
        let next = ((pos / align + 1) * align).min(e);
        if next - pos < align {
            let first = pos.div_ceil(M);
            out.extend((first..next / M).map(|c| c as usize));
        }
        pos = next;
    }
    out
}

#[test]
fn iotest_177_unusual_block_limits_v3() {
    case("1.1");
}

#[test]
fn iotest_177_unusual_block_limits_v2() {
    case("0.10");
}
