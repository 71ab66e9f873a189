//! QEMU's iotests with requests in flight, as our own scenarios: a request is held at its
//! data write (QEMU: blkdebug `break write_aio` through qemu-io, live; the engine: threads
//! over `BreakStorage` below, which holds the first write carrying the request's data
//! until released), other requests run meanwhile, then it is released.
//!
//! - 046 "concurrent cluster allocations" -> `iotest_046_concurrent_allocations`: more
//!   writes touching the held write's cluster or the next ones. Both images must hold the
//!   content the requests define (046's verify list: every byte but the range two
//!   overlapping requests race for) and pass `qemu-img check` clean; none of the writes
//!   touching the held cluster may complete before it. Entries are not compared: in-flight
//!   ordering decides where QEMU puts the clusters. Cases (046's order): a write before
//!   and after the held one in its cluster; sequential into the next cluster, with and
//!   without a gap; the next cluster already allocated, allocated in the right physical
//!   place, compressed; reverse sequential, with and without a gap; a larger request over
//!   the held one (its overlap undefined).
//! - 060 "overlap while COW is in flight" -> `iotest_060_overlap_while_write_in_flight`:
//!   a version 2 image whose second L2 table is marked free; while a first allocating
//!   write is held, a second write is given that table's cluster and refused by the
//!   overlap check. 060 holds the copy-on-write read, which QEMU 10 no longer does for a
//!   cluster without a backing file (it zeroes the cluster instead), so both sides hold
//!   the data write. Both refuse the second write and damage nothing more (`qemu-img
//!   check` finds the same errors); QEMU then reports the held write done but drops it
//!   (the image is unusable, its L2 update never written), the engine completes it and
//!   it reads back: the one, safe, difference.

mod support;

use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use host_io::{
    Capabilities, DiscardOutcome, FileOptions, FileStorage, Storage, ZeroMethod, ZeroMode,
};
use qcow2_engine::{Image, OpenOptions};
use support::*;

const K: u64 = 1024;

/// A file storage that holds the first write carrying guest data of an armed pattern (a
/// run of 512 bytes of it) until `resume`.
#[derive(Debug)]
struct BreakStorage {
    inner: FileStorage,
    state: Mutex<Brk>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Brk {
    armed: Option<u8>,
    hit: bool,
    released: bool,
}

impl BreakStorage {
    fn lock(&self) -> std::sync::MutexGuard<'_, Brk> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(&self, pattern: u8) {
        *self.lock() = Brk {
            armed: Some(pattern),
            ..Brk::default()
        };
    }

