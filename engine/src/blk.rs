//! virtio-blk: request types, status values, feature bits, the config space, and the parse of
//! one request out of its descriptor chain (virtio 1.3, section 5.2).
//!
//! The parse makes no assumption about how the driver framed the request (5.2.6.4: "the device
//! MUST NOT make assumptions about the particular arrangement of descriptors"): the 16-byte
//! header is gathered from the front of the readable buffers and the status byte is the last
//! byte of the writable ones, wherever the descriptor boundaries fall.

use crate::virtqueue::{Fault, Segments};

/// Sector size of every offset and length in virtio-blk requests.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes in a request header: type u32, reserved/ioprio u32, sector u64.
pub const HEADER_SIZE: usize = 16;
/// Bytes in one discard / write-zeroes segment: sector u64, num_sectors u32, flags u32.
pub const DWZ_SEGMENT_SIZE: usize = 16;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Request types (virtio 1.3, 5.2.6).
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    /// Seed 004's proposal, never merged into the spec (pollblk's experimental extension).
    pub const PROVISION: u32 = 15;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Feature bits (virtio 1.3, 5.2.3 and 6).
pub mod feature {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
    pub const RING_INDIRECT_DESC: u32 = 28;
    pub const RING_EVENT_IDX: u32 = 29;
    pub const VERSION_1: u32 = 32;
    /// PROVISION (seed 004) on an unassigned device-specific bit: the proposal's bit 17 is
    /// ZONED now. Experimental, offered only when the operator enables it.
    pub const PROVISION: u32 = 18;
}

/// Flag bit of a write-zeroes segment: the device may unmap (5.2.6).
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Most data buffers one request may carry (config `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Largest single data buffer (config `size_max`). SeaBIOS's virtio-blk driver divides
/// `size_max * seg_max` by the block size into a u16 sector count: at 32 MiB or more it wraps to
/// 0 and the BIOS loops forever on empty reads, so the product stays at 16 MiB.
pub const SIZE_MAX: u32 = 128 << 10;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DWZ_SEG: u32 = 32;
/// Most sectors one discard or write-zeroes segment may cover (2 GiB).
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
/// Buffers a request slot holds: data plus header and status, plus slack for odd framings.
pub const SLOT_SEGMENTS: usize = SEG_MAX as usize + 4;

/// Byte length of the config space pollblk fills: through the zoned fields (5.2.4), then
/// max_provision_sectors and max_provision_seg at 96 and 100 (after the zoned fields, not
/// where seed 004 put them, which the spec has since given to secure erase).
pub const CONFIG_SPACE_SIZE: usize = 104;

/// The virtio-blk configuration layout pollblk exposes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub max_provision_sectors: u32,
    pub max_provision_seg: u32,
}

impl BlkConfig {
    /// Offset of `writeback`, the one field a driver writes (CONFIG_WCE).
    pub const WRITEBACK_OFFSET: usize = 32;

    /// The little-endian config space bytes (offsets from virtio 1.3, 5.2.4).
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        // 25: alignment_offset 0.
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[Self::WRITEBACK_OFFSET] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        // 60..72 secure erase and 72..96 zoned: not offered, zero.
        b[96..100].copy_from_slice(&self.max_provision_sectors.to_le_bytes());
        b[100..104].copy_from_slice(&self.max_provision_seg.to_le_bytes());
        b
    }
}

/// What a request asks for, once parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Provision,
    /// Any type pollblk does not implement; answered UNSUPP.
    Unsupported(u32),
}

/// Why a chain is not a usable request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No writable byte for the status: nothing can be reported to the driver.
    NoStatus,
    /// Fewer than 16 readable bytes for the header; status IOERR.
    ShortHeader,
    /// A buffer was unusable; status IOERR.
    Buffers(Fault),
}

/// One parsed request. The data buffers are `segs.iovecs()[data]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Index range of the data buffers (readable for OUT/DISCARD/WRITE_ZEROES, writable for
    /// IN/GET_ID) within the slot's segments.
    pub data: std::ops::Range<usize>,
    /// Total bytes of the data buffers.
    pub data_len: u64,
    /// A write that must be durable when it completes, with every write completed before it
    /// (blkif's FLUSH_DISKCACHE with data; virtio-blk has no such request).
    pub fua: bool,
}

impl Default for Request {
    /// An empty FLUSH: what a request slot holds before its first request.
    fn default() -> Request {
        Request {
            kind: RequestKind::Flush,
            sector: 0,
            data: 0..0,
            data_len: 0,
            fua: false,
        }
    }
}

/// Location of the status byte, found before anything else so every error can be reported.
pub fn locate_status(segs: &mut Segments) -> Option<*mut u8> {
    let readable = segs.readable_count();
    let iov = segs.iovecs_mut();
    for i in (readable..iov.len()).rev() {
        if iov[i].iov_len > 0 {
            iov[i].iov_len -= 1;
            // SAFETY: iov_len was >= 1; the byte lies inside the translated buffer.
            return Some(unsafe { (iov[i].iov_base as *mut u8).add(iov[i].iov_len) });
        }
    }
    None
}

/// Parses the header and data of a chain whose status byte was already taken off.
pub fn parse(segs: &mut Segments) -> Result<Request, ParseError> {
    let mut request = Request::default();
    parse_into(segs, &mut request)?;
    Ok(request)
}

/// `parse`, into `out` (the reactor's path: the request stays in its slot).
pub fn parse_into(segs: &mut Segments, out: &mut Request) -> Result<(), ParseError> {
    if let Some(fault) = segs.fault() {
        return Err(ParseError::Buffers(fault));
    }
    let readable = segs.readable_count();
    let mut header = [0u8; HEADER_SIZE];
    let first_data = consume_front(&mut segs.iovecs_mut()[..readable], &mut header)
        .ok_or(ParseError::ShortHeader)?;
    let kind = match u32::from_le_bytes(header[0..4].try_into().unwrap()) {
        req::IN => RequestKind::In,
        req::OUT => RequestKind::Out,
        req::FLUSH => RequestKind::Flush,
        req::GET_ID => RequestKind::GetId,
        req::DISCARD => RequestKind::Discard,
        req::WRITE_ZEROES => RequestKind::WriteZeroes,
        req::PROVISION => RequestKind::Provision,
        other => RequestKind::Unsupported(other),
    };
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let mut data = match kind {
        RequestKind::In | RequestKind::GetId => readable..segs.iovecs().len(),
        _ => first_data..readable,
    };
    // Buffers emptied by taking the header or the status byte off carry no data; left in,
    // their addresses would look misaligned to O_DIRECT (the usual layout puts the status
    // byte in a descriptor of its own).
    let iov = segs.iovecs();
    while data.start < data.end && iov[data.start].iov_len == 0 {
        data.start += 1;
    }
    while data.start < data.end && iov[data.end - 1].iov_len == 0 {
        data.end -= 1;
    }
    let data_len = segs.iovecs()[data.clone()]
        .iter()
        .map(|v| v.iov_len as u64)
        .sum();
    out.kind = kind;
    out.sector = sector;
    out.data = data;
    out.data_len = data_len;
    out.fua = false;
    Ok(())
}

/// Copies `out.len()` bytes off the front of `iov`, shrinking it in place; returns the index
/// of the first buffer with bytes left, or None if the buffers hold fewer bytes.
fn consume_front(iov: &mut [libc::iovec], out: &mut [u8]) -> Option<usize> {
    let mut done = 0;
    let mut index = 0;
    while done < out.len() {
        let v = iov.get_mut(index)?;
        let take = v.iov_len.min(out.len() - done);
        // SAFETY: take <= iov_len: inside the translated buffer; out has room for take more.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.iov_base as *const u8,
                out.as_mut_ptr().add(done),
                take,
            );
            v.iov_base = (v.iov_base as *mut u8).add(take).cast();
        }
        v.iov_len -= take;
        done += take;
        if v.iov_len == 0 {
            index += 1;
        }
    }
    Some(index)
}

