//! A disk's transport while the daemon runs, behind one trait: the daemon starts, stops,
//! describes, resizes and pauses every disk the same way, and each transport says what it
//! supports. A new transport (NBD) is one more implementation here.

use pollblk_vhost_user::{QueueState, Server};
use pollblk_xen::backend::Vbd;

/// What the daemon asks of a disk's front-end side.
pub trait Frontend: Send {
    /// Disconnects the front end, completing its queues' requests first.
    fn stop(self: Box<Self>);

    /// Whether a front end is attached now.
    fn connected(&self) -> bool;

    /// How an operator detaches the front end, for an "in use" refusal.
    fn detach_hint(&self) -> &'static str;

    /// Whether the transport can tell its front end of a new size (asked before growing).
    fn resizes(&self) -> Result<(), Unsupported>;

    /// Tells the front end the disk grew; Ok(true) if one was told (Ok(false): none is
    /// attached).
    fn announce_resize(&self) -> Result<bool, String>;

    /// Pauses queue `queue` (or every running one): (queue, index to resume at) each.
    fn pause(&self, queue: Option<usize>) -> Result<Vec<(usize, u16)>, Refused>;

    /// Resumes queue `queue` (or every paused one); returns the queues resumed.
    fn resume(&self, queue: Option<usize>) -> Result<Vec<usize>, Refused>;

    /// Each queue's state as `export_list` shows it (empty: the transport does not say).
    fn queue_states(&self) -> Vec<serde_json::Value>;
}

/// The transport has no such operation (the message says what it is).
#[derive(Debug)]
pub struct Unsupported(pub &'static str);

/// Why a pause or resume was refused.
#[derive(Debug)]
pub enum Refused {
    /// Not for this transport.
    Unsupported(Unsupported),
    /// A bad queue, a queue in the wrong state, or a stop that timed out.
    Invalid(String),
}

impl Frontend for Server {
    fn stop(self: Box<Self>) {
        Server::stop(*self);
    }

    fn connected(&self) -> bool {
        Server::connected(self)
    }

    fn detach_hint(&self) -> &'static str {
        "detach it first (QEMU: device_del, then chardev-remove once DEVICE_DELETED \
         arrives; libvirt: virsh detach-device)"
    }

    fn resizes(&self) -> Result<(), Unsupported> {
        Ok(())
    }

    fn announce_resize(&self) -> Result<bool, String> {
        self.config_changed()
    }

    fn pause(&self, queue: Option<usize>) -> Result<Vec<(usize, u16)>, Refused> {
        Server::pause(self, queue).map_err(Refused::Invalid)
    }

    fn resume(&self, queue: Option<usize>) -> Result<Vec<usize>, Refused> {
        let resumed = Server::resume(self, queue).map_err(Refused::Invalid)?;
        Ok(resumed.into_iter().map(|(q, ())| q).collect())
    }

    fn queue_states(&self) -> Vec<serde_json::Value> {
        Server::queue_states(self)
            .into_iter()
            .map(|s| match s {
                QueueState::Idle => serde_json::json!("idle"),
                QueueState::Running => serde_json::json!("running"),
                QueueState::Paused(at) => serde_json::json!({ "paused": at }),
            })
            .collect()
    }
}

/// What a Xen disk does not do (yet): blkif's "sectors" key is not rewritten on a resize,
/// and its rings are not paused one by one.
const XEN_ONLY_VHOST: &str = "supported for vhost-user disks only";

impl Frontend for Vbd {
    fn stop(self: Box<Self>) {
        drop(self);
    }

    fn connected(&self) -> bool {
        Vbd::connected(self)
    }

    fn detach_hint(&self) -> &'static str {
        "detach it first (xl block-detach)"
    }

    fn resizes(&self) -> Result<(), Unsupported> {
        Err(Unsupported(XEN_ONLY_VHOST))
    }

    fn announce_resize(&self) -> Result<bool, String> {
        unreachable!("resizes() refused")
    }

    fn pause(&self, _: Option<usize>) -> Result<Vec<(usize, u16)>, Refused> {
        Err(Refused::Unsupported(Unsupported(XEN_ONLY_VHOST)))
    }

    fn resume(&self, _: Option<usize>) -> Result<Vec<usize>, Refused> {
        Err(Refused::Unsupported(Unsupported(XEN_ONLY_VHOST)))
    }

    fn queue_states(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
}

/// An NBD disk: one export of a listener that may offer others.
pub struct NbdDisk {
    /// Kept alive by its exports: the listener closes when the last one stops.
    pub listener: std::sync::Arc<pollblk_nbd::server::Listener>,
    pub export: std::sync::Arc<pollblk_nbd::server::Export>,
}

const NBD_ONLY_VHOST: &str = "supported for vhost-user disks only (an NBD client learns the \
                              size when it connects)";

impl Frontend for NbdDisk {
    fn stop(self: Box<Self>) {
        self.listener.remove(self.export.name());
        self.export.disconnect_all();
    }

    fn connected(&self) -> bool {
        self.export.connected() > 0
    }

    fn detach_hint(&self) -> &'static str {
        "disconnect its NBD clients first (or export_remove with force=true)"
    }

    fn resizes(&self) -> Result<(), Unsupported> {
        Err(Unsupported(NBD_ONLY_VHOST))
    }

    fn announce_resize(&self) -> Result<bool, String> {
        unreachable!("resizes() refused")
    }

    fn pause(&self, _: Option<usize>) -> Result<Vec<(usize, u16)>, Refused> {
        Err(Refused::Unsupported(Unsupported(NBD_ONLY_VHOST)))
    }

    fn resume(&self, _: Option<usize>) -> Result<Vec<usize>, Refused> {
        Err(Refused::Unsupported(Unsupported(NBD_ONLY_VHOST)))
    }

    fn queue_states(&self) -> Vec<serde_json::Value> {
        // One queue per connection slot: a client holds it, or it waits for one.
        let state = |held| serde_json::json!(if held { "connected" } else { "idle" });
        self.export.slots().into_iter().map(state).collect()
    }
}
