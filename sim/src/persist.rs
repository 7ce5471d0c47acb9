//! QEMU's persistence rules for dirty bitmaps in qcow2 images.
//!
//! - Opening a qcow2 node loads the stored bitmaps. Read-write: each is marked `in-use` in the
//!   image at once; one that was already `in-use` (left so by a crash) loads as inconsistent,
//!   disabled, with count 0. Read-only: loaded as readonly, the image is left alone.
//! - A persistent bitmap reaches the image only when the node closes cleanly (`blockdev-del`,
//!   `quit`) or is reopened read-only; then its bits and `auto` flag are written and `in-use`
//!   cleared. Inconsistent bitmaps stay in the image as they are.
//! - Removing a persistent bitmap deletes it from the image immediately.
//! - A crash loses everything in memory: new bitmaps never reach the image, loaded ones stay
//!   `in-use` and come back inconsistent.
//! - The same holds for a backup job's target: the clusters it writes reach the qcow2 image's
//!   metadata only when the target node closes cleanly, so a crash before that brings the
//!   image back to what it was before the job (`State::unflushed_images`).

use serde_json::{Value, json};

use crate::args::Args;
use crate::bitmap::DirtyBitmap;
use crate::errors::QmpError;
use crate::image::FileContent;
use crate::qcow2::StoredBitmap;
use crate::qemu::{Flavor, Qemu};

impl Qemu {
    /// Loads the image's stored bitmaps into a freshly opened qcow2 node.
    pub(crate) fn load_bitmaps(&mut self, node: &str) {
        let Some(path) = self.image_path(node) else {
            return;
        };
        let read_only = self.node(node).map(|n| n.read_only).unwrap_or(true);
        let size = self.node_size(node);
        let stored: Vec<(String, StoredBitmap)> = match self.fs.get(&path) {
            Some(FileContent::Qcow2(q)) => q
                .bitmaps
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            _ => return,
        };
        let mut loaded = Vec::new();
        for (name, sb) in &stored {
            let uid = self.st.bitmap_uid();
            let mut bm = DirtyBitmap::new(uid, Some(name.clone()), sb.granularity, size);
            bm.persistent = true;
            if sb.in_use {
                bm.inconsistent = true;
                bm.disabled = true;
            } else {
                bm.bits = sb.bits.clone();
                bm.disabled = !sb.auto;
            }
            bm.readonly = read_only;
            loaded.push(bm);
        }
        if !read_only && let Some(FileContent::Qcow2(q)) = self.fs.get_mut(&path) {
            for sb in q.bitmaps.values_mut() {
                sb.in_use = true;
            }
        }
        if let Some(n) = self.node_mut(node) {
            for bm in loaded {
                n.bitmaps.insert(0, bm);
            }
        }
    }

    /// Writes a node's persistent bitmaps into its image (clean close or read-only reopen).
    pub(crate) fn store_bitmaps(&mut self, node: &str) {
        let Some(n) = self.node(node) else { return };
        if n.drv != "qcow2" || n.read_only {
            return;
        }
        let Some(path) = self.image_path(node) else {
            return;
        };
        let to_store: Vec<(String, StoredBitmap)> = n
            .bitmaps
            .iter()
            .filter(|b| b.persistent && !b.inconsistent)
            .filter_map(|b| {
                Some((
                    b.name.clone()?,
                    StoredBitmap {
                        granularity: b.granularity,
                        auto: !b.disabled,
                        in_use: false,
                        bits: b.bits.clone(),
                    },
                ))
            })
            .collect();
        if let Some(FileContent::Qcow2(q)) = self.fs.get_mut(&path) {
            for (name, sb) in to_store {
                q.bitmaps.insert(name, sb);
            }
        }
    }

    /// A read-only node reopened read-write: its bitmaps become writable and `in-use`.
    pub(crate) fn reopen_bitmaps_rw(&mut self, node: &str) {
        if let Some(n) = self.node_mut(node) {
            for bm in n.bitmaps.iter_mut() {
                bm.readonly = false;
            }
        }
        if let Some(path) = self.image_path(node)
            && let Some(FileContent::Qcow2(q)) = self.fs.get_mut(&path)
        {
            for sb in q.bitmaps.values_mut() {
                sb.in_use = true;
            }
        }
    }

    /// Removes a persistent bitmap from its image right away (as `block-dirty-bitmap-remove`
    /// does).
    pub(crate) fn unstore_bitmap(&mut self, node: &str, name: &str) {
        if let Some(path) = self.image_path(node)
            && let Some(FileContent::Qcow2(q)) = self.fs.get_mut(&path)
        {
            q.bitmaps.remove(name);
        }
    }

    /// True if the node's image already stores a bitmap of this name.
    pub(crate) fn image_stores_bitmap(&self, node: &str, name: &str) -> bool {
        match self.image_path(node).and_then(|p| self.fs.get(&p)) {
            Some(FileContent::Qcow2(q)) => q.bitmaps.contains_key(name),
            _ => false,
        }
    }

