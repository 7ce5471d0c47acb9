//! The driver's [`Effects`] over the on-disk store: metadata goes to the domain's directory
//! with atomic writes, image files are created exclusively and removed on the local host (where
//! qemu-storage-daemon or QEMU runs), and the last finished job's statistics are kept so a
//! later invocation can answer `domjobinfo --completed`.

use std::fs::{self, OpenOptions};
use std::io;

use vbackup_core::checkpoint::Checkpoint;
use vbackup_core::domain::{DomainEvent, FileOp, StoreOp};
use vbackup_core::driver::Effects;
use vbackup_core::xml::CheckpointFormat;
use vbackup_qemu::store::{Collection, DomainStore, write_atomic};

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

/// Store-backed effects of one locked domain.
#[derive(Debug)]
pub struct StoreEffects {
    store: DomainStore,
    /// Events seen during this invocation, in order.
    pub events: Vec<DomainEvent>,
}

impl StoreEffects {
    /// Effects writing into `store`.
    pub fn new(store: DomainStore) -> Self {
        Self {
            store,
            events: Vec::new(),
        }
    }

    /// The locked domain store.
    pub fn store(&self) -> &DomainStore {
        &self.store
    }
}

/// A checkpoint as stored: its full definition, sizes left out (they are only ever computed).
pub fn checkpoint_xml(checkpoint: &Checkpoint) -> String {
    let mut def = checkpoint.to_def();
    for disk in &mut def.disks {
        disk.size_bytes = None;
    }
    def.format(CheckpointFormat::default())
}

impl Effects for StoreEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        let r = match op {
            StoreOp::PutCheckpoint(c) => {
                self.store
                    .write_entry(Collection::Checkpoints, &c.name, &checkpoint_xml(c))
            }
            StoreOp::DeleteCheckpoint(name) => self
                .store
                .remove_entry(Collection::Checkpoints, name)
                .map(|_| ()),
            StoreOp::SetCurrentCheckpoint(current) => write_atomic(
                self.store.dir(),
                CURRENT_FILE,
                current.as_deref().unwrap_or("").as_bytes(),
            ),
            StoreOp::PutBackupJournal(plan) => {
                let json = serde_json::to_string_pretty(plan).map_err(|e| e.to_string())?;
                self.store.write_journal(&json)
            }
            StoreOp::DeleteBackupJournal => {
                // Best effort: a stale progress file is ignored once its job's journal is gone.
                let _ = fs::remove_file(self.store.dir().join(PROGRESS_FILE));
                self.store.remove_journal().map(|_| ())
            }
            StoreOp::SetPendingCheckpoints(pending) => {
                let json = serde_json::to_string(pending).map_err(|e| e.to_string())?;
                write_atomic(self.store.dir(), PENDING_CHECKPOINT_FILE, json.as_bytes())
            }
        };
        r.map_err(|e| e.to_string())
    }

    fn file(&mut self, op: &FileOp) -> Result<(), String> {
        match op {
            FileOp::CreateExclusive { path } => OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(|_| ())
                .map_err(|e| format!("cannot create '{path}': {e}")),
            FileOp::Remove { path } => match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("cannot remove '{path}': {e}")),
            },
            FileOp::Sync { path } => vbackup_qemu::writeout::sync_target(path),
        }
    }

    fn event(&mut self, event: &DomainEvent) {
        if let DomainEvent::JobCompleted(stats) = event
            && let Ok(json) = serde_json::to_string_pretty(stats)
        {
            // Best effort: losing it only loses `domjobinfo --completed` output.
            let _ = write_atomic(self.store.dir(), COMPLETED_FILE, json.as_bytes());
        }
        self.events.push(event.clone());
    }
}
