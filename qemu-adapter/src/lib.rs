//! vbackup-qemu: everything that touches the real world on behalf of vbackup-core.
//!
//! Contract: this crate performs the IO the core asks for and nothing else decides policy here.
//! It speaks QMP to a real QEMU or qemu-storage-daemon over a unix socket, launches and stops
//! qemu-storage-daemon for managed domains, reads NBD exports, and keeps the on-disk store with
//! atomic writes.
//!
//! - [`qmp_socket`]: the blocking QMP client ([`qmp_socket::QmpSocket`]) and
//!   [`qmp_socket::SocketLink`], the core's `Link` over it.
//! - [`recorder`]: [`recorder::TraceRecorder`], a `Link` wrapper streaming the JSONL trace.
//! - [`qsd`]: starting, reconnecting to and stopping qemu-storage-daemon for managed domains.
//! - [`store`]: the state directory (domains, checkpoints, backups, journal) and its locks.
//! - [`nbd`]: the NBD client for pull-mode exports.
//! - [`qcow2`]: reading qcow2 and raw images and their backing chains straight from their
//!   files.
//! - [`qcow2_writer`]: new qcow2 images a pull copy writes straight into their files.
//! - [`images`]: backup images (overlays, extent writes through NBD, chains, digests).
//! - [`children`]: the helpers vbackup starts die with it, and what a killed vbackup left is
//!   cleaned by the next one.
//! - [`discover`]: an attached domain's disks from query-block, block exports and the block
//!   graph.
//! - [`restore`]: restoring a backup chain into new images or over existing disks.
//! - [`live`]: the harness for tests against real qemu-storage-daemon.
//! - [`vm`]: running a real qemu-system-x86_64 VM without a guest OS, for tests against a
//!   running QEMU.
//! - [`writeout`]: making push targets durable, and writing them out while the job runs.

pub mod children;
pub mod digest;
pub mod discover;
pub mod images;
pub mod live;
pub mod nbd;
pub mod qcow2;
pub mod qcow2_writer;
pub mod qmp_socket;
pub mod qsd;
pub mod recorder;
pub mod restore;
pub mod store;
pub mod vm;
pub mod writeout;
