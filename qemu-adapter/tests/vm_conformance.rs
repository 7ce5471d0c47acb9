//! The conformance scenarios of `vbackup_sim::scenarios` against real running
//! qemu-system-x86_64 VMs, in every disk configuration of `vbackup_qemu::vm::DiskConfig`
//! (`-blockdev` as libvirt, legacy `-drive`, a live snapshot on top, and both kinds mixed).
//! The core's domain comes from attached-domain discovery; every backup is checked byte for byte
//! against a raw reference of what the guest wrote. These tests fail, not skip, without
//! qemu-system-x86_64.
//!
//! With `VBACKUP_RECORD_TRACES=1` each run also writes its QMP trace and host log to
//! `testdata/traces/qemu-system-10/<configuration>/` (see the README there);
//! `sim/tests/replay_vm.rs` replays them in every test run.

mod conformance_support;
mod vm_support;

use conformance_support::{LiveEffects, relink};
use vbackup_core::domain::DomainEvent;
use vbackup_qemu::vm::DiskConfig;
use vbackup_sim::scenarios;
use vm_support::{VmConformance, VmHost, generated_names, layer_summary};

fn events(effects: &LiveEffects) -> &[DomainEvent] {
    VmConformance::events(effects)
}

/// Discovery on the VM finds `vda` (one layer) and `vdb` (overlay over base; in the snapshot
/// configuration, the live overlay over both) with the node names the configuration gives.
fn discovery(config: DiskConfig) {
    let run = VmConformance::start("discovery", config, true);
    let def = run
        .driver
        .as_ref()
        .expect("driver")
        .domain()
        .view()
        .def
        .clone();
    let img = run.host.images().display().to_string();
    // Discovery lists disks in `query-block` order, where QEMU puts `-drive` disks before
    // `-device` ones whatever the command line's order.
    let mut targets: Vec<&str> = def.disks.iter().map(|d| d.target.as_str()).collect();
    targets.sort();
    assert_eq!(targets, ["vda", "vdb"], "{def:?}");
    let vda = layer_summary(&def, "vda");
    let vdb = layer_summary(&def, "vdb");
    let generated = |layers: &[String]| layers.iter().all(|l| l.starts_with("#block"));
    match config {
        DiskConfig::Blockdev => {
            assert_eq!(vda, [format!("libvirt-1-format:{img}/vda.qcow2")]);
            assert_eq!(
                vdb,
                [
                    format!("libvirt-3-format:{img}/vdb.ovl"),
                    format!("libvirt-2-format:{img}/vdb.qcow2")
                ]
            );
        }
        DiskConfig::LiveSnapshot => {
            assert_eq!(vda, [format!("libvirt-1-format:{img}/vda.qcow2")]);
            assert_eq!(
                vdb,
                [
                    format!("libvirt-4-format:{img}/vdb.snap"),
                    format!("libvirt-3-format:{img}/vdb.ovl"),
                    format!("libvirt-2-format:{img}/vdb.qcow2")
                ]
            );
        }
        DiskConfig::Drive => {
            assert!(generated(&vda) && generated(&vdb), "{vda:?} {vdb:?}");
            assert!(vda.len() == 1 && vda[0].ends_with(&format!(":{img}/vda.qcow2")));
            assert!(vdb.len() == 2 && vdb[0].ends_with(&format!(":{img}/vdb.ovl")));
            assert!(vdb[1].ends_with(&format!(":{img}/vdb.qcow2")), "{vdb:?}");
        }
        DiskConfig::Mixed => {
            assert_eq!(vda, [format!("libvirt-1-format:{img}/vda.qcow2")]);
            assert!(generated(&vdb), "{vdb:?}");
            assert!(vdb.len() == 2 && vdb[0].ends_with(&format!(":{img}/vdb.ovl")));
            assert!(vdb[1].ends_with(&format!(":{img}/vdb.qcow2")), "{vdb:?}");
        }
    }
    run.finish(Ok(()));
}

/// QEMU killed after a checkpoint and started again. With `-drive` disks the new process
/// names its nodes anew, so vbackup is started again on the rediscovered domain between the
/// two halves of the scenario; otherwise the same engine reconnects.
fn qemu_crash(config: DiskConfig) {
    if !generated_names(config) {
        VmConformance::run("qemu-crash", config, |d, h, socket| {
            scenarios::qemu_crash_loses_new_checkpoint(d, h, events, |link| relink(link, socket))
        });
        return;
    }
    let mut run = VmConformance::start("qemu-crash", config, true);
    let mut driver = run.driver.take().expect("driver");
    let result = scenarios::crash_after_new_checkpoint(&mut driver, &mut run.host, events)
        .and_then(|()| VmConformance::rediscover(driver, &mut run.host))
        .and_then(|mut driver| {
            scenarios::new_checkpoint_lost_in_crash(&mut driver, &mut run.host, events)?;
            run.driver = Some(driver);
            Ok(())
        });
    run.finish(result);
}

