//! A backup job on this host: the checkpoint and backup documents a command builds, the checks
//! made before one starts, following it to its end (with the write-out of push targets), and
//! the statistics files other invocations read meanwhile and afterwards.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vbackup_core::backup::{BackupMode, BackupPlan, BackupSpec, DiskJobState, JobStats, NbdServer};
use vbackup_core::checkpoint::Checkpoint;
use vbackup_core::domain::{DomainEvent, Reply, Request};
use vbackup_core::error::Error as EngineError;
use vbackup_core::xml::{CheckpointDef, CheckpointMode, align_checkpoint};
use vbackup_qemu::store::write_atomic;

use crate::domains::{esc, now_s};
use crate::effects::{COMPLETED_FILE, PROGRESS_FILE};
use crate::error::Error;
use crate::session::{self, Attachment, Loaded, Session};

/// How often push targets are handed to the host's write-out while a job is followed.
const WRITE_BEHIND_MS: u64 = 200;

/// Drives the session until the backup job ends, polling the job's statistics every `poll_ms`
/// (each poll is written to [`PROGRESS_FILE`] for `domjobinfo` run meanwhile by others, who
/// cannot reach the daemon's monitor while this invocation holds it, and handed to `progress`);
/// returns the job's final statistics.
pub fn follow(
    s: &mut Session,
    poll_ms: u64,
    mut progress: impl FnMut(&JobStats),
) -> Result<Option<JobStats>, Error> {
    use vbackup_core::link::Link;
    let mut last_poll = None;
    // Push targets are written out while the job copies, so the final sync waits for little.
    let mut write_behind = vbackup_qemu::writeout::WriteBehind::new();
    let mut last_kick: Option<vbackup_core::link::Timestamp> = None;
    while s.job_running() {
        let now = s.driver.link().now();
        if last_kick.is_none_or(|t| now.ms_since(t) >= WRITE_BEHIND_MS) {
            last_kick = Some(now);
            if let Some(plan) = s.driver.domain().view().backup
                && plan.mode == BackupMode::Push
            {
                write_behind.kick(
                    plan.disks
                        .iter()
                        .filter(|d| d.state == DiskJobState::Running)
                        .map(|d| d.store_path.as_str()),
                );
            }
        }
        let due =
            last_poll.is_none_or(|t: vbackup_core::link::Timestamp| now.ms_since(t) >= poll_ms);
        if due {
            last_poll = Some(now);
            if let Reply::Stats(Some(st)) = s.call(Request::JobStats {
                completed: false,
                keep_completed: true,
            })? {
                progress(&st);
                write_progress(s, &st);
            }
            continue;
        }
        let until = s.driver.link().now().plus_ms(200);
        s.driver.step(Some(until))?;
    }
    Ok(last_completed(s))
}

pub fn checkpoint_xml_from_args(
    name: Option<&str>,
    description: Option<&str>,
    diskspecs: &[String],
) -> Result<String, Error> {
    let mut xml = String::from("<domaincheckpoint>\n");
    if let Some(n) = name {
        xml.push_str(&format!("  <name>{}</name>\n", esc(n)));
    }
    if let Some(d) = description {
        xml.push_str(&format!("  <description>{}</description>\n", esc(d)));
    }
    if !diskspecs.is_empty() {
        xml.push_str("  <disks>\n");
        for spec in diskspecs {
            let mut parts = spec.split(',');
            let target = parts.next().unwrap_or_default();
            let mut attrs = format!(" name='{}'", esc(target));
            for p in parts {
                match p.split_once('=') {
                    Some((k @ ("checkpoint" | "bitmap"), v)) => {
                        attrs.push_str(&format!(" {k}='{}'", esc(v)));
                    }
                    _ => {
                        return Err(Error::Other(format!(
                            "--diskspec '{spec}': unknown option '{p}'"
                        )));
                    }
                }
            }
            xml.push_str(&format!("    <disk{attrs}/>\n"));
        }
        xml.push_str("  </disks>\n");
    }
    xml.push_str("</domaincheckpoint>\n");
    Ok(xml)
}

/// A new checkpoint's engine form: parsed, defaults filled, aligned, domain embedded.
pub fn new_checkpoint(text: &str, loaded: &Loaded) -> Result<Checkpoint, Error> {
    let mut def = CheckpointDef::parse(text, CheckpointMode::Create)?;
    def.fill_create_defaults(now_s());
    let mut aligned = align_checkpoint(&def, &loaded.def)?;
    aligned.domain_xml = Some(loaded.xml.trim_end().to_owned());
    Ok(Checkpoint::from_def(&aligned).map_err(EngineError::from)?)
}

/// Refuses, before anything starts, a pull backup asking for TLS on an attached domain while
/// no certificate directory is configured, saying what to configure. (A managed domain's
/// daemon serves without TLS: the core refuses `tls='yes'` there, naming its server.)
pub fn check_pull_server(loaded: &Loaded, spec: &BackupSpec) -> Result<(), Error> {
    let wants_tls = spec.server.as_ref().is_some_and(NbdServer::uses_tls);
    if spec.mode != BackupMode::Pull || !wants_tls || loaded.attachment == Attachment::Managed {
        return Ok(());
    }
    let config = crate::config::HostConfig::load(&session::state_root(&loaded.store))?;
    match config.tls_cert_dir() {
        None => Err(Error::Other(format!(
            "Requested operation is not valid: backup TLS directory not configured; {}",
            crate::config::tls_hint()
        ))),
        Some(dir) => crate::config::check_cert_dir(Path::new(dir)),
    }
}

/// The NBD URI of every export of a running pull backup, in disk order; `None` for a push.
pub fn export_uris(plan: &BackupPlan) -> Option<Vec<String>> {
    let server = plan
        .server
        .as_ref()
        .filter(|_| plan.mode == BackupMode::Pull)?;
    Some(
        plan.disks
            .iter()
            .map(|d| server.export_uri(d.export_name.as_deref().unwrap_or(&d.target)))
            .collect(),
    )
}

/// The statistics of the last job the session saw complete, if any.
pub fn last_completed(s: &Session) -> Option<JobStats> {
    s.driver
        .effects()
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            DomainEvent::JobCompleted(st) => Some(st.clone()),
            _ => None,
        })
}

/// Writes the running job's statistics to [`PROGRESS_FILE`], tagged with the job's start so a
/// reader never takes an earlier job's progress for this one's. Best effort.
pub fn write_progress(s: &Session, stats: &JobStats) {
    let Some(started_ms) = s.driver.domain().view().backup.map(|b| b.started_ms) else {
        return;
    };
    let doc = json!({"started_ms": started_ms, "stats": stats});
    let _ = write_atomic(
        s.driver.effects().store().dir(),
        PROGRESS_FILE,
        doc.to_string().as_bytes(),
    );
}

/// The last finished job's statistics for `--completed`, unless they were already shown:
/// libvirt discards them once read unless `--keep-completed`. Reading marks the record
/// (rather than removing it) because `backup-finish` still needs the job's outcome.
pub fn take_completed(dir: &Path, keep: bool) -> Option<Value> {
    let path = dir.join(COMPLETED_FILE);
    let mut stats: Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
    if stats["reported"].as_bool() == Some(true) {
        return None;
    }
    if !keep {
        stats["reported"] = json!(true);
        // Best effort: failing to mark it only shows the statistics once more.
        let _ = write_atomic(dir, COMPLETED_FILE, stats.to_string().as_bytes());
        if let Some(map) = stats.as_object_mut() {
            map.remove("reported");
        }
    }
    Some(stats)
}

/// Milliseconds since the epoch (the clock job start times are kept in).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
