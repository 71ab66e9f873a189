//! Crash consistency while metadata tables grow, in every provisioning mode and with
//! QEMU's `discard=unmap` (with and without `discard-no-unref=on`).
//!
//! The image has 512-byte clusters and 64-bit refcounts: an L2 table maps 32 KiB, one L1
//! cluster 2 MiB of guest space, a refcount block covers 32 KiB of file and one refcount
//! table cluster 2 MiB of it. The workload grows the virtual size in steps (see
//! [`GROWTH`]: a header-only resize, then two that move the L1 table), fills each new area
//! with large sequential writes (new L2 tables, new refcount blocks, and refcount-table
//! moves as the file grows past each 2 MiB the table covers) and mixes in the random steps
//! of `crash_support` (discards and write-zeroes that free or anchor clusters, so the
//! allocator reuses holes while the tables grow).
//!
//! `crash_during_resize_to_a_partial_l1_cluster` grows to sizes whose new L1 table does
//! not fill its last cluster. A workload with `lazy_refcounts=on` makes every crash image
//! carry the dirty bit, so each read-write open runs the repair first.
//!
//! Every operation point is crashed under one of the four crash policies (rotating) and
//! checked as `crash_support` describes; the counts are asserted.

mod support;

use support::crash::*;
use support::*;

const KIB: u64 = 1024;

fn sampling(salt: u64) -> Sampling {
    Sampling {
        qemu_every: 25,
        qemu_all: false,
        salt,
        per_point: 1,
    }
}

/// Large sequential writes over `[from, to)` in chunks of 16..80 KiB, with random steps
/// in between.
fn fill(w: &mut Workload, rng: &mut Rng, from: u64, to: u64) {
    let mut off = from;
    while off < to {
        let len = ((32 + rng.below(96)) * KIB).min(to - off);
        w.write(off, len, false);
        off += len;
        w.random_steps(rng, 1);
    }
}

/// Random steps, then for each size in `sizes`: resize to it, fill the new area (and a bit
/// before it) with large writes mixed with random steps, flush, more random steps.
fn growth_workload(
    name: &str,
    create: &str,
    opts: &str,
    seed: u64,
    start: u64,
    sizes: &[u64],
) -> Workload {
    let max = sizes.iter().copied().max().unwrap_or(start).max(start);
    let mut w = Workload::create(name, create, start, max, opts);
    let mut rng = Rng(seed);
    w.random_steps(&mut rng, 20);
    let mut prev = start;
    for &next in sizes {
        if next != prev {
            w.resize(next);
        }
        fill(&mut w, &mut rng, prev.saturating_sub(200 * KIB), next);
        w.flush();
        w.random_steps(&mut rng, 20);
        prev = next;
    }
    w.verify_all();
    w
}

/// Sizes whose L1 tables are whole clusters (64 entries of 8 bytes per 512-byte cluster,
/// 2 MiB of guest space each): 1 MiB - 16 KiB → 1 MiB only rewrites the header; → 4 MiB
/// and → 6 MiB move the L1 table.
const GROWTH: [u64; 3] = [1 << 20, 2 << 20, 4 << 20];

#[test]
fn crash_during_l1_and_refcount_table_growth_every_mode() {
    let mut total = Stats::default();
    for (i, opts) in POLICIES.iter().enumerate() {
        let mut w = growth_workload(
            &format!("growth 512b/rc64 {opts}"),
            "cluster_size=512,refcount_bits=64",
            opts,
            400 + i as u64,
            (1 << 20) - 16 * KIB,
            &GROWTH,
        );
        assert_eq!(w.img().virtual_size(), 4 << 20);
        w.close();
        total.add(&sweep(&w, sampling(i as u64)));
    }
    total.assert_ok("table growth", 7000);
}

/// Growth to a size whose L1 table ends inside a cluster (1 MiB → 2.5 MiB needs 80 L1
/// entries, 640 bytes in two 512-byte clusters), the common case for real images (a
/// 64 KiB-cluster image growing from 1 GiB to 2 GiB needs 4 entries in one cluster).
#[test]
fn crash_during_resize_to_a_partial_l1_cluster() {
    let mut total = Stats::default();
    for (i, opts) in ["provision=thin", "discard=unmap,discard-no-unref=on"]
        .iter()
        .enumerate()
    {
        let mut w = growth_workload(
            &format!("partial-L1 growth 512b {opts}"),
            "cluster_size=512,refcount_bits=64",
            opts,
            450 + i as u64,
            1 << 20,
            &[2560 * KIB, 3 << 20],
        );
        w.close();
        total.add(&sweep(&w, sampling(i as u64)));
    }
    total.assert_ok("partial-L1 growth", 1000);
}

#[test]
fn crash_with_lazy_refcounts_repairs_on_open() {
    let mut total = Stats::default();
    for (i, opts) in ["provision=thin", "provision=metadata"].iter().enumerate() {
        let mut w = Workload::create(
            &format!("lazy 4k {opts}"),
            "cluster_size=4k,lazy_refcounts=on",
            2 << 20,
            2 << 20,
            opts,
        );
        assert!(w.img().info().lazy_refcounts);
        w.random_steps(&mut Rng(500 + i as u64), 300);
        w.verify_all();
        w.close();
        total.add(&sweep(&w, sampling(i as u64)));
    }
    total.assert_ok("lazy refcounts", 700);
}

/// An overlay smaller than its raw backing file, grown over the backing file's data: the
/// new area must read zero (QEMU zeroes it on truncate) at every crash point, never the
/// backing file's bytes: either the old size, or the new size with zeros there. The old
/// size ends inside a cluster (an explicit zero head) and, with extended L2, inside a
/// subcluster.
#[test]
fn crash_during_resize_over_a_longer_backing_file() {
    let mut total = Stats::default();
    let cases = [
        ("discard=unmap", "cluster_size=4k", (1 << 20) + 1536),
        (
            "provision=thin",
            "cluster_size=16k,extended_l2=on",
            (1 << 20) + 2560,
        ),
    ];
    for (i, (opts, create, start)) in cases.into_iter().enumerate() {
        let dir = TempDir::new("crashgrowb");
        let base: Vec<u8> = (0..3u64 << 20)
            .map(|p| ((p >> 9) * 7 % 251) as u8 | 1)
            .collect();
        std::fs::write(dir.path("base.raw"), &base).unwrap();
        // The guest content: the backing file's bytes up to the old size, zeros after.
        let max = 4u64 << 20;
        let mut initial = base[..start as usize].to_vec();
        initial.resize(max as usize, 0);
        let mut w = Workload::over_backing(
            &format!("grow over a longer backing file [{create}] {opts}"),
            &format!("{create},backing_file=base.raw,backing_fmt=raw"),
            start,
            opts,
            dir,
            initial,
        );
        let mut rng = Rng(470 + i as u64);
        w.random_steps(&mut rng, 40);
        w.resize(max - 64 * KIB);
        w.random_steps(&mut rng, 80);
        w.verify_all();
        w.close();
        total.add(&sweep(&w, sampling(i as u64)));
    }
    total.assert_ok("growth over a longer backing file", 300);
}
