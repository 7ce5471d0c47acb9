//! The domain, checkpoint and backup commands, with virsh's names, flags and output.
//!
//! Read-only commands answer from the store without starting QEMU, unless a job is journaled
//! (then QEMU is reached first so the core reconciles the job). While another vbackup holds the
//! domain they read the store without the lock instead (see `session`). Commands that change
//! bitmaps, compute sizes or run jobs always lock the domain and open a QMP session.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use vbackup_core::backup::JobStats;
use vbackup_core::checkpoint::{CheckpointTree, DeleteScope, ListFilter};
use vbackup_core::error::Error as EngineError;
use vbackup_core::xml::{CheckpointDef, CheckpointFormat, CheckpointMode};
use vbackup_qemu::store::Store;

pub(crate) use vbackup_host::domains::esc;
use vbackup_host::domains::{self, read_file};
use vbackup_host::jobs::{self, checkpoint_xml_from_args};
pub(crate) use vbackup_host::jobs::{checkpoint_for_backup, export_uris, parse_new_checkpoint};
use vbackup_host::session::{self, Attachment, Session};

use crate::output::{CliError, format_time, print_json, table};
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

/// Domain, checkpoint and backup commands.
///
/// Every argument virsh names (`--domain`, `--checkpointname`, `--xmlfile`, `--name`,
/// `--description`, `--backupxml`, `--checkpointxml`, `--file`) is taken by position or by
/// name; see [`crate::virsh_args`].
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Define a domain from a libvirt domain XML file, or NAME with --disk, or NAME --qmp
    /// SOCKET with the disks the running QEMU reports.
    Define {
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
    },
    /// Undefine a domain.
    Undefine {
        #[command(flatten)]
        dom: DomainArg,
        /// Also drop checkpoint metadata (bitmaps stay in the images).
        #[arg(long)]
        checkpoints_metadata: bool,
        /// Also delete every managed backup of the domain and its images.
        #[arg(long)]
        remove_all_backups: bool,
    },
    /// Start a managed domain's qemu-storage-daemon with its guest NBD exports and keep it
    /// running until `shutdown`.
    Start {
        #[command(flatten)]
        dom: DomainArg,
    },
    /// Stop a managed domain's daemon (refused while a backup job runs).
    Shutdown {
        #[command(flatten)]
        dom: DomainArg,
    },
    /// List domains.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Accepted for virsh compatibility (all domains are always listed).
        #[arg(long)]
        all: bool,
    },
    /// List a domain's disks.
    Domblklist {
        #[command(flatten)]
        dom: DomainArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create a checkpoint from an XML file.
    CheckpointCreate {
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
    },
    /// Create a checkpoint from arguments.
    CheckpointCreateAs {
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
    },
    /// List checkpoints.
    CheckpointList {
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
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Edit a checkpoint's XML with $VISUAL or $EDITOR (default vi); the edited document is
    /// validated and then redefines the checkpoint, as virsh does.
    CheckpointEdit {
        #[command(flatten)]
        cp: CheckpointArgs,
    },
    /// Print a checkpoint's XML.
    CheckpointDumpxml {
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
    },
    /// Delete a checkpoint.
    CheckpointDelete {
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
    },
    /// Print a checkpoint's parent.
    CheckpointParent {
        #[command(flatten)]
        cp: CheckpointArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show checkpoint information.
    CheckpointInfo {
        #[command(flatten)]
        cp: CheckpointArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Begin a backup.
    BackupBegin {
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
    },
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
    Domjobinfo {
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
    },
    /// Abort the running job (ends a pull backup).
    Domjobabort {
        #[command(flatten)]
        dom: DomainArg,
    },
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
        let [domain, checkpoint] = fill(
            [
                ("domain", self.dom.domain_named),
                ("checkpointname", self.checkpointname),
            ],
            [self.dom.domain, self.checkpoint],
        )?;
        Ok((
            required(command, "domain", domain)?,
            required(command, "checkpointname", checkpoint)?,
        ))
    }
}

/// Runs a command.
pub fn run(global: &Global, command: DomainCommand) -> Result<(), CliError> {
    let store = session::open_store(global.state_dir.as_deref())?;
    match command {
        DomainCommand::Define {
            file_or_name,
            file_named,
            disk,
            qmp,
        } => {
            let [file] = fill([("file", file_named)], [file_or_name])?;
            let said = define(&store, &required("define", "file", file)?, &disk, qmp)?;
            println!("{said}");
            Ok(())
        }
        DomainCommand::Undefine {
            dom,
            checkpoints_metadata,
            remove_all_backups,
        } => undefine(
            &store,
            &dom.get("undefine")?,
            checkpoints_metadata,
            remove_all_backups,
        ),
        DomainCommand::List { json, .. } => list(&store, json),
        DomainCommand::Start { dom } => start(&store, &dom.get("start")?),
        DomainCommand::Shutdown { dom } => shutdown(&store, &dom.get("shutdown")?),
        DomainCommand::Domblklist { dom, json } => {
            domblklist(&store, &dom.get("domblklist")?, json)
        }
        DomainCommand::CheckpointCreate {
            dom,
            file,
            xmlfile,
            redefine,
            redefine_validate,
            quiesce,
        } => {
            let [domain, file] = fill(
                [("domain", dom.domain_named), ("xmlfile", xmlfile)],
                [dom.domain, file],
            )?;
            let domain = required("checkpoint-create", "domain", domain)?;
            let file = required("checkpoint-create", "xmlfile", file)?;
            let text = read_file(Path::new(&file))?;
            let name = jobs::define_checkpoint(
                &store,
                &domain,
                &text,
                redefine,
                redefine_validate,
                quiesce,
            )
            .map_err(|e| in_file(&file, e))?;
            // virsh has one message for a checkpoint made from a file, redefined or not.
            println!("Domain checkpoint {name} created from '{file}'");
            Ok(())
        }
        DomainCommand::CheckpointCreateAs {
            dom,
            name,
            description,
            name_named,
            description_named,
            diskspec,
            print_xml,
            quiesce,
        } => {
            let [domain, name, description] = fill(
                [
                    ("domain", dom.domain_named),
                    ("name", name_named),
                    ("description", description_named),
                ],
                [dom.domain, name, description],
            )?;
            let domain = required("checkpoint-create-as", "domain", domain)?;
            let text =
                checkpoint_xml_from_args(name.as_deref(), description.as_deref(), &diskspec)?;
            if print_xml {
                print!("{text}");
                return Ok(());
            }
            let name = jobs::define_checkpoint(&store, &domain, &text, false, false, quiesce)
                .map_err(from_arguments)?;
            println!("Domain checkpoint {name} created");
            Ok(())
        }
        DomainCommand::CheckpointList {
            dom,
            tree,
            roots,
            leaves,
            no_leaves,
            topological,
            parent,
            name,
            from,
            descendants,
            json,
        } => {
            // Refused here rather than by clap, so that the message is virsh's, given before
            // the domain is looked up as virsh does.
            if parent && tree {
                return Err(CliError::Other(
                    "Options --parent and --tree are mutually exclusive".into(),
                ));
            }
            let filter = ListFilter {
                roots_or_descendants: roots,
                topological: topological || tree,
                leaves,
                no_leaves,
            };
            let filter = ListFilter {
                roots_or_descendants: roots || descendants,
                ..filter
            };
            let opts = ListOpts {
                tree,
                parent,
                name_only: name,
                from,
                json,
            };
            checkpoint_list(&store, &dom.get("checkpoint-list")?, filter, opts)
        }
        DomainCommand::CheckpointEdit { cp } => {
            let (domain, checkpoint) = cp.get("checkpoint-edit")?;
            checkpoint_edit(&store, &domain, &checkpoint)
        }
        DomainCommand::CheckpointDumpxml {
            cp,
            no_domain,
            size,
            security_info: _,
            xpath,
            json,
        } => {
            let (domain, checkpoint) = cp.get("checkpoint-dumpxml")?;
            let opts = DumpOpts {
                no_domain,
                size,
                json,
            };
            checkpoint_dumpxml(&store, &domain, &checkpoint, opts, &xpath)
        }
        DomainCommand::CheckpointDelete {
            cp,
            children,
            children_only,
            metadata,
        } => {
            let (domain, checkpoint) = cp.get("checkpoint-delete")?;
            let scope = if children {
                DeleteScope::WithChildren
            } else if children_only {
                DeleteScope::ChildrenOnly
            } else {
                DeleteScope::Single
            };
            checkpoint_delete(&store, &domain, &checkpoint, scope, metadata)
        }
        DomainCommand::CheckpointParent { cp, json } => {
            let (domain, checkpoint) = cp.get("checkpoint-parent")?;
            jobs::read_tree::<_, CliError>(&store, &domain, |tree, _| {
                let parent = tree.parent(&checkpoint).map_err(EngineError::from)?;
                if json {
                    print_json(json!({"parent": parent.name}));
                } else {
                    println!("{}", parent.name);
                }
                Ok(())
            })
        }
        DomainCommand::CheckpointInfo { cp, json } => {
            let (domain, checkpoint) = cp.get("checkpoint-info")?;
            jobs::read_tree::<_, CliError>(&store, &domain, |tree, dom| {
                checkpoint_info(tree, dom, &checkpoint, json)
            })
        }
        DomainCommand::BackupBegin {
            dom,
            backupxml,
            checkpointxml,
            backupxml_named,
            checkpointxml_named,
            reuse_external,
            wait,
        } => {
            let [domain, backupxml, checkpointxml] = fill(
                [
                    ("domain", dom.domain_named),
                    ("backupxml", backupxml_named),
                    ("checkpointxml", checkpointxml_named),
                ],
                [dom.domain, backupxml, checkpointxml],
            )?;
            let domain = required("backup-begin", "domain", domain)?;
            let backup = backupxml
                .as_deref()
                .map(|p| read_file(Path::new(p)))
                .transpose()?;
            let checkpoint = checkpointxml
                .as_deref()
                .map(|p| read_file(Path::new(p)))
                .transpose()?;
            backup_begin(
                &store,
                &domain,
                backup.as_deref(),
                checkpoint.as_deref(),
                reuse_external,
                wait,
            )
            .map_err(|e| {
                // Name the file the error is in, told by the document's root element.
                let file = match &e {
                    CliError::Xml(x) if x.path.starts_with("/domaincheckpoint") => {
                        checkpointxml.as_deref()
                    }
                    CliError::Xml(_) => backupxml.as_deref(),
                    _ => None,
                };
                match file {
                    Some(f) => in_file(f, e),
                    None => e,
                }
            })
        }
        DomainCommand::BackupDumpxml { dom, xpath, json } => {
            let domain = dom.get("backup-dumpxml")?;
            if vbackup_core::catalogue::validate_uuid(&domain).is_ok() {
                crate::managed::dumpxml(&store, &domain, json, &xpath)
            } else {
                backup_dumpxml(&store, &domain, json, &xpath)
            }
        }
        DomainCommand::Domjobinfo {
            dom,
            completed,
            keep_completed,
            rawstats,
            anystats,
            json,
        } => {
            let opts = JobInfoOpts {
                completed,
                keep_completed,
                rawstats,
                anystats,
                json,
            };
            domjobinfo(&store, &dom.get("domjobinfo")?, opts)
        }
        DomainCommand::Domjobabort { dom } => domjobabort(&store, &dom.get("domjobabort")?),
    }
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

fn undefine(
    store: &Store,
    name: &str,
    checkpoints_metadata: bool,
    remove_all_backups: bool,
) -> Result<(), CliError> {
    let loaded = session::load(store, name)?;
    if loaded.journal.is_some() {
        return Err(CliError::Other(
            "Requested operation is not valid: a backup job is running".into(),
        ));
    }
    let backups = crate::managed::backup_count(&loaded.store)?;
    if backups > 0 && !remove_all_backups {
        return Err(CliError::Other(format!(
            "Requested operation is not valid: domain '{name}' has {backups} managed backup(s); use --remove-all-backups"
        )));
    }
    if !loaded.tree.is_empty() && !checkpoints_metadata {
        return Err(CliError::Other(format!(
            "Requested operation is not valid: cannot delete inactive domain with {} checkpoints",
            loaded.tree.len()
        )));
    }
    if loaded.attachment == Attachment::Managed {
        let run_dir = loaded.store.run_dir();
        let _ = std::fs::remove_file(run_dir.join(session::KEEP_FILE));
        session::stop_daemon(&run_dir)?;
    }
    if backups > 0 {
        crate::managed::remove_all_backups(&loaded.store)?;
    }
    loaded.store.remove_all()?;
    println!("Domain '{name}' has been undefined");
    Ok(())
}

fn start(store: &Store, name: &str) -> Result<(), CliError> {
    let nbd_socket = domains::start(store, name)?;
    println!("Domain '{name}' started");
    println!(
        "Guest exports: nbd+unix:///guest-<disk>?socket={}",
        nbd_socket.display()
    );
    Ok(())
}

fn shutdown(store: &Store, name: &str) -> Result<(), CliError> {
    domains::shutdown(store, name)?;
    println!("Domain '{name}' is being shutdown");
    Ok(())
}

fn list(store: &Store, json: bool) -> Result<(), CliError> {
    let rows = domains::list(store)?;
    if json {
        let v: Vec<Value> = rows
            .iter()
            .map(|d| {
                json!({"name": d.name, "state": d.state, "qmp": d.qmp, "job": if d.job {"backup"} else {"none"}, "disks": d.disks})
            })
            .collect();
        print_json(Value::Array(v));
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
            let src = d
                .top()
                .and_then(|l| l.path.clone())
                .unwrap_or_else(|| "-".into());
            (d.target.clone(), src)
        })
        .collect();
    if json {
        let v: Vec<Value> = disks
            .iter()
            .map(|(t, s)| json!({"target": t, "source": s}))
            .collect();
        print_json(Value::Array(v));
    } else {
        let rows: Vec<Vec<String>> = disks.into_iter().map(|(t, s)| vec![t, s]).collect();
        print!("{}", table(&["Target", "Source"], &rows));
    }
    Ok(())
}

// ----- checkpoints -----

/// virsh's `checkpoint-edit`: the checkpoint's XML in an editor, then, if it changed and is
/// valid, a redefinition with it. An invalid edit changes nothing and is kept in a file the
/// error names, so the work is not lost.
fn checkpoint_edit(store: &Store, domain: &str, checkpoint: &str) -> Result<(), CliError> {
    let original = jobs::read_tree::<_, CliError>(store, domain, |tree, _| {
        Ok(tree.lookup(checkpoint).map_err(EngineError::from)?.clone())
    })?;
    let xml = original.to_def().format(CheckpointFormat {
        no_domain: false,
        include_size: false,
    });
    let mut file = tempfile::Builder::new()
        .prefix(&format!("vbackup-{checkpoint}-"))
        .suffix(".xml")
        .tempfile()
        .map_err(CliError::io("cannot create a temporary file to edit"))?;
    std::io::Write::write_all(&mut file, xml.as_bytes())
        .map_err(CliError::io("cannot write the temporary file to edit"))?;
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| "vi".to_owned());
    // The editor variable may hold arguments (`code --wait`), so a shell splits it as virsh's
    // editor launcher does; the file goes as a separate argument, never through the shell.
    let status = Process::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .map_err(CliError::io(format!("cannot run editor '{editor}'")))?;
    if !status.success() {
        return Err(CliError::Other(format!(
            "operation failed: editor '{editor}' exited with {status}; checkpoint {checkpoint} not changed"
        )));
    }
    let edited = read_file(file.path())?;
    if edited == xml {
        println!("Checkpoint {checkpoint} XML configuration not changed.");
        return Ok(());
    }
    let checked = CheckpointDef::parse(&edited, CheckpointMode::Redefine)
        .map_err(CliError::from)
        .and_then(|def| {
            if def.name.as_deref() == Some(checkpoint) {
                Ok(())
            } else {
                Err(CliError::Other(format!(
                    "invalid argument: cannot rename checkpoint {checkpoint} to {}",
                    def.name.as_deref().unwrap_or("(none)")
                )))
            }
        })
        .and_then(|()| {
            Ok(jobs::define_checkpoint(
                store, domain, &edited, true, false, false,
            )?)
        });
    if let Err(e) = checked {
        let kept = file
            .keep()
            .map(|(_, path)| path.display().to_string())
            .unwrap_or_default();
        return Err(CliError::Other(format!(
            "{e}\ncheckpoint {checkpoint} not changed; the edited XML is kept in '{kept}'"
        )));
    }
    println!("Domain checkpoint {checkpoint} edited.");
    Ok(())
}

struct ListOpts {
    tree: bool,
    parent: bool,
    name_only: bool,
    /// Only this checkpoint's children or descendants.
    from: Option<String>,
    json: bool,
}

fn checkpoint_list(
    store: &Store,
    name: &str,
    filter: ListFilter,
    opts: ListOpts,
) -> Result<(), CliError> {
    jobs::read_tree::<_, CliError>(store, name, |tree, _| {
        let list = match &opts.from {
            Some(from) => tree
                .list_children(from, filter)
                .map_err(EngineError::from)?,
            None => tree.list(filter),
        };
        if opts.json {
            let v: Vec<Value> = list
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "parent": c.parent,
                        "creation_time": c.creation_time_s,
                        "description": c.description,
                        "current": tree.current() == Some(c.name.as_str()),
                        "disks": c.disks.iter().map(|d| json!({"target": d.target, "bitmap": d.bitmap})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            print_json(Value::Array(v));
        } else if opts.tree {
            let included: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
            let mut out = String::new();
            for root in list
                .iter()
                .filter(|c| c.parent.as_deref().is_none_or(|p| !included.contains(&p)))
            {
                out.push_str(&format!("{}\n", root.name));
                print_tree(tree, &included, &root.name, "  ", &mut out);
            }
            print!("{out}");
        } else if opts.name_only {
            for c in &list {
                println!("{}", c.name);
            }
        } else {
            let mut headers = vec!["Name", "Creation Time"];
            if opts.parent {
                headers.push("Parent");
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|c| {
                    let mut r = vec![c.name.clone(), format_time(c.creation_time_s)];
                    if opts.parent {
                        r.push(c.parent.clone().unwrap_or_default());
                    }
                    r
                })
                .collect();
            print!("{}", table(&headers, &rows));
        }
        Ok(())
    })
}

/// virsh's tree layout: each child under a `|` line, introduced by `+- `.
fn print_tree(
    tree: &CheckpointTree,
    included: &[&str],
    name: &str,
    prefix: &str,
    out: &mut String,
) {
    let children: Vec<&str> = tree
        .children(name)
        .filter(|c| included.contains(c))
        .collect();
    for (i, c) in children.iter().enumerate() {
        out.push_str(&format!("{prefix}|\n{prefix}+- {c}\n"));
        let next = if i + 1 == children.len() {
            format!("{prefix}    ")
        } else {
            format!("{prefix}|   ")
        };
        print_tree(tree, included, c, &next, out);
    }
}

struct DumpOpts {
    no_domain: bool,
    size: bool,
    json: bool,
}

fn checkpoint_dumpxml(
    store: &Store,
    name: &str,
    checkpoint: &str,
    opts: DumpOpts,
    xpath: &XpathArgs,
) -> Result<(), CliError> {
    let DumpOpts {
        no_domain,
        size,
        json,
    } = opts;
    let c = jobs::checkpoint(store, name, checkpoint, size)?;
    let xml = c.to_def().format(CheckpointFormat {
        no_domain,
        include_size: size,
    });
    if json {
        print_json(json!({
            "name": c.name,
            "parent": c.parent,
            "description": c.description,
            "creation_time": c.creation_time_s,
            "disks": c.disks.iter().map(|d| json!({"target": d.target, "bitmap": d.bitmap, "size": d.size_bytes})).collect::<Vec<_>>(),
            "xml": xml,
        }));
        Ok(())
    } else {
        xpath.print(&xml)
    }
}

fn checkpoint_delete(
    store: &Store,
    name: &str,
    checkpoint: &str,
    scope: DeleteScope,
    metadata_only: bool,
) -> Result<(), CliError> {
    jobs::delete_checkpoint(store, name, checkpoint, scope, metadata_only)?;
    match scope {
        DeleteScope::ChildrenOnly => println!("Domain checkpoint {checkpoint} children deleted"),
        _ => println!("Domain checkpoint {checkpoint} deleted"),
    }
    Ok(())
}

fn checkpoint_info(
    tree: &CheckpointTree,
    domain: &str,
    name: &str,
    json: bool,
) -> Result<(), CliError> {
    let c = tree.lookup(name).map_err(EngineError::from)?;
    let children = tree.children(name).count();
    let descendants = tree
        .list_children(
            name,
            ListFilter {
                roots_or_descendants: true,
                ..ListFilter::default()
            },
        )
        .map_err(EngineError::from)?
        .len();
    let current = tree.current() == Some(name);
    if json {
        print_json(
            json!({"name": c.name, "domain": domain, "parent": c.parent, "children": children,
                   "descendants": descendants, "current": current}),
        );
    } else {
        println!("{:<15} {}", "Name:", c.name);
        println!("{:<15} {domain}", "Domain:");
        println!("{:<15} {}", "Parent:", c.parent.as_deref().unwrap_or("-"));
        println!("{:<15} {children}", "Children:");
        println!("{:<15} {descendants}", "Descendants:");
        println!("{:<15} {}", "Current:", if current { "yes" } else { "no" });
    }
    Ok(())
}

// ----- backups and jobs -----

fn backup_begin(
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
                .map(|plan| {
                    plan.disks
                        .iter()
                        .map(|d| format!("{} to {}", d.target, d.store_path))
                        .collect()
                })
                .unwrap_or_default();
            println!("Backup started; writing {}", targets.join(", "));
        }
        None => println!("Backup started"),
    }
    if !wait {
        return Ok(s.close()?);
    }
    let stats = follow(&mut s, false)?;
    s.close()?;
    match stats {
        Some(st) if st.success == Some(true) => {
            println!("Backup complete");
            Ok(())
        }
        Some(st) => Err(CliError::Other(format!(
            "operation failed: backup job {}: {}",
            serde_json::to_value(st.status)
                .unwrap_or(Value::Null)
                .as_str()
                .unwrap_or("ended"),
            st.errmsg.unwrap_or_default()
        ))),
        None => Err(CliError::Other(
            "backup job ended without statistics".into(),
        )),
    }
}

