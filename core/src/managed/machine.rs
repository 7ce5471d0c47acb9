//! [`Managed`]: one domain's managed backups, one operation at a time, as a queue of steps.
//!
//! Each operation is planned as a queue of [`Step`]s when it is asked for; a step is either
//! carried out at once (a decision) or leaves as one effect whose result decides what comes
//! next (it may queue more steps). A failure replaces the rest of the queue with the
//! operation's cleanup (set by [`Step::OnFailure`] as the operation passes its phases), and
//! the first error is the answer.

use std::collections::{BTreeMap, VecDeque};

use crate::backup::{BackupMode, BackupStore, StoreKind};
use crate::catalogue::{
    BackupImage, BackupKind, Catalogue, CatalogueOp, DamagedRecord, DeleteMode, DigestKind,
    ManagedBackup, StoredRecord, validate_uuid,
};
use crate::checkpoint::{DeleteScope, ListFilter};
use crate::kernel::timers::TimerTable;
use crate::link::Timestamp;
use crate::model::ImageFormat;
use crate::protocol::{Reply, Request};

use super::effect::{DigestBase, Effect, EffectError, EffectId, Outcome};
use super::journal::{Journal, NewDomain, PendingBackup};
use super::{
    CallId, CreateRequest, DiskVerdict, ManagedError, ManagedInput, ManagedOutput, ManagedReply,
    ManagedRequest, RestoreRequest, RestoreTarget, RestoredDisk, StoredManaged,
};

/// How often a running push job is asked whether it ended.
const POLL_MS: u64 = 200;
/// Bound on the steps one operation may queue (a corrupted catalogue cannot make it loop).
const MAX_STEPS: usize = 100_000;

/// The machine's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Ask again whether the backup job ended.
    PollJob,
}

/// The journal as loaded or last written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JournalState {
    None,
    Intact(Journal),
    Damaged { file: String, reason: String },
}

/// One step of an operation.
#[derive(Debug, Clone)]
enum Step {
    /// Carry out an effect; a failure fails the operation.
    Do(Effect, String),
    /// Carry out an effect; a failure is ignored (cleanup).
    Try(Effect),
    /// From here on, a failure runs these steps instead of the rest.
    OnFailure(Vec<Step>),
    /// Fail the operation (the steps queued after it still run).
    Fail(ManagedError),
    /// Answer with this on success.
    Answer(ManagedReply),
    /// Digest an image; it must match `want`.
    Verify {
        path: String,
        want: crate::catalogue::Digest,
    },
    /// Digest an image for a verification verdict; never fails.
    Judge {
        disk: String,
        path: String,
        recorded: crate::catalogue::Digest,
    },
    /// Copy `source` into `into` ([`Effect::DigestCopy`]); the copy must match `want`.
    Copy {
        disk: String,
        source: String,
        into: String,
        format: ImageFormat,
        existing: bool,
        want: crate::catalogue::Digest,
    },
    /// Digest an image of the backup being recorded; `base` is the parent image it is built on.
    Describe {
        disk: String,
        path: String,
        base: Option<DigestBase>,
    },
    /// Refuse when a domain of this name exists.
    RefuseDomain(String),
    /// Refuse when a file exists.
    RefuseFile(String),
    /// End the running job (abort it and wait); `required`: fail when there is none.
    EndJob { required: bool },
    /// Wait until no job runs.
    WaitJobEnd,
    /// Answer "running" (and stop) while the job runs.
    ReportRunning(String),
    /// Record the pending backup if its job succeeded, else discard it (and with `strict`
    /// fail).
    Conclude {
        pending: PendingBackup,
        strict: bool,
    },
    /// A pending backup found by a new create: refused while its job runs, else concluded.
    ResolveStale(PendingBackup),
    /// Read the running pull backup's exports into the pending images.
    PullCopies {
        pending: PendingBackup,
        parents: BTreeMap<String, String>,
    },
    /// Build the pending backup's record from the described images and write it.
    Record(PendingBackup),
    /// Delete those of these checkpoints that exist, each alone.
    DeleteCheckpoints(Vec<String>),
    /// Remove these disks from every checkpoint's metadata.
    ForgetDisks(Vec<String>),
    /// Remove these disks from one checkpoint's metadata.
    ForgetDisksOf { name: String, disks: Vec<String> },
    /// Rename; a missing source counts as done (a repeated rename).
    RenameIfPresent {
        from: String,
        to: String,
        replace: bool,
    },
    /// Build the consolidated record from the copies and commit the consolidation.
    CommitConsolidation {
        uuid: String,
        renames: Vec<(String, String)>,
    },
    /// Commit a restore: journal it, rename into place, repair checkpoints, define.
    CommitRestore {
        renames: Vec<(String, String)>,
        forget_disks: Vec<String>,
        define: Option<NewDomain>,
    },
}

/// The operation in flight.
#[derive(Debug)]
struct Op {
    call: Option<CallId>,
    todo: VecDeque<Step>,
    current: Option<(EffectId, Step)>,
    waiting: bool,
    failed: Option<ManagedError>,
    on_failure: Vec<Step>,
    reply: ManagedReply,
    described: Vec<BackupImage>,
    copied: BTreeMap<String, super::ImageFacts>,
    verdicts: Vec<DiskVerdict>,
    queued: usize,
}

impl Op {
    fn new(call: Option<CallId>, steps: Vec<Step>) -> Self {
        let queued = steps.len();
        Self {
            call,
            todo: steps.into(),
            current: None,
            waiting: false,
            failed: None,
            on_failure: Vec::new(),
            reply: ManagedReply::Done,
            described: Vec::new(),
            copied: BTreeMap::new(),
            verdicts: Vec::new(),
            queued,
        }
    }

    /// Queues steps to run next, in order.
    fn next(&mut self, steps: Vec<Step>) {
        self.queued = self.queued.saturating_add(steps.len());
        for s in steps.into_iter().rev() {
            self.todo.push_front(s);
        }
    }

    fn fail(&mut self, e: ManagedError) {
        if self.failed.is_none() {
            self.failed = Some(e);
            self.todo = std::mem::take(&mut self.on_failure).into();
        } else {
            // A failure while cleaning up: stop, so the journal stays for the next run.
            self.todo.clear();
        }
    }
}

/// The managed backups of one domain. See the module documentation for the contract.
#[derive(Debug)]
pub struct Managed {
    domain: String,
    /// Every parsed record (intact or not), by uuid.
    records: BTreeMap<String, ManagedBackup>,
    /// The record file of each uuid.
    files: BTreeMap<String, String>,
    /// Records that do not even parse.
    unreadable: Vec<DamagedRecord>,
    default_target: Option<String>,
    catalogue: Catalogue,
    damaged: Vec<DamagedRecord>,
    journal: JournalState,
    op: Option<Op>,
    next_effect: u64,
    timers: TimerTable<Timer>,
}

fn is_running(reply: &Reply) -> bool {
    matches!(reply, Reply::Stats(Some(st)) if st.success.is_none())
}

/// The directory holding `path` and its file name.
fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (if dir.is_empty() { "/" } else { dir }, name),
        None => (".", path),
    }
}

/// Where the new file for `path` is written before it is renamed into place.
fn temporary(path: &str) -> String {
    let (dir, name) = split(path);
    format!("{}/.{name}.vbackup-new", dir.trim_end_matches('/'))
}

