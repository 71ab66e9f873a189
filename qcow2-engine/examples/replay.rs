//! The mixed replay (20,000 requests: 70% 4 KiB writes, 30% 64 KiB discards, 64 MiB image)
//! in every policy, in one run: time, ratio to provision=metadata, host flushes, quarantine
//! releases, file length. Runs each policy REPS times (default 3) and keeps the fastest.
//!
//! `cargo run --release -p qcow2-engine --example replay [DIR] [REPS] [POLICY-FILTER]`

#[path = "../tests/support/policies.rs"]
mod policies;
#[path = "../tests/support/replay.rs"]
mod replay;

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("qcowprov-replay-{}", std::process::id()));
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let filter = args.next().unwrap_or_default();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("img.qcow2");
    let ops = replay::ops(7);
    println!(
        "{} requests (70% 4 KiB writes, 30% 64 KiB discards), 64 MiB image, best of {reps}",
        replay::REQUESTS
    );
    println!(
        "{:<36} {:>9} {:>8} {:>9} {:>9} {:>8}",
        "policy", "ms", "vs meta", "flushes", "releases", "length"
    );
    let runs: Vec<(&str, replay::Run)> = policies::POLICIES
        .iter()
        .filter(|p| p.contains(&filter) || **p == "provision=metadata")
        .map(|p| {
            let best = (0..reps)
                .map(|_| replay::run_engine(&path, p, &ops))
                .min_by_key(|r| r.time)
                .unwrap();
            (*p, best)
        })
        .collect();
    let meta = runs
        .iter()
        .find(|(p, _)| *p == "provision=metadata")
        .unwrap()
        .1
        .time
        .as_secs_f64();
    for (p, r) in &runs {
        println!(
            "{p:<36} {:>9.1} {:>8.2} {:>9} {:>9} {:>7.1}%",
            r.time.as_secs_f64() * 1e3,
            r.time.as_secs_f64() / meta,
            r.flushes,
            r.releases,
            replay::pct(r.len)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
