//! A backup job on this host: the checkpoint and backup documents a command builds, the checks
//! made before one starts, following it to its end (with the write-out of push targets), and
//! the statistics files other invocations read meanwhile and afterwards.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vbackup_core::backup::{
    BackupMode, BackupPlan, BackupSpec, DiskJobState, DomainJobStatus, JobStats, NbdServer,
};
use vbackup_core::checkpoint::{Checkpoint, CheckpointTree, DeleteScope};
use vbackup_core::domain::{DomainEvent, Reply, Request};
use vbackup_core::error::{Error as EngineError, RequestError};
use vbackup_core::xml::{
    BackupDef, CheckpointDef, CheckpointDiskDef, CheckpointFormat, CheckpointKind, CheckpointMode,
    Origin, align_backup, align_checkpoint, align_redefined_checkpoint,
};
use vbackup_qemu::store::{Store, write_atomic};

use crate::domains::{esc, now_s, read_file};
use crate::effects::{COMPLETED_FILE, PROGRESS_FILE};
use crate::error::Error;
use crate::layout::{JOURNAL_FILE, KEEP_FILE};
use crate::session::{self, Attachment, Loaded, ReadAccess, Session, Shared};

/// How often push targets are handed to the host's write-out while a job is followed.
const WRITE_BEHIND_MS: u64 = 200;

/// Drives the session until the backup job ends, polling the job's statistics every `poll_ms`
/// (each poll is written to [`PROGRESS_FILE`] for `domjobinfo` run meanwhile by others, who
/// cannot reach the daemon's monitor while this invocation holds it, and handed to `progress`);
/// returns the job's final statistics.
pub fn follow(
    s: &mut Session,
    poll_ms: u64,
    mut progress: impl FnMut(&JobStats),
) -> Result<Option<JobStats>, Error> {
    use vbackup_core::link::Link;
    let mut last_poll = None;
    // Push targets are written out while the job copies, so the final sync waits for little.
    let mut write_behind = vbackup_qemu::writeout::WriteBehind::new();
    let mut last_kick: Option<vbackup_core::link::Timestamp> = None;
    while s.job_running() {
        let now = s.driver.link().now();
        if last_kick.is_none_or(|t| now.ms_since(t) >= WRITE_BEHIND_MS) {
            last_kick = Some(now);
            if let Some(plan) = s.driver.domain().view().backup
                && plan.mode == BackupMode::Push
            {
                write_behind.kick(
                    plan.disks
                        .iter()
                        .filter(|d| d.state == DiskJobState::Running)
                        .map(|d| d.store_path.as_str()),
                );
            }
        }
        let due =
            last_poll.is_none_or(|t: vbackup_core::link::Timestamp| now.ms_since(t) >= poll_ms);
        if due {
            last_poll = Some(now);
            if let Reply::Stats(Some(st)) = s.call(Request::JobStats {
                completed: false,
                keep_completed: true,
            })? {
                progress(&st);
                write_progress(s, &st);
            }
            continue;
        }
        let until = s.driver.link().now().plus_ms(200);
        s.driver.step(Some(until))?;
    }
    Ok(last_completed(s))
}

/// An XML error of the document [`checkpoint_xml_from_args`] built from `checkpoint-create-as`'s
/// arguments, told in terms of the arguments: the user never saw that document.
pub fn from_arguments(e: impl Into<Error>) -> Error {
    match e.into() {
        Error::Xml(x) => {
            let argument = if x.path.contains("/disk") {
                "--diskspec"
            } else if x.path.contains("/name") {
                "NAME (--name)"
            } else if x.path.contains("/description") {
                "DESCRIPTION (--description)"
            } else {
                "the arguments"
            };
            Error::Other(format!("invalid argument: {argument}: {}", x.message))
        }
        other => other,
    }
}

