//! Decoding what QEMU sends: events (known, unknown, malformed), replies and errors, the
//! greeting, query results (anonymous and inconsistent bitmaps), and hostile bytes.

use serde_json::json;
use vbackup_core::link::CommandId;
use vbackup_core::qmp::{
    self, BlockErrorAction, DecodeError, ErrorClass, FrameDecoder, ImageInfoSpecific, IoOperation,
    JobStatus, JobType, QmpCapability, QmpEvent, QmpIn, RunState, ShutdownCause,
};

fn event(text: &str) -> QmpEvent {
    match QmpIn::decode(text.as_bytes()) {
        Ok(QmpIn::Event(event)) => event,
        other => panic!("not an event: {other:?}"),
    }
}

#[test]
fn unknown_event_parses_with_its_data_kept_verbatim() {
    let ev = event(
        r#"{"event": "SOME_FUTURE_EVENT", "data": {"x": [1, 2], "y": null}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
    );
    assert_eq!(
        ev,
        QmpEvent::Unknown {
            name: "SOME_FUTURE_EVENT".into(),
            data: json!({"x": [1, 2], "y": null}),
        }
    );
    assert_eq!(ev.name(), "SOME_FUTURE_EVENT");
}

#[test]
fn unknown_event_without_data_reencodes_without_data() {
    let ev =
        QmpIn::decode(br#"{"event": "NEW_THING", "timestamp": {"seconds": 1, "microseconds": 0}}"#)
            .unwrap();
    assert_eq!(ev.to_value(), json!({"event": "NEW_THING"}));
}

#[test]
fn known_event_ignores_members_it_does_not_name_and_the_timestamp() {
    let ev = event(
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "bk", "future": 1}, "timestamp": {"seconds": 5, "microseconds": 6}}"#,
    );
    let QmpEvent::JobStatusChange(change) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(change.id, "bk");
    assert_eq!(change.status, JobStatus::Concluded);
    assert!(change.status.is_finished());
    assert_eq!(ev.job_id(), Some("bk"));
}

#[test]
fn job_status_this_version_does_not_know_is_kept_as_unknown() {
    let QmpEvent::JobStatusChange(change) = event(
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "some-new-status", "id": "j"}}"#,
    ) else {
        panic!()
    };
    assert_eq!(change.status, JobStatus::Unknown("some-new-status".into()));
    assert_eq!(change.status.as_str(), "some-new-status");
    assert!(!change.status.is_finished());
}

#[test]
fn every_job_status_spelling_round_trips() {
    for text in [
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
        "aborting",
        "concluded",
        "null",
    ] {
        let status = JobStatus::from_wire(text);
        assert!(!matches!(status, JobStatus::Unknown(_)), "{text}");
        assert_eq!(serde_json::to_value(&status).unwrap(), json!(text));
    }
}

#[test]
fn failed_job_completion_carries_the_error() {
    let QmpEvent::BlockJobCompleted(done) = event(
        r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "bk4", "len": 67108864, "offset": 0, "speed": 0, "type": "backup", "error": "Input/output error"}}"#,
    ) else {
        panic!()
    };
    assert_eq!(done.error.as_deref(), Some("Input/output error"));
    assert_eq!(done.job_type, JobType::Backup);
    assert_eq!((done.len, done.offset), (67108864, 0));
}

#[test]
fn successful_job_completion_has_no_error() {
    let QmpEvent::BlockJobCompleted(done) = event(
        r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "bk-full", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#,
    ) else {
        panic!()
    };
    assert_eq!(done.error, None);
}

