//! Discovering an attached domain's disks from what a running QEMU or qemu-storage-daemon
//! reports.
//!
//! Contract:
//! - The parsing is pure: [`Replies`] holds the four query replies and [`discover_disks`] turns
//!   them into [`DiskDef`]s, so it is tested with recorded replies. [`query`] is the thin socket
//!   part that collects them over an open QMP connection.
//! - The replies used are `query-block` (guest devices), `query-block-exports` (exports),
//!   `query-named-block-nodes {"flat": true}` (each node's driver, file name and read-only flag)
//!   and `x-debug-query-block-graph` (the edges between nodes: which node is whose `file` or
//!   `backing` child). Flat node records carry no child node names and a node whose backing was
//!   given by node name reports a `json:{...}` pseudo file name, so the graph is the only reliable
//!   source of the layer structure; a QEMU without it is [`DiscoverError::NoGraph`].
//!
//! Which nodes are disks (the rule):
//! 1. What the guest sees, when QEMU has guest devices: every `query-block` device with a medium
//!    inserted, named by its qdev id (`/machine/peripheral/<id>/...`), else its legacy drive name,
//!    else its node name. Devices without a medium are left out.
//! 2. Otherwise (qemu-storage-daemon has no devices) every block export that is not shutting
//!    down, named by its export id, in id order.
//! 3. Otherwise every root node: a block-driver node that is no other block-driver node's child,
//!    named by its node name, in name order.
//!
//! A pull backup running on a daemon adds exports of its own (a scratch image over the disk),
//! which rule 2 also counts as disks: discover while no backup runs. Matching a defined disk to
//! what runs is by its top image's path, so such extra disks do no harm there.
//!
//! Disk names must be guest target names as libvirt's grammar has them (`vda`, `sdb`, `hdc`...):
//! a QEMU name that is one is kept, else the part after its last `-` when that is one
//! (vbackup's own guest exports are `guest-vda`), else the disk gets the first free `vd<letters>`
//! name in order (`vda`, `vdb`, ..., `vdz`, `vdaa`...).
//!
//! From the node a device or export is attached to, wrappers are passed through to reach the
//! disk's top layer: a `raw` node whose `file` child is itself a format or filter node (a raw
//! view of another image, as vbackup's own guest exports are), and filter nodes such as
//! `copy-before-write` or `throttle` (followed by their `file` child). A node of an image format
//! (`qcow2`, `raw` over storage, ...) is a layer; its storage is found by following `file` down
//! to the protocol node (`file` gives a file path, `host_device` a block device, anything else is
//! a network source), and the next layer is its `backing` child, passed through wrappers again.
//! Two roots reaching the same top layer are one disk (the first name wins). Every walk is
//! bounded; a cycle or a chain longer than [`MAX_LAYERS`] is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::{Value, json};
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};

use crate::qmp_socket::{QmpSocket, QmpSocketError};

/// The longest layer chain (and wrapper descent) followed for one disk.
pub const MAX_LAYERS: usize = 200;

/// Image formats: a node with one of these drivers is a layer (except `raw` over another image,
/// see the module rule).
const IMAGE_FORMATS: [&str; 13] = [
    "qcow2",
    "raw",
    "qed",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "luks",
    "parallels",
    "qcow",
    "bochs",
    "cloop",
    "dmg",
];

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// A reply does not have the documented shape.
    #[error("unexpected {command} reply: {reason}")]
    Malformed {
        /// The query.
        command: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A device, export or edge names a node the node list does not have.
    #[error("QEMU reported node '{node}' in {source_reply} but not in its node list")]
    UnknownNode {
        /// The node name.
        node: String,
        /// Where it was named.
        source_reply: &'static str,
    },
    /// A disk's wrappers or layers loop or go on past [`MAX_LAYERS`].
    #[error("disk '{target}': its node chain loops or is longer than {MAX_LAYERS} nodes")]
    ChainTooLong {
        /// The disk.
        target: String,
    },
    /// QEMU does not offer `x-debug-query-block-graph`, without which the layers of a disk
    /// cannot be told apart; the disks must be given with `--disk`.
    #[error(
        "QEMU does not report its block graph (x-debug-query-block-graph: {0}); give the disks with --disk"
    )]
    NoGraph(String),
    /// A QMP failure while querying.
    #[error(transparent)]
    Qmp(#[from] QmpSocketError),
}

