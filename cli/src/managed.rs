//! Managed backups: the `backup-*` commands of the catalogue. The host runtime
//! (`vbackup_host::managed_ops`) builds each request and asks the core's managed-backup machine;
//! this module parses the arguments and prints the answers.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use vbackup_core::catalogue::{BackupListFilter, Catalogue, ManagedBackup};
use vbackup_core::managed::ManagedReply;
use vbackup_host::domains::read_file;
use vbackup_host::managed_ops::{self as ops, CreateOptions, RestoreOptions};
use vbackup_host::managed_runtime::{CopyEvent, CopyObserver};
use vbackup_host::views::backup_json;
use vbackup_qemu::store::Store;

use crate::commands::{self, Json};
use crate::output::{CliError, format_time, human_bytes, print_json, table};
use crate::session;
use crate::virsh_args::{DomainArg, fill, required};

/// Managed backup commands (named like the rest of vbackup's `backup-*` commands).
#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)]
pub enum ManagedCommand {
    /// Create a managed backup (full, or incremental from --parent) with a checkpoint.
    BackupCreate(CreateArgs),
    /// List a domain's managed backups.
    BackupList(ListArgs),
    /// List the backups built directly on a backup.
    BackupChildren(UuidArg),
    /// Show a managed backup.
    BackupInfo(UuidArg),
    /// Check a managed backup without restoring it: every image of its chain is there and each
    /// disk's content, read through the chain as a restore reads it, matches the digest recorded
    /// when the backup was taken. Exits non-zero when a disk fails.
    BackupVerify(UuidArg),
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
    BackupDelete(DeleteArgs),
    /// Restore a managed backup to new images (and a new domain) or over the domain's disks.
    ///
    /// The result is the disks as they were at the backup's point in time (with --until: at
    /// that backup's point in time), checked against the digest recorded in the catalogue.
    BackupRestore(RestoreArgs),
    /// Make an incremental backup a full backup of its own (a synthetic full).
    ///
    /// Each of its images gets the data it read from its parents' images, so it no longer needs
    /// them; its content, checked against the recorded digest, does not change, and backups
    /// built on it stay valid. Its former ancestors remain a chain of their own and can then be
    /// deleted without it.
    BackupConsolidate(UuidArg),
    /// Finish a domain's managed backup: wait for it and record it, check it, or cancel it.
    BackupFinish(FinishArgs),
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

#[derive(Debug, Args)]
pub struct CreateArgs {
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
}

#[derive(Debug, Args)]
pub struct ListArgs {
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
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct UuidArg {
    /// Backup uuid.
    uuid: String,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
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
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
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
}

#[derive(Debug, Args)]
pub struct FinishArgs {
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
}

/// Runs a managed backup command.
pub fn run(global: &commands::Global, command: ManagedCommand) -> Result<(), CliError> {
    use ManagedCommand as C;
    let store = session::open_store(global.state_dir.as_deref())?;
    match command {
        C::BackupCreate(a) => create(&store, a),
        C::BackupList(a) => list(&store, a),
        C::BackupChildren(UuidArg { uuid, json }) => children(&store, &uuid, json.json),
        C::BackupInfo(UuidArg { uuid, json }) => info(&store, &uuid, json.json),
        C::BackupVerify(UuidArg { uuid, json }) => verify(&store, &uuid, json.json),
        C::BackupDelete(a) => delete(&store, &a),
        C::BackupRestore(a) => restore(&store, a),
        C::BackupConsolidate(UuidArg { uuid, json }) => consolidate(&store, &uuid, json.json),
        C::BackupFinish(a) => finish(&store, &a.dom.clone().get("backup-finish")?, &a),
        C::BackupGetDefaultTarget { dom, json } => {
            let name = dom.get("backup-get-default-target")?;
            let target = ops::default_target(&store, &name)?;
            match target {
                _ if json => print_json(json!({"domain": name, "target": target})),
                Some(dir) => println!("{dir}"),
                None => {
                    return Err(CliError::Other(format!(
                        "invalid argument: domain '{name}' has no default backup target; set one with 'vbackup backup-set-default-target {name} DIR'"
                    )));
                }
            }
            Ok(())
        }
        C::BackupSetDefaultTarget { dom, dir } => {
            let command = "backup-set-default-target";
            let slots = [("domain", dom.domain_named), ("dir", None)];
            let [domain, dir] = fill(slots, [dom.domain, dir])?;
            let domain = required(command, "domain", domain)?;
            let dir = required(command, "dir", dir)?;
            let dir = ops::set_default_target(&store, &domain, Path::new(&dir))?;
            let dir = dir.display();
            println!("Default backup target of domain '{domain}' set to {dir}");
            Ok(())
        }
    }
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
                b.set_style(commands::bar_style("{prefix} "));
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
            let bytes = human_bytes(bytes_copied);
            println!("Disk {export}: pulled {bytes} in {ranges} extent(s)");
        }
        CopyEvent::Checking { image, total_bytes } => {
            bar = shown.then(|| {
                let b = indicatif::ProgressBar::new(total_bytes);
                b.set_style(commands::bar_style("{prefix} "));
                let name = Path::new(image).file_name().map(|n| n.to_string_lossy());
                b.set_prefix(format!("reading {}", name.unwrap_or_default()));
                b
            });
        }
        CopyEvent::Checked { .. } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
    })
}

