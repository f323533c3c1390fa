//! Xen blkif rings from a hostile front end: arbitrary ring contents (indices, requests of
//! either ABI, indirect pages) over granted pages, through pollblk-xen's BlkifRing as the
//! queue drives it through the engine's `ring::Ring` trait (pop, complete, publish,
//! notification checks).
//!
//! Invariants: every buffer handed to the engine lies inside one granted page (or is the
//! ring's own discard scratch), a request never carries more buffers than its slot holds,
//! the byte count matches the buffers, and no more requests come out than the ring holds
//! before the producer index is read again.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pollblk_engine::request::Status;
use pollblk_engine::ring::{Popped, Ring as _};
use pollblk_engine::virtqueue::Segments;
use pollblk_xen::abi::{Abi, PAGE_SIZE};
use pollblk_xen::platform::{EventChannel, GrantSpace, RingPages};
use pollblk_xen::ring::BlkifRing;
use std::os::fd::RawFd;

#[derive(Arbitrary, Debug)]
struct Input {
    x86_32: bool,
    order: u8,
    /// Ring bytes (header then entries), repeated to fill the ring pages.
    ring: Vec<u8>,
    /// Granted pages (1 to 8), filled from these bytes (indirect segment tables live here).
    granted: u8,
    pages: Vec<u8>,
    /// What the queue does between pops: answer one, publish, re-enable.
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Pop,
    Respond(u8),
    Publish,
    EnableNotification,
}

struct Pages(Vec<[u64; 512]>);

impl Pages {
    fn filled(n: usize, bytes: &[u8]) -> Pages {
        let mut p = Pages(vec![[0u64; 512]; n]);
        if !bytes.is_empty() {
            // SAFETY: the pages are n * PAGE_SIZE bytes.
            let all = unsafe {
                std::slice::from_raw_parts_mut(p.0.as_mut_ptr().cast::<u8>(), n * PAGE_SIZE)
            };
            for (i, b) in all.iter_mut().enumerate() {
                *b = bytes[i % bytes.len()];
            }
        }
        p
    }
    fn range(&self) -> (usize, usize) {
        (self.0.as_ptr() as usize, self.0.len() * PAGE_SIZE)
    }
}

struct Ring(Pages);
impl RingPages for Ring {
    fn as_ptr(&self) -> *mut u8 {
        self.0 .0.as_ptr() as *mut u8
    }
    fn bytes(&self) -> usize {
        self.0 .0.len() * PAGE_SIZE
    }
}

struct Grants(*mut u8, usize);
// SAFETY: the test's pages outlive the ring; one thread.
unsafe impl Send for Grants {}
impl GrantSpace for Grants {
    fn page(&mut self, gref: u32) -> Option<*mut u8> {
        // SAFETY: gref < pages: inside the granted pages.
        ((gref as usize) < self.1).then(|| unsafe { self.0.add(gref as usize * PAGE_SIZE) })
    }
    fn map_ring(&mut self, _: &[u32]) -> std::io::Result<Box<dyn RingPages>> {
        unreachable!()
    }
}

struct Channel;
impl EventChannel for Channel {
    fn fd(&self) -> RawFd {
        -1
    }
    fn ack(&mut self) -> u64 {
        0
    }
    fn notify(&self) {}
}

fuzz_target!(|input: Input| {
    let abi = if input.x86_32 {
        Abi::X86_32
    } else {
        Abi::X86_64
    };
    let ring_pages = 1usize << (input.order % 4);
    let granted = usize::from(input.granted % 8) + 1;
    let mut pages = Pages::filled(granted, &input.pages);
    let (gstart, glen) = pages.range();
    let grants = Grants(pages.0.as_mut_ptr().cast(), granted);
    let ring_mem = Pages::filled(ring_pages, &input.ring);
    let mut ring = BlkifRing::new(
        Box::new(Ring(ring_mem)),
        abi,
        Box::new(grants),
        Box::new(Channel),
    );
    let size = ring.slots();
    let mut segs: Vec<Segments> = (0..size)
        .map(|_| Segments::with_capacity(ring.max_segments()))
        .collect();
    let mut in_flight: Vec<u32> = Vec::new();
    let mut free: Vec<u32> = (0..size as u32).rev().collect();
    for step in input.steps.iter().take(4 * size) {
        match step {
            Step::Pop => {
                let Some(&slot) = free.last() else { continue };
                let s = &mut segs[slot as usize];
                let mut req = pollblk_engine::blk::Request::default();
                match ring.pop(slot, s, &mut req) {
                    Err(_) => return, // the ring is broken: the reactor stops it
                    Ok(Popped::Nothing) => {}
                    Ok(popped) => {
                        free.pop();
                        in_flight.push(slot);
                        if popped == Popped::Request {
                            assert!(s.iovecs().len() <= ring.max_segments());
                            let sum: u64 = s.iovecs()[req.data.clone()]
                                .iter()
                                .map(|v| v.iov_len as u64)
                                .sum();
                            assert_eq!(sum, req.data_len);
                            for v in s.iovecs() {
                                let p = v.iov_base as usize;
                                let in_grants = p >= gstart && p + v.iov_len <= gstart + glen;
                                let in_one_page =
                                    p / PAGE_SIZE == (p + v.iov_len.max(1) - 1) / PAGE_SIZE;
                                // A discard's segments live in the ring's own scratch instead.
                                let scratch = req.kind == pollblk_engine::blk::RequestKind::Discard;
                                assert!(
                                    scratch || (in_grants && in_one_page),
                                    "buffer outside the granted pages"
                                );
                            }
                        }
                    }
                }
            }
            Step::Respond(n) => {
                if !in_flight.is_empty() {
                    let slot = in_flight.remove(usize::from(*n) % in_flight.len());
                    ring.complete(slot, &segs[slot as usize], Status::Ok, 0);
                    free.push(slot);
                }
            }
            Step::Publish => {
                let _ = ring.publish();
            }
            Step::EnableNotification => {
                let _ = ring.enable_notification();
                ring.disable_notification();
            }
        }
    }
    drop(ring);
    drop(pages);
});