/// The replies discovery reads, as QEMU returned them (the `return` values).
#[derive(Debug, Clone, PartialEq)]
pub struct Replies {
    /// `query-block`.
    pub block: Value,
    /// `query-block-exports`.
    pub exports: Value,
    /// `query-named-block-nodes {"flat": true}`.
    pub nodes: Value,
    /// `x-debug-query-block-graph`.
    pub graph: Value,
}

/// Runs the four queries on a negotiated connection, each before `deadline`.
pub fn query(qmp: &mut QmpSocket, deadline: Instant) -> Result<Replies, DiscoverError> {
    let block = qmp.execute("query-block", None, deadline)?;
    let exports = qmp.execute("query-block-exports", None, deadline)?;
    let nodes = qmp.execute(
        "query-named-block-nodes",
        Some(json!({"flat": true})),
        deadline,
    )?;
    let graph = match qmp.execute("x-debug-query-block-graph", None, deadline) {
        Ok(graph) => graph,
        Err(QmpSocketError::Qemu { error, .. }) => return Err(DiscoverError::NoGraph(error.desc)),
        Err(e) => return Err(e.into()),
    };
    Ok(Replies {
        block,
        exports,
        nodes,
        graph,
    })
}

/// One block-driver node: what the flat node list says about it, and its children.
#[derive(Debug, Default)]
struct Node {
    drv: String,
    file_name: Option<String>,
    read_only: bool,
    /// Child role (`file`, `backing`, `target`...) to child node name.
    children: BTreeMap<String, String>,
    has_driver_parent: bool,
}

/// The block graph keyed by node name.
#[derive(Debug)]
struct Graph {
    nodes: BTreeMap<String, Node>,
}

fn malformed(command: &'static str, reason: impl Into<String>) -> DiscoverError {
    DiscoverError::Malformed {
        command,
        reason: reason.into(),
    }
}

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

