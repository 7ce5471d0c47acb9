//! The engine's public vocabulary: what goes into [`Domain::handle`], what comes out, and the
//! configuration and view of a domain. Below every state machine: it depends on leaf modules
//! only, and [`crate::domain`] re-exports all of it.
//!
//! [`Domain::handle`]: crate::Domain::handle

use std::collections::BTreeMap;

use serde_json::Value;

use crate::backup::{BackupPlan, BackupSpec, JobStats};
use crate::checkpoint::{Checkpoint, CheckpointTree, DeleteScope, ListFilter};
use crate::error::Error;
use crate::jobs::JobSlots;
use crate::link::CommandId;
use crate::model::DomainDef;
use crate::qmp::{QmpCommand, QmpError, QmpEvent};

/// Identifies a request so its answer can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Identifies a file operation so its completion can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileOpId(pub u64);

/// Everything that can happen to a domain.
#[derive(Debug, Clone)]
pub enum Input {
    /// A caller asks for something.
    Request(RequestId, Request),
    /// QEMU answered a command.
    Reply(CommandId, Result<Value, QmpError>),
    /// QEMU sent an event.
    Event(QmpEvent),
    /// Time passed (`now` is past [`Domain::next_deadline`](crate::Domain::next_deadline)).
    Tick,
    /// A fresh QMP session is open (greeting received, not yet negotiated): after a start, a
    /// restart of vbackup, or a lost connection.
    Reconnected,
    /// The QMP connection is gone; outstanding commands will never be answered.
    LinkDown,
    /// The driver finished a file operation.
    FileDone(FileOpId, Result<(), FileError>),
}

/// What the domain asks the driver to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a QMP command.
    Send(CommandId, QmpCommand),
    /// Write or delete metadata (fire and forget; atomic in the store).
    Persist(StoreOp),
    /// Create or delete an image file on the host where QEMU runs. Creation must be exclusive
    /// and be answered with [`Input::FileDone`]; deletion is best effort and is answered too.
    File(FileOpId, FileOp),
    /// Answer a request.
    Respond(RequestId, Result<Reply, Error>),
    /// Tell observers something happened.
    Emit(DomainEvent),
}

/// A metadata change for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Write (or rewrite) a checkpoint's metadata.
    PutCheckpoint(Box<Checkpoint>),
    /// Delete a checkpoint's metadata.
    DeleteCheckpoint(String),
    /// Record which checkpoint is current.
    SetCurrentCheckpoint(Option<String>),
    /// Journal the running backup so a restarted engine can resume or conclude it.
    PutBackupJournal(Box<BackupPlan>),
    /// The backup ended: drop its journal.
    DeleteBackupJournal,
    /// Record the whole set (sorted; empty clears it) of checkpoints whose bitmap-creating
    /// `transaction` was sent and whose outcome is unknown: a name is added before its
    /// transaction is sent and dropped once its metadata is written or QEMU refused, and a
    /// clean reconcile pass empties the set. Several names can be pending at once when a
    /// create's reply was lost and the reconcile that would clean up after it was postponed.
    /// A restarted engine hands the set to [`Domain::with_pending_checkpoints`](crate::Domain::with_pending_checkpoints); bitmaps named
    /// after a recorded checkpoint that has no metadata are the engine's orphans and are removed.
    SetPendingCheckpoints(Vec<String>),
}

/// Why a file operation failed, as far as the engine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    /// The file exists already (an exclusive creation).
    AlreadyExists,
    /// The file or a directory on its path does not exist.
    NotFound,
    /// The host refused access.
    PermissionDenied,
    /// The storage is full.
    NoSpace,
    /// Anything else (an IO error, a failed sync).
    Other,
}

impl FileErrorKind {
    /// The kind of an IO error of the host (no IO happens here: this only maps the kind).
    pub fn from_io(kind: std::io::ErrorKind) -> Self {
        match kind {
            std::io::ErrorKind::AlreadyExists => Self::AlreadyExists,
            std::io::ErrorKind::NotFound => Self::NotFound,
            std::io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            std::io::ErrorKind::StorageFull => Self::NoSpace,
            _ => Self::Other,
        }
    }
}

