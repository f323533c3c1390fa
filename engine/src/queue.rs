//! What a reactor polls ([`PolledQueue`]), what it lends a queue to start I/O ([`IoCtx`]),
//! and the request pipeline every request ring runs through ([`RequestQueue`]):
//!
//! ```text
//! ring.pop -> RequestSlot::prepare (request) -> VolumeChannel::start (volume) -> backend
//!   ... completion (reactor) -> RequestQueue::complete -> finish -> ring.complete
//! ```
//!
//! A queue is owned by one reactor from attach to detach; nothing here locks. Request slots,
//! their buffers and the free list are made when the queue is made: nothing is allocated per
//! request (except a bounce buffer, a cold path).

use crate::backend::{Backend, Completer, IoOp, Submitted};
use crate::blk::Request;
use crate::clock::Clock;
use crate::device::BlkDevice;
use crate::request::{RequestSlot, MAX_OPS_PER_REQUEST};
use crate::ring::{Notified, Popped, Ring};
use crate::stats::sets::QueueStat;
use crate::stats::Stats;
use crate::virtqueue::Broken;
use crate::volume::{Progress, VolumeChannel, IN_BATCH};
use io_uring::squeue;
use std::any::Any;
use std::os::fd::RawFd;
use std::sync::Arc;

/// Requests taken from one queue per poll when it is the only one polled.
pub const AVAIL_BATCH: usize = 64;
/// Requests taken from one queue per poll while other queues are polled too: a request on
/// any of them then waits behind at most this many of each busy neighbour's (with 64, a QD1
/// disk beside a QD128 one saw its p99 go from 1.6 to 14-25 us; with 8, 2.6-5.8 us).
pub const SHARED_BATCH: usize = 8;
/// Most requests in flight per queue (request slots); beyond it the ring waits.
pub const MAX_SLOTS_PER_QUEUE: usize = 1024;
/// Request slots a queue starts with; it doubles them (up to its ring's size) the first
/// times its guest keeps them all busy. A slot holds ~3 KiB (its iovec array is sized for
/// seg_max buffers), so a thousand idle disks stay at a few tens of MiB instead of hundreds.
pub const INITIAL_SLOTS: usize = 8;

/// A queue as its reactor sees it: something to poll, completions to route to it, a kick
/// descriptor to sleep on, and a time it wants to be polled by (its timer).
pub trait PolledQueue: Send {
    /// Takes new work and starts it; true if anything moved (the reactor stays busy).
    fn poll(&mut self, io: &mut IoCtx<'_>) -> bool;

    /// One operation of the request in `slot` completed with `result` (bytes or -errno) at
    /// clock time `now`; `uring_user_data` is the CQE's user_data when it came through the
    /// reactor's io_uring (the backend may look at its bits).
    fn complete(&mut self, slot: u32, result: i32, now: u64, uring_user_data: Option<u64>);

    /// Makes answers visible to the peer and notifies it; once per reactor iteration.
    fn publish(&mut self);

    /// A descriptor that polls readable when the peer has new work.
    fn kick_fd(&self) -> RawFd;

    /// Consumes the notifications behind a readable `kick_fd`.
    fn ack_kick(&mut self);

    /// Before the reactor sleeps: asks for kicks; true if work arrived meanwhile.
    fn enable_notification(&mut self) -> bool;

    /// After the reactor wakes: kicks are not needed while it polls.
    fn disable_notification(&mut self);

    /// Takes new requests or not (SET_VRING_ENABLE).
    fn set_enabled(&mut self, enabled: bool);

    /// Takes nothing new from now on; what is in flight still completes.
    fn stop(&mut self);

    /// Requests taken and not answered yet.
    fn in_flight(&self) -> usize;

    /// The queue leaves its reactor (stopped, nothing in flight): where it resumes.
    fn detach(&mut self) -> u16;

    /// Clock time by which the queue wants to be polled again even without a kick (a held
    /// request's retry, a timer of its own); u64::MAX for none.
    fn deadline(&self) -> u64;

    /// Stops taking requests from a ring the peer broke (`why`); what is in flight still
    /// completes.
    fn mark_broken(&mut self, why: Broken);

    /// The queue as its concrete type, for its transport's messages (`virtio::vring_of`).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// What a reactor lends a queue while polling it: its submission queue, with the guards that
/// keep the completion queue from overflowing, and its clock.
pub struct IoCtx<'a> {
    pub(crate) sq: squeue::SubmissionQueue<'a>,
    pub(crate) completer: &'a Completer,
    /// io_uring operations in flight on the reactor (CQ overflow guard).
    pub(crate) ops_in_flight: &'a mut usize,
    pub(crate) ops_limit: usize,
    /// user_data of this queue's I/O, less the slot (`| slot` gives an operation's).
    pub(crate) io_tag: u64,
    pub(crate) clock: &'a Clock,
    /// Most new requests the queue takes in this poll.
    pub(crate) batch: usize,
}

impl<'a> IoCtx<'a> {
    /// A context over `sq` (the reactor makes one per queue poll; benchmarks and tests make
    /// their own). `ops_in_flight` counts io_uring operations started and not reaped, kept
    /// at most `ops_limit` (the CQ size); `io_tag` is the user_data of the queue's I/O less
    /// the slot.
    pub fn new(
        sq: squeue::SubmissionQueue<'a>,
        completer: &'a Completer,
        ops_in_flight: &'a mut usize,
        ops_limit: usize,
        io_tag: u64,
        clock: &'a Clock,
    ) -> IoCtx<'a> {
        assert_eq!(io_tag & 0xffff_ffff, 0, "the low 32 bits carry the slot");
        IoCtx {
            sq,
            completer,
            ops_in_flight,
            ops_limit,
            io_tag,
            clock,
            batch: AVAIL_BATCH,
        }
    }

