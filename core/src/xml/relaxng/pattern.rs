//! Hash-consed patterns, name classes and the symbol table of a compiled grammar.
//!
//! Every pattern lives once in an [`Arena`] and is named by a [`PatId`]; equal structures get
//! equal ids, so memo tables can be keyed by id. The constructors apply the usual
//! simplifications (`notAllowed` absorbs, `empty` is neutral, choices are sets), which keeps the
//! number of distinct derivatives finite and small.

use super::hash::FastMap;

/// Identifier of a pattern in an [`Arena`].
pub(crate) type PatId = u32;

/// The empty sequence.
pub(crate) const EMPTY: PatId = 0;
/// Matches nothing.
pub(crate) const NOT_ALLOWED: PatId = 1;
/// Any text.
pub(crate) const TEXT: PatId = 2;

/// One pattern node. Element contents are referenced through a slot so that recursive grammars
/// stay finite: the slot table is filled once the whole grammar is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Pat {
    Empty,
    NotAllowed,
    Text,
    Choice(PatId, PatId),
    Interleave(PatId, PatId),
    Group(PatId, PatId),
    OneOrMore(PatId),
    /// The content still to match inside the current element, then what follows it.
    After(PatId, PatId),
    /// Name class, element content slot.
    Element(u32, u32),
    /// Name class, value pattern.
    Attribute(u32, PatId),
    /// Datatype index.
    Data(u32),
    /// Datatype index, excluded values.
    DataExcept(u32, PatId),
    /// Datatype index, literal index.
    Value(u32, u32),
}

/// Interning store of patterns with their nullability.
#[derive(Debug, Clone)]
pub(crate) struct Arena {
    pats: Vec<Pat>,
    nullable: Vec<bool>,
    /// Nesting depth, not counting the right spine of choice lists (which is walked in loops).
    depth: Vec<u32>,
    index: FastMap<Pat, PatId>,
    scratch: Vec<PatId>,
}

impl Default for Arena {
    fn default() -> Self {
        let mut arena = Arena {
            pats: Vec::new(),
            nullable: Vec::new(),
            depth: Vec::new(),
            index: FastMap::default(),
            scratch: Vec::new(),
        };
        let empty = arena.intern(Pat::Empty);
        let not_allowed = arena.intern(Pat::NotAllowed);
        let text = arena.intern(Pat::Text);
        debug_assert_eq!((empty, not_allowed, text), (EMPTY, NOT_ALLOWED, TEXT));
        arena
    }
}

impl Arena {
    /// Number of distinct patterns.
    pub(crate) fn len(&self) -> usize {
        self.pats.len()
    }

    #[inline]
    pub(crate) fn get(&self, id: PatId) -> Pat {
        self.pats[id as usize]
    }

    /// Whether the pattern matches the empty sequence.
    #[inline]
    pub(crate) fn nullable(&self, id: PatId) -> bool {
        self.nullable[id as usize]
    }

    /// Nesting depth of a pattern (choice lists count as one level).
    pub(crate) fn depth(&self, id: PatId) -> u32 {
        self.depth[id as usize]
    }

    /// The members of a choice list (the pattern itself if it is not a choice).
    pub(crate) fn members(&self, p: PatId) -> Vec<PatId> {
        let mut out = Vec::new();
        self.collect_choice(p, &mut out);
        out
    }

    /// The choice of all `items` (each may itself be a choice).
    pub(crate) fn choice_many(&mut self, items: &[PatId]) -> PatId {
        let mut flat = std::mem::take(&mut self.scratch);
        flat.clear();
        for &item in items {
            self.collect_choice(item, &mut flat);
        }
        flat.sort_unstable();
        flat.dedup();
        flat.retain(|&p| p != NOT_ALLOWED);
        let mut result = NOT_ALLOWED;
        if let Some((&last, rest)) = flat.split_last() {
            result = last;
            for &item in rest.iter().rev() {
                result = self.intern(Pat::Choice(item, result));
            }
        }
        self.scratch = flat;
        result
    }

    /// Returns the id of `pat`, adding it if it is new. No simplification happens here.
    pub(crate) fn intern(&mut self, pat: Pat) -> PatId {
        if let Some(&id) = self.index.get(&pat) {
            return id;
        }
        let n = |id: PatId| self.nullable[id as usize];
        let nullable = match pat {
            Pat::Empty | Pat::Text => true,
            Pat::Choice(a, b) => n(a) || n(b),
            Pat::Group(a, b) | Pat::Interleave(a, b) => n(a) && n(b),
            Pat::OneOrMore(a) => n(a),
            Pat::NotAllowed
            | Pat::After(..)
            | Pat::Element(..)
            | Pat::Attribute(..)
            | Pat::Data(_)
            | Pat::DataExcept(..)
            | Pat::Value(..) => false,
        };
        let d = |id: PatId| self.depth[id as usize];
        let depth = match pat {
            Pat::Choice(a, b) => (d(a) + 1).max(d(b)),
            Pat::Group(a, b) | Pat::Interleave(a, b) | Pat::After(a, b) => d(a).max(d(b)) + 1,
            Pat::OneOrMore(a) | Pat::Attribute(_, a) | Pat::DataExcept(_, a) => d(a) + 1,
            Pat::Empty
            | Pat::NotAllowed
            | Pat::Text
            | Pat::Element(..)
            | Pat::Data(_)
            | Pat::Value(..) => 1,
        };
        let id = u32::try_from(self.pats.len()).unwrap_or(u32::MAX);
        self.pats.push(pat);
        self.nullable.push(nullable);
        self.depth.push(depth);
        self.index.insert(pat, id);
        id
    }

