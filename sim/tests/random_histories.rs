//! Seeded random histories against the simulator alone: guest writes at any moment, full and
//! incremental push backups with checkpoints, cancels, target I/O errors, crashes and restarts.
//! The checker: every backup that completes restores (through its chain of earlier backups)
//! to exactly the disk at its point in time. A failure names the seed that reproduces it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use vbackup_sim::{Config, Fault, FileSystem, Flavor, Qemu};

const MIB: u64 = 1 << 20;
const DISK: u64 = 4 * MIB;
const STEPS: usize = 120;
const SEEDS: u64 = 16;

struct Running {
    job: String,
    target: String,
    path: String,
    /// The disk at the job's start.
    expected: Vec<u8>,
    /// Path of the backup this one is incremental to (None for a full).
    parent: Option<String>,
    /// The checkpoint created with this backup.
    checkpoint: String,
    temp_bitmap: bool,
}

struct World {
    q: Qemu,
    rng: ChaCha8Rng,
    now: u64,
    counter: u64,
    running: Option<Running>,
    /// The last backup that completed, and the checkpoint made with it.
    good: Option<(String, String)>,
    verified: usize,
    log: Vec<String>,
}

fn exec(q: &mut Qemu, now: u64, cmd: &str, args: Value) -> Result<Value, String> {
    q.execute(now, &json!({"execute": cmd, "arguments": args}))
        .map_err(|e| e.desc)
}

fn boot(q: &mut Qemu) {
    exec(q, 0, "qmp_capabilities", json!({})).unwrap();
    exec(
        q,
        0,
        "blockdev-add",
        json!({"driver": "file", "node-name": "vda-storage", "filename": "/img/vda.qcow2"}),
    )
    .unwrap();
    exec(
        q,
        0,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "vda", "file": "vda-storage"}),
    )
    .unwrap();
    q.add_device("virtio-disk0", "vda").unwrap();
}

impl World {
    fn new(seed: u64) -> Self {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/img/vda.qcow2", DISK, 65536, None);
        let mut q = Qemu::new(
            fs,
            Config {
                flavor: Flavor::System,
                throughput_bytes_per_s: 16 * MIB,
                ..Config::default()
            },
        );
        boot(&mut q);
        World {
            q,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: 0,
            counter: 0,
            running: None,
            good: None,
            verified: 0,
            log: Vec::new(),
        }
    }

    fn cmd(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let r = exec(&mut self.q, self.now, cmd, args);
        self.log.push(format!(
            "{} {cmd} -> {}",
            self.now,
            if r.is_ok() { "ok" } else { "err" }
        ));
        r
    }

    fn guest_write(&mut self) {
        let len = self.rng.random_range(1..100_000u64).min(DISK);
        let offset = self.rng.random_range(0..DISK - len);
        let byte: u8 = self.rng.random();
        self.q
            .guest_write(self.now, "virtio-disk0", offset, &vec![byte; len as usize])
            .unwrap();
    }

