//! Derivatives of patterns with respect to document events (James Clark's algorithm for
//! RELAX NG validation), with memo tables so that each distinct step is computed once.
//!
//! Value-dependent steps (attribute values, text) are memoized on the *outcomes* of the value
//! tests they involve rather than on the value itself: the pattern reachable by a step depends on
//! the text only through which datatype leaves accept it. So `<disk name='vda'>` and
//! `<disk name='vdb'>` share one memo entry.

use super::Schema;
use super::datatype::is_whitespace;
use super::hash::FastMap;
use super::pattern::{Arena, EMPTY, NOT_ALLOWED, Pat, PatId};

/// Above this many patterns (or memo entries) the caches are dropped before the next document,
/// which bounds memory whatever the input.
const CACHE_LIMIT: usize = 1 << 18;

/// Memo keys carry at most this many value-test outcomes; beyond that steps are not memoized.
const MAX_TESTS: usize = 64;

/// How the residual of an `After` is rebuilt when a derivative is pushed through it.
#[derive(Clone, Copy)]
enum Rebuild {
    InterleaveLeft(PatId),
    InterleaveRight(PatId),
    GroupWith(PatId),
    AfterWith(PatId),
}

/// Per-thread validation state over a compiled [`Schema`]: a growing arena of derived patterns
/// and the memo tables. Reusing one across documents is what makes validation cheap.
#[derive(Debug, Clone)]
pub struct Validator<'s> {
    pub(crate) schema: &'s Schema,
    pub(crate) arena: Arena,
    start_memo: FastMap<(PatId, u32), PatId>,
    close_memo: FastMap<PatId, PatId>,
    end_memo: FastMap<PatId, PatId>,
    att_tests_memo: FastMap<(PatId, u32), (u32, u32)>,
    att_memo: FastMap<(PatId, u32, u64), PatId>,
    text_tests_memo: FastMap<PatId, (u32, u32)>,
    text_memo: FastMap<(PatId, u64), PatId>,
    pool: Vec<PatId>,
    cache_limit: usize,
}

impl<'s> Validator<'s> {
    /// A validator with empty caches.
    pub fn new(schema: &'s Schema) -> Self {
        Validator {
            schema,
            arena: schema.arena.clone(),
            start_memo: FastMap::default(),
            close_memo: FastMap::default(),
            end_memo: FastMap::default(),
            att_tests_memo: FastMap::default(),
            att_memo: FastMap::default(),
            text_tests_memo: FastMap::default(),
            text_memo: FastMap::default(),
            pool: Vec::new(),
            cache_limit: CACHE_LIMIT,
        }
    }

    /// A validator whose caches are dropped whenever they exceed `limit` entries (the default
    /// bound is large; a small one trades speed for memory).
    pub fn with_cache_limit(schema: &'s Schema, limit: usize) -> Self {
        Validator {
            cache_limit: limit,
            ..Validator::new(schema)
        }
    }

    /// Drops the caches if they grew past their bound.
    pub(crate) fn trim_caches(&mut self) {
        let size = self.arena.len()
            + self.pool.len()
            + self.start_memo.len()
            + self.att_memo.len()
            + self.text_memo.len();
        if size > self.cache_limit {
            *self = Validator::with_cache_limit(self.schema, self.cache_limit);
        }
    }

    #[inline]
    pub(crate) fn nullable(&self, p: PatId) -> bool {
        self.arena.nullable(p)
    }

    #[inline]
    fn class_matches(&self, class: u32, sym: u32) -> bool {
        let n = self.schema.symbols.len();
        self.schema
            .class_matches
            .get(class as usize * n + sym as usize)
            .copied()
            .unwrap_or(false)
    }

    fn content(&self, slot: u32) -> PatId {
        self.schema
            .contents
            .get(slot as usize)
            .copied()
            .unwrap_or(NOT_ALLOWED)
    }

    // ----- start tags -----

