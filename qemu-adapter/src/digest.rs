//! Content digests of images (the tree kinds, [`DigestKind::is_tree`]) computed from what changed: blocks
//! the image's allocation reports zero are not read, and an image written on top of a recorded
//! parent takes that parent's block hashes for every block it does not hold itself. The block
//! hashes of each digest are kept in a directory of files named by the digest, so the next
//! incremental finds its parent's; a kept file is used only when its hashes make the digest
//! that names it, so a torn or stale file costs a read, never a wrong digest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vbackup_core::catalogue::{
    BlockHashes, Digest, DigestKind, TREE_BLOCK_BYTES, block_count, block_hash, block_len,
    zero_block_hash,
};
use vbackup_core::export::STATE_ZERO;
use vbackup_core::model::ImageFormat;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::images::{ALLOCATION_DEPTH, ImageError, NbdExport};
use crate::nbd::copy::{ExtentSink, select_ranges};
use crate::nbd::{BASE_ALLOCATION, NbdClient};
use crate::qcow2::{Chain, Piece, ReadError};
use crate::qcow2_writer::NewImage;

/// Bytes asked for in one read while hashing (whole blocks).
const READ_BYTES: u64 = 8 * TREE_BLOCK_BYTES;
/// Buffers of READ_BYTES in flight between the reading and the hashing thread.
const READ_BUFFERS: usize = 3;

/// Where block hashes are kept: one file per digest, `<hex>.blocks`.
#[derive(Debug, Clone)]
pub struct HashStore {
    dir: PathBuf,
}

impl HashStore {
    /// Hashes kept in `dir` (created when the first file is written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn file(digest: &Digest) -> String {
        format!("{}.blocks", digest.hex())
    }

    /// The block hashes of `digest`, if kept and they make that digest.
    pub fn load(&self, digest: &Digest) -> Option<BlockHashes> {
        if !digest.kind().is_tree() {
            return None;
        }
        let bytes = std::fs::read(self.dir.join(Self::file(digest))).ok()?;
        BlockHashes::decode(digest.kind(), &bytes).filter(|h| h.digest() == *digest)
    }

    /// Keeps `hashes` under their digest. Best effort and not synced: a file lost or torn by
    /// a crash fails [`HashStore::load`]'s check, and the next incremental reads its blocks
    /// instead.
    pub fn keep(&self, hashes: &BlockHashes) {
        self.keep_as(hashes, &hashes.digest());
    }

    /// [`HashStore::keep`] of `hashes` whose digest, `digest`, is known already.
    pub fn keep_as(&self, hashes: &BlockHashes, digest: &Digest) {
        if std::fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let name = Self::file(digest);
        let temp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let kept = std::fs::write(&temp, hashes.encode())
            .and_then(|()| std::fs::rename(&temp, self.dir.join(&name)));
        if kept.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
    }

    /// Removes every kept file whose digest is not in `wanted`.
    pub fn retain(&self, wanted: &[&Digest]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(hex) = name.strip_suffix(".blocks") else {
                continue;
            };
            if !wanted.iter().any(|d| d.hex() == hex) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// What a block's hash comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Read,
    Zero,
    Base,
}

/// The block hashes of `kind` (a tree kind) of `path`'s guest-visible content (through its
/// backing chain). With `base`, the hashes of the content of `path`'s backing image: blocks
/// `path` does not hold itself take their hash from it (hashes of another kind are not used).
/// `progress` hears the bytes of each block as it is hashed (read or not): they add up to the
/// content's size.
///
/// The image is read straight from its files ([`crate::qcow2`]) by a reader per core; an image
/// that module does not read goes through qemu-nbd instead.
pub fn block_hashes(
    path: &Path,
    format: &ImageFormat,
    kind: DigestKind,
    base: Option<&BlockHashes>,
    progress: &mut dyn FnMut(u64),
) -> Result<BlockHashes, ImageError> {
    if !kind.is_tree() {
        return Err(ImageError::Io(std::io::Error::other(format!(
            "'{}' is no block-hash digest kind",
            kind.prefix()
        ))));
    }
    let base = base.filter(|b| b.kind() == kind);
    if crate::children::test_pause_requested() {
        return block_hashes_nbd(path, format, kind, base, progress);
    }
    let planned = Chain::open(path, format).and_then(|chain| {
        let plan = plan(&chain, base)?;
        Ok((chain, plan))
    });
    match planned {
        Ok((chain, plan)) => hash_planned(&chain, kind, plan, base, progress, None),
        Err(_) => block_hashes_nbd(path, format, kind, base, progress),
    }
}

