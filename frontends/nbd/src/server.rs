//! NBD listeners. One thread per listening socket accepts connections and runs their
//! handshakes, several at once, none blocking another (non-blocking sockets, poll(2)), each
//! with a deadline. A connection that picks an export becomes a queue on one of the
//! export's reactors ([`NbdRing`]); the thread only reaps it when it ends.
//!
//! A listener with TLS credentials requires TLS: the handshake refuses everything but
//! STARTTLS (handshake.rs), after which the TLS handshake and the rest of the haggling run
//! over the connection's [`Channel`], which the ring then keeps.
//!
//! Several exports may share a listener: the client picks one by name. Limits: at most
//! [`MAX_HANDSHAKES`] connections haggling at once, [`HANDSHAKE_LIMIT`] to finish, and per
//! export as many connections as it has queues (each counts into its own queue's
//! statistics).

use crate::channel::Channel;
use crate::handshake::{Agreed, ExportInfo, Exports, Handshake, Hangup, Next};
use crate::ring::NbdRing;
use crate::tls::TlsOptions;
use crate::wire::{greeting, OPTION_HEADER};
use pollblk_engine::device::BlkDevice;
use pollblk_engine::queue::RequestQueue;
use pollblk_engine::reactor::{QueueId, ReactorHandle};
use pollblk_engine::unix_socket::{self, Access};
use rustls::ServerConfig;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Connections haggling at once on one listener; more are closed at accept.
pub const MAX_HANDSHAKES: usize = 64;
/// Time a connection has from accept to picking an export.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Time a stopping export gives its connections' requests to finish.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    Unix(PathBuf),
    /// TCP; on an address other than loopback only with TLS.
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// One export of a listener: what clients are told, and what serves their requests.
pub struct Export {
    info: ExportInfo,
    device: Arc<BlkDevice>,
    reactors: Vec<ReactorHandle>,
    /// Per queue (= connection slot): the connection using it.
    connections: Mutex<Vec<Option<(QueueId, ReactorHandle)>>>,
}

impl Export {
    pub fn new(info: ExportInfo, device: Arc<BlkDevice>, reactors: Vec<ReactorHandle>) -> Export {
        let queues = usize::from(device.options().num_queues);
        Export {
            info,
            device,
            reactors,
            connections: Mutex::new(vec![None; queues]),
        }
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Connections being served.
    pub fn connected(&self) -> usize {
        self.connections.lock().unwrap().iter().flatten().count()
    }

    /// Per connection slot (= queue): whether a client holds it.
    pub fn slots(&self) -> Vec<bool> {
        let connections = self.connections.lock().unwrap();
        connections.iter().map(Option::is_some).collect()
    }

    /// Starts serving a connection that agreed on this export, as a queue on a reactor;
    /// false when every connection slot is taken.
    fn attach(
        self: &Arc<Export>,
        channel: Channel,
        early: &[u8],
        agreed: Agreed,
        reaper: &Reaper,
    ) -> bool {
        let mut connections = self.connections.lock().unwrap();
        let Some(q) = connections.iter().position(Option::is_none) else {
            return false;
        };
        let id = QueueId::fresh();
        let reactor = self.reactors[q % self.reactors.len()].clone();
        let on_close = reaper.notifier(Arc::downgrade(self), q, id);
        let ring = NbdRing::new(channel, early, agreed, self.device.clone(), on_close);
        let stats = self.device.queue_stats(q).clone();
        let queue = RequestQueue::new(self.device.clone(), ring, stats, true);
        reactor.attach_queue(id, Box::new(queue));
        connections[q] = Some((id, reactor));
        tracing::info!(export = %self.info.name, disk = %self.device.options().name,
            connection = q, "NBD client connected");
        true
    }

    /// Stops connection slot `q` if it still holds queue `id`.
    fn detach(&self, q: usize, id: QueueId) {
        let taken = {
            let mut connections = self.connections.lock().unwrap();
            match connections.get(q) {
                Some(Some((held, _))) if *held == id => connections[q].take(),
                _ => None,
            }
        };
        if let Some((id, reactor)) = taken {
            let _ = reactor.stop_within(id, STOP_LIMIT);
            tracing::info!(export = %self.info.name, connection = q, "NBD client disconnected");
        }
    }

    /// Stops every connection, after its requests complete.
    pub fn disconnect_all(&self) {
        let all: Vec<_> = self
            .connections
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for (id, reactor) in all {
            if reactor.stop_within(id, STOP_LIMIT).is_err() {
                tracing::error!(export = %self.info.name, "an NBD connection did not stop in time");
            }
        }
    }
}

/// A connection that ended: its export, its slot, its queue.
type Ended = (std::sync::Weak<Export>, usize, QueueId);

/// Connections that ended, reported from their reactors and stopped by the listener.
#[derive(Clone)]
struct Reaper {
    ended: Arc<Mutex<Vec<Ended>>>,
    wake: Arc<EventFd>,
}

impl Reaper {
    fn notifier(
        &self,
        export: std::sync::Weak<Export>,
        q: usize,
        id: QueueId,
    ) -> Box<dyn FnOnce() + Send> {
        let reaper = self.clone();
        Box::new(move || {
            reaper.ended.lock().unwrap().push((export, q, id));
            let _ = reaper.wake.write(1);
        })
    }

