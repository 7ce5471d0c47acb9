//! NBD server and exports: refusals, bitmaps in exports, the pull point in time, the graph
//! QEMU refuses (reference §6C).

mod common;
use common::*;
use serde_json::json;
use vbackup_core::export::{ExportReader, Extent, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use vbackup_sim::world::{compare_export, read_export};

fn start_server(q: &mut vbackup_sim::Qemu) {
    ok(
        q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/run/nbd.sock"}}}),
    );
}

#[test]
fn server_and_export_refusals_use_qemu_texts() {
    let mut q = daemon_with_disk();
    assert_eq!(
        err(&mut q, "nbd-server-stop", json!({})),
        "NBD server not running"
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk"})
        ),
        "NBD server not running"
    );
    start_server(&mut q);
    assert_eq!(
        err(
            &mut q,
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "::", "port": "10809"}}})
        ),
        "NBD server already running"
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "nope"})
        ),
        "Cannot find device='' nor node-name='nope'"
    );
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "name": "vda"}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk"})
        ),
        "Block export id 'e' is already in use"
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "f", "node-name": "disk", "name": "vda"})
        ),
        "NBD server already has export named 'vda'"
    );
    assert_eq!(
        err(&mut q, "block-export-del", json!({"id": "zz"})),
        "Export 'zz' is not found"
    );
    assert_eq!(
        err(&mut q, "blockdev-del", json!({"node-name": "disk"})),
        "Node disk is in use"
    );
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "live"}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "g", "node-name": "disk", "name": "g", "bitmaps": ["live"]})
        ),
        "Enabled bitmap 'live' incompatible with readonly export"
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "g", "node-name": "disk", "name": "g", "bitmaps": ["nope"]})
        ),
        "Bitmap 'nope' is not found"
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "g", "node-name": "disk", "name": "g", "bitmaps": [{"node": "disk", "name": "nope"}]})
        ),
        "Dirty bitmap 'nope' not found"
    );
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "frozen", "disabled": true}),
    );
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "g", "node-name": "disk", "name": "g", "bitmaps": ["frozen"]}),
    );
    assert_eq!(bitmap(&mut q, "disk", "frozen").unwrap()["busy"], true);
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-remove",
            json!({"node": "disk", "name": "frozen"})
        ),
        "Bitmap 'frozen' is currently in use by another operation and cannot be used"
    );
    ok(&mut q, "nbd-server-stop", json!({}));
    assert_eq!(
        take_names(&mut q),
        ["BLOCK_EXPORT_DELETED/g", "BLOCK_EXPORT_DELETED/e"]
    );
    assert_eq!(bitmap(&mut q, "disk", "frozen").unwrap()["busy"], false);
}

/// The disk with 4 MiB of data, then checkpoint bitmap `chk1`.
fn disk_with_checkpoint() -> vbackup_sim::Qemu {
    let mut q = daemon_with_disk();
    q.guest_write(0, "disk", 0, &pattern(1, 4 * MIB as usize))
        .unwrap();
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "chk1", "persistent": true}),
    );
    q
}

/// A scratch image for fleecing, its backing the disk (reference §6B).
fn add_scratch(q: &mut vbackup_sim::Qemu) {
    q.fs_mut().create_qcow2(
        "/img/scratch.qcow2",
        64 * MIB,
        65536,
        Some("/img/disk.qcow2"),
    );
    ok(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "scratch", "backing": "disk",
        "file": {"driver": "file", "node-name": "scratch-file", "filename": "/img/scratch.qcow2"}}),
    );
}

fn read_all(v: &mut vbackup_sim::ExportView<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf).unwrap();
    buf
}