    /// `quit`: cancels jobs, deletes exports, closes every node cleanly, ends the process.
    pub(crate) fn cmd_quit(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[])?;
        self.shutdown_cleanly();
        Ok(json!({}))
    }

    /// The clean end of the process, as `quit` does it.
    pub fn shutdown_cleanly(&mut self) {
        if !self.running {
            return;
        }
        if self.config.flavor == Flavor::System {
            self.emit(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            );
        }
        let ids: Vec<String> = self.st.jobs.keys().cloned().collect();
        for id in ids {
            self.release_job_resources(&id, false);
        }
        let mut exports: Vec<(u64, String)> = self
            .st
            .exports
            .values()
            .map(|e| (e.seq, e.id.clone()))
            .collect();
        exports.sort();
        for (_, id) in exports.into_iter().rev() {
            self.remove_export(&id);
        }
        self.st.devices.clear();
        // Parents close before children; the newest nodes are the parents.
        let mut nodes: Vec<(u64, String)> = self
            .st
            .nodes
            .values()
            .map(|n| (n.seq, n.name.clone()))
            .collect();
        nodes.sort();
        for (_, name) in nodes.into_iter().rev() {
            self.store_bitmaps(&name);
        }
        self.st = Default::default();
        self.running = false;
        self.negotiated = false;
    }
}

#[cfg(test)]
mod tests {
    use crate::image::FileSystem;
    use crate::qemu::{Config, Qemu};
    use serde_json::{Value, json};

    fn open(q: &mut Qemu) {
        q.execute(q.now_ms(), &json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "d-file", "filename": "/d.qcow2"}})).unwrap();
        q.execute(q.now_ms(), &json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "d", "file": "d-file"}})).unwrap();
    }

    fn bitmaps(q: &mut Qemu) -> Value {
        let nodes = q
            .execute(
                0,
                &json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
            )
            .unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "d")
            .unwrap()["dirty-bitmaps"]
            .clone()
    }

    fn setup() -> Qemu {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/d.qcow2", 4 << 20, 65536, None);
        let mut q = Qemu::negotiated(fs, Config::default());
        open(&mut q);
        q.execute(0, &json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "old", "persistent": true}})).unwrap();
        q.guest_write(0, "d", 0, &[1; 65536]).unwrap();
        q
    }

    #[test]
    fn a_new_persistent_bitmap_reaches_the_image_only_at_clean_close() {
        let mut q = setup();
        assert!(q.fs().stored_bitmaps("/d.qcow2").unwrap().is_empty());
        q.execute(0, &json!({"execute": "quit"})).unwrap();
        let stored = q.fs().stored_bitmaps("/d.qcow2").unwrap();
        assert_eq!(stored["old"].flags(), vec!["auto"]);
        q.restart();
        q.execute(0, &json!({"execute": "qmp_capabilities"}))
            .unwrap();
        open(&mut q);
        assert_eq!(
            q.fs().stored_bitmaps("/d.qcow2").unwrap()["old"].flags(),
            vec!["in-use", "auto"]
        );
        assert_eq!(
            bitmaps(&mut q),
            json!([{"name": "old", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 65536}])
        );
    }

    #[test]
    fn after_a_crash_loaded_bitmaps_are_inconsistent_and_new_ones_are_gone() {
        let mut q = setup();
        q.execute(0, &json!({"execute": "quit"})).unwrap();
        q.restart();
        q.execute(0, &json!({"execute": "qmp_capabilities"}))
            .unwrap();
        open(&mut q);
        q.execute(0, &json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "new", "persistent": true}})).unwrap();
        q.crash();
        assert!(q.execute(0, &json!({"execute": "query-jobs"})).is_err());
        q.restart();
        q.execute(0, &json!({"execute": "qmp_capabilities"}))
            .unwrap();
        open(&mut q);
        assert_eq!(
            bitmaps(&mut q),
            json!([{"name": "old", "recording": false, "persistent": true, "busy": false, "granularity": 65536, "count": 0, "inconsistent": true}])
        );
        // Only removal works; it deletes the bitmap from the image too.
        let e = q.execute(0, &json!({"execute": "block-dirty-bitmap-enable", "arguments": {"node": "d", "name": "old"}})).unwrap_err();
        assert_eq!(e.desc, "Bitmap 'old' is inconsistent and cannot be used");
        q.execute(0, &json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "d", "name": "old"}})).unwrap();
        assert!(q.fs().stored_bitmaps("/d.qcow2").unwrap().is_empty());
    }

    #[test]
    fn a_read_only_open_leaves_the_image_flags_alone() {
        let mut q = setup();
        q.execute(0, &json!({"execute": "quit"})).unwrap();
        q.restart();
        q.execute(0, &json!({"execute": "qmp_capabilities"}))
            .unwrap();
        q.execute(0, &json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "d", "read-only": true, "file": {"driver": "file", "filename": "/d.qcow2"}}})).unwrap();
        assert_eq!(
            q.fs().stored_bitmaps("/d.qcow2").unwrap()["old"].flags(),
            vec!["auto"]
        );
        let e = q.execute(0, &json!({"execute": "block-dirty-bitmap-clear", "arguments": {"node": "d", "name": "old"}})).unwrap_err();
        assert_eq!(e.desc, "Bitmap 'old' is readonly and cannot be modified");
    }

    #[test]
    fn blockdev_del_is_a_clean_close() {
        let mut q = setup();
        q.execute(
            0,
            &json!({"execute": "blockdev-del", "arguments": {"node-name": "d"}}),
        )
        .unwrap();
        assert_eq!(
            q.fs().stored_bitmaps("/d.qcow2").unwrap()["old"]
                .bits
                .count(),
            1
        );
    }
}
