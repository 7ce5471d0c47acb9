//! The conformance scenarios of `vbackup_sim::scenarios` against real qemu-storage-daemon: the
//! same code that passes on the simulator (`sim/tests/conformance.rs`) drives the core over a
//! QMP socket to a daemon holding the lab domain on real qcow2 files, and checks the content of
//! every backup byte for byte.
//!
//! With `VBACKUP_RECORD_TRACES=1` each run also writes its QMP trace and its host log to
//! `testdata/traces/qsd-10/` (see the README there); `sim/tests/replay_live.rs` replays them
//! against the simulator in every test run.

mod conformance_support;

use conformance_support::{LiveConformance, relink};
use vbackup_sim::scenarios;

#[test]
fn live_checkpoints_create_delete_redefine_and_validate() {
    let Some(mut run) = LiveConformance::start("checkpoint-lifecycle") else {
        return;
    };
    let result = scenarios::checkpoint_lifecycle(run.parts().0);
    run.finish(result);
}

#[test]
fn live_push_full_then_incremental_restores_byte_for_byte() {
    let Some(mut run) = LiveConformance::start("push-full-then-incremental") else {
        return;
    };
    let (d, h) = run.parts();
    let result = scenarios::push_full_then_incremental(d, h, LiveConformance::events);
    run.finish(result);
}

#[test]
fn live_pull_exports_hold_their_point_in_time_under_guest_writes() {
    let Some(mut run) = LiveConformance::start("pull-point-in-time") else {
        return;
    };
    let (d, h) = run.parts();
    let result = scenarios::pull_point_in_time(d, h);
    run.finish(result);
}

#[test]
fn live_slowed_push_aborted_while_copying_ends_cancelled_and_the_next_completes() {
    let Some(mut run) = LiveConformance::start("push-abort-slowed") else {
        return;
    };
    let (d, h) = run.parts();
    let result = scenarios::push_abort(d, h, LiveConformance::events);
    run.finish(result);
}

#[test]
fn live_push_with_failing_target_ends_failed_and_the_next_completes() {
    let Some(mut run) = LiveConformance::start("push-io-error") else {
        return;
    };
    let (d, h) = run.parts();
    let result = scenarios::push_io_error(d, h, LiveConformance::events);
    run.finish(result);
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
        LiveConformance::events,
        LiveConformance::persisted,
        |link| relink(link, &socket),
    )
    .map(|driver| run.driver = Some(driver));
    run.finish(result);
}

#[test]
fn live_qemu_crash_loses_the_new_checkpoint_and_the_next_full_backup_works() {
    let Some(mut run) = LiveConformance::start("qemu-crash") else {
        return;
    };
    let socket = run.qmp_socket();
    let (d, h) = run.parts();
    let result =
        scenarios::qemu_crash_loses_new_checkpoint(d, h, LiveConformance::events, |link| {
            relink(link, &socket)
        });
    run.finish(result);
}
