//! Managed backups: the `backup-*` commands of the catalogue. Arguments are parsed and
//! aligned here (the `<domainbackup>`, the checkpoint, the disks an overwrite replaces), the
//! work is decided by the core's managed-backup machine (`vbackup_core::managed`) and carried
//! out by the host runtime (`vbackup_host::managed_runtime`); this module prints the answers.
//!
//! Contract: every rule (journal before each interruptible step, consolidation and restore
//! into new files checked before they take their final names, no takeover of an existing
//! domain, overwrite keeping ownership, options and the other disks' checkpoints, target
//! directories that must exist, damaged records affecting only themselves) is the machine's;
//! the only checks left here name a missing chain image before anything starts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{Value, json};
use vbackup_core::backup::BackupSpec;
use vbackup_core::catalogue::{
    BackupListFilter, Catalogue, CatalogueOp, ManagedBackup, validate_uuid,
};
use vbackup_core::error::{Error as EngineError, RequestError};
use vbackup_core::managed::{
    CreateRequest, Journal, Managed, ManagedError, ManagedReply, ManagedRequest, RestoreRequest,
    RestoreTarget,
};
use vbackup_core::xml::{
    BackupDef, BackupDisk, BackupModeAttr, BackupStoreDef, DiskBackup, Origin, align_backup,
};
use vbackup_host::managed_runtime::{self, CopyEvent, CopyObserver, ManagedHost};
use vbackup_qemu::images;
use vbackup_qemu::qsd::{RunDir, daemon_alive};
use vbackup_qemu::store::{DomainStore, Store};

use crate::commands;
use crate::output::{CliError, format_time, human_bytes, print_json, table};
use crate::session::{self, Attachment, Loaded};
use crate::virsh_args::{DomainArg, fill, required};

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

/// Shows a pull copy: a progress bar per disk on stderr when `shown` (a terminal), and one
/// line per disk once it is copied.
fn copy_progress(shown: bool) -> CopyObserver {
    let mut bar: Option<indicatif::ProgressBar> = None;
    Box::new(move |event| match event {
        CopyEvent::Started {
            export,
            total_bytes,
        } => {
            bar = shown.then(|| {
                let b = indicatif::ProgressBar::new(total_bytes);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} {spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_prefix(export.to_owned());
                b
            });
        }
        CopyEvent::Copied(bytes) => {
            if let Some(b) = &bar {
                b.inc(bytes);
            }
        }
        CopyEvent::Finished {
            export,
            bytes_copied,
            ranges,
        } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            println!(
                "Disk {export}: pulled {} in {ranges} extent(s)",
                human_bytes(bytes_copied)
            );
        }
    })
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
    let checkpoint_xml = format!(
        "<domaincheckpoint><name>{}</name></domaincheckpoint>",
        commands::esc(&checkpoint_name)
    );
    let mut def = BackupDef::parse(args.xml.as_deref().unwrap_or("<domainbackup/>"))?;
    if args.pull {
        def.mode = BackupModeAttr::Pull;
    }
    if def.mode == BackupModeAttr::Pull && loaded.attachment != Attachment::Managed {
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
    // The disks whose target the definition names; the others go to the target directory.
    let mut explicit = Vec::new();
    for disk in &mut def.disks {
        let Some(backup) = &mut disk.backup else {
            continue;
        };
        // Every disk is incremental from the parent's checkpoint, or full.
        backup.incremental = None;
        backup.mode = None;
        if let Some(parent) = &parent {
            check_chain_images(&cat, &parent.uuid, &disk.name)?;
        }
        if def.mode == BackupModeAttr::Push && backup.store.is_some() {
            explicit.push(disk.name.clone());
        } else if def.mode == BackupModeAttr::Push {
            // A placeholder for alignment; the machine chooses the path.
            backup.store = Some(BackupStoreDef {
                path: format!("/{}.qcow2", disk.name),
                seclabels: Vec::new(),
                encryption: None,
            });
        }
    }
    let aligned = align_backup(&def, &loaded.def, &checkpoint_name)?;
    // The checkpoint tracks exactly the disks the backup copies.
    let checkpoint = commands::checkpoint_for_backup(
        commands::parse_new_checkpoint(&checkpoint_xml)?,
        &loaded,
        &aligned,
    )?;
    let mut spec = BackupSpec::from_def(&aligned).map_err(EngineError::from)?;
    for d in &mut spec.disks {
        if !explicit.contains(&d.target)
            && let Some(store) = &mut d.store
            && spec.mode == vbackup_core::backup::BackupMode::Push
        {
            store.path = None;
        }
    }
    let wait = args.wait || args.pull;
    if args.pull && !args.json {
        // A managed pull is served on the daemon's own NBD server, one export per disk.
        let server = session::daemon_nbd_server(&loaded.store.run_dir());
        let uris: Vec<String> = spec
            .disks
            .iter()
            .filter(|d| d.backup)
            .map(|d| server.export_uri(d.export_name.as_deref().unwrap_or(&d.target)))
            .collect();
        println!(
            "Backup {uuid} started; exports served at {}",
            uris.join(" ")
        );
    }
    let mut host = ManagedHost::open(store, loaded)?;
    if args.pull && !args.json {
        host.observe_copies(copy_progress(std::io::stderr().is_terminal()));
    }
    let answer = host.run(ManagedRequest::Create(Box::new(CreateRequest {
        uuid: uuid.clone(),
        checkpoint,
        spec,
        parent: parent.map(|p| p.uuid),
        description: args.description.clone(),
        target: None,
        wait,
    })));
    host.close()?;
    match answer?.map_err(managed_error)? {
        ManagedReply::Started { uuid } => {
            if args.json {
                print_json(json!({"uuid": uuid, "status": "started"}));
            } else {
                println!("Backup {uuid} started");
                println!(
                    "The backup is recorded once its job ends: run 'vbackup backup-finish {name}' (it waits), or 'backup-finish {name} --check' to see whether it is done"
                );
            }
        }
        ManagedReply::Created(backup) => {
            if args.json {
                print_json(backup_json(&backup));
            } else {
                println!(
                    "Backup {uuid} created ({}, {})",
                    backup.kind.name(),
                    human_bytes(backup.allocated_size_bytes())
                );
            }
        }
        _ => return Err(CliError::Other("unexpected answer to a backup".into())),
    }
    Ok(())
}

