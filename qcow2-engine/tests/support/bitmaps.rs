//! Persistent bitmaps through QEMU's eyes: the dirty map `qemu-nbd -B NAME` exports
//! (read with `nbdinfo --map=qemu:dirty-bitmap:NAME`, libnbd-bin), the same map through
//! the engine, and `qemu-img info`'s bitmap list.

use std::path::Path;
use std::process::Command;

use qcow2_engine::Image;

/// Dirty runs `(offset, length, dirty)`, adjacent runs of the same state merged.
pub type DirtyMap = Vec<(u64, u64, bool)>;

fn push(map: &mut DirtyMap, off: u64, len: u64, dirty: bool) {
    if len == 0 {
        return;
    }
    match map.last_mut() {
        Some((o, l, d)) if *d == dirty && *o + *l == off => *l += len,
        _ => map.push((off, len, dirty)),
    }
}

/// The map of bitmap `name` as QEMU exports it over NBD (read-only, force-share).
pub fn qemu_dirty_map(image: &Path, name: &str) -> DirtyMap {
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name])
        .arg(image)
        .arg("]")
        .output()
        .unwrap_or_else(|e| panic!("cannot run nbdinfo ({e}); install libnbd-bin and qemu-utils"));
    assert!(
        out.status.success(),
        "nbdinfo/qemu-nbd -B {name} {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut map = DirtyMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let n = |s: &str| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("bad nbdinfo line {line}"))
        };
        push(&mut map, n(f[0]), n(f[1]), n(f[2]) & 1 == 1);
    }
    map
}

/// The same map through the engine's dirty-extent query.
pub fn engine_dirty_map(img: &Image, name: &str) -> DirtyMap {
    let size = img.virtual_size();
    let mut map = DirtyMap::new();
    let mut off = 0;
    while off < size {
        let (n, dirty) = img
            .bitmap_dirty(name, off, size - off)
            .expect("bitmap_dirty");
        assert!(n > 0);
        push(&mut map, off, n, dirty);
        off += n;
    }
    map
}

/// Dirty bytes of a map.
pub fn dirty_bytes(map: &DirtyMap) -> u64 {
    map.iter().filter(|r| r.2).map(|r| r.1).sum()
}

/// `qemu-img info`'s bitmaps: (name, granularity, flags).
pub fn qemu_bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = crate::support::qemu_img_info_json(image);
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_string(),
                b["granularity"].as_u64().unwrap_or(0),
                b["flags"]
                    .as_array()
                    .map(|f| {
                        f.iter()
                            .map(|x| x.as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        })
        .collect()
}
