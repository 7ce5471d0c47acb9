//! Replays of real libvirt 11.3 traces: given the same domain, the same request and QEMU's
//! recorded replies and events, the engine sends the command sequence libvirt sent (node names
//! renamed where our storage indexes differ). The deliberate differences are listed in
//! `testdata/traces/DIFFERENCES.md`.

use serde_json::Value;
use vbackup_core::backup::BackupSpec;
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk, CheckpointTree, DeleteScope};
use vbackup_core::domain::{
    Domain, DomainConfig, FileOp, Input, Output, PushWrite, Reply, Request, RequestId,
};
use vbackup_core::error::Error;
use vbackup_core::link::{Link, LinkError, NameMap, ReplayLink, Timestamp};
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup_core::qmp::QmpIn;
use vbackup_core::xml::{BackupDef, CheckpointDef, CheckpointMode, align_backup, align_checkpoint};

macro_rules! trace {
    ($name:literal) => {
        include_str!(concat!(
            "../../testdata/traces/libvirt-11.3/",
            $name,
            ".jsonl"
        ))
    };
}
macro_rules! input {
    ($name:literal) => {
        include_str!(concat!("../../testdata/traces/libvirt-11.3/", $name))
    };
}

fn lab1() -> DomainDef {
    let disk = |target: &str, node: &str| DiskDef {
        target: target.into(),
        device: DiskDevice::Disk,
        bus: Some("virtio".into()),
        readonly: false,
        transient: false,
        layers: vec![Layer {
            storage: StorageType::File,
            format: ImageFormat::Qcow2,
            path: Some(format!("/srv/lab/images/lab1-{target}.qcow2")),
            index: None,
            node_name: Some(node.into()),
        }],
    };
    DomainDef {
        name: "lab1".into(),
        uuid: None,
        disks: vec![
            disk("vda", "libvirt-2-format"),
            disk("vdb", "libvirt-1-format"),
        ],
    }
}