#[test]
fn job_error_pending_export_deleted_and_shutdown_events_decode() {
    assert!(matches!(
        event(r#"{"event": "BLOCK_JOB_ERROR", "data": {"device": "bk4", "operation": "write", "action": "report"}}"#),
        QmpEvent::BlockJobError(e) if e.operation == IoOperation::Write && e.action == BlockErrorAction::Report
    ));
    assert!(matches!(
        event(r#"{"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "bk7"}}"#),
        QmpEvent::BlockJobPending(p) if p.id == "bk7"
    ));
    assert!(matches!(
        event(r#"{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "pull-a"}}"#),
        QmpEvent::BlockExportDeleted(d) if d.id == "pull-a"
    ));
    assert!(matches!(
        event(r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#),
        QmpEvent::Shutdown(s) if !s.guest && s.reason == ShutdownCause::HostQmpQuit
    ));
    assert!(matches!(
        event(r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "fleece", "len": 67108864, "offset": 3145728, "speed": 0, "type": "backup"}}"#),
        QmpEvent::BlockJobCancelled(c) if c.offset == 3145728
    ));
    assert!(matches!(
        event(r#"{"event": "BLOCK_JOB_READY", "data": {"device": "m", "len": 1, "offset": 1, "speed": 0, "type": "mirror"}}"#),
        QmpEvent::BlockJobReady(r) if r.job_type == JobType::Mirror
    ));
    assert_eq!(event(r#"{"event": "RESUME"}"#), QmpEvent::Resume);
    assert_eq!(event(r#"{"event": "STOP"}"#), QmpEvent::Stop);
}

#[test]
fn known_event_with_malformed_data_is_a_decode_error() {
    let err = QmpIn::decode(br#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running"}}"#)
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::Invalid { context, .. } if context == "JOB_STATUS_CHANGE data"),
        "{err}"
    );
}

#[test]
fn error_reply_decodes_class_and_description() {
    let reply = QmpIn::decode(
        br#"{"id": "libvirt-591", "error": {"class": "GenericError", "desc": "NBD server not running"}}"#,
    )
    .unwrap();
    let QmpIn::Reply {
        id,
        result: Err(error),
    } = reply
    else {
        panic!("{reply:?}")
    };
    assert_eq!(id, Some(CommandId::from("libvirt-591")));
    assert_eq!(error.class, ErrorClass::GenericError);
    assert_eq!(error.desc, "NBD server not running");
    assert_eq!(error.to_string(), "GenericError: NBD server not running");
}

#[test]
fn error_class_this_version_does_not_know_is_kept() {
    let reply = QmpIn::decode(
        br#"{"id": 3, "error": {"class": "BrandNewClass", "desc": "x", "extra": 1}}"#,
    )
    .unwrap();
    let QmpIn::Reply {
        id,
        result: Err(error),
    } = &reply
    else {
        panic!()
    };
    assert_eq!(id, &Some(CommandId::Number(3)));
    assert_eq!(error.class, ErrorClass::Unknown("BrandNewClass".into()));
    assert_eq!(
        reply.to_value(),
        json!({"id": 3, "error": {"class": "BrandNewClass", "desc": "x"}})
    );
}

#[test]
fn negotiation_errors_are_recognised() {
    let reply = QmpIn::decode(
        br#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
    )
    .unwrap();
    let QmpIn::Reply {
        id: None,
        result: Err(error),
    } = reply
    else {
        panic!()
    };
    assert!(error.is_negotiation_pending());
    assert!(
        !qmp::QmpError::generic("Capabilities negotiation is already complete, command ignored")
            .is_negotiation_pending()
    );
}

#[test]
fn greeting_decodes_version_and_capabilities() {
    let QmpIn::Greeting(greeting) = QmpIn::decode(
        br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob", "future-cap"]}}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(
        (
            greeting.version.qemu.major,
            greeting.version.qemu.minor,
            greeting.version.qemu.micro
        ),
        (10, 0, 2)
    );
    assert!(greeting.offers(&QmpCapability::Oob));
    assert_eq!(
        greeting.capabilities[1],
        QmpCapability::Unknown("future-cap".into())
    );
}

#[test]
fn messages_that_are_not_qmp_are_typed_errors() {
    assert!(matches!(
        QmpIn::decode(b"[1, 2]"),
        Err(DecodeError::NotAnObject)
    ));
    assert!(matches!(
        QmpIn::decode(b"{\"ret"),
        Err(DecodeError::Json { .. })
    ));
    assert_eq!(
        QmpIn::decode(br#"{"id": 1, "bogus": 2}"#),
        Err(DecodeError::Unrecognized {
            keys: vec!["bogus".into(), "id".into()]
        })
    );
    assert!(QmpIn::decode(br#"{"event": 5}"#).is_err());
    assert!(QmpIn::decode(br#"{"return": {}, "id": {"nested": true}}"#).is_err());
    assert!(QmpIn::decode(b"").is_err());
    assert!(QmpIn::decode(&[0xff, 0xfe, b'{']).is_err());
    // Deep nesting hits serde_json's recursion limit instead of the stack.
    let deep = "[".repeat(100_000);
    assert!(QmpIn::decode(deep.as_bytes()).is_err());
}

#[test]
fn anonymous_bitmaps_parse_and_named_lookup_skips_them() {
    let nodes = qmp::query_named_block_nodes(&json!([{
        "node-name": "#block123", "drv": "copy-before-write", "file": "", "ro": false,
        "image": {"filename": "json:{}", "format": "copy-before-write", "virtual-size": 67108864},
        "dirty-bitmaps": [
            {"recording": true, "persistent": false, "busy": true, "granularity": 65536, "count": 0},
            {"name": "chk", "recording": true, "persistent": true, "busy": true, "granularity": 65536, "count": 134217728}
        ]
    }]))
    .unwrap();
    let node = &nodes[0];
    assert_eq!(node.dirty_bitmaps.len(), 2);
    assert_eq!(node.dirty_bitmaps[0].name, None);
    assert!(node.dirty_bitmaps[0].busy);
    assert_eq!(node.bitmap("chk").map(|b| b.count), Some(134217728));
    assert!(node.bitmap("").is_none());
}

#[test]
fn inconsistent_bitmaps_are_flagged_and_the_flag_is_omitted_when_false() {
    let nodes = qmp::query_named_block_nodes(&json!([{
        "node-name": "disk", "drv": "qcow2", "file": "/x.qcow2", "ro": false,
        "image": {"filename": "/x.qcow2", "format": "qcow2", "virtual-size": 1048576},
        "dirty-bitmaps": [
            {"name": "chk-a", "recording": false, "persistent": true, "busy": false, "granularity": 65536, "count": 0, "inconsistent": true},
            {"name": "chk-b", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0}
        ]
    }]))
    .unwrap();
    assert!(nodes[0].dirty_bitmaps[0].inconsistent);
    assert!(!nodes[0].dirty_bitmaps[1].inconsistent);
    let encoded = serde_json::to_value(&nodes[0].dirty_bitmaps[1]).unwrap();
    assert_eq!(
        encoded,
        json!({"name": "chk-b", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0})
    );
}

#[test]
fn recorded_named_block_nodes_reply_decodes_image_details() {
    let text =
        include_str!("../../testdata/traces/libvirt-11.3/backup-pull-incremental-begin.jsonl");
    let first_reply: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        text.lines().nth(1).unwrap(),
    )
    .unwrap()["msg"]["return"]
        .clone();
    let nodes = qmp::query_named_block_nodes(&first_reply).unwrap();
    assert_eq!(nodes.len(), 4);
    let vda = nodes
        .iter()
        .find(|n| n.node_name.as_deref() == Some("libvirt-2-format"))
        .unwrap();
    assert_eq!(vda.drv, "qcow2");
    assert!(!vda.ro);
    assert_eq!(vda.image.virtual_size, 268435456);
    assert_eq!(vda.image.cluster_size, Some(65536));
    let qcow2 = vda.image.qcow2().unwrap();
    assert_eq!(qcow2.compat, "1.1");
    assert_eq!(qcow2.extended_l2, Some(false));
    let names: Vec<_> = vda
        .dirty_bitmaps
        .iter()
        .map(|b| b.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["c6", "c3", "c1"]);
    assert_eq!(vda.bitmap("c1").unwrap().count, 4194304);
    let storage = nodes
        .iter()
        .find(|n| n.node_name.as_deref() == Some("libvirt-2-storage"))
        .unwrap();
    assert!(storage.dirty_bitmaps.is_empty());
    assert!(
        matches!(&storage.image.format_specific, Some(ImageInfoSpecific::Other { format, .. }) if format == "file")
    );
}

#[test]
fn query_jobs_reply_decodes_progress_and_cancel_error() {
    let jobs = qmp::query_jobs(&json!([
        {"current-progress": 0, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "backup-vdb-libvirt-1-format", "error": "Operation canceled"},
        {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create", "id": "create-libvirt-10-format"}
    ]))
    .unwrap();
    assert_eq!(jobs[0].error.as_deref(), Some("Operation canceled"));
    assert_eq!(jobs[0].total_progress, 67108864);
    assert_eq!(jobs[1].job_type, JobType::Create);
    assert_eq!(jobs[1].error, None);
    assert!(qmp::query_jobs(&json!({"not": "a list"})).is_err());
}

#[test]
fn query_block_and_query_status_decode() {
    let devices = qmp::query_block(&json!([{"io-status": "ok", "device": "", "locked": false, "removable": false,
        "inserted": {"node-name": "libvirt-2-format", "drv": "qcow2", "file": "/a.qcow2", "ro": false,
                     "image": {"filename": "/a.qcow2", "format": "qcow2", "virtual-size": 1}},
        "qdev": "/machine/peripheral/virtio-disk0/virtio-backend", "type": "unknown"}]))
    .unwrap();
    assert_eq!(
        devices[0].inserted.as_ref().unwrap().node_name.as_deref(),
        Some("libvirt-2-format")
    );
    assert_eq!(
        devices[0].qdev.as_deref(),
        Some("/machine/peripheral/virtio-disk0/virtio-backend")
    );
    let status =
        qmp::query_status(&json!({"running": true, "status": "running", "singlestep": false}))
            .unwrap();
    assert!(status.running);
    assert_eq!(status.status, RunState::Running);
    assert!(qmp::empty_return("job-dismiss", &json!({})).is_ok());
    assert!(qmp::empty_return("job-dismiss", &json!([])).is_err());
}

#[test]
fn frame_decoder_splits_pipelined_partial_and_pretty_printed_messages() {
    let mut frames = FrameDecoder::default();
    frames.push(b"{\"return\": {}, \"id\": 1}\r\n{\"event\": \"STOP\"}");
    frames.push(b"\n{\"return\": {\"x\": \"a } \\\" {\"},\n  \"id\": 2");
    let first = frames.next_frame().unwrap().unwrap();
    assert!(matches!(QmpIn::decode(&first), Ok(QmpIn::Reply { .. })));
    let second = frames.next_frame().unwrap().unwrap();
    assert_eq!(QmpIn::decode(&second), Ok(QmpIn::Event(QmpEvent::Stop)));
    assert!(
        frames.next_frame().is_none(),
        "the third message is incomplete"
    );
    frames.push(b"}\n");
    let third = QmpIn::decode(&frames.next_frame().unwrap().unwrap()).unwrap();
    assert_eq!(
        third,
        QmpIn::Reply {
            id: Some(CommandId::Number(2)),
            result: Ok(json!({"x": "a } \" {"}))
        }
    );
    assert!(frames.next_frame().is_none());
    assert_eq!(frames.pending_bytes(), 0);
}

#[test]
fn frame_decoder_reports_junk_and_resynchronizes_on_the_next_line() {
    let mut frames = FrameDecoder::default();
    frames.push(b"garbage } here\n{\"event\": \"RESUME\"}\n");
    let junk = frames.next_frame().unwrap().unwrap();
    assert!(QmpIn::decode(&junk).is_err());
    let good = frames.next_frame().unwrap().unwrap();
    assert_eq!(QmpIn::decode(&good), Ok(QmpIn::Event(QmpEvent::Resume)));
}

#[test]
fn frame_decoder_bounds_message_size() {
    let mut frames = FrameDecoder::new(64);
    frames.push(
        format!(
            "{{\"return\": \"{}\"}}\n{{\"event\": \"STOP\"}}\n",
            "x".repeat(200)
        )
        .as_bytes(),
    );
    assert_eq!(
        frames.next_frame(),
        Some(Err(DecodeError::TooLong { limit_bytes: 64 }))
    );
    // The rest of the oversized message is dropped; the next line is back in step.
    let next = frames.next_frame().unwrap().unwrap();
    assert_eq!(QmpIn::decode(&next), Ok(QmpIn::Event(QmpEvent::Stop)));
}

mod fuzz_like {
    use proptest::prelude::*;
    use vbackup_core::qmp::{FrameDecoder, QmpCommand, QmpIn};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = QmpIn::decode(&bytes);
            let _ = QmpCommand::decode(&bytes);
            let mut frames = FrameDecoder::new(128);
            frames.push(&bytes);
            let mut count = 0;
            while let Some(frame) = frames.next_frame() {
                if let Ok(frame) = frame {
                    let _ = QmpIn::decode(&frame);
                }
                count += 1;
                prop_assert!(count <= bytes.len() + 1, "the decoder makes progress");
            }
        }

        #[test]
        fn decoding_json_shaped_text_never_panics(text in r#"\{("(event|return|error|id|QMP|data|class|desc|execute|arguments)": ?(\{\}|\[\]|"[a-zA-Z_-]{0,8}"|[0-9]{1,3}|null|true),? ?){0,4}\}"#) {
            let _ = QmpIn::decode(text.as_bytes());
            let _ = QmpCommand::decode(text.as_bytes());
        }
    }
}

#[test]
fn incoming_messages_and_events_serialize_as_their_wire_form() {
    let message = QmpIn::decode(br#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "j"}, "timestamp": {"seconds": 1, "microseconds": 1}}"#).unwrap();
    let value = serde_json::to_value(&message).unwrap();
    assert_eq!(
        value,
        json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "j"}})
    );
    assert_eq!(
        serde_json::from_value::<QmpIn>(value.clone()).unwrap(),
        message
    );
    let QmpIn::Event(event) = message else {
        panic!()
    };
    assert_eq!(serde_json::to_value(&event).unwrap(), value);
    assert_eq!(serde_json::from_value::<QmpEvent>(value).unwrap(), event);
    assert_eq!(
        serde_json::to_string(&QmpEvent::Resume).unwrap(),
        r#"{"event":"RESUME"}"#
    );
    assert!(serde_json::from_value::<QmpEvent>(json!({"data": {}})).is_err());
}
