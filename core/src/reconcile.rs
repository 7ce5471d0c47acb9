//! The reconcile after a connection: one pass queries the nodes, marks invalid checkpoints,
//! removes what the engine owns and reports; a pass whose query or removals QEMU refused is
//! run again after a growing delay. The pass holds the short slot, so no checkpoint operation
//! races it.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::backup::BackupPlan;
use crate::chain::NodeTable;
use crate::kernel::checkpoints::SIZE_BITMAP;
use crate::kernel::commands as cmd;
use crate::kernel::ctx::Ctx;
use crate::kernel::qemu::{disk_layers, node_table, refused};
use crate::kernel::retry::retry_delay_ms;
use crate::kernel::state::{Core, Owner, SessionTag, Timer};
use crate::protocol::{BitmapDrift, DomainEvent, StoreOp};
use crate::qmp::QmpError;

/// The reconcile of a domain's session: at most one pass at a time. When the next pass
/// starts is the domain's [`Timer::Reconcile`].
#[derive(Debug, Default)]
pub(crate) struct Reconcile {
    /// A pass is running and holds the short slot.
    active: bool,
    /// Passes in a row that did not finish cleanly.
    attempt: u32,
    /// Removals of this pass, by index in the repair tags.
    removals: Vec<(String, String)>,
    outstanding: usize,
    failed: bool,
    report: BitmapDrift,
    /// [`Core::refusals`] when the pass started: a pass that ends cleanly puts QEMU in step
    /// with the store only if nothing else was refused meanwhile.
    refusals_at_start: u64,
}

impl Reconcile {
    /// Whether a pass is running (requests that talk to QEMU wait for its end).
    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    /// A session was negotiated: orphans and leftovers can exist with or without checkpoints,
    /// so a pass starts now; unless the host vouched that this QEMU holds exactly what the
    /// store describes and neither pending checkpoints nor a journaled backup (`backup`) ask
    /// for a look.
    pub(crate) fn on_session_ready(&mut self, core: &mut Core, ctx: &mut Ctx<'_>, backup: bool) {
        self.attempt = 0;
        let trusted = std::mem::take(&mut core.trusted);
        if trusted && !backup && core.pending_checkpoints.is_empty() && core.invalid.is_empty() {
            core.in_step = true;
            return;
        }
        self.start(core, ctx);
    }

    /// The session is gone: a running pass ends without a report and the next connection
    /// starts a fresh one.
    pub(crate) fn on_link_down(&mut self, core: &mut Core, ctx: &mut Ctx<'_>) {
        if self.active {
            core.jobs.release_short();
        }
        *self = Reconcile::default();
        ctx.clear_timer(&Timer::Reconcile);
    }

    /// Starts a pass if the short slot is free, or tries again later.
    pub(crate) fn start(&mut self, core: &mut Core, ctx: &mut Ctx<'_>) {
        ctx.clear_timer(&Timer::Reconcile);
        if !core.connected || self.active {
            return;
        }
        if core
            .jobs
            .acquire_short(crate::jobs::JobKind::Reconcile)
            .is_err()
        {
            // Another operation talks to QEMU now; the pass must not race it.
            ctx.set_timer_in(Timer::Reconcile, retry_delay_ms(self.attempt));
            self.attempt = self.attempt.saturating_add(1);
            return;
        }
        self.active = true;
        self.failed = false;
        self.outstanding = 0;
        self.removals.clear();
        self.report = BitmapDrift::default();
        self.refusals_at_start = core.refusals;
        ctx.send(Owner::Session(SessionTag::DriftQuery), cmd::query_nodes());
    }

    /// Ends a pass: report, release the slot, and schedule another pass if QEMU refused
    /// something.
    fn finish(&mut self, core: &mut Core, ctx: &mut Ctx<'_>) {
        self.active = false;
        core.jobs.release_short();
        if self.failed {
            ctx.set_timer_in(Timer::Reconcile, retry_delay_ms(self.attempt));
            self.attempt = self.attempt.saturating_add(1);
        } else {
            self.attempt = 0;
            core.in_step = core.refusals == self.refusals_at_start;
            // The pass held the short slot, so no create ran during it: every recorded name
            // now has metadata or had its bitmaps removed.
            if !core.pending_checkpoints.is_empty() {
                core.pending_checkpoints.clear();
                ctx.persist(StoreOp::SetPendingCheckpoints(Vec::new()));
            }
        }
        let report = std::mem::take(&mut self.report);
        if !report.is_empty() {
            ctx.emit(DomainEvent::BitmapDrift(report));
        }
    }

    /// The pass's node query answered: mark invalid checkpoints and remove what the engine
    /// owns (`backup` is the running backup's plan, whose temporary bitmaps stay).
    pub(crate) fn on_drift_query(
        &mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        backup: Option<&BackupPlan>,
        command: &str,
        result: Result<Value, QmpError>,
    ) {
        if !self.active {
            return;
        }
        let nodes = match result
            .map_err(|e| refused(command, &e))
            .and_then(|v| node_table(&v))
        {
            Ok(n) => n,
            Err(_) => {
                self.failed = true;
                self.finish(core, ctx);
                return;
            }
        };
        let (drift, removals) = bitmap_drift(core, &nodes, backup);
        core.invalid.clear();
        for (cp, disk) in &drift.missing {
            core.invalid
                .entry(cp.clone())
                .or_default()
                .insert(disk.clone());
        }
        self.report = drift;
        for (i, (node, bitmap)) in removals.iter().enumerate() {
            ctx.send(
                Owner::Session(SessionTag::Repair(i)),
                cmd::remove_bitmap(node, bitmap),
            );
        }
        self.outstanding = removals.len();
        self.removals = removals;
        if self.outstanding == 0 {
            self.finish(core, ctx);
        }
    }

    /// Removal number `i` of the pass answered.
    pub(crate) fn on_repair(
        &mut self,
        core: &mut Core,
        ctx: &mut Ctx<'_>,
        i: usize,
        result: Result<Value, QmpError>,
    ) {
        if !self.active {
            return;
        }
        match result {
            Ok(_) => {
                if let Some(pair) = self.removals.get(i) {
                    self.report.removed.push(pair.clone());
                }
            }
            Err(_) => self.failed = true,
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.outstanding == 0 {
            self.finish(core, ctx);
        }
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
/// [`SIZE_BITMAP`]: crate::kernel::checkpoints::SIZE_BITMAP
fn bitmap_drift(
    core: &Core,
    nodes: &NodeTable,
    backup: Option<&BackupPlan>,
) -> (BitmapDrift, Vec<(String, String)>) {
    let mut drift = BitmapDrift::default();
    let mut removals = Vec::new();
    let mut owned: BTreeSet<(&str, &str)> = BTreeSet::new();
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
            SIZE_BITMAP.to_owned(),
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
