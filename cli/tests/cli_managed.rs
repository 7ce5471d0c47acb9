//! Managed backups through the `vbackup` binary against real qemu-storage-daemon: creation
//! (push and pull, full and incremental), listing, restore, deletion and interruption. Each
//! test has its own state directory and small images; a missing QEMU tool fails the test (it
//! never skips), and every test stops the processes it caused (see [`Lab`]'s drop).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Lab, identical, tool};

/// The managed-backup tests' domain: `vm` with one disk `vda`.
trait VmLab {
    /// Defines and starts domain `vm` on a fresh qcow2 disk, with a default backup target.
    fn started_domain(&self, mib: u64);
    /// A guest write to `vm`'s `vda`.
    fn vm_write(&self, pattern: u8, offset: &str, len: &str);
    /// The guest's disk now, as a qcow2 copy.
    fn vm_snapshot(&self, name: &str) -> PathBuf;
    /// Creates a managed backup and returns its uuid.
    fn backup(&self, parent: Option<&str>, pull: bool) -> String;
    /// Writes 1 MiB of 1s at 0, takes a full push backup, writes 1 MiB of 2s at 2 MiB and takes
    /// an incremental (pull or push) on it; returns both uuids.
    fn full_then_incremental(&self, pull: bool) -> (String, String);
    /// The uuids a `--json` listing prints.
    fn uuids(&self, args: &[&str]) -> Vec<String>;
    /// Restores backup `uuid` into the lab directory `dir` (with `extra` arguments); returns
    /// the restored `vda` image.
    fn restore(&self, uuid: &str, extra: &[&str], dir: &str) -> PathBuf;
}

impl VmLab for Lab {
    fn started_domain(&self, mib: u64) {
        self.define_vm("vda.qcow2", mib);
        let target = self.path("backups");
        self.ok(&[
            "backup-set-default-target",
            "vm",
            target.to_str().expect("utf-8 path"),
        ]);
        self.ok(&["start", "vm"]);
    }

    fn vm_write(&self, pattern: u8, offset: &str, len: &str) {
        self.guest_write("vm", "vda", pattern, offset, len);
    }

    fn vm_snapshot(&self, name: &str) -> PathBuf {
        self.snapshot("vm", "vda", name)
    }

    fn backup(&self, parent: Option<&str>, pull: bool) -> String {
        let mut args = vec!["backup-create", "vm"];
        if let Some(p) = parent {
            args.extend(["--parent", p]);
        }
        args.push(if pull { "--pull" } else { "--wait" });
        let out = self.ok(&args);
        let uuid = out
            .lines()
            .find_map(|l| l.strip_prefix("Backup ")?.split_whitespace().next())
            .expect("backup-create prints the uuid")
            .to_owned();
        let info = self.json(&["backup-info", &uuid, "--json"]);
        assert_eq!(info["parent"].as_str(), parent);
        uuid
    }

    fn full_then_incremental(&self, pull: bool) -> (String, String) {
        self.vm_write(1, "0", "1M");
        let full = self.backup(None, false);
        self.vm_write(2, "2M", "1M");
        let inc = self.backup(Some(&full), pull);
        (full, inc)
    }

    fn uuids(&self, args: &[&str]) -> Vec<String> {
        self.json(args)
            .as_array()
            .expect("array")
            .iter()
            .map(|b| b["uuid"].as_str().expect("uuid").to_owned())
            .collect()
    }

    fn restore(&self, uuid: &str, extra: &[&str], dir: &str) -> PathBuf {
        let dir = self.path(dir);
        let mut args = vec!["backup-restore", uuid];
        args.extend(extra);
        args.extend(["--dir", dir.to_str().expect("utf-8")]);
        self.ok(&args);
        dir.join("vda.qcow2")
    }
}

