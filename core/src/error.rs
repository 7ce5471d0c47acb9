//! Typed errors of the engine, sorted by who is at fault.
//!
//! Every refusal the engine returns names its cause precisely enough for a caller to act on it:
//! a bad request is the caller's to fix, a conflict names the job that holds the lock, a QEMU
//! refusal carries QEMU's own class and text, a misbehaving QEMU is a protocol violation, and a
//! store failure is the driver's.

use thiserror::Error;

/// An error of a domain operation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// The request is wrong or does not fit the domain's current state; the caller can fix it.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Another job holds what the request needs; retry once it has ended.
    #[error(transparent)]
    Conflict(#[from] ConflictError),
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {desc}")]
    QemuRefused {
        /// The QMP command that was refused.
        command: String,
        /// QEMU's error class (`GenericError` for nearly everything).
        class: String,
        /// QEMU's error text.
        desc: String,
    },
    /// QEMU broke the protocol or reported something impossible (a reply of the wrong shape, a
    /// job that vanished).
    #[error("QEMU misbehaved: {0}")]
    QemuMisbehaved(String),
    /// The link to QEMU went down while the operation needed it.
    #[error("connection to QEMU lost during {0}")]
    LinkLost(String),
    /// The driver could not carry out a store or file operation.
    #[error("store failed: {0}")]
    Store(String),
}

/// A request that cannot be carried out as asked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// No checkpoint of that name exists.
    #[error("no domain checkpoint with matching name '{0}'")]
    NoCheckpoint(String),
    /// The checkpoint is a root.
    #[error("checkpoint '{0}' does not have a parent")]
    NoParent(String),
    /// A checkpoint of that name already exists.
    #[error("domain moment {0} already exists")]
    CheckpointExists(String),
    /// A redefined checkpoint names a parent that does not exist.
    #[error("parent {parent} for moment {name} not found")]
    ParentNotFound {
        /// The checkpoint being redefined.
        name: String,
        /// The missing parent.
        parent: String,
    },
    /// A redefined checkpoint names itself as parent.
    #[error("cannot set moment {0} as its own parent")]
    OwnParent(String),
    /// A redefined checkpoint's parent is one of its descendants.
    #[error("parent {parent} would create cycle to {name}")]
    ParentCycle {
        /// The checkpoint being redefined.
        name: String,
        /// The parent that is its descendant.
        parent: String,
    },
    /// The checkpoint's bitmap chain on a disk is missing or broken (libvirt's
    /// `VIR_ERR_CHECKPOINT_INCONSISTENT`).
    #[error("missing or broken bitmap '{bitmap}' for disk '{disk}'")]
    CheckpointInconsistent {
        /// The bitmap name.
        bitmap: String,
        /// The disk target.
        disk: String,
    },
    /// Deleting a checkpoint whose bitmap is in no layer of the disk (only metadata-only deletion
    /// can remove such a checkpoint).
    #[error("bitmap '{bitmap}' not found in backing chain of '{disk}'")]
    BitmapNotInChain {
        /// The bitmap name.
        bitmap: String,
        /// The disk target.
        disk: String,
    },
    /// The incremental source of a disk names a checkpoint that does not exist.
    #[error("Checkpoint '{checkpoint}' for incremental backup of disk '{disk}' not found")]
    IncrementalCheckpointMissing {
        /// The checkpoint name.
        checkpoint: String,
        /// The disk target.
        disk: String,
    },
    /// A disk name that the domain does not have.
    #[error("no disk named '{0}'")]
    NoDisk(String),
    /// The configuration asks for something the engine does not support.
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// Flags that cannot be combined, or a flag that is not supported.
    #[error("invalid flags: {0}")]
    InvalidFlags(String),
    /// The operation needs a running domain (a live QEMU connection).
    #[error("domain is not running")]
    NotRunning,
    /// There is no backup job.
    #[error("no domain backup job present")]
    NoBackup,
    /// There is no job to abort.
    #[error("no job is active on the domain")]
    NoJob,
    /// The backup was aborted while it was being started.
    #[error("backup aborted before it started")]
    Aborted,
    /// A pull backup's `<server>` is not the NBD server QEMU already runs for the domain (a
    /// process runs one NBD server; a managed domain's daemon serves its guest exports on it),
    /// so a client connecting where the backup asked would not reach the exports.
    #[error(
        "unsupported configuration: the domain's NBD server already runs at {running}, but the backup asks for {requested}; name that server in <server> (or give none)"
    )]
    NbdServerInUse {
        /// The running server's address.
        running: String,
        /// The address the backup asked for.
        requested: String,
    },
    /// No TCP port was given and the configured range has none free.
    #[error("no free TCP port in {min}..={max} for the NBD server")]
    NoFreePort {
        /// Lowest port of the range.
        min: u16,
        /// Highest port of the range.
        max: u16,
    },
}

/// What holds the lock a request needed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConflictError {
    /// The domain job slot is taken.
    #[error("domain job busy: held by {holder}")]
    DomainJob {
        /// Description of the job holding the slot (`backup`, `checkpoint-create c1`...).
        holder: String,
    },
    /// A disk is in use by a block job.
    #[error("disk '{disk}' already in active block job {holder}")]
    DiskBusy {
        /// The disk target.
        disk: String,
        /// The block job holding it.
        holder: String,
    },
}

impl Error {
    /// A short, stable name of the error's category, for logs and `--json` output.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Request(_) => "request",
            Error::Conflict(_) => "conflict",
            Error::QemuRefused { .. } => "qemu-refused",
            Error::QemuMisbehaved(_) => "qemu-misbehaved",
            Error::LinkLost(_) => "link-lost",
            Error::Store(_) => "store",
        }
    }
}
