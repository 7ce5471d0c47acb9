//! New qcow2 images written straight into their files: a pull copy's target, whose every
//! cluster to be written is known before the copy starts. The whole layout (header, L1 table,
//! refcounts, L2 tables, then the data clusters in guest order) is laid out up front and written
//! first; the data then goes to its place with plain writes, from the thread that reads it, with
//! no qemu-nbd in between.
//!
//! The image is qcow2 version 3 with 64 KiB clusters and 16-bit refcounts, as `qemu-img create`
//! makes it; every cluster a copied range touches is allocated (bytes the copy does not write
//! there read as zero, also over a backing file), every other cluster is left to the backing
//! file (or reads as zero without one).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Advice, fadvise};

use crate::nbd::copy::ExtentSink;
use crate::qcow2::{BACKING_FORMAT_EXTENSION, MAGIC, extensions, read_full};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (one cluster of 8-byte entries).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Refcounts per refcount block (one cluster of 16-bit entries).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
/// An L2 entry's flag: the cluster reads as zero.
const ALL_ZERO: u64 = 1;
const HEADER_LENGTH: usize = 112;

/// A new image being written: [`NewImage::create`] lays it out, [`ExtentSink`] writes its data.
#[derive(Debug)]
pub struct NewImage {
    file: File,
    /// Guest cluster index → host offset of its data cluster.
    data: BTreeMap<u64, u64>,
    /// L1 index → host offset of its L2 table.
    l2_tables: BTreeMap<u64, u64>,
    size: u64,
    /// Bytes of data written (zero runs not counted).
    pub data_bytes: u64,
    /// Bytes written since the last write-out was started ([`WRITE_BEHIND_BYTES`]).
    unflushed: AtomicU64,
}

/// Every this many bytes written, their write-out to storage is started (without waiting), so
/// that the image's final sync only waits for the tail.
const WRITE_BEHIND_BYTES: u64 = 32 << 20;

