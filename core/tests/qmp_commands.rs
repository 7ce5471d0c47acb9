//! The exact wire form of the commands the core sends, and strict decoding of commands.

use serde_json::{Value, json};
use vbackup_core::link::CommandId;
use vbackup_core::qmp::*;

fn wire(cmd: &QmpCommand) -> Value {
    cmd.to_wire(None)
}

/// Decodes `value` as a command and checks it encodes back to the same JSON.
fn round_trip(value: Value) -> QmpCommand {
    let (id, cmd) = QmpCommand::from_wire(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"));
    assert_eq!(cmd.to_wire(id.as_ref()), value);
    cmd
}

#[test]
fn encode_writes_execute_arguments_and_id_in_order() {
    let cmd = QmpCommand::QueryNamedBlockNodes(QueryNamedBlockNodes { flat: Some(true) });
    assert_eq!(
        cmd.encode(Some(&CommandId::from("libvirt-559"))),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true},"id":"libvirt-559"}"#
    );
    assert_eq!(
        QmpCommand::QueryJobs.encode(Some(&CommandId::Number(4))),
        r#"{"execute":"query-jobs","id":4}"#
    );
    assert_eq!(
        QmpCommand::NbdServerStop.encode(None),
        r#"{"execute":"nbd-server-stop"}"#
    );
}

#[test]
fn empty_arguments_are_left_out() {
    let caps = QmpCommand::QmpCapabilities(QmpCapabilities::default());
    assert_eq!(wire(&caps), json!({"execute": "qmp_capabilities"}));
    let caps = QmpCommand::QmpCapabilities(QmpCapabilities {
        enable: Some(vec![QmpCapability::Oob]),
    });
    assert_eq!(
        wire(&caps),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    );
}

#[test]
fn checkpoint_transaction_encodes_like_libvirt() {
    let tx: QmpCommand = QmpCommand::Transaction(Transaction::new(vec![
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            persistent: Some(true),
            disabled: Some(false),
            ..BlockDirtyBitmapAdd::new("libvirt-2-format", "c7")
        }),
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            persistent: Some(false),
            disabled: Some(true),
            granularity: Some(65536),
            ..BlockDirtyBitmapAdd::new("libvirt-10-format", "backup-vda")
        }),
        TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
            node: "libvirt-10-format".into(),
            target: "backup-vda".into(),
            bitmaps: vec![BlockDirtyBitmap::new("libvirt-2-format", "c6").into()],
        }),
        TransactionAction::BlockdevBackup(BlockdevBackup {
            auto_finalize: Some(true),
            auto_dismiss: Some(false),
            ..BlockdevBackup::new(
                "backup-vda-libvirt-2-format",
                "libvirt-2-format",
                "libvirt-10-format",
                SyncMode::None,
            )
        }),
    ]));
    assert_eq!(
        wire(&tx),
        json!({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "libvirt-2-format", "name": "c7", "persistent": true, "disabled": false}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "libvirt-10-format", "name": "backup-vda", "persistent": false, "disabled": true, "granularity": 65536}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "libvirt-10-format", "target": "backup-vda", "bitmaps": [{"node": "libvirt-2-format", "name": "c6"}]}},
            {"type": "blockdev-backup", "data": {"device": "libvirt-2-format", "job-id": "backup-vda-libvirt-2-format", "target": "libvirt-10-format", "sync": "none", "auto-finalize": true, "auto-dismiss": false}}
        ]}})
    );
    // The text form keeps struct order inside actions, whatever serde_json's map order.
    let text = tx.encode(Some(&CommandId::Number(1)));
    assert!(text.starts_with(
        r#"{"execute":"transaction","arguments":{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"libvirt-2-format","name":"c7","persistent":true,"disabled":false}}"#
    ), "{text}");
    assert!(
        text.ends_with(r#""sync":"none","auto-finalize":true,"auto-dismiss":false}}]},"id":1}"#),
        "{text}"
    );
}

