//! Property tests of the whole state machine: arbitrary interleavings of requests, replies
//! (right, wrong and malformed), events, ticks and connection changes never make `handle`
//! panic, never leave a slot held once everything has been answered, and the same inputs
//! always give the same outputs.

use proptest::prelude::*;
use serde_json::{Value, json};
use vbackup_core::backup::{BackupDiskSpec, BackupMode, BackupSpec, NbdServer, NbdTransport};
use vbackup_core::checkpoint::{
    Checkpoint, CheckpointDisk, CheckpointTree, DeleteScope, ListFilter,
};
use vbackup_core::domain::{Domain, DomainConfig, FileOpId, Input, Output, Request, RequestId};
use vbackup_core::link::{CommandId, Timestamp};
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup_core::qmp::{QmpError, QmpEvent};

#[derive(Debug, Clone)]
enum Step {
    Create(u8),
    Delete(u8, u8),
    Size(u8),
    Push(Option<u8>, Option<u8>),
    Pull(Option<u8>),
    Abort,
    Stats,
    /// Answer the n-th outstanding command with the given kind of reply.
    Reply(u8, ReplyKind),
    /// A job event for one of the backup jobs.
    JobEvent(u8, u8),
    FileDone(bool),
    Tick,
    LinkDown,
    Reconnect,
}

#[derive(Debug, Clone)]
enum ReplyKind {
    /// What QEMU would answer to that command (jobs in the given state).
    Plausible(u8),
    Error,
    Garbage,
}

fn step() -> impl Strategy<Value = Step> {
    let small = 0u8..4;
    let reply_kind = prop_oneof![
        12 => (0u8..3).prop_map(ReplyKind::Plausible),
        1 => Just(ReplyKind::Error),
        1 => Just(ReplyKind::Garbage),
    ];
    prop_oneof![
        1 => small.clone().prop_map(Step::Create),
        1 => (small.clone(), 0u8..3).prop_map(|(a, b)| Step::Delete(a, b)),
        1 => small.clone().prop_map(Step::Size),
        1 => (proptest::option::of(small.clone()), proptest::option::of(small.clone()))
            .prop_map(|(a, b)| Step::Push(a, b)),
        1 => proptest::option::of(small.clone()).prop_map(Step::Pull),
        1 => Just(Step::Abort),
        1 => Just(Step::Stats),
        30 => (0u8..4, reply_kind).prop_map(|(n, k)| Step::Reply(n, k)),
        8 => (0u8..4, 0u8..4).prop_map(|(j, s)| Step::JobEvent(j, s)),
        8 => prop_oneof![9 => Just(true), 1 => Just(false)].prop_map(Step::FileDone),
        1 => Just(Step::Tick),
        1 => Just(Step::LinkDown),
        1 => Just(Step::Reconnect),
    ]
}

fn def() -> DomainDef {
    let disk = |t: &str, nodes: &[&str]| DiskDef {
        target: t.into(),
        device: DiskDevice::Disk,
        bus: None,
        readonly: false,
        transient: false,
        layers: nodes
            .iter()
            .map(|n| Layer {
                storage: StorageType::File,
                format: ImageFormat::Qcow2,
                path: Some(format!("/img/{n}")),
                index: None,
                node_name: Some((*n).into()),
            })
            .collect(),
    };
    DomainDef {
        name: "p".into(),
        uuid: None,
        disks: vec![
            disk("vda", &["libvirt-3-format", "libvirt-2-format"]),
            disk("vdb", &["libvirt-1-format"]),
        ],
    }
}

