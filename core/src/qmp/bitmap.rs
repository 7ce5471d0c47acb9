//! Dirty-bitmap commands: `block-dirty-bitmap-add/remove/merge/clear/enable/disable` (each also a
//! `transaction` action).

use serde::{Deserialize, Serialize};

/// Arguments of `block-dirty-bitmap-add`.
///
/// ```
/// # use vbackup_core::qmp::BlockDirtyBitmapAdd;
/// let add = BlockDirtyBitmapAdd { persistent: Some(true), disabled: Some(false),
///                                 ..BlockDirtyBitmapAdd::new("libvirt-2-format", "c1") };
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockDirtyBitmapAdd {
    /// The node that gets the bitmap (a format node).
    pub node: String,
    /// The new bitmap's name, unique on the node.
    pub name: String,
    /// Granularity in bytes (a power of two, at least 512); QEMU picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    /// Stored in the image at close (qcow2 only). QEMU's default is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Created not recording. QEMU's default is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

impl BlockDirtyBitmapAdd {
    /// A bitmap `name` on `node` with every option left to QEMU.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        BlockDirtyBitmapAdd {
            node: node.into(),
            name: name.into(),
            ..Default::default()
        }
    }
}

/// A bitmap located by node and name: the arguments of `block-dirty-bitmap-remove`, `-clear`,
/// `-enable` and `-disable`, and an item of a merge source or export bitmap list.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDirtyBitmap {
    /// The node holding the bitmap.
    pub node: String,
    /// The bitmap's name.
    pub name: String,
}

impl BlockDirtyBitmap {
    /// Bitmap `name` on `node`.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        BlockDirtyBitmap {
            node: node.into(),
            name: name.into(),
        }
    }
}

/// A bitmap named either by its name alone (looked up on a node given elsewhere) or by
/// `{node, name}` (QMP's `BlockDirtyBitmapOrStr`). Lists may mix both forms.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BitmapRef {
    /// A plain name: `"c1"`.
    Name(String),
    /// A located bitmap: `{"node": "libvirt-2-format", "name": "c1"}`.
    Located(BlockDirtyBitmap),
}

impl BitmapRef {
    /// The bitmap's name, whichever form names it.
    pub fn name(&self) -> &str {
        match self {
            BitmapRef::Name(name) => name,
            BitmapRef::Located(bitmap) => &bitmap.name,
        }
    }

    /// The node given with the name, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            BitmapRef::Name(_) => None,
            BitmapRef::Located(bitmap) => Some(&bitmap.node),
        }
    }
}

impl From<BlockDirtyBitmap> for BitmapRef {
    fn from(bitmap: BlockDirtyBitmap) -> Self {
        BitmapRef::Located(bitmap)
    }
}

/// Arguments of `block-dirty-bitmap-merge`: OR every source bitmap into `target` on `node`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDirtyBitmapMerge {
    /// The node holding the target bitmap (and the plain-named sources).
    pub node: String,
    /// The bitmap that receives the union.
    pub target: String,
    /// The sources; plain names are looked up on `node`.
    pub bitmaps: Vec<BitmapRef>,
}