#[test]
fn merge_sources_may_mix_plain_names_and_located_bitmaps() {
    let cmd = round_trip(json!({"execute": "block-dirty-bitmap-merge", "arguments": {
        "node": "disk", "target": "tmp", "bitmaps": ["chk-b", {"node": "disk", "name": "chk-c"}]}}));
    let QmpCommand::BlockDirtyBitmapMerge(merge) = cmd else {
        panic!()
    };
    assert_eq!(merge.bitmaps[0], BitmapRef::Name("chk-b".into()));
    assert_eq!(merge.bitmaps[1].node(), Some("disk"));
    assert_eq!(merge.bitmaps[1].name(), "chk-c");
}

#[test]
fn every_bitmap_command_and_action_round_trips() {
    for name in ["remove", "clear", "enable", "disable"] {
        let cmd = round_trip(
            json!({"execute": format!("block-dirty-bitmap-{name}"), "arguments": {"node": "n", "name": "b"}}),
        );
        assert_eq!(cmd.name(), format!("block-dirty-bitmap-{name}"));
        let tx = round_trip(json!({"execute": "transaction", "arguments": {"actions": [
            {"type": format!("block-dirty-bitmap-{name}"), "data": {"node": "n", "name": "b"}}]}}));
        let QmpCommand::Transaction(tx) = tx else {
            panic!()
        };
        assert!(!matches!(tx.actions[0], TransactionAction::Other { .. }));
    }
    round_trip(
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "src", "name": "chk0", "persistent": true, "granularity": 65536}}),
    );
}

#[test]
fn transaction_keeps_unknown_actions_and_properties() {
    let cmd = round_trip(json!({"execute": "transaction", "arguments": {
        "actions": [{"type": "blockdev-snapshot", "data": {"node": "a", "overlay": "b"}}, {"type": "abort"}],
        "properties": {"completion-mode": "grouped"}}}));
    let QmpCommand::Transaction(tx) = cmd else {
        panic!()
    };
    assert_eq!(tx.actions[0].action_type(), "blockdev-snapshot");
    assert_eq!(
        tx.actions[1],
        TransactionAction::Other {
            action_type: "abort".into(),
            data: Value::Null
        }
    );
    assert_eq!(
        tx.properties.unwrap().completion_mode,
        Some(CompletionMode::Grouped)
    );
}

#[test]
fn blockdev_backup_encodes_every_option() {
    let backup = BlockdevBackup {
        bitmap: Some("chk2".into()),
        bitmap_mode: Some(BitmapSyncMode::Never),
        speed: Some(67108864),
        on_source_error: Some(BlockdevOnError::Report),
        on_target_error: Some(BlockdevOnError::Stop),
        auto_finalize: Some(false),
        auto_dismiss: Some(false),
        filter_node_name: Some("cbw".into()),
        compress: Some(false),
        x_perf: Some(BackupPerf {
            max_chunk: Some(65536),
            max_workers: Some(1),
            use_copy_range: Some(false),
        }),
        ..BlockdevBackup::new("bk-inc2", "src", "inc2", SyncMode::Bitmap)
    };
    let value = wire(&QmpCommand::BlockdevBackup(Box::new(backup)));
    assert_eq!(
        value,
        json!({"execute": "blockdev-backup", "arguments": {
        "job-id": "bk-inc2", "device": "src", "target": "inc2", "sync": "bitmap", "bitmap": "chk2",
        "bitmap-mode": "never", "compress": false, "speed": 67108864, "on-source-error": "report",
        "on-target-error": "stop", "auto-finalize": false, "auto-dismiss": false, "filter-node-name": "cbw",
        "x-perf": {"use-copy-range": false, "max-workers": 1, "max-chunk": 65536}}})
    );
    round_trip(value);
    for (sync, text) in [
        (SyncMode::Full, "full"),
        (SyncMode::Incremental, "incremental"),
        (SyncMode::Top, "top"),
    ] {
        assert_eq!(serde_json::to_value(sync).unwrap(), json!(text));
    }
    assert_eq!(
        serde_json::to_value(BitmapSyncMode::OnSuccess).unwrap(),
        json!("on-success")
    );
    assert_eq!(
        serde_json::to_value(BitmapSyncMode::Always).unwrap(),
        json!("always")
    );
}

