//! The in-memory file system: path → file, where a file holds either raw bytes or a qcow2 image.
//! Data is sparse: only allocated clusters are stored, and cluster buffers are shared
//! (copy-on-write) so a backup that copies a cluster costs a reference count, not a memcpy.
//!
//! The offline tools here play the part of `qemu-img` on images no process has open: create,
//! write, rebase, bitmap inspection, and [`FileSystem::read_image`], the content checker that reads
//! an image through its backing chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::qcow2::{Qcow2Image, StoredBitmap};

/// Longest backing chain any walk follows; deeper chains are reported as an error.
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Cluster size of the sparse store behind raw files.
pub const RAW_CHUNK: u64 = 65536;
/// Size of an empty qcow2 file as `query-named-block-nodes` reports it for the file node.
const QCOW2_EMPTY_FILE_BYTES: u64 = 197_120;

/// One stored cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// Allocated with data (exactly one cluster long). A `Vec` behind the `Arc` lets a fresh
    /// cluster start from lazily zeroed memory, so a small write into it touches only its pages.
    Data(Arc<Vec<u8>>),
    /// Allocated and reading as zeroes (a qcow2 zero cluster).
    Zero,
}

/// Sparse clusters of one image, keyed by cluster index.
#[derive(Debug, Clone, Default)]
pub struct ClusterMap {
    cluster_size: u64,
    map: BTreeMap<u64, Cluster>,
}

impl ClusterMap {
    /// An empty map of clusters of `cluster_size` bytes.
    pub fn new(cluster_size: u64) -> Self {
        Self {
            cluster_size,
            map: BTreeMap::new(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The cluster at `idx`, if allocated.
    pub fn get(&self, idx: u64) -> Option<&Cluster> {
        self.map.get(&idx)
    }

    /// Stores a cluster.
    pub fn set(&mut self, idx: u64, cluster: Cluster) {
        self.map.insert(idx, cluster);
    }

    /// Deallocates a cluster.
    pub fn remove(&mut self, idx: u64) {
        self.map.remove(&idx);
    }

    /// Number of allocated clusters.
    pub fn allocated(&self) -> u64 {
        self.map.len() as u64
    }

    /// Allocated clusters in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Cluster)> {
        self.map.iter().map(|(k, v)| (*k, v))
    }

    /// Writes `data` at `offset`. A partial write into an unallocated cluster first asks
    /// `fill_unallocated(cluster_index, buf)` for the rest of the cluster (copy-on-write from the
    /// backing chain).
    pub fn write_with(
        &mut self,
        offset: u64,
        data: &[u8],
        mut fill_unallocated: impl FnMut(u64, &mut [u8]),
    ) {
        let cs = self.cluster_size as usize;
        // Zero clusters read as zeroes; only unallocated ones fall through to the backing.
        let first = offset / self.cluster_size;
        let last = (offset + data.len() as u64).div_ceil(self.cluster_size);
        let zero_before = |i: u64| matches!(self.map.get(&i), Some(Cluster::Zero));
        let was_zero = [first, last.saturating_sub(1)].map(|i| zero_before(i).then_some(i));
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let idx = off / self.cluster_size;
            let in_off = (off % self.cluster_size) as usize;
            let n = (cs - in_off).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            if in_off == 0 && n == cs {
                // A whole cluster nobody shares is overwritten in place (no allocation).
                let in_place = match self.map.get_mut(&idx) {
                    Some(Cluster::Data(d)) => Arc::get_mut(d)
                        .filter(|b| b.len() == cs)
                        .map(|b| b.copy_from_slice(chunk))
                        .is_some(),
                    _ => false,
                };
                if !in_place {
                    self.map
                        .insert(idx, Cluster::Data(Arc::new(chunk.to_vec())));
                }
            } else {
                // Partial write: modify the cluster in place when nobody shares it, otherwise
                // copy it once (clusters are shared with backups copied from this image).
                let slot = self.map.entry(idx).or_insert(Cluster::Zero);
                match slot {
                    Cluster::Data(d) => match Arc::get_mut(d) {
                        Some(buf) => buf[in_off..in_off + n].copy_from_slice(chunk),
                        None => {
                            // Assembled around the write: each byte is copied once.
                            let mut buf = Vec::with_capacity(d.len());
                            buf.extend_from_slice(&d[..in_off]);
                            buf.extend_from_slice(chunk);
                            buf.extend_from_slice(&d[in_off + n..]);
                            *d = Arc::new(buf);
                        }
                    },
                    Cluster::Zero => {
                        let mut buf = vec![0u8; cs];
                        if !was_zero.contains(&Some(idx)) {
                            fill_unallocated(idx, &mut buf);
                        }
                        buf[in_off..in_off + n].copy_from_slice(chunk);
                        *slot = Cluster::Data(Arc::new(buf));
                    }
                }
            }
            pos += n;
        }
    }

    /// Reads `buf.len()` bytes at `offset`; unallocated ranges are handed to
    /// `fallback(offset, buf)`.
    pub fn read_with(&self, offset: u64, buf: &mut [u8], fallback: impl FnMut(u64, &mut [u8])) {
        read_clusters(&self.map, self.cluster_size, offset, buf, fallback);
    }
}

/// Reads `buf.len()` bytes at `offset` from `clusters` of `cluster_size` bytes: data clusters
/// are copied, zero clusters read as zeroes, absent ones are handed to `fallback(offset, buf)`.
fn read_clusters(
    clusters: &BTreeMap<u64, Cluster>,
    cluster_size: u64,
    offset: u64,
    buf: &mut [u8],
    mut fallback: impl FnMut(u64, &mut [u8]),
) {
    let cs = cluster_size as usize;
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let idx = off / cluster_size;
        let in_off = (off % cluster_size) as usize;
        let n = (cs - in_off).min(buf.len() - pos);
        let out = &mut buf[pos..pos + n];
        match clusters.get(&idx) {
            Some(Cluster::Data(d)) => out.copy_from_slice(&d[in_off..in_off + n]),
            Some(Cluster::Zero) => out.fill(0),
            None => fallback(off, out),
        }
        pos += n;
    }
}

