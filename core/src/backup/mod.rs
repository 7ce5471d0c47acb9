//! Backups: the aligned backup definition the engine accepts, the per-disk plan with every
//! default filled in, and job statistics.
//!
//! The definition here is the narrow seam between the XML layer and the engine: the XML layer
//! parses and aligns a `<domainbackup>` against the domain (which disks, full or incremental,
//! which stores); the engine fills what only a live QEMU can tell (node names, storage indexes,
//! generated paths, export names, the TCP port) and decides every command.

mod convert;
pub(crate) mod run;

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::model::ImageFormat;

/// Push (QEMU writes the copy) or pull (QEMU exposes a point-in-time export).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// QEMU copies into target images.
    Push,
    /// QEMU serves a frozen view over NBD; a client reads it.
    Pull,
}

/// Where the NBD server of a pull backup listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NbdTransport {
    /// TCP on `host`; a port of `None` is chosen from the configured range.
    Tcp {
        /// Host name or address to listen on.
        host: String,
        /// Port, when given.
        port: Option<u16>,
    },
    /// A unix socket.
    Unix {
        /// Absolute socket path.
        socket: String,
    },
}

/// The `<server>` of a pull backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdServer {
    /// Where it listens.
    pub transport: NbdTransport,
    /// Whether TLS was asked for (`tls='yes'`); `None` when not specified.
    pub tls: Option<bool>,
}

impl NbdServer {
    /// Whether clients must use TLS (`tls='yes'`; an unspecified `tls` means no).
    pub fn uses_tls(&self) -> bool {
        self.tls == Some(true)
    }

    /// Whether a client that connects where `requested` says, with the security it asks for,
    /// reaches this (running) server. A TCP request without a port accepts the running port.
    pub fn serves(&self, requested: &NbdServer) -> bool {
        let address = match (&self.transport, &requested.transport) {
            (NbdTransport::Unix { socket: a }, NbdTransport::Unix { socket: b }) => a == b,
            (NbdTransport::Tcp { host: a, port: pa }, NbdTransport::Tcp { host: b, port: pb }) => {
                a == b && (pb.is_none() || pa == pb)
            }
            _ => false,
        };
        address && self.uses_tls() == requested.uses_tls()
    }

    /// The NBD URI of export `export` on this server (the `nbd://`, `nbds://`, `nbd+unix://`
    /// and `nbds+unix://` forms that nbdinfo, nbdcopy and qemu-img understand).
    pub fn export_uri(&self, export: &str) -> String {
        let scheme = if self.uses_tls() { "nbds" } else { "nbd" };
        match &self.transport {
            NbdTransport::Unix { socket } => format!("{scheme}+unix:///{export}?socket={socket}"),
            NbdTransport::Tcp { host, port } => {
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                format!("{scheme}://{}{port}/{export}", uri_host(host))
            }
        }
    }
}

/// An IPv6 address in a URI goes between brackets.
fn uri_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The server's address as users write it: `unix:PATH` or `tcp:HOST:PORT`, then ` with TLS`
/// when clients must use it.
impl std::fmt::Display for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.transport {
            NbdTransport::Unix { socket } => write!(f, "unix:{socket}")?,
            NbdTransport::Tcp { host, port } => {
                write!(f, "tcp:{}", uri_host(host))?;
                match port {
                    Some(p) => write!(f, ":{p}")?,
                    None => f.write_str(" (any port)")?,
                }
            }
        }
        if self.uses_tls() {
            f.write_str(" with TLS")?;
        }
        Ok(())
    }
}

/// Kind of store of a target or scratch image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A regular file.
    File,
    /// A block device (must exist).
    Block,
}

/// A target (push) or scratch (pull) image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStore {
    /// File or block device.
    pub kind: StoreKind,
    /// Its path; `None` asks the engine to generate `<disk source>.<suffix>`.
    pub path: Option<String>,
    /// Image format; qcow2 when not given.
    pub format: Option<ImageFormat>,
}

/// One disk of an aligned backup definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDiskSpec {
    /// Disk target (`vda`).
    pub target: String,
    /// Whether the disk takes part (`backup='yes'`).
    pub backup: bool,
    /// The checkpoint this disk is incremental from; `None` for a full backup of the disk.
    pub incremental: Option<String>,
    /// Target or scratch image.
    pub store: Option<BackupStore>,
    /// NBD export name (pull); defaults to the disk target.
    pub export_name: Option<String>,
    /// Name of the exported temporary bitmap (pull, incremental); defaults to `backup-<target>`.
    pub export_bitmap: Option<String>,
}

