//! The volume layer: between a planned request and its backend, one [`VolumeChannel`] per
//! queue (SPDK's bdev io_channel: per thread, so nothing here locks).
//!
//! It starts a request's operations on the backend one at a time, and when the backend says
//! "not now" ([`Submitted::Busy`]) it holds the request, in arrival order, until the reactor
//! polls the queue again (at once while it polls, or at `retry_at` from its timer when it
//! would sleep): a held request is never failed, and nothing newer starts before it. It
//! counts every finished request ([`Accounting`]). Per-disk limits and the splitting of
//! operations larger than a backend takes belong here too.

use crate::backend::Submitted;
use crate::device::BlkDevice;
use crate::queue::IoCtx;
use crate::request::{RequestSlot, Status};
use crate::stats::sets::{QueueStat, CLASSES, CLASS_STATS};
use crate::stats::Stats;
use std::sync::Arc;

/// How long a request the backend refused waits before it is tried again, when the reactor
/// has nothing else to do (ns).
pub const BUSY_RETRY_NS: u64 = 50_000;

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
    pub accounting: Accounting,
}

impl VolumeChannel {
    /// A channel for one queue of `device`, counting into `stats`.
    pub fn new(device: Arc<BlkDevice>, stats: Stats<QueueStat>) -> VolumeChannel {
        VolumeChannel {
            device,
            held: None,
            retry_at: u64::MAX,
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
