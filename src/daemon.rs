//! The disks of a running daemon: opening volumes, starting and stopping their transports,
//! pausing and growing them. `serve` builds one at start; the control socket changes it at
//! run time, always under its mutex (control-plane only: the data path never takes it).

use crate::export::{self, Export, Transport, Volume};
use crate::frontend::{Frontend, Refused};
use crate::{image_format, qos_options};
use pollblk_engine::backend::{Backend, FileBackend, NullBackend, ThinBackend, ThinWorkers};
use pollblk_engine::device::{BlkDevice, DeviceStats, DiskOptions, GuestStatsOptions};
use pollblk_engine::qos::{QosConfig, Throttle};
use pollblk_engine::reactor::ReactorHandle;
use pollblk_engine::stats::sets::PoolStat;
use pollblk_engine::stats::StatsDir;
use pollblk_engine::thin::Pool;
use pollblk_engine::unix_socket::Access;
use pollblk_vhost_user::Server;
use pollblk_xen::backend::{Vbd, VbdAddress};
use pollblk_xen::loopback::Loopback;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often a thin pool commits changed mappings besides on FLUSH, unless told otherwise.
pub const DEFAULT_THIN_COMMIT_PERIOD: Duration = Duration::from_secs(1);

/// Longest disk name: it is also the default serial (GET_ID holds 20 bytes).
const MAX_NAME: usize = 20;
/// File descriptors one disk may hold: its listening socket and statistics files, and once
/// a front end is attached, the connection, the memory table's files, and a kick, call and
/// error eventfd per queue (measured: 7 for a one-queue disk; more queues, more eventfds).
pub const FDS_PER_DISK: u64 = 8;
/// Files the daemon holds whatever its disks: io_urings, control socket, logs, libraries.
const FDS_BESIDE_DISKS: u64 = 64;

/// Raises the soft limit on open files to the hard one (most hosts start services with a
/// soft limit of 1024 and a far higher hard one); returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Refuses `disks` disks when the open-files limit (raised to its hard value first) cannot
/// hold them with their front ends attached. Counted from the disks, not from
/// /proc/self/fd: listing 7,000 open files took 6 ms of every export_add at 1,000 disks.
pub fn check_fd_limit(disks: usize) -> Result<(), String> {
    let limit = raise_fd_limit();
    let needed = FDS_PER_DISK * disks as u64 + FDS_BESIDE_DISKS;
    if needed > limit {
        return Err(format!(
            "serving {disks} disk(s) needs about {needed} open files ({FDS_PER_DISK} per disk \
             with its front end attached); this process may open {limit}: raise the limit \
             (ulimit -n, or LimitNOFILE= in the systemd unit)"
        ));
    }
    Ok(())
}

/// One served disk.
pub struct Disk {
    pub name: String,
    /// The `--export` string it was added with (what --persist saves).
    pub spec: String,
    export: Export,
    device: Arc<BlkDevice>,
    frontend: Box<dyn Frontend>,
    /// The reactor of queue 0; queue i is on reactor (first_reactor + i) mod reactors.
    first_reactor: usize,
}

/// Why an operation on the daemon failed; the control socket maps these to error codes.
#[derive(Debug)]
pub enum DaemonError {
    /// No disk (or pool) by that name.
    NotFound(String),
    /// The request cannot be done as asked (bad argument, conflict, unsupported).
    Invalid(String),
    /// A front end uses the disk.
    InUse(String),
    /// The operation was tried and failed.
    Failed(String),
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonError::NotFound(m)
            | DaemonError::Invalid(m)
            | DaemonError::InUse(m)
            | DaemonError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<DaemonError> for String {
    fn from(e: DaemonError) -> String {
        e.to_string()
    }
}

/// Thin pools opened by this daemon, shared by every export of their volumes.
type Pools = HashMap<PathBuf, OpenPool>;

/// An open pool and the worker threads its served volumes share.
struct OpenPool {
    pool: Arc<Pool>,
    workers: Arc<ThinWorkers>,
    /// Dropping it stops the pool's periodic commits.
    _committer: Option<std::sync::mpsc::Sender<()>>,
}

/// Commits `pool`'s metadata every `period` while mappings changed (dm-thin's
/// commit_period), so space a guest discards without a FLUSH becomes free, and `pool status`
/// current, within a period. A commit syncs the data first, as a FLUSH does. Stops when the
/// returned sender is dropped.
fn start_committer(
    pool: &Arc<Pool>,
    period: Duration,
    label: &str,
) -> std::io::Result<std::sync::mpsc::Sender<()>> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let pool = pool.clone();
    std::thread::Builder::new()
        .name(format!("thin-commit-{label}"))
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period)
            {
                if pool.has_uncommitted() {
                    if let Err(e) = pool.flush() {
                        tracing::error!(error = %e, "periodic commit of a thin pool failed");
                    }
                }
            }
        })?;
    Ok(stop)
}

