//! Seeded histories of managed backups: the core's managed-backup machine
//! ([`vbackup_core::managed::Managed`], the code the command line runs) driven over the
//! simulated QEMU, with guest writes, checkpoints, push and pull backups, deletions,
//! consolidations and restores; vbackup killed at every kind of step; storage corruption
//! injected into backup images and records; checkers after every step.
//!
//! Contract: [`run_managed_history`] is a pure function of its [`ManagedConfig`]: ChaCha8
//! seeded from it chooses every action, time is virtual, nothing reads the OS. The history
//! plays the runtime: it carries out every effect the machine emits on the simulated world
//! (images in the simulated file system, records and the journal in a simulated store, a
//! set of directories, a set of defined domains, domain requests through the engine over
//! the simulated QEMU). A kill drops the machine before or after an effect is carried out
//! (its result is never delivered) and rebuilds it from the stored records and journal, as
//! a restarted `vbackup` does; a pending backup is then concluded with `backup-finish` (or
//! `--cancel`), any other journal by the next operation. The domain's engine and QEMU live
//! on (they are another process), except that an overwrite stops the domain (a clean close)
//! and its next domain request starts it again over the replaced image.
//!
//! Checkers, after every step:
//! - the machine rebuilt from the store has the same catalogue and the same damaged records;
//!   no journal is left once an operation (or its recovery) answered;
//! - the order of backups is the order they were recorded in; every catalogued image exists
//!   and its backing chain is the catalogue's chain;
//! - the checkpoints of the domain are exactly those of the catalogued backups, of damaged
//!   records, and the history's own, each with its bitmap on every disk (but vda for those
//!   an overwrite of vda forgot there);
//! - no file or directory is left that nothing names: the per-backup directory of a failed
//!   or discarded backup is gone, no temporary file of a consolidation or restore remains;
//! - every restore (of a backup, or `--until` another backup of its chain) matches the
//!   recorded digest and equals the guest disks at that backup's point in time, byte for
//!   byte, unless an image of its chain was corrupted: then it is refused and writes
//!   nothing; a restore until a backup of another chain is refused; a restore to a new
//!   domain named like an existing one is refused and writes nothing;
//! - a restore over the domain's own vda (`--overwrite`, the domain stopped and started
//!   again) leaves vda equal to the backup's point in time, or (corrupted chain) refused
//!   and untouched; vdb, the catalogue and the domain's files are unchanged, and every
//!   checkpoint forgets vda, whose bitmaps went with the old image;
//! - a consolidation over a corrupted chain is refused and changes no record and no image;
//!   once the image is repaired it succeeds;
//! - a backup into a target directory that does not exist is refused, creates nothing and
//!   leaves no checkpoint;
//! - a truncated record is listed as damaged (naming its file, with the backups built on
//!   it); every other backup still verifies and restores; the damaged record can be deleted;
//! - verification reports exactly the disks whose chain holds a corrupted image.
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
    BackupListFilter, BlockHashes, CatalogueError, Digest, DigestKind, StoredRecord,
};
use vbackup_core::checkpoint::DeleteScope;
use vbackup_core::domain::{Reply, Request};
use vbackup_core::driver::Driver;
use vbackup_core::export::{ExportReader, STATE_DIRTY, STATE_ZERO};
use vbackup_core::link::{Link, Timestamp};
use vbackup_core::managed::{
    CallId, CreateRequest, Effect, EffectError, ImageFacts, Managed, ManagedError, ManagedInput,
    ManagedOutput, ManagedReply, ManagedRequest, Outcome, RestoreRequest, RestoreTarget,
    StoredManaged,
};
use vbackup_core::model::ImageFormat;

use crate::bitmap_commands::bitmaps_of;
use crate::errors::QmpError;
use crate::image::{FileContent, FileSystem};
use crate::qemu::Fault;
use crate::world::link::{FaultyLink, SharedQemu};
use crate::world::{CLUSTER, StoreEffects, boot_lab, lab_backup, lab_checkpoint, lab_driver};

/// The lab domain's name (see [`crate::world::lab_domain`]).
const DOMAIN: &str = "sim1";
/// The lab domain's disks and their top format nodes.
const DISKS: [(&str, &str); 2] = [("vda", "libvirt-1-format"), ("vdb", "libvirt-3-format")];
/// The backup target directory.
const TARGET: &str = "/managed";
/// Where restores go.
const RESTORES: &str = "/restore";
/// The lab domain's images an overwrite replaces: vda's, and vdb's top layer.
const VDA: &str = "/img/vda.qcow2";
const VDB: &str = "/img/vdb.ovl";
/// Receive steps a single engine request may take.
const STEPS: usize = 100_000;
/// Longest chain the history builds on (the simulated file system reads 64 levels at most).
const CHAIN_CAP: usize = 12;
/// Bound on the machine's rounds (effects and waits) for one request.
const ROUNDS: usize = 100_000;
/// Chance, in per mille, that vbackup is killed at an effect of an operation that may be.
const KILL_PER_MILLE: u64 = 25;

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
    /// Pull backups interrupted (vbackup killed) and discarded.
    pub discarded_pulls: u64,
    /// Backups discarded otherwise (cancelled, or killed before their job began).
    pub discarded_backups: u64,
    /// Restores verified (including `--until`).
    pub restores: u64,
    /// Restores until a backup of another chain, refused.
    pub refused_restores: u64,
    /// Restores over a corrupted chain, refused without writing anything.
    pub refused_corrupt_restores: u64,
    /// Restores to a new domain named like an existing one, refused.
    pub refused_new_domains: u64,
    /// Restores that defined a new domain.
    pub new_domains: u64,
    /// Restores over the domain's own disk (`--overwrite`, the domain stopped), verified.
    pub overwrites: u64,
    /// Overwrites from a corrupted chain, refused with the disk untouched.
    pub refused_corrupt_overwrites: u64,
    /// Deletions carried out (each finished, possibly after a restart).
    pub deletions: u64,
    /// Deletions interrupted (killed, or refused by QEMU) and finished by the next run.
    pub interrupted_deletions: u64,
    /// Checkpoints deleted because their backup went.
    pub released_checkpoints: u64,
    /// Incrementals made full backups of their own.
    pub consolidations: u64,
    /// Consolidations over a corrupted chain, refused with nothing changed.
    pub refused_consolidations: u64,
    /// Times vbackup was killed.
    pub kills: u64,
    /// Images corrupted.
    pub corrupted_images: u64,
    /// Corrupted images repaired.
    pub repaired_images: u64,
    /// Records truncated.
    pub damaged_records: u64,
    /// Damaged records deleted.
    pub deleted_damaged: u64,
    /// Backups into a vanished target directory, refused.
    pub refused_missing_targets: u64,
    /// Verifications whose verdicts were checked.
    pub verifications: u64,
}

