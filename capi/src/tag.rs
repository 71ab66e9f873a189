//! The memory behind a `struct qcowprov_image *`: a tag word and a pointer to the image.
//! Every export checks the tag, so a closed handle (a second close included) or a pointer
//! that never was a handle gets `-EBADF` with a message instead of undefined behaviour.
//!
//! Checking a tag is only sound if the memory holding it is still allocated, so the
//! handle's memory (16 bytes, the "shell") is not freed at close: `qcowprov_close` frees
//! the image, marks the shell closed and puts it in a quarantine queue. A shell is reused
//! for a new handle only once more than [`QUARANTINE`] closed shells wait, oldest first,
//! so a closed handle is detected for at least the next 65,536 closes, and the memory kept
//! is bounded (1 MiB of shells, all reachable from the queue: valgrind reports no leak).
//! After that a stale pointer may name a later image, as any reused pointer in C would.
//!
//! Cost per call: one load and compare of the tag, one load of the image pointer.
//! A call racing with `qcowprov_close` of the same handle on another thread is still the
//! caller's bug (the image may be freed under it), as documented on `qcowprov_close`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use qcow2_engine::{AioQueue, Image};

use crate::error::{CResult, Failure};

/// The tag of an open handle ("qcowprov" in ASCII).
const LIVE: u64 = u64::from_be_bytes(*b"qcowprov");
/// The tag of a closed handle.
const CLOSED: u64 = u64::from_be_bytes(*b"qcowDEAD");
/// Closed shells kept before the oldest is reused.
#[cfg(not(test))]
pub(crate) const QUARANTINE: usize = 1 << 16;
/// Small in unit tests, so that reuse is reached.
#[cfg(test)]
pub(crate) const QUARANTINE: usize = 4;

/// An open qcow2 image (opaque). Obtained from `qcowprov_open` (or `qcowprov_open_fd`),
/// released with `qcowprov_close`. One handle may be used from several threads at once.
#[derive(Debug)]
pub struct QcowprovImage {
    /// `LIVE` while open, `CLOSED` after `qcowprov_close`.
    tag: AtomicU64,
    /// The image (a leaked `Box<Handle>`) while `LIVE`, else null.
    image: AtomicPtr<Handle>,
}

/// What an open handle owns: the image, and its asynchronous queue once an `aio` call
/// started it.
pub(crate) struct Handle {
    /// The image (shared with the queue's threads while the queue runs).
    pub(crate) img: Arc<Image>,
    /// The asynchronous queue, started by the first `qcowprov_aio_*` call.
    pub(crate) queue: OnceLock<AioQueue>,
}

impl Handle {
    /// The queue, started on first use.
    pub(crate) fn queue(&self) -> CResult<&AioQueue> {
        if let Some(q) = self.queue.get() {
            return Ok(q);
        }
        let q = AioQueue::start(self.img.clone())?;
        // A racing first call may have set one already: ours is then shut down unused.
        let _ = self.queue.set(q);
        Ok(self.queue.get().expect("queue set above"))
    }

    /// Shut the queue down (see `qcowprov_close`), then flush and close the image.
    pub(crate) fn close(mut self) -> CResult<()> {
        if let Some(q) = self.queue.take() {
            q.shutdown()?;
            drop(q);
        }
        let img = Arc::try_unwrap(self.img).map_err(|_| {
            Failure::new(
                libc::EBUSY,
                "the image is still used by its asynchronous queue",
            )
        })?;
        img.close()?;
        Ok(())
    }
}

static_assertions::assert_impl_all!(QcowprovImage: Send, Sync);

/// Closed shells, oldest first.
static RETIRED: Mutex<VecDeque<&'static QcowprovImage>> = Mutex::new(VecDeque::new());

fn retired() -> std::sync::MutexGuard<'static, VecDeque<&'static QcowprovImage>> {
    RETIRED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new handle for `image`.
pub(crate) fn new_handle(image: Image) -> *mut QcowprovImage {
    let image = Box::into_raw(Box::new(Handle {
        img: Arc::new(image),
        queue: OnceLock::new(),
    }));
    let reuse = {
        let mut r = retired();
        if r.len() > QUARANTINE {
            r.pop_front()
        } else {
            None
        }
    };
    let shell: &'static QcowprovImage = reuse.unwrap_or_else(|| {
        Box::leak(Box::new(QcowprovImage {
            tag: AtomicU64::new(CLOSED),
            image: AtomicPtr::new(std::ptr::null_mut()),
        }))
    });
    shell.image.store(image, Ordering::Release);
    shell.tag.store(LIVE, Ordering::Release);
    (shell as *const QcowprovImage).cast_mut()
}

/// The failure for a tag that is not `LIVE` (out of line: the hot path only compares).
#[cold]
#[inline(never)]
fn bad_handle(tag: u64) -> Failure {
    Failure::new(
        libc::EBADF,
        if tag == CLOSED {
            "invalid handle: 'img' was closed by qcowprov_close and cannot be used again"
        } else {
            "invalid handle: 'img' is not a qcowprov_image from qcowprov_open"
        },
    )
}

