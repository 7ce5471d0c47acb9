//! One invocation's hold on one domain: the store opened and the domain locked, the `Domain`
//! rebuilt from stored checkpoints and the job journal, and (when QEMU is needed) a QMP session
//! whose fresh start the core is told about so it negotiates and reconciles.
//!
//! Contract:
//! - Managed domains (no `qmp` in `vbackup.json`): qemu-storage-daemon runs over the domain's
//!   images in the store's run directory. It is started when QEMU is needed and nothing runs,
//!   kept running (detached) while a backup job runs, and stopped with `quit` when this
//!   invocation ends with no job (QEMU then writes persistent bitmaps to the images).
//! - Attached domains talk to the QMP socket given at `define`; vbackup never stops that QEMU.
//! - The QMP socket is handed to the core un-negotiated: the core sends `qmp_capabilities`
//!   itself after [`Input::Reconnected`](vbackup_core::domain::Input), exactly as after a
//!   reconnect, so one code path serves first connect, restart and reconnect.
//! - A journaled job always brings QEMU up (even for read-only commands) so the core can
//!   reconcile it: a restart of vbackup never loses a job.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vbackup_core::Domain;
use vbackup_core::backup::BackupPlan;
use vbackup_core::checkpoint::{Checkpoint, CheckpointTree};
use vbackup_core::domain::{DomainConfig, Reply, Request};
use vbackup_core::driver::Driver;
use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::model::DomainDef;
use vbackup_core::qmp::{QmpCommand, QmpIn};
use vbackup_core::xml::{CheckpointDef, CheckpointMode, parse_domain};
use vbackup_qemu::qmp_socket::{QmpSocket, SocketLink};
use vbackup_qemu::qsd::{Qsd, QsdDisk, QsdOptions, format_node};
use vbackup_qemu::store::{Collection, DomainStore, Store, write_atomic};

use crate::effects::{CURRENT_FILE, StoreEffects};
use crate::output::CliError;

/// Per-domain settings of vbackup itself, beside `domain.xml`.
pub const META_FILE: &str = "vbackup.json";

/// In a managed domain's run directory: the daemon was started with `start` and stays up
/// (the "running guest") until `shutdown`.
pub const KEEP_FILE: &str = "keep-running";

