//! Thin provisioning: a pool (one data file plus metadata) holding many volumes whose sizes
//! may add up to more than the pool; a volume's blocks are mapped onto data blocks when first
//! written or provisioned and given back when discarded. Snapshots (read-only) and clones
//! (writable) are volumes made as copies of another's map: they share its data blocks until
//! one of them writes there, and that write copies the block first (snapshot.rs).
//!
//! # Metadata design
//!
//! A pool directory holds `data` (the data blocks), `superblock`, `checkpoint.G` and
//! `journal.G`. The superblock (magic, format version, block size, data blocks, generation G;
//! CRC32C) names the current generation. The checkpoint is the whole state of generation G as
//! records (volume creations and copies, map entries) ending in a Commit marker; the journal holds the
//! changes since, as commits: a run of records followed by a Commit marker counting them.
//! Every record is framed with its length, a CRC32C, its generation and a sequence number
//! (format.rs). Opening reads the checkpoint (which must be complete), then the journal's
//! commits in sequence until the first record that is torn, damaged, of another generation or
//! out of sequence; records of a commit whose marker is missing are not applied. Map records
//! set an entry to a value, so they are idempotent.
//!
//! # Why a crash loses nothing that was flushed and exposes nothing
//!
//! - A block that is newly mapped is written whole (the guest's data, zeroes around it) before
//!   its map entry is installed, so no mapping, in memory or on disk, points at a block whose
//!   content is not the volume's own.
//! - A flush (FLUSH, and every metadata change) collects the changed map entries, then syncs
//!   the data file, then appends the changes as one commit and syncs the journal. So a journaled
//!   mapping always points at synced data, and after a crash every write that completed before
//!   a completed flush is reachable from the checkpoint and journal.
//! - A block unmapped by DISCARD or WRITE_ZEROES goes to a pending list, not the free map, until
//!   a commit holding its unmapping is durable. Before that a crash would bring the old mapping
//!   back, so the block must not meanwhile hold another volume's data.
//! - Nor while an I/O that looked the block up before the unmapping still runs (a read that
//!   raced a discard, a write whose lookup came first): every read and write pins an epoch, and
//!   a flush moves to the next epoch and waits for the previous one's I/O before it frees.
//! - A checkpoint writes generation G+1's checkpoint and empty journal in full (fsync), then
//!   replaces the superblock by rename (fsync of the file and the directory). Until the rename,
//!   generation G's files are intact and current; after it, G+1's are.
//! - A torn journal tail is cut at open: the commit it belonged to was never acknowledged.
//!
//! # Sharing: snapshots, clones, copy on write
//!
//! - A copy is one record, `VolumeCopy` ("volume B is A's map as the records before this left
//!   it"), committed together with every map change still pending: its replay gives exactly
//!   the map copied in memory. A snapshot of a served volume holds the volume's changes for
//!   the copy (snapshot.rs says how, and for how long).
//! - Reference counts are never stored: opening counts the mappings, so on disk they cannot
//!   disagree with the maps. `check` verifies the one shape sharing can have (a block shared
//!   by several volumes sits at the same virtual block in each).
//! - A block with more than one reference is never written in place. A write to it fills a
//!   new block (the old contents, then the write; cow.rs) before mapping it, as for any new
//!   block.
//! - In memory, the reference of a mapping that went away (copy on write, DISCARD, a deleted
//!   volume) is dropped only once that removal is durable, as a block unmapped is freed only
//!   then: until it is, a crash maps the block again in that volume, so no other volume may
//!   write it in place, and it must not be reused.
//! - A snapshot is read-only: every change to it fails, and its map never changes, so a crash
//!   leaves it exactly as taken.
//!
//! # Data path
//!
//! backend/thin.rs: reads over mapped blocks that lie one after another in the data file (up
//! to 64 of them; a whole block, or an imported image's run), and overwrites of such blocks
//! the volume owns alone, go to the reactor's io_uring on the data file, with the epoch pinned
//! until the CQE; everything else (first writes, copies on write, blocks that lie apart,
//! writes to a volume being snapshotted) runs this module's synchronous API on worker
//! threads and completes through the reactor's Completer. A first write punches a hole over its new block (zeroes without
//! writing them) and writes only its data.
//!
//! Allocation is sharded (alloc.rs): each thread allocates from its own shard of the block
//! bitmap under that shard's lock, so concurrent first writes do not meet on one lock, and
//! counts stay exact. Commits are grouped: a FLUSH that waited while a commit that started
//! after it arrived ran is answered by that commit (about 100 commits for 160 concurrent
//! flushes in the tests).
//!
//! # Not here yet
//!
//! Per-reactor epoch counters (pins share one cache line today), and shrinking a volume while
//! it is served (growing works under I/O: the map grows in place, see stable.rs).

mod alloc;
mod cow;
pub mod format;
mod pool;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;
mod stable;
#[cfg(test)]
mod tests;

pub use pool::{check, Pool, PoolStatus, ThinError, Volume, VolumeStatus, DEFAULT_BLOCK_SIZE};
pub use snapshot::Snapshot;
