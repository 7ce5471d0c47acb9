//! The trace format (reader and writer), and `ReplayLink`: playing a recording back by sending
//! its commands, divergence on the first changed command, held-back messages, renaming, and the
//! in-memory `Recorder`.

use serde_json::json;
use vbackup_core::link::{CommandId, Link, LinkError, NameMap, Recorder, ReplayLink, Timestamp};
use vbackup_core::qmp::{JobRef, QmpCommand, QmpEvent, QmpIn};
use vbackup_core::unstable::trace::{self, TraceEntry, TraceLine};

const PUSH_FULL: &str = include_str!("../../testdata/traces/libvirt-11.3/backup-push-full.jsonl");
const PULL_INCREMENTAL: &str =
    include_str!("../../testdata/traces/libvirt-11.3/backup-pull-incremental-begin.jsonl");
const PULL_ABORT: &str =
    include_str!("../../testdata/traces/libvirt-11.3/backup-pull-domjobabort.jsonl");
const CHECKPOINT_DELETE: &str =
    include_str!("../../testdata/traces/libvirt-11.3/checkpoint-delete-children.jsonl");
const DOMAIN_START: &str = include_str!("../../testdata/traces/libvirt-11.3/domain-start.jsonl");

/// Plays `lines` against `link` the way the recorded client did: each recorded command is sent
/// with a fresh numeric id, each recorded incoming message must come back (with the reply id
/// translated to ours). Returns the number of messages received.
fn play_back(link: &mut ReplayLink, lines: &[TraceLine]) -> usize {
    let mut next_id = 1000u64;
    let mut ours = std::collections::BTreeMap::new();
    let mut received = 0;
    for line in lines {
        match &line.entry {
            TraceEntry::Send { id, command } => {
                next_id += 1;
                if let Some(id) = id {
                    ours.insert(id.clone(), CommandId::Number(next_id));
                }
                link.send(CommandId::Number(next_id), command)
                    .unwrap_or_else(|err| panic!("line {}: {err}", line.line));
            }
            TraceEntry::Recv(expected) => {
                let deadline = Some(link.now().plus_ms(10_000));
                let got = link
                    .recv(deadline)
                    .unwrap_or_else(|err| panic!("line {}: {err}", line.line))
                    .unwrap_or_else(|| panic!("line {}: nothing arrived", line.line));
                let expected = match expected {
                    QmpIn::Reply {
                        id: Some(id),
                        result,
                    } => QmpIn::Reply {
                        id: Some(ours[id].clone()),
                        result: result.clone(),
                    },
                    other => other.clone(),
                };
                assert_eq!(got, expected, "line {}", line.line);
                received += 1;
            }
        }
    }
    received
}

#[test]
fn replaying_recordings_accepts_their_own_commands_and_translates_reply_ids() {
    for text in [
        PUSH_FULL,
        PULL_INCREMENTAL,
        PULL_ABORT,
        CHECKPOINT_DELETE,
        DOMAIN_START,
    ] {
        let lines = trace::parse(text).unwrap();
        let mut link = ReplayLink::new(lines.clone(), &NameMap::new(), Timestamp::ZERO);
        let received = play_back(&mut link, &lines);
        assert!(received > 0);
        assert!(link.is_finished());
        assert_eq!(link.now(), Timestamp::ZERO, "nothing timed out");
        assert_eq!(link.recv(None), Err(LinkError::Closed));
        assert_eq!(link.recv(Some(Timestamp::from_ms(5))), Ok(None));
        assert_eq!(link.now(), Timestamp::from_ms(5));
    }
}

#[test]
fn replay_diverges_on_the_first_changed_command_and_stays_put() {
    let lines = trace::parse(PUSH_FULL).unwrap();
    let mut link = ReplayLink::new(lines.clone(), &NameMap::new(), Timestamp::ZERO);
    let TraceEntry::Send { command: first, .. } = &lines[0].entry else {
        panic!()
    };
    // The first recorded command is query-named-block-nodes; send something else.
    let wrong = QmpCommand::JobDismiss(JobRef::new("nope"));
    match link.send(CommandId::Number(1), &wrong) {
        Err(LinkError::Diverged {
            line,
            expected,
            got,
        }) => {
            assert_eq!(line, 1);
            assert_eq!(expected.as_deref(), Some(first));
            assert_eq!(*got, wrong);
        }
        other => panic!("{other:?}"),
    }
    // Same command with a changed argument also diverges; the right one is then accepted.
    let QmpCommand::QueryNamedBlockNodes(mut args) = first.clone() else {
        panic!()
    };
    args.flat = Some(false);
    let err = link
        .send(
            CommandId::Number(1),
            &QmpCommand::QueryNamedBlockNodes(args),
        )
        .unwrap_err();
    assert!(err.to_string().contains("trace line 1"), "{err}");
    link.send(CommandId::Number(1), first).unwrap();
    assert!(matches!(
        link.recv(None),
        Ok(Some(QmpIn::Reply {
            id: Some(CommandId::Number(1)),
            ..
        }))
    ));
}