    /// Derivative by the opening of an element named `sym`: a choice of `After(content, rest)`.
    pub(crate) fn start_tag_open(&mut self, p: PatId, sym: u32) -> PatId {
        if let Some(&r) = self.start_memo.get(&(p, sym)) {
            return r;
        }
        let r = match self.arena.get(p) {
            Pat::Choice(..) => {
                let members = self.arena.members(p);
                let mapped: Vec<PatId> = members
                    .into_iter()
                    .map(|m| self.start_tag_open(m, sym))
                    .collect();
                self.arena.choice_many(&mapped)
            }
            Pat::Element(class, slot) => {
                if self.class_matches(class, sym) {
                    let c = self.content(slot);
                    self.arena.after(c, EMPTY)
                } else {
                    NOT_ALLOWED
                }
            }
            Pat::Interleave(a, b) => {
                let x = self.start_tag_open(a, sym);
                let x = self.apply_after(Rebuild::InterleaveLeft(b), x);
                let y = self.start_tag_open(b, sym);
                let y = self.apply_after(Rebuild::InterleaveRight(a), y);
                self.arena.choice(x, y)
            }
            Pat::OneOrMore(a) => {
                let x = self.start_tag_open(a, sym);
                let more = self.arena.choice(p, EMPTY);
                self.apply_after(Rebuild::GroupWith(more), x)
            }
            Pat::Group(a, b) => {
                let x = self.start_tag_open(a, sym);
                let x = self.apply_after(Rebuild::GroupWith(b), x);
                if self.arena.nullable(a) {
                    let y = self.start_tag_open(b, sym);
                    self.arena.choice(x, y)
                } else {
                    x
                }
            }
            Pat::After(a, b) => {
                let x = self.start_tag_open(a, sym);
                self.apply_after(Rebuild::AfterWith(b), x)
            }
            _ => NOT_ALLOWED,
        };
        self.start_memo.insert((p, sym), r);
        r
    }

    fn apply_after(&mut self, f: Rebuild, p: PatId) -> PatId {
        match self.arena.get(p) {
            Pat::After(a, b) => {
                let b2 = match f {
                    Rebuild::InterleaveLeft(other) => self.arena.interleave(b, other),
                    Rebuild::InterleaveRight(other) => self.arena.interleave(other, b),
                    Rebuild::GroupWith(other) => self.arena.group(b, other),
                    Rebuild::AfterWith(other) => self.arena.after(b, other),
                };
                self.arena.after(a, b2)
            }
            Pat::Choice(..) => {
                let members = self.arena.members(p);
                let mapped: Vec<PatId> = members
                    .into_iter()
                    .map(|m| self.apply_after(f, m))
                    .collect();
                self.arena.choice_many(&mapped)
            }
            _ => NOT_ALLOWED,
        }
    }

    // ----- attributes -----

    /// The value patterns of the attributes named `sym` that `p` may accept next, as a range of
    /// the pool.
    pub(crate) fn attribute_tests(&mut self, p: PatId, sym: u32) -> (u32, u32) {
        if let Some(&r) = self.att_tests_memo.get(&(p, sym)) {
            return r;
        }
        let mut found = Vec::new();
        self.collect_attribute_tests(p, sym, &mut found, 0);
        let start = u32::try_from(self.pool.len()).unwrap_or(u32::MAX);
        self.pool.extend_from_slice(&found);
        let r = (start, u32::try_from(found.len()).unwrap_or(u32::MAX));
        self.att_tests_memo.insert((p, sym), r);
        r
    }

    fn collect_attribute_tests(&self, p: PatId, sym: u32, out: &mut Vec<PatId>, depth: usize) {
        if depth > super::MAX_PATTERN_DEPTH {
            return;
        }
        match self.arena.get(p) {
            Pat::Choice(..) => {
                for m in self.arena.members(p) {
                    self.collect_attribute_tests(m, sym, out, depth + 1);
                }
            }
            Pat::Group(a, b) | Pat::Interleave(a, b) => {
                self.collect_attribute_tests(a, sym, out, depth + 1);
                self.collect_attribute_tests(b, sym, out, depth + 1);
            }
            Pat::OneOrMore(a) | Pat::After(a, _) => {
                self.collect_attribute_tests(a, sym, out, depth + 1)
            }
            Pat::Attribute(class, value)
                if self.class_matches(class, sym) && !out.contains(&value) =>
            {
                out.push(value);
            }
            _ => {}
        }
    }

