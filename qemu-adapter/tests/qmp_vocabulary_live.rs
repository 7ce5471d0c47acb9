//! The QMP vocabulary against a real qemu-storage-daemon: every command is accepted with the
//! arguments as the core types them, and every reply and event QEMU sends back decodes into the
//! typed messages (events never fall back to `Unknown`). Each test starts its own daemon in a
//! [`LiveLab`], which stops it by its pid whatever happens; fails without QEMU's tools.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vbackup_core::link::CommandId;
use vbackup_core::qmp::*;
use vbackup_qemu::live::{self, LiveLab};
use vbackup_qemu::qmp_socket::QmpSocket;
use vbackup_qemu::qsd::{QsdOptions, RunDir};

const MIB: u64 = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(20);

macro_rules! require_daemon {
    () => {
        if !live::tools_available() {
            // A live test fails, never skips, where what it needs is missing.
            panic!("QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon): install qemu-utils 10");
        }
    };
}

/// A qemu-storage-daemon of this test, spoken to through the typed vocabulary only.
struct Daemon {
    qmp: QmpSocket,
    /// Events received and not yet consumed by a wait.
    queued: Vec<QmpEvent>,
    /// Every event received, for the final check that all were typed.
    seen: Vec<QmpEvent>,
    greeting: Greeting,
    next_id: u64,
    // Last: stops the daemon by its pid and removes the directory.
    lab: LiveLab,
}

impl Daemon {
    /// A daemon without disks, and a fresh QMP session that has not negotiated yet.
    fn start() -> Daemon {
        let mut lab = LiveLab::new().unwrap();
        let options = QsdOptions {
            guest_exports: false,
            ..QsdOptions::default()
        };
        // The launcher negotiates on its own connection; the monitor serves one client, so
        // that connection closes before the test's opens.
        drop(lab.start_qsd_with("run", &[], &options).unwrap());
        let socket = RunDir::new(lab.file("run")).qmp_socket;
        let qmp = QmpSocket::connect_unnegotiated(&socket, Instant::now() + TIMEOUT).unwrap();
        let greeting = qmp.greeting().clone();
        Daemon {
            qmp,
            queued: Vec::new(),
            seen: Vec::new(),
            greeting,
            next_id: 0,
            lab,
        }
    }

    fn path(&self, file: &str) -> String {
        self.lab.file(file).display().to_string()
    }

    fn read_message(&mut self) -> QmpIn {
        let message = self
            .qmp
            .recv(Some(Instant::now() + TIMEOUT))
            .unwrap_or_else(|e| panic!("undecodable or lost message: {e}"))
            .expect("a message from the daemon");
        if let QmpIn::Event(event) = &message {
            self.seen.push(event.clone());
        }
        message
    }

    /// Sends `cmd` and returns its reply; events arriving meanwhile are queued.
    fn execute(&mut self, cmd: &QmpCommand) -> QmpResult {
        self.next_id += 1;
        let id = CommandId::Number(self.next_id);
        self.qmp.send_command(&id, cmd).unwrap();
        loop {
            match self.read_message() {
                QmpIn::Reply {
                    id: Some(got),
                    result,
                } if got == id => return result,
                QmpIn::Event(event) => self.queued.push(event),
                other => panic!(
                    "unexpected message while waiting for {}: {other:?}",
                    cmd.name()
                ),
            }
        }
    }

    fn ok(&mut self, cmd: &QmpCommand) -> Value {
        self.execute(cmd)
            .unwrap_or_else(|err| panic!("{} refused: {err}\n{}", cmd.name(), cmd.encode(None)))
    }

    /// Waits for (and consumes) the first event `pick` accepts.
    fn wait_event<T>(&mut self, mut pick: impl FnMut(&QmpEvent) -> Option<T>) -> T {
        loop {
            if let Some(pos) = self.queued.iter().position(|event| pick(event).is_some()) {
                let event = self.queued.remove(pos);
                return pick(&event).unwrap();
            }
            match self.read_message() {
                QmpIn::Event(event) => self.queued.push(event),
                other => panic!("unexpected message while waiting for an event: {other:?}"),
            }
        }
    }

    fn wait_status(&mut self, job: &str, status: JobStatus) {
        self.wait_event(|event| match event {
            QmpEvent::JobStatusChange(change) if change.id == job && change.status == status => {
                Some(())
            }
            _ => None,
        });
    }

    /// Runs a `blockdev-create` job to its end and dismisses it.
    fn create(&mut self, job_id: &str, options: BlockdevCreateOptions) {
        self.ok(&QmpCommand::BlockdevCreate(Box::new(BlockdevCreate {
            job_id: job_id.into(),
            options,
        })));
        self.wait_status(job_id, JobStatus::Concluded);
        let jobs = query_jobs(&self.ok(&QmpCommand::QueryJobs)).unwrap();
        let job = jobs.iter().find(|job| job.id == job_id).unwrap();
        assert_eq!(
            (&job.job_type, &job.status, &job.error),
            (&JobType::Create, &JobStatus::Concluded, &None)
        );
        empty_return("job-dismiss", &self.ok(&QmpCommand::job_dismiss(job_id))).unwrap();
        self.wait_status(job_id, JobStatus::Null);
    }