impl Managed {
    /// Rebuilds the machine of `domain` from what the store holds. Damaged records are kept
    /// aside ([`Managed::damaged`]); a journal left by an interrupted run is concluded before
    /// the next operation.
    pub fn new(domain: impl Into<String>, stored: StoredManaged) -> Self {
        let domain = domain.into();
        let mut records = BTreeMap::new();
        let mut files = BTreeMap::new();
        let mut unreadable = Vec::new();
        for mut r in stored.records {
            match r.take_record() {
                Ok(b) if r.uuid.as_ref().is_none_or(|u| *u == b.uuid) => {
                    files.insert(b.uuid.clone(), r.file.clone());
                    records.insert(b.uuid.clone(), b);
                }
                Ok(b) => unreadable.push(DamagedRecord {
                    uuid: r.uuid.clone(),
                    file: r.file,
                    reason: format!("it describes backup '{}'", b.uuid),
                }),
                Err(e) => unreadable.push(DamagedRecord {
                    uuid: r.uuid,
                    file: r.file,
                    reason: format!("it does not parse: {e}"),
                }),
            }
        }
        let journal = match stored.journal {
            None => JournalState::None,
            Some((file, text)) => match Journal::parse(&text) {
                Ok(j) => JournalState::Intact(j),
                Err(reason) => JournalState::Damaged { file, reason },
            },
        };
        let mut m = Self {
            catalogue: Catalogue::new(domain.clone()),
            domain,
            records,
            files,
            unreadable,
            default_target: stored.default_target,
            damaged: Vec::new(),
            journal,
            op: None,
            next_effect: 0,
            timers: TimerTable::default(),
        };
        m.rebuild();
        m
    }

    /// The intact backups.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The records that could not be loaded, each naming its file.
    pub fn damaged(&self) -> &[DamagedRecord] {
        &self.damaged
    }

    /// The journal of the operation in flight (or left by an interrupted run), if intact.
    pub fn journal(&self) -> Option<&Journal> {
        match &self.journal {
            JournalState::Intact(j) => Some(j),
            _ => None,
        }
    }

    /// The backup being created, if any.
    pub fn pending(&self) -> Option<&PendingBackup> {
        match &self.journal {
            JournalState::Intact(Journal::Create(p)) => Some(p),
            _ => None,
        }
    }

    /// Whether an operation is in flight.
    pub fn busy(&self) -> bool {
        self.op.is_some()
    }

    /// When the machine wants a [`ManagedInput::Tick`].
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    fn rebuild(&mut self) {
        // The records are parsed once, when the machine is made: they are handed over as
        // they are, not formatted and parsed again.
        let stored = self.records.values().map(|b| {
            let file = self
                .files
                .get(&b.uuid)
                .cloned()
                .unwrap_or_else(|| format!("{}.xml", b.uuid));
            let mut stored = StoredRecord::new(file, String::new());
            stored.uuid = Some(b.uuid.clone());
            (stored, b.clone())
        });
        let (catalogue, mut damaged) =
            Catalogue::load_parsed(self.domain.clone(), stored, self.default_target.clone());
        damaged.extend(self.unreadable.iter().cloned());
        damaged.sort();
        self.catalogue = catalogue;
        self.damaged = damaged;
    }

    /// The one entry point: consumes an input, returns what to do, in order.
    pub fn handle(&mut self, now: Timestamp, input: ManagedInput) -> Vec<ManagedOutput> {
        let mut out = Vec::new();
        match input {
            ManagedInput::Request(call, request) => {
                if self.op.is_some() {
                    out.push(ManagedOutput::Respond(
                        call,
                        Err(ManagedError::Busy(
                            "another managed-backup operation of this domain is in flight".into(),
                        )),
                    ));
                    return out;
                }
                match self.plan(now, request) {
                    Ok(steps) => self.op = Some(Op::new(Some(call), steps)),
                    Err(e) => {
                        out.push(ManagedOutput::Respond(call, Err(e)));
                        return out;
                    }
                }
            }
            ManagedInput::Done(id, result) => {
                let step = match self.op.as_mut() {
                    Some(op) if op.current.as_ref().is_some_and(|(c, _)| *c == id) => {
                        op.current.take().map(|(_, s)| s)
                    }
                    _ => None,
                };
                if let Some(step) = step {
                    self.finish_step(now, step, result);
                }
            }
            ManagedInput::JobEnded => {
                if self.timers.clear(&Timer::PollJob)
                    && let Some(op) = self.op.as_mut()
                {
                    op.waiting = false;
                }
            }
            ManagedInput::Tick => {
                for t in self.timers.take_expired(now) {
                    match t {
                        Timer::PollJob => {
                            if let Some(op) = self.op.as_mut() {
                                op.waiting = false;
                            }
                        }
                    }
                }
            }
        }
        self.pump(&mut out);
        out
    }

    /// Carries out decisions until an effect leaves or the operation ends.
    fn pump(&mut self, out: &mut Vec<ManagedOutput>) {
        while let Some(mut op) = self.op.take() {
            if op.current.is_some() || op.waiting {
                self.op = Some(op);
                return;
            }
            if op.queued > MAX_STEPS {
                op.fail(ManagedError::Unexpected(
                    "an operation that does not end".into(),
                ));
                op.todo.clear();
            }
            let Some(step) = op.todo.pop_front() else {
                if let Some(call) = op.call {
                    let answer = match op.failed {
                        Some(e) => Err(e),
                        None => {
                            let mut reply = op.reply;
                            if let ManagedReply::Verified { disks, .. } = &mut reply {
                                *disks = op.verdicts;
                            }
                            Ok(reply)
                        }
                    };
                    out.push(ManagedOutput::Respond(call, answer));
                }
                return;
            };
            match step {
                Step::OnFailure(steps) => op.on_failure = steps,
                Step::Fail(e) => {
                    if op.failed.is_none() {
                        op.failed = Some(e);
                    }
                }
                Step::Answer(r) => op.reply = r,
                Step::Record(pending) => self.record(&mut op, pending),
                Step::CommitConsolidation { uuid, renames } => {
                    self.commit_consolidation(&mut op, &uuid, renames)
                }
                Step::CommitRestore {
                    renames,
                    forget_disks,
                    define,
                } => op.next(commit_restore_steps(renames, forget_disks, define)),
                step => {
                    if let Some(effect) = effect_of(&step) {
                        self.next_effect += 1;
                        let id = EffectId(self.next_effect);
                        op.current = Some((id, step));
                        out.push(ManagedOutput::Effect(id, effect));
                    }
                }
            }
            self.op = Some(op);
        }
    }

    /// Keeps the machine's picture of the store in step with a stored change.
    fn stored(&mut self, effect: &Effect) {
        match effect {
            Effect::PutRecord(b) => {
                self.records.insert(b.uuid.clone(), (**b).clone());
                self.rebuild();
            }
            Effect::DeleteRecord { uuid } => {
                self.records.remove(uuid);
                self.files.remove(uuid);
                self.unreadable.retain(|d| d.uuid.as_deref() != Some(uuid));
                self.rebuild();
            }
            Effect::SetDefaultTarget(t) => {
                self.default_target = t.clone();
                self.rebuild();
            }
            Effect::PutJournal(j) => self.journal = JournalState::Intact((**j).clone()),
            Effect::ClearJournal => self.journal = JournalState::None,
            _ => {}
        }
    }

