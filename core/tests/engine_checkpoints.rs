//! Checkpoint operations against the scripted QMP peer; command plans are snapshotted.

mod engine_support;

use engine_support::*;
use vbackup_core::checkpoint::{CheckpointTree, DeleteScope};
use vbackup_core::domain::{Domain, DomainConfig, Reply, Request, StoreOp};
use vbackup_core::error::{ConflictError, Error, RequestError};
use vbackup_core::model::ImageFormat;

fn create(h: &mut Harness, name: &str) -> u64 {
    h.request(Request::CheckpointCreate {
        checkpoint: checkpoint(name, &["vda", "vdb"]),
        quiesce: false,
    })
}

#[test]
fn checkpoint_create_adds_one_persistent_bitmap_per_disk_in_one_transaction() {
    let mut h = lab_with_checkpoints(&[]);
    create(&mut h, "c1");
    create(&mut h, "c2");
    assert!(h.peer.has_bitmap("libvirt-2-format", "c2"));
    assert!(h.peer.has_bitmap("libvirt-1-format", "c1"));
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.current(), Some("c2"));
    assert_eq!(tree.get("c2").unwrap().parent.as_deref(), Some("c1"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_create_refuses_quiesce_without_any_command() {
    let mut h = lab_with_checkpoints(&[]);
    let id = h.request(Request::CheckpointCreate {
        checkpoint: checkpoint("c1", &["vda"]),
        quiesce: true,
    });
    assert!(matches!(
        h.answer(id),
        Some(Err(Error::Request(RequestError::Unsupported(_))))
    ));
    assert!(!h.transcript().contains("->"));
}

#[test]
fn checkpoint_create_refuses_duplicate_name_and_raw_disk() {
    let mut def = lab_domain();
    def.disks[1].layers[0].format = ImageFormat::Raw;
    let peer = Peer::for_domain(&def, &lab_sizes());
    let mut h = Harness::new(def, peer, CheckpointTree::new());
    h.connect();
    let raw = create(&mut h, "c1");
    let ok = h.request(Request::CheckpointCreate {
        checkpoint: checkpoint("c1", &["vda"]),
        quiesce: false,
    });
    let dup = h.request(Request::CheckpointCreate {
        checkpoint: checkpoint("c1", &["vda"]),
        quiesce: false,
    });
    assert!(matches!(h.answer(ok), Some(Ok(Reply::Checkpoint(_)))));
    assert_eq!(
        h.answer(dup),
        Some(&Err(Error::Request(RequestError::CheckpointExists(
            "c1".into()
        ))))
    );
    let Some(Err(Error::Request(RequestError::Unsupported(msg)))) = h.answer(raw) else {
        panic!("raw disk accepted");
    };
    assert_eq!(
        msg,
        "checkpoint for disk vdb unsupported for storage type raw"
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_create_refused_by_qemu_leaves_no_metadata() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.fail_next("transaction", "Bitmap already exists: c1");
    let id = create(&mut h, "c1");
    assert!(matches!(h.answer(id), Some(Err(Error::QemuRefused { .. }))));
    assert!(h.domain.view().checkpoints.is_empty());
    // Only the pending record, set before the transaction and cleared after the refusal.
    assert_eq!(
        h.store,
        [
            StoreOp::SetPendingCheckpoints(vec!["c1".into()]),
            StoreOp::SetPendingCheckpoints(Vec::new())
        ]
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_create_needs_a_connection() {
    let def = lab_domain();
    let peer = Peer::for_domain(&def, &lab_sizes());
    let mut h = Harness::new(def, peer, CheckpointTree::new());
    let id = create(&mut h, "c1");
    assert_eq!(
        h.answer(id),
        Some(&Err(Error::Request(RequestError::NotRunning)))
    );
}

#[test]
fn checkpoint_delete_middle_removes_bitmaps_and_reparents_child() {
    let mut h = lab_with_checkpoints(&["c1", "c2", "c3"]);
    h.request(Request::CheckpointDelete {
        name: "c2".into(),
        scope: DeleteScope::Single,
        metadata_only: false,
    });
    assert!(!h.peer.has_bitmap("libvirt-2-format", "c2"));
    assert!(h.peer.has_bitmap("libvirt-2-format", "c1"));
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.get("c3").unwrap().parent.as_deref(), Some("c1"));
    assert_eq!(tree.current(), Some("c3"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_children_goes_leaf_first_and_moves_current() {
    let mut h = lab_with_checkpoints(&["c1", "c2", "c3"]);
    h.request(Request::CheckpointDelete {
        name: "c2".into(),
        scope: DeleteScope::WithChildren,
        metadata_only: false,
    });
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.len(), 1);
    assert_eq!(tree.current(), Some("c1"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_children_only_keeps_the_checkpoint_and_makes_it_current() {
    let mut h = lab_with_checkpoints(&["c1", "c2", "c3"]);
    h.request(Request::CheckpointDelete {
        name: "c1".into(),
        scope: DeleteScope::ChildrenOnly,
        metadata_only: false,
    });
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.len(), 1);
    assert_eq!(tree.current(), Some("c1"));
    assert!(h.peer.has_bitmap("libvirt-1-format", "c1"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_metadata_only_sends_no_command_and_keeps_bitmaps() {
    let mut h = lab_with_checkpoints(&["c1", "c2"]);
    h.request(Request::CheckpointDelete {
        name: "c1".into(),
        scope: DeleteScope::Single,
        metadata_only: true,
    });
    assert!(h.peer.has_bitmap("libvirt-2-format", "c1"));
    assert!(!h.transcript().contains("->"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_on_snapshot_layers_reopens_backing_read_write_and_back() {
    let mut h = lab_like(layered_domain(), &["c1", "c2"]);
    h.request(Request::CheckpointDelete {
        name: "c1".into(),
        scope: DeleteScope::Single,
        metadata_only: false,
    });
    assert!(!h.peer.has_bitmap("libvirt-3-format", "c1"));
    assert!(!h.peer.has_bitmap("libvirt-2-format", "c1"));
    assert!(
        h.peer.nodes["libvirt-2-format"].ro,
        "backing layer is read-only again"
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_fails_when_bitmap_is_in_no_layer() {
    let mut h = lab_like(layered_domain(), &["c1"]);
    for n in ["libvirt-3-format", "libvirt-2-format"] {
        h.peer.nodes.get_mut(n).unwrap().bitmaps.clear();
    }
    let id = h.request(Request::CheckpointDelete {
        name: "c1".into(),
        scope: DeleteScope::Single,
        metadata_only: false,
    });
    assert_eq!(
        h.answer(id),
        Some(&Err(Error::Request(RequestError::BitmapNotInChain {
            bitmap: "c1".into(),
            disk: "vda".into()
        })))
    );
    assert_eq!(h.domain.view().checkpoints.len(), 1);
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_size_merges_into_temporary_bitmap_and_cleans_stale_leftover() {
    let mut h = lab_with_checkpoints(&["c1"]);
    h.peer.bitmap_mut("libvirt-2-format", "c1").count = 3 << 20;
    h.peer
        .add_bitmap("libvirt-2-format", "libvirt-tmp-size-xml", 0);
    let id = h.request(Request::CheckpointGetXml {
        name: "c1".into(),
        size: true,
    });
    let Some(Ok(Reply::Checkpoint(c))) = h.answer(id) else {
        panic!("no size")
    };
    assert_eq!(c.disks[0].size_bytes, Some(3 << 20));
    assert_eq!(c.disks[1].size_bytes, Some(1 << 20));
    assert!(
        !h.peer
            .has_bitmap("libvirt-2-format", "libvirt-tmp-size-xml")
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_size_skips_disks_with_broken_chain() {
    let mut h = lab_with_checkpoints(&["c1"]);
    h.peer.bitmap_mut("libvirt-1-format", "c1").inconsistent = true;
    let id = h.request(Request::CheckpointGetXml {
        name: "c1".into(),
        size: true,
    });
    let Some(Ok(Reply::Checkpoint(c))) = h.answer(id) else {
        panic!("no answer")
    };
    assert_eq!(c.disks[1].size_bytes, None);
    assert!(c.disks[0].size_bytes.is_some());
}

#[test]
fn redefine_validate_refuses_missing_bitmap_and_accepts_valid_chain() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.add_bitmap("libvirt-2-format", "c1", 0);
    h.peer.add_bitmap("libvirt-1-format", "c1", 0);
    let good = h.request(Request::CheckpointRedefine {
        checkpoint: checkpoint("c1", &["vda", "vdb"]),
        validate: true,
    });
    let mut c2 = checkpoint("c2", &["vda"]);
    c2.parent = Some("c1".into());
    let bad = h.request(Request::CheckpointRedefine {
        checkpoint: c2,
        validate: true,
    });
    assert_eq!(h.answer(good), Some(&Ok(Reply::Done)));
    assert_eq!(
        h.answer(bad),
        Some(&Err(Error::Request(RequestError::CheckpointInconsistent {
            bitmap: "c2".into(),
            disk: "vda".into()
        })))
    );
    assert_eq!(h.domain.view().checkpoints.current(), Some("c1"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn redefine_without_validation_needs_no_qemu() {
    let def = lab_domain();
    let peer = Peer::for_domain(&def, &lab_sizes());
    let mut h = Harness::new(def, peer, CheckpointTree::new());
    let id = h.request(Request::CheckpointRedefine {
        checkpoint: checkpoint("c1", &["vda"]),
        validate: false,
    });
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let mut orphan = checkpoint("c3", &["vda"]);
    orphan.parent = Some("c2".into());
    let id = h.request(Request::CheckpointRedefine {
        checkpoint: orphan,
        validate: false,
    });
    assert!(matches!(
        h.answer(id),
        Some(Err(Error::Request(RequestError::ParentNotFound { .. })))
    ));
}

#[test]
fn second_checkpoint_operation_is_refused_while_one_is_in_flight() {
    use vbackup_core::domain::{Input, RequestId};
    use vbackup_core::link::Timestamp;
    let mut h = lab_with_checkpoints(&["c1"]);
    // Drive the domain by hand so the first operation stays in flight.
    let out = h.domain.handle(
        Timestamp::from_ms(1),
        Input::Request(
            RequestId(100),
            Request::CheckpointCreate {
                checkpoint: checkpoint("c2", &["vda"]),
                quiesce: false,
            },
        ),
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, vbackup_core::domain::Output::Send(..)))
    );
    let out = h.domain.handle(
        Timestamp::from_ms(2),
        Input::Request(
            RequestId(101),
            Request::CheckpointDelete {
                name: "c1".into(),
                scope: DeleteScope::Single,
                metadata_only: false,
            },
        ),
    );
    let Some(vbackup_core::domain::Output::Respond(_, Err(Error::Conflict(c)))) = out.first()
    else {
        panic!("not refused: {out:?}");
    };
    assert_eq!(
        c,
        &ConflictError::DomainJob {
            holder: "checkpoint-create c2".into()
        }
    );
}

#[test]
fn unanswered_command_times_out_as_qemu_misbehaving() {
    use vbackup_core::domain::{Input, Output, RequestId};
    use vbackup_core::link::Timestamp;
    let mut h = lab_with_checkpoints(&[]);
    let t0 = Timestamp::from_ms(1_000);
    let out = h.domain.handle(
        t0,
        Input::Request(
            RequestId(7),
            Request::CheckpointCreate {
                checkpoint: checkpoint("c1", &["vda"]),
                quiesce: false,
            },
        ),
    );
    assert!(out.iter().any(|o| matches!(o, Output::Send(..))));
    let deadline = h
        .domain
        .next_deadline()
        .expect("a deadline while a command is out");
    assert_eq!(deadline, t0.plus_ms(60_000));
    assert!(h.domain.handle(t0.plus_ms(59_999), Input::Tick).is_empty());
    let out = h.domain.handle(deadline, Input::Tick);
    let Some(Output::Respond(RequestId(7), Err(Error::QemuMisbehaved(msg)))) = out.first() else {
        panic!("{out:?}");
    };
    assert!(msg.contains("no reply to transaction"));
    assert!(h.domain.view().checkpoints.is_empty());
    assert_eq!(h.domain.next_deadline(), None);
}

#[test]
fn connecting_reports_missing_and_orphan_bitmaps() {
    use vbackup_core::domain::Input;
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    peer.add_bitmap("libvirt-2-format", "c1", 0);
    peer.add_bitmap("libvirt-1-format", "c9", 0);
    let mut tree = CheckpointTree::new();
    tree.insert_created(checkpoint("c1", &["vda", "vdb"]))
        .unwrap();
    let mut h = Harness::new(def, peer, tree);
    h.feed(Input::Reconnected);
    insta::assert_snapshot!(h.transcript());
    assert!(h.transcript().contains(
        r#"BitmapDrift(BitmapDrift { missing: [("c1", "vdb")], orphans: [("libvirt-1-format", "c9")], removed: [] })"#
    ));
}

fn temp_bitmap(peer: &mut Peer, node: &str, name: &str) {
    peer.add_bitmap(node, name, 0);
    let b = peer.bitmap_mut(node, name);
    b.persistent = false;
    b.recording = false;
}

fn drift_events(h: &Harness) -> Vec<String> {
    h.lines
        .iter()
        .filter(|l| l.starts_with("event BitmapDrift"))
        .cloned()
        .collect()
}

#[test]
fn reconnect_removes_only_the_bitmaps_the_engine_owns() {
    use vbackup_core::domain::Input;
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    // c5's transaction went through but its metadata was never written.
    peer.add_bitmap("libvirt-2-format", "c5", 0);
    peer.add_bitmap("libvirt-1-format", "c5", 0);
    // Leftovers of a size computation and of a push backup whose cleanup was lost.
    temp_bitmap(&mut peer, "libvirt-2-format", "libvirt-tmp-size-xml");
    temp_bitmap(&mut peer, "libvirt-1-format", "backup-vdb");
    // Not the engine's: someone else's bitmaps, and one a metadata-only deletion kept.
    peer.add_bitmap("libvirt-2-format", "kept-for-redefine", 0);
    temp_bitmap(&mut peer, "libvirt-2-format", "someone-elses-temp");
    let mut h = Harness::new(def, peer, CheckpointTree::new());
    h.domain = Domain::new(
        lab_domain(),
        DomainConfig::default(),
        CheckpointTree::new(),
        None,
    )
    .with_pending_checkpoints(["c5".to_owned()]);
    h.feed(Input::Reconnected);
    for (node, name) in [
        ("libvirt-2-format", "c5"),
        ("libvirt-1-format", "c5"),
        ("libvirt-2-format", "libvirt-tmp-size-xml"),
        ("libvirt-1-format", "backup-vdb"),
    ] {
        assert!(!h.peer.has_bitmap(node, name), "{node} {name} left");
    }
    assert!(h.peer.has_bitmap("libvirt-2-format", "kept-for-redefine"));
    assert!(h.peer.has_bitmap("libvirt-2-format", "someone-elses-temp"));
    assert_eq!(h.store, [StoreOp::SetPendingCheckpoints(Vec::new())]);
    assert!(h.domain.view().connected);
    assert_eq!(
        drift_events(&h),
        [
            r#"event BitmapDrift(BitmapDrift { missing: [], orphans: [("libvirt-2-format", "kept-for-redefine")], removed: [("libvirt-2-format", "c5"), ("libvirt-2-format", "libvirt-tmp-size-xml"), ("libvirt-1-format", "c5"), ("libvirt-1-format", "backup-vdb")] })"#
        ]
    );
}

/// Asks for checkpoint `name` on both disks at `now_ms` and lets QEMU run every command it
/// sent, without handing any reply back (the connection is about to drop).
fn create_whose_reply_is_lost(h: &mut Harness, now_ms: u64, id: u64, name: &str) {
    use vbackup_core::domain::{Input, Output, RequestId};
    use vbackup_core::link::Timestamp;
    let out = h.domain.handle(
        Timestamp::from_ms(now_ms),
        Input::Request(
            RequestId(id),
            Request::CheckpointCreate {
                checkpoint: checkpoint(name, &["vda", "vdb"]),
                quiesce: false,
            },
        ),
    );
    for o in &out {
        if let Output::Send(_, cmd) = o {
            let _ = h.peer.execute(cmd);
        }
    }
}

#[test]
fn checkpoint_create_whose_reply_was_lost_is_undone_by_the_reconnect() {
    use vbackup_core::domain::Input;
    let mut h = lab_with_checkpoints(&[]);
    // QEMU runs the transaction; the connection drops before its reply.
    create_whose_reply_is_lost(&mut h, 1, 9, "c1");
    assert!(h.peer.has_bitmap("libvirt-2-format", "c1"));
    h.feed(Input::LinkDown);
    assert!(matches!(h.answer(9), Some(Err(Error::LinkLost(_)))));
    h.feed(Input::Reconnected);
    assert!(!h.peer.has_bitmap("libvirt-2-format", "c1"));
    assert!(!h.peer.has_bitmap("libvirt-1-format", "c1"));
    assert!(h.domain.view().checkpoints.is_empty());
    // The name is free again.
    let id = create(&mut h, "c1");
    assert!(matches!(h.answer(id), Some(Ok(_))), "{:?}", h.answer(id));
}

#[test]
fn reconnect_marks_checkpoint_with_missing_bitmap_invalid() {
    use vbackup_core::backup::{BackupDiskSpec, BackupMode, BackupSpec, BackupStore, StoreKind};
    use vbackup_core::domain::Input;
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    peer.add_bitmap("libvirt-2-format", "c1", 0);
    peer.add_bitmap("libvirt-1-format", "c1", 0);
    peer.bitmap_mut("libvirt-1-format", "c1").inconsistent = true;
    let mut tree = CheckpointTree::new();
    tree.insert_created(checkpoint("c1", &["vda", "vdb"]))
        .unwrap();
    let mut h = Harness::new(def, peer, tree);
    h.feed(Input::Reconnected);
    let invalid = h.domain.view().invalid_checkpoints.clone();
    assert_eq!(invalid.len(), 1);
    assert!(invalid["c1"].contains("vdb") && !invalid["c1"].contains("vda"));
    let spec = |incremental: Option<&str>| BackupSpec {
        mode: BackupMode::Push,
        incremental: incremental.map(Into::into),
        server: None,
        disks: ["vda", "vdb"]
            .iter()
            .map(|t| BackupDiskSpec {
                target: (*t).into(),
                backup: true,
                incremental: incremental.map(Into::into),
                store: Some(BackupStore {
                    kind: StoreKind::File,
                    path: Some(format!("/backups/{t}.qcow2")),
                    format: None,
                }),
                export_name: None,
                export_bitmap: None,
            })
            .collect(),
    };
    h.lines.clear();
    let id = h.request(Request::BackupBegin {
        spec: spec(Some("c1")),
        checkpoint: None,
        reuse_external: false,
    });
    assert_eq!(
        h.answer(id),
        Some(&Err(Error::Request(RequestError::CheckpointInconsistent {
            bitmap: "c1".into(),
            disk: "vdb".into()
        })))
    );
    assert!(
        !h.transcript().contains("->"),
        "refused before any command: {}",
        h.transcript()
    );
    let id = h.request(Request::BackupBegin {
        spec: spec(None),
        checkpoint: None,
        reuse_external: false,
    });
    assert!(matches!(h.answer(id), Some(Ok(_))), "{:?}", h.answer(id));
}

#[test]
fn refused_repair_is_tried_again_after_a_delay() {
    use vbackup_core::domain::Input;
    use vbackup_core::link::Timestamp;
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    temp_bitmap(&mut peer, "libvirt-2-format", "libvirt-tmp-size-xml");
    peer.fail_next("block-dirty-bitmap-remove", "simulated refusal");
    let mut h = Harness::new(def, peer, CheckpointTree::new());
    h.feed(Input::Reconnected);
    assert!(
        h.peer
            .has_bitmap("libvirt-2-format", "libvirt-tmp-size-xml")
    );
    let due = h.domain.next_deadline().expect("a retry is scheduled");
    assert!(due > Timestamp::from_ms(h.now_ms));
    h.now_ms = due.as_ms();
    h.feed(Input::Tick);
    assert!(
        !h.peer
            .has_bitmap("libvirt-2-format", "libvirt-tmp-size-xml")
    );
    assert_eq!(h.domain.next_deadline(), None);
}

/// The lab with c1 ← c2 ← c3 after QEMU lost c3's bitmap on `lost` disks' nodes, reconnected
/// so the reconcile marked c3 invalid.
fn lab_after_lost_bitmaps(lost: &[&str]) -> Harness {
    use vbackup_core::domain::Input;
    let mut h = lab_with_checkpoints(&["c1", "c2", "c3"]);
    for node in lost {
        h.peer
            .nodes
            .get_mut(*node)
            .unwrap()
            .bitmaps
            .retain(|b| b.name != "c3");
    }
    h.feed(Input::LinkDown);
    h.feed(Input::Reconnected);
    assert!(h.domain.view().invalid_checkpoints.contains_key("c3"));
    h.lines.clear();
    h
}

#[test]
fn checkpoint_delete_of_invalid_checkpoint_skips_missing_bitmaps_and_keeps_parent_valid() {
    let mut h = lab_after_lost_bitmaps(&["libvirt-1-format"]);
    let id = h.request(Request::CheckpointDelete {
        name: "c3".into(),
        scope: DeleteScope::Single,
        metadata_only: false,
    });
    assert!(
        matches!(h.answer(id), Some(Ok(Reply::Done))),
        "{:?}",
        h.answer(id)
    );
    // The surviving instance on vda is removed, the parent's bitmaps are untouched.
    assert!(!h.peer.has_bitmap("libvirt-2-format", "c3"));
    assert!(h.peer.has_bitmap("libvirt-2-format", "c2"));
    assert!(h.peer.has_bitmap("libvirt-1-format", "c2"));
    let view = h.domain.view();
    assert!(view.checkpoints.get("c3").is_none());
    assert_eq!(view.checkpoints.current(), Some("c2"));
    assert!(view.invalid_checkpoints.is_empty());
    assert!(h.store.contains(&StoreOp::DeleteCheckpoint("c3".into())));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_of_checkpoint_without_any_bitmap_left_sends_no_transaction() {
    let mut h = lab_after_lost_bitmaps(&["libvirt-1-format", "libvirt-2-format"]);
    let id = h.request(Request::CheckpointDelete {
        name: "c3".into(),
        scope: DeleteScope::Single,
        metadata_only: false,
    });
    assert!(
        matches!(h.answer(id), Some(Ok(Reply::Done))),
        "{:?}",
        h.answer(id)
    );
    assert!(
        !h.transcript().contains("-> transaction"),
        "{}",
        h.transcript()
    );
    assert_eq!(h.domain.view().checkpoints.len(), 2);
}

#[test]
fn checkpoint_delete_children_and_children_only_handle_an_invalid_descendant() {
    for (scope, root, left) in [
        (DeleteScope::WithChildren, "c2", 1),
        (DeleteScope::ChildrenOnly, "c1", 1),
    ] {
        let mut h = lab_after_lost_bitmaps(&["libvirt-1-format", "libvirt-2-format"]);
        let id = h.request(Request::CheckpointDelete {
            name: root.into(),
            scope,
            metadata_only: false,
        });
        assert!(
            matches!(h.answer(id), Some(Ok(Reply::Done))),
            "{:?}",
            h.answer(id)
        );
        let tree = h.domain.view().checkpoints;
        assert_eq!(tree.len(), left, "{scope:?}");
        assert_eq!(tree.current(), Some("c1"));
        assert!(!h.peer.has_bitmap("libvirt-2-format", "c2"));
        assert!(h.peer.has_bitmap("libvirt-2-format", "c1"));
    }
}

#[test]
fn second_create_before_postponed_reconcile_keeps_the_first_pending_record() {
    use vbackup_core::domain::Input;
    let mut h = lab_with_checkpoints(&[]);
    // QEMU runs c1's transaction; the connection drops before its reply.
    let now = h.now_ms;
    create_whose_reply_is_lost(&mut h, now, 90, "c1");
    h.feed(Input::LinkDown);
    // The first reconcile pass after the reconnect fails and is postponed.
    h.peer
        .fail_next("query-named-block-nodes", "simulated refusal");
    h.feed(Input::Reconnected);
    assert!(h.peer.has_bitmap("libvirt-2-format", "c1"));
    assert!(h.domain.view().connected);
    let due = h.domain.next_deadline().expect("a retry is scheduled");
    // A second create runs before the pass.
    let id = h.request(Request::CheckpointCreate {
        checkpoint: checkpoint("c2", &["vda", "vdb"]),
        quiesce: false,
    });
    assert!(matches!(h.answer(id), Some(Ok(_))), "{:?}", h.answer(id));
    assert_eq!(
        h.store.last(),
        Some(&StoreOp::SetPendingCheckpoints(vec!["c1".into()])),
        "c2 settled, c1 still pending"
    );
    h.now_ms = due.as_ms();
    h.feed(Input::Tick);
    for node in ["libvirt-2-format", "libvirt-1-format"] {
        assert!(!h.peer.has_bitmap(node, "c1"), "c1's orphan left on {node}");
        assert!(h.peer.has_bitmap(node, "c2"));
    }
    assert_eq!(
        h.store.last(),
        Some(&StoreOp::SetPendingCheckpoints(Vec::new()))
    );
    let names: Vec<&str> = h
        .domain
        .view()
        .checkpoints
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["c2"]);
}

#[test]
fn refused_recreate_of_a_pending_name_keeps_its_record() {
    use vbackup_core::domain::Input;
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    // c1's transaction went through before a restart; its metadata was never written.
    peer.add_bitmap("libvirt-2-format", "c1", 0);
    peer.add_bitmap("libvirt-1-format", "c1", 0);
    peer.fail_next("query-named-block-nodes", "simulated refusal");
    let mut h = Harness::new(def, peer, CheckpointTree::new());
    h.domain = Domain::new(
        lab_domain(),
        DomainConfig::default(),
        CheckpointTree::new(),
        None,
    )
    .with_pending_checkpoints(["c1".to_owned()]);
    h.feed(Input::Reconnected);
    let due = h.domain.next_deadline().expect("a retry is scheduled");
    // Creating c1 again is refused by QEMU because of the orphans; the record stays.
    let id = create(&mut h, "c1");
    assert!(matches!(h.answer(id), Some(Err(Error::QemuRefused { .. }))));
    h.now_ms = due.as_ms();
    h.feed(Input::Tick);
    assert!(!h.peer.has_bitmap("libvirt-2-format", "c1"));
    assert!(!h.peer.has_bitmap("libvirt-1-format", "c1"));
    let id = create(&mut h, "c1");
    assert!(matches!(h.answer(id), Some(Ok(_))), "{:?}", h.answer(id));
}

/// The commands sent since line `from` of the transcript, by QMP name.
fn commands_since(h: &Harness, from: usize) -> Vec<String> {
    h.lines[from..]
        .iter()
        .filter_map(|l| l.strip_prefix("-> "))
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn checkpoint_delete_children_of_a_hundred_is_one_query_and_one_transaction() {
    let names: Vec<String> = (0..100).map(|i| format!("c{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = lab_like(layered_domain(), &refs);
    let from = h.lines.len();
    let id = h.request(Request::CheckpointDelete {
        name: "c001".into(),
        scope: DeleteScope::WithChildren,
        metadata_only: false,
    });
    assert!(matches!(h.answer(id), Some(Ok(Reply::Done))));
    let sent = commands_since(&h, from);
    assert_eq!(
        sent.iter()
            .filter(|c| *c == "query-named-block-nodes")
            .count(),
        1
    );
    assert_eq!(sent.iter().filter(|c| *c == "transaction").count(), 1);
    // The read-only backing layer is reopened once for all 99 bitmaps it holds, and back.
    assert_eq!(sent.iter().filter(|c| *c == "blockdev-reopen").count(), 2);
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.len(), 1);
    assert_eq!(tree.current(), Some("c000"));
    for n in &names[1..] {
        assert!(!h.peer.has_bitmap("libvirt-3-format", n));
        assert!(!h.peer.has_bitmap("libvirt-2-format", n));
    }
    assert!(h.peer.has_bitmap("libvirt-2-format", "c000"));
    let deleted = h
        .store
        .iter()
        .filter(|op| matches!(op, StoreOp::DeleteCheckpoint(_)))
        .count();
    assert_eq!(deleted, 99);
}

#[test]
fn checkpoint_delete_children_refused_by_qemu_deletes_none_of_them() {
    let mut h = lab_with_checkpoints(&["c1", "c2", "c3", "c4"]);
    h.peer.fail_next("transaction", "Bitmap 'c3' is busy");
    let id = h.request(Request::CheckpointDelete {
        name: "c1".into(),
        scope: DeleteScope::ChildrenOnly,
        metadata_only: false,
    });
    assert!(matches!(h.answer(id), Some(Err(Error::QemuRefused { .. }))));
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.len(), 4);
    assert_eq!(tree.current(), Some("c4"));
    for n in ["c2", "c3", "c4"] {
        assert!(h.peer.has_bitmap("libvirt-1-format", n));
    }
    assert!(
        !h.store
            .iter()
            .any(|op| matches!(op, StoreOp::DeleteCheckpoint(_)))
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_each_removes_every_bitmap_in_one_transaction_and_reparents_children() {
    let mut h = lab_with_checkpoints(&["c1", "c2", "c3", "c4", "c5"]);
    let from = h.lines.len();
    let id = h.request(Request::CheckpointDeleteEach {
        names: vec!["c2".into(), "c4".into()],
    });
    assert!(matches!(h.answer(id), Some(Ok(Reply::Done))));
    assert_eq!(commands_since(&h, from), ["transaction"]);
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.len(), 3);
    assert_eq!(tree.get("c3").unwrap().parent.as_deref(), Some("c1"));
    assert_eq!(tree.get("c5").unwrap().parent.as_deref(), Some("c3"));
    assert_eq!(tree.current(), Some("c5"));
    for n in ["c2", "c4"] {
        assert!(!h.peer.has_bitmap("libvirt-1-format", n));
        assert!(!h.peer.has_bitmap("libvirt-2-format", n));
    }
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_delete_each_refuses_an_unknown_name_before_sending_anything() {
    let mut h = lab_with_checkpoints(&["c1", "c2"]);
    let from = h.lines.len();
    let id = h.request(Request::CheckpointDeleteEach {
        names: vec!["c1".into(), "nope".into()],
    });
    assert_eq!(
        h.answer(id),
        Some(&Err(Error::Request(RequestError::NoCheckpoint(
            "nope".into()
        ))))
    );
    assert!(commands_since(&h, from).is_empty());
    assert_eq!(h.domain.view().checkpoints.len(), 2);
    // The short slot is free again.
    let id = h.request(Request::CheckpointDeleteEach {
        names: vec!["c1".into()],
    });
    assert!(
        matches!(h.answer(id), Some(Ok(Reply::Done))),
        "{:?}",
        h.answer(id)
    );
}
