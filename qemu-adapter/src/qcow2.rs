//! Images read straight from their files: qcow2 (versions 2 and 3) and raw layers, through
//! their backing chains, without starting qemu-nbd. A digest reads a backup image this way: no
//! process to start, and as many readers as there are cores.
//!
//! Only what vbackup's own images use is read: uncompressed, unencrypted qcow2 clusters in the
//! image file itself, backing files named by a local path with their format recorded. Anything
//! else ([`Unsupported`]: compressed clusters, encryption, external data files, extended L2
//! entries, an image marked corrupt, a backing file without a recorded format) is left to
//! qemu-nbd by the caller. A read never takes a lock: the image must not be written meanwhile.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vbackup_core::model::ImageFormat;

use crate::images::ChainLayer;

/// Why an image is not read here (qemu-nbd reads it instead).
#[derive(Debug, thiserror::Error)]
#[error("'{path}': {reason}")]
pub struct Unsupported {
    /// The layer.
    pub path: PathBuf,
    /// What it uses that is not read here.
    pub reason: String,
}

/// Failure to read an image here.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Something the image uses is not read here.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The file could not be read, or is not what its header says.
    #[error("'{path}': {source}")]
    Io {
        /// The layer.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// The first four bytes of a qcow2 image.
pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The header extension naming the backing file's format.
pub(crate) const BACKING_FORMAT_EXTENSION: u32 = 0xe279_2aca;
/// Incompatible feature bits read here: the dirty bit (refcounts may be stale, mappings are
/// not) and the compression type (it matters only for compressed clusters, refused anyway).
const KNOWN_INCOMPATIBLE: u64 = 0b1001;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ALL_ZERO: u64 = 1;
/// L2 tables kept in memory per layer (each one cluster).
const L2_CACHE_TABLES: usize = 64;

/// Where one guest range of a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Data(u64),
    Zero,
    Unallocated,
}

#[derive(Debug)]
struct Qcow2 {
    cluster_bits: u32,
    /// Version 3: bit 0 of an L2 entry says the cluster reads as zero.
    zero_flag: bool,
    l1: Vec<u64>,
    l2: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

#[derive(Debug)]
enum Kind {
    Raw,
    Qcow2(Qcow2),
}

#[derive(Debug)]
struct Layer {
    path: PathBuf,
    file: File,
    size: u64,
    kind: Kind,
    /// The backing file and its recorded format.
    backing: Option<(PathBuf, ImageFormat)>,
    allocated: u64,
}

/// A piece of guest content: zeroes, or bytes at an offset of one layer's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// This many zero bytes.
    Zero(u64),
    /// `len` bytes of layer `layer`'s file at `at`.
    Data {
        /// Index into the chain (0 = top).
        layer: usize,
        /// File offset.
        at: u64,
        /// Bytes.
        len: u64,
    },
}

impl Piece {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Zero(len) | Piece::Data { len, .. } => len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An image and its backing chain, opened for reading (top first).
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ReadError + '_ {
    move |source| ReadError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, what: String) -> ReadError {
    ReadError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> ReadError {
    ReadError::Unsupported(Unsupported {
        path: path.to_owned(),
        reason: reason.into(),
    })
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// One header extension record: its type, its data, and the whole record with its padding.
#[derive(Debug)]
pub(crate) struct Extension {
    pub kind: u32,
    pub data: std::ops::Range<usize>,
    pub record: std::ops::Range<usize>,
}

/// The header extensions in `h` from offset `from`, in order, up to the end marker; and
/// whether that marker was reached with every record whole in `h`.
pub(crate) fn extensions(h: &[u8], from: usize) -> (Vec<Extension>, bool) {
    let mut out = Vec::new();
    let mut at = from;
    while at + 8 <= h.len() {
        let (kind, len) = (be32(h, at), be32(h, at + 4) as usize);
        if kind == 0 {
            return (out, true);
        }
        let next = at + 8 + len.div_ceil(8) * 8;
        if next > h.len() {
            break;
        }
        out.push(Extension {
            kind,
            data: at + 8..at + 8 + len,
            record: at..next,
        });
        at = next;
    }
    (out, false)
}

/// Whether the file at `path` starts as a qcow2 image does.
pub fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 0))
        .is_ok()
        && magic == MAGIC
}

