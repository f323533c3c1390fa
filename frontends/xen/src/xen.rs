//! The platform on a real Xen host (dom0 or a driver domain), through Xen's own libraries:
//! libxenstore, libxengnttab and libxenevtchn (Debian's libxen-dev). Cargo feature `xen`.
//!
//! UNTESTED here: these machines run no hypervisor; CI only builds this module. The loopback
//! platform, which the tests use, implements the same traits.
//!
//! Grants are mapped persistently: a page is mapped the first time a request names it and
//! stays mapped until the ring goes. That is only correct when the front end keeps each grant
//! bound to one page, which is what feature-persistent promises; front ends that do not
//! negotiate it are refused (`Platform::needs_persistent_grants`).

use crate::abi::PAGE_SIZE;
use crate::platform::{EventChannel, GrantSpace, Platform, RingPages, XenStore};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most pages one ring keeps mapped (Linux blkfront's persistent grants stay far below).
const MAX_PERSISTENT_PAGES: usize = 16384;

#[allow(non_camel_case_types)]
type xs_handle = c_void;
#[allow(non_camel_case_types)]
type xengnttab_handle = c_void;
#[allow(non_camel_case_types)]
type xenevtchn_handle = c_void;
const XBT_NULL: u32 = 0;

#[link(name = "xenstore")]
extern "C" {
    fn xs_open(flags: std::ffi::c_ulong) -> *mut xs_handle;
    fn xs_close(h: *mut xs_handle);
    fn xs_read(h: *mut xs_handle, t: u32, path: *const c_char, len: *mut u32) -> *mut c_void;
    fn xs_write(
        h: *mut xs_handle,
        t: u32,
        path: *const c_char,
        data: *const c_void,
        len: u32,
    ) -> bool;
    fn xs_rm(h: *mut xs_handle, t: u32, path: *const c_char) -> bool;
    fn xs_watch(h: *mut xs_handle, path: *const c_char, token: *const c_char) -> bool;
    fn xs_fileno(h: *mut xs_handle) -> c_int;
    fn xs_check_watch(h: *mut xs_handle) -> *mut *mut c_char;
}

#[link(name = "xengnttab")]
extern "C" {
    fn xengnttab_open(logger: *mut c_void, flags: u32) -> *mut xengnttab_handle;
    fn xengnttab_close(h: *mut xengnttab_handle) -> c_int;
    fn xengnttab_map_grant_ref(
        h: *mut xengnttab_handle,
        domid: u32,
        gref: u32,
        prot: c_int,
    ) -> *mut c_void;
    fn xengnttab_map_domain_grant_refs(
        h: *mut xengnttab_handle,
        count: u32,
        domid: u32,
        refs: *mut u32,
        prot: c_int,
    ) -> *mut c_void;
    fn xengnttab_unmap(h: *mut xengnttab_handle, start: *mut c_void, count: u32) -> c_int;
}

#[link(name = "xenevtchn")]
extern "C" {
    fn xenevtchn_open(logger: *mut c_void, flags: u32) -> *mut xenevtchn_handle;
    fn xenevtchn_close(h: *mut xenevtchn_handle) -> c_int;
    fn xenevtchn_fd(h: *mut xenevtchn_handle) -> c_int;
    fn xenevtchn_bind_interdomain(h: *mut xenevtchn_handle, domid: u32, port: u32) -> c_int;
    fn xenevtchn_notify(h: *mut xenevtchn_handle, port: u32) -> c_int;
    fn xenevtchn_pending(h: *mut xenevtchn_handle) -> c_int;
    fn xenevtchn_unmask(h: *mut xenevtchn_handle, port: u32) -> c_int;
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::other("a xenstore path with a NUL byte"))
}

/// A xenstore connection shared by the handshake threads.
struct Store {
    handle: Mutex<usize>,
    watched: Mutex<Vec<String>>,
}

impl Store {
    fn with<T>(&self, f: impl FnOnce(*mut xs_handle) -> T) -> T {
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        f(*handle as *mut xs_handle)
    }
}