    fn finish_step(&mut self, now: Timestamp, step: Step, result: Result<Outcome, EffectError>) {
        let Some(mut op) = self.op.take() else {
            return;
        };
        self.decide(&mut op, now, step, result);
        self.op = Some(op);
    }

    fn decide(
        &mut self,
        op: &mut Op,
        now: Timestamp,
        step: Step,
        result: Result<Outcome, EffectError>,
    ) {
        let effect_failed = |what: String, error: EffectError| ManagedError::Effect { what, error };
        match step {
            Step::Do(effect, what) => match result {
                Ok(_) => self.stored(&effect),
                Err(e) => op.fail(effect_failed(what, e)),
            },
            Step::Try(effect) => {
                if result.is_ok() {
                    self.stored(&effect);
                }
            }
            Step::Verify { path, want } => match result {
                Ok(Outcome::Facts(f)) if f.digest == want => {}
                Ok(Outcome::Facts(f)) => op.fail(ManagedError::DigestMismatch {
                    path,
                    recorded: want,
                    found: f.digest,
                }),
                Ok(_) => op.fail(ManagedError::Unexpected(format!("reading '{path}'"))),
                Err(e) => op.fail(effect_failed(format!("cannot read image '{path}'"), e)),
            },
            Step::Judge {
                disk,
                path,
                recorded,
            } => {
                let found = match result {
                    Ok(Outcome::Facts(f)) => Ok(f.digest),
                    Ok(_) => Err("unexpected answer".to_owned()),
                    Err(e) => Err(e.to_string()),
                };
                op.verdicts.push(DiskVerdict {
                    disk,
                    path,
                    recorded,
                    found,
                });
            }
            Step::Copy {
                disk,
                source,
                into,
                want,
                ..
            } => match result {
                Ok(Outcome::Facts(f)) if f.digest == want => {
                    op.copied.insert(disk, f);
                }
                Ok(Outcome::Facts(f)) => op.fail(ManagedError::DigestMismatch {
                    path: source,
                    recorded: want,
                    found: f.digest,
                }),
                Ok(_) => op.fail(ManagedError::Unexpected(format!("copying '{source}'"))),
                Err(e) => op.fail(effect_failed(
                    format!("cannot copy '{source}' into '{into}'"),
                    e,
                )),
            },
            Step::Describe { disk, path, .. } => match result {
                Ok(Outcome::Facts(f)) => op.described.push(BackupImage {
                    disk,
                    path,
                    format: f.format,
                    virtual_size_bytes: f.virtual_size_bytes,
                    allocated_size_bytes: f.allocated_size_bytes,
                    digest: f.digest,
                }),
                Ok(_) => op.fail(ManagedError::Unexpected(format!("reading '{path}'"))),
                Err(e) => op.fail(effect_failed(format!("cannot read image '{path}'"), e)),
            },
            Step::RefuseDomain(name) => match result {
                Ok(Outcome::Exists(false)) => {}
                Ok(Outcome::Exists(true)) => op.fail(ManagedError::DomainExists(name)),
                Ok(_) => op.fail(ManagedError::Unexpected("a domain lookup".into())),
                Err(e) => op.fail(effect_failed(format!("cannot look domain '{name}' up"), e)),
            },
            Step::RefuseFile(path) => match result {
                Ok(Outcome::Exists(false)) => {}
                Ok(Outcome::Exists(true)) => op.fail(ManagedError::Invalid(format!(
                    "'{path}' exists; a restore never replaces a file (use another --dir)"
                ))),
                Ok(_) => op.fail(ManagedError::Unexpected("a file lookup".into())),
                Err(e) => op.fail(effect_failed(format!("cannot look '{path}' up"), e)),
            },
            Step::EndJob { required } => match result {
                Ok(Outcome::Reply(r)) if is_running(&r) => op.next(vec![
                    Step::Do(Effect::Domain(Request::AbortJob), "ending the job".into()),
                    Step::WaitJobEnd,
                ]),
                Ok(_) if required => op.fail(ManagedError::NoJob),
                Ok(_) => {}
                Err(e) => op.fail(effect_failed("asking for the job".into(), e)),
            },
            Step::WaitJobEnd => match result {
                Ok(Outcome::Reply(r)) if is_running(&r) => {
                    op.next(vec![Step::WaitJobEnd]);
                    op.waiting = true;
                    self.timers.set(Timer::PollJob, now.plus_ms(POLL_MS));
                }
                Ok(_) => {}
                Err(e) => op.fail(effect_failed("asking for the job".into(), e)),
            },
            Step::ReportRunning(uuid) => match result {
                Ok(Outcome::Reply(r)) if is_running(&r) => {
                    op.todo.clear();
                    op.reply = ManagedReply::Running { uuid };
                }
                Ok(_) => {}
                Err(e) => op.fail(effect_failed("asking for the job".into(), e)),
            },
            Step::ResolveStale(pending) => match result {
                Ok(Outcome::Reply(r)) if is_running(&r) => op.fail(ManagedError::Busy(format!(
                    "managed backup {} is still running; finish it with backup-finish",
                    pending.uuid
                ))),
                Ok(_) => op.next(vec![Step::Conclude {
                    pending,
                    strict: false,
                }]),
                Err(e) => op.fail(effect_failed("asking for the job".into(), e)),
            },
            Step::Conclude { pending, strict } => {
                if let Some(b) = self.catalogue.get(&pending.uuid) {
                    // Recorded before the journal could be cleared.
                    op.next(vec![
                        Step::Do(Effect::ClearJournal, "cannot clear the journal".into()),
                        Step::Answer(ManagedReply::Created(Box::new(b.clone()))),
                    ]);
                    return;
                }
                let stats = match result {
                    Ok(Outcome::Reply(Reply::Stats(s))) => s,
                    Ok(_) => None,
                    Err(e) => {
                        op.fail(effect_failed("asking how the job ended".into(), e));
                        return;
                    }
                };
                let succeeded = !pending.pull
                    && pending.begun
                    && stats.as_ref().is_some_and(|s| s.success == Some(true));
                if succeeded {
                    let steps = record_steps(&self.catalogue, &pending);
                    op.on_failure = discard_steps(&pending);
                    op.next(steps);
                } else {
                    let mut steps = discard_steps(&pending);
                    if strict {
                        steps.push(Step::Fail(if pending.pull {
                            ManagedError::PullInterrupted(pending.uuid.clone())
                        } else {
                            ManagedError::JobFailed {
                                uuid: pending.uuid.clone(),
                                why: stats.and_then(|s| s.errmsg),
                            }
                        }));
                    }
                    op.next(steps);
                }
            }
            Step::PullCopies { pending, parents } => {
                let plan = match result {
                    Ok(Outcome::Reply(Reply::Backup(plan))) => plan,
                    Ok(_) => {
                        op.fail(ManagedError::Unexpected("a backup query".into()));
                        return;
                    }
                    Err(e) => {
                        op.fail(effect_failed("asking for the running backup".into(), e));
                        return;
                    }
                };
                let mut steps = Vec::new();
                for (disk, path) in &pending.images {
                    let Some(d) = plan.disks.iter().find(|d| &d.target == disk) else {
                        op.fail(ManagedError::Unexpected(format!(
                            "disk '{disk}' is not in the backup job"
                        )));
                        return;
                    };
                    let backing = parents.get(disk).cloned();
                    steps.push(Step::Do(
                        Effect::CopyPull {
                            export: d.export_name.clone().unwrap_or_else(|| disk.clone()),
                            dirty_bitmap: backing.as_ref().and(d.temp_bitmap.clone()),
                            into: path.clone(),
                            backing,
                        },
                        format!("disk '{disk}'"),
                    ));
                }
                op.next(steps);
            }
            Step::DeleteCheckpoints(names) => match result {
                Ok(Outcome::Reply(Reply::CheckpointNames(have))) => {
                    let names: Vec<String> =
                        names.into_iter().filter(|n| have.contains(n)).collect();
                    if !names.is_empty() {
                        let list = names.join("', '");
                        op.next(vec![Step::Do(
                            Effect::Domain(Request::CheckpointDeleteEach { names }),
                            format!("cannot delete checkpoint '{list}'"),
                        )]);
                    }
                }
                Ok(_) => op.fail(ManagedError::Unexpected("a checkpoint listing".into())),
                Err(e) => op.fail(effect_failed("listing checkpoints".into(), e)),
            },
            Step::ForgetDisks(disks) => match result {
                Ok(Outcome::Reply(Reply::CheckpointNames(have))) => {
                    let steps = have
                        .into_iter()
                        .map(|name| Step::ForgetDisksOf {
                            name,
                            disks: disks.clone(),
                        })
                        .collect();
                    op.next(steps);
                }
                Ok(_) => op.fail(ManagedError::Unexpected("a checkpoint listing".into())),
                Err(e) => op.fail(effect_failed("listing checkpoints".into(), e)),
            },
            Step::ForgetDisksOf { name, disks } => {
                if let Ok(Outcome::Reply(Reply::Checkpoint(c))) = result {
                    let touched = c.bitmap_disks().any(|(d, _)| disks.iter().any(|x| x == d));
                    let kept = c.bitmap_disks().any(|(d, _)| !disks.iter().any(|x| x == d));
                    if touched && kept {
                        let mut c = *c;
                        for d in &mut c.disks {
                            if disks.contains(&d.target) {
                                d.bitmap = None;
                            }
                        }
                        op.next(vec![Step::Do(
                            Effect::Domain(Request::CheckpointRedefine {
                                checkpoint: c,
                                validate: false,
                            }),
                            format!("cannot update checkpoint '{name}'"),
                        )]);
                    } else if touched {
                        op.next(vec![Step::Do(
                            Effect::Domain(Request::CheckpointDelete {
                                name: name.clone(),
                                scope: DeleteScope::Single,
                                metadata_only: true,
                            }),
                            format!("cannot delete the metadata of checkpoint '{name}'"),
                        )]);
                    }
                }
                // A checkpoint gone meanwhile needs nothing.
            }
            Step::RenameIfPresent { from, to, .. } => match result {
                Ok(_) | Err(EffectError::NotFound(_)) => {}
                Err(e) => op.fail(effect_failed(
                    format!("cannot rename '{from}' to '{to}'"),
                    e,
                )),
            },
            // Decisions never wait for an effect.
            Step::OnFailure(_)
            | Step::Fail(_)
            | Step::Answer(_)
            | Step::Record(_)
            | Step::CommitConsolidation { .. }
            | Step::CommitRestore { .. } => {}
        }
    }