/// Progress bars on a terminal (stderr) while images are read, unless the output is JSON.
fn read_progress(json: bool) -> Option<CopyObserver> {
    let shown = std::io::stderr().is_terminal() && !json;
    shown.then(|| copy_progress(true))
}

fn create(store: &Store, a: CreateArgs) -> Result<(), CliError> {
    let slots = [
        ("domain", a.dom.domain_named),
        ("backupxml", a.backupxml_named),
    ];
    let [domain, backupxml] = fill(slots, [a.dom.domain, a.backupxml])?;
    let name = required("backup-create", "domain", domain)?;
    let opts = CreateOptions {
        xml: backupxml.map(|p| read_file(Path::new(&p))).transpose()?,
        checkpoint: a.checkpoint,
        parent: a.parent,
        description: a.description,
        pull: a.pull,
        wait: a.wait,
    };
    let mut create = ops::prepare_create(store, &name, &opts)?;
    if a.pull && !a.json {
        let (uuid, uris) = (&create.uuid, create.export_uris.join(" "));
        println!("Backup {uuid} started; exports served at {uris}");
        create.observe_copies(copy_progress(std::io::stderr().is_terminal()));
    } else if let Some(o) = read_progress(a.json) {
        create.observe_copies(o);
    }
    match create.run()? {
        ManagedReply::Started { uuid } if a.json => {
            print_json(json!({"uuid": uuid, "status": "started"}));
        }
        ManagedReply::Started { uuid } => {
            println!("Backup {uuid} started");
            println!(
                "The backup is recorded once its job ends: run 'vbackup backup-finish {name}' (it waits), or 'backup-finish {name} --check' to see whether it is done"
            );
        }
        ManagedReply::Created(backup) if a.json => print_json(backup_json(&backup)),
        ManagedReply::Created(b) => println!("Backup {} created ({})", b.uuid, kind_size(&b)),
        _ => return Err(CliError::Other("unexpected answer to a backup".into())),
    }
    Ok(())
}

/// `full, 12.0 MiB`: a backup's kind and allocated size.
fn kind_size(b: &ManagedBackup) -> String {
    let size = human_bytes(b.allocated_size_bytes());
    format!("{}, {size}", b.kind.name())
}

fn finish(store: &Store, name: &str, a: &FinishArgs) -> Result<(), CliError> {
    // A damaged job journal does not block --cancel: the job ends first.
    if a.cancel {
        commands::end_damaged_job(store, name)?;
    }
    match ops::finish(store, name, a.cancel, a.check)? {
        ManagedReply::Running { uuid } if a.json => {
            print_json(json!({"uuid": uuid, "status": "running"}));
        }
        ManagedReply::Running { uuid } => println!("Backup {uuid} is running"),
        ManagedReply::Cancelled { uuid } => match (&uuid, a.json) {
            (_, true) => print_json(json!({"uuid": uuid, "status": "cancelled"})),
            (Some(u), false) => println!("Backup {u} cancelled"),
            (None, false) => println!("Backup job cancelled"),
        },
        ManagedReply::Created(b) if a.json => {
            print_json(json!({"uuid": b.uuid, "status": "created", "backup": backup_json(&b)}))
        }
        ManagedReply::Created(b) => println!("Backup {} created ({})", b.uuid, kind_size(&b)),
        _ => return Err(CliError::Other("unexpected answer to backup-finish".into())),
    }
    Ok(())
}

