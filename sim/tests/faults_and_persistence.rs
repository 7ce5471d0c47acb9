//! Fault injection, crashes and restarts, clean shutdown, and determinism.

mod common;
use common::*;
use serde_json::{Value, json};
use vbackup_sim::{Config, Fault, FileSystem, Flavor, Qemu, QmpError};

fn reopen_after(q: &mut Qemu) {
    q.restart();
    q.execute(0, &json!({"execute": "qmp_capabilities"}))
        .unwrap();
    open_disk(q);
}

#[test]
fn after_a_crash_the_checkpoint_bitmap_is_inconsistent_and_unusable() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk-a", "persistent": true}),
    );
    q.guest_write(0, "disk", 0, &[1; 65536]).unwrap();
    ok(&mut q, "quit", json!({}));
    reopen_after(&mut q);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk-new", "persistent": true}),
    );
    add_target(&mut q, "t", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk", "device": "disk", "target": "t", "sync": "incremental", "bitmap": "chk-a", "speed": 1}),
    );
    q.crash();
    assert!(!q.is_running());
    let e = q.execute(0, &json!({"execute": "query-jobs"})).unwrap_err();
    assert_eq!(e.class, vbackup_sim::error_classes::NOT_RUNNING);
    reopen_after(&mut q);
    assert!(
        bitmap(&mut q, "disk", "chk-new").is_none(),
        "a bitmap created since the last clean close is gone"
    );
    assert_eq!(
        bitmap(&mut q, "disk", "chk-a").unwrap(),
        json!({"name": "chk-a", "recording": false, "persistent": true, "busy": false, "granularity": 65536, "count": 0, "inconsistent": true})
    );
    add_target(&mut q, "t2", 64 * MIB, None);
    let text = "Bitmap 'chk-a' is inconsistent and cannot be used";
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            json!({"job-id": "bk", "device": "disk", "target": "t2", "sync": "incremental", "bitmap": "chk-a"})
        ),
        text
    );
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "tmp", "disabled": true}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "tmp", "bitmaps": ["chk-a"]})
        ),
        text
    );
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "chk-a", "bitmaps": ["tmp"]})
        ),
        text
    );
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "chk-a"})
        ),
        text
    );
    ok(
        &mut q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/run/s"}}}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk", "bitmaps": ["chk-a"]})
        ),
        text
    );
    // A crash in the middle of a write-heavy period keeps data (writes reached the image).
    assert_eq!(q.guest_read("disk", 0, 1).unwrap(), [1]);
    ok(
        &mut q,
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "chk-a"}),
    );
    assert!(q.fs().stored_bitmaps("/img/disk.qcow2").unwrap().is_empty());
}

#[test]
fn quit_shuts_down_exports_and_stores_bitmaps() {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/img/disk.qcow2", 64 * MIB, 65536, None);
    let mut q = Qemu::negotiated(
        fs,
        Config {
            flavor: Flavor::System,
            ..Config::default()
        },
    );
    open_disk(&mut q);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "c", "persistent": true, "disabled": true}),
    );
    ok(
        &mut q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/run/s"}}}),
    );
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "disk", "writable": true}),
    );
    ok(&mut q, "quit", json!({}));
    assert_eq!(
        take_names(&mut q),
        ["SHUTDOWN/", "BLOCK_EXPORT_DELETED/guest"]
    );
    let stored = q.fs().stored_bitmaps("/img/disk.qcow2").unwrap();
    assert!(
        stored["c"].flags().is_empty(),
        "disabled bitmaps are stored without 'auto'"
    );
    assert!(run(&mut q, "query-jobs", json!({})).is_err());
}

#[test]
fn reopening_read_write_marks_bitmaps_in_use_and_read_only_stores_them() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "c", "persistent": true}),
    );
    ok(
        &mut q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "disk", "file": "disk-file", "read-only": true}]}),
    );
    assert_eq!(
        q.fs().stored_bitmaps("/img/disk.qcow2").unwrap()["c"].flags(),
        ["auto"]
    );
    assert_eq!(
        q.guest_write(0, "disk", 0, &[1]),
        Err(vbackup_sim::IoError::ReadOnly("disk".into()))
    );
    ok(
        &mut q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "disk", "file": "disk-file", "read-only": false}]}),
    );
    assert_eq!(
        q.fs().stored_bitmaps("/img/disk.qcow2").unwrap()["c"].flags(),
        ["in-use", "auto"]
    );
}

