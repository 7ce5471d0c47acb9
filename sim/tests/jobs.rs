//! Backup jobs: event sequences, bitmap semantics per sync and bitmap-mode, cancel, errors,
//! manual finalize, progress over virtual time.

mod common;
use common::*;
use serde_json::json;
use vbackup_sim::Fault;

#[test]
fn push_full_backup_emits_qemu_sequence_and_copies_the_disk() {
    let mut q = daemon_with_disk();
    q.guest_write(0, "disk", 0, &pattern(1, MIB as usize))
        .unwrap();
    add_target(&mut q, "full", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk-full", "device": "disk", "target": "full", "sync": "full", "auto-dismiss": false}),
    );
    assert_eq!(
        take_names(&mut q),
        [
            "created/bk-full",
            "running/bk-full",
            "paused/bk-full",
            "running/bk-full"
        ]
    );
    wait(&mut q, 1000);
    let ev = q.take_events();
    assert_eq!(
        event_names(&ev),
        [
            "waiting/bk-full",
            "pending/bk-full",
            "BLOCK_JOB_COMPLETED/bk-full",
            "concluded/bk-full"
        ]
    );
    assert_eq!(
        ev[2]["data"],
        json!({"device": "bk-full", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"})
    );
    assert_eq!(
        job(&mut q, "bk-full").unwrap(),
        json!({"current-progress": 67108864, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "bk-full"})
    );
    ok(&mut q, "job-dismiss", json!({"id": "bk-full"}));
    assert_eq!(take_names(&mut q), ["null/bk-full"]);
    ok(&mut q, "blockdev-del", json!({"node-name": "full"}));
    ok(&mut q, "blockdev-del", json!({"node-name": "full-file"}));
    let disk = q.guest_disk("disk").unwrap();
    assert_eq!(q.fs().read_image("/img/full.qcow2").unwrap(), disk);
    // Only allocated data is stored in the copy.
    assert_eq!(
        q.fs().allocated_ranges("/img/full.qcow2").unwrap(),
        vec![(0, MIB)]
    );
}

#[test]
fn progress_follows_virtual_time_and_speed() {
    let mut q = daemon_with_disk();
    add_target(&mut q, "t", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk", "device": "disk", "target": "t", "sync": "full", "speed": 16 * MIB}),
    );
    wait(&mut q, 1000);
    assert_eq!(job(&mut q, "bk").unwrap()["current-progress"], 16 * MIB);
    let bj = ok(&mut q, "query-block-jobs", json!({}));
    assert_eq!(bj[0]["speed"], 16 * MIB);
    assert_eq!(bj[0]["offset"], 16 * MIB);
    ok(
        &mut q,
        "block-job-set-speed",
        json!({"device": "bk", "speed": 32 * MIB}),
    );
    wait(&mut q, 500);
    assert_eq!(job(&mut q, "bk").unwrap()["current-progress"], 32 * MIB);
    ok(&mut q, "job-pause", json!({"id": "bk"}));
    wait(&mut q, 5000);
    assert_eq!(job(&mut q, "bk").unwrap()["current-progress"], 32 * MIB);
    assert_eq!(
        err(&mut q, "job-pause", json!({"id": "bk"})),
        "Job 'bk' in state 'paused' cannot accept command verb 'pause'"
    );
    ok(&mut q, "job-resume", json!({"id": "bk"}));
    assert_eq!(q.next_event_ms(), Some(q.now_ms() + 1000));
    wait(&mut q, 1000);
    // auto-dismiss defaults to true: the job is gone after success.
    assert!(job(&mut q, "bk").is_none());
    let names = take_names(&mut q);
    assert_eq!(
        names[names.len() - 6..],
        [
            "running/bk",
            "waiting/bk",
            "pending/bk",
            "BLOCK_JOB_COMPLETED/bk",
            "concluded/bk",
            "null/bk"
        ]
    );
}

#[test]
fn incremental_backup_copies_dirty_clusters_and_clears_the_bitmap_on_success() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk1", "persistent": true}),
    );
    q.guest_write(0, "disk", 2 * MIB, &pattern(3, 131072))
        .unwrap();
    q.guest_write(0, "disk", 40 * MIB, &pattern(4, 100))
        .unwrap();
    add_target(&mut q, "inc", 64 * MIB, None);
    ok(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "chk2", "persistent": true}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "tmp", "persistent": false, "disabled": true}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk", "target": "tmp", "bitmaps": ["chk1"]}},
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "inc", "target": "inc", "sync": "incremental", "bitmap": "tmp", "auto-dismiss": false}}]}),
    );
    let tmp = bitmap(&mut q, "disk", "tmp").unwrap();
    assert_eq!(
        tmp,
        json!({"name": "tmp", "recording": false, "persistent": false, "busy": true, "granularity": 65536, "count": 196608})
    );
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-remove",
            json!({"node": "disk", "name": "tmp"})
        ),
        "Bitmap 'tmp' is currently in use by another operation and cannot be used"
    );
    wait(&mut q, 1000);
    let ev = q.take_events();
    let done = ev
        .iter()
        .find(|e| e["event"] == "BLOCK_JOB_COMPLETED")
        .unwrap();
    assert_eq!(done["data"]["len"], 196608);
    assert_eq!(count(&mut q, "disk", "tmp"), 0);
    assert_eq!(count(&mut q, "disk", "chk1"), 196608);
    assert_eq!(
        q.fs().allocated_ranges("/img/inc.qcow2").unwrap(),
        vec![(2 * MIB, 131072), (40 * MIB, 65536)]
    );
}

