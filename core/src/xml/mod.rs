//! libvirt-compatible `<domaincheckpoint>`, `<domainbackup>` and (a reader for) `<domain>` XML.
//!
//! Every document goes through the same stages, each with positioned [`XmlError`]s:
//! 1. `document::load`: well-formedness, no DTD, size, depth and node limits;
//! 2. [`crate::unstable::schema::validate`]: the RELAX NG grammar of the root element;
//! 3. the parser ([`CheckpointDef::parse`], [`BackupDef::parse`]): libvirt's parser rules,
//!    which also repeat the grammar's checks so that they hold whatever the grammar says;
//! 4. alignment with a domain ([`align_checkpoint`], [`align_backup`]).
//!
//! Formatting ([`CheckpointDef::format`], [`BackupDef::format`]) reproduces libvirt's canonical
//! output byte for byte: parsing canonical text and formatting it gives the same text.

pub mod align;
pub mod backup;
pub mod checkpoint;
pub(crate) mod document;
pub mod domain;
pub(crate) mod embedded;
pub mod error;
pub(crate) mod names;
pub(crate) mod relaxng;
pub(crate) mod schema;
pub mod validate;
pub(crate) mod writer;

pub use align::{align_backup, align_checkpoint, align_redefined_checkpoint};
pub use backup::STORAGE_FORMATS;
pub use backup::{
    BackupDef, BackupDisk, BackupDiskMode, BackupModeAttr, BackupStorage, BackupStoreDef, Cipher,
    DiskBackup, Encryption, Ivgen, Seclabel, SecretRef, ServerDef, Transport,
};
pub use checkpoint::{
    CheckpointDef, CheckpointDiskDef, CheckpointFormat, CheckpointKind, CheckpointMode,
};
pub use document::MAX_DOCUMENT_BYTES;
pub use domain::parse_domain;
pub use error::{Origin, Position, XmlError, XmlErrorKind};
pub use validate::{DocumentKind, validate_document};

/// The first grammar violation as an [`XmlError`].
pub(crate) fn schema_error(violations: Vec<schema::SchemaViolation>) -> XmlError {
    schema_errors(violations)
        .into_iter()
        .next()
        .unwrap_or_else(|| XmlError {
            kind: XmlErrorKind::Schema,
            position: None,
            path: "/".to_owned(),
            message: "document does not match its grammar".to_owned(),
        })
}

/// Every grammar violation as an [`XmlError`].
fn schema_errors(violations: Vec<schema::SchemaViolation>) -> Vec<XmlError> {
    violations
        .into_iter()
        .map(|v| XmlError {
            kind: XmlErrorKind::Schema,
            position: Some(Position {
                line: v.line,
                column: v.column,
            }),
            path: v.path,
            message: v.message,
        })
        .collect()
}
