//! One virtual block device's back end: the XenBus handshake (seed 003's keys), rings mapped
//! and handed to the reactors when the front end connects, torn down when it closes, and
//! offered again when it comes back.
//!
//! States (xen/io/xenbus.h): the back end goes Initialising -> InitWait (features written);
//! when the front end is Initialised (or Connected) it maps the rings and goes Connected; a
//! front end Closing or Closed makes it disconnect and follow; a front end Initialising again
//! after Closed makes it offer the device again (InitWait). A front end asking for more than
//! was offered is refused as Linux's xenbus_dev_fatal refuses: "ERRNO reason" in
//! `error/<backend path>/error` (and the reason alone in the back end's own `error` key),
//! then the back end goes Closing.

use crate::abi::{self, state, Abi};
use crate::platform::{Platform, XenStore};
use crate::ring::BlkifRing;
use pollblk_engine::device::BlkDevice;
use pollblk_engine::queue::RequestQueue;
use pollblk_engine::reactor::{QueueId, ReactorHandle, StopError};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a ring may take to finish its requests when the front end closes.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the handshake thread looks at the store even without a change.
const POLL: Duration = Duration::from_millis(500);

/// Where a device's keys live.
#[derive(Clone, Debug)]
pub struct VbdAddress {
    /// The front end's domain.
    pub domid: u32,
    /// The virtual device number (for example 51712 for xvda).
    pub devid: u32,
}

impl VbdAddress {
    pub fn backend_dir(&self) -> String {
        format!("/local/domain/0/backend/vbd/{}/{}", self.domid, self.devid)
    }

    pub fn frontend_dir(&self) -> String {
        format!("/local/domain/{}/device/vbd/{}", self.domid, self.devid)
    }

    /// Where xenbus_dev_fatal reports a dom0 back end's failure: `error/<nodename>/error`,
    /// relative to the back end's domain.
    pub fn error_key(&self) -> String {
        format!(
            "/local/domain/0/error/backend/vbd/{}/{}/error",
            self.domid, self.devid
        )
    }
}

/// Why a front end was refused: an errno for xenbus_dev_fatal's "%i " and the reason.
struct Refusal {
    errno: i32,
    why: String,
}

impl Refusal {
    /// The front end asked for something this back end does not offer.
    fn invalid(why: String) -> Refusal {
        Refusal {
            errno: libc::EINVAL,
            why,
        }
    }

    /// Its rings or channels could not be set up.
    fn io(why: String) -> Refusal {
        Refusal {
            errno: libc::EIO,
            why,
        }
    }
}

/// A running back end; stopping it disconnects the front end's rings.
pub struct Vbd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The back end's XenBus state, as last written.
    state: Arc<AtomicU32>,
}

impl Vbd {
    /// Offers `device` to the front end at `address`; rings go to `reactors` round robin.
    /// With `toolstack`, also writes the keys a toolstack would (the loopback platform has
    /// none): the front end's `backend` and `backend-id`, the back end's `frontend`.
    pub fn start(
        platform: Arc<dyn Platform>,
        address: VbdAddress,
        device: Arc<BlkDevice>,
        reactors: Vec<ReactorHandle>,
        toolstack: bool,
    ) -> io::Result<Vbd> {
        let mut handshake = Handshake {
            platform,
            address,
            device,
            reactors,
            rings: Vec::new(),
            state: state::INITIALISING,
            shared_state: Arc::new(AtomicU32::new(state::INITIALISING)),
        };
        let shared_state = handshake.shared_state.clone();
        handshake.offer(toolstack)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("xen-vbd".into())
            .spawn(move || handshake.run(&thread_stop))?;
        Ok(Vbd {
            stop,
            thread: Some(thread),
            state: shared_state,
        })
    }

    /// Whether a front end is connected (the back end is in state Connected).
    pub fn connected(&self) -> bool {
        self.state.load(Ordering::Acquire) == state::CONNECTED
    }
}

impl Drop for Vbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A ring attached to a reactor.
struct Attached {
    id: QueueId,
    reactor: ReactorHandle,
}

struct Handshake {
    platform: Arc<dyn Platform>,
    address: VbdAddress,
    device: Arc<BlkDevice>,
    reactors: Vec<ReactorHandle>,
    rings: Vec<Attached>,
    state: u32,
    /// `state` for the Vbd's owner.
    shared_state: Arc<AtomicU32>,
}

impl Handshake {
    fn store(&self) -> &dyn XenStore {
        self.platform.store()
    }

    fn be(&self, key: &str) -> String {
        format!("{}/{key}", self.address.backend_dir())
    }

    fn fe(&self, key: &str) -> String {
        format!("{}/{key}", self.address.frontend_dir())
    }

    fn set_state(&mut self, new: u32) -> io::Result<()> {
        tracing::debug!(
            domid = self.address.domid,
            devid = self.address.devid,
            from = self.state,
            to = new,
            "blkif back end state"
        );
        self.state = new;
        self.shared_state.store(new, Ordering::Release);
        self.store().write(&self.be("state"), &new.to_string())
    }

