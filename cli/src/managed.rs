//! Managed backups: backups vbackup creates, catalogues, restores and deletes itself, on top of
//! the job commands (`backup-begin`) and the catalogue of the core.
//!
//! Contract:
//! - A managed backup is recorded in the catalogue (`backups/<uuid>.xml` of the domain's store)
//!   only once its images are complete and described (sizes and content digest). Until then a
//!   `pending-backup.json` in the domain's directory names the backup, its checkpoint and its
//!   images; an interrupted or failed backup is cleaned up from it (images removed, the
//!   checkpoint deleted so its bitmap merges back into its parent's) by `backup-finish
//!   --cancel` or by the next `backup-create`. So the next incremental from the parent still
//!   covers every change.
//! - Push backups write into `<default target>/<uuid>/<disk>.qcow2` (or the targets the
//!   `<domainbackup>` names). QEMU writes an incremental image as a standalone qcow2 holding
//!   only the changed clusters; it is then given its parent backup's image as backing file
//!   without copying anything (`qemu-img rebase -u`), which is exactly its meaning.
//! - Pull backups are read with vbackup's own NBD client from the export of the managed
//!   daemon: only the dirty extents (incremental) or the allocated ones (full) are stored, in a
//!   qcow2 overlay of the parent backup's image or a fresh qcow2. The job is then ended.
//! - Restores are verified against the recorded digest before an image takes its final name.
//!   `backup-restore B --until U` restores the disks as they were at U's point in time, U being
//!   on one chain with B (an ancestor of B, B itself, or a backup built on B); any other U is
//!   refused before anything is written.
//! - Deleting backups deletes the checkpoints they created (alone, through the engine), since
//!   a checkpoint only serves as the base of later incrementals from its backup; the
//!   checkpoints of remaining backups and the user's own checkpoints stay. Checkpoints go
//!   before records and records before images, so an interrupted deletion leaves the backups
//!   it did not reach catalogued and restorable, and repeating it finishes the work.
//! - A pull copy shows one progress bar per disk on a terminal (none with `--json` or when
//!   stderr is not a terminal).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};
use vbackup_core::backup::BackupSpec;
use vbackup_core::catalogue::{
    BackupKind, Catalogue, CatalogueOp, ListFilter, ManagedBackup, validate_uuid,
};
use vbackup_core::checkpoint::DeleteScope;
use vbackup_core::domain::{Reply, Request};
use vbackup_core::error::{Error as EngineError, RequestError};
use vbackup_core::export::{STATE_DIRTY, STATE_ZERO};
use vbackup_core::managed::{
    Managed, ManagedError, ManagedReply, ManagedRequest, RestoreRequest, RestoreTarget,
};
use vbackup_core::xml::{
    BackupDef, BackupDisk, BackupMode, BackupStore, DiskBackup, Origin, align_backup,
};
use vbackup_host::managed_runtime::{self, ManagedHost};
use vbackup_qemu::images;
use vbackup_qemu::nbd::{BASE_ALLOCATION, NbdClient, copy::select_ranges, dirty_bitmap_context};
use vbackup_qemu::qsd::{RunDir, daemon_alive};
use vbackup_qemu::store::{DomainStore, Store, write_atomic};

use crate::commands;
use crate::effects::COMPLETED_FILE;
use crate::output::{CliError, format_time, human_bytes, print_json, table};
use crate::session::{self, Attachment, Loaded, Session};
use crate::virsh_args::{DomainArg, fill, required};

/// The unfinished managed backup of a domain, beside its `domain.xml`.
pub const PENDING_FILE: &str = "pending-backup.json";