    /// Lets the queue take at most `batch` new requests in this poll (at least one).
    pub fn with_batch(mut self, batch: usize) -> IoCtx<'a> {
        assert!(batch > 0 && batch <= AVAIL_BATCH);
        self.batch = batch;
        self
    }

    /// Whether a whole request's operations fit in the SQ and, completed, in the CQ.
    pub fn has_room(&self) -> bool {
        *self.ops_in_flight + MAX_OPS_PER_REQUEST <= self.ops_limit
            && self.sq.capacity() - self.sq.len() >= MAX_OPS_PER_REQUEST
    }

    /// Hands `op` of the request in `slot` to `backend`.
    pub fn submit(&mut self, backend: &dyn Backend, op: &IoOp, slot: u32) -> Submitted {
        let submitted = backend.submit(
            op,
            self.io_tag | u64::from(slot),
            &mut self.sq,
            self.completer,
        );
        if submitted == Submitted::Queued {
            *self.ops_in_flight += 1;
        }
        submitted
    }

    /// The clock's time now (ns).
    pub fn clock_now(&self) -> u64 {
        self.clock.now()
    }
}

/// The request pipeline of one ring: slots, free list, the volume channel, and the queue's
/// state (enabled, broken, stopping).
pub struct RequestQueue<R: Ring + 'static> {
    ring: R,
    volume: VolumeChannel,
    /// Boxed: a slot's address must not move while its request is in flight (a bounce
    /// buffer's iovec lives in it), and the list grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<RequestSlot>>,
    /// Per slot, the request the ring decoded into it.
    requests: Vec<Request>,
    /// Slots the ring allows (what `slots` may grow to).
    max_slots: usize,
    /// Buffers per slot.
    segments: usize,
    free_slots: Vec<u32>,
    in_flight: usize,
    enabled: bool,
    broken: bool,
    stopping: bool,
    /// Answers given since the last publish.
    unpublished: bool,
}