/// The Xen platforms exports share: one loopback store per directory, one real Xen.
#[derive(Default)]
struct XenPlatforms {
    loopbacks: HashMap<PathBuf, Arc<Loopback>>,
    /// NBD listeners by address, alive while an export uses them.
    nbd: HashMap<pollblk_nbd::server::Address, std::sync::Weak<pollblk_nbd::server::Listener>>,
    #[cfg(feature = "xen")]
    xen: Option<Arc<pollblk_xen::xen::Xen>>,
}

/// The daemon's disks and what they share.
pub struct Daemon {
    reactors: Vec<ReactorHandle>,
    stats_dir: StatsDir,
    guest_interval: Duration,
    pools: Pools,
    /// Pools opened so far (numbers their statistics).
    pools_opened: usize,
    platforms: XenPlatforms,
    /// Throttle groups (qos-group=NAME): the buckets their disks share.
    groups: HashMap<String, Arc<Throttle>>,
    /// Owner, group and mode of vhost-user sockets whose export does not say.
    socket_access: Access,
    /// How often thin pools commit changed mappings besides on FLUSH (None: only then).
    thin_commit_period: Option<Duration>,
    disks: Vec<Disk>,
}

/// What `qos_set` / `qos_get` work on.
pub enum QosTarget<'a> {
    Disk(&'a str),
    Group(&'a str),
}

/// A disk name: 1 to 20 of [A-Za-z0-9_.-] (it names statistics files and is the default
/// serial).
fn check_name(name: &str) -> Result<(), DaemonError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(DaemonError::Invalid(format!(
            "disk name {name:?}: 1 to {MAX_NAME} of A-Z a-z 0-9 _ . - (not starting with .)"
        )))
    }
}

impl Daemon {
    pub fn new(
        reactors: Vec<ReactorHandle>,
        stats_dir: StatsDir,
        guest_interval: Duration,
    ) -> Self {
        Daemon {
            reactors,
            stats_dir,
            guest_interval,
            pools: Pools::new(),
            pools_opened: 0,
            platforms: XenPlatforms::default(),
            groups: HashMap::new(),
            socket_access: Access::default(),
            thin_commit_period: Some(DEFAULT_THIN_COMMIT_PERIOD),
            disks: Vec::new(),
        }
    }

    /// Owner, group and mode of the vhost-user sockets of exports that do not give theirs.
    pub fn set_socket_access(&mut self, access: Access) {
        self.socket_access = access;
    }

    /// How often pools opened from now on commit changed mappings (None: only on FLUSH).
    pub fn set_thin_commit_period(&mut self, period: Option<Duration>) {
        self.thin_commit_period = period;
    }

    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    pub fn stats_dir(&self) -> &Path {
        self.stats_dir.path()
    }

