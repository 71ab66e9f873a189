//! Random write workloads through this library and through qemu-io on twin images, across
//! geometries, versions, refcount widths, extended L2, backing files and internal
//! snapshots. Afterwards: `qemu-img check` is clean, `qemu-img compare` says identical,
//! and every byte read through the library matches a plain byte-array model.

mod support;

use std::path::Path;

use qcow2_engine::{create, CreateOptions, Image, OpenOptions};
use support::*;

struct Case {
    name: &'static str,
    opts: &'static str,
    size: u64,
    backing: bool,
    snapshot: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "default",
        opts: "",
        size: 16 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "c512-rc64",
        opts: "cluster_size=512,refcount_bits=64",
        size: 2 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "c512-rc1",
        opts: "cluster_size=512,refcount_bits=1",
        size: 2 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "c4k-rc8",
        opts: "cluster_size=4k,refcount_bits=8",
        size: 8 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "c2M",
        opts: "cluster_size=2M",
        size: 32 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "v2",
        opts: "compat=0.10",
        size: 16 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "extl2",
        opts: "extended_l2=on",
        size: 16 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "extl2-16k",
        opts: "extended_l2=on,cluster_size=16k",
        size: 8 << 20,
        backing: false,
        snapshot: false,
    },
    Case {
        name: "backing",
        opts: "",
        size: 16 << 20,
        backing: true,
        snapshot: false,
    },
    Case {
        name: "backing-v2-4k",
        opts: "compat=0.10,cluster_size=4k",
        size: 8 << 20,
        backing: true,
        snapshot: false,
    },
    Case {
        name: "backing-extl2",
        opts: "extended_l2=on",
        size: 16 << 20,
        backing: true,
        snapshot: false,
    },
    Case {
        name: "snapshot",
        opts: "",
        size: 16 << 20,
        backing: false,
        snapshot: true,
    },
    Case {
        name: "snapshot-c4k-rc4",
        opts: "cluster_size=4k,refcount_bits=4",
        size: 8 << 20,
        backing: false,
        snapshot: true,
    },
    Case {
        name: "snapshot-extl2",
        opts: "extended_l2=on",
        size: 16 << 20,
        backing: false,
        snapshot: true,
    },
    Case {
        name: "snapshot-backing",
        opts: "",
        size: 16 << 20,
        backing: true,
        snapshot: true,
    },
];

fn qemu_create_args(opts: &str) -> Vec<String> {
    if opts.is_empty() {
        vec![]
    } else {
        vec!["-o".into(), opts.into()]
    }
}

/// One random write: offset, length, pattern byte.
fn random_write(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64, u8) {
    let aligned = rng.below(3) == 0;
    let len = if aligned {
        cs * (1 + rng.below(3))
    } else {
        1 + rng.below(cs * 2 + 1000)
    };
    let len = len.min(size / 2);
    let mut off = rng.below(size - len);
    if aligned {
        off -= off % cs;
    }
    (off, len, (1 + rng.below(254)) as u8)
}

fn apply_ours(img: &Image, model: &mut [u8], w: (u64, u64, u8)) {
    let (off, len, p) = w;
    let buf = vec![p; len as usize];
    img.write_at(&buf, off)
        .unwrap_or_else(|e| panic!("write {off:#x}+{len:#x}: {e}"));
    model[off as usize..(off + len) as usize].fill(p);
}

fn verify_model(img: &Image, model: &[u8], what: &str) {
    let mut buf = vec![0u8; model.len()];
    img.read_at(&mut buf, 0).expect("full read");
    if let Some(i) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {i:#x} reads {:#x}, model says {:#x}",
            buf[i], model[i]
        );
    }
}

