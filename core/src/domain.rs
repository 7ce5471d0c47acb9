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
//!
//! This module is the router only: it hands each input to the machine it concerns (checkpoint
//! operations, the backup run, the reconcile), which share the kernel and never each other.
//! The public vocabulary ([`Input`], [`Output`], ...) is defined below the machines and
//! re-exported here.

use serde_json::Value;

use crate::backup::BackupPlan;
use crate::backup::run::BackupRun;
use crate::checkpoint::CheckpointTree;
use crate::checkpoint::ops::ShortOp;
use crate::error::{Error, RequestError};
use crate::jobs::JobSlots;
use crate::kernel::commands as cmd;
use crate::kernel::ctx::{Ctx, Wire};
use crate::kernel::qemu::timeout_error;
use crate::kernel::retry::retry_delay_ms;
use crate::kernel::state::{BackupTag, Core, Owner, Pending, SessionTag, Timer};
use crate::link::Timestamp;
use crate::model::DomainDef;
use crate::qmp::QmpError;
use crate::reconcile::Reconcile;

pub use crate::kernel::RETRY_MAX_MS;
pub use crate::protocol::{
    BitmapDrift, DomainConfig, DomainEvent, DomainView, FileError, FileErrorKind, FileOp, FileOpId,
    Input, Output, PushWrite, Reply, Request, RequestId, StoreOp, StoredState, TlsConfig,
};

/// One virtual machine's checkpoints, jobs and backup.
#[derive(Debug)]
pub struct Domain {
    core: Core,
    wire: Wire,
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
                invalid: Default::default(),
                pending_checkpoints: Default::default(),
                copy_offload_refused: false,
                negotiate_attempt: 0,
                trusted: false,
                in_step: false,
                refusals: 0,
            },
            wire: Wire::default(),
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

    /// The QEMU of the next session is known to hold exactly what the store describes: it is
    /// the same process a session left in step ([`DomainView::in_step`]) and nothing has talked
    /// to it since. That session then skips its reconcile pass (the query of every node and
    /// bitmap), unless pending checkpoints or a journaled backup call for one.
    pub fn trusting_qemu(mut self) -> Self {
        self.core.trusted = true;
        self
    }

    /// A domain restarted from what its store holds (the restart contract, see
    /// [`StoredState`]): the stored checkpoints, the journal of a backup that was running,
    /// and the checkpoints whose creation was pending. The QMP session is down until
    /// [`Input::Reconnected`].
    pub fn from_stored(def: DomainDef, config: DomainConfig, stored: StoredState) -> Self {
        let tree = stored.checkpoint_tree();
        Self::new(def, config, tree, stored.backup_journal)
            .with_pending_checkpoints(stored.pending_checkpoints)
    }

    /// Feeds one input and returns everything the driver must do, in order.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        let timeout = self.core.config.command_timeout_ms;
        let mut ctx = Ctx::new(now, &mut out, &mut self.wire, timeout);
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
                let Some(p) = ctx.take_pending(&id) else {
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
                // Expired timers are handled in the order of their kinds: overdue replies (in
                // command order), the negotiation, the reconcile, then the backup's own.
                let overdue = ctx.take_due_where(|t| matches!(t, Timer::Reply(_)));
                for timer in overdue {
                    let Timer::Reply(id) = timer else { continue };
                    if let Some(p) = ctx.take_pending(&id) {
                        let err = timeout_error(&p.name, timeout);
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
                if ctx.take_due(&Timer::Negotiate) {
                    ctx.send(
                        Owner::Session(SessionTag::Capabilities),
                        cmd::capabilities(),
                    );
                }
                if ctx.take_due(&Timer::Reconcile) {
                    self.reconcile.start(&mut self.core, &mut ctx);
                }
                if let Some(run) = self.backup.take() {
                    self.backup = if ctx.any_due(|t| matches!(t, Timer::Backup(_))) {
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
        if self.backup.is_none() {
            // An ended run leaves no deadline behind.
            self.wire.retain_timers(|t| !matches!(t, Timer::Backup(_)));
        }
        out
    }

    /// When [`Input::Tick`] should next be fed: the earliest armed timer (a command timeout,
    /// a retry, the next reconcile pass, a wait of the running backup).
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.wire.next_deadline()
    }

    /// What the running backup waits for right now, in words (a reply, a file, the end of
    /// named block jobs); `None` when no backup runs. Liveness checks name it when a backup
    /// does not end.
    pub fn backup_waiting_for(&self) -> Option<String> {
        self.backup
            .as_ref()
            .map(|run| run.waiting_for(self.wire.timers()))
    }

    /// A read-only view of the domain.
    pub fn view(&self) -> DomainView<'_> {
        DomainView {
            def: &self.core.def,
            checkpoints: &self.core.tree,
            jobs: &self.core.jobs,
            backup: self.backup.as_ref().map(BackupRun::plan),
            completed: self.core.completed.as_ref(),
            connected: self.core.connected && !self.reconcile.is_active(),
            invalid_checkpoints: &self.core.invalid,
            in_step: self.core.in_step
                && self.core.connected
                && !self.reconcile.is_active()
                && self.short.is_none()
                && self.backup.is_none()
                && self.core.pending_checkpoints.is_empty()
                && self.core.invalid.is_empty(),
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
        core.in_step = false;
        // A new session negotiates afresh; a lost one has nothing left to retry.
        ctx.clear_timer(&Timer::Negotiate);
        core.negotiate_attempt = 0;
        // The next connection starts a fresh pass.
        reconcile.on_link_down(core, ctx);
        // Statistics requests waiting for a `query-jobs` reply would never be answered.
        let lost_stats: Vec<RequestId> = ctx
            .drop_pending()
            .into_iter()
            .filter_map(|p| match p.owner {
                Owner::Backup(BackupTag::Stats(req)) => Some(req),
                _ => None,
            })
            .collect();
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
        if result.is_err() {
            // QEMU refused or did not answer: what it holds is no longer known for sure.
            core.in_step = false;
            core.refusals += 1;
        }
        match pending.owner {
            Owner::Session(SessionTag::Capabilities) => {
                if result.is_err() {
                    // Refused or timed out: try again after a growing delay, so the wait for a
                    // usable session always has a deadline (the caller bounds the attempts).
                    ctx.set_timer_in(Timer::Negotiate, retry_delay_ms(core.negotiate_attempt));
                    core.negotiate_attempt = core.negotiate_attempt.saturating_add(1);
                }
                if result.is_ok() {
                    ctx.clear_timer(&Timer::Negotiate);
                    core.negotiate_attempt = 0;
                    core.connected = true;
                    if let Some(run) = backup.take() {
                        *backup = run.on_reconnected(core, ctx);
                    }
                    rec.on_session_ready(core, ctx, backup.is_some());
                }
            }
            Owner::Session(SessionTag::DriftQuery) => {
                let plan = backup.as_ref().map(BackupRun::plan);
                rec.on_drift_query(core, ctx, plan, &pending.name, result);
            }
            Owner::Session(SessionTag::Repair(i)) => rec.on_repair(core, ctx, i, result),
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
