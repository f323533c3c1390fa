//! Per-core polled reactors: each one a thread pinned to a core that owns its virtqueues end
//! to end and its own io_uring (SPDK's reactor, with io_uring instead of a poll group).
//!
//! One iteration: take control messages (bounded batch), poll every owned avail ring (bounded
//! batch per queue), start requests on the ring or finish them on the spot, enter the kernel at
//! most once (only if there is something to submit or task work to run), reap completions,
//! publish each queue's used ring once and notify once, per EVENT_IDX.
//!
//! Adaptive polling: while there is work the reactor busy-polls with kicks suppressed; after
//! `idle` without work it re-enables kicks, re-checks every ring (a request that arrived in
//! between is not lost), and sleeps in one `io_uring_enter` that returns on a kick (a poll on the
//! kick eventfd, armed per queue), a control message (the mailbox eventfd) or an I/O completion.
//!
//! Per request nothing is allocated (request slots, their iovec arrays and the free list are
//! made when a queue is attached), nothing is locked, and no system call is made except the
//! per-iteration enter and, when the driver wants it, the call eventfd write. The exception is
//! a request whose buffers O_DIRECT cannot use: it gets a bounce buffer, a cold path.

use crate::backend::{Completer, IoOp, Submitted};
use crate::blk::{self, status, DwzSegment, RequestKind};
use crate::clock::Clock;
use crate::device::BlkDevice;
use crate::dirty_log::DirtyLog;
use crate::guest_stats::GuestStatsVq;
use crate::inflight::InflightQueue;
use crate::mem::GuestMemory;
use crate::ring::{RequestRing, RingSetup};
use crate::stats::sets::{Class, QueueStat, ReactorStat, CLASSES, CLASS_STATS};
use crate::stats::{Stats, StatsDir};
use crate::virtqueue::{Broken, RingAddrs, Segments, SplitQueue};
use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// SQ entries per reactor ring.
const SQ_ENTRIES: u32 = 1024;
/// CQ entries per reactor ring; in-flight operations are kept below this (no overflow).
const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;
/// Most io_uring operations one request may start (one per discard segment).
const MAX_OPS_PER_REQUEST: usize = blk::MAX_DWZ_SEG as usize;
/// Requests taken from one queue per iteration, so one busy queue cannot starve the others.
const AVAIL_BATCH: usize = 64;
/// Completions copied out of the CQ per pass.
const CQE_BATCH: usize = 256;
/// Control messages handled per iteration.
const MAILBOX_BATCH: usize = 16;
/// Most requests in flight per queue (request slots); beyond it the ring waits.
const MAX_SLOTS_PER_QUEUE: usize = 1024;
/// Largest request data: what seg_max buffers of size_max can hold.
const MAX_REQUEST_BYTES: u64 = blk::SEG_MAX as u64 * blk::SIZE_MAX as u64;

/// user_data tags (top 4 bits). A TAG_IO user_data is TAG | queue index << 32 | slot; bits
/// 48..60 belong to the backend (see `Backend::completed`).
const TAG_IO: u64 = 1 << 60;
const TAG_KICK: u64 = 2 << 60;
const TAG_MAILBOX: u64 = 3 << 60;
const TAG_CANCEL: u64 = 4 << 60;
const TAG_EXTERNAL: u64 = 5 << 60;
const TAG_MASK: u64 = 0xf << 60;

/// How a reactor waits for work (`--poll-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Busy-poll forever with kicks suppressed: lowest latency, one full core per reactor.
    /// A reactor with no queue attached still sleeps: there is nothing to poll.
    Poll,
    /// Busy-poll while there is work; sleep on kicks after `PollConfig::idle` without any.
    Adaptive,
    /// Never busy-poll: sleep on kicks as soon as an iteration finds no work.
    Interrupt,
}

impl std::str::FromStr for PollMode {
    type Err = String;

    fn from_str(s: &str) -> Result<PollMode, String> {
        match s {
            "poll" => Ok(PollMode::Poll),
            "adaptive" => Ok(PollMode::Adaptive),
            "interrupt" => Ok(PollMode::Interrupt),
            _ => Err(format!(
                "unknown poll mode {s:?} (expected poll, adaptive or interrupt)"
            )),
        }
    }
}

/// How reactors wait for work.
#[derive(Clone, Copy, Debug)]
pub struct PollConfig {
    pub mode: PollMode,
    /// Adaptive mode: idle time after which a reactor re-enables kicks and sleeps.
    pub idle: Duration,
}

impl PollConfig {
    /// Default idle time before an adaptive reactor sleeps (`--poll-idle-us`).
    pub const DEFAULT_IDLE: Duration = Duration::from_micros(50);

    /// Whether a reactor idle for `idle_for` should sleep now.
    fn should_sleep(&self, idle_for: Duration, has_queues: bool) -> bool {
        match self.mode {
            PollMode::Poll => !has_queues,
            PollMode::Adaptive => idle_for >= self.idle,
            PollMode::Interrupt => true,
        }
    }
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            mode: PollMode::Adaptive,
            idle: PollConfig::DEFAULT_IDLE,
        }
    }
}

/// Identifies an attached queue across the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueId(u64);

impl QueueId {
    /// A new, never-used id.
    pub fn fresh() -> QueueId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        QueueId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Everything a reactor needs to serve one virtqueue.
pub struct QueueSetup {
    pub device: Arc<BlkDevice>,
    pub mem: Arc<GuestMemory>,
    pub addrs: RingAddrs,
    pub size: u16,
    /// Avail index to resume at (SET_VRING_BASE).
    pub base: u16,
    pub event_idx: bool,
    pub indirect: bool,
    pub kick: EventFd,
    pub call: Option<EventFd>,
    pub err: Option<EventFd>,
    pub enabled: bool,
    /// Where the queue's counters go (the device's statistics of this queue index).
    pub stats: Stats<QueueStat>,
    pub role: QueueRole,
    /// In-flight records shared with the front end (INFLIGHT_SHMFD): requests taken and not
    /// completed by a previous daemon are resubmitted when the queue starts.
    pub inflight: Option<InflightQueue>,
    /// Dirty-page log to mark while the front end migrates the guest (VHOST_F_LOG_ALL).
    pub dirty_log: Option<Arc<DirtyLog>>,
}

/// What a virtqueue carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// virtio-blk requests.
    Requests,
    /// The stats virtqueue (seed 000): the device holds the driver's buffer and returns it
    /// every `interval` to ask for the guest's statistics.
    GuestStats { interval: Duration },
}

enum Msg {
    Attach(QueueId, Box<QueueSetup>, Sender<Result<(), Broken>>),
    AttachRing(QueueId, Box<RingSetup>),
    Stop(QueueId, Sender<u16>),
    SetEnabled(QueueId, bool),
    SetCall(QueueId, Option<EventFd>),
    SetMemory(QueueId, Arc<GuestMemory>, Sender<Result<(), Broken>>),
    SetDirtyLog(QueueId, Option<Arc<DirtyLog>>, Sender<()>),
    Shutdown,
}

/// Why a queue did not stop in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopError {
    /// Requests were still in the backend when the timeout ran out; the queue stops as soon
    /// as they complete.
    Timeout,
    /// The reactor has exited.
    ReactorGone,
}

/// Sends control messages to one reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    index: usize,
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
}

impl ReactorHandle {
    fn send(&self, msg: Msg) {
        // A reactor outlives every handle's use (shut down last); a send error would mean it
        // died, and the reply channel then reports the failure.
        let _ = self.tx.send(msg);
        let _ = self.wake.write(1);
    }

