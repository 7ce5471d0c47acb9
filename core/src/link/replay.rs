//! [`ReplayLink`]: a link that plays a recorded trace and fails on the first command that differs
//! from it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{CommandId, Link, LinkError, Timestamp};
use crate::qmp::{QmpCommand, QmpIn};
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

    /// Renames inside a trace entry. Ids are left alone (the replay maps them separately).
    /// Renaming can only fail if it makes a typed message invalid, which token renaming of
    /// names does not; such an entry is kept unrenamed.
    pub fn apply_entry(&self, entry: &TraceEntry) -> TraceEntry {
        if self.names.is_empty() {
            return entry.clone();
        }
        match entry {
            TraceEntry::Send { id, command } => {
                let renamed = self.apply(&command.to_wire(None));
                match QmpCommand::from_wire(renamed) {
                    Ok((_, command)) => TraceEntry::Send {
                        id: id.clone(),
                        command,
                    },
                    Err(_) => entry.clone(),
                }
            }
            TraceEntry::Recv(message) => {
                let mut renamed = self.apply(&message.to_value());
                // Reply ids are not names: restore the recorded one.
                if let (QmpIn::Reply { id: Some(id), .. }, Value::Object(map)) =
                    (message, &mut renamed)
                {
                    map.insert(
                        "id".to_owned(),
                        serde_json::to_value(id).unwrap_or(Value::Null),
                    );
                }
                match QmpIn::from_value(renamed) {
                    Ok(message) => TraceEntry::Recv(message),
                    Err(_) => entry.clone(),
                }
            }
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
///   deadline, or fails with [`LinkError::Stalled`] when asked to wait forever.
/// - The clock starts at the given time and moves only when `recv` times out: it jumps to the
///   deadline. Nothing sleeps.
#[derive(Clone, Debug)]
pub struct ReplayLink {
    lines: Vec<TraceLine>,
    /// Index of the next recorded command not yet matched.
    next_send: usize,
    /// Index of the next recorded message not yet delivered.
    next_recv: usize,
    /// Recorded command id → the client's id for the same command.
    ids: BTreeMap<CommandId, CommandId>,
    now: Timestamp,
}

impl ReplayLink {
    /// A replay of `lines` (as read by [`crate::trace::parse`]) with recorded names renamed by
    /// `names`, its clock starting at `start`.
    pub fn new(lines: Vec<TraceLine>, names: &NameMap, start: Timestamp) -> Self {
        let lines = lines
            .into_iter()
            .map(|line| TraceLine {
                line: line.line,
                entry: names.apply_entry(&line.entry),
            })
            .collect();
        let mut link = ReplayLink {
            lines,
            next_send: 0,
            next_recv: 0,
            ids: BTreeMap::new(),
            now: start,
        };
        link.next_send = link.find(0, true);
        link.next_recv = link.find(0, false);
        link
    }

    /// True when every recorded command was sent and every recorded message delivered.
    pub fn is_finished(&self) -> bool {
        self.next_send >= self.lines.len() && self.next_recv >= self.lines.len()
    }

    /// The recorded commands not sent yet, with their trace lines.
    pub fn remaining_commands(&self) -> Vec<(usize, &QmpCommand)> {
        self.lines[self.next_send.min(self.lines.len())..]
            .iter()
            .filter_map(|line| match &line.entry {
                TraceEntry::Send { command, .. } => Some((line.line, command)),
                TraceEntry::Recv(_) => None,
            })
            .collect()
    }

    /// Index of the first send (or recv) entry at or after `from`, or the length.
    fn find(&self, from: usize, send: bool) -> usize {
        self.lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, line)| matches!(line.entry, TraceEntry::Send { .. }) == send)
            .map_or(self.lines.len(), |(index, _)| index)
    }

    fn end_line(&self) -> usize {
        self.lines.last().map_or(1, |line| line.line + 1)
    }
}

impl Link for ReplayLink {
    fn now(&self) -> Timestamp {
        self.now
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        let Some(line) = self.lines.get(self.next_send) else {
            return Err(LinkError::Diverged {
                line: self.end_line(),
                expected: None,
                got: Box::new(cmd.clone()),
            });
        };
        let TraceEntry::Send {
            id: recorded_id,
            command: expected,
        } = &line.entry
        else {
            unreachable_send_cursor();
            return Err(LinkError::Closed);
        };
        if expected.to_wire(None) != cmd.to_wire(None) {
            return Err(LinkError::Diverged {
                line: line.line,
                expected: Some(Box::new(expected.clone())),
                got: Box::new(cmd.clone()),
            });
        }
        if let Some(recorded_id) = recorded_id {
            self.ids.insert(recorded_id.clone(), id);
        }
        self.next_send = self.find(self.next_send + 1, true);
        Ok(())
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        if self.next_recv < self.next_send {
            let line = &self.lines[self.next_recv];
            let message = match &line.entry {
                TraceEntry::Recv(QmpIn::Reply {
                    id: Some(recorded),
                    result,
                }) => QmpIn::Reply {
                    id: Some(
                        self.ids
                            .get(recorded)
                            .cloned()
                            .unwrap_or_else(|| recorded.clone()),
                    ),
                    result: result.clone(),
                },
                TraceEntry::Recv(message) => message.clone(),
                TraceEntry::Send { .. } => {
                    unreachable_send_cursor();
                    return Err(LinkError::Closed);
                }
            };
            self.next_recv = self.find(self.next_recv + 1, false);
            return Ok(Some(message));
        }
        match deadline {
            Some(deadline) => {
                self.now = self.now.max(deadline);
                Ok(None)
            }
            None => match self.lines.get(self.next_send) {
                Some(TraceLine {
                    line,
                    entry: TraceEntry::Send { command, .. },
                }) if self.next_recv < self.lines.len() => Err(LinkError::Stalled {
                    line: *line,
                    waiting_for: Box::new(command.clone()),
                }),
                _ => Err(LinkError::Closed),
            },
        }
    }
}

/// The cursors only ever rest on entries of their own direction (`find` guarantees it); reaching
/// the other kind is a bug in this module, reported in debug builds.
fn unreachable_send_cursor() {
    debug_assert!(false, "replay cursor on an entry of the wrong direction");
}
