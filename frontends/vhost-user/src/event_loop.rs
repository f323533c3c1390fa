//! The threads that serve every disk's vhost-user socket: a fixed number (at most
//! MAX_THREADS), each an epoll loop over the listening sockets and connections of the disks
//! given to it, so a daemon of a thousand disks runs a handful of threads for them rather
//! than a thousand (SPDK's rte_vhost does the same).
//!
//! A disk is one `Endpoint`: its listener while no front end is attached, its connection
//! while one is (one front end at a time: the listener is not watched meanwhile, so the next
//! one waits in the backlog until the first has gone and its queues are drained). Each
//! readable connection gets one message handled. Messages are short; the ones that wait (a
//! queue drained before GET_VRING_BASE answers, a reactor taking a new memory table) hold
//! that thread's other disks' messages back for as long, never their data path. A front end
//! that stops in the middle of a message is cut off after SOCKET_TIMEOUT instead of holding
//! the thread.

use crate::backend_channel;
use crate::handler::BlkHandler;
use crossbeam_channel::{Receiver, Sender};
use pollblk_engine::device::BlkDevice;
use pollblk_engine::reactor::ReactorHandle;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::EventFd;

/// Most event-loop threads (fewer on a machine with fewer cores).
const MAX_THREADS: usize = 4;
/// How long a front end may take to send the rest of a message, or to take a reply.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Events taken per epoll_wait.
const EVENTS: usize = 64;

/// The handler of the connection being served, if any (shared with the control plane).
pub type Current = Arc<Mutex<Option<Arc<Mutex<BlkHandler>>>>>;

/// One disk's socket, as its loop thread owns it.
pub struct Endpoint {
    pub name: String,
    pub listener: UnixListener,
    pub device: Arc<BlkDevice>,
    pub reactors: Vec<ReactorHandle>,
    pub current: Current,
}

/// An attached front end.
struct Connection {
    fd: RawFd,
    endpoint: BackendReqHandler<Mutex<BlkHandler>>,
    handler: Arc<Mutex<BlkHandler>>,
}

enum Msg {
    Add(u64, Box<Endpoint>),
    /// Stops serving the endpoint (its front end disconnected and drained); acked.
    Remove(u64, Sender<()>),
}

/// One loop thread, as the rest of the crate reaches it.
struct LoopHandle {
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
}

/// Where endpoints are served.
pub struct Loops {
    threads: Vec<LoopHandle>,
    next: std::sync::atomic::AtomicUsize,
}

impl Loops {
    /// The process's loops, started on first use.
    pub fn get() -> &'static Loops {
        static LOOPS: OnceLock<Loops> = OnceLock::new();
        LOOPS.get_or_init(|| {
            let count = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, MAX_THREADS);
            let threads = (0..count).map(start_thread).collect();
            Loops {
                threads,
                next: std::sync::atomic::AtomicUsize::new(0),
            }
        })
    }

    /// Serves `endpoint` from then on; returns its id and the loop that has it.
    pub fn add(&self, endpoint: Endpoint) -> (u64, usize) {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let index =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.threads.len();
        self.send(index, Msg::Add(id, Box::new(endpoint)));
        (id, index)
    }

    /// Stops serving endpoint `id` of loop `index`; returns once its front end (if any) is
    /// disconnected and its queues drained.
    pub fn remove(&self, index: usize, id: u64) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(index, Msg::Remove(id, tx));
        let _ = rx.recv();
    }

    fn send(&self, index: usize, msg: Msg) {
        let thread = &self.threads[index];
        // The loop threads live as long as the process.
        let _ = thread.tx.send(msg);
        let _ = thread.wake.write(1);
    }
}

fn start_thread(index: usize) -> LoopHandle {
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"));
    let thread_wake = wake.clone();
    std::thread::Builder::new()
        .name(format!("vhost-user-{index}"))
        .spawn(move || Loop::new(rx, thread_wake).run())
        .expect("a vhost-user loop thread");
    LoopHandle { tx, wake }
}

/// epoll tokens: 0 is the wake eventfd; an endpoint's listener is id << 1, its connection
/// id << 1 | 1.
const WAKE: u64 = 0;

struct Loop {
    epoll: RawFd,
    rx: Receiver<Msg>,
    wake: Arc<EventFd>,
    endpoints: HashMap<u64, (Endpoint, Option<Connection>)>,
}