#[test]
fn bitmap_mode_never_leaves_the_bitmap_and_always_keeps_what_was_not_copied() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b"}),
    );
    q.guest_write(0, "disk", 0, &vec![1; 4 * MIB as usize])
        .unwrap();
    add_target(&mut q, "t1", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "j1", "device": "disk", "target": "t1", "sync": "bitmap", "bitmap": "b", "bitmap-mode": "never"}),
    );
    wait(&mut q, 1000);
    assert_eq!(count(&mut q, "disk", "b"), 4 * MIB);
    // always + failure half way: the copied half leaves the bitmap, writes during the job join it.
    add_target(&mut q, "t2", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "j2", "device": "disk", "target": "t2", "sync": "bitmap", "bitmap": "b", "bitmap-mode": "always", "speed": 2 * MIB}),
    );
    wait(&mut q, 1000);
    q.guest_write(q.now_ms(), "disk", 32 * MIB, &[9; 10])
        .unwrap();
    q.take_events();
    q.set_fault(Fault::TargetIoError { node: "t2".into() });
    // The job fails when it next tries to write (the next granule, 31 ms later at this speed).
    wait(&mut q, 100);
    let names = take_names(&mut q);
    assert_eq!(
        names,
        [
            "BLOCK_JOB_ERROR/j2",
            "aborting/j2",
            "BLOCK_JOB_COMPLETED/j2",
            "concluded/j2",
            "null/j2"
        ]
    );
    assert_eq!(count(&mut q, "disk", "b"), 2 * MIB + 65536);
}

#[test]
fn failed_and_cancelled_incrementals_give_the_bitmap_back() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk"}),
    );
    q.guest_write(0, "disk", 0, &vec![1; 8 * MIB as usize])
        .unwrap();
    add_target(&mut q, "t", 64 * MIB, None);
    q.set_fault(Fault::TargetIoError { node: "t".into() });
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk4", "device": "disk", "target": "t", "sync": "incremental", "bitmap": "chk", "auto-dismiss": false}),
    );
    q.take_events();
    wait(&mut q, 100);
    let ev = q.take_events();
    assert_eq!(
        event_names(&ev),
        [
            "BLOCK_JOB_ERROR/bk4",
            "aborting/bk4",
            "BLOCK_JOB_COMPLETED/bk4",
            "concluded/bk4"
        ]
    );
    assert_eq!(
        ev[0]["data"],
        json!({"device": "bk4", "operation": "write", "action": "report"})
    );
    assert_eq!(ev[2]["data"]["error"], "Input/output error");
    assert_eq!(job(&mut q, "bk4").unwrap()["error"], "Input/output error");
    assert_eq!(count(&mut q, "disk", "chk"), 8 * MIB);
    ok(&mut q, "job-dismiss", json!({"id": "bk4"}));
    q.clear_faults();
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk5", "device": "disk", "target": "t", "sync": "incremental", "bitmap": "chk", "auto-dismiss": false, "speed": MIB}),
    );
    q.guest_write(q.now_ms(), "disk", 60 * MIB, &[1; 1])
        .unwrap();
    wait(&mut q, 1000);
    q.take_events();
    ok(&mut q, "job-cancel", json!({"id": "bk5"}));
    let ev = q.take_events();
    assert_eq!(
        event_names(&ev),
        ["aborting/bk5", "BLOCK_JOB_CANCELLED/bk5", "concluded/bk5"]
    );
    assert_eq!(
        ev[1]["data"],
        json!({"device": "bk5", "len": 8 * MIB, "offset": MIB, "speed": MIB, "type": "backup"})
    );
    let j = job(&mut q, "bk5").unwrap();
    assert_eq!(j["error"], "Operation canceled");
    assert_eq!(count(&mut q, "disk", "chk"), 8 * MIB + 65536);
}

