//! `Image::stats`: the host requests each discard policy issues, as the storage counted
//! them (an image on a fresh in-memory storage, so every count is the image's own).

use std::sync::Arc;

use host_io::{MemStorage, Storage};
use qcow2_engine::{create_on, CreateOptions, Image, OpenOptions};

const CS: u64 = 65536;

fn image(options: &str) -> (Arc<MemStorage>, Image) {
    let mem = Arc::new(MemStorage::new());
    let co = CreateOptions {
        size: Some(4 << 20),
        ..CreateOptions::default()
    };
    create_on(mem.clone(), &co, None).unwrap();
    let img =
        Image::open_storage(mem.clone(), &OpenOptions::parse(options).unwrap(), None).unwrap();
    (mem, img)
}

/// Discarding two written clusters (adjacent on the host: one merged request), then a
/// flush: (options, host discards, host write-zeroes) it issues.
#[test]
fn each_policy_issues_what_its_host_layer_says() {
    for (opts, discards, zeroes) in [
        ("provision=off", 0, 0),
        ("provision=full", 0, 1),
        ("provision=metadata", 1, 0),
        ("provision=thin", 1, 0),
        ("provision=reuse", 0, 0),
        ("discard=unmap", 1, 0),
        ("discard=unmap,discard-no-unref=on", 1, 0),
        (
            "discard=unmap,discard-no-unref=on,pass-discard-request=off",
            0,
            0,
        ),
    ] {
        let (mem, img) = image(opts);
        img.write_at(&vec![7u8; 2 * CS as usize], 0).unwrap();
        img.flush().unwrap();
        let before = img.stats().unwrap();
        assert!(before.host_flushes >= 1, "{opts}: {before:?}");
        img.discard(0, 2 * CS).unwrap();
        img.flush().unwrap();
        let after = img.stats().unwrap();
        assert_eq!(
            after.host_discards - before.host_discards,
            discards,
            "{opts}: {after:?}"
        );
        assert_eq!(
            after.host_zeroes - before.host_zeroes,
            zeroes,
            "{opts}: {after:?}"
        );
        if opts == "provision=off" {
            // The discard was ignored: the flush has nothing to make durable.
            assert_eq!(
                after.host_flushes, before.host_flushes,
                "{opts}: a flush with nothing to write issues no host flush: {after:?}"
            );
        } else {
            assert!(
                after.host_flushes > before.host_flushes,
                "{opts}: {after:?}"
            );
        }
        // The image reports what its storage counted.
        assert_eq!(
            (mem.flush_count(), mem.discard_count(), mem.zero_count()),
            (after.host_flushes, after.host_discards, after.host_zeroes),
            "{opts}"
        );
    }
}
