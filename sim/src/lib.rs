//! vbackup-sim: an in-memory QEMU block layer that executes the QMP commands vbackup-core emits.
//!
//! Contract: the simulator is deterministic. All randomness comes from a seed (ChaCha8), time is
//! virtual and only moves when the driver says so, and the same seed yields a byte-identical
//! trace. It never touches the real file system or clock.
#![forbid(unsafe_code)]
