//! Managed backups as a state machine beside [`crate::Domain`]: the catalogue operations
//! (create push or pull, full or incremental; finish and cancel; verify; delete with or
//! without children; consolidate; restore to new images, a new domain or over the disks;
//! default target) and their crash protocol.
//!
//! Contract (the same as the domain's):
//! - [`Managed::handle`] is pure: time is an argument, file, store and domain work leaves as
//!   [`ManagedOutput::Effect`] values answered by [`ManagedInput::Done`], effect ids come from a counter,
//!   no input panics, errors are [`ManagedError`] values. One operation runs at a time and
//!   has at most one effect outstanding; a second request is refused with
//!   [`ManagedError::Busy`].
//! - The machine talks to its domain's engine only through [`crate::Request`] and
//!   [`crate::Reply`] values ([`Effect::Domain`]).
//! - Crash protocol: a [`Journal`] is written before each step that can be interrupted, and
//!   a machine rebuilt from the stored records and journal ([`Managed::new`]) concludes what
//!   was left before its next operation: a backup in flight is a journaled pending record
//!   (recorded if its job succeeded, else discarded: images, per-backup directory and
//!   checkpoint removed), never inferred from file times; a deletion is repeated; a
//!   replacement (consolidation, restore) is undone before its commit point and finished
//!   after it.
//!
//! Rules it decides:
//! - An operation that cannot finish leaves every backup as it was: a consolidation first
//!   checks every image of the chain against its recorded digest, then writes each new image
//!   beside the old one, checks it against the recorded digest, syncs it and only then
//!   renames it into place and rewrites the record.
//! - Nothing takes over an existing domain: a restore to a new domain refuses an existing
//!   name before anything is written.
//! - A restore over the disks creates each new image like the one it replaces (options,
//!   owner, group, mode), checks it, then renames it into place, and removes from the
//!   checkpoint metadata exactly the disks it replaced (a checkpoint left without any disk
//!   loses its metadata; the other disks' bitmaps stay owned).
//! - A backup target directory must exist: the machine creates only the per-backup directory
//!   inside it (without parents) and removes it when the backup fails.
//! - A damaged record affects only itself: the catalogue loads the intact ones
//!   ([`crate::catalogue::Catalogue::load_tolerant`]); the damaged one is listed by
//!   [`Managed::damaged`] naming its file and can be deleted; a damaged journal still lets
//!   a cancel end the job.

mod effect;
mod journal;
mod machine;
#[cfg(test)]
mod tests;

pub use effect::{DigestBase, Effect, EffectError, EffectId, ImageFacts, Outcome};
pub use journal::{Journal, NewDomain, PendingBackup};
pub use machine::Managed;

use std::collections::BTreeMap;

use crate::backup::BackupSpec;
use crate::catalogue::{CatalogueError, Digest, ManagedBackup, StoredRecord};
use crate::checkpoint::Checkpoint;
use crate::model::ImageFormat;

/// Identifies a request so its answer can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallId(pub u64);

/// Everything that can happen to the machine.
#[derive(Debug, Clone)]
pub enum ManagedInput {
    /// A caller asks for something.
    Request(CallId, ManagedRequest),
    /// The runtime carried out an effect.
    Done(EffectId, Result<Outcome, EffectError>),
    /// Time passed (`now` is past [`Managed::next_deadline`]).
    Tick,
    /// The domain's backup job was seen to end (its events arrived): a wait for it asks the
    /// domain now instead of at its next poll. Sent too early or when nothing waits, it costs
    /// one question at most: the machine still takes the domain's answer, not this hint.
    JobEnded,
}

/// What the machine asks for, in order.
#[derive(Debug, Clone)]
pub enum ManagedOutput {
    /// Carry out an effect and answer with [`ManagedInput::Done`].
    Effect(EffectId, Effect),
    /// Answer a request.
    Respond(CallId, Result<ManagedReply, ManagedError>),
}

/// What the store holds for one domain, read back after a restart.
#[derive(Debug, Clone, Default)]
pub struct StoredManaged {
    /// The record files.
    pub records: Vec<StoredRecord>,
    /// The default target directory, if set.
    pub default_target: Option<String>,
    /// The journal file, if present: `(file name, text)`.
    pub journal: Option<(String, String)>,
}

/// A new backup.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    /// The new backup's uuid (canonical lowercase).
    pub uuid: String,
    /// The checkpoint created atomically with it, aligned with the domain.
    pub checkpoint: Checkpoint,
    /// The aligned backup definition: which disks, push or pull. The machine sets every
    /// included disk incremental from the parent's checkpoint (or full) and, for a push
    /// disk without a target path, its target `<target dir>/<uuid>/<disk>.qcow2`.
    pub spec: BackupSpec,
    /// The backup it is incremental to.
    pub parent: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// The target directory; the domain's default target when `None`.
    pub target: Option<String>,
    /// Push: wait for the job to end and record the backup (else answer
    /// [`ManagedReply::Started`] and leave it for [`ManagedRequest::Finish`]).
    pub wait: bool,
}

/// Where a restore goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// New images `<dir>/<disk>.qcow2` (never replacing a file), optionally defined as a new
    /// domain.
    NewImages {
        /// The directory (created if missing).
        dir: String,
        /// The new domain's name; refused if a domain of that name exists.
        new_domain: Option<String>,
    },
    /// Over the domain's own (stopped) disks: disk target to its image path.
    Overwrite {
        /// Disk target to the image path it is replaced at.
        disks: BTreeMap<String, String>,
    },
}

