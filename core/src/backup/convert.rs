//! Between the XML layer's aligned `<domainbackup>` and the engine's [`BackupSpec`], and from a
//! running [`BackupPlan`] back to `<domainbackup>` with every default filled in.

use super::{
    BackupDiskSpec, BackupMode, BackupPlan, BackupSpec, BackupStore, NbdServer, NbdTransport,
    StoreKind,
};
use crate::error::RequestError;
use crate::xml::{
    BackupDef, BackupDisk, BackupDiskMode, BackupModeAttr as XmlMode, BackupStorage,
    BackupStoreDef as XmlStore, DiskBackup, Origin, ServerDef, Transport,
};

impl BackupSpec {
    /// Takes an aligned definition (every domain disk listed, modes and formats filled in).
    pub fn from_def(def: &BackupDef) -> Result<Self, RequestError> {
        let mode = match def.mode {
            XmlMode::Push => BackupMode::Push,
            XmlMode::Pull => BackupMode::Pull,
        };
        let server = match &def.server {
            None => None,
            Some(s) => Some(NbdServer {
                transport: match s.transport {
                    Transport::Tcp => NbdTransport::Tcp {
                        host: s.name.clone().unwrap_or_else(|| "localhost".into()),
                        port: s.port.filter(|p| *p != 0),
                    },
                    Transport::Unix => NbdTransport::Unix {
                        socket: s.socket.clone().ok_or_else(|| {
                            RequestError::Unsupported("missing socket for unix transport".into())
                        })?,
                    },
                    Transport::Fd => {
                        return Err(RequestError::Unsupported(
                            "transport 'fd' is not supported for <server>".into(),
                        ));
                    }
                },
                tls: s.tls,
            }),
        };
        let disks = def
            .disks
            .iter()
            .map(|d| {
                let Some(b) = &d.backup else {
                    return Ok(BackupDiskSpec {
                        target: d.name.clone(),
                        backup: false,
                        incremental: None,
                        store: None,
                        export_name: None,
                        export_bitmap: None,
                    });
                };
                if b.store.as_ref().is_some_and(|s| s.encryption.is_some()) {
                    return Err(RequestError::Unsupported(format!(
                        "encrypted backup images for disk '{}' are not supported",
                        d.name
                    )));
                }
                let incremental = match b.mode {
                    Some(BackupDiskMode::Full) => None,
                    _ => b.incremental.clone().or_else(|| def.incremental.clone()),
                };
                Ok(BackupDiskSpec {
                    target: d.name.clone(),
                    backup: true,
                    incremental,
                    store: Some(BackupStore {
                        kind: match b.storage {
                            BackupStorage::File => StoreKind::File,
                            BackupStorage::Block => StoreKind::Block,
                        },
                        path: b.store.as_ref().map(|s| s.path.clone()),
                        format: b.format.clone(),
                    }),
                    export_name: b.export_name.clone(),
                    export_bitmap: b.export_bitmap.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BackupSpec {
            mode,
            incremental: def.incremental.clone(),
            server,
            disks,
        })
    }
}

impl BackupPlan {
    /// The running backup as `<domainbackup>`: generated paths, export names, bitmap names,
    /// storage indexes and the chosen port are all filled in.
    pub fn to_def(&self) -> BackupDef {
        let pull = self.mode == BackupMode::Pull;
        let mut disks: Vec<BackupDisk> = self
            .disks
            .iter()
            .map(|d| BackupDisk {
                name: d.target.clone(),
                backup: Some(DiskBackup {
                    storage: match d.store_kind {
                        StoreKind::File => BackupStorage::File,
                        StoreKind::Block => BackupStorage::Block,
                    },
                    mode: Some(if d.incremental.is_some() {
                        BackupDiskMode::Incremental
                    } else {
                        BackupDiskMode::Full
                    }),
                    incremental: d.incremental.clone(),
                    export_name: if pull { d.export_name.clone() } else { None },
                    export_bitmap: if pull { d.temp_bitmap.clone() } else { None },
                    index: Some(d.index),
                    format: Some(d.store_format.clone()),
                    store: Some(XmlStore {
                        path: d.store_path.clone(),
                        seclabels: Vec::new(),
                        encryption: None,
                    }),
                }),
                origin: Origin::default(),
            })
            .collect();
        disks.extend(self.skipped_disks.iter().map(|t| BackupDisk {
            name: t.clone(),
            backup: None,
            origin: Origin::default(),
        }));
        BackupDef {
            mode: if pull { XmlMode::Pull } else { XmlMode::Push },
            incremental: self.incremental.clone(),
            server: self.server.as_ref().map(|s| match &s.transport {
                NbdTransport::Tcp { host, port } => ServerDef {
                    transport: Transport::Tcp,
                    name: Some(host.clone()),
                    port: *port,
                    tls: s.tls,
                    ..ServerDef::default()
                },
                NbdTransport::Unix { socket } => ServerDef {
                    transport: Transport::Unix,
                    socket: Some(socket.clone()),
                    tls: s.tls,
                    ..ServerDef::default()
                },
            }),
            disks,
            origin: Origin::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_pull_definition_becomes_a_spec_with_inherited_incremental() {
        let text = "<domainbackup mode='pull'><incremental>c1</incremental>\
            <server transport='unix' socket='/run/nbd.sock'/>\
            <disks><disk name='vda' backup='yes' type='file'><scratch file='/s/vda.qcow2'/></disk>\
            <disk name='vdb' backup='yes' type='file' backupmode='full'><scratch file='/s/vdb.qcow2'/></disk>\
            <disk name='vdc' backup='no'/></disks></domainbackup>";
        let def = BackupDef::parse(text).unwrap();
        let spec = BackupSpec::from_def(&def).unwrap();
        assert_eq!(spec.mode, BackupMode::Pull);
        assert_eq!(spec.disks[0].incremental.as_deref(), Some("c1"));
        assert_eq!(spec.disks[1].incremental, None);
        assert!(!spec.disks[2].backup);
        assert_eq!(
            spec.server.unwrap().transport,
            NbdTransport::Unix {
                socket: "/run/nbd.sock".into()
            }
        );
    }
}
