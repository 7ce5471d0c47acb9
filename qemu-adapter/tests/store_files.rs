//! The on-disk store: layout, atomic writes, crash leftovers, locking and failures.

use std::fs;
use std::process::Command;

use vbackup_qemu::store::{Collection, Store, StoreError};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("state")).unwrap();
    (dir, store)
}

#[test]
fn documents_land_in_the_documented_layout() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm1").unwrap();
    vm.write_domain_xml("<domain/>").unwrap();
    vm.write_entry(Collection::Checkpoints, "c1", "<domaincheckpoint/>")
        .unwrap();
    vm.write_entry(
        Collection::Backups,
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "<domainbackup/>",
    )
    .unwrap();
    vm.write_journal("{}").unwrap();
    let root = store.root().join("domains/vm1");
    assert_eq!(
        fs::read_to_string(root.join("domain.xml")).unwrap(),
        "<domain/>"
    );
    assert_eq!(
        fs::read_to_string(root.join("checkpoints/c1.xml")).unwrap(),
        "<domaincheckpoint/>"
    );
    assert!(
        root.join("backups/0f8fad5b-d9cb-469f-a165-70867728950e.xml")
            .is_file()
    );
    assert_eq!(vm.read_journal().unwrap().as_deref(), Some("{}"));
    assert_eq!(vm.run_dir(), store.root().join("run/vm1"));
    assert!(vm.remove_journal().unwrap());
    assert!(!vm.remove_journal().unwrap());
    assert_eq!(vm.read_journal().unwrap(), None);
    assert!(vm.is_defined());
    assert_eq!(store.list_domains().unwrap(), vec!["vm1".to_owned()]);
}

#[test]
fn listings_are_sorted_and_skip_foreign_files() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm").unwrap();
    for name in ["c3", "c10", "a", "c2"] {
        vm.write_entry(Collection::Checkpoints, name, name).unwrap();
    }
    let dir = vm.dir().join("checkpoints");
    fs::write(dir.join("notes.txt"), "not a checkpoint").unwrap();
    fs::write(dir.join(".c9.xml.tmp-1-1"), "temp").unwrap();
    assert_eq!(
        vm.list_entries(Collection::Checkpoints).unwrap(),
        vec!["a", "c10", "c2", "c3"]
    );
    let loaded = vm.load_entries(Collection::Checkpoints).unwrap();
    assert_eq!(loaded[1], ("c10".to_owned(), "c10".to_owned()));
    assert!(vm.list_entries(Collection::Backups).unwrap().is_empty());

    for name in ["zeta", "alpha", "mid"] {
        store
            .lock_domain(name)
            .unwrap()
            .write_journal("[]")
            .unwrap();
    }
    assert_eq!(
        store.list_domains().unwrap(),
        vec!["alpha", "mid", "vm", "zeta"]
    );
}

#[test]
fn rewriting_replaces_content_and_removal_reports_existence() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm").unwrap();
    vm.write_entry(Collection::Checkpoints, "c1", "old")
        .unwrap();
    vm.write_entry(Collection::Checkpoints, "c1", "new")
        .unwrap();
    assert_eq!(
        vm.read_entry(Collection::Checkpoints, "c1")
            .unwrap()
            .as_deref(),
        Some("new")
    );
    assert!(vm.remove_entry(Collection::Checkpoints, "c1").unwrap());
    assert!(!vm.remove_entry(Collection::Checkpoints, "c1").unwrap());
    assert_eq!(vm.read_entry(Collection::Checkpoints, "c1").unwrap(), None);
}

#[test]
fn names_cannot_escape_the_domain_directory() {
    let (dir, store) = store();
    assert!(matches!(
        store.lock_domain("../evil"),
        Err(StoreError::InvalidName { kind: "domain", .. })
    ));
    let vm = store.lock_domain("vm").unwrap();
    for bad in ["../../domain", "a/b", "..", ".x"] {
        assert!(
            matches!(
                vm.write_entry(Collection::Checkpoints, bad, "x"),
                Err(StoreError::InvalidName {
                    kind: "checkpoint",
                    ..
                })
            ),
            "{bad:?} accepted"
        );
        assert!(vm.read_entry(Collection::Backups, bad).is_err());
    }
    // Nothing was written anywhere outside the store.
    let outside: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(outside.len(), 1);
}