/// Pull mode the legacy way (reference §6B): scratch backed by the disk, `sync: none` in the
/// same transaction as the bitmap split, the export carries the frozen bitmap.
#[test]
fn guest_writes_during_a_pull_do_not_change_what_the_export_reads() {
    let mut q = disk_with_checkpoint();
    q.guest_write(0, "disk", MIB, &pattern(2, MIB as usize))
        .unwrap();
    q.guest_write(0, "disk", 16 * MIB, &pattern(3, 131072))
        .unwrap();
    let before = q.guest_disk("disk").unwrap();
    add_scratch(&mut q);
    ok(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "backup-src", "persistent": false, "disabled": true, "granularity": 65536}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk", "target": "backup-src", "bitmaps": ["chk1"]}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "chk2", "persistent": true, "granularity": 65536}},
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "fleece", "target": "scratch", "sync": "none", "auto-dismiss": false}}]}),
    );
    assert_eq!(
        job(&mut q, "fleece").unwrap(),
        json!({"current-progress": 0, "status": "running", "total-progress": 67108864, "type": "backup", "id": "fleece"})
    );
    start_server(&mut q);
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "pull", "node-name": "scratch", "name": "pull", "writable": false, "bitmaps": ["backup-src"]}),
    );
    {
        let mut v = q.export_reader("pull").unwrap();
        assert_eq!(
            v.meta_contexts(),
            ["base:allocation", "qemu:dirty-bitmap:backup-src"]
        );
        assert_eq!(read_all(&mut v), before);
        assert_eq!(
            v.block_status("qemu:dirty-bitmap:backup-src", 0, 64 * MIB)
                .unwrap(),
            vec![
                Extent {
                    length: MIB,
                    flags: 0
                },
                Extent {
                    length: MIB,
                    flags: STATE_DIRTY
                },
                Extent {
                    length: 14 * MIB,
                    flags: 0
                },
                Extent {
                    length: 131072,
                    flags: STATE_DIRTY
                },
                Extent {
                    length: 48 * MIB - 131072,
                    flags: 0
                }
            ]
        );
        assert_eq!(
            v.block_status("base:allocation", 0, 64 * MIB).unwrap(),
            vec![
                Extent {
                    length: 4 * MIB,
                    flags: 0
                },
                Extent {
                    length: 12 * MIB,
                    flags: STATE_HOLE | STATE_ZERO
                },
                Extent {
                    length: 131072,
                    flags: 0
                },
                Extent {
                    length: 48 * MIB - 131072,
                    flags: STATE_HOLE | STATE_ZERO
                }
            ]
        );
    }
    // The guest writes over a dirty area and a clean hole while the client reads.
    q.guest_write(10, "disk", 0, &vec![0xa1; 2 * MIB as usize])
        .unwrap();
    q.guest_write(20, "disk", 32 * MIB, &vec![0xa2; MIB as usize])
        .unwrap();
    assert_ne!(q.guest_disk("disk").unwrap(), before);
    {
        let mut v = q.export_reader("pull").unwrap();
        assert_eq!(read_all(&mut v), before);
        assert_eq!(
            v.block_status("qemu:dirty-bitmap:backup-src", 0, 2 * MIB)
                .unwrap()[1],
            Extent {
                length: MIB,
                flags: STATE_DIRTY
            }
        );
        // The hole that was copied before the write now reads as a zero cluster.
        assert_eq!(
            v.block_status("base:allocation", 32 * MIB, MIB).unwrap(),
            vec![Extent {
                length: MIB,
                flags: STATE_ZERO
            }]
        );
        let mut b = [0u8; 1];
        assert!(v.read_at(64 * MIB, &mut b).is_err());
        assert!(v.block_status("qemu:dirty-bitmap:nope", 0, 1).is_err());
    }
    assert_eq!(job(&mut q, "fleece").unwrap()["current-progress"], 3 * MIB);
    assert_eq!(count(&mut q, "disk", "chk2"), 3 * MIB);
    q.take_events();
    ok(&mut q, "block-export-del", json!({"id": "pull"}));
    assert_eq!(
        take_names(&mut q),
        [
            "paused/fleece",
            "running/fleece",
            "paused/fleece",
            "running/fleece",
            "paused/fleece",
            "running/fleece",
            "BLOCK_EXPORT_DELETED/pull"
        ]
    );
    ok(&mut q, "job-cancel", json!({"id": "fleece"}));
    let ev = q.take_events();
    assert_eq!(
        event_names(&ev),
        [
            "aborting/fleece",
            "BLOCK_JOB_CANCELLED/fleece",
            "concluded/fleece"
        ]
    );
    assert_eq!(
        ev[1]["data"],
        json!({"device": "fleece", "len": 67108864, "offset": 3 * MIB, "speed": 0, "type": "backup"})
    );
    ok(&mut q, "job-dismiss", json!({"id": "fleece"}));
    ok(&mut q, "blockdev-del", json!({"node-name": "scratch"}));
    ok(
        &mut q,
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "backup-src"}),
    );
    assert_eq!(
        q.fs().allocated_ranges("/img/scratch.qcow2").unwrap(),
        vec![(0, 2 * MIB), (32 * MIB, MIB)]
    );
}

