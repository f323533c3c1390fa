//! Option haggling, as a state machine the server feeds one option at a time: the client's
//! flags after the greeting, then each option header and its data; the replies go into a
//! buffer the server sends. Nothing here blocks or reads a socket, so a fuzzer can drive it.
//!
//! Served: EXPORT_NAME, ABORT, LIST, INFO, GO (with NBD_INFO_EXPORT, NAME, DESCRIPTION and
//! BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`
//! where the export can tell holes), and STARTTLS on a listener with TLS. EXTENDED_HEADERS
//! is answered as unsupported; any other option too. Limits: at most [`MAX_OPTIONS`] options
//! and [`MAX_OPTION_DATA`] bytes in one, past which the connection is dropped.
//!
//! A listener with TLS requires it (the protocol's FORCEDTLS): until STARTTLS, every option
//! but ABORT is answered NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot be answered,
//! closes), so no export is visible, not even its name, to a client without TLS.

use crate::wire::*;

/// Most options one handshake may send before it must pick an export.
pub const MAX_OPTIONS: u32 = 64;
/// Largest option data accepted (an export name and a few contexts fit many times over).
pub const MAX_OPTION_DATA: u32 = 16 << 10;
/// Most metadata context queries in one option.
const MAX_QUERIES: u32 = 64;

/// One export as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum (requests must be multiples of
    /// the minimum and at most the maximum).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// TRIM and WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO (the volume can unmap).
    pub can_trim: bool,
    /// A flush on one connection covers writes of every connection to this export.
    pub multi_conn: bool,
    /// `base:allocation` can tell holes from data (a thin volume).
    pub allocation: bool,
}

impl ExportInfo {
    /// The transmission flags of this export on a connection that did or did not agree to
    /// structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        flags |= TFLAG_SEND_WRITE_ZEROES;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        }
        if self.can_trim {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_FAST_ZERO;
        }
        if self.multi_conn {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        if structured {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }
}

/// The exports one listener offers; the client picks one by name.
pub trait Exports {
    fn find(&self, name: &str) -> Option<ExportInfo>;
    fn names(&self) -> Vec<String>;
}

/// What a finished handshake agreed, for the transmission phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    pub export: ExportInfo,
    pub structured: bool,
    /// The id `base:allocation` was given, when the client selected it for this export.
    pub allocation_context: Option<u32>,
}

/// What the server does after an option.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send the replies, read the next option.
    Option,
    /// Send the replies, then serve requests.
    Transmit(Agreed),
    /// Send the replies, then close the connection.
    Close,
    /// Send the replies, then run the TLS handshake the client starts, then read the next
    /// option through TLS.
    StartTls,
}

/// Why a connection is dropped without a reply (the protocol gives no way to answer).
#[derive(Debug, PartialEq, Eq)]
pub enum Hangup {
    /// Client flags with unknown bits.
    ClientFlags(u32),
    /// An option header without the IHAVEOPT magic.
    Magic,
    /// More options, or more option data, than the limits allow.
    TooMuch,
}

/// The id given to `base:allocation`.
const ALLOCATION_ID: u32 = 1;

/// One connection's haggling.
#[derive(Default)]
pub struct Handshake {
    /// TLS is required and not yet started: options other than STARTTLS and ABORT wait.
    tls_required: bool,
    /// STARTTLS was agreed (or TLS is not offered): a STARTTLS now is a mistake.
    tls_offered: bool,
    no_zeroes: bool,
    options: u32,
    structured: bool,
    /// The export `base:allocation` was selected for (SET_META_CONTEXT), if it was.
    allocation_for: Option<String>,
}

impl Handshake {
    /// A handshake on a listener that does (`tls`: requires) or does not offer TLS.
    pub fn new(tls: bool) -> Handshake {
        Handshake {
            tls_required: tls,
            tls_offered: tls,
            ..Handshake::default()
        }
    }

