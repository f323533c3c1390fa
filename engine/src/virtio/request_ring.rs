//! A request virtqueue as a [`Ring`]: chains walked into a slot's buffers and parsed as
//! virtio-blk requests, answers written as status byte (last) and used entry, and the
//! in-flight records (INFLIGHT_SHMFD) that let a restarted daemon take up what its
//! predecessor left unfinished.

use super::vring::Vring;
use crate::blk::{self, Request};
use crate::inflight::InflightQueue;
use crate::request::Status;
use crate::ring::{Notified, Popped, Ring};
use crate::virtqueue::{Broken, Segments};
use std::os::fd::RawFd;

/// The device side of one request virtqueue.
pub struct VirtioRing {
    pub(super) vring: Vring,
    /// Disk name, for logs.
    disk: String,
    /// Per slot: the chain's head.
    heads: Box<[u16]>,
    /// Per slot: where the status byte goes (null: the chain has no writable byte).
    status: Box<[*mut u8]>,
    inflight: Option<InflightQueue>,
    /// Next in-flight counter (orders resubmission after a restart).
    inflight_counter: u64,
    /// Heads answered since the last publish, for the in-flight records.
    answered: Vec<u16>,
    /// Heads a previous daemon took and did not complete, taken again first, oldest first.
    resubmit: Vec<u16>,
    resubmit_next: usize,
    max_segments: usize,
}

// SAFETY: the status pointers point into guest memory the vring keeps mapped; the ring is
// used by one thread at a time (the reactor owning its queue).
unsafe impl Send for VirtioRing {}

impl VirtioRing {
    /// A request ring over `vring` with up to `slots` requests in flight. With in-flight
    /// records, a previous daemon's unfinished requests are recovered and resubmitted
    /// before anything new is taken.
    pub(super) fn new(
        mut vring: Vring,
        disk: String,
        slots: usize,
        inflight: Option<InflightQueue>,
        base: u16,
    ) -> VirtioRing {
        let (resubmit, inflight_counter) = match &inflight {
            Some(records) => recover(&mut vring, records, &disk, base),
            None => (Vec::new(), 0),
        };
        // A ring that starts where its last user stopped has every taken request completed:
        // its used index is its avail base. Anything else (a stale copy of the used ring after
        // a migration) would make the driver complete old entries again.
        let used_in_ring = vring.queue.used_idx_in_ring();
        if resubmit.is_empty() && used_in_ring != vring.queue.next_used_idx() {
            tracing::warn!(
                disk,
                base,
                used_in_ring,
                "vring starts with a used index other than its base"
            );
        }
        VirtioRing {
            vring,
            disk,
            heads: vec![0; slots].into_boxed_slice(),
            status: vec![std::ptr::null_mut(); slots].into_boxed_slice(),
            inflight,
            inflight_counter,
            answered: Vec::with_capacity(slots),
            resubmit,
            resubmit_next: 0,
            max_segments: blk::SLOT_SEGMENTS,
        }
    }

    /// How many requests of a previous daemon it takes again before new ones.
    pub fn resubmissions(&self) -> usize {
        self.resubmit.len()
    }

    /// The split ring underneath (its descriptor table, for checks from outside: fuzzing).
    pub fn split_queue(&self) -> &crate::virtqueue::SplitQueue {
        &self.vring.queue
    }

    /// Where the status byte of the request in `slot` goes (null: nowhere), once popped.
    pub fn status_ptr(&self, slot: u32) -> *const u8 {
        self.status[slot as usize]
    }

    /// The vring, for the transport's messages.
    pub fn vring_mut(&mut self) -> &mut Vring {
        &mut self.vring
    }

    /// The next head: a resubmission first, then the avail ring.
    fn next_head(&mut self) -> Result<Option<u16>, Broken> {
        if let Some(&head) = self.resubmit.get(self.resubmit_next) {
            self.resubmit_next += 1;
            return Ok(Some(head));
        }
        self.vring.queue.pop_avail()
    }
}

