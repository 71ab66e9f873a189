//! The asynchronous queue ([`AioQueue`]) at queue depth against a model and against QEMU.
//!
//! Each round puts up to 32 requests in flight together: reads, writes (unaligned or whole
//! clusters, some FUA), discards and write-zeroes (with and without may-unmap), over
//! disjoint cluster spans (the order of overlapping requests is the submitter's business,
//! as in the block layer; requests that do not overlap must never interfere, even when they
//! share L2 tables and refcount blocks). Every read must return the model as it stood
//! before the round; every request must complete exactly once with its byte count. The
//! same requests, round after round, go through `qemu-io` on a twin image; at the end the
//! two images must read the same (`qemu-img compare`), map the same (`qemu-img map
//! --output=json` without host offsets), and ours must pass `qemu-img check` clean.
//!
//! Runs on both backends (io_uring and the thread pool), buffered and `cache.direct=on`,
//! with 64 KiB and 4 KiB clusters (small metadata caches: cache misses inside plans).

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use qcow2_engine::{
    create, AioCompletion, AioKind, AioQueue, AioRequest, CreateOptions, Image, IoBuf, OpenOptions,
    ZeroFlags,
};
use support::*;

const SIZE: u64 = 16 << 20;
const DEPTH: usize = 32;
const ROUNDS: usize = 40;

/// One request of a round, with what it does to the model and to qemu-io.
enum Op {
    Read(u64, u64),
    Write(u64, u64, u8, bool),
    Discard(u64, u64),
    Zero(u64, u64, bool),
    Flush,
}

fn qemu_cmd(op: &Op) -> Option<String> {
    Some(match *op {
        Op::Read(..) => return None,
        Op::Write(o, l, p, fua) => format!("write{} -P {p} {o} {l}", if fua { " -f" } else { "" }),
        Op::Discard(o, l) => format!("discard {o} {l}"),
        Op::Zero(o, l, u) => format!("write -z{} {o} {l}", if u { " -u" } else { "" }),
        Op::Flush => "flush".into(),
    })
}

/// A round of non-overlapping requests (disjoint cluster spans).
fn round(rng: &mut Rng, cs: u64, align: u64) -> Vec<Op> {
    let clusters = SIZE / cs;
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut ops = Vec::new();
    let n = 1 + rng.below(DEPTH as u64);
    for _ in 0..n * 2 {
        if ops.len() as u64 >= n {
            break;
        }
        let k = 1 + rng.below(3);
        let c = rng.below(clusters - k + 1);
        if taken.iter().any(|&(a, b)| c < b && a < c + k) {
            continue;
        }
        taken.push((c, c + k));
        let (start, span) = (c * cs, k * cs);
        // An aligned sub-range of the span (any byte when buffered).
        let len = (1 + rng.below(span)).div_ceil(align) * align;
        let len = len.min(span);
        let off = start + rng.below((span - len) / align + 1) * align;
        let whole = rng.below(3) == 0;
        let (off, len) = if whole { (start, span) } else { (off, len) };
        ops.push(match rng.below(10) {
            0..=2 => Op::Read(off, len),
            3..=6 => Op::Write(off, len, 1 + rng.below(255) as u8, rng.below(5) == 0),
            7 => Op::Discard(off, len),
            _ => Op::Zero(off, len, rng.below(2) == 0),
        });
    }
    if rng.below(6) == 0 {
        ops.push(Op::Flush);
    }
    ops
}

