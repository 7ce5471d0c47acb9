//! Simulates 200-step histories (bitmap operations, guest writes, push backups full and
//! incremental, checkpoints in transactions, a pull export read) and prints steps per second.
//!
//! Run with `cargo bench -p vbackup-sim --bench history`.

use std::time::Instant;

use serde_json::{Value, json};
use vbackup_core::export::ExportReader;
use vbackup_sim::{Config, FileSystem, Flavor, Qemu};

const MIB: u64 = 1 << 20;
const STEPS: usize = 200;

/// A tiny deterministic generator (the bench needs variety, not quality).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn cmd(q: &mut Qemu, now: u64, name: &str, args: Value) -> bool {
    q.execute(now, &json!({"execute": name, "arguments": args}))
        .is_ok()
}

fn history(seed: u64) -> usize {
    let mut fs = FileSystem::new();
    fs.create_qcow2("/img/vda.qcow2", 64 * MIB, 65536, None);
    let mut q = Qemu::negotiated(
        fs,
        Config {
            flavor: Flavor::StorageDaemon,
            ..Config::default()
        },
    );
    let mut rng = Lcg(seed);
    let mut now = 0;
    cmd(
        &mut q,
        now,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "vda", "file": {"driver": "file", "node-name": "vda-file", "filename": "/img/vda.qcow2"}}),
    );
    cmd(
        &mut q,
        now,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/run/nbd"}}}),
    );
    let mut checkpoints: Vec<String> = Vec::new();
    let mut backups = 0;
    let block = vec![0x5au8; 65536];
    let mut ok = 0;
    for step in 0..STEPS {
        now += 1 + rng.next() % 50;
        let r = match rng.next() % 10 {
            0..=4 => q
                .guest_write(
                    now,
                    "vda",
                    (rng.next() % 1023) * 65536 + rng.next() % 4096,
                    &block[..4096 + (rng.next() % 60000) as usize],
                )
                .is_ok(),
            5 => {
                let name = format!("c{step}");
                let ok = cmd(
                    &mut q,
                    now,
                    "transaction",
                    json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": name, "persistent": true}}]}),
                );
                checkpoints.push(name);
                ok
            }
            6 if checkpoints.len() > 2 => {
                let victim = checkpoints.remove(0);
                cmd(
                    &mut q,
                    now,
                    "block-dirty-bitmap-remove",
                    json!({"node": "vda", "name": victim}),
                )
            }
            7 => {
                backups += 1;
                let t = format!("b{backups}");
                let path = format!("/img/{t}.qcow2");
                q.fs_mut().create_qcow2(&path, 64 * MIB, 65536, None);
                cmd(
                    &mut q,
                    now,
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": t, "backing": null, "file": {"driver": "file", "filename": path}}),
                );
                let mut actions = vec![
                    json!({"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": "tmp", "disabled": true}}),
                ];
                let sync = match checkpoints.first() {
                    Some(c) => {
                        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {"node": "vda", "target": "tmp", "bitmaps": [c]}}));
                        json!({"sync": "incremental", "bitmap": "tmp"})
                    }
                    None => json!({"sync": "full"}),
                };
                let mut data =
                    json!({"device": "vda", "job-id": t, "target": t, "auto-dismiss": false});
                for (k, v) in sync.as_object().unwrap() {
                    data[k] = v.clone();
                }
                actions.push(json!({"type": "blockdev-backup", "data": data}));
                let ok = cmd(&mut q, now, "transaction", json!({"actions": actions}));
                q.advance(now + 1000);
                now += 1000;
                cmd(&mut q, now, "job-dismiss", json!({"id": t}));
                cmd(&mut q, now, "blockdev-del", json!({"node-name": t}));
                cmd(
                    &mut q,
                    now,
                    "block-dirty-bitmap-remove",
                    json!({"node": "vda", "name": "tmp"}),
                );
                ok
            }
            8 => {
                cmd(
                    &mut q,
                    now,
                    "block-export-add",
                    json!({"type": "nbd", "id": "e", "node-name": "vda", "name": "e"}),
                );
                let mut buf = vec![0u8; 65536];
                let ok = q
                    .export_reader("e")
                    .and_then(|mut v| v.read_at(0, &mut buf))
                    .is_ok();
                cmd(&mut q, now, "block-export-del", json!({"id": "e"}));
                ok
            }
            _ => cmd(
                &mut q,
                now,
                "query-named-block-nodes",
                json!({"flat": true}),
            ),
        };
        ok += usize::from(r);
        q.take_events();
    }
    ok
}

/// CPU time this thread has run, from Linux's schedstat (None elsewhere). On a shared machine
/// wall time overstates the cost, so both are printed.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() {
    // Warm up, then measure.
    history(1);
    let runs = 50;
    let cpu_start = cpu_ns();
    let start = Instant::now();
    let mut ok = 0;
    for seed in 0..runs {
        ok += history(seed);
    }
    let elapsed = start.elapsed();
    let per_history_ms = elapsed.as_secs_f64() * 1000.0 / runs as f64;
    let steps_per_s = (runs as usize * STEPS) as f64 / elapsed.as_secs_f64();
    println!(
        "{runs} histories of {STEPS} steps: {per_history_ms:.3} ms per history (wall), {steps_per_s:.0} steps/s ({ok} steps succeeded)"
    );
    if let (Some(a), Some(b)) = (cpu_start, cpu_ns()) {
        let cpu_ms = (b - a) as f64 / 1e6 / runs as f64;
        let cpu_steps = (runs as usize * STEPS) as f64 / ((b - a) as f64 / 1e9);
        println!(
            "CPU time: {cpu_ms:.3} ms per history, {cpu_steps:.0} steps/s, {:.0} histories/s",
            1000.0 / cpu_ms
        );
    }
}