    pub fn disk(&self, name: &str) -> Result<&Disk, DaemonError> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| DaemonError::NotFound(format!("no disk named {name:?}")))
    }

    /// The first free `diskN`.
    fn free_name(&self) -> String {
        // One pass over the disks, not one per candidate: at 1,000 disks that was a quarter
        // of a billion name comparisons over a config file's start.
        let taken: std::collections::HashSet<&str> =
            self.disks.iter().map(|d| d.name.as_str()).collect();
        (0..)
            .map(|i| format!("disk{i}"))
            .find(|n| !taken.contains(n.as_str()))
            .expect("a free name")
    }

    /// Refuses an export that would serve something already served.
    fn check_conflicts(&self, export: &Export) -> Result<(), DaemonError> {
        for other in &self.disks {
            let theirs = &other.export;
            // NBD exports share a listener (told apart by name: the listener refuses twins).
            let nbd = matches!(export.transport, Transport::Nbd { .. });
            if theirs.transport == export.transport && !nbd {
                return Err(DaemonError::Invalid(format!(
                    "{} is already served by {}",
                    export.transport, other.name
                )));
            }
            match (&export.volume, &theirs.volume) {
                (Volume::Rbd(a), Volume::Rbd(b))
                    if a.pool == b.pool && a.image == b.image && a.conf == b.conf =>
                {
                    return Err(DaemonError::Invalid(format!(
                        "rbd={}/{} is already exported by {}: one image, one handle (it holds \
                         the image's exclusive lock)",
                        a.pool, a.image, other.name
                    )));
                }
                (
                    Volume::Thin { pool, volume },
                    Volume::Thin {
                        pool: p2,
                        volume: v2,
                    },
                ) if volume == v2 && same_path(pool, p2) => {
                    return Err(DaemonError::Invalid(format!(
                        "volume {volume} of pool {} is already exported by {}",
                        pool.display(),
                        other.name
                    )));
                }
                (Volume::File(a), Volume::File(b)) if same_path(a, b) => {
                    return Err(DaemonError::Invalid(format!(
                        "file {} is already exported by {}",
                        a.display(),
                        other.name
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Opens the volume of `spec` and starts serving it as `name` (default: the first free
    /// diskN).
    pub fn add(&mut self, spec: &str, name: Option<&str>) -> Result<String, DaemonError> {
        let export: Export = spec.parse().map_err(DaemonError::Invalid)?;
        let name = match (name, export.name.as_deref()) {
            (Some(given), Some(in_spec)) if given != in_spec => {
                return Err(DaemonError::Invalid(format!(
                    "the disk is named {given:?} and its export says name={in_spec}: give one"
                )))
            }
            (given, in_spec) => given.or(in_spec),
        };
        let name = match name {
            Some(name) => {
                check_name(name)?;
                if self.disks.iter().any(|d| d.name == name) {
                    return Err(DaemonError::Invalid(format!(
                        "a disk named {name} exists already"
                    )));
                }
                name.to_string()
            }
            None => self.free_name(),
        };
        self.check_conflicts(&export)?;
        check_fd_limit(self.disks.len() + 1).map_err(DaemonError::Failed)?;
        let first_reactor = self.placement(&export)?;
        let throttle = self.throttle_for(&export)?;
        // A pool opened for this disk must not stay open (and locked) if the disk fails.
        let device = match self.open_device(&name, &export, throttle.clone()) {
            Ok(device) => device,
            Err(e) => {
                self.close_unused_pools();
                return Err(e);
            }
        };
        let frontend = self.start_frontend(&export, &device, first_reactor);
        let frontend = match frontend {
            Ok(frontend) => frontend,
            Err(e) => {
                self.close_unused_pools();
                return Err(e);
            }
        };
        tracing::info!(
            disk = %name,
            transport = %export.transport,
            sectors = device.capacity_sectors(),
            queues = export.num_queues,
            first_reactor,
            "serving"
        );
        if let Some(group) = &export.qos_group {
            self.groups.entry(group.clone()).or_insert(throttle);
        }
        self.disks.push(Disk {
            name: name.clone(),
            spec: spec.to_string(),
            export,
            device,
            frontend,
            first_reactor,
        });
        Ok(name)
    }

    /// The buckets of a new disk: its group's (joined, or started with the export's limits)
    /// or its own.
    fn throttle_for(&self, export: &Export) -> Result<Arc<Throttle>, DaemonError> {
        let Some(group) = &export.qos_group else {
            return Ok(Arc::new(Throttle::new(&export.qos)));
        };
        check_name(group)?;
        let Some(throttle) = self.groups.get(group) else {
            return Ok(Arc::new(Throttle::new(&export.qos)));
        };
        let current = throttle.config();
        if !export.qos.is_unlimited() && export.qos != current {
            return Err(DaemonError::Invalid(format!(
                "qos-group={group} has the limits \"{}\" already and this export gives \"{}\": \
                 give the same ones, or none to share the group's (qos_set group={group} \
                 changes them)",
                qos_options::to_options(&current),
                qos_options::to_options(&export.qos)
            )));
        }
        Ok(throttle.clone())
    }

    /// Changes the limits of a disk or of a group (every disk of it) at once: the next
    /// request of each queue meets them, requests waiting look again within 10 ms.
    pub fn qos_set(&mut self, target: QosTarget, limits: QosConfig) -> Result<(), DaemonError> {
        let throttle = self.throttle_of(&target)?;
        throttle.set(&limits);
        for disk in &mut self.disks {
            if Arc::ptr_eq(disk.device.throttle(), &throttle) {
                disk.spec = qos_options::with_limits(&disk.spec, &limits);
                disk.export.qos = limits.clone();
            }
        }
        match target {
            QosTarget::Disk(name) | QosTarget::Group(name) => {
                tracing::info!(target = name, limits = %qos_options::to_options(&limits), "limits set")
            }
        }
        Ok(())
    }

    /// The limits of a disk or a group, and the disks that share them.
    pub fn qos_get(&self, target: QosTarget) -> Result<serde_json::Value, DaemonError> {
        let throttle = self.throttle_of(&target)?;
        let disks: Vec<&str> = self
            .disks
            .iter()
            .filter(|d| Arc::ptr_eq(d.device.throttle(), &throttle))
            .map(|d| d.name.as_str())
            .collect();
        let group = match target {
            QosTarget::Group(g) => Some(g),
            QosTarget::Disk(name) => self.disk(name)?.export.qos_group.as_deref(),
        };
        Ok(serde_json::json!({
            "group": group,
            "limits": qos_options::to_options(&throttle.config()),
            "disks": disks,
        }))
    }

    fn throttle_of(&self, target: &QosTarget) -> Result<Arc<Throttle>, DaemonError> {
        match *target {
            QosTarget::Group(group) => self.groups.get(group).cloned().ok_or_else(|| {
                DaemonError::NotFound(format!("no qos-group {group} (no disk names it)"))
            }),
            QosTarget::Disk(name) => {
                let disk = self.disk(name)?;
                match &disk.export.qos_group {
                    Some(group) => Err(DaemonError::Invalid(format!(
                        "{name} shares the limits of qos-group={group}: set them with group={group}"
                    ))),
                    None => Ok(disk.device.throttle().clone()),
                }
            }
        }
    }

    /// Stops serving `name`: refused while a front end is connected unless `force`, which
    /// disconnects it (its in-flight requests complete first).
    pub fn remove(&mut self, name: &str, force: bool) -> Result<(), DaemonError> {
        let disk = self.disk(name)?;
        if disk.frontend.connected() && !force {
            let how = disk.frontend.detach_hint();
            return Err(DaemonError::InUse(format!(
                "{name} is in use by a front end on {}: {how}, or remove it with force=true",
                disk.export.transport
            )));
        }
        let at = self
            .disks
            .iter()
            .position(|d| d.name == name)
            .expect("found above");
        let disk = self.disks.remove(at);
        if let Some(group) = &disk.export.qos_group {
            if !self
                .disks
                .iter()
                .any(|d| d.export.qos_group.as_ref() == Some(group))
            {
                self.groups.remove(group);
            }
        }
        disk.frontend.stop();
        let synced = disk.device.backend().sync_all();
        drop(disk.device);
        self.close_unused_pools();
        tracing::info!(disk = %name, "removed");
        synced.map_err(|e| DaemonError::Failed(format!("{name} removed, but its sync failed: {e}")))
    }

    /// Closes thin pools no disk uses any more (releasing their lock for `pollblk pool`).
    fn close_unused_pools(&mut self) {
        let used: Vec<PathBuf> = self
            .disks
            .iter()
            .filter_map(|d| match &d.export.volume {
                Volume::Thin { pool, .. } => pool.canonicalize().ok(),
                _ => None,
            })
            .collect();
        self.pools.retain(|dir, _| used.contains(dir));
    }

    /// Grows disk `name` to `size_bytes` and tells its front end through a config-change
    /// notification. Its queues keep running: every backend grows under I/O (a request is
    /// checked against the size it sees, and a thin volume's map grows in place). Returns
    /// whether a front end was told.
    pub fn grow(&mut self, name: &str, size_bytes: u64) -> Result<bool, DaemonError> {
        let disk = self.disk(name)?;
        disk.frontend
            .resizes()
            .map_err(|e| DaemonError::Invalid(format!("{name}: resizing is {}", e.0)))?;
        disk.device
            .grow(size_bytes)
            .map_err(|e| DaemonError::Invalid(format!("{name}: {e}")))?;
        tracing::info!(disk = %name, size_bytes, "grown");
        // A null disk's size lives in its spec: --persist must bring it back grown.
        if let Some(disk) = self.disks.iter_mut().find(|d| d.name == name) {
            if matches!(disk.export.volume, Volume::Null { .. }) {
                disk.spec = with_size(&disk.spec, size_bytes);
            }
        }
        self.disk(name)?
            .frontend
            .announce_resize()
            .map_err(|e| DaemonError::Failed(format!("{name} grew, but {e}")))
    }

    /// Pauses queue `queue` (or all running ones) of `name`: (queue, avail index) each.
    pub fn pause(
        &self,
        name: &str,
        queue: Option<usize>,
    ) -> Result<Vec<(usize, u16)>, DaemonError> {
        let frontend = &self.disk(name)?.frontend;
        frontend
            .pause(queue)
            .map_err(|e| refused(name, "pausing queues", e))
    }

    /// Resumes queue `queue` (or all paused ones) of `name`; returns the queues resumed.
    pub fn resume(&self, name: &str, queue: Option<usize>) -> Result<Vec<usize>, DaemonError> {
        let frontend = &self.disk(name)?.frontend;
        frontend
            .resume(queue)
            .map_err(|e| refused(name, "resuming queues", e))
    }

    /// What `export_list` shows of one disk.
    pub fn describe(&self, disk: &Disk) -> serde_json::Value {
        let queues = disk.frontend.queue_states();
        let n = self.reactors.len();
        let reactors: Vec<usize> = (0..usize::from(disk.export.num_queues))
            .map(|q| (disk.first_reactor + q) % n)
            .collect();
        serde_json::json!({
            "name": disk.name,
            "spec": disk.spec,
            "transport": disk.export.transport.to_string(),
            "size_bytes": disk.device.capacity_sectors() * 512,
            "block_size": disk.export.block_size,
            "num_queues": disk.export.num_queues,
            "readonly": disk.export.readonly,
            "connected": disk.frontend.connected(),
            "queues": queues,
            "reactors": reactors,
            "qos": {
                "group": disk.export.qos_group,
                "limits": qos_options::to_options(&disk.device.throttle().config()),
            },
        })
    }

    /// The statistics file of disk `name`, or of its queue `queue`.
    pub fn stats_file(&self, name: &str, queue: Option<usize>) -> Result<PathBuf, DaemonError> {
        let device = &self.disk(name)?.device;
        let file = match queue {
            None => device.disk_stats().file().clone(),
            Some(q) if q < usize::from(device.options().num_queues) => {
                device.queue_stats(q).file().clone()
            }
            Some(q) => {
                return Err(DaemonError::Invalid(format!(
                    "{name} has no queue {q} (it has {})",
                    device.options().num_queues
                )))
            }
        };
        file.path()
            .map(Path::to_owned)
            .ok_or_else(|| DaemonError::Failed(format!("{name}: statistics are not in a file")))
    }

    /// Every statistics file of disk `name` (the disk's, then its queues').
    pub fn stats_files(&self, name: &str) -> Result<Vec<PathBuf>, DaemonError> {
        let queues = usize::from(self.disk(name)?.export.num_queues);
        std::iter::once(None)
            .chain((0..queues).map(Some))
            .map(|q| self.stats_file(name, q))
            .collect()
    }

    /// The pool in `dir` as this daemon has it open, if it does.
    pub fn open_pool(&self, dir: &Path) -> Option<Arc<Pool>> {
        Some(self.pools.get(&dir.canonicalize().ok()?)?.pool.clone())
    }

    /// Whether a disk serves volume `volume` of the pool in `dir`.
    pub fn volume_exported(&self, dir: &Path, volume: &str) -> Option<&str> {
        self.disks.iter().find_map(|d| match &d.export.volume {
            Volume::Thin { pool, volume: v } if v == volume && same_path(pool, dir) => {
                Some(d.name.as_str())
            }
            _ => None,
        })
    }

    /// Stops every disk (draining its queues) and syncs its volume.
    pub fn shutdown(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        for disk in self.disks.drain(..) {
            disk.frontend.stop();
            if let Err(e) = disk.device.backend().sync_all() {
                result = Err(format!("{}: sync failed: {e}", disk.name));
            }
        }
        self.platforms = XenPlatforms::default();
        result
    }

    /// The volume of `export`, opened.
    fn open_volume(&mut self, export: &Export) -> Result<Arc<dyn Backend>, DaemonError> {
        let failed = DaemonError::Failed;
        Ok(match &export.volume {
            Volume::Thin { pool, volume } => {
                let opened = self.pool(pool)?;
                let is_snapshot = opened.pool.volume(volume).is_ok_and(|v| v.snapshot);
                if is_snapshot && !export.readonly {
                    return Err(DaemonError::Invalid(format!(
                        "volume {volume} of pool {} is a snapshot, which is read-only: serve \
                         it with readonly=on (or clone it: pollblk pool volume clone)",
                        pool.display()
                    )));
                }
                Arc::new(
                    ThinBackend::open(opened.pool.clone(), opened.workers.clone(), volume)
                        .map_err(|e| failed(format!("pool {}: {e}", pool.display())))?,
                )
            }
            Volume::File(path) if !export.force_raw && image_format::sniff(path).is_some() => {
                let format = image_format::sniff(path).expect("just found");
                return Err(DaemonError::Invalid(format!(
                    "file {} is a {format} image, not raw: a guest would see the image's \
                     container, and its writes would corrupt it. Convert it (qemu-img convert \
                     -O raw {} {}.raw) and serve that, or give format=raw to serve these bytes \
                     as they are",
                    path.display(),
                    path.display(),
                    path.display()
                )));
            }
            Volume::File(path) => Arc::new(
                FileBackend::open(path, export.readonly, export.block_size)
                    .map_err(|e| failed(format!("file {}: {e}", path.display())))?,
            ),
            Volume::Null {
                size_bytes,
                read_zeroes,
                latency_ns: 0,
            } => Arc::new(NullBackend::new(*size_bytes, *read_zeroes)),
            Volume::Null {
                size_bytes,
                read_zeroes,
                latency_ns,
            } => Arc::new(
                NullBackend::with_latency(
                    *size_bytes,
                    *read_zeroes,
                    Duration::from_nanos(*latency_ns),
                )
                .map_err(|e| failed(format!("null latency thread: {e}")))?,
            ),
            Volume::Rbd(rbd) => open_rbd(rbd, export.readonly).map_err(failed)?,
        })
    }

    /// The thin pool in `dir`: this daemon's open one, or opened now (its statistics
    /// published) and kept for every disk of its volumes.
    fn pool(&mut self, dir: &Path) -> Result<&OpenPool, DaemonError> {
        let failed = |e: String| DaemonError::Failed(format!("pool {}: {e}", dir.display()));
        let key = dir.canonicalize().map_err(|e| failed(e.to_string()))?;
        if self.pools.contains_key(&key) {
            return Ok(&self.pools[&key]);
        }
        let pool = Arc::new(Pool::open(&key).map_err(|e| failed(e.to_string()))?);
        let label = self.pools_opened.to_string();
        let workers = ThinWorkers::start(&pool, &label)
            .map_err(|e| failed(format!("worker threads: {e}")))?;
        let committer = match self.thin_commit_period {
            Some(period) => Some(
                start_committer(&pool, period, &label)
                    .map_err(|e| failed(format!("commit thread: {e}")))?,
            ),
            None => None,
        };
        let stats = self
            .stats_dir
            .create::<PoolStat>(&pool_stats_name(&key, self.pools_opened))
            .map_err(|e| {
                DaemonError::Failed(format!("statistics of pool {}: {e}", dir.display()))
            })?;
        pool.publish_stats(stats);
        self.pools_opened += 1;
        Ok(self.pools.entry(key).or_insert(OpenPool {
            pool,
            workers,
            _committer: committer,
        }))
    }

    fn open_device(
        &mut self,
        name: &str,
        export: &Export,
        throttle: Arc<Throttle>,
    ) -> Result<Arc<BlkDevice>, DaemonError> {
        let failed = DaemonError::Failed;
        let backend = self.open_volume(export)?;
        let size = backend.info().size_bytes;
        if size == 0 || !size.is_multiple_of(u64::from(export.block_size)) {
            return Err(DaemonError::Invalid(format!(
                "{}: size {size} is not a non-zero multiple of the block size {}",
                export.transport, export.block_size
            )));
        }
        let stats = DeviceStats::publish(&self.stats_dir, name, export.num_queues)
            .map_err(|e| failed(format!("statistics of {name}: {e}")))?;
        Ok(Arc::new(
            BlkDevice::with_stats(
                DiskOptions {
                    serial: export.serial.clone().unwrap_or_else(|| name.to_string()),
                    name: name.to_string(),
                    block_size: export.block_size,
                    readonly: export.readonly,
                    num_queues: export.num_queues,
                    provision: export.provision,
                    guest_stats: export.guest_stats_bit.map(|feature_bit| GuestStatsOptions {
                        feature_bit,
                        interval: self.guest_interval,
                    }),
                },
                backend,
                stats,
            )
            .with_throttle(throttle),
        ))
    }

    /// The reactor for queue 0 of a new disk: the export's `reactor=`, or the one with the
    /// fewest queues (offered ones: a queue is placed when its disk is added), so single-queue
    /// disks spread over the reactors instead of all landing on reactor 0.
    fn placement(&self, export: &Export) -> Result<usize, DaemonError> {
        let n = self.reactors.len();
        if let Some(r) = export.reactor {
            return match r < n {
                true => Ok(r),
                false => Err(DaemonError::Invalid(format!(
                    "reactor={r}: this daemon runs {n} reactor(s), 0 to {} (--cores)",
                    n - 1
                ))),
            };
        }
        let mut load = vec![0usize; n];
        for d in &self.disks {
            for q in 0..usize::from(d.export.num_queues) {
                load[(d.first_reactor + q) % n] += 1;
            }
        }
        Ok((0..n).min_by_key(|&r| load[r]).unwrap_or(0))
    }

    /// The reactors of a disk's queues, in queue order (queue i on the i-th).
    fn reactors_from(&self, first: usize) -> Vec<ReactorHandle> {
        let n = self.reactors.len();
        (0..n)
            .map(|i| self.reactors[(first + i) % n].clone())
            .collect()
    }

    /// Starts serving one disk on its transport, its queue 0 on reactor `first`.
    fn start_frontend(
        &mut self,
        export: &Export,
        device: &Arc<BlkDevice>,
        first: usize,
    ) -> Result<Box<dyn Frontend>, DaemonError> {
        let failed = |e: String| DaemonError::Failed(e);
        let reactors = self.reactors_from(first);
        let vbd = |platform: Arc<dyn pollblk_xen::platform::Platform>, domid, devid, toolstack| {
            let address = VbdAddress { domid, devid };
            Vbd::start(
                platform,
                address,
                device.clone(),
                reactors.clone(),
                toolstack,
            )
            .map(|vbd| Box::new(vbd) as Box<dyn Frontend>)
            .map_err(|e| failed(format!("{}: {e}", export.transport)))
        };
        match &export.transport {
            Transport::VhostUser { socket } => {
                let access = export.socket_access.or(self.socket_access);
                Server::start(socket, access, device.clone(), reactors.clone())
                    .map(|server| Box::new(server) as Box<dyn Frontend>)
                    .map_err(|e| failed(e.to_string()))
            }
            Transport::XenLoopback { dir, domid, devid } => {
                let platform = match self.platforms.loopbacks.get(dir) {
                    Some(platform) => platform.clone(),
                    None => {
                        let platform = Loopback::start(dir).map_err(|e| {
                            failed(format!("xen loopback store in {}: {e}", dir.display()))
                        })?;
                        self.platforms
                            .loopbacks
                            .insert(dir.clone(), platform.clone());
                        platform
                    }
                };
                // The loopback platform has no toolstack: the back end writes its keys too.
                vbd(platform, *domid, *devid, true)
            }
            #[cfg(feature = "xen")]
            Transport::Xen { domid, devid } => {
                let platform = match &self.platforms.xen {
                    Some(platform) => platform.clone(),
                    None => {
                        let platform = Arc::new(
                            pollblk_xen::xen::Xen::open().map_err(|e| failed(e.to_string()))?,
                        );
                        self.platforms.xen = Some(platform.clone());
                        platform
                    }
                };
                vbd(platform, *domid, *devid, false)
            }
            #[cfg(not(feature = "xen"))]
            Transport::Xen { .. } => unreachable!("xen-blkif parses only with the xen feature"),
            Transport::Nbd { address, tls } => {
                let access = export.socket_access.or(self.socket_access);
                self.start_nbd(address, tls, access, export, device, reactors)
            }
        }
    }

    /// Offers `device` as an NBD export on `address`, starting its listener unless another
    /// export has (with the same TLS: exports on one listener share it).
    fn start_nbd(
        &mut self,
        address: &pollblk_nbd::server::Address,
        tls: &Option<pollblk_nbd::tls::TlsOptions>,
        access: pollblk_engine::unix_socket::Access,
        export: &Export,
        device: &Arc<BlkDevice>,
        reactors: Vec<ReactorHandle>,
    ) -> Result<Box<dyn Frontend>, DaemonError> {
        use pollblk_nbd::server::{Export as NbdExport, Listener};
        let failed = |e: String| DaemonError::Failed(e);
        let listener = match self
            .platforms
            .nbd
            .get(address)
            .and_then(std::sync::Weak::upgrade)
        {
            Some(listener) if listener.tls() != tls.as_ref() => {
                return Err(DaemonError::Invalid(format!(
                    "{} is served {} by another export: exports on one listener share its TLS \
                     settings (tls-creds=, tls-verify-peer=)",
                    export.transport,
                    match listener.tls() {
                        Some(t) => format!("with tls-creds={}", t.dir.display()),
                        None => "without TLS".to_string(),
                    }
                )));
            }
            Some(listener) => listener,
            None => {
                let listener = Arc::new(
                    Listener::start(address.clone(), access, tls.clone())
                        .map_err(|e| failed(format!("{}: {e}", export.transport)))?,
                );
                self.platforms
                    .nbd
                    .insert(address.clone(), Arc::downgrade(&listener));
                listener
            }
        };
        let info = nbd_info(export, device);
        let name = info.name.clone();
        let nbd = Arc::new(NbdExport::new(info, device.clone(), reactors));
        if !listener.add(nbd.clone()) {
            return Err(DaemonError::Invalid(format!(
                "{} offers an export named {name:?} already (name= tells exports apart)",
                export.transport
            )));
        }
        Ok(Box::new(crate::frontend::NbdDisk {
            listener,
            export: nbd,
        }))
    }
}

/// Largest request an NBD client may send (NBD_INFO_BLOCK_SIZE's maximum).
const NBD_MAX_REQUEST: u32 = 2 << 20;

/// What NBD clients are told of a disk: its `name=` (or the default export ""), its size,
/// whether it takes writes and discards.
fn nbd_info(export: &Export, device: &BlkDevice) -> pollblk_nbd::handshake::ExportInfo {
    let info = device.backend().info();
    pollblk_nbd::handshake::ExportInfo {
        name: export.name.clone().unwrap_or_default(),
        description: format!("pollblk disk {}", device.options().name),
        size: info.size_bytes,
        read_only: export.readonly,
        min_block: export.block_size,
        preferred_block: 4096.max(export.block_size),
        max_block: NBD_MAX_REQUEST,
        can_trim: info.discard && !export.readonly,
        // A FLUSH syncs the volume, whichever connection wrote.
        multi_conn: true,
        // Thin volumes and files can tell their holes.
        allocation: device.backend().allocation(0, 0, 1, &mut Vec::new()),
    }
}

/// A pause or resume the disk's transport refused.
fn refused(name: &str, what: &str, why: Refused) -> DaemonError {
    match why {
        Refused::Unsupported(e) => DaemonError::Invalid(format!("{name}: {what} is {}", e.0)),
        Refused::Invalid(e) => DaemonError::Invalid(e),
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Name of a pool's statistics object: `pool-<directory name>-<number>`, unique within the
/// daemon (`number` counts the pools it opened).
fn pool_stats_name(pool: &Path, number: usize) -> String {
    let base: String = pool
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(20)
        .collect();
    format!("pool-{base}-{number}")
}

#[cfg(feature = "rbd")]
fn open_rbd(rbd: &export::RbdVolume, readonly: bool) -> Result<Arc<dyn Backend>, String> {
    use pollblk_engine::backend::{RbdBackend, RbdOptions};
    let image = RbdBackend::open(&RbdOptions {
        pool: rbd.pool.clone(),
        image: rbd.image.clone(),
        conf: rbd.conf.clone(),
        client: rbd.client.clone(),
        timeout: Duration::from_secs(rbd.timeout_secs),
        readonly,
    })
    .map_err(|e| format!("rbd {}/{}: {e}", rbd.pool, rbd.image))?;
    tracing::info!(pool = %rbd.pool, image = %rbd.image, fsid = image.fsid(), "RBD image open");
    Ok(Arc::new(image))
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(rbd: &export::RbdVolume, _readonly: bool) -> Result<Arc<dyn Backend>, String> {
    Err(format!(
        "rbd={}/{}: this pollblk was built without Ceph support (build with --features rbd)",
        rbd.pool, rbd.image
    ))
}

/// `spec` with its `size=` option set to `bytes`.
fn with_size(spec: &str, bytes: u64) -> String {
    spec.split(',')
        .map(|option| match option.split_once('=') {
            Some(("size", _)) => format!("size={bytes}"),
            _ => option.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}
