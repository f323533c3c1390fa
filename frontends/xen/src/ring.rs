//! The back end's side of one blkif ring, served by a reactor like a virtqueue.
//!
//! Each request is copied out of the shared ring before anything in it is looked at; its
//! segments become iovecs into granted pages only after every one of them checked out (a
//! range inside its page, a page the domain granted). What cannot be served is answered
//! BLKIF_RSP_ERROR or EOPNOTSUPP; only a producer index that runs past the ring stops it.

use crate::abi::{self, op, Abi, Body, Segment};
use crate::platform::{EventChannel, GrantSpace, RingPages};
use pollblk_engine::blk::{self, RequestKind};
use pollblk_engine::request::Status;
use pollblk_engine::ring::{Notified, Popped, Ring};
use pollblk_engine::virtqueue::{Broken, Segments};
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// Discard segments one blkif discard may become (each covers at most MAX_DWZ_SECTORS).
const DISCARD_SEGMENTS: usize = blk::MAX_DWZ_SEG as usize;

/// What the ring keeps for a request in flight.
#[derive(Clone, Copy, Default)]
struct Pending {
    id: u64,
    operation: u8,
}

/// One blkif ring.
pub struct BlkifRing {
    pages: Box<dyn RingPages>,
    sring: *mut u8,
    abi: Abi,
    /// Entries (a power of two).
    size: u32,
    req_cons: u32,
    /// req_prod as last read: requests up to it can be taken without reading it again.
    seen_prod: u32,
    rsp_prod_pvt: u32,
    grants: Box<dyn GrantSpace>,
    events: Box<dyn EventChannel>,
    pending: Box<[Pending]>,
    /// Per slot, the virtio-blk discard segments a blkif discard is handed on as.
    discard: Box<[[u8; DISCARD_SEGMENTS * blk::DWZ_SEGMENT_SIZE]]>,
    /// Segments of an indirect request, copied out of its pages.
    indirect: Box<[Segment; abi::MAX_INDIRECT_SEGMENTS]>,
}

// SAFETY: `sring` points into `pages`, owned by the ring; the ring is used by one thread at a
// time (the reactor that owns it).
unsafe impl Send for BlkifRing {}

impl BlkifRing {
    /// A ring over mapped `pages` in layout `abi`, starting where the shared indices are.
    pub fn new(
        pages: Box<dyn RingPages>,
        abi: Abi,
        grants: Box<dyn GrantSpace>,
        events: Box<dyn EventChannel>,
    ) -> BlkifRing {
        assert!(pages.bytes() >= abi::PAGE_SIZE && pages.bytes().is_multiple_of(abi::PAGE_SIZE));
        let size = abi.ring_entries(pages.bytes() / abi::PAGE_SIZE);
        let sring = pages.as_ptr();
        let mut ring = BlkifRing {
            pages,
            sring,
            abi,
            size,
            req_cons: 0,
            seen_prod: 0,
            rsp_prod_pvt: 0,
            grants,
            events,
            pending: vec![Pending::default(); size as usize].into_boxed_slice(),
            discard: vec![[0; DISCARD_SEGMENTS * blk::DWZ_SEGMENT_SIZE]; size as usize]
                .into_boxed_slice(),
            indirect: Box::new([Segment::default(); abi::MAX_INDIRECT_SEGMENTS]),
        };
        // A new ring: the front end initialised it (SHARED_RING_INIT) before connecting, so
        // responses continue from its rsp_prod and requests from there too.
        let start = ring.index(8).load(Ordering::Acquire);
        ring.req_cons = start;
        ring.seen_prod = start;
        ring.rsp_prod_pvt = start;
        ring
    }

