//! pollblk: the daemon and its command line. The data path lives in the engine and
//! transport crates; this crate is the host service around them:
//!
//! - this file: the CLI (`serve`, `pool`, `stats`, `rpc`, `completions`, `man`) and starting a daemon
//!   (settings from flags and the config file, reactors, signals, sd_notify);
//! - `export`: the `--export` grammar (with `qos_options` for limits, `ids` for socket
//!   owners and modes, `image_format` for refusing non-raw files); `config`: the TOML config
//!   file (and --persist);
//! - `daemon`: the served disks (volumes opened, transports started through `frontend`);
//! - `control`: the JSON-RPC control socket; `rpc_cmd`: its command-line client;
//! - `stats_cmd` / `stats_view`, `pool_cmd` / `pool_view`: the `stats` and `pool` commands,
//!   and the views of statistics and pools they share with the control socket; `image_io`:
//!   `pool volume import` / `export`;
//! - `logging`, `notify`: logs and systemd readiness.
#![deny(clippy::undocumented_unsafe_blocks)]

mod config;
mod control;
mod daemon;
mod export;
mod frontend;
mod ids;
mod image_format;
mod image_io;
mod logging;
mod notify;
mod pool_cmd;
mod pool_view;
mod qos_options;
mod rpc_cmd;
mod stats_cmd;
mod stats_view;

use clap::{Parser, Subcommand};
use daemon::Daemon;
use logging::LogFormat;
use pollblk_engine::reactor::{PollConfig, PollMode, Reactors};
use pollblk_engine::stats::StatsDir;
use pollblk_engine::thin::{self, Pool};
use pollblk_engine::unix_socket::Access;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Polled vhost-user-blk storage host service.
#[derive(Parser)]
#[command(version = env!("POLLBLK_VERSION"), about)]
struct Cli {
    /// Without a command: `serve` on the built-in default.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve virtual disks until SIGINT or SIGTERM.
    ///
    /// Without --export and --config, serves volume disk0 (1 GiB) of the thin pool
    /// ./pollblk-data/pool (4 GiB, sparse; created if missing) on ./pollblk-data/disk0.sock
    /// and prints the QEMU command line that attaches a guest.
    Serve(ServeArgs),
    /// Print statistics files (pollblk's, or a KVM stats fd with --fd), once or with --watch.
    Stats(stats_cmd::StatsArgs),
    /// Create thin pools and manage their volumes (offline), read their status, check them.
    Pool {
        #[command(subcommand)]
        command: pool_cmd::PoolCommand,
    },
    /// Call a method of a running daemon's control socket and print the result as JSON.
    Rpc(rpc_cmd::RpcArgs),
    /// Print shell completions (e.g. `pollblk completions bash > /etc/bash_completion.d/pollblk`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or with --dir write one per command into DIR
    /// (pollblk.1, pollblk-serve.1, ...).
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `pollblk completions SHELL`.
fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    let mut cli = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cli, "pollblk", &mut std::io::stdout());
    Ok(())
}

