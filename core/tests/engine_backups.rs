//! Push and pull backups against the scripted QMP peer; command plans are snapshotted.

mod engine_support;

use engine_support::*;
use vbackup_core::backup::{
    BackupDiskSpec, BackupMode, BackupPlan, BackupSpec, BackupStage, BackupStore, DiskJobState,
    DomainJobStatus, NbdServer, NbdTransport, StoreKind,
};
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::{
    Domain, DomainConfig, Input, Output, PushWrite, Reply, Request, RequestId, StoreOp,
    StoredState, TlsConfig,
};
use vbackup_core::error::{ConflictError, Error, RequestError};
use vbackup_core::link::Timestamp;

fn disk_spec(target: &str, incremental: Option<&str>, path: &str) -> BackupDiskSpec {
    BackupDiskSpec {
        target: target.into(),
        backup: true,
        incremental: incremental.map(Into::into),
        store: Some(BackupStore {
            kind: StoreKind::File,
            path: Some(path.into()),
            format: None,
        }),
        export_name: None,
        export_bitmap: None,
    }
}

fn push(incremental: Option<&str>) -> BackupSpec {
    BackupSpec {
        mode: BackupMode::Push,
        incremental: incremental.map(Into::into),
        server: None,
        disks: vec![
            disk_spec("vda", incremental, "/backups/vda.qcow2"),
            disk_spec("vdb", incremental, "/backups/vdb.qcow2"),
        ],
    }
}

fn pull(incremental: Option<&str>, transport: NbdTransport, tls: Option<bool>) -> BackupSpec {
    BackupSpec {
        mode: BackupMode::Pull,
        incremental: incremental.map(Into::into),
        server: Some(NbdServer { transport, tls }),
        disks: vec![
            disk_spec("vda", incremental, "/scratch/vda.qcow2"),
            disk_spec("vdb", incremental, "/scratch/vdb.qcow2"),
        ],
    }
}

fn unix() -> NbdTransport {
    NbdTransport::Unix {
        socket: "/run/backup-nbd.sock".into(),
    }
}

/// The NBD server a managed daemon already runs (on the same socket [`unix`] names).
fn running_unix() -> NbdServer {
    NbdServer {
        transport: unix(),
        tls: None,
    }
}

/// A domain whose QEMU already runs the NBD server `running`.
fn shared_config(running: NbdServer) -> DomainConfig {
    DomainConfig {
        nbd_server_running: Some(running),
        ..DomainConfig::default()
    }
}

/// A lab domain whose QEMU already runs the NBD server `running`, connected.
fn shared_lab(running: NbdServer) -> Harness {
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    peer.nbd_running = true;
    let mut h = Harness::with_config(def, peer, CheckpointTree::new(), shared_config(running));
    h.connect();
    h
}

fn begin(h: &mut Harness, spec: BackupSpec, checkpoint_name: Option<&str>) -> u64 {
    h.request(Request::BackupBegin {
        spec,
        checkpoint: checkpoint_name.map(|n| checkpoint(n, &["vda", "vdb"])),
        reuse_external: false,
    })
}

fn finish_all(h: &mut Harness) {
    for id in ["backup-vda-libvirt-2-format", "backup-vdb-libvirt-1-format"] {
        let ev = h.peer.finish_job(id, None);
        h.events(ev);
    }
}

/// Connects a bare domain: negotiation, then a reconcile that finds nothing.
fn negotiate(d: &mut Domain, t: Timestamp) {
    let out = d.handle(t, Input::Reconnected);
    let Some(Output::Send(id, _)) = out.first() else {
        panic!("capabilities sent: {out:?}")
    };
    let out = d.handle(t, Input::Reply(id.clone(), Ok(serde_json::json!({}))));
    let Some(Output::Send(id, _)) = out.first() else {
        panic!("node query sent: {out:?}")
    };
    d.handle(t, Input::Reply(id.clone(), Ok(serde_json::json!([]))));
    assert!(d.view().connected);
}

/// The finished job ended failed with exactly `errmsg`.
fn assert_failed_with(h: &Harness, errmsg: &str) {
    let s = completed(h);
    assert_eq!(s.status, DomainJobStatus::Failed);
    assert_eq!(s.errmsg.as_deref(), Some(errmsg));
}

fn completed(h: &Harness) -> vbackup_core::backup::JobStats {
    h.domain.view().completed.cloned().expect("job completed")
}

#[test]
fn push_full_backup_of_two_disks_completes_and_keeps_targets() {
    let mut h = lab_with_checkpoints(&[]);
    let id = begin(&mut h, push(None), None);
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    assert_eq!(
        h.domain.view().jobs.disk_holder("vda"),
        Some("backup"),
        "disks are busy while the backup runs"
    );
    h.note("both jobs finish");
    finish_all(&mut h);
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Completed);
    assert_eq!(s.disk_total_bytes, Some(320 << 20));
    assert!(h.peer.files.contains("/backups/vda.qcow2"));
    assert!(h.peer.jobs.is_empty());
    assert!(!h.peer.nodes.contains_key("libvirt-3-format"));
    assert!(h.domain.view().jobs.long_job().is_none());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn push_target_qemu_never_closed_ends_failed_and_is_removed() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.note("vda's job completes, but its target node is gone before vbackup closes it");
    let ev = h.peer.finish_job("backup-vda-libvirt-2-format", None);
    h.peer.nodes.remove("libvirt-3-format");
    h.events(ev);
    let ev = h.peer.finish_job("backup-vdb-libvirt-1-format", None);
    h.events(ev);
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Failed);
    let msg = s.errmsg.unwrap_or_default();
    assert!(
        msg.contains("did not confirm closing backup target '/backups/vda.qcow2'"),
        "{msg}"
    );
    let t = h.transcript();
    assert!(!t.contains("file sync /backups/vda.qcow2"), "{t}");
    assert!(!h.peer.files.contains("/backups/vda.qcow2"));
    assert!(!h.peer.files.contains("/backups/vdb.qcow2"));
}

#[test]
fn push_target_sync_failure_ends_failed_and_removes_targets() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.peer
        .failing_syncs
        .insert("/backups/vdb.qcow2".into(), "Input/output error".into());
    finish_all(&mut h);
    assert_failed_with(
        &h,
        "writing backup target '/backups/vdb.qcow2' to storage failed: Input/output error",
    );
    let t = h.transcript();
    let sync = t.find("file sync /backups/vdb.qcow2").expect("synced");
    let close = t
        .find("blockdev-del {\"node-name\":\"libvirt-4-format\"}")
        .unwrap();
    assert!(close < sync, "synced only after QEMU closed it:\n{t}");
    assert!(!h.peer.files.contains("/backups/vda.qcow2"));
    assert!(!h.peer.files.contains("/backups/vdb.qcow2"));
}