/// An aligned `<domainbackup>`: one entry per domain disk, in domain order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSpec {
    /// Push or pull.
    pub mode: BackupMode,
    /// The global `<incremental>` checkpoint, kept for formatting.
    pub incremental: Option<String>,
    /// The NBD server of a pull backup.
    pub server: Option<NbdServer>,
    /// Disks in domain order.
    pub disks: Vec<BackupDiskSpec>,
}

/// Final or current state of one disk's backup job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskJobState {
    /// Not started yet.
    None,
    /// The block job runs.
    Running,
    /// A cancel was sent.
    Cancelling,
    /// Finished successfully.
    Complete,
    /// Finished with an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl DiskJobState {
    /// Whether the disk's job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Complete | Self::Failed | Self::Cancelled)
    }
}

/// One disk of a backup as the engine runs it, every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDiskPlan {
    /// Disk target.
    pub target: String,
    /// The disk's top format node (the job's device).
    pub device_node: String,
    /// Path of the disk's top image (backing file of incremental targets and of scratch).
    pub device_path: Option<String>,
    /// The checkpoint this disk is incremental from.
    pub incremental: Option<String>,
    /// Store kind.
    pub store_kind: StoreKind,
    /// Path of the target or scratch image.
    pub store_path: String,
    /// Format of the target or scratch image.
    pub store_format: ImageFormat,
    /// Storage index of the new image (libvirt's `index`).
    pub index: u32,
    /// Format node of the target or scratch.
    pub format_node: String,
    /// Storage (protocol) node of the target or scratch.
    pub storage_node: String,
    /// The backup job's id.
    pub job_id: String,
    /// The temporary bitmap (incremental disks only).
    pub temp_bitmap: Option<String>,
    /// Node holding the temporary bitmap: the disk's top (push) or the scratch (pull).
    pub temp_bitmap_node: Option<String>,
    /// NBD export name (pull).
    pub export_name: Option<String>,
    /// NBD export id (pull).
    pub export_id: Option<String>,
    /// Whether the engine created the image (and so deletes it when appropriate).
    pub created_by_us: bool,
    /// The disk's job state.
    pub state: DiskJobState,
    /// Bytes copied so far or at the end.
    pub progress_current_bytes: u64,
    /// Total bytes of the job.
    pub progress_total_bytes: u64,
    /// QEMU's error for this disk's job.
    pub error: Option<String>,
    /// QEMU confirmed closing the completed target (its format node was deleted), so the
    /// image holds everything the job wrote once the host wrote it out.
    #[serde(default)]
    pub target_closed: bool,
}

/// The whole plan of a running backup; this is also what the job journal stores, so that a
/// restarted engine can resume or conclude the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupPlan {
    /// Push or pull.
    pub mode: BackupMode,
    /// The global incremental checkpoint, as given.
    pub incremental: Option<String>,
    /// Server with the port filled in (pull).
    pub server: Option<NbdServer>,
    /// TLS credentials object id, when TLS is on.
    pub tls_object: Option<String>,
    /// TLS secret object id, when a secret is configured.
    pub tls_secret_object: Option<String>,
    /// Disks taking part, in domain order.
    pub disks: Vec<BackupDiskPlan>,
    /// Disks not taking part, in domain order.
    pub skipped_disks: Vec<String>,
    /// The checkpoint created with the backup, if any.
    pub checkpoint: Option<String>,
    /// Images were supplied by the caller (`REUSE_EXTERNAL`): never created nor deleted.
    pub reuse_external: bool,
    /// When the job began, in ms on the driver's clock.
    pub started_ms: u64,
    /// Why the start failed after the jobs were already running (a pull export QEMU refused);
    /// such a backup ends failed.
    pub start_error: Option<String>,
    /// How far the start had got when the plan was journaled.
    #[serde(default)]
    pub stage: BackupStage,
    /// The full definition of the checkpoint created with the backup, so that an engine
    /// restarted while the transaction's outcome was unknown can still record it.
    #[serde(default)]
    pub checkpoint_def: Option<Box<Checkpoint>>,
    /// Image files whose exclusive creation the engine saw succeed. Only these are ever
    /// deleted by a restarted engine: a file that existed before is never ours.
    #[serde(default)]
    pub created_files: Vec<String>,
}

/// How far a backup's start got, as journaled. The journal is written before the first
/// target is created and again right before the transaction is sent, so a restarted engine
/// always knows what it may have left in QEMU and whether the jobs may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupStage {
    /// Targets or scratch images, nodes, TLS objects and the NBD server are being set up;
    /// the transaction was never sent, so no job and no bitmap of the backup exists.
    Preparing,
    /// The transaction was (or was about to be) sent and its answer is not known: the jobs
    /// exist exactly when QEMU lists them.
    Starting,
    /// QEMU confirmed the transaction: the jobs run (journals written before stages existed
    /// are of this kind).
    #[default]
    Running,
}

