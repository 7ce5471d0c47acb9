//! The core's domain state machine driving the simulator through [`FaultyLink`]: the commands the
//! core really sends must be accepted, and the backups it makes must restore to the disk at
//! their point in time.

use std::cell::{Ref, RefCell, RefMut};
use std::rc::Rc;

use serde_json::json;
use vbackup_core::Domain;
use vbackup_core::backup::{
    BackupDiskSpec, BackupMode, BackupSpec, BackupStore, NbdServer, NbdTransport, StoreKind,
};
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk, CheckpointTree};
use vbackup_core::domain::{DomainConfig, Reply, Request};
use vbackup_core::driver::Driver;
use vbackup_core::export::ExportReader;
use vbackup_core::link::Link;
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup_sim::world::StoreEffects;
use vbackup_sim::world::link::FaultyLink;
use vbackup_sim::{Config, FileSystem, Flavor, Qemu};

const MIB: u64 = 1 << 20;
const STEPS: usize = 10_000;

type Sim = Driver<FaultyLink, StoreEffects>;

fn domain_def() -> DomainDef {
    DomainDef {
        name: "lab1".into(),
        uuid: None,
        disks: vec![DiskDef {
            target: "vda".into(),
            device: DiskDevice::Disk,
            bus: Some("virtio".into()),
            readonly: false,
            transient: false,
            layers: vec![Layer {
                storage: StorageType::File,
                format: ImageFormat::Qcow2,
                path: Some("/img/vda.qcow2".into()),
                index: None,
                node_name: Some("libvirt-1-format".into()),
            }],
        }],
    }
}

fn checkpoint(name: &str) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        description: None,
        parent: None,
        creation_time_s: 1_700_000_000,
        disks: vec![CheckpointDisk {
            target: "vda".into(),
            bitmap: Some(name.into()),
            size_bytes: None,
        }],
        domain_xml: None,
    }
}

fn spec(mode: BackupMode, incremental: Option<&str>, path: &str) -> BackupSpec {
    BackupSpec {
        mode,
        incremental: incremental.map(Into::into),
        server: (mode == BackupMode::Pull).then(|| NbdServer {
            transport: NbdTransport::Unix {
                socket: "/run/nbd.sock".into(),
            },
            tls: None,
        }),
        disks: vec![BackupDiskSpec {
            target: "vda".into(),
            backup: true,
            incremental: incremental.map(Into::into),
            store: Some(BackupStore {
                kind: StoreKind::File,
                path: Some(path.into()),
                format: None,
            }),
            export_name: None,
            export_bitmap: None,
        }],
    }
}

fn started() -> Sim {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/img/vda.qcow2", 64 * MIB, 65536, None);
    let mut q = Qemu::negotiated(
        fs,
        Config {
            flavor: Flavor::System,
            ..Config::default()
        },
    );
    for c in [
        json!({"driver": "file", "node-name": "libvirt-1-storage", "filename": "/img/vda.qcow2"}),
        json!({"driver": "qcow2", "node-name": "libvirt-1-format", "file": "libvirt-1-storage"}),
    ] {
        q.execute(0, &json!({"execute": "blockdev-add", "arguments": c}))
            .unwrap();
    }
    q.add_device("virtio-disk0", "libvirt-1-format").unwrap();
    // A fresh connection: the process greets and expects negotiation again.
    q.new_monitor_connection();
    let domain = Domain::new(
        domain_def(),
        DomainConfig::default(),
        CheckpointTree::new(),
        None,
    );
    let qemu = Rc::new(RefCell::new(q));
    let mut d = Driver::new(
        domain,
        FaultyLink::new(qemu.clone()),
        StoreEffects::new(qemu),
    );
    // The greeting tells the domain a session is open; it negotiates and reconciles.
    for _ in 0..50 {
        if d.domain().view().connected {
            break;
        }
        d.step(None).unwrap();
    }
    assert!(d.domain().view().connected);
    d
}

fn call(d: &mut Sim, r: Request) -> Reply {
    let id = d.submit(r).unwrap();
    for _ in 0..STEPS {
        if let Some(answer) = d.answer(id) {
            return answer.unwrap_or_else(|e| panic!("request failed: {e}"));
        }
        d.step(None).unwrap();
    }
    panic!("no answer");
}

fn finish_backup(d: &mut Sim) {
    for _ in 0..STEPS {
        if d.domain().view().backup.is_none() {
            return;
        }
        let t = d.link().now().plus_ms(100);
        d.step(Some(t)).unwrap();
    }
    panic!("backup did not finish");
}

fn qemu(d: &Sim) -> Ref<'_, Qemu> {
    d.link().qemu().borrow()
}

fn qemu_mut(d: &Sim) -> RefMut<'_, Qemu> {
    d.link().qemu().borrow_mut()
}

fn write(d: &mut Sim, offset: u64, len: usize, byte: u8) {
    let now = d.link().now().as_ms();
    qemu_mut(d)
        .guest_write(now, "virtio-disk0", offset, &vec![byte; len])
        .unwrap();
}

fn disk(d: &Sim) -> Vec<u8> {
    qemu(d).guest_disk("virtio-disk0").unwrap()
}