    fn record(&self, op: &mut Op, pending: PendingBackup) {
        let mut disks = Vec::new();
        for (disk, _) in &pending.images {
            match op.described.iter().find(|d| &d.disk == disk) {
                Some(d) => disks.push(d.clone()),
                None => {
                    op.fail(ManagedError::Unexpected(format!(
                        "disk '{disk}' undescribed"
                    )));
                    return;
                }
            }
        }
        op.described.clear();
        let backup = ManagedBackup {
            uuid: pending.uuid.clone(),
            domain: self.domain.clone(),
            parent: pending.parent.clone(),
            checkpoint: Some(pending.checkpoint.clone()),
            creation_time: pending.creation_time,
            sequence: Some(self.catalogue.next_sequence()),
            description: pending.description.clone(),
            kind: if pending.parent.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            disks,
        };
        if let Err(e) = self.catalogue.clone().insert(backup.clone()) {
            op.fail(e.into());
            return;
        }
        op.next(vec![
            Step::Do(
                Effect::PutRecord(Box::new(backup.clone())),
                format!("cannot record backup {}", backup.uuid),
            ),
            // Recorded: nothing may discard it any more.
            Step::OnFailure(Vec::new()),
            Step::Do(Effect::ClearJournal, "cannot clear the journal".into()),
            Step::Answer(ManagedReply::Created(Box::new(backup))),
        ]);
    }

    fn commit_consolidation(&self, op: &mut Op, uuid: &str, renames: Vec<(String, String)>) {
        let mut planned = self.catalogue.clone();
        let ops = match planned.consolidate(uuid) {
            Ok(ops) => ops,
            Err(e) => {
                op.fail(e.into());
                return;
            }
        };
        let Some(CatalogueOp::PutBackup(record)) = ops.last() else {
            return;
        };
        let mut record = (**record).clone();
        for image in &mut record.disks {
            if let Some(f) = op.copied.get(&image.disk) {
                image.allocated_size_bytes = f.allocated_size_bytes;
                image.virtual_size_bytes = f.virtual_size_bytes;
            }
        }
        let journal = Journal::Replace {
            renames: renames.clone(),
            committed: true,
            record: Some(record.format()),
            forget_disks: Vec::new(),
            define: None,
        };
        let mut steps = vec![
            Step::Do(
                Effect::PutJournal(Box::new(journal)),
                "cannot write the journal".into(),
            ),
            // Committed: a later run finishes it; nothing is undone any more.
            Step::OnFailure(Vec::new()),
        ];
        steps.extend(renames.into_iter().map(|(from, to)| Step::RenameIfPresent {
            from,
            to,
            replace: true,
        }));
        steps.push(Step::Do(
            Effect::PutRecord(Box::new(record.clone())),
            format!("cannot rewrite the record of {uuid}"),
        ));
        steps.push(Step::Do(
            Effect::ClearJournal,
            "cannot clear the journal".into(),
        ));
        steps.push(Step::Answer(ManagedReply::Consolidated {
            backup: Box::new(record),
            changed: true,
        }));
        op.next(steps);
    }

    // ----- planning -----

