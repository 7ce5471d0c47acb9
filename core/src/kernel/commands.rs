//! Builders of the QMP commands the engine sends, in libvirt's exact shapes.

use crate::qmp::{
    BitmapRef, BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockJobCancel,
    BlockdevBackup, BlockdevCreate, BlockdevCreateOptions, BlockdevDel, BlockdevDiscard,
    BlockdevDriver, BlockdevOptions, BlockdevRef, BlockdevRefOrNull, BlockdevReopen,
    CreateQcow2Options, JobRef, QmpCapabilities, QmpCommand, QueryNamedBlockNodes, SyncMode,
    Transaction, TransactionAction,
};

/// `qmp_capabilities`.
pub(crate) fn capabilities() -> QmpCommand {
    QmpCommand::QmpCapabilities(QmpCapabilities::default())
}

/// `query-named-block-nodes {flat: true}`.
pub(crate) fn query_nodes() -> QmpCommand {
    QmpCommand::QueryNamedBlockNodes(QueryNamedBlockNodes { flat: Some(true) })
}

/// `query-jobs`.
pub(crate) fn query_jobs() -> QmpCommand {
    QmpCommand::QueryJobs
}

/// `transaction {actions}`.
pub(crate) fn transaction(actions: Vec<TransactionAction>) -> QmpCommand {
    QmpCommand::Transaction(Transaction::new(actions))
}

/// A checkpoint bitmap: persistent and recording, QEMU's default granularity.
pub(crate) fn add_checkpoint_bitmap(node: &str, name: &str) -> TransactionAction {
    TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
        node: node.to_owned(),
        name: name.to_owned(),
        granularity: None,
        persistent: Some(true),
        disabled: Some(false),
    })
}

/// A temporary bitmap: not persistent, not recording.
pub(crate) fn add_temp_bitmap(node: &str, name: &str, granularity_bytes: u64) -> TransactionAction {
    TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
        node: node.to_owned(),
        name: name.to_owned(),
        granularity: (granularity_bytes > 0).then_some(granularity_bytes),
        persistent: Some(false),
        disabled: Some(true),
    })
}

/// Merge of `sources` (node, name) into `target` on `node`.
pub(crate) fn merge(node: &str, target: &str, sources: &[(String, String)]) -> TransactionAction {
    TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
        node: node.to_owned(),
        target: target.to_owned(),
        bitmaps: sources
            .iter()
            .map(|(n, b)| BitmapRef::Located(BlockDirtyBitmap::new(n.clone(), b.clone())))
            .collect(),
    })
}

/// Removal of a bitmap, as a transaction action.
pub(crate) fn remove_bitmap_action(node: &str, name: &str) -> TransactionAction {
    TransactionAction::BlockDirtyBitmapRemove(BlockDirtyBitmap::new(node, name))
}

/// Removal of a bitmap, as a plain command.
pub(crate) fn remove_bitmap(node: &str, name: &str) -> QmpCommand {
    QmpCommand::BlockDirtyBitmapRemove(BlockDirtyBitmap::new(node, name))
}

/// A `blockdev-backup` action with libvirt's fixed settings.
pub(crate) fn backup_action(
    job_id: &str,
    device: &str,
    target: &str,
    sync: SyncMode,
    bitmap: Option<&str>,
    copy_offload: bool,
) -> TransactionAction {
    let mut b = BlockdevBackup::new(job_id, device, target, sync);
    b.bitmap = bitmap.map(str::to_owned);
    if copy_offload {
        b.x_perf = Some(crate::qmp::BackupPerf {
            use_copy_range: Some(true),
            ..Default::default()
        });
    }
    b.auto_finalize = Some(true);
    b.auto_dismiss = Some(false);
    TransactionAction::BlockdevBackup(b)
}

/// `blockdev-add` of a protocol node for a file or block device; with `no_flush`, QEMU never
/// asks the host to write the node's data to storage (the engine does it itself).
pub(crate) fn add_storage_node(
    node: &str,
    path: &str,
    block_device: bool,
    no_flush: bool,
) -> QmpCommand {
    let driver = if block_device {
        BlockdevDriver::HostDevice {
            filename: path.to_owned(),
        }
    } else {
        BlockdevDriver::File {
            filename: path.to_owned(),
        }
    };
    let mut o = BlockdevOptions::new(node, driver);
    o.auto_read_only = Some(true);
    o.discard = Some(BlockdevDiscard::Unmap);
    if no_flush {
        o.extra
            .insert("cache".into(), serde_json::json!({"no-flush": true}));
    }
    QmpCommand::BlockdevAdd(Box::new(o))
}

/// `blockdev-add` of a qcow2 format node over `storage`, backed by `backing` or by nothing.
pub(crate) fn add_qcow2_node(node: &str, storage: &str, backing: Option<&str>) -> QmpCommand {
    QmpCommand::BlockdevAdd(Box::new(qcow2_options(node, storage, backing, false)))
}

