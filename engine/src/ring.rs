//! The one trait every request ring implements: the split virtqueue (`virtio::VirtioRing`)
//! and the Xen blkif ring (`pollblk_xen::ring::BlkifRing`); a packed virtqueue or an NBD
//! connection would be one more implementation.
//!
//! A ring decodes requests out of shared memory into a slot's buffers, answers them, makes
//! answers visible and decides when the peer needs telling. It keeps whatever its transport
//! needs to answer (a virtqueue's head and status byte, a blkif request's id and operation)
//! per slot, and its transport's extras (in-flight records, dirty log, call eventfd; event
//! channels) to itself. It knows nothing of volumes: `queue::RequestQueue` carries each
//! request from the ring through `request` and `volume` and back.

use crate::blk::Request;
use crate::request::Status;
use crate::virtqueue::{Broken, Segments};
use std::os::fd::RawFd;

/// What publishing answers did about telling the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notified {
    /// The peer was notified.
    Sent,
    /// The peer asked not to be (EVENT_IDX, rsp_event).
    Suppressed,
    /// There is no one to notify yet (no call eventfd).
    Nobody,
}

/// What `Ring::pop` took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Popped {
    /// No new request.
    Nothing,
    /// A request, decoded into the caller's `Request`.
    Request,
    /// A request the ring decoded but refuses, to be answered with this status at once.
    Refused(Status),
}

/// One request ring, owned by one reactor (every call comes from its thread).
///
/// Requests are identified by slot index (below `slots()`): the queue takes a free slot,
/// the ring fills it with `pop`, and `complete` answers it.
pub trait Ring: Send {
    /// Most requests in flight at once (the queue makes this many slots at most).
    fn slots(&self) -> usize;

    /// Most buffers one request may carry (each slot's `Segments` capacity).
    fn max_segments(&self) -> usize;

    /// Takes the next request into `slot`: its buffers go into `segs` (cleared first), the
    /// request into `request`, referring to them by index. `Err`: the peer broke the ring
    /// (the queue stops; nothing was taken into the slot). (The request is written in place,
    /// not returned: a large nested return value cost a store-forwarding stall per request.)
    fn pop(
        &mut self,
        slot: u32,
        segs: &mut Segments,
        request: &mut Request,
    ) -> Result<Popped, Broken>;

    /// Answers the request in `slot` (`written`: data bytes put in its buffers when it
    /// succeeded) and releases what the ring held for it. Not visible until `publish`.
    fn complete(&mut self, slot: u32, segs: &Segments, status: Status, written: u32);

    /// Makes every answer so far visible to the peer, and notifies it if it wants that.
    fn publish(&mut self) -> Notified;

    /// Asks the peer to notify before the reactor sleeps; true if requests arrived in the
    /// meantime (the reactor must not sleep then).
    fn enable_notification(&mut self) -> bool;

    /// Tells the peer notifications are not needed while the reactor polls.
    fn disable_notification(&mut self);

    /// A descriptor that polls readable when the peer notifies.
    fn kick_fd(&self) -> RawFd;

    /// Consumes the notifications that made `kick_fd` readable; returns how many.
    fn ack_kick(&mut self) -> u64;

    /// The ring stopped with nothing in flight: where it resumes (a virtqueue's
    /// last_avail_idx; 0 for rings that keep their position in shared memory).
    fn detach(&mut self) -> u16;

    /// The queue stopped serving the ring because the peer broke it (`why`).
    fn broken(&mut self, _why: Broken) {}
}