/// The shell behind a handle argument, after the NULL and alignment checks.
///
/// # Safety
/// `img` is NULL or points to at least 16 readable bytes (a handle, open or closed, is).
#[inline(always)]
unsafe fn shell<'a>(img: *const QcowprovImage) -> CResult<&'a QcowprovImage> {
    crate::args::non_null(img, "img")?;
    if img
        .cast::<u8>()
        .align_offset(std::mem::align_of::<QcowprovImage>())
        != 0
    {
        return Err(bad_handle(0));
    }
    // SAFETY: non-NULL and aligned (checked above); the caller guarantees 16 readable
    // bytes, and shells are never freed, so a handle that was closed is still readable.
    // Only atomics are read through the reference.
    Ok(unsafe { &*img })
}

/// The image behind a handle argument: `-EINVAL` for NULL, `-EBADF` for a closed or
/// foreign pointer.
///
/// # Safety
/// `img` is NULL or points to at least 16 readable bytes; if it is an open handle, no
/// other thread closes it during the borrow `'a`.
#[inline(always)]
pub(crate) unsafe fn image<'a>(img: *const QcowprovImage) -> CResult<&'a Image> {
    // SAFETY: forwarded from the caller.
    Ok(&unsafe { handle(img) }?.img)
}

/// The handle behind a handle argument, as [`image`].
///
/// # Safety
/// As [`image`].
#[inline(always)]
pub(crate) unsafe fn handle<'a>(img: *const QcowprovImage) -> CResult<&'a Handle> {
    // SAFETY: forwarded from the caller.
    let shell = unsafe { shell(img) }?;
    let tag = shell.tag.load(Ordering::Acquire);
    if tag != LIVE {
        return Err(bad_handle(tag));
    }
    let p = shell.image.load(Ordering::Acquire);
    // SAFETY: a LIVE shell points at the handle leaked by `new_handle`, which only `take`
    // frees, after clearing LIVE; the caller guarantees no close races with this borrow.
    Ok(unsafe { &*p })
}

/// Close a handle: mark it closed (once: a second close fails), retire its shell and hand
/// back the image.
///
/// # Safety
/// As [`image`], and no other thread uses the handle during or after the call.
pub(crate) unsafe fn take(img: *mut QcowprovImage) -> CResult<Box<Handle>> {
    // SAFETY: forwarded from the caller.
    let shell: &'static QcowprovImage = unsafe { shell(img) }?;
    if let Err(tag) = shell
        .tag
        .compare_exchange(LIVE, CLOSED, Ordering::AcqRel, Ordering::Acquire)
    {
        return Err(bad_handle(tag));
    }
    let p = shell.image.swap(std::ptr::null_mut(), Ordering::AcqRel);
    retired().push_back(shell);
    // SAFETY: `p` is the box `new_handle` leaked; the tag exchange above made this call its
    // only owner (a concurrent or later close fails the exchange).
    Ok(unsafe { Box::from_raw(p) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use host_io::MemStorage;
    use std::sync::Arc;

    fn new_image() -> Image {
        let s: Arc<dyn host_io::Storage> = Arc::new(MemStorage::new());
        let o = qcow2_engine::CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        };
        qcow2_engine::create_on(s.clone(), &o, None).unwrap();
        Image::open_storage(s, &Default::default(), None).unwrap()
    }

    #[test]
    fn closed_shells_are_detected_then_reused_oldest_first() {
        // The pointers passed below are shells from `new_handle` (never freed) or a local,
        // aligned u64 array: all readable, and one thread uses them.
        let check = |p: *const QcowprovImage| {
            // SAFETY: see above.
            unsafe { image(p) }.map(|_| ())
        };
        let close = |p: *mut QcowprovImage| {
            // SAFETY: see above.
            unsafe { take(p) }.map(|h| h.close().unwrap())
        };
        let first = new_handle(new_image());
        assert!(check(first).is_ok());
        close(first).unwrap();
        let e = check(first).unwrap_err();
        assert_eq!(e.errno, libc::EBADF);
        assert!(e.message.contains("closed"), "{}", e.message);
        assert_eq!(close(first).unwrap_err().errno, libc::EBADF);
        let junk = [0x5a5a_5a5a_5a5a_5a5au64; 2];
        let e = check(junk.as_ptr().cast()).unwrap_err();
        assert!(e.message.contains("not a qcowprov_image"), "{}", e.message);
        // Other tests may retire shells too: count from what is queued now.
        let mut seen = vec![first];
        loop {
            let h = new_handle(new_image());
            if seen.contains(&h) {
                // Reused only once more than QUARANTINE shells waited.
                assert!(
                    seen.len() > QUARANTINE,
                    "reused after {} closes",
                    seen.len()
                );
                close(h).unwrap();
                break;
            }
            seen.push(h);
            close(h).unwrap();
            assert!(seen.len() < 1000, "never reused");
        }
    }
}
