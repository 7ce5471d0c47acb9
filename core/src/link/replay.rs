//! [`ReplayLink`]: a link that plays a recorded trace and fails on the first command that differs
//! from it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{CommandId, Link, LinkError, Timestamp};
use crate::qmp::{QmpCommand, QmpError, QmpEvent, QmpIn};
use crate::trace::{TraceEntry, TraceLine};

/// Renames recorded names (node names, job ids, export ids, paths...) to the names the replaying
/// client uses. A key is replaced wherever it appears in a string value as a whole token: the
/// characters around it must not be ASCII letters or digits, so `libvirt-3-format` is renamed
/// inside `backup-vda-libvirt-3-format` but `libvirt-1-format` never matches inside
/// `libvirt-11-format`. Longer keys win; replaced text is not scanned again. Object keys are
/// never renamed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameMap {
    names: BTreeMap<String, String>,
}

impl NameMap {
    /// An empty map (names compare verbatim).
    pub fn new() -> Self {
        NameMap::default()
    }

    /// Renames `recorded` to `replayed`. An empty `recorded` name is ignored.
    pub fn insert(&mut self, recorded: impl Into<String>, replayed: impl Into<String>) {
        let recorded = recorded.into();
        if !recorded.is_empty() {
            self.names.insert(recorded, replayed.into());
        }
    }

