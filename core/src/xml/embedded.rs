//! The `<domain>` embedded in a checkpoint, kept as text.
//!
//! libvirt prints the domain nested one level inside `<domaincheckpoint>`. We store it as if it
//! were a document of its own (its indentation reduced by the nesting it had in the source) and
//! indent it again when formatting. Only whitespace between elements is touched; text content,
//! attributes, comments and CDATA are kept byte for byte.

use roxmltree::{Document, Node};

/// Whitespace-only text nodes of `node`'s subtree whose source bytes are exactly their text
/// (so that replacing those bytes changes only indentation), as byte ranges in `text`.
fn indentation_ranges(text: &str, node: Node<'_, '_>) -> Vec<std::ops::Range<usize>> {
    node.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| {
            let range = n.range();
            let source = text.get(range.clone())?;
            let is_plain = Some(source) == n.text()
                && !source.is_empty()
                && source.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n'));
            is_plain.then_some(range)
        })
        .collect()
}

/// The source text of `node`, its indentation reduced by the indentation of its own line.
pub fn extract(text: &str, node: Node<'_, '_>) -> String {
    let range = node.range();
    let line_start = text[..range.start].rfind('\n').map_or(0, |i| i + 1);
    let lead = &text[line_start..range.start];
    let base = if lead.bytes().all(|b| b == b' ' || b == b'\t') {
        lead
    } else {
        ""
    };
    let mut out = String::with_capacity(range.len());
    let mut at = range.start;
    for ws in indentation_ranges(text, node) {
        out.push_str(&text[at..ws.start]);
        let mut lines = text[ws.clone()].split('\n');
        if let Some(first) = lines.next() {
            out.push_str(first);
        }
        for line in lines {
            out.push('\n');
            out.push_str(line.strip_prefix(base).unwrap_or(line));
        }
        at = ws.end;
    }
    out.push_str(&text[at..range.end]);
    out
}

/// `stored` (as kept by [`extract`]) indented by `prefix`, ending with a newline.
pub fn indent(stored: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(stored.len() + 64 * prefix.len());
    out.push_str(prefix);
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: super::document::MAX_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    match Document::parse_with_options(stored, options) {
        Ok(doc) => {
            let mut at = 0;
            for ws in indentation_ranges(stored, doc.root()) {
                out.push_str(&stored[at..ws.start]);
                out.push_str(&stored[ws.clone()].replace('\n', &format!("\n{prefix}")));
                at = ws.end;
            }
            out.push_str(&stored[at..]);
        }
        // Not a document (a definition built in code): indent every line.
        Err(_) => out.push_str(&stored.replace('\n', &format!("\n{prefix}"))),
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_then_indent_restores_the_source_layout() {
        let text = "<a>\n  <domain type='x'>\n    <name>n</name>\n    <description>l1\n  l2</description>\n  </domain>\n</a>\n";
        let doc = Document::parse(text).unwrap();
        let node = doc.root_element().first_element_child().unwrap();
        let stored = extract(text, node);
        assert_eq!(
            stored,
            "<domain type='x'>\n  <name>n</name>\n  <description>l1\n  l2</description>\n</domain>"
        );
        assert_eq!(
            indent(&stored, "  "),
            "  <domain type='x'>\n    <name>n</name>\n    <description>l1\n  l2</description>\n  </domain>\n"
        );
    }
}