#[test]
fn full_then_pull_and_push_incrementals_restore_to_their_point_in_time_and_delete_safely() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    lab.vm_write(2, "2M", "1M");
    let second = lab.backup(Some(&full), true);
    let at_second = lab.vm_snapshot("at-second.qcow2");
    lab.vm_write(3, "1536K", "1M");
    lab.vm_write(4, "8M", "64K");
    let third = lab.backup(Some(&second), false);
    let at_third = lab.vm_snapshot("at-third.qcow2");
    // The guest moves on; the backups keep their point in time.
    lab.vm_write(5, "0", "4M");

    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]).len(), 3);
    assert_eq!(
        lab.uuids(&["backup-list", "vm", "--full", "--json"]),
        [full.as_str()]
    );
    assert_eq!(
        lab.uuids(&["backup-list", "vm", "--latest", "--json"]),
        [full.as_str(), second.as_str(), third.as_str()]
    );
    assert_eq!(
        lab.uuids(&["backup-children", &full, "--json"]),
        [second.as_str()]
    );
    let tree = lab.ok(&["backup-list", "vm", "--tree"]);
    assert!(tree.contains(&format!("`- {third}")), "{tree}");
    let info = lab.json(&["backup-info", &third, "--json"]);
    assert_eq!(info["kind"], "incremental");
    assert_eq!(info["domain"], "vm");
    let xml = lab.ok(&["backup-dumpxml", &third]);
    assert!(xml.starts_with("<managedbackup>"), "{xml}");
    assert!(xml.contains(&format!("<uuid>{second}</uuid>")), "{xml}");

    // Every incremental image is an overlay of its parent's: qemu-img reads the chain.
    let top = info["disks"][0]["path"].as_str().expect("path").to_owned();
    let chain = tool(
        Command::new("qemu-img")
            .args(["info", "--backing-chain", "--output=json"])
            .arg(&top),
    );
    let chain: Value = serde_json::from_slice(&chain.stdout).expect("json");
    assert_eq!(chain.as_array().map(Vec::len), Some(3));

    // Restores are verified against the digest and equal the disk at that moment.
    let restored3 = lab.restore(&third, &["--new-domain", "vm3"], "restore3");
    assert!(identical(&at_third, &restored3));
    let listed = lab.ok(&["list"]);
    assert!(listed.contains("vm3"), "{listed}");
    let restored2 = lab.restore(&second, &[], "restore2");
    assert!(identical(&at_second, &restored2));
    assert!(!identical(&at_third, &restored2));

    let dir_subset = lab.path("restore-subset");
    let subset = dir_subset.to_str().expect("utf-8");
    let err = lab.fails(&["backup-restore", &third, "--disk", "vdz", "--dir", subset]);
    assert!(err.contains("no image of disk 'vdz'"), "{err}");
    lab.ok(&["backup-restore", &third, "--disk", "vda", "--dir", subset]);
    assert!(identical(&at_third, &dir_subset.join("vda.qcow2")));

    // Deleting would orphan: refused, nothing removed.
    let err = lab.fails(&["backup-delete", &second]);
    assert!(err.contains("dependent"), "{err}");
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]).len(), 3);
    let err = lab.fails(&["undefine", "vm", "--checkpoints-metadata"]);
    assert!(err.contains("--remove-all-backups"), "{err}");

    // With its children: both go, with their images.
    let second_dir = lab.path("backups").join(&second);
    assert!(second_dir.is_dir());
    lab.ok(&["backup-delete", &second, "--children"]);
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]), [full.as_str()]);
    assert!(!second_dir.exists());
    assert!(!Path::new(&top).exists());

    // The chain goes on from the remaining backup.
    lab.vm_write(6, "4M", "1M");
    let again = lab.backup(Some(&full), true);
    let now = lab.vm_snapshot("now.qcow2");
    assert!(identical(&now, &lab.restore(&again, &[], "restore4")));

    // Over the domain's own disk: refused while it runs, then the disk is the backup's again
    // and the checkpoints, whose bitmaps went with the old image, are forgotten.
    let err = lab.fails(&["backup-restore", &again, "--overwrite"]);
    assert!(err.contains("running"), "{err}");
    lab.ok(&["shutdown", "vm"]);
    lab.ok(&["backup-restore", &full, "--overwrite"]);
    assert!(!identical(
        &lab.path("vda.qcow2"),
        &lab.path("restore3/vda.qcow2")
    ));
    let restored5 = lab.restore(&full, &[], "restore5");
    assert!(identical(&lab.path("vda.qcow2"), &restored5));
    let checkpoints = lab.json(&["checkpoint-list", "vm", "--json"]);
    assert_eq!(checkpoints.as_array().map(Vec::len), Some(0));
    let err = lab.fails(&["backup-create", "vm", "--pull", "--parent", &again]);
    assert!(
        err.contains("not found") || err.contains("checkpoint"),
        "{err}"
    );
    lab.backup(None, false);
    lab.ok(&[
        "undefine",
        "vm",
        "--checkpoints-metadata",
        "--remove-all-backups",
    ]);
    let left: Vec<_> = std::fs::read_dir(lab.path("backups"))
        .expect("target dir")
        .collect();
    assert!(left.is_empty(), "images left: {left:?}");
}

