//! The io_uring backend: reads and writes of a file or block device go to the kernel as
//! `READ`/`WRITE`/`READV`/`WRITEV` submissions; everything else (write-zeroes, discards,
//! flushes, direct I/O that is not aligned) goes to a small [`Pool`] calling the storage,
//! whose completions wake the ring through an eventfd that a `READ` keeps armed.
//!
//! Memory safety: a submission points into memory an operation owns (its buffer, its iovec
//! arrays). Operations stay in `ops` until every one of their submissions completed, and
//! dropping the backend first waits for that (or leaks what it cannot wait for).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use super::pool::Pool;
use super::{AioBackend, AioDone, AioKind, AioOp, EventFd, Notify, Piece};
use crate::storage::Storage;

/// Tag of the eventfd read.
const WAKE: u64 = u64::MAX;
/// Bits of a submission's tag that name the piece.
const PIECE_BITS: u32 = 20;
/// Most bytes one submission asks for (the kernel caps a transfer below 2 GiB anyway).
const MAX_SQE_BYTES: usize = 1 << 30;
/// Most iovecs one submission takes (`IOV_MAX`).
const MAX_IOVS: usize = 1024;

/// Is io_uring usable here, with the opcodes this backend submits?
pub(crate) fn probe() -> bool {
    let Ok(ring) = IoUring::new(4) else {
        return false;
    };
    let mut p = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut p).is_err() {
        return false;
    }
    [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Readv::CODE,
        opcode::Writev::CODE,
    ]
    .iter()
    .all(|&c| p.is_supported(c))
}

/// An operation with submissions in the ring.
struct OpState {
    user: u64,
    op: AioOp,
    pieces: Vec<Piece>,
    /// Pieces not finished.
    left: usize,
    err: Option<io::Error>,
    /// Bytes done per piece.
    done: Vec<usize>,
    /// The iovec array of each piece's current submission (kept alive while it runs).
    iovs: Vec<Vec<libc::iovec>>,
}

impl OpState {
    fn is_read(&self) -> bool {
        matches!(self.op, AioOp::Read { .. })
    }

    fn buf(&self) -> &super::IoBuf {
        match &self.op {
            AioOp::Read { buf, .. } => buf,
            AioOp::Write { buf, .. } => buf,
            _ => unreachable!("only reads and writes reach the ring"),
        }
    }
}

pub(crate) struct UringBackend {
    ring: IoUring,
    /// Target of the eventfd read (boxed: its address is in the ring while armed).
    wake_buf: Box<u64>,
    wake: Arc<EventFd>,
    wake_armed: bool,
    /// Keeps the descriptor `fd` open.
    _storage: Arc<dyn Storage>,
    fd: RawFd,
    direct: bool,
    align: usize,
    read_only: bool,
    ops: Vec<Option<OpState>>,
    free: Vec<usize>,
    /// Operations in `ops`.
    live: usize,
    /// Submissions waiting for room in the ring: (slot, piece).
    backlog: VecDeque<(usize, usize)>,
    pool: Pool,
    /// Completed without reaching the ring (invalid, or with nothing to do).
    ready: Vec<AioDone>,
}

// SAFETY: the raw pointers inside (iovec arrays, caller memory) point into memory the
// backend's operations own; nothing ties them to the thread that created the backend, and
// the backend is used by one thread at a time (`&mut self`).
unsafe impl Send for UringBackend {}

