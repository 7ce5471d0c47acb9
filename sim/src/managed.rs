//! Seeded histories of managed backups: the core's catalogue of backups driven against the
//! simulated QEMU, with guest writes, checkpoints, push and pull backups, deletions (some
//! interrupted or refused midway) and restores, and checkers after every step.
//!
//! Contract: [`run_managed_history`] is a pure function of its [`ManagedConfig`]: ChaCha8
//! seeded from it chooses every action, time is virtual, nothing reads the OS. It plays the
//! part the `vbackup` command line plays on a real host:
//! - a push backup's images are written by the simulated QEMU; an incremental one is then
//!   given its parent backup's image as backing file without copying (an unsafe rebase);
//! - a pull backup is read through the simulated NBD export (the core's [`ExportReader`]):
//!   the allocated extents of a full one into a fresh qcow2, the dirty extents of an
//!   incremental one into a qcow2 overlay of the parent backup's image; some pulls are
//!   interrupted and discarded (images removed, their checkpoint deleted);
//! - records are kept as `<managedbackup>` documents in a simulated store; catalogue
//!   operations are carried out in their order, checkpoint deletions through the engine.
//!
//! Checkers, after every step:
//! - the catalogue reloaded from the stored documents equals the one in memory; its order
//!   (list, latest) is the order the backups were recorded in, although many share a second;
//! - every catalogued image exists and its backing chain is the catalogue's chain;
//! - the checkpoints of the domain are exactly those of the catalogued backups plus the
//!   history's own, each with its bitmap on every disk;
//! - every restore (of a backup, or of a chain `--until` another backup of it) reads through
//!   the chain, matches the recorded digest and equals the guest disks at that backup's point
//!   in time, byte for byte; a restore until a backup of another chain is refused;
//! - a deletion interrupted after any prefix of its operations, or refused by QEMU, leaves a
//!   catalogue that loads and whose every backup still restores; repeating it finishes it.
//!
//! A failure is a [`ManagedFailure`] whose `Display` is one line that reproduces it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use vbackup_core::backup::BackupMode;
use vbackup_core::catalogue::{
    BackupImage, BackupKind, Catalogue, CatalogueError, CatalogueOp, DeleteMode, Digest,
    ListFilter, ManagedBackup,
};
use vbackup_core::checkpoint::DeleteScope;
use vbackup_core::domain::{Reply, Request};
use vbackup_core::driver::Driver;
use vbackup_core::export::{ExportReader, STATE_DIRTY, STATE_ZERO};
use vbackup_core::link::Link;
use vbackup_core::model::ImageFormat;

use crate::bitmap_commands::bitmaps_of;
use crate::errors::QmpError;
use crate::image::FileSystem;
use crate::qemu::Fault;
use crate::world::link::{FaultyLink, SharedQemu};
use crate::world::{CLUSTER, StoreEffects, lab_backup, lab_checkpoint, lab_driver};

/// The lab domain's name (see [`crate::world::lab_domain`]).
const DOMAIN: &str = "sim1";
/// The lab domain's disks and their top format nodes.
const DISKS: [(&str, &str); 2] = [("vda", "libvirt-1-format"), ("vdb", "libvirt-3-format")];
/// Receive steps a single request may take.
const STEPS: usize = 100_000;
/// Longest chain the history builds on (the simulated file system reads 64 levels at most).
const CHAIN_CAP: usize = 12;
/// Bound on the waits for a job to end.
const WAIT_ROUNDS: usize = 10_000;

/// What a managed history does.
#[derive(Debug, Clone)]
pub struct ManagedConfig {
    /// The seed.
    pub seed: u64,
    /// Number of random actions.
    pub steps: usize,
}

impl ManagedConfig {
    /// The default history of `seed`.
    pub fn seed(seed: u64) -> Self {
        Self { seed, steps: 40 }
    }
}

/// What a history did, for the test's summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagedStats {
    /// Guest writes.
    pub guest_writes: u64,
    /// Backups recorded, push.
    pub push_backups: u64,
    /// Backups recorded, pull.
    pub pull_backups: u64,
    /// Of those, incremental ones.
    pub incrementals: u64,
    /// Pull backups interrupted and discarded.
    pub discarded_pulls: u64,
    /// Restores verified (including `--until`).
    pub restores: u64,
    /// Restores until a backup of another chain, refused.
    pub refused_restores: u64,
    /// Deletions carried out (each finished, possibly after a retry).
    pub deletions: u64,
    /// Deletions interrupted or refused midway, then repeated.
    pub interrupted_deletions: u64,
    /// Checkpoints deleted because their backup went.
    pub released_checkpoints: u64,
    /// Incrementals made full backups of their own (some interrupted, then repeated).
    pub consolidations: u64,
}