/// Drives the session until the backup job ends, showing progress on a terminal unless `quiet`
/// (machine-readable output was asked for); returns the job's final statistics.
pub fn follow(s: &mut Session, quiet: bool) -> Result<Option<JobStats>, CliError> {
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let poll_ms = if bar.is_some() { 200 } else { 1000 };
    let stats = jobs::follow(s, poll_ms, |st| {
        if let Some(b) = &bar {
            b.set_length(st.disk_total_bytes.unwrap_or(0));
            b.set_position(st.disk_processed_bytes.unwrap_or(0));
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(stats)
}

/// Defines a domain; returns what to tell the user.
pub(crate) fn define(
    store: &Store,
    file_or_name: &str,
    disks: &[String],
    qmp: Option<PathBuf>,
) -> Result<String, CliError> {
    let defined = domains::define(store, file_or_name, disks, qmp)?;
    Ok(match defined.from {
        Some(f) => format!("Domain '{}' defined from {f}", defined.name),
        None => format!("Domain '{}' defined", defined.name),
    })
}

fn backup_dumpxml(
    store: &Store,
    name: &str,
    json: bool,
    xpath: &XpathArgs,
) -> Result<(), CliError> {
    let plan = jobs::backup_plan(store, name)?;
    if json {
        print_json(serde_json::to_value(&*plan).unwrap_or(Value::Null));
        Ok(())
    } else {
        xpath.print(&plan.to_def().format())
    }
}

/// How `domjobinfo` was asked.
#[derive(Debug, Clone, Copy)]
struct JobInfoOpts {
    completed: bool,
    keep_completed: bool,
    rawstats: bool,
    anystats: bool,
    json: bool,
}

/// libvirt's `virDomainJobType` number and virsh's word for a job status.
fn job_type(status: &str) -> (u8, &'static str) {
    match status {
        "running" => (2, "Unbounded"),
        "completed" => (3, "Completed"),
        "failed" => (4, "Failed"),
        "cancelled" => (5, "Cancelled"),
        _ => (0, "None"),
    }
}

/// The statistics as libvirt's typed parameters, in the order libvirt fills them.
fn raw_params(st: &Value) -> Vec<(&'static str, String)> {
    let mut params = vec![("operation", "9".to_owned())];
    for (name, key) in [
        ("time_elapsed", "time_elapsed_ms"),
        ("disk_total", "disk_total_bytes"),
        ("disk_processed", "disk_processed_bytes"),
        ("disk_remaining", "disk_remaining_bytes"),
        ("disk_temp_used", "disk_temp_used_bytes"),
        ("disk_temp_total", "disk_temp_total_bytes"),
    ] {
        if let Some(v) = st[key].as_u64() {
            params.push((name, v.to_string()));
        }
    }
    if let Some(ok) = st["success"].as_bool() {
        params.push(("success", if ok { "yes" } else { "no" }.to_owned()));
    }
    if let Some(msg) = st["errmsg"].as_str() {
        params.push(("errmsg", msg.to_owned()));
    }
    params
}

/// Prints job statistics as virsh 11.3 does (labels, column widths and `%.3lf` units).
fn print_stats(stats: Option<&Value>, opts: JobInfoOpts, pending: Option<&str>) {
    if opts.json {
        let mut v = stats.cloned().unwrap_or_else(|| json!({"status": "none"}));
        v["pendingBackup"] = json!(pending);
        print_json(v);
        return;
    }
    let status = stats.and_then(|st| st["status"].as_str()).unwrap_or("none");
    let (number, word) = job_type(status);
    if opts.rawstats {
        println!("Job type: {number}\n");
        if let Some(st) = stats {
            for (name, value) in raw_params(st) {
                println!("{name}: {value}");
            }
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

/// Bytes as virsh prints job sizes: three decimals and a binary unit (`256.000 MiB`).
pub(crate) fn virsh_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.3} {}", UNITS[unit])
}

fn domjobinfo(store: &Store, name: &str, opts: JobInfoOpts) -> Result<(), CliError> {
    let dir = store.root().join("domains").join(name);
    let running = domjobinfo_stats(store, name, opts)?;
    // A managed backup that waits for `backup-finish` is otherwise invisible: say so, after
    // (never inside) libvirt's lines.
    if !opts.json
        && !opts.rawstats
        && let Some(note) = crate::managed::pending_note(&dir, name, running)
    {
        println!("{note}");
    }
    Ok(())
}

/// Prints the statistics `domjobinfo` asks for; returns whether a job runs.
fn domjobinfo_stats(store: &Store, name: &str, opts: JobInfoOpts) -> Result<bool, CliError> {
    let dir = store.root().join("domains").join(name);
    let pending = crate::managed::pending_uuid(&dir);
    let info = jobs::job_info(store, name, opts.completed, opts.keep_completed)?;
    print_stats(info.stats.as_ref(), opts, pending.as_deref());
    Ok(info.running)
}

fn domjobabort(store: &Store, name: &str) -> Result<(), CliError> {
    if let Some(damaged) = jobs::abort(store, name)? {
        report_damaged_journal(&damaged);
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
