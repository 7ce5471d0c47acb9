//! Managed backups: the `backup-*` commands of the catalogue. The host runtime
//! (`vbackup_host::managed_ops`) builds each request and asks the core's managed-backup machine;
//! this module parses the arguments and prints the answers.

use std::io::IsTerminal;
use std::path::Path;

use clap::ArgMatches;
use serde_json::json;
use vbackup_core::catalogue::{Catalogue, ManagedBackup};
use vbackup_core::managed::ManagedReply;
use vbackup_host::domains::read_file;
use vbackup_host::managed_ops::{self as ops, CreateOptions, RestoreOptions};
use vbackup_host::managed_runtime::{CopyEvent, CopyObserver};
use vbackup_host::views::{self, backup_json};
use vbackup_qemu::store::Store;

use crate::commands;
use crate::output::{CliError, format_time, human_bytes, print_json, progress_bar, table};
use crate::session;
use crate::spec::{domain, path, text, texts, virsh};

/// Whether `name` is a managed backup command (named like the rest of vbackup's `backup-*`
/// commands, as `backup-begin` and `backup-dumpxml` are).
pub fn runs(name: &str) -> bool {
    name.starts_with("backup-") && !matches!(name, "backup-begin" | "backup-dumpxml")
}

/// Runs a managed backup command.
pub fn run(state_dir: Option<&Path>, name: &str, m: &ArgMatches) -> Result<(), CliError> {
    let store = session::open_store(state_dir)?;
    let store = &store;
    let uuid = || text(m, "uuid").expect("a required argument");
    let json = || m.get_flag("json");
    match name {
        "backup-create" => create(store, m),
        "backup-list" => list(store, m),
        "backup-children" => children(store, &uuid(), json()),
        "backup-info" => info(store, &uuid(), json()),
        "backup-verify" => verify(store, &uuid(), json()),
        "backup-delete" => delete(store, m),
        "backup-restore" => restore(store, m),
        "backup-consolidate" => consolidate(store, &uuid(), json()),
        "backup-finish" => finish(store, &domain(m, name)?, m),
        "backup-get-default-target" => {
            let name = domain(m, name)?;
            let target = ops::default_target(store, &name)?;
            match target {
                _ if json() => print_json(json!({"domain": name, "target": target})),
                Some(dir) => println!("{dir}"),
                None => {
                    return Err(CliError::Other(format!(
                        "invalid argument: domain '{name}' has no default backup target; set one with 'vbackup backup-set-default-target {name} DIR'"
                    )));
                }
            }
            Ok(())
        }
        "backup-set-default-target" => {
            let args = virsh(m, name)?;
            let (domain, dir) = (args.required("domain")?, args.required("dir")?);
            let dir = ops::set_default_target(store, &domain, Path::new(&dir))?;
            let dir = dir.display();
            println!("Default backup target of domain '{domain}' set to {dir}");
            Ok(())
        }
        _ => unreachable!("command '{name}' is declared but not handled"),
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
            bar = shown.then(|| progress_bar(total_bytes, Some(export.to_owned())));
        }
        CopyEvent::Copied(bytes) => bar.iter().for_each(|b| b.inc(bytes)),
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
            let name = Path::new(image).file_name().map(|n| n.to_string_lossy());
            let prefix = format!("reading {}", name.unwrap_or_default());
            bar = shown.then(|| progress_bar(total_bytes, Some(prefix)));
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

fn create(store: &Store, m: &ArgMatches) -> Result<(), CliError> {
    let args = virsh(m, "backup-create")?;
    let name = args.required("domain")?;
    let opts = CreateOptions {
        xml: args
            .optional("backupxml")
            .map(|p| read_file(Path::new(&p)))
            .transpose()?,
        checkpoint: text(m, "checkpoint"),
        parent: text(m, "parent"),
        description: text(m, "description"),
        pull: m.get_flag("pull"),
        wait: m.get_flag("wait"),
    };
    let json = m.get_flag("json");
    let mut create = ops::prepare_create(store, &name, &opts)?;
    if opts.pull && !json {
        let (uuid, uris) = (&create.uuid, create.export_uris.join(" "));
        println!("Backup {uuid} started; exports served at {uris}");
        create.observe_copies(copy_progress(std::io::stderr().is_terminal()));
    } else if let Some(o) = read_progress(json) {
        create.observe_copies(o);
    }
    let reply = create.run()?;
    match &reply {
        ManagedReply::Created(backup) if json => print_json(backup_json(backup)),
        ManagedReply::Started { .. } if json => print_json(views::job_reply_json(&reply)),
        ManagedReply::Started { uuid } => {
            println!("Backup {uuid} started");
            println!(
                "The backup is recorded once its job ends: run 'vbackup backup-finish {name}' (it waits), or 'backup-finish {name} --check' to see whether it is done"
            );
        }
        ManagedReply::Created(b) => println!("Backup {} created ({})", b.uuid, kind_size(b)),
        _ => return Err(CliError::Other("unexpected answer to a backup".into())),
    }
    Ok(())
}

/// `full, 12.0 MiB`: a backup's kind and allocated size.
fn kind_size(b: &ManagedBackup) -> String {
    let size = human_bytes(b.allocated_size_bytes());
    format!("{}, {size}", b.kind.name())
}

fn finish(store: &Store, name: &str, m: &ArgMatches) -> Result<(), CliError> {
    let (cancel, json) = (m.get_flag("cancel"), m.get_flag("json"));
    // A damaged job journal does not block --cancel: the job ends first.
    if cancel {
        commands::end_damaged_job(store, name)?;
    }
    let reply = ops::finish(store, name, cancel, m.get_flag("check"))?;
    match &reply {
        ManagedReply::Running { .. }
        | ManagedReply::Cancelled { .. }
        | ManagedReply::Created(_)
            if json =>
        {
            print_json(views::job_reply_json(&reply));
        }
        ManagedReply::Running { uuid } => println!("Backup {uuid} is running"),
        ManagedReply::Cancelled { uuid: Some(u) } => println!("Backup {u} cancelled"),
        ManagedReply::Cancelled { uuid: None } => println!("Backup job cancelled"),
        ManagedReply::Created(b) => println!("Backup {} created ({})", b.uuid, kind_size(b)),
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
            let (uuid, kind) = (b.uuid.clone(), b.kind.name().to_owned());
            let parent = b.parent.clone().unwrap_or_default();
            let size = human_bytes(b.allocated_size_bytes());
            vec![uuid, created(b), kind, parent, size]
        })
        .collect();
    let headers = ["UUID", "Creation Time", "Kind", "Parent", "Size"];
    print!("{}", table(&headers, &rows));
}

