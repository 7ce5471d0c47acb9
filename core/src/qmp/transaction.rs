//! `transaction`: several actions applied atomically (all or none).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::backup::BlockdevBackup;
use super::bitmap::{BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge};
use super::fields::{reject_rest, take, take_required};

/// One action of a transaction: `{"type": ..., "data": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransactionAction {
    /// `block-dirty-bitmap-add`.
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    /// `block-dirty-bitmap-remove`.
    BlockDirtyBitmapRemove(BlockDirtyBitmap),
    /// `block-dirty-bitmap-merge`.
    BlockDirtyBitmapMerge(BlockDirtyBitmapMerge),
    /// `block-dirty-bitmap-clear`.
    BlockDirtyBitmapClear(BlockDirtyBitmap),
    /// `block-dirty-bitmap-enable`.
    BlockDirtyBitmapEnable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-disable`.
    BlockDirtyBitmapDisable(BlockDirtyBitmap),
    /// `blockdev-backup`.
    BlockdevBackup(BlockdevBackup),
    /// Any other action (`blockdev-snapshot`, `abort`...), data verbatim.
    Other {
        /// The action's type.
        action_type: String,
        /// Its data (`Value::Null` when the action has none).
        data: Value,
    },
}

impl TransactionAction {
    /// The action's QMP type name.
    pub fn action_type(&self) -> &str {
        match self {
            TransactionAction::BlockDirtyBitmapAdd(_) => "block-dirty-bitmap-add",
            TransactionAction::BlockDirtyBitmapRemove(_) => "block-dirty-bitmap-remove",
            TransactionAction::BlockDirtyBitmapMerge(_) => "block-dirty-bitmap-merge",
            TransactionAction::BlockDirtyBitmapClear(_) => "block-dirty-bitmap-clear",
            TransactionAction::BlockDirtyBitmapEnable(_) => "block-dirty-bitmap-enable",
            TransactionAction::BlockDirtyBitmapDisable(_) => "block-dirty-bitmap-disable",
            TransactionAction::BlockdevBackup(_) => "blockdev-backup",
            TransactionAction::Other { action_type, .. } => action_type,
        }
    }
}

impl Serialize for TransactionAction {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.action_type())?;
        match self {
            TransactionAction::BlockDirtyBitmapAdd(data) => map.serialize_entry("data", data)?,
            TransactionAction::BlockDirtyBitmapRemove(data)
            | TransactionAction::BlockDirtyBitmapClear(data)
            | TransactionAction::BlockDirtyBitmapEnable(data)
            | TransactionAction::BlockDirtyBitmapDisable(data) => {
                map.serialize_entry("data", data)?
            }
            TransactionAction::BlockDirtyBitmapMerge(data) => map.serialize_entry("data", data)?,
            TransactionAction::BlockdevBackup(data) => map.serialize_entry("data", data)?,
            TransactionAction::Other { data, .. } => {
                if !data.is_null() {
                    map.serialize_entry("data", data)?;
                }
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for TransactionAction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let action_type: String = take_required(&mut map, "type").map_err(D::Error::custom)?;
        let data: Value = take(&mut map, "data")
            .map_err(D::Error::custom)?
            .unwrap_or(Value::Null);
        reject_rest(&map).map_err(D::Error::custom)?;
        fn typed<T: serde::de::DeserializeOwned, E: serde::de::Error>(
            action_type: &str,
            data: Value,
        ) -> Result<T, E> {
            serde_json::from_value(data).map_err(|err| E::custom(format!("{action_type}: {err}")))
        }
        let t = action_type.as_str();
        Ok(match t {
            "block-dirty-bitmap-add" => TransactionAction::BlockDirtyBitmapAdd(typed(t, data)?),
            "block-dirty-bitmap-remove" => {
                TransactionAction::BlockDirtyBitmapRemove(typed(t, data)?)
            }
            "block-dirty-bitmap-merge" => TransactionAction::BlockDirtyBitmapMerge(typed(t, data)?),
            "block-dirty-bitmap-clear" => TransactionAction::BlockDirtyBitmapClear(typed(t, data)?),
            "block-dirty-bitmap-enable" => {
                TransactionAction::BlockDirtyBitmapEnable(typed(t, data)?)
            }
            "block-dirty-bitmap-disable" => {
                TransactionAction::BlockDirtyBitmapDisable(typed(t, data)?)
            }
            "blockdev-backup" => TransactionAction::BlockdevBackup(typed(t, data)?),
            _ => TransactionAction::Other { action_type, data },
        })
    }
}

/// How a transaction's jobs complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompletionMode {
    /// Each job completes on its own (QEMU's default).
    Individual,
    /// Jobs fail together. QEMU refuses it when a bitmap action is in the transaction.
    Grouped,
}

/// Optional properties of a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TransactionProperties {
    /// How the jobs complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_mode: Option<CompletionMode>,
}

/// Arguments of `transaction`.
///
/// ```
/// # use vbackup_core::qmp::{Transaction, TransactionAction, BlockDirtyBitmapAdd};
/// let tx = Transaction::new(vec![TransactionAction::BlockDirtyBitmapAdd(
///     BlockDirtyBitmapAdd::new("libvirt-2-format", "c2"))]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    /// The actions, applied in order, atomically.
    pub actions: Vec<TransactionAction>,
    /// Optional properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TransactionProperties>,
}

impl Transaction {
    /// A transaction of `actions` without properties.
    pub fn new(actions: Vec<TransactionAction>) -> Self {
        Transaction {
            actions,
            properties: None,
        }
    }
}