/// `qemu-img map --output=json` without host offsets, adjacent equal entries merged.
fn map_shape(path: &Path) -> Vec<(u64, u64, String)> {
    let out = qemu_img(&["map", "--output=json", "-U", path.to_str().expect("utf-8")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map JSON");
    let mut r: Vec<(u64, u64, String)> = Vec::new();
    for e in v.as_array().expect("array") {
        let key = format!(
            "data={} zero={} present={}",
            e["data"], e["zero"], e["present"]
        );
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match r.last_mut() {
            Some(last) if last.2 == key && last.0 + last.1 == s => last.1 += l,
            _ => r.push((s, l, key)),
        }
    }
    r
}

fn run(kind: AioKind, direct: bool, cluster: u64, seed: u64) {
    let dir = TempDir::new("aioq");
    let ours = dir.path("ours.qcow2");
    let theirs = dir.path("theirs.qcow2");
    let mut co = CreateOptions::parse(&format!("cluster_size={cluster}")).unwrap();
    co.size = Some(SIZE);
    create(&ours, &co).expect("create");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        theirs.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let aio = match kind {
        AioKind::IoUring => "io_uring",
        AioKind::Threads => "threads",
    };
    let opts = OpenOptions::parse(&format!(
        "discard=unmap,aio={aio},cache.direct={},l2-cache-size=64K,refcount-cache-size=16K,\
         aio-queue-depth={DEPTH}",
        if direct { "on" } else { "off" }
    ))
    .expect("options");
    let img = Arc::new(Image::open(&ours, &opts).expect("open"));
    assert_eq!(img.info().aio, kind);
    let q = AioQueue::start(img.clone()).expect("start queue");
    assert_eq!(q.kind(), kind);
    let align = q.alignment().max(1);
    let cs = img.cluster_size();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(seed);
    let mut cmds: Vec<String> = Vec::new();
    for r in 0..ROUNDS {
        let ops = round(&mut rng, cs, align.max(if direct { 4096 } else { 1 }));
        let mut expect: HashMap<u64, (u64, u64, bool)> = HashMap::new();
        let reqs: Vec<(u64, AioRequest)> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let user = (r as u64) << 32 | i as u64;
                let req = match *op {
                    Op::Read(off, len) => {
                        expect.insert(user, (off, len, true));
                        AioRequest::Read {
                            off,
                            buf: IoBuf::new(len as usize, align as usize).unwrap(),
                        }
                    }
                    Op::Write(off, len, p, fua) => {
                        expect.insert(user, (off, len, false));
                        let mut buf = IoBuf::new(len as usize, align as usize).unwrap();
                        buf.write_from(0, &vec![p; len as usize]);
                        AioRequest::Write { off, buf, fua }
                    }
                    Op::Discard(off, len) => {
                        expect.insert(user, (off, 0, false));
                        AioRequest::Discard { off, len }
                    }
                    Op::Zero(off, len, unmap) => {
                        expect.insert(user, (off, 0, false));
                        AioRequest::WriteZeroes {
                            off,
                            len,
                            flags: ZeroFlags {
                                may_unmap: unmap,
                                ..Default::default()
                            },
                        }
                    }
                    Op::Flush => {
                        expect.insert(user, (0, 0, false));
                        AioRequest::Flush
                    }
                };
                (user, req)
            })
            .collect();
        let n = reqs.len();
        let (queued, err) = q.submit_many(reqs);
        assert!(err.is_none(), "round {r}: submission refused: {err:?}");
        assert_eq!(queued, n);
        let mut done: Vec<AioCompletion> = Vec::new();
        while done.len() < n {
            q.wait(n - done.len(), Some(std::time::Duration::from_secs(60)));
            let before = done.len();
            q.reap(usize::MAX, &mut done);
            assert!(done.len() > before, "round {r}: no completion within 60 s");
        }
        assert_eq!(q.in_flight(), 0);
        for c in done {
            let (off, len, read) = expect.remove(&c.user).unwrap_or_else(|| {
                panic!("round {r}: unknown or repeated completion {:#x}", c.user)
            });
            let got = c
                .result
                .unwrap_or_else(|e| panic!("round {r}: request at {off:#x}: {e}"));
            assert_eq!(got, len, "round {r}: byte count of the request at {off:#x}");
            if read {
                let data = c.buf.expect("a read's buffer").to_vec();
                let m = &model[off as usize..(off + len) as usize];
                if let Some(i) = (0..data.len()).find(|&i| data[i] != m[i]) {
                    panic!(
                        "round {r}: read at {off:#x}+{len:#x}: byte {:#x} reads {:#x}, model {:#x}",
                        off + i as u64,
                        data[i],
                        m[i]
                    );
                }
            }
        }
        assert!(expect.is_empty(), "round {r}: completions missing");
        for op in &ops {
            match *op {
                Op::Write(o, l, p, _) => model[o as usize..(o + l) as usize].fill(p),
                Op::Zero(o, l, _) => model[o as usize..(o + l) as usize].fill(0),
                Op::Discard(o, l) => {
                    // discard=unmap: whole clusters read zero, partial ones are kept.
                    let (a, b) = (o.div_ceil(cs) * cs, (o + l) / cs * cs);
                    if a < b {
                        model[a as usize..b as usize].fill(0);
                    }
                }
                _ => {}
            }
            cmds.extend(qemu_cmd(op));
        }
    }
    drop(q);
    let img = Arc::try_unwrap(img).expect("the queue let the image go");
    img.close().expect("close");
    // The whole disk through a fresh open.
    let img = Image::open(&ours, &OpenOptions::default()).expect("reopen");
    let mut all = vec![0u8; SIZE as usize];
    img.read_at(&mut all, 0).expect("read back");
    assert!(
        all == model,
        "the image after reopening differs from the model"
    );
    drop(img);
    assert_check_clean(&ours);
    qemu_io(
        &["--image-opts"],
        Path::new(&format!(
            "driver=qcow2,discard=unmap,file.filename={}",
            theirs.display()
        )),
        &cmds,
    );
    assert_identical(&ours, &theirs);
    assert_eq!(map_shape(&ours), map_shape(&theirs), "qemu-img map differs");
}

#[test]
fn io_uring_buffered_64k() {
    run(AioKind::IoUring, false, 65536, 1);
}

#[test]
fn io_uring_direct_4k() {
    run(AioKind::IoUring, true, 4096, 2);
}

#[test]
fn io_uring_direct_64k() {
    run(AioKind::IoUring, true, 65536, 3);
}

#[test]
fn threads_buffered_4k() {
    run(AioKind::Threads, false, 4096, 4);
}

#[test]
fn threads_direct_64k() {
    run(AioKind::Threads, true, 65536, 5);
}