#[test]
fn push_with_qemu_flushes_sends_libvirts_commands_and_syncs_nothing() {
    let def = lab_domain();
    let peer = Peer::for_domain(&def, &lab_sizes());
    let config = DomainConfig {
        push_write: PushWrite::QemuFlushes,
        ..DomainConfig::default()
    };
    let mut h = Harness::with_config(def, peer, CheckpointTree::new(), config);
    h.connect();
    begin(&mut h, push(None), None);
    finish_all(&mut h);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    let t = h.transcript();
    for absent in ["no-flush", "x-perf", "file sync"] {
        assert!(!t.contains(absent), "{absent} in:\n{t}");
    }
    assert!(h.peer.files.contains("/backups/vda.qcow2"));
}

#[test]
fn push_with_deferred_writes_offloads_copies_and_syncs_after_closing() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    finish_all(&mut h);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    let t = h.transcript();
    assert_eq!(t.matches("\"cache\":{\"no-flush\":true}").count(), 2, "{t}");
    assert_eq!(
        t.matches("x-perf={\"use-copy-range\":true}").count(),
        2,
        "{t}"
    );
    for (disk, node) in [("vda", "libvirt-3"), ("vdb", "libvirt-4")] {
        let close = t
            .find(&format!("blockdev-del {{\"node-name\":\"{node}-format\"}}"))
            .unwrap();
        let sync = t.find(&format!("file sync /backups/{disk}.qcow2")).unwrap();
        let end = t.find("store delete-journal").unwrap();
        assert!(close < sync && sync < end, "{t}");
    }
}

#[test]
fn a_qemu_without_x_perf_gets_the_transaction_again_without_copy_offload() {
    let mut h = lab_with_checkpoints(&["c3"]);
    h.peer
        .fail_next("transaction", "Parameter 'data.x-perf' is unexpected");
    let id = begin(&mut h, push(Some("c3")), Some("c6"));
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    finish_all(&mut h);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    assert_eq!(h.domain.view().checkpoints.current(), Some("c6"));
    let t = h.transcript();
    let sent: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("-> transaction"))
        .collect();
    assert_eq!(sent.len(), 2, "{t}");
    assert!(
        sent[0].contains("x-perf") && !sent[1].contains("x-perf"),
        "{t}"
    );
    assert_eq!(
        sent[0].replace(" x-perf={\"use-copy-range\":true}", ""),
        sent[1]
    );
    // Later backups on this QEMU do not ask again.
    let mut again = push(Some("c6"));
    for d in &mut again.disks {
        if let Some(store) = &mut d.store {
            store.path = Some(format!("/backups/{}-2.qcow2", d.target));
        }
    }
    let id = begin(&mut h, again, None);
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let t = h.transcript();
    let with_offload = t
        .lines()
        .filter(|l| l.starts_with("-> transaction") && l.contains("x-perf"))
        .count();
    assert_eq!(with_offload, 1, "only the refused transaction had it:\n{t}");
}

