//! A thin pool's status as people and programs read it: shared by `pollblk pool status`
//! (pool_cmd.rs) and the control socket's pool_status.

use pollblk_engine::thin::PoolStatus;

/// A pool's status as JSON (`pollblk pool status --json`, the control socket's pool_status).
pub fn status_value(s: &PoolStatus) -> serde_json::Value {
    let volumes: Vec<serde_json::Value> = s
        .volumes
        .iter()
        .map(|v| {
            serde_json::json!({
                "name": v.name,
                "size_bytes": v.size_bytes,
                "mapped_bytes": v.mapped_bytes,
                "owned_bytes": v.owned_bytes,
                "shared_bytes": v.shared_bytes,
                "snapshot": v.snapshot,
                "origin": v.origin,
            })
        })
        .collect();
    serde_json::json!({
        "block_size": s.block_size,
        "size_bytes": s.size_bytes,
        "used_bytes": s.used_bytes,
        "free_bytes": s.free_bytes,
        "volumes": volumes,
    })
}

/// The text form of `status_value`'s JSON (from this process or from a daemon).
pub fn status_text(s: &serde_json::Value) -> String {
    let mut out = format!(
        "block size {}, size {}, used {}, free {}\n",
        s["block_size"], s["size_bytes"], s["used_bytes"], s["free_bytes"]
    );
    for v in s["volumes"].as_array().into_iter().flatten() {
        let kind = match v["snapshot"].as_bool() {
            Some(true) => "snapshot",
            _ => "volume",
        };
        let origin = match v["origin"].as_str() {
            Some(o) => format!(" (of {o})"),
            None => String::new(),
        };
        out += &format!(
            "  {kind} {}{origin}: size {}, mapped {} (owned {}, shared {})\n",
            v["name"].as_str().unwrap_or("?"),
            v["size_bytes"],
            v["mapped_bytes"],
            v["owned_bytes"],
            v["shared_bytes"]
        );
    }
    out
}
