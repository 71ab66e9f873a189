//! `EventFd`: a Linux eventfd, the descriptor an event loop polls for "completions are
//! waiting", and what wakes an io_uring waiting for work.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An eventfd (close-on-exec). Readable while its counter is nonzero.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with counter 0; `nonblocking` sets `EFD_NONBLOCK`.
    pub fn new(nonblocking: bool) -> io::Result<EventFd> {
        let flags = libc::EFD_CLOEXEC | if nonblocking { libc::EFD_NONBLOCK } else { 0 };
        // SAFETY: eventfd takes two integers and touches no memory.
        let fd = unsafe { libc::eventfd(0, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Add 1 to the counter (makes the descriptor readable).
    pub fn signal(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: the descriptor is open for the call; write reads 8 bytes from `one`,
            // a live u64.
            let r = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // EAGAIN (counter at its maximum) still leaves it readable.
                return;
            }
        }
    }

    /// Reset the counter to 0 (on a non-blocking eventfd; a blocking one with counter 0
    /// would block).
    pub fn drain(&self) {
        let mut v: u64 = 0;
        loop {
            // SAFETY: the descriptor is open for the call; read writes at most 8 bytes into
            // `v`, a live, exclusively borrowed u64.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut v as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl crate::aio::Notify for EventFd {
    fn notify(&self) {
        self.signal();
    }
}
