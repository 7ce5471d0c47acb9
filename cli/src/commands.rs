//! The domain, checkpoint and backup commands, with virsh's names, flags and output. The host
//! runtime (`vbackup_host`) does the work; this module reads the arguments and prints.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

use clap::ArgMatches;
use serde_json::{Value, json};
use vbackup_core::checkpoint::{DeleteScope, ListFilter};
use vbackup_host::checkpoints::{self, Edited};
use vbackup_host::domains;
use vbackup_host::jobs::{self, checkpoint_xml_from_args, export_uris};
use vbackup_host::{managed_ops, views};
use vbackup_qemu::store::Store;

use crate::managed;
use crate::output::{CliError, format_time, print_json, progress_bar, table, virsh_bytes};
use crate::session;
use crate::spec::{domain, path, text, texts, virsh};

/// Prints `xml`, or what `--xpath` selects from it (wrapped with `--wrap`).
pub(crate) fn print_xpath(m: &ArgMatches, xml: &str) -> Result<(), CliError> {
    match text(m, "xpath") {
        Some(expr) => print!(
            "{}",
            vbackup_host::xpath::select(xml, &expr, m.get_flag("wrap"))?
        ),
        None => print!("{xml}"),
    }
    Ok(())
}

/// Runs a command.
pub fn run(state_dir: Option<&Path>, name: &str, m: &ArgMatches) -> Result<(), CliError> {
    let store = session::open_store(state_dir)?;
    let store = &store;
    let json = || m.get_flag("json");
    match name {
        "define" => {
            let file = virsh(m, name)?.required("file")?;
            let defined = domains::define(store, &file, &texts(m, "disk"), path(m, "qmp"))?;
            match defined.from {
                Some(f) => println!("Domain '{}' defined from {f}", defined.name),
                None => println!("Domain '{}' defined", defined.name),
            }
        }
        "undefine" => {
            let name = domain(m, name)?;
            let metadata = m.get_flag("checkpoints_metadata");
            domains::undefine(store, &name, metadata, m.get_flag("remove_all_backups"))?;
            println!("Domain '{name}' has been undefined");
        }
        "list" => list(store, json())?,
        "start" => {
            let name = domain(m, name)?;
            let nbd_socket = domains::start(store, &name)?;
            println!("Domain '{name}' started");
            let socket = nbd_socket.display();
            println!("Guest exports: nbd+unix:///guest-<disk>?socket={socket}");
        }
        "shutdown" => {
            let name = domain(m, name)?;
            domains::shutdown(store, &name)?;
            println!("Domain '{name}' is being shutdown");
        }
        "domblklist" => domblklist(store, &domain(m, name)?, json())?,
        "checkpoint-create" => {
            let args = virsh(m, name)?;
            let (domain, file) = (args.required("domain")?, args.required("xmlfile")?);
            let (redefine, validate) = (m.get_flag("redefine"), m.get_flag("redefine_validate"));
            let quiesce = m.get_flag("quiesce");
            let name =
                jobs::define_checkpoint_file(store, &domain, &file, redefine, validate, quiesce)?;
            // virsh has one message for a checkpoint made from a file, redefined or not.
            println!("Domain checkpoint {name} created from '{file}'");
        }
        "checkpoint-create-as" => {
            let args = virsh(m, name)?;
            let domain = args.required("domain")?;
            let (name, description) = (args.optional("name"), args.optional("description"));
            let diskspec = texts(m, "diskspec");
            let text =
                checkpoint_xml_from_args(name.as_deref(), description.as_deref(), &diskspec)?;
            if m.get_flag("print_xml") {
                print!("{text}");
                return Ok(());
            }
            let quiesce = m.get_flag("quiesce");
            let name = jobs::define_checkpoint(store, &domain, &text, false, false, quiesce)
                .map_err(jobs::from_arguments)?;
            println!("Domain checkpoint {name} created");
        }
        "checkpoint-list" => checkpoint_list(store, m)?,
        "checkpoint-edit" => {
            let (domain, checkpoint) = checkpoint_of(m, name)?;
            match checkpoints::edit(store, &domain, &checkpoint)? {
                Edited::Unchanged => {
                    println!("Checkpoint {checkpoint} XML configuration not changed.");
                }
                Edited::Redefined => println!("Domain checkpoint {checkpoint} edited."),
                Edited::Refused { error, kept } => {
                    let e = error.message();
                    return Err(CliError::Other(format!(
                        "{e}\ncheckpoint {checkpoint} not changed; the edited XML is kept in '{kept}'"
                    )));
                }
            }
        }
        "checkpoint-dumpxml" => {
            let (domain, checkpoint) = checkpoint_of(m, name)?;
            let (no_domain, size) = (m.get_flag("no_domain"), m.get_flag("size"));
            let (c, xml) = jobs::checkpoint_document(store, &domain, &checkpoint, no_domain, size)?;
            if !json() {
                return print_xpath(m, &xml);
            }
            print_json(views::dumped_checkpoint_json(&c, &xml));
        }
        "checkpoint-delete" => {
            let (domain, checkpoint) = checkpoint_of(m, name)?;
            let scope = jobs::delete_scope(m.get_flag("children"), m.get_flag("children_only"));
            let metadata = m.get_flag("metadata");
            jobs::delete_checkpoint(store, &domain, &checkpoint, scope, metadata)?;
            match scope {
                DeleteScope::ChildrenOnly => {
                    println!("Domain checkpoint {checkpoint} children deleted");
                }
                _ => println!("Domain checkpoint {checkpoint} deleted"),
            }
        }
        "checkpoint-parent" => {
            let (domain, checkpoint) = checkpoint_of(m, name)?;
            let parent = checkpoints::parent(store, &domain, &checkpoint)?;
            match json() {
                true => print_json(json!({"parent": parent})),
                false => println!("{parent}"),
            }
        }
        "checkpoint-info" => {
            let (domain, checkpoint) = checkpoint_of(m, name)?;
            let info = checkpoints::info(store, &domain, &checkpoint)?;
            checkpoint_info(&info, &domain, json());
        }
        "backup-begin" => backup_begin(store, m)?,
        "backup-dumpxml" => {
            let domain = domain(m, name)?;
            if vbackup_core::catalogue::validate_uuid(&domain).is_ok() {
                managed::dumpxml(store, &domain, m)?;
            } else {
                let plan = jobs::backup_plan(store, &domain)?;
                if !json() {
                    return print_xpath(m, &plan.to_def().format());
                }
                print_json(serde_json::to_value(&*plan).unwrap_or(Value::Null));
            }
        }
        "domjobinfo" => domjobinfo(store, &domain(m, name)?, m)?,
        "domjobabort" => {
            if let Some(damaged) = jobs::abort(store, &domain(m, name)?)? {
                report_damaged_journal(&damaged);
            }
        }
        _ => unreachable!("command '{name}' is declared but not handled"),
    }
    Ok(())
}