pub fn checkpoint_xml_from_args(
    name: Option<&str>,
    description: Option<&str>,
    diskspecs: &[String],
) -> Result<String, Error> {
    let mut xml = String::from("<domaincheckpoint>\n");
    if let Some(n) = name {
        xml.push_str(&format!("  <name>{}</name>\n", esc(n)));
    }
    if let Some(d) = description {
        xml.push_str(&format!("  <description>{}</description>\n", esc(d)));
    }
    if !diskspecs.is_empty() {
        xml.push_str("  <disks>\n");
        for spec in diskspecs {
            let mut parts = spec.split(',');
            let target = parts.next().unwrap_or_default();
            let mut attrs = format!(" name='{}'", esc(target));
            for p in parts {
                match p.split_once('=') {
                    Some((k @ ("checkpoint" | "bitmap"), v)) => {
                        attrs.push_str(&format!(" {k}='{}'", esc(v)));
                    }
                    _ => {
                        return Err(Error::Other(format!(
                            "--diskspec '{spec}': unknown option '{p}'"
                        )));
                    }
                }
            }
            xml.push_str(&format!("    <disk{attrs}/>\n"));
        }
        xml.push_str("  </disks>\n");
    }
    xml.push_str("</domaincheckpoint>\n");
    Ok(xml)
}

/// A new checkpoint's engine form: parsed, defaults filled, aligned, domain embedded.
pub fn new_checkpoint(text: &str, loaded: &Loaded) -> Result<Checkpoint, Error> {
    let mut def = CheckpointDef::parse(text, CheckpointMode::Create)?;
    def.fill_create_defaults(now_s());
    let mut aligned = align_checkpoint(&def, &loaded.def)?;
    aligned.domain_xml = Some(loaded.xml.trim_end().to_owned());
    Ok(Checkpoint::from_def(&aligned).map_err(EngineError::from)?)
}

/// A new checkpoint's XML read, with the defaults of a creation filled in (its name, when it
/// gives none, is the creation time).
pub fn parse_new_checkpoint(text: &str) -> Result<CheckpointDef, Error> {
    let mut def = CheckpointDef::parse(text, CheckpointMode::Create)?;
    def.fill_create_defaults(now_s());
    Ok(def)
}

/// The checkpoint created with a backup: as [`new_checkpoint`], except
/// that a checkpoint naming no disk tracks exactly the disks the (aligned) `backup` copies.
/// A disk the backup leaves out (`backup='no'`, such as a raw disk, which cannot hold a
/// bitmap) then gets `checkpoint='no'` rather than a bitmap it may not be able to hold.
/// `def` is the checkpoint as [`parse_new_checkpoint`] read it.
pub fn checkpoint_for_backup(
    mut def: CheckpointDef,
    loaded: &Loaded,
    backup: &BackupDef,
) -> Result<Checkpoint, Error> {
    if def.disks.is_empty() {
        let copied = |target: &str| {
            backup
                .disks
                .iter()
                .any(|d| d.name == target && d.backup.is_some())
        };
        def.disks = loaded
            .def
            .disks
            .iter()
            .filter(|d| !d.is_empty() && !d.readonly)
            .map(|d| CheckpointDiskDef {
                name: d.target.clone(),
                checkpoint: if copied(&d.target) {
                    CheckpointKind::Bitmap
                } else {
                    CheckpointKind::No
                },
                bitmap: None,
                size_bytes: None,
                origin: Origin::default(),
            })
            .collect();
    }
    let mut aligned = align_checkpoint(&def, &loaded.def)?;
    aligned.domain_xml = Some(loaded.xml.trim_end().to_owned());
    Ok(Checkpoint::from_def(&aligned).map_err(EngineError::from)?)
}

/// Refuses, before anything starts, a pull backup asking for TLS on an attached domain while
/// no certificate directory is configured, saying what to configure. (A managed domain's
/// daemon serves without TLS: the core refuses `tls='yes'` there, naming its server.)
pub fn check_pull_server(loaded: &Loaded, spec: &BackupSpec) -> Result<(), Error> {
    let wants_tls = spec.server.as_ref().is_some_and(NbdServer::uses_tls);
    if spec.mode != BackupMode::Pull || !wants_tls || loaded.attachment == Attachment::Managed {
        return Ok(());
    }
    let config = crate::config::HostConfig::load(&session::state_root(&loaded.store))?;
    match config.tls_cert_dir() {
        None => Err(Error::Other(format!(
            "Requested operation is not valid: backup TLS directory not configured; {}",
            crate::config::tls_hint()
        ))),
        Some(dir) => crate::config::check_cert_dir(Path::new(dir)),
    }
}

