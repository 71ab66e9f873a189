//! Round trips through the C ABI (called directly through the rlib, as C would call the
//! .so): create, open, write, read, discard, zero, flush, resize, block status, info,
//! options, check, close; then qemu-img check must be clean.

mod support;

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};

use qcowprov::*;
use support::*;

const MIB: u64 = 1 << 20;
const CS: u64 = 65536;

/// Status of `[off, off+len)` through `qcowprov_block_status`: (pnum, flags, host).
fn status(img: *mut QcowprovImage, off: u64, len: u64) -> (u64, u32, u64) {
    let (mut pnum, mut flags, mut host) = (0u64, 0u32, 0u64);
    // SAFETY: live handle; three valid out pointers.
    let r = unsafe { qcowprov_block_status(img, off, len, &mut pnum, &mut flags, &mut host) };
    assert_eq!(r, 0, "block_status: {}", last_error());
    (pnum, flags, host)
}

/// Status with depth through `qcowprov_block_status_depth`.
fn status_depth(img: *mut QcowprovImage, off: u64, len: u64) -> QcowprovStatus {
    let mut st = QcowprovStatus::default();
    // SAFETY: live handle; a whole struct with struct_size set.
    let r = unsafe { qcowprov_block_status_depth(img, off, len, &mut st) };
    assert_eq!(r, 0, "block_status_depth: {}", last_error());
    assert_eq!(
        st.struct_size as usize,
        std::mem::size_of::<QcowprovStatus>()
    );
    st
}

unsafe extern "C" fn progress(percent: f64, user_data: *mut c_void) {
    // SAFETY: the test passes a pointer to an AtomicU32 that outlives the check.
    let calls = unsafe { &*user_data.cast::<AtomicU32>() };
    assert!((0.0..=100.0).contains(&percent));
    calls.fetch_add(1, Ordering::Relaxed);
}

fn check(img: *mut QcowprovImage, fix: u32) -> QcowprovCheckResult {
    let calls = AtomicU32::new(0);
    let mut res = QcowprovCheckResult::default();
    // SAFETY: live handle, a whole result struct, a callback taking the AtomicU32 we pass.
    let r = unsafe {
        qcowprov_check(
            img,
            fix,
            &mut res,
            Some(progress),
            (&calls as *const AtomicU32).cast_mut().cast(),
        )
    };
    assert_eq!(r, 0, "check: {}", last_error());
    assert!(
        calls.load(Ordering::Relaxed) >= 2,
        "progress reports 0 and 100"
    );
    res
}

#[test]
fn version_is_the_crate_version() {
    assert_eq!(text(qcowprov_version()), env!("CARGO_PKG_VERSION"));
}

