//! A real push full backup through the raw QMP socket: target made with `blockdev-create`,
//! events interleaved with replies, the copy checked with `qemu-img compare`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vbackup_core::model::ImageFormat;
use vbackup_core::qmp::{JobStatus, QmpEvent, QmpIn};
use vbackup_qemu::live::{self, LiveLab};
use vbackup_qemu::qmp_socket::QmpSocket;
use vbackup_qemu::qsd::{Qsd, QsdDisk, format_node};

const MIB: u64 = 1024 * 1024;
const DISK_BYTES: u64 = 32 * MIB;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn job_status(event: &QmpEvent, job: &str) -> Option<JobStatus> {
    match event {
        QmpEvent::JobStatusChange(change) if change.id == job => Some(change.status.clone()),
        _ => None,
    }
}

/// Reads events until `job` concludes; returns every event of that job, in order.
fn events_until_concluded(qmp: &mut QmpSocket, job: &str) -> Vec<QmpEvent> {
    let mut seen = Vec::new();
    loop {
        let event = qmp
            .wait_event(deadline(), |e| e.job_id() == Some(job))
            .unwrap();
        let concluded = job_status(&event, job) == Some(JobStatus::Concluded);
        seen.push(event);
        if concluded {
            return seen;
        }
    }
}

/// Runs a `blockdev-create` job to its end and dismisses it.
fn blockdev_create(qsd: &mut Qsd, job: &str, options: Value) {
    qsd.execute(
        "blockdev-create",
        json!({"job-id": job, "options": options}),
    )
    .unwrap();
    let events = events_until_concluded(qsd.qmp(), job);
    assert!(
        events
            .iter()
            .all(|e| matches!(e, QmpEvent::JobStatusChange(_)))
    );
    let jobs = qsd.execute("query-jobs", json!(null)).unwrap();
    let info = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job)
        .unwrap();
    assert!(info.get("error").is_none(), "{job} failed: {info}");
    qsd.execute("job-dismiss", json!({"id": job})).unwrap();
}

#[test]
fn push_full_backup_copies_the_disk_with_events_interleaved() {
    if !live::tools_available() {
        // A live test fails, never skips, where what it needs is missing.
        panic!(
            "QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon): install qemu-utils 10"
        );
    }
    let mut lab = LiveLab::new().unwrap();
    let source = lab
        .image("vda.qcow2", ImageFormat::Qcow2, DISK_BYTES)
        .unwrap();
    let disk = QsdDisk::single("vda", &source, ImageFormat::Qcow2);
    let mut qsd = lab.start_qsd("run", &[disk]).unwrap();
    let guest = qsd.guest_export_uri("vda");
    live::write_pattern(&guest, 0x11, 0, MIB).unwrap();
    live::write_pattern(&guest, 0x12, 8 * MIB, 64 * 1024).unwrap();
    live::write_pattern(&guest, 0x13, 20 * MIB, 100 * 1024).unwrap();

    let target = lab.file("full.qcow2");
    blockdev_create(
        &mut qsd,
        "create-file",
        json!({"driver": "file", "filename": target.display().to_string(), "size": 0}),
    );
    qsd.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tgt-file", "filename": target.display().to_string()}),
    )
    .unwrap();
    blockdev_create(
        &mut qsd,
        "create-qcow2",
        json!({"driver": "qcow2", "file": "tgt-file", "size": DISK_BYTES, "cluster-size": 65536}),
    );
    qsd.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt", "file": "tgt-file", "backing": null}),
    )
    .unwrap();

    qsd.execute(
        "blockdev-backup",
        json!({"job-id": "bk", "device": format_node("vda", 0), "target": "tgt",
               "sync": "full", "auto-dismiss": false}),
    )
    .unwrap();
    // QEMU announces the job before it replies: those events were read while waiting for the
    // reply and must be queued, not lost.
    let queued_statuses: Vec<JobStatus> = qsd
        .qmp()
        .queued()
        .filter_map(|m| match m {
            QmpIn::Event(e) => job_status(e, "bk"),
            _ => None,
        })
        .collect();
    assert_eq!(
        queued_statuses.first(),
        Some(&JobStatus::Created),
        "events before the reply: {queued_statuses:?}"
    );

    let events = events_until_concluded(qsd.qmp(), "bk");
    let statuses: Vec<JobStatus> = events.iter().filter_map(|e| job_status(e, "bk")).collect();
    assert_eq!(statuses.first(), Some(&JobStatus::Created));
    assert_eq!(statuses.last(), Some(&JobStatus::Concluded));
    let completed = events
        .iter()
        .find_map(|e| match e {
            QmpEvent::BlockJobCompleted(completed) => Some(completed),
            _ => None,
        })
        .expect("BLOCK_JOB_COMPLETED");
    assert_eq!(completed.error, None);
    assert_eq!(completed.len, DISK_BYTES);
    assert_eq!(completed.offset, DISK_BYTES);

    qsd.execute("job-dismiss", json!({"id": "bk"})).unwrap();
    qsd.execute("blockdev-del", json!({"node-name": "tgt"}))
        .unwrap();
    qsd.execute("blockdev-del", json!({"node-name": "tgt-file"}))
        .unwrap();

    assert!(
        live::images_identical(&target, &ImageFormat::Qcow2, &source, &ImageFormat::Qcow2).unwrap()
    );
    // The comparison is not vacuous: a guest write after the backup makes them differ.
    live::write_pattern(&guest, 0x77, 4 * MIB, 4096).unwrap();
    assert!(
        !live::images_identical(&target, &ImageFormat::Qcow2, &source, &ImageFormat::Qcow2)
            .unwrap()
    );
    qsd.quit().unwrap();
}