impl UringBackend {
    pub(crate) fn new(storage: Arc<dyn Storage>, entries: u32) -> io::Result<UringBackend> {
        let file = storage
            .as_file()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTSUP))?;
        let fd = file.file().as_raw_fd();
        let direct = file.direct;
        let align = file.align as usize;
        let read_only = file.read_only;
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        // Blocking: the ring's read waits for a count instead of failing with EAGAIN.
        let wake = Arc::new(EventFd::new(false)?);
        let pool = Pool::new(storage.clone(), 4, wake.clone());
        Ok(UringBackend {
            ring,
            wake_buf: Box::new(0),
            wake,
            wake_armed: false,
            _storage: storage,
            fd,
            direct,
            align,
            read_only,
            ops: Vec::new(),
            free: Vec::new(),
            live: 0,
            backlog: VecDeque::new(),
            pool,
            ready: Vec::new(),
        })
    }

    /// Whether the ring can take this read or write as it is.
    fn ring_can_take(&self, buf: &super::IoBuf, pieces: &[Piece]) -> bool {
        if pieces.len() >= 1 << PIECE_BITS {
            return false;
        }
        if !self.direct {
            return true;
        }
        let a = self.align;
        pieces.iter().all(|p| {
            p.off % a as u64 == 0
                && p.len % a == 0
                && buf
                    .range_segs(p.at, p.len)
                    .iter()
                    .all(|s| (s.ptr as usize) % a == 0 && s.len % a == 0)
        })
    }

    /// Push backlog submissions (and the wake read) into the ring while it has room.
    fn fill(&mut self) -> usize {
        let mut pushed = 0;
        if !self.wake_armed {
            let e = opcode::Read::new(
                types::Fd(self.wake.as_raw_fd()),
                (&mut *self.wake_buf as *mut u64).cast::<u8>(),
                8,
            )
            .build()
            .user_data(WAKE);
            // SAFETY: the read targets `wake_buf`, a boxed u64 that lives as long as the
            // backend, and `Drop` waits for this read's completion before freeing it.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.wake_armed = true;
                pushed += 1;
            }
        }
        while let Some(&(slot, i)) = self.backlog.front() {
            if self.ring.submission().is_full() {
                break;
            }
            let e = self.entry(slot, i);
            // SAFETY: the entry points at the operation's buffer and at `iovs[i]`, both owned
            // by `ops[slot]`, which stays until this submission completed (see `complete`).
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                break;
            }
            self.backlog.pop_front();
            pushed += 1;
        }
        pushed
    }

    /// The submission for the rest of piece `i` of the operation in `slot`.
    fn entry(&mut self, slot: usize, i: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.fd);
        let st = self.ops[slot].as_mut().expect("live slot");
        let p = st.pieces[i];
        let done = st.done[i];
        let want = (p.len - done).min(MAX_SQE_BYTES);
        let mut segs = st.buf().range_segs(p.at + done, want);
        segs.truncate(MAX_IOVS);
        let user = ((slot as u64) << PIECE_BITS) | i as u64;
        let off = p.off + done as u64;
        if let [s] = segs[..] {
            let len = s.len as u32;
            return if st.is_read() {
                opcode::Read::new(fd, s.ptr, len)
                    .offset(off)
                    .build()
                    .user_data(user)
            } else {
                opcode::Write::new(fd, s.ptr.cast_const(), len)
                    .offset(off)
                    .build()
                    .user_data(user)
            };
        }
        st.iovs[i] = segs
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr.cast(),
                iov_len: s.len,
            })
            .collect();
        let (ptr, n) = (st.iovs[i].as_ptr(), st.iovs[i].len() as u32);
        if st.is_read() {
            opcode::Readv::new(fd, ptr, n)
                .offset(off)
                .build()
                .user_data(user)
        } else {
            opcode::Writev::new(fd, ptr, n)
                .offset(off)
                .build()
                .user_data(user)
        }
    }

    /// A completion of piece `i` of the operation in `slot` with kernel result `res`.
    fn complete(&mut self, slot: usize, i: usize, res: i32, out: &mut Vec<AioDone>) {
        let (direct, align) = (self.direct, self.align);
        let st = self.ops[slot].as_mut().expect("live slot");
        let p = st.pieces[i];
        let finished = if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                false
            } else {
                st.err.get_or_insert(io::Error::from_raw_os_error(-res));
                true
            }
        } else {
            let n = res as usize;
            st.done[i] += n;
            let rest = p.len - st.done[i];
            if rest == 0 {
                true
            } else if st.is_read() && (n == 0 || (direct && st.done[i] % align != 0)) {
                // End of file: the rest reads as zeros, as `Storage::read_at` promises.
                // SAFETY: the range is this piece's, inside the buffer (validated), and
                // pieces of a read do not overlap, so nothing else touches it now.
                unsafe { st.buf().zero_raw(p.at + st.done[i], rest) };
                true
            } else if !st.is_read() && n == 0 {
                st.err
                    .get_or_insert(io::Error::from_raw_os_error(libc::ENOSPC));
                true
            } else {
                false
            }
        };
        if !finished {
            self.backlog.push_back((slot, i));
            return;
        }
        st.left -= 1;
        if st.left > 0 {
            return;
        }
        let st = self.ops[slot].take().expect("live slot");
        self.free.push(slot);
        self.live -= 1;
        let buf = match st.op {
            AioOp::Read { buf, .. } => Some(buf),
            _ => None,
        };
        out.push(AioDone {
            user: st.user,
            result: st.err.map_or(Ok(()), Err),
            buf,
        });
    }

    fn reap(&mut self, out: &mut Vec<AioDone>) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user, res) in cqes {
            if user == WAKE {
                self.wake_armed = false;
                continue;
            }
            let slot = (user >> PIECE_BITS) as usize;
            let i = (user & ((1 << PIECE_BITS) - 1)) as usize;
            self.complete(slot, i, res, out);
        }
    }
}