fn engine_restart(config: DiskConfig) {
    let mut run = VmConformance::start("engine-restart-mid-backup", config, true);
    let socket = run.host.vm.qmp_socket();
    let driver = run.driver.take().expect("driver");
    let result = scenarios::engine_restart_mid_backup(
        driver,
        &mut run.host,
        events,
        VmConformance::persisted,
        |link| relink(link, &socket),
    )
    .map(|driver| run.driver = Some(driver));
    run.finish(result);
}

/// The live snapshot taken while checkpoints exist: the host's part of
/// `checkpoints_survive_a_live_snapshot`, then vbackup on the rediscovered domain.
fn snapshot_and_rediscover(
    driver: vbackup_core::driver::Driver<conformance_support::LiveLink, LiveEffects>,
    host: &mut VmHost,
) -> Result<vbackup_core::driver::Driver<conformance_support::LiveLink, LiveEffects>, String> {
    let overlay = host.images().join("vdb.snap");
    let node = host
        .vm
        .live_snapshot("vdb", &overlay)
        .map_err(|e| e.to_string())?;
    host.log.note(serde_json::json!({"snapshot": {"disk": "vdb",
        "overlay": overlay.display().to_string(), "node": node}}));
    host.note_boot()?;
    VmConformance::rediscover(driver, host)
}

fn live_snapshot_keeps_checkpoints() {
    let mut run = VmConformance::start(
        "checkpoints-survive-a-live-snapshot",
        DiskConfig::LiveSnapshot,
        false,
    );
    let driver = run.driver.take().expect("driver");
    let result =
        scenarios::checkpoints_survive_a_live_snapshot(driver, &mut run.host, events, |d, h| {
            snapshot_and_rediscover(d, h)
        })
        .map(|driver| run.driver = Some(driver));
    run.finish(result);
}

macro_rules! scenarios_in {
    ($module:ident, $config:expr) => {
        mod $module {
            use super::*;

            const CONFIG: DiskConfig = $config;

            #[test]
            fn discovery_finds_vda_and_vdb_with_their_node_names_and_layers() {
                discovery(CONFIG);
            }

            #[test]
            fn checkpoints_create_delete_redefine_and_validate() {
                VmConformance::run("checkpoint-lifecycle", CONFIG, |d, _, _| {
                    scenarios::checkpoint_lifecycle(d)
                });
            }

            #[test]
            fn push_full_then_incremental_restores_byte_for_byte() {
                VmConformance::run("push-full-then-incremental", CONFIG, |d, h, _| {
                    scenarios::push_full_then_incremental(d, h, events)
                });
            }

            #[test]
            fn incremental_push_with_an_idle_disk_and_with_every_disk_clean_completes() {
                VmConformance::run("push-incremental-idle-disks", CONFIG, |d, h, _| {
                    scenarios::push_incremental_with_idle_disks(d, h, events)
                });
            }

            #[test]
            fn pull_exports_hold_their_point_in_time_under_guest_writes() {
                VmConformance::run("pull-point-in-time", CONFIG, |d, h, _| {
                    scenarios::pull_point_in_time(d, h)
                });
            }

            #[test]
            fn slowed_push_aborted_while_the_guest_writes_ends_cancelled_and_the_next_completes() {
                VmConformance::run("push-abort-slowed", CONFIG, |d, h, _| {
                    scenarios::push_abort(d, h, events)
                });
            }

            #[test]
            fn push_with_failing_target_ends_failed_and_the_next_completes() {
                VmConformance::run("push-io-error", CONFIG, |d, h, _| {
                    scenarios::push_io_error(d, h, events)
                });
            }

            #[test]
            fn backup_survives_a_restart_of_vbackup_mid_job_under_guest_writes() {
                engine_restart(CONFIG);
            }

            #[test]
            fn qemu_crash_loses_the_new_checkpoint_and_the_next_full_backup_works() {
                qemu_crash(CONFIG);
            }
        }
    };
}

scenarios_in!(blockdev, DiskConfig::Blockdev);
scenarios_in!(drive, DiskConfig::Drive);
scenarios_in!(live_snapshot, DiskConfig::LiveSnapshot);
scenarios_in!(mixed, DiskConfig::Mixed);

#[test]
fn checkpoints_before_and_after_a_live_snapshot_both_serve_incremental_backups() {
    live_snapshot_keeps_checkpoints();
}