/// Reads `buf.len()` bytes at `at`; what lies past the end of the file reads as zero (as QEMU
/// reads it).
pub(crate) fn read_full(file: &File, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Layer {
    fn open(path: &Path, format: &ImageFormat) -> Result<Self, ReadError> {
        let file = File::open(path).map_err(io(path))?;
        let meta = file.metadata().map_err(io(path))?;
        let allocated = meta.blocks() * 512;
        match format {
            ImageFormat::Raw => Ok(Self {
                path: path.to_owned(),
                file,
                size: meta.len(),
                kind: Kind::Raw,
                backing: None,
                allocated,
            }),
            ImageFormat::Qcow2 => Self::open_qcow2(path, file, allocated),
            ImageFormat::Other(name) => Err(unsupported(path, format!("format '{name}'"))),
        }
    }

    fn open_qcow2(path: &Path, file: File, allocated: u64) -> Result<Self, ReadError> {
        let mut h = vec![0u8; 4096];
        read_full(&file, 0, &mut h).map_err(io(path))?;
        if h[..4] != MAGIC {
            return Err(invalid(path, "not a qcow2 image".into()));
        }
        let version = be32(&h, 4);
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(path, format!("cluster bits {cluster_bits}")));
        }
        let size = be64(&h, 24);
        if be32(&h, 32) != 0 {
            return Err(unsupported(path, "encryption"));
        }
        let (header_length, extensions_from) = match version {
            2 => (72usize, 72usize),
            3 => {
                let incompatible = be64(&h, 72);
                if incompatible & 0b10 != 0 {
                    return Err(unsupported(path, "the image is marked corrupt"));
                }
                if incompatible & !KNOWN_INCOMPATIBLE != 0 {
                    return Err(unsupported(
                        path,
                        format!("incompatible features {incompatible:#x}"),
                    ));
                }
                let length = be32(&h, 100) as usize;
                (length, length)
            }
            v => return Err(unsupported(path, format!("qcow2 version {v}"))),
        };
        if header_length < 72 || header_length > h.len() - 8 {
            return Err(invalid(path, format!("header length {header_length}")));
        }
        // Header extensions: only the backing file's format is wanted.
        let backing_format = extensions(&h, extensions_from)
            .0
            .into_iter()
            .find(|e| e.kind == BACKING_FORMAT_EXTENSION)
            .map(|e| String::from_utf8_lossy(&h[e.data]).into_owned());
        let backing_offset = be64(&h, 8);
        let backing_len = be32(&h, 16) as usize;
        let backing = if backing_offset != 0 && backing_len != 0 {
            let mut name = vec![0u8; backing_len];
            read_full(&file, backing_offset, &mut name).map_err(io(path))?;
            let name = String::from_utf8(name)
                .map_err(|_| invalid(path, "backing file name is not UTF-8".into()))?;
            let protocol = name.split_once(':').is_some_and(|(p, _)| {
                !p.contains('/') && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '+')
            });
            if protocol {
                return Err(unsupported(path, format!("backing file '{name}'")));
            }
            let format = match backing_format.as_deref() {
                Some(f @ ("qcow2" | "raw")) => ImageFormat::from_name(f),
                Some(f) => return Err(unsupported(path, format!("backing format '{f}'"))),
                None => return Err(unsupported(path, "backing file without a recorded format")),
            };
            let name = PathBuf::from(name);
            let name = if name.is_absolute() {
                name
            } else {
                path.parent().unwrap_or(Path::new("")).join(name)
            };
            Some((name, format))
        } else {
            None
        };
        let l1_entries = be32(&h, 36) as usize;
        let l1_offset = be64(&h, 40);
        let cluster = 1u64 << cluster_bits;
        let per_l2 = cluster / 8;
        let needed = size.div_ceil(cluster).div_ceil(per_l2);
        if (l1_entries as u64) < needed || l1_entries > 32 << 20 {
            return Err(invalid(path, format!("L1 table of {l1_entries} entries")));
        }
        let mut raw = vec![0u8; l1_entries * 8];
        read_full(&file, l1_offset, &mut raw).map_err(io(path))?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let layer = Self {
            path: path.to_owned(),
            file,
            size,
            kind: Kind::Qcow2(Qcow2 {
                cluster_bits,
                zero_flag: version >= 3,
                l1,
                l2: Mutex::new(HashMap::new()),
            }),
            backing,
            allocated,
        };
        Ok(layer)
    }

    fn format(&self) -> ImageFormat {
        match self.kind {
            Kind::Raw => ImageFormat::Raw,
            Kind::Qcow2(_) => ImageFormat::Qcow2,
        }
    }

    /// Where guest offset `at` (< size) is, and for how many bytes from there it stays so
    /// (at least 1).
    fn lookup(&self, at: u64) -> Result<(Mapping, u64), ReadError> {
        let q = match &self.kind {
            Kind::Raw => return Ok((Mapping::Data(at), self.size - at)),
            Kind::Qcow2(q) => q,
        };
        let cluster = 1u64 << q.cluster_bits;
        let per_l2 = cluster / 8;
        let index = at >> q.cluster_bits;
        let in_cluster = cluster - (at & (cluster - 1));
        let l1_index = (index / per_l2) as usize;
        let l2_offset = q.l1.get(l1_index).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_offset == 0 {
            let span_end = (l1_index as u64 + 1) * per_l2 * cluster;
            return Ok((Mapping::Unallocated, span_end - at));
        }
        let table = self.l2_table(q, l2_offset)?;
        let first = (index % per_l2) as usize;
        let kind = |entry: u64| -> Result<Mapping, ReadError> {
            if entry & COMPRESSED != 0 {
                return Err(unsupported(&self.path, "compressed clusters"));
            }
            let host = entry & OFFSET_MASK;
            Ok(if q.zero_flag && entry & ALL_ZERO != 0 {
                Mapping::Zero
            } else if host == 0 {
                Mapping::Unallocated
            } else {
                Mapping::Data(host)
            })
        };
        let mapping = kind(table[first])?;
        // The run goes on over the next entries of this table that continue it: zero after
        // zero, unallocated after unallocated, data at the next host cluster after data.
        let mut clusters = 1usize;
        while let Some(&next) = table.get(first + clusters) {
            // A compressed cluster ends the run; its own lookup refuses it.
            let Ok(next) = kind(next) else {
                break;
            };
            let continues = match (mapping, next) {
                (Mapping::Data(h), Mapping::Data(n)) => n == h + clusters as u64 * cluster,
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            clusters += 1;
        }
        let run = in_cluster + (clusters as u64 - 1) * cluster;
        let mapping = match mapping {
            Mapping::Data(host) => Mapping::Data(host + (at & (cluster - 1))),
            other => other,
        };
        Ok((mapping, run))
    }

    fn l2_table(&self, q: &Qcow2, offset: u64) -> Result<Arc<Vec<u64>>, ReadError> {
        let mut cache = q.l2.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&offset) {
            return Ok(t.clone());
        }
        let mut raw = vec![0u8; 1 << q.cluster_bits];
        read_full(&self.file, offset, &mut raw).map_err(io(&self.path))?;
        let table: Arc<Vec<u64>> = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        if cache.len() >= L2_CACHE_TABLES {
            cache.clear();
        }
        cache.insert(offset, table.clone());
        Ok(table)
    }
}

