//! Snapshots and clones: a volume copied, map and all, sharing every data block with the
//! volume it was copied from until one of them writes there.
//!
//! # Taking a snapshot of a volume being served
//!
//! The copy must be one point in time: every change completed before the call is in it, none
//! begun after, and nothing changes it once taken. So the volume is frozen for the copy:
//!
//! 1. A flush first, so what the freeze has to commit is small.
//! 2. `frozen` is set; every change to the volume (write, discard, write-zeroes, provision, on
//!    the worker path or io_uring's) pins an epoch and then looks at `frozen`, and waits
//!    outside its pin while it is set. Reads go on.
//! 3. A grace period: changes pinned before the freeze finish (`Epochs::wait_for_readers`).
//! 4. One commit journals every pending map change and the `VolumeCopy` record, after a data
//!    sync. The copy in memory is made under the journal lock, from the same map the commit
//!    read: replaying the journal gives exactly it.
//! 5. Every mapped block gains a reference, then the volume thaws. A block with more than one
//!    reference is never written in place: the next write to it copies it (`write_block`).
//!
//! How long changes wait is the time of steps 2 to 5 (`Snapshot::paused`).
//!
//! # Why sharing survives a crash
//!
//! Reference counts are not stored: opening a pool counts the mappings of its maps, so the
//! counts on disk cannot disagree with them. In memory a reference is dropped only once the
//! removal of its mapping is durable (see `Allocator`): a block a crash would map again in
//! one volume is never written in place by another, nor freed.

use super::format::{self, Record, Superblock};
use super::pool::{check_volume_name, index_of, replace_file, Journal, Pin, Pool, Volume};
use super::ThinError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What taking a snapshot or a clone did.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    /// How long changes to the source volume were held (zero for a copy of a snapshot).
    pub paused: Duration,
    /// Mapped bytes the new volume shares.
    pub shared_bytes: u64,
}

