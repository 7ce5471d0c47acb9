//! Seeded random histories of the core's domain state machine driving the simulator: guest
//! writes, checkpoints created and deleted, push backups full and incremental, pull backups
//! read and aborted, QEMU crashes and restarts. The checker: every push backup that the core
//! reports complete restores, through the chain of backups it is incremental to, to exactly the
//! disk at its point in time; a pull export reads the disk at the backup's start; no disk is
//! in two block jobs. A failure names its seed and step; `SIM_SEED=<seed>` with the sweep
//! reproduces it. After the steps, faults stop and every job must end with nothing left behind
//! in QEMU (no job, no node, no temporary bitmap, no export).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use vbackup_core::Domain;
use vbackup_core::backup::{
    BackupDiskSpec, BackupMode, BackupSpec, BackupStore, NbdServer, NbdTransport, StoreKind,
};
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk, CheckpointTree, DeleteScope};
use vbackup_core::domain::{DomainConfig, Reply, Request};
use vbackup_core::driver::Driver;
use vbackup_core::error::Error;
use vbackup_core::export::ExportReader;
use vbackup_core::link::Link;
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};

use crate::image::{FileSystem, LogicalImage};
use crate::link::{SimEffects, SimLink};
use crate::qemu::{Config, Fault, Flavor, Qemu};

const MIB: u64 = 1 << 20;
/// (target, node, path, size)
const DISKS: [(&str, &str, &str, u64); 2] = [
    ("vda", "libvirt-2-format", "/img/vda.qcow2", 8 * MIB),
    ("vdb", "libvirt-1-format", "/img/vdb.qcow2", 4 * MIB),
];
/// Receive steps a request may take before it counts as unanswered.
const MAX_STEPS: usize = 10_000;

/// What one seed did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Push backups restored and compared.
    pub backups_verified: usize,
    /// Pull exports read and compared.
    pub pulls_verified: usize,
    /// Requests the core refused (a refusal is a valid outcome).
    pub refused: usize,
    /// QEMU crashes injected.
    pub crashes: usize,
    /// Guest writes.
    pub writes: usize,
    /// Job failures and command refusals injected.
    pub faults: usize,
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed {seed} step {step}: {message}")]
pub struct SweepFailure {
    /// The seed.
    pub seed: u64,
    /// The step at which it failed.
    pub step: usize,
    /// What went wrong.
    pub message: String,
}

type SimDriver = Driver<SimLink, SimEffects>;

struct Pending {
    /// Per disk: target path, parent backup path, disk content at the point in time.
    disks: Vec<(String, Option<String>, LogicalImage)>,
    checkpoint: String,
}

struct World {
    d: SimDriver,
    rng: ChaCha8Rng,
    counter: u64,
    pending: Option<Pending>,
    /// Checkpoints made together with a verified backup: checkpoint → per-disk backup paths.
    verified: BTreeMap<String, Vec<String>>,
    report: SeedReport,
    /// Inject QEMU refusals of single commands.
    refusals: bool,
}

fn boot(q: &mut Qemu) -> Result<(), String> {
    q.execute(q.now_ms(), &json!({"execute": "qmp_capabilities"}))
        .map_err(|e| e.desc)?;
    for (i, (_, node, path, _)) in DISKS.iter().enumerate() {
        let storage = node.replace("-format", "-storage");
        for c in [
            json!({"driver": "file", "node-name": storage, "filename": path}),
            json!({"driver": "qcow2", "node-name": node, "file": storage}),
        ] {
            let now = q.now_ms();
            q.execute(now, &json!({"execute": "blockdev-add", "arguments": c}))
                .map_err(|e| e.desc)?;
        }
        q.add_device(&format!("virtio-disk{i}"), node)
            .map_err(|e| e.desc)?;
    }
    q.new_monitor_connection();
    Ok(())
}

fn domain_def() -> DomainDef {
    DomainDef {
        name: "sweep".into(),
        uuid: None,
        disks: DISKS
            .iter()
            .map(|(target, node, path, _)| DiskDef {
                target: (*target).into(),
                device: DiskDevice::Disk,
                bus: Some("virtio".into()),
                readonly: false,
                transient: false,
                layers: vec![Layer {
                    storage: StorageType::File,
                    format: ImageFormat::Qcow2,
                    path: Some((*path).into()),
                    index: None,
                    node_name: Some((*node).into()),
                }],
            })
            .collect(),
    }
}