impl ManagedStats {
    /// Adds another history's counts.
    pub fn add(&mut self, o: &ManagedStats) {
        self.guest_writes += o.guest_writes;
        self.push_backups += o.push_backups;
        self.pull_backups += o.pull_backups;
        self.incrementals += o.incrementals;
        self.discarded_pulls += o.discarded_pulls;
        self.discarded_backups += o.discarded_backups;
        self.restores += o.restores;
        self.refused_restores += o.refused_restores;
        self.refused_corrupt_restores += o.refused_corrupt_restores;
        self.refused_new_domains += o.refused_new_domains;
        self.new_domains += o.new_domains;
        self.overwrites += o.overwrites;
        self.refused_corrupt_overwrites += o.refused_corrupt_overwrites;
        self.deletions += o.deletions;
        self.interrupted_deletions += o.interrupted_deletions;
        self.released_checkpoints += o.released_checkpoints;
        self.consolidations += o.consolidations;
        self.refused_consolidations += o.refused_consolidations;
        self.kills += o.kills;
        self.corrupted_images += o.corrupted_images;
        self.repaired_images += o.repaired_images;
        self.damaged_records += o.damaged_records;
        self.deleted_damaged += o.deleted_damaged;
        self.refused_missing_targets += o.refused_missing_targets;
        self.verifications += o.verifications;
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

/// The records, and each catalogued image's backing chain and own content.
type Snapshot = (
    BTreeMap<String, String>,
    Vec<(String, Vec<String>, Vec<u8>)>,
);

/// How a request ended: answered, or vbackup was killed first.
enum Ended {
    Answered(Result<ManagedReply, ManagedError>),
    Killed,
}

struct History {
    seed: u64,
    step: usize,
    rng: ChaCha8Rng,
    driver: Driver<FaultyLink, StoreEffects>,
    qemu: SharedQemu,
    machine: Managed,
    next_call: u64,
    /// The stored records, by uuid (`backups/<uuid>.xml`).
    store: BTreeMap<String, String>,
    /// The stored journal.
    journal: Option<String>,
    default_target: Option<String>,
    /// Directories of the simulated host.
    dirs: BTreeSet<String>,
    /// Domains defined on the simulated host.
    domains: BTreeSet<String>,
    /// Points in time of backups begun, by checkpoint name.
    begun_points: BTreeMap<String, Content>,
    /// Each catalogued backup's point in time.
    points: BTreeMap<String, Content>,
    /// Catalogued (intact) backups in the order they were recorded.
    recorded: Vec<String>,
    /// Backups whose record is damaged (truncated, or built on one): uuid to checkpoint.
    damaged: BTreeMap<String, (Option<String>, Vec<String>)>,
    /// Checkpoints and images of damaged records that were deleted: nothing names them.
    leaked_checkpoints: BTreeSet<String>,
    leaked_images: BTreeSet<String>,
    /// Corrupted images, with their content before the corruption.
    corrupt: BTreeMap<String, FileContent>,
    /// Checkpoints the history created outside backups.
    own_checkpoints: BTreeSet<String>,
    /// Checkpoints that no longer track vda: its bitmaps went with an overwritten image.
    forgotten_on_vda: BTreeSet<String>,
    /// Whether the domain is stopped (for an overwrite); the next domain request starts it.
    domain_stopped: bool,
    /// Whether the fault of the operation may kill vbackup.
    kills_armed: bool,
    /// Whether vbackup was killed during the current action.
    killed: bool,
    /// Journal writes so far.
    journal_writes: u64,
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
            machine: Managed::new(DOMAIN, StoredManaged::default()),
            next_call: 0,
            store: BTreeMap::new(),
            journal: None,
            default_target: None,
            dirs: ["/img", TARGET, RESTORES]
                .iter()
                .map(|d| (*d).to_owned())
                .collect(),
            domains: [DOMAIN.to_owned()].into(),
            begun_points: BTreeMap::new(),
            points: BTreeMap::new(),
            recorded: Vec::new(),
            damaged: BTreeMap::new(),
            leaked_checkpoints: BTreeSet::new(),
            leaked_images: BTreeSet::new(),
            corrupt: BTreeMap::new(),
            own_checkpoints: BTreeSet::new(),
            forgotten_on_vda: BTreeSet::new(),
            domain_stopped: false,
            kills_armed: false,
            killed: false,
            journal_writes: 0,
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

    fn now(&self) -> Timestamp {
        self.driver.link().now()
    }

    fn engine(&mut self, request: Request) -> Result<Result<Reply, String>, ManagedFailure> {
        match self.driver.call(request, STEPS) {
            Ok(answer) => Ok(answer.map_err(|e| e.to_string())),
            Err(e) => Err(self.fail(format!("the driver stopped: {e}"))),
        }
    }

    /// Lets `ms` of virtual time pass (jobs progress).
    fn pass_time(&mut self, ms: u64) -> Result<(), ManagedFailure> {
        self.pass_time_until_job_end(ms, false)
    }

    /// Whether the domain's engine has a backup job.
    fn job_running(&self) -> bool {
        self.driver.domain().view().backup.is_some()
    }

    /// Lets `ms` of virtual time pass, or less when `stop_at_job_end` and the job ends.
    fn pass_time_until_job_end(
        &mut self,
        ms: u64,
        stop_at_job_end: bool,
    ) -> Result<(), ManagedFailure> {
        let until = self.now().plus_ms(ms);
        for _ in 0..ROUNDS {
            if self.now() >= until || (stop_at_job_end && !self.job_running()) {
                return Ok(());
            }
            if let Err(e) = self.driver.step(Some(until)) {
                return Err(self.fail(format!("the driver stopped: {e}")));
            }
        }
        Err(self.fail("virtual time does not move"))
    }

    // ----- the machine and its runtime -----

    /// The machine as a restarted vbackup rebuilds it from the store.
    fn rebuilt(&self) -> Managed {
        Managed::new(
            DOMAIN,
            StoredManaged {
                records: self
                    .store
                    .iter()
                    .map(|(uuid, text)| StoredRecord::new(format!("backups/{uuid}.xml"), text))
                    .collect(),
                default_target: self.default_target.clone(),
                journal: self
                    .journal
                    .clone()
                    .map(|t| ("managed-journal.json".to_owned(), t)),
            },
        )
    }

    fn restart(&mut self) {
        self.machine = self.rebuilt();
        self.stats.kills += 1;
        self.killed = true;
    }

    /// Sends a request and carries out the machine's effects until it answers (or, when
    /// kills are armed, until vbackup is killed).
    fn call(&mut self, request: ManagedRequest) -> Result<Ended, ManagedFailure> {
        self.next_call += 1;
        let now = self.now();
        let mut outputs = self
            .machine
            .handle(now, ManagedInput::Request(CallId(self.next_call), request));
        for _ in 0..ROUNDS {
            let mut next = Vec::new();
            for o in outputs {
                match o {
                    ManagedOutput::Respond(_, answer) => return Ok(Ended::Answered(answer)),
                    ManagedOutput::Effect(id, effect) => {
                        if self.kills_armed && self.below(1000) < KILL_PER_MILLE {
                            // Killed before the effect, or after it but before its result.
                            if self.chance(50) {
                                let _ = self.execute(&effect)?;
                            }
                            self.restart();
                            return Ok(Ended::Killed);
                        }
                        let result = self.execute(&effect)?;
                        let now = self.now();
                        next.extend(self.machine.handle(now, ManagedInput::Done(id, result)));
                    }
                }
            }
            if next.is_empty() {
                // The machine waits (a push job running): time passes, the guest writes.
                let Some(at) = self.machine.next_deadline() else {
                    return Err(self.fail("the machine neither answers nor waits"));
                };
                if self.chance(30) {
                    self.guest_write();
                }
                // As the host runtime does: the machine hears at once when the job ends.
                let wait = at.ms_since(self.now()).max(1);
                let was_running = self.job_running();
                self.pass_time_until_job_end(wait, was_running)?;
                let input = if was_running && !self.job_running() {
                    ManagedInput::JobEnded
                } else {
                    ManagedInput::Tick
                };
                let now = self.now();
                next = self.machine.handle(now, input);
            }
            outputs = next;
        }
        Err(self.fail("a managed request never ended"))
    }

    /// [`History::call`] that must be answered (kills are not armed).
    fn ask(
        &mut self,
        request: ManagedRequest,
    ) -> Result<Result<ManagedReply, ManagedError>, ManagedFailure> {
        let armed = std::mem::replace(&mut self.kills_armed, false);
        let ended = self.call(request);
        self.kills_armed = armed;
        match ended? {
            Ended::Answered(a) => Ok(a),
            Ended::Killed => Err(self.fail("killed with kills disarmed")),
        }
    }

    fn facts(&self, path: &str, kind: DigestKind) -> Result<ImageFacts, EffectError> {
        let q = self.qemu.borrow();
        let fs = q.fs();
        if !fs.exists(path) {
            return Err(EffectError::NotFound(path.to_owned()));
        }
        let content = read_disk(fs, path).map_err(EffectError::Failed)?;
        let allocated = fs
            .allocated_ranges(path)
            .map_err(|e| EffectError::Failed(e.to_string()))?
            .iter()
            .map(|(_, len)| len)
            .sum();
        Ok(ImageFacts {
            virtual_size_bytes: content.len() as u64,
            allocated_size_bytes: allocated,
            digest: digest(&content, kind),
            format: match fs.get(path) {
                Some(FileContent::Raw(_)) => ImageFormat::Raw,
                _ => ImageFormat::Qcow2,
            },
        })
    }

    fn dir_exists(&self, dir: &str) -> bool {
        dir == "/" || self.dirs.contains(dir)
    }

    /// Carries out one effect on the simulated world.
    fn execute(&mut self, effect: &Effect) -> Result<Result<Outcome, EffectError>, ManagedFailure> {
        let done = Ok(Outcome::Done);
        let missing = |p: &str| Err(EffectError::NotFound(p.to_owned()));
        Ok(match effect {
            Effect::CreateDir { path, parents } => {
                let parent = parent_of(path);
                if !parents && !self.dir_exists(parent) {
                    missing(parent)
                } else {
                    let mut p = path.as_str();
                    while p != "/" && !self.dirs.contains(p) {
                        self.dirs.insert(p.to_owned());
                        p = parent_of(p);
                    }
                    done
                }
            }
            Effect::RemoveDir { path } => {
                let prefix = format!("{path}/");
                let busy = self
                    .qemu
                    .borrow()
                    .fs()
                    .paths()
                    .any(|p| p.starts_with(&prefix))
                    || self.dirs.iter().any(|d| d.starts_with(&prefix));
                if busy {
                    Err(EffectError::Failed(format!("'{path}' is not empty")))
                } else {
                    self.dirs.remove(path);
                    done
                }
            }
            Effect::CreateImage {
                path, size_bytes, ..
            } => {
                if !self.dir_exists(parent_of(path)) {
                    missing(parent_of(path))
                } else {
                    self.qemu
                        .borrow_mut()
                        .fs_mut()
                        .create_qcow2(path, *size_bytes, CLUSTER, None);
                    done
                }
            }
            Effect::Rebase {
                path,
                backing,
                unsafe_rebase,
            } => {
                let mut q = self.qemu.borrow_mut();
                let fs = q.fs_mut();
                let r = if *unsafe_rebase {
                    fs.rebase_unsafe(path, backing.as_deref())
                        .map_err(|e| e.to_string())
                } else {
                    rebase_safe(fs, path, backing.as_deref())
                };
                r.map(|()| Outcome::Done).map_err(EffectError::Failed)
            }
            // The whole content is at hand: a parent's block hashes (`base`) would save nothing.
            Effect::Digest { path, kind, .. } => self.facts(path, *kind).map(Outcome::Facts),
            Effect::DigestCopy {
                source,
                into,
                existing,
                kind,
                ..
            } => {
                let read = {
                    let q = self.qemu.borrow();
                    if q.fs().exists(source) {
                        read_disk(q.fs(), source).map_err(EffectError::Failed)
                    } else {
                        Err(EffectError::NotFound(source.clone()))
                    }
                };
                match read {
                    Err(e) => Err(e),
                    Ok(_) if !self.dir_exists(parent_of(into)) => missing(parent_of(into)),
                    Ok(_) if *existing != self.qemu.borrow().fs().exists(into) => Err(
                        EffectError::Failed(format!("'{into}' exists: {}", !existing)),
                    ),
                    Ok(content) => {
                        {
                            let mut q = self.qemu.borrow_mut();
                            let fs = q.fs_mut();
                            fs.create_qcow2(into, content.len() as u64, CLUSTER, None);
                            write_sparse(fs, into, 0, &content)?;
                        }
                        self.facts(into, *kind).map(Outcome::Facts)
                    }
                }
            }
            Effect::CopyPull {
                export,
                dirty_bitmap,
                into,
                backing,
            } => {
                // The guest goes on writing while the client reads.
                for _ in 0..self.below(3) {
                    self.guest_write();
                }
                let read = {
                    let q = self.qemu.borrow();
                    match q.export_reader(export) {
                        Ok(mut reader) => read_wanted(&mut reader, dirty_bitmap.is_some()),
                        Err(e) => Err(e.to_string()),
                    }
                };
                match read {
                    Err(e) => Err(EffectError::Failed(e)),
                    Ok(_) if !self.dir_exists(parent_of(into)) => missing(parent_of(into)),
                    Ok((size, pieces)) => {
                        let mut q = self.qemu.borrow_mut();
                        let fs = q.fs_mut();
                        fs.create_qcow2(into, size, CLUSTER, backing.as_deref());
                        for (offset, data) in pieces {
                            fs.write_image(into, offset, &data)
                                .map_err(|e| self.fail(format!("writing {into}: {e}")))?;
                        }
                        done
                    }
                }
            }
            Effect::Rename { from, to, replace } => {
                let mut q = self.qemu.borrow_mut();
                let fs = q.fs_mut();
                match fs.get(from).cloned() {
                    None => missing(from),
                    Some(_) if !replace && fs.exists(to) => {
                        Err(EffectError::Failed(format!("'{to}' exists")))
                    }
                    Some(content) => {
                        fs.remove(from);
                        fs.put(to, content);
                        done
                    }
                }
            }
            Effect::Sync { .. } => done,
            Effect::Remove { path } => {
                self.qemu.borrow_mut().fs_mut().remove(path);
                done
            }
            Effect::Exists { path } => Ok(Outcome::Exists(
                self.qemu.borrow().fs().exists(path) || self.dirs.contains(path),
            )),
            Effect::PutRecord(b) => {
                self.store.insert(b.uuid.clone(), b.format());
                done
            }
            Effect::DeleteRecord { uuid } => {
                self.store.remove(uuid);
                done
            }
            Effect::SetDefaultTarget(t) => {
                self.default_target = t.clone();
                done
            }
            Effect::PutJournal(j) => {
                self.journal_writes += 1;
                self.journal = Some(j.format());
                done
            }
            Effect::ClearJournal => {
                self.journal = None;
                done
            }
            Effect::DomainExists { name } => Ok(Outcome::Exists(self.domains.contains(name))),
            Effect::DefineDomain { name, .. } => {
                if self.domains.insert(name.clone()) {
                    done
                } else {
                    Err(EffectError::Failed(format!("domain '{name}' exists")))
                }
            }
            Effect::Domain(request) => {
                // The domain's daemon starts for a request, as a session does on a host.
                self.start_domain()?;
                let released = match request {
                    Request::CheckpointDeleteEach { names } => names.len() as u64,
                    _ => 0,
                };
                let begin = matches!(request, Request::BackupBegin { .. });
                let checkpoint = match request {
                    Request::BackupBegin {
                        checkpoint: Some(c),
                        ..
                    } => Some(c.name.clone()),
                    _ => None,
                };
                if begin {
                    self.driver.link_mut().take_points();
                }
                let answer = self.engine(request.clone())?;
                if begin && answer.is_ok() {
                    let point = self
                        .driver
                        .link_mut()
                        .take_points()
                        .into_iter()
                        .rev()
                        .find(|p| !p.jobs.is_empty())
                        .map(|p| {
                            p.disks
                                .into_iter()
                                .map(|(disk, content)| (disk, content.to_bytes()))
                                .collect::<BTreeMap<_, _>>()
                        })
                        .ok_or_else(|| self.fail("a backup began without a transaction"))?;
                    if let Some(c) = checkpoint {
                        self.begun_points.insert(c, point);
                    }
                }
                if answer.is_ok() {
                    self.stats.released_checkpoints += released;
                }
                answer.map(Outcome::Reply).map_err(EffectError::Domain)
            }
        })
    }

    // ----- the history -----

    fn run(&mut self, steps: usize) -> Result<(), ManagedFailure> {
        // The session opens with QEMU's greeting.
        match self.driver.run_until(|d| d.view().connected, STEPS) {
            Ok(true) => {}
            other => return Err(self.fail(format!("the session does not open: {other:?}"))),
        }
        match self.ask(ManagedRequest::SetDefaultTarget(Some(TARGET.into())))? {
            Ok(_) => {}
            Err(e) => return Err(self.fail(format!("backup-set-default-target: {e}"))),
        }
        for _ in 0..steps {
            self.step += 1;
            self.killed = false;
            match self.below(100) {
                0..=24 => self.guest_write(),
                25..=49 => self.backup()?,
                50..=54 => self.own_checkpoint_create()?,
                55..=57 => self.own_checkpoint_delete()?,
                58..=66 => self.restore()?,
                67..=69 => self.overwrite()?,
                70..=79 => self.delete()?,
                80..=85 => self.consolidate()?,
                86..=88 => self.corrupt_image(),
                89..=90 => self.repair_image(),
                91..=92 => self.damage_record()?,
                93..=94 => self.delete_damaged()?,
                95..=96 => self.missing_target()?,
                _ => self.verify()?,
            }
            self.settle()?;
            let dt = 1 + self.below(300);
            self.pass_time(dt)?;
            self.check()?;
        }
        // Every backup left restores to its point in time (or, over a corrupted chain, is
        // refused).
        self.step += 1;
        for uuid in self.recorded.clone() {
            self.verify_restore(&uuid, None, &[], None, false)?;
        }
        Ok(())
    }

    /// After a kill: a restarted vbackup concludes the pending backup (`backup-finish`, or
    /// `--cancel`), and the next operation finishes or undoes any other journal. Those runs
    /// may be killed too.
    fn settle(&mut self) -> Result<(), ManagedFailure> {
        for attempt in 0..8 {
            self.kills_armed = attempt < 3;
            let request = if self.machine.pending().is_some() {
                let cancel = self.chance(25);
                ManagedRequest::Finish {
                    cancel,
                    check: false,
                }
            } else if self.journal.is_some() {
                ManagedRequest::SetDefaultTarget(self.default_target.clone())
            } else {
                break;
            };
            let ended = self.call(request)?;
            self.kills_armed = false;
            if let Ended::Answered(Err(e)) = &ended
                && !matches!(
                    e,
                    ManagedError::JobFailed { .. }
                        | ManagedError::PullInterrupted(_)
                        | ManagedError::Effect { .. }
                )
            {
                return Err(self.fail(format!("concluding after a restart: {e}")));
            }
        }
        if self.journal.is_some() {
            return Err(self.fail("a journal is left after every recovery"));
        }
        self.sync_model()
    }

    /// Follows the catalogue after an operation: backups that appeared (recorded by a
    /// finish) take their point in time, backups gone leave the model.
    fn sync_model(&mut self) -> Result<(), ManagedFailure> {
        let listed: Vec<String> = self
            .machine
            .catalogue()
            .list(BackupListFilter::All)
            .iter()
            .map(|b| b.uuid.clone())
            .collect();
        let catalogue = self.machine.catalogue().clone();
        self.recorded.retain(|u| catalogue.get(u).is_some());
        self.points.retain(|u, _| catalogue.get(u).is_some());
        if !listed.starts_with(&self.recorded) {
            return Err(self.fail(format!(
                "the catalogue lists {listed:?}, they were recorded as {:?}",
                self.recorded
            )));
        }
        for uuid in &listed[self.recorded.len()..] {
            let Some(b) = catalogue.get(uuid) else {
                continue;
            };
            let point = b
                .checkpoint
                .as_ref()
                .and_then(|c| self.begun_points.remove(c))
                .ok_or_else(|| self.fail(format!("backup {uuid} has no point in time")))?;
            // What the backup holds is the point in time, whatever its chain.
            for image in &b.disks {
                let q = self.qemu.borrow();
                let content = read_disk(q.fs(), &image.path).map_err(|e| self.fail(e))?;
                if point.get(&image.disk) != Some(&content) {
                    return Err(self.fail(format!(
                        "backup {uuid} disk {} does not hold its point in time",
                        image.disk
                    )));
                }
                if digest(&content, image.digest.kind()) != image.digest {
                    return Err(self.fail(format!(
                        "backup {uuid} disk {}: the recorded digest is not its content's",
                        image.disk
                    )));
                }
            }
            self.points.insert(uuid.clone(), point);
            if b.parent.is_some() {
                self.stats.incrementals += 1;
            }
        }
        self.recorded = listed;
        Ok(())
    }

    fn guest_write(&mut self) {
        let disk = if self.chance(50) { "vda" } else { "vdb" };
        let size = crate::world::DISK_BYTES;
        let offset = self.below(size - 1);
        let len = 1 + self.below((size - offset).min(3 * CLUSTER));
        let byte = (self.below(255) + 1) as u8;
        let now = self.now().as_ms();
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
        let answer = self.engine(Request::CheckpointCreate {
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
        let answer = self.engine(Request::CheckpointDelete {
            name: name.clone(),
            scope: DeleteScope::Single,
            metadata_only: false,
        })?;
        answer.map_err(|e| self.fail(format!("checkpoint-delete {name}: {e}")))?;
        self.own_checkpoints.remove(&name);
        Ok(())
    }

    /// Whether the image of `disk` of `uuid`, read through its chain, no longer holds its
    /// point in time (a corrupted image in its chain that no later image hides).
    fn tainted(&self, uuid: &str, disk: &str) -> bool {
        let Some(image) = self
            .machine
            .catalogue()
            .get(uuid)
            .and_then(|b| b.image(disk))
        else {
            return false;
        };
        let q = self.qemu.borrow();
        let content = read_disk(q.fs(), &image.path);
        let want = self.points.get(uuid).and_then(|p| p.get(disk));
        content.ok().as_ref() != want
    }

    fn tainted_any(&self, uuid: &str) -> bool {
        DISKS.iter().any(|(d, _)| self.tainted(uuid, d))
    }

    /// Whether a consolidation of `uuid` must be refused: an image of its chain, for one of
    /// its disks, does not hold its backup's point in time.
    fn chain_tainted(&self, uuid: &str) -> bool {
        let catalogue = self.machine.catalogue();
        let (Some(b), Ok(chain)) = (catalogue.get(uuid), catalogue.chain(uuid)) else {
            return false;
        };
        chain.iter().any(|a| {
            b.disks
                .iter()
                .any(|d| a.image(&d.disk).is_some() && self.tainted(&a.uuid, &d.disk))
        })
    }

    // ----- creating backups -----

    fn create_request(
        &mut self,
        uuid: &str,
        checkpoint: &str,
        parent: Option<String>,
        pull: bool,
        target: Option<String>,
        wait: bool,
    ) -> ManagedRequest {
        let mut spec = if pull {
            lab_backup(BackupMode::Pull, None, &format!("/scratch/{uuid}"))
        } else {
            lab_backup(BackupMode::Push, None, "")
        };
        if !pull {
            for d in &mut spec.disks {
                if let Some(s) = &mut d.store {
                    s.path = None;
                }
            }
        }
        ManagedRequest::Create(Box::new(CreateRequest {
            uuid: uuid.to_owned(),
            checkpoint: lab_checkpoint(checkpoint),
            spec,
            parent,
            description: None,
            target,
            wait,
        }))
    }

    fn backup(&mut self) -> Result<(), ManagedFailure> {
        let pull = self.chance(50);
        let candidates: Vec<String> = self
            .recorded
            .iter()
            .filter(|u| {
                self.machine
                    .catalogue()
                    .chain(u)
                    .is_ok_and(|c| c.len() < CHAIN_CAP)
                    && !self.tainted_any(u)
                    && !self.lost_vda(u)
            })
            .cloned()
            .collect();
        let parent = if self.chance(70) {
            self.pick(&candidates)
        } else {
            None
        };
        let uuid = self.fresh_uuid();
        let checkpoint = format!("b{}", self.fresh());
        let wait = pull || self.chance(80);
        let request = self.create_request(&uuid, &checkpoint, parent.clone(), pull, None, wait);
        self.kills_armed = true;
        let ended = self.call(request)?;
        self.kills_armed = false;
        match ended {
            Ended::Answered(Ok(ManagedReply::Created(_))) => {}
            Ended::Answered(Ok(ManagedReply::Started { .. })) => {
                // `backup-finish` later, some times asking only whether it is done.
                for _ in 0..1000 {
                    let dt = 1 + self.below(50);
                    self.pass_time(dt)?;
                    let check = self.chance(50);
                    self.kills_armed = true;
                    let ended = self.call(ManagedRequest::Finish {
                        cancel: false,
                        check,
                    })?;
                    self.kills_armed = false;
                    match ended {
                        Ended::Answered(Ok(ManagedReply::Running { .. })) => continue,
                        Ended::Answered(Ok(ManagedReply::Created(_))) | Ended::Killed => break,
                        other => {
                            return Err(self.fail(format!(
                                "backup-finish of {uuid}: {:?}",
                                answer_of(&other)
                            )));
                        }
                    }
                }
            }
            Ended::Answered(other) => {
                return Err(self.fail(format!(
                    "backup-create {} from {parent:?}: {other:?}",
                    if pull { "pull" } else { "push" }
                )));
            }
            Ended::Killed => {}
        }
        self.settle()?;
        if self.machine.catalogue().get(&uuid).is_some() {
            if pull {
                self.stats.pull_backups += 1;
            } else {
                self.stats.push_backups += 1;
            }
        } else if pull {
            self.stats.discarded_pulls += 1;
        } else {
            self.stats.discarded_backups += 1;
        }
        Ok(())
    }

    /// A backup into a target directory that vanished: refused, nothing created.
    fn missing_target(&mut self) -> Result<(), ManagedFailure> {
        let gone = format!("/gone{}", self.fresh());
        let uuid = self.fresh_uuid();
        let checkpoint = format!("g{}", self.fresh());
        let dirs = self.dirs.clone();
        let request =
            self.create_request(&uuid, &checkpoint, None, false, Some(gone.clone()), true);
        match self.ask(request)? {
            Err(ManagedError::Effect { .. }) => {}
            other => {
                return Err(self.fail(format!(
                    "a backup into the missing directory {gone}: {other:?}"
                )));
            }
        }
        if self.dirs != dirs {
            return Err(self.fail(format!("a backup into {gone} created a directory")));
        }
        let prefix = format!("{gone}/");
        if self
            .qemu
            .borrow()
            .fs()
            .paths()
            .any(|p| p.starts_with(&prefix))
        {
            return Err(self.fail(format!("a backup into {gone} created a file")));
        }
        self.stats.refused_missing_targets += 1;
        Ok(())
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
        let new_domain = match self.below(10) {
            0 => Some(DOMAIN.to_owned()),
            1 => Some(format!("restored{}", self.fresh())),
            _ => None,
        };
        let kills = self.chance(40);
        self.verify_restore(&uuid, until.as_deref(), &disks, new_domain, kills)
    }

    /// Restores `uuid` (until `until`) into new images, checks them against the point in
    /// time, then removes them as the user would.
    fn verify_restore(
        &mut self,
        uuid: &str,
        until: Option<&str>,
        disks: &[&str],
        new_domain: Option<String>,
        kills: bool,
    ) -> Result<(), ManagedFailure> {
        let catalogue = self.machine.catalogue().clone();
        let related = until.is_none_or(|u| {
            let on = |a: &str, b: &str| {
                catalogue
                    .chain(a)
                    .is_ok_and(|c| c.iter().any(|x| x.uuid == b))
            };
            on(uuid, u) || on(u, uuid)
        });
        let point_of = until.unwrap_or(uuid).to_owned();
        let chosen: Vec<String> = if disks.is_empty() {
            catalogue
                .get(&point_of)
                .map(|b| b.disks.iter().map(|d| d.disk.clone()).collect())
                .unwrap_or_default()
        } else {
            disks.iter().map(|d| (*d).to_owned()).collect()
        };
        let tainted = chosen.iter().any(|d| self.tainted(&point_of, d));
        let taken = new_domain
            .as_ref()
            .is_some_and(|n| self.domains.contains(n));
        let dir = format!("{RESTORES}/r{}", self.fresh());
        self.kills_armed = kills;
        let ended = self.call(ManagedRequest::Restore(Box::new(RestoreRequest {
            uuid: uuid.to_owned(),
            until: until.map(str::to_owned),
            disks: disks.iter().map(|d| (*d).to_owned()).collect(),
            target: RestoreTarget::NewImages {
                dir: dir.clone(),
                new_domain: new_domain.clone(),
            },
        })))?;
        self.kills_armed = false;
        let what = format!("restore of {uuid} until {until:?} disks {disks:?} as {new_domain:?}");
        let expect_written = match &ended {
            Ended::Answered(Err(ManagedError::Catalogue(CatalogueError::NotInChain {
                ..
            }))) if !related => {
                self.stats.refused_restores += 1;
                false
            }
            Ended::Answered(Err(ManagedError::DomainExists(_))) if taken && related => {
                self.stats.refused_new_domains += 1;
                false
            }
            Ended::Answered(Err(ManagedError::DigestMismatch { .. }))
                if tainted && related && !taken =>
            {
                self.stats.refused_corrupt_restores += 1;
                false
            }
            Ended::Answered(Ok(ManagedReply::Restored { backup, .. }))
                if related && !taken && !tainted =>
            {
                if *backup != point_of {
                    return Err(self.fail(format!("{what} restored {backup}")));
                }
                if new_domain.is_some() {
                    self.stats.new_domains += 1;
                }
                true
            }
            Ended::Killed => {
                self.settle()?;
                // Rolled back or forward: either way no temporary is left (checked below).
                false
            }
            other => {
                return Err(self.fail(format!(
                    "{what}: {:?} (same chain: {related}, corrupted: {tainted}, name taken: {taken})",
                    answer_of(other)
                )));
            }
        };
        // What the directory holds: every chosen disk restored to its point in time, or
        // (refused, rolled back) nothing.
        let prefix = format!("{dir}/");
        let files: Vec<String> = self
            .qemu
            .borrow()
            .fs()
            .paths()
            .filter(|p| p.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        let finals: Vec<String> = chosen.iter().map(|d| format!("{dir}/{d}.qcow2")).collect();
        let killed = matches!(ended, Ended::Killed);
        let complete = files.len() == finals.len() && finals.iter().all(|f| files.contains(f));
        let acceptable = if expect_written {
            complete
        } else {
            files.is_empty() || (killed && complete)
        };
        if !acceptable {
            return Err(self.fail(format!("{what}: the directory holds {files:?}")));
        }
        if complete && !files.is_empty() {
            let expected = self
                .points
                .get(&point_of)
                .cloned()
                .ok_or_else(|| self.fail(format!("no point in time of {point_of}")))?;
            for d in &chosen {
                let q = self.qemu.borrow();
                let back =
                    read_disk(q.fs(), &format!("{dir}/{d}.qcow2")).map_err(|e| self.fail(e))?;
                let want = expected.get(d).map_or(&[][..], Vec::as_slice);
                if back != want {
                    return Err(self.fail(format!(
                        "{what}: disk {d} differs from its point in time at byte {}",
                        first_difference(&back, want)
                    )));
                }
            }
            self.stats.restores += 1;
        }
        // The user removes the restored images.
        for f in files {
            self.qemu.borrow_mut().fs_mut().remove(&f);
        }
        self.dirs.remove(&dir);
        Ok(())
    }

    /// Whether backup `uuid`'s checkpoint no longer tracks vda (an overwrite forgot it), so
    /// nothing can be incremental from it.
    fn lost_vda(&self, uuid: &str) -> bool {
        let checkpoint = self
            .machine
            .catalogue()
            .get(uuid)
            .and_then(|b| b.checkpoint.clone());
        checkpoint.is_some_and(|c| self.forgotten_on_vda.contains(&c))
    }

    /// Stops the domain as `shutdown` does: a clean close writes the persistent bitmaps.
    fn stop_domain(&mut self) -> Result<(), ManagedFailure> {
        self.qemu.borrow_mut().shutdown_cleanly();
        self.driver.link_mut().drop_connection();
        if let Err(e) = self.driver.link_down() {
            return Err(self.fail(format!("the driver stopped: {e}")));
        }
        self.domain_stopped = true;
        Ok(())
    }

    /// Starts a stopped domain over its (possibly replaced) images and reconnects.
    fn start_domain(&mut self) -> Result<(), ManagedFailure> {
        if !std::mem::take(&mut self.domain_stopped) {
            return Ok(());
        }
        let booted = {
            let mut q = self.qemu.borrow_mut();
            q.restart();
            boot_lab(&mut q)
        };
        if let Err(e) = booted {
            return Err(self.fail(format!("the lab does not boot again: {e:?}")));
        }
        self.driver.link_mut().reconnect();
        match self.driver.run_until(|d| d.view().connected, STEPS) {
            Ok(true) => Ok(()),
            other => Err(self.fail(format!("the session does not open again: {other:?}"))),
        }
    }

    /// The names of the domain's checkpoints, and of those tracking vda.
    fn checkpoints_on_vda(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let view = self.driver.domain().view();
        let all = view.checkpoints.iter().map(|c| c.name.clone()).collect();
        let on_vda = view
            .checkpoints
            .iter()
            .filter(|c| {
                c.disks
                    .iter()
                    .any(|d| d.target == "vda" && d.bitmap.is_some())
            })
            .map(|c| c.name.clone())
            .collect();
        (all, on_vda)
    }

    /// `backup-restore UUID --disk vda --overwrite`: with the domain stopped, vda is
    /// replaced by the backup's point in time (or, from a corrupted chain, refused with the
    /// disk untouched); vdb, the catalogue and the other files of the domain stay as they
    /// were, no temporary is left beside the image, and the checkpoints forget vda, whose
    /// bitmaps went with the old image. The live tests check what the simulated files do not
    /// have: the new image keeps the old one's owner, mode and qcow2 options.
    fn overwrite(&mut self) -> Result<(), ManagedFailure> {
        if self.machine.pending().is_some() || self.driver.domain().view().backup.is_some() {
            return Ok(());
        }
        let uuids = self.recorded.clone();
        let Some(uuid) = self.pick(&uuids) else {
            return Ok(());
        };
        let tainted = self.tainted(&uuid, "vda");
        let catalogue = self.machine.catalogue().clone();
        let (checkpoints, on_vda) = self.checkpoints_on_vda();
        self.stop_domain()?;
        let read = |h: &Self, path: &str| {
            let q = h.qemu.borrow();
            read_disk(q.fs(), path).map_err(|e| h.fail(e))
        };
        let images = |h: &Self| -> Vec<String> {
            let q = h.qemu.borrow();
            let paths = q.fs().paths().filter(|p| p.starts_with("/img/"));
            paths.map(str::to_owned).collect()
        };
        let (vda, vdb, files) = (read(self, VDA)?, read(self, VDB)?, images(self));
        let answer = self.ask(ManagedRequest::Restore(Box::new(RestoreRequest {
            uuid: uuid.clone(),
            until: None,
            disks: vec!["vda".into()],
            target: RestoreTarget::Overwrite {
                disks: BTreeMap::from([("vda".into(), VDA.into()), ("vdb".into(), VDB.into())]),
            },
        })))?;
        self.start_domain()?;
        let what = format!("overwrite of vda with {uuid}");
        let replaced = match &answer {
            Ok(ManagedReply::Restored { backup, disks, .. }) if !tainted => {
                let paths: Vec<&str> = disks.iter().map(|d| d.path.as_str()).collect();
                if *backup != uuid || paths != [VDA] {
                    return Err(self.fail(format!("{what} restored {backup} into {paths:?}")));
                }
                true
            }
            Err(ManagedError::DigestMismatch { .. }) if tainted => {
                self.stats.refused_corrupt_overwrites += 1;
                false
            }
            other => {
                return Err(self.fail(format!("{what} (corrupted: {tainted}): {other:?}")));
            }
        };
        let want = match replaced {
            true => self.points.get(&uuid).and_then(|p| p.get("vda")).cloned(),
            false => Some(vda),
        };
        let now = read(self, VDA)?;
        if Some(&now) != want.as_ref() {
            let want = want.unwrap_or_default();
            return Err(self.fail(format!(
                "{what}: vda differs from what it should hold at byte {}",
                first_difference(&now, &want)
            )));
        }
        if read(self, VDB)? != vdb {
            return Err(self.fail(format!("{what}: vdb changed")));
        }
        if images(self) != files {
            return Err(self.fail(format!(
                "{what}: the domain's files are {:?}, were {files:?}",
                images(self)
            )));
        }
        if *self.machine.catalogue() != catalogue {
            return Err(self.fail(format!("{what}: the catalogue changed")));
        }
        let (after, after_on_vda) = self.checkpoints_on_vda();
        let want_on_vda = if replaced { BTreeSet::new() } else { on_vda };
        if after != checkpoints || after_on_vda != want_on_vda {
            return Err(self.fail(format!(
                "{what}: checkpoints {after:?} (on vda {after_on_vda:?}), were {checkpoints:?} (want on vda {want_on_vda:?})"
            )));
        }
        if replaced {
            self.forgotten_on_vda.extend(checkpoints);
            self.stats.overwrites += 1;
        }
        Ok(())
    }

    fn verify(&mut self) -> Result<(), ManagedFailure> {
        let uuids = self.recorded.clone();
        let Some(uuid) = self.pick(&uuids) else {
            return Ok(());
        };
        let answer = self.ask(ManagedRequest::Verify { uuid: uuid.clone() })?;
        let Ok(ManagedReply::Verified { disks, .. }) = answer else {
            return Err(self.fail(format!("backup-verify {uuid}: {answer:?}")));
        };
        for v in disks {
            if v.ok() == self.tainted(&uuid, &v.disk) {
                return Err(self.fail(format!(
                    "backup-verify {uuid} disk {}: {:?} (corrupted chain: {})",
                    v.disk,
                    v.found,
                    self.tainted(&uuid, &v.disk)
                )));
            }
        }
        self.stats.verifications += 1;
        Ok(())
    }

    // ----- deleting -----

    fn delete(&mut self) -> Result<(), ManagedFailure> {
        let uuids: Vec<String> = self.recorded.clone();
        let Some(target) = self.pick(&uuids) else {
            return Ok(());
        };
        let all = self.chance(8);
        let with_children = self.chance(40);
        let before = self.machine.catalogue().clone();
        let has_children = before.children(&target).is_ok_and(|c| !c.is_empty());
        let refuse = self.chance(15);
        if refuse {
            self.qemu.borrow_mut().set_fault(Fault::RefuseCommand {
                command: "transaction".into(),
                error: QmpError::generic("simulated refusal of transaction"),
            });
        }
        self.kills_armed = self.chance(50);
        let writes = self.journal_writes;
        let ended = self.call(ManagedRequest::Delete {
            target: (!all).then(|| target.clone()),
            with_children,
            keep_checkpoints: false,
        })?;
        self.kills_armed = false;
        self.qemu.borrow_mut().clear_faults();
        match ended {
            Ended::Answered(Err(ManagedError::Catalogue(CatalogueError::HasChildren {
                ..
            }))) if !all && !with_children && has_children => {
                return Ok(());
            }
            Ended::Answered(Ok(ManagedReply::Deleted { .. })) => {}
            Ended::Answered(Err(ManagedError::Effect { .. })) if refuse => {
                // QEMU refused to delete the checkpoints: every backup is kept, nothing is
                // left to finish; asked again, the deletion is carried out.
                self.stats.interrupted_deletions += 1;
                if self.journal.is_some() || *self.machine.catalogue() != before {
                    return Err(self.fail(format!(
                        "a refused deletion of {target} changed the catalogue or left a journal"
                    )));
                }
                let again = self.ask(ManagedRequest::Delete {
                    target: (!all).then(|| target.clone()),
                    with_children,
                    keep_checkpoints: false,
                })?;
                if let Err(e) = again {
                    return Err(self.fail(format!("deleting {target} again: {e}")));
                }
            }
            Ended::Killed if self.journal_writes == writes => {
                // Killed before the deletion was journaled: nothing happened.
                self.settle()?;
                return Ok(());
            }
            Ended::Killed => {
                self.stats.interrupted_deletions += 1;
                self.settle()?;
                if refuse && *self.machine.catalogue() == before {
                    // Refused by QEMU, then killed while undoing: nothing was deleted.
                    return Ok(());
                }
            }
            Ended::Answered(other) => {
                return Err(self.fail(format!(
                    "backup-delete {target} (all: {all}, children: {with_children}): {other:?}"
                )));
            }
        }
        self.sync_model()?;
        let gone: Vec<_> = before
            .list(BackupListFilter::All)
            .into_iter()
            .filter(|b| self.machine.catalogue().get(&b.uuid).is_none())
            .cloned()
            .collect();
        if self.machine.catalogue().get(&target).is_some() {
            return Err(self.fail(format!("backup {target} is still there after its deletion")));
        }
        // Finished deletions leave no image behind.
        for b in gone {
            for i in &b.disks {
                if self.qemu.borrow().fs().exists(&i.path) {
                    return Err(self.fail(format!(
                        "image {} of deleted backup {} is left",
                        i.path, b.uuid
                    )));
                }
                self.corrupt.remove(&i.path);
            }
        }
        self.stats.deletions += 1;
        Ok(())
    }

    // ----- consolidating -----

    /// What a consolidation must leave alone when it is refused: the records and, for every
    /// catalogued image, its backing file and content.
    fn snapshot(&self) -> Snapshot {
        let q = self.qemu.borrow();
        let fs = q.fs();
        let mut images = Vec::new();
        for b in self.machine.catalogue().list(BackupListFilter::All) {
            for i in &b.disks {
                let chain = backing_chain(fs, &i.path)
                    .map(|c| c.into_iter().map(str::to_owned).collect())
                    .unwrap_or_default();
                let own = fs.read_image(&i.path).unwrap_or_default();
                images.push((i.path.clone(), chain, own));
            }
        }
        (self.store.clone(), images)
    }

    fn consolidate(&mut self) -> Result<(), ManagedFailure> {
        let uuids: Vec<String> = self.recorded.clone();
        let Some(target) = self.pick(&uuids) else {
            return Ok(());
        };
        let tainted = self.chain_tainted(&target);
        let full = self
            .machine
            .catalogue()
            .get(&target)
            .is_some_and(|b| b.parent.is_none());
        let before = self.snapshot();
        self.kills_armed = !tainted && self.chance(40);
        let ended = self.call(ManagedRequest::Consolidate {
            uuid: target.clone(),
        })?;
        self.kills_armed = false;
        match ended {
            Ended::Answered(Err(ManagedError::DigestMismatch { .. })) if tainted && !full => {
                if self.snapshot() != before {
                    return Err(self.fail(format!(
                        "a refused consolidation of {target} changed a record or an image"
                    )));
                }
                self.stats.refused_consolidations += 1;
                return Ok(());
            }
            Ended::Answered(Ok(ManagedReply::Consolidated { changed, .. })) if !tainted || full => {
                if changed == full {
                    return Err(self.fail(format!("consolidating {target}: changed {changed}")));
                }
            }
            Ended::Killed => self.settle()?,
            Ended::Answered(other) => {
                return Err(self.fail(format!(
                    "consolidating {target} (corrupted chain: {tainted}): {other:?}"
                )));
            }
        }
        let killed = self.killed;
        if !killed
            && self
                .machine
                .catalogue()
                .get(&target)
                .is_some_and(|b| b.parent.is_some())
        {
            return Err(self.fail(format!("{target} still has a parent after consolidation")));
        }
        if !full {
            self.stats.consolidations += 1;
        }
        Ok(())
    }

    // ----- storage corruption -----

    fn corrupt_image(&mut self) {
        let images: Vec<String> = self
            .machine
            .catalogue()
            .list(BackupListFilter::All)
            .iter()
            .flat_map(|b| b.disks.iter().map(|i| i.path.clone()))
            .filter(|p| !self.corrupt.contains_key(p))
            .collect();
        let Some(path) = self.pick(&images) else {
            return;
        };
        let clusters = crate::world::DISK_BYTES / CLUSTER;
        let offset = self.below(clusters) * CLUSTER;
        let mut q = self.qemu.borrow_mut();
        let fs = q.fs_mut();
        let Some(original) = fs.get(&path).cloned() else {
            return;
        };
        let before = read_disk(fs, &path);
        let _ = fs.write_image(&path, offset, &[0xe7; CLUSTER as usize]);
        if read_disk(fs, &path) == before {
            fs.put(&path, original);
            return;
        }
        drop(q);
        self.corrupt.insert(path, original);
        self.stats.corrupted_images += 1;
    }

    fn repair_image(&mut self) {
        let paths: Vec<String> = self.corrupt.keys().cloned().collect();
        let Some(path) = self.pick(&paths) else {
            return;
        };
        if let Some(original) = self.corrupt.remove(&path) {
            self.qemu.borrow_mut().fs_mut().put(&path, original);
            self.stats.repaired_images += 1;
        }
    }

    /// Truncates a record; a new run of vbackup loads the others and lists it as damaged,
    /// with the backups built on it.
    fn damage_record(&mut self) -> Result<(), ManagedFailure> {
        let uuids = self.recorded.clone();
        let Some(uuid) = self.pick(&uuids) else {
            return Ok(());
        };
        let catalogue = self.machine.catalogue().clone();
        let Ok(affected) = catalogue.descendants(&uuid) else {
            return Err(self.fail(format!("no descendants of {uuid}")));
        };
        if let Some(text) = self.store.get_mut(&uuid) {
            let keep = text.len() / 2;
            text.truncate(keep);
        }
        for b in affected {
            self.damaged.insert(
                b.uuid.clone(),
                (
                    b.checkpoint.clone(),
                    b.disks.iter().map(|i| i.path.clone()).collect(),
                ),
            );
            self.points.remove(&b.uuid);
        }
        self.machine = self.rebuilt();
        self.recorded.retain(|u| !self.damaged.contains_key(u));
        let file = format!("backups/{uuid}.xml");
        if !self
            .machine
            .damaged()
            .iter()
            .any(|d| d.file == file && d.uuid.as_deref() == Some(uuid.as_str()))
        {
            return Err(self.fail(format!(
                "the truncated record {file} is not listed as damaged: {:?}",
                self.machine.damaged()
            )));
        }
        self.stats.damaged_records += 1;
        Ok(())
    }

    fn delete_damaged(&mut self) -> Result<(), ManagedFailure> {
        let uuids: Vec<String> = self.damaged.keys().cloned().collect();
        let Some(uuid) = self.pick(&uuids) else {
            return Ok(());
        };
        match self.ask(ManagedRequest::Delete {
            target: Some(uuid.clone()),
            with_children: false,
            keep_checkpoints: false,
        })? {
            Ok(ManagedReply::Deleted { uuids }) if uuids == vec![uuid.clone()] => {}
            other => return Err(self.fail(format!("deleting damaged record {uuid}: {other:?}"))),
        }
        if self.store.contains_key(&uuid) {
            return Err(self.fail(format!("the damaged record {uuid} is still stored")));
        }
        if let Some((checkpoint, images)) = self.damaged.remove(&uuid) {
            self.leaked_checkpoints.extend(checkpoint);
            self.leaked_images.extend(images);
        }
        self.stats.deleted_damaged += 1;
        Ok(())
    }

    // ----- checkers -----

    fn check(&mut self) -> Result<(), ManagedFailure> {
        if self.journal.is_some() || self.machine.journal().is_some() {
            return Err(self.fail("a journal is left after the operation answered"));
        }
        let rebuilt = self.rebuilt();
        if rebuilt.catalogue() != self.machine.catalogue() {
            return Err(self.fail("the stored catalogue differs from the one in memory"));
        }
        if rebuilt.damaged() != self.machine.damaged() {
            return Err(self.fail(format!(
                "the stored damaged records {:?} differ from those in memory {:?}",
                rebuilt.damaged(),
                self.machine.damaged()
            )));
        }
        let damaged: BTreeSet<&str> = self
            .machine
            .damaged()
            .iter()
            .filter_map(|d| d.uuid.as_deref())
            .collect();
        let want_damaged: BTreeSet<&str> = self.damaged.keys().map(String::as_str).collect();
        if damaged != want_damaged {
            return Err(self.fail(format!(
                "damaged records {damaged:?}, the history damaged {want_damaged:?}"
            )));
        }
        self.sync_model()?;
        let listed: Vec<&str> = self
            .machine
            .catalogue()
            .list(BackupListFilter::All)
            .iter()
            .map(|b| b.uuid.as_str())
            .collect();
        if listed != self.recorded {
            return Err(self.fail(format!(
                "the catalogue lists {listed:?}, they were recorded as {:?}",
                self.recorded
            )));
        }
        let catalogue = self.machine.catalogue().clone();
        if catalogue.latest().map(|b| &b.uuid) != self.recorded.last() {
            return Err(self.fail("latest is not the last recorded backup"));
        }
        // Images exist and their backing chains are the catalogue's chains.
        let mut named: BTreeSet<String> = self.leaked_images.clone();
        for (_, images) in self.damaged.values() {
            named.extend(images.iter().cloned());
        }
        for b in catalogue.list(BackupListFilter::All) {
            let chain = catalogue
                .chain(&b.uuid)
                .map_err(|e| self.fail(e.to_string()))?;
            for image in &b.disks {
                named.insert(image.path.clone());
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
        // Nothing is left that nothing names: no partial image, no temporary, no directory
        // of a failed backup.
        {
            let q = self.qemu.borrow();
            for p in q.fs().paths() {
                let engine = p.starts_with("/img/") || p.starts_with("/scratch/");
                if !engine && !named.contains(p) {
                    return Err(self.fail(format!("file {p} is left, and nothing names it")));
                }
            }
        }
        let target_prefix = format!("{TARGET}/");
        for d in &self.dirs {
            let used = named.iter().any(|p| parent_of(p) == d);
            if d.starts_with(&target_prefix) && !used {
                return Err(self.fail(format!("directory {d} is left, and nothing is in it")));
            }
            if d.starts_with(&format!("{RESTORES}/")) {
                return Err(self.fail(format!("restore directory {d} is left")));
            }
        }
        self.corrupt.retain(|p, _| named.contains(p));
        // The checkpoints are the backups', the damaged records', the leaked and the
        // history's own, each with its bitmaps.
        let mut want: BTreeSet<String> = self.own_checkpoints.clone();
        want.extend(self.leaked_checkpoints.iter().cloned());
        want.extend(self.damaged.values().filter_map(|(c, _)| c.clone()));
        want.extend(
            catalogue
                .list(BackupListFilter::All)
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
        let now = self.now().as_ms();
        let nodes = self
            .qemu
            .borrow_mut()
            .execute(
                now,
                &json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
            )
            .map_err(|e| self.fail(format!("query-named-block-nodes: {}", e.desc)))?;
        for (disk, node) in DISKS {
            let want: BTreeSet<String> = match disk {
                "vda" => want.difference(&self.forgotten_on_vda).cloned().collect(),
                _ => want.clone(),
            };
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

fn answer_of(ended: &Ended) -> Option<&Result<ManagedReply, ManagedError>> {
    match ended {
        Ended::Answered(a) => Some(a),
        Ended::Killed => None,
    }
}

/// The directory holding `path`.
fn parent_of(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

/// Writes `content` at `offset`, skipping clusters of zeroes (as `qemu-img convert` does).
fn write_sparse(
    fs: &mut FileSystem,
    path: &str,
    offset: u64,
    content: &[u8],
) -> Result<(), ManagedFailure> {
    for (i, chunk) in content.chunks(CLUSTER as usize).enumerate() {
        if chunk.iter().all(|b| *b == 0) {
            continue;
        }
        let at = offset + i as u64 * CLUSTER;
        if let Err(e) = fs.write_image(path, at, chunk) {
            return Err(ManagedFailure {
                seed: 0,
                step: 0,
                what: format!("writing {path}: {e}"),
            });
        }
    }
    Ok(())
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

fn digest(content: &[u8], kind: DigestKind) -> Digest {
    match kind {
        DigestKind::Sha256 => Digest::sha256(&Sha256::digest(content).into()),
        tree => BlockHashes::of_content(tree, content).digest(),
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}
