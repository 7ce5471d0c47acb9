//! Compilation of a RELAX NG grammar in XML syntax into hash-consed patterns.
//!
//! This performs the simplification of the RELAX NG specification (section 4) on the fly:
//! `define`s are combined and inlined, `optional`/`zeroOrMore`/`mixed` become their core forms,
//! multi-child patterns become binary groups, and namespaces and datatype libraries are
//! inherited. Recursion is only possible through `element`, whose content is compiled later into
//! a slot table, so every reference resolves to a finite pattern.

use std::collections::BTreeMap;

use roxmltree::{Node, NodeId};

use super::Schema;
use super::datatype::Datatype;
use super::hash::FastMap;
use super::pattern::{
    Arena, EMPTY, NOT_ALLOWED, NameClass, Pat, PatId, Symbols, TEXT, class_contains,
};

/// Namespace of RELAX NG's XML syntax.
pub(crate) const RNG_NS: &str = "http://relaxng.org/ns/structure/1.0";

/// A grammar that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct SchemaError {
    /// 1-based line in the grammar source (0 when the source is not well-formed).
    pub line: u32,
    /// 1-based column in the grammar source.
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

/// Upper bound on nested pattern elements in a grammar, to keep compilation's recursion bounded.
const MAX_GRAMMAR_DEPTH: usize = 200;

/// Upper bound on the depth of a compiled pattern (long sequences nest too), which bounds the
/// recursion of validation together with the document depth limit.
const MAX_COMPILED_DEPTH: u32 = 1000;

#[derive(Debug, Clone, Copy)]
enum DefineState {
    InProgress,
    Done(PatId),
}

struct Scope<'a, 'input> {
    parent: Option<usize>,
    defines: BTreeMap<String, Vec<Node<'a, 'input>>>,
    starts: Vec<Node<'a, 'input>>,
    state: BTreeMap<String, DefineState>,
}

struct Compiler<'a, 'input> {
    doc: &'a roxmltree::Document<'input>,
    arena: Arena,
    classes: Vec<NameClass>,
    datatypes: Vec<Datatype>,
    literals: Vec<String>,
    contents: Vec<PatId>,
    scopes: Vec<Scope<'a, 'input>>,
    elements: FastMap<NodeId, PatId>,
    pending: Vec<(u32, Node<'a, 'input>, usize)>,
    depth: usize,
}

/// Compiles grammar source text.
pub(crate) fn compile(source: &str) -> Result<Schema, SchemaError> {
    let doc = roxmltree::Document::parse(source).map_err(|e| {
        let pos = e.pos();
        SchemaError {
            line: pos.row,
            column: pos.col,
            message: format!("grammar is not well-formed XML: {e}"),
        }
    })?;
    let mut c = Compiler {
        doc: &doc,
        arena: Arena::default(),
        classes: Vec::new(),
        datatypes: Vec::new(),
        literals: Vec::new(),
        contents: Vec::new(),
        scopes: Vec::new(),
        elements: FastMap::default(),
        pending: Vec::new(),
        depth: 0,
    };
    let root = doc.root_element();
    if root.tag_name().namespace() != Some(RNG_NS) {
        return Err(c.error(root, "the root element is not in the RELAX NG namespace"));
    }
    let start = if local(root) == "grammar" {
        let scope = c.open_grammar(root, None)?;
        c.grammar_start(root, scope)?
    } else {
        c.scopes.push(Scope {
            parent: None,
            defines: BTreeMap::new(),
            starts: Vec::new(),
            state: BTreeMap::new(),
        });
        c.pattern(root, 0)?
    };
    while let Some((slot, node, scope)) = c.pending.pop() {
        let content = c.element_content(node, scope)?;
        if c.arena.depth(content) > MAX_COMPILED_DEPTH {
            return Err(c.error(
                node,
                "the content of this element nests patterns too deeply",
            ));
        }
        c.contents[slot as usize] = content;
    }
    if c.arena.depth(start) > MAX_COMPILED_DEPTH {
        return Err(c.error(root, "the start pattern nests patterns too deeply"));
    }
    let symbols = Symbols::new(&c.classes);
    let mut class_matches = vec![false; c.classes.len() * symbols.len()];
    for class in 0..c.classes.len() {
        for (sym, (ns, local)) in symbols.names.iter().enumerate() {
            class_matches[class * symbols.len() + sym] =
                class_contains(&c.classes, class as u32, ns, local.as_deref());
        }
    }
    Ok(Schema {
        arena: c.arena,
        start,
        contents: c.contents,
        classes: c.classes,
        datatypes: c.datatypes,
        literals: c.literals,
        symbols,
        class_matches,
    })
}