/// The NBD URI of every export of a running pull backup, in disk order; `None` for a push.
pub fn export_uris(plan: &BackupPlan) -> Option<Vec<String>> {
    let server = plan
        .server
        .as_ref()
        .filter(|_| plan.mode == BackupMode::Pull)?;
    Some(
        plan.disks
            .iter()
            .map(|d| server.export_uri(d.export_name.as_deref().unwrap_or(&d.target)))
            .collect(),
    )
}

/// The statistics of the last job the session saw complete, if any.
pub fn last_completed(s: &Session) -> Option<JobStats> {
    s.driver
        .effects()
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            DomainEvent::JobCompleted(st) => Some(st.clone()),
            _ => None,
        })
}

/// Writes the running job's statistics to [`PROGRESS_FILE`], tagged with the job's start so a
/// reader never takes an earlier job's progress for this one's. Best effort.
pub fn write_progress(s: &Session, stats: &JobStats) {
    let Some(started_ms) = s.driver.domain().view().backup.map(|b| b.started_ms) else {
        return;
    };
    let doc = json!({"started_ms": started_ms, "stats": stats});
    let _ = write_atomic(
        s.driver.effects().store().dir(),
        PROGRESS_FILE,
        doc.to_string().as_bytes(),
    );
}

/// The last finished job's statistics for `--completed`, unless they were already shown:
/// libvirt discards them once read unless `--keep-completed`. Reading marks the record
/// (rather than removing it) because `backup-finish` still needs the job's outcome.
pub fn take_completed(dir: &Path, keep: bool) -> Option<Value> {
    let path = dir.join(COMPLETED_FILE);
    let mut stats: Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
    if stats["reported"].as_bool() == Some(true) {
        return None;
    }
    if !keep {
        stats["reported"] = json!(true);
        // Best effort: failing to mark it only shows the statistics once more.
        let _ = write_atomic(dir, COMPLETED_FILE, stats.to_string().as_bytes());
        if let Some(map) = stats.as_object_mut() {
            map.remove("reported");
        }
    }
    Some(stats)
}

/// Milliseconds since the epoch (the clock job start times are kept in).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Creates (or with `redefine`, redefines) a checkpoint of domain `name` from its XML; returns
/// its name.
pub fn define_checkpoint(
    store: &Store,
    name: &str,
    text: &str,
    redefine: bool,
    validate: bool,
    quiesce: bool,
) -> Result<String, Error> {
    let loaded = session::load(store, name)?;
    let request = if redefine {
        let def = CheckpointDef::parse(text, CheckpointMode::Redefine)?;
        let aligned = align_redefined_checkpoint(&def, &loaded.def)?;
        let checkpoint = Checkpoint::from_def(&aligned).map_err(EngineError::from)?;
        Request::CheckpointRedefine {
            checkpoint,
            validate,
        }
    } else {
        Request::CheckpointCreate {
            checkpoint: new_checkpoint(text, &loaded)?,
            quiesce,
        }
    };
    let cp_name = match &request {
        Request::CheckpointRedefine { checkpoint, .. }
        | Request::CheckpointCreate { checkpoint, .. } => checkpoint.name.clone(),
        _ => String::new(),
    };
    let mut s = Session::connect(loaded)?;
    let r = s.call(request);
    s.close()?;
    r?;
    Ok(cp_name)
}

