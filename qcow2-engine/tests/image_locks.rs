//! Image locks through the engine (QEMU's protocol, host-io's lock.rs): who excludes whom,
//! force-share, locking off, backing chains, create over an image in use, and the lock
//! conflict's message; plus the runtime options an open image reports, `set_options`
//! merging keys, and the highest allocated offset against qemu-img check.

mod support;

use qcow2_engine::{create, CreateOptions, Error, Image, Locking, OpenOptions};
use support::*;

fn new_image(dir: &TempDir, name: &str, opts: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    create(&p, &CreateOptions::parse(opts).unwrap()).unwrap();
    p
}

fn opts(s: &str) -> OpenOptions {
    OpenOptions::parse(s).unwrap()
}

fn in_use(r: qcow2_engine::Result<Image>) -> String {
    match r {
        Err(e @ Error::InUse(_)) => {
            assert_eq!(e.errno(), host_io::LOCK_CONFLICT_ERRNO);
            e.to_string()
        }
        Err(e) => panic!("expected InUse, got {e:?}"),
        Ok(_) => panic!("expected InUse, the open succeeded"),
    }
}

#[test]
fn writers_and_readers() {
    let d = TempDir::new("locks-rw");
    let p = new_image(&d, "a.qcow2", "size=4M");
    let w = Image::open(&p, &opts("")).unwrap();
    let msg = in_use(Image::open(&p, &opts("")));
    assert!(
        msg.starts_with(&format!(
            "Could not open '{}': Failed to get \"write\" lock.",
            p.display()
        )) && msg.contains("force-share=on (-U)")
            && !msg.contains("corrupt"),
        "{msg}"
    );
    let msg = in_use(Image::open(&p, &opts("read-only=on")));
    assert!(msg.contains("Failed to get shared \"write\" lock"), "{msg}");
    // force-share looks anyway, and only read-only.
    let u = Image::open(&p, &opts("read-only=on,force-share=on")).unwrap();
    let e = Image::open(&p, &opts("force-share=on")).unwrap_err();
    assert!(
        e.to_string()
            .contains("force-share=on can only be used with read-only images"),
        "{e}"
    );
    drop(u);
    // locking=off (or file.locking=off) neither takes nor tests.
    let off = Image::open(&p, &opts("read-only=on,file.locking=off")).unwrap();
    assert!(!off.info().locked);
    assert!(w.info().locked);
    drop(off);
    w.close().unwrap();
    // Readers share.
    let r1 = Image::open(&p, &opts("read-only=on")).unwrap();
    let _r2 = Image::open(&p, &opts("read-only=on")).unwrap();
    in_use(Image::open(&p, &opts("")));
    drop(r1);
    assert_eq!(opts("locking=on").locking, Locking::On);
    assert!(OpenOptions::parse("locking=maybe").is_err());
}

