//! The values commands show as JSON, and libvirt's numbers and typed parameters for job
//! statistics: data shaped for a reader, built from the core's types.

use serde_json::{Value, json};
use vbackup_core::catalogue::ManagedBackup;
use vbackup_core::checkpoint::Checkpoint;
use vbackup_core::managed::ManagedReply;
use vbackup_core::model::DiskDef;

use crate::checkpoints::Info;
use crate::documents::Checked;
use crate::domains::DomainSummary;
use crate::managed_ops::{Deleted, DiskCheck, Restored};

/// The JSON style of every `--json` output: object keys in camelCase, as libvirt spells its XML
/// attributes (`creationTime`, `allocatedBytes`). Values are left alone.
pub fn camel_case(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (camel_key(&k), camel_case(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(camel_case).collect()),
        other => other,
    }
}

/// `creation_time` → `creationTime`; keys without underscores stay as they are.
fn camel_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A managed backup's job as `backup-create` and `backup-finish` answer: the backup's uuid and
/// whether it was `started`, is `running`, was `cancelled` or `created` (with its record);
/// null for an answer about no job.
pub fn job_reply_json(reply: &ManagedReply) -> Value {
    match reply {
        ManagedReply::Started { uuid } => json!({"uuid": uuid, "status": "started"}),
        ManagedReply::Running { uuid } => json!({"uuid": uuid, "status": "running"}),
        ManagedReply::Cancelled { uuid } => json!({"uuid": uuid, "status": "cancelled"}),
        ManagedReply::Created(b) => {
            json!({"uuid": b.uuid, "status": "created", "backup": backup_json(b)})
        }
        _ => Value::Null,
    }
}

/// A domain of `list`: its state, attachment, job and number of disks.
pub fn domain_json(d: &DomainSummary) -> Value {
    let job = if d.job { "backup" } else { "none" };
    json!({"name": d.name, "state": d.state, "qmp": d.qmp, "job": job, "disks": d.disks})
}

/// Each disk's target and the path of its top image (`-` when it has none), as `domblklist`
/// shows them.
pub fn disk_sources(disks: &[DiskDef]) -> Vec<(String, String)> {
    let source = |d: &DiskDef| d.top().and_then(|l| l.path.clone());
    let sources = disks.iter().map(|d| (d.target.clone(), source(d)));
    sources
        .map(|(t, s)| (t, s.unwrap_or_else(|| "-".into())))
        .collect()
}

/// A domain's disks ([`disk_sources`]).
pub fn disks_json(sources: &[(String, String)]) -> Value {
    let disks = sources
        .iter()
        .map(|(t, s)| json!({"target": t, "source": s}));
    Value::Array(disks.collect())
}

/// A checkpoint of domain `domain`: its parent and how many checkpoints are built on it.
pub fn checkpoint_info_json(info: &Info, domain: &str) -> Value {
    let c = &info.checkpoint;
    json!({"name": c.name, "domain": domain, "parent": c.parent, "children": info.children,
           "descendants": info.descendants, "current": info.current})
}

/// Job statistics (`status` `none` without a job) and the managed backup waiting for
/// `backup-finish`, if any.
pub fn job_json(stats: Option<&Value>, pending: Option<&str>) -> Value {
    let mut v = stats.cloned().unwrap_or_else(|| json!({"status": "none"}));
    v["pendingBackup"] = json!(pending);
    v
}

/// Backup `uuid`'s verification: each disk, whether it matched, and why not.
pub fn verify_json(uuid: &str, report: &[DiskCheck]) -> Value {
    let disks = report
        .iter()
        .map(|(disk, r)| json!({"disk": disk, "ok": r.is_ok(), "error": r.as_ref().err()}));
    json!({"uuid": uuid, "disks": disks.collect::<Vec<Value>>()})
}

/// A restore: the backup restored, the disks written, and the domain they belong to (the one
/// overwritten, or the one defined on the new images).
pub fn restore_json(r: &Restored, overwrite: bool, domain: Option<&str>) -> Value {
    let disks = r.disks.iter().map(|d| {
        json!({"disk": d.disk, "path": d.path, "format": d.format.name(), "digest": d.digest.to_string()})
    });
    let disks: Vec<Value> = disks.collect();
    json!({"backup": r.backup, "overwrite": overwrite, "disks": disks, "domain": domain})
}