/// Runs `f` on the checkpoint tree of domain `name`: straight from the store, or after
/// reconciling a journaled job with QEMU.
pub fn read_tree<T, E: From<Error>>(
    store: &Store,
    name: &str,
    f: impl FnOnce(&CheckpointTree, &str) -> Result<T, E>,
) -> Result<T, E> {
    let loaded = match session::load_for_reading(store, name)? {
        ReadAccess::Locked(loaded) => *loaded,
        // Another vbackup holds the domain (and reconciles its job): the store is current.
        ReadAccess::Shared(shared) => return f(&shared.tree, name),
    };
    if loaded.journal.is_none() {
        return f(&loaded.tree, name);
    }
    let s = Session::connect(loaded)?;
    let r = f(s.driver.domain().view().checkpoints, name);
    s.close()?;
    r
}

/// Refuses, before anything starts, a backup whose target or scratch image exists already,
/// with libvirt's message (the engine's exclusive create would refuse it too, but later and
/// as a store failure).
pub fn check_stores_absent(spec: &BackupSpec) -> Result<(), Error> {
    for disk in spec.disks.iter().filter(|d| d.backup) {
        if let Some(path) = disk.store.as_ref().and_then(|s| s.path.as_deref())
            && std::fs::symlink_metadata(path).is_ok()
        {
            return Err(Error::Other(format!(
                "invalid argument: store '{}' for backup of '{}' exists (remove it, or pass --reuse-external to write into it)",
                path, disk.target
            )));
        }
    }
    Ok(())
}

/// Starts a backup of domain `name` from its backup XML (`None`: push every disk beside its
/// image) and optionally a checkpoint XML; returns the session with the job running.
pub fn begin(
    store: &Store,
    name: &str,
    backup: Option<&str>,
    checkpoint: Option<&str>,
    reuse_external: bool,
) -> Result<Session, Error> {
    let loaded = session::load(store, name)?;
    let checkpoint = checkpoint.map(parse_new_checkpoint).transpose()?;
    if let Some(def) = &checkpoint {
        // Its errors come before the backup document's, as they always did.
        align_checkpoint(def, &loaded.def)?;
    }
    let def = BackupDef::parse(backup.unwrap_or("<domainbackup/>"))?;
    // The checkpoint's name names the backup's scratch and target files.
    let suffix = checkpoint
        .as_ref()
        .and_then(|c| c.name.clone())
        .unwrap_or_else(|| now_s().to_string());
    let aligned = align_backup(&def, &loaded.def, &suffix)?;
    let checkpoint = checkpoint
        .map(|def| checkpoint_for_backup(def, &loaded, &aligned))
        .transpose()?;
    let spec = BackupSpec::from_def(&aligned).map_err(EngineError::from)?;
    check_pull_server(&loaded, &spec)?;
    if !reuse_external {
        check_stores_absent(&spec)?;
    }
    let mut s = Session::connect(loaded)?;
    let r = s.call(Request::BackupBegin {
        spec,
        checkpoint,
        reuse_external,
    });
    if let Err(e) = r {
        s.close()?;
        return Err(e);
    }
    Ok(s)
}

/// An XML error of a document the user gave as file `file`, named after the file (other
/// errors are not about the file and pass unchanged).
pub fn in_file(file: &str, e: impl Into<Error>) -> Error {
    match e.into() {
        Error::Xml(x) => Error::Other(format!("XML error: {file}:{x}")),
        other => other,
    }
}

/// [`define_checkpoint`] from the `<domaincheckpoint>` file `file`, whose XML errors are named
/// after it.
pub fn define_checkpoint_file(
    store: &Store,
    name: &str,
    file: &str,
    redefine: bool,
    validate: bool,
    quiesce: bool,
) -> Result<String, Error> {
    let text = read_file(Path::new(file))?;
    define_checkpoint(store, name, &text, redefine, validate, quiesce).map_err(|e| in_file(file, e))
}