#[test]
fn blockdev_add_distinguishes_absent_null_and_named_backing() {
    let cases = [
        (
            json!({"driver": "qcow2", "node-name": "full", "file": "full-file"}),
            None,
        ),
        (
            json!({"driver": "qcow2", "node-name": "inc1", "file": "inc1-file", "backing": null}),
            Some(BlockdevRefOrNull::Null),
        ),
        (
            json!({"driver": "qcow2", "node-name": "scratch", "file": "s-file", "backing": "libvirt-2-format"}),
            Some(BlockdevRefOrNull::Ref(BlockdevRef::Node(
                "libvirt-2-format".into(),
            ))),
        ),
    ];
    for (args, backing) in cases {
        let cmd = round_trip(json!({"execute": "blockdev-add", "arguments": args}));
        let QmpCommand::BlockdevAdd(options) = cmd else {
            panic!()
        };
        assert_eq!(
            options.driver,
            BlockdevDriver::Qcow2 {
                file: BlockdevRef::Node(args["file"].as_str().unwrap().into()),
                backing
            }
        );
    }
}

#[test]
fn blockdev_add_builders_give_libvirts_target_nodes() {
    let storage = BlockdevOptions {
        auto_read_only: Some(true),
        discard: Some(BlockdevDiscard::Unmap),
        ..BlockdevOptions::file("libvirt-3-storage", "/srv/lab/backups/full-vda.qcow2")
    };
    assert_eq!(
        wire(&QmpCommand::BlockdevAdd(Box::new(storage))),
        json!({"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "/srv/lab/backups/full-vda.qcow2",
            "node-name": "libvirt-3-storage", "auto-read-only": true, "discard": "unmap"}})
    );
    let format = BlockdevOptions {
        read_only: Some(false),
        ..BlockdevOptions::qcow2(
            "libvirt-3-format",
            "libvirt-3-storage",
            Some(BlockdevRefOrNull::Null),
        )
    };
    assert_eq!(
        wire(&QmpCommand::BlockdevAdd(Box::new(format))),
        json!({"execute": "blockdev-add", "arguments": {"node-name": "libvirt-3-format", "read-only": false,
            "driver": "qcow2", "file": "libvirt-3-storage", "backing": null}})
    );
}

#[test]
fn blockdev_add_accepts_inline_children_and_keeps_other_options() {
    let cmd = round_trip(json!({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "scratch-a", "discard": "unmap", "cache": {"direct": true},
        "file": {"driver": "file", "node-name": "scratch-a-file", "filename": "/tmp/lab/pull/scratch-a.qcow2", "discard": "unmap", "aio": "threads"}}}));
    let QmpCommand::BlockdevAdd(options) = cmd else {
        panic!()
    };
    assert_eq!(options.extra.get("cache"), Some(&json!({"direct": true})));
    let BlockdevDriver::Qcow2 {
        file: BlockdevRef::Inline(file),
        backing: None,
    } = &options.driver
    else {
        panic!()
    };
    assert_eq!(file.node_name.as_deref(), Some("scratch-a-file"));
    assert_eq!(file.extra.get("aio"), Some(&json!("threads")));

    let cmd = round_trip(json!({"execute": "blockdev-add", "arguments": {
        "driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "scratch-a",
        "on-cbw-error": "break-snapshot", "cbw-timeout": 60}}));
    let QmpCommand::BlockdevAdd(options) = cmd else {
        panic!()
    };
    assert_eq!(options.driver.name(), "copy-before-write");
    assert_eq!(options.extra.len(), 4);

    round_trip(
        json!({"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "guest-top", "file": "src"}}),
    );
    round_trip(
        json!({"execute": "blockdev-add", "arguments": {"driver": "host_device", "node-name": "d", "filename": "/dev/sdb"}}),
    );
}

#[test]
fn blockdev_add_without_a_required_option_is_rejected() {
    let err = QmpCommand::from_wire(
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x"}}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing 'file'"), "{err}");
    assert!(
        QmpCommand::from_wire(json!({"execute": "blockdev-add", "arguments": {"node-name": "x"}}))
            .is_err()
    );
}

