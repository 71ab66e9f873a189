//! Persistent dirty bitmaps through the C ABI: the whole life of a bitmap (add, list,
//! walk the dirty extents, clear, enable, disable, merge in the image and from another
//! open image, remove), checked against qemu-img's view of the same file; and every error
//! the API promises (unknown and duplicate names, bad granularity, a name too long, a
//! read-only image, NULL arguments, a short struct) as a negative errno with a message,
//! out-parameters untouched.

mod support;

use std::ffi::c_char;
use std::path::Path;
use std::ptr::{null, null_mut};

use qcowprov::*;
use support::*;

const MIB: u64 = 1 << 20;

fn add(img: *mut QcowprovImage, name: &str, g: u64, flags: u32) -> i32 {
    let n = c(name);
    // SAFETY: a live handle and a C string.
    unsafe { qcowprov_bitmap_add(img, n.as_ptr(), g, flags) }
}

/// Runs one named-bitmap export (remove/clear/enable/disable).
fn named(
    f: unsafe extern "C" fn(*mut QcowprovImage, *const c_char) -> i32,
    img: *mut QcowprovImage,
    name: &str,
) -> i32 {
    let n = c(name);
    // SAFETY: a live handle and a C string.
    unsafe { f(img, n.as_ptr()) }
}

fn merge(img: *mut QcowprovImage, target: &str, src: *mut QcowprovImage, source: &str) -> i32 {
    let (t, s) = (c(target), c(source));
    // SAFETY: live handles (or NULL `src`) and C strings.
    unsafe { qcowprov_bitmap_merge(img, t.as_ptr(), src, s.as_ptr()) }
}

/// Every bitmap: (name, granularity, flags, dirty bytes).
fn list(img: *mut QcowprovImage) -> Vec<(String, u64, u32, u64)> {
    // SAFETY: a live handle.
    let n = unsafe { qcowprov_bitmap_count(img) };
    assert!(n >= 0, "count: {}", last_error());
    (0..n as u32)
        .map(|i| {
            let mut b = QcowprovBitmap::default();
            // SAFETY: a live handle and a struct of the size it says.
            let r = unsafe { qcowprov_bitmap_get(img, i, &mut b) };
            assert_eq!(r, 0, "get {i}: {}", last_error());
            (field(&b.name), b.granularity, b.flags, b.dirty_bytes)
        })
        .collect()
}

/// The dirty runs of bitmap `name` over the whole image, walked as a backup tool does.
fn dirty_runs(img: *mut QcowprovImage, name: &str, size: u64) -> Vec<(u64, u64)> {
    let n = c(name);
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let (mut pnum, mut dirty) = (0u64, 7u32);
        // SAFETY: a live handle, a C string, valid out pointers.
        let r = unsafe {
            qcowprov_bitmap_dirty(img, n.as_ptr(), off, size - off, &mut pnum, &mut dirty)
        };
        assert_eq!(r, 0, "dirty at {off}: {}", last_error());
        assert!(pnum > 0 && pnum <= size - off && dirty <= 1);
        if dirty == 1 {
            match runs.last_mut() {
                Some((o, l)) if *o + *l == off => *l += pnum,
                _ => runs.push((off, pnum)),
            }
        }
        off += pnum;
    }
    runs
}

