//! What the host runtime fails with, sorted by where the failure comes from. The command line
//! words each for the user (virsh's categories for engine errors) and turns it into an exit code.

/// Every failure of the host runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine refused or failed a request.
    #[error("{0}")]
    Engine(#[from] vbackup_core::error::Error),
    /// The driver stopped (link lost, store write failed).
    #[error("{0}")]
    Drive(#[from] vbackup_core::driver::DriveError),
    /// The store.
    #[error("{0}")]
    Store(#[from] vbackup_qemu::store::StoreError),
    /// qemu-storage-daemon.
    #[error("{0}")]
    Qsd(#[from] vbackup_qemu::qsd::QsdError),
    /// QMP.
    #[error("{0}")]
    Qmp(#[from] vbackup_qemu::qmp_socket::QmpSocketError),
    /// Discovering an attached domain's disks.
    #[error("{0}")]
    Discover(#[from] vbackup_qemu::discover::DiscoverError),
    /// An XML document.
    #[error("XML error: {0}")]
    Xml(#[from] vbackup_core::xml::XmlError),
    /// NBD.
    #[error("NBD: {0}")]
    Nbd(#[from] vbackup_qemu::nbd::NbdError),
    /// The managed-backup machine refused or failed a request.
    #[error("{0}")]
    Managed(#[from] vbackup_core::managed::ManagedError),
    /// A request about the catalogue of managed backups is invalid.
    #[error("invalid argument: {0}")]
    Catalogue(#[from] vbackup_core::catalogue::CatalogueError),
    /// No such domain.
    #[error("failed to get domain '{0}'")]
    NoDomain(String),
    /// `define` of a name another domain already has.
    #[error(
        "operation failed: domain '{0}' already exists; undefine it first, or define the new one under another name"
    )]
    DomainExists(String),
    /// A stored document cannot be read back.
    #[error("internal error: store is damaged: {0}")]
    Corrupt(String),
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Anything else, already worded.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An IO error with context.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// A result of the host runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;