#[test]
fn an_interrupted_pull_records_nothing_and_the_next_incremental_works() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(64);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    // Enough dirty data that the copy is still under way when the process is killed.
    lab.vm_write(2, "0", "60M");
    let mut child = lab.spawn(&["backup-create", "vm", "--pull", "--parent", &full]);
    // Killed once the job runs and the overlay receiving the dirty extents exists.
    let journal = lab.path("st/domains/vm/journal.json");
    // The managed-backup journal names the pending backup's images.
    let pending = lab.path("st/domains/vm/managed-journal.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut overlay = None;
    while Instant::now() < deadline {
        let path = std::fs::read_to_string(&pending)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["images"][0][1].as_str().map(PathBuf::from));
        if journal.is_file() && path.as_ref().is_some_and(|p| p.is_file()) {
            overlay = path;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().expect("kill");
    let overlay = overlay.expect("the copy into the overlay began");
    let status = child.wait().expect("reap");
    assert!(!status.success(), "the backup was interrupted");
    assert!(journal.is_file(), "the job was running when it was killed");
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]), [full.as_str()]);

    let err = lab.fails(&["backup-finish", "vm", "--check"]);
    assert!(err.contains("interrupted"), "{err}");
    assert!(!journal.is_file(), "the job ended");
    assert!(lab.nbd_pids().is_empty(), "no qemu-nbd left behind");
    assert!(!pending.exists());
    let dirs: Vec<String> = std::fs::read_dir(lab.path("backups"))
        .expect("target dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs, [full.as_str()], "partial images removed");
    assert!(!overlay.exists());
    // The interrupted backup's checkpoint is gone; the full backup's remains.
    let checkpoints = lab.json(&["checkpoint-list", "vm", "--json"]);
    assert_eq!(checkpoints.as_array().map(Vec::len), Some(1));

    lab.vm_write(3, "62M", "1M");
    let next = lab.backup(Some(&full), true);
    let now = lab.vm_snapshot("now.qcow2");
    assert!(identical(&now, &lab.restore(&next, &[], "restore")));
    lab.ok(&["shutdown", "vm"]);
}

#[test]
fn a_backup_without_target_is_refused_and_records_nothing() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.define_vm("vda.qcow2", 4);
    let err = lab.fails(&["backup-create", "vm", "--wait"]);
    assert!(err.contains("default backup target"), "{err}");
    let err = lab.fails(&[
        "backup-create",
        "vm",
        "--parent",
        "01234567-89ab-cdef-0123-456789abcdef",
    ]);
    assert!(err.contains("no backup"), "{err}");
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]).len(), 0);
    assert!(lab.daemon_pids().is_empty());
    lab.ok(&["undefine", "vm"]);
}

#[test]
fn an_incremental_on_a_chain_that_lost_an_image_is_refused_and_a_full_works() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    let (full, inc) = lab.full_then_incremental(false);
    let info = lab.json(&["backup-info", &full, "--json"]);
    let image = info["disks"][0]["path"]
        .as_str()
        .expect("image path")
        .to_owned();
    std::fs::remove_file(&image).expect("remove the full backup's image");
    let err = lab.fails(&["backup-create", "vm", "--parent", &inc, "--wait"]);
    assert!(
        err.contains(&format!("of backup '{full}' ('{image}') is missing")),
        "{err}"
    );
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]).len(), 2);
    let dir = lab.path("broken");
    let err = lab.fails(&[
        "backup-restore",
        &inc,
        "--dir",
        dir.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        err,
        format!(
            "error: operation failed: backup '{inc}' cannot be restored: image '{image}' of disk 'vda' in its chain is missing\n"
        )
    );
    assert!(!dir.exists(), "a refused restore writes nothing");
    let again = lab.backup(None, false);
    let restored = lab.restore(&again, &[], "r");
    assert!(identical(&restored, &lab.vm_snapshot("now.qcow2")));
}

