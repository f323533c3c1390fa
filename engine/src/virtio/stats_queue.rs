//! The stats virtqueue (seed 000) as a polled queue: it carries no requests, only the buffer
//! the driver posts, which the device holds and gives back every interval to ask for the
//! guest's statistics (the protocol is `guest_stats::GuestStatsVq`; the interval is this
//! queue's timer, its `deadline`).

use super::vring::Vring;
use crate::guest_stats::GuestStatsVq;
use crate::queue::{IoCtx, PolledQueue, AVAIL_BATCH};
use crate::ring::Notified;
use crate::stats::sets::QueueStat;
use crate::stats::Stats;
use crate::virtqueue::Broken;
use std::any::Any;
use std::os::fd::RawFd;

/// One stats virtqueue, owned by a reactor.
pub struct GuestStatsQueue {
    pub(super) vring: Vring,
    protocol: GuestStatsVq,
    disk: String,
    stats: Stats<QueueStat>,
    enabled: bool,
    broken: bool,
    stopping: bool,
    unpublished: bool,
}

impl GuestStatsQueue {
    pub(super) fn new(
        vring: Vring,
        protocol: GuestStatsVq,
        disk: String,
        stats: Stats<QueueStat>,
        enabled: bool,
    ) -> GuestStatsQueue {
        stats.set(QueueStat::Broken, 0);
        stats.set(QueueStat::InFlight, 0);
        GuestStatsQueue {
            vring,
            protocol,
            disk,
            stats,
            enabled,
            broken: false,
            stopping: false,
            unpublished: false,
        }
    }

    fn runs(&self) -> bool {
        self.enabled && !self.broken && !self.stopping
    }

    /// Takes the buffers the driver posted; true if there were any.
    fn take_buffers(&mut self, now: u64) -> bool {
        let mut took = false;
        for _ in 0..AVAIL_BATCH {
            let head = match self.vring.queue.pop_avail() {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(why) => {
                    self.mark_broken(why);
                    break;
                }
            };
            took = true;
            let walked =
                self.vring
                    .queue
                    .walk_chain(self.vring.mem(), head, &mut self.protocol.segs);
            if let Err(why) = walked {
                self.mark_broken(why);
                break;
            }
            if let Some(extra) = self.protocol.accept(head, now) {
                self.give_back(extra);
            }
        }
        took
    }

    fn give_back(&mut self, head: u16) {
        self.vring.queue.push_used(head, 0);
        self.unpublished = true;
    }
}

impl PolledQueue for GuestStatsQueue {
    fn poll(&mut self, io: &mut IoCtx<'_>) -> bool {
        if !self.runs() {
            return false;
        }
        let now = io.clock_now();
        let took = self.take_buffers(now);
        self.stats.add(
            if took {
                QueueStat::PollsBusy
            } else {
                QueueStat::PollsIdle
            },
            1,
        );
        // The interval is up: the held buffer goes back, and the driver answers with its
        // statistics. Only a running queue asks: a disabled or broken one would otherwise
        // keep the reactor from ever sleeping.
        let mut asked = false;
        if self.runs() {
            if let Some(head) = self.protocol.request_if_due(now) {
                self.give_back(head);
                asked = true;
            }
        }
        // Giving the buffer back is work: a queue reported idle here could be parked before
        // the reactor publishes it, and the driver would never see its request.
        took | asked
    }

    fn complete(&mut self, _: u32, _: i32, _: u64, _: Option<u64>) {
        unreachable!("a stats virtqueue starts no I/O");
    }

    fn publish(&mut self) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        match self.vring.publish() {
            Notified::Sent => self.stats.add(QueueStat::NotificationsSent, 1),
            Notified::Suppressed => self.stats.add(QueueStat::NotificationsSuppressed, 1),
            Notified::Nobody => {}
        }
    }

    fn kick_fd(&self) -> RawFd {
        self.vring.kick_fd()
    }

    fn ack_kick(&mut self) {
        self.stats.add(QueueStat::Kicks, self.vring.ack_kick());
    }

    fn enable_notification(&mut self) -> bool {
        self.runs() && self.vring.enable_notification()
    }

    fn disable_notification(&mut self) {
        if self.runs() {
            self.vring.disable_notification();
        }
    }

    fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    fn stop(&mut self) {
        self.stopping = true;
        // The held buffer is in flight: the driver gets it back, unless the ring is broken
        // (its memory may be gone).
        if let Some(head) = self.protocol.release().filter(|_| !self.broken) {
            self.give_back(head);
        }
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn detach(&mut self) -> u16 {
        self.vring.queue.last_avail_idx()
    }

    fn deadline(&self) -> u64 {
        if self.runs() {
            self.protocol.due()
        } else {
            u64::MAX
        }
    }

    fn mark_broken(&mut self, why: Broken) {
        if !self.broken {
            tracing::error!(disk = %self.disk, ?why,
                "stats virtqueue broken: it stops until the front end resets it");
            self.broken = true;
            self.stats.set(QueueStat::Broken, 1);
            self.vring.signal_broken();
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
