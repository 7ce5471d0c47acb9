//! Seeded histories: the real core ([`Driver`] over [`Domain`]) against the simulated QEMU,
//! with guest writes, requests and faults chosen by a seed, and checkers after every step.
//!
//! Contract: [`run_history`] is a pure function of its [`HistoryConfig`] (seed included): the
//! random source is ChaCha8 seeded from it, time is virtual, and nothing reads the OS. A
//! history has a safety phase (faults on) and a liveness phase: faults stop (the link is
//! reconnected, QEMU runs), and within [`liveness_bound_ms`] of virtual time every request must
//! be answered and every backup must end, a push one by itself, a pull one once its client says
//! it is done; then a few fault-free actions must settle the same way, and nothing may be left
//! behind (no job, temporary bitmap, node or export). A backup that does not end is reported
//! with what the engine was waiting for. Checkers run after every step:
//! - every completed backup, restored through its backing chain (an incremental one over the
//!   disk content at its checkpoint), equals the guest disk at the backup's point in time, and
//!   a pull export reads that content while guest writes go on;
//! - every checkpoint of the tree has its bitmap on every disk, unless a QEMU crash since its
//!   creation may have lost it (then the core must refuse incrementals from it, which the
//!   content checker would otherwise catch) or it was redefined from metadata;
//! - no disk is in two block jobs;
//! - no request is lost (liveness).
//!
//! A failure is a [`Failure`] whose `Display` is one line that reproduces it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::rc::Rc;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde_json::json;
use vbackup_core::Domain;
use vbackup_core::backup::{
    BackupDiskSpec, BackupMode, BackupSpec, BackupStore, DomainJobStatus, NbdServer, NbdTransport,
    StoreKind,
};
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk, CheckpointTree, DeleteScope};
use vbackup_core::domain::{
    DomainConfig, DomainEvent, FileError, FileErrorKind, FileOp, RETRY_MAX_MS, Reply, Request,
    RequestId, StoreOp, StoredState,
};
use vbackup_core::driver::{DriveError, Driver, Effects, MemoryEffects};
use vbackup_core::error::Error;
use vbackup_core::export::{ExportReader, STATE_DIRTY};
use vbackup_core::link::Link;
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};

use crate::errors::QmpError;
use crate::image::{Cluster, FileContent, FileSystem, ImageError, LogicalImage};
use crate::nbd::ExportView;
pub mod link;

use self::link::{FaultyLink, LinkFaults, PointInTime, SharedQemu, Stall};
use crate::qemu::{Config, Fault, Qemu};

/// Size of every simulated disk.
pub const DISK_BYTES: u64 = 512 << 10;
/// Cluster size of every image.
pub const CLUSTER: u64 = 64 << 10;

/// What a history does.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// The seed.
    pub seed: u64,
    /// Steps of the safety phase (faults on).
    pub steps: usize,
    /// Whether faults are injected in the safety phase.
    pub faults: bool,
    /// Keep the QMP trace and the step log (for determinism checks and debugging).
    pub trace: bool,
    /// Restart vbackup (and fail store writes) at any moment, also while a backup is being
    /// set up or runs (the default). Off, those two faults only strike between backups, which
    /// narrows a failure down when bisecting.
    pub engine_faults_anywhere: bool,
    /// The fault kinds the safety phase draws from.
    pub fault_kinds: Vec<FaultKind>,
    /// Abort also while a backup is still being set up (its begin not answered yet; the
    /// default). Off, aborts wait for the begin's answer.
    pub abort_during_setup: bool,
    /// A stall of the simulated peer armed when the liveness phase starts and never lifted
    /// (see [`Stall`]): only to prove that the liveness phase catches a stalled engine.
    pub stall: Option<Stall>,
}

/// How long, in virtual milliseconds, everything may take to settle once faults stop.
///
/// Over a healthy QEMU a correct engine waits at most for: one wait begun before the faults
/// stopped that ends only at its deadline (a command reply or a file operation, the default
/// command timeout, 60 s), then a few tries of refused cleanup spaced by the longest back-off
/// ([`RETRY_MAX_MS`], four of them allowed), and the copying itself (milliseconds for the
/// lab's 512 KiB disks at 32 MiB/s). A backup still running after that waits for something
/// that is not coming.
pub fn liveness_bound_ms() -> u64 {
    DomainConfig::default().command_timeout_ms + 4 * RETRY_MAX_MS
}

impl HistoryConfig {
    /// The default history of a seed: 200 steps with faults.
    pub fn seed(seed: u64) -> Self {
        Self {
            seed,
            steps: 200,
            faults: true,
            trace: false,
            engine_faults_anywhere: true,
            fault_kinds: FaultKind::ALL.to_vec(),
            abort_during_setup: true,
            stall: None,
        }
    }
}

/// Kinds of faults, for the mix report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// A command refused with an error.
    CommandRefused,
    /// A backup job fails with EIO on its target, or (three times in ten) the host fails to
    /// write a completed target out.
    JobIoError,
    /// A backup job's target runs out of space.
    TargetNoSpace,
    /// QEMU dies and is started again over the same files.
    QemuCrash,
    /// The QMP connection drops (possibly before a reply) and is opened again.
    LinkDrop,
    /// vbackup restarts from its store.
    EngineRestart,
    /// A store write fails (vbackup then restarts from its store).
    StoreWriteFailed,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::CommandRefused,
        FaultKind::JobIoError,
        FaultKind::TargetNoSpace,
        FaultKind::QemuCrash,
        FaultKind::LinkDrop,
        FaultKind::EngineRestart,
        FaultKind::StoreWriteFailed,
    ];

    /// The kind called `name` (see [`FaultKind::name`]).
    pub fn from_name(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::CommandRefused => "command-refused",
            FaultKind::JobIoError => "job-io-error",
            FaultKind::TargetNoSpace => "target-no-space",
            FaultKind::QemuCrash => "qemu-crash",
            FaultKind::LinkDrop => "link-drop",
            FaultKind::EngineRestart => "engine-restart",
            FaultKind::StoreWriteFailed => "store-write-failed",
        }
    }
}

/// Counters of one history (or a sum of histories).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Steps run (both phases).
    pub steps: u64,
    /// Requests submitted.
    pub requests: u64,
    /// Requests answered successfully.
    pub requests_ok: u64,
    /// Backups whose content was checked byte for byte.
    pub backups_verified: u64,
    /// Guest writes.
    pub guest_writes: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<FaultKind, u64>,
    /// The longest a liveness settle took, in virtual milliseconds (the most over histories).
    pub settle_ms_max: u64,
    /// Messages a stall kept from the engine.
    pub withheld: u64,
}

impl HistoryStats {
    /// Adds another history's counters.
    pub fn add(&mut self, other: &HistoryStats) {
        self.steps += other.steps;
        self.requests += other.requests;
        self.requests_ok += other.requests_ok;
        self.backups_verified += other.backups_verified;
        self.guest_writes += other.guest_writes;
        for (k, v) in &other.faults {
            *self.faults.entry(*k).or_default() += v;
        }
        self.settle_ms_max = self.settle_ms_max.max(other.settle_ms_max);
        self.withheld += other.withheld;
    }
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The step at which a checker failed.
    pub step: usize,
    /// What is wrong.
    pub what: String,
    /// The environment besides the seed that reproduces it (`SIM_FAULTS=...`, `SIM_STEPS=...`,
    /// `SIM_ENGINE_FAULTS_ANYWHERE=0`, `SIM_ABORT_DURING_SETUP=0`, `SIM_STALL=...`), or empty.
    pub env: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SIM_SEED={}{} cargo test --release -p vbackup-sim --test history -- seed_from_env --nocapture  # step {}: {}",
            self.seed, self.env, self.step, self.what
        )
    }
}