/// Copies `source`'s guest-visible content (through its backing chain) into `into`, a new
/// qcow2 image ([`NewImage`]; it must not exist), hashing it for a digest of `kind` (a tree
/// kind) as it goes: each byte is read once, by a thread per core, and only the clusters
/// holding data are written. `Ok(None)` (nothing written) when `source` is not read from its
/// files here: the caller copies it otherwise. On failure `into` is removed.
pub fn copy_hashed(
    source: &Path,
    format: &ImageFormat,
    into: &Path,
    kind: DigestKind,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<BlockHashes>, ImageError> {
    if !kind.is_tree() || crate::children::test_pause_requested() {
        return Ok(None);
    }
    let Ok(chain) = Chain::open(source, format) else {
        return Ok(None);
    };
    let Ok(plan) = plan(&chain, None) else {
        return Ok(None);
    };
    // The ranges holding data: the image allocates exactly their clusters.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, planned) in plan.iter().enumerate() {
        let Planned::Read(pieces) = planned else {
            continue;
        };
        let mut at = i as u64 * TREE_BLOCK_BYTES;
        for piece in pieces {
            if let Piece::Data { len, .. } = *piece {
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l == at => *l += len,
                    _ => ranges.push((at, len)),
                }
            }
            at += piece.len();
        }
    }
    let image = NewImage::create(into, chain.size(), None, &ranges)?;
    let hashed = hash_planned(&chain, kind, plan, None, progress, Some(&image));
    if hashed.is_err() {
        drop(image);
        let _ = std::fs::remove_file(into);
    }
    hashed.map(Some)
}

/// What a block's hash comes from, for an image read from its files.
#[derive(Debug)]
enum Planned {
    Zero,
    Base,
    Read(Vec<Piece>),
}

/// Where each block's hash comes from: a block the image holds nothing of itself takes
/// `base`'s hash (when `base` has it, as long); a block of zeroes only is not read.
fn plan(chain: &Chain, base: Option<&BlockHashes>) -> Result<Vec<Planned>, ReadError> {
    let size = chain.size();
    let blocks = block_count(size);
    let mut plan = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
    // The top holds nothing of [.., free_end) as last looked.
    let mut free_end = 0u64;
    let mut first = 0u64;
    // The chain is resolved PLAN_CHUNK_BLOCKS at a time, and the pieces cut into blocks: a
    // sparse disk costs a lookup per L2 table, not one per block.
    while first < blocks {
        let last = (first + PLAN_CHUNK_BLOCKS).min(blocks);
        let from = first * TREE_BLOCK_BYTES;
        let to = (last * TREE_BLOCK_BYTES).min(size);
        // A chunk the top holds nothing of takes every hash from `base`: nothing to resolve.
        let all_shared = base.is_some_and(|b| {
            (first..last)
                .all(|i| b.get(i).is_some() && block_len(b.size(), i) == block_len(size, i))
        });
        if all_shared {
            if from >= free_end {
                free_end = chain.top_unallocated_end(from)?;
            }
            if to <= free_end {
                plan.extend((first..last).map(|_| Planned::Base));
                first = last;
                continue;
            }
        }
        let mut pieces: std::collections::VecDeque<Piece> = chain.resolve(from, to - from)?.into();
        for i in first..last {
            let (offset, len) = (i * TREE_BLOCK_BYTES, block_len(size, i));
            let block = take_pieces(&mut pieces, len);
            let shared = base.is_some_and(|b| b.get(i).is_some() && block_len(b.size(), i) == len);
            if shared {
                if offset >= free_end {
                    free_end = chain.top_unallocated_end(offset)?;
                }
                if offset + len <= free_end {
                    plan.push(Planned::Base);
                    continue;
                }
            }
            if block.iter().all(|p| matches!(p, Piece::Zero(_))) {
                plan.push(Planned::Zero);
            } else {
                plan.push(Planned::Read(block));
            }
        }
        first = last;
    }
    Ok(plan)
}

