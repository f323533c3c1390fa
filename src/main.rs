//! pollblk: the command line. Everything else lives in the engine and transport crates.
#![deny(clippy::undocumented_unsafe_blocks)]

mod export;
mod pool_cmd;
mod stats_cmd;

use clap::{Parser, Subcommand};
use export::{Export, Transport, Volume};
use pollblk_engine::backend::{Backend, FileBackend, NullBackend, ThinBackend};
use pollblk_engine::device::{BlkDevice, DeviceStats, DiskOptions, GuestStatsOptions};
use pollblk_engine::reactor::{PollConfig, PollMode, Reactors};
use pollblk_engine::stats::sets::PoolStat;
use pollblk_engine::stats::StatsDir;
use pollblk_engine::thin::{self, Pool};
use pollblk_vhost_user::Server;
use pollblk_xen::backend::{Vbd, VbdAddress};
use pollblk_xen::loopback::Loopback;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Polled vhost-user-blk storage host service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve virtual disks until SIGINT or SIGTERM.
    ///
    /// Without --export, serves volume disk0 (1 GiB) of the thin pool ./pollblk-data/pool
    /// (4 GiB, sparse; created if missing) on ./pollblk-data/disk0.sock and prints the QEMU
    /// command line that attaches a guest.
    Serve {
        /// A disk: vhost-user-blk,socket=PATH,file=PATH[,num-queues=N][,readonly=on]
        /// [,block-size=512|4096][,serial=ID][,provision=on], or with null,size=BYTES
        /// [,read-zeroes=off] or pool=DIR,volume=NAME instead of file=PATH.
        /// Repeatable.
        #[arg(long = "export", value_name = "SPEC")]
        exports: Vec<Export>,
        /// Cores to run reactors on, e.g. 0-3,6 (default: all cores).
        #[arg(long, value_name = "LIST", value_parser = export::parse_cores)]
        cores: Option<std::vec::Vec<usize>>,
        /// How reactors wait for work: poll (busy-poll, a full core each), adaptive (busy-poll
        /// while busy, sleep on kicks when idle) or interrupt (sleep whenever idle).
        #[arg(long, value_name = "MODE", default_value = "adaptive")]
        poll_mode: PollMode,
        /// Adaptive mode: microseconds without work before a reactor sleeps.
        #[arg(long, value_name = "N", default_value_t = PollConfig::DEFAULT_IDLE.as_micros() as u64,
              value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        poll_idle_us: u64,
        /// Directory the statistics files go in (KVM binary stats layout, one per disk,
        /// queue, reactor and thin pool; read them with `pollblk stats`). Default:
        /// ./pollblk-data/stats.
        #[arg(long, value_name = "DIR")]
        stats_dir: Option<PathBuf>,
        /// Group (name or number) that may read the statistics files (mode 0640); default
        /// the daemon's group.
        #[arg(long, value_name = "GROUP", value_parser = parse_group)]
        stats_group: Option<u32>,
        /// Seconds between requests for the guest's statistics on stats virtqueues
        /// (exports with guest-stats=on).
        #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_interval)]
        guest_stats_interval: Duration,
    },
    /// Print statistics files (pollblk's, or a KVM stats fd with --fd), once or with --watch.
    Stats(stats_cmd::StatsArgs),
    /// Create thin pools and manage their volumes (offline), read their status, check them.
    Pool {
        #[command(subcommand)]
        command: pool_cmd::PoolCommand,
    },
}

const DEFAULT_DIR: &str = "pollblk-data";

/// `--stats-group`: a group name or number.
fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(text).map_err(|_| format!("bad group name {text:?}"))?;
    // SAFETY: a C struct of integers and pointers: all zeroes is a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r fills `group` with pointers into `buf`, both alive for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no group named {text:?}"));
    }
    Ok(group.gr_gid)
}

