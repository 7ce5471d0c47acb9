//! Checkpoints: the metadata objects, their tree, list filters and delete planning.
//!
//! A checkpoint is a named moment of a domain. Each participating disk holds one persistent,
//! recording dirty bitmap named after it; the bitmaps of different checkpoints are independent.
//! The tree here is metadata only: it never talks to QEMU. The domain state machine asks QEMU
//! first and changes the tree only after QEMU confirmed.

mod convert;
pub(crate) mod ops;
mod tree;

pub use tree::{CheckpointTree, DeleteScope, ListFilter, TreeChange};

use serde::{Deserialize, Serialize};

/// One checkpoint's metadata, aligned against the domain: one entry per disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Unique name within the domain.
    pub name: String,
    /// Free-form description.
    pub description: Option<String>,
    /// The parent checkpoint, `None` for a root.
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub creation_time_s: i64,
    /// Per-disk choice, in domain order.
    pub disks: Vec<CheckpointDisk>,
    /// The inactive domain definition at the time of the checkpoint, as `<domain>` XML, when
    /// recorded.
    pub domain_xml: Option<String>,
}

/// One disk of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDisk {
    /// Disk target (`vda`).
    pub target: String,
    /// The bitmap that records for this checkpoint; `None` when the disk is not part of it
    /// (`checkpoint='no'`).
    pub bitmap: Option<String>,
    /// Bytes dirtied since the checkpoint; filled only when the size was asked for.
    pub size_bytes: Option<u64>,
}

impl Checkpoint {
    /// The disks that carry a bitmap, with the bitmap name.
    pub fn bitmap_disks(&self) -> impl Iterator<Item = (&str, &str)> {
        self.disks
            .iter()
            .filter_map(|d| d.bitmap.as_deref().map(|b| (d.target.as_str(), b)))
    }
}
