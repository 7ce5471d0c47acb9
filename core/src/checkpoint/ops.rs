//! Checkpoint operations that talk to QEMU: create, delete, size and validated redefinition.
//!
//! Each operation is a value whose phase is consumed by every step and replaced by the next
//! one; the tree changes only after QEMU confirmed. Commands whose order QEMU guarantees are
//! pipelined (QMP executes commands in the order received), and the operation waits for all
//! replies of a batch before it decides.
//!
//! Deleting a checkpoint removes its own bitmaps and never merges them into the parent's:
//! every checkpoint's bitmap records all writes since its own creation, so a parent's content
//! does not depend on its children. This is what keeps deletion of an invalid checkpoint safe.
//! When the reconcile marked a checkpoint invalid because its bitmap is gone from every layer
//! of a disk (QEMU was killed before it stored the bitmap), a plain, `CHILDREN` or
//! `CHILDREN_ONLY` delete queries the nodes, removes the instances that still exist, skips the
//! disks where none is left, and drops the metadata. The parent is left as the reconcile
//! judged it from its own chain: if its bitmap survived, it still holds every change since the
//! parent, and an incremental backup from it misses nothing; if its bitmap was lost or is
//! inconsistent too, the reconcile marked it invalid on its own and backups from it stay
//! refused. Invalidating a parent because a child was lost would refuse correct backups and
//! protect none. A missing bitmap the reconcile did not report still fails the delete: the
//! engine's view of QEMU is then stale and a reconnect re-checks it.

use serde_json::Value;

use super::{Checkpoint, DeleteScope};
use crate::chain::{NodeTable, check_chain, layers_holding};
use crate::error::{Error, RequestError};
use crate::jobs::JobKind;
use crate::kernel::checkpoints::{
    SIZE_BITMAP, check_create, commit_created, create_actions, persist_change,
};
use crate::kernel::commands as cmd;
use crate::kernel::ctx::Ctx;
use crate::kernel::qemu::{disk_layers, node_table, refused};
use crate::kernel::state::{Core, Owner, ShortTag, SizeStep};
use crate::model::DomainDef;
use crate::protocol::{DomainEvent, Reply, Request, RequestId};
use crate::qmp::{QmpError, TransactionAction};

/// The short operation in flight.
#[derive(Debug)]
pub(crate) enum ShortOp {
    Create {
        req: RequestId,
        checkpoint: Checkpoint,
        /// The name was already recorded as pending (an earlier create whose outcome is
        /// unknown): a refusal then keeps the record, since the refusal may be due to that
        /// earlier create's orphan bitmaps.
        was_pending: bool,
    },
    Validate {
        req: RequestId,
        checkpoint: Checkpoint,
    },
    Delete(DeleteRun),
    Size(SizeRun),
}

#[derive(Debug)]
pub(crate) struct DeleteRun {
    req: RequestId,
    /// Every checkpoint the request deletes, in deletion order (children before parents).
    /// All their bitmaps go in one transaction, so deleting a hundred checkpoints costs one
    /// node query and one transaction, and QEMU removes all of them or none.
    names: Vec<String>,
    phase: DeletePhase,
}

#[derive(Debug)]
enum DeletePhase {
    Idle,
    Querying,
    Batch {
        outstanding: usize,
        result: Option<Result<(), Error>>,
    },
}

#[derive(Debug)]
pub(crate) struct SizeRun {
    req: RequestId,
    checkpoint: Checkpoint,
    phase: SizePhase,
}

#[derive(Debug)]
enum SizePhase {
    Querying,
    Batch {
        outstanding: usize,
        /// Disk target and top node of each disk measured.
        measured: Vec<(String, String)>,
        merge: Option<Result<(), Error>>,
        nodes: Option<NodeTable>,
    },
}

/// `REDEFINE` without validation: metadata only, no QEMU.
pub(crate) fn redefine_now(
    core: &mut Core,
    ctx: &mut Ctx<'_>,
    checkpoint: Checkpoint,
) -> Result<(), Error> {
    let name = checkpoint.name.clone();
    let change = core.tree.redefine(checkpoint)?;
    // New metadata: whether its chains hold is for the next backup's node query to say.
    core.invalid.remove(&name);
    persist_change(core, ctx, &change);
    Ok(())
}