/// `--guest-stats-interval`: seconds, fractions allowed.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.01..=3600.0).contains(&secs) {
        return Err(format!("{secs} s: expected 0.01 to 3600"));
    }
    Ok(Duration::from_secs_f64(secs))
}
const DEFAULT_SIZE: u64 = 1 << 30;
const DEFAULT_POOL_SIZE: u64 = 4 << 30;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            exports,
            cores,
            poll_mode,
            poll_idle_us,
            stats_dir,
            stats_group,
            guest_stats_interval,
        } => {
            let poll = PollConfig {
                mode: poll_mode,
                idle: std::time::Duration::from_micros(poll_idle_us),
            };
            let stats = StatsOptions {
                dir: stats_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DIR).join("stats")),
                group: stats_group,
                guest_interval: guest_stats_interval,
            };
            serve(exports, cores, poll, stats)
        }
        Command::Pool { command } => pool_cmd::run(command),
        Command::Stats(args) => stats_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pollblk: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The built-in default: volume disk0 (1 GiB) of a 4 GiB sparse thin pool, next to its
/// socket; created on first use.
fn default_export() -> Result<Export, String> {
    let dir = PathBuf::from(DEFAULT_DIR);
    let pool_dir = dir.join("pool");
    if !pool_dir.join("superblock").exists() {
        let pool = Pool::create(&pool_dir, DEFAULT_POOL_SIZE, thin::DEFAULT_BLOCK_SIZE)
            .map_err(|e| format!("{}: {e}", pool_dir.display()))?;
        pool.volume_create("disk0", DEFAULT_SIZE)
            .map_err(|e| format!("{}: {e}", pool_dir.display()))?;
        eprintln!(
            "pollblk: created thin pool {} (4 GiB, sparse) with volume disk0 (1 GiB)",
            pool_dir.display()
        );
    }
    Ok(Export {
        transport: Transport::VhostUser {
            socket: dir.join("disk0.sock"),
        },
        volume: Volume::Thin {
            pool: pool_dir,
            volume: "disk0".into(),
        },
        num_queues: export::DEFAULT_NUM_QUEUES,
        readonly: false,
        block_size: 512,
        serial: None,
        provision: false,
        guest_stats_bit: None,
    })
}

/// Where statistics go and how guests are asked for theirs.
struct StatsOptions {
    dir: PathBuf,
    group: Option<u32>,
    guest_interval: Duration,
}

/// Name of a pool's statistics object: `pool-<directory name>`, unique within the daemon.
fn pool_stats_name(pool: &Path, taken: &Pools) -> String {
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
    format!("pool-{base}-{}", taken.len())
}

/// Thin pools opened by this daemon, shared by every export of their volumes.
type Pools = std::collections::HashMap<PathBuf, Arc<Pool>>;

fn open_device(
    index: usize,
    export: &Export,
    pools: &mut Pools,
    stats_dir: &StatsDir,
    guest_interval: Duration,
) -> Result<Arc<BlkDevice>, String> {
    let backend: Arc<dyn Backend> = match &export.volume {
        Volume::Thin { pool, volume } => {
            let key = pool
                .canonicalize()
                .map_err(|e| format!("pool {}: {e}", pool.display()))?;
            let opened = match pools.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = Arc::new(
                        Pool::open(&key).map_err(|e| format!("pool {}: {e}", pool.display()))?,
                    );
                    let stats = stats_dir
                        .create::<PoolStat>(&pool_stats_name(&key, pools))
                        .map_err(|e| format!("statistics of pool {}: {e}", pool.display()))?;
                    p.publish_stats(stats);
                    pools.insert(key, p.clone());
                    p
                }
            };
            Arc::new(
                ThinBackend::open(opened, volume)
                    .map_err(|e| format!("pool {}: {e}", pool.display()))?,
            )
        }
        Volume::File(path) => Arc::new(
            FileBackend::open(path, export.readonly, export.block_size)
                .map_err(|e| format!("file {}: {e}", path.display()))?,
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
            NullBackend::with_latency(*size_bytes, *read_zeroes, Duration::from_nanos(*latency_ns))
                .map_err(|e| format!("null latency thread: {e}"))?,
        ),
        Volume::Rbd(rbd) => open_rbd(rbd, export.readonly)?,
    };
    let size = backend.info().size_bytes;
    if size == 0 || !size.is_multiple_of(u64::from(export.block_size)) {
        return Err(format!(
            "{}: size {size} is not a non-zero multiple of the block size {}",
            export.transport, export.block_size
        ));
    }
    let name = format!("disk{index}");
    let stats = DeviceStats::publish(stats_dir, &name, export.num_queues)
        .map_err(|e| format!("statistics of {name}: {e}"))?;
    Ok(Arc::new(BlkDevice::with_stats(
        DiskOptions {
            serial: export.serial.clone().unwrap_or_else(|| name.clone()),
            name,
            block_size: export.block_size,
            readonly: export.readonly,
            num_queues: export.num_queues,
            provision: export.provision,
            guest_stats: export.guest_stats_bit.map(|feature_bit| GuestStatsOptions {
                feature_bit,
                interval: guest_interval,
            }),
        },
        backend,
        stats,
    )))
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

