//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod replay;

use serde_json::{Value, json};
use vbackup_sim::{Config, FileSystem, Flavor, Qemu, QmpError};

pub const MIB: u64 = 1 << 20;

/// A storage daemon with `disk` (a 64 MiB qcow2 at /img/disk.qcow2) open as nodes `disk-file`
/// and `disk`.
pub fn daemon_with_disk() -> Qemu {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/img/disk.qcow2", 64 * MIB, 65536, None);
    let mut q = Qemu::negotiated(
        fs,
        Config {
            flavor: Flavor::StorageDaemon,
            ..Config::default()
        },
    );
    open_disk(&mut q);
    q
}

pub fn open_disk(q: &mut Qemu) {
    ok(
        q,
        "blockdev-add",
        json!({"driver": "file", "node-name": "disk-file", "filename": "/img/disk.qcow2"}),
    );
    ok(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk", "file": "disk-file"}),
    );
}

/// Creates a qcow2 file and opens it as `name` (with `name-file`), with `backing: null`.
pub fn add_target(q: &mut Qemu, name: &str, size: u64, backing_file: Option<&str>) {
    let path = format!("/img/{name}.qcow2");
    q.fs_mut().create_qcow2(&path, size, 65536, backing_file);
    ok(
        q,
        "blockdev-add",
        json!({"driver": "file", "node-name": format!("{name}-file"), "filename": path}),
    );
    ok(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": name, "file": format!("{name}-file"), "backing": null}),
    );
}

pub fn run(q: &mut Qemu, cmd: &str, args: Value) -> Result<Value, QmpError> {
    let now = q.now_ms();
    q.execute(now, &json!({"execute": cmd, "arguments": args}))
}

pub fn ok(q: &mut Qemu, cmd: &str, args: Value) -> Value {
    match run(q, cmd, args.clone()) {
        Ok(v) => v,
        Err(e) => panic!("{cmd} {args} failed: {e}"),
    }
}

pub fn err(q: &mut Qemu, cmd: &str, args: Value) -> String {
    match run(q, cmd, args.clone()) {
        Ok(v) => panic!("{cmd} {args} unexpectedly returned {v}"),
        Err(e) => e.desc,
    }
}

/// Events as compact strings: `STATUS/id` for JOB_STATUS_CHANGE, else the event name and the
/// job or export id.
pub fn event_names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let name = e["event"].as_str().unwrap_or("");
            let d = &e["data"];
            match name {
                "JOB_STATUS_CHANGE" => format!(
                    "{}/{}",
                    d["status"].as_str().unwrap_or(""),
                    d["id"].as_str().unwrap_or("")
                ),
                _ => {
                    let who = d
                        .get("device")
                        .or(d.get("id"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    format!("{name}/{who}")
                }
            }
        })
        .collect()
}

pub fn take_names(q: &mut Qemu) -> Vec<String> {
    let ev = q.take_events();
    event_names(&ev)
}

/// The named dirty bitmap `name` on `node` from query-named-block-nodes.
pub fn bitmap(q: &mut Qemu, node: &str, name: &str) -> Option<Value> {
    let nodes = ok(q, "query-named-block-nodes", json!({"flat": true}));
    vbackup_sim::bitmaps_of(&nodes, node)
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

pub fn count(q: &mut Qemu, node: &str, name: &str) -> u64 {
    bitmap(q, node, name)
        .and_then(|b| b["count"].as_u64())
        .expect("bitmap exists")
}

pub fn job(q: &mut Qemu, id: &str) -> Option<Value> {
    let jobs = ok(q, "query-jobs", json!({}));
    jobs.as_array()?.iter().find(|j| j["id"] == id).cloned()
}

/// Advances virtual time by `ms`.
pub fn wait(q: &mut Qemu, ms: u64) {
    let t = q.now_ms() + ms;
    q.advance(t);
}

/// A deterministic pattern block: byte `i` of the block is `(seed + i * 7) % 251`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((seed as usize + i * 7) % 251) as u8)
        .collect()
}
