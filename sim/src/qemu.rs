//! The simulated QEMU process: the QMP entry point, the event queue and virtual time.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::args::Args;
use crate::errors::QmpError;
use crate::image::FileSystem;
use crate::job::Job;
use crate::nbd::{Export, NbdServer};
use crate::node::{Node, object};

/// Which QEMU binary is simulated; they differ in `query-block` and in `quit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `qemu-system-x86_64`: devices exist, `quit` emits `SHUTDOWN`.
    System,
    /// `qemu-storage-daemon`: no devices, `query-block` is empty, no `SHUTDOWN`.
    StorageDaemon,
}

/// Tunables of the simulation.
#[derive(Debug, Clone)]
pub struct Config {
    /// Copy rate of backup jobs in bytes per second of virtual time (a job's `speed` can only
    /// lower it).
    pub throughput_bytes_per_s: u64,
    /// Virtual duration of a `blockdev-create` job.
    pub create_duration_ms: u64,
    /// The simulated binary.
    pub flavor: Flavor,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            throughput_bytes_per_s: 512 << 20,
            create_duration_ms: 1,
            flavor: Flavor::System,
        }
    }
}

/// An injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Backup jobs fail with EIO when they write to this node (the target).
    TargetIoError {
        /// Target node name.
        node: String,
    },
    /// Backup jobs fail with ENOSPC when they write to this node (the target).
    TargetNoSpace {
        /// Target node name.
        node: String,
    },
    /// Backup jobs fail with EIO when they read from this node (the source).
    SourceIoError {
        /// Source node name.
        node: String,
    },
    /// The next command of this name is refused with this error (one shot).
    RefuseCommand {
        /// QMP command name.
        command: String,
        /// The error to answer.
        error: QmpError,
    },
}

/// A guest device (qemu-system only): what `query-block` lists and guest writes go through.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub id: String,
    pub qdev: String,
    pub node: String,
    /// The BlockBackend name `query-block` shows as `device`: the drive id of a legacy
    /// `-drive` disk (`virtio0` without one), empty for a `-device ...,drive=NODE` disk.
    pub backend: String,
}

/// One layer of a legacy `-drive` disk for [`Qemu::add_drive`]: the names QEMU generated for
/// its nodes and its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveLayer {
    /// The format (qcow2) node, `#blockNNN`.
    pub format_node: String,
    /// The protocol (file) node below it.
    pub storage_node: String,
    /// The image path.
    pub path: String,
}

/// Everything a QEMU process holds in memory; lost by a crash.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub nodes: BTreeMap<String, Node>,
    pub next_node_seq: u64,
    pub next_anon_node: u64,
    pub next_bitmap_uid: u64,
    pub jobs: BTreeMap<String, Job>,
    pub next_job_seq: u64,
    pub next_txn: u64,
    pub devices: Vec<Device>,
    pub nbd: Option<NbdServer>,
    pub exports: BTreeMap<String, Export>,
    pub next_export_seq: u64,
    /// QOM objects added by `object-add` (secrets, TLS credentials): id → type.
    pub objects: BTreeMap<String, String>,
    /// qcow2 images a backup job writes into, as they were before it (`None`: no file then).
    /// A qcow2 image's new clusters reach its metadata only when the node closes cleanly, so
    /// a crash brings such an image back to this state.
    pub unflushed_images: BTreeMap<String, Option<crate::image::FileContent>>,
}

impl State {
    pub(crate) fn anon_node_name(&mut self) -> String {
        // Real QEMU numbers implicit nodes in the thousands; the exact number is meaningless,
        // but it must not be a name a `-drive` disk already has (`Qemu::add_drive`).
        loop {
            self.next_anon_node += 1;
            let name = format!("#block{}", 100 + self.next_anon_node);
            if !self.nodes.contains_key(&name) {
                return name;
            }
        }
    }

    pub(crate) fn bitmap_uid(&mut self) -> u64 {
        self.next_bitmap_uid += 1;
        self.next_bitmap_uid
    }
}

/// A simulated QEMU process over an in-memory file system.
///
/// Every entry point takes the virtual time `now_ms`; jobs first progress up to it, so events a
/// job produces in between are queued before the command's own. Time never goes backwards: an
/// earlier `now_ms` is treated as the current time.
#[derive(Debug)]
pub struct Qemu {
    pub(crate) fs: FileSystem,
    pub(crate) st: State,
    pub(crate) running: bool,
    pub(crate) negotiated: bool,
    pub(crate) events: Vec<Value>,
    pub(crate) config: Config,
    pub(crate) faults: Vec<Fault>,
    pub(crate) now_ms: u64,
    /// Set while [`Qemu::add_drive`] opens nodes under QEMU's generated names.
    pub(crate) opening_drive: bool,
}

