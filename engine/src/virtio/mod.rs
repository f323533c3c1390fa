//! virtio's side of the engine: virtqueues as the reactors serve them.
//!
//! - [`VirtioRing`]: a request virtqueue as a [`crate::ring::Ring`] (chains, status byte,
//!   used ring, in-flight records), run by the transport-neutral `queue::RequestQueue`.
//! - [`GuestStatsQueue`]: the stats virtqueue, a polled queue of its own.
//! - [`Vring`]: what both carry beside the split ring (memory table, eventfds, dirty log).
//!
//! The vhost-user front end attaches virtqueues with [`ReactorHandle::attach`] and changes
//! them while they run (call eventfd, memory table, dirty log) with the messages below; the
//! reactor itself knows none of this.

mod request_ring;
mod stats_queue;
mod vring;

pub use request_ring::VirtioRing;
pub use stats_queue::GuestStatsQueue;
pub use vring::Vring;

use crate::device::{BlkDevice, QueueRole};
use crate::dirty_log::DirtyLog;
use crate::guest_stats::GuestStatsVq;
use crate::inflight::InflightQueue;
use crate::mem::GuestMemory;
use crate::queue::{PolledQueue, RequestQueue, MAX_SLOTS_PER_QUEUE};
use crate::reactor::{QueueId, ReactorHandle};
use crate::stats::sets::QueueStat;
use crate::stats::Stats;
use crate::virtqueue::{Broken, RingAddrs, SplitQueue};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

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

impl QueueSetup {
    /// The polled queue this virtqueue becomes; fails if its rings are not in guest memory.
    pub fn into_queue(self) -> Result<Box<dyn PolledQueue>, Broken> {
        let (vring, mut setup) = self.into_vring()?;
        Ok(match setup.role {
            QueueRole::Requests => {
                let ring = setup.request_ring(vring);
                Box::new(RequestQueue::new(
                    setup.device,
                    ring,
                    setup.stats,
                    setup.enabled,
                ))
            }
            QueueRole::GuestStats { interval } => {
                let protocol = GuestStatsVq::new(setup.device.disk_stats().clone(), interval);
                let disk = setup.device.options().name.clone();
                Box::new(GuestStatsQueue::new(
                    vring,
                    protocol,
                    disk,
                    setup.stats,
                    setup.enabled,
                ))
            }
        })
    }

    /// The request ring of a request virtqueue, without a queue around it (fuzzing, tests).
    pub fn into_ring(self) -> Result<VirtioRing, Broken> {
        assert_eq!(self.role, QueueRole::Requests);
        let (vring, mut setup) = self.into_vring()?;
        Ok(setup.request_ring(vring))
    }

    /// Maps the rings and takes the eventfds; the rest of the setup is left.
    fn into_vring(self) -> Result<(Vring, Rest), Broken> {
        let split = SplitQueue::new(
            &self.mem,
            self.addrs,
            self.size,
            self.base,
            self.event_idx,
            self.indirect,
        )?;
        let vring = Vring::new(
            split,
            self.mem,
            self.addrs,
            self.kick,
            self.call,
            self.err,
            self.dirty_log,
        );
        let rest = Rest {
            device: self.device,
            size: self.size,
            base: self.base,
            enabled: self.enabled,
            stats: self.stats,
            role: self.role,
            inflight: self.inflight,
        };
        Ok((vring, rest))
    }
}

/// What a QueueSetup holds beside its vring.
struct Rest {
    device: Arc<BlkDevice>,
    size: u16,
    base: u16,
    enabled: bool,
    stats: Stats<QueueStat>,
    role: QueueRole,
    inflight: Option<InflightQueue>,
}

impl Rest {
    /// The request ring over `vring`; counts the requests it resubmits.
    fn request_ring(&mut self, vring: Vring) -> VirtioRing {
        let slots = usize::from(self.size).min(MAX_SLOTS_PER_QUEUE);
        let disk = self.device.options().name.clone();
        let ring = VirtioRing::new(vring, disk, slots, self.inflight.take(), self.base);
        self.stats
            .add(QueueStat::Resubmitted, ring.resubmissions() as u64);
        ring
    }
}

/// The vring of a virtqueue, request or stats; None for another transport's queue.
fn vring_of(queue: &mut dyn PolledQueue) -> Option<&mut Vring> {
    let any = queue.as_any_mut();
    if any.is::<GuestStatsQueue>() {
        return any.downcast_mut::<GuestStatsQueue>().map(|q| &mut q.vring);
    }
    any.downcast_mut::<RequestQueue<VirtioRing>>()
        .map(|q| q.ring_mut().vring_mut())
}

impl ReactorHandle {
    /// Starts serving a virtqueue; fails if its rings are not in guest memory.
    pub fn attach(&self, id: QueueId, setup: QueueSetup) -> Result<(), Broken> {
        self.attach_queue(id, setup.into_queue()?);
        Ok(())
    }

    /// Replaces the call eventfd (the front end may change it while the queue runs).
    pub fn set_call(&self, id: QueueId, call: Option<EventFd>) {
        self.apply(id, move |queue| {
            if let Some(vring) = queue.and_then(vring_of) {
                vring.set_call(call);
            }
        });
    }

    /// Starts (Some) or stops (None) marking the queue's guest-memory writes in a dirty log,
    /// and waits until the reactor does: the front end copies guest memory as soon as it has
    /// the answer, so a write the reactor made after that copy but before it took the log
    /// would be lost on the destination.
    pub fn set_dirty_log(&self, id: QueueId, log: Option<Arc<DirtyLog>>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.apply(id, move |queue| {
            if let Some(vring) = queue.and_then(vring_of) {
                vring.set_dirty_log(log);
            }
            let _ = tx.send(());
        });
        // An error: the reactor has exited, and writes nothing more.
        let _ = rx.recv();
    }

    /// Switches a queue to a new memory table and waits until the reactor uses it; a ring
    /// the new table does not map breaks the queue.
    pub fn set_memory(&self, id: QueueId, mem: Arc<GuestMemory>) -> Result<(), Broken> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.apply(id, move |queue| {
            let result = match queue {
                Some(queue) => match vring_of(queue).map(|vring| vring.set_memory(mem)) {
                    Some(Err(why)) => {
                        queue.mark_broken(why);
                        Err(why)
                    }
                    _ => Ok(()),
                },
                None => Ok(()),
            };
            let _ = tx.send(result);
        });
        rx.recv().unwrap_or(Err(Broken::RingUnmapped))
    }
}
