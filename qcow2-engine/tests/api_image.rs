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

/// Opening reads the same metadata whether the image is 1 GiB or 1 TiB (no scan).
#[test]
fn open_cost_is_independent_of_image_size() {
    let mut counts = Vec::new();
    for size in [1u64 << 30, 1 << 40] {
        let faulty = Arc::new(FaultyStorage::new(MemStorage::new()));
        let o = CreateOptions {
            size: Some(size),
            ..Default::default()
        };
        create_on(faulty.clone(), &o, None).unwrap();
        // Some data at both ends.
        let img = Image::open_storage(faulty.clone(), &OpenOptions::default(), None).unwrap();
        img.write_at(&[1u8; 65536], 0).unwrap();
        img.write_at(&[2u8; 65536], size - 65536).unwrap();
        img.close().unwrap();
        faulty.reset_counters();
        let img = Image::open_storage(faulty.clone(), &OpenOptions::default(), None).unwrap();
        counts.push(faulty.count(OpKind::Read));
        drop(img);
    }
    assert_eq!(counts[0], counts[1], "reads during open: {counts:?}");
    assert!(counts[0] <= 8, "open issued {} reads", counts[0]);
}

/// Writing into compressed clusters decompresses into a fresh cluster and frees the
/// compressed bytes; the result matches qemu-io doing the same.
#[test]
fn writes_over_compressed_clusters_match_qemu_io() {
    let dir = TempDir::new("overc");
    for opts in [
        "",
        "compression_type=zstd",
        "extended_l2=on,cluster_size=16k",
    ] {
        let ours = dir.path("o.qcow2");
        let theirs = dir.path("t.qcow2");
        for p in [&ours, &theirs] {
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                a.extend(["-o", opts]);
            }
            let ps = p.to_str().unwrap().to_string();
            a.extend([ps.as_str(), "4M"]);
            qemu_img(&a);
            qemu_io(
                &[],
                p,
                &[
                    "write -c -P 0x11 0 64k".into(),
                    "write -c -P 0x22 64k 64k".into(),
                    "write -c -P 0x33 1M 64k".into(),
                ],
            );
        }
        let img = Image::open(&ours, &OpenOptions::default()).unwrap();
        img.write_at(&[0x44; 1000], 3000).unwrap();
        img.write_at(&[0x55; 70000], 60000).unwrap();
        img.write_at(&[0x66; 65536], 1 << 20).unwrap();
        img.close().unwrap();
        qemu_io(
            &[],
            &theirs,
            &[
                "write -P 0x44 3000 1000".into(),
                "write -P 0x55 60000 70000".into(),
                "write -P 0x66 1M 64k".into(),
            ],
        );
        assert_check_clean(&ours);
        assert_identical(&ours, &theirs);
        let r = Image::open(
            &ours,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap()
        .check(qcow2_engine::Repair::None)
        .unwrap();
        // Clusters written into are compressed no more; untouched ones still are, exactly
        // as in the qemu-io twin.
        let json = qemu_img(&["check", "--output=json", theirs.to_str().unwrap()]);
        let want = json
            .split("\"compressed-clusters\": ")
            .nth(1)
            .map_or(0, |t| {
                t.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            });
        assert_eq!(r.compressed_clusters, want, "{opts}: {r:?} vs {json}");
        assert!(
            want < 3 * (65536 / img_cluster(opts)),
            "{opts}: nothing was decompressed"
        );
    }
}