    fn start_backup(&mut self) {
        self.counter += 1;
        let n = self.counter;
        let (target, path, checkpoint) = (
            format!("t{n}"),
            format!("/backups/b{n}.qcow2"),
            format!("c{n}"),
        );
        self.q.fs_mut().create_qcow2(&path, DISK, 65536, None);
        self.cmd("blockdev-add", json!({"driver": "qcow2", "node-name": target, "backing": null,
            "file": {"driver": "file", "node-name": format!("{target}-storage"), "filename": path}})).unwrap();
        let incremental = self.good.clone().filter(|_| self.rng.random_bool(0.7));
        let mut actions = vec![
            json!({"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": checkpoint, "persistent": true}}),
        ];
        let (backup, parent) = match &incremental {
            Some((parent_path, from)) => {
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": "vda", "name": "backup-vda", "persistent": false, "disabled": true}}));
                actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {"node": "vda", "target": "backup-vda", "bitmaps": [from]}}));
                (
                    json!({"device": "vda", "job-id": format!("j{n}"), "target": target, "sync": "incremental", "bitmap": "backup-vda", "auto-dismiss": false}),
                    Some(parent_path.clone()),
                )
            }
            None => (
                json!({"device": "vda", "job-id": format!("j{n}"), "target": target, "sync": "full", "auto-dismiss": false}),
                None,
            ),
        };
        actions.push(json!({"type": "blockdev-backup", "data": backup}));
        let expected = self.q.guest_disk("virtio-disk0").unwrap();
        self.cmd("transaction", json!({"actions": actions}))
            .unwrap();
        self.running = Some(Running {
            job: format!("j{n}"),
            target,
            path,
            expected,
            parent,
            checkpoint,
            temp_bitmap: incremental.is_some(),
        });
    }

    /// Collects the running job's end, verifies a success, and cleans up.
    fn settle(&mut self) {
        let Some(id) = self.running.as_ref().map(|r| r.job.clone()) else {
            return;
        };
        let jobs = self.cmd("query-jobs", json!({})).unwrap();
        let Some(job) = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id.as_str())
            .cloned()
        else {
            return;
        };
        if job["status"] != "concluded" {
            return;
        }
        let r = self.running.take().unwrap();
        self.cmd("job-dismiss", json!({"id": r.job})).unwrap();
        self.cmd("blockdev-del", json!({"node-name": r.target}))
            .unwrap();
        if r.temp_bitmap {
            self.cmd(
                "block-dirty-bitmap-remove",
                json!({"node": "vda", "name": "backup-vda"}),
            )
            .unwrap();
        }
        if job.get("error").is_some() {
            // The checkpoint made with a failed backup is dropped, as the manager would.
            self.cmd(
                "block-dirty-bitmap-remove",
                json!({"node": "vda", "name": r.checkpoint}),
            )
            .unwrap();
            return;
        }
        let fs = self.q.fs_mut();
        fs.rebase_unsafe(&r.path, r.parent.as_deref()).unwrap();
        let restored = fs.read_image(&r.path).unwrap();
        assert!(
            restored == r.expected,
            "backup {} does not restore to its point in time",
            r.job
        );
        self.verified += 1;
        if let Some((_, old)) = self.good.replace((r.path, r.checkpoint)) {
            // Only the newest checkpoint is needed for the next incremental.
            let _ = self.cmd(
                "block-dirty-bitmap-remove",
                json!({"node": "vda", "name": old}),
            );
        }
    }

    fn crash(&mut self) {
        self.q.crash();
        self.q.restart();
        boot(&mut self.q);
        self.running = None;
        self.q.clear_faults();
        // Checkpoints made in this run are gone and older ones are inconsistent: start over.
        let nodes = self
            .cmd("query-named-block-nodes", json!({"flat": true}))
            .unwrap();
        let names: Vec<String> = vbackup_sim::bitmaps_of(&nodes, "vda")
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| {
                assert!(
                    b["inconsistent"] == true,
                    "a bitmap survived a crash consistent: {b}"
                );
                b["name"].as_str().map(str::to_string)
            })
            .collect();
        for n in names {
            self.cmd(
                "block-dirty-bitmap-remove",
                json!({"node": "vda", "name": n}),
            )
            .unwrap();
        }
        self.good = None;
    }

    fn step(&mut self) {
        self.now += self.rng.random_range(0..120);
        self.q.advance(self.now);
        self.settle();
        match self.rng.random_range(0..100) {
            0..=59 => self.guest_write(),
            60..=74 if self.running.is_none() => self.start_backup(),
            75..=79 => {
                if let Some(r) = &self.running {
                    let job = r.job.clone();
                    let _ = self.cmd("job-cancel", json!({"id": job}));
                }
            }
            80..=81 => {
                if let Some(r) = &self.running {
                    let target = r.target.clone();
                    self.q.set_fault(Fault::TargetIoError { node: target });
                }
            }
            82 => self.crash(),
            _ => {}
        }
        self.q.take_events();
    }
}

#[test]
fn completed_backups_restore_to_their_point_in_time_over_random_histories() {
    let mut verified = 0;
    for seed in 0..SEEDS {
        let mut w = World::new(seed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for _ in 0..STEPS {
                w.step();
            }
            w.now += 10_000;
            w.q.advance(w.now);
            w.settle();
            w.verified
        }));
        match outcome {
            Ok(v) => verified += v,
            Err(e) => panic!(
                "seed {seed} failed (rerun this seed): {:?}",
                e.downcast_ref::<String>()
            ),
        }
    }
    eprintln!("{verified} backups verified over {SEEDS} seeds");
    assert!(
        verified > SEEDS as usize * 3,
        "too few backups verified: {verified}"
    );
}
