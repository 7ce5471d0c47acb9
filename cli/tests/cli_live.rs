//! The `vbackup` binary against real qemu-storage-daemon, each test in its own state
//! directory. A missing QEMU tool fails the test (it never skips). Every test stops
//! the daemons it caused, even when it fails (see [`Lab`]'s drop).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{BIN, Lab, identical, kill_and_wait, tool, wait_until};
use vbackup_qemu::live::LiveLab;
use vbackup_qemu::qsd::RunDir;

fn push_xml(incremental: Option<&str>, disk: &str, target: &Path) -> String {
    let inc = incremental
        .map(|i| format!("<incremental>{i}</incremental>"))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='push'>{inc}<disks><disk name='{disk}' type='file'><target file='{}'/><driver type='qcow2'/></disk></disks></domainbackup>",
        target.display()
    )
}

/// The unix socket of the NBD server of managed domain `vm`'s daemon.
fn daemon_socket(lab: &Lab) -> String {
    RunDir::new(lab.state().join("run/vm"))
        .nbd_socket
        .display()
        .to_string()
}

/// A pull backup of domain `vm` on its daemon's NBD server (the one server it may use).
fn pull_xml(lab: &Lab, incremental: Option<&str>) -> String {
    let inc = incremental
        .map(|i| format!("<incremental>{i}</incremental>"))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='pull'>{inc}<server transport='unix' socket='{}'/></domainbackup>",
        daemon_socket(lab)
    )
}

fn checkpoint_xml(name: &str) -> String {
    format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>")
}

/// Makes the incremental image `inc` an overlay of `full`, so that it reads as the whole disk.
fn rebase_onto(inc: &Path, full: &Path) {
    tool(
        Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "qcow2", "-b"])
            .arg(full)
            .arg(inc),
    );
}

/// A full push backup of the attached domain `att` equals its guest disk now. Then the daemon,
/// which vbackup never stops since it did not start it, is quit here.
fn full_push_backup_of_attached_equals_guest(lab: &Lab, mut qemu: LiveLab, guest: &str) {
    let reference = lab.path("ref.qcow2");
    tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2", guest])
            .arg(&reference),
    );
    let full = lab.path("full.qcow2");
    let bx = lab.file("full.xml", &push_xml(None, "vda", &full));
    lab.ok(&["backup-begin", "att", &bx, "--wait"]);
    assert!(identical(&full, &reference));
    let again = qemu.reconnect("q").expect("the daemon still runs");
    again.quit().expect("quit");
    qemu.reap_exited();
}

#[test]
fn checkpoints_are_created_listed_shown_and_deleted_with_virsh_output() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    let img = lab.image("a.qcow2", 16);
    let spec = format!("vda={}", img.display());
    assert_eq!(
        lab.ok(&["define", "vm", "--disk", &spec]),
        "Domain 'vm' defined\n"
    );
    assert_eq!(lab.json(&["list", "--json"])[0]["name"], "vm");
    assert_eq!(
        lab.json(&["domblklist", "vm", "--json"])[0]["target"],
        "vda"
    );
    assert_eq!(
        lab.ok(&["checkpoint-create-as", "vm", "c1", "first"]),
        "Domain checkpoint c1 created\n"
    );
    lab.ok(&["checkpoint-create-as", "vm", "c2"]);
    lab.ok(&["checkpoint-create-as", "vm", "c3"]);
    let err = lab.fails(&["checkpoint-create-as", "vm", "c1"]);
    assert_eq!(
        err,
        "error: operation failed: domain moment c1 already exists\n"
    );

    let list = lab.json(&["checkpoint-list", "vm", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c1", "c2", "c3"]);
    assert_eq!(list[2]["parent"], "c2");
    assert_eq!(list[2]["current"], true);
    assert_eq!(
        lab.ok(&["checkpoint-list", "vm", "--tree"]),
        "c1\n  |\n  +- c2\n      |\n      +- c3\n"
    );
    assert_eq!(
        lab.ok(&["checkpoint-list", "vm", "--leaves", "--name"]),
        "c3\n"
    );
    assert_eq!(lab.ok(&["checkpoint-parent", "vm", "c2"]), "c1\n");
    assert_eq!(
        lab.json(&["checkpoint-info", "vm", "c1", "--json"])["descendants"],
        2
    );

    // The bitmaps live in the image: writing dirties them, and --size reports it.
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 1, "0", "1M");
    let dump = lab.json(&["checkpoint-dumpxml", "vm", "c3", "--size", "--json"]);
    assert_eq!(dump["disks"][0]["size"], 1 << 20);
    let xml = lab.ok(&["checkpoint-dumpxml", "vm", "c1", "--no-domain"]);
    assert!(xml.contains("<description>first</description>") && !xml.contains("<domain type"));
    assert!(
        lab.ok(&["checkpoint-dumpxml", "vm", "c1"])
            .contains("<domain type='kvm'>")
    );

    lab.ok(&["checkpoint-delete", "vm", "c2"]);
    assert_eq!(lab.ok(&["checkpoint-parent", "vm", "c3"]), "c1\n");
    lab.ok(&["checkpoint-delete", "vm", "c1", "--children-only"]);
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), "c1\n");
    let err = lab.fails(&["checkpoint-dumpxml", "vm", "c3"]);
    assert_eq!(
        err,
        "error: Domain checkpoint not found: no domain checkpoint with matching name 'c3'\n"
    );
    lab.ok(&["shutdown", "vm"]);
    assert!(lab.daemon_pids().is_empty(), "shutdown stops the daemon");
    lab.fails(&["undefine", "vm"]);
    lab.ok(&["undefine", "vm", "--checkpoints-metadata"]);
    assert_eq!(lab.json(&["list", "--json"]), Value::Array(vec![]));
}

