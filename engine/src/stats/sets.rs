//! What pollblk publishes. One file per object, its id `pollblk-PID/<object>`:
//!
//! - `disk0/queue-N` ([`QueueStat`]): written only by the reactor that owns queue N.
//! - `disk0` ([`DiskStat`]): capacity, and the guest's own statistics from the stats
//!   virtqueue (written by the reactor that owns that queue).
//! - `reactor-N` ([`ReactorStat`]): written only by reactor N.
//! - `pool-NAME` ([`PoolStat`]): a thin pool's space; shared by the threads that allocate
//!   (atomic adds).
//!
//! Per-object files keep each writer's values on its own pages: no two reactors' values ever
//! share a cache line.

use super::schema::Def;
use crate::stats_schema;

stats_schema! {
    /// Per-queue statistics.
    pub enum QueueStat {
        ReadOps => Def::counter("read_ops"),
        ReadSectors => Def::counter("read_sectors"),
        ReadNanos => Def::nanos("read_time"),
        WriteOps => Def::counter("write_ops"),
        WriteSectors => Def::counter("write_sectors"),
        WriteNanos => Def::nanos("write_time"),
        FlushOps => Def::counter("flush_ops"),
        FlushNanos => Def::nanos("flush_time"),
        DiscardOps => Def::counter("discard_ops"),
        DiscardSectors => Def::counter("discard_sectors"),
        DiscardNanos => Def::nanos("discard_time"),
        WriteZeroesOps => Def::counter("write_zeroes_ops"),
        WriteZeroesSectors => Def::counter("write_zeroes_sectors"),
        WriteZeroesNanos => Def::nanos("write_zeroes_time"),
        ProvisionOps => Def::counter("provision_ops"),
        ProvisionSectors => Def::counter("provision_sectors"),
        ProvisionNanos => Def::nanos("provision_time"),
        /// GET_ID, unsupported and malformed requests.
        OtherOps => Def::counter("other_ops"),
        OtherNanos => Def::nanos("other_time"),
        ErrorsIoerr => Def::counter("errors_ioerr"),
        ErrorsUnsupp => Def::counter("errors_unsupp"),
        InFlight => Def::gauge("in_flight"),
        InFlightPeak => Def::peak("in_flight_peak"),
        /// Kicks that woke the reactor (eventfd counts read while kicks were armed).
        Kicks => Def::counter("kicks"),
        NotificationsSent => Def::counter("notifications_sent"),
        /// Used-ring publishes the driver asked not to be told about (EVENT_IDX/NO_INTERRUPT).
        NotificationsSuppressed => Def::counter("notifications_suppressed"),
        /// Polls of the avail ring that found requests / found none.
        PollsBusy => Def::counter("polls_busy"),
        PollsIdle => Def::counter("polls_idle"),
        /// Requests whose buffers O_DIRECT could not use (copied through a bounce buffer).
        BounceBuffers => Def::counter("bounce_buffers"),
        /// Requests a previous daemon had taken and not completed, started again by this one
        /// from the in-flight records (INFLIGHT_SHMFD).
        Resubmitted => Def::counter("resubmitted"),
        /// Requests held by the disk's limits (QoS) before they started, and the time they
        /// waited; how long the next read would wait now (0: it would go).
        ThrottledRequests => Def::counter("throttled_requests"),
        ThrottledNanos => Def::nanos("throttled_time"),
        ThrottleWait => Def::instant_nanos("throttle_wait"),
        /// The ring was found corrupt and the queue stopped until the front end resets it.
        Broken => Def::flag("broken"),
        ReadLatency => Def::latency_hist("read_latency_hist"),
        WriteLatency => Def::latency_hist("write_latency_hist"),
        FlushLatency => Def::latency_hist("flush_latency_hist"),
        /// Discard, write-zeroes, provision, GET_ID and failed-before-I/O requests.
        OtherLatency => Def::latency_hist("other_latency_hist"),
    }
}

