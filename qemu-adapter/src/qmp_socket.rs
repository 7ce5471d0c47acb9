//! A blocking QMP client over a unix socket.
//!
//! Contract: [`QmpSocket::connect`] reads the greeting and negotiates capabilities before it
//! returns. After that the socket carries newline-delimited JSON objects in both directions;
//! replies are matched to commands by their `id`, and every event that arrives while a reply is
//! awaited is queued in arrival order and handed out later by [`QmpSocket::next_event`] (or by
//! [`QmpSocket::recv`], which returns replies and events in the order they were read). Nothing
//! read from the socket is ever dropped silently: a reply to a command nobody waits for is kept
//! for [`QmpSocket::recv`] too. Every blocking read is bounded by a deadline; reaching it is
//! [`QmpSocketError::Timeout`] (or `Ok(None)` from [`QmpSocket::recv`]), after which the socket
//! stays usable because partial lines are kept in the buffer.
//!
//! This layer is deliberately thin: it frames and classifies messages as raw
//! [`serde_json::Value`]s; typed decoding of commands, replies and events belongs to the core.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// The longest line accepted from QEMU. Replies to `query-named-block-nodes` on large graphs are
/// a few hundred KiB; anything beyond this is a broken peer, and bounding it bounds memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// How many unclaimed messages (events, stray replies) are kept before the oldest is reported as
/// an overflow. QMP traffic is small; a queue this long means nobody is reading events.
pub const MAX_QUEUED_MESSAGES: usize = 65_536;

/// Errors of the QMP socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpSocketError {
    /// Nobody listens on the socket (the daemon is not running or the path is stale).
    #[error("QMP socket {path}: connection refused")]
    ConnectionRefused {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path does not exist.
    #[error("QMP socket {path} does not exist")]
    NoSocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Any other failure to connect.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("QMP connection closed by the peer")]
    Closed,
    /// The deadline passed before the awaited message arrived.
    #[error("timed out waiting for {waiting_for}")]
    Timeout {
        /// What was awaited (a command name, "an event", "the greeting").
        waiting_for: String,
    },
    /// A line that is not a JSON object, or an object that is neither a greeting, a reply nor
    /// an event.
    #[error("malformed QMP message ({reason}): {line}")]
    Malformed {
        /// The offending line, truncated to a readable length.
        line: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The first message was not a QMP greeting.
    #[error("expected a QMP greeting, got: {message}")]
    NotAGreeting {
        /// The message received instead.
        message: String,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Qemu {
        /// The command that failed.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// Too many unclaimed messages piled up.
    #[error("more than {MAX_QUEUED_MESSAGES} unclaimed QMP messages queued")]
    QueueOverflow,
    /// Another IO failure on the socket.
    #[error("QMP socket IO error: {0}")]
    Io(#[from] io::Error),
}

impl QmpSocketError {
    /// The QEMU error class and description, when this is a QEMU error reply.
    pub fn qemu_error(&self) -> Option<(&str, &str)> {
        match self {
            Self::Qemu { class, desc, .. } => Some((class, desc)),
            _ => None,
        }
    }
}

/// An error reply from QEMU: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuErrorReply {
    /// The error class.
    pub class: String,
    /// The description.
    pub desc: String,
}

/// One message read from QEMU after the greeting.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// A reply to a command: `return` or `error`, with the id the command carried.
    Reply {
        /// The echoed id, if the command had one.
        id: Option<Value>,
        /// The `return` value, or the error.
        result: Result<Value, QemuErrorReply>,
    },
    /// An asynchronous event.
    Event(RawEvent),
}

/// An event as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// The event name (`JOB_STATUS_CHANGE`...).
    pub name: String,
    /// The `data` member, `Value::Null` if absent.
    pub data: Value,
    /// QEMU's timestamp: seconds and microseconds since the epoch.
    pub timestamp: Option<(i64, i64)>,
}

