//! What a blkif back end needs from Xen, as three small traits: XenStore (the handshake),
//! grant mapping (the front end's pages) and event channels (notifications). Implemented by
//! the loopback platform for tests (`loopback`) and by real Xen's libraries (`xen`, feature
//! `xen`).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// A XenStore connection.
pub trait XenStore: Send + Sync {
    /// The value at `path`, or None if it does not exist.
    fn read(&self, path: &str) -> io::Result<Option<String>>;

    /// Writes `value` at `path` (creating parents).
    fn write(&self, path: &str, value: &str) -> io::Result<()>;

    /// Removes `path` and everything below it.
    fn remove(&self, path: &str) -> io::Result<()>;

    /// Blocks until something below `path` may have changed since `seen` (a value from an
    /// earlier call, 0 at first) or `timeout` passes; returns the new value to pass next.
    fn wait_change(&self, path: &str, seen: u64, timeout: Duration) -> io::Result<u64>;
}

/// Pages a front end domain granted, mapped into this process; one per ring, used by the
/// thread that owns the ring.
pub trait GrantSpace: Send {
    /// The page granted as `gref`, mapped read-write; None if the domain granted no such
    /// page (or it cannot be mapped). The page stays mapped as long as the space lives
    /// (persistent grants: mapped once, used for every request that names them).
    fn page(&mut self, gref: u32) -> Option<*mut u8>;

    /// Maps the pages `grefs` contiguously, for a shared ring.
    fn map_ring(&mut self, grefs: &[u32]) -> io::Result<Box<dyn RingPages>>;
}

/// A shared ring's pages, mapped contiguously; unmapped when dropped.
pub trait RingPages: Send {
    fn as_ptr(&self) -> *mut u8;
    /// Bytes mapped (whole pages, never 0).
    fn bytes(&self) -> usize;
}

/// One bound event channel.
pub trait EventChannel: Send {
    /// Polls readable when the front end notified.
    fn fd(&self) -> RawFd;
    /// Consumes the pending notifications (after `fd` polled readable); returns how many.
    fn ack(&mut self) -> u64;
    /// Notifies the front end.
    fn notify(&self);
}

/// A platform: where a front end's store keys, grants and event channels come from.
pub trait Platform: Send + Sync {
    fn store(&self) -> &dyn XenStore;
    /// A view of the grants of domain `domid`, for one ring.
    fn grants(&self, domid: u32) -> io::Result<Box<dyn GrantSpace>>;
    /// Binds the front end's event channel `port` of domain `domid`.
    fn bind(&self, domid: u32, port: u32) -> io::Result<Box<dyn EventChannel>>;

    /// Whether front ends must negotiate feature-persistent (grants mapped once and kept).
    fn needs_persistent_grants(&self) -> bool {
        false
    }
}
