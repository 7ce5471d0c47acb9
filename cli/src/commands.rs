//! The domain, checkpoint and backup commands, with virsh's names, flags and output. The host
//! runtime (`vbackup_host`) does the work; this module parses the arguments and prints.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use vbackup_core::checkpoint::{DeleteScope, ListFilter};
use vbackup_core::xml::CheckpointFormat;
use vbackup_host::checkpoints::{self, Edited};
use vbackup_host::domains::{self, read_file};
use vbackup_host::jobs::{self, checkpoint_xml_from_args, export_uris};
use vbackup_host::{managed_ops, views};
use vbackup_qemu::store::Store;

use crate::output::{CliError, format_time, print_json, table, virsh_bytes};
use crate::session;
use crate::virsh_args::{DomainArg, fill, required};

/// Options every domain command shares.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// State directory (default: $XDG_DATA_HOME/vbackup).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub state_dir: Option<PathBuf>,
    /// Commands that change a domain another vbackup holds wait up to SECONDS for it (default:
    /// fail at once, naming the holder). Refused by the read-only commands (list, domblklist,
    /// checkpoint-list, -parent, -info, backup-dumpxml, domjobinfo), which never wait: they
    /// read the store.
    #[arg(long, value_name = "SECONDS", help_heading = "Global options")]
    pub wait_lock: Option<u64>,
}

#[derive(Debug, Clone, Copy, Args)]
pub struct Json {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DomainJson {
    #[command(flatten)]
    dom: DomainArg,
    #[command(flatten)]
    json: Json,
}

/// Domain, checkpoint and backup commands.
///
/// Every argument virsh names (`--domain`, `--checkpointname`, `--xmlfile`, `--name`,
/// `--description`, `--backupxml`, `--checkpointxml`, `--file`) is taken by position or by
/// name; see [`crate::virsh_args`].
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Define a domain from a libvirt domain XML file, or NAME with --disk, or NAME --qmp
    /// SOCKET with the disks the running QEMU reports.
    Define(DefineArgs),
    /// Undefine a domain.
    Undefine(UndefineArgs),
    /// Start a managed domain's qemu-storage-daemon with its guest NBD exports and keep it
    /// running until `shutdown`.
    Start(DomainArg),
    /// Stop a managed domain's daemon (refused while a backup job runs).
    Shutdown(DomainArg),
    /// List domains.
    List {
        #[command(flatten)]
        json: Json,
        /// Accepted for virsh compatibility (all domains are always listed).
        #[arg(long)]
        all: bool,
    },
    /// List a domain's disks.
    Domblklist(DomainJson),
    /// Create a checkpoint from an XML file.
    CheckpointCreate(CheckpointCreateArgs),
    /// Create a checkpoint from arguments.
    CheckpointCreateAs(CheckpointCreateAsArgs),
    /// List checkpoints.
    CheckpointList(CheckpointListArgs),
    /// Edit a checkpoint's XML with $VISUAL or $EDITOR (default vi); the edited document is
    /// validated and then redefines the checkpoint, as virsh does.
    CheckpointEdit(CheckpointArgs),
    /// Print a checkpoint's XML.
    CheckpointDumpxml(CheckpointDumpxmlArgs),
    /// Delete a checkpoint.
    CheckpointDelete(CheckpointDeleteArgs),
    /// Print a checkpoint's parent.
    CheckpointParent(CheckpointJson),
    /// Show checkpoint information.
    CheckpointInfo(CheckpointJson),
    /// Begin a backup.
    BackupBegin(BackupBeginArgs),
    /// Print the running backup's XML, or given a uuid the managed backup's `<managedbackup>`.
    BackupDumpxml {
        #[command(flatten)]
        dom: DomainArg,
        #[command(flatten)]
        xpath: XpathArgs,
        /// Machine-readable output.
        #[arg(long, conflicts_with = "xpath")]
        json: bool,
    },
    /// Show job information.
    Domjobinfo(JobInfoArgs),
    /// Abort the running job (ends a pull backup).
    Domjobabort(DomainArg),
}