    /// Derivative by one attribute.
    pub(crate) fn attribute(&mut self, p: PatId, sym: u32, value: &str) -> PatId {
        let (start, len) = self.attribute_tests(p, sym);
        if len == 0 {
            return NOT_ALLOWED;
        }
        let key = if (len as usize) <= MAX_TESTS {
            let mut mask = 0u64;
            for i in 0..len {
                let test = self.pool[(start + i) as usize];
                if self.value_matches(test, value) {
                    mask |= 1 << i;
                }
            }
            if let Some(&r) = self.att_memo.get(&(p, sym, mask)) {
                return r;
            }
            Some((p, sym, mask))
        } else {
            None
        };
        let r = self.attribute_uncached(p, sym, Some(value));
        if let Some(key) = key {
            self.att_memo.insert(key, r);
        }
        r
    }

    /// Like [`Self::attribute`] but accepts any value, to carry on after reporting a bad one.
    pub(crate) fn attribute_forgiving(&mut self, p: PatId, sym: u32) -> PatId {
        self.attribute_uncached(p, sym, None)
    }

    /// `value` is `None` when any value is to be accepted.
    fn attribute_uncached(&mut self, p: PatId, sym: u32, value: Option<&str>) -> PatId {
        match self.arena.get(p) {
            Pat::After(a, b) => {
                let x = self.attribute_uncached(a, sym, value);
                self.arena.after(x, b)
            }
            Pat::Choice(..) => {
                let members = self.arena.members(p);
                let mapped: Vec<PatId> = members
                    .into_iter()
                    .map(|m| self.attribute_uncached(m, sym, value))
                    .collect();
                self.arena.choice_many(&mapped)
            }
            Pat::Group(a, b) => {
                let x = self.attribute_uncached(a, sym, value);
                let x = self.arena.group(x, b);
                let y = self.attribute_uncached(b, sym, value);
                let y = self.arena.group(a, y);
                self.arena.choice(x, y)
            }
            Pat::Interleave(a, b) => {
                let x = self.attribute_uncached(a, sym, value);
                let x = self.arena.interleave(x, b);
                let y = self.attribute_uncached(b, sym, value);
                let y = self.arena.interleave(a, y);
                self.arena.choice(x, y)
            }
            Pat::OneOrMore(a) => {
                let x = self.attribute_uncached(a, sym, value);
                let more = self.arena.choice(p, EMPTY);
                self.arena.group(x, more)
            }
            Pat::Attribute(class, content) => {
                if self.class_matches(class, sym)
                    && value.is_none_or(|v| self.value_matches(content, v))
                {
                    EMPTY
                } else {
                    NOT_ALLOWED
                }
            }
            _ => NOT_ALLOWED,
        }
    }

    /// Whether an attribute value (or a whole text) matches a value pattern.
    pub(crate) fn value_matches(&mut self, p: PatId, text: &str) -> bool {
        // Value patterns are nearly always leaves or choices of leaves: decide those directly,
        // without building derivatives. A choice matches when one of its branches does.
        match self.arena.get(p) {
            Pat::Text => return true,
            Pat::Empty => return is_whitespace(text),
            Pat::NotAllowed => return false,
            Pat::Data(..) | Pat::Value(..) | Pat::DataExcept(..) => {
                return self.leaf_matches(p, text);
            }
            Pat::Choice(..) => {
                return self
                    .arena
                    .members(p)
                    .into_iter()
                    .any(|m| self.value_matches(m, text));
            }
            _ => {}
        }
        if self.arena.nullable(p) && is_whitespace(text) {
            return true;
        }
        let d = self.text_uncached(p, text, 0);
        self.arena.nullable(d)
    }

    // ----- end of the start tag -----

    /// Derivative by the end of the start tag: attributes not given are now missing.
    pub(crate) fn start_tag_close(&mut self, p: PatId) -> PatId {
        if let Some(&r) = self.close_memo.get(&p) {
            return r;
        }
        let r = self.close_uncached(p, false, 0);
        self.close_memo.insert(p, r);
        r
    }