#[test]
fn push_incremental_creates_checkpoint_in_the_same_transaction() {
    let mut h = lab_with_checkpoints(&["c3"]);
    let id = begin(&mut h, push(Some("c3")), Some("c6"));
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let tree = h.domain.view().checkpoints;
    assert_eq!(tree.current(), Some("c6"));
    assert_eq!(tree.get("c6").unwrap().parent.as_deref(), Some("c3"));
    finish_all(&mut h);
    assert!(!h.peer.has_bitmap("libvirt-2-format", "backup-vda"));
    assert!(h.peer.has_bitmap("libvirt-2-format", "c6"));
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn push_incremental_on_snapshot_layers_merges_every_layer() {
    let mut h = lab_like(layered_domain(), &["c1"]);
    begin(&mut h, push(Some("c1")), None);
    finish_all_layered(&mut h);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    insta::assert_snapshot!(h.transcript());
}

fn finish_all_layered(h: &mut Harness) {
    for id in ["backup-vda-libvirt-3-format", "backup-vdb-libvirt-1-format"] {
        let ev = h.peer.finish_job(id, None);
        h.events(ev);
    }
}

#[test]
fn push_abort_ends_cancelled_and_deletes_created_targets() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let a = h.request(Request::AbortJob);
    assert_eq!(h.answer(a), Some(&Ok(Reply::Done)));
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Cancelled);
    assert_eq!(s.success, Some(false));
    assert!(
        h.peer.files.is_empty(),
        "targets of a cancelled push are deleted"
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn push_with_existing_target_file_fails_before_touching_qemu_nodes() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.existing_files.insert("/backups/vdb.qcow2".into());
    let id = begin(&mut h, push(None), None);
    assert!(matches!(h.answer(id), Some(Err(Error::Store(_)))));
    assert_eq!(
        h.peer.nodes.len(),
        4,
        "the vda target nodes were removed again"
    );
    assert!(
        h.peer.files.is_empty(),
        "the vda target file was removed again"
    );
    assert!(h.domain.view().jobs.long_job().is_none());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn push_target_format_failure_rolls_back() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer
        .failing_create_jobs
        .insert("create-libvirt-3-format".into());
    let id = begin(&mut h, push(None), None);
    let Some(Err(Error::QemuRefused { desc, .. })) = h.answer(id) else {
        panic!("not refused: {:?}", h.answer(id));
    };
    assert!(desc.starts_with("failed to format image"));
    assert!(h.peer.jobs.is_empty(), "the creation job was dismissed");
    assert!(h.peer.files.is_empty());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn push_transaction_failure_creates_no_checkpoint_and_rolls_back() {
    let mut h = lab_with_checkpoints(&["c1"]);
    h.peer.fail_next(
        "transaction",
        "Bitmap 'c1' is inconsistent and cannot be used",
    );
    let id = begin(&mut h, push(Some("c1")), Some("c2"));
    assert!(matches!(h.answer(id), Some(Err(Error::QemuRefused { .. }))));
    assert!(h.domain.view().checkpoints.get("c2").is_none());
    assert!(
        !h.store
            .iter()
            .any(|s| matches!(s, StoreOp::PutCheckpoint(_)))
    );
    assert_eq!(h.peer.nodes.len(), 4);
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn push_failure_of_one_disk_cancels_the_other_and_ends_failed() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let ev = h
        .peer
        .finish_job("backup-vda-libvirt-2-format", Some("Input/output error"));
    h.events(ev);
    assert_failed_with(&h, "Input/output error");
    assert!(h.peer.files.is_empty());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn pull_incremental_over_unix_socket_with_checkpoint_then_abort_completes() {
    let mut h = lab_with_checkpoints(&["c6"]);
    let id = begin(&mut h, pull(Some("c6"), unix(), None), Some("c7"));
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let plan = h.domain.view().backup.cloned().unwrap();
    assert_eq!(plan.disks[0].export_name.as_deref(), Some("vda"));
    assert_eq!(plan.disks[0].temp_bitmap.as_deref(), Some("backup-vda"));
    assert_eq!(plan.disks[0].index, 3);
    assert!(h.peer.exports.contains("libvirt-nbd-libvirt-3-format"));
    h.note("the client has read everything");
    h.request(Request::AbortJob);
    let s = completed(&h);
    assert_eq!(
        s.status,
        DomainJobStatus::Completed,
        "ending a pull by abort is success"
    );
    assert_eq!(s.success, Some(true));
    assert!(h.peer.files.is_empty(), "scratch images are always deleted");
    assert!(!h.peer.nbd_running);
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn pull_full_over_tcp_takes_a_port_from_the_range_and_skips_a_busy_one() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.busy_ports.insert("10809".into());
    let spec = pull(
        None,
        NbdTransport::Tcp {
            host: "0.0.0.0".into(),
            port: None,
        },
        None,
    );
    let id = begin(&mut h, spec, None);
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let plan = h.domain.view().backup.cloned().unwrap();
    assert_eq!(
        plan.server.unwrap().transport,
        NbdTransport::Tcp {
            host: "0.0.0.0".into(),
            port: Some(10810)
        }
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn pull_with_given_busy_port_fails_without_trying_others() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.busy_ports.insert("10809".into());
    let spec = pull(
        None,
        NbdTransport::Tcp {
            host: "0.0.0.0".into(),
            port: Some(10809),
        },
        None,
    );
    let id = begin(&mut h, spec, None);
    assert!(matches!(
        h.answer(id),
        Some(Err(Error::Request(RequestError::NoFreePort { .. })))
    ));
    assert_eq!(h.peer.nodes.len(), 4);
}

#[test]
fn pull_with_tls_adds_secret_and_credentials_and_removes_them() {
    let def = lab_domain();
    let peer = Peer::for_domain(&def, &lab_sizes());
    let config = DomainConfig {
        tls: Some(TlsConfig {
            cert_dir: "/etc/pki/vbackup".into(),
            verify_peer: true,
            secret_file: Some("/etc/pki/vbackup/key.pass".into()),
        }),
        ..DomainConfig::default()
    };
    let mut h = Harness::with_config(def, peer, CheckpointTree::new(), config);
    h.connect();
    let spec = pull(
        None,
        NbdTransport::Tcp {
            host: "0.0.0.0".into(),
            port: Some(10809),
        },
        Some(true),
    );
    begin(&mut h, spec, None);
    h.request(Request::AbortJob);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn pull_with_tls_but_no_configuration_is_refused() {
    let mut h = lab_with_checkpoints(&[]);
    let id = begin(&mut h, pull(None, unix(), Some(true)), None);
    assert!(matches!(
        h.answer(id),
        Some(Err(Error::Request(RequestError::Unsupported(_))))
    ));
    assert!(!h.transcript().contains("->"));
}

#[test]
fn pull_export_failure_keeps_checkpoint_and_cancels_jobs() {
    let mut h = lab_with_checkpoints(&["c1"]);
    h.peer
        .fail_next("block-export-add", "Bitmap 'backup-vda' is not found");
    let id = begin(&mut h, pull(Some("c1"), unix(), None), Some("c2"));
    assert!(matches!(h.answer(id), Some(Err(Error::QemuRefused { .. }))));
    assert!(h.domain.view().checkpoints.get("c2").is_some());
    assert!(h.domain.view().backup.is_none());
    assert!(h.peer.jobs.is_empty());
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Failed);
    assert!(
        s.errmsg
            .unwrap()
            .contains("Bitmap 'backup-vda' is not found")
    );
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn reuse_external_pull_neither_creates_nor_deletes_scratch() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.files.insert("/scratch/vda.qcow2".into());
    h.peer.files.insert("/scratch/vdb.qcow2".into());
    let id = h.request(Request::BackupBegin {
        spec: pull(None, unix(), None),
        checkpoint: None,
        reuse_external: true,
    });
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    h.request(Request::AbortJob);
    assert_eq!(h.peer.files.len(), 2);
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn second_backup_is_refused_at_once_naming_the_holder() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, pull(None, unix(), None), None);
    let id = begin(&mut h, push(None), None);
    assert_eq!(
        h.answer(id),
        Some(&Err(Error::Conflict(ConflictError::DomainJob {
            holder: "backup".into()
        })))
    );
}

#[test]
fn incremental_from_missing_checkpoint_is_refused_without_commands() {
    let mut h = lab_with_checkpoints(&[]);
    let id = begin(&mut h, push(Some("nonexistent")), None);
    let Some(Err(e)) = h.answer(id) else { panic!() };
    assert_eq!(
        e.to_string(),
        "Checkpoint 'nonexistent' for incremental backup of disk 'vda' not found"
    );
    assert!(!h.transcript().contains("->"));
}

#[test]
fn incremental_with_inconsistent_bitmap_is_refused_after_the_node_query() {
    let mut h = lab_with_checkpoints(&["c1"]);
    h.peer.bitmap_mut("libvirt-1-format", "c1").inconsistent = true;
    let id = begin(&mut h, push(Some("c1")), None);
    assert_eq!(
        h.answer(id),
        Some(&Err(Error::Request(RequestError::CheckpointInconsistent {
            bitmap: "c1".into(),
            disk: "vdb".into()
        })))
    );
    assert!(h.domain.view().jobs.busy_disks().is_empty());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn checkpoint_operations_are_allowed_during_a_backup() {
    let mut h = lab_with_checkpoints(&["c1"]);
    begin(&mut h, pull(Some("c1"), unix(), None), Some("c2"));
    let c = h.request(Request::CheckpointCreate {
        checkpoint: checkpoint("c3", &["vda", "vdb"]),
        quiesce: false,
    });
    let d = h.request(Request::CheckpointDelete {
        name: "c2".into(),
        scope: vbackup_core::checkpoint::DeleteScope::Single,
        metadata_only: false,
    });
    assert!(matches!(h.answer(c), Some(Ok(_))));
    assert_eq!(h.answer(d), Some(&Ok(Reply::Done)));
}

#[test]
fn running_push_reports_libvirt_job_stats() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.peer
        .jobs
        .get_mut("backup-vda-libvirt-2-format")
        .unwrap()
        .current = 64 << 20;
    h.now_ms += 565;
    let id = h.request(Request::JobStats {
        completed: false,
        keep_completed: false,
    });
    let Some(Ok(Reply::Stats(Some(s)))) = h.answer(id) else {
        panic!()
    };
    assert_eq!(s.status, DomainJobStatus::Running);
    assert_eq!(s.time_elapsed_ms, 565);
    assert_eq!(s.disk_processed_bytes, Some(64 << 20));
    assert_eq!(s.disk_remaining_bytes, Some(256 << 20));
    finish_all(&mut h);
    let id = h.request(Request::JobStats {
        completed: true,
        keep_completed: true,
    });
    assert!(matches!(h.answer(id), Some(Ok(Reply::Stats(Some(_))))));
}

#[test]
fn backup_xml_has_every_default_filled_in() {
    let mut h = lab_with_checkpoints(&["c1"]);
    let mut spec = pull(Some("c1"), unix(), None);
    for d in &mut spec.disks {
        d.store.as_mut().unwrap().path = None;
    }
    begin(&mut h, spec, Some("c2"));
    let id = h.request(Request::BackupGetXml);
    let Some(Ok(Reply::Backup(plan))) = h.answer(id) else {
        panic!()
    };
    let d = &plan.disks[0];
    assert_eq!(d.store_path, "/img/vda.qcow2.c2");
    assert_eq!(d.export_name.as_deref(), Some("vda"));
    assert_eq!(d.export_bitmap_name(), Some("backup-vda"));
    assert_eq!(d.index, 3);
    assert_eq!(plan.disks[1].index, 4);
    insta::assert_snapshot!(plan.to_def().format());
}

trait ExportBitmap {
    fn export_bitmap_name(&self) -> Option<&str>;
}

impl ExportBitmap for vbackup_core::backup::BackupDiskPlan {
    fn export_bitmap_name(&self) -> Option<&str> {
        self.temp_bitmap.as_deref()
    }
}

#[test]
fn reconnect_mid_push_resumes_monitoring_and_completes() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.feed(Input::LinkDown);
    h.note("vda finishes while vbackup is disconnected");
    let _ = h.peer.finish_job("backup-vda-libvirt-2-format", None);
    h.feed(Input::Reconnected);
    assert!(h.domain.view().backup.is_some());
    let ev = h.peer.finish_job("backup-vdb-libvirt-1-format", None);
    h.events(ev);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn reconnect_after_jobs_vanished_ends_backup_failed() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.feed(Input::LinkDown);
    h.note("QEMU lost the jobs");
    h.peer.jobs.clear();
    h.feed(Input::Reconnected);
    assert_failed_with(&h, "job no longer known to QEMU");
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn restart_from_journal_concludes_a_backup_that_finished_meanwhile() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let journal = last_journal(&h);
    finish_all_silently(&mut h);
    let mut restarted = restarted_from(journal, std::mem::take(&mut h.peer));
    assert_eq!(
        restarted.domain.view().jobs.disk_holder("vdb"),
        Some("backup")
    );
    restarted.feed(Input::Reconnected);
    let s = completed(&restarted);
    assert_eq!(s.status, DomainJobStatus::Completed);
    assert!(restarted.store.contains(&StoreOp::DeleteBackupJournal));
    insta::assert_snapshot!(restarted.transcript());
}

/// A restarted engine whose journal shows vda's job completed (`closed`: and its target
/// closed, the storage node below it not yet deleted) while QEMU no longer lists the job; vdb's job finished meanwhile. `qemu_lost_nodes`:
/// QEMU also lost vda's target nodes (it was restarted). Returns the restarted harness after
/// its reconnection.
fn restart_with_vda_completed(closed: bool, qemu_lost_nodes: bool) -> Harness {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let mut journal = last_journal(&h);
    journal.disks[0].state = DiskJobState::Complete;
    journal.disks[0].target_closed = closed;
    finish_all_silently(&mut h);
    h.peer.jobs.remove("backup-vda-libvirt-2-format");
    if closed || qemu_lost_nodes {
        h.peer.nodes.remove("libvirt-3-format");
    }
    if qemu_lost_nodes {
        h.peer.nodes.remove("libvirt-3-storage");
    }
    let mut restarted = restarted_from(journal, std::mem::take(&mut h.peer));
    restarted.feed(Input::Reconnected);
    restarted
}

/// The last journal the engine wrote.
fn last_journal(h: &Harness) -> BackupPlan {
    h.store
        .iter()
        .filter_map(|s| match s {
            StoreOp::PutBackupJournal(p) => Some((**p).clone()),
            _ => None,
        })
        .next_back()
        .expect("journal written")
}

/// A new engine process on the lab domain: it comes back from the store with `journal` (and no
/// checkpoints), before reconnecting to `peer`.
fn restarted_from(journal: BackupPlan, peer: Peer) -> Harness {
    let mut restarted = Harness::new(lab_domain(), peer, CheckpointTree::new());
    restarted.domain = Domain::new(
        lab_domain(),
        DomainConfig::default(),
        CheckpointTree::new(),
        Some(journal),
    );
    restarted
}

#[test]
fn restart_after_a_disk_completed_closes_and_syncs_its_target_and_completes() {
    let h = restart_with_vda_completed(false, false);
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Completed, "{}", h.transcript());
    let t = h.transcript();
    let close = t
        .find("blockdev-del {\"node-name\":\"libvirt-3-format\"}")
        .expect("closed");
    assert!(
        close < t.find("file sync /backups/vda.qcow2").unwrap(),
        "{t}"
    );
    assert!(h.peer.files.contains("/backups/vda.qcow2"));
}

