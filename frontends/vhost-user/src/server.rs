//! One disk's vhost-user socket: bound here, served by the shared event loops
//! (`event_loop`), and reached by the control plane (pause, resume, resize announcements)
//! through the handler of the front end attached now.

use crate::event_loop::{Current, Endpoint, Loops};
use crate::handler::{BlkHandler, QueueState};
use pollblk_engine::device::BlkDevice;
use pollblk_engine::reactor::ReactorHandle;
use pollblk_engine::unix_socket::{self, Access, BindError};
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a socket could not be served.
#[derive(Debug)]
pub enum ServerError {
    /// Another process accepts connections on the path.
    SocketInUse(PathBuf),
    /// The path exists and is not a socket; it is left alone.
    NotASocket(PathBuf),
    /// Binding or another system call failed.
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::SocketInUse(p) => {
                write!(f, "socket {} is in use by another process", p.display())
            }
            ServerError::NotASocket(p) => {
                write!(f, "{} exists and is not a socket", p.display())
            }
            ServerError::Io(p, e) => write!(f, "socket {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for ServerError {}

/// Serves one disk on one vhost-user socket.
pub struct Server {
    path: PathBuf,
    /// Where the event loops know it: (endpoint id, loop index); None once stopped.
    served: Option<(u64, usize)>,
    /// The connected front end's handler, for the control plane.
    current: Current,
}

/// Binds `path` with `access`, replacing a stale socket file nobody listens on.
fn bind(path: &Path, access: Access) -> Result<UnixListener, ServerError> {
    // The backlog of a socket one front end at a time uses.
    unix_socket::listen(path, access, 16).map_err(|e| match e {
        BindError::InUse => ServerError::SocketInUse(path.to_owned()),
        BindError::NotASocket => ServerError::NotASocket(path.to_owned()),
        BindError::Io(e) => ServerError::Io(path.to_owned(), e),
    })
}

impl Server {
    /// Listens on `path` (its owner, group and mode from `access`) and serves `device` to
    /// whichever front end connects.
    pub fn start(
        path: &Path,
        access: Access,
        device: Arc<BlkDevice>,
        reactors: Vec<ReactorHandle>,
    ) -> Result<Server, ServerError> {
        let listener = bind(path, access)?;
        let current = Current::default();
        let endpoint = Endpoint {
            name: device.options().name.clone(),
            listener,
            device,
            reactors,
            current: current.clone(),
        };
        let served = Loops::get().add(endpoint);
        Ok(Server {
            path: path.to_owned(),
            served: Some(served),
            current,
        })
    }

    /// The connected front end's handler.
    fn handler(&self) -> Option<Arc<Mutex<BlkHandler>>> {
        self.current.lock().unwrap().clone()
    }

    /// Whether a front end is connected.
    pub fn connected(&self) -> bool {
        self.handler().is_some()
    }

    /// What each queue is doing; empty without a front end.
    pub fn queue_states(&self) -> Vec<QueueState> {
        let Some(handler) = self.handler() else {
            return Vec::new();
        };
        let handler = handler.lock().unwrap();
        (0..handler.queue_count())
            .map(|i| handler.queue_state(i))
            .collect()
    }

    /// Pauses queue `index`, or every running queue; returns (queue, index it resumes at).
    /// All or nothing: if one queue cannot be paused, the ones this call paused resume.
    pub fn pause(&self, index: Option<usize>) -> Result<Vec<(usize, u16)>, String> {
        let handler = self.handler().ok_or("no front end is connected")?;
        let mut handler = handler.lock().unwrap();
        let queues = select_queues(&handler, index, |s| s == QueueState::Running)?;
        let mut paused = Vec::with_capacity(queues.len());
        for i in queues {
            match handler.pause_queue(i) {
                Ok(at) => paused.push((i, at)),
                Err(e) => {
                    for &(j, _) in &paused {
                        if let Err(e) = handler.resume_queue(j) {
                            tracing::error!(queue = j, error = %e, "queue did not resume");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(paused)
    }

    /// Resumes queue `index`, or every paused queue.
    pub fn resume(&self, index: Option<usize>) -> Result<Vec<(usize, ())>, String> {
        self.each_queue(
            index,
            |h, i| h.resume_queue(i),
            |s| matches!(s, QueueState::Paused(_)),
        )
    }

    fn each_queue<T>(
        &self,
        index: Option<usize>,
        op: impl Fn(&mut BlkHandler, usize) -> Result<T, String>,
        all_takes: impl Fn(QueueState) -> bool,
    ) -> Result<Vec<(usize, T)>, String> {
        let handler = self.handler().ok_or("no front end is connected")?;
        let mut handler = handler.lock().unwrap();
        let queues = select_queues(&handler, index, all_takes)?;
        queues
            .into_iter()
            .map(|i| op(&mut handler, i).map(|v| (i, v)))
            .collect()
    }

    /// Tells the front end the device's configuration changed (a new capacity): true if it
    /// was told (and, with REPLY_ACK, acknowledged), false if no front end is connected.
    pub fn config_changed(&self) -> Result<bool, String> {
        let Some(handler) = self.handler() else {
            return Ok(false);
        };
        // Taken out of the handler: the front end reads the config space back over the main
        // socket before it answers, and that needs the handler.
        let channel = handler.lock().unwrap().backend_channel();
        let (mut channel, reply_ack) = channel.ok_or(
            "the front end has no back-end channel (it did not take the BACKEND_REQ protocol \
             feature), so it cannot be told",
        )?;
        channel
            .config_changed(reply_ack)
            .map_err(|e| format!("config change notification: {e}"))?;
        Ok(true)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disconnects the front end (after draining its queues), stops listening and removes
    /// the socket file.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some((id, index)) = self.served.take() {
            Loops::get().remove(index, id);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Queue `index` if it exists, or every queue whose state `all_takes` accepts.
fn select_queues(
    handler: &BlkHandler,
    index: Option<usize>,
    all_takes: impl Fn(QueueState) -> bool,
) -> Result<Vec<usize>, String> {
    match index {
        Some(i) if i < handler.queue_count() => Ok(vec![i]),
        Some(i) => Err(format!(
            "queue {i} does not exist (the disk has {})",
            handler.queue_count()
        )),
        None => Ok((0..handler.queue_count())
            .filter(|&i| all_takes(handler.queue_state(i)))
            .collect()),
    }
}
