//! L2 entries, compressed descriptors, L1 / refcount table entries and refcount blocks for
//! an arbitrary geometry taken from the first two input bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::compressed::OFLAG_COMPRESSED;
use qcow2_format::{l1, refcount, ClusterKind, CompressedDescriptor, Geometry, L1Entry, L2Entry};

fuzz_target!(|data: &[u8]| {
    let [b0, b1, rest @ ..] = data else {
        return;
    };
    let cluster_bits = 9 + u32::from(*b0 % 13);
    let extended = b1 & 1 != 0 && cluster_bits >= 14;
    let order = u32::from(b1 >> 1) % 7;
    let geo = Geometry::new(cluster_bits, extended, order).expect("in-range geometry");

    // L2 table: classify every entry.
    let entries = L2Entry::decode_table(rest, &geo);
    let w = geo.l2_entry_size() as usize;
    assert_eq!(entries.len(), rest.len() / w);
    assert_eq!(
        L2Entry::encode_table(&entries, &geo),
        &rest[..entries.len() * w]
    );
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(L2Entry::read(rest, i, &geo), *e);
        let Ok(kind) = e.kind(&geo) else { continue };
        for s in 0..geo.subclusters_per_cluster() {
            let _ = e.subcluster_kind(kind, &geo, s);
        }
        match kind {
            ClusterKind::Compressed(d) => {
                assert_eq!(d.encode(&geo), Ok(e.word), "compressed entry round trip");
                let (start, end) = d.host_range();
                assert!(start < end);
                assert!(d.host_clusters(&geo).count() <= 3);
            }
            ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset } => {
                assert!(geo.is_cluster_aligned(offset) && offset != 0);
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => assert_eq!(e.host_offset(), 0),
        }
    }

    // Raw 64-bit words: L1 entries, refcount table entries, compressed descriptors.
    for word in l1::decode_table(rest) {
        let _ = L1Entry(word).validate(&geo);
        if let Ok(off) = refcount::reftable_entry(word, &geo) {
            assert!(geo.is_cluster_aligned(off));
        }
        let d = CompressedDescriptor::decode(word, &geo);
        assert_eq!(d.encode(&geo), Ok((word & !(3 << 62)) | OFLAG_COMPRESSED));
        // An encoder fed arbitrary offsets and lengths must fail cleanly, not overflow.
        if let Ok(d2) = CompressedDescriptor::for_data(word, u64::from(word as u16), &geo) {
            assert_eq!(
                CompressedDescriptor::decode(d2.encode(&geo).unwrap(), &geo),
                d2
            );
        }
    }

    // Refcount blocks: every order over the same bytes (a 512-byte block reaches every
    // path; longer ones only slow the loop down).
    let original = rest[..rest.len().min(512)].to_vec();
    let mut block = original.clone();
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let n = block.len() * 8 / bits as usize;
        for i in 0..n {
            let v = refcount::get(&block, i, order);
            assert!(v <= max);
            let flipped = !v & max;
            refcount::set(&mut block, i, order, flipped).unwrap();
            assert_eq!(refcount::get(&block, i, order), flipped);
            if bits < 64 {
                assert!(refcount::set(&mut block, i, order, max + 1).is_err());
            }
            refcount::set(&mut block, i, order, v).unwrap();
        }
        assert_eq!(
            block, original,
            "order {order}: set/get did not restore the block"
        );
        let _ = refcount::checked_add(max, 1, max, bits);
    }
});