fn created(b: &ManagedBackup) -> String {
    format_time(i64::try_from(b.creation_time).unwrap_or(i64::MAX))
}

/// Backups as a table, or as JSON.
fn print_backups(backups: &[&ManagedBackup], json: bool) {
    if json {
        print_json(backups.iter().map(|b| backup_json(b)).collect());
        return;
    }
    let rows: Vec<Vec<String>> = backups
        .iter()
        .map(|b| {
            let (kind, parent) = (b.kind.name().to_owned(), b.parent.clone());
            let size = human_bytes(b.allocated_size_bytes());
            vec![
                b.uuid.clone(),
                created(b),
                kind,
                parent.unwrap_or_default(),
                size,
            ]
        })
        .collect();
    let headers = ["UUID", "Creation Time", "Kind", "Parent", "Size"];
    print!("{}", table(&headers, &rows));
}

fn list(store: &Store, a: ListArgs) -> Result<(), CliError> {
    let name = a.dom.get("backup-list")?;
    let json = a.json.json;
    let listing = ops::list(store, &name)?;
    let cat = listing.machine.catalogue();
    let damaged = listing.machine.damaged();
    // A damaged record is listed as such, naming its file; the others list as usual.
    for d in damaged.iter().filter(|_| json) {
        let uuid = d.uuid.as_deref();
        eprintln!(
            "warning: damaged backup {} (record '{}'): {}; delete it with 'vbackup backup-delete {}'",
            uuid.unwrap_or("?"),
            d.file,
            d.reason,
            uuid.unwrap_or("UUID")
        );
    }
    let filter = match (a.full, a.latest) {
        (true, _) => BackupListFilter::Full,
        (_, true) => BackupListFilter::LatestChain,
        _ => BackupListFilter::All,
    };
    let backups = cat.list(filter);
    if a.tree && !json {
        let shown: Vec<&str> = backups.iter().map(|b| b.uuid.as_str()).collect();
        for root in backups.iter().filter(|b| b.parent.is_none()) {
            print_tree(cat, root, &shown, "", None)?;
        }
    } else {
        print_backups(&backups, json);
    }
    if json {
        return Ok(());
    }
    for d in damaged {
        let uuid = d.uuid.as_deref().unwrap_or("?");
        println!("Damaged: {uuid} (record '{}'): {}", d.file, d.reason);
    }
    if let Some((uuid, running)) = listing.pending {
        println!("{}", pending_note(&uuid, &name, running));
    }
    Ok(())
}

/// A line about a managed backup that is started but not recorded yet (it is in no listing
/// until `backup-finish` records it).
pub(crate) fn pending_note(uuid: &str, domain: &str, job_running: bool) -> String {
    let state = if job_running {
        "its job is running"
    } else {
        "its job has ended"
    };
    format!(
        "Not yet recorded: backup {uuid} ({state}); 'vbackup backup-finish {domain}' records it"
    )
}

/// Prints `b` and the shown backups built on it; `last` is `None` for a root, else whether
/// `b` is its parent's last child.
fn print_tree(
    cat: &Catalogue,
    b: &ManagedBackup,
    shown: &[&str],
    prefix: &str,
    last: Option<bool>,
) -> Result<(), CliError> {
    let label = format!("{} ({}, {})", b.uuid, b.kind.name(), created(b));
    let child_prefix = match last {
        None => {
            println!("{label}");
            String::new()
        }
        Some(last) => {
            println!("{prefix}{}{label}", if last { "`- " } else { "+- " });
            format!("{prefix}{}", if last { "   " } else { "|  " })
        }
    };
    let mut kids = cat.children(&b.uuid)?;
    kids.retain(|c| shown.contains(&c.uuid.as_str()));
    for (i, k) in kids.iter().enumerate() {
        print_tree(cat, k, shown, &child_prefix, Some(i + 1 == kids.len()))?;
    }
    Ok(())
}

