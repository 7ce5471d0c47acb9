//! The checkpoint index against real qemu-storage-daemon: a domain loaded through the index
//! equals the one parsed from the checkpoint files, and an index that is missing, torn or
//! stale (a checkpoint file changed behind it) is rebuilt from the files. A missing QEMU tool
//! fails the test (it never skips).

mod support;

use std::fs;

use support::Lab;

const INDEX: &str = "checkpoint-index.json";

#[test]
fn index_missing_torn_or_stale_is_rebuilt_from_the_checkpoint_files() {
    let Some(lab) = Lab::new("checkpoint index") else {
        return;
    };
    lab.define_vm("vda.qcow2", 16);
    lab.ok(&["start", "vm"]);
    for c in ["c1", "c2", "c3"] {
        lab.ok(&["checkpoint-create-as", "vm", c, &format!("about {c}")]);
    }
    let dir = lab.state().join("domains/vm");
    let index = dir.join(INDEX);
    assert!(index.exists(), "the index is written with the checkpoints");
    let tree = lab.ok(&["checkpoint-list", "vm", "--tree"]);
    let through_index = lab.json(&["checkpoint-list", "vm", "--json"]);
    let dump = lab.ok(&["checkpoint-dumpxml", "vm", "c2"]);

    // Missing: the files are parsed, the listing is the same, and the index is back.
    fs::remove_file(&index).unwrap();
    assert_eq!(
        lab.json(&["checkpoint-list", "vm", "--json"]),
        through_index
    );
    assert_eq!(lab.ok(&["checkpoint-dumpxml", "vm", "c2"]), dump);
    assert!(index.exists(), "a load under the lock rebuilds the index");

    // Torn: the same.
    fs::write(&index, b"{\"version\":1,\"sta").unwrap();
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--tree"]), tree);
    assert!(fs::read_to_string(&index).unwrap().len() > 20);

    // Stale: a checkpoint file replaced behind the index's back wins over the index.
    let file = dir.join("checkpoints/c2.xml");
    let edited = fs::read_to_string(&file)
        .unwrap()
        .replace("about c2", "edited by hand");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tmp = dir.join("checkpoints/c2.xml.new");
    fs::write(&tmp, edited).unwrap();
    fs::rename(&tmp, &file).unwrap();
    assert!(
        lab.ok(&["checkpoint-dumpxml", "vm", "c2"])
            .contains("<description>edited by hand</description>")
    );

    // Deleting through the index keeps it current.
    lab.ok(&["checkpoint-delete", "vm", "c1", "--children-only"]);
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), "c1\n");
    fs::remove_file(&index).unwrap();
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), "c1\n");
    lab.ok(&["shutdown", "vm"]);
}
