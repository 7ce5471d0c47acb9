//! `transaction`: atomicity, QEMU's grouped refusal, drain pairs of running jobs.

mod common;
use common::*;
use serde_json::json;

#[test]
fn a_failing_action_rolls_back_every_earlier_one() {
    let mut q = daemon_with_disk();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "keep"}),
    );
    q.guest_write(0, "disk", 0, &[1; 100]).unwrap();
    let e = err(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "chk1", "persistent": true}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "disk", "name": "keep"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "keep"}},
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "bk", "target": "no-such-node", "sync": "full"}}]}),
    );
    assert_eq!(
        e,
        "Cannot find device='no-such-node' nor node-name='no-such-node'"
    );
    assert!(bitmap(&mut q, "disk", "chk1").is_none());
    let keep = bitmap(&mut q, "disk", "keep").unwrap();
    assert_eq!(
        (keep["count"].as_u64(), keep["recording"].as_bool()),
        (Some(65536), Some(true))
    );
    assert!(q.take_events().is_empty());
}

#[test]
fn a_job_created_before_a_failing_action_is_cancelled_and_dismissed() {
    let mut q = daemon_with_disk();
    add_target(&mut q, "t", 64 * MIB, None);
    let e = err(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "bk", "target": "t", "sync": "full", "auto-dismiss": false}},
        {"type": "abort", "data": {}}]}),
    );
    assert_eq!(e, "Transaction aborted using Abort action");
    assert_eq!(
        take_names(&mut q),
        [
            "created/bk",
            "aborting/bk",
            "BLOCK_JOB_CANCELLED/bk",
            "concluded/bk",
            "null/bk"
        ]
    );
    assert!(job(&mut q, "bk").is_none());
    // The target is free again and the filter is gone.
    ok(&mut q, "blockdev-del", json!({"node-name": "t"}));
    let nodes = ok(&mut q, "query-named-block-nodes", json!({"flat": true}));
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["drv"] != "copy-before-write")
    );
}

#[test]
fn grouped_completion_is_refused_with_bitmap_actions() {
    let mut q = daemon_with_disk();
    add_target(&mut q, "t", 64 * MIB, None);
    let e = err(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "chk1", "persistent": true, "granularity": 65536}},
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "bk", "target": "t", "sync": "full"}}],
        "properties": {"completion-mode": "grouped"}}),
    );
    assert_eq!(
        e,
        "Action 'block-dirty-bitmap-add' does not support transaction property completion-mode = grouped"
    );
    assert!(bitmap(&mut q, "disk", "chk1").is_none());
}

#[test]
fn grouped_backups_fail_together() {
    let mut q = daemon_with_disk();
    q.fs_mut()
        .create_qcow2("/img/other.qcow2", 64 * MIB, 65536, None);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "other", "file": {"driver": "file", "filename": "/img/other.qcow2"}}),
    );
    add_target(&mut q, "t1", 64 * MIB, None);
    add_target(&mut q, "t2", 64 * MIB, None);
    ok(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "a", "target": "t1", "sync": "full", "auto-dismiss": false}},
        {"type": "blockdev-backup", "data": {"device": "other", "job-id": "b", "target": "t2", "sync": "full", "auto-dismiss": false}}],
        "properties": {"completion-mode": "grouped"}}),
    );
    assert_eq!(
        take_names(&mut q),
        [
            "created/a",
            "created/b",
            "running/b",
            "paused/b",
            "running/a",
            "paused/a",
            "running/b",
            "running/a"
        ]
    );
    ok(&mut q, "job-cancel", json!({"id": "a"}));
    let names = take_names(&mut q);
    assert_eq!(
        names,
        [
            "aborting/a",
            "BLOCK_JOB_CANCELLED/a",
            "concluded/a",
            "aborting/b",
            "BLOCK_JOB_CANCELLED/b",
            "concluded/b"
        ]
    );
}

#[test]
fn a_transaction_pauses_and_resumes_running_jobs() {
    let mut q = daemon_with_disk();
    add_target(&mut q, "t", 64 * MIB, None);
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "bk", "device": "disk", "target": "t", "sync": "none", "auto-dismiss": false}),
    );
    q.take_events();
    ok(
        &mut q,
        "transaction",
        json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "c", "persistent": true}}]}),
    );
    assert_eq!(take_names(&mut q), ["paused/bk", "running/bk"]);
    // A plain command is no graph change.
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "d"}),
    );
    assert!(take_names(&mut q).is_empty());
}

#[test]
fn unknown_action_types_and_commands_are_refused() {
    let mut q = daemon_with_disk();
    assert_eq!(
        err(
            &mut q,
            "transaction",
            json!({"actions": [{"type": "frobnicate", "data": {}}]})
        ),
        "Parameter 'actions[0].type' does not accept value 'frobnicate'"
    );
    let e = run(&mut q, "no-such-command", json!({})).unwrap_err();
    assert_eq!(
        (e.class.as_str(), e.desc.as_str()),
        (
            "CommandNotFound",
            "The command no-such-command has not been found"
        )
    );
}

#[test]
fn negotiation_is_required_once() {
    let mut q = vbackup_sim::Qemu::new(
        vbackup_sim::FileSystem::new(),
        vbackup_sim::Config::default(),
    );
    let e = q.execute(0, &json!({"execute": "query-jobs"})).unwrap_err();
    assert_eq!(
        (e.class.as_str(), e.desc.as_str()),
        (
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    q.execute(0, &json!({"execute": "qmp_capabilities"}))
        .unwrap();
    let e = q
        .execute(0, &json!({"execute": "qmp_capabilities"}))
        .unwrap_err();
    assert_eq!(
        e.desc,
        "Capabilities negotiation is already complete, command ignored"
    );
}
