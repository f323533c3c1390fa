//! The vhost-user-blk message handler: turns front-end requests into engine operations.
//!
//! Message framing, fd passing, header and size validation and feature gating are the `vhost`
//! crate's (its `BackendReqHandler`); this file holds the state of one front-end connection
//! (negotiated features, memory table, per-vring setup) and starts, reconfigures and stops
//! queues on the reactors.

use crate::backend_channel::BackendChannel;
use pollblk_engine::blk::{self, BlkConfig};
use pollblk_engine::device::BlkDevice;
use pollblk_engine::dirty_log::DirtyLog;
use pollblk_engine::inflight::InflightRegion;
use pollblk_engine::mem::{GuestMemory, MmapRegion, MAX_REGIONS};
use pollblk_engine::reactor::{QueueId, ReactorHandle, StopError};
use pollblk_engine::virtio::QueueSetup;
use pollblk_engine::virtqueue::{RingAddrs, MAX_QUEUE_SIZE};
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;
use vhost::vhost_user::message::*;
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vmm_sys_util::eventfd::EventFd;

/// Longest a vring stop waits for requests in the backend (a stalled RBD OSD, a hung disk)
/// before it is reported as failed instead of hanging the connection.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// VHOST_USER_F_PROTOCOL_FEATURES: rings start disabled and need SET_VRING_ENABLE.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// VHOST_F_LOG_ALL: while set (with a log from SET_LOG_BASE), every guest-memory write is
/// marked in the dirty log (live migration). QEMU refuses to migrate without it.
const LOG_ALL_BIT: u64 = 1 << 26;

/// Setup of one vring as the front end has described it so far.
#[derive(Default)]
struct Vring {
    size: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    call: Option<EventFd>,
    err: Option<EventFd>,
    enabled: bool,
    /// Set while the queue runs on a reactor.
    running: Option<QueueId>,
    /// A copy of the kick fd the queue was started with, to start it again after a pause.
    kick: Option<EventFd>,
    /// Paused by the operator: drained and stopped, not restarted by a new kick fd.
    paused: bool,
}

/// What a queue is doing, for the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    /// The front end has not started it.
    Idle,
    Running,
    /// Paused at this available index (every request before it completed).
    Paused(u16),
}

/// Back-end state of one front-end connection to one disk.
pub struct BlkHandler {
    device: Arc<BlkDevice>,
    reactors: Vec<ReactorHandle>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    regions: Vec<Arc<MmapRegion>>,
    mem: Arc<GuestMemory>,
    vrings: Vec<Vring>,
    /// The channel to the front end (SET_BACKEND_REQ_FD), for config-change notifications.
    backend_channel: Option<BackendChannel>,
    /// In-flight records shared with the front end (INFLIGHT_SHMFD).
    inflight: Option<Arc<InflightRegion>>,
    /// The dirty log from SET_LOG_BASE; written to only while LOG_ALL is negotiated.
    dirty_log: Option<Arc<DirtyLog>>,
}

fn invalid(what: &'static str) -> Error {
    Error::InvalidOperation(what)
}

impl BlkHandler {
    /// A fresh connection to `device`, whose queue i runs on `reactors[i % len]`.
    pub fn new(device: Arc<BlkDevice>, reactors: Vec<ReactorHandle>) -> BlkHandler {
        assert!(!reactors.is_empty());
        let queues = device.vring_count();
        BlkHandler {
            device,
            reactors,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            regions: Vec::new(),
            mem: Arc::new(GuestMemory::default()),
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            inflight: None,
            dirty_log: None,
            backend_channel: None,
        }
    }

    /// Features this back end offers: the disk's, plus the vhost-user transport bit.
    pub fn offered_features(&self) -> u64 {
        self.device.features() | PROTOCOL_FEATURES_BIT | LOG_ALL_BIT
    }

    /// The log queues mark now: the mapped one while LOG_ALL is on.
    fn active_log(&self) -> Option<Arc<DirtyLog>> {
        self.dirty_log
            .clone()
            .filter(|_| self.acked_features & LOG_ALL_BIT != 0)
    }

    /// Tells every running queue whether (and where) to log its writes.
    fn push_log_state(&self) {
        let log = self.active_log();
        for (index, vring) in self.vrings.iter().enumerate() {
            if let Some(id) = vring.running {
                self.reactor(index).set_dirty_log(id, log.clone());
            }
        }
    }

    /// Protocol features offered (REPLY_ACK is added by the vhost crate).
    pub fn offered_protocol() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    /// Keeps the front end's channel (taken off the socket by the server, see
    /// backend_channel.rs).
    pub fn set_backend_channel(&mut self, channel: BackendChannel) {
        self.backend_channel = Some(channel);
    }

