//! What a decoded request means for a volume, the same for every transport: the rules that
//! turn a [`Request`] (virtio-blk, blkif) into volume operations, and the state one request
//! keeps while they run.
//!
//! Here and nowhere else: range and read-only checks, discard / write-zeroes / provision
//! segments (all checked before any starts), flush, preflush and FUA, bounce buffers for
//! buffers O_DIRECT cannot use, how an operation's result counts, and the typed [`Status`] a
//! request ends with. A request's operations are a [`Plan`] the volume layer walks one
//! operation at a time, so it can stop at any operation ("not now") and go on later.

use crate::backend::{BackendInfo, IoOp};
use crate::blk::{self, DwzSegment, Request, RequestKind};
use crate::device::BlkDevice;
use crate::stats::sets::Class;
use crate::virtqueue::Segments;

/// Largest request data: what seg_max buffers of size_max can hold.
pub const MAX_REQUEST_BYTES: u64 = blk::SEG_MAX as u64 * blk::SIZE_MAX as u64;
/// Most volume operations one request may become (one per discard segment).
pub const MAX_OPS_PER_REQUEST: usize = blk::MAX_DWZ_SEG as usize;

/// How a request ended, whatever its transport's wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The request failed (bad range, read-only disk, malformed, I/O error).
    IoError,
    /// The request type, or a flag of it, is not supported.
    Unsupported,
}

impl Status {
    /// The virtio-blk status byte.
    pub const fn virtio(self) -> u8 {
        match self {
            Status::Ok => blk::status::OK,
            Status::IoError => blk::status::IOERR,
            Status::Unsupported => blk::status::UNSUPP,
        }
    }
}

/// A buffer aligned for O_DIRECT, for requests whose guest buffers are not.
struct BounceBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl BounceBuf {
    fn new(len: usize, align: usize) -> BounceBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(align), align)
            .expect("alignment is a power of two");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        BounceBuf { ptr, layout }
    }
}

impl Drop for BounceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// What a discard / write-zeroes / provision segment becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RangeKind {
    Discard,
    WriteZeroes,
    Provision,
}

/// A request's volume operations, in the order they are started.
enum Plan {
    /// Nothing to start: the request is done (or failed) once prepared.
    Nothing,
    /// One operation; a preflush first makes every earlier completed write durable.
    One { op: IoOp, preflush: bool },
    /// One operation per non-empty segment (the slot's first `count` ranges).
    Ranges { kind: RangeKind, count: u8 },
}

/// One request in flight: its buffers, its plan, and what it has come to. Owned by its
/// queue, made when the queue is attached and reused.
pub struct RequestSlot {
    /// The request's buffers, as the ring decoded them.
    pub segs: Segments,
    pub status: Status,
    /// Data bytes written into the guest's buffers when the request succeeds.
    pub written: u32,
    /// What the request counts as, and its sectors when it succeeds.
    pub class: Class,
    pub sectors: u64,
    /// Clock time of the reactor iteration that took the request.
    pub start: u64,
    plan: Plan,
    /// The segments of a `Plan::Ranges`, checked and without empty ones (boxed: they are
    /// cold, and the slot's hot fields stay within a few cache lines).
    ranges: Box<[DwzSegment; blk::MAX_DWZ_SEG as usize]>,
    /// Index of the next operation of the plan to start, and how many the plan has.
    next_op: u8,
    op_count: u8,
    /// Operations started and not completed.
    pub(crate) ops_pending: u32,
    /// Expected byte count of the read or write (short transfers are errors).
    expected: u64,
    /// A preflush is in flight with the write: its result (0) is not a short write.
    preflush: bool,
    is_read: bool,
    /// Data range within `segs` (for copying a bounce buffer back).
    data: std::ops::Range<usize>,
    bounce: Option<BounceBuf>,
    bounce_iov: libc::iovec,
}

// SAFETY: the raw pointers (bounce buffer, iovecs in the plan) point into memory the slot or
// its queue owns; a slot is used by one thread at a time (the reactor owning its queue).
unsafe impl Send for RequestSlot {}

