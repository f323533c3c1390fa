//! How the rest of the daemon reaches the reactors: starting them (one thread per core),
//! their poll mode, queue ids, and the control messages a `ReactorHandle` sends to a reactor's
//! mailbox (attach, stop, apply a transport's change, shut down). The loop that receives them
//! is `super` (reactor/mod.rs).

use super::Reactor;
use crate::queue::PolledQueue;
use crate::stats::sets::ReactorStat;
use crate::stats::{Stats, StatsDir};
use crossbeam_channel::{Receiver, Sender};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

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
    pub(super) fn should_sleep(&self, idle_for: Duration, has_queues: bool) -> bool {
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

/// A change a transport makes to one of its queues, run on the queue's reactor between
/// iterations (None: the queue is not on that reactor any more).
pub(super) type Apply = Box<dyn FnOnce(Option<&mut dyn PolledQueue>) + Send>;

pub(super) enum Msg {
    Attach(QueueId, Box<dyn PolledQueue>),
    Stop(QueueId, Sender<u16>),
    Apply(QueueId, Apply),
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

    /// Starts polling a queue (a transport made it: `virtio::QueueSetup`, a blkif ring).
    pub fn attach_queue(&self, id: QueueId, queue: Box<dyn PolledQueue>) {
        self.send(Msg::Attach(id, queue));
    }

    /// Runs `change` on queue `id` on its reactor, between iterations.
    pub fn apply(
        &self,
        id: QueueId,
        change: impl FnOnce(Option<&mut dyn PolledQueue>) + Send + 'static,
    ) {
        self.send(Msg::Apply(id, Box::new(change)));
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
        self.apply(id, move |queue| {
            if let Some(queue) = queue {
                queue.set_enabled(enabled);
            }
        });
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
            let stats = match stats_dir {
                Some(dir) => dir.create(&format!("reactor-{index}"))?,
                None => Stats::private(),
            };
            let thread = spawn(index, core, rx, wake.clone(), poll, stats)?;
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

/// Starts reactor `index` on its own thread, pinned to `core`; returns once its io_uring is
/// made (SINGLE_ISSUER binds the ring to the thread that makes it).
fn spawn(
    index: usize,
    core: usize,
    rx: Receiver<Msg>,
    wake: Arc<EventFd>,
    poll: PollConfig,
    stats: Stats<ReactorStat>,
) -> io::Result<JoinHandle<()>> {
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name(format!("reactor-{index}"))
        .spawn(move || {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(core, "could not pin reactor {index}");
            }
            match Reactor::new(rx, wake, poll, stats) {
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
    Ok(thread)
}
