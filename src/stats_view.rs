//! Statistics files as people and programs read them: one sample of each file, shown as
//! text (with per-disk totals), JSON or Prometheus's text exposition format. Shared by
//! `pollblk stats` (stats_cmd.rs), the control socket's stats_get and `pollblk rpc`.

use pollblk_engine::stats::format::{log_hist_upper, Desc, StatType, Unit};
use pollblk_engine::stats::{Sample, StatsReader};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::path::PathBuf;

/// One statistics file being read.
pub struct Source {
    pub reader: StatsReader,
    pub last: Sample,
}

/// Takes a first sample of each reader.
pub fn sample_all(sources: Vec<StatsReader>) -> Result<Vec<Source>, String> {
    sources
        .into_iter()
        .map(|reader| {
            let last = reader
                .sample()
                .map_err(|e| format!("{}: {e}", reader.id()))?;
            Ok(Source { reader, last })
        })
        .collect()
}

/// Readers for statistics files and directories of them (every *.stats file inside).
pub fn open_paths(paths: &[PathBuf]) -> Result<Vec<StatsReader>, String> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "stats"))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{}: no statistics files (is a daemon serving with this --stats-dir?)",
                    path.display()
                ));
            }
            found.sort_by_key(|p| natural_key(p));
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    files
        .iter()
        .map(|path| StatsReader::open(path).map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

/// One sample of `paths` in the JSON layout of `pollblk stats --json` (the control
/// socket's stats_get).
pub fn snapshot(paths: &[PathBuf]) -> Result<Value, String> {
    let sources = sample_all(open_paths(paths)?)?;
    let rows: Vec<Row<'_>> = sources.iter().map(|s| (s, &s.last, None)).collect();
    Ok(json_report(&rows, None))
}

/// One sample of an open statistics file (a descriptor from the control socket), as
/// `snapshot`.
pub fn snapshot_file(file: std::fs::File) -> Result<Value, String> {
    let reader = StatsReader::from_file(file).map_err(|e| format!("statistics fd: {e}"))?;
    let sources = sample_all(vec![reader])?;
    let rows: Vec<Row<'_>> = sources.iter().map(|s| (s, &s.last, None)).collect();
    Ok(json_report(&rows, None))
}

/// Sorts disk2 before disk10 and queue-2 before queue-10.
fn natural_key(path: &std::path::Path) -> Vec<(String, u64)> {
    let name = path.file_stem().unwrap_or_default().to_string_lossy();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut number = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            if !number.is_empty() {
                out.push((
                    std::mem::take(&mut text),
                    number.parse().unwrap_or(u64::MAX),
                ));
                number.clear();
            }
            text.push(c);
        }
    }
    out.push((text, number.parse().unwrap_or(0)));
    out
}

/// What one statistic shows in a report.
enum Shown {
    /// A single value in its unit (scaled), and its rate per second over the interval.
    Scalar { value: f64, rate: Option<f64> },
    /// A histogram: samples counted, percentiles (upper bounds, in the unit).
    Hist {
        count: u64,
        percentiles: Vec<(f64, f64)>,
        buckets: Vec<(f64, u64)>,
    },
}

const PERCENTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// Inclusive upper bound of bucket `i` of a histogram, in raw units.
fn bucket_upper(desc: &Desc, i: usize) -> f64 {
    match desc.stat_type() {
        Some(StatType::LinearHist) => ((i as u64 + 1) * u64::from(desc.bucket_size)) as f64,
        _ => log_hist_upper(i) as f64,
    }
}

