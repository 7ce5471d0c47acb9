//! How the command line reads its arguments: virsh's positional-or-named forms and
//! `--wait-lock`, before or after the command. No QEMU needed.

use std::process::{Command, Output, Stdio};

fn vbackup(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vbackup"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .expect("run vbackup")
}

/// stdout of a command that succeeds.
fn ok(state: &std::path::Path, args: &[&str]) -> String {
    let out = vbackup(state, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// stderr of a command that fails.
fn fails(state: &std::path::Path, args: &[&str]) -> String {
    let out = vbackup(state, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8(out.stderr).expect("utf-8")
}

#[test]
fn positional_values_fill_the_arguments_not_given_by_name_in_order() {
    let state = tempfile::tempdir().expect("tempdir");
    let xml = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--print-xml"]);
        ok(state.path(), &args)
    };
    let both = "<name>c1</name>\n  <description>d</description>";
    // The named form takes its argument; the positional values go to the next ones.
    let named_domain = xml(&["checkpoint-create-as", "--domain", "vm", "c1", "d"]);
    assert!(named_domain.contains(both), "{named_domain}");
    let named_name = xml(&["checkpoint-create-as", "vm", "--name", "c1", "d"]);
    assert!(named_name.contains(both), "{named_name}");
    let named_description = xml(&["checkpoint-create-as", "--description", "d", "vm", "c1"]);
    assert!(named_description.contains(both), "{named_description}");
}

#[test]
fn a_positional_value_left_over_is_refused_as_virsh_does() {
    let state = tempfile::tempdir().expect("tempdir");
    let err = fails(state.path(), &["start", "--domain", "vm", "other"]);
    assert_eq!(err, "error: unexpected data 'other'\n");
}

#[test]
fn a_missing_required_argument_names_both_forms() {
    let state = tempfile::tempdir().expect("tempdir");
    let err = fails(state.path(), &["start"]);
    assert_eq!(
        err,
        "error: command 'start' requires <domain> option (give it by position or as --domain)\n"
    );
}

#[test]
fn the_domain_comes_from_either_argument_form() {
    let state = tempfile::tempdir().expect("tempdir");
    let missing = "error: failed to get domain 'web1'\n";
    for args in [
        &["backup-begin", "web1"][..],
        &["backup-begin", "--domain", "web1"],
        // The named form takes the domain; the positional value goes to the next argument.
        &["checkpoint-delete", "--domain", "web1", "c1"],
        &["backup-create", "web1"],
    ] {
        assert_eq!(fails(state.path(), args), missing, "{args:?}");
    }
    assert!(ok(state.path(), &["list"]).starts_with(" Name"));
}

#[test]
fn wait_lock_goes_before_the_command_or_with_one_that_waits_but_not_with_a_reader() {
    let state = tempfile::tempdir().expect("tempdir");
    // Another vbackup holds domain vm.
    std::fs::create_dir_all(state.path().join("locks")).expect("locks");
    let lock = std::fs::File::create(state.path().join("locks/vm.lock")).expect("lock file");
    lock.lock().expect("lock");
    let waits = "note: domain \"vm\" is locked by another vbackup operation; waiting up to 1 s\n";
    for args in [
        &["--wait-lock", "1", "start", "vm"][..],
        &["start", "vm", "--wait-lock", "1"],
        &["checkpoint-create-as", "--wait-lock", "1", "vm", "c1"],
        &["backup-create", "vm", "--wait-lock", "1"],
    ] {
        let err = fails(state.path(), args);
        assert!(err.starts_with(waits), "{args:?}: {err}");
    }
    let err = fails(state.path(), &["start", "vm"]);
    assert!(!err.contains("waiting"), "{err}");
    // Before a reader it parses, so that it is refused with its reason.
    let err = fails(state.path(), &["--wait-lock", "5", "list"]);
    assert!(
        err.contains("'list' never waits for the domain lock"),
        "{err}"
    );
    let err = fails(state.path(), &["domjobinfo", "vm", "--wait-lock", "5"]);
    assert!(
        err.starts_with("error: unexpected argument '--wait-lock'"),
        "{err}"
    );
    for name in ["xml", "completion", "man"] {
        let help = ok(state.path(), &[name, "--help"]);
        assert!(!help.contains("--wait-lock"), "{name} offers --wait-lock");
    }
}