impl ManagedStats {
    /// Adds another history's counts.
    pub fn add(&mut self, o: &ManagedStats) {
        self.guest_writes += o.guest_writes;
        self.push_backups += o.push_backups;
        self.pull_backups += o.pull_backups;
        self.incrementals += o.incrementals;
        self.discarded_pulls += o.discarded_pulls;
        self.restores += o.restores;
        self.refused_restores += o.refused_restores;
        self.deletions += o.deletions;
        self.interrupted_deletions += o.interrupted_deletions;
        self.released_checkpoints += o.released_checkpoints;
        self.consolidations += o.consolidations;
    }
}

/// A broken invariant, with what reproduces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedFailure {
    /// The seed.
    pub seed: u64,
    /// The step it broke at.
    pub step: usize,
    /// What broke.
    pub what: String,
}

impl fmt::Display for ManagedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "managed history seed {} step {}: {} (reproduce: SIM_MANAGED_SEED={} cargo test -p vbackup-sim --release --test managed_histories)",
            self.seed, self.step, self.what, self.seed
        )
    }
}

/// Runs one history.
pub fn run_managed_history(config: &ManagedConfig) -> Result<ManagedStats, ManagedFailure> {
    let mut h = History::new(config.seed);
    h.run(config.steps)?;
    Ok(h.stats)
}

/// The guest disks at a backup's point in time, by disk target.
type Content = BTreeMap<String, Vec<u8>>;

struct History {
    seed: u64,
    step: usize,
    rng: ChaCha8Rng,
    driver: Driver<FaultyLink, StoreEffects>,
    qemu: SharedQemu,
    catalogue: Catalogue,
    /// The stored `<managedbackup>` documents, by uuid.
    store: BTreeMap<String, String>,
    /// Whether the store changed since the checker last reloaded it.
    store_changed: bool,
    /// Whether a request went to the engine since the checker last read the bitmaps (only
    /// requests change them).
    requested: bool,
    /// Each catalogued backup's point in time.
    points: BTreeMap<String, Content>,
    /// The digests of each catalogued backup's disks when it was recorded (the hash of its
    /// point in time, checked then).
    digests: BTreeMap<String, BTreeMap<String, Digest>>,
    /// Catalogued backups in the order they were recorded.
    recorded: Vec<String>,
    /// Checkpoints the history created outside backups.
    own_checkpoints: BTreeSet<String>,
    next_name: u64,
    stats: ManagedStats,
}

impl History {
    fn new(seed: u64) -> Self {
        let (driver, qemu) = lab_driver();
        Self {
            seed,
            step: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            driver,
            qemu,
            catalogue: Catalogue::new(DOMAIN),
            store: BTreeMap::new(),
            store_changed: false,
            requested: false,
            points: BTreeMap::new(),
            digests: BTreeMap::new(),
            recorded: Vec::new(),
            own_checkpoints: BTreeSet::new(),
            next_name: 0,
            stats: ManagedStats::default(),
        }
    }

    fn fail(&self, what: impl Into<String>) -> ManagedFailure {
        ManagedFailure {
            seed: self.seed,
            step: self.step,
            what: what.into(),
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rng.next_u64() % n }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let i = self.below(items.len() as u64) as usize;
        Some(items[i].clone())
    }

    fn fresh(&mut self) -> u64 {
        self.next_name += 1;
        self.next_name
    }