/// The bytes of a plain (raw) file.
#[derive(Debug, Clone)]
pub struct RawFile {
    /// File length in bytes.
    pub size: u64,
    /// Sparse content; holes read as zeroes.
    pub data: ClusterMap,
}

/// What a file holds.
#[derive(Debug, Clone)]
pub enum FileContent {
    /// Plain bytes (a raw image, or a file not yet formatted).
    Raw(RawFile),
    /// A qcow2 image.
    Qcow2(Qcow2Image),
}

impl FileContent {
    /// Length of the file itself (for qcow2: header plus allocated clusters).
    pub fn file_length(&self) -> u64 {
        match self {
            FileContent::Raw(r) => r.size,
            FileContent::Qcow2(q) => QCOW2_EMPTY_FILE_BYTES + q.data.allocated() * q.cluster_size,
        }
    }
}

/// The logical content of an image through its backing chain, as clusters: cheap to take
/// (cluster buffers are shared, not copied) and cheap to compare (shared buffers compare by
/// pointer). Absent clusters and zero clusters both read as zeroes and compare equal.
#[derive(Debug, Clone)]
pub struct LogicalImage {
    size: u64,
    cluster_size: u64,
    clusters: BTreeMap<u64, Cluster>,
}

impl LogicalImage {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset` (past the end reads zeroes).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        read_clusters(&self.clusters, self.cluster_size, offset, buf, |_, b| {
            b.fill(0)
        });
    }

    /// An image of `size` bytes made of `clusters` of `cluster_size` bytes (absent ones read
    /// as zeroes).
    pub(crate) fn from_clusters(
        size: u64,
        cluster_size: u64,
        clusters: BTreeMap<u64, Cluster>,
    ) -> Self {
        Self {
            size,
            cluster_size,
            clusters,
        }
    }

    /// `bytes` cut into clusters of `cluster_size` (all-zero ones left out).
    pub fn from_bytes(bytes: &[u8], cluster_size: u64) -> Self {
        let clusters = bytes
            .chunks(cluster_size as usize)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|b| *b != 0))
            .map(|(i, c)| {
                let mut v = c.to_vec();
                v.resize(cluster_size as usize, 0);
                (i as u64, Cluster::Data(Arc::new(v)))
            })
            .collect();
        Self {
            size: bytes.len() as u64,
            cluster_size,
            clusters,
        }
    }

    /// An image of `size` bytes: the clusters `top` allocates laid over `base` (nothing: zeroes),
    /// as a qcow2 image reads over its backing image. A base of another cluster size is cut
    /// again into `top`'s clusters.
    pub fn overlay(base: Option<&LogicalImage>, size: u64, top: &ClusterMap) -> Self {
        let cs = top.cluster_size();
        let mut clusters = match base {
            Some(b) if b.cluster_size == cs => b.clusters.clone(),
            Some(b) => LogicalImage::from_bytes(&b.to_bytes(), cs).clusters,
            None => BTreeMap::new(),
        };
        // Clusters past the end of a shorter backing image read as zeroes.
        let last = size.div_ceil(cs);
        clusters.retain(|k, _| *k < last);
        for (idx, c) in top.iter() {
            clusters.insert(idx, c.clone());
        }
        Self {
            size,
            cluster_size: cs,
            clusters,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The cluster at `idx`, if it holds anything.
    pub fn cluster(&self, idx: u64) -> Option<&Cluster> {
        self.clusters.get(&idx)
    }

    /// Stores a cluster (exactly one cluster long).
    pub(crate) fn set_cluster(&mut self, idx: u64, cluster: Cluster) {
        self.clusters.insert(idx, cluster);
    }

    /// The first byte offset at which `self` and `other` differ, if any (for reports).
    pub fn first_difference(&self, other: &LogicalImage) -> Option<u64> {
        if self == other {
            return None;
        }
        let (a, b) = (self.to_bytes(), other.to_bytes());
        let at = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        Some(at as u64)
    }

    /// The full content as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        for (idx, c) in &self.clusters {
            if let Cluster::Data(d) = c {
                let start = (idx * self.cluster_size) as usize;
                let n = d.len().min(out.len().saturating_sub(start));
                out[start..start + n].copy_from_slice(&d[..n]);
            }
        }
        out
    }

    /// The cluster holding bytes `offset..offset + cluster_size` when it is one of this image's
    /// (same geometry), shared; a cluster of zeroes is `None`. Another geometry is read out.
    pub(crate) fn cluster_at(&self, offset: u64, cluster_size: u64) -> Option<Cluster> {
        if cluster_size == self.cluster_size && offset.is_multiple_of(cluster_size) {
            return match self.clusters.get(&(offset / cluster_size)) {
                Some(Cluster::Data(d)) => Some(Cluster::Data(d.clone())),
                _ => None,
            };
        }
        let mut buf = vec![0u8; cluster_size as usize];
        self.read_at(offset, &mut buf);
        buf.iter()
            .any(|b| *b != 0)
            .then(|| Cluster::Data(Arc::new(buf)))
    }

    /// Whether two clusters read the same (absent and zero clusters read as zeroes).
    pub fn clusters_equal(a: Option<&Cluster>, b: Option<&Cluster>) -> bool {
        match (a, b) {
            (Some(Cluster::Data(a)), Some(Cluster::Data(b))) => Arc::ptr_eq(a, b) || a == b,
            (a, b) => Self::cluster_is_zero(a) && Self::cluster_is_zero(b),
        }
    }

    fn cluster_is_zero(c: Option<&Cluster>) -> bool {
        match c {
            None | Some(Cluster::Zero) => true,
            Some(Cluster::Data(d)) => d.iter().all(|b| *b == 0),
        }
    }
}

impl PartialEq for LogicalImage {
    fn eq(&self, other: &Self) -> bool {
        if self.size != other.size {
            return false;
        }
        if self.cluster_size != other.cluster_size {
            return self.to_bytes() == other.to_bytes();
        }
        let keys: std::collections::BTreeSet<u64> = self
            .clusters
            .keys()
            .chain(other.clusters.keys())
            .copied()
            .collect();
        keys.into_iter()
            .all(|k| Self::clusters_equal(self.clusters.get(&k), other.clusters.get(&k)))
    }
}

// Content equality is an equivalence: absent and zero clusters are the same zeroes.
impl Eq for LogicalImage {}

/// Errors of the offline image tools.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// No file at that path.
    #[error("Could not open '{0}': No such file or directory")]
    NotFound(String),
    /// The file holds no qcow2 image.
    #[error("'{0}' is not in qcow2 format")]
    NotQcow2(String),
    /// A backing chain deeper than [`MAX_CHAIN_DEPTH`] (or a loop).
    #[error("backing chain of '{0}' is too deep")]
    ChainTooDeep(String),
    /// A write past the end of the image.
    #[error("write of {len} bytes at {offset} is beyond the end of '{path}'")]
    OutOfRange {
        /// Image path.
        path: String,
        /// Offset of the write.
        offset: u64,
        /// Length of the write.
        len: u64,
    },
    /// No stored bitmap of that name.
    #[error("Dirty bitmap '{0}' not found")]
    BitmapNotFound(String),
}

/// All files of the simulated host, by absolute path.
#[derive(Debug, Clone, Default)]
pub struct FileSystem {
    files: BTreeMap<String, FileContent>,
}

impl FileSystem {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if a file exists at `path`.
    pub fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// The file at `path`.
    pub fn get(&self, path: &str) -> Option<&FileContent> {
        self.files.get(path)
    }

    pub(crate) fn get_mut(&mut self, path: &str) -> Option<&mut FileContent> {
        self.files.get_mut(path)
    }

    /// Stores (or replaces) a file.
    pub fn put(&mut self, path: &str, content: FileContent) {
        self.files.insert(path.to_string(), content);
    }

    /// Deletes a file; returns whether it existed.
    pub fn remove(&mut self, path: &str) -> bool {
        self.files.remove(path).is_some()
    }

    /// Paths of all files, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// Creates an empty file (what a management tool does before `blockdev-add driver=file`).
    pub fn touch(&mut self, path: &str) {
        self.files.entry(path.to_string()).or_insert_with(|| {
            FileContent::Raw(RawFile {
                size: 0,
                data: ClusterMap::new(RAW_CHUNK),
            })
        });
    }

    /// The host failed to write `path` out: what was written to it never reached storage (its
    /// data reads as zeroes, or from the backing file). Headers and bitmaps are kept.
    pub fn lose_unwritten_data(&mut self, path: &str) {
        match self.files.get_mut(path) {
            Some(FileContent::Qcow2(q)) => q.data = ClusterMap::new(q.cluster_size),
            Some(FileContent::Raw(r)) => r.data = ClusterMap::new(RAW_CHUNK),
            None => {}
        }
    }

    /// `qemu-img create -f raw PATH SIZE`.
    pub fn create_raw(&mut self, path: &str, size: u64) {
        self.put(
            path,
            FileContent::Raw(RawFile {
                size,
                data: ClusterMap::new(RAW_CHUNK),
            }),
        );
    }

    /// `qemu-img create -f qcow2 [-b BACKING -F qcow2] -o cluster_size=C PATH SIZE`.
    pub fn create_qcow2(
        &mut self,
        path: &str,
        size: u64,
        cluster_size: u64,
        backing: Option<&str>,
    ) {
        let mut img = Qcow2Image::new(size, cluster_size);
        if let Some(b) = backing {
            img.backing_file = Some(b.to_string());
            img.backing_format = self.get(b).map(|f| match f {
                FileContent::Raw(_) => "raw".to_string(),
                FileContent::Qcow2(_) => "qcow2".to_string(),
            });
        }
        self.put(path, FileContent::Qcow2(img));
    }

    /// Virtual size of the image at `path` (raw: the file length).
    pub fn virtual_size(&self, path: &str) -> Result<u64, ImageError> {
        match self
            .get(path)
            .ok_or_else(|| ImageError::NotFound(path.into()))?
        {
            FileContent::Raw(r) => Ok(r.size),
            FileContent::Qcow2(q) => Ok(q.virtual_size),
        }
    }

    /// `qemu-io -c 'write ...'` on an image nobody has open: writes guest data, with
    /// copy-on-write from the backing chain for partial clusters.
    pub fn write_image(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let size = self.virtual_size(path)?;
        if offset + data.len() as u64 > size {
            return Err(ImageError::OutOfRange {
                path: path.into(),
                offset,
                len: data.len() as u64,
            });
        }
        let backing = match self.get(path) {
            Some(FileContent::Qcow2(q)) => q.backing_file.clone(),
            _ => None,
        };
        let cs = match self.get(path) {
            Some(FileContent::Qcow2(q)) => q.cluster_size,
            _ => RAW_CHUNK,
        };
        // Only a cluster the write covers in part is filled from the backing chain: a write of
        // whole clusters needs no read of it.
        let partial =
            !offset.is_multiple_of(cs) || !(offset + data.len() as u64).is_multiple_of(cs);
        let base = match &backing {
            Some(b) if partial && self.exists(b) => Some(self.read_image(b)?),
            _ => None,
        };
        let fill = |idx: u64, buf: &mut [u8]| {
            if let Some(base) = &base {
                let start = (idx * cs) as usize;
                if start < base.len() {
                    let n = buf.len().min(base.len() - start);
                    buf[..n].copy_from_slice(&base[start..start + n]);
                }
            }
        };
        match self.get_mut(path) {
            Some(FileContent::Raw(r)) => r.data.write_with(offset, data, fill),
            Some(FileContent::Qcow2(q)) => q.data.write_with(offset, data, fill),
            None => return Err(ImageError::NotFound(path.into())),
        }
        Ok(())
    }

    /// `qemu-img rebase -u -b BACKING PATH`: rewrites the backing file name in the header only.
    pub fn rebase_unsafe(&mut self, path: &str, backing: Option<&str>) -> Result<(), ImageError> {
        match self.get_mut(path) {
            Some(FileContent::Qcow2(q)) => {
                q.backing_file = backing.map(str::to_string);
                q.backing_format = backing.map(|_| "qcow2".to_string());
                Ok(())
            }
            Some(FileContent::Raw(_)) => Err(ImageError::NotQcow2(path.into())),
            None => Err(ImageError::NotFound(path.into())),
        }
    }

    /// The bitmaps stored in a qcow2 image (what `qemu-img info` lists), by name.
    pub fn stored_bitmaps(
        &self,
        path: &str,
    ) -> Result<&BTreeMap<String, StoredBitmap>, ImageError> {
        match self.get(path) {
            Some(FileContent::Qcow2(q)) => Ok(&q.bitmaps),
            Some(FileContent::Raw(_)) => Err(ImageError::NotQcow2(path.into())),
            None => Err(ImageError::NotFound(path.into())),
        }
    }

    /// `qemu-img bitmap --remove PATH NAME`.
    pub fn remove_stored_bitmap(&mut self, path: &str, name: &str) -> Result<(), ImageError> {
        match self.get_mut(path) {
            Some(FileContent::Qcow2(q)) => q
                .bitmaps
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| ImageError::BitmapNotFound(name.into())),
            Some(FileContent::Raw(_)) => Err(ImageError::NotQcow2(path.into())),
            None => Err(ImageError::NotFound(path.into())),
        }
    }

    /// The full logical content of the image at `path`, read through the backing chain its
    /// header names (unallocated ranges of the bottom image read as zeroes).
    pub fn read_image(&self, path: &str) -> Result<Vec<u8>, ImageError> {
        self.read_image_depth(path, 0)
    }

    fn read_image_depth(&self, path: &str, depth: usize) -> Result<Vec<u8>, ImageError> {
        if depth > MAX_CHAIN_DEPTH {
            return Err(ImageError::ChainTooDeep(path.into()));
        }
        match self
            .get(path)
            .ok_or_else(|| ImageError::NotFound(path.into()))?
        {
            FileContent::Raw(r) => {
                let mut out = vec![0u8; r.size as usize];
                r.data.read_with(0, &mut out, |_, b| b.fill(0));
                Ok(out)
            }
            FileContent::Qcow2(q) => {
                let base = match &q.backing_file {
                    Some(b) => Some(self.read_image_depth(b, depth + 1)?),
                    None => None,
                };
                let mut out = vec![0u8; q.virtual_size as usize];
                q.data.read_with(0, &mut out, |off, b| match &base {
                    Some(base) if (off as usize) < base.len() => {
                        let n = b.len().min(base.len() - off as usize);
                        b[..n].copy_from_slice(&base[off as usize..off as usize + n]);
                        b[n..].fill(0);
                    }
                    _ => b.fill(0),
                });
                Ok(out)
            }
        }
    }

    /// The logical content of the image at `path` through the backing chain its header names,
    /// without copying data (see [`LogicalImage`]). Chains that mix cluster sizes are read
    /// byte by byte.
    pub fn logical_view(&self, path: &str) -> Result<LogicalImage, ImageError> {
        self.logical_depth(path, 0)
    }

    fn logical_depth(&self, path: &str, depth: usize) -> Result<LogicalImage, ImageError> {
        if depth > MAX_CHAIN_DEPTH {
            return Err(ImageError::ChainTooDeep(path.into()));
        }
        let (size, map, backing) = match self
            .get(path)
            .ok_or_else(|| ImageError::NotFound(path.into()))?
        {
            FileContent::Raw(r) => (r.size, &r.data, None),
            FileContent::Qcow2(q) => (q.virtual_size, &q.data, q.backing_file.as_deref()),
        };
        let base = match backing {
            Some(b) => Some(self.logical_depth(b, depth + 1)?),
            None => None,
        };
        Ok(LogicalImage::overlay(base.as_ref(), size, map))
    }

    /// Offsets (cluster-aligned) and lengths of the clusters allocated in the image itself,
    /// as `qemu-img map` shows with depth 0.
    pub fn allocated_ranges(&self, path: &str) -> Result<Vec<(u64, u64)>, ImageError> {
        let map = match self
            .get(path)
            .ok_or_else(|| ImageError::NotFound(path.into()))?
        {
            FileContent::Raw(r) => &r.data,
            FileContent::Qcow2(q) => &q.data,
        };
        let cs = map.cluster_size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (idx, _) in map.iter() {
            match out.last_mut() {
                Some((start, len)) if *start + *len == idx * cs => *len += cs,
                _ => out.push((idx * cs, cs)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_copy_the_rest_of_the_cluster_from_the_backing_image() {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/base.qcow2", 1 << 20, 65536, None);
        fs.write_image("/base.qcow2", 0, &[0xaa; 65536]).unwrap();
        fs.create_qcow2("/top.qcow2", 1 << 20, 65536, Some("/base.qcow2"));
        fs.write_image("/top.qcow2", 100, &[0xbb; 10]).unwrap();
        let top = fs.read_image("/top.qcow2").unwrap();
        assert_eq!(top[99], 0xaa);
        assert_eq!(&top[100..110], &[0xbb; 10]);
        assert_eq!(top[110], 0xaa);
        assert_eq!(top[65536], 0);
        assert_eq!(fs.allocated_ranges("/top.qcow2").unwrap(), vec![(0, 65536)]);
    }

    #[test]
    fn rebase_changes_what_shows_through() {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/a", 131072, 65536, None);
        fs.write_image("/a", 65536, &[1; 65536]).unwrap();
        fs.create_qcow2("/b", 131072, 65536, None);
        assert_eq!(fs.read_image("/b").unwrap()[65536], 0);
        fs.rebase_unsafe("/b", Some("/a")).unwrap();
        assert_eq!(fs.read_image("/b").unwrap()[65536], 1);
    }

    #[test]
    fn missing_files_and_chain_loops_are_errors() {
        let mut fs = FileSystem::new();
        assert_eq!(
            fs.read_image("/nope"),
            Err(ImageError::NotFound("/nope".into()))
        );
        fs.create_qcow2("/loop", 65536, 65536, None);
        fs.rebase_unsafe("/loop", Some("/loop")).unwrap();
        assert_eq!(
            fs.read_image("/loop"),
            Err(ImageError::ChainTooDeep("/loop".into()))
        );
        fs.create_raw("/r", 100);
        assert!(fs.write_image("/r", 90, &[0; 20]).is_err());
    }
}

#[cfg(test)]
mod logical_tests {
    use super::*;

    #[test]
    fn logical_views_compare_by_content_not_by_allocation() {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/a", 4 * 65536, 65536, None);
        fs.write_image("/a", 65536, &[3; 65536]).unwrap();
        fs.create_qcow2("/b", 4 * 65536, 65536, None);
        fs.write_image("/b", 0, &[0; 65536]).unwrap();
        fs.write_image("/b", 65536, &[3; 65536]).unwrap();
        let (a, b) = (
            fs.logical_view("/a").unwrap(),
            fs.logical_view("/b").unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.to_bytes(), fs.read_image("/a").unwrap());
        let mut part = [9u8; 4];
        a.read_at(65534, &mut part);
        assert_eq!(part, [0, 0, 3, 3]);
        fs.write_image("/b", 7, &[1]).unwrap();
        assert_ne!(fs.logical_view("/b").unwrap(), a);
        fs.create_qcow2("/c", 4 * 65536, 4096, Some("/a"));
        assert_eq!(fs.logical_view("/c").unwrap(), a);
    }
}