#[test]
fn a_consolidated_incremental_is_a_full_that_outlives_its_old_chain() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    let (full, inc1) = lab.full_then_incremental(true);
    let at_inc1 = lab.vm_snapshot("at-inc1.qcow2");
    lab.vm_write(3, "8M", "1M");
    let inc2 = lab.backup(Some(&inc1), false);
    let at_inc2 = lab.vm_snapshot("at-inc2.qcow2");

    let out = lab.ok(&["backup-consolidate", &inc1]);
    assert!(
        out.starts_with(&format!("Backup {inc1} is now a full backup")),
        "{out}"
    );
    let info = lab.json(&["backup-info", &inc1, "--json"]);
    assert_eq!(info["parent"], Value::Null);
    assert_eq!(info["kind"], "full");
    let image = info["disks"][0]["path"].as_str().expect("path").to_owned();
    let chain = tool(Command::new("qemu-img").args(["info", "-U", "--backing-chain", &image]));
    assert_eq!(
        String::from_utf8_lossy(&chain.stdout)
            .matches("image:")
            .count(),
        1,
        "standalone"
    );
    // The old full now stands alone and goes by itself; both backups still restore.
    lab.ok(&["backup-delete", &full]);
    assert!(identical(&lab.restore(&inc1, &[], "r1"), &at_inc1));
    assert!(identical(&lab.restore(&inc2, &[], "r2"), &at_inc2));
    assert_eq!(
        lab.ok(&["backup-consolidate", &inc1]),
        format!("Backup {inc1} is already a full backup\n")
    );
    // Incrementals on the consolidated backup keep working.
    lab.vm_write(4, "12M", "1M");
    let inc3 = lab.backup(Some(&inc2), false);
    assert!(identical(
        &lab.restore(&inc3, &[], "r3"),
        &lab.vm_snapshot("now.qcow2")
    ));
}

#[test]
fn verify_reads_each_chain_against_its_digest_and_names_a_damaged_or_missing_image() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    let (full, inc) = lab.full_then_incremental(false);
    assert_eq!(lab.ok(&["backup-verify", &inc]), "vda: ok\n");
    let v = lab.json(&["backup-verify", &full, "--json"]);
    assert_eq!(v["disks"][0]["ok"], true, "{v}");

    // Damage the full backup's image where the incremental reads through it.
    let image = lab.json(&["backup-info", &full, "--json"])["disks"][0]["path"]
        .as_str()
        .expect("path")
        .to_owned();
    tool(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 0 64k", &image]));
    let out = lab.run(&["backup-verify", &inc]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("vda: FAILED: content digest blake3-tree:")
            && stdout.contains("differs"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 disk(s) failed verification"),
        "{out:?}"
    );
    std::fs::remove_file(&image).expect("remove");
    let out = lab.run(&["backup-verify", &inc, "--json"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json output parses");
    assert_eq!(v["disks"][0]["ok"], false);
    assert_eq!(
        v["disks"][0]["error"],
        format!("image '{image}' of its chain is missing")
    );
}

#[test]
fn a_push_backup_started_without_wait_is_recorded_or_discarded_by_backup_finish() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let out = lab.ok(&["backup-create", "vm", "--description", "later"]);
    assert!(out.contains("started"), "{out}");
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]).len(), 0);
    let out = lab.ok(&["backup-finish", "vm"]);
    assert!(out.contains("created (full"), "{out}");
    let full = lab.uuids(&["backup-list", "vm", "--json"]);
    assert_eq!(full.len(), 1);
    let info = lab.json(&["backup-info", &full[0], "--json"]);
    assert_eq!(info["description"], "later");

    lab.vm_write(2, "4M", "1M");
    lab.ok(&["backup-create", "vm", "--parent", &full[0]]);
    let out = lab.ok(&["backup-finish", "vm", "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]), full);
    let dirs = std::fs::read_dir(lab.path("backups"))
        .expect("target")
        .count();
    assert_eq!(dirs, 1, "the cancelled backup's images are gone");
    let err = lab.fails(&["backup-finish", "vm"]);
    assert!(err.contains("not valid") || err.contains("no"), "{err}");

    // Its changes are still in the next incremental.
    let next = lab.backup(Some(&full[0]), false);
    let now = lab.vm_snapshot("now.qcow2");
    assert!(identical(&now, &lab.restore(&next, &[], "restore")));

    // A full pull backup stores the allocated extents in a fresh image.
    lab.vm_write(3, "12M", "1M");
    let pulled = lab.backup(None, true);
    let now = lab.vm_snapshot("now-full.qcow2");
    assert!(identical(&now, &lab.restore(&pulled, &[], "restore-full")));
    assert_eq!(
        lab.uuids(&["backup-list", "vm", "--full", "--json"]).len(),
        2
    );

    lab.ok(&["backup-delete", "vm", "--all"]);
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]).len(), 0);
    let left = std::fs::read_dir(lab.path("backups"))
        .expect("target")
        .count();
    assert_eq!(left, 0, "every image removed");
    lab.ok(&["shutdown", "vm"]);
}