    fn reap(&self) {
        let ended = std::mem::take(&mut *self.ended.lock().unwrap());
        for (export, q, id) in ended {
            if let Some(export) = export.upgrade() {
                export.detach(q, id);
            }
        }
    }
}

type ExportTable = Arc<Mutex<BTreeMap<String, Arc<Export>>>>;

/// What the handshake sees of a listener's exports.
struct Table<'a>(&'a BTreeMap<String, Arc<Export>>);

impl Exports for Table<'_> {
    fn find(&self, name: &str) -> Option<ExportInfo> {
        self.0.get(name).map(|e| e.info.clone())
    }

    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// A listening socket and its thread.
pub struct Listener {
    address: Address,
    tls: Option<TlsOptions>,
    exports: ExportTable,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A listening socket of either kind.
enum Socket {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Listens on `address` (a Unix socket path is replaced if a stale socket is there),
    /// requiring TLS with the credentials `tls` names, if it names any.
    pub fn start(
        address: Address,
        access: Access,
        tls: Option<TlsOptions>,
    ) -> io::Result<Listener> {
        let config = match &tls {
            Some(options) => Some(crate::tls::server_config(options).map_err(io::Error::other)?),
            None => None,
        };
        let socket = match &address {
            Address::Unix(path) => Socket::Unix(
                unix_socket::listen(path, access, 64)
                    .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?,
            ),
            Address::Tcp(addr) => {
                if !addr.ip().is_loopback() && tls.is_none() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{addr}: NBD over TCP on an address other than loopback needs TLS"),
                    ));
                }
                Socket::Tcp(std::net::TcpListener::bind(addr)?)
            }
        };
        match &socket {
            Socket::Unix(l) => l.set_nonblocking(true)?,
            Socket::Tcp(l) => l.set_nonblocking(true)?,
        }
        let exports: ExportTable = Arc::default();
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let reaper = Reaper {
            ended: Arc::default(),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        };
        let thread = {
            let (exports, stop) = (exports.clone(), stop.clone());
            std::thread::Builder::new()
                .name("nbd-listener".into())
                .spawn(move || serve(socket, config, &exports, &stop, &reaper))?
        };
        Ok(Listener {
            address,
            tls,
            exports,
            stop,
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The TLS this listener requires, if any.
    pub fn tls(&self) -> Option<&TlsOptions> {
        self.tls.as_ref()
    }

    /// Offers `export` under its name; false if the name is taken on this listener.
    pub fn add(&self, export: Arc<Export>) -> bool {
        let mut exports = self.exports.lock().unwrap();
        if exports.contains_key(export.name()) {
            return false;
        }
        exports.insert(export.name().to_string(), export);
        true
    }

    /// Withdraws export `name` (connections already made stay until `disconnect_all`).
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.lock().unwrap().remove(name)
    }

    pub fn is_empty(&self) -> bool {
        self.exports.lock().unwrap().is_empty()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One connection haggling.
struct Haggler {
    /// None once handed over.
    channel: Option<Channel>,
    handshake: Handshake,
    deadline: Instant,
    /// Bytes received and not yet used.
    input: Vec<u8>,
    /// What the next step needs: client flags (4), an option header (16), option data.
    want: Want,
    /// Replies not yet sent.
    output: Vec<u8>,
    /// STARTTLS was agreed: once its reply is out, TLS starts, and options wait till then.
    starting_tls: bool,
    /// Set once an export was picked: sent the last replies, then hand the socket over.
    done: Option<Result<(Arc<Export>, Agreed), ()>>,
}

#[derive(Clone, Copy)]
enum Want {
    Flags,
    Header,
    Data { option: u32, len: usize },
}

impl Want {
    fn bytes(self) -> usize {
        match self {
            Want::Flags => 4,
            Want::Header => OPTION_HEADER,
            Want::Data { len, .. } => len,
        }
    }
}

/// The listener thread: accepts, haggles, hands over, reaps.
fn serve(
    socket: Socket,
    tls: Option<Arc<ServerConfig>>,
    exports: &ExportTable,
    stop: &EventFd,
    reaper: &Reaper,
) {
    let mut hagglers: Vec<Haggler> = Vec::new();
    loop {
        let listening = match &socket {
            Socket::Unix(l) => l.as_raw_fd(),
            Socket::Tcp(l) => l.as_raw_fd(),
        };
        let mut fds: Vec<libc::pollfd> = [stop.as_raw_fd(), reaper.wake.as_raw_fd(), listening]
            .into_iter()
            .map(|fd| pollfd(fd, false))
            .collect();
        let mut timeout = next_deadline(&hagglers);
        for h in &mut hagglers {
            let channel = h.channel.as_mut().expect("not handed over yet");
            fds.push(pollfd(
                channel.fd(),
                !h.output.is_empty() || channel.wants_send(),
            ));
            if channel.has_buffered() {
                // Decrypted options wait in rustls: the socket will not say so.
                timeout = 0;
            }
        }
        // SAFETY: poll over `fds.len()` pollfds we own.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let _ = reaper.wake.read();
            reaper.reap();
        }
        if fds[2].revents != 0 {
            accept_all(&socket, tls.is_some(), &mut hagglers);
        }
        let now = Instant::now();
        hagglers.retain_mut(|h| {
            if now >= h.deadline {
                tracing::info!("NBD client dropped: no export picked within {HANDSHAKE_LIMIT:?}");
                return false;
            }
            haggle(h, tls.as_ref(), exports, reaper)
        });
    }
}

fn pollfd(fd: i32, out: bool) -> libc::pollfd {
    let events = if out {
        libc::POLLIN | libc::POLLOUT
    } else {
        libc::POLLIN
    };
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// poll(2)'s timeout: until the first handshake deadline (-1: none).
fn next_deadline(hagglers: &[Haggler]) -> i32 {
    let now = Instant::now();
    hagglers
        .iter()
        .map(|h| h.deadline.saturating_duration_since(now))
        .min()
        .map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32 + 1)
}

fn accept_all(socket: &Socket, tls: bool, hagglers: &mut Vec<Haggler>) {
    loop {
        let fd: io::Result<OwnedFd> = match socket {
            Socket::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                Ok(s.into())
            }),
            Socket::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Ok(s.into())
            }),
        };
        match fd {
            Ok(_) if hagglers.len() >= MAX_HANDSHAKES => {
                tracing::warn!("NBD client refused: {MAX_HANDSHAKES} handshakes under way");
            }
            Ok(fd) => hagglers.push(Haggler {
                channel: Some(Channel::plain(fd)),
                handshake: Handshake::new(tls),
                deadline: Instant::now() + HANDSHAKE_LIMIT,
                input: Vec::new(),
                want: Want::Flags,
                output: greeting().to_vec(),
                starting_tls: false,
                done: None,
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // A connection reset before accept, or a descriptor limit: the next one.
            Err(_) => return,
        }
    }
}

