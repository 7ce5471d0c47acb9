//! The machine's decisions, against a scripted runtime.

use std::collections::BTreeMap;

use super::*;
use crate::backup::{BackupDiskSpec, BackupMode, BackupSpec, DomainJobStatus, JobStats};
use crate::catalogue::{BackupImage, BackupKind, Digest, DigestKind, ManagedBackup, StoredRecord};
use crate::checkpoint::{Checkpoint, CheckpointDisk};
use crate::link::Timestamp;
use crate::model::ImageFormat;
use crate::protocol::{Reply, Request};

const A: &str = "00000000-0000-4000-8000-00000000000a";
const B: &str = "00000000-0000-4000-8000-00000000000b";
const N: &str = "00000000-0000-4000-8000-00000000000e";

fn digest(n: u8) -> Digest {
    Digest::sha256(&[n; 32])
}

fn backup(uuid: &str, parent: Option<&str>, n: u8) -> ManagedBackup {
    ManagedBackup {
        uuid: uuid.into(),
        domain: "vm".into(),
        parent: parent.map(str::to_owned),
        checkpoint: Some(format!("c{n}")),
        creation_time: 1,
        sequence: Some(u64::from(n)),
        description: None,
        kind: if parent.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        disks: ["vda", "vdb"]
            .iter()
            .map(|d| BackupImage {
                disk: (*d).into(),
                path: format!("/t/{uuid}/{d}.qcow2"),
                format: ImageFormat::Qcow2,
                virtual_size_bytes: 1 << 20,
                allocated_size_bytes: 1,
                digest: digest(n),
            })
            .collect(),
    }
}

fn machine(extra: Vec<StoredRecord>) -> Managed {
    let mut records = vec![
        StoredRecord::new(format!("{A}.xml"), backup(A, None, 1).format()),
        StoredRecord::new(format!("{B}.xml"), backup(B, Some(A), 2).format()),
    ];
    records.extend(extra);
    Managed::new(
        "vm",
        StoredManaged {
            records,
            default_target: Some("/t".into()),
            journal: None,
        },
    )
}

/// Drives one request to its answer; `answer` plays the runtime. Returns the effects and the
/// answer.
fn run(
    m: &mut Managed,
    request: ManagedRequest,
    mut answer: impl FnMut(&Effect) -> Result<Outcome, EffectError>,
) -> (Vec<Effect>, Result<ManagedReply, ManagedError>) {
    let mut effects = Vec::new();
    let mut now = Timestamp::from_ms(1_000_000);
    let mut pending = m.handle(now, ManagedInput::Request(CallId(1), request));
    for _ in 0..10_000 {
        let mut next = Vec::new();
        for o in pending {
            match o {
                ManagedOutput::Respond(_, r) => return (effects, r),
                ManagedOutput::Effect(id, e) => {
                    let r = answer(&e);
                    effects.push(e);
                    next.extend(m.handle(now, ManagedInput::Done(id, r)));
                }
            }
        }
        if next.is_empty() {
            now = m.next_deadline().unwrap_or(now.plus_ms(1));
            next = m.handle(now, ManagedInput::Tick);
        }
        pending = next;
    }
    panic!("no answer");
}

fn writes(effects: &[Effect]) -> Vec<&Effect> {
    effects
        .iter()
        .filter(|e| {
            !matches!(
                e,
                Effect::Digest { .. } | Effect::Exists { .. } | Effect::DomainExists { .. }
            )
        })
        .collect()
}

#[test]
fn consolidate_over_a_corrupt_ancestor_writes_nothing() {
    let mut m = machine(Vec::new());
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Consolidate { uuid: B.into() },
        |e| match e {
            Effect::Digest { path, .. } if path.contains(A) => Ok(Outcome::Facts(ImageFacts {
                virtual_size_bytes: 1 << 20,
                allocated_size_bytes: 1,
                digest: digest(9),
                format: ImageFormat::Qcow2,
            })),
            Effect::Digest { .. } => Ok(Outcome::Facts(ImageFacts {
                virtual_size_bytes: 1 << 20,
                allocated_size_bytes: 1,
                digest: digest(2),
                format: ImageFormat::Qcow2,
            })),
            _ => Ok(Outcome::Done),
        },
    );
    assert!(
        matches!(r, Err(ManagedError::DigestMismatch { .. })),
        "{r:?}"
    );
    assert!(writes(&effects).is_empty(), "{effects:?}");
    assert_eq!(
        m.catalogue().get(B).and_then(|b| b.parent.clone()),
        Some(A.into())
    );
}

