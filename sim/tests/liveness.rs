//! The liveness phase of seeded histories has teeth: a peer that withholds what the engine
//! waits for (a stall, armed when faults stop) is either outlived by the engine's deadlines or
//! reported as a backup that never ends, with what it was waiting for. And a backup whose job
//! end was missed is ended by the next statistics poll.

use vbackup_core::backup::{BackupMode, DomainJobStatus};
use vbackup_core::domain::{DomainEvent, Reply, Request};
use vbackup_core::link::Link;
use vbackup_sim::world::link::Stall;
use vbackup_sim::world::{HistoryConfig, lab_backup, lab_driver, liveness_bound_ms, run_history};

fn stalled(seed: u64, stall: Stall) -> HistoryConfig {
    HistoryConfig {
        stall: Some(stall),
        ..HistoryConfig::seed(seed)
    }
}

#[test]
fn sweep_liveness_phase_reports_a_backup_that_never_ends() {
    // Withholding every backup job event from the moment faults stop: the engine never hears
    // that a job ended (the class of the zero-work push that hung `--wait`).
    let out = run_history(&stalled(1, Stall::JobEvents));
    let failure = out.failure.expect("a stalled backup is reported");
    let line = failure.to_string();
    assert!(failure.what.starts_with("liveness: "), "{line}");
    assert!(failure.what.contains("backup begun at"), "{line}");
    assert!(failure.what.contains("did not end within 92 s"), "{line}");
    assert!(
        failure
            .what
            .contains("waits for the end of block jobs backup-"),
        "{line}"
    );
    // The one line reproduces it, stall included.
    assert!(
        line.starts_with("SIM_SEED=1 SIM_STALL=job-events cargo test"),
        "{line}"
    );
    assert!(out.stats.withheld > 0, "{:?}", out.stats);
}

#[test]
fn sweep_liveness_phase_catches_most_seeds_when_job_events_are_withheld() {
    let seeds = if cfg!(debug_assertions) { 0..10 } else { 0..50 };
    let n = seeds.end - seeds.start;
    let caught = seeds
        .filter(|s| {
            run_history(&stalled(*s, Stall::JobEvents))
                .failure
                .is_some_and(|f| f.what.starts_with("liveness: "))
        })
        .count() as u64;
    // A seed escapes only when no backup runs in either settle of the liveness phase.
    assert!(caught * 2 >= n, "only {caught} of {n} stalled seeds caught");
}

#[test]
fn engine_outlives_a_withheld_reply_by_its_command_timeout() {
    let seeds = if cfg!(debug_assertions) { 0..5 } else { 0..30 };
    let mut withheld = 0;
    let mut slowest_ms = 0;
    for seed in seeds {
        for command in [
            "query-jobs",
            "job-dismiss",
            "block-job-cancel",
            "blockdev-del",
        ] {
            let out = run_history(&stalled(seed, Stall::Reply(command.into())));
            assert!(out.failure.is_none(), "{}", out.failure.unwrap());
            withheld += out.stats.withheld;
            slowest_ms = slowest_ms.max(out.stats.settle_ms_max);
        }
    }
    // The stall did strike, and the engine waited for its command timeout (60 s of virtual
    // time), inside the bound.
    assert!(withheld > 0);
    assert!(
        (60_000..=liveness_bound_ms()).contains(&slowest_ms),
        "{slowest_ms}"
    );
}

/// Regression (seed 135, found by the liveness phase): a pull backup's fleecing job failed
/// while QEMU refused the `query-jobs` checking its end. The check was never tried again, so
/// the disk counted as running forever and the backup never ended after its abort.
#[test]
fn refused_end_check_is_tried_again_without_another_abort() {
    let out = run_history(&HistoryConfig::seed(135));
    assert!(out.failure.is_none(), "{}", out.failure.unwrap());
}

#[test]
fn stats_poll_ends_a_backup_whose_job_end_event_was_missed() {
    let (mut d, _qemu) = lab_driver();
    d.run_until(|dom| dom.view().connected, 10)
        .expect("connects");
    d.link_mut().set_stall(Stall::JobEvents);
    let begun = d
        .call(
            Request::BackupBegin {
                spec: lab_backup(BackupMode::Push, None, "/backup/full"),
                checkpoint: None,
                reuse_external: false,
            },
            1_000,
        )
        .expect("driven");
    assert!(begun.is_ok(), "{begun:?}");
    // Long past the copy (1 MiB at 32 MiB/s): the jobs concluded, unheard.
    let until = d.link().now().plus_ms(10_000);
    while d.link().now() < until {
        d.step(Some(until)).expect("steps");
    }
    assert!(
        d.domain().view().backup.is_some(),
        "nothing told the engine"
    );
    assert!(
        d.domain()
            .backup_waiting_for()
            .is_some_and(|w| w.starts_with("the end of block jobs backup-")),
        "{:?}",
        d.domain().backup_waiting_for()
    );
    // `--wait` polls statistics: the poll shows the concluded jobs and their ends are checked.
    let stats = d
        .call(
            Request::JobStats {
                completed: false,
                keep_completed: true,
            },
            1_000,
        )
        .expect("driven");
    let Ok(Reply::Stats(Some(stats))) = stats else {
        panic!("{stats:?}");
    };
    assert!(
        stats
            .waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("backup-vda")),
        "{stats:?}"
    );
    let ended = d
        .run_until(|dom| dom.view().backup.is_none(), 1_000)
        .expect("driven");
    assert!(ended, "{:?}", d.domain().backup_waiting_for());
    let completed = d.effects().memory.events.iter().any(
        |e| matches!(e, DomainEvent::JobCompleted(s) if s.status == DomainJobStatus::Completed),
    );
    assert!(completed, "{:?}", d.effects().memory.events);
}

/// Regression (found on a real VM: `backup-begin --wait` never returned after its backup
/// completed): a statistics request whose `query-jobs` was sent while the backup's last
/// cleanup reply was on its way was dropped when that reply ended the backup first.
#[test]
fn stats_request_sent_at_any_moment_of_a_backup_is_answered() {
    let (mut d, _qemu) = lab_driver();
    d.run_until(|dom| dom.view().connected, 10)
        .expect("connects");
    d.submit(Request::BackupBegin {
        spec: lab_backup(BackupMode::Push, None, "/backup/full"),
        checkpoint: None,
        reuse_external: false,
    })
    .expect("submitted");
    let mut polls = Vec::new();
    for _ in 0..10_000 {
        if d.domain().view().backup.is_none() {
            break;
        }
        // Whenever messages wait to be read, a client polls (as `--wait` does every second).
        if d.domain().view().backup.is_some() && d.link().has_queued() {
            polls.push(
                d.submit(Request::JobStats {
                    completed: false,
                    keep_completed: true,
                })
                .expect("submitted"),
            );
        }
        let until = d.link().now().plus_ms(100);
        d.step(Some(until)).expect("steps");
    }
    assert!(d.domain().view().backup.is_none(), "the backup ended");
    // Replies still on their way are read.
    for _ in 0..1_000 {
        if !d.link().has_queued() {
            break;
        }
        let until = d.link().now().plus_ms(100);
        d.step(Some(until)).expect("steps");
    }
    assert!(polls.len() > 5, "{polls:?}");
    let unanswered: Vec<_> = polls.iter().filter(|id| d.answer(**id).is_none()).collect();
    assert!(unanswered.is_empty(), "never answered: {unanswered:?}");
}
