//! The conformance scenarios against real qemu-system-x86_64 VMs: the lab domain's images
//! under a VM without a guest OS ([`vbackup_qemu::vm::Vm`]) in one of the [`DiskConfig`]s, a
//! [`Host`] over it, and the recording of traces.
//!
//! - Lab: the images of `vbackup_sim::world::lab_files` (made by `make_images`) in a fresh
//!   temporary directory; the VM opens them as the configuration says. The core's domain comes
//!   from attached-domain discovery on vbackup's own QMP monitor (what
//!   `vbackup define NAME --qmp SOCKET` does), so its node names are whatever the VM has:
//!   libvirt's for `-blockdev` disks, QEMU's generated `#blockNNN` for `-drive` ones.
//! - Guest writes go through the disk's virtio backend (HMP `qemu-io -d`) and are applied to a
//!   raw reference image per disk, which is what [`Host::disk_content`] reads: a qcow2 image a
//!   running QEMU holds open is no reference for its own content. When a slowed backup has just
//!   started, the host also writes to both disks (only to `vdb` in the mixed configuration,
//!   whose `vda` stays idle), so copy-before-write runs on the real VM.
//! - Pull backups use an NBD server the core starts on `nbd.sock` in the directory.
//! - A crash is SIGKILL to the VM's pid and the same command line again over the same images.
//!   With `-drive` disks the new process names its nodes anew, so the test restarts vbackup on
//!   a rediscovered domain (see `VmConformance::rediscover`).
//! - In [`DiskConfig::LiveSnapshot`] the VM starts with `vdb` as overlay over base and gets a
//!   third layer by a live snapshot before the core connects; the snapshot scenario takes one
//!   while checkpoints exist instead.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use vbackup_core::domain::{DomainConfig, DomainEvent, StoreOp};
use vbackup_core::driver::Driver;
use vbackup_core::model::{DomainDef, Layer};
use vbackup_qemu::discover::{self, discover_domain};
use vbackup_qemu::live::run_tool;
use vbackup_qemu::qmp_socket::QmpSocket;
use vbackup_qemu::vm::{DiskConfig, Vm, VmDisk, emulator_available};
use vbackup_sim::scenarios::{self, Host};

use crate::conformance_support::{
    HostLog, LiveEffects, LiveLink, Shaper, SharedBuf, connected_driver, disconnect, fill_byte,
    make_images, place_under, read_pull_export, record, relink, restore_image, text,
};

/// Where the traces of configuration `config` go.
pub fn traces_dir(config: DiskConfig) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/traces/qemu-system-10")
        .join(config.name())
}

/// The domain name the tests define.
pub const DOMAIN: &str = "lab";

/// Bytes the host writes to each disk when a slowed backup has started.
const WRITE_DURING_SLOW_JOB_BYTES: u64 = 100_000;

/// The host of the VM scenarios; see the module docs. Fields drop in order: the VM is stopped
/// by its pid before the directory goes.
#[derive(Debug)]
pub struct VmHost {
    /// The VM.
    pub vm: Vm,
    /// Its disk configuration.
    pub config: DiskConfig,
    root: PathBuf,
    shaper: Shaper,
    /// What the host did.
    pub log: HostLog,
    restores: u32,
    writes_during_jobs: u8,
    /// Removed when the host drops, after the VM has stopped.
    _dir: tempfile::TempDir,
}

impl VmHost {
    /// Logs how the VM holds its disks now (`{"boot": [...]}`), so a replay can build the same
    /// graph with the same (possibly generated) node names.
    pub fn note_boot(&mut self) -> Result<(), String> {
        let layout = self.vm.layout().map_err(text)?;
        let disks: Vec<_> = layout
            .iter()
            .map(|d| {
                let layers: Vec<_> = d
                    .layers
                    .iter()
                    .map(|l| json!({"format": l.format, "storage": l.storage, "path": l.path, "ro": l.read_only, "storage_ro": l.storage_read_only}))
                    .collect();
                json!({"target": d.target, "backend": d.backend, "qdev": d.qdev, "layers": layers})
            })
            .collect();
        self.log.note(json!({ "boot": disks }));
        Ok(())
    }

    /// Logs the domain vbackup was given (`{"domain": [...]}`: targets and layers, in order).
    pub fn note_domain(&mut self, def: &DomainDef) {
        let disks: Vec<_> = def
            .disks
            .iter()
            .map(|d| {
                let layers: Vec<_> = d
                    .layers
                    .iter()
                    .map(|l| json!({"node": l.node_name, "path": l.path}))
                    .collect();
                json!({"target": d.target, "layers": layers})
            })
            .collect();
        self.log.note(json!({ "domain": disks }));
    }

    fn reference(&self, disk: &str) -> PathBuf {
        self.root.join(format!("ref/{disk}.raw"))
    }

