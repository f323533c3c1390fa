//! The transmission phase: a request header (28 bytes: magic, flags, type, cookie, offset,
//! length; a WRITE's data follows) checked against the export and what the handshake agreed.
//! Every request the protocol lets a server refuse is refused here, with the error qemu-nbd
//! gives it; what cannot be answered (bad magic, a payload too large to take in) drops the
//! connection.

use crate::handshake::Agreed;
use crate::wire::*;

/// A request header as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A header without the request magic: the stream is lost, the connection dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct BadMagic;

impl Header {
    pub fn parse(b: &[u8; REQUEST_HEADER]) -> Result<Header, BadMagic> {
        if u32_at(b, 0) != REQUEST_MAGIC {
            return Err(BadMagic);
        }
        Ok(Header {
            flags: u16_at(b, 4),
            kind: u16_at(b, 6),
            cookie: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: u32_at(b, 24),
        })
    }

    /// Payload bytes that follow this header on the wire (a WRITE's data).
    pub fn payload(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A request the export can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `df`: the client wants the data in one chunk (no holes reported).
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// `unmap`: the range may be deallocated (no NBD_CMD_FLAG_NO_HOLE); `fast`: fail with
    /// ENOTSUP rather than write zeroes slowly.
    WriteZeroes {
        offset: u64,
        length: u32,
        unmap: bool,
        fast: bool,
        fua: bool,
    },
    /// `one`: a single extent is enough (NBD_CMD_FLAG_REQ_ONE).
    BlockStatus {
        offset: u64,
        length: u32,
        one: bool,
    },
    Disconnect,
}

/// Why a request is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Answer with this error (any WRITE payload read and dropped first).
    Error(u32),
    /// A WRITE payload larger than the export's maximum: not taken in, the connection is
    /// dropped.
    Hangup,
}