impl<R: Ring + 'static> RequestQueue<R> {
    /// A queue serving `ring` for `device`, counting into `stats`.
    pub fn new(
        device: Arc<BlkDevice>,
        ring: R,
        stats: Stats<QueueStat>,
        enabled: bool,
    ) -> RequestQueue<R> {
        let max_slots = ring.slots().min(MAX_SLOTS_PER_QUEUE);
        assert!(max_slots > 0 && max_slots <= u32::MAX as usize);
        let segments = ring.max_segments();
        stats.set(QueueStat::Broken, 0);
        stats.set(QueueStat::InFlight, 0);
        let mut queue = RequestQueue {
            ring,
            volume: VolumeChannel::new(device, stats),
            slots: Vec::new(),
            requests: Vec::new(),
            max_slots,
            segments,
            free_slots: Vec::with_capacity(max_slots),
            in_flight: 0,
            enabled,
            broken: false,
            stopping: false,
            unpublished: false,
        };
        queue.grow(INITIAL_SLOTS.min(max_slots));
        queue
    }

    /// Adds slots up to `total` (at most `max_slots`); their indexes go on the free list.
    /// Growing allocates: it happens at most log2(ring size / INITIAL_SLOTS) times per queue.
    fn grow(&mut self, total: usize) {
        let total = total.min(self.max_slots);
        for index in self.slots.len()..total {
            self.slots.push(Box::new(RequestSlot::new(self.segments)));
            self.requests.push(Request::default());
            self.free_slots.push(index as u32);
        }
    }

    /// The ring, for its transport's messages.
    pub fn ring_mut(&mut self) -> &mut R {
        &mut self.ring
    }

    fn stats(&self) -> &Stats<QueueStat> {
        &self.volume.accounting.stats
    }

    fn takes_requests(&self) -> bool {
        self.enabled && !self.broken && !self.stopping
    }

    /// Takes up to a batch of new requests from the ring; true if it took any.
    fn take_batch(&mut self, io: &mut IoCtx<'_>) -> bool {
        let mut taken = 0;
        let mut batch_start = 0;
        while taken < io.batch && io.has_room() && self.volume.held().is_none() {
            if self.free_slots.is_empty() {
                if self.slots.len() == self.max_slots {
                    break;
                }
                // Every slot is busy: the guest keeps more in flight than the queue has
                // room for so far.
                self.grow(self.slots.len() * 2);
            }
            let slot = *self.free_slots.last().expect("checked non-empty");
            let (segs, request) = (
                &mut self.slots[slot as usize].segs,
                &mut self.requests[slot as usize],
            );
            let popped = match self.ring.pop(slot, segs, request) {
                Ok(Popped::Nothing) => break,
                Ok(popped) => popped,
                Err(why) => {
                    self.mark_broken(why);
                    break;
                }
            };
            if taken == 0 {
                batch_start = io.clock_now();
            }
            taken += 1;
            self.free_slots.pop();
            self.in_flight += 1;
            self.start(slot, popped, batch_start, io);
        }
        if taken == 0 {
            self.stats().add(QueueStat::PollsIdle, 1);
            return false;
        }
        let stats = self.stats();
        stats.add(QueueStat::PollsBusy, 1);
        stats.set(QueueStat::InFlight, self.in_flight as u64);
        stats.peak(QueueStat::InFlightPeak, self.in_flight as u64);
        if self.volume.accounting.batch_pending() {
            let latency = io.clock_now().saturating_sub(batch_start);
            self.volume.accounting.end_batch(latency);
        }
        true
    }

    /// Checks and plans a request just taken into `slot`, and starts it.
    fn start(&mut self, slot: u32, popped: Popped, now: u64, io: &mut IoCtx<'_>) {
        let request = &mut self.slots[slot as usize];
        request.reset(now);
        let prepared = match popped {
            Popped::Refused(status) => Err(status),
            _ => request.prepare(self.volume.device(), &self.requests[slot as usize]),
        };
        let progress = match prepared {
            Ok(()) => self.volume.start(slot, request, io),
            Err(status) => {
                request.status = status;
                Progress::Finished
            }
        };
        if progress == Progress::Finished {
            self.finish(slot, IN_BATCH);
        }
    }

    /// Tries the held request again; true if it went (newer ones may follow).
    fn retry_held(&mut self, slot: u32, io: &mut IoCtx<'_>) -> bool {
        if !io.has_room() {
            return false;
        }
        match self.volume.start(slot, &mut self.slots[slot as usize], io) {
            Progress::Held => false,
            Progress::InFlight => {
                self.volume.release_held();
                true
            }
            Progress::Finished => {
                self.volume.release_held();
                // Its latency runs from its own start, not this batch's.
                self.finish(slot, io.clock_now());
                true
            }
        }
    }

    /// The one place a request ends: counted, bounce data copied back, answered on the
    /// ring (which writes its status last), slot freed.
    fn finish(&mut self, slot: u32, end: u64) {
        let request = &mut self.slots[slot as usize];
        self.volume.accounting.finished(request, end);
        if request.release_bounce() {
            self.volume
                .accounting
                .stats
                .add(QueueStat::BounceBuffers, 1);
        }
        self.ring
            .complete(slot, &request.segs, request.status, request.written);
        self.unpublished = true;
        self.in_flight -= 1;
        self.free_slots.push(slot);
    }
}