/// State of the domain job as reported in statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainJobStatus {
    /// Running (libvirt's "unbounded").
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// Job statistics with libvirt's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStats {
    /// Always a backup here (libvirt's operation 9).
    pub operation: &'static str,
    /// Running or how it ended.
    pub status: DomainJobStatus,
    /// Milliseconds since the job began.
    pub time_elapsed_ms: u64,
    /// Push: total bytes to copy.
    pub disk_total_bytes: Option<u64>,
    /// Push: bytes copied.
    pub disk_processed_bytes: Option<u64>,
    /// Push: bytes still to copy.
    pub disk_remaining_bytes: Option<u64>,
    /// Pull: bytes copied into the scratch images.
    pub disk_temp_used_bytes: Option<u64>,
    /// Pull: the most the scratch images can take.
    pub disk_temp_total_bytes: Option<u64>,
    /// Finished job: whether it completed.
    pub success: Option<bool>,
    /// Finished job: the first QEMU error.
    pub errmsg: Option<String>,
    /// Running job: what it waits for right now (a reply, a file, the end of named block
    /// jobs), so a backup that does not move can be told apart from a slow one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

impl BackupPlan {
    /// Statistics of the plan at `now_ms`; `status` is the job's state.
    pub fn stats(&self, now_ms: u64, status: DomainJobStatus) -> JobStats {
        let current: u64 = self.disks.iter().map(|d| d.progress_current_bytes).sum();
        let total: u64 = self.disks.iter().map(|d| d.progress_total_bytes).sum();
        let finished = status != DomainJobStatus::Running;
        let (push, pull) = match self.mode {
            BackupMode::Push => (current > 0 || total > 0, false),
            BackupMode::Pull => (false, current > 0 || total > 0),
        };
        JobStats {
            operation: "backup",
            status,
            time_elapsed_ms: now_ms.saturating_sub(self.started_ms),
            disk_total_bytes: push.then_some(total),
            disk_processed_bytes: push.then_some(current),
            disk_remaining_bytes: push.then_some(total.saturating_sub(current)),
            disk_temp_used_bytes: pull.then_some(current),
            disk_temp_total_bytes: pull.then_some(total),
            success: finished.then_some(status == DomainJobStatus::Completed),
            errmsg: if finished {
                // The cause before its consequences: a failed disk's error, not that of a
                // disk cancelled because of it.
                self.start_error
                    .clone()
                    .or_else(|| {
                        self.disks
                            .iter()
                            .filter(|d| d.state == DiskJobState::Failed)
                            .find_map(|d| d.error.clone())
                    })
                    .or_else(|| self.disks.iter().find_map(|d| d.error.clone()))
            } else {
                None
            },
            waiting_for: None,
        }
    }

    /// The final status once every disk has ended: failed if any disk failed; cancelled if any
    /// was cancelled in push mode; completed otherwise (a pull ended by abort completed).
    pub fn final_status(&self) -> DomainJobStatus {
        if self.start_error.is_some() || self.disks.iter().any(|d| d.state == DiskJobState::Failed)
        {
            DomainJobStatus::Failed
        } else if self.mode == BackupMode::Push
            && self
                .disks
                .iter()
                .any(|d| d.state == DiskJobState::Cancelled)
        {
            DomainJobStatus::Cancelled
        } else {
            DomainJobStatus::Completed
        }
    }

    /// Finds a disk by its job id.
    pub fn disk_by_job(&self, job_id: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.job_id == job_id)
    }
}

/// Bitmap name of the temporary bitmap of an incremental disk: `backup-<target>`.
pub fn default_temp_bitmap(target: &str) -> String {
    format!("backup-{target}")
}

/// Job id of a disk's backup job: `backup-<target>-<top node>` (libvirt's), made well formed.
///
/// QEMU refuses a job id that is not a well-formed identifier (`Invalid job ID '...'`): a
/// letter first, then letters, digits, `-`, `_` and `.`. Node names QEMU generated itself (the
/// `#block107` of a legacy `-drive` disk) and unusual target names are therefore reduced to
/// that alphabet ([`well_formed_id`]); names that already fit, as libvirt's do, are unchanged.
pub fn job_id(target: &str, top_node: &str) -> String {
    well_formed_id(&format!("backup-{target}-{top_node}"))
}

/// `raw` as a well-formed QMP identifier (QEMU's rule for job ids, node names and export
/// ids): a `#` (QEMU's mark of a generated name) is dropped, any other character outside
/// letters, digits, `-`, `_` and `.` becomes `_`, and an id that does not start with a letter
/// gets an `x` in front. Distinct inputs that differ only in such characters map to one id;
/// callers derive ids from names that are unique within what they build (a disk target).
pub fn well_formed_id(raw: &str) -> String {
    let mut id: String = raw
        .chars()
        .filter(|c| *c != '#')
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        id.insert(0, 'x');
    }
    id
}

