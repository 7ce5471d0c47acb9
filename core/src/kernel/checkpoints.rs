//! What checkpoint operations and backup runs share about checkpoints: the creation check, the
//! bitmap-add actions, committing a created checkpoint, persisting a tree change, and the
//! engine's temporary size bitmap.

use super::commands as cmd;
use super::ctx::Ctx;
use super::qemu::disk_layers;
use super::state::Core;
use crate::checkpoint::{Checkpoint, CheckpointTree, TreeChange};
use crate::error::{Error, RequestError};
use crate::model::{DomainDef, ImageFormat};
use crate::protocol::{DomainEvent, StoreOp};
use crate::qmp::TransactionAction;

/// Name of the temporary bitmap used to compute a checkpoint's size.
pub const SIZE_BITMAP: &str = "libvirt-tmp-size-xml";

/// Checks a checkpoint definition for creation (libvirt's prepare step).
pub(crate) fn check_create(
    def: &DomainDef,
    tree: &CheckpointTree,
    c: &Checkpoint,
) -> Result<(), Error> {
    tree.check_create(&c.name)?;
    for (target, bitmap) in c.bitmap_disks() {
        let disk = def
            .disk(target)
            .ok_or_else(|| RequestError::NoDisk(target.to_owned()))?;
        if bitmap != c.name {
            return Err(RequestError::Unsupported(format!(
                "bitmap for disk '{target}' must match checkpoint name '{}'",
                c.name
            ))
            .into());
        }
        if disk.is_empty() || disk.readonly {
            return Err(
                RequestError::Unsupported(format!("disk '{target}' is empty or readonly")).into(),
            );
        }
        if disk.bus.as_deref() == Some("sd") || disk.transient {
            return Err(RequestError::Unsupported(format!(
                "block jobs are not supported on disk '{target}'"
            ))
            .into());
        }
        if let Some(top) = disk.top()
            && top.format != ImageFormat::Qcow2
        {
            return Err(RequestError::Unsupported(format!(
                "checkpoint for disk {target} unsupported for storage type {}",
                top.format.name()
            ))
            .into());
        }
        disk_layers(def, target)?;
    }
    Ok(())
}

/// The bitmap-add actions of a new checkpoint: one per bitmap disk, on its top node.
pub(crate) fn create_actions(def: &DomainDef, c: &Checkpoint) -> Vec<TransactionAction> {
    c.bitmap_disks()
        .filter_map(|(target, bitmap)| {
            let top = def.disk(target)?.top()?.node_name.as_deref()?;
            Some(cmd::add_checkpoint_bitmap(top, bitmap))
        })
        .collect()
}

/// Inserts a created checkpoint into the tree and persists it (after QEMU confirmed).
pub(crate) fn commit_created(
    core: &mut Core,
    ctx: &mut Ctx<'_>,
    checkpoint: Checkpoint,
) -> Result<Checkpoint, Error> {
    let name = checkpoint.name.clone();
    let change = core.tree.insert_created(checkpoint)?;
    persist_change(core, ctx, &change);
    ctx.emit(DomainEvent::CheckpointCreated(name.clone()));
    core.tree
        .get(&name)
        .cloned()
        .ok_or(Error::Request(RequestError::NoCheckpoint(name)))
}

/// Persists what a tree operation changed.
pub(crate) fn persist_change(core: &mut Core, ctx: &mut Ctx<'_>, change: &TreeChange) {
    for name in &change.removed {
        core.invalid.remove(name);
        ctx.persist(StoreOp::DeleteCheckpoint(name.clone()));
    }
    for name in &change.written {
        if let Some(c) = core.tree.get(name) {
            ctx.persist(StoreOp::PutCheckpoint(Box::new(c.clone())));
        }
    }
    if change.current_changed {
        ctx.persist(StoreOp::SetCurrentCheckpoint(
            core.tree.current().map(str::to_owned),
        ));
    }
}
