//! The rules of issue 11 outside the managed-backup workflow, through the `vbackup` binary
//! against real qemu-storage-daemon: nothing takes over an existing domain, a damaged job
//! journal still lets the job be ended, disks left out of backups need no checkpoint, and a
//! grown disk backs up by pull as by push. Each test has its own state directory and small
//! images and stops every process it caused (see [`Lab`]'s drop).

mod support;

use std::process::Command;

use support::{Lab, tool};

/// The `Source` column of `domblklist vm`'s `vda` row.
fn vda_source(lab: &Lab) -> String {
    let out = lab.ok(&["domblklist", "vm"]);
    out.lines()
        .find_map(|l| l.trim().strip_prefix("vda"))
        .map(|s| s.trim().to_owned())
        .expect("vda is listed")
}

#[test]
fn define_refuses_an_existing_domain_name_and_duplicate_disk_targets() {
    let Some(lab) = Lab::new("live rules test") else {
        return;
    };
    let first = lab.define_vm("vda.qcow2", 16);
    let other = lab.image("other.qcow2", 16);
    let other_spec = format!("vda={}", other.display());
    // By name, with no checkpoint or backup yet: still refused, naming the domain.
    let err = lab.fails(&["define", "vm", "--disk", &other_spec]);
    assert!(err.contains("domain 'vm' already exists"), "{err}");
    assert_eq!(vda_source(&lab), first.display().to_string());
    // From an XML file naming the same domain.
    let xml = lab.file(
        "vm.xml",
        &format!(
            "<domain type='kvm'><name>vm</name><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda'/></disk></devices></domain>",
            other.display()
        ),
    );
    let err = lab.fails(&["define", &xml]);
    assert!(err.contains("domain 'vm' already exists"), "{err}");
    assert_eq!(vda_source(&lab), first.display().to_string());
    // Two disks with one target.
    let err = lab.fails(&[
        "define",
        "vm2",
        "--disk",
        &other_spec,
        "--disk",
        &format!("vda={}", lab.image("third.qcow2", 16).display()),
    ]);
    assert!(err.contains("'vda'") && err.contains("twice"), "{err}");
    let list = lab.ok(&["list"]);
    assert!(!list.contains("vm2"), "{list}");
    // After undefine the name is free again.
    lab.ok(&["undefine", "vm"]);
    lab.ok(&["define", "vm", "--disk", &other_spec]);
    assert_eq!(vda_source(&lab), other.display().to_string());
}

/// A raw image of `mib` MiB in the lab.
fn raw_image(lab: &Lab, name: &str, mib: u64) -> std::path::PathBuf {
    let p = lab.path(name);
    tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&p)
            .arg(format!("{mib}M")),
    );
    p
}

/// The uuid `backup-create` prints.
fn created_uuid(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Backup ")?.split_whitespace().next())
        .expect("backup-create prints the uuid")
        .to_owned()
}

#[test]
fn a_raw_disk_left_out_of_managed_backups_needs_no_checkpoint_bitmap() {
    let Some(lab) = Lab::new("live rules test") else {
        return;
    };
    let vda = lab.image("vda.qcow2", 16);
    let vdb = raw_image(&lab, "vdb.raw", 8);
    lab.ok(&[
        "define",
        "vm",
        "--disk",
        &format!("vda={}", vda.display()),
        "--disk",
        &format!("vdb={},format=raw", vdb.display()),
    ]);
    let target = lab.path("backups");
    std::fs::create_dir_all(&target).expect("target");
    lab.ok(&[
        "backup-set-default-target",
        "vm",
        target.to_str().expect("utf-8"),
    ]);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 1, "0", "1M");
    let only_vda = lab.file(
        "only-vda.xml",
        "<domainbackup><disks><disk name='vda' backup='yes' type='file'/><disk name='vdb' backup='no'/></disks></domainbackup>",
    );
    let full = created_uuid(&lab.ok(&["backup-create", "vm", &only_vda, "--wait"]));
    // The checkpoint tracks exactly the disk that was backed up.
    let checkpoint = lab.json(&["backup-info", &full, "--json"])["checkpoint"]
        .as_str()
        .expect("a checkpoint")
        .to_owned();
    let xml = lab.ok(&["checkpoint-dumpxml", "vm", &checkpoint]);
    assert!(xml.contains("<disk name='vdb' checkpoint='no'/>"), "{xml}");
    assert!(
        xml.contains("<disk name='vda' checkpoint='bitmap'"),
        "{xml}"
    );
    // An incremental from it works, by push and by pull.
    lab.guest_write("vm", "vda", 2, "2M", "1M");
    let push = created_uuid(&lab.ok(&[
        "backup-create",
        "vm",
        &only_vda,
        "--parent",
        &full,
        "--wait",
    ]));
    lab.guest_write("vm", "vda", 3, "4M", "1M");
    created_uuid(&lab.ok(&[
        "backup-create",
        "vm",
        &only_vda,
        "--parent",
        &push,
        "--pull",
    ]));
    // The same without a backup XML given to backup-begin: a checkpoint XML naming no disk
    // tracks only the disks the backup copies.
    let cp = lab.file(
        "cp.xml",
        "<domaincheckpoint><name>by-begin</name></domaincheckpoint>",
    );
    let push_xml = lab.file(
        "push.xml",
        &format!(
            "<domainbackup><disks><disk name='vda' type='file'><target file='{}'/></disk><disk name='vdb' backup='no'/></disks></domainbackup>",
            lab.path("begin-vda.qcow2").display()
        ),
    );
    lab.ok(&["backup-begin", "vm", &push_xml, &cp, "--wait"]);
    let xml = lab.ok(&["checkpoint-dumpxml", "vm", "by-begin"]);
    assert!(xml.contains("<disk name='vdb' checkpoint='no'/>"), "{xml}");
}

