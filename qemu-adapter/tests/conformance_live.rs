//! The conformance scenarios of `vbackup_sim::scenarios` against real qemu-storage-daemon: the
//! same code that passes on the simulator (`sim/tests/conformance.rs`) drives the core over a
//! QMP socket to a daemon holding the lab domain on real qcow2 files, and checks the content of
//! every backup byte for byte.
//!
//! With `VBACKUP_RECORD_TRACES=1` each run also writes its QMP trace and its host log to
//! `testdata/traces/qsd-10/` (see the README there); `sim/tests/replay_live.rs` replays them
//! against the simulator in every test run.

mod conformance_support;

use conformance_support::{LiveConformance, LiveEffects, relink};
use vbackup_sim::scenarios;

fn events(effects: &LiveEffects) -> &[vbackup_core::domain::DomainEvent] {
    LiveConformance::events(effects)
}

#[test]
fn live_checkpoints_create_delete_redefine_and_validate() {
    LiveConformance::run("checkpoint-lifecycle", |d, _, _| {
        scenarios::checkpoint_lifecycle(d)
    });
}

#[test]
fn live_push_full_then_incremental_restores_byte_for_byte() {
    LiveConformance::run("push-full-then-incremental", |d, h, _| {
        scenarios::push_full_then_incremental(d, h, events)
    });
}

#[test]
fn live_pull_exports_hold_their_point_in_time_under_guest_writes() {
    LiveConformance::run("pull-point-in-time", |d, h, _| {
        scenarios::pull_point_in_time(d, h)
    });
}

#[test]
fn live_slowed_push_aborted_while_copying_ends_cancelled_and_the_next_completes() {
    LiveConformance::run("push-abort-slowed", |d, h, _| {
        scenarios::push_abort(d, h, events)
    });
}

#[test]
fn live_push_with_failing_target_ends_failed_and_the_next_completes() {
    LiveConformance::run("push-io-error", |d, h, _| {
        scenarios::push_io_error(d, h, events)
    });
}

#[test]
fn live_qemu_crash_loses_the_new_checkpoint_and_the_next_full_backup_works() {
    LiveConformance::run("qemu-crash", |d, h, socket| {
        scenarios::qemu_crash_loses_new_checkpoint(d, h, events, |link| relink(link, socket))
    });
}

#[test]
fn live_backup_survives_a_restart_of_vbackup_mid_job_and_completes() {
    let Some(mut run) = LiveConformance::start("engine-restart-mid-backup") else {
        return;
    };
    let socket = run.qmp_socket();
    let driver = run.driver.take().expect("driver");
    let result = scenarios::engine_restart_mid_backup(
        driver,
        &mut run.host,
        events,
        LiveConformance::persisted,
        |link| relink(link, &socket),
    )
    .map(|driver| run.driver = Some(driver));
    run.finish(result);
}

#[test]
fn live_pull_on_the_daemons_server_is_refused_elsewhere_and_served_there() {
    LiveConformance::run("pull-on-running-server", |d, h, _| {
        scenarios::pull_on_the_running_server(d, h)
    });
}
