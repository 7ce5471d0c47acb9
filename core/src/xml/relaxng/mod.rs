//! A RELAX NG validator (XML syntax) over `roxmltree` documents.
//!
//! Contract: [`Schema::compile`] turns grammar text into an immutable, shareable [`Schema`] or a
//! positioned [`SchemaError`]; a [`Validator`] then checks documents against it. Verdicts are
//! meant to equal libxml2's `xmllint --relaxng` (the differential test `schema_differential`
//! holds us to it on every test document) for the features supported here: `grammar`,
//! `start`, `define`/`ref`/`parentRef` with `combine`, `div`, `element` and `attribute` with
//! `name`/`anyName`/`nsName`/`choice`/`except` name classes, `choice`, `group`, `interleave`,
//! `optional`, `zeroOrMore`, `oneOrMore`, `mixed`, `empty`, `text`, `notAllowed`, `value`, and
//! `data` with the datatypes (XML Schema `string`, `token`, the integer
//! types, `boolean`, `anyURI`, `NCName`) and the facets `pattern`, `minInclusive`,
//! `maxInclusive`, `minLength`, `maxLength`, `length`. `list`, `include` and `externalRef` are
//! refused at compile time.
//!
//! The algorithm is James Clark's derivative algorithm: patterns are hash-consed, derivatives
//! are memoized per validator, and value-dependent steps are memoized on the outcome of their
//! datatype tests. Validation never panics and never recurses on document depth; documents
//! nested deeper than [`MAX_DOCUMENT_DEPTH`] are rejected with a violation.

mod compile;
mod datatype;
mod derive;
mod hash;
mod pattern;
mod validate;

#[cfg(test)]
mod tests;

pub use compile::SchemaError;
pub use derive::Validator;
pub use validate::{MAX_DOCUMENT_DEPTH, MAX_VIOLATIONS};

use crate::xml::schema::SchemaViolation;
use pattern::{Arena, NameClass, PatId, Symbols};

/// Recursion bound for walks over a single pattern's structure.
const MAX_PATTERN_DEPTH: usize = 4096;

/// A compiled grammar. Immutable; share it between threads and give each its [`Validator`].
#[derive(Debug, Clone)]
pub struct Schema {
    arena: Arena,
    start: PatId,
    /// Content pattern of each element slot.
    contents: Vec<PatId>,
    classes: Vec<NameClass>,
    datatypes: Vec<datatype::Datatype>,
    literals: Vec<String>,
    symbols: Symbols,
    /// `class_matches[class * symbols.len() + symbol]`.
    class_matches: Vec<bool>,
}

impl Schema {
    /// Compiles a grammar written in RELAX NG's XML syntax.
    pub fn compile(source: &str) -> Result<Schema, SchemaError> {
        compile::compile(source)
    }

    /// A validator with fresh caches for this grammar.
    pub fn validator(&self) -> Validator<'_> {
        Validator::new(self)
    }

    /// Validates one document with a fresh validator. To validate many documents, keep a
    /// [`Validator`] instead: its caches make later documents much cheaper.
    pub fn validate(&self, doc: &roxmltree::Document<'_>) -> Result<(), Vec<SchemaViolation>> {
        self.validator().validate(doc)
    }
}
