//! vbackup-core: the pure, deterministic heart of vbackup.
//!
//! Contract: nothing in this crate performs IO, reads a clock, reads the environment or draws
//! random numbers. Time arrives as an argument, identifiers come from counters, and every map that
//! can reach an output is ordered. Given the same inputs, the core produces the same outputs, byte
//! for byte. Errors are values; no input makes the core panic.
//!
//! # Embedding
//!
//! An embedder owns the QEMU process (or qemu-storage-daemon) and its QMP socket; the engine
//! says what to send. One [`Domain`] per VM: feed it every [`Input`] with the current time
//! and carry out every [`Output`] it returns, in order; feed [`Input::Tick`] when
//! [`Domain::next_deadline`] passes. The types an embedder needs are re-exported here.
//!
//! The restart contract: carry out every [`Output::Persist`] durably, in order, before the
//! next command goes to QEMU (or keep the [`StoreOp`]s and fold them with
//! [`StoredState::apply`]); after a restart, rebuild the domain with [`Domain::from_stored`]
//! and feed [`Input::Reconnected`] once a fresh QMP session is open. The engine reconciles
//! on its own: a journaled backup is resumed or concluded, leftovers it owns are removed,
//! and drift is reported with [`DomainEvent::BitmapDrift`].
//!
//! The whole run loop, over a QMP transport of your own (`MyQmp` reads and writes QMP JSON on
//! a socket; `MyStore` persists store operations; both are yours):
//!
//! ```no_run
//! use std::collections::VecDeque;
//!
//! use vbackup_core::{
//!     CheckpointDef, CheckpointMode, CommandId, Domain, DomainConfig, FileOp, Input, Output,
//!     QmpCommand, QmpIn, Request, RequestId, StoreOp, StoredState, Timestamp,
//!     align_checkpoint, parse_domain,
//! };
//!
//! # struct MyQmp;
//! # impl MyQmp {
//! #     fn now_ms(&self) -> u64 { 0 }
//! #     fn send(&mut self, _id: &CommandId, _cmd: &QmpCommand) {}
//! #     fn recv(&mut self, _deadline_ms: Option<u64>) -> Option<QmpIn> { None }
//! # }
//! # struct MyStore;
//! # impl MyStore {
//! #     fn load(&self) -> StoredState { StoredState::default() }
//! #     fn write(&mut self, _op: &StoreOp) {}
//! # }
//! # fn do_file(_op: &FileOp) -> Result<(), vbackup_core::FileError> { Ok(()) }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (mut qmp, mut store) = (MyQmp, MyStore);
//! # let domain_xml = "";
//! let def = parse_domain(domain_xml)?;
//! // After a restart the store holds checkpoints, a backup journal, pending creations.
//! let mut domain = Domain::from_stored(def.clone(), DomainConfig::default(), store.load());
//!
//! // A fresh QMP session is open (greeting read): the engine negotiates and reconciles.
//! let mut inputs = VecDeque::from([Input::Reconnected]);
//! // Ask for a checkpoint: XML as libvirt takes it, aligned with the domain's disks.
//! let cp = CheckpointDef::parse("<domaincheckpoint><name>c1</name></domaincheckpoint>",
//!     CheckpointMode::Create)?;
//! let checkpoint = vbackup_core::Checkpoint::from_def(&align_checkpoint(&cp, &def)?)?;
//! inputs.push_back(Input::Request(RequestId(1), Request::CheckpointCreate {
//!     checkpoint,
//!     quiesce: false,
//! }));
//!
//! loop {
//!     let now = Timestamp::from_ms(qmp.now_ms());
//!     while let Some(input) = inputs.pop_front() {
//!         for output in domain.handle(now, input) {
//!             match output {
//!                 Output::Send(id, command) => qmp.send(&id, &command),
//!                 // Durable before the next command is sent.
//!                 Output::Persist(op) => store.write(&op),
//!                 Output::File(id, op) => {
//!                     let result = do_file(&op);
//!                     inputs.push_back(Input::FileDone(id, result));
//!                 }
//!                 Output::Respond(RequestId(1), result) => {
//!                     println!("checkpoint: {result:?}");
//!                     return Ok(());
//!                 }
//!                 Output::Respond(..) | Output::Emit(_) => {}
//!             }
//!         }
//!     }
//!     // Wait for QEMU until the engine's next deadline.
//!     let deadline = domain.next_deadline().map(Timestamp::as_ms);
//!     match qmp.recv(deadline) {
//!         Some(QmpIn::Reply { id: Some(id), result }) => {
//!             inputs.push_back(Input::Reply(id, result));
//!         }
//!         Some(QmpIn::Event(event)) => inputs.push_back(Input::Event(event)),
//!         Some(_) => {}
//!         None => inputs.push_back(Input::Tick),
//!     }
//! }
//! # }
//! ```
//!
//! [`driver::Driver`] is this loop, generic over a [`Link`] (the QMP transport and its clock)
//! and [`Effects`] (the store and file operations), and `core/examples/` has both ways run
//! against qemu-storage-daemon.
//!
//! # Modules
//!
//! The crate holds the libvirt-compatible XML formats ([`xml`]), the domain model ([`model`]),
//! the reader interface of pull exports ([`export`]), the QMP vocabulary ([`qmp`]), the links QMP
//! travels over and their clock ([`link`]), the managed-backup catalogue ([`catalogue`]) and
//! its machine ([`managed`]), and the per-domain state machine that decides every QMP command
//! ([`domain`]).
//!
//! # Stability
//!
//! What the crate root re-exports and the modules above are the API. Internals that the
//! simulator, the tests and the command line also reach into sit under [`unstable`]: the
//! recorded-trace format, the backing-chain checks, the job slots and the RELAX NG engine. They
//! may change in any release.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backup;
pub mod catalogue;
mod chain;
pub mod checkpoint;
pub mod domain;
pub mod driver;
pub mod error;
pub mod export;
mod jobs;
mod kernel;
pub mod link;
pub mod managed;
pub mod model;
mod protocol;
pub mod qmp;
mod reconcile;
mod trace;
pub mod xml;

