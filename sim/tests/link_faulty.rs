//! FaultyLink: the core's Link over the simulated QEMU, on virtual time.

use std::cell::RefCell;
use std::rc::Rc;

use vbackup_core::link::{CommandId, Link, LinkError, Timestamp};
use vbackup_core::qmp::{QmpCommand, QmpIn};
use vbackup_sim::world::link::{FaultyLink, IDLE_FOREVER, LinkFaults};
use vbackup_sim::world::{boot_lab, lab_files};
use vbackup_sim::{Config, Qemu};

fn lab_link() -> FaultyLink {
    let mut q = Qemu::new(lab_files(), Config::default());
    boot_lab(&mut q).expect("lab boots");
    FaultyLink::new(Rc::new(RefCell::new(q)))
}

fn cmd(name: &str, args: Option<serde_json::Value>) -> QmpCommand {
    QmpCommand::from_parts(name, args).expect("known command")
}

fn reply(link: &mut FaultyLink) -> (Option<CommandId>, Result<serde_json::Value, String>) {
    loop {
        match link.recv(Some(link.now().plus_ms(1))).expect("open") {
            Some(QmpIn::Reply { id, result }) => return (id, result.map_err(|e| e.desc)),
            Some(_) => continue,
            None => panic!("no reply"),
        }
    }
}

#[test]
fn session_starts_with_greeting_and_needs_capabilities() {
    let mut link = lab_link();
    assert!(matches!(link.recv(None), Ok(Some(QmpIn::Greeting(_)))));
    link.send(1.into(), &cmd("query-jobs", None)).unwrap();
    let (id, r) = reply(&mut link);
    assert_eq!(id, Some(CommandId::Number(1)));
    assert!(
        r.unwrap_err().contains("capabilities"),
        "QEMU expects negotiation first"
    );
    link.send(2.into(), &cmd("qmp_capabilities", None)).unwrap();
    assert_eq!(
        reply(&mut link),
        (Some(2.into()), Ok(serde_json::json!({})))
    );
}

#[test]
fn recv_jumps_virtual_time_to_job_events_and_to_the_deadline_without_sleeping() {
    let mut link = lab_link();
    link.recv(None).unwrap();
    link.send(1.into(), &cmd("qmp_capabilities", None)).unwrap();
    assert!(reply(&mut link).1.is_ok());
    // Idle QEMU: the deadline passes at once, the clock reads it.
    let start = link.now();
    assert_eq!(link.recv(Some(start.plus_ms(60_000))).unwrap(), None);
    assert_eq!(link.now(), start.plus_ms(60_000));
    // Waiting forever on an idle QEMU is an error, not a hang.
    assert_eq!(link.recv(None), Err(LinkError::Io(IDLE_FOREVER.into())));
    // A backup job's events come by themselves as virtual time runs.
    link.qemu().borrow_mut().fs_mut().touch("/t.qcow2");
    let args = serde_json::json!({"driver": "file", "node-name": "t-file", "filename": "/t.qcow2"});
    link.send(2.into(), &cmd("blockdev-add", Some(args)))
        .unwrap();
    assert!(reply(&mut link).1.is_ok());
    let create = serde_json::json!({"job-id": "c", "options": {"driver": "qcow2", "file": "t-file", "size": 524288}});
    link.send(3.into(), &cmd("blockdev-create", Some(create)))
        .unwrap();
    let before = link.now();
    let mut concluded = false;
    for _ in 0..20 {
        if let Some(QmpIn::Event(e)) = link.recv(None).unwrap()
            && e.data()["status"] == "concluded"
        {
            concluded = true;
            break;
        }
    }
    assert!(concluded, "the create job concludes on virtual time");
    assert!(link.now() >= before);
    assert!(link.now() < Timestamp::from_ms(before.as_ms() + 1_000));
}

#[test]
fn dropped_link_fails_until_reconnect_and_a_reply_can_be_lost_after_execution() {
    let mut link = lab_link();
    link.recv(None).unwrap();
    link.set_faults(LinkFaults {
        drop_after_command: Some(0),
    });
    link.send(1.into(), &cmd("qmp_capabilities", None)).unwrap();
    assert_eq!(link.recv(None), Err(LinkError::Closed), "the reply is lost");
    assert_eq!(
        link.send(2.into(), &cmd("query-jobs", None)),
        Err(LinkError::Closed)
    );
    link.reconnect();
    assert!(matches!(link.recv(None), Ok(Some(QmpIn::Greeting(_)))));
    // The command ran before the drop, but a new session negotiates again.
    link.send(3.into(), &cmd("qmp_capabilities", None)).unwrap();
    assert_eq!(reply(&mut link).1, Ok(serde_json::json!({})));
}

#[test]
fn a_crashed_qemu_closes_the_session_and_offers_no_new_one() {
    let mut link = lab_link();
    link.recv(None).unwrap();
    link.qemu().borrow_mut().crash();
    link.reconnect();
    assert!(!link.is_open());
    assert_eq!(link.recv(None), Err(LinkError::Closed));
}
