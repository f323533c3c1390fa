//! One load run as text for people and as JSON for scripts.

use crate::load::LoadResult;
use serde_json::{json, Value};

/// Latency percentiles reported, as (label, quantile).
const PERCENTILES: [(&str, f64); 3] = [("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)];

pub fn to_json(r: &LoadResult) -> Value {
    let lat = &r.latency_ns;
    let mut latency = serde_json::Map::new();
    for (label, q) in PERCENTILES {
        latency.insert(label.to_string(), json!(lat.value_at_quantile(q)));
    }
    latency.insert("mean".into(), json!(lat.mean().round() as u64));
    latency.insert("max".into(), json!(lat.max()));
    json!({
        "socket": r.spec.socket,
        "rw": r.spec.pattern.name(),
        "bs": r.spec.bs,
        "iodepth": r.spec.iodepth,
        "queues": r.spec.queues,
        "runtime_s": r.elapsed.as_secs_f64(),
        "ios": r.ios,
        "writes": r.writes,
        "errors": r.errors,
        "iops": r.iops(),
        "mb_per_s": r.mb_per_s(),
        "latency_ns": latency,
        "generator": {
            "busy_fraction": r.busy.as_secs_f64() / r.elapsed.as_secs_f64().max(1e-9),
            "ceiling_iops": r.generator_ceiling_iops(),
        },
        "target": {
            "pid": r.spec.target_pid,
            "cpu_s": r.target_cpu_s,
            "iops_per_cpu_s": r.iops_per_target_cpu_s(),
        },
        "ios_per_queue": r.ios_per_queue,
        "latency_per_queue_ns": r.latency_per_queue_ns.iter().map(|h| json!({
            "p50": h.value_at_quantile(0.5),
            "p99": h.value_at_quantile(0.99),
        })).collect::<Vec<_>>(),
        "fairness_jain": crate::many::jain_index(&r.ios_per_queue),
    })
}

pub fn to_text(r: &LoadResult) -> String {
    let s = &r.spec;
    let mut out = format!(
        "{} bs={} iodepth={} queues={} on {}\n",
        s.pattern.name(),
        s.bs,
        s.iodepth,
        s.queues,
        s.socket.display()
    );
    out += &format!(
        "  {:.0} IOPS, {:.1} MB/s, {} I/Os in {:.2} s, {} errors\n",
        r.iops(),
        r.mb_per_s(),
        r.ios,
        r.elapsed.as_secs_f64(),
        r.errors
    );
    if r.ios > 0 {
        let lat = &r.latency_ns;
        out += "  latency";
        for (label, q) in PERCENTILES {
            out += &format!(" {label} {:.1} us", lat.value_at_quantile(q) as f64 / 1e3);
        }
        out += &format!(" mean {:.1} us\n", lat.mean() / 1e3);
    }
    if let Some(ceiling) = r.generator_ceiling_iops() {
        out += &format!(
            "  generator busy {:.0}% of the time: its own ceiling ~{:.0} IOPS\n",
            100.0 * r.busy.as_secs_f64() / r.elapsed.as_secs_f64(),
            ceiling
        );
    }
    if let Some(cpu) = r.target_cpu_s {
        out += &format!("  target CPU {cpu:.2} s");
        match r.iops_per_target_cpu_s() {
            Some(per) => out += &format!(", {per:.0} IOPS per target CPU-second\n"),
            None => out += "\n",
        }
    }
    if r.ios_per_queue.len() > 1 {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let (min, max) = (
            r.ios_per_queue.iter().min().copied().unwrap_or(0),
            r.ios_per_queue.iter().max().copied().unwrap_or(0),
        );
        out += &format!(
            "  per queue {:.0} to {:.0} IOPS, Jain's fairness index {:.3}\n",
            min as f64 / secs,
            max as f64 / secs,
            crate::many::jain_index(&r.ios_per_queue)
        );
    }
    if !s.depths.is_empty() {
        for (q, lat) in r.latency_per_queue_ns.iter().enumerate() {
            out += &format!(
                "  disk {q} at QD{}: {:.0} IOPS, latency p50 {:.1} us p99 {:.1} us\n",
                s.depth_of(q),
                r.ios_per_queue[q] as f64 / r.elapsed.as_secs_f64().max(1e-9),
                lat.value_at_quantile(0.5) as f64 / 1e3,
                lat.value_at_quantile(0.99) as f64 / 1e3
            );
        }
    }
    out
}