impl XenStore for Store {
    fn read(&self, path: &str) -> io::Result<Option<String>> {
        let path = cstring(path)?;
        let mut len = 0u32;
        // SAFETY: a valid handle and NUL-terminated path; xs_read returns malloc'ed memory
        // of `len` bytes (or NULL), freed below.
        let data = self.with(|h| unsafe { xs_read(h, XBT_NULL, path.as_ptr(), &mut len) });
        if data.is_null() {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: `len` bytes at `data`, then freed once.
        let value = unsafe { std::slice::from_raw_parts(data as *const u8, len as usize) };
        let value = String::from_utf8_lossy(value).into_owned();
        // SAFETY: malloc'ed by xs_read, no longer referenced (copied above), freed once.
        unsafe { libc::free(data) };
        Ok(Some(value))
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        let path = cstring(path)?;
        // SAFETY: valid handle, path and value buffer for the call.
        let ok = self.with(|h| unsafe {
            xs_write(
                h,
                XBT_NULL,
                path.as_ptr(),
                value.as_ptr().cast(),
                value.len() as u32,
            )
        });
        ok.then_some(()).ok_or_else(io::Error::last_os_error)
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        let path = cstring(path)?;
        // SAFETY: valid handle and path.
        let ok = self.with(|h| unsafe { xs_rm(h, XBT_NULL, path.as_ptr()) });
        ok.then_some(()).ok_or_else(io::Error::last_os_error)
    }

    fn wait_change(&self, path: &str, seen: u64, timeout: Duration) -> io::Result<u64> {
        {
            let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            if !watched.iter().any(|p| p == path) {
                let c = cstring(path)?;
                // SAFETY: valid handle, path and token (the path itself).
                if !self.with(|h| unsafe { xs_watch(h, c.as_ptr(), c.as_ptr()) }) {
                    return Err(io::Error::last_os_error());
                }
                watched.push(path.to_string());
            }
        }
        // Any watch event wakes every waiter's next look: a thread may take another's event,
        // which then costs that one at most `timeout` of delay.
        // SAFETY: valid handle.
        let fd = self.with(|h| unsafe { xs_fileno(h) });
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for the call.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(60_000) as c_int) };
        loop {
            // SAFETY: valid handle; the returned vector is one malloc'ed block.
            let event = self.with(|h| unsafe { xs_check_watch(h) });
            if event.is_null() {
                break;
            }
            // SAFETY: one malloc'ed block from xs_check_watch, freed once.
            unsafe { libc::free(event.cast()) };
        }
        Ok(seen.wrapping_add(1))
    }
}

/// Xen on this host.
pub struct Xen {
    store: Store,
}

// SAFETY: the xenstore handle is used under its mutex only.
unsafe impl Send for Xen {}
// SAFETY: as Send.
unsafe impl Sync for Xen {}

impl Xen {
    /// Connects to xenstored (or the xenbus device).
    pub fn open() -> io::Result<Xen> {
        // SAFETY: plain library call; NULL on failure.
        let handle = unsafe { xs_open(0) };
        if handle.is_null() {
            return Err(io::Error::other(format!(
                "cannot connect to xenstore ({}): is this a Xen dom0 or driver domain?",
                io::Error::last_os_error()
            )));
        }
        Ok(Xen {
            store: Store {
                handle: Mutex::new(handle as usize),
                watched: Mutex::new(Vec::new()),
            },
        })
    }
}

impl Drop for Xen {
    fn drop(&mut self) {
        // SAFETY: opened in open, closed once.
        self.store.with(|h| unsafe { xs_close(h) });
    }
}

impl Platform for Xen {
    fn store(&self) -> &dyn XenStore {
        &self.store
    }

    fn grants(&self, domid: u32) -> io::Result<Box<dyn GrantSpace>> {
        // SAFETY: plain library call; NULL on failure.
        let handle = unsafe { xengnttab_open(std::ptr::null_mut(), 0) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(Grants {
            handle: Arc::new(GnttabHandle(handle)),
            domid,
            pages: HashMap::new(),
        }))
    }

    fn bind(&self, domid: u32, port: u32) -> io::Result<Box<dyn EventChannel>> {
        // SAFETY: plain library calls; the handle is closed on every failure path.
        unsafe {
            let handle = xenevtchn_open(std::ptr::null_mut(), 0);
            if handle.is_null() {
                return Err(io::Error::last_os_error());
            }
            let local = xenevtchn_bind_interdomain(handle, domid, port);
            if local < 0 {
                let e = io::Error::last_os_error();
                xenevtchn_close(handle);
                return Err(e);
            }
            Ok(Box::new(Channel {
                handle,
                local: local as u32,
            }))
        }
    }