/// The greeting QEMU sends on connect.
#[derive(Debug, Clone, PartialEq)]
pub struct Greeting {
    /// QEMU's version (major, minor, micro).
    pub version: (u64, u64, u64),
    /// The distribution's package string.
    pub package: String,
    /// Offered capabilities (`oob`).
    pub capabilities: Vec<String>,
    /// The greeting as received.
    pub raw: Value,
}

/// A blocking QMP connection. See the module documentation for the contract.
#[derive(Debug)]
pub struct QmpSocket {
    stream: UnixStream,
    /// Bytes read but not yet split into lines.
    buffer: Vec<u8>,
    /// Messages read while waiting for something else, in arrival order.
    queued: VecDeque<QmpMessage>,
    greeting: Greeting,
    next_id: u64,
}

impl QmpSocket {
    /// Connects to `path`, reads the greeting and negotiates capabilities, all before
    /// `deadline`.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Self, QmpSocketError> {
        let mut socket = Self::connect_unnegotiated(path, deadline)?;
        socket.negotiate(deadline)?;
        Ok(socket)
    }

    /// Connects to `path` and reads the greeting, but does not negotiate: the caller must call
    /// [`QmpSocket::negotiate`] before any other command is accepted by QEMU.
    pub fn connect_unnegotiated(path: &Path, deadline: Instant) -> Result<Self, QmpSocketError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::ConnectionRefused => QmpSocketError::ConnectionRefused {
                path: path.to_owned(),
            },
            io::ErrorKind::NotFound => QmpSocketError::NoSocket {
                path: path.to_owned(),
            },
            _ => QmpSocketError::Connect {
                path: path.to_owned(),
                source,
            },
        })?;
        let mut socket = QmpSocket {
            stream,
            buffer: Vec::new(),
            queued: VecDeque::new(),
            greeting: Greeting {
                version: (0, 0, 0),
                package: String::new(),
                capabilities: Vec::new(),
                raw: Value::Null,
            },
            next_id: 0,
        };
        let value = socket
            .read_value(Some(deadline))?
            .ok_or_else(|| QmpSocketError::Timeout {
                waiting_for: "the QMP greeting".to_owned(),
            })?;
        socket.greeting = parse_greeting(value)?;
        Ok(socket)
    }

    /// Sends `qmp_capabilities` and waits for its reply.
    pub fn negotiate(&mut self, deadline: Instant) -> Result<(), QmpSocketError> {
        self.execute("qmp_capabilities", None, deadline).map(|_| ())
    }

    /// The greeting read on connect.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Returns a fresh command id (`vbk-N`), unique on this connection.
    pub fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("vbk-{}", self.next_id)
    }

    /// Writes one command line: `{"execute": command, "arguments": arguments, "id": id}`.
    pub fn send(
        &mut self,
        id: &Value,
        command: &str,
        arguments: Option<&Value>,
    ) -> Result<(), QmpSocketError> {
        let mut object = Map::new();
        object.insert("execute".to_owned(), Value::String(command.to_owned()));
        if let Some(arguments) = arguments {
            object.insert("arguments".to_owned(), arguments.clone());
        }
        object.insert("id".to_owned(), id.clone());
        self.send_raw(&Value::Object(object))
    }

    /// Writes one JSON object as a line, exactly as given.
    pub fn send_raw(&mut self, message: &Value) -> Result<(), QmpSocketError> {
        let mut line = serde_json::to_vec(message).map_err(|e| QmpSocketError::Malformed {
            line: String::new(),
            reason: format!("cannot encode command: {e}"),
        })?;
        line.push(b'\n');
        self.stream.write_all(&line).map_err(map_write_error)?;
        Ok(())
    }

    /// Sends `command` with a fresh id and waits for its reply until `deadline`, queueing every
    /// event and every unrelated reply read meanwhile. A QEMU error reply becomes
    /// [`QmpSocketError::Qemu`].
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, QmpSocketError> {
        let id = Value::String(self.fresh_id());
        self.send(&id, command, arguments.as_ref())?;
        loop {
            let message =
                self.read_message(Some(deadline))?
                    .ok_or_else(|| QmpSocketError::Timeout {
                        waiting_for: format!("the reply to {command}"),
                    })?;
            match message {
                QmpMessage::Reply {
                    id: Some(got),
                    result,
                } if got == id => {
                    return result.map_err(|e| QmpSocketError::Qemu {
                        command: command.to_owned(),
                        class: e.class,
                        desc: e.desc,
                    });
                }
                other => self.enqueue(other)?,
            }
        }
    }

    /// Returns the next message in arrival order: a queued one first, else one read from the
    /// socket. `Ok(None)` when `deadline` passes first; `None` as deadline waits without limit.
    pub fn recv(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<QmpMessage>, QmpSocketError> {
        if let Some(message) = self.queued.pop_front() {
            return Ok(Some(message));
        }
        self.read_message(deadline)
    }

    /// Returns the next event, queued or read, until `deadline`. Replies read meanwhile stay
    /// queued for [`QmpSocket::recv`].
    pub fn next_event(&mut self, deadline: Instant) -> Result<RawEvent, QmpSocketError> {
        self.wait_event(deadline, |_| true)
    }

    /// Waits until an event satisfying `wanted` arrives and returns it. Everything else read
    /// meanwhile (other events, replies) stays queued in arrival order.
    pub fn wait_event(
        &mut self,
        deadline: Instant,
        mut wanted: impl FnMut(&RawEvent) -> bool,
    ) -> Result<RawEvent, QmpSocketError> {
        let queued = self
            .queued
            .iter()
            .position(|m| matches!(m, QmpMessage::Event(e) if wanted(e)));
        if let Some(QmpMessage::Event(event)) = queued.and_then(|i| self.queued.remove(i)) {
            return Ok(event);
        }
        loop {
            match self.read_message(Some(deadline))? {
                None => {
                    return Err(QmpSocketError::Timeout {
                        waiting_for: "an event".to_owned(),
                    });
                }
                Some(QmpMessage::Event(event)) if wanted(&event) => return Ok(event),
                Some(other) => self.enqueue(other)?,
            }
        }
    }

    /// Events and replies read but not yet handed out.
    pub fn queued(&self) -> impl Iterator<Item = &QmpMessage> {
        self.queued.iter()
    }

    fn enqueue(&mut self, message: QmpMessage) -> Result<(), QmpSocketError> {
        if self.queued.len() >= MAX_QUEUED_MESSAGES {
            return Err(QmpSocketError::QueueOverflow);
        }
        self.queued.push_back(message);
        Ok(())
    }

    fn read_message(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<QmpMessage>, QmpSocketError> {
        match self.read_value(deadline)? {
            None => Ok(None),
            Some(value) => classify(value).map(Some),
        }
    }

    /// Reads one JSON object line; `Ok(None)` at the deadline.
    fn read_value(&mut self, deadline: Option<Instant>) -> Result<Option<Value>, QmpSocketError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = &line[..line.len() - 1];
                let text = String::from_utf8_lossy(line);
                if text.trim().is_empty() {
                    continue;
                }
                return match serde_json::from_slice::<Value>(line) {
                    Ok(value @ Value::Object(_)) => Ok(Some(value)),
                    Ok(_) => Err(malformed(&text, "not a JSON object")),
                    Err(e) => Err(malformed(&text, &e.to_string())),
                };
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                let text = String::from_utf8_lossy(&self.buffer[..200]).into_owned();
                self.buffer.clear();
                return Err(malformed(&text, "line too long"));
            }
            let timeout = match deadline {
                None => None,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // A zero read timeout means "block forever" to the OS; never pass one.
                    Some(left.max(Duration::from_millis(1)))
                }
            };
            self.stream.set_read_timeout(timeout)?;
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpSocketError::Closed),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(QmpSocketError::Closed);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn map_write_error(e: io::Error) -> QmpSocketError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpSocketError::Closed,
        _ => QmpSocketError::Io(e),
    }
}

