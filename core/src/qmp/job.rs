//! Jobs: job control commands (`job-dismiss`, `job-cancel`, `job-finalize`, `block-job-cancel`,
//! `block-job-set-speed`), `query-jobs` results and the job status values events carry.

use serde::{Deserialize, Serialize};

wire_enum! {
    /// A job's status, as `query-jobs` and `JOB_STATUS_CHANGE` report it. A running job goes
    /// `created → running → (paused ↔ running)* → waiting → pending → concluded → null`; a
    /// cancelled or failed one passes through `aborting`. Paused/running pairs right after a graph
    /// change are drains, not pauses.
    pub enum JobStatus {
        /// Created, not started.
        Created = "created",
        /// Working.
        Running = "running",
        /// Paused (by request, an error policy, or briefly during a graph change).
        Paused = "paused",
        /// Ready to complete (mirror-like jobs).
        Ready = "ready",
        /// Ready and paused.
        Standby = "standby",
        /// Done, waiting for the other jobs of its transaction.
        Waiting = "waiting",
        /// Done, waiting to be finalized (by itself or by `job-finalize`).
        Pending = "pending",
        /// Failing or cancelled, cleaning up.
        Aborting = "aborting",
        /// Finished (successfully or not), waiting for `job-dismiss`.
        Concluded = "concluded",
        /// Gone: dismissed.
        Null = "null",
    }
}

impl JobStatus {
    /// True once the job has finished working (concluded or dismissed).
    pub fn is_finished(&self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }
}

wire_enum! {
    /// The kind of a job.
    pub enum JobType {
        /// block-commit.
        Commit = "commit",
        /// block-stream.
        Stream = "stream",
        /// drive-mirror / blockdev-mirror.
        Mirror = "mirror",
        /// drive-backup / blockdev-backup.
        Backup = "backup",
        /// blockdev-create.
        Create = "create",
        /// x-blockdev-amend.
        Amend = "amend",
        /// snapshot-load.
        SnapshotLoad = "snapshot-load",
        /// snapshot-save.
        SnapshotSave = "snapshot-save",
        /// snapshot-delete.
        SnapshotDelete = "snapshot-delete",
    }
}

/// One job of `query-jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// The job's kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Its status.
    pub status: JobStatus,
    /// Progress so far, in bytes for backup jobs (an arbitrary unit for others).
    pub current_progress: u64,
    /// Estimated total; for an incremental backup, the dirty bytes, not the disk size.
    pub total_progress: u64,
    /// Why a concluded job failed (`"Operation canceled"` after a cancel); absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Arguments naming a job: `job-dismiss`, `job-cancel`, `job-finalize`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    /// The job's id.
    pub id: String,
}

impl JobRef {
    /// The job `id`.
    pub fn new(id: impl Into<String>) -> Self {
        JobRef { id: id.into() }
    }
}

/// Arguments of `block-job-cancel`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockJobCancel {
    /// The job's id (QMP calls it `device` for block jobs).
    pub device: String,
    /// Cancel even a job that is ready to complete (libvirt's abort passes true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

/// Arguments of `block-job-set-speed`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockJobSetSpeed {
    /// The job's id.
    pub device: String,
    /// New rate limit in bytes per second; 0 means unlimited.
    pub speed: u64,
}
