//! Conformance scenarios, written once against any [`Link`] and [`Effects`]: the same code runs
//! on the simulator (tests in `sim/tests/conformance.rs`) and can run against
//! qemu-storage-daemon through the live adapter, with a [`Host`] for what a scenario does outside
//! QMP (guest writes, reading images and exports, injecting an I/O error).
//!
//! Contract: every scenario starts from a connected driver on the lab domain
//! ([`crate::world::lab_domain`]: `vda` with one layer, `vdb` an overlay over a base image)
//! without checkpoints, and returns `Err(text)` naming the first divergence. Content is compared
//! byte for byte: a backup restored through its backing chain (an incremental one over the disk
//! content at its checkpoint) must equal the disk at the backup's point in time.

use vbackup_core::backup::{BackupMode, JobStatus};
use vbackup_core::checkpoint::{DeleteScope, ListFilter};
use vbackup_core::domain::{DomainEvent, Reply, Request};
use vbackup_core::driver::{Driver, Effects};
use vbackup_core::link::Link;

use crate::world::{lab_backup, lab_checkpoint};

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
) -> Result<JobStatus, String> {
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
        Request::BackupBegin {
            spec: lab_backup(BackupMode::Push, None, "/backup/full"),
            checkpoint: Some(lab_checkpoint("c1")),
            reuse_external: false,
        },
    )?;
    // Writes while the jobs copy must not reach the backup.
    scribble(h, 2)?;
    if finish(d, events)? != JobStatus::Completed {
        return Err("the full push backup did not complete".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let got = h.restore(&format!("/backup/full/{disk}.qcow2"), None)?;
        compare(&format!("full backup of {disk}"), &got, &at_full[i])?;
    }
    scribble(h, 3)?;
    let at_inc = both(h)?;
    call(
        d,
        Request::BackupBegin {
            spec: lab_backup(BackupMode::Push, Some("c1"), "/backup/inc"),
            checkpoint: Some(lab_checkpoint("c2")),
            reuse_external: false,
        },
    )?;
    scribble(h, 4)?;
    if finish(d, events)? != JobStatus::Completed {
        return Err("the incremental push backup did not complete".into());
    }
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let got = h.restore(&format!("/backup/inc/{disk}.qcow2"), Some(&at_full[i]))?;
        compare(&format!("incremental backup of {disk}"), &got, &at_inc[i])?;
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
        Request::BackupBegin {
            spec: lab_backup(BackupMode::Pull, None, "/scratch/full"),
            checkpoint: Some(lab_checkpoint("c1")),
            reuse_external: false,
        },
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
        Request::BackupBegin {
            spec: lab_backup(BackupMode::Pull, Some("c1"), "/scratch/inc"),
            checkpoint: None,
            reuse_external: false,
        },
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
    call(d, Request::AbortJob)?;
    let ended = d
        .run_until(|dom| dom.view().backup.is_none(), STEPS)
        .map_err(|e| format!("driver stopped: {e}"))?;
    if !ended {
        return Err("the pull backup did not end after abort".into());
    }
    Ok(())
}

/// A push backup aborted at once ends cancelled.
pub fn push_abort<L: Link, E: Effects>(
    d: &mut Drv<L, E>,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    call(
        d,
        Request::BackupBegin {
            spec: lab_backup(BackupMode::Push, None, "/backup/aborted"),
            checkpoint: None,
            reuse_external: false,
        },
    )?;
    call(d, Request::AbortJob)?;
    match finish(d, events)? {
        JobStatus::Cancelled => Ok(()),
        other => Err(format!("an aborted push ended {other:?}")),
    }
}

/// A push backup whose target fails with EIO ends failed, with QEMU's error.
pub fn push_io_error<L: Link, E: Effects, H: Host>(
    d: &mut Drv<L, E>,
    h: &mut H,
    events: impl Fn(&E) -> &[DomainEvent] + Copy,
) -> Result<(), String> {
    call(
        d,
        Request::BackupBegin {
            spec: lab_backup(BackupMode::Push, None, "/backup/eio"),
            checkpoint: None,
            reuse_external: false,
        },
    )?;
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
        JobStatus::Failed => Ok(()),
        other => Err(format!("a backup with a failing target ended {other:?}")),
    }
}
