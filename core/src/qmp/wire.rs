//! What arrives on a QMP connection ([`QmpIn`]) and how a byte stream is cut into messages
//! ([`FrameDecoder`]). Decoding never panics, whatever the bytes.

use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{DecodeError, QmpError};
use super::event::QmpEvent;
use super::greeting::Greeting;
use crate::link::CommandId;

/// A message from QEMU: the greeting, a reply, or an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpIn {
    /// The greeting, first thing on a new connection.
    Greeting(Greeting),
    /// The reply to a command. `id` is the command's id; it is `None` when the command had
    /// none or QEMU could not parse it.
    Reply {
        /// The command's id, echoed.
        id: Option<CommandId>,
        /// The `return` value or the error.
        result: Result<Value, QmpError>,
    },
    /// An event.
    Event(QmpEvent),
}

impl QmpIn {
    /// Decodes one message (one JSON object). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<QmpIn, DecodeError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| DecodeError::from_json(&err))?;
        QmpIn::from_value(value)
    }

    /// Decodes one message from a JSON value.
    pub fn from_value(value: Value) -> Result<QmpIn, DecodeError> {
        let Value::Object(mut map) = value else {
            return Err(DecodeError::NotAnObject);
        };
        if let Some(greeting) = map.remove("QMP") {
            let greeting = serde_json::from_value(greeting)
                .map_err(|err| DecodeError::invalid("greeting", err))?;
            return Ok(QmpIn::Greeting(greeting));
        }
        if let Some(name) = map.remove("event") {
            let Value::String(name) = name else {
                return Err(DecodeError::invalid("event", "'event' must be a string"));
            };
            let data = map.remove("data").unwrap_or(Value::Null);
            return Ok(QmpIn::Event(QmpEvent::from_parts(&name, data)?));
        }
        let id = match map.remove("id") {
            None => None,
            Some(id) => Some(
                serde_json::from_value::<CommandId>(id)
                    .map_err(|err| DecodeError::invalid("reply id", err))?,
            ),
        };
        if let Some(value) = map.remove("return") {
            return Ok(QmpIn::Reply {
                id,
                result: Ok(value),
            });
        }
        if let Some(error) = map.remove("error") {
            let error: QmpError = serde_json::from_value(error)
                .map_err(|err| DecodeError::invalid("error reply", err))?;
            return Ok(QmpIn::Reply {
                id,
                result: Err(error),
            });
        }
        let mut keys: Vec<String> = map.keys().cloned().collect();
        if id.is_some() {
            keys.push("id".to_owned());
        }
        keys.sort();
        Err(DecodeError::Unrecognized { keys })
    }

    /// The wire form as a JSON value. Events are written without `timestamp`, and without
    /// `data` when they have none.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        match self {
            QmpIn::Greeting(greeting) => {
                map.insert("QMP".to_owned(), to_json(greeting));
            }
            QmpIn::Reply { id, result } => {
                match result {
                    Ok(value) => map.insert("return".to_owned(), value.clone()),
                    Err(error) => map.insert("error".to_owned(), to_json(error)),
                };
                if let Some(id) = id {
                    map.insert("id".to_owned(), to_json(id));
                }
            }
            QmpIn::Event(event) => {
                map.insert("event".to_owned(), Value::from(event.name()));
                let data = event.data();
                if !data.is_null() {
                    map.insert("data".to_owned(), data);
                }
            }
        }
        Value::Object(map)
    }

    /// The wire form as compact JSON text, without a line terminator. Members come in a fixed
    /// order (`return`/`error` then `id`; `event` then `data`), whatever serde_json's map order.
    pub fn encode(&self) -> String {
        let entries: Vec<(String, Value)> = match self.to_value() {
            Value::Object(map) => {
                let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                let rank = |key: &str| match key {
                    "QMP" | "event" | "return" | "error" => 0,
                    "data" => 1,
                    _ => 2,
                };
                entries.sort_by_key(|(key, _)| rank(key));
                entries
            }
            _ => Vec::new(),
        };
        serde_json::to_string(&Ordered(&entries)).unwrap_or_default()
    }
}