/// The engine on a real block device (a loop device), when this machine can make one.
#[test]
fn image_on_a_loop_device() {
    let dir = TempDir::new("loop");
    let backing = dir.path("dev.img");
    std::fs::write(&backing, vec![0u8; 64 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", backing.to_str().unwrap()])
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            eprintln!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: losetup unavailable: {e}");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _guard = Detach(dev.clone());
    let o = CreateOptions {
        size: Some(32 << 20),
        ..Default::default()
    };
    create(&dev, &o).unwrap();
    let img = Image::open(&dev, &OpenOptions::default()).unwrap();
    img.write_at(&[0x5a; 300_000], 123_456).unwrap();
    let mut b = vec![0u8; 300_000];
    img.read_at(&mut b, 123_456).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    img.close().unwrap();
    let (code, out, err) = qemu_img_status(&["check", &dev]);
    assert_eq!(code, 0, "{out}{err}");
    qemu_io(
        &[],
        std::path::Path::new(&dev),
        &["read -P 0x5a 123456 300000".into()],
    );
}

fn img_cluster(opts: &str) -> u64 {
    if opts.contains("16k") {
        16384
    } else {
        65536
    }
}

/// Reopen-style option changes and the advertised discard limits.
#[test]
fn set_options_and_discard_limits() {
    let dir = TempDir::new("setopt");
    let p = new_image(&dir, "s.qcow2", "extended_l2=on", 4 << 20);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let i = img.info();
    assert_eq!(
        (i.discard_granularity, i.write_zeroes_alignment),
        (65536, 2048)
    );
    assert_eq!(i.policy, "provision=metadata");
    img.write_at(&[1u8; 65536], 0).unwrap();
    img.set_options("provision=off").unwrap();
    img.discard(0, 65536).unwrap();
    let mut b = [0u8; 16];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1u8; 16], "provision=off ignores discards");
    img.set_options("discard=unmap").unwrap();
    img.discard(0, 65536).unwrap();
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 16]);
    let e = img
        .set_options("provision=thin,discard=unmap")
        .unwrap_err()
        .to_string();
    assert!(e.contains("provision=thin") && e.contains("discard"), "{e}");
    assert!(img.set_options("l2-cache-size=1M").is_err());
    assert_eq!(
        img.info().policy,
        "discard=unmap,pass-discard-request=on,discard-no-unref=off"
    );
    img.close().unwrap();
    assert_check_clean(&p);
}

/// Records every announced content change.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(u64, u64, qcow2_engine::ChangeKind)>>);

impl qcow2_engine::ContentWatcher for Recorder {
    fn will_change(&self, off: u64, len: u64, kind: qcow2_engine::ChangeKind) {
        self.0.lock().unwrap().push((off, len, kind));
    }
}

impl Recorder {
    fn take(&self) -> Vec<(u64, u64, qcow2_engine::ChangeKind)> {
        std::mem::take(&mut self.0.lock().unwrap())
    }

    /// The union of the announced ranges, which must be one range covering `[off, end)`.
    fn covers(&self, off: u64, end: u64, kind: qcow2_engine::ChangeKind) {
        let v = self.take();
        assert!(
            !v.is_empty(),
            "nothing announced for {off:#x}..{end:#x} {kind:?}"
        );
        assert!(v.iter().all(|c| c.2 == kind), "{v:?}");
        let lo = v.iter().map(|c| c.0).min().unwrap();
        let hi = v.iter().map(|c| c.0 + c.1).max().unwrap();
        assert!(
            lo <= off && hi >= end,
            "{v:x?} does not cover {off:#x}..{end:#x}"
        );
    }
}

