//! Query commands and their results: `query-named-block-nodes`, `query-block`, `query-status`.
//! Results tolerate members this version does not name (they are ignored), so a newer QEMU's
//! additions never break decoding.

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Arguments of `query-named-block-nodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryNamedBlockNodes {
    /// List every node once, without nesting backing images (what the core always asks for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}

/// One dirty bitmap of a node, as queries report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockDirtyInfo {
    /// The bitmap's name; **absent for anonymous bitmaps** (those a running backup job creates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Records writes (enabled).
    pub recording: bool,
    /// Stored in the image at close.
    pub persistent: bool,
    /// In use by an operation (a job); cannot be modified or removed.
    pub busy: bool,
    /// Loaded from an image that was not closed cleanly: unusable, only removable. QEMU sends the
    /// member only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inconsistent: bool,
    /// Bytes covered by one bit.
    pub granularity: u64,
    /// Dirty bytes (whole granules).
    pub count: u64,
}

wire_enum! {
    /// Flags of a bitmap stored in a qcow2 image.
    pub enum Qcow2BitmapFlag {
        /// The image is open and the bitmap may be stale on disk.
        InUse = "in-use",
        /// The bitmap records writes (enabled).
        Auto = "auto",
    }
}

/// A bitmap stored in a qcow2 image (`format-specific.data.bitmaps[]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Qcow2BitmapInfo {
    /// Its name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Its on-disk flags.
    pub flags: Vec<Qcow2BitmapFlag>,
}

/// qcow2-specific image information.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Qcow2Info {
    /// Compatibility level: `"0.10"` (v2, no persistent bitmaps) or `"1.1"` (v3).
    pub compat: String,
    /// External data file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Lazy refcounts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// The image is marked corrupt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Refcount width in bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<u64>,
    /// Subcluster allocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// Compression type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<String>,
    /// Bitmaps stored in the image header (lags behind memory while the image is open).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<Qcow2BitmapInfo>>,
}

/// Format-specific image information: `{"type": ..., "data": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageInfoSpecific {
    /// qcow2.
    Qcow2(Qcow2Info),
    /// Any other format, data verbatim.
    Other {
        /// The format.
        format: String,
        /// Its data.
        data: Value,
    },
}

#[derive(Serialize, Deserialize)]
struct RawSpecific {
    #[serde(rename = "type")]
    format: String,
    #[serde(default)]
    data: Value,
}

impl Serialize for ImageInfoSpecific {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = match self {
            ImageInfoSpecific::Qcow2(info) => RawSpecific {
                format: "qcow2".to_owned(),
                data: serde_json::to_value(info).map_err(S::Error::custom)?,
            },
            ImageInfoSpecific::Other { format, data } => RawSpecific {
                format: format.clone(),
                data: data.clone(),
            },
        };
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ImageInfoSpecific {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawSpecific::deserialize(deserializer)?;
        Ok(match raw.format.as_str() {
            "qcow2" => ImageInfoSpecific::Qcow2(
                serde_json::from_value(raw.data).map_err(D::Error::custom)?,
            ),
            _ => ImageInfoSpecific::Other {
                format: raw.format,
                data: raw.data,
            },
        })
    }
}

/// Information about an image (`image` of a node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The image's file name.
    pub filename: String,
    /// Its format (`qcow2`, `raw`, `file`...).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Space used on the host in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Cluster size in bytes (formats with clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The image is marked dirty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    /// Backing file name as written in the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file name resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// Backing file format from the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// The backing image's information (non-flat queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<Box<ImageInfo>>,
    /// Format-specific information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<ImageInfoSpecific>,
}

impl ImageInfo {
    /// The qcow2-specific part, when the image is qcow2.
    pub fn qcow2(&self) -> Option<&Qcow2Info> {
        match &self.format_specific {
            Some(ImageInfoSpecific::Qcow2(info)) => Some(info),
            _ => None,
        }
    }
}

/// One node of `query-named-block-nodes` (or the `inserted` node of `query-block`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// The node's name (QEMU-generated `#blockNNN` for nodes nobody named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The node's driver (`qcow2`, `file`, `copy-before-write`...).
    pub drv: String,
    /// The node's file name.
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// Backing file name.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "backing_file"
    )]
    pub backing_file: Option<String>,
    /// Number of backing files below.
    #[serde(default, rename = "backing_file_depth")]
    pub backing_file_depth: u64,
    /// Encrypted.
    #[serde(default)]
    pub encrypted: bool,
    /// Active (false once inactivated for migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Image information.
    pub image: ImageInfo,
    /// Dirty bitmaps of the node; QEMU omits the member when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
}

impl BlockDeviceInfo {
    /// The named bitmap of this node, if it has one by that name.
    pub fn bitmap(&self, name: &str) -> Option<&BlockDirtyInfo> {
        self.dirty_bitmaps
            .iter()
            .find(|bitmap| bitmap.name.as_deref() == Some(name))
    }
}

/// One device of `query-block`. Under qemu-storage-daemon the list is empty; nodes come from
/// `query-named-block-nodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// The legacy device name (`""` for `-blockdev` devices).
    pub device: String,
    /// The qdev path of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// Device type (always `unknown` today).
    #[serde(default, rename = "type")]
    pub device_type: String,
    /// Removable media.
    #[serde(default)]
    pub removable: bool,
    /// Media locked.
    #[serde(default)]
    pub locked: bool,
    /// I/O status (`ok`, `failed`, `nospace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_status: Option<String>,
    /// The tray is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tray_open: Option<bool>,
    /// The node attached to the device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inserted: Option<BlockDeviceInfo>,
}

wire_enum! {
    /// Run state of the VM (`query-status`).
    pub enum RunState {
        /// Running.
        Running = "running",
        /// Paused by request (or started with `-S`).
        Paused = "paused",
        /// Waiting for an incoming migration.
        InMigrate = "inmigrate",
        /// Migration finished, paused.
        PostMigrate = "postmigrate",
        /// Preparing to run (restoring a snapshot...).
        Prelaunch = "prelaunch",
        /// Finishing a migration.
        FinishMigrate = "finish-migrate",
        /// Restoring a saved VM.
        RestoreVm = "restore-vm",
        /// Saving the VM.
        SaveVm = "save-vm",
        /// Shut down (with `-no-shutdown`).
        Shutdown = "shutdown",
        /// Paused by an I/O error.
        IoError = "io-error",
        /// The guest panicked.
        GuestPanicked = "guest-panicked",
        /// Internal error.
        InternalError = "internal-error",
        /// Being debugged.
        Debug = "debug",
        /// Suspended (ACPI S3).
        Suspended = "suspended",
        /// Halted by the watchdog.
        Watchdog = "watchdog",
    }
}

/// Result of `query-status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// The vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}