/// `pollblk man [--dir DIR]`.
fn man(dir: Option<PathBuf>) -> Result<(), String> {
    let cli = <Cli as clap::CommandFactory>::command();
    match dir {
        None => match clap_mangen::Man::new(cli).render(&mut std::io::stdout()) {
            // `pollblk man | head` is not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => result.map_err(|e| e.to_string()),
        },
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            clap_mangen::generate_to(cli, &dir).map_err(|e| format!("{}: {e}", dir.display()))
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A disk: vhost-user-blk,socket=PATH,file=PATH[,num-queues=N][,readonly=on]
    /// [,block-size=512|4096][,serial=ID][,provision=on], or with null,size=BYTES
    /// [,read-zeroes=off] or pool=DIR,volume=NAME instead of file=PATH; or an NBD export:
    /// nbd,socket=PATH|addr=HOST:PORT,name=EXPORT,<volume>[,tls-creds=DIR] (TLS is required
    /// for TCP on an address other than loopback).
    /// Repeatable; added after the config file's disks.
    #[arg(long = "export", value_name = "SPEC", value_parser = check_spec)]
    exports: Vec<String>,
    /// A TOML config file: the options below under the same names, and [[export]] tables
    /// (see packaging/pollblk.toml). Options given on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Save disks added, removed or resized through the control socket to --config, so a
    /// restart serves the same disks (the file is created if missing).
    #[arg(long, requires = "config")]
    persist: bool,
    /// Cores to run reactors on, e.g. 0-3,6 (default: all cores).
    #[arg(long, value_name = "LIST", value_parser = export::parse_cores)]
    cores: Option<std::vec::Vec<usize>>,
    /// How reactors wait for work: poll (busy-poll, a full core each), adaptive (busy-poll
    /// while busy, sleep on kicks when idle; the default) or interrupt (sleep whenever idle).
    #[arg(long, value_name = "MODE")]
    poll_mode: Option<PollMode>,
    /// Adaptive mode: microseconds without work before a reactor sleeps (default 50).
    #[arg(long, value_name = "N", value_parser = parse_idle_us)]
    poll_idle_us: Option<u64>,
    /// Directory the statistics files go in (KVM binary stats layout, one per disk,
    /// queue, reactor and thin pool; read them with `pollblk stats`). Default:
    /// ./pollblk-data/stats.
    #[arg(long, value_name = "DIR")]
    stats_dir: Option<PathBuf>,
    /// Group (name or number) that may read the statistics files (mode 0640); default
    /// the daemon's group.
    #[arg(long, value_name = "GROUP", value_parser = ids::parse_group)]
    stats_group: Option<u32>,
    /// Seconds between requests for the guest's statistics on stats virtqueues
    /// (exports with guest-stats=on). Default 5.
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    guest_stats_interval: Option<Duration>,
    /// The control socket (JSON-RPC 2.0, one object per line; `pollblk rpc`). Default:
    /// ./pollblk-data/control.sock, mode 0600. Given without --export or --config, the
    /// daemon starts with no disks (an orchestrator adds them with export_add).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Group (name or number) that may use the control socket (mode 0660).
    #[arg(long, value_name = "GROUP", value_parser = ids::parse_group)]
    control_group: Option<u32>,
    /// Owner (name or number) of the vhost-user sockets, for exports without
    /// socket-owner= (e.g. the user QEMU runs as under libvirt).
    #[arg(long, value_name = "USER", value_parser = ids::parse_user)]
    socket_owner: Option<u32>,
    /// Group of the vhost-user sockets, for exports without socket-group=.
    #[arg(long, value_name = "GROUP", value_parser = ids::parse_group)]
    socket_group: Option<u32>,
    /// Mode of the vhost-user sockets (octal, e.g. 0660), for exports without socket-mode=;
    /// default: the umask's.
    #[arg(long, value_name = "MODE", value_parser = ids::parse_mode)]
    socket_mode: Option<u32>,
    /// Seconds between commits of a thin pool's changed mappings besides the guests'
    /// FLUSHes (dm-thin's commit_period; 0: only on FLUSH). Default 1.
    #[arg(long, value_name = "SECS", value_parser = parse_commit_period)]
    thin_commit_period: Option<Duration>,
    /// Log level or RUST_LOG-style directives (default: RUST_LOG, else info); the control
    /// socket's log_level changes it at run time.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

/// `--export`: checked here so a bad one is reported before anything starts.
fn check_spec(text: &str) -> Result<String, String> {
    text.parse::<export::Export>()?;
    Ok(text.to_string())
}

fn parse_idle_us(text: &str) -> Result<u64, String> {
    let n: u64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if n > 1_000_000 {
        return Err(format!("{n}: at most 1000000 (one second)"));
    }
    Ok(n)
}

const DEFAULT_DIR: &str = "pollblk-data";

/// `--thin-commit-period`: seconds, fractions allowed, 0 for none.
fn parse_commit_period(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("{secs} s: expected 0 (only on FLUSH) to 3600"));
    }
    Ok(Duration::from_secs_f64(secs))
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
    // No command at all is `serve` with no options: parsed as such, so its defaults are
    // the ones `serve --help` shows.
    let command = match Cli::try_parse() {
        Ok(cli) => cli
            .command
            .unwrap_or_else(|| Cli::parse_from(["pollblk", "serve"]).command.unwrap()),
        // --help and --version print to stdout and succeed.
        Err(e) if !e.use_stderr() => e.exit(),
        // One error style for every mistake: clap's and the daemon's read alike.
        Err(e) => {
            let text = e.render().to_string();
            eprint!(
                "pollblk: error: {}",
                text.strip_prefix("error: ").unwrap_or(&text)
            );
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Serve(args) => serve(args),
        command => {
            // Tools log warnings and errors (RUST_LOG for more); serve sets up its own.
            let _ = logging::init(
                std::env::var("RUST_LOG").is_err().then_some("warn"),
                LogFormat::Text,
            );
            match command {
                Command::Pool { command } => pool_cmd::run(command),
                Command::Stats(args) => stats_cmd::run(args),
                Command::Rpc(args) => rpc_cmd::run(args),
                Command::Completions { shell } => completions(shell),
                Command::Man { dir } => man(dir),
                Command::Serve(_) => unreachable!(),
            }
        }
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
/// socket; created on first use. Returns its --export string.
fn default_export() -> Result<String, String> {
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
    Ok(format!(
        "vhost-user-blk,socket={},pool={},volume=disk0",
        dir.join("disk0.sock").display(),
        pool_dir.display()
    ))
}

/// What `serve` runs with: the command line over the config file over the defaults.
struct Settings {
    exports: Vec<config::ExportEntry>,
    cores: Option<Vec<usize>>,
    poll: PollConfig,
    stats_dir: PathBuf,
    stats_group: Option<u32>,
    guest_interval: Duration,
    control: PathBuf,
    control_group: Option<u32>,
    /// Owner, group and mode of vhost-user sockets whose export does not give them.
    socket_access: Access,
    /// Thin pools' commit period besides FLUSH (None: only on FLUSH).
    thin_commit_period: Option<Duration>,
    log_level: Option<String>,
    log_format: LogFormat,
    persist: Option<PathBuf>,
}

/// The disks to serve: the config file's (checked), then the command line's, or the built-in
/// default for `pollblk serve` with nothing said.
fn export_entries(
    file: &config::Config,
    specs: Vec<String>,
    config: &Option<PathBuf>,
    control: &Option<PathBuf>,
) -> Result<Vec<config::ExportEntry>, String> {
    let mut exports = file.exports()?;
    for (i, entry) in exports.iter().enumerate() {
        entry.spec.parse::<export::Export>().map_err(|e| {
            let path = config.as_deref().unwrap_or(Path::new(""));
            let named = entry
                .name
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            format!(
                "{}: [[export]] number {}{named}: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    exports.extend(
        specs
            .into_iter()
            .map(|spec| config::ExportEntry { name: None, spec }),
    );
    // The built-in disk is for `pollblk serve` with nothing said; a daemon given a
    // control socket or a config is managed, and starts with what it was given.
    if exports.is_empty() && config.is_none() && control.is_none() {
        exports.push(config::ExportEntry {
            name: Some("disk0".into()),
            spec: default_export()?,
        });
    }
    Ok(exports)
}

fn settings(args: ServeArgs) -> Result<Settings, String> {
    if args.persist && !args.exports.is_empty() {
        // They would be saved to the file and, at the next start, served twice.
        return Err(
            "--persist keeps the disks in --config: put the --export disks in the \
                    config file ([[export]] spec = \"...\") instead of on the command line"
                .into(),
        );
    }
    let file = match &args.config {
        // --persist may start from nothing: the file is written on the first change.
        Some(path) if args.persist && !path.exists() => config::Config::default(),
        Some(path) => config::load(path)?,
        None => config::Config::default(),
    };
    let config_path = args.config.clone().unwrap_or_default();
    let in_file = |key: &str, e: String| format!("{}: {key}: {e}", config_path.display());
    let exports = export_entries(&file, args.exports, &args.config, &args.control)?;
    let group = |key: &str, value: &Option<toml::Value>| -> Result<Option<u32>, String> {
        value
            .as_ref()
            .map(|v| config::group_text(v).and_then(|g| ids::parse_group(&g)))
            .transpose()
            .map_err(|e| in_file(key, e))
    };
    let cores = match (args.cores, &file.cores) {
        (Some(cores), _) => Some(cores),
        (None, Some(text)) => Some(export::parse_cores(text).map_err(|e| in_file("cores", e))?),
        (None, None) => None,
    };
    let mode = match (args.poll_mode, &file.poll_mode) {
        (Some(mode), _) => mode,
        (None, Some(text)) => text.parse().map_err(|e| in_file("poll-mode", e))?,
        (None, None) => PollMode::Adaptive,
    };
    let idle_us = match (args.poll_idle_us, file.poll_idle_us) {
        (Some(n), _) => n,
        (None, Some(n)) => parse_idle_us(&n.to_string()).map_err(|e| in_file("poll-idle-us", e))?,
        (None, None) => PollConfig::DEFAULT_IDLE.as_micros() as u64,
    };
    let guest_interval = match (args.guest_stats_interval, file.guest_stats_interval) {
        (Some(d), _) => d,
        (None, Some(secs)) => {
            parse_interval(&secs.to_string()).map_err(|e| in_file("guest-stats-interval", e))?
        }
        (None, None) => Duration::from_secs(5),
    };
    let data = PathBuf::from(DEFAULT_DIR);
    let thin_commit_period = thin_commit_period(args.thin_commit_period, &file, &in_file)?;
    let socket_flags = Access {
        owner: args.socket_owner,
        group: args.socket_group,
        mode: args.socket_mode,
    };
    let socket_access = socket_access(socket_flags, &file, &in_file)?;
    Ok(Settings {
        exports,
        cores,
        poll: PollConfig {
            mode,
            idle: Duration::from_micros(idle_us),
        },
        stats_dir: args
            .stats_dir
            .or(file.stats_dir)
            .unwrap_or_else(|| data.join("stats")),
        stats_group: match args.stats_group {
            Some(g) => Some(g),
            None => group("stats-group", &file.stats_group)?,
        },
        guest_interval,
        control: args
            .control
            .or(file.control)
            .unwrap_or_else(|| data.join("control.sock")),
        control_group: match args.control_group {
            Some(g) => Some(g),
            None => group("control-group", &file.control_group)?,
        },
        thin_commit_period,
        socket_access,
        log_level: args.log_level.or(file.log_level),
        log_format: args
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
        persist: args.config.filter(|_| args.persist),
    })
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let settings = settings(args)?;
    let log = logging::init(settings.log_level.as_deref(), settings.log_format)?;
    let cores = checked_cores(&settings)?;
    daemon::check_fd_limit(settings.exports.len())?;
    if let Some(dir) = settings
        .control
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|e| format!("--control {}: {e}", dir.display()))?;
    }
    // Before any thread starts (thin volumes start workers): every thread inherits the mask,
    // so SIGINT/SIGTERM reach only the main thread's sigwait.
    let signals = block_signals();
    let stats_dir = StatsDir::open(&settings.stats_dir, settings.stats_group)
        .map_err(|e| format!("--stats-dir {}: {e}", settings.stats_dir.display()))?;
    let reactors = Reactors::start(&cores, settings.poll, Some(&stats_dir))
        .map_err(|e| format!("starting reactors: {e}"))?;
    let daemon = match start_disks(&settings, &reactors, stats_dir) {
        Ok(daemon) => daemon,
        Err(e) => {
            reactors.shutdown();
            return Err(e);
        }
    };
    let shared = Arc::new(control::Shared {
        daemon: Mutex::new(daemon),
        persist: settings.persist.clone(),
        log,
    });
    let control =
        match control::Control::start(&settings.control, settings.control_group, shared.clone()) {
            Ok(control) => control,
            Err(e) => {
                let _ = shared.daemon.lock().unwrap().shutdown();
                reactors.shutdown();
                return Err(e);
            }
        };
    announce(&settings, &shared, &control, &reactors, &cores);
    let signal = wait_for_signal(&signals);
    tracing::info!(signal, "shutting down");
    notify::notify("STOPPING=1");
    control.stop();
    let result = shared
        .daemon
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown();
    reactors.shutdown();
    result
}

/// The cores to run reactors on: --cores, or every core this process may use.
fn checked_cores(settings: &Settings) -> Result<Vec<usize>, String> {
    let available = all_cores();
    let cores = settings.cores.clone().unwrap_or_else(|| available.clone());
    match cores.iter().find(|c| !available.contains(c)) {
        Some(core) => Err(format!(
            "--cores: core {core} is not available to this process (available: {available:?})"
        )),
        None => Ok(cores),
    }
}

/// The thin pools' commit period: the flag's, else the config file's, else the default;
/// None for 0 (only on FLUSH).
fn thin_commit_period(
    flag: Option<Duration>,
    file: &config::Config,
    in_file: &dyn Fn(&str, String) -> String,
) -> Result<Option<Duration>, String> {
    let period = match (flag, file.thin_commit_period) {
        (Some(p), _) => p,
        (None, Some(secs)) => {
            parse_commit_period(&secs.to_string()).map_err(|e| in_file("thin-commit-period", e))?
        }
        (None, None) => daemon::DEFAULT_THIN_COMMIT_PERIOD,
    };
    Ok(Some(period).filter(|p| !p.is_zero()))
}

/// Owner, group and mode of vhost-user sockets: each flag given, else the config file's.
fn socket_access(
    flags: Access,
    file: &config::Config,
    in_file: &dyn Fn(&str, String) -> String,
) -> Result<Access, String> {
    let from_file =
        |key: &str, value: Option<&toml::Value>, parse: fn(&str) -> Result<u32, String>| {
            value
                .map(|v| config::group_text(v).and_then(|text| parse(&text)))
                .transpose()
                .map_err(|e| in_file(key, e))
        };
    Ok(Access {
        owner: match flags.owner {
            Some(uid) => Some(uid),
            None => from_file("socket-owner", file.socket_owner.as_ref(), ids::parse_user)?,
        },
        group: match flags.group {
            Some(gid) => Some(gid),
            None => from_file("socket-group", file.socket_group.as_ref(), ids::parse_group)?,
        },
        mode: match flags.mode {
            Some(mode) => Some(mode),
            None => file
                .socket_mode
                .as_deref()
                .map(ids::parse_mode)
                .transpose()
                .map_err(|e| in_file("socket-mode", e))?,
        },
    })
}

/// A daemon serving every configured disk; on an error none is left served.
fn start_disks(
    settings: &Settings,
    reactors: &Reactors,
    stats_dir: StatsDir,
) -> Result<Daemon, String> {
    let handles: Vec<_> = (0..reactors.len())
        .map(|i| reactors.for_queue(i).clone())
        .collect();
    let mut daemon = Daemon::new(handles, stats_dir, settings.guest_interval);
    daemon.set_socket_access(settings.socket_access);
    daemon.set_thin_commit_period(settings.thin_commit_period);
    for entry in &settings.exports {
        if let Err(e) = daemon.add(&entry.spec, entry.name.as_deref()) {
            let _ = daemon.shutdown();
            let which = entry.name.as_deref().unwrap_or(&entry.spec);
            return Err(format!("{which}: {e}"));
        }
    }
    Ok(daemon)
}

/// Tells the operator (and systemd) what is served and how to reach it.
fn announce(
    settings: &Settings,
    shared: &control::Shared,
    control: &control::Control,
    reactors: &Reactors,
    cores: &[usize],
) {
    let (stats_path, first) = {
        let daemon = shared.daemon.lock().unwrap_or_else(|e| e.into_inner());
        let first = daemon.disks().first().map(|d| d.spec.clone());
        (daemon.stats_dir().to_owned(), first)
    };
    let default_only =
        settings.exports.len() == 1 && settings.exports[0].name.as_deref() == Some("disk0");
    if let Some(spec) = first.filter(|spec| default_only && spec.ends_with("volume=disk0")) {
        if let Ok(export::Export {
            transport: export::Transport::VhostUser { socket },
            num_queues,
            ..
        }) = spec.parse()
        {
            println!(
                "pollblk: serving {DEFAULT_DIR}/pool, volume disk0 on {}\nAttach a guest with:\n{}\n\
                 (or, from the source tree, boot a ready-made test guest on it: tests/guest/try.sh)",
                socket.display(),
                qemu_command_line(&socket, num_queues)
            );
        }
    }
    println!(
        "pollblk: statistics in {} (read them with: pollblk stats {0} --watch 1)",
        stats_path.display()
    );
    println!(
        "pollblk: control socket {} (try: pollblk rpc --socket {0} export_list)",
        control.path().display()
    );
    println!(
        "pollblk: ready, {} reactor(s) on cores {cores:?}, poll mode {:?}",
        reactors.len(),
        settings.poll.mode
    );
    notify::notify(&format!(
        "READY=1\nSTATUS=serving {} disk(s)",
        settings.exports.len()
    ));
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