/// Flags each command may carry (FUA is accepted everywhere, as qemu-nbd does).
fn allowed_flags(kind: u16) -> u16 {
    CMD_FLAG_FUA
        | match kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Checks `h` against the export and the agreement.
pub fn check(h: &Header, agreed: &Agreed) -> Result<Command, Refusal> {
    use Refusal::{Error, Hangup};
    let export = &agreed.export;
    if h.kind == CMD_WRITE && h.length > export.max_block {
        return Err(Hangup);
    }
    if h.flags & !allowed_flags(h.kind) != 0 {
        return Err(Error(EINVAL));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (h.offset, h.length);
    match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH if offset == 0 && length == 0 => return Ok(Command::Flush),
        CMD_FLUSH => return Err(Error(EINVAL)),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {}
        _ => return Err(Error(EINVAL)),
    }
    let changes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if changes && export.read_only {
        return Err(Error(EPERM));
    }
    let past_end =
        !matches!(offset.checked_add(u64::from(length)), Some(end) if end <= export.size);
    if past_end {
        let writes = matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES);
        return Err(Error(if writes { ENOSPC } else { EINVAL }));
    }
    let min = u64::from(export.min_block.max(1));
    let aligned = offset % min == 0 && u64::from(length) % min == 0;
    if length == 0 || (h.kind != CMD_BLOCK_STATUS && !aligned) {
        return Err(Error(EINVAL));
    }
    match h.kind {
        CMD_READ if length > export.max_block => Err(Error(EINVAL)),
        CMD_READ if h.flags & CMD_FLAG_DF != 0 && !agreed.structured => Err(Error(EINVAL)),
        CMD_READ => Ok(Command::Read {
            offset,
            length,
            df: h.flags & CMD_FLAG_DF != 0,
        }),
        CMD_WRITE => Ok(Command::Write {
            offset,
            length,
            fua,
        }),
        CMD_TRIM if !export.can_trim => Err(Error(EINVAL)),
        CMD_TRIM => Ok(Command::Trim {
            offset,
            length,
            fua,
        }),
        CMD_WRITE_ZEROES => {
            let unmap = h.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
            // Fast zeroing is unmapping: without it, or without leave to make a hole, it
            // would be slow.
            if fast && (!unmap || !export.can_trim) {
                return Err(Error(ENOTSUP));
            }
            Ok(Command::WriteZeroes {
                offset,
                length,
                unmap,
                fast,
                fua,
            })
        }
        _ => match agreed.allocation_context {
            Some(_) => Ok(Command::BlockStatus {
                offset,
                length,
                one: h.flags & CMD_FLAG_REQ_ONE != 0,
            }),
            None => Err(Error(EINVAL)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::ExportInfo;

    fn agreed(read_only: bool, structured: bool) -> Agreed {
        Agreed {
            export: ExportInfo {
                name: "vm1".into(),
                description: String::new(),
                size: 1 << 20,
                read_only,
                min_block: 512,
                preferred_block: 4096,
                max_block: 64 << 10,
                can_trim: true,
                multi_conn: true,
                allocation: true,
            },
            structured,
            allocation_context: structured.then_some(1),
        }
    }

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> Header {
        Header {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn a_header_parses_from_its_28_bytes_and_bad_magic_is_refused() {
        let mut b = [0u8; REQUEST_HEADER];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&9u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        let h = Header::parse(&b).unwrap();
        assert_eq!(h, header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512).with_cookie(9));
        assert_eq!(h.payload(), 512);
        b[0] = 0;
        assert_eq!(Header::parse(&b), Err(BadMagic));
    }

    impl Header {
        fn with_cookie(mut self, cookie: u64) -> Header {
            self.cookie = cookie;
            self
        }
    }

    #[test]
    fn requests_become_commands() {
        let a = agreed(false, true);
        let ok = |h: Header| check(&h, &a).unwrap();
        assert_eq!(
            ok(header(CMD_READ, CMD_FLAG_DF, 512, 4096)),
            Command::Read {
                offset: 512,
                length: 4096,
                df: true
            }
        );
        assert_eq!(
            ok(header(CMD_WRITE, CMD_FLAG_FUA, 0, 512)),
            Command::Write {
                offset: 0,
                length: 512,
                fua: true
            }
        );
        assert_eq!(ok(header(CMD_FLUSH, 0, 0, 0)), Command::Flush);
        assert_eq!(ok(header(CMD_DISC, 0, 0, 0)), Command::Disconnect);
        assert_eq!(
            ok(header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20)),
            Command::WriteZeroes {
                offset: 0,
                length: 1 << 20,
                unmap: false,
                fast: false,
                fua: false
            }
        );
        assert_eq!(
            ok(header(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 10)),
            Command::BlockStatus {
                offset: 3,
                length: 10,
                one: true
            }
        );
    }

    #[test]
    fn every_malformed_request_gets_the_error_qemu_nbd_gives() {
        let rw = agreed(false, true);
        let ro = agreed(true, false);
        let cases = [
            (&rw, header(9, 0, 0, 512), Refusal::Error(EINVAL)),
            (
                &rw,
                header(CMD_READ, 1 << 9, 0, 512),
                Refusal::Error(EINVAL),
            ),
            (
                &rw,
                header(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512),
                Refusal::Error(EINVAL),
            ),
            (
                &rw,
                header(CMD_READ, 0, (1 << 20) - 512, 1024),
                Refusal::Error(EINVAL),
            ),
            (
                &rw,
                header(CMD_READ, 0, u64::MAX - 100, 512),
                Refusal::Error(EINVAL),
            ),
            (
                &rw,
                header(CMD_WRITE, 0, 1 << 20, 512),
                Refusal::Error(ENOSPC),
            ),
            (
                &rw,
                header(CMD_WRITE_ZEROES, 0, 1 << 20, 512),
                Refusal::Error(ENOSPC),
            ),
            (&rw, header(CMD_READ, 0, 100, 512), Refusal::Error(EINVAL)),
            (&rw, header(CMD_READ, 0, 0, 0), Refusal::Error(EINVAL)),
            (
                &rw,
                header(CMD_READ, 0, 0, 128 << 10),
                Refusal::Error(EINVAL),
            ),
            (&rw, header(CMD_WRITE, 0, 0, 128 << 10), Refusal::Hangup),
            (&rw, header(CMD_FLUSH, 0, 0, 512), Refusal::Error(EINVAL)),
            (&rw, header(CMD_CACHE, 0, 0, 512), Refusal::Error(EINVAL)),
            (
                &rw,
                header(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    512,
                ),
                Refusal::Error(ENOTSUP),
            ),
            (&ro, header(CMD_WRITE, 0, 0, 512), Refusal::Error(EPERM)),
            (&ro, header(CMD_TRIM, 0, 0, 512), Refusal::Error(EPERM)),
            (
                &ro,
                header(CMD_WRITE_ZEROES, 0, 0, 512),
                Refusal::Error(EPERM),
            ),
            (
                &ro,
                header(CMD_READ, CMD_FLAG_DF, 0, 512),
                Refusal::Error(EINVAL),
            ),
            (
                &ro,
                header(CMD_BLOCK_STATUS, 0, 0, 512),
                Refusal::Error(EINVAL),
            ),
        ];
        for (a, h, want) in cases {
            assert_eq!(check(&h, a), Err(want), "{h:?}");
        }
    }
}
