//! Sans-IO fixed-newstyle handshake: feed it the server's bytes, send what it produces.
//!
//! The sequence is: greeting and client flags, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_LIST_META_CONTEXT` with no query (so the client learns every context the export
//! offers), `NBD_OPT_SET_META_CONTEXT` for the contexts asked for (skipped when none are), and
//! `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`. Options are sent one at a time, each after the
//! previous one's final reply, so a refusal is attributed to the right option.

use super::error::{HandshakeError, ProtocolError};
use super::proto::{self, be16, be32, be64, info, opt, rep};

/// At most this many meta contexts are accepted in a list (a bound against hostile servers).
pub const MAX_LISTED_CONTEXTS: usize = 4096;

/// What the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Name of the export to open.
    pub export: String,
    /// Meta contexts to negotiate, such as `base:allocation` or `qemu:dirty-bitmap:backup-vda`.
    pub meta_contexts: Vec<String>,
}

/// Block size constraints announced by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Largest request payload.
    pub maximum: u32,
}

/// A negotiated meta context: the id block status chunks carry, and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Id chosen by the server.
    pub id: u32,
    /// Name, for example `base:allocation`.
    pub name: String,
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::tflag`).
    pub transmission_flags: u16,
    /// Block size constraints, when the server sent them.
    pub block_size: Option<BlockSize>,
    /// Whether structured replies are in use.
    pub structured_replies: bool,
    /// Negotiated meta contexts with their ids.
    pub contexts: Vec<MetaContext>,
    /// Every meta context the export lists.
    pub available_contexts: Vec<String>,
}

impl ExportInfo {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & proto::tflag::READ_ONLY != 0
    }

    /// Whether the export accepts `NBD_CMD_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.transmission_flags & proto::tflag::SEND_FLUSH != 0
    }

    /// Whether several connections to the export see the same data.
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & proto::tflag::CAN_MULTI_CONN != 0
    }

    /// Largest single request the client may send.
    pub fn max_request_bytes(&self) -> u32 {
        match self.block_size {
            Some(b) if b.maximum > 0 => b.maximum.min(proto::DEFAULT_MAX_REQUEST_BYTES),
            _ => proto::DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// Id of a negotiated meta context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Greeting,
    StructuredReply,
    ListContexts,
    SetContexts,
    Go,
    Done,
    Failed,
}

/// The handshake state machine. It never does IO.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    step: Step,
    input: Vec<u8>,
    output: Vec<u8>,
    greeted: bool,
    structured: bool,
    listed: Vec<String>,
    granted: Vec<MetaContext>,
    size_flags: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
    error: Option<HandshakeError>,
}

impl Handshake {
    /// Starts a handshake. Names longer than the protocol allows are refused here.
    pub fn new(config: HandshakeConfig) -> Result<Self, HandshakeError> {
        for name in std::iter::once(&config.export).chain(config.meta_contexts.iter()) {
            if name.len() > proto::MAX_STRING_LEN {
                return Err(HandshakeError::NameTooLong { length: name.len() });
            }
        }
        Ok(Self {
            config,
            step: Step::Greeting,
            input: Vec::new(),
            output: Vec::new(),
            greeted: false,
            structured: false,
            listed: Vec::new(),
            granted: Vec::new(),
            size_flags: None,
            block_size: None,
            error: None,
        })
    }

    /// Takes the bytes to send to the server now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Whether the handshake still waits for server bytes.
    pub fn wants_input(&self) -> bool {
        !matches!(self.step, Step::Done | Step::Failed)
    }

    /// Whether transmission may begin.
    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// Feeds bytes received from the server and advances as far as they allow.
    pub fn receive(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.input.extend_from_slice(data);
        match self.advance() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.step = Step::Failed;
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Tells the machine the server closed the connection.
    pub fn receive_eof(&mut self) -> HandshakeError {
        let e = self.error.clone().unwrap_or(HandshakeError::Closed);
        self.step = Step::Failed;
        self.error = Some(e.clone());
        e
    }

    /// Bytes that end the handshake politely (`NBD_OPT_ABORT`) after a failure, so the server
    /// sees a client that gave up rather than a dropped connection. Empty once transmission
    /// has begun or before the greeting, when no option may be sent.
    pub fn abort_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.greeted && self.step != Step::Done {
            proto::put_option(&mut out, opt::ABORT, &[]);
        }
        out
    }