#[test]
fn restart_after_a_target_was_closed_only_syncs_it() {
    let h = restart_with_vda_completed(true, false);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    let t = h.transcript();
    assert!(!t.contains("libvirt-3-format\"}"), "{t}");
    assert!(t.contains("file sync /backups/vda.qcow2"), "{t}");
    assert!(
        !h.peer.nodes.contains_key("libvirt-3-storage"),
        "the storage node left behind is deleted"
    );
}

#[test]
fn restart_after_qemu_lost_an_unclosed_completed_target_ends_failed() {
    let h = restart_with_vda_completed(false, true);
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Failed);
    assert!(
        s.errmsg
            .unwrap_or_default()
            .contains("did not confirm closing backup target '/backups/vda.qcow2'")
    );
    assert!(!h.peer.files.contains("/backups/vda.qcow2"));
}

fn finish_all_silently(h: &mut Harness) {
    for id in ["backup-vda-libvirt-2-format", "backup-vdb-libvirt-1-format"] {
        let _ = h.peer.finish_job(id, None);
    }
}

/// A connected domain asked (request 1, at time 0) for a full push backup: its first command
/// is on the wire, no reply has come back.
fn push_begun_without_replies(def: vbackup_core::model::DomainDef) -> (Domain, Timestamp) {
    let mut d = Domain::new(def, DomainConfig::default(), CheckpointTree::new(), None);
    let t = Timestamp::from_ms(0);
    negotiate(&mut d, t);
    let out = d.handle(
        t,
        Input::Request(
            RequestId(1),
            Request::BackupBegin {
                spec: push(None),
                checkpoint: None,
                reuse_external: false,
            },
        ),
    );
    assert!(matches!(out.first(), Some(Output::Send(..))));
    (d, t)
}