    /// The image directory.
    pub fn images(&self) -> PathBuf {
        self.root.join("img")
    }
}

impl Host for VmHost {
    fn guest_write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), String> {
        let fill = fill_byte(data)?;
        let len = u64::try_from(data.len()).map_err(text)?;
        self.vm.guest_write(disk, offset, len, fill).map_err(text)?;
        let reference = OpenOptions::new()
            .write(true)
            .open(self.reference(disk))
            .map_err(text)?;
        reference.write_all_at(data, offset).map_err(text)?;
        self.log.note(
            json!({"write": {"disk": disk, "offset": offset, "len": data.len(), "byte": fill}}),
        );
        Ok(())
    }

    fn disk_content(&mut self, disk: &str) -> Result<Vec<u8>, String> {
        fs::read(self.reference(disk)).map_err(text)
    }

    fn restore(&mut self, path: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
        self.restores += 1;
        restore_image(&self.root.join("restore"), self.restores, path, base)
    }

    fn read_export(&mut self, name: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String> {
        read_pull_export(&self.root.join("nbd.sock"), name, base)
    }

    fn fail_writes_to(&mut self, node: &str) -> bool {
        self.shaper.fail_writes_to(node, &mut self.log)
    }

    fn prepare_write_failure(&mut self) -> bool {
        self.shaper.prepare_write_failure()
    }

    fn slow_jobs(&mut self, bytes_per_s: Option<u64>) -> Result<(), String> {
        let was_slowed = self.shaper.slowed();
        self.shaper.slow_jobs(bytes_per_s, &mut self.log);
        // Scenarios lift the limit right after a slowed backup started: its jobs copy now, and
        // what the guest writes must not reach the backup.
        if was_slowed && bytes_per_s.is_none() {
            self.writes_during_jobs = self.writes_during_jobs.wrapping_add(1);
            let byte = 0xe0 | (self.writes_during_jobs & 0x0f);
            let data = vec![byte; usize::try_from(WRITE_DURING_SLOW_JOB_BYTES).map_err(text)?];
            // The mixed configuration keeps its `-blockdev` disk idle while the `-drive` one
            // is busy.
            if self.config != DiskConfig::Mixed {
                self.guest_write("vda", 4096, &data)?;
            }
            self.guest_write("vdb", 300_000, &data)?;
        }
        Ok(())
    }

    fn place(&mut self, lab_path: &str) -> String {
        place_under(&self.root, lab_path)
    }

    fn nbd_socket(&mut self) -> String {
        self.root.join("nbd.sock").display().to_string()
    }

    fn domain_config(&self) -> DomainConfig {
        DomainConfig::default()
    }

    fn crash_qemu(&mut self) -> Result<(), String> {
        self.vm.kill().map_err(text)?;
        self.log.note(json!({"crash": true}));
        self.vm.restart().map_err(text)?;
        self.note_boot()
    }
}

/// Whether the configuration names nodes anew when QEMU starts again.
pub fn generated_names(config: DiskConfig) -> bool {
    matches!(config, DiskConfig::Drive | DiskConfig::Mixed)
}

/// The lab domain discovered on the VM's QMP socket `socket`.
pub fn discover(socket: &Path) -> Result<DomainDef, String> {
    let mut qmp =
        QmpSocket::connect(socket, Instant::now() + Duration::from_secs(10)).map_err(text)?;
    let replies =
        discover::query(&mut qmp, Instant::now() + Duration::from_secs(10)).map_err(text)?;
    discover_domain(DOMAIN, &replies).map_err(text)
}

