//! The work the managed-backup machine hands to its runtime, and what comes back.

use crate::catalogue::{Digest, DigestKind, ManagedBackup};
use crate::model::ImageFormat;
use crate::protocol::{Reply, Request};

use super::journal::Journal;

/// Identifies an effect so its result can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EffectId(pub u64);

/// One piece of file, store or domain work. The runtime carries it out and answers with
/// [`super::ManagedInput::Done`]. The machine has at most one effect outstanding.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Create exactly this directory. With `parents` false its parent must exist (a backup
    /// target directory is never created: a vanished mount point must not be replaced by a
    /// directory on the root file system).
    CreateDir {
        /// Absolute path.
        path: String,
        /// Create missing parents too (`mkdir -p`).
        parents: bool,
    },
    /// Remove an empty directory; a missing one is fine.
    RemoveDir {
        /// Absolute path.
        path: String,
    },
    /// Create an empty image of `size_bytes`. With `like`, the new image copies that existing
    /// image's format creation options (qcow2 cluster size, lazy refcounts, ...) and its
    /// owner, group and mode; the runtime reads them from the file.
    CreateImage {
        /// Absolute path; must not exist.
        path: String,
        /// Format of the new image (ignored with `like`, whose format is kept).
        format: ImageFormat,
        /// Guest-visible size.
        size_bytes: u64,
        /// The existing image whose options and ownership to copy.
        like: Option<String>,
    },
    /// Change an image's backing file. `unsafe_rebase`: only the header changes
    /// (`qemu-img rebase -u`); otherwise the guest-visible content is kept.
    Rebase {
        /// The image.
        path: String,
        /// Its new backing image (qcow2), `None` for none.
        backing: Option<String>,
        /// Change the header only.
        unsafe_rebase: bool,
    },
    /// Read an image's guest-visible content through its backing chain: answered with
    /// [`Outcome::Facts`].
    Digest {
        /// The image.
        path: String,
        /// The kind of digest wanted: a recorded one's kind when checking it, the
        /// [`DigestKind::NEW_IMAGES`] of every new image otherwise.
        kind: DigestKind,
        /// For an image vbackup just wrote on top of a recorded parent image: that image and
        /// its digest. The blocks the new image does not hold itself are the parent's, so
        /// their hashes may come from the parent's block hashes (when kept and matching its
        /// digest) instead of being read again. `None` when checking: then every block that
        /// is not known to be zero is read.
        base: Option<DigestBase>,
    },
    /// Copy an image's guest-visible content (through its backing chain) into `into`, then
    /// read `into` back: answered with [`Outcome::Facts`] of `into`. With `existing`, `into`
    /// was created before (by [`Effect::CreateImage`]) and is written in place; otherwise it
    /// is created with `format` and must not exist.
    DigestCopy {
        /// The image read.
        source: String,
        /// The image written.
        into: String,
        /// Format of a new `into`.
        format: ImageFormat,
        /// `into` exists already.
        existing: bool,
        /// The kind of digest wanted of `into` (the recorded digest's it is checked against).
        kind: DigestKind,
    },
    /// Read one export of the running pull backup into a new qcow2 image: every allocated
    /// extent (full), or with `dirty_bitmap` only the extents that bitmap marks (then
    /// `backing` is the parent backup's image of the disk).
    CopyPull {
        /// The NBD export name.
        export: String,
        /// The dirty-bitmap meta context's bitmap for an incremental copy.
        dirty_bitmap: Option<String>,
        /// The image written; must not exist.
        into: String,
        /// The backing image of `into`.
        backing: Option<String>,
    },
    /// Rename a file, atomically and durably (the directory is synced). With `replace`
    /// false an existing `to` is refused. A missing `from` answers
    /// [`EffectError::NotFound`].
    Rename {
        /// Current path.
        from: String,
        /// New path.
        to: String,
        /// Replace an existing `to`.
        replace: bool,
    },
    /// Write a file's data and metadata to storage.
    Sync {
        /// Absolute path.
        path: String,
    },
    /// Remove a file; a missing one is fine.
    Remove {
        /// Absolute path.
        path: String,
    },
    /// Write (atomically) a backup's record.
    PutRecord(Box<ManagedBackup>),
    /// Delete a backup's record file (`<uuid>.xml`); a missing one is fine.
    DeleteRecord {
        /// The backup.
        uuid: String,
    },
    /// Record the domain's default target directory.
    SetDefaultTarget(Option<String>),
    /// Write (atomically) the journal of the operation in flight.
    PutJournal(Box<Journal>),
    /// Remove the journal: no operation is in flight.
    ClearJournal,
    /// Whether a file exists: answered with [`Outcome::Exists`].
    Exists {
        /// Absolute path.
        path: String,
    },
    /// Whether a domain of this name is defined: answered with [`Outcome::Exists`].
    DomainExists {
        /// The name.
        name: String,
    },
    /// Define a new domain over restored images; refused when the name exists.
    DefineDomain {
        /// The new domain's name.
        name: String,
        /// `(disk target, image path, format)`.
        disks: Vec<(String, String, ImageFormat)>,
    },
    /// A request to this domain's engine, answered with [`Outcome::Reply`].
    Domain(Request),
}

/// What an image holds, read through its backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// Guest-visible size.
    pub virtual_size_bytes: u64,
    /// Bytes the image file itself occupies.
    pub allocated_size_bytes: u64,
    /// Digest of the guest-visible content.
    pub digest: Digest,
    /// The image's format.
    pub format: ImageFormat,
}

/// A successful effect.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done, nothing to report.
    Done,
    /// An image's facts ([`Effect::Digest`], [`Effect::DigestCopy`]).
    Facts(ImageFacts),
    /// An existence check's answer.
    Exists(bool),
    /// The domain's answer.
    Reply(Reply),
}

/// A failed effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EffectError {
    /// A file it needs does not exist.
    #[error("'{0}' does not exist")]
    NotFound(String),
    /// The host refused or failed.
    #[error("{0}")]
    Failed(String),
    /// The domain's engine refused the request.
    #[error("{0}")]
    Domain(String),
}

/// A recorded image a new image is built on ([`Effect::Digest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestBase {
    /// The parent image (the new image's backing file).
    pub path: String,
    /// Its recorded digest.
    pub digest: Digest,
}