/// The outcome of one history.
#[derive(Debug, Clone)]
pub struct HistoryOutcome {
    /// Counters.
    pub stats: HistoryStats,
    /// The first broken invariant, if any.
    pub failure: Option<Failure>,
    /// The QMP trace (JSON Lines) followed by the step log, when asked for.
    pub trace: String,
}

/// Runs one history.
pub fn run_history(config: &HistoryConfig) -> HistoryOutcome {
    let mut w = World::new(config);
    let failure = w.run(config.steps).err();
    w.stats.withheld = w.driver().link().withheld();
    let mut trace = String::new();
    if config.trace {
        if let Some(t) = w.driver.as_ref().and_then(|d| d.link().trace_lines()) {
            trace.push_str(&t);
        }
        trace.push_str(&w.log.join("\n"));
    }
    HistoryOutcome {
        stats: w.stats,
        failure,
        trace,
    }
}

/// The store and the host file system as vbackup sees them.
#[derive(Debug)]
pub struct StoreEffects {
    qemu: SharedQemu,
    /// Everything persisted, file operations and events, in order.
    pub memory: MemoryEffects,
    /// The next store write fails.
    pub fail_next_persist: bool,
    /// Targets whose next sync fails (the host cannot write them out).
    pub failing_syncs: BTreeSet<String>,
}

impl StoreEffects {
    /// Effects over the files of `qemu`.
    pub fn new(qemu: SharedQemu) -> Self {
        Self {
            qemu,
            memory: MemoryEffects::default(),
            fail_next_persist: false,
            failing_syncs: BTreeSet::new(),
        }
    }
}

impl Effects for StoreEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        if self.fail_next_persist {
            self.fail_next_persist = false;
            return Err("simulated store write failure".into());
        }
        self.memory.persist(op)
    }

    fn file(&mut self, op: &FileOp) -> Result<(), FileError> {
        self.memory.files.push(op.clone());
        let mut q = self.qemu.borrow_mut();
        match op {
            FileOp::CreateExclusive { path } => {
                if q.fs().exists(path) {
                    return Err(FileError::new(
                        FileErrorKind::AlreadyExists,
                        path,
                        format!("file '{path}' exists"),
                    ));
                }
                q.fs_mut().touch(path);
                Ok(())
            }
            FileOp::Remove { path } => {
                q.fs_mut().remove(path);
                Ok(())
            }
            // The simulated host has no cache: what QEMU wrote is stored already.
            FileOp::Sync { path } => {
                if self.failing_syncs.remove(path) {
                    q.fs_mut().lose_unwritten_data(path);
                    Err(FileError::other(
                        path,
                        format!("cannot sync '{path}': Input/output error"),
                    ))
                } else if q.fs().exists(path) {
                    Ok(())
                } else {
                    Err(FileError::new(
                        FileErrorKind::NotFound,
                        path,
                        format!("cannot sync '{path}': no such file"),
                    ))
                }
            }
        }
    }

    fn event(&mut self, event: &DomainEvent) {
        self.memory.event(event);
    }
}

/// The simulated domain: `vda` (one qcow2 layer) and `vdb` (an overlay over a base image).
pub fn lab_domain() -> DomainDef {
    let layer = |node: &str, path: &str| Layer {
        storage: StorageType::File,
        format: ImageFormat::Qcow2,
        path: Some(path.into()),
        index: None,
        node_name: Some(node.into()),
    };
    let disk = |target: &str, layers| DiskDef {
        target: target.into(),
        device: DiskDevice::Disk,
        bus: Some("virtio".into()),
        readonly: false,
        transient: false,
        layers,
    };
    DomainDef {
        name: "sim1".into(),
        uuid: None,
        disks: vec![
            disk("vda", vec![layer("libvirt-1-format", "/img/vda.qcow2")]),
            disk(
                "vdb",
                vec![
                    layer("libvirt-3-format", "/img/vdb.ovl"),
                    layer("libvirt-2-format", "/img/vdb.qcow2"),
                ],
            ),
        ],
    }
}

/// Creates the lab images with some initial content.
pub fn lab_files() -> FileSystem {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/img/vda.qcow2", DISK_BYTES, CLUSTER, None);
    fs.create_qcow2("/img/vdb.qcow2", DISK_BYTES, CLUSTER, None);
    // Writing to images nobody has open cannot fail for in-range offsets.
    let _ = fs.write_image("/img/vda.qcow2", 0, &[0x11; 3 * CLUSTER as usize]);
    let _ = fs.write_image("/img/vdb.qcow2", CLUSTER, &[0x22; 2 * CLUSTER as usize]);
    fs.create_qcow2("/img/vdb.ovl", DISK_BYTES, CLUSTER, Some("/img/vdb.qcow2"));
    let _ = fs.write_image("/img/vdb.ovl", 2 * CLUSTER, &[0x33; CLUSTER as usize]);
    fs
}

/// Opens the lab domain's nodes and devices in a fresh process, as a management tool starting
/// the VM does (outside the QMP session vbackup uses).
pub fn boot_lab(q: &mut Qemu) -> Result<(), QmpError> {
    let was = q.negotiated;
    q.negotiated = true;
    // Faults aim at vbackup's session, not at the tool that starts the VM.
    let faults = std::mem::take(&mut q.faults);
    let now = q.now_ms();
    let cmds = [
        json!({"driver": "file", "node-name": "libvirt-1-storage", "filename": "/img/vda.qcow2"}),
        json!({"driver": "qcow2", "node-name": "libvirt-1-format", "file": "libvirt-1-storage", "backing": null}),
        json!({"driver": "file", "node-name": "libvirt-2-storage", "filename": "/img/vdb.qcow2", "read-only": true}),
        json!({"driver": "qcow2", "node-name": "libvirt-2-format", "file": "libvirt-2-storage", "backing": null, "read-only": true}),
        json!({"driver": "file", "node-name": "libvirt-3-storage", "filename": "/img/vdb.ovl"}),
        json!({"driver": "qcow2", "node-name": "libvirt-3-format", "file": "libvirt-3-storage", "backing": "libvirt-2-format"}),
    ];
    let mut result = Ok(());
    for c in cmds {
        if let Err(e) = q.execute(now, &json!({"execute": "blockdev-add", "arguments": c})) {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        result = q
            .add_device("vda", "libvirt-1-format")
            .and_then(|()| q.add_device("vdb", "libvirt-3-format"));
    }
    q.take_events();
    q.faults = faults;
    q.negotiated = was;
    result
}

/// How the lab's disks are attached to the simulated VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabWiring {
    /// `-blockdev` nodes with libvirt's names (`libvirt-N-format`/`-storage`) under devices
    /// with ids: [`boot_lab`].
    #[default]
    Blockdev,
    /// Legacy `-drive file=...,if=virtio`: `vda` without an id, `vdb` with `id=drive-vdb`;
    /// QEMU names every node itself (`#blockNNN`).
    Drive,
}

impl LabWiring {
    /// The device (or drive) id of the lab disk `target`.
    pub fn device(self, target: &str) -> &str {
        match (self, target) {
            (LabWiring::Drive, "vda") => "virtio0",
            (LabWiring::Drive, "vdb") => "drive-vdb",
            _ => target,
        }
    }
}

