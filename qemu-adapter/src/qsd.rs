//! Launching, reconnecting to and stopping qemu-storage-daemon for a managed domain.
//!
//! Contract:
//! - A daemon lives in a run directory holding `qsd.pid` (written by the daemon), `qmp.sock`
//!   (its QMP monitor), `nbd.sock` (its NBD server, when guest exports are on) and `qsd.log`
//!   (its stdout and stderr). The directory is the daemon's identity: [`Qsd::reconnect`] finds
//!   a running daemon from it alone.
//! - [`Qsd::start`] spawns the daemon in its own process group, so it outlives vbackup, and
//!   returns once QMP is negotiated and every disk is attached. Each layer `i` of disk `T` (0 =
//!   top) becomes a `file` node `vbk-T-i-file` under a format node `vbk-T-i-format` (see
//!   [`format_node`]); a qcow2 layer's `backing` is the next layer's format node, or `null` for
//!   the last, so QEMU never opens images the definition does not name. Backing layers are opened
//!   read-only with `auto-read-only`, as libvirt does.
//! - With guest exports on, a raw node `vbk-T-guest` over the top format node is exported
//!   writable over NBD as `guest-T` ([`Qsd::guest_export_uri`]); this is the "guest" that tests
//!   and the demo write through. QEMU runs at most one NBD server per process, so a pull backup
//!   on such a daemon must add its exports to this server ([`Qsd::nbd_socket`]) rather than start
//!   another.
//! - The QMP monitor serves one client at a time: a second handle can only reconnect after the
//!   first handle is dropped (its connection closed).
//! - [`Qsd::quit`] sends `quit` (QEMU then closes every image, which writes persistent bitmaps)
//!   and waits for the process to end; [`Qsd::kill`] sends SIGKILL (bitmaps are then left
//!   `in-use`, and ones created since the last open are lost). A daemon whose pid is gone, or
//!   whose pid now belongs to another program, is [`QsdError::DaemonGone`].
//! - Dropping a [`Qsd`] never stops the daemon: it keeps running for the next vbackup
//!   invocation. If this process spawned it, the child is not reaped by the drop either; tests
//!   use [`Qsd::take_child`] to own the reaping (see `live`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vbackup_core::model::{DiskDef, ImageFormat};

use crate::qmp_socket::{QmpSocket, QmpSocketError};

/// The daemon binary, looked up in `PATH`.
pub const QSD_PROGRAM: &str = "qemu-storage-daemon";

/// A unix socket path must fit `sockaddr_un.sun_path` (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// How long a daemon that hung up the QMP socket may take to finish dying.
const HANGUP_GRACE: Duration = Duration::from_secs(1);