    /// Index of this reactor.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Starts serving a queue; fails if its rings are not in guest memory.
    pub fn attach(&self, id: QueueId, setup: QueueSetup) -> Result<(), Broken> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Msg::Attach(id, Box::new(setup), tx));
        rx.recv().unwrap_or(Err(Broken::RingUnmapped))
    }

    /// Starts serving a request ring of another transport (Xen blkif).
    pub fn attach_ring(&self, id: QueueId, setup: RingSetup) {
        self.send(Msg::AttachRing(id, Box::new(setup)));
    }

    /// Stops a queue after completing every request in flight; returns the avail index to
    /// resume at (GET_VRING_BASE).
    pub fn stop(&self, id: QueueId) -> u16 {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Msg::Stop(id, tx));
        rx.recv().unwrap_or(0)
    }

    /// Pauses a queue: it takes no new request, completes every one in flight, then detaches
    /// and gives the avail index to resume at (`QueueSetup::base` of the next attach). A
    /// request still in the backend after `timeout` is reported (StopError::Timeout), not
    /// waited on forever; the queue then detaches by itself when its last request completes.
    pub fn stop_within(&self, id: QueueId, timeout: Duration) -> Result<u16, StopError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Msg::Stop(id, tx));
        rx.recv_timeout(timeout).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => StopError::Timeout,
            crossbeam_channel::RecvTimeoutError::Disconnected => StopError::ReactorGone,
        })
    }

    /// Pauses or resumes taking new requests (SET_VRING_ENABLE).
    pub fn set_enabled(&self, id: QueueId, enabled: bool) {
        self.send(Msg::SetEnabled(id, enabled));
    }

    /// Replaces the call eventfd (the front end may change it while the queue runs).
    pub fn set_call(&self, id: QueueId, call: Option<EventFd>) {
        self.send(Msg::SetCall(id, call));
    }

    /// Starts (Some) or stops (None) marking the queue's guest-memory writes in a dirty log,
    /// and waits until the reactor does: the front end copies guest memory as soon as it has
    /// the answer, so a write the reactor made after that copy but before it took the log
    /// would be lost on the destination.
    pub fn set_dirty_log(&self, id: QueueId, log: Option<Arc<DirtyLog>>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Msg::SetDirtyLog(id, log, tx));
        // An error: the reactor has exited, and writes nothing more.
        let _ = rx.recv();
    }

    /// Switches a queue to a new memory table and waits until the reactor uses it.
    pub fn set_memory(&self, id: QueueId, mem: Arc<GuestMemory>) -> Result<(), Broken> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Msg::SetMemory(id, mem, tx));
        rx.recv().unwrap_or(Err(Broken::RingUnmapped))
    }
}