impl Pool {
    /// Pins an epoch for a change to `v`: refused for a snapshot, and waits while a snapshot
    /// of `v` is being taken.
    pub(super) fn pin_to_change(&self, v: &Volume) -> Result<Pin<'_>, ThinError> {
        if v.snapshot {
            return Err(ThinError::ReadOnly(v.name.clone()));
        }
        loop {
            let pin = self.epochs.pin();
            // SeqCst, after the pin: pairs with `freeze` (store, then a grace period).
            if !v.frozen.load(Ordering::SeqCst) {
                return Ok(pin);
            }
            drop(pin);
            let (lock, thawed) = &self.thaw;
            let mut guard = lock.lock().unwrap();
            while v.frozen.load(Ordering::SeqCst) {
                guard = thawed.wait(guard).unwrap();
            }
        }
    }

    /// Holds every change to `v` and waits for those under way to finish.
    fn freeze(&self, v: &Volume) {
        {
            let _guard = self.thaw.0.lock().unwrap();
            let was = v.frozen.swap(true, Ordering::SeqCst);
            assert!(!was, "two snapshots of one volume at once");
        }
        let _one_at_a_time = self.grace.lock().unwrap();
        self.epochs.wait_for_readers();
    }

    fn thaw(&self, v: &Volume) {
        let _guard = self.thaw.0.lock().unwrap();
        v.frozen.store(false, Ordering::SeqCst);
        self.thaw.1.notify_all();
    }

    /// Takes snapshot `name` of volume `of`: a read-only volume holding what `of` held at this
    /// moment, sharing its blocks. Works while `of` is served (see the module docs).
    pub fn volume_snapshot(&self, of: &str, name: &str) -> Result<Snapshot, ThinError> {
        self.copy_volume(of, name, true)
    }

    /// Creates writable volume `name` from snapshot `of`, sharing every block with it until
    /// written.
    pub fn volume_clone(&self, of: &str, name: &str) -> Result<Snapshot, ThinError> {
        if !self.volume(of)?.snapshot {
            return Err(ThinError::Invalid(format!(
                "volume {of:?} is not a snapshot: clone a snapshot of it (pool volume snapshot)"
            )));
        }
        self.copy_volume(of, name, false)
    }

    fn copy_volume(&self, of: &str, name: &str, snapshot: bool) -> Result<Snapshot, ThinError> {
        check_volume_name(name)?;
        let source = self.volume(of)?;
        if self.volume(name).is_ok() {
            return Err(ThinError::VolumeExists(name.into()));
        }
        // One copy at a time, so one volume is never frozen twice at once.
        let _one_at_a_time = self.copies.lock().unwrap();
        // A snapshot never changes: nothing to hold or commit first.
        let live = !source.snapshot;
        if live {
            self.flush()?;
        }
        // Made and counted before the freeze, which then only catches up with what changed
        // meanwhile. Counting a block shared early only makes its volume copy it sooner.
        let copy = Volume::copy_of(&source, 0, name.into(), snapshot, self.block_size);
        for p in copy.mapped() {
            self.alloc.share(p);
        }
        let started = Instant::now();
        if live {
            self.freeze(&source);
        }
        let committed = self.commit_copy(&source, copy);
        if live {
            self.thaw(&source);
        }
        let paused = match live {
            true => started.elapsed(),
            false => Duration::ZERO,
        };
        Ok(Snapshot {
            paused,
            shared_bytes: committed? * u64::from(self.block_size),
        })
    }

    /// Brings `copy` up to date with `source` (which nothing changes meanwhile), commits it
    /// and makes it a volume of the pool; returns the blocks it shares.
    fn commit_copy(&self, source: &Volume, mut copy: Volume) -> Result<u64, ThinError> {
        // Lock order everywhere: journal, then volumes.
        let mut journal = self.journal.lock().unwrap();
        let mut volumes = self.volumes.write().unwrap();
        let ready = index_of(&volumes, &source.name)
            .and_then(|_| match volumes.iter().any(|v| v.name == copy.name) {
                true => Err(ThinError::VolumeExists(copy.name.clone())),
                false => Ok(()),
            })
            .and_then(|()| self.upgrade_locked(&mut journal));
        if let Err(e) = ready {
            self.drop_refs(&copy);
            return Err(e);
        }
        self.catch_up(source, &mut copy);
        copy.id = volumes.iter().map(|v| v.id + 1).max().unwrap_or(1);
        let record = Record::VolumeCopy {
            from: source.id,
            id: copy.id,
            snapshot: copy.snapshot,
            name: copy.name.clone(),
        };
        let then = std::slice::from_ref(&record);
        let committed = match source.snapshot {
            true => self
                .append_commit_locked(&mut journal, then)
                .map(|()| Vec::new()),
            false => self.commit_locked(&mut journal, &volumes, then),
        };
        let freeing = match committed {
            Ok(freeing) => freeing,
            Err(e) => {
                self.drop_refs(&copy);
                return Err(e);
            }
        };
        let shared = copy.mapped().count() as u64;
        volumes.push(Arc::new(copy));
        self.count_volumes(&volumes);
        drop(volumes);
        drop(journal);
        self.release_after_grace(freeing);
        Ok(shared)
    }

    /// Makes `copy`, taken from `source` before the freeze, what `source` holds now: each
    /// entry that changed meanwhile drops its old block's reference and counts its new one.
    fn catch_up(&self, source: &Volume, copy: &mut Volume) {
        if copy.map.len() != source.map.len() || copy.size_bytes() != source.size_bytes() {
            // Resized meanwhile: copied again whole.
            self.drop_refs(copy);
            *copy = Volume::copy_of(source, 0, copy.name.clone(), copy.snapshot, self.block_size);
            for p in copy.mapped() {
                self.alloc.share(p);
            }
            return;
        }
        for (mine, theirs) in copy.map.iter().zip(source.map.iter()) {
            let (was, now) = (mine.load(Ordering::Relaxed), theirs.load(Ordering::Acquire));
            if was != now {
                if let Some(p) = was.checked_sub(1) {
                    self.alloc.unref(p);
                }
                if let Some(p) = now.checked_sub(1) {
                    self.alloc.share(p);
                }
                mine.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Gives back the references of a copy that is not made after all. They were never
    /// durable and no I/O could reach them, so they go at once.
    fn drop_refs(&self, copy: &Volume) {
        for p in copy.mapped() {
            self.alloc.unref(p);
        }
    }

    /// Moves a format version 1 pool to version 2 before its first `VolumeCopy` record: an
    /// older pollblk then refuses the pool instead of cutting the journal at that record.
    fn upgrade_locked(&self, journal: &mut Journal) -> Result<(), ThinError> {
        if journal.version >= format::COPY_FORMAT_VERSION {
            return Ok(());
        }
        let sb = Superblock {
            version: format::COPY_FORMAT_VERSION,
            block_size: self.block_size,
            data_blocks: self.data_blocks,
            generation: journal.generation,
        };
        replace_file(&self.dir, "superblock", &sb.encode())?;
        journal.version = format::COPY_FORMAT_VERSION;
        tracing::info!(pool = %self.dir.display(),
            "thin pool metadata upgraded to format {} (snapshots)", format::COPY_FORMAT_VERSION);
        Ok(())
    }

    /// Makes volume `name` own every block it maps (copying those it shares), so it no
    /// longer depends on its snapshot's blocks; commits. Works while the volume is served.
    /// Returns the bytes copied.
    pub fn volume_inflate(&self, name: &str) -> Result<u64, ThinError> {
        let v = self.volume(name)?;
        let bs = u64::from(self.block_size);
        let mut copied = 0;
        for vb in 0..v.size_bytes().div_ceil(bs) {
            // One block per pin: a long inflate must not hold back other commits' frees.
            let _pin = self.pin_to_change(&v)?;
            if v.lookup(vb).is_some_and(|p| self.alloc.is_shared(p)) {
                self.write_block(&v, vb, 0, None)?;
                copied += bs;
            }
        }
        self.flush()?;
        Ok(copied)
    }

    /// Checks the reference counts in memory against the maps: every used block is
    /// referenced exactly by the mappings that point at it plus those whose removal is not
    /// durable yet, and no block is used that nothing references. For tests and the model.
    pub fn verify_refs(&self) -> Result<(), String> {
        let volumes = self.volumes.read().unwrap();
        let mut refs = std::collections::HashMap::<u64, u64>::new();
        for v in volumes.iter() {
            for p in v.mapped() {
                *refs.entry(p).or_default() += 1;
            }
        }
        for p in self.alloc.pending() {
            *refs.entry(p).or_default() += 1;
        }
        for (&p, &n) in &refs {
            let counted = u64::from(self.alloc.is_used(p)) + self.alloc.extra_refs(p);
            if counted != n {
                return Err(format!("data block {p}: {n} references, {counted} counted"));
            }
        }
        let used = self.alloc.used();
        if used != refs.len() as u64 {
            return Err(format!("{used} blocks in use, {} referenced", refs.len()));
        }
        Ok(())
    }
}
