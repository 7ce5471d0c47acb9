//! vbackup's host runtime: carries out on a real host what the core decides.
//!
//! Contract:
//! - The core (`vbackup-core`) decides every QMP command and every store write; this crate
//!   opens and locks the store ([`session`]), connects to QEMU or starts qemu-storage-daemon,
//!   drives the core's machine and performs its effects ([`effects`]).
//! - It defines domains from the host's images ([`domains`]), reads the host configuration
//!   ([`config`]) and keeps the checkpoint index ([`checkpoint_index`]); [`layout`] names every
//!   file it keeps.
//! - Nothing here prints to stdout: results are values, and failures typed [`Error`]s the
//!   command line words for its user. Warnings a user must see while a command runs (a lost
//!   bitmap, a restarted daemon) go to stderr as they happen.

pub mod catalogue_index;
pub mod checkpoint_index;
pub mod checkpoints;
pub mod config;
pub mod demo;
pub mod documents;
pub mod domains;
pub mod effects;
pub mod error;
pub mod jobs;
pub mod layout;
pub mod managed_ops;
pub mod managed_runtime;
pub mod processes;
pub mod session;
pub mod target_hashes;
pub mod units;
pub mod views;
pub mod xpath;

pub use error::{Error, Result};