fn release(core: &mut Core) {
    core.jobs.release_short();
}

impl ShortOp {
    /// Starts a checkpoint operation, or answers at once (refusal, metadata-only work).
    pub(crate) fn start(
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        req: RequestId,
        request: Request,
    ) -> Option<ShortOp> {
        let (kind, needs_qemu) = match &request {
            Request::CheckpointCreate { checkpoint, .. } => {
                (JobKind::CheckpointCreate(checkpoint.name.clone()), true)
            }
            Request::CheckpointRedefine { checkpoint, .. } => {
                (JobKind::CheckpointValidate(checkpoint.name.clone()), true)
            }
            Request::CheckpointDelete {
                name,
                metadata_only,
                ..
            } => (JobKind::CheckpointDelete(name.clone()), !metadata_only),
            Request::CheckpointDeleteEach { names } => {
                (JobKind::CheckpointDelete(names.join(", ")), true)
            }
            Request::CheckpointGetXml { name, .. } => (JobKind::CheckpointSize(name.clone()), true),
            _ => return None,
        };
        if let Request::CheckpointCreate { quiesce: true, .. } = &request {
            ctx.respond(
                req,
                Err(RequestError::Unsupported(
                    "quiescing a checkpoint needs a guest agent, which vbackup does not use; freeze the guest file systems around the request instead".into(),
                )
                .into()),
            );
            return None;
        }
        if needs_qemu && !core.connected {
            ctx.respond(req, Err(RequestError::NotRunning.into()));
            return None;
        }
        if let Err(e) = core.jobs.acquire_short(kind) {
            ctx.respond(req, Err(e.into()));
            return None;
        }
        let op = match request {
            Request::CheckpointCreate { checkpoint, .. } => {
                Self::start_create(core, ctx, req, checkpoint)
            }
            Request::CheckpointRedefine { checkpoint, .. } => {
                if let Err(e) = core.tree.check_redefine(&checkpoint) {
                    ctx.respond(req, Err(e.into()));
                    None
                } else {
                    ctx.send(Owner::Short(ShortTag::ValidateQuery), cmd::query_nodes());
                    Some(ShortOp::Validate { req, checkpoint })
                }
            }
            Request::CheckpointDelete {
                name,
                scope,
                metadata_only,
            } => Self::start_delete(core, ctx, req, &name, scope, metadata_only),
            Request::CheckpointDeleteEach { names } => {
                let mut seen = std::collections::BTreeSet::new();
                let mut order = Vec::with_capacity(names.len());
                for name in names {
                    if let Err(e) = core.tree.lookup(&name) {
                        ctx.respond(req, Err(e.into()));
                        // Returning here skips the release below.
                        release(core);
                        return None;
                    }
                    if seen.insert(name.clone()) {
                        order.push(name);
                    }
                }
                let run = DeleteRun {
                    req,
                    names: order,
                    phase: DeletePhase::Idle,
                };
                run.start(core, ctx)
            }
            Request::CheckpointGetXml { name, .. } => match core.tree.lookup(&name) {
                Ok(c) => {
                    let checkpoint = c.clone();
                    ctx.send(Owner::Short(ShortTag::SizeQuery), cmd::query_nodes());
                    Some(ShortOp::Size(SizeRun {
                        req,
                        checkpoint,
                        phase: SizePhase::Querying,
                    }))
                }
                Err(e) => {
                    ctx.respond(req, Err(e.into()));
                    None
                }
            },
            _ => None,
        };
        if op.is_none() {
            release(core);
        }
        op
    }

    fn start_create(
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        req: RequestId,
        checkpoint: Checkpoint,
    ) -> Option<ShortOp> {
        if let Err(e) = check_create(&core.def, &core.tree, &checkpoint) {
            ctx.respond(req, Err(e));
            return None;
        }
        let actions = create_actions(&core.def, &checkpoint);
        // Recorded first: if the metadata write after QEMU's confirmation never happens, the
        // next reconcile knows these bitmaps are the engine's orphans.
        // Added to the set, never replacing it: an earlier create whose reply was lost keeps
        // its record until a reconcile pass has dealt with its bitmaps.
        let was_pending = !core.pending_checkpoints.insert(checkpoint.name.clone());
        if !was_pending {
            ctx.persist_pending(&core.pending_checkpoints);
        }
        ctx.send(
            Owner::Short(ShortTag::CreateTransaction),
            cmd::transaction(actions),
        );
        Some(ShortOp::Create {
            req,
            checkpoint,
            was_pending,
        })
    }