/// How often startup and shutdown are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Errors of the launcher.
#[derive(Debug, thiserror::Error)]
pub enum QsdError {
    /// No pid file: no daemon was started in this run directory (or it exited cleanly).
    #[error("no qemu-storage-daemon runs in {run_dir}")]
    NotRunning {
        /// The run directory.
        run_dir: PathBuf,
    },
    /// The pid file names a process that is gone (killed, crashed) or is another program now.
    #[error("qemu-storage-daemon (pid {pid}) is gone")]
    DaemonGone {
        /// The pid from the pid file or of the spawned child.
        pid: u32,
    },
    /// The daemon runs, but another client holds its QMP monitor (which serves one at a time).
    #[error("qemu-storage-daemon (pid {pid}) is busy with another QMP client")]
    MonitorBusy {
        /// Its pid.
        pid: u32,
    },
    /// A daemon already runs in this run directory.
    #[error("qemu-storage-daemon already runs in {run_dir} (pid {pid})")]
    AlreadyRunning {
        /// The run directory.
        run_dir: PathBuf,
        /// Its pid.
        pid: u32,
    },
    /// The daemon could not be spawned (missing binary, for instance).
    #[error("cannot run {QSD_PROGRAM}: {source}")]
    Spawn {
        /// The underlying error.
        source: io::Error,
    },
    /// The daemon exited during startup.
    #[error("qemu-storage-daemon exited during startup ({status}): {log}")]
    StartupFailed {
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// The daemon did not come up, or did not exit, in time.
    #[error("qemu-storage-daemon did not {what} within {timeout:?}")]
    Timeout {
        /// What it did not do.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// A disk that cannot be attached as defined.
    #[error("disk {target}: {reason}")]
    BadDisk {
        /// The disk's target.
        target: String,
        /// Why.
        reason: String,
    },
    /// A socket path longer than a unix socket address can hold.
    #[error("socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A QMP failure while talking to the daemon.
    #[error(transparent)]
    Qmp(#[from] QmpSocketError),
    /// A file system or process operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// One image of a disk's chain, as the daemon opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QsdLayer {
    /// Path of the image file.
    pub path: PathBuf,
    /// Its format: `qcow2` or `raw` (the two the daemon attaches).
    pub format: ImageFormat,
}

/// A disk to attach: a target name and its chain, top image first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QsdDisk {
    /// The guest-visible name (`vda`); it becomes part of node names.
    pub target: String,
    /// Top image first, then its backing images.
    pub layers: Vec<QsdLayer>,
}

impl QsdDisk {
    /// A disk of one image.
    pub fn single(target: &str, path: impl Into<PathBuf>, format: ImageFormat) -> QsdDisk {
        QsdDisk {
            target: target.to_owned(),
            layers: vec![QsdLayer {
                path: path.into(),
                format,
            }],
        }
    }

    /// Converts a domain disk: every layer must be a local file in qcow2 or raw format.
    pub fn from_disk_def(disk: &DiskDef) -> Result<QsdDisk, QsdError> {
        let bad = |reason: String| QsdError::BadDisk {
            target: disk.target.clone(),
            reason,
        };
        let layers = disk
            .layers
            .iter()
            .map(|layer| {
                let path = layer
                    .path
                    .as_ref()
                    .ok_or_else(|| bad("a layer has no local path".to_owned()))?;
                Ok(QsdLayer {
                    path: PathBuf::from(path),
                    format: layer.format.clone(),
                })
            })
            .collect::<Result<Vec<_>, QsdError>>()?;
        let qsd_disk = QsdDisk {
            target: disk.target.clone(),
            layers,
        };
        qsd_disk.validate()?;
        Ok(qsd_disk)
    }

    fn validate(&self) -> Result<(), QsdError> {
        let bad = |reason: &str| {
            Err(QsdError::BadDisk {
                target: self.target.clone(),
                reason: reason.to_owned(),
            })
        };
        // QEMU node names: a letter first, then letters, digits, '-', '.', '_'; at most 31
        // bytes. The longest name built here is "vbk-T-NN-format".
        let valid_target = self.target.len() <= 12
            && self.target.starts_with(|c: char| c.is_ascii_alphabetic())
            && self
                .target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_target {
            return bad("target must be 1-12 ASCII letters, digits or '_', starting with a letter");
        }
        if self.layers.is_empty() {
            return bad("no media");
        }
        if self.layers.len() > 99 {
            return bad("more than 99 layers");
        }
        for (index, layer) in self.layers.iter().enumerate() {
            match layer.format {
                ImageFormat::Qcow2 => {}
                ImageFormat::Raw if index + 1 == self.layers.len() => {}
                ImageFormat::Raw => return bad("a raw layer cannot have a backing layer"),
                ImageFormat::Other(_) => return bad("only qcow2 and raw images are supported"),
            }
        }
        Ok(())
    }
}

/// The node name of a disk layer's format node (`vbk-vda-0-format`); layer 0 is the top.
pub fn format_node(target: &str, layer: usize) -> String {
    format!("vbk-{target}-{layer}-format")
}

/// The node name of a disk layer's file node (`vbk-vda-0-file`).
pub fn file_node(target: &str, layer: usize) -> String {
    format!("vbk-{target}-{layer}-file")
}

/// The node name of the raw node the guest export writes through (`vbk-vda-guest`).
pub fn guest_node(target: &str) -> String {
    format!("vbk-{target}-guest")
}

/// The NBD export name of a disk's writable guest export (`guest-vda`).
pub fn guest_export_name(target: &str) -> String {
    format!("guest-{target}")
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct QsdOptions {
    /// Start the NBD server and one writable guest export per disk.
    pub guest_exports: bool,
    /// Limit for startup, each QMP command during startup, and shutdown.
    pub timeout: Duration,
}

impl Default for QsdOptions {
    fn default() -> Self {
        QsdOptions {
            guest_exports: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How long a daemon that accepted `quit` is given to close its images before it is killed.
pub const QUIT_EXIT_TIMEOUT: Duration = Duration::from_secs(600);

/// The files of a run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    /// The directory.
    pub dir: PathBuf,
    /// `qsd.pid`.
    pub pid_file: PathBuf,
    /// `qmp.sock`.
    pub qmp_socket: PathBuf,
    /// `nbd.sock`.
    pub nbd_socket: PathBuf,
    /// `qsd.log`.
    pub log: PathBuf,
}

impl RunDir {
    /// The files of `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> RunDir {
        let dir = dir.into();
        RunDir {
            pid_file: dir.join("qsd.pid"),
            qmp_socket: dir.join("qmp.sock"),
            nbd_socket: dir.join("nbd.sock"),
            log: dir.join("qsd.log"),
            dir,
        }
    }

    /// The pid in the pid file; `None` if there is no pid file.
    pub fn read_pid(&self) -> Result<Option<u32>, QsdError> {
        match fs::read_to_string(&self.pid_file) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| QsdError::Io {
                op: "parse pid file",
                path: self.pid_file.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, "not a pid"),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(QsdError::Io {
                op: "read",
                path: self.pid_file.clone(),
                source,
            }),
        }
    }
}

/// Whether `pid` is a live (not zombie) qemu-storage-daemon; see [`program_alive`].
pub fn daemon_alive(pid: u32) -> bool {
    program_alive(pid, QSD_PROGRAM)
}

/// Whether `pid` is a live (not zombie) process of `program`, read from `/proc/PID/stat`.
///
/// The command name there (at most 15 bytes, set at exec) guards against pid reuse. It is read
/// from `stat` rather than `cmdline` because `cmdline` reads empty while a killed process is
/// still tearing down, and such a process still holds its image locks: it counts as alive
/// until it is a zombie. A zombie leader whose other threads are still exiting counts as alive
/// too: Linux reports the leader as `Z` before the whole thread group is gone.
pub fn program_alive(pid: u32, program: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may itself contain ')', so split at the last one.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next();
    let expected = &program[..program.len().min(15)];
    if comm != expected || state.is_none() || state == Some("X") {
        return false;
    }
    if state != Some("Z") {
        return true;
    }
    fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| tasks.count() > 1)
}

/// Sends SIGKILL to `pid`. A pid that no longer exists is not an error.
pub fn kill_pid(pid: u32) -> Result<(), QsdError> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    let Some(raw) = raw else {
        return Err(QsdError::DaemonGone { pid });
    };
    match rustix::process::kill_process(raw, rustix::process::Signal::KILL) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(QsdError::Io {
            op: "kill",
            path: PathBuf::from(format!("/proc/{pid}")),
            source: e.into(),
        }),
    }
}

