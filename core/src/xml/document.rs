//! Reading a document safely (no DTD, size, depth and node limits) and the small helpers every
//! parser uses to walk it with positioned errors.

use super::error::{Origin, Position, XmlError, XmlErrorKind};
use super::names;
use roxmltree::{Document, Node};
use std::cell::Cell;

/// Largest accepted document, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Deepest accepted element nesting (a `<domain>` with a long backing chain nests deeply);
/// below libxml2's own limit of 256, so that whatever we read libvirt could read too.
pub const MAX_DEPTH: usize = 240;
/// Most nodes (elements, attributes' owners, text, comments) a document may have.
pub const MAX_NODES: u32 = 200_000;

/// Parses `text` into a tree, refusing DTDs (and so every entity trick), oversized documents
/// and over-deep nesting.
pub fn load(text: &str) -> Result<Document<'_>, XmlError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(XmlError::new(
            XmlErrorKind::Limit,
            Origin(Some(Position { line: 1, column: 1 })),
            "/",
            format!(
                "document is {} bytes, more than the limit of {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        ));
    }
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = Document::parse_with_options(text, options).map_err(|e| malformed(text, e))?;
    check_depth(&doc)?;
    Ok(doc)
}

/// Line and column just past the end of `text`.
fn end_position(text: &str) -> Position {
    let line = text.matches('\n').count() + 1;
    let column = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Position {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
    }
}

fn malformed(text: &str, err: roxmltree::Error) -> XmlError {
    use roxmltree::Error as E;
    let pos = match err {
        E::UnclosedRootNode | E::UnexpectedEndOfStream => end_position(text),
        _ => {
            let pos = err.pos();
            Position {
                line: pos.row,
                column: pos.col,
            }
        }
    };
    let (kind, message) = match &err {
        E::DtdDetected => (
            XmlErrorKind::Malformed,
            "document type declarations (DTDs) are not accepted".to_owned(),
        ),
        E::NodesLimitReached => (
            XmlErrorKind::Limit,
            format!("document has more than {MAX_NODES} nodes"),
        ),
        E::AttributesLimitReached | E::NamespacesLimitReached => (
            XmlErrorKind::Limit,
            "document has too many attributes or namespaces".to_owned(),
        ),
        E::NoRootNode => (
            XmlErrorKind::Malformed,
            "document has no root element".to_owned(),
        ),
        E::UnclosedRootNode | E::UnexpectedEndOfStream => (
            XmlErrorKind::Malformed,
            "document ends before its root element is closed".to_owned(),
        ),
        E::UnknownEntityReference(name, _) => (
            XmlErrorKind::Malformed,
            format!("unknown entity reference '&{name};'"),
        ),
        E::UnexpectedCloseTag(expected, found, _) => (
            XmlErrorKind::Malformed,
            format!("closing tag '{found}' does not match the open element '{expected}'"),
        ),
        E::DuplicatedAttribute(name, _) => (
            XmlErrorKind::Malformed,
            format!("attribute '{name}' is given twice"),
        ),
        other => (XmlErrorKind::Malformed, strip_position(&other.to_string())),
    };
    XmlError::new(
        kind,
        Origin(Some(pos)),
        "/",
        format!("not well-formed XML: {message}"),
    )
}

/// roxmltree ends its messages with ` at LINE:COL`; the position is reported separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at ") {
        Some(i)
            if message[i + 4..]
                .chars()
                .all(|c| c.is_ascii_digit() || c == ':') =>
        {
            message[..i].to_owned()
        }
        _ => message.to_owned(),
    }
}

fn check_depth(doc: &Document<'_>) -> Result<(), XmlError> {
    // Iterative walk: a recursive one would itself be the stack overflow this guards against.
    let mut stack = vec![(doc.root_element(), 1usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            // The full path would be hundreds of components long.
            let mut path: String = element_path(node).split_inclusive('/').take(5).collect();
            path.push_str("...");
            return Err(XmlError::new(
                XmlErrorKind::Limit,
                origin(doc, node),
                path,
                format!("elements nest deeper than the limit of {MAX_DEPTH}"),
            ));
        }
        stack.extend(
            node.children()
                .filter(Node::is_element)
                .map(|c| (c, depth + 1)),
        );
    }
    Ok(())
}

/// Where `node` starts in the source.
pub fn origin(doc: &Document<'_>, node: Node<'_, '_>) -> Origin {
    let pos = doc.text_pos_at(node.range().start);
    Origin(Some(Position {
        line: pos.row,
        column: pos.col,
    }))
}

/// `/a/b/c` for the element `node` (or for the element holding a text node).
pub fn element_path(node: Node<'_, '_>) -> String {
    let mut names: Vec<&str> = node
        .ancestors()
        .filter(Node::is_element)
        .map(|n| n.tag_name().name())
        .collect();
    names.reverse();
    if names.is_empty() {
        return "/".to_owned();
    }
    let mut path = String::new();
    for name in names {
        path.push('/');
        path.push_str(name);
    }
    path
}