/// Blocks resolved at a time by [`plan`] (1 GiB).
const PLAN_CHUNK_BLOCKS: u64 = 1024;

/// The first `len` bytes of `pieces`, taken off it (the piece at the cut is split).
fn take_pieces(pieces: &mut std::collections::VecDeque<Piece>, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let Some(front) = pieces.pop_front() else {
            break;
        };
        let n = front.len();
        if n <= left {
            out.push(front);
            left -= n;
            continue;
        }
        let (head, tail) = match front {
            Piece::Zero(_) => (Piece::Zero(left), Piece::Zero(n - left)),
            Piece::Data { layer, at, .. } => (
                Piece::Data {
                    layer,
                    at,
                    len: left,
                },
                Piece::Data {
                    layer,
                    at: at + left,
                    len: n - left,
                },
            ),
        };
        out.push(head);
        pieces.push_front(tail);
        left = 0;
    }
    out
}

/// Hashes the blocks of `plan`: those to read by a thread per core (up to 4), each taking
/// runs of READ_BYTES in turn, so that reads stay mostly sequential. With `copy`, the data
/// read is written there too.
fn hash_planned(
    chain: &Chain,
    kind: DigestKind,
    plan: Vec<Planned>,
    base: Option<&BlockHashes>,
    progress: &mut dyn FnMut(u64),
    copy: Option<&NewImage>,
) -> Result<BlockHashes, ImageError> {
    let size = chain.size();
    let full_zero = zero_block_hash(kind, TREE_BLOCK_BYTES);
    let mut hashes = vec![[0u8; 32]; plan.len()];
    let mut reads: Vec<(usize, Vec<Piece>)> = Vec::new();
    // Blocks not read are told to `progress` together (a sparse disk has many).
    let mut unread = 0u64;
    for (i, planned) in plan.into_iter().enumerate() {
        let len = block_len(size, i as u64);
        match planned {
            Planned::Zero => {
                hashes[i] = if len == TREE_BLOCK_BYTES {
                    full_zero
                } else {
                    zero_block_hash(kind, len)
                };
                unread += len;
            }
            Planned::Base => {
                hashes[i] = *base.and_then(|b| b.get(i as u64)).unwrap_or(&full_zero);
                unread += len;
            }
            Planned::Read(pieces) => reads.push((i, pieces)),
        }
    }
    if unread > 0 {
        progress(unread);
    }
    let cores = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 4);
    // Runs of up to READ_BYTES, but at least four per worker: an incremental's few blocks
    // are shared out evenly instead of going mostly to one thread.
    let per_run = reads
        .len()
        .div_ceil(cores * 4)
        .clamp(1, (READ_BYTES / TREE_BLOCK_BYTES) as usize);
    let runs: Vec<&[(usize, Vec<Piece>)]> = reads.chunks(per_run).collect();
    let workers = cores.min(runs.len().max(1));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Result<(usize, [u8; 32]), ReadError>>();
    std::thread::scope(|scope| -> Result<(), ImageError> {
        for _ in 0..workers {
            let (tx, runs, next, stop) = (tx.clone(), &runs, &next, &stop);
            scope.spawn(move || {
                let mut buf = vec![0u8; TREE_BLOCK_BYTES as usize];
                while !stop.load(Ordering::Relaxed) {
                    let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    for (i, pieces) in run.iter() {
                        let len = block_len(size, *i as u64) as usize;
                        let start = *i as u64 * TREE_BLOCK_BYTES;
                        let hashed = chain.read(pieces, &mut buf[..len]).and_then(|()| {
                            if let Some(image) = copy {
                                write_pieces(image, start, pieces, &buf[..len])?;
                            }
                            Ok((*i, block_hash(kind, &buf[..len])))
                        });
                        let failed = hashed.is_err();
                        if tx.send(hashed).is_err() || failed {
                            return;
                        }
                    }
                }
            });
        }
        drop(tx);
        for hashed in rx {
            match hashed {
                Ok((i, hash)) => {
                    hashes[i] = hash;
                    progress(block_len(size, i as u64));
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(ImageError::Io(std::io::Error::other(e.to_string())));
                }
            }
        }
        Ok(())
    })?;
    BlockHashes::new(kind, size, hashes).ok_or_else(|| {
        ImageError::Io(std::io::Error::other(
            "the block hashes do not cover the image",
        ))
    })
}