    /// A random canonical uuid, so the catalogue's order cannot lean on uuids.
    fn fresh_uuid(&mut self) -> String {
        let a = self.rng.next_u64();
        let b = self.rng.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    fn now_ms(&self) -> u64 {
        self.driver.link().now().as_ms()
    }

    fn call(&mut self, request: Request) -> Result<Result<Reply, String>, ManagedFailure> {
        self.requested = true;
        match self.driver.call(request, STEPS) {
            Ok(answer) => Ok(answer.map_err(|e| e.to_string())),
            Err(e) => Err(self.fail(format!("the driver stopped: {e}"))),
        }
    }

    /// Lets `ms` of virtual time pass (jobs progress).
    fn pass_time(&mut self, ms: u64) -> Result<(), ManagedFailure> {
        let until = self.driver.link().now().plus_ms(ms);
        for _ in 0..WAIT_ROUNDS {
            if self.driver.link().now() >= until {
                return Ok(());
            }
            if let Err(e) = self.driver.step(Some(until)) {
                return Err(self.fail(format!("the driver stopped: {e}")));
            }
        }
        Err(self.fail("virtual time does not move"))
    }

    fn run(&mut self, steps: usize) -> Result<(), ManagedFailure> {
        // The session opens with QEMU's greeting.
        match self.driver.run_until(|d| d.view().connected, STEPS) {
            Ok(true) => {}
            other => return Err(self.fail(format!("the session does not open: {other:?}"))),
        }
        for _ in 0..steps {
            self.step += 1;
            match self.below(100) {
                0..=29 => self.guest_write(),
                30..=54 => self.backup()?,
                55..=61 => self.own_checkpoint_create()?,
                62..=65 => self.own_checkpoint_delete()?,
                66..=79 => self.restore()?,
                80..=93 => self.delete()?,
                94..=97 => self.consolidate()?,
                _ => {}
            }
            let dt = 1 + self.below(300);
            self.pass_time(dt)?;
            self.check()?;
        }
        // Every backup left restores to its point in time.
        self.step += 1;
        let all: Vec<String> = self.recorded.clone();
        for uuid in all {
            self.verify_restore(&uuid, None, &[])?;
        }
        Ok(())
    }

    fn guest_write(&mut self) {
        let disk = if self.chance(50) { "vda" } else { "vdb" };
        let size = crate::world::DISK_BYTES;
        let offset = self.below(size - 1);
        let len = 1 + self.below((size - offset).min(3 * CLUSTER));
        let byte = (self.below(255) + 1) as u8;
        let now = self.now_ms();
        let written =
            self.qemu
                .borrow_mut()
                .guest_write(now, disk, offset, &vec![byte; len as usize]);
        if written.is_ok() {
            self.stats.guest_writes += 1;
        }
    }

    fn own_checkpoint_create(&mut self) -> Result<(), ManagedFailure> {
        let name = format!("own{}", self.fresh());
        let answer = self.call(Request::CheckpointCreate {
            checkpoint: lab_checkpoint(&name),
            quiesce: false,
        })?;
        answer.map_err(|e| self.fail(format!("checkpoint-create {name}: {e}")))?;
        self.own_checkpoints.insert(name);
        Ok(())
    }

    fn own_checkpoint_delete(&mut self) -> Result<(), ManagedFailure> {
        let names: Vec<String> = self.own_checkpoints.iter().cloned().collect();
        let Some(name) = self.pick(&names) else {
            return Ok(());
        };
        // Alone: its children (backups' checkpoints among them) are re-parented, not deleted.
        let answer = self.call(Request::CheckpointDelete {
            name: name.clone(),
            scope: DeleteScope::Single,
            metadata_only: false,
        })?;
        answer.map_err(|e| self.fail(format!("checkpoint-delete {name}: {e}")))?;
        self.own_checkpoints.remove(&name);
        Ok(())
    }

    // ----- creating backups -----

    fn backup(&mut self) -> Result<(), ManagedFailure> {
        let pull = self.chance(50);
        let candidates: Vec<String> = self
            .catalogue
            .list(ListFilter::All)
            .iter()
            .filter(|b| {
                self.catalogue
                    .chain(&b.uuid)
                    .is_ok_and(|c| c.len() < CHAIN_CAP)
            })
            .map(|b| b.uuid.clone())
            .collect();
        let parent = if self.chance(70) {
            self.pick(&candidates)
                .and_then(|u| self.catalogue.get(&u).cloned())
        } else {
            None
        };
        let uuid = self.fresh_uuid();
        let checkpoint = format!("b{}", self.fresh());
        let incremental = parent.as_ref().and_then(|p| p.checkpoint.clone());
        let mode = if pull {
            BackupMode::Pull
        } else {
            BackupMode::Push
        };
        // Push targets are the backup's images; pull needs scratch images of its own.
        let dir = if pull {
            format!("/scratch/{uuid}")
        } else {
            format!("/managed/{uuid}")
        };
        let spec = lab_backup(mode, incremental.as_deref(), &dir);
        self.driver.link_mut().take_points();
        let begun_ms = self.now_ms();
        let answer = self.call(Request::BackupBegin {
            spec,
            checkpoint: Some(lab_checkpoint(&checkpoint)),
            reuse_external: false,
        })?;
        answer.map_err(|e| {
            self.fail(format!(
                "backup-begin {mode:?} incremental from {incremental:?}: {e}"
            ))
        })?;
        let point = self
            .driver
            .link_mut()
            .take_points()
            .into_iter()
            .rev()
            .find(|p| !p.jobs.is_empty())
            // Points in time hold shared clusters; this checker compares bytes.
            .map(|p| {
                p.disks
                    .into_iter()
                    .map(|(disk, content)| (disk, content.to_bytes()))
                    .collect::<BTreeMap<_, _>>()
            })
            .ok_or_else(|| self.fail("a backup began without a transaction"))?;
        let images = if pull {
            match self.pull(&uuid, &checkpoint, parent.as_ref())? {
                Some(images) => images,
                None => return Ok(()),
            }
        } else {
            self.push(&dir, parent.as_ref())?
        };
        let mut disks = Vec::new();
        for (disk, path) in images {
            let (image, content) = self.describe(&disk, &path)?;
            // What the backup holds is the point in time, whatever its chain.
            if point.get(&disk).is_none_or(|want| *want != content) {
                return Err(self.fail(format!(
                    "{mode:?} backup {uuid} disk {disk} (incremental from {incremental:?}) does not hold its point in time"
                )));
            }
            disks.push(image);
        }
        let backup = ManagedBackup {
            uuid: uuid.clone(),
            domain: DOMAIN.into(),
            parent: parent.as_ref().map(|p| p.uuid.clone()),
            checkpoint: Some(checkpoint),
            creation_time: begun_ms / 1000,
            sequence: Some(self.catalogue.next_sequence()),
            description: None,
            kind: if parent.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            disks,
        };
        let digests = backup
            .disks
            .iter()
            .map(|d| (d.disk.clone(), d.digest.clone()))
            .collect();
        let ops = self
            .catalogue
            .insert(backup)
            .map_err(|e| self.fail(format!("recording backup {uuid}: {e}")))?;
        self.apply(&ops, ops.len())
            .map_err(|e| self.fail(format!("recording backup {uuid}: {e}")))?;
        self.points.insert(uuid.clone(), point);
        self.digests.insert(uuid.clone(), digests);
        self.recorded.push(uuid);
        if pull {
            self.stats.pull_backups += 1;
        } else {
            self.stats.push_backups += 1;
        }
        if parent.is_some() {
            self.stats.incrementals += 1;
        }
        Ok(())
    }

    /// Waits for a push job to end, with guest writes meanwhile, and makes each incremental
    /// image an overlay of its parent's.
    fn push(
        &mut self,
        dir: &str,
        parent: Option<&ManagedBackup>,
    ) -> Result<Vec<(String, String)>, ManagedFailure> {
        self.wait_for_job_end(true)?;
        let stats = self.call(Request::JobStats {
            completed: true,
            keep_completed: false,
        })?;
        match stats {
            Ok(Reply::Stats(Some(st))) if st.success == Some(true) => {}
            other => return Err(self.fail(format!("a push backup did not succeed: {other:?}"))),
        }
        let mut images = Vec::new();
        for (disk, _) in DISKS {
            let path = format!("{dir}/{disk}.qcow2");
            if let Some(parent) = parent {
                let backing = parent
                    .image(disk)
                    .map(|i| i.path.clone())
                    .ok_or_else(|| self.fail(format!("parent has no image of {disk}")))?;
                self.qemu
                    .borrow_mut()
                    .fs_mut()
                    .rebase_unsafe(&path, Some(&backing))
                    .map_err(|e| self.fail(format!("rebasing {path}: {e}")))?;
            }
            images.push((disk.to_owned(), path));
        }
        Ok(images)
    }

    /// Reads every export of a running pull backup into images, then ends the job. `None`
    /// when the history interrupts it: then it is discarded as the command line does.
    fn pull(
        &mut self,
        uuid: &str,
        checkpoint: &str,
        parent: Option<&ManagedBackup>,
    ) -> Result<Option<Vec<(String, String)>>, ManagedFailure> {
        let interrupt_after = if self.chance(10) {
            Some(self.below(DISKS.len() as u64) as usize)
        } else {
            None
        };
        let mut images = Vec::new();
        for (i, (disk, _)) in DISKS.iter().enumerate() {
            // The guest goes on writing while the client reads.
            for _ in 0..self.below(3) {
                self.guest_write();
            }
            if interrupt_after == Some(i) {
                break;
            }
            let path = format!("/managed/{uuid}/{disk}.qcow2");
            let base = parent
                .map(|p| {
                    p.image(disk)
                        .map(|i| i.path.clone())
                        .ok_or_else(|| self.fail(format!("parent has no image of {disk}")))
                })
                .transpose()?;
            self.pull_disk(disk, &path, base.as_deref())?;
            images.push(((*disk).to_owned(), path));
        }
        let ended = self.call(Request::AbortJob)?;
        ended.map_err(|e| self.fail(format!("ending a pull backup: {e}")))?;
        self.wait_for_job_end(false)?;
        if interrupt_after.is_none() {
            return Ok(Some(images));
        }
        // Discarded: images removed, its checkpoint deleted; the parent's stays.
        for (_, path) in &images {
            self.qemu.borrow_mut().fs_mut().remove(path);
        }
        let answer = self.call(Request::CheckpointDelete {
            name: checkpoint.to_owned(),
            scope: DeleteScope::Single,
            metadata_only: false,
        })?;
        answer.map_err(|e| self.fail(format!("discarding pull {uuid}: {e}")))?;
        self.stats.discarded_pulls += 1;
        Ok(None)
    }

    /// Copies one export into `path`: a fresh qcow2 (the allocated extents) or an overlay of
    /// `base` (the dirty extents, zero runs included so they hide the parent's data).
    fn pull_disk(
        &mut self,
        disk: &str,
        path: &str,
        base: Option<&str>,
    ) -> Result<(), ManagedFailure> {
        let read = {
            let q = self.qemu.borrow();
            match q.export_reader(disk) {
                Ok(mut reader) => read_wanted(&mut reader, base.is_some()),
                Err(e) => Err(e.to_string()),
            }
        };
        let (size, pieces) =
            read.map_err(|e| self.fail(format!("reading the export of {disk}: {e}")))?;
        let mut q = self.qemu.borrow_mut();
        let fs = q.fs_mut();
        fs.create_qcow2(path, size, CLUSTER, base);
        for (offset, data) in pieces {
            fs.write_image(path, offset, &data)
                .map_err(|e| self.fail(format!("writing {path}: {e}")))?;
        }
        Ok(())
    }

    fn wait_for_job_end(&mut self, writes: bool) -> Result<(), ManagedFailure> {
        for _ in 0..WAIT_ROUNDS {
            if self.driver.domain().view().backup.is_none() {
                return Ok(());
            }
            if writes && self.chance(30) {
                self.guest_write();
            }
            let dt = 1 + self.below(10);
            self.pass_time(dt)?;
        }
        Err(self.fail("a backup job never ended"))
    }

    /// The catalogue's description of an image, and its content.
    fn describe(&self, disk: &str, path: &str) -> Result<(BackupImage, Vec<u8>), ManagedFailure> {
        let q = self.qemu.borrow();
        let fs = q.fs();
        let content = read_disk(fs, path).map_err(|e| self.fail(e))?;
        let allocated = fs
            .allocated_ranges(path)
            .map_err(|e| self.fail(format!("{path}: {e}")))?
            .iter()
            .map(|(_, len)| len)
            .sum();
        let image = BackupImage {
            disk: disk.to_owned(),
            path: path.to_owned(),
            format: ImageFormat::Qcow2,
            virtual_size_bytes: content.len() as u64,
            allocated_size_bytes: allocated,
            digest: digest(&content),
        };
        Ok((image, content))
    }

    // ----- carrying out catalogue operations -----

    /// Carries out the first `count` operations, in order; stops at the first failure.
    fn apply(&mut self, ops: &[CatalogueOp], count: usize) -> Result<(), String> {
        let ops = &ops[..count.min(ops.len())];
        let mut i = 0;
        while let Some(op) = ops.get(i) {
            i += 1;
            match op {
                CatalogueOp::PutBackup(b) => {
                    self.store.insert(b.uuid.clone(), b.format());
                    self.store_changed = true;
                }
                CatalogueOp::DeleteBackup { uuid } => {
                    self.store.remove(uuid);
                    self.store_changed = true;
                }
                CatalogueOp::RemoveImage { path } => {
                    self.qemu.borrow_mut().fs_mut().remove(path);
                }
                CatalogueOp::RebaseImage { path, backing } => {
                    rebase_safe(self.qemu.borrow_mut().fs_mut(), path, backing.as_deref())?;
                }
                CatalogueOp::DeleteCheckpoint { name } => {
                    // Consecutive checkpoint deletions go as one request, as the CLI sends
                    // them: one transaction removes the bitmaps of all of them.
                    let mut names = vec![name.clone()];
                    while let Some(CatalogueOp::DeleteCheckpoint { name }) = ops.get(i) {
                        names.push(name.clone());
                        i += 1;
                    }
                    let tree = self.driver.domain().view().checkpoints;
                    names.retain(|n| tree.get(n).is_some());
                    if !names.is_empty() {
                        self.requested = true;
                        let released = names.len() as u64;
                        let list = names.join(", ");
                        let answer = self
                            .driver
                            .call(Request::CheckpointDeleteEach { names }, STEPS)
                            .map_err(|e| e.to_string())?;
                        answer.map_err(|e| format!("checkpoint-delete {list}: {e}"))?;
                        self.stats.released_checkpoints += released;
                    }
                }
                CatalogueOp::SetDefaultTarget(_) => {}
            }
        }
        Ok(())
    }

    /// The catalogue as the store holds it.
    fn reload(&self) -> Result<Catalogue, String> {
        let mut records = Vec::new();
        for (uuid, text) in &self.store {
            records.push(ManagedBackup::parse(text).map_err(|e| format!("record {uuid}: {e}"))?);
        }
        Catalogue::load(DOMAIN, records, None).map_err(|e| e.to_string())
    }

    // ----- deleting -----

    fn delete(&mut self) -> Result<(), ManagedFailure> {
        let uuids: Vec<String> = self.recorded.clone();
        let Some(target) = self.pick(&uuids) else {
            return Ok(());
        };
        let mode = match self.below(100) {
            0..=39 => Some(DeleteMode::Alone),
            40..=69 => Some(DeleteMode::WithChildren),
            70..=84 => Some(DeleteMode::RebaseChildren),
            _ => None,
        };
        let mut planned = self.catalogue.clone();
        let ops = match mode {
            Some(m) => match planned.delete(&target, m) {
                Ok(ops) => ops,
                Err(CatalogueError::HasChildren { children, .. }) => {
                    let kids = self
                        .catalogue
                        .children(&target)
                        .map_err(|e| self.fail(e.to_string()))?;
                    if kids.is_empty() || kids.len() != children.len() {
                        return Err(self.fail(format!(
                            "deleting {target} alone was refused for children {children:?}"
                        )));
                    }
                    return Ok(());
                }
                Err(e) => return Err(self.fail(format!("deleting {target}: {e}"))),
            },
            None => planned.delete_all(),
        };
        // An interruption after any prefix of the operations, or QEMU refusing to delete a
        // checkpoint.
        let cut = if self.chance(20) {
            self.below(ops.len() as u64) as usize
        } else {
            ops.len()
        };
        let refuse = self.chance(15);
        if refuse {
            self.qemu.borrow_mut().set_fault(Fault::RefuseCommand {
                command: "transaction".into(),
                error: QmpError::generic("simulated refusal of transaction"),
            });
        }
        let first = self.apply(&ops, cut);
        self.qemu.borrow_mut().clear_faults();
        let finished = cut == ops.len() && first.is_ok();
        if finished {
            self.forget_deleted(&ops);
            self.catalogue = planned;
        } else {
            // The command line starts again from the store.
            self.catalogue = self
                .reload()
                .map_err(|e| self.fail(format!("after an interrupted deletion: {e}")))?;
            self.forget_missing();
            self.stats.interrupted_deletions += 1;
            // Every backup still restores. A deletion that rebases children is the exception
            // until it is repeated: a child whose image was rebased but whose record was not
            // yet rewritten has the content it should, under a chain its record does not name
            // yet, and a restore refuses such a mismatch rather than guess.
            if mode != Some(DeleteMode::RebaseChildren) {
                for uuid in self.recorded.clone() {
                    self.verify_restore(&uuid, None, &[])?;
                }
            }
            let again = match mode {
                Some(m) if self.catalogue.get(&target).is_some() => {
                    self.catalogue.delete(&target, m)
                }
                Some(_) => Ok(Vec::new()),
                None => Ok(self.catalogue.delete_all()),
            }
            .map_err(|e| self.fail(format!("repeating the deletion of {target}: {e}")))?;
            self.apply(&again, again.len())
                .map_err(|e| self.fail(format!("repeating the deletion of {target}: {e}")))?;
            self.forget_deleted(&again);
        }
        // Finished deletions leave no image behind.
        for op in &ops {
            if let CatalogueOp::RemoveImage { path } = op
                && finished
                && self.qemu.borrow().fs().exists(path)
            {
                return Err(self.fail(format!("image {path} of a deleted backup is left")));
            }
        }
        self.stats.deletions += 1;
        Ok(())
    }

    // ----- consolidating -----

    /// Makes a recorded backup a full of its own, sometimes interrupted after any prefix of
    /// its operations (then repeated from the store, as the command line would); every backup
    /// must still restore to its point in time.
    fn consolidate(&mut self) -> Result<(), ManagedFailure> {
        let uuids: Vec<String> = self.recorded.clone();
        let Some(target) = self.pick(&uuids) else {
            return Ok(());
        };
        let mut planned = self.catalogue.clone();
        let ops = planned
            .consolidate(&target)
            .map_err(|e| self.fail(format!("consolidating {target}: {e}")))?;
        let cut = if self.chance(20) {
            self.below(ops.len().max(1) as u64) as usize
        } else {
            ops.len()
        };
        self.apply(&ops, cut)
            .map_err(|e| self.fail(format!("consolidating {target}: {e}")))?;
        if cut == ops.len() {
            self.catalogue = planned;
        } else {
            self.catalogue = self
                .reload()
                .map_err(|e| self.fail(format!("after an interrupted consolidation: {e}")))?;
            let again = self
                .catalogue
                .consolidate(&target)
                .map_err(|e| self.fail(format!("repeating the consolidation of {target}: {e}")))?;
            self.apply(&again, again.len())
                .map_err(|e| self.fail(format!("repeating the consolidation of {target}: {e}")))?;
        }
        if self
            .catalogue
            .get(&target)
            .is_some_and(|b| b.parent.is_some())
        {
            return Err(self.fail(format!("{target} still has a parent after consolidation")));
        }
        for uuid in self.recorded.clone() {
            self.verify_restore(&uuid, None, &[])?;
        }
        self.stats.consolidations += 1;
        Ok(())
    }

    fn forget_deleted(&mut self, ops: &[CatalogueOp]) {
        for op in ops {
            if let CatalogueOp::DeleteBackup { uuid } = op {
                self.points.remove(uuid);
                self.digests.remove(uuid);
                self.recorded.retain(|u| u != uuid);
            }
        }
    }

    fn forget_missing(&mut self) {
        let catalogue = &self.catalogue;
        self.recorded.retain(|u| catalogue.get(u).is_some());
        self.points.retain(|u, _| catalogue.get(u).is_some());
        self.digests.retain(|u, _| catalogue.get(u).is_some());
    }

    // ----- restoring -----

    fn restore(&mut self) -> Result<(), ManagedFailure> {
        let uuids = self.recorded.clone();
        let Some(uuid) = self.pick(&uuids) else {
            return Ok(());
        };
        let disks: Vec<&str> = match self.below(4) {
            0 => vec!["vda"],
            1 => vec!["vdb"],
            _ => Vec::new(),
        };
        let until = if self.chance(50) {
            self.pick(&uuids)
        } else {
            None
        };
        self.verify_restore(&uuid, until.as_deref(), &disks)
    }

    /// Restores `uuid` (until `until`) as the command line does and compares with the point
    /// in time; a backup of another chain must be refused.
    fn verify_restore(
        &mut self,
        uuid: &str,
        until: Option<&str>,
        disks: &[&str],
    ) -> Result<(), ManagedFailure> {
        let plan = match until {
            Some(u) => self.catalogue.plan_restore_until(uuid, u, disks),
            None => self.catalogue.plan_restore(uuid, disks),
        };
        let related = until.is_none_or(|u| {
            let on = |a: &str, b: &str| {
                self.catalogue
                    .chain(a)
                    .is_ok_and(|c| c.iter().any(|x| x.uuid == b))
            };
            on(uuid, u) || on(u, uuid)
        });
        let plan = match plan {
            Ok(plan) if related => plan,
            Err(CatalogueError::NotInChain { .. }) if !related => {
                self.stats.refused_restores += 1;
                return Ok(());
            }
            other => {
                return Err(self.fail(format!(
                    "restore of {uuid} until {until:?}: {other:?} (same chain: {related})"
                )));
            }
        };
        let point_of = until.unwrap_or(uuid);
        if plan.backup != point_of {
            return Err(self.fail(format!(
                "restore of {uuid} until {until:?} planned {}",
                plan.backup
            )));
        }
        let expected = self
            .points
            .get(point_of)
            .cloned()
            .ok_or_else(|| self.fail(format!("no point in time of {point_of}")))?;
        for d in &plan.disks {
            let top = d
                .top()
                .ok_or_else(|| self.fail("a restore plan without image"))?;
            let chain: Vec<&str> = d.images.iter().map(|i| i.path.as_str()).collect();
            let q = self.qemu.borrow();
            let fs = q.fs();
            let found = backing_chain(fs, &top.path).map_err(|e| self.fail(e))?;
            if found != chain {
                return Err(self.fail(format!(
                    "disk {} of {point_of}: the chain on disk is {found:?}, the catalogue's {chain:?}",
                    d.disk
                )));
            }
            // The digest to check is the one recorded, which was the hash of the point in
            // time; the content is then compared with the point in time itself, which implies
            // the digest check without hashing again.
            if self.digests.get(point_of).and_then(|m| m.get(&d.disk)) != Some(&d.digest) {
                return Err(self.fail(format!(
                    "disk {} of {point_of}: the plan checks a digest other than the recorded one",
                    d.disk
                )));
            }
            // Read through the chain, as `qemu-img convert` flattens it.
            let back = read_disk(fs, &top.path).map_err(|e| self.fail(e))?;
            let want = expected.get(&d.disk).map_or(&[][..], Vec::as_slice);
            if back != want {
                return Err(self.fail(format!(
                    "restore of {uuid} until {until:?}: disk {} differs from its point in time at byte {}",
                    d.disk,
                    first_difference(&back, want)
                )));
            }
        }
        self.stats.restores += 1;
        Ok(())
    }

    // ----- checkers -----

    fn check(&mut self) -> Result<(), ManagedFailure> {
        if std::mem::take(&mut self.store_changed) {
            let stored = self.reload().map_err(|e| self.fail(e))?;
            if stored != self.catalogue {
                return Err(self.fail("the stored catalogue differs from the one in memory"));
            }
        }
        // The order is the order of recording, although many backups share a second.
        let listed: Vec<&str> = self
            .catalogue
            .list(ListFilter::All)
            .iter()
            .map(|b| b.uuid.as_str())
            .collect();
        if listed != self.recorded {
            return Err(self.fail(format!(
                "the catalogue lists {listed:?}, they were recorded as {:?}",
                self.recorded
            )));
        }
        let latest = self.catalogue.latest().map(|b| b.uuid.clone());
        if latest.as_ref() != self.recorded.last() {
            return Err(self.fail(format!("latest is {latest:?}")));
        }
        // Images exist and their backing chains are the catalogue's chains.
        for b in self.catalogue.list(ListFilter::All) {
            let chain = self
                .catalogue
                .chain(&b.uuid)
                .map_err(|e| self.fail(e.to_string()))?;
            for image in &b.disks {
                let want: Vec<&str> = chain
                    .iter()
                    .rev()
                    .filter_map(|c| c.image(&image.disk).map(|i| i.path.as_str()))
                    .collect();
                let q = self.qemu.borrow();
                let found = backing_chain(q.fs(), &image.path).map_err(|e| self.fail(e))?;
                if found != want {
                    return Err(self.fail(format!(
                        "backup {} disk {}: chain on disk {found:?}, catalogue {want:?}",
                        b.uuid, image.disk
                    )));
                }
            }
        }
        // The checkpoints are the backups' and the history's own, each with its bitmaps.
        let mut want: BTreeSet<String> = self.own_checkpoints.clone();
        want.extend(
            self.catalogue
                .list(ListFilter::All)
                .iter()
                .filter_map(|b| b.checkpoint.clone()),
        );
        let have: BTreeSet<String> = self
            .driver
            .domain()
            .view()
            .checkpoints
            .iter()
            .map(|c| c.name.clone())
            .collect();
        if have != want {
            return Err(self.fail(format!(
                "the domain has checkpoints {have:?}, the backups and history need {want:?}"
            )));
        }
        if !std::mem::take(&mut self.requested) {
            return Ok(());
        }
        let now = self.now_ms();
        let nodes = self
            .qemu
            .borrow_mut()
            .execute(
                now,
                &json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
            )
            .map_err(|e| self.fail(format!("query-named-block-nodes: {}", e.desc)))?;
        for (disk, node) in DISKS {
            let bitmaps: BTreeSet<String> = bitmaps_of(&nodes, node)
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|b| b["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if bitmaps != want {
                return Err(self.fail(format!(
                    "disk {disk} has bitmaps {bitmaps:?}, the checkpoints are {want:?}"
                )));
            }
        }
        Ok(())
    }
}

/// What a pull client read from an export: its size and the pieces `(offset, data)` read.
type ExportCopy = (u64, Vec<(u64, Vec<u8>)>);

/// Walks an export's block status and reads what a pull client stores: the dirty extents of
/// an incremental backup, the extents that do not read as zeroes of a full one. Returns the
/// export's size and the pieces read.
fn read_wanted<R: ExportReader>(reader: &mut R, incremental: bool) -> Result<ExportCopy, String> {
    let size = reader.size();
    let context = if incremental {
        reader
            .meta_contexts()
            .into_iter()
            .find(|c| c.starts_with("qemu:dirty-bitmap:"))
            .ok_or("an incremental export offers no dirty bitmap")?
    } else {
        "base:allocation".to_owned()
    };
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let extents = reader
            .block_status(&context, offset, size - offset)
            .map_err(|e| e.to_string())?;
        let before = offset;
        for e in extents {
            let length = e.length.min(size - offset);
            if length == 0 {
                break;
            }
            let wanted = if incremental {
                e.flags & STATE_DIRTY != 0
            } else {
                e.flags & STATE_ZERO == 0
            };
            if wanted {
                let mut data = vec![0u8; length as usize];
                reader
                    .read_at(offset, &mut data)
                    .map_err(|e| e.to_string())?;
                pieces.push((offset, data));
            }
            offset += length;
        }
        if offset == before {
            return Err(format!("no block status at {offset}"));
        }
    }
    Ok((size, pieces))
}