#[derive(Debug, Args)]
pub struct DefineArgs {
    /// A domain XML file, or the new domain's name (with --disk, or with --qmp alone).
    #[arg(value_name = "FILE_OR_NAME")]
    file_or_name: Option<String>,
    /// A domain XML file or name, as virsh's named form of FILE_OR_NAME.
    #[arg(long = "file", value_name = "FILE")]
    file_named: Option<String>,
    /// A disk: TARGET=PATH[,format=qcow2|raw] (repeatable).
    #[arg(long, value_name = "TARGET=PATH[,format=F]")]
    disk: Vec<String>,
    /// Attach to this QMP socket instead of running qemu-storage-daemon; without --disk
    /// (and when NAME is not a file) the disks are discovered from it.
    #[arg(long, value_name = "SOCKET")]
    qmp: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UndefineArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// Also drop checkpoint metadata (bitmaps stay in the images).
    #[arg(long)]
    checkpoints_metadata: bool,
    /// Also delete every managed backup of the domain and its images.
    #[arg(long)]
    remove_all_backups: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointCreateArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// `<domaincheckpoint>` file (or `--xmlfile FILE`).
    #[arg(value_name = "XMLFILE")]
    file: Option<String>,
    /// `<domaincheckpoint>` file, as virsh's named form of XMLFILE.
    #[arg(long = "xmlfile", value_name = "FILE")]
    xmlfile: Option<String>,
    /// Re-insert stored metadata.
    #[arg(long)]
    redefine: bool,
    /// With --redefine: check the bitmaps in QEMU.
    #[arg(long, requires = "redefine")]
    redefine_validate: bool,
    /// Quiesce the guest (refused: no guest agent).
    #[arg(long)]
    quiesce: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointCreateAsArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// Checkpoint name (default: the current time; or `--name NAME`).
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Description (or `--description TEXT`).
    #[arg(value_name = "DESCRIPTION")]
    description: Option<String>,
    /// Checkpoint name, as virsh's named form of NAME.
    #[arg(long = "name", id = "name_named", value_name = "NAME")]
    name_named: Option<String>,
    /// Description, as virsh's named form of DESCRIPTION.
    #[arg(long = "description", id = "description_named", value_name = "TEXT")]
    description_named: Option<String>,
    #[arg(
        long,
        help = "Per disk: TARGET[,checkpoint=bitmap|no][,bitmap=NAME] (repeatable)"
    )]
    diskspec: Vec<String>,
    /// Print the XML instead of creating the checkpoint.
    #[arg(long)]
    print_xml: bool,
    /// Quiesce the guest (refused: no guest agent).
    #[arg(long)]
    quiesce: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointListArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// Show the tree of checkpoints.
    #[arg(long)]
    tree: bool,
    /// Only checkpoints without a parent.
    #[arg(long)]
    roots: bool,
    /// Only checkpoints without children.
    #[arg(long)]
    leaves: bool,
    /// Only checkpoints with children.
    #[arg(long)]
    no_leaves: bool,
    /// Parents before children.
    #[arg(long)]
    topological: bool,
    /// Add a parent column (not with --tree, which shows the parents already, as virsh
    /// refuses it).
    #[arg(long)]
    parent: bool,
    /// Names only.
    #[arg(long)]
    name: bool,
    /// Only the children of this checkpoint (with --descendants: all its descendants).
    #[arg(long, value_name = "NAME", conflicts_with = "roots")]
    from: Option<String>,
    /// With --from: all descendants, not only the children.
    #[arg(long, requires = "from")]
    descendants: bool,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct CheckpointDumpxmlArgs {
    #[command(flatten)]
    cp: CheckpointArgs,
    /// Leave out the embedded domain.
    #[arg(long)]
    no_domain: bool,
    /// Include the bytes dirtied since the checkpoint per disk.
    #[arg(long)]
    size: bool,
    /// Accepted for virsh compatibility: checkpoint XML holds no secrets to hide.
    #[arg(long)]
    security_info: bool,
    #[command(flatten)]
    xpath: XpathArgs,
    /// Machine-readable output.
    #[arg(long, conflicts_with = "xpath")]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointDeleteArgs {
    #[command(flatten)]
    cp: CheckpointArgs,
    /// Also its descendants.
    #[arg(long, conflicts_with = "children_only")]
    children: bool,
    /// Only its descendants.
    #[arg(long)]
    children_only: bool,
    /// Only metadata; bitmaps stay.
    #[arg(long)]
    metadata: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointJson {
    #[command(flatten)]
    cp: CheckpointArgs,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct BackupBeginArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// `<domainbackup>` file (default: push full backup of every disk; or `--backupxml`).
    #[arg(value_name = "BACKUPXML")]
    backupxml: Option<String>,
    /// `<domaincheckpoint>` file: a checkpoint created with the backup (or
    /// `--checkpointxml`).
    #[arg(value_name = "CHECKPOINTXML")]
    checkpointxml: Option<String>,
    /// `<domainbackup>` file, as virsh's named form of BACKUPXML.
    #[arg(long = "backupxml", id = "backupxml_named", value_name = "FILE")]
    backupxml_named: Option<String>,
    /// `<domaincheckpoint>` file, as virsh's named form of CHECKPOINTXML.
    #[arg(
        long = "checkpointxml",
        id = "checkpointxml_named",
        value_name = "FILE"
    )]
    checkpointxml_named: Option<String>,
    /// Targets or scratch images exist already.
    #[arg(long)]
    reuse_external: bool,
    /// Wait for the job to end, with a progress bar on a terminal.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Clone, Args)]