#[test]
fn push_full_then_incremental_backups_equal_the_disk_at_their_point_in_time() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    lab.define_vm("a.qcow2", 16);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 0x11, "0", "2M");
    let t0 = lab.snapshot("vm", "vda", "t0.qcow2");
    let full = lab.path("full.qcow2");
    let bx = lab.file("full.xml", &push_xml(None, "vda", &full));
    let cx = lab.file("c1.xml", &checkpoint_xml("c1"));
    let out = lab.ok(&["backup-begin", "vm", &bx, &cx, "--wait"]);
    assert_eq!(out, "Backup started\nBackup complete\n");
    assert!(identical(&full, &t0));
    let stats = lab.json(&["domjobinfo", "vm", "--completed", "--json"]);
    assert_eq!(stats["status"], "completed");

    lab.guest_write("vm", "vda", 0x22, "8M", "1M");
    let t1 = lab.snapshot("vm", "vda", "t1.qcow2");
    let inc = lab.path("inc.qcow2");
    let bx = lab.file("inc.xml", &push_xml(Some("c1"), "vda", &inc));
    let cx = lab.file("c2.xml", &checkpoint_xml("c2"));
    lab.ok(&["backup-begin", "vm", &bx, &cx, "--wait"]);
    // The incremental image holds only the changed clusters; on top of the full one it is t1.
    rebase_onto(&inc, &full);
    assert!(identical(&inc, &t1));
    let inc_size = std::fs::metadata(&inc).unwrap().len();
    assert!(
        inc_size < 2 << 20,
        "incremental holds about 1 MiB, not {inc_size}"
    );
    lab.ok(&["shutdown", "vm"]);
}

#[test]
fn pull_backup_keeps_its_point_in_time_while_the_guest_writes_and_ends_by_abort() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    lab.define_vm("a.qcow2", 16);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 0x31, "0", "4M");
    let t0 = lab.snapshot("vm", "vda", "t0.qcow2");
    let px = lab.file("pull.xml", &pull_xml(&lab, None));
    assert_eq!(
        lab.ok(&["backup-begin", "vm", &px]),
        format!(
            "Backup started; exports served at nbd+unix:///vda?socket={}\n",
            daemon_socket(&lab)
        )
    );
    assert_eq!(lab.json(&["list", "--json"])[0]["job"], "backup");
    // The guest overwrites what the backup has not read yet.
    lab.guest_write("vm", "vda", 0x32, "0", "4M");
    let plan = lab.json(&["backup-dumpxml", "vm", "--json"]);
    let export = plan["disks"][0]["exportName"].as_str().unwrap().to_owned();
    let sock = plan["server"]["transport"]["Unix"]["socket"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            RunDir::new(lab.state().join("run/vm"))
                .nbd_socket
                .display()
                .to_string()
        });
    let copy = lab.path("pulled.qcow2");
    tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(format!("nbd+unix:///{export}?socket={sock}"))
            .arg(&copy),
    );
    assert!(identical(&copy, &t0), "the export shows the disk as it was");
    let info = lab.json(&["domjobinfo", "vm", "--json"]);
    assert_eq!(info["status"], "running");
    lab.ok(&["domjobabort", "vm"]);
    assert_eq!(
        lab.json(&["domjobinfo", "vm", "--completed", "--json"])["status"],
        "completed"
    );
    assert_eq!(lab.json(&["domjobinfo", "vm", "--json"])["status"], "none");
    let err = lab.fails(&["domjobabort", "vm"]);
    assert_eq!(
        err,
        "error: Requested operation is not valid: no job is active on the domain\n"
    );
    lab.ok(&["shutdown", "vm"]);
}

