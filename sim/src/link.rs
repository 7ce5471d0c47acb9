//! [`SimLink`]: the core's [`Link`] over the simulated QEMU. Commands execute at once at the
//! link's virtual time; waiting jumps the clock straight to the next thing a job does (or to the
//! deadline), so a scenario never sleeps. [`SimEffects`] carries out the driver's file
//! operations on the same simulated host and records store writes and domain events.

use std::cell::{Ref, RefCell, RefMut};
use std::collections::VecDeque;
use std::rc::Rc;

use serde_json::{Value, json};
use vbackup_core::domain::{DomainEvent, FileOp, StoreOp};
use vbackup_core::driver::Effects;
use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::qmp::{ErrorClass, QmpCommand, QmpError as CoreQmpError, QmpIn};

use crate::errors::{NOT_RUNNING, QmpError};
use crate::qemu::Qemu;

/// Most clock jumps one `recv` makes before giving up (each one produces an event, so this
/// bound is never reached by a healthy simulation).
const MAX_JUMPS: usize = 10_000;

/// A [`Link`] to a simulated QEMU, with its own virtual clock.
#[derive(Debug)]
pub struct SimLink {
    qemu: Rc<RefCell<Qemu>>,
    now: Timestamp,
    inbox: VecDeque<QmpIn>,
}

impl SimLink {
    /// A link to `qemu`; a running process greets first.
    pub fn new(qemu: Qemu) -> Self {
        let now = Timestamp::from_ms(qemu.now_ms());
        let running = qemu.is_running();
        let mut link = SimLink {
            qemu: Rc::new(RefCell::new(qemu)),
            now,
            inbox: VecDeque::new(),
        };
        if running {
            link.push_greeting();
        }
        link
    }

    fn push_greeting(&mut self) {
        if let Ok(g) = QmpIn::from_value(Qemu::greeting()) {
            self.inbox.push_back(g);
        }
    }

    /// The simulated QEMU (for checks).
    pub fn qemu(&self) -> Ref<'_, Qemu> {
        self.qemu.borrow()
    }

    /// The simulated QEMU, mutably (for guest writes and faults).
    pub fn qemu_mut(&self) -> RefMut<'_, Qemu> {
        self.qemu.borrow_mut()
    }

    /// Effects that act on this link's simulated host.
    pub fn effects(&self) -> SimEffects {
        SimEffects {
            qemu: Rc::clone(&self.qemu),
            store_ops: Vec::new(),
            events: Vec::new(),
            failing_store_writes: 0,
        }
    }

    /// Moves the link's clock forward to `t` (jobs progress with it; their events queue up).
    pub fn advance_to(&mut self, t: Timestamp) -> Result<(), LinkError> {
        self.now = self.now.max(t);
        self.qemu.borrow_mut().advance(self.now.as_ms());
        self.pull_events()
    }

    /// Kills the QEMU process: the connection drops, pending messages are lost.
    pub fn crash(&mut self) {
        self.qemu.borrow_mut().crash();
        self.inbox.clear();
    }

    /// Starts a fresh QEMU process over the same files; it greets on the new connection.
    pub fn restart(&mut self) {
        self.qemu.borrow_mut().restart();
        self.inbox.clear();
        self.qemu.borrow_mut().advance(self.now.as_ms());
        self.push_greeting();
    }

    fn pull_events(&mut self) -> Result<(), LinkError> {
        let events = self.qemu.borrow_mut().take_events();
        for e in events {
            self.inbox.push_back(QmpIn::from_value(e)?);
        }
        Ok(())
    }
}

/// The driver's [`Effects`] on a simulated host: file operations act on the simulated file
/// system at once (QEMU opens the file right after), store writes and domain events are kept
/// for checks, and store writes can be made to fail.
#[derive(Debug)]
pub struct SimEffects {
    qemu: Rc<RefCell<Qemu>>,
    /// Every store write that succeeded, in order.
    pub store_ops: Vec<StoreOp>,
    /// Every domain event, in order.
    pub events: Vec<DomainEvent>,
    /// The next this many store writes fail.
    pub failing_store_writes: usize,
}

impl Effects for SimEffects {
    fn persist(&mut self, op: &StoreOp) -> Result<(), String> {
        if self.failing_store_writes > 0 {
            self.failing_store_writes -= 1;
            return Err("injected store failure".into());
        }
        self.store_ops.push(op.clone());
        Ok(())
    }

    fn file(&mut self, op: &FileOp) -> Result<(), String> {
        let mut q = self.qemu.borrow_mut();
        let fs = q.fs_mut();
        match op {
            FileOp::CreateExclusive { path } if fs.exists(path) => {
                Err(format!("{path}: File exists"))
            }
            FileOp::CreateExclusive { path } => {
                fs.touch(path);
                Ok(())
            }
            FileOp::Remove { path } if fs.remove(path) => Ok(()),
            FileOp::Remove { path } => Err(format!("{path}: No such file or directory")),
        }
    }

    fn event(&mut self, event: &DomainEvent) {
        self.events.push(event.clone());
    }
}

/// The core's form of a simulator error reply.
pub fn to_core_error(e: &QmpError) -> CoreQmpError {
    CoreQmpError::new(ErrorClass::from_wire(&e.class), e.desc.clone())
}

/// The wire form `{"execute", "arguments"}` of a typed command.
pub fn command_value(cmd: &QmpCommand) -> Value {
    match cmd.arguments() {
        Some(args) => json!({"execute": cmd.name(), "arguments": args}),
        None => json!({"execute": cmd.name()}),
    }
}