    /// A handle on the front end's channel and whether it acknowledges messages (REPLY_ACK);
    /// None when the front end gave none.
    pub fn backend_channel(&self) -> Option<(BackendChannel, bool)> {
        let channel = self.backend_channel.as_ref()?.try_clone().ok()?;
        let reply_ack = self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK);
        Some((channel, reply_ack))
    }

    /// Number of queues the device offers.
    pub fn queue_count(&self) -> usize {
        self.vrings.len()
    }

    /// What queue `index` is doing.
    pub fn queue_state(&self, index: usize) -> QueueState {
        let vring = &self.vrings[index];
        match (vring.running, vring.paused) {
            (_, true) => QueueState::Paused(vring.base),
            (Some(_), false) => QueueState::Running,
            (None, false) => QueueState::Idle,
        }
    }

    /// Pauses queue `index`: stops taking requests, waits for the ones in flight and returns
    /// the index it will resume at. A new kick fd from the front end does not restart it.
    pub fn pause_queue(&mut self, index: usize) -> std::result::Result<u16, String> {
        match self.queue_state(index) {
            QueueState::Paused(base) => Ok(base),
            QueueState::Idle => Err(format!("queue {index} is not running")),
            QueueState::Running => {
                let base = self
                    .stop_queue(index)
                    .map_err(|e| format!("queue {index}: requests still in the backend ({e:?})"))?
                    .expect("a running queue stops with its index");
                self.vrings[index].paused = true;
                Ok(base)
            }
        }
    }

    /// Resumes a paused queue where it stopped.
    pub fn resume_queue(&mut self, index: usize) -> std::result::Result<(), String> {
        if !self.vrings[index].paused {
            return Err(format!("queue {index} is not paused"));
        }
        self.vrings[index].paused = false;
        let kick = self.vrings[index]
            .kick
            .as_ref()
            .map(EventFd::try_clone)
            .transpose()
            .map_err(|e| format!("queue {index}: {e}"))?;
        match kick {
            Some(kick) => self
                .start_queue(index, kick)
                .map_err(|e| format!("queue {index}: {e}")),
            // Stopped by the front end while paused: it starts the queue again itself.
            None => Ok(()),
        }
    }

    fn reactor(&self, index: usize) -> &ReactorHandle {
        &self.reactors[index % self.reactors.len()]
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(invalid("vring index out of range"))
    }

    /// Stops every running queue (draining it) and forgets the memory table: the connection
    /// ended or the front end reset the device.
    pub fn stop_all(&mut self) {
        for index in 0..self.vrings.len() {
            // A vring that cannot stop in time detaches by itself later; the memory it uses
            // stays mapped until then (the reactor holds it).
            let _ = self.stop_queue(index);
        }
        for vring in &mut self.vrings {
            *vring = Vring::default();
        }
        self.regions.clear();
        self.mem = Arc::new(GuestMemory::default());
    }

    /// Stops a running vring after its requests complete; Err if some are still in the
    /// backend after STOP_TIMEOUT (the queue then stops by itself once they complete).
    fn stop_queue(&mut self, index: usize) -> std::result::Result<Option<u16>, StopError> {
        let Some(id) = self.vrings[index].running.take() else {
            return Ok(None);
        };
        let name = &self.device.options().name;
        match self.reactor(index).stop_within(id, STOP_TIMEOUT) {
            Ok(base) => {
                tracing::debug!(disk = %name, index, base, "vring stopped");
                self.vrings[index].base = base;
                Ok(Some(base))
            }
            Err(e) => {
                tracing::error!(disk = %name, index, ?e, timeout = ?STOP_TIMEOUT,
                    "vring did not stop: requests still in the backend");
                Err(e)
            }
        }
    }

    fn start_queue(&mut self, index: usize, kick: EventFd) -> Result<()> {
        if self.vrings[index].running.is_some() {
            self.stop_queue(index)
                .map_err(|_| invalid("the vring's previous requests are still in the backend"))?;
        }
        let features = self.acked_features;
        let vring = &self.vrings[index];
        let addrs = vring.addrs.ok_or(invalid("kick before vring address"))?;
        if vring.size == 0 {
            return Err(invalid("kick before vring size"));
        }
        let role = self
            .device
            .queue_role(index, features)
            .ok_or(invalid("stats virtqueue started without its feature"))?;
        let dup = |fd: &Option<EventFd>| fd.as_ref().and_then(|fd| fd.try_clone().ok());
        let setup = QueueSetup {
            device: self.device.clone(),
            mem: self.mem.clone(),
            addrs,
            size: vring.size,
            base: vring.base,
            event_idx: features & 1 << blk::feature::RING_EVENT_IDX != 0,
            indirect: features & 1 << blk::feature::RING_INDIRECT_DESC != 0,
            kick,
            call: dup(&vring.call),
            err: dup(&vring.err),
            // Without PROTOCOL_FEATURES a ring is enabled as soon as it starts.
            enabled: vring.enabled || features & PROTOCOL_FEATURES_BIT == 0,
            stats: self.device.queue_stats(index).clone(),
            role,
            inflight: self
                .inflight
                .as_ref()
                .and_then(|records| records.queue(index, vring.size)),
            dirty_log: self.active_log(),
        };
        let id = QueueId::fresh();
        self.vrings[index].kick = setup.kick.try_clone().ok();
        self.reactor(index).attach(id, setup).map_err(|why| {
            tracing::warn!(disk = %self.device.options().name, index, ?why, "vring refused");
            invalid("vring not in guest memory")
        })?;
        self.vrings[index].running = Some(id);
        tracing::debug!(disk = %self.device.options().name, index, size = self.vrings[index].size,
            base = self.vrings[index].base, features = format_args!("{features:#x}"), "vring started");
        Ok(())
    }

    fn set_memory(&mut self, regions: Vec<Arc<MmapRegion>>) -> Result<()> {
        tracing::debug!(regions = regions.len(), "memory table");
        let mem = Arc::new(GuestMemory::new(regions.clone()).map_err(|e| {
            tracing::warn!(error = %e, "memory table refused");
            Error::InvalidParam
        })?);
        for index in 0..self.vrings.len() {
            if let Some(id) = self.vrings[index].running {
                if let Err(why) = self.reactor(index).set_memory(id, mem.clone()) {
                    tracing::warn!(index, ?why, "vring no longer in guest memory");
                }
            }
        }
        self.regions = regions;
        self.mem = mem;
        Ok(())
    }
}