    /// Wait until the armed write is held.
    fn wait_break(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut st = self.lock();
        while !st.hit {
            assert!(Instant::now() < deadline, "the armed write never came");
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    fn resume(&self) {
        self.lock().released = true;
        self.cv.notify_all();
    }

    fn on_write(&self, bufs: &[&[u8]]) {
        let mut st = self.lock();
        let Some(p) = st.armed else {
            return;
        };
        let carries = bufs.iter().any(|b| {
            b.chunks(512)
                .any(|c| c.len() == 512 && c.iter().all(|&x| x == p))
        });
        if !carries {
            return;
        }
        st.armed = None;
        st.hit = true;
        self.cv.notify_all();
        while !st.released {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Storage for BreakStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.on_write(&[buf]);
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.on_write(bufs);
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<ZeroMethod> {
        self.inner.write_zeroes(offset, len, mode)
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.data_run(offset, len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
}

/// One case: synchronous preparation (qemu-io on both twins), the held write `(pattern,
/// offset, length)`, the writes issued while it is held.
struct Case {
    prep: &'static [&'static str],
    held: (u8, u64, u64),
    more: &'static [(u8, u64, u64)],
}

const CASES: &[Case] = &[
    // Allocate the middle of cluster 1, then write before and after it.
    Case {
        prep: &[],
        held: (10, 0x18000, 0x2000),
        more: &[(11, 0x12000, 0x2000), (12, 0x1c000, 0x2000)],
    },
    // Sequential: the middle of cluster 2, then overlapping into the next cluster.
    Case {
        prep: &[],
        held: (20, 0x28000, 0x2000),
        more: &[(21, 0x2a000, 0x10000)],
    },
    // The same with a gap.
    Case {
        prep: &[],
        held: (40, 0x48000, 0x2000),
        more: &[(41, 0x4c000, 0x10000)],
    },
    // Sequential, the next cluster already allocated.
    Case {
        prep: &["write -q -P 70 0x76000 0x8000"],
        held: (60, 0x66000, 0x2000),
        more: &[(61, 0x6a000, 0xe000)],
    },
    // Sequential, the next cluster allocated in the right physical place.
    Case {
        prep: &[
            "write -q -P 89 0x80000 0x1000",
            "write -q -P 90 0x96000 0x8000",
            "discard -q 0x80000 0x10000",
        ],
        held: (80, 0x86000, 0x2000),
        more: &[(81, 0x8a000, 0xe000)],
    },
    // Sequential, the next cluster compressed.
    Case {
        prep: &[
            "write -q -P 109 0xa0000 0x1000",
            "write -q -c -P 110 0xb0000 0x10000",
            "discard -q 0xa0000 0x10000",
        ],
        held: (100, 0xa6000, 0x2000),
        more: &[(101, 0xaa000, 0xe000)],
    },
    // Reverse sequential.
    Case {
        prep: &[],
        held: (121, 0xdc000, 0x2000),
        more: &[(120, 0xc4000, 0x18000)],
    },
    // Reverse sequential with a gap.
    Case {
        prep: &[],
        held: (141, 0xfc000, 0x2000),
        more: &[(140, 0xe4000, 0x14000)],
    },
    // A larger request over the held one: their overlap is undefined.
    Case {
        prep: &[],
        held: (161, 0x10c000, 0x8000),
        more: &[(160, 0x104000, 0x18000)],
    },
];

/// The range two requests race for (046 leaves its content undefined).
const UNDEFINED: (u64, u64) = (0x10c000, 0x8000);
/// The guest range the cases touch.
const SPAN: u64 = 0x120000;

/// The content the cases define: the base (pattern `i` in its 64 KiB cluster `i`), then
/// every preparation and request in order (discards read zero on a v3 image).
fn model() -> Vec<u8> {
    let mut m: Vec<u8> = (0..SPAN).map(|p| (p >> 16) as u8).collect();
    let mut put = |p: u8, o: u64, l: u64| m[o as usize..(o + l) as usize].fill(p);
    for c in CASES {
        for cmd in c.prep {
            let f: Vec<&str> = cmd.split_whitespace().collect();
            let n = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            match f[0] {
                "write" => {
                    let p: u8 = f[f.len() - 3].parse().unwrap();
                    put(p, n(f[f.len() - 2]), n(f[f.len() - 1]));
                }
                "discard" => put(0, n(f[2]), n(f[3])),
                _ => unreachable!(),
            }
        }
        put(c.held.0, c.held.1, c.held.2);
        for &(p, o, l) in c.more {
            put(p, o, l);
        }
    }
    m
}

/// qemu-io `read -P` commands checking `m` outside the undefined range.
fn verify_cmds(m: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut s = 0usize;
    while s < m.len() {
        let mut e = s + 1;
        while e < m.len() && m[e] == m[s] && e % 0x1000 != 0 {
            e += 1;
        }
        let (u0, u1) = (UNDEFINED.0 as usize, (UNDEFINED.0 + UNDEFINED.1) as usize);
        if e <= u0 || s >= u1 {
            out.push(format!("read -q -P {} {s} {}", m[s], e - s));
        }
        s = e;
    }
    out
}

#[test]
fn iotest_046_concurrent_allocations() {
    require_qemu_tools();
    let d = TempDir::new("iot046");
    let base = d.path("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        "128M",
    ]);
    let fill: Vec<String> = (0..32u64)
        .map(|i| format!("write -q -P {i} {} 64k", i * 64 * K))
        .collect();
    qemu_io(&[], &base, &fill);
    let (q, o) = (d.path("q.qcow2"), d.path("o.qcow2"));
    for p in [&q, &o] {
        let a = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p.to_str().unwrap(),
            "6G",
        ];
        qemu_img(&a);
    }

    // QEMU: 046's session, one qemu-io over blkdebug.
    let mut script: Vec<String> = Vec::new();
    for c in CASES {
        script.extend(c.prep.iter().map(|s| s.to_string()));
        script.push("aio_flush".into());
        script.push("break write_aio A".into());
        let (p, off, len) = c.held;
        script.push(format!("aio_write -q -P {p} {off:#x} {len:#x}"));
        script.push("wait_break A".into());
        for &(p, off, len) in c.more {
            script.push(format!("aio_write -q -P {p} {off:#x} {len:#x}"));
        }
        script.push("resume A".into());
        script.push("aio_flush".into());
    }
    let spec = format!("blkdebug::{}", q.display());
    qemu_io(&[], Path::new(&spec), &script);

    // The engine: preparation by qemu-io (the engine has no compressed-write request),
    // the held write and the others from threads.
    let brk = Arc::new(BreakStorage {
        inner: FileStorage::open(&o, &FileOptions::new()).expect("open"),
        state: Mutex::new(Brk::default()),
        cv: Condvar::new(),
    });
    for c in CASES {
        if !c.prep.is_empty() {
            let cmds: Vec<String> = c.prep.iter().map(|s| s.to_string()).collect();
            qemu_io(&[], &o, &cmds);
        }
        let storage: Arc<dyn Storage> = brk.clone();
        let img = Image::open_storage(storage, &OpenOptions::default(), Some(&d.0))
            .expect("open over the break storage");
        let (p, off, len) = c.held;
        brk.arm(p);
        std::thread::scope(|s| {
            let held = s.spawn(|| img.write_at(&vec![p; len as usize], off));
            brk.wait_break();
            let others: Vec<_> = c
                .more
                .iter()
                .map(|&(p, off, len)| {
                    let img = &img;
                    s.spawn(move || img.write_at(&vec![p; len as usize], off))
                })
                .collect();
            // Let them reach the held cluster (if they start later, the order is the
            // same one: the held write was issued first).
            std::thread::sleep(Duration::from_millis(100));
            // Each touches the held write's cluster: none may complete before it.
            assert!(
                others.iter().all(|t| !t.is_finished()),
                "a write touching a cluster being allocated completed first ({:?})",
                c.held
            );
            brk.resume();
            held.join().unwrap().expect("held write");
            for t in others {
                t.join().unwrap().expect("write issued while held");
            }
        });
        img.close().expect("close");
    }

    let m = model();
    qemu_io(&[], &q, &verify_cmds(&m));
    qemu_io(&[], &o, &verify_cmds(&m));
    let img = Image::open(&o, &OpenOptions::default()).unwrap();
    let mut got = vec![0u8; SPAN as usize];
    img.read_at(&mut got, 0).unwrap();
    img.close().unwrap();
    let (u0, u1) = (UNDEFINED.0 as usize, (UNDEFINED.0 + UNDEFINED.1) as usize);
    if let Some(i) = (0..m.len()).find(|&i| (i < u0 || i >= u1) && got[i] != m[i]) {
        panic!("046: byte {i:#x} is {}, expected {}", got[i], m[i]);
    }
    // The undefined range holds one of the two racing patterns in each request's piece.
    assert!(got[u0..u1].iter().all(|&b| b == 160 || b == 161));
    assert_check_clean(&q);
    assert_check_clean(&o);
}

/// 060's image: v2, 1 GiB, data at 0 and 512 MiB (the second forces a second L2 table
/// after the first data cluster), the first discarded (freed, to be reused by the next
/// allocation), the second L2 table's refcount set to 0.
fn image_060(p: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        p.to_str().unwrap(),
        "1G",
    ]);
    qemu_io(
        &[],
        p,
        &["write -q 0 64k".into(), "write -q 512M 64k".into()],
    );
    qemu_io(&[], p, &["discard -q 0 64k".into()]);
    // Refcount block at 0x20000, 16-bit entries: cluster 6 (0x60000) is the second L2
    // table.
    assert_eq!(
        file_be64(p, 0x30000 + 8) & !(1 << 63),
        0x60000,
        "060 layout"
    );
    patch_file(p, 0x20000 + 12, &[0, 0]);
}

#[test]
fn iotest_060_overlap_while_write_in_flight() {
    require_qemu_tools();
    let d = TempDir::new("iot060");
    let (q, o) = (d.path("q.qcow2"), d.path("o.qcow2"));
    image_060(&q);
    image_060(&o);

    // QEMU: the second write fails (overlap with active L2, the image made unusable);
    // the held one then reports success.
    let script = format!(
        "open -o file.driver=blkdebug {}\nbreak write_aio 0\naio_write -P 0xcd 0 1k\n\
         wait_break 0\nwrite -P 0xee 64k 64k\nresume 0\naio_flush\n",
        q.display()
    );
    let mut child = std::process::Command::new("qemu-io")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io (install qemu-utils)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("write failed: Input/output error"),
        "qemu-io: the overlapping write must fail: {text}"
    );

