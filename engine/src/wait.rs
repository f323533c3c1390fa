//! Blocking waits of the control plane's threads (socket listeners, connections): a
//! descriptor, or a shutdown eventfd that ends the wait for every thread at once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::eventfd::EventFd;

/// Waits until `fd` is readable; false if `shutdown` fired first (or with it).
pub fn readable_or_shutdown(fd: RawFd, shutdown: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shutdown.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: polls two valid descriptors in a local array.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return fds[1].revents == 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_ends_the_wait_and_data_does_not() {
        let data = EventFd::new(0).unwrap();
        let shutdown = EventFd::new(0).unwrap();
        data.write(1).unwrap();
        assert!(readable_or_shutdown(data.as_raw_fd(), &shutdown));
        shutdown.write(1).unwrap();
        assert!(!readable_or_shutdown(data.as_raw_fd(), &shutdown));
    }
}
