//! A virtio-blk driver over vhost-user: connect, negotiate, set up queues, run requests.

use crate::memory::{GuestRam, USER_BASE};
use crate::ring::{Buf, DriverQueue};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_CONFIG_WCE: u64 = 1 << 11;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;

/// How the driver sets up the device.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    pub queues: usize,
    pub queue_size: u16,
    /// Features to accept if offered (others offered are declined).
    pub accept: u64,
    pub ram_bytes: u64,
    /// Config space bytes to read (60: through write_zeroes_may_unmap, what every back end
    /// serves; pollblk's experimental fields reach 104).
    pub config_len: u32,
    /// Set up the stats virtqueue (seed 000) after the request queues; the feature bit must
    /// be offered and accepted.
    pub stats_vq: bool,
    /// Share in-flight records with the back end (INFLIGHT_SHMFD), as QEMU does, so that
    /// `reconnect` to a restarted back end gets the requests it had in flight completed.
    pub inflight: bool,
    /// Give the back end a channel for its own messages (SET_BACKEND_REQ_FD), as QEMU does,
    /// and take config-change notifications on it (`wait_config_change`).
    pub backend_channel: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            queues: 1,
            queue_size: 128,
            accept: u64::MAX,
            ram_bytes: 256 << 20,
            config_len: 60,
            stats_vq: false,
            inflight: false,
            backend_channel: false,
        }
    }
}

/// One virtio-blk request to send.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Device-readable payload after the header (write data, discard segments).
    pub out: Vec<u8>,
    /// Bytes of device-writable data buffer before the status byte.
    pub in_len: usize,
    /// Put the chain in an indirect table.
    pub indirect: bool,
    /// Split each data payload into buffers of at most this many bytes (0: one buffer).
    pub split: usize,
    /// Offset data buffers by this many bytes from a 4 KiB boundary (unaligned buffers).
    pub misalign: u64,
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

/// A request on the ring, not yet completed.
pub struct Pending {
    pub queue: usize,
    pub head: u16,
    status_gpa: u64,
    in_bufs: Vec<(u64, usize)>,
}

impl Pending {
    /// Guest physical address and length of each device-writable data buffer.
    pub fn in_buffers(&self) -> &[(u64, usize)] {
        &self.in_bufs
    }

    /// Guest physical address of the status byte.
    pub fn status_gpa(&self) -> u64 {
        self.status_gpa
    }
}

/// A connected virtio-blk driver.
pub struct BlkDriver {
    pub frontend: Frontend,
    pub ram: GuestRam,
    pub queues: Vec<DriverQueue>,
    pub features: u64,
    pub offered: u64,
    pub config: Vec<u8>,
    /// Vring index of the stats virtqueue (the last of `queues`), if set up.
    pub stats_vring: Option<usize>,
    /// The in-flight region the back end made (GET_INFLIGHT_FD), kept for reconnects.
    inflight: Option<(VhostUserInflight, std::fs::File)>,
    accept: u64,
    /// Our end of the back end's channel (`DriverOptions::backend_channel`).
    pub backend_channel: Option<std::os::unix::net::UnixStream>,
}

/// Most vrings a driver with a stats virtqueue may address (257: 256 request queues + 1).
const MAX_VRINGS: usize = 257;