#[test]
fn link_lost_before_the_transaction_rolls_back_after_reconnect() {
    let def = lab_domain();
    let peer = Peer::for_domain(&def, &lab_sizes());
    let (mut d, t) = push_begun_without_replies(def);
    d.handle(t, Input::LinkDown);
    let mut h = Harness::new(lab_domain(), peer, CheckpointTree::new());
    h.domain = d;
    h.feed(Input::Reconnected);
    assert!(matches!(h.answer(1), Some(Err(Error::LinkLost(_)))));
    assert!(h.domain.view().jobs.long_job().is_none());
}

#[test]
fn stats_request_pending_when_the_link_drops_is_answered_link_lost() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let t = Timestamp::from_ms(h.now_ms);
    let out = h.domain.handle(
        t,
        Input::Request(
            RequestId(100),
            Request::JobStats {
                completed: false,
                keep_completed: false,
            },
        ),
    );
    assert!(
        matches!(out.as_slice(), [Output::Send(..)]),
        "the statistics need query-jobs: {out:?}"
    );
    let out = h.domain.handle(t, Input::LinkDown);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Respond(RequestId(100), Err(Error::LinkLost(_))))),
        "{out:?}"
    );
    assert!(h.domain.view().backup.is_some());
}

#[test]
fn guest_shutdown_cancels_the_backup() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let shutdown = vbackup_core::qmp::QmpEvent::from_parts(
        "SHUTDOWN",
        serde_json::json!({"guest": false, "reason": "host-signal"}),
    )
    .unwrap();
    h.events(vec![shutdown]);
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Cancelled);
    assert!(h.domain.view().backup.is_none());
}

#[test]
fn drain_pauses_during_a_job_are_not_pauses() {
    let mut h = lab_with_checkpoints(&[]);
    h.events_before_reply = true;
    begin(&mut h, pull(None, unix(), None), None);
    let plan = h.domain.view().backup.unwrap();
    assert!(plan.disks.iter().all(|d| d.state == DiskJobState::Running));
}

#[test]
fn checkpoint_operations_wait_out_the_backup_start() {
    let def = lab_domain();
    let (mut d, t) = push_begun_without_replies(def);
    let out = d.handle(
        t,
        Input::Request(
            RequestId(2),
            Request::CheckpointCreate {
                checkpoint: checkpoint("c1", &["vda"]),
                quiesce: false,
            },
        ),
    );
    assert_eq!(
        out,
        vec![Output::Respond(
            RequestId(2),
            Err(Error::Conflict(ConflictError::DomainJob {
                holder: "backup-begin".into()
            }))
        )]
    );
}

/// A pull backup with TLS and a new checkpoint touches every kind of command; a failure of
/// any one of them must leave QEMU, the files and the slots as they were (except after the
/// transaction, where the checkpoint stays and the jobs are cancelled).
#[test]
fn failure_at_each_step_of_the_start_leaves_nothing_behind() {
    let config = DomainConfig {
        tls: Some(TlsConfig {
            cert_dir: "/etc/pki/vbackup".into(),
            verify_peer: false,
            secret_file: None,
        }),
        ..DomainConfig::default()
    };
    let mut transcripts = Vec::new();
    for (command, nth) in [
        ("query-named-block-nodes", 0),
        ("blockdev-add", 0),
        ("blockdev-create", 0),
        ("query-jobs", 0),
        ("blockdev-add", 1),
        ("blockdev-add", 3),
        ("object-add", 0),
        ("nbd-server-start", 0),
        ("transaction", 0),
        ("block-export-add", 1),
    ] {
        let def = lab_domain();
        let mut peer = Peer::for_domain(&def, &lab_sizes());
        for n in ["libvirt-2-format", "libvirt-1-format"] {
            peer.add_bitmap(n, "c1", 1 << 20);
        }
        let mut tree = CheckpointTree::new();
        tree.insert_created(checkpoint("c1", &["vda", "vdb"]))
            .unwrap();
        let mut h = Harness::with_config(def, peer, tree, config.clone());
        h.connect();
        let nodes_before: Vec<String> = h.peer.nodes.keys().cloned().collect();
        h.peer.fail_after(command, nth, "injected failure");
        h.note(&format!("{command} #{nth} fails"));
        let id = begin(&mut h, pull(Some("c1"), unix(), Some(true)), Some("c2"));
        assert!(
            matches!(h.answer(id), Some(Err(_))),
            "{command} #{nth}: {:?}",
            h.answer(id)
        );
        let after_transaction = command == "block-export-add";
        if after_transaction {
            h.note("the jobs were cancelled; the checkpoint stays");
            assert!(h.domain.view().checkpoints.get("c2").is_some());
        } else {
            assert!(h.domain.view().checkpoints.get("c2").is_none(), "{command}");
            assert!(!h.peer.has_bitmap("libvirt-2-format", "c2"));
        }
        assert!(h.domain.view().backup.is_none(), "{command}");
        assert!(h.domain.view().jobs.long_job().is_none());
        assert!(h.domain.view().jobs.short_job().is_none());
        assert!(h.domain.view().jobs.busy_disks().is_empty());
        assert!(
            h.peer.files.is_empty(),
            "{command}: files left {:?}",
            h.peer.files
        );
        assert!(
            h.peer.jobs.is_empty(),
            "{command}: jobs left {:?}",
            h.peer.jobs
        );
        assert_eq!(
            h.peer.nodes.keys().cloned().collect::<Vec<_>>(),
            nodes_before,
            "{command}: nodes left"
        );
        assert!(!h.peer.nbd_running, "{command}: NBD server left running");
        transcripts.push(h.transcript());
    }
    insta::assert_snapshot!(transcripts.join("\n\n"));
}

#[test]
fn abort_while_starting_rolls_back_once_nothing_is_in_flight() {
    let mut h = lab_with_checkpoints(&["c1"]);
    let t = Timestamp::from_ms(0);
    let out = h.domain.handle(
        t,
        Input::Request(
            RequestId(1),
            Request::BackupBegin {
                spec: push(Some("c1")),
                checkpoint: Some(checkpoint("c2", &["vda", "vdb"])),
                reuse_external: false,
            },
        ),
    );
    let Some(Output::Send(id, query)) = out.first().cloned() else {
        panic!("{out:?}")
    };
    let out = h
        .domain
        .handle(t, Input::Request(RequestId(2), Request::AbortJob));
    assert!(matches!(
        out.as_slice(),
        [Output::Respond(RequestId(2), Ok(Reply::Done))]
    ));
    let (result, _) = h.peer.execute(&query);
    h.feed(Input::Reply(id, result));
    assert_eq!(
        h.answer(1),
        Some(&Err(Error::Request(RequestError::Aborted)))
    );
    assert!(h.domain.view().checkpoints.get("c2").is_none());
    assert!(h.domain.view().jobs.long_job().is_none());
    assert!(h.domain.view().jobs.short_job().is_none());
    assert_eq!(h.peer.nodes.len(), 4);
    assert!(h.peer.files.is_empty());
}

