//! `blockdev-backup`: argument checks in QEMU's order with its texts, and the job set-up
//! (sync bitmap frozen with a successor, copy-before-write filter inserted above the source,
//! target blocked). `on-source-error` and `on-target-error` are accepted; every policy acts as
//! the default `report` (the job fails), since pausing on errors is not modelled.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::args::Args;
use crate::bitmap::{Bits, CHECK_ALLOW_RO, CHECK_DEFAULT, DirtyBitmap};
use crate::errors::QmpError;
use crate::image::FileContent;
use crate::job::{BackupJob, BitmapMode, Job, JobKind, JobStatus, SyncMode};
use crate::node::{Driver, Node};
use crate::qemu::Qemu;

const BACKUP_OPTIONS: &[&str] = &[
    "job-id",
    "device",
    "target",
    "sync",
    "bitmap",
    "bitmap-mode",
    "speed",
    "compress",
    "on-source-error",
    "on-target-error",
    "auto-finalize",
    "auto-dismiss",
    "filter-node-name",
    "x-perf",
    "discard-source",
];

/// Default copy granule of backup jobs.
const BACKUP_CLUSTER: u64 = 65536;

impl Qemu {
    /// Validates a backup and creates its job in state `created` (emitting that event).
    /// `txn` groups the jobs of a grouped transaction. Returns the job id.
    pub(crate) fn prepare_backup(
        &mut self,
        a: &Args<'_>,
        txn: Option<u64>,
    ) -> Result<String, QmpError> {
        a.only(BACKUP_OPTIONS)?;
        let device = a.str("device")?;
        let target_arg = a.str("target")?;
        let sync_str = a
            .opt_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?
            .ok_or_else(|| QmpError::missing_parameter(&format!("{}sync", a.prefix())))?;
        let bitmap_name = a.opt_str("bitmap")?;
        let mode_str = a.opt_enum("bitmap-mode", &["on-success", "never", "always"])?;
        let speed = a.opt_u64("speed")?.unwrap_or(0);
        let auto_finalize = a.bool_or("auto-finalize", true)?;
        let auto_dismiss = a.bool_or("auto-dismiss", true)?;
        a.opt_enum(
            "on-source-error",
            &["report", "ignore", "enospc", "stop", "auto"],
        )?;
        a.opt_enum(
            "on-target-error",
            &["report", "ignore", "enospc", "stop", "auto"],
        )?;
        let job_id = a.opt_str("job-id")?.unwrap_or("");
        let filter_name = a.opt_str("filter-node-name")?;

        let source = self.lookup_device_or_node(device)?;
        let target = self.lookup_device_or_node(target_arg)?;

        if matches!(sync_str, "bitmap" | "incremental") && bitmap_name.is_none() {
            return Err(QmpError::backup_needs_bitmap(sync_str));
        }
        let mut sync = match sync_str {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            _ => SyncMode::Bitmap,
        };
        let mut mode = match mode_str {
            Some("never") => Some(BitmapMode::Never),
            Some("always") => Some(BitmapMode::Always),
            Some(_) => Some(BitmapMode::OnSuccess),
            None => None,
        };
        if sync_str == "incremental" {
            if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
                return Err(QmpError::backup_incremental_mode(mode_str.unwrap_or("")));
            }
            sync = SyncMode::Bitmap;
            mode = Some(BitmapMode::OnSuccess);
        }
        let mut bitmap_uid = None;
        if let Some(name) = bitmap_name {
            let bm = self
                .node(&source)
                .and_then(|n| n.bitmaps.iter().find(|b| b.name.as_deref() == Some(name)))
                .ok_or_else(|| QmpError::backup_bitmap_not_found(name))?;
            let Some(m) = mode else {
                return Err(QmpError::backup_bitmap_mode_missing());
            };
            let (b, r, i) = CHECK_ALLOW_RO;
            bm.check(b, r, i)?;
            if sync == SyncMode::None {
                return Err(QmpError::backup_none_with_bitmap());
            }
            if m == BitmapMode::Never && sync != SyncMode::Bitmap {
                return Err(QmpError::backup_never_useless(sync_str));
            }
            bitmap_uid = Some(bm.uid);
        } else if mode.is_some() {
            return Err(QmpError::backup_mode_without_bitmap());
        }
        let mode = mode.unwrap_or(BitmapMode::OnSuccess);

