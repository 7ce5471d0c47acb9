//! The live side of the conformance scenarios: the lab domain on real qcow2 files under a
//! qemu-storage-daemon, a [`Host`] over its guest exports, and the recording of traces.
//!
//! - Lab: the images of `vbackup_sim::world::lab_files` (same sizes, clusters and content) in a
//!   fresh [`LiveLab`] directory, attached by [`vbackup_qemu::qsd::Qsd`] with its standard node
//!   names and writable guest exports; the core's domain is `lab_domain()` with those paths and
//!   node names, and it shares the daemon's NBD server (`nbd_server_running`).
//! - Guest writes and disk reads go through the guest exports with our own NBD client; restores
//!   use `qemu-img rebase -u` and `convert`; pull exports are read with our NBD client.
//! - A crash is SIGKILL to the daemon's pid and a new daemon over the same images; a new QMP
//!   session (after a crash or a restart of vbackup) is opened by [`relink`].
//! - Faults the core cannot ask for are put in by [`ShapingLink`], a link between the recorder
//!   and the socket: job `speed` (with 64 KiB chunks, so a 512 KiB disk takes seconds) while
//!   the host slows jobs, and a `blkdebug` layer failing data writes under the storage node of
//!   new images while a write failure is armed. The trace records the core's commands as sent,
//!   before shaping; the host log records what the host did and when.
//!
//! The parts that do not depend on the daemon (the link stack, [`Shaper`], [`HostLog`],
//! [`LiveEffects`], restores, pull reads, lab images, trace recording) are shared with the
//! tests against qemu-system VMs (`vm_support`).
#![allow(dead_code)]

use std::cell::RefCell;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vbackup_core::Domain;
use vbackup_core::backup::{NbdServer, NbdTransport};
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::{DomainConfig, DomainEvent, FileError, FileErrorKind, FileOp, StoreOp};
use vbackup_core::driver::{Driver, Effects, MemoryEffects};
use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::model::{DomainDef, ImageFormat};
use vbackup_core::qmp::{QmpCommand, QmpIn};
use vbackup_qemu::live::{self, LiveLab, run_tool};
use vbackup_qemu::nbd::NbdClient;
use vbackup_qemu::qmp_socket::{QmpSocket, SocketLink};
use vbackup_qemu::qsd::{QsdDisk, RunDir, format_node, guest_export_name, kill_pid};
use vbackup_qemu::recorder::TraceRecorder;
use vbackup_sim::scenarios::Host;
use vbackup_sim::world::{CLUSTER, DISK_BYTES, lab_domain};

/// Where a recording's temporary directory is rewritten to, so traces are stable.
pub const LAB_ROOT: &str = "/lab";
/// Set to `1` to (re-)record the traces in `testdata/traces/qsd-10/`.
pub const RECORD_ENV: &str = "VBACKUP_RECORD_TRACES";
/// Chunk size of slowed jobs (`x-perf.max-chunk`): the rate limit applies between chunks.
const SLOW_CHUNK_BYTES: u64 = 64 << 10;
/// Steps allowed for connecting.
const CONNECT_STEPS: usize = 100;

/// A writer shared between the recorder and the host, so the host can tell how far the trace
/// had got when it acted.
#[derive(Debug, Clone, Default)]
pub struct SharedBuf(Rc<RefCell<Vec<u8>>>);

impl SharedBuf {
    /// Trace lines written so far.
    pub fn lines(&self) -> usize {
        self.0.borrow().iter().filter(|b| **b == b'\n').count()
    }

