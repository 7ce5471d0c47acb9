//! Persist the engine's store operations in your own storage and restart from it.
//!
//! The restart contract: every `Output::Persist(StoreOp)` is carried out durably, in order,
//! before the next command goes to QEMU; after a restart, `Domain::from_stored` rebuilds the
//! engine from what the store holds ([`StoredState`]). Here the storage is one JSON file,
//! rewritten atomically (temporary file, fsync, rename) after each operation.
//!
//! Against a qemu-storage-daemon in a temporary directory: create checkpoint `c1` with a full
//! push backup, drop the engine, rebuild it from the file, show `c1` survived, write new data
//! as a guest would (through the daemon's writable NBD export), run an incremental backup from
//! `c1`, and check full + incremental against the disk with `qemu-img compare`.
//!
//! ```text
//! cargo run --release -p vbackup-core --example own_store
//! ```
// An example does IO and reads the clock; the core's rules are for the library.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[path = "custom_link.rs"]
#[allow(dead_code)]
mod custom_link;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use vbackup_core::{
    BackupDiskSpec, BackupMode, BackupPlan, BackupSpec, BackupStore, Checkpoint, CheckpointDef,
    CheckpointMode, DomainConfig, DomainDef, DomainEvent, Driver, Effects, FileError, FileOp,
    ImageFormat, Reply, Request, StoreKind, StoreOp, StoredState, align_checkpoint,
};

use custom_link::{Daemon, HostEffects, UnixLink, domain_def, path, run};

/// The embedder's store: a JSON file holding the folded state.
struct JsonStore {
    file: PathBuf,
    state: StoredState,
    files: HostEffects,
}

impl JsonStore {
    fn open(file: PathBuf) -> Self {
        let state = match fs::read_to_string(&file) {
            Ok(text) => from_json(&serde_json::from_str(&text).expect("store JSON")),
            Err(_) => StoredState::default(),
        };
        Self {
            file,
            state,
            files: HostEffects::default(),
        }
    }

    fn write(&self) -> std::io::Result<()> {
        let tmp = self.file.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(to_json(&self.state).to_string().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.file)?;
        fs::File::open(self.file.parent().expect("a directory"))?.sync_all()
    }
}

fn to_json(s: &StoredState) -> Value {
    json!({
        "checkpoints": s.checkpoints.values().collect::<Vec<_>>(),
        "current": s.current_checkpoint,
        "journal": s.backup_journal,
        "pending": s.pending_checkpoints,
    })
}

fn from_json(v: &Value) -> StoredState {
    let checkpoints: Vec<Checkpoint> =
        serde_json::from_value(v["checkpoints"].clone()).expect("checkpoints");
    StoredState {
        checkpoints: checkpoints
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect(),
        current_checkpoint: serde_json::from_value(v["current"].clone()).expect("current"),
        backup_journal: serde_json::from_value::<Option<BackupPlan>>(v["journal"].clone())
            .expect("journal"),
        pending_checkpoints: serde_json::from_value(v["pending"].clone()).expect("pending"),
    }
}

impl Effects for JsonStore {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        // The one fold of store operations; the file holds its result.
        self.state.apply(op);
        self.write().map_err(|e| e.to_string())
    }

    fn file(&mut self, op: &FileOp) -> Result<(), FileError> {
        self.files.file(op)
    }

    fn event(&mut self, event: &DomainEvent) {
        println!("event: {event:?}");
    }
}

/// A running engine over the daemon's QMP socket, restarted from the store file.
fn start_engine(def: &DomainDef, daemon: &Daemon, store: &Path) -> Driver<UnixLink, JsonStore> {
    let store = JsonStore::open(store.to_owned());
    let domain = vbackup_core::Domain::from_stored(
        def.clone(),
        DomainConfig::default(),
        store.state.clone(),
    );
    let link = UnixLink::connect(&daemon.socket).expect("the QMP socket");
    let mut driver = Driver::new(domain, link, store);
    driver
        .run_until(|d| d.view().connected, 100)
        .expect("QMP session");
    driver
}

fn backup(driver: &mut Driver<UnixLink, JsonStore>, target: &Path, incremental: Option<&str>) {
    let spec = BackupSpec {
        mode: BackupMode::Push,
        incremental: incremental.map(str::to_owned),
        server: None,
        disks: vec![BackupDiskSpec {
            target: "vda".into(),
            backup: true,
            incremental: incremental.map(str::to_owned),
            store: Some(BackupStore {
                kind: StoreKind::File,
                path: Some(path(target).to_owned()),
                format: Some(ImageFormat::Qcow2),
            }),
            export_name: None,
            export_bitmap: None,
        }],
    };
    let answer = driver
        .call(
            Request::BackupBegin {
                spec,
                checkpoint: None,
                reuse_external: false,
            },
            200,
        )
        .expect("driver");
    assert_eq!(answer, Ok(Reply::Done), "backup-begin");
    let ended = driver
        .run_until(|d| d.view().backup.is_none(), 1000)
        .expect("driver");
    assert!(ended, "the backup did not end");
    let stats = driver
        .domain()
        .view()
        .completed
        .cloned()
        .expect("statistics");
    assert_eq!(stats.success, Some(true), "{stats:?}");
}

fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("vda.qcow2");
    let full = dir.path().join("vda.full.qcow2");
    let inc = dir.path().join("vda.inc.qcow2");
    let store = dir.path().join("store.json");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path(&image), "64M"],
    );
    run("qemu-io", &["-c", "write -P 0x11 0 8M", path(&image)]);
    let daemon = Daemon::start(dir.path(), &image);
    let def = domain_def(&image);

    // First life: a checkpoint and a full backup.
    let mut driver = start_engine(&def, &daemon, &store);
    let cp = CheckpointDef::parse(
        "<domaincheckpoint><name>c1</name></domaincheckpoint>",
        CheckpointMode::Create,
    )
    .expect("checkpoint XML");
    let checkpoint =
        Checkpoint::from_def(&align_checkpoint(&cp, &def).expect("aligned")).expect("checkpoint");
    let answer = driver
        .call(
            Request::CheckpointCreate {
                checkpoint,
                quiesce: false,
            },
            100,
        )
        .expect("driver");
    assert!(matches!(answer, Ok(Reply::Checkpoint(_))), "{answer:?}");
    backup(&mut driver, &full, None);
    // The engine goes away; only the store file remains.
    drop(driver);
    println!(
        "store after the first life: {}",
        fs::read_to_string(&store).expect("store")
    );

    // Second life: rebuilt from the file alone.
    let mut driver = start_engine(&def, &daemon, &store);
    let view = driver.domain().view();
    assert!(
        view.checkpoints.get("c1").is_some(),
        "c1 survived the restart"
    );
    assert!(view.invalid_checkpoints.is_empty(), "c1's bitmap is intact");
    println!("after the restart: checkpoint c1 is known and valid");

    // A guest writes through the daemon's export.
    let nbd = format!(
        "nbd+unix:///vda?socket={}",
        dir.path().join("nbd.sock").display()
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 2M 1M",
            "-c",
            "write -P 0x33 40M 64k",
            &nbd,
        ],
    );
    backup(&mut driver, &inc, Some("c1"));
    drop(driver);
    drop(daemon);

    // The incremental image holds what changed since c1; on top of the full one it is the disk.
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            path(&full),
            "-F",
            "qcow2",
            path(&inc),
        ],
    );
    run("qemu-img", &["compare", "-q", path(&image), path(&inc)]);
    println!("qemu-img compare: full + incremental equals the disk");
}
