//! RELAX NG validation of `<domaincheckpoint>` and `<domainbackup>` against our grammars in
//! `schemas/`. Every parse goes through [`validate`].
//!
//! The grammars are compiled once per process (on first use) and each thread keeps its own
//! [`Validator`] with warm caches, so validating a typical document
//! costs a few hash lookups per element.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::relaxng::{Schema, SchemaError, Validator};

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

impl std::fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.path, self.message
        )
    }
}

impl Grammar {
    /// The root element name the grammar expects.
    pub fn root_name(self) -> &'static str {
        match self {
            Grammar::Checkpoint => "domaincheckpoint",
            Grammar::Backup => "domainbackup",
        }
    }

    /// The grammar whose root element is `name`, if any.
    pub fn for_root(name: &str) -> Option<Grammar> {
        match name {
            "domaincheckpoint" => Some(Grammar::Checkpoint),
            "domainbackup" => Some(Grammar::Backup),
            _ => None,
        }
    }

    /// The grammar's RELAX NG source, as shipped in `schemas/`.
    pub fn source(self) -> &'static str {
        match self {
            Grammar::Checkpoint => include_str!("../../../schemas/domaincheckpoint.rng"),
            Grammar::Backup => include_str!("../../../schemas/domainbackup.rng"),
        }
    }

    /// The compiled grammar (compiled on first use).
    pub fn schema(self) -> Result<&'static Schema, &'static SchemaError> {
        static CHECKPOINT: OnceLock<Result<Schema, SchemaError>> = OnceLock::new();
        static BACKUP: OnceLock<Result<Schema, SchemaError>> = OnceLock::new();
        let cell = match self {
            Grammar::Checkpoint => &CHECKPOINT,
            Grammar::Backup => &BACKUP,
        };
        cell.get_or_init(|| Schema::compile(self.source())).as_ref()
    }

    fn index(self) -> usize {
        match self {
            Grammar::Checkpoint => 0,
            Grammar::Backup => 1,
        }
    }
}

thread_local! {
    static VALIDATORS: RefCell<[Option<Validator<'static>>; 2]> = const { RefCell::new([None, None]) };
}

/// Validates a parsed document against a grammar.
pub fn validate(
    doc: &roxmltree::Document<'_>,
    grammar: Grammar,
) -> Result<(), Vec<SchemaViolation>> {
    let schema = match grammar.schema() {
        Ok(schema) => schema,
        Err(e) => {
            return Err(vec![SchemaViolation {
                line: 0,
                column: 0,
                path: "/".to_owned(),
                message: format!("grammar `{}` does not compile: {e}", grammar.root_name()),
            }]);
        }
    };
    VALIDATORS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slots) => slots[grammar.index()]
            .get_or_insert_with(|| Validator::new(schema))
            .validate(doc),
        // Only reachable if validation re-entered itself; fall back to cold caches.
        Err(_) => Validator::new(schema).validate(doc),
    })
}