        if source == target {
            return Err(QmpError::backup_same_node());
        }
        for n in [&source, &target] {
            if self.node(n).is_some_and(|n| !n.job_users.is_empty()) {
                return Err(QmpError::node_busy_by_job(n, "backup"));
            }
        }
        if let Some(uid) = bitmap_uid
            && mode != BitmapMode::Never
        {
            let bm = self.bitmap_by_uid(&source, uid).expect("found above");
            let (b, r, i) = CHECK_DEFAULT;
            bm.check(b, r, i)?;
        }
        let size = self.node_size(&source);
        if self.node_size(&target) != size {
            return Err(QmpError::backup_size_mismatch());
        }
        if self.node(&target).is_some_and(|n| n.read_only) {
            return Err(QmpError::generic("Block node is read-only"));
        }
        self.check_new_job_id(job_id)?;
        if let Some(f) = filter_name {
            if !crate::args::id_wellformed(f) {
                return Err(QmpError::invalid_node_name(f));
            }
            if self.st.nodes.contains_key(f) {
                return Err(QmpError::duplicate_node(f));
            }
        }

        // Everything is checked: build the job.
        let target_cs = match self.image_path(&target).and_then(|p| self.fs.get(&p)) {
            Some(FileContent::Qcow2(q)) => q.cluster_size,
            _ => BACKUP_CLUSTER,
        };
        let granule = target_cs.max(BACKUP_CLUSTER);
        let granules = size.div_ceil(granule);
        let mut pending = Bits::new(granules);
        match sync {
            SyncMode::Full | SyncMode::None => pending.set_range(0, granules),
            SyncMode::Top => {
                let mut off = 0;
                while off < size {
                    let top_alloc = match self.image_path(&source).and_then(|p| self.fs.get(&p)) {
                        Some(FileContent::Qcow2(q)) => q.data.get(off / q.cluster_size).is_some(),
                        _ => true,
                    };
                    if top_alloc {
                        pending.set(off / granule);
                    }
                    off += granule.min(target_cs);
                }
            }
            SyncMode::Bitmap => {
                let bm = self
                    .bitmap_by_uid(&source, bitmap_uid.expect("bitmap sync"))
                    .expect("found");
                for g in bm.bits.iter_set() {
                    let (s, e) = (g * bm.granularity, ((g + 1) * bm.granularity).min(size));
                    pending.set_range(s / granule, e.div_ceil(granule));
                }
            }
        }
        let pending_bytes: u64 = pending
            .iter_set()
            .map(|g| granule.min(size.saturating_sub(g * granule)))
            .sum();
        let (total, current) = match sync {
            SyncMode::Bitmap => (pending_bytes, 0),
            SyncMode::Top => (size, size - pending_bytes),
            _ => (size, 0),
        };
        let target_has_backing = self.node(&target).is_some_and(|n| n.backing.is_some())
            || matches!(self.image_path(&target).and_then(|p| self.fs.get(&p)),
                Some(FileContent::Qcow2(q)) if q.backing_file.is_some());
        let explicit_zero = sync != SyncMode::Full || target_has_backing;

        if let Some(uid) = bitmap_uid {
            let succ_uid = self.st.bitmap_uid();
            let parent = self.bitmap_by_uid_mut(&source, uid).expect("found");
            let mut succ = DirtyBitmap::new(succ_uid, None, parent.granularity, parent.size);
            succ.disabled = parent.disabled;
            parent.disabled = true;
            parent.busy = true;
            parent.successor = Some(succ_uid);
            if let Some(n) = self.node_mut(&source) {
                n.bitmaps.insert(0, succ);
            }
        }