/// Managed backup commands (named like the rest of vbackup's `backup-*` commands).
#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)]
pub enum ManagedCommand {
    /// Create a managed backup (full, or incremental from --parent) with a checkpoint.
    BackupCreate {
        #[command(flatten)]
        dom: DomainArg,
        /// `<domainbackup>` file (default: every disk, into the default target directory; or
        /// `--backupxml FILE`).
        #[arg(value_name = "BACKUPXML")]
        backupxml: Option<String>,
        /// `<domainbackup>` file, as virsh's named form of BACKUPXML.
        #[arg(long = "backupxml", id = "backupxml_named", value_name = "FILE")]
        backupxml_named: Option<String>,
        /// Name of the checkpoint created with the backup (default: the backup's uuid).
        #[arg(long)]
        checkpoint: Option<String>,
        /// The backup this one is incremental to.
        #[arg(long)]
        parent: Option<String>,
        /// Free-form description.
        #[arg(long)]
        description: Option<String>,
        /// Read the disks over NBD with vbackup's client instead of letting QEMU push them.
        #[arg(long)]
        pull: bool,
        /// Wait for a push backup to finish and record it (pull backups always finish).
        #[arg(long)]
        wait: bool,
        /// Machine-readable output: one JSON object (the recorded backup, or the started
        /// one's uuid), no progress bar.
        #[arg(long)]
        json: bool,
    },
    /// List a domain's managed backups.
    BackupList {
        #[command(flatten)]
        dom: DomainArg,
        /// Only full backups.
        #[arg(long, conflicts_with = "latest")]
        full: bool,
        /// Only the chain of the most recent backup.
        #[arg(long)]
        latest: bool,
        /// Show the backups as a tree of parents and children.
        #[arg(long)]
        tree: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the backups built directly on a backup.
    BackupChildren {
        /// Backup uuid.
        uuid: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a managed backup.
    BackupInfo {
        /// Backup uuid.
        uuid: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check a managed backup without restoring it: every image of its chain is there and each
    /// disk's content, read through the chain as a restore reads it, matches the digest recorded
    /// when the backup was taken. Exits non-zero when a disk fails.
    BackupVerify {
        /// Backup uuid.
        uuid: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a managed backup, its images and the checkpoint it created.
    ///
    /// A backup's checkpoint only serves as the base of later incrementals from that backup;
    /// once the backup is deleted nothing can be built on it, so its checkpoint (metadata and
    /// bitmaps) is deleted with it, alone: other checkpoints and their bitmaps are kept, and
    /// so is a checkpoint another remaining backup names. The checkpoint of every remaining
    /// backup stays, so incrementals can still be built on any of them. Checkpoints are
    /// deleted first, records next, images last: if a step fails, the backups not yet removed
    /// stay catalogued and restorable, and running the command again finishes the deletion.
    /// Deleting a checkpoint needs QEMU; with --keep-checkpoints the backups go without it and
    /// their checkpoints stay (delete them later with checkpoint-delete).
    BackupDelete {
        /// Backup uuid (with --all: the domain name).
        target: String,
        /// Also delete every backup built on it.
        #[arg(long, conflicts_with = "all")]
        children: bool,
        /// Delete every backup of the domain named instead.
        #[arg(long)]
        all: bool,
        /// Keep the checkpoints the deleted backups created (no QEMU needed).
        #[arg(long)]
        keep_checkpoints: bool,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Restore a managed backup to new images (and a new domain) or over the domain's disks.
    ///
    /// The result is the disks as they were at the backup's point in time (with --until: at
    /// that backup's point in time), checked against the digest recorded in the catalogue.
    BackupRestore {
        /// Backup uuid: the backup restored, or with --until any backup of the chain.
        uuid: String,
        /// Restore the chain of UUID only up to this backup: the disks as they were at its
        /// point in time. It must be on one chain with UUID (an ancestor of it, UUID itself,
        /// or a backup built on it, directly or not); any other backup is refused.
        #[arg(long, value_name = "UUID")]
        until: Option<String>,
        /// Define a new domain on the restored images.
        #[arg(long, requires = "dir")]
        new_domain: Option<String>,
        /// Directory of the new images `<dir>/<disk>.qcow2`.
        #[arg(long, conflicts_with = "overwrite")]
        dir: Option<PathBuf>,
        /// Only these disks (repeatable; default: every disk of the backup).
        #[arg(long)]
        disk: Vec<String>,
        /// Replace the domain's own disk images (only while it is not running).
        #[arg(long)]
        overwrite: bool,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Make an incremental backup a full backup of its own (a synthetic full).
    ///
    /// Each of its images gets the data it read from its parents' images, so it no longer needs
    /// them; its content, checked against the recorded digest, does not change, and backups
    /// built on it stay valid. Its former ancestors remain a chain of their own and can then be
    /// deleted without it.
    BackupConsolidate {
        /// Backup uuid.
        uuid: String,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Finish a domain's managed backup: wait for it and record it, check it, or cancel it.
    BackupFinish {
        #[command(flatten)]
        dom: DomainArg,
        /// Cancel the job and discard the backup.
        #[arg(long, conflicts_with = "check")]
        cancel: bool,
        /// Only report whether the job is done (recording it if it is).
        #[arg(long)]
        check: bool,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Print the directory new managed backups of a domain go to.
    BackupGetDefaultTarget {
        #[command(flatten)]
        dom: DomainArg,
        /// Machine-readable output (`{domain, target}`, `target` null when none is set).
        #[arg(long)]
        json: bool,
    },
    /// Set the directory new managed backups of a domain go to.
    BackupSetDefaultTarget {
        #[command(flatten)]
        dom: DomainArg,
        /// Directory (created if missing).
        #[arg(value_name = "DIR")]
        dir: Option<String>,
    },
}

/// Runs a managed backup command.
pub fn run(global: &commands::Global, command: ManagedCommand) -> Result<(), CliError> {
    let store = session::open_store(global.state_dir.as_deref())?;
    match command {
        ManagedCommand::BackupCreate {
            dom,
            backupxml,
            backupxml_named,
            checkpoint,
            parent,
            description,
            pull,
            wait,
            json,
        } => {
            let [domain, backupxml] = fill(
                [("domain", dom.domain_named), ("backupxml", backupxml_named)],
                [dom.domain, backupxml],
            )?;
            let domain = required("backup-create", "domain", domain)?;
            let xml = backupxml.map(|p| read(Path::new(&p))).transpose()?;
            create(
                &store,
                &domain,
                &CreateArgs {
                    xml,
                    checkpoint,
                    parent,
                    description,
                    pull,
                    wait,
                    json,
                },
            )
        }
        ManagedCommand::BackupList {
            dom,
            full,
            latest,
            tree,
            json,
        } => list(&store, &dom.get("backup-list")?, full, latest, tree, json),
        ManagedCommand::BackupChildren { uuid, json } => children(&store, &uuid, json),
        ManagedCommand::BackupInfo { uuid, json } => info(&store, &uuid, json),
        ManagedCommand::BackupVerify { uuid, json } => verify(&store, &uuid, json),
        ManagedCommand::BackupDelete {
            target,
            children,
            all,
            keep_checkpoints,
            json,
        } => delete(&store, &target, children, all, keep_checkpoints, json),
        ManagedCommand::BackupRestore {
            uuid,
            until,
            new_domain,
            dir,
            disk,
            overwrite,
            json,
        } => restore_cmd(
            &store,
            &RestoreArgs {
                uuid,
                until,
                new_domain,
                dir,
                disks: disk,
                overwrite,
                json,
            },
        ),
        ManagedCommand::BackupConsolidate { uuid, json } => consolidate(&store, &uuid, json),
        ManagedCommand::BackupFinish {
            dom,
            cancel,
            check,
            json,
        } => finish(&store, &dom.get("backup-finish")?, cancel, check, json),
        ManagedCommand::BackupGetDefaultTarget { dom, json } => {
            get_default_target(&store, &dom.get("backup-get-default-target")?, json)
        }
        ManagedCommand::BackupSetDefaultTarget { dom, dir } => {
            let command = "backup-set-default-target";
            let [domain, dir] = fill(
                [("domain", dom.domain_named), ("dir", None)],
                [dom.domain, dir],
            )?;
            let domain = required(command, "domain", domain)?;
            let dir = required(command, "dir", dir)?;
            set_default_target(&store, &domain, Path::new(&dir))
        }
    }
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(CliError::io(format!("cannot read '{}'", path.display())))
}

fn catalogue_error(e: vbackup_core::catalogue::CatalogueError) -> CliError {
    CliError::Other(format!("invalid argument: {e}"))
}

fn io_error(e: images::CatalogueIoError) -> CliError {
    CliError::Other(format!("operation failed: {e}"))
}

/// The catalogue of a locked domain.
fn catalogue(store: &DomainStore) -> Result<Catalogue, CliError> {
    // A damaged record affects only itself: the intact backups load.
    let stored = managed_runtime::stored_managed(store)?;
    Ok(Managed::new(store.name(), stored).catalogue().clone())
}

/// The domain holding backup `uuid`, intact or with a damaged record.
fn find_domain(store: &Store, uuid: &str) -> Result<String, CliError> {
    validate_uuid(uuid).map_err(catalogue_error)?;
    let mut busy = Vec::new();
    for name in store.list_domains()? {
        let ds = match store.lock_domain(&name) {
            Ok(ds) => ds,
            Err(vbackup_qemu::store::StoreError::Locked { .. }) => {
                busy.push(name);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let m = Managed::new(ds.name(), managed_runtime::stored_managed(&ds)?);
        let damaged = m.damaged().iter().any(|d| d.uuid.as_deref() == Some(uuid));
        if m.catalogue().get(uuid).is_some() || damaged {
            return Ok(name);
        }
    }
    Err(not_found(uuid, &busy))
}

fn not_found(uuid: &str, busy: &[String]) -> CliError {
    if busy.is_empty() {
        CliError::Other(format!(
            "Domain backup not found: no backup with uuid '{uuid}'"
        ))
    } else {
        CliError::Other(format!(
            "Domain backup not found: no backup with uuid '{uuid}' (domains busy with another vbackup command, not searched: {})",
            busy.join(", ")
        ))
    }
}

/// Asks the managed-backup machine of `loaded`'s domain.
fn ask(
    store: &Store,
    loaded: Loaded,
    request: ManagedRequest,
) -> Result<(Result<ManagedReply, ManagedError>, Catalogue), CliError> {
    let mut host = ManagedHost::open(store, loaded)?;
    let answer = host.run(request);
    let catalogue = host.machine().catalogue().clone();
    host.close()?;
    Ok((answer?, catalogue))
}

fn managed_error(e: ManagedError) -> CliError {
    CliError::Other(e.to_string())
}

/// The domain holding backup `uuid`, locked, with its catalogue.
fn find(store: &Store, uuid: &str) -> Result<(DomainStore, Catalogue), CliError> {
    validate_uuid(uuid).map_err(catalogue_error)?;
    let mut busy = Vec::new();
    for name in store.list_domains()? {
        // A domain another vbackup holds is skipped, so one running backup does not block
        // lookups in the others; it is named if the backup is found nowhere else.
        let ds = match store.lock_domain(&name) {
            Ok(ds) => ds,
            Err(vbackup_qemu::store::StoreError::Locked { .. }) => {
                busy.push(name);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let cat = catalogue(&ds)?;
        if cat.get(uuid).is_some() {
            return Ok((ds, cat));
        }
    }
    Err(not_found(uuid, &busy))
}

/// Backup `uuid` of a catalogue [`find`] returned (so present unless the catalogue changed).
fn backup_in<'c>(cat: &'c Catalogue, uuid: &str) -> Result<&'c ManagedBackup, CliError> {
    cat.get(uuid).ok_or_else(|| {
        catalogue_error(vbackup_core::catalogue::CatalogueError::NotFound(
            uuid.to_owned(),
        ))
    })
}

// ----- pending backups -----

/// What is needed to record, or to discard, a backup whose job has begun.
#[derive(Debug, Clone)]
struct Pending {
    uuid: String,
    parent: Option<String>,
    checkpoint: String,
    description: Option<String>,
    creation_time: u64,
    pull: bool,
    /// `(disk, image path)`.
    images: Vec<(String, String)>,
}

impl Pending {
    fn to_json(&self) -> Value {
        json!({
            "uuid": self.uuid,
            "parent": self.parent,
            "checkpoint": self.checkpoint,
            "description": self.description,
            "creationTime": self.creation_time,
            "mode": if self.pull { "pull" } else { "push" },
            "images": self.images.iter().map(|(d, p)| json!({"disk": d, "path": p})).collect::<Vec<_>>(),
        })
    }

    fn from_json(v: &Value) -> Option<Pending> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let images = v
            .get("images")?
            .as_array()?
            .iter()
            .map(|i| {
                Some((
                    i.get("disk")?.as_str()?.to_owned(),
                    i.get("path")?.as_str()?.to_owned(),
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Pending {
            uuid: s("uuid")?,
            parent: s("parent"),
            checkpoint: s("checkpoint")?,
            description: s("description"),
            creation_time: v.get("creationTime")?.as_u64()?,
            pull: s("mode")? == "pull",
            images,
        })
    }

    fn write(&self, store: &DomainStore) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        write_atomic(store.dir(), PENDING_FILE, text.as_bytes())?;
        Ok(())
    }

    fn read(dir: &Path) -> Result<Option<Pending>, CliError> {
        let path = dir.join(PENDING_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| Pending::from_json(&v))
                .map(Some)
                .ok_or_else(|| CliError::Corrupt(format!("'{}' does not parse", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CliError::Io {
                what: format!("cannot read '{}'", path.display()),
                source: e,
            }),
        }
    }

    fn clear(dir: &Path) -> Result<(), CliError> {
        match std::fs::remove_file(dir.join(PENDING_FILE)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CliError::Io {
                what: "cannot remove the pending backup".into(),
                source: e,
            }),
        }
    }
}

/// Removes a partial image: a qemu-nbd left serving it by an interrupted vbackup is stopped
/// first (by its pid), then the file and its per-backup directory go.
fn remove_partial_image(path: &Path) {
    if let Ok(Some(pid)) = images::holder_pid(path) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "qemu-nbd" {
            let _ = vbackup_qemu::qsd::kill_pid(pid);
            // Wait for it to let go of the file (it is not our child, so it cannot be reaped).
            for _ in 0..200 {
                if !daemon_alive(pid)
                    && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_err()
                {
                    break;
                }
                if !matches!(images::holder_pid(path), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent()
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| validate_uuid(n).is_ok())
    {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Discards a pending backup in a session with no job running: images removed, its
/// checkpoint deleted (its bitmap merges into the parent checkpoint's), the marker removed.
fn discard(s: &mut Session, dir: &Path, pending: &Pending) -> Result<(), CliError> {
    for (_, path) in &pending.images {
        remove_partial_image(Path::new(path));
    }
    let exists = s
        .driver
        .domain()
        .view()
        .checkpoints
        .get(&pending.checkpoint)
        .is_some();
    if exists {
        s.call(Request::CheckpointDelete {
            name: pending.checkpoint.clone(),
            scope: DeleteScope::Single,
            metadata_only: false,
        })?;
    }
    Pending::clear(dir)
}

/// Ends the running job (abort) and waits until it is over.
fn end_job(s: &mut Session) -> Result<(), CliError> {
    use vbackup_core::link::Link;
    if !s.job_running() {
        return Ok(());
    }
    s.call(Request::AbortJob)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.job_running() && std::time::Instant::now() < deadline {
        let until = s.driver.link().now().plus_ms(200);
        s.driver.step(Some(until))?;
    }
    if s.job_running() {
        return Err(CliError::Other(
            "operation failed: the backup job did not end within 60 s".into(),
        ));
    }
    Ok(())
}

/// Whether the last finished job succeeded, as the store recorded it, and finished after the
/// pending backup was written (so it is that backup's job, not an older one).
fn last_job_succeeded(dir: &Path) -> bool {
    let modified = |name: &str| std::fs::metadata(dir.join(name)).and_then(|m| m.modified());
    match (modified(COMPLETED_FILE), modified(PENDING_FILE)) {
        (Ok(done), Ok(pending)) if done >= pending => {}
        _ => return false,
    }
    std::fs::read_to_string(dir.join(COMPLETED_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("success").and_then(Value::as_bool))
        .unwrap_or(false)
}

/// Records a pending backup whose images are complete.
fn record(store: &DomainStore, pending: &Pending) -> Result<ManagedBackup, CliError> {
    let mut cat = catalogue(store)?;
    let parent = match &pending.parent {
        Some(p) => Some(cat.get(p).cloned().ok_or_else(|| {
            CliError::Other(format!("operation failed: parent backup '{p}' is gone"))
        })?),
        None => None,
    };
    let mut disks = Vec::new();
    for (disk, path) in &pending.images {
        if !pending.pull
            && let Some(parent) = &parent
        {
            // QEMU wrote only the changed clusters into a standalone image: giving it the
            // parent's image as backing file, without copying, is its exact meaning.
            let backing = parent.image(disk).ok_or_else(|| {
                CliError::Other(format!(
                    "operation failed: parent backup has no image of disk '{disk}'"
                ))
            })?;
            rebase_unsafe(Path::new(path), Path::new(&backing.path))?;
        }
        disks.push(
            images::describe(disk, Path::new(path))
                .map_err(|e| CliError::Other(format!("operation failed: {e}")))?,
        );
    }
    let backup = ManagedBackup {
        uuid: pending.uuid.clone(),
        domain: store.name().to_owned(),
        parent: pending.parent.clone(),
        checkpoint: Some(pending.checkpoint.clone()),
        creation_time: pending.creation_time,
        sequence: Some(cat.next_sequence()),
        description: pending.description.clone(),
        kind: if pending.parent.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        disks,
    };
    let ops = cat.insert(backup.clone()).map_err(catalogue_error)?;
    images::apply_ops(store, &ops).map_err(io_error)?;
    Pending::clear(store.dir())?;
    Ok(backup)
}

fn rebase_unsafe(path: &Path, backing: &Path) -> Result<(), CliError> {
    let out = Process::new("qemu-img")
        .args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(path)
        .output()
        .map_err(CliError::io("cannot run qemu-img rebase"))?;
    if !out.status.success() {
        return Err(CliError::Other(format!(
            "operation failed: qemu-img rebase of '{}': {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

// ----- backup-create -----

struct CreateArgs {
    xml: Option<String>,
    checkpoint: Option<String>,
    parent: Option<String>,
    description: Option<String>,
    pull: bool,
    wait: bool,
    json: bool,
}

/// The first of `images` whose file is gone.
fn missing_image(
    images: &[vbackup_core::catalogue::BackupImage],
) -> Option<&vbackup_core::catalogue::BackupImage> {
    images.iter().find(|i| !Path::new(&i.path).exists())
}

/// Refuses an incremental on `parent` when an image of `disk` in its chain is gone: the new
/// backup could never be restored.
fn check_chain_images(cat: &Catalogue, parent: &str, disk: &str) -> Result<(), CliError> {
    for b in cat.chain(parent).map_err(catalogue_error)? {
        if let Some(img) = b.image(disk)
            && !Path::new(&img.path).exists()
        {
            return Err(CliError::Other(format!(
                "invalid argument: the image of disk '{disk}' of backup '{}' ('{}') is missing, so a backup built on '{parent}' could never be restored; take a full backup (without --parent)",
                b.uuid, img.path
            )));
        }
    }
    Ok(())
}

fn create(store: &Store, name: &str, args: &CreateArgs) -> Result<(), CliError> {
    let loaded = session::load(store, name)?;
    let cat = catalogue(&loaded.store)?;
    let stale = Pending::read(loaded.store.dir())?;
    if stale.is_some() && loaded.journal.is_some() {
        return Err(CliError::Other(
            "Requested operation is not valid: a managed backup is still running; finish it with backup-finish"
                .into(),
        ));
    }
    let uuid = uuid::Uuid::new_v4().to_string();
    let parent = match &args.parent {
        Some(p) => Some(cat.get(p).cloned().ok_or_else(|| {
            catalogue_error(vbackup_core::catalogue::CatalogueError::NotFound(p.clone()))
        })?),
        None => None,
    };
    let from = match &parent {
        Some(p) => Some(p.checkpoint.clone().ok_or_else(|| {
            CliError::Other(format!(
                "invalid argument: backup '{}' has no checkpoint to be incremental from",
                p.uuid
            ))
        })?),
        None => None,
    };
    let checkpoint_name = args.checkpoint.clone().unwrap_or_else(|| uuid.clone());
    let checkpoint = commands::new_checkpoint(
        &format!(
            "<domaincheckpoint><name>{}</name></domaincheckpoint>",
            commands::esc(&checkpoint_name)
        ),
        &loaded,
    )?;

    let mut def = BackupDef::parse(args.xml.as_deref().unwrap_or("<domainbackup/>"))?;
    if args.pull {
        def.mode = BackupMode::Pull;
    }
    if def.mode == BackupMode::Pull && loaded.attachment != Attachment::Managed {
        return Err(CliError::Other(
            "Requested operation is not supported: managed pull backups read the exports of a managed domain's daemon".into(),
        ));
    }
    def.incremental = from.clone();
    if def.disks.is_empty() {
        def.disks = loaded
            .def
            .disks
            .iter()
            .filter(|d| !d.is_empty() && !d.readonly)
            .map(|d| BackupDisk {
                name: d.target.clone(),
                backup: Some(DiskBackup::default()),
                origin: Origin::default(),
            })
            .collect();
    }
    let mut image_paths = Vec::new();
    for disk in &mut def.disks {
        let Some(backup) = &mut disk.backup else {
            continue;
        };
        // Every disk is incremental from the parent's checkpoint, or full.
        backup.incremental = None;
        backup.mode = None;
        if let Some(parent) = &parent
            && parent.image(&disk.name).is_none()
        {
            return Err(CliError::Other(format!(
                "invalid argument: parent backup '{}' has no image of disk '{}'",
                parent.uuid, disk.name
            )));
        }
        if let Some(parent) = &parent {
            check_chain_images(&cat, &parent.uuid, &disk.name)?;
        }
        let default = cat
            .default_image_path(&uuid, &disk.name)
            .map_err(catalogue_error)?;
        let path = if def.mode == BackupMode::Pull {
            default
        } else {
            backup.store.as_ref().map(|s| s.path.clone()).or(default)
        };
        let Some(path) = path else {
            return Err(CliError::Other(format!(
                "invalid argument: disk '{}' has no target and domain '{name}' has no default backup target (see backup-set-default-target)",
                disk.name
            )));
        };
        if def.mode == BackupMode::Push {
            backup.store = Some(BackupStore {
                path: path.clone(),
                seclabels: Vec::new(),
                encryption: None,
            });
        }
        image_paths.push((disk.name.clone(), path));
    }
    if image_paths.is_empty() {
        return Err(CliError::Other(
            "invalid argument: the backup includes no disk".into(),
        ));
    }
    for (_, path) in &image_paths {
        if let Some(dir) = Path::new(path).parent() {
            std::fs::create_dir_all(dir)
                .map_err(CliError::io(format!("cannot create '{}'", dir.display())))?;
        }
    }
    let aligned = align_backup(&def, &loaded.def, &checkpoint_name)?;
    // A pull without <server> goes on the daemon's NBD server; one naming another server is
    // refused by the core before anything starts.
    let spec = BackupSpec::from_def(&aligned).map_err(EngineError::from)?;
    let pending = Pending {
        uuid: uuid.clone(),
        parent: parent.as_ref().map(|p| p.uuid.clone()),
        checkpoint: checkpoint_name,
        description: args.description.clone(),
        creation_time: commands::now_s(),
        pull: def.mode == BackupMode::Pull,
        images: image_paths,
    };
    let dir = loaded.store.dir().to_owned();
    let mut s = Session::connect(loaded)?;
    if let Some(stale) = stale {
        // A push backup started without --wait may have finished unobserved: keep it.
        let kept = !stale.pull
            && last_job_succeeded(&dir)
            && record(s.driver.effects().store(), &stale).is_ok();
        if kept {
            if !args.json {
                println!("Backup {} recorded", stale.uuid);
            }
        } else {
            discard(&mut s, &dir, &stale)?;
        }
    }
    pending.write(s.driver.effects().store())?;
    let r = s.call(Request::BackupBegin {
        spec,
        checkpoint: Some(checkpoint),
        reuse_external: false,
    });
    if let Err(e) = r {
        let _ = discard(&mut s, &dir, &pending);
        s.close()?;
        return Err(e.into());
    }
    if !args.json {
        match s
            .driver
            .domain()
            .view()
            .backup
            .and_then(commands::export_uris)
        {
            Some(uris) => println!(
                "Backup {uuid} started; exports served at {}",
                uris.join(" ")
            ),
            None => println!("Backup {uuid} started"),
        }
    }
    if pending.pull {
        let copied = pull_copy(&mut s, &pending, parent.as_ref(), args.json);
        let ended = end_job(&mut s);
        if let Err(e) = copied.and(ended) {
            let _ = discard(&mut s, &dir, &pending);
            s.close()?;
            return Err(e);
        }
    } else {
        if !args.wait {
            if args.json {
                print_json(json!({"uuid": uuid, "status": "started"}));
            } else {
                let domain = s.driver.effects().store().name().to_owned();
                println!(
                    "The backup is recorded once its job ends: run 'vbackup backup-finish {domain}' (it waits), or 'backup-finish {domain} --check' to see whether it is done"
                );
            }
            return Ok(s.close()?);
        }
        let stats = commands::follow(&mut s, args.json)?;
        if stats.as_ref().is_none_or(|st| st.success != Some(true)) {
            let why = stats.and_then(|st| st.errmsg).unwrap_or_default();
            let _ = discard(&mut s, &dir, &pending);
            s.close()?;
            return Err(CliError::Other(format!(
                "operation failed: backup job failed: {why}"
            )));
        }
    }
    let recorded = record(s.driver.effects().store(), &pending);
    if recorded.is_err() {
        let _ = discard(&mut s, &dir, &pending);
    }
    s.close()?;
    let backup = recorded?;
    if args.json {
        print_json(backup_json(&backup));
    } else {
        println!(
            "Backup {uuid} created ({}, {})",
            backup.kind.name(),
            human_bytes(backup.allocated_size_bytes())
        );
    }
    Ok(())
}

/// Reads every disk of a running pull backup over NBD into the pending images, with a
/// progress bar per disk on a terminal unless `quiet` (machine-readable output).
fn pull_copy(
    s: &mut Session,
    pending: &Pending,
    parent: Option<&ManagedBackup>,
    quiet: bool,
) -> Result<(), CliError> {
    let Reply::Backup(plan) = s.call(Request::BackupGetXml)? else {
        return Err(CliError::Other(
            "unexpected answer to a backup query".into(),
        ));
    };
    let def = plan.to_def();
    let socket = RunDir::new(&s.run_dir).nbd_socket;
    for (disk, path) in &pending.images {
        let backup = def
            .disks
            .iter()
            .find(|d| &d.name == disk)
            .and_then(|d| d.backup.clone())
            .ok_or_else(|| CliError::Other(format!("disk '{disk}' is not in the backup job")))?;
        let export = backup.export_name.clone().unwrap_or_else(|| disk.clone());
        let base = parent
            .and_then(|p| p.image(disk))
            .map(|i| PathBuf::from(&i.path));
        let (context, dirty) = match (&base, &backup.export_bitmap) {
            (Some(_), Some(bitmap)) => (dirty_bitmap_context(bitmap), true),
            (Some(_), None) => {
                return Err(CliError::Other(format!(
                    "operation failed: disk '{disk}': the incremental export has no bitmap"
                )));
            }
            (None, _) => (BASE_ALLOCATION.to_owned(), false),
        };
        let mut client = NbdClient::connect_unix(&socket, &export, &[context.as_str()])?;
        let ranges = select_ranges(&mut client, &context, |flags| {
            if dirty {
                flags & STATE_DIRTY != 0
            } else {
                flags & STATE_ZERO == 0
            }
        })?;
        let total_bytes = ranges
            .iter()
            .fold(0u64, |t, (_, len)| t.saturating_add(*len));
        let bar = CopyProgress::new(disk, total_bytes, !quiet && std::io::stderr().is_terminal());
        let report = images::store_extents_observed(
            &mut client,
            &ranges,
            Path::new(path),
            base.as_deref(),
            &mut |bytes| bar.advance(bytes),
        );
        bar.finish();
        let report =
            report.map_err(|e| CliError::Other(format!("operation failed: disk '{disk}': {e}")))?;
        if !quiet {
            println!(
                "Disk {disk}: pulled {} in {} extent(s)",
                human_bytes(report.copy.bytes_copied),
                report.copy.ranges
            );
        }
        let _ = client.disconnect();
    }
    Ok(())
}

/// The progress of one disk's pull copy: an indicatif bar on stderr when shown (a terminal
/// and no machine-readable output, like `backup-begin --wait`), nothing otherwise; it only
/// counts then.
struct CopyProgress {
    bar: Option<indicatif::ProgressBar>,
    done_bytes: std::cell::Cell<u64>,
}

impl CopyProgress {
    fn new(disk: &str, total_bytes: u64, shown: bool) -> Self {
        let bar = shown.then(|| {
            let b = indicatif::ProgressBar::new(total_bytes);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(disk.to_owned());
            b
        });
        Self {
            bar,
            done_bytes: std::cell::Cell::new(0),
        }
    }

    fn advance(&self, bytes: u64) {
        self.done_bytes
            .set(self.done_bytes.get().saturating_add(bytes));
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

// ----- backup-finish -----

fn finish(
    store: &Store,
    name: &str,
    cancel: bool,
    check: bool,
    json: bool,
) -> Result<(), CliError> {
    let loaded = session::load(store, name)?;
    let pending = Pending::read(loaded.store.dir())?;
    if pending.is_none() && loaded.journal.is_none() {
        return Err(EngineError::from(RequestError::NoJob).into());
    }
    let dir = loaded.store.dir().to_owned();
    let mut s = Session::connect(loaded)?;
    let result = finish_in(&mut s, &dir, pending, cancel, check, json);
    s.close()?;
    result
}

fn finish_in(
    s: &mut Session,
    dir: &Path,
    pending: Option<Pending>,
    cancel: bool,
    check: bool,
    json: bool,
) -> Result<(), CliError> {
    if cancel {
        end_job(s)?;
        let uuid = pending.as_ref().map(|p| p.uuid.clone());
        if let Some(p) = &pending {
            discard(s, dir, p)?;
        }
        match (&uuid, json) {
            (_, true) => print_json(json!({"uuid": uuid, "status": "cancelled"})),
            (Some(u), false) => println!("Backup {u} cancelled"),
            (None, false) => println!("Backup job cancelled"),
        }
        return Ok(());
    }
    let Some(pending) = pending else {
        // An unmanaged job: nothing to record.
        return Err(CliError::Other(
            "Requested operation is not valid: the running job is not a managed backup".into(),
        ));
    };
    if pending.pull {
        // The vbackup process reading it is gone: what it stored is incomplete.
        end_job(s)?;
        discard(s, dir, &pending)?;
        return Err(CliError::Other(format!(
            "operation failed: pull backup {} was interrupted and has been discarded",
            pending.uuid
        )));
    }
    if s.job_running() {
        if check {
            if json {
                print_json(json!({"uuid": pending.uuid, "status": "running"}));
            } else {
                println!("Backup {} is running", pending.uuid);
            }
            return Ok(());
        }
        commands::follow(s, json)?;
    }
    if !last_job_succeeded(dir) {
        discard(s, dir, &pending)?;
        return Err(CliError::Other(format!(
            "operation failed: backup {} failed and has been discarded",
            pending.uuid
        )));
    }
    let backup = record(s.driver.effects().store(), &pending);
    if backup.is_err() {
        let _ = discard(s, dir, &pending);
    }
    let backup = backup?;
    if json {
        print_json(
            json!({"uuid": backup.uuid, "status": "created", "backup": backup_json(&backup)}),
        );
        return Ok(());
    }
    println!(
        "Backup {} created ({}, {})",
        backup.uuid,
        backup.kind.name(),
        human_bytes(backup.allocated_size_bytes())
    );
    Ok(())
}

// ----- reading -----

fn backup_json(b: &ManagedBackup) -> Value {
    json!({
        "uuid": b.uuid,
        "domain": b.domain,
        "parent": b.parent,
        "checkpoint": b.checkpoint,
        "creationTime": b.creation_time,
        "description": b.description,
        "kind": b.kind.name(),
        "allocatedBytes": b.allocated_size_bytes(),
        "disks": b.disks.iter().map(|d| json!({
            "disk": d.disk,
            "path": d.path,
            "format": d.format.name(),
            "virtualBytes": d.virtual_size_bytes,
            "allocatedBytes": d.allocated_size_bytes,
            "digest": d.digest.as_str(),
        })).collect::<Vec<_>>(),
    })
}

fn rows(backups: &[&ManagedBackup]) -> Vec<Vec<String>> {
    backups
        .iter()
        .map(|b| {
            vec![
                b.uuid.clone(),
                format_time(i64::try_from(b.creation_time).unwrap_or(i64::MAX)),
                b.kind.name().to_owned(),
                b.parent.clone().unwrap_or_default(),
                human_bytes(b.allocated_size_bytes()),
            ]
        })
        .collect()
}

const HEADERS: [&str; 5] = ["UUID", "Creation Time", "Kind", "Parent", "Size"];

fn list(
    store: &Store,
    name: &str,
    full: bool,
    latest: bool,
    tree: bool,
    json: bool,
) -> Result<(), CliError> {
    let loaded: Loaded = session::load(store, name)?;
    let machine = Managed::new(name, managed_runtime::stored_managed(&loaded.store)?);
    let cat = machine.catalogue().clone();
    // A damaged record is listed as such, naming its file; the others list as usual.
    for d in machine.damaged() {
        let line = format!(
            "damaged backup {} (record '{}'): {}; delete it with 'vbackup backup-delete {}'",
            d.uuid.as_deref().unwrap_or("?"),
            d.file,
            d.reason,
            d.uuid.as_deref().unwrap_or("UUID")
        );
        if json {
            eprintln!("warning: {line}");
        }
    }
    let filter = if full {
        ListFilter::Full
    } else if latest {
        ListFilter::LatestChain
    } else {
        ListFilter::All
    };
    let backups = cat.list(filter);
    if json {
        let v: Vec<Value> = backups.iter().map(|b| backup_json(b)).collect();
        print_json(Value::Array(v));
    } else if tree {
        let shown: Vec<&str> = backups.iter().map(|b| b.uuid.as_str()).collect();
        for root in backups.iter().filter(|b| b.parent.is_none()) {
            print_tree(&cat, root, &shown, "", true, true)?;
        }
    } else {
        print!("{}", table(&HEADERS, &rows(&backups)));
    }
    if !json {
        for d in machine.damaged() {
            println!(
                "Damaged: {} (record '{}'): {}",
                d.uuid.as_deref().unwrap_or("?"),
                d.file,
                d.reason
            );
        }
    }
    if !json && let Some(note) = pending_note(loaded.store.dir(), name, loaded.journal.is_some()) {
        println!("{note}");
    }
    Ok(())
}

/// A line about a managed backup that is started but not recorded yet (it is in no listing
/// until `backup-finish` records it), or `None` when there is none.
pub(crate) fn pending_note(dir: &Path, domain: &str, job_running: bool) -> Option<String> {
    let pending = Pending::read(dir).ok().flatten()?;
    let state = if job_running {
        "its job is running"
    } else {
        "its job has ended"
    };
    Some(format!(
        "Not yet recorded: backup {} ({state}); 'vbackup backup-finish {domain}' records it",
        pending.uuid
    ))
}

/// The uuid of a managed backup that is started but not recorded yet.
pub(crate) fn pending_uuid(dir: &Path) -> Option<String> {
    Pending::read(dir).ok().flatten().map(|p| p.uuid)
}

fn print_tree(
    cat: &Catalogue,
    b: &ManagedBackup,
    shown: &[&str],
    prefix: &str,
    last: bool,
    root: bool,
) -> Result<(), CliError> {
    let label = format!(
        "{} ({}, {})",
        b.uuid,
        b.kind.name(),
        format_time(i64::try_from(b.creation_time).unwrap_or(i64::MAX))
    );
    let child_prefix = if root {
        println!("{label}");
        String::new()
    } else {
        println!("{prefix}{}{label}", if last { "`- " } else { "+- " });
        format!("{prefix}{}", if last { "   " } else { "|  " })
    };
    let kids: Vec<&ManagedBackup> = cat
        .children(&b.uuid)
        .map_err(catalogue_error)?
        .into_iter()
        .filter(|c| shown.contains(&c.uuid.as_str()))
        .collect();
    for (i, k) in kids.iter().enumerate() {
        print_tree(cat, k, shown, &child_prefix, i + 1 == kids.len(), false)?;
    }
    Ok(())
}

fn children(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let (_ds, cat) = find(store, uuid)?;
    let kids = cat.children(uuid).map_err(catalogue_error)?;
    if json {
        let v: Vec<Value> = kids.iter().map(|b| backup_json(b)).collect();
        print_json(Value::Array(v));
    } else {
        print!("{}", table(&HEADERS, &rows(&kids)));
    }
    Ok(())
}

fn verify(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let domain = find_domain(store, uuid)?;
    let loaded = session::load(store, &domain)?;
    let (answer, cat) = ask(store, loaded, ManagedRequest::Verify { uuid: uuid.into() })?;
    let ManagedReply::Verified { disks, .. } = answer.map_err(managed_error)? else {
        return Err(CliError::Other(
            "unexpected answer to a verification".into(),
        ));
    };
    let plan = cat.plan_restore(uuid, &[]).map_err(catalogue_error)?;
    let mut report = Vec::new();
    for v in &disks {
        let outcome = match &v.found {
            Ok(found) if *found == v.recorded => Ok(()),
            Ok(found) => Err(format!(
                "content digest {} differs from the recorded {}",
                found.as_str(),
                v.recorded.as_str()
            )),
            Err(e) => {
                let chain = plan.disks.iter().find(|d| d.disk == v.disk);
                match chain.and_then(|d| missing_image(&d.images)) {
                    Some(img) => Err(format!("image '{}' of its chain is missing", img.path)),
                    None => Err(format!("cannot read it: {e}")),
                }
            }
        };
        report.push((v.disk.clone(), outcome));
    }
    if json {
        let rows: Vec<Value> = report
            .iter()
            .map(|(disk, r)| json!({"disk": disk, "ok": r.is_ok(), "error": r.as_ref().err()}))
            .collect();
        print_json(json!({"uuid": uuid, "disks": rows}));
    } else {
        for (disk, r) in &report {
            match r {
                Ok(()) => println!("{disk}: ok"),
                Err(e) => println!("{disk}: FAILED: {e}"),
            }
        }
    }
    let failed = report.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        return Err(CliError::Other(format!(
            "operation failed: backup '{uuid}': {failed} disk(s) failed verification"
        )));
    }
    Ok(())
}

fn info(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let (_ds, cat) = find(store, uuid)?;
    let b = backup_in(&cat, uuid)?;
    if json {
        print_json(backup_json(b));
        return Ok(());
    }
    let kv = |k: &str, v: String| println!("{:<16}{v}", format!("{k}:"));
    kv("UUID", b.uuid.clone());
    kv("Domain", b.domain.clone());
    kv("Kind", b.kind.name().to_owned());
    kv("Parent", b.parent.clone().unwrap_or_else(|| "-".into()));
    kv(
        "Checkpoint",
        b.checkpoint.clone().unwrap_or_else(|| "-".into()),
    );
    kv(
        "Creation Time",
        format_time(i64::try_from(b.creation_time).unwrap_or(i64::MAX)),
    );
    kv("Description", b.description.clone().unwrap_or_default());
    kv(
        "Children",
        cat.children(uuid)
            .map_err(catalogue_error)?
            .len()
            .to_string(),
    );
    kv("Size", human_bytes(b.allocated_size_bytes()));
    for d in &b.disks {
        println!(
            "  {}: {} ({} of {}) {}",
            d.disk,
            d.path,
            human_bytes(d.allocated_size_bytes),
            human_bytes(d.virtual_size_bytes),
            d.digest
        );
    }
    Ok(())
}

/// `backup-dumpxml UUID`: the `<managedbackup>` record.
pub fn dumpxml(
    store: &Store,
    uuid: &str,
    json: bool,
    xpath: &commands::XpathArgs,
) -> Result<(), CliError> {
    let (_ds, cat) = find(store, uuid)?;
    let b = backup_in(&cat, uuid)?;
    if json {
        print_json(backup_json(b));
        Ok(())
    } else {
        xpath.print(&b.format())
    }
}

// ----- changing -----

fn delete(
    store: &Store,
    target: &str,
    with_children: bool,
    all: bool,
    keep_checkpoints: bool,
    json: bool,
) -> Result<(), CliError> {
    let domain = if all {
        target.to_owned()
    } else {
        find_domain(store, target)?
    };
    let loaded = session::load(store, &domain)?;
    let pending = Pending::read(loaded.store.dir())?;
    let before = catalogue(&loaded.store)?;
    let n_all = before.len();
    if let Some(p) = pending
        && let Some(parent) = p.parent.as_deref()
    {
        let doomed = all
            || parent == target
            || with_children
                && before
                    .descendants(target)
                    .is_ok_and(|d| d.iter().any(|b| b.uuid == parent));
        if doomed {
            return Err(CliError::Other(format!(
                "Requested operation is not valid: a running backup is built on '{parent}'"
            )));
        }
    }
    let (answer, _) = ask(
        store,
        loaded,
        ManagedRequest::Delete {
            target: (!all).then(|| target.to_owned()),
            with_children,
            keep_checkpoints,
        },
    )?;
    let deleted = match answer {
        Ok(ManagedReply::Deleted { uuids }) => uuids,
        Ok(_) => return Err(CliError::Other("unexpected answer to a deletion".into())),
        Err(ManagedError::Catalogue(
            e @ vbackup_core::catalogue::CatalogueError::HasChildren { .. },
        )) => {
            return Err(CliError::Other(format!(
                "Requested operation is not valid: {e}; delete them too with 'vbackup backup-delete {target} --children', or make each child self-contained first with 'vbackup backup-consolidate CHILD'"
            )));
        }
        Err(e @ ManagedError::Effect { .. }) => {
            return Err(CliError::Other(format!(
                "{e}; the deletion is finished by the next managed-backup command of domain '{domain}' (or run it again, with --keep-checkpoints if QEMU cannot be reached)"
            )));
        }
        Err(e) => return Err(managed_error(e)),
    };
    let n = deleted.len();
    if json {
        print_json(
            json!({"domain": domain, "deleted": deleted, "checkpointsKept": keep_checkpoints}),
        );
    } else if all {
        println!("Deleted {n_all} backup(s) of domain '{target}'");
    } else if n > 1 {
        println!("Backup {target} and {} dependent backup(s) deleted", n - 1);
    } else {
        println!("Backup {target} deleted");
    }
    Ok(())
}

fn consolidate(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let domain = find_domain(store, uuid)?;
    let loaded = session::load(store, &domain)?;
    if Pending::read(loaded.store.dir())?.is_some() || loaded.journal.is_some() {
        return Err(CliError::Other(format!(
            "Requested operation is not valid: a backup of domain '{domain}' is running; consolidate once it ended"
        )));
    }
    let (answer, _) = ask(
        store,
        loaded,
        ManagedRequest::Consolidate { uuid: uuid.into() },
    )?;
    let ManagedReply::Consolidated { backup, changed } = answer.map_err(managed_error)? else {
        return Err(CliError::Other(
            "unexpected answer to a consolidation".into(),
        ));
    };
    if json {
        print_json(json!({"uuid": uuid, "consolidated": changed, "backup": backup_json(&backup)}));
    } else if changed {
        println!(
            "Backup {uuid} is now a full backup ({} image(s), {} MiB allocated)",
            backup.disks.len(),
            backup.allocated_size_bytes().div_ceil(1 << 20)
        );
    } else {
        println!("Backup {uuid} is already a full backup");
    }
    Ok(())
}

fn absolute(dir: &Path) -> Result<PathBuf, CliError> {
    if dir.is_absolute() {
        Ok(dir.to_owned())
    } else {
        Ok(std::env::current_dir()
            .map_err(CliError::io("cannot read the current directory"))?
            .join(dir))
    }
}

fn get_default_target(store: &Store, name: &str, json: bool) -> Result<(), CliError> {
    let loaded = session::load(store, name)?;
    let cat = catalogue(&loaded.store)?;
    let target = cat.default_target();
    if json {
        print_json(json!({"domain": name, "target": target}));
    } else {
        match target {
            Some(dir) => println!("{dir}"),
            None => {
                return Err(CliError::Other(format!(
                    "invalid argument: domain '{name}' has no default backup target; set one with 'vbackup backup-set-default-target {name} DIR'"
                )));
            }
        }
    }
    Ok(())
}

fn set_default_target(store: &Store, name: &str, dir: &Path) -> Result<(), CliError> {
    let loaded = session::load(store, name)?;
    let dir = absolute(dir)?;
    std::fs::create_dir_all(&dir)
        .map_err(CliError::io(format!("cannot create '{}'", dir.display())))?;
    let dir = std::fs::canonicalize(&dir).map_err(CliError::io(format!("'{}'", dir.display())))?;
    let mut cat = catalogue(&loaded.store)?;
    let ops = cat
        .set_default_target(Some(dir.display().to_string()))
        .map_err(catalogue_error)?;
    images::apply_ops(&loaded.store, &ops).map_err(io_error)?;
    println!(
        "Default backup target of domain '{name}' set to {}",
        dir.display()
    );
    Ok(())
}

/// What `backup-restore` was asked.
struct RestoreArgs {
    uuid: String,
    until: Option<String>,
    new_domain: Option<String>,
    dir: Option<PathBuf>,
    disks: Vec<String>,
    overwrite: bool,
    json: bool,
}

fn restore_cmd(store: &Store, args: &RestoreArgs) -> Result<(), CliError> {
    let RestoreArgs {
        uuid,
        until,
        new_domain,
        dir,
        disks,
        overwrite,
        json,
    } = args;
    let (json, overwrite) = (*json, *overwrite);
    let domain = find_domain(store, uuid)?;
    let loaded = session::load(store, &domain)?;
    let target = if overwrite {
        let run = RunDir::new(loaded.store.run_dir());
        let running = match loaded.attachment {
            Attachment::Managed => run.read_pid().ok().flatten().is_some_and(daemon_alive),
            Attachment::Attached(_) => true,
        };
        if running || loaded.journal.is_some() {
            return Err(CliError::Other(format!(
                "Requested operation is not valid: domain '{domain}' is running; shut it down before overwriting its disks"
            )));
        }
        let mut map = std::collections::BTreeMap::new();
        for d in &loaded.def.disks {
            if let Some(path) = d.layers.first().and_then(|l| l.path.clone()) {
                map.insert(d.target.clone(), path);
            }
        }
        RestoreTarget::Overwrite { disks: map }
    } else {
        let Some(dir) = dir else {
            return Err(CliError::Other(
                "invalid argument: give --dir (and --new-domain) or --overwrite".into(),
            ));
        };
        RestoreTarget::NewImages {
            dir: absolute(dir)?.display().to_string(),
            new_domain: new_domain.clone(),
        }
    };
    if let Some(u) = until {
        validate_uuid(u).map_err(catalogue_error)?;
    }
    // Refuse a chain with a missing image, naming it, before anything is written.
    let cat = catalogue(&loaded.store)?;
    let chosen: Vec<&str> = disks.iter().map(String::as_str).collect();
    let plan = match until {
        Some(u) => cat.plan_restore_until(uuid, u, &chosen),
        None => cat.plan_restore(uuid, &chosen),
    };
    if let Ok(plan) = &plan {
        for d in &plan.disks {
            if let Some(img) = missing_image(&d.images) {
                return Err(CliError::Other(format!(
                    "operation failed: backup '{}' cannot be restored: image '{}' of disk '{}' in its chain is missing",
                    plan.backup, img.path, d.disk
                )));
            }
        }
        if until.is_some() && !json {
            println!("Restoring backup {} (chain of {uuid})", plan.backup);
        }
    }
    let (answer, _) = ask(
        store,
        loaded,
        ManagedRequest::Restore(Box::new(RestoreRequest {
            uuid: uuid.clone(),
            until: until.clone(),
            disks: disks.clone(),
            target,
        })),
    )?;
    let ManagedReply::Restored {
        backup,
        disks: out,
        domain: defined,
    } = answer.map_err(managed_error)?
    else {
        return Err(CliError::Other("unexpected answer to a restore".into()));
    };
    if json {
        let disks: Vec<Value> = out
            .iter()
            .map(|d| json!({"disk": d.disk, "path": d.path, "format": d.format.name(), "digest": d.digest.to_string()}))
            .collect();
        let domain = if overwrite { Some(domain) } else { defined };
        print_json(
            json!({"backup": backup, "overwrite": overwrite, "disks": disks, "domain": domain}),
        );
        return Ok(());
    }
    let verb = if overwrite { "over" } else { "to" };
    for d in &out {
        println!("Disk {} restored {verb} {} ({})", d.disk, d.path, d.digest);
    }
    if let Some(name) = defined {
        println!("Domain '{name}' defined");
    }
    Ok(())
}

/// For `undefine --remove-all-backups`: deletes every backup of a locked domain. The
/// checkpoints are left to `undefine`, which removes their metadata with the domain.
pub fn remove_all_backups(store: &DomainStore) -> Result<usize, CliError> {
    let mut cat = catalogue(store)?;
    let n = cat.len();
    let ops: Vec<CatalogueOp> = cat
        .delete_all()
        .into_iter()
        .filter(|o| !matches!(o, CatalogueOp::DeleteCheckpoint { .. }))
        .collect();
    images::apply_ops(store, &ops).map_err(io_error)?;
    Ok(n)
}

/// How many backups a locked domain has.
pub fn backup_count(store: &DomainStore) -> Result<usize, CliError> {
    Ok(catalogue(store)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_backups_round_trip_through_their_json() {
        let p = Pending {
            uuid: "01234567-89ab-cdef-0123-456789abcdef".into(),
            parent: Some("11234567-89ab-cdef-0123-456789abcdef".into()),
            checkpoint: "c9".into(),
            description: None,
            creation_time: 1_700_000_000,
            pull: true,
            images: vec![("vda".into(), "/b/x/vda.qcow2".into())],
        };
        let back = Pending::from_json(&p.to_json()).expect("parses");
        assert_eq!(back.uuid, p.uuid);
        assert_eq!(back.parent, p.parent);
        assert_eq!(back.checkpoint, "c9");
        assert_eq!(back.description, None);
        assert_eq!(back.creation_time, 1_700_000_000);
        assert!(back.pull);
        assert_eq!(back.images, p.images);
    }

    #[test]
    fn copy_progress_is_hidden_unless_shown_and_counts_every_byte() {
        let hidden = CopyProgress::new("vda", 3 << 20, false);
        assert!(hidden.bar.is_none());
        hidden.advance(1 << 20);
        hidden.advance(2 << 20);
        hidden.finish();
        assert_eq!(hidden.done_bytes.get(), 3 << 20);
        let shown = CopyProgress::new("vda", 100, true);
        shown.advance(40);
        assert_eq!(shown.bar.as_ref().map(|b| b.position()), Some(40));
        assert_eq!(shown.bar.as_ref().and_then(|b| b.length()), Some(100));
        shown.finish();
    }

    #[test]
    fn a_pending_record_missing_its_images_does_not_parse() {
        let mut v = Pending {
            uuid: "01234567-89ab-cdef-0123-456789abcdef".into(),
            parent: None,
            checkpoint: "c1".into(),
            description: Some("d".into()),
            creation_time: 1,
            pull: false,
            images: Vec::new(),
        }
        .to_json();
        assert!(Pending::from_json(&v).is_some());
        v.as_object_mut().expect("object").remove("images");
        assert!(Pending::from_json(&v).is_none());
    }
}