impl Qemu {
    /// A running process (not yet negotiated) over `fs`.
    pub fn new(fs: FileSystem, config: Config) -> Self {
        Self {
            fs,
            st: State::default(),
            running: true,
            negotiated: false,
            events: Vec::new(),
            config,
            faults: Vec::new(),
            now_ms: 0,
            opening_drive: false,
        }
    }

    /// A running process that has already done `qmp_capabilities`.
    pub fn negotiated(fs: FileSystem, config: Config) -> Self {
        let mut q = Self::new(fs, config);
        q.negotiated = true;
        q
    }

    /// The QMP greeting QEMU 10.0.2 sends on connect.
    pub fn greeting() -> Value {
        json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}})
    }

    /// The files (shared by every process lifetime).
    pub fn fs(&self) -> &FileSystem {
        &self.fs
    }

    /// Mutable access to the files, for offline tools between runs.
    pub fn fs_mut(&mut self) -> &mut FileSystem {
        &mut self.fs
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// True while the process runs (not after `quit` or [`Qemu::crash`]).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The current virtual time.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Adds a fault.
    pub fn set_fault(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Takes the queued events, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Moves virtual time to `now_ms`, letting jobs progress and emit their events.
    pub fn advance(&mut self, now_ms: u64) {
        if self.running {
            self.run_jobs_until(now_ms);
        }
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// The virtual time of the next thing a job will do by itself, if any.
    pub fn next_event_ms(&self) -> Option<u64> {
        if !self.running {
            return None;
        }
        self.next_milestone().map(|(t, _)| t)
    }

    /// Kills the process without a clean close: in-memory state is lost, persistent bitmaps
    /// created since the image was opened never reach it, and loaded ones stay `in-use`.
    pub fn crash(&mut self) {
        self.lose_unflushed_images();
        self.st = State::default();
        self.running = false;
        self.negotiated = false;
    }

    /// Starts a fresh process over the same files. Nodes must be added again, and
    /// `qmp_capabilities` sent. A process still running is killed first, as [`Qemu::crash`]
    /// does (nothing is stored).
    pub fn restart(&mut self) {
        self.lose_unflushed_images();
        self.st = State::default();
        self.running = true;
        self.negotiated = false;
    }

    /// The process dies: images a backup job wrote into lose what was not written out by a
    /// clean close.
    fn lose_unflushed_images(&mut self) {
        for (path, before) in std::mem::take(&mut self.st.unflushed_images) {
            if let Some(content) = before {
                self.fs.put(&path, content);
            }
        }
    }

    /// A new client connects to the monitor of the running process: it greets again and
    /// capabilities must be negotiated again; everything else stays.
    pub fn new_monitor_connection(&mut self) {
        self.negotiated = false;
    }

    /// Attaches a guest device (`-device virtio-blk-pci,drive=NODE,id=ID`); its qdev path is
    /// `/machine/peripheral/ID/virtio-backend`.
    pub fn add_device(&mut self, id: &str, node: &str) -> Result<(), QmpError> {
        if !self.st.nodes.contains_key(node) {
            return Err(QmpError::generic(format!(
                "Property 'virtio-blk-device.drive' can't find value '{node}'"
            )));
        }
        if self.st.devices.iter().any(|d| d.id == id) {
            return Err(QmpError::generic(format!("Duplicate device ID '{id}'")));
        }
        self.st.devices.push(Device {
            id: id.to_string(),
            qdev: format!("/machine/peripheral/{id}/virtio-backend"),
            node: node.to_string(),
            backend: String::new(),
        });
        Ok(())
    }

    /// Attaches a legacy `-drive file=TOP,if=virtio,format=qcow2[,id=ID]` disk as QEMU opens
    /// it: per layer (top first) a qcow2 node over a file node, with the names QEMU generated
    /// (`#blockNNN`, which QMP's `blockdev-add` would refuse), backing layers read-only; the
    /// BlockBackend is named `backend` (the drive id, or `virtioN`) and the device's qdev path
    /// is `qdev` (`/machine/peripheral-anon/device[N]/virtio-backend` without a device id).
    pub fn add_drive(
        &mut self,
        backend: &str,
        qdev: &str,
        layers: &[DriveLayer],
    ) -> Result<(), QmpError> {
        let Some(top) = layers.first() else {
            return Err(QmpError::generic("a drive needs an image"));
        };
        let was = self.negotiated;
        self.negotiated = true;
        self.opening_drive = true;
        let now = self.now_ms;
        let mut result = Ok(());
        for (i, layer) in layers.iter().enumerate().rev() {
            let read_only = i > 0;
            let backing = layers.get(i + 1).map(|l| l.format_node.clone());
            for args in [
                json!({"driver": "file", "node-name": layer.storage_node,
                    "filename": layer.path, "read-only": read_only}),
                json!({"driver": "qcow2", "node-name": layer.format_node,
                    "file": layer.storage_node, "backing": backing, "read-only": read_only}),
            ] {
                if result.is_ok() {
                    result = self
                        .execute(now, &json!({"execute": "blockdev-add", "arguments": args}))
                        .map(|_| ());
                }
            }
        }
        self.opening_drive = false;
        self.negotiated = was;
        result?;
        self.st.devices.push(Device {
            id: String::new(),
            qdev: qdev.to_string(),
            node: top.format_node.clone(),
            backend: backend.to_string(),
        });
        Ok(())
    }

    /// The format nodes under the device or drive `id`, top first (what attached-domain
    /// discovery walks: the device's node, then each node's backing).
    pub fn device_chain(&self, id: &str) -> Vec<String> {
        let mut chain = Vec::new();
        let mut next = self
            .st
            .devices
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.node.clone());
        while let Some(name) = next {
            if chain.len() > 64 {
                break;
            }
            next = self.st.nodes.get(&name).and_then(|n| n.backing.clone());
            chain.push(name);
        }
        chain
    }

    /// Attaches a disk the legacy way (`-drive file=PATH,if=virtio[,id=ID]`): QEMU opens the
    /// image and the backing chain its header names under node names of its own choosing
    /// (`#blockNNN`), names the BlockBackend after the drive id (`virtio0`, `virtio1`... when
    /// none is given) and puts an anonymous virtio device on it. Returns the drive id.
    pub fn attach_drive(&mut self, path: &str, id: Option<&str>) -> Result<String, QmpError> {
        let index = self.st.devices.len();
        let id = id.map_or_else(
            || {
                let n = self
                    .st
                    .devices
                    .iter()
                    .filter(|d| d.backend.starts_with("virtio"))
                    .count();
                format!("virtio{n}")
            },
            str::to_string,
        );
        if self.st.devices.iter().any(|d| d.id == id) {
            return Err(QmpError::generic(format!("Duplicate ID '{id}' for drive")));
        }
        let node = self.open_drive(path)?;
        self.st.devices.push(Device {
            id: id.clone(),
            qdev: format!("/machine/peripheral-anon/device[{index}]/virtio-backend"),
            node,
            backend: id.clone(),
        });
        Ok(id)
    }

    pub(crate) fn emit(&mut self, event: &str, data: Value) {
        // Members in key order (see `object`).
        let timestamp = object([
            ("microseconds", ((self.now_ms % 1000) * 1000).into()),
            ("seconds", (self.now_ms / 1000).into()),
        ]);
        self.events.push(Value::Object(object([
            ("data", data),
            ("event", event.into()),
            ("timestamp", Value::Object(timestamp)),
        ])));
    }

    /// Executes one command in wire form, `{"execute": NAME, "arguments": {...}}`, at `now_ms`,
    /// and answers what QEMU would put in `return` or `error`.
    pub fn execute(&mut self, now_ms: u64, cmd: &Value) -> Result<Value, QmpError> {
        if !self.running {
            return Err(QmpError::not_running());
        }
        self.advance(now_ms);
        let name = match cmd.get("execute").and_then(Value::as_str) {
            Some(n) => n,
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        if let Some(pos) = self
            .faults
            .iter()
            .position(|f| matches!(f, Fault::RefuseCommand { command, .. } if command == name))
            && let Fault::RefuseCommand { error, .. } = self.faults.remove(pos)
        {
            return Err(error);
        }
        if name == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError::negotiation_done());
            }
            self.negotiated = true;
            return Ok(json!({}));
        }
        if !self.negotiated {
            return Err(QmpError::negotiation_expected());
        }
        let args = Args::new(cmd.get("arguments"), "")?;
        self.dispatch(name, &args)
    }

    fn dispatch(&mut self, name: &str, a: &Args<'_>) -> Result<Value, QmpError> {
        match name {
            "query-named-block-nodes" => self.cmd_query_named_block_nodes(a),
            "query-block" => self.cmd_query_block(a),
            "query-jobs" => self.cmd_query_jobs(a),
            "query-block-jobs" => self.cmd_query_block_jobs(a),
            "query-block-exports" => self.cmd_query_block_exports(a),
            "blockdev-add" => self.cmd_blockdev_add(a),
            "blockdev-del" => self.cmd_blockdev_del(a),
            "blockdev-reopen" => self.cmd_blockdev_reopen(a),
            "blockdev-create" => self.cmd_blockdev_create(a),
            "block-dirty-bitmap-add" => self.cmd_bitmap_add(a).map(|_| json!({})),
            "block-dirty-bitmap-remove" => self.cmd_bitmap_remove(a).map(|_| json!({})),
            "block-dirty-bitmap-clear" => self.cmd_bitmap_clear(a).map(|_| json!({})),
            "block-dirty-bitmap-enable" => self.cmd_bitmap_enable(a, true).map(|_| json!({})),
            "block-dirty-bitmap-disable" => self.cmd_bitmap_enable(a, false).map(|_| json!({})),
            "block-dirty-bitmap-merge" => self.cmd_bitmap_merge(a).map(|_| json!({})),
            "blockdev-backup" => self.cmd_blockdev_backup(a),
            "transaction" => self.cmd_transaction(a),
            "job-dismiss" => self.cmd_job_verb(a, "id", crate::job::Verb::Dismiss, false),
            "job-finalize" => self.cmd_job_verb(a, "id", crate::job::Verb::Finalize, false),
            "job-cancel" => self.cmd_job_verb(a, "id", crate::job::Verb::Cancel, false),
            "job-pause" => self.cmd_job_verb(a, "id", crate::job::Verb::Pause, false),
            "job-resume" => self.cmd_job_verb(a, "id", crate::job::Verb::Resume, false),
            "job-complete" => self.cmd_job_verb(a, "id", crate::job::Verb::Complete, false),
            "block-job-cancel" => self.cmd_job_verb(a, "device", crate::job::Verb::Cancel, true),
            "block-job-dismiss" => self.cmd_job_verb(a, "id", crate::job::Verb::Dismiss, true),
            "block-job-finalize" => self.cmd_job_verb(a, "id", crate::job::Verb::Finalize, true),
            "block-job-pause" => self.cmd_job_verb(a, "device", crate::job::Verb::Pause, true),
            "block-job-resume" => self.cmd_job_verb(a, "device", crate::job::Verb::Resume, true),
            "block-job-complete" => {
                self.cmd_job_verb(a, "device", crate::job::Verb::Complete, true)
            }
            "block-job-set-speed" => self.cmd_job_set_speed(a),
            "nbd-server-start" => self.cmd_nbd_server_start(a),
            "nbd-server-stop" => self.cmd_nbd_server_stop(a),
            "block-export-add" => self.cmd_block_export_add(a),
            "block-export-del" => self.cmd_block_export_del(a),
            "device_add" => self.cmd_device_add(a),
            "object-add" => self.cmd_object_add(a),
            "object-del" => self.cmd_object_del(a),
            "human-monitor-command" => self.cmd_hmp(a),
            "quit" => self.cmd_quit(a),
            "query-version" => Ok(json!({"qemu": {"micro": 2, "minor": 0, "major": 10},
                "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"})),
            "query-status" => Ok(json!({"status": "running", "running": true})),
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    fn cmd_object_add(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        let ty = a.str("qom-type")?;
        let id = a.str("id")?;
        if !matches!(
            ty,
            "secret" | "tls-creds-x509" | "tls-creds-psk" | "tls-creds-anon" | "authz-simple"
        ) {
            return Err(QmpError::generic(format!("invalid object type: {ty}")));
        }
        if self.st.objects.contains_key(id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        self.st.objects.insert(id.to_string(), ty.to_string());
        Ok(json!({}))
    }

    fn cmd_object_del(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["id"])?;
        let id = a.str("id")?;
        if !self.st.objects.contains_key(id) {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        }
        if self
            .st
            .nbd
            .as_ref()
            .is_some_and(|s| s.tls_creds.as_deref() == Some(id))
        {
            return Err(QmpError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.st.objects.remove(id);
        Ok(json!({}))
    }

    fn cmd_device_add(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        let drive = a.str("drive")?;
        let id = a.str("id")?;
        a.str("driver")?;
        self.add_device(id, drive)?;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_never_goes_backwards_and_events_carry_it() {
        let mut q = Qemu::negotiated(FileSystem::new(), Config::default());
        q.advance(1500);
        q.advance(10);
        assert_eq!(q.now_ms(), 1500);
        q.emit("X", json!({}));
        assert_eq!(
            q.take_events()[0]["timestamp"],
            json!({"seconds": 1, "microseconds": 500000})
        );
        assert!(q.take_events().is_empty());
        assert_eq!(q.next_event_ms(), None);
    }

    #[test]
    fn a_command_without_execute_is_refused() {
        let mut q = Qemu::negotiated(FileSystem::new(), Config::default());
        assert_eq!(
            q.execute(0, &json!({"arguments": {}})).unwrap_err().desc,
            "QMP input lacks member 'execute'"
        );
        assert_eq!(Qemu::greeting()["QMP"]["version"]["qemu"]["major"], 10);
    }

    #[test]
    fn query_block_is_empty_under_the_storage_daemon() {
        let mut q = Qemu::negotiated(
            FileSystem::new(),
            Config {
                flavor: Flavor::StorageDaemon,
                ..Config::default()
            },
        );
        assert_eq!(
            q.execute(0, &json!({"execute": "query-block"})).unwrap(),
            json!([])
        );
    }
}