#[test]
fn manual_finalize_holds_the_job_pending_with_a_recording_successor() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk"}),
    );
    q.guest_write(0, "disk", 0, &vec![1; 2 * MIB as usize])
        .unwrap();
    add_target(&mut q, "t", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk7", "device": "disk", "target": "t", "sync": "incremental", "bitmap": "chk", "auto-finalize": false, "auto-dismiss": false}),
    );
    wait(&mut q, 1000);
    let ev = q.take_events();
    assert_eq!(
        event_names(&ev)[4..],
        ["waiting/bk7", "pending/bk7", "BLOCK_JOB_PENDING/bk7"]
    );
    assert_eq!(ev[6]["data"], json!({"type": "backup", "id": "bk7"}));
    let nodes = ok(&mut q, "query-named-block-nodes", json!({"flat": true}));
    let bms = vbackup_sim::bitmaps_of(&nodes, "disk");
    assert_eq!(
        bms,
        json!([
        {"recording": true, "persistent": false, "busy": false, "granularity": 65536, "count": 0},
        {"name": "chk", "recording": true, "persistent": false, "busy": true, "granularity": 65536, "count": 2 * MIB}])
    );
    assert_eq!(
        err(&mut q, "job-dismiss", json!({"id": "bk7"})),
        "Job 'bk7' in state 'pending' cannot accept command verb 'dismiss'"
    );
    ok(&mut q, "job-finalize", json!({"id": "bk7"}));
    assert_eq!(
        take_names(&mut q),
        ["BLOCK_JOB_COMPLETED/bk7", "concluded/bk7"]
    );
    assert_eq!(count(&mut q, "disk", "chk"), 0);
}

#[test]
fn backup_refusals_use_qemu_texts() {
    let mut q = daemon_with_disk();
    add_target(&mut q, "t", 64 * MIB, None);
    add_target(&mut q, "small", 32 * MIB, None);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk1"}),
    );
    let b = |extra: serde_json::Value| {
        let mut a = json!({"job-id": "j", "device": "disk", "target": "t", "sync": "full"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"sync": "incremental"}))),
        "must provide a valid bitmap name for 'incremental' sync mode"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            b(json!({"sync": "bitmap", "bitmap": "nope", "bitmap-mode": "never"}))
        ),
        "Bitmap 'nope' could not be found"
    );
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"bitmap": "chk1"}))),
        "Bitmap sync mode must be given when providing a bitmap"
    );
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"target": "small"}))),
        "Source and target image have different sizes"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            b(json!({"target": "no-such-node"}))
        ),
        "Cannot find device='no-such-node' nor node-name='no-such-node'"
    );
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"target": "disk"}))),
        "Source and target cannot be the same"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            b(json!({"sync": "none", "bitmap": "chk1", "bitmap-mode": "always"}))
        ),
        "sync mode 'none' does not produce meaningful bitmap outputs"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            b(json!({"bitmap": "chk1", "bitmap-mode": "never"}))
        ),
        "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            b(json!({"bitmap-mode": "never"}))
        ),
        "Cannot specify bitmap sync mode without a bitmap"
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-backup",
            b(json!({"sync": "incremental", "bitmap": "chk1", "bitmap-mode": "always"}))
        ),
        "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
    );
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"job-id": "1x"}))),
        "Invalid job ID '1x'"
    );
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"sync": "sideways"}))),
        "Parameter 'sync' does not accept value 'sideways'"
    );
    ok(&mut q, "blockdev-backup", b(json!({"speed": 1})));
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"job-id": "k"}))),
        "Node 't' is busy: block device is in use by block job: backup"
    );
    add_target(&mut q, "t2", 64 * MIB, None);
    assert_eq!(
        err(&mut q, "blockdev-backup", b(json!({"target": "t2"}))),
        "Job ID 'j' already in use"
    );
    assert_eq!(
        err(&mut q, "blockdev-del", json!({"node-name": "t"})),
        "Node 't' is busy: block device is in use by block job: backup"
    );
    assert_eq!(
        err(&mut q, "blockdev-del", json!({"node-name": "disk"})),
        "Block device disk is in use"
    );
}

