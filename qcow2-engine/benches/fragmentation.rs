//! Criterion: the fragmentation workload (shuffled fill, 150 x discard 1 MiB + rewrite) on a
//! real file in every provisioning mode and with QEMU's options, and the same requests
//! through qemu-io in the same run (when installed), so the ratio is read off one report.
//! Each sample is one whole workload including open and close (create excluded).

// `criterion_group!` and `criterion_main!` generate undocumented public items.
#![allow(missing_docs)]

#[path = "../tests/support/frag.rs"]
mod frag;
#[path = "../tests/support/policies.rs"]
mod policies;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("qcowprov-fragbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("img.qcow2");
    let ops = frag::ops(42);
    let mut g = c.benchmark_group("fragmentation");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for opts in policies::POLICIES {
        g.bench_function(format!("qcowprov/{opts}"), |b| {
            b.iter_custom(|n| (0..n).map(|_| frag::run_engine(&path, opts, &ops)).sum())
        });
    }
    let have_qemu = std::process::Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok();
    if have_qemu {
        for opts in ["discard=unmap", "discard=unmap,discard-no-unref=on"] {
            g.bench_function(format!("qemu-io/{opts}"), |b| {
                b.iter_custom(|n| (0..n).map(|_| frag::run_qemu_io(&path, opts, &ops)).sum())
            });
        }
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
