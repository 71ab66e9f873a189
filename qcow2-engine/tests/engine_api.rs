//! Engine behaviour beyond plain reads and writes: resize, concurrency, errors from the
//! host in the middle of allocation, bad requests.

mod support;

use std::sync::Arc;

use host_io::{Fault, FaultyStorage, MemStorage, OpKind, Storage};
use qcow2_engine::{create, create_on, CreateOptions, Error, Image, OpenOptions};
use support::*;

fn new_image(dir: &TempDir, name: &str, opts: &str, size: u64) -> std::path::PathBuf {
    let p = dir.path(name);
    let mut o = CreateOptions::parse(opts).unwrap();
    o.size = Some(size);
    create(&p, &o).unwrap();
    p
}

#[test]
fn resize_grows_l1_and_keeps_data() {
    let dir = TempDir::new("resize");
    // 512-byte clusters: one L2 table maps 32 KiB, so growth moves the L1 table.
    let p = new_image(&dir, "r.qcow2", "cluster_size=512", 1 << 20);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[7u8; 3000], 1000).unwrap();
    img.resize(64 << 20).unwrap();
    assert_eq!(img.virtual_size(), 64 << 20);
    img.write_at(&[9u8; 5000], (64 << 20) - 5000).unwrap();
    let mut b = vec![0u8; 3000];
    img.read_at(&mut b, 1000).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    assert!(img
        .resize(1 << 20)
        .unwrap_err()
        .to_string()
        .contains("shrinking"));
    assert!(matches!(
        img.resize(100 << 20 | 1),
        Err(Error::InvalidArgument(_))
    ));
    img.close().unwrap();
    assert_check_clean(&p);
    let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 64u64 << 20)),
        "{info}"
    );
    qemu_io(
        &[],
        &p,
        &[
            format!("read -P 9 {} 5000", (64 << 20) - 5000),
            "read -P 7 1000 3000".into(),
        ],
    );
}

#[test]
fn bad_requests_are_refused_without_writing() {
    let dir = TempDir::new("badreq");
    let p = new_image(&dir, "b.qcow2", "", 1 << 20);
    let before = std::fs::read(&p).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let e = img.write_at(&[1u8; 10], (1 << 20) - 5).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    assert_eq!(e.errno(), 22);
    let mut b = [0u8; 10];
    assert!(img.read_at(&mut b, u64::MAX - 3).is_err());
    img.close().unwrap();
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a refused request wrote"
    );
    let ro = Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ro.write_at(&[1], 0).unwrap_err().errno(), 30);
}

#[test]
fn threads_share_one_handle() {
    let dir = TempDir::new("threads");
    let p = new_image(&dir, "t.qcow2", "cluster_size=4k", 8 << 20);
    let img = Arc::new(Image::open(&p, &OpenOptions::default()).unwrap());
    // Each thread owns a disjoint stripe, so the final content is known.
    let stripe = (8u64 << 20) / 4;
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t + 1);
                let mut model = vec![0u8; stripe as usize];
                for _ in 0..300 {
                    let len = 1 + rng.below(9000);
                    let off = rng.below(stripe - len);
                    let p = (t * 50 + 1 + rng.below(40)) as u8;
                    img.write_at(&vec![p; len as usize], t * stripe + off)
                        .unwrap();
                    model[off as usize..(off + len) as usize].fill(p);
                    let mut b = vec![0u8; len as usize];
                    img.read_at(&mut b, t * stripe + off).unwrap();
                    assert!(b.iter().all(|&x| x == p));
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut all = vec![0u8; 8 << 20];
    img.read_at(&mut all, 0).unwrap();
    for (t, m) in models.iter().enumerate() {
        assert!(
            all[t * stripe as usize..(t + 1) * stripe as usize] == m[..],
            "stripe {t}"
        );
    }
    Arc::try_unwrap(img).unwrap().close().unwrap();
    assert_check_clean(&p);
}

/// Fail the n-th host write with `errno`; the failing call reports it, the image stays
/// consistent, and later I/O works.
fn fault_at_write(n: u64, errno: i32) -> bool {
    let faulty = Arc::new(FaultyStorage::new(MemStorage::new()));
    let opts = CreateOptions {
        size: Some(4 << 20),
        cluster_size: 4096,
        ..Default::default()
    };
    create_on(faulty.clone(), &opts, None).unwrap();
    let img = Image::open_storage(faulty.clone(), &OpenOptions::default(), None).unwrap();
    faulty.reset_counters();
    faulty.add_fault(Fault::FailNth {
        op: OpKind::Write,
        n,
        errno,
    });
    let mut model = vec![0u8; 4 << 20];
    let mut rng = Rng(n + 99);
    let mut failed = false;
    for i in 0..60 {
        let len = 1 + rng.below(20000);
        let off = rng.below((4 << 20) - len);
        let p = (i + 1) as u8;
        match img.write_at(&vec![p; len as usize], off) {
            Ok(()) => model[off as usize..(off + len) as usize].fill(p),
            Err(e) => {
                assert_eq!(e.errno(), errno, "write {i}: {e}");
                failed = true;
                // The range is unspecified after a failed write: read back what it holds.
                let mut b = vec![0u8; len as usize];
                img.read_at(&mut b, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
        }
    }
    // A fault may also hit the write-back: flush reports it, and a retry succeeds.
    if let Err(e) = img.flush() {
        assert_eq!(e.errno(), errno, "flush: {e}");
        failed = true;
        img.flush().expect("flush retry after a one-shot fault");
    }
    img.close().unwrap();
    let bytes = faulty.inner().to_vec();
    let dir = TempDir::new("fault");
    let path = dir.path("f.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    assert_no_corruption(&path);
    let mem: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    let img = Image::open_storage(mem, &OpenOptions::default(), None).unwrap();
    let mut all = vec![0u8; 4 << 20];
    img.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "fault at write {n}: content differs from the model"
    );
    failed
}

#[test]
fn host_errors_during_allocation_leave_a_consistent_image() {
    let mut hits = 0;
    for n in 0..80 {
        for errno in [libc_eio(), 28] {
            if fault_at_write(n, errno) {
                hits += 1;
            }
        }
    }
    assert!(hits > 100, "faults were not exercised ({hits})");
}

fn libc_eio() -> i32 {
    5
}
