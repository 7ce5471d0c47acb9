//! [`FaultyLink`]: the core's [`Link`] over a simulated [`Qemu`], on virtual time.
//!
//! Contract: `send` encodes the typed command to its wire JSON, executes it at once at the
//! link's current time and queues the reply (with the command's id) after the events the
//! command caused. `recv` hands out queued messages first; when none is queued it jumps the
//! virtual clock to the next thing a job does by itself, or to the deadline, and never sleeps.
//! A session starts with the greeting; a dropped session answers [`LinkError::Closed`] until
//! [`FaultyLink::reconnect`]. Waiting without a deadline on an idle QEMU would never end, so it is
//! reported as [`LinkError::Io`] with [`IDLE_FOREVER`] instead of hanging.
//!
//! The QEMU is shared (`Rc<RefCell<_>>`) with whatever stands for the host around it: the
//! file effects that create image files, the guest that writes, the checkers that read images.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use serde_json::Value;
use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::qmp::{QmpCommand, QmpIn};
use vbackup_core::unstable::trace::TraceEntry;

use crate::image::LogicalImage;
use crate::qemu::Qemu;

/// The text of the error a wait without deadline on an idle simulated QEMU gives.
pub const IDLE_FOREVER: &str = "simulated QEMU is idle: waiting without a deadline never ends";

/// A QEMU shared between the link and the simulated host.
pub type SharedQemu = Rc<RefCell<Qemu>>;

/// Link faults, armed by the caller and consumed by the link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkFaults {
    /// The connection drops right after the n-th next command executed (0 = the next one),
    /// before its reply arrives.
    pub drop_after_command: Option<u32>,
}

/// A peer that stops answering, for proving that liveness checks catch a stalled engine.
/// Unlike [`LinkFaults`], a stall is never lifted: it lasts through reconnections and
/// engine restarts, as a bug would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stall {
    /// Every event about a backup job (`backup-*`) is withheld: the engine never hears that
    /// a job ended.
    JobEvents,
    /// The reply to the next command with this name is withheld.
    Reply(String),
}

impl Stall {
    /// The stall called `name`: `job-events`, or `reply:COMMAND`.
    pub fn from_name(name: &str) -> Option<Stall> {
        match name.split_once(':') {
            None if name == "job-events" => Some(Stall::JobEvents),
            Some(("reply", command)) if !command.is_empty() => {
                Some(Stall::Reply(command.to_owned()))
            }
            _ => None,
        }
    }

    /// The name [`Stall::from_name`] reads.
    pub fn name(&self) -> String {
        match self {
            Stall::JobEvents => "job-events".into(),
            Stall::Reply(command) => format!("reply:{command}"),
        }
    }

    /// Whether the stall withholds `event` (QMP wire JSON).
    fn withholds_event(&self, event: &Value) -> bool {
        let data = &event["data"];
        let id = data["id"].as_str().or_else(|| data["device"].as_str());
        *self == Stall::JobEvents && id.is_some_and(|id| id.starts_with("backup-"))
    }
}

/// The core's [`Link`] over a simulated QEMU.
#[derive(Debug)]
pub struct FaultyLink {
    qemu: SharedQemu,
    queue: VecDeque<QmpIn>,
    now_ms: u64,
    open: bool,
    faults: LinkFaults,
    sent: u64,
    record: Option<Vec<TraceEntry>>,
    points: Vec<PointInTime>,
    stall: Option<Stall>,
    /// Messages a stall kept from the engine.
    withheld: u64,
}

/// The guest-visible content of every device at the moment a `transaction` succeeded, with
/// what the transaction created: the point in time of the checkpoints and backups it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointInTime {
    /// Persistent bitmaps the transaction added (checkpoint bitmaps).
    pub persistent_bitmaps: Vec<String>,
    /// Backup jobs the transaction started.
    pub jobs: Vec<String>,
    /// Device id → the whole disk as the guest saw it (shared clusters, see
    /// [`Qemu::guest_snapshot`]).
    pub disks: BTreeMap<String, LogicalImage>,
}