/// How long connecting and negotiating may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Opens the store under `state_dir` (or the default location).
pub fn open_store(state_dir: Option<&Path>) -> Result<Store, CliError> {
    let root = match state_dir {
        Some(d) => d.to_owned(),
        None => vbackup_qemu::store::default_root_from_env()?,
    };
    Ok(Store::open(root)?)
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

/// Locks and loads domain `name`.
pub fn load(store: &Store, name: &str) -> Result<Loaded, CliError> {
    let ds = store.lock_domain(name)?;
    let Some(xml) = ds.read_domain_xml()? else {
        // Locking made the directory; an unknown name leaves nothing behind (only an empty
        // directory is removed).
        let _ = std::fs::remove_dir(ds.dir());
        return Err(CliError::NoDomain(name.to_owned()));
    };
    let mut def = parse_domain(&xml)?;
    let meta = std::fs::read_to_string(ds.dir().join(META_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
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
    let mut checkpoints = Vec::new();
    for (entry, text) in ds.load_entries(Collection::Checkpoints)? {
        let cdef = CheckpointDef::parse(&text, CheckpointMode::Document)
            .map_err(|e| CliError::Corrupt(format!("checkpoint '{entry}': {e}")))?;
        let c = Checkpoint::from_def(&cdef)
            .map_err(|e| CliError::Corrupt(format!("checkpoint '{entry}': {e}")))?;
        checkpoints.push(c);
    }
    let current = std::fs::read_to_string(ds.dir().join(CURRENT_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let tree = CheckpointTree::load(checkpoints, current.as_deref());
    let journal = match ds.read_journal()? {
        Some(text) => Some(
            serde_json::from_str::<BackupPlan>(&text)
                .map_err(|e| CliError::Corrupt(format!("job journal: {e}")))?,
        ),
        None => None,
    };
    Ok(Loaded {
        store: ds,
        xml,
        def,
        attachment,
        tree,
        journal,
    })
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
}

/// Finds the format node of each layer of an attached domain by its file name.
fn discover_nodes(socket: &Path, def: &mut DomainDef) -> Result<(), CliError> {
    let mut qmp = QmpSocket::connect(socket, Instant::now() + CONNECT_TIMEOUT)?;
    let nodes = qmp.execute(
        "query-named-block-nodes",
        Some(json!({"flat": true})),
        Instant::now() + CONNECT_TIMEOUT,
    )?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    for disk in &mut def.disks {
        for layer in &mut disk.layers {
            if layer.node_name.is_some() {
                continue;
            }
            let Some(path) = layer.path.clone() else {
                continue;
            };
            let found = nodes.iter().find(|n| {
                let drv = n.get("drv").and_then(Value::as_str).unwrap_or("");
                let file = n.get("file").and_then(Value::as_str).unwrap_or("");
                drv != "file" && drv != "host_device" && file == path
            });
            match found
                .and_then(|n| n.get("node-name"))
                .and_then(Value::as_str)
            {
                Some(name) => layer.node_name = Some(name.to_owned()),
                None => {
                    return Err(CliError::Other(format!(
                        "disk '{}': no block node of QEMU opens '{path}'",
                        disk.target
                    )));
                }
            }
        }
    }
    Ok(())
}

impl Session {
    /// Brings QEMU up for `loaded` (starting a managed daemon if none runs), hands the session
    /// to the core and waits until it is negotiated (and a journaled job reconciled).
    pub fn connect(loaded: Loaded) -> Result<Session, CliError> {
        let Loaded {
            store,
            mut def,
            attachment,
            tree,
            journal,
            ..
        } = loaded;
        let run_dir = store.run_dir();
        let socket = match &attachment {
            Attachment::Managed => {
                let disks = def
                    .disks
                    .iter()
                    .filter(|d| !d.is_empty())
                    .map(QsdDisk::from_disk_def)
                    .collect::<Result<Vec<_>, _>>()?;
                let qsd = Qsd::connect_or_start(&run_dir, &disks, &QsdOptions::default())?;
                let path = qsd.run_dir().qmp_socket.clone();
                // Close the negotiated handle: the monitor serves one client at a time and the
                // core negotiates its own session.
                drop(qsd.into_qmp());
                path
            }
            Attachment::Attached(path) => {
                discover_nodes(path, &mut def)?;
                path.clone()
            }
        };
        let config = DomainConfig {
            nbd_server_running: attachment == Attachment::Managed,
            ..DomainConfig::default()
        };
        let domain = Domain::new(def, config, tree, journal);
        let qmp = QmpSocket::connect_unnegotiated(&socket, Instant::now() + CONNECT_TIMEOUT)?;
        let link = WallClockLink::new(SocketLink::new(qmp));
        let mut driver = Driver::new(domain, link, StoreEffects::new(store));
        driver.connected()?;
        let up = driver.run_until(|d| d.view().connected, STEPS)?;
        if !up {
            return Err(CliError::Other(
                "QEMU did not accept the QMP session".into(),
            ));
        }
        let mut session = Session {
            driver,
            attachment,
            run_dir,
        };
        // A restored job reconciles right after negotiation; a stats request is answered only
        // once the core knows the job's real state, so it doubles as a barrier.
        if session.driver.domain().view().backup.is_some() {
            let _ = session.call(Request::JobStats {
                completed: false,
                keep_completed: true,
            })?;
        }
        Ok(session)
    }

    /// Submits a request and drives until it is answered.
    pub fn call(&mut self, request: Request) -> Result<Reply, CliError> {
        let reply = self.driver.call(request, STEPS)?;
        Ok(reply?)
    }

    /// Whether a backup job is running.
    pub fn job_running(&self) -> bool {
        self.driver.domain().view().backup.is_some()
    }

    /// Ends the session: a managed daemon with no job running is stopped cleanly (bitmaps are
    /// written to the images); one with a job keeps running for the next invocation.
    pub fn close(self) -> Result<(), CliError> {
        let running = self.job_running();
        let Session {
            driver,
            attachment,
            run_dir,
            ..
        } = self;
        let (_, link, effects) = driver.into_parts();
        drop(link);
        let kept = run_dir.join(KEEP_FILE).is_file();
        if attachment == Attachment::Managed && !running && !kept {
            let qsd = Qsd::reconnect(&run_dir, CONNECT_TIMEOUT)?;
            qsd.quit()?;
        }
        drop(effects);
        Ok(())
    }
}

/// Stops a managed domain's daemon if one runs (used by `undefine`).
pub fn stop_daemon(run_dir: &Path) -> Result<(), CliError> {
    match Qsd::reconnect(run_dir, CONNECT_TIMEOUT) {
        Ok(qsd) => Ok(qsd.quit()?),
        Err(vbackup_qemu::qsd::QsdError::NotRunning { .. })
        | Err(vbackup_qemu::qsd::QsdError::DaemonGone { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes `vbackup.json`.
pub fn write_meta(store: &DomainStore, attachment: &Attachment) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(&attachment.to_meta()).unwrap_or_default();
    write_atomic(store.dir(), META_FILE, text.as_bytes())?;
    Ok(())
}