impl<R: Ring + 'static> PolledQueue for RequestQueue<R> {
    fn poll(&mut self, io: &mut IoCtx<'_>) -> bool {
        // A held request goes first, even on a stopping queue: a stop waits for it.
        let retried = match self.volume.held() {
            Some(slot) if !self.retry_held(slot, io) => return false,
            Some(_) => true,
            None => false,
        };
        if !self.takes_requests() {
            return retried;
        }
        self.take_batch(io) | retried
    }

    fn complete(&mut self, slot: u32, result: i32, now: u64, uring_user_data: Option<u64>) {
        if let Some(user_data) = uring_user_data {
            self.volume.device().backend().completed(user_data);
        }
        let request = &mut self.slots[slot as usize];
        assert!(request.ops_pending > 0, "completion of an idle slot");
        request.record_result(result);
        request.ops_pending -= 1;
        if request.ops_pending == 0 && request.all_started() {
            self.finish(slot, now);
        }
    }

    fn publish(&mut self) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        let stats = &self.volume.accounting.stats;
        stats.set(QueueStat::InFlight, self.in_flight as u64);
        match self.ring.publish() {
            Notified::Sent => stats.add(QueueStat::NotificationsSent, 1),
            Notified::Suppressed => stats.add(QueueStat::NotificationsSuppressed, 1),
            Notified::Nobody => {}
        }
    }

    fn kick_fd(&self) -> RawFd {
        self.ring.kick_fd()
    }

    fn ack_kick(&mut self) {
        let kicks = self.ring.ack_kick();
        self.stats().add(QueueStat::Kicks, kicks);
    }

    fn enable_notification(&mut self) -> bool {
        self.takes_requests() && self.ring.enable_notification()
    }

    fn disable_notification(&mut self) {
        if self.takes_requests() {
            self.ring.disable_notification();
        }
    }

    fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    fn stop(&mut self) {
        self.stopping = true;
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn detach(&mut self) -> u16 {
        assert_eq!(self.in_flight, 0, "detached with requests in flight");
        self.stats().set(QueueStat::InFlight, 0);
        self.ring.detach()
    }

    fn deadline(&self) -> u64 {
        self.volume.retry_at()
    }

    fn mark_broken(&mut self, why: Broken) {
        if !self.broken {
            if why == Broken::Disconnected {
                // A connection's peer leaving is how its queue ends, not a fault.
                tracing::debug!(disk = %self.volume.device().options().name,
                    "queue's peer disconnected");
            } else {
                tracing::error!(disk = %self.volume.device().options().name, ?why,
                    "queue broken: it stops until the front end resets it");
                self.stats().set(QueueStat::Broken, 1);
            }
            self.broken = true;
            self.ring.broken(why);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    //! The pipeline with a scripted ring and a backend that says "not now".
    use super::*;
    use crate::backend::{BackendInfo, NullBackend};
    use crate::blk::RequestKind;
    use crate::device::DiskOptions;
    use crate::request::Status;
    use crate::virtqueue::Segments;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vmm_sys_util::eventfd::EventFd;

    /// Hands out FLUSH requests numbered 0, 1, 2...; records the order they are answered in.
    struct ScriptRing {
        next: u32,
        last: u32,
        taken: [u32; 8],
        answered: Vec<(u32, Status)>,
        kick: EventFd,
    }

    impl Ring for ScriptRing {
        fn slots(&self) -> usize {
            8
        }
        fn max_segments(&self) -> usize {
            1
        }
        fn pop(
            &mut self,
            slot: u32,
            segs: &mut Segments,
            request: &mut Request,
        ) -> Result<Popped, Broken> {
            if self.next == self.last {
                return Ok(Popped::Nothing);
            }
            segs.clear();
            self.taken[slot as usize] = self.next;
            self.next += 1;
            *request = Request {
                kind: RequestKind::Flush,
                ..Request::default()
            };
            Ok(Popped::Request)
        }
        fn complete(&mut self, slot: u32, _: &Segments, status: Status, _: u32) {
            self.answered.push((self.taken[slot as usize], status));
        }
        fn publish(&mut self) -> Notified {
            Notified::Nobody
        }
        fn enable_notification(&mut self) -> bool {
            false
        }
        fn disable_notification(&mut self) {}
        fn kick_fd(&self) -> RawFd {
            self.kick.as_raw_fd()
        }
        fn ack_kick(&mut self) -> u64 {
            0
        }
        fn detach(&mut self) -> u16 {
            0
        }
    }

    /// A null volume that answers "not now" to its first `busy` operations.
    struct BusyBackend {
        inner: NullBackend,
        busy: AtomicU32,
    }

    impl Backend for BusyBackend {
        fn info(&self) -> BackendInfo {
            self.inner.info()
        }
        fn submit(
            &self,
            op: &IoOp,
            user_data: u64,
            sq: &mut squeue::SubmissionQueue<'_>,
            completer: &Completer,
        ) -> Submitted {
            let left = self.busy.load(Ordering::Relaxed);
            if left > 0 {
                self.busy.store(left - 1, Ordering::Relaxed);
                return Submitted::Busy;
            }
            self.inner.submit(op, user_data, sq, completer)
        }
        fn sync_all(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A queue over `backend` whose ring holds FLUSH requests 0 to `requests - 1`.
    fn script_queue(backend: Arc<dyn Backend>, requests: u32) -> RequestQueue<ScriptRing> {
        let device = Arc::new(BlkDevice::new(DiskOptions::named("t", 1), backend));
        let ring = ScriptRing {
            next: 0,
            last: requests,
            taken: [0; 8],
            answered: Vec::new(),
            kick: EventFd::new(0).unwrap(),
        };
        RequestQueue::new(device, ring, Stats::private(), true)
    }

    /// What a reactor lends a queue it polls: an io_uring, a completer, the clock.
    struct Poller {
        uring: io_uring::IoUring,
        completer: Completer,
        clock: Clock,
        ops: usize,
        /// Kept open for the completer, as a reactor keeps its end.
        _completions: crossbeam_channel::Receiver<(u64, i32)>,
    }

    impl Poller {
        fn new() -> Poller {
            let (tx, completions) = crossbeam_channel::unbounded();
            Poller {
                _completions: completions,
                uring: io_uring::IoUring::new(64).unwrap(),
                completer: Completer::new(tx, Arc::new(EventFd::new(0).unwrap())),
                clock: Clock::get(),
                ops: 0,
            }
        }

        /// Polls `queue` once, letting it take up to `batch` requests.
        fn poll(&mut self, queue: &mut RequestQueue<ScriptRing>, batch: usize) -> bool {
            let mut io = IoCtx::new(
                self.uring.submission(),
                &self.completer,
                &mut self.ops,
                64,
                1 << 60,
                &self.clock,
            )
            .with_batch(batch);
            queue.poll(&mut io)
        }
    }

    #[test]
    fn a_request_the_backend_refuses_waits_and_nothing_overtakes_it() {
        let backend = Arc::new(BusyBackend {
            inner: NullBackend::new(1 << 20, true),
            busy: AtomicU32::new(2),
        });
        let mut queue = script_queue(backend, 3);
        let mut poller = Poller::new();
        let mut poll = |queue: &mut RequestQueue<ScriptRing>| poller.poll(queue, AVAIL_BATCH);
        // Request 0 is refused: held, not failed; 1 and 2 stay in the ring behind it.
        poll(&mut queue);
        assert!(queue.ring.answered.is_empty());
        assert_eq!((queue.in_flight(), queue.ring.next), (1, 1));
        assert_ne!(queue.deadline(), u64::MAX, "a held request sets a timer");
        // Refused again: still nothing moves, nothing is polled as progress.
        assert!(!poll(&mut queue));
        assert!(queue.ring.answered.is_empty());
        // The backend takes it now: it goes first, then the rest, in order, all OK.
        assert!(poll(&mut queue));
        assert_eq!(
            queue.ring.answered,
            [(0, Status::Ok), (1, Status::Ok), (2, Status::Ok)]
        );
        assert_eq!((queue.in_flight(), queue.deadline()), (0, u64::MAX));
    }

    #[test]
    fn a_stopping_queue_still_releases_its_held_request() {
        let backend = Arc::new(BusyBackend {
            inner: NullBackend::new(1 << 20, true),
            busy: AtomicU32::new(1),
        });
        let mut queue = script_queue(backend, 2);
        let mut poller = Poller::new();
        poller.poll(&mut queue, AVAIL_BATCH);
        queue.stop();
        // The held request completes (a stop waits for it); request 1 is not taken.
        poller.poll(&mut queue, AVAIL_BATCH);
        assert_eq!(queue.ring.answered, [(0, Status::Ok)]);
        assert_eq!((queue.in_flight(), queue.ring.next), (0, 1));
    }

    #[test]
    fn a_poll_takes_no_more_than_its_batch() {
        let mut queue = script_queue(Arc::new(NullBackend::new(1 << 20, true)), 5);
        let mut poller = Poller::new();
        let mut poll = |queue: &mut RequestQueue<ScriptRing>| poller.poll(queue, 2);
        // Five requests wait; each poll takes two, in ring order.
        for taken in [2, 4, 5] {
            assert!(poll(&mut queue));
            assert_eq!(queue.ring.next, taken);
            assert_eq!(queue.ring.answered.len(), taken as usize);
        }
        assert!(!poll(&mut queue), "nothing left to take");
    }
}
