//! A running backup: preparation, the atomic start, monitoring, abort, cleanup and recovery.
//!
//! Phases (the variants of `Phase`): `Querying` (node data) → `Preparing` (target/scratch
//! images, TLS, NBD server, then the one transaction that creates the checkpoint bitmaps and
//! starts every job; pull exports after it) → `Running` (job monitoring from events and
//! `query-jobs`, and the cleanup of each disk as its job ends) → gone, once every disk ended
//! and its cleanup ran. A failure before the transaction leads to `RollingBack`, which undoes
//! what was set up. A lost connection leads to `Disconnected`; after [`Input::Reconnected`]
//! the run is `Reconciling`: it queries QEMU's jobs and resumes (`Preparing` or `Running`) or
//! concludes.
//!
//! Preparation and cleanup commands run one at a time from a queue, so each step sees the
//! result of the previous one.
//!
//! The plan is journaled as soon as it is known (stage `Preparing`, before any target is
//! created), after each image file the engine created, right before the transaction is sent
//! (stage `Starting`) and once QEMU confirmed it (stage `Running`). A store write that fails
//! stops the driver before the next command, so an engine restarted from the store rolls back
//! a start whose transaction was never sent and takes over the jobs of one whose transaction
//! went through.
//!
//! [`Input::Reconnected`]: crate::protocol::Input::Reconnected

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use super::{
    BackupDiskPlan, BackupMode, BackupPlan, BackupSpec, BackupStage, BackupStore, DiskJobState,
    DomainJobStatus, NbdServer, NbdTransport, StoreKind, default_temp_bitmap, job_id, node_index,
    node_names,
};
use crate::chain::{NodeTable, check_chain};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, RequestError};
use crate::kernel::checkpoints::{check_create, commit_created, create_actions};
use crate::kernel::commands as cmd;
use crate::kernel::ctx::Ctx;
use crate::kernel::qemu::{disk_layers, node_table, refused};
use crate::kernel::retry::retry_delay_ms;
use crate::kernel::state::{BackupTag, BackupTimer, Core, Owner, Timer};
use crate::kernel::timers::TimerTable;
use crate::model::ImageFormat;
use crate::protocol::{
    DomainEvent, FileError, FileOp, FileOpId, PushWrite, Reply, RequestId, StoreOp,
};
use crate::qmp::{
    BitmapRef, BlockExportAdd, InetSocketAddress, JobInfo, JobStatus as QemuJobStatus,
    NbdServerStart, ObjectAdd, ObjectDel, QmpCommand, QmpError, QmpEvent, Secret,
    SocketAddressLegacy, SyncMode, TlsCredsX509, TlsEndpoint, TransactionAction, UnixSocketAddress,
};

/// Id of the TLS credentials object of a pull backup's NBD server.
pub const TLS_OBJECT: &str = "objlibvirt_backup_tls0";
/// Id of the secret object holding the TLS key's passphrase.
pub const TLS_SECRET_OBJECT: &str = "objlibvirt_backup_tls0-secret0";
/// Holder name disks are registered under while a backup uses them.
pub const DISK_HOLDER: &str = "backup";

