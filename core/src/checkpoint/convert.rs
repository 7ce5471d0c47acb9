//! Between the XML layer's aligned `<domaincheckpoint>` and the engine's [`Checkpoint`].

use super::{Checkpoint, CheckpointDisk};
use crate::error::RequestError;
use crate::xml::{CheckpointDef, CheckpointDiskDef as XmlDisk, CheckpointKind, Origin};

impl Checkpoint {
    /// Takes an aligned definition (one disk entry per domain disk, named by target; creation
    /// defaults filled in). A disk tracked without a bitmap name gets the checkpoint's name.
    pub fn from_def(def: &CheckpointDef) -> Result<Self, RequestError> {
        let name = def
            .name
            .clone()
            .ok_or_else(|| RequestError::Unsupported("the checkpoint has no name".into()))?;
        let creation_time_s = def
            .creation_time
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let disks = def
            .disks
            .iter()
            .map(|d| CheckpointDisk {
                target: d.name.clone(),
                bitmap: match d.checkpoint {
                    CheckpointKind::Bitmap => {
                        Some(d.bitmap.clone().unwrap_or_else(|| name.clone()))
                    }
                    CheckpointKind::No => None,
                },
                size_bytes: d.size_bytes,
            })
            .collect();
        Ok(Checkpoint {
            name,
            description: def.description.clone(),
            parent: def.parent.clone(),
            creation_time_s,
            disks,
            domain_xml: def.domain_xml.clone(),
        })
    }

    /// The definition to format (`GetXMLDesc`) or to store.
    pub fn to_def(&self) -> CheckpointDef {
        CheckpointDef {
            name: Some(self.name.clone()),
            description: self.description.clone(),
            parent: self.parent.clone(),
            creation_time: u64::try_from(self.creation_time_s).ok().filter(|t| *t > 0),
            disks: self
                .disks
                .iter()
                .map(|d| XmlDisk {
                    name: d.target.clone(),
                    checkpoint: if d.bitmap.is_some() {
                        CheckpointKind::Bitmap
                    } else {
                        CheckpointKind::No
                    },
                    bitmap: d.bitmap.clone(),
                    size_bytes: d.size_bytes,
                    origin: Origin::default(),
                })
                .collect(),
            domain_xml: self.domain_xml.clone(),
            origin: Origin::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
    use crate::xml::{CheckpointFormat, CheckpointMode, align_checkpoint};

    fn domain() -> DomainDef {
        let disk = |t: &str| DiskDef {
            target: t.into(),
            device: DiskDevice::Disk,
            bus: None,
            readonly: false,
            transient: false,
            layers: vec![Layer {
                storage: StorageType::File,
                format: ImageFormat::Qcow2,
                path: Some(format!("/img/{t}.qcow2")),
                index: None,
                node_name: None,
            }],
        };
        DomainDef {
            name: "d".into(),
            uuid: None,
            disks: vec![disk("vda"), disk("vdb")],
        }
    }

    #[test]
    fn aligned_xml_becomes_a_checkpoint_and_formats_back() {
        let text =
            "<domaincheckpoint><name>c1</name><disks><disk name='vda'/></disks></domaincheckpoint>";
        let mut def = CheckpointDef::parse(text, CheckpointMode::Create).unwrap();
        def.fill_create_defaults(1_700_000_000);
        let aligned = align_checkpoint(&def, &domain()).unwrap();
        let c = Checkpoint::from_def(&aligned).unwrap();
        assert_eq!(c.disks[0].bitmap.as_deref(), Some("c1"));
        assert_eq!(c.disks[1].bitmap, None);
        assert_eq!(c.creation_time_s, 1_700_000_000);
        let xml = c.to_def().format(CheckpointFormat::default());
        assert!(xml.contains("<disk name='vdb' checkpoint='no'/>"), "{xml}");
        assert_eq!(Checkpoint::from_def(&c.to_def()).unwrap(), c);
    }
}