#[test]
fn consolidate_checks_the_copy_and_renames_it_into_place_before_the_record() {
    let mut m = machine(Vec::new());
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Consolidate { uuid: B.into() },
        |e| match e {
            Effect::Digest { path, .. } | Effect::DigestCopy { source: path, .. } => {
                Ok(Outcome::Facts(ImageFacts {
                    virtual_size_bytes: 1 << 20,
                    allocated_size_bytes: 7,
                    digest: digest(if path.contains(A) { 1 } else { 2 }),
                    format: ImageFormat::Qcow2,
                }))
            }
            _ => Ok(Outcome::Done),
        },
    );
    assert!(
        matches!(r, Ok(ManagedReply::Consolidated { changed: true, .. })),
        "{r:?}"
    );
    let first_rename = effects
        .iter()
        .position(|e| matches!(e, Effect::Rename { .. }));
    let record = effects
        .iter()
        .position(|e| matches!(e, Effect::PutRecord(_)));
    let copy = effects
        .iter()
        .position(|e| matches!(e, Effect::DigestCopy { .. }));
    assert!(copy < first_rename && first_rename < record, "{effects:?}");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Rebase { .. })));
    assert_eq!(m.catalogue().get(B).and_then(|b| b.parent.clone()), None);
    assert!(m.journal().is_none());
}

#[test]
fn restore_to_an_existing_domain_name_is_refused_before_anything_is_written() {
    let mut m = machine(Vec::new());
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Restore(Box::new(RestoreRequest {
            uuid: B.into(),
            until: None,
            disks: Vec::new(),
            target: RestoreTarget::NewImages {
                dir: "/r".into(),
                new_domain: Some("vm".into()),
            },
        })),
        |e| match e {
            Effect::DomainExists { .. } => Ok(Outcome::Exists(true)),
            _ => Ok(Outcome::Done),
        },
    );
    assert_eq!(r, Err(ManagedError::DomainExists("vm".into())));
    assert!(writes(&effects).is_empty(), "{effects:?}");
}

fn spec() -> BackupSpec {
    BackupSpec {
        mode: BackupMode::Push,
        incremental: None,
        server: None,
        disks: ["vda", "vdb"]
            .iter()
            .map(|d| BackupDiskSpec {
                target: (*d).into(),
                backup: true,
                incremental: None,
                store: None,
                export_name: None,
                export_bitmap: None,
            })
            .collect(),
    }
}

fn checkpoint(name: &str, disks: &[&str]) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        description: None,
        parent: None,
        creation_time_s: 1,
        disks: ["vda", "vdb"]
            .iter()
            .map(|d| CheckpointDisk {
                target: (*d).into(),
                bitmap: disks.contains(d).then(|| name.to_owned()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

fn create(parent: Option<&str>) -> ManagedRequest {
    ManagedRequest::Create(Box::new(CreateRequest {
        uuid: N.into(),
        checkpoint: checkpoint("cn", &["vda", "vdb"]),
        spec: spec(),
        parent: parent.map(str::to_owned),
        description: None,
        target: None,
        wait: true,
    }))
}

#[test]
fn a_vanished_target_directory_is_refused_and_nothing_is_begun() {
    let mut m = machine(Vec::new());
    let (effects, r) = run(&mut m, create(Some(B)), |e| match e {
        Effect::CreateDir { path, parents } => {
            assert!(!parents);
            assert_eq!(path, &format!("/t/{N}"));
            Err(EffectError::NotFound("/t".into()))
        }
        _ => Ok(Outcome::Done),
    });
    assert!(matches!(r, Err(ManagedError::Effect { .. })), "{r:?}");
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Domain(_))),
        "{effects:?}"
    );
    assert!(matches!(effects.last(), Some(Effect::ClearJournal)));
    assert!(m.journal().is_none());
}

fn stats(success: Option<bool>) -> Outcome {
    Outcome::Reply(Reply::Stats(Some(JobStats {
        operation: "backup",
        status: if success.is_some() {
            DomainJobStatus::Completed
        } else {
            DomainJobStatus::Running
        },
        time_elapsed_ms: 1,
        disk_total_bytes: None,
        disk_processed_bytes: None,
        disk_remaining_bytes: None,
        disk_temp_used_bytes: None,
        disk_temp_total_bytes: None,
        success,
        errmsg: None,
        waiting_for: None,
    })))
}

fn facts(n: u8) -> Outcome {
    Outcome::Facts(ImageFacts {
        virtual_size_bytes: 1 << 20,
        allocated_size_bytes: 1,
        digest: digest(n),
        format: ImageFormat::Qcow2,
    })
}