stats_schema! {
    /// Per-disk statistics. `guest_*` are the driver's answers on the stats virtqueue
    /// (tags VIRTIO_BLK_S_*; ticks in milliseconds as Linux counts them).
    pub enum DiskStat {
        CapacityBytes => Def::gauge_bytes("capacity_bytes"),
        GuestStatsRequests => Def::counter("guest_stats_requests"),
        GuestStatsReplies => Def::counter("guest_stats_replies"),
        GuestStatsMalformed => Def::counter("guest_stats_malformed"),
        GuestStatsUnknownTags => Def::counter("guest_stats_unknown_tags"),
        GuestReadIo => Def::counter("guest_read_io"),
        GuestReadMerges => Def::counter("guest_read_merges"),
        GuestReadSectors => Def::counter("guest_read_sectors"),
        GuestReadTicks => Def::millis("guest_read_ticks"),
        GuestWriteIo => Def::counter("guest_write_io"),
        GuestWriteMerges => Def::counter("guest_write_merges"),
        GuestWriteSectors => Def::counter("guest_write_sectors"),
        GuestWriteTicks => Def::millis("guest_write_ticks"),
        GuestInFlight => Def::gauge("guest_in_flight"),
        GuestIoTicks => Def::millis("guest_io_ticks"),
        GuestTimeInQueue => Def::millis("guest_time_in_queue"),
    }
}

/// The guest statistic each stats-virtqueue tag (0..=10) sets.
pub const GUEST_TAGS: [DiskStat; 11] = [
    DiskStat::GuestReadIo,
    DiskStat::GuestReadMerges,
    DiskStat::GuestReadSectors,
    DiskStat::GuestReadTicks,
    DiskStat::GuestWriteIo,
    DiskStat::GuestWriteMerges,
    DiskStat::GuestWriteSectors,
    DiskStat::GuestWriteTicks,
    DiskStat::GuestInFlight,
    DiskStat::GuestIoTicks,
    DiskStat::GuestTimeInQueue,
];

stats_schema! {
    /// Per-reactor statistics.
    pub enum ReactorStat {
        IterationsBusy => Def::counter("iterations_busy"),
        IterationsIdle => Def::counter("iterations_idle"),
        /// Times the reactor slept in io_uring_enter waiting for a kick, message or completion.
        Sleeps => Def::counter("sleeps"),
        /// io_uring_enter system calls (submits, task work and sleeps).
        UringEnters => Def::counter("uring_enters"),
        Queues => Def::gauge("queues"),
        /// io_uring operations in flight (I/O, polls on kick and mailbox eventfds).
        UringOpsInFlight => Def::gauge("uring_ops_in_flight"),
        /// Queues polled every iteration; the others are parked on their kick.
        QueuesPolled => Def::gauge("queues_polled"),
        /// Times an idle queue was parked (it waits for its kick, unscanned).
        QueueParks => Def::counter("queue_parks"),
    }
}

stats_schema! {
    /// Per-thin-pool statistics.
    pub enum PoolStat {
        BlockSize => Def::gauge_bytes("block_size"),
        BlocksTotal => Def::gauge("blocks_total"),
        BlocksUsed => Def::gauge("blocks_used"),
        Volumes => Def::gauge("volumes"),
        MetadataCommits => Def::counter("metadata_commits"),
    }
}

/// Statistics of one request class in [`QueueStat`]: (ops, sectors, total latency, histogram).
#[derive(Clone, Copy)]
pub struct ClassStats {
    pub ops: QueueStat,
    pub sectors: Option<QueueStat>,
    pub nanos: QueueStat,
    pub hist: QueueStat,
}

/// Request classes a queue counts; index with `Class as usize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Provision,
    Other,
}

pub const CLASSES: usize = 7;

const fn c(
    ops: QueueStat,
    sectors: Option<QueueStat>,
    nanos: QueueStat,
    hist: QueueStat,
) -> ClassStats {
    ClassStats {
        ops,
        sectors,
        nanos,
        hist,
    }
}

pub const CLASS_STATS: [ClassStats; CLASSES] = {
    use QueueStat::*;
    [
        c(ReadOps, Some(ReadSectors), ReadNanos, ReadLatency),
        c(WriteOps, Some(WriteSectors), WriteNanos, WriteLatency),
        c(FlushOps, None, FlushNanos, FlushLatency),
        c(DiscardOps, Some(DiscardSectors), DiscardNanos, OtherLatency),
        c(
            WriteZeroesOps,
            Some(WriteZeroesSectors),
            WriteZeroesNanos,
            OtherLatency,
        ),
        c(
            ProvisionOps,
            Some(ProvisionSectors),
            ProvisionNanos,
            OtherLatency,
        ),
        c(OtherOps, None, OtherNanos, OtherLatency),
    ]
};
