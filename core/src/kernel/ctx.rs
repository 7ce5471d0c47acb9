//! The output sink every QMP-facing machine of a domain writes to: commands (with their
//! reply timers), file operations, store writes, answers and events, in order.

use std::collections::BTreeMap;

use super::state::{Owner, Pending, Timer};
use super::timers::TimerTable;
use crate::error::Error;
use crate::link::{CommandId, Timestamp};
use crate::protocol::{DomainEvent, FileOp, FileOpId, Output, Reply, RequestId, StoreOp};
use crate::qmp::QmpCommand;

/// A domain's traffic bookkeeping: id counters, the commands waiting for a reply, and the
/// domain's one timer table.
#[derive(Debug, Default)]
pub(crate) struct Wire {
    next_command: u64,
    next_file_op: u64,
    pending: BTreeMap<CommandId, Pending>,
    timers: TimerTable<Timer>,
}

impl Wire {
    /// The earliest armed timer.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    /// The domain's timers (read-only).
    pub fn timers(&self) -> &TimerTable<Timer> {
        &self.timers
    }

    /// Disarms every timer `keep` rejects.
    pub fn retain_timers(&mut self, keep: impl FnMut(&Timer) -> bool) {
        self.timers.retain(keep);
    }
}

/// Sends and answers on behalf of an operation.
pub(crate) struct Ctx<'a> {
    pub now: Timestamp,
    out: &'a mut Vec<Output>,
    wire: &'a mut Wire,
    command_timeout_ms: u64,
}

impl<'a> Ctx<'a> {
    /// A sink for one call of `handle` at `now`.
    pub fn new(
        now: Timestamp,
        out: &'a mut Vec<Output>,
        wire: &'a mut Wire,
        command_timeout_ms: u64,
    ) -> Self {
        Self {
            now,
            out,
            wire,
            command_timeout_ms,
        }
    }
}

impl Ctx<'_> {
    /// Sends a command on behalf of `owner` and returns its id; its reply is overdue after the
    /// command timeout.
    pub fn send(&mut self, owner: Owner, command: QmpCommand) -> CommandId {
        self.wire.next_command += 1;
        let id = CommandId::Number(self.wire.next_command);
        self.wire.pending.insert(
            id.clone(),
            Pending {
                owner,
                name: command.name().to_owned(),
            },
        );
        self.wire.timers.set(
            Timer::Reply(id.clone()),
            self.now.plus_ms(self.command_timeout_ms),
        );
        self.out.push(Output::Send(id.clone(), command));
        id
    }

    /// The command `id` is answered (or given up): who waited for it, if anyone still does.
    pub fn take_pending(&mut self, id: &CommandId) -> Option<Pending> {
        self.wire.timers.clear(&Timer::Reply(id.clone()));
        self.wire.pending.remove(id)
    }

    /// Forgets every command in flight (the session is gone) and returns who waited, in
    /// command order.
    pub fn drop_pending(&mut self) -> Vec<Pending> {
        self.wire.timers.retain(|t| !matches!(t, Timer::Reply(_)));
        std::mem::take(&mut self.wire.pending)
            .into_values()
            .collect()
    }

    /// The command timeout, in milliseconds.
    pub fn command_timeout_ms(&self) -> u64 {
        self.command_timeout_ms
    }

    /// The domain's timers (read-only).
    pub fn timers(&self) -> &TimerTable<Timer> {
        &self.wire.timers
    }

    /// Arms a timer to expire `delay_ms` from now.
    pub fn set_timer_in(&mut self, timer: Timer, delay_ms: u64) {
        let at = self.now.plus_ms(delay_ms);
        self.wire.timers.set(timer, at);
    }

    /// Disarms a timer.
    pub fn clear_timer(&mut self, timer: &Timer) {
        self.wire.timers.clear(timer);
    }

    /// Disarms every timer `keep` rejects.
    pub fn retain_timers(&mut self, keep: impl FnMut(&Timer) -> bool) {
        self.wire.timers.retain(keep);
    }

    /// Whether `timer` is armed and due now, without disarming it.
    pub fn is_due(&self, timer: &Timer) -> bool {
        self.wire.timers.get(timer).is_some_and(|at| at <= self.now)
    }

    /// Whether any timer `pick` selects is due now.
    pub fn any_due(&self, pick: impl FnMut(&Timer) -> bool) -> bool {
        self.wire.timers.any_expired(self.now, pick)
    }

    /// Disarms `timer` and returns true if it was due now; leaves it armed otherwise.
    pub fn take_due(&mut self, timer: &Timer) -> bool {
        if self.is_due(timer) {
            self.wire.timers.clear(timer);
            true
        } else {
            false
        }
    }

    /// Disarms and returns, in key order, the due timers `pick` selects.
    pub fn take_due_where(&mut self, pick: impl FnMut(&Timer) -> bool) -> Vec<Timer> {
        self.wire.timers.take_expired_where(self.now, pick)
    }

    /// Asks the driver for a file operation.
    pub fn file(&mut self, op: FileOp) -> FileOpId {
        self.wire.next_file_op += 1;
        let id = FileOpId(self.wire.next_file_op);
        self.out.push(Output::File(id, op));
        id
    }

    /// Persists the set of pending checkpoint creations.
    pub fn persist_pending(&mut self, pending: &std::collections::BTreeSet<String>) {
        self.persist(StoreOp::SetPendingCheckpoints(
            pending.iter().cloned().collect(),
        ));
    }

    /// Emits a store operation.
    pub fn persist(&mut self, op: StoreOp) {
        self.out.push(Output::Persist(op));
    }

    /// Answers a request.
    pub fn respond(&mut self, req: RequestId, result: Result<Reply, Error>) {
        self.out.push(Output::Respond(req, result));
    }

    /// Emits an event.
    pub fn emit(&mut self, event: DomainEvent) {
        self.out.push(Output::Emit(event));
    }
}