/// Node names of a new image with storage index `index`.
pub fn node_names(index: u32) -> (String, String) {
    (
        format!("libvirt-{index}-format"),
        format!("libvirt-{index}-storage"),
    )
}

/// The storage index encoded in a node name `libvirt-<N>-...`, if it has one.
pub fn node_index(node_name: &str) -> Option<u32> {
    let rest = node_name.strip_prefix("libvirt-")?;
    let (n, _) = rest.split_once('-')?;
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_of_generated_node_names_are_well_formed_and_libvirt_names_unchanged() {
        assert_eq!(
            job_id("vda", "libvirt-1-format"),
            "backup-vda-libvirt-1-format"
        );
        assert_eq!(job_id("vdb", "#block107"), "backup-vdb-block107");
        assert_eq!(job_id("vdc", "a b/c"), "backup-vdc-a_b_c");
        assert_eq!(well_formed_id("#block1"), "block1");
        assert_eq!(well_formed_id("1x"), "x1x");
        assert_eq!(well_formed_id(""), "x");
    }

    fn disk(state: DiskJobState, cur: u64, total: u64, err: Option<&str>) -> BackupDiskPlan {
        BackupDiskPlan {
            target: "vda".into(),
            device_node: "libvirt-1-format".into(),
            device_path: None,
            incremental: None,
            store_kind: StoreKind::File,
            store_path: "/b/vda".into(),
            store_format: ImageFormat::Qcow2,
            index: 3,
            format_node: "libvirt-3-format".into(),
            storage_node: "libvirt-3-storage".into(),
            job_id: "backup-vda-libvirt-1-format".into(),
            temp_bitmap: None,
            temp_bitmap_node: None,
            export_name: None,
            export_id: None,
            created_by_us: true,
            state,
            progress_current_bytes: cur,
            progress_total_bytes: total,
            error: err.map(Into::into),
            target_closed: false,
        }
    }

    fn plan(mode: BackupMode, disks: Vec<BackupDiskPlan>) -> BackupPlan {
        BackupPlan {
            mode,
            incremental: None,
            server: None,
            tls_object: None,
            tls_secret_object: None,
            disks,
            skipped_disks: vec![],
            checkpoint: None,
            reuse_external: false,
            started_ms: 1000,
            start_error: None,
            stage: BackupStage::Running,
            checkpoint_def: None,
            created_files: vec![],
        }
    }

    #[test]
    fn aborted_pull_completes_but_aborted_push_is_cancelled() {
        let d = vec![disk(
            DiskJobState::Cancelled,
            0,
            10,
            Some("Operation canceled"),
        )];
        assert_eq!(
            plan(BackupMode::Pull, d.clone()).final_status(),
            DomainJobStatus::Completed
        );
        assert_eq!(
            plan(BackupMode::Push, d).final_status(),
            DomainJobStatus::Cancelled
        );
        let f = vec![
            disk(DiskJobState::Failed, 0, 10, Some("Input/output error")),
            disk(DiskJobState::Cancelled, 0, 10, None),
        ];
        assert_eq!(
            plan(BackupMode::Pull, f).final_status(),
            DomainJobStatus::Failed
        );
    }

    #[test]
    fn push_stats_report_processed_and_remaining() {
        let p = plan(
            BackupMode::Push,
            vec![
                disk(DiskJobState::Running, 30, 100, None),
                disk(DiskJobState::Complete, 50, 50, None),
            ],
        );
        let s = p.stats(1565, DomainJobStatus::Running);
        assert_eq!(s.time_elapsed_ms, 565);
        assert_eq!(s.disk_total_bytes, Some(150));
        assert_eq!(s.disk_processed_bytes, Some(80));
        assert_eq!(s.disk_remaining_bytes, Some(70));
        assert_eq!(s.disk_temp_used_bytes, None);
        assert_eq!(s.success, None);
    }

    #[test]
    fn finished_pull_stats_carry_temp_space_success_and_first_error() {
        let p = plan(
            BackupMode::Pull,
            vec![disk(
                DiskJobState::Cancelled,
                65536,
                100,
                Some("Operation canceled"),
            )],
        );
        let s = p.stats(2000, p.final_status());
        assert_eq!(s.disk_temp_used_bytes, Some(65536));
        assert_eq!(s.success, Some(true));
        assert_eq!(s.errmsg.as_deref(), Some("Operation canceled"));
        assert_eq!(s.disk_total_bytes, None);
    }

    #[test]
    fn node_index_reads_libvirt_node_names() {
        assert_eq!(node_index("libvirt-12-format"), Some(12));
        assert_eq!(node_index("#block123"), None);
        assert_eq!(node_names(4).0, "libvirt-4-format");
    }
}