fn cp(name: &str, parent: Option<&str>) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        description: None,
        parent: parent.map(Into::into),
        creation_time_s: 1,
        disks: ["vda", "vdb"]
            .iter()
            .map(|t| CheckpointDisk {
                target: (*t).into(),
                bitmap: Some(name.into()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

fn tree(chain: &[&str]) -> CheckpointTree {
    let mut t = CheckpointTree::new();
    for (i, n) in chain.iter().enumerate() {
        t.redefine(cp(n, i.checked_sub(1).map(|p| chain[p])))
            .unwrap();
    }
    t
}

/// A domain with a negotiated session (the negotiation is not part of these traces), sending
/// libvirt's exact commands: QEMU flushes push targets itself.
fn connected(tree: CheckpointTree, mut config: DomainConfig) -> Domain {
    config.push_write = PushWrite::QemuFlushes;
    let mut d = Domain::new(lab1(), config, tree, None);
    let t = Timestamp::from_ms(0);
    let out = d.handle(t, Input::Reconnected);
    let Some(Output::Send(id, _)) = out.first() else {
        panic!("no negotiation")
    };
    let out = d.handle(
        t,
        Input::Reply(id.clone(), Ok(Value::Object(Default::default()))),
    );
    // Nor is the reconcile's node query: refused, it leaves the checkpoints as they are.
    let Some(Output::Send(id, _)) = out.first() else {
        panic!("no reconcile")
    };
    d.handle(
        t,
        Input::Reply(
            id.clone(),
            Err(vbackup_core::qmp::QmpError::generic("not recorded")),
        ),
    );
    assert!(d.view().connected);
    d
}

/// The answers a replay produced.
type Answers = Vec<(RequestId, Result<Reply, Error>)>;

/// Feeds `input`, carries out outputs against the replay, and delivers what the recording
/// sends until it has nothing more for us. Returns the answers.
fn drive(d: &mut Domain, link: &mut ReplayLink, input: Input) -> Answers {
    match try_drive(d, link, input) {
        Ok(answers) => answers,
        Err(e) => panic!("diverged from libvirt: {e}"),
    }
}

/// Like [`drive`], but returns the first divergence instead of failing.
fn try_drive(d: &mut Domain, link: &mut ReplayLink, input: Input) -> Result<Answers, LinkError> {
    let mut answers = Vec::new();
    let mut queue = vec![input];
    for _ in 0..10_000 {
        if queue.is_empty() {
            match link.recv(Some(link.now())).expect("replay") {
                Some(QmpIn::Reply {
                    id: Some(id),
                    result,
                }) => queue.push(Input::Reply(id, result)),
                Some(QmpIn::Event(e)) => queue.push(Input::Event(e)),
                Some(_) => {}
                None => break,
            }
            continue;
        }
        let input = queue.remove(0);
        for o in d.handle(link.now(), input) {
            match o {
                Output::Send(id, cmd) => link.send(id, &cmd)?,
                // The recordings hold no file operations (libvirt does them itself).
                Output::File(
                    id,
                    FileOp::CreateExclusive { .. } | FileOp::Remove { .. } | FileOp::Sync { .. },
                ) => queue.push(Input::FileDone(id, Ok(()))),
                Output::Respond(id, r) => answers.push((id, r)),
                Output::Persist(_) | Output::Emit(_) => {}
            }
        }
    }
    Ok(answers)
}

fn replay(text: &str, names: &NameMap) -> ReplayLink {
    let lines = vbackup_core::unstable::trace::parse(text).expect("trace parses");
    ReplayLink::new(lines, names, Timestamp::from_ms(1_000))
}

fn assert_ok(answers: &[(RequestId, Result<Reply, Error>)]) {
    for (_, a) in answers {
        assert!(a.is_ok(), "{a:?}");
    }
}

fn request(r: Request) -> Input {
    Input::Request(RequestId(1), r)
}

fn new_checkpoint(text: &str) -> Checkpoint {
    let mut def = CheckpointDef::parse(text, CheckpointMode::Create).unwrap();
    def.fill_create_defaults(1_763_000_000);
    Checkpoint::from_def(&align_checkpoint(&def, &lab1()).unwrap()).unwrap()
}

fn backup_spec(text: &str, suffix: &str) -> BackupSpec {
    let def = BackupDef::parse(text).unwrap();
    BackupSpec::from_def(&align_backup(&def, &lab1(), suffix).unwrap()).unwrap()
}

#[test]
fn checkpoint_create_matches_libvirt() {
    let mut d = connected(CheckpointTree::new(), DomainConfig::default());
    for (trace, name) in [
        (trace!("checkpoint-create-c1"), "c1"),
        (trace!("checkpoint-create-c2"), "c2"),
        (trace!("checkpoint-create-c3"), "c3"),
    ] {
        let mut link = replay(trace, &NameMap::new());
        let answers = drive(
            &mut d,
            &mut link,
            request(Request::CheckpointCreate {
                checkpoint: cp(name, None),
                quiesce: false,
            }),
        );
        assert_ok(&answers);
        assert!(
            link.is_finished(),
            "{name}: {:?}",
            link.remaining_commands()
        );
    }
    assert_eq!(d.view().checkpoints.current(), Some("c3"));
}

#[test]
fn checkpoint_delete_of_a_middle_checkpoint_matches_libvirt() {
    let config = DomainConfig {
        query_nodes_before_delete: true,
        ..DomainConfig::default()
    };
    let mut d = connected(tree(&["c1", "c2", "c3"]), config);
    let mut link = replay(trace!("checkpoint-delete-middle"), &NameMap::new());
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::CheckpointDelete {
            name: "c2".into(),
            scope: DeleteScope::Single,
            metadata_only: false,
        }),
    );
    assert_ok(&answers);
    assert!(link.is_finished());
    assert_eq!(
        d.view().checkpoints.get("c3").unwrap().parent.as_deref(),
        Some("c1")
    );
}

/// A recorded deletion of several checkpoints as vbackup sends it: libvirt queries the nodes
/// and sends one transaction per checkpoint; vbackup removes the same bitmaps after the first
/// query in one transaction (the later queries and transactions fold into it).
fn one_transaction(text: &str) -> String {
    let mut lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("trace line"))
        .collect();
    let is_transaction = |l: &Value| l["dir"] == "send" && l["msg"]["execute"] == "transaction";
    let first = lines
        .iter()
        .position(is_transaction)
        .expect("a transaction");
    let mut later = Vec::new();
    for l in &lines[first + 1..] {
        if is_transaction(l) {
            later.extend(
                l["msg"]["arguments"]["actions"]
                    .as_array()
                    .expect("actions")
                    .iter()
                    .cloned(),
            );
        }
    }
    lines[first]["msg"]["arguments"]["actions"]
        .as_array_mut()
        .expect("actions")
        .extend(later);
    lines.truncate(first + 2);
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn checkpoint_delete_with_children_removes_what_libvirt_removes_in_one_transaction() {
    let config = DomainConfig {
        query_nodes_before_delete: true,
        ..DomainConfig::default()
    };
    let mut d = connected(tree(&["c1", "c3", "c4", "c5"]), config);
    let mut link = replay(
        &one_transaction(trace!("checkpoint-delete-children")),
        &NameMap::new(),
    );
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::CheckpointDelete {
            name: "c4".into(),
            scope: DeleteScope::WithChildren,
            metadata_only: false,
        }),
    );
    assert_ok(&answers);
    assert!(link.is_finished());
    assert_eq!(d.view().checkpoints.current(), Some("c3"));
}

