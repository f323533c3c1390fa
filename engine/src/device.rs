//! A virtio-blk disk: a volume plus what the guest sees of it (features, config space).
//! Transports (vhost-user, Xen) share one `BlkDevice` with the reactors serving its queues.

use crate::backend::Backend;
use crate::blk::{self, feature, BlkConfig};
use crate::qos::Throttle;
use crate::stats::sets::{DiskStat, QueueStat};
use crate::stats::{Stats, StatsDir};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a virtqueue of a disk carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// virtio-blk requests.
    Requests,
    /// The stats virtqueue (seed 000): the device holds the driver's buffer and returns it
    /// every `interval` to ask for the guest's statistics.
    GuestStats { interval: Duration },
}

/// The stats virtqueue (seed 000) as the operator enables it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestStatsOptions {
    /// Feature bit offered for STATS_VQ (experimental; the seed's bit 11 is now CONFIG_WCE).
    pub feature_bit: u32,
    /// How often the device asks the guest for its statistics.
    pub interval: Duration,
}

impl GuestStatsOptions {
    /// Default STATS_VQ feature bit: unassigned in virtio 1.3.
    pub const DEFAULT_FEATURE_BIT: u32 = 19;
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
}

/// A disk's statistics: its own and one set per request queue.
pub struct DeviceStats {
    disk: Stats<DiskStat>,
    queues: Vec<Stats<QueueStat>>,
    /// Counters of the stats virtqueue itself (not published: it carries no requests).
    stats_vq: Stats<QueueStat>,
}

impl DeviceStats {
    /// Publishes `name` and `name/queue-N` for each queue in `dir`.
    pub fn publish(dir: &StatsDir, name: &str, num_queues: u16) -> io::Result<DeviceStats> {
        Ok(DeviceStats {
            disk: dir.create(name)?,
            queues: (0..num_queues)
                .map(|i| dir.create(&format!("{name}/queue-{i}")))
                .collect::<io::Result<_>>()?,
            stats_vq: Stats::private(),
        })
    }

    /// Statistics only this process sees.
    pub fn private(num_queues: u16) -> DeviceStats {
        DeviceStats {
            disk: Stats::private(),
            queues: (0..num_queues).map(|_| Stats::private()).collect(),
            stats_vq: Stats::private(),
        }
    }
}

/// How a disk is presented; chosen by the operator.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Name for logs (e.g. "disk0").
    pub name: String,
    /// Logical block size the guest sees: 512 or 4096.
    pub block_size: u32,
    /// Refuse writes, discards and write-zeroes (VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// GET_ID answer, at most 20 bytes.
    pub serial: String,
    /// Most queues a front end may use.
    pub num_queues: u16,
    /// Offer PROVISION (experimental, seed 004; needs a backend that can allocate).
    pub provision: bool,
    /// Offer the stats virtqueue (experimental, seed 000).
    pub guest_stats: Option<GuestStatsOptions>,
}

impl DiskOptions {
    /// A writable disk of 512-byte blocks named `name` (its serial too), with `num_queues`
    /// queues and no experimental feature: what the other fields say unless told otherwise.
    pub fn named(name: &str, num_queues: u16) -> DiskOptions {
        DiskOptions {
            name: name.to_string(),
            block_size: 512,
            readonly: false,
            serial: name.to_string(),
            num_queues,
            provision: false,
            guest_stats: None,
        }
    }
}

/// A disk served to guests.
pub struct BlkDevice {
    options: DiskOptions,
    backend: Arc<dyn Backend>,
    serial: [u8; blk::ID_BYTES],
    /// Write-back cache on (the guest may turn it off through CONFIG_WCE); when off, every
    /// write is made durable before it completes.
    writeback: AtomicBool,
    stats: DeviceStats,
    /// The disk's limits: its own, or its group's (shared with the group's other disks).
    throttle: Arc<Throttle>,
}

impl BlkDevice {
    /// A disk over `backend` whose statistics only this process sees.
    pub fn new(options: DiskOptions, backend: Arc<dyn Backend>) -> BlkDevice {
        let stats = DeviceStats::private(options.num_queues);
        BlkDevice::with_stats(options, backend, stats)
    }

    /// A disk over `backend` counting into `stats`. Panics on options the CLI must have
    /// refused.
    pub fn with_stats(
        options: DiskOptions,
        backend: Arc<dyn Backend>,
        stats: DeviceStats,
    ) -> BlkDevice {
        assert_eq!(stats.queues.len(), usize::from(options.num_queues));
        if let Some(g) = options.guest_stats {
            assert!(g.feature_bit < 24, "a device-specific feature bit");
            assert!(!g.interval.is_zero());
        }
        assert!(options.block_size == 512 || options.block_size == 4096);
        assert!(options.serial.len() <= blk::ID_BYTES);
        assert!(options.num_queues >= 1);
        assert_eq!(backend.info().size_bytes % u64::from(options.block_size), 0);
        let mut serial = [0u8; blk::ID_BYTES];
        serial[..options.serial.len()].copy_from_slice(options.serial.as_bytes());
        stats
            .disk
            .set(DiskStat::CapacityBytes, backend.info().size_bytes);
        BlkDevice {
            options,
            backend,
            serial,
            writeback: AtomicBool::new(true),
            stats,
            throttle: Arc::new(Throttle::default()),
        }
    }