#[test]
fn full_round_trip_is_clean_for_qemu_img() {
    let dir = TempDir::new("roundtrip");
    let path = dir.path("a.qcow2");
    assert_eq!(create(&path, "cluster_size=65536,compat=1.1", 8 * MIB), 0);
    let img = open(&path, "provision=thin", 0).expect("open");

    // Write 1 MiB of data, FUA on the second half.
    let data = pattern(MIB as usize, 0, 1);
    assert_eq!(pwrite(img, &data[..512 * 1024], 0, 0), 512 * 1024);
    assert_eq!(
        pwrite(img, &data[512 * 1024..], 512 * 1024, QCOWPROV_WRITE_FUA),
        512 * 1024
    );
    assert_eq!(pread(img, MIB as usize, 0).unwrap(), data);

    // Vectored: write three pieces (one empty with a NULL base), read back in two.
    let a = pattern(4096, 2 * MIB, 2);
    let b = pattern(8192, 2 * MIB + 4096, 3);
    let iov = [
        libc::iovec {
            iov_base: a.as_ptr().cast_mut().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
        libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        },
    ];
    // SAFETY: live handle; the iovecs describe live buffers.
    let r = unsafe { qcowprov_pwritev(img, iov.as_ptr(), 3, 2 * MIB, QCOWPROV_WRITE_FUA) };
    assert_eq!(r, 12288, "{}", last_error());
    let mut x = vec![0u8; 10000];
    let mut y = vec![0u8; 2288];
    let riov = [
        libc::iovec {
            iov_base: x.as_mut_ptr().cast(),
            iov_len: x.len(),
        },
        libc::iovec {
            iov_base: y.as_mut_ptr().cast(),
            iov_len: y.len(),
        },
    ];
    // SAFETY: live handle; the iovecs describe disjoint live buffers.
    let r = unsafe { qcowprov_preadv(img, riov.as_ptr(), 2, 2 * MIB) };
    assert_eq!(r, 12288);
    let mut both = x.clone();
    both.extend_from_slice(&y);
    let mut want = a.clone();
    want.extend_from_slice(&b);
    assert_eq!(both, want);

    // Block status: data at 0, unallocated zeros past the written range.
    let (pnum, flags, host) = status(img, 0, 8 * MIB);
    assert_eq!(pnum, MIB);
    assert_eq!(
        flags,
        QCOWPROV_STATUS_DATA | QCOWPROV_STATUS_ALLOCATED | QCOWPROV_STATUS_OFFSET_VALID
    );
    assert!(host > 0 && host % CS == 0);
    let (pnum, flags, host) = status(img, MIB, MIB);
    assert_eq!((pnum, flags, host), (MIB, QCOWPROV_STATUS_ZERO, 0));
    let st = status_depth(img, 0, 8 * MIB);
    assert_eq!((st.len, st.depth, st._reserved), (MIB, 0, 0));

    // Discard under provision=thin: the clusters go, the range reads zeros.
    // SAFETY: live handle.
    assert_eq!(unsafe { qcowprov_discard(img, 0, 256 * 1024) }, 0);
    assert_eq!(pread(img, 256 * 1024, 0).unwrap(), vec![0u8; 256 * 1024]);
    let (pnum, flags, _) = status(img, 0, MIB);
    assert_eq!(pnum, 256 * 1024);
    assert_eq!(flags & QCOWPROV_STATUS_DATA, 0);
    assert_ne!(flags & QCOWPROV_STATUS_ZERO, 0);

    // Write-zeroes (may unmap) over the next 256 KiB.
    // SAFETY: live handle.
    let r = unsafe { qcowprov_write_zeroes(img, 256 * 1024, 256 * 1024, QCOWPROV_ZERO_MAY_UNMAP) };
    assert_eq!(r, 0, "{}", last_error());
    assert_eq!(pread(img, 512 * 1024, 0).unwrap(), vec![0u8; 512 * 1024]);
    assert_eq!(
        pread(img, 512 * 1024, 512 * 1024).unwrap(),
        data[512 * 1024..]
    );

    // Flush, resize, info.
    // SAFETY: live handle.
    assert_eq!(unsafe { qcowprov_flush(img) }, 0);
    // SAFETY: live handle.
    let r = unsafe { qcowprov_resize(img, 16 * MIB) };
    assert_eq!(r, 0, "{}", last_error());
    let i = info(img);
    assert_eq!(i.struct_size as usize, std::mem::size_of::<QcowprovInfo>());
    assert_eq!(
        (i.version, i.virtual_size, i.cluster_size),
        (3, 16 * MIB, CS)
    );
    assert_eq!((i.subcluster_size, i.discard_granularity), (CS, CS));
    assert_eq!((i.write_zeroes_alignment, i.refcount_bits), (CS, 16));
    assert_eq!(
        i.flags, QCOWPROV_INFO_LOCKED,
        "a read/write open holds QEMU's locks"
    );
    assert_eq!(i.provision, QcowprovProvision::Thin as u32);
    assert_eq!(field(&i.policy), "provision=thin");
    assert_eq!(field(&i.backing_file), "");
    assert_eq!(pread(img, 4096, 16 * MIB - 4096).unwrap(), vec![0u8; 4096]);

    // Runtime options: QEMU-style, then back to the default.
    let o = c("discard=unmap,discard-no-unref=on");
    // SAFETY: live handle, valid string.
    assert_eq!(unsafe { qcowprov_set_options(img, o.as_ptr()) }, 0);
    let i = info(img);
    assert_eq!(i.provision, QcowprovProvision::Qemu as u32);
    assert!(field(&i.policy).contains("discard-no-unref=on"));
    // "" changes nothing: keys not given keep their values.
    let o = c("");
    // SAFETY: live handle, valid string.
    assert_eq!(unsafe { qcowprov_set_options(img, o.as_ptr()) }, 0);
    assert_eq!(info(img).provision, QcowprovProvision::Qemu as u32);
    let o = c("provision=metadata");
    // SAFETY: live handle, valid string.
    assert_eq!(unsafe { qcowprov_set_options(img, o.as_ptr()) }, 0);
    assert_eq!(info(img).provision, QcowprovProvision::Metadata as u32);

    // Our check, then close, then qemu-img's.
    let res = check(img, 0);
    assert_eq!(res.exit_code, 0, "{res:?}");
    assert_eq!((res.corruptions, res.leaks, res.check_errors), (0, 0, 0));
    assert_eq!(res.total_clusters, 16 * MIB / CS);
    assert!(res.allocated_clusters > 0);
    assert!(res.image_end_offset > 0);
    assert_eq!(close(img), 0);
    let (code, out) = qemu_img_check(&path);
    assert_eq!(code, 0, "qemu-img check: {out}");

    // Reopen read-only: data survived, info says read-only, writes give -EROFS.
    let img = open(&path, "", QCOWPROV_OPEN_RDONLY).expect("reopen");
    assert_eq!(
        pread(img, 512 * 1024, 512 * 1024).unwrap(),
        data[512 * 1024..]
    );
    assert_ne!(info(img).flags & QCOWPROV_INFO_READ_ONLY, 0);
    assert_eq!(pwrite(img, &[1], 0, 0), -i64::from(libc::EROFS));
    assert!(last_error().contains("read-only"), "{}", last_error());
    assert_eq!(close(img), 0);
}