impl FaultyLink {
    /// A link with a fresh session: the greeting is queued.
    pub fn new(qemu: SharedQemu) -> Self {
        let now_ms = qemu.borrow().now_ms();
        let mut link = Self {
            qemu,
            queue: VecDeque::new(),
            now_ms,
            open: false,
            faults: LinkFaults::default(),
            sent: 0,
            record: None,
            points: Vec::new(),
            stall: None,
            withheld: 0,
        };
        link.reconnect();
        link
    }

    /// The shared QEMU.
    pub fn qemu(&self) -> &SharedQemu {
        &self.qemu
    }

    /// Whether a session is open.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Commands sent successfully so far.
    pub fn commands_sent(&self) -> u64 {
        self.sent
    }

    /// Starts keeping every message that crosses the link, in the core's trace form.
    pub fn record(&mut self) {
        self.record.get_or_insert_with(Vec::new);
    }

    /// The recorded trace as JSON Lines ([`vbackup_core::unstable::trace`]'s format), if recording.
    pub fn trace_lines(&self) -> Option<String> {
        self.record.as_ref().map(|entries| {
            let mut out = String::new();
            for e in entries {
                out.push_str(&e.to_line());
                out.push('\n');
            }
            out
        })
    }

    /// Whether messages wait to be received.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Takes the points in time captured at successful transactions, oldest first.
    pub fn take_points(&mut self) -> Vec<PointInTime> {
        std::mem::take(&mut self.points)
    }

    /// Arms link faults (replacing those armed before).
    pub fn set_faults(&mut self, faults: LinkFaults) {
        self.faults = faults;
    }

    /// Stalls the peer from now on (see [`Stall`]); never lifted.
    pub fn set_stall(&mut self, stall: Stall) {
        self.stall = Some(stall);
    }

    /// How many messages the stall kept from the engine so far.
    pub fn withheld(&self) -> u64 {
        self.withheld
    }

    /// Drops the connection: queued messages are lost, sends and receives fail with
    /// [`LinkError::Closed`] until [`FaultyLink::reconnect`].
    pub fn drop_connection(&mut self) {
        self.open = false;
        self.queue.clear();
    }

    /// Opens a new QMP session on the same process (if it runs): the greeting is queued and
    /// QEMU expects `qmp_capabilities` again. Events of the old session are lost.
    pub fn reconnect(&mut self) {
        self.queue.clear();
        let mut q = self.qemu.borrow_mut();
        q.take_events();
        q.negotiated = false;
        if q.is_running() {
            self.open = true;
            let greeting = QmpIn::from_value(Qemu::greeting());
            if let Ok(g) = greeting {
                self.queue.push_back(g);
            }
        } else {
            self.open = false;
        }
    }

    /// Moves the link's clock (and QEMU's) forward to `ms`, queueing what jobs emit meanwhile.
    pub fn advance_to(&mut self, ms: u64) {
        if ms > self.now_ms {
            self.now_ms = ms;
        }
        let now = self.now_ms;
        self.qemu.borrow_mut().advance(now);
        self.collect_events();
    }

    fn capture_point(&mut self, wire: &Value) {
        let mut point = PointInTime {
            persistent_bitmaps: Vec::new(),
            jobs: Vec::new(),
            disks: BTreeMap::new(),
        };
        let actions = wire["arguments"]["actions"].as_array();
        for a in actions.into_iter().flatten() {
            let data = &a["data"];
            match a["type"].as_str() {
                Some("block-dirty-bitmap-add") if data["persistent"].as_bool() == Some(true) => {
                    if let Some(n) = data["name"].as_str() {
                        point.persistent_bitmaps.push(n.to_owned());
                    }
                }
                Some("blockdev-backup") => {
                    if let Some(j) = data["job-id"].as_str() {
                        point.jobs.push(j.to_owned());
                    }
                }
                _ => {}
            }
        }
        let q = self.qemu.borrow();
        for d in &q.st.devices {
            if let Ok(content) = q.guest_snapshot(&d.id) {
                point.disks.insert(d.id.clone(), content);
            }
        }
        drop(q);
        self.points.push(point);
    }

