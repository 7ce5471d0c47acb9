//! What the trace replays (`replay.rs`, `replay_live.rs`) share: how a recorded reply is compared
//! with the simulator's and how events are grouped per job or export.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use vbackup_core::domain::DomainEvent;
use vbackup_core::driver::MemoryEffects;
use vbackup_sim::scenarios::Host;
use vbackup_sim::world::{CLUSTER, DISK_BYTES};
use vbackup_sim::{FileSystem, Qemu, QmpError};

/// The parts of a `query-named-block-nodes` reply the simulator must reproduce, per named node:
/// driver, read-only, guest size (not for file nodes: their length is the host's allocation),
/// named bitmaps, and the members `extra` names, verbatim (null when absent). Nodes QEMU named
/// itself (`#block...`) are left out, except those in `generated` (the nodes of `-drive` disks,
/// which the replay built under their recorded names).
pub fn node_summary(
    nodes: &Value,
    extra: &[&str],
    generated: &[String],
) -> BTreeMap<String, Value> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            let name = n["node-name"].as_str().unwrap();
            !name.starts_with('#') || generated.iter().any(|g| g == name)
        })
        .map(|n| {
            let bitmaps: Vec<Value> = n["dirty-bitmaps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|b| b.get("name").is_some())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let size = if n["drv"] == "file" {
                Value::Null
            } else {
                n["image"]["virtual-size"].clone()
            };
            let mut summary =
                json!({"drv": n["drv"], "ro": n["ro"], "size": size, "bitmaps": bitmaps});
            for member in extra {
                summary[*member] = n.get(*member).cloned().unwrap_or(Value::Null);
            }
            (n["node-name"].as_str().unwrap().to_string(), summary)
        })
        .collect()
}

/// How a replay compares the simulator's reply with the recorded one.
pub struct Compare<'a> {
    /// Members of node records compared besides those [`node_summary`] always compares.
    pub node_members: &'a [&'a str],
    /// Blanks what of a `query-jobs` entry depends on timing.
    pub loosen_job: &'a dyn Fn(&mut Value),
    /// Generated node names compared like named ones (see [`node_summary`]).
    pub generated_nodes: &'a [String],
}

impl Compare<'_> {
    /// Asserts that `got` answers `cmd` as the recorded `want` (`{"return": ...}` or
    /// `{"error": ...}`) did: errors exactly, node queries by [`node_summary`], job queries once
    /// loosened, anything else exactly.
    pub fn reply(&self, cmd: &Value, want: &Value, got: &Result<Value, QmpError>) {
        let name = cmd["execute"].as_str().unwrap();
        if let Some(err) = want.get("error") {
            let got = got
                .as_ref()
                .expect_err(&format!("{cmd} should fail with {err}"));
            assert_eq!(got.to_json(), *err, "error of {cmd}");
            return;
        }
        let got = got
            .as_ref()
            .unwrap_or_else(|e| panic!("{cmd} failed on the simulator: {e}"));
        let want = &want["return"];
        match name {
            "query-named-block-nodes" => assert_eq!(
                node_summary(got, self.node_members, self.generated_nodes),
                node_summary(want, self.node_members, self.generated_nodes),
                "reply of {cmd}"
            ),
            "query-jobs" => assert_eq!(self.jobs(got), self.jobs(want), "reply of {cmd}"),
            _ => assert_eq!(got, want, "reply of {cmd}"),
        }
    }

    fn jobs(&self, jobs: &Value) -> Vec<Value> {
        jobs.as_array()
            .unwrap()
            .iter()
            .map(|j| {
                let mut j = j.clone();
                (self.loosen_job)(&mut j);
                j
            })
            .collect()
    }
}

/// The job or export an event is about (`""` for others) and its label: the status of a
/// status change, the name and data (after `loosen(name, data)`) of a job's end, the name of
/// anything else.
pub fn event_label(event: &Value, loosen: impl Fn(&str, &mut Value)) -> (String, String) {
    let name = event["event"].as_str().unwrap();
    let d = &event["data"];
    let (id, label) = match name {
        "JOB_STATUS_CHANGE" => (
            d["id"].as_str().unwrap(),
            d["status"].as_str().unwrap().to_string(),
        ),
        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" | "BLOCK_JOB_PENDING" => {
            let id = d
                .get("device")
                .or(d.get("id"))
                .and_then(Value::as_str)
                .unwrap();
            let mut data = d.clone();
            loosen(name, &mut data);
            (id, format!("{name} {data}"))
        }
        "BLOCK_EXPORT_DELETED" => (d["id"].as_str().unwrap(), name.to_string()),
        _ => ("", name.to_string()),
    };
    (id.to_string(), label)
}