/// The running reactors.
pub struct Reactors {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Starts one reactor per core in `cores`, each pinned to its core.
    pub fn start(
        cores: &[usize],
        poll: PollConfig,
        stats_dir: Option<&StatsDir>,
    ) -> io::Result<Reactors> {
        assert!(!cores.is_empty());
        let mut handles = Vec::with_capacity(cores.len());
        let mut threads = Vec::with_capacity(cores.len());
        for (index, &core) in cores.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let thread_wake = wake.clone();
            let stats = match stats_dir {
                Some(dir) => dir.create(&format!("reactor-{index}"))?,
                None => Stats::private(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("reactor-{index}"))
                .spawn(move || {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(core, "could not pin reactor {index}");
                    }
                    // The ring is made on its own thread: SINGLE_ISSUER binds it to the creator.
                    match Reactor::new(rx, thread_wake, poll, stats) {
                        Ok(mut reactor) => {
                            let _ = ready_tx.send(Ok(()));
                            reactor.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })?;
            ready_rx
                .recv()
                .map_err(|_| io::Error::other("reactor thread died"))??;
            handles.push(ReactorHandle { index, tx, wake });
            threads.push(thread);
        }
        Ok(Reactors { handles, threads })
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The reactor that serves queue `queue_index` of a disk: queues spread round robin.
    pub fn for_queue(&self, queue_index: usize) -> &ReactorHandle {
        &self.handles[queue_index % self.handles.len()]
    }

    /// Stops every reactor; queues must have been stopped first.
    pub fn shutdown(self) {
        for handle in &self.handles {
            handle.send(Msg::Shutdown);
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// A buffer aligned for O_DIRECT, for requests whose guest buffers are not.
struct BounceBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl BounceBuf {
    fn new(len: usize, align: usize) -> BounceBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(align), align)
            .expect("alignment is a power of two");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        BounceBuf { ptr, layout }
    }
}

impl Drop for BounceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// One request in flight; owned by its queue, reused.
struct Slot {
    head: u16,
    segs: Segments,
    status_ptr: *mut u8,
    /// Bytes written into guest buffers, status byte included, when the request succeeds.
    used_len: u32,
    ops_pending: u32,
    status: u8,
    /// Expected byte count of the read or write (short transfers are errors).
    expected: u64,
    /// Data range within `segs` (for copying a bounce buffer back).
    data: std::ops::Range<usize>,
    /// A preflush is in flight with the write: its result (0) is not a short write.
    preflush: bool,
    is_read: bool,
    bounce: Option<BounceBuf>,
    bounce_iov: libc::iovec,
    /// What the request counts as, and its sectors when it succeeds.
    class: Class,
    sectors: u64,
    /// Clock time of the reactor iteration that took the request.
    start: u64,
}

impl Slot {
    fn new(segments: usize) -> Slot {
        Slot {
            head: 0,
            segs: Segments::with_capacity(segments),
            status_ptr: std::ptr::null_mut(),
            used_len: 0,
            ops_pending: 0,
            status: status::OK,
            expected: 0,
            data: 0..0,
            preflush: false,
            is_read: false,
            bounce: None,
            bounce_iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            class: Class::Other,
            sectors: 0,
            start: 0,
        }
    }
}

/// Where a queue's requests come from.
enum QueueRing {
    Virtio(SplitQueue),
    /// Another transport's ring (Xen blkif).
    Other(Box<dyn RequestRing>),
}

impl QueueRing {
    /// The virtqueue; only virtio paths (stats virtqueue, memory tables, chains) call this.
    fn split(&mut self) -> &mut SplitQueue {
        match self {
            QueueRing::Virtio(ring) => ring,
            QueueRing::Other(_) => unreachable!("a virtqueue operation on another ring"),
        }
    }

    fn enable_notification(&mut self) -> bool {
        match self {
            QueueRing::Virtio(ring) => ring.enable_notification(),
            QueueRing::Other(ring) => ring.enable_notification(),
        }
    }

    fn disable_notification(&mut self) {
        match self {
            QueueRing::Virtio(ring) => ring.disable_notification(),
            QueueRing::Other(ring) => ring.disable_notification(),
        }
    }

    /// Where a stopped queue resumes (a virtqueue's last_avail_idx; 0 for other rings,
    /// which keep their position in shared memory).
    fn resume_index(&self) -> u16 {
        match self {
            QueueRing::Virtio(ring) => ring.last_avail_idx(),
            QueueRing::Other(_) => 0,
        }
    }
}

/// A queue as its reactor holds it.
struct QueueState {
    id: QueueId,
    device: Arc<BlkDevice>,
    mem: Arc<GuestMemory>,
    /// Memory tables replaced while requests were in flight; dropped when none are.
    retired_mem: Vec<Arc<GuestMemory>>,
    addrs: RingAddrs,
    ring: QueueRing,
    /// The virtqueue's kick eventfd (other rings bring their own, `RequestRing::kick_fd`).
    kick: Option<EventFd>,
    kick_armed: bool,
    kick_cancel_sent: bool,
    call: Option<EventFd>,
    err: Option<EventFd>,
    enabled: bool,
    broken: bool,
    stopping: Option<Sender<u16>>,
    slots: Box<[Slot]>,
    free_slots: Vec<u32>,
    in_flight: usize,
    /// Used entries pushed since the last publish.
    unpublished: bool,
    stats: Stats<QueueStat>,
    /// Requests finished during the current avail batch, by class: their latency is the
    /// batch's, recorded when it ends (one clock read per batch, not per request).
    batch_finished: [u32; CLASSES],
    /// Set for the stats virtqueue.
    guest_stats: Option<Box<GuestStatsVq>>,
    inflight: Option<InflightQueue>,
    /// Next in-flight counter (orders resubmission after a restart).
    inflight_counter: u64,
    /// Heads completed since the last publish, for the in-flight records.
    batch: Vec<u16>,
    dirty_log: Option<Arc<DirtyLog>>,
}

impl QueueState {
    /// Marks the used ring (elements, index, avail_event) dirty while logging.
    fn log_used_ring(&self) {
        if let (Some(log), QueueRing::Virtio(ring)) = (&self.dirty_log, &self.ring) {
            let (ptr, len) = ring.used_ring();
            if let Some(gpa) = self.mem.gpa_of(ptr) {
                log.mark(gpa, len);
            }
        }
    }

    /// Marks every device-writable buffer of a finished request dirty while logging
    /// (the data buffers, and the status byte, which `locate_status` took off the last one).
    fn log_writes(&self, segs: &Segments, status: *const u8) {
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

    fn kick_fd(&self) -> RawFd {
        match (&self.kick, &self.ring) {
            (Some(kick), _) => kick.as_raw_fd(),
            (None, QueueRing::Other(ring)) => ring.kick_fd(),
            (None, QueueRing::Virtio(_)) => unreachable!("a virtqueue has a kick eventfd"),
        }
    }

    /// Consumes the notifications behind a readable kick fd; returns how many.
    fn ack_kick(&mut self) -> u64 {
        match (&self.kick, &mut self.ring) {
            (Some(kick), _) => kick.read().unwrap_or(0),
            (None, QueueRing::Other(ring)) => ring.ack_kick(),
            (None, QueueRing::Virtio(_)) => unreachable!("a virtqueue has a kick eventfd"),
        }
    }

    fn takes_requests(&self) -> bool {
        self.enabled && !self.broken && self.stopping.is_none()
    }

    fn mark_broken(&mut self, why: Broken) {
        if !self.broken {
            tracing::error!(disk = %self.device.options().name, ?why,
                "virtqueue broken: it stops until the front end resets it");
            self.broken = true;
            self.stats.set(QueueStat::Broken, 1);
            if let Some(err) = &self.err {
                let _ = err.write(1);
            }
        }
    }
}

struct Reactor {
    ring: IoUring,
    rx: Receiver<Msg>,
    wake: Arc<EventFd>,
    /// Completions of operations backends finished on other threads (Submitted::Deferred).
    external_rx: Receiver<(u64, i32)>,
    external_wake: Arc<EventFd>,
    completer: Completer,
    queues: Vec<Option<Box<QueueState>>>,
    /// io_uring operations submitted and not completed (CQ overflow guard).
    ops_in_flight: usize,
    poll: PollConfig,
    shutting_down: bool,
    stats: Stats<ReactorStat>,
    clock: Clock,
    /// Earliest time a stats virtqueue of this reactor asks the guest (u64::MAX: none).
    guest_stats_due: u64,
}

impl Reactor {
    fn new(
        rx: Receiver<Msg>,
        wake: Arc<EventFd>,
        poll: PollConfig,
        stats: Stats<ReactorStat>,
    ) -> io::Result<Reactor> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .or_else(|_| {
                // Kernels before 6.1 lack DEFER_TASKRUN: plain rings still work.
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)
            })?;
        let (external_tx, external_rx) = crossbeam_channel::unbounded();
        let external_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let completer = Completer::new(external_tx, external_wake.clone());
        let mut reactor = Reactor {
            ring,
            rx,
            wake,
            external_rx,
            external_wake,
            completer,
            queues: Vec::new(),
            ops_in_flight: 0,
            poll,
            shutting_down: false,
            stats,
            clock: Clock::get(),
            guest_stats_due: u64::MAX,
        };
        reactor.arm_wake();
        reactor.arm_external();
        Ok(reactor)
    }

    /// Arms a one-shot poll for readability of an eventfd (kick or mailbox).
    ///
    /// A poll rather than a read: front ends hand over O_NONBLOCK eventfds, and io_uring may
    /// answer a read of one with -EAGAIN instead of waiting. A poll holds no buffer either, so
    /// the kernel never writes into memory of ours after the fact. The CQE's handler drains the
    /// eventfd (one read, only on this wake-up path) and arms the poll again.
    fn arm_poll(&mut self, fd: i32, user_data: u64) {
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(user_data);
        if self.ring.submission().is_full() {
            self.enter(false);
        }
        // SAFETY: a poll references no memory of ours.
        unsafe { self.ring.submission().push(&poll) }.expect("SQ has room after a submit");
        self.ops_in_flight += 1;
    }

    fn arm_wake(&mut self) {
        self.arm_poll(self.wake.as_raw_fd(), TAG_MAILBOX);
    }

    fn arm_external(&mut self) {
        self.arm_poll(self.external_wake.as_raw_fd(), TAG_EXTERNAL);
    }

    /// Finishes operations completed on other threads; true if there were any.
    fn reap_external(&mut self) -> bool {
        let mut now = None;
        while let Ok((user_data, result)) = self.external_rx.try_recv() {
            let now = *now.get_or_insert_with(|| self.clock.now());
            let (qi, slot) = decode_io(user_data);
            let queue = self.queues[qi]
                .as_deref_mut()
                .expect("deferred I/O of a live queue");
            complete_op(queue, slot, result, now);
        }
        now.is_some()
    }

    fn run(&mut self) {
        let mut idle_since = Instant::now();
        loop {
            let mut busy = self.handle_mailbox();
            if self.shutting_down && self.queues.iter().all(Option::is_none) {
                break;
            }
            for qi in 0..self.queues.len() {
                busy |= self.poll_queue(qi);
            }
            self.enter(false);
            busy |= self.reap();
            busy |= self.reap_external();
            if self.guest_stats_due != u64::MAX {
                self.ask_guests_for_stats();
            }
            self.publish_and_notify();
            self.finish_stops();
            self.stats
                .set(ReactorStat::UringOpsInFlight, self.ops_in_flight as u64);
            if busy {
                self.stats.add(ReactorStat::IterationsBusy, 1);
                idle_since = Instant::now();
            } else {
                self.stats.add(ReactorStat::IterationsIdle, 1);
                let has_queues = self.queues.iter().any(Option::is_some);
                if self.poll.should_sleep(idle_since.elapsed(), has_queues) {
                    self.sleep();
                    idle_since = Instant::now();
                }
            }
        }
        // The mailbox poll still armed references no memory: dropping the ring cancels it.
    }

    /// Submits queued SQEs and runs deferred task work, without a syscall when neither.
    fn enter(&mut self, wait: bool) {
        let mut sq = self.ring.submission();
        sq.sync();
        let pending = !sq.is_empty() || sq.taskrun();
        drop(sq);
        if !pending && !wait {
            return;
        }
        self.stats.add(ReactorStat::UringEnters, 1);
        let result = if !wait {
            self.ring.submitter().submit()
        } else if self.guest_stats_due != u64::MAX {
            // Wake up in time to ask a guest for its statistics.
            let wait_ns = self.guest_stats_due.saturating_sub(self.clock.now()).max(1);
            let ts = types::Timespec::new()
                .sec(wait_ns / 1_000_000_000)
                .nsec((wait_ns % 1_000_000_000) as u32);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            self.ring.submitter().submit_and_wait(1)
        };
        match result {
            Ok(_) => {}
            // EINTR: a signal; EBUSY: the CQ is full, reaping frees it; ETIME: the wait's
            // timeout. All retry next pass.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::ETIME)
                ) => {}
            Err(e) => panic!("io_uring_enter failed: {e}"),
        }
    }

    /// Re-enables kicks, re-checks the rings, then sleeps until a kick, message or CQE.
    fn sleep(&mut self) {
        let mut pending = false;
        for queue in self.queues.iter_mut().flatten() {
            if queue.takes_requests() {
                pending |= queue.ring.enable_notification();
                queue.log_used_ring();
            }
        }
        if !pending && self.rx.is_empty() && self.external_rx.is_empty() {
            self.stats.add(ReactorStat::Sleeps, 1);
            self.enter(true);
        }
        // Interrupt mode keeps kicks on: the next sleep re-arms them anyway.
        if self.poll.mode == PollMode::Interrupt {
            return;
        }
        for queue in self.queues.iter_mut().flatten() {
            if queue.takes_requests() {
                queue.ring.disable_notification();
                queue.log_used_ring();
            }
        }
    }

    fn handle_mailbox(&mut self) -> bool {
        let mut handled = false;
        for _ in 0..MAILBOX_BATCH {
            let Ok(msg) = self.rx.try_recv() else { break };
            handled = true;
            match msg {
                Msg::Attach(id, setup, reply) => {
                    let _ = reply.send(self.attach(id, *setup));
                }
                Msg::AttachRing(id, setup) => self.attach_ring(id, *setup),
                Msg::Stop(id, reply) => match self.find(id) {
                    Some(qi) => {
                        let queue = self.queues[qi].as_mut().unwrap();
                        queue.stopping = Some(reply);
                        if let Some(vq) = queue.guest_stats.as_deref_mut() {
                            // The held buffer is in flight: the driver gets it back, unless
                            // the ring is broken (its memory may be gone).
                            if let Some(head) = vq.release().filter(|_| !queue.broken) {
                                queue.ring.split().push_used(head, 0);
                                queue.unpublished = true;
                            }
                        }
                    }
                    None => {
                        let _ = reply.send(0);
                    }
                },
                Msg::SetEnabled(id, enabled) => {
                    if let Some(qi) = self.find(id) {
                        self.queues[qi].as_mut().unwrap().enabled = enabled;
                    }
                }
                Msg::SetCall(id, call) => {
                    if let Some(qi) = self.find(id) {
                        let queue = self.queues[qi].as_mut().unwrap();
                        queue.call = call;
                        // A request completed while the old fd was being swapped must not
                        // go unsignalled.
                        if let Some(call) = &queue.call {
                            let _ = call.write(1);
                        }
                    }
                }
                Msg::SetMemory(id, mem, reply) => {
                    let result = match self.find(id) {
                        Some(qi) => {
                            let queue = self.queues[qi].as_mut().unwrap();
                            let old = std::mem::replace(&mut queue.mem, mem);
                            if queue.in_flight > 0 {
                                queue.retired_mem.push(old);
                            }
                            let result = queue.ring.split().remap(&queue.mem, queue.addrs);
                            if let Err(why) = result {
                                // The old ring pointers must not be used once their memory
                                // is retired: the queue stops here.
                                queue.mark_broken(why);
                            }
                            result
                        }
                        None => Ok(()),
                    };
                    let _ = reply.send(result);
                }
                Msg::SetDirtyLog(id, log, reply) => {
                    if let Some(qi) = self.find(id) {
                        let queue = self.queues[qi].as_mut().unwrap();
                        queue.dirty_log = log;
                        // Everything the ring holds now may be newer than what was copied.
                        queue.log_used_ring();
                    }
                    let _ = reply.send(());
                }
                Msg::Shutdown => {
                    self.shutting_down = true;
                    for queue in self.queues.iter_mut().flatten() {
                        if queue.stopping.is_none() {
                            let (tx, _) = crossbeam_channel::bounded(1);
                            queue.stopping = Some(tx);
                        }
                    }
                }
            }
        }
        handled
    }

    fn find(&self, id: QueueId) -> Option<usize> {
        self.queues
            .iter()
            .position(|q| q.as_ref().is_some_and(|q| q.id == id))
    }

    fn attach(&mut self, id: QueueId, setup: QueueSetup) -> Result<(), Broken> {
        let ring = SplitQueue::new(
            &setup.mem,
            setup.addrs,
            setup.size,
            setup.base,
            setup.event_idx,
            setup.indirect,
        )?;
        let mut ring = ring;
        if self.poll.mode != PollMode::Interrupt {
            // The reactor polls this ring from now on: kicks would only cost the driver exits.
            ring.disable_notification();
        }
        let guest_stats = match setup.role {
            QueueRole::Requests => None,
            QueueRole::GuestStats { interval } => Some(Box::new(GuestStatsVq::new(
                setup.device.disk_stats().clone(),
                interval,
            ))),
        };
        let slot_count = if guest_stats.is_some() {
            0
        } else {
            usize::from(setup.size).min(MAX_SLOTS_PER_QUEUE)
        };
        setup.stats.set(QueueStat::Broken, 0);
        setup.stats.set(QueueStat::InFlight, 0);
        let inflight = setup.inflight.filter(|_| guest_stats.is_none());
        let (resubmit, inflight_counter) = match &inflight {
            Some(records) => {
                let used = ring.used_idx_in_ring();
                match records.recover(used) {
                    // Restarted: resume from the ring itself, as libvhost-user does. After a
                    // lost connection QEMU's base is its own cached used index, which may lag
                    // the ring; taking avail entries from there again completes them twice.
                    Some((heads, next)) => {
                        if !heads.is_empty() {
                            tracing::info!(disk = %setup.device.options().name,
                                requests = heads.len(),
                                "resubmitting requests a previous daemon had in flight");
                            setup.stats.add(QueueStat::Resubmitted, heads.len() as u64);
                        }
                        if used.wrapping_add(heads.len() as u16) != setup.base {
                            tracing::info!(disk = %setup.device.options().name,
                                base = setup.base, used, in_flight = heads.len(),
                                "resuming from the ring's used index, not the front end's base");
                        }
                        ring.resume_after_restart(used, heads.len() as u16);
                        (heads, next)
                    }
                    None => (Vec::new(), 1),
                }
            }
            None => (Vec::new(), 0),
        };
        // A ring that starts where its last user stopped has every taken request completed:
        // its used index is its avail base. Anything else (a stale copy of the used ring after
        // a migration) would make the driver complete old entries again.
        let used_in_ring = ring.used_idx_in_ring();
        if resubmit.is_empty() && used_in_ring != ring.next_used_idx() {
            tracing::warn!(disk = %setup.device.options().name, base = setup.base, used_in_ring,
                "vring starts with a used index other than its base");
        }
        let queue = Box::new(QueueState {
            id,
            device: setup.device,
            mem: setup.mem,
            retired_mem: Vec::new(),
            addrs: setup.addrs,
            ring: QueueRing::Virtio(ring),
            kick: Some(setup.kick),
            kick_armed: false,
            kick_cancel_sent: false,
            call: setup.call,
            err: setup.err,
            enabled: setup.enabled,
            broken: false,
            stopping: None,
            slots: (0..slot_count)
                .map(|_| Slot::new(blk::SLOT_SEGMENTS))
                .collect(),
            free_slots: (0..slot_count as u32).rev().collect(),
            in_flight: 0,
            unpublished: false,
            stats: setup.stats,
            batch_finished: [0; CLASSES],
            guest_stats,
            inflight,
            inflight_counter,
            batch: Vec::with_capacity(slot_count + AVAIL_BATCH + 1),
            dirty_log: setup.dirty_log,
        });
        let qi = self.install(queue);
        self.resubmit(qi, &resubmit);
        Ok(())
    }

    /// Serves another transport's request ring like a virtqueue.
    fn attach_ring(&mut self, id: QueueId, setup: RingSetup) {
        let mut ring = setup.ring;
        if self.poll.mode != PollMode::Interrupt {
            ring.disable_notification();
        }
        let slot_count = ring.slots().min(MAX_SLOTS_PER_QUEUE);
        let segments = ring.max_segments();
        setup.stats.set(QueueStat::Broken, 0);
        setup.stats.set(QueueStat::InFlight, 0);
        let queue = Box::new(QueueState {
            id,
            device: setup.device,
            mem: Arc::new(GuestMemory::new(Vec::new()).expect("an empty memory table")),
            retired_mem: Vec::new(),
            addrs: RingAddrs::default(),
            ring: QueueRing::Other(ring),
            kick: None,
            kick_armed: false,
            kick_cancel_sent: false,
            call: None,
            err: None,
            enabled: true,
            broken: false,
            stopping: None,
            slots: (0..slot_count).map(|_| Slot::new(segments)).collect(),
            free_slots: (0..slot_count as u32).rev().collect(),
            in_flight: 0,
            unpublished: false,
            stats: setup.stats,
            batch_finished: [0; CLASSES],
            guest_stats: None,
            inflight: None,
            inflight_counter: 0,
            batch: Vec::new(),
            dirty_log: None,
        });
        self.install(queue);
    }

    /// Puts a new queue in a free place and starts watching its kicks; returns its index.
    fn install(&mut self, queue: Box<QueueState>) -> usize {
        let qi = match self.queues.iter().position(Option::is_none) {
            Some(qi) => qi,
            None => {
                self.queues.push(None);
                self.queues.len() - 1
            }
        };
        assert!(qi < 1 << 16, "queue index must fit user_data");
        self.queues[qi] = Some(queue);
        self.arm_kick(qi);
        self.count_queues();
        qi
    }

    /// Starts again the requests a previous daemon took and did not complete, oldest first,
    /// before anything new is taken from the ring.
    fn resubmit(&mut self, qi: usize, heads: &[u16]) {
        let queue = self.queues[qi].as_deref_mut().expect("just attached");
        let mut sq = self.ring.submission();
        let now = self.clock.now();
        for &head in heads {
            let Some(slot) = queue.free_slots.pop() else {
                queue.mark_broken(Broken::InflightOverflow);
                return;
            };
            queue.in_flight += 1;
            queue.slots[slot as usize].start = now;
            if let Some(records) = &queue.inflight {
                records.mark_taken(head, queue.inflight_counter);
                queue.inflight_counter += 1;
            }
            self.ops_in_flight += start_request(queue, qi, slot, head, &mut sq, &self.completer);
        }
        queue.stats.set(QueueStat::InFlight, queue.in_flight as u64);
        queue
            .stats
            .peak(QueueStat::InFlightPeak, queue.in_flight as u64);
        if queue.batch_finished.iter().any(|&n| n > 0) {
            record_batch_latency(queue, self.clock.now().saturating_sub(now));
        }
    }

    fn count_queues(&mut self) {
        let count = self.queues.iter().flatten().count();
        self.stats.set(ReactorStat::Queues, count as u64);
    }

    /// Returns held stats buffers whose interval is up (the driver answers with statistics)
    /// and computes when the next one is due.
    fn ask_guests_for_stats(&mut self) {
        let now = self.clock.now();
        if now < self.guest_stats_due {
            return;
        }
        let mut due = u64::MAX;
        for queue in self.queues.iter_mut().flatten() {
            let Some(vq) = queue.guest_stats.as_deref_mut() else {
                continue;
            };
            // Only queues that run have a request due: a disabled or broken one would
            // otherwise keep the reactor from ever sleeping.
            if queue.stopping.is_none() && !queue.broken && queue.enabled {
                if let Some(head) = vq.request_if_due(now) {
                    queue.ring.split().push_used(head, 0);
                    queue.unpublished = true;
                }
                due = due.min(vq.due());
            }
        }
        self.guest_stats_due = due;
    }

    fn arm_kick(&mut self, qi: usize) {
        let queue = self.queues[qi].as_mut().unwrap();
        queue.kick_armed = true;
        let fd = queue.kick_fd();
        self.arm_poll(fd, TAG_KICK | qi as u64);
    }

    /// Takes up to a batch of new requests from queue `qi`; true if it took any.
    fn poll_queue(&mut self, qi: usize) -> bool {
        let Some(queue) = self.queues[qi].as_deref_mut() else {
            return false;
        };
        if !queue.takes_requests() {
            return false;
        }
        if queue.guest_stats.is_some() {
            let took = poll_guest_stats(queue, self.clock.now());
            if let Some(vq) = queue.guest_stats.as_deref() {
                self.guest_stats_due = self.guest_stats_due.min(vq.due());
            }
            return took;
        }
        let mut sq = self.ring.submission();
        let mut taken = 0;
        let mut batch_start = 0;
        while taken < AVAIL_BATCH && !queue.free_slots.is_empty() {
            if self.ops_in_flight + MAX_OPS_PER_REQUEST > CQ_ENTRIES as usize {
                break;
            }
            if sq.capacity() - sq.len() < MAX_OPS_PER_REQUEST {
                break;
            }
            let slot = *queue.free_slots.last().expect("checked non-empty");
            let popped = match &mut queue.ring {
                QueueRing::Virtio(ring) => ring.pop_avail().map(|head| head.map(Taken::Chain)),
                QueueRing::Other(ring) => ring
                    .pop(slot, &mut queue.slots[slot as usize].segs)
                    .map(|req| req.map(Taken::Request)),
            };
            let taken_now = match popped {
                Ok(Some(taken_now)) => taken_now,
                Ok(None) => break,
                Err(why) => {
                    queue.mark_broken(why);
                    break;
                }
            };
            if taken == 0 {
                batch_start = self.clock.now();
            }
            taken += 1;
            queue.free_slots.pop();
            queue.in_flight += 1;
            queue.slots[slot as usize].start = batch_start;
            self.ops_in_flight += match taken_now {
                Taken::Chain(head) => {
                    if let Some(records) = &queue.inflight {
                        records.mark_taken(head, queue.inflight_counter);
                        queue.inflight_counter += 1;
                    }
                    start_request(queue, qi, slot, head, &mut sq, &self.completer)
                }
                Taken::Request(req) => {
                    reset_slot(&mut queue.slots[slot as usize], 0);
                    run_request(queue, qi, slot, req, &mut sq, &self.completer)
                }
            };
        }
        if taken == 0 {
            queue.stats.add(QueueStat::PollsIdle, 1);
            return false;
        }
        queue.stats.add(QueueStat::PollsBusy, 1);
        queue.stats.set(QueueStat::InFlight, queue.in_flight as u64);
        queue
            .stats
            .peak(QueueStat::InFlightPeak, queue.in_flight as u64);
        if queue.batch_finished.iter().any(|&n| n > 0) {
            let latency = self.clock.now().saturating_sub(batch_start);
            record_batch_latency(queue, latency);
        }
        true
    }

    /// Copies completions out of the CQ and finishes them; true if there were any.
    fn reap(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut batch = [(0u64, 0i32); CQE_BATCH];
            let mut count = 0;
            for cqe in self.ring.completion().take(CQE_BATCH) {
                batch[count] = (cqe.user_data(), cqe.result());
                count += 1;
            }
            if count == 0 {
                return any;
            }
            any = true;
            let now = self.clock.now();
            for &(user_data, result) in &batch[..count] {
                self.complete(user_data, result, now);
            }
        }
    }

