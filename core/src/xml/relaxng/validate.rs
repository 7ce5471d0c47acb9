//! Walking a document through the derivative engine, and turning failures into positioned
//! messages.
//!
//! The walk is iterative (an explicit stack), so deep documents cannot overflow the call stack;
//! nesting beyond [`MAX_DOCUMENT_DEPTH`] is reported as a violation. After a violation the walk
//! carries on from a forgiving state (the offending element, attribute or text is skipped) so one
//! pass reports several independent problems, up to [`MAX_VIOLATIONS`].

use std::borrow::Cow;

use roxmltree::{Document, Node};

use super::datatype::is_whitespace;
use super::derive::Validator;
use super::pattern::{NOT_ALLOWED, Pat, PatId, describe_class};
use crate::xml::schema::SchemaViolation;

/// Deepest element nesting accepted in a validated document.
pub const MAX_DOCUMENT_DEPTH: usize = 256;

/// At most this many violations are reported for one document.
pub const MAX_VIOLATIONS: usize = 20;

struct Frame<'a, 'input> {
    node: Node<'a, 'input>,
    pattern: PatId,
    next_child: Option<Node<'a, 'input>>,
    /// Its content was already reported as wrong: close it without a second report.
    reported: bool,
}

struct Report<'d, 'input> {
    doc: &'d Document<'input>,
    violations: Vec<SchemaViolation>,
}

impl Report<'_, '_> {
    fn add(&mut self, node: Node<'_, '_>, at: usize, message: String) {
        if self.violations.len() >= MAX_VIOLATIONS {
            return;
        }
        let pos = self.doc.text_pos_at(at);
        self.violations.push(SchemaViolation {
            line: pos.row,
            column: pos.col,
            path: element_path(node),
            message,
        });
    }

    fn full(&self) -> bool {
        self.violations.len() >= MAX_VIOLATIONS
    }
}

/// `/a/b/c` for the element `c` (or the parent element of a text node).
pub(crate) fn element_path(node: Node<'_, '_>) -> String {
    let mut names: Vec<&str> = node
        .ancestors()
        .filter(|n| n.is_element())
        .map(|n| n.tag_name().name())
        .collect();
    names.reverse();
    let mut path = String::new();
    for name in names {
        path.push('/');
        path.push_str(name);
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// A value quoted in a message: at most 40 characters, control characters escaped so a message
/// stays on one line.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 40;
    let mut out = String::new();
    for c in text.chars().take(LIMIT) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if text.chars().nth(LIMIT).is_some() {
        out.push('…');
    }
    out
}

/// Names a namespace in a message, if there is one.
fn in_namespace(ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !ns.is_empty() => format!(" in namespace `{ns}`"),
        _ => String::new(),
    }
}

