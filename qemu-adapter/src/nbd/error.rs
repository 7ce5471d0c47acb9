//! Typed errors of the NBD client, sorted by who is at fault.

use super::proto::NbdErrno;

/// The server broke the protocol: the connection cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number did not match.
    #[error("bad magic {found:#x} in {what}")]
    BadMagic {
        /// Which message carried it.
        what: &'static str,
        /// The value received.
        found: u64,
    },
    /// The server does not offer fixed newstyle negotiation.
    #[error("server does not offer fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// An option reply answered another option than the one sent.
    #[error("reply to option {got} while waiting for option {expected}")]
    WrongOption {
        /// The option sent.
        expected: u32,
        /// The option named in the reply.
        got: u32,
    },
    /// A reply type that is not allowed at this point.
    #[error("unexpected reply type {kind:#x} to {what}")]
    UnexpectedReply {
        /// What was being answered.
        what: &'static str,
        /// The reply or chunk type.
        kind: u32,
    },
    /// A length field exceeds what the client accepts.
    #[error("{what} of {length} bytes exceeds the limit of {limit}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The announced length.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// A payload does not have the layout its type requires.
    #[error("malformed {what}")]
    Malformed {
        /// Which payload.
        what: &'static str,
    },
    /// A reply carries a cookie that no request in flight has.
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(u64),
    /// A read chunk lies outside the request it answers.
    #[error("chunk at offset {offset} length {length} lies outside its request")]
    ChunkOutOfRange {
        /// Start of the chunk.
        offset: u64,
        /// Length of the chunk.
        length: u64,
    },
    /// A block status chunk names a meta context that was not negotiated.
    #[error("block status for meta context id {0} that was not negotiated")]
    UnknownContextId(u32),
    /// The server sent too many items of a list.
    #[error("too many {what} (limit {limit})")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// The server sent bytes while no request was in flight and no reply was expected.
    #[error("unsolicited data from the server")]
    Unsolicited,
}

/// Why the handshake did not reach transmission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The server broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The export does not exist on this server.
    #[error("the server has no export named {export:?}: {message}")]
    UnknownExport {
        /// The name asked for.
        export: String,
        /// The server's message.
        message: String,
    },
    /// A meta context asked for (a dirty bitmap, usually) is not offered by the export.
    #[error("export does not offer meta context {context:?} (it offers {offered:?})")]
    MetaContextUnavailable {
        /// The context asked for.
        context: String,
        /// What the export lists.
        offered: Vec<String>,
    },
    /// Meta contexts were asked for but the server refuses structured replies.
    #[error("server refuses structured replies, so block status is unavailable")]
    StructuredRepliesUnsupported,
    /// The server refused an option for another reason.
    #[error("server refused {option}: reply {reply:#x}: {message}")]
    OptionRefused {
        /// The option's name.
        option: &'static str,
        /// The error reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// An export name or context name is longer than the protocol allows.
    #[error("name of {length} bytes exceeds the protocol limit of 4096")]
    NameTooLong {
        /// Its length.
        length: usize,
    },
    /// The server closed the connection during the handshake.
    #[error("server closed the connection during the handshake")]
    Closed,
}

/// A request the client refused to send, or the server answered with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The server answered with an error.
    #[error("server error {errno}{}: {message}", offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
    Server {
        /// The error value.
        errno: NbdErrno,
        /// The server's message (empty for simple replies).
        message: String,
        /// Where the error happened, when the server says.
        offset: Option<u64>,
    },
    /// The range is empty or reaches past the end of the export.
    #[error("range offset {offset} length {length} is empty or past the export size {size}")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// A single request longer than the server accepts.
    #[error("request of {length} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Requested length.
        length: u64,
        /// The maximum.
        max: u32,
    },
    /// A write or flush on a read-only export.
    #[error("the export is read-only")]
    ReadOnly,
    /// The export does not support this command.
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    /// Block status for a meta context that was not negotiated at connect time.
    #[error("meta context {0:?} was not negotiated")]
    ContextNotNegotiated(String),
    /// The window of requests in flight is full.
    #[error("{0} requests already in flight")]
    WindowFull(usize),
    /// The read finished without covering its whole range.
    #[error("read reply covered {received} of {expected} bytes")]
    IncompleteRead {
        /// Bytes asked for.
        expected: u64,
        /// Bytes covered by data and hole chunks.
        received: u64,
    },
    /// Block status finished without extents for the context asked for.
    #[error("block status reply carried no extents for the meta context")]
    NoExtents,
    /// Transmission has ended (after disconnect or a protocol error).
    #[error("the connection is closed")]
    Closed,
}

/// Any failure of the blocking client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("NBD socket: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The server broke the protocol during transmission.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The server closed the connection while replies were outstanding.
    #[error("server closed the connection with {in_flight} requests in flight")]
    Closed {
        /// Requests without a reply.
        in_flight: usize,
    },
    /// The destination of a copy failed.
    #[error("copy destination: {0}")]
    Sink(std::io::Error),
}
