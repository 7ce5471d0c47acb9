//! The qcow2 image format as the simulator keeps it: virtual size, cluster size, sparse clusters
//! (data or zero), the backing file named in the header, and the persistent bitmap directory
//! with its `in-use` and `auto` flags.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::bitmap::Bits;
use crate::image::ClusterMap;
use crate::node::object;

/// Smallest and largest cluster sizes qcow2 accepts.
pub const MIN_CLUSTER: u64 = 512;
/// See [`MIN_CLUSTER`].
pub const MAX_CLUSTER: u64 = 2 * 1024 * 1024;

/// A qcow2 image (version 3).
#[derive(Debug, Clone)]
pub struct Qcow2Image {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Allocated clusters.
    pub data: ClusterMap,
    /// Backing file path from the header.
    pub backing_file: Option<String>,
    /// Backing format from the header.
    pub backing_format: Option<String>,
    /// The persistent bitmap directory, by name.
    pub bitmaps: BTreeMap<String, StoredBitmap>,
}

/// A persistent bitmap as stored in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    /// Granularity in bytes.
    pub granularity: u64,
    /// The `auto` flag: the bitmap records when loaded.
    pub auto: bool,
    /// The `in-use` flag: set while a process has it loaded read-write; left set by a crash.
    pub in_use: bool,
    /// Dirty granules as last stored.
    pub bits: Bits,
}

impl StoredBitmap {
    /// Flags as `qemu-img info` prints them.
    pub fn flags(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.in_use {
            f.push("in-use");
        }
        if self.auto {
            f.push("auto");
        }
        f
    }
}

impl Qcow2Image {
    /// A fresh image without data, backing file or bitmaps.
    pub fn new(virtual_size: u64, cluster_size: u64) -> Self {
        Self {
            virtual_size,
            cluster_size,
            data: ClusterMap::new(cluster_size),
            backing_file: None,
            backing_format: None,
            bitmaps: BTreeMap::new(),
        }
    }

    /// `format-specific` as QEMU reports it for a qcow2 node.
    pub fn format_specific(&self) -> Value {
        // The members every image has are built once and copied.
        static COMMON: LazyLock<Map<String, Value>> = LazyLock::new(|| {
            // Members in key order (see `object`).
            object([
                ("compat", "1.1".into()),
                ("compression-type", "zlib".into()),
                ("corrupt", false.into()),
                ("extended-l2", false.into()),
                ("lazy-refcounts", false.into()),
                ("refcount-bits", 16.into()),
            ])
        });
        let mut data = COMMON.clone();
        if !self.bitmaps.is_empty() {
            let list = self.bitmaps.iter().map(|(name, b)| {
                Value::Object(object([
                    ("flags", b.flags().into()),
                    ("granularity", b.granularity.into()),
                    ("name", name.as_str().into()),
                ]))
            });
            data.insert("bitmaps".to_owned(), list.collect());
        }
        Value::Object(object([
            ("data", Value::Object(data)),
            ("type", "qcow2".into()),
        ]))
    }
}

/// Validates a `blockdev-create` cluster size; the error text is QEMU's.
pub fn check_cluster_size(cluster_size: u64) -> Result<(), String> {
    if !cluster_size.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size) {
        return Err("Cluster size must be a power of two between 512 and 2048k".to_string());
    }
    Ok(())
}

/// Validates a `blockdev-create` size; the error text is QEMU's.
pub fn check_image_size(size: u64) -> Result<(), String> {
    if !size.is_multiple_of(512) {
        return Err("Image size must be a multiple of 512 bytes".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_print_in_use_before_auto() {
        let b = StoredBitmap {
            granularity: 65536,
            auto: true,
            in_use: true,
            bits: Bits::new(1),
        };
        assert_eq!(b.flags(), vec!["in-use", "auto"]);
        let b = StoredBitmap {
            auto: false,
            in_use: false,
            ..b
        };
        assert!(b.flags().is_empty());
    }

    #[test]
    fn create_parameters_are_checked_with_qemu_texts() {
        assert!(check_cluster_size(65536).is_ok());
        assert_eq!(
            check_cluster_size(1000).unwrap_err(),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert_eq!(
            check_image_size(1000).unwrap_err(),
            "Image size must be a multiple of 512 bytes"
        );
    }

    #[test]
    fn format_specific_lists_stored_bitmaps() {
        let mut img = Qcow2Image::new(1 << 20, 65536);
        assert!(img.format_specific()["data"].get("bitmaps").is_none());
        img.bitmaps.insert(
            "chk-a".into(),
            StoredBitmap {
                granularity: 65536,
                auto: true,
                in_use: false,
                bits: Bits::new(16),
            },
        );
        assert_eq!(
            img.format_specific()["data"]["bitmaps"],
            json!([{"flags": ["auto"], "name": "chk-a", "granularity": 65536}])
        );
    }
}
