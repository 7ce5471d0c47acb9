//! The values commands show as JSON, and libvirt's numbers and typed parameters for job
//! statistics: data shaped for a reader, built from the core's types.

use serde_json::{Value, json};
use vbackup_core::catalogue::ManagedBackup;
use vbackup_core::checkpoint::Checkpoint;

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
