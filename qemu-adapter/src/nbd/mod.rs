//! vbackup's own NBD client, used to read pull-mode backup exports.
//!
//! Layers, from the wire up: [`proto`] (constants and wire helpers), [`handshake`] (sans-IO
//! fixed-newstyle negotiation), [`client`] (sans-IO transmission codec with several requests in
//! flight), [`socket`] (a thin blocking loop over unix or TCP sockets that implements
//! [`vbackup_core::export::ExportReader`]) and [`copy`] (copying dirty or allocated extents into
//! a destination). The sans-IO parts never panic on input and bound every buffer.

pub mod client;
pub mod copy;
pub mod error;
pub mod handshake;
pub mod proto;
pub mod robustness;
pub mod socket;

pub use client::{Cookie, Event, Transmission};
pub use copy::{CopyReport, ExtentSink, FileSink};
pub use error::{HandshakeError, NbdError, ProtocolError, RequestError};
pub use handshake::{ExportInfo, Handshake, HandshakeConfig, MetaContext};
pub use socket::NbdClient;

/// Name of the allocation meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Name of the meta context of a QEMU dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}