fn children(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let (_, cat) = ops::find(store, uuid)?;
    let kids = cat.children(uuid)?;
    print_backups(&kids, json);
    Ok(())
}

fn verify(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let report = ops::verify(store, uuid, read_progress(json))?;
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
    match report.iter().filter(|(_, r)| r.is_err()).count() {
        0 => Ok(()),
        failed => Err(CliError::Other(format!(
            "operation failed: backup '{uuid}': {failed} disk(s) failed verification"
        ))),
    }
}

fn info(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let (b, cat) = ops::find(store, uuid)?;
    if json {
        print_json(backup_json(&b));
        return Ok(());
    }
    let children = cat.children(uuid)?.len();
    let none = || "-".to_owned();
    for (k, v) in [
        ("UUID", b.uuid.clone()),
        ("Domain", b.domain.clone()),
        ("Kind", b.kind.name().to_owned()),
        ("Parent", b.parent.clone().unwrap_or_else(none)),
        ("Checkpoint", b.checkpoint.clone().unwrap_or_else(none)),
        ("Creation Time", created(&b)),
        ("Description", b.description.clone().unwrap_or_default()),
        ("Children", children.to_string()),
        ("Size", human_bytes(b.allocated_size_bytes())),
    ] {
        println!("{:<16}{v}", format!("{k}:"));
    }
    for d in &b.disks {
        let (used, size) = (d.allocated_size_bytes, d.virtual_size_bytes);
        let (used, size) = (human_bytes(used), human_bytes(size));
        println!("  {}: {} ({used} of {size}) {}", d.disk, d.path, d.digest);
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
    let (b, _) = ops::find(store, uuid)?;
    if json {
        print_json(backup_json(&b));
        Ok(())
    } else {
        xpath.print(&b.format())
    }
}

fn delete(store: &Store, a: &DeleteArgs) -> Result<(), CliError> {
    let (target, keep) = (&a.target, a.keep_checkpoints);
    let d = ops::delete(store, target, a.children, a.all, keep)?;
    let n = d.uuids.len();
    if a.json {
        let domain = &d.domain;
        print_json(json!({"domain": domain, "deleted": d.uuids, "checkpointsKept": keep}));
    } else if a.all {
        println!("Deleted {} backup(s) of domain '{target}'", d.had);
    } else if n > 1 {
        println!("Backup {target} and {} dependent backup(s) deleted", n - 1);
    } else {
        println!("Backup {target} deleted");
    }
    Ok(())
}

fn consolidate(store: &Store, uuid: &str, json: bool) -> Result<(), CliError> {
    let (backup, changed) = ops::consolidate(store, uuid, read_progress(json))?;
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

fn restore(store: &Store, a: RestoreArgs) -> Result<(), CliError> {
    let (json, overwrite) = (a.json, a.overwrite);
    let opts = RestoreOptions {
        uuid: a.uuid,
        until: a.until,
        new_domain: a.new_domain,
        dir: a.dir,
        disks: a.disk,
        overwrite,
    };
    let mut restore = ops::prepare_restore(store, &opts)?;
    if let Some(o) = read_progress(json) {
        restore.observe_copies(o);
    }
    let domain = restore.domain.clone();
    if let Some(backup) = restore.chain_backup.as_ref().filter(|_| !json) {
        println!("Restoring backup {backup} (chain of {})", opts.uuid);
    }
    let r = restore.run()?;
    if json {
        let disks: Vec<Value> = r
            .disks
            .iter()
            .map(|d| json!({"disk": d.disk, "path": d.path, "format": d.format.name(), "digest": d.digest.to_string()}))
            .collect();
        let domain = if overwrite { Some(domain) } else { r.defined };
        let backup = r.backup;
        print_json(
            json!({"backup": backup, "overwrite": overwrite, "disks": disks, "domain": domain}),
        );
        return Ok(());
    }
    let verb = if overwrite { "over" } else { "to" };
    for d in &r.disks {
        println!("Disk {} restored {verb} {} ({})", d.disk, d.path, d.digest);
    }
    if let Some(name) = r.defined {
        println!("Domain '{name}' defined");
    }
    Ok(())
}
