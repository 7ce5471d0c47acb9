//! The one driver loop: feeds requests and whatever a [`Link`] receives into
//! [`Domain::handle`], and carries out every [`Output`].
//!
//! Contract: the driver adds no policy. It sends what the domain says to send, in order, hands
//! store and file operations to an [`Effects`] implementation, and keeps the answers to requests
//! until the caller collects them. The same loop runs over the simulator, a real QEMU and a
//! replayed trace; only the [`Link`] and the [`Effects`] differ. The driver itself does no IO
//! beyond what those two do.

use std::collections::{BTreeMap, VecDeque};

use crate::Domain;
use crate::domain::{
    DomainEvent, FileError, FileErrorKind, FileOp, Input, Output, Reply, Request, RequestId,
    StoreOp,
};
use crate::error::Error;
use crate::link::{Link, LinkError, Timestamp};
use crate::qmp::QmpIn;

/// Where the driver carries out what is not QMP: metadata, image files, events.
pub trait Effects {
    /// Applies a metadata change atomically. An error stops the driver: what QEMU already did is
    /// repaired by the next reconcile, never silently forgotten.
    fn persist(&mut self, op: &StoreOp) -> Result<(), String>;

    /// Carries out a file operation on the host where QEMU runs; the outcome goes back to the
    /// domain as [`Input::FileDone`].
    fn file(&mut self, op: &FileOp) -> Result<(), FileError>;

    /// Observes a domain event (progress displays, logs, the JOB_COMPLETED notification).
    fn event(&mut self, event: &DomainEvent);
}

/// Why the driver stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The link failed; the domain has been told ([`Input::LinkDown`]).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The store refused a write.
    #[error("store write failed: {0}")]
    Store(String),
    /// The request's answer did not come within the step budget (a bug or a stuck peer).
    #[error("no answer to request {0:?} after {1} steps")]
    NoAnswer(RequestId, usize),
}

/// Drives one domain over one link.
#[derive(Debug)]
pub struct Driver<L, E> {
    domain: Domain,
    link: L,
    effects: E,
    next_request: u64,
    answers: BTreeMap<RequestId, Result<Reply, Error>>,
    inputs: VecDeque<Input>,
}

impl<L: Link, E: Effects> Driver<L, E> {
    /// A driver for `domain` over `link`. Call [`Driver::connected`] once the link has a fresh
    /// QMP session, so the domain negotiates and reconciles.
    pub fn new(domain: Domain, link: L, effects: E) -> Self {
        Self {
            domain,
            link,
            effects,
            next_request: 0,
            answers: BTreeMap::new(),
            inputs: VecDeque::new(),
        }
    }

    /// The domain, for reading its view.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The link.
    pub fn link(&self) -> &L {
        &self.link
    }

    /// The link, mutably (for guest writes in the simulator, fault injection, tests).
    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// The effects.
    pub fn effects(&self) -> &E {
        &self.effects
    }

    /// The effects, mutably.
    pub fn effects_mut(&mut self) -> &mut E {
        &mut self.effects
    }

    /// Takes the parts back.
    pub fn into_parts(self) -> (Domain, L, E) {
        (self.domain, self.link, self.effects)
    }

    /// Tells the domain a fresh QMP session is open.
    pub fn connected(&mut self) -> Result<(), DriveError> {
        self.feed(Input::Reconnected)
    }

    /// Submits a request and returns its id; the answer arrives through [`Driver::answer`].
    pub fn submit(&mut self, request: Request) -> Result<RequestId, DriveError> {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.feed(Input::Request(id, request))?;
        Ok(id)
    }

    /// Takes the answer to a request if it has arrived.
    pub fn answer(&mut self, id: RequestId) -> Option<Result<Reply, Error>> {
        self.answers.remove(&id)
    }

    /// Submits a request and drives until it is answered, at most `max_steps` receive steps.
    pub fn call(
        &mut self,
        request: Request,
        max_steps: usize,
    ) -> Result<Result<Reply, Error>, DriveError> {
        let id = self.submit(request)?;
        self.wait(id, max_steps)
    }

    /// Drives until request `id` is answered, at most `max_steps` receive steps.
    pub fn wait(
        &mut self,
        id: RequestId,
        max_steps: usize,
    ) -> Result<Result<Reply, Error>, DriveError> {
        for _ in 0..max_steps {
            if let Some(answer) = self.answers.remove(&id) {
                return Ok(answer);
            }
            self.step(None)?;
        }
        self.answers
            .remove(&id)
            .ok_or(DriveError::NoAnswer(id, max_steps))
    }

