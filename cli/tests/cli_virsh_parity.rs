//! virsh's flags and outputs that people notice, against a managed domain on real
//! qemu-storage-daemon: `checkpoint-edit`, `checkpoint-list --from --descendants`, `--xpath`
//! and `--wrap` of the dumpxml commands, `domjobinfo`'s `--completed` semantics with
//! `--keep-completed`, `--rawstats` and `--anystats`, and libvirt's labels and numbers. The
//! tests fail when the QEMU tools are missing.

mod support;

use support::Lab;

fn lab() -> Lab {
    let lab = Lab::new("virsh parity").expect("the QEMU tools are installed");
    lab.define_vm("vda.qcow2", 16);
    lab.ok(&["start", "vm"]);
    lab
}

/// An editor script that runs `sed EXPR` on the file it is given.
fn sed_editor(lab: &Lab, name: &str, expr: &str) -> String {
    let path = lab.file(name, &format!("#!/bin/sh\nsed -i \"{expr}\" \"$1\"\n"));
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

fn edit(lab: &Lab, editor: &str) -> std::process::Output {
    lab.cmd(&["checkpoint-edit", "vm", "c1"])
        .env_remove("VISUAL")
        .env("EDITOR", editor)
        .output()
        .expect("run")
}

#[test]
fn checkpoint_edit_redefines_a_valid_edit_and_keeps_an_invalid_one_unapplied() {
    let lab = lab();
    lab.ok(&["checkpoint-create-as", "vm", "c1", "old words"]);

    let out = edit(&lab, "true");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Checkpoint c1 XML configuration not changed.\n"
    );

    let out = edit(&lab, &sed_editor(&lab, "good.sh", "s/old words/new words/"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Domain checkpoint c1 edited.\n"
    );
    let xml = lab.ok(&["checkpoint-dumpxml", "vm", "c1", "--no-domain"]);
    assert!(
        xml.contains("<description>new words</description>"),
        "{xml}"
    );

    let out = edit(
        &lab,
        &sed_editor(&lab, "bad.sh", "s|<disks>|<disks><bogus/>|"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checkpoint c1 not changed; the edited XML is kept in '"),
        "{err}"
    );
    let kept = err.split('\'').nth_back(1).expect("a kept file");
    assert!(
        std::fs::read_to_string(kept)
            .expect("kept")
            .contains("<bogus/>")
    );
    std::fs::remove_file(kept).expect("remove");
    let xml = lab.ok(&["checkpoint-dumpxml", "vm", "c1", "--no-domain"]);
    assert!(
        xml.contains("<description>new words</description>"),
        "{xml}"
    );

    let out = edit(
        &lab,
        &sed_editor(&lab, "rename.sh", "s|<name>c1<|<name>c9<|"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot rename checkpoint c1 to c9"), "{err}");
    let kept = err.split('\'').nth_back(1).expect("a kept file");
    std::fs::remove_file(kept).expect("remove");
}

#[test]
fn checkpoint_list_from_shows_children_or_all_descendants_and_parent_with_tree_is_refused() {
    let lab = lab();
    for c in ["c1", "c2", "c3"] {
        lab.ok(&["checkpoint-create-as", "vm", c]);
    }
    assert_eq!(
        lab.ok(&["checkpoint-list", "vm", "--from", "c1", "--name"]),
        "c2\n"
    );
    assert_eq!(
        lab.ok(&[
            "checkpoint-list",
            "vm",
            "--from",
            "c1",
            "--descendants",
            "--name"
        ]),
        "c2\nc3\n"
    );
    assert!(
        lab.fails(&["checkpoint-list", "vm", "--from", "nope"])
            .contains("no domain checkpoint with matching name 'nope'")
    );
    // virsh's wording, whichever order the options come in, and before the domain is looked up.
    for args in [
        ["checkpoint-list", "vm", "--parent", "--tree"],
        ["checkpoint-list", "vm", "--tree", "--parent"],
        ["checkpoint-list", "nosuchvm", "--parent", "--tree"],
    ] {
        let out = lab.run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "error: Options --parent and --tree are mutually exclusive\n"
        );
    }
}

#[test]
fn dumpxml_xpath_prints_the_selected_nodes_and_wrap_wraps_them() {
    let lab = lab();
    let file = lab.file(
        "c1.xml",
        "<domaincheckpoint><name>c1</name><description>one</description></domaincheckpoint>",
    );
    assert_eq!(
        lab.ok(&["checkpoint-create", "vm", &file]),
        format!("Domain checkpoint c1 created from '{file}'\n")
    );
    let dump = |extra: &[&str]| {
        let mut args = vec!["checkpoint-dumpxml", "vm", "c1"];
        args.extend(extra);
        lab.ok(&args)
    };
    assert_eq!(
        dump(&["--xpath", "/domaincheckpoint/name"]),
        "<name>c1</name>\n"
    );
    assert_eq!(dump(&["--xpath", "//disk/@bitmap"]), "c1\n");
    assert_eq!(
        dump(&["--xpath", "//disk[@name='vda']", "--wrap"]),
        "<nodes>\n  <disk name='vda' checkpoint='bitmap' bitmap='c1'/>\n</nodes>\n"
    );
    assert_eq!(
        dump(&["--security-info", "--no-domain"]),
        dump(&["--no-domain"])
    );
    assert_eq!(dump(&["--xpath", "//domain/name/text()"]), "vm\n");
    assert!(
        lab.fails(&["checkpoint-dumpxml", "vm", "c1", "--xpath", "count(//disk)"])
            .contains("functions are not supported")
    );

    let socket = vbackup_qemu::qsd::RunDir::new(lab.state().join("run/vm")).nbd_socket;
    let pull = lab.file(
        "pull.xml",
        &format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/></domainbackup>",
            socket.display()
        ),
    );
    lab.ok(&["backup-begin", "vm", &pull]);
    assert_eq!(
        lab.ok(&["backup-dumpxml", "vm", "--xpath", "//disk/@exportname"]),
        "vda\n"
    );
    assert_eq!(
        lab.ok(&[
            "backup-dumpxml",
            "--domain",
            "vm",
            "--xpath",
            "/domainbackup/server",
            "--wrap"
        ]),
        format!(
            "<nodes>\n  <server transport='unix' socket='{}'/>\n</nodes>\n",
            socket.display()
        )
    );
    lab.ok(&["domjobabort", "vm"]);
}

#[test]
fn domjobinfo_completed_is_shown_once_unless_kept_in_libvirts_format() {
    let lab = lab();
    lab.guest_write("vm", "vda", 1, "0", "1M");
    let target = lab.path("full.qcow2");
    let push = lab.file(
        "push.xml",
        &format!(
            "<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='{}'/><driver type='qcow2'/></disk></disks></domainbackup>",
            target.display()
        ),
    );
    lab.ok(&["backup-begin", "vm", &push, "--wait"]);
    let raw = lab.ok(&[
        "domjobinfo",
        "vm",
        "--completed",
        "--keep-completed",
        "--rawstats",
    ]);
    assert!(
        raw.starts_with("Job type: 3\n\noperation: 9\ntime_elapsed: "),
        "{raw}"
    );
    assert!(raw.contains("\ndisk_total: 16777216\n"), "{raw}");
    let kept = lab.ok(&["domjobinfo", "vm", "--completed", "--keep-completed"]);
    let lines: Vec<&str> = kept.lines().collect();
    assert_eq!(lines[0], "Job type:         Completed   ");
    assert_eq!(lines[1], "Operation:        Backup      ");
    assert!(lines[2].starts_with("Time elapsed:     ") && lines[2].ends_with(" ms"));
    assert_eq!(
        &lines[3..],
        [
            "File processed:   16.000 MiB",
            "File remaining:   0.000 B",
            "File total:       16.000 MiB",
        ]
    );
    let json = lab.json(&[
        "domjobinfo",
        "vm",
        "--completed",
        "--keep-completed",
        "--json",
    ]);
    assert_eq!(json["diskTotalBytes"], 16 << 20);
    // Shown once more without --keep-completed, then gone, as in libvirt.
    assert_eq!(lab.ok(&["domjobinfo", "vm", "--completed"]), kept);
    assert_eq!(
        lab.ok(&["domjobinfo", "vm", "--completed"]),
        "Job type:         None        \n"
    );

    // A pull backup ended by abort completes with libvirt's error message; while it runs,
    // there are no completed statistics.
    let socket = vbackup_qemu::qsd::RunDir::new(lab.state().join("run/vm")).nbd_socket;
    let pull = lab.file(
        "pull.xml",
        &format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/></domainbackup>",
            socket.display()
        ),
    );
    lab.ok(&["backup-begin", "vm", &pull]);
    assert_eq!(
        lab.ok(&["domjobinfo", "vm", "--completed"]),
        "Job type:         None        \n"
    );
    let during = lab.ok(&["domjobinfo", "vm"]);
    assert!(
        during.starts_with("Job type:         Unbounded   \n"),
        "{during}"
    );
    assert!(
        during.contains("\nTemporary disk space total: 16.000 MiB\n"),
        "{during}"
    );
    lab.ok(&["domjobabort", "vm"]);
    let done = lab.ok(&["domjobinfo", "vm", "--completed"]);
    assert!(
        done.starts_with("Job type:         Completed   \n"),
        "{done}"
    );
    assert!(
        done.ends_with("\nError message:    Operation canceled\n"),
        "{done}"
    );
}

#[test]
fn a_push_target_that_exists_is_refused_as_libvirt_does_and_reuse_external_writes_into_it() {
    let lab = lab();
    let target = lab.image("full.qcow2", 16);
    let push = lab.file(
        "push.xml",
        &format!(
            "<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='{}'/><driver type='qcow2'/></disk></disks></domainbackup>",
            target.display()
        ),
    );
    let err = lab.fails(&["backup-begin", "vm", &push]);
    assert!(
        err.starts_with(&format!(
            "error: invalid argument: store '{}' for backup of 'vda' exists",
            target.display()
        )),
        "{err}"
    );
    assert_eq!(
        lab.ok(&["domjobinfo", "vm"]),
        "Job type:         None        \n"
    );
    lab.ok(&["backup-begin", "vm", &push, "--reuse-external", "--wait"]);
}

/// Every object key of a `--json` answer, at any depth.
fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                keys(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn every_reporting_command_answers_json_in_camel_case() {
    let lab = lab();
    let target = lab.path("backups");
    lab.ok(&[
        "backup-set-default-target",
        "vm",
        target.to_str().expect("utf-8"),
    ]);
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);
    let created = lab.json(&["backup-create", "vm", "--wait", "--json"]);
    let uuid = created["uuid"].as_str().expect("uuid").to_owned();
    let restored_dir = lab.path("restored");
    let answers = vec![
        created,
        lab.json(&["list", "--json"]),
        lab.json(&["domblklist", "vm", "--json"]),
        lab.json(&["checkpoint-list", "vm", "--json"]),
        lab.json(&["checkpoint-info", "vm", "c1", "--json"]),
        lab.json(&["checkpoint-dumpxml", "vm", "c1", "--json"]),
        lab.json(&["checkpoint-parent", "vm", &uuid, "--json"]),
        lab.json(&["domjobinfo", "vm", "--completed", "--json"]),
        lab.json(&["backup-list", "vm", "--json"]),
        lab.json(&["backup-info", &uuid, "--json"]),
        lab.json(&["backup-verify", &uuid, "--json"]),
        lab.json(&["backup-consolidate", &uuid, "--json"]),
        lab.json(&[
            "backup-restore",
            &uuid,
            "--dir",
            restored_dir.to_str().expect("utf-8"),
            "--json",
        ]),
        lab.json(&["backup-delete", &uuid, "--json"]),
    ];
    let mut all = Vec::new();
    for a in &answers {
        keys(a, &mut all);
    }
    let snake: Vec<&String> = all.iter().filter(|k| k.contains('_')).collect();
    assert!(snake.is_empty(), "snake_case keys: {snake:?}");
    assert!(all.iter().any(|k| k == "creationTime"));
    assert_eq!(answers[11]["consolidated"], false);
    assert_eq!(answers[12]["disks"][0]["disk"], "vda");
    assert_eq!(answers[13]["deleted"][0].as_str(), Some(uuid.as_str()));

    let valid = lab.file(
        "c.xml",
        "<domaincheckpoint><name>x</name></domaincheckpoint>",
    );
    let invalid = lab.file("bad.xml", "<domaincheckpoint><bogus/></domaincheckpoint>");
    let out = lab.run(&["xml", "validate", &valid, &invalid, "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["valid"], true);
    assert_eq!(v[0]["root"], "domaincheckpoint");
    assert_eq!(v[1]["valid"], false);
    assert!(v[1]["errors"][0]["line"].as_u64().is_some(), "{v}");
}

#[test]
fn errors_say_what_to_do_next_and_commands_say_where_they_write() {
    let lab = lab();
    assert!(
        lab.fails(&["start", "vm"])
            .contains("Requested operation is not valid: domain 'vm' is already running")
    );
    let err = lab.fails(&["define", "other"]);
    assert!(
        err.contains("--disk vda=") && err.contains("--qmp "),
        "{err}"
    );
    let err = lab.fails(&["checkpoint-create-as", "vm", "a/b"]);
    assert!(
        err.starts_with("error: invalid argument: NAME (--name): "),
        "{err}"
    );
    let err = lab.fails(&["checkpoint-create-as", "vm", "c0", "--diskspec", "vdz"]);
    assert!(
        err.starts_with("error: invalid argument: --diskspec: "),
        "{err}"
    );
    let bad = lab.file("bad.xml", "<domaincheckpoint><bogus/></domaincheckpoint>");
    let err = lab.fails(&["checkpoint-create", "vm", &bad]);
    assert!(
        err.starts_with(&format!("error: XML error: {bad}:1:")),
        "{err}"
    );

    let out = lab.ok(&["backup-begin", "vm", "--wait"]);
    assert!(out.starts_with("Backup started; writing vda to "), "{out}");

    assert!(
        lab.fails(&["backup-get-default-target", "vm"])
            .contains("backup-set-default-target vm DIR")
    );
    let target = lab.path("backups");
    let target = target.to_str().expect("utf-8");
    lab.ok(&["backup-set-default-target", "vm", target]);
    assert_eq!(
        lab.ok(&["backup-get-default-target", "vm"]),
        format!("{target}\n")
    );
    let started = lab.ok(&["backup-create", "vm"]);
    assert!(
        started.contains("run 'vbackup backup-finish vm'"),
        "{started}"
    );
    let uuid = started
        .split_whitespace()
        .nth(1)
        .expect("the started backup's uuid")
        .to_owned();
    let note = format!("Not yet recorded: backup {uuid} (");
    let info = lab.ok(&["domjobinfo", "vm"]);
    assert!(info.contains(&note), "{info}");
    assert!(lab.ok(&["backup-list", "vm"]).contains(&note));
    assert_eq!(
        lab.json(&["domjobinfo", "vm", "--json"])["pendingBackup"],
        uuid.as_str()
    );
    let full = lab.json(&["backup-finish", "vm", "--json"])["uuid"]
        .as_str()
        .expect("uuid")
        .to_owned();
    lab.ok(&["backup-create", "vm", "--parent", &full, "--wait"]);
    let err = lab.fails(&["backup-delete", &full]);
    assert!(
        err.contains(&format!("backup-delete {full} --children"))
            && err.contains("backup-consolidate"),
        "{err}"
    );

    lab.ok(&["shutdown", "vm"]);
    assert!(
        lab.fails(&["shutdown", "vm"])
            .contains("Requested operation is not valid: domain 'vm' is not running")
    );
    let help = lab.ok(&["checkpoint-list", "--help"]);
    assert!(help.contains("\nGlobal options:\n"), "{help}");
}

#[test]
fn a_daemon_that_dies_under_a_waiting_backup_is_named_with_the_next_command() {
    let lab = lab();
    let socket = vbackup_qemu::qsd::RunDir::new(lab.state().join("run/vm")).nbd_socket;
    let pull = lab.file(
        "pull.xml",
        &format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/></domainbackup>",
            socket.display()
        ),
    );
    let follower = lab
        .cmd(&["backup-begin", "vm", &pull, "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let progress = lab.state().join("domains/vm/job-progress.json");
    assert!(
        support::wait_until(
            std::time::Duration::from_secs(20),
            std::time::Duration::from_millis(20),
            || progress.is_file()
        ),
        "the follower runs the job"
    );
    for pid in lab.daemon_pids() {
        support::kill_and_wait(pid);
    }
    let out = follower.wait_with_output().expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: the storage daemon (or QEMU) stopped while the command ran")
            && err.contains("'vbackup domjobinfo vm'")
            && err.contains("'vbackup start vm'"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_1_as_virsh_does_and_help_exits_0() {
    let lab = Lab::new("usage").expect("the QEMU tools are installed");
    assert_eq!(
        lab.run(&["checkpoint-list", "--bogus"]).status.code(),
        Some(1)
    );
    assert_eq!(
        lab.run(&["checkpoint-list", "--help"]).status.code(),
        Some(0)
    );
    let err = lab.fails(&["--wait-lock", "1", "domjobinfo", "vm"]);
    assert!(err.contains("'domjobinfo' never waits"), "{err}");
}

#[test]
fn an_image_locked_by_another_process_is_named_with_its_holder() {
    let lab = Lab::new("locked image").expect("the QEMU tools are installed");
    let image = lab.define_vm("vda.qcow2", 16);
    let socket = lab.path("holder.sock");
    let mut holder = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "--socket"])
        .arg(&socket)
        .arg(&image)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    support::wait_until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || socket.exists(),
    );
    let err = lab.fails(&["start", "vm"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        err.contains(&format!(
            "error: image '{}' is in use by process {} (qemu-nbd ",
            image.display(),
            holder.id()
        )),
        "{err}"
    );
}