fn list(store: &Store, m: &ArgMatches) -> Result<(), CliError> {
    let name = domain(m, "backup-list")?;
    let json = m.get_flag("json");
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
    let filter = ops::list_filter(m.get_flag("full"), m.get_flag("latest"));
    let backups = cat.list(filter);
    if m.get_flag("tree") && !json {
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
        print_json(views::verify_json(uuid, &report));
    } else {
        for (disk, r) in &report {
            match r {
                Ok(()) => println!("{disk}: ok"),
                Err(e) => println!("{disk}: FAILED: {e}"),
            }
        }
    }
    ops::verdict(uuid, &report)
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
pub fn dumpxml(store: &Store, uuid: &str, m: &ArgMatches) -> Result<(), CliError> {
    let (b, _) = ops::find(store, uuid)?;
    if m.get_flag("json") {
        print_json(backup_json(&b));
        Ok(())
    } else {
        commands::print_xpath(m, &b.format())
    }
}

fn delete(store: &Store, m: &ArgMatches) -> Result<(), CliError> {
    let target = text(m, "target").expect("a required argument");
    let (all, keep) = (m.get_flag("all"), m.get_flag("keep_checkpoints"));
    let d = ops::delete(store, &target, m.get_flag("children"), all, keep)?;
    let n = d.uuids.len();
    if m.get_flag("json") {
        print_json(views::delete_json(&d, keep));
    } else if all {
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

fn restore(store: &Store, m: &ArgMatches) -> Result<(), CliError> {
    let (json, overwrite) = (m.get_flag("json"), m.get_flag("overwrite"));
    let opts = RestoreOptions {
        uuid: text(m, "uuid").expect("a required argument"),
        until: text(m, "until"),
        new_domain: text(m, "new_domain"),
        dir: path(m, "dir"),
        disks: texts(m, "disk"),
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
        let domain = if overwrite {
            Some(domain)
        } else {
            r.defined.clone()
        };
        print_json(views::restore_json(&r, overwrite, domain.as_deref()));
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
