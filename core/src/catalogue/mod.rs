//! The catalogue of managed backups: finished backups of one domain, their parent chains and
//! their images, and the decisions about them (insert, list, delete, restore planning).
//!
//! Contract:
//! - Pure: no IO. Every mutation returns the [`CatalogueOp`]s the caller must apply, in order,
//!   for the store and the image files to follow. The order is chosen so that a crash between
//!   two operations never leaves a record naming a missing image: images are rebased and
//!   records rewritten first, the checkpoints of deleted backups deleted next, then records,
//!   files last (at worst a crash leaves an unreferenced file behind, or a backup about to be
//!   deleted whose checkpoint is already gone; repeating the deletion finishes it).
//! - The order of backups ([`Catalogue::list`], [`Catalogue::latest`]) is total and the same on
//!   every load: by sequence number, older unnumbered records first by creation time and depth.
//! - Deleting a backup deletes the checkpoint it created, which only served as the base of
//!   later incrementals from it; a checkpoint of a backup that remains always stays.
//! - A catalogue is a forest: every incremental backup names a parent that exists in the same
//!   catalogue, full backups have none, uuids are unique and so every chain ends at a full
//!   backup after at most [`MAX_CHAIN_LENGTH`] steps.
//! - An incremental backup has an image for a subset of its parent's disks, each image a qcow2
//!   overlay whose backing file is the parent's image of the same disk; so the images of one
//!   disk along a chain form a qcow2 backing chain.
//! - No two backups share an image path, so deleting one never removes another's file.
//! - Errors are [`CatalogueError`] values; no input panics.

mod damaged;
mod index;
mod record;
mod restore;
mod tree;
mod xml;

pub use xml::GRAMMAR;

pub use damaged::{DamagedRecord, StoredRecord};
pub use index::{BackupListFilter, Catalogue, CatalogueOp, DeleteMode, find_backup};
pub use record::{
    BackupImage, BackupKind, Digest, DigestKind, ManagedBackup, TREE_BLOCK_BYTES, validate_uuid,
};
pub use restore::{DiskRestore, RestorePlan};
pub use tree::{BlockHashes, block_count, block_hash, block_len, zero_block_hash};

/// The longest parent chain accepted, root included. Chain walks stop there, so a corrupted
/// store cannot make them loop.
pub const MAX_CHAIN_LENGTH: usize = 1024;

/// Why the catalogue refused something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// The uuid is not a canonical lowercase uuid.
    #[error("invalid backup uuid '{0}': expected the form 01234567-89ab-cdef-0123-456789abcdef")]
    InvalidUuid(String),
    /// A backup with this uuid is already catalogued.
    #[error("backup '{0}' already exists")]
    Duplicate(String),
    /// No backup has this uuid.
    #[error("no backup with uuid '{0}'")]
    NotFound(String),
    /// The backup belongs to another domain than this catalogue's.
    #[error("backup '{uuid}' belongs to domain '{found}', not '{expected}'")]
    WrongDomain {
        /// The backup.
        uuid: String,
        /// This catalogue's domain.
        expected: String,
        /// The backup's domain.
        found: String,
    },
    /// The parent of an incremental backup is not catalogued.
    #[error("parent backup '{parent}' of '{uuid}' does not exist")]
    MissingParent {
        /// The backup.
        uuid: String,
        /// Its missing parent.
        parent: String,
    },
    /// The record contradicts itself or its parent (a full backup with a parent, an
    /// incremental one without, no disks, a disk twice, a disk the parent lacks...).
    #[error("backup '{uuid}' is inconsistent: {reason}")]
    Inconsistent {
        /// The backup.
        uuid: String,
        /// What is wrong, in a sentence.
        reason: String,
    },
    /// An image path is already used by another backup.
    #[error("image '{path}' is already used by backup '{owner}'")]
    ImageInUse {
        /// The path.
        path: String,
        /// The backup using it.
        owner: String,
    },
    /// The chain would be longer than [`MAX_CHAIN_LENGTH`].
    #[error("the chain of backup '{0}' is longer than {MAX_CHAIN_LENGTH} backups")]
    ChainTooLong(String),
    /// Deleting the backup alone would orphan the backups built on it.
    #[error("backup '{uuid}' has {} dependent backup(s) ({}); delete them too or rebase them", children.len(), children.join(", "))]
    HasChildren {
        /// The backup.
        uuid: String,
        /// Its children's uuids.
        children: Vec<String>,
    },
    /// A disk asked for is not in the backup.
    #[error("backup '{uuid}' has no image of disk '{disk}'")]
    NoSuchDisk {
        /// The backup.
        uuid: String,
        /// The disk.
        disk: String,
    },
    /// The backup asked for by `--until` is neither an ancestor nor a descendant of the
    /// backup named, so there is no chain holding both.
    #[error(
        "backup '{until}' is not in the chain of backup '{uuid}' (neither an ancestor nor a descendant of it)"
    )]
    NotInChain {
        /// The backup named.
        uuid: String,
        /// The point in time asked for.
        until: String,
    },
    /// The default target directory is not an absolute path.
    #[error("default target '{0}' is not an absolute path")]
    RelativeTarget(String),
}
