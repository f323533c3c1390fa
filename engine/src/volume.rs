//! The volume layer: between a planned request and its backend, one [`VolumeChannel`] per
//! queue (SPDK's bdev io_channel: per thread, so nothing here locks).
//!
//! It starts a request's operations on the backend one at a time, and when the backend says
//! "not now" ([`Submitted::Busy`]) it holds the request, in arrival order, until the reactor
//! polls the queue again (at once while it polls, or at `retry_at` from its timer when it
//! would sleep): a held request is never failed, and nothing newer starts before it. The
//! disk's limits ([`crate::qos`]) hold a request the same way, until its buckets admit it:
//! a FLUSH behind throttled writes waits for them. It counts every finished request
//! ([`Accounting`]). The splitting of operations larger than a backend takes belongs here
//! too.

use crate::backend::Submitted;
use crate::device::BlkDevice;
use crate::queue::IoCtx;
use crate::request::{RequestSlot, Status};
use crate::stats::sets::{Class, QueueStat, CLASSES, CLASS_STATS};
use crate::stats::Stats;
use std::sync::Arc;

/// How long a request the backend refused waits before it is tried again, when the reactor
/// has nothing else to do (ns).
pub const BUSY_RETRY_NS: u64 = 50_000;
/// Longest a throttled request waits before its limits are looked at again: a limit raised
/// or lifted at run time (qos_set) reaches requests already waiting within this (ns).
pub const THROTTLE_RECHECK_NS: u64 = 10_000_000;

/// Where a request stands after the volume layer tried to start it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Operations are in flight; each completion comes back through the reactor.
    InFlight,
    /// Every operation finished on the spot (or there were none).
    Finished,
    /// Held: the volume cannot take it now; it is tried again later, in order.
    Held,
}

/// One queue's view of a volume.
pub struct VolumeChannel {
    device: Arc<BlkDevice>,
    /// The request held back (slot index). At most one: nothing newer starts while one is.
    held: Option<u32>,
    /// Clock time at which the held request is tried again.
    retry_at: u64,
    /// The held request was admitted by the limits (and charged): a busy backend held it.
    held_admitted: bool,
    /// The held request waits for the limits: since when, and its reservation (start time,
    /// and the limits' generation it was made under).
    throttled_since: Option<u64>,
    reservation: (u64, u64),
    pub accounting: Accounting,
}

impl VolumeChannel {
    /// A channel for one queue of `device`, counting into `stats`.
    pub fn new(device: Arc<BlkDevice>, stats: Stats<QueueStat>) -> VolumeChannel {
        VolumeChannel {
            device,
            held: None,
            retry_at: u64::MAX,
            held_admitted: false,
            throttled_since: None,
            reservation: (0, 0),
            accounting: Accounting::new(stats),
        }
    }

    /// The disk this channel serves.
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// Starts the planned operations of the request in `slot_index` that are not started
    /// yet.
    pub fn start(
        &mut self,
        slot_index: u32,
        slot: &mut RequestSlot,
        io: &mut IoCtx<'_>,
    ) -> Progress {
        // A request meets the limits once, before its first operation.
        let admitted = self.held == Some(slot_index) && self.held_admitted;
        if !admitted {
            let now = io.clock_now();
            let start = self.start_time(slot_index, slot, now);
            if start > now {
                self.hold_throttled(slot_index, now, start);
                return Progress::Held;
            }
            if let Some(since) = self.throttled_since.take() {
                let stats = &self.accounting.stats;
                stats.add(QueueStat::ThrottledNanos, now.saturating_sub(since));
                stats.set(QueueStat::ThrottleWait, 0);
            }
        }
        let backend = self.device.backend();
        while let Some(op) = slot.next_op() {
            match io.submit(backend, &op, slot_index) {
                Submitted::Queued | Submitted::Deferred => slot.ops_pending += 1,
                Submitted::Done(result) => slot.record_result(result),
                Submitted::Busy => {
                    // A linked preflush is already on the ring: its write must follow now.
                    assert!(
                        !slot.follows_linked_flush(),
                        "a backend refused the write its preflush is linked to"
                    );
                    self.hold(slot_index, io.clock_now());
                    self.held_admitted = true;
                    return Progress::Held;
                }
            }
            slot.advance();
        }
        if slot.ops_pending > 0 {
            Progress::InFlight
        } else {
            Progress::Finished
        }
    }

