//! Stateful property test: job slots and busy disks against a reference model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use vbackup_core::error::ConflictError;
use vbackup_core::unstable::jobs::{JobKind, JobSlots};

#[derive(Debug, Clone, Default)]
struct Model {
    long: bool,
    short: Option<String>,
    busy: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
enum Op {
    AcquireLong,
    ReleaseLong,
    AcquireShort(String),
    ReleaseShort,
    Occupy(Vec<String>, String),
    Free(String),
}

const DISKS: &[&str] = &["vda", "vdb", "vdc"];
const JOBS: &[&str] = &["backup", "commit"];

struct Ref;

impl ReferenceStateMachine for Ref {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let disks = proptest::sample::subsequence(DISKS, 1..=3)
            .prop_map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>());
        let job = proptest::sample::select(JOBS).prop_map(str::to_owned);
        prop_oneof![
            Just(Op::AcquireLong),
            Just(Op::ReleaseLong),
            proptest::sample::select(&["c1", "c2"][..])
                .prop_map(|n| Op::AcquireShort(n.to_owned())),
            Just(Op::ReleaseShort),
            (disks, job.clone()).prop_map(|(d, j)| Op::Occupy(d, j)),
            job.prop_map(Op::Free),
        ]
        .boxed()
    }

    fn apply(mut s: Model, op: &Op) -> Model {
        match op {
            Op::AcquireLong => {
                if !s.long && s.short.is_none() {
                    s.long = true;
                }
            }
            Op::ReleaseLong => s.long = false,
            Op::AcquireShort(n) => {
                if s.short.is_none() {
                    s.short = Some(n.clone());
                }
            }
            Op::ReleaseShort => s.short = None,
            Op::Occupy(disks, job) => {
                if disks.iter().all(|d| !s.busy.contains_key(d)) {
                    for d in disks {
                        s.busy.insert(d.clone(), job.clone());
                    }
                }
            }
            Op::Free(job) => s.busy.retain(|_, j| j != job),
        }
        s
    }
}

struct SlotsTest;

impl StateMachineTest for SlotsTest {
    type SystemUnderTest = JobSlots;
    type Reference = Ref;

    fn init_test(_: &Model) -> JobSlots {
        JobSlots::new()
    }

    fn apply(mut sut: JobSlots, model: &Model, op: Op) -> JobSlots {
        match op {
            Op::AcquireLong => {
                let before = sut.long_job().cloned().or(sut.short_job().cloned());
                let r = sut.acquire_long(JobKind::Backup);
                match before {
                    Some(h) => assert_eq!(
                        r,
                        Err(ConflictError::DomainJob {
                            holder: h.to_string()
                        })
                    ),
                    None => assert_eq!(r, Ok(())),
                }
            }
            Op::ReleaseLong => sut.release_long(),
            Op::AcquireShort(n) => {
                let _ = sut.acquire_short(JobKind::CheckpointCreate(n));
            }
            Op::ReleaseShort => sut.release_short(),
            Op::Occupy(disks, job) => {
                let r = sut.occupy_disks(&disks, &job);
                if let Err(ConflictError::DiskBusy { disk, holder }) = &r {
                    assert_eq!(
                        model.busy.get(disk),
                        Some(holder),
                        "the refusal names the holder"
                    );
                }
            }
            Op::Free(job) => sut.free_disks_of(&job),
        }
        assert_eq!(sut.long_job().is_some(), model.long);
        assert_eq!(
            sut.short_job().map(|k| k.to_string()),
            model
                .short
                .as_ref()
                .map(|n| format!("checkpoint-create {n}"))
        );
        assert_eq!(sut.busy_disks(), &model.busy);
        sut
    }
}

prop_state_machine! {
    #[test]
    fn job_slots_match_reference_model(sequential 1..40 => SlotsTest);
}
