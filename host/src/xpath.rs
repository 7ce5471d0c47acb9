//! `--xpath EXPR [--wrap]` of `checkpoint-dumpxml` and `backup-dumpxml`, as virsh prints it.
//!
//! No XPath crate is among the measured ones (reference/crates.md), so the location paths
//! virsh users write are evaluated here on the roxmltree tree the project already parses
//! with: absolute and relative paths (relative ones start at the root element, as in virsh),
//! `//`, name tests and `*`, `.` and `..`, `@name` and `@*`, `text()`, and predicates
//! `[N]`, `[last()]`, `[@a]`, `[@a='v']`, `[child]` and `[child='v']`, with `|` unions.
//! Anything else is refused with the expression's position, never guessed.
//!
//! Output follows virsh: each element is printed as it appears in the document, each
//! attribute or text node as its value, one per line; with `--wrap` the nodes are copied into
//! a `<nodes>` element instead (attributes become its attributes, as libxml2 copies them).

use crate::error::Error;

/// A selected node: an element or text node, or an attribute of an element.
#[derive(Clone, Copy, PartialEq)]
enum Hit<'a, 'i> {
    Node(roxmltree::Node<'a, 'i>),
    Attr(roxmltree::Node<'a, 'i>, &'a str, &'a str),
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Name(String),
    Any,
    Attr(String),
    AnyAttr,
    Text,
    SelfNode,
    Parent,
}

#[derive(Debug, Clone, PartialEq)]
enum Predicate {
    Index(usize),
    Last,
    HasAttr(String),
    AttrEquals(String, String),
    HasChild(String),
    ChildEquals(String, String),
}

#[derive(Debug, Clone, PartialEq)]
struct Step {
    /// `//` before the step: every descendant-or-self of the context first.
    descendants: bool,
    test: Test,
    predicates: Vec<Predicate>,
}

#[derive(Debug, Clone, PartialEq)]
struct Path {
    absolute: bool,
    steps: Vec<Step>,
}

fn bad(expr: &str, at: usize, why: &str) -> Error {
    Error::Other(format!(
        "XPath error: {why} at character {} of '{expr}' (supported: location paths with //, *, @name, text(), .., [N], [last()], [@a='v'], [child='v'], and |)",
        at + 1
    ))
}

