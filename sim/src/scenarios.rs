//! Conformance scenarios, written once against any [`Link`] and [`Effects`]: the same code runs
//! on the simulator (`sim/tests/conformance.rs`) and against qemu-storage-daemon through the
//! live adapter (`qemu-adapter/tests/conformance_live.rs`), with a [`Host`] for what a scenario
//! does outside QMP (guest writes, reading images and exports, slowing jobs, injecting an I/O
//! error, crashing QEMU).
//!
//! The scenarios: checkpoint create/delete/redefine/validate; push full then incremental;
//! incremental pushes with an idle disk and with every disk clean; pull
//! full then incremental with guest writes during each pull; abort of a slowed push; a push
//! whose target fails with EIO; vbackup restarted mid-job; QEMU killed after a checkpoint; pull
//! backups on an NBD server QEMU already runs (refused elsewhere, served there).
//!
//! Contract: every scenario starts from a connected driver on the lab domain
//! ([`crate::world::lab_domain`]: `vda` with one layer, `vdb` an overlay over a base image)
//! without checkpoints, and returns `Err(text)` naming the first divergence. Content is compared
//! byte for byte: a backup restored through its backing chain (an incremental one over the disk
//! content at its checkpoint) must equal the disk at the backup's point in time. Every scenario
//! backs up both disks, so each one covers several disks and a disk with a backing layer.
//!
//! Paths a scenario names (`/backup/...`) are lab paths; a host places them in its own file
//! system ([`Host::place`]). Disk sizes are the host's: scenarios write below 320 KiB only.

use vbackup_core::Domain;
use vbackup_core::backup::{BackupMode, DomainJobStatus};
use vbackup_core::backup::{BackupSpec, NbdServer, NbdTransport};
use vbackup_core::checkpoint::{DeleteScope, ListFilter};
use vbackup_core::domain::{DomainConfig, DomainEvent, Reply, Request, StoreOp, StoredState};
use vbackup_core::driver::{Driver, Effects};
use vbackup_core::error::{Error, RequestError};
use vbackup_core::link::Link;

use crate::world::{lab_backup, lab_checkpoint};

/// The NBD socket of pull backups on the simulator.
pub const SIM_NBD_SOCKET: &str = "/run/vbackup-sim.sock";

/// The rate slowed jobs copy at, in bytes per second: a 512 KiB disk takes seconds, so a
/// request sent right after the start finds the job running.
pub const SLOW_JOB_BYTES_PER_S: u64 = 64 << 10;

/// The rate of a job that must outlive a restart of vbackup and then finish: a 512 KiB disk
/// takes about half a second.
pub const RESTART_JOB_BYTES_PER_S: u64 = 1 << 20;

/// Steps allowed for a new QMP session to be negotiated and reconciled.
const CONNECT_STEPS: usize = 1_000;

/// What a scenario needs besides QMP.
pub trait Host {
    /// Writes `data` at `offset` on the guest disk `disk` (a disk target).
    fn guest_write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), String>;
    /// The whole disk as the guest sees it now.
    fn disk_content(&mut self, disk: &str) -> Result<Vec<u8>, String>;
    /// Restores the backup image at `path` over `base` (the content its backing stands for;
    /// `None` for a full backup) and reads the result.
    fn restore(&mut self, path: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String>;
    /// Reads the NBD export `name` as a pull client: everything, or only the dirty extents
    /// laid over `base` for an incremental export.
    fn read_export(&mut self, name: &str, base: Option<&[u8]>) -> Result<Vec<u8>, String>;
    /// Makes writes to the node `node` fail with EIO from now on; false when the host cannot.
    fn fail_writes_to(&mut self, node: &str) -> bool;
    /// Called before a backup whose target [`Host::fail_writes_to`] will name. A host that can
    /// only build a failing target while it is created (real QEMU: a `blkdebug` layer) arms
    /// that here; false when the host cannot. Hosts that inject at any moment need nothing.
    fn prepare_write_failure(&mut self) -> bool {
        true
    }
    /// Limits the copy rate of backup jobs started from now on to `bytes_per_s` (`None` lifts
    /// the limit), as QEMU's job `speed` does. (The simulator has one copy rate for all jobs,
    /// so there the limit also reaches running ones; scenarios lift it right after a start.)
    fn slow_jobs(&mut self, bytes_per_s: Option<u64>) -> Result<(), String>;
    /// Where the lab path `lab_path` (a backup directory) lives on this host.
    fn place(&mut self, lab_path: &str) -> String {
        lab_path.to_owned()
    }
    /// The unix socket of the NBD server pull backups use on this host.
    fn nbd_socket(&mut self) -> String {
        SIM_NBD_SOCKET.to_owned()
    }
    /// The configuration vbackup runs the lab domain with on this host.
    fn domain_config(&self) -> DomainConfig {
        DomainConfig::default()
    }
    /// Kills QEMU as SIGKILL does and starts it again over the same images with the lab's
    /// nodes. vbackup's link is then dead until the scenario opens a new one.
    fn crash_qemu(&mut self) -> Result<(), String>;
}