/// [`begin`] from the `<domainbackup>` and `<domaincheckpoint>` files given, whose XML errors
/// are named after the file they are in (told by the document's root element).
pub fn begin_files(
    store: &Store,
    name: &str,
    backup_file: Option<&str>,
    checkpoint_file: Option<&str>,
    reuse_external: bool,
) -> Result<Session, Error> {
    let read = |p: Option<&str>| p.map(|p| read_file(Path::new(p))).transpose();
    let (backup, checkpoint) = (read(backup_file)?, read(checkpoint_file)?);
    let begun = begin(
        store,
        name,
        backup.as_deref(),
        checkpoint.as_deref(),
        reuse_external,
    );
    begun.map_err(|e| {
        let file = match &e {
            Error::Xml(x) if x.path.starts_with("/domaincheckpoint") => checkpoint_file,
            Error::Xml(_) => backup_file,
            _ => None,
        };
        match file {
            Some(f) => in_file(f, e),
            None => e,
        }
    })
}

/// How a job [`follow`] saw end ended: `Ok` when it completed, else why not.
pub fn outcome(stats: Option<JobStats>) -> Result<(), Error> {
    match stats {
        Some(st) if st.success == Some(true) => Ok(()),
        Some(st) => {
            let status = serde_json::to_value(st.status).unwrap_or(Value::Null);
            let status = status.as_str().unwrap_or("ended");
            let errmsg = st.errmsg.unwrap_or_default();
            let message = format!("operation failed: backup job {status}: {errmsg}");
            Err(Error::Other(message))
        }
        None => Err(Error::Other("backup job ended without statistics".into())),
    }
}

/// Aborts the backup job of domain `name` and waits for its cleanup, so the daemon can be
/// stopped with a clean state.
/// A journal that cannot be read does not block it: see [`end_damaged_job`], whose report is
/// returned.
pub fn abort(store: &Store, name: &str) -> Result<Option<DamagedJournal>, Error> {
    if let Some(damaged) = end_damaged_job(store, name)? {
        return Ok(Some(damaged));
    }
    let loaded = session::load(store, name)?;
    if loaded.journal.is_none() {
        return Err(EngineError::from(RequestError::NoJob).into());
    }
    let mut s = Session::connect(loaded)?;
    if !s.job_running() {
        s.close()?;
        return Err(EngineError::from(RequestError::NoJob).into());
    }
    if let Err(e) = s.call(Request::AbortJob) {
        s.close()?;
        return Err(e);
    }
    s.wait_job_end(Duration::from_secs(60))?;
    s.close()?;
    Ok(None)
}

/// What `domjobinfo` reports: the statistics asked for (the running job's, or with
/// `completed` the last finished job's) and whether a job runs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// The statistics, as the core's `JobStats` serialise.
    pub stats: Option<Value>,
    /// Whether a backup job runs.
    pub running: bool,
}

/// The statistics of domain `name`'s job. A journaled job is reconciled with QEMU first (it
/// may have ended while nobody watched); while another vbackup holds the domain, the last
/// finished job's statistics, or the running job's as its holder last wrote them
/// ([`PROGRESS_FILE`]), else what the journal alone says (the status and the time elapsed).
/// Reading completed statistics marks them read unless `keep_completed`.
pub fn job_info(
    store: &Store,
    name: &str,
    completed: bool,
    keep_completed: bool,
) -> Result<JobInfo, Error> {
    let dir = store.root().join("domains").join(name);
    let loaded = match session::load_for_reading(store, name)? {
        ReadAccess::Locked(loaded) => *loaded,
        ReadAccess::Shared(shared) => {
            return Ok(shared_job_info(&shared, &dir, completed, keep_completed));
        }
    };
    let dir = loaded.store.dir().to_path_buf();
    if loaded.journal.is_none() {
        let stats = completed
            .then(|| take_completed(&dir, keep_completed))
            .flatten();
        return Ok(JobInfo {
            stats,
            running: false,
        });
    }
    let mut s = Session::connect(loaded)?;
    let running = s.job_running();
    let r = if running && !completed {
        s.call(Request::JobStats {
            completed: false,
            keep_completed: true,
        })
        .map(Some)
    } else {
        Ok(None)
    };
    s.close()?;
    let stats = match r? {
        Some(Reply::Stats(st)) => st.and_then(|st| serde_json::to_value(st).ok()),
        _ if completed && !running => take_completed(&dir, keep_completed),
        _ => None,
    };
    Ok(JobInfo { stats, running })
}