/// Opens the lab domain as [`boot_lab`] does, with the disks attached as `wiring` says.
pub fn boot_lab_wired(q: &mut Qemu, wiring: LabWiring) -> Result<(), QmpError> {
    match wiring {
        LabWiring::Blockdev => boot_lab(q),
        LabWiring::Drive => {
            let r = q
                .attach_drive("/img/vda.qcow2", None)
                .and_then(|_| q.attach_drive("/img/vdb.ovl", Some("drive-vdb")));
            q.take_events();
            r.map(|_| ())
        }
    }
}

/// The lab domain with the node names the simulated VM gave its disks (found as attached-
/// domain discovery finds them: the device's node, then its backing chain).
pub fn lab_domain_in(q: &Qemu, wiring: LabWiring) -> DomainDef {
    let mut def = lab_domain();
    if wiring == LabWiring::Blockdev {
        return def;
    }
    for disk in &mut def.disks {
        let chain = q.device_chain(wiring.device(&disk.target));
        for (layer, node) in disk.layers.iter_mut().zip(chain) {
            layer.node_name = Some(node);
        }
    }
    def
}

/// [`lab_driver`] with the disks attached as `wiring` says.
pub fn lab_driver_wired(wiring: LabWiring) -> (Driver<FaultyLink, StoreEffects>, SharedQemu) {
    let mut q = Qemu::new(
        lab_files(),
        Config {
            throughput_bytes_per_s: LAB_THROUGHPUT_BYTES_PER_S,
            ..Config::default()
        },
    );
    let booted = boot_lab_wired(&mut q, wiring);
    debug_assert!(booted.is_ok(), "lab boots: {booted:?}");
    let def = lab_domain_in(&q, wiring);
    let qemu = Rc::new(RefCell::new(q));
    let domain = Domain::new(def, DomainConfig::default(), CheckpointTree::new(), None);
    let driver = Driver::new(
        domain,
        FaultyLink::new(qemu.clone()),
        StoreEffects::new(qemu.clone()),
    );
    (driver, qemu)
}

