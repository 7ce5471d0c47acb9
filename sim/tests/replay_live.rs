//! Replays the traces recorded by the live conformance run (`testdata/traces/qsd-10/`, made by
//! `qemu-adapter/tests/conformance_live.rs` against qemu-storage-daemon 10.0.2) against the
//! simulator: the simulator is set up as the live lab was (the same images, nodes, NBD server
//! and guest exports), fed every recorded command with the host's actions (guest writes, slowed
//! jobs, a failing target) at the points the host log names, and must give the same replies and,
//! per job and export, the same events, modulo timing. The core's side is checked too: replayed
//! through `ReplayLink`, the core sends exactly the recorded commands.

use std::path::PathBuf;

use serde_json::{Value, json};
use vbackup_core::Domain;
use vbackup_core::backup::{NbdServer, NbdTransport};
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::DomainConfig;
use vbackup_core::driver::{Driver, MemoryEffects};
use vbackup_core::link::{NameMap, ReplayLink, Timestamp};
use vbackup_core::unstable::trace;
use vbackup_sim::scenarios;
use vbackup_sim::world::{LAB_THROUGHPUT_BYTES_PER_S, lab_domain};
use vbackup_sim::{Config, Fault, Flavor, Qemu};

mod common;
use common::replay::{LiveReplay, ReplayHost, apply_write, lab_files, memory_events};

/// Where the recordings' temporary directory was rewritten to.
const ROOT: &str = "/lab";

const SCENARIOS: &[&str] = &[
    "checkpoint-lifecycle",
    "push-full-then-incremental",
    "pull-point-in-time",
    "push-abort-slowed",
    "push-io-error",
    "engine-restart-mid-backup",
    "qemu-crash",
];

fn trace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/traces/qsd-10")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(trace_dir().join(name))
        .unwrap_or_else(|e| panic!("{name}: {e} (re-record: see testdata/traces/qsd-10/README.md)"))
}

fn lines(name: &str) -> Vec<Value> {
    read(name)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("trace line is JSON"))
        .collect()
}

fn exec(q: &mut Qemu, execute: &str, arguments: Value) {
    let now = q.now_ms();
    q.execute(now, &json!({"execute": execute, "arguments": arguments}))
        .unwrap_or_else(|e| panic!("setup {execute} {arguments} failed: {e}"));
}

/// The graph `vbackup_qemu::qsd::Qsd::start` builds: per layer a file node and a format node
/// (`vbk-T-i-file`, `vbk-T-i-format`, backing layers read-only), the NBD server, and per disk a
/// raw guest node exported writable as `guest-T`.
fn setup() -> Qemu {
    let mut q = Qemu::new(
        lab_files(ROOT),
        Config {
            flavor: Flavor::StorageDaemon,
            throughput_bytes_per_s: LAB_THROUGHPUT_BYTES_PER_S,
            ..Config::default()
        },
    );
    attach(&mut q);
    q
}

/// Builds the graph on a fresh process, over a session of its own (as the launcher does); the
/// recorded session then connects and negotiates anew.
fn attach(q: &mut Qemu) {
    exec(q, "qmp_capabilities", json!({}));
    let def = lab_domain();
    for disk in &def.disks {
        let t = &disk.target;
        for (i, layer) in disk.layers.iter().enumerate().rev() {
            let mut file = json!({"driver": "file", "node-name": format!("vbk-{t}-{i}-file"),
                "filename": format!("{ROOT}{}", layer.path.as_deref().unwrap())});
            let mut format = json!({"driver": "qcow2", "node-name": format!("vbk-{t}-{i}-format"),
                "file": format!("vbk-{t}-{i}-file")});
            if i > 0 {
                for node in [&mut file, &mut format] {
                    node["read-only"] = json!(true);
                    node["auto-read-only"] = json!(true);
                }
            }
            format["backing"] = if i + 1 < disk.layers.len() {
                json!(format!("vbk-{t}-{}-format", i + 1))
            } else {
                Value::Null
            };
            exec(q, "blockdev-add", file);
            exec(q, "blockdev-add", format);
        }
    }
    exec(
        q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": format!("{ROOT}/run/nbd.sock")}}}),
    );
    for disk in &def.disks {
        let t = &disk.target;
        exec(
            q,
            "blockdev-add",
            json!({"driver": "raw", "node-name": format!("vbk-{t}-guest"), "file": format!("vbk-{t}-0-format")}),
        );
        exec(
            q,
            "block-export-add",
            json!({"type": "nbd", "id": format!("guest-{t}"), "node-name": format!("vbk-{t}-guest"),
                "name": format!("guest-{t}"), "writable": true}),
        );
    }
    q.take_events();
    q.new_monitor_connection();
}

