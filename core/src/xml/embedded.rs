//! The `<domain>` embedded in a checkpoint, kept as text.
//!
//! libvirt prints the domain nested one level inside `<domaincheckpoint>`. We store it as it
//! would print as a document of its own (two spaces per level) and indent it again when
//! formatting. Only line breaks and indentation between elements are touched; text content,
//! attributes, comments and CDATA are kept byte for byte.

use roxmltree::{Document, Node};

/// Whitespace-only text nodes of `node`'s subtree whose source bytes are exactly their text
/// (so that replacing those bytes changes only indentation), with their byte ranges in `text`.
fn indentation_nodes<'a, 'input>(
    text: &str,
    node: Node<'a, 'input>,
) -> Vec<(std::ops::Range<usize>, Node<'a, 'input>)> {
    node.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| {
            let range = n.range();
            let source = text.get(range.clone())?;
            let is_plain = Some(source) == n.text()
                && !source.is_empty()
                && source.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n'));
            is_plain.then_some((range, n))
        })
        .collect()
}

/// The source text of `node` with the whitespace between its elements laid out as libvirt lays
/// it out for a document of its own: each line break followed by two spaces per nesting level.
pub fn extract(text: &str, node: Node<'_, '_>) -> String {
    let range = node.range();
    let mut out = String::with_capacity(range.len());
    let mut at = range.start;
    for (ws, text_node) in indentation_nodes(text, node) {
        out.push_str(&text[at..ws.start]);
        let source = &text[ws.clone()];
        if source.contains('\n') {
            // The node's depth below `node` (1 for a child of `node`, bounded by the document
            // depth limit); a break before the closing tag of the parent is one level
            // shallower than one before a sibling.
            let depth = text_node
                .ancestors()
                .skip(1)
                .take_while(|a| *a != node)
                .count()
                + 1;
            let depth = if text_node.next_sibling().is_some() {
                depth
            } else {
                depth - 1
            };
            out.push('\n');
            out.push_str(&"  ".repeat(depth));
        } else {
            out.push_str(source);
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
            for (ws, _) in indentation_nodes(stored, doc.root()) {
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
    fn extracted_domain_is_laid_out_like_libvirt_and_indented_on_output() {
        let text = "<a>\n  <domain type='x'>\n        <name>n</name>\n\n    <description>l1\n  l2</description>\n    <devices>\n\t<disk/>\n </devices>\n  </domain>\n</a>\n";
        let doc = Document::parse(text).unwrap();
        let node = doc.root_element().first_element_child().unwrap();
        let stored = extract(text, node);
        assert_eq!(
            stored,
            "<domain type='x'>\n  <name>n</name>\n  <description>l1\n  l2</description>\n  <devices>\n    <disk/>\n  </devices>\n</domain>"
        );
        assert_eq!(
            indent(&stored, "  "),
            "  <domain type='x'>\n    <name>n</name>\n    <description>l1\n  l2</description>\n    <devices>\n      <disk/>\n    </devices>\n  </domain>\n"
        );
    }
}
