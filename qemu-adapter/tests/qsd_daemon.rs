//! The qemu-storage-daemon launcher against the real daemon: start, attach, stop, reconnect,
//! crash detection.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::json;
use vbackup_core::model::ImageFormat;
use vbackup_core::qmp::{ErrorClass, QemuVersion, QmpCapability};
use vbackup_qemu::live::{self, LiveLab};
use vbackup_qemu::qmp_socket::{QmpSocket, QmpSocketError};
use vbackup_qemu::qsd::{Qsd, QsdDisk, QsdError, QsdLayer, daemon_alive, format_node};

const MIB: u64 = 1024 * 1024;

macro_rules! require_qemu {
    () => {
        if !live::tools_available() {
            // A live test fails, never skips, where what it needs is missing.
            panic!("QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon): install qemu-utils 10");
        }
    };
}

fn one_disk(lab: &LiveLab) -> QsdDisk {
    let path = lab
        .image("vda.qcow2", ImageFormat::Qcow2, 16 * MIB)
        .unwrap();
    QsdDisk::single("vda", path, ImageFormat::Qcow2)
}

#[test]
fn started_daemon_attaches_disks_and_quit_ends_it() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let vda = one_disk(&lab);
    let raw = lab.image("vdb.raw", ImageFormat::Raw, 4 * MIB).unwrap();
    let vdb = QsdDisk::single("vdb", raw, ImageFormat::Raw);
    let mut qsd = lab.start_qsd("run", &[vda, vdb]).unwrap();
    let pid = qsd.pid();
    assert!(daemon_alive(pid));
    assert!(
        qsd.qmp().greeting().version.qemu
            >= QemuVersion {
                major: 7,
                minor: 0,
                micro: 0
            }
    );

    let nodes = qsd
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    for expected in [
        "vbk-vda-0-file",
        "vbk-vda-0-format",
        "vbk-vda-guest",
        "vbk-vdb-0-file",
        "vbk-vdb-0-format",
        "vbk-vdb-guest",
    ] {
        assert!(names.contains(&expected), "{expected} missing in {names:?}");
    }
    let exports = qsd.execute("query-block-exports", json!(null)).unwrap();
    assert_eq!(exports.as_array().unwrap().len(), 2);

    let run_dir = qsd.run_dir().clone();
    qsd.quit().unwrap();
    assert!(!daemon_alive(pid));
    assert!(
        !run_dir.pid_file.exists(),
        "a clean exit removes the pid file"
    );
    assert!(matches!(
        Qsd::reconnect(&run_dir.dir, Duration::from_secs(2)),
        Err(QsdError::NotRunning { .. })
    ));
    lab.reap_exited();
    assert!(lab.running_pids().is_empty());
}

#[test]
fn guest_writes_through_the_export_reach_the_image() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let vda = one_disk(&lab);
    let image = vda.layers[0].path.clone();
    let qsd = lab.start_qsd("run", &[vda]).unwrap();
    let uri = qsd.guest_export_uri("vda");
    live::write_pattern(&uri, 0x5a, MIB, 128 * 1024).unwrap();
    assert!(live::verify_pattern(&uri, 0x5a, MIB, 128 * 1024).unwrap());
    assert!(!live::verify_pattern(&uri, 0x5a, 0, 4096).unwrap());
    qsd.quit().unwrap();

    let expected = lab
        .image("expected.raw", ImageFormat::Raw, 16 * MIB)
        .unwrap();
    let expected_uri = format!("file:{}", expected.display());
    live::write_pattern(&expected_uri, 0x5a, MIB, 128 * 1024).unwrap();
    assert!(
        live::images_identical(&image, &ImageFormat::Qcow2, &expected, &ImageFormat::Raw).unwrap()
    );
}

#[test]
fn backing_chain_is_attached_with_explicit_backing_nodes() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let base = lab
        .image("base.qcow2", ImageFormat::Qcow2, 8 * MIB)
        .unwrap();
    let base_uri = format!("file:{}", base.display());
    // qemu-io on a file URI writes raw bytes; write the base through qemu-io's qcow2 driver.
    let status = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 64k"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(status.status.success(), "{base_uri}: {status:?}");
    let top = lab.file("top.qcow2");
    live::create_overlay(&top, &base, &ImageFormat::Qcow2).unwrap();
    let disk = QsdDisk {
        target: "vda".to_owned(),
        layers: vec![
            QsdLayer {
                path: top,
                format: ImageFormat::Qcow2,
            },
            QsdLayer {
                path: base,
                format: ImageFormat::Qcow2,
            },
        ],
    };
    let mut qsd = lab.start_qsd("run", &[disk]).unwrap();
    let nodes = qsd
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let base_node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == format_node("vda", 1))
        .expect("base layer node");
    assert_eq!(base_node["ro"], json!(true));
    let uri = qsd.guest_export_uri("vda");
    assert!(live::verify_pattern(&uri, 0x11, 0, 65536).unwrap());
    qsd.quit().unwrap();
}

