//! The NBD server, block exports, and the export views that implement
//! [`vbackup_core::export::ExportReader`] over the simulated graph.

use serde_json::{Value, json};
use vbackup_core::export::{ExportReader, Extent, STATE_DIRTY, STATE_HOLE, STATE_ZERO};

use crate::args::Args;
use crate::bitmap::CHECK_ALLOW_RO;
use crate::errors::QmpError;
use crate::image::{Cluster, MAX_CHAIN_DEPTH};
use crate::node::{Alloc, Driver};
use crate::qemu::Qemu;

/// Most extents one `block_status` call returns (the caller asks again from where they end).
const MAX_EXTENTS: usize = 4096;

/// The running NBD server.
#[derive(Debug, Clone)]
pub(crate) struct NbdServer {
    /// The `tls-creds` object the server uses, if any (it cannot be deleted meanwhile).
    pub tls_creds: Option<String>,
}

/// A bitmap an export carries.
#[derive(Debug, Clone)]
pub(crate) struct ExportBitmap {
    pub node: String,
    pub uid: u64,
    pub name: String,
}

/// One block export.
#[derive(Debug, Clone)]
pub(crate) struct Export {
    pub id: String,
    pub seq: u64,
    pub name: String,
    pub node: String,
    pub writable: bool,
    pub bitmaps: Vec<ExportBitmap>,
    /// Offers `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

/// Errors of an export view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// No export of that name.
    #[error("no NBD export named '{0}'")]
    UnknownExport(String),
    /// The export does not offer that meta context.
    #[error("export does not offer meta context '{0}'")]
    UnknownContext(String),
    /// A request past the end of the export.
    #[error("request at {offset}+{len} is beyond the export size {size}")]
    OutOfRange {
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// The export was deleted while the view was held.
    #[error("the export is gone")]
    Gone,
}

impl Qemu {
    pub(crate) fn cmd_nbd_server_start(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["addr", "tls-creds", "tls-authz", "max-connections"])?;
        let addr = a.sub("addr")?;
        let data = addr.sub("data")?;
        match addr.opt_enum("type", &["inet", "unix", "vsock", "fd"])? {
            Some("unix") => {
                data.str("path")?;
            }
            Some("inet") => {
                data.str("host")?;
                data.str("port")?;
            }
            Some(other) => {
                return Err(QmpError::unsupported(&format!(
                    "NBD address type '{other}'"
                )));
            }
            None => return Err(QmpError::missing_parameter("addr.type")),
        }
        if self.st.nbd.is_some() {
            return Err(QmpError::nbd_running());
        }
        let tls_creds = a.opt_str("tls-creds")?;
        if let Some(creds) = tls_creds
            && !self
                .st
                .objects
                .get(creds)
                .is_some_and(|t| t.starts_with("tls-creds"))
        {
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{creds}'"
            )));
        }
        self.st.nbd = Some(NbdServer {
            tls_creds: tls_creds.map(str::to_string),
        });
        Ok(json!({}))
    }

    pub(crate) fn cmd_nbd_server_stop(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[])?;
        if self.st.nbd.is_none() {
            return Err(QmpError::nbd_not_running());
        }
        let mut ids: Vec<(u64, String)> = self
            .st
            .exports
            .values()
            .map(|e| (e.seq, e.id.clone()))
            .collect();
        ids.sort();
        for (_, id) in ids.into_iter().rev() {
            self.remove_export(&id);
        }
        self.st.nbd = None;
        Ok(json!({}))
    }

    pub(crate) fn cmd_block_export_add(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[
            "type",
            "id",
            "node-name",
            "name",
            "description",
            "writable",
            "writethrough",
            "bitmaps",
            "allocation-depth",
            "iothread",
            "fixed-iothread",
        ])?;
        let ty = a
            .opt_enum("type", &["nbd", "vhost-user-blk", "fuse", "vduse-blk"])?
            .ok_or_else(|| QmpError::missing_parameter("type"))?;
        let id = a.str("id")?;
        let node_arg = a.str("node-name")?;
        let writable = a.bool_or("writable", false)?;
        let allocation_depth = a.bool_or("allocation-depth", false)?;
        if ty != "nbd" {
            return Err(QmpError::unsupported(&format!("export type '{ty}'")));
        }
        if !crate::args::id_wellformed(id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if self.st.exports.contains_key(id) {
            return Err(QmpError::export_id_in_use(id));
        }
        if !self.st.nodes.contains_key(node_arg) {
            return Err(QmpError::device_or_node_not_found("", node_arg));
        }
        // A backup filter above the node takes its place, as it took over every other parent.
        let node = self.current_top_of(node_arg);
        if self.st.nbd.is_none() {
            return Err(QmpError::nbd_not_running());
        }
        let name = a.opt_str("name")?.unwrap_or(node_arg).to_string();
        if self.st.exports.values().any(|e| e.name == name) {
            return Err(QmpError::export_name_in_use(&name));
        }
        if writable {
            for n in self.st.nodes.values() {
                if let (Driver::SnapshotAccess, Some(cbw)) = (&n.driver, n.file.as_deref())
                    && self.node(cbw).and_then(|c| c.file.as_deref()) == Some(node.as_str())
                {
                    let writer =
                        format!("an unnamed block device (uses node '{node}' as 'root' child)");
                    return Err(QmpError::permission_conflict(&node, &writer, cbw, "file"));
                }
            }
        }
        let node_writable = !self.node(&node).is_some_and(|n| n.read_only);
        let mut bitmaps = Vec::new();
        for (k, item) in a
            .opt_array("bitmaps")?
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let (bnode, uid, bname) = match item {
                Value::String(bname) => {
                    let (bnode, uid) = self
                        .find_bitmap_in_chain(node_arg, bname)
                        .ok_or_else(|| QmpError::export_bitmap_not_found(bname))?;
                    (bnode, uid, bname.clone())
                }
                Value::Object(_) => {
                    let sub = Args::new(Some(item), &format!("bitmaps[{k}]."))?;
                    let bname = sub.str("name")?;
                    let (bnode, idx) = self.lookup_bitmap(sub.str("node")?, bname)?;
                    let uid = self.node(&bnode).expect("looked up").bitmaps[idx].uid;
                    (bnode, uid, bname.to_string())
                }
                _ => {
                    return Err(QmpError::invalid_parameter_type(
                        &format!("bitmaps[{k}]"),
                        "BlockDirtyBitmapOrStr",
                    ));
                }
            };
            let bm = self.bitmap_by_uid(&bnode, uid).expect("found");
            let (b, r, i) = CHECK_ALLOW_RO;
            bm.check(b, r, i)?;
            if !writable && node_writable && !bm.disabled {
                return Err(QmpError::export_enabled_bitmap(&bname));
            }
            bitmaps.push(crate::nbd::ExportBitmap {
                node: bnode,
                uid,
                name: bname,
            });
        }
        for eb in &bitmaps {
            if let Some(bm) = self.bitmap_by_uid_mut(&eb.node, eb.uid) {
                bm.export_users += 1;
            }
        }
        self.drain_running_jobs(1);
        self.st.next_export_seq += 1;
        let seq = self.st.next_export_seq;
        self.st.exports.insert(
            id.to_string(),
            Export {
                id: id.to_string(),
                seq,
                name,
                node,
                writable,
                bitmaps,
                allocation_depth,
            },
        );
        Ok(json!({}))
    }

    /// The node a new parent of `node` attaches to: a backup filter above it, if any.
    pub(crate) fn current_top_of(&self, node: &str) -> String {
        self.st
            .nodes
            .values()
            .find(|n| {
                matches!(n.driver, Driver::CopyBeforeWrite { job: Some(_), .. })
                    && n.file.as_deref() == Some(node)
            })
            .map(|n| n.name.clone())
            .unwrap_or_else(|| node.to_string())
    }

    /// A bitmap by name on `node` or down its backing chain (through filters): (node, uid).
    fn find_bitmap_in_chain(&self, node: &str, name: &str) -> Option<(String, u64)> {
        let mut cur = Some(node.to_string());
        for _ in 0..MAX_CHAIN_DEPTH {
            let n = self.node(cur.as_deref()?)?;
            if let Some(b) = n.bitmaps.iter().find(|b| b.name.as_deref() == Some(name)) {
                return Some((n.name.clone(), b.uid));
            }
            cur = match n.driver {
                Driver::Qcow2 => n.backing.clone(),
                Driver::CopyBeforeWrite { .. } | Driver::Raw { .. } => n.file.clone(),
                _ => None,
            };
        }
        None
    }

    pub(crate) fn cmd_block_export_del(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["id", "mode"])?;
        let id = a.str("id")?;
        a.opt_enum("mode", &["safe", "hard"])?;
        if !self.st.exports.contains_key(id) {
            return Err(QmpError::export_not_found(id));
        }
        self.drain_running_jobs(3);
        self.remove_export(id);
        Ok(json!({}))
    }

    pub(crate) fn remove_export(&mut self, id: &str) {
        let Some(e) = self.st.exports.remove(id) else {
            return;
        };
        for eb in &e.bitmaps {
            if let Some(bm) = self.bitmap_by_uid_mut(&eb.node, eb.uid) {
                bm.export_users = bm.export_users.saturating_sub(1);
            }
        }
        self.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    }

    pub(crate) fn cmd_query_block_exports(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[])?;
        let mut list: Vec<&Export> = self.st.exports.values().collect();
        list.sort_by_key(|e| e.seq);
        Ok(Value::Array(
            list.iter()
                .map(|e| json!({"node-name": e.node, "shutting-down": false, "type": "nbd", "id": e.id}))
                .collect(),
        ))
    }

    /// A reader over the NBD export called `name` (the NBD export name, not the export id).
    pub fn export_reader(&self, name: &str) -> Result<ExportView<'_>, ExportError> {
        let e = self
            .st
            .exports
            .values()
            .find(|e| e.name == name)
            .ok_or_else(|| ExportError::UnknownExport(name.to_string()))?;
        Ok(ExportView {
            qemu: self,
            id: e.id.clone(),
        })
    }

    /// Writes through a writable NBD export, as an NBD client would.
    pub fn export_write(
        &mut self,
        now_ms: u64,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), crate::node::IoError> {
        let e = self
            .st
            .exports
            .values()
            .find(|e| e.name == name && e.writable);
        let Some(e) = e else {
            return Err(crate::node::IoError::NotFound(name.to_string()));
        };
        let node = e.node.clone();
        self.guest_write(now_ms, &node, offset, data)
    }
}

