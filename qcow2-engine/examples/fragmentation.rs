//! The fragmentation workload per provisioning mode, beside qemu-io with QEMU's options,
//! in one run: file length and host allocation as % of the virtual size, host extents, time.
//!
//! `cargo run --release -p qcow2-engine --example fragmentation [DIR]`

#[path = "../tests/support/frag.rs"]
mod frag;

use std::path::PathBuf;
use std::time::Duration;

fn row(label: &str, path: &std::path::Path, t: Duration) -> f64 {
    let f = frag::footprint(path);
    println!(
        "{label:<44} {:>7.1}% {:>10.1}% {:>8} {:>9.1}",
        frag::pct(f.len),
        frag::pct(f.allocated),
        f.extents,
        t.as_secs_f64() * 1e3
    );
    t.as_secs_f64()
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("qcowprov-frag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ops = frag::ops(42);
    println!(
        "32 MiB image, 64 KiB clusters, shuffled fill then {} x (discard 1 MiB + rewrite)",
        frag::ROUNDS
    );
    println!(
        "{:<44} {:>8} {:>11} {:>8} {:>9}",
        "run", "length", "allocated", "extents", "ms"
    );
    let have_qemu = std::process::Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok();
    let mut qemu_times = Vec::new();
    for (label, opts) in [
        ("discard=unmap", "discard=unmap"),
        (
            "discard=unmap,discard-no-unref=on",
            "discard=unmap,discard-no-unref=on",
        ),
    ] {
        if !have_qemu {
            break;
        }
        let p = dir.join("qemu.qcow2");
        let t = frag::run_qemu_io(&p, opts, &ops);
        qemu_times.push(row(&format!("qemu-io {label}"), &p, t));
        let p = dir.join("ours.qcow2");
        let t = frag::run_engine(&p, opts, &ops);
        row(&format!("qcowprov {label}"), &p, t);
    }
    for mode in ["off", "full", "metadata", "thin", "reuse"] {
        let p = dir.join("ours.qcow2");
        let t = frag::run_engine(&p, &format!("provision={mode}"), &ops);
        let secs = row(&format!("qcowprov provision={mode}"), &p, t);
        if let Some(q) = qemu_times.first() {
            println!("{:<44} time / qemu-io discard=unmap: {:.2}", "", secs / q);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