    /// Everything written.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.borrow()).into_owned()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the host has asked the link to put into commands.
#[derive(Debug, Default)]
pub struct Shaping {
    /// Job speed for backup jobs started now.
    pub slow_bytes_per_s: Option<u64>,
    /// New images get a failing `blkdebug` layer.
    pub fail_new_images: bool,
    /// Storage nodes built over `blkdebug`.
    pub failing_nodes: Vec<String>,
    /// Paths of the lab's disk images (never shaped).
    pub disk_images: Vec<String>,
}

/// A link that rewrites commands as [`Shaping`] says; see the module docs. It also survives a
/// change of QMP connection ([`relink`]): its clock keeps running across connections, and the
/// new connection's greeting is handed to the engine as the first message received.
#[derive(Debug)]
pub struct ShapingLink<L> {
    inner: Option<L>,
    shaping: Rc<RefCell<Shaping>>,
    epoch: Instant,
    /// Milliseconds of this link's clock when the current inner link's clock read zero.
    offset_ms: u64,
    pending: Option<QmpIn>,
}

impl<L: Link> ShapingLink<L> {
    fn inner(&mut self) -> Result<&mut L, LinkError> {
        self.inner.as_mut().ok_or(LinkError::Closed)
    }
}

fn with_speed(job: &mut Value, speed: u64) {
    job["speed"] = json!(speed);
    job["x-perf"] = json!({"max-chunk": SLOW_CHUNK_BYTES});
}

impl<L: Link> ShapingLink<L> {
    fn shape(&self, cmd: &QmpCommand) -> Option<QmpCommand> {
        let mut shaping = self.shaping.borrow_mut();
        let mut args = cmd.arguments()?;
        match cmd.name() {
            "transaction" => {
                let speed = shaping.slow_bytes_per_s?;
                let actions = args["actions"].as_array_mut()?;
                for action in actions.iter_mut() {
                    if action["type"] == "blockdev-backup" {
                        with_speed(&mut action["data"], speed);
                    }
                }
            }
            "blockdev-backup" => with_speed(&mut args, shaping.slow_bytes_per_s?),
            "blockdev-add" if shaping.fail_new_images && args["driver"] == "file" => {
                let filename = args["filename"].as_str()?.to_owned();
                if shaping.disk_images.contains(&filename) {
                    return None;
                }
                let node = args["node-name"].as_str()?.to_owned();
                let mut image = args.clone();
                image.as_object_mut()?.remove("node-name");
                args = json!({
                    "driver": "blkdebug",
                    "node-name": node,
                    "image": image,
                    "inject-error": [{"event": "write_aio", "errno": 5}],
                });
                shaping.failing_nodes.push(node);
            }
            _ => return None,
        }
        QmpCommand::from_parts(cmd.name(), Some(args)).ok()
    }
}

impl<L: Link> Link for ShapingLink<L> {
    fn now(&self) -> Timestamp {
        Timestamp::from_ms(u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        let shaped = self.shape(cmd);
        self.inner()?.send(id, shaped.as_ref().unwrap_or(cmd))
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        if let Some(greeting) = self.pending.take() {
            return Ok(Some(greeting));
        }
        let offset = self.offset_ms;
        let deadline = deadline.map(|d| Timestamp::from_ms(d.as_ms().saturating_sub(offset)));
        self.inner()?.recv(deadline)
    }
}

/// Closes the run's QMP connection, so another client (discovery) can use the monitor.
pub fn disconnect(link: &mut LiveLink) {
    link.inner_mut().inner = None;
}

/// Closes the run's QMP connection and opens a new one on `qmp_socket` (the same daemon, or
/// one started again in the same run directory).
pub fn relink(link: &mut LiveLink, qmp_socket: &Path) -> Result<(), String> {
    // The monitor serves one client: the old connection closes first.
    disconnect(link);
    let shaping = link.inner_mut();
    let qmp = QmpSocket::connect_unnegotiated(qmp_socket, Instant::now() + Duration::from_secs(10))
        .map_err(text)?;
    shaping.pending = Some(QmpIn::Greeting(qmp.greeting().clone()));
    shaping.offset_ms = shaping.now().as_ms();
    shaping.inner = Some(SocketLink::new(qmp));
    Ok(())
}

/// The link stack of a live run.
pub type LiveLink = TraceRecorder<ShapingLink<SocketLink>, SharedBuf>;

/// Store operations and events in memory; image files on the real file system.
#[derive(Debug, Default)]
pub struct LiveEffects {
    /// Store operations, file operations and events.
    pub memory: MemoryEffects,
}

impl Effects for LiveEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        self.memory.persist(op)
    }

