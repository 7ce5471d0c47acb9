//! The block graph: nodes (file, host_device, qcow2, raw, copy-before-write, snapshot-access,
//! null-co), their children, reads and writes through the graph, and the `blockdev-*` commands
//! and node queries.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use serde_json::{Map, Value, json};

use crate::args::{Args, id_wellformed};
use crate::bitmap::{Bits, DirtyBitmap};
use crate::errors::QmpError;
use crate::image::{Cluster, FileContent, MAX_CHAIN_DEPTH};
use crate::qemu::{Fault, Qemu};

/// Longest node name QEMU accepts (31 bytes plus the terminator).
const MAX_NODE_NAME: usize = 31;
/// Granule of the copy-before-write bookkeeping of user-added filters.
pub(crate) const CBW_GRANULE: u64 = 65536;

/// A JSON object from its members. serde_json's map keeps members sorted, so the order given
/// here does not matter; collecting builds the map in one pass.
pub(crate) fn object<const N: usize>(members: [(&str, Value); N]) -> Map<String, Value> {
    members
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// `cache` of every node's information (not modelled: always the defaults).
static CACHE_INFO: LazyLock<Value> = LazyLock::new(|| {
    Value::Object(object([
        ("direct", false.into()),
        ("no-flush", false.into()),
        ("writeback", true.into()),
    ]))
});

/// `format-specific` of a protocol node over a host file.
static FILE_SPECIFIC: LazyLock<Value> = LazyLock::new(|| {
    Value::Object(object([
        ("data", Value::Object(Map::new())),
        ("type", "file".into()),
    ]))
});

/// What a node does.
#[derive(Debug, Clone)]
pub(crate) enum Driver {
    /// A protocol node over a host file (`file` or `host_device`).
    File {
        path: String,
    },
    Qcow2,
    /// A raw format node: a window of its `file` child.
    Raw {
        offset: u64,
    },
    /// A copy-before-write filter over `file`, copying old data into `target` before a write.
    /// `job` is set for the filter a backup job inserted; its copy set is the job's.
    CopyBeforeWrite {
        target: String,
        done: Bits,
        job: Option<String>,
    },
    /// The point-in-time view of the copy-before-write filter in `file`.
    SnapshotAccess,
    NullCo {
        size: u64,
    },
}

/// One block node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub name: String,
    pub seq: u64,
    pub drv: &'static str,
    pub driver: Driver,
    pub read_only: bool,
    pub file: Option<String>,
    pub backing: Option<String>,
    /// Children created inline (or opened from an image header); they go with this node.
    pub implicit: Vec<String>,
    /// Added by a top-level `blockdev-add` (only those may be deleted with `blockdev-del`).
    pub monitor_owned: bool,
    /// Dirty bitmaps, newest first (the order QEMU lists them in).
    pub bitmaps: Vec<DirtyBitmap>,
    /// Jobs that hold this node (op blockers).
    pub job_users: BTreeSet<String>,
    /// `discard`, `cache` and similar options accepted and echoed, not modelled.
    pub detect_zeroes: &'static str,
}

/// Block status of a run, as NBD `base:allocation` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alloc {
    Data,
    Zero,
    Hole,
}

/// Why a guest I/O failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// No device, export or node of that name.
    #[error("no device, export or node named '{0}'")]
    NotFound(String),
    /// The request goes past the end of the disk.
    #[error("request of {len} bytes at {offset} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The node is read-only.
    #[error("node '{0}' is read-only")]
    ReadOnly(String),
    /// The process is not running.
    #[error("QEMU is not running")]
    NotRunning,
}

const KNOWN_OPTIONS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "auto-read-only",
    "discard",
    "cache",
    "detect-zeroes",
    "force-share",
    "filename",
    "aio",
    "locking",
    "file",
    "backing",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "overlap-check",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "offset",
    "size",
    "target",
    "bitmap",
    "on-cbw-error",
    "cbw-timeout",
    "min-cluster-size",
    "read-zeroes",
    "aio-max-batch",
    "drop-cache",
];

impl Qemu {
    pub(crate) fn node(&self, name: &str) -> Option<&Node> {
        self.st.nodes.get(name)
    }