/// qemu-img info's bitmaps: (name, granularity, flags).
fn qemu_bitmaps(path: &Path) -> String {
    let out = qemu_img(&[
        "info",
        "--force-share",
        "--output=json",
        path.to_str().unwrap(),
    ]);
    let mut v: Vec<String> = Vec::new();
    // A small scan of the JSON (the tests have no JSON crate): each bitmap object lists
    // flags, name and granularity in that order.
    let mut rest = out.as_str();
    while let Some(p) = rest.find("\"flags\": [") {
        rest = &rest[p + 10..];
        let flags: String = rest[..rest.find(']').unwrap()]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("");
        let n = rest.find("\"name\": \"").unwrap() + 9;
        let name = &rest[n..n + rest[n..].find('"').unwrap()];
        let g = rest.find("\"granularity\": ").unwrap() + 15;
        let gran: String = rest[g..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        v.push(format!("{name}:{gran}:{flags}"));
    }
    v.join(" ")
}

#[test]
fn a_bitmap_lives_through_the_c_api_and_qemu_agrees() {
    let dir = TempDir::new("bm-life");
    let (pa, pb) = (dir.path("a.qcow2"), dir.path("b.qcow2"));
    for p in [&pa, &pb] {
        assert_eq!(create(p, "", 64 * MIB), 0, "{}", last_error());
    }
    let img = open(&pa, "", 0).expect("open");
    assert_eq!(add(img, "full", 0, 0), 0, "{}", last_error());
    assert_eq!(add(img, "fine", 4096, 0), 0, "{}", last_error());
    assert_eq!(add(img, "off", 1 << 20, QCOWPROV_BITMAP_ADD_DISABLED), 0);
    assert_eq!(
        list(img),
        vec![
            ("full".into(), 65536, QCOWPROV_BITMAP_ENABLED, 0),
            ("fine".into(), 4096, QCOWPROV_BITMAP_ENABLED, 0),
            ("off".into(), 1 << 20, 0, 0),
        ]
    );
    // A write, a write-zeroes and a discard each mark the whole range they name.
    assert_eq!(pwrite(img, &pattern(5000, 0, 1), 3 * MIB + 100, 0), 5000);
    // SAFETY: a live handle.
    unsafe {
        assert_eq!(qcowprov_write_zeroes(img, 10 * MIB, 8192, 0), 0);
        assert_eq!(qcowprov_discard(img, 20 * MIB, MIB), 0);
    }
    assert_eq!(
        dirty_runs(img, "fine", 64 * MIB),
        vec![(3 * MIB, 8192), (10 * MIB, 8192), (20 * MIB, MIB)]
    );
    assert_eq!(
        dirty_runs(img, "full", 64 * MIB),
        vec![(3 * MIB, 65536), (10 * MIB, 65536), (20 * MIB, MIB)]
    );
    assert!(dirty_runs(img, "off", 64 * MIB).is_empty());
    let l = list(img);
    assert_eq!(l[1].3, 8192 + 8192 + MIB, "dirty bytes of fine");
    // The walk stops at `len` and never passes the virtual size.
    let (mut pnum, mut dirty) = (0u64, 0u32);
    let n = c("fine");
    // SAFETY: valid arguments.
    unsafe {
        assert_eq!(
            qcowprov_bitmap_dirty(img, n.as_ptr(), 3 * MIB + 10, 100, &mut pnum, &mut dirty),
            0
        );
        assert_eq!((pnum, dirty), (100, 1));
        assert_eq!(
            qcowprov_bitmap_dirty(img, n.as_ptr(), 63 * MIB, u64::MAX, &mut pnum, &mut dirty),
            0
        );
        assert_eq!((pnum, dirty), (MIB, 0));
    }

    // Merge in the image (granularities differ), enable, disable, clear.
    assert_eq!(merge(img, "off", null_mut(), "fine"), 0, "{}", last_error());
    assert_eq!(
        dirty_runs(img, "off", 64 * MIB),
        vec![(3 * MIB, MIB), (10 * MIB, MIB), (20 * MIB, MIB)]
    );
    assert_eq!(named(qcowprov_bitmap_enable, img, "off"), 0);
    assert_eq!(named(qcowprov_bitmap_disable, img, "full"), 0);
    assert_eq!(pwrite(img, &pattern(512, 0, 2), 40 * MIB, 0), 512);
    assert_eq!(
        dirty_runs(img, "off", 64 * MIB).last(),
        Some(&(40 * MIB, MIB))
    );
    assert_eq!(
        dirty_runs(img, "full", 64 * MIB).len(),
        3,
        "disabled: unchanged"
    );
    assert_eq!(named(qcowprov_bitmap_clear, img, "fine"), 0);
    assert!(dirty_runs(img, "fine", 64 * MIB).is_empty());

    // Merge from a bitmap of another open image (qemu-img's -b), opened read-only.
    let other = open(&pb, "", 0).expect("open b");
    assert_eq!(add(other, "src", 512, 0), 0);
    assert_eq!(pwrite(other, &pattern(1000, 0, 3), 50 * MIB + 1, 0), 1000);
    assert_eq!(close(other), 0);
    let other = open(&pb, "", QCOWPROV_OPEN_RDONLY).expect("open b read-only");
    assert_eq!(merge(img, "fine", other, "src"), 0, "{}", last_error());
    assert_eq!(dirty_runs(img, "fine", 64 * MIB), vec![(50 * MIB, 4096)]);
    assert_eq!(close(other), 0);

    assert_eq!(named(qcowprov_bitmap_remove, img, "full"), 0);
    assert_eq!(close(img), 0);
    assert_eq!(qemu_bitmaps(&pa), "fine:4096:\"auto\" off:1048576:\"auto\"");
    assert_eq!(qemu_img_check(&pa).0, 0, "{}", qemu_img_check(&pa).1);
    assert_eq!(qemu_img_check(&pb).0, 0, "{}", qemu_img_check(&pb).1);
}

#[test]
fn bitmap_errors_are_negative_errnos_with_messages() {
    let dir = TempDir::new("bm-errors");
    let p = dir.path("a.qcow2");
    assert_eq!(create(&p, "", 16 * MIB), 0, "{}", last_error());
    let img = open(&p, "", 0).expect("open");
    assert_eq!(add(img, "b", 0, 0), 0);

    assert_eq!(add(img, "b", 0, 0), -libc::EEXIST);
    assert!(last_error().contains("already exists"), "{}", last_error());
    for g in [256, 3000, 1u64 << 32] {
        assert_eq!(add(img, "g", g, 0), -libc::EINVAL, "granularity {g}");
        assert!(last_error().contains("ranularity"), "{}", last_error());
    }
    assert_eq!(add(img, "f", 0, 2), -libc::EINVAL, "unknown flag");
    assert_eq!(add(img, "", 0, 0), -libc::EINVAL, "empty name");
    assert_eq!(add(img, &"x".repeat(1024), 0, 0), -libc::ENAMETOOLONG);
    assert!(last_error().contains("1023"), "{}", last_error());
    assert_eq!(add(img, &"x".repeat(1023), 0, 0), 0, "the longest name");

    for f in [
        qcowprov_bitmap_remove,
        qcowprov_bitmap_clear,
        qcowprov_bitmap_enable,
        qcowprov_bitmap_disable,
    ] {
        assert_eq!(named(f, img, "nope"), -libc::ENOENT);
        assert!(last_error().contains("nope"), "{}", last_error());
    }
    assert_eq!(merge(img, "b", null_mut(), "nope"), -libc::ENOENT);
    assert_eq!(merge(img, "nope", null_mut(), "b"), -libc::ENOENT);

    // Out-parameters stay untouched on failure.
    let mut out = QcowprovBitmap {
        flags: 0xabc,
        ..QcowprovBitmap::default()
    };
    // SAFETY: valid arguments except what each call tests.
    unsafe {
        assert_eq!(qcowprov_bitmap_get(img, 2, &mut out), -libc::ENOENT);
        assert_eq!(out.flags, 0xabc);
        out.struct_size = 16;
        assert_eq!(qcowprov_bitmap_get(img, 0, &mut out), -libc::EINVAL);
        assert_eq!(out.flags, 0xabc);
        assert_eq!(qcowprov_bitmap_get(img, 0, null_mut()), -libc::EINVAL);
        assert_eq!(qcowprov_bitmap_count(null_mut()), -libc::EINVAL);
        let (mut pnum, mut dirty) = (77u64, 77u32);
        let n = c("nope");
        assert_eq!(
            qcowprov_bitmap_dirty(img, n.as_ptr(), 0, MIB, &mut pnum, &mut dirty),
            -libc::ENOENT
        );
        let n = c("b");
        assert_eq!(
            qcowprov_bitmap_dirty(img, n.as_ptr(), 16 * MIB, 1, &mut pnum, &mut dirty),
            -libc::EINVAL
        );
        assert_eq!(
            qcowprov_bitmap_dirty(img, n.as_ptr(), 0, 0, &mut pnum, &mut dirty),
            -libc::EINVAL
        );
        assert_eq!(
            qcowprov_bitmap_dirty(img, n.as_ptr(), 0, 1, null_mut(), &mut dirty),
            -libc::EINVAL
        );
        assert_eq!((pnum, dirty), (77, 77));
        assert_eq!(qcowprov_bitmap_add(img, null(), 0, 0), -libc::EINVAL);
        assert!(last_error().contains("'name' is NULL"), "{}", last_error());
        assert_eq!(
            qcowprov_bitmap_merge(img, null(), null_mut(), n.as_ptr()),
            -libc::EINVAL
        );
        assert_eq!(
            qcowprov_bitmap_warning(img, 0, null_mut(), 0),
            -libc::ENOENT
        );
    }
    assert_eq!(close(img), 0);

    // A read-only image lists and answers, and refuses every change with -EROFS.
    let ro = open(&p, "", QCOWPROV_OPEN_RDONLY).expect("open read-only");
    assert_eq!(list(ro).len(), 2);
    assert_eq!(dirty_runs(ro, "b", 16 * MIB), Vec::new());
    assert_eq!(add(ro, "c", 0, 0), -libc::EROFS);
    assert!(!last_error().is_empty());
    for f in [
        qcowprov_bitmap_remove,
        qcowprov_bitmap_clear,
        qcowprov_bitmap_enable,
        qcowprov_bitmap_disable,
    ] {
        assert_eq!(named(f, ro, "b"), -libc::EROFS);
    }
    assert_eq!(merge(ro, "b", null_mut(), "b"), -libc::EROFS);
    assert_eq!(close(ro), 0);
    assert_eq!(qemu_img_check(&p).0, 0, "{}", qemu_img_check(&p).1);
}

/// A bitmap QEMU left in use (a killed QEMU) opens inconsistent: listed, not tracked,
/// refused by every operation but remove.
#[test]
fn an_in_use_bitmap_is_inconsistent_and_only_removable() {
    let dir = TempDir::new("bm-inuse");
    let p = dir.path("a.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "16M"]);
    qemu_img(&["bitmap", "--add", ps, "b"]);
    set_in_use(&p);
    let info = qemu_img(&["info", "--output=json", ps]);
    assert!(info.contains("in-use"), "{info}");
    let img = open(&p, "", 0).expect("open");
    let want = QCOWPROV_BITMAP_ENABLED | QCOWPROV_BITMAP_IN_USE | QCOWPROV_BITMAP_INCONSISTENT;
    assert_eq!(list(img), vec![("b".into(), 65536, want, 0)]);
    assert_eq!(pwrite(img, &pattern(4096, 0, 1), 0, 0), 4096);
    assert_eq!(named(qcowprov_bitmap_clear, img, "b"), -libc::EINVAL);
    assert_eq!(named(qcowprov_bitmap_enable, img, "b"), -libc::EINVAL);
    let n = c("b");
    let (mut pnum, mut dirty) = (0u64, 0u32);
    // SAFETY: valid arguments.
    let r = unsafe { qcowprov_bitmap_dirty(img, n.as_ptr(), 0, MIB, &mut pnum, &mut dirty) };
    assert_eq!(r, -libc::EINVAL);
    assert_eq!(named(qcowprov_bitmap_remove, img, "b"), 0);
    assert_eq!(close(img), 0);
    assert_eq!(qemu_bitmaps(&p), "");
    assert_eq!(qemu_img_check(&p).0, 0, "{}", qemu_img_check(&p).1);
}

/// Sets the in-use flag of the first bitmap directory entry, as a killed QEMU leaves it.
fn set_in_use(p: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut h = [0u8; 4096];
    f.read_at(&mut h, 0).unwrap();
    let hl = u32::from_be_bytes(h[100..104].try_into().unwrap()) as usize;
    let mut o = hl;
    let dir = loop {
        let magic = u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
        let len = u32::from_be_bytes(h[o + 4..o + 8].try_into().unwrap()) as usize;
        assert_ne!(magic, 0, "no bitmaps extension");
        if magic == 0x2385_2875 {
            break u64::from_be_bytes(h[o + 24..o + 32].try_into().unwrap());
        }
        o += 8 + len.div_ceil(8) * 8;
    };
    // Entry: table offset (8), table size (4), flags (4): in_use is bit 0.
    let mut flags = [0u8; 4];
    f.read_at(&mut flags, dir + 12).unwrap();
    flags[3] |= 1;
    f.write_at(&flags, dir + 12).unwrap();
}
