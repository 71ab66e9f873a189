//! How one planned host write (`HostIo::Write`) is cut into host requests, decided once
//! for both executors: which zero pieces are zeroed on the host instead of written as
//! bytes, whether the whole range is zeroed first, and which pieces are written together
//! as one request. The synchronous executor carries the steps out in order; the
//! asynchronous one submits them together, after the first zeroing when there is one.

use crate::plan::{Fill, Piece};

/// Zero runs at least this long and aligned to it are zeroed on the host rather than
/// written as zero bytes.
pub(crate) const ZERO_RANGE_MIN: u64 = 4096;

/// The host requests of one planned write.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WriteSteps {
    /// Zero this range on the host before any of `steps` (new clusters, as QEMU does):
    /// ext4 then turns the small unwritten remainders into written extents, so a new
    /// cluster ends as few extents instead of zeros, data, zeros (6,000 random 4 KiB
    /// writes, 256 MiB: ~800 extents as qemu-io's, was ~7,300; examples/extents-vs-qemu.sh).
    pub first: Option<(u64, u64)>,
    /// Requests with no order among them.
    pub steps: Vec<Step>,
}

/// One host request of a planned write.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Zero the range on the host, keeping it allocated.
    Zero {
        /// Host byte offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write `pieces[range]` as one request from host offset `off` (zero pieces in it are
    /// written as zero bytes).
    Run {
        /// Host byte offset.
        off: u64,
        /// Indices into the planned pieces.
        range: std::ops::Range<usize>,
    },
}

impl Step {
    /// The single piece a run writes from the caller's buffer as it is (no copy), if so.
    pub(crate) fn guest_only(&self, pieces: &[Piece]) -> Option<(u64, usize, u64)> {
        match self {
            Step::Run { off, range } if range.len() == 1 => match pieces[range.start] {
                Piece {
                    len,
                    fill: Fill::Guest { at },
                } => Some((*off, at, len)),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Cut the write of `pieces` at host offset `host` into requests. `cheap_zero`: the host
/// zeroes a range cheaply while keeping it allocated (no dirty page cache for the next
/// barrier to write out).
pub(crate) fn write_steps(host: u64, pieces: &[Piece], cheap_zero: bool) -> WriteSteps {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    // A write holding zeros goes to new clusters (`Fill::Zeroes` is only planned for them,
    // and nothing reads them meanwhile): the whole range is zeroed first, as QEMU does.
    let zero_first = cheap_zero
        && pieces.iter().any(|p| p.fill == Fill::Zeroes)
        && host % ZERO_RANGE_MIN == 0
        && total % ZERO_RANGE_MIN == 0;
    let mut steps = Vec::new();
    let mut run_start = (host, 0usize);
    let mut pos = host;
    for (i, p) in pieces.iter().enumerate() {
        let zero_range = cheap_zero
            && p.fill == Fill::Zeroes
            && p.len >= ZERO_RANGE_MIN
            && pos % ZERO_RANGE_MIN == 0
            && p.len % ZERO_RANGE_MIN == 0;
        if zero_range || (zero_first && p.fill == Fill::Zeroes) {
            if run_start.1 < i {
                steps.push(Step::Run {
                    off: run_start.0,
                    range: run_start.1..i,
                });
            }
            if !zero_first {
                steps.push(Step::Zero {
                    off: pos,
                    len: p.len,
                });
            }
            run_start = (pos + p.len, i + 1);
        }
        pos += p.len;
    }
    if run_start.1 < pieces.len() {
        steps.push(Step::Run {
            off: run_start.0,
            range: run_start.1..pieces.len(),
        });
    }
    WriteSteps {
        first: zero_first.then_some((host, total)),
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::read::Src;

    fn guest(at: usize, len: u64) -> Piece {
        Piece {
            len,
            fill: Fill::Guest { at },
        }
    }
    fn zeroes(len: u64) -> Piece {
        Piece {
            len,
            fill: Fill::Zeroes,
        }
    }

    #[test]
    fn a_plain_overwrite_is_one_run_from_the_callers_buffer() {
        let p = [guest(0, 8192)];
        let s = write_steps(1 << 20, &p, true);
        assert_eq!(s.first, None);
        assert_eq!(s.steps.len(), 1);
        assert_eq!(s.steps[0].guest_only(&p), Some((1 << 20, 0, 8192)));
    }

    #[test]
    fn a_new_cluster_is_zeroed_whole_first_and_the_data_written_as_it_is() {
        let p = [zeroes(4096), guest(0, 4096), zeroes(56 << 10)];
        let s = write_steps(1 << 20, &p, true);
        assert_eq!(s.first, Some((1 << 20, 64 << 10)));
        assert_eq!(
            s.steps,
            vec![Step::Run {
                off: (1 << 20) + 4096,
                range: 1..2
            }]
        );
        assert_eq!(s.steps[0].guest_only(&p), Some(((1 << 20) + 4096, 0, 4096)));
    }

    #[test]
    fn sub_block_zeroes_stay_in_the_run_when_the_range_cannot_be_zeroed_first() {
        // 512-byte write into a new 4 KiB-unaligned range: no zero-first, one gathered run.
        let p = [zeroes(512), guest(0, 512), zeroes(1024)];
        let s = write_steps(1 << 20, &p, true);
        assert_eq!(s.first, None);
        assert_eq!(
            s.steps,
            vec![Step::Run {
                off: 1 << 20,
                range: 0..3
            }]
        );
        assert_eq!(s.steps[0].guest_only(&p), None);
    }

    #[test]
    fn without_cheap_zeroing_everything_is_written() {
        let p = [zeroes(4096), guest(0, 4096), zeroes(56 << 10)];
        let s = write_steps(1 << 20, &p, false);
        assert_eq!(s.first, None);
        assert_eq!(
            s.steps,
            vec![Step::Run {
                off: 1 << 20,
                range: 0..3
            }]
        );
    }

    #[test]
    fn copy_on_write_keeps_old_data_in_the_run_and_zeroes_aligned_gaps() {
        let old = Piece {
            len: 4096,
            fill: Fill::Old {
                guest: 0,
                src: Src::Host(1 << 30),
            },
        };
        // Old data, guest data: one run (nothing to zero).
        let p = [old, guest(0, 4096)];
        let s = write_steps(0, &p, true);
        assert_eq!(s.first, None);
        assert_eq!(
            s.steps,
            vec![Step::Run {
                off: 0,
                range: 0..2
            }]
        );
        // Mixed with zeros it is zero-first, with old and guest data as one run.
        let p = [old, guest(0, 4096), zeroes(8192)];
        let s = write_steps(0, &p, true);
        assert_eq!(s.first, Some((0, 16384)));
        assert_eq!(
            s.steps,
            vec![Step::Run {
                off: 0,
                range: 0..2
            }]
        );
    }
}