#[test]
fn a_job_survives_vbackup_being_killed_and_the_next_run_follows_it() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    lab.define_vm("a.qcow2", 16);
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);
    let px = lab.file("pull.xml", &pull_xml(&lab, Some("c1")));
    // A pull backup never ends by itself: `--wait` blocks until it is killed.
    let mut child = lab.spawn(&["backup-begin", "vm", &px, "--wait"]);
    let journal = lab.state().join("domains/vm/journal.json");
    wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        journal.is_file()
    });
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(journal.is_file(), "the job is journaled");
    assert_eq!(
        lab.daemon_pids().len(),
        1,
        "the daemon keeps the job running"
    );

    let info = lab.json(&["domjobinfo", "vm", "--json"]);
    assert_eq!(info["status"], "running");
    // The job's clock outlives the process that started it.
    let elapsed = info["timeElapsedMs"].as_u64().unwrap_or(0);
    assert!(elapsed >= 300, "elapsed {elapsed} ms");
    let xml = lab.ok(&["backup-dumpxml", "vm"]);
    assert!(xml.contains("<incremental>c1</incremental>"), "{xml}");
    lab.ok(&["domjobabort", "vm"]);
    assert!(!journal.is_file());
    assert!(
        lab.daemon_pids().is_empty(),
        "no job and not started: the daemon stops"
    );
    let list = lab.json(&["checkpoint-list", "vm", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn demo_runs_end_to_end_and_verifies_every_backup() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    let dir = lab.path("demo");
    let out = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("identical").count(), 8, "{stdout}");
    assert!(stdout.contains("restore of managed pull"), "{stdout}");
    assert!(stdout.contains("All backups match"));
    assert!(lab.daemon_pids().is_empty(), "the demo stops its daemon");
}

#[test]
fn redefine_restores_deleted_metadata_and_validate_checks_the_bitmap() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    lab.define_vm("a.qcow2", 16);
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);
    lab.ok(&["checkpoint-create-as", "vm", "c2"]);
    let saved = lab.file("c2.xml", &lab.ok(&["checkpoint-dumpxml", "vm", "c2"]));
    lab.ok(&["checkpoint-delete", "vm", "c2", "--metadata"]);
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), "c1\n");
    assert_eq!(
        lab.ok(&[
            "checkpoint-create",
            "vm",
            &saved,
            "--redefine",
            "--redefine-validate"
        ]),
        format!("Domain checkpoint c2 created from '{saved}'\n")
    );
    assert_eq!(lab.ok(&["checkpoint-parent", "vm", "c2"]), "c1\n");
    // A real delete removes the bitmap: validation now fails, a plain redefine does not look.
    lab.ok(&["checkpoint-delete", "vm", "c2"]);
    let err = lab.fails(&[
        "checkpoint-create",
        "vm",
        &saved,
        "--redefine",
        "--redefine-validate",
    ]);
    assert!(err.starts_with("error: checkpoint inconsistent: "), "{err}");
    // virsh prints the same line with or without --redefine-validate.
    assert_eq!(
        lab.ok(&["checkpoint-create", "vm", &saved, "--redefine"]),
        format!("Domain checkpoint c2 created from '{saved}'\n")
    );
    assert_eq!(
        lab.ok(&["checkpoint-list", "vm", "--leaves", "--name"]),
        "c2\n"
    );
    assert!(lab.daemon_pids().is_empty());
}

