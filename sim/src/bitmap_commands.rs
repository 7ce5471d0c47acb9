//! The `block-dirty-bitmap-*` commands, each returning the undo step a failed `transaction`
//! applies.

use serde_json::{Value, json};

use crate::args::Args;
use crate::bitmap::{
    Bits, CHECK_ALLOW_RO, CHECK_DEFAULT, CHECK_REMOVE, DirtyBitmap, default_granularity,
};
use crate::errors::QmpError;
use crate::image::FileContent;
use crate::node::{Driver, Node};
use crate::qcow2::StoredBitmap;
use crate::qemu::Qemu;

/// Longest bitmap name qcow2 stores.
const MAX_BITMAP_NAME: usize = 1023;

/// How to take back one bitmap action.
#[derive(Debug)]
pub(crate) enum Undo {
    Remove {
        node: String,
        uid: u64,
    },
    RestoreBits {
        node: String,
        uid: u64,
        bits: Bits,
    },
    RestoreDisabled {
        node: String,
        uid: u64,
        disabled: bool,
    },
    Reinsert {
        node: String,
        index: usize,
        bitmap: Box<DirtyBitmap>,
        stored: Option<StoredBitmap>,
    },
}

impl Qemu {
    /// Finds a named bitmap as `block_dirty_bitmap_lookup` does: returns (node, index).
    pub(crate) fn lookup_bitmap(
        &self,
        node: &str,
        name: &str,
    ) -> Result<(String, usize), QmpError> {
        let node_name = self
            .st
            .devices
            .iter()
            .find(|d| d.id == node)
            .map(|d| d.node.clone())
            .or_else(|| self.st.nodes.contains_key(node).then(|| node.to_string()))
            .ok_or_else(|| QmpError::node_not_found(node))?;
        let idx = self
            .node(&node_name)
            .and_then(|n| {
                n.bitmaps
                    .iter()
                    .position(|b| b.name.as_deref() == Some(name))
            })
            .ok_or_else(|| QmpError::bitmap_not_found(name))?;
        Ok((node_name, idx))
    }

    pub(crate) fn bitmap_by_uid_mut(&mut self, node: &str, uid: u64) -> Option<&mut DirtyBitmap> {
        self.node_mut(node)?
            .bitmaps
            .iter_mut()
            .find(|b| b.uid == uid)
    }

    pub(crate) fn bitmap_by_uid(&self, node: &str, uid: u64) -> Option<&DirtyBitmap> {
        self.node(node)?.bitmaps.iter().find(|b| b.uid == uid)
    }

    /// `BlockDirtyInfo` records of a node, newest first.
    pub(crate) fn bitmap_infos_of(&self, n: &Node) -> Vec<Value> {
        if let Driver::CopyBeforeWrite { job: Some(job), .. } = &n.driver {
            return self.filter_bitmap_infos(job);
        }
        n.bitmaps
            .iter()
            .map(|b| {
                let succ = b
                    .successor
                    .and_then(|s| n.bitmaps.iter().find(|x| x.uid == s))
                    .map(|s| !s.disabled);
                b.info(succ)
            })
            .collect()
    }