/// `(domain, checkpoint)`, both required, by position or as `--domain` and `--checkpointname`.
fn checkpoint_of(m: &ArgMatches, command: &str) -> Result<(String, String), CliError> {
    let args = virsh(m, command)?;
    Ok((args.required("domain")?, args.required("checkpointname")?))
}

// ----- domains -----

fn list(store: &Store, json: bool) -> Result<(), CliError> {
    let rows = domains::list(store)?;
    if json {
        print_json(rows.iter().map(views::domain_json).collect());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|d| {
            let job = if d.job { "backup" } else { "-" };
            vec![d.name, d.state, job.into()]
        })
        .collect();
    print!("{}", table(&["Name", "State", "Job"], &rows));
    Ok(())
}

fn domblklist(store: &Store, name: &str, json: bool) -> Result<(), CliError> {
    let disks = views::disk_sources(&domains::disks(store, name)?);
    if json {
        print_json(views::disks_json(&disks));
    } else {
        let rows: Vec<Vec<String>> = disks.into_iter().map(|(t, s)| vec![t, s]).collect();
        print!("{}", table(&["Target", "Source"], &rows));
    }
    Ok(())
}

// ----- checkpoints -----

fn checkpoint_list(store: &Store, m: &ArgMatches) -> Result<(), CliError> {
    let (parent, tree) = (m.get_flag("parent"), m.get_flag("tree"));
    // Refused here rather than by clap, so that the message is virsh's, given before the
    // domain is looked up as virsh does.
    if parent && tree {
        return Err(CliError::Other(
            "Options --parent and --tree are mutually exclusive".into(),
        ));
    }
    let filter = ListFilter {
        roots_or_descendants: m.get_flag("roots") || m.get_flag("descendants"),
        topological: m.get_flag("topological") || tree,
        leaves: m.get_flag("leaves"),
        no_leaves: m.get_flag("no_leaves"),
    };
    let name = domain(m, "checkpoint-list")?;
    let listing = checkpoints::list(store, &name, filter, text(m, "from").as_deref())?;
    let list = &listing.checkpoints;
    if m.get_flag("json") {
        print_json(views::listed_checkpoints_json(
            list,
            listing.current.as_deref(),
        ));
    } else if tree {
        let mut out = String::new();
        for root in listing.roots() {
            out.push_str(&format!("{}\n", root.name));
            print_tree(&listing.children, &root.name, "  ", &mut out);
        }
        print!("{out}");
    } else if m.get_flag("name") {
        list.iter().for_each(|c| println!("{}", c.name));
    } else {
        let mut headers = vec!["Name", "Creation Time"];
        headers.extend(parent.then_some("Parent"));
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|c| {
                let mut r = vec![c.name.clone(), format_time(c.creation_time_s)];
                r.extend(parent.then(|| c.parent.clone().unwrap_or_default()));
                r
            })
            .collect();
        print!("{}", table(&headers, &rows));
    }
    Ok(())
}

