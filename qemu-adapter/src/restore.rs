//! Carrying out a [`RestorePlan`]: each chosen disk's backup chain is flattened with
//! `qemu-img convert` into a fresh standalone image, whose content digest is checked against
//! the catalogue before the image takes its final name.
//!
//! Contract:
//! - The chain on disk must be the chain the plan names (same images, top first); otherwise
//!   nothing is written.
//! - The result is always written to a temporary file in the destination directory; only a
//!   verified image is renamed to its final path (atomically, then the directory is fsynced).
//!   A failure or a digest mismatch removes the temporary file and leaves the destination as
//!   it was.
//! - New images never replace an existing file. Overwriting an existing disk is refused while
//!   a process (QEMU, qemu-storage-daemon, qemu-nbd) holds it ([`images::is_in_use`]), and
//!   keeps the disk's format.
//! - Disks are restored one after another; a failure stops at that disk and reports which
//!   disks were already restored.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use vbackup_core::catalogue::{Digest, DiskRestore, RestorePlan};
use vbackup_core::model::ImageFormat;

use crate::images::{self, ImageError};

/// Where restored disks go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// New qcow2 images `<dir>/<disk>.qcow2` (for a new domain definition); none may exist.
    NewImages {
        /// The directory.
        dir: PathBuf,
    },
    /// Replace existing disk images, by disk target; each keeps its format.
    Overwrite {
        /// Existing image path of each restored disk.
        disks: BTreeMap<String, PathBuf>,
    },
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// An image operation failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The chain on disk is not the one the catalogue records.
    #[error(
        "disk {disk}: the backing chain of {top} is {found:?}, the catalogue expects {expected:?}"
    )]
    ChainMismatch {
        /// The disk.
        disk: String,
        /// The top image.
        top: String,
        /// Paths found, top first.
        found: Vec<String>,
        /// Paths expected, top first.
        expected: Vec<String>,
    },
    /// The restored content does not hash to the stored digest.
    #[error("disk {disk}: restored content has digest {actual}, the backup recorded {expected}")]
    DigestMismatch {
        /// The disk.
        disk: String,
        /// The stored digest.
        expected: Digest,
        /// What the restored image hashes to.
        actual: Digest,
    },
    /// A new image would replace an existing file.
    #[error("disk {disk}: {path} already exists")]
    Exists {
        /// The disk.
        disk: String,
        /// The path.
        path: PathBuf,
    },
    /// The disk to overwrite is open in a running process.
    #[error("disk {disk}: {path} is in use by a running QEMU or storage daemon")]
    InUse {
        /// The disk.
        disk: String,
        /// The path.
        path: PathBuf,
    },
    /// No destination was given for a disk in the plan.
    #[error("disk {0}: no destination given for overwriting")]
    NoDestination(String),
    /// The plan names no image for a disk.
    #[error("disk {0}: the plan holds no image to restore from")]
    EmptyChain(String),
    /// A file system operation failed.
    #[error("disk {disk}: {op} {path}: {source}")]
    Io {
        /// The disk.
        disk: String,
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A disk failed after others were restored.
    #[error("restored {} disk(s) ({}) before failing: {source}", done.len(), done.iter().map(|d| d.disk.as_str()).collect::<Vec<_>>().join(", "))]
    Partial {
        /// The disks restored.
        done: Vec<RestoredDisk>,
        /// The failure.
        source: Box<RestoreError>,
    },
}

/// One restored disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// The disk target.
    pub disk: String,
    /// The final image path.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Its verified digest.
    pub digest: Digest,
}

/// Restores every disk of `plan` to `target`.
pub fn restore(
    plan: &RestorePlan,
    target: &RestoreTarget,
) -> Result<Vec<RestoredDisk>, RestoreError> {
    let mut done = Vec::new();
    for disk in &plan.disks {
        match restore_disk(disk, target) {
            Ok(r) => done.push(r),
            Err(e) if done.is_empty() => return Err(e),
            Err(e) => {
                return Err(RestoreError::Partial {
                    done,
                    source: Box::new(e),
                });
            }
        }
    }
    Ok(done)
}

/// Checks that the chain below the plan's top image is the one the catalogue recorded.
pub fn check_chain(disk: &DiskRestore) -> Result<(), RestoreError> {
    let expected: Vec<String> = disk.images.iter().map(|i| i.path.clone()).collect();
    let top = expected.first().cloned().unwrap_or_default();
    let found: Vec<String> = images::backing_chain(Path::new(&top))?
        .into_iter()
        .map(|l| l.path)
        .collect();
    if found != expected {
        return Err(RestoreError::ChainMismatch {
            disk: disk.disk.clone(),
            top,
            found,
            expected,
        });
    }
    Ok(())
}

fn restore_disk(disk: &DiskRestore, target: &RestoreTarget) -> Result<RestoredDisk, RestoreError> {
    check_chain(disk)?;
    let io = |op, path: &Path| {
        let disk = disk.disk.clone();
        let path = path.to_owned();
        move |source| RestoreError::Io {
            disk,
            op,
            path,
            source,
        }
    };
    let (dest, format) = match target {
        RestoreTarget::NewImages { dir } => {
            let dest = dir.join(format!("{}.qcow2", disk.disk));
            if dest.exists() {
                return Err(RestoreError::Exists {
                    disk: disk.disk.clone(),
                    path: dest,
                });
            }
            (dest, ImageFormat::Qcow2)
        }
        RestoreTarget::Overwrite { disks } => {
            let dest = disks
                .get(&disk.disk)
                .cloned()
                .ok_or_else(|| RestoreError::NoDestination(disk.disk.clone()))?;
            if images::is_in_use(&dest)? {
                return Err(RestoreError::InUse {
                    disk: disk.disk.clone(),
                    path: dest,
                });
            }
            let format = images::backing_chain(&dest)?
                .first()
                .map_or(ImageFormat::Qcow2, |l| l.format.clone());
            (dest, format)
        }
    };
    let dir = dest.parent().unwrap_or(Path::new("/")).to_owned();
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A restore killed before its rename left its copy behind: gone before this one starts.
    crate::children::clean_restore_leftovers(&dir);
    let temp = dir.join(format!(".{file_name}.restore-{}", std::process::id()));
    let result = (|| {
        let top = disk
            .top()
            .ok_or_else(|| RestoreError::EmptyChain(disk.disk.clone()))?;
        let mut command = Command::new("qemu-img");
        command
            .args(["convert", "-f", top.format.name(), "-O", format.name()])
            .arg(&top.path)
            .arg(&temp);
        crate::images::run(&mut command)?;
        let actual = images::content_digest(&temp, &format)?;
        if actual != disk.digest {
            return Err(RestoreError::DigestMismatch {
                disk: disk.disk.clone(),
                expected: disk.digest.clone(),
                actual,
            });
        }
        File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(io("fsync", &temp))?;
        if matches!(target, RestoreTarget::NewImages { .. }) && dest.exists() {
            return Err(RestoreError::Exists {
                disk: disk.disk.clone(),
                path: dest.clone(),
            });
        }
        std::fs::rename(&temp, &dest).map_err(io("rename", &dest))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &dir))?;
        Ok(RestoredDisk {
            disk: disk.disk.clone(),
            path: dest.clone(),
            format: format.clone(),
            digest: actual,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
