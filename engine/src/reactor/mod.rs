//! Per-core polled reactors: each one a thread pinned to a core that owns its queues end to
//! end and its own io_uring (SPDK's reactor, with io_uring instead of a poll group).
//!
//! The reactor is the loop and nothing else: it knows [`PolledQueue`]s to poll, completions
//! to route back to them, kick descriptors and timers to sleep on, and its mailbox. What a
//! queue carries (virtqueues, blkif rings) and what a request means are the queues' business
//! (`queue`, `ring`, `request`, `volume`, `virtio`).
//!
//! One iteration: take control messages (bounded batch), poll every queue (each takes a
//! bounded batch and starts its requests on this reactor's io_uring), enter the kernel at most
//! once (only if there is something to submit or task work to run), reap completions and
//! route each to its queue, let every queue publish its answers once.
//!
//! Adaptive polling: while there is work the reactor busy-polls with kicks suppressed; after
//! `idle` without work it re-enables kicks, re-checks every queue (work that arrived in
//! between is not lost), and sleeps in one `io_uring_enter` that returns on a kick (a poll on
//! the kick descriptor, armed per queue), a control message (the mailbox eventfd), an I/O
//! completion, or the earliest queue deadline (a timer: a held request's retry, a stats
//! virtqueue's interval).
//!
//! Idle queues cost nothing (SPDK's interrupt mode, per queue rather than per reactor): a
//! queue that found no work in PARK_AFTER_IDLE_POLLS polls in a row, with nothing in flight
//! and no timer, asks for kicks and leaves the list of polled queues; its kick brings it back.
//! When the whole reactor goes to sleep, every such queue is parked at once. An iteration
//! visits only the polled queues, so one busy disk among a thousand idle ones is served as if
//! it were alone. (Poll mode parks nothing: it trades a core for latency.)
//!
//! Per request nothing is allocated, nothing is locked, and no system call is made except the
//! per-iteration enter and, when the peer wants it, a notification.
//!
//! Starting reactors and talking to them (handles, messages, poll modes) is `control`.

use crate::backend::Completer;
use crate::clock::Clock;
use crate::queue::{IoCtx, PolledQueue, AVAIL_BATCH, SHARED_BATCH};
use crate::request::MAX_OPS_PER_REQUEST;
use crate::stats::sets::ReactorStat;
use crate::stats::Stats;
use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// SQ entries per reactor ring.
const SQ_ENTRIES: u32 = 1024;
/// CQ entries per reactor ring; in-flight operations are kept below this (no overflow).
const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;
/// Completions copied out of the CQ per pass.
const CQE_BATCH: usize = 256;
/// Control messages handled per iteration.
const MAILBOX_BATCH: usize = 16;
/// Polls without work after which a queue is parked on its kick. A busy reactor iterates in
/// well under a microsecond per polled queue, so this is tens to hundreds of microseconds:
/// long enough that a queue at moderate rates stays polled (no kicks for its driver), short
/// enough that idle ones leave the loop quickly.
const PARK_AFTER_IDLE_POLLS: u32 = 256;

/// user_data tags (top 4 bits). A TAG_IO user_data is TAG | queue index << 32 | slot; bits
/// 48..60 belong to the backend (see `Backend::completed`).
const TAG_IO: u64 = 1 << 60;
const TAG_KICK: u64 = 2 << 60;
const TAG_MAILBOX: u64 = 3 << 60;
const TAG_CANCEL: u64 = 4 << 60;
const TAG_EXTERNAL: u64 = 5 << 60;
const TAG_MASK: u64 = 0xf << 60;

const _: () = assert!(MAX_OPS_PER_REQUEST * 2 < SQ_ENTRIES as usize);

mod control;

pub use control::{PollConfig, PollMode, QueueId, ReactorHandle, Reactors, StopError};