    /// `a | b`, kept as a sorted, duplicate-free right-nested list.
    pub(crate) fn choice(&mut self, a: PatId, b: PatId) -> PatId {
        if a == b || b == NOT_ALLOWED {
            return a;
        }
        if a == NOT_ALLOWED {
            return b;
        }
        let a_is_choice = matches!(self.get(a), Pat::Choice(..));
        let b_is_choice = matches!(self.get(b), Pat::Choice(..));
        if !a_is_choice && !b_is_choice {
            let (x, y) = if a < b { (a, b) } else { (b, a) };
            return self.intern(Pat::Choice(x, y));
        }
        self.choice_many(&[a, b])
    }

    fn collect_choice(&self, mut p: PatId, out: &mut Vec<PatId>) {
        // Choices are right-nested lists whose members are never choices themselves.
        loop {
            match self.get(p) {
                Pat::Choice(x, y) => {
                    out.push(x);
                    p = y;
                }
                _ => {
                    out.push(p);
                    return;
                }
            }
        }
    }

    /// `a , b`.
    pub(crate) fn group(&mut self, a: PatId, b: PatId) -> PatId {
        self.both(a, b, Pat::Group)
    }

    /// `a & b`.
    pub(crate) fn interleave(&mut self, a: PatId, b: PatId) -> PatId {
        self.both(a, b, Pat::Interleave)
    }

    /// A group or interleave of `a` and `b`, simplified alike: `notAllowed` in either makes the
    /// whole `notAllowed`, and `empty` drops out.
    fn both(&mut self, a: PatId, b: PatId, make: fn(PatId, PatId) -> Pat) -> PatId {
        if a == NOT_ALLOWED || b == NOT_ALLOWED {
            NOT_ALLOWED
        } else if a == EMPTY {
            b
        } else if b == EMPTY {
            a
        } else {
            self.intern(make(a, b))
        }
    }

    /// `a+`.
    pub(crate) fn one_or_more(&mut self, a: PatId) -> PatId {
        if a == NOT_ALLOWED || a == EMPTY {
            a
        } else {
            self.intern(Pat::OneOrMore(a))
        }
    }

    /// Content `a` of the current element, followed by `b` once it ends.
    pub(crate) fn after(&mut self, a: PatId, b: PatId) -> PatId {
        if a == NOT_ALLOWED || b == NOT_ALLOWED {
            NOT_ALLOWED
        } else {
            self.intern(Pat::After(a, b))
        }
    }
}

/// A name class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameClass {
    AnyName(Option<u32>),
    NsName(String, Option<u32>),
    Name(String, String),
    Choice(u32, u32),
}

/// Interned qualified names. Every name the grammar mentions gets its own symbol; any other
/// name gets the "other" symbol of its namespace (or the global one), since name classes cannot
/// tell such names apart.
#[derive(Debug, Clone, Default)]
pub(crate) struct Symbols {
    namespaces: FastMap<String, NamespaceSymbols>,
    /// The names without namespace, the common case, looked up in one step.
    unqualified: FastMap<String, u32>,
    other: u32,
    /// Namespace and local name of each symbol (`None` for "other" symbols).
    pub(crate) names: Vec<(String, Option<String>)>,
}

#[derive(Debug, Clone, Default)]
struct NamespaceSymbols {
    locals: FastMap<String, u32>,
    other: u32,
}

impl Symbols {
    /// Builds the table from the grammar's name classes.
    pub(crate) fn new(classes: &[NameClass]) -> Self {
        let mut table = Symbols::default();
        table.other = table.push(String::new(), None);
        // The "other" symbol of the empty namespace is the one for unknown unqualified names.
        let ensure_ns = |table: &mut Symbols, ns: &str| {
            if !table.namespaces.contains_key(ns) {
                let other = if ns.is_empty() {
                    table.other
                } else {
                    table.push(ns.to_owned(), None)
                };
                table.namespaces.insert(
                    ns.to_owned(),
                    NamespaceSymbols {
                        locals: FastMap::default(),
                        other,
                    },
                );
            }
        };
        for class in classes {
            match class {
                NameClass::NsName(ns, _) => ensure_ns(&mut table, ns),
                NameClass::Name(ns, local) => {
                    ensure_ns(&mut table, ns);
                    let known = table
                        .namespaces
                        .get(ns.as_str())
                        .map(|n| n.locals.contains_key(local.as_str()));
                    if known == Some(false) {
                        let id = table.push(ns.clone(), Some(local.clone()));
                        if let Some(entry) = table.namespaces.get_mut(ns.as_str()) {
                            entry.locals.insert(local.clone(), id);
                        }
                        if ns.is_empty() {
                            table.unqualified.insert(local.clone(), id);
                        }
                    }
                }
                NameClass::AnyName(_) | NameClass::Choice(..) => {}
            }
        }
        table
    }