#[test]
fn creation_job_that_never_concludes_times_out_and_rolls_back() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.silent_create_jobs = true;
    let id = begin(&mut h, push(None), None);
    assert_eq!(h.answer(id), None, "still waiting for the creation job");
    let deadline = h.domain.next_deadline().expect("a deadline while waiting");
    h.now_ms = deadline.as_ms();
    h.feed(Input::Tick);
    let Some(Err(Error::QemuMisbehaved(msg))) = h.answer(id) else {
        panic!("{:?}", h.answer(id))
    };
    assert!(msg.contains("create-libvirt-3-format never concluded"));
    assert!(h.peer.files.is_empty());
    assert!(h.domain.view().jobs.long_job().is_none());
    assert_eq!(h.domain.next_deadline(), None);
}

#[test]
fn cancelling_one_disk_cancels_the_whole_push() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    let id = h.request(Request::BlockJobAbort { disk: "vdb".into() });
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Cancelled);
    assert!(h.peer.files.is_empty());
    let cancels: Vec<&String> = h
        .lines
        .iter()
        .filter(|l| l.contains("block-job-cancel"))
        .collect();
    assert_eq!(cancels.len(), 2);
    assert!(cancels[0].contains(r#""device":"backup-vdb-libvirt-1-format","force":false"#));
    assert!(cancels[1].contains(r#""device":"backup-vda-libvirt-2-format","force":true"#));
}

#[test]
fn pull_on_a_running_nbd_server_adds_and_deletes_only_its_exports() {
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    peer.nbd_running = true;
    let config = shared_config(running_unix());
    let mut h = Harness::with_config(def, peer, CheckpointTree::new(), config);
    h.connect();
    let id = begin(&mut h, pull(None, unix(), None), None);
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    assert!(!h.peer.exports.is_empty());
    h.request(Request::AbortJob);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    let transcript = h.transcript();
    assert!(!transcript.contains("nbd-server-start"), "{transcript}");
    assert!(!transcript.contains("nbd-server-stop"), "{transcript}");
    assert!(transcript.contains("block-export-del"), "{transcript}");
    assert!(h.peer.nbd_running, "the server keeps serving");
}

/// What the store holds after the first `n` operations: the tree and the journal.
fn stored_prefix(ops: &[StoreOp], n: usize) -> (CheckpointTree, Option<BackupPlan>) {
    let stored = StoredState::from_ops(&ops[..n]);
    (stored.checkpoint_tree(), stored.backup_journal)
}

/// A new engine process over the same QEMU, from what the store held.
fn restart(h: &mut Harness, tree: CheckpointTree, journal: Option<BackupPlan>) -> Harness {
    let mut restarted = Harness::new(lab_domain(), std::mem::take(&mut h.peer), tree.clone());
    restarted.domain = Domain::new(lab_domain(), DomainConfig::default(), tree, journal);
    restarted.feed(Input::Reconnected);
    restarted
}

#[test]
fn failed_metadata_write_after_the_transaction_leaves_the_restart_the_jobs() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), Some("c6"));
    // The first write after QEMU confirmed the transaction (the checkpoint) fails: the
    // driver stops and the engine restarts from what the store held before it.
    let failed = h
        .store
        .iter()
        .position(|op| matches!(op, StoreOp::PutCheckpoint(_)))
        .expect("checkpoint written");
    let (tree, journal) = stored_prefix(&h.store, failed);
    let journal = journal.expect("the plan is journaled before the transaction");
    assert_eq!(journal.stage, BackupStage::Starting);
    assert!(tree.get("c6").is_none());
    let mut r = restart(&mut h, tree, Some(journal));
    r.note("the restarted engine finds the jobs and records the checkpoint");
    assert!(r.domain.view().checkpoints.get("c6").is_some());
    assert_eq!(r.domain.view().checkpoints.current(), Some("c6"));
    finish_all(&mut r);
    assert_eq!(completed(&r).status, DomainJobStatus::Completed);
    assert!(r.peer.jobs.is_empty(), "jobs left {:?}", r.peer.jobs);
    assert!(r.store.contains(&StoreOp::DeleteBackupJournal));
    assert!(r.domain.view().jobs.long_job().is_none());
}

#[test]
fn restart_while_targets_are_created_rolls_back_what_the_journal_names() {
    let mut h = lab_with_checkpoints(&[]);
    let nodes_before: Vec<String> = h.peer.nodes.keys().cloned().collect();
    // The first image-creation job never reports its end: the engine is stopped while it
    // waits, with one target file created, its storage node added and the job in QEMU.
    h.peer.silent_create_jobs = true;
    begin(&mut h, push(None), None);
    assert_eq!(h.peer.files.len(), 1);
    assert_eq!(h.peer.jobs.len(), 1);
    let (tree, journal) = stored_prefix(&h.store, h.store.len());
    let journal = journal.expect("the plan is journaled before targets are created");
    assert_eq!(journal.stage, BackupStage::Preparing);
    assert_eq!(journal.created_files, ["/backups/vda.qcow2"]);
    let r = restart(&mut h, tree, Some(journal));
    assert!(r.domain.view().backup.is_none());
    assert!(r.domain.view().jobs.long_job().is_none());
    assert!(r.peer.jobs.is_empty(), "jobs left {:?}", r.peer.jobs);
    assert!(r.peer.files.is_empty(), "files left {:?}", r.peer.files);
    assert_eq!(
        r.peer.nodes.keys().cloned().collect::<Vec<_>>(),
        nodes_before
    );
    assert_eq!(r.store.last(), Some(&StoreOp::DeleteBackupJournal));
}

#[test]
fn refused_cleanup_is_checked_and_tried_again_until_gone() {
    let mut h = lab_with_checkpoints(&["c1"]);
    let nodes_before: Vec<String> = h.peer.nodes.keys().cloned().collect();
    begin(&mut h, push(Some("c1")), None);
    h.peer.fail_next("job-dismiss", "simulated refusal");
    h.peer
        .fail_next("block-dirty-bitmap-remove", "simulated refusal");
    finish_all(&mut h);
    // Both refusals were checked: the job and the bitmap are still there, so the backup
    // waits for the next try instead of ending with them left behind.
    assert!(h.domain.view().backup.is_some());
    assert_eq!(h.peer.jobs.len(), 1);
    for _ in 0..4 {
        let Some(due) = h.domain.next_deadline() else {
            break;
        };
        h.now_ms = due.as_ms();
        h.feed(Input::Tick);
    }
    assert!(h.domain.view().backup.is_none());
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    assert!(h.peer.jobs.is_empty(), "jobs left {:?}", h.peer.jobs);
    assert!(!h.peer.has_bitmap("libvirt-2-format", "backup-vda"));
    assert!(!h.peer.has_bitmap("libvirt-1-format", "backup-vdb"));
    assert_eq!(
        h.peer.nodes.keys().cloned().collect::<Vec<_>>(),
        nodes_before
    );
    let transcript = h.transcript();
    assert!(transcript.contains("<- error: simulated refusal\n-> query-jobs"));
}

