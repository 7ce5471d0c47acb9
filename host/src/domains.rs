//! Domains on this host: defining one from its images (their backing chains read with
//! `qemu-img`), the libvirt `<domain>` document vbackup stores for it, and whether its managed
//! daemon runs.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vbackup_core::model::{DiskDef, DiskDevice, ImageFormat, Layer, StorageType};
use vbackup_core::xml::parse_domain;
use vbackup_qemu::qsd::{QsdDisk, RunDir, daemon_alive};
use vbackup_qemu::store::Store;

use crate::error::Error;
use crate::layout::{DOMAIN_FILE, JOURNAL_FILE, KEEP_FILE, META_FILE};
use crate::session::{self, Attachment, Session};

/// A domain `define` stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defined {
    /// Its name.
    pub name: String,
    /// The XML file it was defined from, when one was given.
    pub from: Option<String>,
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Escapes text for an XML attribute or element.
pub fn esc(text: &str) -> String {
    let mut out = String::new();
    vbackup_core::unstable::xml_writer::escape(text, &mut out);
    out
}

pub fn read_file(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(Error::io(format!("failed to read '{}'", path.display())))
}

/// The backing chain of an image as `(path, format)`, top first, from `qemu-img info`.
pub fn backing_chain(path: &str, format: &str) -> Result<Vec<(String, String)>, Error> {
    let out = vbackup_qemu::children::tied(&mut Process::new("qemu-img"))
        .args([
            "info",
            "--backing-chain",
            "--output=json",
            "-U",
            "-f",
            format,
            path,
        ])
        .output()
        .map_err(Error::io("cannot run qemu-img"))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "qemu-img info {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Other(format!("qemu-img info {path}: {e}")))?;
    let chain = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    Ok(chain
        .iter()
        .map(|i| {
            (
                i["filename"].as_str().unwrap_or_default().to_owned(),
                i["format"].as_str().unwrap_or("raw").to_owned(),
            )
        })
        .collect())
}

/// The disks of `--disk` specifications, each with its backing chain from `qemu-img`.
pub fn disks_from_specs(disks: &[String]) -> Result<Vec<DiskDef>, Error> {
    let mut defs = Vec::new();
    for spec in disks {
        let (target, rest) = spec
            .split_once('=')
            .ok_or_else(|| Error::Other(format!("--disk '{spec}': expected TARGET=PATH")))?;
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        let mut format = "qcow2".to_owned();
        for p in parts {
            match p.split_once('=') {
                Some(("format", f)) => format = f.to_owned(),
                _ => {
                    return Err(Error::Other(format!(
                        "--disk '{spec}': unknown option '{p}'"
                    )));
                }
            }
        }
        let abs =
            std::fs::canonicalize(path).map_err(Error::io(format!("disk '{target}': '{path}'")))?;
        let abs = abs.display().to_string();
        let layers = backing_chain(&abs, &format)?
            .into_iter()
            .map(|(p, f)| Layer {
                storage: StorageType::File,
                format: ImageFormat::from_name(&f),
                path: Some(p),
                index: None,
                node_name: None,
            })
            .collect();
        defs.push(DiskDef {
            target: target.to_owned(),
            device: DiskDevice::Disk,
            bus: Some("virtio".to_owned()),
            readonly: false,
            transient: false,
            layers,
        });
    }
    Ok(defs)
}

/// The `<source>` element of a layer.
pub fn source_xml(layer: &Layer) -> String {
    let path = esc(layer.path.as_deref().unwrap_or_default());
    match layer.storage {
        StorageType::Block => format!("<source dev='{path}'/>"),
        StorageType::File => format!("<source file='{path}'/>"),
        // Discovered network storage has no local path; the element only marks the media.
        _ => "<source/>".to_owned(),
    }
}

pub fn storage_name(storage: StorageType) -> &'static str {
    match storage {
        StorageType::Block => "block",
        StorageType::File => "file",
        _ => "network",
    }
}

