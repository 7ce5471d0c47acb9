//! Replays the traces recorded by the VM conformance run (`testdata/traces/qemu-system-10/`,
//! one folder per disk configuration, made by `qemu-adapter/tests/vm_conformance.rs` against
//! qemu-system-x86_64 10.0.2) against the simulator: the simulator boots the graph the host log
//! names (`boot`: `-blockdev` disks under libvirt's node names with their devices, `-drive` disks
//! under the node names QEMU generated in that run, with their BlockBackend names and anonymous
//! qdev paths, through `Qemu::add_drive`), is fed every recorded command with the host's actions
//! (guest writes through the virtio backend, slowed jobs, a failing target, a crash and the boot
//! after it) at the points the host log names, and must give the same replies and, per job and
//! export, the same events, modulo timing. The core's side is checked too: replayed through
//! `ReplayLink` on the domain discovery gave (`domain`), the core sends exactly the recorded
//! commands.
//!
//! Generated node names (`#blockNNN`) differ between runs of QEMU; a trace is replayed with the
//! names of its own run, which its host log holds, so replays are stable.

use serde_json::{Value, json};
use vbackup_core::Domain;
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::DomainConfig;
use vbackup_core::driver::{Driver, MemoryEffects};
use vbackup_core::link::{NameMap, ReplayLink, Timestamp};
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup_core::unstable::trace;
use vbackup_sim::scenarios;
use vbackup_sim::world::{CLUSTER, DISK_BYTES, LAB_THROUGHPUT_BYTES_PER_S};
use vbackup_sim::{Config, DriveLayer, Fault, Flavor, Qemu};

mod common;
use common::replay::{LiveReplay, ReplayHost, apply_write, lab_files, memory_events};

/// Where the recordings' temporary directory was rewritten to.
const ROOT: &str = "/lab";

/// The configurations (trace folders).
const CONFIGS: &[&str] = &["blockdev", "drive", "live-snapshot", "mixed"];

/// Scenarios the simulator cannot replay: it does not model `blockdev-snapshot`, which the
/// host ran in the middle of this one.
const NOT_ON_THE_SIMULATOR: &[&str] = &["checkpoints-survive-a-live-snapshot"];

fn trace_dir(config: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/traces/qemu-system-10")
        .join(config)
}

fn read(config: &str, name: &str) -> String {
    std::fs::read_to_string(trace_dir(config).join(name)).unwrap_or_else(|e| {
        panic!("{config}/{name}: {e} (re-record: see testdata/traces/qemu-system-10/README.md)")
    })
}

fn lines(config: &str, name: &str) -> Vec<Value> {
    read(config, name)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("trace line is JSON"))
        .collect()
}

/// The scenarios recorded for `config`.
fn recorded(config: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(trace_dir(config))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|f| f.strip_suffix(".host.jsonl").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn exec(q: &mut Qemu, execute: &str, arguments: Value) {
    let now = q.now_ms();
    q.execute(now, &json!({"execute": execute, "arguments": arguments}))
        .unwrap_or_else(|e| panic!("setup {execute} {arguments} failed: {e}"));
}

/// Builds the graph of a `boot` entry on a fresh process, over a session of its own (as the
/// VM's command line does); the recorded session then connects and negotiates anew.
fn boot(q: &mut Qemu, disks: &Value) {
    exec(q, "qmp_capabilities", json!({}));
    for disk in disks.as_array().unwrap() {
        let layers = disk["layers"].as_array().unwrap();
        let s = |v: &Value| v.as_str().unwrap().to_owned();
        if s(&layers[0]["format"]).starts_with('#') {
            let layers: Vec<DriveLayer> = layers
                .iter()
                .map(|l| DriveLayer {
                    format_node: s(&l["format"]),
                    storage_node: s(&l["storage"]),
                    path: s(&l["path"]),
                })
                .collect();
            q.add_drive(
                disk["backend"].as_str().unwrap(),
                disk["qdev"].as_str().unwrap(),
                &layers,
            )
            .unwrap();
            continue;
        }
        for (i, layer) in layers.iter().enumerate().rev() {
            let ro = layer["ro"].as_bool().unwrap();
            let storage_ro = layer["storage_ro"].as_bool().unwrap();
            let backing = layers.get(i + 1).map(|l| l["format"].clone());
            exec(
                q,
                "blockdev-add",
                json!({"driver": "file", "node-name": layer["storage"], "filename": layer["path"], "read-only": storage_ro}),
            );
            exec(
                q,
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": layer["format"], "file": layer["storage"],
                    "backing": backing, "read-only": ro}),
            );
        }
        let qdev = s(&disk["qdev"]);
        let id = qdev
            .strip_prefix("/machine/peripheral/")
            .and_then(|r| r.split('/').next())
            .unwrap();
        q.add_device(id, layers[0]["format"].as_str().unwrap())
            .unwrap();
    }
    q.take_events();
    q.new_monitor_connection();
}

