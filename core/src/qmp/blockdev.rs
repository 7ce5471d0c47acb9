//! Node graph commands: `blockdev-add`, `blockdev-del`, `blockdev-create`, `blockdev-reopen`.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::fields::{put, serialize_entries, take, take_required};

/// What a node does with discard requests.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDiscard {
    /// Ignore them (QEMU's default).
    #[default]
    Ignore,
    /// Pass them down (punch holes).
    Unmap,
}

/// A child node given by name or defined inline (QMP's `BlockdevRef`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An existing node, by node name.
    Node(String),
    /// A node defined inline; it is deleted together with its parent.
    Inline(Box<BlockdevOptions>),
}

impl BlockdevRef {
    /// The referenced node's name: the name itself, or the inline definition's `node-name`.
    pub fn node_name(&self) -> Option<&str> {
        match self {
            BlockdevRef::Node(name) => Some(name),
            BlockdevRef::Inline(options) => options.node_name.as_deref(),
        }
    }
}

impl From<BlockdevOptions> for BlockdevRef {
    fn from(options: BlockdevOptions) -> Self {
        BlockdevRef::Inline(Box::new(options))
    }
}

impl From<&str> for BlockdevRef {
    fn from(name: &str) -> Self {
        BlockdevRef::Node(name.to_owned())
    }
}

impl From<String> for BlockdevRef {
    fn from(name: String) -> Self {
        BlockdevRef::Node(name)
    }
}

/// A backing child: a reference, or `null` for "no backing, whatever the image header says"
/// (QMP's `BlockdevRefOrNull`). Incremental targets whose header names a backing file are opened
/// with `null`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockdevRefOrNull {
    /// `null`: open without a backing node.
    Null,
    /// A backing node.
    Ref(BlockdevRef),
}

/// The driver-specific part of [`BlockdevOptions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockdevDriver {
    /// `file`: a regular file.
    File {
        /// Path of the file.
        filename: String,
    },
    /// `host_device`: a block device.
    HostDevice {
        /// Path of the device.
        filename: String,
    },
    /// `qcow2` over a protocol node.
    Qcow2 {
        /// The protocol node holding the image.
        file: BlockdevRef,
        /// The backing node: absent = open what the header names, `Null` = none.
        backing: Option<BlockdevRefOrNull>,
    },
    /// `raw` over a protocol node.
    Raw {
        /// The protocol node.
        file: BlockdevRef,
    },
    /// Any other driver; its options live in [`BlockdevOptions::extra`].
    Other {
        /// The driver's name (`copy-before-write`, `snapshot-access`, `nbd`...).
        driver: String,
    },
}

impl BlockdevDriver {
    /// The driver's QMP name.
    pub fn name(&self) -> &str {
        match self {
            BlockdevDriver::File { .. } => "file",
            BlockdevDriver::HostDevice { .. } => "host_device",
            BlockdevDriver::Qcow2 { .. } => "qcow2",
            BlockdevDriver::Raw { .. } => "raw",
            BlockdevDriver::Other { driver } => driver,
        }
    }
}

/// Arguments of `blockdev-add`, and the items of `blockdev-reopen`: the options of one node.
/// On the wire it is one flat object (`driver`, `node-name`, driver options...). Options this
/// vocabulary does not name are kept in `extra`, so every node definition round-trips.
///
/// ```
/// # use vbackup_core::qmp::{BlockdevOptions, BlockdevDriver, BlockdevRef, BlockdevRefOrNull};
/// let target = BlockdevOptions {
///     read_only: Some(false),
///     ..BlockdevOptions::new("libvirt-3-format", BlockdevDriver::Qcow2 {
///         file: BlockdevRef::from("libvirt-3-storage"),
///         backing: Some(BlockdevRefOrNull::Null),
///     })
/// };
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockdevOptions {
    /// The node's name; QEMU generates `#blockNNN` when absent.
    pub node_name: Option<String>,
    /// The driver and its typed options.
    pub driver: BlockdevDriver,
    /// Open read-only.
    pub read_only: Option<bool>,
    /// Fall back to read-only when write access is refused (libvirt sets it on storage nodes).
    pub auto_read_only: Option<bool>,
    /// Discard handling.
    pub discard: Option<BlockdevDiscard>,
    /// Every other option, verbatim (cache, detect-zeroes, driver options of `Other`...). An
    /// entry named like a typed option is ignored when encoding.
    pub extra: BTreeMap<String, Value>,
}