fn shared_job_info(shared: &Shared, dir: &Path, completed: bool, keep_completed: bool) -> JobInfo {
    let running = shared.journal.is_some();
    if completed {
        // A job runs: libvirt has no completed statistics while a new job runs.
        let stats = (!running)
            .then(|| take_completed(dir, keep_completed))
            .flatten();
        return JobInfo { stats, running };
    }
    let Some(plan) = &shared.journal else {
        return JobInfo {
            stats: None,
            running,
        };
    };
    let progress = shared
        .snapshot
        .file(PROGRESS_FILE)
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .filter(|p| p["started_ms"].as_u64() == Some(plan.started_ms));
    let mut stats = match progress {
        Some(p) => p["stats"].clone(),
        None => serde_json::to_value(plan.stats(now_ms(), DomainJobStatus::Running))
            .unwrap_or(Value::Null),
    };
    stats["time_elapsed_ms"] = json!(now_ms().saturating_sub(plan.started_ms));
    JobInfo {
        stats: Some(stats),
        running,
    }
}

/// A job journal that could not be read back, which [`end_damaged_job`] ended the job of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedJournal {
    /// The journal file (removed).
    pub path: PathBuf,
    /// Why it could not be read.
    pub reason: String,
}

/// How long ending the jobs of an unreadable journal may take.
const END_UNKNOWN_JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// Ends the job of domain `name` when its journal cannot be read (a torn write, a damaged
/// disk): the job's state is then unknown, so what QEMU shows is ended. A managed domain's
/// daemon is stopped (`quit` ends its jobs, exports and scratch nodes and writes the
/// persistent bitmaps) and started again when it was kept running; on an attached QEMU
/// every backup job is cancelled and dismissed. The journal is removed last. `None` when the
/// journal is readable or absent (the core ends such a job as usual). Files the job wrote (a
/// push target, a pull's scratch image) are not known without the journal and are left.
pub fn end_damaged_job(store: &Store, name: &str) -> Result<Option<DamagedJournal>, Error> {
    let ds = session::lock(store, name)?;
    if ds.read_domain_xml()?.is_none() {
        let _ = std::fs::remove_dir(ds.dir());
        return Err(Error::NoDomain(name.to_owned()));
    }
    let Some(text) = ds.read_journal()? else {
        return Ok(None);
    };
    let Err(reason) = serde_json::from_str::<BackupPlan>(&text) else {
        return Ok(None);
    };
    let damaged = DamagedJournal {
        path: ds.dir().join(JOURNAL_FILE),
        reason: reason.to_string(),
    };
    let run_dir = ds.run_dir();
    let kept = match Attachment::of_domain(ds.dir()) {
        Attachment::Managed => {
            session::stop_daemon(&run_dir)?;
            run_dir.join(KEEP_FILE).is_file()
        }
        Attachment::Attached(socket) => {
            cancel_backup_jobs(&socket)?;
            false
        }
    };
    ds.remove_journal()?;
    let _ = std::fs::remove_file(ds.dir().join(PROGRESS_FILE));
    drop(ds);
    if kept {
        // The domain was running before: it runs again, without the job.
        session::Session::connect(session::load(store, name)?)?.close()?;
    }
    Ok(Some(damaged))
}

