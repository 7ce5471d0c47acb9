//! Push targets hashed while they are written out: once QEMU closed a target, the engine asks
//! for its fsync; the target's block hashes are taken beside that fsync, from the pages still
//! in memory, so that the digest of a managed backup costs no read of its own afterwards.
//!
//! Only a target without a backing file is hashed here (a full backup: every block it holds is
//! its own). An incremental target is hashed later, from its parent's block hashes and its own
//! blocks, once its backing file is set ([`vbackup_qemu::digest::block_hashes`]).

use std::collections::BTreeMap;
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
}

impl TargetHashes {
    /// Nothing hashed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts hashing the closed target at `path` on a thread of its own, if it is an image
    /// without a backing file.
    pub fn start(&self, path: &str) {
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
        let hashes = handle.join().ok().flatten()?;
        let layers = images::chain_layers(Path::new(path)).ok()?;
        layers
            .first()
            .filter(|l| l.backing.is_none() && l.virtual_size_bytes == hashes.size())
            .map(|_| hashes)
    }
}

fn hash(path: &str, format: &ImageFormat) -> Option<BlockHashes> {
    let kind = DigestKind::NEW_IMAGES;
    digest::block_hashes(Path::new(path), format, kind, None, &mut |_| {}).ok()
}