/// A libvirt `<domain>` document for `name` (a fresh uuid unless given) with `disks`: what
/// `vbackup define` stores when no XML file is given. It reads back as the same disks.
pub fn domain_xml(name: &str, uuid: Option<&str>, disks: &[DiskDef]) -> String {
    let mut devices = String::new();
    for disk in disks {
        let Some(top) = disk.top() else {
            continue;
        };
        let mut xml = format!(
            "    <disk type='{}' device='disk'>\n      <driver name='qemu' type='{}'/>\n      {}\n",
            storage_name(top.storage),
            esc(top.format.name()),
            source_xml(top)
        );
        let mut closing = String::new();
        let mut indent = "      ".to_owned();
        let count = disk.layers.len();
        for (i, layer) in disk.layers.iter().enumerate().skip(1) {
            xml.push_str(&format!(
                "{indent}<backingStore type='{}' index='{}'>\n{indent}  <format type='{}'/>\n{indent}  {}\n",
                storage_name(layer.storage),
                count - i,
                esc(layer.format.name()),
                source_xml(layer)
            ));
            closing = format!("{indent}</backingStore>\n{closing}");
            indent.push_str("  ");
        }
        xml.push_str(&closing);
        if disk.readonly {
            xml.push_str("      <readonly/>\n");
        }
        let bus = disk
            .bus
            .as_deref()
            .map(|b| format!(" bus='{}'", esc(b)))
            .unwrap_or_default();
        xml.push_str(&format!(
            "      <target dev='{}'{bus}/>\n    </disk>\n",
            esc(&disk.target)
        ));
        devices.push_str(&xml);
    }
    let uuid = uuid.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    format!(
        "<domain type='kvm'>\n  <name>{}</name>\n  <uuid>{uuid}</uuid>\n  <devices>\n{devices}  </devices>\n</domain>\n",
        esc(name),
    )
}

/// Defines a domain from a domain XML file, or by name from `--disk TARGET=PATH[,format=F]`
/// specifications, or by name from what the QEMU at `qmp` runs. A name another domain has is
/// refused: nothing takes over an existing domain.
pub fn define(
    store: &Store,
    file_or_name: &str,
    disks: &[String],
    qmp: Option<PathBuf>,
) -> Result<Defined, Error> {
    let discovered = match &qmp {
        // NAME --qmp SOCKET without --disk: QEMU says what the disks are.
        Some(socket) if disks.is_empty() && !Path::new(file_or_name).is_file() => {
            Some(session::discover_disks(socket)?)
        }
        _ => None,
    };
    let (xml, from) = if let Some(found) = discovered {
        if found.is_empty() {
            return Err(Error::Other(format!(
                "QEMU at '{}' has no disks to back up; give them with --disk",
                qmp.as_deref().unwrap_or(Path::new("")).display()
            )));
        }
        (domain_xml(file_or_name, None, &found), None)
    } else if disks.is_empty() {
        if !Path::new(file_or_name).exists() && !file_or_name.contains('/') {
            return Err(Error::Other(format!(
                "invalid argument: '{file_or_name}' is no domain XML file; to define a domain by name, give its disks ('vbackup define {file_or_name} --disk vda=/path/vda.qcow2') or attach to a running QEMU ('vbackup define {file_or_name} --qmp /path/qmp.sock')"
            )));
        }
        (read_file(Path::new(file_or_name))?, Some(file_or_name))
    } else {
        (
            domain_xml(file_or_name, None, &disks_from_specs(disks)?),
            None,
        )
    };
    let def = parse_domain(&xml)?;
    let attachment = match qmp {
        Some(p) => Attachment::Attached(
            std::fs::canonicalize(&p).map_err(Error::io(format!("'{}'", p.display())))?,
        ),
        None => Attachment::Managed,
    };
    if attachment == Attachment::Managed {
        for d in def.disks.iter().filter(|d| !d.is_empty()) {
            QsdDisk::from_disk_def(d)?;
        }
    }
    check_disk_targets(&def.disks)?;
    let ds = session::lock(store, &def.name)?;
    // Under the domain's lock, so two defines of one name cannot both see it free.
    if ds.read_domain_xml()?.is_some() {
        return Err(Error::DomainExists(def.name));
    }
    ds.write_domain_xml(&xml)?;
    session::write_meta(&ds, &attachment)?;
    Ok(Defined {
        name: def.name,
        from: from.map(str::to_owned),
    })
}

