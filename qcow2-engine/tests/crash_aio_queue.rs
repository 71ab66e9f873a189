//! Crash sweeps through the asynchronous queue: batches of up to 16 requests in flight
//! together (unaligned writes, FUA writes, write-zeroes, discards on disjoint cluster
//! spans, sharing L2 tables and refcount blocks), asynchronous flushes as barriers, and
//! synchronous random steps between them, in every provisioning mode and with QEMU's
//! `discard=unmap`. The sweep (support/crash/sweep.rs) crashes before every recorded
//! storage operation: each image must open, check clean of corruption (the engine's check,
//! and qemu-img's on a sample), and read as the model allows (a request of a batch in
//! flight at the crash may or may not have reached the disk; everything before the last
//! completed flush must have).

mod support;

use support::crash::*;
use support::*;

fn workload(name: &str, create: &str, opts: &str, seed: u64) -> Workload {
    let mut w = Workload::create(name, create, 2 << 20, 2 << 20, opts);
    let mut rng = Rng(seed);
    for round in 0..12 {
        w.async_batch(&mut rng, 16);
        if round % 3 == 2 {
            w.async_flush();
        }
        w.random_steps(&mut rng, 2);
    }
    w.verify_all();
    w.close();
    w
}

#[test]
fn async_batches_survive_a_crash_at_every_operation() {
    require_qemu_tools();
    let mut total = Stats::default();
    for (i, policy) in POLICIES.iter().enumerate() {
        for (j, create) in ["cluster_size=4096", "cluster_size=65536,extended_l2=on"]
            .iter()
            .enumerate()
        {
            let name = format!("aio {policy} {create}");
            let w = workload(&name, create, policy, 100 + (i * 2 + j) as u64);
            let s = sweep(
                &w,
                Sampling {
                    qemu_every: 40,
                    qemu_all: false,
                    salt: (i * 2 + j) as u64,
                    per_point: 1,
                },
            );
            total.add(&s);
        }
    }
    total.assert_ok("async crash sweep", 2000);
}
