//! Sans-IO transmission phase: encodes requests, decodes simple and structured replies.
//!
//! The caller appends request bytes to its own output buffer and feeds received bytes to
//! [`Transmission::decode`], which returns how many it consumed and at most one [`Event`]. Read
//! data is handed out as slices of the caller's input, so bulk data is never copied inside the
//! codec. Reply chunks of different requests may interleave; each request is identified by its
//! cookie. At most `window` requests are in flight; every buffered length is bounded.

use std::collections::HashMap;

use vbackup_core::export::Extent;

use super::error::{ProtocolError, RequestError};
use super::handshake::ExportInfo;
use super::proto::{self, NbdErrno, be16, be32, be64, chunk, cmd};

/// Default number of requests in flight.
pub const DEFAULT_WINDOW: usize = 16;
/// Upper bound on the window (the cookie table is bounded by it).
pub const MAX_WINDOW: usize = 1024;
/// Longest error message kept from an error chunk.
const MAX_ERROR_PAYLOAD: u32 = 6 + 8 + proto::MAX_STRING_LEN as u32;

/// Identifies one request and its replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

/// Something decoded from the server's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Part of a read's data, at an absolute export offset.
    ReadData {
        /// The read.
        cookie: Cookie,
        /// Export offset of `data[0]`.
        offset: u64,
        /// The bytes, borrowed from the input.
        data: &'a [u8],
    },
    /// Part of a read that reads as zeroes.
    ReadHole {
        /// The read.
        cookie: Cookie,
        /// Export offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
    },
    /// Extents for one meta context.
    BlockStatus {
        /// The block status request.
        cookie: Cookie,
        /// Negotiated id of the context.
        context_id: u32,
        /// Extents from the request's offset on.
        extents: Vec<Extent>,
    },
    /// The request is finished; no more events for this cookie follow.
    Done {
        /// The request.
        cookie: Cookie,
        /// Its outcome.
        result: Result<(), RequestError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read {
        offset: u64,
        length: u32,
        covered: u64,
    },
    BlockStatus,
    Write,
    Flush,
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    error: Option<RequestError>,
}

#[derive(Debug, Clone, Copy)]
struct ChunkHeader {
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
}

#[derive(Debug)]
enum Decode {
    /// Collecting a reply header; its length depends on the magic in the first four bytes.
    Header,
    /// The 8-byte offset at the start of an OFFSET_DATA chunk.
    DataOffset { header: ChunkHeader },
    /// Read data: of a simple reply to a read, or of an OFFSET_DATA chunk.
    Data {
        cookie: u64,
        offset: u64,
        remaining: u64,
        /// Whether the request is answered when the data ends: always for a simple reply, for
        /// a chunk when it carries the DONE flag.
        ends_reply: bool,
    },
    /// A small payload that is decoded once complete.
    Payload { header: ChunkHeader },
}

/// The transmission state machine.
#[derive(Debug)]
pub struct Transmission {
    size: u64,
    read_only: bool,
    can_flush: bool,
    can_write_zeroes: bool,
    structured: bool,
    context_ids: Vec<u32>,
    max_request: u32,
    window: usize,
    next_cookie: u64,
    in_flight: HashMap<u64, Pending>,
    state: Decode,
    buf: Vec<u8>,
    queued_done: Option<u64>,
    closed: bool,
}

impl Transmission {
    /// Starts transmission for a negotiated export, with `window` requests in flight at most
    /// (clamped to 1..=[`MAX_WINDOW`]).
    pub fn new(info: &ExportInfo, window: usize) -> Self {
        Self {
            size: info.size,
            read_only: info.read_only(),
            can_flush: info.can_flush(),
            can_write_zeroes: info.transmission_flags & proto::tflag::SEND_WRITE_ZEROES != 0,
            structured: info.structured_replies,
            context_ids: info.contexts.iter().map(|c| c.id).collect(),
            max_request: info.max_request_bytes(),
            window: window.clamp(1, MAX_WINDOW),
            next_cookie: 1,
            in_flight: HashMap::new(),
            state: Decode::Header,
            buf: Vec::with_capacity(64),
            queued_done: None,
            closed: false,
        }
    }

