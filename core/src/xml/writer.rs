//! A tiny XML writer producing libvirt's layout: two-space indentation, single-quoted
//! attributes, one element per line, `<x/>` for empty elements, and libvirt's escaping.
//!
//! quick-xml cannot single-quote attributes, and the layout is simple enough to write directly.

/// Escapes text or an attribute value the way libvirt does (`& < > ' "`). Tab, newline and
/// carriage return are written as character references so that they survive a parse (a parser
/// normalises them in attribute values, and `\r` everywhere).
pub fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

fn escape_attribute(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            c => escape(c.encode_utf8(&mut [0; 4]), out),
        }
    }
}

/// Builds a document line by line.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
    depth: usize,
}

/// An element whose start tag is being written; finish it with [`Tag::empty`] or [`Tag::open`].
#[must_use = "a start tag must be closed"]
pub struct Tag<'w> {
    writer: &'w mut Writer,
}

impl Writer {
    /// A writer at nesting depth zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current indentation prefix.
    pub fn indent(&self) -> String {
        "  ".repeat(self.depth)
    }

    fn push_indent(&mut self) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
    }

    /// Starts `<name` on a new line.
    pub fn tag(&mut self, name: &str) -> Tag<'_> {
        self.push_indent();
        self.out.push('<');
        self.out.push_str(name);
        Tag { writer: self }
    }

    /// Writes `<name>text</name>` on one line.
    pub fn text_element(&mut self, name: &str, text: &str) {
        self.push_indent();
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        escape(text, &mut self.out);
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    /// Closes an element opened with [`Tag::open`].
    pub fn end(&mut self, name: &str) {
        self.depth = self.depth.saturating_sub(1);
        self.push_indent();
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    /// Appends already formatted lines (which must end with a newline).
    pub fn raw(&mut self, text: &str) {
        self.out.push_str(text);
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

impl Tag<'_> {
    /// Adds ` name='value'`.
    pub fn attr(self, name: &str, value: &str) -> Self {
        let out = &mut self.writer.out;
        out.push(' ');
        out.push_str(name);
        out.push_str("='");
        escape_attribute(value, out);
        out.push('\'');
        self
    }

    /// Adds the attribute when there is a value.
    pub fn attr_opt(self, name: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.attr(name, v),
            None => self,
        }
    }

    /// Ends the element as `<name .../>`.
    pub fn empty(self) {
        self.writer.out.push_str("/>\n");
    }

    /// Ends the start tag with `>`; children follow one level deeper until [`Writer::end`].
    pub fn open(self) {
        self.writer.out.push_str(">\n");
        self.writer.depth += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_single_quoted_and_escaped_like_libvirt() {
        let mut w = Writer::new();
        w.tag("disk").attr("name", "a'b&c<d>\"e\nf").empty();
        assert_eq!(
            w.finish(),
            "<disk name='a&apos;b&amp;c&lt;d&gt;&quot;e&#10;f'/>\n"
        );
    }

    #[test]
    fn nested_elements_indent_by_two_spaces() {
        let mut w = Writer::new();
        w.tag("a").open();
        w.text_element("b", "x & y");
        w.tag("c").attr("k", "v").empty();
        w.end("a");
        assert_eq!(w.finish(), "<a>\n  <b>x &amp; y</b>\n  <c k='v'/>\n</a>\n");
    }
}
