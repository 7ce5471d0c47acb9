//! vbackup-qemu: everything that touches the real world on behalf of vbackup-core.
//!
//! Contract: this crate performs the IO the core asks for and nothing else decides policy here.
//! It speaks QMP to a real QEMU or qemu-storage-daemon over a unix socket, launches and stops
//! qemu-storage-daemon for managed domains, reads NBD exports, and keeps the on-disk store with
//! atomic writes.

pub mod live;
pub mod nbd;
pub mod qmp_socket;
pub mod qsd;
pub mod store;