fn be32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn be64(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

impl NewImage {
    /// Whether [`NewImage::create`] can hold exactly `ranges` of a `size`-byte content over a
    /// backing file: every range must cover whole clusters (but at the content's end), since
    /// the part of an allocated cluster the copy does not write would read as zero, not as the
    /// backing file's data. Without a backing file any ranges do.
    pub fn fits(ranges: &[(u64, u64)], size: u64, backing: bool) -> bool {
        !backing
            || ranges.iter().all(|&(offset, length)| {
                offset % CLUSTER == 0
                    && ((offset + length) % CLUSTER == 0 || offset + length >= size)
            })
    }

    /// Creates `path` (which must not exist) as a qcow2 image of `size` bytes, with `backing`
    /// (a qcow2 image, recorded as given) if any, and every cluster `ranges` touch allocated.
    pub fn create(
        path: &Path,
        size: u64,
        backing: Option<&Path>,
        ranges: &[(u64, u64)],
    ) -> io::Result<Self> {
        let guest_clusters = size.div_ceil(CLUSTER);
        let mut wanted: Vec<u64> = Vec::new();
        for &(offset, length) in ranges {
            let end = (offset + length).min(size);
            if end <= offset {
                continue;
            }
            wanted.extend(offset / CLUSTER..=(end - 1) / CLUSTER);
        }
        wanted.sort_unstable();
        wanted.dedup();
        let l1_entries = guest_clusters.div_ceil(L2_ENTRIES).max(1);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
        let mut tables: Vec<u64> = wanted.iter().map(|c| c / L2_ENTRIES).collect();
        tables.dedup();
        let fixed = 1 + l1_clusters + tables.len() as u64 + wanted.len() as u64;
        // The refcounts cover themselves too: grow them until they cover every cluster.
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        loop {
            let total = fixed + table_clusters + blocks;
            let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_table = (need_blocks * 8).div_ceil(CLUSTER);
            if need_blocks <= blocks && need_table <= table_clusters {
                break;
            }
            blocks = need_blocks.max(blocks);
            table_clusters = need_table.max(table_clusters);
        }
        let l1_at = 1;
        let refcount_table_at = l1_at + l1_clusters;
        let blocks_at = refcount_table_at + table_clusters;
        let l2_at = blocks_at + blocks;
        let data_at = l2_at + tables.len() as u64;
        let total = data_at + wanted.len() as u64;

        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        let written = (|| {
            // Header, the backing file's format and name.
            let mut header = vec![0u8; CLUSTER as usize];
            header[..4].copy_from_slice(&MAGIC);
            be32(&mut header, 4, 3);
            be32(&mut header, 20, CLUSTER_BITS);
            be64(&mut header, 24, size);
            be32(&mut header, 36, l1_entries as u32);
            be64(&mut header, 40, l1_at * CLUSTER);
            be64(&mut header, 48, refcount_table_at * CLUSTER);
            be32(&mut header, 56, table_clusters as u32);
            be32(&mut header, 96, 4);
            be32(&mut header, 100, HEADER_LENGTH as u32);
            let mut at = HEADER_LENGTH;
            if backing.is_some() {
                be32(&mut header, at, BACKING_FORMAT_EXTENSION);
                be32(&mut header, at + 4, 5);
                header[at + 8..at + 13].copy_from_slice(b"qcow2");
                at += 16;
            }
            at += 8; // the end of the extensions (type 0, length 0)
            if let Some(backing) = backing {
                let name = backing.as_os_str().as_encoded_bytes();
                if at + name.len() > header.len() {
                    return Err(io::Error::other("backing file name too long"));
                }
                be64(&mut header, 8, at as u64);
                be32(&mut header, 16, name.len() as u32);
                header[at..at + name.len()].copy_from_slice(name);
            }
            file.write_all_at(&header, 0)?;
            // L1: each L2 table in use.
            let mut l1 = vec![0u8; (l1_clusters * CLUSTER) as usize];
            for (k, table) in tables.iter().enumerate() {
                let offset = (l2_at + k as u64) * CLUSTER;
                be64(&mut l1, (*table * 8) as usize, offset | COPIED);
            }
            file.write_all_at(&l1, l1_at * CLUSTER)?;
            // Refcounts: 1 for every cluster of the image.
            let mut refcount_table = vec![0u8; (table_clusters * CLUSTER) as usize];
            for b in 0..blocks {
                be64(
                    &mut refcount_table,
                    (b * 8) as usize,
                    (blocks_at + b) * CLUSTER,
                );
            }
            file.write_all_at(&refcount_table, refcount_table_at * CLUSTER)?;
            let mut block = vec![0u8; CLUSTER as usize];
            for b in 0..blocks {
                block.fill(0);
                let first = b * REFCOUNTS_PER_BLOCK;
                for c in first..(first + REFCOUNTS_PER_BLOCK).min(total) {
                    let at = ((c - first) * 2) as usize;
                    block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
                }
                file.write_all_at(&block, (blocks_at + b) * CLUSTER)?;
            }
            // L2 tables, and where each data cluster goes.
            let mut data = BTreeMap::new();
            let mut l2_tables = BTreeMap::new();
            let mut l2 = vec![0u8; CLUSTER as usize];
            let mut clusters = wanted.iter().peekable();
            for (k, table) in tables.iter().enumerate() {
                l2.fill(0);
                while let Some(&cluster) = clusters.next_if(|&&c| c / L2_ENTRIES == *table) {
                    let host = (data_at + data.len() as u64) * CLUSTER;
                    be64(
                        &mut l2,
                        ((cluster % L2_ENTRIES) * 8) as usize,
                        host | COPIED,
                    );
                    data.insert(cluster, host);
                }
                file.write_all_at(&l2, (l2_at + k as u64) * CLUSTER)?;
                l2_tables.insert(*table, (l2_at + k as u64) * CLUSTER);
            }
            file.set_len(total * CLUSTER)?;
            Ok((data, l2_tables))
        })();
        match written {
            Ok((data, l2_tables)) => Ok(Self {
                file,
                data,
                l2_tables,
                size,
                data_bytes: 0,
                unflushed: AtomicU64::new(0),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Makes the image durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

impl NewImage {
    /// Writes `data` at guest `offset`, which must lie in the clusters laid out; several
    /// threads may write at once (each its own part).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset + data.len() as u64 > self.size {
            return Err(io::Error::other(format!(
                "a write at {offset} of {} bytes past the image's {} bytes",
                data.len(),
                self.size
            )));
        }
        // Data clusters lie in guest order, so a run of allocated clusters is one write.
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let cluster = at / CLUSTER;
            let Some(&host) = self.data.get(&cluster) else {
                return Err(io::Error::other(format!(
                    "a write at {at} outside the ranges the image was laid out for"
                )));
            };
            let mut len = (CLUSTER - at % CLUSTER).min((data.len() - done) as u64);
            let mut next = cluster + 1;
            while done as u64 + len < data.len() as u64
                && self.data.get(&next) == Some(&(host + (next - cluster) * CLUSTER))
            {
                len = (len + CLUSTER).min((data.len() - done) as u64);
                next += 1;
            }
            let piece = &data[done..done + len as usize];
            self.file.write_all_at(piece, host + at % CLUSTER)?;
            done += len as usize;
        }
        let unflushed = self
            .unflushed
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if unflushed + data.len() as u64 >= WRITE_BEHIND_BYTES {
            self.unflushed.store(0, Ordering::Relaxed);
            // Starts writing the dirty pages out and drops those already written: the copy
            // never reads them again. Only an optimisation; durability comes from `sync`.
            let _ = fadvise(&self.file, 0, None, Advice::DontNeed);
        }
        Ok(())
    }
}

impl ExtentSink for NewImage {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)?;
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> io::Result<()> {
        // Allocated clusters are holes of the new file until written: they read as zero. A
        // cluster the run covers whole is marked zero as well (its L2 entry's zero flag, the
        // cluster staying allocated), so that QEMU sees a zero cluster, not data.
        let end = (offset + length).min(self.size);
        let mut cluster = offset.div_ceil(CLUSTER);
        while cluster * CLUSTER < end && ((cluster + 1) * CLUSTER).min(self.size) <= end {
            if let (Some(&host), Some(&table)) = (
                self.data.get(&cluster),
                self.l2_tables.get(&(cluster / L2_ENTRIES)),
            ) {
                let entry = host | COPIED | ALL_ZERO;
                let at = table + (cluster % L2_ENTRIES) * 8;
                self.file.write_all_at(&entry.to_be_bytes(), at)?;
            }
            cluster += 1;
        }
        Ok(())
    }
}

/// Sets the backing file recorded in the header of the qcow2 image at `path` (a qcow2
/// `backing`, or none), changing nothing else: `qemu-img rebase -u`. The image must not be
/// open elsewhere for writing. `Ok(false)` (nothing written) for a header this does not
/// rewrite (a version other than 2 or 3, or one whose extensions and name would not fit in
/// its first cluster): the caller rebases with qemu-img then.
pub fn set_backing(path: &Path, backing: Option<&Path>) -> io::Result<bool> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut head = [0u8; 4096];
    read_full(&file, 0, &mut head)?;
    let u32_at = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().unwrap_or([0; 4]));
    if head[..4] != MAGIC {
        return Ok(false);
    }
    let cluster_bits = u32_at(20);
    let extensions_from = match u32_at(4) {
        2 => 72,
        3 => u32_at(100) as usize,
        _ => return Ok(false),
    };
    if !(9..=21).contains(&cluster_bits) || extensions_from < 72 || extensions_from > head.len() {
        return Ok(false);
    }
    // The extensions kept: all but the backing file's format.
    let (found, complete) = extensions(&head, extensions_from);
    if !complete {
        return Ok(false);
    }
    let mut kept: Vec<u8> = Vec::new();
    for e in found.iter().filter(|e| e.kind != BACKING_FORMAT_EXTENSION) {
        kept.extend_from_slice(&head[e.record.clone()]);
    }
    if backing.is_some() {
        let mut extension = [0u8; 16];
        be32(&mut extension, 0, BACKING_FORMAT_EXTENSION);
        be32(&mut extension, 4, 5);
        extension[8..13].copy_from_slice(b"qcow2");
        kept.extend_from_slice(&extension);
    }
    kept.extend_from_slice(&[0u8; 8]);
    let name = backing.map_or(&[][..], |b| b.as_os_str().as_encoded_bytes());
    let name_at = extensions_from + kept.len();
    // Within the first cluster, and within what was read of it (which holds nothing else).
    if name_at + name.len() > (1usize << cluster_bits).min(head.len()) {
        return Ok(false);
    }
    let mut new = head[..extensions_from].to_vec();
    new.extend_from_slice(&kept);
    new.extend_from_slice(name);
    let (offset, length) = if backing.is_some() {
        (name_at as u64, name.len() as u32)
    } else {
        (0, 0)
    };
    be64(&mut new, 8, offset);
    be32(&mut new, 16, length);
    file.write_all_at(&new, 0)?;
    Ok(true)
}
