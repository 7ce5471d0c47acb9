//! The driver's [`Effects`] over the on-disk store: metadata goes to the domain's directory
//! with atomic writes, image files are created exclusively and removed on the local host (where
//! qemu-storage-daemon or QEMU runs), and the last finished job's statistics are kept so a
//! later invocation can answer `domjobinfo --completed`.

pub use crate::layout::{COMPLETED_FILE, CURRENT_FILE, PENDING_CHECKPOINT_FILE, PROGRESS_FILE};
use std::fs::{self, OpenOptions};
use std::io;

use vbackup_core::checkpoint::Checkpoint;
use vbackup_core::domain::{DomainEvent, FileError, FileErrorKind, FileOp, StoreOp};
use vbackup_core::driver::Effects;
use vbackup_core::xml::CheckpointFormat;
use vbackup_qemu::store::{Collection, DomainStore, validate_name, write_atomic};

use crate::checkpoint_index;
use crate::target_hashes::TargetHashes;

/// Store-backed effects of one locked domain.
#[derive(Debug)]
pub struct StoreEffects {
    store: DomainStore,
    /// Events seen during this invocation, in order.
    pub events: Vec<DomainEvent>,
    /// A checkpoint file or the current checkpoint could not be written: the files may not
    /// say what the engine holds, so no index is written for them.
    store_failed: bool,
    /// Whether a checkpoint file changed (the index was removed then).
    checkpoints_changed: bool,
    /// Checkpoint files were removed and the directory not yet synced: the removals of one
    /// request share one directory fsync, done before any other write and before the request
    /// is answered ([`StoreEffects::sync_removals`]).
    removals_unsynced: bool,
    /// Where push targets are hashed beside their fsync, when a managed backup wants their
    /// digest.
    target_hashes: Option<TargetHashes>,
}

impl StoreEffects {
    /// Effects writing into `store`.
    pub fn new(store: DomainStore) -> Self {
        Self {
            store,
            events: Vec::new(),
            store_failed: false,
            checkpoints_changed: false,
            removals_unsynced: false,
            target_hashes: None,
        }
    }

    /// Hashes every push target without a backing file beside its fsync, into `hashes`.
    pub fn hash_targets(&mut self, hashes: TargetHashes) {
        self.target_hashes = Some(hashes);
    }

    /// Makes the checkpoint removals done so far durable (one fsync of their directory).
    pub fn sync_removals(&mut self) -> Result<(), String> {
        if !self.removals_unsynced {
            return Ok(());
        }
        let dir = self.store.dir().join("checkpoints");
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync '{}': {e}", dir.display()))?;
        self.removals_unsynced = false;
        Ok(())
    }

    /// Removes `checkpoints/<name>.xml` without syncing the directory yet.
    fn remove_checkpoint_file(&mut self, name: &str) -> Result<(), String> {
        validate_name("checkpoint", name).map_err(|e| e.to_string())?;
        let path = self
            .store
            .dir()
            .join("checkpoints")
            .join(format!("{name}.xml"));
        match fs::remove_file(&path) {
            Ok(()) => {
                self.removals_unsynced = true;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove '{}': {e}", path.display())),
        }
    }

    /// Writes the checkpoint index once this invocation changed checkpoint files, from
    /// `checkpoints`: the engine's checkpoints at the end, which the files now hold. Nothing
    /// is written when a store write failed (the next load then parses the files).
    pub fn write_index<'a>(&mut self, checkpoints: impl IntoIterator<Item = &'a Checkpoint>) {
        if self.checkpoints_changed && !self.store_failed {
            checkpoint_index::write(&self.store, checkpoints);
            self.checkpoints_changed = false;
        }
    }