fn show(desc: &Desc, now: &[u64], before: Option<(&[u64], f64)>) -> Shown {
    let scale = desc.scale();
    let ty = desc.stat_type();
    if ty.is_some_and(StatType::is_hist) {
        let counts: Vec<u64> = match before {
            Some((b, _)) if b.len() == now.len() => {
                now.iter().zip(b).map(|(n, b)| n.wrapping_sub(*b)).collect()
            }
            _ => now.to_vec(),
        };
        let count = counts.iter().fold(0u64, |a, &c| a.saturating_add(c));
        let mut percentiles = Vec::new();
        if count > 0 {
            for p in PERCENTILES {
                let target = ((p * count as f64).ceil() as u64).max(1);
                let mut seen = 0;
                for (i, c) in counts.iter().enumerate() {
                    seen = u64::saturating_add(seen, *c);
                    if seen >= target {
                        percentiles.push((p, bucket_upper(desc, i) * scale));
                        break;
                    }
                }
            }
        }
        let buckets = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (bucket_upper(desc, i) * scale, c))
            .collect();
        return Shown::Hist {
            count,
            percentiles,
            buckets,
        };
    }
    let raw = now.first().copied().unwrap_or(0);
    let rate = match (ty, before) {
        (Some(StatType::Cumulative), Some((b, secs))) if secs > 0.0 => {
            let delta = raw.wrapping_sub(b.first().copied().unwrap_or(0));
            Some(delta as f64 * scale / secs)
        }
        _ => None,
    };
    Shown::Scalar {
        value: raw as f64 * scale,
        rate,
    }
}

fn unit_suffix(desc: &Desc) -> &'static str {
    match desc.unit() {
        Some(Unit::Seconds) => "s",
        Some(Unit::Bytes) => "B",
        Some(Unit::Cycles) => "cycles",
        _ => "",
    }
}

/// A number for people: integers as they are, others with 4 significant digits; seconds
/// with ns/us/ms.
fn human(value: f64, desc: &Desc) -> String {
    if desc.unit() == Some(Unit::Seconds) {
        let (v, u) = if value == 0.0 {
            (0.0, "s")
        } else if value < 1e-6 {
            (value * 1e9, "ns")
        } else if value < 1e-3 {
            (value * 1e6, "us")
        } else if value < 1.0 {
            (value * 1e3, "ms")
        } else {
            (value, "s")
        };
        return format!("{v:.4}{u}").replace(".0000", "");
    }
    if desc.unit() == Some(Unit::Boolean) {
        return if value != 0.0 { "yes" } else { "no" }.into();
    }
    let text = if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value}")
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    };
    let suffix = unit_suffix(desc);
    if suffix.is_empty() {
        text
    } else {
        format!("{text} {suffix}")
    }
}

pub type Row<'a> = (&'a Source, &'a Sample, Option<(&'a Sample, f64)>);