/// A backup of both lab disks into `dir` (a lab path), placed on the host.
fn spec<H: Host>(h: &mut H, mode: BackupMode, incremental: Option<&str>, dir: &str) -> BackupSpec {
    let mut spec = lab_backup(mode, incremental, &h.place(dir));
    if let Some(server) = &mut spec.server {
        server.transport = NbdTransport::Unix {
            socket: h.nbd_socket(),
        };
    }
    spec
}

/// The request to back up both lab disks into `dir` (a lab path), creating `checkpoint`.
fn backup<H: Host>(
    h: &mut H,
    mode: BackupMode,
    incremental: Option<&str>,
    dir: &str,
    checkpoint: Option<&str>,
) -> Request {
    Request::BackupBegin {
        spec: spec(h, mode, incremental, dir),
        checkpoint: checkpoint.map(lab_checkpoint),
        reuse_external: false,
    }
}

/// The image a backup into `dir` (a lab path) wrote for `disk`, placed on the host.
fn image<H: Host>(h: &mut H, dir: &str, disk: &str) -> String {
    h.place(&format!("{dir}/{disk}.qcow2"))
}

/// Steps a scenario allows one request to take.
const STEPS: usize = 10_000;

type Drv<L, E> = Driver<L, E>;

fn call<L: Link, E: Effects>(d: &mut Drv<L, E>, r: Request) -> Result<Reply, String> {
    match d.call(r, STEPS) {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(format!("request refused: {e}")),
        Err(e) => Err(format!("driver stopped: {e}")),
    }
}

fn both<H: Host>(h: &mut H) -> Result<[Vec<u8>; 2], String> {
    Ok([h.disk_content("vda")?, h.disk_content("vdb")?])
}

fn scribble<H: Host>(h: &mut H, seed: u8) -> Result<(), String> {
    h.guest_write("vda", 70_000 + u64::from(seed) * 1000, &[seed; 9_000])?;
    h.guest_write(
        "vdb",
        200_000 + u64::from(seed) * 3000,
        &[seed ^ 0x5a; 70_000],
    )?;
    h.guest_write("vdb", 5, &[seed; 3])
}

/// Drives until the backup ends; its final status.
fn finish<L: Link, E: Effects>(
    d: &mut Drv<L, E>,
    events: impl Fn(&E) -> &[DomainEvent],
) -> Result<DomainJobStatus, String> {
    let ended = d
        .run_until(|dom| dom.view().backup.is_none(), STEPS)
        .map_err(|e| format!("driver stopped: {e}"))?;
    if !ended {
        return Err("the backup never ended".into());
    }
    events(d.effects())
        .iter()
        .rev()
        .find_map(|e| match e {
            DomainEvent::JobCompleted(s) => Some(s.status),
            _ => None,
        })
        .ok_or_else(|| "no JOB_COMPLETED event".into())
}

