//! The checkpoint tree: parent links, the current checkpoint, listing and deletion order.
//!
//! Every walk is iterative and bounded by the number of checkpoints, so a chain of tens of
//! thousands of checkpoints neither recurses nor loops. Entries live in slots of an arena and
//! link to their children by slot, so a walk down the tree follows indexes instead of looking
//! every child up by name (a topological listing of 10,000 checkpoints is one pass).

use std::collections::{BTreeMap, BTreeSet};

use super::Checkpoint;
use crate::error::RequestError;

#[derive(Debug, Clone)]
struct Entry {
    checkpoint: Checkpoint,
    /// Children by name (so walks visit them in name order), with their slots.
    children: BTreeMap<String, usize>,
}

/// The checkpoints of one domain with their parent/child links and the current checkpoint.
///
/// Invariants: every parent named by a checkpoint exists; the links form a forest (no cycles);
/// `roots` holds exactly the checkpoints without a parent; `current`, when set, exists; every
/// slot named by `index`, `roots` or a children map holds the checkpoint of that name.
#[derive(Debug, Clone, Default)]
pub struct CheckpointTree {
    slots: Vec<Option<Entry>>,
    /// Slots freed by removals, reused first.
    free: Vec<usize>,
    /// Every checkpoint's slot, by name.
    index: BTreeMap<String, usize>,
    roots: BTreeMap<String, usize>,
    current: Option<String>,
}

/// What a tree operation changed, so the caller can persist exactly that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeChange {
    /// Checkpoints whose metadata must be (re)written, in name order.
    pub written: BTreeSet<String>,
    /// Checkpoints that no longer exist, in the order they were removed.
    pub removed: Vec<String>,
    /// Whether the current checkpoint changed.
    pub current_changed: bool,
}

impl TreeChange {
    fn merge(&mut self, other: TreeChange) {
        for name in &other.removed {
            self.written.remove(name);
        }
        self.written.extend(other.written);
        self.removed.extend(other.removed);
        self.current_changed |= other.current_changed;
    }
}

/// Filters of checkpoint listing (libvirt's `VIR_DOMAIN_CHECKPOINT_LIST_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Whole-domain listing: only checkpoints without a parent. Children listing: all
    /// descendants instead of direct children (the same bit in libvirt, opposite meaning).
    pub roots_or_descendants: bool,
    /// Parents precede their children in the result.
    pub topological: bool,
    /// Only checkpoints without children.
    pub leaves: bool,
    /// Only checkpoints with children.
    pub no_leaves: bool,
}

/// Which checkpoints a deletion discards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteScope {
    /// The checkpoint alone; its children move to its parent.
    Single,
    /// The checkpoint and all its descendants.
    WithChildren,
    /// Only the descendants; the checkpoint stays.
    ChildrenOnly,
}