    fn complete(&mut self, user_data: u64, result: i32, now: u64) {
        match user_data & TAG_MASK {
            TAG_IO => {
                self.ops_in_flight -= 1;
                let (qi, slot) = decode_io(user_data);
                let queue = self.queues[qi].as_deref_mut().expect("I/O of a live queue");
                queue.device.backend().completed(user_data);
                complete_op(queue, slot, result, now);
            }
            TAG_KICK => {
                self.ops_in_flight -= 1;
                let qi = (user_data & 0xffff) as usize;
                let queue = self.queues[qi]
                    .as_deref_mut()
                    .expect("kick of a live queue");
                queue.kick_armed = false;
                // Clear the count so the next poll waits for a new kick. Only after POLLIN:
                // the fd may be blocking, and a read of a zero count would block the reactor.
                if result > 0 {
                    let kicks = queue.ack_kick();
                    queue.stats.add(QueueStat::Kicks, kicks);
                }
                if result >= 0 && queue.stopping.is_none() {
                    self.arm_kick(qi);
                } else if result < 0 && result != -libc::ECANCELED {
                    tracing::warn!(errno = -result, "kick eventfd poll failed");
                }
            }
            TAG_MAILBOX => {
                self.ops_in_flight -= 1;
                if result > 0 {
                    let _ = self.wake.read();
                }
                if result >= 0 && !self.shutting_down {
                    self.arm_wake();
                }
            }
            TAG_EXTERNAL => {
                self.ops_in_flight -= 1;
                if result > 0 {
                    let _ = self.external_wake.read();
                }
                if result >= 0 && !self.shutting_down {
                    self.arm_external();
                }
            }
            TAG_CANCEL => self.ops_in_flight -= 1,
            _ => unreachable!("unknown user_data {user_data:#x}"),
        }
    }