    /// Writes the features and goes InitWait.
    fn offer(&mut self, toolstack: bool) -> io::Result<()> {
        let store = self.platform.store();
        if toolstack {
            store.write(&self.fe("backend"), &self.address.backend_dir())?;
            store.write(&self.fe("backend-id"), "0")?;
            store.write(&self.be("frontend"), &self.address.frontend_dir())?;
            store.write(&self.be("frontend-id"), &self.address.domid.to_string())?;
            // The toolstack's access mode, which blkback serves read-only without a 'w'.
            let mode = if self.device.options().readonly {
                "r"
            } else {
                "w"
            };
            store.write(&self.be("mode"), mode)?;
        }
        self.set_state(state::INITIALISING)?;
        let store = self.platform.store();
        let options = self.device.options();
        let info = self.device.backend().info();
        let keys = [
            ("multi-queue-max-queues", options.num_queues.to_string()),
            ("max-ring-page-order", abi::MAX_RING_PAGE_ORDER.to_string()),
            ("feature-flush-cache", "1".into()),
            ("feature-persistent", "1".into()),
            (
                "feature-max-indirect-segments",
                abi::MAX_INDIRECT_SEGMENTS.to_string(),
            ),
            (
                "feature-discard",
                u8::from(info.discard && !options.readonly).to_string(),
            ),
            ("discard-granularity", options.block_size.to_string()),
            ("discard-alignment", "0".into()),
            ("discard-secure", "0".into()),
        ];
        for (key, value) in keys {
            store.write(&self.be(key), &value)?;
        }
        self.write_disk_info()?;
        self.set_state(state::INIT_WAIT)
    }

