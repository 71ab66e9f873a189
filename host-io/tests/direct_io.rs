//! FileStorage with O_DIRECT: unaligned offsets, lengths and buffers round-trip, checked
//! against MemStorage as a model.

mod common;

use common::{pattern, TempDir};
use host_io::{
    AlignedBuf, FileOptions, FileStorage, MemStorage, SplitMix64, Storage, ZeroMethod, ZeroMode,
};

fn open_direct(d: &TempDir, name: &str) -> Option<FileStorage> {
    match FileStorage::open(d.join(name), &FileOptions::create_new().direct(true)) {
        Ok(s) => Some(s),
        Err(e) if host_io::raw_os_error_of(&e) == Some(libc::EINVAL) => {
            eprintln!("skipped: the temp dir's filesystem refuses O_DIRECT: {e}");
            None
        }
        Err(e) => panic!("open O_DIRECT: {e}"),
    }
}

/// Assert equal bytes, reporting the first difference instead of dumping both buffers.
fn same(a: &[u8], b: &[u8], what: &str) {
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    assert!(
        a.len() == b.len() && first.is_none(),
        "{what}: lengths {} vs {}, first difference at {first:?}",
        a.len(),
        b.len()
    );
}

fn read(s: &dyn Storage, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xEEu8; len];
    s.read_at(&mut v, off).unwrap();
    v
}

#[test]
fn unaligned_roundtrip_keeps_exact_length() {
    let d = TempDir::new("direct");
    let Some(s) = open_direct(&d, "a") else {
        return;
    };
    let caps = s.capabilities();
    assert!(s.is_direct());
    assert!(caps.io_alignment >= 512 && caps.io_alignment.is_power_of_two());
    // 100 bytes at 7: a single partial block, file must be exactly 107 bytes long.
    s.write_at(&pattern(7, 100, 1), 7).unwrap();
    assert_eq!(s.len().unwrap(), 107);
    assert_eq!(read(&s, 7, 100), pattern(7, 100, 1));
    assert!(read(&s, 0, 7).iter().all(|&b| b == 0));
    // Spanning several blocks and a bounce chunk boundary, from an odd offset.
    let big = pattern(3001, 1_500_000, 2);
    s.write_at(&big, 3001).unwrap();
    assert_eq!(s.len().unwrap(), 3001 + 1_500_000);
    same(&read(&s, 3001, big.len()), &big, "big write");
    // The earlier bytes survived the read-modify-write of the shared block.
    assert_eq!(read(&s, 7, 100), pattern(7, 100, 1));
    // Reads straddling EOF zero-fill.
    let v = read(&s, 1_502_900, 5000);
    assert_eq!(&v[..101], &big[big.len() - 101..]);
    assert!(v[101..].iter().all(|&b| b == 0));
}

#[test]
fn aligned_buffers_take_the_direct_path() {
    let d = TempDir::new("direct-aligned");
    let Some(s) = open_direct(&d, "a") else {
        return;
    };
    let a = s.capabilities().io_alignment as usize;
    let mut buf = AlignedBuf::new(4 * a, a).unwrap();
    buf.copy_from_slice(&pattern(0, 4 * a, 9));
    s.write_at(&buf, a as u64).unwrap();
    let mut back = AlignedBuf::new(4 * a, a).unwrap();
    s.read_at(&mut back, a as u64).unwrap();
    assert_eq!(&*back, &*buf);
    // An aligned read running past EOF zero-fills.
    let mut tail = AlignedBuf::new(2 * a, a).unwrap();
    tail.fill(0xEE);
    s.read_at(&mut tail, 4 * a as u64).unwrap();
    assert_eq!(&tail[..a], &buf[3 * a..]);
    assert!(tail[a..].iter().all(|&b| b == 0));
}

#[test]
fn random_ops_match_memory_model() {
    let d = TempDir::new("direct-model");
    let Some(s) = open_direct(&d, "a") else {
        return;
    };
    let model = MemStorage::new();
    let mut rng = SplitMix64::new(0x5eed);
    for step in 0..300 {
        let off = rng.below(300_000);
        let len = 1 + rng.below(20_000) as usize;
        match rng.below(10) {
            0..=4 => {
                let data = pattern(off, len, step as u8);
                s.write_at(&data, off).unwrap();
                model.write_at(&data, off).unwrap();
            }
            5 => {
                let parts = [pattern(off, len, 1), pattern(off, 777, 2)];
                let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
                s.write_vectored_at(&refs, off).unwrap();
                model.write_vectored_at(&refs, off).unwrap();
            }
            6 => {
                let mode = if rng.coin() {
                    ZeroMode::Unmap
                } else {
                    ZeroMode::KeepAllocated
                };
                s.write_zeroes(off, len as u64, mode).unwrap();
                model.write_zeroes(off, len as u64, mode).unwrap();
            }
            7 => {
                let l = rng.below(320_000);
                s.set_len(l).unwrap();
                model.set_len(l).unwrap();
            }
            _ => {
                same(
                    &read(&s, off, len),
                    &read(&model, off, len),
                    &format!("step {step}"),
                );
            }
        }
        assert_eq!(
            s.len().unwrap(),
            model.len().unwrap(),
            "length after step {step}"
        );
    }
    let n = model.len().unwrap() as usize;
    same(&read(&s, 0, n), &model.to_vec(), "final image");
}

#[test]
fn zero_buffer_fallback_works_in_direct_mode() {
    let d = TempDir::new("direct-zero");
    let path = d.join("a");
    let opts = FileOptions {
        disabled: vec![
            host_io::Primitive::WriteZeroesFlag,
            host_io::Primitive::ZeroRange,
            host_io::Primitive::PunchHole,
        ],
        ..FileOptions::create_new().direct(true)
    };
    let s = match FileStorage::open(&path, &opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipped: O_DIRECT open failed: {e}");
            return;
        }
    };
    s.write_at(&pattern(0, 100_000, 4), 0).unwrap();
    let m = s
        .write_zeroes(1234, 50_000, ZeroMode::KeepAllocated)
        .unwrap();
    assert_eq!(m, ZeroMethod::WroteZeroBuffers);
    let mut want = pattern(0, 100_000, 4);
    want[1234..51_234].fill(0);
    same(&read(&s, 0, 100_000), &want, "zeroed by buffers");
    assert_eq!(s.len().unwrap(), 100_000);
}