/// What a queued step is.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Send a command; `effect` records what success means.
    Cmd { command: QmpCommand, effect: Effect },
    /// Create an empty image file.
    CreateFile { path: String },
    /// Wait for an image-creation job to conclude, then check and dismiss it.
    AwaitCreateJob { job: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Effect {
    None,
    NodeAdded(String),
    ObjectAdded(String),
    NbdStarted,
    Transaction,
    Export(usize),
    /// Cleanup: failures are ignored, except that a refused cleanup command (see
    /// [`Gone`]) is checked and tried again until its object is gone.
    BestEffort,
    /// A cleanup command tried again (`n` earlier tries were refused).
    Retry(u32),
    /// A query checking whether the object of a refused cleanup command is gone.
    Verify {
        command: Box<QmpCommand>,
        attempt: u32,
    },
    /// `query-jobs` deciding how the named backup job ended.
    CheckJob(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// The first node query is out; the request's definition waits for its answer.
    Querying {
        spec: Box<BackupSpec>,
    },
    Preparing,
    Running,
    RollingBack {
        error: Error,
    },
    Disconnected,
    /// After a reconnection, waiting for QEMU's jobs; `poll_attempts` failed `query-jobs`
    /// so far (the back-off grows with them).
    Reconciling {
        poll_attempts: u32,
    },
}

/// How far the transaction that starts the backup got; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Not sent: no job can be ours.
    NotSent,
    /// Sent, its answer not (yet) known: the jobs exist exactly when QEMU lists them.
    Sent,
    /// QEMU confirmed it: the jobs run and the checkpoint exists.
    Committed,
}

/// What the queued step in progress waits for. One thing at a time: a command's reply, a
/// file operation, an image-creation job, or a target's sync.
#[derive(Debug, Clone, PartialEq)]
enum Busy {
    /// Nothing: the next queued step may start.
    Idle,
    /// The reply to a command; `effect` records what success means. Kept across a lost
    /// connection when it cleans up.
    Command { command: QmpCommand, effect: Effect },
    /// The creation of an empty image file.
    File { id: FileOpId, path: String },
    /// The conclusion of an image-creation job.
    CreateJob { job: String },
    /// The `query-jobs` checking a concluded image-creation job.
    CreateJobCheck,
    /// The sync of a completed push target (the disk's index).
    Sync { id: FileOpId, disk: usize },
}

/// A backup from its begin request to its end.
#[derive(Debug)]
pub(crate) struct BackupRun {
    plan: BackupPlan,
    phase: Phase,
    begin_req: Option<RequestId>,
    checkpoint: Option<Checkpoint>,
    /// How far the one transaction that starts the jobs got.
    start: Start,
    abort_requested: bool,
    steps: VecDeque<Step>,
    /// What the queued step in progress waits for.
    busy: Busy,
    /// The TCP port was chosen by the engine (so another one may be tried).
    port_chosen: bool,
    create_concluded: BTreeSet<String>,
    /// Whether the plan was journaled (so an ending run must delete the journal).
    journaled: bool,
    added_nodes: Vec<String>,
    added_objects: Vec<String>,
    nbd_started: bool,
    /// The NBD server belongs to someone else (`DomainConfig::nbd_server_running`): exports
    /// are added to it and deleted one by one; the server is never started nor stopped.
    shared_server: bool,
    /// Whether the TLS objects' removal is queued (once, when the first pull disk ends).
    objects_del_queued: bool,
    /// Backup jobs whose conclusion is queued for checking.
    checks_queued: BTreeSet<String>,
    /// Backup jobs that concluded while the transaction's reply was still outstanding: QEMU
    /// runs a job with nothing to copy to its end inside the transaction and sends its events
    /// before the reply. Checked as soon as the transaction commits.
    concluded_before_reply: BTreeSet<String>,
    /// An abort arrived before the transaction was sent: roll back at the next quiet moment.
    abort_before_start: bool,
    /// Whether the run holds the short slot, which keeps checkpoint operations out while the
    /// backup is being started.
    holds_start_slot: bool,
    nodes: NodeTable,
    /// Refused cleanup commands waiting for their next try ([`BackupTimer::Retry`] under the
    /// same number): the command, tries so far.
    retries: BTreeMap<u64, (QmpCommand, u32)>,
    /// Checks of a job's end that QEMU refused, waiting for [`BackupTimer::CheckRetry`] under
    /// the same number: the job. Without them a job whose end check was refused would be
    /// waited for forever.
    check_retries: BTreeMap<u64, String>,
    /// The number the next retry timer is armed under.
    next_timer: u64,
    /// Refused end checks of this run so far (the back-off grows with them).
    check_attempts: u32,
    /// Completed push disks whose target was checked closed (and made durable, or failed).
    settled: BTreeSet<usize>,
    /// Disks the journal of a restarted engine already shows ended: their cleanup may not
    /// have run, so the first reconcile queues it again.
    restored_final: Vec<usize>,
}

/// What a refused cleanup command was meant to make disappear, and how to check.
enum Gone {
    Job(String),
    Node(String),
    Bitmap { node: String, name: String },
    Export(String),
    NbdServer,
}

impl Gone {
    /// The cleanup commands that are checked and tried again when refused.
    fn of(command: &QmpCommand) -> Option<Gone> {
        Some(match command {
            QmpCommand::JobDismiss(j) => Gone::Job(j.id.clone()),
            QmpCommand::BlockdevDel(d) => Gone::Node(d.node_name.clone()),
            QmpCommand::BlockDirtyBitmapRemove(b) => Gone::Bitmap {
                node: b.node.clone(),
                name: b.name.clone(),
            },
            QmpCommand::BlockExportDel(e) => Gone::Export(e.id.clone()),
            QmpCommand::NbdServerStop => Gone::NbdServer,
            _ => return None,
        })
    }

    /// The query that tells whether the object is gone; `None` when the refusal itself says.
    fn query(&self) -> Option<QmpCommand> {
        match self {
            Gone::Job(_) => Some(cmd::query_jobs()),
            Gone::Node(_) | Gone::Bitmap { .. } => Some(cmd::query_nodes()),
            Gone::Export(_) => Some(QmpCommand::QueryBlockExports),
            Gone::NbdServer => None,
        }
    }

    /// Whether the query's answer shows the object gone.
    fn is_gone(&self, answer: &Value) -> Option<bool> {
        match self {
            Gone::Job(id) => parse_jobs(answer)
                .ok()
                .map(|j| j.iter().all(|j| &j.id != id)),
            Gone::Node(node) => node_table(answer).ok().map(|t| !t.contains_key(node)),
            Gone::Bitmap { node, name } => node_table(answer)
                .ok()
                .map(|t| t.get(node).is_none_or(|n| n.bitmap(name).is_none())),
            Gone::Export(id) => answer.as_array().map(|a| {
                a.iter()
                    .all(|e| e.get("id").and_then(Value::as_str) != Some(id.as_str()))
            }),
            Gone::NbdServer => None,
        }
    }
}

/// Whether a step is cleanup that must survive a lost connection, as the step to run again.
fn surviving_cleanup(step: Step) -> Option<Step> {
    match step {
        Step::Cmd {
            command,
            effect: effect @ (Effect::BestEffort | Effect::Retry(_)),
        } if Gone::of(&command).is_some() || matches!(command, QmpCommand::ObjectDel(_)) => {
            Some(Step::Cmd { command, effect })
        }
        Step::Cmd {
            effect: Effect::Verify { command, attempt },
            ..
        } => Some(Step::Cmd {
            command: *command,
            effect: Effect::Retry(attempt),
        }),
        _ => None,
    }
}

impl BackupRun {
    /// The plan, with every default filled in.
    pub(crate) fn plan(&self) -> &BackupPlan {
        &self.plan
    }

    /// A run restored from the journal after a restart of the engine: its jobs were started;
    /// it waits for the QMP session to reconcile.
    pub(crate) fn restore(
        plan: BackupPlan,
        jobs: &mut crate::jobs::JobSlots,
        shared_server: bool,
    ) -> Self {
        let _ = jobs.acquire_long(crate::jobs::JobKind::Backup);
        let targets: Vec<String> = plan.disks.iter().map(|d| d.target.clone()).collect();
        let _ = jobs.occupy_disks(&targets, DISK_HOLDER);
        let nbd_started = plan.mode == BackupMode::Pull && !shared_server;
        let added_objects = plan
            .tls_secret_object
            .iter()
            .chain(plan.tls_object.iter())
            .cloned()
            .collect();
        // What the journal's stage says about the transaction decides how the reconcile goes:
        // before it was sent nothing QEMU lists can be ours; while its answer was unknown the
        // jobs exist exactly when QEMU lists them.
        let start = match plan.stage {
            BackupStage::Preparing => Start::NotSent,
            BackupStage::Starting => Start::Sent,
            BackupStage::Running => Start::Committed,
        };
        let checkpoint = if start == Start::Committed {
            None
        } else {
            plan.checkpoint_def.clone().map(|c| *c)
        };
        let restored_final = (0..plan.disks.len())
            .filter(|i| plan.disks[*i].state.is_final())
            .collect();
        Self {
            plan,
            phase: Phase::Disconnected,
            begin_req: None,
            checkpoint,
            start,
            abort_requested: false,
            steps: VecDeque::new(),
            busy: Busy::Idle,
            port_chosen: false,
            create_concluded: BTreeSet::new(),
            journaled: true,
            added_nodes: Vec::new(),
            added_objects,
            nbd_started,
            shared_server,
            objects_del_queued: false,
            checks_queued: BTreeSet::new(),
            concluded_before_reply: BTreeSet::new(),
            holds_start_slot: false,
            abort_before_start: false,
            nodes: NodeTable::new(),
            retries: BTreeMap::new(),
            check_retries: BTreeMap::new(),
            next_timer: 0,
            check_attempts: 0,
            settled: BTreeSet::new(),
            restored_final,
        }
    }

    /// Validates a begin request and starts with the node query. The long slot is already
    /// held; on refusal it is released here.
    pub(crate) fn begin(
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        req: RequestId,
        spec: BackupSpec,
        checkpoint: Option<Checkpoint>,
        reuse_external: bool,
    ) -> Option<Self> {
        match Self::validate(core, &spec, checkpoint.as_ref()) {
            Ok(targets) => {
                let taken = core
                    .jobs
                    .occupy_disks(&targets, DISK_HOLDER)
                    .and_then(|()| core.jobs.acquire_short(crate::jobs::JobKind::BackupStart));
                if let Err(e) = taken {
                    core.jobs.free_disks_of(DISK_HOLDER);
                    core.jobs.release_long();
                    ctx.respond(req, Err(e.into()));
                    return None;
                }
            }
            Err(e) => {
                core.jobs.release_long();
                ctx.respond(req, Err(e));
                return None;
            }
        }
        ctx.send(Owner::Backup(BackupTag::Query), cmd::query_nodes());
        Some(Self {
            plan: BackupPlan {
                mode: spec.mode,
                incremental: spec.incremental.clone(),
                // A shared server is recorded as it runs (a request may leave the port out).
                server: match (&core.config.nbd_server_running, spec.mode) {
                    (Some(running), BackupMode::Pull) => Some(running.clone()),
                    _ => spec.server.clone(),
                },
                tls_object: None,
                tls_secret_object: None,
                disks: Vec::new(),
                skipped_disks: Vec::new(),
                checkpoint: checkpoint.as_ref().map(|c| c.name.clone()),
                reuse_external,
                started_ms: ctx.now.as_ms(),
                start_error: None,
                stage: BackupStage::Preparing,
                checkpoint_def: checkpoint.clone().map(Box::new),
                created_files: Vec::new(),
            },
            phase: Phase::Querying {
                spec: Box::new(spec),
            },
            holds_start_slot: true,
            abort_before_start: false,
            begin_req: Some(req),
            checkpoint,
            start: Start::NotSent,
            abort_requested: false,
            steps: VecDeque::new(),
            busy: Busy::Idle,
            port_chosen: false,
            create_concluded: BTreeSet::new(),
            journaled: false,
            added_nodes: Vec::new(),
            added_objects: Vec::new(),
            nbd_started: false,
            shared_server: core.config.nbd_server_running.is_some(),
            objects_del_queued: false,
            checks_queued: BTreeSet::new(),
            concluded_before_reply: BTreeSet::new(),
            nodes: NodeTable::new(),
            retries: BTreeMap::new(),
            check_retries: BTreeMap::new(),
            next_timer: 0,
            check_attempts: 0,
            settled: BTreeSet::new(),
            restored_final: Vec::new(),
        })
    }

    /// Checks everything that does not need QEMU; returns the targets of the disks taking part.
    fn validate(
        core: &Core,
        spec: &BackupSpec,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Vec<String>, Error> {
        match (spec.mode, &spec.server) {
            (BackupMode::Push, Some(_)) => {
                return Err(RequestError::Unsupported(
                    "use of <server> requires pull mode backup".into(),
                )
                .into());
            }
            (BackupMode::Pull, None) => {
                // Without a <server> the exports go on the server that already runs.
                if core.config.nbd_server_running.is_none() {
                    return Err(RequestError::Unsupported(
                        "pull mode backup requires a <server>".into(),
                    )
                    .into());
                }
            }
            (BackupMode::Pull, Some(s)) => {
                if let NbdTransport::Unix { socket } = &s.transport
                    && !socket.starts_with('/')
                {
                    return Err(RequestError::Unsupported(format!(
                        "backup socket path '{socket}' must be absolute"
                    ))
                    .into());
                }
                match &core.config.nbd_server_running {
                    // QEMU runs one NBD server per process: a client connecting anywhere
                    // else, or with other security, would never reach the exports.
                    Some(running) if !running.serves(s) => {
                        return Err(RequestError::NbdServerInUse {
                            running: running.to_string(),
                            requested: s.to_string(),
                        }
                        .into());
                    }
                    Some(_) => {}
                    None if s.uses_tls() && core.config.tls.is_none() => {
                        return Err(RequestError::Unsupported(
                            "backup TLS directory not configured".into(),
                        )
                        .into());
                    }
                    None => {}
                }
            }
            (BackupMode::Push, None) => {}
        }
        let mut targets = Vec::new();
        for d in spec.disks.iter().filter(|d| d.backup) {
            let disk = core
                .def
                .disk(&d.target)
                .ok_or_else(|| RequestError::NoDisk(d.target.clone()))?;
            if disk.is_empty() {
                return Err(
                    RequestError::Unsupported(format!("disk '{}' has no media", d.target)).into(),
                );
            }
            if disk.bus.as_deref() == Some("sd") || disk.transient {
                return Err(RequestError::Unsupported(format!(
                    "block jobs are not supported on disk '{}'",
                    d.target
                ))
                .into());
            }
            disk_layers(&core.def, &d.target)?;
            let format = d
                .store
                .as_ref()
                .and_then(|s| s.format.clone())
                .unwrap_or(ImageFormat::Qcow2);
            if format != ImageFormat::Qcow2 {
                let msg = if spec.mode == BackupMode::Pull {
                    format!(
                        "pull mode backup for disk '{}' requires qcow2 driver",
                        d.target
                    )
                } else {
                    format!(
                        "backup target format '{}' for disk '{}' is not supported",
                        format.name(),
                        d.target
                    )
                };
                return Err(RequestError::Unsupported(msg).into());
            }
            if let Some(cp) = &d.incremental {
                let Some(c) = core.tree.get(cp) else {
                    return Err(RequestError::IncrementalCheckpointMissing {
                        checkpoint: cp.clone(),
                        disk: d.target.clone(),
                    }
                    .into());
                };
                // The last reconcile found this disk's bitmap chain missing or broken.
                if core.invalid.get(cp).is_some_and(|t| t.contains(&d.target)) {
                    let bitmap = c
                        .disks
                        .iter()
                        .find(|x| x.target == d.target)
                        .and_then(|x| x.bitmap.clone())
                        .unwrap_or_else(|| cp.clone());
                    return Err(RequestError::CheckpointInconsistent {
                        bitmap,
                        disk: d.target.clone(),
                    }
                    .into());
                }
            }
            if let Some(BackupStore { path: Some(p), .. }) = &d.store
                && !p.starts_with('/')
            {
                return Err(RequestError::Unsupported(format!(
                    "backup store path '{p}' must be absolute"
                ))
                .into());
            }
            targets.push(d.target.clone());
        }
        if targets.is_empty() {
            return Err(RequestError::Unsupported("no disks selected for backup".into()).into());
        }
        if let Some(c) = checkpoint {
            check_create(&core.def, &core.tree, c)?;
        }
        core.jobs
            .check_disks_free(targets.iter().map(String::as_str))?;
        Ok(targets)
    }

    /// Builds the per-disk plan from the node data and queues the preparation steps.
    fn plan_from_nodes(
        &mut self,
        core: &Core,
        ctx: &Ctx<'_>,
        spec: &BackupSpec,
    ) -> Result<(), Error> {
        let mut next_index = self
            .nodes
            .keys()
            .filter_map(|n| node_index(n))
            .chain(
                core.def
                    .disks
                    .iter()
                    .flat_map(|d| d.layers.iter().filter_map(|l| l.index)),
            )
            .max()
            .unwrap_or(0)
            + 1;
        let suffix = match &self.checkpoint {
            Some(c) => c.name.clone(),
            None => (ctx.now.as_ms() / 1000).to_string(),
        };
        for d in &spec.disks {
            if !d.backup {
                self.plan.skipped_disks.push(d.target.clone());
                continue;
            }
            let layers = disk_layers(&core.def, &d.target)?;
            let Some(device_node) = layers.first().cloned() else {
                return Err(
                    RequestError::Unsupported(format!("disk '{}' has no media", d.target)).into(),
                );
            };
            let device_path = core
                .def
                .disk(&d.target)
                .and_then(|x| x.top())
                .and_then(|l| l.path.clone());
            let (temp_bitmap, temp_bitmap_node_is_scratch) = match &d.incremental {
                Some(cp_name) => {
                    let bitmap = core
                        .tree
                        .get(cp_name)
                        .and_then(|c| c.disks.iter().find(|x| x.target == d.target))
                        .and_then(|x| x.bitmap.clone());
                    let inconsistent = || RequestError::CheckpointInconsistent {
                        bitmap: cp_name.clone(),
                        disk: d.target.clone(),
                    };
                    let bitmap = bitmap.ok_or_else(inconsistent)?;
                    check_chain(&self.nodes, &layers, &bitmap).map_err(|_| {
                        RequestError::CheckpointInconsistent {
                            bitmap: bitmap.clone(),
                            disk: d.target.clone(),
                        }
                    })?;
                    let name = match spec.mode {
                        BackupMode::Pull => d
                            .export_bitmap
                            .clone()
                            .unwrap_or_else(|| default_temp_bitmap(&d.target)),
                        BackupMode::Push => default_temp_bitmap(&d.target),
                    };
                    (Some(name), spec.mode == BackupMode::Pull)
                }
                None => (None, false),
            };
            let store_kind = d.store.as_ref().map_or(StoreKind::File, |s| s.kind);
            let store_path = match d.store.as_ref().and_then(|s| s.path.clone()) {
                Some(p) => p,
                None => match (&device_path, store_kind) {
                    (Some(p), StoreKind::File) => format!("{p}.{suffix}"),
                    _ => {
                        return Err(RequestError::Unsupported(format!(
                            "refusing to generate file name for disk '{}'",
                            d.target
                        ))
                        .into());
                    }
                },
            };
            let index = next_index;
            next_index += 1;
            let (format_node, storage_node) = node_names(index);
            let pull = spec.mode == BackupMode::Pull;
            self.plan.disks.push(BackupDiskPlan {
                target: d.target.clone(),
                device_node: device_node.clone(),
                device_path,
                incremental: d.incremental.clone(),
                store_kind,
                store_path,
                store_format: ImageFormat::Qcow2,
                index,
                job_id: job_id(&d.target, &device_node),
                temp_bitmap_node: temp_bitmap.as_ref().map(|_| {
                    if temp_bitmap_node_is_scratch {
                        format_node.clone()
                    } else {
                        device_node.clone()
                    }
                }),
                temp_bitmap,
                export_name: pull
                    .then(|| d.export_name.clone().unwrap_or_else(|| d.target.clone())),
                export_id: pull.then(|| format!("libvirt-nbd-{format_node}")),
                format_node,
                storage_node,
                created_by_us: !self.plan.reuse_external,
                target_closed: false,
                state: DiskJobState::None,
                progress_current_bytes: 0,
                progress_total_bytes: 0,
                error: None,
            });
        }
        self.queue_preparation(core)
    }

    fn queue_preparation(&mut self, core: &Core) -> Result<(), Error> {
        let pull = self.plan.mode == BackupMode::Pull;
        let no_flush = core.config.push_write == PushWrite::Deferred;
        for d in &self.plan.disks {
            let backing = if pull || d.incremental.is_some() {
                Some(d.device_node.as_str())
            } else {
                None
            };
            if !self.plan.reuse_external {
                if d.store_kind == StoreKind::File {
                    self.steps.push_back(Step::CreateFile {
                        path: d.store_path.clone(),
                    });
                }
                self.steps.push_back(Step::Cmd {
                    command: cmd::add_storage_node(
                        &d.storage_node,
                        &d.store_path,
                        d.store_kind == StoreKind::Block,
                        no_flush,
                    ),
                    effect: Effect::NodeAdded(d.storage_node.clone()),
                });
                let device = self.nodes.get(&d.device_node);
                let size_bytes = device.map_or(0, |n| n.virtual_size_bytes);
                let cluster = device.and_then(|n| n.cluster_size_bytes);
                let create_job = format!("create-{}", d.format_node);
                let backing_format = core
                    .def
                    .disk(&d.target)
                    .and_then(|x| x.top())
                    .map(|l| l.format.name().to_owned());
                self.steps.push_back(Step::Cmd {
                    command: cmd::create_qcow2(&cmd::Qcow2Create {
                        job_id: &create_job,
                        storage: &d.storage_node,
                        size_bytes,
                        cluster_size_bytes: cluster,
                        backing_file: backing.and(d.device_path.as_deref()),
                        backing_format: backing.and(backing_format.as_deref()),
                    }),
                    effect: Effect::None,
                });
                self.steps
                    .push_back(Step::AwaitCreateJob { job: create_job });
            } else {
                self.steps.push_back(Step::Cmd {
                    command: cmd::add_storage_node(
                        &d.storage_node,
                        &d.store_path,
                        d.store_kind == StoreKind::Block,
                        no_flush,
                    ),
                    effect: Effect::NodeAdded(d.storage_node.clone()),
                });
            }
            self.steps.push_back(Step::Cmd {
                command: cmd::add_qcow2_node(&d.format_node, &d.storage_node, backing),
                effect: Effect::NodeAdded(d.format_node.clone()),
            });
        }
        if pull {
            let server = self.plan.server.clone().ok_or_else(|| {
                RequestError::Unsupported("pull mode backup requires a <server>".into())
            })?;
            let mut tls_creds = None;
            // A shared server brings its own credentials.
            if server.uses_tls() && !self.shared_server {
                let tls = core.config.tls.clone().ok_or_else(|| {
                    RequestError::Unsupported("backup TLS directory not configured".into())
                })?;
                if let Some(file) = &tls.secret_file {
                    self.steps.push_back(Step::Cmd {
                        command: QmpCommand::ObjectAdd(ObjectAdd::Secret(Secret {
                            id: TLS_SECRET_OBJECT.into(),
                            file: Some(file.clone()),
                            ..Secret::default()
                        })),
                        effect: Effect::ObjectAdded(TLS_SECRET_OBJECT.into()),
                    });
                    self.plan.tls_secret_object = Some(TLS_SECRET_OBJECT.into());
                }
                self.steps.push_back(Step::Cmd {
                    command: QmpCommand::ObjectAdd(ObjectAdd::TlsCredsX509(TlsCredsX509 {
                        id: TLS_OBJECT.into(),
                        dir: Some(tls.cert_dir.clone()),
                        endpoint: Some(TlsEndpoint::Server),
                        verify_peer: Some(tls.verify_peer),
                        passwordid: tls
                            .secret_file
                            .as_ref()
                            .map(|_| TLS_SECRET_OBJECT.to_owned()),
                        ..TlsCredsX509::default()
                    })),
                    effect: Effect::ObjectAdded(TLS_OBJECT.into()),
                });
                self.plan.tls_object = Some(TLS_OBJECT.into());
                tls_creds = Some(TLS_OBJECT.to_owned());
            }
            if self.shared_server {
                // The running server is used as it is; the backup's <server> names it.
                self.plan.server = Some(server);
            } else {
                self.port_chosen = matches!(server.transport, NbdTransport::Tcp { port: None, .. });
                let server = fill_port(server, core.config.nbd_port_min);
                self.steps.push_back(Step::Cmd {
                    command: nbd_start(&server, tls_creds.clone()),
                    effect: Effect::NbdStarted,
                });
                self.plan.server = Some(server);
            }
        }
        self.steps.push_back(Step::Cmd {
            command: cmd::transaction(self.transaction_actions(core)),
            effect: Effect::Transaction,
        });
        if pull {
            for (i, d) in self.plan.disks.iter().enumerate() {
                let mut e = BlockExportAdd::nbd(
                    d.export_id.clone().unwrap_or_default(),
                    d.format_node.clone(),
                );
                e.writable = Some(false);
                e.name = d.export_name.clone();
                e.bitmaps = d
                    .temp_bitmap
                    .as_ref()
                    .map(|b| vec![BitmapRef::Name(b.clone())]);
                self.steps.push_back(Step::Cmd {
                    command: QmpCommand::BlockExportAdd(e),
                    effect: Effect::Export(i),
                });
            }
        }
        Ok(())
    }

    fn transaction_actions(&self, core: &Core) -> Vec<TransactionAction> {
        let mut actions = match &self.checkpoint {
            Some(c) => create_actions(&core.def, c),
            None => Vec::new(),
        };
        let pull = self.plan.mode == BackupMode::Pull;
        let copy_offload =
            !pull && core.config.push_write == PushWrite::Deferred && !core.copy_offload_refused;
        for d in &self.plan.disks {
            if let (Some(bitmap), Some(node), Some(cp)) =
                (&d.temp_bitmap, &d.temp_bitmap_node, &d.incremental)
            {
                let cp_bitmap = core
                    .tree
                    .get(cp)
                    .and_then(|c| c.disks.iter().find(|x| x.target == d.target))
                    .and_then(|x| x.bitmap.clone())
                    .unwrap_or_else(|| cp.clone());
                let layers = disk_layers(&core.def, &d.target).unwrap_or_default();
                if let Ok(m) = check_chain(&self.nodes, &layers, &cp_bitmap) {
                    actions.push(cmd::add_temp_bitmap(node, bitmap, m.granularity_bytes));
                    actions.push(cmd::merge(node, bitmap, &m.sources));
                }
            }
            let (sync, bitmap) = match (pull, &d.temp_bitmap) {
                (true, _) => (SyncMode::None, None),
                (false, Some(b)) => (SyncMode::Incremental, Some(b.as_str())),
                (false, None) => (SyncMode::Full, None),
            };
            actions.push(cmd::backup_action(
                &d.job_id,
                &d.device_node,
                &d.format_node,
                sync,
                bitmap,
                copy_offload,
            ));
        }
        actions
    }

    // ----- driving the step queue -----

    /// Runs queued steps until one must wait.
    fn pump(mut self, core: &mut Core, ctx: &mut Ctx<'_>) -> Option<Self> {
        if self.busy != Busy::Idle {
            return Some(self);
        }
        if self.abort_before_start && self.start == Start::NotSent && self.phase == Phase::Preparing
        {
            // Nothing is in flight now, so the roll-back sees everything that was set up.
            self.abort_before_start = false;
            return self.roll_back(core, ctx, RequestError::Aborted.into());
        }
        match self.steps.pop_front() {
            Some(Step::Cmd { command, effect }) => {
                if effect == Effect::Transaction {
                    // Journaled first: if the write fails the driver stops before sending,
                    // and a restart rolls back a start whose jobs cannot exist.
                    self.start = Start::Sent;
                    self.plan.stage = BackupStage::Starting;
                    self.journal(ctx);
                }
                ctx.send(Owner::Backup(BackupTag::Step), command.clone());
                self.busy = Busy::Command { command, effect };
                Some(self)
            }
            Some(Step::CreateFile { path }) => {
                let id = ctx.file(FileOp::CreateExclusive { path: path.clone() });
                self.busy = Busy::File { id, path };
                self.arm_wait(ctx);
                Some(self)
            }
            Some(Step::AwaitCreateJob { job }) => {
                if self.create_concluded.contains(&job) {
                    ctx.send(
                        Owner::Backup(BackupTag::CreateJobCheck(job)),
                        cmd::query_jobs(),
                    );
                    self.busy = Busy::CreateJobCheck;
                } else {
                    self.busy = Busy::CreateJob { job };
                    self.arm_wait(ctx);
                }
                Some(self)
            }
            None => self.queue_drained(core, ctx),
        }
    }

    /// Nothing more is queued: decide what comes next.
    fn queue_drained(self, core: &mut Core, ctx: &mut Ctx<'_>) -> Option<Self> {
        if !self.retries.is_empty() && !matches!(self.phase, Phase::Preparing) {
            // Refused cleanup is tried again at its deadline; the run ends after it.
            return Some(self);
        }
        match &self.phase {
            Phase::Preparing => {
                let mut run = self;
                run.phase = Phase::Running;
                run.release_start_slot(core);
                if let Some(req) = run.begin_req.take() {
                    ctx.respond(req, Ok(Reply::Done));
                }
                if run.abort_requested {
                    run.cancel_running();
                    return run.pump(core, ctx);
                }
                run.maybe_finish(core, ctx)
            }
            Phase::RollingBack { error } => {
                let error = error.clone();
                let mut run = self;
                run.release_start_slot(core);
                for path in run.plan.created_files.iter().rev() {
                    ctx.file(FileOp::Remove { path: path.clone() });
                }
                if run.journaled {
                    ctx.persist(StoreOp::DeleteBackupJournal);
                }
                if let Some(req) = run.begin_req {
                    ctx.respond(req, Err(error));
                }
                core.jobs.free_disks_of(DISK_HOLDER);
                core.jobs.release_long();
                None
            }
            Phase::Running => self.maybe_finish(core, ctx),
            Phase::Querying { .. } | Phase::Disconnected | Phase::Reconciling { .. } => Some(self),
        }
    }

    /// Queues a refused cleanup command for another try after a growing delay.
    fn schedule_retry(&mut self, ctx: &mut Ctx<'_>, command: QmpCommand, attempt: u32) {
        let seq = self.take_timer_number();
        ctx.set_timer_in(
            Timer::Backup(BackupTimer::Retry(seq)),
            retry_delay_ms(attempt),
        );
        self.retries
            .insert(seq, (command, attempt.saturating_add(1)));
    }

    /// A fresh number for a retry timer (numbers grow, so retries expire in arming order).
    fn take_timer_number(&mut self) -> u64 {
        self.next_timer += 1;
        self.next_timer
    }

    /// Starts the wait for something that is not a command reply (a file operation, an
    /// image-creation job's conclusion): it times out like a command.
    fn arm_wait(&self, ctx: &mut Ctx<'_>) {
        let timeout = ctx.command_timeout_ms();
        ctx.set_timer_in(Timer::Backup(BackupTimer::Wait), timeout);
    }

    /// Writes the plan to the job journal.
    fn journal(&mut self, ctx: &mut Ctx<'_>) {
        self.journaled = true;
        ctx.persist(StoreOp::PutBackupJournal(Box::new(self.plan.clone())));
    }

    /// Lets checkpoint operations run again once the backup has started (or given up).
    fn release_start_slot(&mut self, core: &mut Core) {
        if self.holds_start_slot {
            self.holds_start_slot = false;
            core.jobs.release_short();
        }
    }

    /// Switches to rolling back: undo what preparation set up, then answer with `error`.
    fn roll_back(self, core: &mut Core, ctx: &mut Ctx<'_>, error: Error) -> Option<Self> {
        self.roll_back_after(core, ctx, error, Vec::new())
    }

    /// Rolls back, running `first` before the undo steps.
    fn roll_back_after(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        error: Error,
        first: Vec<Step>,
    ) -> Option<Self> {
        // An image-creation job that was started still has to be waited for and dismissed,
        // or it stays in QEMU and its id refuses every later backup: keep the queued wait
        // (and the dismissal that follows a checked job) ahead of the undo steps.
        let mut kept = Vec::new();
        if let Busy::CreateJob { job } = std::mem::replace(&mut self.busy, Busy::Idle) {
            kept.push(Step::AwaitCreateJob { job });
        }
        while let Some(step) = self.steps.pop_front() {
            match step {
                Step::AwaitCreateJob { .. }
                | Step::Cmd {
                    effect: Effect::BestEffort | Effect::Retry(_),
                    ..
                } => kept.push(step),
                // A refused cleanup command being checked: try it again instead.
                Step::Cmd {
                    effect: Effect::Verify { .. },
                    ..
                } => kept.extend(surviving_cleanup(step)),
                _ => break,
            }
        }
        self.steps.clear();
        self.steps.extend(first);
        self.steps.extend(kept);
        if self.nbd_started {
            self.steps.push_back(best_effort(QmpCommand::NbdServerStop));
        }
        for obj in self.added_objects.iter().rev() {
            self.steps
                .push_back(best_effort(QmpCommand::ObjectDel(ObjectDel {
                    id: obj.clone(),
                })));
        }
        // Format nodes before their storage nodes: reverse order of addition.
        for node in self.added_nodes.iter().rev() {
            self.steps.push_back(best_effort(cmd::del_node(node)));
        }
        self.phase = Phase::RollingBack { error };
        self.pump(core, ctx)
    }

    // ----- inputs -----

    /// Handles a reply addressed to the run.
    pub(crate) fn on_reply(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        tag: BackupTag,
        command: &str,
        result: Result<Value, QmpError>,
    ) -> Option<Self> {
        match tag {
            BackupTag::Query => {
                let nodes = match result
                    .map_err(|e| refused(command, &e))
                    .and_then(|v| node_table(&v))
                {
                    Ok(n) => n,
                    Err(e) => return self.roll_back(core, ctx, e),
                };
                self.nodes = nodes;
                let spec = match std::mem::replace(&mut self.phase, Phase::Preparing) {
                    Phase::Querying { spec } => *spec,
                    other => {
                        self.phase = other;
                        return self.roll_back(
                            core,
                            ctx,
                            Error::QemuMisbehaved("backup definition lost".into()),
                        );
                    }
                };
                if let Err(e) = self.plan_from_nodes(core, ctx, &spec) {
                    return self.roll_back(core, ctx, e);
                }
                // Journal the plan before anything is created: whatever happens next, a
                // restarted engine knows which nodes, jobs and bitmaps to look for.
                self.journal(ctx);
                self.phase = Phase::Preparing;
                self.pump(core, ctx)
            }
            BackupTag::Step => self.on_step_reply(core, ctx, command, result),
            BackupTag::CreateJobCheck(job) => {
                let outcome = result
                    .map_err(|e| refused(command, &e))
                    .and_then(|v| parse_jobs(&v))
                    .map(|jobs| jobs.into_iter().find(|j| j.id == job).and_then(|j| j.error));
                // The creation job is dismissed whatever happened.
                self.busy = Busy::Idle;
                if matches!(self.phase, Phase::RollingBack { .. }) {
                    // Already undoing: only the dismissal is still owed.
                    self.steps.push_front(best_effort(cmd::job_dismiss(&job)));
                    return self.pump(core, ctx);
                }
                match outcome {
                    Ok(None) => {
                        self.steps.push_front(best_effort(cmd::job_dismiss(&job)));
                        self.pump(core, ctx)
                    }
                    Ok(Some(err)) => {
                        let e = Error::QemuRefused {
                            command: "blockdev-create".into(),
                            class: "GenericError".into(),
                            desc: format!("failed to format image: {err}"),
                        };
                        self.roll_back_after(
                            core,
                            ctx,
                            e,
                            vec![best_effort(cmd::job_dismiss(&job))],
                        )
                    }
                    Err(e) => self.roll_back_after(
                        core,
                        ctx,
                        e,
                        vec![best_effort(cmd::job_dismiss(&job))],
                    ),
                }
            }
            BackupTag::Poll => match result.ok().and_then(|v| parse_jobs(&v).ok()) {
                Some(jobs) => self.reconcile(core, ctx, &jobs),
                None => {
                    // Without QEMU's jobs nothing can be decided: ask again later.
                    if let Phase::Reconciling { poll_attempts } = &mut self.phase {
                        let delay = retry_delay_ms(*poll_attempts);
                        ctx.set_timer_in(Timer::Backup(BackupTimer::Poll), delay);
                        *poll_attempts = poll_attempts.saturating_add(1);
                    }
                    Some(self)
                }
            },
            BackupTag::Stats(req) => {
                let mut jobs_seen = Vec::new();
                if let Ok(jobs) = result
                    .map_err(|e| refused(command, &e))
                    .and_then(|v| parse_jobs(&v))
                {
                    jobs_seen.clone_from(&jobs);
                    for j in &jobs {
                        if let Some(i) = self.plan.disk_by_job(&j.id)
                            && !self.plan.disks[i].state.is_final()
                        {
                            self.plan.disks[i].progress_current_bytes = j.current_progress;
                            self.plan.disks[i].progress_total_bytes = j.total_progress;
                        }
                    }
                }
                let mut stats = self.plan.stats(ctx.now.as_ms(), DomainJobStatus::Running);
                stats.waiting_for = Some(self.waiting_for(ctx.timers()));
                ctx.respond(req, Ok(Reply::Stats(Some(stats))));
                self.check_missed_ends(core, ctx, &jobs_seen)
            }
        }
    }

    fn on_step_reply(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        command: &str,
        result: Result<Value, QmpError>,
    ) -> Option<Self> {
        let (effect, sent) = match std::mem::replace(&mut self.busy, Busy::Idle) {
            Busy::Command { command, effect } => (effect, Some(command)),
            _ => (Effect::None, None),
        };
        if let Effect::CheckJob(job) = &effect {
            return self.on_check_job(core, ctx, job, result);
        }
        if let Effect::Verify { command, attempt } = effect {
            let gone = Gone::of(&command).and_then(|g| result.ok().and_then(|v| g.is_gone(&v)));
            if gone != Some(true) {
                self.schedule_retry(ctx, *command, attempt);
            }
            return self.pump(core, ctx);
        }
        let deleted_node = match &sent {
            Some(QmpCommand::BlockdevDel(del)) => Some(del.node_name.clone()),
            _ => None,
        };
        let rolling_back = matches!(self.phase, Phase::RollingBack { .. });
        let best_effort = rolling_back || matches!(effect, Effect::BestEffort | Effect::Retry(_));
        if best_effort
            && let Err(e) = &result
            && let Some(command) = sent
            && let Some(gone) = Gone::of(&command)
        {
            // QEMU refused a cleanup command: check whether its object is gone anyway, and
            // try again later if not.
            let attempt = match effect {
                Effect::Retry(n) => n,
                _ => 0,
            };
            match gone.query() {
                Some(query) => self.steps.push_front(Step::Cmd {
                    command: query,
                    effect: Effect::Verify {
                        command: Box::new(command),
                        attempt,
                    },
                }),
                None => {
                    // Only the NBD server has no query; QEMU says when none runs.
                    if !e.desc.contains("not running") {
                        self.schedule_retry(ctx, command, attempt);
                    }
                }
            }
            return self.pump(core, ctx);
        }
        match result {
            Err(e) if effect == Effect::NbdStarted && port_in_use(&e) => {
                // Do better than refusing: try the next port of the configured range.
                if let Some(next) = self.next_port(core) {
                    let tls = self.plan.tls_object.clone();
                    self.steps.push_front(Step::Cmd {
                        command: nbd_start(&next, tls),
                        effect: Effect::NbdStarted,
                    });
                    self.plan.server = Some(next);
                    return self.pump(core, ctx);
                }
                let (min, max) = (core.config.nbd_port_min, core.config.nbd_port_max);
                self.roll_back(core, ctx, RequestError::NoFreePort { min, max }.into())
            }
            Err(e) if !best_effort => {
                let error = refused(command, &e);
                match effect {
                    Effect::Export(_) => {
                        // The jobs run already: keep the checkpoint, stop the jobs, report.
                        self.plan.start_error = Some(error.to_string());
                        if let Some(req) = self.begin_req.take() {
                            ctx.respond(req, Err(error));
                        }
                        self.steps.retain(|s| {
                            !matches!(
                                s,
                                Step::Cmd {
                                    effect: Effect::Export(_),
                                    ..
                                }
                            )
                        });
                        self.phase = Phase::Running;
                        self.release_start_slot(core);
                        self.cancel_running();
                        self.pump(core, ctx)
                    }
                    Effect::Transaction
                        if e.desc.contains("x-perf") && !core.copy_offload_refused =>
                    {
                        // A QEMU without the `x-perf` knobs refused the whole transaction, so
                        // nothing of it happened: send it again without copy offload, and
                        // never ask this QEMU for it again.
                        core.copy_offload_refused = true;
                        self.steps.push_front(Step::Cmd {
                            command: cmd::transaction(self.transaction_actions(core)),
                            effect: Effect::Transaction,
                        });
                        self.pump(core, ctx)
                    }
                    Effect::Transaction => {
                        self.checkpoint = None;
                        self.roll_back(core, ctx, error)
                    }
                    _ => {
                        // A refused image creation started no job: nothing to wait for.
                        if matches!(self.steps.front(), Some(Step::AwaitCreateJob { .. })) {
                            self.steps.pop_front();
                        }
                        self.roll_back(core, ctx, error)
                    }
                }
            }
            _ => {
                // Only once QEMU confirmed deleting a completed target's format node is its
                // qcow2 metadata out of QEMU's memory. Journaled: a restarted engine then only
                // has to sync the target.
                if let Some(node) = deleted_node
                    && let Some(d) = self
                        .plan
                        .disks
                        .iter_mut()
                        .find(|d| d.format_node == node && d.state == DiskJobState::Complete)
                {
                    d.target_closed = true;
                    self.journal(ctx);
                }
                match effect {
                    Effect::NodeAdded(n) if !rolling_back => self.added_nodes.push(n),
                    Effect::ObjectAdded(o) if !rolling_back => self.added_objects.push(o),
                    Effect::NbdStarted if !rolling_back => self.nbd_started = true,
                    Effect::Transaction => {
                        if let Err(e) = self.commit(core, ctx) {
                            // QEMU has the bitmaps and jobs; only the metadata failed.
                            if let Some(req) = self.begin_req.take() {
                                ctx.respond(req, Err(e));
                            }
                        }
                    }
                    _ => {}
                }
                self.pump(core, ctx)
            }
        }
    }

    /// The transaction succeeded: the checkpoint exists, the jobs run. Persist both.
    fn commit(&mut self, core: &mut Core, ctx: &mut Ctx<'_>) -> Result<(), Error> {
        self.start = Start::Committed;
        self.plan.stage = BackupStage::Running;
        for d in &mut self.plan.disks {
            d.state = DiskJobState::Running;
        }
        // Jobs that already concluded will send no further event: check them now (in job-id
        // order, so the plan does not depend on event order).
        for job in std::mem::take(&mut self.concluded_before_reply) {
            if self.checks_queued.insert(job.clone()) {
                self.steps.push_back(Step::Cmd {
                    command: cmd::query_jobs(),
                    effect: Effect::CheckJob(job),
                });
            }
        }
        let r = match self.checkpoint.take() {
            // An engine restarted after a partial metadata write already has it.
            Some(c) if core.tree.get(&c.name).is_some() => Ok(()),
            Some(mut c) => {
                c.parent = None;
                commit_created(core, ctx, c).map(|_| ())
            }
            None => Ok(()),
        };
        self.journal(ctx);
        if self.plan.mode == BackupMode::Push
            && let Some(req) = self.begin_req.take()
        {
            ctx.respond(req, r.clone().map(|()| Reply::Done));
        }
        r
    }

    /// Handles a QMP event.
    pub(crate) fn on_event(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        event: &QmpEvent,
    ) -> Option<Self> {
        match event {
            QmpEvent::JobStatusChange(c) => {
                if c.status != QemuJobStatus::Concluded {
                    // paused/running pairs around graph changes are not pauses: ignore them.
                    return Some(self);
                }
                if c.id.starts_with("create-") {
                    self.create_concluded.insert(c.id.clone());
                    if matches!(&self.busy, Busy::CreateJob { job } if *job == c.id) {
                        self.busy = Busy::CreateJobCheck;
                        ctx.clear_timer(&Timer::Backup(BackupTimer::Wait));
                        ctx.send(
                            Owner::Backup(BackupTag::CreateJobCheck(c.id.clone())),
                            cmd::query_jobs(),
                        );
                    }
                    return Some(self);
                }
                if self.plan.disk_by_job(&c.id).is_some() && self.start == Start::Sent {
                    // The job ran to its end before the transaction's reply arrived.
                    self.concluded_before_reply.insert(c.id.clone());
                    return Some(self);
                }
                if self.plan.disk_by_job(&c.id).is_some()
                    && self.start == Start::Committed
                    && self.checks_queued.insert(c.id.clone())
                {
                    self.steps.push_back(Step::Cmd {
                        command: cmd::query_jobs(),
                        effect: Effect::CheckJob(c.id.clone()),
                    });
                    return self.pump(core, ctx);
                }
                Some(self)
            }
            QmpEvent::Shutdown(_) => {
                // QEMU is going away: every job still running ends cancelled.
                for d in &mut self.plan.disks {
                    if !d.state.is_final() {
                        d.state = DiskJobState::Cancelled;
                        d.error.get_or_insert_with(|| "domain shut down".into());
                    }
                }
                // A completed target not yet closed and made durable cannot be waited for.
                while let Some(i) = self.next_unsettled() {
                    let path = self.plan.disks[i].store_path.clone();
                    self.fail_settling(
                        ctx,
                        i,
                        format!("domain shut down before backup target '{path}' was made durable"),
                    );
                }
                self.steps.clear();
                self.busy = Busy::Idle;
                self.terminate(core, ctx);
                None
            }
            _ => Some(self),
        }
    }

    /// A file operation ended.
    pub(crate) fn on_file_done(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        id: FileOpId,
        result: Result<(), FileError>,
    ) -> Option<Self> {
        if let Busy::Sync {
            id: waiting,
            disk: i,
        } = self.busy
            && waiting == id
        {
            self.busy = Busy::Idle;
            if let Err(msg) = result {
                let path = self.plan.disks[i].store_path.clone();
                self.fail_settling(
                    ctx,
                    i,
                    format!("writing backup target '{path}' to storage failed: {msg}"),
                );
            }
            return self.maybe_finish(core, ctx);
        }
        let path = match std::mem::replace(&mut self.busy, Busy::Idle) {
            Busy::File { id: waiting, path } if waiting == id => path,
            other => {
                self.busy = other;
                return Some(self);
            }
        };
        ctx.clear_timer(&Timer::Backup(BackupTimer::Wait));
        match result {
            Ok(()) => {
                // Recorded before anything else happens to the file: a restarted engine
                // deletes only the files it knows it created.
                self.plan.created_files.push(path);
                self.journal(ctx);
                self.pump(core, ctx)
            }
            Err(msg) => {
                let disk = self
                    .plan
                    .disks
                    .iter()
                    .find(|d| d.store_path == path)
                    .map(|d| d.target.clone())
                    .unwrap_or_default();
                self.roll_back(
                    core,
                    ctx,
                    Error::Store(format!("store '{path}' for backup of '{disk}': {msg}")),
                )
            }
        }
    }

    /// Answers a statistics request for the running job.
    pub(crate) fn stats_request(&mut self, _core: &Core, ctx: &mut Ctx<'_>, req: RequestId) {
        if self.start == Start::Committed && !matches!(self.phase, Phase::Disconnected) {
            ctx.send(Owner::Backup(BackupTag::Stats(req)), cmd::query_jobs());
        } else {
            let mut stats = self.plan.stats(ctx.now.as_ms(), DomainJobStatus::Running);
            stats.waiting_for = Some(self.waiting_for(ctx.timers()));
            ctx.respond(req, Ok(Reply::Stats(Some(stats))));
        }
    }

    /// After a statistics poll: a job QEMU lists as concluded whose end the run never saw (its
    /// events were missed) gets its end checked now, as the event would have done. Polling
    /// (`--wait` asks every second) thus ends a backup that would otherwise wait forever.
    fn check_missed_ends(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        jobs: &[JobInfo],
    ) -> Option<Self> {
        if self.start != Start::Committed || self.phase != Phase::Running {
            return Some(self);
        }
        let mut queued = false;
        for j in jobs {
            let unseen = self
                .plan
                .disk_by_job(&j.id)
                .is_some_and(|i| !self.plan.disks[i].state.is_final());
            if j.status == QemuJobStatus::Concluded
                && unseen
                && self.checks_queued.insert(j.id.clone())
            {
                self.steps.push_back(Step::Cmd {
                    command: cmd::query_jobs(),
                    effect: Effect::CheckJob(j.id.clone()),
                });
                queued = true;
            }
        }
        if queued {
            self.pump(core, ctx)
        } else {
            Some(self)
        }
    }

    /// What the run waits for right now, in words (for `domjobinfo` and liveness reports).
    pub(crate) fn waiting_for(&self, timers: &TimerTable<Timer>) -> String {
        match self.phase {
            Phase::Disconnected => return "a QMP connection to QEMU".into(),
            Phase::Reconciling { .. } => {
                return "QEMU's list of jobs after reconnecting (query-jobs)".into();
            }
            _ => {}
        }
        match &self.busy {
            Busy::CreateJob { job } => return format!("image creation job {job} to conclude"),
            Busy::File { path, .. } => return format!("the creation of '{path}'"),
            Busy::Sync { disk, .. } => {
                return format!(
                    "backup target '{}' to be written to storage",
                    self.plan.disks[*disk].store_path
                );
            }
            Busy::Command { command, .. } => {
                return format!("the reply to {}", command.name());
            }
            Busy::Idle | Busy::CreateJobCheck => {}
        }
        let jobs: Vec<String> = self
            .plan
            .disks
            .iter()
            .filter(|d| matches!(d.state, DiskJobState::Running | DiskJobState::Cancelling))
            .map(|d| {
                let how = if d.state == DiskJobState::Cancelling {
                    "cancelling"
                } else {
                    "running"
                };
                format!("{} ({how})", d.job_id)
            })
            .collect();
        if !jobs.is_empty() {
            let mut what = format!("the end of block jobs {}", jobs.join(", "));
            if self.plan.mode == BackupMode::Pull && !self.abort_requested {
                what.push_str("; a pull backup ends when its client is done (domjobabort)");
            }
            return what;
        }
        let next_retry = timers
            .iter()
            .filter_map(|(t, due)| match t {
                Timer::Backup(BackupTimer::Retry(seq)) => {
                    self.retries.get(seq).map(|(command, _)| (due, command))
                }
                _ => None,
            })
            .min_by_key(|(due, _)| *due);
        if let Some((due, command)) = next_retry {
            return format!(
                "the next try of {} at {} ms (QEMU refused it)",
                command.name(),
                due.as_ms()
            );
        }
        if self.steps.is_empty() {
            "nothing (its end is due)".into()
        } else {
            "its next step".into()
        }
    }

    /// Aborts the job: push ends cancelled, pull ends completed.
    pub(crate) fn abort(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        req: RequestId,
    ) -> Option<Self> {
        ctx.respond(req, Ok(Reply::Done));
        match self.phase {
            Phase::Running if self.start == Start::Committed => {
                // A cancel sent earlier may have been refused or lost with the connection:
                // every abort sends it again to the disks still cancelling. Their job may
                // also have concluded while the check of its end failed: check again.
                let stuck: Vec<String> = self
                    .plan
                    .disks
                    .iter()
                    .filter(|d| d.state == DiskJobState::Cancelling)
                    .map(|d| d.job_id.clone())
                    .collect();
                self.cancel_running_resend();
                for job in stuck {
                    if self.checks_queued.insert(job.clone()) {
                        self.steps.push_back(Step::Cmd {
                            command: cmd::query_jobs(),
                            effect: Effect::CheckJob(job),
                        });
                    }
                }
                self.pump(core, ctx)
            }
            Phase::Querying { .. } | Phase::Preparing if self.start == Start::NotSent => {
                self.abort_before_start = true;
                self.pump(core, ctx)
            }
            _ => {
                self.abort_requested = true;
                Some(self)
            }
        }
    }

    /// Cancels one disk's job; when it has ended cancelled, the others are cancelled too.
    pub(crate) fn abort_disk(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        req: RequestId,
        disk: &str,
    ) -> Option<Self> {
        let Some(d) = self.plan.disks.iter_mut().find(|d| d.target == disk) else {
            ctx.respond(req, Err(RequestError::NoDisk(disk.to_owned()).into()));
            return Some(self);
        };
        if d.state != DiskJobState::Running {
            ctx.respond(req, Err(RequestError::NoJob.into()));
            return Some(self);
        }
        d.state = DiskJobState::Cancelling;
        self.steps
            .push_front(best_effort(cmd::block_job_cancel_gently(&d.job_id)));
        ctx.respond(req, Ok(Reply::Done));
        self.pump(core, ctx)
    }

    /// The QMP session is gone.
    pub(crate) fn on_link_down(mut self, _core: &mut Core, ctx: &mut Ctx<'_>) -> Self {
        // Cleanup still owed (including the command whose reply was lost, and refused ones
        // waiting for another try) runs again after the reconnection; the rest is decided
        // again from QEMU's jobs then.
        let mut kept: VecDeque<Step> = VecDeque::new();
        if let Busy::Command { command, effect } = std::mem::replace(&mut self.busy, Busy::Idle) {
            kept.extend(surviving_cleanup(Step::Cmd { command, effect }));
        }
        kept.extend(self.steps.drain(..).filter_map(surviving_cleanup));
        kept.extend(
            std::mem::take(&mut self.retries)
                .into_values()
                .map(|(command, attempt)| Step::Cmd {
                    command,
                    effect: Effect::Retry(attempt),
                }),
        );
        self.steps = kept;
        // The reconnection's reconcile looks at every job again; nothing of the old session
        // is waited for.
        self.check_retries.clear();
        ctx.retain_timers(|t| !matches!(t, Timer::Backup(_)));
        self.checks_queued.clear();
        // After the reconnection QEMU's job list decides, not events of the old session.
        self.concluded_before_reply.clear();
        self.phase = Phase::Disconnected;
        self
    }

    /// A new QMP session is negotiated: find out what became of the jobs.
    pub(crate) fn on_reconnected(mut self, _core: &mut Core, ctx: &mut Ctx<'_>) -> Option<Self> {
        self.phase = Phase::Reconciling { poll_attempts: 0 };
        ctx.clear_timer(&Timer::Backup(BackupTimer::Poll));
        ctx.send(Owner::Backup(BackupTag::Poll), cmd::query_jobs());
        Some(self)
    }

    /// A timer of the run expired: a failed poll or a refused check or cleanup comes due, or
    /// the current non-command wait took too long (then the start is given up). One kind is
    /// handled per tick, in this order; the others stay armed and are due at once.
    pub(crate) fn on_timeout(mut self, core: &mut Core, ctx: &mut Ctx<'_>) -> Option<Self> {
        if ctx.take_due(&Timer::Backup(BackupTimer::Poll)) {
            if matches!(self.phase, Phase::Reconciling { .. }) {
                ctx.send(Owner::Backup(BackupTag::Poll), cmd::query_jobs());
            }
            return Some(self);
        }
        let checks = ctx.take_due_where(|t| matches!(t, Timer::Backup(BackupTimer::CheckRetry(_))));
        if !checks.is_empty() {
            let running = self.phase == Phase::Running;
            for timer in checks {
                let Timer::Backup(BackupTimer::CheckRetry(seq)) = timer else {
                    continue;
                };
                let Some(job) = self.check_retries.remove(&seq) else {
                    continue;
                };
                if running && self.checks_queued.insert(job.clone()) {
                    self.steps.push_back(Step::Cmd {
                        command: cmd::query_jobs(),
                        effect: Effect::CheckJob(job.clone()),
                    });
                }
            }
            return if running {
                self.pump(core, ctx)
            } else {
                Some(self)
            };
        }
        let retries = ctx.take_due_where(|t| matches!(t, Timer::Backup(BackupTimer::Retry(_))));
        if !retries.is_empty() {
            for timer in retries {
                let Timer::Backup(BackupTimer::Retry(seq)) = timer else {
                    continue;
                };
                let Some((command, attempt)) = self.retries.remove(&seq) else {
                    continue;
                };
                self.steps.push_back(Step::Cmd {
                    command,
                    effect: Effect::Retry(attempt),
                });
            }
            let connected = !matches!(self.phase, Phase::Disconnected | Phase::Reconciling { .. });
            return if connected {
                self.pump(core, ctx)
            } else {
                Some(self)
            };
        }
        if !ctx.take_due(&Timer::Backup(BackupTimer::Wait)) {
            return Some(self);
        }
        let what = match std::mem::replace(&mut self.busy, Busy::Idle) {
            Busy::CreateJob { job } => format!("image creation job {job} never concluded"),
            Busy::File { path, .. } => format!("creating '{path}' was never confirmed"),
            other => {
                // Nothing waits any more (the timer is disarmed, so it does not fire again).
                self.busy = other;
                return Some(self);
            }
        };
        self.roll_back(core, ctx, Error::QemuMisbehaved(what))
    }

    // ----- monitoring -----

    /// After a reconnection: decide from QEMU's jobs whether the start went through, then end
    /// every disk whose job concluded or vanished (a vanished job, as after QEMU restarted,
    /// ends its disk failed with "job no longer known to QEMU"), and cancel the rest when one
    /// ended badly. A backup none of whose jobs QEMU knows any more thus ends failed by itself:
    /// what remains of it is cleaned up and `JobCompleted` is emitted, with no abort needed.
    fn reconcile(mut self, core: &mut Core, ctx: &mut Ctx<'_>, jobs: &[JobInfo]) -> Option<Self> {
        if !matches!(self.phase, Phase::Reconciling { .. }) {
            return Some(self);
        }
        let any_known = self
            .plan
            .disks
            .iter()
            .any(|d| jobs.iter().any(|j| j.id == d.job_id));
        if self.start != Start::Committed {
            // Before the transaction was sent no job can be ours, whatever QEMU lists under
            // the same id (a job left behind by an earlier run).
            if self.start == Start::NotSent || !any_known {
                self.phase = Phase::Preparing;
                // Replies lost with the connection may hide a node that was added or an
                // image-creation job that was started. The plan's node names were fresh when
                // chosen, so removing every one of them (best effort) touches nothing else.
                let mut first = Vec::new();
                for d in &self.plan.disks {
                    for node in [&d.storage_node, &d.format_node] {
                        if !self.added_nodes.contains(node) {
                            self.added_nodes.push(node.clone());
                        }
                    }
                    let create_job = format!("create-{}", d.format_node);
                    if let Some(j) = jobs.iter().find(|j| j.id == create_job) {
                        if j.status == QemuJobStatus::Concluded {
                            first.push(best_effort(cmd::job_dismiss(&create_job)));
                        } else {
                            first.push(Step::AwaitCreateJob { job: create_job });
                        }
                    }
                }
                return self.roll_back_after(
                    core,
                    ctx,
                    Error::LinkLost("backup start".into()),
                    first,
                );
            }
            // The transaction went through before the connection dropped.
            if let Err(e) = self.commit(core, ctx)
                && let Some(req) = self.begin_req.take()
            {
                ctx.respond(req, Err(e));
            }
            if self.plan.mode == BackupMode::Pull {
                if let Some(req) = self.begin_req.take() {
                    ctx.respond(req, Err(Error::LinkLost("pull backup start".into())));
                }
                self.abort_requested = true;
            }
        }
        self.phase = Phase::Running;
        self.release_start_slot(core);
        let mut follow_up = Vec::new();
        // An image-creation job whose dismissal was refused (and then forgotten by a restart)
        // would refuse every later start of the disk: its id is the plan's.
        for d in &self.plan.disks {
            let create_job = format!("create-{}", d.format_node);
            if jobs
                .iter()
                .any(|j| j.id == create_job && j.status == QemuJobStatus::Concluded)
            {
                follow_up.push(best_effort(cmd::job_dismiss(&create_job)));
            }
        }
        for i in 0..self.plan.disks.len() {
            follow_up.extend(self.conclude_disk(ctx, i, jobs, true));
        }
        // Disks the journal shows ended: clean up again what may be left.
        for i in std::mem::take(&mut self.restored_final) {
            let listed = jobs.iter().any(|j| j.id == self.plan.disks[i].job_id);
            follow_up.extend(self.cleanup_steps(i, listed));
        }
        // As when a job concludes while connected, one disk that ended badly (its job failed,
        // or vanished with a restarted QEMU) ends the whole backup: a pull's other disks would
        // otherwise keep their jobs (and, with a server of its own, lose their exports with
        // the ending disk) and look alive until aborted.
        let ended_badly = self
            .plan
            .disks
            .iter()
            .any(|d| d.state.is_final() && d.state != DiskJobState::Complete);
        // Jobs still running while their disk is cancelling may never have seen the cancel
        // (it was lost with the connection): send it again.
        follow_up.extend(self.cancel_steps_for(self.abort_requested || ended_badly, true));
        self.steps.extend(follow_up);
        self.pump(core, ctx)
    }

    /// A `query-jobs` answer for one concluded job: end its disk, clean it up next.
    fn on_check_job(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        job: &str,
        result: Result<Value, QmpError>,
    ) -> Option<Self> {
        self.checks_queued.remove(job);
        let Some(jobs) = result.ok().and_then(|v| parse_jobs(&v).ok()) else {
            // QEMU refused the check (or answered nonsense): the job's end event has been
            // spent, so nothing else would ever look again. Check again after a back-off.
            let attempt = self.check_attempts;
            self.check_attempts = attempt.saturating_add(1);
            let seq = self.take_timer_number();
            ctx.set_timer_in(
                Timer::Backup(BackupTimer::CheckRetry(seq)),
                retry_delay_ms(attempt),
            );
            self.check_retries.insert(seq, job.to_owned());
            return self.pump(core, ctx);
        };
        for j in &jobs {
            if let Some(i) = self.plan.disk_by_job(&j.id)
                && !self.plan.disks[i].state.is_final()
            {
                self.plan.disks[i].progress_current_bytes = j.current_progress;
                self.plan.disks[i].progress_total_bytes = j.total_progress;
            }
        }
        let mut follow_up = Vec::new();
        if let Some(i) = self.plan.disk_by_job(job) {
            follow_up = self.conclude_disk(ctx, i, &jobs, false);
            let bad = self.plan.disks[i].state.is_final()
                && self.plan.disks[i].state != DiskJobState::Complete;
            if bad || self.abort_requested {
                // One disk failing or being cancelled ends the whole backup.
                follow_up.extend(self.cancel_steps());
            }
        }
        for step in follow_up.into_iter().rev() {
            self.steps.push_front(step);
        }
        self.pump(core, ctx)
    }

    /// Ends disk `i` if its job concluded (or, after a reconnection, vanished) and returns the
    /// steps that clean it up.
    fn conclude_disk(
        &mut self,
        ctx: &mut Ctx<'_>,
        i: usize,
        jobs: &[JobInfo],
        vanished_ends: bool,
    ) -> Vec<Step> {
        let d = &self.plan.disks[i];
        if d.state.is_final() || d.state == DiskJobState::None {
            return Vec::new();
        }
        let job = jobs.iter().find(|j| j.id == d.job_id);
        let concluded = match job {
            Some(j) => j.status == QemuJobStatus::Concluded || j.status == QemuJobStatus::Null,
            None => vanished_ends,
        };
        let d = &mut self.plan.disks[i];
        if let Some(j) = job {
            d.progress_current_bytes = j.current_progress;
            d.progress_total_bytes = j.total_progress;
        }
        if !concluded {
            return Vec::new();
        }
        let error = match job {
            Some(j) => j.error.clone(),
            None => Some("job no longer known to QEMU".into()),
        };
        d.state = if d.state == DiskJobState::Cancelling {
            DiskJobState::Cancelled
        } else if error.is_some() {
            DiskJobState::Failed
        } else {
            DiskJobState::Complete
        };
        if d.error.is_none() {
            d.error = error;
        }
        ctx.emit(DomainEvent::BlockJob {
            disk: d.target.clone(),
            state: d.state,
        });
        // Journaled: a restarted engine must not take a job it finds dismissed for a failure.
        self.journal(ctx);
        self.cleanup_steps(i, job.is_some())
    }

    fn cleanup_steps(&mut self, i: usize, job_exists: bool) -> Vec<Step> {
        let d = &self.plan.disks[i];
        let mut steps = Vec::new();
        if job_exists {
            steps.push(best_effort(cmd::job_dismiss(&d.job_id)));
        }
        if self.plan.mode == BackupMode::Pull
            && self.shared_server
            && let Some(export) = &d.export_id
        {
            // Only this backup's export goes (its clients with it, as a server stop would do);
            // the server keeps serving its other exports.
            steps.push(best_effort(QmpCommand::BlockExportDel(
                crate::qmp::BlockExportDel {
                    id: export.clone(),
                    mode: Some(crate::qmp::BlockExportRemoveMode::Hard),
                },
            )));
        }
        if self.plan.mode == BackupMode::Pull {
            // The exports go with the server as soon as a disk ends. Like libvirt, the stop is
            // sent for every ending disk; later ones are refused harmlessly.
            if !self.shared_server {
                steps.push(best_effort(QmpCommand::NbdServerStop));
            }
            if !self.objects_del_queued {
                self.objects_del_queued = true;
                for obj in self.added_objects.iter().rev() {
                    steps.push(best_effort(QmpCommand::ObjectDel(ObjectDel {
                        id: obj.clone(),
                    })));
                }
            }
        }
        // A target known closed is not deleted again: its format node is gone.
        if !d.target_closed {
            steps.push(best_effort(cmd::del_node(&d.format_node)));
        }
        steps.push(best_effort(cmd::del_node(&d.storage_node)));
        if self.plan.mode == BackupMode::Push
            && let (Some(b), Some(n)) = (&d.temp_bitmap, &d.temp_bitmap_node)
        {
            steps.push(best_effort(cmd::remove_bitmap(n, b)));
        }
        steps
    }

    /// Marks every running disk cancelling and returns the cancel commands.
    fn cancel_steps(&mut self) -> Vec<Step> {
        self.cancel_steps_for(true, false)
    }

    /// Cancel commands for the running disks (marked cancelling) when `running`, and again for
    /// the disks already cancelling when `resend`.
    fn cancel_steps_for(&mut self, running: bool, resend: bool) -> Vec<Step> {
        let mut steps = Vec::new();
        for d in &mut self.plan.disks {
            let send = match d.state {
                DiskJobState::Running => running,
                DiskJobState::Cancelling => resend,
                _ => false,
            };
            if send {
                d.state = DiskJobState::Cancelling;
                steps.push(best_effort(cmd::block_job_cancel(&d.job_id)));
            }
        }
        steps
    }

    /// Cancels every running or still cancelling disk before anything else queued.
    fn cancel_running_resend(&mut self) {
        for step in self.cancel_steps_for(true, true).into_iter().rev() {
            self.steps.push_front(step);
        }
    }

    /// Cancels every running disk before anything else queued.
    fn cancel_running(&mut self) {
        for step in self.cancel_steps().into_iter().rev() {
            self.steps.push_front(step);
        }
    }

    fn maybe_finish(mut self, core: &mut Core, ctx: &mut Ctx<'_>) -> Option<Self> {
        let all_final = self.plan.disks.iter().all(|d| d.state.is_final());
        if !(all_final
            && self.steps.is_empty()
            && self.busy == Busy::Idle
            && self.retries.is_empty())
        {
            return Some(self);
        }
        // Cleanup is over, so every target QEMU closed is closed for good. A completed push
        // target counts only once QEMU confirmed closing it (its qcow2 metadata is written out
        // then) and, with deferred writes, once the host wrote it to storage.
        while let Some(i) = self.next_unsettled() {
            let d = &self.plan.disks[i];
            let path = d.store_path.clone();
            if !d.target_closed {
                self.fail_settling(
                    ctx,
                    i,
                    format!(
                        "QEMU did not confirm closing backup target '{path}'; the image may be \
                         incomplete"
                    ),
                );
                continue;
            }
            self.settled.insert(i);
            if core.config.push_write == PushWrite::Deferred {
                let id = ctx.file(FileOp::Sync { path });
                self.busy = Busy::Sync { id, disk: i };
                return Some(self);
            }
        }
        self.terminate(core, ctx);
        None
    }

    /// The next completed push disk whose target was not yet checked and made durable.
    fn next_unsettled(&self) -> Option<usize> {
        if self.plan.mode != BackupMode::Push {
            return None;
        }
        (0..self.plan.disks.len()).find(|i| {
            self.plan.disks[*i].state == DiskJobState::Complete && !self.settled.contains(i)
        })
    }

    /// Fails completed disk `i` whose target cannot be trusted.
    fn fail_settling(&mut self, ctx: &mut Ctx<'_>, i: usize, error: String) {
        self.settled.insert(i);
        let d = &mut self.plan.disks[i];
        d.state = DiskJobState::Failed;
        d.error = Some(error);
        ctx.emit(DomainEvent::BlockJob {
            disk: d.target.clone(),
            state: d.state,
        });
    }

    /// Every disk ended and cleanup is done: delete what must go, report, release.
    fn terminate(mut self, core: &mut Core, ctx: &mut Ctx<'_>) {
        self.release_start_slot(core);
        let status = self.plan.final_status();
        if !self.plan.reuse_external {
            let keep = self.plan.mode == BackupMode::Push && status == DomainJobStatus::Completed;
            if !keep {
                for d in &self.plan.disks {
                    if d.created_by_us && d.store_kind == StoreKind::File {
                        ctx.file(FileOp::Remove {
                            path: d.store_path.clone(),
                        });
                    }
                }
            }
        }
        let stats = self.plan.stats(ctx.now.as_ms(), status);
        ctx.persist(StoreOp::DeleteBackupJournal);
        ctx.emit(DomainEvent::JobCompleted(stats.clone()));
        if let Some(req) = self.begin_req {
            ctx.respond(
                req,
                Err(Error::QemuMisbehaved(
                    "backup ended before it started".into(),
                )),
            );
        }
        core.completed = Some(stats);
        core.jobs.free_disks_of(DISK_HOLDER);
        core.jobs.release_long();
    }

    fn next_port(&self, core: &Core) -> Option<NbdServer> {
        let server = self.plan.server.clone()?;
        let NbdTransport::Tcp {
            host,
            port: Some(p),
        } = &server.transport
        else {
            return None;
        };
        if !self.port_chosen || *p >= core.config.nbd_port_max || *p < core.config.nbd_port_min {
            return None;
        }
        Some(NbdServer {
            transport: NbdTransport::Tcp {
                host: host.clone(),
                port: Some(p + 1),
            },
            tls: server.tls,
        })
    }
}

fn best_effort(command: QmpCommand) -> Step {
    Step::Cmd {
        command,
        effect: Effect::BestEffort,
    }
}

fn parse_jobs(v: &Value) -> Result<Vec<JobInfo>, Error> {
    crate::qmp::query_jobs(v).map_err(|e| Error::QemuMisbehaved(format!("query-jobs: {e}")))
}

fn port_in_use(e: &QmpError) -> bool {
    e.desc.contains("in use")
}

/// A TCP server without a port gets the first port of the configured range.
fn fill_port(server: NbdServer, port_min: u16) -> NbdServer {
    match server.transport {
        NbdTransport::Tcp { host, port: None } => NbdServer {
            transport: NbdTransport::Tcp {
                host,
                port: Some(port_min),
            },
            tls: server.tls,
        },
        transport => NbdServer {
            transport,
            tls: server.tls,
        },
    }
}

fn nbd_start(server: &NbdServer, tls_creds: Option<String>) -> QmpCommand {
    let addr = match &server.transport {
        NbdTransport::Tcp { host, port } => SocketAddressLegacy::Inet(InetSocketAddress {
            host: host.clone(),
            port: port.unwrap_or(0).to_string(),
            ..InetSocketAddress::default()
        }),
        NbdTransport::Unix { socket } => SocketAddressLegacy::Unix(UnixSocketAddress {
            path: socket.clone(),
            ..UnixSocketAddress::default()
        }),
    };
    let mut s = NbdServerStart::new(addr);
    s.tls_creds = tls_creds;
    QmpCommand::NbdServerStart(s)
}
