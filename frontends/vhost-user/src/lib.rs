//! pollblk's vhost-user-blk back end: one listening socket per disk, one front end at a time.
//!
//! A [`Server`] binds its socket; a few shared event-loop threads (`event_loop`, at most four
//! for the whole daemon) serve every socket's listener and connection. A front end (QEMU,
//! Cloud Hypervisor, a test driver) connects; its messages are handled by
//! [`handler::BlkHandler`] and its virtqueues run on the engine's reactors. When it
//! disconnects every queue is drained and stopped and the socket takes the next connection
//! (a restarted QEMU reconnects).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend_channel;
mod event_loop;
pub mod handler;
mod server;

pub use handler::QueueState;
pub use server::{Server, ServerError};