#[test]
fn monitor_demands_negotiation_and_refuses_a_second_one() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let vda = one_disk(&lab);
    let qsd = lab.start_qsd("run", &[vda]).unwrap();
    let socket = qsd.run_dir().qmp_socket.clone();
    drop(qsd);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut qmp = QmpSocket::connect_unnegotiated(&socket, deadline).unwrap();
    assert!(qmp.greeting().version.qemu.major >= 7);
    assert!(qmp.greeting().offers(&QmpCapability::Oob));
    let early = qmp.execute("query-jobs", None, deadline).unwrap_err();
    let error = early.qemu_error().expect("a QEMU error reply");
    assert!(error.is_negotiation_pending(), "{error}");
    qmp.negotiate(deadline).unwrap();
    assert_eq!(
        qmp.execute("query-jobs", None, deadline).unwrap(),
        json!([])
    );
    let again = qmp.negotiate(deadline).unwrap_err();
    let error = again.qemu_error().unwrap();
    assert_eq!(error.class, ErrorClass::CommandNotFound);
    assert!(error.desc.contains("already complete"), "{error}");
}

#[test]
fn second_handle_reconnects_to_the_running_daemon() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let vda = one_disk(&lab);
    let mut first = lab.start_qsd("run", &[vda]).unwrap();
    first
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "vbk-vda-0-format", "name": "c1", "persistent": true}),
        )
        .unwrap();
    let pid = first.pid();
    // While the first handle holds the monitor, a second one cannot get it.
    assert!(matches!(
        Qsd::reconnect(&lab.file("run"), Duration::from_millis(300)),
        Err(QsdError::MonitorBusy { pid: p }) if p == pid
    ));
    drop(first); // vbackup exits; the daemon stays.
    assert!(daemon_alive(pid));

    let mut second = lab.reconnect("run").unwrap();
    assert_eq!(second.pid(), pid);
    let bitmaps = live::node_bitmaps(&mut second, "vbk-vda-0-format").unwrap();
    assert_eq!(bitmaps[0]["name"], "c1");

    // Starting a second daemon over the same run directory is refused.
    let again = Qsd::start(
        &lab.file("run"),
        &[],
        &vbackup_qemu::qsd::QsdOptions::default(),
    );
    assert!(matches!(again, Err(QsdError::AlreadyRunning { pid: p, .. }) if p == pid));
    second.quit().unwrap();
}

#[test]
fn killed_daemon_is_reported_gone() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let vda = one_disk(&lab);
    let qsd = lab.start_qsd("run", &[vda]).unwrap();
    let pid = qsd.pid();
    let run_dir = qsd.run_dir().clone();
    // It crashes while our handle is open (SIGKILL from outside the handle).
    vbackup_qemu::qsd::kill_pid(pid).unwrap();
    let mut qsd = qsd;
    let err = qsd.execute("query-jobs", json!(null)).unwrap_err();
    assert!(
        matches!(err, QsdError::DaemonGone { pid: p } if p == pid),
        "{err:?}"
    );
    // The pid file survives a SIGKILL, and reconnecting tells the daemon is gone.
    assert!(run_dir.pid_file.exists());
    assert!(matches!(
        Qsd::reconnect(&run_dir.dir, Duration::from_secs(2)),
        Err(QsdError::DaemonGone { pid: p }) if p == pid
    ));
    assert!(matches!(qsd.quit(), Err(QsdError::DaemonGone { pid: p }) if p == pid));
    // A new daemon can start over the leftovers.
    let vda = QsdDisk::single("vda", lab.file("vda.qcow2"), ImageFormat::Qcow2);
    let restarted = lab.start_qsd("run", &[vda]).unwrap();
    assert_ne!(restarted.pid(), pid);
    restarted.quit().unwrap();
}

#[test]
fn missing_image_fails_startup_with_qemu_error_and_no_process_left() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let disk = QsdDisk::single("vda", lab.file("absent.qcow2"), ImageFormat::Qcow2);
    let err = lab.start_qsd("run", &[disk]).unwrap_err();
    let vbackup_qemu::live::LiveError::Qsd(QsdError::Qmp(QmpSocketError::Qemu { command, .. })) =
        &err
    else {
        panic!("expected a QEMU refusal, got {err:?}");
    };
    assert_eq!(command, "blockdev-add");
    assert!(lab.running_pids().is_empty());
    let pid_file = lab.file("run").join("qsd.pid");
    if let Ok(text) = fs::read_to_string(&pid_file) {
        assert!(!daemon_alive(text.trim().parse().unwrap()));
    }
}

#[test]
fn invalid_disk_definitions_are_refused_before_spawning() {
    let lab = LiveLab::new().unwrap();
    for (target, format) in [
        ("vda/x", ImageFormat::Qcow2),
        ("1vda", ImageFormat::Qcow2),
        ("vda", ImageFormat::Other("vmdk".to_owned())),
    ] {
        let disk = QsdDisk::single(target, lab.file("x"), format);
        let err = Qsd::start(
            &lab.file("run"),
            &[disk],
            &vbackup_qemu::qsd::QsdOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, QsdError::BadDisk { .. }), "{err:?}");
    }
    assert!(!lab.file("run").exists());
}

#[test]
fn connect_or_start_starts_once_then_reconnects() {
    require_qemu!();
    let mut lab = LiveLab::new().unwrap();
    let vda = one_disk(&lab);
    let options = vbackup_qemu::qsd::QsdOptions::default();
    let mut first =
        Qsd::connect_or_start(&lab.file("run"), std::slice::from_ref(&vda), &options).unwrap();
    let pid = first.pid();
    // This process spawned it; the lab takes the child so it is stopped whatever happens.
    lab.adopt(first.take_child().expect("spawned by this handle"));
    drop(first);
    let second = Qsd::connect_or_start(&lab.file("run"), &[vda], &options).unwrap();
    assert_eq!(second.pid(), pid, "the running daemon was reused");
    second.quit().unwrap();
    assert!(lab.running_pids().is_empty());
}