/// The qdev path of `disk` in the last `boot`.
fn qdev_of(boot: &Value, disk: &str) -> String {
    boot.as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == disk)
        .and_then(|d| d["qdev"].as_str())
        .unwrap()
        .to_owned()
}

/// Generated node names of every `boot` of a run.
fn generated_nodes(actions: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for a in actions {
        for disk in a
            .get("boot")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for l in disk["layers"].as_array().unwrap() {
                for role in ["format", "storage"] {
                    let name = l[role].as_str().unwrap();
                    if name.starts_with('#') {
                        out.push(name.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// Replays scenario `name` of `config`.
fn replay(config: &str, name: &str) {
    let trace = lines(config, &format!("{name}.jsonl"));
    let all_actions = lines(config, &format!("{name}.host.jsonl"));
    let generated = generated_nodes(&all_actions);
    let mut files = lab_files(ROOT);
    // A live snapshot's overlay, taken before the core connected, is empty.
    if all_actions
        .iter()
        .any(|a| a.to_string().contains("/lab/img/vdb.snap"))
    {
        files.create_qcow2(
            &format!("{ROOT}/img/vdb.snap"),
            DISK_BYTES,
            CLUSTER,
            Some(&format!("{ROOT}/img/vdb.ovl")),
        );
    }
    let mut q = Qemu::new(
        files,
        Config {
            flavor: Flavor::System,
            throughput_bytes_per_s: LAB_THROUGHPUT_BYTES_PER_S,
            ..Config::default()
        },
    );
    for a in &all_actions {
        if let Some(node) = a.get("fail_writes_to").and_then(Value::as_str) {
            q.set_fault(Fault::TargetIoError { node: node.into() });
        }
    }
    let mut actions = all_actions.into_iter().peekable();
    let mut layout = Value::Null;
    let mut r = LiveReplay::new(&generated);
    for i in 0..trace.len() {
        while let Some(a) = actions.next_if(|a| a["after"].as_u64().unwrap() <= i as u64) {
            if let Some(w) = a.get("write") {
                apply_write(&mut q, w, |disk| qdev_of(&layout, disk));
            } else if let Some(s) = a.get("slow") {
                r.slow = s.as_u64();
            } else if let Some(disks) = a.get("boot") {
                boot(&mut q, disks);
                layout = disks.clone();
            } else if a.get("crash").is_some() {
                // SIGKILL; the next `boot` starts the VM again over the same images.
                q.crash();
                q.restart();
            } else if a.get("fail_writes_to").is_some() || a.get("domain").is_some() {
                // The fault is set up front, above; the domain is the core's business.
            } else {
                panic!("{config}/{name}: unknown host action {a}");
            }
            r.got_events.extend(q.take_events());
        }
        r.line(&mut q, &trace, i, &format!("{config}/{name}"));
    }
    r.finish(&format!("{config}/{name}"));
}

fn replay_config(config: &str) {
    let names = recorded(config);
    assert!(!names.is_empty(), "no traces recorded for {config}");
    for name in names {
        if !NOT_ON_THE_SIMULATOR.contains(&name.as_str()) {
            replay(config, &name);
        }
    }
}

#[test]
fn blockdev_vm_traces_replay_on_the_simulator() {
    replay_config("blockdev");
}

#[test]
fn drive_vm_traces_replay_on_the_simulator_under_their_generated_node_names() {
    replay_config("drive");
}

#[test]
fn live_snapshot_vm_traces_replay_on_the_simulator() {
    replay_config("live-snapshot");
}

#[test]
fn mixed_vm_traces_replay_on_the_simulator() {
    replay_config("mixed");
}

/// A driver on the recorded trace of `config/name`, with the domain discovery gave that run.
fn replay_driver(config: &str, name: &str) -> Driver<ReplayLink, MemoryEffects> {
    let lines = trace::parse(&read(config, &format!("{name}.jsonl"))).expect("trace parses");
    let link = ReplayLink::new(lines, &NameMap::new(), Timestamp::ZERO);
    let domain = self::lines(config, &format!("{name}.host.jsonl"))
        .into_iter()
        .find_map(|a| a.get("domain").cloned())
        .expect("the host log names the domain");
    let disks = domain
        .as_array()
        .unwrap()
        .iter()
        .map(|d| DiskDef {
            target: d["target"].as_str().unwrap().into(),
            device: DiskDevice::Disk,
            bus: None,
            readonly: false,
            transient: false,
            layers: d["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| Layer {
                    storage: StorageType::File,
                    format: ImageFormat::Qcow2,
                    path: l["path"].as_str().map(str::to_owned),
                    index: None,
                    node_name: l["node"].as_str().map(str::to_owned),
                })
                .collect(),
        })
        .collect();
    let def = DomainDef {
        name: "lab".into(),
        uuid: None,
        disks,
    };
    let domain = Domain::new(def, DomainConfig::default(), CheckpointTree::new(), None);
    let mut d = Driver::new(domain, link, MemoryEffects::default());
    assert!(d.run_until(|dom| dom.view().connected, 10).unwrap());
    d
}

/// The core's side, for the scenarios that read no content, in every configuration.
#[test]
fn core_sends_the_recorded_commands_on_every_vm_configuration() {
    for config in CONFIGS {
        let names = recorded(config);
        let host = || ReplayHost::new(ROOT, "/nbd.sock");
        if names.iter().any(|n| n == "checkpoint-lifecycle") {
            let mut d = replay_driver(config, "checkpoint-lifecycle");
            scenarios::checkpoint_lifecycle(&mut d).unwrap();
        }
        if names.iter().any(|n| n == "push-abort-slowed") {
            let mut d = replay_driver(config, "push-abort-slowed");
            scenarios::push_abort(&mut d, &mut host(), memory_events).unwrap();
        }
        if names.iter().any(|n| n == "push-io-error") {
            let mut d = replay_driver(config, "push-io-error");
            scenarios::push_io_error(&mut d, &mut host(), memory_events).unwrap();
        }
    }
}

/// Every configuration has its traces, each with its scenarios.
#[test]
fn every_vm_configuration_is_recorded() {
    for config in CONFIGS {
        let names = recorded(config);
        for scenario in ["discovery", "checkpoint-lifecycle"] {
            assert!(
                names.iter().any(|n| n == scenario),
                "{config}: {scenario} not recorded (see testdata/traces/qemu-system-10/README.md)"
            );
        }
    }
}

/// The core's side of the recorded incremental pushes over idle disks: real QEMU ran every
/// job with nothing to copy to its end inside the `transaction` and sent all its events,
/// through `concluded`, before the reply. Replayed through `ReplayLink`, the core must send
/// exactly the recorded commands and end each of the three backups completed (an engine that
/// ignored those early events waited forever for them, and the replay ran out of trace).
#[test]
fn core_ends_pushes_whose_jobs_concluded_before_the_transaction_reply() {
    use vbackup_core::backup::{BackupMode, DomainJobStatus};
    use vbackup_core::domain::{DomainEvent, Request};
    use vbackup_sim::world::{lab_backup, lab_checkpoint};

    let mut replayed = 0;
    for config in CONFIGS {
        if !recorded(config)
            .iter()
            .any(|n| n == "push-incremental-idle-disks")
        {
            continue;
        }
        let mut d = replay_driver(config, "push-incremental-idle-disks");
        let backups = [
            (None, "/backup/full", "c1"),
            (Some("c1"), "/backup/one-idle", "c2"),
            (Some("c2"), "/backup/all-idle", "c3"),
        ];
        for (incremental, dir, checkpoint) in backups {
            let request = Request::BackupBegin {
                spec: lab_backup(BackupMode::Push, incremental, &format!("{ROOT}{dir}")),
                checkpoint: Some(lab_checkpoint(checkpoint)),
                reuse_external: false,
            };
            let answer = d.call(request, 10_000).expect("the replay goes on");
            assert!(answer.is_ok(), "{config} {dir}: {answer:?}");
            let ended = d
                .run_until(|dom| dom.view().backup.is_none(), 10_000)
                .unwrap_or_else(|e| panic!("{config} {dir}: {e}"));
            assert!(ended, "{config} {dir}: the backup never ended");
            let status = d.effects().events.iter().rev().find_map(|e| match e {
                DomainEvent::JobCompleted(s) => Some(s.status),
                _ => None,
            });
            assert_eq!(status, Some(DomainJobStatus::Completed), "{config} {dir}");
        }
        replayed += 1;
    }
    assert_eq!(
        replayed,
        CONFIGS.len(),
        "every configuration has the idle-disk trace"
    );
}