#[test]
fn core_push_full_then_incremental_restores_byte_for_byte() {
    let mut d = started();
    write(&mut d, 0, MIB as usize, 0x11);
    write(&mut d, 20 * MIB + 100, 5000, 0x12);
    assert_eq!(
        call(
            &mut d,
            Request::BackupBegin {
                spec: spec(BackupMode::Push, None, "/backups/full.qcow2"),
                checkpoint: Some(checkpoint("c1")),
                reuse_external: false
            }
        ),
        Reply::Done
    );
    let at_full = disk(&d);
    write(&mut d, 0, 65536, 0x21);
    finish_backup(&mut d);
    assert_eq!(
        qemu(&d).fs().read_image("/backups/full.qcow2").unwrap(),
        at_full
    );

    write(&mut d, 40 * MIB, 512 * 1024, 0x31);
    assert_eq!(
        call(
            &mut d,
            Request::BackupBegin {
                spec: spec(BackupMode::Push, Some("c1"), "/backups/inc.qcow2"),
                checkpoint: Some(checkpoint("c2")),
                reuse_external: false
            }
        ),
        Reply::Done
    );
    let at_inc = disk(&d);
    write(&mut d, 40 * MIB, 65536, 0x41);
    finish_backup(&mut d);
    {
        let mut q = qemu_mut(&d);
        let fs = q.fs_mut();
        fs.rebase_unsafe("/backups/inc.qcow2", Some("/backups/full.qcow2"))
            .unwrap();
        assert!(
            fs.read_image("/backups/inc.qcow2").unwrap() == at_inc,
            "restore equals the disk at the incremental's point in time"
        );
    }
    let mut names: Vec<String> = d
        .domain()
        .view()
        .checkpoints
        .iter()
        .map(|c| c.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["c1", "c2"]);
    assert_eq!(d.domain().view().checkpoints.current(), Some("c2"));
}

#[test]
fn core_pull_backup_serves_the_point_in_time_while_the_guest_writes() {
    let mut d = started();
    write(&mut d, 0, 2 * MIB as usize, 0x51);
    call(
        &mut d,
        Request::CheckpointCreate {
            checkpoint: checkpoint("c1"),
            quiesce: false,
        },
    );
    write(&mut d, MIB, 65536, 0x52);
    assert_eq!(
        call(
            &mut d,
            Request::BackupBegin {
                spec: spec(BackupMode::Pull, Some("c1"), "/scratch/vda.qcow2"),
                checkpoint: Some(checkpoint("c2")),
                reuse_external: false
            }
        ),
        Reply::Done
    );
    let at_begin = disk(&d);
    write(&mut d, 0, 4 * MIB as usize, 0x53);
    {
        let q = qemu(&d);
        let mut v = q.export_reader("vda").unwrap();
        let contexts = v.meta_contexts();
        let bitmap_ctx = contexts
            .iter()
            .find(|c| c.starts_with("qemu:dirty-bitmap:"))
            .expect("bitmap exported")
            .clone();
        let mut buf = vec![0u8; v.size() as usize];
        v.read_at(0, &mut buf).unwrap();
        assert!(buf == at_begin, "the export shows the point in time");
        let dirty: u64 = v
            .block_status(&bitmap_ctx, 0, v.size())
            .unwrap()
            .iter()
            .filter(|e| e.flags & 1 == 1)
            .map(|e| e.length)
            .sum();
        assert_eq!(dirty, 65536);
    }
    call(&mut d, Request::AbortJob);
    finish_backup(&mut d);
}

/// Boots the domain's nodes in a fresh process, as a VM start does with `-blockdev`.
fn boot(q: &mut Qemu) {
    q.execute(0, &json!({"execute": "qmp_capabilities"}))
        .unwrap();
    for c in [
        json!({"driver": "file", "node-name": "libvirt-1-storage", "filename": "/img/vda.qcow2"}),
        json!({"driver": "qcow2", "node-name": "libvirt-1-format", "file": "libvirt-1-storage"}),
    ] {
        q.execute(0, &json!({"execute": "blockdev-add", "arguments": c}))
            .unwrap();
    }
    q.add_device("virtio-disk0", "libvirt-1-format").unwrap();
    q.new_monitor_connection();
}

#[test]
fn after_a_qemu_crash_the_core_never_makes_a_wrong_incremental() {
    let mut d = started();
    write(&mut d, 0, MIB as usize, 0x61);
    assert_eq!(
        call(
            &mut d,
            Request::BackupBegin {
                spec: spec(BackupMode::Push, None, "/backups/full.qcow2"),
                checkpoint: Some(checkpoint("c1")),
                reuse_external: false
            }
        ),
        Reply::Done
    );
    finish_backup(&mut d);
    write(&mut d, 8 * MIB, 65536, 0x62);
    // QEMU dies: the checkpoint bitmap created in this run never reached the image.
    qemu_mut(&d).crash();
    d.link_mut().drop_connection();
    assert!(d.step(None).is_err());
    qemu_mut(&d).restart();
    boot(&mut qemu_mut(&d));
    d.link_mut().reconnect();
    for _ in 0..50 {
        if d.domain().view().connected {
            break;
        }
        let _ = d.step(None);
    }
    assert!(
        d.domain().view().connected,
        "the domain reconnects to the restarted QEMU"
    );
    write(&mut d, 9 * MIB, 65536, 0x63);
    let id = d
        .submit(Request::BackupBegin {
            spec: spec(BackupMode::Push, Some("c1"), "/backups/inc.qcow2"),
            checkpoint: Some(checkpoint("c2")),
            reuse_external: false,
        })
        .unwrap();
    let answer = d.wait(id, STEPS).unwrap();
    if answer.is_ok() {
        let at_inc = disk(&d);
        finish_backup(&mut d);
        let mut q = qemu_mut(&d);
        let fs = q.fs_mut();
        fs.rebase_unsafe("/backups/inc.qcow2", Some("/backups/full.qcow2"))
            .unwrap();
        assert!(
            fs.read_image("/backups/inc.qcow2").unwrap() == at_inc,
            "an incremental that ran restores correctly"
        );
    }
}