/// A checkpoint of every lab disk.
pub fn lab_checkpoint(name: &str) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        description: None,
        parent: None,
        creation_time_s: 1_700_000_000,
        disks: ["vda", "vdb"]
            .iter()
            .map(|d| CheckpointDisk {
                target: (*d).into(),
                bitmap: Some(name.into()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

/// A backup of every lab disk; `dir` keeps the images of different backups apart.
pub fn lab_backup(mode: BackupMode, incremental: Option<&str>, dir: &str) -> BackupSpec {
    let disks = ["vda", "vdb"]
        .iter()
        .map(|t| BackupDiskSpec {
            target: (*t).into(),
            backup: true,
            incremental: incremental.map(Into::into),
            store: Some(BackupStore {
                kind: StoreKind::File,
                path: Some(format!("{dir}/{t}.qcow2")),
                format: None,
            }),
            export_name: None,
            export_bitmap: None,
        })
        .collect();
    BackupSpec {
        mode,
        incremental: incremental.map(Into::into),
        server: (mode == BackupMode::Pull).then(|| NbdServer {
            transport: NbdTransport::Unix {
                socket: "/run/vbackup-sim.sock".into(),
            },
            tls: None,
        }),
        disks,
    }
}

/// Restores one disk of a backup: `image` (a target image) over `base` (the disk content its
/// backing chain stands for: nothing for a full backup, the content at the checkpoint for an
/// incremental one), read through the chain.
pub fn restore_image(fs: &FileSystem, image: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let base = base.map(|b| LogicalImage::from_bytes(b, CLUSTER));
    Ok(restore_logical(fs, image, base.as_ref())?.to_bytes())
}

/// [`restore_image`] over shared clusters: the clusters `image` allocates laid over `base`
/// (the header's own backing file is ignored, as after `qemu-img rebase -u`).
pub fn restore_logical(
    fs: &FileSystem,
    image: &str,
    base: Option<&LogicalImage>,
) -> Result<LogicalImage, String> {
    match fs.get(image) {
        None => Err(format!("backup image {image} is missing")),
        Some(FileContent::Qcow2(q)) => Ok(LogicalImage::overlay(base, q.virtual_size, &q.data)),
        Some(FileContent::Raw(_)) if base.is_some() => {
            Err(ImageError::NotQcow2(image.into()).to_string())
        }
        Some(FileContent::Raw(r)) => Ok(LogicalImage::overlay(None, r.size, &r.data)),
    }
}

#[derive(Debug, Clone)]
struct ActiveBackup {
    mode: BackupMode,
    incremental: Option<String>,
    dir: String,
    point: Option<Rc<BTreeMap<String, LogicalImage>>>,
}

#[derive(Debug, Clone)]
struct CheckpointContent {
    disks: Rc<BTreeMap<String, LogicalImage>>,
    crash_epoch: u64,
}

struct World {
    seed: u64,
    steps: usize,
    rng: ChaCha8Rng,
    qemu: SharedQemu,
    driver: Option<Driver<FaultyLink, StoreEffects>>,
    def: DomainDef,
    faults_on: bool,
    engine_faults_anywhere: bool,
    fault_kinds: Vec<FaultKind>,
    abort_during_setup: bool,
    stall: Option<Stall>,
    trace: bool,
    log: Vec<String>,
    stats: HistoryStats,
    step: usize,
    /// Requests submitted since the engine last started, with a description.
    pending: BTreeMap<RequestId, String>,
    /// Content of every disk when each checkpoint bitmap was created, by bitmap name.
    contents: BTreeMap<String, CheckpointContent>,
    /// Checkpoints deleted with `metadata_only` (their bitmaps stay): redefine candidates.
    deleted_metadata: Vec<Checkpoint>,
    /// Checkpoints redefined from metadata (their bitmaps are not guaranteed).
    redefined: BTreeSet<String>,
    last_backup_point: Option<Rc<BTreeMap<String, LogicalImage>>>,
    backup: Option<ActiveBackup>,
    events_seen: usize,
    crash_epoch: u64,
    boot_nodes: BTreeSet<String>,
    next_name: u64,
    backup_candidate: Option<ActiveBackup>,
    /// Checkpoints whose deletion was lost by a failed store write.
    resurrected: BTreeSet<String>,
    candidates: BTreeMap<RequestId, ActiveBackup>,
    /// Reused for the data of guest writes.
    write_buffer: Vec<u8>,
    /// Chooses when a client polls job statistics while QMP traffic is in flight, apart
    /// from `rng` so that the rest of a seed's history does not depend on it.
    poll_rng: ChaCha8Rng,
}

impl World {
    fn new(config: &HistoryConfig) -> Self {
        let qemu_cfg = Config {
            // Slow enough that guest writes land while jobs copy.
            throughput_bytes_per_s: 32 << 20,
            ..Config::default()
        };
        let mut q = Qemu::new(lab_files(), qemu_cfg);
        let booted = boot_lab(&mut q);
        debug_assert!(booted.is_ok(), "lab boots: {booted:?}");
        let boot_nodes = q.st.nodes.keys().cloned().collect();
        let qemu = Rc::new(RefCell::new(q));
        let mut link = FaultyLink::new(qemu.clone());
        if config.trace {
            link.record();
        }
        let def = lab_domain();
        let domain = Domain::new(
            def.clone(),
            DomainConfig::default(),
            CheckpointTree::new(),
            None,
        );
        let driver = Driver::new(domain, link, StoreEffects::new(qemu.clone()));
        Self {
            seed: config.seed,
            steps: config.steps,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            qemu,
            driver: Some(driver),
            def,
            faults_on: config.faults,
            engine_faults_anywhere: config.engine_faults_anywhere,
            fault_kinds: config.fault_kinds.clone(),
            abort_during_setup: config.abort_during_setup,
            stall: config.stall.clone(),
            trace: config.trace,
            log: Vec::new(),
            stats: HistoryStats::default(),
            step: 0,
            pending: BTreeMap::new(),
            contents: BTreeMap::new(),
            deleted_metadata: Vec::new(),
            redefined: BTreeSet::new(),
            last_backup_point: None,
            backup: None,
            events_seen: 0,
            crash_epoch: 0,
            boot_nodes,
            next_name: 0,
            backup_candidate: None,
            resurrected: BTreeSet::new(),
            candidates: BTreeMap::new(),
            write_buffer: Vec::new(),
            poll_rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x706f_6c6c),
        }
    }

    fn fail(&self, what: impl Into<String>) -> Failure {
        let mut env = String::new();
        if !self.faults_on {
            env.push_str(" SIM_FAULTS=none");
        } else if self.fault_kinds != FaultKind::ALL {
            let names: Vec<&str> = self.fault_kinds.iter().map(|k| k.name()).collect();
            env.push_str(&format!(" SIM_FAULTS={}", names.join(",")));
        }
        if !self.engine_faults_anywhere {
            env.push_str(" SIM_ENGINE_FAULTS_ANYWHERE=0");
        }
        if !self.abort_during_setup {
            env.push_str(" SIM_ABORT_DURING_SETUP=0");
        }
        if self.steps != HistoryConfig::seed(0).steps {
            env.push_str(&format!(" SIM_STEPS={}", self.steps));
        }
        if let Some(stall) = &self.stall {
            env.push_str(&format!(" SIM_STALL={}", stall.name()));
        }
        Failure {
            seed: self.seed,
            step: self.step,
            what: what.into(),
            env,
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rng.next_u64() % n }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if self.trace {
            let l = format!("# step {}: {}", self.step, line());
            self.log.push(l);
        }
    }

    fn driver(&mut self) -> &mut Driver<FaultyLink, StoreEffects> {
        // The driver is only taken out while the engine restarts, inside one function.
        self.driver.get_or_insert_with(unreachable_driver)
    }

    fn now(&mut self) -> u64 {
        self.driver().link().now().as_ms()
    }

    fn run(&mut self, steps: usize) -> Result<(), Failure> {
        self.pump(1)?;
        for _ in 0..steps {
            self.step += 1;
            self.stats.steps += 1;
            self.act(self.faults_on)?;
            self.check()?;
        }
        self.liveness()
    }

    /// One random action, then time passes.
    fn act(&mut self, faults: bool) -> Result<(), Failure> {
        let roll = self.below(100);
        match roll {
            0..=34 => self.guest_write(),
            35..=69 => self.request(),
            70..=74 => self.clean_qemu_restart()?,
            75..=87 if faults => self.fault()?,
            _ => {}
        }
        let dt = 1 + self.below(40);
        self.pump(dt)
    }

    fn guest_write(&mut self) {
        let disk = if self.chance(50) { "vda" } else { "vdb" };
        let offset = self.below(DISK_BYTES - 1);
        let len = 1 + self.below((DISK_BYTES - offset).min(3 * CLUSTER));
        let byte = (self.below(255) + 1) as u8;
        let now = self.now();
        let data = &mut self.write_buffer;
        data.clear();
        data.resize(len as usize, byte);
        let r = self.qemu.borrow_mut().guest_write(now, disk, offset, data);
        if r.is_ok() {
            self.stats.guest_writes += 1;
        }
        self.note(|| format!("guest write {disk} {offset}+{len} = {byte:#x}: {r:?}"));
    }

    fn checkpoint_names(&mut self) -> Vec<String> {
        self.driver()
            .domain()
            .view()
            .checkpoints
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    fn pick_checkpoint(&mut self) -> Option<String> {
        let names = self.checkpoint_names();
        if names.is_empty() {
            return None;
        }
        let i = self.below(names.len() as u64) as usize;
        Some(names[i].clone())
    }

    fn fresh_name(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }

    fn request(&mut self) {
        let kind = self.below(100);
        let request = match kind {
            0..=17 => Request::CheckpointCreate {
                checkpoint: lab_checkpoint(&self.fresh_name("c")),
                quiesce: false,
            },
            18..=29 => {
                let Some(name) = self.pick_checkpoint() else {
                    return;
                };
                let scope = match self.below(3) {
                    0 => DeleteScope::Single,
                    1 => DeleteScope::WithChildren,
                    _ => DeleteScope::ChildrenOnly,
                };
                let metadata_only = self.chance(25);
                if metadata_only && scope == DeleteScope::Single {
                    let cp = self
                        .driver()
                        .domain()
                        .view()
                        .checkpoints
                        .get(&name)
                        .cloned();
                    if let Some(cp) = cp {
                        self.deleted_metadata.push(cp);
                    }
                }
                Request::CheckpointDelete {
                    name,
                    scope,
                    metadata_only,
                }
            }
            30..=35 => {
                if self.deleted_metadata.is_empty() {
                    return;
                }
                let i = self.below(self.deleted_metadata.len() as u64) as usize;
                let mut cp = self.deleted_metadata[i].clone();
                let names = self.checkpoint_names();
                if cp.parent.as_ref().is_some_and(|p| !names.contains(p)) {
                    cp.parent = None;
                }
                let validate = self.chance(50);
                self.redefined.insert(cp.name.clone());
                Request::CheckpointRedefine {
                    checkpoint: cp,
                    validate,
                }
            }
            36..=41 => {
                let Some(name) = self.pick_checkpoint() else {
                    return;
                };
                Request::CheckpointGetXml { name, size: true }
            }
            42..=79 => {
                let mode = if self.chance(50) {
                    BackupMode::Push
                } else {
                    BackupMode::Pull
                };
                let incremental = if self.chance(60) {
                    self.pick_checkpoint()
                } else {
                    None
                };
                let dir = self.fresh_name("/backup/b");
                let checkpoint = self
                    .chance(50)
                    .then(|| lab_checkpoint(&self.fresh_name("c")));
                let spec = lab_backup(mode, incremental.as_deref(), &dir);
                // Remembered now; it becomes the active backup when the begin succeeds.
                self.backup_candidate = Some(ActiveBackup {
                    mode,
                    incremental,
                    dir,
                    point: None,
                });
                Request::BackupBegin {
                    spec,
                    checkpoint,
                    reuse_external: false,
                }
            }
            80..=91 => {
                let setting_up = self.pending.values().any(|d| d.starts_with("backup-begin"));
                if setting_up && !self.abort_during_setup {
                    return;
                }
                Request::AbortJob
            }
            _ => Request::JobStats {
                completed: self.chance(50),
                keep_completed: self.chance(50),
            },
        };
        let desc = describe(&request);
        self.stats.requests += 1;
        let submitted = self.driver().submit(request);
        match submitted {
            Ok(id) => {
                self.note(|| format!("request #{} {desc}", id.0));
                if let Some(b) = self.backup_candidate.take() {
                    self.candidates.insert(id, b);
                }
                self.pending.insert(id, desc);
            }
            Err(e) => {
                self.backup_candidate = None;
                self.note(|| format!("request {desc} stopped the driver: {e}"));
                self.on_drive_error(e);
            }
        }
    }

    fn fault(&mut self) -> Result<(), Failure> {
        // A store write armed to fail strikes at the next write, which may belong to a backup.
        if !self.engine_faults_anywhere && self.driver().effects().fail_next_persist {
            return Ok(());
        }
        if self.fault_kinds.is_empty() {
            return Ok(());
        }
        let i = self.below(self.fault_kinds.len() as u64) as usize;
        let kind = self.fault_kinds[i];
        let engine_fault = matches!(kind, FaultKind::EngineRestart | FaultKind::StoreWriteFailed);
        let backup_busy = self.driver().domain().view().backup.is_some()
            || self.pending.values().any(|d| d.starts_with("backup-begin"));
        if engine_fault && backup_busy && !self.engine_faults_anywhere {
            return Ok(());
        }
        let applied = match kind {
            FaultKind::CommandRefused => {
                const NAMES: [&str; 11] = [
                    "transaction",
                    "blockdev-add",
                    "blockdev-create",
                    "query-named-block-nodes",
                    "block-export-add",
                    "nbd-server-start",
                    "block-dirty-bitmap-remove",
                    "job-dismiss",
                    "blockdev-del",
                    "query-jobs",
                    "block-job-cancel",
                ];
                let name = NAMES[self.below(NAMES.len() as u64) as usize];
                self.qemu.borrow_mut().set_fault(Fault::RefuseCommand {
                    command: name.into(),
                    error: QmpError::generic(format!("simulated refusal of {name}")),
                });
                true
            }
            FaultKind::JobIoError | FaultKind::TargetNoSpace => {
                let targets: Vec<(String, String)> = self
                    .driver()
                    .domain()
                    .view()
                    .backup
                    .map(|p| {
                        p.disks
                            .iter()
                            .map(|d| (d.format_node.clone(), d.store_path.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                if targets.is_empty() {
                    false
                } else {
                    let (node, path) = targets[self.below(targets.len() as u64) as usize].clone();
                    if kind == FaultKind::JobIoError && self.chance(30) {
                        // The job succeeds, but the host fails to write the target out.
                        self.driver().effects_mut().failing_syncs.insert(path);
                    } else {
                        let fault = if kind == FaultKind::JobIoError {
                            Fault::TargetIoError { node }
                        } else {
                            Fault::TargetNoSpace { node }
                        };
                        self.qemu.borrow_mut().set_fault(fault);
                    }
                    true
                }
            }
            FaultKind::QemuCrash => {
                self.qemu.borrow_mut().crash();
                self.crash_epoch += 1;
                // Whatever a pull client was reading is gone with the process.
                self.drive_link_loss()?;
                self.restart_qemu()?;
                true
            }
            FaultKind::LinkDrop => {
                if self.chance(50) {
                    self.driver().link_mut().drop_connection();
                } else {
                    let n = self.below(4) as u32;
                    self.driver().link_mut().set_faults(LinkFaults {
                        drop_after_command: Some(n),
                    });
                }
                true
            }
            FaultKind::EngineRestart => {
                self.restart_engine();
                true
            }
            FaultKind::StoreWriteFailed => {
                self.driver().effects_mut().fail_next_persist = true;
                true
            }
        };
        if applied {
            *self.stats.faults.entry(kind).or_default() += 1;
            self.note(|| format!("fault {}", kind.name()));
        }
        Ok(())
    }

    /// Feeds the lost link to the engine and opens a new session if QEMU runs.
    fn drive_link_loss(&mut self) -> Result<(), Failure> {
        let d = self.driver();
        d.link_mut().drop_connection();
        let r = d.link_down();
        if let Err(e) = r {
            self.on_drive_error(e);
        }
        Ok(())
    }

    fn restart_qemu(&mut self) -> Result<(), Failure> {
        let booted = {
            let mut q = self.qemu.borrow_mut();
            q.restart();
            let r = boot_lab(&mut q);
            self.boot_nodes = q.st.nodes.keys().cloned().collect();
            r
        };
        if let Err(e) = booted {
            return Err(self.fail(format!("the lab does not boot again: {e:?}")));
        }
        self.driver().link_mut().reconnect();
        Ok(())
    }

    /// `quit` and a fresh start: persistent bitmaps reach the images.
    fn clean_qemu_restart(&mut self) -> Result<(), Failure> {
        if self.driver().domain().view().backup.is_some() {
            // libvirt refuses to stop a domain with a backup job; so does this history.
            return Ok(());
        }
        self.note(|| "qemu clean restart".into());
        self.qemu.borrow_mut().shutdown_cleanly();
        self.drive_link_loss()?;
        self.restart_qemu()
    }

    /// vbackup dies and starts again from its store; requests in flight die with it.
    fn restart_engine(&mut self) {
        let Some(driver) = self.driver.take() else {
            return;
        };
        let (old, mut link, mut effects) = driver.into_parts();
        effects.fail_next_persist = false;
        let stored = StoredState::from_ops(&effects.memory.persisted);
        let tree = stored.checkpoint_tree();
        // A deletion QEMU confirmed but the store never recorded comes back from the store
        // with its bitmaps gone: nothing in the core reconciles that (see the report of
        // `stored_deletion_lost_resurrects_checkpoint_without_bitmaps`).
        for c in tree.iter() {
            if old.view().checkpoints.get(&c.name).is_none() {
                self.resurrected.insert(c.name.clone());
            }
        }
        let domain = Domain::from_stored(self.def.clone(), DomainConfig::default(), stored);
        link.reconnect();
        self.pending.clear();
        self.candidates.clear();
        self.driver = Some(Driver::new(domain, link, effects));
    }

    fn on_drive_error(&mut self, e: DriveError) {
        match e {
            DriveError::Store(_) => {
                *self
                    .stats
                    .faults
                    .entry(FaultKind::EngineRestart)
                    .or_default() += 1;
                self.restart_engine();
            }
            DriveError::Link(_) => {
                // The driver told the domain; a management tool reconnects.
                let running = self.qemu.borrow().is_running();
                if running {
                    self.driver().link_mut().reconnect();
                }
            }
            DriveError::NoAnswer(..) => {}
        }
    }

    /// Drives the engine while `dt` ms of virtual time pass, then collects what happened.
    fn pump(&mut self, dt: u64) -> Result<(), Failure> {
        let deadline = vbackup_core::link::Timestamp::from_ms(self.now() + dt);
        for _ in 0..20_000 {
            let d = self.driver();
            if d.link().now() >= deadline && !d.link().has_queued() {
                break;
            }
            if let Err(e) = d.step(Some(deadline)) {
                self.note(|| format!("driver stopped: {e}"));
                self.on_drive_error(e);
            }
            self.poll_mid_flight();
            self.collect()?;
        }
        self.collect()
    }

    /// A client such as `backup-begin --wait` asks for the running job's statistics at any
    /// moment, also while replies are on their way (the history's own requests only come
    /// when the link is quiet): sometimes, do that.
    fn poll_mid_flight(&mut self) {
        let d = self.driver();
        if !d.link().has_queued() || d.domain().view().backup.is_none() {
            return;
        }
        if self.poll_rng.next_u64() % 100 >= 5 {
            return;
        }
        let request = Request::JobStats {
            completed: false,
            keep_completed: true,
        };
        self.stats.requests += 1;
        match self.driver().submit(request) {
            Ok(id) => {
                self.note(|| format!("request #{} job-stats (mid-flight poll)", id.0));
                self.pending
                    .insert(id, "job-stats (mid-flight poll)".into());
            }
            Err(e) => self.on_drive_error(e),
        }
    }

    /// Takes answers, points in time and events; verifies completed backups.
    fn collect(&mut self) -> Result<(), Failure> {
        let points = self.driver().link_mut().take_points();
        for p in points {
            self.on_point(p);
        }
        let ids: Vec<RequestId> = self.pending.keys().copied().collect();
        for id in ids {
            if let Some(answer) = self.driver().answer(id) {
                let desc = self.pending.remove(&id).unwrap_or_default();
                self.note(|| format!("answer #{} {desc}: {}", id.0, describe_answer(&answer)));
                let candidate = self.candidates.remove(&id);
                if let Err(e) = &answer
                    && e.category() == "link-lost"
                    && let Some(target) = desc
                        .strip_prefix("checkpoint-delete ")
                        .and_then(|r| r.split(' ').next())
                {
                    // The core reported that the deletion's outcome is unknown: QEMU may have
                    // removed the bitmaps before the connection dropped.
                    let mut names = self
                        .driver()
                        .domain()
                        .view()
                        .checkpoints
                        .descendants_preorder(target);
                    names.push(target.to_owned());
                    self.resurrected.extend(names);
                }
                if answer.is_ok() {
                    self.stats.requests_ok += 1;
                    if let Some(mut b) = candidate {
                        b.point = self.last_backup_point.take();
                        self.backup = Some(b);
                        self.check_pull()?;
                    }
                }
            }
        }
        let seen = self.events_seen;
        let events: Vec<DomainEvent> = self.driver().effects().memory.events[seen..].to_vec();
        self.events_seen += events.len();
        for e in events {
            if let DomainEvent::JobCompleted(stats) = e {
                self.note(|| format!("job completed {:?} {:?}", stats.status, stats.errmsg));
                let b = self.backup.take();
                if stats.status == DomainJobStatus::Completed
                    && let Some(b) = b
                    && b.mode == BackupMode::Push
                {
                    self.verify_push(&b)?;
                }
            }
        }
        Ok(())
    }

    fn on_point(&mut self, p: PointInTime) {
        let disks = Rc::new(p.disks);
        for b in &p.persistent_bitmaps {
            self.contents.insert(
                b.clone(),
                CheckpointContent {
                    disks: disks.clone(),
                    crash_epoch: self.crash_epoch,
                },
            );
            self.redefined.remove(b);
            self.resurrected.remove(b);
        }
        if !p.jobs.is_empty() {
            self.last_backup_point = Some(disks);
        }
    }

    fn base_of(&self, b: &ActiveBackup, disk: &str) -> Result<Option<LogicalImage>, Failure> {
        match &b.incremental {
            None => Ok(None),
            Some(cp) => {
                let c = self.contents.get(cp).ok_or_else(|| {
                    self.fail(format!(
                        "incremental backup from '{cp}' succeeded but no transaction ever created that bitmap"
                    ))
                })?;
                Ok(c.disks.get(disk).cloned())
            }
        }
    }

    fn verify_push(&mut self, b: &ActiveBackup) -> Result<(), Failure> {
        let Some(point) = &b.point else {
            return Err(self.fail("a push backup completed without a transaction"));
        };
        for disk in ["vda", "vdb"] {
            let base = self.base_of(b, disk)?;
            let path = format!("{}/{disk}.qcow2", b.dir);
            let restored = restore_logical(self.qemu.borrow().fs(), &path, base.as_ref())
                .map_err(|e| self.fail(format!("restoring {path}: {e}")))?;
            let expected = point
                .get(disk)
                .ok_or_else(|| self.fail(format!("no content of {disk} at the point in time")))?;
            if let Some(at) = restored.first_difference(expected) {
                return Err(self.fail(format!(
                    "push backup {path} (incremental from {:?}) differs from {disk} at its point in time at byte {at}",
                    b.incremental
                )));
            }
        }
        self.stats.backups_verified += 1;
        self.note(|| format!("verified push backup {}", b.dir));
        Ok(())
    }

    /// A pull client reads every export now and compares with the point in time.
    fn check_pull(&mut self) -> Result<(), Failure> {
        let Some(b) = self.backup.clone() else {
            return Ok(());
        };
        if b.mode != BackupMode::Pull {
            return Ok(());
        }
        let Some(point) = b.point.clone() else {
            return Err(self.fail("a pull backup began without a transaction"));
        };
        for disk in ["vda", "vdb"] {
            let base = self.base_of(&b, disk)?;
            let read = {
                let q = self.qemu.borrow();
                // A failed fleecing job (its scratch full or broken) ends the point in time:
                // the backup has failed and its export means nothing any more.
                let fleecing = q.st.jobs.values().any(|j| {
                    j.id.starts_with(&format!("backup-{disk}-"))
                        && j.error.is_none()
                        && j.status == crate::job::JobStatus::Running
                });
                if !fleecing {
                    continue;
                }
                let Ok(mut reader) = q.export_reader(disk) else {
                    // The export is gone (QEMU died); nothing to read.
                    return Ok(());
                };
                let Some(expected) = point.get(disk) else {
                    return Err(self.fail(format!("no content of {disk} at the point in time")));
                };
                compare_export(&mut reader, base.as_ref(), expected)
            };
            let differs = read.map_err(|e| self.fail(format!("reading export {disk}: {e}")))?;
            if let Some(at) = differs {
                return Err(self.fail(format!(
                    "pull export {disk} (incremental from {:?}) differs from the point in time at byte {at}",
                    b.incremental
                )));
            }
        }
        self.stats.backups_verified += 1;
        Ok(())
    }

    fn check(&mut self) -> Result<(), Failure> {
        // A pull client reads at random moments (every export is read once when the backup
        // begins); reading every step would cost more than the rest of the history.
        if self.chance(15) {
            self.check_pull()?;
        }
        self.check_one_job_per_disk()?;
        self.check_requests_have_a_deadline()?;
        // The tree matches the bitmaps, or the mismatch is explained.
        let connected = self.driver().domain().view().connected;
        if connected && self.qemu.borrow().is_running() {
            let missing = {
                let (Some(driver), q) = (self.driver.as_ref(), self.qemu.borrow()) else {
                    return Ok(());
                };
                let view = driver.domain().view();
                let mut missing = None;
                'tree: for cp in view.checkpoints.iter() {
                    let excused = self.redefined.contains(&cp.name)
                        || self.resurrected.contains(&cp.name)
                        || self
                            .contents
                            .get(&cp.name)
                            .is_none_or(|c| c.crash_epoch < self.crash_epoch);
                    if excused {
                        continue;
                    }
                    for (disk, bitmap) in cp.bitmap_disks() {
                        let node = if disk == "vda" {
                            "libvirt-1-format"
                        } else {
                            "libvirt-3-format"
                        };
                        let has = q.st.nodes.get(node).is_some_and(|n| {
                            n.bitmaps
                                .iter()
                                .any(|b| b.name.as_deref() == Some(bitmap) && !b.inconsistent)
                        });
                        if !has {
                            missing = Some(format!(
                                "checkpoint {} has no bitmap {bitmap} on {disk} ({node})",
                                cp.name
                            ));
                            break 'tree;
                        }
                    }
                }
                missing
            };
            if let Some(what) = missing {
                return Err(self.fail(what));
            }
        }
        Ok(())
    }

    /// An unanswered request always has a deadline behind it (a command in flight, a timed
    /// wait or a retry): otherwise a caller that waits for the answer (`vbackup` waits with
    /// the engine's next deadline as its read timeout) would wait forever on an idle QEMU.
    fn check_requests_have_a_deadline(&mut self) -> Result<(), Failure> {
        let d = self.driver();
        if !d.link().is_open() || d.domain().next_deadline().is_some() {
            return Ok(());
        }
        let Some((id, desc)) = self.pending.iter().next() else {
            return Ok(());
        };
        let what = format!(
            "liveness: request #{} {desc} is unanswered while the engine has no deadline (nothing would ever answer it on an idle QEMU)",
            id.0
        );
        Err(self.fail(what))
    }

    /// No disk is the source of two block jobs that have not concluded, and no disk node is
    /// held by two backup jobs.
    fn check_one_job_per_disk(&self) -> Result<(), Failure> {
        let q = self.qemu.borrow();
        let mut sources: Vec<&str> =
            q.st.jobs
                .values()
                .filter(|j| j.status != crate::job::JobStatus::Concluded)
                .filter_map(|j| j.backup().map(|b| b.source.as_str()))
                .collect();
        sources.sort_unstable();
        if let Some(w) = sources.windows(2).find(|w| w[0] == w[1]) {
            return Err(self.fail(format!(
                "disk node {} is the source of two block jobs",
                w[0]
            )));
        }
        for node in ["libvirt-1-format", "libvirt-3-format"] {
            if let Some(n) = q.st.nodes.get(node) {
                let backups = n
                    .job_users
                    .iter()
                    .filter(|j| q.st.jobs.get(*j).is_some_and(|j| j.type_str() == "backup"))
                    .count();
                if backups > 1 {
                    return Err(self.fail(format!("{node} is in {backups} backup jobs")));
                }
            }
        }
        Ok(())
    }

    /// Whether nothing runs and every request is answered.
    fn settled(&mut self) -> bool {
        self.driver().domain().view().backup.is_none() && self.pending.is_empty()
    }

    /// A pull backup ends when its client is done: the client says so (an abort) once per
    /// backup, when the begin has been answered (or at once, if aborts may land during setup).
    fn finish_pull_client(&mut self, told: &mut Option<u64>) {
        let Some((mode, started_ms)) = self
            .driver()
            .domain()
            .view()
            .backup
            .map(|p| (p.mode, p.started_ms))
        else {
            return;
        };
        let setting_up = self.pending.values().any(|d| d.starts_with("backup-begin"));
        if mode != BackupMode::Pull
            || *told == Some(started_ms)
            || (setting_up && !self.abort_during_setup)
        {
            return;
        }
        *told = Some(started_ms);
        if let Ok(id) = self.driver().submit(Request::AbortJob) {
            self.pending.insert(id, "abort (pull client done)".into());
        }
    }

    /// Drives time without faults until everything has settled ([`World::settled`]); fails
    /// when that takes more than [`liveness_bound_ms`]. Returns the virtual time it took.
    fn settle(&mut self, after: &str) -> Result<u64, Failure> {
        let bound = liveness_bound_ms();
        let start = self.now();
        let mut told = None;
        loop {
            if self.settled() {
                return Ok(self.now() - start);
            }
            let elapsed = self.now() - start;
            if elapsed >= bound {
                return Err(self.liveness_failure(after, elapsed));
            }
            self.finish_pull_client(&mut told);
            self.pump(1_000.min(bound - elapsed))?;
            self.check()?;
        }
    }

    /// What did not end in time, and what the engine waits for.
    fn liveness_failure(&mut self, after: &str, elapsed_ms: u64) -> Failure {
        let view = self.driver().domain().view();
        let backup = view.backup.map(|p| {
            format!(
                "the {} backup begun at {} ms did not end",
                if p.mode == BackupMode::Push {
                    "push"
                } else {
                    "pull"
                },
                p.started_ms
            )
        });
        let waiting = self.driver().domain().backup_waiting_for();
        let mut what: Vec<String> = backup.into_iter().collect();
        what.extend(
            self.pending
                .iter()
                .map(|(id, d)| format!("request #{} {d} was never answered", id.0)),
        );
        let mut text = format!(
            "liveness: {} within {} s of virtual time after {after}",
            what.join(", "),
            elapsed_ms / 1000
        );
        if let Some(w) = waiting {
            text.push_str(&format!("; the backup waits for {w}"));
        }
        self.fail(text)
    }

    /// Faults stop; everything must settle in bounded virtual time, twice: after the faulty
    /// history, and after a few fault-free actions. Nothing may be left behind.
    fn liveness(&mut self) -> Result<(), Failure> {
        self.qemu.borrow_mut().clear_faults();
        self.driver().link_mut().set_faults(LinkFaults::default());
        self.driver().effects_mut().fail_next_persist = false;
        if let Some(stall) = self.stall.clone() {
            self.driver().link_mut().set_stall(stall);
        }
        if !self.driver().link().is_open() {
            let running = self.qemu.borrow().is_running();
            if !running {
                self.restart_qemu()?;
            } else {
                self.driver().link_mut().reconnect();
            }
        }
        self.step += 1;
        let first = self.settle("faults stopped")?;
        // A few fault-free actions must work too.
        for _ in 0..20 {
            self.step += 1;
            self.stats.steps += 1;
            self.act(false)?;
            self.check()?;
        }
        self.step += 1;
        let second = self.settle("the fault-free actions")?;
        self.stats.settle_ms_max = first.max(second);
        let q = self.qemu.borrow();
        if let Some(j) = q.st.jobs.keys().next() {
            return Err(self.fail(format!("job {j} left behind")));
        }
        for (name, n) in &q.st.nodes {
            if !self.boot_nodes.contains(name) {
                return Err(self.fail(format!("node {name} left behind")));
            }
            for b in &n.bitmaps {
                if !b.persistent {
                    return Err(self.fail(format!(
                        "temporary bitmap {} left on {name}",
                        b.display_name()
                    )));
                }
            }
        }
        if let Some(e) = q.st.exports.keys().next() {
            return Err(self.fail(format!("export {e} left behind")));
        }
        if q.st.nbd.is_some() {
            return Err(self.fail("NBD server left running"));
        }
        Ok(())
    }
}

fn unreachable_driver() -> Driver<FaultyLink, StoreEffects> {
    // Never called: `World::driver` is only None inside `restart_engine`.
    let q = Rc::new(RefCell::new(Qemu::new(
        FileSystem::new(),
        Config::default(),
    )));
    let domain = Domain::new(
        lab_domain(),
        DomainConfig::default(),
        CheckpointTree::new(),
        None,
    );
    Driver::new(domain, FaultyLink::new(q.clone()), StoreEffects::new(q))
}

/// Reads a whole export as a pull client would: everything for a full backup; for an
/// incremental one only the dirty extents, laid over `base`.
pub fn read_export<R: ExportReader>(
    reader: &mut R,
    base: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    let size = reader.size();
    let mut out = vec![0u8; size as usize];
    if let Some(base) = base {
        let n = base.len().min(out.len());
        out[..n].copy_from_slice(&base[..n]);
    }
    for (offset, len) in export_ranges(reader, base.is_some())? {
        let (start, end) = (offset as usize, (offset + len) as usize);
        reader
            .read_at(offset, &mut out[start..end])
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The byte ranges a pull client reads, in order: all of it for a full backup, the dirty
/// extents of the export's bitmap for an incremental one.
fn export_ranges<R: ExportReader>(
    reader: &mut R,
    incremental: bool,
) -> Result<Vec<(u64, u64)>, String> {
    let size = reader.size();
    if !incremental {
        return Ok(vec![(0, size)]);
    }
    let ctx = reader
        .meta_contexts()
        .into_iter()
        .find(|c| c.starts_with("qemu:dirty-bitmap:"))
        .ok_or("an incremental export offers no dirty bitmap")?;
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < size {
        let extents = reader
            .block_status(&ctx, offset, size - offset)
            .map_err(|e| e.to_string())?;
        if extents.is_empty() {
            return Err(format!("no block status at {offset}"));
        }
        for e in extents {
            let length = e.length.min(size - offset);
            if e.flags & STATE_DIRTY != 0 {
                ranges.push((offset, length));
            }
            offset += length;
        }
    }
    Ok(ranges)
}

/// Reads an export as [`read_export`] does and compares what the client ends up with to
/// `expected`, one cluster at a time: the first offset that differs, if any. A cluster the
/// client does not read is `base`'s; a cluster read whole that an image stores whole is taken
/// by reference ([`ExportView::shared_cluster`], the same bytes `read_at` copies), so equal
/// clusters shared with the point in time compare without copying.
pub fn compare_export(
    reader: &mut ExportView<'_>,
    base: Option<&LogicalImage>,
    expected: &LogicalImage,
) -> Result<Option<u64>, String> {
    let size = reader.size();
    if size != expected.size() {
        return Ok(Some(size.min(expected.size())));
    }
    let cs = expected.cluster_size();
    let ranges = export_ranges(reader, base.is_some())?;
    let mut next = ranges.iter().copied().peekable();
    let mut buf = vec![0u8; cs as usize];
    for idx in 0..size.div_ceil(cs) {
        let (start, end) = (idx * cs, ((idx + 1) * cs).min(size));
        let n = (end - start) as usize;
        let want = expected.cluster(idx);
        // The cluster as the client has it: shared when it can be, else in `buf`.
        let mut have = base.and_then(|b| b.cluster_at(start, cs));
        let mut in_buf = false;
        while let Some((offset, len)) = next.peek().copied() {
            if offset >= end {
                break;
            }
            let (a, b) = (offset.max(start), (offset + len).min(end));
            let whole = a == start && b == end && n as u64 == cs;
            match whole.then(|| reader.shared_cluster(a, cs)).transpose() {
                Ok(Some(Some(shared))) => {
                    have = Some(shared.map_or(Cluster::Zero, |c| c));
                    in_buf = false;
                }
                Ok(_) => {
                    if !in_buf {
                        in_buf = true;
                        match &have {
                            Some(Cluster::Data(d)) => buf.copy_from_slice(d),
                            _ => buf.fill(0),
                        }
                    }
                    reader
                        .read_at(a, &mut buf[(a - start) as usize..(b - start) as usize])
                        .map_err(|e| e.to_string())?;
                }
                Err(e) => return Err(e.to_string()),
            }
            if offset + len > end {
                break;
            }
            next.next();
        }
        let at = if in_buf {
            first_difference(&buf[..n], want)
        } else if LogicalImage::clusters_equal(have.as_ref(), want) {
            None
        } else {
            match &have {
                Some(Cluster::Data(d)) => first_difference(&d[..n], want),
                _ => first_difference(&vec![0u8; n], want),
            }
        };
        if let Some(i) = at {
            return Ok(Some(start + i as u64));
        }
    }
    Ok(None)
}

/// Where `have` differs from the start of cluster `want` (absent: zeroes), if it does.
fn first_difference(have: &[u8], want: Option<&Cluster>) -> Option<usize> {
    match want {
        Some(Cluster::Data(d)) if have == &d[..have.len()] => None,
        Some(Cluster::Data(d)) => have.iter().zip(d.iter()).position(|(x, y)| x != y),
        _ => have.iter().position(|b| *b != 0),
    }
}

fn describe(r: &Request) -> String {
    match r {
        Request::CheckpointCreate { checkpoint, .. } => {
            format!("checkpoint-create {}", checkpoint.name)
        }
        Request::CheckpointDelete {
            name,
            scope,
            metadata_only,
        } => format!("checkpoint-delete {name} {scope:?} metadata_only={metadata_only}"),
        Request::CheckpointRedefine {
            checkpoint,
            validate,
        } => format!(
            "checkpoint-redefine {} parent={:?} validate={validate}",
            checkpoint.name, checkpoint.parent
        ),
        Request::CheckpointGetXml { name, size } => format!("checkpoint-xml {name} size={size}"),
        Request::BackupBegin {
            spec, checkpoint, ..
        } => format!(
            "backup-begin {:?} incremental={:?} checkpoint={:?}",
            spec.mode,
            spec.incremental,
            checkpoint.as_ref().map(|c| &c.name)
        ),
        Request::AbortJob => "abort".into(),
        Request::JobStats { completed, .. } => format!("job-stats completed={completed}"),
        other => format!("{other:?}"),
    }
}

fn describe_answer(a: &Result<Reply, Error>) -> String {
    match a {
        Ok(Reply::Done) => "ok".into(),
        Ok(Reply::Checkpoint(c)) => format!("ok checkpoint {}", c.name),
        Ok(Reply::CheckpointNames(n)) => format!("ok {n:?}"),
        Ok(Reply::Backup(p)) => format!("ok backup {:?}", p.mode),
        Ok(Reply::Stats(s)) => format!("ok stats {:?}", s.as_ref().map(|s| s.status)),
        Err(e) => format!("error [{}] {e}", e.category()),
    }
}

/// The copy rate of backup jobs in the lab.
pub const LAB_THROUGHPUT_BYTES_PER_S: u64 = 32 << 20;

/// A connected driver on the lab domain over a fresh simulated QEMU (32 MiB/s backup jobs),
/// with the QEMU it shares with its host.
pub fn lab_driver() -> (Driver<FaultyLink, StoreEffects>, SharedQemu) {
    lab_driver_wired(LabWiring::Blockdev)
}

/// The simulated host of the conformance scenarios.
#[derive(Debug)]
pub struct SimHost {
    /// The simulated QEMU.
    pub qemu: SharedQemu,
    /// How the lab's disks are attached (again after a crash).
    pub wiring: LabWiring,
}

impl crate::scenarios::Host for SimHost {
    fn guest_write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), String> {
        let mut q = self.qemu.borrow_mut();
        let now = q.now_ms();
        q.guest_write(now, self.wiring.device(disk), offset, data)
            .map_err(|e| e.to_string())
    }

    fn disk_content(&mut self, disk: &str) -> Result<Vec<u8>, String> {
        self.qemu
            .borrow()
            .guest_disk(self.wiring.device(disk))
            .map_err(|e| e.to_string())
    }

    fn restore(&mut self, path: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
        restore_image(self.qemu.borrow().fs(), path, base)
    }

    fn read_export(&mut self, name: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
        let q = self.qemu.borrow();
        let mut reader = q.export_reader(name).map_err(|e| e.to_string())?;
        read_export(&mut reader, base)
    }

    fn fail_writes_to(&mut self, node: &str) -> bool {
        self.qemu
            .borrow_mut()
            .set_fault(Fault::TargetIoError { node: node.into() });
        true
    }

    fn crash_qemu(&mut self) -> Result<(), String> {
        let mut q = self.qemu.borrow_mut();
        q.crash();
        q.restart();
        boot_lab_wired(&mut q, self.wiring).map_err(|e| e.to_string())
    }

    fn slow_jobs(&mut self, bytes_per_s: Option<u64>) -> Result<(), String> {
        // The simulator has one copy rate for every job; the lab's is restored when lifted.
        self.qemu.borrow_mut().config.throughput_bytes_per_s =
            bytes_per_s.unwrap_or(LAB_THROUGHPUT_BYTES_PER_S);
        Ok(())
    }
}