/// Starts a qemu-storage-daemon of `qemu` over a new 16 MiB image `a.qcow2` of the lab and
/// defines domain `att` attached to it with that image as `vda`; returns the guest export's URI.
fn attach_one_disk(lab: &Lab, qemu: &mut LiveLab) -> String {
    use vbackup_core::model::ImageFormat;
    use vbackup_qemu::qsd::QsdDisk;
    let img = lab.image("a.qcow2", 16);
    let qsd = qemu
        .start_qsd("q", &[QsdDisk::single("vda", &img, ImageFormat::Qcow2)])
        .expect("start qemu-storage-daemon");
    let qmp = qsd.run_dir().qmp_socket.display().to_string();
    let guest = qsd.guest_export_uri("vda");
    // The monitor serves one client: vbackup's turn.
    drop(qsd);
    let vda = format!("vda={}", img.display());
    lab.ok(&["define", "att", "--disk", &vda, "--qmp", &qmp]);
    guest
}

#[test]
fn attached_domain_finds_its_nodes_and_takes_checkpoints_and_push_backups() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    let mut qemu = LiveLab::new().expect("live lab");
    let guest = attach_one_disk(&lab, &mut qemu);
    lab.ok(&["checkpoint-create-as", "att", "c1"]);
    tool(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 9 0 1M", &guest]));
    let dump = lab.json(&["checkpoint-dumpxml", "att", "c1", "--size", "--json"]);
    assert_eq!(dump["disks"][0]["size"], 1 << 20);
    full_push_backup_of_attached_equals_guest(&lab, qemu, &guest);
}