    fn plan(&self, now: Timestamp, request: ManagedRequest) -> Result<Vec<Step>, ManagedError> {
        if let JournalState::Damaged { file, reason } = &self.journal {
            match request {
                ManagedRequest::Finish { cancel: true, .. } => {
                    return Ok(vec![
                        Step::EndJob { required: false },
                        Step::Do(Effect::ClearJournal, "cannot remove the journal".into()),
                        Step::Answer(ManagedReply::Cancelled { uuid: None }),
                    ]);
                }
                ManagedRequest::Verify { .. } => {}
                _ => {
                    return Err(ManagedError::DamagedJournal {
                        file: file.clone(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        // A deletion or replacement an interrupted run left is finished (or undone) first.
        let superseding = matches!(request, ManagedRequest::Delete { .. });
        let mut steps = match &self.journal {
            JournalState::Intact(j @ (Journal::Delete { .. } | Journal::Replace { .. })) => {
                self.recovery_steps(j, superseding)
            }
            _ => Vec::new(),
        };
        let mut pending = self.pending().cloned();
        let mut recorded = None;
        if let Some(p) = &pending
            && let Some(b) = self.catalogue.get(&p.uuid)
        {
            // Recorded before the journal could be cleared: only the journal is left.
            steps.push(Step::Do(
                Effect::ClearJournal,
                "cannot clear the journal".into(),
            ));
            recorded = Some(b.clone());
            pending = None;
        }
        let rest = match request {
            ManagedRequest::Create(req) => self.plan_create(now, *req, pending)?,
            ManagedRequest::Finish { cancel, check } => match recorded {
                Some(b) => vec![Step::Answer(ManagedReply::Created(Box::new(b)))],
                None => Self::plan_finish(pending, cancel, check),
            },
            ManagedRequest::Verify { uuid } => self.plan_verify(&uuid)?,
            ManagedRequest::Delete {
                target,
                with_children,
                keep_checkpoints,
            } => self.plan_delete(
                target.as_deref(),
                with_children,
                keep_checkpoints,
                pending.as_ref(),
                true,
            )?,
            ManagedRequest::Consolidate { uuid } => {
                if let Some(p) = &pending {
                    return Err(ManagedError::Busy(format!(
                        "managed backup {} of domain '{}' is in flight; consolidate once it ended",
                        p.uuid, self.domain
                    )));
                }
                self.plan_consolidate(&uuid)?
            }
            ManagedRequest::Restore(req) => self.plan_restore(*req)?,
            ManagedRequest::SetDefaultTarget(t) => {
                self.catalogue.clone().set_default_target(t.clone())?;
                vec![Step::Do(
                    Effect::SetDefaultTarget(t),
                    "cannot record the default target".into(),
                )]
            }
        };
        steps.extend(rest);
        Ok(steps)
    }

    fn require(&self, uuid: &str) -> Result<&ManagedBackup, ManagedError> {
        if let Some(b) = self.catalogue.get(uuid) {
            return Ok(b);
        }
        if let Some(d) = self
            .damaged
            .iter()
            .find(|d| d.uuid.as_deref() == Some(uuid))
        {
            return Err(ManagedError::Damaged {
                uuid: uuid.to_owned(),
                file: d.file.clone(),
                reason: d.reason.clone(),
            });
        }
        Err(crate::catalogue::CatalogueError::NotFound(uuid.to_owned()).into())
    }

    /// What finishes (or undoes) what an interrupted run journaled. A deletion is repeated,
    /// unless `superseding`: a new deletion then replaces it (after the files of the records
    /// already deleted are removed).
    fn recovery_steps(&self, journal: &Journal, superseding: bool) -> Vec<Step> {
        match journal {
            Journal::Create(_) => Vec::new(),
            Journal::Delete {
                target,
                with_children,
                keep_checkpoints,
                files,
                dirs,
            } => {
                // The files and directories of records already deleted go first (nothing
                // names them any more); what is still catalogued is deleted as planned anew.
                let named = |path: &str| {
                    self.catalogue
                        .list(crate::catalogue::BackupListFilter::All)
                        .iter()
                        .any(|b| b.disks.iter().any(|i| i.path == path))
                };
                let mut steps: Vec<Step> = files
                    .iter()
                    .filter(|f| !named(f))
                    .map(|path| Step::Try(Effect::Remove { path: path.clone() }))
                    .collect();
                steps.extend(
                    dirs.iter()
                        .map(|path| Step::Try(Effect::RemoveDir { path: path.clone() })),
                );
                let gone = target
                    .as_deref()
                    .is_some_and(|t| self.catalogue.get(t).is_none());
                let again = if gone || superseding {
                    Vec::new()
                } else {
                    self.plan_delete(
                        target.as_deref(),
                        *with_children,
                        *keep_checkpoints,
                        None,
                        false,
                    )
                    .unwrap_or_default()
                };
                if again.is_empty() {
                    steps.push(Step::Do(
                        Effect::ClearJournal,
                        "cannot clear the journal".into(),
                    ));
                }
                steps.extend(again);
                steps
            }
            Journal::Replace {
                renames,
                committed: false,
                ..
            } => {
                let mut steps: Vec<Step> = renames
                    .iter()
                    .map(|(from, _)| Step::Try(Effect::Remove { path: from.clone() }))
                    .collect();
                steps.push(Step::Do(
                    Effect::ClearJournal,
                    "cannot clear the journal".into(),
                ));
                steps
            }
            Journal::Replace {
                renames,
                committed: true,
                record,
                forget_disks,
                define,
            } => {
                let mut steps: Vec<Step> = renames
                    .iter()
                    .map(|(from, to)| Step::RenameIfPresent {
                        from: from.clone(),
                        to: to.clone(),
                        replace: true,
                    })
                    .collect();
                if let Some(b) = record.as_deref().and_then(|t| ManagedBackup::parse(t).ok()) {
                    steps.push(Step::Do(
                        Effect::PutRecord(Box::new(b)),
                        "cannot rewrite a record".into(),
                    ));
                }
                if !forget_disks.is_empty() {
                    steps.push(Step::ForgetDisks(forget_disks.clone()));
                }
                if let Some(d) = define {
                    steps.push(Step::Try(define_effect(d)));
                }
                steps.push(Step::Do(
                    Effect::ClearJournal,
                    "cannot clear the journal".into(),
                ));
                steps
            }
        }
    }

    fn plan_create(
        &self,
        now: Timestamp,
        req: CreateRequest,
        stale: Option<PendingBackup>,
    ) -> Result<Vec<Step>, ManagedError> {
        let CreateRequest {
            uuid,
            checkpoint,
            mut spec,
            parent,
            description,
            target,
            wait,
        } = req;
        validate_uuid(&uuid)?;
        if self.catalogue.get(&uuid).is_some() {
            return Err(crate::catalogue::CatalogueError::Duplicate(uuid).into());
        }
        let parent = match &parent {
            Some(p) => Some(self.require(p)?.clone()),
            None => None,
        };
        if let (Some(p), Some(s)) = (&parent, &stale)
            && s.uuid == p.uuid
        {
            return Err(ManagedError::Invalid(format!(
                "backup '{}' is not recorded yet",
                p.uuid
            )));
        }
        let from = match &parent {
            Some(p) => Some(p.checkpoint.clone().ok_or_else(|| {
                ManagedError::Invalid(format!(
                    "backup '{}' has no checkpoint to be incremental from",
                    p.uuid
                ))
            })?),
            None => None,
        };
        let target = target.or_else(|| self.catalogue.default_target().map(str::to_owned));
        if let Some(t) = &target
            && (!t.starts_with('/') || t.split('/').any(|c| c == ".."))
        {
            return Err(crate::catalogue::CatalogueError::RelativeTarget(t.clone()).into());
        }
        let pull = spec.mode == BackupMode::Pull;
        let dir = target
            .as_deref()
            .map(|t| format!("{}/{uuid}", t.trim_end_matches('/')));
        let mut uses_dir = false;
        let mut images = Vec::new();
        let mut parents = BTreeMap::new();
        spec.incremental = from.clone();
        for disk in spec.disks.iter_mut().filter(|d| d.backup) {
            if let Some(p) = &parent {
                let Some(img) = p.image(&disk.target) else {
                    return Err(ManagedError::Invalid(format!(
                        "parent backup '{}' has no image of disk '{}'",
                        p.uuid, disk.target
                    )));
                };
                parents.insert(disk.target.clone(), img.path.clone());
            }
            disk.incremental = from.clone();
            let given = if pull {
                None
            } else {
                disk.store.as_ref().and_then(|s| s.path.clone())
            };
            let path = match given {
                Some(p) => p,
                None => {
                    let Some(dir) = &dir else {
                        return Err(ManagedError::Invalid(format!(
                            "disk '{}' has no target and domain '{}' has no default backup target (see backup-set-default-target)",
                            disk.target, self.domain
                        )));
                    };
                    uses_dir = true;
                    format!("{dir}/{}.qcow2", disk.target)
                }
            };
            if !pull {
                disk.store = Some(BackupStore {
                    kind: StoreKind::File,
                    path: Some(path.clone()),
                    format: Some(ImageFormat::Qcow2),
                });
            }
            images.push((disk.target.clone(), path));
        }
        if images.is_empty() {
            return Err(ManagedError::Invalid("the backup includes no disk".into()));
        }
        let mut pending = PendingBackup {
            uuid: uuid.clone(),
            parent: parent.as_ref().map(|p| p.uuid.clone()),
            checkpoint: checkpoint.name.clone(),
            description,
            creation_time: now.as_ms() / 1000,
            pull,
            images,
            dir: dir.filter(|_| uses_dir),
            begun: false,
        };
        let mut steps = Vec::new();
        if let Some(stale) = stale {
            steps.push(Step::ResolveStale(stale));
        }
        steps.push(Step::Do(
            Effect::PutJournal(Box::new(Journal::Create(pending.clone()))),
            "cannot write the journal".into(),
        ));
        steps.push(Step::OnFailure(vec![Step::Try(Effect::ClearJournal)]));
        if let Some(d) = &pending.dir {
            // The target directory itself is never created: only the backup's own one.
            steps.push(Step::Do(
                Effect::CreateDir {
                    path: d.clone(),
                    parents: false,
                },
                format!("cannot create '{d}' (the backup target directory must exist)"),
            ));
        }
        steps.push(Step::OnFailure(discard_steps(&pending)));
        pending.begun = true;
        steps.push(Step::Do(
            Effect::PutJournal(Box::new(Journal::Create(pending.clone()))),
            "cannot write the journal".into(),
        ));
        steps.push(Step::OnFailure(discard_steps(&pending)));
        steps.push(Step::Do(
            Effect::Domain(Request::BackupBegin {
                spec,
                checkpoint: Some(checkpoint),
                reuse_external: false,
            }),
            "cannot begin the backup".into(),
        ));
        if pull {
            steps.push(Step::PullCopies {
                pending: pending.clone(),
                parents,
            });
            steps.push(Step::EndJob { required: false });
            steps.extend(record_steps(&self.catalogue, &pending));
        } else if wait {
            steps.push(Step::WaitJobEnd);
            steps.push(Step::Conclude {
                pending,
                strict: true,
            });
        } else {
            steps.push(Step::OnFailure(Vec::new()));
            steps.push(Step::Answer(ManagedReply::Started { uuid }));
        }
        Ok(steps)
    }

    fn plan_finish(pending: Option<PendingBackup>, cancel: bool, check: bool) -> Vec<Step> {
        let Some(pending) = pending else {
            return if cancel {
                vec![
                    Step::EndJob { required: true },
                    Step::Answer(ManagedReply::Cancelled { uuid: None }),
                ]
            } else {
                vec![Step::Fail(ManagedError::NoJob)]
            };
        };
        if cancel {
            let mut steps = discard_steps(&pending);
            steps.push(Step::Answer(ManagedReply::Cancelled {
                uuid: Some(pending.uuid),
            }));
            return steps;
        }
        if pending.pull {
            // The process reading it is gone: what it stored is incomplete.
            let mut steps = discard_steps(&pending);
            steps.push(Step::Fail(ManagedError::PullInterrupted(pending.uuid)));
            return steps;
        }
        let mut steps = Vec::new();
        if check {
            steps.push(Step::ReportRunning(pending.uuid.clone()));
        }
        steps.push(Step::WaitJobEnd);
        steps.push(Step::Conclude {
            pending,
            strict: true,
        });
        steps
    }

    fn plan_verify(&self, uuid: &str) -> Result<Vec<Step>, ManagedError> {
        let b = self.require(uuid)?;
        let mut steps: Vec<Step> = b
            .disks
            .iter()
            .map(|d| Step::Judge {
                disk: d.disk.clone(),
                path: d.path.clone(),
                recorded: d.digest.clone(),
            })
            .collect();
        steps.push(Step::Answer(ManagedReply::Verified {
            uuid: uuid.to_owned(),
            disks: Vec::new(),
        }));
        Ok(steps)
    }

    fn plan_delete(
        &self,
        target: Option<&str>,
        with_children: bool,
        keep_checkpoints: bool,
        pending: Option<&PendingBackup>,
        answer: bool,
    ) -> Result<Vec<Step>, ManagedError> {
        if let Some(t) = target
            && self.catalogue.get(t).is_none()
            && self.damaged.iter().any(|d| d.uuid.as_deref() == Some(t))
        {
            // A damaged record: only its file goes (its images are not known).
            return Ok(vec![
                Step::Do(
                    Effect::DeleteRecord { uuid: t.to_owned() },
                    format!("cannot delete the record of {t}"),
                ),
                Step::Answer(ManagedReply::Deleted {
                    uuids: vec![t.to_owned()],
                }),
            ]);
        }
        let mut planned = self.catalogue.clone();
        let ops = match target {
            Some(t) => planned.delete(
                t,
                if with_children {
                    DeleteMode::WithChildren
                } else {
                    DeleteMode::Alone
                },
            )?,
            None => planned.delete_all(),
        };
        let doomed: Vec<String> = ops
            .iter()
            .filter_map(|o| match o {
                CatalogueOp::DeleteBackup { uuid } => Some(uuid.clone()),
                _ => None,
            })
            .collect();
        if let Some(parent) = pending
            .and_then(|p| p.parent.as_ref())
            .filter(|p| doomed.contains(p))
        {
            return Err(ManagedError::Busy(format!(
                "a running backup is built on '{parent}'"
            )));
        }
        let mut files: Vec<String> = Vec::new();
        let mut dirs: Vec<String> = Vec::new();
        for op in &ops {
            if let CatalogueOp::RemoveImage { path } = op {
                let (dir, _) = split(path);
                if validate_uuid(split(dir).1).is_ok() && !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_owned());
                }
                files.push(path.clone());
            }
        }
        let mut steps = vec![Step::Do(
            Effect::PutJournal(Box::new(Journal::Delete {
                target: target.map(str::to_owned),
                with_children,
                keep_checkpoints,
                files,
                dirs: dirs.clone(),
            })),
            "cannot write the journal".into(),
        )];
        // Until a record or an image changes, a failure undoes the deletion entirely (the
        // checkpoints come first: QEMU refusing to delete one keeps every backup).
        steps.push(Step::OnFailure(vec![Step::Do(
            Effect::ClearJournal,
            "cannot clear the journal".into(),
        )]));
        let mut committed = false;
        let mut checkpoints = Vec::new();
        let flush = |checkpoints: &mut Vec<String>, steps: &mut Vec<Step>| {
            if !checkpoints.is_empty() {
                steps.push(Step::DeleteCheckpoints(std::mem::take(checkpoints)));
            }
        };
        for op in ops {
            if !matches!(op, CatalogueOp::DeleteCheckpoint { .. }) {
                flush(&mut checkpoints, &mut steps);
                if !committed {
                    // From the first record or image change on, a restart finishes it.
                    steps.push(Step::OnFailure(Vec::new()));
                    committed = true;
                }
            }
            match op {
                CatalogueOp::DeleteCheckpoint { name } => {
                    if !keep_checkpoints {
                        checkpoints.push(name);
                    }
                }
                CatalogueOp::RebaseImage { path, backing } => steps.push(Step::Do(
                    Effect::Rebase {
                        path: path.clone(),
                        backing,
                        unsafe_rebase: false,
                    },
                    format!("cannot rebase '{path}'"),
                )),
                CatalogueOp::PutBackup(b) => {
                    let what = format!("cannot rewrite the record of {}", b.uuid);
                    steps.push(Step::Do(Effect::PutRecord(b), what));
                }
                CatalogueOp::DeleteBackup { uuid } => steps.push(Step::Do(
                    Effect::DeleteRecord { uuid: uuid.clone() },
                    format!("cannot delete the record of {uuid}"),
                )),
                CatalogueOp::RemoveImage { path } => {
                    steps.push(Step::Try(Effect::Remove { path }));
                }
                CatalogueOp::SetDefaultTarget(_) => {}
            }
        }
        flush(&mut checkpoints, &mut steps);
        steps.extend(
            dirs.into_iter()
                .map(|path| Step::Try(Effect::RemoveDir { path })),
        );
        steps.push(Step::Do(
            Effect::ClearJournal,
            "cannot clear the journal".into(),
        ));
        if answer {
            steps.push(Step::Answer(ManagedReply::Deleted { uuids: doomed }));
        }
        Ok(steps)
    }

    fn plan_consolidate(&self, uuid: &str) -> Result<Vec<Step>, ManagedError> {
        let b = self.require(uuid)?.clone();
        if b.parent.is_none() {
            return Ok(vec![Step::Answer(ManagedReply::Consolidated {
                backup: Box::new(b),
                changed: false,
            })]);
        }
        // The whole chain first: every image it reads must hold what its record says.
        let chain = self.catalogue.chain(uuid)?;
        let mut steps = Vec::new();
        for ancestor in chain.iter().rev() {
            for d in &b.disks {
                if let Some(img) = ancestor.image(&d.disk) {
                    steps.push(Step::Verify {
                        path: img.path.clone(),
                        want: img.digest.clone(),
                    });
                }
            }
        }
        let renames: Vec<(String, String)> = b
            .disks
            .iter()
            .map(|d| (temporary(&d.path), d.path.clone()))
            .collect();
        steps.extend(begin_replace(&renames, Vec::new(), None));
        for (d, (tmp, _)) in b.disks.iter().zip(&renames) {
            steps.push(Step::Copy {
                disk: d.disk.clone(),
                source: d.path.clone(),
                into: tmp.clone(),
                format: d.format.clone(),
                existing: false,
                want: d.digest.clone(),
            });
            steps.push(Step::Do(
                Effect::Sync { path: tmp.clone() },
                format!("cannot sync '{tmp}'"),
            ));
        }
        steps.push(Step::CommitConsolidation {
            uuid: uuid.to_owned(),
            renames,
        });
        Ok(steps)
    }

    fn plan_restore(&self, req: RestoreRequest) -> Result<Vec<Step>, ManagedError> {
        self.require(&req.uuid)?;
        let chosen: Vec<&str> = req.disks.iter().map(String::as_str).collect();
        let plan = match &req.until {
            Some(u) => {
                validate_uuid(u)?;
                self.require(u)?;
                self.catalogue.plan_restore_until(&req.uuid, u, &chosen)?
            }
            None => self.catalogue.plan_restore(&req.uuid, &chosen)?,
        };
        let mut steps = Vec::new();
        let mut renames = Vec::new();
        let mut restored = Vec::new();
        let (overwrite, define) = match &req.target {
            RestoreTarget::NewImages { dir, new_domain } => {
                if let Some(name) = new_domain {
                    steps.push(Step::RefuseDomain(name.clone()));
                }
                steps.push(Step::Do(
                    Effect::CreateDir {
                        path: dir.clone(),
                        parents: true,
                    },
                    format!("cannot create '{dir}'"),
                ));
                for d in &plan.disks {
                    let dest = format!("{}/{}.qcow2", dir.trim_end_matches('/'), d.disk);
                    steps.push(Step::RefuseFile(dest.clone()));
                    renames.push((temporary(&dest), dest));
                }
                let define = new_domain.as_ref().map(|name| {
                    let disks = plan
                        .disks
                        .iter()
                        .zip(&renames)
                        .map(|(d, (_, dest))| (d.disk.clone(), dest.clone(), "qcow2".to_owned()))
                        .collect();
                    NewDomain {
                        name: name.clone(),
                        disks,
                    }
                });
                (false, define)
            }
            RestoreTarget::Overwrite { disks } => {
                for d in &plan.disks {
                    let Some(path) = disks.get(&d.disk) else {
                        return Err(ManagedError::Invalid(format!(
                            "domain '{}' has no file disk '{}'",
                            self.domain, d.disk
                        )));
                    };
                    renames.push((temporary(path), path.clone()));
                }
                (true, None)
            }
        };
        let forget_disks: Vec<String> = if overwrite {
            plan.disks.iter().map(|d| d.disk.clone()).collect()
        } else {
            Vec::new()
        };
        steps.extend(begin_replace(
            &renames,
            forget_disks.clone(),
            define.clone(),
        ));
        for (d, (tmp, dest)) in plan.disks.iter().zip(&renames) {
            let Some(top) = d.top() else {
                return Err(ManagedError::Unexpected(
                    "a restore plan without image".into(),
                ));
            };
            // Over a disk: a new image like the old one (options, owner, mode), filled in place.
            if overwrite {
                steps.push(Step::Do(
                    Effect::CreateImage {
                        path: tmp.clone(),
                        format: ImageFormat::Qcow2,
                        size_bytes: d.virtual_size_bytes,
                        like: Some(dest.clone()),
                    },
                    format!("cannot create '{tmp}'"),
                ));
            }
            steps.push(Step::Copy {
                disk: d.disk.clone(),
                source: top.path.clone(),
                into: tmp.clone(),
                format: ImageFormat::Qcow2,
                existing: overwrite,
                want: d.digest.clone(),
            });
            steps.push(Step::Do(
                Effect::Sync { path: tmp.clone() },
                format!("cannot sync '{tmp}'"),
            ));
            restored.push(RestoredDisk {
                disk: d.disk.clone(),
                path: dest.clone(),
                format: if overwrite {
                    d.format.clone()
                } else {
                    ImageFormat::Qcow2
                },
                digest: d.digest.clone(),
            });
        }
        let domain = define.as_ref().map(|d| d.name.clone());
        steps.push(Step::CommitRestore {
            renames,
            forget_disks,
            define,
        });
        steps.push(Step::Answer(ManagedReply::Restored {
            backup: plan.backup,
            disks: restored,
            domain,
        }));
        Ok(steps)
    }
}

fn define_effect(d: &NewDomain) -> Effect {
    Effect::DefineDomain {
        name: d.name.clone(),
        disks: d
            .disks
            .iter()
            .map(|(d, p, f)| (d.clone(), p.clone(), ImageFormat::from_name(f)))
            .collect(),
    }
}

fn commit_restore_steps(
    renames: Vec<(String, String)>,
    forget_disks: Vec<String>,
    define: Option<NewDomain>,
) -> Vec<Step> {
    let mut steps = vec![
        Step::Do(
            Effect::PutJournal(Box::new(Journal::Replace {
                renames: renames.clone(),
                committed: true,
                record: None,
                forget_disks: forget_disks.clone(),
                define: define.clone(),
            })),
            "cannot write the journal".into(),
        ),
        Step::OnFailure(Vec::new()),
    ];
    let replace = !forget_disks.is_empty();
    steps.extend(renames.into_iter().map(|(from, to)| {
        Step::Do(
            Effect::Rename {
                from: from.clone(),
                to: to.clone(),
                replace,
            },
            format!("cannot rename '{from}' to '{to}'"),
        )
    }));
    if !forget_disks.is_empty() {
        steps.push(Step::ForgetDisks(forget_disks));
    }
    if let Some(d) = &define {
        steps.push(Step::Do(
            define_effect(d),
            format!("cannot define domain '{}'", d.name),
        ));
    }
    steps.push(Step::Do(
        Effect::ClearJournal,
        "cannot clear the journal".into(),
    ));
    steps
}

/// The start of a replacement of images by new files (`renames`: new file, then the image
/// it replaces): the journal first, and on failure the new files removed and the journal
/// cleared.
fn begin_replace(
    renames: &[(String, String)],
    forget_disks: Vec<String>,
    define: Option<NewDomain>,
) -> [Step; 2] {
    let mut undo: Vec<Step> = renames
        .iter()
        .map(|(t, _)| Step::Try(Effect::Remove { path: t.clone() }))
        .collect();
    undo.push(Step::Do(
        Effect::ClearJournal,
        "cannot clear the journal".into(),
    ));
    [
        Step::Do(
            Effect::PutJournal(Box::new(Journal::Replace {
                renames: renames.to_vec(),
                committed: false,
                record: None,
                forget_disks,
                define,
            })),
            "cannot write the journal".into(),
        ),
        Step::OnFailure(undo),
    ]
}

/// After a backup's job succeeded: a push incremental's images get their parent's image as
/// backing file (QEMU wrote only the changed clusters, so that is their meaning), then every
/// image is described and the record written.
fn record_steps(catalogue: &Catalogue, pending: &PendingBackup) -> Vec<Step> {
    let mut steps = Vec::new();
    let parent = pending.parent.as_deref().and_then(|p| catalogue.get(p));
    for (disk, path) in &pending.images {
        if !pending.pull
            && let Some(backing) = parent.and_then(|p| p.image(disk))
        {
            steps.push(Step::Do(
                Effect::Rebase {
                    path: path.clone(),
                    backing: Some(backing.path.clone()),
                    unsafe_rebase: true,
                },
                format!("cannot rebase '{path}'"),
            ));
        }
        steps.push(Step::Describe {
            disk: disk.clone(),
            path: path.clone(),
            base: parent.and_then(|p| p.image(disk)).map(|img| DigestBase {
                path: img.path.clone(),
                digest: img.digest.clone(),
            }),
        });
    }
    steps.push(Step::Record(pending.clone()));
    steps
}

/// Discards a pending backup: its job ended, its images and its directory removed, its
/// checkpoint deleted (so the next incremental from the parent still covers every change),
/// the journal cleared last.
fn discard_steps(pending: &PendingBackup) -> Vec<Step> {
    let mut steps = Vec::new();
    if pending.begun {
        steps.push(Step::EndJob { required: false });
    }
    for (_, path) in &pending.images {
        steps.push(Step::Try(Effect::Remove { path: path.clone() }));
    }
    if let Some(dir) = &pending.dir {
        steps.push(Step::Try(Effect::RemoveDir { path: dir.clone() }));
    }
    if pending.begun {
        steps.push(Step::DeleteCheckpoints(vec![pending.checkpoint.clone()]));
    }
    steps.push(Step::Do(
        Effect::ClearJournal,
        "cannot clear the journal".into(),
    ));
    steps
}

/// The effect a step sends, if it sends one.
fn effect_of(step: &Step) -> Option<Effect> {
    let job = || {
        Effect::Domain(Request::JobStats {
            completed: false,
            keep_completed: true,
        })
    };
    let list = || {
        Effect::Domain(Request::CheckpointList {
            filter: ListFilter::default(),
        })
    };
    Some(match step {
        Step::Do(e, _) | Step::Try(e) => e.clone(),
        Step::Verify { path, want: d }
        | Step::Judge {
            path, recorded: d, ..
        } => Effect::Digest {
            path: path.clone(),
            kind: d.kind(),
            base: None,
        },
        Step::Describe { path, base, .. } => Effect::Digest {
            path: path.clone(),
            kind: DigestKind::NEW_IMAGES,
            base: base.clone(),
        },
        Step::Copy {
            source,
            into,
            format,
            existing,
            want,
            ..
        } => Effect::DigestCopy {
            source: source.clone(),
            into: into.clone(),
            format: format.clone(),
            existing: *existing,
            kind: want.kind(),
        },
        Step::RefuseDomain(name) => Effect::DomainExists { name: name.clone() },
        Step::RefuseFile(path) => Effect::Exists { path: path.clone() },
        Step::EndJob { .. } | Step::WaitJobEnd | Step::ReportRunning(_) | Step::ResolveStale(_) => {
            job()
        }
        Step::Conclude { .. } => Effect::Domain(Request::JobStats {
            completed: true,
            keep_completed: true,
        }),
        Step::PullCopies { .. } => Effect::Domain(Request::BackupGetXml),
        Step::DeleteCheckpoints(_) | Step::ForgetDisks(_) => list(),
        Step::ForgetDisksOf { name, .. } => Effect::Domain(Request::CheckpointGetXml {
            name: name.clone(),
            size: false,
        }),
        Step::RenameIfPresent { from, to, replace } => Effect::Rename {
            from: from.clone(),
            to: to.clone(),
            replace: *replace,
        },
        Step::OnFailure(_)
        | Step::Fail(_)
        | Step::Answer(_)
        | Step::Record(_)
        | Step::CommitConsolidation { .. }
        | Step::CommitRestore { .. } => return None,
    })
}
