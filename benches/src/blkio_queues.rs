//! The generator's queues on libblkio's virtio-blk-vhost-user driver: poll queues spin on the
//! used ring and kick only when the device asks for it.

use crate::load::{LoadSpec, Queues};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;

pub struct BlkioQueues {
    // Queues before the instance: they must be dropped first.
    queues: Vec<Blkioq>,
    /// Slot i of queue q uses bufs + (q * iodepth + i) * bs.
    bufs: *mut u8,
    bs: usize,
    iodepth: usize,
    completions: Box<[MaybeUninit<Completion>]>,
    _blkio: Blkio,
}

fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {}", e.message())
}

impl BlkioQueues {
    /// Connects, starts `spec.queues` poll queues and maps their buffers; returns the queues
    /// and the device capacity in bytes.
    pub fn open(spec: &LoadSpec) -> Result<(BlkioQueues, u64), String> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("libblkio"))?;
        blkio
            .set_str("path", &spec.socket.to_string_lossy())
            .map_err(blkio_err("path"))?;
        blkio.connect().map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                spec.socket.display(),
                e.message()
            )
        })?;
        let capacity = blkio.get_u64("capacity").map_err(blkio_err("capacity"))?;
        let max_queues = blkio
            .get_i32("max-queues")
            .map_err(blkio_err("max-queues"))?;
        if spec.queues > max_queues as usize {
            return Err(format!(
                "the device offers {max_queues} queue(s), --queues asks for {}",
                spec.queues
            ));
        }
        let queue_size = spec.iodepth.next_power_of_two().max(256);
        blkio
            .set_i32("num-queues", 0)
            .and_then(|_| blkio.set_i32("num-poll-queues", spec.queues as i32))
            .and_then(|_| blkio.set_i32("queue-size", queue_size as i32))
            .map_err(blkio_err("queue setup"))?;
        let started = blkio.start().map_err(blkio_err("start"))?;
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(blkio_err("mem-region-alignment"))? as usize;
        let len = (spec.iodepth * spec.bs * spec.queues).div_ceil(align) * align;
        let region = blkio
            .alloc_mem_region(len)
            .map_err(blkio_err("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(blkio_err("map_mem_region"))?;
        // Writes carry a non-zero pattern, so a target that drops them is not flattered.
        // SAFETY: the region is `len` bytes of our own mapping.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xa5, len) };
        let queues = BlkioQueues {
            queues: started.poll_queues,
            bufs: region.addr as *mut u8,
            bs: spec.bs,
            iodepth: spec.iodepth,
            completions: (0..spec.iodepth).map(|_| MaybeUninit::uninit()).collect(),
            _blkio: blkio,
        };
        Ok((queues, capacity))
    }
}

impl Queues for BlkioQueues {
    fn submit(&mut self, queue: usize, slot: usize, write: bool, offset: u64) {
        // SAFETY: slot < iodepth and queue < queues: inside the mapped region.
        let buf = unsafe { self.bufs.add((queue * self.iodepth + slot) * self.bs) };
        let q = &mut self.queues[queue];
        if write {
            q.write(offset, buf, self.bs, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, self.bs, slot, ReqFlags::empty());
        }
    }

    fn commit(&mut self, _queue: usize) -> Result<(), String> {
        // do_io publishes and kicks; the next reap calls it.
        Ok(())
    }

    fn reap(&mut self, queue: usize, done: &mut [(usize, bool)]) -> Result<usize, String> {
        let n = self.queues[queue]
            .do_io(&mut self.completions, 0, None, None)
            .map_err(blkio_err("do_io"))?;
        for (i, d) in done.iter_mut().enumerate().take(n) {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { self.completions[i].assume_init_ref() };
            *d = (c.user_data, c.ret == 0);
        }
        Ok(n)
    }
}
