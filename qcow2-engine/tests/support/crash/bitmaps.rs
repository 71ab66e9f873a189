//! Persistent bitmaps at a crash point (`Workload::bitmaps`): each opens as consistent and
//! maintained; an enabled one marks at least every range whose new data may have reached
//! the disk (every byte that differs from the content when recording began, and every
//! request completed before the last barrier), and at most the chunks (4096 bits, the
//! write-intent unit) of requests begun before the crash; a disabled one stays clean.
//! On the sampled points QEMU agrees: `qemu-img info` shows no bitmap in use and
//! `qemu-nbd -B` exports a map that marks at least the same.

use std::path::Path;

use qcow2_engine::Image;

use super::{StepRec, Workload};
use crate::support::bitmaps::{engine_dirty_map, qemu_bitmaps, qemu_dirty_map, DirtyMap};

/// Bits per write-intent chunk (a 512-byte sector of bitmap data).
const CHUNK_BITS: u64 = 4096;

/// Steps whose requests are durable at crash point `n` (up to the last barrier completed
/// before it), and the steps begun before it.
fn steps_at(w: &Workload, n: u64) -> (&[StepRec], &[StepRec]) {
    let durable = w
        .steps
        .iter()
        .rposition(|s| s.barrier && s.end <= n)
        .map_or(0, |b| b + 1);
    let begun = w.steps.iter().take_while(|s| s.start < n).count();
    (&w.steps[..durable], &w.steps[..begun])
}

fn marked(map: &DirtyMap, off: u64) -> bool {
    map.iter().any(|&(o, l, d)| d && o <= off && off < o + l)
}

/// The engine's view of the crash image `img` (open, not yet written), whose guest content
/// is `content`.
pub fn check(w: &Workload, img: &Image, n: u64, content: &[u8]) -> Result<(), String> {
    if w.bitmaps.is_empty() {
        return Ok(());
    }
    if !img.bitmaps_maintained() {
        return Err(format!(
            "bitmaps not maintained after the crash: {:?}",
            img.bitmap_warnings()
        ));
    }
    let list = img.bitmaps().map_err(|e| e.to_string())?;
    let (durable, begun) = steps_at(w, n);
    let size = img.virtual_size();
    for (name, enabled) in &w.bitmaps {
        let Some(b) = list.iter().find(|b| &b.name == name) else {
            return Err(format!("bitmap {name} is gone: {list:?}"));
        };
        if b.inconsistent || b.in_use || b.enabled != *enabled {
            return Err(format!("bitmap {name} after the crash: {b:?}"));
        }
        let map = engine_dirty_map(img, name);
        if !enabled {
            if map.iter().any(|r| r.2) {
                return Err(format!("disabled bitmap {name} changed: {map:x?}"));
            }
            continue;
        }
        let g = b.granularity;
        // At least: every byte whose content changed, every durable request.
        let initial = &w.initial;
        let mut off = 0u64;
        while off < size {
            let end = (off + g).min(size);
            let changed = (off..end)
                .any(|i| content[i as usize] != initial.get(i as usize).copied().unwrap_or(0));
            if changed && !marked(&map, off) {
                return Err(format!(
                    "bitmap {name}: {off:#x}+{g:#x} changed on disk but is not marked"
                ));
            }
            off = end;
        }
        for s in durable {
            if let Some((o, l)) = s.range {
                let mut p = o / g * g;
                while p < (o + l).min(size) {
                    if !marked(&map, p) {
                        return Err(format!(
                            "bitmap {name}: {p:#x} of durable step '{}' is not marked",
                            s.what
                        ));
                    }
                    p += g;
                }
            }
        }
        // At most: the chunks of the requests begun before the crash.
        let chunk = CHUNK_BITS * g;
        for &(o, l, d) in &map {
            if !d {
                continue;
            }
            let mut c = o / chunk;
            while c * chunk < o + l {
                let (cs, ce) = (c * chunk, (c + 1) * chunk);
                let ok = begun
                    .iter()
                    .any(|s| s.range.is_some_and(|(ro, rl)| ro < ce && ro + rl > cs));
                if !ok {
                    return Err(format!(
                        "bitmap {name}: {cs:#x}..{ce:#x} is marked but no request touched it"
                    ));
                }
                c += 1;
            }
        }
    }
    Ok(())
}

/// QEMU's view of the crash image at `path` (a sampled point): no bitmap in use, and each
/// enabled bitmap's NBD map marks at least what the engine's does.
pub fn oracle(w: &Workload, img_map: &[(String, DirtyMap)], path: &Path) -> Result<(), String> {
    if w.bitmaps.is_empty() {
        return Ok(());
    }
    let q = qemu_bitmaps(path);
    for (name, enabled) in &w.bitmaps {
        let Some((_, _, flags)) = q.iter().find(|b| &b.0 == name) else {
            return Err(format!("qemu-img info lists no bitmap {name}: {q:?}"));
        };
        let want: Vec<String> = if *enabled {
            vec!["auto".into()]
        } else {
            Vec::new()
        };
        if *flags != want {
            return Err(format!("qemu-img info: bitmap {name} has flags {flags:?}"));
        }
    }
    for (name, ours) in img_map {
        let theirs = qemu_dirty_map(path, name);
        if &theirs != ours {
            return Err(format!(
                "bitmap {name}: qemu-nbd exports {theirs:x?}, the engine reads {ours:x?}"
            ));
        }
    }
    Ok(())
}