    /// The client's flags, the 4 bytes after the greeting.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), Hangup> {
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(Hangup::ClientFlags(flags));
        }
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        Ok(())
    }

    /// An option header: (option, data length to read next).
    pub fn option_header(&mut self, b: &[u8; OPTION_HEADER]) -> Result<(u32, u32), Hangup> {
        if u64_at(b, 0) != IHAVEOPT {
            return Err(Hangup::Magic);
        }
        let (option, len) = (u32_at(b, 8), u32_at(b, 12));
        self.options += 1;
        if self.options > MAX_OPTIONS || len > MAX_OPTION_DATA {
            return Err(Hangup::TooMuch);
        }
        Ok((option, len))
    }

    /// An option and its data: the replies are appended to `out`.
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Next {
        if self.tls_required && option != OPT_ABORT {
            return self.before_tls(option, data, out);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, exports, out),
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Next::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "LIST takes no data");
                    return Next::Option;
                }
                for name in exports.names() {
                    let mut reply = (name.len() as u32).to_be_bytes().to_vec();
                    reply.extend_from_slice(name.as_bytes());
                    option_reply(out, option, REP_SERVER, &reply);
                }
                option_reply(out, option, REP_ACK, &[]);
                Next::Option
            }
            OPT_INFO | OPT_GO => self.info(option, data, exports, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Next::Option
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports, out);
                Next::Option
            }
            OPT_STARTTLS if self.tls_offered => {
                option_error(out, option, REP_ERR_INVALID, "TLS is already on");
                Next::Option
            }
            OPT_STARTTLS => {
                option_error(
                    out,
                    option,
                    REP_ERR_UNSUP,
                    "this export is served without TLS",
                );
                Next::Option
            }
            _ => {
                option_error(out, option, REP_ERR_UNSUP, "option not supported");
                Next::Option
            }
        }
    }

    /// An option (not ABORT) while TLS is required and not yet on.
    fn before_tls(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Next {
        match option {
            OPT_STARTTLS if data.is_empty() => {
                option_reply(out, option, REP_ACK, &[]);
                self.tls_required = false;
                Next::StartTls
            }
            OPT_STARTTLS => {
                option_error(out, option, REP_ERR_INVALID, "STARTTLS takes no data");
                Next::Option
            }
            OPT_EXPORT_NAME => Next::Close,
            _ => {
                option_error(
                    out,
                    option,
                    REP_ERR_TLS_REQD,
                    "TLS is required: send STARTTLS first",
                );
                Next::Option
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME: no way to answer an error, so an unknown name closes.
    fn export_name(&mut self, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) -> Next {
        let Some(export) = string(data).and_then(|n| exports.find(n)) else {
            return Next::Close;
        };
        out.extend_from_slice(&export.size.to_be_bytes());
        out.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Next::Transmit(self.agreed(export))
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: `name length u32 | name | count u16 | count x u16`.
    fn info(&mut self, option: u32, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) -> Next {
        let Some((name, requests)) = parse_info(data) else {
            option_error(out, option, REP_ERR_INVALID, "malformed INFO/GO data");
            return Next::Option;
        };
        let Some(export) = find(exports, name, option, out) else {
            return Next::Option;
        };
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&export.size.to_be_bytes());
        info.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        option_reply(out, option, REP_INFO, &info);
        // Sent whether asked or not (as qemu-nbd does): a client that ignores it still gets
        // EINVAL for a request that breaks it.
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [export.min_block, export.preferred_block, export.max_block] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        option_reply(out, option, REP_INFO, &sizes);
        for request in requests
            .chunks_exact(2)
            .map(|r| u16::from_be_bytes([r[0], r[1]]))
        {
            let (kind, text) = match request {
                INFO_NAME => (INFO_NAME, &export.name),
                INFO_DESCRIPTION if !export.description.is_empty() => {
                    (INFO_DESCRIPTION, &export.description)
                }
                _ => continue,
            };
            let mut reply = kind.to_be_bytes().to_vec();
            reply.extend_from_slice(text.as_bytes());
            option_reply(out, option, REP_INFO, &reply);
        }
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Next::Transmit(self.agreed(export))
        } else {
            Next::Option
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: `name length u32 | name | count u32 |
    /// count x (length u32 | query)`. Only `base:allocation` (or, listing, `base:`) matches.
    fn meta_context(&mut self, option: u32, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if !self.structured {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate STRUCTURED_REPLY first",
            );
            return;
        }
        let Some((name, queries)) = parse_meta(data) else {
            option_error(out, option, REP_ERR_INVALID, "malformed META_CONTEXT data");
            return;
        };
        let Some(export) = find(exports, name, option, out) else {
            return;
        };
        if set {
            self.allocation_for = None;
        }
        let wanted = queries
            .iter()
            .any(|q| *q == BASE_ALLOCATION || (!set && (*q == "base:" || *q == "base:allocation")))
            || (!set && queries.is_empty());
        if wanted && export.allocation {
            let mut reply = ALLOCATION_ID.to_be_bytes().to_vec();
            reply.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &reply);
            if set {
                self.allocation_for = Some(name.to_string());
            }
        }
        option_reply(out, option, REP_ACK, &[]);
    }

    fn agreed(&self, export: ExportInfo) -> Agreed {
        let allocation_context = (self.structured
            && self.allocation_for.as_deref() == Some(export.name.as_str()))
        .then_some(ALLOCATION_ID);
        Agreed {
            export,
            structured: self.structured,
            allocation_context,
        }
    }
}

/// Export `name`, or an NBD_REP_ERR_UNKNOWN reply to `option` saying there is none.
fn find(exports: &dyn Exports, name: &str, option: u32, out: &mut Vec<u8>) -> Option<ExportInfo> {
    let found = exports.find(name);
    if found.is_none() {
        option_error(
            out,
            option,
            REP_ERR_UNKNOWN,
            &format!("no export named {name:?}"),
        );
    }
    found
}

/// A protocol string: UTF-8, no NUL, at most MAX_STRING bytes.
fn string(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// `len u32 | string` at the start of `b`: (the string, what follows).
fn prefixed(b: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32_at(b.get(..4)?, 0) as usize;
    let rest = &b[4..];
    Some((string(rest.get(..len)?)?, &rest[len..]))
}

fn parse_info(data: &[u8]) -> Option<(&str, &[u8])> {
    let (name, rest) = prefixed(data)?;
    let count = usize::from(u16_at(rest.get(..2)?, 0));
    let requests = &rest[2..];
    (requests.len() == 2 * count).then_some((name, requests))
}

fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let (name, rest) = prefixed(data)?;
    let count = u32_at(rest.get(..4)?, 0);
    if count > MAX_QUERIES {
        return None;
    }
    let mut rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let (query, after) = prefixed(rest)?;
        queries.push(query);
        rest = after;
    }
    rest.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One(ExportInfo);

    impl Exports for One {
        fn find(&self, name: &str) -> Option<ExportInfo> {
            (name == self.0.name).then(|| self.0.clone())
        }
        fn names(&self) -> Vec<String> {
            vec![self.0.name.clone()]
        }
    }

    fn export() -> One {
        One(ExportInfo {
            name: "vm1".into(),
            description: "thin volume vm1".into(),
            size: 1 << 30,
            read_only: false,
            min_block: 512,
            preferred_block: 4096,
            max_block: 32 << 20,
            can_trim: true,
            multi_conn: true,
            allocation: true,
        })
    }

    /// The option replies in `out`: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut all = Vec::new();
        while !out.is_empty() {
            assert_eq!(u64_at(out, 0), OPTION_REPLY_MAGIC);
            let len = u32_at(out, 16) as usize;
            all.push((u32_at(out, 8), u32_at(out, 12), out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        all
    }

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn go_after_structured_replies_and_base_allocation_agrees_on_all_three() {
        let (exports, mut h, mut out) = (export(), Handshake::new(false), Vec::new());
        h.client_flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .unwrap();
        assert_eq!(
            h.option(OPT_STRUCTURED_REPLY, &[], &exports, &mut out),
            Next::Option
        );
        let meta = meta_data("vm1", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]);
        assert_eq!(
            h.option(OPT_SET_META_CONTEXT, &meta, &exports, &mut out),
            Next::Option
        );
        let next = h.option(OPT_GO, &info_data("vm1", &[INFO_NAME]), &exports, &mut out);
        let Next::Transmit(agreed) = next else {
            panic!("{next:?}")
        };
        assert!(agreed.structured);
        assert_eq!(agreed.allocation_context, Some(ALLOCATION_ID));
        let r = replies(&out);
        assert_eq!(r[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        let mut context = ALLOCATION_ID.to_be_bytes().to_vec();
        context.extend_from_slice(b"base:allocation");
        assert_eq!(r[1], (OPT_SET_META_CONTEXT, REP_META_CONTEXT, context));
        assert_eq!(r[2], (OPT_SET_META_CONTEXT, REP_ACK, vec![]));
        // INFO_EXPORT: size and flags, then BLOCK_SIZE, NAME, ACK.
        assert_eq!((r[3].1, u16_at(&r[3].2, 0)), (REP_INFO, INFO_EXPORT));
        assert_eq!(u64_at(&r[3].2, 2), 1 << 30);
        let flags = u16_at(&r[3].2, 10);
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        assert_ne!(
            flags & (TFLAG_SEND_TRIM | TFLAG_SEND_DF | TFLAG_CAN_MULTI_CONN),
            0
        );
        assert_eq!(
            r[4].2,
            [
                &[0, 3][..],
                &512u32.to_be_bytes(),
                &4096u32.to_be_bytes(),
                &(32u32 << 20).to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(r[5].2, [&[0, 1][..], b"vm1"].concat());
        assert_eq!(r[6], (OPT_GO, REP_ACK, vec![]));
    }

    #[test]
    fn mistakes_get_the_documented_errors_and_the_haggling_goes_on() {
        let (exports, mut h, mut out) = (export(), Handshake::new(false), Vec::new());
        h.client_flags(CLIENT_FIXED_NEWSTYLE).unwrap();
        let cases: Vec<(u32, Vec<u8>, u32)> = vec![
            (OPT_GO, info_data("nope", &[]), REP_ERR_UNKNOWN),
            (OPT_GO, vec![0, 0, 0, 9, b'v'], REP_ERR_INVALID),
            (
                OPT_INFO,
                [info_data("vm1", &[]), vec![0]].concat(),
                REP_ERR_INVALID,
            ),
            (OPT_LIST, vec![1], REP_ERR_INVALID),
            (
                OPT_SET_META_CONTEXT,
                meta_data("vm1", &[BASE_ALLOCATION]),
                REP_ERR_INVALID,
            ),
            (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
            (OPT_EXTENDED_HEADERS, vec![], REP_ERR_UNSUP),
            (77, vec![1, 2, 3], REP_ERR_UNSUP),
        ];
        for (option, data, want) in cases {
            out.clear();
            assert_eq!(h.option(option, &data, &exports, &mut out), Next::Option);
            let r = replies(&out);
            assert_eq!(
                (r.len(), r[0].0, r[0].1),
                (1, option, want),
                "option {option}"
            );
        }
        // INFO answers and goes on; LIST names the export.
        out.clear();
        assert_eq!(
            h.option(OPT_INFO, &info_data("vm1", &[]), &exports, &mut out),
            Next::Option
        );
        out.clear();
        h.option(OPT_LIST, &[], &exports, &mut out);
        let r = replies(&out);
        assert_eq!(
            r[0],
            (OPT_LIST, REP_SERVER, [&[0, 0, 0, 3][..], b"vm1"].concat())
        );
        // Without structured replies, no metadata context: GO agrees on neither.
        out.clear();
        let Next::Transmit(agreed) = h.option(OPT_GO, &info_data("vm1", &[]), &exports, &mut out)
        else {
            panic!()
        };
        assert_eq!(
            (agreed.structured, agreed.allocation_context),
            (false, None)
        );
    }

    #[test]
    fn export_name_answers_size_and_flags_or_closes() {
        let exports = export();
        let mut h = Handshake::new(false);
        h.client_flags(CLIENT_FIXED_NEWSTYLE).unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            h.option(OPT_EXPORT_NAME, b"vm1", &exports, &mut out),
            Next::Transmit(_)
        ));
        assert_eq!(
            out.len(),
            8 + 2 + 124,
            "with the zeroes the client did not decline"
        );
        assert_eq!(u64_at(&out, 0), 1 << 30);
        let mut h = Handshake::new(false);
        h.client_flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .unwrap();
        out.clear();
        assert_eq!(
            h.option(OPT_EXPORT_NAME, b"other", &exports, &mut out),
            Next::Close
        );
        assert!(out.is_empty());
        assert_eq!(h.option(OPT_ABORT, &[], &exports, &mut out), Next::Close);
        assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
    }

    #[test]
    fn with_tls_required_nothing_is_told_before_starttls() {
        let (exports, mut h, mut out) = (export(), Handshake::new(true), Vec::new());
        h.client_flags(CLIENT_FIXED_NEWSTYLE).unwrap();
        for option in [OPT_LIST, OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY, 77] {
            out.clear();
            let data = if option == OPT_GO || option == OPT_INFO {
                info_data("vm1", &[])
            } else {
                vec![]
            };
            assert_eq!(h.option(option, &data, &exports, &mut out), Next::Option);
            let r = replies(&out);
            assert_eq!((r.len(), r[0].1), (1, REP_ERR_TLS_REQD), "option {option}");
            assert!(!String::from_utf8_lossy(&r[0].2).contains("vm1"));
        }
        out.clear();
        assert_eq!(
            h.option(OPT_EXPORT_NAME, b"vm1", &exports, &mut out),
            Next::Close
        );
        assert!(out.is_empty());
        // STARTTLS with data is a mistake; without, it is agreed once.
        assert_eq!(
            h.option(OPT_STARTTLS, &[1], &exports, &mut out),
            Next::Option
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(
            h.option(OPT_STARTTLS, &[], &exports, &mut out),
            Next::StartTls
        );
        assert_eq!(replies(&out), vec![(OPT_STARTTLS, REP_ACK, vec![])]);
        out.clear();
        assert_eq!(
            h.option(OPT_STARTTLS, &[], &exports, &mut out),
            Next::Option
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        // Then the haggling is as without TLS.
        out.clear();
        h.option(OPT_LIST, &[], &exports, &mut out);
        assert_eq!(replies(&out)[0].1, REP_SERVER);
        let go = h.option(OPT_GO, &info_data("vm1", &[]), &exports, &mut out);
        assert!(matches!(go, Next::Transmit(_)));
        // ABORT before TLS is still answered.
        let (mut h, mut out) = (Handshake::new(true), Vec::new());
        assert_eq!(h.option(OPT_ABORT, &[], &exports, &mut out), Next::Close);
        assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
    }

    #[test]
    fn bad_flags_magic_and_too_many_options_drop_the_connection() {
        let mut h = Handshake::new(false);
        assert_eq!(h.client_flags(4), Err(Hangup::ClientFlags(4)));
        let mut header = [0u8; OPTION_HEADER];
        header[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        header[8..12].copy_from_slice(&OPT_LIST.to_be_bytes());
        for _ in 0..MAX_OPTIONS {
            assert_eq!(h.option_header(&header), Ok((OPT_LIST, 0)));
        }
        assert_eq!(h.option_header(&header), Err(Hangup::TooMuch));
        let mut h = Handshake::new(false);
        header[12..].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        assert_eq!(h.option_header(&header), Err(Hangup::TooMuch));
        header[0] ^= 1;
        assert_eq!(h.option_header(&header), Err(Hangup::Magic));
    }
}
