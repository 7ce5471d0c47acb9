//! A scripted QMP peer for the engine's tests: a tiny QEMU block layer (nodes, bitmaps, jobs)
//! that answers the engine's commands, plus a harness that runs the engine against it and
//! writes a compact transcript of everything that crossed the boundary.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Value, json};
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk, CheckpointTree};
use vbackup_core::domain::{
    Domain, DomainConfig, FileError, FileErrorKind, FileOp, Input, Output, Reply, Request,
    RequestId, StoreOp,
};
use vbackup_core::error::Error;
use vbackup_core::link::{CommandId, Timestamp};
use vbackup_core::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup_core::qmp::{QmpCommand, QmpError, QmpEvent};

#[derive(Debug, Clone)]
pub struct FakeBitmap {
    pub name: String,
    pub recording: bool,
    pub persistent: bool,
    pub inconsistent: bool,
    pub granularity: u64,
    pub count: u64,
}

#[derive(Debug, Clone)]
pub struct FakeNode {
    pub drv: String,
    pub ro: bool,
    pub filename: String,
    pub size: u64,
    pub bitmaps: Vec<FakeBitmap>,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub kind: String,
    pub status: String,
    pub current: u64,
    pub total: u64,
    pub error: Option<String>,
}

/// The scripted peer.
#[derive(Debug, Default)]
pub struct Peer {
    pub nodes: BTreeMap<String, FakeNode>,
    pub jobs: BTreeMap<String, FakeJob>,
    /// Command names (or `transaction`) whose next execution fails with the given text.
    pub failures: Vec<(String, String)>,
    /// Paths whose exclusive creation fails.
    pub existing_files: BTreeSet<String>,
    /// Creation jobs that fail with the given error.
    pub failing_create_jobs: BTreeSet<String>,
    pub files: BTreeSet<String>,
    pub nbd_running: bool,
    /// Ports that are already taken.
    pub busy_ports: BTreeSet<String>,
    pub exports: BTreeSet<String>,
    /// Creation jobs never report their conclusion (a wedged QEMU).
    pub silent_create_jobs: bool,
    /// Paths whose sync fails with the given text.
    pub failing_syncs: BTreeMap<String, String>,
}