fn join_alternatives(items: &[String]) -> String {
    let mut items = items.to_vec();
    items.sort();
    items.dedup();
    match items.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

impl Validator<'_> {
    /// Validates a whole document.
    pub fn validate(&mut self, doc: &Document<'_>) -> Result<(), Vec<SchemaViolation>> {
        self.trim_caches();
        let mut report = Report {
            doc,
            violations: Vec::new(),
        };
        let root = doc.root_element();
        let start = self.schema.start;
        let mut stack: Vec<Frame<'_, '_>> = Vec::new();
        let mut residual = start;
        if let Some(frame) = self.enter(start, root, &mut report) {
            stack.push(frame);
        }
        while let Some(frame) = stack.last_mut() {
            if report.full() {
                break;
            }
            let mut text_run: Option<(Node<'_, '_>, Cow<'_, str>)> = None;
            let mut child_element = None;
            let mut cursor = frame.next_child;
            while let Some(child) = cursor {
                if child.is_element() {
                    child_element = Some(child);
                    break;
                }
                if let Some(t) = child.text().filter(|_| child.is_text()) {
                    text_run = Some(match text_run {
                        None => (child, Cow::Borrowed(t)),
                        Some((first, acc)) => (first, Cow::Owned(acc.into_owned() + t)),
                    });
                }
                cursor = child.next_sibling();
            }
            frame.next_child = child_element.and_then(|c| c.next_sibling());
            // Text between child elements: whitespace-only runs are insignificant.
            if let Some((text_node, text)) = text_run
                && !is_whitespace(&text)
            {
                let before = frame.pattern;
                let after = self.text(before, &text, false);
                if after == NOT_ALLOWED {
                    let message = self.text_message(before, &text, frame.node);
                    report.add(text_node, text_node.range().start, message);
                } else {
                    frame.pattern = after;
                }
            }
            match child_element {
                Some(child) => {
                    let parent_pattern = frame.pattern;
                    if stack.len() >= MAX_DOCUMENT_DEPTH {
                        report.add(
                            child,
                            child.range().start,
                            format!("elements are nested deeper than {MAX_DOCUMENT_DEPTH} levels"),
                        );
                        break;
                    }
                    if let Some(child_frame) = self.enter(parent_pattern, child, &mut report) {
                        stack.push(child_frame);
                    }
                }
                None => {
                    let Some(done) = stack.pop() else { break };
                    let after = if done.reported {
                        self.end_tag_forgiving(done.pattern)
                    } else {
                        self.leave(done.pattern, done.node, &mut report)
                    };
                    match stack.last_mut() {
                        Some(parent) => parent.pattern = after,
                        None => residual = after,
                    }
                }
            }
        }
        if report.violations.is_empty() && !self.nullable(residual) {
            report.add(
                root,
                root.range().start,
                "document is incomplete".to_owned(),
            );
        }
        if report.violations.is_empty() {
            Ok(())
        } else {
            Err(report.violations)
        }
    }

    /// Start tag and attributes of `node`; returns the frame for its children, or `None` when the
    /// element is not allowed here (it is then skipped).
    fn enter<'a, 'input>(
        &mut self,
        parent: PatId,
        node: Node<'a, 'input>,
        report: &mut Report<'_, '_>,
    ) -> Option<Frame<'a, 'input>> {
        let tag = node.tag_name();
        let sym = self
            .schema
            .symbols
            .lookup(tag.namespace().unwrap_or(""), tag.name());
        let mut p = self.start_tag_open(parent, sym);
        if p == NOT_ALLOWED {
            let mut message = format!(
                "unexpected element `{}`{}",
                tag.name(),
                in_namespace(tag.namespace())
            );
            let expected = self.expected_elements(parent);
            if !expected.is_empty() {
                message.push_str(&format!("; expected {}", join_alternatives(&expected)));
            }
            report.add(node, node.range().start, message);
            return None;
        }
        for attr in node.attributes() {
            let sym = self
                .schema
                .symbols
                .lookup(attr.namespace().unwrap_or(""), attr.name());
            let next = self.attribute(p, sym, attr.value());
            if next == NOT_ALLOWED {
                let (start, len) = self.attribute_tests(p, sym);
                let message = if len == 0 {
                    format!(
                        "unexpected attribute `{}`{}",
                        attr.name(),
                        in_namespace(attr.namespace())
                    )
                } else {
                    let tests: Vec<PatId> = self.arena_pool(start, len);
                    let mut expected = Vec::new();
                    for t in tests {
                        self.describe_value(t, &mut expected, 0);
                    }
                    let mut m = format!(
                        "invalid value `{}` for attribute `{}`",
                        shorten(attr.value()),
                        attr.name()
                    );
                    if !expected.is_empty() {
                        m.push_str(&format!("; expected {}", join_alternatives(&expected)));
                    }
                    m
                };
                report.add(node, attr.range().start, message);
                let forgiven = self.attribute_forgiving(p, sym);
                if forgiven != NOT_ALLOWED {
                    p = forgiven;
                }
            } else {
                p = next;
            }
        }
        let closed = self.start_tag_close(p);
        let p = if closed == NOT_ALLOWED {
            let missing = self.missing_attributes(p);
            let message = match missing.as_slice() {
                [] => "missing required attribute".to_owned(),
                [one] => format!("missing required attribute {one}"),
                many => format!("missing required attribute {}", join_alternatives(many)),
            };
            report.add(node, node.range().start, message);
            let forgiven = self.start_tag_close_forgiving(p);
            if forgiven == NOT_ALLOWED {
                return None;
            }
            forgiven
        } else {
            closed
        };
        // An element without child elements: its text is matched as a whole, now.
        if !node.children().any(|c| c.is_element()) {
            let text: Cow<'_, str> = {
                let mut texts = node
                    .children()
                    .filter(|c| c.is_text())
                    .filter_map(|c| c.text());
                match (texts.next(), texts.next()) {
                    (None, _) => Cow::Borrowed(""),
                    (Some(one), None) => Cow::Borrowed(one),
                    (Some(a), Some(b)) => {
                        let mut s = String::from(a);
                        s.push_str(b);
                        texts.for_each(|t| s.push_str(t));
                        Cow::Owned(s)
                    }
                }
            };
            let after = self.text(p, &text, true);
            if after == NOT_ALLOWED {
                let message = self.text_message(p, &text, node);
                let at = node
                    .first_child()
                    .map_or(node.range().start, |c| c.range().start);
                report.add(node, at, message);
                return Some(Frame {
                    node,
                    pattern: p,
                    next_child: None,
                    reported: true,
                });
            }
            return Some(Frame {
                node,
                pattern: after,
                next_child: None,
                reported: false,
            });
        }
        Some(Frame {
            node,
            pattern: p,
            next_child: node.first_child(),
            reported: false,
        })
    }

    fn leave(&mut self, p: PatId, node: Node<'_, '_>, report: &mut Report<'_, '_>) -> PatId {
        let after = self.end_tag(p);
        if after != NOT_ALLOWED {
            return after;
        }
        let expected = self.expected_elements(p);
        let message = if !expected.is_empty() {
            format!(
                "missing required content in `{}`; expected {}",
                node.tag_name().name(),
                join_alternatives(&expected)
            )
        } else {
            let leaves = self.text_leaves(p);
            let mut described = Vec::new();
            for leaf in leaves {
                self.describe_value(leaf, &mut described, 0);
            }
            if described.is_empty() {
                format!("missing required content in `{}`", node.tag_name().name())
            } else {
                format!(
                    "missing value in `{}`; expected {}",
                    node.tag_name().name(),
                    join_alternatives(&described)
                )
            }
        };
        report.add(node, node.range().start, message);
        self.end_tag_forgiving(p)
    }

    fn arena_pool(&self, start: u32, len: u32) -> Vec<PatId> {
        self.pool_slice(start, len).to_vec()
    }

    fn text_message(&mut self, p: PatId, text: &str, element: Node<'_, '_>) -> String {
        let leaves = self.text_leaves(p);
        let mut described = Vec::new();
        for leaf in leaves {
            self.describe_value(leaf, &mut described, 0);
        }
        let name = element.tag_name().name();
        if described.is_empty() {
            format!("unexpected text `{}` in `{name}`", shorten(text.trim()))
        } else {
            format!(
                "invalid value `{}` in `{name}`; expected {}",
                shorten(text),
                join_alternatives(&described)
            )
        }
    }

    /// Names of the elements `p` accepts next.
    fn expected_elements(&self, p: PatId) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_expected(p, &mut out, 0);
        out.sort();
        out.dedup();
        out.truncate(12);
        out
    }

    fn collect_expected(&self, p: PatId, out: &mut Vec<String>, depth: usize) {
        if depth > super::MAX_PATTERN_DEPTH {
            return;
        }
        match self.arena.get(p) {
            Pat::Choice(..) => {
                for m in self.arena.members(p) {
                    self.collect_expected(m, out, depth + 1);
                }
            }
            Pat::Interleave(a, b) => {
                self.collect_expected(a, out, depth + 1);
                self.collect_expected(b, out, depth + 1);
            }
            Pat::Group(a, b) => {
                self.collect_expected(a, out, depth + 1);
                if self.nullable(a) {
                    self.collect_expected(b, out, depth + 1);
                }
            }
            Pat::OneOrMore(a) | Pat::After(a, _) => self.collect_expected(a, out, depth + 1),
            Pat::Element(class, _) => describe_class(&self.schema.classes, class, out),
            _ => {}
        }
    }

    /// Attributes that `p` still requires, described for a message.
    fn missing_attributes(&self, p: PatId) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_required(p, &mut out, 0);
        out.sort();
        out.dedup();
        out
    }

    fn collect_required(&self, p: PatId, out: &mut Vec<String>, depth: usize) {
        if depth > super::MAX_PATTERN_DEPTH {
            return;
        }
        match self.arena.get(p) {
            Pat::Group(a, b) | Pat::Interleave(a, b) => {
                self.collect_required(a, out, depth + 1);
                self.collect_required(b, out, depth + 1);
            }
            Pat::Choice(..) => {
                // Something is required only if every alternative requires something.
                let mut all = Vec::new();
                for m in self.arena.members(p) {
                    let mut needed = Vec::new();
                    self.collect_required(m, &mut needed, depth + 1);
                    if needed.is_empty() {
                        return;
                    }
                    all.extend(needed);
                }
                out.extend(all);
            }
            Pat::OneOrMore(a) | Pat::After(a, _) => self.collect_required(a, out, depth + 1),
            Pat::Attribute(class, _) => {
                let mut names = Vec::new();
                describe_class(&self.schema.classes, class, &mut names);
                out.extend(names.into_iter().map(|n| {
                    if n == "any element" {
                        "(any name)".to_owned()
                    } else {
                        n
                    }
                }));
            }
            _ => {}
        }
    }

    /// Describes what a value pattern accepts: literals in backquotes, datatypes by name.
    fn describe_value(&self, p: PatId, out: &mut Vec<String>, depth: usize) {
        if depth > super::MAX_PATTERN_DEPTH || out.len() > 20 {
            return;
        }
        match self.arena.get(p) {
            Pat::Choice(..) => {
                for m in self.arena.members(p) {
                    self.describe_value(m, out, depth + 1);
                }
            }
            Pat::Value(_, lit) => {
                if let Some(l) = self.schema.literals.get(lit as usize) {
                    out.push(format!("`{l}`"));
                }
            }
            Pat::Data(dt) | Pat::DataExcept(dt, _) => {
                if let Some(d) = self.schema.datatypes.get(dt as usize) {
                    out.push(d.describe());
                }
            }
            Pat::Text => out.push("text".to_owned()),
            _ => {}
        }
    }
}