    /// Entries of the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The shared index at byte `offset` of the header (req_prod 0, req_event 4, rsp_prod 8,
    /// rsp_event 12).
    fn index(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset <= 12 && self.pages.bytes() >= abi::RING_HEADER);
        // SAFETY: the header lies in the mapped pages; offsets are 4-aligned (pages are).
        unsafe { &*(self.sring.add(offset) as *const AtomicU32) }
    }

    fn entry(&self, index: u32) -> *mut u8 {
        let slot = (index & (self.size - 1)) as usize;
        // SAFETY: RING_HEADER + size * entry_size <= pages.bytes() (ring_entries).
        unsafe {
            self.sring
                .add(abi::RING_HEADER + slot * self.abi.entry_size())
        }
    }

    /// Copies the request at `index` out of the shared ring.
    fn copy_request(&self, index: u32) -> [u8; abi::MAX_ENTRY] {
        let mut copy = [0u8; abi::MAX_ENTRY];
        // SAFETY: the entry lies in the mapped ring; the front end may write it concurrently,
        // so it is read once, with volatile reads, into our own copy.
        let src = self.entry(index);
        for (i, byte) in copy[..self.abi.entry_size()].iter_mut().enumerate() {
            // SAFETY: i < entry_size: inside the entry (see above).
            *byte = unsafe { std::ptr::read_volatile(src.add(i)) };
        }
        copy
    }

    /// Adds the buffer of `seg` to `segs`; Err if its range or page is bad.
    fn push_segment(
        &mut self,
        seg: Segment,
        write_to_guest: bool,
        segs: &mut Segments,
    ) -> Result<(), Status> {
        let (start, len) = seg.byte_range().ok_or(Status::IoError)?;
        let page = self.grants.page(seg.gref).ok_or(Status::IoError)?;
        // SAFETY: start + len <= PAGE_SIZE (byte_range): inside the granted page.
        segs.push(unsafe { page.add(start) }, len as u32, write_to_guest);
        Ok(())
    }

    /// Turns a copied request into the engine's request, its buffers into `segs`. What is
    /// refused, and with which status, follows xen-blkback (docs/xen.md's table).
    fn decode(
        &mut self,
        slot: u32,
        req: &abi::Request,
        segs: &mut Segments,
    ) -> Result<blk::Request, Status> {
        match (req.operation, req.body) {
            (op::READ | op::WRITE | op::FLUSH_DISKCACHE, Body::Direct { count, segs: list }) => {
                self.decode_direct(
                    req,
                    &list[..usize::from(count).min(list.len())],
                    count,
                    segs,
                )
            }
            (
                op::INDIRECT,
                Body::Indirect {
                    op: inner,
                    count,
                    pages,
                },
            ) => self.decode_indirect(req, inner, count, &pages, segs),
            (op::DISCARD, Body::Discard { nr_sectors, .. }) => {
                self.decode_discard(slot, req.sector, nr_sectors, segs)
            }
            // Barriers are not offered (no feature-barrier): blkif.h's answer is EOPNOTSUPP,
            // as for any operation the back end does not know (blkback's dispatch_other_io).
            _ => Err(Status::Unsupported),
        }
    }

    /// READ, WRITE and FLUSH_DISKCACHE with up to 11 segments in the request.
    fn decode_direct(
        &mut self,
        req: &abi::Request,
        list: &[Segment],
        count: u8,
        segs: &mut Segments,
    ) -> Result<blk::Request, Status> {
        if usize::from(count) > abi::MAX_DIRECT_SEGMENTS {
            return Err(Status::IoError);
        }
        if req.operation == op::FLUSH_DISKCACHE && count == 0 {
            return data_request(RequestKind::Flush, req.sector, segs, false);
        }
        if count == 0 {
            return Err(Status::IoError);
        }
        let read = req.operation == op::READ;
        for &seg in list {
            self.push_segment(seg, read, segs)?;
        }
        // FLUSH_DISKCACHE with data is Linux blkfront's preflush + FUA write.
        let fua = req.operation == op::FLUSH_DISKCACHE;
        data_request(rw_kind(read), req.sector, segs, fua)
    }

    /// INDIRECT: READ or WRITE with up to 256 segments in granted pages, copied out once.
    fn decode_indirect(
        &mut self,
        req: &abi::Request,
        inner: u8,
        count: u16,
        pages: &[u32],
        segs: &mut Segments,
    ) -> Result<blk::Request, Status> {
        let count = usize::from(count);
        // blkback answers an indirect request of any other operation with ERROR ("Invalid
        // indirect operation"), not EOPNOTSUPP.
        if !matches!(inner, op::READ | op::WRITE) {
            return Err(Status::IoError);
        }
        if count == 0 || count > abi::MAX_INDIRECT_SEGMENTS {
            return Err(Status::IoError);
        }
        let used_pages = count.div_ceil(abi::SEGMENTS_PER_INDIRECT_PAGE);
        for (p, &gref) in pages[..used_pages].iter().enumerate() {
            let page = self.grants.page(gref).ok_or(Status::IoError)?;
            let first = p * abi::SEGMENTS_PER_INDIRECT_PAGE;
            let n = (count - first).min(abi::SEGMENTS_PER_INDIRECT_PAGE);
            for i in 0..n {
                let mut raw = [0u8; 8];
                for (k, byte) in raw.iter_mut().enumerate() {
                    // SAFETY: i * 8 + k < PAGE_SIZE: inside the granted page, which the front
                    // end may change: copied once, volatile.
                    *byte = unsafe { std::ptr::read_volatile(page.add(i * 8 + k)) };
                }
                self.indirect[first + i] = Segment::decode(&raw);
            }
        }
        let read = inner == op::READ;
        for i in 0..count {
            self.push_segment(self.indirect[i], read, segs)?;
        }
        data_request(rw_kind(read), req.sector, segs, false)
    }

    /// DISCARD of `nr_sectors` at `sector`, handed on as virtio-blk discard segments (each
    /// at most MAX_DWZ_SECTORS). Zero sectors is one empty segment: done, OKAY, as current
    /// Linux back ends answer.
    fn decode_discard(
        &mut self,
        slot: u32,
        sector: u64,
        nr_sectors: u64,
        segs: &mut Segments,
    ) -> Result<blk::Request, Status> {
        // The secure flag is ignored: discard-secure is not offered (blkif.h).
        let raw = &mut self.discard[slot as usize];
        let max = u64::from(blk::MAX_DWZ_SECTORS);
        let count = nr_sectors.div_ceil(max).max(1) as usize;
        if count > DISCARD_SEGMENTS {
            return Err(Status::IoError);
        }
        let mut sector = sector;
        let mut left = nr_sectors;
        for chunk in raw.chunks_exact_mut(blk::DWZ_SEGMENT_SIZE).take(count) {
            let n = left.min(max);
            chunk[0..8].copy_from_slice(&sector.to_le_bytes());
            chunk[8..12].copy_from_slice(&(n as u32).to_le_bytes());
            chunk[12..16].copy_from_slice(&0u32.to_le_bytes());
            sector = sector.checked_add(n).ok_or(Status::IoError)?;
            left -= n;
        }
        let len = count * blk::DWZ_SEGMENT_SIZE;
        segs.push(raw.as_mut_ptr(), len as u32, false);
        Ok(blk::Request {
            kind: RequestKind::Discard,
            sector: 0,
            data: 0..1,
            data_len: len as u64,
            fua: false,
        })
    }
}

