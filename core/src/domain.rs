//! The per-domain state machine: `handle(now, input) -> outputs`.
//!
//! Contract: [`Domain::handle`] is pure. It reads no clock (time is `now`), does no IO (it emits
//! [`Output`]s the driver carries out in order), draws no randomness (command and file-operation
//! ids come from counters), and never panics on input: a rejected request becomes
//! `Respond(id, Err(..))` with a typed [`Error`]. Checkpoint metadata is persisted only after
//! QEMU confirmed the change it describes; the backup journal, on the contrary, is written
//! before each step that may leave something in QEMU (before the first target is created and
//! before the transaction), so a restart always knows what to look for and clean up.
//!
//! One long job (a backup) and one short operation (a checkpoint create, delete, size or
//! validation) may be in flight; a conflicting request is refused at once naming the holder.

pub(crate) mod commands;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::backup::run::{BackupRun, BackupTag};
use crate::backup::{BackupPlan, BackupSpec, JobStats};
use crate::chain::{BitmapState, NodeState, NodeTable};
use crate::checkpoint::ops::{ShortOp, ShortTag};
use crate::checkpoint::{Checkpoint, CheckpointTree, DeleteScope, ListFilter};
use crate::error::{Error, RequestError};
use crate::jobs::JobSlots;
use crate::link::{CommandId, Timestamp};
use crate::model::DomainDef;
use crate::qmp::{ErrorClass, QmpCommand, QmpError, QmpEvent};

pub(crate) use commands as cmd;

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
    /// Time passed (`now` is past [`Domain::next_deadline`]).
    Tick,
    /// A fresh QMP session is open (greeting received, not yet negotiated): after a start, a
    /// restart of vbackup, or a lost connection.
    Reconnected,
    /// The QMP connection is gone; outstanding commands will never be answered.
    LinkDown,
    /// The driver finished a file operation.
    FileDone(FileOpId, Result<(), String>),
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
    /// A restarted engine hands the set to [`Domain::with_pending_checkpoints`]; bitmaps named
    /// after a recorded checkpoint that has no metadata are the engine's orphans and are removed.
    SetPendingCheckpoints(Vec<String>),
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
    /// `(node, bitmap)`: bitmaps the engine owned and removed (see [`Domain`]'s ownership rule).
    pub removed: Vec<(String, String)>,
}

impl BitmapDrift {
    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.orphans.is_empty() && self.removed.is_empty()
    }
}

