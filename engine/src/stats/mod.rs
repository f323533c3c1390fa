//! Statistics in KVM's binary stats layout (linux/kvm.h): lock-free counters in shared files
//! any process can read, and a reader and validator for any file or fd in that layout.
//!
//! - [`format`]: the header and descriptor layout, types, units.
//! - [`schema`]: declaring a set of statistics.
//! - [`file`]: publishing them (a mapped file per object) and writing values.
//! - [`reader`], [`validate`]: reading and checking any file in the layout.
//! - [`sets`]: what pollblk publishes (per queue, per disk, per reactor, per pool).

pub mod file;
pub mod format;
pub mod reader;
pub mod schema;
pub mod sets;
pub mod validate;

pub use file::{Stats, StatsDir, StatsFile};
pub use reader::{Sample, StatsReader};
pub use schema::{slots, Def, Schema};

#[cfg(test)]
mod tests;