    fn collect_events(&mut self) {
        let events = self.qemu.borrow_mut().take_events();
        if !self.open {
            return;
        }
        for e in events {
            if self.stall.as_ref().is_some_and(|s| s.withholds_event(&e)) {
                self.withheld += 1;
                continue;
            }
            // The simulator only emits events the core can decode; one that does not decode
            // would be a simulator bug, and is dropped rather than poisoning the session.
            if let Ok(msg) = QmpIn::from_value(e) {
                self.queue.push_back(msg);
            }
        }
    }
}

impl Link for FaultyLink {
    fn now(&self) -> Timestamp {
        Timestamp::from_ms(self.now_ms)
    }

    fn send(&mut self, id: CommandId, cmd: &QmpCommand) -> Result<(), LinkError> {
        if !self.open {
            return Err(LinkError::Closed);
        }
        let wire = cmd.to_wire(None);
        let result = {
            let mut q = self.qemu.borrow_mut();
            let result = q.execute(self.now_ms, &wire);
            self.now_ms = self.now_ms.max(q.now_ms());
            result
        };
        self.sent += 1;
        if let Some(r) = &mut self.record {
            r.push(TraceEntry::Send {
                id: Some(id.clone()),
                command: cmd.clone(),
            });
        }
        if result.is_ok() && cmd.name() == "transaction" {
            self.capture_point(&wire);
        }
        self.collect_events();
        if let Some(n) = self.faults.drop_after_command {
            if n == 0 {
                self.faults.drop_after_command = None;
                self.drop_connection();
                return Ok(());
            }
            self.faults.drop_after_command = Some(n - 1);
        }
        if let Some(Stall::Reply(name)) = &self.stall
            && name == cmd.name()
        {
            // The command ran; its reply never comes (one reply, then the stall is spent).
            self.stall = None;
            self.withheld += 1;
            return Ok(());
        }
        let result = result.map_err(|e| {
            let err: Value = e.to_json();
            serde_json::from_value::<vbackup_core::qmp::QmpError>(err)
                .unwrap_or_else(|_| vbackup_core::qmp::QmpError::generic(e.desc.clone()))
        });
        self.queue.push_back(QmpIn::Reply {
            id: Some(id),
            result,
        });
        Ok(())
    }

    fn recv(&mut self, deadline: Option<Timestamp>) -> Result<Option<QmpIn>, LinkError> {
        loop {
            if !self.open {
                return Err(LinkError::Closed);
            }
            // Guest writes between two receives may have ended jobs: their events are due.
            if self.queue.is_empty() {
                self.collect_events();
            }
            if let Some(msg) = self.queue.pop_front() {
                if let Some(r) = &mut self.record {
                    r.push(TraceEntry::Recv(msg.clone()));
                }
                return Ok(Some(msg));
            }
            let next = self.qemu.borrow().next_event_ms();
            match (next, deadline) {
                (Some(t), Some(d)) if t <= d.as_ms() => self.advance_to(t.max(self.now_ms)),
                (Some(t), None) => self.advance_to(t.max(self.now_ms)),
                (_, Some(d)) => {
                    self.advance_to(d.as_ms());
                    if self.queue.is_empty() {
                        return Ok(None);
                    }
                }
                (None, None) => return Err(LinkError::Io(IDLE_FOREVER.to_owned())),
            }
            // A job milestone that emits nothing would loop forever at the same time: make
            // sure time moved or something arrived.
            if self.queue.is_empty()
                && let Some(t) = self.qemu.borrow().next_event_ms()
                && t <= self.now_ms
            {
                let now = self.now_ms + 1;
                self.now_ms = now;
                self.qemu.borrow_mut().advance(now);
            }
        }
    }
}