impl Graph {
    fn parse(nodes: &Value, graph: &Value) -> Result<Graph, DiscoverError> {
        const NODES: &str = "query-named-block-nodes";
        const GRAPH: &str = "x-debug-query-block-graph";
        let list = nodes
            .as_array()
            .ok_or_else(|| malformed(NODES, "not an array"))?;
        let mut by_name = BTreeMap::new();
        for entry in list {
            let name = str_field(entry, "node-name")
                .ok_or_else(|| malformed(NODES, "a node without node-name"))?;
            let drv = str_field(entry, "drv")
                .ok_or_else(|| malformed(NODES, format!("node '{name}' without drv")))?;
            by_name.insert(
                name.to_owned(),
                Node {
                    drv: drv.to_owned(),
                    file_name: str_field(entry, "file").map(str::to_owned),
                    read_only: entry.get("ro").and_then(Value::as_bool).unwrap_or(false),
                    ..Node::default()
                },
            );
        }
        // The graph numbers its vertices; only block-driver vertices are nodes (block-backend
        // and block-job vertices are users of nodes, not parents in the image structure).
        let vertices = graph
            .get("nodes")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(GRAPH, "no nodes array"))?;
        let mut driver_names = BTreeMap::new();
        for v in vertices {
            let id = v
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed(GRAPH, "a vertex without id"))?;
            if str_field(v, "type") == Some("block-driver") {
                let name = str_field(v, "name")
                    .ok_or_else(|| malformed(GRAPH, format!("vertex {id} without name")))?;
                driver_names.insert(id, name.to_owned());
            }
        }
        let edges = graph
            .get("edges")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(GRAPH, "no edges array"))?;
        for e in edges {
            let (Some(parent), Some(child), Some(role)) = (
                e.get("parent").and_then(Value::as_u64),
                e.get("child").and_then(Value::as_u64),
                str_field(e, "name"),
            ) else {
                return Err(malformed(GRAPH, "an edge without parent, child or name"));
            };
            let (Some(parent), Some(child)) = (driver_names.get(&parent), driver_names.get(&child))
            else {
                continue;
            };
            for name in [parent, child] {
                if !by_name.contains_key(name) {
                    return Err(DiscoverError::UnknownNode {
                        node: name.clone(),
                        source_reply: GRAPH,
                    });
                }
            }
            if let Some(node) = by_name.get_mut(child) {
                node.has_driver_parent = true;
            }
            if let Some(node) = by_name.get_mut(parent) {
                node.children.insert(role.to_owned(), child.clone());
            }
        }
        Ok(Graph { nodes: by_name })
    }

    fn node(&self, name: &str, source_reply: &'static str) -> Result<&Node, DiscoverError> {
        self.nodes
            .get(name)
            .ok_or_else(|| DiscoverError::UnknownNode {
                node: name.to_owned(),
                source_reply,
            })
    }

    fn is_format(&self, name: &str) -> bool {
        self.nodes
            .get(name)
            .is_some_and(|n| IMAGE_FORMATS.contains(&n.drv.as_str()))
    }

    /// Passes wrappers from `start` down to a layer node (see the module rule).
    fn layer_below(&self, start: &str, target: &str) -> Result<String, DiscoverError> {
        let mut name = start.to_owned();
        for _ in 0..MAX_LAYERS {
            let node = self.node(&name, "the block graph")?;
            let file = node.children.get("file");
            let wrapper = match (node.drv.as_str(), file) {
                // A raw view of another image (format or filter below it).
                ("raw", Some(child)) => {
                    let below = self.node(child, "the block graph")?;
                    self.is_format(child) || !below.children.is_empty()
                }
                (_, Some(_)) => !self.is_format(&name),
                (_, None) => false,
            };
            match (wrapper, file) {
                (true, Some(child)) => name = child.clone(),
                _ => return Ok(name),
            }
        }
        Err(DiscoverError::ChainTooLong {
            target: target.to_owned(),
        })
    }

    /// The storage under a layer node: its type and local path.
    fn storage_of(&self, layer: &str) -> (StorageType, Option<String>) {
        let mut name = layer.to_owned();
        // A layer without a `file` child is itself the protocol node (an image served directly).
        for _ in 0..MAX_LAYERS {
            let Some(node) = self.nodes.get(&name) else {
                break;
            };
            match node.children.get("file") {
                Some(child) => name = child.clone(),
                None => {
                    return match node.drv.as_str() {
                        "file" => (StorageType::File, node.file_name.clone()),
                        "host_device" | "host_cdrom" => {
                            (StorageType::Block, node.file_name.clone())
                        }
                        _ => (StorageType::Network, None),
                    };
                }
            }
        }
        (StorageType::Network, None)
    }

    /// The layers of the disk whose guest-visible node is `root`, top first.
    fn layers(&self, root: &str, target: &str) -> Result<Vec<Layer>, DiscoverError> {
        let mut layers = Vec::new();
        let mut seen = BTreeSet::new();
        let mut next = Some(self.layer_below(root, target)?);
        while let Some(name) = next {
            if !seen.insert(name.clone()) || layers.len() >= MAX_LAYERS {
                return Err(DiscoverError::ChainTooLong {
                    target: target.to_owned(),
                });
            }
            let node = self.node(&name, "the block graph")?;
            let (storage, path) = self.storage_of(&name);
            let format = if node.children.contains_key("file") {
                ImageFormat::from_name(&node.drv)
            } else {
                ImageFormat::Raw
            };
            layers.push(Layer {
                storage,
                format,
                path,
                index: None,
                node_name: Some(name.clone()),
            });
            next = match node.children.get("backing") {
                Some(backing) => Some(self.layer_below(backing, target)?),
                None => None,
            };
        }
        Ok(layers)
    }
}

/// The disk name a device gets: its qdev id, else its drive name, else `None`.
fn device_name(device: &Value) -> Option<String> {
    if let Some(qdev) = str_field(device, "qdev") {
        let mut parts = qdev.split('/').filter(|p| !p.is_empty());
        if parts.next() == Some("machine")
            && parts.next() == Some("peripheral")
            && let Some(id) = parts.next()
        {
            return Some(id.to_owned());
        }
    }
    str_field(device, "device")
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
}

/// Whether `name` is a guest target name of libvirt's grammar:
/// `(ioemu:)?(fd|hd|sd|vd|xvd|ubd)[a-zA-Z0-9_]+`.
pub fn is_target_name(name: &str) -> bool {
    let name = name.strip_prefix("ioemu:").unwrap_or(name);
    ["xvd", "ubd", "fd", "hd", "sd", "vd"].iter().any(|prefix| {
        name.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    })
}

/// `vd` and the letters of `n` counted like spreadsheet columns: 0 is `vda`, 26 is `vdaa`.
fn vd_name(mut n: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(char::from(b'a' + (n % 26) as u8));
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.iter().rev().fold("vd".to_owned(), |mut s, c| {
        s.push(*c);
        s
    })
}