/// Refuses a name another domain has, before anything is written for a new domain of that
/// name (`define` checks again under the domain's lock).
pub fn check_name_free(store: &Store, name: &str) -> Result<(), Error> {
    let stored = store.root().join("domains").join(name).join(DOMAIN_FILE);
    if stored.is_file() {
        return Err(Error::DomainExists(name.to_owned()));
    }
    Ok(())
}

/// Refuses two disks with one target: every command names disks by target.
pub fn check_disk_targets(disks: &[DiskDef]) -> Result<(), Error> {
    for (i, disk) in disks.iter().enumerate() {
        if disks[..i].iter().any(|d| d.target == disk.target) {
            return Err(Error::Other(format!(
                "invalid argument: disk target '{}' is given twice; each disk needs its own target",
                disk.target
            )));
        }
    }
    Ok(())
}

/// Whether the managed daemon of a domain's run directory is alive.
pub fn daemon_running(run_dir: &Path) -> bool {
    RunDir::new(run_dir)
        .read_pid()
        .ok()
        .flatten()
        .is_some_and(daemon_alive)
}

/// Starts a managed domain's daemon and keeps it running (the "running guest") until
/// [`shutdown`]; returns the NBD socket its guest exports are served on.
pub fn start(store: &Store, name: &str) -> Result<PathBuf, Error> {
    let loaded = session::load(store, name)?;
    if loaded.attachment != Attachment::Managed {
        return Err(Error::Other(format!(
            "Requested operation is not valid: domain '{name}' is attached to an external QEMU"
        )));
    }
    let run_dir = loaded.store.run_dir();
    if run_dir.join(KEEP_FILE).is_file() && daemon_running(&run_dir) {
        return Err(Error::Other(format!(
            "Requested operation is not valid: domain '{name}' is already running"
        )));
    }
    let s = Session::connect(loaded)?;
    std::fs::write(run_dir.join(KEEP_FILE), b"")
        .map_err(Error::io("cannot mark the daemon as kept"))?;
    s.close()?;
    Ok(RunDir::new(&run_dir).nbd_socket)
}

/// Stops a domain's kept daemon (an attached domain's QEMU is only forgotten as running).
pub fn shutdown(store: &Store, name: &str) -> Result<(), Error> {
    let loaded = session::load(store, name)?;
    if loaded.journal.is_some() {
        return Err(Error::Other(
            "Requested operation is not valid: a backup job is running".into(),
        ));
    }
    let run_dir = loaded.store.run_dir();
    if loaded.attachment == Attachment::Managed
        && !run_dir.join(KEEP_FILE).is_file()
        && !daemon_running(&run_dir)
    {
        return Err(Error::Other(format!(
            "Requested operation is not valid: domain '{name}' is not running"
        )));
    }
    let _ = std::fs::remove_file(run_dir.join(KEEP_FILE));
    if loaded.attachment == Attachment::Managed {
        session::stop_daemon(&run_dir)?;
    }
    Ok(())
}

/// Undefines domain `name`: refused while a job runs, while it has managed backups (unless
/// `remove_all_backups`, which deletes them through the managed-backup machine, so its
/// journal protects the deletion) or checkpoints (unless `checkpoints_metadata`: their
/// metadata goes with the domain, their bitmaps stay in the images). A managed domain's
/// daemon is stopped before its store is removed.
pub fn undefine(
    store: &Store,
    name: &str,
    checkpoints_metadata: bool,
    remove_all_backups: bool,
) -> Result<(), Error> {
    let mut loaded = session::load(store, name)?;
    if loaded.journal.is_some() {
        return Err(Error::Other(
            "Requested operation is not valid: a backup job is running".into(),
        ));
    }
    let backups = crate::managed_ops::catalogue(&loaded.store)?.len();
    if backups > 0 && !remove_all_backups {
        return Err(Error::Other(format!(
            "Requested operation is not valid: domain '{name}' has {backups} managed backup(s); use --remove-all-backups"
        )));
    }
    if !loaded.tree.is_empty() && !checkpoints_metadata {
        return Err(Error::Other(format!(
            "Requested operation is not valid: cannot delete inactive domain with {} checkpoints",
            loaded.tree.len()
        )));
    }
    if loaded.attachment == Attachment::Managed {
        let run_dir = loaded.store.run_dir();
        let _ = std::fs::remove_file(run_dir.join(KEEP_FILE));
        session::stop_daemon(&run_dir)?;
    }
    if backups > 0 {
        loaded = crate::managed_ops::delete_all_keeping_checkpoints(store, loaded)?.0;
    }
    loaded.store.remove_all()?;
    Ok(())
}