fn malformed(text: &str, reason: &str) -> QmpSocketError {
    const SHOWN: usize = 512;
    let line = if text.len() > SHOWN {
        let mut end = SHOWN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    } else {
        text.to_owned()
    };
    QmpSocketError::Malformed {
        line,
        reason: reason.to_owned(),
    }
}

/// Sorts a JSON object into a reply or an event.
pub fn classify(value: Value) -> Result<QmpMessage, QmpSocketError> {
    let Value::Object(mut object) = value else {
        return Err(malformed(&value.to_string(), "not a JSON object"));
    };
    if let Some(event) = object.get("event") {
        let Some(name) = event.as_str() else {
            return Err(malformed(
                &Value::Object(object.clone()).to_string(),
                "event name is not a string",
            ));
        };
        let name = name.to_owned();
        let timestamp = object.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_i64()?,
                t.get("microseconds")?.as_i64()?,
            ))
        });
        let data = object.remove("data").unwrap_or(Value::Null);
        return Ok(QmpMessage::Event(RawEvent {
            name,
            data,
            timestamp,
        }));
    }
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(QmpMessage::Reply {
            id,
            result: Ok(value),
        });
    }
    if let Some(error) = object.get("error") {
        let class = error.get("class").and_then(Value::as_str);
        let desc = error.get("desc").and_then(Value::as_str);
        if let (Some(class), Some(desc)) = (class, desc) {
            return Ok(QmpMessage::Reply {
                id,
                result: Err(QemuErrorReply {
                    class: class.to_owned(),
                    desc: desc.to_owned(),
                }),
            });
        }
    }
    if let Some(id) = id {
        object.insert("id".to_owned(), id);
    }
    Err(malformed(
        &Value::Object(object).to_string(),
        "neither a reply nor an event",
    ))
}