#[test]
fn backup_delete_without_qemu_keeps_everything_unless_told_to_keep_checkpoints() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    let mut qemu = LiveLab::new().expect("live lab");
    attach_one_disk(&lab, &mut qemu);
    let backups = lab.path("backups");
    lab.ok(&[
        "backup-set-default-target",
        "att",
        backups.to_str().expect("utf-8"),
    ]);
    let out = lab.ok(&["backup-create", "att", "--wait"]);
    let uuid = out
        .lines()
        .find_map(|l| l.strip_prefix("Backup ")?.split_whitespace().next())
        .expect("uuid printed")
        .to_owned();
    let checkpoint = lab.json(&["backup-info", &uuid, "--json"])["checkpoint"]
        .as_str()
        .expect("the backup created a checkpoint")
        .to_owned();
    assert!(backups.join(&uuid).join("vda.qcow2").exists());
    drop(qemu);
    let err = lab.fails(&["backup-delete", &uuid]);
    assert!(err.contains("--keep-checkpoints"), "{err}");
    assert_eq!(
        lab.json(&["backup-list", "att", "--json"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    lab.ok(&["backup-delete", &uuid, "--keep-checkpoints"]);
    assert_eq!(
        lab.json(&["backup-list", "att", "--json"])
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    assert_eq!(
        lab.ok(&["checkpoint-list", "att", "--name"]),
        format!("{checkpoint}\n")
    );
    // Backups live in <target>/<uuid>/<disk>.qcow2: nothing of this one is left.
    assert!(!backups.join(&uuid).join("vda.qcow2").exists());
    assert!(!backups.join(&uuid).exists());
}

#[test]
fn attached_domain_without_disks_discovers_exports_with_their_backing_chain() {
    use vbackup_core::model::ImageFormat;
    use vbackup_qemu::live::create_overlay;
    use vbackup_qemu::qsd::{QsdDisk, QsdLayer};
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    let mut qemu = LiveLab::new().expect("live lab");
    let base = lab.image("base.qcow2", 16);
    let top = lab.path("top.qcow2");
    create_overlay(&top, &base, &ImageFormat::Qcow2).expect("overlay");
    let data = lab.image("data.qcow2", 8);
    let chain = QsdDisk {
        target: "vda".into(),
        layers: vec![
            QsdLayer {
                path: top.clone(),
                format: ImageFormat::Qcow2,
            },
            QsdLayer {
                path: base.clone(),
                format: ImageFormat::Qcow2,
            },
        ],
    };
    let qsd = qemu
        .start_qsd(
            "q",
            &[chain, QsdDisk::single("vdb", &data, ImageFormat::Qcow2)],
        )
        .expect("start qemu-storage-daemon");
    let qmp = qsd.run_dir().qmp_socket.display().to_string();
    let guest = qsd.guest_export_uri("vda");
    drop(qsd);
    assert_eq!(
        lab.ok(&["define", "att", "--qmp", &qmp]),
        "Domain 'att' defined\n"
    );
    // The daemon has no guest devices: its exports are the disks, named after their export
    // ids (`guest-vda`), each with the layers below the raw view the export shows.
    let disks = lab.json(&["domblklist", "att", "--json"]);
    assert_eq!(disks[0]["target"], "vda");
    assert_eq!(disks[0]["source"], top.display().to_string());
    assert_eq!(disks[1]["target"], "vdb");
    let xml = std::fs::read_to_string(lab.state().join("domains/att/domain.xml")).unwrap();
    assert!(
        xml.contains(&format!("<source file='{}'/>", base.display())),
        "{xml}"
    );

    lab.ok(&["checkpoint-create-as", "att", "c1"]);
    tool(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 1M", &guest]));
    let dump = lab.json(&["checkpoint-dumpxml", "att", "c1", "--size", "--json"]);
    assert_eq!(dump["disks"][0]["target"], "vda");
    assert_eq!(dump["disks"][0]["size"], 1 << 20);
    full_push_backup_of_attached_equals_guest(&lab, qemu, &guest);
}

#[test]
fn read_only_commands_work_while_another_vbackup_follows_a_job_and_changes_are_refused_naming_it() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    lab.define_vm("a.qcow2", 16);
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);
    let px = lab.file("pull.xml", &pull_xml(&lab, None));
    // `--wait` on a pull backup follows it (holding the domain) until the job is aborted.
    let mut follower = lab.spawn(&["backup-begin", "vm", &px, "--wait"]);
    let progress = lab.state().join("domains/vm/job-progress.json");
    wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        progress.is_file()
    });
    assert!(progress.is_file(), "the follower writes the job's progress");

    let info = lab.json(&["domjobinfo", "vm", "--json"]);
    assert_eq!(info["status"], "running");
    assert!(info["diskTempTotalBytes"].as_u64().is_some(), "{info}");
    assert!(
        lab.ok(&["backup-dumpxml", "vm"])
            .contains("<domainbackup mode='pull'")
    );
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), "c1\n");
    assert_eq!(
        lab.json(&["domblklist", "vm", "--json"])[0]["target"],
        "vda"
    );
    assert_eq!(
        lab.json(&["domjobinfo", "vm", "--completed", "--json"])["status"],
        "none"
    );

    // A change is refused at once, naming the holder.
    let started = Instant::now();
    let err = lab.fails(&["checkpoint-create-as", "vm", "c2"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    let holder = format!("is locked by vbackup process {} (", follower.id());
    assert!(
        err.contains(&holder) && err.contains("backup-begin vm"),
        "{err}"
    );
    // --wait-lock waits, then gives up with the same message.
    let started = Instant::now();
    let err = lab.fails(&["--wait-lock", "1", "checkpoint-create-as", "vm", "c2"]);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        err.contains("waiting up to 1 s") && err.contains(&holder),
        "{err}"
    );

    follower.kill().expect("kill");
    follower.wait().expect("reap");
    lab.ok(&["domjobabort", "vm"]);
    assert!(!progress.is_file(), "the progress goes with the job");
    assert_eq!(lab.json(&["domjobinfo", "vm", "--json"])["status"], "none");
}

