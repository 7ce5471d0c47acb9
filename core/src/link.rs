//! Where QMP goes: the [`Link`] trait the driver loop talks through, the time and id types it
//! shares with the state machine, and [`ReplayLink`], which plays a recorded trace.
//!
//! Contract: a link carries QMP commands out and delivers what arrives (greeting, replies,
//! events) one message at a time. It never interprets the traffic; matching replies to commands
//! by [`CommandId`] is the state machine's job. Links own the clock the driver reads (`now`), so
//! a simulated link can jump virtual time and a replay needs no clock at all.

mod replay;

pub use replay::{NameMap, ReplayLink};

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::qmp::{DecodeError, QmpCommand, QmpIn};
use crate::trace::TraceEntry;

/// A point in time in milliseconds on the driver's clock (wall clock, virtual clock or replay
/// clock). Only differences between timestamps of one clock are meaningful.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The clock's origin.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The timestamp `ms` milliseconds after the origin.
    pub const fn from_ms(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the origin.
    pub const fn as_ms(self) -> u64 {
        self.0
    }

    /// This timestamp plus `ms` milliseconds, saturating at the end of time.
    pub const fn plus_ms(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn ms_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// The `id` of a QMP command, echoed by QEMU in the reply. QMP allows any JSON value; the core
/// numbers its commands from a counter ([`CommandId::Number`]), and recorded libvirt traffic uses
/// strings such as `"libvirt-42"` ([`CommandId::Text`]). Both survive a round trip unchanged.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandId {
    /// A numeric id (the core's own, from a counter).
    Number(u64),
    /// A textual id.
    Text(String),
}

impl From<u64> for CommandId {
    fn from(n: u64) -> Self {
        CommandId::Number(n)
    }
}

impl From<&str> for CommandId {
    fn from(text: &str) -> Self {
        CommandId::Text(text.to_owned())
    }
}

impl From<String> for CommandId {
    fn from(text: String) -> Self {
        CommandId::Text(text)
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandId::Number(n) => write!(f, "{n}"),
            CommandId::Text(text) => f.write_str(text),
        }
    }
}

/// Why a link could not send or receive.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the connection (or a replayed trace has nothing more to deliver).
    #[error("QMP connection closed")]
    Closed,
    /// The transport failed (socket error, process gone); the text comes from the transport.
    #[error("QMP transport failed: {0}")]
    Io(String),
    /// Bytes arrived that are not a QMP message.
    #[error("undecodable QMP message: {0}")]
    Decode(#[from] DecodeError),
    /// A replay saw a command that differs from the recording. `line` is the 1-based line of the
    /// trace holding `expected`, or one past the last line when the recording had ended.
    #[error("replay diverged at trace line {line}: expected {}, got {}", describe(.expected.as_deref()), got.encode(None))]
    Diverged {
        /// 1-based trace line of the recorded command (after name normalization).
        line: usize,
        /// The recorded command, or `None` when the recording had no more commands.
        expected: Option<Box<QmpCommand>>,
        /// The command that was sent instead.
        got: Box<QmpCommand>,
    },
    /// A replay was asked to wait without a deadline, but the next recorded message only arrives
    /// after a command that has not been sent: waiting would never end.
    #[error("replay would wait forever at trace line {line}: the recording sends {} first", waiting_for.encode(None))]
    Stalled {
        /// 1-based trace line of the command the recording sends next.
        line: usize,
        /// That command (after name normalization).
        waiting_for: Box<QmpCommand>,
    },
}

fn describe(expected: Option<&QmpCommand>) -> String {
    match expected {
        Some(cmd) => cmd.encode(None),
        None => "the end of the recording".to_owned(),
    }
}

/// Where QMP goes: a simulated QEMU, a real socket, a recorded trace, or a recorder around any of
/// them. The driver loop is written once against this trait.
pub trait Link {
    /// The current time on this link's clock.
    fn now(&self) -> Timestamp;

    /// Sends one command tagged with `id`.
    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError>;

    /// Waits for the next incoming message until `deadline` (forever when `None`). Returns
    /// `Ok(None)` when the deadline passed with nothing received; the link's clock then reads at
    /// least `deadline`.
    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError>;
}

impl<L: Link + ?Sized> Link for Box<L> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        (**self).send(id, cmd)
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        (**self).recv(deadline)
    }
}

impl<L: Link + ?Sized> Link for &mut L {
    fn now(&self) -> Timestamp {
        (**self).now()
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        (**self).send(id, cmd)
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        (**self).recv(deadline)
    }
}

/// Wraps a link and keeps every message that passes through it, in order, as trace entries:
/// commands when they were sent successfully, and everything received. The driver (or a test)
/// writes them out with [`crate::trace::format`]; two runs of a deterministic scenario give
/// identical traces.
#[derive(Clone, Debug)]
pub struct Recorder<L> {
    inner: L,
    entries: Vec<TraceEntry>,
}

impl<L: Link> Recorder<L> {
    /// Starts recording around `inner`.
    pub fn new(inner: L) -> Self {
        Recorder {
            inner,
            entries: Vec::new(),
        }
    }

    /// The messages recorded so far.
    pub fn entries(&self) -> &[TraceEntry] {
        &self.entries
    }

    /// Takes the messages recorded so far, leaving the recording empty.
    pub fn take_entries(&mut self) -> Vec<TraceEntry> {
        std::mem::take(&mut self.entries)
    }

    /// The wrapped link.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Ends recording: the wrapped link and the recorded messages.
    pub fn into_parts(self) -> (L, Vec<TraceEntry>) {
        (self.inner, self.entries)
    }
}

impl<L: Link> Link for Recorder<L> {
    fn now(&self) -> Timestamp {
        self.inner.now()
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        self.inner.send(id.clone(), cmd)?;
        self.entries.push(TraceEntry::Send {
            id: Some(id),
            command: cmd.clone(),
        });
        Ok(())
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        let message = self.inner.recv(deadline)?;
        if let Some(message) = &message {
            self.entries.push(TraceEntry::Recv(message.clone()));
        }
        Ok(message)
    }
}
