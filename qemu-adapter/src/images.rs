//! Backup images on disk: creating full images and qcow2 overlays of a parent backup, writing
//! extents into them through a writable NBD export, describing them (`qemu-img info
//! --backing-chain`), rebasing them, and computing their content digest.
//!
//! Contract:
//! - An incremental backup image is a qcow2 overlay whose backing file is the parent backup's
//!   image (`-F qcow2`), so `qemu-img` reads any backup through its chain.
//! - Extents are written through `qemu-nbd` serving the image (started in a private temporary
//!   directory, stopped by its own pid, never left behind: [`NbdExport`] kills it on drop).
//!   Only the given ranges are written. Into a fresh image, zero runs are skipped and stay
//!   holes; into an overlay they must hide the parent's data, so they are written as zeroes
//!   and the export's `detect-zeroes` turns them into qcow2 zero clusters, which occupy no
//!   data clusters either.
//! - The digest ([`content_digest`]) is SHA-256 of the guest-visible bytes read through the
//!   backing chain: the same for a chain and for its flattened copy. It is computed over a
//!   read-only NBD export with our client, because `qemu-img convert` cannot write raw output
//!   to a pipe (it resizes its target, which a pipe refuses), and holes cost no transfer over
//!   NBD (they arrive as hole chunks).
//! - Every tool failure is an [`ImageError`] carrying the command and its stderr.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use vbackup_core::catalogue::{BackupImage, BlockHashes, Digest, DigestKind};
use vbackup_core::model::ImageFormat;

use crate::nbd::copy::{self, CopyReport, ExtentSink};
use crate::nbd::{BASE_ALLOCATION, NbdClient, NbdError};
use crate::qcow2_writer::NewImage;

/// A failure of an external tool (`qemu-img`, `qemu-io`, `qemu-nbd`); shared by the image
/// operations here and the live-test harness ([`crate::live`]).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A tool could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The tool.
        tool: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr (or stdout, when stderr is empty).
        stderr: String,
    },
    /// A tool's output could not be understood.
    #[error("unexpected output of {tool}: {reason}")]
    Output {
        /// The tool.
        tool: String,
        /// What was wrong.
        reason: String,
    },
}

/// Errors of image operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A tool failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The NBD export did not come up in time.
    #[error("qemu-nbd did not serve {path} within {waited_ms} ms: {stderr}")]
    ExportStart {
        /// The image.
        path: PathBuf,
        /// How long we waited.
        waited_ms: u128,
        /// What qemu-nbd printed.
        stderr: String,
    },
    /// The image to create already exists (`qemu-img create` would silently truncate it).
    #[error("{0} already exists")]
    TargetExists(PathBuf),
    /// The NBD transfer failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// A file system failure.
    #[error("image IO error: {0}")]
    Io(#[from] io::Error),
}

/// Runs a command (stdin closed) and returns its output if it exited with status 0.
pub fn run_tool(command: &mut Command) -> Result<Output, ToolError> {
    let tool = command.get_program().to_string_lossy().into_owned();
    // A tool run for vbackup dies with it (a killed restore leaves no `qemu-img convert`).
    let output = crate::children::tied(command)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ToolError::Spawn { tool, source })?;
    if output.status.success() {
        return Ok(output);
    }
    Err(tool_failure(command, &output))
}

/// The error of `command`, which ended as `output` says.
pub fn tool_failure(command: &Command, output: &Output) -> ToolError {
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stderr = if stderr.is_empty() {
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    } else {
        stderr
    };
    ToolError::Tool {
        command: format!(
            "{} {}",
            command.get_program().to_string_lossy(),
            args.join(" ")
        ),
        status: output.status.to_string(),
        stderr,
    }
}

/// Runs a command and returns its stdout when it exits with status 0.
pub(crate) fn run(command: &mut Command) -> Result<Vec<u8>, ImageError> {
    Ok(run_tool(command)?.stdout)
}

