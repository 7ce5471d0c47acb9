//! vbackup-core: the pure, deterministic heart of vbackup.
//!
//! Contract: nothing in this crate performs IO, reads a clock, reads the environment or draws
//! random numbers. Time arrives as an argument, identifiers come from counters, and every map that
//! can reach an output is ordered. Given the same inputs, the core produces the same outputs, byte
//! for byte. Errors are values; no input makes the core panic.
//!
//! The crate holds the libvirt-compatible XML formats ([`xml`]), the domain model ([`model`]),
//! the reader interface of pull exports ([`export`]), the QMP vocabulary ([`qmp`]), the links QMP
//! travels over and their clock ([`link`]), the recorded-trace format ([`trace`]), and the
//! per-domain state machine that decides every QMP command.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backup;
pub mod catalogue;
pub mod chain;
pub mod checkpoint;
pub mod domain;
pub mod driver;
pub mod error;
pub mod export;
pub mod jobs;
mod kernel;
pub mod link;
pub mod managed;
pub mod model;
pub mod qmp;
pub mod trace;
pub mod xml;

pub use domain::Domain;
