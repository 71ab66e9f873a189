//! Engine demo: create an image, write across it (allocating, copy-on-write over a backing
//! file), read it back and print what the image holds.
//!
//! Run: `cargo run --release -p qcow2-engine --example demo`

use std::time::Instant;

use qcow2_engine::{create, CreateOptions, Image, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("qcowprov-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create(
        &base,
        &CreateOptions {
            size: Some(256 << 20),
            ..Default::default()
        },
    )?;
    let img = Image::open(&base, &OpenOptions::default())?;
    let t = Instant::now();
    for i in 0..1024u64 {
        img.write_at(&[(i % 251) as u8; 65536], i * 131072)?;
    }
    img.close()?;
    println!("base: 1024 allocating 64 KiB writes in {:?}", t.elapsed());

    let opts = CreateOptions {
        backing_file: Some("base.qcow2".into()),
        backing_fmt: Some("qcow2".into()),
        ..Default::default()
    };
    create(&top, &opts)?;
    let img = Image::open(&top, &OpenOptions::default())?;
    let t = Instant::now();
    for i in 0..1024u64 {
        img.write_at(&[0xee; 4096], i * 131072 + 1000)?;
    }
    img.flush()?;
    println!(
        "overlay: 1024 copy-on-write 4 KiB writes in {:?}",
        t.elapsed()
    );
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 131072)?;
    assert_eq!(buf[0], 1);
    assert!(buf[1000..5096].iter().all(|&b| b == 0xee));
    assert!(buf[5096..].iter().all(|&b| b == 1));
    let info = img.info();
    img.close()?;
    println!(
        "top: virtual {} MiB, cluster {} KiB, backing {:?}, file {} KiB",
        info.virtual_size >> 20,
        info.cluster_size >> 10,
        info.backing_file,
        std::fs::metadata(&top)?.len() >> 10
    );
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&top)
        .output();
    match out {
        Ok(o) => print!("qemu-img check: {}", String::from_utf8_lossy(&o.stdout)),
        Err(_) => println!("(qemu-img not installed; skipping the check)"),
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
