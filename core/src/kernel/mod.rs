//! The kernel: what every state machine of the core shares, and nothing else.
//!
//! Shape (each machine depends on this module and on leaf modules only, never on the router
//! [`crate::domain`] nor on another machine):
//! - [`timers`]: one table of deadlines per machine, keyed by a machine-specific timer kind.
//!   A machine's `next_deadline` is its table's earliest entry; on `Tick` it takes the expired
//!   entries in key order. No deadline is computed anywhere else.
//! - [`retry`]: the back-off every refused cleanup, repair or negotiation waits before trying
//!   again.
//!
//! The QMP-facing machines ([`crate::Domain`] routes to them: checkpoint operations, backup
//! runs, reconcile) additionally share the domain's state and output sink:
//! - [`state`]: the domain's data ([`state::Core`]), reply owners and tags, and the timer
//!   kinds of the domain's table ([`state::Timer`]);
//! - [`ctx`]: the sink outputs go to, which also keeps the commands in flight and the timers;
//! - [`qemu`] and [`commands`]: reading QEMU's answers and building the commands to send;
//! - [`checkpoints`]: what creating a checkpoint needs, alone or inside a backup.
//!
//! Machines that do not talk to QEMU (managed backups) share only timers, retry and the
//! "outputs as values" discipline.
pub(crate) mod checkpoints;
pub(crate) mod commands;
pub(crate) mod ctx;
pub(crate) mod qemu;
pub(crate) mod retry;
pub(crate) mod state;
pub(crate) mod timers;

pub use retry::RETRY_MAX_MS;