#[test]
fn job_commands_refuse_unknown_jobs_and_wrong_states() {
    let mut q = daemon_with_disk();
    assert_eq!(
        err(&mut q, "job-cancel", json!({"id": "nope"})),
        "Job not found"
    );
    let e = run(&mut q, "block-job-cancel", json!({"device": "nope"})).unwrap_err();
    assert_eq!(
        (e.class.as_str(), e.desc.as_str()),
        ("DeviceNotActive", "Block job 'nope' not found")
    );
    add_target(&mut q, "t", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "j", "device": "disk", "target": "t", "sync": "full", "auto-dismiss": false}),
    );
    assert_eq!(
        err(&mut q, "job-dismiss", json!({"id": "j"})),
        "Job 'j' in state 'running' cannot accept command verb 'dismiss'"
    );
    assert_eq!(
        err(&mut q, "job-complete", json!({"id": "j"})),
        "Job 'j' in state 'running' cannot accept command verb 'complete'"
    );
    assert_eq!(
        err(&mut q, "job-finalize", json!({"id": "j"})),
        "Job 'j' in state 'running' cannot accept command verb 'finalize'"
    );
    assert_eq!(
        err(&mut q, "job-resume", json!({"id": "j"})),
        "Job 'j' in state 'running' cannot accept command verb 'resume'"
    );
    ok(&mut q, "block-job-pause", json!({"device": "j"}));
    assert_eq!(
        err(&mut q, "block-job-cancel", json!({"device": "j"})),
        "The block job for device 'j' is currently paused"
    );
    ok(
        &mut q,
        "block-job-cancel",
        json!({"device": "j", "force": true}),
    );
    assert_eq!(
        err(&mut q, "job-cancel", json!({"id": "j"})),
        "Job 'j' in state 'concluded' cannot accept command verb 'cancel'"
    );
}

/// An empty file `/img/new.qcow2` opened as node `new-file`, as before a `blockdev-create`.
fn add_empty_file_node(q: &mut vbackup_sim::Qemu) {
    q.fs_mut().touch("/img/new.qcow2");
    ok(
        q,
        "blockdev-add",
        json!({"driver": "file", "node-name": "new-file", "filename": "/img/new.qcow2"}),
    );
}