/// Writes the data pieces of a block read at guest offset `start` into `image`.
fn write_pieces(
    image: &NewImage,
    start: u64,
    pieces: &[Piece],
    buf: &[u8],
) -> Result<(), ReadError> {
    let mut at = 0usize;
    for piece in pieces {
        let len = piece.len() as usize;
        if let Piece::Data { .. } = piece {
            image
                .write_at(start + at as u64, &buf[at..at + len])
                .map_err(|source| ReadError::Io {
                    path: std::path::PathBuf::from("the new image"),
                    source,
                })?;
        }
        at += len;
    }
    Ok(())
}

/// [`block_hashes`] through qemu-nbd (its allocation depth tells which blocks the image holds
/// itself).
fn block_hashes_nbd(
    path: &Path,
    format: &ImageFormat,
    kind: DigestKind,
    base: Option<&BlockHashes>,
    progress: &mut dyn FnMut(u64),
) -> Result<BlockHashes, ImageError> {
    let mut export = match base {
        Some(_) => NbdExport::start_with_allocation_depth(path, format)?,
        None => NbdExport::start(path, format, false)?,
    };
    crate::children::test_pause_in_digest(export.pid().unwrap_or(0));
    let contexts: &[&str] = match base {
        Some(_) => &[ALLOCATION_DEPTH],
        None => &[BASE_ALLOCATION],
    };
    let mut client = export.connect(contexts)?;
    let size = client.info().size;
    let blocks = block_count(size);
    let mut source = vec![Source::Read; usize::try_from(blocks).unwrap_or(0)];
    // Marks the blocks wholly inside `ranges` that are still to be read and `may` allows.
    let mark =
        |source: &mut [Source], ranges: Vec<(u64, u64)>, to: Source, may: &dyn Fn(u64) -> bool| {
            for (offset, length) in ranges {
                let end = offset + length;
                let mut i = offset.div_ceil(TREE_BLOCK_BYTES);
                while i < blocks && i * TREE_BLOCK_BYTES + block_len(size, i) <= end {
                    if source[i as usize] == Source::Read && may(i) {
                        source[i as usize] = to;
                    }
                    i += 1;
                }
            }
        };
    match base {
        // Everything from the allocation depth alone: 0 is held by no layer (reads as zero),
        // 1 by the image itself, more by its backing chain, whose hashes `base` has when the
        // block is as long there. One block holding any byte of the image's own is read.
        Some(base) => {
            let (mut unallocated, mut backing) = (Vec::new(), Vec::new());
            for (offset, length, depth) in extents(&mut client, ALLOCATION_DEPTH)? {
                match depth {
                    0 => unallocated.push((offset, length)),
                    1 => {}
                    _ => backing.push((offset, length)),
                }
            }
            mark(&mut source, unallocated, Source::Zero, &|_| true);
            let shared =
                |i: u64| base.get(i).is_some() && block_len(base.size(), i) == block_len(size, i);
            mark(&mut source, backing, Source::Base, &shared);
        }
        None => {
            let zero = select_ranges(&mut client, BASE_ALLOCATION, |f| f & STATE_ZERO != 0)?;
            mark(&mut source, zero, Source::Zero, &|_| true);
        }
    }
    // The runs of blocks to read, in reads of up to READ_BYTES: one thread reads them while
    // this one hashes what was read before (reading waits on qemu-nbd, hashing on the CPU).
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut i = 0u64;
    while i < blocks {
        if source[i as usize] != Source::Read {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < blocks
            && source[end as usize] == Source::Read
            && (end - i) * TREE_BLOCK_BYTES < READ_BYTES
        {
            end += 1;
        }
        let start = i * TREE_BLOCK_BYTES;
        runs.push((start, (end * TREE_BLOCK_BYTES).min(size) - start));
        i = end;
    }
    let full_zero = zero_block_hash(kind, TREE_BLOCK_BYTES);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(READ_BUFFERS);
    let (read_tx, read_rx) =
        std::sync::mpsc::sync_channel::<Result<Vec<u8>, ImageError>>(READ_BUFFERS);
    for _ in 0..READ_BUFFERS {
        let _ = free_tx.send(vec![0u8; READ_BYTES as usize]);
    }
    let reader = &mut client;
    // The channels' ends move into the scope: should hashing stop early, dropping them ends
    // the reader before the scope waits for it.
    let hashes = std::thread::scope(move |scope| -> Result<Vec<[u8; 32]>, ImageError> {
        let mut hashes = Vec::with_capacity(source.len());
        scope.spawn(move || {
            for (offset, len) in runs {
                let Ok(mut buf) = free_rx.recv() else { return };
                let read = reader
                    .read_exact_at(offset, &mut buf[..len as usize])
                    .map(|()| buf)
                    .map_err(ImageError::from);
                let failed = read.is_err();
                if read_tx.send(read).is_err() || failed {
                    return;
                }
            }
        });
        let mut i = 0u64;
        while i < blocks {
            match source[i as usize] {
                Source::Zero => {
                    let len = block_len(size, i);
                    hashes.push(if len == TREE_BLOCK_BYTES {
                        full_zero
                    } else {
                        zero_block_hash(kind, len)
                    });
                    progress(len);
                    i += 1;
                }
                Source::Base => {
                    hashes.push(*base.and_then(|b| b.get(i)).unwrap_or(&full_zero));
                    progress(block_len(size, i));
                    i += 1;
                }
                Source::Read => {
                    let buf = read_rx.recv().map_err(|_| {
                        ImageError::Io(std::io::Error::other("the digest's reader stopped"))
                    })??;
                    // The blocks of this run, as the run was cut above.
                    let mut at = 0u64;
                    while at < READ_BYTES && i < blocks && source[i as usize] == Source::Read {
                        let len = block_len(size, i);
                        hashes.push(block_hash(kind, &buf[at as usize..(at + len) as usize]));
                        progress(len);
                        at += len;
                        i += 1;
                    }
                    // Dropped when the reader is done: it needs no buffer any more.
                    let _ = free_tx.send(buf);
                }
            }
        }
        Ok(hashes)
    })?;
    let _ = client.disconnect();
    export.stop();
    BlockHashes::new(kind, size, hashes).ok_or_else(|| {
        ImageError::Io(std::io::Error::other(format!(
            "'{}': the block hashes do not cover its {size} bytes",
            path.display()
        )))
    })
}

/// Every extent of `context` over the whole export, in one pass: `(offset, length, value)`.
fn extents(client: &mut NbdClient, context: &str) -> Result<Vec<(u64, u64, u32)>, ImageError> {
    let size = client.info().size;
    let mut out = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let before = offset;
        for e in client.block_status_of(context, offset, size - offset)? {
            let length = e.length.min(size - offset);
            if length == 0 {
                break;
            }
            out.push((offset, length, e.flags));
            offset += length;
        }
        if offset == before {
            return Err(ImageError::Io(std::io::Error::other(format!(
                "qemu-nbd reported no extent of '{context}' at offset {offset}"
            ))));
        }
    }
    Ok(out)
}