/// Bytes of options read ahead of the one being handled, at most.
const READ_AHEAD: usize = 64 << 10;

/// Moves one connection's handshake on as far as its bytes allow; false when the listener
/// is done with it (handed over or dropped).
fn haggle(
    h: &mut Haggler,
    tls: Option<&Arc<ServerConfig>>,
    exports: &ExportTable,
    reaper: &Reaper,
) -> bool {
    if h.done.is_none() && !receive(h) {
        return false;
    }
    while h.done.is_none() && !h.starting_tls && h.input.len() >= h.want.bytes() {
        let step: Vec<u8> = h.input.drain(..h.want.bytes()).collect();
        if let Err(why) = step_once(h, &step, exports) {
            tracing::info!(?why, "NBD client dropped during the handshake");
            return false;
        }
    }
    if !flush(h) {
        return false;
    }
    if h.starting_tls && h.output.is_empty() {
        h.starting_tls = false;
        let config = tls.expect("STARTTLS is agreed only with TLS").clone();
        // What the client sent after STARTTLS is its ClientHello.
        let early = std::mem::take(&mut h.input);
        let channel = h.channel.as_mut().expect("not handed over yet");
        match channel.start_tls(config, &early) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::info!("NBD client dropped: {e}");
                return false;
            }
        }
        // Again, through TLS: what arrives now may hold options as well (once: STARTTLS
        // is agreed once).
        return haggle(h, tls, exports, reaper);
    }
    match h.done.take() {
        None => true,
        // The last replies first.
        Some(done) if !h.output.is_empty() => {
            h.done = Some(done);
            true
        }
        Some(Err(())) => false,
        Some(Ok((export, agreed))) => {
            let channel = h.channel.take().expect("handed over once");
            // Requests the client sent right behind its last option go along.
            let early = std::mem::take(&mut h.input);
            if !export.attach(channel, &early, agreed, reaper) {
                tracing::warn!(export = %export.name(),
                    "NBD client dropped: every connection slot of the export is taken");
            }
            false
        }
    }
}

