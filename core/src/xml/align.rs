//! Alignment of checkpoint and backup definitions with a domain's disks, as libvirt does it:
//! defaults are filled, unknown and duplicate disks are refused, and the result lists every
//! domain disk exactly once.

use super::backup::{
    BackupDef, BackupDisk, BackupDiskMode, BackupStorage, BackupStoreDef, DiskBackup,
};
use super::checkpoint::{CheckpointDef, CheckpointDiskDef, CheckpointKind};
use super::error::{Origin, XmlError, XmlErrorKind};
use crate::model::{DiskDef, DomainDef, ImageFormat, StorageType};
use std::collections::{BTreeMap, BTreeSet};

/// The domain's disks by target and by top-image path (a path shared by two disks maps to
/// `None`), so that alignment stays linear in the number of disks.
struct DiskIndex<'d> {
    by_target: BTreeMap<&'d str, &'d DiskDef>,
    by_path: BTreeMap<&'d str, Option<&'d DiskDef>>,
}

impl<'d> DiskIndex<'d> {
    fn new(domain: &'d DomainDef) -> Self {
        let mut by_target = BTreeMap::new();
        let mut by_path = BTreeMap::new();
        for disk in &domain.disks {
            by_target.entry(disk.target.as_str()).or_insert(disk);
            if let Some(path) = disk.top().and_then(|l| l.path.as_deref()) {
                by_path
                    .entry(path)
                    .and_modify(|d| *d = None)
                    .or_insert(Some(disk));
            }
        }
        Self { by_target, by_path }
    }

    fn target(&self, name: &str) -> Option<&'d DiskDef> {
        self.by_target.get(name).copied()
    }

    /// Like [`DomainDef::disk_by_target_or_path`].
    fn target_or_path(&self, name: &str) -> Option<&'d DiskDef> {
        self.target(name)
            .or_else(|| self.by_path.get(name).copied().flatten())
    }
}

const BACKUP_DISK: &str = "/domainbackup/disks/disk";
const CHECKPOINT_DISK: &str = "/domaincheckpoint/disks/disk";

fn fail(origin: Origin, path: &str, message: String) -> XmlError {
    XmlError::new(XmlErrorKind::Alignment, origin, path, message)
}

/// A checkpoint that cannot be aligned at all (it lacks what alignment starts from).
fn invalid_checkpoint(def: &CheckpointDef, message: &str) -> XmlError {
    XmlError::new(
        XmlErrorKind::Invalid,
        def.origin,
        "/domaincheckpoint",
        message,
    )
}

/// The file name generated for a disk that has no explicit target or scratch image:
/// `<path of the disk's top image>.<suffix>`. Only a disk whose top image is a local file gets
/// one; for any other disk the caller must name the image.
fn generated_store(
    disk: &DiskDef,
    suffix: &str,
    origin: Origin,
    path: &str,
) -> Result<BackupStoreDef, XmlError> {
    match disk.top() {
        Some(top) if top.storage == StorageType::File => match &top.path {
            Some(path) => Ok(BackupStoreDef {
                path: format!("{path}.{suffix}"),
                seclabels: Vec::new(),
                encryption: None,
            }),
            None => Err(refuse_generation(disk, origin, path)),
        },
        _ => Err(refuse_generation(disk, origin, path)),
    }
}

fn refuse_generation(disk: &DiskDef, origin: Origin, path: &str) -> XmlError {
    fail(
        origin,
        path,
        format!(
            "refusing to generate a file name for disk '{}': its source is not a local file",
            disk.target
        ),
    )
}