/// One defined domain as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    /// The name.
    pub name: String,
    /// `running` or `shut off` (a managed daemon), or `attached`.
    pub state: String,
    /// The QMP socket of an attached domain.
    pub qmp: Option<String>,
    /// Whether a backup job is journaled.
    pub job: bool,
    /// How many disks it defines.
    pub disks: usize,
}

/// Every defined domain, read without locking (a domain another vbackup holds is listed as
/// its files say).
pub fn list(store: &Store) -> Result<Vec<DomainSummary>, Error> {
    let mut rows = Vec::new();
    for name in store.list_domains()? {
        let dir = store.root().join("domains").join(&name);
        let Ok(xml) = std::fs::read_to_string(dir.join(DOMAIN_FILE)) else {
            continue;
        };
        let meta: Value = std::fs::read_to_string(dir.join(META_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let qmp = meta.get("qmp").and_then(Value::as_str).map(str::to_owned);
        let state = match &qmp {
            Some(_) => "attached".to_owned(),
            None => {
                let run = RunDir::new(store.root().join("run").join(&name));
                match run.read_pid().ok().flatten() {
                    Some(pid) if daemon_alive(pid) => "running".to_owned(),
                    _ => "shut off".to_owned(),
                }
            }
        };
        let job = dir.join(JOURNAL_FILE).is_file();
        let disks = parse_domain(&xml).map(|d| d.disks.len()).unwrap_or(0);
        rows.push(DomainSummary {
            name,
            state,
            qmp,
            job,
            disks,
        });
    }
    Ok(rows)
}

/// The disks of domain `name` as defined, read without waiting for its lock.
pub fn disks(store: &Store, name: &str) -> Result<Vec<DiskDef>, Error> {
    Ok(match session::load_for_reading(store, name)? {
        session::ReadAccess::Locked(loaded) => loaded.def.disks,
        session::ReadAccess::Shared(shared) => shared.def.disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(storage: StorageType, format: ImageFormat, path: Option<&str>) -> Layer {
        Layer {
            storage,
            format,
            path: path.map(str::to_owned),
            index: None,
            node_name: Some("discovered-node".to_owned()),
        }
    }

    #[test]
    fn a_defined_domain_reads_back_as_the_disks_it_was_made_from() {
        let disks = vec![
            DiskDef {
                target: "vda".to_owned(),
                device: DiskDevice::Disk,
                bus: Some("virtio".to_owned()),
                readonly: false,
                transient: false,
                layers: vec![
                    layer(
                        StorageType::File,
                        ImageFormat::Qcow2,
                        Some("/i/top's.qcow2"),
                    ),
                    layer(StorageType::File, ImageFormat::Qcow2, Some("/i/mid.qcow2")),
                    layer(StorageType::Block, ImageFormat::Raw, Some("/dev/vg/base")),
                ],
            },
            DiskDef {
                target: "vdb".to_owned(),
                device: DiskDevice::Disk,
                bus: None,
                readonly: true,
                transient: false,
                layers: vec![layer(StorageType::Network, ImageFormat::Raw, None)],
            },
        ];
        let xml = domain_xml(
            "vm<1>",
            Some("c7a5fdbd-cdaf-9455-926a-d65c16db1809"),
            &disks,
        );
        let def = parse_domain(&xml).unwrap();
        assert_eq!(def.name, "vm<1>");
        assert_eq!(
            def.uuid.as_deref(),
            Some("c7a5fdbd-cdaf-9455-926a-d65c16db1809")
        );
        assert_eq!(def.disks.len(), 2);
        for (read, made) in def.disks.iter().zip(&disks) {
            assert_eq!(read.target, made.target);
            assert_eq!(read.readonly, made.readonly);
            let shape = |d: &DiskDef| {
                d.layers
                    .iter()
                    .map(|l| (l.storage, l.format.clone(), l.path.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(shape(read), shape(made));
            // Node names are QEMU's and never stored.
            assert!(read.layers.iter().all(|l| l.node_name.is_none()));
        }
    }
}