    /// True when no name is mapped.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Renames the tokens of one string.
    pub fn apply_str(&self, text: &str) -> String {
        if self.names.is_empty() {
            return text.to_owned();
        }
        let mut keys: Vec<(&String, &String)> = self.names.iter().collect();
        keys.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(b.0)));
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut pos = 0;
        let mut copied = 0;
        while pos < bytes.len() {
            let at_boundary = pos == 0 || !bytes[pos - 1].is_ascii_alphanumeric();
            let matched = at_boundary
                .then(|| {
                    keys.iter().find(|(key, _)| {
                        text[pos..].starts_with(key.as_str())
                            && bytes
                                .get(pos + key.len())
                                .is_none_or(|next| !next.is_ascii_alphanumeric())
                    })
                })
                .flatten();
            if let Some((key, replacement)) = matched {
                out.push_str(&text[copied..pos]);
                out.push_str(replacement);
                pos += key.len();
                copied = pos;
            } else {
                // Step over one whole character so slicing stays on char boundaries.
                pos += text[pos..].chars().next().map_or(1, char::len_utf8);
            }
        }
        out.push_str(&text[copied..]);
        out
    }

    /// Renames the tokens of every string inside `value`.
    pub fn apply(&self, value: &Value) -> Value {
        if self.names.is_empty() {
            return value.clone();
        }
        match value {
            Value::String(text) => Value::String(self.apply_str(text)),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.apply(v)).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, v)| (key.clone(), self.apply(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Renames inside a trace entry: command arguments, reply values, error descriptions and
    /// event data. Command and event names, action types and ids are left alone (ids are mapped
    /// by the replay itself). A command whose renamed arguments no longer decode is kept
    /// unrenamed, so renaming never loses an entry.
    pub fn apply_entry(&self, entry: &TraceEntry) -> TraceEntry {
        if self.names.is_empty() {
            return entry.clone();
        }
        match entry {
            TraceEntry::Send { id, command } => {
                let arguments = command.arguments().map(|arguments| self.apply(&arguments));
                let command = match QmpCommand::from_parts(command.name(), arguments) {
                    Ok(renamed) => renamed,
                    Err(_) => command.clone(),
                };
                TraceEntry::Send {
                    id: id.clone(),
                    command,
                }
            }
            TraceEntry::Recv(QmpIn::Reply { id, result }) => TraceEntry::Recv(QmpIn::Reply {
                id: id.clone(),
                result: match result {
                    Ok(value) => Ok(self.apply(value)),
                    Err(error) => Err(QmpError {
                        class: error.class.clone(),
                        desc: self.apply_str(&error.desc),
                    }),
                },
            }),
            TraceEntry::Recv(QmpIn::Event(event)) => {
                let renamed = QmpEvent::from_parts(event.name(), self.apply(&event.data()));
                TraceEntry::Recv(QmpIn::Event(renamed.unwrap_or_else(|_| event.clone())))
            }
            TraceEntry::Recv(QmpIn::Greeting(_)) => entry.clone(),
        }
    }
}

/// Plays a recorded trace as if it were QEMU.
///
/// - `send` must carry the next recorded command, compared as JSON without ids, after renaming
///   the recording through the caller's [`NameMap`]; the first difference is
///   [`LinkError::Diverged`] and leaves the replay where it was.
/// - `recv` returns the recorded replies and events in order, with reply ids translated to the
///   ids the client used. A recorded message that follows a command not yet sent is held back
///   until that command is sent (it may be caused by it); until then `recv` times out at its
///   deadline, or fails with [`LinkError::Stalled`] when asked to wait forever. Waiting forever
///   after everything was played gives [`LinkError::Closed`].
/// - The clock starts at the given time and moves only when `recv` times out: it jumps to the
///   deadline. Nothing sleeps.
#[derive(Clone, Debug)]
pub struct ReplayLink {
    /// The recorded commands, in order.
    commands: Vec<Recorded<(Option<CommandId>, QmpCommand)>>,
    /// The recorded incoming messages, in order.
    messages: Vec<Recorded<QmpIn>>,
    /// Next command to match (index into `commands`).
    next_command: usize,
    /// Next message to deliver (index into `messages`).
    next_message: usize,
    /// Recorded command id → the client's id for the same command.
    ids: BTreeMap<CommandId, CommandId>,
    /// One past the last trace line.
    end_line: usize,
    now: Timestamp,
}

/// A recorded item with its place in the recording.
#[derive(Clone, Debug)]
struct Recorded<T> {
    /// Position among all entries of the recording (orders commands against messages).
    seq: usize,
    /// 1-based trace line.
    line: usize,
    item: T,
}

impl ReplayLink {
    /// A replay of `lines` (as read by [`crate::trace::parse`]) with recorded names renamed by
    /// `names`, its clock starting at `start`.
    pub fn new(lines: Vec<TraceLine>, names: &NameMap, start: Timestamp) -> Self {
        let end_line = lines.last().map_or(1, |line| line.line + 1);
        let mut commands = Vec::new();
        let mut messages = Vec::new();
        for (seq, line) in lines.into_iter().enumerate() {
            match names.apply_entry(&line.entry) {
                TraceEntry::Send { id, command } => commands.push(Recorded {
                    seq,
                    line: line.line,
                    item: (id, command),
                }),
                TraceEntry::Recv(message) => messages.push(Recorded {
                    seq,
                    line: line.line,
                    item: message,
                }),
            }
        }
        ReplayLink {
            commands,
            messages,
            next_command: 0,
            next_message: 0,
            ids: BTreeMap::new(),
            end_line,
            now: start,
        }
    }

    /// True when every recorded command was sent and every recorded message delivered.
    pub fn is_finished(&self) -> bool {
        self.next_command >= self.commands.len() && self.next_message >= self.messages.len()
    }

    /// The recorded commands not sent yet, with their trace lines.
    pub fn remaining_commands(&self) -> Vec<(usize, &QmpCommand)> {
        self.commands[self.next_command..]
            .iter()
            .map(|recorded| (recorded.line, &recorded.item.1))
            .collect()
    }
}

impl Link for ReplayLink {
    fn now(&self) -> Timestamp {
        self.now
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        let Some(recorded) = self.commands.get(self.next_command) else {
            return Err(LinkError::Diverged {
                line: self.end_line,
                expected: None,
                got: Box::new(cmd.clone()),
            });
        };
        let (recorded_id, expected) = &recorded.item;
        if expected.to_wire(None) != cmd.to_wire(None) {
            return Err(LinkError::Diverged {
                line: recorded.line,
                expected: Some(Box::new(expected.clone())),
                got: Box::new(cmd.clone()),
            });
        }
        if let Some(recorded_id) = recorded_id {
            self.ids.insert(recorded_id.clone(), id);
        }
        self.next_command += 1;
        Ok(())
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        let pending_command = self.commands.get(self.next_command);
        if let Some(recorded) = self.messages.get(self.next_message)
            && pending_command.is_none_or(|command| recorded.seq < command.seq)
        {
            let message = match &recorded.item {
                QmpIn::Reply {
                    id: Some(recorded_id),
                    result,
                } => QmpIn::Reply {
                    id: Some(
                        self.ids
                            .get(recorded_id)
                            .cloned()
                            .unwrap_or_else(|| recorded_id.clone()),
                    ),
                    result: result.clone(),
                },
                message => message.clone(),
            };
            self.next_message += 1;
            return Ok(Some(message));
        }
        match (deadline, pending_command) {
            (Some(deadline), _) => {
                self.now = self.now.max(deadline);
                Ok(None)
            }
            // Waiting forever while the recording still expects a command can never end;
            // once everything was played, the recorded peer is simply gone.
            (None, Some(command)) => Err(LinkError::Stalled {
                line: command.line,
                waiting_for: Box::new(command.item.1.clone()),
            }),
            (None, None) => Err(LinkError::Closed),
        }
    }
}