impl CheckpointTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a tree from stored checkpoints in any order. Parents are inserted before children;
    /// a checkpoint whose parent is missing becomes a root. `current` is the stored current
    /// checkpoint; when it is absent or unknown, the unique leaf becomes current (if there is
    /// exactly one).
    pub fn load(checkpoints: Vec<Checkpoint>, current: Option<&str>) -> Self {
        // By name (of duplicates the last), into slots in name order: the index is then
        // built in one pass from sorted keys, and "the first by name" is the lowest slot.
        let by_name: BTreeMap<String, Checkpoint> = checkpoints
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let mut tree = Self::new();
        let mut names = Vec::with_capacity(by_name.len());
        for (i, (name, checkpoint)) in by_name.into_iter().enumerate() {
            tree.slots.push(Some(Entry {
                checkpoint,
                children: BTreeMap::new(),
            }));
            names.push((name, i));
        }
        tree.index = names.into_iter().collect();
        let n = tree.slots.len();
        // Each checkpoint's parent slot, when its parent is stored.
        let parent: Vec<Option<usize>> = tree
            .slots
            .iter()
            .map(|e| {
                let p = e.as_ref()?.checkpoint.parent.as_deref()?;
                tree.index.get(p).copied()
            })
            .collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, p) in parent.iter().enumerate() {
            if let Some(p) = *p {
                children[p].push(i);
            }
        }
        // Attached: reachable from a root. What is left hangs on a cycle among the stored
        // files: the first of it by name becomes a root, again and again. Each slot is
        // attached once, so this is one pass however long the chains are.
        let mut attached = vec![false; n];
        let mut is_root = vec![false; n];
        let mut stack = Vec::new();
        for start in (0..n).filter(|&i| parent[i].is_none()).chain(0..n) {
            if attached[start] {
                continue;
            }
            is_root[start] = true;
            attached[start] = true;
            stack.push(start);
            while let Some(i) = stack.pop() {
                for &c in &children[i] {
                    if !attached[c] {
                        attached[c] = true;
                        stack.push(c);
                    }
                }
            }
        }
        for i in 0..n {
            let Some(entry) = tree.slots[i].as_mut() else {
                continue;
            };
            let name = entry.checkpoint.name.clone();
            match parent[i].filter(|_| !is_root[i]) {
                Some(p) => {
                    if let Some(pe) = tree.slots[p].as_mut() {
                        pe.children.insert(name, i);
                    }
                }
                None => {
                    entry.checkpoint.parent = None;
                    tree.roots.insert(name, i);
                }
            }
        }
        tree.current = match current {
            Some(c) if tree.index.contains_key(c) => Some(c.to_owned()),
            _ => {
                let mut leaves = tree.entries().filter(|e| e.children.is_empty());
                match (leaves.next(), leaves.next()) {
                    (Some(e), None) => Some(e.checkpoint.name.clone()),
                    _ => None,
                }
            }
        };
        tree
    }

    /// Number of checkpoints.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are no checkpoints.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Looks a checkpoint up by name.
    pub fn get(&self, name: &str) -> Option<&Checkpoint> {
        self.entry(name).map(|e| &e.checkpoint)
    }

    fn slot(&self, slot: usize) -> Option<&Entry> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).and_then(|&i| self.slot(i))
    }

    fn entry_mut(&mut self, name: &str) -> Option<&mut Entry> {
        let i = *self.index.get(name)?;
        self.slots.get_mut(i).and_then(Option::as_mut)
    }

    /// Every entry in name order.
    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.index.values().filter_map(|&i| self.slot(i))
    }

    /// Puts an entry into a free slot and indexes it; returns the slot.
    fn insert_entry(&mut self, entry: Entry) -> usize {
        let name = entry.checkpoint.name.clone();
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        };
        self.index.insert(name, slot);
        slot
    }

    /// Takes an entry out of its slot and the index (its links are the caller's business).
    fn remove_entry(&mut self, name: &str) -> Option<Entry> {
        let i = self.index.remove(name)?;
        let entry = self.slots.get_mut(i).and_then(Option::take);
        self.free.push(i);
        entry
    }

    /// Looks a checkpoint up, or fails with libvirt's "no domain checkpoint" error.
    pub fn lookup(&self, name: &str) -> Result<&Checkpoint, RequestError> {
        self.get(name)
            .ok_or_else(|| RequestError::NoCheckpoint(name.to_owned()))
    }

    /// The parent of a checkpoint; a root has none (an error, as in libvirt).
    pub fn parent(&self, name: &str) -> Result<&Checkpoint, RequestError> {
        let cp = self.lookup(name)?;
        cp.parent
            .as_deref()
            .and_then(|p| self.get(p))
            .ok_or_else(|| RequestError::NoParent(name.to_owned()))
    }

    /// The current checkpoint: the parent of the next one created.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// All checkpoints in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Checkpoint> {
        self.entries().map(|e| &e.checkpoint)
    }

    /// Direct children of a checkpoint, in name order.
    pub fn children(&self, name: &str) -> impl Iterator<Item = &str> {
        self.entry(name)
            .into_iter()
            .flat_map(|e| e.children.keys().map(String::as_str))
    }

    /// Checks that a new checkpoint may be created under `name`.
    pub fn check_create(&self, name: &str) -> Result<(), RequestError> {
        if self.index.contains_key(name) {
            return Err(RequestError::CheckpointExists(name.to_owned()));
        }
        Ok(())
    }

    /// Inserts a newly created checkpoint: its parent is the current checkpoint, and it becomes
    /// current. Call only after QEMU created its bitmaps.
    pub fn insert_created(
        &mut self,
        mut checkpoint: Checkpoint,
    ) -> Result<TreeChange, RequestError> {
        self.check_create(&checkpoint.name)?;
        checkpoint.parent = self.current.clone();
        let name = checkpoint.name.clone();
        self.attach(checkpoint);
        self.current = Some(name.clone());
        let mut change = TreeChange {
            current_changed: true,
            ..TreeChange::default()
        };
        change.written.insert(name);
        Ok(change)
    }

    /// Validates a redefinition without changing anything.
    pub fn check_redefine(&self, checkpoint: &Checkpoint) -> Result<(), RequestError> {
        let name = &checkpoint.name;
        let Some(parent) = &checkpoint.parent else {
            return Ok(());
        };
        if parent == name {
            return Err(RequestError::OwnParent(name.clone()));
        }
        if !self.index.contains_key(parent) {
            return Err(RequestError::ParentNotFound {
                name: name.clone(),
                parent: parent.clone(),
            });
        }
        if self.index.contains_key(name) && self.is_ancestor(name, parent) {
            return Err(RequestError::ParentCycle {
                name: name.clone(),
                parent: parent.clone(),
            });
        }
        Ok(())
    }

    /// Redefines a checkpoint from stored metadata. An existing checkpoint of the same name is
    /// replaced in place: its children stay, its old parent link is dropped. The checkpoint
    /// becomes current when its parent is the current one or when there is no current one.
    pub fn redefine(&mut self, checkpoint: Checkpoint) -> Result<TreeChange, RequestError> {
        self.check_redefine(&checkpoint)?;
        let name = checkpoint.name.clone();
        let children = match self.remove_entry(&name) {
            Some(old) => {
                self.unlink_from_parent(&name, old.checkpoint.parent.as_deref());
                old.children
            }
            None => BTreeMap::new(),
        };
        let becomes_current = self.current.is_none()
            || (checkpoint.parent.is_some() && checkpoint.parent == self.current);
        self.attach(checkpoint);
        if let Some(e) = self.entry_mut(&name) {
            e.children = children;
        }
        let mut change = TreeChange::default();
        change.written.insert(name.clone());
        if becomes_current && self.current.as_deref() != Some(&name) {
            self.current = Some(name);
            change.current_changed = true;
        }
        Ok(change)
    }

    /// The checkpoints a deletion discards, in the order they must go: descendants leaf-first,
    /// then the checkpoint itself unless only its children go.
    pub fn delete_order(
        &self,
        name: &str,
        scope: DeleteScope,
    ) -> Result<Vec<String>, RequestError> {
        self.lookup(name)?;
        let mut order = Vec::new();
        if scope != DeleteScope::Single {
            let mut pre = self.descendants_preorder(name);
            pre.reverse();
            order = pre;
        }
        if scope != DeleteScope::ChildrenOnly {
            order.push(name.to_owned());
        }
        Ok(order)
    }

    /// Removes one checkpoint's metadata: its children move to its parent, and if it was
    /// current, its parent becomes current.
    pub fn discard(&mut self, name: &str) -> Result<TreeChange, RequestError> {
        let entry = self
            .remove_entry(name)
            .ok_or_else(|| RequestError::NoCheckpoint(name.to_owned()))?;
        let parent = entry.checkpoint.parent.clone();
        self.unlink_from_parent(name, parent.as_deref());
        let mut change = TreeChange::default();
        for (child, &slot) in &entry.children {
            if let Some(c) = self.slots.get_mut(slot).and_then(Option::as_mut) {
                c.checkpoint.parent = parent.clone();
            }
            match &parent {
                Some(p) => {
                    if let Some(pe) = self.entry_mut(p) {
                        pe.children.insert(child.clone(), slot);
                    }
                }
                None => {
                    self.roots.insert(child.clone(), slot);
                }
            }
            change.written.insert(child.clone());
        }
        if self.current.as_deref() == Some(name) {
            self.current = parent;
            change.current_changed = true;
        }
        change.removed.push(name.to_owned());
        Ok(change)
    }

    /// Discards several checkpoints in order, merging their changes.
    pub fn discard_all(&mut self, names: &[String]) -> Result<TreeChange, RequestError> {
        let mut change = TreeChange::default();
        for name in names {
            change.merge(self.discard(name)?);
        }
        Ok(change)
    }

    /// Lists all checkpoints of the domain.
    pub fn list(&self, filter: ListFilter) -> Vec<&Checkpoint> {
        let mut entries: Vec<&Entry> = Vec::with_capacity(self.len());
        if filter.topological {
            for &root in self.roots.values() {
                if let Some(e) = self.slot(root) {
                    entries.push(e);
                    if !filter.roots_or_descendants {
                        self.push_descendants(e, &mut entries);
                    }
                }
            }
        } else if filter.roots_or_descendants {
            entries.extend(self.roots.values().filter_map(|&r| self.slot(r)));
        } else {
            entries.extend(self.entries());
        }
        Self::finish_list(entries, filter)
    }

    /// Lists the children (or, with `roots_or_descendants`, all descendants) of a checkpoint.
    pub fn list_children(
        &self,
        name: &str,
        filter: ListFilter,
    ) -> Result<Vec<&Checkpoint>, RequestError> {
        let entry = self
            .entry(name)
            .ok_or_else(|| RequestError::NoCheckpoint(name.to_owned()))?;
        let entries: Vec<&Entry> = if filter.roots_or_descendants {
            let mut out = Vec::new();
            self.push_descendants(entry, &mut out);
            if !filter.topological {
                out.sort_unstable_by(|a, b| a.checkpoint.name.cmp(&b.checkpoint.name));
            }
            out
        } else {
            entry
                .children
                .values()
                .filter_map(|&c| self.slot(c))
                .collect()
        };
        Ok(Self::finish_list(entries, filter))
    }

    fn finish_list(entries: Vec<&Entry>, filter: ListFilter) -> Vec<&Checkpoint> {
        // LEAVES and NO_LEAVES together select everything.
        let leaf_filter = match (filter.leaves, filter.no_leaves) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        };
        entries
            .into_iter()
            .filter(|e| leaf_filter.is_none_or(|want_leaf| e.children.is_empty() == want_leaf))
            .map(|e| &e.checkpoint)
            .collect()
    }

    /// Names of all descendants of `name` in pre-order (parents before children), children in
    /// name order.
    pub fn descendants_preorder(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = self.entry(name) {
            self.push_descendants(e, &mut out);
        }
        out.into_iter().map(|e| e.checkpoint.name.clone()).collect()
    }

    fn push_descendants<'a>(&'a self, entry: &'a Entry, out: &mut Vec<&'a Entry>) {
        // An explicit stack of child iterators keeps the walk iterative; it visits each
        // checkpoint at most once because the links form a forest.
        let mut stack = vec![entry.children.values()];
        let bound = out.len() + self.len();
        while let Some(top) = stack.last_mut() {
            match top.next() {
                Some(&child) => {
                    let Some(ce) = self.slot(child) else {
                        continue;
                    };
                    out.push(ce);
                    if out.len() > bound {
                        debug_assert!(false, "checkpoint tree has a cycle");
                        return;
                    }
                    stack.push(ce.children.values());
                }
                None => {
                    stack.pop();
                }
            }
        }
    }

    /// Whether `ancestor` is `name` itself or lies on the parent path of `name`.
    fn is_ancestor(&self, ancestor: &str, name: &str) -> bool {
        let mut cursor = Some(name);
        for _ in 0..=self.len() {
            match cursor {
                None => return false,
                Some(c) if c == ancestor => return true,
                Some(c) => cursor = self.entry(c).and_then(|e| e.checkpoint.parent.as_deref()),
            }
        }
        false
    }

    fn attach(&mut self, checkpoint: Checkpoint) {
        let name = checkpoint.name.clone();
        let parent = checkpoint.parent.clone();
        let slot = self.insert_entry(Entry {
            checkpoint,
            children: BTreeMap::new(),
        });
        match parent {
            Some(p) => {
                if let Some(pe) = self.entry_mut(&p) {
                    pe.children.insert(name, slot);
                }
            }
            None => {
                self.roots.insert(name, slot);
            }
        }
    }

    fn unlink_from_parent(&mut self, name: &str, parent: Option<&str>) {
        match parent {
            Some(p) => {
                if let Some(pe) = self.entry_mut(p) {
                    pe.children.remove(name);
                }
            }
            None => {
                self.roots.remove(name);
            }
        }
    }

    /// Checks the tree's invariants; used by tests and debug assertions.
    pub fn check_invariants(&self) -> Result<(), String> {
        let slot_of = |name: &str| self.index.get(name).copied();
        for (name, &i) in &self.index {
            let e = self
                .slot(i)
                .ok_or_else(|| format!("{name}: slot {i} is empty"))?;
            if e.checkpoint.name != *name {
                return Err(format!("entry {name} holds {}", e.checkpoint.name));
            }
            match &e.checkpoint.parent {
                Some(p) => {
                    let pe = self
                        .entry(p)
                        .ok_or_else(|| format!("{name}: parent {p} missing"))?;
                    if pe.children.get(name) != Some(&i) {
                        return Err(format!("{p} does not list child {name} at its slot"));
                    }
                    if self.roots.contains_key(name) {
                        return Err(format!("{name} has a parent but is a root"));
                    }
                }
                None => {
                    if self.roots.get(name) != Some(&i) {
                        return Err(format!("{name} is a root but not listed at its slot"));
                    }
                }
            }
            for (c, &ci) in &e.children {
                if slot_of(c) != Some(ci) {
                    return Err(format!("{name}: child {c} missing or at another slot"));
                }
                let ce = self
                    .slot(ci)
                    .ok_or_else(|| format!("{name}: child {c} missing"))?;
                if ce.checkpoint.parent.as_deref() != Some(name) {
                    return Err(format!("{c} listed under {name} but has another parent"));
                }
            }
        }
        if self.roots.iter().any(|(r, &i)| slot_of(r) != Some(i)) {
            return Err("a root does not exist".into());
        }
        let used = self.slots.iter().filter(|s| s.is_some()).count();
        if used != self.index.len() || used + self.free.len() != self.slots.len() {
            return Err(format!(
                "{used} slots used, {} free, {} in all, {} indexed",
                self.free.len(),
                self.slots.len(),
                self.index.len()
            ));
        }
        if let Some(c) = &self.current
            && !self.index.contains_key(c)
        {
            return Err(format!("current {c} does not exist"));
        }
        // Every checkpoint is reachable from a root exactly once: no cycles.
        let mut seen = 0usize;
        for r in self.roots.keys() {
            seen += 1 + self.descendants_preorder(r).len();
        }
        if seen != self.len() {
            return Err(format!("{seen} reachable of {}", self.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(name: &str, parent: Option<&str>) -> Checkpoint {
        Checkpoint {
            name: name.into(),
            description: None,
            parent: parent.map(Into::into),
            creation_time_s: 0,
            disks: vec![],
            domain_xml: None,
        }
    }

    fn names(v: Vec<&Checkpoint>) -> Vec<&str> {
        v.into_iter().map(|c| c.name.as_str()).collect()
    }

    fn chain(n: usize) -> CheckpointTree {
        let mut t = CheckpointTree::new();
        for i in 0..n {
            t.insert_created(cp(&format!("c{i}"), None)).unwrap();
        }
        t
    }

    #[test]
    fn created_checkpoint_takes_current_as_parent_and_becomes_current() {
        let t = chain(3);
        assert_eq!(t.get("c2").unwrap().parent.as_deref(), Some("c1"));
        assert_eq!(t.current(), Some("c2"));
        assert_eq!(t.parent("c1").unwrap().name, "c0");
        assert_eq!(t.parent("c0"), Err(RequestError::NoParent("c0".into())));
        t.check_invariants().unwrap();
    }

    #[test]
    fn duplicate_name_is_refused() {
        let mut t = chain(1);
        assert_eq!(
            t.insert_created(cp("c0", None)),
            Err(RequestError::CheckpointExists("c0".into()))
        );
    }

    #[test]
    fn deleting_middle_checkpoint_reparents_children() {
        let mut t = chain(3);
        let ch = t.discard("c1").unwrap();
        assert_eq!(t.get("c2").unwrap().parent.as_deref(), Some("c0"));
        assert!(ch.written.contains("c2"));
        assert_eq!(ch.removed, vec!["c1".to_string()]);
        assert!(!ch.current_changed);
        t.check_invariants().unwrap();
    }

    #[test]
    fn deleting_current_moves_current_to_parent() {
        let mut t = chain(3);
        t.discard("c2").unwrap();
        assert_eq!(t.current(), Some("c1"));
        t.discard("c0").unwrap();
        assert_eq!(t.get("c1").unwrap().parent, None);
        assert_eq!(
            names(t.list(ListFilter {
                roots_or_descendants: true,
                ..Default::default()
            })),
            ["c1"]
        );
    }

    #[test]
    fn delete_children_goes_leaf_first_and_ends_with_parent_current() {
        let mut t = chain(3);
        let order = t.delete_order("c1", DeleteScope::WithChildren).unwrap();
        assert_eq!(order, ["c2", "c1"]);
        t.discard_all(&order).unwrap();
        assert_eq!(t.current(), Some("c0"));
        let only = chain(3)
            .delete_order("c0", DeleteScope::ChildrenOnly)
            .unwrap();
        assert_eq!(only, ["c2", "c1"]);
        let mut t = chain(3);
        t.discard_all(&only).unwrap();
        assert_eq!(t.current(), Some("c0"));
    }

    #[test]
    fn redefine_requires_existing_parent_and_refuses_cycles() {
        let mut t = chain(3);
        assert!(matches!(
            t.redefine(cp("x", Some("nope"))),
            Err(RequestError::ParentNotFound { .. })
        ));
        assert_eq!(
            t.redefine(cp("c0", Some("c0"))),
            Err(RequestError::OwnParent("c0".into()))
        );
        assert!(matches!(
            t.redefine(cp("c0", Some("c2"))),
            Err(RequestError::ParentCycle { .. })
        ));
        t.check_invariants().unwrap();
    }

    #[test]
    fn redefine_replaces_in_place_keeping_children() {
        let mut t = chain(3);
        let mut new = cp("c1", None);
        new.description = Some("again".into());
        let ch = t.redefine(new).unwrap();
        assert!(!ch.current_changed);
        assert_eq!(t.get("c1").unwrap().description.as_deref(), Some("again"));
        assert_eq!(t.children("c1").collect::<Vec<_>>(), ["c2"]);
        assert!(t.children("c0").next().is_none());
        t.check_invariants().unwrap();
    }

    #[test]
    fn redefined_child_of_current_becomes_current() {
        let mut t = chain(2);
        t.redefine(cp("d", Some("c1"))).unwrap();
        assert_eq!(t.current(), Some("d"));
        t.redefine(cp("e", Some("c0"))).unwrap();
        assert_eq!(t.current(), Some("d"));
        let mut empty = CheckpointTree::new();
        empty.redefine(cp("a", None)).unwrap();
        assert_eq!(empty.current(), Some("a"));
    }

    #[test]
    fn list_filters_select_roots_leaves_and_topological_order() {
        let mut t = CheckpointTree::new();
        t.redefine(cp("b", None)).unwrap();
        t.redefine(cp("a", Some("b"))).unwrap();
        t.redefine(cp("z", Some("b"))).unwrap();
        t.redefine(cp("c", Some("z"))).unwrap();
        let all = ListFilter::default();
        assert_eq!(names(t.list(all)), ["a", "b", "c", "z"]);
        let topo = ListFilter {
            topological: true,
            ..all
        };
        assert_eq!(names(t.list(topo)), ["b", "a", "z", "c"]);
        let leaves = ListFilter {
            leaves: true,
            ..all
        };
        assert_eq!(names(t.list(leaves)), ["a", "c"]);
        let inner = ListFilter {
            no_leaves: true,
            ..all
        };
        assert_eq!(names(t.list(inner)), ["b", "z"]);
        let both = ListFilter {
            leaves: true,
            no_leaves: true,
            ..all
        };
        assert_eq!(t.list(both).len(), 4);
        let desc = ListFilter {
            roots_or_descendants: true,
            ..all
        };
        assert_eq!(names(t.list_children("b", desc).unwrap()), ["a", "c", "z"]);
        assert_eq!(names(t.list_children("b", all).unwrap()), ["a", "z"]);
        let desc_topo = ListFilter {
            topological: true,
            ..desc
        };
        assert_eq!(
            names(t.list_children("b", desc_topo).unwrap()),
            ["a", "z", "c"]
        );
    }

    #[test]
    fn load_rebuilds_links_in_any_order_and_picks_unique_leaf_as_current() {
        let t = CheckpointTree::load(
            vec![cp("c", Some("b")), cp("a", None), cp("b", Some("a"))],
            None,
        );
        t.check_invariants().unwrap();
        assert_eq!(t.current(), Some("c"));
        let forked = CheckpointTree::load(
            vec![cp("a", None), cp("b", Some("a")), cp("c", Some("a"))],
            None,
        );
        assert_eq!(forked.current(), None);
    }

    #[test]
    fn load_breaks_a_stored_cycle_at_its_first_name_and_keeps_orphans_as_roots() {
        let t = CheckpointTree::load(
            vec![
                cp("b", Some("a")),
                cp("a", Some("b")),
                cp("d", Some("c")),
                cp("o", Some("gone")),
                cp("s", Some("s")),
                // Hangs on the cycle and comes first by name: it is the first one broken off.
                cp("0x", Some("b")),
            ],
            None,
        );
        t.check_invariants().unwrap();
        assert_eq!(t.get("0x").unwrap().parent, None);
        assert_eq!(t.get("a").unwrap().parent, None);
        assert_eq!(t.get("b").unwrap().parent.as_deref(), Some("a"));
        assert_eq!(t.get("d").unwrap().parent, None);
        assert_eq!(t.get("o").unwrap().parent, None);
        assert_eq!(t.get("s").unwrap().parent, None);
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn load_of_a_long_chain_given_newest_first_links_every_generation() {
        let mut stored: Vec<Checkpoint> = (0..5_000)
            .map(|i| {
                cp(
                    &format!("c{i}"),
                    (i > 0).then(|| format!("c{}", i - 1)).as_deref(),
                )
            })
            .collect();
        stored.reverse();
        let t = CheckpointTree::load(stored, None);
        t.check_invariants().unwrap();
        assert_eq!(t.current(), Some("c4999"));
        assert_eq!(t.get("c4999").unwrap().parent.as_deref(), Some("c4998"));
    }

    #[test]
    fn freed_slots_are_reused_without_breaking_links() {
        let mut t = chain(5);
        t.discard("c2").unwrap();
        // `x` takes the slot `c2` left; `c3` (with `c4` below it) moves under `x`.
        t.redefine(cp("x", Some("c1"))).unwrap();
        t.redefine(cp("c3", Some("x"))).unwrap();
        t.check_invariants().unwrap();
        let topo = ListFilter {
            topological: true,
            ..Default::default()
        };
        assert_eq!(names(t.list(topo)), ["c0", "c1", "x", "c3", "c4"]);
        t.discard("c0").unwrap();
        t.discard("x").unwrap();
        t.check_invariants().unwrap();
        assert_eq!(names(t.list(topo)), ["c1", "c3", "c4"]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn deep_chain_walks_without_recursion() {
        let mut t = chain(20_000);
        let order = t.delete_order("c0", DeleteScope::WithChildren).unwrap();
        assert_eq!(order.len(), 20_000);
        assert_eq!(order[0], "c19999");
        let topo = ListFilter {
            topological: true,
            ..Default::default()
        };
        assert_eq!(t.list(topo).len(), 20_000);
        t.discard("c10000").unwrap();
        t.check_invariants().unwrap();
    }
}