    fn file(&mut self, op: &FileOp) -> Result<(), FileError> {
        self.memory.files.push(op.clone());
        let io_error = |path: &str, what: &str, e: io::Error| {
            FileError::new(
                FileErrorKind::from_io(e.kind()),
                path,
                format!("cannot {what} '{path}': {e}"),
            )
        };
        match op {
            FileOp::CreateExclusive { path } => {
                // As the command line's store does: a backup directory is made on demand.
                if let Some(parent) = Path::new(path).parent() {
                    fs::create_dir_all(parent).map_err(|e| io_error(path, "create", e))?;
                }
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map(|_| ())
                    .map_err(|e| io_error(path, "create", e))
            }
            FileOp::Remove { path } => match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path, "remove", e)),
                _ => Ok(()),
            },
            FileOp::Sync { path } => {
                vbackup_qemu::writeout::sync_target(path).map_err(|m| FileError::other(path, m))
            }
        }
    }

    fn event(&mut self, event: &DomainEvent) {
        self.memory.event(event);
    }
}

/// Records what a host did outside QMP, each entry with the number of trace lines written
/// before it.
#[derive(Debug)]
pub struct HostLog {
    trace: SharedBuf,
    /// The entries.
    pub entries: Vec<Value>,
}

impl HostLog {
    /// A log placed against `trace`.
    pub fn new(trace: SharedBuf) -> HostLog {
        HostLog {
            trace,
            entries: Vec::new(),
        }
    }

    /// Logs `action` (an object) at the trace's current length.
    pub fn note(&mut self, action: Value) {
        let mut entry = json!({"after": self.trace.lines()});
        if let (Some(entry), Some(action)) = (entry.as_object_mut(), action.as_object()) {
            entry.extend(action.clone());
        }
        self.entries.push(entry);
    }

    /// The entries, one JSON object a line.
    pub fn text(&self) -> String {
        self.entries.iter().map(|e| format!("{e}\n")).collect()
    }
}

/// The host's side of [`ShapingLink`]: what the `Host` methods about jobs and faults set.
#[derive(Debug, Clone)]
pub struct Shaper(Rc<RefCell<Shaping>>);

impl Shaper {
    /// A shaper that never touches the images at `disk_images`.
    pub fn new(disk_images: Vec<String>) -> Shaper {
        Shaper(Rc::new(RefCell::new(Shaping {
            disk_images,
            ..Shaping::default()
        })))
    }

    /// `Host::fail_writes_to`: the armed failure ends; true if a failing target was built.
    pub fn fail_writes_to(&self, node: &str, log: &mut HostLog) -> bool {
        let mut shaping = self.0.borrow_mut();
        shaping.fail_new_images = false;
        let armed = !shaping.failing_nodes.is_empty();
        shaping.failing_nodes.clear();
        drop(shaping);
        log.note(json!({"fail_writes_to": node}));
        armed
    }

    /// `Host::prepare_write_failure`: new images get a failing layer.
    pub fn prepare_write_failure(&self) -> bool {
        self.0.borrow_mut().fail_new_images = true;
        true
    }

    /// `Host::slow_jobs`.
    pub fn slow_jobs(&self, bytes_per_s: Option<u64>, log: &mut HostLog) {
        self.0.borrow_mut().slow_bytes_per_s = bytes_per_s;
        log.note(json!({ "slow": bytes_per_s }));
    }

    /// Whether jobs started now are slowed.
    pub fn slowed(&self) -> bool {
        self.0.borrow().slow_bytes_per_s.is_some()
    }

    /// A link stack over a fresh connection `qmp` (greeting read, not negotiated), recording
    /// into `trace`.
    pub fn link(&self, qmp: QmpSocket, trace: SharedBuf) -> LiveLink {
        let greeting = QmpIn::Greeting(qmp.greeting().clone());
        TraceRecorder::new(
            ShapingLink {
                inner: Some(SocketLink::new(qmp)),
                shaping: self.0.clone(),
                epoch: Instant::now(),
                offset_ms: 0,
                pending: Some(greeting),
            },
            trace,
        )
    }
}

/// A driver for `def` over `link`, connected (capabilities negotiated, reconciled).
pub fn connected_driver(
    def: DomainDef,
    config: DomainConfig,
    link: LiveLink,
) -> Driver<LiveLink, LiveEffects> {
    let domain = Domain::new(def, config, CheckpointTree::new(), None);
    let mut driver = Driver::new(domain, link, LiveEffects::default());
    let up = driver
        .run_until(|d| d.view().connected, CONNECT_STEPS)
        .expect("connects");
    assert!(up, "the core did not finish connecting");
    driver
}