#[test]
fn default_policy_anchors_discards_on_v3() {
    let dir = TempDir::new("anchor");
    let path = dir.path("a.qcow2");
    // NULL options are the defaults.
    let p = cpath(&path);
    // SAFETY: valid path string, NULL options allowed.
    let r = unsafe { qcowprov_create(p.as_ptr(), std::ptr::null(), 4 * MIB) };
    assert_eq!(r, 0);
    let mut img: *mut QcowprovImage = std::ptr::null_mut();
    // SAFETY: valid path, NULL options allowed, valid out pointer.
    let r = unsafe { qcowprov_open(p.as_ptr(), std::ptr::null(), 0, &mut img) };
    assert_eq!(r, 0, "{}", last_error());
    assert_eq!(info(img).provision, QcowprovProvision::Metadata as u32);
    assert_eq!(
        pwrite(img, &pattern(2 * CS as usize, 0, 9), 0, 0),
        2 * CS as i64
    );
    // SAFETY: live handle.
    assert_eq!(unsafe { qcowprov_discard(img, 0, 2 * CS) }, 0);
    // provision=metadata: zero clusters that keep their host cluster.
    let (pnum, flags, host) = status(img, 0, 4 * MIB);
    assert_eq!(pnum, 2 * CS);
    assert_eq!(
        flags,
        QCOWPROV_STATUS_ZERO | QCOWPROV_STATUS_ALLOCATED | QCOWPROV_STATUS_OFFSET_VALID
    );
    assert!(host > 0);
    assert_eq!(
        pread(img, 2 * CS as usize, 0).unwrap(),
        vec![0; 2 * CS as usize]
    );
    assert_eq!(close(img), 0);
    let (code, out) = qemu_img_check(&path);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn backing_chain_reports_depth_and_backing_info() {
    let dir = TempDir::new("backing");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    assert_eq!(create(&base, "", 2 * MIB), 0);
    let img = open(&base, "", 0).unwrap();
    assert_eq!(pwrite(img, &pattern(CS as usize, 0, 5), 0, 0), CS as i64);
    assert_eq!(close(img), 0);
    // Size 0: taken from the backing file.
    let opts = format!("backing_file={},backing_fmt=qcow2", base.display());
    assert_eq!(create(&top, &opts, 0), 0, "{}", last_error());
    let img = open(&top, "", 0).unwrap();
    let i = info(img);
    assert_eq!(i.virtual_size, 2 * MIB);
    assert_ne!(i.flags & QCOWPROV_INFO_HAS_BACKING, 0);
    assert_eq!(field(&i.backing_file), base.display().to_string());
    assert_eq!(field(&i.backing_format), "qcow2");
    let st = status_depth(img, 0, 2 * MIB);
    assert_eq!(st.depth, 1);
    assert_eq!(st.len, CS);
    assert_ne!(st.flags & QCOWPROV_STATUS_BACKING, 0);
    assert_ne!(st.flags & QCOWPROV_STATUS_DATA, 0);
    assert_eq!(
        pread(img, CS as usize, 0).unwrap(),
        pattern(CS as usize, 0, 5)
    );
    assert_eq!(close(img), 0);
    // Without the backing file the range reads zeros.
    let img = open(&top, "", QCOWPROV_OPEN_NO_BACKING).unwrap();
    assert_eq!(pread(img, 512, 0).unwrap(), vec![0; 512]);
    assert_eq!(close(img), 0);
    assert_eq!(qemu_img_check(&top).0, 0);
}

#[test]
fn check_runs_in_every_fix_mode() {
    let dir = TempDir::new("fixmodes");
    let path = dir.path("a.qcow2");
    assert_eq!(create(&path, "", 4 * MIB), 0);
    let img = open(&path, "", 0).unwrap();
    assert_eq!(pwrite(img, &pattern(CS as usize, 0, 1), 0, 0), CS as i64);
    assert_eq!(close(img), 0);
    // A clean image stays clean under every fix mode (repairs are the engine's tests).
    let img = open(&path, "", 0).unwrap();
    for fix in [
        0,
        QCOWPROV_CHECK_FIX_LEAKS,
        QCOWPROV_CHECK_FIX_ALL,
        QCOWPROV_CHECK_FIX_ALL | QCOWPROV_CHECK_FIX_LEAKS,
    ] {
        let r = check(img, fix);
        assert_eq!((r.exit_code, r.corruptions_fixed, r.leaks_fixed), (0, 0, 0));
    }
    assert_eq!(close(img), 0);
    assert_eq!(qemu_img_check(&path).0, 0);
    // A read-only image cannot be repaired.
    let img = open(&path, "", QCOWPROV_OPEN_RDONLY).unwrap();
    let mut res = QcowprovCheckResult {
        exit_code: 77,
        ..Default::default()
    };
    // SAFETY: live handle, whole struct, no callback.
    let r = unsafe {
        qcowprov_check(
            img,
            QCOWPROV_CHECK_FIX_LEAKS,
            &mut res,
            None,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, -libc::EROFS);
    assert_eq!(res.exit_code, 77, "result untouched on failure");
    assert_eq!(check(img, 0).exit_code, 0);
    assert_eq!(close(img), 0);
}

#[test]
fn images_created_here_match_qemu_img_info() {
    let dir = TempDir::new("info");
    let path = dir.path("a.qcow2");
    let opts = "cluster_size=131072,extended_l2=on,lazy_refcounts=on,compression_type=zstd,refcount_bits=32";
    assert_eq!(create(&path, opts, 64 * MIB), 0, "{}", last_error());
    let out = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    assert!(out.contains("\"cluster-size\": 131072"), "{out}");
    assert!(out.contains("\"extended-l2\": true"), "{out}");
    let img = open(&path, "", 0).unwrap();
    let i = info(img);
    assert_eq!((i.cluster_size, i.subcluster_size), (131072, 4096));
    assert_eq!(i.refcount_bits, 32);
    assert_eq!(
        i.flags,
        QCOWPROV_INFO_EXTENDED_L2
            | QCOWPROV_INFO_LAZY_REFCOUNTS
            | QCOWPROV_INFO_COMPRESSION_ZSTD
            | QCOWPROV_INFO_LOCKED
    );
    assert_eq!(close(img), 0);
    assert_eq!(qemu_img_check(&path).0, 0);
}

#[test]
fn many_threads_read_one_handle() {
    let dir = TempDir::new("threads");
    let path = dir.path("a.qcow2");
    let size = 8 * MIB;
    assert_eq!(create(&path, "", size), 0);
    let img = open(&path, "", 0).unwrap();
    let data = pattern(size as usize, 0, 7);
    for off in (0..size).step_by(MIB as usize) {
        let o = off as usize;
        assert_eq!(pwrite(img, &data[o..o + MIB as usize], off, 0), MIB as i64);
    }
    // The handle crosses threads as an address: it is Send + Sync by contract.
    let addr = img as usize;
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let data = &data;
            s.spawn(move || {
                let img = addr as *mut QcowprovImage;
                let mut seed = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..200 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let len = (seed % (256 * 1024)) as usize + 1;
                    // Readers stay below the last MiB, which the writer rewrites.
                    let off = (seed >> 20) % (size - MIB - len as u64);
                    let got = pread(img, len, off).expect("pread");
                    let o = off as usize;
                    assert_eq!(got, data[o..o + len], "thread {t} at {off:#x}+{len:#x}");
                }
            });
        }
        // A writer to a disjoint range (the last MiB) at the same time.
        s.spawn(move || {
            let img = addr as *mut QcowprovImage;
            for i in 0..64u64 {
                let off = size - MIB + (i % 16) * CS;
                let buf = pattern(4096, off, 0x55);
                assert_eq!(pwrite(img, &buf, off, 0), 4096);
                assert_eq!(pread(img, 4096, off).unwrap(), buf);
            }
        });
    });
    assert_eq!(close(img), 0);
    assert_eq!(qemu_img_check(&path).0, 0);
}