impl Chain {
    /// Opens `path` (of `format`) and every backing file below it.
    pub fn open(path: &Path, format: &ImageFormat) -> Result<Self, ReadError> {
        let mut layers = vec![Layer::open(path, format)?];
        while let Some((backing, format)) = layers.last().and_then(|l| l.backing.clone()) {
            if layers.len() > 64 {
                return Err(unsupported(path, "a backing chain deeper than 64"));
            }
            layers.push(Layer::open(&backing, &format)?);
        }
        Ok(Self { layers })
    }

    /// The top image's guest-visible size.
    pub fn size(&self) -> u64 {
        self.layers[0].size
    }

    /// The layers as `qemu-img info --backing-chain` describes them (top first; the top's path
    /// as given, a backing file's joined to its overlay's directory when relative).
    pub fn layers(&self) -> Vec<ChainLayer> {
        self.layers
            .iter()
            .map(|l| ChainLayer {
                path: l.path.to_string_lossy().into_owned(),
                format: l.format(),
                virtual_size_bytes: l.size,
                actual_size_bytes: l.allocated,
                backing: l
                    .backing
                    .as_ref()
                    .map(|(b, _)| b.to_string_lossy().into_owned()),
            })
            .collect()
    }

    /// Whether the top image holds nothing of `[offset, offset + len)` itself (every byte
    /// comes from its backing chain).
    pub fn top_unallocated(&self, offset: u64, len: u64) -> Result<bool, ReadError> {
        let end = (offset + len).min(self.size());
        Ok(self.top_unallocated_end(offset)? >= end)
    }

