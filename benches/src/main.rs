//! pollblk-bench: a load generator for vhost-user-blk sockets, and `compare`, which runs the
//! same loads against pollblk and qemu-storage-daemon side by side.

mod blkio_queues;
mod compare;
mod daemons;
mod idle;
mod lean;
mod load;
mod many;
mod qos;
mod report;
mod scale;
mod snapshot;

use clap::{Args, Parser, Subcommand};
use load::{DriverKind, LoadSpec, Pattern};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pollblk-bench",
    version,
    about = "Drive a vhost-user-blk socket like a polling guest driver and measure it",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run pollblk and qemu-storage-daemon alternately on the same loads and print the ratios.
    Compare(compare::CompareArgs),
}

#[derive(Args)]
struct LoadArgs {
    /// vhost-user-blk socket to drive.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// I/O pattern: randread, randwrite, randrw (half and half) or idle (connect, issue
    /// nothing, report the target's CPU).
    #[arg(long, default_value = "randread")]
    rw: Pattern,
    /// Bytes per I/O (suffixes k, m).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Queues to open, all driven by one thread.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Report this process's CPU time and IOPS per CPU-second (the target daemon).
    #[arg(long, value_name = "PID")]
    target_pid: Option<u32>,
    /// Front end: blkio (libblkio's virtio-blk-vhost-user driver) or lean (pollblk's own
    /// minimal split-ring driver, for when libblkio is the bottleneck).
    #[arg(long, default_value = "blkio")]
    driver: DriverKind,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also hold idle front ends on these sockets (`{}` is replaced by 0 to
    /// --idle-count - 1): each started, one read served, then quiet for the whole run.
    #[arg(long, value_name = "PATTERN", requires = "idle_count")]
    idle_sockets: Option<String>,
    /// How many idle front ends --idle-sockets holds.
    #[arg(long, value_name = "N", requires = "idle_sockets")]
    idle_count: Option<usize>,
    /// Drive several disks instead of --socket: the sockets this pattern names (`{}` is
    /// replaced by 0 to --disks - 1), one queue each, lean driver; reports each disk's I/Os
    /// and Jain's fairness index over them.
    #[arg(
        long,
        value_name = "PATTERN",
        requires = "disks",
        conflicts_with = "socket"
    )]
    sockets: Option<String>,
    /// How many disks --sockets drives.
    #[arg(long, value_name = "N", requires = "sockets")]
    disks: Option<usize>,
    /// With --sockets, each disk's own depth, in order (e.g. 1,128: a QD1 disk beside a deep
    /// one); the report then gives each disk's latency
    #[arg(long, value_name = "LIST", requires = "sockets", value_delimiter = ',')]
    iodepths: Vec<usize>,
}

/// Parses a byte count with an optional binary suffix (k, m, g).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let (digits, shift) = match lower.strip_suffix(['k', 'm', 'g']) {
        Some(d) if lower.ends_with('k') => (d, 10),
        Some(d) if lower.ends_with('m') => (d, 20),
        Some(d) => (d, 30),
        None => (lower.as_str(), 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 4096, 4k, 1m, 1g)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses seconds for --runtime and --ramp.
pub fn seconds(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{what}: {s} is not a number of seconds"))
}

fn run_load(args: LoadArgs) -> Result<bool, String> {
    let socket = match (&args.socket, &args.sockets) {
        (Some(socket), _) => socket.clone(),
        (None, Some(pattern)) => idle::socket_of(pattern, 0),
        (None, None) => {
            return Err(
                "--socket PATH is required (or --sockets PATTERN --disks N, or use the \
                        compare subcommand)"
                    .into(),
            )
        }
    };
    let spec = LoadSpec {
        socket,
        pattern: args.rw,
        bs: args.bs as usize,
        iodepth: args.iodepth,
        queues: args.queues,
        runtime: seconds(args.runtime, "--runtime")?,
        ramp: seconds(args.ramp, "--ramp")?,
        target_pid: args.target_pid,
        depths: args.iodepths,
    };
    let _idle = match (&args.idle_sockets, args.idle_count) {
        (Some(pattern), Some(count)) => Some(idle::connect(pattern, count)?),
        _ => None,
    };
    let result = match (&args.sockets, args.disks) {
        (Some(pattern), Some(count)) => load::run_many(&spec, pattern, count)?,
        _ => load::run(&spec, args.driver)?,
    };
    if args.json {
        println!("{:#}", report::to_json(&result));
    } else {
        print!("{}", report::to_text(&result));
    }
    if result.errors > 0 {
        eprintln!("pollblk-bench: {} I/O error(s)", result.errors);
    }
    Ok(result.errors == 0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Compare(args)) => compare::run(args),
        None => run_load(cli.load),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("pollblk-bench: error: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999g").is_err());
    }
}
