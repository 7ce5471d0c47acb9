//! Push targets hashed while they are written out: once QEMU closed a target, the engine asks
//! for its fsync; the target's block hashes are taken beside that fsync, from the pages still
//! in memory, so that the digest of a managed backup costs no read of its own afterwards.
//!
//! Only a target without a backing file is hashed here (a full backup: every block it holds is
//! its own). An incremental target is hashed later, from its parent's block hashes and its own
//! blocks, once its backing file is set ([`vbackup_qemu::digest::block_hashes`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vbackup_core::catalogue::{BlockHashes, DigestKind};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::digest;
use vbackup_qemu::images;

type Hashing = JoinHandle<Option<BlockHashes>>;

/// Targets being hashed, by path; shared by the session's effects (which start the hashing)
/// and the managed runtime (which takes the result for the target's digest).
#[derive(Debug, Clone, Default)]
pub struct TargetHashes {
    hashing: Arc<Mutex<BTreeMap<String, Hashing>>>,
    /// The targets to hash: those of the full backup in flight.
    wanted: Arc<Mutex<BTreeSet<String>>>,
}

impl TargetHashes {
    /// Nothing hashed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The targets [`TargetHashes::start`] hashes from now on (those of a full backup: an
    /// incremental's are hashed from their parent's hashes once their backing file is set).
    pub fn want(&self, paths: impl IntoIterator<Item = String>) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        *wanted = paths.into_iter().collect();
    }

    /// Starts hashing the closed target at `path` on a thread of its own, if it is wanted and
    /// an image without a backing file.
    pub fn start(&self, path: &str) {
        let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !wanted.contains(path) {
            return;
        }
        drop(wanted);
        let Ok(layers) = images::chain_layers(Path::new(path)) else {
            return;
        };
        let Some(top) = layers.first().filter(|l| l.backing.is_none()) else {
            return;
        };
        let (owned, format) = (path.to_owned(), top.format.clone());
        let handle = std::thread::spawn(move || hash(&owned, &format));
        let mut hashing = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
        hashing.insert(path.to_owned(), handle);
    }

    /// The block hashes of the target at `path`, if it was hashed here and still has no
    /// backing file (its content is then what was hashed: nothing writes a closed target).
    pub fn take(&self, path: &str) -> Option<BlockHashes> {
        let handle = {
            let mut hashing = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
            hashing.remove(path)?
        };
        // An image that got a backing file since (an incremental) is not what was hashed: its
        // hashing is left to end by itself, unwaited.
        let layers = images::chain_layers(Path::new(path)).ok()?;
        let top = layers.first().filter(|l| l.backing.is_none())?;
        let hashes = handle.join().ok().flatten()?;
        (top.virtual_size_bytes == hashes.size()).then_some(hashes)
    }
}

fn hash(path: &str, format: &ImageFormat) -> Option<BlockHashes> {
    let kind = DigestKind::NEW_IMAGES;
    digest::block_hashes(Path::new(path), format, kind, None, &mut |_| {}).ok()
}
