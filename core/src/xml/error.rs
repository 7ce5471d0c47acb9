//! The one error type of the XML layer: what went wrong, where (line, column, element path) and
//! at which stage (well-formedness, limits, grammar, parser rules, alignment).

use std::fmt;

/// A 1-based position in a source document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where an element of a parsed definition started in its source document.
///
/// Definitions keep it so that later stages (alignment) can point at the element they reject.
/// Equality ignores it: two definitions that say the same thing are equal wherever they came
/// from, which is what round-trip and property tests compare.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin(pub Option<Position>);

impl PartialEq for Origin {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Eq for Origin {}

/// The stage that rejected a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XmlErrorKind {
    /// The text is not well-formed XML, or it declares a DTD.
    Malformed,
    /// The document is over the size, depth or node limit.
    Limit,
    /// The document breaks its grammar (unknown element or attribute, bad value, missing
    /// required content). libvirt reports these as schema errors.
    Schema,
    /// The document is well-formed and valid but breaks a parser rule (libvirt's
    /// `VIR_ERR_XML_ERROR`).
    Invalid,
    /// The document asks for something that is not supported (libvirt's
    /// `VIR_ERR_CONFIG_UNSUPPORTED`), such as `<server>` in push mode.
    Unsupported,
    /// The definition does not fit the domain it is aligned with (unknown or duplicate disks,
    /// disks without media, a foreign uuid).
    Alignment,
}

impl XmlErrorKind {
    /// A short lowercase name of the stage.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Limit => "limit",
            Self::Schema => "schema",
            Self::Invalid => "invalid",
            Self::Unsupported => "unsupported",
            Self::Alignment => "alignment",
        }
    }
}

/// A rejected document or definition.
///
/// Displayed as `LINE:COL: PATH: message`, or `PATH: message` when no position is known (a
/// definition built in code rather than parsed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct XmlError {
    /// The stage that rejected it.
    pub kind: XmlErrorKind,
    /// Where in the source, when the error concerns parsed text.
    pub position: Option<Position>,
    /// Element path such as `/domainbackup/disks/disk`; `/` when no element applies.
    pub path: String,
    /// What is wrong, in a sentence.
    pub message: String,
}

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pos) = self.position {
            write!(f, "{pos}: ")?;
        }
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl XmlError {
    /// Builds an error.
    pub fn new(
        kind: XmlErrorKind,
        origin: Origin,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            position: origin.0,
            path: path.into(),
            message: message.into(),
        }
    }
}
