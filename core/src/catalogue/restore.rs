//! Restore planning: which images to read for a backup's disks and what digest the result must
//! have.

use super::CatalogueError;
use super::index::Catalogue;
use super::record::{BackupImage, Digest};
use crate::model::ImageFormat;

/// How to restore one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRestore {
    /// The disk target.
    pub disk: String,
    /// The images of the disk's backing chain, top first: the backup's own image, then its
    /// parent's, down to the full backup's. Converting the first one reads through all of them.
    pub images: Vec<BackupImage>,
    /// Guest-visible size of the restored disk.
    pub virtual_size_bytes: u64,
    /// Format of the top image.
    pub format: ImageFormat,
    /// What the restored content must hash to.
    pub digest: Digest,
}

impl DiskRestore {
    /// The image to convert (the top of the chain); a plan always has one.
    pub fn top(&self) -> Option<&BackupImage> {
        self.images.first()
    }
}

/// How to restore a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// The backup restored.
    pub backup: String,
    /// Its domain.
    pub domain: String,
    /// One entry per chosen disk, in the backup's disk order.
    pub disks: Vec<DiskRestore>,
}

impl Catalogue {
    /// Plans the restore of the chain of backup `uuid` up to backup `until`: the disks as they
    /// were at `until`'s point in time. `until` must lie on one chain with `uuid`: an ancestor
    /// of it, itself, or a backup built on it (directly or not); otherwise the plan is refused
    /// with [`CatalogueError::NotInChain`]. The plan is then the restore of `until`.
    pub fn plan_restore_until(
        &self,
        uuid: &str,
        until: &str,
        disks: &[&str],
    ) -> Result<RestorePlan, CatalogueError> {
        let ancestors = self.chain(uuid)?;
        let up_to = self.chain(until)?;
        let related =
            ancestors.iter().any(|b| b.uuid == until) || up_to.iter().any(|b| b.uuid == uuid);
        if !related {
            return Err(CatalogueError::NotInChain {
                uuid: uuid.to_owned(),
                until: until.to_owned(),
            });
        }
        self.plan_restore(until, disks)
    }

    /// Plans the restore of backup `uuid` for `disks` (every disk of the backup when empty).
    /// Refused for an unknown backup or a disk the backup does not hold.
    pub fn plan_restore(&self, uuid: &str, disks: &[&str]) -> Result<RestorePlan, CatalogueError> {
        let chain = self.chain(uuid)?;
        let backup = *chain
            .last()
            .ok_or_else(|| CatalogueError::NotFound(uuid.to_owned()))?;
        for disk in disks {
            if backup.image(disk).is_none() {
                return Err(CatalogueError::NoSuchDisk {
                    uuid: uuid.to_owned(),
                    disk: (*disk).to_owned(),
                });
            }
        }
        let mut plan = RestorePlan {
            backup: backup.uuid.clone(),
            domain: backup.domain.clone(),
            disks: Vec::new(),
        };
        for top in &backup.disks {
            if !disks.is_empty() && !disks.contains(&top.disk.as_str()) {
                continue;
            }
            let mut images = Vec::with_capacity(chain.len());
            for b in chain.iter().rev() {
                // Insert guarantees every ancestor has the disk; a store edited by hand may not.
                let image = b
                    .image(&top.disk)
                    .ok_or_else(|| CatalogueError::Inconsistent {
                        uuid: b.uuid.clone(),
                        reason: format!(
                            "disk '{}' is missing from this link of the chain",
                            top.disk
                        ),
                    })?;
                images.push(image.clone());
            }
            plan.disks.push(DiskRestore {
                disk: top.disk.clone(),
                virtual_size_bytes: top.virtual_size_bytes,
                format: top.format.clone(),
                digest: top.digest.clone(),
                images,
            });
        }
        Ok(plan)
    }
}