/// Aligns a backup definition with the domain it backs up.
///
/// - A domain without disks, a listed disk the domain does not have, a disk listed twice, an
///   incremental disk with no checkpoint named (on the disk or in `<incremental>`), and a
///   backed-up disk without media are refused.
/// - Without `<disks>` ("back up all"), every domain disk is added in domain order: writable
///   disks with media are backed up to a generated file `<source path>.<suffix>`, the others get
///   `backup='no'`. With `<disks>`, the unlisted domain disks are appended with `backup='no'`.
/// - Each backed-up disk gets `backupmode` (`incremental` when it or the backup names a
///   checkpoint, else `full`), inherits `<incremental>` when incremental without its own, and
///   gets the `qcow2` format when none was given.
/// - A listed, backed-up disk with no `<target>` or `<scratch>` gets a generated file name exactly
///   as in "back up all" mode. libvirt leaves such a disk with an empty path and its behaviour
///   from there is undefined; naming the file is what its documentation promises. A disk of
///   `type='block'` cannot get a generated device and is refused instead.
///
/// `suffix` is the name of the checkpoint created with the backup, or the current time in
/// seconds when there is none.
pub fn align_backup(
    def: &BackupDef,
    domain: &DomainDef,
    suffix: &str,
) -> Result<BackupDef, XmlError> {
    if domain.disks.is_empty() {
        return Err(fail(
            def.origin,
            "/domainbackup",
            "domain must have at least one disk to perform a backup".to_owned(),
        ));
    }
    let index = DiskIndex::new(domain);
    let mut seen = BTreeSet::new();
    for disk in &def.disks {
        let Some(dom_disk) = index.target(&disk.name) else {
            return Err(fail(
                disk.origin,
                BACKUP_DISK,
                format!("no disk named '{}'", disk.name),
            ));
        };
        if !seen.insert(disk.name.as_str()) {
            return Err(fail(
                disk.origin,
                BACKUP_DISK,
                format!("disk '{}' is specified twice", disk.name),
            ));
        }
        if let Some(backup) = &disk.backup {
            if backup.mode == Some(BackupDiskMode::Incremental)
                && backup.incremental.is_none()
                && def.incremental.is_none()
            {
                return Err(fail(
                    disk.origin,
                    BACKUP_DISK,
                    format!(
                        "disk '{}' uses backupmode 'incremental' but no checkpoint is named for it or for the backup",
                        disk.name
                    ),
                ));
            }
            if dom_disk.is_empty() {
                return Err(fail(
                    disk.origin,
                    BACKUP_DISK,
                    format!("disk '{}' has no media", disk.name),
                ));
            }
        }
    }

    let mut disks: Vec<BackupDisk> = def.disks.clone();
    let backup_all = def.disks.is_empty();
    for dom_disk in &domain.disks {
        if seen.contains(dom_disk.target.as_str()) {
            continue;
        }
        let backup = if backup_all && !dom_disk.is_empty() && !dom_disk.readonly {
            Some(DiskBackup {
                storage: BackupStorage::File,
                store: Some(generated_store(
                    dom_disk,
                    suffix,
                    def.origin,
                    "/domainbackup",
                )?),
                ..DiskBackup::default()
            })
        } else {
            None
        };
        disks.push(BackupDisk {
            name: dom_disk.target.clone(),
            backup,
            origin: Origin::default(),
        });
    }

    for disk in &mut disks {
        let origin = disk.origin;
        let Some(backup) = &mut disk.backup else {
            continue;
        };
        if backup.store.is_none() {
            if backup.storage == BackupStorage::Block {
                return Err(fail(
                    origin,
                    BACKUP_DISK,
                    format!(
                        "disk '{}' of type 'block' needs an explicit device path",
                        disk.name
                    ),
                ));
            }
            let dom_disk = index.target(&disk.name).ok_or_else(|| {
                fail(
                    origin,
                    BACKUP_DISK,
                    format!("no disk named '{}'", disk.name),
                )
            })?;
            backup.store = Some(generated_store(dom_disk, suffix, origin, BACKUP_DISK)?);
        }
        let checkpoint = backup
            .incremental
            .clone()
            .or_else(|| def.incremental.clone());
        let mode = *backup.mode.get_or_insert(if checkpoint.is_some() {
            BackupDiskMode::Incremental
        } else {
            BackupDiskMode::Full
        });
        if mode == BackupDiskMode::Incremental && backup.incremental.is_none() {
            backup.incremental = def.incremental.clone();
        }
        if backup.format.is_none() {
            backup.format = Some(ImageFormat::Qcow2);
        }
    }

    Ok(BackupDef {
        disks,
        ..def.clone()
    })
}