/// A deletion of managed backups.
pub fn delete_json(d: &Deleted, checkpoints_kept: bool) -> Value {
    json!({"domain": d.domain, "deleted": d.uuids, "checkpointsKept": checkpoints_kept})
}

/// A document `xml validate` checked: its root element when valid, else its errors (each with
/// its line and column when known).
pub fn checked_json(file: &str, checked: &Checked) -> Value {
    let errors: Vec<Value> = match checked {
        Checked::Valid(root) => {
            return json!({"file": file, "valid": true, "root": root, "errors": []});
        }
        Checked::Unreadable(message) => {
            vec![json!({"line": null, "column": null, "path": null, "message": message})]
        }
        Checked::Invalid(errors) => errors
            .iter()
            .map(|e| {
                let (line, column) = (e.position.map(|p| p.line), e.position.map(|p| p.column));
                json!({"line": line, "column": column, "path": e.path, "message": e.message})
            })
            .collect(),
    };
    json!({"file": file, "valid": false, "root": null, "errors": errors})
}

/// A managed backup: its record, kind and sizes, and each disk's image.
pub fn backup_json(b: &ManagedBackup) -> Value {
    let disks: Vec<Value> = b
        .disks
        .iter()
        .map(|d| {
            json!({
                "disk": d.disk,
                "path": d.path,
                "format": d.format.name(),
                "virtualBytes": d.virtual_size_bytes,
                "allocatedBytes": d.allocated_size_bytes,
                "digest": d.digest.as_str(),
            })
        })
        .collect();
    json!({
        "uuid": b.uuid,
        "domain": b.domain,
        "parent": b.parent,
        "checkpoint": b.checkpoint,
        "creationTime": b.creation_time,
        "description": b.description,
        "kind": b.kind.name(),
        "allocatedBytes": b.allocated_size_bytes(),
        "disks": disks,
    })
}

/// A checkpoint and its disks' bitmaps (with `sizes`, each disk's dirtied bytes too).
pub fn checkpoint_json(c: &Checkpoint, sizes: bool) -> Value {
    let disks: Vec<Value> = c
        .disks
        .iter()
        .map(|d| {
            let mut v = json!({"target": d.target, "bitmap": d.bitmap});
            if sizes {
                v["size"] = json!(d.size_bytes);
            }
            v
        })
        .collect();
    json!({
        "name": c.name,
        "parent": c.parent,
        "creation_time": c.creation_time_s,
        "description": c.description,
        "disks": disks,
    })
}

/// Listed checkpoints, each saying whether it is the domain's `current` one.
pub fn listed_checkpoints_json(checkpoints: &[Checkpoint], current: Option<&str>) -> Value {
    let listed = checkpoints.iter().map(|c| {
        let mut v = checkpoint_json(c, false);
        v["current"] = json!(current == Some(c.name.as_str()));
        v
    });
    Value::Array(listed.collect())
}

/// A checkpoint with its disks' dirtied bytes and its XML document.
pub fn dumped_checkpoint_json(c: &Checkpoint, xml: &str) -> Value {
    let mut v = checkpoint_json(c, true);
    v["xml"] = json!(xml);
    v
}

/// libvirt's `virDomainJobType` number and virsh's word for a job status.
pub fn job_type(status: &str) -> (u8, &'static str) {
    match status {
        "running" => (2, "Unbounded"),
        "completed" => (3, "Completed"),
        "failed" => (4, "Failed"),
        "cancelled" => (5, "Cancelled"),
        _ => (0, "None"),
    }
}

/// The statistics as libvirt's typed parameters, in the order libvirt fills them.
pub fn raw_params(st: &Value) -> Vec<(&'static str, String)> {
    let mut params = vec![("operation", "9".to_owned())];
    for (name, key) in [
        ("time_elapsed", "time_elapsed_ms"),
        ("disk_total", "disk_total_bytes"),
        ("disk_processed", "disk_processed_bytes"),
        ("disk_remaining", "disk_remaining_bytes"),
        ("disk_temp_used", "disk_temp_used_bytes"),
        ("disk_temp_total", "disk_temp_total_bytes"),
    ] {
        params.extend(st[key].as_u64().map(|v| (name, v.to_string())));
    }
    if let Some(ok) = st["success"].as_bool() {
        params.push(("success", if ok { "yes" } else { "no" }.to_owned()));
    }
    params.extend(st["errmsg"].as_str().map(|m| ("errmsg", m.to_owned())));
    params
}