/// Makes the in-flight records agree with the ring; returns the heads to resubmit, oldest
/// first, and the next counter.
fn recover(vring: &mut Vring, records: &InflightQueue, disk: &str, base: u16) -> (Vec<u16>, u64) {
    let used = vring.queue.used_idx_in_ring();
    let Some((heads, next)) = records.recover(used) else {
        return (Vec::new(), 1);
    };
    // Restarted: resume from the ring itself, as libvhost-user does. After a lost connection
    // QEMU's base is its own cached used index, which may lag the ring; taking avail entries
    // from there again completes them twice.
    if !heads.is_empty() {
        tracing::info!(
            disk,
            requests = heads.len(),
            "resubmitting requests a previous daemon had in flight"
        );
    }
    if used.wrapping_add(heads.len() as u16) != base {
        tracing::info!(
            disk,
            base,
            used,
            in_flight = heads.len(),
            "resuming from the ring's used index, not the front end's base"
        );
    }
    vring.queue.resume_after_restart(used, heads.len() as u16);
    (heads, next)
}

impl Ring for VirtioRing {
    fn slots(&self) -> usize {
        self.heads.len()
    }

    fn max_segments(&self) -> usize {
        self.max_segments
    }

    fn pop(
        &mut self,
        slot: u32,
        segs: &mut Segments,
        request: &mut Request,
    ) -> Result<Popped, Broken> {
        let Some(head) = self.next_head()? else {
            return Ok(Popped::Nothing);
        };
        if let Some(records) = &self.inflight {
            records.mark_taken(head, self.inflight_counter);
            self.inflight_counter += 1;
        }
        // A bad chain: the head is taken but the ring is not trustworthy; the queue stops.
        self.vring.queue.walk_chain(self.vring.mem(), head, segs)?;
        self.vring.in_flight += 1;
        self.heads[slot as usize] = head;
        let Some(status) = blk::locate_status(segs) else {
            // Nowhere to report an error: the chain goes back with nothing written (counted
            // as an I/O error).
            self.status[slot as usize] = std::ptr::null_mut();
            return Ok(Popped::Refused(Status::IoError));
        };
        self.status[slot as usize] = status;
        match blk::parse_into(segs, request) {
            Ok(()) => Ok(Popped::Request),
            Err(why) => {
                tracing::debug!(disk = %self.disk, ?why, "malformed request");
                Ok(Popped::Refused(Status::IoError))
            }
        }
    }

    fn complete(&mut self, slot: u32, segs: &Segments, status: Status, written: u32) {
        let status_ptr = self.status[slot as usize];
        let used_len = if status_ptr.is_null() {
            0
        } else {
            // SAFETY: status_ptr was translated into guest memory kept mapped by the vring's
            // memory table (or a retired one, held while requests are in flight).
            unsafe { std::ptr::write_volatile(status_ptr, status.virtio()) };
            if status == Status::Ok {
                written + 1
            } else {
                1
            }
        };
        self.vring.log_writes(segs, status_ptr);
        let head = self.heads[slot as usize];
        self.vring.queue.push_used(head, used_len);
        if let Some(records) = &self.inflight {
            records.add_to_batch(head);
            self.answered.push(head);
        }
        self.vring.in_flight -= 1;
    }

    fn publish(&mut self) -> Notified {
        if let Some(records) = &self.inflight {
            // The records are cleared after the used index is out: publish it first.
            self.vring.queue.publish_used();
            records.batch_published(&self.answered, self.vring.queue.next_used_idx());
            self.answered.clear();
        }
        self.vring.publish()
    }

    fn enable_notification(&mut self) -> bool {
        self.vring.enable_notification()
    }

    fn disable_notification(&mut self) {
        self.vring.disable_notification();
    }

    fn kick_fd(&self) -> RawFd {
        self.vring.kick_fd()
    }

    fn ack_kick(&mut self) -> u64 {
        self.vring.ack_kick()
    }

    fn detach(&mut self) -> u16 {
        let queue = &self.vring.queue;
        tracing::debug!(disk = %self.disk, last_avail = queue.last_avail_idx(),
            next_used = queue.next_used_idx(), used_in_ring = queue.used_idx_in_ring(),
            "vring drained");
        queue.last_avail_idx()
    }

    fn broken(&mut self, _why: Broken) {
        self.vring.signal_broken();
    }
}