fn shown_of<'a>(row: &Row<'a>) -> impl Iterator<Item = (&'a Desc, Shown)> + 'a {
    let (source, now, before) = *row;
    source.reader.descs().iter().map(move |d| {
        let b = before.map(|(b, secs)| (b.of(d), secs));
        (d, show(d, now.of(d), b))
    })
}

/// Queue statistics summed per disk in a --watch report, in this order.
const SUMMED: [&str; 10] = [
    "read_ops",
    "write_ops",
    "read_sectors",
    "write_sectors",
    "read_time",
    "write_time",
    "errors_ioerr",
    "in_flight",
    "throttled_requests",
    "discard_ops",
];
/// Index in SUMMED of the one gauge (summed as it stands, not as a change).
const IN_FLIGHT: usize = 7;

/// One disk's sums over its queues: changes over the interval, and the gauge as it stands.
struct DiskTotals {
    name: String,
    v: [f64; SUMMED.len()],
}

/// Sums the queues of pollblk's files (ids `.../DISK/queue-N`) per disk.
fn sum_per_disk(rows: &[Row<'_>]) -> Vec<DiskTotals> {
    let mut disks: Vec<DiskTotals> = Vec::new();
    for (source, now, before) in rows {
        let id = source.reader.id();
        let mut parts = id.rsplit('/');
        let (Some(queue), Some(disk)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !queue.starts_with("queue-") {
            continue;
        }
        let at = match disks.iter().position(|d| d.name == disk) {
            Some(at) => at,
            None => {
                disks.push(DiskTotals {
                    name: disk.to_string(),
                    v: [0.0; SUMMED.len()],
                });
                disks.len() - 1
            }
        };
        for desc in source.reader.descs() {
            let Some(k) = SUMMED.iter().position(|n| *n == desc.name) else {
                continue;
            };
            let raw = now.of(desc).first().copied().unwrap_or(0);
            let value = if k == IN_FLIGHT {
                raw as f64
            } else {
                let then = before.map_or(0, |(b, _)| b.of(desc).first().copied().unwrap_or(0));
                raw.wrapping_sub(then) as f64 * desc.scale()
            };
            disks[at].v[k] += value;
        }
    }
    disks
}

/// Per-disk totals over the queues, for the top of a --watch report: what an operator scans
/// first.
fn disk_summary(rows: &[Row<'_>], secs: f64) -> String {
    let disks = sum_per_disk(rows);
    if disks.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{:<10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>9} {:>11}\n",
        "disk",
        "r/s",
        "w/s",
        "discard/s",
        "rMB/s",
        "wMB/s",
        "r_lat",
        "w_lat",
        "inflight",
        "errors/s",
        "throttled/s"
    );
    let lat = |time: f64, ops: f64| {
        if ops > 0.0 {
            let us = time / ops * 1e6;
            format!("{us:.1}us")
        } else {
            "-".into()
        }
    };
    for d in &disks {
        let v = &d.v;
        let _ = writeln!(
            out,
            "{:<10} {:>10.0} {:>10.0} {:>9.0} {:>9.1} {:>9.1} {:>10} {:>10} {:>8} {:>9.0} {:>11.0}",
            d.name,
            v[0] / secs,
            v[1] / secs,
            v[9] / secs,
            v[2] * 512.0 / secs / 1e6,
            v[3] * 512.0 / secs / 1e6,
            lat(v[4], v[0]),
            lat(v[5], v[1]),
            v[IN_FLIGHT],
            v[6] / secs,
            v[8] / secs
        );
    }
    out
}

pub fn text(rows: &[Row<'_>], interval: Option<f64>) -> String {
    let mut out = String::new();
    if let Some(secs) = interval {
        let _ = writeln!(out, "--- {:.2} s ---", secs);
        out.push_str(&disk_summary(rows, secs));
    }
    let mut quiet = Vec::new();
    for row in rows {
        let lines = object_lines(row, interval);
        // Watching, an object with nothing to show (a queue the guest never started) takes
        // no lines: it is counted at the end.
        if interval.is_some() && lines.is_empty() {
            quiet.push(row.0.reader.id());
            continue;
        }
        let _ = writeln!(out, "{}", row.0.reader.id());
        out.push_str(&lines);
    }
    if !quiet.is_empty() {
        let _ = writeln!(
            out,
            "({} quiet object(s) not shown: {})",
            quiet.len(),
            quiet_names(&quiet)
        );
    }
    out
}

/// `pollblk-1/disk0/queue-2` ... `queue-15` as `pollblk-1/disk0/queue-2..15`; other ids as
/// they are.
fn quiet_names(ids: &[&str]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(String, u64, u64)> = None;
    let flush = |run: &mut Option<(String, u64, u64)>, out: &mut Vec<String>| {
        if let Some((prefix, first, last)) = run.take() {
            out.push(match first == last {
                true => format!("{prefix}{first}"),
                false => format!("{prefix}{first}..{last}"),
            });
        }
    };
    for id in ids {
        let numbered = id
            .rsplit_once('-')
            .and_then(|(prefix, n)| Some((format!("{prefix}-"), n.parse::<u64>().ok()?)));
        match (numbered, &mut run) {
            (Some((prefix, n)), Some((p, _, last))) if *p == prefix && *last + 1 == n => {
                *last = n;
            }
            (Some((prefix, n)), _) => {
                flush(&mut run, &mut out);
                run = Some((prefix, n, n));
            }
            (None, _) => {
                flush(&mut run, &mut out);
                out.push(id.to_string());
            }
        }
    }
    flush(&mut run, &mut out);
    out.join(", ")
}

/// A request class's sectors and total time: the disk line above a --watch report gives
/// them as MB/s and mean latency.
fn in_disk_line(name: &str) -> bool {
    const CLASSES: [&str; 7] = [
        "read",
        "write",
        "flush",
        "discard",
        "write_zeroes",
        "provision",
        "other",
    ];
    ["_sectors", "_time"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|class| CLASSES.contains(&class))
    })
}

/// The lines of one object's statistics (watching: only what moved or is set, and not
/// what the disk line says).
fn object_lines(row: &Row<'_>, interval: Option<f64>) -> String {
    let mut out = String::new();
    for (desc, shown) in shown_of(row) {
        if interval.is_some() && in_disk_line(&desc.name) {
            continue;
        }
        let line = match shown {
            Shown::Scalar { value, rate } => match rate {
                // Watching: counters as rates; quiet ones are left out.
                Some(rate) if interval.is_some() => {
                    if rate == 0.0 {
                        continue;
                    }
                    format!("{}/s", human(rate, desc))
                }
                _ if interval.is_some() && value == 0.0 => continue,
                _ => human(value, desc),
            },
            Shown::Hist {
                count, percentiles, ..
            } => {
                if interval.is_some() && count == 0 {
                    continue;
                }
                let mut line = format!("n={count}");
                for (p, v) in percentiles {
                    let _ = write!(line, " p{}<{}", p * 100.0, bucket_bound(v, desc));
                }
                line
            }
        };
        let _ = writeln!(out, "  {:<32} {line}", desc.name);
    }
    out
}

/// A histogram bucket's upper bound, to the two or three digits it can mean (a log2 bucket
/// only says the value is between half the bound and the bound): 8.191 us is "8.2us".
fn bucket_bound(value: f64, desc: &Desc) -> String {
    if desc.unit() != Some(Unit::Seconds) || value == 0.0 {
        return human(value, desc);
    }
    let (v, unit) = match value {
        v if v < 1e-6 => (v * 1e9, "ns"),
        v if v < 1e-3 => (v * 1e6, "us"),
        v if v < 1.0 => (v * 1e3, "ms"),
        v => (v, "s"),
    };
    match v {
        v if v < 10.0 => format!("{v:.1}{unit}"),
        v => format!("{v:.0}{unit}"),
    }
}

pub fn json_report(rows: &[Row<'_>], interval: Option<f64>) -> Value {
    let sources: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut stats = Map::new();
            for (desc, shown) in shown_of(row) {
                let value = match shown {
                    Shown::Scalar { value, rate } => {
                        let mut v = json!({ "value": value });
                        if let Some(rate) = rate {
                            v["rate"] = json!(rate);
                        }
                        v
                    }
                    Shown::Hist {
                        count,
                        percentiles,
                        buckets,
                    } => {
                        let mut p = Map::new();
                        for (q, v) in percentiles {
                            p.insert(format!("p{}", q * 100.0), json!(v));
                        }
                        json!({
                            "count": count,
                            "percentiles": p,
                            "buckets": buckets.iter().map(|(le, c)| json!([le, c])).collect::<Vec<_>>(),
                        })
                    }
                };
                let mut v = value;
                v["type"] = json!(type_name(desc));
                v["unit"] = json!(unit_name(desc));
                stats.insert(desc.name.clone(), v);
            }
            json!({ "id": row.0.reader.id(), "stats": stats })
        })
        .collect();
    let mut out = json!({ "sources": sources });
    if let Some(secs) = interval {
        out["interval_seconds"] = json!(secs);
    }
    out
}

fn type_name(desc: &Desc) -> &'static str {
    match desc.stat_type() {
        Some(StatType::Cumulative) => "cumulative",
        Some(StatType::Instant) => "instant",
        Some(StatType::Peak) => "peak",
        Some(StatType::LinearHist) => "linear_hist",
        Some(StatType::LogHist) => "log_hist",
        None => "unknown",
    }
}