/// An image's guest-visible content through its backing chain.
fn read_disk(fs: &FileSystem, path: &str) -> Result<Vec<u8>, String> {
    let size = fs.virtual_size(path).map_err(|e| format!("{path}: {e}"))?;
    let mut content = fs.read_image(path).map_err(|e| format!("{path}: {e}"))?;
    content.truncate(size as usize);
    Ok(content)
}

/// The paths of an image's backing chain, top first, as the image headers name them.
fn backing_chain<'a>(fs: &'a FileSystem, top: &'a str) -> Result<Vec<&'a str>, String> {
    let mut chain = vec![top];
    let mut current = top;
    loop {
        let content = fs
            .get(current)
            .ok_or_else(|| format!("image {current} is missing"))?;
        let crate::image::FileContent::Qcow2(q) = content else {
            return Ok(chain);
        };
        let Some(backing) = q.backing_file.as_deref() else {
            return Ok(chain);
        };
        if chain.len() > crate::image::MAX_CHAIN_DEPTH {
            return Err(format!("the chain of {top} is too deep"));
        }
        chain.push(backing);
        current = backing;
    }
}

/// `qemu-img rebase` (safe mode): every cluster whose content would change under the new
/// backing file is first copied into the image, then the header names the new backing file.
fn rebase_safe(fs: &mut FileSystem, path: &str, backing: Option<&str>) -> Result<(), String> {
    let current = read_disk(fs, path)?;
    let below = match backing {
        Some(b) => read_disk(fs, b)?,
        None => Vec::new(),
    };
    let mut offset = 0usize;
    while offset < current.len() {
        let end = (offset + CLUSTER as usize).min(current.len());
        let under: Vec<u8> = (offset..end)
            .map(|i| below.get(i).copied().unwrap_or(0))
            .collect();
        if current[offset..end] != under[..] {
            fs.write_image(path, offset as u64, &current[offset..end])
                .map_err(|e| format!("{path}: {e}"))?;
        }
        offset = end;
    }
    fs.rebase_unsafe(path, backing)
        .map_err(|e| format!("{path}: {e}"))
}

fn digest(content: &[u8]) -> Digest {
    Digest::sha256(&Sha256::digest(content).into())
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}
