//! Validation of names that later become file names (checkpoint names, domain names): they must
//! never escape the directory they are stored in.
//!
//! The rules: not empty, at most [`MAX_NAME_BYTES`] bytes, no `/`, no NUL or other control
//! characters, and no leading `.` (which rules out `.`, `..` and hidden files). Checkpoint names
//! are further limited to the character set of libvirt's grammar, `[a-zA-Z0-9_-][a-zA-Z0-9_.-]*`.

use std::fmt;

/// Longest accepted name in bytes: a file name is at most 255 bytes and the store appends `.xml`.
pub const MAX_NAME_BYTES: usize = 200;

/// Why a name cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    TooLong,
    /// The name contains `/`.
    Slash,
    /// The name starts with `.`.
    LeadingDot,
    /// The name contains a control character.
    ControlChar,
    /// The name has a character outside `[a-zA-Z0-9_.-]` (checkpoint names only).
    Charset,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "is empty",
            Self::TooLong => "is longer than 200 bytes",
            Self::Slash => "contains '/'",
            Self::LeadingDot => "starts with '.'",
            Self::ControlChar => "contains a control character",
            Self::Charset => "may only contain letters, digits, '_', '-' and '.'",
        })
    }
}

/// Checks that `name` is usable as a single file name component.
pub fn validate_file_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    if name.contains('/') {
        return Err(NameError::Slash);
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlChar);
    }
    Ok(())
}

/// Checks a domain name (used for the domain's directory).
pub fn validate_domain_name(name: &str) -> Result<(), NameError> {
    validate_file_name(name)
}

/// Checks a checkpoint name: a file name in libvirt's checkpoint-name character set.
pub fn validate_checkpoint_name(name: &str) -> Result<(), NameError> {
    validate_file_name(name)?;
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        Ok(())
    } else {
        Err(NameError::Charset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_cannot_escape_their_directory() {
        assert_eq!(validate_checkpoint_name("../x"), Err(NameError::Slash));
        assert_eq!(validate_checkpoint_name(".."), Err(NameError::LeadingDot));
        assert_eq!(
            validate_checkpoint_name(".hidden"),
            Err(NameError::LeadingDot)
        );
        assert_eq!(validate_checkpoint_name(""), Err(NameError::Empty));
        assert_eq!(validate_checkpoint_name("a b"), Err(NameError::Charset));
        assert_eq!(
            validate_checkpoint_name("a\nb"),
            Err(NameError::ControlChar)
        );
        assert_eq!(
            validate_checkpoint_name(&"a".repeat(MAX_NAME_BYTES + 1)),
            Err(NameError::TooLong)
        );
        assert_eq!(validate_checkpoint_name("c1.daily-2_x"), Ok(()));
    }

    #[test]
    fn domain_names_allow_spaces_but_not_separators() {
        assert_eq!(validate_domain_name("my vm"), Ok(()));
        assert_eq!(validate_domain_name("a/b"), Err(NameError::Slash));
        assert_eq!(validate_domain_name("\u{7f}x"), Err(NameError::ControlChar));
    }
}
