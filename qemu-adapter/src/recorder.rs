//! [`TraceRecorder`]: a link wrapper that streams the core's JSONL trace format to a writer.
//!
//! Contract: every command the wrapped link sent successfully and every message it received is
//! written as one trace line ([`vbackup_core::unstable::trace`]), in the order they passed, and flushed
//! before the call returns, so a process killed mid-job leaves a trace that is complete up to its
//! last message and that [`vbackup_core::unstable::trace::parse`] reads back. The core's in-memory
//! [`vbackup_core::link::Recorder`] keeps entries in memory instead; this one is for real runs,
//! whose traces must survive the process. A failure to write the trace fails the link call with
//! [`LinkError::Io`]: a recording with silent holes would replay wrongly.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::qmp::{QmpCommand, QmpIn};
use vbackup_core::unstable::trace::TraceEntry;

/// Wraps a link and writes the trace of everything passing through it; see the module contract.
#[derive(Debug)]
pub struct TraceRecorder<L, W: Write = BufWriter<File>> {
    inner: L,
    out: W,
    lines_written: usize,
}

impl<L: Link> TraceRecorder<L, BufWriter<File>> {
    /// Records into a new file at `path` (an existing file is truncated).
    pub fn create(inner: L, path: &Path) -> io::Result<Self> {
        Ok(TraceRecorder::new(
            inner,
            BufWriter::new(File::create(path)?),
        ))
    }
}

impl<L: Link, W: Write> TraceRecorder<L, W> {
    /// Records into `out`.
    pub fn new(inner: L, out: W) -> Self {
        TraceRecorder {
            inner,
            out,
            lines_written: 0,
        }
    }

    /// Writes a message that did not pass through the link (the greeting read while connecting,
    /// for instance) as a `recv` line.
    pub fn record_received(&mut self, message: &QmpIn) -> Result<(), LinkError> {
        self.write(&TraceEntry::Recv(message.clone()))
    }

    /// How many trace lines were written.
    pub fn lines_written(&self) -> usize {
        self.lines_written
    }

    /// The wrapped link.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// The wrapped link, mutably (what passes through it directly is not recorded).
    pub fn inner_mut(&mut self) -> &mut L {
        &mut self.inner
    }

    /// Ends recording: the wrapped link and the writer (already flushed).
    pub fn into_parts(self) -> (L, W) {
        (self.inner, self.out)
    }

    fn write(&mut self, entry: &TraceEntry) -> Result<(), LinkError> {
        let mut line = entry.to_line();
        line.push('\n');
        self.out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|e| LinkError::Io(format!("cannot write the QMP trace: {e}")))?;
        self.lines_written += 1;
        Ok(())
    }
}

impl<L: Link, W: Write> Link for TraceRecorder<L, W> {
    fn now(&self) -> Timestamp {
        self.inner.now()
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        self.inner.send(id.clone(), cmd)?;
        self.write(&TraceEntry::Send {
            id: Some(id),
            command: cmd.clone(),
        })
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        let message = self.inner.recv(deadline)?;
        if let Some(message) = &message {
            self.write(&TraceEntry::Recv(message.clone()))?;
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vbackup_core::link::{NameMap, ReplayLink};
    use vbackup_core::unstable::trace;

    const RECORDED: &str = concat!(
        r#"{"dir":"send","msg":{"execute":"query-jobs","id":"libvirt-1"}}"#,
        "\n",
        r#"{"dir":"recv","msg":{"event":"JOB_STATUS_CHANGE","data":{"id":"j","status":"running"}}}"#,
        "\n",
        r#"{"dir":"recv","msg":{"return":[],"id":"libvirt-1"}}"#,
        "\n",
    );

    fn replay() -> ReplayLink {
        ReplayLink::new(
            trace::parse(RECORDED).unwrap(),
            &NameMap::new(),
            Timestamp::ZERO,
        )
    }

    #[test]
    fn every_message_becomes_one_flushed_trace_line() {
        let mut recorder = TraceRecorder::new(replay(), Vec::new());
        recorder
            .send(CommandId::Number(1), &QmpCommand::QueryJobs)
            .unwrap();
        let event = recorder.recv(None).unwrap().unwrap();
        assert!(matches!(event, QmpIn::Event(_)));
        let reply = recorder.recv(None).unwrap().unwrap();
        assert_eq!(
            reply,
            QmpIn::Reply {
                id: Some(CommandId::Number(1)),
                result: Ok(json!([]))
            }
        );
        assert_eq!(recorder.lines_written(), 3);
        let (_, out) = recorder.into_parts();
        let text = String::from_utf8(out).unwrap();
        let lines = trace::parse(&text).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0].entry,
            TraceEntry::Send {
                id: Some(CommandId::Number(1)),
                command: QmpCommand::QueryJobs
            }
        );
        assert_eq!(lines[2].entry, TraceEntry::Recv(reply));
    }

    #[test]
    fn failed_send_is_not_recorded() {
        let mut recorder = TraceRecorder::new(replay(), Vec::new());
        let err = recorder
            .send(CommandId::Number(1), &QmpCommand::QueryBlock)
            .unwrap_err();
        assert!(matches!(err, LinkError::Diverged { .. }), "{err:?}");
        assert_eq!(recorder.lines_written(), 0);
    }

    /// A writer that always fails, like a full disk.
    struct FullDisk;

    impl Write for FullDisk {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn trace_write_failure_fails_the_link_call() {
        let mut recorder = TraceRecorder::new(replay(), FullDisk);
        let err = recorder
            .send(CommandId::Number(1), &QmpCommand::QueryJobs)
            .unwrap_err();
        assert!(
            matches!(err, LinkError::Io(ref text) if text.contains("no space left")),
            "{err:?}"
        );
    }
}
