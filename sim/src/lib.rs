//! vbackup-sim: an in-memory QEMU block layer that executes the QMP commands vbackup-core emits.
//!
//! Contract: the simulator is deterministic. Time is virtual and only moves when the caller
//! passes a later `now_ms`; it never reads a clock, never sleeps, and no hash-map iteration
//! reaches its output, so the same calls give byte-identical replies and events. It never
//! touches the real file system.
//!
//! It speaks the QMP wire form: [`Qemu::execute`] takes `{"execute": NAME, "arguments": {...}}`
//! and answers the `return` value or a [`QmpError`] with the `class` and `desc` real QEMU 10.0
//! sends; events queue up for [`Qemu::take_events`] as `{"event", "data", "timestamp"}`. Guest
//! I/O goes through [`Qemu::guest_write`] (or a writable export, or HMP `qemu-io`), pull-mode
//! reads through [`Qemu::export_reader`], and the content checker is
//! [`FileSystem::read_image`]. [`Qemu::crash`] and [`Qemu::restart`] model an unclean death
//! and a fresh process over the same files; [`Qemu::set_fault`] injects failures.
//!
//! What is not modelled: image locking between nodes, `qemu:allocation-depth`, snapshot
//! transaction actions, mirror/commit/stream jobs, compression and discard.
#![forbid(unsafe_code)]

mod args;
mod backup;
mod bitmap;
mod bitmap_commands;
mod errors;
mod guest;
mod image;
mod job;
pub mod link;
mod nbd;
mod node;
mod persist;
mod qcow2;
mod qemu;
mod transaction;
pub mod world;

pub use bitmap::Bits;
pub use bitmap_commands::bitmaps_of;
pub use errors::{QmpError, job_error};
pub use image::{
    Cluster, ClusterMap, FileContent, FileSystem, ImageError, MAX_CHAIN_DEPTH, RawFile,
};
pub use nbd::{ExportError, ExportView};
pub use node::IoError;
pub use qcow2::{Qcow2Image, StoredBitmap};
pub use qemu::{Config, Fault, Flavor, Qemu};

/// Error classes and texts (re-exported for tests of other crates).
pub mod error_classes {
    pub use crate::errors::{COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, GENERIC_ERROR, NOT_RUNNING};
}