#[test]
fn injected_faults_fail_jobs_with_the_right_operation_and_text() {
    for (fault, op, text) in [
        (
            Fault::TargetNoSpace { node: "t".into() },
            "write",
            "No space left on device",
        ),
        (
            Fault::SourceIoError {
                node: "disk".into(),
            },
            "read",
            "Input/output error",
        ),
    ] {
        let mut q = daemon_with_disk();
        add_target(&mut q, "t", 64 * MIB, None);
        q.set_fault(fault);
        ok(
            &mut q,
            "blockdev-backup",
            json!({"job-id": "j", "device": "disk", "target": "t", "sync": "full", "auto-dismiss": false}),
        );
        wait(&mut q, 10);
        let ev = q.take_events();
        let error = ev.iter().find(|e| e["event"] == "BLOCK_JOB_ERROR").unwrap();
        assert_eq!(error["data"]["operation"], op);
        assert_eq!(job(&mut q, "j").unwrap()["error"], text);
    }
    let mut q = daemon_with_disk();
    let refusal = QmpError::generic("Could not create bitmap");
    q.set_fault(Fault::RefuseCommand {
        command: "transaction".into(),
        error: refusal.clone(),
    });
    assert_eq!(
        run(&mut q, "transaction", json!({"actions": []})),
        Err(refusal)
    );
    ok(&mut q, "transaction", json!({"actions": []}));
}

#[test]
fn a_target_failure_during_copy_before_write_ends_a_pull_job() {
    let mut q = daemon_with_disk();
    q.fs_mut().create_qcow2(
        "/img/scratch.qcow2",
        64 * MIB,
        65536,
        Some("/img/disk.qcow2"),
    );
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "scratch", "backing": "disk", "file": {"driver": "file", "filename": "/img/scratch.qcow2"}}),
    );
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "fleece", "device": "disk", "target": "scratch", "sync": "none", "auto-dismiss": false}),
    );
    q.take_events();
    q.set_fault(Fault::TargetIoError {
        node: "scratch".into(),
    });
    q.guest_write(5, "disk", 0, &[1; 10]).unwrap();
    assert_eq!(
        take_names(&mut q),
        [
            "BLOCK_JOB_ERROR/fleece",
            "aborting/fleece",
            "BLOCK_JOB_COMPLETED/fleece",
            "concluded/fleece"
        ]
    );
}

#[test]
fn writes_through_a_writable_export_are_guest_writes() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk0", "persistent": true, "granularity": 65536}),
    );
    ok(
        &mut q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/run/s"}}}),
    );
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "disk", "name": "guest", "writable": true}),
    );
    q.export_write(0, "guest", 0, &vec![0x11; MIB as usize])
        .unwrap();
    q.export_write(0, "guest", 8 * MIB, &vec![0x12; 65536])
        .unwrap();
    q.export_write(0, "guest", 20 * MIB, &vec![0x13; 102400])
        .unwrap();
    assert_eq!(count(&mut q, "disk", "chk0"), 1_245_184);
    assert!(q.export_write(0, "guest", 64 * MIB, &[0]).is_err());
}

#[test]
fn node_and_export_name_rules_use_qemu_texts() {
    let mut q = daemon_with_disk();
    let long = "n".repeat(32);
    assert_eq!(
        err(
            &mut q,
            "blockdev-add",
            json!({"driver": "file", "node-name": long, "filename": "/img/disk.qcow2"})
        ),
        "Node name too long"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-add",
            json!({"driver": "file", "node-name": "x", "filename": "/img/disk.qcow2", "bogus": 1})
        ),
        "Parameter 'bogus' is unexpected"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-add",
            json!({"driver": "nvme", "node-name": "x"})
        ),
        "Parameter 'driver' does not accept value 'nvme'"
    );
    ok(
        &mut q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/run/s"}}}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "#x", "node-name": "disk"})
        ),
        "Invalid block export id"
    );
}