/// virsh's tree layout: each child under a `|` line, introduced by `+- `.
fn print_tree(
    children: &BTreeMap<String, Vec<String>>,
    name: &str,
    prefix: &str,
    out: &mut String,
) {
    let kids = children.get(name).map(Vec::as_slice).unwrap_or_default();
    for (i, c) in kids.iter().enumerate() {
        out.push_str(&format!("{prefix}|\n{prefix}+- {c}\n"));
        let last = i + 1 == kids.len();
        let next = format!("{prefix}{}", if last { "    " } else { "|   " });
        print_tree(children, c, &next, out);
    }
}

fn checkpoint_info(info: &checkpoints::Info, domain: &str, json: bool) {
    let c = &info.checkpoint;
    if json {
        return print_json(views::checkpoint_info_json(info, domain));
    }
    for (label, value) in [
        ("Name:", c.name.as_str()),
        ("Domain:", domain),
        ("Parent:", c.parent.as_deref().unwrap_or("-")),
        ("Children:", &info.children.to_string()),
        ("Descendants:", &info.descendants.to_string()),
        ("Current:", if info.current { "yes" } else { "no" }),
    ] {
        println!("{label:<15} {value}");
    }
}

// ----- backups and jobs -----

fn backup_begin(store: &Store, m: &ArgMatches) -> Result<(), CliError> {
    let args = virsh(m, "backup-begin")?;
    let domain = args.required("domain")?;
    let (backupxml, checkpointxml) = (args.optional("backupxml"), args.optional("checkpointxml"));
    let reuse = m.get_flag("reuse_external");
    let (backupxml, checkpointxml) = (backupxml.as_deref(), checkpointxml.as_deref());
    let mut s = jobs::begin_files(store, &domain, backupxml, checkpointxml, reuse)?;
    let view = s.driver.domain().view();
    match view.backup.and_then(export_uris) {
        Some(uris) => println!("Backup started; exports served at {}", uris.join(" ")),
        // Without a <domainbackup> the targets were chosen here: say where they are.
        None if backupxml.is_none() => {
            let targets: Vec<String> = view
                .backup
                .iter()
                .flat_map(|plan| &plan.disks)
                .map(|d| format!("{} to {}", d.target, d.store_path))
                .collect();
            println!("Backup started; writing {}", targets.join(", "));
        }
        None => println!("Backup started"),
    }
    if !m.get_flag("wait") {
        return s.close();
    }
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| progress_bar(0, None));
    let poll_ms = if bar.is_some() { 200 } else { 1000 };
    let stats = jobs::follow(&mut s, poll_ms, |st| {
        if let Some(b) = &bar {
            b.set_length(st.disk_total_bytes.unwrap_or(0));
            b.set_position(st.disk_processed_bytes.unwrap_or(0));
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    s.close()?;
    jobs::outcome(stats)?;
    println!("Backup complete");
    Ok(())
}

/// Prints job statistics as virsh 11.3 does (labels, column widths and `%.3lf` units).
fn print_stats(stats: Option<&Value>, m: &ArgMatches, pending: Option<&str>) {
    if m.get_flag("json") {
        return print_json(views::job_json(stats, pending));
    }
    let status = stats.and_then(|st| st["status"].as_str()).unwrap_or("none");
    let (number, word) = views::job_type(status);
    if m.get_flag("rawstats") {
        println!("Job type: {number}\n");
        for (name, value) in stats.map(views::raw_params).unwrap_or_default() {
            println!("{name}: {value}");
        }
        return;
    }
    println!("{:<17} {word:<12}", "Job type:");
    let Some(st) = stats else {
        return;
    };
    println!("{:<17} {:<12}", "Operation:", "Backup");
    // virsh shows a finished job's numbers only for a completed job asked with --completed,
    // or with --anystats.
    let completed = m.get_flag("completed") && status == "completed";
    if !matches!(status, "running") && !completed && !m.get_flag("anystats") {
        return;
    }
    if let Some(ms) = st["time_elapsed_ms"].as_u64() {
        println!("{:<17} {ms:<12} ms", "Time elapsed:");
    }
    for (label, key) in [
        ("File processed:", "disk_processed_bytes"),
        ("File remaining:", "disk_remaining_bytes"),
        ("File total:", "disk_total_bytes"),
        ("Temporary disk space use:", "disk_temp_used_bytes"),
        ("Temporary disk space total:", "disk_temp_total_bytes"),
    ] {
        if let Some(b) = st[key].as_u64() {
            println!("{label:<17} {}", virsh_bytes(b));
        }
    }
    // Not a libvirt line: what a running backup waits for, when the engine knows it.
    if let (Some(what), "running") = (st["waiting_for"].as_str(), status) {
        println!("{:<17} {what}", "Waiting for:");
    }
    if let Some(msg) = st["errmsg"].as_str() {
        println!("{:<17} {msg}", "Error message:");
    }
}

fn domjobinfo(store: &Store, name: &str, m: &ArgMatches) -> Result<(), CliError> {
    let pending = managed_ops::pending_backup(store, name);
    let (completed, keep) = (m.get_flag("completed"), m.get_flag("keep_completed"));
    let info = jobs::job_info(store, name, completed, keep)?;
    print_stats(info.stats.as_ref(), m, pending.as_deref());
    // A managed backup that waits for `backup-finish` is otherwise invisible: say so, after
    // (never inside) libvirt's lines.
    let machine = m.get_flag("json") || m.get_flag("rawstats");
    let pending = managed_ops::pending_backup(store, name).filter(|_| !machine);
    if let Some(uuid) = pending {
        println!("{}", managed::pending_note(&uuid, name, info.running));
    }
    Ok(())
}

/// Ends the job of a domain whose journal cannot be read, saying so.
pub(crate) fn end_damaged_job(store: &Store, name: &str) -> Result<(), CliError> {
    if let Some(d) = jobs::end_damaged_job(store, name)? {
        report_damaged_journal(&d);
    }
    Ok(())
}

fn report_damaged_journal(damaged: &jobs::DamagedJournal) {
    eprintln!(
        "warning: the job journal '{}' was damaged ({}); the job QEMU showed was ended and the journal removed; files the job wrote may remain",
        damaged.path.display(),
        damaged.reason
    );
}