/// Compares checkpoint metadata with QEMU's node data. Returns the drift (without `removed`)
/// and the `(node, bitmap)` pairs the engine owns and must remove.
///
/// The ownership rule: the engine removes a bitmap only when it is not busy and either
/// - it is temporary (not persistent) and carries one of the engine's temporary names on a
///   layer of a disk (`backup-<disk target>`, [`SIZE_BITMAP`]), and the running backup does
///   not use it; or
/// - it is persistent, on a disk's top layer, and named after the pending checkpoint (whose
///   creation the engine recorded before sending its transaction) while no metadata of that
///   checkpoint exists. Every recorded name counts, not only the latest.
///
/// Any other bitmap belongs to someone else or to a checkpoint whose metadata was deleted on
/// purpose (metadata-only deletion keeps bitmaps for a later `REDEFINE`): it is only reported.
///
/// [`SIZE_BITMAP`]: crate::checkpoint::ops::SIZE_BITMAP
fn bitmap_drift(
    core: &Core,
    nodes: &NodeTable,
    backup: Option<&BackupPlan>,
) -> (BitmapDrift, Vec<(String, String)>) {
    let mut drift = BitmapDrift::default();
    let mut removals = Vec::new();
    let mut owned: std::collections::BTreeSet<(&str, &str)> = std::collections::BTreeSet::new();
    for c in core.tree.iter() {
        for (target, bitmap) in c.bitmap_disks() {
            let Ok(layers) = disk_layers(&core.def, target) else {
                continue;
            };
            if let Some(top) = core
                .def
                .disk(target)
                .and_then(|d| d.top())
                .and_then(|l| l.node_name.as_deref())
            {
                owned.insert((top, bitmap));
            }
            if !crate::chain::chain_is_valid(nodes, &layers, bitmap) {
                drift.missing.push((c.name.clone(), target.to_owned()));
            }
        }
    }
    let in_use = |node: &str, name: &str| {
        backup.is_some_and(|p| {
            p.disks.iter().any(|d| {
                d.temp_bitmap.as_deref() == Some(name)
                    && d.temp_bitmap_node.as_deref() == Some(node)
            })
        })
    };
    let pending =
        |name: &str| core.pending_checkpoints.contains(name) && core.tree.get(name).is_none();
    for disk in &core.def.disks {
        let temp_names = [
            crate::backup::default_temp_bitmap(&disk.target),
            crate::checkpoint::ops::SIZE_BITMAP.to_owned(),
        ];
        for (depth, layer) in disk.layers.iter().enumerate() {
            let Some(node_name) = layer.node_name.as_deref() else {
                continue;
            };
            let Some(node) = nodes.get(node_name) else {
                continue;
            };
            for b in &node.bitmaps {
                let Some(name) = b.name.as_deref() else {
                    continue;
                };
                let pair = (node_name.to_owned(), name.to_owned());
                if b.persistent {
                    if depth > 0 || owned.contains(&(node_name, name)) {
                        continue;
                    }
                    if pending(name) && !b.busy {
                        removals.push(pair);
                    } else {
                        drift.orphans.push(pair);
                    }
                } else if !b.busy
                    && temp_names.iter().any(|t| t == name)
                    && !in_use(node_name, name)
                {
                    removals.push(pair);
                }
            }
        }
    }
    (drift, removals)
}

pub use crate::kernel::RETRY_MAX_MS;
pub(crate) use crate::kernel::retry::retry_delay_ms;

/// The reconcile after a connection: one pass queries the nodes, marks invalid checkpoints,
/// removes what the engine owns and reports; a pass whose query or removals QEMU refused is
/// run again after a growing delay.
#[derive(Debug, Default)]
struct Reconcile {
    /// A pass is running and holds the short slot.
    active: bool,
    /// When the next pass starts.
    due: Option<Timestamp>,
    /// Passes in a row that did not finish cleanly.
    attempt: u32,
    /// Removals of this pass, by index in the repair tags.
    removals: Vec<(String, String)>,
    outstanding: usize,
    failed: bool,
    report: BitmapDrift,
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
    /// ([`RequestError::NbdServerInUse`]), because its client would not reach the exports.
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
}

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

#[derive(Debug, Clone)]
struct Pending {
    owner: Owner,
    name: String,
    sent: Timestamp,
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
    pub invalid: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The checkpoints whose creation was recorded before their transaction and not yet
    /// cleared ([`StoreOp::SetPendingCheckpoints`]).
    pub pending_checkpoints: std::collections::BTreeSet<String>,
    /// QEMU refused `x-perf` (it predates the knob): push backups copy without offload.
    pub copy_offload_refused: bool,
    /// When `qmp_capabilities`, refused or unanswered on this session, is sent again: a
    /// session that never negotiates must not leave the domain waiting with no deadline.
    pub negotiate_due: Option<Timestamp>,
    /// Negotiations in a row that failed on this session (the back-off grows with it).
    pub negotiate_attempt: u32,
}

/// Sends and answers on behalf of an operation.
pub(crate) struct Ctx<'a> {
    pub now: Timestamp,
    out: &'a mut Vec<Output>,
    next_command: &'a mut u64,
    next_file_op: &'a mut u64,
    pending: &'a mut BTreeMap<CommandId, Pending>,
}