#[test]
fn checkpoint_size_matches_libvirt() {
    let mut d = connected(tree(&["c1", "c3"]), DomainConfig::default());
    let mut link = replay(trace!("checkpoint-dumpxml-size"), &NameMap::new());
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::CheckpointGetXml {
            name: "c1".into(),
            size: true,
        }),
    );
    assert!(link.is_finished(), "{:?}", link.remaining_commands());
    let Some((_, Ok(Reply::Checkpoint(c)))) = answers.first() else {
        panic!("{answers:?}")
    };
    assert!(c.disks.iter().all(|d| d.size_bytes.is_some()));
}

#[test]
fn redefine_validate_matches_libvirt() {
    let mut d = connected(tree(&["c1"]), DomainConfig::default());
    let mut link = replay(trace!("checkpoint-redefine-validate"), &NameMap::new());
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::CheckpointRedefine {
            checkpoint: cp("c3", Some("c1")),
            validate: true,
        }),
    );
    assert_ok(&answers);
    assert!(link.is_finished());
}

#[test]
fn push_incremental_with_atomic_checkpoint_matches_libvirt() {
    let mut d = connected(tree(&["c1", "c3"]), DomainConfig::default());
    let mut names = NameMap::new();
    for (rec, ours) in [("libvirt-7", "libvirt-3"), ("libvirt-8", "libvirt-4")] {
        names.insert(format!("{rec}-format"), format!("{ours}-format"));
        names.insert(format!("{rec}-storage"), format!("{ours}-storage"));
    }
    let mut link = replay(trace!("backup-push-incremental"), &names);
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::BackupBegin {
            spec: backup_spec(input!("input-backup-push-incremental.xml"), "c6"),
            checkpoint: Some(new_checkpoint(input!("input-checkpoint-c6.xml"))),
            reuse_external: false,
        }),
    );
    assert_ok(&answers);
    assert!(link.is_finished(), "{:?}", link.remaining_commands());
    let view = d.view();
    assert_eq!(view.checkpoints.current(), Some("c6"));
    assert!(view.backup.is_none());
    assert_eq!(view.completed.unwrap().success, Some(true));
}