/// One 16-byte discard / write-zeroes segment.
pub fn dwz_segment(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&num_sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

impl BlkDriver {
    /// Connects to a vhost-user-blk socket and brings `options.queues` queues up.
    pub fn connect(socket: &Path, options: DriverOptions) -> BlkDriver {
        // The stats virtqueue comes after all the device's request queues, whose number is
        // only known from the config space: allow any index up to there.
        let vrings = if options.stats_vq {
            MAX_VRINGS
        } else {
            options.queues
        };
        let mut frontend = Frontend::connect(socket, vrings as u64).expect("connect");
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let features = offered & options.accept;
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request waits for the back end's ack, as QEMU does: a memory table change
            // is in force before the next request is kicked.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend.get_queue_num().unwrap();
            assert!(
                max as usize >= options.queues + usize::from(options.stats_vq),
                "back end offers {max} queues"
            );
        }
        let (_, config) = frontend
            .get_config(
                0,
                options.config_len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; options.config_len as usize],
            )
            .unwrap();
        let ram = GuestRam::new(options.ram_bytes);
        let mut driver = BlkDriver {
            frontend,
            ram,
            queues: Vec::new(),
            features,
            offered,
            config: config.to_vec(),
            stats_vring: None,
            inflight: None,
            accept: options.accept,
            backend_channel: None,
        };
        if options.backend_channel {
            assert!(
                protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ),
                "the back end offers BACKEND_REQ"
            );
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            driver
                .frontend
                .set_backend_request_fd(&theirs)
                .expect("SET_BACKEND_REQ_FD");
            driver.backend_channel = Some(ours);
        }
        if options.inflight {
            let request = VhostUserInflight::new(0, 0, options.queues as u16, options.queue_size);
            let (info, file) = driver
                .frontend
                .get_inflight_fd(&request)
                .expect("GET_INFLIGHT_FD");
            driver
                .frontend
                .set_inflight_fd(&info, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
            driver.inflight = Some((info, file));
        }
        driver.set_mem_table();
        for index in 0..options.queues {
            let queue = DriverQueue::new(&mut driver.ram, options.queue_size);
            driver.queues.push(queue);
            driver.start_queue(index, 0);
        }
        if options.stats_vq {
            // The last virtqueue: after num_queues request queues (one without MQ).
            let index = if features & F_MQ != 0 {
                usize::from(u16::from_le_bytes(
                    driver.config[34..36].try_into().unwrap(),
                ))
            } else {
                1
            };
            let queue = DriverQueue::new(&mut driver.ram, 8);
            driver.queues.push(queue);
            driver.stats_vring = Some(index);
            driver.start_vring(index, driver.queues.len() - 1, 0);
        }
        driver
    }

    /// Connects again to a restarted back end on `socket`, as QEMU's reconnecting chardev
    /// does: same features, the saved in-flight region, the same memory, and every request
    /// queue restarted at the used index its ring shows (requests taken and not completed are
    /// the back end's to resubmit from the in-flight records).
    pub fn reconnect(&mut self, socket: &Path) {
        self.reconnect_with(socket, &|_, used| used);
    }

    /// As `reconnect`, with queue i restarted at `base_of(i, used index in its ring)`: QEMU
    /// sends its own cached used index after a lost connection, which may lag the ring.
    pub fn reconnect_with(&mut self, socket: &Path, base_of: &dyn Fn(usize, u16) -> u16) {
        let queues = self.queues.len() - usize::from(self.stats_vring.is_some());
        let mut frontend = Frontend::connect(socket, queues as u64).expect("reconnect");
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        assert_eq!(
            offered & self.accept,
            self.features,
            "the same features after restart"
        );
        frontend.set_features(self.features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if let Some((info, file)) = &self.inflight {
            frontend
                .set_inflight_fd(info, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        self.frontend = frontend;
        self.set_mem_table();
        for index in 0..queues {
            let used = self.queues[index].used_idx(&self.ram);
            self.start_queue(index, base_of(index, used));
        }
    }

    /// Posts a buffer on the stats virtqueue (the last queue) holding `bytes` (driver-written,
    /// device-readable) and kicks; returns its head.
    pub fn post_stats(&mut self, bytes: &[u8]) -> u16 {
        let q = self.queues.len() - 1;
        let gpa = self.ram.alloc(bytes.len().max(1) as u64, 8);
        self.ram.write(gpa, bytes);
        let head = self.queues[q].add(
            &mut self.ram,
            &[Buf {
                gpa,
                len: bytes.len() as u32,
                writable: false,
            }],
            false,
        );
        self.queues[q].kick.write(1).unwrap();
        head
    }

    /// Waits for the device to return a stats buffer (its request for statistics); returns
    /// (head, used length).
    pub fn wait_stats_request(&mut self, timeout: Duration) -> Option<(u16, u32)> {
        let q = self.queues.len() - 1;
        self.queues[q].wait_used(&self.ram, timeout)
    }
}

/// Packed stats-virtqueue entries: u16 tag, u64 value, little endian.
pub fn stats_entries(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 10);
    for (tag, value) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

impl BlkDriver {
    fn set_mem_table(&mut self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.ram.size(),
            userspace_addr: USER_BASE,
            mmap_offset: 0,
            mmap_handle: self.ram.fd(),
        };
        self.frontend.set_mem_table(&[region]).unwrap();
    }

    /// Sends the vring setup of queue `index` starting at avail index `base`, then enables it.
    pub fn start_queue(&mut self, index: usize, base: u16) {
        self.start_vring(index, index, base);
    }

    /// Sets up vring `index` with the driver's queue `queue`.
    fn start_vring(&mut self, index: usize, queue: usize, base: u16) {
        let q = &self.queues[queue];
        let f = &self.frontend;
        f.set_vring_num(index, q.size).unwrap();
        f.set_vring_base(index, base).unwrap();
        f.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: USER_BASE + q.desc,
                used_ring_addr: USER_BASE + q.used,
                avail_ring_addr: USER_BASE + q.avail,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_call(index, &q.call).unwrap();
        f.set_vring_kick(index, &q.kick).unwrap();
        self.frontend.set_vring_enable(index, true).unwrap();
    }

    /// Stops queue `index` (GET_VRING_BASE): returns the avail index the device reached.
    pub fn stop_queue(&mut self, index: usize) -> u32 {
        self.frontend.get_vring_base(index).unwrap()
    }

    /// Waits up to `timeout` for VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the back end's
    /// channel, acknowledges it as QEMU does (after reading the config space again) and
    /// returns true; false on timeout.
    pub fn wait_config_change(&mut self, timeout: Duration) -> bool {
        let channel = self.backend_channel.take().expect("backend_channel option");
        let done = Self::config_change_on(&channel, timeout, &mut || self.reread_config());
        self.backend_channel = Some(channel);
        done
    }

    fn config_change_on(
        mut channel: &std::os::unix::net::UnixStream,
        timeout: Duration,
        reread: &mut dyn FnMut(),
    ) -> bool {
        use std::io::{Read, Write};
        channel.set_read_timeout(Some(timeout)).unwrap();
        let mut hdr = [0u8; 12];
        if channel.read_exact(&mut hdr).is_err() {
            return false;
        }
        let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        assert_eq!((request, size), (2, 0), "CONFIG_CHANGE_MSG without payload");
        reread();
        if flags & 0x8 != 0 {
            let mut reply = Vec::new();
            reply.extend_from_slice(&2u32.to_le_bytes());
            reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            channel.write_all(&reply).unwrap();
        }
        true
    }

    /// Reads the config space again (GET_CONFIG).
    pub fn reread_config(&mut self) {
        let len = self.config.len() as u32;
        let (_, config) = self
            .frontend
            .get_config(
                0,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .unwrap();
        self.config = config.to_vec();
    }

    /// Capacity from the config space, in sectors.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().unwrap())
    }

    /// A config field: `len` bytes at `offset`, little-endian.
    pub fn config_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.config[offset..offset + 4].try_into().unwrap())
    }

    fn place(
        &mut self,
        payload: &[u8],
        len: usize,
        writable: bool,
        req: &Request,
        bufs: &mut Vec<Buf>,
    ) -> Vec<(u64, usize)> {
        let mut placed = Vec::new();
        let chunk = if req.split == 0 {
            len.max(1)
        } else {
            req.split
        };
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            let gpa = self.ram.alloc(n as u64 + req.misalign, 4096) + req.misalign;
            if !writable {
                self.ram.write(gpa, &payload[done..done + n]);
            }
            bufs.push(Buf {
                gpa,
                len: n as u32,
                writable,
            });
            placed.push((gpa, n));
            done += n;
        }
        placed
    }

    /// Puts `req` on queue `queue` and kicks.
    pub fn submit(&mut self, queue: usize, req: &Request) -> Pending {
        let mut bufs = Vec::new();
        let header = self.ram.alloc(16, 16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req.kind.to_le_bytes());
        h[8..16].copy_from_slice(&req.sector.to_le_bytes());
        self.ram.write(header, &h);
        bufs.push(Buf {
            gpa: header,
            len: 16,
            writable: false,
        });
        self.place(&req.out.clone(), req.out.len(), false, req, &mut bufs);
        let in_bufs = self.place(&[], req.in_len, true, req, &mut bufs);
        let status_gpa = self.ram.alloc(1, 1);
        self.ram.write(status_gpa, &[0xff]);
        bufs.push(Buf {
            gpa: status_gpa,
            len: 1,
            writable: true,
        });
        let head = self.queues[queue].add(&mut self.ram, &bufs, req.indirect);
        self.queues[queue].kick.write(1).unwrap();
        Pending {
            queue,
            head,
            status_gpa,
            in_bufs,
        }
    }

    /// Waits for `pending` (which must be the next to complete on its queue).
    pub fn wait(&mut self, pending: Pending) -> Completion {
        let (head, used_len) = self.queues[pending.queue]
            .wait_used(&self.ram, Duration::from_secs(10))
            .expect("request completed within 10 s");
        assert_eq!(
            head, pending.head,
            "completions in submission order for one request"
        );
        self.collect(&pending, used_len)
    }

    /// Reads back status and data of a completed request.
    pub fn collect(&self, pending: &Pending, used_len: u32) -> Completion {
        let status = self.ram.read(pending.status_gpa, 1)[0];
        let mut data = Vec::new();
        for &(gpa, len) in &pending.in_bufs {
            data.extend_from_slice(&self.ram.read(gpa, len));
        }
        Completion {
            status,
            used_len,
            data,
        }
    }

    /// Runs one request to completion and frees its guest memory.
    pub fn run(&mut self, queue: usize, req: &Request) -> Completion {
        let mark = self.ram.mark();
        let pending = self.submit(queue, req);
        let done = self.wait(pending);
        self.ram.release(mark);
        done
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, queue: usize, sector: u64, data: &[u8]) -> u8 {
        self.run(
            queue,
            &Request {
                kind: T_OUT,
                sector,
                out: data.to_vec(),
                ..Default::default()
            },
        )
        .status
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, queue: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let done = self.run(
            queue,
            &Request {
                kind: T_IN,
                sector,
                in_len: len,
                ..Default::default()
            },
        );
        (done.status, done.data)
    }
}
