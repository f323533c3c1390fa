//! The control socket: JSON-RPC 2.0 over a Unix socket, one JSON object per line each way
//! (as SPDK's rpc.py and QEMU's QMP let an operator or an orchestrator change a running
//! service). Every method runs on the connection's thread under the daemon's mutex; none
//! touches the data path except through the engine's pause/resume and the transports.

use crate::daemon::{Daemon, DaemonError, QosTarget};
use crate::{config, export, logging, stats_view};
use pollblk_engine::unix_socket::{self, Access, BindError};
use pollblk_engine::wait::readable_or_shutdown;
use serde_json::{json, Map, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Longest request line accepted (a spec is a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;
/// Longest `wait` an export_remove may ask for.
const MAX_REMOVE_WAIT: Duration = Duration::from_secs(600);

/// JSON-RPC 2.0 error codes: the protocol's, then pollblk's (server errors, -32000 to -32099).
mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    /// The operation was tried and failed.
    pub const FAILED: i64 = -32000;
    /// No such disk or pool.
    pub const NOT_FOUND: i64 = -32001;
    /// A front end uses the disk.
    pub const IN_USE: i64 = -32002;
}

struct RpcError {
    code: i64,
    message: String,
}

fn invalid(message: impl Into<String>) -> RpcError {
    RpcError {
        code: code::INVALID_PARAMS,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> RpcError {
    RpcError {
        code: code::FAILED,
        message: message.into(),
    }
}

impl From<DaemonError> for RpcError {
    fn from(e: DaemonError) -> RpcError {
        let code = match &e {
            DaemonError::NotFound(_) => code::NOT_FOUND,
            DaemonError::Invalid(_) => code::INVALID_PARAMS,
            DaemonError::InUse(_) => code::IN_USE,
            DaemonError::Failed(_) => code::FAILED,
        };
        RpcError {
            code,
            message: e.to_string(),
        }
    }
}

/// What the control socket works on.
pub struct Shared {
    pub daemon: Mutex<Daemon>,
    /// Where runtime changes are saved (`--persist`), if anywhere.
    pub persist: Option<PathBuf>,
    pub log: logging::LogControl,
}

impl Shared {
    fn daemon(&self) -> std::sync::MutexGuard<'_, Daemon> {
        self.daemon.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the daemon's disks to the config file, if --persist.
    fn save(&self, daemon: &Daemon) -> Result<(), RpcError> {
        let Some(path) = &self.persist else {
            return Ok(());
        };
        let disks: Vec<(String, String)> = daemon
            .disks()
            .iter()
            .map(|d| (d.name.clone(), d.spec.clone()))
            .collect();
        config::save_exports(path, &disks).map_err(|e| {
            failed(format!(
                "done, but saving the disks to {} failed: {e}",
                path.display()
            ))
        })
    }
}

/// The listening control socket.
pub struct Control {
    path: PathBuf,
    shutdown: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path` with mode 0600 (0660 and group `group` if given) before anyone can connect,
/// replacing a stale socket nobody listens on.
fn bind(path: &Path, group: Option<u32>) -> io::Result<UnixListener> {
    let access = Access {
        owner: None,
        group,
        mode: Some(if group.is_some() { 0o660 } else { 0o600 }),
    };
    unix_socket::listen(path, access, 16).map_err(|e| match e {
        BindError::InUse => io::Error::new(
            io::ErrorKind::AddrInUse,
            "another daemon listens on it (give this one its own --control)",
        ),
        BindError::NotASocket => {
            io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")
        }
        BindError::Io(e) => e,
    })
}

impl Control {
    /// Listens on `path`; each connection gets a thread.
    pub fn start(path: &Path, group: Option<u32>, shared: Arc<Shared>) -> Result<Control, String> {
        let listener =
            bind(path, group).map_err(|e| format!("--control {}: {e}", path.display()))?;
        let shutdown = Arc::new(EventFd::new(0).map_err(|e| e.to_string())?);
        let thread_shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &thread_shutdown, &shared))
            .map_err(|e| e.to_string())?;
        Ok(Control {
            path: path.to_owned(),
            shutdown,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket (connections in progress finish their call).
    pub fn stop(mut self) {
        let _ = self.shutdown.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, shutdown: &EventFd, shared: &Arc<Shared>) {
    while readable_or_shutdown(listener.as_raw_fd(), shutdown) {
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve(stream, &shared));
    }
}

/// Answers requests on one connection until it closes.
fn serve(stream: UnixStream, shared: &Shared) {
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => {
                let _ = reply(
                    &stream,
                    &error_reply(
                        Value::Null,
                        RpcError {
                            code: code::INVALID_REQUEST,
                            message: format!("request longer than {MAX_LINE} bytes"),
                        },
                    ),
                    None,
                );
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let (response, fd) = handle_line(&line, shared);
        if let Some(response) = response {
            if reply(&stream, &response, fd).is_err() {
                return;
            }
        }
    }
}

fn reply(stream: &UnixStream, response: &Value, fd: Option<std::fs::File>) -> io::Result<()> {
    let mut text = response.to_string();
    text.push('\n');
    match fd {
        // The descriptor travels with the first byte of the reply line.
        Some(file) => {
            let (first, rest) = text.as_bytes().split_at(1);
            stream.send_with_fd(first, file.as_raw_fd())?;
            (&*stream).write_all(rest)
        }
        None => (&*stream).write_all(text.as_bytes()),
    }
}

fn error_reply(id: Value, e: RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "error": { "code": e.code, "message": e.message }, "id": id })
}

/// One request line: the response (None for a notification) and a descriptor to pass.
fn handle_line(line: &str, shared: &Shared) -> (Option<Value>, Option<std::fs::File>) {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            let e = RpcError {
                code: code::PARSE_ERROR,
                message: format!("not JSON: {e}"),
            };
            return (Some(error_reply(Value::Null, e)), None);
        }
    };
    let id = request.get("id").cloned();
    let bad_request = |message: &str| {
        let e = RpcError {
            code: code::INVALID_REQUEST,
            message: message.to_string(),
        };
        (
            Some(error_reply(id.clone().unwrap_or(Value::Null), e)),
            None,
        )
    };
    if request.get("jsonrpc") != Some(&json!("2.0")) {
        return bad_request("not a JSON-RPC 2.0 request (\"jsonrpc\": \"2.0\" missing)");
    }
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return bad_request("\"method\" must be a string");
    };
    let empty = Map::new();
    let params = match request.get("params") {
        None => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => return bad_request("\"params\" must be an object (named parameters)"),
    };
    tracing::debug!(method, "control request");
    let result = call(shared, method, params);
    let Some(id) = id else {
        return (None, None); // a notification: no answer
    };
    match result {
        Ok((result, fd)) => (
            Some(json!({ "jsonrpc": "2.0", "result": result, "id": id })),
            fd,
        ),
        Err(e) => {
            tracing::info!(method, error = %e.message, "control request failed");
            (Some(error_reply(id, e)), None)
        }
    }
}

/// Named parameters, with errors that say which one and what it should be.
struct Params<'a> {
    map: &'a Map<String, Value>,
    known: &'static [&'static str],
}

impl<'a> Params<'a> {
    fn new(map: &'a Map<String, Value>, known: &'static [&'static str]) -> Result<Self, RpcError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(invalid(format!(
                "unknown parameter {unknown:?} (this method takes: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(Params { map, known })
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, RpcError> {
        debug_assert!(self.known.contains(&key));
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(format!("{key} must be a string, not {other}"))),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str, RpcError> {
        self.opt_str(key)?
            .ok_or_else(|| invalid(format!("missing parameter {key}")))
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, RpcError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| invalid(format!("{key} must be a non-negative integer, not {v}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, RpcError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid(format!("{key} must be true or false, not {other}"))),
        }
    }

    /// A size: bytes as a number, or a string with a K/M/G/T suffix.
    fn size(&self, key: &str) -> Result<u64, RpcError> {
        match self.map.get(key) {
            Some(Value::String(s)) => export::parse_size(s).map_err(invalid),
            Some(v) => v.as_u64().ok_or_else(|| {
                invalid(format!(
                    "{key} must be bytes (1073741824) or \"1G\", not {v}"
                ))
            }),
            None => Err(invalid(format!("missing parameter {key}"))),
        }
    }

    fn queue(&self) -> Result<Option<usize>, RpcError> {
        Ok(self.opt_u64("queue")?.map(|q| q as usize))
    }
}

type CallResult = Result<(Value, Option<std::fs::File>), RpcError>;

/// One method of the socket: its name, the parameters it takes, and what runs it.
struct Method {
    name: &'static str,
    params: &'static [&'static str],
    run: fn(&Shared, &Params) -> CallResult,
}

const METHODS: [Method; 18] = [
    Method {
        name: "export_add",
        params: &["spec", "name"],
        run: export_add,
    },
    Method {
        name: "export_remove",
        params: &["name", "force", "wait"],
        run: export_remove,
    },
    Method {
        name: "export_list",
        params: &[],
        run: export_list,
    },
    Method {
        name: "export_resize",
        params: &["name", "size"],
        run: export_resize,
    },
    Method {
        name: "qos_set",
        params: &["name", "group", "limits"],
        run: qos_set,
    },
    Method {
        name: "qos_get",
        params: &["name", "group"],
        run: qos_get,
    },
    Method {
        name: "queue_pause",
        params: &["name", "queue"],
        run: queue_pause,
    },
    Method {
        name: "queue_resume",
        params: &["name", "queue"],
        run: queue_resume,
    },
    Method {
        name: "stats_get",
        params: &["name"],
        run: stats_get,
    },
    Method {
        name: "stats_fd",
        params: &["name", "queue"],
        run: stats_fd,
    },
    Method {
        name: "pool_status",
        params: &["pool"],
        run: pool_status,
    },
    Method {
        name: "volume_create",
        params: &["pool", "volume", "size"],
        run: volume_create,
    },
    Method {
        name: "volume_delete",
        params: &["pool", "volume"],
        run: volume_delete,
    },
    Method {
        name: "volume_snapshot",
        params: &["pool", "volume", "snapshot"],
        run: volume_snapshot,
    },
    Method {
        name: "volume_clone",
        params: &["pool", "snapshot", "volume"],
        run: volume_clone,
    },
    Method {
        name: "volume_inflate",
        params: &["pool", "volume"],
        run: volume_inflate,
    },
    Method {
        name: "log_level",
        params: &["level"],
        run: log_level,
    },
    Method {
        name: "rpc_get_methods",
        params: &[],
        run: rpc_get_methods,
    },
];

fn method_names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

fn call(shared: &Shared, method: &str, params: &Map<String, Value>) -> CallResult {
    let Some(m) = METHODS.iter().find(|m| m.name == method) else {
        return Err(RpcError {
            code: code::METHOD_NOT_FOUND,
            message: format!(
                "no method {method:?}; the methods are: {}",
                method_names().join(", ")
            ),
        });
    };
    let p = Params::new(params, m.params)?;
    (m.run)(shared, &p)
}

fn value(v: Value) -> CallResult {
    Ok((v, None))
}

fn export_add(shared: &Shared, p: &Params) -> CallResult {
    let mut daemon = shared.daemon();
    let name = daemon.add(p.str("spec")?, p.opt_str("name")?)?;
    let described = daemon.describe(daemon.disk(&name)?);
    shared.save(&daemon)?;
    value(described)
}

/// Removes a disk; with `wait`, retries a disk still in use until the wait runs out.
fn export_remove(shared: &Shared, p: &Params) -> CallResult {
    let name = p.str("name")?;
    let force = p.bool("force")?;
    let wait = Duration::from_secs(p.opt_u64("wait")?.unwrap_or(0));
    if wait > MAX_REMOVE_WAIT {
        return Err(invalid(format!(
            "wait: at most {} s",
            MAX_REMOVE_WAIT.as_secs()
        )));
    }
    let deadline = Instant::now() + wait;
    loop {
        let mut daemon = shared.daemon();
        match daemon.remove(name, force) {
            Err(DaemonError::InUse(_)) if Instant::now() < deadline => {}
            result => {
                result?;
                shared.save(&daemon)?;
                return value(json!({ "removed": name }));
            }
        }
        drop(daemon);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn export_list(shared: &Shared, _: &Params) -> CallResult {
    let daemon = shared.daemon();
    let disks: Vec<Value> = daemon.disks().iter().map(|d| daemon.describe(d)).collect();
    value(json!(disks))
}

fn export_resize(shared: &Shared, p: &Params) -> CallResult {
    let name = p.str("name")?;
    let size = p.size("size")?;
    let mut daemon = shared.daemon();
    let notified = daemon.grow(name, size)?;
    shared.save(&daemon)?;
    value(json!({ "name": name, "size_bytes": size, "front_end_notified": notified }))
}

/// The disk (name=) or the throttle group (group=) a QoS call is about.
fn qos_target<'a>(p: &Params<'a>) -> Result<QosTarget<'a>, RpcError> {
    match (p.opt_str("name")?, p.opt_str("group")?) {
        (Some(name), None) => Ok(QosTarget::Disk(name)),
        (None, Some(group)) => Ok(QosTarget::Group(group)),
        _ => Err(invalid("give name=DISK or group=QOS-GROUP")),
    }
}

/// `limits` in the export grammar ("iops-total=1000,bps-total=50M"; "" for none).
fn parse_limits(text: &str) -> Result<pollblk_engine::qos::QosConfig, RpcError> {
    let mut pairs = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((key, value)) if crate::qos_options::is_limit_key(key) => pairs.push((key, value)),
            _ => {
                return Err(invalid(format!(
                    "limits: {part:?} is not a limit (iops-total, iops-read, iops-write, \
                     bps-total, bps-read, bps-write, each with -max and -max-length, and \
                     iops-size, as KEY=VALUE)"
                )))
            }
        }
    }
    crate::qos_options::parse(pairs.into_iter()).map_err(invalid)
}

fn qos_set(shared: &Shared, p: &Params) -> CallResult {
    let target = qos_target(p)?;
    let limits = parse_limits(p.str("limits")?)?;
    let mut daemon = shared.daemon();
    daemon.qos_set(qos_target(p)?, limits)?;
    let now = daemon.qos_get(target)?;
    shared.save(&daemon)?;
    value(now)
}

fn qos_get(shared: &Shared, p: &Params) -> CallResult {
    value(shared.daemon().qos_get(qos_target(p)?)?)
}

fn queue_pause(shared: &Shared, p: &Params) -> CallResult {
    let paused = shared.daemon().pause(p.str("name")?, p.queue()?)?;
    let paused: Vec<Value> = paused
        .into_iter()
        .map(|(queue, at)| json!({ "queue": queue, "avail_idx": at }))
        .collect();
    value(json!(paused))
}

fn queue_resume(shared: &Shared, p: &Params) -> CallResult {
    let resumed = shared.daemon().resume(p.str("name")?, p.queue()?)?;
    value(json!({ "resumed": resumed }))
}

fn stats_get(shared: &Shared, p: &Params) -> CallResult {
    let files = {
        let daemon = shared.daemon();
        match p.opt_str("name")? {
            Some(name) => daemon.stats_files(name)?,
            None => vec![daemon.stats_dir().to_owned()],
        }
    };
    value(stats_view::snapshot(&files).map_err(failed)?)
}

fn stats_fd(shared: &Shared, p: &Params) -> CallResult {
    let name = p.str("name")?;
    let path = shared.daemon().stats_file(name, p.queue()?)?;
    let file =
        std::fs::File::open(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    Ok((json!({ "name": name, "file": path }), Some(file)))
}

fn pool_status(shared: &Shared, p: &Params) -> CallResult {
    let dir = Path::new(p.str("pool")?);
    let open = shared.daemon().open_pool(dir);
    let status = match open {
        Some(pool) => pool.status(),
        None => {
            pollblk_engine::thin::Pool::inspect(dir).map_err(|e| not_found_or_failed(dir, e))?
        }
    };
    value(crate::pool_view::status_value(&status))
}

/// The pool in `dir`: the daemon's own handle if it has it open (the pool's lock is held).
fn pool_of(daemon: &Daemon, dir: &Path) -> Result<Arc<pollblk_engine::thin::Pool>, RpcError> {
    match daemon.open_pool(dir) {
        Some(pool) => Ok(pool),
        None => pollblk_engine::thin::Pool::open(dir)
            .map(Arc::new)
            .map_err(|e| not_found_or_failed(dir, e)),
    }
}

fn volume_create(shared: &Shared, p: &Params) -> CallResult {
    let dir = Path::new(p.str("pool")?);
    let volume = p.str("volume")?;
    // Under the daemon's lock, as every change of what it serves.
    let daemon = shared.daemon();
    let pool = pool_of(&daemon, dir)?;
    pool.volume_create(volume, p.size("size")?)
        .map_err(|e| failed(format!("pool {}: {e}", dir.display())))?;
    value(json!({ "pool": dir, "volume": volume }))
}

fn volume_delete(shared: &Shared, p: &Params) -> CallResult {
    let dir = Path::new(p.str("pool")?);
    let volume = p.str("volume")?;
    let daemon = shared.daemon();
    if let Some(disk) = daemon.volume_exported(dir, volume) {
        return Err(RpcError {
            code: code::IN_USE,
            message: format!("volume {volume} is exported as {disk}: export_remove it first"),
        });
    }
    pool_of(&daemon, dir)?
        .volume_delete(volume)
        .map_err(|e| failed(format!("pool {}: {e}", dir.display())))?;
    value(json!({ "pool": dir, "volume": volume }))
}

/// Takes a snapshot of a volume, served or not: its changes wait for the copy ("paused_us").
fn volume_snapshot(shared: &Shared, p: &Params) -> CallResult {
    let dir = Path::new(p.str("pool")?);
    let (volume, snapshot) = (p.str("volume")?, p.str("snapshot")?);
    let daemon = shared.daemon();
    let made = pool_of(&daemon, dir)?
        .volume_snapshot(volume, snapshot)
        .map_err(|e| failed(format!("pool {}: {e}", dir.display())))?;
    tracing::info!(pool = %dir.display(), volume, snapshot,
        paused_us = made.paused.as_micros() as u64, "snapshot taken");
    value(json!({
        "pool": dir,
        "volume": volume,
        "snapshot": snapshot,
        "shared_bytes": made.shared_bytes,
        "paused_us": made.paused.as_micros() as u64,
    }))
}

fn volume_clone(shared: &Shared, p: &Params) -> CallResult {
    let dir = Path::new(p.str("pool")?);
    let (snapshot, volume) = (p.str("snapshot")?, p.str("volume")?);
    let daemon = shared.daemon();
    let made = pool_of(&daemon, dir)?
        .volume_clone(snapshot, volume)
        .map_err(|e| failed(format!("pool {}: {e}", dir.display())))?;
    value(json!({
        "pool": dir,
        "snapshot": snapshot,
        "volume": volume,
        "shared_bytes": made.shared_bytes,
    }))
}

fn volume_inflate(shared: &Shared, p: &Params) -> CallResult {
    let dir = Path::new(p.str("pool")?);
    let volume = p.str("volume")?;
    let daemon = shared.daemon();
    let copied = pool_of(&daemon, dir)?
        .volume_inflate(volume)
        .map_err(|e| failed(format!("pool {}: {e}", dir.display())))?;
    value(json!({ "pool": dir, "volume": volume, "copied_bytes": copied }))
}

fn log_level(shared: &Shared, p: &Params) -> CallResult {
    let level = p.str("level")?;
    shared.log.set_level(level).map_err(invalid)?;
    tracing::info!(level, "log level changed");
    value(json!({ "level": level }))
}

fn rpc_get_methods(_: &Shared, _: &Params) -> CallResult {
    value(json!(method_names()))
}

fn not_found_or_failed(dir: &Path, e: pollblk_engine::thin::ThinError) -> RpcError {
    let message = format!("pool {}: {e}", dir.display());
    if dir.join("superblock").exists() {
        failed(message)
    } else {
        RpcError {
            code: code::NOT_FOUND,
            message,
        }
    }
}