#[test]
fn blockdev_create_reopen_and_del_round_trip() {
    let create = BlockdevCreate {
        job_id: "create-libvirt-7-format".into(),
        options: BlockdevCreateOptions::Qcow2(CreateQcow2Options {
            cluster_size: Some(65536),
            backing_file: Some("/srv/lab/images/lab1-vda.qcow2".into()),
            backing_fmt: Some("qcow2".into()),
            extended_l2: Some(false),
            version: Some(Qcow2Version::V3),
            ..CreateQcow2Options::new("libvirt-7-storage", 268435456)
        }),
    };
    assert_eq!(
        wire(&QmpCommand::BlockdevCreate(Box::new(create))),
        json!({"execute": "blockdev-create", "arguments": {"job-id": "create-libvirt-7-format", "options": {
            "driver": "qcow2", "file": "libvirt-7-storage", "size": 268435456, "version": "v3",
            "backing-file": "/srv/lab/images/lab1-vda.qcow2", "backing-fmt": "qcow2", "cluster-size": 65536, "extended-l2": false}}})
    );
    round_trip(
        json!({"execute": "blockdev-create", "arguments": {"job-id": "create-libvirt-5-storage",
        "options": {"driver": "file", "filename": "/b/vda.raw", "size": 1048576}}}),
    );
    let other = round_trip(
        json!({"execute": "blockdev-create", "arguments": {"job-id": "c",
        "options": {"driver": "luks", "file": "f", "size": 1, "key-secret": "s"}}}),
    );
    let QmpCommand::BlockdevCreate(create) = other else {
        panic!()
    };
    assert_eq!(create.options.driver(), "luks");
    assert!(
        QmpCommand::from_wire(
            json!({"execute": "blockdev-create", "arguments": {"job-id": "c",
        "options": {"driver": "qcow2", "file": "f", "size": 1, "bogus": 1}}})
        )
        .is_err()
    );

    round_trip(
        json!({"execute": "blockdev-reopen", "arguments": {"options": [
        {"driver": "qcow2", "node-name": "libvirt-3-format", "read-only": false, "file": "libvirt-3-storage", "backing": "libvirt-4-format"}]}}),
    );
    round_trip(json!({"execute": "blockdev-del", "arguments": {"node-name": "libvirt-3-format"}}));
}

#[test]
fn job_control_commands_round_trip() {
    for name in ["job-dismiss", "job-cancel", "job-finalize"] {
        round_trip(json!({"execute": name, "arguments": {"id": "bk"}}));
    }
    let cmd = round_trip(
        json!({"execute": "block-job-cancel", "arguments": {"device": "backup-vda-libvirt-2-format", "force": true}}),
    );
    assert_eq!(
        cmd,
        QmpCommand::BlockJobCancel(BlockJobCancel {
            device: "backup-vda-libvirt-2-format".into(),
            force: Some(true)
        })
    );
    round_trip(
        json!({"execute": "block-job-set-speed", "arguments": {"device": "bk", "speed": 16777216}}),
    );
    round_trip(json!({"execute": "query-jobs"}));
    round_trip(json!({"execute": "query-block"}));
    round_trip(json!({"execute": "query-status"}));
    round_trip(json!({"execute": "quit"}));
}

#[test]
fn nbd_server_start_encodes_unix_inet_and_fd_addresses() {
    assert_eq!(
        wire(&QmpCommand::NbdServerStart(NbdServerStart::new(
            SocketAddressLegacy::unix("/srv/lab/run/backup-nbd.sock")
        ))),
        json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/srv/lab/run/backup-nbd.sock"}}}})
    );
    let tls = NbdServerStart {
        tls_creds: Some("objlibvirt_backup_tls0".into()),
        ..NbdServerStart::new(SocketAddressLegacy::inet("0.0.0.0", 10809))
    };
    assert_eq!(
        wire(&QmpCommand::NbdServerStart(tls)),
        json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "10809"}},
            "tls-creds": "objlibvirt_backup_tls0"}})
    );
    assert_eq!(
        serde_json::to_value(SocketAddressLegacy::fd("nbdfd")).unwrap(),
        json!({"type": "fd", "data": {"str": "nbdfd"}})
    );
    round_trip(
        json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "::", "port": "10809", "ipv6": true}}, "max-connections": 4}}),
    );
    assert!(QmpCommand::from_wire(json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "vsock", "data": {"cid": "3", "port": "1"}}}})).is_err());
}