#[test]
fn a_push_incremental_is_journaled_before_it_begins_and_recorded_once_its_job_succeeded() {
    let mut m = machine(Vec::new());
    let mut polls = 0;
    let (effects, r) = run(&mut m, create(Some(B)), |e| match e {
        Effect::Domain(Request::JobStats {
            completed: false, ..
        }) => {
            polls += 1;
            Ok(if polls < 3 {
                stats(None)
            } else {
                Outcome::Reply(Reply::Stats(None))
            })
        }
        Effect::Domain(Request::JobStats {
            completed: true, ..
        }) => Ok(stats(Some(true))),
        Effect::Digest { .. } => Ok(facts(3)),
        _ => Ok(Outcome::Done),
    });
    let Ok(ManagedReply::Created(b)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(b.parent.as_deref(), Some(B));
    let begin = effects
        .iter()
        .position(|e| matches!(e, Effect::Domain(Request::BackupBegin { .. })))
        .unwrap_or(0);
    assert!(
        matches!(&effects[begin - 1], Effect::PutJournal(j) if matches!(&**j, Journal::Create(p) if p.begun))
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Rebase {
            unsafe_rebase: true,
            ..
        }
    )));
    assert!(m.catalogue().get(N).is_some());
    assert!(m.journal().is_none());
    // The new images are digested block by block, on the parent's images of their disks.
    let parent = machine(Vec::new())
        .catalogue()
        .get(B)
        .cloned()
        .expect("the parent");
    let described: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Digest { kind, base, .. } => Some((*kind, base.clone())),
            _ => None,
        })
        .collect();
    assert!(!described.is_empty());
    for (kind, base) in described {
        assert_eq!(kind, DigestKind::NEW_IMAGES);
        let base = base.expect("a parent image");
        assert!(
            parent
                .disks
                .iter()
                .any(|d| d.path == base.path && d.digest == base.digest),
            "{base:?}"
        );
    }
}

#[test]
fn a_restarted_machine_discards_a_failed_pending_backup_with_its_checkpoint_and_directory() {
    let pending = PendingBackup {
        uuid: N.into(),
        parent: Some(B.into()),
        checkpoint: "cn".into(),
        description: None,
        creation_time: 5,
        pull: false,
        images: vec![("vda".into(), format!("/t/{N}/vda.qcow2"))],
        dir: Some(format!("/t/{N}")),
        begun: true,
    };
    let mut m = Managed::new(
        "vm",
        StoredManaged {
            records: vec![StoredRecord::new(
                format!("{A}.xml"),
                backup(A, None, 1).format(),
            )],
            default_target: None,
            journal: Some(("j".into(), Journal::Create(pending).format())),
        },
    );
    assert!(m.pending().is_some());
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Finish {
            cancel: false,
            check: false,
        },
        |e| match e {
            Effect::Domain(Request::JobStats {
                completed: false, ..
            }) => Ok(Outcome::Reply(Reply::Stats(None))),
            Effect::Domain(Request::JobStats {
                completed: true, ..
            }) => Ok(stats(Some(false))),
            Effect::Domain(Request::CheckpointList { .. }) => {
                Ok(Outcome::Reply(Reply::CheckpointNames(vec![
                    "c1".into(),
                    "cn".into(),
                ])))
            }
            _ => Ok(Outcome::Done),
        },
    );
    assert!(matches!(r, Err(ManagedError::JobFailed { .. })), "{r:?}");
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::RemoveDir { path } if path.ends_with(N)))
    );
    assert!(effects.iter().any(|e| matches!(e, Effect::Domain(Request::CheckpointDeleteEach { names }) if names == &vec!["cn".to_owned()])));
    assert!(m.pending().is_none());
}

#[test]
fn a_damaged_record_is_listed_by_file_and_only_it_is_deleted() {
    let text = backup(N, None, 5).format();
    let mut m = machine(vec![StoredRecord::new(
        format!("backups/{N}.xml"),
        &text[..text.len() / 3],
    )]);
    assert_eq!(m.catalogue().len(), 2);
    assert_eq!(m.damaged().len(), 1);
    assert_eq!(m.damaged()[0].file, format!("backups/{N}.xml"));
    let (_, r) = run(&mut m, ManagedRequest::Verify { uuid: N.into() }, |_| {
        Ok(Outcome::Done)
    });
    assert!(matches!(r, Err(ManagedError::Damaged { .. })), "{r:?}");
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Delete {
            target: Some(N.into()),
            with_children: false,
            keep_checkpoints: false,
        },
        |_| Ok(Outcome::Done),
    );
    assert!(matches!(r, Ok(ManagedReply::Deleted { .. })), "{r:?}");
    assert!(matches!(effects.as_slice(), [Effect::DeleteRecord { uuid }] if uuid == N));
    assert!(m.damaged().is_empty());
    assert_eq!(m.catalogue().len(), 2);
}

