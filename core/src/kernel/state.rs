//! The state every QMP-facing machine of a domain shares: the domain's data ([`Core`]), who
//! waits for which reply ([`Owner`] and the machines' reply tags), and the timer kinds of the
//! domain's one timer table ([`Timer`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::backup::JobStats;
use crate::checkpoint::CheckpointTree;
use crate::jobs::JobSlots;
use crate::link::CommandId;
use crate::model::DomainDef;
use crate::protocol::{DomainConfig, RequestId};

/// Who waits for a command's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    Session(SessionTag),
    Short(ShortTag),
    Backup(BackupTag),
}

/// Steps of the session itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionTag {
    Capabilities,
    DriftQuery,
    /// Removal number `n` of the reconcile pass.
    Repair(usize),
}

/// A command sent and not yet answered.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Who waits for the reply.
    pub owner: Owner,
    /// The command's QMP name (for errors).
    pub name: String,
}

/// The part of the domain every operation may read and change.
#[derive(Debug)]
pub(crate) struct Core {
    pub def: DomainDef,
    pub config: DomainConfig,
    pub tree: CheckpointTree,
    pub jobs: JobSlots,
    pub connected: bool,
    pub completed: Option<JobStats>,
    /// Checkpoints (and their disks) whose bitmap chain the last reconcile found missing or
    /// broken.
    pub invalid: BTreeMap<String, BTreeSet<String>>,
    /// The checkpoints whose creation was recorded before their transaction and not yet
    /// cleared ([`crate::protocol::StoreOp::SetPendingCheckpoints`]).
    pub pending_checkpoints: BTreeSet<String>,
    /// QEMU refused `x-perf` (it predates the knob): push backups copy without offload.
    pub copy_offload_refused: bool,
    /// Negotiations in a row that failed on this session (the back-off grows with it).
    pub negotiate_attempt: u32,
    /// The host vouched that the QEMU of the next session holds exactly what the store
    /// describes ([`crate::Domain::trusting_qemu`]): its reconcile pass may be skipped. Used
    /// up by the first negotiated session.
    pub trusted: bool,
    /// QEMU is known to hold exactly what the store describes: the session was reconciled
    /// cleanly (or trusted) and every command since was answered with success.
    pub in_step: bool,
    /// Commands QEMU refused or left unanswered on this engine's sessions, all told.
    pub refusals: u64,
}

/// A reply's owner tag: the step it answers within the short operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShortTag {
    /// The bitmap-add transaction of a create.
    CreateTransaction,
    /// The node query of a validated redefinition.
    ValidateQuery,
    /// The node query before removing a checkpoint's bitmaps.
    DeleteQuery,
    /// A command of the removal batch (reopens and the transaction).
    DeleteBatch {
        /// Whether this is the removal transaction itself.
        transaction: bool,
    },
    /// The first node query of a size computation.
    SizeQuery,
    /// A command of the size batch.
    SizeBatch(SizeStep),
}

/// Steps of the size batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeStep {
    /// Removal of stale temporary bitmaps.
    Clean,
    /// Add and merge.
    Merge,
    /// Reading the counts.
    Query,
    /// Removal of the temporary bitmaps.
    Remove,
}

/// The step a backup reply answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackupTag {
    /// The first node query.
    Query,
    /// The current queued step.
    Step,
    /// `query-jobs` checking an image-creation job.
    CreateJobCheck(String),
    /// `query-jobs` after a job concluded (or after a reconnection).
    Poll,
    /// `query-jobs` for a statistics request.
    Stats(RequestId),
}

/// Everything of a domain that expires, one entry per kind in the domain's timer table. The
/// order of the variants is the order in which expired timers are handled on a tick.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// The reply to a command is overdue (the command timeout after it was sent).
    Reply(CommandId),
    /// `qmp_capabilities`, refused or unanswered on this session, is sent again: a session
    /// that never negotiates must not leave the domain waiting with no deadline.
    Negotiate,
    /// The next reconcile pass starts.
    Reconcile,
    /// A deadline of the running backup.
    Backup(BackupTimer),
}

/// The deadlines of a running backup. Retries carry the sequence number under which the run
/// keeps what to try again, so several can be armed at once and expire in the order they
/// were armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum BackupTimer {
    /// The reconnection's `query-jobs` failed: ask again.
    Poll,
    /// QEMU refused the check of a job's end: check again.
    CheckRetry(u64),
    /// A refused cleanup command is tried again.
    Retry(u64),
    /// The current wait for something that is not a command reply (a file operation, an
    /// image-creation job's conclusion) took too long.
    Wait,
}