/// A block being filled while it is copied.
#[derive(Debug)]
struct Filling {
    data: Vec<u8>,
    got: u64,
}

/// Passes a copy into a new image through to `inner` and hashes it block by block as it goes:
/// the image's every byte outside the copied ranges is zero. Pieces may arrive in any order;
/// a block is hashed once all of its copied bytes arrived, on a thread of its own so that the
/// copy does not wait for hashing; at most the blocks in flight and HASH_QUEUE_BLOCKS complete
/// ones are held.
pub struct HashingSink<'s> {
    inner: &'s mut dyn ExtentSink,
    kind: DigestKind,
    size: u64,
    /// Per block touched by the ranges: the bytes the copy will write into it.
    expected: BTreeMap<u64, u64>,
    filling: BTreeMap<u64, Filling>,
    /// Complete blocks on their way to the hashing thread.
    to_hash: Option<std::sync::mpsc::SyncSender<(u64, Vec<u8>)>>,
    hashing: Option<std::thread::JoinHandle<Vec<BlockHash>>>,
    broken: bool,
}

/// A block's index and hash.
type BlockHash = (u64, [u8; 32]);

/// Complete blocks waiting for the hashing thread of a [`HashingSink`].
const HASH_QUEUE_BLOCKS: usize = 8;

impl<'s> HashingSink<'s> {
    /// A sink for copying `ranges` of a content of `size` bytes into a new (zero) image,
    /// hashing it for a digest of `kind` (a tree kind).
    pub fn new(
        inner: &'s mut dyn ExtentSink,
        kind: DigestKind,
        size: u64,
        ranges: &[(u64, u64)],
    ) -> Self {
        let mut expected = BTreeMap::new();
        for &(offset, length) in ranges {
            let end = (offset + length).min(size);
            let mut at = offset;
            while at < end {
                let block = at / TREE_BLOCK_BYTES;
                let piece = ((block + 1) * TREE_BLOCK_BYTES).min(end) - at;
                *expected.entry(block).or_insert(0) += piece;
                at += piece;
            }
        }
        let (to_hash, blocks) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(HASH_QUEUE_BLOCKS);
        let hashing = std::thread::spawn(move || {
            blocks
                .into_iter()
                .map(|(block, data)| (block, block_hash(kind, &data)))
                .collect()
        });
        Self {
            inner,
            kind,
            size,
            expected,
            filling: BTreeMap::new(),
            to_hash: Some(to_hash),
            hashing: Some(hashing),
            broken: false,
        }
    }

