//! As `open_image`, with the runtime options and the script's knobs taken from a 4-byte
//! prefix: byte 0 picks the discard / provisioning options, byte 1 flags (read-only,
//! small caches, 512-byte L2 cache entries, a wide discard, a zero write, a policy switch
//! half-way, growing the image), bytes 2-3 shift the write offsets. The image follows.
#![no_main]

use std::sync::Arc;

use host_io::MemStorage;
use libfuzzer_sys::fuzz_target;
use qcow2_engine::{Image, OpenOptions};

mod common;

/// Discard options, QEMU's names and the provisioning modes.
const POLICIES: &[&str] = &[
    "",
    "discard=unmap",
    "discard=ignore",
    "discard=unmap,discard-no-unref=on",
    "discard=unmap,pass-discard-request=off",
    "discard=unmap,pass-discard-other=off,pass-discard-snapshot=off",
    "discard=unmap,detect-zeroes=unmap",
    "detect-zeroes=on",
    "provision=off",
    "provision=full",
    "provision=metadata",
    "provision=thin",
    "provision=reuse",
    "provision=thin,detect-zeroes=unmap",
    "provision=metadata,detect-zeroes=on",
    "discard=unmap,discard-no-unref=on,detect-zeroes=unmap",
];

fuzz_target!(|data: &[u8]| {
    let [sel, flags, s0, s1, image @ ..] = data else {
        return;
    };
    let policy = POLICIES[usize::from(*sel) % POLICIES.len()];
    let mut s = policy.to_string();
    if flags & 1 != 0 {
        s.push_str(",read-only=on");
    }
    if flags & 2 != 0 {
        // Clamped up to the minimum (2 L2 entries, 4 refcount blocks): constant eviction.
        s.push_str(",l2-cache-size=1,refcount-cache-size=1");
    }
    if flags & 4 != 0 {
        s.push_str(",l2-cache-entry-size=512");
    }
    let Ok(mut opts) = OpenOptions::parse(&s) else {
        panic!("option string {s:?} does not parse");
    };
    opts.no_backing = true;
    let script = common::Script {
        shift: u16::from_be_bytes([*s0, *s1]),
        wide: flags & 8 != 0,
        zero_write: flags & 16 != 0,
        reopen: (flags & 32 != 0)
            .then(|| POLICIES[usize::from(sel.wrapping_add(7)) % POLICIES.len()]),
        grow: flags & 64 != 0,
    };
    let storage = MemStorage::from_vec(image.to_vec());
    let Ok(img) = Image::open_storage(Arc::new(storage), &opts, None) else {
        return;
    };
    common::exercise(&img, script);
    let _ = img.close();
});