/// Cancels every backup job of the QEMU at `socket` and dismisses it once concluded.
fn cancel_backup_jobs(socket: &Path) -> Result<(), Error> {
    use vbackup_qemu::qmp_socket::QmpSocket;
    let deadline = Instant::now() + END_UNKNOWN_JOB_TIMEOUT;
    let mut qmp = QmpSocket::connect(socket, deadline)?;
    let backups = |qmp: &mut QmpSocket| -> Result<Vec<(String, String)>, Error> {
        let jobs = qmp.execute("query-jobs", None, deadline)?;
        Ok(jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["type"] == "backup")
            .filter_map(|j| {
                Some((
                    j["id"].as_str()?.to_owned(),
                    j["status"].as_str()?.to_owned(),
                ))
            })
            .collect())
    };
    for (id, status) in backups(&mut qmp)? {
        if status != "concluded" && status != "null" {
            qmp.execute("job-cancel", Some(json!({"id": id})), deadline)?;
        }
    }
    loop {
        let jobs = backups(&mut qmp)?;
        if jobs.is_empty() {
            return Ok(());
        }
        for (id, status) in &jobs {
            if status == "concluded" {
                qmp.execute("job-dismiss", Some(json!({"id": id})), deadline)?;
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Other(format!(
                "operation failed: backup jobs {:?} of the QEMU at '{}' did not end within {} s",
                jobs.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                socket.display(),
                END_UNKNOWN_JOB_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checkpoint `checkpoint` of domain `name` (see [`checkpoint`]) and its XML document, without
/// the embedded domain with `no_domain`.
pub fn checkpoint_document(
    store: &Store,
    name: &str,
    checkpoint: &str,
    no_domain: bool,
    size: bool,
) -> Result<(Checkpoint, String), Error> {
    let c = self::checkpoint(store, name, checkpoint, size)?;
    let format = CheckpointFormat {
        no_domain,
        include_size: size,
    };
    let xml = c.to_def().format(format);
    Ok((c, xml))
}

/// What `checkpoint-delete` deletes: the checkpoint with its descendants (`children`), only its
/// descendants (`children_only`), or the checkpoint alone.
pub fn delete_scope(children: bool, children_only: bool) -> DeleteScope {
    match (children, children_only) {
        (true, _) => DeleteScope::WithChildren,
        (_, true) => DeleteScope::ChildrenOnly,
        _ => DeleteScope::Single,
    }
}

/// Checkpoint `checkpoint` of domain `name`; with `size`, asked of QEMU with the bytes dirtied
/// since it (its bitmaps' counts), else as stored (a journaled job reconciled first).
pub fn checkpoint(
    store: &Store,
    name: &str,
    checkpoint: &str,
    size: bool,
) -> Result<Checkpoint, Error> {
    if !size {
        return read_tree(store, name, |tree, _| {
            Ok::<_, Error>(tree.lookup(checkpoint).map_err(EngineError::from)?.clone())
        });
    }
    let mut s = Session::connect(session::load(store, name)?)?;
    let r = s.call(Request::CheckpointGetXml {
        name: checkpoint.to_owned(),
        size: true,
    });
    s.close()?;
    match r? {
        Reply::Checkpoint(c) => Ok(*c),
        other => Err(Error::Other(format!("unexpected answer {other:?}"))),
    }
}

/// Deletes checkpoint `checkpoint` of domain `name` (with `scope`'s children; with
/// `metadata_only`, its bitmaps stay in the images).
pub fn delete_checkpoint(
    store: &Store,
    name: &str,
    checkpoint: &str,
    scope: DeleteScope,
    metadata_only: bool,
) -> Result<(), Error> {
    let mut s = Session::connect(session::load(store, name)?)?;
    let r = s.call(Request::CheckpointDelete {
        name: checkpoint.to_owned(),
        scope,
        metadata_only,
    });
    s.close()?;
    r.map(|_| ())
}

/// The running backup job of domain `name`, as its journal says (reconciled with QEMU first
/// when this invocation could lock the domain).
pub fn backup_plan(store: &Store, name: &str) -> Result<Box<BackupPlan>, Error> {
    let no_backup = || Error::from(EngineError::from(RequestError::NoBackup));
    match session::load_for_reading(store, name)? {
        ReadAccess::Shared(shared) => shared.journal.map(Box::new).ok_or_else(no_backup),
        ReadAccess::Locked(loaded) => {
            if loaded.journal.is_none() {
                return Err(no_backup());
            }
            let mut s = Session::connect(*loaded)?;
            let r = s.call(Request::BackupGetXml);
            s.close()?;
            match r? {
                Reply::Backup(plan) => Ok(plan),
                _ => Err(Error::Other("unexpected answer".into())),
            }
        }
    }
}