    fn publish_and_notify(&mut self) {
        for queue in self.queues.iter_mut().flatten() {
            if !queue.unpublished {
                continue;
            }
            queue.unpublished = false;
            queue.stats.set(QueueStat::InFlight, queue.in_flight as u64);
            let notify = match &mut queue.ring {
                QueueRing::Virtio(ring) => {
                    ring.publish_used();
                    if let Some(records) = &queue.inflight {
                        records.batch_published(&queue.batch, ring.next_used_idx());
                        queue.batch.clear();
                    }
                    match (ring.needs_notification(), &queue.call) {
                        (true, Some(call)) => {
                            let _ = call.write(1);
                            Some(QueueStat::NotificationsSent)
                        }
                        // No call fd yet: nothing to send, nothing suppressed.
                        (true, None) => None,
                        (false, _) => Some(QueueStat::NotificationsSuppressed),
                    }
                }
                QueueRing::Other(ring) => {
                    if ring.publish() {
                        ring.notify();
                        Some(QueueStat::NotificationsSent)
                    } else {
                        Some(QueueStat::NotificationsSuppressed)
                    }
                }
            };
            queue.log_used_ring();
            if let Some(stat) = notify {
                queue.stats.add(stat, 1);
            }
            if queue.in_flight == 0 {
                queue.retired_mem.clear();
            }
        }
    }