    /// Like [`Self::start_tag_close`], but treats missing attributes as given, to carry on after
    /// reporting them.
    pub(crate) fn start_tag_close_forgiving(&mut self, p: PatId) -> PatId {
        self.close_uncached(p, true, 0)
    }

    fn close_uncached(&mut self, p: PatId, forgive: bool, depth: usize) -> PatId {
        if depth > super::MAX_PATTERN_DEPTH {
            return NOT_ALLOWED;
        }
        match self.arena.get(p) {
            Pat::After(a, b) => {
                let x = self.close_uncached(a, forgive, depth + 1);
                self.arena.after(x, b)
            }
            Pat::Choice(..) => {
                let members = self.arena.members(p);
                let mapped: Vec<PatId> = members
                    .into_iter()
                    .map(|m| self.close_uncached(m, forgive, depth + 1))
                    .collect();
                self.arena.choice_many(&mapped)
            }
            Pat::Group(a, b) => {
                let x = self.close_uncached(a, forgive, depth + 1);
                let y = self.close_uncached(b, forgive, depth + 1);
                self.arena.group(x, y)
            }
            Pat::Interleave(a, b) => {
                let x = self.close_uncached(a, forgive, depth + 1);
                let y = self.close_uncached(b, forgive, depth + 1);
                self.arena.interleave(x, y)
            }
            Pat::OneOrMore(a) => {
                let x = self.close_uncached(a, forgive, depth + 1);
                self.arena.one_or_more(x)
            }
            Pat::Attribute(..) => {
                if forgive {
                    EMPTY
                } else {
                    NOT_ALLOWED
                }
            }
            _ => p,
        }
    }

    // ----- text -----

    fn text_tests(&mut self, p: PatId) -> (u32, u32) {
        if let Some(&r) = self.text_tests_memo.get(&p) {
            return r;
        }
        let mut found = Vec::new();
        self.collect_text_tests(p, &mut found, 0);
        let start = u32::try_from(self.pool.len()).unwrap_or(u32::MAX);
        self.pool.extend_from_slice(&found);
        let r = (start, u32::try_from(found.len()).unwrap_or(u32::MAX));
        self.text_tests_memo.insert(p, r);
        r
    }

    fn collect_text_tests(&self, p: PatId, out: &mut Vec<PatId>, depth: usize) {
        if depth > super::MAX_PATTERN_DEPTH {
            return;
        }
        match self.arena.get(p) {
            Pat::Choice(..) => {
                for m in self.arena.members(p) {
                    self.collect_text_tests(m, out, depth + 1);
                }
            }
            Pat::Group(a, b) | Pat::Interleave(a, b) => {
                self.collect_text_tests(a, out, depth + 1);
                self.collect_text_tests(b, out, depth + 1);
            }
            Pat::OneOrMore(a) | Pat::After(a, _) => self.collect_text_tests(a, out, depth + 1),
            Pat::Data(_) | Pat::DataExcept(..) | Pat::Value(..) if !out.contains(&p) => {
                out.push(p);
            }
            _ => {}
        }
    }

    /// A range of the pool, as returned by [`Self::attribute_tests`].
    pub(crate) fn pool_slice(&self, start: u32, len: u32) -> &[PatId] {
        self.pool
            .get(start as usize..(start as usize + len as usize))
            .unwrap_or(&[])
    }

    /// The datatype leaves `p` would test a text against, for messages.
    pub(crate) fn text_leaves(&mut self, p: PatId) -> Vec<PatId> {
        let (start, len) = self.text_tests(p);
        self.pool_slice(start, len).to_vec()
    }

    /// Derivative by a text node. `lone` is true when the text is the whole content of its
    /// element: then whitespace-only text may also count as no text at all.
    pub(crate) fn text(&mut self, p: PatId, text: &str, lone: bool) -> PatId {
        let optional = lone && is_whitespace(text);
        let (start, len) = self.text_tests(p);
        let key = if (len as usize) < MAX_TESTS {
            let mut mask = u64::from(optional) << 63;
            for i in 0..len {
                let leaf = self.pool[(start + i) as usize];
                if self.leaf_matches(leaf, text) {
                    mask |= 1 << i;
                }
            }
            if let Some(&r) = self.text_memo.get(&(p, mask)) {
                return r;
            }
            Some((p, mask))
        } else {
            None
        };
        let d = self.text_uncached(p, text, 0);
        let r = if optional { self.arena.choice(p, d) } else { d };
        if let Some(key) = key {
            self.text_memo.insert(key, r);
        }
        r
    }