/// A parsing context: the document and helpers that produce positioned errors.
pub struct Ctx<'a, 'input> {
    /// The document being read.
    pub doc: &'a Document<'input>,
    /// The last position computed (byte offset, line, column). Parsers ask for positions in
    /// document order, so continuing from here keeps the cost linear in the document size.
    cursor: Cell<(usize, u32, u32)>,
}

/// Shorthand for a node of the document being read.
pub type N<'a, 'input> = Node<'a, 'input>;

impl<'a, 'input> Ctx<'a, 'input> {
    /// A context for reading `doc`.
    pub fn new(doc: &'a Document<'input>) -> Self {
        Self {
            doc,
            cursor: Cell::new((0, 1, 1)),
        }
    }

    /// Line and column of a byte offset, counted as roxmltree counts them (lines end at `\n`,
    /// columns count characters).
    fn position_at(&self, byte: usize) -> Position {
        let text = self.doc.input_text();
        let byte = byte.min(text.len());
        let (mut at, mut line, mut column) = self.cursor.get();
        if byte < at || !text.is_char_boundary(byte) {
            (at, line, column) = (0, 1, 1);
        }
        for c in text[at..].chars() {
            if at >= byte {
                break;
            }
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
            at += c.len_utf8();
        }
        self.cursor.set((at, line, column));
        Position { line, column }
    }

    /// An error of `kind` about `node`.
    pub fn err(
        &self,
        kind: XmlErrorKind,
        node: N<'a, 'input>,
        message: impl Into<String>,
    ) -> XmlError {
        XmlError::new(kind, origin(self.doc, node), element_path(node), message)
    }

    /// A grammar-level error about `node`.
    pub fn schema(&self, node: N<'a, 'input>, message: impl Into<String>) -> XmlError {
        self.err(XmlErrorKind::Schema, node, message)
    }

    /// Where `node` starts.
    pub fn origin(&self, node: N<'a, 'input>) -> Origin {
        Origin(Some(self.position_at(node.range().start)))
    }

    /// Requires `root` to be the element `name` in no namespace.
    pub fn expect_root(&self, root: N<'a, 'input>, name: &str) -> Result<(), XmlError> {
        if root.tag_name().name() != name || root.tag_name().namespace().is_some() {
            return Err(self.schema(
                root,
                format!(
                    "expected root element '{name}', found '{}'",
                    root.tag_name().name()
                ),
            ));
        }
        Ok(())
    }

    /// Reads the children of a `<disks>` element in document order with `read`: the element
    /// takes no attributes and holds one `<disk>` or more and nothing else.
    pub fn disks<T>(
        &self,
        node: N<'a, 'input>,
        mut read: impl FnMut(N<'a, 'input>) -> Result<T, XmlError>,
    ) -> Result<Vec<T>, XmlError> {
        self.check_attributes(node, &[])?;
        let children = self.element_children(node)?;
        if children.is_empty() {
            return Err(self.schema(node, "<disks> must hold at least one <disk>"));
        }
        let mut out = Vec::with_capacity(children.len());
        for disk in children {
            if disk.tag_name().name() != "disk" {
                return Err(self.unexpected(disk));
            }
            out.push(read(disk)?);
        }
        Ok(out)
    }

    /// `value`, read from `node`, as a checkpoint name; `what` names it in the error.
    pub fn checkpoint_name(
        &self,
        node: N<'a, 'input>,
        what: &str,
        value: &str,
    ) -> Result<String, XmlError> {
        names::validate_checkpoint_name(value)
            .map_err(|e| self.schema(node, format!("{what} '{value}' {e}")))?;
        Ok(value.to_owned())
    }

    /// Rejects any attribute of `node` not in `allowed`.
    pub fn check_attributes(&self, node: N<'a, 'input>, allowed: &[&str]) -> Result<(), XmlError> {
        for attr in node.attributes() {
            if attr.namespace().is_some() || !allowed.contains(&attr.name()) {
                return Err(self.schema(node, format!("unexpected attribute '{}'", attr.name())));
            }
        }
        Ok(())
    }

    /// The element children of `node`; non-blank text or a namespaced element is an error.
    pub fn element_children(&self, node: N<'a, 'input>) -> Result<Vec<N<'a, 'input>>, XmlError> {
        let mut out = Vec::new();
        for child in node.children() {
            if child.is_element() {
                if child.tag_name().namespace().is_some() {
                    return Err(self.schema(
                        child,
                        format!("unexpected element '{}'", child.tag_name().name()),
                    ));
                }
                out.push(child);
            } else if child.is_text()
                && !child
                    .text()
                    .unwrap_or("")
                    .chars()
                    .all(|c| c.is_ascii_whitespace())
            {
                return Err(self.schema(node, "unexpected text content"));
            }
        }
        Ok(out)
    }