    /// Detaches stopping queues whose requests all completed.
    fn finish_stops(&mut self) {
        for qi in 0..self.queues.len() {
            let Some(queue) = self.queues[qi].as_deref_mut() else {
                continue;
            };
            if queue.stopping.is_none() || queue.in_flight > 0 {
                continue;
            }
            if queue.kick_armed {
                if !queue.kick_cancel_sent {
                    queue.kick_cancel_sent = true;
                    let cancel = opcode::AsyncCancel::new(TAG_KICK | qi as u64)
                        .build()
                        .user_data(TAG_CANCEL);
                    // SAFETY: AsyncCancel references no memory.
                    if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
                        self.ops_in_flight += 1;
                    } else {
                        queue.kick_cancel_sent = false;
                    }
                }
                continue;
            }
            let mut queue = self.queues[qi].take().unwrap();
            queue.stats.set(QueueStat::InFlight, 0);
            if let QueueRing::Virtio(ring) = &mut queue.ring {
                tracing::debug!(disk = %queue.device.options().name,
                    last_avail = ring.last_avail_idx(), next_used = ring.next_used_idx(),
                    used_in_ring = ring.used_idx_in_ring(), "vring drained");
            }
            let _ = queue
                .stopping
                .as_ref()
                .unwrap()
                .send(queue.ring.resume_index());
            self.count_queues();
        }
    }
}

/// Operations a request started: on the reactor's io_uring, and deferred to other threads.
#[derive(Clone, Copy, Default)]
struct Ops {
    uring: usize,
    deferred: usize,
}

impl Ops {
    fn total(self) -> usize {
        self.uring + self.deferred
    }
}

impl std::ops::AddAssign for Ops {
    fn add_assign(&mut self, other: Ops) {
        self.uring += other.uring;
        self.deferred += other.deferred;
    }
}

/// Takes the buffers the driver posted on a stats virtqueue; true if there were any.
fn poll_guest_stats(queue: &mut QueueState, now: u64) -> bool {
    let QueueState {
        ring,
        mem,
        guest_stats,
        ..
    } = queue;
    let vq = guest_stats.as_deref_mut().expect("a stats virtqueue");
    let ring = ring.split();
    let mut took = false;
    let mut broken = None;
    for _ in 0..AVAIL_BATCH {
        let head = match ring.pop_avail() {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(why) => {
                broken = Some(why);
                break;
            }
        };
        took = true;
        if let Err(why) = ring.walk_chain(mem, head, &mut vq.segs) {
            broken = Some(why);
            break;
        }
        if let Some(extra) = vq.accept(head, now) {
            ring.push_used(extra, 0);
            queue.unpublished = true;
        }
    }
    if let Some(why) = broken {
        queue.mark_broken(why);
    }
    queue.stats.add(
        if took {
            QueueStat::PollsBusy
        } else {
            QueueStat::PollsIdle
        },
        1,
    );
    took
}

/// (queue index, slot) of a TAG_IO user_data.
fn decode_io(user_data: u64) -> (usize, u32) {
    (
        ((user_data >> 32) & 0xffff) as usize,
        (user_data & 0xffff_ffff) as u32,
    )
}

/// What a poll took from a ring.
enum Taken {
    /// The head of a virtqueue's descriptor chain.
    Chain(u16),
    /// A request another ring decoded into the slot (or the status it fails with).
    Request(Result<blk::Request, u8>),
}

/// Readies a slot for a new request.
fn reset_slot(slot: &mut Slot, head: u16) {
    slot.head = head;
    slot.status = status::OK;
    slot.status_ptr = std::ptr::null_mut();
    slot.used_len = 0;
    slot.ops_pending = 0;
    slot.bounce = None;
    slot.is_read = false;
    slot.expected = 0;
    slot.data = 0..0;
    slot.preflush = false;
    slot.class = Class::Other;
    slot.sectors = 0;
}