struct Parser<'e> {
    expr: &'e str,
    pos: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.expr[self.pos..]
    }

    fn skip_space(&mut self) {
        while self.rest().starts_with(' ') {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn name(&mut self) -> Option<String> {
        self.skip_space();
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
            .unwrap_or(self.rest().len());
        (len > 0).then(|| {
            let n = self.rest()[..len].to_owned();
            self.pos += len;
            n
        })
    }

    fn literal(&mut self) -> Result<String, Error> {
        self.skip_space();
        let quote = self.rest().chars().next();
        let Some(q @ ('\'' | '"')) = quote else {
            return Err(bad(self.expr, self.pos, "expected a quoted string"));
        };
        let body = &self.rest()[1..];
        let Some(end) = body.find(q) else {
            return Err(bad(self.expr, self.pos, "unterminated string"));
        };
        let value = body[..end].to_owned();
        self.pos += end + 2;
        Ok(value)
    }

    fn predicate(&mut self) -> Result<Predicate, Error> {
        self.skip_space();
        let digits: String = self
            .rest()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let p = if !digits.is_empty() {
            self.pos += digits.len();
            match digits.parse::<usize>() {
                Ok(n) if n > 0 => Predicate::Index(n),
                _ => return Err(bad(self.expr, self.pos, "positions start at 1")),
            }
        } else if self.eat("last()") {
            Predicate::Last
        } else if self.eat("@") {
            let name = self
                .name()
                .ok_or_else(|| bad(self.expr, self.pos, "expected an attribute name"))?;
            if self.eat("=") {
                Predicate::AttrEquals(name, self.literal()?)
            } else {
                Predicate::HasAttr(name)
            }
        } else if let Some(name) = self.name() {
            if self.eat("=") {
                Predicate::ChildEquals(name, self.literal()?)
            } else {
                Predicate::HasChild(name)
            }
        } else {
            return Err(bad(self.expr, self.pos, "unsupported predicate"));
        };
        if !self.eat("]") {
            return Err(bad(self.expr, self.pos, "expected ']'"));
        }
        Ok(p)
    }

    fn step(&mut self, descendants: bool) -> Result<Step, Error> {
        self.skip_space();
        let test = if self.eat("..") {
            Test::Parent
        } else if self.eat(".") {
            Test::SelfNode
        } else if self.eat("text()") {
            Test::Text
        } else if self.eat("@*") {
            Test::AnyAttr
        } else if self.eat("@") {
            Test::Attr(
                self.name()
                    .ok_or_else(|| bad(self.expr, self.pos, "expected an attribute name"))?,
            )
        } else if self.eat("*") {
            Test::Any
        } else if let Some(n) = self.name() {
            if self.rest().starts_with('(') {
                return Err(bad(self.expr, self.pos, "functions are not supported"));
            }
            Test::Name(n)
        } else {
            return Err(bad(self.expr, self.pos, "expected a step"));
        };
        let mut predicates = Vec::new();
        while self.eat("[") {
            predicates.push(self.predicate()?);
        }
        Ok(Step {
            descendants,
            test,
            predicates,
        })
    }

    fn path(&mut self) -> Result<Path, Error> {
        self.skip_space();
        let mut steps = Vec::new();
        let absolute = self.rest().starts_with('/');
        let mut descendants = if self.eat("//") {
            true
        } else {
            self.eat("/");
            false
        };
        loop {
            steps.push(self.step(descendants)?);
            if self.eat("//") {
                descendants = true;
            } else if self.eat("/") {
                descendants = false;
            } else {
                break;
            }
        }
        Ok(Path { absolute, steps })
    }
}

fn parse(expr: &str) -> Result<Vec<Path>, Error> {
    let mut p = Parser { expr, pos: 0 };
    let mut paths = vec![p.path()?];
    while p.eat("|") {
        paths.push(p.path()?);
    }
    p.skip_space();
    if !p.rest().is_empty() {
        return Err(bad(expr, p.pos, "unexpected text"));
    }
    Ok(paths)
}

fn matches_predicate(node: roxmltree::Node<'_, '_>, pred: &Predicate) -> bool {
    let child_texts = |name: &str| -> Vec<String> {
        node.children()
            .filter(|c| c.is_element() && c.tag_name().name() == name)
            .map(|c| c.text().unwrap_or_default().to_owned())
            .collect()
    };
    match pred {
        Predicate::HasAttr(a) => node.attribute(a.as_str()).is_some(),
        Predicate::AttrEquals(a, v) => node.attribute(a.as_str()) == Some(v.as_str()),
        Predicate::HasChild(n) => !child_texts(n).is_empty(),
        Predicate::ChildEquals(n, v) => child_texts(n).iter().any(|t| t == v),
        Predicate::Index(_) | Predicate::Last => true,
    }
}

fn apply_step<'a, 'i>(context: &[Hit<'a, 'i>], step: &Step) -> Vec<Hit<'a, 'i>> {
    let mut out: Vec<Hit<'a, 'i>> = Vec::new();
    for hit in context {
        let Hit::Node(node) = *hit else { continue };
        let bases: Vec<roxmltree::Node<'a, 'i>> = if step.descendants {
            node.descendants().collect()
        } else {
            vec![node]
        };
        for base in bases {
            // Positional predicates count within each base's own selection, as XPath does.
            let mut selected: Vec<Hit<'a, 'i>> = match &step.test {
                Test::Name(n) => base
                    .children()
                    .filter(|c| c.is_element() && c.tag_name().name() == n)
                    .map(Hit::Node)
                    .collect(),
                Test::Any => base
                    .children()
                    .filter(roxmltree::Node::is_element)
                    .map(Hit::Node)
                    .collect(),
                Test::Text => base
                    .children()
                    .filter(roxmltree::Node::is_text)
                    .map(Hit::Node)
                    .collect(),
                Test::Attr(a) => base
                    .attributes()
                    .filter(|x| x.name() == a)
                    .map(|x| Hit::Attr(base, x.name(), x.value()))
                    .collect(),
                Test::AnyAttr => base
                    .attributes()
                    .map(|x| Hit::Attr(base, x.name(), x.value()))
                    .collect(),
                Test::SelfNode => vec![Hit::Node(base)],
                Test::Parent => base.parent().map(Hit::Node).into_iter().collect(),
            };
            for pred in &step.predicates {
                selected = match pred {
                    Predicate::Index(n) => selected.get(n - 1).copied().into_iter().collect(),
                    Predicate::Last => selected.last().copied().into_iter().collect(),
                    _ => selected
                        .into_iter()
                        .filter(|h| matches!(h, Hit::Node(n) if matches_predicate(*n, pred)))
                        .collect(),
                };
            }
            for h in selected {
                if !out.contains(&h) {
                    out.push(h);
                }
            }
        }
    }
    out
}

/// The text `--xpath EXPR` prints for `xml` (with `wrap`: inside `<nodes>`), or an error when
/// the expression is outside the supported subset. A path selecting nothing prints nothing.
pub fn select(xml: &str, expr: &str, wrap: bool) -> Result<String, Error> {
    let paths = parse(expr)?;
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::Other(format!("internal error: document does not parse: {e}")))?;
    let mut hits: Vec<Hit<'_, '_>> = Vec::new();
    for path in &paths {
        let start = if path.absolute {
            doc.root()
        } else {
            doc.root_element()
        };
        let mut context = vec![Hit::Node(start)];
        for step in &path.steps {
            context = apply_step(&context, step);
        }
        for h in context {
            if !hits.contains(&h) {
                hits.push(h);
            }
        }
    }
    if wrap {
        return Ok(wrapped(xml, &hits));
    }
    let mut out = String::new();
    for hit in &hits {
        match hit {
            Hit::Node(n) if n.is_element() => out.push_str(&xml[n.range()]),
            Hit::Node(n) if n.is_root() => out.push_str(xml.trim_end()),
            Hit::Node(n) => out.push_str(n.text().unwrap_or_default()),
            Hit::Attr(_, _, value) => out.push_str(value),
        }
        out.push('\n');
    }
    Ok(out)
}