/// Restores the backup image at `path` over `base` (raw content; `None` for a full backup)
/// into a raw file under `dir` numbered `n`, and reads it: a copy of the image is rebased
/// (`qemu-img rebase -u`) onto a raw file of `base` and converted to raw.
pub fn restore_image(
    dir: &Path,
    n: u32,
    path: &str,
    base: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    fs::create_dir_all(dir).map_err(text)?;
    let copy = dir.join(format!("{n}.qcow2"));
    let raw = dir.join(format!("{n}.raw"));
    fs::copy(path, &copy).map_err(|e| format!("backup image {path}: {e}"))?;
    let mut rebase = Command::new("qemu-img");
    rebase.args(["rebase", "-u", "-f", "qcow2"]);
    match base {
        Some(content) => {
            let base_file = dir.join(format!("{n}.base"));
            fs::write(&base_file, content).map_err(text)?;
            rebase.args(["-F", "raw", "-b"]).arg(&base_file);
        }
        None => {
            rebase.args(["-b", ""]);
        }
    }
    run_tool(rebase.arg(&copy)).map_err(text)?;
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&copy)
            .arg(&raw),
    )
    .map_err(text)?;
    fs::read(&raw).map_err(text)
}

/// Reads the pull export `name` on the NBD server at `socket` as a client does: everything,
/// or the dirty extents of the backup's bitmap laid over `base`.
pub fn read_pull_export(socket: &Path, name: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let context = format!("qemu:dirty-bitmap:backup-{name}");
    let contexts: &[&str] = if base.is_some() { &[&context] } else { &[] };
    let mut client = NbdClient::connect_unix(socket, name, contexts).map_err(text)?;
    let content = vbackup_sim::world::read_export(&mut client, base)?;
    client.disconnect().map_err(text)?;
    Ok(content)
}

/// Places the lab path `lab_path` under `root`, creating its parent.
pub fn place_under(root: &Path, lab_path: &str) -> String {
    let path = root.join(lab_path.trim_start_matches('/'));
    // Scenarios name directories and files in them; both need their parent.
    if let Some(parent) = path.parent() {
        let _ = fs::create_dir_all(parent);
    }
    path.display().to_string()
}

/// Writes a run's trace and host log as `NAME.jsonl` and `NAME.host.jsonl` into `dir`,
/// normalised, when [`RECORD_ENV`] asks for it.
pub fn record(dir: &Path, name: &str, trace: &str, log: &str, root: &Path) {
    if !std::env::var(RECORD_ENV).is_ok_and(|v| v == "1") {
        return;
    }
    let root = root.display().to_string();
    fs::create_dir_all(dir).expect("trace directory");
    fs::write(dir.join(format!("{name}.jsonl")), normalise(trace, &root)).expect("trace file");
    fs::write(
        dir.join(format!("{name}.host.jsonl")),
        normalise(log, &root),
    )
    .expect("host log");
}

/// The host of the live scenarios; see the module docs.
#[derive(Debug)]
pub struct QsdHost {
    /// The lab; dropped last, it kills the daemon by its pid and removes the directory.
    lab: LiveLab,
    disks: Vec<QsdDisk>,
    root: PathBuf,
    nbd_socket: PathBuf,
    shaper: Shaper,
    /// What the host did.
    pub log: HostLog,
    restores: u32,
}

/// An error as text.
pub fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl QsdHost {
    fn guest(&self, disk: &str) -> Result<NbdClient, String> {
        NbdClient::connect_unix(&self.nbd_socket, &guest_export_name(disk), &[]).map_err(text)
    }
}

/// The one byte `data` repeats; the hosts log writes as such.
pub fn fill_byte(data: &[u8]) -> Result<u8, String> {
    let fill = data.first().copied().unwrap_or(0);
    if data.iter().any(|b| *b != fill) {
        return Err("the live hosts log only writes of one repeated byte".into());
    }
    Ok(fill)
}