fn compare(what: &str, got: &[u8], expected: &[u8]) -> Result<(), String> {
    if got == expected {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    Err(format!(
        "{what}: differs at byte {at} (lengths {} and {})",
        got.len(),
        expected.len()
    ))
}

fn names<L: Link, E: Effects>(d: &mut Drv<L, E>) -> Result<Vec<String>, String> {
    match call(
        d,
        Request::CheckpointList {
            filter: ListFilter::default(),
        },
    )? {
        Reply::CheckpointNames(mut n) => {
            n.sort();
            Ok(n)
        }
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Create, delete (metadata only), redefine with validation, delete for real.
pub fn checkpoint_lifecycle<L: Link, E: Effects>(d: &mut Drv<L, E>) -> Result<(), String> {
    for n in ["c1", "c2"] {
        call(
            d,
            Request::CheckpointCreate {
                checkpoint: lab_checkpoint(n),
                quiesce: false,
            },
        )?;
    }
    let c2 = d
        .domain()
        .view()
        .checkpoints
        .get("c2")
        .cloned()
        .ok_or("c2 missing after create")?;
    if c2.parent.as_deref() != Some("c1") {
        return Err(format!("c2's parent is {:?}", c2.parent));
    }
    call(
        d,
        Request::CheckpointDelete {
            name: "c2".into(),
            scope: DeleteScope::Single,
            metadata_only: true,
        },
    )?;
    if names(d)? != ["c1"] {
        return Err("metadata-only delete left the wrong checkpoints".into());
    }
    call(
        d,
        Request::CheckpointRedefine {
            checkpoint: c2,
            validate: true,
        },
    )?;
    if names(d)? != ["c1", "c2"] {
        return Err("redefine did not bring c2 back".into());
    }
    call(
        d,
        Request::CheckpointDelete {
            name: "c1".into(),
            scope: DeleteScope::WithChildren,
            metadata_only: false,
        },
    )?;
    if !names(d)?.is_empty() {
        return Err("delete with children left checkpoints".into());
    }
    // A redefine with validation of a checkpoint whose bitmaps are gone is refused.
    let refused = d
        .call(
            Request::CheckpointRedefine {
                checkpoint: lab_checkpoint("c1"),
                validate: true,
            },
            STEPS,
        )
        .map_err(|e| format!("driver stopped: {e}"))?;
    if refused.is_ok() {
        return Err("validated redefine of a checkpoint without bitmaps succeeded".into());
    }
    Ok(())
}

/// Push full (creating c1), guest writes, push incremental from c1; both restore exactly.
pub fn push_full_then_incremental<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    scribble(h, 1)?;
    let at_full = both(h)?;
    call(
        d,
        backup(h, BackupMode::Push, None, "/backup/full", Some("c1")),
    )?;
    // Writes while the jobs copy must not reach the backup.
    scribble(h, 2)?;
    if finish(d, events)? != DomainJobStatus::Completed {
        return Err("the full push backup did not complete".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, "/backup/full", disk);
        let got = h.restore(&path, None)?;
        compare(&format!("full backup of {disk}"), &got, &at_full[i])?;
    }
    scribble(h, 3)?;
    let at_inc = both(h)?;
    call(
        d,
        backup(h, BackupMode::Push, Some("c1"), "/backup/inc", Some("c2")),
    )?;
    scribble(h, 4)?;
    if finish(d, events)? != DomainJobStatus::Completed {
        return Err("the incremental push backup did not complete".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, "/backup/inc", disk);
        let got = h.restore(&path, Some(&at_full[i]))?;
        compare(&format!("incremental backup of {disk}"), &got, &at_inc[i])?;
    }
    Ok(())
}

/// Ends the running pull backup as its client does when done (an abort) and drives until it
/// has ended.
fn end_pull<L: Link, E: Effects>(d: &mut Drv<L, E>) -> Result<(), String> {
    call(d, Request::AbortJob)?;
    let ended = d
        .run_until(|dom| dom.view().backup.is_none(), STEPS)
        .map_err(|e| format!("driver stopped: {e}"))?;
    if !ended {
        return Err("the pull backup did not end after abort".into());
    }
    Ok(())
}

/// Push full (creating c1); only `vda` changes, incremental push from c1 (creating c2) with
/// `vdb` idle; then nothing changes at all and an incremental from c2 (creating c3) finds every
/// disk clean. QEMU concludes a backup job with nothing to copy inside the `transaction`,
/// before its reply: each backup must still end, and restore exactly (the clean ones to the
/// content they are incremental over).
pub fn push_incremental_with_idle_disks<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    scribble(h, 1)?;
    let at_full = both(h)?;
    let full = PushCheck {
        incremental: None,
        dir: "/backup/full",
        checkpoint: "c1",
        what: "full push",
    };
    push_completes_and_restores(d, h, events, &full, None, &at_full)?;
    h.guest_write("vda", 3 * CLUSTER_BYTES, &[0x7e; CLUSTER_BYTES as usize])?;
    let at_one = both(h)?;
    if at_one[1] != at_full[1] {
        return Err("vdb changed though nothing wrote to it".into());
    }
    let one_idle = PushCheck {
        incremental: Some("c1"),
        dir: "/backup/one-idle",
        checkpoint: "c2",
        what: "incremental push with vdb idle",
    };
    push_completes_and_restores(d, h, events, &one_idle, Some(&at_full), &at_one)?;
    let all_idle = PushCheck {
        incremental: Some("c2"),
        dir: "/backup/all-idle",
        checkpoint: "c3",
        what: "incremental push with every disk clean",
    };
    push_completes_and_restores(d, h, events, &all_idle, Some(&at_one), &at_one)?;
    if names(d)? != ["c1", "c2", "c3"] {
        return Err("the incremental backups did not create their checkpoints".into());
    }
    Ok(())
}

/// The lab's cluster size, for writes that fill whole clusters.
const CLUSTER_BYTES: u64 = 64 << 10;

/// One push backup of both lab disks that must complete.
struct PushCheck<'a> {
    incremental: Option<&'a str>,
    dir: &'a str,
    checkpoint: &'a str,
    what: &'a str,
}

