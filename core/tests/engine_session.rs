//! The QMP session's negotiation: a `qmp_capabilities` that QEMU refuses or never answers is
//! sent again after a growing delay, so a domain waiting for a usable session always has a
//! deadline (the caller bounds how long it waits).

use vbackup_core::Domain;
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::{DomainConfig, Input, Output};
use vbackup_core::link::Timestamp;
use vbackup_core::qmp::QmpError;

mod engine_support;
use engine_support::lab_domain;

fn sent_names(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(_, cmd) => Some(cmd.name().to_owned()),
            _ => None,
        })
        .collect()
}

fn only_send(out: &[Output]) -> vbackup_core::link::CommandId {
    match out {
        [Output::Send(id, cmd)] if cmd.name() == "qmp_capabilities" => id.clone(),
        other => panic!("expected qmp_capabilities alone, got {other:?}"),
    }
}

#[test]
fn refused_negotiation_is_retried_after_a_delay_and_then_connects() {
    let mut d = Domain::new(
        lab_domain(),
        DomainConfig::default(),
        CheckpointTree::new(),
        None,
    );
    let t0 = Timestamp::from_ms(1_000);
    let id = only_send(&d.handle(t0, Input::Reconnected));
    let refused = QmpError::generic("Capabilities negotiation is already complete");
    assert!(d.handle(t0, Input::Reply(id, Err(refused))).is_empty());
    assert!(!d.view().connected);
    let due = d
        .next_deadline()
        .expect("a refused negotiation leaves a deadline behind");
    assert!(due > t0, "the retry waits: {due:?}");
    // Nothing is sent before the deadline.
    let early = Timestamp::from_ms(due.as_ms() - 1);
    assert!(sent_names(&d.handle(early, Input::Tick)).is_empty());
    let id = only_send(&d.handle(due, Input::Tick));
    let out = d.handle(due, Input::Reply(id, Ok(serde_json::json!({}))));
    assert_eq!(sent_names(&out), ["query-named-block-nodes"]);
    let Some(Output::Send(id, _)) = out.first() else {
        unreachable!()
    };
    d.handle(due, Input::Reply(id.clone(), Ok(serde_json::json!([]))));
    assert!(d.view().connected);
    assert_eq!(d.next_deadline(), None, "nothing is left to wait for");
}

#[test]
fn unanswered_negotiation_times_out_and_is_sent_again_with_growing_delays() {
    let config = DomainConfig::default();
    let timeout = config.command_timeout_ms;
    let mut d = Domain::new(lab_domain(), config, CheckpointTree::new(), None);
    let mut now = Timestamp::from_ms(0);
    only_send(&d.handle(now, Input::Reconnected));
    let mut delays = Vec::new();
    for _ in 0..4 {
        // The command times out at its deadline; the retry comes at the next one.
        let timed_out = d.next_deadline().expect("the command's timeout");
        assert_eq!(timed_out.as_ms(), now.as_ms() + timeout);
        assert!(d.handle(timed_out, Input::Tick).is_empty());
        let retry = d.next_deadline().expect("a retry is due");
        delays.push(retry.as_ms() - timed_out.as_ms());
        only_send(&d.handle(retry, Input::Tick));
        now = retry;
    }
    assert!(
        delays.windows(2).all(|w| w[0] <= w[1]),
        "the delays grow: {delays:?}"
    );
    assert!(!d.view().connected);
}
