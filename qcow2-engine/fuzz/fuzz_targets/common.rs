//! The operation script both targets run on an image that opened: reads at the start,
//! middle and last cluster, writes, discards, write-zeroes with and without may-unmap,
//! flush, map, check (report only, then repair everything), the reads again, close.
//!
//! Every engine error is acceptable (a hostile image may be refused at any step); the
//! targets look for panics, hangs and allocations proportional to a claimed size. One
//! semantic check, on images the engine's own check finds free of corruptions: a write that
//! succeeded, read back at once, returns what was written. (On an image whose refcounts
//! are below its references, allocation may hand out a cluster still in use, as in QEMU:
//! only a check finds that, so such images are exempt.)

use qcow2_engine::{Image, Repair};

/// Largest buffer the script reads or writes at once.
const CHUNK: u64 = 64 * 1024;

/// Ranges wider than this many clusters are clipped (a whole-disk discard of an exabyte
/// image is a legitimate but endless request; the fuzzer looks for hangs elsewhere).
const MAX_RANGE_CLUSTERS: u64 = 64;

/// Knobs the options target sets from its input; `open_image` uses the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Script {
    /// Added (times 512, wrapped into the image) to the write/discard offsets.
    pub shift: u16,
    /// Discard and zero a wide range from offset 0 as well.
    pub wide: bool,
    /// Write an all-zero buffer too (detect-zeroes turns it into write-zeroes).
    pub zero_write: bool,
    /// Switch the discard policy to this string half-way.
    pub reopen: Option<&'static str>,
    /// Grow the image by one cluster before the second round of reads.
    pub grow: bool,
}

fn read(img: &Image, off: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    let _ = img.read_at(&mut buf, off);
}

/// Write `len` bytes of a pattern at `off`; if it worked, reading them back must too and,
/// on a `consistent` image, must return the pattern.
fn write_verified(img: &Image, off: u64, len: u64, byte: u8, consistent: bool) {
    let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
    if img.write_at(&data, off).is_err() {
        return;
    }
    let mut back = vec![0u8; len as usize];
    if img.read_at(&mut back, off).is_ok() && consistent {
        assert!(
            back == data,
            "read after a successful write at {off:#x}+{len:#x} differs"
        );
    }
}

pub fn exercise(img: &Image, s: Script) {
    let vs = img.virtual_size();
    let cs = img.cluster_size();
    let chunk = cs.min(CHUNK);
    let clip = |off: u64, len: u64| len.min(vs.saturating_sub(off));
    let down = |x: u64| x - x % cs;
    let mid = down(vs / 2);
    let last = down(vs.saturating_sub(1));
    let shifted = |base: u64| {
        if vs == 0 {
            0
        } else {
            (base + u64::from(s.shift) * 512) % vs
        }
    };

    let _ = img.info();
    let consistent = img
        .check(Repair::None)
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0);
    for off in [0, mid, last] {
        read(img, off, clip(off, chunk));
    }
    // Past the end: must be an error, not a panic.
    read(img, vs, 512);
    read(img, u64::MAX - 511, 512);

    // Writes: unaligned inside cluster 0, and 4 KiB in the middle.
    let w1 = shifted(512);
    write_verified(img, w1, clip(w1, 4096), 0x5a, consistent);
    let w2 = shifted(mid + cs / 2);
    write_verified(img, w2, clip(w2, 4096), 0xc3, consistent);
    if s.zero_write {
        let _ = img.write_at(&vec![0u8; clip(mid, chunk) as usize], mid);
    }

    // Discard one cluster, zero with and without unmap.
    let _ = img.discard(shifted(0), clip(shifted(0), cs));
    let z1 = shifted(mid);
    let _ = img.write_zeroes(z1, clip(z1, cs), false);
    let _ = img.write_zeroes(last, clip(last, cs), true);
    // Unaligned write-zeroes (head and tail pieces).
    let z2 = shifted(cs + 100);
    let _ = img.write_zeroes(z2, clip(z2, 3000), true);

    if let Some(opts) = s.reopen {
        let _ = img.set_options(opts);
    }
    if s.wide {
        let wide = clip(0, cs.saturating_mul(MAX_RANGE_CLUSTERS));
        let _ = img.discard(0, wide);
        write_verified(img, 0, clip(0, chunk), 0x11, consistent);
        let _ = img.write_zeroes(0, wide, true);
        let _ = img.write_zeroes(0, wide, false);
    }
    let _ = img.flush();

    let span = clip(0, cs.saturating_mul(MAX_RANGE_CLUSTERS));
    if span > 0 {
        let _ = img.map(0, span);
        let _ = img.block_status(0, vs);
        let _ = img.block_status(last, vs - last);
    }

    let _ = img.check(Repair::None);
    let _ = img.check(Repair::All);
    // What the repair left: the same semantic check applies if the engine calls it clean.
    let consistent = img
        .check(Repair::None)
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0);

    if s.grow {
        let _ = img.resize(vs.saturating_add(cs));
    }
    for off in [0, mid, last] {
        read(img, off, clip(off, chunk));
    }
    write_verified(img, last, clip(last, chunk), 0x77, consistent);
    let _ = img.check(Repair::Leaks);
}