#[test]
fn cleanup_interrupted_by_a_lost_connection_resumes_after_reconnecting() {
    use std::collections::VecDeque;
    let mut h = lab_with_checkpoints(&[]);
    let nodes_before: Vec<String> = h.peer.nodes.keys().cloned().collect();
    begin(&mut h, push(None), None);
    // vda's job ends; the connection drops right after QEMU ran the job's dismissal, before
    // its reply, with the target's nodes still to delete.
    let mut queue: VecDeque<Input> = h
        .peer
        .finish_job("backup-vda-libvirt-2-format", None)
        .into_iter()
        .map(Input::Event)
        .collect();
    let t = Timestamp::from_ms(h.now_ms);
    'drive: while let Some(input) = queue.pop_front() {
        for o in h.domain.handle(t, input) {
            if let Output::Send(id, cmd) = o {
                let (result, events) = h.peer.execute(&cmd);
                if cmd.name() == "job-dismiss" {
                    break 'drive;
                }
                queue.push_back(Input::Reply(id, result));
                queue.extend(events.into_iter().map(Input::Event));
            }
        }
    }
    assert!(h.peer.nodes.contains_key("libvirt-3-format"));
    h.feed(Input::LinkDown);
    h.feed(Input::Reconnected);
    let ev = h.peer.finish_job("backup-vdb-libvirt-1-format", None);
    h.events(ev);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    assert!(h.peer.jobs.is_empty(), "jobs left {:?}", h.peer.jobs);
    assert_eq!(
        h.peer.nodes.keys().cloned().collect::<Vec<_>>(),
        nodes_before
    );
}

#[test]
fn refused_job_query_after_reconnecting_is_asked_again() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.feed(Input::LinkDown);
    finish_all_silently(&mut h);
    h.peer.fail_next("query-jobs", "simulated refusal");
    h.feed(Input::Reconnected);
    assert!(h.domain.view().backup.is_some());
    let due = h.domain.next_deadline().expect("the query is asked again");
    h.now_ms = due.as_ms();
    h.feed(Input::Tick);
    assert!(h.domain.view().backup.is_none());
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    assert!(h.peer.jobs.is_empty(), "jobs left {:?}", h.peer.jobs);
}

#[test]
fn restart_dismisses_an_image_creation_job_whose_dismissal_was_refused() {
    let mut h = lab_with_checkpoints(&[]);
    h.peer.fail_next("job-dismiss", "simulated refusal");
    begin(&mut h, push(None), None);
    assert!(h.peer.jobs.contains_key("create-libvirt-3-format"));
    // vbackup restarts before the dismissal is tried again.
    let (tree, journal) = stored_prefix(&h.store, h.store.len());
    let mut r = restart(&mut h, tree, journal);
    finish_all(&mut r);
    assert_eq!(completed(&r).status, DomainJobStatus::Completed);
    assert!(r.peer.jobs.is_empty(), "jobs left {:?}", r.peer.jobs);
}