/// Replays scenario `name`; returns the simulator afterwards.
fn replay(name: &str) -> Qemu {
    let trace = lines(&format!("{name}.jsonl"));
    let mut actions = lines(&format!("{name}.host.jsonl")).into_iter().peekable();
    let mut q = setup();
    // The live link built these targets over a failing blkdebug layer from their creation on:
    // the fault is there before the job's first write. It ends with the node (blockdev-del).
    for a in lines(&format!("{name}.host.jsonl")) {
        if let Some(node) = a.get("fail_writes_to").and_then(Value::as_str) {
            q.set_fault(Fault::TargetIoError { node: node.into() });
        }
    }
    let mut r = LiveReplay::new(&[]);
    for i in 0..trace.len() {
        while let Some(a) = actions.next_if(|a| a["after"].as_u64().unwrap() <= i as u64) {
            if let Some(w) = a.get("write") {
                apply_write(&mut q, w, |disk| format!("vbk-{disk}-guest"));
            } else if let Some(s) = a.get("slow") {
                r.slow = s.as_u64();
            } else if a.get("fail_writes_to").is_some() {
                // Set up front, above.
            } else if a.get("crash").is_some() {
                // SIGKILL, and the launcher starts the daemon again over the same images.
                q.crash();
                q.restart();
                attach(&mut q);
            } else {
                panic!("unknown host action {a}");
            }
            r.got_events.extend(q.take_events());
        }
        r.line(&mut q, &trace, i, name);
    }
    r.finish(name);
    q
}

#[test]
fn live_checkpoint_lifecycle_replays_on_the_simulator() {
    replay("checkpoint-lifecycle");
}

#[test]
fn live_push_full_then_incremental_replays_on_the_simulator() {
    replay("push-full-then-incremental");
}

#[test]
fn live_pull_point_in_time_replays_on_the_simulator() {
    replay("pull-point-in-time");
}

#[test]
fn live_slowed_push_abort_replays_on_the_simulator() {
    replay("push-abort-slowed");
}

#[test]
fn live_push_io_error_replays_on_the_simulator() {
    replay("push-io-error");
}

#[test]
fn live_engine_restart_mid_backup_replays_on_the_simulator() {
    replay("engine-restart-mid-backup");
}

#[test]
fn live_qemu_crash_replays_on_the_simulator() {
    replay("qemu-crash");
}

/// A driver on the recorded trace of `name`: the lab domain as the live run defined it (paths
/// under [`ROOT`], the daemon's node names, its NBD server shared).
fn replay_driver(name: &str) -> Driver<ReplayLink, MemoryEffects> {
    let lines = trace::parse(&read(&format!("{name}.jsonl"))).expect("trace parses");
    let link = ReplayLink::new(lines, &NameMap::new(), Timestamp::ZERO);
    let mut def = lab_domain();
    for disk in &mut def.disks {
        for (i, layer) in disk.layers.iter_mut().enumerate() {
            layer.path = layer.path.take().map(|p| format!("{ROOT}{p}"));
            layer.node_name = Some(format!("vbk-{}-{i}-format", disk.target));
        }
    }
    let config = DomainConfig {
        nbd_server_running: Some(NbdServer {
            transport: NbdTransport::Unix {
                socket: format!("{ROOT}/run/nbd.sock"),
            },
            tls: None,
        }),
        ..DomainConfig::default()
    };
    let domain = Domain::new(def, config, CheckpointTree::new(), None);
    let mut d = Driver::new(domain, link, MemoryEffects::default());
    assert!(d.run_until(|dom| dom.view().connected, 10).unwrap());
    d
}

/// The core's side: driven through the same scenario over the recorded trace, the core sends
/// exactly the recorded commands and accepts the recorded answers (`ReplayLink` fails on the
/// first command that differs). The scenarios that check content need real disks and are
/// covered by the simulator replays above.
#[test]
fn core_sends_the_recorded_commands_of_the_checkpoint_lifecycle() {
    let mut d = replay_driver("checkpoint-lifecycle");
    scenarios::checkpoint_lifecycle(&mut d).unwrap();
}

#[test]
fn core_sends_the_recorded_commands_of_the_slowed_abort() {
    let mut d = replay_driver("push-abort-slowed");
    scenarios::push_abort(
        &mut d,
        &mut ReplayHost::new(ROOT, "/run/nbd.sock"),
        memory_events,
    )
    .unwrap();
}

#[test]
fn core_sends_the_recorded_commands_of_the_failing_target() {
    let mut d = replay_driver("push-io-error");
    scenarios::push_io_error(
        &mut d,
        &mut ReplayHost::new(ROOT, "/run/nbd.sock"),
        memory_events,
    )
    .unwrap();
}

#[test]
fn every_recorded_scenario_is_replayed() {
    let mut recorded: Vec<String> = std::fs::read_dir(trace_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".host.jsonl").map(str::to_owned))
        .collect();
    recorded.sort();
    let mut known: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(recorded, known);
}