fn rw_kind(read: bool) -> RequestKind {
    if read {
        RequestKind::In
    } else {
        RequestKind::Out
    }
}

/// A request over every buffer in `segs`.
fn data_request(
    kind: RequestKind,
    sector: u64,
    segs: &Segments,
    fua: bool,
) -> Result<blk::Request, Status> {
    if segs.fault().is_some() {
        return Err(Status::IoError);
    }
    let data_len = segs.iovecs().iter().map(|v| v.iov_len as u64).sum();
    Ok(blk::Request {
        kind,
        sector,
        data: 0..segs.iovecs().len(),
        data_len,
        fua,
    })
}

impl Ring for BlkifRing {
    fn slots(&self) -> usize {
        self.size as usize
    }

    fn max_segments(&self) -> usize {
        abi::MAX_INDIRECT_SEGMENTS
    }

    fn pop(
        &mut self,
        slot: u32,
        segs: &mut Segments,
        request: &mut blk::Request,
    ) -> Result<Popped, Broken> {
        if self.req_cons == self.seen_prod {
            let prod = self.index(0).load(Ordering::Acquire);
            // RING_REQUEST_PROD_OVERFLOW: requests taken but not answered still own their
            // entries until their responses are written, so the bound is the responses.
            if prod.wrapping_sub(self.rsp_prod_pvt) > self.size {
                return Err(Broken::ProducerOverrun {
                    produced: prod,
                    answered: self.rsp_prod_pvt,
                });
            }
            self.seen_prod = prod;
            if prod == self.req_cons {
                return Ok(Popped::Nothing);
            }
        }
        let copy = self.copy_request(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        let req = abi::decode(self.abi, &copy);
        // The answer carries the operation the front end checks it against: an indirect
        // request's inner one (blkfront's blkif_interrupt; blkback answers so too).
        let operation = match req.body {
            Body::Indirect { op: inner, .. } => inner,
            _ => req.operation,
        };
        self.pending[slot as usize] = Pending {
            id: req.id,
            operation,
        };
        segs.clear();
        match self.decode(slot, &req, segs) {
            Ok(decoded) => {
                *request = decoded;
                Ok(Popped::Request)
            }
            Err(code) => {
                tracing::debug!(
                    operation = req.operation,
                    id = req.id,
                    ?code,
                    "blkif request refused"
                );
                Ok(Popped::Refused(code))
            }
        }
    }

    fn complete(&mut self, slot: u32, _: &Segments, code: Status, _: u32) {
        let Pending { id, operation } = self.pending[slot as usize];
        let status = match code {
            Status::Ok => abi::RSP_OKAY,
            Status::Unsupported => abi::RSP_EOPNOTSUPP,
            _ => abi::RSP_ERROR,
        };
        let bytes = abi::encode_response(id, operation, status);
        let dst = self.entry(self.rsp_prod_pvt);
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: the entry lies in the mapped ring (12 bytes <= entry_size).
            unsafe { std::ptr::write_volatile(dst.add(i), b) };
        }
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    fn publish(&mut self) -> Notified {
        // RING_PUSH_RESPONSES_AND_CHECK_NOTIFY.
        let old = self.index(8).load(Ordering::Relaxed);
        let new = self.rsp_prod_pvt;
        self.index(8).store(new, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = self.index(12).load(Ordering::Relaxed);
        if new.wrapping_sub(event) < new.wrapping_sub(old) {
            self.events.notify();
            Notified::Sent
        } else {
            Notified::Suppressed
        }
    }

    fn enable_notification(&mut self) -> bool {
        // RING_FINAL_CHECK_FOR_REQUESTS: ask for a notification at the next request, then
        // look again (one may have come before the front end saw req_event).
        self.index(4)
            .store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.index(0).load(Ordering::Acquire) != self.req_cons
    }

    fn disable_notification(&mut self) {
        // req_event stays where it is: once req_prod passed it the front end does not
        // notify again (until the index wraps 2^32 requests later: one spurious kick).
    }

    fn kick_fd(&self) -> RawFd {
        self.events.fd()
    }

    fn ack_kick(&mut self) -> u64 {
        self.events.ack()
    }

    fn detach(&mut self) -> u16 {
        // The ring's position lives in its shared indexes.
        0
    }
}

#[cfg(test)]
mod tests {
    //! Each malformed request the ring must refuse, through the real decode path, with
    //! heap pages standing in for grants.
    use super::*;
    use crate::platform::RingPages;
    use vmm_sys_util::eventfd::EventFd;

    /// Page-aligned heap pages: the ring's, or a domain's granted ones.
    struct Pages(Vec<[u64; 512]>);

    impl Pages {
        fn new(n: usize) -> Pages {
            Pages(vec![[0u64; 512]; n])
        }
        fn ptr(&mut self, page: usize) -> *mut u8 {
            self.0[page].as_mut_ptr().cast()
        }
    }

    struct TestRing(Pages);
    impl RingPages for TestRing {
        fn as_ptr(&self) -> *mut u8 {
            self.0 .0.as_ptr() as *mut u8
        }
        fn bytes(&self) -> usize {
            self.0 .0.len() * abi::PAGE_SIZE
        }
    }

    struct TestGrants(Pages);
    impl GrantSpace for TestGrants {
        fn page(&mut self, gref: u32) -> Option<*mut u8> {
            ((gref as usize) < self.0 .0.len()).then(|| self.0.ptr(gref as usize))
        }
        fn map_ring(&mut self, _: &[u32]) -> std::io::Result<Box<dyn RingPages>> {
            unreachable!()
        }
    }

    struct TestChannel(EventFd);
    impl EventChannel for TestChannel {
        fn fd(&self) -> RawFd {
            use std::os::fd::AsRawFd;
            self.0.as_raw_fd()
        }
        fn ack(&mut self) -> u64 {
            0
        }
        fn notify(&self) {}
    }

    /// A one-page ring of `abi` over 4 granted pages.
    fn ring(abi: Abi) -> BlkifRing {
        BlkifRing::new(
            Box::new(TestRing(Pages::new(1))),
            abi,
            Box::new(TestGrants(Pages::new(4))),
            Box::new(TestChannel(EventFd::new(0).unwrap())),
        )
    }

    /// Puts raw request bytes at the next request slot and publishes them.
    fn push(ring: &mut BlkifRing, bytes: &[u8]) {
        let prod = ring.index(0).load(Ordering::Relaxed);
        let entry = ring.entry(prod);
        // SAFETY: the test's ring entry, entry_size bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), entry, bytes.len()) };
        ring.index(0).store(prod + 1, Ordering::Release);
    }

    /// An x86_64 read/write request with `segs` (gref, first, last).
    fn rw(op: u8, sector: u64, segs: &[(u32, u8, u8)]) -> Vec<u8> {
        let mut b = vec![0u8; 112];
        b[0] = op;
        b[1] = segs.len() as u8;
        b[8..16].copy_from_slice(&77u64.to_le_bytes());
        b[16..24].copy_from_slice(&sector.to_le_bytes());
        for (i, &(gref, first, last)) in segs.iter().enumerate() {
            let at = 24 + 8 * i;
            b[at..at + 4].copy_from_slice(&gref.to_le_bytes());
            b[at + 4] = first;
            b[at + 5] = last;
        }
        b
    }

    /// A direct read whose nr_segments (12) is more than a request holds (11).
    fn too_many_segments() -> Vec<u8> {
        let mut b = rw(op::READ, 0, &[(1, 0, 7); abi::MAX_DIRECT_SEGMENTS]);
        b[1] = abi::MAX_DIRECT_SEGMENTS as u8 + 1;
        b
    }

    /// Pops one request from a ring that must hold one: the request, or the status it is
    /// refused with.
    fn take(ring: &mut BlkifRing, slot: u32, segs: &mut Segments) -> Result<blk::Request, Status> {
        let mut request = blk::Request::default();
        match ring.pop(slot, segs, &mut request).expect("ring intact") {
            Popped::Request => Ok(request),
            Popped::Refused(status) => Err(status),
            Popped::Nothing => panic!("no request in the ring"),
        }
    }

    fn pop(ring: &mut BlkifRing) -> Result<blk::Request, Status> {
        let mut segs = Segments::with_capacity(abi::MAX_INDIRECT_SEGMENTS);
        take(ring, 0, &mut segs)
    }

    #[test]
    fn a_good_read_maps_its_segments() {
        let mut r = ring(Abi::X86_64);
        push(&mut r, &rw(op::READ, 8, &[(1, 0, 7), (2, 2, 3)]));
        let mut segs = Segments::with_capacity(16);
        let req = take(&mut r, 0, &mut segs).unwrap();
        assert_eq!(
            (req.kind, req.sector, req.data_len),
            (RequestKind::In, 8, 4096 + 1024)
        );
        assert_eq!(segs.iovecs()[1].iov_len, 1024);
        assert_eq!(
            segs.readable_count(),
            0,
            "a read writes into the guest's pages"
        );
    }

    #[test]
    fn malformed_requests_fail_alone() {
        let mut r = ring(Abi::X86_64);
        let cases: &[(&str, Vec<u8>, Status)] = &[
            (
                "first_sect > last_sect",
                rw(op::READ, 0, &[(1, 5, 2)]),
                Status::IoError,
            ),
            (
                "segment past its page",
                rw(op::READ, 0, &[(1, 0, 8)]),
                Status::IoError,
            ),
            (
                "unknown grant",
                rw(op::WRITE, 0, &[(4, 0, 7)]),
                Status::IoError,
            ),
            ("no segments", rw(op::READ, 0, &[]), Status::IoError),
            ("12 segments", too_many_segments(), Status::IoError),
            (
                "barrier",
                rw(op::WRITE_BARRIER, 0, &[(1, 0, 7)]),
                Status::Unsupported,
            ),
            (
                "unknown operation",
                rw(4, 0, &[(1, 0, 7)]),
                Status::Unsupported,
            ),
        ];
        for (what, bytes, expected) in cases {
            push(&mut r, bytes);
            assert_eq!(pop(&mut r).map(|_| ()), Err(*expected), "{what}");
        }
        // Indirect: more segments than offered, and an unknown indirect page.
        let mut b = vec![0u8; 112];
        b[0] = op::INDIRECT;
        b[1] = op::READ;
        b[2..4].copy_from_slice(&257u16.to_le_bytes());
        push(&mut r, &b);
        assert_eq!(
            pop(&mut r).map(|_| ()),
            Err(Status::IoError),
            "257 indirect segments"
        );
        b[2..4].copy_from_slice(&1u16.to_le_bytes());
        b[28..32].copy_from_slice(&9u32.to_le_bytes());
        push(&mut r, &b);
        assert_eq!(
            pop(&mut r).map(|_| ()),
            Err(Status::IoError),
            "unknown indirect page"
        );
        // The ring still serves a good request.
        push(&mut r, &rw(op::WRITE, 0, &[(1, 0, 7)]));
        assert_eq!(pop(&mut r).unwrap().kind, RequestKind::Out);
    }

    #[test]
    fn a_producer_past_the_ring_breaks_it() {
        let mut r = ring(Abi::X86_64);
        r.index(0).store(r.size() + 1, Ordering::Release);
        let mut segs = Segments::with_capacity(16);
        assert!(matches!(
            r.pop(0, &mut segs, &mut blk::Request::default()),
            Err(Broken::ProducerOverrun { .. })
        ));
    }

    #[test]
    fn responses_follow_rsp_event() {
        let mut r = ring(Abi::X86_32);
        let mut b = vec![0u8; 108];
        b[0] = op::FLUSH_DISKCACHE;
        b[4..12].copy_from_slice(&0xabcdu64.to_le_bytes());
        push(&mut r, &b);
        assert_eq!(pop(&mut r).unwrap().kind, RequestKind::Flush);
        // The front end asked to hear about response 1 (rsp_event = rsp_cons + 1).
        r.index(12).store(1, Ordering::Relaxed);
        let segs = Segments::with_capacity(1);
        r.complete(0, &segs, Status::Ok, 0);
        assert_eq!(r.publish(), Notified::Sent, "rsp_event 1 was passed");
        let entry = r.entry(0);
        // SAFETY: the test ring's first entry.
        let id = unsafe { std::ptr::read_unaligned(entry as *const u64) };
        assert_eq!(id, 0xabcd, "the id comes back (x86_32 layout decoded)");
        r.complete(0, &segs, Status::IoError, 0);
        assert_eq!(
            r.publish(),
            Notified::Suppressed,
            "rsp_event not moved: no notification"
        );
        // SAFETY: the second entry's status field.
        let status = unsafe { std::ptr::read_unaligned(r.entry(1).add(10) as *const i16) };
        assert_eq!(status, abi::RSP_ERROR);
    }

    /// An INDIRECT request of `abi` with inner operation `inner`, `count` segments listed
    /// in granted page `page` (all zeroes: gref 0, sectors 0 to 0).
    fn indirect(abi: Abi, inner: u8, count: u16, page: u32) -> Vec<u8> {
        let mut b = vec![0u8; abi.entry_size()];
        b[0] = op::INDIRECT;
        b[1] = inner;
        b[2..4].copy_from_slice(&count.to_le_bytes());
        let id_at = abi.id_offset();
        b[id_at..id_at + 8].copy_from_slice(&0x5eedu64.to_le_bytes());
        // Indirect page grefs follow id, sector, handle and padding (blkif.h).
        let grefs = id_at + 16 + 4;
        b[grefs..grefs + 4].copy_from_slice(&page.to_le_bytes());
        b
    }

    /// The operation and status of response `n` (0 is the first the ring wrote).
    fn response(ring: &BlkifRing, n: u32) -> (u8, i16) {
        let entry = ring.entry(n);
        // SAFETY: the test ring's entry n: 12 bytes of response.
        unsafe {
            (
                std::ptr::read(entry.add(8)),
                std::ptr::read_unaligned(entry.add(10) as *const i16),
            )
        }
    }

    /// Pops one request into slot 0 and answers it with what the engine made of it.
    fn answer(ring: &mut BlkifRing) -> Result<blk::Request, Status> {
        let mut segs = Segments::with_capacity(abi::MAX_INDIRECT_SEGMENTS);
        let popped = take(ring, 0, &mut segs);
        let status = popped.as_ref().map(|_| Status::Ok).unwrap_or_else(|s| *s);
        ring.complete(0, &segs, status, 0);
        popped
    }

    #[test]
    fn indirect_answers_carry_the_inner_operation() {
        // Linux blkfront fails the disk when a response's operation is not the request's
        // (for INDIRECT, its indirect_op): on success and on every error.
        for abi in [Abi::X86_64, Abi::X86_32] {
            let mut r = ring(abi);
            push(&mut r, &indirect(abi, op::READ, 1, 2));
            assert_eq!(answer(&mut r).unwrap().kind, RequestKind::In, "{abi:?}");
            push(&mut r, &indirect(abi, op::WRITE, 1, 2));
            assert_eq!(answer(&mut r).unwrap().kind, RequestKind::Out, "{abi:?}");
            push(&mut r, &indirect(abi, op::WRITE, 257, 2));
            assert_eq!(answer(&mut r), Err(Status::IoError), "{abi:?}");
            push(&mut r, &indirect(abi, op::READ, 1, 9));
            assert_eq!(
                answer(&mut r),
                Err(Status::IoError),
                "{abi:?}: unknown page"
            );
            let expected = [
                (op::READ, abi::RSP_OKAY),
                (op::WRITE, abi::RSP_OKAY),
                (op::WRITE, abi::RSP_ERROR),
                (op::READ, abi::RSP_ERROR),
            ];
            for (n, want) in expected.into_iter().enumerate() {
                assert_eq!(response(&r, n as u32), want, "{abi:?} response {n}");
            }
        }
    }

    #[test]
    fn an_indirect_flush_or_discard_is_an_error_as_blkback_answers() {
        let mut r = ring(Abi::X86_64);
        for (n, inner) in [op::FLUSH_DISKCACHE, op::DISCARD].into_iter().enumerate() {
            push(&mut r, &indirect(Abi::X86_64, inner, 1, 2));
            assert_eq!(answer(&mut r), Err(Status::IoError));
            assert_eq!(response(&r, n as u32), (inner, abi::RSP_ERROR));
        }
    }

    #[test]
    fn a_discard_of_no_sectors_succeeds() {
        let mut r = ring(Abi::X86_64);
        let mut b = vec![0u8; 112];
        b[0] = op::DISCARD;
        b[16..24].copy_from_slice(&8u64.to_le_bytes());
        push(&mut r, &b);
        let req = pop(&mut r).expect("a zero-sector discard is done, not refused");
        assert_eq!((req.kind, req.data_len), (RequestKind::Discard, 16));
    }

    #[test]
    fn a_producer_past_the_unanswered_requests_breaks_it() {
        // One request taken and not answered still owns its entry: a producer a whole ring
        // past it has overwritten it (RING_REQUEST_PROD_OVERFLOW is against rsp_prod_pvt).
        let mut r = ring(Abi::X86_64);
        push(&mut r, &rw(op::READ, 0, &[(1, 0, 7)]));
        let mut segs = Segments::with_capacity(16);
        take(&mut r, 0, &mut segs).unwrap();
        r.index(0).store(r.size() + 1, Ordering::Release);
        assert!(matches!(
            r.pop(1, &mut segs, &mut blk::Request::default()),
            Err(Broken::ProducerOverrun { .. })
        ));
    }
}