impl Link for SimLink {
    fn now(&self) -> Timestamp {
        self.now
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        if !self.qemu.borrow().is_running() {
            return Err(LinkError::Closed);
        }
        let result = self
            .qemu
            .borrow_mut()
            .execute(self.now.as_ms(), &command_value(cmd));
        if matches!(&result, Err(e) if e.class == NOT_RUNNING) {
            return Err(LinkError::Closed);
        }
        // Events raised while the command ran reach the client before its reply.
        self.pull_events()?;
        self.inbox.push_back(QmpIn::Reply {
            id: Some(id),
            result: result.map_err(|e| to_core_error(&e)),
        });
        Ok(())
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        for _ in 0..MAX_JUMPS {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(Some(m));
            }
            if !self.qemu.borrow().is_running() {
                return Err(LinkError::Closed);
            }
            let next = self.qemu.borrow().next_event_ms().map(Timestamp::from_ms);
            match (next, deadline) {
                (Some(n), None) => self.advance_to(n)?,
                (Some(n), Some(d)) if n <= d => self.advance_to(n)?,
                (_, Some(d)) => {
                    self.advance_to(d)?;
                    if self.inbox.is_empty() {
                        return Ok(None);
                    }
                }
                (None, None) => {
                    return Err(LinkError::Io(
                        "the simulated QEMU has nothing to deliver and no deadline was given"
                            .into(),
                    ));
                }
            }
        }
        Err(LinkError::Io(
            "the simulated QEMU kept producing nothing".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::FileSystem;
    use crate::qemu::Config;

    fn other(execute: &str, arguments: Value) -> QmpCommand {
        QmpCommand::Other {
            execute: execute.into(),
            arguments: Some(arguments),
        }
    }

    fn reply(link: &mut SimLink) -> Result<Value, CoreQmpError> {
        loop {
            match link.recv(None).unwrap() {
                Some(QmpIn::Reply { result, .. }) => return result,
                Some(_) => {}
                None => panic!("no reply"),
            }
        }
    }

    #[test]
    fn a_session_greets_negotiates_and_jumps_virtual_time_to_job_events() {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/d", 64 << 20, 65536, None);
        fs.create_qcow2("/t", 64 << 20, 65536, None);
        let mut link = SimLink::new(Qemu::new(fs, Config::default()));
        assert!(matches!(link.recv(None).unwrap(), Some(QmpIn::Greeting(_))));
        link.send(
            1.into(),
            &QmpCommand::Other {
                execute: "query-jobs".into(),
                arguments: None,
            },
        )
        .unwrap();
        let e = reply(&mut link).unwrap_err();
        assert!(e.is_negotiation_pending());
        link.send(2.into(), &other("qmp_capabilities", json!({})))
            .unwrap();
        reply(&mut link).unwrap();
        for (n, p) in [("d", "/d"), ("t", "/t")] {
            link.send(3.into(), &other("blockdev-add", json!({"driver": "qcow2", "node-name": n, "file": {"driver": "file", "filename": p}}))).unwrap();
            reply(&mut link).unwrap();
        }
        link.send(4.into(), &other("blockdev-backup", json!({"job-id": "j", "device": "d", "target": "t", "sync": "full", "auto-dismiss": false}))).unwrap();
        let mut names = Vec::new();
        loop {
            match link.recv(None).unwrap() {
                Some(QmpIn::Event(e)) => {
                    names.push(e.name().to_string());
                    if names.len() == 8 {
                        break;
                    }
                }
                Some(QmpIn::Reply { id, result }) => {
                    assert_eq!(id, Some(4.into()));
                    result.unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            names.iter().filter(|n| *n == "BLOCK_JOB_COMPLETED").count(),
            1
        );
        // 64 MiB at 512 MiB/s: the clock jumped 125 ms, no more.
        assert_eq!(link.now(), Timestamp::from_ms(125));
        assert_eq!(link.recv(Some(Timestamp::from_ms(200))).unwrap(), None);
        assert_eq!(link.now(), Timestamp::from_ms(200));
        assert!(matches!(link.recv(None), Err(LinkError::Io(_))));
        link.crash();
        assert_eq!(
            link.send(5.into(), &other("query-jobs", json!({}))),
            Err(LinkError::Closed)
        );
        assert_eq!(link.recv(None), Err(LinkError::Closed));
        link.restart();
        assert!(matches!(link.recv(None).unwrap(), Some(QmpIn::Greeting(_))));
    }

    #[test]
    fn objects_and_tls_credentials_are_checked() {
        let mut q = Qemu::negotiated(FileSystem::new(), Config::default());
        let mut run = |c: Value| q.execute(0, &c).map_err(|e| e.desc);
        run(json!({"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/etc/pki", "endpoint": "server"}})).unwrap();
        assert_eq!(
            run(json!({"execute": "object-add", "arguments": {"qom-type": "secret", "id": "tls0", "data": "x"}})).unwrap_err(),
            "attempt to add duplicate property 'tls0' to object (type 'container')"
        );
        assert_eq!(
            run(json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/s"}}, "tls-creds": "nope"}})).unwrap_err(),
            "No TLS credentials with id 'nope'"
        );
        run(json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/s"}}, "tls-creds": "tls0"}})).unwrap();
        assert_eq!(
            run(json!({"execute": "object-del", "arguments": {"id": "tls0"}})).unwrap_err(),
            "object 'tls0' is in use, can not be deleted"
        );
        assert_eq!(
            run(json!({"execute": "object-del", "arguments": {"id": "x"}})).unwrap_err(),
            "object 'x' not found"
        );
        run(json!({"execute": "nbd-server-stop"})).unwrap();
        run(json!({"execute": "object-del", "arguments": {"id": "tls0"}})).unwrap();
    }
}