/// A file operation the driver could not carry out ([`Input::FileDone`]). Its display is the
/// message, which the engine quotes in the error it answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FileError {
    /// What went wrong.
    pub kind: FileErrorKind,
    /// The file.
    pub path: String,
    /// What the host said, for people.
    pub message: String,
}

impl FileError {
    /// A failure of `kind` on `path`.
    pub fn new(kind: FileErrorKind, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            path: path.into(),
            message: message.into(),
        }
    }

    /// A failure of no particular kind on `path`.
    pub fn other(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(FileErrorKind::Other, path, message)
    }
}

/// A file operation on the QEMU host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// Create an empty file; fail if it exists.
    CreateExclusive {
        /// Absolute path.
        path: String,
    },
    /// Delete a file the engine created.
    Remove {
        /// Absolute path.
        path: String,
    },
    /// Make a finished push target durable: write its data and metadata to storage (fsync,
    /// and the directory entry of a file) and answer when done. Sent once QEMU closed the
    /// target; a failure fails the disk's backup.
    Sync {
        /// Absolute path of the target file or block device.
        path: String,
    },
}

/// Requests a domain understands. Definitions arrive parsed and aligned.
#[derive(Debug, Clone)]
pub enum Request {
    /// Create a checkpoint now. Its `parent` is ignored: the current checkpoint is the parent.
    CheckpointCreate {
        /// The aligned definition.
        checkpoint: Checkpoint,
        /// `QUIESCE` was asked for (refused: no guest agent).
        quiesce: bool,
    },
    /// Re-insert stored metadata (`REDEFINE`), optionally checked against QEMU.
    CheckpointRedefine {
        /// The stored definition, with its parent.
        checkpoint: Checkpoint,
        /// `REDEFINE_VALIDATE`: the bitmap chains must be valid in QEMU.
        validate: bool,
    },
    /// Delete a checkpoint.
    CheckpointDelete {
        /// The checkpoint.
        name: String,
        /// Which checkpoints go.
        scope: DeleteScope,
        /// Only the metadata; bitmaps stay in the images.
        metadata_only: bool,
    },
    /// Delete several checkpoints, each alone as [`DeleteScope::Single`] deletes it (its
    /// children move to its parent), in the order given. The bitmaps of all of them go in one
    /// `transaction`, so QEMU removes every one or none; an unknown name is refused before
    /// anything is sent.
    CheckpointDeleteEach {
        /// The checkpoints.
        names: Vec<String>,
    },
    /// List all checkpoints.
    CheckpointList {
        /// Filters.
        filter: ListFilter,
    },
    /// List a checkpoint's children or descendants.
    CheckpointListChildren {
        /// The checkpoint.
        name: String,
        /// Filters.
        filter: ListFilter,
    },
    /// Look a checkpoint up.
    CheckpointLookup {
        /// The checkpoint.
        name: String,
    },
    /// A checkpoint's parent.
    CheckpointParent {
        /// The checkpoint.
        name: String,
    },
    /// A checkpoint's definition, optionally with per-disk sizes (needs QEMU).
    CheckpointGetXml {
        /// The checkpoint.
        name: String,
        /// Compute the bytes dirtied since the checkpoint per disk.
        size: bool,
    },
    /// Begin a backup.
    BackupBegin {
        /// The aligned backup definition.
        spec: BackupSpec,
        /// A checkpoint to create atomically with the backup.
        checkpoint: Option<Checkpoint>,
        /// Targets or scratch images exist already; never create nor delete them.
        reuse_external: bool,
    },
    /// The running backup with every default filled in.
    BackupGetXml,
    /// Job statistics.
    JobStats {
        /// Statistics of the last finished job instead of the running one.
        completed: bool,
        /// Keep the finished job's statistics after reading them.
        keep_completed: bool,
    },
    /// Abort the running job (ends a pull backup normally).
    AbortJob,
    /// Cancel one disk's backup job (libvirt's block-job abort); the other disks are then
    /// cancelled too.
    BlockJobAbort {
        /// Disk target.
        disk: String,
    },
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Done, nothing to report.
    Done,
    /// A checkpoint's definition.
    Checkpoint(Box<Checkpoint>),
    /// Names of checkpoints, in the order asked for.
    CheckpointNames(Vec<String>),
    /// The running backup.
    Backup(Box<BackupPlan>),
    /// Job statistics; `None` when there is no such job.
    Stats(Option<JobStats>),
}