    /// When the disk's limits let the request in `slot` start (`now` or earlier: at once):
    /// its reservation if it holds one made under the current limits, else a new one. Only
    /// data-moving requests count, as in QEMU: reads against the read limits; writes,
    /// discards and write-zeroes against the write ones.
    fn start_time(&mut self, slot_index: u32, slot: &RequestSlot, now: u64) -> u64 {
        let throttle = self.device.throttle();
        if !throttle.active() {
            return now;
        }
        let write = match slot.class {
            Class::Read => false,
            Class::Write | Class::Discard | Class::WriteZeroes => true,
            Class::Flush | Class::Provision | Class::Other => return now,
        };
        let generation = throttle.generation();
        let (start, made_under) = self.reservation;
        if self.held == Some(slot_index)
            && self.throttled_since.is_some()
            && made_under == generation
        {
            return start;
        }
        let start = throttle.reserve(write, slot.bytes(), now);
        self.reservation = (start, generation);
        start
    }

    /// Holds the request in `slot` until its limits admit it (from `until`), looking again
    /// at least every THROTTLE_RECHECK_NS in case the limits change.
    fn hold_throttled(&mut self, slot_index: u32, now: u64, until: u64) {
        self.hold(slot_index, now);
        self.held_admitted = false;
        self.retry_at = until.min(now.saturating_add(THROTTLE_RECHECK_NS));
        let stats = &self.accounting.stats;
        stats.set(QueueStat::ThrottleWait, until.saturating_sub(now));
        if self.throttled_since.is_none() {
            self.throttled_since = Some(now);
            stats.add(QueueStat::ThrottledRequests, 1);
        }
    }

    fn hold(&mut self, slot_index: u32, now: u64) {
        // Nothing newer starts while a request is held, so only the held one comes back here.
        assert!(
            self.held.is_none_or(|held| held == slot_index),
            "two requests held"
        );
        self.held = Some(slot_index);
        self.retry_at = now.saturating_add(BUSY_RETRY_NS);
    }

    /// The request held back, to try again before anything newer starts.
    pub fn held(&self) -> Option<u32> {
        self.held
    }

    /// The held request started (or finished): newer ones may go.
    pub fn release_held(&mut self) {
        assert!(self.held.is_some());
        self.held = None;
        self.held_admitted = false;
        self.retry_at = u64::MAX;
    }

    /// Clock time at which the held request wants another try (u64::MAX: none held).
    pub fn retry_at(&self) -> u64 {
        self.retry_at
    }
}

/// `Accounting::finished`'s time for a request that ends within the batch that took it: its
/// latency is the batch's, recorded by `end_batch` (one clock read per batch, not per
/// request).
pub const IN_BATCH: u64 = u64::MAX;

/// Counts finished requests into a queue's statistics.
pub struct Accounting {
    pub stats: Stats<QueueStat>,
    /// Requests finished during the current batch, by class.
    batch_finished: [u32; CLASSES],
}

impl Accounting {
    fn new(stats: Stats<QueueStat>) -> Accounting {
        Accounting {
            stats,
            batch_finished: [0; CLASSES],
        }
    }

    /// Counts a finished request: its class's ops, sectors (when it succeeded) and latency
    /// (`end` = clock time of the completion, or IN_BATCH), and errors by status.
    pub fn finished(&mut self, slot: &RequestSlot, end: u64) {
        let class = CLASS_STATS[slot.class as usize];
        let stats = &self.stats;
        stats.add(class.ops, 1);
        match slot.status {
            Status::Ok => {
                if let Some(sectors) = class.sectors {
                    stats.add(sectors, slot.sectors);
                }
            }
            Status::Unsupported => stats.add(QueueStat::ErrorsUnsupp, 1),
            Status::IoError => stats.add(QueueStat::ErrorsIoerr, 1),
        }
        if end == IN_BATCH {
            self.batch_finished[slot.class as usize] += 1;
        } else {
            let latency = end.saturating_sub(slot.start);
            stats.add(class.nanos, latency);
            stats.log_hist(class.hist, latency, 1);
        }
    }

    /// Records `latency` for the requests that finished within the batch that took them.
    pub fn end_batch(&mut self, latency: u64) {
        for (class, count) in self.batch_finished.iter_mut().enumerate() {
            if *count > 0 {
                let stats = CLASS_STATS[class];
                self.stats.add(stats.nanos, latency * u64::from(*count));
                self.stats.log_hist(stats.hist, latency, u64::from(*count));
                *count = 0;
            }
        }
    }

    /// Whether requests finished in the current batch wait for their latency.
    pub fn batch_pending(&self) -> bool {
        self.batch_finished.iter().any(|&n| n > 0)
    }
}
