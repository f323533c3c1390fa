//! The loopback platform: Xen without a hypervisor, for tests and for trying pollblk's blkif
//! back end anywhere. A front end is another process that connects to `DIR/xenstore.sock`:
//!
//! - XenStore: a small store of our own, one line per request over that socket:
//!   `hello DOMID`, `write PATH VALUE`, `read PATH`, `rm PATH`, `wait PATH VALUE` (blocks until
//!   PATH holds VALUE); answers `ok [VALUE]`, `enoent` or `err MESSAGE`.
//! - Grants: `grants` with a memfd passed along (SCM_RIGHTS): page N of it is grant ref N.
//! - Event channels: `evtchn` with two eventfds (front end to back end, back end to front
//!   end); the answer `ok PORT` is the port to write as event-channel.
//!
//! A front end whose connection ends is treated like a destroyed domain: its devices' state
//! keys go to Closed, so the back end tears their rings down, and its keys are removed as a
//! toolstack removes them (each device keeps `backend`, `backend-id` and `state`).

use crate::abi::{self, PAGE_SIZE};
use crate::platform::{EventChannel, GrantSpace, Platform, RingPages, XenStore};
use pollblk_engine::shm::SharedMap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Longest line a front end may send.
const MAX_LINE: usize = 4096;
/// Most keys the store holds (a front end cannot exhaust memory).
const MAX_KEYS: usize = 65536;
/// Most event channels one domain may register (two per queue, with room to reconnect).
const MAX_CHANNELS: usize = 64;
/// Most keys one front-end domain may own.
const MAX_DOMAIN_KEYS: usize = 4096;

/// The store: paths to values, and a generation bumped on every change.
#[derive(Default)]
pub struct Store {
    inner: Mutex<(BTreeMap<String, String>, u64)>,
    changed: Condvar,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeMap<String, String>, u64)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Paths directly or indirectly below `dir`, with their values.
    pub fn list(&self, dir: &str) -> Vec<(String, String)> {
        let prefix = format!("{dir}/");
        self.lock()
            .0
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl XenStore for Store {
    fn read(&self, path: &str) -> io::Result<Option<String>> {
        Ok(self.lock().0.get(path).cloned())
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.0.len() >= MAX_KEYS && !inner.0.contains_key(path) {
            return Err(io::Error::other("the store is full"));
        }
        inner.0.insert(path.to_string(), value.to_string());
        inner.1 += 1;
        self.changed.notify_all();
        Ok(())
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        let mut inner = self.lock();
        let prefix = format!("{path}/");
        inner.0.retain(|k, _| k != path && !k.starts_with(&prefix));
        inner.1 += 1;
        self.changed.notify_all();
        Ok(())
    }

    fn wait_change(&self, _path: &str, seen: u64, timeout: Duration) -> io::Result<u64> {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |inner| inner.1 == seen)
            .unwrap_or_else(|e| e.into_inner());
        Ok(inner.1)
    }
}

/// A domain's granted pages: one memfd, mapped whole.
struct MemfdGrants {
    file: File,
    /// The whole file, mapped once (kept for its Drop: the unmapping).
    _map: SharedMap,
    base: *mut u8,
    pages: usize,
}

// SAFETY: the mapping is shared memory owned by this value; the pointers handed out stay
// valid while it lives (Arc), and access to the pages is the ring protocol's business.
unsafe impl Send for MemfdGrants {}
// SAFETY: as Send: nothing in it is mutated after new().
unsafe impl Sync for MemfdGrants {}

impl MemfdGrants {
    fn new(file: File) -> io::Result<MemfdGrants> {
        // Pages the daemon maps must not go away under it (a shrunk file faults: SIGBUS).
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::other(
                "the grant memfd must be sealed against shrinking (MFD_ALLOW_SEALING, F_SEAL_SHRINK)",
            ));
        }
        let len = file.metadata()?.len() as usize;
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::other(
                "the grant memfd's size is not a whole number of pages",
            ));
        }
        let map = SharedMap::map(&file, 0, len, true)?;
        Ok(MemfdGrants {
            base: map.ptr(),
            _map: map,
            file,
            pages: len / PAGE_SIZE,
        })
    }
}

/// One ring's view of a domain's memfd.
struct LoopbackGrants(Arc<MemfdGrants>);

impl GrantSpace for LoopbackGrants {
    fn page(&mut self, gref: u32) -> Option<*mut u8> {
        self.0.page(gref)
    }

