//! The state directory's layout, in one place: every file vbackup keeps, and where.
//!
//! ```text
//! <state>/vbackup.conf                       host configuration (config)
//! <state>/domains/<name>/domain.xml          the definition (vbackup_qemu::store)
//! <state>/domains/<name>/vbackup.json        managed or attached (QMP socket)
//! <state>/domains/<name>/checkpoints/*.xml   one document per checkpoint (vbackup_qemu::store)
//! <state>/domains/<name>/checkpoint-index.json   the parsed checkpoints, stamped (checkpoint_index)
//! <state>/domains/<name>/backup-index.json   the parsed backup records, stamped (catalogue_index)
//! <state>/domains/<name>/current-checkpoint  the current checkpoint's name
//! <state>/domains/<name>/pending-checkpoint  checkpoints whose bitmaps are being created
//! <state>/domains/<name>/journal.json        the running job's journal (vbackup_qemu::store)
//! <state>/domains/<name>/managed-journal.json  the managed-backup operation in flight (managed_runtime)
//! <state>/domains/<name>/job-progress.json   the running job's last polled statistics
//! <state>/domains/<name>/completed-job.json  the last finished job's statistics
//! <state>/domains/<name>/drift-reported      drift warnings last printed in full
//! <state>/domains/<name>/block-hashes/<hex>.blocks  block hashes of a backup image's digest (vbackup_qemu::digest)
//! <state>/run/<name>/                        the managed daemon's sockets and pid file (vbackup_qemu::qsd)
//! <state>/run/<name>/keep-running            the daemon stays up until `shutdown`
//! <state>/run/<name>/in-step                 the daemon (pid, start time) holds what the store describes
//! ```
//! The locking, atomic writes and the directory walk stay with `vbackup_qemu::store`, which
//! owns the names it reads itself (`domain.xml`, `journal.json`, `checkpoints/`).

use std::path::{Path, PathBuf};

/// The directory of domain `name` in the state directory `root`.
pub fn domain_dir(root: &Path, name: &str) -> PathBuf {
    root.join("domains").join(name)
}

/// The configuration file, at the root of the state directory.
pub const CONFIG_FILE: &str = "vbackup.conf";
/// A domain's definition.
pub const DOMAIN_FILE: &str = "domain.xml";
/// The running job's journal.
pub const JOURNAL_FILE: &str = "journal.json";
/// The journal of the managed-backup operation in flight (`vbackup_core::managed::Journal`).
pub const MANAGED_JOURNAL_FILE: &str = "managed-journal.json";
/// Per-domain settings of vbackup itself, beside `domain.xml`.
pub const META_FILE: &str = "vbackup.json";
/// In a managed domain's run directory: the daemon was started with `start` and stays up
/// (the "running guest") until `shutdown`.
pub const KEEP_FILE: &str = "keep-running";
/// In a managed domain's run directory: the identity of the daemon (its pid and start time)
/// that the last session left holding exactly what the store describes. The next session
/// removes it before talking to the daemon and, when the identity still matches, skips its
/// reconcile pass; a session that ends in step writes it again. A crashed invocation thus
/// leaves none behind, and a machine crash takes the daemon (and so the identity) with it,
/// which is why it is written without fsync.
pub const IN_STEP_FILE: &str = "in-step";
/// File of the current checkpoint's name (empty: none).
pub const CURRENT_FILE: &str = "current-checkpoint";
/// File of the last finished job's statistics (JSON).
pub const COMPLETED_FILE: &str = "completed-job.json";
/// File of the checkpoints whose bitmaps are being created: a JSON array of names (an older
/// store holds one bare name, or nothing).
pub const PENDING_CHECKPOINT_FILE: &str = "pending-checkpoint";
/// File of the running job's statistics as last polled by the invocation following it:
/// `{"started_ms": N, "stats": {...}}`. Removed with the job's journal.
pub const PROGRESS_FILE: &str = "job-progress.json";
/// Directory of the block hashes behind backup images' tree digests (`blake3-tree`, `sha256-tree`), one file per
/// digest, so an incremental reads only the blocks it holds itself.
pub const BLOCK_HASHES_DIR: &str = "block-hashes";
/// The backup index (a cache of the parsed managed-backup records).
pub const BACKUP_INDEX_FILE: &str = "backup-index.json";
/// The checkpoint index (a cache of the parsed checkpoint documents).
pub const INDEX_FILE: &str = "checkpoint-index.json";
/// File in a domain's store holding the drift warnings last printed in full.
pub const DRIFT_REPORTED_FILE: &str = "drift-reported";
