//! Events QEMU sends between replies: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
//! Events this version does not know decode as [`QmpEvent::Unknown`] and members it does not
//! name are ignored, so no event can break the stream. The `timestamp` member is dropped: the
//! core's time is the driver's clock, never QEMU's.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::DecodeError;
use super::job::{JobStatus, JobType};

/// `JOB_STATUS_CHANGE`: a job moved to a new status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatusChange {
    /// The job's id.
    pub id: String,
    /// Its new status.
    pub status: JobStatus,
}

/// `BLOCK_JOB_COMPLETED`: a block job finished. Failure is this event with `error` set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobCompleted {
    /// The job's kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job's id (QMP calls it `device`).
    pub device: String,
    /// Total work, in bytes for backups (the dirty bytes for an incremental).
    pub len: u64,
    /// Work done.
    pub offset: u64,
    /// Rate limit in bytes per second (0 = none).
    pub speed: u64,
    /// Why the job failed; absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `BLOCK_JOB_CANCELLED`: a block job ended by cancellation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobCancelled {
    /// The job's kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job's id.
    pub device: String,
    /// Total work.
    pub len: u64,
    /// Work done when cancelled.
    pub offset: u64,
    /// Rate limit.
    pub speed: u64,
}

wire_enum! {
    /// The I/O operation that failed.
    pub enum IoOperation {
        /// A read.
        Read = "read",
        /// A write.
        Write = "write",
    }
}

wire_enum! {
    /// What a job did about an I/O error.
    pub enum BlockErrorAction {
        /// Ignored it.
        Ignore = "ignore",
        /// Reported it (the job fails).
        Report = "report",
        /// Paused.
        Stop = "stop",
    }
}

/// `BLOCK_JOB_ERROR`: a block job hit an I/O error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobError {
    /// The job's id.
    pub device: String,
    /// The failed operation.
    pub operation: IoOperation,
    /// What the job does about it.
    pub action: BlockErrorAction,
}

/// `BLOCK_JOB_PENDING`: a job with `auto-finalize: false` waits for `job-finalize`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobPending {
    /// The job's kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job's id.
    pub id: String,
}

/// `BLOCK_JOB_READY`: a job is ready to complete (mirror-like jobs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobReady {
    /// The job's kind.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job's id.
    pub device: String,
    /// Total work.
    pub len: u64,
    /// Work done.
    pub offset: u64,
    /// Rate limit.
    pub speed: u64,
}

/// `BLOCK_EXPORT_DELETED`: an export is gone (after `block-export-del`, or at `quit`). It may
/// arrive before the reply to `block-export-del`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockExportDeleted {
    /// The export's id.
    pub id: String,
}

wire_enum! {
    /// Why the VM shut down.
    pub enum ShutdownCause {
        /// No reason (reset or unknown).
        None = "none",
        /// The host's QMP `quit`.
        HostQmpQuit = "host-qmp-quit",
        /// QMP `system_reset`.
        HostQmpSystemReset = "host-qmp-system-reset",
        /// A signal to the QEMU process.
        HostSignal = "host-signal",
        /// The host's UI.
        HostUi = "host-ui",
        /// The guest powered off.
        GuestShutdown = "guest-shutdown",
        /// The guest reset.
        GuestReset = "guest-reset",
        /// The guest panicked.
        GuestPanic = "guest-panic",
        /// A reset for a snapshot load.
        SnapshotLoad = "snapshot-load",
    }
}

/// `SHUTDOWN`: the VM is shutting down (qemu-system only; the storage daemon sends none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// The guest asked for it.
    pub guest: bool,
    /// Why.
    pub reason: ShutdownCause,
}

/// An event, typed when this version knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpEvent {
    /// `JOB_STATUS_CHANGE`.
    JobStatusChange(JobStatusChange),
    /// `BLOCK_JOB_COMPLETED`.
    BlockJobCompleted(BlockJobCompleted),
    /// `BLOCK_JOB_CANCELLED`.
    BlockJobCancelled(BlockJobCancelled),
    /// `BLOCK_JOB_ERROR`.
    BlockJobError(BlockJobError),
    /// `BLOCK_JOB_PENDING`.
    BlockJobPending(BlockJobPending),
    /// `BLOCK_JOB_READY`.
    BlockJobReady(BlockJobReady),
    /// `BLOCK_EXPORT_DELETED`.
    BlockExportDeleted(BlockExportDeleted),
    /// `SHUTDOWN`.
    Shutdown(Shutdown),
    /// `STOP`: the VM paused.
    Stop,
    /// `RESUME`: the VM runs again.
    Resume,
    /// Any other event, kept verbatim.
    Unknown {
        /// The event's name.
        name: String,
        /// Its data; `Value::Null` when the event had none.
        data: Value,
    },
}

