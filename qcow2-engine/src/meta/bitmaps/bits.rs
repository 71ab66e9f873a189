//! A flat bit vector: the in-memory content of one dirty bitmap (and the per-chunk state
//! beside it). Bit `i` is bit `i % 64` of word `i / 64`, so the little-endian bytes of the
//! words are the on-disk layout (bit `i` is bit `i % 8` of byte `i / 8`).

/// A fixed-length bit vector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
    len: u64,
}

/// Mask of bits `[a, b)` inside one word (`a < b <= 64`).
fn mask(a: u64, b: u64) -> u64 {
    let hi = if b == 64 { u64::MAX } else { (1u64 << b) - 1 };
    hi & !((1u64 << a) - 1)
}

impl Bits {
    /// `len` clear bits. The zeroed allocation is lazy (calloc), so an untouched bitmap
    /// costs address space, not memory.
    pub(crate) fn new(len: u64) -> Bits {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Number of bits.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bit `i`.
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Apply `f(word, mask)` to the words covering `[a, b)` (clamped to the length); stops
    /// early when `f` returns false. Returns whether it ran to the end.
    fn for_range(&mut self, a: u64, b: u64, mut f: impl FnMut(&mut u64, u64) -> bool) -> bool {
        let b = b.min(self.len);
        let mut i = a;
        while i < b {
            let w = i / 64;
            let end = ((w + 1) * 64).min(b);
            if !f(&mut self.words[w as usize], mask(i % 64, end - w * 64)) {
                return false;
            }
            i = end;
        }
        true
    }

    /// Set bits `[a, b)`.
    pub(crate) fn set_range(&mut self, a: u64, b: u64) {
        self.for_range(a, b, |w, m| {
            *w |= m;
            true
        });
    }

    /// Clear bits `[a, b)`.
    pub(crate) fn clear_range(&mut self, a: u64, b: u64) {
        self.for_range(a, b, |w, m| {
            *w &= !m;
            true
        });
    }

    /// Whether every bit of `[a, b)` is set (bits past the end count as set).
    pub(crate) fn all_set(&self, a: u64, b: u64) -> bool {
        let b = b.min(self.len);
        let mut i = a;
        while i < b {
            let w = i / 64;
            let end = ((w + 1) * 64).min(b);
            let m = mask(i % 64, end - w * 64);
            if self.words[w as usize] & m != m {
                return false;
            }
            i = end;
        }
        true
    }

    /// Whether no bit of `[a, b)` is set.
    pub(crate) fn none_set(&self, a: u64, b: u64) -> bool {
        let b = b.min(self.len);
        let mut i = a;
        while i < b {
            let w = i / 64;
            let end = ((w + 1) * 64).min(b);
            if self.words[w as usize] & mask(i % 64, end - w * 64) != 0 {
                return false;
            }
            i = end;
        }
        true
    }

    /// Clear every bit.
    pub(crate) fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of set bits.
    pub(crate) fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Grow or shrink to `len` bits; new bits are clear.
    pub(crate) fn resize(&mut self, len: u64) {
        self.words.resize(len.div_ceil(64) as usize, 0);
        if len % 64 != 0 {
            let last = self.words.len() - 1;
            self.words[last] &= mask(0, len % 64);
        }
        self.len = len;
    }

    /// From bit `a`, how many bits (at most `limit`, never past the end) share bit `a`'s
    /// value, and that value.
    pub(crate) fn run(&self, a: u64, limit: u64) -> (u64, bool) {
        let b = a.saturating_add(limit).min(self.len);
        if a >= b {
            return (0, false);
        }
        let v = self.get(a);
        let mut i = a;
        while i < b {
            let w = i / 64;
            let end = ((w + 1) * 64).min(b);
            let m = mask(i % 64, end - w * 64);
            let word = if v {
                !self.words[w as usize]
            } else {
                self.words[w as usize]
            } & m;
            if word != 0 {
                return (u64::from(word.trailing_zeros()) + w * 64 - a, v);
            }
            i = end;
        }
        (b - a, v)
    }

    /// Indexes of the set bits, in order.
    pub(crate) fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                Some(w as u64 * 64 + b)
            })
        })
    }

    /// The on-disk bytes of bits `[first, first + 8 * out.len())` (`first` a multiple of 8;
    /// bits past the end read zero).
    pub(crate) fn store(&self, first: u64, out: &mut [u8]) {
        debug_assert_eq!(first % 8, 0);
        for (k, byte) in out.iter_mut().enumerate() {
            let bit = first + 8 * k as u64;
            *byte = if bit >= self.len {
                0
            } else {
                let b = (self.words[(bit / 64) as usize] >> (bit % 64)) as u8;
                let valid = self.len - bit;
                if valid < 8 {
                    b & ((1u8 << valid) - 1)
                } else {
                    b
                }
            };
        }
    }

    /// Or on-disk bytes into bits `[first, ...)` (`first` a multiple of 8); bits past the
    /// end are ignored.
    pub(crate) fn load(&mut self, first: u64, bytes: &[u8]) {
        debug_assert_eq!(first % 8, 0);
        for (k, &byte) in bytes.iter().enumerate() {
            let bit = first + 8 * k as u64;
            if bit >= self.len {
                break;
            }
            if byte != 0 {
                self.words[(bit / 64) as usize] |= u64::from(byte) << (bit % 64);
            }
        }
        self.resize(self.len); // drop bits past the end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow model: one bool per bit.
    fn model_ops(len: u64, ops: &[(bool, u64, u64)]) -> (Bits, Vec<bool>) {
        let mut b = Bits::new(len);
        let mut m = vec![false; len as usize];
        for &(set, a, z) in ops {
            if set {
                b.set_range(a, z);
            } else {
                b.clear_range(a, z);
            }
            for v in &mut m[a.min(len) as usize..z.min(len) as usize] {
                *v = set;
            }
        }
        (b, m)
    }

    #[test]
    fn ranges_runs_and_bytes_match_a_model() {
        let mut seed = 0x1234_5678u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for len in [1u64, 63, 64, 65, 200, 1000] {
            let ops: Vec<(bool, u64, u64)> = (0..30)
                .map(|_| {
                    let a = next(len + 2);
                    (next(3) != 0, a, a + next(130))
                })
                .collect();
            let (b, m) = model_ops(len, &ops);
            assert_eq!(b.count_ones(), m.iter().filter(|&&v| v).count() as u64);
            for _ in 0..200 {
                let a = next(len);
                let z = a + 1 + next(len - a);
                let slice = &m[a as usize..z as usize];
                assert_eq!(b.all_set(a, z), slice.iter().all(|&v| v), "{len} {a} {z}");
                assert_eq!(b.none_set(a, z), slice.iter().all(|&v| !v));
                let (n, v) = b.run(a, z - a);
                assert_eq!(v, m[a as usize]);
                let want = slice.iter().take_while(|&&x| x == v).count() as u64;
                assert_eq!(n, want, "run at {a} in {len}");
            }
            let mut bytes = vec![0u8; len.div_ceil(8) as usize + 3];
            b.store(0, &mut bytes);
            let mut back = Bits::new(len);
            back.load(0, &bytes);
            assert_eq!(back, b);
            for (i, &v) in m.iter().enumerate() {
                assert_eq!(bytes[i / 8] >> (i % 8) & 1 == 1, v);
            }
            let ones: Vec<u64> = b.ones().collect();
            let want: Vec<u64> = (0..len).filter(|&i| m[i as usize]).collect();
            assert_eq!(ones, want);
        }
    }

    #[test]
    fn resize_and_tails() {
        let mut b = Bits::new(70);
        b.set_range(0, 70);
        assert!(b.all_set(0, 1000), "past the end counts as set");
        b.resize(65);
        assert_eq!(b.count_ones(), 65);
        b.resize(130);
        assert_eq!(b.count_ones(), 65, "grown bits are clear");
        let mut bytes = [0xffu8; 2];
        let mut c = Bits::new(12);
        c.load(0, &bytes);
        assert_eq!(c.count_ones(), 12, "bits past the end are ignored");
        c.store(8, &mut bytes[..1]);
        assert_eq!(bytes[0], 0x0f);
    }
}