    fn push(&mut self, ns: String, local: Option<String>) -> u32 {
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push((ns, local));
        id
    }

    /// The symbol of a name met in a document.
    #[inline]
    pub(crate) fn lookup(&self, ns: &str, local: &str) -> u32 {
        if ns.is_empty() {
            return self.unqualified.get(local).copied().unwrap_or(self.other);
        }
        match self.namespaces.get(ns) {
            Some(entry) => entry.locals.get(local).copied().unwrap_or(entry.other),
            None => self.other,
        }
    }

    /// Number of symbols.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

/// Whether a name class contains a name (`local` is `None` for a name the grammar never
/// mentions, which only wildcards can match).
pub(crate) fn class_contains(
    classes: &[NameClass],
    class: u32,
    ns: &str,
    local: Option<&str>,
) -> bool {
    let Some(nc) = classes.get(class as usize) else {
        return false;
    };
    let excluded =
        |except: &Option<u32>| except.is_some_and(|e| class_contains(classes, e, ns, local));
    match nc {
        NameClass::AnyName(except) => !excluded(except),
        NameClass::NsName(n, except) => n == ns && !excluded(except),
        NameClass::Name(n, l) => n == ns && local == Some(l.as_str()),
        NameClass::Choice(a, b) => {
            class_contains(classes, *a, ns, local) || class_contains(classes, *b, ns, local)
        }
    }
}

/// A readable rendering of a name class for messages.
pub(crate) fn describe_class(classes: &[NameClass], class: u32, out: &mut Vec<String>) {
    match classes.get(class as usize) {
        Some(NameClass::Name(_, local)) => out.push(format!("`{local}`")),
        Some(NameClass::AnyName(_)) => out.push("any element".to_owned()),
        Some(NameClass::NsName(ns, _)) => out.push(format!("any element in `{ns}`")),
        Some(NameClass::Choice(a, b)) => {
            describe_class(classes, *a, out);
            describe_class(classes, *b, out);
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_is_a_set() {
        let mut a = Arena::default();
        let x = a.intern(Pat::Data(0));
        let y = a.intern(Pat::Data(1));
        let z = a.intern(Pat::Data(2));
        let xy = a.choice(x, y);
        let yx = a.choice(y, x);
        assert_eq!(xy, yx);
        let xyz1 = a.choice(xy, z);
        let zy = a.choice(z, y);
        let xyz2 = a.choice(zy, x);
        assert_eq!(xyz1, xyz2);
        assert_eq!(a.choice(xyz1, xy), xyz1);
        assert_eq!(a.choice(x, NOT_ALLOWED), x);
    }

    #[test]
    fn constructors_simplify_and_track_nullability() {
        let mut a = Arena::default();
        let d = a.intern(Pat::Data(0));
        assert_eq!(a.group(EMPTY, d), d);
        assert_eq!(a.group(d, NOT_ALLOWED), NOT_ALLOWED);
        assert_eq!(a.interleave(d, EMPTY), d);
        assert_eq!(a.after(d, NOT_ALLOWED), NOT_ALLOWED);
        let opt = a.choice(d, EMPTY);
        assert!(a.nullable(opt) && !a.nullable(d));
        let g = a.group(opt, TEXT);
        assert!(a.nullable(g));
        let g2 = a.group(d, TEXT);
        assert!(!a.nullable(g2));
    }

    #[test]
    fn symbols_distinguish_known_names_and_namespaces() {
        let classes = vec![
            NameClass::Name(String::new(), "disk".into()),
            NameClass::NsName("urn:x".into(), None),
            NameClass::AnyName(Some(0)),
        ];
        let s = Symbols::new(&classes);
        let disk = s.lookup("", "disk");
        let other = s.lookup("", "zzz");
        let x_other = s.lookup("urn:x", "a");
        assert!(disk != other && other != x_other);
        assert_eq!(s.lookup("urn:unknown", "a"), other);
        let (ns, local) = &s.names[x_other as usize];
        assert!(class_contains(&classes, 1, ns, local.as_deref()));
        assert!(!class_contains(&classes, 2, "", Some("disk")));
        assert!(class_contains(&classes, 2, "", None));
    }
}
