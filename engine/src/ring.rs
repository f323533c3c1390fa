//! Request rings other than virtqueues (Xen blkif), served by a reactor like a virtqueue.
//!
//! A transport crate implements [`RequestRing`]; the reactor polls it, runs the requests it
//! yields through the same dispatch, backends and statistics as virtio-blk requests, and hands
//! each one's status back. The ring stays the only place that knows its layout, its
//! notification scheme and how its buffers are mapped.

use crate::blk::Request;
use crate::device::BlkDevice;
use crate::stats::sets::QueueStat;
use crate::stats::Stats;
use crate::virtqueue::{Broken, Segments};
use std::os::fd::RawFd;
use std::sync::Arc;

/// One request ring, owned by one reactor (all calls come from its thread).
///
/// Requests are identified by the reactor's slot index (below `slots()`): the ring keeps what
/// it needs to answer (the front end's request id, mapped buffers) per slot.
pub trait RequestRing: Send {
    /// Most requests in flight at once (the reactor makes this many slots).
    fn slots(&self) -> usize;

    /// Most buffers one request may carry (each slot's `Segments` capacity).
    fn max_segments(&self) -> usize;

    /// Takes the next request into `slot`: its buffers go into `segs` (cleared first), and
    /// the request refers to them by index. `Ok(None)` when the ring holds no new request;
    /// `Err` when the front end broke the ring (the queue stops). A request the ring can
    /// decode but not serve is returned with `Err(status)` to be answered at once.
    #[allow(clippy::type_complexity)]
    fn pop(
        &mut self,
        slot: u32,
        segs: &mut Segments,
    ) -> Result<Option<Result<Request, u8>>, Broken>;

    /// Queues the response of the request in `slot` with a virtio-blk status
    /// (`blk::status`), and releases what the ring held for it.
    fn respond(&mut self, slot: u32, status: u8);

    /// Makes queued responses visible to the front end; true if it asked to be notified.
    fn publish(&mut self) -> bool;

    /// Notifies the front end.
    fn notify(&mut self);

    /// Asks the front end to notify before the reactor sleeps; true if requests arrived in
    /// the meantime (the reactor must not sleep then).
    fn enable_notification(&mut self) -> bool;

    /// Tells the front end notifications are not needed while the reactor polls.
    fn disable_notification(&mut self);

    /// A descriptor that polls readable when the front end notifies.
    fn kick_fd(&self) -> RawFd;

    /// Consumes the notifications that made `kick_fd` readable; returns how many.
    fn ack_kick(&mut self) -> u64;
}

/// Everything a reactor needs to serve one request ring.
pub struct RingSetup {
    pub device: Arc<BlkDevice>,
    pub ring: Box<dyn RequestRing>,
    /// Where the ring's counters go (the device's statistics of this queue index).
    pub stats: Stats<QueueStat>,
}