/// The checkpoint names `checkpoint-list --json` prints, sorted.
fn checkpoint_names(lab: &Lab) -> Vec<String> {
    let mut names: Vec<String> = lab
        .json(&["checkpoint-list", "vm", "--json"])
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    names
}

/// The persistent bitmaps stored in an image nobody has open, sorted.
fn stored_bitmaps(image: &Path) -> Vec<String> {
    let out = tool(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(image),
    );
    let info: Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut names: Vec<String> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn restore_until_gives_the_disk_at_that_backups_point_in_time_and_refuses_other_chains() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    let at_full = lab.vm_snapshot("at-full.qcow2");
    lab.vm_write(2, "2M", "1M");
    let first = lab.backup(Some(&full), true);
    let at_first = lab.vm_snapshot("at-first.qcow2");
    lab.vm_write(3, "1536K", "1M");
    let second = lab.backup(Some(&first), false);
    let at_second = lab.vm_snapshot("at-second.qcow2");
    lab.vm_write(4, "0", "512K");
    let third = lab.backup(Some(&second), true);
    lab.vm_write(5, "8M", "1M");

    // From the top of the chain down to an ancestor, and from the root up to a descendant:
    // the disk as it was when the backup named by --until was taken.
    let restore_until = |uuid: &str, until: &str, dir: &str| -> PathBuf {
        let dir = lab.path(dir);
        let out = lab.ok(&[
            "backup-restore",
            uuid,
            "--until",
            until,
            "--dir",
            dir.to_str().expect("utf-8"),
        ]);
        assert!(out.contains(&format!("Restoring backup {until}")), "{out}");
        dir.join("vda.qcow2")
    };
    assert!(identical(&at_first, &restore_until(&third, &first, "r1")));
    assert!(identical(&at_second, &restore_until(&full, &second, "r2")));
    assert!(identical(&at_full, &restore_until(&third, &full, "r3")));
    assert!(!identical(&at_second, &lab.path("r1/vda.qcow2")));

    // A backup of another chain (or a sibling branch) is not a point of this chain.
    let other = lab.json(&["backup-create", "vm", "--wait", "--json"]);
    assert_eq!(other["kind"], "full");
    let other = other["uuid"].as_str().expect("uuid").to_owned();
    let sibling = lab.backup(Some(&first), false);
    let dir = lab.path("refused");
    for (uuid, until) in [(&third, &other), (&third, &sibling), (&other, &full)] {
        let err = lab.fails(&[
            "backup-restore",
            uuid,
            "--until",
            until,
            "--dir",
            dir.to_str().expect("utf-8"),
        ]);
        assert!(err.contains("is not in the chain"), "{err}");
    }
    assert!(!dir.join("vda.qcow2").exists(), "nothing restored");
    // Backups taken within one second still list in the order they were made.
    assert_eq!(
        lab.uuids(&["backup-list", "vm", "--latest", "--json"]),
        [full.as_str(), first.as_str(), sibling.as_str()]
    );
    lab.ok(&["shutdown", "vm"]);
}

