//! The rules of issue 11 outside the managed-backup workflow, through the `vbackup` binary
//! against real qemu-storage-daemon: nothing takes over an existing domain, a damaged job
//! journal still lets the job be ended, disks left out of backups need no checkpoint, and a
//! grown disk backs up by pull as by push. Each test has its own state directory and small
//! images and stops every process it caused (see [`Lab`]'s drop).

mod support;

use support::Lab;

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
