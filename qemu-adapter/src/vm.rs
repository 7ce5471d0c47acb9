//! Running a real `qemu-system-x86_64` VM without a guest OS, for tests of vbackup against a
//! running QEMU as libvirt or a hand-written command line starts it.
//!
//! Contract:
//! - [`Vm::start`] launches `qemu-system-x86_64 -accel kvm|tcg -m 64 -display none -nodefaults
//!   -daemonize -pidfile` in a directory of the caller's, with two QMP monitors: `qmp.sock` for
//!   vbackup ([`Vm::qmp_socket`]) and `host.sock`, which the [`Vm`] itself holds, negotiated, for
//!   what the host does (guest writes, live snapshots, queries). KVM is used when `/dev/kvm`
//!   can be opened, else TCG.
//! - Disks are attached as [`Attach`] says: `-blockdev` with libvirt's node names
//!   (`libvirt-N-storage` over `libvirt-N-format` per layer, numbered from the bottom layer up
//!   across the VM, as libvirt numbers them) on a `virtio-blk-pci` device whose id is the
//!   disk's target, or a legacy `-drive if=virtio` (QEMU generates the node names, `#blockNNN`,
//!   different in every run; the BlockBackend is named by the drive id, or `virtioN` without
//!   one).
//! - The guest sits in the firmware; its writes go through the disk's own virtio backend with
//!   HMP `qemu-io -d QOM-PATH` on the host monitor ([`Vm::guest_write`]), as a guest's would.
//! - The process is stopped by its own pid only: [`Vm::kill`] sends SIGKILL (a crash), dropping
//!   the [`Vm`] sends `quit` and falls back to SIGKILL. [`Vm::restart`] starts the same command
//!   line again over the same images (after [`Vm::live_snapshot`], with the new overlay on top).
//! - [`DiskConfig`] names the disk configurations the tests run (see each variant).

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp_socket::{QmpSocket, QmpSocketError};
use crate::qsd::{kill_pid, program_alive};

/// The emulator binary, looked up in `PATH`.
pub const VM_PROGRAM: &str = "qemu-system-x86_64";

/// How long startup, QMP commands and shutdown may take.
const TIMEOUT: Duration = Duration::from_secs(20);

/// How long a VM told to `quit` may take to exit before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// How often startup and shutdown are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Errors of the VM launcher.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The emulator could not be run or exited during startup.
    #[error("{VM_PROGRAM} failed to start: {0}")]
    Startup(String),
    /// A QMP failure on the host monitor.
    #[error(transparent)]
    Qmp(#[from] QmpSocketError),
    /// QEMU reported something the launcher cannot use.
    #[error("{0}")]
    Unexpected(String),
    /// A file system, tool or process operation failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The process did not die in time.
    #[error("{VM_PROGRAM} (pid {pid}) did not exit within {timeout:?}")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The limit.
        timeout: Duration,
    },
}

fn io_error(op: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let op = op.into();
    move |source| VmError::Io { op, source }
}

/// How a disk is put on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// `-blockdev` per layer with libvirt's node names and `-device virtio-blk-pci,id=TARGET`.
    Blockdev,
    /// `-drive file=TOP,if=virtio,format=qcow2`, with `id=` when given; QEMU opens the backing
    /// layers from the image headers and names every node itself.
    Drive {
        /// The drive id (`drive-vdb`), or `None` for QEMU's `virtioN`.
        id: Option<String>,
    },
}

/// A qcow2 layer of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VmLayer {
    path: PathBuf,
    /// The `N` of `libvirt-N-*`, for layers opened with `-blockdev` or added live.
    index: Option<u32>,
}

/// A disk of the VM: its qcow2 layers, top first (each layer's header names the next one as its
/// backing file), and how it is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// The guest target (`vda`), which is the device id of a `-blockdev` disk.
    pub target: String,
    /// The images, top first.
    pub layers: Vec<PathBuf>,
    /// How it is attached.
    pub attach: Attach,
}

/// The disk configurations of the lab domain (`vda`, one qcow2 layer; `vdb`, a qcow2 overlay
/// over a qcow2 base) that the VM tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskConfig {
    /// Both disks with `-blockdev` and libvirt's node names, as libvirt starts a VM.
    Blockdev,
    /// Both disks with legacy `-drive`: `vda` without an id (BlockBackend `virtio0`), `vdb` with
    /// `id=drive-vdb`. QEMU generates every node name.
    Drive,
    /// Both disks with `-blockdev`; while the VM runs, `vdb` gets a new qcow2 overlay on top
    /// ([`Vm::live_snapshot`]), as libvirt's external snapshots do.
    LiveSnapshot,
    /// `vda` with `-blockdev`, `vdb` with `-drive id=drive-vdb`.
    Mixed,
}