impl Ctx<'_> {
    /// Sends a command on behalf of `owner` and returns its id.
    pub fn send(&mut self, owner: Owner, command: QmpCommand) -> CommandId {
        *self.next_command += 1;
        let id = CommandId::Number(*self.next_command);
        self.pending.insert(
            id.clone(),
            Pending {
                owner,
                name: command.name().to_owned(),
                sent: self.now,
            },
        );
        self.out.push(Output::Send(id.clone(), command));
        id
    }

    /// Asks the driver for a file operation.
    pub fn file(&mut self, op: FileOp) -> FileOpId {
        *self.next_file_op += 1;
        let id = FileOpId(*self.next_file_op);
        self.out.push(Output::File(id, op));
        id
    }

    /// Persists the set of pending checkpoint creations.
    pub fn persist_pending(&mut self, pending: &std::collections::BTreeSet<String>) {
        self.persist(StoreOp::SetPendingCheckpoints(
            pending.iter().cloned().collect(),
        ));
    }

    /// Emits a store operation.
    pub fn persist(&mut self, op: StoreOp) {
        self.out.push(Output::Persist(op));
    }

    /// Answers a request.
    pub fn respond(&mut self, req: RequestId, result: Result<Reply, Error>) {
        self.out.push(Output::Respond(req, result));
    }

    /// Emits an event.
    pub fn emit(&mut self, event: DomainEvent) {
        self.out.push(Output::Emit(event));
    }
}

/// One virtual machine's checkpoints, jobs and backup.
#[derive(Debug)]
pub struct Domain {
    core: Core,
    next_command: u64,
    next_file_op: u64,
    pending: BTreeMap<CommandId, Pending>,
    short: Option<ShortOp>,
    backup: Option<BackupRun>,
    reconcile: Reconcile,
}

impl Domain {
    /// A domain with its stored checkpoints and, after a restart, the journal of a backup that
    /// was running. The QMP session is down until [`Input::Reconnected`].
    pub fn new(
        def: DomainDef,
        config: DomainConfig,
        tree: CheckpointTree,
        journal: Option<BackupPlan>,
    ) -> Self {
        let mut jobs = JobSlots::new();
        let shared_server = config.nbd_server_running.is_some();
        let backup = journal.map(|plan| BackupRun::restore(plan, &mut jobs, shared_server));
        Self {
            core: Core {
                def,
                config,
                tree,
                jobs,
                connected: false,
                completed: None,
                invalid: BTreeMap::new(),
                pending_checkpoints: std::collections::BTreeSet::new(),
                copy_offload_refused: false,
                negotiate_due: None,
                negotiate_attempt: 0,
            },
            next_command: 0,
            next_file_op: 0,
            pending: BTreeMap::new(),
            short: None,
            backup,
            reconcile: Reconcile::default(),
        }
    }

    /// The checkpoints the store recorded as being created ([`StoreOp::SetPendingCheckpoints`]):
    /// those without metadata have their bitmaps removed at the next reconcile.
    pub fn with_pending_checkpoints(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.core.pending_checkpoints = names.into_iter().collect();
        self
    }