    /// The disk counts its I/O against `throttle` (its own limits, or its group's).
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> BlkDevice {
        self.throttle = throttle;
        self
    }

    /// The buckets the disk's requests are admitted by.
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// The disk's own statistics (capacity, the guest's view).
    pub fn disk_stats(&self) -> &Stats<DiskStat> {
        &self.stats.disk
    }

    /// Virtqueues a front end may set up: the request queues, then the stats virtqueue.
    pub fn vring_count(&self) -> usize {
        usize::from(self.options.num_queues) + usize::from(self.options.guest_stats.is_some())
    }

    /// What virtqueue `index` carries under the negotiated `features`; None if there is no
    /// such queue.
    pub fn queue_role(&self, index: usize, features: u64) -> Option<QueueRole> {
        if index < usize::from(self.options.num_queues) {
            return Some(QueueRole::Requests);
        }
        let g = self.options.guest_stats?;
        (index == usize::from(self.options.num_queues) && features & 1 << g.feature_bit != 0)
            .then_some(QueueRole::GuestStats {
                interval: g.interval,
            })
    }

    /// Statistics of virtqueue `index`.
    pub fn queue_stats(&self, index: usize) -> &Stats<QueueStat> {
        self.stats.queues.get(index).unwrap_or(&self.stats.stats_vq)
    }

    /// The operator's options.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// The volume.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Grows the disk to `size_bytes`, with requests in flight or not; the caller tells the
    /// front end afterwards. Shrinking is refused, as a guest's data past the new end would be
    /// cut off under it.
    pub fn grow(&self, size_bytes: u64) -> Result<(), String> {
        let now = self.backend.info().size_bytes;
        let block = u64::from(self.options.block_size);
        if size_bytes < now {
            return Err(format!(
                "{size_bytes} bytes is smaller than the disk ({now} bytes): disks only grow"
            ));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(block) {
            return Err(format!(
                "{size_bytes} bytes is not a multiple of the block size {block}"
            ));
        }
        if size_bytes > now {
            self.backend.grow(size_bytes).map_err(|e| e.to_string())?;
        }
        self.stats.disk.set(DiskStat::CapacityBytes, size_bytes);
        Ok(())
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.info().size_bytes / blk::SECTOR_SIZE
    }

    /// The GET_ID answer (zero padded).
    pub fn serial(&self) -> &[u8; blk::ID_BYTES] {
        &self.serial
    }

    /// Whether writes must be durable before completion (write-through).
    pub fn write_through(&self) -> bool {
        !self.writeback.load(Ordering::Relaxed)
    }

    /// The driver wrote the `writeback` config field.
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// virtio feature bits this disk offers (device and ring bits; no transport bits).
    pub fn features(&self) -> u64 {
        let info = self.backend.info();
        let mut bits = [
            feature::VERSION_1,
            feature::RING_EVENT_IDX,
            feature::RING_INDIRECT_DESC,
            feature::SIZE_MAX,
            feature::SEG_MAX,
            feature::BLK_SIZE,
            feature::TOPOLOGY,
            feature::FLUSH,
            feature::CONFIG_WCE,
            feature::MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.options.readonly {
            bits |= 1 << feature::RO;
        } else if info.discard {
            bits |= 1 << feature::DISCARD | 1 << feature::WRITE_ZEROES;
        }
        if self.provisions() {
            bits |= 1 << feature::PROVISION;
        }
        if let Some(g) = self.options.guest_stats {
            bits |= 1 << g.feature_bit;
        }
        bits
    }

    /// Whether PROVISION requests are served.
    pub fn provisions(&self) -> bool {
        self.options.provision && !self.options.readonly
    }

    /// The config space as the guest reads it now.
    pub fn config(&self) -> BlkConfig {
        let sectors_per_block = self.options.block_size / blk::SECTOR_SIZE as u32;
        BlkConfig {
            capacity_sectors: self.capacity_sectors(),
            size_max: blk::SIZE_MAX,
            seg_max: blk::SEG_MAX,
            blk_size: self.options.block_size,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: u8::from(!self.write_through()),
            num_queues: self.options.num_queues,
            max_discard_sectors: blk::MAX_DWZ_SECTORS,
            max_discard_seg: blk::MAX_DWZ_SEG,
            discard_sector_alignment: sectors_per_block,
            max_write_zeroes_sectors: blk::MAX_DWZ_SECTORS,
            max_write_zeroes_seg: blk::MAX_DWZ_SEG,
            write_zeroes_may_unmap: 1,
            max_provision_sectors: if self.provisions() {
                blk::MAX_DWZ_SECTORS
            } else {
                0
            },
            max_provision_seg: if self.provisions() {
                blk::MAX_DWZ_SEG
            } else {
                0
            },
        }
    }
}
