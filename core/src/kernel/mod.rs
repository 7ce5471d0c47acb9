//! The kernel: what every state machine of the core shares, and nothing else.
//!
//! Shape (each machine depends on this module only, never on another machine):
//! - [`timers`]: one table of deadlines per machine, keyed by a machine-specific timer kind.
//!   A machine's `next_deadline` is its table's earliest entry; on `Tick` it takes the expired
//!   entries in key order. No deadline is computed anywhere else.
//! - [`retry`]: the back-off every refused cleanup, repair or negotiation waits before trying
//!   again.
//!
//! The QMP-facing machines ([`crate::Domain`] and the sub-machines it routes to: checkpoint
//! operations, backup runs, reconcile) additionally share the domain's state and output sink,
//! which live here too once they leave the router; machines that do not talk to QEMU (managed
//! backups) share only timers, retry and the "outputs as values" discipline.
pub(crate) mod retry;
pub(crate) mod timers;

pub use retry::RETRY_MAX_MS;
