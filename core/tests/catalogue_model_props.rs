//! Stateful property test: the backup catalogue against a small reference model (a map from
//! backup to parent) under inserts, deletes in every mode, delete-all and consolidation.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use vbackup_core::catalogue::{
    BackupImage, BackupKind, BackupListFilter, Catalogue, CatalogueError, CatalogueOp, DeleteMode,
    Digest, ManagedBackup,
};
use vbackup_core::model::ImageFormat;

#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    /// backup id -> (parent id, creation time)
    backups: BTreeMap<u8, (Option<u8>, u64)>,
    clock: u64,
}

impl Model {
    fn children(&self, id: u8) -> Vec<u8> {
        self.backups
            .iter()
            .filter(|(_, (p, _))| *p == Some(id))
            .map(|(c, _)| *c)
            .collect()
    }

    fn subtree(&self, id: u8) -> Vec<u8> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() {
            out.extend(self.children(out[i]));
            i += 1;
        }
        out
    }

    fn chain(&self, id: u8) -> Vec<u8> {
        let mut out = vec![id];
        while let Some((Some(p), _)) = self.backups.get(out.last().unwrap()) {
            out.push(*p);
        }
        out.reverse();
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert { id: u8, parent: Option<u8> },
    Delete { id: u8, mode: DeleteMode },
    DeleteAll,
    Consolidate { id: u8 },
}

fn uuid(id: u8) -> String {
    format!("00000000-0000-4000-8000-{id:012x}")
}

fn id_of(uuid: &str) -> u8 {
    u8::from_str_radix(&uuid[24..], 16).unwrap()
}

fn record(id: u8, parent: Option<u8>, time: u64) -> ManagedBackup {
    ManagedBackup {
        uuid: uuid(id),
        domain: "vm".into(),
        parent: parent.map(uuid),
        checkpoint: Some(format!("c{id}")),
        // Several backups share a second; the sequence number orders them.
        creation_time: time / 3,
        sequence: Some(time),
        description: None,
        kind: if parent.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        disks: vec![BackupImage {
            disk: "vda".into(),
            path: format!("/b/{id}.qcow2"),
            format: ImageFormat::Qcow2,
            virtual_size_bytes: 1 << 20,
            allocated_size_bytes: 4096,
            digest: Digest::sha256(&[id; 32]),
        }],
    }
}

const IDS: u8 = 6;

struct Ref;

impl ReferenceStateMachine for Ref {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let mode = prop_oneof![
            Just(DeleteMode::Alone),
            Just(DeleteMode::RebaseChildren),
            Just(DeleteMode::WithChildren),
        ];
        prop_oneof![
            4 => (0..IDS, proptest::option::of(0..IDS))
                .prop_map(|(id, parent)| Op::Insert { id, parent }),
            2 => (0..IDS, mode).prop_map(|(id, mode)| Op::Delete { id, mode }),
            1 => Just(Op::DeleteAll),
            1 => (0..IDS).prop_map(|id| Op::Consolidate { id }),
        ]
        .boxed()
    }

    fn apply(mut s: Model, op: &Op) -> Model {
        match *op {
            Op::Insert { id, parent } => {
                let parent_ok = parent.is_none_or(|p| s.backups.contains_key(&p));
                if !s.backups.contains_key(&id) && parent_ok {
                    s.clock += 1;
                    s.backups.insert(id, (parent, s.clock));
                }
            }
            Op::Delete { id, mode } => {
                let Some(&(parent, _)) = s.backups.get(&id) else {
                    return s;
                };
                match mode {
                    DeleteMode::Alone => {
                        if s.children(id).is_empty() {
                            s.backups.remove(&id);
                        }
                    }
                    DeleteMode::RebaseChildren => {
                        for c in s.children(id) {
                            s.backups.get_mut(&c).unwrap().0 = parent;
                        }
                        s.backups.remove(&id);
                    }
                    DeleteMode::WithChildren => {
                        for d in s.subtree(id) {
                            s.backups.remove(&d);
                        }
                    }
                }
            }
            Op::DeleteAll => s.backups.clear(),
            Op::Consolidate { id } => {
                if let Some(b) = s.backups.get_mut(&id) {
                    b.0 = None;
                }
            }
        }
        s
    }
}

struct Sut {
    catalogue: Catalogue,
    before: Model,
}

struct CatalogueTest;

impl StateMachineTest for CatalogueTest {
    type SystemUnderTest = Sut;
    type Reference = Ref;