#[test]
fn reconnect_after_qemu_restart_ends_pull_backup_failed() {
    let mut h = lab_with_checkpoints(&["c6"]);
    let id = begin(&mut h, pull(Some("c6"), unix(), None), Some("c7"));
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    h.feed(Input::LinkDown);
    h.note("QEMU restarted: no jobs, no export, no NBD server");
    h.peer.jobs.clear();
    h.peer.exports.clear();
    h.peer.nbd_running = false;
    h.feed(Input::Reconnected);
    assert!(h.domain.view().backup.is_none(), "{}", h.transcript());
    let s = completed(&h);
    assert_eq!(s.status, DomainJobStatus::Failed);
    assert_eq!(s.success, Some(false));
    assert_eq!(s.errmsg.as_deref(), Some("job no longer known to QEMU"));
    assert!(h.peer.files.is_empty(), "scratch images are deleted");
    assert!(h.domain.view().jobs.disk_holder("vda").is_none());
    // The checkpoint created with the backup stays.
    assert!(h.domain.view().checkpoints.get("c7").is_some());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn restart_after_qemu_restart_ends_pull_backup_on_shared_server_failed() {
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    peer.nbd_running = true;
    let config = shared_config(running_unix());
    let mut h = Harness::with_config(def, peer, CheckpointTree::new(), config.clone());
    h.connect();
    let id = begin(&mut h, pull(None, unix(), None), Some("c1"));
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let (tree, journal) = stored_prefix(&h.store, h.store.len());
    assert!(journal.is_some());
    // QEMU restarted with the images only: jobs, exports, scratch nodes and every bitmap it
    // had not written are gone; its NBD server runs again.
    let mut peer = std::mem::take(&mut h.peer);
    peer.jobs.clear();
    peer.exports.clear();
    peer.nodes
        .retain(|n, _| n.starts_with("libvirt-1-") || n.starts_with("libvirt-2-"));
    for node in peer.nodes.values_mut() {
        node.bitmaps.clear();
    }
    let mut restarted = Harness::with_config(lab_domain(), peer, tree.clone(), config.clone());
    restarted.domain = Domain::new(lab_domain(), config, tree, journal);
    restarted.feed(Input::Reconnected);
    assert!(
        restarted.domain.view().backup.is_none(),
        "{}",
        restarted.transcript()
    );
    assert_failed_with(&restarted, "job no longer known to QEMU");
    assert!(restarted.store.contains(&StoreOp::DeleteBackupJournal));
    assert!(restarted.domain.view().jobs.disk_holder("vda").is_none());
    insta::assert_snapshot!(restarted.transcript());
}

#[test]
fn reconnect_with_one_pull_job_vanished_cancels_the_other_and_ends_failed() {
    let mut h = lab_with_checkpoints(&[]);
    let id = begin(&mut h, pull(None, unix(), None), None);
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    h.feed(Input::LinkDown);
    h.note("QEMU lost vdb's job; vda's still runs");
    h.peer.jobs.retain(|id, _| id.starts_with("backup-vda"));
    h.feed(Input::Reconnected);
    assert!(
        h.domain.view().backup.is_none(),
        "a pull whose export server went with one disk must not wait for an abort: {}",
        h.transcript()
    );
    assert_failed_with(&h, "job no longer known to QEMU");
    assert!(
        h.peer.jobs.is_empty(),
        "vda's job was cancelled and dismissed"
    );
    assert!(h.peer.files.is_empty());
    insta::assert_snapshot!(h.transcript());
}

#[test]
fn reconnect_with_one_push_job_vanished_cancels_the_other_and_ends_failed() {
    let mut h = lab_with_checkpoints(&[]);
    begin(&mut h, push(None), None);
    h.feed(Input::LinkDown);
    h.peer.jobs.retain(|id, _| id.starts_with("backup-vda"));
    h.feed(Input::Reconnected);
    assert!(h.domain.view().backup.is_none(), "{}", h.transcript());
    assert_failed_with(&h, "job no longer known to QEMU");
    assert!(h.peer.jobs.is_empty());
    assert!(
        h.peer.files.is_empty(),
        "targets of a failed push are deleted"
    );
}

/// Asserts that `id` was refused because its server is not `running`, naming both, and that
/// nothing was sent, stored nor created.
fn assert_refused_server_in_use(h: &Harness, id: u64, running: &str, requested: &str) {
    let Some(Err(Error::Request(RequestError::NbdServerInUse {
        running: r,
        requested: q,
    }))) = h.answer(id)
    else {
        panic!("refused as a server mismatch: {:?}", h.answer(id));
    };
    assert_eq!((r.as_str(), q.as_str()), (running, requested));
    let text = h.answer(id).unwrap().as_ref().unwrap_err().to_string();
    assert!(text.contains(running) && text.contains(requested), "{text}");
    assert!(!h.transcript().contains("->"), "{}", h.transcript());
    assert!(h.store.is_empty(), "{:?}", h.store);
    assert!(h.peer.files.is_empty());
    assert!(h.domain.view().backup.is_none());
    assert!(h.domain.view().jobs.long_job().is_none());
    assert!(h.domain.view().jobs.disk_holder("vda").is_none());
    assert!(h.domain.view().checkpoints.get("c1").is_none());
}

#[test]
fn pull_naming_another_socket_than_the_running_server_is_refused_before_anything_starts() {
    let mut h = shared_lab(running_unix());
    let other = NbdTransport::Unix {
        socket: "/x/pull.sock".into(),
    };
    let id = begin(&mut h, pull(None, other, None), Some("c1"));
    assert_refused_server_in_use(&h, id, "unix:/run/backup-nbd.sock", "unix:/x/pull.sock");
}

#[test]
fn pull_asking_for_tcp_on_a_running_unix_server_is_refused_naming_both() {
    let mut h = shared_lab(running_unix());
    let tcp = NbdTransport::Tcp {
        host: "127.0.0.1".into(),
        port: Some(10809),
    };
    let id = begin(&mut h, pull(None, tcp, None), Some("c1"));
    assert_refused_server_in_use(&h, id, "unix:/run/backup-nbd.sock", "tcp:127.0.0.1:10809");
}

#[test]
fn pull_asking_for_tls_on_a_running_server_without_tls_is_refused_even_with_tls_configured() {
    let def = lab_domain();
    let mut peer = Peer::for_domain(&def, &lab_sizes());
    peer.nbd_running = true;
    let config = DomainConfig {
        tls: Some(TlsConfig {
            cert_dir: "/etc/pki/vbackup".into(),
            verify_peer: true,
            secret_file: None,
        }),
        ..shared_config(running_unix())
    };
    let mut h = Harness::with_config(def, peer, CheckpointTree::new(), config);
    h.connect();
    let id = begin(&mut h, pull(None, unix(), Some(true)), Some("c1"));
    assert_refused_server_in_use(
        &h,
        id,
        "unix:/run/backup-nbd.sock",
        "unix:/run/backup-nbd.sock with TLS",
    );
}

#[test]
fn pull_without_tls_on_a_running_tls_server_is_refused() {
    let running = NbdServer {
        transport: NbdTransport::Tcp {
            host: "127.0.0.1".into(),
            port: Some(10900),
        },
        tls: Some(true),
    };
    let mut h = shared_lab(running.clone());
    let id = begin(&mut h, pull(None, running.transport, None), None);
    assert_refused_server_in_use(
        &h,
        id,
        "tcp:127.0.0.1:10900 with TLS",
        "tcp:127.0.0.1:10900",
    );
}

#[test]
fn pull_without_a_server_uses_the_running_one() {
    let mut h = shared_lab(running_unix());
    let mut spec = pull(None, unix(), None);
    spec.server = None;
    let id = begin(&mut h, spec, Some("c1"));
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    let plan = h.domain.view().backup.cloned().expect("running");
    assert_eq!(plan.server, Some(running_unix()));
    assert!(!h.peer.exports.is_empty());
    h.request(Request::AbortJob);
    assert_eq!(completed(&h).status, DomainJobStatus::Completed);
    let transcript = h.transcript();
    assert!(!transcript.contains("nbd-server-start"), "{transcript}");
    assert!(!transcript.contains("nbd-server-stop"), "{transcript}");
}

#[test]
fn pull_naming_the_running_server_with_tls_uses_its_credentials_and_adds_none() {
    let running = NbdServer {
        transport: NbdTransport::Tcp {
            host: "127.0.0.1".into(),
            port: Some(10900),
        },
        tls: Some(true),
    };
    let mut h = shared_lab(running.clone());
    // A TCP request without a port accepts the port the server runs on.
    let requested = NbdTransport::Tcp {
        host: "127.0.0.1".into(),
        port: None,
    };
    let id = begin(&mut h, pull(None, requested, Some(true)), None);
    assert_eq!(h.answer(id), Some(&Ok(Reply::Done)));
    assert_eq!(
        h.domain.view().backup.and_then(|p| p.server.clone()),
        Some(running)
    );
    let transcript = h.transcript();
    assert!(!transcript.contains("object-add"), "{transcript}");
    assert!(!transcript.contains("nbd-server-start"), "{transcript}");
}

#[test]
fn pull_without_a_server_and_none_running_is_refused() {
    let mut h = lab_with_checkpoints(&[]);
    let mut spec = pull(None, unix(), None);
    spec.server = None;
    let id = begin(&mut h, spec, None);
    assert!(matches!(
        h.answer(id),
        Some(Err(Error::Request(RequestError::Unsupported(_))))
    ));
    assert!(!h.transcript().contains("->"));
}

#[test]
fn export_uris_follow_the_nbd_uri_forms_clients_understand() {
    let unix = NbdServer {
        transport: NbdTransport::Unix {
            socket: "/run/pull.sock".into(),
        },
        tls: None,
    };
    assert_eq!(
        unix.export_uri("vda"),
        "nbd+unix:///vda?socket=/run/pull.sock"
    );
    let tls = NbdServer {
        transport: NbdTransport::Tcp {
            host: "::1".into(),
            port: Some(10809),
        },
        tls: Some(true),
    };
    assert_eq!(tls.export_uri("vdb"), "nbds://[::1]:10809/vdb");
    assert_eq!(tls.to_string(), "tcp:[::1]:10809 with TLS");
}