/// A read-only view of one export at the moment of each call; it reads what an NBD client
/// would read (through the scratch image to its backing source, for a pull backup).
#[derive(Debug)]
pub struct ExportView<'a> {
    qemu: &'a Qemu,
    id: String,
}

impl ExportView<'_> {
    fn export(&self) -> Result<&Export, ExportError> {
        self.qemu.st.exports.get(&self.id).ok_or(ExportError::Gone)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ExportError::OutOfRange { offset, len, size });
        }
        Ok(())
    }
}

impl ExportView<'_> {
    /// What [`ExportReader::read_at`] of exactly `len` bytes at `offset` would return, without
    /// copying it, when one image of the chain under the export stores that range as a whole
    /// cluster of that size: `Some(Some(cluster))`, or `Some(None)` for zeroes nothing
    /// allocates. `None` when the range must be read byte by byte.
    pub fn shared_cluster(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Option<Cluster>>, ExportError> {
        self.check_range(offset, len)?;
        let node = &self.export()?.node;
        Ok(self.qemu.shared_cluster(node, offset, len))
    }
}

impl ExportReader for ExportView<'_> {
    type Error = ExportError;

    fn size(&self) -> u64 {
        self.export()
            .map(|e| self.qemu.node_size(&e.node))
            .unwrap_or(0)
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut out = vec!["base:allocation".to_string()];
        if let Ok(e) = self.export() {
            if e.allocation_depth {
                out.push("qemu:allocation-depth".to_string());
            }
            out.extend(
                e.bitmaps
                    .iter()
                    .map(|b| format!("qemu:dirty-bitmap:{}", b.name)),
            );
        }
        out
    }

    fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, ExportError> {
        let e = self.export()?.clone();
        let size = self.size();
        if offset > size {
            return Err(ExportError::OutOfRange {
                offset,
                len: length,
                size,
            });
        }
        let end = offset.saturating_add(length).min(size);
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |len: u64, flags: u32| match extents.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ => extents.push(Extent { length: len, flags }),
        };
        let mut off = offset;
        if context == "base:allocation" {
            while off < end {
                let (alloc, run_end) = self.qemu.alloc_status(&e.node, off);
                let run_end = run_end.clamp(off + 1, end);
                let flags = match alloc {
                    Alloc::Data => 0,
                    Alloc::Zero => STATE_ZERO,
                    Alloc::Hole => STATE_HOLE | STATE_ZERO,
                };
                push(run_end - off, flags);
                off = run_end;
            }
        } else if context == "qemu:allocation-depth" && e.allocation_depth {
            while off < end {
                let (depth, run_end) = self.qemu.allocation_depth(&e.node, off);
                let run_end = run_end.clamp(off + 1, end);
                push(run_end - off, depth);
                off = run_end;
            }
        } else if let Some(name) = context.strip_prefix("qemu:dirty-bitmap:") {
            let eb = e
                .bitmaps
                .iter()
                .find(|b| b.name == name)
                .ok_or_else(|| ExportError::UnknownContext(context.into()))?;
            let bm = self
                .qemu
                .bitmap_by_uid(&eb.node, eb.uid)
                .ok_or(ExportError::Gone)?;
            while off < end {
                let g = off / bm.granularity;
                let run_end = ((g + 1) * bm.granularity).min(end);
                push(run_end - off, if bm.bits.get(g) { STATE_DIRTY } else { 0 });
                off = run_end;
            }
        } else {
            return Err(ExportError::UnknownContext(context.to_string()));
        }
        extents.truncate(MAX_EXTENTS);
        Ok(extents)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.check_range(offset, buf.len() as u64)?;
        let node = self.export()?.node.clone();
        self.qemu.read_node(&node, offset, buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::FileSystem;
    use crate::qemu::Config;

    #[test]
    fn views_exist_only_for_exports_and_stop_when_it_is_gone() {
        let mut fs = FileSystem::new();
        fs.create_raw("/r", 1 << 20);
        let mut q = Qemu::negotiated(fs, Config::default());
        assert_eq!(
            q.export_reader("x").unwrap_err(),
            ExportError::UnknownExport("x".into())
        );
        for c in [
            json!({"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/r"}}}),
            json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/s"}}}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "r"}}),
        ] {
            q.execute(0, &c).unwrap();
        }
        let mut v = q.export_reader("r").unwrap();
        assert_eq!(v.size(), 1 << 20);
        assert_eq!(
            v.block_status("base:allocation", 0, 1 << 30).unwrap(),
            vec![Extent {
                length: 1 << 20,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        assert_eq!(
            v.block_status("qemu:allocation-depth", 0, 1).unwrap_err(),
            ExportError::UnknownContext("qemu:allocation-depth".into())
        );
        let mut buf = [0u8; 2];
        assert!(matches!(
            v.read_at((1 << 20) - 1, &mut buf),
            Err(ExportError::OutOfRange { .. })
        ));
    }

    #[test]
    fn tls_credentials_are_checked_and_kept_while_the_server_uses_them() {
        let mut q = Qemu::negotiated(FileSystem::new(), Config::default());
        let mut run = |c: Value| q.execute(0, &c).map_err(|e| e.desc);
        run(json!({"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/etc/pki", "endpoint": "server"}})).unwrap();
        assert_eq!(
            run(json!({"execute": "object-add", "arguments": {"qom-type": "secret", "id": "tls0", "data": "x"}})).unwrap_err(),
            "attempt to add duplicate property 'tls0' to object (type 'container')"
        );
        assert_eq!(
            run(json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/s"}}, "tls-creds": "nope"}})).unwrap_err(),
            "No TLS credentials with id 'nope'"
        );
        run(json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/s"}}, "tls-creds": "tls0"}})).unwrap();
        assert_eq!(
            run(json!({"execute": "object-del", "arguments": {"id": "tls0"}})).unwrap_err(),
            "object 'tls0' is in use, can not be deleted"
        );
        assert_eq!(
            run(json!({"execute": "object-del", "arguments": {"id": "x"}})).unwrap_err(),
            "object 'x' not found"
        );
        run(json!({"execute": "nbd-server-stop"})).unwrap();
        run(json!({"execute": "object-del", "arguments": {"id": "tls0"}})).unwrap();
    }
}
