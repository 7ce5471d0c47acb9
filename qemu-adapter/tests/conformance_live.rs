//! The conformance scenarios of `vbackup_sim::scenarios` against real qemu-storage-daemon: the
//! same code that passes on the simulator (`sim/tests/conformance.rs`) drives the core over a
//! QMP socket to a daemon holding the lab domain on real qcow2 files, and checks the content of
//! every backup byte for byte.
//!
//! With `VBACKUP_RECORD_TRACES=1` each run also writes its QMP trace and its host log to
//! `testdata/traces/qsd-10/` (see the README there); `sim/tests/replay_live.rs` replays them
//! against the simulator in every test run.

mod conformance_support;

use conformance_support::LiveConformance;
use vbackup_sim::scenarios;

#[test]
fn live_checkpoints_create_delete_redefine_and_validate() {
    let Some(mut run) = LiveConformance::start("checkpoint-lifecycle") else {
        return;
    };
    let result = scenarios::checkpoint_lifecycle(&mut run.driver);
    run.finish(result);
}

#[test]
fn live_push_full_then_incremental_restores_byte_for_byte() {
    let Some(mut run) = LiveConformance::start("push-full-then-incremental") else {
        return;
    };
    let result = scenarios::push_full_then_incremental(
        &mut run.driver,
        &mut run.host,
        LiveConformance::events,
    );
    run.finish(result);
}

#[test]
fn live_pull_exports_hold_their_point_in_time_under_guest_writes() {
    let Some(mut run) = LiveConformance::start("pull-point-in-time") else {
        return;
    };
    let result = scenarios::pull_point_in_time(&mut run.driver, &mut run.host);
    run.finish(result);
}

#[test]
fn live_slowed_push_aborted_while_copying_ends_cancelled_and_the_next_completes() {
    let Some(mut run) = LiveConformance::start("push-abort-slowed") else {
        return;
    };
    let result = scenarios::push_abort(&mut run.driver, &mut run.host, LiveConformance::events);
    run.finish(result);
}

#[test]
fn live_push_with_failing_target_ends_failed_and_the_next_completes() {
    let Some(mut run) = LiveConformance::start("push-io-error") else {
        return;
    };
    let result = scenarios::push_io_error(&mut run.driver, &mut run.host, LiveConformance::events);
    run.finish(result);
}