#[test]
fn deleting_backups_deletes_their_checkpoints_but_keeps_those_remaining_backups_need() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.ok(&["checkpoint-create-as", "vm", "manual"]);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    lab.vm_write(2, "2M", "1M");
    let first = lab.backup(Some(&full), true);
    lab.vm_write(3, "4M", "1M");
    let second = lab.backup(Some(&first), false);
    // A managed backup's checkpoint is named after it.
    assert_eq!(
        checkpoint_names(&lab),
        sorted(vec![
            full.clone(),
            first.clone(),
            second.clone(),
            "manual".into()
        ])
    );

    // The newest backup goes with its checkpoint; its parent keeps its own, so the chain can
    // go on from it.
    lab.ok(&["backup-delete", &second]);
    assert_eq!(
        checkpoint_names(&lab),
        sorted(vec![full.clone(), first.clone(), "manual".into()])
    );
    lab.ok(&["shutdown", "vm"]);
    assert_eq!(
        stored_bitmaps(&lab.path("vda.qcow2")),
        checkpoint_names(&lab),
        "the bitmap went with the checkpoint"
    );
    lab.ok(&["start", "vm"]);
    lab.vm_write(4, "6M", "1M");
    let again = lab.backup(Some(&first), true);
    let now = lab.vm_snapshot("now.qcow2");
    assert!(identical(&now, &lab.restore(&again, &[], "restore")));

    // A checkpoint already deleted by hand does not stop the deletion of its backup.
    lab.ok(&["checkpoint-delete", "vm", &again]);
    lab.ok(&["backup-delete", &again]);
    // With children: every deleted backup's checkpoint goes, the user's own stays.
    lab.ok(&["backup-delete", &full, "--children"]);
    assert_eq!(checkpoint_names(&lab), ["manual"]);
    let last = lab.backup(None, true);
    assert_eq!(checkpoint_names(&lab), sorted(vec![last, "manual".into()]));
    lab.ok(&["backup-delete", "vm", "--all"]);
    assert_eq!(checkpoint_names(&lab), ["manual"]);
    lab.ok(&["shutdown", "vm"]);
    assert_eq!(stored_bitmaps(&lab.path("vda.qcow2")), ["manual"]);
}

/// The image path of disk number `i` of a backup.
fn image_of(lab: &Lab, uuid: &str, i: usize) -> String {
    lab.json(&["backup-info", uuid, "--json"])["disks"][i]["path"]
        .as_str()
        .expect("path")
        .to_owned()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn consolidating_over_a_corrupt_ancestor_changes_nothing_and_works_once_it_is_repaired() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    let (full, inc) = lab.full_then_incremental(false);
    let at_inc = lab.vm_snapshot("at-inc.qcow2");
    let full_image = image_of(&lab, &full, 0);
    let inc_image = image_of(&lab, &inc, 0);
    let good = std::fs::read(&full_image).expect("full image");
    // Damage the full backup where the incremental reads through it.
    tool(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 0 64k", &full_image]));
    let inc_before = std::fs::read(&inc_image).expect("inc image");
    let info_before = lab.json(&["backup-info", &inc, "--json"]);
    let err = lab.fails(&["backup-consolidate", &inc]);
    assert!(err.contains("does not match its recorded digest"), "{err}");
    // Nothing was written: the incremental's image, its record and its directory are as
    // they were.
    assert_eq!(std::fs::read(&inc_image).expect("inc image"), inc_before);
    assert_eq!(lab.json(&["backup-info", &inc, "--json"]), info_before);
    let dir = Path::new(&inc_image).parent().expect("dir");
    assert_eq!(files_in(dir), vec!["vda.qcow2".to_owned()]);
    // Repairing the ancestor is enough: the consolidation then works.
    std::fs::write(&full_image, &good).expect("repair");
    let out = lab.ok(&["backup-consolidate", &inc]);
    assert!(
        out.starts_with(&format!("Backup {inc} is now a full backup")),
        "{out}"
    );
    lab.ok(&["backup-delete", &full]);
    assert!(identical(&lab.restore(&inc, &[], "r1"), &at_inc));
}

#[test]
fn a_restore_to_a_new_domain_named_like_an_existing_one_is_refused_and_writes_nothing() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    let disks_before = lab.ok(&["domblklist", "vm"]);
    let dir = lab.path("r");
    let dir_arg = dir.to_str().expect("utf-8");
    let err = lab.fails(&[
        "backup-restore",
        &full,
        "--dir",
        dir_arg,
        "--new-domain",
        "vm",
    ]);
    assert!(err.contains("domain 'vm' already exists"), "{err}");
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    assert_eq!(lab.ok(&["domblklist", "vm"]), disks_before);
    // Another name is defined over the restored copy.
    let out = lab.ok(&[
        "backup-restore",
        &full,
        "--dir",
        dir_arg,
        "--new-domain",
        "vm2",
    ]);
    assert!(out.contains("Domain 'vm2' defined"), "{out}");
    assert!(
        lab.ok(&["domblklist", "vm2"])
            .contains(&dir.join("vda.qcow2").display().to_string())
    );
}