#[test]
fn a_killed_daemon_is_restarted_its_lost_checkpoints_and_job_are_reported_and_a_full_backup_works()
{
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    lab.define_vm("a.qcow2", 16);
    // c1's bitmap reaches the image at the clean stop that ends this invocation; c2's is
    // created in the daemon that will be killed, so it never does.
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 0x41, "0", "1M");
    lab.ok(&["checkpoint-create-as", "vm", "c2"]);
    lab.guest_write("vm", "vda", 0x42, "4M", "1M");
    let pids = lab.daemon_pids();
    assert_eq!(pids.len(), 1);
    kill_and_wait(pids[0]);

    // The next command that needs QEMU starts a new daemon, says so, and reports that both
    // checkpoints lost their bitmaps: c1's came back inconsistent, c2's is gone.
    let inc = lab.path("inc.qcow2");
    let bx = lab.file("inc.xml", &push_xml(Some("c1"), "vda", &inc));
    let err = lab.fails(&["backup-begin", "vm", &bx, "--wait"]);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines[0].starts_with("note: the qemu-storage-daemon of domain 'vm' (pid "));
    assert!(
        lines[0].contains(&format!("(pid {}) was gone", pids[0])),
        "{err}"
    );
    assert!(lines[1].starts_with(
        "warning: checkpoint 'c1': the bitmap of disk 'vda' is missing or inconsistent"
    ));
    assert!(lines[2].starts_with(
        "warning: checkpoint 'c2': the bitmap of disk 'vda' is missing or inconsistent"
    ));
    assert_eq!(
        lines[3],
        "error: checkpoint inconsistent: missing or broken bitmap 'c1' for disk 'vda'"
    );
    assert!(!inc.exists(), "a refused backup creates no target");
    let bx2 = lab.file("inc2.xml", &push_xml(Some("c2"), "vda", &inc));
    let err = lab.fails(&["backup-begin", "vm", &bx2, "--wait"]);
    // Warned about once in full; after that one line names them.
    assert_eq!(
        err,
        "warning: checkpoints with lost bitmaps (reported before): c1, c2; incremental backups \
         from them are refused until they are deleted\n\
         error: checkpoint inconsistent: missing or broken bitmap 'c2' for disk 'vda'\n"
    );
    assert_eq!(lab.daemon_pids().len(), 1, "the new daemon keeps running");

    // A full backup with a new checkpoint works and equals the disk.
    let t = lab.snapshot("vm", "vda", "t.qcow2");
    let full = lab.path("full.qcow2");
    let fx = lab.file("full.xml", &push_xml(None, "vda", &full));
    let cx = lab.file("c3.xml", &checkpoint_xml("c3"));
    lab.ok(&["backup-begin", "vm", &fx, &cx, "--wait"]);
    assert!(identical(&full, &t));
    // The lost checkpoints go with a plain delete (c2's bitmap is gone: only its metadata
    // goes), and the new chain works.
    lab.ok(&["checkpoint-delete", "vm", "c2"]);
    lab.ok(&["checkpoint-delete", "vm", "c1"]);
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), "c3\n");
    lab.guest_write("vm", "vda", 0x43, "8M", "1M");
    let t2 = lab.snapshot("vm", "vda", "t2.qcow2");
    let bx3 = lab.file("inc3.xml", &push_xml(Some("c3"), "vda", &inc));
    let out = lab.run(&["backup-begin", "vm", &bx3, "--wait"]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "no drift is left to report");
    rebase_onto(&inc, &full);
    assert!(identical(&inc, &t2));

    // Killed while a job runs: the job died with it, and the next command ends it as failed.
    let px = lab.file("pull.xml", &pull_xml(&lab, Some("c3")));
    lab.ok(&["backup-begin", "vm", &px]);
    kill_and_wait(lab.daemon_pids()[0]);
    let out = lab.run(&["domjobinfo", "vm", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the backup job died with the daemon"),
        "{stderr}"
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["status"], "none");
    let done = lab.json(&["domjobinfo", "vm", "--completed", "--json"]);
    assert_eq!(done["status"], "failed");
    assert_eq!(done["errmsg"], "job no longer known to QEMU");
    assert!(!lab.state().join("domains/vm/journal.json").exists());
    lab.ok(&["shutdown", "vm"]);
}

#[test]
fn a_relative_state_directory_works_for_pull_backups() {
    let Some(lab) = Lab::new("live CLI test") else {
        return;
    };
    let img = lab.image("a.qcow2", 16);
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .current_dir(lab.dir.path())
            .args(["--state-dir", "st"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vbackup");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["define", "vm", "--disk", &format!("vda={}", img.display())]);
    // The daemon's NBD socket lives under the state directory and QEMU wants it absolute.
    let px = lab.file("pull.xml", &pull_xml(&lab, None));
    run(&["backup-begin", "vm", &px]);
    run(&["domjobabort", "vm"]);
    assert!(lab.daemon_pids().is_empty());
}
