//! The in-step contract: a session the host vouches for (`Domain::trusting_qemu`) skips its
//! reconcile pass unless pending checkpoints ask for one, and the view tells when QEMU is known
//! to hold exactly what the store describes.

mod engine_support;

use engine_support::*;
use vbackup_core::checkpoint::CheckpointTree;
use vbackup_core::domain::{Domain, DomainConfig, Input, Reply, Request};

const QUERY: &str = "query-named-block-nodes";

fn harness(trusted: bool, pending: &[&str]) -> Harness {
    let def = lab_domain();
    let peer = Peer::for_domain(&def, &lab_sizes());
    let mut h = Harness::new(def.clone(), peer, CheckpointTree::new());
    let mut domain = Domain::new(def, DomainConfig::default(), CheckpointTree::new(), None)
        .with_pending_checkpoints(pending.iter().map(|s| s.to_string()));
    if trusted {
        domain = domain.trusting_qemu();
    }
    h.domain = domain;
    h
}

fn create(h: &mut Harness, name: &str) -> u64 {
    h.request(Request::CheckpointCreate {
        checkpoint: checkpoint(name, &["vda", "vdb"]),
        quiesce: false,
    })
}

#[test]
fn a_trusted_session_skips_the_node_query_and_is_in_step_at_once() {
    let mut h = harness(true, &[]);
    assert!(!h.domain.view().in_step, "no session yet");
    h.feed(Input::Reconnected);
    let t = h.transcript();
    assert!(t.contains("qmp_capabilities"), "{t}");
    assert!(!t.contains(QUERY), "{t}");
    assert!(h.domain.view().connected);
    assert!(h.domain.view().in_step);
    // A checkpoint created on it keeps it in step.
    let id = create(&mut h, "c1");
    assert!(
        matches!(h.answer(id), Some(Ok(Reply::Checkpoint(_)))),
        "{:?}",
        h.answer(id)
    );
    assert!(h.domain.view().in_step);
}

#[test]
fn an_untrusted_session_is_in_step_only_after_its_reconcile_pass() {
    let mut h = harness(false, &[]);
    h.feed(Input::Reconnected);
    assert!(h.transcript().contains(QUERY));
    assert!(h.domain.view().in_step);
}

#[test]
fn pending_checkpoints_make_a_trusted_session_reconcile() {
    let mut h = harness(true, &["c9"]);
    h.feed(Input::Reconnected);
    assert!(h.transcript().contains(QUERY), "{}", h.transcript());
    assert!(
        h.domain.view().in_step,
        "the pass cleared the pending record"
    );
}

#[test]
fn trust_is_used_up_by_the_first_session() {
    let mut h = harness(true, &[]);
    h.feed(Input::Reconnected);
    h.feed(Input::LinkDown);
    assert!(!h.domain.view().in_step, "a lost session knows nothing");
    h.lines.clear();
    h.feed(Input::Reconnected);
    assert!(h.transcript().contains(QUERY), "{}", h.transcript());
}

#[test]
fn a_refused_command_puts_the_domain_out_of_step_until_a_clean_pass() {
    let mut h = harness(true, &[]);
    h.feed(Input::Reconnected);
    h.peer.fail_next("transaction", "Bitmap already exists: c1");
    let id = create(&mut h, "c1");
    assert!(matches!(h.answer(id), Some(Err(_))), "{:?}", h.answer(id));
    assert!(!h.domain.view().in_step);
    // Still out of step after later commands succeed: only a clean pass restores it.
    let id = create(&mut h, "c2");
    assert!(matches!(h.answer(id), Some(Ok(_))), "{:?}", h.answer(id));
    assert!(!h.domain.view().in_step);
    h.feed(Input::Reconnected);
    assert!(h.domain.view().in_step);
}