impl Host for QsdHost {
    fn guest_write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), String> {
        let fill = fill_byte(data)?;
        let mut guest = self.guest(disk)?;
        guest.write_at(offset, data).map_err(text)?;
        guest.disconnect().map_err(text)?;
        self.log.note(
            json!({"write": {"disk": disk, "offset": offset, "len": data.len(), "byte": fill}}),
        );
        Ok(())
    }

    fn disk_content(&mut self, disk: &str) -> Result<Vec<u8>, String> {
        let mut guest = self.guest(disk)?;
        let mut out = vec![0; usize::try_from(guest.info().size).map_err(text)?];
        guest.read_exact_at(0, &mut out).map_err(text)?;
        guest.disconnect().map_err(text)?;
        Ok(out)
    }

    fn restore(&mut self, path: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
        self.restores += 1;
        restore_image(&self.root.join("restore"), self.restores, path, base)
    }

    fn read_export(&mut self, name: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
        read_pull_export(&self.nbd_socket, name, base)
    }

    fn fail_writes_to(&mut self, node: &str) -> bool {
        self.shaper.fail_writes_to(node, &mut self.log)
    }

    fn prepare_write_failure(&mut self) -> bool {
        self.shaper.prepare_write_failure()
    }

    fn slow_jobs(&mut self, bytes_per_s: Option<u64>) -> Result<(), String> {
        self.shaper.slow_jobs(bytes_per_s, &mut self.log);
        Ok(())
    }

    fn place(&mut self, lab_path: &str) -> String {
        place_under(&self.root, lab_path)
    }

    fn nbd_socket(&mut self) -> String {
        self.nbd_socket.display().to_string()
    }

    fn domain_config(&self) -> DomainConfig {
        live_config(&self.nbd_socket)
    }

    fn crash_qemu(&mut self) -> Result<(), String> {
        for pid in self.lab.running_pids() {
            kill_pid(pid).map_err(text)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.lab.running_pids().is_empty() {
            if Instant::now() > deadline {
                return Err("qemu-storage-daemon survived SIGKILL".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.log.note(json!({"crash": true}));
        let qsd = self.lab.start_qsd("run", &self.disks).map_err(text)?;
        // Its QMP connection closes, so vbackup's can open.
        drop(qsd);
        Ok(())
    }
}

/// The configuration of the lab domain on a daemon: pull exports join its NBD server, which
/// listens on `nbd_socket`.
pub fn live_config(nbd_socket: &Path) -> DomainConfig {
    DomainConfig {
        nbd_server_running: Some(NbdServer {
            transport: NbdTransport::Unix {
                socket: nbd_socket.display().to_string(),
            },
            tls: None,
        }),
        ..DomainConfig::default()
    }
}

/// One scenario's run: the driver and the host (which owns the lab and so the daemon).
pub struct LiveConformance {
    /// The scenario's name (its trace file's).
    pub name: &'static str,
    /// The core over the daemon's QMP socket; taken by scenarios that restart vbackup.
    pub driver: Option<Driver<LiveLink, LiveEffects>>,
    /// The host.
    pub host: QsdHost,
    trace: SharedBuf,
    run: RunDir,
    started: Instant,
}

/// The lab domain with its images under `root` and the daemon's node names.
pub fn live_domain(root: &Path) -> DomainDef {
    let mut def = lab_domain();
    for disk in &mut def.disks {
        for (i, layer) in disk.layers.iter_mut().enumerate() {
            let path = layer.path.take().unwrap_or_default();
            layer.path = Some(
                root.join(path.trim_start_matches('/'))
                    .display()
                    .to_string(),
            );
            layer.node_name = Some(format_node(&disk.target, i));
        }
    }
    def
}

fn qemu_io_write(path: &Path, pattern: u8, offset: u64, len: u64) -> Result<(), String> {
    run_tool(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -q -P {pattern:#04x} {offset} {len}"))
            .arg(path),
    )
    .map(|_| ())
    .map_err(text)
}

/// The images of `vbackup_sim::world::lab_files`, with the same content.
pub fn make_images(root: &Path) -> Result<(), String> {
    let img = root.join("img");
    fs::create_dir_all(&img).map_err(text)?;
    let (vda, vdb, ovl) = (
        img.join("vda.qcow2"),
        img.join("vdb.qcow2"),
        img.join("vdb.ovl"),
    );
    live::create_image(&vda, &ImageFormat::Qcow2, DISK_BYTES).map_err(text)?;
    live::create_image(&vdb, &ImageFormat::Qcow2, DISK_BYTES).map_err(text)?;
    qemu_io_write(&vda, 0x11, 0, 3 * CLUSTER)?;
    qemu_io_write(&vdb, 0x22, CLUSTER, 2 * CLUSTER)?;
    live::create_overlay(&ovl, &vdb, &ImageFormat::Qcow2).map_err(text)?;
    qemu_io_write(&ovl, 0x33, 2 * CLUSTER, CLUSTER)
}

impl LiveConformance {
    /// Events of the run.
    pub fn events(effects: &LiveEffects) -> &[DomainEvent] {
        &effects.memory.events
    }

    /// Store operations of the run.
    pub fn persisted(effects: &LiveEffects) -> &[StoreOp] {
        &effects.memory.persisted
    }

    /// Builds the lab and connects the core; panics without QEMU's tools.
    pub fn start(name: &'static str) -> Option<LiveConformance> {
        if !live::tools_available() {
            // A live test fails, never skips, where what it needs is missing.
            panic!(
                "QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon): install qemu-utils 10"
            );
        }
        let started = Instant::now();
        let mut lab = LiveLab::new().expect("lab directory");
        let root = lab.path().to_path_buf();
        make_images(&root).expect("lab images");
        let def = live_domain(&root);
        let disks: Vec<QsdDisk> = def
            .disks
            .iter()
            .map(|d| QsdDisk::from_disk_def(d).expect("lab disk"))
            .collect();
        let qsd = lab.start_qsd("run", &disks).expect("qemu-storage-daemon");
        let run = RunDir::new(lab.file("run"));
        // The monitor serves one client: the launcher's connection closes first.
        drop(qsd);
        let qmp = QmpSocket::connect_unnegotiated(
            &run.qmp_socket,
            Instant::now() + Duration::from_secs(10),
        )
        .expect("QMP connection");
        let shaper = Shaper::new(
            def.disks
                .iter()
                .flat_map(|d| d.layers.iter().filter_map(|l| l.path.clone()))
                .collect(),
        );
        let trace = SharedBuf::default();
        let link = shaper.link(qmp, trace.clone());
        let driver = connected_driver(def, live_config(&run.nbd_socket), link);
        Some(LiveConformance {
            name,
            driver: Some(driver),
            host: QsdHost {
                lab,
                disks,
                root,
                nbd_socket: run.nbd_socket.clone(),
                shaper,
                log: HostLog::new(trace.clone()),
                restores: 0,
            },
            trace,
            run,
            started,
        })
    }

    /// Runs scenario `name` on a fresh lab: `scenario` gets the driver, the host and the
    /// daemon's QMP socket. Skipped (returns) without QEMU's tools; panics with the divergence.
    pub fn run(
        name: &'static str,
        scenario: impl FnOnce(
            &mut Driver<LiveLink, LiveEffects>,
            &mut QsdHost,
            &Path,
        ) -> Result<(), String>,
    ) {
        let Some(mut run) = LiveConformance::start(name) else {
            return;
        };
        let socket = run.qmp_socket();
        let driver = run.driver.as_mut().expect("the run has its driver");
        let result = scenario(driver, &mut run.host, &socket);
        run.finish(result);
    }

    /// The daemon's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run.qmp_socket.clone()
    }

    /// Fails the test with the scenario's divergence (and the daemon's log), or records the
    /// trace when asked to.
    pub fn finish(self, result: Result<(), String>) {
        if let Err(e) = result {
            let log = fs::read_to_string(&self.run.log).unwrap_or_default();
            panic!("{}: {e}\ndaemon log:\n{log}", self.name);
        }
        eprintln!("{}: passed in {:?}", self.name, self.started.elapsed());
        record(
            &traces_dir(),
            self.name,
            &self.trace.text(),
            &self.host.log.text(),
            &self.host.root,
        );
    }
}

/// `testdata/traces/qsd-10/`.
pub fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/traces/qsd-10")
}

/// Rewrites the temporary directory to [`LAB_ROOT`] and drops event timestamps, line by line.
pub fn normalise(text: &str, root: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace(root, LAB_ROOT);
            match serde_json::from_str::<Value>(&line) {
                Ok(mut v) => {
                    if let Some(msg) = v.get_mut("msg").and_then(Value::as_object_mut) {
                        msg.remove("timestamp");
                    }
                    format!("{v}\n")
                }
                Err(_) => format!("{line}\n"),
            }
        })
        .collect()
}