/// Escapes a value for QEMU's `key=value,...` option syntax, where `,` is doubled.
fn qemu_opt_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// What [`Qsd::attach_or_start`] found in a run directory.
#[derive(Debug)]
pub enum Found {
    /// A daemon was running: its pid, and the connection with its greeting read.
    Running {
        /// The daemon's pid.
        pid: u32,
        /// Not negotiated yet.
        qmp: QmpSocket,
    },
    /// None ran, so one was started.
    Started {
        /// The new daemon's handle (negotiated).
        qsd: Qsd,
        /// The pid of a daemon whose pid file was left behind by its death.
        replaced: Option<u32>,
    },
}

/// A handle on a running qemu-storage-daemon with a negotiated QMP connection.
#[derive(Debug)]
pub struct Qsd {
    run: RunDir,
    pid: u32,
    child: Option<Child>,
    qmp: QmpSocket,
    timeout: Duration,
}

impl Qsd {
    /// Starts a daemon in `run_dir` (created if needed) over `disks` and attaches them. Fails
    /// with [`QsdError::AlreadyRunning`] if a live daemon already owns the directory. On any
    /// failure after the spawn, the new daemon is killed and reaped.
    pub fn start(run_dir: &Path, disks: &[QsdDisk], options: &QsdOptions) -> Result<Qsd, QsdError> {
        for disk in disks {
            disk.validate()?;
        }
        let run = RunDir::new(run_dir);
        for socket in [&run.qmp_socket, &run.nbd_socket] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
                return Err(QsdError::SocketPathTooLong {
                    path: socket.clone(),
                });
            }
        }
        fs::create_dir_all(&run.dir).map_err(|source| QsdError::Io {
            op: "create directory",
            path: run.dir.clone(),
            source,
        })?;
        if let Some(pid) = run.read_pid()?
            && daemon_alive(pid)
        {
            return Err(QsdError::AlreadyRunning {
                run_dir: run.dir.clone(),
                pid,
            });
        }
        // Leftovers of a daemon that died without cleaning up.
        for stale in [&run.pid_file, &run.qmp_socket, &run.nbd_socket] {
            match fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(QsdError::Io {
                        op: "remove",
                        path: stale.clone(),
                        source,
                    });
                }
            }
        }
        let mut child = spawn(&run)?;
        let deadline = Instant::now() + options.timeout;
        let started = wait_for_startup(&run, &mut child, deadline, options.timeout);
        let (pid, qmp) = match started {
            Ok(started) => started,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut qsd = Qsd {
            run,
            pid,
            child: Some(child),
            qmp,
            timeout: options.timeout,
        };
        if let Err(e) = qsd.attach_disks(disks, options.guest_exports) {
            if let Some(mut child) = qsd.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(e);
        }
        Ok(qsd)
    }

    /// Connects to the daemon already running in `run_dir`: [`QsdError::NotRunning`] without a
    /// pid file, [`QsdError::DaemonGone`] if its process is gone.
    pub fn reconnect(run_dir: &Path, timeout: Duration) -> Result<Qsd, QsdError> {
        let (pid, qmp) = Qsd::attach_unnegotiated(run_dir, timeout)?;
        Qsd::negotiated(run_dir, pid, qmp, timeout)
    }

    /// The handle of the running daemon `pid` of `run_dir`, once `qmp` (its greeting read) is
    /// negotiated.
    fn negotiated(
        run_dir: &Path,
        pid: u32,
        mut qmp: QmpSocket,
        timeout: Duration,
    ) -> Result<Qsd, QsdError> {
        let deadline = Instant::now() + timeout;
        qmp.negotiate(deadline).map_err(|e| match e {
            _ if !daemon_alive(pid) => QsdError::DaemonGone { pid },
            other => QsdError::Qmp(other),
        })?;
        Ok(Qsd {
            run: RunDir::new(run_dir),
            pid,
            child: None,
            qmp,
            timeout,
        })
    }

    /// Connects to the daemon already running in `run_dir` and reads its greeting (which it
    /// sends only to the one client its monitor serves), but leaves the negotiation to the
    /// caller: its pid and the connection. Errors as [`Qsd::reconnect`].
    pub fn attach_unnegotiated(
        run_dir: &Path,
        timeout: Duration,
    ) -> Result<(u32, QmpSocket), QsdError> {
        let run = RunDir::new(run_dir);
        let pid = run.read_pid()?.ok_or_else(|| QsdError::NotRunning {
            run_dir: run.dir.clone(),
        })?;
        if !daemon_alive(pid) {
            return Err(QsdError::DaemonGone { pid });
        }
        let qmp = QmpSocket::connect_unnegotiated(&run.qmp_socket, Instant::now() + timeout)
            .map_err(|e| match e {
                // The process may have died between the check and the connect.
                _ if !daemon_alive(pid) => QsdError::DaemonGone { pid },
                // The monitor serves one client; a live daemon that sends no greeting is
                // talking to someone else.
                QmpSocketError::Timeout { .. } => QsdError::MonitorBusy { pid },
                other => QsdError::Qmp(other),
            })?;
        Ok((pid, qmp))
    }

    /// Reconnects to the daemon running in `run_dir`, or starts one over `disks` if none runs
    /// (no pid file, or its process is gone). A daemon that is running is trusted to have the
    /// disks attached that it was started with; reconciling them is the caller's business.
    pub fn connect_or_start(
        run_dir: &Path,
        disks: &[QsdDisk],
        options: &QsdOptions,
    ) -> Result<Qsd, QsdError> {
        match Qsd::attach_or_start(run_dir, disks, options)? {
            Found::Running { pid, qmp } => Qsd::negotiated(run_dir, pid, qmp, options.timeout),
            Found::Started { qsd, .. } => Ok(qsd),
        }
    }

    /// [`Qsd::connect_or_start`], leaving a running daemon's connection un-negotiated (for a
    /// caller that negotiates its own session).
    pub fn attach_or_start(
        run_dir: &Path,
        disks: &[QsdDisk],
        options: &QsdOptions,
    ) -> Result<Found, QsdError> {
        match Qsd::attach_unnegotiated(run_dir, options.timeout) {
            Ok((pid, qmp)) => Ok(Found::Running { pid, qmp }),
            Err(e @ (QsdError::NotRunning { .. } | QsdError::DaemonGone { .. })) => {
                let replaced = match e {
                    QsdError::DaemonGone { pid } => Some(pid),
                    _ => None,
                };
                let qsd = Qsd::start(run_dir, disks, options)?;
                Ok(Found::Started { qsd, replaced })
            }
            Err(e) => Err(e),
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The run directory's files.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    /// The NBD server's socket (running when guest exports are on).
    pub fn nbd_socket(&self) -> &Path {
        &self.run.nbd_socket
    }

    /// The URI of a disk's writable guest export, for `qemu-io -f raw URI` or an NBD client.
    pub fn guest_export_uri(&self, target: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            guest_export_name(target),
            self.run.nbd_socket.display()
        )
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> &mut QmpSocket {
        &mut self.qmp
    }

    /// Runs one QMP command with the handle's timeout; `Value::Null` sends no `arguments`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QsdError> {
        let deadline = Instant::now() + self.timeout;
        let arguments = (!arguments.is_null()).then_some(arguments);
        self.execute_or_gone(|qmp| qmp.execute(command, arguments, deadline))
    }

    /// Gives up the handle but keeps the QMP connection (the daemon keeps running).
    pub fn into_qmp(self) -> QmpSocket {
        self.qmp
    }

    /// Takes the spawned child process, if this handle spawned the daemon, so the caller can
    /// reap it after the daemon ends.
    pub fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Whether the daemon still runs.
    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => daemon_alive(self.pid),
        }
    }

    /// Sends `quit` and waits for the daemon to exit; images are closed cleanly, so persistent
    /// bitmaps reach the disk. Closing writes the images' cached data out first, which can take
    /// long on slow storage, so the exit is awaited for [`QUIT_EXIT_TIMEOUT`] (at least the
    /// handle's timeout): killing the daemon earlier would lose every bitmap it holds. If it
    /// still has not exited it is killed and [`QsdError::Timeout`] returned.
    pub fn quit(mut self) -> Result<(), QsdError> {
        if !self.is_alive() {
            return Err(QsdError::DaemonGone { pid: self.pid });
        }
        let deadline = Instant::now() + self.timeout;
        match self.qmp.execute("quit", None, deadline) {
            // The daemon may close the socket before its reply is read.
            Ok(_) | Err(QmpSocketError::Closed) => {}
            Err(e) => return Err(e.into()),
        }
        let exit_timeout = self.timeout.max(QUIT_EXIT_TIMEOUT);
        if self.wait_exit(Instant::now() + exit_timeout) {
            return Ok(());
        }
        self.kill_and_reap()?;
        Err(QsdError::Timeout {
            what: "exit after quit",
            timeout: exit_timeout,
        })
    }

    /// Kills the daemon with SIGKILL, as a crash would, and waits until it is gone.
    pub fn kill(mut self) -> Result<(), QsdError> {
        self.kill_and_reap()
    }

    fn kill_and_reap(&mut self) -> Result<(), QsdError> {
        kill_pid(self.pid)?;
        let deadline = Instant::now() + self.timeout;
        if self.wait_exit(deadline) {
            Ok(())
        } else {
            Err(QsdError::Timeout {
                what: "die after SIGKILL",
                timeout: self.timeout,
            })
        }
    }

    /// Polls until the process is gone (and reaped, if it is our child).
    fn wait_exit(&mut self, deadline: Instant) -> bool {
        loop {
            let gone = match &mut self.child {
                Some(child) => !matches!(child.try_wait(), Ok(None)),
                None => !daemon_alive(self.pid),
            };
            if gone {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn execute_or_gone(
        &mut self,
        run: impl FnOnce(&mut QmpSocket) -> Result<Value, QmpSocketError>,
    ) -> Result<Value, QsdError> {
        run(&mut self.qmp).map_err(|e| match e {
            // A hang-up is usually a death in progress: the socket closes while the process is
            // still tearing down, so give it a moment before telling the two apart.
            QmpSocketError::Closed if self.wait_exit(Instant::now() + HANGUP_GRACE) => {
                QsdError::DaemonGone { pid: self.pid }
            }
            other => QsdError::Qmp(other),
        })
    }

    /// Attaches every disk (bottom layer first) and, if asked, the guest exports.
    fn attach_disks(&mut self, disks: &[QsdDisk], guest_exports: bool) -> Result<(), QsdError> {
        for disk in disks {
            let count = disk.layers.len();
            for (index, layer) in disk.layers.iter().enumerate().rev() {
                let read_only = index > 0;
                let mut file = json!({
                    "driver": "file",
                    "node-name": file_node(&disk.target, index),
                    "filename": layer.path.display().to_string(),
                });
                let mut format = json!({
                    "driver": layer.format.name(),
                    "node-name": format_node(&disk.target, index),
                    "file": file_node(&disk.target, index),
                });
                if read_only {
                    for node in [&mut file, &mut format] {
                        node["read-only"] = json!(true);
                        node["auto-read-only"] = json!(true);
                    }
                }
                if layer.format == ImageFormat::Qcow2 {
                    format["backing"] = if index + 1 < count {
                        json!(format_node(&disk.target, index + 1))
                    } else {
                        Value::Null
                    };
                }
                self.execute("blockdev-add", file)?;
                self.execute("blockdev-add", format)?;
            }
        }
        if !guest_exports || disks.is_empty() {
            return Ok(());
        }
        self.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": self.run.nbd_socket.display().to_string()}}}),
        )?;
        for disk in disks {
            self.execute(
                "blockdev-add",
                json!({"driver": "raw", "node-name": guest_node(&disk.target), "file": format_node(&disk.target, 0)}),
            )?;
            self.execute(
                "block-export-add",
                json!({
                    "type": "nbd",
                    "id": guest_export_name(&disk.target),
                    "node-name": guest_node(&disk.target),
                    "name": guest_export_name(&disk.target),
                    "writable": true,
                }),
            )?;
        }
        Ok(())
    }
}

fn spawn(run: &RunDir) -> Result<Child, QsdError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&run.log)
        .map_err(|source| QsdError::Io {
            op: "open",
            path: run.log.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| QsdError::Io {
        op: "open",
        path: run.log.clone(),
        source,
    })?;
    Command::new(QSD_PROGRAM)
        .arg("--chardev")
        .arg(format!(
            "socket,id=vbk-qmp,path={},server=on,wait=off",
            qemu_opt_value(&run.qmp_socket)
        ))
        .arg("--monitor")
        .arg("chardev=vbk-qmp")
        .arg("--pidfile")
        .arg(&run.pid_file)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C aimed at vbackup must not kill the daemon mid-job.
        .process_group(0)
        .spawn()
        .map_err(|source| QsdError::Spawn { source })
}

