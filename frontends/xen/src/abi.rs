//! blkif wire layouts, from Xen's public io/blkif.h and io/ring.h, for both protocol ABIs
//! Linux blkback accepts: x86_64-abi (natural 8-byte alignment, 112-byte ring entries) and
//! x86_32-abi (64-bit fields 4-byte aligned, 108-byte entries).
//!
//! Requests are decoded from a private copy of the ring entry: the front end can change the
//! shared entry at any time, so nothing is read from it twice.

pub const PAGE_SIZE: usize = 4096;
pub const SECTOR_SIZE: u64 = 512;
/// Last sector index a segment may name within its page.
pub const LAST_SECTOR_IN_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE - 1) as u8;
/// Shared ring header: req_prod, req_event, rsp_prod, rsp_event, 4 private + 44 pad bytes.
pub const RING_HEADER: usize = 64;
/// Largest entry of either ABI (x86_64's request).
pub const MAX_ENTRY: usize = 112;
/// Segments a direct request carries at most (BLKIF_MAX_SEGMENTS_PER_REQUEST).
pub const MAX_DIRECT_SEGMENTS: usize = 11;
/// Indirect pages one request may name (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST).
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Segment descriptors per indirect page (8 bytes each).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / 8;
/// feature-max-indirect-segments offered (Linux blkback's default).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;
/// Largest ring-page-order offered (max-ring-page-order): 8 pages, 256 entries.
pub const MAX_RING_PAGE_ORDER: u32 = 3;

pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const WRITE_BARRIER: u8 = 2;
    pub const FLUSH_DISKCACHE: u8 = 3;
    pub const DISCARD: u8 = 5;
    pub const INDIRECT: u8 = 6;
}

pub const RSP_OKAY: i16 = 0;
pub const RSP_ERROR: i16 = -1;
pub const RSP_EOPNOTSUPP: i16 = -2;

/// XenbusState values (xen/io/xenbus.h).
pub mod state {
    pub const INITIALISING: u32 = 1;
    pub const INIT_WAIT: u32 = 2;
    pub const INITIALISED: u32 = 3;
    pub const CONNECTED: u32 = 4;
    pub const CLOSING: u32 = 5;
    pub const CLOSED: u32 = 6;
    pub const RECONFIGURING: u32 = 7;
    pub const RECONFIGURED: u32 = 8;
}

/// The layout of requests on a ring, chosen by the front end's "protocol" key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abi {
    X86_64,
    X86_32,
}

impl Abi {
    /// The ABI a front end asks for; absent means the back end's native one.
    pub fn from_protocol(protocol: Option<&str>) -> Result<Abi, String> {
        match protocol {
            None | Some("x86_64-abi") => Ok(Abi::X86_64),
            Some("x86_32-abi") => Ok(Abi::X86_32),
            Some(other) => Err(format!("unknown protocol {other:?}")),
        }
    }

    /// Bytes of one ring entry (the union of request and response).
    pub fn entry_size(self) -> usize {
        match self {
            Abi::X86_64 => 112,
            Abi::X86_32 => 108,
        }
    }

    /// Entries of a ring of `pages` pages: what fits after the header, rounded down to a
    /// power of two (ring.h's __CONST_RING_SIZE).
    pub fn ring_entries(self, pages: usize) -> u32 {
        let fit = (pages * PAGE_SIZE - RING_HEADER) / self.entry_size();
        1 << (usize::BITS - 1 - fit.leading_zeros())
    }

    /// Offset of `id` in read/write/discard requests; the fields after it follow packed.
    pub(crate) fn id_offset(self) -> usize {
        match self {
            Abi::X86_64 => 8,
            Abi::X86_32 => 4,
        }
    }
}

/// One data segment: a granted page and the sectors of it to transfer (inclusive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Segment {
    /// Reads the 8-byte blkif_request_segment at `b`.
    pub fn decode(b: &[u8]) -> Segment {
        Segment {
            gref: u32_at(b, 0),
            first_sect: b[4],
            last_sect: b[5],
        }
    }

    /// The byte range within its page; None if the sectors are reversed or past the page.
    pub fn byte_range(self) -> Option<(usize, usize)> {
        if self.first_sect > self.last_sect || self.last_sect > LAST_SECTOR_IN_PAGE {
            return None;
        }
        let start = usize::from(self.first_sect) * SECTOR_SIZE as usize;
        let len = usize::from(self.last_sect - self.first_sect + 1) * SECTOR_SIZE as usize;
        Some((start, len))
    }
}

