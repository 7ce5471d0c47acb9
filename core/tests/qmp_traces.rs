//! Every recorded message of `testdata/traces/libvirt-11.3` decodes into the typed vocabulary, and
//! every recorded command re-encodes to the JSON that was recorded.
// Tests read the recordings from disk; the no-IO rule is the library's, not its tests'.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;

use serde_json::Value;
use vbackup_core::qmp::{QmpCommand, QmpEvent, QmpIn, TransactionAction};
use vbackup_core::unstable::trace::{self, Direction, TraceEntry};

fn trace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/traces/libvirt-11.3")
}

fn recordings() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(trace_dir())
        .expect("trace directory exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("readable trace");
            (name, text)
        })
        .collect();
    files.sort();
    files
}

/// Commands libvirt sent that are outside the vocabulary on purpose (VM start-up probes and
/// monitor passthrough); everything else must decode typed.
const FOREIGN_COMMANDS: &[&str] = &[
    "qom-get",
    "qom-list",
    "human-monitor-command",
    "query-migrate-capabilities",
    "migrate-set-capabilities",
    "query-chardev",
    "query-hotpluggable-cpus",
    "query-cpus-fast",
    "query-iothreads",
    "cont",
];

#[test]
fn every_recorded_line_decodes_into_typed_messages() {
    let files = recordings();
    assert!(
        files.len() >= 30,
        "expected the libvirt 11.3 recordings, found {}",
        files.len()
    );
    let mut commands = 0;
    let mut events = 0;
    let mut replies = 0;
    for (name, text) in &files {
        let lines = trace::parse(text).unwrap_or_else(|err| panic!("{name}: {err}"));
        for line in lines {
            match &line.entry {
                TraceEntry::Send { id, command } => {
                    commands += 1;
                    assert!(
                        id.is_some(),
                        "{name}:{}: libvirt always sends ids",
                        line.line
                    );
                    if let QmpCommand::Other { execute, .. } = command {
                        assert!(
                            FOREIGN_COMMANDS.contains(&execute.as_str()),
                            "{name}:{}: {execute} fell back to Other",
                            line.line
                        );
                    }
                    if let QmpCommand::Transaction(tx) = command {
                        for action in &tx.actions {
                            assert!(
                                !matches!(action, TransactionAction::Other { .. }),
                                "{name}:{}: untyped action {}",
                                line.line,
                                action.action_type()
                            );
                        }
                    }
                }
                TraceEntry::Recv(QmpIn::Event(event)) => {
                    events += 1;
                    assert!(
                        !matches!(event, QmpEvent::Unknown { .. }),
                        "{name}:{}: event {} is untyped",
                        line.line,
                        event.name()
                    );
                }
                TraceEntry::Recv(QmpIn::Reply { .. }) => replies += 1,
                TraceEntry::Recv(QmpIn::Greeting(greeting)) => {
                    assert_eq!(greeting.version.qemu.major, 10);
                }
            }
        }
    }
    assert!(
        commands > 600 && events > 190 && replies > 600,
        "{commands} {events} {replies}"
    );
}

#[test]
fn recorded_commands_reencode_to_the_recorded_json() {
    for (name, text) in recordings() {
        for raw in trace::parse_raw(&text).unwrap() {
            if raw.dir != Direction::Send {
                continue;
            }
            let (id, command) = QmpCommand::from_wire(raw.msg.clone())
                .unwrap_or_else(|err| panic!("{name}:{}: {err}", raw.line));
            assert_eq!(command.to_wire(id.as_ref()), raw.msg, "{name}:{}", raw.line);
            let reparsed: Value = serde_json::from_str(&command.encode(id.as_ref())).unwrap();
            assert_eq!(reparsed, raw.msg, "{name}:{} (text encoding)", raw.line);
        }
    }
}

#[test]
fn recorded_traces_rewrite_line_for_line() {
    // Writing the typed trace back gives the same messages, apart from event members the
    // vocabulary does not name (none in these recordings) and `timestamp` (already removed).
    for (name, text) in recordings() {
        let lines = trace::parse(&text).unwrap();
        let written = trace::format(lines.iter().map(|line| &line.entry));
        let original = trace::parse_raw(&text).unwrap();
        let rewritten = trace::parse_raw(&written).unwrap();
        assert_eq!(original.len(), rewritten.len(), "{name}");
        for (a, b) in original.iter().zip(&rewritten) {
            assert_eq!(a.dir, b.dir, "{name}:{}", a.line);
            assert_eq!(a.msg, b.msg, "{name}:{}", a.line);
        }
    }
}
