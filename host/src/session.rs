//! One invocation's hold on one domain: the store opened and the domain locked, the `Domain`
//! rebuilt from stored checkpoints and the job journal, and (when QEMU is needed) a QMP session
//! whose fresh start the core is told about so it negotiates and reconciles.
//!
//! Contract:
//! - Managed domains (no `qmp` in `vbackup.json`): qemu-storage-daemon runs over the domain's
//!   images in the store's run directory. It is started when QEMU is needed and nothing runs,
//!   kept running (detached) while a backup job runs, and stopped with `quit` when this
//!   invocation ends with no job (QEMU then writes persistent bitmaps to the images).
//! - A managed daemon found dead (its pid file left behind) is started again with a note; a job
//!   journaled against it died with it and is ended as failed, and checkpoints whose bitmaps
//!   it lost are reported as warnings (the core refuses incremental backups from them).
//! - Attached domains talk to the QMP socket given at `define`; vbackup never stops that QEMU.
//!   Their node names are discovered on every connection (`vbackup_qemu::discover`).
//! - The QMP socket is handed to the core un-negotiated: the core sends `qmp_capabilities`
//!   itself after [`Input::Reconnected`](vbackup_core::domain::Input), exactly as after a
//!   reconnect, so one code path serves first connect, restart and reconnect.
//! - A journaled job always brings QEMU up (even for read-only commands) so the core can
//!   reconcile it: a restart of vbackup never loses a job.
//! - Locking: a command that changes a domain locks it ([`load`]) and fails at once naming the
//!   holder, or waits up to `--wait-lock`. A read-only command ([`load_for_reading`]) locks the
//!   domain when it is free (and then reconciles like any other); when another vbackup holds
//!   it, that holder is the one reconciling and keeping the store current, so the reader reads
//!   the store as it is ([`Shared`]), never waits, and neither writes nor talks to QEMU (whose
//!   monitor the holder may be using).

use crate::layout::JOURNAL_FILE;
pub use crate::layout::{DRIFT_REPORTED_FILE, IN_STEP_FILE, KEEP_FILE, META_FILE};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vbackup_core::Domain;
use vbackup_core::backup::{BackupPlan, NbdServer, NbdTransport};
use vbackup_core::checkpoint::{Checkpoint, CheckpointTree};
use vbackup_core::domain::{BitmapDrift, DomainConfig, DomainEvent, Reply, Request};
use vbackup_core::driver::Driver;
use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::model::{DiskDef, DomainDef};
use vbackup_core::qmp::{QmpCommand, QmpIn};
use vbackup_core::xml::{CheckpointDef, CheckpointMode, parse_domain};
use vbackup_qemu::discover;
use vbackup_qemu::qmp_socket::{QmpSocket, SocketLink};
use vbackup_qemu::qsd::{Found, Qsd, QsdDisk, QsdOptions, RunDir, format_node};
use vbackup_qemu::store::{
    Collection, DomainSnapshot, DomainStore, Store, StoreError, write_atomic,
};

use crate::checkpoint_index;
use crate::config::HostConfig;
use crate::effects::{CURRENT_FILE, PENDING_CHECKPOINT_FILE, StoreEffects};
use crate::error::Error;

/// How long connecting and negotiating may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new QMP session may take to be negotiated and reconciled: the engine's command
/// timeout (60 s) for an unanswered `qmp_capabilities`, plus a few of its retries.
const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(90);

/// Receive steps allowed for one short request (each step is one message or one tick).
pub const STEPS: usize = 100_000;

/// How a domain reaches QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// vbackup runs qemu-storage-daemon itself.
    Managed,
    /// An existing QMP socket.
    Attached(PathBuf),
}