/// A qcow2 format node over `storage`, backed by `backing` or by nothing.
fn qcow2_options(
    node: &str,
    storage: &str,
    backing: Option<&str>,
    read_only: bool,
) -> BlockdevOptions {
    let mut o = BlockdevOptions::new(
        node,
        BlockdevDriver::Qcow2 {
            file: BlockdevRef::Node(storage.to_owned()),
            backing: Some(match backing {
                Some(b) => BlockdevRefOrNull::Ref(BlockdevRef::Node(b.to_owned())),
                None => BlockdevRefOrNull::Null,
            }),
        },
    );
    o.read_only = Some(read_only);
    o
}

/// Settings of a new qcow2 image.
pub(crate) struct Qcow2Create<'a> {
    pub job_id: &'a str,
    pub storage: &'a str,
    pub size_bytes: u64,
    pub cluster_size_bytes: Option<u64>,
    pub backing_file: Option<&'a str>,
    pub backing_format: Option<&'a str>,
}

/// `blockdev-create` of a qcow2 image on `storage`.
pub(crate) fn create_qcow2(c: &Qcow2Create<'_>) -> QmpCommand {
    let mut o = CreateQcow2Options::new(BlockdevRef::Node(c.storage.to_owned()), c.size_bytes);
    o.cluster_size = c.cluster_size_bytes;
    o.backing_file = c.backing_file.map(str::to_owned);
    o.backing_fmt = c.backing_format.map(str::to_owned);
    QmpCommand::BlockdevCreate(Box::new(BlockdevCreate {
        job_id: c.job_id.to_owned(),
        options: BlockdevCreateOptions::Qcow2(o),
    }))
}

/// `blockdev-del`.
pub(crate) fn del_node(node: &str) -> QmpCommand {
    QmpCommand::BlockdevDel(BlockdevDel {
        node_name: node.to_owned(),
    })
}

/// `blockdev-reopen` of a qcow2 layer with `read_only`.
pub(crate) fn reopen_qcow2(
    node: &str,
    storage: &str,
    backing: Option<&str>,
    read_only: bool,
) -> QmpCommand {
    QmpCommand::BlockdevReopen(BlockdevReopen {
        options: vec![qcow2_options(node, storage, backing, read_only)],
    })
}

/// `job-dismiss`.
pub(crate) fn job_dismiss(id: &str) -> QmpCommand {
    QmpCommand::JobDismiss(JobRef::new(id))
}

/// `block-job-cancel {device, force: true}`.
pub(crate) fn block_job_cancel(id: &str) -> QmpCommand {
    QmpCommand::BlockJobCancel(BlockJobCancel {
        device: id.to_owned(),
        force: Some(true),
    })
}

/// `block-job-cancel {device, force: false}`: the cancel of a single disk's job.
pub(crate) fn block_job_cancel_gently(id: &str) -> QmpCommand {
    QmpCommand::BlockJobCancel(BlockJobCancel {
        device: id.to_owned(),
        force: Some(false),
    })
}

/// The storage node under a format node. libvirt names them `libvirt-N-format` and
/// `libvirt-N-storage`; QEMU's own names for a legacy `-drive` disk (`#blockNNN`) say nothing,
/// and `query-named-block-nodes` does not list a node's children, so there the storage node
/// is the protocol node (`file`, `host_device`) that QEMU reports over the same file name.
pub(crate) fn storage_of(format_node: &str, nodes: &crate::chain::NodeTable) -> String {
    let by_name = match format_node.strip_suffix("-format") {
        Some(base) => format!("{base}-storage"),
        None => format!("{format_node}-storage"),
    };
    if nodes.contains_key(&by_name) {
        return by_name;
    }
    let filename = nodes.get(format_node).and_then(|n| n.filename.as_deref());
    nodes
        .values()
        .find(|n| {
            n.node_name != format_node
                && matches!(n.driver.as_str(), "file" | "host_device")
                && filename.is_some()
                && n.filename.as_deref() == filename
        })
        .map_or(by_name, |n| n.node_name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{NodeState, NodeTable};

    fn node(name: &str, driver: &str, file: &str) -> (String, NodeState) {
        (
            name.to_owned(),
            NodeState {
                node_name: name.to_owned(),
                driver: driver.to_owned(),
                filename: Some(file.to_owned()),
                ..NodeState::default()
            },
        )
    }

    #[test]
    fn storage_node_of_a_libvirt_layer_is_named_after_it() {
        let nodes: NodeTable = [
            node("libvirt-2-format", "qcow2", "/i/b.qcow2"),
            node("libvirt-2-storage", "file", "/i/b.qcow2"),
        ]
        .into();
        assert_eq!(storage_of("libvirt-2-format", &nodes), "libvirt-2-storage");
    }

    #[test]
    fn storage_node_of_a_drive_layer_is_the_file_node_over_the_same_file() {
        let nodes: NodeTable = [
            node("#block177", "qcow2", "/i/b.qcow2"),
            node("#block034", "file", "/i/b.qcow2"),
            node("#block201", "qcow2", "/i/top.qcow2"),
            node("#block188", "file", "/i/top.qcow2"),
        ]
        .into();
        assert_eq!(storage_of("#block177", &nodes), "#block034");
        assert_eq!(storage_of("#block201", &nodes), "#block188");
    }
}
