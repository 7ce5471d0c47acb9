//! The in-step mark of a managed domain against real qemu-storage-daemon: a command skips the
//! reconcile (the query of every node and bitmap) only when the last command left the same
//! daemon in step with the store; a mark naming another process, no mark, or a command QEMU
//! refused something make the next one reconcile.

mod support;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::json;
use support::Lab;
use vbackup_qemu::qmp_socket::QmpSocket;

/// Runs one QMP command on the managed daemon of `vm`, between two vbackup commands (its
/// monitor serves one client at a time).
fn qmp(lab: &Lab, command: &str, arguments: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let socket = lab.state().join("run/vm/qmp.sock");
    let mut mon = QmpSocket::connect(&socket, deadline).expect("monitor");
    mon.execute(command, Some(arguments), deadline)
        .unwrap_or_else(|e| panic!("{command}: {e}"));
}

#[test]
fn a_command_trusts_only_the_daemon_the_last_one_left_in_step() {
    let Some(lab) = Lab::new("in-step mark") else {
        return;
    };
    lab.define_vm("vda.qcow2", 16);
    lab.ok(&["start", "vm"]);
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);
    let mark = lab.state().join("run/vm/in-step");
    let pids = lab.daemon_pids();
    assert_eq!(pids.len(), 1);
    let text = fs::read_to_string(&mark).expect("a command that ends in step marks the daemon");
    assert!(text.starts_with(&format!("{} ", pids[0])), "{text}");

    // c1's bitmap removed behind vbackup's back (outside its contract): the next command
    // trusts the mark, so it does not look and reports nothing.
    let node = json!({"node": "vbk-vda-0-format", "name": "c1"});
    qmp(&lab, "block-dirty-bitmap-remove", node.clone());
    let out = lab.run(&["checkpoint-create-as", "vm", "c2"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(mark.exists());

    // A mark naming another process is not trusted: the command reconciles and finds it.
    fs::write(&mark, "1 1").unwrap();
    let out = lab.run(&["checkpoint-create-as", "vm", "c3"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: checkpoint 'c1': the bitmap of disk 'vda' is missing"),
        "{err}"
    );
    // An invalid checkpoint keeps the daemon out of step: no mark, so the next command
    // looks again.
    assert!(!mark.exists());
    lab.ok(&["checkpoint-delete", "vm", "c1", "--metadata"]);
    lab.ok(&["checkpoint-list", "vm", "--name"]);
    lab.ok(&["checkpoint-create-as", "vm", "c4"]);
    assert!(
        mark.exists(),
        "in step again once the lost checkpoint is gone"
    );

    // A command QEMU refused something leaves no mark.
    qmp(
        &lab,
        "block-dirty-bitmap-add",
        json!({"node": "vbk-vda-0-format", "name": "c5", "persistent": true}),
    );
    let err = lab.fails(&["checkpoint-create-as", "vm", "c5"]);
    assert!(err.contains("c5"), "{err}");
    assert!(!mark.exists());
    lab.ok(&["checkpoint-create-as", "vm", "c6"]);
    assert!(mark.exists());
    lab.ok(&["shutdown", "vm"]);
    assert!(!mark.exists(), "a stopped daemon leaves no mark");
}