// ----- backup-finish -----

fn finish(
    store: &Store,
    name: &str,
    cancel: bool,
    check: bool,
    json: bool,
) -> Result<(), CliError> {
    // A damaged job journal does not block --cancel: the job ends first.
    if cancel {
        commands::end_damaged_job(store, name)?;
    }
    let loaded = session::load(store, name)?;
    let machine = Managed::new(name, managed_runtime::stored_managed(&loaded.store)?);
    if machine.pending().is_none() && machine.journal().is_none() && loaded.journal.is_none() {
        return Err(EngineError::from(RequestError::NoJob).into());
    }
    let (answer, _) = ask(store, loaded, ManagedRequest::Finish { cancel, check })?;
    match answer.map_err(managed_error)? {
        ManagedReply::Running { uuid } => {
            if json {
                print_json(json!({"uuid": uuid, "status": "running"}));
            } else {
                println!("Backup {uuid} is running");
            }
        }
        ManagedReply::Cancelled { uuid } => match (&uuid, json) {
            (_, true) => print_json(json!({"uuid": uuid, "status": "cancelled"})),
            (Some(u), false) => println!("Backup {u} cancelled"),
            (None, false) => println!("Backup job cancelled"),
        },
        ManagedReply::Created(backup) => {
            if json {
                print_json(
                    json!({"uuid": backup.uuid, "status": "created", "backup": backup_json(&backup)}),
                );
            } else {
                println!(
                    "Backup {} created ({}, {})",
                    backup.uuid,
                    backup.kind.name(),
                    human_bytes(backup.allocated_size_bytes())
                );
            }
        }
        _ => return Err(CliError::Other("unexpected answer to backup-finish".into())),
    }
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
        BackupListFilter::Full
    } else if latest {
        BackupListFilter::LatestChain
    } else {
        BackupListFilter::All
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
    let uuid = pending_uuid(dir)?;
    let state = if job_running {
        "its job is running"
    } else {
        "its job has ended"
    };
    Some(format!(
        "Not yet recorded: backup {uuid} ({state}); 'vbackup backup-finish {domain}' records it"
    ))
}

/// The uuid of a managed backup that is started but not recorded yet.
pub(crate) fn pending_uuid(dir: &Path) -> Option<String> {
    let text =
        std::fs::read_to_string(dir.join(vbackup_host::layout::MANAGED_JOURNAL_FILE)).ok()?;
    match Journal::parse(&text).ok()? {
        Journal::Create(p) => Some(p.uuid),
        _ => None,
    }
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
    let n_all = catalogue(&loaded.store)?.len();
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
    if loaded.journal.is_some() {
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
