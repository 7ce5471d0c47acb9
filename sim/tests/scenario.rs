//! End-to-end: a full push backup, guest writes, an incremental push backup with writes during
//! it, then a restore (the incremental rebased onto the full) compared byte for byte with the
//! disk at the incremental's point in time.

mod common;
use common::*;
use serde_json::json;
use vbackup_sim::{Config, FileSystem, Flavor, Qemu};

fn vm() -> Qemu {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/srv/vda.qcow2", 64 * MIB, 65536, None);
    let mut q = Qemu::new(
        fs,
        Config {
            flavor: Flavor::System,
            ..Config::default()
        },
    );
    q.execute(0, &json!({"execute": "qmp_capabilities"}))
        .unwrap();
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "file", "node-name": "vda-storage", "filename": "/srv/vda.qcow2"}),
    );
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "vda-format", "file": "vda-storage"}),
    );
    q.add_device("virtio-disk0", "vda-format").unwrap();
    q
}

fn hmp_write(q: &mut Qemu, cmd: &str) {
    let line = format!("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"{cmd}\"");
    assert_eq!(
        ok(q, "human-monitor-command", json!({"command-line": line})),
        json!("")
    );
}

/// libvirt's push target: created by blockdev-create, opened with the given backing.
fn create_target(q: &mut Qemu, name: &str, backing_file: Option<&str>, backing: serde_json::Value) {
    let path = format!("/srv/backups/{name}.qcow2");
    q.fs_mut().touch(&path);
    ok(
        q,
        "blockdev-add",
        json!({"driver": "file", "filename": path, "node-name": format!("{name}-storage"), "auto-read-only": true, "discard": "unmap"}),
    );
    let mut opts = json!({"driver": "qcow2", "file": format!("{name}-storage"), "size": 64 * MIB, "cluster-size": 65536});
    if let Some(b) = backing_file {
        opts["backing-file"] = json!(b);
        opts["backing-fmt"] = json!("qcow2");
    }
    ok(
        q,
        "blockdev-create",
        json!({"job-id": format!("create-{name}"), "options": opts}),
    );
    wait(q, 5);
    ok(q, "job-dismiss", json!({"id": format!("create-{name}")}));
    ok(
        q,
        "blockdev-add",
        json!({"node-name": name, "read-only": false, "driver": "qcow2", "file": format!("{name}-storage"), "backing": backing}),
    );
}

fn finish(q: &mut Qemu, job: &str, target: &str) {
    for _ in 0..100 {
        if crate::job(q, job).is_some_and(|j| j["status"] == "concluded") {
            break;
        }
        wait(q, 10);
    }
    let j = crate::job(q, job).unwrap();
    assert_eq!(j["status"], "concluded");
    assert!(j.get("error").is_none(), "{j}");
    ok(q, "job-dismiss", json!({"id": job}));
    ok(q, "blockdev-del", json!({"node-name": target}));
    ok(
        q,
        "blockdev-del",
        json!({"node-name": format!("{target}-storage")}),
    );
}

#[test]
fn restoring_full_plus_incremental_gives_the_disk_at_the_incremental_point_in_time() {
    let mut q = vm();
    hmp_write(&mut q, "write -P 0x11 0 1M");
    hmp_write(&mut q, "write -P 0x12 8M 64k");
    q.guest_write(0, "virtio-disk0", 20 * MIB + 1000, &pattern(7, 100_000))
        .unwrap();

    // Full backup with a checkpoint, atomically.
    create_target(&mut q, "full", None, json!(null));
    ok(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "vda-format", "name": "c1", "persistent": true, "disabled": false}},
        {"type": "blockdev-backup", "data": {"device": "vda-format", "job-id": "backup-full", "target": "full", "sync": "full", "auto-finalize": true, "auto-dismiss": false}}]}),
    );
    let at_full = q.guest_disk("virtio-disk0").unwrap();
    // Writes while the full backup runs land after its point in time.
    hmp_write(&mut q, "write -P 0x21 0 64k");
    q.guest_write(q.now_ms(), "vda-format", 30 * MIB, &pattern(9, 3 * 65536))
        .unwrap();
    finish(&mut q, "backup-full", "full");
    assert_eq!(
        q.fs().read_image("/srv/backups/full.qcow2").unwrap(),
        at_full
    );

    hmp_write(&mut q, "write -P 0x31 40M 512k");
    hmp_write(&mut q, "write -P 0x32 63M 1M");

    // Incremental from c1, with the next checkpoint, libvirt's shape.
    create_target(&mut q, "inc", Some("/srv/vda.qcow2"), json!("vda-format"));
    ok(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "vda-format", "name": "c2", "persistent": true, "disabled": false}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "vda-format", "name": "backup-vda", "persistent": false, "disabled": true, "granularity": 65536}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "vda-format", "target": "backup-vda", "bitmaps": [{"node": "vda-format", "name": "c1"}]}},
        {"type": "blockdev-backup", "data": {"device": "vda-format", "job-id": "backup-inc", "target": "inc", "sync": "incremental", "bitmap": "backup-vda", "auto-finalize": true, "auto-dismiss": false}}]}),
    );
    let at_inc = q.guest_disk("virtio-disk0").unwrap();
    let dirty = count(&mut q, "vda-format", "backup-vda");
    assert_eq!(dirty, 65536 + 3 * 65536 + 8 * 65536 + 16 * 65536);
    hmp_write(&mut q, "write -P 0x41 40M 64k");
    hmp_write(&mut q, "write -P 0x42 50M 64k");
    finish(&mut q, "backup-inc", "inc");
    ok(
        &mut q,
        "block-dirty-bitmap-remove",
        json!({"node": "vda-format", "name": "backup-vda"}),
    );
    assert_eq!(count(&mut q, "vda-format", "c2"), 2 * 65536);

    // The incremental holds exactly the dirty clusters.
    let allocated: u64 = q
        .fs()
        .allocated_ranges("/srv/backups/inc.qcow2")
        .unwrap()
        .iter()
        .map(|r| r.1)
        .sum();
    assert_eq!(allocated, dirty);
    // Restore: rebase the incremental onto the full backup and read the chain.
    q.fs_mut()
        .rebase_unsafe("/srv/backups/inc.qcow2", Some("/srv/backups/full.qcow2"))
        .unwrap();
    let restored = q.fs().read_image("/srv/backups/inc.qcow2").unwrap();
    assert!(
        restored == at_inc,
        "restored image differs from the disk at the incremental's point in time"
    );
    assert_ne!(q.guest_disk("virtio-disk0").unwrap(), at_inc);
}