    fn map_ring(&mut self, grefs: &[u32]) -> io::Result<Box<dyn RingPages>> {
        self.0.map_ring(grefs)
    }
}

impl MemfdGrants {
    fn page(&self, gref: u32) -> Option<*mut u8> {
        let gref = gref as usize;
        // SAFETY: gref < pages: the page lies inside the mapping.
        (gref < self.pages).then(|| unsafe { self.base.add(gref * PAGE_SIZE) })
    }

    fn map_ring(&self, grefs: &[u32]) -> io::Result<Box<dyn RingPages>> {
        if grefs.is_empty() || grefs.iter().any(|&g| g as usize >= self.pages) {
            return Err(io::Error::other("a ring page is not a granted page"));
        }
        let len = grefs.len() * PAGE_SIZE;
        // Reserve a contiguous range, then put each granted page in its place (the grant
        // refs need not be consecutive), as a grant mapping does.
        // SAFETY: a fresh anonymous reservation.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let pages = MappedRing {
            base: base.cast(),
            len,
        };
        for (i, &gref) in grefs.iter().enumerate() {
            // SAFETY: MAP_FIXED inside our own reservation.
            let p = unsafe {
                libc::mmap(
                    pages.base.add(i * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.file.as_raw_fd(),
                    (gref as usize * PAGE_SIZE) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Box::new(pages))
    }
}

/// A ring's pages mapped contiguously.
struct MappedRing {
    base: *mut u8,
    len: usize,
}

// SAFETY: owned mapping; see MemfdGrants.
unsafe impl Send for MappedRing {}

impl RingPages for MappedRing {
    fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    fn bytes(&self) -> usize {
        self.len
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: the reservation made in map_ring.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// An event channel made of two eventfds.
struct EventFdChannel {
    to_back: EventFd,
    to_front: EventFd,
}

impl EventChannel for EventFdChannel {
    fn fd(&self) -> RawFd {
        self.to_back.as_raw_fd()
    }

    fn ack(&mut self) -> u64 {
        self.to_back.read().unwrap_or(0)
    }

    fn notify(&self) {
        let _ = self.to_front.write(1);
    }
}

/// What one front-end domain registered.
#[derive(Default)]
struct Domain {
    grants: Option<Arc<MemfdGrants>>,
    channels: HashMap<u32, (Arc<EventFd>, Arc<EventFd>)>,
    next_port: u32,
}

/// The loopback platform of one directory: its store, and the domains that connected.
pub struct Loopback {
    store: Arc<Store>,
    domains: Mutex<HashMap<u32, Domain>>,
    /// Signalled when a domain's connection is gone, so its id can connect again.
    domain_left: Condvar,
    socket: PathBuf,
}

/// How long a `hello` waits for the previous connection of the same domain to be torn down
/// (a front end that exited while its connection thread was in `wait` is seen within 1 s).
const DOMAIN_TEARDOWN_WAIT: Duration = Duration::from_secs(5);

impl Loopback {
    /// Starts serving `dir/xenstore.sock` (replacing a stale socket file).
    pub fn start(dir: &Path) -> io::Result<Arc<Loopback>> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("xenstore.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        // Only the daemon's user connects: front ends get grants and event channels.
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let loopback = Arc::new(Loopback {
            store: Arc::new(Store::default()),
            domains: Mutex::new(HashMap::new()),
            domain_left: Condvar::new(),
            socket,
        });
        let weak = Arc::downgrade(&loopback);
        std::thread::Builder::new()
            .name("xen-loopback".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let (Ok(stream), Some(platform)) = (stream, weak.upgrade()) else {
                        continue;
                    };
                    let _ = std::thread::Builder::new()
                        .name("xen-loopback-conn".into())
                        .spawn(move || platform.serve(stream));
                }
            })?;
        Ok(loopback)
    }

    /// The socket front ends connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The store, for the back end in this process.
    pub fn store_handle(&self) -> &Arc<Store> {
        &self.store
    }

    fn domains(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Domain>> {
        self.domains.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(&self, stream: UnixStream) {
        let mut domid = None;
        let mut conn = Connection::new(stream);
        while let Ok(Some(line)) = conn.next_line() {
            let reply = self.handle(&line, &mut conn, &mut domid);
            // Descriptors sent with a line that did not take them are closed, not hoarded.
            conn.fds.clear();
            let reply = reply.unwrap_or_else(|e| format!("err {e}"));
            if writeln!(conn.stream, "{reply}").is_err() {
                break;
            }
        }
        if let Some(domid) = domid {
            self.depart(domid);
        }
    }

    /// A domain is gone (its connection ended), as a toolstack destroys one: its devices'
    /// state goes to Closed (the back ends tear their rings down), then its keys go, all but
    /// each device's `backend`, `backend-id` and `state`, which the toolstack's device
    /// entries keep for the next domain of that id; its grants and channels go.
    fn depart(&self, domid: u32) {
        let devices = format!("/local/domain/{domid}/device/vbd");
        for (path, _) in self.store.list(&devices) {
            // /local/domain/D/device/vbd/N/state: the device's own state key.
            if path.ends_with("/state") && path.matches('/').count() == 7 {
                let _ = self.store.write(&path, &abi::state::CLOSED.to_string());
            }
        }
        let toolstack_key = |path: &str| {
            let rest = path.strip_prefix(&devices).unwrap_or("");
            let parts: Vec<&str> = rest.split('/').collect();
            // ["", N, key]: a device's own key.
            parts.len() == 3 && matches!(parts[2], "backend" | "backend-id" | "state")
        };
        for (path, _) in self.store.list(&format!("/local/domain/{domid}")) {
            if !toolstack_key(&path) {
                let _ = self.store.remove(&path);
            }
        }
        self.domains().remove(&domid);
        self.domain_left.notify_all();
    }

    fn handle(
        &self,
        line: &str,
        conn: &mut Connection,
        domid: &mut Option<u32>,
    ) -> Result<String, String> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        match cmd {
            "hello" => self.hello(rest, domid),
            "write" => {
                let (path, value) = path_value(rest)?;
                self.write_own(path, value, own_dir(domid)?)
            }
            "read" => {
                let (path, _) = path_value(rest)?;
                Ok(match self.store.read(path).map_err(|e| e.to_string())? {
                    Some(v) => format!("ok {v}"),
                    None => "enoent".into(),
                })
            }
            "rm" => {
                let (path, _) = path_value(rest)?;
                let own = own_dir(domid)?;
                if !path.starts_with(&own) {
                    return Err(format!("{path}: a domain removes only under {own}"));
                }
                self.store.remove(path).map_err(|e| e.to_string())?;
                Ok("ok".into())
            }
            "wait" => {
                let (path, value) = path_value(rest)?;
                self.wait(path, value, conn)
            }
            "grants" => self.grants_from(conn, domain_of(domid)?),
            "evtchn" => self.channel_from(conn, domain_of(domid)?),
            _ => Err(format!("unknown command {cmd:?}")),
        }
    }

    /// `hello DOMID`: the connection speaks for that domain from now on.
    fn hello(&self, rest: &str, domid: &mut Option<u32>) -> Result<String, String> {
        let id: u32 = rest.parse().map_err(|_| format!("bad domid {rest:?}"))?;
        if id == 0 {
            return Err("domain 0 is the back end".into());
        }
        if domid.is_some() {
            return Err("hello twice".into());
        }
        // One connection per domain: a domain has one grant table and one set of event
        // channels. A domain id is reused only once its last connection is torn down, which
        // can lag the front end's exit a little.
        let (mut domains, _) = self
            .domain_left
            .wait_timeout_while(self.domains(), DOMAIN_TEARDOWN_WAIT, |d| {
                d.contains_key(&id)
            })
            .unwrap_or_else(|e| e.into_inner());
        if domains.contains_key(&id) {
            return Err(format!("domain {id} is already connected"));
        }
        domains.insert(id, Domain::default());
        *domid = Some(id);
        Ok("ok".into())
    }

    /// `write PATH VALUE`: a front end writes only its own domain's keys, and only so many.
    fn write_own(&self, path: &str, value: &str, own: String) -> Result<String, String> {
        if !path.starts_with(&own) {
            return Err(format!("{path}: a domain writes only under {own}"));
        }
        if self.store.list(own.trim_end_matches('/')).len() >= MAX_DOMAIN_KEYS {
            return Err("this domain has too many keys".into());
        }
        self.store.write(path, value).map_err(|e| e.to_string())?;
        Ok("ok".into())
    }

    /// `wait PATH VALUE`: blocks until PATH holds VALUE (or the front end hangs up).
    fn wait(&self, path: &str, value: &str, conn: &mut Connection) -> Result<String, String> {
        let mut seen = 0;
        loop {
            if self.store.read(path).ok().flatten().as_deref() == Some(value) {
                return Ok("ok".into());
            }
            if conn.hung_up() {
                return Err("the front end went away".into());
            }
            seen = self
                .store
                .wait_change(path, seen, Duration::from_secs(1))
                .map_err(|e| e.to_string())?;
        }
    }

    /// `grants` with a memfd: page N of it is grant ref N.
    fn grants_from(&self, conn: &mut Connection, id: u32) -> Result<String, String> {
        let fd = conn.take_fd().ok_or("grants needs a memfd (SCM_RIGHTS)")?;
        let grants = MemfdGrants::new(File::from(fd)).map_err(|e| e.to_string())?;
        let pages = grants.pages;
        self.domains().entry(id).or_default().grants = Some(Arc::new(grants));
        Ok(format!("ok {pages}"))
    }

    /// `evtchn` with two eventfds (to the back end, to the front end): a new port.
    fn channel_from(&self, conn: &mut Connection, id: u32) -> Result<String, String> {
        let (Some(to_back), Some(to_front)) = (conn.take_fd(), conn.take_fd()) else {
            return Err("evtchn needs two eventfds (SCM_RIGHTS)".into());
        };
        for fd in [&to_back, &to_front] {
            checked_eventfd(fd).map_err(|e| e.to_string())?;
        }
        // SAFETY: checked to be eventfds (made non-blocking); we own them now.
        let (to_back, to_front) = unsafe {
            use std::os::fd::IntoRawFd;
            (
                EventFd::from_raw_fd(to_back.into_raw_fd()),
                EventFd::from_raw_fd(to_front.into_raw_fd()),
            )
        };
        let mut domains = self.domains();
        let domain = domains.entry(id).or_default();
        if domain.channels.len() >= MAX_CHANNELS {
            return Err("too many event channels".into());
        }
        domain.next_port += 1;
        let port = domain.next_port;
        domain
            .channels
            .insert(port, (Arc::new(to_back), Arc::new(to_front)));
        Ok(format!("ok {port}"))
    }
}

/// A request's `PATH [VALUE]`.
fn path_value(rest: &str) -> Result<(&str, &str), String> {
    let (path, value) = rest.split_once(' ').unwrap_or((rest, ""));
    if !path.starts_with('/') || path.len() > 1024 {
        return Err(format!("bad path {path:?}"));
    }
    Ok((path, value))
}

fn domain_of(domid: &Option<u32>) -> Result<u32, String> {
    domid.ok_or_else(|| "say hello DOMID first".to_string())
}

/// The directory a connection's domain owns.
fn own_dir(domid: &Option<u32>) -> Result<String, String> {
    Ok(format!("/local/domain/{}/", domain_of(domid)?))
}

impl Platform for Loopback {
    fn store(&self) -> &dyn XenStore {
        &*self.store
    }

    fn grants(&self, domid: u32) -> io::Result<Box<dyn GrantSpace>> {
        let domains = self.domains();
        let grants = domains
            .get(&domid)
            .and_then(|d| d.grants.clone())
            .ok_or_else(|| io::Error::other(format!("domain {domid} granted no pages")))?;
        Ok(Box::new(LoopbackGrants(grants)))
    }

    fn bind(&self, domid: u32, port: u32) -> io::Result<Box<dyn EventChannel>> {
        let domains = self.domains();
        let (to_back, to_front) = domains
            .get(&domid)
            .and_then(|d| d.channels.get(&port))
            .ok_or_else(|| {
                io::Error::other(format!("domain {domid} has no event channel {port}"))
            })?;
        Ok(Box::new(EventFdChannel {
            to_back: to_back.try_clone()?,
            to_front: to_front.try_clone()?,
        }))
    }

    /// Loopback grants are mapped once, for as long as the front end's memfd lives: they
    /// are persistent by construction, as on real Xen, and front ends must say so.
    fn needs_persistent_grants(&self) -> bool {
        true
    }
}

/// Checks that a received descriptor is an eventfd and makes it non-blocking: the reactor
/// reads and writes it, and a blocking one (drained or filled by the front end between the
/// poll and the call) would stall every disk of that reactor. (The flag lives on the shared
/// file description: the loopback platform trusts the processes that may reach its socket
/// not to clear it again; the socket is the daemon user's only, mode 0600.)
fn checked_eventfd(fd: &OwnedFd) -> io::Result<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if link.to_str() != Some("anon_inode:[eventfd]") {
        return Err(io::Error::other(format!(
            "not an eventfd: {}",
            link.display()
        )));
    }
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let set = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One front end's connection: lines in, and the descriptors that came with them.
struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: std::collections::VecDeque<OwnedFd>,
}

impl Connection {
    fn new(stream: UnixStream) -> Connection {
        Connection {
            stream,
            buf: Vec::new(),
            fds: Default::default(),
        }
    }

    fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Whether the front end closed its end (a blocked `wait` must not outlive it).
    fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd for the call, no wait.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The next line (without its newline); None at the end of the stream.
    fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::other("line too long"));
            }
            let mut chunk = [0u8; 1024];
            let mut fds = [-1 as RawFd; 4];
            let mut iov = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            }];
            // SAFETY: the iovec points at `chunk`, alive for the call.
            let (n, nfds) = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            for &fd in &fds[..nfds] {
                // SAFETY: received with SCM_RIGHTS: new descriptors that we own.
                self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A client of a loopback store (for tests written in Rust; the C front end speaks the same
/// lines).
pub struct Client {
    reader: io::BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path, domid: u32) -> io::Result<Client> {
        let stream = UnixStream::connect(socket)?;
        let mut client = Client {
            reader: io::BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        client.call(&format!("hello {domid}"), &[])?;
        Ok(client)
    }

    /// Sends one line (with `fds`); returns the answer after "ok".
    pub fn call(&mut self, line: &str, fds: &[RawFd]) -> io::Result<String> {
        let msg = format!("{line}\n");
        if fds.is_empty() {
            self.writer.write_all(msg.as_bytes())?;
        } else {
            self.writer
                .send_with_fds(&[msg.as_bytes()], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        let answer = answer.trim_end_matches('\n');
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim_start().to_string()),
            None => Err(io::Error::other(answer.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn say(stream: &UnixStream, line: &str) -> String {
        writeln!(&*stream, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    }

    #[test]
    fn a_domain_id_connects_again_right_after_its_front_end_exits() {
        let dir = tempfile::tempdir().unwrap();
        let loopback = Loopback::start(dir.path()).unwrap();
        let first = UnixStream::connect(loopback.socket()).unwrap();
        assert_eq!(say(&first, "hello 1"), "ok");
        // The front end exits while its connection thread is parked in `wait`.
        writeln!(&first, "wait /local/domain/0/never 1").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        let second = UnixStream::connect(loopback.socket()).unwrap();
        assert_eq!(say(&second, "hello 1"), "ok");
        // A live connection still owns its domain id.
        let third = UnixStream::connect(loopback.socket()).unwrap();
        assert_eq!(say(&third, "hello 1"), "err domain 1 is already connected");
    }

    #[test]
    fn a_departed_domain_leaves_only_the_toolstack_keys() {
        let dir = tempfile::tempdir().unwrap();
        let loopback = Loopback::start(dir.path()).unwrap();
        let device = "/local/domain/1/device/vbd/51712";
        let store = loopback.store_handle();
        store
            .write(
                &format!("{device}/backend"),
                "/local/domain/0/backend/vbd/1/51712",
            )
            .unwrap();
        let first = UnixStream::connect(loopback.socket()).unwrap();
        assert_eq!(say(&first, "hello 1"), "ok");
        for line in [
            format!("write {device}/state 4"),
            format!("write {device}/multi-queue-num-queues 2"),
            format!("write {device}/queue-1/event-channel 2"),
            "write /local/domain/1/name guest".to_string(),
        ] {
            assert_eq!(say(&first, &line), "ok");
        }
        drop(first);
        // The next domain of that id waits for the teardown, then finds what a toolstack
        // leaves: not the old front end's layout (a front end with fewer queues that does
        // not clean up after its predecessor would be refused otherwise).
        let second = UnixStream::connect(loopback.socket()).unwrap();
        assert_eq!(say(&second, "hello 1"), "ok");
        let read = |key: &str| say(&second, &format!("read {key}"));
        assert_eq!(read(&format!("{device}/multi-queue-num-queues")), "enoent");
        assert_eq!(read(&format!("{device}/queue-1/event-channel")), "enoent");
        assert_eq!(read("/local/domain/1/name"), "enoent");
        assert_eq!(
            read(&format!("{device}/backend")),
            "ok /local/domain/0/backend/vbd/1/51712"
        );
        assert_eq!(read(&format!("{device}/state")), "ok 6");
    }
}