impl DiskConfig {
    /// Every configuration.
    pub const ALL: [DiskConfig; 4] = [
        DiskConfig::Blockdev,
        DiskConfig::Drive,
        DiskConfig::LiveSnapshot,
        DiskConfig::Mixed,
    ];

    /// A short name, used for trace folders.
    pub fn name(self) -> &'static str {
        match self {
            DiskConfig::Blockdev => "blockdev",
            DiskConfig::Drive => "drive",
            DiskConfig::LiveSnapshot => "live-snapshot",
            DiskConfig::Mixed => "mixed",
        }
    }

    /// How this configuration attaches the disk `target` (`vda` or `vdb`).
    pub fn attach(self, target: &str) -> Attach {
        match (self, target) {
            (DiskConfig::Blockdev | DiskConfig::LiveSnapshot, _) => Attach::Blockdev,
            (DiskConfig::Mixed, "vda") => Attach::Blockdev,
            (DiskConfig::Drive, "vda") => Attach::Drive { id: None },
            (_, t) => Attach::Drive {
                id: Some(format!("drive-{t}")),
            },
        }
    }
}

/// Whether `/dev/kvm` can be used by this process.
pub fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether the emulator can be run.
pub fn emulator_available() -> bool {
    Command::new(VM_PROGRAM)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One layer of a running disk, as [`Vm::layout`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNodes {
    /// The format (qcow2) node.
    pub format: String,
    /// The protocol (file) node below it.
    pub storage: String,
    /// The image.
    pub path: String,
    /// Whether the format node is read-only.
    pub read_only: bool,
    /// Whether the storage node is read-only (after `blockdev-snapshot` QEMU reopens the old
    /// top's format node read-only but leaves its storage node read-write).
    pub storage_read_only: bool,
}

/// A running disk, as [`Vm::layout`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// The guest target.
    pub target: String,
    /// The BlockBackend name (`virtio0`, `drive-vdb`), empty for a `-device` disk.
    pub backend: String,
    /// The QOM path of its virtio backend.
    pub qdev: String,
    /// Its layers, top first.
    pub layers: Vec<LayerNodes>,
}

/// The internal disk list: layers carry their `libvirt-N` numbers.
#[derive(Debug, Clone)]
struct Disk {
    target: String,
    layers: Vec<VmLayer>,
    attach: Attach,
}

/// Escapes a value for QEMU's `key=value,...` option syntax, where `,` is doubled.
fn opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// A running VM; see the module contract.
#[derive(Debug)]
pub struct Vm {
    dir: PathBuf,
    disks: Vec<Disk>,
    next_index: u32,
    pid: u32,
    host: Option<QmpSocket>,
    /// QOM path of each disk's virtio backend, by target.
    qdevs: Vec<(String, String)>,
    accel: &'static str,
}

impl Vm {
    /// Starts a VM in `dir` (which must exist) over `disks`, in the order given.
    pub fn start(dir: &Path, disks: &[VmDisk]) -> Result<Vm, VmError> {
        let mut next_index = 1;
        let mut own = Vec::new();
        for disk in disks {
            let mut layers: Vec<VmLayer> = disk
                .layers
                .iter()
                .map(|path| VmLayer {
                    path: path.clone(),
                    index: None,
                })
                .collect();
            if disk.attach == Attach::Blockdev {
                // libvirt numbers from the bottom of each chain up.
                for layer in layers.iter_mut().rev() {
                    layer.index = Some(next_index);
                    next_index += 1;
                }
            }
            own.push(Disk {
                target: disk.target.clone(),
                layers,
                attach: disk.attach.clone(),
            });
        }
        let mut vm = Vm {
            dir: dir.to_path_buf(),
            disks: own,
            next_index,
            pid: 0,
            host: None,
            qdevs: Vec::new(),
            accel: if kvm_available() { "kvm" } else { "tcg" },
        };
        vm.launch()?;
        Ok(vm)
    }

    /// The accelerator in use (`kvm` or `tcg`).
    pub fn accel(&self) -> &'static str {
        self.accel
    }

    /// The emulator's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// vbackup's QMP monitor.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The host's QMP monitor (held by this handle).
    pub fn host_socket(&self) -> PathBuf {
        self.dir.join("host.sock")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The command line of the current disks.
    pub fn command_line(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-accel",
            self.accel,
            "-m",
            "64",
            "-display",
            "none",
            "-nodefaults",
            "-daemonize",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("-pidfile".into());
        args.push(self.pid_file().display().to_string());
        for disk in &self.disks {
            match &disk.attach {
                Attach::Blockdev => {
                    for (i, layer) in disk.layers.iter().enumerate().rev() {
                        let n = layer.index.unwrap_or_default();
                        let mut storage = json!({"driver": "file",
                            "filename": layer.path.display().to_string(),
                            "node-name": format!("libvirt-{n}-storage")});
                        let backing = disk.layers.get(i + 1).and_then(|l| l.index);
                        let mut format = json!({"driver": "qcow2",
                            "file": format!("libvirt-{n}-storage"),
                            "node-name": format!("libvirt-{n}-format"),
                            "backing": backing.map(|b| format!("libvirt-{b}-format"))});
                        if i > 0 {
                            storage["read-only"] = json!(true);
                            format["read-only"] = json!(true);
                        }
                        // JSON, as libvirt passes it: the option syntax has no `null`.
                        for node in [storage, format] {
                            args.push("-blockdev".into());
                            args.push(node.to_string());
                        }
                    }
                    let top = disk
                        .layers
                        .first()
                        .and_then(|l| l.index)
                        .unwrap_or_default();
                    args.push("-device".into());
                    args.push(format!(
                        "virtio-blk-pci,drive=libvirt-{top}-format,id={}",
                        disk.target
                    ));
                }
                Attach::Drive { id } => {
                    let top = disk
                        .layers
                        .first()
                        .map(|l| opt(&l.path))
                        .unwrap_or_default();
                    let id = id.as_ref().map(|i| format!(",id={i}")).unwrap_or_default();
                    args.push("-drive".into());
                    args.push(format!("file={top},if=virtio,format=qcow2{id}"));
                }
            }
        }
        for socket in [self.qmp_socket(), self.host_socket()] {
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", opt(&socket)));
        }
        args
    }

    fn launch(&mut self) -> Result<(), VmError> {
        for stale in [self.pid_file(), self.qmp_socket(), self.host_socket()] {
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_error(format!("remove {}", stale.display()))(e));
                }
                _ => {}
            }
        }
        // With -daemonize the launcher returns once the VM is initialised (monitors listening,
        // pid file written); errors before that are on its stderr.
        let out = Command::new(VM_PROGRAM)
            .args(self.command_line())
            .output()
            .map_err(|e| VmError::Startup(e.to_string()))?;
        if !out.status.success() {
            return Err(VmError::Startup(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = fs::read_to_string(self.pid_file())
            .map_err(io_error(format!("read {}", self.pid_file().display())))?;
        self.pid = text
            .trim()
            .parse()
            .map_err(|_| VmError::Startup(format!("pid file holds {text:?}")))?;
        let host = QmpSocket::connect(&self.host_socket(), Instant::now() + TIMEOUT)?;
        self.host = Some(host);
        self.qdevs = self.find_qdevs()?;
        Ok(())
    }

    /// The virtio backend of each disk, found by its top image in `query-block`.
    fn find_qdevs(&mut self) -> Result<Vec<(String, String)>, VmError> {
        let block = self.execute("query-block", None)?;
        let mut out = Vec::new();
        for disk in &self.disks {
            let top = disk
                .layers
                .first()
                .map(|l| l.path.display().to_string())
                .unwrap_or_default();
            let qdev = block
                .as_array()
                .into_iter()
                .flatten()
                .find(|dev| dev["inserted"]["file"].as_str() == Some(top.as_str()))
                .and_then(|dev| dev["qdev"].as_str())
                .ok_or_else(|| VmError::Unexpected(format!("no device shows image {top}")))?;
            out.push((disk.target.clone(), qdev.to_owned()));
        }
        Ok(out)
    }

    /// Runs a QMP command on the host monitor.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmError> {
        let host = self
            .host
            .as_mut()
            .ok_or_else(|| VmError::Unexpected("the VM is not running".into()))?;
        let reply = host.execute(command, arguments, Instant::now() + TIMEOUT)?;
        // Events reach every monitor; this one has no use for them, so they are not kept.
        while let Ok(Some(_)) = host.recv(Some(Instant::now())) {}
        Ok(reply)
    }

    /// Runs an HMP command line on the host monitor; fails when QEMU prints anything, since
    /// the commands used here print only errors to the monitor.
    pub fn hmp(&mut self, line: &str) -> Result<(), VmError> {
        let out = self.execute("human-monitor-command", Some(json!({"command-line": line})))?;
        match out.as_str() {
            Some("") => Ok(()),
            _ => Err(VmError::Unexpected(format!("HMP {line}: {out}"))),
        }
    }

    /// The QOM path of the virtio backend of disk `target`.
    pub fn qdev(&self, target: &str) -> Option<&str> {
        self.qdevs
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, q)| q.as_str())
    }

    /// A guest write of `len` bytes of `pattern` at `offset` on disk `target`, through its
    /// virtio backend.
    pub fn guest_write(
        &mut self,
        target: &str,
        offset: u64,
        len: u64,
        pattern: u8,
    ) -> Result<(), VmError> {
        let qdev = self
            .qdev(target)
            .ok_or_else(|| VmError::Unexpected(format!("no disk {target}")))?
            .to_owned();
        self.hmp(&format!(
            "qemu-io -d {qdev} \"write -P {pattern:#04x} {offset} {len}\""
        ))
    }

    /// The layers of disk `target` as the VM was told to open them, top first.
    pub fn layers(&self, target: &str) -> Vec<PathBuf> {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .map(|d| d.layers.iter().map(|l| l.path.clone()).collect())
            .unwrap_or_default()
    }

    /// Puts a new qcow2 overlay `overlay` on top of disk `target` while the VM runs, the way
    /// libvirt takes an external snapshot: the image is created over the current top, added
    /// with `blockdev-add` (`libvirt-N-storage`, `libvirt-N-format`), and made the active layer
    /// with `blockdev-snapshot` in one `transaction` with a `block-dirty-bitmap-add` on the
    /// overlay for every persistent bitmap of the old top (same name and granularity, empty,
    /// persistent, disabled if the old one is), so checkpoints taken before stay usable.
    /// Returns the overlay's format node name.
    pub fn live_snapshot(&mut self, target: &str, overlay: &Path) -> Result<String, VmError> {
        let qdev = self
            .qdev(target)
            .ok_or_else(|| VmError::Unexpected(format!("no disk {target}")))?
            .to_owned();
        let block = self.execute("query-block", None)?;
        let device = device_by_qdev(&block, &qdev)?;
        let top = device["inserted"]["node-name"]
            .as_str()
            .ok_or_else(|| VmError::Unexpected(format!("{qdev} has no node")))?
            .to_owned();
        let size = device["inserted"]["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| VmError::Unexpected(format!("{qdev} has no size")))?;
        let top_path = self.layers(target).first().cloned().unwrap_or_default();
        // The old top is locked by the VM: `-u` keeps qemu-img from opening it.
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b"])
            .arg(&top_path)
            .arg(overlay)
            .arg(size.to_string())
            .output()
            .map_err(io_error("qemu-img create"))?;
        if !out.status.success() {
            return Err(VmError::Unexpected(format!(
                "qemu-img create {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let nodes = self.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
        let bitmaps: Vec<Value> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["node-name"] == top.as_str())
            .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
            .unwrap_or_default();
        let n = self.next_index;
        self.next_index += 1;
        let format = format!("libvirt-{n}-format");
        self.execute(
            "blockdev-add",
            Some(
                json!({"driver": "file", "filename": overlay.display().to_string(),
                "node-name": format!("libvirt-{n}-storage")}),
            ),
        )?;
        self.execute(
            "blockdev-add",
            Some(
                json!({"driver": "qcow2", "file": format!("libvirt-{n}-storage"),
                "node-name": format, "backing": null}),
            ),
        )?;
        let mut actions = vec![json!({"type": "blockdev-snapshot",
            "data": {"node": top, "overlay": format}})];
        for b in bitmaps.iter().filter(|b| b["persistent"] == true) {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": format, "name": b["name"], "granularity": b["granularity"],
                "persistent": true, "disabled": b["recording"] == false}}));
        }
        self.execute("transaction", Some(json!({"actions": actions})))?;
        if let Some(disk) = self.disks.iter_mut().find(|d| d.target == target) {
            disk.layers.insert(
                0,
                VmLayer {
                    path: overlay.to_path_buf(),
                    index: Some(n),
                },
            );
        }
        Ok(format)
    }

    /// How QEMU holds each disk now, in the order the disks were given: its BlockBackend name
    /// (`query-block`'s `device`, empty for `-device` disks), its virtio backend's QOM path,
    /// and per layer, top first, the format node, the storage node below it, the image path
    /// and whether the node is read-only. Read from `query-block`, the flat node list and the
    /// block graph, so generated node names are reported as they are.
    pub fn layout(&mut self) -> Result<Vec<DiskLayout>, VmError> {
        let block = self.execute("query-block", None)?;
        let nodes = self.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
        let graph = self.execute("x-debug-query-block-graph", None)?;
        let vertex_name = |id: &Value| {
            graph["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["id"] == *id && v["type"] == "block-driver")
                .and_then(|v| v["name"].as_str())
                .map(str::to_owned)
        };
        let child = |parent: &str, role: &str| {
            graph["edges"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["name"] == role)
                .find(|e| vertex_name(&e["parent"]).as_deref() == Some(parent))
                .and_then(|e| vertex_name(&e["child"]))
        };
        let node = |name: &str| {
            nodes
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["node-name"] == name)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let mut out = Vec::new();
        for (target, qdev) in &self.qdevs {
            let device = device_by_qdev(&block, qdev)?;
            let mut layers = Vec::new();
            let mut next = device["inserted"]["node-name"].as_str().map(str::to_owned);
            while let Some(format) = next.take() {
                if layers.len() > 16 {
                    return Err(VmError::Unexpected(format!("{target}: chain too long")));
                }
                let storage = child(&format, "file")
                    .ok_or_else(|| VmError::Unexpected(format!("{format} has no file child")))?;
                let storage_node = node(&storage);
                layers.push(LayerNodes {
                    path: storage_node["file"].as_str().unwrap_or_default().to_owned(),
                    read_only: node(&format)["ro"] == true,
                    storage_read_only: storage_node["ro"] == true,
                    format: format.clone(),
                    storage,
                });
                next = child(&format, "backing");
            }
            out.push(DiskLayout {
                target: target.clone(),
                backend: device["device"].as_str().unwrap_or_default().to_owned(),
                qdev: qdev.clone(),
                layers,
            });
        }
        Ok(out)
    }

    /// Whether the process still runs.
    pub fn is_alive(&self) -> bool {
        self.pid != 0 && program_alive(self.pid, VM_PROGRAM)
    }

    fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(POLL_INTERVAL);
        }
        true
    }

    /// Kills the VM with SIGKILL, as a crash would, and waits until it is gone.
    pub fn kill(&mut self) -> Result<(), VmError> {
        self.host = None;
        if self.pid == 0 {
            return Ok(());
        }
        kill_pid(self.pid).map_err(|e| VmError::Unexpected(e.to_string()))?;
        if !self.wait_gone(TIMEOUT) {
            return Err(VmError::Timeout {
                pid: self.pid,
                timeout: TIMEOUT,
            });
        }
        self.pid = 0;
        Ok(())
    }

    /// Kills the VM if it runs and starts it again over the same images with the same
    /// command line. Node names given on the command line are the same again; ones QEMU
    /// generated (`-drive`) are new, as are those of layers added live (now on the command
    /// line with their `libvirt-N` names).
    pub fn restart(&mut self) -> Result<(), VmError> {
        self.kill()?;
        self.launch()
    }

    /// Sends `quit` and waits for the VM to exit (images closed cleanly, persistent bitmaps
    /// written), killing it if it does not.
    pub fn stop(&mut self) -> Result<(), VmError> {
        if !self.is_alive() {
            self.host = None;
            self.pid = 0;
            return Ok(());
        }
        // QEMU may close the socket before its reply is read.
        let _ = self.execute("quit", None);
        self.host = None;
        if self.wait_gone(QUIT_GRACE) {
            self.pid = 0;
            return Ok(());
        }
        self.kill()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The `query-block` entry of the guest device whose QOM path is `qdev`.
fn device_by_qdev<'a>(block: &'a Value, qdev: &str) -> Result<&'a Value, VmError> {
    block
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["qdev"] == qdev)
        .ok_or_else(|| VmError::Unexpected(format!("{qdev} is not in query-block")))
}