    fn init_test(model: &Model) -> Sut {
        Sut {
            catalogue: Catalogue::new("vm"),
            before: model.clone(),
        }
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        let changed = sut.before.backups != model.backups;
        match op {
            Op::Insert { id, parent } => {
                let r = sut
                    .catalogue
                    .insert(record(id, parent, sut.before.clock + 1));
                assert_eq!(r.is_ok(), changed, "insert {id} under {parent:?}: {r:?}");
                if let Err(e) = r {
                    let self_parent = parent == Some(id);
                    assert!(
                        matches!(
                            e,
                            CatalogueError::Duplicate(_) | CatalogueError::MissingParent { .. }
                        ) || (self_parent && matches!(e, CatalogueError::Inconsistent { .. })),
                        "{e}"
                    );
                }
            }
            Op::Delete { id, mode } => {
                let r = sut.catalogue.delete(&uuid(id), mode);
                let present = sut.before.backups.contains_key(&id);
                assert_eq!(r.is_ok(), changed || (present && mode != DeleteMode::Alone));
                if let Ok(ops) = r {
                    let removed: Vec<u8> = sut
                        .before
                        .backups
                        .keys()
                        .filter(|k| !model.backups.contains_key(k))
                        .copied()
                        .collect();
                    check_deletion_ops(&ops, &removed);
                }
            }
            Op::DeleteAll => {
                let ops = sut.catalogue.delete_all();
                let removed: Vec<u8> = sut.before.backups.keys().copied().collect();
                check_deletion_ops(&ops, &removed);
            }
            Op::Consolidate { id } => {
                let r = sut.catalogue.consolidate(&uuid(id));
                let before = sut.before.backups.get(&id);
                assert_eq!(r.is_ok(), before.is_some(), "consolidate {id}: {r:?}");
                if let Ok(ops) = r {
                    match before {
                        Some((Some(_), _)) => {
                            assert_eq!(
                                ops[0],
                                CatalogueOp::RebaseImage {
                                    path: format!("/b/{id}.qcow2"),
                                    backing: None
                                }
                            );
                            assert!(
                                matches!(&ops[1], CatalogueOp::PutBackup(b) if b.uuid == uuid(id))
                            );
                            assert_eq!(ops.len(), 2);
                        }
                        _ => assert!(ops.is_empty(), "a full backup: {ops:?}"),
                    }
                }
            }
        }
        // The catalogue holds exactly the model's backups with the model's parents.
        let got: BTreeMap<u8, Option<u8>> = sut
            .catalogue
            .list(BackupListFilter::All)
            .into_iter()
            .map(|b| (id_of(&b.uuid), b.parent.as_deref().map(id_of)))
            .collect();
        let want: BTreeMap<u8, Option<u8>> =
            model.backups.iter().map(|(k, (p, _))| (*k, *p)).collect();
        assert_eq!(got, want);
        for (&id, &(parent, _)) in &model.backups {
            let b = sut.catalogue.get(&uuid(id)).unwrap();
            assert_eq!(b.kind == BackupKind::Full, parent.is_none());
            assert_eq!(
                &ManagedBackup::parse(&b.format()).unwrap(),
                b,
                "records round-trip"
            );
            let children: Vec<u8> = sut
                .catalogue
                .children(&uuid(id))
                .unwrap()
                .into_iter()
                .map(|b| id_of(&b.uuid))
                .collect();
            let mut want_children = model.children(id);
            want_children.sort_by_key(|c| model.backups[c].1);
            assert_eq!(children, want_children);
            let chain: Vec<u8> = sut
                .catalogue
                .chain(&uuid(id))
                .unwrap()
                .into_iter()
                .map(|b| id_of(&b.uuid))
                .collect();
            assert_eq!(chain, model.chain(id));
            let plan = sut.catalogue.plan_restore(&uuid(id), &[]).unwrap();
            let paths: Vec<String> = plan.disks[0]
                .images
                .iter()
                .map(|i| i.path.clone())
                .collect();
            let want_paths: Vec<String> = model
                .chain(id)
                .iter()
                .rev()
                .map(|c| format!("/b/{c}.qcow2"))
                .collect();
            assert_eq!(paths, want_paths, "restore reads the chain top first");
        }
        let full: Vec<u8> = sut
            .catalogue
            .list(BackupListFilter::Full)
            .into_iter()
            .map(|b| id_of(&b.uuid))
            .collect();
        let mut want_full: Vec<u8> = want
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(k, _)| *k)
            .collect();
        want_full.sort_by_key(|c| model.backups[c].1);
        assert_eq!(full, want_full);
        let latest: Vec<u8> = sut
            .catalogue
            .list(BackupListFilter::LatestChain)
            .into_iter()
            .map(|b| id_of(&b.uuid))
            .collect();
        let want_latest = model
            .backups
            .iter()
            .max_by_key(|(_, (_, t))| *t)
            .map(|(k, _)| model.chain(*k))
            .unwrap_or_default();
        assert_eq!(latest, want_latest);
        sut.before = model.clone();
        sut
    }
}

/// Every removed backup's checkpoint, record and image are deleted, in that order, and
/// nothing else is.
fn check_deletion_ops(ops: &[CatalogueOp], removed: &[u8]) {
    let mut records: Vec<u8> = Vec::new();
    let mut files: Vec<String> = Vec::new();
    let mut checkpoints: Vec<String> = Vec::new();
    for op in ops {
        match op {
            CatalogueOp::DeleteCheckpoint { name } => {
                assert!(
                    records.is_empty() && files.is_empty(),
                    "checkpoints are deleted before records and files"
                );
                checkpoints.push(name.clone());
            }
            CatalogueOp::DeleteBackup { uuid } => {
                assert!(files.is_empty(), "records are deleted before files");
                records.push(id_of(uuid));
            }
            CatalogueOp::RemoveImage { path } => files.push(path.clone()),
            CatalogueOp::RebaseImage { .. } | CatalogueOp::PutBackup(_) => {
                assert!(
                    records.is_empty(),
                    "children are rewritten before deletions"
                );
            }
            CatalogueOp::SetDefaultTarget(_) => panic!("unexpected {op:?}"),
        }
    }
    records.sort_unstable();
    files.sort();
    let mut want_files: Vec<String> = removed.iter().map(|c| format!("/b/{c}.qcow2")).collect();
    want_files.sort();
    assert_eq!(records, removed);
    assert_eq!(files, want_files);
    // Every removed backup had a checkpoint of its own: each one goes with it.
    checkpoints.sort();
    let mut want_checkpoints: Vec<String> = removed.iter().map(|c| format!("c{c}")).collect();
    want_checkpoints.sort();
    assert_eq!(checkpoints, want_checkpoints);
}

prop_state_machine! {
    #[test]
    fn catalogue_matches_reference_model(sequential 1..40 => CatalogueTest);
}