/// Runs the push `p` to its end and checks it completed and that each disk's image, restored
/// over `base` (the content it is incremental over), equals `expected`.
fn push_completes_and_restores<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
    p: &PushCheck<'_>,
    base: Option<&[Vec<u8>; 2]>,
    expected: &[Vec<u8>; 2],
) -> Result<(), String> {
    call(
        d,
        backup(
            h,
            BackupMode::Push,
            p.incremental,
            p.dir,
            Some(p.checkpoint),
        ),
    )?;
    if finish(d, events)? != DomainJobStatus::Completed {
        return Err(format!("the {} did not complete", p.what));
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, p.dir, disk);
        let got = h.restore(&path, base.map(|b| b[i].as_slice()))?;
        compare(&format!("{} of {disk}", p.what), &got, &expected[i])?;
    }
    Ok(())
}

/// Pull full (creating c1) and incremental from c1, with guest writes during each pull: the
/// exports read the content of the backup's start.
pub fn pull_point_in_time<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
) -> Result<(), String> {
    scribble(h, 5)?;
    let at_full = both(h)?;
    call(
        d,
        backup(h, BackupMode::Pull, None, "/scratch/full", Some("c1")),
    )?;
    scribble(h, 6)?;
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let got = h.read_export(disk, None)?;
        compare(&format!("full pull export of {disk}"), &got, &at_full[i])?;
    }
    call(d, Request::AbortJob)?;
    d.run_until(|dom| dom.view().backup.is_none(), STEPS)
        .map_err(|e| format!("driver stopped: {e}"))?;
    scribble(h, 7)?;
    let at_inc = both(h)?;
    call(
        d,
        backup(h, BackupMode::Pull, Some("c1"), "/scratch/inc", None),
    )?;
    scribble(h, 8)?;
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let got = h.read_export(disk, Some(&at_full[i]))?;
        compare(
            &format!("incremental pull export of {disk}"),
            &got,
            &at_inc[i],
        )?;
    }
    end_pull(d)
}

/// A push backup slowed down (job `speed`) and aborted while it copies ends cancelled, having
/// copied less than everything; the next backup, at full speed, completes.
pub fn push_abort<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    h.slow_jobs(Some(SLOW_JOB_BYTES_PER_S))?;
    call(
        d,
        backup(h, BackupMode::Push, None, "/backup/aborted", None),
    )?;
    h.slow_jobs(None)?;
    call(d, Request::AbortJob)?;
    match finish(d, events)? {
        DomainJobStatus::Cancelled => {}
        other => return Err(format!("an aborted push ended {other:?}")),
    }
    let stats = last_stats(d, events)?;
    if let (Some(done), Some(total)) = (stats.disk_processed_bytes, stats.disk_total_bytes)
        && done >= total
    {
        return Err(format!(
            "the aborted job copied everything ({done} of {total})"
        ));
    }
    call(
        d,
        backup(h, BackupMode::Push, None, "/backup/after-abort", None),
    )?;
    match finish(d, events)? {
        DomainJobStatus::Completed => Ok(()),
        other => Err(format!("the backup after an abort ended {other:?}")),
    }
}