/// The guest's view of `vm`'s `vda` now, as a qcow2 copy.
fn vda_now(lab: &Lab, name: &str) -> std::path::PathBuf {
    lab.snapshot("vm", "vda", name)
}

#[test]
fn a_grown_disk_backs_up_incrementally_by_pull_as_by_push() {
    let Some(lab) = Lab::new("live rules test") else {
        return;
    };
    for pull in [true, false] {
        let image = lab.define_vm("vda.qcow2", 16);
        let target = lab.path("backups");
        std::fs::create_dir_all(&target).expect("target");
        lab.ok(&[
            "backup-set-default-target",
            "vm",
            target.to_str().expect("utf-8"),
        ]);
        lab.ok(&["start", "vm"]);
        lab.guest_write("vm", "vda", 1, "0", "1M");
        let full = created_uuid(&lab.ok(&["backup-create", "vm", "--wait"]));
        // The disk grows while the domain is shut down, and the guest writes past the old end.
        lab.ok(&["shutdown", "vm"]);
        tool(
            Command::new("qemu-img")
                .args(["resize", "-q"])
                .arg(&image)
                .arg("24M"),
        );
        lab.ok(&["start", "vm"]);
        lab.guest_write("vm", "vda", 2, "15M", "2M");
        lab.guest_write("vm", "vda", 3, "20M", "1M");
        let mode = if pull { "--pull" } else { "--wait" };
        let inc = created_uuid(&lab.ok(&["backup-create", "vm", "--parent", &full, mode]));
        let expected = vda_now(&lab, &format!("expected-{pull}.qcow2"));
        let restored_dir = lab.path(&format!("restored-{pull}"));
        lab.ok(&[
            "backup-restore",
            &inc,
            "--dir",
            restored_dir.to_str().expect("utf-8"),
        ]);
        let restored = restored_dir.join("vda.qcow2");
        assert!(
            support::identical(&restored, &expected),
            "the {} incremental of the grown disk restores to other data",
            if pull { "pull" } else { "push" }
        );
        lab.ok(&["shutdown", "vm"]);
        lab.ok(&[
            "undefine",
            "vm",
            "--checkpoints-metadata",
            "--remove-all-backups",
        ]);
        std::fs::remove_file(&image).expect("remove image");
    }
}

/// Defines and starts `vm` (16 MiB `vda`) with a default backup target.
fn started_vm(lab: &Lab) {
    lab.define_vm("vda.qcow2", 16);
    let target = lab.path("backups");
    std::fs::create_dir_all(&target).expect("target");
    lab.ok(&[
        "backup-set-default-target",
        "vm",
        target.to_str().expect("utf-8"),
    ]);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 1, "0", "1M");
}

/// Damages `vm`'s job journal as a torn write would; returns its path.
fn damage_journal(lab: &Lab) -> std::path::PathBuf {
    let journal = lab.state().join("domains/vm/journal.json");
    let text = std::fs::read_to_string(&journal).expect("a job is journaled");
    std::fs::write(&journal, &text[..text.len() / 2]).expect("truncate");
    journal
}