impl RequestSlot {
    /// A slot whose requests may carry up to `segments` buffers.
    pub fn new(segments: usize) -> RequestSlot {
        RequestSlot {
            segs: Segments::with_capacity(segments),
            status: Status::Ok,
            written: 0,
            class: Class::Other,
            sectors: 0,
            start: 0,
            plan: Plan::Nothing,
            ranges: Box::new([DwzSegment::default(); blk::MAX_DWZ_SEG as usize]),
            next_op: 0,
            op_count: 0,
            ops_pending: 0,
            expected: 0,
            preflush: false,
            is_read: false,
            data: 0..0,
            bounce: None,
            bounce_iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        }
    }

    /// Readies the slot for a new request taken at clock time `start`.
    pub fn reset(&mut self, start: u64) {
        debug_assert!(self.ops_pending == 0 && self.bounce.is_none());
        self.status = Status::Ok;
        self.written = 0;
        self.class = Class::Other;
        self.sectors = 0;
        self.start = start;
        self.plan = Plan::Nothing;
        self.next_op = 0;
        self.op_count = 0;
        self.expected = 0;
        self.preflush = false;
        self.is_read = false;
        self.data = 0..0;
    }

    /// Checks `req` against the disk and plans its operations; Err(status) = it fails before
    /// any I/O. A request with nothing to start (GET_ID, empty reads) is done on return.
    pub fn prepare(&mut self, device: &BlkDevice, req: &Request) -> Result<(), Status> {
        tracing::trace!(kind = ?req.kind, sector = req.sector, len = req.data_len, "request");
        match req.kind {
            RequestKind::In | RequestKind::Out => self.prepare_rw(device, req),
            RequestKind::Flush => {
                self.class = Class::Flush;
                self.plan = Plan::One {
                    op: IoOp::Flush { before_next: false },
                    preflush: false,
                };
                self.op_count = 1;
                Ok(())
            }
            RequestKind::GetId => {
                let data = &self.segs.iovecs()[req.data.clone()];
                self.written = blk::copy_to_iovecs(data, device.serial()) as u32;
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes | RequestKind::Provision => {
                self.prepare_ranges(device, req)
            }
            RequestKind::Unsupported(_) => Err(Status::Unsupported),
        }
    }

    fn prepare_rw(&mut self, device: &BlkDevice, req: &Request) -> Result<(), Status> {
        let is_read = req.kind == RequestKind::In;
        self.class = if is_read { Class::Read } else { Class::Write };
        if !is_read && device.options().readonly {
            return Err(Status::IoError);
        }
        if req.data_len > MAX_REQUEST_BYTES {
            return Err(Status::IoError);
        }
        let info = device.backend().info();
        let offset = checked_range(device, &info, req.sector, req.data_len)?;
        self.sectors = req.data_len / blk::SECTOR_SIZE;
        if req.data_len == 0 {
            return Ok(());
        }
        self.is_read = is_read;
        self.data = req.data.clone();
        self.expected = req.data_len;
        if is_read {
            self.written = req.data_len as u32;
        }
        let (iov, iov_count) = self.io_buffers(req.data_len, info.dio_alignment);
        let op = if is_read {
            IoOp::Read {
                offset,
                iov,
                iov_count,
            }
        } else {
            IoOp::Write {
                offset,
                iov,
                iov_count,
                fua: req.fua || device.write_through(),
            }
        };
        // A preflushed write (req.fua: blkif's FLUSH_DISKCACHE with data): every write
        // completed before it is made durable first, then this one is written through.
        self.preflush = req.fua && !is_read;
        self.plan = Plan::One {
            op,
            preflush: self.preflush,
        };
        self.op_count = 1 + u8::from(self.preflush);
        Ok(())
    }

    /// The iovecs the volume reads into or writes from: the guest's, or a bounce buffer
    /// when O_DIRECT would refuse the guest's (filled now for a write).
    fn io_buffers(&mut self, len: u64, alignment: u32) -> (*const libc::iovec, u32) {
        let data = &self.segs.iovecs()[self.data.clone()];
        if !needs_bounce(data, alignment) {
            return (data.as_ptr(), data.len() as u32);
        }
        let bounce = BounceBuf::new(len as usize, alignment as usize);
        if !self.is_read {
            // SAFETY: the bounce buffer holds len bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(bounce.ptr, len as usize) };
            blk::copy_from_iovecs(data, buf);
        }
        self.bounce_iov = libc::iovec {
            iov_base: bounce.ptr.cast(),
            iov_len: len as usize,
        };
        self.bounce = Some(bounce);
        (&self.bounce_iov as *const libc::iovec, 1)
    }

    /// Discard, write-zeroes and provision: every segment is checked before any is planned.
    fn prepare_ranges(&mut self, device: &BlkDevice, req: &Request) -> Result<(), Status> {
        let kind = match req.kind {
            RequestKind::Discard => RangeKind::Discard,
            RequestKind::Provision => RangeKind::Provision,
            _ => RangeKind::WriteZeroes,
        };
        self.class = match kind {
            RangeKind::Discard => Class::Discard,
            RangeKind::Provision => Class::Provision,
            RangeKind::WriteZeroes => Class::WriteZeroes,
        };
        if device.options().readonly {
            return Err(Status::IoError);
        }
        let info = device.backend().info();
        let supported = match kind {
            RangeKind::Provision => device.provisions(),
            _ => info.discard,
        };
        if !supported {
            return Err(Status::Unsupported);
        }
        let len = req.data_len as usize;
        let count = len / blk::DWZ_SEGMENT_SIZE;
        if !len.is_multiple_of(blk::DWZ_SEGMENT_SIZE) || count == 0 {
            return Err(Status::IoError);
        }
        if count > blk::MAX_DWZ_SEG as usize {
            return Err(Status::Unsupported);
        }
        let mut raw = [0u8; blk::MAX_DWZ_SEG as usize * blk::DWZ_SEGMENT_SIZE];
        blk::copy_from_iovecs(&self.segs.iovecs()[req.data.clone()], &mut raw[..len]);
        // virtio 1.3, 5.2.6.2: unknown flags, or unmap on a discard (or, by seed 004, on a
        // provision), get UNSUPP.
        let allowed_flags = match kind {
            RangeKind::WriteZeroes => blk::WRITE_ZEROES_FLAG_UNMAP,
            _ => 0,
        };
        let mut planned = 0;
        for i in 0..count {
            let seg = DwzSegment::decode(&raw, i);
            if seg.flags & !allowed_flags != 0 {
                return Err(Status::Unsupported);
            }
            let seg_len = u64::from(seg.num_sectors) * blk::SECTOR_SIZE;
            if seg.num_sectors > blk::MAX_DWZ_SECTORS {
                return Err(Status::IoError);
            }
            checked_range(device, &info, seg.sector, seg_len)?;
            if seg.num_sectors > 0 {
                self.ranges[planned] = seg;
                planned += 1;
                self.sectors += u64::from(seg.num_sectors);
            }
        }
        self.plan = Plan::Ranges {
            kind,
            count: planned as u8,
        };
        self.op_count = planned as u8;
        Ok(())
    }

    /// The next operation of the plan, if any is left to start.
    pub fn next_op(&self) -> Option<IoOp> {
        if self.next_op >= self.op_count {
            return None;
        }
        let i = usize::from(self.next_op);
        match &self.plan {
            Plan::Nothing => None,
            Plan::One { op, preflush: true } => match i {
                0 => Some(IoOp::Flush { before_next: true }),
                1 => Some(*op),
                _ => None,
            },
            Plan::One {
                op,
                preflush: false,
            } => (i == 0).then_some(*op),
            Plan::Ranges { kind, count } => {
                let seg = self.ranges[..usize::from(*count)].get(i)?;
                let offset = seg.sector * blk::SECTOR_SIZE;
                let len = u64::from(seg.num_sectors) * blk::SECTOR_SIZE;
                Some(match kind {
                    RangeKind::Discard => IoOp::Discard { offset, len },
                    RangeKind::Provision => IoOp::Provision { offset, len },
                    RangeKind::WriteZeroes => IoOp::WriteZeroes {
                        offset,
                        len,
                        unmap: seg.flags & blk::WRITE_ZEROES_FLAG_UNMAP != 0,
                    },
                })
            }
        }
    }

    /// Moves past the operation `next_op` gave (it was started or finished).
    pub fn advance(&mut self) {
        debug_assert!(self.next_op < self.op_count);
        self.next_op += 1;
    }

    /// Whether the last operation started was a flush the next one must follow (the backend
    /// linked them: the next must be taken now).
    pub fn follows_linked_flush(&self) -> bool {
        matches!(self.plan, Plan::One { preflush: true, .. }) && self.next_op == 1
    }

    /// The bytes a read, write, discard or write-zeroes covers (its sectors as planned).
    pub fn bytes(&self) -> u64 {
        self.sectors * blk::SECTOR_SIZE
    }

    /// Whether every operation of the plan was started or finished.
    pub fn all_started(&self) -> bool {
        self.next_op >= self.op_count
    }

    /// Counts one operation's result (bytes or -errno, as a CQE carries it).
    pub fn record_result(&mut self, result: i32) {
        // A write returns its byte count (never 0: it carries data), its preflush 0, in any
        // order on backends that complete on other threads.
        if result == 0 && self.preflush {
            self.preflush = false;
            return;
        }
        let failed =
            result < 0 || ((self.is_read || self.expected > 0) && result as u64 != self.expected);
        if failed && self.status == Status::Ok {
            if result < 0 {
                tracing::debug!(errno = -result, "backend operation failed");
            }
            self.status = Status::IoError;
        }
    }

    /// Copies a bounce buffer's read data back to the guest and frees it; true if the
    /// request had one.
    pub fn release_bounce(&mut self) -> bool {
        let Some(bounce) = self.bounce.take() else {
            return false;
        };
        if self.is_read && self.status == Status::Ok {
            // SAFETY: the bounce buffer holds `expected` bytes, filled by the read.
            let buf = unsafe { std::slice::from_raw_parts(bounce.ptr, self.expected as usize) };
            blk::copy_to_iovecs(&self.segs.iovecs()[self.data.clone()], buf);
        }
        true
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie inside the volume and on its
/// block size.
fn checked_range(
    device: &BlkDevice,
    info: &BackendInfo,
    sector: u64,
    len: u64,
) -> Result<u64, Status> {
    let block_size = u64::from(device.options().block_size);
    let offset = sector
        .checked_mul(blk::SECTOR_SIZE)
        .ok_or(Status::IoError)?;
    let end = offset.checked_add(len).ok_or(Status::IoError)?;
    let fits = end <= info.size_bytes && offset % block_size == 0 && len.is_multiple_of(block_size);
    fits.then_some(offset).ok_or(Status::IoError)
}

/// Whether O_DIRECT would refuse these buffers; empty ones carry nothing and do not count.
fn needs_bounce(iov: &[libc::iovec], alignment: u32) -> bool {
    let mask = alignment as usize - 1;
    alignment > 1
        && iov
            .iter()
            .any(|v| v.iov_len != 0 && ((v.iov_base as usize) & mask != 0 || v.iov_len & mask != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NullBackend;
    use crate::device::DiskOptions;
    use std::sync::Arc;

    fn device(readonly: bool) -> BlkDevice {
        let options = DiskOptions {
            readonly,
            ..DiskOptions::named("t", 1)
        };
        BlkDevice::new(options, Arc::new(NullBackend::new(1 << 20, true)))
    }

    fn ranges_request(slot: &mut RequestSlot, kind: RequestKind, raw: &mut [u8]) -> Request {
        slot.segs.clear();
        slot.segs.push(raw.as_mut_ptr(), raw.len() as u32, false);
        Request {
            kind,
            sector: 0,
            data: 0..1,
            data_len: raw.len() as u64,
            fua: false,
        }
    }

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&sectors.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    }

    #[test]
    fn every_segment_is_checked_before_any_is_planned() {
        let dev = device(false);
        let mut slot = RequestSlot::new(4);
        let mut raw = [segment(0, 8, 0), segment(4096, 8, 0)].concat();
        let req = ranges_request(&mut slot, RequestKind::Discard, &mut raw);
        slot.reset(0);
        // The second segment runs past the 1 MiB volume: nothing is planned.
        assert_eq!(slot.prepare(&dev, &req), Err(Status::IoError));

        let mut raw = [segment(0, 8, 0), segment(8, 0, 0), segment(16, 8, 0)].concat();
        let req = ranges_request(&mut slot, RequestKind::Discard, &mut raw);
        slot.reset(0);
        slot.prepare(&dev, &req).unwrap();
        let mut ops = Vec::new();
        while let Some(op) = slot.next_op() {
            ops.push(op);
            slot.advance();
        }
        // The empty segment starts nothing.
        assert_eq!(ops.len(), 2);
        assert!(matches!(
            ops[1],
            IoOp::Discard {
                offset: 8192,
                len: 4096
            }
        ));
        assert_eq!(slot.sectors, 16);
    }

    #[test]
    fn unmap_is_refused_on_a_discard_and_taken_on_write_zeroes() {
        let dev = device(false);
        let mut slot = RequestSlot::new(4);
        let mut raw = segment(0, 8, blk::WRITE_ZEROES_FLAG_UNMAP);
        let req = ranges_request(&mut slot, RequestKind::Discard, &mut raw);
        slot.reset(0);
        assert_eq!(slot.prepare(&dev, &req), Err(Status::Unsupported));
        let req = ranges_request(&mut slot, RequestKind::WriteZeroes, &mut raw);
        slot.reset(0);
        slot.prepare(&dev, &req).unwrap();
        assert!(matches!(
            slot.next_op(),
            Some(IoOp::WriteZeroes { unmap: true, .. })
        ));
    }

    #[test]
    fn a_preflushed_write_starts_with_a_linked_flush() {
        let dev = device(false);
        let mut slot = RequestSlot::new(4);
        let mut data = vec![0u8; 4096];
        slot.segs.clear();
        slot.segs.push(data.as_mut_ptr(), 4096, false);
        let req = Request {
            kind: RequestKind::Out,
            sector: 8,
            data: 0..1,
            data_len: 4096,
            fua: true,
        };
        slot.reset(0);
        slot.prepare(&dev, &req).unwrap();
        assert!(matches!(
            slot.next_op(),
            Some(IoOp::Flush { before_next: true })
        ));
        slot.advance();
        assert!(slot.follows_linked_flush());
        assert!(matches!(
            slot.next_op(),
            Some(IoOp::Write { fua: true, .. })
        ));
        slot.advance();
        assert!(slot.all_started());
        // The preflush's 0 is not a short write; the write's byte count is whole.
        slot.record_result(0);
        slot.record_result(4096);
        assert_eq!(slot.status, Status::Ok);
    }

    #[test]
    fn writes_to_a_readonly_disk_and_past_its_end_fail() {
        let mut slot = RequestSlot::new(4);
        let mut data = vec![0u8; 4096];
        slot.segs.push(data.as_mut_ptr(), 4096, false);
        let write = |sector| Request {
            kind: RequestKind::Out,
            sector,
            data: 0..1,
            data_len: 4096,
            fua: false,
        };
        slot.reset(0);
        assert_eq!(slot.prepare(&device(true), &write(0)), Err(Status::IoError));
        slot.reset(0);
        assert_eq!(
            slot.prepare(&device(false), &write(2048 - 7)),
            Err(Status::IoError)
        );
        slot.reset(0);
        assert_eq!(
            slot.prepare(&device(false), &write(u64::MAX / 256)),
            Err(Status::IoError)
        );
    }
}
