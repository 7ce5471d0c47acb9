//! A domain (virtual machine) as vbackup sees it: a name, a uuid and its disks with their layer
//! chains. This is filled from libvirt `<domain>` XML, from `vbackup define NAME --disk ...`, or
//! from what a running QEMU reports.

use serde::{Deserialize, Serialize};

/// A domain definition: what a `<domain>` document or `vbackup define` says about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDef {
    /// The domain's name; a valid file name component (see `xml::names`).
    pub name: String,
    /// The domain's uuid in its canonical textual form, when known.
    pub uuid: Option<String>,
    /// Disks in domain order (the order of `<disk>` elements).
    pub disks: Vec<DiskDef>,
}

/// One disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDef {
    /// Guest-visible target name (`vda`, `sdb`): the key checkpoints and backups use.
    pub target: String,
    /// What kind of device the guest sees.
    pub device: DiskDevice,
    /// Target bus (`virtio`, `sata`, `sd`...), when given.
    pub bus: Option<String>,
    /// Read-only disks never take part in checkpoints or backups.
    pub readonly: bool,
    /// A `<transient/>` disk cannot run block jobs.
    pub transient: bool,
    /// The layer chain, top (active) image first, then its backing images. Empty when the disk
    /// has no media (an empty cdrom, for instance).
    pub layers: Vec<Layer>,
}

/// One image in a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Storage type of the source (`file`, `block`, `network`...).
    pub storage: StorageType,
    /// Image format (`qcow2`, `raw`...).
    pub format: ImageFormat,
    /// Path of the image file or block device; `None` for network or unknown sources.
    pub path: Option<String>,
    /// libvirt's storage index of the layer (`index` attribute), when known.
    pub index: Option<u32>,
    /// QEMU's format-layer node name, when known (from the running QEMU or assigned by vbackup).
    pub node_name: Option<String>,
}

/// The device kind of a disk, as in `<disk device='...'>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskDevice {
    /// An ordinary disk.
    Disk,
    /// A CD-ROM drive.
    Cdrom,
    /// A floppy drive.
    Floppy,
    /// A SCSI LUN passed through.
    Lun,
}

/// Storage type of an image source, as in `<disk type='...'>` or `<target type='...'>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// A regular file.
    File,
    /// A block device.
    Block,
    /// A directory (vvfat).
    Dir,
    /// A network source (nbd, iscsi, rbd...).
    Network,
    /// A storage pool volume.
    Volume,
    /// An NVMe device.
    Nvme,
    /// A vhost-user device.
    Vhostuser,
}

/// Image format of a layer or a backup target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// qcow2: the only format that can hold persistent dirty bitmaps.
    Qcow2,
    /// raw.
    Raw,
    /// Any other format, by its libvirt name.
    Other(String),
}

impl ImageFormat {
    /// Parses a libvirt format name (`<driver type='...'>`).
    pub fn from_name(name: &str) -> Self {
        match name {
            "qcow2" => Self::Qcow2,
            "raw" => Self::Raw,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The libvirt (and QEMU driver) name of the format.
    pub fn name(&self) -> &str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Other(name) => name,
        }
    }
}

impl DiskDef {
    /// The active (top) layer, if the disk has media.
    pub fn top(&self) -> Option<&Layer> {
        self.layers.first()
    }

    /// A disk with no media (no layers) cannot be checkpointed or backed up.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl DomainDef {
    /// Finds a disk by its target name.
    pub fn disk(&self, target: &str) -> Option<&DiskDef> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// Finds a disk by its target name or, failing that, by the path of its top image (libvirt
    /// accepts either in `<domaincheckpoint>` disk names).
    pub fn disk_by_target_or_path(&self, name: &str) -> Option<&DiskDef> {
        self.disk(name).or_else(|| {
            let mut by_path = self
                .disks
                .iter()
                .filter(|d| d.top().and_then(|l| l.path.as_deref()) == Some(name));
            let first = by_path.next()?;
            by_path.next().is_none().then_some(first)
        })
    }
}
