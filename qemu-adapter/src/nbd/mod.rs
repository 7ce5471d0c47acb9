//! vbackup's own NBD client, used to read pull-mode backup exports.
//!
//! Layers, from the wire up: [`proto`] (constants and wire helpers), [`handshake`] (sans-IO
//! fixed-newstyle negotiation), [`client`] (sans-IO transmission codec with several requests in
//! flight), [`socket`] (a thin blocking loop over unix or TCP sockets that implements
//! [`vbackup_core::export::ExportReader`]) and [`copy`] (copying dirty or allocated extents into
//! a destination). The sans-IO parts never panic on input and bound every buffer.
//!
//! Copying the dirty extents of a pull export into an earlier full copy brings that copy to
//! the export's point in time:
//!
//! ```no_run
//! use vbackup_qemu::nbd::{copy, dirty_bitmap_context, FileSink, NbdClient};
//!
//! let context = dirty_bitmap_context("backup-vda");
//! let mut client = NbdClient::connect_unix("/run/vbackup/nbd.sock", "vda", &[&context])?;
//! let file = std::fs::OpenOptions::new().write(true).open("/backups/vda.raw")?;
//! let report = copy::copy_dirty(&mut client, "backup-vda", &mut FileSink::overwrite(&file))?;
//! println!("{} bytes in {} ranges", report.bytes_copied, report.ranges);
//! client.disconnect()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Contract: a connection negotiates its meta contexts once, at connect time; asking for one the
//! export does not offer is [`HandshakeError::MetaContextUnavailable`], a missing export is
//! [`HandshakeError::UnknownExport`]. A request the server fails is reported and the connection
//! stays usable; a protocol violation, a socket error or a closed connection leaves the client
//! unusable ([`RequestError::Closed`] afterwards). Requests are not aligned by the client: callers
//! reading at odd offsets rely on the server accepting them (QEMU announces a 1-byte minimum).

pub mod client;
pub mod copy;
pub mod error;
pub mod handshake;
pub mod proto;
pub mod robustness;
pub mod socket;

pub use client::{Cookie, Event, Transmission};
pub use copy::{CopyReport, ExtentSink, FileSink, NbdSink};
pub use error::{HandshakeError, NbdError, ProtocolError, RequestError};
pub use handshake::{ExportInfo, Handshake, HandshakeConfig, MetaContext};
pub use socket::NbdClient;

/// Name of the allocation meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Name of the meta context of a QEMU dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}
