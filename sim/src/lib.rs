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
//! [`world`] puts the simulator behind the core's `Link` trait ([`world::link::FaultyLink`]:
//! commands execute at the link's virtual time, waiting jumps the clock to the next job event,
//! and the session can be dropped before a reply) and runs seeded histories of the core's
//! domain against it, with every fault kind, vbackup restarted from its store, and checkers
//! after every step (`cargo run --release -p vbackup-sim -- sweep --seeds 0..500`; the fixed
//! range is `tests/history.rs`). `cargo bench -p vbackup-sim --bench history` prints seeds per
//! second and the cost of a 200-step history.
//!
//! Fidelity is checked by replaying the recorded libvirt 11.3 ↔ QEMU 10.0.2 traces
//! (`tests/replay.rs`: same replies, same event sequence per job and export), by a test per
//! error text, by the conformance scenarios of [`scenarios`], and by seeded random QMP
//! histories whose every completed backup must restore to the disk at its point in time
//! (`tests/random_histories.rs`).
//!
//! Reads ([`Qemu::guest_read`], export views) observe the state as of the last call that moved
//! time; they never move it themselves.
//!
//! What is not modelled: image locking between nodes, snapshot
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
pub mod managed;
mod nbd;
mod node;
mod persist;
mod qcow2;
mod qemu;
pub mod scenarios;
mod transaction;
pub mod world;

pub use bitmap::Bits;
pub use bitmap_commands::bitmaps_of;
pub use errors::{QmpError, job_error};
pub use image::{
    Cluster, ClusterMap, FileContent, FileSystem, ImageError, LogicalImage, MAX_CHAIN_DEPTH,
    RawFile,
};
pub use nbd::{ExportError, ExportView};
pub use node::IoError;
pub use qcow2::{Qcow2Image, StoredBitmap};
pub use qemu::{Config, DriveLayer, Fault, Flavor, Qemu};

/// Error classes and texts (re-exported for tests of other crates).
pub mod error_classes {
    pub use crate::errors::{COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, GENERIC_ERROR, NOT_RUNNING};
}
