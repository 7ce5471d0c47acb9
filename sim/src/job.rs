//! Jobs (`blockdev-create` and `blockdev-backup`): QEMU's status machine, its verb table, the
//! event sequences, progress over virtual time, and the bitmap bookkeeping at the end of a
//! backup.
//!
//! Event order, as observed on QEMU 10.0.2 (reference §4, §8, §11 and the libvirt traces):
//! - success: created, running, paused, running (the start drain), [reply], waiting, pending,
//!   `BLOCK_JOB_COMPLETED`, concluded, then null at dismiss;
//! - auto-finalize off: … pending + `BLOCK_JOB_PENDING`, and the rest at `job-finalize`;
//! - cancel: aborting, `BLOCK_JOB_CANCELLED`, concluded;
//! - I/O error: `BLOCK_JOB_ERROR`, aborting, `BLOCK_JOB_COMPLETED` with `error`, concluded;
//! - graph changes pause and resume every running job: one pair for a transaction, an export
//!   added, a reopen or another backup finishing; three pairs for an export deleted or another
//!   backup aborting;
//! - jobs that finish copying at the same moment all reach `pending` before any completes (no
//!   pairs between them), and the later one completes first.

use serde_json::{Value, json};

use crate::args::Args;
use crate::bitmap::Bits;
use crate::errors::{QmpError, job_error};
use crate::image::FileContent;
use crate::node::object;
use crate::qemu::{Fault, Qemu};