#[test]
fn a_restore_over_the_disk_keeps_its_owner_mode_and_qcow2_options() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    let disk = lab.path("vda.qcow2");
    tool(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M,lazy_refcounts=on",
        disk.to_str().expect("utf-8"),
        "16M",
    ]));
    lab.ok(&["define", "vm", "--disk", &format!("vda={}", disk.display())]);
    let target = lab.path("backups");
    lab.ok(&[
        "backup-set-default-target",
        "vm",
        target.to_str().expect("utf-8"),
    ]);
    lab.ok(&["start", "vm"]);
    lab.vm_write(5, "0", "1M");
    let full = lab.backup(None, false);
    let at_full = lab.vm_snapshot("at-full.qcow2");
    lab.vm_write(6, "0", "2M");
    lab.ok(&["shutdown", "vm"]);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(&disk, Some(65534), Some(65534)).expect("chown");
    lab.ok(&["backup-restore", &full, "--overwrite"]);
    let meta = std::fs::metadata(&disk).expect("disk");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    let out = tool(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&disk),
    );
    let info: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["cluster-size"], 2 << 20, "{info}");
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"], true,
        "{info}"
    );
    assert!(identical(&disk, &at_full));
    assert!(!lab.path(".vda.qcow2.vbackup-new").exists());
}

#[test]
fn a_restore_over_one_disk_keeps_the_other_disks_checkpoints_and_bitmaps() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    let vda = lab.image("vda.qcow2", 16);
    let vdb = lab.image("vdb.qcow2", 16);
    lab.ok(&[
        "define",
        "vm",
        "--disk",
        &format!("vda={}", vda.display()),
        "--disk",
        &format!("vdb={}", vdb.display()),
    ]);
    let target = lab.path("backups");
    lab.ok(&[
        "backup-set-default-target",
        "vm",
        target.to_str().expect("utf-8"),
    ]);
    lab.ok(&["start", "vm"]);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    lab.vm_write(2, "1M", "1M");
    let inc = lab.backup(Some(&full), false);
    lab.ok(&["shutdown", "vm"]);
    let checkpoints = checkpoint_names(&lab);
    assert_eq!(checkpoints, sorted(vec![full.clone(), inc.clone()]));
    lab.ok(&["backup-restore", &full, "--overwrite", "--disk", "vda"]);
    // vda's image is new (no bitmaps); vdb keeps its bitmaps and the checkpoints keep vdb.
    assert!(
        stored_bitmaps(&vda).is_empty(),
        "{:?}",
        stored_bitmaps(&vda)
    );
    assert_eq!(stored_bitmaps(&vdb), checkpoints);
    assert_eq!(checkpoint_names(&lab), checkpoints);
    for name in &checkpoints {
        let xml = lab.ok(&["checkpoint-dumpxml", "vm", name]);
        assert!(xml.contains("<disk name='vda' checkpoint='no'"), "{xml}");
        assert!(
            xml.contains(&format!(
                "<disk name='vdb' checkpoint='bitmap' bitmap='{name}'"
            )),
            "{xml}"
        );
    }
    // Backups go on: a new full backup makes a checkpoint on both disks again.
    lab.ok(&["start", "vm"]);
    let again = lab.backup(None, false);
    lab.ok(&["shutdown", "vm"]);
    assert_eq!(stored_bitmaps(&vda), vec![again.clone()]);
    assert_eq!(stored_bitmaps(&vdb), sorted(vec![full, inc, again]));
}