pub struct JobInfoArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// The last finished job; its statistics are shown once, then discarded unless
    /// --keep-completed is given (as libvirt does).
    #[arg(long)]
    completed: bool,
    /// With --completed: keep the statistics for the next call.
    #[arg(long, requires = "completed")]
    keep_completed: bool,
    /// Print libvirt's raw typed parameters (`name: value`).
    #[arg(long)]
    rawstats: bool,
    /// Print the statistics of any job, also a failed or cancelled one.
    #[arg(long)]
    anystats: bool,
    /// Machine-readable output.
    #[arg(long, conflicts_with = "rawstats")]
    json: bool,
}

/// `--xpath EXPR [--wrap]`, as virsh's dumpxml commands take them.
#[derive(Debug, Clone, Args)]
pub struct XpathArgs {
    /// Print only the nodes this XPath location path selects.
    #[arg(long, value_name = "EXPR")]
    xpath: Option<String>,
    /// With --xpath: wrap the selected nodes in one `<nodes>` element.
    #[arg(long, requires = "xpath")]
    wrap: bool,
}

impl XpathArgs {
    /// Prints `xml`, or what the expression selects from it.
    pub(crate) fn print(&self, xml: &str) -> Result<(), CliError> {
        match &self.xpath {
            Some(expr) => print!("{}", vbackup_host::xpath::select(xml, expr, self.wrap)?),
            None => print!("{xml}"),
        }
        Ok(())
    }
}

/// A domain and one of its checkpoints, by position or as `--domain` and `--checkpointname`.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    dom: DomainArg,
    /// Checkpoint name (or `--checkpointname NAME`).
    #[arg(value_name = "CHECKPOINTNAME")]
    checkpoint: Option<String>,
    /// Checkpoint name, as virsh's named form of CHECKPOINTNAME.
    #[arg(long = "checkpointname", value_name = "NAME")]
    checkpointname: Option<String>,
}

impl CheckpointArgs {
    /// `(domain, checkpoint)`, both required.
    fn get(self, command: &str) -> Result<(String, String), CliError> {
        let slots = [
            ("domain", self.dom.domain_named),
            ("checkpointname", self.checkpointname),
        ];
        let [domain, checkpoint] = fill(slots, [self.dom.domain, self.checkpoint])?;
        Ok((
            required(command, "domain", domain)?,
            required(command, "checkpointname", checkpoint)?,
        ))
    }
}

