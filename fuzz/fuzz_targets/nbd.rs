//! The NBD handshake and request checks on hostile bytes: a client's flags, then option
//! headers and data cut from the input, fed to the handshake until it picks an export,
//! closes or drops the connection; then request headers checked against what it agreed.
//!
//! Invariants: nothing panics; every reply the handshake writes is a well-formed option
//! reply (magic, the option it answers, its length) or, for EXPORT_NAME, the size and
//! flags; no more options are taken than MAX_OPTIONS; a command that passes the checks
//! lies inside the export, in whole minimum blocks (BLOCK_STATUS excepted), and changes a
//! read-only export never.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollblk_nbd::handshake::{ExportInfo, Exports, Handshake, Next, MAX_OPTIONS};
use pollblk_nbd::request::{check, Command, Header};
use pollblk_nbd::wire::*;

struct Two([ExportInfo; 2]);

impl Exports for Two {
    fn find(&self, name: &str) -> Option<ExportInfo> {
        self.0.iter().find(|e| e.name == name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|e| e.name.clone()).collect()
    }
}

fn export(name: &str, read_only: bool, allocation: bool) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: format!("export {name}"),
        size: 1 << 24,
        read_only,
        min_block: 512,
        preferred_block: 4096,
        max_block: 1 << 20,
        can_trim: !read_only,
        multi_conn: true,
        allocation,
    }
}

/// The option replies in `out` are whole and answer `option`.
fn check_replies(mut out: &[u8], option: u32) {
    while !out.is_empty() {
        assert!(out.len() >= 20, "a torn option reply");
        assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), option);
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "a reply longer than what was written");
        out = &out[20 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = Two([export("", false, true), export("ro", true, false)]);
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    // The top bit (never a valid client flag) picks a listener that requires TLS.
    let mut tls_pending = flags[0] & 0x80 != 0;
    let mut h = Handshake::new(tls_pending);
    let flags = u32::from_be_bytes(*flags) & !(1 << 31);
    if h.client_flags(flags).is_err() {
        return;
    }
    let mut options = 0;
    let agreed = loop {
        let Some((header, after)) = rest.split_first_chunk::<OPTION_HEADER>() else {
            return;
        };
        // Most inputs would never hit the magic: give it to them half the time.
        let mut header = *header;
        if header[0] & 1 == 0 {
            header[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        }
        let Ok((option, len)) = h.option_header(&header) else {
            return;
        };
        options += 1;
        assert!(options <= MAX_OPTIONS);
        let len = (len as usize).min(after.len());
        let (payload, after) = after.split_at(len);
        rest = after;
        let mut out = Vec::new();
        let next = h.option(option, payload, &exports, &mut out);
        if tls_pending && option != OPT_STARTTLS && option != OPT_ABORT {
            // Nothing about the exports before TLS: an error that says so, or a close.
            assert!(matches!(next, Next::Option | Next::Close));
            assert!(out.is_empty() || u32::from_be_bytes(out[12..16].try_into().unwrap()) == REP_ERR_TLS_REQD);
        }
        match next {
            Next::StartTls => {
                assert!(tls_pending && option == OPT_STARTTLS);
                check_replies(&out, option);
                tls_pending = false;
            }
            Next::Option if option == OPT_EXPORT_NAME => unreachable!("EXPORT_NAME ends haggling"),
            // An unknown name cannot be answered: closed without a word.
            Next::Close if option == OPT_EXPORT_NAME => {
                assert!(out.is_empty());
                return;
            }
            Next::Option => check_replies(&out, option),
            Next::Close => {
                check_replies(&out, option);
                return;
            }
            Next::Transmit(agreed) if option == OPT_EXPORT_NAME => {
                assert!(out.len() == 10 || out.len() == 134);
                break agreed;
            }
            Next::Transmit(agreed) => {
                check_replies(&out, option);
                break agreed;
            }
        }
    };
    for raw in rest.chunks_exact(REQUEST_HEADER) {
        let mut raw: [u8; REQUEST_HEADER] = raw.try_into().unwrap();
        raw[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        let header = Header::parse(&raw).unwrap();
        let Ok(command) = check(&header, &agreed) else {
            continue;
        };
        let e = &agreed.export;
        let within = |offset: u64, length: u32| {
            assert!(length > 0 && offset + u64::from(length) <= e.size);
        };
        match command {
            Command::Read { offset, length, .. } => {
                within(offset, length);
                assert!(offset % 512 == 0 && length % 512 == 0 && length <= e.max_block);
            }
            Command::Write { offset, length, .. }
            | Command::Trim { offset, length, .. }
            | Command::WriteZeroes { offset, length, .. } => {
                assert!(!e.read_only, "a change to a read-only export passed");
                within(offset, length);
                assert!(offset % 512 == 0 && length % 512 == 0);
            }
            Command::BlockStatus { offset, length, .. } => {
                assert!(agreed.allocation_context.is_some() && agreed.structured);
                within(offset, length);
            }
            Command::Flush | Command::Disconnect => {}
        }
    }
});
