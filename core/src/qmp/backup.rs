//! `blockdev-backup`: start a backup job (also a `transaction` action).

use serde::{Deserialize, Serialize};

/// What a backup job copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Everything.
    Full,
    /// The clusters dirty in `bitmap` (which must be given); the bitmap is cleared on success.
    Incremental,
    /// The clusters dirty in `bitmap`, with `bitmap-mode` saying what happens to it.
    Bitmap,
    /// Only what the guest overwrites while the job runs (copy-before-write; pull fleecing).
    None,
    /// The allocated clusters of the top image only.
    Top,
}

/// What a `sync: bitmap` (or full with a bitmap) job does with its bitmap at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapSyncMode {
    /// Clear the copied bits if the job succeeds.
    OnSuccess,
    /// Leave the bitmap alone.
    Never,
    /// Clear the copied bits whatever the outcome.
    Always,
}

/// What a job does on an I/O error.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevOnError {
    /// Fail the job (QEMU's default).
    #[default]
    Report,
    /// Ignore the error and go on.
    Ignore,
    /// Pause on ENOSPC, report other errors.
    Enospc,
    /// Pause the job.
    Stop,
    /// Let the node's own error policy decide.
    Auto,
}

/// Performance knobs of a backup job (`x-perf`, unstable in QEMU).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupPerf {
    /// Use copy_range for copying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_copy_range: Option<bool>,
    /// Parallel requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u64>,
    /// Largest chunk of one request, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chunk: Option<u64>,
}

/// Arguments of `blockdev-backup`.
///
/// ```
/// # use vbackup_core::qmp::{BlockdevBackup, SyncMode};
/// let job = BlockdevBackup { auto_finalize: Some(true), auto_dismiss: Some(false),
///     ..BlockdevBackup::new("backup-vda-libvirt-2-format", "libvirt-2-format", "libvirt-3-format", SyncMode::Full) };
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevBackup {
    /// The job's id; QEMU uses the device name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// The bitmap driving `incremental` and `bitmap` syncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What happens to `bitmap` at the end (required with a bitmap unless sync is incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Compress the target's clusters (qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Rate limit in bytes per second; 0 or absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Policy on read errors of the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_source_error: Option<BlockdevOnError>,
    /// Policy on write errors of the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_target_error: Option<BlockdevOnError>,
    /// Finalize by itself when done (QEMU's default true); false stops at `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Disappear by itself when concluded (QEMU's default true); false waits for `job-dismiss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Node name of the copy-before-write filter the job inserts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
    /// Discard source clusters once copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_source: Option<bool>,
    /// Unstable performance knobs.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "x-perf")]
    pub x_perf: Option<BackupPerf>,
}

impl BlockdevBackup {
    /// A backup job `job_id` from `device` to `target`, every option left to QEMU.
    pub fn new(
        job_id: impl Into<String>,
        device: impl Into<String>,
        target: impl Into<String>,
        sync: SyncMode,
    ) -> Self {
        BlockdevBackup {
            job_id: Some(job_id.into()),
            device: device.into(),
            target: target.into(),
            sync,
            bitmap: None,
            bitmap_mode: None,
            compress: None,
            speed: None,
            on_source_error: None,
            on_target_error: None,
            auto_finalize: None,
            auto_dismiss: None,
            filter_node_name: None,
            discard_source: None,
            x_perf: None,
        }
    }
}