/// The cores this process may run on (its affinity mask), in order.
fn all_cores() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set for this process.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is ours and its size is passed along.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..count).collect();
    }
    // SAFETY: CPU_ISSET reads the set filled above.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Blocks SIGINT and SIGTERM in every thread (threads inherit the mask), so that only
/// `wait_for_signal` sees them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: builds a signal set and applies it to the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: waits for one of the blocked signals in `set`.
    unsafe { libc::sigwait(set, &mut signal) };
    signal
}

fn qemu_command_line(socket: &Path, queues: u16) -> String {
    let socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_owned());
    format!(
        "qemu-system-x86_64 -machine q35,accel=kvm:tcg -cpu max -smp 2 -m 1G \\\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=disk0,path={} \\\n  \
         -device vhost-user-blk-pci,chardev=disk0,num-queues={} \\\n  \
         -kernel YOUR-KERNEL -initrd YOUR-INITRD -append console=ttyS0 -nographic",
        socket.display(),
        queues.min(2)
    )
}

/// A disk's front-end side while the daemon runs.
enum Frontend {
    VhostUser(Server),
    Xen(Vbd),
}

impl Frontend {
    /// Disconnects the front end, draining its queues.
    fn stop(self) {
        match self {
            Frontend::VhostUser(server) => server.stop(),
            Frontend::Xen(vbd) => drop(vbd),
        }
    }
}

/// Starts serving one disk on its transport.
fn start_frontend(
    export: &Export,
    device: &Arc<BlkDevice>,
    reactors: &[pollblk_engine::reactor::ReactorHandle],
    platforms: &mut XenPlatforms,
) -> Result<Frontend, String> {
    let vbd = |platform: Arc<dyn pollblk_xen::platform::Platform>, domid, devid, toolstack| {
        let address = VbdAddress { domid, devid };
        Vbd::start(
            platform,
            address,
            device.clone(),
            reactors.to_vec(),
            toolstack,
        )
        .map(Frontend::Xen)
        .map_err(|e| format!("{}: {e}", export.transport))
    };
    match &export.transport {
        Transport::VhostUser { socket } => Server::start(socket, device.clone(), reactors.to_vec())
            .map(Frontend::VhostUser)
            .map_err(|e| e.to_string()),
        Transport::XenLoopback { dir, domid, devid } => {
            let platform = match platforms.loopbacks.get(dir) {
                Some(platform) => platform.clone(),
                None => {
                    let platform = Loopback::start(dir)
                        .map_err(|e| format!("xen loopback store in {}: {e}", dir.display()))?;
                    platforms.loopbacks.insert(dir.clone(), platform.clone());
                    platform
                }
            };
            // The loopback platform has no toolstack: the back end writes its keys too.
            vbd(platform, *domid, *devid, true)
        }
        #[cfg(feature = "xen")]
        Transport::Xen { domid, devid } => {
            let platform = match &platforms.xen {
                Some(platform) => platform.clone(),
                None => {
                    let platform =
                        Arc::new(pollblk_xen::xen::Xen::open().map_err(|e| e.to_string())?);
                    platforms.xen = Some(platform.clone());
                    platform
                }
            };
            vbd(platform, *domid, *devid, false)
        }
        #[cfg(not(feature = "xen"))]
        Transport::Xen { .. } => unreachable!("xen-blkif parses only with the xen feature"),
    }
}

