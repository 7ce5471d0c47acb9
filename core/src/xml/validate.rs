//! Whole-document validation for tools (`vbackup xml validate`): picks the grammar from the
//! root element, like virt-xml-validate, and reports every grammar violation, or else the first
//! parser-rule error.

use super::checkpoint::{CheckpointDef, CheckpointMode};
use super::document::load;
use super::error::XmlError;
use super::schema::{self, Grammar};
use super::{BackupDef, domain, schema_errors};

/// What a validated document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DocumentKind {
    /// `<domaincheckpoint>`.
    Checkpoint,
    /// `<domainbackup>`.
    Backup,
    /// `<domain>` (read by the minimal domain reader; no grammar).
    Domain,
}

impl DocumentKind {
    /// The root element name.
    pub fn root_name(self) -> &'static str {
        match self {
            Self::Checkpoint => "domaincheckpoint",
            Self::Backup => "domainbackup",
            Self::Domain => "domain",
        }
    }
}

/// Validates a document of any supported kind; returns its kind or every error found.
pub fn validate_document(text: &str) -> Result<DocumentKind, Vec<XmlError>> {
    let doc = load(text).map_err(|e| vec![e])?;
    let root = doc.root_element();
    let (kind, grammar) = match root.tag_name().name() {
        "domaincheckpoint" => (DocumentKind::Checkpoint, Some(Grammar::Checkpoint)),
        "domainbackup" => (DocumentKind::Backup, Some(Grammar::Backup)),
        "domain" => (DocumentKind::Domain, None),
        other => {
            let ctx = super::document::Ctx { doc: &doc };
            return Err(vec![ctx.schema(
                root,
                format!(
                    "unknown root element '{other}' (expected domaincheckpoint, domainbackup or domain)"
                ),
            )]);
        }
    };
    if let Some(grammar) = grammar {
        schema::validate(&doc, grammar).map_err(schema_errors)?;
    }
    drop(doc);
    let result = match kind {
        DocumentKind::Checkpoint => CheckpointDef::parse(text, CheckpointMode::Document).map(drop),
        DocumentKind::Backup => BackupDef::parse(text).map(drop),
        DocumentKind::Domain => domain::parse_domain(text).map(drop),
    };
    result.map(|()| kind).map_err(|e| vec![e])
}