#[test]
fn crash_between_temp_write_and_rename_keeps_the_old_file() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm").unwrap();
    vm.write_entry(Collection::Checkpoints, "c1", "version 1")
        .unwrap();
    let staged = vm
        .stage_entry(Collection::Checkpoints, "c1", "version 2")
        .unwrap();
    let temp = staged.temp_path().to_owned();
    assert_eq!(fs::read_to_string(&temp).unwrap(), "version 2");
    // A crash: the process dies before the rename and nothing cleans up.
    std::mem::forget(staged);

    assert_eq!(
        vm.read_entry(Collection::Checkpoints, "c1")
            .unwrap()
            .as_deref(),
        Some("version 1")
    );
    assert_eq!(vm.list_entries(Collection::Checkpoints).unwrap(), ["c1"]);
    drop(vm);

    // The next holder of the lock clears the leftover.
    let vm = store.lock_domain("vm").unwrap();
    assert!(!temp.exists());
    assert_eq!(
        vm.read_entry(Collection::Checkpoints, "c1")
            .unwrap()
            .as_deref(),
        Some("version 1")
    );
}

#[test]
fn committed_stage_replaces_and_dropped_stage_leaves_nothing() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm").unwrap();
    vm.write_entry(Collection::Backups, "b", "1").unwrap();
    let dropped = vm.stage_entry(Collection::Backups, "b", "2").unwrap();
    let temp = dropped.temp_path().to_owned();
    drop(dropped);
    assert!(!temp.exists());
    vm.stage_entry(Collection::Backups, "b", "3")
        .unwrap()
        .commit()
        .unwrap();
    assert_eq!(
        vm.read_entry(Collection::Backups, "b").unwrap().as_deref(),
        Some("3")
    );
}

#[test]
fn second_lock_on_a_domain_is_refused_until_the_first_is_dropped() {
    let (_dir, store) = store();
    let first = store.lock_domain("vm").unwrap();
    assert!(matches!(
        store.lock_domain("vm"),
        Err(StoreError::Locked { ref domain, .. }) if domain == "vm"
    ));
    // Other domains are independent.
    let other = store.lock_domain("other").unwrap();
    drop(first);
    let again = store.lock_domain("vm").unwrap();
    drop((other, again));
}

#[test]
fn lock_excludes_another_process() {
    let (_dir, store) = store();
    let lock_file = store.root().join("locks/vm.lock");
    let held = store.lock_domain("vm").unwrap();
    // flock(1) uses the same flock(2) lock as the store.
    let status = Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "42"])
        .arg(&lock_file)
        .arg("true")
        .status()
        .expect("flock(1) runs");
    assert_eq!(status.code(), Some(42), "another process got the lock");
    drop(held);
    let status = Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "42"])
        .arg(&lock_file)
        .arg("true")
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn failed_rename_is_a_typed_error_and_leaves_no_temp_file() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm").unwrap();
    // A directory squatting on the destination makes the rename fail, even for root.
    let squatter = vm.dir().join("checkpoints/c1.xml");
    fs::create_dir_all(squatter.join("inside")).unwrap();
    let err = vm
        .write_entry(Collection::Checkpoints, "c1", "<x/>")
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Io { op: "rename", ref path, .. } if *path == squatter),
        "{err:?}"
    );
    let leftovers: Vec<_> = fs::read_dir(vm.dir().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("c1.xml")]);
}

#[test]
fn removing_a_domain_removes_its_directory() {
    let (_dir, store) = store();
    let vm = store.lock_domain("vm").unwrap();
    vm.write_domain_xml("<domain/>").unwrap();
    vm.write_entry(Collection::Checkpoints, "c1", "x").unwrap();
    vm.remove_all().unwrap();
    assert!(!vm.dir().exists());
    assert!(store.list_domains().unwrap().is_empty());
    assert_eq!(vm.read_domain_xml().unwrap(), None);
}