fn local<'a>(node: Node<'a, '_>) -> &'a str {
    node.tag_name().name()
}

/// Child elements in the RELAX NG namespace; foreign elements are annotations.
fn rng_children<'a, 'input>(node: Node<'a, 'input>) -> impl Iterator<Item = Node<'a, 'input>> {
    node.children()
        .filter(|n| n.is_element() && n.tag_name().namespace() == Some(RNG_NS))
}

fn text_content(node: Node<'_, '_>) -> String {
    node.children()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect()
}

impl<'a, 'input> Compiler<'a, 'input> {
    fn error(&self, node: Node<'_, '_>, message: impl Into<String>) -> SchemaError {
        let pos = self.doc.text_pos_at(node.range().start);
        SchemaError {
            line: pos.row,
            column: pos.col,
            message: message.into(),
        }
    }

    fn open_grammar(
        &mut self,
        grammar: Node<'a, 'input>,
        parent: Option<usize>,
    ) -> Result<usize, SchemaError> {
        let mut scope = Scope {
            parent,
            defines: BTreeMap::new(),
            starts: Vec::new(),
            state: BTreeMap::new(),
        };
        self.collect_components(grammar, &mut scope, 0)?;
        self.scopes.push(scope);
        Ok(self.scopes.len() - 1)
    }

    fn collect_components(
        &self,
        container: Node<'a, 'input>,
        scope: &mut Scope<'a, 'input>,
        depth: usize,
    ) -> Result<(), SchemaError> {
        if depth > MAX_GRAMMAR_DEPTH {
            return Err(self.error(container, "`div` nesting is too deep"));
        }
        for child in rng_children(container) {
            match local(child) {
                "start" => scope.starts.push(child),
                "define" => {
                    let name = child
                        .attribute("name")
                        .ok_or_else(|| self.error(child, "`define` needs a `name`"))?;
                    scope
                        .defines
                        .entry(name.trim().to_owned())
                        .or_default()
                        .push(child);
                }
                "div" => self.collect_components(child, scope, depth + 1)?,
                "include" => {
                    return Err(self.error(child, "`include` is not supported"));
                }
                other => {
                    return Err(self.error(child, format!("unexpected `{other}` in a grammar")));
                }
            }
        }
        Ok(())
    }

    fn grammar_start(
        &mut self,
        grammar: Node<'a, 'input>,
        scope: usize,
    ) -> Result<PatId, SchemaError> {
        let starts = self.scopes[scope].starts.clone();
        if starts.is_empty() {
            return Err(self.error(grammar, "the grammar has no `start`"));
        }
        self.combine(&starts, scope)
    }

    /// Combines the bodies of several `start` or `define` elements according to `combine`.
    fn combine(&mut self, parts: &[Node<'a, 'input>], scope: usize) -> Result<PatId, SchemaError> {
        let mut method: Option<&str> = None;
        let mut without = 0;
        for part in parts {
            match part.attribute("combine").map(str::trim) {
                None => without += 1,
                Some(m @ ("choice" | "interleave")) => {
                    if method.is_some_and(|old| old != m) {
                        return Err(self.error(*part, "conflicting `combine` methods"));
                    }
                    method = Some(m);
                }
                Some(other) => {
                    return Err(self.error(*part, format!("unknown combine method `{other}`")));
                }
            }
        }
        if parts.len() > 1 && without > 1 {
            return Err(self.error(parts[1], "several definitions without `combine`"));
        }
        let mut result = None;
        for part in parts {
            let body = self.group_children(*part, scope)?;
            result = Some(match (result, method) {
                (None, _) => body,
                (Some(acc), Some("interleave")) => self.arena.interleave(acc, body),
                (Some(acc), _) => self.arena.choice(acc, body),
            });
        }
        result.ok_or_else(|| self.error(parts[0], "empty definition"))
    }

