//! What every virtqueue of a vhost-user disk carries beside its split ring: the memory table
//! it was mapped with (and the ones retired while requests still point into them), its kick,
//! call and error eventfds, and the dirty log that marks its guest-memory writes during a
//! migration. Shared by the request virtqueue ([`super::VirtioRing`]) and the stats
//! virtqueue ([`super::GuestStatsQueue`]).

use crate::dirty_log::DirtyLog;
use crate::mem::GuestMemory;
use crate::ring::Notified;
use crate::virtqueue::{Broken, RingAddrs, Segments, SplitQueue};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// One virtqueue and its transport extras.
pub struct Vring {
    pub(super) queue: SplitQueue,
    mem: Arc<GuestMemory>,
    /// Memory tables replaced while requests were in flight; dropped when none are.
    retired_mem: Vec<Arc<GuestMemory>>,
    addrs: RingAddrs,
    kick: EventFd,
    call: Option<EventFd>,
    err: Option<EventFd>,
    dirty_log: Option<Arc<DirtyLog>>,
    /// Requests taken and not answered (they may point into a retired table).
    pub(super) in_flight: usize,
}

impl Vring {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        queue: SplitQueue,
        mem: Arc<GuestMemory>,
        addrs: RingAddrs,
        kick: EventFd,
        call: Option<EventFd>,
        err: Option<EventFd>,
        dirty_log: Option<Arc<DirtyLog>>,
    ) -> Vring {
        Vring {
            queue,
            mem,
            retired_mem: Vec::new(),
            addrs,
            kick,
            call,
            err,
            dirty_log,
            in_flight: 0,
        }
    }

    /// The memory table chains are walked in.
    pub(super) fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Replaces the call eventfd (the front end may change it while the queue runs).
    pub fn set_call(&mut self, call: Option<EventFd>) {
        self.call = call;
        // A request completed while the old fd was being swapped must not go unsignalled.
        if let Some(call) = &self.call {
            let _ = call.write(1);
        }
    }

    /// Switches to a new memory table. On Err the ring's old pointers must not be used once
    /// their memory is retired: the caller marks the queue broken.
    pub fn set_memory(&mut self, mem: Arc<GuestMemory>) -> Result<(), Broken> {
        let old = std::mem::replace(&mut self.mem, mem);
        if self.in_flight > 0 {
            self.retired_mem.push(old);
        }
        self.queue.remap(&self.mem, self.addrs)
    }

    /// Starts (Some) or stops (None) marking guest-memory writes.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.dirty_log = log;
        // Everything the ring holds now may be newer than what was copied.
        self.log_used_ring();
    }

    /// Tells the front end the queue needs a reset (VIRTIO_CONFIG_S_NEEDS_RESET).
    pub(super) fn signal_broken(&self) {
        if let Some(err) = &self.err {
            let _ = err.write(1);
        }
    }

    pub(super) fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// Consumes the kicks behind a readable kick eventfd; returns how many.
    pub(super) fn ack_kick(&self) -> u64 {
        self.kick.read().unwrap_or(0)
    }

    /// Publishes the used ring and signals the call eventfd if the driver wants it.
    pub(super) fn publish(&mut self) -> Notified {
        self.queue.publish_used();
        let notified = match (self.queue.needs_notification(), &self.call) {
            (true, Some(call)) => {
                let _ = call.write(1);
                Notified::Sent
            }
            // No call fd yet: nothing to send, nothing suppressed.
            (true, None) => Notified::Nobody,
            (false, _) => Notified::Suppressed,
        };
        self.log_used_ring();
        if self.in_flight == 0 {
            self.retired_mem.clear();
        }
        notified
    }

    /// Asks for kicks (before the reactor sleeps); true if chains arrived meanwhile.
    pub(super) fn enable_notification(&mut self) -> bool {
        let pending = self.queue.enable_notification();
        self.log_used_ring();
        pending
    }

    /// No kicks while the reactor polls.
    pub(super) fn disable_notification(&mut self) {
        self.queue.disable_notification();
        self.log_used_ring();
    }

    /// Marks the used ring (elements, index, avail_event) dirty while logging.
    fn log_used_ring(&self) {
        if let Some(log) = &self.dirty_log {
            let (ptr, len) = self.queue.used_ring();
            if let Some(gpa) = self.mem.gpa_of(ptr) {
                log.mark(gpa, len);
            }
        }
    }

    /// Marks every device-writable buffer of a finished request dirty while logging (the
    /// data buffers, and the status byte, which `locate_status` took off the last one).
    pub(super) fn log_writes(&self, segs: &Segments, status: *const u8) {
        if let Some(log) = &self.dirty_log {
            for iov in &segs.iovecs()[segs.readable_count()..] {
                if let Some(gpa) = self.request_gpa(iov.iov_base as *const u8) {
                    log.mark(gpa, iov.iov_len as u64);
                }
            }
            if let Some(gpa) = self.request_gpa(status) {
                log.mark(gpa, 1);
            }
        }
    }

    /// The guest physical address of a request's buffer, translated with the memory table
    /// current when the request was taken: a retired one if the table changed since.
    fn request_gpa(&self, ptr: *const u8) -> Option<u64> {
        std::iter::once(&self.mem)
            .chain(self.retired_mem.iter().rev())
            .find_map(|mem| mem.gpa_of(ptr))
    }
}