    /// Notes a checkpoint file about to change: the index no longer describes the files.
    fn checkpoints_changing(&mut self) {
        if !self.checkpoints_changed {
            self.checkpoints_changed = true;
            checkpoint_index::remove(&self.store);
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

/// Replaces `dir/file_name` atomically (temporary file and rename) without syncing: after a
/// crash the file holds the old or the new content, or (on file systems that do not order the
/// rename after the data) is empty.
fn replace_file(
    dir: &std::path::Path,
    file_name: &str,
    bytes: &[u8],
) -> Result<(), vbackup_qemu::store::StoreError> {
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let r = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, dir.join(file_name)));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(|e| vbackup_qemu::store::StoreError::Io {
        op: "write",
        path: dir.join(file_name),
        source: e,
    })
}

impl Drop for StoreEffects {
    fn drop(&mut self) {
        // Best effort here: `Session::call` synced after each request already. An index not
        // written by `write_index` stays removed; the next load rebuilds it.
        let _ = self.sync_removals();
    }
}

impl Effects for StoreEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        // Removals are durable before anything written after them.
        if !matches!(op, StoreOp::DeleteCheckpoint(_)) {
            self.sync_removals()?;
        }
        let r = match op {
            StoreOp::PutCheckpoint(c) => {
                self.checkpoints_changing();
                let r =
                    self.store
                        .write_entry(Collection::Checkpoints, &c.name, &checkpoint_xml(c));
                self.store_failed |= r.is_err();
                r
            }
            StoreOp::DeleteCheckpoint(name) => {
                self.checkpoints_changing();
                let r = self.remove_checkpoint_file(name);
                self.store_failed |= r.is_err();
                return r;
            }
            StoreOp::SetCurrentCheckpoint(current) => {
                let r = write_atomic(
                    self.store.dir(),
                    CURRENT_FILE,
                    current.as_deref().unwrap_or("").as_bytes(),
                );
                self.store_failed |= r.is_err();
                r
            }
            StoreOp::PutBackupJournal(plan) => {
                let json = serde_json::to_string_pretty(plan).map_err(|e| e.to_string())?;
                self.store.write_journal(&json)
            }
            StoreOp::DeleteBackupJournal => {
                // Best effort: a stale progress file is ignored once its job's journal is gone.
                let _ = fs::remove_file(self.store.dir().join(PROGRESS_FILE));
                self.store.remove_journal().map(|_| ())
            }
            StoreOp::SetPendingCheckpoints(pending) if pending.is_empty() => {
                // Clearing the record need not be durable (it saves two of a create's fsyncs):
                // a record that comes back after a crash names checkpoints whose metadata was
                // written first, which the reconcile never treats as orphans, and every
                // reconcile pass clears the record again.
                replace_file(self.store.dir(), PENDING_CHECKPOINT_FILE, b"[]")
            }
            StoreOp::SetPendingCheckpoints(pending) => {
                let json = serde_json::to_string(pending).map_err(|e| e.to_string())?;
                write_atomic(self.store.dir(), PENDING_CHECKPOINT_FILE, json.as_bytes())
            }
        };
        r.map_err(|e| e.to_string())
    }

    fn file(&mut self, op: &FileOp) -> Result<(), FileError> {
        let path = match op {
            FileOp::CreateExclusive { path } | FileOp::Remove { path } | FileOp::Sync { path } => {
                path
            }
        };
        self.sync_removals()
            .map_err(|m| FileError::other(path, m))?;
        let io_error = |what: &str, e: io::Error| {
            FileError::new(
                FileErrorKind::from_io(e.kind()),
                path,
                format!("cannot {what} '{path}': {e}"),
            )
        };
        match op {
            FileOp::CreateExclusive { .. } => OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(|_| ())
                .map_err(|e| io_error("create", e)),
            FileOp::Remove { .. } => match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error("remove", e)),
            },
            FileOp::Sync { .. } => {
                if let Some(hashes) = &self.target_hashes {
                    hashes.start(path);
                }
                vbackup_qemu::writeout::sync_target(path).map_err(|m| FileError::other(path, m))
            }
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