/// Every path that changes guest-visible content announces it at the one subscription
/// point: writes in place and allocating, write-zeroes, discards, resize, repair; a
/// discard the policy ignores announces nothing.
#[test]
fn every_content_change_is_announced() {
    use qcow2_engine::ChangeKind::*;
    let cs = 65536u64;
    let mem = Arc::new(MemStorage::new());
    create_on(
        mem.clone(),
        &CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let img = Image::open_storage(
        mem.clone(),
        &OpenOptions::parse("provision=thin").unwrap(),
        None,
    )
    .unwrap();
    let rec = Arc::new(Recorder::default());
    img.watch_changes(rec.clone()).unwrap();
    img.write_at(&[1u8; 3000], 100).unwrap(); // allocating
    rec.covers(100, 3100, Write);
    img.write_at(&[2u8; 3000], 200).unwrap(); // in place
    rec.covers(200, 3200, Write);
    // 1.5 clusters over 2 L2-contiguous clusters: in place, then allocating.
    img.write_at(&vec![3u8; (cs + cs / 2) as usize], cs / 2)
        .unwrap();
    rec.covers(cs / 2, 2 * cs, Write);
    img.write_zeroes(0, cs, false).unwrap();
    rec.covers(0, cs, Zero);
    img.discard(cs, cs).unwrap();
    rec.covers(cs, 2 * cs, Discard);
    img.resize(8 << 20).unwrap();
    rec.covers(4 << 20, 8 << 20, Resize);
    img.set_options("discard=ignore").unwrap();
    img.write_at(&[4u8; 512], 3 * cs).unwrap();
    rec.take();
    img.discard(3 * cs, cs).unwrap();
    assert!(rec.take().is_empty(), "an ignored discard changes nothing");
    img.flush().unwrap();
    // Repair: an unaligned preallocated zero cluster becomes a plain zero cluster in a
    // full repair (qemu-img's one repair of an L2 entry).
    img.close().unwrap();
    let mut bytes = mem.to_vec();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    let e = 3 * 8 + l2;
    bytes[e + 6] |= 0x2a; // offset + 0x2a00: unaligned
    bytes[e + 7] |= 0x01; // the zero flag: no data to lose
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let img = Image::open_storage(
        mem,
        &OpenOptions {
            check: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    img.watch_changes(rec.clone()).unwrap();
    let rep = img.check(qcow2_engine::Repair::All).unwrap();
    assert!(rep.corruptions_fixed > 0, "{rep:?}");
    rec.covers(3 * cs, 4 * cs, Repair);
}

/// A storage that panics on the first write after it is armed.
#[derive(Debug)]
struct PanicOnWrite {
    inner: MemStorage,
    armed: std::sync::atomic::AtomicBool,
    writes_after: std::sync::atomic::AtomicU64,
}

impl Storage for PanicOnWrite {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.armed.swap(false, SeqCst) {
            panic!("injected panic in a host write");
        }
        if self.writes_after.load(SeqCst) != u64::MAX {
            self.writes_after.fetch_add(1, SeqCst);
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<host_io::DiscardOutcome> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: host_io::ZeroMode,
    ) -> std::io::Result<host_io::ZeroMethod> {
        self.inner.write_zeroes(offset, len, mode)
    }
    fn capabilities(&self) -> host_io::Capabilities {
        self.inner.capabilities()
    }
}

/// A panic in the middle of a metadata update (here: an L2 table write-back at flush)
/// fails the handle: every later call returns EIO, and nothing half-updated is flushed,
/// not even when the handle is dropped.
#[test]
fn a_panic_under_the_metadata_lock_fails_the_handle() {
    use std::sync::atomic::Ordering::SeqCst;
    let mem = MemStorage::new();
    let s = Arc::new(PanicOnWrite {
        inner: mem,
        armed: false.into(),
        writes_after: u64::MAX.into(),
    });
    create_on(
        s.clone(),
        &CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let img = Image::open_storage(s.clone(), &OpenOptions::default(), None).unwrap();
    img.write_at(&[5u8; 4096], 0).unwrap(); // allocating: the L2 entry stays dirty
    s.armed.store(true, SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| img.flush()));
    assert!(r.is_err(), "the injected panic must reach the caller");
    s.writes_after.store(0, SeqCst);
    let e = img.write_at(&[6u8; 512], 0).unwrap_err();
    assert_eq!(e.errno(), 5, "EIO: {e}");
    assert!(e.to_string().contains("failed"), "{e}");
    let mut b = [0u8; 512];
    assert_eq!(img.read_at(&mut b, 8192).unwrap_err().errno(), 5);
    assert!(img.flush().is_err());
    drop(img);
    assert_eq!(
        s.writes_after.load(SeqCst),
        0,
        "a failed handle wrote to the image"
    );
}

/// `no_fallback` (QEMU's BDRV_REQ_NO_FALLBACK, NBD's fast zero): write-zeroes that would
/// have to write zero bytes fails with ENOTSUP and changes nothing there; what can be
/// zeroed as metadata still is.
#[test]
fn write_zeroes_without_fallback() {
    use qcow2_engine::ZeroFlags;
    let cs = 65536u64;
    let mem = Arc::new(MemStorage::new());
    create_on(
        mem.clone(),
        &CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let img = Image::open_storage(mem, &OpenOptions::default(), None).unwrap();
    img.write_at(&vec![7u8; (2 * cs) as usize], 0).unwrap();
    let fast = ZeroFlags {
        may_unmap: true,
        no_fallback: true,
    };
    // Whole clusters: metadata only.
    img.write_zeroes_with(0, cs, fast).unwrap();
    let mut b = vec![1u8; cs as usize];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Part of a cluster holding data: would need zero bytes.
    let e = img.write_zeroes_with(cs + 512, 1024, fast).unwrap_err();
    assert_eq!(e.errno(), 95, "ENOTSUP: {e}");
    img.read_at(&mut b, cs).unwrap();
    assert!(b.iter().all(|&x| x == 7), "nothing was written");
    // Part of a cluster that already reads zero: done as metadata.
    img.write_zeroes_with(512, 1024, fast).unwrap();
    // Without the flag the same request writes zero bytes.
    img.write_zeroes(cs + 512, 1024, true).unwrap();
    img.read_at(&mut b, cs).unwrap();
    assert!(b[512..1536].iter().all(|&x| x == 0) && b[0] == 7 && b[2000] == 7);
    img.close().unwrap();
}