/// Starts the request at `head` in `slot`; returns how many io_uring operations it queued.
fn start_request(
    queue: &mut QueueState,
    qi: usize,
    slot_index: u32,
    head: u16,
    sq: &mut squeue::SubmissionQueue<'_>,
    completer: &Completer,
) -> usize {
    let slot = &mut queue.slots[slot_index as usize];
    reset_slot(slot, head);
    if let Err(why) = queue
        .ring
        .split()
        .walk_chain(&queue.mem, head, &mut slot.segs)
    {
        // The head is taken but the ring is not trustworthy: stop the queue here.
        queue.mark_broken(why);
        queue.in_flight -= 1;
        queue.free_slots.push(slot_index);
        return 0;
    }
    let Some(status_ptr) = blk::locate_status(&mut slot.segs) else {
        // Nowhere to report an error: return the chain with nothing written (counted as an
        // I/O error).
        slot.status_ptr = std::ptr::null_mut();
        slot.used_len = 0;
        slot.status = status::IOERR;
        finish(queue, slot_index, IN_BATCH);
        return 0;
    };
    slot.status_ptr = status_ptr;
    slot.used_len = 1;
    let parsed = blk::parse(&mut slot.segs).map_err(|why| {
        tracing::debug!(disk = %queue.device.options().name, ?why, "malformed request");
        status::IOERR
    });
    run_request(queue, qi, slot_index, parsed, sq, completer)
}

/// Runs a decoded request (or fails it with the status it was refused with); returns how
/// many io_uring operations it queued.
fn run_request(
    queue: &mut QueueState,
    qi: usize,
    slot_index: u32,
    parsed: Result<blk::Request, u8>,
    sq: &mut squeue::SubmissionQueue<'_>,
    completer: &Completer,
) -> usize {
    let device = &*queue.device;
    let slot = &mut queue.slots[slot_index as usize];
    let user_data = TAG_IO | (qi as u64) << 32 | u64::from(slot_index);
    let result = parsed.and_then(|req| dispatch(device, slot, &req, user_data, sq, completer));
    match result {
        Ok(ops) if ops.total() > 0 => {
            slot.ops_pending = ops.total() as u32;
            ops.uring
        }
        Ok(_) => {
            finish(queue, slot_index, IN_BATCH);
            0
        }
        Err(code) => {
            queue.slots[slot_index as usize].status = code;
            finish(queue, slot_index, IN_BATCH);
            0
        }
    }
}

/// Validates a parsed request and starts its operations; Ok(ops) = operations started (none
/// means it already finished successfully), Err(status) = it failed before any I/O.
fn dispatch(
    device: &BlkDevice,
    slot: &mut Slot,
    req: &blk::Request,
    user_data: u64,
    sq: &mut squeue::SubmissionQueue<'_>,
    completer: &Completer,
) -> Result<Ops, u8> {
    tracing::trace!(kind = ?req.kind, sector = req.sector, len = req.data_len, "request");
    let info = device.backend().info();
    let block_size = u64::from(device.options().block_size);
    let range_ok = |sector: u64, len: u64| {
        let offset = sector.checked_mul(blk::SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= info.size_bytes && offset % block_size == 0 && len.is_multiple_of(block_size))
            .then_some(offset)
    };
    let op = match req.kind {
        RequestKind::In | RequestKind::Out => {
            let is_read = req.kind == RequestKind::In;
            slot.class = if is_read { Class::Read } else { Class::Write };
            if !is_read && device.options().readonly {
                return Err(status::IOERR);
            }
            if req.data_len > MAX_REQUEST_BYTES {
                return Err(status::IOERR);
            }
            let offset = range_ok(req.sector, req.data_len).ok_or(status::IOERR)?;
            slot.sectors = req.data_len / blk::SECTOR_SIZE;
            if req.data_len == 0 {
                return Ok(Ops::default());
            }
            slot.is_read = is_read;
            slot.data = req.data.clone();
            slot.expected = req.data_len;
            if is_read {
                slot.used_len = 1 + req.data_len as u32;
            }
            let data = &slot.segs.iovecs()[req.data.clone()];
            let (iov, iov_count) = if needs_bounce(data, info.dio_alignment) {
                let bounce = BounceBuf::new(req.data_len as usize, info.dio_alignment as usize);
                if !is_read {
                    // SAFETY: the bounce buffer holds data_len bytes.
                    let buf = unsafe {
                        std::slice::from_raw_parts_mut(bounce.ptr, req.data_len as usize)
                    };
                    blk::copy_from_iovecs(data, buf);
                }
                slot.bounce_iov = libc::iovec {
                    iov_base: bounce.ptr.cast(),
                    iov_len: req.data_len as usize,
                };
                slot.bounce = Some(bounce);
                (&slot.bounce_iov as *const libc::iovec, 1)
            } else {
                (data.as_ptr(), data.len() as u32)
            };
            if is_read {
                IoOp::Read {
                    offset,
                    iov,
                    iov_count,
                }
            } else {
                IoOp::Write {
                    offset,
                    iov,
                    iov_count,
                    fua: req.fua || device.write_through(),
                }
            }
        }
        RequestKind::Flush => {
            slot.class = Class::Flush;
            IoOp::Flush { before_next: false }
        }
        RequestKind::GetId => {
            let data = &slot.segs.iovecs()[req.data.clone()];
            let written = blk::copy_to_iovecs(data, device.serial());
            slot.used_len = 1 + written as u32;
            return Ok(Ops::default());
        }
        RequestKind::Discard | RequestKind::WriteZeroes | RequestKind::Provision => {
            return dispatch_dwz(device, slot, req, user_data, sq, completer);
        }
        RequestKind::Unsupported(_) => return Err(status::UNSUPP),
    };
    // A preflushed write (req.fua: blkif's FLUSH_DISKCACHE with data): every write completed
    // before it is made durable first, then this one is written through.
    let mut ops = Ops::default();
    if let IoOp::Write { fua: true, .. } = op {
        if req.fua {
            slot.preflush = true;
            let flush = IoOp::Flush { before_next: true };
            ops += submit_op(device, &flush, user_data, sq, completer, slot);
        }
    }
    ops += submit_op(device, &op, user_data, sq, completer, slot);
    Ok(ops)
}

