//! Shell completion and manual pages come from the command definitions: every command and
//! virsh's named arguments appear in them. No QEMU needed.

use std::process::{Command, Output, Stdio};

fn vbackup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vbackup"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vbackup")
}

fn ok(args: &[&str]) -> String {
    let out = vbackup(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn completion_scripts_know_every_command_and_virshs_named_arguments() {
    let bash = ok(&["completion", "bash"]);
    for word in [
        "checkpoint-edit",
        "checkpoint-dumpxml",
        "backup-get-default-target",
        "--checkpointname",
        "--xpath",
        "--keep-completed",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    assert!(ok(&["completion", "zsh"]).contains("checkpoint-edit"));
    assert!(ok(&["completion", "fish"]).contains("checkpoint-edit"));
}

#[test]
fn the_manual_has_a_page_for_vbackup_and_one_per_command() {
    let page = ok(&["man"]);
    assert!(
        page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH vbackup"),
        "{page}"
    );
    assert!(page.contains("checkpoint\\-edit"), "{page}");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ok(&["man", "--dir", dir.path().to_str().expect("utf-8")]);
    assert!(out.starts_with("Manual pages written to "));
    let edit = std::fs::read_to_string(dir.path().join("vbackup-checkpoint-edit.1"))
        .expect("a page per command");
    assert!(edit.contains("checkpointname"), "{edit}");
    assert!(dir.path().join("vbackup.1").is_file());
}

#[test]
fn wait_lock_is_offered_by_the_commands_that_wait_and_not_by_the_readers() {
    // The readers refuse it (they never wait for a domain's lock), so neither their help nor
    // the completion scripts offer it.
    let readers = [
        "list",
        "domblklist",
        "checkpoint-list",
        "checkpoint-parent",
        "checkpoint-info",
        "backup-dumpxml",
        "domjobinfo",
    ];
    for name in readers {
        let help = ok(&[name, "--help"]);
        assert!(!help.contains("--wait-lock"), "{name}: {help}");
    }
    for name in [
        "start",
        "checkpoint-create-as",
        "backup-begin",
        "backup-create",
    ] {
        let help = ok(&[name, "--help"]);
        assert!(help.contains("--wait-lock <SECONDS>"), "{name}: {help}");
    }
    assert!(ok(&["--help"]).contains("--wait-lock <SECONDS>"));
    let zsh = ok(&["completion", "zsh"]);
    let list = zsh
        .split("\n(list)\n")
        .nth(1)
        .and_then(|rest| rest.split(";;").next())
        .expect("zsh completion for list");
    assert!(
        list.contains("--json") && !list.contains("--wait-lock"),
        "{list}"
    );
}