    /// Takes `[offset, offset + len)`, with `data` for it or zeroes.
    fn take(&mut self, offset: u64, len: u64, data: Option<&[u8]>) {
        let end = (offset + len).min(self.size);
        let mut at = offset;
        while at < end {
            let block = at / TREE_BLOCK_BYTES;
            let start = block * TREE_BLOCK_BYTES;
            let piece = ((block + 1) * TREE_BLOCK_BYTES).min(end) - at;
            let Some(&want) = self.expected.get(&block) else {
                // Written outside the ranges it was made for: hash nothing rather than wrong.
                self.broken = true;
                return;
            };
            let size = self.size;
            let filling = self.filling.entry(block).or_insert_with(|| Filling {
                data: vec![0; block_len(size, block) as usize],
                got: 0,
            });
            if let Some(data) = data {
                let from = (at - offset) as usize;
                let into = (at - start) as usize;
                filling.data[into..into + piece as usize]
                    .copy_from_slice(&data[from..from + piece as usize]);
            }
            filling.got += piece;
            if filling.got == want {
                let done = self.filling.remove(&block);
                let sent = match (done, &self.to_hash) {
                    (Some(done), Some(to_hash)) => to_hash.send((block, done.data)).is_ok(),
                    _ => false,
                };
                if !sent {
                    self.broken = true;
                }
            } else if filling.got > want {
                self.broken = true;
            }
            at += piece;
        }
    }