    pub(crate) fn bitmap_add(&mut self, a: &Args<'_>) -> Result<Undo, QmpError> {
        a.only(&["node", "name", "granularity", "persistent", "disabled"])?;
        let node_arg = a.str("node")?;
        let name = a.str("name")?;
        let granularity = a.opt_u64("granularity")?;
        let persistent = a.bool_or("persistent", false)?;
        let disabled = a.bool_or("disabled", false)?;
        if name.is_empty() {
            return Err(QmpError::bitmap_name_empty());
        }
        let node = self.lookup_device_or_node(node_arg)?;
        let cluster = match self.image_path(&node).and_then(|p| self.fs.get(&p)) {
            Some(FileContent::Qcow2(q)) => Some(q.cluster_size),
            _ => None,
        };
        let granularity = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => return Err(QmpError::bad_granularity()),
            Some(g) => g,
            None => default_granularity(cluster),
        };
        let n = self
            .node(&node)
            .ok_or_else(|| QmpError::node_not_found(&node))?;
        if persistent {
            if n.drv != "qcow2" {
                return Err(QmpError::cannot_store_bitmaps(&node));
            }
            if self.image_stores_bitmap(&node, name) {
                return Err(QmpError::bitmap_already_stored(name, &node));
            }
        }
        if n.bitmaps.iter().any(|b| b.name.as_deref() == Some(name)) {
            return Err(QmpError::bitmap_exists(name));
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(QmpError::bitmap_name_too_long(name));
        }
        let size = self.node_size(&node);
        let uid = self.st.bitmap_uid();
        let mut bm = DirtyBitmap::new(uid, Some(name.to_string()), granularity, size);
        bm.persistent = persistent;
        bm.disabled = disabled;
        if let Some(n) = self.node_mut(&node) {
            n.bitmaps.insert(0, bm);
        }
        Ok(Undo::Remove { node, uid })
    }

    pub(crate) fn bitmap_remove(&mut self, a: &Args<'_>) -> Result<Undo, QmpError> {
        a.only(&["node", "name"])?;
        let (node, idx) = self.lookup_bitmap(a.str("node")?, a.str("name")?)?;
        let bm = &self.node(&node).expect("looked up").bitmaps[idx];
        let (b, r, i) = CHECK_REMOVE;
        bm.check(b, r, i)?;
        let name = bm.display_name().to_string();
        let persistent = bm.persistent;
        let stored = match self.image_path(&node).and_then(|p| self.fs.get(&p)) {
            Some(FileContent::Qcow2(q)) if persistent => q.bitmaps.get(&name).cloned(),
            _ => None,
        };
        if persistent {
            self.unstore_bitmap(&node, &name);
        }
        let bitmap = self.node_mut(&node).expect("looked up").bitmaps.remove(idx);
        Ok(Undo::Reinsert {
            node,
            index: idx,
            bitmap: Box::new(bitmap),
            stored,
        })
    }

    pub(crate) fn bitmap_clear(&mut self, a: &Args<'_>) -> Result<Undo, QmpError> {
        a.only(&["node", "name"])?;
        let (node, idx) = self.lookup_bitmap(a.str("node")?, a.str("name")?)?;
        let bm = &mut self.node_mut(&node).expect("looked up").bitmaps[idx];
        let (b, r, i) = CHECK_DEFAULT;
        bm.check(b, r, i)?;
        let bits = bm.bits.clone();
        bm.bits.clear_all();
        Ok(Undo::RestoreBits {
            node,
            uid: bm.uid,
            bits,
        })
    }

    pub(crate) fn bitmap_set_enabled(
        &mut self,
        a: &Args<'_>,
        enable: bool,
    ) -> Result<Undo, QmpError> {
        a.only(&["node", "name"])?;
        let (node, idx) = self.lookup_bitmap(a.str("node")?, a.str("name")?)?;
        let bm = &mut self.node_mut(&node).expect("looked up").bitmaps[idx];
        let (b, r, i) = CHECK_ALLOW_RO;
        bm.check(b, r, i)?;
        let disabled = bm.disabled;
        bm.disabled = !enable;
        Ok(Undo::RestoreDisabled {
            node,
            uid: bm.uid,
            disabled,
        })
    }

    pub(crate) fn bitmap_merge(&mut self, a: &Args<'_>) -> Result<Undo, QmpError> {
        a.only(&["node", "target", "bitmaps"])?;
        let node_arg = a.str("node")?;
        let target = a.str("target")?;
        let sources = a.array("bitmaps")?;
        let (node, idx) = self.lookup_bitmap(node_arg, target)?;
        let dst = self.node(&node).expect("looked up").bitmaps[idx].clone();
        let (b, r, i) = CHECK_DEFAULT;
        dst.check(b, r, i)?;
        let mut acc = DirtyBitmap::new(0, None, dst.granularity, dst.size);
        for (k, item) in sources.iter().enumerate() {
            let src = match item {
                Value::String(name) => {
                    let n = self.node(&node).expect("looked up");
                    n.bitmaps
                        .iter()
                        .find(|b| b.name.as_deref() == Some(name.as_str()))
                        .ok_or_else(|| QmpError::bitmap_not_found(name))?
                }
                Value::Object(_) => {
                    let sub = Args::new(Some(item), &format!("bitmaps[{k}]."))?;
                    let (sn, si) = self.lookup_bitmap(sub.str("node")?, sub.str("name")?)?;
                    &self.node(&sn).expect("looked up").bitmaps[si]
                }
                _ => {
                    return Err(QmpError::invalid_parameter_type(
                        &format!("bitmaps[{k}]"),
                        "BlockDirtyBitmapOrStr",
                    ));
                }
            };
            if src.inconsistent {
                return Err(QmpError::bitmap_inconsistent(src.display_name()));
            }
            if src.size != dst.size {
                return Err(QmpError::bitmap_size_mismatch(dst.size, src.size));
            }
            acc.merge_from(src);
        }
        let bm = &mut self.node_mut(&node).expect("looked up").bitmaps[idx];
        let bits = bm.bits.clone();
        bm.bits.or_with(&acc.bits);
        Ok(Undo::RestoreBits {
            node,
            uid: bm.uid,
            bits,
        })
    }

    /// Applies one undo step (transactions roll back in reverse order).
    pub(crate) fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Remove { node, uid } => {
                if let Some(n) = self.node_mut(&node) {
                    n.bitmaps.retain(|b| b.uid != uid);
                }
            }
            Undo::RestoreBits { node, uid, bits } => {
                if let Some(b) = self.bitmap_by_uid_mut(&node, uid) {
                    b.bits = bits;
                }
            }
            Undo::RestoreDisabled {
                node,
                uid,
                disabled,
            } => {
                if let Some(b) = self.bitmap_by_uid_mut(&node, uid) {
                    b.disabled = disabled;
                }
            }
            Undo::Reinsert {
                node,
                index,
                bitmap,
                stored,
            } => {
                let name = bitmap.name.clone();
                if let Some(n) = self.node_mut(&node) {
                    let index = index.min(n.bitmaps.len());
                    n.bitmaps.insert(index, *bitmap);
                }
                if let (Some(sb), Some(name), Some(path)) = (stored, name, self.image_path(&node))
                    && let Some(FileContent::Qcow2(q)) = self.fs.get_mut(&path)
                {
                    q.bitmaps.insert(name, sb);
                }
            }
        }
    }

    pub(crate) fn cmd_bitmap_add(&mut self, a: &Args<'_>) -> Result<(), QmpError> {
        self.bitmap_add(a).map(drop)
    }
    pub(crate) fn cmd_bitmap_remove(&mut self, a: &Args<'_>) -> Result<(), QmpError> {
        self.bitmap_remove(a).map(drop)
    }
    pub(crate) fn cmd_bitmap_clear(&mut self, a: &Args<'_>) -> Result<(), QmpError> {
        self.bitmap_clear(a).map(drop)
    }
    pub(crate) fn cmd_bitmap_enable(&mut self, a: &Args<'_>, enable: bool) -> Result<(), QmpError> {
        self.bitmap_set_enabled(a, enable).map(drop)
    }
    pub(crate) fn cmd_bitmap_merge(&mut self, a: &Args<'_>) -> Result<(), QmpError> {
        self.bitmap_merge(a).map(drop)
    }
}