    /// Feeds one input and returns everything the driver must do, in order.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        let mut ctx = Ctx {
            now,
            out: &mut out,
            next_command: &mut self.next_command,
            next_file_op: &mut self.next_file_op,
            pending: &mut self.pending,
        };
        match input {
            Input::Request(req, request) => Self::on_request(
                &mut self.core,
                &mut self.short,
                &mut self.backup,
                &mut ctx,
                req,
                request,
            ),
            Input::Reply(id, result) => {
                let Some(p) = ctx.pending.remove(&id) else {
                    // A reply nobody waits for (late, after a timeout or a reconnect): ignore.
                    return out;
                };
                Self::on_reply(
                    &mut self.core,
                    &mut self.short,
                    &mut self.backup,
                    &mut self.reconcile,
                    &mut ctx,
                    p,
                    result,
                );
            }
            Input::Event(event) => {
                if let Some(run) = self.backup.take() {
                    self.backup = run.on_event(&mut self.core, &mut ctx, &event);
                }
            }
            Input::FileDone(id, result) => {
                if let Some(run) = self.backup.take() {
                    self.backup = run.on_file_done(&mut self.core, &mut ctx, id, result);
                }
            }
            Input::Tick => {
                let timeout = self.core.config.command_timeout_ms;
                let expired: Vec<CommandId> = ctx
                    .pending
                    .iter()
                    .filter(|(_, p)| now.ms_since(p.sent) >= timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in expired {
                    if let Some(p) = ctx.pending.remove(&id) {
                        let err = QmpError::new(
                            ErrorClass::Unknown(TIMEOUT_CLASS.into()),
                            format!("no reply to {} within {timeout} ms", p.name),
                        );
                        Self::on_reply(
                            &mut self.core,
                            &mut self.short,
                            &mut self.backup,
                            &mut self.reconcile,
                            &mut ctx,
                            p,
                            Err(err),
                        );
                    }
                }
                if self.core.negotiate_due.is_some_and(|d| now >= d) {
                    self.core.negotiate_due = None;
                    ctx.send(
                        Owner::Session(SessionTag::Capabilities),
                        cmd::capabilities(),
                    );
                }
                if self.reconcile.due.is_some_and(|d| now >= d) {
                    Self::start_reconcile(&mut self.core, &mut self.reconcile, &mut ctx);
                }
                if let Some(run) = self.backup.take() {
                    self.backup = if run.deadline(timeout).is_some_and(|d| now >= d) {
                        run.on_timeout(&mut self.core, &mut ctx)
                    } else {
                        Some(run)
                    };
                }
            }
            Input::Reconnected | Input::LinkDown => {
                // Whatever was outstanding on the old session is lost.
                let reconnected = matches!(input, Input::Reconnected);
                Self::drop_session(
                    &mut self.core,
                    &mut self.short,
                    &mut self.backup,
                    &mut self.reconcile,
                    &mut ctx,
                );
                if reconnected {
                    ctx.send(
                        Owner::Session(SessionTag::Capabilities),
                        cmd::capabilities(),
                    );
                }
            }
        }
        out
    }

    /// When [`Input::Tick`] should next be fed: the earliest command timeout or retry.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let timeout = self.core.config.command_timeout_ms;
        self.pending
            .values()
            .map(|p| p.sent.plus_ms(timeout))
            .chain(self.backup.as_ref().and_then(|b| b.deadline(timeout)))
            .chain(self.reconcile.due)
            .chain(self.core.negotiate_due)
            .min()
    }

    /// What the running backup waits for right now, in words (a reply, a file, the end of
    /// named block jobs); `None` when no backup runs. Liveness checks name it when a backup
    /// does not end.
    pub fn backup_waiting_for(&self) -> Option<String> {
        self.backup.as_ref().map(BackupRun::waiting_for)
    }

    /// A read-only view of the domain.
    pub fn view(&self) -> DomainView<'_> {
        DomainView {
            def: &self.core.def,
            checkpoints: &self.core.tree,
            jobs: &self.core.jobs,
            backup: self.backup.as_ref().map(BackupRun::plan),
            completed: self.core.completed.as_ref(),
            connected: self.core.connected && !self.reconcile.active,
            invalid_checkpoints: &self.core.invalid,
        }
    }

    fn drop_session(
        core: &mut Core,
        short: &mut Option<ShortOp>,
        backup: &mut Option<BackupRun>,
        reconcile: &mut Reconcile,
        ctx: &mut Ctx<'_>,
    ) {
        core.connected = false;
        // A new session negotiates afresh; a lost one has nothing left to retry.
        core.negotiate_due = None;
        core.negotiate_attempt = 0;
        // The next connection starts a fresh pass.
        if reconcile.active {
            core.jobs.release_short();
        }
        *reconcile = Reconcile::default();
        // Statistics requests waiting for a `query-jobs` reply would never be answered.
        let lost_stats: Vec<RequestId> = ctx
            .pending
            .values()
            .filter_map(|p| match p.owner {
                Owner::Backup(BackupTag::Stats(req)) => Some(req),
                _ => None,
            })
            .collect();
        ctx.pending.clear();
        for req in lost_stats {
            ctx.respond(req, Err(Error::LinkLost("job statistics".into())));
        }
        if let Some(op) = short.take() {
            op.abandon(core, ctx);
        }
        if let Some(run) = backup.take() {
            *backup = Some(run.on_link_down(core, ctx));
        }
    }

    /// Starts a reconcile pass if the short slot is free, or tries again later.
    fn start_reconcile(core: &mut Core, rec: &mut Reconcile, ctx: &mut Ctx<'_>) {
        rec.due = None;
        if !core.connected || rec.active {
            return;
        }
        if core
            .jobs
            .acquire_short(crate::jobs::JobKind::Reconcile)
            .is_err()
        {
            // Another operation talks to QEMU now; the pass must not race it.
            rec.due = Some(ctx.now.plus_ms(retry_delay_ms(rec.attempt)));
            rec.attempt = rec.attempt.saturating_add(1);
            return;
        }
        rec.active = true;
        rec.failed = false;
        rec.outstanding = 0;
        rec.removals.clear();
        rec.report = BitmapDrift::default();
        ctx.send(Owner::Session(SessionTag::DriftQuery), cmd::query_nodes());
    }

    /// Ends a reconcile pass: report, release the slot, and schedule another pass if QEMU
    /// refused something.
    fn finish_reconcile(core: &mut Core, rec: &mut Reconcile, ctx: &mut Ctx<'_>) {
        rec.active = false;
        core.jobs.release_short();
        if rec.failed {
            rec.due = Some(ctx.now.plus_ms(retry_delay_ms(rec.attempt)));
            rec.attempt = rec.attempt.saturating_add(1);
        } else {
            rec.attempt = 0;
            // The pass held the short slot, so no create ran during it: every recorded name
            // now has metadata or had its bitmaps removed.
            if !core.pending_checkpoints.is_empty() {
                core.pending_checkpoints.clear();
                ctx.persist(StoreOp::SetPendingCheckpoints(Vec::new()));
            }
        }
        let report = std::mem::take(&mut rec.report);
        if !report.is_empty() {
            ctx.emit(DomainEvent::BitmapDrift(report));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_reply(
        core: &mut Core,
        short: &mut Option<ShortOp>,
        backup: &mut Option<BackupRun>,
        rec: &mut Reconcile,
        ctx: &mut Ctx<'_>,
        pending: Pending,
        result: Result<Value, QmpError>,
    ) {
        match pending.owner {
            Owner::Session(SessionTag::Capabilities) => {
                if result.is_err() {
                    // Refused or timed out: try again after a growing delay, so the wait for a
                    // usable session always has a deadline (the caller bounds the attempts).
                    core.negotiate_due =
                        Some(ctx.now.plus_ms(retry_delay_ms(core.negotiate_attempt)));
                    core.negotiate_attempt = core.negotiate_attempt.saturating_add(1);
                }
                if result.is_ok() {
                    core.negotiate_due = None;
                    core.negotiate_attempt = 0;
                    core.connected = true;
                    if let Some(run) = backup.take() {
                        *backup = run.on_reconnected(core, ctx);
                    }
                    // Orphans and leftovers can exist with or without checkpoints.
                    rec.attempt = 0;
                    Self::start_reconcile(core, rec, ctx);
                }
            }
            Owner::Session(SessionTag::DriftQuery) => {
                if !rec.active {
                    return;
                }
                let nodes = match result
                    .map_err(|e| refused(&pending.name, &e))
                    .and_then(|v| node_table(&v))
                {
                    Ok(n) => n,
                    Err(_) => {
                        rec.failed = true;
                        Self::finish_reconcile(core, rec, ctx);
                        return;
                    }
                };
                let (drift, removals) =
                    bitmap_drift(core, &nodes, backup.as_ref().map(BackupRun::plan));
                core.invalid.clear();
                for (cp, disk) in &drift.missing {
                    core.invalid
                        .entry(cp.clone())
                        .or_default()
                        .insert(disk.clone());
                }
                rec.report = drift;
                for (i, (node, bitmap)) in removals.iter().enumerate() {
                    ctx.send(
                        Owner::Session(SessionTag::Repair(i)),
                        cmd::remove_bitmap(node, bitmap),
                    );
                }
                rec.outstanding = removals.len();
                rec.removals = removals;
                if rec.outstanding == 0 {
                    Self::finish_reconcile(core, rec, ctx);
                }
            }
            Owner::Session(SessionTag::Repair(i)) => {
                if !rec.active {
                    return;
                }
                match result {
                    Ok(_) => {
                        if let Some(pair) = rec.removals.get(i) {
                            rec.report.removed.push(pair.clone());
                        }
                    }
                    Err(_) => rec.failed = true,
                }
                rec.outstanding = rec.outstanding.saturating_sub(1);
                if rec.outstanding == 0 {
                    Self::finish_reconcile(core, rec, ctx);
                }
            }
            Owner::Short(tag) => {
                if let Some(op) = short.take() {
                    *short = op.on_reply(core, ctx, tag, &pending.name, result);
                }
            }
            Owner::Backup(tag) => {
                if let Some(run) = backup.take() {
                    *backup = run.on_reply(core, ctx, tag, &pending.name, result);
                } else if let BackupTag::Stats(req) = tag {
                    // The backup ended while its statistics were on their way (its last reply
                    // came first): no job runs any more. Dropping the request would leave its
                    // caller waiting forever.
                    ctx.respond(req, Ok(Reply::Stats(None)));
                }
            }
        }
    }

    fn on_request(
        core: &mut Core,
        short: &mut Option<ShortOp>,
        backup: &mut Option<BackupRun>,
        ctx: &mut Ctx<'_>,
        req: RequestId,
        request: Request,
    ) {
        let answer = |ctx: &mut Ctx<'_>, r: Result<Reply, Error>| ctx.respond(req, r);
        match request {
            Request::CheckpointList { filter } => {
                let names = core
                    .tree
                    .list(filter)
                    .into_iter()
                    .map(|c| c.name.clone())
                    .collect();
                answer(ctx, Ok(Reply::CheckpointNames(names)));
            }
            Request::CheckpointListChildren { name, filter } => {
                let r = core
                    .tree
                    .list_children(&name, filter)
                    .map(|v| {
                        Reply::CheckpointNames(v.into_iter().map(|c| c.name.clone()).collect())
                    })
                    .map_err(Error::from);
                answer(ctx, r);
            }
            Request::CheckpointLookup { name } => {
                let r = core
                    .tree
                    .lookup(&name)
                    .map(|c| Reply::Checkpoint(Box::new(c.clone())))
                    .map_err(Error::from);
                answer(ctx, r);
            }
            Request::CheckpointParent { name } => {
                let r = core
                    .tree
                    .parent(&name)
                    .map(|c| Reply::Checkpoint(Box::new(c.clone())))
                    .map_err(Error::from);
                answer(ctx, r);
            }
            Request::CheckpointGetXml { name, size: false } => {
                let r = core
                    .tree
                    .lookup(&name)
                    .map(|c| Reply::Checkpoint(Box::new(c.clone())))
                    .map_err(Error::from);
                answer(ctx, r);
            }
            Request::CheckpointRedefine {
                checkpoint,
                validate: false,
            } => {
                // Metadata only, but not under an operation that is reading the tree.
                let r = match core.jobs.short_job() {
                    Some(holder) => Err(crate::error::ConflictError::DomainJob {
                        holder: holder.to_string(),
                    }
                    .into()),
                    None => crate::checkpoint::ops::redefine_now(core, ctx, checkpoint),
                };
                answer(ctx, r.map(|()| Reply::Done));
            }
            Request::CheckpointCreate { .. }
            | Request::CheckpointRedefine { .. }
            | Request::CheckpointDelete { .. }
            | Request::CheckpointDeleteEach { .. }
            | Request::CheckpointGetXml { .. } => {
                if let Some(op) = ShortOp::start(core, ctx, req, request) {
                    *short = Some(op);
                }
            }
            Request::BackupBegin {
                spec,
                checkpoint,
                reuse_external,
            } => {
                if !core.connected {
                    answer(ctx, Err(RequestError::NotRunning.into()));
                    return;
                }
                if let Err(e) = core.jobs.acquire_long(crate::jobs::JobKind::Backup) {
                    answer(ctx, Err(e.into()));
                    return;
                }
                *backup = BackupRun::begin(core, ctx, req, spec, checkpoint, reuse_external);
            }
            Request::BackupGetXml => match backup.as_ref() {
                Some(run) => answer(ctx, Ok(Reply::Backup(Box::new(run.plan().clone())))),
                None => answer(ctx, Err(RequestError::NoBackup.into())),
            },
            Request::JobStats {
                completed,
                keep_completed,
            } => {
                if completed {
                    let stats = if keep_completed {
                        core.completed.clone()
                    } else {
                        core.completed.take()
                    };
                    answer(ctx, Ok(Reply::Stats(stats)));
                } else {
                    match backup.as_mut() {
                        Some(run) => run.stats_request(core, ctx, req),
                        None => answer(ctx, Ok(Reply::Stats(None))),
                    }
                }
            }
            Request::AbortJob => match backup.take() {
                Some(run) => *backup = run.abort(core, ctx, req),
                None => answer(ctx, Err(RequestError::NoJob.into())),
            },
            Request::BlockJobAbort { disk } => match backup.take() {
                Some(run) => *backup = run.abort_disk(core, ctx, req, &disk),
                None => answer(ctx, Err(RequestError::NoJob.into())),
            },
        }
    }
}

/// Error class of the synthetic error a command gets when QEMU never answers it.
const TIMEOUT_CLASS: &str = "vbackup-timeout";

/// Converts a QEMU error reply into the engine's error.
pub(crate) fn refused(command: &str, e: &QmpError) -> Error {
    if e.class.as_str() == TIMEOUT_CLASS {
        return Error::QemuMisbehaved(e.desc.clone());
    }
    Error::QemuRefused {
        command: command.to_owned(),
        class: e.class.as_str().to_owned(),
        desc: e.desc.clone(),
    }
}

/// Reads a `query-named-block-nodes` reply into a node table.
pub(crate) fn node_table(value: &Value) -> Result<NodeTable, Error> {
    let nodes = crate::qmp::query_named_block_nodes(value)
        .map_err(|e| Error::QemuMisbehaved(format!("query-named-block-nodes: {e}")))?;
    let mut table = NodeTable::new();
    for n in nodes {
        let Some(name) = n.node_name.clone() else {
            continue;
        };
        table.insert(
            name.clone(),
            NodeState {
                node_name: name,
                driver: n.drv.clone(),
                read_only: n.ro,
                filename: Some(n.image.filename.clone()),
                virtual_size_bytes: n.image.virtual_size,
                cluster_size_bytes: n.image.cluster_size,
                bitmaps: n
                    .dirty_bitmaps
                    .iter()
                    .map(|b| BitmapState {
                        name: b.name.clone(),
                        recording: b.recording,
                        persistent: b.persistent,
                        busy: b.busy,
                        inconsistent: b.inconsistent,
                        granularity_bytes: b.granularity,
                        count_bytes: b.count,
                    })
                    .collect(),
            },
        );
    }
    Ok(table)
}

/// The format node names of a disk's layers, top first; an error if one is unknown.
pub(crate) fn disk_layers(def: &DomainDef, target: &str) -> Result<Vec<String>, Error> {
    let disk = def
        .disk(target)
        .ok_or_else(|| RequestError::NoDisk(target.to_owned()))?;
    disk.layers
        .iter()
        .map(|l| {
            l.node_name.clone().ok_or_else(|| {
                RequestError::Unsupported(format!(
                    "disk '{target}' has a layer without a node name"
                ))
                .into()
            })
        })
        .collect()
}