/// QEMU's job states. Backups never reach `ready` or `standby`, and `null` exists only as the
/// event of a dismissed job; the variants stay so the verb table keeps QEMU's columns.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobStatus {
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Job verbs (commands that act on a job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// QEMU's verb table, columns in [`JobStatus`] order.
    fn allowed(self, status: JobStatus) -> bool {
        let row: [u8; 10] = match self {
            Verb::Cancel => [0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            Verb::Pause => [0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
            Verb::Resume => [0, 0, 1, 0, 1, 0, 0, 0, 0, 0],
            Verb::SetSpeed => [0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            Verb::Complete => [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            Verb::Finalize => [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            Verb::Dismiss => [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        };
        row[status.index()] == 1
    }
}

/// The copy mode of a backup (`incremental` is `bitmap` with `on-success`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncMode {
    Full,
    Top,
    Bitmap,
    None,
}

/// What happens to the sync bitmap when the job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

#[derive(Debug)]
pub(crate) struct BackupJob {
    pub source: String,
    pub target: String,
    pub filter: String,
    pub sync: SyncMode,
    /// The sync bitmap (on `source`), by uid.
    pub bitmap: Option<u64>,
    pub bitmap_mode: BitmapMode,
    pub granule: u64,
    pub size: u64,
    /// Granules still to copy (for `none`: granules not yet saved by copy-before-write).
    pub pending: Bits,
    pub cursor: u64,
    /// Bytes copied by copy-before-write on guest writes.
    pub cbw_copied: u64,
    pub explicit_zero: bool,
    /// A failure seen on the guest write path, acted on at once after the write.
    pub failure: Option<(&'static str, &'static str)>,
    pub released: bool,
}

#[derive(Debug)]
pub(crate) struct CreateJob {
    pub finish_ms: u64,
    pub result: Result<(String, FileContent), String>,
    /// The protocol node a qcow2 creation writes through (QEMU opens a block backend on it for
    /// the job's run, so `blockdev-del` refuses it meanwhile).
    pub file_node: Option<String>,
}

impl Job {
    /// The node a `blockdev-create` job holds open while it runs, if any.
    pub(crate) fn creating_on(&self) -> Option<&str> {
        match &self.kind {
            JobKind::Create(c)
                if matches!(
                    self.status,
                    JobStatus::Created | JobStatus::Running | JobStatus::Paused
                ) =>
            {
                c.file_node.as_deref()
            }
            _ => None,
        }
    }
}

#[derive(Debug)]
pub(crate) enum JobKind {
    Create(Box<CreateJob>),
    Backup(Box<BackupJob>),
}

/// One job.
#[derive(Debug)]
pub(crate) struct Job {
    pub id: String,
    pub seq: u64,
    pub kind: JobKind,
    pub status: JobStatus,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub user_paused: bool,
    pub current: u64,
    pub total: u64,
    pub speed: u64,
    pub error: Option<String>,
    /// Set for the jobs of a `completion-mode: grouped` transaction.
    pub txn: Option<u64>,
    /// Background copying is measured from this moment (start, resume, speed change).
    pub epoch_ms: u64,
    pub epoch_done: u64,
}

impl Job {
    pub(crate) fn type_str(&self) -> &'static str {
        match self.kind {
            JobKind::Create(_) => "create",
            JobKind::Backup(_) => "backup",
        }
    }

    fn is_block_job(&self) -> bool {
        matches!(self.kind, JobKind::Backup(_))
    }

    pub(crate) fn backup(&self) -> Option<&BackupJob> {
        match &self.kind {
            JobKind::Backup(b) => Some(b),
            JobKind::Create(_) => None,
        }
    }

    pub(crate) fn backup_mut(&mut self) -> Option<&mut BackupJob> {
        match &mut self.kind {
            JobKind::Backup(b) => Some(b),
            JobKind::Create(_) => None,
        }
    }

    fn block_event_data(&self) -> Value {
        // Members in key order (see `object`).
        Value::Object(object([
            ("device", self.id.as_str().into()),
            ("len", self.total.into()),
            ("offset", self.current.into()),
            ("speed", self.speed.into()),
            ("type", self.type_str().into()),
        ]))
    }
}

/// Why a job ends without success.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Abort {
    Cancelled,
    Failed {
        operation: &'static str,
        error: &'static str,
    },
}

fn granule_bytes(b: &BackupJob, g: u64) -> u64 {
    b.granule.min(b.size.saturating_sub(g * b.granule))
}

impl Qemu {
    pub(crate) fn new_job_seq(&mut self) -> u64 {
        self.st.next_job_seq += 1;
        self.st.next_job_seq
    }

    fn job_rate(&self, job: &Job) -> u64 {
        let t = self.config.throughput_bytes_per_s.max(1);
        if job.speed > 0 { job.speed.min(t) } else { t }
    }

    fn fault_for(&self, b: &BackupJob) -> Option<(&'static str, &'static str)> {
        self.faults.iter().find_map(|f| match f {
            Fault::TargetIoError { node } if *node == b.target => Some(("write", job_error::IO)),
            Fault::TargetNoSpace { node } if *node == b.target => {
                Some(("write", job_error::NO_SPACE))
            }
            Fault::SourceIoError { node } if *node == b.source => Some(("read", job_error::IO)),
            _ => None,
        })
    }

    /// The earliest moment a job acts by itself: (time, job id).
    /// When a running job next acts by itself, if ever.
    fn milestone_of(&self, job: &Job) -> Option<u64> {
        if job.status != JobStatus::Running || job.user_paused {
            return None;
        }
        match &job.kind {
            JobKind::Create(c) => Some(c.finish_ms),
            JobKind::Backup(b) => {
                if b.failure.is_some() {
                    Some(self.now_ms)
                } else if b.sync == SyncMode::None {
                    None
                } else {
                    let rate = u128::from(self.job_rate(job));
                    let remaining = b.pending.count() * b.granule;
                    let need = if self.fault_for(b).is_some() {
                        remaining.min(b.granule)
                    } else {
                        remaining
                    };
                    let bytes = u128::from(job.epoch_done + need) * 1000;
                    Some(job.epoch_ms + bytes.div_ceil(rate) as u64)
                }
            }
        }
    }

    /// The earliest moment a job acts by itself: (time, job id).
    pub(crate) fn next_milestone(&self) -> Option<(u64, String)> {
        self.st
            .jobs
            .values()
            .filter_map(|j| self.milestone_of(j).map(|t| (t, j.seq, j.id.clone())))
            .min()
            .map(|(t, _, id)| (t, id))
    }

    /// Lets jobs act up to `now`: milestones in time order, then partial progress. Jobs that
    /// finish copying at the same moment all reach `pending` before any is finalized, and the
    /// later ones complete first, as QEMU's nested drain during finalization makes it happen.
    pub(crate) fn run_jobs_until(&mut self, now: u64) {
        let now = now.max(self.now_ms);
        for _ in 0..10_000 {
            let Some((t, _)) = self.next_milestone().filter(|(t, _)| *t <= now) else {
                break;
            };
            self.now_ms = self.now_ms.max(t);
            let mut due: Vec<(u64, String)> = self
                .st
                .jobs
                .values()
                .filter(|j| self.milestone_of(j) == Some(t))
                .map(|j| (j.seq, j.id.clone()))
                .collect();
            due.sort();
            let mut finalize = Vec::new();
            for (_, id) in due {
                finalize.extend(self.job_milestone(&id));
            }
            for id in finalize.iter().rev() {
                self.finalize_success(id);
            }
        }
        self.now_ms = now;
        let ids: Vec<String> = self
            .st
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Running && !j.user_paused && j.is_block_job())
            .map(|j| j.id.clone())
            .collect();
        for id in ids {
            self.backup_progress(&id, now);
        }
    }

    fn backup_progress(&mut self, id: &str, now: u64) {
        let Some(job) = self.st.jobs.get(id) else {
            return;
        };
        let Some(b) = job.backup() else { return };
        if b.sync == SyncMode::None || self.fault_for(b).is_some() {
            return;
        }
        let rate = u128::from(self.job_rate(job));
        let allowed = (u128::from(now.saturating_sub(job.epoch_ms)) * rate / 1000) as u64;
        let mut budget = allowed.saturating_sub(job.epoch_done);
        for _ in 0..1_000_000 {
            let Some(job) = self.st.jobs.get(id) else {
                return;
            };
            let Some(b) = job.backup() else { return };
            let Some(g) = b.pending.next_set(b.cursor) else {
                return;
            };
            let cost = b.granule;
            if cost > budget {
                return;
            }
            budget -= cost;
            self.copy_granule(id, g);
            if let Some(job) = self.st.jobs.get_mut(id) {
                job.epoch_done += cost;
                if let Some(b) = job.backup_mut() {
                    b.cursor = g + 1;
                }
            }
        }
    }

    fn copy_granule(&mut self, id: &str, g: u64) {
        let Some(b) = self.st.jobs.get(id).and_then(Job::backup) else {
            return;
        };
        let (source, target, start, len, zero) = (
            b.source.clone(),
            b.target.clone(),
            g * b.granule,
            granule_bytes(b, g),
            b.explicit_zero,
        );
        self.copy_range(&source, &target, start, len, zero);
        if let Some(job) = self.st.jobs.get_mut(id) {
            job.current += len;
            if let Some(b) = job.backup_mut() {
                b.pending.clear(g);
            }
        }
    }

    /// The backup filter's copy-before-write: saves granules the guest is about to overwrite.
    pub(crate) fn backup_before_write(&mut self, id: &str, offset: u64, len: u64) {
        let Some(job) = self.st.jobs.get(id) else {
            return;
        };
        if matches!(
            job.status,
            JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
        ) {
            return;
        }
        let Some(b) = job.backup() else { return };
        if let Some(f) = self.fault_for(b) {
            if let Some(b) = self.st.jobs.get_mut(id).and_then(Job::backup_mut) {
                b.failure.get_or_insert(f);
            }
            return;
        }
        let first = offset / b.granule;
        let last = (offset + len).div_ceil(b.granule);
        let todo: Vec<u64> = (first..last).filter(|g| b.pending.get(*g)).collect();
        for g in todo {
            let bytes = self
                .st
                .jobs
                .get(id)
                .and_then(Job::backup)
                .map(|b| granule_bytes(b, g))
                .unwrap_or(0);
            self.copy_granule(id, g);
            if let Some(b) = self.st.jobs.get_mut(id).and_then(Job::backup_mut) {
                b.cbw_copied += bytes;
            }
        }
    }

    /// One job's milestone; returns the jobs now ready to be finalized.
    fn job_milestone(&mut self, id: &str) -> Vec<String> {
        let Some(job) = self.st.jobs.get_mut(id) else {
            return Vec::new();
        };
        match &mut job.kind {
            JobKind::Create(c) => {
                let result = std::mem::replace(&mut c.result, Err(String::new()));
                match result {
                    Ok((path, content)) => {
                        job.current = 1;
                        self.fs.put(&path, content);
                        self.job_reached_end(id)
                    }
                    Err(e) => {
                        self.abort_job(
                            id,
                            Abort::Failed {
                                operation: "write",
                                error: "",
                            },
                            Some(e),
                        );
                        Vec::new()
                    }
                }
            }
            JobKind::Backup(b) => {
                let failure = b.failure.take();
                let fault = failure.or_else(|| {
                    self.st
                        .jobs
                        .get(id)
                        .and_then(Job::backup)
                        .and_then(|b| self.fault_for(b))
                });
                if let Some((operation, error)) = fault {
                    self.abort_job(id, Abort::Failed { operation, error }, None);
                    return Vec::new();
                }
                let todo: Vec<u64> = self
                    .st
                    .jobs
                    .get(id)
                    .and_then(Job::backup)
                    .map(|b| b.pending.iter_set().collect())
                    .unwrap_or_default();
                for g in todo {
                    self.copy_granule(id, g);
                }
                self.job_reached_end(id)
            }
        }
    }

    fn set_status(&mut self, id: &str, status: JobStatus) {
        if let Some(j) = self.st.jobs.get_mut(id) {
            j.status = status;
        }
        let data = object([("id", id.into()), ("status", status.as_str().into())]);
        self.emit("JOB_STATUS_CHANGE", Value::Object(data));
    }

    fn txn_members(&self, id: &str) -> Vec<String> {
        let txn = self.st.jobs.get(id).and_then(|j| j.txn);
        let mut members: Vec<(u64, String)> = match txn {
            Some(t) => self
                .st
                .jobs
                .values()
                .filter(|j| j.txn == Some(t))
                .map(|j| (j.seq, j.id.clone()))
                .collect(),
            None => vec![(0, id.to_string())],
        };
        members.sort();
        members.into_iter().map(|(_, i)| i).collect()
    }

    /// A job finished its work: `waiting`, and `pending` once its whole transaction is there.
    /// Returns the jobs to finalize now (auto-finalize), or emits `BLOCK_JOB_PENDING`.
    fn job_reached_end(&mut self, id: &str) -> Vec<String> {
        self.set_status(id, JobStatus::Waiting);
        let members = self.txn_members(id);
        let all_waiting = members.iter().all(|m| {
            self.st
                .jobs
                .get(m)
                .is_some_and(|j| j.status == JobStatus::Waiting)
        });
        if !all_waiting {
            return Vec::new();
        }
        for m in &members {
            self.set_status(m, JobStatus::Pending);
        }
        let auto = members
            .iter()
            .all(|m| self.st.jobs.get(m).is_some_and(|j| j.auto_finalize));
        if auto {
            return members;
        }
        for m in &members {
            if let Some(j) = self.st.jobs.get(m).filter(|j| j.is_block_job()) {
                let data = json!({"type": j.type_str(), "id": j.id});
                self.emit("BLOCK_JOB_PENDING", data);
            }
        }
        Vec::new()
    }

    fn finalize_success(&mut self, id: &str) {
        let is_block = self.st.jobs.get(id).is_some_and(Job::is_block_job);
        if is_block {
            self.release_job_resources(id, true);
            self.drain_running_jobs_except(1, id);
            let data = self
                .st
                .jobs
                .get(id)
                .map(Job::block_event_data)
                .unwrap_or(Value::Null);
            self.emit("BLOCK_JOB_COMPLETED", data);
        }
        self.conclude(id, false);
    }

    fn conclude(&mut self, id: &str, force_dismiss: bool) {
        self.set_status(id, JobStatus::Concluded);
        if force_dismiss || self.st.jobs.get(id).is_some_and(|j| j.auto_dismiss) {
            self.dismiss(id);
        }
    }

    fn dismiss(&mut self, id: &str) {
        self.emit("JOB_STATUS_CHANGE", json!({"status": "null", "id": id}));
        self.st.jobs.remove(id);
    }

    /// Ends a job without success. `create_error` carries the text of a failed create job.
    pub(crate) fn abort_job(&mut self, id: &str, why: Abort, create_error: Option<String>) {
        let Some(job) = self.st.jobs.get(id) else {
            return;
        };
        if matches!(
            job.status,
            JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
        ) {
            return;
        }
        let started = job.status != JobStatus::Created;
        let is_block = job.is_block_job();
        if let (Abort::Failed { operation, .. }, true) = (why, is_block) {
            self.emit(
                "BLOCK_JOB_ERROR",
                json!({"device": id, "operation": operation, "action": "report"}),
            );
        }
        self.set_status(id, JobStatus::Aborting);
        let text = match (why, create_error) {
            (_, Some(e)) => e,
            (Abort::Cancelled, None) => job_error::CANCELLED.to_string(),
            (Abort::Failed { error, .. }, None) => error.to_string(),
        };
        if let Some(j) = self.st.jobs.get_mut(id) {
            j.error = Some(text.clone());
        }
        if is_block {
            self.release_job_resources(id, false);
            if started {
                // The other members of a grouped transaction are cancelled with it, not drained.
                let members = self.txn_members(id);
                let others: Vec<String> = self
                    .running_jobs(id)
                    .into_iter()
                    .filter(|j| !members.contains(j))
                    .collect();
                self.drain_jobs(3, &others);
            }
            let mut data = self
                .st
                .jobs
                .get(id)
                .map(Job::block_event_data)
                .unwrap_or(Value::Null);
            match why {
                Abort::Cancelled => self.emit("BLOCK_JOB_CANCELLED", data),
                Abort::Failed { .. } => {
                    data["error"] = json!(text);
                    self.emit("BLOCK_JOB_COMPLETED", data);
                }
            }
        }
        // A job that never started is dismissed with its conclusion.
        self.conclude(id, !started);
        let members = self.txn_members(id);
        for m in members {
            if m != id {
                self.abort_job(&m, Abort::Cancelled, None);
            }
        }
    }

    /// Gives back what a backup holds: the sync bitmap (per bitmap-mode and outcome), the
    /// filter node (parents go back to the source) and the target's op blocker.
    pub(crate) fn release_job_resources(&mut self, id: &str, success: bool) {
        let Some(job) = self.st.jobs.get_mut(id) else {
            return;
        };
        let Some(b) = job.backup_mut() else { return };
        if b.released {
            return;
        }
        b.released = true;
        let (source, target, filter) = (b.source.clone(), b.target.clone(), b.filter.clone());
        let (bitmap, mode, pending, granule) =
            (b.bitmap, b.bitmap_mode, b.pending.clone(), b.granule);
        if let Some(uid) = bitmap {
            self.end_bitmap_freeze(&source, uid, mode, success, &pending, granule);
        }
        for n in self.st.nodes.values_mut() {
            if n.file.as_deref() == Some(filter.as_str()) {
                n.file = Some(source.clone());
            }
        }
        for d in self.st.devices.iter_mut() {
            if d.node == filter {
                d.node = source.clone();
            }
        }
        for e in self.st.exports.values_mut() {
            if e.node == filter {
                e.node = source.clone();
            }
        }
        self.st.nodes.remove(&filter);
        for n in [&source, &target] {
            if let Some(n) = self.node_mut(n) {
                n.job_users.remove(id);
            }
        }
    }

    fn end_bitmap_freeze(
        &mut self,
        node: &str,
        uid: u64,
        mode: BitmapMode,
        success: bool,
        pending: &Bits,
        granule: u64,
    ) {
        let Some(parent) = self.bitmap_by_uid(node, uid) else {
            return;
        };
        let Some(succ_uid) = parent.successor else {
            return;
        };
        let Some(succ) = self.bitmap_by_uid(node, succ_uid).cloned() else {
            return;
        };
        let parent = self.bitmap_by_uid_mut(node, uid).expect("present");
        match (success, mode) {
            (true, BitmapMode::OnSuccess | BitmapMode::Always) => parent.bits = succ.bits.clone(),
            (false, BitmapMode::Always) => {
                // Keep only what was not copied, plus what the guest wrote meanwhile.
                let gran = parent.granularity;
                let keep: Vec<u64> = parent
                    .bits
                    .iter_set()
                    .filter(|g| {
                        let (s, e) = (g * gran, (g + 1) * gran);
                        (s / granule..e.div_ceil(granule)).any(|j| pending.get(j))
                    })
                    .collect();
                parent.bits.clear_all();
                for g in keep {
                    parent.bits.set(g);
                }
                parent.bits.or_with(&succ.bits);
            }
            _ => parent.bits.or_with(&succ.bits),
        }
        parent.disabled = succ.disabled;
        parent.successor = None;
        parent.busy = false;
        if let Some(n) = self.node_mut(node) {
            n.bitmaps.retain(|b| b.uid != succ_uid);
        }
    }

    /// Pauses and resumes every running job `pairs` times (a drained section).
    pub(crate) fn drain_running_jobs(&mut self, pairs: usize) {
        self.drain_running_jobs_except(pairs, "");
    }

    pub(crate) fn running_jobs(&self, except: &str) -> Vec<String> {
        let mut ids: Vec<(u64, String)> = self
            .st
            .jobs
            .values()
            .filter(|j| {
                j.status == JobStatus::Running
                    && !j.user_paused
                    && j.id != except
                    && j.is_block_job()
            })
            .map(|j| (j.seq, j.id.clone()))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, i)| i).collect()
    }

    fn drain_running_jobs_except(&mut self, pairs: usize, except: &str) {
        let ids = self.running_jobs(except);
        self.drain_jobs(pairs, &ids);
    }

    fn drain_jobs(&mut self, pairs: usize, ids: &[String]) {
        for _ in 0..pairs {
            for id in ids {
                self.set_status(id, JobStatus::Paused);
            }
            for id in ids {
                self.set_status(id, JobStatus::Running);
            }
        }
    }

    pub(crate) fn pause_for_drain(&mut self, ids: &[String]) {
        for id in ids {
            self.set_status(id, JobStatus::Paused);
        }
    }

    pub(crate) fn resume_after_drain(&mut self, ids: &[String]) {
        for id in ids {
            self.set_status(id, JobStatus::Running);
        }
    }

    /// Starts a created job (transaction commit): running, then paused by the drain the
    /// transaction holds.
    pub(crate) fn start_job_in_drain(&mut self, id: &str) {
        let now = self.now_ms;
        if let Some(j) = self.st.jobs.get_mut(id) {
            j.epoch_ms = now;
            j.epoch_done = 0;
        }
        self.set_status(id, JobStatus::Running);
        self.set_status(id, JobStatus::Paused);
    }

    // ----- commands -----

    fn find_job(&self, key: &str, block_api: bool) -> Result<String, QmpError> {
        match self.st.jobs.get(key) {
            Some(j) if !block_api || j.is_block_job() => Ok(j.id.clone()),
            _ if block_api => Err(QmpError::block_job_not_found(key)),
            _ => Err(QmpError::job_not_found()),
        }
    }

    pub(crate) fn cmd_job_verb(
        &mut self,
        a: &Args<'_>,
        key: &str,
        verb: Verb,
        block_api: bool,
    ) -> Result<Value, QmpError> {
        if verb == Verb::Cancel && block_api {
            a.only(&["device", "force"])?;
        } else {
            a.only(&[key])?;
        }
        let id = self.find_job(a.str(key)?, block_api)?;
        let job = self.st.jobs.get(&id).expect("found");
        if verb == Verb::Cancel && block_api && job.user_paused && !a.bool_or("force", false)? {
            return Err(QmpError::block_job_paused(&id));
        }
        if !verb.allowed(job.status) {
            return Err(QmpError::job_bad_state(
                &id,
                job.status.as_str(),
                verb.as_str(),
            ));
        }
        match verb {
            Verb::Cancel => self.abort_job(&id, Abort::Cancelled, None),
            // The verb table already refuses pausing a paused job and resuming a running one:
            // only a user pause leaves a job in `paused` between commands.
            Verb::Pause => {
                self.st.jobs.get_mut(&id).expect("found").user_paused = true;
                self.set_status(&id, JobStatus::Paused);
            }
            Verb::Resume => {
                let now = self.now_ms;
                let j = self.st.jobs.get_mut(&id).expect("found");
                j.user_paused = false;
                j.epoch_ms = now;
                j.epoch_done = 0;
                self.set_status(&id, JobStatus::Running);
            }
            Verb::Finalize => {
                for m in self.txn_members(&id) {
                    if self
                        .st
                        .jobs
                        .get(&m)
                        .is_some_and(|j| j.status == JobStatus::Pending)
                    {
                        self.finalize_success(&m);
                    }
                }
            }
            Verb::Dismiss => self.dismiss(&id),
            Verb::Complete | Verb::SetSpeed => {}
        }
        Ok(json!({}))
    }

    pub(crate) fn cmd_job_set_speed(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["device", "speed"])?;
        let id = self.find_job(a.str("device")?, true)?;
        let speed = a.u64("speed")?;
        let job = self.st.jobs.get(&id).expect("found");
        if !Verb::SetSpeed.allowed(job.status) {
            return Err(QmpError::job_bad_state(
                &id,
                job.status.as_str(),
                Verb::SetSpeed.as_str(),
            ));
        }
        let now = self.now_ms;
        let j = self.st.jobs.get_mut(&id).expect("found");
        j.speed = speed;
        j.epoch_ms = now;
        j.epoch_done = 0;
        Ok(json!({}))
    }

    fn jobs_newest_first(&self) -> Vec<&Job> {
        let mut jobs: Vec<&Job> = self.st.jobs.values().collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
        jobs
    }

    pub(crate) fn cmd_query_jobs(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[])?;
        Ok(Value::Array(
            self.jobs_newest_first()
                .into_iter()
                .map(|j| {
                    // Members in key order (see `object`).
                    let mut v = object([
                        ("current-progress", j.current.into()),
                        ("id", j.id.as_str().into()),
                        ("status", j.status.as_str().into()),
                        ("total-progress", j.total.into()),
                        ("type", j.type_str().into()),
                    ]);
                    if let Some(e) = &j.error {
                        v.insert("error".to_owned(), e.as_str().into());
                    }
                    Value::Object(v)
                })
                .collect(),
        ))
    }

    pub(crate) fn cmd_query_block_jobs(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&[])?;
        Ok(Value::Array(
            self.jobs_newest_first()
                .into_iter()
                .filter(|j| j.is_block_job())
                .map(|j| {
                    json!({"auto-finalize": j.auto_finalize, "io-status": "ok", "device": j.id,
                        "auto-dismiss": j.auto_dismiss, "busy": false, "len": j.total, "offset": j.current,
                        "status": j.status.as_str(), "paused": j.user_paused, "speed": j.speed,
                        "ready": false, "type": j.type_str()})
                })
                .collect(),
        ))
    }

    /// The anonymous bitmaps QEMU shows on a backup's filter node: the access bitmap, what
    /// copy-before-write saved, and what is left to copy.
    pub(crate) fn filter_bitmap_infos(&self, job: &str) -> Vec<Value> {
        let Some(b) = self.st.jobs.get(job).and_then(Job::backup) else {
            return Vec::new();
        };
        let info = |count: u64| json!({"recording": false, "persistent": false, "busy": false, "granularity": b.granule, "count": count});
        let all = b.size.div_ceil(b.granule) * b.granule;
        vec![
            info(all),
            info(b.cbw_copied),
            info(b.pending.count() * b.granule),
        ]
    }

    pub(crate) fn cmd_blockdev_create(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["job-id", "options"])?;
        let id = a.str("job-id")?;
        let o = a.sub("options")?;
        let driver = o.str("driver")?;
        let mut file_node = None;
        let result: Result<(String, FileContent), String> = match driver {
            "qcow2" => {
                o.only(&[
                    "driver",
                    "file",
                    "size",
                    "cluster-size",
                    "backing-file",
                    "backing-fmt",
                    "version",
                    "lazy-refcounts",
                    "preallocation",
                    "refcount-bits",
                    "compression-type",
                    "extended-l2",
                    "data-file",
                    "data-file-raw",
                    "encrypt",
                ])?;
                let file = o.str("file")?;
                let size = o.u64("size")?;
                let cs = o.opt_u64("cluster-size")?.unwrap_or(65536);
                let backing = o.opt_str("backing-file")?;
                let fmt = o.opt_str("backing-fmt")?;
                match self.node(file).map(|n| &n.driver) {
                    None => Err(QmpError::device_or_node_not_found(file, file).desc),
                    Some(crate::node::Driver::File { path }) => {
                        file_node = Some(file.to_string());
                        crate::qcow2::check_image_size(size)
                            .and_then(|_| crate::qcow2::check_cluster_size(cs))
                            .map(|_| {
                                let mut img = crate::qcow2::Qcow2Image::new(size, cs);
                                img.backing_file = backing.map(str::to_string);
                                img.backing_format = fmt.map(str::to_string);
                                (path.clone(), FileContent::Qcow2(img))
                            })
                    }
                    Some(_) => Err("Image is not in qcow2 format".to_string()),
                }
            }
            "file" => {
                o.only(&[
                    "driver",
                    "filename",
                    "size",
                    "preallocation",
                    "nocow",
                    "extent-size-hint",
                ])?;
                let path = o.str("filename")?;
                let size = o.u64("size")?;
                Ok((
                    path.to_string(),
                    FileContent::Raw(crate::image::RawFile {
                        size,
                        data: crate::image::ClusterMap::new(crate::image::RAW_CHUNK),
                    }),
                ))
            }
            other => {
                return Err(QmpError::unsupported(&format!(
                    "blockdev-create driver '{other}'"
                )));
            }
        };
        self.check_new_job_id(id)?;
        let seq = self.new_job_seq();
        let finish_ms = self.now_ms + self.config.create_duration_ms;
        self.st.jobs.insert(
            id.to_string(),
            Job {
                id: id.to_string(),
                seq,
                kind: JobKind::Create(Box::new(CreateJob {
                    finish_ms,
                    result,
                    file_node,
                })),
                status: JobStatus::Created,
                auto_finalize: true,
                auto_dismiss: false,
                user_paused: false,
                current: 0,
                total: 1,
                speed: 0,
                error: None,
                txn: None,
                epoch_ms: self.now_ms,
                epoch_done: 0,
            },
        );
        self.emit("JOB_STATUS_CHANGE", json!({"status": "created", "id": id}));
        self.set_status(id, JobStatus::Running);
        Ok(json!({}))
    }

    pub(crate) fn check_new_job_id(&self, id: &str) -> Result<(), QmpError> {
        if !crate::args::id_wellformed(id) {
            return Err(QmpError::invalid_job_id(id));
        }
        if self.st.jobs.contains_key(id) {
            return Err(QmpError::job_id_in_use(id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verb_table_matches_qemu() {
        assert!(Verb::Cancel.allowed(JobStatus::Running));
        assert!(Verb::Cancel.allowed(JobStatus::Pending));
        assert!(!Verb::Cancel.allowed(JobStatus::Concluded));
        assert!(Verb::Dismiss.allowed(JobStatus::Concluded));
        assert!(!Verb::Dismiss.allowed(JobStatus::Running));
        assert!(Verb::Finalize.allowed(JobStatus::Pending));
        assert!(!Verb::Complete.allowed(JobStatus::Running));
        assert!(Verb::Resume.allowed(JobStatus::Paused));
    }
}