/// The statistics of the last finished job.
fn last_stats<L: Link, E: Effects>(
    d: &mut Drv<L, E>,
    events: impl Fn(&E) -> &[DomainEvent],
) -> Result<vbackup_core::backup::JobStats, String> {
    events(d.effects())
        .iter()
        .rev()
        .find_map(|e| match e {
            DomainEvent::JobCompleted(s) => Some(s.clone()),
            _ => None,
        })
        .ok_or_else(|| "no JOB_COMPLETED event".into())
}

/// A push backup whose target fails with EIO ends failed, with QEMU's error; a backup after it
/// completes and creates its checkpoint.
pub fn push_io_error<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    if !h.prepare_write_failure() {
        return Err("the host cannot inject an I/O error".into());
    }
    // Slowed, so that the fault is in place before the job writes on any host.
    h.slow_jobs(Some(SLOW_JOB_BYTES_PER_S))?;
    call(d, backup(h, BackupMode::Push, None, "/backup/eio", None))?;
    h.slow_jobs(None)?;
    let target = d
        .domain()
        .view()
        .backup
        .and_then(|p| p.disks.first().map(|x| x.format_node.clone()))
        .ok_or("no running backup")?;
    if !h.fail_writes_to(&target) {
        return Err("the host cannot inject an I/O error".into());
    }
    match finish(d, events)? {
        DomainJobStatus::Failed => {}
        other => return Err(format!("a backup with a failing target ended {other:?}")),
    }
    let stats = last_stats(d, events)?;
    match stats.errmsg.as_deref() {
        Some(e) if e.contains("Input/output error") => {}
        other => return Err(format!("a failed backup reports {other:?}")),
    }
    call(
        d,
        backup(h, BackupMode::Push, None, "/backup/after-eio", Some("c1")),
    )?;
    match finish(d, events)? {
        DomainJobStatus::Completed => {}
        other => return Err(format!("the backup after a failure ended {other:?}")),
    }
    if names(d)? != ["c1"] {
        return Err("the backup after a failure did not create its checkpoint".into());
    }
    Ok(())
}

/// Drives until a fresh QMP session is negotiated and reconciled.
fn reconnect<L: Link, E: Effects>(d: &mut Drv<L, E>) -> Result<(), String> {
    let up = d
        .run_until(|dom| dom.view().connected, CONNECT_STEPS)
        .map_err(|e| format!("driver stopped: {e}"))?;
    if up {
        Ok(())
    } else {
        Err("the new QMP session never came up".into())
    }
}

/// vbackup dies while a push backup (creating c1) copies and starts again from its store over a
/// new QMP session (`relink` opens one on the link): the job is recovered from the journal,
/// completes, its images restore to the disks at its start, and c1 exists. Returns the new
/// driver.
pub fn engine_restart_mid_backup<L: Link, E: Effects, H: Host>(
    d: Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
    persisted: impl Fn(&E) -> &[StoreOp],
    mut relink: impl FnMut(&mut L) -> Result<(), String>,
) -> Result<Drv<L, E>, String> {
    let mut d = d;
    scribble(h, 9)?;
    let at_start = both(h)?;
    h.slow_jobs(Some(RESTART_JOB_BYTES_PER_S))?;
    call(
        &mut d,
        backup(h, BackupMode::Push, None, "/backup/restart", Some("c1")),
    )?;
    h.slow_jobs(None)?;
    let def = d.domain().view().def.clone();
    let (_, mut link, effects) = d.into_parts();
    if StoredState::from_ops(persisted(&effects))
        .backup_journal
        .is_none()
    {
        return Err("a running backup left no journal".into());
    }
    relink(&mut link)?;
    let mut d = restart_engine(def, h.domain_config(), link, effects, persisted)?;
    match finish(&mut d, events)? {
        DomainJobStatus::Completed => {}
        other => return Err(format!("the recovered backup ended {other:?}")),
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, "/backup/restart", disk);
        let got = h.restore(&path, None)?;
        compare(&format!("recovered backup of {disk}"), &got, &at_start[i])?;
    }
    if names(&mut d)? != ["c1"] {
        return Err("the recovered backup did not keep its checkpoint".into());
    }
    Ok(d)
}