/// Aligns a checkpoint definition with the domain it is taken of (a copy of the domain's
/// current definition on create; the embedded `<domain>` on redefine).
///
/// - The checkpoint must have a name (fill the creation defaults first).
/// - More listed disks than the domain has, a domain without disks, a listed disk that matches
///   neither a target nor exactly one source path, a disk listed twice, and a tracked disk that
///   is empty or read-only are refused.
/// - The result has one entry per domain disk in domain order, named by target. Without
///   `<disks>`, writable disks with media are tracked and the others are not; with `<disks>`,
///   unlisted disks are not tracked. Tracked disks without a bitmap name get the checkpoint's.
pub fn align_checkpoint(
    def: &CheckpointDef,
    domain: &DomainDef,
) -> Result<CheckpointDef, XmlError> {
    let Some(name) = def.name.as_deref() else {
        return Err(invalid_checkpoint(
            def,
            "the checkpoint has no name to align with",
        ));
    };
    if def.disks.len() > domain.disks.len() {
        return Err(fail(
            def.origin,
            "/domaincheckpoint/disks",
            "too many disk checkpoint requests for the domain".to_owned(),
        ));
    }
    if domain.disks.is_empty() {
        return Err(fail(
            def.origin,
            "/domaincheckpoint",
            "domain must have at least one disk to perform checkpoints".to_owned(),
        ));
    }
    let index = DiskIndex::new(domain);
    let mut listed: BTreeMap<&str, &CheckpointDiskDef> = BTreeMap::new();
    for disk in &def.disks {
        let Some(dom_disk) = index.target_or_path(&disk.name) else {
            return Err(fail(
                disk.origin,
                CHECKPOINT_DISK,
                format!("no disk named '{}'", disk.name),
            ));
        };
        if listed.insert(dom_disk.target.as_str(), disk).is_some() {
            return Err(fail(
                disk.origin,
                CHECKPOINT_DISK,
                format!("disk '{}' is specified twice", disk.name),
            ));
        }
        if disk.checkpoint != CheckpointKind::No && (dom_disk.is_empty() || dom_disk.readonly) {
            return Err(fail(
                disk.origin,
                CHECKPOINT_DISK,
                format!("disk '{}' is empty or read-only", disk.name),
            ));
        }
    }
    let disks = domain
        .disks
        .iter()
        .map(|dom_disk| {
            let (checkpoint, bitmap, size_bytes, origin) =
                match listed.get(dom_disk.target.as_str()) {
                    Some(d) => (d.checkpoint, d.bitmap.clone(), d.size_bytes, d.origin),
                    None if def.disks.is_empty() && !dom_disk.is_empty() && !dom_disk.readonly => {
                        (CheckpointKind::Bitmap, None, None, Origin::default())
                    }
                    None => (CheckpointKind::No, None, None, Origin::default()),
                };
            let bitmap = match checkpoint {
                CheckpointKind::Bitmap => Some(bitmap.unwrap_or_else(|| name.to_owned())),
                CheckpointKind::No => None,
            };
            CheckpointDiskDef {
                name: dom_disk.target.clone(),
                checkpoint,
                bitmap,
                size_bytes,
                origin,
            }
        })
        .collect();
    Ok(CheckpointDef {
        disks,
        ..def.clone()
    })
}

/// Prepares a checkpoint being redefined (re-inserted from stored metadata) for `vm`.
///
/// It must have a name and a creation time. With an embedded `<domain>`, that domain's uuid
/// must be `vm`'s and the disks are aligned with it; without one, tracked disks only get their
/// default bitmap name.
pub fn align_redefined_checkpoint(
    def: &CheckpointDef,
    vm: &DomainDef,
) -> Result<CheckpointDef, XmlError> {
    let Some(name) = def.name.as_deref() else {
        return Err(invalid_checkpoint(
            def,
            "a redefined checkpoint must have a name",
        ));
    };
    if def.creation_time.is_none() {
        return Err(invalid_checkpoint(
            def,
            "a redefined checkpoint must have a <creationTime>",
        ));
    }
    match &def.domain_xml {
        Some(xml) => {
            let embedded = super::domain::parse_domain(xml).map_err(|mut e| {
                e.position = def.origin.0;
                e.path = format!("/domaincheckpoint{}", e.path);
                e
            })?;
            if let (Some(theirs), Some(ours)) = (&embedded.uuid, &vm.uuid)
                && theirs != ours
            {
                return Err(fail(
                    def.origin,
                    "/domaincheckpoint/domain",
                    format!("definition for checkpoint '{name}' must use uuid {ours}"),
                ));
            }
            align_checkpoint(def, &embedded)
        }
        None => {
            let mut out = def.clone();
            for disk in &mut out.disks {
                if disk.checkpoint == CheckpointKind::Bitmap && disk.bitmap.is_none() {
                    disk.bitmap = Some(name.to_owned());
                }
            }
            Ok(out)
        }
    }
}