use control::Msg;
/// A queue as its reactor holds it: the queue, and the reactor's own bookkeeping of it.
struct Entry {
    id: QueueId,
    queue: Box<dyn PolledQueue>,
    kick_armed: bool,
    kick_cancel_sent: bool,
    /// Set once a stop was asked: where to send the resume index when it is drained.
    stopping: Option<Sender<u16>>,
    /// In the list of polled queues (else parked on its kick).
    polled: bool,
    /// Polls in a row that found no work.
    idle_polls: u32,
}

impl Entry {
    /// Whether the queue may leave the polled list: idle long enough, nothing in flight
    /// (no completion will come for it), no timer, not stopping.
    fn parkable(&self) -> bool {
        self.idle_polls >= PARK_AFTER_IDLE_POLLS
            && self.stopping.is_none()
            && self.queue.in_flight() == 0
            && self.queue.deadline() == u64::MAX
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
    queues: Vec<Option<Entry>>,
    /// Indexes of the queues polled every iteration (the others are parked on their kick).
    polled: Vec<usize>,
    /// Queues attached (live entries of `queues`).
    live: usize,
    /// Queues asked to stop and not detached yet (finish_stops has nothing to do at 0).
    stopping: usize,
    /// io_uring operations submitted and not completed (CQ overflow guard).
    ops_in_flight: usize,
    poll: PollConfig,
    shutting_down: bool,
    stats: Stats<ReactorStat>,
    clock: Clock,
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
            polled: Vec::new(),
            live: 0,
            stopping: 0,
            ops_in_flight: 0,
            poll,
            shutting_down: false,
            stats,
            clock: Clock::get(),
        };
        reactor.arm_poll(reactor.wake.as_raw_fd(), TAG_MAILBOX);
        reactor.arm_poll(reactor.external_wake.as_raw_fd(), TAG_EXTERNAL);
        Ok(reactor)
    }

    /// Arms a one-shot poll for readability of a descriptor (kick, mailbox, external).
    ///
    /// A poll rather than a read: front ends hand over O_NONBLOCK eventfds, and io_uring may
    /// answer a read of one with -EAGAIN instead of waiting. A poll holds no buffer either, so
    /// the kernel never writes into memory of ours after the fact. The CQE's handler drains the
    /// descriptor (only on this wake-up path) and arms the poll again.
    fn arm_poll(&mut self, fd: i32, user_data: u64) {
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(user_data);
        if self.ring.submission().is_full() {
            self.enter(false, u64::MAX);
        }
        // SAFETY: a poll references no memory of ours.
        unsafe { self.ring.submission().push(&poll) }.expect("SQ has room after a submit");
        self.ops_in_flight += 1;
    }

    fn run(&mut self) {
        let mut idle_since = Instant::now();
        loop {
            let mut busy = self.handle_mailbox();
            if self.shutting_down && self.live == 0 {
                break;
            }
            busy |= self.poll_queues();
            self.enter(false, u64::MAX);
            busy |= self.reap();
            busy |= self.reap_external();
            // Only polled queues have anything to publish: a parked one has nothing in flight.
            for &qi in &self.polled {
                self.queues[qi]
                    .as_mut()
                    .expect("polled queues are live")
                    .queue
                    .publish();
            }
            self.finish_stops();
            self.stats
                .set(ReactorStat::UringOpsInFlight, self.ops_in_flight as u64);
            if busy {
                self.stats.add(ReactorStat::IterationsBusy, 1);
                idle_since = Instant::now();
            } else {
                self.stats.add(ReactorStat::IterationsIdle, 1);
                if self.poll.should_sleep(idle_since.elapsed(), self.live > 0) {
                    self.sleep();
                    idle_since = Instant::now();
                }
            }
        }
        // The mailbox poll still armed references no memory: dropping the ring cancels it.
    }

    /// Polls every polled queue once, parking the ones idle long enough; true if any took or
    /// moved work.
    fn poll_queues(&mut self) -> bool {
        let mut busy = false;
        let mut i = 0;
        let batch = if self.polled.len() > 1 {
            SHARED_BATCH
        } else {
            AVAIL_BATCH
        };
        while i < self.polled.len() {
            let qi = self.polled[i];
            let entry = self.queues[qi].as_mut().expect("polled queues are live");
            let mut io = IoCtx::new(
                self.ring.submission(),
                &self.completer,
                &mut self.ops_in_flight,
                CQ_ENTRIES as usize,
                TAG_IO | (qi as u64) << 32,
                &self.clock,
            )
            .with_batch(batch);
            let moved = entry.queue.poll(&mut io);
            busy |= moved;
            entry.idle_polls = if moved { 0 } else { entry.idle_polls + 1 };
            if self.poll.mode != PollMode::Poll && entry.parkable() && Self::park(entry) {
                self.polled.swap_remove(i);
                self.stats.add(ReactorStat::QueueParks, 1);
                self.stats
                    .set(ReactorStat::QueuesPolled, self.polled.len() as u64);
                continue;
            }
            i += 1;
        }
        busy
    }

    /// Asks an idle queue's peer for kicks; true if it may be parked (false: work arrived
    /// in the meantime, and it stays polled).
    fn park(entry: &mut Entry) -> bool {
        // A parked queue is not published: what it answered goes out now.
        entry.queue.publish();
        if entry.queue.enable_notification() {
            entry.queue.disable_notification();
            entry.idle_polls = 0;
            return false;
        }
        entry.polled = false;
        true
    }

    /// Parks every polled queue with nothing in flight, no timer and no stop pending (their
    /// peers were just asked for kicks).
    fn park_idle(&mut self) {
        let queues = &mut self.queues;
        let before = self.polled.len();
        self.polled.retain(|&qi| {
            let entry = queues[qi].as_mut().expect("polled queues are live");
            let idle = entry.stopping.is_none()
                && entry.queue.in_flight() == 0
                && entry.queue.deadline() == u64::MAX;
            entry.polled = !idle;
            !idle
        });
        let parked = before - self.polled.len();
        if parked > 0 {
            self.stats.add(ReactorStat::QueueParks, parked as u64);
            self.stats
                .set(ReactorStat::QueuesPolled, self.polled.len() as u64);
        }
    }

    /// Puts queue `qi` back in the polled list (its kick came, or a message for it).
    fn unpark(&mut self, qi: usize) {
        let entry = self.queues[qi].as_mut().expect("a live queue");
        entry.idle_polls = 0;
        if entry.polled {
            return;
        }
        entry.polled = true;
        if self.poll.mode != PollMode::Interrupt {
            entry.queue.disable_notification();
        }
        self.polled.push(qi);
        self.stats
            .set(ReactorStat::QueuesPolled, self.polled.len() as u64);
    }

    /// Submits queued SQEs and runs deferred task work, without a syscall when neither. With
    /// `wait`, sleeps until a completion or until clock time `deadline`.
    fn enter(&mut self, wait: bool, deadline: u64) {
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
        } else if deadline != u64::MAX {
            let wait_ns = deadline.saturating_sub(self.clock.now()).max(1);
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

    /// Re-enables kicks, re-checks the queues, then sleeps until a kick, message, CQE or the
    /// earliest queue deadline.
    fn sleep(&mut self) {
        let mut pending = false;
        let mut deadline = u64::MAX;
        // Parked queues asked for kicks already, and have no timer.
        for &qi in &self.polled {
            let entry = self.queues[qi].as_mut().expect("polled queues are live");
            if entry.stopping.is_none() {
                pending |= entry.queue.enable_notification();
            }
            deadline = deadline.min(entry.queue.deadline());
        }
        if !pending && self.rx.is_empty() && self.external_rx.is_empty() {
            // Every queue asked for kicks and found nothing: the idle ones stay parked after
            // the wake-up, which only the kicked ones (and their reactor) pay for.
            self.park_idle();
            self.stats.add(ReactorStat::Sleeps, 1);
            self.enter(true, deadline);
        }
        // Interrupt mode keeps kicks on: the next sleep re-arms them anyway.
        if self.poll.mode == PollMode::Interrupt {
            return;
        }
        for &qi in &self.polled {
            let entry = self.queues[qi].as_mut().expect("polled queues are live");
            if entry.stopping.is_none() {
                entry.queue.disable_notification();
            }
        }
    }

    fn handle_mailbox(&mut self) -> bool {
        let mut handled = false;
        for _ in 0..MAILBOX_BATCH {
            let Ok(msg) = self.rx.try_recv() else { break };
            handled = true;
            match msg {
                Msg::Attach(id, queue) => self.install(id, queue),
                Msg::Stop(id, reply) => match self.find(id) {
                    Some(qi) => {
                        // Polled until it is drained and detached.
                        self.unpark(qi);
                        let entry = self.queues[qi].as_mut().expect("found");
                        entry.queue.stop();
                        if entry.stopping.replace(reply).is_none() {
                            self.stopping += 1;
                        }
                    }
                    None => {
                        let _ = reply.send(0);
                    }
                },
                Msg::Apply(id, change) => match self.find(id) {
                    Some(qi) => {
                        // A changed queue (enabled, new memory) looks at its ring again.
                        self.unpark(qi);
                        let entry = self.queues[qi].as_mut().expect("found");
                        change(Some(&mut *entry.queue));
                    }
                    None => change(None),
                },
                Msg::Shutdown => {
                    self.shutting_down = true;
                    for qi in 0..self.queues.len() {
                        if self.queues[qi].is_none() {
                            continue;
                        }
                        self.unpark(qi);
                        let entry = self.queues[qi].as_mut().expect("checked");
                        if entry.stopping.is_none() {
                            entry.queue.stop();
                            let (tx, _) = crossbeam_channel::bounded(1);
                            entry.stopping = Some(tx);
                            self.stopping += 1;
                        }
                    }
                }
            }
        }
        handled
    }

    /// The index of queue `id` (control messages only: a scan of this reactor's queues).
    fn find(&self, id: QueueId) -> Option<usize> {
        self.queues
            .iter()
            .position(|entry| entry.as_ref().is_some_and(|e| e.id == id))
    }

    /// Puts a new queue in a free place and starts watching its kicks.
    fn install(&mut self, id: QueueId, mut queue: Box<dyn PolledQueue>) {
        if self.poll.mode != PollMode::Interrupt {
            // The reactor polls this queue from now on: kicks would only cost the peer.
            queue.disable_notification();
        }
        let qi = match self.queues.iter().position(Option::is_none) {
            Some(qi) => qi,
            None => {
                self.queues.push(None);
                self.queues.len() - 1
            }
        };
        assert!(qi < 1 << 16, "queue index must fit user_data");
        self.queues[qi] = Some(Entry {
            id,
            queue,
            kick_armed: false,
            kick_cancel_sent: false,
            stopping: None,
            polled: true,
            idle_polls: 0,
        });
        self.polled.push(qi);
        self.live += 1;
        self.arm_kick(qi);
        self.count_queues();
    }

    fn count_queues(&mut self) {
        self.stats.set(ReactorStat::Queues, self.live as u64);
        self.stats
            .set(ReactorStat::QueuesPolled, self.polled.len() as u64);
    }

    fn arm_kick(&mut self, qi: usize) {
        let entry = self.queues[qi].as_mut().expect("a live queue");
        entry.kick_armed = true;
        let fd = entry.queue.kick_fd();
        self.arm_poll(fd, TAG_KICK | qi as u64);
    }

    /// Copies completions out of the CQ and routes them; true if there were any.
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
                self.ops_in_flight -= 1;
                self.route(user_data, result, now);
            }
        }
    }

    /// Routes operations completed on other threads to their queues; true if there were any.
    fn reap_external(&mut self) -> bool {
        let mut now = None;
        while let Ok((user_data, result)) = self.external_rx.try_recv() {
            let now = *now.get_or_insert_with(|| self.clock.now());
            let (qi, slot) = decode_io(user_data);
            let entry = self.queues[qi]
                .as_mut()
                .expect("deferred I/O of a live queue");
            entry.queue.complete(slot, result, now, None);
        }
        now.is_some()
    }

    /// Handles one CQE of the reactor's io_uring.
    fn route(&mut self, user_data: u64, result: i32, now: u64) {
        match user_data & TAG_MASK {
            TAG_IO => {
                let (qi, slot) = decode_io(user_data);
                let entry = self.queues[qi].as_mut().expect("I/O of a live queue");
                entry.queue.complete(slot, result, now, Some(user_data));
            }
            TAG_KICK => self.kicked((user_data & 0xffff) as usize, result),
            TAG_MAILBOX => {
                if result > 0 {
                    let _ = self.wake.read();
                }
                if result >= 0 && !self.shutting_down {
                    self.arm_poll(self.wake.as_raw_fd(), TAG_MAILBOX);
                }
            }
            TAG_EXTERNAL => {
                if result > 0 {
                    let _ = self.external_wake.read();
                }
                if result >= 0 && !self.shutting_down {
                    self.arm_poll(self.external_wake.as_raw_fd(), TAG_EXTERNAL);
                }
            }
            TAG_CANCEL => {}
            _ => unreachable!("unknown user_data {user_data:#x}"),
        }
    }

    /// A queue's kick poll completed: consume the kicks and watch for the next.
    fn kicked(&mut self, qi: usize, result: i32) {
        let entry = self.queues[qi].as_mut().expect("kick of a live queue");
        entry.kick_armed = false;
        // Clear the count so the next poll waits for a new kick. Only after POLLIN: the fd may
        // be blocking, and a read of a zero count would block the reactor.
        if result > 0 {
            entry.queue.ack_kick();
        }
        if result >= 0 && entry.stopping.is_none() {
            self.arm_kick(qi);
            self.unpark(qi);
        } else if result < 0 && result != -libc::ECANCELED {
            tracing::warn!(errno = -result, "kick poll failed");
        }
    }

    /// Detaches stopping queues whose requests all completed (stopping queues are polled).
    fn finish_stops(&mut self) {
        if self.stopping == 0 {
            return;
        }
        let mut i = 0;
        while i < self.polled.len() {
            let qi = self.polled[i];
            if self.finish_stop(qi) {
                self.polled.swap_remove(i);
                self.live -= 1;
                self.stopping -= 1;
                self.count_queues();
            } else {
                i += 1;
            }
        }
    }

    /// Detaches queue `qi` if it is stopping and drained; true if it did.
    fn finish_stop(&mut self, qi: usize) -> bool {
        let entry = self.queues[qi].as_mut().expect("polled queues are live");
        if entry.stopping.is_none() || entry.queue.in_flight() > 0 {
            return false;
        }
        if entry.kick_armed {
            if !entry.kick_cancel_sent {
                entry.kick_cancel_sent = true;
                let cancel = opcode::AsyncCancel::new(TAG_KICK | qi as u64)
                    .build()
                    .user_data(TAG_CANCEL);
                // SAFETY: AsyncCancel references no memory.
                if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
                    self.ops_in_flight += 1;
                } else {
                    entry.kick_cancel_sent = false;
                }
            }
            return false;
        }
        let mut entry = self.queues[qi].take().expect("checked above");
        let resume_at = entry.queue.detach();
        let _ = entry
            .stopping
            .take()
            .expect("checked above")
            .send(resume_at);
        true
    }
}

/// (queue index, slot) of a TAG_IO user_data.
fn decode_io(user_data: u64) -> (usize, u32) {
    (
        ((user_data >> 32) & 0xffff) as usize,
        (user_data & 0xffff_ffff) as u32,
    )
}