impl Loop {
    fn new(rx: Receiver<Msg>, wake: Arc<EventFd>) -> Loop {
        // SAFETY: plain syscall; the descriptor is owned by the loop for its life.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            epoll >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        let this = Loop {
            epoll,
            rx,
            wake,
            endpoints: HashMap::new(),
        };
        this.watch(this.wake.as_raw_fd(), WAKE);
        this
    }

    fn watch(&self, fd: RawFd, token: u64) {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: epoll_ctl on our epoll descriptor with a live descriptor and a local event.
        let rc = unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
        assert_eq!(rc, 0, "epoll_ctl add: {}", std::io::Error::last_os_error());
    }

    fn unwatch(&self, fd: RawFd) {
        // SAFETY: as in watch; a descriptor not watched just fails, harmlessly.
        unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    fn run(mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        loop {
            // SAFETY: waits into a local array of EVENTS entries.
            let n = unsafe { libc::epoll_wait(self.epoll, events.as_mut_ptr(), EVENTS as i32, -1) };
            if n < 0 {
                continue; // EINTR
            }
            for event in &events[..n as usize] {
                let token = event.u64;
                match token {
                    WAKE => self.messages(),
                    t if t & 1 == 0 => self.accept(t >> 1),
                    t => self.serve(t >> 1),
                }
            }
        }
    }

    fn messages(&mut self) {
        let _ = self.wake.read();
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Add(id, endpoint) => {
                    self.watch(endpoint.listener.as_raw_fd(), id << 1);
                    self.endpoints.insert(id, (*endpoint, None));
                }
                Msg::Remove(id, done) => {
                    if let Some((endpoint, connection)) = self.endpoints.remove(&id) {
                        self.unwatch(endpoint.listener.as_raw_fd());
                        if let Some(connection) = connection {
                            self.disconnect(&endpoint, connection);
                        }
                    }
                    let _ = done.send(());
                }
            }
        }
    }

    /// A front end connects: its connection is watched instead of the listener.
    fn accept(&mut self, id: u64) {
        let Some((endpoint, connection)) = self.endpoints.get_mut(&id) else {
            return;
        };
        if connection.is_some() {
            return;
        }
        let stream = match endpoint.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(disk = %endpoint.name, error = %e, "accept failed");
                return;
            }
        };
        if let Err(e) = stream
            .set_read_timeout(Some(SOCKET_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(SOCKET_TIMEOUT)))
        {
            tracing::warn!(disk = %endpoint.name, error = %e, "socket timeouts not set");
            return;
        }
        tracing::info!(disk = %endpoint.name, "front end connected");
        let handler = Arc::new(Mutex::new(BlkHandler::new(
            endpoint.device.clone(),
            endpoint.reactors.clone(),
        )));
        *endpoint.current.lock().unwrap() = Some(handler.clone());
        let fd = stream.as_raw_fd();
        *connection = Some(Connection {
            fd,
            endpoint: BackendReqHandler::from_stream(stream, handler.clone()),
            handler,
        });
        let listener = endpoint.listener.as_raw_fd();
        self.unwatch(listener);
        self.watch(fd, id << 1 | 1);
    }

    /// Handles one message of endpoint `id`'s front end; disconnects it when it has gone.
    fn serve(&mut self, id: u64) {
        let Some((endpoint, Some(connection))) = self.endpoints.get_mut(&id) else {
            return;
        };
        if !handle_one(&endpoint.name, connection) {
            let (endpoint, connection) = self.endpoints.remove(&id).expect("found above");
            self.disconnect(&endpoint, connection.expect("found above"));
            self.watch(endpoint.listener.as_raw_fd(), id << 1);
            self.endpoints.insert(id, (endpoint, None));
        }
    }

    /// The front end is gone: every queue is drained and stopped before the next one may
    /// connect.
    fn disconnect(&self, endpoint: &Endpoint, connection: Connection) {
        self.unwatch(connection.fd);
        *endpoint.current.lock().unwrap() = None;
        let Connection {
            endpoint: socket,
            handler,
            ..
        } = connection;
        drop(socket);
        handler.lock().unwrap().stop_all();
        tracing::info!(disk = %endpoint.name, "front end disconnected");
    }
}

/// Handles one message on a readable connection; false when the front end has gone.
fn handle_one(name: &str, connection: &mut Connection) -> bool {
    match backend_channel::take_from(connection.fd) {
        Ok(Some(channel)) => {
            connection
                .handler
                .lock()
                .unwrap()
                .set_backend_channel(channel);
            return true;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(disk = %name, error = %e, "SET_BACKEND_REQ_FD refused");
            return true;
        }
    }
    match connection.endpoint.handle_request() {
        Ok(()) => true,
        Err(
            VhostError::Disconnected
            | VhostError::PartialMessage
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_),
        ) => false,
        Err(e) => {
            // The message was read whole; the front end gets no reply and sees its request
            // fail, the connection stays up.
            tracing::warn!(disk = %name, error = %e, "vhost-user request failed");
            true
        }
    }
}
