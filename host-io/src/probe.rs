//! Sticky availability of host primitives (like QEMU's `has_discard` / `has_write_zeroes`).

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const WORKS: u8 = 1;
const UNSUPPORTED: u8 = 2;

/// What a failed primitive means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// ENOTSUP / EOPNOTSUPP / ENOTTY / ENOSYS: the primitive does not exist here; it has
    /// been marked unsupported for good. Fall back.
    Unsupported,
    /// EINVAL: this particular request was refused (alignment, range). Fall back for this
    /// call only; the primitive stays usable.
    ThisCall,
    /// Any other error (EIO, ENOSPC, EROFS, ...): report it.
    Fatal,
}

/// Availability of one primitive: unknown until first used, then sticky.
#[derive(Debug, Default)]
pub(crate) struct Probe(AtomicU8);

impl Probe {
    /// Whether the primitive may be tried (not known to be unsupported).
    pub(crate) fn usable(&self) -> bool {
        self.0.load(Ordering::Relaxed) != UNSUPPORTED
    }

    /// Whether the primitive has worked at least once.
    pub(crate) fn known_working(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WORKS
    }

    /// Mark the primitive unsupported for the rest of this backend's life.
    pub(crate) fn disable(&self) {
        self.0.store(UNSUPPORTED, Ordering::Relaxed);
    }

    /// Record the outcome of one attempt and classify a failure.
    pub(crate) fn record(&self, result: &io::Result<()>) -> Option<Failure> {
        match result {
            Ok(()) => {
                // Never resurrect a primitive that was disabled (by probing or by the user).
                let _ =
                    self.0
                        .compare_exchange(UNKNOWN, WORKS, Ordering::Relaxed, Ordering::Relaxed);
                None
            }
            Err(e) => {
                let f = classify(e);
                if f == Failure::Unsupported {
                    self.disable();
                }
                Some(f)
            }
        }
    }
}

/// Classify an error from a discard / zeroing primitive.
pub(crate) fn classify(err: &io::Error) -> Failure {
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS) => Failure::Unsupported,
        Some(libc::EINVAL) => Failure::ThisCall,
        _ if err.kind() == io::ErrorKind::Unsupported => Failure::Unsupported,
        _ => Failure::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enotsup_is_sticky_and_einval_is_not() {
        let p = Probe::default();
        assert!(p.usable());
        let einval = Err(io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(p.record(&einval), Some(Failure::ThisCall));
        assert!(p.usable());
        assert_eq!(p.record(&Ok(())), None);
        assert!(p.known_working());
        let enotsup = Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        assert_eq!(p.record(&enotsup), Some(Failure::Unsupported));
        assert!(!p.usable());
        // A later success does not re-enable it.
        p.record(&Ok(()));
        assert!(!p.usable());
        let eio: io::Result<()> = Err(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(p.record(&eio), Some(Failure::Fatal));
        assert_eq!(
            classify(&io::Error::from_raw_os_error(libc::ENOTTY)),
            Failure::Unsupported
        );
    }
}