/// The lab's images (`vbackup_sim::world::lab_files`) under `root`.
pub fn lab_files(root: &str) -> FileSystem {
    let p = |s: &str| format!("{root}{s}");
    let mut fs = FileSystem::new();
    fs.create_qcow2(&p("/img/vda.qcow2"), DISK_BYTES, CLUSTER, None);
    fs.create_qcow2(&p("/img/vdb.qcow2"), DISK_BYTES, CLUSTER, None);
    fs.write_image(&p("/img/vda.qcow2"), 0, &[0x11; 3 * CLUSTER as usize])
        .unwrap();
    fs.write_image(&p("/img/vdb.qcow2"), CLUSTER, &[0x22; 2 * CLUSTER as usize])
        .unwrap();
    fs.create_qcow2(
        &p("/img/vdb.ovl"),
        DISK_BYTES,
        CLUSTER,
        Some(&p("/img/vdb.qcow2")),
    );
    fs.write_image(&p("/img/vdb.ovl"), 2 * CLUSTER, &[0x33; CLUSTER as usize])
        .unwrap();
    fs
}

/// How far a slowed job has got when a command arrives depends on real time; how it ends is
/// compared through its events.
pub fn loosen_slowed_job(job: &mut Value, loose: &[String]) {
    if loose.iter().any(|id| job["id"] == id.as_str()) {
        job["current-progress"] = Value::Null;
        job["status"] = Value::Null;
    }
}

/// Event labels per job or export id; where a job stopped early (cancelled, failed) depends on
/// timing, so its `offset` and `speed` are left out.
pub fn per_id(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let (id, label) = event_label(e, |name, data| {
            if name == "BLOCK_JOB_CANCELLED" || data.get("error").is_some() {
                data["offset"] = Value::Null;
                data["speed"] = Value::Null;
            }
            if name == "BLOCK_JOB_COMPLETED" {
                // The speed the test's link gave slowed jobs is not in the trace.
                data["speed"] = Value::Null;
            }
        });
        let seq = out.entry(id).or_default();
        // A paused/running pair right after `running` is a drain on a graph change, not a
        // pause; how many a job sees depends on how long it ran (reference §4, gotcha 17).
        if label == "running" && seq.last().is_some_and(|l| l == "paused") {
            let before = seq.len().checked_sub(2).and_then(|i| seq.get(i));
            if before.is_some_and(|l| l == "running") {
                seq.pop();
                continue;
            }
        }
        seq.push(label);
    }
    out
}

/// Lets the simulator's jobs run until each has produced the events the trace shows before
/// this point: the recording's jobs ran on real time, the simulator's on virtual time.
pub fn catch_up(q: &mut Qemu, want: &[Value], got: &mut Vec<Value>) {
    let target = per_id(want);
    for _ in 0..10_000 {
        let have = per_id(got);
        let behind = target
            .iter()
            .any(|(id, w)| !id.is_empty() && have.get(id).map_or(0, Vec::len) < w.len());
        let Some(at) = q.next_event_ms().filter(|_| behind) else {
            return;
        };
        q.advance(at);
        got.extend(q.take_events());
    }
}

/// Adds the job speed the live link added while the host slowed jobs.
pub fn with_speed(cmd: &mut Value, speed: u64) {
    let add = |job: &mut Value| {
        job["speed"] = json!(speed);
    };
    match cmd["execute"].as_str() {
        Some("blockdev-backup") => add(&mut cmd["arguments"]),
        Some("transaction") => {
            for action in cmd["arguments"]["actions"].as_array_mut().unwrap() {
                if action["type"] == "blockdev-backup" {
                    add(&mut action["data"]);
                }
            }
        }
        _ => {}
    }
}

/// The host side of a replay: the places and sockets of the live run. A replay has QMP only,
/// no disks, so it serves the scenarios that read no content.
pub struct ReplayHost {
    root: String,
    nbd_socket: String,
}

impl ReplayHost {
    /// A host whose lab is under `root`, with the NBD server at `nbd_socket` (a lab path).
    pub fn new(root: &str, nbd_socket: &str) -> ReplayHost {
        ReplayHost {
            root: root.into(),
            nbd_socket: format!("{root}{nbd_socket}"),
        }
    }
}

impl Host for ReplayHost {
    fn guest_write(&mut self, _: &str, _: u64, _: &[u8]) -> Result<(), String> {
        Err("a replay has no guest".into())
    }
    fn disk_content(&mut self, _: &str) -> Result<Vec<u8>, String> {
        Err("a replay has no disks".into())
    }
    fn restore(&mut self, _: &str, _: Option<&[u8]>) -> Result<Vec<u8>, String> {
        Err("a replay has no images".into())
    }
    fn read_export(&mut self, _: &str, _: Option<&[u8]>) -> Result<Vec<u8>, String> {
        Err("a replay has no exports".into())
    }
    fn fail_writes_to(&mut self, _: &str) -> bool {
        // The recorded target failed; its replies are in the trace.
        true
    }
    fn slow_jobs(&mut self, _: Option<u64>) -> Result<(), String> {
        Ok(())
    }
    fn place(&mut self, lab_path: &str) -> String {
        format!("{}{lab_path}", self.root)
    }
    fn nbd_socket(&mut self) -> String {
        self.nbd_socket.clone()
    }
    fn crash_qemu(&mut self) -> Result<(), String> {
        Err("a replay cannot crash QEMU".into())
    }
}

