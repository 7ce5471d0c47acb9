//! The conformance scenarios (generic over Link) on the simulator, content checked byte for
//! byte.

use vbackup_core::domain::DomainEvent;
use vbackup_core::domain::StoreOp;
use vbackup_sim::scenarios;
use vbackup_sim::world::link::FaultyLink;
use vbackup_sim::world::{SimHost, StoreEffects, lab_driver};

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
    let (mut d, qemu) = lab_driver();
    // The greeting, then capabilities.
    d.run_until(|dom| dom.view().connected, 10)
        .expect("connects");
    assert!(d.domain().view().connected);
    (d, SimHost { qemu })
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