impl QmpEvent {
    /// The event's QMP name.
    pub fn name(&self) -> &str {
        match self {
            QmpEvent::JobStatusChange(_) => "JOB_STATUS_CHANGE",
            QmpEvent::BlockJobCompleted(_) => "BLOCK_JOB_COMPLETED",
            QmpEvent::BlockJobCancelled(_) => "BLOCK_JOB_CANCELLED",
            QmpEvent::BlockJobError(_) => "BLOCK_JOB_ERROR",
            QmpEvent::BlockJobPending(_) => "BLOCK_JOB_PENDING",
            QmpEvent::BlockJobReady(_) => "BLOCK_JOB_READY",
            QmpEvent::BlockExportDeleted(_) => "BLOCK_EXPORT_DELETED",
            QmpEvent::Shutdown(_) => "SHUTDOWN",
            QmpEvent::Stop => "STOP",
            QmpEvent::Resume => "RESUME",
            QmpEvent::Unknown { name, .. } => name,
        }
    }

    /// The event's data as JSON (`Value::Null` for events without data).
    pub fn data(&self) -> Value {
        fn json<T: Serialize>(data: &T) -> Value {
            // These plain structs of strings and integers always serialize.
            serde_json::to_value(data).unwrap_or(Value::Null)
        }
        match self {
            QmpEvent::JobStatusChange(data) => json(data),
            QmpEvent::BlockJobCompleted(data) => json(data),
            QmpEvent::BlockJobCancelled(data) => json(data),
            QmpEvent::BlockJobError(data) => json(data),
            QmpEvent::BlockJobPending(data) => json(data),
            QmpEvent::BlockJobReady(data) => json(data),
            QmpEvent::BlockExportDeleted(data) => json(data),
            QmpEvent::Shutdown(data) => json(data),
            QmpEvent::Stop | QmpEvent::Resume => Value::Null,
            QmpEvent::Unknown { data, .. } => data.clone(),
        }
    }

    /// Decodes an event from its name and data (`Value::Null` when absent). Unknown names give
    /// [`QmpEvent::Unknown`]; a known event whose data has the wrong shape is an error.
    pub fn from_parts(name: &str, data: Value) -> Result<Self, DecodeError> {
        fn typed<T: DeserializeOwned>(name: &str, data: Value) -> Result<T, DecodeError> {
            let data = if data.is_null() {
                Value::Object(Map::new())
            } else {
                data
            };
            serde_json::from_value(data)
                .map_err(|err| DecodeError::invalid(format!("{name} data"), err))
        }
        Ok(match name {
            "JOB_STATUS_CHANGE" => QmpEvent::JobStatusChange(typed(name, data)?),
            "BLOCK_JOB_COMPLETED" => QmpEvent::BlockJobCompleted(typed(name, data)?),
            "BLOCK_JOB_CANCELLED" => QmpEvent::BlockJobCancelled(typed(name, data)?),
            "BLOCK_JOB_ERROR" => QmpEvent::BlockJobError(typed(name, data)?),
            "BLOCK_JOB_PENDING" => QmpEvent::BlockJobPending(typed(name, data)?),
            "BLOCK_JOB_READY" => QmpEvent::BlockJobReady(typed(name, data)?),
            "BLOCK_EXPORT_DELETED" => QmpEvent::BlockExportDeleted(typed(name, data)?),
            "SHUTDOWN" => QmpEvent::Shutdown(typed(name, data)?),
            "STOP" => QmpEvent::Stop,
            "RESUME" => QmpEvent::Resume,
            _ => QmpEvent::Unknown {
                name: name.to_owned(),
                data,
            },
        })
    }

    /// The job id this event is about, for job events.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            QmpEvent::JobStatusChange(data) => Some(&data.id),
            QmpEvent::BlockJobCompleted(data) => Some(&data.device),
            QmpEvent::BlockJobCancelled(data) => Some(&data.device),
            QmpEvent::BlockJobError(data) => Some(&data.device),
            QmpEvent::BlockJobPending(data) => Some(&data.id),
            QmpEvent::BlockJobReady(data) => Some(&data.device),
            _ => None,
        }
    }
}

/// Serializes as `{"event": NAME, "data": {...}}` (no `data` for events without any, no
/// `timestamp`).
impl Serialize for QmpEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut entries = vec![("event".to_owned(), Value::from(self.name()))];
        let data = self.data();
        if !data.is_null() {
            entries.push(("data".to_owned(), data));
        }
        super::fields::serialize_entries(&entries, serializer)
    }
}

/// Reads `{"event": NAME, "data"?: {...}}`; other members (`timestamp`) are ignored.
impl<'de> Deserialize<'de> for QmpEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let Some(Value::String(name)) = map.remove("event") else {
            return Err(D::Error::custom("an event needs an 'event' name"));
        };
        let data = map.remove("data").unwrap_or(Value::Null);
        QmpEvent::from_parts(&name, data).map_err(D::Error::custom)
    }
}