    fn start_delete(
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        req: RequestId,
        name: &str,
        scope: DeleteScope,
        metadata_only: bool,
    ) -> Option<ShortOp> {
        let order = match core.tree.delete_order(name, scope) {
            Ok(o) => o,
            Err(e) => {
                ctx.respond(req, Err(e.into()));
                return None;
            }
        };
        if metadata_only {
            let r = core.tree.discard_all(&order).map_err(Error::from);
            if let Ok(change) = &r {
                persist_change(core, ctx, change);
                for n in &change.removed {
                    ctx.emit(DomainEvent::CheckpointDeleted(n.clone()));
                }
            }
            ctx.respond(req, r.map(|_| Reply::Done));
            return None;
        }
        let run = DeleteRun {
            req,
            names: order,
            phase: DeletePhase::Idle,
        };
        run.start(core, ctx)
    }

    /// Handles a reply addressed to this operation.
    pub(crate) fn on_reply(
        self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        tag: ShortTag,
        command: &str,
        result: Result<Value, QmpError>,
    ) -> Option<ShortOp> {
        match self {
            ShortOp::Create {
                req,
                checkpoint,
                was_pending,
            } => {
                let name = checkpoint.name.clone();
                let r = match result {
                    Ok(_) => {
                        let mut c = checkpoint;
                        c.parent = None;
                        commit_created(core, ctx, c).map(|c| Reply::Checkpoint(Box::new(c)))
                    }
                    Err(e) => Err(refused(command, &e)),
                };
                // Metadata written, or QEMU refused the whole transaction: nothing of this
                // create is pending (unless an earlier create of the same name left bitmaps
                // the refusal may be due to). A timeout, or a reply lost with the session
                // (which never gets here), keeps the record.
                let settled = match &r {
                    Ok(_) => true,
                    Err(Error::QemuMisbehaved(_)) => false,
                    Err(_) => !was_pending,
                };
                if settled && core.pending_checkpoints.remove(&name) {
                    ctx.persist_pending(&core.pending_checkpoints);
                }
                ctx.respond(req, r);
                release(core);
                None
            }
            ShortOp::Validate { req, checkpoint } => {
                let r = result
                    .map_err(|e| refused(command, &e))
                    .and_then(|v| node_table(&v))
                    .and_then(|nodes| validate_chains(&core.def, &nodes, &checkpoint))
                    .and_then(|()| {
                        core.invalid.remove(&checkpoint.name);
                        let change = core.tree.redefine(checkpoint)?;
                        persist_change(core, ctx, &change);
                        Ok(Reply::Done)
                    });
                ctx.respond(req, r);
                release(core);
                None
            }
            ShortOp::Delete(run) => run.on_reply(core, ctx, tag, command, result),
            ShortOp::Size(run) => run.on_reply(core, ctx, tag, command, result),
        }
    }

    /// The QMP session ended under the operation: answer with an error and release the slot.
    pub(crate) fn abandon(self, core: &mut Core, ctx: &mut Ctx<'_>) {
        let (req, what) = match &self {
            ShortOp::Create { req, .. } => (*req, "checkpoint create"),
            ShortOp::Validate { req, .. } => (*req, "checkpoint validation"),
            ShortOp::Delete(r) => (r.req, "checkpoint delete"),
            ShortOp::Size(r) => (r.req, "checkpoint size"),
        };
        ctx.respond(req, Err(Error::LinkLost(what.into())));
        release(core);
    }
}

