//! The device side of the virtio-blk stats virtqueue (seed 000, experimental feature
//! `STATS_VQ`): the guest's own view of the disk, next to the host's counters.
//!
//! The driver posts one buffer. The device holds it and, every interval, returns it on the
//! used ring (length 0); the driver answers by posting a buffer of packed `{u16 tag; u64
//! value}` entries (little endian: pollblk offers VERSION_1 only), which the device reads
//! into the disk's `guest_*` statistics and holds for the next request. Unknown tags are
//! ignored (counted), a reply that is not whole entries is counted as malformed and dropped.

use crate::blk;
use crate::stats::sets::{DiskStat, GUEST_TAGS};
use crate::stats::Stats;
use crate::virtqueue::Segments;
use std::time::Duration;

/// Bytes of one entry: u16 tag, u64 value, packed.
pub const ENTRY_SIZE: usize = 10;
/// Most entries a reply may carry (there are 11 tags; room for ones pollblk does not know).
pub const MAX_ENTRIES: usize = 64;
/// Segments a stats buffer may have.
const MAX_SEGMENTS: usize = 16;

/// One stats virtqueue's state, owned by the reactor serving it.
pub struct GuestStatsVq {
    disk: Stats<DiskStat>,
    interval_ns: u64,
    /// The buffer the device holds to make its next request with.
    held: Option<u16>,
    /// A request was made; the next buffer is the driver's answer.
    awaiting_reply: bool,
    /// When the held buffer is returned to ask for statistics.
    due: u64,
    /// Where chains are walked into.
    pub segs: Segments,
}

impl GuestStatsVq {
    pub fn new(disk: Stats<DiskStat>, interval: Duration) -> GuestStatsVq {
        assert!(!interval.is_zero());
        GuestStatsVq {
            disk,
            interval_ns: interval.as_nanos() as u64,
            held: None,
            awaiting_reply: false,
            due: u64::MAX,
            segs: Segments::with_capacity(MAX_SEGMENTS),
        }
    }

    /// Takes the buffer at `head`, whose chain is in `self.segs`: an answer is read into the
    /// statistics; the buffer is held for the next request. Returns a buffer to give back at
    /// once (a driver that posted a second one while the device held one).
    pub fn accept(&mut self, head: u16, now: u64) -> Option<u16> {
        if self.held.is_some() {
            self.disk.add(DiskStat::GuestStatsMalformed, 1);
            return Some(head);
        }
        if self.awaiting_reply {
            self.awaiting_reply = false;
            self.read_reply();
        }
        self.held = Some(head);
        self.due = now.saturating_add(self.interval_ns);
        None
    }

    fn read_reply(&mut self) {
        let mut raw = [0u8; MAX_ENTRIES * ENTRY_SIZE + 1];
        let readable = &self.segs.iovecs()[..self.segs.readable_count()];
        let total: usize = readable.iter().map(|v| v.iov_len).sum();
        if self.segs.fault().is_some()
            || total > MAX_ENTRIES * ENTRY_SIZE
            || !total.is_multiple_of(ENTRY_SIZE)
        {
            self.disk.add(DiskStat::GuestStatsMalformed, 1);
            return;
        }
        let len = blk::copy_from_iovecs(readable, &mut raw[..total]);
        debug_assert_eq!(len, total);
        for entry in raw[..total].chunks_exact(ENTRY_SIZE) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let value = u64::from_le_bytes(entry[2..10].try_into().unwrap());
            match GUEST_TAGS.get(usize::from(tag)) {
                Some(&stat) => self.disk.set(stat, value),
                None => self.disk.add(DiskStat::GuestStatsUnknownTags, 1),
            }
        }
        self.disk.add(DiskStat::GuestStatsReplies, 1);
    }

    /// The held buffer to return now to ask for statistics, if the interval is up.
    pub fn request_if_due(&mut self, now: u64) -> Option<u16> {
        if self.awaiting_reply || now < self.due {
            return None;
        }
        let head = self.held.take()?;
        self.awaiting_reply = true;
        self.due = u64::MAX;
        self.disk.add(DiskStat::GuestStatsRequests, 1);
        Some(head)
    }

    /// When the next request is due (u64::MAX: not while no buffer is held).
    pub fn due(&self) -> u64 {
        if self.held.is_some() {
            self.due
        } else {
            u64::MAX
        }
    }

    /// Gives up the held buffer (the queue stops: it must go back to the driver).
    pub fn release(&mut self) -> Option<u16> {
        self.due = u64::MAX;
        self.held.take()
    }
}
