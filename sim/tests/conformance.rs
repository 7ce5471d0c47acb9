//! The conformance scenarios (generic over Link) on the simulator, content checked byte for
//! byte.

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::json;
use vbackup_core::Domain;
use vbackup_core::backup::{NbdServer, NbdTransport};
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::{DomainConfig, DomainEvent, StoreOp};
use vbackup_core::driver::Driver;
use vbackup_sim::scenarios::{self, SIM_NBD_SOCKET};
use vbackup_sim::world::link::FaultyLink;
use vbackup_sim::world::{
    LAB_THROUGHPUT_BYTES_PER_S, LabWiring, SimHost, StoreEffects, boot_lab, lab_domain,
    lab_driver_wired, lab_files,
};
use vbackup_sim::{Config, Qemu};

fn events(e: &StoreEffects) -> &[DomainEvent] {
    &e.memory.events
}

fn persisted(e: &StoreEffects) -> &[StoreOp] {
    &e.memory.persisted
}

/// A new QMP session on the same (or restarted) simulated process.
fn relink(link: &mut FaultyLink) -> Result<(), String> {
    link.drop_connection();
    link.reconnect();
    Ok(())
}

fn setup() -> (
    vbackup_core::driver::Driver<vbackup_sim::world::link::FaultyLink, StoreEffects>,
    SimHost,
) {
    setup_wired(LabWiring::Blockdev)
}

fn setup_wired(
    wiring: LabWiring,
) -> (
    vbackup_core::driver::Driver<vbackup_sim::world::link::FaultyLink, StoreEffects>,
    SimHost,
) {
    let (mut d, qemu) = lab_driver_wired(wiring);
    // The greeting, then capabilities.
    d.run_until(|dom| dom.view().connected, 10)
        .expect("connects");
    assert!(d.domain().view().connected);
    (d, SimHost { qemu, wiring })
}

#[test]
fn checkpoints_create_delete_redefine_and_validate() {
    let (mut d, _) = setup();
    scenarios::checkpoint_lifecycle(&mut d).unwrap();
}

#[test]
fn push_full_then_incremental_restores_byte_for_byte() {
    let (mut d, mut h) = setup();
    scenarios::push_full_then_incremental(&mut d, &mut h, events).unwrap();
}

#[test]
fn incremental_push_with_an_idle_disk_and_with_every_disk_clean_completes() {
    let (mut d, mut h) = setup();
    scenarios::push_incremental_with_idle_disks(&mut d, &mut h, events).unwrap();
}

#[test]
fn pull_exports_hold_their_point_in_time_under_guest_writes() {
    let (mut d, mut h) = setup();
    scenarios::pull_point_in_time(&mut d, &mut h).unwrap();
}

#[test]
fn slowed_push_aborted_while_copying_ends_cancelled_and_the_next_completes() {
    let (mut d, mut h) = setup();
    scenarios::push_abort(&mut d, &mut h, events).unwrap();
}

#[test]
fn push_with_failing_target_ends_failed_without_its_checkpoint() {
    let (mut d, mut h) = setup();
    scenarios::push_io_error(&mut d, &mut h, events).unwrap();
}

#[test]
fn backup_survives_a_restart_of_vbackup_mid_job_and_completes() {
    let (d, mut h) = setup();
    scenarios::engine_restart_mid_backup(d, &mut h, events, persisted, relink).unwrap();
}

#[test]
fn qemu_crash_loses_the_new_checkpoint_and_the_next_full_backup_works() {
    let (mut d, mut h) = setup();
    scenarios::qemu_crash_loses_new_checkpoint(&mut d, &mut h, events, relink).unwrap();
}

/// The same scenarios with the lab's disks attached by legacy `-drive` options: every node
/// name is QEMU's own `#blockNNN`, which is not a well-formed QMP id.
mod legacy_drive {
    use super::*;