/// The target name of a disk QEMU calls `qemu_name` (see the module rule), not in `used`.
fn target_name(qemu_name: &str, used: &BTreeSet<String>) -> String {
    let suffix = qemu_name.rsplit('-').next().unwrap_or(qemu_name);
    for candidate in [qemu_name, suffix] {
        if is_target_name(candidate) && !used.contains(candidate) {
            return candidate.to_owned();
        }
    }
    (0..)
        .map(vd_name)
        .find(|n| !used.contains(n))
        .unwrap_or_default()
}

/// The roots the rule picks, as `(disk name, node name)` in order.
fn roots(replies: &Replies, graph: &Graph) -> Result<Vec<(String, String)>, DiscoverError> {
    const BLOCK: &str = "query-block";
    const EXPORTS: &str = "query-block-exports";
    let devices = replies
        .block
        .as_array()
        .ok_or_else(|| malformed(BLOCK, "not an array"))?;
    let mut picked = Vec::new();
    for device in devices {
        let Some(node) = device
            .get("inserted")
            .and_then(|i| str_field(i, "node-name"))
        else {
            continue;
        };
        let name = device_name(device).unwrap_or_else(|| node.to_owned());
        picked.push((name, node.to_owned()));
    }
    if !devices.is_empty() {
        return Ok(picked);
    }
    let exports = replies
        .exports
        .as_array()
        .ok_or_else(|| malformed(EXPORTS, "not an array"))?;
    for export in exports {
        if export.get("shutting-down").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let (Some(id), Some(node)) = (str_field(export, "id"), str_field(export, "node-name"))
        else {
            return Err(malformed(EXPORTS, "an export without id or node-name"));
        };
        graph.node(node, EXPORTS)?;
        picked.push((id.to_owned(), node.to_owned()));
    }
    if !picked.is_empty() {
        picked.sort();
        return Ok(picked);
    }
    Ok(graph
        .nodes
        .iter()
        .filter(|(_, n)| !n.has_driver_parent)
        .map(|(name, _)| (name.clone(), name.clone()))
        .collect())
}

/// The disks the replies describe (see the module rule), in rule order.
pub fn discover_disks(replies: &Replies) -> Result<Vec<DiskDef>, DiscoverError> {
    let graph = Graph::parse(&replies.nodes, &replies.graph)?;
    let mut disks: Vec<DiskDef> = Vec::new();
    let mut tops = BTreeSet::new();
    let picked = roots(replies, &graph)?;
    // Names already valid are claimed first, so a generated name never takes one of them.
    let mut used: BTreeSet<String> = picked
        .iter()
        .map(|(name, _)| name.clone())
        .filter(|n| is_target_name(n))
        .collect();
    for (qemu_name, root) in picked {
        let layers = graph.layers(&root, &qemu_name)?;
        let top = layers
            .first()
            .and_then(|l| l.node_name.clone())
            .unwrap_or_default();
        if !tops.insert(top.clone()) {
            continue;
        }
        let readonly = graph.nodes.get(&top).is_some_and(|n| n.read_only);
        used.remove(&qemu_name);
        let target = target_name(&qemu_name, &used);
        used.insert(target.clone());
        disks.push(DiskDef {
            target,
            device: DiskDevice::Disk,
            bus: None,
            readonly,
            transient: false,
            layers,
        });
    }
    Ok(disks)
}