    /// Creates a qcow2 image through QMP and opens it as `<name>-file` / `<name>`.
    fn add_qcow2(&mut self, name: &str, size: u64, backing: Option<(&str, &str)>) {
        let file = self.path(&format!("{name}.qcow2"));
        self.create(
            &format!("create-{name}-file"),
            BlockdevCreateOptions::File(CreateFileOptions {
                filename: file.clone(),
                size: 0,
                ..Default::default()
            }),
        );
        let storage = format!("{name}-file");
        self.ok(&QmpCommand::BlockdevAdd(Box::new(BlockdevOptions {
            discard: Some(BlockdevDiscard::Unmap),
            auto_read_only: Some(true),
            ..BlockdevOptions::file(&storage, &file)
        })));
        let mut options = CreateQcow2Options {
            cluster_size: Some(65536),
            extended_l2: Some(false),
            version: Some(Qcow2Version::V3),
            ..CreateQcow2Options::new(storage.as_str(), size)
        };
        if let Some((backing_file, _)) = backing {
            options.backing_file = Some(backing_file.into());
            options.backing_fmt = Some("qcow2".into());
        }
        self.create(
            &format!("create-{name}"),
            BlockdevCreateOptions::Qcow2(options),
        );
        let backing = Some(match backing {
            Some((_, node)) => BlockdevRefOrNull::Ref(BlockdevRef::from(node)),
            None => BlockdevRefOrNull::Null,
        });
        self.ok(&QmpCommand::BlockdevAdd(Box::new(BlockdevOptions {
            read_only: Some(false),
            ..BlockdevOptions::qcow2(name, storage.as_str(), backing)
        })));
    }

    fn node(&mut self, name: &str) -> BlockDeviceInfo {
        let nodes =
            query_named_block_nodes(&self.ok(&QmpCommand::query_named_block_nodes())).unwrap();
        nodes
            .into_iter()
            .find(|node| node.node_name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("node {name} missing"))
    }

    fn quit(mut self) {
        empty_return("quit", &self.ok(&QmpCommand::Quit)).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !self.lab.running_pids().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit after quit"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let unknown: Vec<&str> = self
            .seen
            .iter()
            .filter(|event| matches!(event, QmpEvent::Unknown { .. }))
            .map(QmpEvent::name)
            .collect();
        assert!(unknown.is_empty(), "untyped events: {unknown:?}");
    }
}

fn error_of(result: QmpResult) -> QmpError {
    result.expect_err("QEMU should refuse this")
}

#[test]
fn negotiation_is_required_once_and_refused_twice() {
    require_daemon!();
    let mut daemon = Daemon::start();
    assert!(
        daemon.greeting.version.qemu.major >= 7,
        "{:?}",
        daemon.greeting
    );
    assert!(daemon.greeting.offers(&QmpCapability::Oob));
    let early = error_of(daemon.execute(&QmpCommand::QueryJobs));
    assert!(early.is_negotiation_pending(), "{early}");
    empty_return(
        "qmp_capabilities",
        &daemon.ok(&QmpCommand::QmpCapabilities(QmpCapabilities::default())),
    )
    .unwrap();
    let again = error_of(daemon.execute(&QmpCommand::QmpCapabilities(QmpCapabilities::default())));
    assert_eq!(again.class, ErrorClass::CommandNotFound);
    assert!(
        query_jobs(&daemon.ok(&QmpCommand::QueryJobs))
            .unwrap()
            .is_empty()
    );
    daemon.quit();
}