    #[test]
    fn drive_disks_get_generated_node_names_and_their_chains() {
        let (d, _) = setup_wired(LabWiring::Drive);
        let def = &d.domain().view().def;
        for disk in &def.disks {
            for layer in &disk.layers {
                let node = layer.node_name.as_deref().unwrap_or_default();
                assert!(node.starts_with("#block"), "{}: {node}", disk.target);
            }
        }
        assert_eq!(def.disks[1].layers.len(), 2);
    }

    #[test]
    fn checkpoints_on_drive_disks_create_delete_redefine_and_validate() {
        let (mut d, _) = setup_wired(LabWiring::Drive);
        scenarios::checkpoint_lifecycle(&mut d).unwrap();
    }

    #[test]
    fn push_full_then_incremental_of_drive_disks_restores_byte_for_byte() {
        let (mut d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::push_full_then_incremental(&mut d, &mut h, events).unwrap();
    }

    #[test]
    fn incremental_push_of_idle_drive_disks_completes() {
        let (mut d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::push_incremental_with_idle_disks(&mut d, &mut h, events).unwrap();
    }

    #[test]
    fn pull_exports_of_drive_disks_hold_their_point_in_time() {
        let (mut d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::pull_point_in_time(&mut d, &mut h).unwrap();
    }

    #[test]
    fn slowed_push_of_drive_disks_aborted_ends_cancelled() {
        let (mut d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::push_abort(&mut d, &mut h, events).unwrap();
    }

    #[test]
    fn push_of_drive_disks_with_failing_target_ends_failed() {
        let (mut d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::push_io_error(&mut d, &mut h, events).unwrap();
    }

    #[test]
    fn backup_of_drive_disks_survives_a_restart_of_vbackup() {
        let (d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::engine_restart_mid_backup(d, &mut h, events, persisted, relink).unwrap();
    }

    #[test]
    fn qemu_crash_with_drive_disks_loses_the_new_checkpoint() {
        let (mut d, mut h) = setup_wired(LabWiring::Drive);
        scenarios::qemu_crash_loses_new_checkpoint(&mut d, &mut h, events, relink).unwrap();
    }
}

/// The lab on a simulated QEMU whose NBD server already runs on [`SIM_NBD_SOCKET`], as a
/// managed daemon's does, with the domain configured to share it.
fn setup_with_running_server() -> (
    vbackup_core::driver::Driver<FaultyLink, StoreEffects>,
    SimHost,
) {
    let mut q = Qemu::new(
        lab_files(),
        Config {
            throughput_bytes_per_s: LAB_THROUGHPUT_BYTES_PER_S,
            ..Config::default()
        },
    );
    boot_lab(&mut q).expect("lab boots");
    let start = json!({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": SIM_NBD_SOCKET}}}});
    q.execute(0, &json!({"execute": "qmp_capabilities"}))
        .expect("negotiates");
    q.execute(0, &start).expect("the server starts");
    let qemu = Rc::new(RefCell::new(q));
    let config = DomainConfig {
        nbd_server_running: Some(NbdServer {
            transport: NbdTransport::Unix {
                socket: SIM_NBD_SOCKET.into(),
            },
            tls: None,
        }),
        ..DomainConfig::default()
    };
    let domain = Domain::new(lab_domain(), config, CheckpointTree::new(), None);
    let mut d = Driver::new(
        domain,
        FaultyLink::new(qemu.clone()),
        StoreEffects::new(qemu.clone()),
    );
    d.run_until(|dom| dom.view().connected, 10)
        .expect("connects");
    assert!(d.domain().view().connected);
    (
        d,
        SimHost {
            qemu,
            wiring: LabWiring::Blockdev,
        },
    )
}

#[test]
fn pull_on_a_running_server_is_refused_elsewhere_and_served_there() {
    let (mut d, mut h) = setup_with_running_server();
    scenarios::pull_on_the_running_server(&mut d, &mut h).unwrap();
}