impl AioBackend for UringBackend {
    fn kind(&self) -> AioKind {
        AioKind::IoUring
    }

    fn submit(&mut self, user: u64, op: AioOp) {
        let fail = |op: AioOp, e: io::Error| AioDone {
            user,
            result: Err(e),
            buf: match op {
                AioOp::Read { buf, .. } => Some(buf),
                _ => None,
            },
        };
        if let Err(e) = op.validate() {
            self.ready.push(fail(op, e));
            return;
        }
        let can_take = match &op {
            AioOp::Read { buf, pieces } => self.ring_can_take(buf, pieces),
            AioOp::Write { buf, pieces } => self.ring_can_take(buf, pieces),
            _ => {
                self.pool.submit(user, op);
                return;
            }
        };
        if self.read_only && matches!(op, AioOp::Write { .. }) {
            self.ready
                .push(fail(op, io::Error::from_raw_os_error(libc::EROFS)));
            return;
        }
        if !can_take {
            self.pool.submit(user, op);
            return;
        }
        let pieces = match &op {
            AioOp::Read { pieces, .. } | AioOp::Write { pieces, .. } => pieces.clone(),
            _ => unreachable!("handled above"),
        };
        let n = pieces.iter().filter(|p| p.len > 0).count();
        if n == 0 {
            self.ready.push(AioDone {
                user,
                result: Ok(()),
                buf: match op {
                    AioOp::Read { buf, .. } => Some(buf),
                    _ => None,
                },
            });
            return;
        }
        let pieces: Vec<Piece> = pieces.into_iter().filter(|p| p.len > 0).collect();
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.ops.push(None);
                self.ops.len() - 1
            }
        };
        self.ops[slot] = Some(OpState {
            user,
            op,
            left: n,
            err: None,
            done: vec![0; n],
            iovs: vec![Vec::new(); n],
            pieces,
        });
        self.live += 1;
        self.backlog.extend((0..n).map(|i| (slot, i)));
    }

    fn poll(&mut self, wait: bool, out: &mut Vec<AioDone>) -> io::Result<()> {
        let before = out.len();
        out.append(&mut self.ready);
        self.pool.take_done(out);
        self.fill();
        let want = usize::from(wait && out.len() == before);
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // The completion queue is full: reaping below makes room.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        if self.fill() > 0 {
            // Resubmissions (short transfers) start now rather than at the next poll.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
        }
        self.pool.take_done(out);
        Ok(())
    }

    fn notifier(&self) -> Arc<dyn Notify> {
        self.wake.clone()
    }

    fn in_flight(&self) -> usize {
        self.live + self.pool.pending() + self.ready.len()
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // The kernel may still write into operations' memory: wait for every submission,
        // and for the eventfd read (woken by a signal).
        let mut sink = Vec::new();
        let mut ok = true;
        while ok && (self.live > 0 || self.pool.pending() > 0) {
            ok = self.poll(true, &mut sink).is_ok();
            sink.clear();
        }
        if ok && self.wake_armed {
            self.wake.signal();
            while ok && self.wake_armed {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(_) => ok = false,
                }
                self.reap(&mut sink);
            }
        }
        if !ok {
            // Cannot tell whether the kernel is done with this memory: never free it.
            std::mem::forget(std::mem::take(&mut self.ops));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}