    pub(crate) fn node_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.st.nodes.get_mut(name)
    }

    /// `bdrv_lookup_bs(name, name)`: device names resolve to the device's node.
    pub(crate) fn lookup_device_or_node(&self, name: &str) -> Result<String, QmpError> {
        if let Some(d) = self
            .st
            .devices
            .iter()
            .find(|d| d.id == name || d.qdev == name)
        {
            return Ok(d.node.clone());
        }
        if self.st.nodes.contains_key(name) {
            return Ok(name.to_string());
        }
        Err(QmpError::device_or_node_not_found(name, name))
    }

    /// The path of the file under a format node, if its `file` child is a protocol node.
    pub(crate) fn image_path(&self, node: &str) -> Option<String> {
        let n = self.node(node)?;
        let file = self.node(n.file.as_deref()?)?;
        match &file.driver {
            Driver::File { path } => Some(path.clone()),
            _ => None,
        }
    }

    /// The file under a format node (what [`Qemu::image_path`] names), without copying its path.
    pub(crate) fn image_file(&self, node: &str) -> Option<&FileContent> {
        self.image_of(self.node(node)?)
    }

    /// The file under `n`, if its `file` child is a protocol node.
    fn image_of(&self, n: &Node) -> Option<&FileContent> {
        match &self.node(n.file.as_deref()?)?.driver {
            Driver::File { path } => self.fs.get(path),
            _ => None,
        }
    }

    /// The bottom file name QEMU reports for `n` (`file` in node info).
    fn filename_of<'a>(&'a self, n: &'a Node) -> &'a str {
        let mut n = n;
        for _ in 0..MAX_CHAIN_DEPTH {
            match &n.driver {
                Driver::File { path } => return path,
                Driver::NullCo { .. } => return "null-co://",
                _ => match n.file.as_deref().and_then(|f| self.node(f)) {
                    Some(f) => n = f,
                    None => break,
                },
            }
        }
        ""
    }

    /// Length of a node in bytes.
    pub(crate) fn node_size(&self, node: &str) -> u64 {
        self.node_size_depth(node, 0)
    }

    fn node_size_depth(&self, node: &str, depth: usize) -> u64 {
        match self.node(node) {
            Some(n) => self.size_of(n, depth),
            None => 0,
        }
    }

    /// Length of `n` in bytes (see [`Qemu::node_size`]).
    fn size_of(&self, n: &Node, depth: usize) -> u64 {
        if depth > MAX_CHAIN_DEPTH {
            return 0;
        }
        match &n.driver {
            Driver::File { path } => self.fs.get(path).map(FileContent::file_length).unwrap_or(0),
            Driver::Qcow2 => match self.image_of(n) {
                Some(FileContent::Qcow2(q)) => q.virtual_size,
                _ => 0,
            },
            Driver::Raw { offset } => n
                .file
                .as_deref()
                .map(|f| self.node_size_depth(f, depth + 1).saturating_sub(*offset))
                .unwrap_or(0),
            Driver::CopyBeforeWrite { .. } | Driver::SnapshotAccess => n
                .file
                .as_deref()
                .map(|f| self.node_size_depth(f, depth + 1))
                .unwrap_or(0),
            Driver::NullCo { size } => *size,
        }
    }

    /// Reads through the graph as a parent of `node` would.
    pub(crate) fn read_node(&self, node: &str, offset: u64, buf: &mut [u8]) {
        self.read_depth(node, offset, buf, 0)
    }

    fn read_depth(&self, node: &str, offset: u64, buf: &mut [u8], depth: usize) {
        let Some(n) = self.node(node) else {
            buf.fill(0);
            return;
        };
        if depth > MAX_CHAIN_DEPTH {
            buf.fill(0);
            return;
        }
        match &n.driver {
            Driver::File { path } => match self.fs.get(path) {
                Some(FileContent::Raw(r)) => {
                    buf.fill(0);
                    if offset < r.size {
                        let n = buf.len().min((r.size - offset) as usize);
                        r.data.read_with(offset, &mut buf[..n], |_, b| b.fill(0));
                    }
                }
                // The bytes of a qcow2 container are not modelled; nothing reads them.
                _ => buf.fill(0),
            },
            Driver::Qcow2 => {
                let Some(FileContent::Qcow2(q)) = self.image_file(node) else {
                    buf.fill(0);
                    return;
                };
                let backing = n.backing.clone();
                q.data.read_with(offset, buf, |off, b| match &backing {
                    Some(bk) => {
                        let size = self.node_size(bk);
                        b.fill(0);
                        if off < size {
                            let len = b.len().min((size - off) as usize);
                            self.read_depth(bk, off, &mut b[..len], depth + 1);
                        }
                    }
                    None => b.fill(0),
                });
            }
            Driver::Raw { offset: o } => match &n.file {
                Some(f) => self.read_depth(f, offset + o, buf, depth + 1),
                None => buf.fill(0),
            },
            Driver::CopyBeforeWrite { .. } => match &n.file {
                Some(f) => self.read_depth(f, offset, buf, depth + 1),
                None => buf.fill(0),
            },
            Driver::SnapshotAccess => {
                let Some(cbw) = n.file.as_deref().and_then(|f| self.node(f)) else {
                    buf.fill(0);
                    return;
                };
                let Driver::CopyBeforeWrite { target, done, .. } = &cbw.driver else {
                    buf.fill(0);
                    return;
                };
                let source = cbw.file.clone().unwrap_or_default();
                let mut pos = 0usize;
                while pos < buf.len() {
                    let off = offset + pos as u64;
                    let g = off / CBW_GRANULE;
                    let len = ((g + 1) * CBW_GRANULE - off).min((buf.len() - pos) as u64) as usize;
                    let from = if done.get(g) {
                        target.as_str()
                    } else {
                        source.as_str()
                    };
                    self.read_depth(from, off, &mut buf[pos..pos + len], depth + 1);
                    pos += len;
                }
            }
            Driver::NullCo { .. } => buf.fill(0),
        }
    }

    /// Allocation status at `offset` and where that run ends (within one cluster).
    pub(crate) fn alloc_status(&self, node: &str, offset: u64) -> (Alloc, u64) {
        self.alloc_depth(node, offset, 0)
    }

    fn alloc_depth(&self, node: &str, offset: u64, depth: usize) -> (Alloc, u64) {
        let size = self.node_size(node);
        let Some(n) = self.node(node) else {
            return (Alloc::Hole, offset + 1);
        };
        if depth > MAX_CHAIN_DEPTH || offset >= size {
            return (Alloc::Hole, offset + 1);
        }
        match &n.driver {
            Driver::File { path } => match self.fs.get(path) {
                Some(FileContent::Raw(r)) => {
                    let cs = r.data.cluster_size();
                    let idx = offset / cs;
                    let end = ((idx + 1) * cs).min(size);
                    match r.data.get(idx) {
                        Some(Cluster::Data(_)) => (Alloc::Data, end),
                        Some(Cluster::Zero) => (Alloc::Zero, end),
                        None => (Alloc::Hole, end),
                    }
                }
                _ => (Alloc::Data, size),
            },
            Driver::Qcow2 => {
                let Some(FileContent::Qcow2(q)) = self.image_file(node) else {
                    return (Alloc::Hole, size);
                };
                let idx = offset / q.cluster_size;
                let end = ((idx + 1) * q.cluster_size).min(size);
                match q.data.get(idx) {
                    Some(Cluster::Data(_)) => (Alloc::Data, end),
                    Some(Cluster::Zero) => (Alloc::Zero, end),
                    None => match &n.backing {
                        Some(bk) if offset < self.node_size(bk) => {
                            let (a, e) = self.alloc_depth(bk, offset, depth + 1);
                            (a, e.min(end))
                        }
                        _ => (Alloc::Hole, end),
                    },
                }
            }
            Driver::Raw { offset: o } => match &n.file {
                Some(f) => {
                    let (a, e) = self.alloc_depth(f, offset + o, depth + 1);
                    (a, e.saturating_sub(*o).max(offset + 1))
                }
                None => (Alloc::Hole, size),
            },
            Driver::CopyBeforeWrite { .. } => match &n.file {
                Some(f) => self.alloc_depth(f, offset, depth + 1),
                None => (Alloc::Hole, size),
            },
            Driver::SnapshotAccess => {
                let Some(cbw) = n.file.as_deref().and_then(|f| self.node(f)) else {
                    return (Alloc::Hole, size);
                };
                let Driver::CopyBeforeWrite { target, done, .. } = &cbw.driver else {
                    return (Alloc::Hole, size);
                };
                let g = offset / CBW_GRANULE;
                let from = if done.get(g) {
                    target.clone()
                } else {
                    cbw.file.clone().unwrap_or_default()
                };
                let (a, e) = self.alloc_depth(&from, offset, depth + 1);
                (a, e.min((g + 1) * CBW_GRANULE))
            }
            Driver::NullCo { .. } => (Alloc::Zero, size),
        }
    }

    /// `qemu:allocation-depth` at `offset`: 0 if no image of the chain allocates it, else the
    /// 1-based depth of the image that does (filters add no depth), and where the run ends.
    pub(crate) fn allocation_depth(&self, node: &str, offset: u64) -> (u32, u64) {
        let size = self.node_size(node);
        let mut cur = node.to_string();
        let mut depth = 1u32;
        let mut end = size;
        for _ in 0..MAX_CHAIN_DEPTH {
            let Some(n) = self.node(&cur) else { break };
            match &n.driver {
                Driver::Qcow2 => {
                    let Some(FileContent::Qcow2(q)) = self.image_file(&cur) else {
                        break;
                    };
                    let idx = offset / q.cluster_size;
                    end = end.min((idx + 1) * q.cluster_size);
                    if q.data.get(idx).is_some() {
                        return (depth, end);
                    }
                    match &n.backing {
                        Some(b) if offset < self.node_size(b) => {
                            cur = b.clone();
                            depth += 1;
                        }
                        _ => break,
                    }
                }
                Driver::Raw { offset: 0 } | Driver::CopyBeforeWrite { .. } => match &n.file {
                    Some(f) => cur = f.clone(),
                    None => break,
                },
                _ => {
                    let (alloc, e) = self.alloc_status(&cur, offset);
                    return (if alloc == Alloc::Hole { 0 } else { depth }, e.min(end));
                }
            }
        }
        (0, end)
    }

    /// If the cluster at `offset` (of length `len`) of `node` is stored whole in some image of
    /// the chain with exactly that geometry, returns it without copying bytes.
    pub(crate) fn shared_cluster(
        &self,
        node: &str,
        offset: u64,
        len: u64,
    ) -> Option<Option<Cluster>> {
        let mut cur = node.to_string();
        for _ in 0..MAX_CHAIN_DEPTH {
            let n = self.node(&cur)?;
            match &n.driver {
                Driver::Qcow2 => {
                    let Some(FileContent::Qcow2(q)) = self.image_file(&cur) else {
                        return None;
                    };
                    if q.cluster_size != len || !offset.is_multiple_of(len) {
                        return None;
                    }
                    match q.data.get(offset / len) {
                        Some(c) => return Some(Some(c.clone())),
                        None => match &n.backing {
                            Some(b) if self.node_size(b) >= offset + len => cur = b.clone(),
                            Some(_) => return None,
                            None => return Some(None),
                        },
                    }
                }
                Driver::CopyBeforeWrite { .. } | Driver::Raw { offset: 0 } => {
                    cur = n.file.clone()?
                }
                _ => return None,
            }
        }
        None
    }

    /// Writes as a parent of `node` would: every node on the way marks its recording bitmaps,
    /// copy-before-write filters copy old data out first.
    pub(crate) fn write_node(
        &mut self,
        node: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), IoError> {
        self.write_depth(node, offset, data, 0)
    }

    fn write_depth(
        &mut self,
        node: &str,
        offset: u64,
        data: &[u8],
        depth: usize,
    ) -> Result<(), IoError> {
        if depth > MAX_CHAIN_DEPTH {
            return Err(IoError::NotFound(node.to_string()));
        }
        let len = data.len() as u64;
        let n = self
            .node_mut(node)
            .ok_or_else(|| IoError::NotFound(node.to_string()))?;
        for bm in n.bitmaps.iter_mut() {
            bm.mark(offset, len);
        }
        let driver = n.driver.clone();
        let file = n.file.clone();
        let backing = n.backing.clone();
        match driver {
            Driver::File { path } => {
                if let Some(FileContent::Raw(r)) = self.fs.get_mut(&path) {
                    if offset + len > r.size {
                        r.size = offset + len;
                    }
                    r.data.write_with(offset, data, |_, b| b.fill(0));
                }
                Ok(())
            }
            Driver::Qcow2 => {
                let path = self
                    .image_path(node)
                    .ok_or_else(|| IoError::NotFound(node.to_string()))?;
                let cs = match self.fs.get(&path) {
                    Some(FileContent::Qcow2(q)) => q.cluster_size,
                    _ => return Err(IoError::NotFound(node.to_string())),
                };
                // Copy-on-write needs the old content of partial, unallocated clusters at both
                // ends, from the backing chain (without one they read as zeroes).
                let mut edge: Vec<(u64, Vec<u8>)> = Vec::new();
                let unallocated = |q: &Self, idx: u64| match q.fs.get(&path) {
                    Some(FileContent::Qcow2(img)) => img.data.get(idx).is_none(),
                    _ => false,
                };
                for idx in [offset / cs, (offset + len).saturating_sub(1) / cs] {
                    let whole = idx * cs >= offset && (idx + 1) * cs <= offset + len;
                    if backing.is_none()
                        || whole
                        || !unallocated(self, idx)
                        || edge.iter().any(|(i, _)| *i == idx)
                    {
                        continue;
                    }
                    let mut b = vec![0u8; cs as usize];
                    if let Some(bk) = &backing {
                        let size = self.node_size(bk);
                        let start = idx * cs;
                        if start < size {
                            let n = (cs.min(size - start)) as usize;
                            self.read_node(bk, start, &mut b[..n]);
                        }
                    }
                    edge.push((idx, b));
                }
                if let Some(FileContent::Qcow2(q)) = self.fs.get_mut(&path) {
                    q.data.write_with(offset, data, |idx, b| {
                        if let Some((_, e)) = edge.iter().find(|(i, _)| *i == idx) {
                            b.copy_from_slice(e);
                        }
                    });
                }
                Ok(())
            }
            Driver::Raw { offset: o } => match file {
                Some(f) => self.write_depth(&f, offset + o, data, depth + 1),
                None => Ok(()),
            },
            Driver::CopyBeforeWrite { job, .. } => {
                match job {
                    Some(job_id) => self.backup_before_write(&job_id, offset, len),
                    None => self.user_cbw_before_write(node, offset, len),
                }
                match file {
                    Some(f) => self.write_depth(&f, offset, data, depth + 1),
                    None => Ok(()),
                }
            }
            Driver::SnapshotAccess => Err(IoError::ReadOnly(node.to_string())),
            Driver::NullCo { .. } => Ok(()),
        }
    }

    /// Copies granules about to be overwritten into a user-added filter's target.
    fn user_cbw_before_write(&mut self, filter: &str, offset: u64, len: u64) {
        let Some(n) = self.node(filter) else { return };
        let Driver::CopyBeforeWrite { target, done, .. } = &n.driver else {
            return;
        };
        let target = target.clone();
        let source = n.file.clone().unwrap_or_default();
        let size = self.node_size(&source);
        let mut todo = Vec::new();
        let last = (offset + len).div_ceil(CBW_GRANULE);
        for g in offset / CBW_GRANULE..last {
            if !done.get(g) && g * CBW_GRANULE < size {
                todo.push(g);
            }
        }
        for g in todo {
            let start = g * CBW_GRANULE;
            let n = CBW_GRANULE.min(size - start);
            self.copy_range(&source, &target, start, n, true);
            if let Some(Node {
                driver: Driver::CopyBeforeWrite { done, .. },
                ..
            }) = self.node_mut(filter)
            {
                done.set(g);
            }
        }
    }

    /// Copies `[start, start+len)` from `source` to `target` as block-copy does: data as data,
    /// zeroes as zero clusters when `explicit_zero` (otherwise left unallocated).
    pub(crate) fn copy_range(
        &mut self,
        source: &str,
        target: &str,
        start: u64,
        len: u64,
        explicit_zero: bool,
    ) {
        let target_path = self.image_path(target);
        let target_cs = match target_path.as_deref().and_then(|p| self.fs.get(p)) {
            Some(FileContent::Qcow2(q)) => Some(q.cluster_size),
            _ => None,
        };
        let target_is_plain_qcow2 =
            matches!(self.node(target).map(|n| &n.driver), Some(Driver::Qcow2));
        if let (Some(cs), Some(path), true) =
            (target_cs, target_path.as_deref(), target_is_plain_qcow2)
            && cs == len
            && start.is_multiple_of(cs)
            && let Some(found) = self.shared_cluster(source, start, len)
        {
            let cluster = match found {
                Some(Cluster::Data(d)) => Some(Cluster::Data(Arc::clone(&d))),
                Some(Cluster::Zero) | None => explicit_zero.then_some(Cluster::Zero),
            };
            if let Some(t) = self.node_mut(target) {
                for bm in t.bitmaps.iter_mut() {
                    bm.mark(start, len);
                }
            }
            if let Some(FileContent::Qcow2(q)) = self.fs.get_mut(path) {
                match cluster {
                    Some(c) => q.data.set(start / cs, c),
                    None => q.data.remove(start / cs),
                }
            }
            return;
        }
        let (alloc, _) = self.alloc_status(source, start);
        let mut buf = vec![0u8; len as usize];
        self.read_node(source, start, &mut buf);
        if alloc != Alloc::Data && !explicit_zero && buf.iter().all(|b| *b == 0) {
            // A zero range may stay unallocated, unless the target holds older data there.
            let mut old = vec![0u8; len as usize];
            self.read_node(target, start, &mut old);
            if old.iter().all(|b| *b == 0) {
                return;
            }
        }
        let _ = self.write_node(target, start, &buf);
    }

    // ----- commands -----

    pub(crate) fn cmd_blockdev_add(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        let name = match a.opt_str("node-name")? {
            Some(n) => n.to_string(),
            None => {
                return Err(QmpError::generic(
                    "'node-name' must be specified for the root node",
                ));
            }
        };
        let mut created = Vec::new();
        match self.open_node(a, Some(name), true, &mut created) {
            Ok(_) => Ok(json!({})),
            Err(e) => {
                // What was opened is closed again, cleanly: loaded bitmaps lose `in-use`.
                for n in created.iter().rev() {
                    self.store_bitmaps(n);
                    self.st.nodes.remove(n);
                }
                Err(e)
            }
        }
    }

    /// Opens one node from its options (recursing into inline children); records every node it
    /// creates in `created` so a failure can undo them.
    fn open_node(
        &mut self,
        a: &Args<'_>,
        name: Option<String>,
        monitor_owned: bool,
        created: &mut Vec<String>,
    ) -> Result<String, QmpError> {
        a.only(KNOWN_OPTIONS)?;
        let drv = a.str("driver")?;
        let name = match name.or(a.opt_str("node-name")?.map(str::to_string)) {
            Some(n) => {
                if n.len() > MAX_NODE_NAME {
                    return Err(QmpError::node_name_too_long());
                }
                // Only QEMU itself names nodes `#block...` (legacy `-drive` disks).
                let generated = self.opening_drive && n.starts_with("#block");
                if !id_wellformed(&n) && !generated {
                    return Err(QmpError::invalid_node_name(&n));
                }
                if self.st.nodes.contains_key(&n) {
                    return Err(QmpError::duplicate_node(&n));
                }
                if self.st.devices.iter().any(|d| d.id == n) {
                    return Err(QmpError::generic(format!(
                        "node-name={n} is conflicting with a device id"
                    )));
                }
                n
            }
            None => self.st.anon_node_name(),
        };
        let read_only = a.bool_or("read-only", false)?;
        let detect_zeroes = match a.opt_enum("detect-zeroes", &["off", "on", "unmap"])? {
            Some("on") => "on",
            Some("unmap") => "unmap",
            _ => "off",
        };
        let mut implicit = Vec::new();
        let (drv_static, driver, file, backing): (
            &'static str,
            Driver,
            Option<String>,
            Option<String>,
        ) = match drv {
            "file" | "host_device" => {
                let path = a.str("filename")?;
                if !self.fs.exists(path) {
                    return Err(QmpError::could_not_open(path));
                }
                let d: &'static str = if drv == "file" { "file" } else { "host_device" };
                (
                    d,
                    Driver::File {
                        path: path.to_string(),
                    },
                    None,
                    None,
                )
            }
            "qcow2" => {
                let file = self.open_child(a, "file", created, &mut implicit)?;
                let path = match self.node(&file).map(|n| &n.driver) {
                    Some(Driver::File { path }) => path.clone(),
                    _ => return Err(QmpError::not_qcow2()),
                };
                let header_backing = match self.fs.get(&path) {
                    Some(FileContent::Qcow2(q)) => q.backing_file.clone(),
                    _ => return Err(QmpError::not_qcow2()),
                };
                let backing = match a.raw("backing") {
                    Some(Value::Null) => None,
                    Some(_) => Some(self.open_child(a, "backing", created, &mut implicit)?),
                    None => match header_backing {
                        Some(bpath) => Some(self.open_backing_from_header(
                            &bpath,
                            created,
                            &mut implicit,
                            0,
                        )?),
                        None => None,
                    },
                };
                ("qcow2", Driver::Qcow2, Some(file), backing)
            }
            "raw" => {
                let file = self.open_child(a, "file", created, &mut implicit)?;
                (
                    "raw",
                    Driver::Raw {
                        offset: a.opt_u64("offset")?.unwrap_or(0),
                    },
                    Some(file),
                    None,
                )
            }
            "copy-before-write" => {
                let file = self.open_child(a, "file", created, &mut implicit)?;
                let target = self.open_child(a, "target", created, &mut implicit)?;
                let size = self.node_size(&file);
                let done = Bits::new(size.div_ceil(CBW_GRANULE));
                (
                    "copy-before-write",
                    Driver::CopyBeforeWrite {
                        target,
                        done,
                        job: None,
                    },
                    Some(file),
                    None,
                )
            }
            "snapshot-access" => {
                let file = self.open_child(a, "file", created, &mut implicit)?;
                let is_cbw = matches!(
                    self.node(&file).map(|n| &n.driver),
                    Some(Driver::CopyBeforeWrite { job: None, .. })
                );
                if !is_cbw {
                    return Err(QmpError::generic(
                        "snapshot-access can only be used with a copy-before-write filter",
                    ));
                }
                // The snapshot makes the filter unshare writes on its source: any other
                // writer of the source is a permission conflict.
                let source = self
                    .node(&file)
                    .and_then(|n| n.file.clone())
                    .unwrap_or_default();
                if let Some(writer) = self.writers_of(&source, &file).into_iter().next() {
                    return Err(QmpError::permission_conflict(
                        &source, &writer, &file, "file",
                    ));
                }
                ("snapshot-access", Driver::SnapshotAccess, Some(file), None)
            }
            "null-co" => (
                "null-co",
                Driver::NullCo {
                    size: a.opt_u64("size")?.unwrap_or(1 << 30),
                },
                None,
                None,
            ),
            other => {
                return Err(QmpError::invalid_enum_value(
                    &format!("{}driver", a.prefix()),
                    other,
                ));
            }
        };
        let seq = self.st.next_node_seq;
        self.st.next_node_seq += 1;
        self.st.nodes.insert(
            name.clone(),
            Node {
                name: name.clone(),
                seq,
                drv: drv_static,
                driver,
                read_only,
                file,
                backing,
                implicit,
                monitor_owned,
                bitmaps: Vec::new(),
                job_users: BTreeSet::new(),
                detect_zeroes,
            },
        );
        created.push(name.clone());
        if drv_static == "qcow2" {
            self.load_bitmaps(&name);
        }
        Ok(name)
    }

    /// A child given as a node-name reference or as inline options.
    fn open_child(
        &mut self,
        a: &Args<'_>,
        key: &str,
        created: &mut Vec<String>,
        implicit: &mut Vec<String>,
    ) -> Result<String, QmpError> {
        match a.raw(key) {
            None => Err(QmpError::missing_parameter(&format!("{}{key}", a.prefix()))),
            Some(Value::String(r)) => {
                if self.st.nodes.contains_key(r) {
                    Ok(r.clone())
                } else {
                    Err(QmpError::device_or_node_not_found(r, r))
                }
            }
            Some(Value::Object(_)) => {
                let sub = a.sub(key)?;
                let child = self.open_node(&sub, None, false, created)?;
                implicit.push(child.clone());
                Ok(child)
            }
            Some(_) => Err(QmpError::invalid_parameter_type(
                &format!("{}{key}", a.prefix()),
                "BlockdevRef",
            )),
        }
    }

    /// Opens an image and its backing chain as `-drive` does: generated node names, the top
    /// layer writable, the backing layers read-only. Returns the top format node.
    pub(crate) fn open_drive(&mut self, path: &str) -> Result<String, QmpError> {
        let mut created = Vec::new();
        let mut implicit = Vec::new();
        let top = self.open_backing_from_header(path, &mut created, &mut implicit, 0)?;
        if let Some(n) = self.node_mut(&top) {
            n.read_only = false;
        }
        Ok(top)
    }

    /// Opens the backing chain an image header names (read-only, implicit nodes).
    fn open_backing_from_header(
        &mut self,
        path: &str,
        created: &mut Vec<String>,
        implicit: &mut Vec<String>,
        depth: usize,
    ) -> Result<String, QmpError> {
        if depth > MAX_CHAIN_DEPTH {
            return Err(QmpError::generic("Backing chain too deep"));
        }
        let content = self
            .fs
            .get(path)
            .ok_or_else(|| QmpError::could_not_open_backing(path))?;
        let header_backing = match content {
            FileContent::Qcow2(q) => Some(q.backing_file.clone()),
            FileContent::Raw(_) => None,
        };
        let file_name = self.st.anon_node_name();
        self.insert_simple(
            &file_name,
            "file",
            Driver::File {
                path: path.to_string(),
            },
            None,
            None,
            Vec::new(),
        );
        created.push(file_name.clone());
        let fmt_name = self.st.anon_node_name();
        let (drv, driver, backing, mut kids) = match header_backing {
            Some(next) => {
                let mut kids = vec![file_name.clone()];
                let backing = match next {
                    Some(p) => {
                        Some(self.open_backing_from_header(&p, created, &mut kids, depth + 1)?)
                    }
                    None => None,
                };
                ("qcow2", Driver::Qcow2, backing, kids)
            }
            None => (
                "raw",
                Driver::Raw { offset: 0 },
                None,
                vec![file_name.clone()],
            ),
        };
        kids.dedup();
        self.insert_simple(&fmt_name, drv, driver, Some(file_name), backing, kids);
        if let Some(n) = self.node_mut(&fmt_name) {
            n.read_only = true;
        }
        created.push(fmt_name.clone());
        if drv == "qcow2" {
            self.load_bitmaps(&fmt_name);
        }
        implicit.push(fmt_name.clone());
        Ok(fmt_name)
    }

    fn insert_simple(
        &mut self,
        name: &str,
        drv: &'static str,
        driver: Driver,
        file: Option<String>,
        backing: Option<String>,
        implicit: Vec<String>,
    ) {
        let seq = self.st.next_node_seq;
        self.st.next_node_seq += 1;
        self.st.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                seq,
                drv,
                driver,
                read_only: false,
                file,
                backing,
                implicit,
                monitor_owned: false,
                bitmaps: Vec::new(),
                job_users: BTreeSet::new(),
                detect_zeroes: "off",
            },
        );
    }

    /// Who writes to `node` other than through `except`: texts as QEMU names them in
    /// permission conflicts.
    pub(crate) fn writers_of(&self, node: &str, except: &str) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.st.devices {
            if d.node == node {
                out.push(format!(
                    "block device '{}' (uses node '{node}' as 'root' child)",
                    d.qdev
                ));
            }
        }
        for e in self.st.exports.values() {
            if e.node == node && e.writable {
                out.push(format!(
                    "an unnamed block device (uses node '{node}' as 'root' child)"
                ));
            }
        }
        for n in self.st.nodes.values() {
            if n.name != except && n.file.as_deref() == Some(node) && self.has_writer(&n.name, 0) {
                out.push(format!(
                    "node '{}' (uses node '{node}' as 'file' child)",
                    n.name
                ));
            }
        }
        out
    }

    fn has_writer(&self, node: &str, depth: usize) -> bool {
        if depth > MAX_CHAIN_DEPTH {
            return false;
        }
        self.st.devices.iter().any(|d| d.node == node)
            || self
                .st
                .exports
                .values()
                .any(|e| e.node == node && e.writable)
            || self
                .st
                .nodes
                .values()
                .any(|n| n.file.as_deref() == Some(node) && self.has_writer(&n.name, depth + 1))
    }

    /// Parent links of `node` among nodes (file, backing, filter target).
    pub(crate) fn node_parents(&self, node: &str) -> Vec<String> {
        self.st
            .nodes
            .values()
            .filter(|n| {
                n.file.as_deref() == Some(node)
                    || n.backing.as_deref() == Some(node)
                    || matches!(&n.driver, Driver::CopyBeforeWrite { target, .. } if target == node)
            })
            .map(|n| n.name.clone())
            .collect()
    }

    pub(crate) fn cmd_blockdev_del(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["node-name"])?;
        let name = a.str("node-name")?;
        let node = self
            .node(name)
            .ok_or_else(|| QmpError::node_name_not_found(name))?;
        // A device, an export and a running qcow2 creation (through the block backend it opens
        // on its file node) all attach a block backend: QEMU checks that first.
        if self.st.devices.iter().any(|d| d.node == name)
            || self.st.exports.values().any(|e| e.node == name)
            || self.st.jobs.values().any(|j| j.creating_on() == Some(name))
        {
            return Err(QmpError::node_in_use(name));
        }
        if !node.job_users.is_empty() {
            return Err(QmpError::node_busy_by_job(name, "backup"));
        }
        if !node.monitor_owned {
            return Err(QmpError::not_owned_by_monitor(name));
        }
        if !self.node_parents(name).is_empty() {
            return Err(QmpError::block_device_in_use(name));
        }
        self.close_node_tree(name);
        // A fault belongs to the node's instance (on real QEMU, a blkdebug layer under it): a
        // later node of the same name starts healthy.
        self.faults.retain(|f| match f {
            Fault::TargetIoError { node }
            | Fault::TargetNoSpace { node }
            | Fault::SourceIoError { node } => node != name,
            Fault::RefuseCommand { .. } => true,
        });
        Ok(json!({}))
    }

    /// Closes a node cleanly (storing its persistent bitmaps) and its implicit children that
    /// nothing else uses.
    pub(crate) fn close_node_tree(&mut self, name: &str) {
        self.store_bitmaps(name);
        if self.node(name).is_some_and(|n| n.drv == "qcow2")
            && let Some(path) = self.image_path(name)
        {
            self.st.unflushed_images.remove(&path);
        }
        let Some(node) = self.st.nodes.remove(name) else {
            return;
        };
        for child in node.implicit {
            if self.node(&child).is_some() && self.node_parents(&child).is_empty() {
                self.close_node_tree(&child);
            }
        }
    }

    pub(crate) fn cmd_blockdev_reopen(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["options"])?;
        let list = a.array("options")?;
        let mut plans = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let o = Args::new(Some(item), &format!("options[{i}]."))?;
            o.only(KNOWN_OPTIONS)?;
            let name = o.str("node-name")?;
            let node = self
                .node(name)
                .ok_or_else(|| QmpError::node_name_not_found(name))?;
            if o.str("driver")? != node.drv {
                return Err(QmpError::cannot_change_driver());
            }
            let file = match o.opt_str("file")? {
                Some(f) if !self.st.nodes.contains_key(f) => {
                    return Err(QmpError::device_or_node_not_found(f, f));
                }
                f => f.map(str::to_string),
            };
            let backing = match o.raw("backing") {
                Some(Value::Null) => Some(None),
                Some(Value::String(b)) if !self.st.nodes.contains_key(b) => {
                    return Err(QmpError::device_or_node_not_found(b, b));
                }
                Some(Value::String(b)) => Some(Some(b.clone())),
                _ => None,
            };
            plans.push((
                name.to_string(),
                o.bool_or("read-only", false)?,
                file,
                backing,
            ));
        }
        self.drain_running_jobs(1);
        for (name, read_only, file, backing) in plans {
            let was_ro = self.node(&name).map(|n| n.read_only).unwrap_or(false);
            if !was_ro && read_only {
                // Going read-only stores the persistent bitmaps, as a close would.
                self.store_bitmaps(&name);
            }
            if let Some(n) = self.node_mut(&name) {
                n.read_only = read_only;
                if let Some(f) = file {
                    n.file = Some(f);
                }
                if let Some(b) = backing {
                    n.backing = b;
                }
            }
            if was_ro && !read_only {
                self.reopen_bitmaps_rw(&name);
            }
        }
        Ok(json!({}))
    }

    // ----- queries -----

    /// `BlockDeviceInfo` of one node.
    pub(crate) fn node_info(&self, name: &str, flat: bool) -> Value {
        match self.node(name) {
            Some(n) => self.info_of(n, flat),
            None => Value::Null,
        }
    }

    /// `BlockDeviceInfo` of `n`.
    fn info_of(&self, n: &Node, flat: bool) -> Value {
        // Built member by member: `json!` and `v[key] = ...` cost a lookup and a temporary each,
        // and this reply is the simulator's most frequent (and largest) one. The node is looked
        // up once and its files are borrowed, not copied.
        let filename = self.filename_of(n);
        let img = self.image_of(n);
        // Members in key order: the map sorts them, and a sorted list costs one pass.
        let mut info = object([
            ("active", true.into()),
            ("backing_file_depth", 0.into()),
            ("bps", 0.into()),
            ("bps_rd", 0.into()),
            ("bps_wr", 0.into()),
            ("cache", CACHE_INFO.clone()),
            ("detect_zeroes", n.detect_zeroes.into()),
            ("drv", n.drv.into()),
            ("encrypted", false.into()),
            ("image", self.image_info(n, img, filename, flat)),
            ("iops", 0.into()),
            ("iops_rd", 0.into()),
            ("iops_wr", 0.into()),
            ("node-name", n.name.as_str().into()),
            ("ro", n.read_only.into()),
            ("write_threshold", 0.into()),
        ]);
        if let Some(FileContent::Qcow2(q)) = img
            && let Some(b) = &q.backing_file
        {
            info.insert("backing_file".to_owned(), b.as_str().into());
        }
        info.insert("file".to_owned(), filename.into());
        let bitmaps = self.bitmap_infos_of(n);
        if !bitmaps.is_empty() {
            info.insert("dirty-bitmaps".to_owned(), Value::Array(bitmaps));
        }
        Value::Object(info)
    }

    /// The `image` member of a node's information (`img` is the file under it, `filename` the
    /// node's bottom file).
    fn image_info(&self, n: &Node, img: Option<&FileContent>, filename: &str, flat: bool) -> Value {
        let actual = self
            .fs
            .get(filename)
            .map(FileContent::file_length)
            .unwrap_or(0)
            .div_ceil(4096)
            * 4096;
        let size = match (&n.driver, img) {
            (Driver::Qcow2, Some(FileContent::Qcow2(q))) => q.virtual_size,
            (Driver::Qcow2, _) => 0,
            _ => self.size_of(n, 0),
        };
        let mut image = object([
            ("actual-size", actual.into()),
            ("dirty-flag", false.into()),
            ("filename", filename.into()),
            ("format", n.drv.into()),
            ("virtual-size", size.into()),
        ]);
        let mut put = |k: &str, v: Value| {
            image.insert(k.to_owned(), v);
        };
        match &n.driver {
            Driver::Qcow2 => {
                if let Some(FileContent::Qcow2(q)) = img {
                    put("cluster-size", q.cluster_size.into());
                    put("format-specific", q.format_specific());
                    if let Some(b) = &q.backing_file {
                        put("backing-filename", b.as_str().into());
                        put("full-backing-filename", b.as_str().into());
                        if let Some(f) = &q.backing_format {
                            put("backing-filename-format", f.as_str().into());
                        }
                    }
                }
            }
            Driver::File { .. } => put("format-specific", FILE_SPECIFIC.clone()),
            Driver::CopyBeforeWrite { .. } => put("cluster-size", 65536.into()),
            _ => {}
        }
        if !flat && let Some(b) = &n.backing {
            let backing = match self.node(b) {
                Some(bn) => self.image_info(bn, self.image_of(bn), self.filename_of(bn), true),
                None => Value::Null,
            };
            put("backing-image", backing);
        }
        Value::Object(image)
    }

    pub(crate) fn cmd_query_named_block_nodes(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["flat"])?;
        let flat = a.bool_or("flat", false)?;
        let mut nodes: Vec<&Node> = self.st.nodes.values().collect();
        nodes.sort_by_key(|n| std::cmp::Reverse(n.seq));
        Ok(Value::Array(
            nodes.iter().map(|n| self.info_of(n, flat)).collect(),
        ))
    }

    pub(crate) fn cmd_query_block(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[])?;
        if self.config.flavor == crate::qemu::Flavor::StorageDaemon {
            return Ok(json!([]));
        }
        Ok(Value::Array(
            self.st
                .devices
                .iter()
                .map(|d| {
                    json!({"io-status": "ok", "device": d.backend, "locked": false, "removable": false,
                        "inserted": self.node_info(&d.node, false), "qdev": d.qdev, "type": "unknown"})
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::image::FileSystem;
    use crate::qemu::{Config, Qemu};
    use serde_json::json;

    fn qemu() -> Qemu {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/img/a.qcow2", 1 << 20, 65536, None);
        fs.create_qcow2("/img/b.qcow2", 1 << 20, 65536, Some("/img/a.qcow2"));
        fs.touch("/img/empty");
        Qemu::negotiated(fs, Config::default())
    }

    fn add(q: &mut Qemu, args: serde_json::Value) -> Result<serde_json::Value, crate::QmpError> {
        q.execute(0, &json!({"execute": "blockdev-add", "arguments": args}))
    }

    #[test]
    fn blockdev_add_refuses_duplicates_and_unknown_children() {
        let mut q = qemu();
        add(
            &mut q,
            json!({"driver": "file", "node-name": "a-file", "filename": "/img/a.qcow2"}),
        )
        .unwrap();
        let e = add(
            &mut q,
            json!({"driver": "file", "node-name": "a-file", "filename": "/img/a.qcow2"}),
        );
        assert_eq!(
            e.unwrap_err().desc,
            "Duplicate nodes with node-name='a-file'"
        );
        let e = add(
            &mut q,
            json!({"driver": "qcow2", "node-name": "a", "file": "nope"}),
        );
        assert_eq!(
            e.unwrap_err().desc,
            "Cannot find device='nope' nor node-name='nope'"
        );
        let e = add(
            &mut q,
            json!({"driver": "file", "node-name": "x", "filename": "/img/missing"}),
        );
        assert_eq!(
            e.unwrap_err().desc,
            "Could not open '/img/missing': No such file or directory"
        );
        let e = add(&mut q, json!({"driver": "qcow2", "file": "a-file"}));
        assert_eq!(
            e.unwrap_err().desc,
            "'node-name' must be specified for the root node"
        );
        let e = add(
            &mut q,
            json!({"driver": "file", "node-name": "9bad", "filename": "/img/a.qcow2"}),
        );
        assert_eq!(e.unwrap_err().desc, "Invalid node-name: '9bad'");
    }

    #[test]
    fn qcow2_over_a_file_without_an_image_is_refused() {
        let mut q = qemu();
        add(
            &mut q,
            json!({"driver": "file", "node-name": "e-file", "filename": "/img/empty"}),
        )
        .unwrap();
        let e = add(
            &mut q,
            json!({"driver": "qcow2", "node-name": "e", "file": "e-file"}),
        );
        assert_eq!(e.unwrap_err().desc, "Image is not in qcow2 format");
    }

    #[test]
    fn blockdev_del_refuses_nodes_in_use_and_deletes_inline_children() {
        let mut q = qemu();
        add(
            &mut q,
            json!({"driver": "file", "node-name": "a-file", "filename": "/img/a.qcow2"}),
        )
        .unwrap();
        add(
            &mut q,
            json!({"driver": "qcow2", "node-name": "a", "file": "a-file"}),
        )
        .unwrap();
        let del = |q: &mut Qemu, n: &str| {
            q.execute(
                0,
                &json!({"execute": "blockdev-del", "arguments": {"node-name": n}}),
            )
        };
        assert_eq!(
            del(&mut q, "a-file").unwrap_err().desc,
            "Block device a-file is in use"
        );
        q.add_device("vda", "a").unwrap();
        assert_eq!(del(&mut q, "a").unwrap_err().desc, "Node a is in use");
        assert_eq!(
            del(&mut q, "zzz").unwrap_err().desc,
            "Failed to find node with node-name='zzz'"
        );
        add(
            &mut q,
            json!({"driver": "qcow2", "node-name": "b", "backing": null,
            "file": {"driver": "file", "node-name": "b-file", "filename": "/img/b.qcow2"}}),
        )
        .unwrap();
        assert_eq!(
            del(&mut q, "b-file").unwrap_err().desc,
            "Node b-file is not owned by the monitor"
        );
        del(&mut q, "b").unwrap();
        assert_eq!(
            del(&mut q, "b-file").unwrap_err().desc,
            "Failed to find node with node-name='b-file'"
        );
    }

    #[test]
    fn omitted_backing_opens_the_header_chain_and_reads_fall_through() {
        let mut q = qemu();
        q.fs_mut()
            .write_image("/img/a.qcow2", 0, &[7; 100])
            .unwrap();
        add(
            &mut q,
            json!({"driver": "qcow2", "node-name": "b",
            "file": {"driver": "file", "filename": "/img/b.qcow2"}}),
        )
        .unwrap();
        let mut buf = [0u8; 4];
        q.read_node("b", 98, &mut buf);
        assert_eq!(buf, [7, 7, 0, 0]);
        let nodes = q
            .execute(
                0,
                &json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
            )
            .unwrap();
        assert_eq!(nodes.as_array().unwrap().len(), 4);
        assert_eq!(nodes[0]["node-name"], "b");
        assert_eq!(nodes[0]["backing_file"], "/img/a.qcow2");
    }

    #[test]
    fn reopen_checks_driver_and_node() {
        let mut q = qemu();
        add(&mut q, json!({"driver": "qcow2", "node-name": "a", "file": {"driver": "file", "filename": "/img/a.qcow2"}})).unwrap();
        let reopen = |q: &mut Qemu, o: serde_json::Value| {
            q.execute(
                0,
                &json!({"execute": "blockdev-reopen", "arguments": {"options": [o]}}),
            )
        };
        assert_eq!(
            reopen(&mut q, json!({"driver": "raw", "node-name": "a"}))
                .unwrap_err()
                .desc,
            "Cannot change the option 'driver'"
        );
        assert_eq!(
            reopen(&mut q, json!({"driver": "qcow2", "node-name": "q"}))
                .unwrap_err()
                .desc,
            "Failed to find node with node-name='q'"
        );
        reopen(
            &mut q,
            json!({"driver": "qcow2", "node-name": "a", "read-only": true}),
        )
        .unwrap();
        assert!(q.node("a").unwrap().read_only);
    }
}
