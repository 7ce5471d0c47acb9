//! What the host runtime fails with, sorted by where the failure comes from, and how each is
//! worded for the user: after virsh's category for an engine error ([`Error::message`]), with
//! what to do next when the cause is known ([`Error::next_step`]).

use vbackup_core::error::{ConflictError, Error as EngineError, RequestError};

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

impl Error {
    /// The error as virsh words it: an engine error after virsh's category prefix.
    pub fn message(&self) -> String {
        let Error::Engine(e) = self else {
            return self.to_string();
        };
        let prefix = match e {
            EngineError::Request(r) => match r {
                RequestError::NoCheckpoint(_)
                | RequestError::IncrementalCheckpointMissing { .. } => {
                    "Domain checkpoint not found: "
                }
                RequestError::CheckpointExists(_) => "operation failed: ",
                RequestError::CheckpointInconsistent { .. } => "checkpoint inconsistent: ",
                RequestError::NoJob | RequestError::NotRunning => {
                    "Requested operation is not valid: "
                }
                RequestError::NoBackup => "Domain backup job id not found: ",
                RequestError::Unsupported(_) | RequestError::NbdServerInUse { .. } => "",
                RequestError::InvalidFlags(_) => "",
                _ => "invalid argument: ",
            },
            EngineError::Conflict(ConflictError::DomainJob { .. }) => {
                "Timed out during operation: "
            }
            EngineError::Conflict(_) => "Requested operation is not valid: ",
            EngineError::QemuRefused { .. } | EngineError::QemuMisbehaved(_) => "internal error: ",
            EngineError::LinkLost(_) | EngineError::Store(_) => "operation failed: ",
        };
        format!("{prefix}{e}")
    }

    /// What to do about an error whose cause is outside vbackup: a daemon that went away, a
    /// full filesystem. The commands to run next name `domain`, or say DOMAIN without one.
    pub fn next_step(&self, domain: Option<&str>) -> Option<String> {
        let message = self.to_string();
        let link_lost = matches!(
            self,
            Error::Drive(vbackup_core::driver::DriveError::Link(_))
                | Error::Engine(vbackup_core::error::Error::LinkLost(_))
                | Error::Qmp(vbackup_qemu::qmp_socket::QmpSocketError::Closed)
        ) || message.contains("Broken pipe")
            || message.contains("connection closed");
        if message.contains("No space left on device") || message.contains("os error 28") {
            Some(
                "the filesystem is full (the state directory's, or the one of the file named above): free space there and run the command again".to_owned(),
            )
        } else if link_lost {
            let domain = domain.unwrap_or("DOMAIN");
            Some(format!(
                "the storage daemon (or QEMU) stopped while the command ran (killed or crashed); run 'vbackup domjobinfo {domain}' to see what became of the job, then 'vbackup start {domain}' (a managed domain) before trying again",
            ))
        } else {
            None
        }
    }
}

/// A result of the host runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn a_full_filesystem_is_named_with_what_to_do() {
        let e = Error::Io {
            what: "cannot write 'x'".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let hint = e.next_step(Some("vm")).expect("a hint");
        assert!(hint.starts_with("the filesystem is full"), "{hint}");
        let other = Error::Other("invalid argument: x".into());
        assert_eq!(other.next_step(Some("vm")), None);
    }

    #[test]
    fn a_lost_daemon_names_the_commands_domain_or_says_domain_without_one() {
        let e = Error::Qmp(vbackup_qemu::qmp_socket::QmpSocketError::Closed);
        let hint = e.next_step(Some("web1")).expect("a hint");
        assert!(
            hint.contains("'vbackup domjobinfo web1'") && hint.contains("'vbackup start web1'"),
            "{hint}"
        );
        assert!(!hint.contains("DOMAIN"), "{hint}");
        let hint = e.next_step(None).expect("a hint");
        assert!(
            hint.contains("'vbackup domjobinfo DOMAIN'") && hint.contains("'vbackup start DOMAIN'"),
            "{hint}"
        );
    }
}
