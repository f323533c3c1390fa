//! A vhost-user-blk front end that plays the guest: the `vhost` crate speaks the protocol,
//! this crate owns "guest memory" (a memfd), lays out split rings in it and drives virtio-blk
//! requests through them the way a guest driver would.
//!
//! It is deliberately independent of pollblk's engine (nothing is shared with the code under
//! test) and exposes raw ring access so tests can build malformed chains.

pub mod blk;
pub mod memory;
pub mod ring;

pub use blk::{BlkDriver, Completion, DriverOptions, Request};
pub use memory::GuestRam;
pub use ring::DriverQueue;