/// Convenience for tests and drivers: the `dirty-bitmaps` of one node in a
/// `query-named-block-nodes` reply.
pub fn bitmaps_of(nodes: &Value, node: &str) -> Value {
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .and_then(|n| n.get("dirty-bitmaps").cloned())
        .unwrap_or_else(|| json!([]))
}

#[cfg(test)]
mod tests {
    use super::bitmaps_of;
    use crate::image::FileSystem;
    use crate::qemu::{Config, Qemu};
    use serde_json::{Value, json};

    fn q() -> Qemu {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/d.qcow2", 64 << 20, 65536, None);
        fs.create_raw("/r.img", 1 << 20);
        let mut q = Qemu::negotiated(fs, Config::default());
        for c in [
            json!({"driver": "file", "node-name": "d-file", "filename": "/d.qcow2"}),
            json!({"driver": "qcow2", "node-name": "disk", "file": "d-file"}),
            json!({"driver": "raw", "node-name": "raw", "file": {"driver": "file", "filename": "/r.img"}}),
        ] {
            q.execute(0, &json!({"execute": "blockdev-add", "arguments": c}))
                .unwrap();
        }
        q
    }

    fn run(q: &mut Qemu, cmd: &str, args: Value) -> Result<Value, String> {
        q.execute(0, &json!({"execute": cmd, "arguments": args}))
            .map_err(|e| e.desc)
    }