/// The checkers' shortcuts read what the byte paths read: a guest snapshot (shared clusters)
/// equals the disk byte for byte, also under a running fleecing job, and comparing an export
/// cluster by cluster (shared clusters by reference) agrees with reading it whole.
#[test]
fn shared_cluster_snapshots_and_export_comparison_match_byte_reads() {
    let mut q = disk_with_checkpoint();
    let at_chk1 = q.guest_snapshot("disk").unwrap();
    assert_eq!(at_chk1.to_bytes(), q.guest_disk("disk").unwrap());
    // Partial clusters, and a write that straddles two clusters.
    q.guest_write(0, "disk", MIB + 100, &pattern(2, 70_000))
        .unwrap();
    q.guest_write(0, "disk", 16 * MIB - 10, &pattern(3, 20))
        .unwrap();
    let before = q.guest_snapshot("disk").unwrap();
    assert_eq!(before.to_bytes(), q.guest_disk("disk").unwrap());
    add_scratch(&mut q);
    ok(
        &mut q,
        "transaction",
        json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "backup-src", "persistent": false, "disabled": true, "granularity": 65536}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk", "target": "backup-src", "bitmaps": ["chk1"]}},
        {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "fleece", "target": "scratch", "sync": "none", "auto-dismiss": false}}]}),
    );
    start_server(&mut q);
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "pull", "node-name": "scratch", "name": "pull", "writable": false, "bitmaps": ["backup-src"]}),
    );
    q.guest_write(10, "disk", 0, &vec![0xa1; 2 * MIB as usize])
        .unwrap();
    q.guest_write(20, "disk", 32 * MIB + 5, &vec![0xa2; 1000])
        .unwrap();
    let now = q.guest_snapshot("disk").unwrap();
    assert_eq!(now.to_bytes(), q.guest_disk("disk").unwrap());
    assert_ne!(now, before);
    let mut v = q.export_reader("pull").unwrap();
    // Full and incremental reads both give the point in time...
    assert_eq!(compare_export(&mut v, None, &before), Ok(None));
    assert_eq!(compare_export(&mut v, Some(&at_chk1), &before), Ok(None));
    let base = at_chk1.to_bytes();
    assert_eq!(read_export(&mut v, Some(&base)).unwrap(), before.to_bytes());
    // ...and a wrong expectation is caught at its first byte.
    assert_eq!(compare_export(&mut v, None, &now), Ok(Some(0)));
    assert_eq!(
        compare_export(&mut v, Some(&at_chk1), &at_chk1),
        Ok(Some(MIB + 100))
    );
}

