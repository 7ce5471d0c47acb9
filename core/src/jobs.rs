//! Job exclusion: the domain job slots and the per-disk block job registry.
//!
//! A domain runs at most one long job (a backup) and, beside it, at most one short operation
//! that talks to QEMU (a checkpoint create, delete, size or validation). A disk that takes part
//! in a backup is busy: no other block job may touch it. A conflicting request is refused at
//! once with an error naming the holder; nothing waits.

use std::collections::BTreeMap;

use crate::error::ConflictError;

/// What occupies a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// A push or pull backup.
    Backup,
    /// A backup being started (its preparation talks to QEMU).
    BackupStart,
    /// Creating a checkpoint.
    CheckpointCreate(String),
    /// Deleting a checkpoint.
    CheckpointDelete(String),
    /// Computing a checkpoint's size.
    CheckpointSize(String),
    /// Validating a redefined checkpoint against QEMU.
    CheckpointValidate(String),
    /// Querying QEMU after a reconnection.
    Reconcile,
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobKind::Backup => f.write_str("backup"),
            JobKind::BackupStart => f.write_str("backup-begin"),
            JobKind::CheckpointCreate(n) => write!(f, "checkpoint-create {n}"),
            JobKind::CheckpointDelete(n) => write!(f, "checkpoint-delete {n}"),
            JobKind::CheckpointSize(n) => write!(f, "checkpoint-size {n}"),
            JobKind::CheckpointValidate(n) => write!(f, "checkpoint-validate {n}"),
            JobKind::Reconcile => f.write_str("reconcile"),
        }
    }
}

/// The two slots of a domain and the busy disks.
#[derive(Debug, Clone, Default)]
pub struct JobSlots {
    long: Option<JobKind>,
    short: Option<JobKind>,
    busy_disks: BTreeMap<String, String>,
}

impl JobSlots {
    /// Empty slots.
    pub fn new() -> Self {
        Self::default()
    }

    /// The long job, if any.
    pub fn long_job(&self) -> Option<&JobKind> {
        self.long.as_ref()
    }

    /// The short operation in flight, if any.
    pub fn short_job(&self) -> Option<&JobKind> {
        self.short.as_ref()
    }

    /// Takes the long slot (a backup). The short slot must also be free, because starting the
    /// backup itself talks to QEMU; the caller takes it next with [`Self::acquire_short`].
    pub fn acquire_long(&mut self, kind: JobKind) -> Result<(), ConflictError> {
        if let Some(h) = self.long.as_ref().or(self.short.as_ref()) {
            return Err(ConflictError::DomainJob {
                holder: h.to_string(),
            });
        }
        self.long = Some(kind);
        Ok(())
    }

    /// Releases the long slot.
    pub fn release_long(&mut self) {
        self.long = None;
    }

    /// Takes the short slot. Allowed while a backup runs (checkpoint operations are, as in
    /// libvirt), refused while another short operation is in flight.
    pub fn acquire_short(&mut self, kind: JobKind) -> Result<(), ConflictError> {
        if let Some(h) = &self.short {
            return Err(ConflictError::DomainJob {
                holder: h.to_string(),
            });
        }
        self.short = Some(kind);
        Ok(())
    }

    /// Releases the short slot.
    pub fn release_short(&mut self) {
        self.short = None;
    }

    /// The block job holding a disk, if any.
    pub fn disk_holder(&self, disk: &str) -> Option<&str> {
        self.busy_disks.get(disk).map(String::as_str)
    }

    /// Checks that none of `disks` is busy.
    pub fn check_disks_free<'a>(
        &self,
        disks: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ConflictError> {
        for d in disks {
            if let Some(h) = self.busy_disks.get(d) {
                return Err(ConflictError::DiskBusy {
                    disk: d.to_owned(),
                    holder: h.clone(),
                });
            }
        }
        Ok(())
    }

    /// Marks `disks` busy for block job `job`; all or nothing.
    pub fn occupy_disks(&mut self, disks: &[String], job: &str) -> Result<(), ConflictError> {
        self.check_disks_free(disks.iter().map(String::as_str))?;
        for d in disks {
            self.busy_disks.insert(d.clone(), job.to_owned());
        }
        Ok(())
    }

    /// Frees every disk held by block job `job`.
    pub fn free_disks_of(&mut self, job: &str) {
        self.busy_disks.retain(|_, h| h != job);
    }

    /// Busy disks and their holders, by disk.
    pub fn busy_disks(&self) -> &BTreeMap<String, String> {
        &self.busy_disks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_backup_is_refused_naming_the_first() {
        let mut s = JobSlots::new();
        s.acquire_long(JobKind::Backup).unwrap();
        assert_eq!(
            s.acquire_long(JobKind::Backup),
            Err(ConflictError::DomainJob {
                holder: "backup".into()
            })
        );
    }

    #[test]
    fn checkpoint_operation_runs_beside_backup_but_not_beside_another() {
        let mut s = JobSlots::new();
        s.acquire_long(JobKind::Backup).unwrap();
        s.acquire_short(JobKind::CheckpointCreate("c1".into()))
            .unwrap();
        assert_eq!(
            s.acquire_short(JobKind::CheckpointDelete("c0".into())),
            Err(ConflictError::DomainJob {
                holder: "checkpoint-create c1".into()
            })
        );
        s.release_short();
        s.acquire_short(JobKind::CheckpointDelete("c0".into()))
            .unwrap();
    }

    #[test]
    fn backup_cannot_start_while_checkpoint_operation_is_in_flight() {
        let mut s = JobSlots::new();
        s.acquire_short(JobKind::CheckpointSize("c1".into()))
            .unwrap();
        assert!(s.acquire_long(JobKind::Backup).is_err());
    }

    #[test]
    fn busy_disk_refuses_other_block_jobs_until_freed() {
        let mut s = JobSlots::new();
        s.occupy_disks(&["vda".into(), "vdb".into()], "backup")
            .unwrap();
        assert_eq!(
            s.occupy_disks(&["vdc".into(), "vdb".into()], "commit"),
            Err(ConflictError::DiskBusy {
                disk: "vdb".into(),
                holder: "backup".into()
            })
        );
        assert_eq!(s.disk_holder("vdc"), None);
        s.free_disks_of("backup");
        s.occupy_disks(&["vdb".into()], "commit").unwrap();
    }
}
