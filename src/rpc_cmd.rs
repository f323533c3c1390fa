//! `pollblk rpc`: the control socket's client. Sends one JSON-RPC request and prints the
//! result as JSON; a descriptor passed back (stats_fd) is read and shown.

use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

#[derive(clap::Args)]
pub struct RpcArgs {
    /// The daemon's control socket (`serve --control`).
    #[arg(long, value_name = "PATH", default_value = "pollblk-data/control.sock")]
    socket: PathBuf,
    /// Seconds to wait for the answer (with a `wait` parameter, at least that wait plus 10).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
    /// The method: export_add, export_remove, export_list, export_resize, qos_set, qos_get,
    /// queue_pause, queue_resume, stats_get, stats_fd, pool_status, volume_create,
    /// volume_delete, log_level, rpc_get_methods.
    method: String,
    /// A parameter, KEY=VALUE (repeatable). VALUE is taken as JSON when it is a number,
    /// true, false, null, an array or an object, else as a string.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
}

fn param_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if !v.is_string() => v,
        _ => Value::String(text.to_string()),
    }
}

pub fn run(args: RpcArgs) -> Result<(), String> {
    let mut params = Map::new();
    for p in &args.params {
        let (key, value) = p
            .split_once('=')
            .ok_or_else(|| format!("--param {p:?}: expected KEY=VALUE"))?;
        if key.is_empty() || params.insert(key.to_string(), param_value(value)).is_some() {
            return Err(format!("--param {p:?}: give each key once"));
        }
    }
    let (mut result, file) = call(&args.socket, &args.method, params, args.timeout)?;
    if let Some(file) = file {
        // stats_fd: show what the descriptor reads.
        result["stats"] = crate::stats_view::snapshot_file(file)?;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&result).expect("a JSON value")
    );
    Ok(())
}

/// Calls `method` on the control socket at `socket`: its result, and the descriptor that
/// came with it, if any.
pub fn call(
    socket: &Path,
    method: &str,
    params: Map<String, Value>,
    timeout_secs: u64,
) -> Result<(Value, Option<std::fs::File>), String> {
    let request = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "{}: {e} (is `pollblk serve` running with this --control?)",
            socket.display()
        )
    })?;
    // An export_remove told to wait for the front end answers only after that wait.
    let timeout = match params.get("wait").and_then(Value::as_u64) {
        Some(wait) => timeout_secs.max(wait.saturating_add(10)),
        None => timeout_secs.max(1),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(timeout)))
        .map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut &stream, format!("{request}\n").as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let (line, file) = read_reply(&stream).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "{}: no answer in {timeout} s (--timeout): the daemon is busy or stuck",
            socket.display()
        ),
        _ => format!("reading the answer: {e}"),
    })?;
    let reply: Value =
        serde_json::from_str(&line).map_err(|e| format!("the daemon's answer is not JSON: {e}"))?;
    if let Some(error) = reply.get("error") {
        return Err(format!(
            "{} (JSON-RPC error {})",
            error["message"].as_str().unwrap_or("?"),
            error["code"]
        ));
    }
    Ok((reply.get("result").cloned().unwrap_or(Value::Null), file))
}

/// One reply line and the descriptor sent with its first byte, if any.
fn read_reply(stream: &UnixStream) -> std::io::Result<(String, Option<std::fs::File>)> {
    let mut first = vec![0u8; 4096];
    let (n, file) = stream.recv_with_fd(&mut first)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection",
        ));
    }
    first.truncate(n);
    let mut line = first;
    if !line.ends_with(b"\n") {
        BufReader::new(stream.take(16 << 20)).read_until(b'\n', &mut line)?;
    }
    let line = String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))?;
    Ok((line, file))
}