impl BlockdevOptions {
    /// Node `node_name` with `driver` and no other option.
    pub fn new(node_name: impl Into<String>, driver: BlockdevDriver) -> Self {
        BlockdevOptions {
            node_name: Some(node_name.into()),
            driver,
            read_only: None,
            auto_read_only: None,
            discard: None,
            extra: BTreeMap::new(),
        }
    }

    /// A `file` protocol node.
    pub fn file(node_name: impl Into<String>, filename: impl Into<String>) -> Self {
        BlockdevOptions::new(
            node_name,
            BlockdevDriver::File {
                filename: filename.into(),
            },
        )
    }

    /// A `qcow2` format node over `file`; `backing` as in [`BlockdevDriver::Qcow2`].
    pub fn qcow2(
        node_name: impl Into<String>,
        file: impl Into<BlockdevRef>,
        backing: Option<BlockdevRefOrNull>,
    ) -> Self {
        BlockdevOptions::new(
            node_name,
            BlockdevDriver::Qcow2 {
                file: file.into(),
                backing,
            },
        )
    }

    /// A `raw` format node over `file`.
    pub fn raw(node_name: impl Into<String>, file: impl Into<BlockdevRef>) -> Self {
        BlockdevOptions::new(node_name, BlockdevDriver::Raw { file: file.into() })
    }

    fn to_entries(&self) -> Result<Vec<(String, Value)>, serde_json::Error> {
        let mut entries = Vec::new();
        entries.push(("driver".to_owned(), Value::from(self.driver.name())));
        put(&mut entries, "node-name", &self.node_name)?;
        match &self.driver {
            BlockdevDriver::File { filename } | BlockdevDriver::HostDevice { filename } => {
                entries.push(("filename".to_owned(), Value::from(filename.as_str())));
            }
            BlockdevDriver::Qcow2 { file, backing } => {
                entries.push(("file".to_owned(), serde_json::to_value(file)?));
                put(&mut entries, "backing", backing)?;
            }
            BlockdevDriver::Raw { file } => {
                entries.push(("file".to_owned(), serde_json::to_value(file)?));
            }
            BlockdevDriver::Other { .. } => {}
        }
        put(&mut entries, "read-only", &self.read_only)?;
        put(&mut entries, "auto-read-only", &self.auto_read_only)?;
        put(&mut entries, "discard", &self.discard)?;
        for (key, value) in &self.extra {
            // A typed option wins over an `extra` entry of the same name, so the output never
            // holds a member twice.
            if !entries.iter().any(|(known, _)| known == key) {
                entries.push((key.clone(), value.clone()));
            }
        }
        Ok(entries)
    }

    fn from_map(mut map: Map<String, Value>) -> Result<Self, String> {
        let driver_name: String = take_required(&mut map, "driver")?;
        let node_name = take(&mut map, "node-name")?;
        let read_only = take(&mut map, "read-only")?;
        let auto_read_only = take(&mut map, "auto-read-only")?;
        let discard = take(&mut map, "discard")?;
        let driver = match driver_name.as_str() {
            "file" => BlockdevDriver::File {
                filename: take_required(&mut map, "filename")?,
            },
            "host_device" => BlockdevDriver::HostDevice {
                filename: take_required(&mut map, "filename")?,
            },
            "qcow2" => BlockdevDriver::Qcow2 {
                file: take_required(&mut map, "file")?,
                backing: take(&mut map, "backing")?,
            },
            "raw" => BlockdevDriver::Raw {
                file: take_required(&mut map, "file")?,
            },
            _ => BlockdevDriver::Other {
                driver: driver_name,
            },
        };
        Ok(BlockdevOptions {
            node_name,
            driver,
            read_only,
            auto_read_only,
            discard,
            extra: map.into_iter().collect(),
        })
    }
}

impl Serialize for BlockdevOptions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries = self.to_entries().map_err(S::Error::custom)?;
        serialize_entries(&entries, serializer)
    }
}

impl<'de> Deserialize<'de> for BlockdevOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(deserializer)?;
        BlockdevOptions::from_map(map).map_err(D::Error::custom)
    }
}

/// Arguments of `blockdev-del`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevDel {
    /// The node to delete (children defined inline go with it).
    pub node_name: String,
}

