//! Arbitrary inputs to one domain's state machine: requests, replies decoded from fuzzer bytes,
//! events, ticks and connection changes. `handle` must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::backup::{BackupDiskSpec, BackupMode, BackupSpec, NbdServer, NbdTransport};
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk, CheckpointTree, DeleteScope};
use vbackup_core::domain::{Domain, DomainConfig, FileOpId, Input, Output, Request, RequestId};
use vbackup_core::link::{CommandId, Timestamp};
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup_core::qmp::QmpIn;

fn domain_def() -> DomainDef {
    let disk = |target: &str, node: &str| DiskDef {
        target: target.into(),
        device: DiskDevice::Disk,
        bus: None,
        readonly: false,
        transient: false,
        layers: vec![Layer {
            storage: StorageType::File,
            format: ImageFormat::Qcow2,
            path: Some(format!("/img/{target}.qcow2")),
            index: None,
            node_name: Some(node.into()),
        }],
    };
    DomainDef {
        name: "fuzz".into(),
        uuid: None,
        disks: vec![disk("vda", "n-vda"), disk("vdb", "n-vdb")],
    }
}

fn checkpoint(i: u8) -> Checkpoint {
    let name = format!("c{}", i % 4);
    Checkpoint {
        name: name.clone(),
        description: None,
        parent: None,
        creation_time_s: 0,
        disks: ["vda", "vdb"]
            .iter()
            .map(|t| CheckpointDisk {
                target: (*t).into(),
                bitmap: Some(name.clone()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

fn backup(pull: bool, inc: Option<u8>) -> BackupSpec {
    let incremental = inc.map(|i| format!("c{}", i % 4));
    BackupSpec {
        mode: if pull { BackupMode::Pull } else { BackupMode::Push },
        incremental: incremental.clone(),
        server: pull.then(|| NbdServer {
            transport: NbdTransport::Unix {
                socket: "/run/nbd.sock".into(),
            },
            tls: None,
        }),
        disks: ["vda", "vdb"]
            .iter()
            .map(|t| BackupDiskSpec {
                target: (*t).into(),
                backup: true,
                incremental: incremental.clone(),
                store: None,
                export_name: None,
                export_bitmap: None,
            })
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut domain = Domain::new(domain_def(), DomainConfig::default(), CheckpointTree::new(), None);
    let mut sent: Vec<CommandId> = Vec::new();
    let mut files: Vec<FileOpId> = Vec::new();
    let mut now = 0u64;
    let mut request = 0u64;
    let mut rest = data;
    let mut input = Some(Input::Reconnected);
    loop {
        if let Some(i) = input.take() {
            for out in domain.handle(Timestamp::from_ms(now), i) {
                match out {
                    Output::Send(id, _) => sent.push(id),
                    Output::File(id, _) => files.push(id),
                    _ => {}
                }
            }
        }
        let Some((&op, tail)) = rest.split_first() else { break };
        let arg = tail.first().copied().unwrap_or(0);
        rest = tail.get(1..).unwrap_or(&[]);
        now += u64::from(arg);
        request += 1;
        let req = RequestId(request);
        input = Some(match op % 12 {
            0 => Input::Request(req, Request::CheckpointCreate { checkpoint: checkpoint(arg), quiesce: false }),
            1 => Input::Request(req, Request::CheckpointDelete {
                name: format!("c{}", arg % 4),
                scope: [DeleteScope::Single, DeleteScope::WithChildren, DeleteScope::ChildrenOnly][usize::from(arg % 3)],
                metadata_only: arg & 0x80 != 0,
            }),
            2 => Input::Request(req, Request::BackupBegin {
                spec: backup(arg & 1 != 0, (arg & 2 != 0).then_some(arg >> 2)),
                checkpoint: (arg & 0x40 != 0).then(|| checkpoint(arg >> 3)),
                reuse_external: arg & 0x80 != 0,
            }),
            3 => Input::Request(req, Request::AbortJob),
            4 => Input::Request(req, Request::CheckpointGetXml { name: format!("c{}", arg % 4), size: true }),
            5 => Input::Tick,
            6 => Input::LinkDown,
            7 => Input::Reconnected,
            8 => match files.pop() {
                Some(id) => Input::FileDone(
                    id,
                    if arg & 1 == 0 {
                        Ok(())
                    } else {
                        Err(vbackup_core::domain::FileError::other("", "refused"))
                    },
                ),
                None => continue,
            },
            _ => {
                // A message from QEMU: the next `arg` bytes, decoded; a reply is matched to an
                // outstanding command.
                let len = usize::from(arg).min(rest.len());
                let (bytes, tail) = rest.split_at(len);
                rest = tail;
                match QmpIn::decode(bytes) {
                    Ok(QmpIn::Reply { result, .. }) if !sent.is_empty() => {
                        let id = sent.remove(usize::from(arg) % sent.len());
                        Input::Reply(id, result)
                    }
                    Ok(QmpIn::Event(event)) => Input::Event(event),
                    _ => continue,
                }
            }
        });
    }
});