        let filter = match filter_name {
            Some(f) => f.to_string(),
            None => self.st.anon_node_name(),
        };
        let seq = self.st.next_node_seq;
        self.st.next_node_seq += 1;
        // The filter takes over the source's parents, except those below the target (a
        // fleecing scratch keeps the source as its backing).
        let below_target = self.subtree(&target);
        for n in self.st.nodes.values_mut() {
            if n.file.as_deref() == Some(source.as_str()) && !below_target.contains(&n.name) {
                n.file = Some(filter.clone());
            }
        }
        for d in self.st.devices.iter_mut() {
            if d.node == source {
                d.node = filter.clone();
            }
        }
        for e in self.st.exports.values_mut() {
            if e.node == source {
                e.node = filter.clone();
            }
        }
        self.st.nodes.insert(
            filter.clone(),
            Node {
                name: filter.clone(),
                seq,
                drv: "copy-before-write",
                driver: Driver::CopyBeforeWrite {
                    target: target.clone(),
                    done: Bits::new(0),
                    job: Some(job_id.to_string()),
                },
                read_only: false,
                file: Some(source.clone()),
                backing: None,
                implicit: Vec::new(),
                monitor_owned: false,
                bitmaps: Vec::new(),
                job_users: BTreeSet::new(),
                detect_zeroes: "off",
            },
        );
        if let Some(t) = self.node_mut(&target) {
            t.job_users.insert(job_id.to_string());
        }
        if self.node(&target).is_some_and(|n| n.drv == "qcow2")
            && let Some(path) = self.image_path(&target)
            && !self.st.unflushed_images.contains_key(&path)
        {
            let before = self.fs.get(&path).cloned();
            self.st.unflushed_images.insert(path, before);
        }
        let seq = self.new_job_seq();
        let now = self.now_ms;
        self.st.jobs.insert(
            job_id.to_string(),
            Job {
                id: job_id.to_string(),
                seq,
                kind: JobKind::Backup(Box::new(BackupJob {
                    source,
                    target,
                    filter,
                    sync,
                    bitmap: bitmap_uid,
                    bitmap_mode: mode,
                    granule,
                    size,
                    pending,
                    cursor: 0,
                    cbw_copied: 0,
                    explicit_zero,
                    failure: None,
                    released: false,
                })),
                status: JobStatus::Created,
                auto_finalize,
                auto_dismiss,
                user_paused: false,
                current,
                total,
                speed,
                error: None,
                txn,
                epoch_ms: now,
                epoch_done: 0,
            },
        );
        self.emit(
            "JOB_STATUS_CHANGE",
            json!({"status": "created", "id": job_id}),
        );
        Ok(job_id.to_string())
    }

    /// Nodes reachable downwards from `node` (children, backing, filter targets).
    fn subtree(&self, node: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![node.to_string()];
        while let Some(n) = stack.pop() {
            if seen.len() > 4096 || !seen.insert(n.clone()) {
                continue;
            }
            if let Some(x) = self.node(&n) {
                stack.extend(x.file.clone());
                stack.extend(x.backing.clone());
                if let Driver::CopyBeforeWrite { target, .. } = &x.driver {
                    stack.push(target.clone());
                }
            }
        }
        seen
    }

    /// `blockdev-backup` outside a transaction behaves as a transaction of one action.
    pub(crate) fn cmd_blockdev_backup(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        self.run_transaction(vec![crate::transaction::Action::Backup(a.clone())], false)
    }
}

#[cfg(test)]
mod tests {
    use crate::image::FileSystem;
    use crate::qemu::{Config, Qemu};
    use serde_json::json;

    fn q() -> Qemu {
        let mut fs = FileSystem::new();
        fs.create_qcow2("/s.qcow2", 8 << 20, 65536, None);
        fs.create_qcow2("/t.qcow2", 8 << 20, 1 << 20, None);
        let mut q = Qemu::negotiated(fs, Config::default());
        for (n, p) in [("s", "/s.qcow2"), ("t", "/t.qcow2")] {
            q.execute(0, &json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": n, "file": {"driver": "file", "filename": p}}})).unwrap();
        }
        q
    }

    #[test]
    fn the_copy_granule_follows_a_larger_target_cluster() {
        let mut q = q();
        q.execute(0, &json!({"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "s", "target": "t", "sync": "full", "filter-node-name": "flt"}})).unwrap();
        let b = q.st.jobs["j"].backup().unwrap();
        assert_eq!(b.granule, 1 << 20);
        assert_eq!(b.pending.count(), 8);
        assert_eq!(b.filter, "flt");
        assert_eq!(q.node("flt").unwrap().drv, "copy-before-write");
    }

    /// Runs a full backup of `s` into `t` to its conclusion (not dismissed).
    fn backed_up() -> Qemu {
        let mut q = q();
        q.guest_write(0, "s", 0, &[7; 65536]).unwrap();
        q.execute(0, &json!({"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "s", "target": "t", "sync": "full", "auto-dismiss": false}})).unwrap();
        q.advance(600_000);
        let jobs = q.execute(0, &json!({"execute": "query-jobs"})).unwrap();
        assert_eq!(jobs[0]["status"], "concluded");
        q
    }

    #[test]
    fn a_crash_before_the_target_closed_loses_what_the_job_wrote() {
        let mut q = backed_up();
        assert_eq!(q.fs().read_image("/t.qcow2").unwrap()[..2], [7, 7]);
        q.crash();
        assert_eq!(q.fs().read_image("/t.qcow2").unwrap()[..2], [0, 0]);
    }

    #[test]
    fn a_clean_close_of_the_target_keeps_what_the_job_wrote() {
        let mut q = backed_up();
        q.execute(
            0,
            &json!({"execute": "job-dismiss", "arguments": {"id": "j"}}),
        )
        .unwrap();
        q.execute(
            0,
            &json!({"execute": "blockdev-del", "arguments": {"node-name": "t"}}),
        )
        .unwrap();
        q.crash();
        assert_eq!(q.fs().read_image("/t.qcow2").unwrap()[..2], [7, 7]);
    }

    #[test]
    fn a_taken_filter_name_is_refused_before_anything_changes() {
        let mut q = q();
        let e = q.execute(0, &json!({"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "s", "target": "t", "sync": "full", "filter-node-name": "s"}})).unwrap_err();
        assert_eq!(e.desc, "Duplicate nodes with node-name='s'");
        assert!(q.st.jobs.is_empty());
        assert!(q.take_events().is_empty());
    }
}