#[test]
fn blockdev_create_runs_as_a_job_and_formats_the_file() {
    let mut q = daemon_with_disk();
    add_empty_file_node(&mut q);
    ok(
        &mut q,
        "blockdev-create",
        json!({"job-id": "create-new", "options": {"driver": "qcow2", "file": "new-file", "size": 64 * MIB, "cluster-size": 65536, "backing-file": "/img/disk.qcow2", "backing-fmt": "qcow2"}}),
    );
    assert_eq!(
        take_names(&mut q),
        ["created/create-new", "running/create-new"]
    );
    assert_eq!(job(&mut q, "create-new").unwrap()["current-progress"], 0);
    wait(&mut q, 10);
    assert_eq!(
        take_names(&mut q),
        [
            "waiting/create-new",
            "pending/create-new",
            "concluded/create-new"
        ]
    );
    assert_eq!(
        job(&mut q, "create-new").unwrap(),
        json!({"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create", "id": "create-new"})
    );
    ok(&mut q, "job-dismiss", json!({"id": "create-new"}));
    ok(
        &mut q,
        "blockdev-add",
        json!({"node-name": "new", "driver": "qcow2", "file": "new-file", "backing": "disk"}),
    );
    let nodes = ok(&mut q, "query-named-block-nodes", json!({"flat": true}));
    assert_eq!(nodes[0]["image"]["backing-filename"], "/img/disk.qcow2");
    // A create job on an unknown file node fails as a job.
    ok(
        &mut q,
        "blockdev-create",
        json!({"job-id": "c2", "options": {"driver": "qcow2", "file": "nope", "size": 65536}}),
    );
    wait(&mut q, 10);
    assert_eq!(
        take_names(&mut q)[1..],
        ["created/c2", "running/c2", "aborting/c2", "concluded/c2"]
    );
    assert_eq!(
        job(&mut q, "c2").unwrap()["error"],
        "Cannot find device='nope' nor node-name='nope'"
    );
}

/// QEMU's qcow2 creation opens a block backend on its file node for the job's run:
/// `blockdev-del` of that node is refused with the in-use text until the job has run, and the
/// job still formats the file.
#[test]
fn blockdev_del_refuses_the_file_node_of_a_running_create_job() {
    let mut q = daemon_with_disk();
    add_empty_file_node(&mut q);
    ok(
        &mut q,
        "blockdev-create",
        json!({"job-id": "create-new", "options": {"driver": "qcow2", "file": "new-file", "size": 64 * MIB}}),
    );
    assert_eq!(job(&mut q, "create-new").unwrap()["status"], "running");
    let refused = run(&mut q, "blockdev-del", json!({"node-name": "new-file"})).unwrap_err();
    assert_eq!(refused.class, "GenericError");
    assert_eq!(refused.desc, "Node new-file is in use");
    assert!(
        q.fs().get("/img/new.qcow2").is_some(),
        "the refusal leaves the node and its file alone"
    );
    wait(&mut q, 10);
    assert_eq!(job(&mut q, "create-new").unwrap()["status"], "concluded");
    // Once the creation has run, the node is free again (a concluded job holds nothing).
    ok(&mut q, "blockdev-del", json!({"node-name": "new-file"}));
    assert!(matches!(
        q.fs().get("/img/new.qcow2"),
        Some(vbackup_sim::FileContent::Qcow2(_))
    ));
    ok(&mut q, "job-dismiss", json!({"id": "create-new"}));
}

#[test]
fn a_full_backup_into_a_used_target_replaces_old_data_with_zeroes() {
    let mut q = daemon_with_disk();
    q.guest_write(0, "disk", 0, &[1; 65536]).unwrap();
    q.fs_mut()
        .create_qcow2("/img/reused.qcow2", 64 * MIB, 65536, None);
    q.fs_mut()
        .write_image("/img/reused.qcow2", 5 * MIB, &[9; 70_000])
        .unwrap();
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "reused", "file": {"driver": "file", "filename": "/img/reused.qcow2"}}),
    );
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "j", "device": "disk", "target": "reused", "sync": "full"}),
    );
    wait(&mut q, 1000);
    ok(&mut q, "blockdev-del", json!({"node-name": "reused"}));
    assert_eq!(
        q.fs().read_image("/img/reused.qcow2").unwrap(),
        q.guest_disk("disk").unwrap()
    );
}

#[test]
fn sync_top_copies_only_what_the_top_image_allocates() {
    let mut q = daemon_with_disk();
    q.guest_write(0, "disk", 3 * MIB, &[1; 100]).unwrap();
    add_target(&mut q, "t", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "j", "device": "disk", "target": "t", "sync": "top", "auto-dismiss": false}),
    );
    assert_eq!(
        job(&mut q, "j").unwrap()["current-progress"],
        64 * MIB - 65536
    );
    wait(&mut q, 1000);
    assert_eq!(
        q.fs().allocated_ranges("/img/t.qcow2").unwrap(),
        vec![(3 * MIB, 65536)]
    );
}