/// `REDEFINE_VALIDATE`: every bitmap disk still in the domain must have a valid chain named
/// after the checkpoint.
fn validate_chains(def: &DomainDef, nodes: &NodeTable, c: &Checkpoint) -> Result<(), Error> {
    for (target, _) in c.bitmap_disks() {
        if def.disk(target).is_none() {
            continue;
        }
        let layers = disk_layers(def, target)?;
        if check_chain(nodes, &layers, &c.name).is_err() {
            return Err(RequestError::CheckpointInconsistent {
                bitmap: c.name.clone(),
                disk: target.to_owned(),
            }
            .into());
        }
    }
    Ok(())
}

/// Whether the last reconcile found the chain of checkpoint `name` on disk `target` missing or
/// broken.
fn marked_invalid(core: &Core, name: &str, target: &str) -> bool {
    core.invalid.get(name).is_some_and(|t| t.contains(target))
}

impl DeleteRun {
    /// The bitmaps of every checkpoint still to delete that sit on a disk of the domain, as
    /// `(checkpoint, disk, bitmap)`.
    fn bitmaps(&self, core: &Core) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for name in &self.names {
            let Some(c) = core.tree.get(name) else {
                continue;
            };
            for (t, b) in c.bitmap_disks() {
                if core.def.disk(t).is_some() {
                    out.push((name.clone(), t.to_owned(), b.to_owned()));
                }
            }
        }
        out
    }

    /// Whether the bitmap of checkpoint `name` on disk `target` must be looked for with a node
    /// query rather than removed from the top layer directly.
    fn needs_query(core: &Core, name: &str, target: &str) -> bool {
        // A checkpoint the reconcile marked invalid may have lost its bitmap on some disks
        // (QEMU killed before it stored them): only a node query tells which ones remain.
        core.config.query_nodes_before_delete
            || core.def.disk(target).is_some_and(|d| d.layers.len() > 1)
            || core.invalid.contains_key(name)
    }

    /// Sends the node query when any bitmap needs one, else the removal transaction.
    fn start(mut self, core: &mut Core, ctx: &mut Ctx<'_>) -> Option<ShortOp> {
        let bitmaps = self.bitmaps(core);
        if bitmaps
            .iter()
            .any(|(name, target, _)| Self::needs_query(core, name, target))
        {
            ctx.send(Owner::Short(ShortTag::DeleteQuery), cmd::query_nodes());
            self.phase = DeletePhase::Querying;
            return Some(ShortOp::Delete(self));
        }
        // Single-layer disks: the only place a bitmap can be is the top node, so the removals
        // go straight into the transaction; QEMU refuses it atomically if a bitmap is missing.
        let mut removals = Vec::new();
        for (_, target, bitmap) in &bitmaps {
            match disk_layers(&core.def, target) {
                Ok(layers) => {
                    if let Some(top) = layers.first() {
                        removals.push(cmd::remove_bitmap_action(top, bitmap));
                    }
                }
                Err(e) => return self.fail(core, ctx, e),
            }
        }
        self.send_batch(core, ctx, Vec::new(), removals, Vec::new())
    }

    /// Discards the metadata of every checkpoint (their bitmaps are gone) and answers.
    fn finish(self, core: &mut Core, ctx: &mut Ctx<'_>) -> Option<ShortOp> {
        let names: Vec<String> = self
            .names
            .iter()
            .filter(|n| core.tree.get(n).is_some())
            .cloned()
            .collect();
        let r = core.tree.discard_all(&names).map_err(Error::from);
        if let Ok(change) = &r {
            persist_change(core, ctx, change);
            for n in &change.removed {
                ctx.emit(DomainEvent::CheckpointDeleted(n.clone()));
            }
        }
        ctx.respond(self.req, r.map(|_| Reply::Done));
        release(core);
        None
    }

    fn fail(self, core: &mut Core, ctx: &mut Ctx<'_>, e: Error) -> Option<ShortOp> {
        ctx.respond(self.req, Err(e));
        release(core);
        None
    }

    fn send_batch(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        reopen_rw: Vec<crate::qmp::QmpCommand>,
        removals: Vec<TransactionAction>,
        reopen_ro: Vec<crate::qmp::QmpCommand>,
    ) -> Option<ShortOp> {
        if removals.is_empty() {
            // Every bitmap of the checkpoints is already gone: no transaction to send.
            return self.finish(core, ctx);
        }
        let mut outstanding = 0;
        for c in reopen_rw {
            ctx.send(
                Owner::Short(ShortTag::DeleteBatch { transaction: false }),
                c,
            );
            outstanding += 1;
        }
        ctx.send(
            Owner::Short(ShortTag::DeleteBatch { transaction: true }),
            cmd::transaction(removals),
        );
        outstanding += 1;
        for c in reopen_ro {
            ctx.send(
                Owner::Short(ShortTag::DeleteBatch { transaction: false }),
                c,
            );
            outstanding += 1;
        }
        self.phase = DeletePhase::Batch {
            outstanding,
            result: None,
        };
        Some(ShortOp::Delete(self))
    }

    fn on_reply(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        tag: ShortTag,
        command: &str,
        result: Result<Value, QmpError>,
    ) -> Option<ShortOp> {
        match std::mem::replace(&mut self.phase, DeletePhase::Idle) {
            DeletePhase::Querying => {
                let nodes = match result
                    .map_err(|e| refused(command, &e))
                    .and_then(|v| node_table(&v))
                {
                    Ok(n) => n,
                    Err(e) => return self.fail(core, ctx, e),
                };
                let mut removals = Vec::new();
                let mut rw = Vec::new();
                let mut ro = Vec::new();
                // A backing node holding bitmaps of several checkpoints is reopened once.
                let mut reopened = std::collections::BTreeSet::new();
                for (name, target, bitmap) in self.bitmaps(core) {
                    let layers = match disk_layers(&core.def, &target) {
                        Ok(l) => l,
                        Err(e) => return self.fail(core, ctx, e),
                    };
                    if !Self::needs_query(core, &name, &target) {
                        if let Some(top) = layers.first() {
                            removals.push(cmd::remove_bitmap_action(top, &bitmap));
                        }
                        continue;
                    }
                    let holders = layers_holding(&nodes, &layers, &bitmap);
                    if holders.is_empty() && marked_invalid(core, &name, &target) {
                        // Nothing left to remove on this disk; the metadata still goes.
                        continue;
                    }
                    if holders.is_empty() {
                        return self.fail(
                            core,
                            ctx,
                            RequestError::BitmapNotInChain {
                                bitmap: bitmap.clone(),
                                disk: target.clone(),
                            }
                            .into(),
                        );
                    }
                    for h in &holders {
                        removals.push(cmd::remove_bitmap_action(h, &bitmap));
                        let depth = layers.iter().position(|l| l == h).unwrap_or(0);
                        let read_only = nodes.get(h).is_some_and(|n| n.read_only);
                        if depth > 0 && read_only && reopened.insert(h.clone()) {
                            let backing = layers.get(depth + 1).map(String::as_str);
                            let storage = cmd::storage_of(h, &nodes);
                            rw.push(cmd::reopen_qcow2(h, &storage, backing, false));
                            ro.push(cmd::reopen_qcow2(h, &storage, backing, true));
                        }
                    }
                }
                self.send_batch(core, ctx, rw, removals, ro)
            }
            DeletePhase::Batch {
                outstanding,
                result: mut tx,
            } => {
                if tag == (ShortTag::DeleteBatch { transaction: true }) {
                    tx = Some(result.map(|_| ()).map_err(|e| refused(command, &e)));
                }
                let outstanding = outstanding.saturating_sub(1);
                if outstanding > 0 {
                    self.phase = DeletePhase::Batch {
                        outstanding,
                        result: tx,
                    };
                    return Some(ShortOp::Delete(self));
                }
                match tx {
                    Some(Ok(())) => self.finish(core, ctx),
                    Some(Err(e)) => self.fail(core, ctx, e),
                    None => self.fail(
                        core,
                        ctx,
                        Error::QemuMisbehaved("removal transaction was never answered".into()),
                    ),
                }
            }
            DeletePhase::Idle => self.start(core, ctx),
        }
    }
}