/// What a request asks for beyond its operation, id and sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE: segments in the request itself.
    Direct {
        count: u8,
        segs: [Segment; MAX_DIRECT_SEGMENTS],
    },
    /// INDIRECT: segments in granted pages.
    Indirect {
        op: u8,
        count: u16,
        pages: [u32; MAX_INDIRECT_PAGES],
    },
    Discard {
        flag: u8,
        nr_sectors: u64,
    },
    /// An operation pollblk does not know.
    Unknown,
}

/// A request as copied out of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub operation: u8,
    pub id: u64,
    pub sector: u64,
    pub body: Body,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Decodes a private copy of one ring entry (`entry.len() >= abi.entry_size()`).
pub fn decode(abi: Abi, entry: &[u8]) -> Request {
    assert!(entry.len() >= abi.entry_size());
    let operation = entry[0];
    let id_at = abi.id_offset();
    let id = u64_at(entry, id_at);
    let sector = u64_at(entry, id_at + 8);
    let body = match operation {
        op::READ | op::WRITE | op::WRITE_BARRIER | op::FLUSH_DISKCACHE => {
            let count = entry[1];
            let mut segs = [Segment::default(); MAX_DIRECT_SEGMENTS];
            let first = id_at + 16;
            for (i, seg) in segs.iter_mut().enumerate() {
                *seg = Segment::decode(&entry[first + 8 * i..]);
            }
            Body::Direct { count, segs }
        }
        op::DISCARD => Body::Discard {
            flag: entry[1],
            nr_sectors: u64_at(entry, id_at + 16),
        },
        op::INDIRECT => {
            // handle (2 bytes) and 2 bytes of padding follow the sector.
            let first = id_at + 16 + 4;
            let mut pages = [0u32; MAX_INDIRECT_PAGES];
            for (i, page) in pages.iter_mut().enumerate() {
                *page = u32_at(entry, first + 4 * i);
            }
            Body::Indirect {
                op: entry[1],
                count: u16_at(entry, 2),
                pages,
            }
        }
        _ => Body::Unknown,
    };
    Request {
        operation,
        id,
        sector,
        body,
    }
}

/// Encodes a response (id, operation, status: the same offsets in both ABIs).
pub fn encode_response(id: u64, operation: u8, status: i16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&id.to_le_bytes());
    b[8] = operation;
    b[10..12].copy_from_slice(&status.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_match_ring_h() {
        // DESIGN.md: 1 page 32 entries, 2 pages 64, 4 pages 128, 8 pages 256 (both ABIs).
        for abi in [Abi::X86_64, Abi::X86_32] {
            let sizes: Vec<u32> = [1, 2, 4, 8].iter().map(|&p| abi.ring_entries(p)).collect();
            assert_eq!(sizes, [32, 64, 128, 256], "{abi:?}");
        }
    }

    #[test]
    fn x86_32_requests_pack_the_id_at_offset_4() {
        let mut e = [0u8; MAX_ENTRY];
        e[0] = op::WRITE;
        e[1] = 2;
        e[4..12].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        e[12..20].copy_from_slice(&99u64.to_le_bytes());
        e[20..24].copy_from_slice(&7u32.to_le_bytes());
        e[24] = 1;
        e[25] = 6;
        let r = decode(Abi::X86_32, &e);
        assert_eq!((r.id, r.sector), (0x1122_3344_5566_7788, 99));
        let Body::Direct { count, segs } = r.body else {
            panic!("{r:?}")
        };
        assert_eq!(count, 2);
        assert_eq!(
            segs[0],
            Segment {
                gref: 7,
                first_sect: 1,
                last_sect: 6
            }
        );
    }

    #[test]
    fn segment_ranges_stay_in_the_page() {
        let seg = |first_sect, last_sect| Segment {
            gref: 0,
            first_sect,
            last_sect,
        };
        assert_eq!(seg(0, 7).byte_range(), Some((0, 4096)));
        assert_eq!(seg(3, 3).byte_range(), Some((1536, 512)));
        assert_eq!(seg(4, 3).byte_range(), None);
        assert_eq!(seg(0, 8).byte_range(), None);
    }
}