#[test]
fn overwriting_one_disk_forgets_only_that_disk_in_the_checkpoints() {
    let mut m = machine(Vec::new());
    let both = checkpoint("c1", &["vda", "vdb"]);
    let only_vda = checkpoint("c2", &["vda"]);
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Restore(Box::new(RestoreRequest {
            uuid: A.into(),
            until: None,
            disks: vec!["vda".into()],
            target: RestoreTarget::Overwrite {
                disks: BTreeMap::from([("vda".into(), "/vm/vda.qcow2".into())]),
            },
        })),
        |e| match e {
            Effect::DigestCopy { .. } => Ok(facts(1)),
            Effect::Domain(Request::CheckpointList { .. }) => {
                Ok(Outcome::Reply(Reply::CheckpointNames(vec![
                    "c1".into(),
                    "c2".into(),
                ])))
            }
            Effect::Domain(Request::CheckpointGetXml { name, .. }) => Ok(Outcome::Reply(
                Reply::Checkpoint(Box::new(if name == "c1" {
                    both.clone()
                } else {
                    only_vda.clone()
                })),
            )),
            _ => Ok(Outcome::Done),
        },
    );
    assert!(matches!(r, Ok(ManagedReply::Restored { .. })), "{r:?}");
    assert!(
        effects.iter().any(
            |e| matches!(e, Effect::CreateImage { like: Some(l), .. } if l == "/vm/vda.qcow2")
        )
    );
    let redefined: Vec<&Checkpoint> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Domain(Request::CheckpointRedefine { checkpoint, .. }) => Some(checkpoint),
            _ => None,
        })
        .collect();
    assert_eq!(redefined.len(), 1);
    assert_eq!(
        redefined[0]
            .bitmap_disks()
            .map(|(d, _)| d)
            .collect::<Vec<_>>(),
        vec!["vdb"]
    );
    assert!(effects.iter().any(|e| matches!(e, Effect::Domain(Request::CheckpointDelete { name, metadata_only: true, .. }) if name == "c2")));
}

#[test]
fn a_damaged_journal_blocks_changes_but_a_cancel_ends_the_job_and_clears_it() {
    let mut m = Managed::new(
        "vm",
        StoredManaged {
            records: Vec::new(),
            default_target: None,
            journal: Some(("journal.json".into(), "{\"op\":".into())),
        },
    );
    let (_, r) = run(&mut m, create(None), |_| Ok(Outcome::Done));
    assert!(
        matches!(r, Err(ManagedError::DamagedJournal { .. })),
        "{r:?}"
    );
    let mut running = true;
    let (effects, r) = run(
        &mut m,
        ManagedRequest::Finish {
            cancel: true,
            check: false,
        },
        |e| match e {
            Effect::Domain(Request::JobStats { .. }) => Ok(if std::mem::take(&mut running) {
                stats(None)
            } else {
                Outcome::Reply(Reply::Stats(None))
            }),
            _ => Ok(Outcome::Done),
        },
    );
    assert!(matches!(r, Ok(ManagedReply::Cancelled { .. })), "{r:?}");
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Domain(Request::AbortJob)))
    );
    assert!(matches!(effects.last(), Some(Effect::ClearJournal)));
}

#[test]
fn a_job_seen_ending_is_asked_about_at_once_not_at_the_next_poll() {
    let mut m = machine(Vec::new());
    let now = Timestamp::from_ms(1_000_000);
    let mut pending = m.handle(now, ManagedInput::Request(CallId(1), create(Some(B))));
    let mut polls = 0;
    // Play the runtime until the machine waits for the running job.
    loop {
        let mut next = Vec::new();
        for o in pending {
            match o {
                ManagedOutput::Respond(_, r) => panic!("answered while the job runs: {r:?}"),
                ManagedOutput::Effect(id, e) => {
                    let r = match &e {
                        Effect::Domain(Request::JobStats {
                            completed: false, ..
                        }) => {
                            polls += 1;
                            if polls > 1 {
                                Ok(Outcome::Reply(Reply::Stats(None)))
                            } else {
                                Ok(stats(None))
                            }
                        }
                        _ => Ok(Outcome::Done),
                    };
                    next.extend(m.handle(now, ManagedInput::Done(id, r)));
                }
            }
        }
        if next.is_empty() {
            break;
        }
        pending = next;
    }
    assert_eq!(polls, 1);
    let poll_at = m
        .next_deadline()
        .expect("the machine polls the running job");
    assert!(poll_at > now);
    // A tick before the poll is due asks nothing; the job seen ending asks at once.
    assert!(m.handle(now, ManagedInput::Tick).is_empty());
    let outputs = m.handle(now, ManagedInput::JobEnded);
    assert!(
        matches!(
            outputs.as_slice(),
            [ManagedOutput::Effect(
                _,
                Effect::Domain(Request::JobStats {
                    completed: false,
                    ..
                })
            )]
        ),
        "{outputs:?}"
    );
    assert!(m.next_deadline().is_none_or(|t| t != poll_at));
}
