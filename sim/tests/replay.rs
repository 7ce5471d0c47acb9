//! Replays the QEMU side of the libvirt 11.3 ↔ QEMU 10.0.2 traces: the simulator is set up with
//! the nodes and bitmaps the trace's first `query-named-block-nodes` shows, fed every recorded
//! command, and must give the same replies and, per job and export, the same event sequence
//! (modulo timing: where in the stream an event lands depends on the machine's speed).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use vbackup_sim::{Config, FileSystem, Flavor, Qemu};

mod common;
use common::MIB;
use common::replay::{Compare, event_label};

/// Virtual time between two recorded commands; long enough for a 256 MiB job to finish.
const STEP_MS: u64 = 1000;

fn trace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/traces/libvirt-11.3")
}

fn load(name: &str) -> Vec<(String, Value)> {
    let text =
        std::fs::read_to_string(trace_dir().join(format!("{name}.jsonl"))).expect("trace file");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("trace line is JSON");
            (v["dir"].as_str().unwrap().to_string(), v["msg"].clone())
        })
        .collect()
}

/// node-name → qdev path, from the domain start's `query-block`.
fn devices() -> BTreeMap<String, String> {
    let lines = load("domain-start");
    let id = lines
        .iter()
        .find(|(d, m)| d == "send" && m["execute"] == "query-block")
        .map(|(_, m)| m["id"].clone())
        .unwrap();
    let reply = lines
        .iter()
        .find(|(d, m)| d == "recv" && m["id"] == id && m.get("return").is_some())
        .unwrap();
    reply.1["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["inserted"]["node-name"].as_str().unwrap().to_string(),
                b["qdev"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn first_nodes_reply(lines: &[(String, Value)]) -> Option<Value> {
    lines
        .iter()
        .find(|(d, m)| {
            d == "recv"
                && m["return"]
                    .as_array()
                    .is_some_and(|a| a.first().is_some_and(|n| n.get("node-name").is_some()))
        })
        .map(|(_, m)| m["return"].clone())
}

fn exec(q: &mut Qemu, cmd: Value) -> Value {
    let now = q.now_ms();
    q.execute(now, &cmd)
        .unwrap_or_else(|e| panic!("setup command {cmd} failed: {e}"))
}

/// Builds the images, nodes, devices and bitmaps a `query-named-block-nodes` reply shows. Bitmap
/// counts are reproduced by guest writes between bitmap additions, oldest bitmap first.
fn setup(nodes: &Value) -> Qemu {
    let mut fs = FileSystem::new();
    let list = nodes.as_array().unwrap();
    let formats: Vec<&Value> = list.iter().filter(|n| n["drv"] == "qcow2").collect();
    for n in &formats {
        let img = &n["image"];
        fs.create_qcow2(
            n["file"].as_str().unwrap(),
            img["virtual-size"].as_u64().unwrap(),
            img["cluster-size"].as_u64().unwrap(),
            None,
        );
    }
    // A file node no qcow2 node uses is a raw disk.
    for n in list.iter().filter(|n| n["drv"] == "file") {
        let path = n["file"].as_str().unwrap();
        if !fs.exists(path) {
            fs.create_raw(path, n["image"]["virtual-size"].as_u64().unwrap());
        }
    }
    let mut q = Qemu::negotiated(
        fs,
        Config {
            flavor: Flavor::System,
            ..Config::default()
        },
    );
    // Oldest nodes last in the reply: add in reverse.
    for n in list.iter().rev() {
        let name = n["node-name"].as_str().unwrap();
        match n["drv"].as_str().unwrap() {
            "file" => exec(
                &mut q,
                json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": name, "filename": n["file"]}}),
            ),
            "qcow2" => {
                let storage = list
                    .iter()
                    .find(|s| s["drv"] == "file" && s["file"] == n["file"])
                    .unwrap()["node-name"]
                    .clone();
                exec(
                    &mut q,
                    json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": name, "file": storage}}),
                )
            }
            other => panic!("setup cannot build a {other} node"),
        };
    }
    for (node, qdev) in devices() {
        if q.execute(0, &json!({"execute": "query-jobs"})).is_ok()
            && list.iter().any(|n| n["node-name"] == node)
        {
            let id = qdev
                .trim_start_matches("/machine/peripheral/")
                .trim_end_matches("/virtio-backend");
            q.add_device(id, &node).unwrap();
        }
    }
    // The lab's guest wrote 0xa5 at 32 MiB before the newest checkpoint (the pull export still
    // reads it there, pull-export-read and guest-write-during): the newest dirty region starts
    // there and older ones follow it.
    for n in &formats {
        let name = n["node-name"].as_str().unwrap();
        let bitmaps: Vec<&Value> = n["dirty-bitmaps"]
            .as_array()
            .map(|a| a.iter().rev().collect())
            .unwrap_or_default();
        let fresh: Vec<u64> = (0..bitmaps.len())
            .map(|i| {
                let newer = bitmaps
                    .get(i + 1)
                    .map(|x| x["count"].as_u64().unwrap())
                    .unwrap_or(0);
                bitmaps[i]["count"]
                    .as_u64()
                    .unwrap()
                    .checked_sub(newer)
                    .expect("older bitmaps hold more")
            })
            .collect();
        let mut offsets = vec![0; fresh.len()];
        let mut cursor = 32 * MIB;
        for i in (0..fresh.len()).rev() {
            offsets[i] = cursor;
            cursor += fresh[i];
        }
        for (i, b) in bitmaps.iter().enumerate() {
            exec(
                &mut q,
                json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": name, "name": b["name"],
                "persistent": b["persistent"], "disabled": !b["recording"].as_bool().unwrap(), "granularity": b["granularity"]}}),
            );
            if fresh[i] > 0 {
                let now = q.now_ms();
                q.guest_write(now, name, offsets[i], &vec![0xa5; fresh[i] as usize])
                    .unwrap();
            }
        }
    }
    q.take_events();
    q
}