    /// The negotiated export, and any bytes received past the end of the handshake (there
    /// should be none: the server speaks next only when asked).
    pub fn finish(self) -> Result<(ExportInfo, Vec<u8>), HandshakeError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let Some((size, transmission_flags)) = self.size_flags.filter(|_| self.step == Step::Done)
        else {
            return Err(HandshakeError::Closed);
        };
        Ok((
            ExportInfo {
                name: self.config.export,
                size,
                transmission_flags,
                block_size: self.block_size,
                structured_replies: self.structured,
                contexts: self.granted,
                available_contexts: self.listed,
            },
            self.input,
        ))
    }

    fn advance(&mut self) -> Result<(), HandshakeError> {
        loop {
            match self.step {
                Step::Done | Step::Failed => return Ok(()),
                Step::Greeting => {
                    if self.input.len() < 18 {
                        return Ok(());
                    }
                    let magic = be64(&self.input, 0);
                    if magic != proto::NBD_MAGIC {
                        return Err(ProtocolError::BadMagic {
                            what: "greeting",
                            found: magic,
                        }
                        .into());
                    }
                    let newstyle = be64(&self.input, 8);
                    if newstyle != proto::IHAVEOPT {
                        return Err(ProtocolError::NotFixedNewstyle.into());
                    }
                    let flags = be16(&self.input, 16);
                    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(ProtocolError::NotFixedNewstyle.into());
                    }
                    self.input.drain(..18);
                    self.greeted = true;
                    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
                    if flags & proto::FLAG_NO_ZEROES != 0 {
                        client_flags |= proto::FLAG_C_NO_ZEROES;
                    }
                    self.output.extend_from_slice(&client_flags.to_be_bytes());
                    proto::put_option(&mut self.output, opt::STRUCTURED_REPLY, &[]);
                    self.step = Step::StructuredReply;
                }
                _ => {
                    if self.input.len() < proto::OPTION_REPLY_LEN {
                        return Ok(());
                    }
                    let magic = be64(&self.input, 0);
                    if magic != proto::OPTION_REPLY_MAGIC {
                        return Err(ProtocolError::BadMagic {
                            what: "option reply",
                            found: magic,
                        }
                        .into());
                    }
                    let option = be32(&self.input, 8);
                    let kind = be32(&self.input, 12);
                    let length = be32(&self.input, 16);
                    if length > proto::MAX_OPTION_REPLY_PAYLOAD {
                        return Err(ProtocolError::TooLong {
                            what: "option reply",
                            length: u64::from(length),
                            limit: u64::from(proto::MAX_OPTION_REPLY_PAYLOAD),
                        }
                        .into());
                    }
                    let total = proto::OPTION_REPLY_LEN + length as usize;
                    if self.input.len() < total {
                        return Ok(());
                    }
                    let payload: Vec<u8> = self.input[proto::OPTION_REPLY_LEN..total].to_vec();
                    self.input.drain(..total);
                    let expected = self.current_option();
                    if option != expected {
                        return Err(ProtocolError::WrongOption {
                            expected,
                            got: option,
                        }
                        .into());
                    }
                    self.on_option_reply(kind, &payload)?;
                }
            }
        }
    }

    fn current_option(&self) -> u32 {
        match self.step {
            Step::StructuredReply => opt::STRUCTURED_REPLY,
            Step::ListContexts => opt::LIST_META_CONTEXT,
            Step::SetContexts => opt::SET_META_CONTEXT,
            _ => opt::GO,
        }
    }

    fn on_option_reply(&mut self, kind: u32, payload: &[u8]) -> Result<(), HandshakeError> {
        let option = self.current_option();
        if kind & rep::ERROR_BIT != 0 {
            return self.on_option_error(option, kind, payload);
        }
        match (self.step, kind) {
            (Step::StructuredReply, rep::ACK) => {
                self.structured = true;
                self.send_list_contexts();
            }
            (Step::ListContexts | Step::SetContexts, rep::META_CONTEXT) => {
                if payload.len() < 4 {
                    return Err(ProtocolError::Malformed {
                        what: "meta context reply",
                    }
                    .into());
                }
                let id = be32(payload, 0);
                let name = String::from_utf8_lossy(&payload[4..]).into_owned();
                let count = self.listed.len().max(self.granted.len());
                if count >= MAX_LISTED_CONTEXTS {
                    return Err(ProtocolError::TooMany {
                        what: "meta contexts",
                        limit: MAX_LISTED_CONTEXTS,
                    }
                    .into());
                }
                if self.step == Step::ListContexts {
                    self.listed.push(name);
                } else {
                    self.granted.push(MetaContext { id, name });
                }
            }
            (Step::ListContexts, rep::ACK) => self.send_set_contexts(),
            (Step::SetContexts, rep::ACK) => {
                self.check_granted()?;
                self.send_go();
            }
            (Step::Go, rep::INFO) => self.on_info(payload)?,
            (Step::Go, rep::ACK) => {
                if self.size_flags.is_none() {
                    return Err(ProtocolError::Malformed {
                        what: "NBD_OPT_GO reply without NBD_INFO_EXPORT",
                    }
                    .into());
                }
                self.step = Step::Done;
            }
            _ => {
                return Err(ProtocolError::UnexpectedReply {
                    what: proto::option_name(option),
                    kind,
                }
                .into());
            }
        }
        Ok(())
    }

    fn on_option_error(
        &mut self,
        option: u32,
        kind: u32,
        payload: &[u8],
    ) -> Result<(), HandshakeError> {
        let message = String::from_utf8_lossy(payload).into_owned();
        match (self.step, kind) {
            (Step::StructuredReply, _) if !self.config.meta_contexts.is_empty() => {
                Err(HandshakeError::StructuredRepliesUnsupported)
            }
            (Step::StructuredReply, _) => {
                // Plain reads still work with simple replies; listing contexts needs
                // structured replies, so go straight to the export.
                self.structured = false;
                self.send_go();
                Ok(())
            }
            (_, rep::ERR_UNKNOWN) => Err(HandshakeError::UnknownExport {
                export: self.config.export.clone(),
                message,
            }),
            (Step::ListContexts, rep::ERR_UNSUP) => {
                // Listing is optional for the client; the set below tells what is granted.
                self.send_set_contexts();
                Ok(())
            }
            _ => Err(HandshakeError::OptionRefused {
                option: proto::option_name(option),
                reply: kind,
                message,
            }),
        }
    }

    fn on_info(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        if payload.len() < 2 {
            return Err(ProtocolError::Malformed { what: "info reply" }.into());
        }
        match be16(payload, 0) {
            info::EXPORT => {
                if payload.len() != 12 {
                    return Err(ProtocolError::Malformed {
                        what: "NBD_INFO_EXPORT",
                    }
                    .into());
                }
                self.size_flags = Some((be64(payload, 2), be16(payload, 10)));
            }
            info::BLOCK_SIZE => {
                if payload.len() != 14 {
                    return Err(ProtocolError::Malformed {
                        what: "NBD_INFO_BLOCK_SIZE",
                    }
                    .into());
                }
                self.block_size = Some(BlockSize {
                    minimum: be32(payload, 2),
                    preferred: be32(payload, 6),
                    maximum: be32(payload, 10),
                });
            }
            // Names, descriptions and future information are not needed.
            _ => {}
        }
        Ok(())
    }

    fn check_granted(&self) -> Result<(), HandshakeError> {
        for wanted in &self.config.meta_contexts {
            if !self.granted.iter().any(|c| &c.name == wanted) {
                return Err(HandshakeError::MetaContextUnavailable {
                    context: wanted.clone(),
                    offered: self.listed.clone(),
                });
            }
        }
        Ok(())
    }

    fn send_list_contexts(&mut self) {
        let mut payload = Vec::new();
        put_string(&mut payload, &self.config.export);
        payload.extend_from_slice(&0u32.to_be_bytes());
        proto::put_option(&mut self.output, opt::LIST_META_CONTEXT, &payload);
        self.step = Step::ListContexts;
    }

    fn send_set_contexts(&mut self) {
        if self.config.meta_contexts.is_empty() {
            self.send_go();
            return;
        }
        let mut payload = Vec::new();
        put_string(&mut payload, &self.config.export);
        payload.extend_from_slice(&(self.config.meta_contexts.len() as u32).to_be_bytes());
        for query in &self.config.meta_contexts {
            put_string(&mut payload, query);
        }
        proto::put_option(&mut self.output, opt::SET_META_CONTEXT, &payload);
        self.step = Step::SetContexts;
    }

    fn send_go(&mut self) {
        let mut payload = Vec::new();
        put_string(&mut payload, &self.config.export);
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        proto::put_option(&mut self.output, opt::GO, &payload);
        self.step = Step::Go;
    }
}