/// Applies a recorded guest write (`{"disk", "offset", "len", "byte"}`) to the simulator,
/// through the device `device` names for the write's disk.
pub fn apply_write(q: &mut Qemu, w: &Value, device: impl FnOnce(&str) -> String) {
    let len = w["len"].as_u64().unwrap() as usize;
    let target = device(w["disk"].as_str().unwrap());
    let now = q.now_ms();
    q.guest_write(
        now,
        &target,
        w["offset"].as_u64().unwrap(),
        &vec![w["byte"].as_u64().unwrap() as u8; len],
    )
    .unwrap();
}

/// The events of a replay's driver.
pub fn memory_events(e: &MemoryEffects) -> &[DomainEvent] {
    &e.events
}

/// The QMP side of replaying a live recording (`replay_live.rs`, `replay_vm.rs`): every recorded
/// command goes to the simulator at the point it was sent, with the job speed the live link
/// added while the host slowed jobs, and its reply is compared; events are compared per job
/// and export at the end.
pub struct LiveReplay<'a> {
    /// The speed the host's link gave jobs started now.
    pub slow: Option<u64>,
    loose: Vec<String>,
    want_events: Vec<Value>,
    /// Events the simulator produced.
    pub got_events: Vec<Value>,
    commands: usize,
    generated: &'a [String],
}

impl<'a> LiveReplay<'a> {
    /// A replay comparing the generated node names `generated` like named ones.
    pub fn new(generated: &'a [String]) -> Self {
        LiveReplay {
            slow: None,
            loose: Vec::new(),
            want_events: Vec::new(),
            got_events: Vec::new(),
            commands: 0,
            generated,
        }
    }

    /// Replays line `i` of `trace` (of scenario `name`) on `q`.
    pub fn line(&mut self, q: &mut Qemu, trace: &[Value], i: usize, name: &str) {
        let line = &trace[i];
        let msg = &line["msg"];
        if msg.get("QMP").is_some() {
            // A new connection: capabilities are negotiated again.
            q.new_monitor_connection();
            return;
        }
        if line["dir"] == "recv" {
            if msg.get("event").is_some() {
                self.want_events.push(msg.clone());
            }
            return;
        }
        if msg["execute"] == "blockdev-add" && msg["arguments"]["driver"] == "file" {
            // The driver's exclusive create (Output::File) is not QMP and not in the trace.
            let path = msg["arguments"]["filename"].as_str().unwrap();
            if !q.fs().exists(path) {
                q.fs_mut().touch(path);
            }
        }
        let mut cmd = json!({"execute": msg["execute"], "arguments": msg.get("arguments").cloned().unwrap_or(json!({}))});
        if let Some(speed) = self.slow {
            with_speed(&mut cmd, speed);
            for job in cmd.to_string().split("\"job-id\":\"").skip(1) {
                self.loose.push(job.split('"').next().unwrap().to_string());
            }
        }
        let want = trace[i..]
            .iter()
            .find(|l| l["dir"] == "recv" && l["msg"]["id"] == msg["id"])
            .map(|l| l["msg"].clone())
            .unwrap_or_else(|| panic!("{name}: no reply to {msg}"));
        catch_up(q, &self.want_events, &mut self.got_events);
        // One millisecond of virtual time between two recorded commands; jobs otherwise
        // advance only as far as the recorded events show they had (see `catch_up`).
        let now = q.now_ms() + 1;
        let got = q.execute(now, &cmd);
        // Allocation (`actual-size`), cache and `json:` file names are the host's business:
        // node records are compared by what they are and their named bitmaps only.
        let loose = &self.loose;
        let loosen_job = |job: &mut Value| loosen_slowed_job(job, loose);
        let compare = Compare {
            node_members: &[],
            loosen_job: &loosen_job,
            generated_nodes: self.generated,
        };
        compare.reply(&cmd, &want, &got);
        self.got_events.extend(q.take_events());
        self.commands += 1;
    }

    /// Checks that the trace held commands and that the events per job and export agree.
    pub fn finish(self, name: &str) {
        assert!(self.commands > 0, "{name} holds commands");
        assert_eq!(
            per_id(&self.got_events),
            per_id(&self.want_events),
            "events per job/export of {name}"
        );
    }
}