/// Event names per job or export id, and the data of job completion events.
fn per_id(events: &[Value], loose_jobs: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let (id, label) = event_label(e, |_, data| {
            let id = data
                .get("device")
                .or(data.get("id"))
                .and_then(Value::as_str);
            if id.is_some_and(|id| loose_jobs.contains(&id)) {
                data["offset"] = Value::Null;
            }
        });
        out.entry(id).or_default().push(label);
    }
    out
}

/// Replays `traces` in order on one simulator set up from the first node query found.
fn replay(traces: &[&str], setup_from: &str, loose_jobs: &[&str]) -> Qemu {
    let setup_lines = load(setup_from);
    let nodes = first_nodes_reply(&setup_lines).expect("a node query to set up from");
    let mut q = setup(&nodes);
    let mut want_events = Vec::new();
    let mut got_events = Vec::new();
    let mut commands = 0;
    let loosen_job = |j: &mut Value| {
        if loose_jobs.contains(&j["id"].as_str().unwrap()) {
            j["current-progress"] = Value::Null;
        }
    };
    // Node records are compared with their file and backing file too: the traces' paths are
    // reproduced as they are.
    let compare = Compare {
        node_members: &["file", "backing_file"],
        loosen_job: &loosen_job,
        generated_nodes: &[],
    };
    for trace in traces {
        let lines = load(trace);
        for (i, (dir, msg)) in lines.iter().enumerate() {
            if dir == "recv" {
                if msg.get("event").is_some() {
                    want_events.push(msg.clone());
                }
                continue;
            }
            if msg["execute"] == "blockdev-add" && msg["arguments"]["driver"] == "file" {
                // The management layer creates the file before asking QEMU to open it.
                q.fs_mut()
                    .touch(msg["arguments"]["filename"].as_str().unwrap());
            }
            let id = &msg["id"];
            let expected = lines[i..]
                .iter()
                .find(|(d, m)| d == "recv" && m["id"] == *id)
                .map(|(_, m)| m.clone())
                .expect("reply");
            let cmd = json!({"execute": msg["execute"], "arguments": msg.get("arguments").cloned().unwrap_or(json!({}))});
            let now = q.now_ms() + STEP_MS;
            let got = q.execute(now, &cmd);
            compare.reply(&cmd, &expected, &got);
            got_events.extend(q.take_events());
            commands += 1;
        }
    }
    assert!(commands > 0, "the traces hold commands");
    assert_eq!(
        per_id(&got_events, loose_jobs),
        per_id(&want_events, loose_jobs),
        "events per job/export of {traces:?}"
    );
    q
}