fn run_case(case: &Case, seed: u64) {
    let dir = TempDir::new(case.name);
    let ours = dir.path("ours.qcow2");
    let theirs = dir.path("theirs.qcow2");
    let mut model = vec![0u8; case.size as usize];
    let size_s = case.size.to_string();
    let mut copts = CreateOptions::parse(case.opts).expect("options");
    copts.size = Some(case.size);
    let mut qargs = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
    ];
    qargs.extend(qemu_create_args(case.opts));
    if case.backing {
        let base = dir.path("base.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().unwrap(),
            &size_s,
        ]);
        let mut cmds = Vec::new();
        let mut brng = Rng(seed ^ 0xba5e);
        for _ in 0..12 {
            let (off, len, p) = random_write(&mut brng, case.size, 65536);
            cmds.push(format!("write -P {p} {off} {len}"));
            model[off as usize..(off + len) as usize].fill(p);
        }
        qemu_io(&[], &base, &cmds);
        copts.backing_file = Some("base.qcow2".into());
        copts.backing_fmt = Some("qcow2".into());
        qargs.extend([
            "-b".into(),
            "base.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    create(&ours, &copts).unwrap_or_else(|e| panic!("{}: create: {e}", case.name));
    let mut q: Vec<String> = qargs.clone();
    q.push(theirs.to_str().unwrap().into());
    q.push(size_s.clone());
    let qr: Vec<&str> = q.iter().map(String::as_str).collect();
    qemu_img(&qr);

    let mut rng = Rng(seed);
    let mut cs = 0;
    let phases = if case.snapshot { 2 } else { 1 };
    for phase in 0..phases {
        let img = Image::open(&ours, &OpenOptions::default()).expect("open ours");
        cs = img.cluster_size();
        let mut cmds = Vec::new();
        for _ in 0..50 {
            let w = random_write(&mut rng, case.size, cs);
            apply_ours(&img, &mut model, w);
            cmds.push(format!("write -P {} {} {}", w.2, w.0, w.1));
            if rng.below(10) == 0 {
                img.flush().expect("flush");
            }
        }
        verify_model(&img, &model, case.name);
        img.close().expect("close");
        qemu_io(&[], &theirs, &cmds);
        if case.snapshot && phase == 0 {
            for p in [&ours, &theirs] {
                qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
            }
        }
    }
    assert_check_clean(&ours);
    assert_identical(&ours, &theirs);
    let img = Image::open(
        &ours,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    verify_model(&img, &model, case.name);
    drop(img);
    if case.snapshot {
        // The snapshot's data must be intact after the copy-on-write writes.
        for p in [&ours, &theirs] {
            qemu_img(&["snapshot", "-a", "s1", p.to_str().unwrap()]);
        }
        assert_check_clean(&ours);
        assert_identical(&ours, &theirs);
    }
    let _ = cs;
    let _: &Path = &ours;
}

#[test]
fn random_writes_match_qemu_io() {
    for (i, case) in CASES.iter().enumerate() {
        for seed in [1u64, 2] {
            let s = seed * 1000 + i as u64;
            let r = std::panic::catch_unwind(|| run_case(case, s));
            if let Err(e) = r {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("case {} seed {s}: {msg}", case.name);
            }
        }
    }
}

#[test]
fn images_we_create_report_the_same_options_as_qemu_img() {
    let dir = TempDir::new("info");
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=512,refcount_bits=1",
        "refcount_bits=64,lazy_refcounts=on",
        "extended_l2=on,compression_type=zstd",
        "cluster_size=2M,preallocation=metadata",
        "cluster_size=4k,preallocation=falloc",
        "preallocation=full",
    ] {
        let p = dir.path("i.qcow2");
        let mut o = CreateOptions::parse(opts).unwrap();
        o.size = Some(10 << 20);
        create(&p, &o).unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert_check_clean(&p);
        let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        let img = Image::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let i = img.info();
        let has = |s: String| assert!(info.contains(&s), "{opts}: qemu-img info lacks {s}: {info}");
        has(format!("\"virtual-size\": {}", i.virtual_size));
        has(format!("\"cluster-size\": {}", i.cluster_size));
        has(format!(
            "\"compat\": \"{}\"",
            if i.version == 2 { "0.10" } else { "1.1" }
        ));
        if i.version == 3 {
            has(format!("\"refcount-bits\": {}", i.refcount_bits));
            has(format!("\"extended-l2\": {}", i.extended_l2));
            has(format!("\"lazy-refcounts\": {}", i.lazy_refcounts));
            has(format!(
                "\"compression-type\": \"{}\"",
                i.compression_type.name()
            ));
        }
        // Preallocated images read zeros everywhere and are fully mapped.
        let mut buf = vec![1u8; 10 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "{opts}: preallocated image not zero"
        );
        if opts.contains("prealloc") {
            let map = qemu_img(&["map", "--output=json", p.to_str().unwrap()]);
            assert!(!map.contains("\"present\": false"), "{opts}: {map}");
        }
    }
}