    fn leaf_matches(&mut self, leaf: PatId, text: &str) -> bool {
        let schema = self.schema;
        match self.arena.get(leaf) {
            Pat::Data(dt) => schema
                .datatypes
                .get(dt as usize)
                .is_some_and(|d| d.allows(text)),
            Pat::Value(dt, lit) => match (
                schema.datatypes.get(dt as usize),
                schema.literals.get(lit as usize),
            ) {
                (Some(d), Some(l)) => d.allows(text) && d.equal(text, l),
                _ => false,
            },
            Pat::DataExcept(dt, except) => {
                schema
                    .datatypes
                    .get(dt as usize)
                    .is_some_and(|d| d.allows(text))
                    && !self.value_matches(except, text)
            }
            _ => false,
        }
    }

    fn text_uncached(&mut self, p: PatId, text: &str, depth: usize) -> PatId {
        if depth > super::MAX_PATTERN_DEPTH {
            return NOT_ALLOWED;
        }
        match self.arena.get(p) {
            Pat::Choice(..) => {
                let members = self.arena.members(p);
                let mapped: Vec<PatId> = members
                    .into_iter()
                    .map(|m| self.text_uncached(m, text, depth + 1))
                    .collect();
                self.arena.choice_many(&mapped)
            }
            Pat::Interleave(a, b) => {
                let x = self.text_uncached(a, text, depth + 1);
                let x = self.arena.interleave(x, b);
                let y = self.text_uncached(b, text, depth + 1);
                let y = self.arena.interleave(a, y);
                self.arena.choice(x, y)
            }
            Pat::Group(a, b) => {
                let x = self.text_uncached(a, text, depth + 1);
                let x = self.arena.group(x, b);
                if self.arena.nullable(a) {
                    let y = self.text_uncached(b, text, depth + 1);
                    self.arena.choice(x, y)
                } else {
                    x
                }
            }
            Pat::After(a, b) => {
                let x = self.text_uncached(a, text, depth + 1);
                self.arena.after(x, b)
            }
            Pat::OneOrMore(a) => {
                let x = self.text_uncached(a, text, depth + 1);
                let more = self.arena.choice(p, EMPTY);
                self.arena.group(x, more)
            }
            Pat::Text => p,
            Pat::Data(..) | Pat::DataExcept(..) | Pat::Value(..) => {
                if self.leaf_matches(p, text) {
                    EMPTY
                } else {
                    NOT_ALLOWED
                }
            }
            _ => NOT_ALLOWED,
        }
    }

    // ----- end tags -----

    /// Derivative by the end tag of the current element.
    pub(crate) fn end_tag(&mut self, p: PatId) -> PatId {
        if let Some(&r) = self.end_memo.get(&p) {
            return r;
        }
        let r = self.end_uncached(p, false);
        self.end_memo.insert(p, r);
        r
    }

    /// Like [`Self::end_tag`], but closes the element even if content is missing.
    pub(crate) fn end_tag_forgiving(&mut self, p: PatId) -> PatId {
        self.end_uncached(p, true)
    }

    fn end_uncached(&mut self, p: PatId, forgive: bool) -> PatId {
        match self.arena.get(p) {
            Pat::Choice(..) => {
                let members = self.arena.members(p);
                let mapped: Vec<PatId> = members
                    .into_iter()
                    .map(|m| self.end_uncached(m, forgive))
                    .collect();
                self.arena.choice_many(&mapped)
            }
            Pat::After(a, b) => {
                if forgive || self.arena.nullable(a) {
                    b
                } else {
                    NOT_ALLOWED
                }
            }
            _ => NOT_ALLOWED,
        }
    }
}