#[test]
fn replays_checkpoint_create() {
    let _ = replay(
        &[
            "checkpoint-create-c1",
            "checkpoint-create-c2",
            "checkpoint-create-c3",
        ],
        "domain-start",
        &[],
    );
}

#[test]
fn replays_checkpoint_delete() {
    let _ = replay(
        &["checkpoint-delete-middle"],
        "checkpoint-delete-middle",
        &[],
    );
    let _ = replay(
        &["checkpoint-delete-children"],
        "checkpoint-delete-children",
        &[],
    );
}

#[test]
fn replays_push_full_backup() {
    let _ = replay(&["backup-push-full"], "backup-push-full", &[]);
}

#[test]
fn replays_push_incremental_backup() {
    let _ = replay(&["backup-push-incremental"], "backup-push-incremental", &[]);
}

#[test]
fn replays_push_backup_abort() {
    let _ = replay(
        &["backup-push-domjobabort"],
        "backup-push-domjobabort",
        &["backup-vda-libvirt-2-format"],
    );
}

#[test]
fn replays_pull_full_backup_and_abort() {
    let _ = replay(
        &["backup-pull-full-begin", "backup-pull-full-domjobabort"],
        "backup-pull-full-begin",
        &[],
    );
}

#[test]
fn replays_pull_incremental_backup_with_guest_writes_checkpoints_and_abort() {
    let _ = replay(
        &[
            "backup-pull-incremental-begin",
            "backup-pull-guest-write-during",
            "checkpoint-create-during-backup",
            "checkpoint-delete-during-backup",
            "backup-pull-domjobabort",
        ],
        "backup-pull-incremental-begin",
        &[],
    );
}

/// What the lab's client read from the pull export after the guest wrote 0xee at 32 MiB
/// (pull-export-read.txt, backup-pull-guest-write-during.virsh.txt).
#[test]
fn replayed_pull_export_serves_the_point_in_time_and_the_frozen_bitmap() {
    use vbackup_core::export::{ExportReader, Extent};
    let q = replay(
        &[
            "backup-pull-incremental-begin",
            "backup-pull-guest-write-during",
        ],
        "backup-pull-incremental-begin",
        &[],
    );
    assert_eq!(
        q.guest_read("virtio-disk0", 32 * MIB, 65536).unwrap(),
        vec![0xee; 65536]
    );
    let mut v = q.export_reader("vda").unwrap();
    assert_eq!(v.size(), 268435456);
    assert_eq!(
        v.meta_contexts(),
        ["base:allocation", "qemu:dirty-bitmap:backup-vda"]
    );
    assert_eq!(
        v.block_status("qemu:dirty-bitmap:backup-vda", 0, v.size())
            .unwrap(),
        vec![
            Extent {
                length: 33554432,
                flags: 0
            },
            Extent {
                length: 1048576,
                flags: 1
            },
            Extent {
                length: 233832448,
                flags: 0
            }
        ]
    );
    let mut buf = vec![0u8; 65536];
    v.read_at(32 * MIB, &mut buf).unwrap();
    assert_eq!(buf, vec![0xa5; 65536]);
    let mut w = q.export_reader("vdb").unwrap();
    assert_eq!(
        w.block_status("qemu:dirty-bitmap:backup-vdb", 0, w.size())
            .unwrap(),
        vec![Extent {
            length: 67108864,
            flags: 0
        }]
    );
}

#[test]
fn replays_push_full_backup_of_a_qcow2_and_a_raw_disk() {
    let _ = replay(
        &["backup-push-full-raw-disk"],
        "backup-push-full-raw-disk",
        &[],
    );
}

#[test]
fn replays_checkpoint_size_queries() {
    let _ = replay(&["checkpoint-dumpxml-size"], "checkpoint-dumpxml-size", &[]);
    let _ = replay(
        &["checkpoint-dumpxml-size-c2-c3"],
        "checkpoint-dumpxml-size-c2-c3",
        &[],
    );
}

#[test]
fn replays_empty_and_partial_checkpoint_transactions() {
    let _ = replay(
        &[
            "checkpoint-create-diskspec-only-vdb-no",
            "checkpoint-create-c1",
        ],
        "domain-start",
        &[],
    );
}