    /// Where the run of content the top image holds nothing of, from `offset`, ends (`offset`
    /// itself when the top holds that byte; at most the image's size).
    pub fn top_unallocated_end(&self, offset: u64) -> Result<u64, ReadError> {
        let top = &self.layers[0];
        let mut at = offset;
        while at < top.size {
            let (mapping, run) = top.lookup(at)?;
            if mapping != Mapping::Unallocated {
                return Ok(at);
            }
            at += run;
        }
        Ok(top.size)
    }

    /// Where the content of `[offset, offset + len)` comes from, in order, adjacent pieces
    /// joined.
    pub fn resolve(&self, offset: u64, len: u64) -> Result<Vec<Piece>, ReadError> {
        let mut out = Vec::new();
        self.resolve_in(0, offset, len, &mut out)?;
        Ok(out)
    }

    fn resolve_in(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), ReadError> {
        let Some(layer) = self.layers.get(index) else {
            push(out, Piece::Zero(len));
            return Ok(());
        };
        let end = offset + len;
        let inside = end.min(layer.size);
        let mut at = offset;
        while at < inside {
            let (mapping, run) = layer.lookup(at)?;
            let run = run.min(inside - at);
            match mapping {
                Mapping::Data(host) => push(
                    out,
                    Piece::Data {
                        layer: index,
                        at: host,
                        len: run,
                    },
                ),
                Mapping::Zero => push(out, Piece::Zero(run)),
                Mapping::Unallocated => self.resolve_in(index + 1, at, run, out)?,
            }
            at += run;
        }
        if end > at {
            push(out, Piece::Zero(end - at));
        }
        Ok(())
    }

    /// Reads `pieces` (from [`Chain::resolve`]) into `buf`, which is as long as they are.
    pub fn read(&self, pieces: &[Piece], buf: &mut [u8]) -> Result<(), ReadError> {
        let mut done = 0usize;
        for piece in pieces {
            let len = piece.len() as usize;
            let into = &mut buf[done..done + len];
            match *piece {
                Piece::Zero(_) => into.fill(0),
                Piece::Data { layer, at, .. } => {
                    let l = &self.layers[layer];
                    read_full(&l.file, at, into).map_err(io(&l.path))?;
                }
            }
            done += len;
        }
        Ok(())
    }
}

fn push(out: &mut Vec<Piece>, piece: Piece) {
    if piece.is_empty() {
        return;
    }
    match (out.last_mut(), piece) {
        (Some(Piece::Zero(a)), Piece::Zero(b)) => *a += b,
        (
            Some(Piece::Data { layer, at, len }),
            Piece::Data {
                layer: l2,
                at: a2,
                len: n2,
            },
        ) if *layer == l2 && *at + *len == a2 => *len += n2,
        _ => out.push(piece),
    }
}
