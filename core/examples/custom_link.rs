//! Drive the engine over your own QMP transport.
//!
//! The embedder owns QEMU and its QMP socket; the engine only says what to send. This example
//! implements [`Link`] over a plain `std::os::unix::net::UnixStream` (line-framed JSON, the
//! engine's own encoder and decoder), starts a qemu-storage-daemon with one qcow2 disk in a
//! temporary directory, creates a checkpoint, runs a push full backup into a new qcow2 image,
//! checks the copy with `qemu-img compare`, and stops the daemon by its pid.
//!
//! ```text
//! cargo run --release -p vbackup-core --example custom_link
//! ```
//!
//! It fails loudly when `qemu-storage-daemon` or `qemu-img` is missing.
// An example does IO and reads the clock; the core's rules are for the library.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vbackup_core::{
    BackupDiskSpec, BackupMode, BackupSpec, BackupStore, Checkpoint, CheckpointDef, CheckpointMode,
    CommandId, DiskDef, DiskDevice, Domain, DomainConfig, DomainDef, DomainEvent, Driver, Effects,
    FileError, FileErrorKind, FileOp, ImageFormat, Layer, Link, LinkError, QmpCommand, QmpIn,
    Reply, Request, StorageType, StoreKind, StoreOp, StoredState, Timestamp, align_checkpoint,
};

/// QMP over a unix socket: one JSON object per line each way.
pub(crate) struct UnixLink {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line whose end has not arrived yet (a read may time out mid-line).
    partial: String,
    started: Instant,
}

impl UnixLink {
    pub(crate) fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            partial: String::new(),
            started: Instant::now(),
        })
    }
}

impl Link for UnixLink {
    fn now(&self) -> Timestamp {
        Timestamp::from_ms(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        let line = cmd.encode(Some(&id));
        writeln!(self.writer, "{line}").map_err(|e| LinkError::Io(e.to_string()))
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        loop {
            let timeout = match deadline {
                Some(d) => match d.as_ms().checked_sub(self.now().as_ms()) {
                    Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                    _ => return Ok(None),
                },
                None => None,
            };
            self.reader
                .get_ref()
                .set_read_timeout(timeout)
                .map_err(|e| LinkError::Io(e.to_string()))?;
            match self.reader.read_line(&mut self.partial) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = std::mem::take(&mut self.partial);
                    if line.trim().is_empty() {
                        continue;
                    }
                    return QmpIn::decode(line.as_bytes())
                        .map(Some)
                        .map_err(LinkError::from);
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) => return Err(LinkError::Io(e.to_string())),
            }
        }
    }
}

/// Store operations folded in memory (the `own_store` example keeps them in a file that
/// survives a restart); image files on the local host.
#[derive(Default)]
pub(crate) struct HostEffects {
    pub(crate) store: StoredState,
}

impl Effects for HostEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        self.store.apply(op);
        Ok(())
    }

    fn file(&mut self, op: &FileOp) -> Result<(), FileError> {
        let io = |path: &str, e: std::io::Error| {
            FileError::new(
                FileErrorKind::from_io(e.kind()),
                path,
                format!("'{path}': {e}"),
            )
        };
        match op {
            FileOp::CreateExclusive { path } => fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(drop)
                .map_err(|e| io(path, e)),
            FileOp::Remove { path } => match fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io(path, e)),
                _ => Ok(()),
            },
            FileOp::Sync { path } => fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(path, e)),
        }
    }

    fn event(&mut self, event: &DomainEvent) {
        println!("event: {event:?}");
    }
}

/// A qemu-storage-daemon serving one qcow2 image as node `vda-format`; stopped on drop.
pub(crate) struct Daemon {
    child: Child,
    pub(crate) socket: PathBuf,
}

impl Daemon {
    pub(crate) fn start(dir: &Path, image: &Path) -> Daemon {
        let socket = dir.join("qmp.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                socket.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=vda-storage,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=vda-format,file=vda-storage")
            // A writable export stands in for the guest: writes go through the daemon.
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=unix,addr.path={}",
                dir.join("nbd.sock").display()
            ))
            .arg("--export")
            .arg("type=nbd,id=guest,node-name=vda-format,name=vda,writable=on")
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon must be installed to run this example");
        let daemon = Daemon { child, socket };
        let until = Instant::now() + Duration::from_secs(10);
        while !daemon.socket.exists() {
            assert!(Instant::now() < until, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Stopped by its pid: this process started it.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

pub(crate) fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program} must be installed to run this example: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

/// The domain as the engine sees it: one disk `vda` whose only layer is node `vda-format`.
pub(crate) fn domain_def(image: &Path) -> DomainDef {
    DomainDef {
        name: "example".into(),
        uuid: None,
        disks: vec![DiskDef {
            target: "vda".into(),
            device: DiskDevice::Disk,
            bus: Some("virtio".into()),
            readonly: false,
            transient: false,
            layers: vec![Layer {
                storage: StorageType::File,
                format: ImageFormat::Qcow2,
                path: Some(image.display().to_string()),
                index: None,
                node_name: Some("vda-format".into()),
            }],
        }],
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("vda.qcow2");
    let target = dir.path().join("vda.full.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path(&image), "64M"],
    );
    // Some data for the backup to copy.
    run("qemu-io", &["-c", "write -P 0x5a 1M 4M", path(&image)]);

    let daemon = Daemon::start(dir.path(), &image);
    let def = domain_def(&image);
    let link = UnixLink::connect(&daemon.socket).expect("the QMP socket");
    let domain = Domain::from_stored(def.clone(), DomainConfig::default(), StoredState::default());
    let mut driver = Driver::new(domain, link, HostEffects::default());
    // The greeting arrives first and tells the engine a session is open: it negotiates and
    // reconciles by itself.
    driver
        .run_until(|d| d.view().connected, 100)
        .expect("QMP session");

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
    println!("checkpoint-create: {answer:?}");
    assert!(matches!(answer, Ok(Reply::Checkpoint(_))), "{answer:?}");

    let spec = BackupSpec {
        mode: BackupMode::Push,
        incremental: None,
        server: None,
        disks: vec![BackupDiskSpec {
            target: "vda".into(),
            backup: true,
            incremental: None,
            store: Some(BackupStore {
                kind: StoreKind::File,
                path: Some(path(&target).to_owned()),
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
    println!("backup-begin: {answer:?}");
    assert_eq!(answer, Ok(Reply::Done));
    // The backup ends by itself; the engine's view shows no backup once it concluded.
    let ended = driver
        .run_until(|d| d.view().backup.is_none(), 1000)
        .expect("driver");
    assert!(ended, "the backup did not end");
    let stats = driver.domain().view().completed.cloned();
    println!("completed: {stats:?}");
    assert!(
        driver.effects().store.checkpoints.contains_key("c1"),
        "the checkpoint was persisted"
    );
    drop(driver);
    drop(daemon);

    run("qemu-img", &["compare", "-q", path(&image), path(&target)]);
    println!("qemu-img compare: the backup equals the disk");
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}