/// A domain named `name` with the disks the replies describe.
pub fn discover_domain(name: &str, replies: &Replies) -> Result<DomainDef, DiscoverError> {
    Ok(DomainDef {
        name: name.to_owned(),
        uuid: None,
        disks: discover_disks(replies)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("recorded reply parses")
    }

    fn summary(disks: &[DiskDef]) -> Vec<String> {
        disks
            .iter()
            .map(|d| {
                let layers: Vec<String> = d
                    .layers
                    .iter()
                    .map(|l| {
                        format!(
                            "{}:{}:{}",
                            l.node_name.as_deref().unwrap_or("?"),
                            l.format.name(),
                            l.path.as_deref().unwrap_or("-")
                        )
                    })
                    .collect();
                format!(
                    "{}{} {}",
                    d.target,
                    if d.readonly { "(ro)" } else { "" },
                    layers.join(" > ")
                )
            })
            .collect()
    }

    // Recorded from qemu-storage-daemon 10.0.2: disk 1 is a qcow2 top (`tq`) over a qcow2 backing
    // image (`bq`) given by node name, exported through a raw view (`guest`); disk 2 is a raw
    // image (`rr`) exported directly. Node fields discovery does not read are left out.
    const QSD_EXPORTS: &str = r#"[{"node-name": "rr", "shutting-down": false, "type": "nbd", "id": "exp-vdb"}, {"node-name": "guest", "shutting-down": false, "type": "nbd", "id": "exp-vda"}]"#;
    const QSD_GRAPH: &str = r#"{"edges": [{"name": "file", "parent": 4, "child": 9}, {"name": "file", "parent": 2, "child": 8}, {"name": "file", "parent": 8, "child": 7}, {"name": "backing", "parent": 8, "child": 6}, {"name": "file", "parent": 6, "child": 5}, {"name": "root", "parent": 3, "child": 4}, {"name": "root", "parent": 1, "child": 2}], "nodes": [{"name": "rr", "type": "block-driver", "id": 4}, {"name": "rf", "type": "block-driver", "id": 9}, {"name": "guest", "type": "block-driver", "id": 2}, {"name": "tq", "type": "block-driver", "id": 8}, {"name": "tf", "type": "block-driver", "id": 7}, {"name": "bq", "type": "block-driver", "id": 6}, {"name": "bf", "type": "block-driver", "id": 5}, {"name": "", "type": "block-backend", "id": 3}, {"name": "", "type": "block-backend", "id": 1}]}"#;
    const QSD_NODES: &str = r#"[{"node-name": "rr", "drv": "raw", "ro": false, "file": "/tmp/cliexp/r.raw"}, {"node-name": "rf", "drv": "file", "ro": false, "file": "/tmp/cliexp/r.raw"}, {"node-name": "guest", "drv": "raw", "ro": false, "file": "json:{\"driver\": \"raw\", \"file\": {\"backing\": {\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/cliexp/base.qcow2\"}}, \"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/cliexp/top.qcow2\"}}}"}, {"node-name": "tq", "drv": "qcow2", "ro": false, "file": "json:{\"backing\": {\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/cliexp/base.qcow2\"}}, \"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/cliexp/top.qcow2\"}}", "dirty-bitmaps": [{"name": "cp0", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0}]}, {"node-name": "tf", "drv": "file", "ro": false, "file": "/tmp/cliexp/top.qcow2"}, {"node-name": "bq", "drv": "qcow2", "ro": true, "file": "/tmp/cliexp/base.qcow2"}, {"node-name": "bf", "drv": "file", "ro": true, "file": "/tmp/cliexp/base.qcow2"}]"#;

    // The same daemon while a push backup of `tq` into `xq` runs: the job put a
    // copy-before-write filter (`#block089`) between the raw view and `tq`, and the target's
    // nodes are its `target` child.
    const QSD_BACKUP_GRAPH: &str = r##"{"nodes": [{"name": "#block089", "type": "block-driver", "id": 7}, {"name": "xq", "type": "block-driver", "id": 6}, {"name": "xf", "type": "block-driver", "id": 13}, {"name": "rr", "type": "block-driver", "id": 4}, {"name": "rf", "type": "block-driver", "id": 12}, {"name": "guest", "type": "block-driver", "id": 2}, {"name": "tq", "type": "block-driver", "id": 11}, {"name": "tf", "type": "block-driver", "id": 10}, {"name": "bq", "type": "block-driver", "id": 9}, {"name": "bf", "type": "block-driver", "id": 8}, {"name": "bk", "type": "block-job", "id": 5}, {"name": "", "type": "block-backend", "id": 3}, {"name": "", "type": "block-backend", "id": 1}], "edges": [{"parent": 7, "child": 11, "name": "file"}, {"parent": 7, "child": 6, "name": "target"}, {"parent": 6, "child": 13, "name": "file"}, {"parent": 4, "child": 12, "name": "file"}, {"parent": 2, "child": 7, "name": "file"}, {"parent": 11, "child": 10, "name": "file"}, {"parent": 11, "child": 9, "name": "backing"}, {"parent": 9, "child": 8, "name": "file"}, {"parent": 5, "child": 7, "name": "main node"}, {"parent": 5, "child": 6, "name": "target"}, {"parent": 3, "child": 4, "name": "root"}, {"parent": 1, "child": 2, "name": "root"}]}"##;
    const QSD_BACKUP_NODES: &str = r##"[{"node-name": "#block089", "drv": "copy-before-write", "ro": false, "file": "json:{}"}, {"node-name": "xq", "drv": "qcow2", "ro": false, "file": "/tmp/cliexp/tgt.qcow2"}, {"node-name": "xf", "drv": "file", "ro": false, "file": "/tmp/cliexp/tgt.qcow2"}, {"node-name": "rr", "drv": "raw", "ro": false, "file": "/tmp/cliexp/r.raw"}, {"node-name": "rf", "drv": "file", "ro": false, "file": "/tmp/cliexp/r.raw"}, {"node-name": "guest", "drv": "raw", "ro": false, "file": "json:{}"}, {"node-name": "tq", "drv": "qcow2", "ro": false, "file": "json:{}"}, {"node-name": "tf", "drv": "file", "ro": false, "file": "/tmp/cliexp/top.qcow2"}, {"node-name": "bq", "drv": "qcow2", "ro": true, "file": "/tmp/cliexp/base.qcow2"}, {"node-name": "bf", "drv": "file", "ro": true, "file": "/tmp/cliexp/base.qcow2"}]"##;

    /// The disks discovery finds in that daemon, as [`summary`] writes them.
    const QSD_DISKS: [&str; 2] = [
        "vda tq:qcow2:/tmp/cliexp/top.qcow2 > bq:qcow2:/tmp/cliexp/base.qcow2",
        "vdb rr:raw:/tmp/cliexp/r.raw",
    ];

    fn qsd_replies() -> Replies {
        Replies {
            block: parse("[]"),
            exports: parse(QSD_EXPORTS),
            nodes: parse(QSD_NODES),
            graph: parse(QSD_GRAPH),
        }
    }

    #[test]
    fn daemon_exports_are_disks_with_their_backing_chain_below_a_raw_view() {
        let disks = discover_disks(&qsd_replies()).unwrap();
        assert_eq!(summary(&disks), QSD_DISKS);
        assert!(
            disks[0]
                .layers
                .iter()
                .all(|l| l.storage == StorageType::File)
        );
    }

    #[test]
    fn a_running_backup_filter_is_passed_through_and_its_target_is_no_disk() {
        let replies = Replies {
            graph: parse(QSD_BACKUP_GRAPH),
            nodes: parse(QSD_BACKUP_NODES),
            ..qsd_replies()
        };
        assert_eq!(summary(&discover_disks(&replies).unwrap()), QSD_DISKS);
    }

    #[test]
    fn without_devices_or_exports_every_root_node_is_a_disk_and_children_are_not() {
        let replies = Replies {
            exports: parse("[]"),
            ..qsd_replies()
        };
        // `guest` and `rr` are the only nodes nobody uses; `tq` is under `guest`, so the raw
        // view and the image it shows are one disk.
        assert_eq!(summary(&discover_disks(&replies).unwrap()), QSD_DISKS);
    }

    #[test]
    fn two_exports_of_one_image_are_one_disk() {
        let mut replies = qsd_replies();
        replies.exports = json!([
            {"node-name": "tq", "shutting-down": false, "type": "nbd", "id": "direct"},
            {"node-name": "guest", "shutting-down": false, "type": "nbd", "id": "view"},
            {"node-name": "rr", "shutting-down": true, "type": "nbd", "id": "going"},
        ]);
        let disks = discover_disks(&replies).unwrap();
        assert_eq!(summary(&disks), QSD_DISKS[..1]);
    }

    /// `query-block` and `query-named-block-nodes` as recorded between libvirt 11.3 and QEMU
    /// 10.0.2 (two virtio disks on -blockdev nodes); the graph reply is written to match that
    /// node list (the trace has none).
    fn qemu_system_replies() -> Replies {
        let trace = include_str!("../../testdata/traces/libvirt-11.3/domain-start.jsonl");
        let reply_to = |command: &str| {
            let mut lines = trace.lines().map(parse);
            let id = lines
                .find(|l| l["dir"] == "send" && l["msg"]["execute"] == command)
                .map(|l| l["msg"]["id"].clone())
                .expect("command recorded");
            lines
                .find(|l| l["dir"] == "recv" && l["msg"]["id"] == id)
                .map(|l| l["msg"]["return"].clone())
                .expect("reply recorded")
        };
        let graph = json!({
            "nodes": [
                {"id": 1, "type": "block-backend", "name": ""},
                {"id": 2, "type": "block-driver", "name": "libvirt-2-format"},
                {"id": 3, "type": "block-driver", "name": "libvirt-2-storage"},
                {"id": 4, "type": "block-backend", "name": ""},
                {"id": 5, "type": "block-driver", "name": "libvirt-1-format"},
                {"id": 6, "type": "block-driver", "name": "libvirt-1-storage"},
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root"},
                {"parent": 2, "child": 3, "name": "file"},
                {"parent": 4, "child": 5, "name": "root"},
                {"parent": 5, "child": 6, "name": "file"},
            ],
        });
        Replies {
            block: reply_to("query-block"),
            exports: json!([]),
            nodes: reply_to("query-named-block-nodes"),
            graph,
        }
    }

    #[test]
    fn guest_devices_are_disks_in_device_order_named_as_libvirt_would() {
        let def = discover_domain("lab1", &qemu_system_replies()).unwrap();
        assert_eq!(def.name, "lab1");
        assert_eq!(
            summary(&def.disks),
            [
                "vda libvirt-2-format:qcow2:/srv/lab/images/lab1-vda.qcow2",
                "vdb libvirt-1-format:qcow2:/srv/lab/images/lab1-vdb.qcow2",
            ]
        );
    }

    #[test]
    fn devices_win_over_exports_and_an_empty_drive_is_left_out() {
        let mut replies = qemu_system_replies();
        replies.exports = json!([{"node-name": "libvirt-1-format", "id": "pull-vdb"}]);
        let block = replies.block.as_array_mut().unwrap();
        block.push(json!({"device": "cd0", "qdev": "", "removable": true, "locked": false}));
        block[1]["qdev"] = json!("");
        block[1]["device"] = json!("drive-vdb");
        let disks = discover_disks(&replies).unwrap();
        let names: Vec<&str> = disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(names, ["vda", "vdb"]);
    }

    #[test]
    fn valid_qemu_names_are_kept_and_the_others_get_the_first_free_vd_names() {
        assert!(is_target_name("vda") && is_target_name("xvdb") && is_target_name("sd_1"));
        assert!(!is_target_name("vd") && !is_target_name("disk0") && !is_target_name("vd-a"));
        assert_eq!(vd_name(0), "vda");
        assert_eq!(vd_name(25), "vdz");
        assert_eq!(vd_name(26), "vdaa");
        assert_eq!(vd_name(27), "vdab");
        let mut replies = qsd_replies();
        replies.exports = json!([
            {"node-name": "rr", "id": "zz"},
            {"node-name": "guest", "id": "vda"},
        ]);
        let names: Vec<String> = discover_disks(&replies)
            .unwrap()
            .into_iter()
            .map(|d| d.target)
            .collect();
        assert_eq!(names, ["vda", "vdb"]);
    }

    #[test]
    fn a_backing_loop_is_an_error_not_a_hang() {
        let replies = Replies {
            block: json!([]),
            exports: json!([{"node-name": "a", "id": "d"}]),
            nodes: json!([
                {"node-name": "a", "drv": "qcow2", "file": "/a"},
                {"node-name": "b", "drv": "qcow2", "file": "/b"},
            ]),
            graph: json!({
                "nodes": [
                    {"id": 1, "type": "block-driver", "name": "a"},
                    {"id": 2, "type": "block-driver", "name": "b"},
                ],
                "edges": [
                    {"parent": 1, "child": 2, "name": "backing"},
                    {"parent": 2, "child": 1, "name": "backing"},
                ],
            }),
        };
        assert!(matches!(
            discover_disks(&replies),
            Err(DiscoverError::ChainTooLong { target }) if target == "d"
        ));
    }

    #[test]
    fn replies_of_the_wrong_shape_and_unknown_nodes_are_typed_errors() {
        let mut replies = qsd_replies();
        replies.nodes = json!({"not": "a list"});
        assert!(matches!(
            discover_disks(&replies),
            Err(DiscoverError::Malformed {
                command: "query-named-block-nodes",
                ..
            })
        ));
        let mut replies = qsd_replies();
        replies.exports = json!([{"node-name": "ghost", "id": "x"}]);
        assert!(matches!(
            discover_disks(&replies),
            Err(DiscoverError::UnknownNode { node, .. }) if node == "ghost"
        ));
    }
}