impl Attachment {
    /// How the domain stored in `dir` reaches QEMU, from its `vbackup.json`.
    pub fn of_domain(dir: &Path) -> Self {
        let meta = std::fs::read_to_string(dir.join(META_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or(Value::Null);
        Attachment::from_meta(&meta)
    }

    fn from_meta(meta: &Value) -> Self {
        match meta.get("qmp").and_then(Value::as_str) {
            Some(p) => Attachment::Attached(PathBuf::from(p)),
            None => Attachment::Managed,
        }
    }

    /// The `vbackup.json` document.
    pub fn to_meta(&self) -> Value {
        match self {
            Attachment::Managed => json!({"kind": "managed"}),
            Attachment::Attached(p) => json!({"kind": "attached", "qmp": p}),
        }
    }
}

/// This invocation's locking settings, set once by `main` before any command runs.
#[derive(Debug, Clone, Default)]
pub struct LockSettings {
    /// How long a command that changes a domain waits for another holder's lock (zero: fail at
    /// once).
    pub wait: Duration,
    /// What this invocation does, recorded in the lock files it holds.
    pub operation: String,
}

static LOCK_SETTINGS: OnceLock<LockSettings> = OnceLock::new();

/// Sets this invocation's locking settings; only the first call counts.
pub fn configure_locking(settings: LockSettings) {
    let _ = LOCK_SETTINGS.set(settings);
}

fn lock_settings() -> LockSettings {
    LOCK_SETTINGS.get().cloned().unwrap_or_default()
}

/// Opens the store under `state_dir` (or the default location).
pub fn open_store(state_dir: Option<&Path>) -> Result<Store, Error> {
    let root = match state_dir {
        // Absolute, because paths under it (the daemon's sockets) are handed to QEMU, which
        // runs elsewhere and wants absolute socket paths.
        Some(d) => std::path::absolute(d)
            .map_err(Error::io(format!("state directory '{}'", d.display())))?,
        None => vbackup_qemu::store::default_root_from_env()?,
    };
    // What a killed vbackup left running or half-written is cleaned by the next one.
    vbackup_qemu::children::clean_orphans(&std::env::temp_dir());
    Ok(Store::open(root)?.with_operation(&lock_settings().operation))
}

/// Locks domain `name` for a command that changes it: at once, or within `--wait-lock`.
pub fn lock(store: &Store, name: &str) -> Result<DomainStore, Error> {
    let wait = lock_settings().wait;
    match store.lock_domain(name) {
        Err(StoreError::Locked { domain, holder }) if !wait.is_zero() => {
            let err = StoreError::Locked { domain, holder };
            eprintln!("note: {err}; waiting up to {} s", wait.as_secs_f64());
            Ok(store.lock_domain_wait(name, wait)?)
        }
        other => Ok(other?),
    }
}

/// A locked, defined domain with its metadata loaded; no QEMU yet.
#[derive(Debug)]
pub struct Loaded {
    /// The locked store.
    pub store: DomainStore,
    /// `domain.xml` as stored.
    pub xml: String,
    /// The definition, with node names filled in for managed domains.
    pub def: DomainDef,
    /// Managed or attached.
    pub attachment: Attachment,
    /// Stored checkpoints.
    pub tree: CheckpointTree,
    /// The running job's journal.
    pub journal: Option<BackupPlan>,
}

/// What a domain's files say, parsed: shared by locked loads and lock-free reads.
struct Parsed {
    def: DomainDef,
    attachment: Attachment,
    tree: CheckpointTree,
    journal: Option<BackupPlan>,
}

fn parse_stored(
    xml: &str,
    meta: Option<&str>,
    checkpoints: Vec<Checkpoint>,
    current: Option<&str>,
    journal: Option<(&str, &Path)>,
) -> Result<Parsed, Error> {
    let mut def = parse_domain(xml)?;
    let meta = meta
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .unwrap_or(Value::Null);
    let attachment = Attachment::from_meta(&meta);
    if attachment == Attachment::Managed {
        for disk in &mut def.disks {
            let target = disk.target.clone();
            for (i, layer) in disk.layers.iter_mut().enumerate() {
                layer.node_name = Some(format_node(&target, i));
            }
        }
    }
    let current = current.map(str::trim).filter(|s| !s.is_empty());
    let tree = CheckpointTree::load(checkpoints, current);
    let journal = match journal {
        Some((text, path)) => Some(serde_json::from_str::<BackupPlan>(text).map_err(|e| {
            Error::Corrupt(format!(
                "job journal '{}': {e}; 'vbackup domjobabort' ends the job it journaled",
                path.display()
            ))
        })?),
        None => None,
    };
    Ok(Parsed {
        def,
        attachment,
        tree,
        journal,
    })
}

/// Parses stored checkpoint documents, `(name, xml)`.
fn parse_checkpoints(files: Vec<(String, String)>) -> Result<Vec<Checkpoint>, Error> {
    let mut checkpoints = Vec::with_capacity(files.len());
    for (entry, text) in files {
        let cdef = CheckpointDef::parse(&text, CheckpointMode::Document)
            .map_err(|e| Error::Corrupt(format!("checkpoint '{entry}': {e}")))?;
        let c = Checkpoint::from_def(&cdef)
            .map_err(|e| Error::Corrupt(format!("checkpoint '{entry}': {e}")))?;
        checkpoints.push(c);
    }
    Ok(checkpoints)
}

/// A locked domain's checkpoints: from the index when it matches the checkpoint files, else
/// parsed from them (and the index written again for the next invocation).
fn load_checkpoints(ds: &DomainStore) -> Result<Vec<Checkpoint>, Error> {
    if let Some(checkpoints) = checkpoint_index::read(ds) {
        return Ok(checkpoints);
    }
    let checkpoints = parse_checkpoints(ds.load_entries(Collection::Checkpoints)?)?;
    checkpoint_index::write(ds, &checkpoints);
    Ok(checkpoints)
}

/// Locks and loads domain `name`.
pub fn load(store: &Store, name: &str) -> Result<Loaded, Error> {
    load_locked(lock(store, name)?, name)
}

fn load_locked(ds: DomainStore, name: &str) -> Result<Loaded, Error> {
    let Some(xml) = ds.read_domain_xml()? else {
        // Locking made the directory; an unknown name leaves nothing behind (only an empty
        // directory is removed).
        let _ = std::fs::remove_dir(ds.dir());
        return Err(Error::NoDomain(name.to_owned()));
    };
    let meta = std::fs::read_to_string(ds.dir().join(META_FILE)).ok();
    let current = std::fs::read_to_string(ds.dir().join(CURRENT_FILE)).ok();
    let journal = ds.read_journal()?;
    let parsed = parse_stored(
        &xml,
        meta.as_deref(),
        load_checkpoints(&ds)?,
        current.as_deref(),
        journal
            .as_deref()
            .map(|t| (t, ds.dir().join(JOURNAL_FILE)))
            .as_ref()
            .map(|(t, p)| (*t, p.as_path())),
    )?;
    // Restores killed before their rename left copies beside the disks' images.
    for dir in parsed
        .def
        .disks
        .iter()
        .filter_map(|d| d.top()?.path.as_deref().map(Path::new)?.parent())
    {
        vbackup_qemu::children::clean_restore_leftovers(dir);
    }
    Ok(Loaded {
        store: ds,
        xml,
        def: parsed.def,
        attachment: parsed.attachment,
        tree: parsed.tree,
        journal: parsed.journal,
    })
}

/// A domain read without its lock while another vbackup holds it: what the store says now.
/// Nothing is reconciled or written; the holder keeps the store current.
#[derive(Debug)]
pub struct Shared {
    /// The files as read.
    pub snapshot: DomainSnapshot,
    /// The definition.
    pub def: DomainDef,
    /// Stored checkpoints.
    pub tree: CheckpointTree,
    /// The running job's journal.
    pub journal: Option<BackupPlan>,
}

/// How a read-only command sees a domain.
#[derive(Debug)]
pub enum ReadAccess {
    /// Nobody else holds the domain: this invocation locked it and may reconcile a job.
    Locked(Box<Loaded>),
    /// Another vbackup holds it: read the store as it is.
    Shared(Box<Shared>),
}

/// Opens domain `name` for a read-only command: locked when free, else read without the lock
/// (never waiting, whatever `--wait-lock` says).
pub fn load_for_reading(store: &Store, name: &str) -> Result<ReadAccess, Error> {
    match store.lock_domain(name) {
        Ok(ds) => return Ok(ReadAccess::Locked(Box::new(load_locked(ds, name)?))),
        Err(StoreError::Locked { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let Some(snapshot) = store.read_domain(name)? else {
        return Err(Error::NoDomain(name.to_owned()));
    };
    let journal_path = store.root().join("domains").join(name).join(JOURNAL_FILE);
    let Some(xml) = snapshot.file("domain.xml") else {
        return Err(Error::NoDomain(name.to_owned()));
    };
    let parsed = parse_stored(
        xml,
        snapshot.file(META_FILE),
        parse_checkpoints(snapshot.checkpoints.clone())?,
        snapshot.file(CURRENT_FILE),
        snapshot
            .file(JOURNAL_FILE)
            .map(|t| (t, journal_path.as_path())),
    )?;
    Ok(ReadAccess::Shared(Box::new(Shared {
        def: parsed.def,
        tree: parsed.tree,
        journal: parsed.journal,
        snapshot,
    })))
}

/// A link whose clock reads milliseconds since the Unix epoch, so times the core records (a
/// job's start, kept in the journal) still mean something to the next invocation. The offset
/// is fixed when the link is made and time then follows the inner link's monotonic clock.
#[derive(Debug)]
pub struct WallClockLink<L> {
    inner: L,
    offset_ms: u64,
}

impl<L: Link> WallClockLink<L> {
    /// Wraps `inner`.
    pub fn new(inner: L) -> Self {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let offset_ms = wall_ms.saturating_sub(inner.now().as_ms());
        Self { inner, offset_ms }
    }
}

impl<L: Link> Link for WallClockLink<L> {
    fn now(&self) -> Timestamp {
        self.inner.now().plus_ms(self.offset_ms)
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        self.inner.send(id, cmd)
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        let inner = deadline.map(|d| Timestamp::from_ms(d.as_ms().saturating_sub(self.offset_ms)));
        self.inner.recv(inner)
    }
}

/// A domain with a live QMP session driven by the core.
#[derive(Debug)]
pub struct Session {
    /// The driver over the QMP link with store effects.
    pub driver: Driver<WallClockLink<SocketLink>, StoreEffects>,
    /// Managed or attached.
    pub attachment: Attachment,
    /// Run directory of the managed daemon.
    pub run_dir: PathBuf,
    /// How many of the effects' events have been looked at for warnings.
    events_reported: usize,
}

/// What to print about a drift found on connecting: the full warnings the first time a given
/// set of lost bitmaps is seen, then one reminder line naming the checkpoints, as long as they
/// are not deleted. `dir` is the domain's store directory, where the last full report is kept
/// (best effort: without it the full warnings are printed again).
pub fn drift_report(dir: &Path, drift: &BitmapDrift) -> Vec<String> {
    let full = drift_warnings(drift);
    if full.is_empty() {
        let _ = std::fs::remove_file(dir.join(DRIFT_REPORTED_FILE));
        return full;
    }
    let text = full.join("\n");
    let seen = std::fs::read_to_string(dir.join(DRIFT_REPORTED_FILE)).ok();
    if seen.as_deref() == Some(text.as_str()) {
        let mut names: Vec<&str> = drift.missing.iter().map(|(c, _)| c.as_str()).collect();
        names.dedup();
        return vec![format!(
            "warning: checkpoints with lost bitmaps (reported before): {}; incremental backups from them are refused until they are deleted",
            names.join(", ")
        )];
    }
    let _ = write_atomic(dir, DRIFT_REPORTED_FILE, text.as_bytes());
    full
}

/// The warning lines for a drift between checkpoint metadata and QEMU's bitmaps: one per
/// checkpoint disk whose bitmap is lost. Bitmaps no checkpoint owns are not warned about: a
/// metadata-only checkpoint deletion leaves them on purpose, and a warning on every later
/// command would bury the ones that matter.
pub fn drift_warnings(drift: &BitmapDrift) -> Vec<String> {
    drift
        .missing
        .iter()
        .map(|(checkpoint, disk)| {
            format!(
                "warning: checkpoint '{checkpoint}': the bitmap of disk '{disk}' is missing or inconsistent in QEMU (it stopped without closing the image?); incremental backups from it are refused: take a full backup, and delete the checkpoint"
            )
        })
        .collect()
}

/// Asks the QEMU at `socket` which disks it has (see `vbackup_qemu::discover` for the rule).
pub fn discover_disks(socket: &Path) -> Result<Vec<DiskDef>, Error> {
    let mut qmp = QmpSocket::connect(socket, Instant::now() + CONNECT_TIMEOUT)?;
    let replies = discover::query(&mut qmp, Instant::now() + CONNECT_TIMEOUT)?;
    Ok(discover::discover_disks(&replies)?)
}

/// Fills in the node name of each layer of an attached domain from what QEMU runs now: a
/// defined disk is the discovered disk with the same top image (node names are QEMU's and may
/// change when it restarts, so they are looked up on every connection, never stored).
fn resolve_nodes(socket: &Path, def: &mut DomainDef) -> Result<(), Error> {
    let found = discover_disks(socket)?;
    for disk in def.disks.iter_mut().filter(|d| !d.is_empty()) {
        let unresolved = |why: String| {
            Error::Other(format!(
                "disk '{}': {why} in the QEMU at '{}'",
                disk.target,
                socket.display()
            ))
        };
        let top_path = disk.top().and_then(|l| l.path.clone());
        let Some(running) = found.iter().find(|f| {
            let running_top = f.top().and_then(|l| l.path.as_deref());
            match &top_path {
                Some(p) => running_top == Some(p.as_str()),
                None => f.target == disk.target,
            }
        }) else {
            let what = top_path.unwrap_or_else(|| disk.target.clone());
            return Err(unresolved(format!("no disk opens '{what}'")));
        };
        if running.layers.len() < disk.layers.len() {
            return Err(unresolved(format!(
                "the defined chain has {} layers but {} are open",
                disk.layers.len(),
                running.layers.len()
            )));
        }
        for (layer, open) in disk.layers.iter_mut().zip(&running.layers) {
            if let (Some(want), Some(have)) = (&layer.path, &open.path)
                && want != have
            {
                return Err(unresolved(format!(
                    "layer '{want}' is defined but '{have}' is open in its place"
                )));
            }
            if layer.node_name.is_none() {
                layer.node_name = open.node_name.clone();
            }
        }
    }
    Ok(())
}

impl Session {
    /// Brings QEMU up for `loaded` (starting a managed daemon if none runs), hands the session
    /// to the core and waits until it is negotiated (and a journaled job reconciled).
    pub fn connect(loaded: Loaded) -> Result<Session, Error> {
        let Loaded {
            store,
            mut def,
            attachment,
            tree,
            journal,
            ..
        } = loaded;
        let run_dir = store.run_dir();
        let had_job = journal.is_some();
        let mut restarted = false;
        // Whether the daemon is the one the last session left in step with the store: the
        // mark is used up here, before anything talks to the daemon (see `IN_STEP_FILE`).
        let mut trusted = false;
        let qmp = match &attachment {
            Attachment::Managed => {
                let disks = def
                    .disks
                    .iter()
                    .filter(|d| !d.is_empty())
                    .map(QsdDisk::from_disk_def)
                    .collect::<Result<Vec<_>, _>>()?;
                let mark = take_in_step_mark(&run_dir);
                match Qsd::attach_or_start(&run_dir, &disks, &QsdOptions::default())? {
                    Found::Running { pid, qmp } => {
                        trusted = mark.is_some() && mark == daemon_identity(pid);
                        qmp
                    }
                    Found::Started { qsd, replaced } => {
                        // A pid file whose process is gone: the daemon died without a clean
                        // stop (QEMU removes the file when it exits normally).
                        if let Some(pid) = replaced {
                            restarted = true;
                            eprintln!(
                                "note: the qemu-storage-daemon of domain '{}' (pid {pid}) was gone; started a new one (pid {}); bitmaps it had not written are lost",
                                store.name(),
                                qsd.pid()
                            );
                        }
                        let path = qsd.run_dir().qmp_socket.clone();
                        // Close the negotiated handle: the monitor serves one client at a time
                        // and the core negotiates its own session.
                        drop(qsd.into_qmp());
                        QmpSocket::connect_unnegotiated(&path, Instant::now() + CONNECT_TIMEOUT)?
                    }
                }
            }
            Attachment::Attached(path) => {
                resolve_nodes(path, &mut def)?;
                QmpSocket::connect_unnegotiated(path, Instant::now() + CONNECT_TIMEOUT)?
            }
        };
        let config = domain_config(&store, &attachment, &run_dir)?;
        let pending = std::fs::read_to_string(store.dir().join(PENDING_CHECKPOINT_FILE))
            .map(|s| pending_checkpoints(&s))
            .unwrap_or_default();
        // The restart contract: what the store holds (the tree as loaded, not rebuilt).
        let mut domain = Domain::new(def, config, tree, journal).with_pending_checkpoints(pending);
        if trusted {
            domain = domain.trusting_qemu();
        }
        let link = WallClockLink::new(SocketLink::new(qmp));
        let effects = StoreEffects::new(store);
        let mut driver = Driver::new(domain, link, effects);
        driver.connected()?;
        // The engine retries a refused or unanswered negotiation after growing delays; the
        // wait for a usable session is bounded in time here, not only in steps.
        let give_up = Instant::now() + NEGOTIATE_TIMEOUT;
        let up = loop {
            if driver.run_until(|d| d.view().connected, 16)? {
                break true;
            }
            if Instant::now() >= give_up {
                break false;
            }
        };
        if !up {
            return Err(Error::Other(format!(
                "QEMU did not accept the QMP session within {} s (qmp_capabilities refused or unanswered, or the reconcile did not finish); is another client using the monitor?",
                NEGOTIATE_TIMEOUT.as_secs()
            )));
        }
        let mut session = Session {
            driver,
            attachment,
            run_dir,
            events_reported: 0,
        };
        // A restored job reconciles right after negotiation; a stats request is answered only
        // once the core knows the job's real state, so it doubles as a barrier.
        if session.driver.domain().view().backup.is_some() {
            let _ = session.call(Request::JobStats {
                completed: false,
                keep_completed: true,
            })?;
        }
        // A job whose QEMU jobs vanished (they died with a daemon or a QEMU that was
        // restarted) has been ended as failed by the core's reconcile, which now cleans up
        // what remains: drive that to the end so this invocation sees the job finished.
        if session.job_concluding() {
            session.wait_job_end(Duration::from_secs(60))?;
        }
        if restarted && had_job && !session.job_running() {
            eprintln!("note: the backup job died with the daemon; it was ended as failed");
        }
        Ok(session)
    }

    /// Drives the session until no backup job runs or `timeout` passes.
    pub fn wait_job_end(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        while self.job_running() && Instant::now() < deadline {
            let until = self.driver.link().now().plus_ms(200);
            self.driver.step(Some(until))?;
        }
        Ok(())
    }

    /// Submits a request and drives until it is answered. Warnings about what the core found
    /// meanwhile (a bitmap drift after connecting) go to stderr first.
    pub fn call(&mut self, request: Request) -> Result<Reply, Error> {
        let reply = self.driver.call(request, STEPS);
        self.report_events();
        // What the request changed is durable before its answer is acted on.
        self.driver
            .effects_mut()
            .sync_removals()
            .map_err(|e| Error::Other(format!("store write failed: {e}")))?;
        Ok(reply??)
    }

    /// Prints a warning for each event not yet looked at that the user should know about.
    fn report_events(&mut self) {
        let effects = self.driver.effects();
        let events = &effects.events;
        for event in events.iter().skip(self.events_reported) {
            if let DomainEvent::BitmapDrift(drift) = event {
                for line in drift_report(effects.store().dir(), drift) {
                    eprintln!("{line}");
                }
            }
        }
        self.events_reported = events.len();
    }

    /// Whether a backup job is still there but every disk of it has ended (its cleanup runs).
    fn job_concluding(&self) -> bool {
        self.driver
            .domain()
            .view()
            .backup
            .is_some_and(|p| p.disks.iter().all(|d| d.state.is_final()))
    }

    /// Whether a backup job is running.
    pub fn job_running(&self) -> bool {
        self.driver.domain().view().backup.is_some()
    }

    /// Ends the session: a managed daemon with no job running is stopped cleanly (bitmaps are
    /// written to the images); one with a job keeps running for the next invocation.
    pub fn close(mut self) -> Result<(), Error> {
        self.report_events();
        let running = self.job_running();
        let in_step = self.driver.domain().view().in_step;
        let Session {
            driver,
            attachment,
            run_dir,
            ..
        } = self;
        let (domain, link, mut effects) = driver.into_parts();
        drop(link);
        effects.write_index(domain.view().checkpoints.iter());
        drop(domain);
        let kept = run_dir.join(KEEP_FILE).is_file();
        if attachment == Attachment::Managed && !running && !kept {
            let qsd = Qsd::reconnect(&run_dir, CONNECT_TIMEOUT)?;
            qsd.quit()?;
        } else if attachment == Attachment::Managed && in_step {
            mark_in_step(&run_dir);
        }
        drop(effects);
        Ok(())
    }
}

/// Removes the in-step mark of the daemon in `run_dir` and returns the identity it named.
fn take_in_step_mark(run_dir: &Path) -> Option<String> {
    let path = run_dir.join(IN_STEP_FILE);
    let mark = std::fs::read_to_string(&path).ok()?;
    // Used up whatever happens next; if it cannot be removed, it is not trusted.
    std::fs::remove_file(&path).ok()?;
    Some(mark.trim().to_owned())
}

/// Records that the daemon in `run_dir` holds exactly what the store describes. Best effort:
/// without the mark the next session only reconciles as usual.
fn mark_in_step(run_dir: &Path) {
    let Some(pid) = RunDir::new(run_dir).read_pid().ok().flatten() else {
        return;
    };
    if let Some(identity) = daemon_identity(pid) {
        let _ = std::fs::write(run_dir.join(IN_STEP_FILE), identity);
    }
}

/// The daemon `pid` as the in-step mark names it: its pid and start time, so a later process
/// given the same pid differs.
fn daemon_identity(pid: u32) -> Option<String> {
    vbackup_qemu::children::start_time(pid).map(|start| format!("{pid} {start}"))
}

/// The NBD server a managed domain's daemon runs: its guest exports and pull backups share
/// it (QEMU runs one NBD server per process).
pub fn daemon_nbd_server(run_dir: &Path) -> NbdServer {
    NbdServer {
        transport: NbdTransport::Unix {
            socket: RunDir::new(run_dir).nbd_socket.display().to_string(),
        },
        tls: None,
    }
}

/// The state directory a domain's store lives in.
pub fn state_root(store: &DomainStore) -> PathBuf {
    store
        .dir()
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The core's configuration of a domain: a managed daemon's NBD server is the one pull backups
/// use; for an attached QEMU vbackup starts the server the backup asks for, with the host
/// configuration's ports and TLS credentials.
pub fn domain_config(
    store: &DomainStore,
    attachment: &Attachment,
    run_dir: &Path,
) -> Result<DomainConfig, Error> {
    let mut config = DomainConfig::default();
    match attachment {
        Attachment::Managed => config.nbd_server_running = Some(daemon_nbd_server(run_dir)),
        Attachment::Attached(_) => HostConfig::load(&state_root(store))?.apply(&mut config),
    }
    Ok(config)
}

/// Stops a managed domain's daemon if one runs (used by `undefine`).
/// The names in the pending-checkpoint file: a JSON array, or one bare name as older stores
/// wrote it; empty when there is none.
fn pending_checkpoints(text: &str) -> Vec<String> {
    let text = text.trim();
    if text.is_empty() {
        return Vec::new();
    }
    serde_json::from_str(text).unwrap_or_else(|_| vec![text.to_owned()])
}

pub fn stop_daemon(run_dir: &Path) -> Result<(), Error> {
    // The mark would name a process that is gone; never trusted, but not left behind either.
    let _ = std::fs::remove_file(run_dir.join(IN_STEP_FILE));
    match Qsd::reconnect(run_dir, CONNECT_TIMEOUT) {
        Ok(qsd) => Ok(qsd.quit()?),
        Err(vbackup_qemu::qsd::QsdError::NotRunning { .. })
        | Err(vbackup_qemu::qsd::QsdError::DaemonGone { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes `vbackup.json`.
pub fn write_meta(store: &DomainStore, attachment: &Attachment) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(&attachment.to_meta()).unwrap_or_default();
    write_atomic(store.dir(), META_FILE, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pending_checkpoints;

    #[test]
    fn pending_checkpoint_file_reads_json_sets_and_older_bare_names() {
        assert!(pending_checkpoints("").is_empty());
        assert!(pending_checkpoints("[]").is_empty());
        assert_eq!(pending_checkpoints(r#"["c1","c2"]"#), ["c1", "c2"]);
        assert_eq!(pending_checkpoints("c1\n"), ["c1"]);
    }
}