/// Appends a 32-bit length and the string; lengths were bounded in `Handshake::new`.
fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn greeting(flags: u16) -> Vec<u8> {
        let mut v = proto::NBD_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    pub(crate) fn option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    pub(crate) fn meta(option: u32, id: u32, name: &str) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        option_reply(option, rep::META_CONTEXT, &p)
    }

    pub(crate) fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut p = info::EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        option_reply(opt::GO, rep::INFO, &p)
    }

    fn config(contexts: &[&str]) -> HandshakeConfig {
        HandshakeConfig {
            export: "vda".into(),
            meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The full server side of a successful handshake with two contexts.
    pub(crate) fn server_script(size: u64, flags: u16) -> Vec<u8> {
        let mut s = greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        s.extend(option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(meta(opt::LIST_META_CONTEXT, 0, "base:allocation"));
        s.extend(meta(opt::LIST_META_CONTEXT, 0, "qemu:dirty-bitmap:b"));
        s.extend(option_reply(opt::LIST_META_CONTEXT, rep::ACK, &[]));
        s.extend(meta(opt::SET_META_CONTEXT, 1, "base:allocation"));
        s.extend(meta(opt::SET_META_CONTEXT, 2, "qemu:dirty-bitmap:b"));
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        s.extend(info_export(size, flags));
        let mut bs = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 1 << 25] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        s.extend(option_reply(opt::GO, rep::INFO, &bs));
        s.extend(option_reply(opt::GO, rep::ACK, &[]));
        s
    }

    #[test]
    fn handshake_negotiates_structured_replies_contexts_and_export() {
        let mut h = Handshake::new(config(&["base:allocation", "qemu:dirty-bitmap:b"])).unwrap();
        // Feed byte by byte: the machine must cope with any fragmentation.
        for b in server_script(1 << 20, proto::tflag::HAS_FLAGS | proto::tflag::READ_ONLY) {
            h.receive(&[b]).unwrap();
        }
        let sent = h.take_output();
        assert_eq!(
            &sent[..4],
            &3u32.to_be_bytes(),
            "client flags with NO_ZEROES"
        );
        assert!(h.is_done());
        let (info, rest) = h.finish().unwrap();
        assert!(rest.is_empty());
        assert_eq!(info.size, 1 << 20);
        assert!(info.read_only());
        assert!(info.structured_replies);
        assert_eq!(info.context_id("qemu:dirty-bitmap:b"), Some(2));
        assert_eq!(info.available_contexts.len(), 2);
        assert_eq!(info.max_request_bytes(), 1 << 25);
    }

    #[test]
    fn client_sends_options_in_order_with_export_name() {
        let mut h = Handshake::new(config(&["base:allocation"])).unwrap();
        h.receive(&greeting(proto::FLAG_FIXED_NEWSTYLE)).unwrap();
        let out = h.take_output();
        assert_eq!(
            &out[..4],
            &1u32.to_be_bytes(),
            "no NO_ZEROES unless offered"
        );
        assert_eq!(be32(&out, 12), opt::STRUCTURED_REPLY);
        h.receive(&option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]))
            .unwrap();
        let out = h.take_output();
        assert_eq!(be32(&out, 8), opt::LIST_META_CONTEXT);
        // export name length, name, zero queries
        assert_eq!(&out[16..], &[0, 0, 0, 3, b'v', b'd', b'a', 0, 0, 0, 0]);
    }

    #[test]
    fn unknown_export_is_a_typed_error() {
        let mut h = Handshake::new(config(&[])).unwrap();
        h.receive(&greeting(proto::FLAG_FIXED_NEWSTYLE)).unwrap();
        h.receive(&option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]))
            .unwrap();
        let err = h
            .receive(&option_reply(
                opt::LIST_META_CONTEXT,
                rep::ERR_UNKNOWN,
                b"export 'vda' not present",
            ))
            .unwrap_err();
        assert_eq!(
            err,
            HandshakeError::UnknownExport {
                export: "vda".into(),
                message: "export 'vda' not present".into()
            }
        );
        assert!(!h.wants_input());
        let abort = h.abort_bytes();
        assert_eq!(be32(&abort, 8), opt::ABORT);
        assert!(h.finish().is_err());
    }

    #[test]
    fn missing_meta_context_is_a_typed_error() {
        let mut h = Handshake::new(config(&["qemu:dirty-bitmap:gone"])).unwrap();
        let mut s = greeting(proto::FLAG_FIXED_NEWSTYLE);
        s.extend(option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(meta(opt::LIST_META_CONTEXT, 0, "base:allocation"));
        s.extend(option_reply(opt::LIST_META_CONTEXT, rep::ACK, &[]));
        s.extend(option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        match h.receive(&s).unwrap_err() {
            HandshakeError::MetaContextUnavailable { context, offered } => {
                assert_eq!(context, "qemu:dirty-bitmap:gone");
                assert_eq!(offered, vec!["base:allocation".to_string()]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oldstyle_or_unfixed_server_is_refused() {
        let mut h = Handshake::new(config(&[])).unwrap();
        assert_eq!(
            h.receive(&greeting(0)).unwrap_err(),
            HandshakeError::Protocol(ProtocolError::NotFixedNewstyle)
        );
        assert!(
            h.abort_bytes().is_empty(),
            "nothing is sent to a server that is not NBD"
        );
    }

    #[test]
    fn reply_to_another_option_is_a_protocol_error() {
        let mut h = Handshake::new(config(&[])).unwrap();
        h.receive(&greeting(proto::FLAG_FIXED_NEWSTYLE)).unwrap();
        let err = h
            .receive(&option_reply(opt::GO, rep::ACK, &[]))
            .unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::Protocol(ProtocolError::WrongOption { .. })
        ));
    }

    #[test]
    fn oversized_option_reply_is_refused_before_buffering() {
        let mut h = Handshake::new(config(&[])).unwrap();
        h.receive(&greeting(proto::FLAG_FIXED_NEWSTYLE)).unwrap();
        let mut r = option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            h.receive(&r).unwrap_err(),
            HandshakeError::Protocol(ProtocolError::TooLong { .. })
        ));
    }

    #[test]
    fn server_without_structured_replies_still_reads_without_contexts() {
        let mut h = Handshake::new(config(&[])).unwrap();
        let mut s = greeting(proto::FLAG_FIXED_NEWSTYLE);
        s.extend(option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
        s.extend(info_export(512, proto::tflag::HAS_FLAGS));
        s.extend(option_reply(opt::GO, rep::ACK, &[]));
        h.receive(&s).unwrap();
        let (info, _) = h.finish().unwrap();
        assert!(!info.structured_replies);
        assert_eq!(info.size, 512);
    }

    #[test]
    fn too_long_export_name_is_refused() {
        let c = HandshakeConfig {
            export: "x".repeat(5000),
            meta_contexts: vec![],
        };
        assert_eq!(
            Handshake::new(c).unwrap_err(),
            HandshakeError::NameTooLong { length: 5000 }
        );
    }
}