    /// The text content of an element that must not have element children.
    pub fn text(&self, node: N<'a, 'input>) -> Result<String, XmlError> {
        let mut text = String::new();
        for child in node.children() {
            if child.is_element() {
                return Err(self.schema(
                    child,
                    format!("unexpected element '{}'", child.tag_name().name()),
                ));
            }
            if child.is_text() {
                text.push_str(child.text().unwrap_or(""));
            }
        }
        Ok(text)
    }

    /// The element's attributes must be among `allowed` and it must have no content.
    pub fn check_empty(&self, node: N<'a, 'input>, allowed: &[&str]) -> Result<(), XmlError> {
        self.check_attributes(node, allowed)?;
        if let Some(child) = self.element_children(node)?.first() {
            return Err(self.schema(
                *child,
                format!("unexpected element '{}'", child.tag_name().name()),
            ));
        }
        Ok(())
    }

    /// Reports a second occurrence of a child that may appear once.
    pub fn once(
        &self,
        slot: &mut Option<N<'a, 'input>>,
        node: N<'a, 'input>,
    ) -> Result<(), XmlError> {
        if slot.is_some() {
            return Err(self.schema(
                node,
                format!(
                    "element '{}' may appear only once here",
                    node.tag_name().name()
                ),
            ));
        }
        *slot = Some(node);
        Ok(())
    }

    /// An unexpected child element.
    pub fn unexpected(&self, node: N<'a, 'input>) -> XmlError {
        self.schema(
            node,
            format!("unexpected element '{}'", node.tag_name().name()),
        )
    }

    /// Parses a `yes`/`no` attribute.
    pub fn yes_no(&self, node: N<'a, 'input>, name: &str) -> Result<Option<bool>, XmlError> {
        match node.attribute(name) {
            None => Ok(None),
            Some("yes") => Ok(Some(true)),
            Some("no") => Ok(Some(false)),
            Some(other) => Err(self.schema(
                node,
                format!("invalid value '{other}' for attribute '{name}' (expected yes or no)"),
            )),
        }
    }

    /// Parses an unsigned decimal number as xsd:unsignedLong reads it: surrounding whitespace
    /// and a leading `+` are allowed.
    pub fn unsigned(&self, node: N<'a, 'input>, what: &str, text: &str) -> Result<u64, XmlError> {
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        let trimmed = trimmed.strip_prefix('+').unwrap_or(trimmed);
        if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.schema(
                node,
                format!("invalid value '{text}' for {what} (expected an unsigned number)"),
            ));
        }
        trimmed
            .parse::<u64>()
            .map_err(|_| self.schema(node, format!("value '{text}' for {what} is out of range")))
    }
}

/// An absolute path: starts with `/` and holds no newline.
pub fn is_absolute_path(path: &str) -> bool {
    path.starts_with('/') && !path.contains(['\n', '\r', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtd_and_entities_are_refused() {
        let text = "<!DOCTYPE x [<!ENTITY a 'aaaa'>]><x>&a;</x>";
        let err = load(text).unwrap_err();
        assert_eq!(err.kind, XmlErrorKind::Malformed);
        assert!(err.message.contains("DTD"), "{err}");
    }

    #[test]
    fn oversized_document_is_refused_before_parsing() {
        let text = format!("<x>{}</x>", " ".repeat(MAX_DOCUMENT_BYTES));
        assert_eq!(load(&text).unwrap_err().kind, XmlErrorKind::Limit);
    }

    #[test]
    fn deep_nesting_is_refused_with_the_offending_path() {
        let text = format!(
            "{}{}",
            "<a>".repeat(MAX_DEPTH + 1),
            "</a>".repeat(MAX_DEPTH + 1)
        );
        let err = load(&text).unwrap_err();
        assert_eq!(err.kind, XmlErrorKind::Limit);
        assert!(err.path.starts_with("/a/a/a"));
    }

    #[test]
    fn incremental_positions_match_roxmltree_in_any_order() {
        let text = "<a>\n  <b x='é'/>\n\t<c>\n<d/></c>\n</a>";
        let doc = load(text).unwrap();
        let ctx = Ctx::new(&doc);
        let nodes: Vec<_> = doc.descendants().filter(|n| n.is_element()).collect();
        for node in nodes.iter().chain(nodes.iter().rev()) {
            let expected = doc.text_pos_at(node.range().start);
            assert_eq!(
                ctx.origin(*node).0,
                Some(Position {
                    line: expected.row,
                    column: expected.col
                })
            );
        }
    }

    #[test]
    fn malformed_xml_reports_line_and_column() {
        let err = load("<a>\n  <b></c>\n</a>").unwrap_err();
        assert_eq!(err.kind, XmlErrorKind::Malformed);
        assert_eq!(err.position, Some(Position { line: 2, column: 6 }));
    }
}