/// virsh's `--wrap`: the selected nodes copied into a new `<nodes>` element, so selected
/// attributes become its attributes and elements and text its children.
fn wrapped(xml: &str, hits: &[Hit<'_, '_>]) -> String {
    let mut open = String::from("<nodes");
    let mut children = String::new();
    for hit in hits {
        match hit {
            Hit::Attr(_, name, value) => {
                open.push_str(&format!(" {name}=\"{}\"", crate::domains::esc(value)));
            }
            Hit::Node(n) if n.is_element() => {
                children.push_str(&format!("  {}\n", &xml[n.range()]));
            }
            Hit::Node(n) if n.is_root() => {
                children.push_str(&format!("  {}\n", xml.trim()));
            }
            Hit::Node(n) => {
                children.push_str(&format!(
                    "  {}\n",
                    crate::domains::esc(n.text().unwrap_or_default())
                ));
            }
        }
    }
    if children.is_empty() {
        format!("{open}/>\n")
    } else {
        format!("{open}>\n{children}</nodes>\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domaincheckpoint>\n  <name>c1</name>\n  <disks>\n    <disk name='vda' checkpoint='bitmap' bitmap='c1'/>\n    <disk name='vdb' checkpoint='no'/>\n  </disks>\n</domaincheckpoint>\n";

    #[test]
    fn elements_print_as_written_and_attributes_and_text_as_values() {
        assert_eq!(
            select(XML, "/domaincheckpoint/disks/disk[@checkpoint='no']", false).unwrap(),
            "<disk name='vdb' checkpoint='no'/>\n"
        );
        assert_eq!(select(XML, "//disk/@name", false).unwrap(), "vda\nvdb\n");
        assert_eq!(select(XML, "name/text()", false).unwrap(), "c1\n");
        assert!(select(XML, "string(name)", false).is_err());
        assert_eq!(select(XML, "//nothing", false).unwrap(), "");
        assert_eq!(
            select(XML, "//disk[last()]/@name | /domaincheckpoint/name", false).unwrap(),
            "vdb\n<name>c1</name>\n"
        );
        assert_eq!(
            select(XML, "disks/disk[1]/@*", false).unwrap(),
            "vda\nbitmap\nc1\n"
        );
    }

    #[test]
    fn wrap_puts_the_nodes_in_one_element() {
        assert_eq!(
            select(XML, "//disk", true).unwrap(),
            "<nodes>\n  <disk name='vda' checkpoint='bitmap' bitmap='c1'/>\n  <disk name='vdb' checkpoint='no'/>\n</nodes>\n"
        );
        assert_eq!(
            select(XML, "//disk/@bitmap", true).unwrap(),
            "<nodes bitmap=\"c1\"/>\n"
        );
    }

    #[test]
    fn a_child_value_predicate_and_parent_steps_work() {
        assert_eq!(
            select(XML, "/*[name='c1']/disks/disk/../../name", false).unwrap(),
            "<name>c1</name>\n"
        );
        assert!(select(XML, "//disk[", false).is_err());
    }
}