#[test]
fn a_running_backup_takes_over_the_device_edge_and_gives_it_back() {
    let mut q = vm();
    let inserted = |q: &mut Qemu| ok(q, "query-block", json!({}))[0]["inserted"].clone();
    assert_eq!(inserted(&mut q)["node-name"], "vda-format");
    let path = "/srv/scratch.qcow2";
    q.fs_mut()
        .create_qcow2(path, 64 * MIB, 65536, Some("/srv/vda.qcow2"));
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "scratch", "backing": "vda-format", "file": {"driver": "file", "filename": path}}),
    );
    ok(
        &mut q,
        "blockdev-backup",
        json!({"job-id": "fleece", "device": "vda-format", "target": "scratch", "sync": "none"}),
    );
    let during = inserted(&mut q);
    assert_eq!(during["drv"], "copy-before-write");
    assert!(during["node-name"].as_str().unwrap().starts_with("#block"));
    assert_eq!(during["file"], "/srv/vda.qcow2");
    // Guest writes through the device are copied out first.
    hmp_write(&mut q, "write -P 0x77 0 64k");
    assert_eq!(job(&mut q, "fleece").unwrap()["current-progress"], 65536);
    ok(&mut q, "job-cancel", json!({"id": "fleece"}));
    assert_eq!(inserted(&mut q)["node-name"], "vda-format");
    assert!(job(&mut q, "fleece").is_none());
}

#[test]
fn other_drivers_open_and_read() {
    let mut q = vm();
    q.fs_mut().create_raw("/dev/sdz", MIB);
    q.fs_mut().write_image("/dev/sdz", 10, &[3; 5]).unwrap();
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "blk", "file": {"driver": "host_device", "filename": "/dev/sdz"}}),
    );
    assert_eq!(q.guest_read("blk", 9, 7).unwrap(), [0, 3, 3, 3, 3, 3, 0]);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null", "size": MIB}),
    );
    assert_eq!(q.guest_read("null", 0, 4).unwrap(), [0; 4]);
    q.fs_mut().create_qcow2("/srv/base.qcow2", MIB, 65536, None);
    q.fs_mut()
        .write_image("/srv/base.qcow2", 0, &[8; 3])
        .unwrap();
    q.fs_mut().create_qcow2("/srv/over.qcow2", MIB, 65536, None);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "over",
        "file": {"driver": "file", "filename": "/srv/over.qcow2"},
        "backing": {"driver": "qcow2", "node-name": "base", "file": {"driver": "file", "filename": "/srv/base.qcow2"}}}),
    );
    assert_eq!(q.guest_read("over", 0, 4).unwrap(), [8, 8, 8, 0]);
    assert_eq!(
        err(&mut q, "blockdev-del", json!({"node-name": "base"})),
        "Node base is not owned by the monitor"
    );
    ok(&mut q, "blockdev-del", json!({"node-name": "over"}));
    assert_eq!(
        err(&mut q, "blockdev-del", json!({"node-name": "base"})),
        "Failed to find node with node-name='base'"
    );
}