    /// Drives until `done` holds for the domain, at most `max_steps` receive steps. Returns
    /// whether it held.
    pub fn run_until(
        &mut self,
        mut done: impl FnMut(&Domain) -> bool,
        max_steps: usize,
    ) -> Result<bool, DriveError> {
        for _ in 0..max_steps {
            if done(&self.domain) {
                return Ok(true);
            }
            self.step(None)?;
        }
        Ok(done(&self.domain))
    }

    /// Receives one message (or a timeout) and feeds it. `wait_until` bounds the wait further
    /// than the domain's own deadline; reaching either one feeds a [`Input::Tick`].
    pub fn step(&mut self, wait_until: Option<Timestamp>) -> Result<(), DriveError> {
        let deadline = match (self.domain.next_deadline(), wait_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let input = match self.link.recv(deadline) {
            Ok(Some(QmpIn::Greeting(_))) => Input::Reconnected,
            Ok(Some(QmpIn::Reply {
                id: Some(id),
                result,
            })) => Input::Reply(id, result),
            // A reply without an id answers nothing the domain sent: drop it.
            Ok(Some(QmpIn::Reply { id: None, .. })) => return Ok(()),
            Ok(Some(QmpIn::Event(event))) => Input::Event(event),
            Ok(None) => Input::Tick,
            Err(err) => {
                self.link_down()?;
                return Err(err.into());
            }
        };
        self.feed(input)
    }

    /// Tells the domain the link is gone (outstanding commands will never be answered).
    pub fn link_down(&mut self) -> Result<(), DriveError> {
        self.feed(Input::LinkDown)
    }

    /// Feeds one input and carries out every output, including the inputs those outputs produce
    /// (file operations answer at once).
    pub fn feed(&mut self, input: Input) -> Result<(), DriveError> {
        self.inputs.push_back(input);
        while let Some(input) = self.inputs.pop_front() {
            let now = self.link.now();
            let outputs = self.domain.handle(now, input);
            self.carry_out(outputs)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, outputs: Vec<Output>) -> Result<(), DriveError> {
        for output in outputs {
            match output {
                Output::Send(id, command) => {
                    if let Err(err) = self.link.send(id, &command) {
                        self.inputs.clear();
                        self.inputs.push_back(Input::LinkDown);
                        while let Some(input) = self.inputs.pop_front() {
                            let now = self.link.now();
                            let outputs = self.domain.handle(now, input);
                            self.record_answers(outputs);
                        }
                        return Err(err.into());
                    }
                }
                Output::Persist(op) => self.effects.persist(&op).map_err(DriveError::Store)?,
                Output::File(id, op) => {
                    let result = self.effects.file(&op);
                    self.inputs.push_back(Input::FileDone(id, result));
                }
                Output::Respond(id, answer) => {
                    self.answers.insert(id, answer);
                }
                Output::Emit(event) => self.effects.event(&event),
            }
        }
        Ok(())
    }

    /// After the link failed, keeps only what needs no link: answers and events.
    fn record_answers(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Respond(id, answer) => {
                    self.answers.insert(id, answer);
                }
                Output::Emit(event) => self.effects.event(&event),
                Output::Persist(op) => {
                    // Best effort: the link is already gone, and the error that stops the
                    // driver is the link's.
                    let _ = self.effects.persist(&op);
                }
                Output::Send(..) | Output::File(..) => {}
            }
        }
    }
}

/// Effects that keep everything in memory: for tests, replay and the simulator.
#[derive(Debug, Default, Clone)]
pub struct MemoryEffects {
    /// Every store operation, in order.
    pub persisted: Vec<StoreOp>,
    /// Every file operation, in order.
    pub files: Vec<FileOp>,
    /// Every event, in order.
    pub events: Vec<DomainEvent>,
    /// Paths that exist (created exclusively, not yet removed).
    pub existing: std::collections::BTreeSet<String>,
}

impl Effects for MemoryEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        self.persisted.push(op.clone());
        Ok(())
    }

    fn file(&mut self, op: &FileOp) -> Result<(), FileError> {
        self.files.push(op.clone());
        match op {
            FileOp::CreateExclusive { path } => {
                if self.existing.insert(path.clone()) {
                    Ok(())
                } else {
                    Err(FileError::new(
                        FileErrorKind::AlreadyExists,
                        path,
                        format!("file '{path}' exists"),
                    ))
                }
            }
            FileOp::Remove { path } => {
                self.existing.remove(path);
                Ok(())
            }
            // Nothing in memory is ever unwritten.
            FileOp::Sync { .. } => Ok(()),
        }
    }

    fn event(&mut self, event: &DomainEvent) {
        self.events.push(event.clone());
    }
}