#[test]
fn a_truncated_record_is_listed_as_damaged_and_the_others_stay_usable() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let first = lab.backup(None, false);
    let at_first = lab.vm_snapshot("at-first.qcow2");
    lab.vm_write(2, "0", "1M");
    let second = lab.backup(None, false);
    let record = lab
        .state()
        .join("domains/vm/backups")
        .join(format!("{second}.xml"));
    let text = std::fs::read_to_string(&record).expect("record");
    std::fs::write(&record, &text[..text.len() / 2]).expect("truncate");
    let listed = lab.ok(&["backup-list", "vm"]);
    assert!(listed.contains(&first), "{listed}");
    assert!(
        listed.contains(&format!(
            "Damaged: {second} (record '{}')",
            record.display()
        )),
        "{listed}"
    );
    assert_eq!(lab.ok(&["backup-verify", &first]), "vda: ok\n");
    assert!(identical(&lab.restore(&first, &[], "r1"), &at_first));
    let err = lab.fails(&["backup-verify", &second]);
    assert!(err.contains(&record.display().to_string()), "{err}");
    assert_eq!(
        lab.ok(&["backup-delete", &second]),
        format!("Backup {second} deleted\n")
    );
    assert!(!record.exists());
    assert!(!lab.ok(&["backup-list", "vm"]).contains("Damaged"));
    lab.ok(&["backup-delete", &first]);
}

#[test]
fn a_backup_into_a_vanished_target_directory_is_refused_and_creates_nothing() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    // The target directory goes away (an unmounted file system).
    let target = lab.path("backups");
    let moved = lab.path("backups-elsewhere");
    std::fs::rename(&target, &moved).expect("move the target away");
    let err = lab.fails(&["backup-create", "vm", "--wait"]);
    assert!(
        err.contains("the backup target directory must exist"),
        "{err}"
    );
    assert!(!target.exists(), "the target directory was created again");
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]), [full.as_str()]);
    // Its checkpoint was not kept: only the full backup's is there.
    assert_eq!(checkpoint_names(&lab), vec![full.clone()]);
    assert!(!lab.path("st/domains/vm/managed-journal.json").exists());
    std::fs::rename(&moved, &target).expect("move it back");
    lab.vm_write(2, "1M", "1M");
    let inc = lab.backup(Some(&full), false);
    assert!(identical(
        &lab.restore(&inc, &[], "r1"),
        &lab.vm_snapshot("now.qcow2")
    ));
}

#[test]
fn the_backup_index_is_written_with_the_records_and_rebuilt_when_missing_or_torn() {
    let Some(lab) = Lab::new("live managed-backup test") else {
        return;
    };
    lab.started_domain(16);
    lab.vm_write(1, "0", "1M");
    let full = lab.backup(None, false);
    lab.vm_write(2, "0", "1M");
    let inc = lab.backup(Some(&full), false);
    let index = lab.state().join("domains/vm/backup-index.json");
    assert!(index.exists(), "the index is written with the records");
    let listed = lab.ok(&["backup-list", "vm", "--json"]);
    assert_eq!(
        lab.uuids(&["backup-list", "vm", "--json"]),
        [full.as_str(), inc.as_str()]
    );

    // Missing: the records are parsed, the listing is the same, and the index is back.
    std::fs::remove_file(&index).unwrap();
    assert_eq!(lab.ok(&["backup-list", "vm", "--json"]), listed);
    assert!(index.exists(), "a load under the lock rebuilds the index");

    // Torn: the same.
    std::fs::write(&index, b"{\"version\":1,\"sta").unwrap();
    assert_eq!(lab.ok(&["backup-list", "vm", "--json"]), listed);
    assert!(std::fs::read_to_string(&index).unwrap().len() > 20);

    // A deletion through the index keeps it current, as the files say.
    lab.ok(&["backup-delete", &inc]);
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]), [full.as_str()]);
    std::fs::remove_file(&index).unwrap();
    assert_eq!(lab.uuids(&["backup-list", "vm", "--json"]), [full.as_str()]);
    assert_eq!(lab.ok(&["backup-verify", &full]), "vda: ok\n");
}