/// Creates an empty qcow2 image of `virtual_size_bytes` (64 KiB clusters).
pub fn create_full(path: &Path, virtual_size_bytes: u64) -> Result<(), ImageError> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(path)
        .arg(virtual_size_bytes.to_string()))
    .map(|_| ())
}

/// Creates a qcow2 overlay of the qcow2 image `parent` (same virtual size). The backing file is
/// recorded as given, so pass an absolute path.
pub fn create_overlay(path: &Path, parent: &Path) -> Result<(), ImageError> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(parent)
        .arg(path))
    .map(|_| ())
}

/// Creates a qcow2 overlay of the qcow2 image `parent` with a virtual size of its own: an
/// incremental backup of a disk that grew (or shrank) since its parent. Past the parent's end
/// the overlay reads as zeroes until written.
pub fn create_overlay_sized(
    path: &Path,
    parent: &Path,
    virtual_size_bytes: u64,
) -> Result<(), ImageError> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(parent)
        .arg(path)
        .arg(virtual_size_bytes.to_string()))
    .map(|_| ())
}

/// Rebases a qcow2 image onto `backing` (or makes it standalone with `None`) keeping its
/// guest-visible content: `qemu-img rebase` in safe mode copies into the image whatever
/// differs between the old and the new backing.
pub fn rebase(path: &Path, backing: Option<&Path>) -> Result<(), ImageError> {
    let mut command = Command::new("qemu-img");
    command.args(["rebase", "-q", "-f", "qcow2"]);
    match backing {
        Some(b) => command.args(["-F", "qcow2", "-b"]).arg(b),
        None => command.args(["-b", ""]),
    };
    run(command.arg(path)).map(|_| ())
}

/// One image of a backing chain as `qemu-img info --backing-chain` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// The image's file name as recorded (absolute when it was created so).
    pub path: String,
    /// Its format.
    pub format: ImageFormat,
    /// Guest-visible size.
    pub virtual_size_bytes: u64,
    /// Bytes the file occupies on the host.
    pub actual_size_bytes: u64,
    /// The backing file it names, if any.
    pub backing: Option<String>,
}

/// Parses the JSON array printed by `qemu-img info --backing-chain --output=json` (top first).
pub fn parse_backing_chain(json: &[u8]) -> Result<Vec<ChainLayer>, ImageError> {
    let bad = |reason: String| {
        ImageError::Tool(ToolError::Output {
            tool: "qemu-img info".into(),
            reason,
        })
    };
    let value: Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let layers = value
        .as_array()
        .ok_or_else(|| bad("expected a JSON array".into()))?;
    layers
        .iter()
        .map(|layer| {
            let text = |key: &str| layer.get(key).and_then(Value::as_str);
            let number = |key: &str| {
                layer
                    .get(key)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad(format!("layer without numeric '{key}'")))
            };
            Ok(ChainLayer {
                path: text("filename")
                    .ok_or_else(|| bad("layer without 'filename'".into()))?
                    .to_owned(),
                format: ImageFormat::from_name(
                    text("format").ok_or_else(|| bad("layer without 'format'".into()))?,
                ),
                virtual_size_bytes: number("virtual-size")?,
                // A file on a file system without allocation information has no actual size.
                actual_size_bytes: layer
                    .get("actual-size")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                backing: text("full-backing-filename")
                    .or(text("backing-filename"))
                    .map(str::to_owned),
            })
        })
        .collect()
}

/// The backing chain of an image, top first. `-U` so an image a daemon holds can be read.
pub fn backing_chain(path: &Path) -> Result<Vec<ChainLayer>, ImageError> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(path))?;
    parse_backing_chain(&out)
}