#[test]
fn block_export_add_encodes_bitmaps_in_both_forms() {
    let export = BlockExportAdd {
        writable: Some(false),
        name: Some("vda".into()),
        allocation_depth: Some(true),
        bitmaps: Some(vec![
            BitmapRef::Name("backup-vda".into()),
            BlockDirtyBitmap::new("src", "backup-src").into(),
        ]),
        ..BlockExportAdd::nbd("libvirt-nbd-libvirt-10-format", "libvirt-10-format")
    };
    assert_eq!(
        wire(&QmpCommand::BlockExportAdd(export)),
        json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "libvirt-nbd-libvirt-10-format",
            "node-name": "libvirt-10-format", "writable": false, "name": "vda",
            "bitmaps": ["backup-vda", {"node": "src", "name": "backup-src"}], "allocation-depth": true}})
    );
    round_trip(
        json!({"execute": "block-export-del", "arguments": {"id": "pull-a", "mode": "hard"}}),
    );
}

#[test]
fn object_add_encodes_tls_credentials_and_secrets() {
    let creds = ObjectAdd::TlsCredsX509(TlsCredsX509 {
        id: "objlibvirt_backup_tls0".into(),
        dir: Some("/etc/pki/libvirt-backup".into()),
        endpoint: Some(TlsEndpoint::Server),
        verify_peer: Some(true),
        passwordid: Some("objlibvirt_backup_tls0-secret0".into()),
        ..Default::default()
    });
    assert_eq!(
        wire(&QmpCommand::ObjectAdd(creds)),
        json!({"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "objlibvirt_backup_tls0",
            "dir": "/etc/pki/libvirt-backup", "endpoint": "server", "verify-peer": true, "passwordid": "objlibvirt_backup_tls0-secret0"}})
    );
    let secret = round_trip(
        json!({"execute": "object-add", "arguments": {"qom-type": "secret", "id": "objlibvirt_backup_tls0-secret0",
        "data": "c2VjcmV0", "format": "base64", "keyid": "masterKey0", "iv": "AAAA"}}),
    );
    let QmpCommand::ObjectAdd(secret) = secret else {
        panic!()
    };
    assert_eq!(
        (secret.qom_type(), secret.id()),
        ("secret", "objlibvirt_backup_tls0-secret0")
    );
    let other = round_trip(
        json!({"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io1", "poll-max-ns": 0}}),
    );
    let QmpCommand::ObjectAdd(ObjectAdd::Other { qom_type, .. }) = other else {
        panic!()
    };
    assert_eq!(qom_type, "iothread");
    round_trip(json!({"execute": "object-del", "arguments": {"id": "objlibvirt_backup_tls0"}}));
}

#[test]
fn unknown_arguments_of_known_commands_are_rejected_as_qemu_does() {
    let err = QmpCommand::from_wire(
        json!({"execute": "job-dismiss", "arguments": {"id": "bk", "force": true}}),
    )
    .unwrap_err();
    assert!(
        matches!(&err, DecodeError::Invalid { context, .. } if context == "arguments of job-dismiss"),
        "{err}"
    );
    assert!(
        QmpCommand::from_wire(json!({"execute": "query-jobs", "arguments": {"x": 1}})).is_err()
    );
    assert!(QmpCommand::from_wire(json!({"execute": "job-dismiss", "arguments": ["bk"]})).is_err());
    assert!(
        QmpCommand::from_wire(
            json!({"execute": "job-dismiss", "arguments": {"id": "bk"}, "bogus": 1})
        )
        .is_err()
    );
    assert!(QmpCommand::from_wire(json!({"execute": 5})).is_err());
    assert!(matches!(
        QmpCommand::from_wire(json!({"return": {}})),
        Err(DecodeError::Unrecognized { .. })
    ));
}