/// Discard and write-zeroes: every segment is checked before any is started.
fn dispatch_dwz(
    device: &BlkDevice,
    slot: &mut Slot,
    req: &blk::Request,
    user_data: u64,
    sq: &mut squeue::SubmissionQueue<'_>,
    completer: &Completer,
) -> Result<Ops, u8> {
    let is_discard = req.kind == RequestKind::Discard;
    let is_provision = req.kind == RequestKind::Provision;
    slot.class = match req.kind {
        RequestKind::Discard => Class::Discard,
        RequestKind::Provision => Class::Provision,
        _ => Class::WriteZeroes,
    };
    if device.options().readonly {
        return Err(status::IOERR);
    }
    let supported = if is_provision {
        device.provisions()
    } else {
        device.backend().info().discard
    };
    if !supported {
        return Err(status::UNSUPP);
    }
    let count = req.data_len as usize / blk::DWZ_SEGMENT_SIZE;
    if !(req.data_len as usize).is_multiple_of(blk::DWZ_SEGMENT_SIZE) || count == 0 {
        return Err(status::IOERR);
    }
    if count > blk::MAX_DWZ_SEG as usize {
        return Err(status::UNSUPP);
    }
    let mut raw = [0u8; blk::MAX_DWZ_SEG as usize * blk::DWZ_SEGMENT_SIZE];
    let raw = &mut raw[..req.data_len as usize];
    blk::copy_from_iovecs(&slot.segs.iovecs()[req.data.clone()], raw);
    let info = device.backend().info();
    let block_size = u64::from(device.options().block_size);
    for i in 0..count {
        let seg = DwzSegment::decode(raw, i);
        let allowed_flags = if is_discard || is_provision {
            0
        } else {
            blk::WRITE_ZEROES_FLAG_UNMAP
        };
        // virtio 1.3, 5.2.6.2: unknown flags, or unmap on a discard (or, by seed 004, on a
        // provision), get UNSUPP.
        if seg.flags & !allowed_flags != 0 {
            return Err(status::UNSUPP);
        }
        let len = u64::from(seg.num_sectors) * blk::SECTOR_SIZE;
        let offset = seg
            .sector
            .checked_mul(blk::SECTOR_SIZE)
            .ok_or(status::IOERR)?;
        let end = offset.checked_add(len).ok_or(status::IOERR)?;
        if seg.num_sectors > blk::MAX_DWZ_SECTORS
            || end > info.size_bytes
            || offset % block_size != 0
            || !len.is_multiple_of(block_size)
        {
            return Err(status::IOERR);
        }
    }
    let mut ops = Ops::default();
    for i in 0..count {
        let seg = DwzSegment::decode(raw, i);
        if seg.num_sectors == 0 {
            continue;
        }
        let offset = seg.sector * blk::SECTOR_SIZE;
        let len = u64::from(seg.num_sectors) * blk::SECTOR_SIZE;
        slot.sectors += u64::from(seg.num_sectors);
        let op = if is_discard {
            IoOp::Discard { offset, len }
        } else if is_provision {
            IoOp::Provision { offset, len }
        } else {
            IoOp::WriteZeroes {
                offset,
                len,
                unmap: seg.flags & blk::WRITE_ZEROES_FLAG_UNMAP != 0,
            }
        };
        ops += submit_op(device, &op, user_data, sq, completer, slot);
    }
    Ok(ops)
}

/// Hands one operation to the backend; an operation finished on the spot records its result.
fn submit_op(
    device: &BlkDevice,
    op: &IoOp,
    user_data: u64,
    sq: &mut squeue::SubmissionQueue<'_>,
    completer: &Completer,
    slot: &mut Slot,
) -> Ops {
    match device.backend().submit(op, user_data, sq, completer) {
        Submitted::Queued => Ops {
            uring: 1,
            deferred: 0,
        },
        Submitted::Deferred => Ops {
            uring: 0,
            deferred: 1,
        },
        Submitted::Done(result) => {
            record_result(slot, result);
            Ops::default()
        }
    }
}

/// Whether O_DIRECT would refuse these buffers; empty ones carry nothing and do not count.
fn needs_bounce(iov: &[libc::iovec], alignment: u32) -> bool {
    let mask = alignment as usize - 1;
    alignment > 1
        && iov
            .iter()
            .any(|v| v.iov_len != 0 && ((v.iov_base as usize) & mask != 0 || v.iov_len & mask != 0))
}

fn record_result(slot: &mut Slot, result: i32) {
    // A write returns its byte count (never 0: it carries data), its preflush 0, in any
    // order on backends that complete on other threads.
    if result == 0 && slot.preflush {
        slot.preflush = false;
        return;
    }
    let failed =
        result < 0 || ((slot.is_read || slot.expected > 0) && result as u64 != slot.expected);
    if failed && slot.status == status::OK {
        if result < 0 {
            tracing::debug!(errno = -result, "backend operation failed");
        }
        slot.status = status::IOERR;
    }
}

fn complete_op(queue: &mut QueueState, slot_index: u32, result: i32, now: u64) {
    let slot = &mut queue.slots[slot_index as usize];
    assert!(slot.ops_pending > 0, "completion of an idle slot");
    record_result(slot, result);
    slot.ops_pending -= 1;
    if slot.ops_pending == 0 {
        finish(queue, slot_index, now);
    }
}

/// `finish`'s time for a request that ends within the avail batch that took it: its latency
/// is the batch's, recorded by `record_batch_latency`.
const IN_BATCH: u64 = u64::MAX;

/// Counts a finished request: its class's ops, sectors (when it succeeded) and latency
/// (`end` = clock time of the completion, or IN_BATCH), and errors by status.
fn count_request(queue: &mut QueueState, slot_index: u32, end: u64) {
    let slot = &queue.slots[slot_index as usize];
    let class = CLASS_STATS[slot.class as usize];
    let stats = &queue.stats;
    stats.add(class.ops, 1);
    match slot.status {
        status::OK => {
            if let Some(sectors) = class.sectors {
                stats.add(sectors, slot.sectors);
            }
        }
        status::UNSUPP => stats.add(QueueStat::ErrorsUnsupp, 1),
        _ => stats.add(QueueStat::ErrorsIoerr, 1),
    }
    if end == IN_BATCH {
        queue.batch_finished[slot.class as usize] += 1;
    } else {
        let latency = end.saturating_sub(slot.start);
        stats.add(class.nanos, latency);
        stats.log_hist(class.hist, latency, 1);
    }
}

/// Records the latency of the requests that finished within the avail batch that took them.
fn record_batch_latency(queue: &mut QueueState, latency: u64) {
    for (class, count) in queue.batch_finished.iter_mut().enumerate() {
        if *count > 0 {
            let stats = CLASS_STATS[class];
            queue.stats.add(stats.nanos, latency * u64::from(*count));
            queue.stats.log_hist(stats.hist, latency, u64::from(*count));
            *count = 0;
        }
    }
}

/// The one place a request ends: data copied back, status byte written last, used entry
/// pushed, slot freed, counted.
fn finish(queue: &mut QueueState, slot_index: u32, end: u64) {
    count_request(queue, slot_index, end);
    let slot = &mut queue.slots[slot_index as usize];
    if let Some(bounce) = slot.bounce.take() {
        queue.stats.add(QueueStat::BounceBuffers, 1);
        if slot.is_read && slot.status == status::OK {
            // SAFETY: the bounce buffer holds `expected` bytes, filled by the read.
            let buf = unsafe { std::slice::from_raw_parts(bounce.ptr, slot.expected as usize) };
            blk::copy_to_iovecs(&slot.segs.iovecs()[slot.data.clone()], buf);
        }
    }
    let used_len = if slot.status_ptr.is_null() {
        0
    } else {
        // SAFETY: status_ptr was translated into guest memory kept mapped by queue.mem (or a
        // retired snapshot held while requests are in flight).
        unsafe { std::ptr::write_volatile(slot.status_ptr, slot.status) };
        if slot.status == status::OK {
            slot.used_len
        } else {
            1
        }
    };
    let head = slot.head;
    if queue.dirty_log.is_some() {
        let slot = &queue.slots[slot_index as usize];
        queue.log_writes(&slot.segs, slot.status_ptr);
    }
    match &mut queue.ring {
        QueueRing::Virtio(ring) => {
            ring.push_used(head, used_len);
            if let Some(records) = &queue.inflight {
                records.add_to_batch(head);
                queue.batch.push(head);
            }
        }
        QueueRing::Other(ring) => ring.respond(slot_index, queue.slots[slot_index as usize].status),
    }
    queue.unpublished = true;
    queue.in_flight -= 1;
    queue.free_slots.push(slot_index);
}