/// Events for observers.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainEvent {
    /// One disk's backup job ended.
    BlockJob {
        /// Disk target.
        disk: String,
        /// How it ended.
        state: crate::backup::DiskJobState,
    },
    /// The whole backup job ended (libvirt's JOB_COMPLETED), with its final statistics.
    JobCompleted(JobStats),
    /// A checkpoint was created.
    CheckpointCreated(String),
    /// A checkpoint was deleted.
    CheckpointDeleted(String),
    /// After connecting, checkpoint metadata and QEMU's bitmaps disagree (a crash between
    /// QEMU's confirmation and the metadata write, a QEMU crash, or outside changes).
    BitmapDrift(BitmapDrift),
}

/// Disagreement between checkpoint metadata and the bitmaps QEMU has, and what the reconcile
/// repaired.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapDrift {
    /// `(checkpoint, disk)` whose bitmap chain is missing or broken. The checkpoint is marked
    /// invalid for that disk ([`DomainView::invalid_checkpoints`]): an incremental backup
    /// from it is refused at once with a typed error, a full backup works; deleting it needs
    /// metadata-only deletion when the bitmap is gone from every layer.
    pub missing: Vec<(String, String)>,
    /// `(node, bitmap)`: persistent bitmaps on a disk's top layer that no checkpoint owns and
    /// the engine cannot prove it created, such as those a metadata-only deletion left for a
    /// later `REDEFINE`. They are reported, never removed.
    pub orphans: Vec<(String, String)>,
    /// `(node, bitmap)`: bitmaps the engine owned and removed (see [`Domain`](crate::Domain)'s ownership rule).
    pub removed: Vec<(String, String)>,
}

impl BitmapDrift {
    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.orphans.is_empty() && self.removed.is_empty()
    }
}

/// Host configuration a domain needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// Lowest TCP port for pull backups that give none.
    pub nbd_port_min: u16,
    /// Highest such port.
    pub nbd_port_max: u16,
    /// TLS settings for `tls='yes'`; `None` refuses TLS.
    pub tls: Option<TlsConfig>,
    /// Milliseconds after which an unanswered command counts as QEMU misbehaving.
    pub command_timeout_ms: u64,
    /// Query the node data before removing a checkpoint's bitmaps even when every disk has a
    /// single layer (libvirt always does). Without it, single-layer disks go straight to the
    /// removal transaction, which QEMU refuses atomically if a bitmap is missing; disks with
    /// backing layers are always queried, because the bitmap may live in several of them.
    pub query_nodes_before_delete: bool,
    /// The NBD server QEMU already runs and pull backups must use, if any (a managed
    /// qemu-storage-daemon serving its guest exports: QEMU runs one NBD server per process).
    /// Pull backups then add their exports to it and delete only those, never starting nor
    /// stopping the server. A backup without `<server>` uses it; one whose `<server>` names
    /// another address or other security is refused before anything starts
    /// ([`RequestError::NbdServerInUse`](crate::error::RequestError::NbdServerInUse)), because its client would not reach the exports.
    pub nbd_server_running: Option<crate::backup::NbdServer>,
    /// How push backups write their targets (see [`PushWrite`]).
    pub push_write: PushWrite,
}

/// How push backups write their targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PushWrite {
    /// QEMU copies with copy offload (`x-perf.use-copy-range`, falling back to reads and
    /// writes by itself where the files do not support it) into targets opened with
    /// `cache.no-flush` (also pull scratch images, which are never kept), so the job never
    /// waits for storage; once QEMU closed a completed target the engine makes it durable
    /// ([`FileOp::Sync`]) before the backup counts as complete. The host writes the data out
    /// while the job runs, so the final sync only waits for the tail.
    #[default]
    Deferred,
    /// libvirt's commands exactly: QEMU flushes targets itself (on close), no copy offload.
    QemuFlushes,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            nbd_port_min: 10809,
            nbd_port_max: 10872,
            tls: None,
            command_timeout_ms: 60_000,
            query_nodes_before_delete: false,
            nbd_server_running: None,
            push_write: PushWrite::default(),
        }
    }
}