impl SizeRun {
    fn on_reply(
        mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        tag: ShortTag,
        command: &str,
        result: Result<Value, QmpError>,
    ) -> Option<ShortOp> {
        match std::mem::replace(&mut self.phase, SizePhase::Querying) {
            SizePhase::Querying => {
                let nodes = match result
                    .map_err(|e| refused(command, &e))
                    .and_then(|v| node_table(&v))
                {
                    Ok(n) => n,
                    Err(e) => return self.finish(core, ctx, Err(e)),
                };
                let mut clean = Vec::new();
                let mut merge = Vec::new();
                let mut remove = Vec::new();
                let mut measured = Vec::new();
                for (target, bitmap) in self.checkpoint.bitmap_disks() {
                    if core.def.disk(target).is_none() {
                        continue;
                    }
                    let Ok(layers) = disk_layers(&core.def, target) else {
                        continue;
                    };
                    let Some(top) = layers.first() else {
                        continue;
                    };
                    if nodes
                        .get(top)
                        .is_some_and(|n| n.bitmap(SIZE_BITMAP).is_some())
                    {
                        clean.push(cmd::remove_bitmap_action(top, SIZE_BITMAP));
                    }
                    // Disks whose chain is broken simply get no size, as in libvirt.
                    if let Ok(m) = check_chain(&nodes, &layers, bitmap) {
                        merge.push(cmd::add_temp_bitmap(top, SIZE_BITMAP, m.granularity_bytes));
                        merge.push(cmd::merge(top, SIZE_BITMAP, &m.sources));
                        remove.push(cmd::remove_bitmap_action(top, SIZE_BITMAP));
                        measured.push((target.to_owned(), top.clone()));
                    }
                }
                let mut outstanding = 0;
                if !clean.is_empty() {
                    ctx.send(
                        Owner::Short(ShortTag::SizeBatch(SizeStep::Clean)),
                        cmd::transaction(clean),
                    );
                    outstanding += 1;
                }
                if measured.is_empty() {
                    if outstanding == 0 {
                        let c = self.checkpoint.clone();
                        return self.finish(core, ctx, Ok(c));
                    }
                } else {
                    ctx.send(
                        Owner::Short(ShortTag::SizeBatch(SizeStep::Merge)),
                        cmd::transaction(merge),
                    );
                    ctx.send(
                        Owner::Short(ShortTag::SizeBatch(SizeStep::Query)),
                        cmd::query_nodes(),
                    );
                    ctx.send(
                        Owner::Short(ShortTag::SizeBatch(SizeStep::Remove)),
                        cmd::transaction(remove),
                    );
                    outstanding += 3;
                }
                self.phase = SizePhase::Batch {
                    outstanding,
                    measured,
                    merge: None,
                    nodes: None,
                };
                Some(ShortOp::Size(self))
            }
            SizePhase::Batch {
                outstanding,
                measured,
                mut merge,
                mut nodes,
            } => {
                match tag {
                    ShortTag::SizeBatch(SizeStep::Merge) => {
                        merge = Some(result.map(|_| ()).map_err(|e| refused(command, &e)));
                    }
                    ShortTag::SizeBatch(SizeStep::Query) => {
                        nodes = result.ok().and_then(|v| node_table(&v).ok());
                    }
                    _ => {}
                }
                let outstanding = outstanding.saturating_sub(1);
                if outstanding > 0 {
                    self.phase = SizePhase::Batch {
                        outstanding,
                        measured,
                        merge,
                        nodes,
                    };
                    return Some(ShortOp::Size(self));
                }
                let mut c = self.checkpoint.clone();
                let r = match merge {
                    Some(Err(e)) => Err(e),
                    _ => {
                        let nodes = nodes.unwrap_or_default();
                        for (target, top) in &measured {
                            let count = nodes
                                .get(top)
                                .and_then(|n| n.bitmap(SIZE_BITMAP))
                                .map(|b| b.count_bytes);
                            if let Some(d) = c.disks.iter_mut().find(|d| d.target == *target) {
                                d.size_bytes = count;
                            }
                        }
                        Ok(c)
                    }
                };
                self.finish(core, ctx, r)
            }
        }
    }

    fn finish(
        self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        r: Result<Checkpoint, Error>,
    ) -> Option<ShortOp> {
        ctx.respond(self.req, r.map(|c| Reply::Checkpoint(Box::new(c))));
        release(core);
        None
    }
}