    /// The children of `node` as one pattern (a group when there are several).
    fn group_children(
        &mut self,
        node: Node<'a, 'input>,
        scope: usize,
    ) -> Result<PatId, SchemaError> {
        let mut result: Option<PatId> = None;
        for child in rng_children(node) {
            let p = self.pattern(child, scope)?;
            result = Some(match result {
                None => p,
                Some(acc) => self.arena.group(acc, p),
            });
        }
        result.ok_or_else(|| self.error(node, format!("`{}` needs a pattern", local(node))))
    }

    fn pattern(&mut self, node: Node<'a, 'input>, scope: usize) -> Result<PatId, SchemaError> {
        self.depth += 1;
        let result = if self.depth > MAX_GRAMMAR_DEPTH {
            Err(self.error(node, "patterns are nested too deeply"))
        } else {
            self.pattern_inner(node, scope)
        };
        self.depth -= 1;
        result
    }

    fn pattern_inner(
        &mut self,
        node: Node<'a, 'input>,
        scope: usize,
    ) -> Result<PatId, SchemaError> {
        match local(node) {
            "element" => {
                if let Some(&p) = self.elements.get(&node.id()) {
                    return Ok(p);
                }
                let class = match node.attribute("name") {
                    Some(name) => self.name_attribute(node, name, true)?,
                    None => {
                        let first = rng_children(node)
                            .next()
                            .ok_or_else(|| self.error(node, "`element` needs a name class"))?;
                        self.name_class(first)?
                    }
                };
                let slot = u32::try_from(self.contents.len()).unwrap_or(u32::MAX);
                self.contents.push(NOT_ALLOWED);
                self.pending.push((slot, node, scope));
                let p = self.arena.intern(Pat::Element(class, slot));
                self.elements.insert(node.id(), p);
                Ok(p)
            }
            "attribute" => {
                let mut children = rng_children(node);
                let class = match node.attribute("name") {
                    Some(name) => self.name_attribute(node, name, false)?,
                    None => {
                        let first = children
                            .next()
                            .ok_or_else(|| self.error(node, "`attribute` needs a name class"))?;
                        self.name_class(first)?
                    }
                };
                let content = match children.next() {
                    Some(child) => self.pattern(child, scope)?,
                    None => TEXT,
                };
                if children.next().is_some() {
                    return Err(self.error(node, "`attribute` takes a single pattern"));
                }
                Ok(self.arena.intern(Pat::Attribute(class, content)))
            }
            "choice" => self.choice_children(node, scope),
            "group" | "interleave" => {
                let kind = local(node);
                let mut result: Option<PatId> = None;
                for child in rng_children(node) {
                    let p = self.pattern(child, scope)?;
                    result = Some(match result {
                        None => p,
                        Some(acc) => match kind {
                            "group" => self.arena.group(acc, p),
                            _ => self.arena.interleave(acc, p),
                        },
                    });
                }
                result.ok_or_else(|| self.error(node, format!("`{kind}` needs a pattern")))
            }
            "optional" => {
                let p = self.group_children(node, scope)?;
                Ok(self.arena.choice(p, EMPTY))
            }
            "zeroOrMore" => {
                let p = self.group_children(node, scope)?;
                let more = self.arena.one_or_more(p);
                Ok(self.arena.choice(more, EMPTY))
            }
            "oneOrMore" => {
                let p = self.group_children(node, scope)?;
                Ok(self.arena.one_or_more(p))
            }
            "mixed" => {
                let p = self.group_children(node, scope)?;
                Ok(self.arena.interleave(p, TEXT))
            }
            "empty" => Ok(EMPTY),
            "text" => Ok(TEXT),
            "notAllowed" => Ok(NOT_ALLOWED),
            "ref" | "parentRef" => {
                let name = node
                    .attribute("name")
                    .ok_or_else(|| self.error(node, "a reference needs a `name`"))?
                    .trim()
                    .to_owned();
                let target = if local(node) == "parentRef" {
                    self.scopes[scope]
                        .parent
                        .ok_or_else(|| self.error(node, "`parentRef` outside a nested grammar"))?
                } else {
                    scope
                };
                self.reference(node, &name, target)
            }
            "grammar" => {
                let inner = self.open_grammar(node, Some(scope))?;
                self.grammar_start(node, inner)
            }
            "value" => {
                let datatype = match node.attribute("type") {
                    Some(t) => self.datatype(node, t.trim())?,
                    None => Datatype::new("", "token").map_err(|e| self.error(node, e))?,
                };
                let literal = text_content(node);
                if !datatype.allows(&literal) {
                    return Err(self.error(
                        node,
                        format!("value `{literal}` is not a valid value of its type"),
                    ));
                }
                let dt = self.push_datatype(datatype);
                let lit = u32::try_from(self.literals.len()).unwrap_or(u32::MAX);
                self.literals.push(literal);
                Ok(self.arena.intern(Pat::Value(dt, lit)))
            }
            "data" => {
                let type_name = node
                    .attribute("type")
                    .ok_or_else(|| self.error(node, "`data` needs a `type`"))?
                    .trim();
                let mut datatype = self.datatype(node, type_name)?;
                let mut except = None;
                for child in rng_children(node) {
                    match local(child) {
                        "param" if except.is_none() => {
                            let name = child
                                .attribute("name")
                                .ok_or_else(|| self.error(child, "`param` needs a `name`"))?;
                            datatype
                                .add_param(name.trim(), &text_content(child))
                                .map_err(|e| self.error(child, e))?;
                        }
                        "except" if except.is_none() => {
                            except = Some(self.choice_children(child, scope)?);
                        }
                        other => {
                            return Err(
                                self.error(child, format!("unexpected `{other}` in `data`"))
                            );
                        }
                    }
                }
                let dt = self.push_datatype(datatype);
                Ok(match except {
                    Some(e) => self.arena.intern(Pat::DataExcept(dt, e)),
                    None => self.arena.intern(Pat::Data(dt)),
                })
            }
            other @ ("list" | "externalRef" | "include") => {
                Err(self.error(node, format!("`{other}` is not supported")))
            }
            other => Err(self.error(node, format!("unknown pattern `{other}`"))),
        }
    }