    // The engine, same requests.
    let brk = Arc::new(BreakStorage {
        inner: FileStorage::open(&o, &FileOptions::new()).expect("open"),
        state: Mutex::new(Brk::default()),
        cv: Condvar::new(),
    });
    let storage: Arc<dyn Storage> = brk.clone();
    let img = Image::open_storage(storage, &OpenOptions::default(), Some(&d.0)).unwrap();
    brk.arm(0xcd);
    let (held, second) = std::thread::scope(|s| {
        let held = s.spawn(|| img.write_at(&[0xcd; 1024], 0));
        brk.wait_break();
        let second = img.write_at(&[0xee; 65536], 64 * K);
        brk.resume();
        (held.join().unwrap(), second)
    });
    let e = second.expect_err("the write given the L2 table's cluster must fail");
    assert!(e.to_string().contains("corrupt"), "{e}");
    // The held write had its cluster before the refusal: it completes, and lands.
    held.expect("the held write");
    let _ = img.close();
    // Nothing new is damaged: qemu-img check finds the same errors on both (the
    // pre-existing refcount of the L2 table), and no data was written over the table.
    let (cq, outq, _) = qemu_img_status(&["check", q.to_str().unwrap()]);
    let (co, outo, _) = qemu_img_status(&["check", o.to_str().unwrap()]);
    let errors = |t: &str| t.lines().filter(|l| l.starts_with("ERROR")).count();
    assert_eq!(
        (co, errors(&outo)),
        (cq, errors(&outq)),
        "check: ours\n{outo}\nqemu's\n{outq}"
    );
    let img = Image::open(
        &o,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = vec![0u8; 64 * 1024];
    img.read_at(&mut b, 512 << 20).unwrap();
    assert!(
        b.iter().all(|&x| x == 0xcd),
        "the second L2 table's data changed"
    );
    img.read_at(&mut b, 64 * K).unwrap();
    assert!(b.iter().all(|&x| x == 0), "the refused write shows");
    // QEMU's held write reports success too but is dropped (its L2 update never reaches
    // the image made unusable, and v2 has no corrupt bit): a completed write is lost
    // there. Ours is readable.
    img.read_at(&mut b[..1024], 0).unwrap();
    assert!(
        b[..1024].iter().all(|&x| x == 0xcd),
        "a completed write was lost"
    );
}