/// Runs a command.
pub fn run(global: &Global, command: DomainCommand) -> Result<(), CliError> {
    use DomainCommand as C;
    let store = session::open_store(global.state_dir.as_deref())?;
    let store = &store;
    match command {
        C::Define(a) => {
            let [file] = fill([("file", a.file_named)], [a.file_or_name])?;
            let file = required("define", "file", file)?;
            let defined = domains::define(store, &file, &a.disk, a.qmp)?;
            match defined.from {
                Some(f) => println!("Domain '{}' defined from {f}", defined.name),
                None => println!("Domain '{}' defined", defined.name),
            }
        }
        C::Undefine(a) => {
            let name = a.dom.get("undefine")?;
            let (metadata, backups) = (a.checkpoints_metadata, a.remove_all_backups);
            domains::undefine(store, &name, metadata, backups)?;
            println!("Domain '{name}' has been undefined");
        }
        C::List { json, .. } => list(store, json.json)?,
        C::Start(dom) => {
            let name = dom.get("start")?;
            let nbd_socket = domains::start(store, &name)?;
            println!("Domain '{name}' started");
            let socket = nbd_socket.display();
            println!("Guest exports: nbd+unix:///guest-<disk>?socket={socket}");
        }
        C::Shutdown(dom) => {
            let name = dom.get("shutdown")?;
            domains::shutdown(store, &name)?;
            println!("Domain '{name}' is being shutdown");
        }
        C::Domblklist(a) => domblklist(store, &a.dom.get("domblklist")?, a.json.json)?,
        C::CheckpointCreate(a) => {
            let slots = [("domain", a.dom.domain_named), ("xmlfile", a.xmlfile)];
            let [domain, file] = fill(slots, [a.dom.domain, a.file])?;
            let domain = required("checkpoint-create", "domain", domain)?;
            let file = required("checkpoint-create", "xmlfile", file)?;
            let text = read_file(Path::new(&file))?;
            let (redefine, validate) = (a.redefine, a.redefine_validate);
            let name =
                jobs::define_checkpoint(store, &domain, &text, redefine, validate, a.quiesce)
                    .map_err(|e| in_file(&file, e))?;
            // virsh has one message for a checkpoint made from a file, redefined or not.
            println!("Domain checkpoint {name} created from '{file}'");
        }
        C::CheckpointCreateAs(a) => {
            let slots = [
                ("domain", a.dom.domain_named),
                ("name", a.name_named),
                ("description", a.description_named),
            ];
            let [domain, name, description] = fill(slots, [a.dom.domain, a.name, a.description])?;
            let domain = required("checkpoint-create-as", "domain", domain)?;
            let text =
                checkpoint_xml_from_args(name.as_deref(), description.as_deref(), &a.diskspec)?;
            if a.print_xml {
                print!("{text}");
                return Ok(());
            }
            let name = jobs::define_checkpoint(store, &domain, &text, false, false, a.quiesce)
                .map_err(from_arguments)?;
            println!("Domain checkpoint {name} created");
        }
        C::CheckpointList(a) => checkpoint_list(store, a)?,
        C::CheckpointEdit(cp) => {
            let (domain, checkpoint) = cp.get("checkpoint-edit")?;
            match checkpoints::edit(store, &domain, &checkpoint)? {
                Edited::Unchanged => {
                    println!("Checkpoint {checkpoint} XML configuration not changed.");
                }
                Edited::Redefined => println!("Domain checkpoint {checkpoint} edited."),
                Edited::Refused { error, kept } => {
                    let e = crate::output::message(&error);
                    return Err(CliError::Other(format!(
                        "{e}\ncheckpoint {checkpoint} not changed; the edited XML is kept in '{kept}'"
                    )));
                }
            }
        }
        C::CheckpointDumpxml(a) => {
            let (domain, checkpoint) = a.cp.get("checkpoint-dumpxml")?;
            let (no_domain, size) = (a.no_domain, a.size);
            let c = jobs::checkpoint(store, &domain, &checkpoint, size)?;
            let format = CheckpointFormat {
                no_domain,
                include_size: size,
            };
            let xml = c.to_def().format(format);
            if !a.json {
                return a.xpath.print(&xml);
            }
            let mut v = views::checkpoint_json(&c, true);
            v["xml"] = json!(xml);
            print_json(v);
        }
        C::CheckpointDelete(a) => {
            let (domain, checkpoint) = a.cp.get("checkpoint-delete")?;
            let scope = match (a.children, a.children_only) {
                (true, _) => DeleteScope::WithChildren,
                (_, true) => DeleteScope::ChildrenOnly,
                _ => DeleteScope::Single,
            };
            jobs::delete_checkpoint(store, &domain, &checkpoint, scope, a.metadata)?;
            match scope {
                DeleteScope::ChildrenOnly => {
                    println!("Domain checkpoint {checkpoint} children deleted");
                }
                _ => println!("Domain checkpoint {checkpoint} deleted"),
            }
        }
        C::CheckpointParent(a) => {
            let (domain, checkpoint) = a.cp.get("checkpoint-parent")?;
            let parent = checkpoints::parent(store, &domain, &checkpoint)?;
            match a.json.json {
                true => print_json(json!({"parent": parent})),
                false => println!("{parent}"),
            }
        }
        C::CheckpointInfo(a) => {
            let (domain, checkpoint) = a.cp.get("checkpoint-info")?;
            checkpoint_info(
                &checkpoints::info(store, &domain, &checkpoint)?,
                &domain,
                a.json.json,
            );
        }
        C::BackupBegin(a) => backup_begin(store, a)?,
        C::BackupDumpxml { dom, xpath, json } => {
            let domain = dom.get("backup-dumpxml")?;
            if vbackup_core::catalogue::validate_uuid(&domain).is_ok() {
                crate::managed::dumpxml(store, &domain, json, &xpath)?;
            } else {
                let plan = jobs::backup_plan(store, &domain)?;
                if !json {
                    return xpath.print(&plan.to_def().format());
                }
                print_json(serde_json::to_value(&*plan).unwrap_or(Value::Null));
            }
        }
        C::Domjobinfo(a) => domjobinfo(store, a)?,
        C::Domjobabort(dom) => {
            if let Some(damaged) = jobs::abort(store, &dom.get("domjobabort")?)? {
                report_damaged_journal(&damaged);
            }
        }
    }
    Ok(())
}

