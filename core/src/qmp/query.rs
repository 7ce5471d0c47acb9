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

/// Decoding of node information straight from a borrowed JSON value, without serde's
/// visitors: `query-named-block-nodes` is the largest reply the core reads, and the derived
/// path copies `format-specific.data` into a new value before decoding it. These readers accept
/// only what the derived `Deserialize` impls accept and build the same result (members walked
/// once, in order, unknown ones skipped); on anything else (a missing member, a value of another
/// type) they give up with `None`, and the caller decodes with serde, which then reports the
/// error.
pub(crate) mod direct {
    use serde_json::Value;

    use super::{
        BlockDeviceInfo, BlockDirtyInfo, ImageInfo, ImageInfoSpecific, Qcow2BitmapFlag,
        Qcow2BitmapInfo, Qcow2Info,
    };

    /// An optional member: `null` gives `None`, anything else must read.
    fn optional<T>(v: &Value, read: impl FnOnce(&Value) -> Option<T>) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            v => read(v).map(Some),
        }
    }

    fn string(v: &Value) -> Option<String> {
        v.as_str().map(str::to_owned)
    }

    fn opt_string(v: &Value) -> Option<Option<String>> {
        optional(v, string)
    }

    fn opt_u64(v: &Value) -> Option<Option<u64>> {
        optional(v, Value::as_u64)
    }

    fn opt_bool(v: &Value) -> Option<Option<bool>> {
        optional(v, Value::as_bool)
    }

    fn list<T>(v: &Value, read: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
        v.as_array()?.iter().map(read).collect()
    }

    /// One element of `query-named-block-nodes` (or `query-block`'s `inserted`).
    pub(crate) fn block_device_info(v: &Value) -> Option<BlockDeviceInfo> {
        let (mut drv, mut file, mut ro, mut image) = (None, None, None, None);
        let mut info = BlockDeviceInfo::default();
        for (key, v) in v.as_object()? {
            match key.as_str() {
                "node-name" => info.node_name = opt_string(v)?,
                "drv" => drv = Some(string(v)?),
                "file" => file = Some(string(v)?),
                "ro" => ro = Some(v.as_bool()?),
                "backing_file" => info.backing_file = opt_string(v)?,
                "backing_file_depth" => info.backing_file_depth = v.as_u64()?,
                "encrypted" => info.encrypted = v.as_bool()?,
                "active" => info.active = opt_bool(v)?,
                "image" => image = Some(image_info(v)?),
                "dirty-bitmaps" => info.dirty_bitmaps = list(v, dirty_info)?,
                _ => {}
            }
        }
        info.drv = drv?;
        info.file = file?;
        info.ro = ro?;
        info.image = image?;
        Some(info)
    }

    fn image_info(v: &Value) -> Option<ImageInfo> {
        let (mut filename, mut format, mut virtual_size) = (None, None, None);
        let mut info = ImageInfo::default();
        for (key, v) in v.as_object()? {
            match key.as_str() {
                "filename" => filename = Some(string(v)?),
                "format" => format = Some(string(v)?),
                "virtual-size" => virtual_size = Some(v.as_u64()?),
                "actual-size" => info.actual_size = opt_u64(v)?,
                "cluster-size" => info.cluster_size = opt_u64(v)?,
                "dirty-flag" => info.dirty_flag = opt_bool(v)?,
                "backing-filename" => info.backing_filename = opt_string(v)?,
                "full-backing-filename" => info.full_backing_filename = opt_string(v)?,
                "backing-filename-format" => info.backing_filename_format = opt_string(v)?,
                "backing-image" => {
                    info.backing_image = optional(v, |v| image_info(v).map(Box::new))?;
                }
                "format-specific" => info.format_specific = optional(v, specific)?,
                _ => {}
            }
        }
        info.filename = filename?;
        info.format = format?;
        info.virtual_size = virtual_size?;
        Some(info)
    }

    fn specific(v: &Value) -> Option<ImageInfoSpecific> {
        let m = v.as_object()?;
        let format = m.get("type")?.as_str()?;
        let data = m.get("data");
        Some(match format {
            "qcow2" => ImageInfoSpecific::Qcow2(qcow2_info(data?)?),
            _ => ImageInfoSpecific::Other {
                format: format.to_owned(),
                data: data.cloned().unwrap_or(Value::Null),
            },
        })
    }

    fn qcow2_info(v: &Value) -> Option<Qcow2Info> {
        let mut info = Qcow2Info::default();
        for (key, v) in v.as_object()? {
            match key.as_str() {
                "compat" => info.compat = string(v)?,
                "data-file" => info.data_file = opt_string(v)?,
                "lazy-refcounts" => info.lazy_refcounts = opt_bool(v)?,
                "corrupt" => info.corrupt = opt_bool(v)?,
                "refcount-bits" => info.refcount_bits = opt_u64(v)?,
                "extended-l2" => info.extended_l2 = opt_bool(v)?,
                "compression-type" => info.compression_type = opt_string(v)?,
                "bitmaps" => info.bitmaps = optional(v, |v| list(v, stored_bitmap))?,
                _ => {}
            }
        }
        Some(info)
    }

    fn stored_bitmap(v: &Value) -> Option<Qcow2BitmapInfo> {
        let mut info = Qcow2BitmapInfo::default();
        for (key, v) in v.as_object()? {
            match key.as_str() {
                "name" => info.name = string(v)?,
                "granularity" => info.granularity = v.as_u64()?,
                "flags" => {
                    info.flags = list(v, |f| f.as_str().map(Qcow2BitmapFlag::from_wire))?;
                }
                _ => {}
            }
        }
        Some(info)
    }

    fn dirty_info(v: &Value) -> Option<BlockDirtyInfo> {
        let mut info = BlockDirtyInfo::default();
        for (key, v) in v.as_object()? {
            match key.as_str() {
                "name" => info.name = opt_string(v)?,
                "recording" => info.recording = v.as_bool()?,
                "persistent" => info.persistent = v.as_bool()?,
                "busy" => info.busy = v.as_bool()?,
                "inconsistent" => info.inconsistent = v.as_bool()?,
                "granularity" => info.granularity = v.as_u64()?,
                "count" => info.count = v.as_u64()?,
                _ => {}
            }
        }
        Some(info)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{BlockDeviceInfo, direct};

    fn node() -> Value {
        json!({"active": true, "backing_file": "/img/vdb.qcow2", "backing_file_depth": 0,
            "cache": {"direct": false, "no-flush": false, "writeback": true},
            "detect_zeroes": "off", "drv": "qcow2", "encrypted": false, "file": "/img/vdb.ovl",
            "image": {"actual-size": 266240, "backing-filename": "/img/vdb.qcow2",
                "backing-filename-format": "qcow2", "cluster-size": 65536, "dirty-flag": false,
                "filename": "/img/vdb.ovl", "format": "qcow2",
                "format-specific": {"data": {"compat": "1.1", "compression-type": "zlib",
                    "corrupt": false, "extended-l2": false, "lazy-refcounts": false,
                    "refcount-bits": 16, "bitmaps": [{"flags": ["in-use", "auto", "odd"],
                    "granularity": 65536, "name": "c1"}]}, "type": "qcow2"},
                "full-backing-filename": "/img/vdb.qcow2", "virtual-size": 524288,
                "backing-image": {"filename": "/img/vdb.qcow2", "format": "qcow2",
                    "virtual-size": 524288, "actual-size": null,
                    "format-specific": {"type": "file", "data": {"x": [1]}}}},
            "node-name": "libvirt-3-format", "ro": false,
            "dirty-bitmaps": [{"busy": false, "count": 0, "granularity": 65536,
                "persistent": true, "recording": true, "name": "c1"},
                {"busy": true, "count": 131072, "granularity": 65536, "persistent": false,
                "recording": false, "inconsistent": true}]})
    }

    /// The direct reader either gives up or builds exactly what serde builds.
    fn agrees(v: &Value) -> bool {
        let by_serde = BlockDeviceInfo::deserialize(v).ok();
        match direct::block_device_info(v) {
            Some(d) => by_serde == Some(d),
            None => true,
        }
    }

    use serde::Deserialize as _;

    #[test]
    fn direct_node_decoding_builds_what_serde_builds() {
        let full = node();
        assert!(direct::block_device_info(&full).is_some());
        assert!(agrees(&full));
        let mut variants = Vec::new();
        // Each member of each object left out, set to null, or to a value of another type.
        let paths: &[&[&str]] = &[
            &[],
            &["image"],
            &["image", "format-specific"],
            &["image", "format-specific", "data"],
            &["image", "backing-image"],
        ];
        for path in paths {
            let mut at = full.clone();
            let mut target = &mut at;
            for p in *path {
                target = &mut target[*p];
            }
            let keys: Vec<String> = target.as_object().unwrap().keys().cloned().collect();
            for key in keys {
                for replacement in [None, Some(Value::Null), Some(json!("s")), Some(json!(-1))] {
                    let mut v = full.clone();
                    let mut t = &mut v;
                    for p in *path {
                        t = &mut t[*p];
                    }
                    let m = t.as_object_mut().unwrap();
                    match replacement {
                        None => {
                            m.remove(&key);
                        }
                        Some(r) => {
                            m.insert(key.clone(), r);
                        }
                    }
                    variants.push(v);
                }
            }
        }
        let mut bitmap = full.clone();
        bitmap["dirty-bitmaps"][0] = json!({});
        variants.push(bitmap);
        let mut flags = full.clone();
        flags["image"]["format-specific"]["data"]["bitmaps"][0]["flags"] = json!([1]);
        variants.push(flags);
        for v in &variants {
            assert!(agrees(v), "{v}");
        }
    }
}