fn err(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

fn ev(name: &str, data: Value) -> QmpEvent {
    QmpEvent::from_parts(name, data).expect("test event decodes")
}

fn status_event(id: &str, status: &str) -> QmpEvent {
    ev("JOB_STATUS_CHANGE", json!({"id": id, "status": status}))
}

impl Peer {
    /// Nodes for every layer of `def`: format node over storage node; backing layers read-only.
    pub fn for_domain(def: &DomainDef, sizes: &BTreeMap<String, u64>) -> Self {
        let mut p = Peer::default();
        for d in &def.disks {
            for (depth, l) in d.layers.iter().enumerate() {
                let fmt = l.node_name.clone().unwrap();
                let path = l.path.clone().unwrap_or_default();
                let size = *sizes.get(&d.target).unwrap_or(&(64 << 20));
                p.nodes.insert(
                    fmt.replace("-format", "-storage"),
                    FakeNode {
                        drv: "file".into(),
                        ro: depth > 0,
                        filename: path.clone(),
                        size,
                        bitmaps: vec![],
                    },
                );
                p.nodes.insert(
                    fmt,
                    FakeNode {
                        drv: l.format.name().into(),
                        ro: depth > 0,
                        filename: path,
                        size,
                        bitmaps: vec![],
                    },
                );
            }
        }
        p
    }

    pub fn add_bitmap(&mut self, node: &str, name: &str, count: u64) {
        self.nodes.get_mut(node).unwrap().bitmaps.push(FakeBitmap {
            name: name.into(),
            recording: true,
            persistent: true,
            inconsistent: false,
            granularity: 65536,
            count,
        });
    }

    pub fn bitmap_mut(&mut self, node: &str, name: &str) -> &mut FakeBitmap {
        self.nodes
            .get_mut(node)
            .unwrap()
            .bitmaps
            .iter_mut()
            .find(|b| b.name == name)
            .unwrap()
    }

    pub fn has_bitmap(&self, node: &str, name: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.bitmaps.iter().any(|b| b.name == name))
    }

    pub fn fail_next(&mut self, command: &str, desc: &str) {
        self.failures.push((command.into(), desc.into()));
    }

    /// Fails the `nth` (0-based) next execution of `command`.
    pub fn fail_after(&mut self, command: &str, nth: usize, desc: &str) {
        self.failures
            .retain(|(c, _)| c != &format!("{command}#pass"));
        for _ in 0..nth {
            self.failures
                .push((format!("{command}#pass"), String::new()));
        }
        self.failures.push((command.into(), desc.into()));
    }

    fn take_failure(&mut self, command: &str) -> Option<QmpError> {
        // Executions to let through first are recorded as `<command>#pass`.
        let pass = format!("{command}#pass");
        if let Some(i) = self.failures.iter().position(|(c, _)| *c == pass) {
            self.failures.remove(i);
            return None;
        }
        let i = self.failures.iter().position(|(c, _)| c == command)?;
        Some(err(self.failures.remove(i).1))
    }

    fn query_nodes(&self) -> Value {
        Value::Array(
            self.nodes
                .iter()
                .map(|(name, n)| {
                    json!({
                        "node-name": name,
                        "drv": n.drv,
                        "ro": n.ro,
                        "file": n.filename,
                        "image": {"filename": n.filename, "format": n.drv, "virtual-size": n.size,
                                  "cluster-size": 65536},
                        "dirty-bitmaps": n.bitmaps.iter().map(|b| {
                            let mut v = json!({"name": b.name, "recording": b.recording,
                                "persistent": b.persistent, "busy": false,
                                "granularity": b.granularity, "count": b.count});
                            if b.inconsistent { v["inconsistent"] = json!(true); }
                            v
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }

    /// Applies a transaction atomically on a copy.
    fn transaction(&mut self, actions: &[Value]) -> Result<Vec<QmpEvent>, QmpError> {
        let mut nodes = self.nodes.clone();
        let mut jobs = self.jobs.clone();
        let mut events = Vec::new();
        for a in actions {
            let data = &a["data"];
            let s = |k: &str| data[k].as_str().unwrap_or_default().to_owned();
            match a["type"].as_str().unwrap_or_default() {
                "block-dirty-bitmap-add" => {
                    let node = nodes.get_mut(&s("node")).ok_or_else(|| {
                        err(format!(
                            "Cannot find device='{0}' nor node-name='{0}'",
                            s("node")
                        ))
                    })?;
                    if node.bitmaps.iter().any(|b| b.name == s("name")) {
                        return Err(err(format!("Bitmap already exists: {}", s("name"))));
                    }
                    if node.ro {
                        return Err(err("Cannot add a bitmap to a read-only node"));
                    }
                    node.bitmaps.push(FakeBitmap {
                        name: s("name"),
                        recording: !data["disabled"].as_bool().unwrap_or(false),
                        persistent: data["persistent"].as_bool().unwrap_or(false),
                        inconsistent: false,
                        granularity: data["granularity"].as_u64().unwrap_or(65536),
                        count: 0,
                    });
                }
                "block-dirty-bitmap-remove" => {
                    let node = nodes.get_mut(&s("node")).ok_or_else(|| {
                        err(format!(
                            "Cannot find device='{0}' nor node-name='{0}'",
                            s("node")
                        ))
                    })?;
                    let before = node.bitmaps.len();
                    node.bitmaps.retain(|b| b.name != s("name"));
                    if node.bitmaps.len() == before {
                        return Err(err(format!("Dirty bitmap '{}' not found", s("name"))));
                    }
                    if node.ro {
                        return Err(err("Cannot remove a bitmap from a read-only node"));
                    }
                }
                "block-dirty-bitmap-merge" => {
                    let mut total = 0;
                    for src in data["bitmaps"].as_array().cloned().unwrap_or_default() {
                        let (n, b) = match &src {
                            Value::String(b) => (s("node"), b.clone()),
                            o => (
                                o["node"].as_str().unwrap_or_default().to_owned(),
                                o["name"].as_str().unwrap_or_default().to_owned(),
                            ),
                        };
                        let bm = nodes
                            .get(&n)
                            .and_then(|x| x.bitmaps.iter().find(|x| x.name == b))
                            .ok_or_else(|| err(format!("Dirty bitmap '{b}' not found")))?;
                        if bm.inconsistent {
                            return Err(err(format!(
                                "Bitmap '{b}' is inconsistent and cannot be used"
                            )));
                        }
                        total = total.max(bm.count);
                    }
                    let target = nodes
                        .get_mut(&s("node"))
                        .and_then(|x| x.bitmaps.iter_mut().find(|x| x.name == s("target")))
                        .ok_or_else(|| err(format!("Dirty bitmap '{}' not found", s("target"))))?;
                    target.count = target.count.max(total);
                }
                "blockdev-backup" => {
                    let id = s("job-id");
                    let dev = nodes.get(&s("device")).ok_or_else(|| {
                        err(format!(
                            "Cannot find device='{0}' nor node-name='{0}'",
                            s("device")
                        ))
                    })?;
                    if !nodes.contains_key(&s("target")) {
                        return Err(err(format!(
                            "Cannot find device='{0}' nor node-name='{0}'",
                            s("target")
                        )));
                    }
                    let total = match data["bitmap"].as_str() {
                        Some(b) => dev
                            .bitmaps
                            .iter()
                            .find(|x| x.name == b)
                            .map_or(0, |x| x.count),
                        None => dev.size,
                    };
                    if jobs.contains_key(&id) {
                        return Err(err(format!("Job ID '{id}' already in use")));
                    }
                    jobs.insert(
                        id.clone(),
                        FakeJob {
                            kind: "backup".into(),
                            status: "running".into(),
                            current: 0,
                            total,
                            error: None,
                        },
                    );
                    events.push(status_event(&id, "created"));
                    events.push(status_event(&id, "running"));
                    events.push(status_event(&id, "paused"));
                    events.push(status_event(&id, "running"));
                }
                other => return Err(err(format!("unknown action {other}"))),
            }
        }
        self.nodes = nodes;
        self.jobs = jobs;
        Ok(events)
    }

    /// Executes one command: its result and the events that follow.
    pub fn execute(&mut self, cmd: &QmpCommand) -> (Result<Value, QmpError>, Vec<QmpEvent>) {
        let name = cmd.name().to_owned();
        if let Some(e) = self.take_failure(&name) {
            return (Err(e), vec![]);
        }
        let args = cmd.arguments().unwrap_or(json!({}));
        let s = |k: &str| args[k].as_str().unwrap_or_default().to_owned();
        let ok = Ok(json!({}));
        match name.as_str() {
            "qmp_capabilities" => (ok, vec![]),
            "query-named-block-nodes" => (Ok(self.query_nodes()), vec![]),
            "query-jobs" => (
                Ok(Value::Array(
                    self.jobs
                        .iter()
                        .map(|(id, j)| {
                            let mut v = json!({"id": id, "type": j.kind, "status": j.status,
                                "current-progress": j.current, "total-progress": j.total});
                            if let Some(e) = &j.error {
                                v["error"] = json!(e);
                            }
                            v
                        })
                        .collect(),
                )),
                vec![],
            ),
            "transaction" => {
                let actions = args["actions"].as_array().cloned().unwrap_or_default();
                match self.transaction(&actions) {
                    Ok(events) => (ok, events),
                    Err(e) => (Err(e), vec![]),
                }
            }
            "blockdev-add" => {
                let node = s("node-name");
                if self.nodes.contains_key(&node) {
                    return (
                        Err(err(format!("Duplicate nodes with node-name='{node}'"))),
                        vec![],
                    );
                }
                let (filename, size) = match s("driver").as_str() {
                    "file" | "host_device" => {
                        let f = s("filename");
                        if !self.files.contains(&f) && s("driver") == "file" {
                            return (
                                Err(err(format!(
                                    "Could not open '{f}': No such file or directory"
                                ))),
                                vec![],
                            );
                        }
                        (f, 0)
                    }
                    _ => match self.nodes.get(&s("file")) {
                        Some(n) => (n.filename.clone(), n.size),
                        None => {
                            return (
                                Err(err(format!(
                                    "Cannot find device='{0}' nor node-name='{0}'",
                                    s("file")
                                ))),
                                vec![],
                            );
                        }
                    },
                };
                self.nodes.insert(
                    node,
                    FakeNode {
                        drv: s("driver"),
                        ro: args["read-only"].as_bool().unwrap_or(false),
                        filename,
                        size,
                        bitmaps: vec![],
                    },
                );
                (ok, vec![])
            }
            "blockdev-create" => {
                let id = s("job-id");
                let opts = &args["options"];
                let storage = opts["file"].as_str().unwrap_or_default().to_owned();
                if let Some(n) = self.nodes.get_mut(&storage) {
                    n.size = opts["size"].as_u64().unwrap_or(0);
                }
                let failing = self.failing_create_jobs.contains(&id);
                self.jobs.insert(
                    id.clone(),
                    FakeJob {
                        kind: "create".into(),
                        status: "concluded".into(),
                        current: 1,
                        total: 1,
                        error: failing.then(|| "Could not create image".to_owned()),
                    },
                );
                if self.silent_create_jobs {
                    return (ok, vec![status_event(&id, "created")]);
                }
                (
                    ok,
                    vec![
                        status_event(&id, "created"),
                        status_event(&id, "running"),
                        status_event(&id, "waiting"),
                        status_event(&id, "pending"),
                        status_event(&id, "concluded"),
                    ],
                )
            }
            "job-dismiss" => {
                let id = s("id");
                match self.jobs.get(&id) {
                    Some(j) if j.status == "concluded" => {
                        self.jobs.remove(&id);
                        (ok, vec![status_event(&id, "null")])
                    }
                    Some(_) => (
                        Err(err(format!(
                            "Job '{id}' in state 'running' cannot accept command verb 'dismiss'"
                        ))),
                        vec![],
                    ),
                    None => (Err(err("Job not found")), vec![]),
                }
            }
            "block-job-cancel" => {
                let id = s("device");
                match self.jobs.get_mut(&id) {
                    Some(j) if j.status == "running" => {
                        j.status = "concluded".into();
                        j.error = Some("Operation canceled".into());
                        (
                            ok,
                            vec![
                                status_event(&id, "aborting"),
                                ev(
                                    "BLOCK_JOB_CANCELLED",
                                    json!({"type": "backup", "device": id, "len": j.total, "offset": j.current, "speed": 0}),
                                ),
                                status_event(&id, "concluded"),
                            ],
                        )
                    }
                    _ => (Err(err(format!("Block job '{id}' not found"))), vec![]),
                }
            }
            "blockdev-del" => {
                let node = s("node-name");
                if self.nodes.remove(&node).is_some() {
                    (ok, vec![])
                } else {
                    (
                        Err(err(format!("Failed to find node with node-name='{node}'"))),
                        vec![],
                    )
                }
            }
            "blockdev-reopen" => {
                for o in args["options"].as_array().cloned().unwrap_or_default() {
                    let n = o["node-name"].as_str().unwrap_or_default();
                    if let Some(node) = self.nodes.get_mut(n) {
                        node.ro = o["read-only"].as_bool().unwrap_or(false);
                    }
                }
                (ok, vec![])
            }
            "block-dirty-bitmap-remove" => {
                let r =
                    self.transaction(&[json!({"type": "block-dirty-bitmap-remove", "data": args})]);
                (r.map(|_| json!({})), vec![])
            }
            "nbd-server-start" => {
                let port = args["addr"]["data"]["port"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if self.busy_ports.contains(&port) {
                    return (
                        Err(err("Failed to bind socket: Address already in use")),
                        vec![],
                    );
                }
                self.nbd_running = true;
                (ok, vec![])
            }
            "nbd-server-stop" => {
                if !self.nbd_running {
                    return (Err(err("NBD server not running")), vec![]);
                }
                self.nbd_running = false;
                let events = self
                    .exports
                    .iter()
                    .map(|id| ev("BLOCK_EXPORT_DELETED", json!({"id": id})))
                    .collect();
                self.exports.clear();
                (ok, events)
            }
            "block-export-add" => {
                if !self.nodes.contains_key(&s("node-name")) {
                    return (Err(err("node not found")), vec![]);
                }
                self.exports.insert(s("id"));
                let mut events = Vec::new();
                for (id, j) in &self.jobs {
                    if j.status == "running" {
                        events.push(status_event(id, "paused"));
                        events.push(status_event(id, "running"));
                    }
                }
                (ok, events)
            }
            "block-export-del" => {
                let id = s("id");
                if self.exports.remove(&id) {
                    (ok, vec![ev("BLOCK_EXPORT_DELETED", json!({"id": id}))])
                } else {
                    (Err(err(format!("Export '{id}' is not found"))), vec![])
                }
            }
            "query-block-exports" => (
                Ok(Value::Array(
                    self.exports
                        .iter()
                        .map(|id| json!({"id": id, "type": "nbd", "node-name": "", "shutting-down": false}))
                        .collect(),
                )),
                vec![],
            ),
            "object-add" | "object-del" => (ok, vec![]),
            other => (
                Err(QmpError::generic(format!(
                    "The command {other} has not been found"
                ))),
                vec![],
            ),
        }
    }

    /// Ends a running backup job successfully (or with `error`): the events QEMU sends.
    pub fn finish_job(&mut self, id: &str, error: Option<&str>) -> Vec<QmpEvent> {
        let j = self.jobs.get_mut(id).expect("job exists");
        j.status = "concluded".into();
        j.current = if error.is_some() {
            j.total / 2
        } else {
            j.total
        };
        j.error = error.map(Into::into);
        let mut data = json!({"type": "backup", "device": id, "len": j.total, "offset": j.current, "speed": 0});
        if let Some(e) = error {
            data["error"] = json!(e);
        }
        vec![
            status_event(id, "waiting"),
            status_event(id, "pending"),
            ev("BLOCK_JOB_COMPLETED", data),
            status_event(id, "concluded"),
        ]
    }
}

/// Runs a domain against the peer and records a transcript.
pub struct Harness {
    pub domain: Domain,
    pub peer: Peer,
    pub now_ms: u64,
    pub lines: Vec<String>,
    pub answers: BTreeMap<u64, Result<Reply, Error>>,
    pub store: Vec<StoreOp>,
    next_req: u64,
    /// Whether events that follow a reply are fed before it (QEMU does that for job events).
    pub events_before_reply: bool,
}

impl Harness {
    pub fn new(def: DomainDef, peer: Peer, tree: CheckpointTree) -> Self {
        Self::with_config(def, peer, tree, DomainConfig::default())
    }

    pub fn with_config(
        def: DomainDef,
        peer: Peer,
        tree: CheckpointTree,
        config: DomainConfig,
    ) -> Self {
        Harness {
            domain: Domain::new(def, config, tree, None),
            peer,
            now_ms: 1_700_000_000_000,
            lines: Vec::new(),
            answers: BTreeMap::new(),
            store: Vec::new(),
            next_req: 0,
            events_before_reply: false,
        }
    }

    /// Connects (negotiates the session) without recording.
    pub fn connect(&mut self) {
        self.feed(Input::Reconnected);
        self.lines.clear();
    }

    pub fn note(&mut self, text: &str) {
        self.lines.push(format!("# {text}"));
    }

    /// Sends a request and runs until nothing moves; returns its request id.
    pub fn request(&mut self, r: Request) -> u64 {
        self.next_req += 1;
        let id = self.next_req;
        self.lines
            .push(format!("== request #{id} {}", describe_request(&r)));
        self.feed(Input::Request(RequestId(id), r));
        id
    }

    pub fn answer(&self, id: u64) -> Option<&Result<Reply, Error>> {
        self.answers.get(&id)
    }

    pub fn events(&mut self, events: Vec<QmpEvent>) {
        let mut q: VecDeque<Input> = events.into_iter().map(Input::Event).collect();
        self.run(&mut q);
    }

    pub fn feed(&mut self, input: Input) {
        let mut q = VecDeque::from([input]);
        self.run(&mut q);
    }

    fn run(&mut self, q: &mut VecDeque<Input>) {
        let mut guard = 0;
        while let Some(input) = q.pop_front() {
            guard += 1;
            assert!(guard < 10_000, "engine does not settle");
            match &input {
                Input::Event(e) => self.lines.push(format!("<~ {}", describe_event(e))),
                Input::Reply(_, Err(e)) => self.lines.push(format!("<- error: {}", e.desc)),
                Input::LinkDown => self.lines.push("~~ link down".into()),
                Input::Reconnected => self.lines.push("~~ reconnected".into()),
                _ => {}
            }
            let outputs = self.domain.handle(Timestamp::from_ms(self.now_ms), input);
            for o in outputs {
                match o {
                    Output::Send(id, cmd) => {
                        self.lines.push(format!("-> {}", compact(&cmd)));
                        let (result, events) = self.peer.execute(&cmd);
                        let reply = Input::Reply(id, result);
                        if self.events_before_reply {
                            q.extend(events.into_iter().map(Input::Event));
                            q.push_back(reply);
                        } else {
                            q.push_back(reply);
                            q.extend(events.into_iter().map(Input::Event));
                        }
                    }
                    Output::Persist(op) => {
                        self.lines.push(format!("store {}", describe_store(&op)));
                        self.store.push(op);
                    }
                    Output::File(id, op) => match op {
                        FileOp::CreateExclusive { path } => {
                            self.lines.push(format!("file create {path}"));
                            let r = if self.peer.existing_files.contains(&path)
                                || self.peer.files.contains(&path)
                            {
                                Err(FileError::new(
                                    FileErrorKind::AlreadyExists,
                                    &path,
                                    "File exists",
                                ))
                            } else {
                                self.peer.files.insert(path);
                                Ok(())
                            };
                            q.push_back(Input::FileDone(id, r));
                        }
                        FileOp::Remove { path } => {
                            self.lines.push(format!("file remove {path}"));
                            self.peer.files.remove(&path);
                            q.push_back(Input::FileDone(id, Ok(())));
                        }
                        FileOp::Sync { path } => {
                            self.lines.push(format!("file sync {path}"));
                            let r = match self.peer.failing_syncs.get(&path) {
                                Some(e) => Err(FileError::other(&path, e.clone())),
                                None => Ok(()),
                            };
                            q.push_back(Input::FileDone(id, r));
                        }
                    },
                    Output::Respond(id, r) => {
                        self.lines
                            .push(format!("=> #{} {}", id.0, describe_answer(&r)));
                        self.answers.insert(id.0, r);
                    }
                    Output::Emit(e) => self.lines.push(format!("event {e:?}")),
                }
            }
        }
    }

    pub fn transcript(&self) -> String {
        self.lines.join("\n")
    }
}

fn describe_request(r: &Request) -> String {
    match r {
        Request::CheckpointCreate {
            checkpoint,
            quiesce,
        } => {
            format!(
                "checkpoint-create {}{}",
                checkpoint.name,
                if *quiesce { " quiesce" } else { "" }
            )
        }
        Request::CheckpointRedefine {
            checkpoint,
            validate,
        } => format!(
            "checkpoint-redefine {} parent={}{}",
            checkpoint.name,
            checkpoint.parent.as_deref().unwrap_or("-"),
            if *validate { " validate" } else { "" }
        ),
        Request::CheckpointDelete {
            name,
            scope,
            metadata_only,
        } => {
            format!(
                "checkpoint-delete {name} {scope:?}{}",
                if *metadata_only { " metadata-only" } else { "" }
            )
        }
        Request::CheckpointGetXml { name, size } => format!("checkpoint-xml {name} size={size}"),
        Request::BackupBegin {
            spec,
            checkpoint,
            reuse_external,
        } => format!(
            "backup-begin {:?} incremental={} checkpoint={}{}",
            spec.mode,
            spec.incremental.as_deref().unwrap_or("-"),
            checkpoint.as_ref().map_or("-", |c| c.name.as_str()),
            if *reuse_external {
                " reuse-external"
            } else {
                ""
            }
        ),
        Request::AbortJob => "abort".into(),
        Request::JobStats { completed, .. } => format!("job-stats completed={completed}"),
        other => format!("{other:?}"),
    }
}

fn describe_event(e: &QmpEvent) -> String {
    let data = e.data();
    match e.name() {
        "JOB_STATUS_CHANGE" => format!(
            "JOB_STATUS_CHANGE {} {}",
            data["id"].as_str().unwrap_or_default(),
            data["status"].as_str().unwrap_or_default()
        ),
        name => format!("{name} {}", data),
    }
}

fn describe_store(op: &StoreOp) -> String {
    match op {
        StoreOp::PutCheckpoint(c) => format!(
            "put-checkpoint {} parent={}",
            c.name,
            c.parent.as_deref().unwrap_or("-")
        ),
        StoreOp::DeleteCheckpoint(n) => format!("delete-checkpoint {n}"),
        StoreOp::SetCurrentCheckpoint(c) => format!("current {}", c.as_deref().unwrap_or("-")),
        StoreOp::PutBackupJournal(p) => format!(
            "put-journal {:?} {:?} disks={} files={}",
            p.mode,
            p.stage,
            p.disks
                .iter()
                .map(|d| d.target.as_str())
                .collect::<Vec<_>>()
                .join(","),
            p.created_files.len()
        ),
        StoreOp::DeleteBackupJournal => "delete-journal".into(),
        StoreOp::SetPendingCheckpoints(c) if c.is_empty() => "pending -".to_owned(),
        StoreOp::SetPendingCheckpoints(c) => format!("pending {}", c.join(",")),
    }
}

fn describe_answer(r: &Result<Reply, Error>) -> String {
    match r {
        Ok(Reply::Done) => "ok".into(),
        Ok(Reply::Checkpoint(c)) => format!(
            "ok checkpoint {} parent={} sizes=[{}]",
            c.name,
            c.parent.as_deref().unwrap_or("-"),
            c.disks
                .iter()
                .map(|d| format!(
                    "{}:{}",
                    d.target,
                    d.size_bytes.map_or("-".into(), |s| s.to_string())
                ))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Ok(Reply::CheckpointNames(n)) => format!("ok [{}]", n.join(" ")),
        Ok(Reply::Backup(p)) => format!("ok backup {:?}", p.mode),
        Ok(Reply::Stats(s)) => format!("ok stats {s:?}"),
        Err(e) => format!("error [{}] {e}", e.category()),
    }
}

/// One compact line per command: transactions list their actions.
pub fn compact(cmd: &QmpCommand) -> String {
    let args = cmd.arguments();
    match (cmd.name(), &args) {
        ("transaction", Some(a)) => {
            let actions: Vec<String> = a["actions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(compact_action)
                .collect();
            format!("transaction [{}]", actions.join(", "))
        }
        (name, None) => name.to_owned(),
        (name, Some(a)) => format!("{name} {}", a),
    }
}

fn compact_action(a: &Value) -> String {
    let d = &a["data"];
    let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
    match a["type"].as_str().unwrap_or_default() {
        "block-dirty-bitmap-add" => {
            let kind = if d["persistent"].as_bool() == Some(true) {
                "persistent"
            } else {
                "temp"
            };
            let gran = d["granularity"]
                .as_u64()
                .map(|g| format!(" g={g}"))
                .unwrap_or_default();
            let dis = if d["disabled"].as_bool() == Some(true) {
                " disabled"
            } else {
                ""
            };
            format!("bitmap-add {} {} {kind}{dis}{gran}", s("node"), s("name"))
        }
        "block-dirty-bitmap-remove" => format!("bitmap-remove {} {}", s("node"), s("name")),
        "block-dirty-bitmap-merge" => {
            let srcs: Vec<String> = d["bitmaps"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|b| match b {
                    Value::String(n) => n.clone(),
                    o => format!(
                        "{}/{}",
                        o["node"].as_str().unwrap_or_default(),
                        o["name"].as_str().unwrap_or_default()
                    ),
                })
                .collect();
            format!(
                "bitmap-merge {} {} <- {}",
                s("node"),
                s("target"),
                srcs.join(" ")
            )
        }
        "blockdev-backup" => format!(
            "backup {} {}->{} sync={}{}{}",
            s("job-id"),
            s("device"),
            s("target"),
            s("sync"),
            d["bitmap"]
                .as_str()
                .map(|b| format!(" bitmap={b}"))
                .unwrap_or_default(),
            d.get("x-perf")
                .map(|p| format!(" x-perf={p}"))
                .unwrap_or_default()
        ),
        other => format!("{other} {d}"),
    }
}

// ----- fixtures -----

pub fn layer(node: &str, path: &str) -> Layer {
    Layer {
        storage: StorageType::File,
        format: ImageFormat::Qcow2,
        path: Some(path.into()),
        index: None,
        node_name: Some(node.into()),
    }
}

pub fn disk(target: &str, layers: Vec<Layer>) -> DiskDef {
    DiskDef {
        target: target.into(),
        device: DiskDevice::Disk,
        bus: Some("virtio".into()),
        readonly: false,
        transient: false,
        layers,
    }
}

/// The traces' domain: vda (256 MiB, node libvirt-2-format) and vdb (64 MiB, libvirt-1-format).
pub fn lab_domain() -> DomainDef {
    DomainDef {
        name: "lab1".into(),
        uuid: None,
        disks: vec![
            disk("vda", vec![layer("libvirt-2-format", "/img/vda.qcow2")]),
            disk("vdb", vec![layer("libvirt-1-format", "/img/vdb.qcow2")]),
        ],
    }
}

/// vda with an external snapshot: libvirt-3-format (top) over libvirt-2-format.
pub fn layered_domain() -> DomainDef {
    DomainDef {
        name: "lab1".into(),
        uuid: None,
        disks: vec![
            disk(
                "vda",
                vec![
                    layer("libvirt-3-format", "/img/vda.snap1"),
                    layer("libvirt-2-format", "/img/vda.qcow2"),
                ],
            ),
            disk("vdb", vec![layer("libvirt-1-format", "/img/vdb.qcow2")]),
        ],
    }
}

pub fn lab_sizes() -> BTreeMap<String, u64> {
    BTreeMap::from([("vda".to_owned(), 256 << 20), ("vdb".to_owned(), 64 << 20)])
}

pub fn checkpoint(name: &str, disks: &[&str]) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        description: None,
        parent: None,
        creation_time_s: 1_700_000_000,
        disks: disks
            .iter()
            .map(|d| CheckpointDisk {
                target: (*d).into(),
                bitmap: Some(name.into()),
                size_bytes: None,
            })
            .collect(),
        domain_xml: None,
    }
}

/// A connected harness on the lab domain with checkpoints already in QEMU and the tree.
pub fn lab_with_checkpoints(names: &[&str]) -> Harness {
    lab_like(lab_domain(), names)
}

pub fn lab_like(def: DomainDef, names: &[&str]) -> Harness {
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    let mut tree = CheckpointTree::new();
    for n in names {
        tree.insert_created(checkpoint(n, &["vda", "vdb"])).unwrap();
        for d in &def.disks {
            for l in &d.layers {
                peer.add_bitmap(l.node_name.as_deref().unwrap(), n, 1 << 20);
            }
        }
    }
    let mut h = Harness::new(def, peer, tree);
    h.connect();
    h
}

pub fn command_id(n: u64) -> CommandId {
    CommandId::Number(n)
}
