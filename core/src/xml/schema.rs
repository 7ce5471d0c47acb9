//! RELAX NG validation of `<domaincheckpoint>` and `<domainbackup>` against our grammars in
//! `schemas/`. Every parse goes through [`validate`].

/// Which grammar a document is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grammar {
    /// `schemas/domaincheckpoint.rng`.
    Checkpoint,
    /// `schemas/domainbackup.rng`.
    Backup,
}

/// One place where a document breaks its grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// 1-based line of the offending node.
    pub line: u32,
    /// 1-based column of the offending node.
    pub column: u32,
    /// Element path such as `/domaincheckpoint/disks/disk`.
    pub path: String,
    /// What is wrong, in a sentence.
    pub message: String,
}

impl Grammar {
    /// The root element name the grammar expects.
    pub fn root_name(self) -> &'static str {
        match self {
            Grammar::Checkpoint => "domaincheckpoint",
            Grammar::Backup => "domainbackup",
        }
    }
}

/// Validates a parsed document against a grammar.
///
/// This first version only checks the root element; the full RELAX NG grammars replace it.
pub fn validate(
    doc: &roxmltree::Document<'_>,
    grammar: Grammar,
) -> Result<(), Vec<SchemaViolation>> {
    let root = doc.root_element();
    if root.tag_name().name() == grammar.root_name() {
        return Ok(());
    }
    let pos = doc.text_pos_at(root.range().start);
    Err(vec![SchemaViolation {
        line: pos.row,
        column: pos.col,
        path: format!("/{}", root.tag_name().name()),
        message: format!("expected root element `{}`", grammar.root_name()),
    }])
}
