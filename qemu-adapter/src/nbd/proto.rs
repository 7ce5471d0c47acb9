//! NBD wire constants and the small fixed-size wire types (big-endian on the wire).
//!
//! Only the parts of the protocol vbackup speaks are named here: the fixed-newstyle handshake,
//! the options it sends, the replies it understands, and the transmission commands and reply
//! chunks of structured and simple replies.

/// First eight bytes the server sends: `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle marker (`IHAVEOPT`); also prefixes every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag from the server: fixed newstyle is supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag from the server: the client may skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes the client sends.
pub mod opt {
    /// Ends the handshake without entering transmission.
    pub const ABORT: u32 = 2;
    /// Selects an export and enters transmission, with info replies.
    pub const GO: u32 = 7;
    /// Asks for structured replies during transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// Lists the meta contexts an export offers.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Selects the meta contexts for block status.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// The option is done.
    pub const ACK: u32 = 1;
    /// Information about the export (NBD_OPT_GO / NBD_OPT_INFO).
    pub const INFO: u32 = 3;
    /// One meta context: a 32-bit id and its name.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply type.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// Not available on this platform.
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// The server requires block size negotiation.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    /// The request or reply would be too big.
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
}

/// Information types inside `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags of an export (from `NBD_INFO_EXPORT`).
pub mod tflag {
    /// The other flags are meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// The server accepts NBD_CMD_FLUSH.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The server accepts the FUA command flag.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The server accepts NBD_CMD_WRITE_ZEROES.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections see a consistent view.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Transmission command types.
pub mod cmd {
    /// Read data.
    pub const READ: u16 = 0;
    /// Write data.
    pub const WRITE: u16 = 1;
    /// Disconnect; the server sends no reply.
    pub const DISC: u16 = 2;
    /// Flush written data to stable storage.
    pub const FLUSH: u16 = 3;
    /// Make a range read as zeroes, without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status for the negotiated meta contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Flag: this is the last chunk of its request.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty chunk, used to finish a request.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A run of zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Extents for one meta context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set on every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// An error for the whole request.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// An error at a given offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;

/// Largest option reply payload accepted. Names and messages are at most 4 KiB by the protocol;
/// this leaves room for info replies and is small enough that hostile input cannot exhaust memory.
pub const MAX_OPTION_REPLY_PAYLOAD: u32 = 64 * 1024;
/// Largest payload accepted in a structured chunk that is not read data (block status, errors).
/// QEMU sends at most 128 Ki extents per chunk, which is 1 MiB.
pub const MAX_METADATA_CHUNK_PAYLOAD: u32 = 4 * 1024 * 1024;
/// Largest single request the client issues unless the server announces a smaller maximum.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;
/// Longest export name or meta context query sent (the protocol bound on strings).
pub const MAX_STRING_LEN: usize = 4096;

/// An errno value carried by NBD replies, with the values the protocol defines named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdErrno {
    /// EPERM: operation not permitted.
    NotPermitted,
    /// EIO: input/output error.
    Io,
    /// ENOMEM: out of memory.
    NoMemory,
    /// EINVAL: invalid argument.
    Invalid,
    /// ENOSPC: no space left.
    NoSpace,
    /// EOVERFLOW: value too large.
    Overflow,
    /// ENOTSUP: not supported.
    NotSupported,
    /// ESHUTDOWN: the server is shutting down.
    Shutdown,
    /// A value the protocol does not define.
    Other(u32),
}

impl NbdErrno {
    /// Maps the wire value.
    pub fn from_wire(value: u32) -> Self {
        match value {
            1 => Self::NotPermitted,
            5 => Self::Io,
            12 => Self::NoMemory,
            22 => Self::Invalid,
            28 => Self::NoSpace,
            75 => Self::Overflow,
            95 => Self::NotSupported,
            108 => Self::Shutdown,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotPermitted => f.write_str("EPERM"),
            Self::Io => f.write_str("EIO"),
            Self::NoMemory => f.write_str("ENOMEM"),
            Self::Invalid => f.write_str("EINVAL"),
            Self::NoSpace => f.write_str("ENOSPC"),
            Self::Overflow => f.write_str("EOVERFLOW"),
            Self::NotSupported => f.write_str("ENOTSUP"),
            Self::Shutdown => f.write_str("ESHUTDOWN"),
            Self::Other(v) => write!(f, "errno {v}"),
        }
    }
}

/// Human name of an option code, for error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::ABORT => "NBD_OPT_ABORT",
        opt::GO => "NBD_OPT_GO",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// Reads a big-endian u16 at `at`; the caller has checked the length.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at`; the caller has checked the length.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u64 at `at`; the caller has checked the length.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Appends a transmission request header.
pub(crate) fn put_request(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends an option header and its payload.
pub(crate) fn put_option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    // Payloads are built from bounded strings, far below 4 GiB.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}
