//! Criterion benchmarks for the hot decoders: L2 tables (standard and extended) classified
//! entry by entry, refcount get/set over a whole block at every width, and header parsing.
//!
//! Run with `cargo bench -p qcow2-format --bench format`. Throughput is reported per
//! element (L2 entry or refcount), so criterion's "elem/s" gives ns per entry directly.

// `criterion_group!` and `criterion_main!` generate undocumented public items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qcow2_format::extensions::{FeatureName, HeaderExtension};
use qcow2_format::header::QCOW_MAGIC;
use qcow2_format::{refcount, ClusterKind, Geometry, Header, HeaderArea, L2Entry};

const CLUSTER_BITS: u32 = 16;

/// A 64 KiB L2 table with a realistic mix: normal, zero, unallocated and compressed entries.
fn l2_table(geo: &Geometry) -> Vec<u8> {
    let n = geo.l2_entries();
    let entries: Vec<L2Entry> = (0..n)
        .map(|i| {
            let off = (i + 16) << CLUSTER_BITS;
            match i % 8 {
                0..=3 => L2Entry::new(
                    off | 1 << 63,
                    if geo.extended_l2() { 0xffff_ffff } else { 0 },
                ),
                4 => L2Entry::UNALLOCATED,
                5 if geo.extended_l2() => L2Entry::new(0, 0xffff_ffff_0000_0000),
                5 => L2Entry::new(1, 0),
                6 => L2Entry::new(
                    off | 1 << 63,
                    if geo.extended_l2() {
                        0x0000_ffff_0000_ffff
                    } else {
                        0
                    },
                ),
                _ => {
                    let d = qcow2_format::CompressedDescriptor::for_data(off + 300, 20_000, geo)
                        .unwrap();
                    L2Entry::new(d.encode(geo).unwrap(), 0)
                }
            }
        })
        .collect();
    L2Entry::encode_table(&entries, geo)
}

fn bench_l2(c: &mut Criterion) {
    let mut g = c.benchmark_group("l2_decode_classify_64k");
    for extended in [false, true] {
        let geo = Geometry::new(CLUSTER_BITS, extended, 4).unwrap();
        let raw = l2_table(&geo);
        g.throughput(Throughput::Elements(geo.l2_entries()));
        let name = if extended { "extended" } else { "standard" };
        g.bench_with_input(BenchmarkId::new("kind", name), &raw, |b, raw| {
            b.iter(|| {
                let mut normal = 0u32;
                for e in L2Entry::decode_table(black_box(raw), &geo) {
                    if let Ok(ClusterKind::Normal { .. }) = e.kind(&geo) {
                        normal += 1;
                    }
                }
                normal
            })
        });
        // Extended tables are only useful with the per-subcluster view too.
        if extended {
            g.bench_with_input(
                BenchmarkId::new("kind+subclusters", name),
                &raw,
                |b, raw| {
                    b.iter(|| {
                        let mut acc = 0u32;
                        for e in L2Entry::decode_table(black_box(raw), &geo) {
                            if let Ok(k) = e.kind(&geo) {
                                for s in 0..32 {
                                    acc += e.subcluster_kind(k, &geo, s) as u32;
                                }
                            }
                        }
                        acc
                    })
                },
            );
        }
    }
    g.finish();
}

fn bench_refcount(c: &mut Criterion) {
    let mut g = c.benchmark_group("refcount_block_64k");
    for order in 0..=6u32 {
        let geo = Geometry::new(CLUSTER_BITS, false, order).unwrap();
        let n = geo.refcount_block_entries() as usize;
        let max = geo.refcount_max();
        let mut block = vec![0u8; geo.cluster_size() as usize];
        for i in 0..n {
            refcount::set(&mut block, i, order, (i as u64) & max).unwrap();
        }
        g.throughput(Throughput::Elements(n as u64));
        let bits = 1u32 << order;
        g.bench_function(BenchmarkId::new("get", format!("{bits}bit")), |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for i in 0..n {
                    sum = sum.wrapping_add(refcount::get(black_box(&block), i, order));
                }
                sum
            })
        });
        g.bench_function(BenchmarkId::new("set", format!("{bits}bit")), |b| {
            let mut blk = block.clone();
            b.iter(|| {
                for i in 0..n {
                    refcount::set(black_box(&mut blk), i, order, (i as u64 + 1) & max).unwrap();
                }
            })
        });
    }
    g.finish();
}

fn header_bytes() -> Vec<u8> {
    let mut h = vec![0u8; 112];
    h[..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    h[36..40].copy_from_slice(&2u32.to_be_bytes());
    h[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
    h[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    let header = Header::parse(&h).unwrap();
    // Cluster 0 as QEMU writes it: backing format, the 8-entry feature table, backing name.
    let names = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let area = HeaderArea {
        header,
        extensions: vec![
            HeaderExtension::BackingFormat(b"qcow2".to_vec()),
            HeaderExtension::FeatureNames(
                names
                    .iter()
                    .map(|&(kind, bit, n)| FeatureName {
                        kind,
                        bit,
                        name: n.as_bytes().to_vec(),
                    })
                    .collect(),
            ),
        ],
        backing_file: Some(b"base.qcow2".to_vec()),
    };
    let mut b = area.to_bytes().unwrap();
    b.resize(1 << CLUSTER_BITS, 0);
    b
}

fn bench_header(c: &mut Criterion) {
    let cluster0 = header_bytes();
    let mut g = c.benchmark_group("header");
    g.bench_function("Header::parse", |b| {
        b.iter(|| Header::parse(black_box(&cluster0)).unwrap())
    });
    g.bench_function("HeaderArea::parse", |b| {
        b.iter(|| HeaderArea::parse(black_box(&cluster0)).unwrap())
    });
    let area = HeaderArea::parse(&cluster0).unwrap();
    g.bench_function("HeaderArea::to_bytes", |b| {
        b.iter(|| black_box(&area).to_bytes().unwrap())
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_l2, bench_refcount, bench_header
}
criterion_main!(benches);