/// The Xen platforms exports share: one loopback store per directory, one real Xen.
#[derive(Default)]
struct XenPlatforms {
    loopbacks: HashMap<PathBuf, Arc<Loopback>>,
    #[cfg(feature = "xen")]
    xen: Option<Arc<pollblk_xen::xen::Xen>>,
}

fn serve(
    mut exports: Vec<Export>,
    cores: Option<Vec<usize>>,
    poll: PollConfig,
    stats: StatsOptions,
) -> Result<(), String> {
    let is_default = exports.is_empty();
    if is_default {
        exports.push(default_export()?);
    }
    let available = all_cores();
    let cores = cores.unwrap_or_else(|| available.clone());
    if let Some(core) = cores.iter().find(|c| !available.contains(c)) {
        return Err(format!(
            "--cores: core {core} is not available to this process (available: {available:?})"
        ));
    }
    for (i, a) in exports.iter().enumerate() {
        if exports[..i].iter().any(|b| b.transport == a.transport) {
            return Err(format!("{} is given twice", a.transport));
        }
        if let Volume::Rbd(r) = &a.volume {
            let same = |b: &Export| matches!(&b.volume, Volume::Rbd(o) if o.pool == r.pool && o.image == r.image && o.conf == r.conf);
            if exports[..i].iter().any(same) {
                return Err(format!(
                    "rbd={}/{} is exported twice: one image, one handle (it holds the image's \
                     exclusive lock)",
                    r.pool, r.image
                ));
            }
        }
    }
    // Before any thread starts (thin volumes start workers): every thread inherits the mask,
    // so SIGINT/SIGTERM reach only the main thread's sigwait.
    let signals = block_signals();
    let stats_dir = StatsDir::open(&stats.dir, stats.group)
        .map_err(|e| format!("--stats-dir {}: {e}", stats.dir.display()))?;
    let mut pools = Pools::new();
    let devices = exports
        .iter()
        .enumerate()
        .map(|(i, export)| open_device(i, export, &mut pools, &stats_dir, stats.guest_interval))
        .collect::<Result<Vec<_>, _>>()?;

    let reactors = Reactors::start(&cores, poll, Some(&stats_dir))
        .map_err(|e| format!("starting reactors: {e}"))?;
    let handles: Vec<_> = (0..reactors.len())
        .map(|i| reactors.for_queue(i).clone())
        .collect();
    let mut servers = Vec::with_capacity(exports.len());
    let mut platforms = XenPlatforms::default();
    for (export, device) in exports.iter().zip(&devices) {
        match start_frontend(export, device, &handles, &mut platforms) {
            Ok(server) => servers.push(server),
            Err(e) => {
                drop(servers);
                reactors.shutdown();
                return Err(e);
            }
        }
    }
    for (export, device) in exports.iter().zip(&devices) {
        tracing::info!(
            disk = %device.options().name,
            transport = %export.transport,
            sectors = device.capacity_sectors(),
            queues = export.num_queues,
            "serving"
        );
    }
    if let (true, Transport::VhostUser { socket }) = (is_default, &exports[0].transport) {
        println!(
            "pollblk: serving {} on {}\nAttach a guest with:\n{}",
            DEFAULT_DIR.to_string() + "/pool, volume disk0",
            socket.display(),
            qemu_command_line(socket, exports[0].num_queues)
        );
    }
    println!(
        "pollblk: statistics in {} (read them with: pollblk stats {0} --watch 1)",
        stats_dir.path().display()
    );
    println!(
        "pollblk: ready, {} reactor(s) on cores {cores:?}, poll mode {:?}",
        reactors.len(),
        poll.mode
    );

    let signal = wait_for_signal(&signals);
    tracing::info!(signal, "shutting down");
    for server in servers {
        server.stop();
    }
    drop(platforms);
    let mut result = Ok(());
    for device in &devices {
        if let Err(e) = device.backend().sync_all() {
            result = Err(format!("{}: sync failed: {e}", device.options().name));
        }
    }
    reactors.shutdown();
    result
}