    /// The children of `node` as one choice, built at once so long value lists stay linear.
    fn choice_children(
        &mut self,
        node: Node<'a, 'input>,
        scope: usize,
    ) -> Result<PatId, SchemaError> {
        let mut members = Vec::new();
        for child in rng_children(node) {
            members.push(self.pattern(child, scope)?);
        }
        if members.is_empty() {
            return Err(self.error(node, format!("`{}` needs a pattern", local(node))));
        }
        Ok(self.arena.choice_many(&members))
    }

    fn element_content(
        &mut self,
        node: Node<'a, 'input>,
        scope: usize,
    ) -> Result<PatId, SchemaError> {
        let mut children = rng_children(node);
        if node.attribute("name").is_none() {
            children.next();
        }
        let mut result: Option<PatId> = None;
        for child in children {
            let p = self.pattern(child, scope)?;
            result = Some(match result {
                None => p,
                Some(acc) => self.arena.group(acc, p),
            });
        }
        result.ok_or_else(|| self.error(node, "`element` needs a content pattern"))
    }

    fn reference(
        &mut self,
        node: Node<'a, 'input>,
        name: &str,
        scope: usize,
    ) -> Result<PatId, SchemaError> {
        match self.scopes[scope].state.get(name) {
            Some(DefineState::Done(p)) => return Ok(*p),
            Some(DefineState::InProgress) => {
                return Err(self.error(
                    node,
                    format!("reference to `{name}` is recursive outside an element"),
                ));
            }
            None => {}
        }
        let parts = self.scopes[scope]
            .defines
            .get(name)
            .cloned()
            .ok_or_else(|| self.error(node, format!("reference to undefined `{name}`")))?;
        self.scopes[scope]
            .state
            .insert(name.to_owned(), DefineState::InProgress);
        let p = self.combine(&parts, scope)?;
        self.scopes[scope]
            .state
            .insert(name.to_owned(), DefineState::Done(p));
        Ok(p)
    }