#[test]
fn qemu_io_is_refused_while_we_write() {
    require_qemu_tools();
    let d = TempDir::new("locks-qemu");
    let p = new_image(&d, "a.qcow2", "size=4M");
    let w = Image::open(&p, &opts("")).unwrap();
    let (rc, _, err) = qemu_img_status(&["info", p.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let (rc, out, err) = qemu_img_status(&["info", "-U", p.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}{err}");
    w.write_at(&[1u8; 4096], 0).unwrap();
    w.close().unwrap();
    assert_check_clean(&p);
}

#[test]
fn backing_files_are_locked_as_readers() {
    let d = TempDir::new("locks-chain");
    let base = new_image(&d, "base.qcow2", "size=4M");
    let top = d.path("top.qcow2");
    create(
        &top,
        &CreateOptions::parse("backing_file=base.qcow2,backing_fmt=qcow2").unwrap(),
    )
    .unwrap();
    let t = Image::open(&top, &opts("")).unwrap();
    // The base is read by the overlay: nobody may write it...
    let msg = in_use(Image::open(&base, &opts("")));
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    // ...but it may be read, and another overlay may be made over it (the size probe
    // shares, as qemu-img create's).
    drop(Image::open(&base, &opts("read-only=on")).unwrap());
    create(
        d.path("top2.qcow2"),
        &CreateOptions::parse("backing_file=base.qcow2,backing_fmt=qcow2").unwrap(),
    )
    .unwrap();
    drop(t);
    // A writer on the base refuses an overlay's open, naming the backing file.
    let b = Image::open(&base, &opts("")).unwrap();
    let msg = in_use(Image::open(&top, &opts("read-only=on")));
    assert!(
        msg.starts_with("Could not open backing file: Could not open '")
            && msg.contains("base.qcow2"),
        "{msg}"
    );
    // force-share passes down the chain.
    drop(Image::open(&top, &opts("read-only=on,force-share=on")).unwrap());
    drop(b);
}

#[test]
fn create_refuses_an_image_in_use_and_leaves_it_intact() {
    let d = TempDir::new("locks-create");
    let p = new_image(&d, "a.qcow2", "size=4M");
    let w = Image::open(&p, &opts("")).unwrap();
    w.write_at(&[5u8; 65536], 0).unwrap();
    w.flush().unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    let e = create(&p, &CreateOptions::parse("size=8M").unwrap()).unwrap_err();
    assert!(matches!(e, Error::InUse(_)), "{e:?}");
    assert!(e.to_string().starts_with("Could not create '"), "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "not truncated");
    let mut b = vec![0u8; 65536];
    w.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 5));
    w.close().unwrap();
}

#[test]
fn descriptors_from_the_caller() {
    use std::os::fd::OwnedFd;
    let d = TempDir::new("locks-fd");
    let p = new_image(&d, "a.qcow2", "size=4M");
    let fd: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap()
        .into();
    let img = Image::open_fd(fd, &opts("")).unwrap();
    in_use(Image::open(&p, &opts("read-only=on")));
    img.write_at(&[3u8; 512], 512).unwrap();
    img.close().unwrap();
    // Formatting through a descriptor: locked, truncated, a fresh image.
    let fd: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap()
        .into();
    qcow2_engine::create_fd(fd, &CreateOptions::parse("size=1M").unwrap()).unwrap();
    let img = Image::open(&p, &opts("read-only=on")).unwrap();
    assert_eq!(img.virtual_size(), 1 << 20);
    let mut b = vec![9u8; 512];
    img.read_at(&mut b, 512).unwrap();
    assert!(b.iter().all(|&x| x == 0), "a new image");
}

#[test]
fn set_options_changes_only_the_keys_given() {
    let d = TempDir::new("locks-setopt");
    let p = new_image(&d, "a.qcow2", "size=4M");
    let img = Image::open(&p, &opts("provision=thin")).unwrap();
    img.set_options("detect-zeroes=on").unwrap();
    let i = img.info();
    assert_eq!(
        i.policy, "provision=thin",
        "detect-zeroes kept provision=thin"
    );
    assert!(
        i.options
            .starts_with("provision=thin,detect-zeroes=on,pass-discard-snapshot=on,"),
        "{}",
        i.options
    );
    img.set_options("").unwrap();
    assert_eq!(img.info().options, i.options, "\"\" changes nothing");
    img.set_options("discard=unmap").unwrap();
    let i = img.info();
    assert!(i.policy.starts_with("discard=unmap,"), "{}", i.policy);
    assert!(i.options.contains("detect-zeroes=on"), "{}", i.options);
    assert!(img.set_options("provision=full,discard=ignore").is_err());
    assert_eq!(
        img.info().options,
        i.options,
        "a failed call changes nothing"
    );
}

#[test]
fn runtime_options_reopen_the_same_way() {
    let d = TempDir::new("locks-options");
    let p = new_image(&d, "a.qcow2", "size=1G");
    let img = Image::open(
        &p,
        &opts("read-only=on,l2-cache-size=1M,detect-zeroes=on,pass-discard-other=on,aio=threads"),
    )
    .unwrap();
    let o = img.info().options;
    assert_eq!(
        o,
        "provision=metadata,detect-zeroes=on,pass-discard-snapshot=on,pass-discard-other=on,\
         read-only=on,cache.direct=off,locking=on,force-share=off,l2-cache-size=1M,\
         l2-cache-entry-size=64k,refcount-cache-size=256k,quarantine-slack=64M,aio=threads,\
         aio-queue-depth=1024"
    );
    drop(img);
    let again = Image::open(&p, &opts(&o)).unwrap();
    assert_eq!(again.info().options, o);
}

#[test]
fn highest_offset_follows_allocation_and_matches_qemu_img() {
    require_qemu_tools();
    let d = TempDir::new("locks-highest");
    let p = new_image(&d, "a.qcow2", "size=64M,cluster_size=64k");
    let end_of = |p: &std::path::Path| -> u64 {
        let j: serde_json::Value =
            serde_json::from_str(&qemu_img(&["check", "--output=json", p.to_str().unwrap()]))
                .unwrap();
        j["image-end-offset"].as_u64().unwrap()
    };
    let img = Image::open(&p, &opts("provision=thin")).unwrap();
    let fresh = img.highest_offset().unwrap();
    img.write_at(&[1u8; 1 << 20], 32 << 20).unwrap();
    let grown = img.highest_offset().unwrap();
    assert!(grown >= fresh + (1 << 20), "{fresh} -> {grown}");
    img.write_at(&[1u8; 65536], 0).unwrap();
    let top = img.highest_offset().unwrap();
    img.close().unwrap();
    assert_eq!(top, end_of(&p), "against qemu-img check's image end offset");
    // Freeing the top cluster (thin; the one written last) lowers it; QEMU's
    // wr_highest_offset would not.
    let img = Image::open(&p, &opts("provision=thin")).unwrap();
    assert_eq!(img.highest_offset().unwrap(), top, "right from the open on");
    img.discard(0, 65536).unwrap();
    // A freed cluster waits in the quarantine (an entry on disk may still point at it)
    // and still counts until the next barrier releases it.
    assert_eq!(
        img.highest_offset().unwrap(),
        top,
        "quarantined until a flush"
    );
    img.flush().unwrap();
    let after = img.highest_offset().unwrap();
    assert!(after < top, "{top} -> {after}");
    img.close().unwrap();
    assert_eq!(after, end_of(&p));
}
