//! The QMP trace format: JSON Lines, one `{"dir":"send"|"recv","msg":{...}}` per line. `send`
//! is a command (with its id), `recv` a greeting, reply or event, in the order the client saw
//! them. The recordings in `testdata/traces/` use this format, and so do traces the driver
//! writes. Pure: this module reads and writes text, never files.

use serde_json::Value;

use crate::link::CommandId;
use crate::qmp::{DecodeError, QmpCommand, QmpIn};

/// Direction of a trace line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Client to QEMU.
    Send,
    /// QEMU to client.
    Recv,
}

impl Direction {
    /// The spelling in the trace (`send`, `recv`).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Recv => "recv",
        }
    }
}

/// One message of a trace, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEntry {
    /// A command sent, with its id.
    Send {
        /// The command's id, if it had one.
        id: Option<CommandId>,
        /// The command.
        command: QmpCommand,
    },
    /// A message received.
    Recv(QmpIn),
}

impl TraceEntry {
    /// The entry's direction.
    pub fn direction(&self) -> Direction {
        match self {
            TraceEntry::Send { .. } => Direction::Send,
            TraceEntry::Recv(_) => Direction::Recv,
        }
    }

    /// The message as a JSON value (the `msg` member).
    pub fn message(&self) -> Value {
        match self {
            TraceEntry::Send { id, command } => command.to_wire(id.as_ref()),
            TraceEntry::Recv(message) => message.to_value(),
        }
    }

    /// Decodes an entry from its direction and message.
    pub fn from_message(dir: Direction, msg: Value) -> Result<Self, DecodeError> {
        match dir {
            Direction::Send => {
                let (id, command) = QmpCommand::from_wire(msg)?;
                Ok(TraceEntry::Send { id, command })
            }
            Direction::Recv => Ok(TraceEntry::Recv(QmpIn::from_value(msg)?)),
        }
    }

    /// The trace line of this entry: compact JSON, `dir` first, without a line terminator.
    pub fn to_line(&self) -> String {
        let msg = match self {
            TraceEntry::Send { id, command } => command.encode(id.as_ref()),
            TraceEntry::Recv(message) => message.encode(),
        };
        format!(
            "{{\"dir\":\"{}\",\"msg\":{msg}}}",
            self.direction().as_str()
        )
    }
}

/// A trace line before typed decoding: the direction and the raw message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTraceLine {
    /// 1-based line number in the trace text.
    pub line: usize,
    /// Direction.
    pub dir: Direction,
    /// The message, verbatim.
    pub msg: Value,
}

/// A typed trace line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceLine {
    /// 1-based line number in the trace text.
    pub line: usize,
    /// The message.
    pub entry: TraceEntry,
}

/// A trace line that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("trace line {line}: {error}")]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub error: DecodeError,
}

/// Reads trace text into raw lines; blank lines are skipped (line numbers still count them).
pub fn parse_raw(text: &str) -> Result<Vec<RawTraceLine>, TraceError> {
    let mut lines = Vec::new();
    for (index, text) in text.lines().enumerate() {
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        let fail = |error| TraceError { line, error };
        let value: Value =
            serde_json::from_str(text).map_err(|err| fail(DecodeError::from_json(&err)))?;
        let Value::Object(mut map) = value else {
            return Err(fail(DecodeError::NotAnObject));
        };
        let dir = match map.remove("dir") {
            Some(Value::String(dir)) if dir == "send" => Direction::Send,
            Some(Value::String(dir)) if dir == "recv" => Direction::Recv,
            other => {
                return Err(fail(DecodeError::invalid(
                    "trace line",
                    format!("'dir' must be \"send\" or \"recv\", got {other:?}"),
                )));
            }
        };
        let Some(msg) = map.remove("msg") else {
            return Err(fail(DecodeError::invalid("trace line", "missing 'msg'")));
        };
        lines.push(RawTraceLine { line, dir, msg });
    }
    Ok(lines)
}

/// Reads trace text into typed lines.
pub fn parse(text: &str) -> Result<Vec<TraceLine>, TraceError> {
    parse_raw(text)?
        .into_iter()
        .map(|raw| {
            TraceEntry::from_message(raw.dir, raw.msg)
                .map(|entry| TraceLine {
                    line: raw.line,
                    entry,
                })
                .map_err(|error| TraceError {
                    line: raw.line,
                    error,
                })
        })
        .collect()
}

/// Writes entries as trace text, one line each, every line terminated by `\n`.
pub fn format<'a>(entries: impl IntoIterator<Item = &'a TraceEntry>) -> String {
    let mut text = String::new();
    for entry in entries {
        text.push_str(&entry.to_line());
        text.push('\n');
    }
    text
}

/// Removes the commands `drop` selects together with the replies to them (matched by id), for
/// replaying a recording against a client that does not send those commands (libvirt's
/// `qom-get` probes, for instance). Events stay.
pub fn without_commands(
    lines: Vec<TraceLine>,
    mut drop: impl FnMut(&QmpCommand) -> bool,
) -> Vec<TraceLine> {
    let mut dropped_ids = std::collections::BTreeSet::new();
    let mut kept = Vec::with_capacity(lines.len());
    for line in lines {
        match &line.entry {
            TraceEntry::Send { id, command } if drop(command) => {
                if let Some(id) = id {
                    dropped_ids.insert(id.clone());
                }
            }
            TraceEntry::Recv(QmpIn::Reply { id: Some(id), .. }) if dropped_ids.contains(id) => {}
            _ => kept.push(line),
        }
    }
    kept
}