/// An XML error of a document the user gave as a file, named after the file (other errors
/// are not about the file and pass unchanged).
fn in_file(file: &str, e: impl Into<CliError>) -> CliError {
    match e.into() {
        CliError::Xml(x) => CliError::Other(format!("XML error: {file}:{x}")),
        other => other,
    }
}

/// An XML error of the document `checkpoint-create-as` built from its arguments, told in
/// terms of the arguments: the user never saw that document.
fn from_arguments(e: impl Into<CliError>) -> CliError {
    match e.into() {
        CliError::Xml(x) => {
            let argument = if x.path.contains("/disk") {
                "--diskspec"
            } else if x.path.contains("/name") {
                "NAME (--name)"
            } else if x.path.contains("/description") {
                "DESCRIPTION (--description)"
            } else {
                "the arguments"
            };
            CliError::Other(format!("invalid argument: {argument}: {}", x.message))
        }
        other => other,
    }
}

// ----- domains -----

fn list(store: &Store, json: bool) -> Result<(), CliError> {
    let rows = domains::list(store)?;
    if json {
        print_json(rows.iter().map(|d| {
            let job = if d.job { "backup" } else { "none" };
            json!({"name": d.name, "state": d.state, "qmp": d.qmp, "job": job, "disks": d.disks})
        }).collect());
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
    let disks: Vec<(String, String)> = domains::disks(store, name)?
        .iter()
        .map(|d| {
            let src = d.top().and_then(|l| l.path.clone());
            (d.target.clone(), src.unwrap_or_else(|| "-".into()))
        })
        .collect();
    if json {
        let v = disks.iter().map(|(t, s)| json!({"target": t, "source": s}));
        print_json(v.collect());
    } else {
        let rows: Vec<Vec<String>> = disks.into_iter().map(|(t, s)| vec![t, s]).collect();
        print!("{}", table(&["Target", "Source"], &rows));
    }
    Ok(())
}

// ----- checkpoints -----

fn checkpoint_list(store: &Store, a: CheckpointListArgs) -> Result<(), CliError> {
    // Refused here rather than by clap, so that the message is virsh's, given before the
    // domain is looked up as virsh does.
    if a.parent && a.tree {
        return Err(CliError::Other(
            "Options --parent and --tree are mutually exclusive".into(),
        ));
    }
    let filter = ListFilter {
        roots_or_descendants: a.roots || a.descendants,
        topological: a.topological || a.tree,
        leaves: a.leaves,
        no_leaves: a.no_leaves,
    };
    let name = a.dom.get("checkpoint-list")?;
    let listing = checkpoints::list(store, &name, filter, a.from.as_deref())?;
    let list = &listing.checkpoints;
    if a.json.json {
        print_json(
            list.iter()
                .map(|c| {
                    let mut v = views::checkpoint_json(c, false);
                    v["current"] = json!(listing.current.as_deref() == Some(c.name.as_str()));
                    v
                })
                .collect(),
        );
    } else if a.tree {
        let included: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
        let mut out = String::new();
        let roots = list
            .iter()
            .filter(|c| c.parent.as_deref().is_none_or(|p| !included.contains(&p)));
        for root in roots {
            out.push_str(&format!("{}\n", root.name));
            print_tree(&listing.children, &root.name, "  ", &mut out);
        }
        print!("{out}");
    } else if a.name {
        list.iter().for_each(|c| println!("{}", c.name));
    } else {
        let mut headers = vec!["Name", "Creation Time"];
        headers.extend(a.parent.then_some("Parent"));
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|c| {
                let mut r = vec![c.name.clone(), format_time(c.creation_time_s)];
                r.extend(a.parent.then(|| c.parent.clone().unwrap_or_default()));
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
    let (children, descendants, current) = (info.children, info.descendants, info.current);
    if json {
        print_json(
            json!({"name": c.name, "domain": domain, "parent": c.parent, "children": children,
                   "descendants": descendants, "current": current}),
        );
        return;
    }
    for (label, value) in [
        ("Name:", c.name.as_str()),
        ("Domain:", domain),
        ("Parent:", c.parent.as_deref().unwrap_or("-")),
        ("Children:", &children.to_string()),
        ("Descendants:", &descendants.to_string()),
        ("Current:", if current { "yes" } else { "no" }),
    ] {
        println!("{label:<15} {value}");
    }
}

// ----- backups and jobs -----

fn backup_begin(store: &Store, a: BackupBeginArgs) -> Result<(), CliError> {
    let slots = [
        ("domain", a.dom.domain_named),
        ("backupxml", a.backupxml_named),
        ("checkpointxml", a.checkpointxml_named),
    ];
    let [domain, backupxml, checkpointxml] =
        fill(slots, [a.dom.domain, a.backupxml, a.checkpointxml])?;
    let domain = required("backup-begin", "domain", domain)?;
    let read = |p: &Option<String>| p.as_deref().map(|p| read_file(Path::new(p))).transpose();
    let (backup, checkpoint) = (read(&backupxml)?, read(&checkpointxml)?);
    let (backup, checkpoint) = (backup.as_deref(), checkpoint.as_deref());
    let begun = begin(store, &domain, backup, checkpoint, a.reuse_external, a.wait);
    begun.map_err(|e| {
        // Name the file the error is in, told by the document's root element.
        let file = match &e {
            CliError::Xml(x) if x.path.starts_with("/domaincheckpoint") => checkpointxml.as_deref(),
            CliError::Xml(_) => backupxml.as_deref(),
            _ => None,
        };
        match file {
            Some(f) => in_file(f, e),
            None => e,
        }
    })
}

fn begin(
    store: &Store,
    name: &str,
    backup: Option<&str>,
    checkpoint: Option<&str>,
    reuse_external: bool,
    wait: bool,
) -> Result<(), CliError> {
    let mut s = jobs::begin(store, name, backup, checkpoint, reuse_external)?;
    let view = s.driver.domain().view();
    match view.backup.and_then(export_uris) {
        Some(uris) => println!("Backup started; exports served at {}", uris.join(" ")),
        // Without a <domainbackup> the targets were chosen here: say where they are.
        None if backup.is_none() => {
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
    if !wait {
        return s.close();
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(bar_style(""));
        b
    });
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
    match stats {
        Some(st) if st.success == Some(true) => {
            println!("Backup complete");
            Ok(())
        }
        Some(st) => {
            let status = serde_json::to_value(st.status).unwrap_or(Value::Null);
            let status = status.as_str().unwrap_or("ended");
            let errmsg = st.errmsg.unwrap_or_default();
            let message = format!("operation failed: backup job {status}: {errmsg}");
            Err(CliError::Other(message))
        }
        None => Err(CliError::Other(
            "backup job ended without statistics".into(),
        )),
    }
}

/// The style of a progress bar, after `prefix` (a template part, e.g. `{prefix} `).
pub(crate) fn bar_style(prefix: &str) -> indicatif::ProgressStyle {
    let template =
        "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})";
    indicatif::ProgressStyle::with_template(&format!("{prefix}{template}"))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

/// Prints job statistics as virsh 11.3 does (labels, column widths and `%.3lf` units).
fn print_stats(stats: Option<&Value>, opts: &JobInfoArgs, pending: Option<&str>) {
    if opts.json {
        let mut v = stats.cloned().unwrap_or_else(|| json!({"status": "none"}));
        v["pendingBackup"] = json!(pending);
        print_json(v);
        return;
    }
    let status = stats.and_then(|st| st["status"].as_str()).unwrap_or("none");
    let (number, word) = views::job_type(status);
    if opts.rawstats {
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
    let shown = matches!(status, "running") || (opts.completed && status == "completed");
    if !shown && !opts.anystats {
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

fn domjobinfo(store: &Store, opts: JobInfoArgs) -> Result<(), CliError> {
    let name = opts.dom.clone().get("domjobinfo")?;
    let dir = store.root().join("domains").join(&name);
    let pending = managed_ops::pending_uuid(&dir);
    let info = jobs::job_info(store, &name, opts.completed, opts.keep_completed)?;
    print_stats(info.stats.as_ref(), &opts, pending.as_deref());
    // A managed backup that waits for `backup-finish` is otherwise invisible: say so, after
    // (never inside) libvirt's lines.
    let pending = managed_ops::pending_uuid(&dir).filter(|_| !opts.json && !opts.rawstats);
    if let Some(uuid) = pending {
        println!(
            "{}",
            crate::managed::pending_note(&uuid, &name, info.running)
        );
    }
    Ok(())
}

/// Ends the job of a domain whose journal cannot be read, saying so; whether there was one.
pub(crate) fn end_damaged_job(store: &Store, name: &str) -> Result<bool, CliError> {
    let damaged = jobs::end_damaged_job(store, name)?;
    if let Some(d) = &damaged {
        report_damaged_journal(d);
    }
    Ok(damaged.is_some())
}

fn report_damaged_journal(damaged: &jobs::DamagedJournal) {
    eprintln!(
        "warning: the job journal '{}' was damaged ({}); the job QEMU showed was ended and the journal removed; files the job wrote may remain",
        damaged.path.display(),
        damaged.reason
    );
}