/// Gathers up to `out.len()` bytes from `iov`; returns how many were copied.
pub fn copy_from_iovecs(iov: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iov {
        let take = v.iov_len.min(out.len() - done);
        // SAFETY: take <= iov_len and take <= room left in out.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base as *const u8, out[done..].as_mut_ptr(), take)
        };
        done += take;
        if done == out.len() {
            break;
        }
    }
    done
}

/// Scatters `data` into `iov`; returns how many bytes were copied.
pub fn copy_to_iovecs(iov: &[libc::iovec], data: &[u8]) -> usize {
    let mut done = 0;
    for v in iov {
        let take = v.iov_len.min(data.len() - done);
        // SAFETY: take <= iov_len and take <= bytes left in data.
        unsafe {
            std::ptr::copy_nonoverlapping(data[done..].as_ptr(), v.iov_base as *mut u8, take)
        };
        done += take;
        if done == data.len() {
            break;
        }
    }
    done
}

/// Fills every byte of `iov` with zero (null reads).
pub fn zero_iovecs(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: writes exactly iov_len bytes of a translated guest buffer.
        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

/// One discard or write-zeroes segment, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DwzSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl DwzSegment {
    /// Decodes segment `index` from the raw bytes.
    pub fn decode(raw: &[u8], index: usize) -> DwzSegment {
        let b = &raw[index * DWZ_SEGMENT_SIZE..(index + 1) * DWZ_SEGMENT_SIZE];
        DwzSegment {
            sector: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            num_sectors: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_limit_fits_seabios_sector_count() {
        // SeaBIOS keeps size_max * seg_max / 512 in a u16 (see SIZE_MAX).
        assert!(u64::from(SIZE_MAX) * u64::from(SEG_MAX) / SECTOR_SIZE < 1 << 16);
    }

    #[test]
    fn config_layout_matches_the_spec_offsets() {
        let cfg = BlkConfig {
            capacity_sectors: 0x0102030405060708,
            size_max: 0x11,
            seg_max: 0x22,
            blk_size: 4096,
            num_queues: 3,
            writeback: 1,
            max_discard_sectors: 0x33,
            max_discard_seg: 0x44,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x55,
            max_write_zeroes_seg: 0x66,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let b = cfg.to_bytes();
        assert_eq!(&b[0..8], &0x0102030405060708u64.to_le_bytes());
        assert_eq!(b[8], 0x11);
        assert_eq!(b[12], 0x22);
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &3u16.to_le_bytes());
        assert_eq!(b[36], 0x33);
        assert_eq!(b[40], 0x44);
        assert_eq!(b[44], 8);
        assert_eq!(b[48], 0x55);
        assert_eq!(b[52], 0x66);
        assert_eq!(b[56], 1);
    }

    fn segs_of(bufs: &mut [Vec<u8>], readable: usize) -> Segments {
        let mut segs = Segments::with_capacity(SLOT_SEGMENTS);
        for (i, b) in bufs.iter_mut().enumerate() {
            segs.push(b.as_mut_ptr(), b.len() as u32, i >= readable);
        }
        segs
    }

    #[test]
    fn header_and_status_may_share_buffers_with_data() {
        // One readable buffer: header + 512 bytes of data; one writable: status only.
        let mut hdr_and_data = vec![0u8; 16 + 512];
        hdr_and_data[0..4].copy_from_slice(&req::OUT.to_le_bytes());
        hdr_and_data[8..16].copy_from_slice(&7u64.to_le_bytes());
        let mut bufs = vec![hdr_and_data, vec![0xffu8; 1]];
        let mut segs = segs_of(&mut bufs, 1);
        let status = locate_status(&mut segs).unwrap();
        let r = parse(&mut segs).unwrap();
        assert_eq!(r.kind, RequestKind::Out);
        assert_eq!(r.sector, 7);
        assert_eq!(r.data_len, 512);
        assert_eq!(status, bufs[1].as_mut_ptr());
    }

    #[test]
    fn header_split_over_two_buffers_and_status_after_read_data() {
        let mut a = vec![0u8; 6];
        a[0..4].copy_from_slice(&req::IN.to_le_bytes());
        let mut b = vec![0u8; 10];
        b[2..10].copy_from_slice(&9u64.to_le_bytes());
        let mut bufs = vec![a, b, vec![0u8; 4097]];
        let mut segs = segs_of(&mut bufs, 2);
        let status = locate_status(&mut segs).unwrap();
        let r = parse(&mut segs).unwrap();
        assert_eq!((r.kind, r.sector, r.data_len), (RequestKind::In, 9, 4096));
        // SAFETY: the buffer is 4097 bytes long.
        assert_eq!(status, unsafe { bufs[2].as_mut_ptr().add(4096) });
    }

    #[test]
    fn data_leaves_out_buffers_emptied_by_header_and_status() {
        // The Linux driver's layout: header, data, status, each in a descriptor of its own.
        for (kind, data_writable) in [(req::IN, true), (req::OUT, false)] {
            let mut h = vec![0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            let mut bufs = vec![h, vec![0u8; 4096], vec![0u8; 1]];
            let readable = if data_writable { 1 } else { 2 };
            let mut segs = segs_of(&mut bufs, readable);
            locate_status(&mut segs).unwrap();
            let r = parse(&mut segs).unwrap();
            assert_eq!(r.data, 1..2, "request type {kind}");
            assert_eq!(r.data_len, 4096);
        }
    }

    #[test]
    fn short_header_and_missing_status_are_reported() {
        let mut bufs = vec![vec![0u8; 8], vec![0u8; 1]];
        let mut segs = segs_of(&mut bufs, 1);
        assert!(locate_status(&mut segs).is_some());
        assert_eq!(parse(&mut segs), Err(ParseError::ShortHeader));

        let mut bufs = vec![vec![0u8; 16]];
        let mut segs = segs_of(&mut bufs, 1);
        assert_eq!(locate_status(&mut segs), None);
    }

    #[test]
    fn unknown_type_is_kept_for_unsupp() {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(&99u32.to_le_bytes());
        let mut bufs = vec![h, vec![0u8; 1]];
        let mut segs = segs_of(&mut bufs, 1);
        locate_status(&mut segs).unwrap();
        assert_eq!(parse(&mut segs).unwrap().kind, RequestKind::Unsupported(99));
    }
}