#[test]
fn a_damaged_journal_still_lets_domjobabort_and_backup_finish_cancel_end_the_job() {
    let Some(lab) = Lab::new("live rules test") else {
        return;
    };
    started_vm(&lab);
    // A pull backup runs until it is aborted.
    let socket = vbackup_qemu::qsd::RunDir::new(lab.state().join("run").join("vm")).nbd_socket;
    let pull = lab.file(
        "pull.xml",
        &format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/></domainbackup>",
            socket.display()
        ),
    );
    lab.ok(&["backup-begin", "vm", &pull]);
    let journal = damage_journal(&lab);
    // Other commands still refuse to guess, naming the file.
    let err = lab.fails(&["domjobinfo", "vm"]);
    assert!(err.contains("journal"), "{err}");
    let out = lab.run(&["domjobabort", "vm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&journal.display().to_string()), "{stderr}");
    assert!(!journal.exists());
    assert!(lab.ok(&["domjobinfo", "vm"]).contains("None"));
    // The domain is usable again: still running (it was started), and a new backup works.
    assert!(lab.ok(&["list"]).contains("running"));
    lab.ok(&["backup-create", "vm", "--wait"]);

    // A managed backup left running, then its journal damaged: backup-finish --cancel ends it.
    let before = lab.json(&["backup-list", "vm", "--json"]);
    lab.ok(&["backup-create", "vm"]);
    let journal = damage_journal(&lab);
    let out = lab.run(&["backup-finish", "vm", "--cancel"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&journal.display().to_string()), "{stderr}");
    assert!(!journal.exists());
    assert_eq!(lab.json(&["backup-list", "vm", "--json"]), before);
    lab.ok(&["backup-create", "vm", "--wait"]);
}

#[test]
fn a_damaged_journal_of_an_attached_qemu_lets_domjobabort_dismiss_its_backup_job() {
    use vbackup_core::model::ImageFormat;
    use vbackup_qemu::qsd::QsdDisk;
    let Some(lab) = Lab::new("live rules test") else {
        return;
    };
    let mut qemu = vbackup_qemu::live::LiveLab::new().expect("live lab");
    let img = lab.image("a.qcow2", 16);
    let qsd = qemu
        .start_qsd("q", &[QsdDisk::single("vda", &img, ImageFormat::Qcow2)])
        .expect("start qemu-storage-daemon");
    let qmp = qsd.run_dir().qmp_socket.display().to_string();
    // The monitor serves one client: vbackup's turn.
    drop(qsd);
    lab.ok(&[
        "define",
        "vm",
        "--disk",
        &format!("vda={}", img.display()),
        "--qmp",
        &qmp,
    ]);
    let push = |name: &str| {
        lab.file(
            &format!("{name}.xml"),
            &format!(
                "<domainbackup><disks><disk name='vda' type='file'><target file='{}'/><driver type='qcow2'/></disk></disks></domainbackup>",
                lab.path(&format!("{name}.qcow2")).display()
            ),
        )
    };
    // Without --wait the job stays journaled (and, once done, concluded in QEMU) until a
    // later command sees it end.
    lab.ok(&["backup-begin", "vm", &push("first")]);
    let journal = damage_journal(&lab);
    let out = lab.run(&["domjobabort", "vm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&journal.display().to_string()), "{stderr}");
    assert!(!journal.exists());
    // QEMU holds no backup job any more: a new backup runs.
    lab.ok(&["backup-begin", "vm", &push("second"), "--wait"]);
    let again = qemu.reconnect("q").expect("the daemon still runs");
    again.quit().expect("quit");
    qemu.reap_exited();
}

#[test]
fn restore_to_a_new_domain_refuses_an_existing_name_before_writing_anything() {
    let Some(lab) = Lab::new("live rules test") else {
        return;
    };
    started_vm(&lab);
    let uuid = created_uuid(&lab.ok(&["backup-create", "vm", "--wait"]));
    let source = vda_source(&lab);
    for existing in ["vm", "other"] {
        if existing == "other" {
            let img = lab.image("other.qcow2", 16);
            lab.ok(&[
                "define",
                "other",
                "--disk",
                &format!("vda={}", img.display()),
            ]);
        }
        let dir = lab.path(&format!("restored-{existing}"));
        let err = lab.fails(&[
            "backup-restore",
            &uuid,
            "--dir",
            dir.to_str().expect("utf-8"),
            "--new-domain",
            existing,
        ]);
        assert!(
            err.contains(&format!("domain '{existing}' already exists")),
            "{err}"
        );
        assert!(!dir.join("vda.qcow2").exists(), "an image was restored");
    }
    assert_eq!(vda_source(&lab), source);
}
