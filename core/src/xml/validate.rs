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
            let ctx = super::document::Ctx::new(&doc);
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

#[cfg(test)]
mod tests {
    // The corpus lives on disk; reading it is fine in tests.
    #![allow(clippy::disallowed_methods)]

    use super::super::document::{Ctx, load};
    use super::super::{backup, checkpoint};
    use super::*;

    fn invalid_files(kind: &str) -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/xml")
            .join(kind)
            .join("invalid");
        let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    /// The parser repeats the grammar's rules, so it must reject every invalid file on its own,
    /// whatever the grammar says.
    #[test]
    fn parser_alone_rejects_every_invalid_corpus_file() {
        for (name, text) in invalid_files("checkpoint") {
            let mode = if name.starts_with("redefine") {
                CheckpointMode::Redefine
            } else {
                CheckpointMode::Document
            };
            let rejected = load(&text).and_then(|doc| {
                let ctx = Ctx::new(&doc);
                checkpoint::read_checkpoint(&ctx, &text, doc.root_element(), mode).map(drop)
            });
            assert!(rejected.is_err(), "checkpoint/invalid/{name} accepted");
        }
        for (name, text) in invalid_files("backup") {
            let rejected = load(&text).and_then(|doc| {
                let ctx = Ctx::new(&doc);
                backup::read_backup(&ctx, doc.root_element()).map(drop)
            });
            assert!(rejected.is_err(), "backup/invalid/{name} accepted");
        }
    }
}