    fn push_datatype(&mut self, datatype: Datatype) -> u32 {
        self.datatypes.push(datatype);
        u32::try_from(self.datatypes.len() - 1).unwrap_or(u32::MAX)
    }

    fn datatype(&self, node: Node<'_, '_>, name: &str) -> Result<Datatype, SchemaError> {
        let library = node
            .ancestors()
            .find_map(|n| n.attribute("datatypeLibrary"))
            .unwrap_or("");
        Datatype::new(library.trim(), name).map_err(|e| self.error(node, e))
    }

    fn push_class(&mut self, class: NameClass) -> u32 {
        if let Some(i) = self.classes.iter().position(|c| *c == class) {
            return u32::try_from(i).unwrap_or(u32::MAX);
        }
        self.classes.push(class);
        u32::try_from(self.classes.len() - 1).unwrap_or(u32::MAX)
    }

    /// The `name` attribute of `element` or `attribute`.
    fn name_attribute(
        &mut self,
        node: Node<'_, '_>,
        name: &str,
        is_element: bool,
    ) -> Result<u32, SchemaError> {
        let inherited = if is_element {
            node.ancestors()
                .find_map(|n| n.attribute("ns"))
                .unwrap_or("")
        } else {
            node.attribute("ns").unwrap_or("")
        };
        let (ns, local) = self.qname(node, name.trim(), inherited)?;
        Ok(self.push_class(NameClass::Name(ns, local)))
    }

    fn qname(
        &self,
        node: Node<'_, '_>,
        qname: &str,
        inherited: &str,
    ) -> Result<(String, String), SchemaError> {
        match qname.split_once(':') {
            Some((prefix, local)) => {
                let ns = node.lookup_namespace_uri(Some(prefix)).ok_or_else(|| {
                    self.error(node, format!("undeclared namespace prefix `{prefix}`"))
                })?;
                Ok((ns.to_owned(), local.to_owned()))
            }
            None => Ok((inherited.to_owned(), qname.to_owned())),
        }
    }

    fn name_class(&mut self, node: Node<'_, '_>) -> Result<u32, SchemaError> {
        self.depth += 1;
        let result = if self.depth > MAX_GRAMMAR_DEPTH {
            Err(self.error(node, "name classes are nested too deeply"))
        } else {
            self.name_class_inner(node)
        };
        self.depth -= 1;
        result
    }

    fn name_class_inner(&mut self, node: Node<'_, '_>) -> Result<u32, SchemaError> {
        let inherited = node
            .ancestors()
            .find_map(|n| n.attribute("ns"))
            .unwrap_or("");
        let except = |c: &mut Self| -> Result<Option<u32>, SchemaError> {
            match rng_children(node).next() {
                Some(e) if local(e) == "except" => {
                    let mut result = None;
                    for child in rng_children(e) {
                        let nc = c.name_class(child)?;
                        result = Some(match result {
                            None => nc,
                            Some(acc) => c.push_class(NameClass::Choice(acc, nc)),
                        });
                    }
                    Ok(result)
                }
                Some(other) => Err(c.error(other, "only `except` may appear here")),
                None => Ok(None),
            }
        };
        match local(node) {
            "name" => {
                let (ns, local) = self.qname(node, text_content(node).trim(), inherited)?;
                Ok(self.push_class(NameClass::Name(ns, local)))
            }
            "anyName" => {
                let e = except(self)?;
                Ok(self.push_class(NameClass::AnyName(e)))
            }
            "nsName" => {
                let e = except(self)?;
                Ok(self.push_class(NameClass::NsName(inherited.to_owned(), e)))
            }
            "choice" => {
                let mut result = None;
                for child in rng_children(node) {
                    let nc = self.name_class(child)?;
                    result = Some(match result {
                        None => nc,
                        Some(acc) => self.push_class(NameClass::Choice(acc, nc)),
                    });
                }
                result.ok_or_else(|| self.error(node, "`choice` needs a name class"))
            }
            other => Err(self.error(node, format!("`{other}` is not a name class"))),
        }
    }
}
