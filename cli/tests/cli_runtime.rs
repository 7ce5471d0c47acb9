//! The host runtime's rules through the `vbackup` binary against real qemu-storage-daemon: the
//! processes vbackup starts die with it, and what a killed vbackup left is cleaned by the next
//! command. Each test has its own state directory, temporary directory and small images, and
//! stops every process it caused (see [`Lab`]'s drop).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use support::{Lab, wait_until};
use vbackup_qemu::children::{EXPORT_DIR_PREFIX, start_time};

/// Defines and starts domain `vm` on a fresh 16 MiB qcow2 disk with a default backup target,
/// and writes some guest data.
fn started_vm(lab: &Lab) {
    lab.define_vm("vda.qcow2", 16);
    let target = lab.path("backups");
    std::fs::create_dir_all(&target).expect("target directory");
    lab.ok(&[
        "backup-set-default-target",
        "vm",
        target.to_str().expect("utf-8 path"),
    ]);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 7, "0", "1M");
}

/// The lab's temporary directory, given to every vbackup of these tests as `TMPDIR`.
fn tmp(lab: &Lab) -> PathBuf {
    let dir = lab.path("tmp");
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

/// Starts vbackup with `args`, told by the test hook to stop inside its first digest, and
/// waits until it is there; returns it and the pid of the qemu-nbd serving the digest.
fn paused_in_digest(lab: &Lab, args: &[&str]) -> (Child, u32) {
    let hook = lab.path("digest-pause");
    let _ = std::fs::remove_file(&hook);
    let child = lab
        .cmd(args)
        .env("VBACKUP_TEST_PAUSE_IN_DIGEST", &hook)
        .env("TMPDIR", tmp(lab))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vbackup");
    let mut pids = Vec::new();
    let paused = wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
        pids = std::fs::read_to_string(&hook)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .collect();
        pids.len() == 2
    });
    assert!(paused, "vbackup {args:?} never reached a digest");
    assert_eq!(pids[0], child.id(), "the paused process is the one started");
    assert!(start_time(pids[1]).is_some(), "qemu-nbd serves the digest");
    (child, pids[1])
}

/// Kills `child` with SIGKILL (no cleanup of its own can run) and reaps it.
fn kill_9(mut child: Child) {
    child.kill().expect("kill -9");
    child.wait().expect("reap");
}

fn export_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read tmp")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(EXPORT_DIR_PREFIX)
        })
        .map(|e| e.path())
        .collect()
}

/// Runs vbackup with the lab's `TMPDIR` and requires success.
fn ok_with_tmp(lab: &Lab, args: &[&str]) -> String {
    let out = lab
        .cmd(args)
        .env("TMPDIR", tmp(lab))
        .output()
        .expect("run vbackup");
    assert!(
        out.status.success(),
        "vbackup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_backup_killed_during_its_digest_leaves_no_qemu_nbd_and_the_next_command_cleans_its_export() {
    let Some(lab) = Lab::new("live runtime test") else {
        return;
    };
    started_vm(&lab);
    let (vbackup, nbd) = paused_in_digest(&lab, &["backup-create", "vm", "--wait"]);
    kill_9(vbackup);
    // The kernel ends the helper with its parent (PR_SET_PDEATHSIG).
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            start_time(nbd).is_none()
        }),
        "qemu-nbd {nbd} outlived the vbackup that started it"
    );
    assert!(lab.nbd_pids().is_empty(), "{:?}", lab.nbd_pids());
    // Its private directory (socket, log, owner record) is left: the next command removes it.
    assert_eq!(export_dirs(&tmp(&lab)).len(), 1);
    ok_with_tmp(&lab, &["list"]);
    assert!(export_dirs(&tmp(&lab)).is_empty());
}

#[test]
fn a_restore_killed_during_its_digest_leaves_no_helper_and_the_next_command_removes_its_copy() {
    let Some(lab) = Lab::new("live runtime test") else {
        return;
    };
    started_vm(&lab);
    let out = ok_with_tmp(&lab, &["backup-create", "vm", "--wait"]);
    let uuid = out
        .lines()
        .find_map(|l| l.strip_prefix("Backup ")?.split_whitespace().next())
        .expect("backup-create prints the uuid")
        .to_owned();
    lab.ok(&["shutdown", "vm"]);
    let before = std::fs::read(lab.path("vda.qcow2")).expect("disk");
    let (vbackup, nbd) = paused_in_digest(&lab, &["backup-restore", &uuid, "--overwrite"]);
    // The new image is written beside the disk and checked before it takes the disk's name.
    let copy = lab.path(".vda.qcow2.vbackup-new");
    assert!(copy.is_file(), "the restore's copy is being checked");
    kill_9(vbackup);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            start_time(nbd).is_none()
        }),
        "qemu-nbd {nbd} outlived the restore that started it"
    );
    // The disk is as it was; the next managed-backup command undoes the journaled restore.
    assert_eq!(std::fs::read(lab.path("vda.qcow2")).expect("disk"), before);
    ok_with_tmp(&lab, &["backup-verify", &uuid]);
    assert!(!copy.exists(), "the killed restore's copy is left behind");
    assert!(export_dirs(&tmp(&lab)).is_empty());
}