/// QEMU is killed (SIGKILL) after a full backup created checkpoint c1, and started again over
/// the same images: c1's bitmaps were never written to them, so an incremental backup from c1
/// is refused with a typed error, and a full backup creating c2 completes and restores exactly.
/// The two halves are [`crash_after_new_checkpoint`] and [`new_checkpoint_lost_in_crash`]; a
/// host whose restarted QEMU names its nodes anew (legacy `-drive` disks) runs them with a
/// restart of vbackup on a rediscovered domain in between.
pub fn qemu_crash_loses_new_checkpoint<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
    mut relink: impl FnMut(&mut L) -> Result<(), String>,
) -> Result<(), String> {
    crash_after_new_checkpoint(d, h, events)?;
    // The old session is gone with the process; the engine learns it, then a new one opens.
    let _ = d.link_down();
    relink(d.link_mut())?;
    reconnect(d)?;
    new_checkpoint_lost_in_crash(d, h, events)
}

/// The first half of [`qemu_crash_loses_new_checkpoint`]: a full push backup creating c1, then
/// QEMU is killed and started again ([`Host::crash_qemu`]).
pub fn crash_after_new_checkpoint<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    call(
        d,
        backup(
            h,
            BackupMode::Push,
            None,
            "/backup/before-crash",
            Some("c1"),
        ),
    )?;
    if finish(d, events)? != DomainJobStatus::Completed {
        return Err("the backup before the crash did not complete".into());
    }
    h.crash_qemu()
}

/// The second half of [`qemu_crash_loses_new_checkpoint`], on a driver connected to the
/// restarted QEMU: the incremental from c1 is refused, a full backup creating c2 restores.
pub fn new_checkpoint_lost_in_crash<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    scribble(h, 10)?;
    let refused = d
        .call(
            backup(
                h,
                BackupMode::Push,
                Some("c1"),
                "/backup/after-crash-inc",
                None,
            ),
            STEPS,
        )
        .map_err(|e| format!("driver stopped: {e}"))?;
    match refused {
        Err(Error::Request(RequestError::CheckpointInconsistent { bitmap, .. }))
            if bitmap == "c1" => {}
        other => {
            return Err(format!(
                "an incremental backup from a checkpoint lost in a crash answered {other:?}"
            ));
        }
    }
    let at_full = both(h)?;
    call(
        d,
        backup(h, BackupMode::Push, None, "/backup/after-crash", Some("c2")),
    )?;
    if finish(d, events)? != DomainJobStatus::Completed {
        return Err("the full backup after the crash did not complete".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, "/backup/after-crash", disk);
        let got = h.restore(&path, None)?;
        compare(
            &format!("full backup after the crash of {disk}"),
            &got,
            &at_full[i],
        )?;
    }
    Ok(())
}