/// Layers of disk `target` of `def` as `node:path` text, top first.
pub fn layer_summary(def: &DomainDef, target: &str) -> Vec<String> {
    def.disks
        .iter()
        .find(|d| d.target == target)
        .map(|d| {
            d.layers
                .iter()
                .map(|l: &Layer| {
                    format!(
                        "{}:{}",
                        l.node_name.as_deref().unwrap_or("?"),
                        l.path.as_deref().unwrap_or("-")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One scenario's run on a VM.
pub struct VmConformance {
    /// The scenario's name (its trace file's).
    pub name: String,
    /// The core over vbackup's QMP monitor; taken by scenarios that restart vbackup.
    pub driver: Option<Driver<LiveLink, LiveEffects>>,
    /// The host, which owns the VM.
    pub host: VmHost,
    trace: SharedBuf,
    started: Instant,
}

fn copy_to_raw(image: &Path, raw: &Path) -> Result<(), String> {
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(image)
            .arg(raw),
    )
    .map(|_| ())
    .map_err(text)
}

impl VmConformance {
    /// Events of the run.
    pub fn events(effects: &LiveEffects) -> &[DomainEvent] {
        &effects.memory.events
    }

    /// Store operations of the run.
    pub fn persisted(effects: &LiveEffects) -> &[StoreOp] {
        &effects.memory.persisted
    }

    /// Starts the VM in `config` and connects the core to it; panics (the test fails) when
    /// qemu-system-x86_64 is missing. With `snapshot_first`, a live-snapshot configuration
    /// takes its snapshot before the core connects.
    pub fn start(name: &str, config: DiskConfig, snapshot_first: bool) -> VmConformance {
        assert!(
            emulator_available(),
            "qemu-system-x86_64 is required for the VM tests (see real-vm.md)"
        );
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("vbk-vm-")
            .tempdir()
            .expect("lab directory");
        let root = dir.path().to_path_buf();
        make_images(&root).expect("lab images");
        let img = root.join("img");
        fs::create_dir_all(root.join("ref")).expect("reference directory");
        copy_to_raw(&img.join("vda.qcow2"), &root.join("ref/vda.raw")).expect("reference");
        copy_to_raw(&img.join("vdb.ovl"), &root.join("ref/vdb.raw")).expect("reference");
        let disks = [
            VmDisk {
                target: "vda".into(),
                layers: vec![img.join("vda.qcow2")],
                attach: config.attach("vda"),
            },
            VmDisk {
                target: "vdb".into(),
                layers: vec![img.join("vdb.ovl"), img.join("vdb.qcow2")],
                attach: config.attach("vdb"),
            },
        ];
        let mut vm = Vm::start(&root, &disks).expect("qemu-system-x86_64 starts");
        if config == DiskConfig::LiveSnapshot && snapshot_first {
            vm.live_snapshot("vdb", &img.join("vdb.snap"))
                .expect("live snapshot");
        }
        let def = discover(&vm.qmp_socket()).expect("discovery");
        let shaper = Shaper::new(
            def.disks
                .iter()
                .flat_map(|d| d.layers.iter().filter_map(|l| l.path.clone()))
                .collect(),
        );
        let trace = SharedBuf::default();
        let mut host = VmHost {
            vm,
            config,
            root,
            shaper,
            log: HostLog::new(trace.clone()),
            restores: 0,
            writes_during_jobs: 0,
            _dir: dir,
        };
        host.note_boot().expect("the VM's graph");
        host.note_domain(&def);
        let qmp = QmpSocket::connect_unnegotiated(
            &host.vm.qmp_socket(),
            Instant::now() + Duration::from_secs(10),
        )
        .expect("QMP connection");
        let link = host.shaper.link(qmp, trace.clone());
        let driver = connected_driver(def, DomainConfig::default(), link);
        VmConformance {
            name: name.to_owned(),
            driver: Some(driver),
            host,
            trace,
            started,
        }
    }

    /// Runs scenario `name` in `config`: `scenario` gets the driver, the host and vbackup's QMP
    /// socket. Panics with the divergence.
    pub fn run(
        name: &str,
        config: DiskConfig,
        scenario: impl FnOnce(
            &mut Driver<LiveLink, LiveEffects>,
            &mut VmHost,
            &Path,
        ) -> Result<(), String>,
    ) {
        let mut run = VmConformance::start(name, config, true);
        let socket = run.host.vm.qmp_socket();
        let driver = run.driver.as_mut().expect("the run has its driver");
        let result = scenario(driver, &mut run.host, &socket);
        run.finish(result);
    }

    /// vbackup started again on the domain as discovery finds it now, with the checkpoints
    /// and journal of its store, over a new QMP session: what a user does after the VM's
    /// disks changed under vbackup (`vbackup define` again).
    pub fn rediscover(
        driver: Driver<LiveLink, LiveEffects>,
        host: &mut VmHost,
    ) -> Result<Driver<LiveLink, LiveEffects>, String> {
        let socket = &host.vm.qmp_socket();
        let (_, mut link, effects) = driver.into_parts();
        // vbackup's monitor serves one client: discovery connects once the old session is
        // closed, as a new `vbackup define` would.
        disconnect(&mut link);
        let def = discover(socket)?;
        host.note_domain(&def);
        relink(&mut link, socket)?;
        scenarios::restart_engine(
            def,
            DomainConfig::default(),
            link,
            effects,
            VmConformance::persisted,
        )
    }

    /// Fails the test with the scenario's divergence, or records the trace when asked to.
    pub fn finish(self, result: Result<(), String>) {
        if let Err(e) = result {
            panic!(
                "{} ({}): {e}\ncommand line: {}",
                self.name,
                self.host.config.name(),
                self.host.vm.command_line().join(" ")
            );
        }
        eprintln!(
            "{} ({}, {}): passed in {:?}",
            self.name,
            self.host.config.name(),
            self.host.vm.accel(),
            self.started.elapsed()
        );
        record(
            &traces_dir(self.host.config),
            &self.name,
            &self.trace.text(),
            &self.host.log.text(),
            &self.host.root,
        );
    }
}
