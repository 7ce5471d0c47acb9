//! A short real session through `SocketLink` wrapped in `TraceRecorder`: the trace file reads
//! back with the core's trace reader, holds exactly the session, and replays with `ReplayLink`.

use std::fs;

use serde_json::json;
use vbackup_core::link::{CommandId, Link, NameMap, ReplayLink, Timestamp};
use vbackup_core::model::ImageFormat;
use vbackup_core::qmp::{ErrorClass, JobStatus, QmpCommand, QmpEvent, QmpIn};
use vbackup_core::unstable::trace::{self, TraceEntry};
use vbackup_qemu::live::{self, LiveLab};
use vbackup_qemu::qmp_socket::SocketLink;
use vbackup_qemu::qsd::{QsdDisk, format_node};
use vbackup_qemu::recorder::TraceRecorder;

const MIB: u64 = 1024 * 1024;

/// The session so far, as the client saw it.
struct Session<L: Link> {
    link: L,
    seen: Vec<TraceEntry>,
    next_id: u64,
}

impl<L: Link> Session<L> {
    fn send(&mut self, execute: &str, arguments: serde_json::Value) -> CommandId {
        let command = QmpCommand::from_parts(execute, Some(arguments)).unwrap();
        self.next_id += 1;
        let id = CommandId::Number(self.next_id);
        self.link.send(id.clone(), &command).unwrap();
        self.seen.push(TraceEntry::Send {
            id: Some(id.clone()),
            command,
        });
        id
    }

    /// Receives until `done` has been true for some message; returns the messages.
    fn recv_until(&mut self, mut done: impl FnMut(&QmpIn) -> bool) -> Vec<QmpIn> {
        let deadline = self.link.now().plus_ms(10_000);
        let mut got = Vec::new();
        loop {
            let message = self
                .link
                .recv(Some(deadline))
                .unwrap()
                .expect("a message before the deadline");
            self.seen.push(TraceEntry::Recv(message.clone()));
            let finished = done(&message);
            got.push(message);
            if finished {
                return got;
            }
        }
    }

    fn reply_to(&mut self, id: &CommandId) -> QmpIn {
        let got = self.recv_until(|m| matches!(m, QmpIn::Reply { id: Some(got), .. } if got == id));
        got.into_iter().last().unwrap()
    }
}

fn is_status(message: &QmpIn, job: &str, status: JobStatus) -> bool {
    matches!(message, QmpIn::Event(QmpEvent::JobStatusChange(change))
        if change.id == job && change.status == status)
}

#[test]
fn recorded_real_session_reads_back_and_replays() {
    if !live::tools_available() {
        // A live test fails, never skips, where what it needs is missing.
        panic!(
            "QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon): install qemu-utils 10"
        );
    }
    let mut lab = LiveLab::new().unwrap();
    let image = lab.image("vda.qcow2", ImageFormat::Qcow2, 8 * MIB).unwrap();
    let qsd = lab
        .start_qsd("run", &[QsdDisk::single("vda", &image, ImageFormat::Qcow2)])
        .unwrap();
    let link = SocketLink::new(qsd.into_qmp());
    let greeting = QmpIn::Greeting(link.greeting().clone());
    let trace_path = lab.file("session.jsonl");
    let mut recorder = TraceRecorder::create(link, &trace_path).unwrap();
    recorder.record_received(&greeting).unwrap();
    let mut session = Session {
        link: recorder,
        seen: vec![TraceEntry::Recv(greeting)],
        next_id: 0,
    };

    let node = format_node("vda", 0);
    let add = json!({"node": node, "name": "c1", "persistent": true, "granularity": 65536});
    let first = session.send("block-dirty-bitmap-add", add.clone());
    let reply = session.reply_to(&first);
    assert!(
        matches!(reply, QmpIn::Reply { result: Ok(_), .. }),
        "{reply:?}"
    );

    let again = session.send("block-dirty-bitmap-add", add);
    let QmpIn::Reply {
        result: Err(error), ..
    } = session.reply_to(&again)
    else {
        panic!("a duplicate bitmap must be refused");
    };
    assert_eq!(error.class, ErrorClass::GenericError);
    assert_eq!(error.desc, "Bitmap already exists: c1");

    // A job, so events are interleaved with the replies in the trace.
    let target = lab.file("new.raw");
    let create = session.send(
        "blockdev-create",
        json!({"job-id": "mk", "options": {"driver": "file",
               "filename": target.display().to_string(), "size": 0}}),
    );
    // The job may conclude before or after the reply arrives; wait for both.
    let (mut replied, mut concluded) = (false, false);
    session.recv_until(|m| {
        replied |= matches!(m, QmpIn::Reply { id: Some(id), .. } if *id == create);
        concluded |= is_status(m, "mk", JobStatus::Concluded);
        replied && concluded
    });
    let dismiss = session.send("job-dismiss", json!({"id": "mk"}));
    let (mut replied, mut gone) = (false, false);
    session.recv_until(|m| {
        replied |= matches!(m, QmpIn::Reply { id: Some(id), .. } if *id == dismiss);
        gone |= is_status(m, "mk", JobStatus::Null);
        replied && gone
    });
    let query = session.send("query-named-block-nodes", json!({"flat": true}));
    session.reply_to(&query);

    let Session { link, seen, .. } = session;
    let (_, writer) = link.into_parts();
    drop(writer);

    // The file reads back with the core's reader and holds exactly what the client saw.
    let text = fs::read_to_string(&trace_path).unwrap();
    let lines = trace::parse(&text).unwrap();
    let recorded: Vec<TraceEntry> = lines.iter().map(|l| l.entry.clone()).collect();
    assert_eq!(recorded, seen);
    assert!(
        recorded
            .iter()
            .any(|e| matches!(e, TraceEntry::Recv(QmpIn::Event(_)))),
        "the session has events"
    );

    // And it replays: the same commands get the same messages back.
    let mut replay = ReplayLink::new(lines, &NameMap::new(), Timestamp::ZERO);
    for entry in &seen {
        match entry {
            TraceEntry::Send { id, command } => {
                replay.send(id.clone().unwrap(), command).unwrap();
            }
            TraceEntry::Recv(message) => {
                let got = replay.recv(Some(Timestamp::from_ms(1))).unwrap();
                assert_eq!(got.as_ref(), Some(message));
            }
        }
    }
    assert!(replay.is_finished());
}