fn parse_greeting(value: Value) -> Result<Greeting, QmpSocketError> {
    let not_greeting = || QmpSocketError::NotAGreeting {
        message: value.to_string(),
    };
    let qmp = value.get("QMP").ok_or_else(not_greeting)?;
    let version = qmp.get("version").ok_or_else(not_greeting)?;
    let number = |key: &str| {
        version
            .get("qemu")
            .and_then(|q| q.get(key))
            .and_then(Value::as_u64)
    };
    let (Some(major), Some(minor), Some(micro)) =
        (number("major"), number("minor"), number("micro"))
    else {
        return Err(not_greeting());
    };
    let package = version
        .get("package")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|caps| {
            caps.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(Greeting {
        version: (major, minor, micro),
        package,
        capabilities,
        raw: value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"}, "capabilities": ["oob"]}}"#;

    /// Runs a scripted peer: sends the greeting, then for each received line calls `script`,
    /// which returns the lines to answer with.
    fn peer(
        dir: &Path,
        script: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> (PathBuf, thread::JoinHandle<()>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            writeln!(stream, "{GREETING}").unwrap();
            let reader = io::BufReader::new(stream.try_clone().unwrap());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let command: Value = serde_json::from_str(&line).unwrap();
                for answer in script(&command) {
                    if stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        (path, handle)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn events_read_before_a_reply_are_queued_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _peer) = peer(dir.path(), |cmd| {
            let id = cmd["id"].clone();
            match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![format!("{}\n", json!({"return": {}, "id": id}))],
                _ => vec![
                    // Split one event across two writes to exercise partial-line buffering.
                    r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "cre"#.to_owned(),
                    "ated\", \"id\": \"j\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n"
                        .to_owned(),
                    format!(
                        "{}\n{}\n",
                        json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j"}}),
                        json!({"return": {"x": 1}, "id": id})
                    ),
                ],
            }
        });
        let mut qmp = QmpSocket::connect(&path, soon()).unwrap();
        assert_eq!(qmp.greeting().version, (10, 0, 2));
        assert_eq!(qmp.greeting().capabilities, vec!["oob".to_owned()]);
        let reply = qmp
            .execute("blockdev-backup", Some(json!({})), soon())
            .unwrap();
        assert_eq!(reply, json!({"x": 1}));
        let first = qmp.next_event(soon()).unwrap();
        assert_eq!(first.data["status"], "created");
        assert_eq!(first.timestamp, Some((1, 2)));
        let second = qmp.next_event(soon()).unwrap();
        assert_eq!(second.data["status"], "running");
    }

    #[test]
    fn error_reply_carries_class_and_desc() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _peer) = peer(dir.path(), |cmd| {
            let id = cmd["id"].clone();
            match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![format!("{}\n", json!({"return": {}, "id": id}))],
                _ => vec![format!(
                    "{}\n",
                    json!({"error": {"class": "GenericError", "desc": "Bitmap already exists: c1"}, "id": id})
                )],
            }
        });
        let mut qmp = QmpSocket::connect(&path, soon()).unwrap();
        let err = qmp
            .execute("block-dirty-bitmap-add", None, soon())
            .unwrap_err();
        assert_eq!(
            err.qemu_error(),
            Some(("GenericError", "Bitmap already exists: c1"))
        );
    }

    #[test]
    fn silent_peer_times_out_and_the_socket_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _peer) = peer(dir.path(), |cmd| {
            let id = cmd["id"].clone();
            match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![format!("{}\n", json!({"return": {}, "id": id}))],
                "slow" => vec![],
                _ => vec![format!("{}\n", json!({"return": 7, "id": id}))],
            }
        });
        let mut qmp = QmpSocket::connect(&path, soon()).unwrap();
        let start = Instant::now();
        let err = qmp
            .execute("slow", None, Instant::now() + Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, QmpSocketError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(qmp.execute("fast", None, soon()).unwrap(), json!(7));
    }

    #[test]
    fn non_json_line_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _peer) = peer(dir.path(), |cmd| {
            let id = cmd["id"].clone();
            match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![format!("{}\n", json!({"return": {}, "id": id}))],
                _ => vec!["this is not json\n".to_owned()],
            }
        });
        let mut qmp = QmpSocket::connect(&path, soon()).unwrap();
        let err = qmp.execute("anything", None, soon()).unwrap_err();
        match err {
            QmpSocketError::Malformed { line, .. } => assert_eq!(line, "this is not json"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn peer_hanging_up_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            writeln!(stream, "{GREETING}").unwrap();
        });
        let mut qmp = QmpSocket::connect_unnegotiated(&path, soon()).unwrap();
        peer.join().unwrap();
        let err = qmp.negotiate(soon()).unwrap_err();
        assert!(matches!(err, QmpSocketError::Closed), "{err:?}");
    }

    #[test]
    fn wrong_first_message_is_not_a_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _peer = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            writeln!(stream, "{}", json!({"return": {}})).unwrap();
            thread::sleep(Duration::from_millis(200));
        });
        let err = QmpSocket::connect(&path, soon()).unwrap_err();
        assert!(
            matches!(err, QmpSocketError::NotAGreeting { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn missing_socket_and_stale_socket_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        assert!(matches!(
            QmpSocket::connect(&missing, soon()).unwrap_err(),
            QmpSocketError::NoSocket { .. }
        ));
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(matches!(
            QmpSocket::connect(&stale, soon()).unwrap_err(),
            QmpSocketError::ConnectionRefused { .. }
        ));
    }

    #[test]
    fn classify_keeps_ids_and_rejects_unknown_shapes() {
        let reply = classify(json!({"return": [], "id": "c1"})).unwrap();
        assert_eq!(
            reply,
            QmpMessage::Reply {
                id: Some(json!("c1")),
                result: Ok(json!([]))
            }
        );
        assert!(matches!(
            classify(json!({"something": 1})),
            Err(QmpSocketError::Malformed { .. })
        ));
        assert!(matches!(
            classify(json!({"error": {"class": 3}})),
            Err(QmpSocketError::Malformed { .. })
        ));
    }
}