    fn needs_persistent_grants(&self) -> bool {
        true
    }
}

/// A grant-table handle, closed when its last user (grant space or ring mapping) goes.
struct GnttabHandle(*mut xengnttab_handle);

// SAFETY: the handle is used by the thread that owns the ring (and the handshake thread
// before the ring is handed over), never at the same time.
unsafe impl Send for GnttabHandle {}
// SAFETY: as Send: the handle itself is never used from two threads at once.
unsafe impl Sync for GnttabHandle {}

impl Drop for GnttabHandle {
    fn drop(&mut self) {
        // SAFETY: opened in grants, closed once, after every mapping made through it went.
        unsafe { xengnttab_close(self.0) };
    }
}

/// One ring's grant mappings.
struct Grants {
    handle: Arc<GnttabHandle>,
    domid: u32,
    pages: HashMap<u32, *mut u8>,
}

// SAFETY: the mappings are used by the one thread that owns the ring.
unsafe impl Send for Grants {}

impl GrantSpace for Grants {
    fn page(&mut self, gref: u32) -> Option<*mut u8> {
        if let Some(&page) = self.pages.get(&gref) {
            return Some(page);
        }
        if self.pages.len() >= MAX_PERSISTENT_PAGES {
            tracing::warn!(
                domid = self.domid,
                "front end uses more grants than kept mapped"
            );
            return None;
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a valid handle; NULL on failure (an unknown or revoked grant).
        let page = unsafe { xengnttab_map_grant_ref(self.handle.0, self.domid, gref, prot) };
        if page.is_null() {
            return None;
        }
        self.pages.insert(gref, page.cast());
        Some(page.cast())
    }

    fn map_ring(&mut self, grefs: &[u32]) -> io::Result<Box<dyn RingPages>> {
        let mut refs = grefs.to_vec();
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a valid handle and `count` refs.
        let base = unsafe {
            xengnttab_map_domain_grant_refs(
                self.handle.0,
                refs.len() as u32,
                self.domid,
                refs.as_mut_ptr(),
                prot,
            )
        };
        if base.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(RingMapping {
            handle: self.handle.clone(),
            base: base.cast(),
            pages: grefs.len(),
        }))
    }
}

impl Drop for Grants {
    fn drop(&mut self) {
        for (_, page) in self.pages.drain() {
            // SAFETY: mapped through this handle, unmapped once.
            unsafe { xengnttab_unmap(self.handle.0, page.cast(), 1) };
        }
    }
}

/// A ring's pages mapped through a grant handle.
struct RingMapping {
    handle: Arc<GnttabHandle>,
    base: *mut u8,
    pages: usize,
}

// SAFETY: owned mapping, used by the ring's thread.
unsafe impl Send for RingMapping {}

impl RingPages for RingMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    fn bytes(&self) -> usize {
        self.pages * PAGE_SIZE
    }
}

impl Drop for RingMapping {
    fn drop(&mut self) {
        // SAFETY: mapped through this handle, unmapped once.
        unsafe { xengnttab_unmap(self.handle.0, self.base.cast(), self.pages as u32) };
    }
}

/// A bound event channel with a handle of its own (its fd signals only this port).
struct Channel {
    handle: *mut xenevtchn_handle,
    local: u32,
}

// SAFETY: used by the ring's thread only.
unsafe impl Send for Channel {}

impl EventChannel for Channel {
    fn fd(&self) -> RawFd {
        // SAFETY: valid handle.
        unsafe { xenevtchn_fd(self.handle) }
    }

    fn ack(&mut self) -> u64 {
        // SAFETY: valid handle; the port is unmasked again after each pending event.
        unsafe {
            let port = xenevtchn_pending(self.handle);
            if port < 0 {
                return 0;
            }
            xenevtchn_unmask(self.handle, port as u32);
        }
        1
    }

    fn notify(&self) {
        // SAFETY: valid handle and bound port.
        unsafe { xenevtchn_notify(self.handle, self.local) };
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: opened in bind, closed once (closing unbinds the port).
        unsafe { xenevtchn_close(self.handle) };
    }
}
