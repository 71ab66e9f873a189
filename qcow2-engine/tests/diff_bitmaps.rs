//! Persistent dirty bitmaps against QEMU.

mod support;

use qcow2_engine::{Image, OpenOptions};
use support::bitmaps::*;
use support::*;

#[test]
fn smoke() {
    let d = TempDir::new("bm-smoke");
    let a = d.path("a.qcow2");
    let b = d.path("b.qcow2");
    for p in [&a, &b] {
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", ps, "16M"]);
        qemu_img(&["bitmap", "--add", "-g", "4096", ps, "b"]);
    }
    qemu_io(
        &["-f", "qcow2"],
        &a,
        &[
            "write 100 10".into(),
            "discard 1M 100000".into(),
            "write -z 3M 1000".into(),
            "write -z -u 5M 70000".into(),
        ],
    );
    let img = Image::open(&b, &OpenOptions::parse("discard=unmap").unwrap()).unwrap();
    img.write_at(&[1u8; 10], 100).unwrap();
    img.discard(1 << 20, 100000).unwrap();
    img.write_zeroes(3 << 20, 1000, false).unwrap();
    img.write_zeroes(5 << 20, 70000, true).unwrap();
    let ours = engine_dirty_map(&img, "b");
    img.close().unwrap();
    let qa = qemu_dirty_map(&a, "b");
    let qb = qemu_dirty_map(&b, "b");
    assert_eq!(qa, qb);
    assert_eq!(ours, qb);
    assert_check_clean(&b);
    println!("{:?}", qemu_bitmaps(&b));
}