#[test]
fn push_and_pull_vocabulary_is_accepted_and_every_reply_decodes() {
    require_daemon!();
    let mut d = Daemon::start();
    d.ok(&QmpCommand::QmpCapabilities(QmpCapabilities::default()));
    d.add_qcow2("src", 64 * MIB, None);

    // Checkpoint bitmaps, then every bitmap action in one transaction.
    d.ok(&QmpCommand::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
        persistent: Some(true),
        disabled: Some(false),
        granularity: Some(65536),
        ..BlockDirtyBitmapAdd::new("src", "chk1")
    }));
    d.ok(&QmpCommand::Transaction(Transaction::new(vec![
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            persistent: Some(false),
            disabled: Some(true),
            ..BlockDirtyBitmapAdd::new("src", "tmp")
        }),
        TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
            node: "src".into(),
            target: "tmp".into(),
            bitmaps: vec![
                BitmapRef::Name("chk1".into()),
                BlockDirtyBitmap::new("src", "chk1").into(),
            ],
        }),
        TransactionAction::BlockDirtyBitmapEnable(BlockDirtyBitmap::new("src", "tmp")),
        TransactionAction::BlockDirtyBitmapDisable(BlockDirtyBitmap::new("src", "tmp")),
        TransactionAction::BlockDirtyBitmapClear(BlockDirtyBitmap::new("src", "tmp")),
    ])));
    for cmd in [
        QmpCommand::BlockDirtyBitmapEnable(BlockDirtyBitmap::new("src", "tmp")),
        QmpCommand::BlockDirtyBitmapDisable(BlockDirtyBitmap::new("src", "tmp")),
        QmpCommand::BlockDirtyBitmapClear(BlockDirtyBitmap::new("src", "tmp")),
        QmpCommand::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
            node: "src".into(),
            target: "tmp".into(),
            bitmaps: vec![BitmapRef::Name("chk1".into())],
        }),
    ] {
        d.ok(&cmd);
    }
    let src = d.node("src");
    assert_eq!(src.drv, "qcow2");
    assert_eq!(src.image.virtual_size, 64 * MIB);
    assert_eq!(src.image.cluster_size, Some(65536));
    assert_eq!(src.image.qcow2().map(|q| q.compat.as_str()), Some("1.1"));
    let chk1 = src.bitmap("chk1").unwrap();
    assert!(chk1.recording && chk1.persistent && !chk1.busy && !chk1.inconsistent);
    assert_eq!(chk1.granularity, 65536);
    let tmp = src.bitmap("tmp").unwrap();
    assert!(!tmp.recording && !tmp.persistent);
    d.ok(&QmpCommand::bitmap_remove("src", "tmp"));
    let missing = error_of(d.execute(&QmpCommand::bitmap_remove("src", "nope")));
    assert_eq!(
        (missing.class, missing.desc.as_str()),
        (ErrorClass::GenericError, "Dirty bitmap 'nope' not found")
    );

    // Reopen with the complete options, as checkpoint deletion does for backing layers.
    d.ok(&QmpCommand::BlockdevReopen(BlockdevReopen {
        options: vec![BlockdevOptions {
            read_only: Some(false),
            ..BlockdevOptions::qcow2("src", "src-file", None)
        }],
    }));

    // Push: a full backup creating checkpoint chk2 atomically.
    d.add_qcow2("tgt", 64 * MIB, None);
    d.ok(&QmpCommand::Transaction(Transaction::new(vec![
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            persistent: Some(true),
            disabled: Some(false),
            ..BlockDirtyBitmapAdd::new("src", "chk2")
        }),
        TransactionAction::BlockdevBackup(BlockdevBackup {
            auto_finalize: Some(true),
            auto_dismiss: Some(false),
            ..BlockdevBackup::new("bk", "src", "tgt", SyncMode::Full)
        }),
    ])));
    let done = d.wait_event(|event| match event {
        QmpEvent::BlockJobCompleted(done) if done.device == "bk" => Some(done.clone()),
        _ => None,
    });
    assert_eq!(
        (done.job_type, done.len, done.error),
        (JobType::Backup, 64 * MIB, None)
    );
    d.wait_status("bk", JobStatus::Concluded);
    let jobs = query_jobs(&d.ok(&QmpCommand::QueryJobs)).unwrap();
    assert_eq!(jobs[0].current_progress, jobs[0].total_progress);
    d.ok(&QmpCommand::job_dismiss("bk"));
    d.ok(&QmpCommand::blockdev_del("tgt"));
    d.ok(&QmpCommand::blockdev_del("tgt-file"));

    // Pull: scratch backed by the source, fleecing job and frozen bitmap in one transaction.
    let src_path = d.path("src.qcow2");
    d.add_qcow2("scratch", 64 * MIB, Some((&src_path, "src")));
    let nbd_socket = d.path("nbd.sock");
    d.ok(&QmpCommand::NbdServerStart(NbdServerStart::new(
        SocketAddressLegacy::unix(nbd_socket),
    )));
    d.ok(&QmpCommand::Transaction(Transaction::new(vec![
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            persistent: Some(false),
            disabled: Some(true),
            granularity: Some(65536),
            ..BlockDirtyBitmapAdd::new("scratch", "backup-src")
        }),
        TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
            node: "scratch".into(),
            target: "backup-src".into(),
            bitmaps: vec![BlockDirtyBitmap::new("src", "chk1").into()],
        }),
        TransactionAction::BlockdevBackup(BlockdevBackup {
            auto_finalize: Some(true),
            auto_dismiss: Some(false),
            ..BlockdevBackup::new("fleece", "src", "scratch", SyncMode::None)
        }),
    ])));
    d.ok(&QmpCommand::BlockExportAdd(BlockExportAdd {
        writable: Some(false),
        name: Some("vda".into()),
        allocation_depth: Some(true),
        bitmaps: Some(vec![BitmapRef::Name("backup-src".into())]),
        ..BlockExportAdd::nbd("pull", "scratch")
    }));
    let jobs = query_jobs(&d.ok(&QmpCommand::QueryJobs)).unwrap();
    assert_eq!(
        (jobs[0].id.as_str(), &jobs[0].status),
        ("fleece", &JobStatus::Running)
    );
    d.ok(&QmpCommand::BlockJobSetSpeed(BlockJobSetSpeed {
        device: "fleece".into(),
        speed: 0,
    }));
    // While the job runs, QEMU shows anonymous bitmaps (no name) on its nodes: they decode.
    let nodes = query_named_block_nodes(&d.ok(&QmpCommand::query_named_block_nodes())).unwrap();
    assert!(
        nodes
            .iter()
            .flat_map(|node| &node.dirty_bitmaps)
            .any(|bitmap| bitmap.name.is_none()),
        "an anonymous bitmap during the fleecing job"
    );
    let scratch = d.node("scratch");
    assert!(scratch.bitmap("backup-src").is_some_and(|b| !b.recording));
    d.ok(&QmpCommand::block_export_del("pull"));
    d.wait_event(|event| {
        matches!(event, QmpEvent::BlockExportDeleted(gone) if gone.id == "pull").then_some(())
    });
    d.ok(&QmpCommand::block_job_cancel("fleece", true));
    let cancelled = d.wait_event(|event| match event {
        QmpEvent::BlockJobCancelled(cancelled) if cancelled.device == "fleece" => {
            Some(cancelled.clone())
        }
        _ => None,
    });
    assert_eq!(cancelled.len, 64 * MIB);
    d.wait_status("fleece", JobStatus::Concluded);
    let jobs = query_jobs(&d.ok(&QmpCommand::QueryJobs)).unwrap();
    assert_eq!(jobs[0].error.as_deref(), Some("Operation canceled"));
    d.ok(&QmpCommand::job_dismiss("fleece"));
    d.ok(&QmpCommand::NbdServerStop);
    d.ok(&QmpCommand::blockdev_del("scratch"));
    d.ok(&QmpCommand::blockdev_del("scratch-file"));

    // A TCP server on an ephemeral port range, then stopped.
    d.ok(&QmpCommand::NbdServerStart(NbdServerStart::new(
        SocketAddressLegacy::Inet(InetSocketAddress {
            host: "127.0.0.1".into(),
            port: "0".into(),
            ..Default::default()
        }),
    )));
    d.ok(&QmpCommand::NbdServerStop);
    let stopped = error_of(d.execute(&QmpCommand::NbdServerStop));
    assert_eq!(stopped.desc, "NBD server not running");

    // Job control refusals decode too.
    let incremental = BlockdevBackup::new("bad", "src", "src", SyncMode::Incremental);
    let refused = error_of(d.execute(&QmpCommand::BlockdevBackup(Box::new(incremental))));
    assert_eq!(refused.class, ErrorClass::GenericError);
    assert!(d.execute(&QmpCommand::job_cancel("nope")).is_err());
    assert!(d.execute(&QmpCommand::job_finalize("nope")).is_err());

    d.quit();
}