#[test]
fn pull_incremental_begin_and_abort_match_libvirt() {
    let mut d = connected(tree(&["c1", "c3", "c6"]), DomainConfig::default());
    let mut names = NameMap::new();
    for (rec, ours) in [("libvirt-10", "libvirt-3"), ("libvirt-11", "libvirt-4")] {
        names.insert(format!("{rec}-format"), format!("{ours}-format"));
        names.insert(format!("{rec}-storage"), format!("{ours}-storage"));
    }
    let mut link = replay(trace!("backup-pull-incremental-begin"), &names);
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::BackupBegin {
            spec: backup_spec(input!("input-backup-pull-incremental.xml"), "c7"),
            checkpoint: Some(new_checkpoint(input!("input-checkpoint-c7.xml"))),
            reuse_external: false,
        }),
    );
    assert_ok(&answers);
    assert!(link.is_finished(), "{:?}", link.remaining_commands());

    let mut link = replay(trace!("backup-pull-domjobinfo"), &names);
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::JobStats {
            completed: false,
            keep_completed: false,
        }),
    );
    assert!(matches!(
        answers.first(),
        Some((_, Ok(Reply::Stats(Some(_)))))
    ));
    assert!(link.is_finished());

    let mut link = replay(trace!("backup-pull-domjobabort"), &names);
    let answers = drive(&mut d, &mut link, request(Request::AbortJob));
    assert_ok(&answers);
    assert!(link.is_finished(), "{:?}", link.remaining_commands());
    let stats = d.view().completed.cloned().unwrap();
    assert_eq!(stats.success, Some(true));
    assert_eq!(stats.errmsg.as_deref(), Some("Operation canceled"));
}

#[test]
fn push_full_matches_libvirt_up_to_the_order_of_cleanup() {
    // Both jobs concluded together; libvirt happened to clean up vdb first (its order follows
    // internal iteration, and the incremental trace shows vda first). We follow event order.
    let mut d = connected(tree(&["c1", "c2", "c3"]), DomainConfig::default());
    let mut link = replay(trace!("backup-push-full"), &NameMap::new());
    let err = try_drive(
        &mut d,
        &mut link,
        request(Request::BackupBegin {
            spec: backup_spec(input!("input-backup-push-full.xml"), "1763000000"),
            checkpoint: None,
            reuse_external: false,
        }),
    )
    .expect_err("the cleanup order differs");
    let LinkError::Diverged {
        line,
        expected: Some(expected),
        got,
    } = err
    else {
        panic!("{err}")
    };
    assert_eq!(line, 57);
    assert_eq!(expected.name(), "job-dismiss");
    assert_eq!(got.name(), "job-dismiss");
    assert_eq!(
        got.arguments().unwrap()["id"],
        "backup-vda-libvirt-2-format",
        "everything up to the first cleanup matched"
    );
}

#[test]
fn pull_full_begin_and_abort_match_libvirt() {
    let mut d = connected(tree(&["c1", "c3", "c6", "c7"]), DomainConfig::default());
    let mut names = NameMap::new();
    for (rec, ours) in [("libvirt-12", "libvirt-3"), ("libvirt-13", "libvirt-4")] {
        names.insert(format!("{rec}-format"), format!("{ours}-format"));
        names.insert(format!("{rec}-storage"), format!("{ours}-storage"));
    }
    let mut link = replay(trace!("backup-pull-full-begin"), &names);
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::BackupBegin {
            spec: backup_spec(input!("input-backup-pull-full.xml"), "1763000000"),
            checkpoint: None,
            reuse_external: false,
        }),
    );
    assert_ok(&answers);
    // The recording ends with `domjobinfo`.
    let answers = drive(
        &mut d,
        &mut link,
        request(Request::JobStats {
            completed: false,
            keep_completed: false,
        }),
    );
    assert!(matches!(
        answers.first(),
        Some((_, Ok(Reply::Stats(Some(_)))))
    ));
    assert!(link.is_finished(), "{:?}", link.remaining_commands());
    let mut link = replay(trace!("backup-pull-full-domjobabort"), &names);
    let answers = drive(&mut d, &mut link, request(Request::AbortJob));
    assert_ok(&answers);
    assert!(link.is_finished(), "{:?}", link.remaining_commands());
}