/// A scripted history with jobs, writes during jobs, exports and a crash.
fn transcript() -> Vec<String> {
    let mut q = daemon_with_disk();
    let mut out = Vec::new();
    let mut log = |q: &mut Qemu, r: Result<Value, QmpError>| {
        out.push(format!("{r:?}"));
        for e in q.take_events() {
            out.push(e.to_string());
        }
    };
    let script = [
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "c1", "persistent": true}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "t", "backing": null, "file": {"driver": "file", "filename": "/img/t.qcow2"}}}),
        json!({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "c2", "persistent": true}},
            {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "j", "target": "t", "sync": "full", "speed": 8388608, "auto-dismiss": false}}]}}),
        json!({"execute": "query-jobs"}),
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        json!({"execute": "job-cancel", "arguments": {"id": "j"}}),
        json!({"execute": "query-jobs"}),
    ];
    q.fs_mut()
        .create_qcow2("/img/t.qcow2", 64 * MIB, 65536, None);
    for (i, cmd) in script.iter().enumerate() {
        let now = 100 * i as u64;
        q.guest_write(
            now,
            "disk",
            (i as u64 * 3 + 1) * MIB,
            &pattern(i as u8, 70_000),
        )
        .unwrap();
        let r = q.execute(now, cmd);
        log(&mut q, r);
    }
    q.crash();
    q.restart();
    let r = q.execute(10_000, &json!({"execute": "qmp_capabilities"}));
    log(&mut q, r);
    out
}

#[test]
fn the_same_calls_give_byte_identical_transcripts() {
    let a = transcript();
    let b = transcript();
    assert!(a.len() > 12, "{a:?}");
    assert_eq!(a, b);
}

#[test]
fn graph_refusals_for_missing_backing_files_sizes_read_only_targets_and_device_ids() {
    let mut q = daemon_with_disk();
    q.fs_mut().create_qcow2(
        "/img/orphan.qcow2",
        64 * MIB,
        65536,
        Some("/img/gone.qcow2"),
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "o", "file": {"driver": "file", "filename": "/img/orphan.qcow2"}})
        ),
        "Could not open backing file: Could not open '/img/gone.qcow2': No such file or directory"
    );
    // Nothing of the failed open is left behind.
    let nodes = ok(&mut q, "query-named-block-nodes", json!({"flat": true}));
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    q.fs_mut()
        .create_qcow2("/img/small.qcow2", 32 * MIB, 65536, None);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "small", "read-only": true, "file": {"driver": "file", "filename": "/img/small.qcow2"}}),
    );
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "small", "name": "s"}),
    );
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "d"}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "d", "bitmaps": [{"node": "small", "name": "s"}]})
        ),
        "Bitmaps are of different sizes (destination size is 67108864, source size is 33554432) and can't be merged"
    );
    q.fs_mut()
        .create_qcow2("/img/ro.qcow2", 64 * MIB, 65536, None);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ro", "read-only": true, "file": {"driver": "file", "filename": "/img/ro.qcow2"}}),
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            json!({"job-id": "j", "device": "disk", "target": "ro", "sync": "full"})
        ),
        "Block node is read-only"
    );
    let mut s = Qemu::negotiated(FileSystem::new(), Config::default());
    s.fs_mut().create_raw("/r", MIB);
    s.execute(0, &json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "r", "filename": "/r"}})).unwrap();
    s.add_device("vdz", "r").unwrap();
    let e = s.execute(0, &json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "vdz", "filename": "/r"}})).unwrap_err();
    assert_eq!(e.desc, "node-name=vdz is conflicting with a device id");
}

#[test]
fn a_failed_blockdev_add_closes_what_it_opened_cleanly() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "keep", "persistent": true}),
    );
    ok(&mut q, "blockdev-del", json!({"node-name": "disk"}));
    ok(&mut q, "blockdev-del", json!({"node-name": "disk-file"}));
    // The inline qcow2 child opens (loading its bitmap read-write); the parent's own option is
    // then refused.
    let e = err(
        &mut q,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "offset": "bad",
        "file": {"driver": "qcow2", "node-name": "inner", "file": {"driver": "file", "filename": "/img/disk.qcow2"}}}),
    );
    assert_eq!(e, "Invalid parameter type for 'offset', expected: integer");
    assert!(run(&mut q, "blockdev-del", json!({"node-name": "inner"})).is_err());
    assert_eq!(
        q.fs().stored_bitmaps("/img/disk.qcow2").unwrap()["keep"].flags(),
        ["auto"]
    );
}