fn cp(i: u8) -> Checkpoint {
    let name = format!("c{i}");
    Checkpoint {
        name: name.clone(),
        description: None,
        parent: None,
        creation_time_s: 0,
        disks: ["vda", "vdb"]
            .iter()
            .map(|t| CheckpointDisk {
                target: (*t).into(),
                bitmap: Some(name.clone()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

fn nodes_reply() -> Value {
    let node = |n: &str, ro: bool| {
        json!({"node-name": n, "drv": "qcow2", "ro": ro, "file": format!("/img/{n}"),
               "image": {"filename": format!("/img/{n}"), "format": "qcow2", "virtual-size": 1048576, "cluster-size": 65536},
               "dirty-bitmaps": (0..4).map(|i| json!({"name": format!("c{i}"), "recording": true, "persistent": true,
                   "busy": false, "granularity": 65536, "count": 65536})).collect::<Vec<_>>()})
    };
    json!([
        node("libvirt-3-format", false),
        node("libvirt-2-format", true),
        node("libvirt-1-format", false)
    ])
}

const JOB_IDS: [&str; 4] = [
    "backup-vda-libvirt-3-format",
    "backup-vdb-libvirt-1-format",
    "create-libvirt-4-format",
    "create-libvirt-5-format",
];

fn spec(mode: BackupMode, inc: Option<u8>) -> BackupSpec {
    BackupSpec {
        mode,
        incremental: inc.map(|i| format!("c{i}")),
        server: (mode == BackupMode::Pull).then(|| NbdServer {
            transport: NbdTransport::Tcp {
                host: "::".into(),
                port: None,
            },
            tls: None,
        }),
        disks: ["vda", "vdb"]
            .iter()
            .map(|t| BackupDiskSpec {
                target: (*t).into(),
                backup: true,
                incremental: inc.map(|i| format!("c{i}")),
                store: None,
                export_name: None,
                export_bitmap: None,
            })
            .collect(),
    }
}

/// Runs the steps; returns every output, rendered, for the determinism check.
fn run(steps: &[Step]) -> Vec<String> {
    let mut tree = CheckpointTree::new();
    tree.insert_created(cp(0)).unwrap();
    let mut d = Domain::new(def(), DomainConfig::default(), tree, None);
    let mut now = 0u64;
    let mut outstanding: Vec<(CommandId, String)> = Vec::new();
    let mut files: Vec<FileOpId> = Vec::new();
    let mut log = Vec::new();
    let mut req = 0u64;
    let mut feed = |d: &mut Domain,
                    input: Input,
                    now: u64,
                    outstanding: &mut Vec<(CommandId, String)>,
                    files: &mut Vec<FileOpId>| {
        for o in d.handle(Timestamp::from_ms(now), input) {
            match &o {
                Output::Send(id, c) => outstanding.push((id.clone(), c.name().to_owned())),
                Output::File(id, _) => files.push(*id),
                _ => {}
            }
            log.push(format!("{o:?}"));
        }
    };
    feed(
        &mut d,
        Input::Reconnected,
        now,
        &mut outstanding,
        &mut files,
    );
    for s in steps {
        now += 10;
        req += 1;
        let r = RequestId(req);
        let input = match s {
            Step::Create(i) => Input::Request(
                r,
                Request::CheckpointCreate {
                    checkpoint: cp(*i),
                    quiesce: false,
                },
            ),
            Step::Delete(i, sc) => Input::Request(
                r,
                Request::CheckpointDelete {
                    name: format!("c{i}"),
                    scope: [
                        DeleteScope::Single,
                        DeleteScope::WithChildren,
                        DeleteScope::ChildrenOnly,
                    ][*sc as usize % 3],
                    metadata_only: false,
                },
            ),
            Step::Size(i) => Input::Request(
                r,
                Request::CheckpointGetXml {
                    name: format!("c{i}"),
                    size: true,
                },
            ),
            Step::Push(inc, c) => Input::Request(
                r,
                Request::BackupBegin {
                    spec: spec(BackupMode::Push, *inc),
                    checkpoint: c.map(cp),
                    reuse_external: false,
                },
            ),
            Step::Pull(inc) => Input::Request(
                r,
                Request::BackupBegin {
                    spec: spec(BackupMode::Pull, *inc),
                    checkpoint: None,
                    reuse_external: false,
                },
            ),
            Step::Abort => Input::Request(r, Request::AbortJob),
            Step::Stats => Input::Request(
                r,
                Request::JobStats {
                    completed: false,
                    keep_completed: false,
                },
            ),
            Step::Reply(n, kind) => {
                if outstanding.is_empty() {
                    continue;
                }
                // QEMU answers in order; a wrong or malformed answer may hit any command.
                let pick = match kind {
                    ReplyKind::Plausible(_) => 0,
                    _ => *n as usize % outstanding.len(),
                };
                let (id, name) = outstanding.remove(pick);
                let result = match kind {
                    ReplyKind::Error => Err(QmpError::generic("refused")),
                    ReplyKind::Garbage => Ok(json!([1, "x", {"node-name": 5}])),
                    ReplyKind::Plausible(k) => Ok(match name.as_str() {
                        "query-named-block-nodes" => nodes_reply(),
                        "query-jobs" => Value::Array(
                            JOB_IDS
                                .iter()
                                .map(|j| {
                                    let status =
                                        ["running", "concluded", "concluded"][*k as usize % 3];
                                    json!({"id": j, "type": "backup", "status": status,
                                           "current-progress": 1, "total-progress": 2})
                                })
                                .collect(),
                        ),
                        _ => json!({}),
                    }),
                };
                Input::Reply(id, result)
            }
            Step::JobEvent(j, st) => {
                let status = ["concluded", "concluded", "running", "paused"][*st as usize % 4];
                let e = QmpEvent::from_parts(
                    "JOB_STATUS_CHANGE",
                    json!({"id": JOB_IDS[*j as usize % 4], "status": status}),
                )
                .unwrap();
                Input::Event(e)
            }
            Step::FileDone(ok) => {
                if files.is_empty() {
                    continue;
                }
                let id = files.remove(0);
                Input::FileDone(
                    id,
                    if *ok {
                        Ok(())
                    } else {
                        Err(vbackup_core::domain::FileError::new(
                            vbackup_core::domain::FileErrorKind::AlreadyExists,
                            "",
                            "exists",
                        ))
                    },
                )
            }
            Step::Tick => {
                now += 120_000;
                Input::Tick
            }
            Step::LinkDown => {
                outstanding.clear();
                Input::LinkDown
            }
            Step::Reconnect => {
                outstanding.clear();
                Input::Reconnected
            }
        };
        feed(&mut d, input, now, &mut outstanding, &mut files);
        // Invariants after every step.
        let v = d.view();
        v.checkpoints.check_invariants().unwrap();
        if v.backup.is_none() {
            assert!(
                v.jobs.busy_disks().is_empty(),
                "disks busy without a backup"
            );
            assert!(
                v.jobs.long_job().is_none(),
                "long slot held without a backup"
            );
        }
    }
    let _ = d.view().checkpoints.list(ListFilter::default());
    log
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_input_sequences_never_panic_and_keep_invariants(steps in proptest::collection::vec(step(), 0..200)) {
        let first = run(&steps);
        let second = run(&steps);
        prop_assert_eq!(first, second, "same inputs, same outputs");
    }
}