/// A restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The backup named.
    pub uuid: String,
    /// Restore the point in time of this backup of the same chain instead.
    pub until: Option<String>,
    /// The disks (every disk of the backup when empty).
    pub disks: Vec<String>,
    /// Where to.
    pub target: RestoreTarget,
}

/// Requests the machine understands.
#[derive(Debug, Clone, PartialEq)]
pub enum ManagedRequest {
    /// Create a backup.
    Create(Box<CreateRequest>),
    /// Conclude the backup in flight: record it once its job succeeded (waiting for it
    /// unless `check`), or with `cancel` end the job and discard it.
    Finish {
        /// End the job and discard the backup.
        cancel: bool,
        /// Only say whether the job still runs; do not wait.
        check: bool,
    },
    /// Check every image of a backup against its recorded digest.
    Verify {
        /// The backup.
        uuid: String,
    },
    /// Delete a backup (a damaged record: its file), or with `target` `None` every backup.
    Delete {
        /// The backup; `None` for all of them.
        target: Option<String>,
        /// Delete the backups built on it too (else refused while it has children).
        with_children: bool,
        /// Keep the checkpoints of the deleted backups.
        keep_checkpoints: bool,
    },
    /// Make an incremental backup a full one of its own.
    Consolidate {
        /// The backup.
        uuid: String,
    },
    /// Restore a backup.
    Restore(Box<RestoreRequest>),
    /// Set (or clear) the default target directory.
    SetDefaultTarget(Option<String>),
}

/// One disk's verdict of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskVerdict {
    /// The disk.
    pub disk: String,
    /// Its image.
    pub path: String,
    /// The recorded digest.
    pub recorded: Digest,
    /// What the image holds now, or why it cannot be read.
    pub found: Result<Digest, String>,
}

impl DiskVerdict {
    /// Whether the image reads as recorded.
    pub fn ok(&self) -> bool {
        self.found.as_ref().is_ok_and(|d| *d == self.recorded)
    }
}

/// One restored disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// The disk.
    pub disk: String,
    /// Where it was restored.
    pub path: String,
    /// Its format.
    pub format: ImageFormat,
    /// Its content's digest (the recorded one).
    pub digest: Digest,
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ManagedReply {
    /// A push backup's job began; [`ManagedRequest::Finish`] records it.
    Started {
        /// The backup.
        uuid: String,
    },
    /// The backup's job still runs.
    Running {
        /// The backup.
        uuid: String,
    },
    /// A backup was recorded.
    Created(Box<ManagedBackup>),
    /// The backup in flight (if any) was discarded and its job ended.
    Cancelled {
        /// The backup discarded.
        uuid: Option<String>,
    },
    /// A verification's verdicts.
    Verified {
        /// The backup.
        uuid: String,
        /// One per disk.
        disks: Vec<DiskVerdict>,
    },
    /// Backups (or damaged records) deleted, in order.
    Deleted {
        /// Their uuids.
        uuids: Vec<String>,
    },
    /// A consolidation's result.
    Consolidated {
        /// The record now.
        backup: Box<ManagedBackup>,
        /// Whether anything changed (false: it was a full backup already).
        changed: bool,
    },
    /// A restore's result.
    Restored {
        /// The backup whose point in time was restored.
        backup: String,
        /// The restored disks.
        disks: Vec<RestoredDisk>,
        /// The domain defined over them, if any.
        domain: Option<String>,
    },
    /// Done.
    Done,
}

/// Why a managed operation was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagedError {
    /// The catalogue refused it.
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    /// Another managed operation is in flight.
    #[error("Requested operation is not valid: {0}")]
    Busy(String),
    /// The request contradicts itself or the catalogue.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A backup's record is damaged.
    #[error("backup '{uuid}' cannot be used: its record '{file}' is damaged ({reason})")]
    Damaged {
        /// The backup.
        uuid: String,
        /// The record file.
        file: String,
        /// Why.
        reason: String,
    },
    /// The journal is damaged: only a cancel can end the job.
    #[error(
        "the journal '{file}' of the managed backup in flight is damaged ({reason}); end the job with 'backup-finish --cancel'"
    )]
    DamagedJournal {
        /// The journal file.
        file: String,
        /// Why.
        reason: String,
    },
    /// A domain of this name exists.
    #[error("Requested operation is not valid: domain '{0}' already exists; choose another name")]
    DomainExists(String),
    /// An image does not hold what its record says.
    #[error(
        "operation failed: image '{path}' does not match its recorded digest ({recorded} recorded, {found} found); nothing was changed"
    )]
    DigestMismatch {
        /// The image.
        path: String,
        /// The recorded digest.
        recorded: Digest,
        /// What it holds.
        found: Digest,
    },
    /// An effect failed.
    #[error("operation failed: {what}: {error}")]
    Effect {
        /// What was being done.
        what: String,
        /// The runtime's error.
        error: EffectError,
    },
    /// The backup job did not succeed; the backup was discarded.
    #[error("operation failed: backup {uuid} failed and has been discarded{}", why.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    JobFailed {
        /// The backup.
        uuid: String,
        /// QEMU's first error, if any.
        why: Option<String>,
    },
    /// A pull backup's reader was interrupted; the backup was discarded.
    #[error("operation failed: pull backup {0} was interrupted and has been discarded")]
    PullInterrupted(String),
    /// No backup is in flight.
    #[error("Requested operation is not valid: no managed backup is in flight")]
    NoJob,
    /// An answer the machine cannot use.
    #[error("operation failed: unexpected answer to {0}")]
    Unexpected(String),
}