    /// The block hashes of the image, once the copy is done; `None` when the copy did not
    /// write exactly its ranges (then the image is read to be digested).
    pub fn finish(mut self) -> Option<BlockHashes> {
        drop(self.to_hash.take());
        let hashed = self.hashing.take()?.join().ok()?;
        if self.broken || !self.filling.is_empty() {
            return None;
        }
        let (kind, size) = (self.kind, self.size);
        let mut hashes = vec![None; block_count(size) as usize];
        for (block, hash) in hashed {
            *hashes.get_mut(block as usize)? = Some(hash);
        }
        let full_zero = zero_block_hash(kind, TREE_BLOCK_BYTES);
        let hashes = hashes
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.unwrap_or_else(|| match block_len(size, i as u64) {
                    TREE_BLOCK_BYTES => full_zero,
                    len => zero_block_hash(kind, len),
                })
            })
            .collect();
        BlockHashes::new(kind, size, hashes)
    }
}

impl ExtentSink for HashingSink<'_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_data(offset, data)?;
        self.take(offset, data.len() as u64, Some(data));
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, length)?;
        self.take(offset, length, None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: DigestKind = DigestKind::NEW_IMAGES;

    /// A sink that keeps nothing.
    struct Nowhere;

    impl ExtentSink for Nowhere {
        fn write_data(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }

        fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pieces_hashed_in_any_order_make_the_hashes_of_the_content() {
        let size = 3 * TREE_BLOCK_BYTES + 100;
        let mut content = vec![0u8; size as usize];
        let ranges = [
            (1000u64, TREE_BLOCK_BYTES + 5000),
            (3 * TREE_BLOCK_BYTES, 100),
        ];
        for &(o, l) in &ranges {
            for (k, b) in content[o as usize..(o + l) as usize].iter_mut().enumerate() {
                *b = (k % 251) as u8 + 1;
            }
        }
        // Two pieces, the second first, and one zero run inside a range.
        let mut nowhere = Nowhere;
        let mut sink = HashingSink::new(&mut nowhere, KIND, size, &ranges);
        let split = 1000 + 700_000;
        sink.write_data(
            split,
            &content[split as usize..(1000 + TREE_BLOCK_BYTES + 5000) as usize],
        )
        .unwrap();
        sink.write_data(1000, &content[1000..split as usize - 10])
            .unwrap();
        sink.write_zeroes(split - 10, 10).unwrap();
        content[split as usize - 10..split as usize].fill(0);
        sink.write_data(
            3 * TREE_BLOCK_BYTES,
            &content[(3 * TREE_BLOCK_BYTES) as usize..],
        )
        .unwrap();
        assert_eq!(sink.finish(), Some(BlockHashes::of_content(KIND, &content)));

        // A piece missing: no hashes rather than wrong ones.
        let mut nowhere = Nowhere;
        let mut sink = HashingSink::new(&mut nowhere, KIND, size, &ranges);
        sink.write_data(1000, &content[1000..2000]).unwrap();
        assert_eq!(sink.finish(), None);
    }

    #[test]
    fn a_kept_file_is_used_only_when_it_makes_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = HashStore::new(dir.path().join("hashes"));
        let hashes = BlockHashes::of_content(KIND, &vec![3u8; (2 * TREE_BLOCK_BYTES) as usize]);
        let digest = hashes.digest();
        assert!(store.load(&digest).is_none());
        store.keep(&hashes);
        assert_eq!(store.load(&digest), Some(hashes.clone()));
        // A torn file is ignored.
        let file = dir
            .path()
            .join("hashes")
            .join(format!("{}.blocks", digest.hex()));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 1]).unwrap();
        assert!(store.load(&digest).is_none());
        store.keep(&hashes);
        let other = BlockHashes::of_content(KIND, &[1, 2, 3]);
        store.keep(&other);
        store.retain(&[&digest]);
        assert!(store.load(&digest).is_some());
        assert!(store.load(&other.digest()).is_none());
    }
}