#[test]
fn objects_are_added_and_deleted_with_typed_properties() {
    require_daemon!();
    let mut d = Daemon::start();
    d.ok(&QmpCommand::QmpCapabilities(QmpCapabilities::default()));
    d.ok(&QmpCommand::ObjectAdd(ObjectAdd::Secret(Secret {
        id: "sec0".into(),
        data: Some("c2VjcmV0".into()),
        format: Some(SecretFormat::Base64),
        ..Default::default()
    })));
    d.ok(&QmpCommand::object_del("sec0"));
    // Without certificates QEMU refuses the credentials, but for the missing file, not for the
    // arguments: the property names are right.
    let pki = Path::new(&d.path("pki")).to_path_buf();
    std::fs::create_dir_all(&pki).unwrap();
    let creds = ObjectAdd::TlsCredsX509(TlsCredsX509 {
        id: "tls0".into(),
        dir: Some(pki.display().to_string()),
        endpoint: Some(TlsEndpoint::Server),
        verify_peer: Some(false),
        ..Default::default()
    });
    match d.execute(&QmpCommand::ObjectAdd(creds)) {
        Ok(_) => {
            d.ok(&QmpCommand::object_del("tls0"));
        }
        Err(err) => {
            assert!(!err.desc.contains("unexpected"), "{err}");
            assert!(err.desc.contains(&pki.display().to_string()), "{err}");
        }
    }
    let gone = error_of(d.execute(&QmpCommand::object_del("sec0")));
    assert_eq!(gone.class, ErrorClass::GenericError);
    d.quit();
}