fn map_region(region: &VhostUserMemoryRegion, file: &File) -> Result<Arc<MmapRegion>> {
    MmapRegion::map(
        file,
        region.guest_phys_addr,
        region.user_addr,
        region.memory_size,
        region.mmap_offset,
    )
    .map(Arc::new)
    .map_err(|e| {
        tracing::warn!(error = %e, "cannot map guest memory region");
        Error::InvalidParam
    })
}

fn eventfd(file: Option<File>) -> Option<EventFd> {
    // SAFETY: the front end sent an eventfd; we take sole ownership of the descriptor.
    file.map(|f| unsafe { EventFd::from_raw_fd(f.into_raw_fd()) })
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.stop_all();
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.offered_features() != 0 {
            return Err(Error::FeatureMismatch);
        }
        let logging_changed = (self.acked_features ^ features) & LOG_ALL_BIT != 0;
        self.acked_features = features;
        if logging_changed {
            tracing::info!(disk = %self.device.options().name,
                on = features & LOG_ALL_BIT != 0, "dirty logging (migration)");
            self.push_log_state();
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mapped = regions
            .iter()
            .zip(&files)
            .map(|(region, file)| map_region(region, file))
            .collect::<Result<Vec<_>>>()?;
        self.set_memory(mapped)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(Error::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        self.vring(index)?.addrs = Some(RingAddrs {
            desc: descriptor,
            avail: available,
            used,
        });
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.base = u16::try_from(base).map_err(|_| Error::InvalidParam)?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        // Answers only after every request in flight on the queue has completed.
        let base = match self.stop_queue(index as usize) {
            Ok(Some(base)) => base,
            Ok(None) => self.vrings[index as usize].base,
            Err(_) => return Err(invalid("GET_VRING_BASE: requests still in the backend")),
        };
        let vring = &mut self.vrings[index as usize];
        vring.enabled = false;
        // Stopped by the front end: a resume must not start it again, a new kick will.
        vring.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        // Polling mode without a kick fd is not supported: a kick fd starts the ring.
        let kick = eventfd(fd).ok_or(invalid("vring kick without an eventfd"))?;
        let vring = &mut self.vrings[usize::from(index)];
        if vring.paused {
            // Started on resume.
            vring.kick = Some(kick);
            return Ok(());
        }
        self.start_queue(usize::from(index), kick)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let index = usize::from(index);
        let call = eventfd(fd);
        let running = self.vring(index as u32)?.running;
        // One notification on every new call fd, as libvhost-user does: completions written
        // to the used ring by a previous daemon (a crash, or the source of a migration after
        // the guest's vCPUs stopped) may never have been signalled to the guest. A spurious
        // one costs the guest a look at its used ring. A running queue's reactor sends it
        // when it takes the fd.
        match (running, &call) {
            (Some(id), _) => {
                let dup = call.as_ref().and_then(|fd| fd.try_clone().ok());
                self.reactor(index).set_call(id, dup);
            }
            (None, Some(fd)) => {
                if let Err(e) = fd.write(1) {
                    tracing::warn!(index, error = %e, "cannot signal the new call fd");
                }
            }
            (None, None) => {}
        }
        self.vrings[index].call = call;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?.err = eventfd(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(Self::offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let acked = VhostUserProtocolFeatures::from_bits(features).ok_or(Error::InvalidParam)?;
        self.acked_protocol = acked;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        tracing::debug!(index, enable, "vring enable");
        let vring = self.vring(index)?;
        vring.enabled = enable;
        if let Some(id) = vring.running {
            self.reactor(index as usize).set_enabled(id, enable);
        }
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _: VhostUserConfigFlags) -> Result<Vec<u8>> {
        // The vhost crate checks offset + size <= VHOST_USER_CONFIG_SIZE on the socket; the
        // handler does not rely on it (a fuzzed GET_CONFIG of 2 GiB ran out of memory). QEMU
        // reads its whole virtio_blk_config, which may be longer than the fields pollblk
        // fills: the rest reads as zero.
        if u64::from(offset) + u64::from(size) > u64::from(VHOST_USER_CONFIG_SIZE) {
            return Err(invalid("GET_CONFIG past the config space"));
        }
        let config = self.device.config().to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(config.len());
        let end = (offset as usize + size as usize).min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        Ok(out)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _: VhostUserConfigFlags) -> Result<()> {
        // The only writable field is `writeback` (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == BlkConfig::WRITEBACK_OFFSET && buf.len() == 1 {
            self.device.set_writeback(buf[0] != 0);
            return Ok(());
        }
        Err(invalid("only the writeback config field is writable"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(invalid("shared objects are not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        request: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        if usize::from(request.num_queues) > self.vrings.len()
            || request.queue_size > MAX_QUEUE_SIZE
        {
            return Err(Error::InvalidParam);
        }
        let (region, file) = InflightRegion::create(request.num_queues, request.queue_size)
            .map_err(|e| {
                tracing::warn!(error = %e, "in-flight region refused");
                Error::InvalidParam
            })?;
        let size = pollblk_engine::inflight::queue_region_size(request.queue_size) as u64
            * u64::from(request.num_queues);
        self.inflight = Some(Arc::new(region));
        Ok((
            VhostUserInflight::new(size, 0, request.num_queues, request.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let region = InflightRegion::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| {
            tracing::warn!(error = %e, "in-flight region refused");
            Error::InvalidParam
        })?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let mapped = map_region(region, &fd)?;
        let mut regions = self.regions.clone();
        regions.push(mapped);
        self.set_memory(regions)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let mut regions = self.regions.clone();
        let before = regions.len();
        regions.retain(|r| {
            !(r.guest_phys_addr == region.guest_phys_addr && r.size == region.memory_size)
        });
        if regions.len() == before {
            return Err(Error::InvalidParam);
        }
        self.set_memory(regions)
    }

    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(invalid("DEVICE_STATE is not offered"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(invalid("DEVICE_STATE is not offered"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(invalid("SHMEM is not offered"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let mapped = DirtyLog::map(&file, log.mmap_offset, log.mmap_size).map_err(|e| {
            tracing::warn!(error = %e, "dirty log refused");
            Error::InvalidParam
        })?;
        self.dirty_log = Some(Arc::new(mapped));
        self.push_log_state();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Regression tests of fuzzer findings (fuzz/fuzz_targets/vhost_user.rs) that the socket
    //! path cannot reach (the vhost crate checks first), kept so the handler never relies on
    //! its caller.
    use super::*;
    use pollblk_engine::backend::NullBackend;
    use pollblk_engine::device::DiskOptions;
    use pollblk_engine::reactor::{PollConfig, Reactors};

    fn handler() -> (BlkHandler, Reactors) {
        let reactors = Reactors::start(&[0], PollConfig::default(), None).unwrap();
        let options = DiskOptions::named("t", 1);
        let device = Arc::new(BlkDevice::new(
            options,
            Arc::new(NullBackend::new(1 << 20, true)),
        ));
        let handle = reactors.for_queue(0).clone();
        (BlkHandler::new(device, vec![handle]), reactors)
    }

    #[test]
    fn get_config_past_the_config_space_is_refused_without_allocating_it() {
        let (mut h, reactors) = handler();
        let flags = VhostUserConfigFlags::empty();
        assert!(h.get_config(13_277_756, 2_306_897_664, flags).is_err());
        assert!(h.get_config(0, VHOST_USER_CONFIG_SIZE + 1, flags).is_err());
        let config = h.get_config(0, 60, flags).unwrap();
        assert_eq!(config.len(), 60);
        assert_eq!(
            u64::from_le_bytes(config[..8].try_into().unwrap()),
            2048,
            "capacity"
        );
        h.stop_all();
        reactors.shutdown();
    }
}