/// Checkpoints taken before and after an external snapshot both serve incremental backups:
/// a full push creates c1; the host puts a new overlay on top of `vdb` while the guest runs
/// (`snapshot`, which also gives the core the domain's new layers, as redefining it after a
/// snapshot does, and returns the driver to go on with); an incremental from c1 creating c2 and
/// an incremental from c2 then restore exactly, with guest writes between and during each.
/// (The simulator does not model `blockdev-snapshot`; this runs against real QEMU.)
pub fn checkpoints_survive_a_live_snapshot<L: Link, E: Effects, H: Host>(
    d: Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
    snapshot: impl FnOnce(Drv<L, E>, &mut H) -> Result<Drv<L, E>, String>,
) -> Result<Drv<L, E>, String> {
    let mut d = d;
    scribble(h, 11)?;
    let at_full = both(h)?;
    call(
        &mut d,
        backup(h, BackupMode::Push, None, "/backup/snap-full", Some("c1")),
    )?;
    scribble(h, 12)?;
    if finish(&mut d, events)? != DomainJobStatus::Completed {
        return Err("the full push backup did not complete".into());
    }
    scribble(h, 13)?;
    let mut d = snapshot(d, h)?;
    scribble(h, 14)?;
    let at_c2 = both(h)?;
    call(
        &mut d,
        backup(
            h,
            BackupMode::Push,
            Some("c1"),
            "/backup/snap-inc1",
            Some("c2"),
        ),
    )?;
    scribble(h, 15)?;
    if finish(&mut d, events)? != DomainJobStatus::Completed {
        return Err("the incremental from the checkpoint before the snapshot failed".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, "/backup/snap-inc1", disk);
        let got = h.restore(&path, Some(&at_full[i]))?;
        compare(&format!("incremental from c1 of {disk}"), &got, &at_c2[i])?;
    }
    scribble(h, 16)?;
    let at_inc2 = both(h)?;
    call(
        &mut d,
        backup(h, BackupMode::Push, Some("c2"), "/backup/snap-inc2", None),
    )?;
    if finish(&mut d, events)? != DomainJobStatus::Completed {
        return Err("the incremental from the checkpoint after the snapshot failed".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let path = image(h, "/backup/snap-inc2", disk);
        let got = h.restore(&path, Some(&at_c2[i]))?;
        compare(&format!("incremental from c2 of {disk}"), &got, &at_inc2[i])?;
    }
    if names(&mut d)? != ["c1", "c2"] {
        return Err("the checkpoints did not survive the snapshot".into());
    }
    Ok(d)
}

/// A new driver for the domain `def` over `link`, with the checkpoints and journal of the
/// store operations `persisted`: vbackup started again on a domain defined anew.
pub fn restart_engine<L: Link, E: Effects>(
    def: vbackup_core::model::DomainDef,
    config: DomainConfig,
    link: L,
    effects: E,
    persisted: impl Fn(&E) -> &[StoreOp],
) -> Result<Drv<L, E>, String> {
    let domain = Domain::from_stored(def, config, StoredState::from_ops(persisted(&effects)));
    let mut d = Driver::new(domain, link, effects);
    reconnect(&mut d)?;
    Ok(d)
}

/// Pull backups on a domain whose QEMU already runs the NBD server (a managed daemon serving
/// its guest exports; the host's [`Host::domain_config`] names it): a backup whose `<server>`
/// names another socket, TCP, or TLS the server does not have is refused with a typed error
/// naming both before anything starts (no checkpoint, no job); one without `<server>` puts its
/// exports on the running server, where they read the backup's point in time.
pub fn pull_on_the_running_server<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
) -> Result<(), String> {
    let running = h.nbd_socket();
    let others = [
        NbdServer {
            transport: NbdTransport::Unix {
                socket: format!("{running}.other"),
            },
            tls: None,
        },
        NbdServer {
            transport: NbdTransport::Tcp {
                host: "127.0.0.1".into(),
                port: Some(10809),
            },
            tls: None,
        },
        NbdServer {
            transport: NbdTransport::Unix {
                socket: running.clone(),
            },
            tls: Some(true),
        },
    ];
    for other in others {
        let mut request = backup(h, BackupMode::Pull, None, "/scratch/refused", Some("c1"));
        if let Request::BackupBegin { spec, .. } = &mut request {
            spec.server = Some(other.clone());
        }
        let answer = d
            .call(request, STEPS)
            .map_err(|e| format!("driver stopped: {e}"))?;
        match answer {
            Err(Error::Request(RequestError::NbdServerInUse {
                running: named,
                requested,
            })) if named.contains(&running) && requested == other.to_string() => {}
            other_answer => {
                return Err(format!(
                    "a pull on {other} while the server runs at {running} answered {other_answer:?}"
                ));
            }
        }
        if !names(d)?.is_empty() || d.domain().view().backup.is_some() {
            return Err(format!(
                "the refused pull on {other} left a checkpoint or a job"
            ));
        }
    }
    scribble(h, 11)?;
    let at_start = both(h)?;
    let mut request = backup(h, BackupMode::Pull, None, "/scratch/running", Some("c1"));
    if let Request::BackupBegin { spec, .. } = &mut request {
        spec.server = None;
    }
    call(d, request)?;
    let server = d
        .domain()
        .view()
        .backup
        .and_then(|p| p.server.clone())
        .ok_or("the running pull records no server")?;
    if server.transport != (NbdTransport::Unix { socket: running }) {
        return Err(format!("the pull without <server> runs on {server}"));
    }
    scribble(h, 12)?;
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let got = h.read_export(disk, None)?;
        compare(&format!("pull export of {disk}"), &got, &at_start[i])?;
    }
    end_pull(d)
}
