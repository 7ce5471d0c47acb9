//! A harness for live tests against real qemu-storage-daemon, usable from any crate's tests.
//!
//! Contract: a [`LiveLab`] owns a temporary directory and every daemon started through it.
//! Dropping the lab kills each of those daemons by its pid and reaps it, whatever state the test
//! left it in, so a failing test never leaves a process behind; then the directory is removed.
//! Images are made with `qemu-img`, guest data is written through the daemon's writable NBD guest
//! export with `qemu-io`, and images are compared with `qemu-img compare`. Every tool failure is
//! a [`LiveError`] carrying the tool's stderr.
//!
//! Tests gate on [`tools_available`] and return early (printing why) when the QEMU tools are
//! missing.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use serde_json::Value;
use vbackup_core::model::ImageFormat;

use crate::images::{self, ToolError, tool_failure};
use crate::qsd::{Qsd, QsdDisk, QsdError, QsdOptions};

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A tool could not be run, failed, or printed what cannot be understood.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The daemon failed.
    #[error(transparent)]
    Qsd(#[from] QsdError),
    /// A file system failure.
    #[error("harness IO error: {0}")]
    Io(#[from] io::Error),
}

/// The tools every live test needs.
pub const REQUIRED_TOOLS: [&str; 3] = ["qemu-storage-daemon", "qemu-img", "qemu-io"];

/// Whether every tool in [`REQUIRED_TOOLS`] can be run.
pub fn tools_available() -> bool {
    REQUIRED_TOOLS.iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Runs a command and returns its output if it exited with status 0.
pub fn run_tool(command: &mut Command) -> Result<Output, LiveError> {
    Ok(images::run_tool(command)?)
}

/// Creates an image with `qemu-img create` (qcow2 images get 64 KiB clusters).
pub fn create_image(path: &Path, format: &ImageFormat, size_bytes: u64) -> Result<(), LiveError> {
    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", format.name()]);
    if *format == ImageFormat::Qcow2 {
        command.args(["-o", "cluster_size=65536"]);
    }
    command.arg(path).arg(size_bytes.to_string());
    run_tool(&mut command).map(|_| ())
}

/// Creates a qcow2 overlay of `backing` (whose format is `backing_format`).
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: &ImageFormat,
) -> Result<(), LiveError> {
    run_tool(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                backing_format.name(),
                "-b",
            ])
            .arg(backing)
            .arg(path),
    )
    .map(|_| ())
}

/// Writes `len` bytes of `pattern` at `offset` through an NBD URI (a guest export), as a guest
/// would.
pub fn write_pattern(uri: &str, pattern: u8, offset: u64, len: u64) -> Result<(), LiveError> {
    qemu_io(
        uri,
        &format!("write -P {pattern:#04x} {offset} {len}"),
        false,
    )
}

/// Checks that `len` bytes at `offset` of an NBD URI all hold `pattern`. `Ok(false)` when they
/// do not.
pub fn verify_pattern(uri: &str, pattern: u8, offset: u64, len: u64) -> Result<bool, LiveError> {
    match qemu_io(uri, &format!("read -P {pattern:#04x} {offset} {len}"), true) {
        Ok(()) => Ok(true),
        Err(LiveError::Tool(ToolError::Tool { stderr, .. }))
            if stderr.contains("Pattern verification failed") =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn qemu_io(uri: &str, op: &str, read_only: bool) -> Result<(), LiveError> {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    if read_only {
        command.arg("-r");
    }
    command.args(["-c", op, uri]);
    let output = run_tool(&mut command)?;
    // qemu-io reports some failures on stdout with status 0.
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stdout.contains("failed") || stdout.contains("error") {
        return Err(ToolError::Tool {
            command: format!("qemu-io -c '{op}' {uri}"),
            status: output.status.to_string(),
            stderr: stdout.trim().to_owned(),
        }
        .into());
    }
    Ok(())
}

/// `qemu-img compare -U` of two images: `Ok(true)` when their guest-visible content is
/// identical. `-U` lets it read images a running daemon holds open.
pub fn images_identical(
    a: &Path,
    a_format: &ImageFormat,
    b: &Path,
    b_format: &ImageFormat,
) -> Result<bool, LiveError> {
    let mut command = Command::new("qemu-img");
    command
        .args([
            "compare",
            "-U",
            "-f",
            a_format.name(),
            "-F",
            b_format.name(),
        ])
        .arg(a)
        .arg(b);
    let output = command.output().map_err(|source| ToolError::Spawn {
        tool: "qemu-img".to_owned(),
        source,
    })?;
    // Exit status 0: identical; 1: different; anything else: an error.
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(tool_failure(&command, &output).into()),
    }
}

/// A bitmap as recorded in a qcow2 header (`qemu-img info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDiskBitmap {
    /// Its name.
    pub name: String,
    /// Its flags (`auto` = enabled, `in-use` = open or not closed cleanly).
    pub flags: Vec<String>,
    /// Its granularity.
    pub granularity_bytes: u64,
}