/// Serializes entries as one object in the given order.
struct Ordered<'a>(&'a [(String, Value)]);

impl Serialize for Ordered<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        super::fields::serialize_entries(self.0, serializer)
    }
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // Greetings, errors and ids are plain data that always serialize.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The default bound on one message: large enough for `query-named-block-nodes` on a domain with
/// hundreds of disks and long backing chains.
pub const DEFAULT_FRAME_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// Cuts a QMP byte stream into messages. QEMU writes one JSON object per line, but a reader must
/// not assume that one read gives one message, so this tracks object nesting instead of relying
/// on line ends (which also copes with pretty-printed output). Bytes outside an object that are
/// not whitespace form a junk frame ending at the next newline; decoding it then reports the
/// error, and the decoder resynchronizes on the next line.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Next byte of `buf` to scan.
    scan: usize,
    /// Nesting depth of `{`/`[` in the current object frame.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The current frame is junk (ends at a newline) rather than an object.
    junk: bool,
    /// Dropping the rest of an oversized message, up to the next newline.
    discarding: bool,
    limit_bytes: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_FRAME_LIMIT_BYTES)
    }
}

impl FrameDecoder {
    /// A decoder refusing messages longer than `limit_bytes`.
    pub fn new(limit_bytes: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            scan: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            junk: false,
            discarding: false,
            limit_bytes,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames (a partial message).
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, if one is buffered. An oversized frame gives
    /// `Err(DecodeError::TooLong)` once; its bytes are dropped up to the end of its line.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, DecodeError>> {
        if self.discarding {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.buf.drain(..=end);
                    self.discarding = false;
                }
                None => {
                    self.buf.clear();
                    return None;
                }
            }
        }
        // Leading whitespace between messages is skipped outright.
        if self.depth == 0 && !self.junk && !self.in_string {
            let skip = self.buf[self.scan..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            debug_assert_eq!(self.scan, 0, "a frame starts at the buffer's start");
            self.buf.drain(..skip);
            self.scan = 0;
        }
        while self.scan < self.buf.len() {
            let byte = self.buf[self.scan];
            self.scan += 1;
            let frame_done = if self.junk {
                byte == b'\n'
            } else if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                false
            } else {
                match byte {
                    b'"' if self.depth > 0 => {
                        self.in_string = true;
                        false
                    }
                    b'{' | b'[' => {
                        self.depth += 1;
                        false
                    }
                    b'}' | b']' if self.depth > 0 => {
                        self.depth -= 1;
                        self.depth == 0
                    }
                    _ if self.depth == 0 => {
                        // Not the start of an object: junk up to the end of the line.
                        self.junk = true;
                        byte == b'\n'
                    }
                    _ => false,
                }
            };
            if frame_done {
                let frame: Vec<u8> = self.buf.drain(..self.scan).collect();
                self.reset_frame_state();
                return Some(Ok(frame));
            }
            if self.scan > self.limit_bytes {
                self.buf.drain(..self.scan);
                self.reset_frame_state();
                // The rest of the oversized message is dropped up to the end of its line, where
                // the stream is back in step.
                self.discarding = true;
                return Some(Err(DecodeError::TooLong {
                    limit_bytes: self.limit_bytes,
                }));
            }
        }
        None
    }

    fn reset_frame_state(&mut self) {
        self.scan = 0;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.junk = false;
    }
}

/// Serializes as the wire form ([`QmpIn::to_value`]).
impl Serialize for QmpIn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

/// Reads the wire form ([`QmpIn::from_value`]).
impl<'de> serde::Deserialize<'de> for QmpIn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        QmpIn::from_value(value).map_err(serde::de::Error::custom)
    }
}
