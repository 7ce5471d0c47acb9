//! Errors are data: random commands with random arguments never panic the simulator, and its
//! state stays usable.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value, json};
use vbackup_sim::{Config, FileSystem, Qemu};

const COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "blockdev-reopen",
    "blockdev-create",
    "blockdev-backup",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "transaction",
    "job-dismiss",
    "job-finalize",
    "job-cancel",
    "job-pause",
    "job-resume",
    "job-complete",
    "block-job-cancel",
    "block-job-set-speed",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-named-block-nodes",
    "query-block",
    "query-jobs",
    "query-block-jobs",
    "query-block-exports",
    "object-add",
    "object-del",
    "human-monitor-command",
    "device_add",
    "quit",
    "bogus",
];
const KEYS: &[&str] = &[
    "node",
    "name",
    "node-name",
    "driver",
    "file",
    "backing",
    "filename",
    "target",
    "device",
    "job-id",
    "id",
    "sync",
    "bitmap",
    "bitmap-mode",
    "bitmaps",
    "granularity",
    "persistent",
    "disabled",
    "speed",
    "auto-dismiss",
    "auto-finalize",
    "options",
    "actions",
    "type",
    "data",
    "writable",
    "addr",
    "size",
    "read-only",
    "force",
    "qom-type",
    "command-line",
    "flat",
];
const WORDS: &[&str] = &[
    "disk",
    "disk-file",
    "t",
    "t-file",
    "b",
    "c",
    "/img/disk.qcow2",
    "/img/t.qcow2",
    "qcow2",
    "file",
    "raw",
    "full",
    "incremental",
    "bitmap",
    "none",
    "top",
    "on-success",
    "never",
    "always",
    "nbd",
    "unix",
    "j",
    "",
    "#x",
    "copy-before-write",
    "snapshot-access",
    "block-dirty-bitmap-add",
    "blockdev-backup",
    "qemu-io disk \"write 0 64k\"",
];

fn value(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 2 { 4 } else { 7 }) {
        0 => json!(*WORDS.choose(rng).unwrap()),
        1 => json!(rng.random_range(0..3u64) * 65536 + rng.random_range(0..2u64) * 512),
        2 => json!(rng.random_bool(0.5)),
        3 => Value::Null,
        4 | 5 => object(rng, depth + 1),
        _ => Value::Array(
            (0..rng.random_range(0..3))
                .map(|_| value(rng, depth + 1))
                .collect(),
        ),
    }
}

fn object(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    let mut m = Map::new();
    for _ in 0..rng.random_range(0..6) {
        m.insert((*KEYS.choose(rng).unwrap()).to_string(), value(rng, depth));
    }
    Value::Object(m)
}

fn setup() -> Qemu {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/img/disk.qcow2", 4 << 20, 65536, None);
    fs.create_qcow2("/img/t.qcow2", 4 << 20, 65536, None);
    let mut q = Qemu::negotiated(fs, Config::default());
    for c in [
        json!({"driver": "file", "node-name": "disk-file", "filename": "/img/disk.qcow2"}),
        json!({"driver": "qcow2", "node-name": "disk", "file": "disk-file"}),
        json!({"driver": "file", "node-name": "t-file", "filename": "/img/t.qcow2"}),
        json!({"driver": "qcow2", "node-name": "t", "file": "t-file"}),
    ] {
        q.execute(0, &json!({"execute": "blockdev-add", "arguments": c}))
            .unwrap();
    }
    q
}

#[test]
fn random_commands_never_panic_and_queries_keep_answering() {
    for seed in 0..40u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut q = setup();
        let mut now = 0;
        for _ in 0..150 {
            now += rng.random_range(0..50);
            let name = *COMMANDS.choose(&mut rng).unwrap();
            let cmd = json!({"execute": name, "arguments": object(&mut rng, 0)});
            let _ = q.execute(now, &cmd);
            if rng.random_bool(0.3) {
                let _ = q.guest_write(now, "disk", rng.random_range(0..4u64 << 20), &[1; 4096]);
            }
            if !q.is_running() {
                q.restart();
                q.execute(now, &json!({"execute": "qmp_capabilities"}))
                    .unwrap();
            }
            q.execute(
                now,
                &json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
            )
            .unwrap_or_else(|e| panic!("seed {seed}: queries fail after {cmd}: {e}"));
            q.execute(now, &json!({"execute": "query-jobs"})).unwrap();
            q.take_events();
        }
    }
}