/// The persistent bitmaps in a qcow2 image's header, read with `qemu-img info -U`. While a
/// daemon has the image open the header lags behind memory (new bitmaps appear at close).
pub fn on_disk_bitmaps(path: &Path) -> Result<Vec<OnDiskBitmap>, LiveError> {
    let output = run_tool(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path),
    )?;
    let info: Value = serde_json::from_slice(&output.stdout).map_err(|e| ToolError::Output {
        tool: "qemu-img info".to_owned(),
        reason: e.to_string(),
    })?;
    let Some(bitmaps) = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
    else {
        return Ok(Vec::new());
    };
    Ok(bitmaps
        .iter()
        .map(|b| OnDiskBitmap {
            name: b["name"].as_str().unwrap_or_default().to_owned(),
            flags: b["flags"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            granularity_bytes: b["granularity"].as_u64().unwrap_or_default(),
        })
        .collect())
}

/// The `dirty-bitmaps` records of one node, from `query-named-block-nodes {"flat": true}`.
pub fn node_bitmaps(qsd: &mut Qsd, node: &str) -> Result<Vec<Value>, LiveError> {
    let nodes = qsd.execute("query-named-block-nodes", serde_json::json!({"flat": true}))?;
    let node = nodes
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node-name"].as_str() == Some(node)))
        .ok_or_else(|| ToolError::Output {
            tool: "query-named-block-nodes".to_owned(),
            reason: format!("no node {node}"),
        })?;
    Ok(node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A temporary directory plus every daemon started in it; see the module contract.
#[derive(Debug)]
pub struct LiveLab {
    dir: tempfile::TempDir,
    /// Daemons spawned through the lab and not yet reaped. Only own children are tracked:
    /// their pids cannot be reused by another process before they are reaped, so killing by
    /// pid can never hit someone else's process.
    daemons: Vec<Child>,
}

impl LiveLab {
    /// A new lab in a fresh temporary directory. The directory name is kept short because unix
    /// socket paths are limited to 107 bytes.
    pub fn new() -> Result<LiveLab, LiveError> {
        let dir = tempfile::Builder::new()
            .prefix("vbk-")
            .tempdir_in(std::env::temp_dir())?;
        Ok(LiveLab {
            dir,
            daemons: Vec::new(),
        })
    }

    /// The lab directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the lab directory.
    pub fn file(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.dir.path().join(name.as_ref())
    }

    /// Creates `name` in the lab with `qemu-img create` and returns its path.
    pub fn image(
        &self,
        name: &str,
        format: ImageFormat,
        size_bytes: u64,
    ) -> Result<PathBuf, LiveError> {
        let path = self.file(name);
        create_image(&path, &format, size_bytes)?;
        Ok(path)
    }

    /// Starts a daemon in run directory `run` of the lab with guest exports on, and takes
    /// ownership of its process so the lab stops it whatever happens.
    pub fn start_qsd(&mut self, run: &str, disks: &[QsdDisk]) -> Result<Qsd, LiveError> {
        self.start_qsd_with(run, disks, &QsdOptions::default())
    }

    /// [`LiveLab::start_qsd`] with explicit options.
    pub fn start_qsd_with(
        &mut self,
        run: &str,
        disks: &[QsdDisk],
        options: &QsdOptions,
    ) -> Result<Qsd, LiveError> {
        let mut qsd = Qsd::start(&self.file(run), disks, options)?;
        if let Some(child) = qsd.take_child() {
            self.daemons.push(child);
        }
        Ok(qsd)
    }

    /// Takes ownership of a daemon process spawned elsewhere (with [`Qsd::take_child`]), so the
    /// lab stops and reaps it.
    pub fn adopt(&mut self, child: Child) {
        self.daemons.push(child);
    }

    /// Reconnects to the daemon in run directory `run`.
    pub fn reconnect(&self, run: &str) -> Result<Qsd, LiveError> {
        Ok(Qsd::reconnect(&self.file(run), Duration::from_secs(10))?)
    }

    /// Reaps daemons of this lab that have exited (after `quit` or a kill), so none lingers as
    /// a zombie while the test goes on.
    pub fn reap_exited(&mut self) {
        self.daemons
            .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
    }

    /// Pids of the lab's daemons that still run.
    pub fn running_pids(&mut self) -> Vec<u32> {
        self.reap_exited();
        self.daemons.iter().map(Child::id).collect()
    }
}

impl Drop for LiveLab {
    fn drop(&mut self) {
        for child in &mut self.daemons {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
