//! Reading QEMU's answers the way every machine needs: refusals as engine errors, node data
//! as a node table, and a disk's layers as node names.

use serde_json::Value;

use crate::chain::{BitmapState, NodeState, NodeTable};
use crate::error::{Error, RequestError};
use crate::model::DomainDef;
use crate::qmp::{ErrorClass, QmpError};

/// Error class of the synthetic error a command gets when QEMU never answers it.
pub(crate) const TIMEOUT_CLASS: &str = "vbackup-timeout";

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
/// The synthetic error a command gets when QEMU never answers it.
pub(crate) fn timeout_error(command: &str, timeout_ms: u64) -> QmpError {
    QmpError::new(
        ErrorClass::Unknown(TIMEOUT_CLASS.into()),
        format!("no reply to {command} within {timeout_ms} ms"),
    )
}