fn unit_name(desc: &Desc) -> &'static str {
    match desc.unit() {
        Some(Unit::None) => "none",
        Some(Unit::Bytes) => "bytes",
        Some(Unit::Seconds) => "seconds",
        Some(Unit::Cycles) => "cycles",
        Some(Unit::Boolean) => "boolean",
        None => "unknown",
    }
}

/// Prometheus labels of an id: `pollblk-1234/disk0/queue-1` gives
/// `source="pollblk-1234",object="disk0",queue="1"`; `kvm-1234/vcpu-0` gives
/// `source="kvm-1234",vcpu="0"`.
fn labels(id: &str) -> String {
    let mut parts = id.split('/');
    let mut out = format!("source=\"{}\"", escape(parts.next().unwrap_or("")));
    for part in parts {
        match part.rsplit_once('-') {
            Some((key, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                let _ = write!(out, ",{}=\"{n}\"", sanitize(key));
            }
            _ => {
                let _ = write!(out, ",object=\"{}\"", escape(part));
            }
        }
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric or label name: [a-zA-Z_:][a-zA-Z0-9_:]*.
fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn metric_name(id: &str, desc: &Desc) -> String {
    let prefix = id.split(['-', '/']).next().unwrap_or("stats");
    let mut name = sanitize(&format!("{prefix}_{}", desc.name));
    let unit = match desc.unit() {
        Some(Unit::Seconds) => "_seconds",
        Some(Unit::Bytes) => "_bytes",
        _ => "",
    };
    if !name.ends_with(unit) {
        name.push_str(unit);
    }
    if desc.stat_type() == Some(StatType::Cumulative) {
        name.push_str("_total");
    }
    name
}

pub fn prometheus(rows: &[Row<'_>]) -> String {
    // Every sample of a metric goes under its one HELP/TYPE block.
    let mut order: Vec<String> = Vec::new();
    let mut metrics: std::collections::HashMap<String, (String, Vec<String>)> =
        std::collections::HashMap::new();
    for row in rows {
        let id = row.0.reader.id();
        let labels = labels(id);
        for (desc, shown) in shown_of(row) {
            let name = metric_name(id, desc);
            let kind = match desc.stat_type() {
                Some(StatType::Cumulative) => "counter",
                Some(t) if t.is_hist() => "histogram",
                _ => "gauge",
            };
            let entry = metrics.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                let head = format!(
                    "# HELP {name} {} ({}, {} in KVM binary stats)\n# TYPE {name} {kind}\n",
                    desc.name,
                    type_name(desc),
                    unit_name(desc)
                );
                (head, Vec::new())
            });
            match shown {
                Shown::Scalar { value, .. } => {
                    entry.1.push(format!("{name}{{{labels}}} {value}\n"));
                }
                Shown::Hist { count, buckets, .. } => {
                    let mut cumulative = 0;
                    let last = buckets.len().saturating_sub(1);
                    for (i, (le, c)) in buckets.iter().enumerate() {
                        cumulative = u64::saturating_add(cumulative, *c);
                        // The last bucket is open-ended: it is +Inf's.
                        if i < last {
                            entry.1.push(format!(
                                "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}\n"
                            ));
                        }
                    }
                    entry
                        .1
                        .push(format!("{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n"));
                    entry.1.push(format!("{name}_count{{{labels}}} {count}\n"));
                }
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (head, samples) = &metrics[&name];
        out.push_str(head);
        for s in samples {
            out.push_str(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_prometheus_labels() {
        assert_eq!(
            labels("pollblk-12/disk0/queue-3"),
            "source=\"pollblk-12\",object=\"disk0\",queue=\"3\""
        );
        assert_eq!(labels("kvm-7/vcpu-0"), "source=\"kvm-7\",vcpu=\"0\"");
    }
}