/// x509 credentials of the NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Directory with `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub cert_dir: String,
    /// Whether clients must present certificates.
    pub verify_peer: bool,
    /// File holding the key's passphrase, if the key is encrypted.
    pub secret_file: Option<String>,
}

/// A read-only view of a domain.
#[derive(Debug, Clone, Copy)]
pub struct DomainView<'a> {
    /// The domain definition.
    pub def: &'a DomainDef,
    /// Checkpoints.
    pub checkpoints: &'a CheckpointTree,
    /// Job slots and busy disks.
    pub jobs: &'a JobSlots,
    /// The running backup's plan.
    pub backup: Option<&'a BackupPlan>,
    /// Statistics of the last finished job.
    pub completed: Option<&'a JobStats>,
    /// Whether a QMP session is up and reconciled: requests that talk to QEMU are accepted
    /// (false while the first check of QEMU's bitmaps after a connection runs).
    pub connected: bool,
    /// Checkpoints marked invalid by the last reconcile, with the disks whose chain is missing
    /// or broken.
    pub invalid_checkpoints: &'a BTreeMap<String, std::collections::BTreeSet<String>>,
    /// QEMU is known to hold exactly what the store describes, and nothing is in flight: the
    /// session was reconciled cleanly (or trusted, see
    /// [`Domain::trusting_qemu`](crate::Domain::trusting_qemu)), every command since was
    /// answered with success, no operation or backup runs, and no checkpoint is pending or
    /// invalid. A host that keeps QEMU running may then vouch for it to the next session.
    pub in_step: bool,
}

/// Everything the store holds for one domain, as a restarted engine needs it: the fold of
/// every [`StoreOp`] the engine emitted, in order.
///
/// The restart contract: carry out each [`Output::Persist`] in order (atomically, before the
/// next command is sent), or keep the operations and fold them with [`StoredState::apply`];
/// after a restart, hand the state to [`Domain::from_stored`](crate::Domain::from_stored)
/// together with the domain definition and configuration. The engine then reconciles with
/// QEMU on its own after [`Input::Reconnected`]: a journaled backup is resumed or concluded,
/// bitmaps of checkpoints whose creation was pending and has no metadata are removed, and
/// drift is reported with [`DomainEvent::BitmapDrift`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredState {
    /// Checkpoint metadata by name ([`StoreOp::PutCheckpoint`], [`StoreOp::DeleteCheckpoint`]).
    pub checkpoints: BTreeMap<String, Checkpoint>,
    /// The current checkpoint ([`StoreOp::SetCurrentCheckpoint`]).
    pub current_checkpoint: Option<String>,
    /// The journal of the running backup ([`StoreOp::PutBackupJournal`],
    /// [`StoreOp::DeleteBackupJournal`]).
    pub backup_journal: Option<BackupPlan>,
    /// Checkpoints whose creation was recorded and whose outcome is unknown
    /// ([`StoreOp::SetPendingCheckpoints`]).
    pub pending_checkpoints: Vec<String>,
}

impl StoredState {
    /// Applies one store operation.
    pub fn apply(&mut self, op: &StoreOp) {
        match op {
            StoreOp::PutCheckpoint(c) => {
                self.checkpoints.insert(c.name.clone(), (**c).clone());
            }
            StoreOp::DeleteCheckpoint(name) => {
                self.checkpoints.remove(name);
            }
            StoreOp::SetCurrentCheckpoint(current) => self.current_checkpoint = current.clone(),
            StoreOp::PutBackupJournal(plan) => self.backup_journal = Some((**plan).clone()),
            StoreOp::DeleteBackupJournal => self.backup_journal = None,
            StoreOp::SetPendingCheckpoints(names) => self.pending_checkpoints = names.clone(),
        }
    }

    /// The state after `ops`, from an empty store.
    pub fn from_ops<'a>(ops: impl IntoIterator<Item = &'a StoreOp>) -> Self {
        let mut state = Self::default();
        for op in ops {
            state.apply(op);
        }
        state
    }

    /// The stored checkpoints as a tree (parents linked, the current one marked).
    pub fn checkpoint_tree(&self) -> CheckpointTree {
        CheckpointTree::load(
            self.checkpoints.values().cloned().collect(),
            self.current_checkpoint.as_deref(),
        )
    }
}