    /// Requests without a final reply yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether another request may be sent now.
    pub fn can_send(&self) -> bool {
        !self.closed && self.in_flight.len() < self.window
    }

    /// The window size.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Largest single request.
    pub fn max_request_bytes(&self) -> u32 {
        self.max_request
    }

    /// Whether a disconnect was sent or the stream broke.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Queues `NBD_CMD_READ`.
    pub fn read(
        &mut self,
        offset: u64,
        length: u32,
        out: &mut Vec<u8>,
    ) -> Result<Cookie, RequestError> {
        self.check(offset, u64::from(length))?;
        let cookie = self.register(Kind::Read {
            offset,
            length,
            covered: 0,
        });
        proto::put_request(out, 0, cmd::READ, cookie, offset, length);
        Ok(Cookie(cookie))
    }

    /// Queues `NBD_CMD_BLOCK_STATUS` for every negotiated meta context.
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u32,
        out: &mut Vec<u8>,
    ) -> Result<Cookie, RequestError> {
        if !self.structured || self.context_ids.is_empty() {
            return Err(RequestError::Unsupported(
                "block status without meta contexts",
            ));
        }
        // Block status carries no payload, so the request size limit does not apply.
        self.check_range(offset, u64::from(length))?;
        let cookie = self.register(Kind::BlockStatus);
        proto::put_request(out, 0, cmd::BLOCK_STATUS, cookie, offset, length);
        Ok(Cookie(cookie))
    }

    /// Queues `NBD_CMD_WRITE` with its payload.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Cookie, RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        self.check(offset, data.len() as u64)?;
        let cookie = self.register(Kind::Write);
        // `check` bounded the length by `max_request`, a u32.
        proto::put_request(out, 0, cmd::WRITE, cookie, offset, data.len() as u32);
        out.extend_from_slice(data);
        Ok(Cookie(cookie))
    }

    /// Queues `NBD_CMD_WRITE_ZEROES` (the range may become a hole; it reads as zeroes).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        length: u32,
        out: &mut Vec<u8>,
    ) -> Result<Cookie, RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        if !self.can_write_zeroes {
            return Err(RequestError::Unsupported("write zeroes"));
        }
        // No payload travels, so only the range is checked, not the request size limit.
        self.check_range(offset, u64::from(length))?;
        let cookie = self.register(Kind::Write);
        proto::put_request(out, 0, cmd::WRITE_ZEROES, cookie, offset, length);
        Ok(Cookie(cookie))
    }

    /// Queues `NBD_CMD_FLUSH`.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<Cookie, RequestError> {
        if !self.can_flush {
            return Err(RequestError::Unsupported("flush"));
        }
        self.check_window()?;
        let cookie = self.register(Kind::Flush);
        proto::put_request(out, 0, cmd::FLUSH, cookie, 0, 0);
        Ok(Cookie(cookie))
    }

    /// Queues `NBD_CMD_DISC`. No reply follows; every later request is refused.
    pub fn disconnect(&mut self, out: &mut Vec<u8>) {
        if !self.closed {
            proto::put_request(out, 0, cmd::DISC, 0, 0, 0);
            self.closed = true;
        }
    }

    fn check_window(&self) -> Result<(), RequestError> {
        if self.closed {
            return Err(RequestError::Closed);
        }
        if self.in_flight.len() >= self.window {
            return Err(RequestError::WindowFull(self.window));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), RequestError> {
        self.check_window()?;
        if length == 0 || offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(RequestError::OutOfRange {
                offset,
                length,
                size: self.size,
            });
        }
        Ok(())
    }

    fn check(&self, offset: u64, length: u64) -> Result<(), RequestError> {
        self.check_range(offset, length)?;
        if length > u64::from(self.max_request) {
            return Err(RequestError::TooLarge {
                length,
                max: self.max_request,
            });
        }
        Ok(())
    }

    fn register(&mut self, kind: Kind) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        self.in_flight.insert(cookie, Pending { kind, error: None });
        cookie
    }

    /// Decodes from `input`: returns the bytes consumed and at most one event. `(n, None)` with
    /// `n == input.len()` means more input is needed. After an error the stream is unusable.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        let r = self.decode_inner(input);
        if r.is_err() {
            self.closed = true;
        }
        r
    }

    fn decode_inner<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        if let Some(cookie) = self.queued_done.take() {
            return Ok((0, Some(self.finish(cookie))));
        }
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                Decode::Header => {
                    let need = if self.buf.len() < 4 {
                        4
                    } else if be32(&self.buf, 0) == proto::SIMPLE_REPLY_MAGIC {
                        proto::SIMPLE_REPLY_LEN
                    } else {
                        proto::STRUCTURED_REPLY_LEN
                    };
                    if self.buf.len() < need {
                        if rest.is_empty() {
                            return Ok((used, None));
                        }
                        if self.in_flight.is_empty() {
                            return Err(ProtocolError::Unsolicited);
                        }
                        used += self.fill_buf(rest, need);
                        continue;
                    }
                    if need == 4 {
                        let magic = be32(&self.buf, 0);
                        if magic != proto::SIMPLE_REPLY_MAGIC
                            && magic != proto::STRUCTURED_REPLY_MAGIC
                        {
                            return Err(ProtocolError::BadMagic {
                                what: "reply",
                                found: u64::from(magic),
                            });
                        }
                        if magic == proto::STRUCTURED_REPLY_MAGIC && !self.structured {
                            return Err(ProtocolError::UnexpectedReply {
                                what: "transmission without structured replies",
                                kind: magic,
                            });
                        }
                        continue;
                    }
                    if need == proto::SIMPLE_REPLY_LEN {
                        let errno = be32(&self.buf, 4);
                        let cookie = be64(&self.buf, 8);
                        self.buf.clear();
                        if let Some(ev) = self.on_simple(cookie, errno)? {
                            return Ok((used, Some(ev)));
                        }
                    } else {
                        let header = ChunkHeader {
                            flags: be16(&self.buf, 4),
                            kind: be16(&self.buf, 6),
                            cookie: be64(&self.buf, 8),
                            length: be32(&self.buf, 16),
                        };
                        self.buf.clear();
                        if let Some(ev) = self.on_chunk_header(header)? {
                            return Ok((used, Some(ev)));
                        }
                    }
                }
                Decode::DataOffset { header } => {
                    if self.buf.len() < 8 {
                        if rest.is_empty() {
                            return Ok((used, None));
                        }
                        used += self.fill_buf(rest, 8);
                        continue;
                    }
                    let offset = be64(&self.buf, 0);
                    self.buf.clear();
                    let length = u64::from(header.length - 8);
                    self.account_read(header.cookie, offset, length)?;
                    if length == 0 {
                        self.state = Decode::Header;
                        if let Some(ev) = self.end_chunk(header) {
                            return Ok((used, Some(ev)));
                        }
                    } else {
                        self.state = Decode::Data {
                            cookie: header.cookie,
                            offset,
                            remaining: length,
                            ends_reply: header.flags & chunk::FLAG_DONE != 0,
                        };
                    }
                }
                Decode::Data {
                    cookie,
                    offset,
                    remaining,
                    ends_reply,
                } => {
                    if rest.is_empty() {
                        return Ok((used, None));
                    }
                    let take = remaining.min(rest.len() as u64) as usize;
                    used += take;
                    let left = remaining - take as u64;
                    if left == 0 {
                        self.state = Decode::Header;
                        if ends_reply {
                            self.queued_done = Some(cookie);
                        }
                    } else {
                        self.state = Decode::Data {
                            cookie,
                            offset: offset + take as u64,
                            remaining: left,
                            ends_reply,
                        };
                    }
                    return Ok((
                        used,
                        Some(Event::ReadData {
                            cookie: Cookie(cookie),
                            offset,
                            data: &rest[..take],
                        }),
                    ));
                }
                Decode::Payload { header } => {
                    let need = header.length as usize;
                    if self.buf.len() < need {
                        if rest.is_empty() {
                            return Ok((used, None));
                        }
                        used += self.fill_buf(rest, need);
                        continue;
                    }
                    self.state = Decode::Header;
                    let payload = std::mem::take(&mut self.buf);
                    let ev = self.on_payload(header, &payload);
                    // Keep the allocation for the next header, but never a large one.
                    if payload.capacity() <= 4096 {
                        self.buf = payload;
                        self.buf.clear();
                    }
                    if let Some(ev) = ev? {
                        return Ok((used, Some(ev)));
                    }
                }
            }
        }
    }

    /// Moves bytes of `rest` into the buffer until it holds `need`; returns how many it took.
    fn fill_buf(&mut self, rest: &[u8], need: usize) -> usize {
        let take = (need - self.buf.len()).min(rest.len());
        self.buf.extend_from_slice(&rest[..take]);
        take
    }

    fn on_simple(
        &mut self,
        cookie: u64,
        errno: u32,
    ) -> Result<Option<Event<'static>>, ProtocolError> {
        let pending = self
            .in_flight
            .get_mut(&cookie)
            .ok_or(ProtocolError::UnknownCookie(cookie))?;
        if errno != 0 {
            pending.error.get_or_insert(RequestError::Server {
                errno: NbdErrno::from_wire(errno),
                message: String::new(),
                offset: None,
            });
            return Ok(Some(self.finish(cookie)));
        }
        match &mut pending.kind {
            Kind::Read {
                offset,
                length,
                covered,
            } => {
                if *covered != 0 {
                    return Err(ProtocolError::UnexpectedReply {
                        what: "read already answered by chunks",
                        kind: proto::SIMPLE_REPLY_MAGIC,
                    });
                }
                *covered = u64::from(*length);
                self.state = Decode::Data {
                    cookie,
                    offset: *offset,
                    remaining: u64::from(*length),
                    ends_reply: true,
                };
                Ok(None)
            }
            Kind::BlockStatus => Err(ProtocolError::UnexpectedReply {
                what: "block status (successful simple reply)",
                kind: proto::SIMPLE_REPLY_MAGIC,
            }),
            Kind::Write | Kind::Flush => Ok(Some(self.finish(cookie))),
        }
    }

    fn on_chunk_header(
        &mut self,
        header: ChunkHeader,
    ) -> Result<Option<Event<'static>>, ProtocolError> {
        let pending = self
            .in_flight
            .get(&header.cookie)
            .ok_or(ProtocolError::UnknownCookie(header.cookie))?;
        let is_read = matches!(pending.kind, Kind::Read { .. });
        let read_len = match pending.kind {
            Kind::Read { length, .. } => u64::from(length),
            _ => 0,
        };
        let length = header.length;
        let malformed = |what| Err(ProtocolError::Malformed { what });
        match header.kind {
            chunk::NONE => {
                if length != 0 || header.flags & chunk::FLAG_DONE == 0 {
                    return malformed("NBD_REPLY_TYPE_NONE");
                }
                Ok(Some(self.finish(header.cookie)))
            }
            chunk::OFFSET_DATA if is_read => {
                if length < 8 || u64::from(length - 8) > read_len {
                    return malformed("NBD_REPLY_TYPE_OFFSET_DATA length");
                }
                self.state = Decode::DataOffset { header };
                Ok(None)
            }
            chunk::OFFSET_HOLE if is_read => {
                if length != 12 {
                    return malformed("NBD_REPLY_TYPE_OFFSET_HOLE length");
                }
                self.state = Decode::Payload { header };
                Ok(None)
            }
            chunk::BLOCK_STATUS if matches!(pending.kind, Kind::BlockStatus) => {
                if length < 12 || !(length - 4).is_multiple_of(8) {
                    return malformed("NBD_REPLY_TYPE_BLOCK_STATUS length");
                }
                if length > proto::MAX_METADATA_CHUNK_PAYLOAD {
                    return Err(ProtocolError::TooLong {
                        what: "block status chunk",
                        length: u64::from(length),
                        limit: u64::from(proto::MAX_METADATA_CHUNK_PAYLOAD),
                    });
                }
                self.state = Decode::Payload { header };
                Ok(None)
            }
            kind if kind & chunk::ERROR_BIT != 0 => {
                if length < 6 {
                    return malformed("error chunk length");
                }
                if length > MAX_ERROR_PAYLOAD {
                    return Err(ProtocolError::TooLong {
                        what: "error chunk",
                        length: u64::from(length),
                        limit: u64::from(MAX_ERROR_PAYLOAD),
                    });
                }
                self.state = Decode::Payload { header };
                Ok(None)
            }
            kind => Err(ProtocolError::UnexpectedReply {
                what: "request of another kind",
                kind: u32::from(kind),
            }),
        }
    }

    fn on_payload(
        &mut self,
        header: ChunkHeader,
        payload: &[u8],
    ) -> Result<Option<Event<'static>>, ProtocolError> {
        let cookie = Cookie(header.cookie);
        let event = match header.kind {
            chunk::OFFSET_HOLE => {
                let offset = be64(payload, 0);
                let length = be32(payload, 8);
                if length == 0 {
                    return Err(ProtocolError::Malformed {
                        what: "empty hole chunk",
                    });
                }
                self.account_read(header.cookie, offset, u64::from(length))?;
                Some(Event::ReadHole {
                    cookie,
                    offset,
                    length,
                })
            }
            chunk::BLOCK_STATUS => {
                let context_id = be32(payload, 0);
                if !self.context_ids.contains(&context_id) {
                    return Err(ProtocolError::UnknownContextId(context_id));
                }
                let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
                for pair in payload[4..].chunks_exact(8) {
                    let length = be32(pair, 0);
                    if length == 0 {
                        return Err(ProtocolError::Malformed {
                            what: "zero-length extent",
                        });
                    }
                    extents.push(Extent {
                        length: u64::from(length),
                        flags: be32(pair, 4),
                    });
                }
                Some(Event::BlockStatus {
                    cookie,
                    context_id,
                    extents,
                })
            }
            kind => {
                // An error chunk: errno, message length, message, and for ERROR_OFFSET an
                // offset. Unknown error types count as errors of the request, as the
                // protocol asks.
                let errno = be32(payload, 0);
                let message_len = usize::from(be16(payload, 4));
                if 6 + message_len > payload.len() {
                    return Err(ProtocolError::Malformed {
                        what: "error chunk message length",
                    });
                }
                let message = String::from_utf8_lossy(&payload[6..6 + message_len]).into_owned();
                let offset = if kind == chunk::ERROR_OFFSET {
                    if payload.len() != 6 + message_len + 8 {
                        return Err(ProtocolError::Malformed {
                            what: "NBD_REPLY_TYPE_ERROR_OFFSET length",
                        });
                    }
                    Some(be64(payload, 6 + message_len))
                } else {
                    None
                };
                if errno == 0 {
                    return Err(ProtocolError::Malformed {
                        what: "error chunk with error 0",
                    });
                }
                if let Some(p) = self.in_flight.get_mut(&header.cookie) {
                    p.error.get_or_insert(RequestError::Server {
                        errno: NbdErrno::from_wire(errno),
                        message,
                        offset,
                    });
                }
                None
            }
        };
        match event {
            Some(ev) => {
                if header.flags & chunk::FLAG_DONE != 0 {
                    self.queued_done = Some(header.cookie);
                }
                Ok(Some(ev))
            }
            None => Ok(self.end_chunk(header)),
        }
    }

    /// Checks that a data or hole chunk lies inside its read and counts its bytes.
    fn account_read(&mut self, cookie: u64, offset: u64, length: u64) -> Result<(), ProtocolError> {
        let out_of_range = ProtocolError::ChunkOutOfRange { offset, length };
        let Some(Pending {
            kind:
                Kind::Read {
                    offset: start,
                    length: total,
                    covered,
                },
            ..
        }) = self.in_flight.get_mut(&cookie)
        else {
            return Err(ProtocolError::UnknownCookie(cookie));
        };
        let end = *start + u64::from(*total);
        if offset < *start || offset.checked_add(length).is_none_or(|e| e > end) {
            return Err(out_of_range);
        }
        *covered += length;
        if *covered > u64::from(*total) {
            return Err(out_of_range);
        }
        Ok(())
    }

    fn end_chunk(&mut self, header: ChunkHeader) -> Option<Event<'static>> {
        if header.flags & chunk::FLAG_DONE != 0 {
            Some(self.finish(header.cookie))
        } else {
            None
        }
    }

    fn finish(&mut self, cookie: u64) -> Event<'static> {
        let result = match self.in_flight.remove(&cookie) {
            Some(Pending { error: Some(e), .. }) => Err(e),
            Some(Pending {
                kind: Kind::Read {
                    length, covered, ..
                },
                ..
            }) if covered != u64::from(length) => Err(RequestError::IncompleteRead {
                expected: u64::from(length),
                received: covered,
            }),
            _ => Ok(()),
        };
        Event::Done {
            cookie: Cookie(cookie),
            result,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::robustness::export_with_two_contexts;

    fn info(read_only: bool) -> ExportInfo {
        let mut flags = proto::tflag::HAS_FLAGS | proto::tflag::SEND_FLUSH;
        if read_only {
            flags |= proto::tflag::READ_ONLY;
        }
        export_with_two_contexts("e", 1 << 20, flags)
    }

    pub(crate) fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn simple(errno: u32, cookie: u64) -> Vec<u8> {
        let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&errno.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v
    }

    fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        p
    }

    fn hole(offset: u64, length: u32) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&length.to_be_bytes());
        p
    }

    /// Decodes everything, feeding `step` bytes at a time, and returns owned events.
    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Data(u64, u64, Vec<u8>),
        Hole(u64, u64, u32),
        Status(u64, u32, Vec<Extent>),
        Done(u64, Result<(), RequestError>),
    }

    fn decode_all(t: &mut Transmission, bytes: &[u8], step: usize) -> Vec<Owned> {
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            let mut at = 0;
            loop {
                let (n, ev) = t.decode(&piece[at..]).unwrap();
                at += n;
                match ev {
                    Some(Event::ReadData {
                        cookie,
                        offset,
                        data,
                    }) => {
                        // Merge fragments so results do not depend on the step.
                        if let Some(Owned::Data(c, o, d)) = out.last_mut()
                            && *c == cookie.0
                            && *o + d.len() as u64 == offset
                        {
                            d.extend_from_slice(data);
                        } else {
                            out.push(Owned::Data(cookie.0, offset, data.to_vec()));
                        }
                    }
                    Some(Event::ReadHole {
                        cookie,
                        offset,
                        length,
                    }) => out.push(Owned::Hole(cookie.0, offset, length)),
                    Some(Event::BlockStatus {
                        cookie,
                        context_id,
                        extents,
                    }) => out.push(Owned::Status(cookie.0, context_id, extents)),
                    Some(Event::Done { cookie, result }) => out.push(Owned::Done(cookie.0, result)),
                    None => break,
                }
            }
        }
        out
    }

    #[test]
    fn interleaved_read_chunks_of_two_requests_decode_in_any_fragmentation() {
        for step in [1, 3, 7, 20, 1000] {
            let mut t = Transmission::new(&info(true), 4);
            let mut out = Vec::new();
            let a = t.read(0, 8, &mut out).unwrap();
            let b = t.read(4096, 4, &mut out).unwrap();
            assert_eq!(out.len(), 2 * proto::REQUEST_LEN);
            let mut wire = chunk(0, chunk::OFFSET_DATA, a.0, &data(0, b"abcd"));
            wire.extend(chunk(
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                b.0,
                &data(4096, b"wxyz"),
            ));
            wire.extend(chunk(
                chunk::FLAG_DONE,
                chunk::OFFSET_HOLE,
                a.0,
                &hole(4, 4),
            ));
            let events = decode_all(&mut t, &wire, step);
            assert_eq!(
                events,
                vec![
                    Owned::Data(a.0, 0, b"abcd".to_vec()),
                    Owned::Data(b.0, 4096, b"wxyz".to_vec()),
                    Owned::Done(b.0, Ok(())),
                    Owned::Hole(a.0, 4, 4),
                    Owned::Done(a.0, Ok(())),
                ],
                "step {step}"
            );
            assert_eq!(t.in_flight(), 0);
        }
    }

    #[test]
    fn simple_reply_to_read_carries_the_data() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        let a = t.read(10, 3, &mut out).unwrap();
        let mut wire = simple(0, a.0);
        wire.extend_from_slice(b"xyz");
        assert_eq!(
            decode_all(&mut t, &wire, 2),
            vec![
                Owned::Data(a.0, 10, b"xyz".to_vec()),
                Owned::Done(a.0, Ok(()))
            ]
        );
    }

    #[test]
    fn error_chunk_fails_the_request_and_keeps_the_stream() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        let a = t.read(0, 512, &mut out).unwrap();
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"oops");
        p.extend_from_slice(&256u64.to_be_bytes());
        let wire = chunk(chunk::FLAG_DONE, chunk::ERROR_OFFSET, a.0, &p);
        assert_eq!(
            decode_all(&mut t, &wire, 5),
            vec![Owned::Done(
                a.0,
                Err(RequestError::Server {
                    errno: NbdErrno::Io,
                    message: "oops".into(),
                    offset: Some(256)
                })
            )]
        );
        // The next request on the same stream works.
        let b = t.read(0, 1, &mut out).unwrap();
        let wire = chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, b.0, &data(0, b"q"));
        assert_eq!(decode_all(&mut t, &wire, 64).len(), 2);
    }

    #[test]
    fn simple_error_reply_fails_a_write() {
        let mut t = Transmission::new(&info(false), 4);
        let mut out = Vec::new();
        let w = t.write(0, b"data", &mut out).unwrap();
        assert_eq!(out.len(), proto::REQUEST_LEN + 4);
        let events = decode_all(&mut t, &simple(28, w.0), 16);
        assert_eq!(
            events,
            vec![Owned::Done(
                w.0,
                Err(RequestError::Server {
                    errno: NbdErrno::NoSpace,
                    message: String::new(),
                    offset: None
                })
            )]
        );
    }

    #[test]
    fn block_status_chunks_per_context_then_done() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        let c = t.block_status(0, 1 << 20, &mut out).unwrap();
        let mut p1 = 1u32.to_be_bytes().to_vec();
        for (l, f) in [(65536u32, 0u32), (983040, 3)] {
            p1.extend_from_slice(&l.to_be_bytes());
            p1.extend_from_slice(&f.to_be_bytes());
        }
        let mut p2 = 2u32.to_be_bytes().to_vec();
        p2.extend_from_slice(&(1u32 << 20).to_be_bytes());
        p2.extend_from_slice(&1u32.to_be_bytes());
        let mut wire = chunk(0, chunk::BLOCK_STATUS, c.0, &p1);
        wire.extend(chunk(chunk::FLAG_DONE, chunk::BLOCK_STATUS, c.0, &p2));
        let ev = decode_all(&mut t, &wire, 9);
        assert_eq!(ev.len(), 3);
        assert_eq!(
            ev[0],
            Owned::Status(
                c.0,
                1,
                vec![
                    Extent {
                        length: 65536,
                        flags: 0
                    },
                    Extent {
                        length: 983040,
                        flags: 3
                    }
                ]
            )
        );
        assert_eq!(ev[2], Owned::Done(c.0, Ok(())));
    }

    #[test]
    fn write_zeroes_sends_no_payload_and_needs_the_export_flag() {
        let mut with = info(false);
        with.transmission_flags |= proto::tflag::SEND_WRITE_ZEROES;
        let mut t = Transmission::new(&with, 4);
        let mut out = Vec::new();
        let c = t.write_zeroes(512, 1 << 19, &mut out).unwrap();
        assert_eq!(out.len(), proto::REQUEST_LEN);
        assert_eq!(be16(&out, 6), cmd::WRITE_ZEROES);
        assert_eq!(be32(&out, 24), 1 << 19);
        assert_eq!(
            decode_all(&mut t, &simple(0, c.0), 4),
            vec![Owned::Done(c.0, Ok(()))]
        );

        let mut without = Transmission::new(&info(false), 4);
        assert_eq!(
            without.write_zeroes(0, 1, &mut out),
            Err(RequestError::Unsupported("write zeroes"))
        );
    }

    #[test]
    fn window_bounds_requests_in_flight() {
        let mut t = Transmission::new(&info(true), 2);
        let mut out = Vec::new();
        t.read(0, 1, &mut out).unwrap();
        t.read(0, 1, &mut out).unwrap();
        assert!(!t.can_send());
        assert_eq!(t.read(0, 1, &mut out), Err(RequestError::WindowFull(2)));
    }

    #[test]
    fn requests_are_checked_before_sending() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        assert!(matches!(
            t.read(1 << 20, 1, &mut out),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.read(0, 0, &mut out),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.read(u64::MAX, 2, &mut out),
            Err(RequestError::OutOfRange { .. })
        ));
        assert_eq!(t.write(0, b"x", &mut out), Err(RequestError::ReadOnly));
        assert_eq!(t.write_zeroes(0, 1, &mut out), Err(RequestError::ReadOnly));
        assert!(out.is_empty());
    }

    #[test]
    fn reply_for_unknown_cookie_is_a_protocol_error() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        t.read(0, 4, &mut out).unwrap();
        let wire = chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, 99, &data(0, b"abcd"));
        assert_eq!(t.decode(&wire), Err(ProtocolError::UnknownCookie(99)));
        assert!(t.is_closed());
    }

    #[test]
    fn data_chunk_outside_its_read_is_refused() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        let a = t.read(100, 4, &mut out).unwrap();
        let wire = chunk(
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            a.0,
            &data(102, b"abcd"),
        );
        assert!(matches!(
            t.decode(&wire),
            Err(ProtocolError::ChunkOutOfRange { .. })
        ));
    }

    #[test]
    fn read_finished_without_all_bytes_is_incomplete() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        let a = t.read(0, 8, &mut out).unwrap();
        let wire = chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, a.0, &data(0, b"abcd"));
        let ev = decode_all(&mut t, &wire, 100);
        assert_eq!(
            ev[1],
            Owned::Done(
                a.0,
                Err(RequestError::IncompleteRead {
                    expected: 8,
                    received: 4
                })
            )
        );
    }

    #[test]
    fn bytes_without_a_request_are_unsolicited() {
        let mut t = Transmission::new(&info(true), 4);
        assert_eq!(t.decode(&[0x66]), Err(ProtocolError::Unsolicited));
    }

    #[test]
    fn disconnect_refuses_later_requests() {
        let mut t = Transmission::new(&info(true), 4);
        let mut out = Vec::new();
        t.disconnect(&mut out);
        assert_eq!(be16(&out, 6), cmd::DISC);
        assert_eq!(t.read(0, 1, &mut out), Err(RequestError::Closed));
    }
}