/// Waits until the pid file and the QMP socket are up, then negotiates.
fn wait_for_startup(
    run: &RunDir,
    child: &mut Child,
    deadline: Instant,
    timeout: Duration,
) -> Result<(u32, QmpSocket), QsdError> {
    loop {
        if let Some(status) = child.try_wait().map_err(|source| QsdError::Io {
            op: "wait for",
            path: run.dir.clone(),
            source,
        })? {
            return Err(QsdError::StartupFailed {
                status: status.to_string(),
                log: log_tail(&run.log),
            });
        }
        // The pid file is only read for its presence: the daemon writes it during startup, and
        // reconnecting later depends on it. The child's own pid is authoritative here.
        if run.read_pid().ok().flatten().is_some() {
            match QmpSocket::connect(&run.qmp_socket, deadline) {
                Ok(qmp) => return Ok((child.id(), qmp)),
                Err(QmpSocketError::NoSocket { .. } | QmpSocketError::ConnectionRefused { .. }) => {
                }
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() >= deadline {
            return Err(QsdError::Timeout {
                what: "start",
                timeout,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}

fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: usize = 2000;
    let text = File::open(path)
        .and_then(|mut f| {
            let mut s = String::new();
            io::Read::read_to_string(&mut f, &mut s).map(|_| s)
        })
        .unwrap_or_default();
    let mut start = text.len().saturating_sub(TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].trim().to_owned()
}