/// Reference §6A and §6C: copy-before-write + snapshot-access works only when every writer goes
/// through the filter.
#[test]
fn snapshot_access_next_to_a_hidden_writer_is_a_permission_conflict() {
    let mut q = daemon_with_disk();
    start_server(&mut q);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "guest-top", "file": "disk"}),
    );
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "guest-top", "name": "guest", "writable": true}),
    );
    q.fs_mut()
        .create_qcow2("/img/scratch-a.qcow2", 64 * MIB, 65536, None);
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "scratch-a", "file": {"driver": "file", "node-name": "scratch-a-file", "filename": "/img/scratch-a.qcow2"}}),
    );
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "scratch-a"}),
    );
    assert_eq!(
        err(
            &mut q,
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
        ),
        "Permission conflict on node 'disk': permissions 'write' are both required by node 'guest-top' (uses node 'disk' as 'file' child) and unshared by node 'cbw' (uses node 'disk' as 'file' child)."
    );
    // The point in time is the moment the filter entered the write path.
    q.guest_write(0, "guest", 0, &[4; 100]).unwrap();
    let before = q.guest_disk("disk").unwrap();
    // The reopen trick puts the writer above the filter; then the snapshot is allowed.
    ok(
        &mut q,
        "blockdev-reopen",
        json!({"options": [{"driver": "raw", "node-name": "guest-top", "file": "cbw"}]}),
    );
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "w", "node-name": "disk", "name": "w", "writable": true})
        ),
        "Permission conflict on node 'disk': permissions 'write' are both required by an unnamed block device (uses node 'disk' as 'root' child) and unshared by node 'cbw' (uses node 'disk' as 'file' child)."
    );
    q.guest_write(0, "guest", 0, &[5; 100]).unwrap();
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "pull-a", "node-name": "snap", "name": "pull-a"}),
    );
    q.export_write(1, "guest", 0, &[6; 65536 * 2]).unwrap();
    let mut v = q.export_reader("pull-a").unwrap();
    let got = read_all(&mut v);
    assert_eq!(got, before);
    assert_eq!(got[0], 4);
    assert_eq!(q.guest_read("guest", 0, 1).unwrap(), [6]);
}

#[test]
fn allocation_depth_tells_local_from_backing_data() {
    let mut q = daemon_with_disk();
    q.guest_write(0, "disk", 0, &[1; 65536]).unwrap();
    q.fs_mut()
        .create_qcow2("/img/top.qcow2", 64 * MIB, 65536, Some("/img/disk.qcow2"));
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "disk", "file": {"driver": "file", "filename": "/img/top.qcow2"}}),
    );
    q.guest_write(0, "top", 65536, &[2; 65536]).unwrap();
    start_server(&mut q);
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "top", "name": "e", "allocation-depth": true}),
    );
    let mut v = q.export_reader("e").unwrap();
    assert_eq!(
        v.meta_contexts(),
        ["base:allocation", "qemu:allocation-depth"]
    );
    assert_eq!(
        v.block_status("qemu:allocation-depth", 0, 4 * 65536)
            .unwrap(),
        vec![
            Extent {
                length: 65536,
                flags: 2
            },
            Extent {
                length: 65536,
                flags: 1
            },
            Extent {
                length: 2 * 65536,
                flags: 0
            }
        ]
    );
}

#[test]
fn busy_bitmaps_refuse_every_change() {
    let mut q = daemon_with_disk();
    start_server(&mut q);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b", "disabled": true}),
    );
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "other"}),
    );
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "bitmaps": ["b"]}),
    );
    let busy = "Bitmap 'b' is currently in use by another operation and cannot be used";
    for cmd in [
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-remove",
    ] {
        assert_eq!(err(&mut q, cmd, json!({"node": "disk", "name": "b"})), busy);
    }
    assert_eq!(
        err(
            &mut q,
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "b", "bitmaps": ["other"]})
        ),
        busy
    );
    // A busy bitmap may still be a merge source.
    ok(
        &mut q,
        "block-dirty-bitmap-merge",
        json!({"node": "disk", "target": "other", "bitmaps": ["b"]}),
    );
    assert_eq!(
        err(
            &mut q,
            "block-export-add",
            json!({"type": "nbd", "id": "f", "node-name": "disk", "name": "f", "bitmaps": ["b"]})
        ),
        busy
    );
}