/// The layers of `path`'s backing chain (top first), as [`backing_chain`] gives them but read
/// from the files themselves when the top is a qcow2 image [`crate::qcow2`] reads (no process
/// started); `qemu-img info` otherwise. Backing files are named joined to their overlay's
/// directory, as given in the overlay, not canonicalized.
pub fn chain_layers(path: &Path) -> Result<Vec<ChainLayer>, ImageError> {
    if crate::qcow2::is_qcow2(path)
        && let Ok(chain) = crate::qcow2::Chain::open(path, &ImageFormat::Qcow2)
    {
        return Ok(chain.layers());
    }
    backing_chain(path)
}

/// Whether a running QEMU, qemu-storage-daemon or qemu-nbd holds `path` open.
///
/// Two probes, because neither is enough alone: `qemu-img info` without `-U` fails to take its
/// shared lock while a guest device writes the image, but NBD exports share every permission
/// and take no conflicting lock; so the open files of every process we can see
/// (`/proc/<pid>/fd`) are compared with the image's device and inode as well.
pub fn is_in_use(path: &Path) -> Result<bool, ImageError> {
    if holder_pid(path)?.is_some() {
        return Ok(true);
    }
    match run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path))
    {
        Ok(_) => Ok(false),
        Err(ImageError::Tool(ToolError::Tool { stderr, .. })) if stderr.contains("lock") => {
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The pid of a process (other than this one) with `path` open, as far as `/proc` shows.
pub fn holder_pid(path: &Path) -> Result<Option<u32>, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::metadata(path)?;
    let key = (target.dev(), target.ino());
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(None);
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes may exit or hide their descriptors while we look; skip them.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(m) = std::fs::metadata(fd.path())
                && (m.dev(), m.ino()) == key
            {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// How long a client of an NBD server vbackup reads or writes waits for it to make progress
/// (one socket read or write) before the operation fails.
pub const NBD_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`NbdExport::start`] waits for qemu-nbd's socket.
const EXPORT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Name of the single export served by [`NbdExport`].
pub const EXPORT_NAME: &str = "image";

/// The meta context of [`NbdExport::start_with_allocation_depth`].
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// An image served by `qemu-nbd` on a unix socket in a private temporary directory. The
/// process is killed by its pid and reaped when the export is stopped or dropped.
#[derive(Debug)]
pub struct NbdExport {
    child: Option<Child>,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl NbdExport {
    /// Serves `path` (of `format`). A writable export turns written zero blocks into zero
    /// clusters (`--detect-zeroes=on`) so they use no data space.
    pub fn start(path: &Path, format: &ImageFormat, writable: bool) -> Result<Self, ImageError> {
        Self::spawn(path, format, writable, false)
    }

    /// Serves `path` read-only, also answering the `qemu:allocation-depth` meta context
    /// ([`ALLOCATION_DEPTH`]): 1 for what the image holds itself, more for what its backing
    /// chain holds, 0 for what none holds.
    pub fn start_with_allocation_depth(
        path: &Path,
        format: &ImageFormat,
    ) -> Result<Self, ImageError> {
        Self::spawn(path, format, false, true)
    }

    fn spawn(
        path: &Path,
        format: &ImageFormat,
        writable: bool,
        allocation_depth: bool,
    ) -> Result<Self, ImageError> {
        // What a killed vbackup left of earlier exports goes first.
        crate::children::clean_orphans(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(crate::children::EXPORT_DIR_PREFIX)
            .tempdir()?;
        let socket = dir.path().join("nbd.sock");
        let log_path = dir.path().join("qemu-nbd.log");
        let log = File::create(&log_path)?;
        let mut command = Command::new("qemu-nbd");
        command
            .arg(format!("--format={}", format.name()))
            .arg("--socket")
            .arg(&socket)
            // Persistent with a few connection slots: the readiness probe below is a
            // connection of its own, and the export must outlive it.
            .args([
                "--export-name",
                EXPORT_NAME,
                "--cache=writeback",
                "--persistent",
                "--shared=8",
            ]);
        if writable {
            command.arg("--detect-zeroes=on");
        } else {
            command.arg("--read-only");
        }
        if allocation_depth {
            command.arg("--allocation-depth");
        }
        command
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Owned before the helper starts (so a kill right now leaves nothing nobody cleans),
        // tied to vbackup, and recorded beside its socket for the next vbackup should the
        // kernel's death signal not have ended it.
        crate::children::record_owner(dir.path(), 0)?;
        let child = crate::children::tied(&mut command)
            .spawn()
            .map_err(|source| {
                ImageError::Tool(ToolError::Spawn {
                    tool: "qemu-nbd".into(),
                    source,
                })
            })?;
        let _ = crate::children::record_owner(dir.path(), child.id());
        let mut export = Self {
            child: Some(child),
            socket,
            dir,
        };
        let started = Instant::now();
        loop {
            // The socket file appears at bind, before listen: only a connection proves the
            // server is ready.
            if std::os::unix::net::UnixStream::connect(&export.socket).is_ok() {
                return Ok(export);
            }
            let exited = match export.child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => true,
            };
            if exited || started.elapsed() > EXPORT_START_TIMEOUT {
                export.stop();
                return Err(ImageError::ExportStart {
                    path: path.to_owned(),
                    waited_ms: started.elapsed().as_millis(),
                    stderr: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Connects a client negotiating `meta_contexts`. Every socket read and write of it is
    /// bounded by [`NBD_IO_TIMEOUT`]: a qemu-nbd that stops answering fails the operation.
    pub fn connect(&self, meta_contexts: &[&str]) -> Result<NbdClient, ImageError> {
        let mut client = NbdClient::connect_unix(&self.socket, EXPORT_NAME, meta_contexts)?;
        client.set_io_timeout(Some(NBD_IO_TIMEOUT))?;
        Ok(client)
    }

    /// The pid of qemu-nbd, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The socket path (for `nbd+unix:///image?socket=...` URIs).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills qemu-nbd by its pid and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // qemu-nbd flushes on SIGTERM; SIGKILL would lose writeback-cached data. Writers
            // flush through NBD before stopping, so a kill after a short grace is safe.
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = &self.dir;
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Largest zero buffer sent at once into an overlay.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// An [`ExtentSink`] writing into an image through a writable NBD client. Writes are
/// pipelined: call [`NbdClient::wait_writes`] once the copy is done, before flushing.
pub struct NbdImageSink<'c> {
    client: &'c mut NbdClient,
    write_zero_runs: bool,
    zeroes: Vec<u8>,
    /// Bytes of data sent (zero runs not counted).
    pub data_bytes: u64,
}

impl<'c> NbdImageSink<'c> {
    /// A sink into a fresh image (zero runs skipped) or an overlay (zero runs written so they
    /// hide the parent's data).
    pub fn new(client: &'c mut NbdClient, overlay: bool) -> Self {
        Self {
            client,
            write_zero_runs: overlay,
            zeroes: Vec::new(),
            data_bytes: 0,
        }
    }
}

impl ExtentSink for NbdImageSink<'_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.data_bytes += data.len() as u64;
        // Pipelined: the replies are collected as the window fills, and all of them by
        // `NbdClient::wait_writes` before the image is flushed.
        self.client
            .submit_write(offset, data)
            .map_err(io::Error::other)
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> io::Result<()> {
        if !self.write_zero_runs {
            return Ok(());
        }
        if self.zeroes.is_empty() {
            self.zeroes = vec![0u8; ZERO_CHUNK_BYTES];
        }
        let end = offset.saturating_add(length);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.client
                .submit_write(at, &self.zeroes[..n])
                .map_err(io::Error::other)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// What [`store_extents`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReport {
    /// The copy: ranges and bytes read from the source.
    pub copy: CopyReport,
    /// Bytes of data written into the image (zero runs not counted).
    pub data_bytes: u64,
    /// For a new full image (no parent): the block hashes of its content, taken from the data
    /// as it was copied (every byte outside the ranges is zero), so that its digest needs no
    /// second read.
    pub hashes: Option<vbackup_core::catalogue::BlockHashes>,
}

/// Creates `target` (a fresh qcow2 of the source's size, or an overlay of `parent`) and writes
/// the `ranges` `(offset, length)` read from `source` into it through a writable export. The
/// target's directory is created when missing; an existing target is refused. On failure the
/// partly written image is removed.
pub fn store_extents(
    source: &mut NbdClient,
    ranges: &[(u64, u64)],
    target: &Path,
    parent: Option<&Path>,
) -> Result<StoreReport, ImageError> {
    store_extents_observed(source, ranges, target, parent, &mut |_| {})
}

/// An [`ExtentSink`] passing what it is given on, and counting it for an observer.
struct ObservedSink<'s, 'o> {
    inner: &'s mut dyn ExtentSink,
    observer: &'o mut dyn FnMut(u64),
}

impl ExtentSink for ObservedSink<'_, '_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_data(offset, data)?;
        (self.observer)(data.len() as u64);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, length)?;
        (self.observer)(length);
        Ok(())
    }
}

/// [`store_extents`], calling `progress` with the bytes of each piece written (data or zero
/// run), so the bytes reported add up to the ranges' total length (for progress bars).
pub fn store_extents_observed(
    source: &mut NbdClient,
    ranges: &[(u64, u64)],
    target: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64),
) -> Result<StoreReport, ImageError> {
    if target.exists() {
        return Err(ImageError::TargetExists(target.to_owned()));
    }
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The export is the disk as it is now: an overlay takes its size, which a disk that grew
    // since the parent backup no longer shares with the parent.
    let size = source.info().size;
    let result = if NewImage::fits(ranges, size, parent.is_some()) {
        store_into_new_image(source, ranges, target, parent, progress)
    } else {
        store_through_qemu_nbd(source, ranges, target, parent, progress)
    };
    if result.is_err() {
        let _ = std::fs::remove_file(target);
    }
    result
}

/// [`store_extents_observed`] into an image qemu-img creates, written through qemu-nbd.
fn store_through_qemu_nbd(
    source: &mut NbdClient,
    ranges: &[(u64, u64)],
    target: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64),
) -> Result<StoreReport, ImageError> {
    match parent {
        Some(p) => create_overlay_sized(target, p, source.info().size)?,
        None => create_full(target, source.info().size)?,
    }
    let mut export = NbdExport::start(target, &ImageFormat::Qcow2, true)?;
    let mut writer = export.connect(&[])?;
    let mut sink = NbdImageSink::new(&mut writer, parent.is_some());
    let mut observed = ObservedSink {
        inner: &mut sink,
        observer: progress,
    };
    let (copy, hashes) = copy_hashing(source, ranges, &mut observed, parent.is_none())?;
    let data_bytes = sink.data_bytes;
    writer.wait_writes()?;
    writer.flush()?;
    writer.disconnect()?;
    export.stop();
    Ok(StoreReport {
        copy,
        data_bytes,
        hashes,
    })
}

/// Copies `ranges` of `source` into `sink`; with `hash` (a new full image: every byte outside
/// the ranges is zero), also the block hashes of the content, taken as it is copied.
fn copy_hashing(
    source: &mut NbdClient,
    ranges: &[(u64, u64)],
    sink: &mut dyn ExtentSink,
    hash: bool,
) -> Result<(CopyReport, Option<BlockHashes>), ImageError> {
    if !hash {
        return Ok((copy::copy_ranges(source, ranges, sink)?, None));
    }
    let size = source.info().size;
    let kind = DigestKind::NEW_IMAGES;
    let mut hashing = crate::digest::HashingSink::new(sink, kind, size, ranges);
    let copy = copy::copy_ranges(source, ranges, &mut hashing)?;
    Ok((copy, hashing.finish()))
}

/// [`store_extents_observed`] writing the image straight into its file ([`NewImage`]).
fn store_into_new_image(
    source: &mut NbdClient,
    ranges: &[(u64, u64)],
    target: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64),
) -> Result<StoreReport, ImageError> {
    let size = source.info().size;
    let mut image = NewImage::create(target, size, parent, ranges)?;
    let mut observed = ObservedSink {
        inner: &mut image,
        observer: progress,
    };
    let (copy, hashes) = copy_hashing(source, ranges, &mut observed, parent.is_none())?;
    image.sync()?;
    Ok(StoreReport {
        copy,
        data_bytes: image.data_bytes,
        hashes,
    })
}

/// Bytes read per request batch while hashing.
const DIGEST_CHUNK_BYTES: usize = 8 << 20;

/// SHA-256 of everything an NBD client reads, in order.
pub fn digest_export(client: &mut NbdClient) -> Result<Digest, ImageError> {
    let size = client.info().size;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; DIGEST_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(DIGEST_CHUNK_BYTES as u64) as usize;
        client.read_exact_at(offset, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(Digest::sha256(&hasher.finalize().into()))
}

/// The content digest of an image read through its backing chain.
pub fn content_digest(path: &Path, format: &ImageFormat) -> Result<Digest, ImageError> {
    let mut export = NbdExport::start(path, format, false)?;
    crate::children::test_pause_in_digest(export.pid().unwrap_or(0));
    let mut client = export.connect(&[BASE_ALLOCATION])?;
    let digest = digest_export(&mut client)?;
    let _ = client.disconnect();
    export.stop();
    Ok(digest)
}

/// Describes a finished backup image for the catalogue: sizes from `qemu-img info` and the
/// content digest.
pub fn describe(disk: &str, path: &Path) -> Result<BackupImage, ImageError> {
    let chain = backing_chain(path)?;
    let top = chain.first().ok_or_else(|| {
        ImageError::Tool(ToolError::Output {
            tool: "qemu-img info".into(),
            reason: "empty backing chain".into(),
        })
    })?;
    let digest = content_digest(path, &top.format)?;
    Ok(BackupImage {
        disk: disk.to_owned(),
        path: path.to_string_lossy().into_owned(),
        format: top.format.clone(),
        virtual_size_bytes: top.virtual_size_bytes,
        allocated_size_bytes: top.actual_size_bytes,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_chain_json_is_read_top_first() {
        let json = br#"[
          {"virtual-size": 67108864, "filename": "/b/inc.qcow2", "format": "qcow2",
           "actual-size": 200704, "full-backing-filename": "/b/full.qcow2",
           "backing-filename": "/b/full.qcow2", "backing-filename-format": "qcow2"},
          {"virtual-size": 67108864, "filename": "/b/full.qcow2", "format": "qcow2",
           "actual-size": 1245184}
        ]"#;
        let chain = parse_backing_chain(json).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].backing.as_deref(), Some("/b/full.qcow2"));
        assert_eq!(chain[0].actual_size_bytes, 200_704);
        assert_eq!(chain[1].backing, None);
        assert_eq!(chain[1].virtual_size_bytes, 64 << 20);
    }

    #[test]
    fn backing_chain_json_without_sizes_is_an_error() {
        let err = parse_backing_chain(br#"[{"filename": "/x", "format": "raw"}]"#).unwrap_err();
        assert!(err.to_string().contains("virtual-size"), "{err}");
        assert!(parse_backing_chain(b"{}").is_err());
    }
}

/// File holding a domain's default backup target directory, in the domain's store directory.
pub const DEFAULT_TARGET_FILE: &str = "backup-target";

/// Why loading or applying catalogue changes failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueIoError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// An image operation failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A stored record does not parse.
    #[error("backup record {uuid}: {source}")]
    Record {
        /// The record's name.
        uuid: String,
        /// The parse error.
        source: vbackup_core::xml::XmlError,
    },
    /// The stored records do not form a valid catalogue.
    #[error(transparent)]
    Catalogue(#[from] vbackup_core::catalogue::CatalogueError),
    /// Deleting a checkpoint a deleted backup released failed (or no engine session was
    /// given to carry it out); the backups' records are untouched.
    #[error("cannot delete checkpoint '{name}': {reason}")]
    Checkpoint {
        /// The checkpoint.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Loads a domain's catalogue: every `backups/<uuid>.xml` record and the default target.
pub fn load_catalogue(
    store: &crate::store::DomainStore,
) -> Result<vbackup_core::catalogue::Catalogue, CatalogueIoError> {
    use crate::store::Collection;
    let mut records = Vec::new();
    for (uuid, xml) in store.load_entries(Collection::Backups)? {
        let record = vbackup_core::catalogue::ManagedBackup::parse(&xml)
            .map_err(|source| CatalogueIoError::Record { uuid, source })?;
        records.push(record);
    }
    let target_path = store.dir().join(DEFAULT_TARGET_FILE);
    let default_target = match std::fs::read_to_string(&target_path) {
        Ok(text) => Some(text.trim_end_matches('\n').to_owned()).filter(|t| !t.is_empty()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(ImageError::Io(e).into()),
    };
    Ok(vbackup_core::catalogue::Catalogue::load(
        store.name(),
        records,
        default_target,
    )?)
}

/// Carries out catalogue operations in order: rebases images, writes and deletes records
/// atomically through the store, removes image files (a file already gone is not an error,
/// so an interrupted deletion can be repeated), and records the default target. Checkpoint
/// deletions need the engine: they are refused here (see [`apply_ops_with`]).
pub fn apply_ops(
    store: &crate::store::DomainStore,
    ops: &[vbackup_core::catalogue::CatalogueOp],
) -> Result<(), CatalogueIoError> {
    apply_ops_with(store, ops, &mut |_| {
        Err("checkpoint deletions go through the engine's session".into())
    })
}

/// [`apply_ops`], with checkpoint deletions handed to `delete_checkpoint` (which must treat a
/// checkpoint already gone as deleted). The first failure stops the sequence.
pub fn apply_ops_with(
    store: &crate::store::DomainStore,
    ops: &[vbackup_core::catalogue::CatalogueOp],
    delete_checkpoint: &mut dyn FnMut(&str) -> Result<(), String>,
) -> Result<(), CatalogueIoError> {
    use crate::store::Collection;
    use vbackup_core::catalogue::CatalogueOp;
    for op in ops {
        match op {
            CatalogueOp::DeleteCheckpoint { name } => {
                delete_checkpoint(name).map_err(|reason| CatalogueIoError::Checkpoint {
                    name: name.clone(),
                    reason,
                })?;
            }
            CatalogueOp::RebaseImage { path, backing } => {
                rebase(Path::new(path), backing.as_deref().map(Path::new))?;
            }
            CatalogueOp::PutBackup(record) => {
                store.write_entry(Collection::Backups, &record.uuid, &record.format())?;
            }
            CatalogueOp::DeleteBackup { uuid } => {
                store.remove_entry(Collection::Backups, uuid)?;
            }
            CatalogueOp::RemoveImage { path } => match std::fs::remove_file(path) {
                Ok(()) => {
                    // Remove the per-backup `<target>/<uuid>/` directory once its last
                    // image is gone; any other directory, or one with files left, stays.
                    if let Some(dir) = Path::new(path).parent()
                        && dir
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| vbackup_core::catalogue::validate_uuid(n).is_ok())
                    {
                        let _ = std::fs::remove_dir(dir);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::Io(e).into()),
            },
            CatalogueOp::SetDefaultTarget(target) => {
                let text = target.as_deref().unwrap_or("");
                crate::store::write_atomic(store.dir(), DEFAULT_TARGET_FILE, text.as_bytes())?;
            }
        }
    }
    Ok(())
}