/// Arguments of `blockdev-reopen`: the complete new options of each node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockdevReopen {
    /// One entry per node, every option spelled out (unspecified options revert to defaults).
    pub options: Vec<BlockdevOptions>,
}

/// Arguments of `blockdev-create` (a job of type `create`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCreate {
    /// The job's id (libvirt: `create-<format node>`).
    pub job_id: String,
    /// What to create.
    pub options: BlockdevCreateOptions,
}

/// qcow2 on-disk version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qcow2Version {
    /// compat=0.10: no persistent bitmaps.
    V2,
    /// compat=1.1.
    V3,
}

/// `blockdev-create` options of the `file` driver: create (or truncate) a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CreateFileOptions {
    /// Path of the file.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// Preallocation mode (`off`, `falloc`, `full`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<String>,
    /// Disable copy-on-write (btrfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nocow: Option<bool>,
    /// Extent size hint in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extent_size_hint: Option<u64>,
}

/// `blockdev-create` options of the `qcow2` driver: format an image on an existing protocol node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CreateQcow2Options {
    /// The protocol node to format.
    pub file: BlockdevRef,
    /// Virtual size in bytes.
    pub size: u64,
    /// On-disk version; QEMU's default is v3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Qcow2Version>,
    /// Backing file name written into the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Format of the backing file written into the header (`qcow2`, `raw`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_fmt: Option<String>,
    /// Cluster size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Subcluster allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// Preallocation mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<String>,
    /// Lazy refcounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<u64>,
    /// Compression type (`zlib`, `zstd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<String>,
    /// External data file node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<BlockdevRef>,
    /// Encryption options, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Value>,
}

impl CreateQcow2Options {
    /// A qcow2 image of `size_bytes` on protocol node `file`, every option left to QEMU.
    pub fn new(file: impl Into<BlockdevRef>, size_bytes: u64) -> Self {
        CreateQcow2Options {
            file: file.into(),
            size: size_bytes,
            version: None,
            backing_file: None,
            backing_fmt: None,
            cluster_size: None,
            extended_l2: None,
            preallocation: None,
            lazy_refcounts: None,
            refcount_bits: None,
            compression_type: None,
            data_file: None,
            encrypt: None,
        }
    }
}

/// The `options` of `blockdev-create`, tagged by `driver`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockdevCreateOptions {
    /// `driver: file`.
    File(CreateFileOptions),
    /// `driver: qcow2`.
    Qcow2(CreateQcow2Options),
    /// Any other driver, options verbatim.
    Other {
        /// The driver's name.
        driver: String,
        /// Its options besides `driver`.
        options: BTreeMap<String, Value>,
    },
}

impl BlockdevCreateOptions {
    /// The driver's QMP name.
    pub fn driver(&self) -> &str {
        match self {
            BlockdevCreateOptions::File(_) => "file",
            BlockdevCreateOptions::Qcow2(_) => "qcow2",
            BlockdevCreateOptions::Other { driver, .. } => driver,
        }
    }
}

/// `driver` followed by the driver's options, in their declaration order.
#[derive(Serialize)]
struct DriverThen<'a, T: Serialize> {
    driver: &'a str,
    #[serde(flatten)]
    options: &'a T,
}

impl Serialize for BlockdevCreateOptions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let driver = self.driver();
        match self {
            BlockdevCreateOptions::File(options) => {
                DriverThen { driver, options }.serialize(serializer)
            }
            BlockdevCreateOptions::Qcow2(options) => {
                DriverThen { driver, options }.serialize(serializer)
            }
            BlockdevCreateOptions::Other { options, .. } => {
                DriverThen { driver, options }.serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for BlockdevCreateOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let driver: String = take_required(&mut map, "driver").map_err(D::Error::custom)?;
        let rest = Value::Object(map);
        Ok(match driver.as_str() {
            "file" => {
                BlockdevCreateOptions::File(serde_json::from_value(rest).map_err(D::Error::custom)?)
            }
            "qcow2" => BlockdevCreateOptions::Qcow2(
                serde_json::from_value(rest).map_err(D::Error::custom)?,
            ),
            _ => {
                let Value::Object(map) = rest else {
                    return Err(D::Error::custom("options must be an object"));
                };
                BlockdevCreateOptions::Other {
                    driver,
                    options: map.into_iter().collect(),
                }
            }
        })
    }
}
