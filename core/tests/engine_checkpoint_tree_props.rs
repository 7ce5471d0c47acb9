//! Stateful property test: the checkpoint tree against a small reference model (a map from name
//! to parent plus the current checkpoint), over random create / redefine / delete sequences.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use vbackup_core::checkpoint::{Checkpoint, CheckpointTree, DeleteScope, ListFilter};

#[derive(Debug, Clone, Default)]
struct Model {
    parent: BTreeMap<String, Option<String>>,
    current: Option<String>,
}

impl Model {
    fn children(&self, name: &str) -> Vec<String> {
        self.parent
            .iter()
            .filter(|(_, p)| p.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect()
    }
    fn descendants(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = self.children(name);
        while let Some(n) = todo.pop() {
            todo.extend(self.children(&n));
            out.push(n);
        }
        out
    }
    fn remove(&mut self, name: &str) {
        let p = self.parent.remove(name).flatten();
        for v in self.parent.values_mut() {
            if v.as_deref() == Some(name) {
                v.clone_from(&p);
            }
        }
        if self.current.as_deref() == Some(name) {
            self.current = p;
        }
    }
    fn is_ancestor_or_self(&self, anc: &str, mut n: Option<String>) -> bool {
        while let Some(x) = n {
            if x == anc {
                return true;
            }
            n = self.parent.get(&x).cloned().flatten();
        }
        false
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Redefine(String, Option<String>),
    Delete(String, u8),
}

const NAMES: &[&str] = &["a", "b", "c", "d", "e", "f"];

struct RefTree;

impl ReferenceStateMachine for RefTree {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let name = proptest::sample::select(NAMES).prop_map(str::to_owned);
        let parent = proptest::option::of(proptest::sample::select(NAMES).prop_map(str::to_owned));
        prop_oneof![
            name.clone().prop_map(Op::Create),
            (name.clone(), parent).prop_map(|(n, p)| Op::Redefine(n, p)),
            (name, 0u8..3).prop_map(|(n, s)| Op::Delete(n, s)),
        ]
        .boxed()
    }

    fn apply(mut s: Model, op: &Op) -> Model {
        match op {
            Op::Create(n) => {
                if !s.parent.contains_key(n) {
                    s.parent.insert(n.clone(), s.current.clone());
                    s.current = Some(n.clone());
                }
            }
            Op::Redefine(n, p) => {
                let ok = match p {
                    None => true,
                    Some(p) => {
                        p != n
                            && s.parent.contains_key(p)
                            && !(s.parent.contains_key(n)
                                && s.is_ancestor_or_self(n, Some(p.clone())))
                    }
                };
                if ok {
                    let becomes_current = s.current.is_none() || (p.is_some() && *p == s.current);
                    s.parent.insert(n.clone(), p.clone());
                    if becomes_current {
                        s.current = Some(n.clone());
                    }
                }
            }
            Op::Delete(n, scope) => {
                if s.parent.contains_key(n) {
                    let desc = s.descendants(n);
                    if *scope != 0 {
                        // Leaf-first removal of descendants.
                        let mut remaining = desc.clone();
                        while !remaining.is_empty() {
                            let leaf = remaining
                                .iter()
                                .position(|x| s.children(x).is_empty())
                                .unwrap_or(0);
                            let x = remaining.remove(leaf);
                            s.remove(&x);
                        }
                    }
                    if *scope != 2 {
                        s.remove(n);
                    }
                }
            }
        }
        s
    }
}

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

struct TreeTest;

impl StateMachineTest for TreeTest {
    type SystemUnderTest = CheckpointTree;
    type Reference = RefTree;

    fn init_test(_: &Model) -> CheckpointTree {
        CheckpointTree::new()
    }

    fn apply(mut t: CheckpointTree, model: &Model, op: Op) -> CheckpointTree {
        match op {
            Op::Create(n) => {
                let _ = t.insert_created(cp(&n, None));
            }
            Op::Redefine(n, p) => {
                let _ = t.redefine(cp(&n, p.as_deref()));
            }
            Op::Delete(n, scope) => {
                let scope = match scope {
                    0 => DeleteScope::Single,
                    1 => DeleteScope::WithChildren,
                    _ => DeleteScope::ChildrenOnly,
                };
                if let Ok(order) = t.delete_order(&n, scope) {
                    t.discard_all(&order).unwrap();
                }
            }
        }
        t.check_invariants().unwrap();
        let got: BTreeMap<String, Option<String>> = t
            .list(ListFilter::default())
            .into_iter()
            .map(|c| (c.name.clone(), c.parent.clone()))
            .collect();
        assert_eq!(got, model.parent);
        assert_eq!(t.current().map(str::to_owned), model.current);
        let topo = t.list(ListFilter {
            topological: true,
            ..ListFilter::default()
        });
        let mut seen = std::collections::BTreeSet::new();
        for c in topo {
            if let Some(p) = &c.parent {
                assert!(seen.contains(p), "{} listed before its parent {p}", c.name);
            }
            seen.insert(c.name.clone());
        }
        t
    }
}

prop_state_machine! {
    #[test]
    fn checkpoint_tree_matches_reference_model(sequential 1..40 => TreeTest);
}