#[test]
fn no_argument_command_given_empty_arguments_decodes_and_encodes_without_them() {
    let (id, cmd) =
        QmpCommand::from_wire(json!({"execute": "query-jobs", "arguments": {}, "id": 9})).unwrap();
    assert_eq!(
        (id, &cmd),
        (Some(CommandId::Number(9)), &QmpCommand::QueryJobs)
    );
    assert_eq!(wire(&cmd), json!({"execute": "query-jobs"}));
}

#[test]
fn commands_outside_the_vocabulary_are_kept_verbatim() {
    let cmd = round_trip(
        json!({"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}, "id": "libvirt-9"}),
    );
    assert!(matches!(&cmd, QmpCommand::Other { execute, .. } if execute == "qom-get"));
    assert!(!QmpCommand::is_known_name("qom-get"));
    assert!(QmpCommand::is_known_name("blockdev-backup"));
    // An explicitly empty argument object of an unknown command survives too.
    round_trip(json!({"execute": "cont", "arguments": {}}));
}

#[test]
fn decode_reads_bytes_and_reports_json_errors_with_position() {
    let (id, cmd) =
        QmpCommand::decode(br#"{"execute":"job-dismiss","arguments":{"id":"x"},"id":"libvirt-1"}"#)
            .unwrap();
    assert_eq!(id, Some(CommandId::from("libvirt-1")));
    assert_eq!(cmd, QmpCommand::JobDismiss(JobRef::new("x")));
    assert!(matches!(
        QmpCommand::decode(b"{\"execute\":\n  nope}"),
        Err(DecodeError::Json { line: 2, .. })
    ));
}

#[test]
fn commands_serialize_as_their_wire_form_without_id() {
    let cmd =
        QmpCommand::BlockDirtyBitmapRemove(BlockDirtyBitmap::new("libvirt-2-format", "backup-vda"));
    let value = serde_json::to_value(&cmd).unwrap();
    assert_eq!(
        value,
        json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "libvirt-2-format", "name": "backup-vda"}})
    );
    assert_eq!(serde_json::from_value::<QmpCommand>(value).unwrap(), cmd);
    let plan = vec![cmd, QmpCommand::QueryJobs];
    assert_eq!(
        serde_json::to_string(&plan).unwrap(),
        r#"[{"execute":"block-dirty-bitmap-remove","arguments":{"node":"libvirt-2-format","name":"backup-vda"}},{"execute":"query-jobs"}]"#
    );
    assert!(serde_json::from_value::<QmpCommand>(json!({"execute": "job-dismiss"})).is_err());
}

#[test]
fn shorthands_build_the_commands_libvirt_sends() {
    let cases = [
        (
            QmpCommand::query_named_block_nodes(),
            json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        ),
        (
            QmpCommand::job_dismiss("j"),
            json!({"execute": "job-dismiss", "arguments": {"id": "j"}}),
        ),
        (
            QmpCommand::job_cancel("j"),
            json!({"execute": "job-cancel", "arguments": {"id": "j"}}),
        ),
        (
            QmpCommand::job_finalize("j"),
            json!({"execute": "job-finalize", "arguments": {"id": "j"}}),
        ),
        (
            QmpCommand::block_job_cancel("j", true),
            json!({"execute": "block-job-cancel", "arguments": {"device": "j", "force": true}}),
        ),
        (
            QmpCommand::blockdev_del("n"),
            json!({"execute": "blockdev-del", "arguments": {"node-name": "n"}}),
        ),
        (
            QmpCommand::bitmap_remove("n", "b"),
            json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "n", "name": "b"}}),
        ),
        (
            QmpCommand::block_export_del("e"),
            json!({"execute": "block-export-del", "arguments": {"id": "e"}}),
        ),
        (
            QmpCommand::object_del("o"),
            json!({"execute": "object-del", "arguments": {"id": "o"}}),
        ),
    ];
    for (cmd, expected) in cases {
        assert_eq!(wire(&cmd), expected);
    }
}