/// Reads what the connection has (up to READ_AHEAD buffered); false if it ended or broke.
fn receive(h: &mut Haggler) -> bool {
    let channel = h.channel.as_mut().expect("not handed over yet");
    let mut buf = [0u8; 4096];
    while h.input.len() < READ_AHEAD {
        match channel.recv(&mut buf) {
            Ok(0) => return false,
            Ok(n) => h.input.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) => {
                tracing::info!("NBD client dropped during the handshake: {e}");
                return false;
            }
        }
    }
    true
}

/// One step of the handshake with the bytes it needs.
fn step_once(h: &mut Haggler, bytes: &[u8], exports: &ExportTable) -> Result<(), Hangup> {
    match h.want {
        Want::Flags => {
            h.handshake
                .client_flags(u32::from_be_bytes(bytes.try_into().expect("4 bytes")))?;
            h.want = Want::Header;
        }
        Want::Header => {
            let (option, len) = h
                .handshake
                .option_header(bytes.try_into().expect("16 bytes"))?;
            h.want = Want::Data {
                option,
                len: len as usize,
            };
        }
        Want::Data { option, .. } => {
            let table = exports.lock().unwrap();
            let next = h
                .handshake
                .option(option, bytes, &Table(&table), &mut h.output);
            h.want = Want::Header;
            match next {
                Next::Option => {}
                Next::StartTls => h.starting_tls = true,
                Next::Close => h.done = Some(Err(())),
                Next::Transmit(agreed) => {
                    let export = table
                        .get(&agreed.export.name)
                        .cloned()
                        .expect("the export just found");
                    h.done = Some(Ok((export, agreed)));
                }
            }
        }
    }
    Ok(())
}

/// Sends what the socket takes now; false if the peer is gone.
fn flush(h: &mut Haggler) -> bool {
    let channel = h.channel.as_mut().expect("not handed over yet");
    while !h.output.is_empty() {
        match channel.send(&h.output) {
            Ok(0) => return false,
            Ok(n) => {
                h.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    !matches!(channel.flush(), Err(e) if e.kind() != io::ErrorKind::WouldBlock)
}

/// Where an NBD export was asked to listen, for messages.
pub fn describe(address: &Address) -> String {
    match address {
        Address::Unix(p) => format!("nbd socket {}", Path::new(p).display()),
        Address::Tcp(a) => format!("nbd address {a}"),
    }
}