fn checkpoint(name: &str) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        description: None,
        parent: None,
        creation_time_s: 1_700_000_000,
        disks: DISKS
            .iter()
            .map(|(t, ..)| CheckpointDisk {
                target: (*t).into(),
                bitmap: Some(name.into()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

fn spec(mode: BackupMode, incremental: Option<&str>, n: u64) -> BackupSpec {
    let dir = if mode == BackupMode::Push {
        "/backups"
    } else {
        "/scratch"
    };
    BackupSpec {
        mode,
        incremental: incremental.map(Into::into),
        server: (mode == BackupMode::Pull).then(|| NbdServer {
            transport: NbdTransport::Unix {
                socket: "/run/nbd.sock".into(),
            },
            tls: None,
        }),
        disks: DISKS
            .iter()
            .map(|(t, ..)| BackupDiskSpec {
                target: (*t).into(),
                backup: true,
                incremental: incremental.map(Into::into),
                store: Some(BackupStore {
                    kind: StoreKind::File,
                    path: Some(format!("{dir}/b{n}-{t}.qcow2")),
                    format: None,
                }),
                export_name: None,
                export_bitmap: None,
            })
            .collect(),
    }
}

impl World {
    fn new(seed: u64, refusals: bool) -> Result<Self, String> {
        let mut fs = FileSystem::new();
        for (_, _, path, size) in DISKS {
            fs.create_qcow2(path, size, 65536, None);
        }
        let mut q = Qemu::new(
            fs,
            Config {
                flavor: Flavor::System,
                throughput_bytes_per_s: 32 * MIB,
                ..Config::default()
            },
        );
        boot(&mut q)?;
        let domain = Domain::new(
            domain_def(),
            DomainConfig::default(),
            CheckpointTree::new(),
            None,
        );
        let link = SimLink::new(q);
        let effects = link.effects();
        let mut w = World {
            d: Driver::new(domain, link, effects),
            rng: ChaCha8Rng::seed_from_u64(seed),
            counter: 0,
            pending: None,
            verified: BTreeMap::new(),
            report: SeedReport::default(),
            refusals,
        };
        w.reconnect()?;
        Ok(w)
    }

    fn reconnect(&mut self) -> Result<(), String> {
        for _ in 0..100 {
            if self.d.domain().view().connected {
                return Ok(());
            }
            self.d.step(None).map_err(|e| format!("connecting: {e}"))?;
        }
        Err("the domain did not connect".into())
    }

    fn call(&mut self, r: Request) -> Result<Result<Reply, Error>, String> {
        let id = self.d.submit(r).map_err(|e| e.to_string())?;
        self.d.wait(id, MAX_STEPS).map_err(|e| e.to_string())
    }

    /// The disk's content now, without copying data (the disk images have no backing file).
    fn disk_now(&self, i: usize) -> Result<LogicalImage, String> {
        self.d
            .link()
            .qemu()
            .fs()
            .logical_view(DISKS[i].2)
            .map_err(|e| e.to_string())
    }

    fn guest_write(&mut self) {
        let i = self.rng.random_range(0..DISKS.len());
        let size = DISKS[i].3;
        let len = self.rng.random_range(1..131_072u64);
        let off = self.rng.random_range(0..size - len);
        let byte: u8 = self.rng.random();
        let now = self.d.link().now().as_ms();
        let ok = self.d.link().qemu_mut().guest_write(
            now,
            &format!("virtio-disk{i}"),
            off,
            &vec![byte; len as usize],
        );
        if ok.is_ok() {
            self.report.writes += 1;
        }
    }

    fn push(&mut self) -> Result<(), String> {
        if self.d.domain().view().backup.is_some() {
            return Ok(());
        }
        self.counter += 1;
        let n = self.counter;
        let from: Option<String> = if self.rng.random_bool(0.6) {
            let keys: Vec<&String> = self.verified.keys().collect();
            (!keys.is_empty()).then(|| keys[self.rng.random_range(0..keys.len())].clone())
        } else {
            None
        };
        let name = format!("c{n}");
        let r = self.call(Request::BackupBegin {
            spec: spec(BackupMode::Push, from.as_deref(), n),
            checkpoint: Some(checkpoint(&name)),
            reuse_external: false,
        })?;
        match r {
            Ok(_) => {
                let parents = from.as_ref().and_then(|f| self.verified.get(f).cloned());
                let mut disks = Vec::new();
                for (i, (t, ..)) in DISKS.iter().enumerate() {
                    disks.push((
                        format!("/backups/b{n}-{t}.qcow2"),
                        parents.as_ref().map(|p| p[i].clone()),
                        self.disk_now(i)?,
                    ));
                }
                self.pending = Some(Pending {
                    disks,
                    checkpoint: name,
                });
            }
            Err(_) => self.report.refused += 1,
        }
        Ok(())
    }

    fn pull(&mut self) -> Result<(), String> {
        if self.d.domain().view().backup.is_some() {
            return Ok(());
        }
        self.counter += 1;
        let n = self.counter;
        let incremental = self.rng.random_bool(0.5);
        let from: Option<String> = self
            .d
            .domain()
            .view()
            .checkpoints
            .current()
            .map(str::to_string)
            .filter(|_| incremental);
        let r = self.call(Request::BackupBegin {
            spec: spec(BackupMode::Pull, from.as_deref(), n),
            checkpoint: None,
            reuse_external: false,
        })?;
        if r.is_err() {
            self.report.refused += 1;
            return Ok(());
        }
        let at_begin = self.disk_now(0)?;
        self.guest_write();
        self.guest_write();
        {
            let q = self.d.link().qemu();
            let mut v = q.export_reader("vda").map_err(|e| e.to_string())?;
            let (mut got, mut want) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut off = 0;
            while off < v.size() {
                let n = 65536.min(v.size() - off) as usize;
                v.read_at(off, &mut got[..n]).map_err(|e| e.to_string())?;
                at_begin.read_at(off, &mut want[..n]);
                if got[..n] != want[..n] {
                    return Err(format!(
                        "the pull export does not show the point in time at {off}"
                    ));
                }
                off += n as u64;
            }
        }
        self.report.pulls_verified += 1;
        let _ = self.call(Request::AbortJob)?;
        Ok(())
    }

    fn delete_checkpoint(&mut self) -> Result<(), String> {
        let names: Vec<String> = self
            .d
            .domain()
            .view()
            .checkpoints
            .iter()
            .map(|c| c.name.clone())
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let name = names[self.rng.random_range(0..names.len())].clone();
        match self.call(Request::CheckpointDelete {
            name: name.clone(),
            scope: DeleteScope::Single,
            metadata_only: false,
        })? {
            Ok(_) => {
                self.verified.remove(&name);
            }
            Err(_) => self.report.refused += 1,
        }
        Ok(())
    }

    fn crash(&mut self) -> Result<(), String> {
        self.report.crashes += 1;
        self.d.link_mut().crash();
        let _ = self.d.step(None);
        self.d.link_mut().restart();
        self.d.link().qemu_mut().clear_faults();
        boot(&mut self.d.link().qemu_mut())?;
        self.pending = None;
        // Checkpoints made since the last clean close are gone; older ones are inconsistent.
        self.verified.clear();
        self.reconnect()
    }

    /// Verifies a push backup the core reports finished.
    fn settle(&mut self) -> Result<(), String> {
        if self.pending.is_none() || self.d.domain().view().backup.is_some() {
            return Ok(());
        }
        let p = self.pending.take().expect("checked");
        let success = self.d.domain().view().completed.and_then(|s| s.success) == Some(true);
        if !success {
            return Ok(());
        }
        let mut paths = Vec::new();
        for (path, parent, expected) in p.disks {
            let mut q = self.d.link().qemu_mut();
            let fs = q.fs_mut();
            fs.rebase_unsafe(&path, parent.as_deref())
                .map_err(|e| e.to_string())?;
            let got = fs.logical_view(&path).map_err(|e| e.to_string())?;
            if got != expected {
                return Err(format!(
                    "{path} does not restore to the disk at its point in time"
                ));
            }
            paths.push(path);
        }
        self.report.backups_verified += 1;
        self.verified.insert(p.checkpoint, paths);
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        let t = self.d.link().now().plus_ms(self.rng.random_range(0..150));
        match self.d.step(Some(t)) {
            Ok(()) => {}
            Err(e) => return Err(format!("driver: {e}")),
        }
        self.settle()?;
        self.check_one_job_per_disk()?;
        // An injected fault is about the job it was aimed at; node names are reused later.
        if self.d.domain().view().backup.is_none() {
            self.d.link().qemu_mut().clear_faults();
        }
        match self.rng.random_range(0..100) {
            0..=54 => self.guest_write(),
            55..=62 => {
                self.counter += 1;
                let name = format!("c{}", self.counter);
                if self
                    .call(Request::CheckpointCreate {
                        checkpoint: checkpoint(&name),
                        quiesce: false,
                    })?
                    .is_err()
                {
                    self.report.refused += 1;
                }
            }
            63..=66 => self.delete_checkpoint()?,
            67..=84 => self.push()?,
            85..=89 => self.pull()?,
            90 => self.crash()?,
            91..=92 => self.fail_a_running_job(),
            93 if self.refusals => self.refuse_next_command(),
            _ => {}
        }
        Ok(())
    }

    /// Makes the target of a running push backup job fail its next write.
    fn fail_a_running_job(&mut self) {
        let mut q = self.d.link().qemu_mut();
        let targets: Vec<String> =
            q.st.jobs
                .values()
                .filter_map(|j| {
                    j.backup()
                        .filter(|b| b.sync != crate::job::SyncMode::None)
                        .map(|b| b.target.clone())
                })
                .collect();
        if let Some(node) = targets.first() {
            let fault = if self.rng.random_bool(0.5) {
                Fault::TargetIoError { node: node.clone() }
            } else {
                Fault::TargetNoSpace { node: node.clone() }
            };
            q.set_fault(fault);
            self.report.faults += 1;
        }
    }

    /// The next command of a random kind is refused by QEMU.
    fn refuse_next_command(&mut self) {
        const COMMANDS: [&str; 6] = [
            "transaction",
            "blockdev-add",
            "blockdev-create",
            "block-dirty-bitmap-remove",
            "blockdev-del",
            "query-named-block-nodes",
        ];
        let command = COMMANDS[self.rng.random_range(0..COMMANDS.len())].to_string();
        self.d.link().qemu_mut().set_fault(Fault::RefuseCommand {
            command,
            error: crate::errors::QmpError::generic("injected refusal"),
        });
        self.report.faults += 1;
    }

    /// No disk is the source of two block jobs at once.
    fn check_one_job_per_disk(&self) -> Result<(), String> {
        let q = self.d.link().qemu();
        let mut sources: Vec<&str> =
            q.st.jobs
                .values()
                .filter(|j| !matches!(j.status, crate::job::JobStatus::Concluded))
                .filter_map(|j| j.backup().map(|b| b.source.as_str()))
                .collect();
        sources.sort_unstable();
        match sources.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(format!("disk node {} is in two block jobs", w[0])),
            None => Ok(()),
        }
    }

    /// After every job ended: nothing the backups made is left in QEMU.
    fn check_nothing_left_behind(&mut self) -> Result<(), String> {
        let q = self.d.link().qemu();
        if let Some(j) = q.st.jobs.keys().next() {
            return Err(format!("job {j} is left in QEMU"));
        }
        let domain_nodes: Vec<String> = DISKS
            .iter()
            .flat_map(|(_, node, ..)| [node.to_string(), node.replace("-format", "-storage")])
            .collect();
        if let Some(n) = q.st.nodes.keys().find(|n| !domain_nodes.contains(n)) {
            return Err(format!("node {n} is left in QEMU"));
        }
        for (_, node, ..) in DISKS {
            if let Some(b) = q
                .node(node)
                .and_then(|n| n.bitmaps.iter().find(|b| !b.persistent))
            {
                return Err(format!(
                    "temporary bitmap {} is left on {node}",
                    b.display_name()
                ));
            }
        }
        if !q.st.exports.is_empty() || q.st.nbd.is_some() {
            return Err("an NBD export or server is left running".into());
        }
        Ok(())
    }
}

/// Runs one seed for `steps` steps, then lets every job finish and checks once more. The
/// faults are job I/O errors and QEMU crashes.
pub fn run_seed(seed: u64, steps: usize) -> Result<SeedReport, SweepFailure> {
    run_seed_with(seed, steps, false)
}

/// As [`run_seed`]; `refusals` also makes QEMU refuse single commands now and then (cleanup
/// commands included, which the liveness check then holds against the core).
pub fn run_seed_with(seed: u64, steps: usize, refusals: bool) -> Result<SeedReport, SweepFailure> {
    let fail = |step: usize, message: String| SweepFailure {
        seed,
        step,
        message,
    };
    let mut w = World::new(seed, refusals).map_err(|m| fail(0, m))?;
    for step in 0..steps {
        w.step().map_err(|m| fail(step, m))?;
    }
    for _ in 0..1000 {
        if w.d.domain().view().backup.is_none() {
            break;
        }
        let t = w.d.link().now().plus_ms(1000);
        w.d.step(Some(t))
            .map_err(|e| fail(steps, format!("driver: {e}")))?;
    }
    w.settle().map_err(|m| fail(steps, m))?;
    // Liveness: without faults, everything converges and nothing is left behind.
    w.d.link().qemu_mut().clear_faults();
    w.check_nothing_left_behind().map_err(|m| fail(steps, m))?;
    Ok(w.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_runs_and_verifies_backups() {
        let report = run_seed(7, 120).unwrap();
        assert!(report.writes > 0);
        assert!(
            report.backups_verified + report.pulls_verified > 0,
            "{report:?}"
        );
    }

    #[test]
    fn a_seed_gives_the_same_report_twice() {
        assert_eq!(run_seed(3, 80), run_seed(3, 80));
    }
}
