//! `pollblk stats`: reads statistics files in KVM's binary stats layout (pollblk's own, or a
//! KVM VM or vCPU stats fd passed in) and prints them once, or as rates with --watch; as
//! text, JSON lines or Prometheus's text exposition format.

use crate::stats_view::{json_report, open_paths, prometheus, sample_all, text, Row, Source};
use pollblk_engine::stats::{Sample, StatsReader};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Statistics files, or directories of them (default: ./pollblk-data/stats, the serving
    /// daemon's default --stats-dir).
    paths: Vec<PathBuf>,
    /// Also read this inherited file descriptor (e.g. a KVM VM or vCPU stats fd). Repeatable.
    #[arg(long = "fd", value_name = "N")]
    fds: Vec<i32>,
    /// One JSON object per report.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Prometheus text exposition format (HELP and TYPE lines, values in base units).
    #[arg(long)]
    prometheus: bool,
    /// Report every SECS seconds (rates per second, percentiles over the interval).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    watch: Option<Duration>,
    /// With --watch: stop after N reports.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.01..=86400.0).contains(&secs) {
        return Err(format!("{secs} s: expected 0.01 to 86400"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn open_sources(args: &StatsArgs) -> Result<Vec<Source>, String> {
    let mut paths = args.paths.clone();
    if paths.is_empty() && args.fds.is_empty() {
        paths.push(PathBuf::from(crate::DEFAULT_DIR).join("stats"));
    }
    let mut sources = open_paths(&paths)?;
    for (i, &fd) in args.fds.iter().enumerate() {
        if fd < 3 || args.fds[..i].contains(&fd) {
            return Err(format!(
                "--fd {fd}: give each inherited descriptor once, 3 or above"
            ));
        }
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor number: fails if it is not open; the copy
        // is ours to own (the inherited one is left alone).
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if copy < 0 {
            return Err(format!("--fd {fd}: not an open file descriptor"));
        }
        // SAFETY: `copy` is a new descriptor owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(copy) };
        sources.push(StatsReader::from_file(file).map_err(|e| format!("--fd {fd}: {e}"))?);
    }
    sample_all(sources)
}

pub fn run(args: StatsArgs) -> Result<(), String> {
    let mut sources = open_sources(&args)?;
    let Some(interval) = args.watch else {
        let out = report(&args, &sources, None);
        print!("{out}");
        return Ok(());
    };
    let mut reports = 0u64;
    let mut then = Instant::now();
    loop {
        std::thread::sleep(interval);
        let now = Instant::now();
        let elapsed = (now - then).as_secs_f64();
        then = now;
        let mut current = Vec::with_capacity(sources.len());
        for s in &sources {
            current.push(
                s.reader
                    .sample()
                    .map_err(|e| format!("{}: {e}", s.reader.id()))?,
            );
        }
        let out = report(&args, &sources, Some((&current, elapsed)));
        print!("{out}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        for (s, c) in sources.iter_mut().zip(current) {
            s.last = c;
        }
        reports += 1;
        if args.count.is_some_and(|n| reports >= n) {
            return Ok(());
        }
    }
}

fn report(args: &StatsArgs, sources: &[Source], current: Option<(&[Sample], f64)>) -> String {
    let rows: Vec<Row<'_>> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| match current {
            Some((now, secs)) => (s, &now[i], Some((&s.last, secs))),
            None => (s, &s.last, None),
        })
        .collect();
    if args.prometheus {
        prometheus(&rows)
    } else if args.json {
        json_report(&rows, current.map(|(_, secs)| secs)).to_string() + "\n"
    } else {
        text(&rows, current.map(|(_, secs)| secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_arguments_are_checked() {
        assert!(parse_secs("0.5").is_ok());
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("soon").is_err());
    }
}