    /// sectors (in 512-byte units), sector-size, physical-sector-size, info.
    fn write_disk_info(&self) -> io::Result<()> {
        let store = self.store();
        let options = self.device.options();
        store.write(
            &self.be("sectors"),
            &self.device.capacity_sectors().to_string(),
        )?;
        store.write(&self.be("sector-size"), &options.block_size.to_string())?;
        store.write(
            &self.be("physical-sector-size"),
            &options.block_size.to_string(),
        )?;
        let info = if options.readonly { 4 } else { 0 }; // VDISK_READONLY
        store.write(&self.be("info"), &info.to_string())
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut seen = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.step() {
                tracing::warn!(domid = self.address.domid, devid = self.address.devid,
                    error = %e, "blkif handshake");
            }
            match self
                .store()
                .wait_change(&self.address.frontend_dir(), seen, POLL)
            {
                Ok(next) => seen = next,
                Err(_) => std::thread::sleep(POLL),
            }
        }
        self.disconnect();
        let _ = self.set_state(state::CLOSED);
    }

    fn frontend_state(&self) -> u32 {
        self.store()
            .read(&self.fe("state"))
            .ok()
            .flatten()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Reacts to the front end's state.
    fn step(&mut self) -> io::Result<()> {
        let front = self.frontend_state();
        // Rings whose requests outlived a disconnect: nothing is offered again until they
        // stopped (they still write into the front end's pages).
        if !self.rings.is_empty() && self.state != state::CONNECTED && !self.disconnect() {
            return Ok(());
        }
        match (front, self.state) {
            (state::INITIALISED | state::CONNECTED, state::INIT_WAIT) => {
                match self.connect().and_then(|()| {
                    self.write_disk_info()
                        .map_err(|e| Refusal::io(e.to_string()))
                }) {
                    Ok(()) => self.set_state(state::CONNECTED),
                    Err(refusal) => self.refuse(refusal),
                }
            }
            (state::CLOSING, s) if s != state::CLOSING && s != state::CLOSED => {
                self.disconnect();
                self.set_state(state::CLOSING)
            }
            // Closed, or gone (no state key: a destroyed domain) while it had the device.
            (state::CLOSED, s) if s != state::CLOSED => {
                self.disconnect();
                self.set_state(state::CLOSED)
            }
            (0, state::CONNECTED | state::CLOSING) => {
                self.disconnect();
                self.set_state(state::CLOSED)
            }
            // The front end comes back after closing, or restarted without closing: offer
            // the device again (its rings are stopped first).
            (state::INITIALISING, state::CLOSED | state::CLOSING | state::CONNECTED) => {
                if !self.disconnect() {
                    return self.set_state(state::CLOSING);
                }
                self.store().remove(&self.be("error"))?;
                self.store().remove(&self.address.error_key())?;
                self.set_state(state::INIT_WAIT)
            }
            _ => Ok(()),
        }
    }

    /// Tells the front end why it is refused, as xenbus_dev_fatal does, and goes Closing.
    fn refuse(&mut self, refusal: Refusal) -> io::Result<()> {
        self.disconnect();
        let Refusal { errno, why } = refusal;
        tracing::warn!(domid = self.address.domid, devid = self.address.devid, %why,
            "blkif front end refused");
        self.store()
            .write(&self.address.error_key(), &format!("{errno} {why}"))?;
        self.store().write(&self.be("error"), &why)?;
        self.set_state(state::CLOSING)
    }

    /// A front-end key as a number.
    fn fe_number(&self, key: &str) -> Result<Option<u32>, Refusal> {
        match self
            .store()
            .read(&self.fe(key))
            .map_err(|e| Refusal::io(e.to_string()))?
        {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Refusal::invalid(format!("{key}={v:?} is not a number"))),
        }
    }

    /// A toolstack's `mode` without 'w' asks for a read-only disk (blkback's rule); a
    /// writable export is not quietly served writable against it.
    fn check_mode(&self) -> Result<(), Refusal> {
        let mode = self
            .store()
            .read(&self.be("mode"))
            .map_err(|e| Refusal::io(e.to_string()))?;
        match mode {
            Some(mode) if !mode.contains('w') && !self.device.options().readonly => {
                Err(Refusal::invalid(format!(
                    "the toolstack's mode is {mode:?} (read-only) but the disk is exported \
                     writable: export it with readonly=on"
                )))
            }
            _ => Ok(()),
        }
    }

    /// What the front end asks for, checked against what was offered: (queues, ring page
    /// order, ABI).
    fn negotiate(&self) -> Result<(u32, u32, Abi), Refusal> {
        self.check_mode()?;
        let max_queues = u32::from(self.device.options().num_queues);
        let queues = self.fe_number("multi-queue-num-queues")?.unwrap_or(1);
        if queues == 0 || queues > max_queues {
            return Err(Refusal::invalid(format!(
                "multi-queue-num-queues={queues}: this back end offers 1 to {max_queues}"
            )));
        }
        let order = self.fe_number("ring-page-order")?.unwrap_or(0);
        if order > abi::MAX_RING_PAGE_ORDER {
            return Err(Refusal::invalid(format!(
                "ring-page-order={order}: this back end offers at most {}",
                abi::MAX_RING_PAGE_ORDER
            )));
        }
        if self.platform.needs_persistent_grants()
            && self.fe_number("feature-persistent")? != Some(1)
        {
            return Err(Refusal::invalid(
                "this back end needs feature-persistent=1 from the front end".into(),
            ));
        }
        let protocol = self
            .store()
            .read(&self.fe("protocol"))
            .map_err(|e| Refusal::io(e.to_string()))?;
        let abi = Abi::from_protocol(protocol.as_deref()).map_err(Refusal::invalid)?;
        Ok((queues, order, abi))
    }

    /// Maps ring `q` (under `prefix`) and its event channel: the ring, ready to attach.
    fn map_ring(&self, q: u32, queues: u32, order: u32, abi: Abi) -> Result<BlkifRing, Refusal> {
        // One queue: the keys at the top; more: under queue-N (blkif.h).
        let prefix = if queues == 1 {
            String::new()
        } else {
            format!("queue-{q}/")
        };
        let missing = |key: &str| Refusal::invalid(format!("{key} is missing"));
        let mut refs = Vec::with_capacity(1 << order);
        for k in 0..1u32 << order {
            let key = if order == 0 {
                format!("{prefix}ring-ref")
            } else {
                format!("{prefix}ring-ref{k}")
            };
            refs.push(self.fe_number(&key)?.ok_or_else(|| missing(&key))?);
        }
        let key = format!("{prefix}event-channel");
        let port = self.fe_number(&key)?.ok_or_else(|| missing(&key))?;
        let domid = self.address.domid;
        let mut grants = self
            .platform
            .grants(domid)
            .map_err(|e| Refusal::io(e.to_string()))?;
        let mapped = grants
            .map_ring(&refs)
            .map_err(|e| Refusal::io(format!("mapping ring {q}: {e}")))?;
        let events = self
            .platform
            .bind(domid, port)
            .map_err(|e| Refusal::io(format!("binding event channel {port}: {e}")))?;
        Ok(BlkifRing::new(mapped, abi, grants, events))
    }

    /// Maps every ring the front end set up and hands them to the reactors.
    fn connect(&mut self) -> Result<(), Refusal> {
        let (queues, order, abi) = self.negotiate()?;
        for q in 0..queues {
            let ring = self.map_ring(q, queues, order, abi)?;
            let reactor = self.reactors[q as usize % self.reactors.len()].clone();
            let id = QueueId::fresh();
            let stats = self.device.queue_stats(q as usize).clone();
            let queue = RequestQueue::new(self.device.clone(), ring, stats, true);
            reactor.attach_queue(id, Box::new(queue));
            self.rings.push(Attached { id, reactor });
        }
        let (domid, pages) = (self.address.domid, 1 << order);
        tracing::info!(domid, devid = self.address.devid, queues, ring_pages = pages,
            abi = ?abi, disk = %self.device.options().name, "blkif front end connected");
        Ok(())
    }

    /// Stops every ring after its requests complete; false if some still have requests in
    /// the backend after the timeout (they stay listed and are asked again next time).
    fn disconnect(&mut self) -> bool {
        let name = self.device.options().name.clone();
        self.rings.retain(|ring| match ring.reactor.stop_within(ring.id, STOP_TIMEOUT) {
            Ok(_) | Err(StopError::ReactorGone) => false,
            Err(StopError::Timeout) => {
                tracing::error!(disk = %name, "blkif ring did not stop: requests still in the backend");
                true
            }
        });
        self.rings.is_empty()
    }
}