pub mod unstable {
    //! Internals without a stability promise: reachable for the simulator, the tests, the
    //! command line and the curious, and free to change in any release.

    pub mod chain {
        //! Backing chains: node tables and the checks a chain must pass before a job.
        pub use crate::chain::*;
    }
    pub mod jobs {
        //! The job slots that keep conflicting jobs apart.
        pub use crate::jobs::*;
    }
    pub mod trace {
        //! The recorded-trace format: QMP traffic, one message per line.
        pub use crate::trace::*;
    }
    pub mod relaxng {
        //! The RELAX NG schema compiler the XML validation uses.
        pub use crate::xml::relaxng::*;
    }
    pub mod schema {
        //! The compiled grammar and the validator the XML formats run on every parse.
        pub use crate::xml::schema::*;
    }
    pub mod xml_writer {
        //! The XML writer that formats documents as libvirt does.
        pub use crate::xml::writer::*;
    }
}

// The API an embedder needs, at the crate root.
pub use backup::{
    BackupDiskSpec, BackupMode, BackupPlan, BackupSpec, BackupStore, DiskJobState, JobStats,
    NbdServer, NbdTransport, StoreKind,
};
pub use checkpoint::{Checkpoint, CheckpointTree, DeleteScope, ListFilter};
pub use domain::{
    BitmapDrift, Domain, DomainConfig, DomainEvent, DomainView, FileError, FileErrorKind, FileOp,
    FileOpId, Input, Output, PushWrite, Reply, Request, RequestId, StoreOp, StoredState, TlsConfig,
};
pub use driver::{DriveError, Driver, Effects};
pub use error::{ConflictError, Error, RequestError};
pub use link::{CommandId, Link, LinkError, Timestamp};
pub use model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
pub use qmp::{QmpCommand, QmpError, QmpEvent, QmpIn};
pub use xml::{
    BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode, XmlError, align_backup,
    align_checkpoint, parse_domain, validate_document,
};