    fn count(q: &mut Qemu, name: &str) -> u64 {
        let nodes = run(q, "query-named-block-nodes", json!({"flat": true})).unwrap();
        bitmaps_of(&nodes, "disk")
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()["count"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn add_refuses_bad_names_granularity_duplicates_and_unknown_nodes() {
        let mut q = q();
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": ""})
            )
            .unwrap_err(),
            "Bitmap name cannot be empty"
        );
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "nonode", "name": "a"})
            )
            .unwrap_err(),
            "Cannot find device='nonode' nor node-name='nonode'"
        );
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": "a", "granularity": 1000})
            )
            .unwrap_err(),
            "Granularity must be power of 2 and at least 512"
        );
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "chk1", "persistent": true}),
        )
        .unwrap();
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": "chk1"})
            )
            .unwrap_err(),
            "Bitmap already exists: chk1"
        );
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "raw", "name": "p", "persistent": true})
            )
            .unwrap_err(),
            "Can't store persistent bitmaps to raw: Operation not supported"
        );
        let long = "x".repeat(1024);
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": long})
            )
            .unwrap_err(),
            format!("Bitmap name is too long: {long}")
        );
    }

    #[test]
    fn adding_a_persistent_bitmap_whose_name_the_image_stores_is_refused() {
        let mut q = q();
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "c1", "persistent": true}),
        )
        .unwrap();
        run(&mut q, "blockdev-del", json!({"node-name": "disk"})).unwrap();
        run(
            &mut q,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "disk", "file": "d-file"}),
        )
        .unwrap();
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": "c1", "persistent": true})
            )
            .unwrap_err(),
            "Can't make bitmap 'c1' persistent in 'disk': Bitmap with the same name is already stored"
        );
    }

    #[test]
    fn lookups_by_node_and_name_use_qemu_texts() {
        let mut q = q();
        for cmd in [
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
        ] {
            assert_eq!(
                run(&mut q, cmd, json!({"node": "disk", "name": "nope"})).unwrap_err(),
                "Dirty bitmap 'nope' not found"
            );
            assert_eq!(
                run(&mut q, cmd, json!({"node": "nonode", "name": "nope"})).unwrap_err(),
                "Node 'nonode' not found"
            );
        }
    }

    #[test]
    fn every_write_marks_recording_bitmaps_and_disable_freezes_one() {
        let mut q = q();
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "a"}),
        )
        .unwrap();
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b"}),
        )
        .unwrap();
        q.guest_write(0, "disk", 0, &[1; 100]).unwrap();
        run(
            &mut q,
            "block-dirty-bitmap-disable",
            json!({"node": "disk", "name": "a"}),
        )
        .unwrap();
        q.guest_write(0, "disk", 10 << 20, &[1; 100]).unwrap();
        assert_eq!(count(&mut q, "a"), 65536);
        assert_eq!(count(&mut q, "b"), 131072);
        run(
            &mut q,
            "block-dirty-bitmap-enable",
            json!({"node": "disk", "name": "a"}),
        )
        .unwrap();
        q.guest_write(0, "disk", 20 << 20, &[1; 100]).unwrap();
        assert_eq!(count(&mut q, "a"), 131072);
        run(
            &mut q,
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "b"}),
        )
        .unwrap();
        assert_eq!(count(&mut q, "b"), 0);
    }

    #[test]
    fn merge_accepts_plain_names_and_node_name_pairs_and_keeps_target_on_failure() {
        let mut q = q();
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b"}),
        )
        .unwrap();
        q.guest_write(0, "disk", 0, &[1; 65536 * 3]).unwrap();
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "c"}),
        )
        .unwrap();
        q.guest_write(0, "disk", 1 << 20, &[1; 10]).unwrap();
        run(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "tmp", "disabled": true, "granularity": 131072}),
        )
        .unwrap();
        assert_eq!(
            run(
                &mut q,
                "block-dirty-bitmap-merge",
                json!({"node": "disk", "target": "tmp", "bitmaps": ["c", "nope"]})
            )
            .unwrap_err(),
            "Dirty bitmap 'nope' not found"
        );
        assert_eq!(count(&mut q, "tmp"), 0);
        run(&mut q, "block-dirty-bitmap-merge", json!({"node": "disk", "target": "tmp", "bitmaps": ["b", {"node": "disk", "name": "c"}]})).unwrap();
        assert_eq!(count(&mut q, "b"), 262144);
        assert_eq!(count(&mut q, "tmp"), 393216);
    }
}