#[test]
fn replay_diverges_on_a_changed_command_in_the_middle_of_a_recording() {
    let lines = trace::parse(PULL_INCREMENTAL).unwrap();
    let changed_at = lines
        .iter()
        .position(|l| {
            matches!(
                &l.entry,
                TraceEntry::Send {
                    command: QmpCommand::Transaction(_),
                    ..
                }
            )
        })
        .unwrap();
    let mut altered = lines.clone();
    let TraceEntry::Send {
        command: QmpCommand::Transaction(tx),
        ..
    } = &mut altered[changed_at].entry
    else {
        panic!()
    };
    tx.actions.pop();
    let mut link = ReplayLink::new(lines.clone(), &NameMap::new(), Timestamp::ZERO);
    // Everything before the transaction is played as recorded...
    play_back(&mut link, &lines[..changed_at]);
    // ...then the altered transaction is refused with the recorded one's line.
    let TraceEntry::Send { command, .. } = &altered[changed_at].entry else {
        panic!()
    };
    match link.send(CommandId::Number(1), command) {
        Err(LinkError::Diverged {
            line,
            expected,
            got,
        }) => {
            assert_eq!(line, lines[changed_at].line);
            assert_eq!(got.as_ref(), command);
            let TraceEntry::Send {
                command: recorded, ..
            } = &lines[changed_at].entry
            else {
                panic!()
            };
            assert_eq!(expected.as_deref(), Some(recorded));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn replay_reports_commands_sent_after_the_recording_ended() {
    let lines = trace::parse(PULL_ABORT).unwrap();
    let mut link = ReplayLink::new(lines.clone(), &NameMap::new(), Timestamp::ZERO);
    play_back(&mut link, &lines);
    match link.send(CommandId::Number(1), &QmpCommand::QueryJobs) {
        Err(LinkError::Diverged {
            line,
            expected: None,
            ..
        }) => assert_eq!(line, lines.last().unwrap().line + 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn replay_holds_back_messages_that_follow_an_unsent_command() {
    let lines = trace::parse(PUSH_FULL).unwrap();
    let mut link = ReplayLink::new(lines.clone(), &NameMap::new(), Timestamp::from_ms(100));
    // Nothing arrives before the first command: a bounded wait times out and moves the clock.
    assert_eq!(link.recv(Some(Timestamp::from_ms(150))), Ok(None));
    assert_eq!(link.now(), Timestamp::from_ms(150));
    // An unbounded wait could never end.
    match link.recv(None) {
        Err(LinkError::Stalled { line, waiting_for }) => {
            assert_eq!(line, 1);
            assert_eq!(waiting_for.name(), "query-named-block-nodes");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        link.remaining_commands().len(),
        lines
            .iter()
            .filter(|l| matches!(l.entry, TraceEntry::Send { .. }))
            .count()
    );
}

#[test]
fn replay_waiting_forever_for_a_recording_that_only_sends_more_is_stalled() {
    // A recording that ends with a command nobody answered.
    let text = "{\"dir\":\"send\",\"msg\":{\"execute\":\"query-jobs\",\"id\":1}}\n";
    let mut link = ReplayLink::new(
        trace::parse(text).unwrap(),
        &NameMap::new(),
        Timestamp::ZERO,
    );
    assert!(matches!(
        link.recv(None),
        Err(LinkError::Stalled { line: 1, .. })
    ));
    link.send(CommandId::Number(7), &QmpCommand::QueryJobs)
        .unwrap();
    assert!(link.is_finished());
    assert_eq!(link.recv(None), Err(LinkError::Closed));
}

#[test]
fn replay_lets_a_client_send_before_draining_earlier_events() {
    // blockdev-create's reply is followed by job events before the next command; a client may
    // send query-jobs as soon as it sees `concluded`, or even earlier, without reading the rest.
    let lines = trace::parse(PULL_INCREMENTAL).unwrap();
    let mut link = ReplayLink::new(lines.clone(), &NameMap::new(), Timestamp::ZERO);
    let sends: Vec<&QmpCommand> = lines
        .iter()
        .filter_map(|l| match &l.entry {
            TraceEntry::Send { command, .. } => Some(command),
            TraceEntry::Recv(_) => None,
        })
        .collect();
    for (n, command) in sends.iter().take(4).enumerate() {
        link.send(CommandId::Number(n as u64), command).unwrap();
    }
    // Everything recorded before the fifth command is now deliverable, in order.
    let mut got = Vec::new();
    while let Some(message) = link.recv(Some(Timestamp::from_ms(1))).unwrap() {
        got.push(message);
    }
    let expected: Vec<&TraceLine> = lines
        .iter()
        .take_while(|l| !matches!(&l.entry, TraceEntry::Send { command, .. } if std::ptr::eq(command, sends[4])))
        .filter(|l| matches!(l.entry, TraceEntry::Recv(_)))
        .collect();
    assert_eq!(got.len(), expected.len());
    assert!(matches!(
        got.last(),
        Some(QmpIn::Reply {
            id: Some(CommandId::Number(3)),
            ..
        })
    ));
}

#[test]
fn replay_with_a_name_map_expects_the_clients_names_and_renames_what_it_delivers() {
    let lines = trace::parse(PULL_ABORT).unwrap();
    let mut names = NameMap::new();
    names.insert("libvirt-2-format", "vb-vda-top");
    names.insert("libvirt-10-format", "vb-vda-scratch");
    let mut link = ReplayLink::new(lines.clone(), &names, Timestamp::ZERO);
    // The client speaks its own names: play back the renamed recording.
    let renamed: Vec<TraceLine> = lines
        .iter()
        .map(|l| TraceLine {
            line: l.line,
            entry: names.apply_entry(&l.entry),
        })
        .collect();
    play_back(&mut link, &renamed);
    let cancel = renamed
        .iter()
        .find_map(|l| match &l.entry {
            TraceEntry::Send {
                command: QmpCommand::BlockJobCancel(cancel),
                ..
            } => Some(cancel.device.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(cancel, "backup-vda-vb-vda-top");
    let exported = renamed.iter().any(|l| {
        matches!(&l.entry, TraceEntry::Recv(QmpIn::Event(QmpEvent::BlockExportDeleted(d))) if d.id == "libvirt-nbd-vb-vda-scratch")
    });
    assert!(exported, "event data is renamed too");

    // The recorded names themselves are now a divergence.
    let mut link = ReplayLink::new(lines.clone(), &names, Timestamp::ZERO);
    let TraceEntry::Send { command, .. } = &lines[0].entry else {
        panic!()
    };
    assert!(matches!(
        link.send(CommandId::Number(1), command),
        Err(LinkError::Diverged { .. })
    ));
}

#[test]
fn name_map_renames_whole_tokens_only() {
    let mut names = NameMap::new();
    names.insert("libvirt-1-format", "A");
    names.insert("libvirt-1", "B");
    assert_eq!(names.apply_str("libvirt-1-format"), "A");
    assert_eq!(
        names.apply_str("backup-vdb-libvirt-1-format"),
        "backup-vdb-A"
    );
    assert_eq!(names.apply_str("libvirt-11-format"), "libvirt-11-format");
    assert_eq!(names.apply_str("libvirt-1-storage"), "B-storage");
    assert_eq!(names.apply_str("xlibvirt-1"), "xlibvirt-1");
    assert_eq!(names.apply_str("é libvirt-1 é"), "é B é");
    assert_eq!(
        names.apply(&json!({"libvirt-1": ["libvirt-1", 1, {"k": "libvirt-1-format"}]})),
        json!({"libvirt-1": ["B", 1, {"k": "A"}]})
    );
    // Command names and ids are never renamed.
    let mut names = NameMap::new();
    names.insert("query", "x");
    let entry = TraceEntry::Send {
        id: Some(CommandId::from("query")),
        command: QmpCommand::QueryJobs,
    };
    assert_eq!(names.apply_entry(&entry), entry);
}

#[test]
fn without_commands_drops_the_commands_and_their_replies() {
    let lines = trace::parse(DOMAIN_START).unwrap();
    let kept =
        trace::without_commands(lines.clone(), |cmd| matches!(cmd, QmpCommand::Other { .. }));
    assert!(kept.len() < lines.len());
    assert!(kept.iter().all(|l| !matches!(
        &l.entry,
        TraceEntry::Send {
            command: QmpCommand::Other { .. },
            ..
        }
    )));
    // What remains is still a consistent recording: it replays.
    let mut link = ReplayLink::new(kept.clone(), &NameMap::new(), Timestamp::ZERO);
    play_back(&mut link, &kept);
    assert!(link.is_finished());
}

#[test]
fn recorder_around_a_replay_writes_the_same_trace_with_the_clients_ids() {
    let lines = trace::parse(CHECKPOINT_DELETE).unwrap();
    let mut recorder = Recorder::new(ReplayLink::new(
        lines.clone(),
        &NameMap::new(),
        Timestamp::ZERO,
    ));
    let mut next = 0u64;
    for line in &lines {
        match &line.entry {
            TraceEntry::Send { command, .. } => {
                next += 1;
                recorder.send(CommandId::Number(next), command).unwrap();
            }
            TraceEntry::Recv(_) => {
                recorder.recv(None).unwrap().unwrap();
            }
        }
    }
    let text = trace::format(recorder.entries());
    let reread = trace::parse(&text).unwrap();
    assert_eq!(reread.len(), lines.len());
    let mut next = 0u64;
    for (ours, recorded) in reread.iter().zip(&lines) {
        match (&ours.entry, &recorded.entry) {
            (
                TraceEntry::Send { id, command },
                TraceEntry::Send {
                    command: recorded, ..
                },
            ) => {
                next += 1;
                assert_eq!(id, &Some(CommandId::Number(next)));
                assert_eq!(command, recorded);
            }
            (
                TraceEntry::Recv(QmpIn::Reply { result, .. }),
                TraceEntry::Recv(QmpIn::Reply {
                    result: recorded, ..
                }),
            ) => {
                assert_eq!(result, recorded)
            }
            (a, b) => assert_eq!(a, b),
        }
    }
    let (link, entries) = recorder.into_parts();
    assert!(link.is_finished());
    assert_eq!(entries.len(), lines.len());
}

#[test]
fn trace_lines_are_written_dir_first_and_read_back() {
    let entries = vec![
        TraceEntry::Send {
            id: Some(CommandId::Number(1)),
            command: QmpCommand::QueryJobs,
        },
        TraceEntry::Recv(QmpIn::Reply {
            id: Some(CommandId::Number(1)),
            result: Ok(json!([])),
        }),
        TraceEntry::Recv(QmpIn::Event(QmpEvent::Unknown {
            name: "X".into(),
            data: json!({"a": 1}),
        })),
    ];
    let text = trace::format(&entries);
    assert_eq!(
        text,
        "{\"dir\":\"send\",\"msg\":{\"execute\":\"query-jobs\",\"id\":1}}\n\
         {\"dir\":\"recv\",\"msg\":{\"return\":[],\"id\":1}}\n\
         {\"dir\":\"recv\",\"msg\":{\"event\":\"X\",\"data\":{\"a\":1}}}\n"
    );
    let back: Vec<TraceEntry> = trace::parse(&text)
        .unwrap()
        .into_iter()
        .map(|l| l.entry)
        .collect();
    assert_eq!(back, entries);
}

#[test]
fn trace_errors_name_the_line() {
    let err = trace::parse("\n{\"dir\":\"send\",\"msg\":{\"execute\":\"query-jobs\"}}\n{\"dir\":\"sideways\",\"msg\":{}}\n").unwrap_err();
    assert_eq!(err.line, 3);
    let err = trace::parse("{\"dir\":\"recv\",\"msg\":{\"nothing\":1}}").unwrap_err();
    assert_eq!(err.line, 1);
    let err = trace::parse("{\"dir\":\"recv\"}\n").unwrap_err();
    assert!(err.to_string().contains("missing 'msg'"), "{err}");
    assert!(trace::parse("not json").is_err());
    assert!(trace::parse("").unwrap().is_empty());
}
