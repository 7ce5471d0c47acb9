//! The journal of the managed operation in flight: written before each step that can be
//! interrupted, read back by a restarted machine to conclude or undo what was left.

use serde::{Deserialize, Serialize};

/// A backup being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingBackup {
    /// Its uuid.
    pub uuid: String,
    /// The backup it is incremental to.
    pub parent: Option<String>,
    /// The checkpoint created with it.
    pub checkpoint: String,
    /// Free-form description.
    pub description: Option<String>,
    /// Seconds since the Unix epoch when it was asked for.
    pub creation_time: u64,
    /// Pull (read from exports by vbackup) rather than push (written by QEMU).
    pub pull: bool,
    /// `(disk, image path)`.
    pub images: Vec<(String, String)>,
    /// The per-backup directory vbackup creates (and removes when the backup fails).
    pub dir: Option<String>,
    /// The backup job may have begun: the engine was (or is about to be) asked.
    pub begun: bool,
}

/// A domain a restore defines over its new images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDomain {
    /// Its name.
    pub name: String,
    /// `(disk target, image path, format name)`.
    pub disks: Vec<(String, String, String)>,
}

/// The operation in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op")]
pub enum Journal {
    /// A backup is being created; concluded by `finish` (recorded or discarded).
    Create(PendingBackup),
    /// Backups are being deleted; repeated until done.
    Delete {
        /// The backup named, `None` for every backup of the domain.
        target: Option<String>,
        /// Children deleted too.
        with_children: bool,
        /// Checkpoints are kept.
        keep_checkpoints: bool,
        /// The images the deletion removes (removed again on restart: the records naming
        /// them may be gone already).
        #[serde(default)]
        files: Vec<String>,
        /// The per-backup directories it removes.
        #[serde(default)]
        dirs: Vec<String>,
    },
    /// New files are written beside their final names; `renames` are `(temporary, final)`.
    /// Until `committed` the temporaries are removed on restart; once committed (every new
    /// file checked against its digest and synced) the renames, the record and the
    /// checkpoint repair are finished on restart.
    Replace {
        /// `(temporary, final)` paths.
        renames: Vec<(String, String)>,
        /// Every temporary is complete and checked.
        committed: bool,
        /// The record to write once renamed (`<managedbackup>` text), for a consolidation.
        record: Option<String>,
        /// Disks whose image was replaced: their bitmaps are gone from the checkpoints.
        forget_disks: Vec<String>,
        /// A domain to define over the new images.
        define: Option<NewDomain>,
    },
}

impl Journal {
    /// The stored form (JSON).
    pub fn format(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads the stored form back.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}
