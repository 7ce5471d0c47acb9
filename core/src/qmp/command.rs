//! [`QmpCommand`]: every command of the vocabulary, with its exact wire form
//! `{"execute": NAME, "arguments": {...}, "id": ID}`, encoded and decoded.
//!
//! Encoding omits `arguments` when they are empty (`{}`), as libvirt does; QEMU accepts both.
//! Decoding is strict for the commands this vocabulary names (unknown arguments are an error, as
//! QEMU makes them), so a decoded command re-encodes to the same JSON. Commands outside the
//! vocabulary decode as [`QmpCommand::Other`], verbatim.

use serde::Serialize;
use serde_json::{Map, Value};

use super::backup::BlockdevBackup;
use super::bitmap::{BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge};
use super::blockdev::{BlockdevCreate, BlockdevDel, BlockdevOptions, BlockdevReopen};
use super::error::DecodeError;
use super::greeting::QmpCapabilities;
use super::job::{BlockJobCancel, BlockJobSetSpeed, JobRef};
use super::nbd::{BlockExportAdd, BlockExportDel, NbdServerStart};
use super::object::{ObjectAdd, ObjectDel};
use super::query::QueryNamedBlockNodes;
use super::transaction::Transaction;
use crate::link::CommandId;

macro_rules! commands {
    (
        with_arguments { $( $(#[$am:meta])* $av:ident($aty:ty) = $aname:literal, )* }
        without_arguments { $( $(#[$nm:meta])* $nv:ident = $nname:literal, )* }
    ) => {
        /// A QMP command of the vocabulary (or any other, verbatim). The id travels beside it:
        /// see [`QmpCommand::encode`] and [`QmpCommand::decode`].
        ///
        /// ```
        /// # use vbackup_core::qmp::{QmpCommand, JobRef};
        /// # use vbackup_core::link::CommandId;
        /// let cmd = QmpCommand::JobDismiss(JobRef::new("backup-vda-libvirt-2-format"));
        /// assert_eq!(cmd.encode(Some(&CommandId::from(7))),
        ///     r#"{"execute":"job-dismiss","arguments":{"id":"backup-vda-libvirt-2-format"},"id":7}"#);
        /// ```
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum QmpCommand {
            $( $(#[$am])* $av($aty), )*
            $( $(#[$nm])* $nv, )*
            /// A command outside the vocabulary, kept verbatim.
            Other {
                /// The command's name.
                execute: String,
                /// Its arguments, exactly as given (absent or an object).
                arguments: Option<Value>,
            },
        }

        impl QmpCommand {
            /// The command's QMP name (`execute`).
            pub fn name(&self) -> &str {
                match self {
                    $( QmpCommand::$av(_) => $aname, )*
                    $( QmpCommand::$nv => $nname, )*
                    QmpCommand::Other { execute, .. } => execute,
                }
            }

            /// The `arguments` member as it goes on the wire: `None` when the command has none
            /// or they are empty.
            pub fn arguments(&self) -> Option<Value> {
                let value = match self {
                    $( QmpCommand::$av(args) => to_json(args), )*
                    $( QmpCommand::$nv => return None, )*
                    QmpCommand::Other { arguments, .. } => return arguments.clone(),
                };
                match &value {
                    Value::Object(map) if map.is_empty() => None,
                    _ => Some(value),
                }
            }

            /// Builds a command from its name and `arguments` member. Names of the vocabulary
            /// get typed arguments (an error if they do not fit); other names give `Other`.
            pub fn from_parts(execute: &str, arguments: Option<Value>) -> Result<Self, DecodeError> {
                match execute {
                    $( $aname => Ok(QmpCommand::$av(typed_arguments(execute, arguments)?)), )*
                    $( $nname => {
                        no_arguments(execute, arguments)?;
                        Ok(QmpCommand::$nv)
                    } )*
                    _ => Ok(QmpCommand::Other { execute: execute.to_owned(), arguments }),
                }
            }

            /// Serializes the arguments straight from their typed form, so members keep the
            /// declaration order of their struct.
            fn serialize_arguments<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                match self {
                    $( QmpCommand::$av(args) => args.serialize(serializer), )*
                    $( QmpCommand::$nv => serializer.serialize_unit(), )*
                    QmpCommand::Other { arguments, .. } => arguments.serialize(serializer),
                }
            }

            /// True if `name` is a command of the vocabulary (decoded with typed arguments).
            pub fn is_known_name(name: &str) -> bool {
                matches!(name, $( $aname )|* | $( $nname )|*)
            }
        }
    };
}

commands! {
    with_arguments {
        /// `qmp_capabilities`: ends capability negotiation; must come first.
        QmpCapabilities(QmpCapabilities) = "qmp_capabilities",
        /// `transaction`.
        Transaction(Transaction) = "transaction",
        /// `block-dirty-bitmap-add`.
        BlockDirtyBitmapAdd(BlockDirtyBitmapAdd) = "block-dirty-bitmap-add",
        /// `block-dirty-bitmap-remove`.
        BlockDirtyBitmapRemove(BlockDirtyBitmap) = "block-dirty-bitmap-remove",
        /// `block-dirty-bitmap-merge`.
        BlockDirtyBitmapMerge(BlockDirtyBitmapMerge) = "block-dirty-bitmap-merge",
        /// `block-dirty-bitmap-clear`.
        BlockDirtyBitmapClear(BlockDirtyBitmap) = "block-dirty-bitmap-clear",
        /// `block-dirty-bitmap-enable`.
        BlockDirtyBitmapEnable(BlockDirtyBitmap) = "block-dirty-bitmap-enable",
        /// `block-dirty-bitmap-disable`.
        BlockDirtyBitmapDisable(BlockDirtyBitmap) = "block-dirty-bitmap-disable",
        /// `blockdev-add`.
        BlockdevAdd(Box<BlockdevOptions>) = "blockdev-add",
        /// `blockdev-del`.
        BlockdevDel(BlockdevDel) = "blockdev-del",
        /// `blockdev-create` (starts a `create` job).
        BlockdevCreate(Box<BlockdevCreate>) = "blockdev-create",
        /// `blockdev-reopen`.
        BlockdevReopen(BlockdevReopen) = "blockdev-reopen",
        /// `blockdev-backup` (starts a `backup` job).
        BlockdevBackup(Box<BlockdevBackup>) = "blockdev-backup",
        /// `job-dismiss`: forget a concluded job.
        JobDismiss(JobRef) = "job-dismiss",
        /// `job-cancel`.
        JobCancel(JobRef) = "job-cancel",
        /// `job-finalize`: finalize a pending job.
        JobFinalize(JobRef) = "job-finalize",
        /// `block-job-cancel`.
        BlockJobCancel(BlockJobCancel) = "block-job-cancel",
        /// `block-job-set-speed`.
        BlockJobSetSpeed(BlockJobSetSpeed) = "block-job-set-speed",
        /// `query-named-block-nodes`.
        QueryNamedBlockNodes(QueryNamedBlockNodes) = "query-named-block-nodes",
        /// `nbd-server-start`.
        NbdServerStart(NbdServerStart) = "nbd-server-start",
        /// `block-export-add`.
        BlockExportAdd(BlockExportAdd) = "block-export-add",
        /// `block-export-del`.
        BlockExportDel(BlockExportDel) = "block-export-del",
        /// `object-add`.
        ObjectAdd(ObjectAdd) = "object-add",
        /// `object-del`.
        ObjectDel(ObjectDel) = "object-del",
    }
    without_arguments {
        /// `query-jobs`.
        QueryJobs = "query-jobs",
        /// `query-block`.
        QueryBlock = "query-block",
        /// `query-status`.
        QueryStatus = "query-status",
        /// `query-block-exports`.
        QueryBlockExports = "query-block-exports",
        /// `nbd-server-stop`.
        NbdServerStop = "nbd-server-stop",
        /// `quit`: QEMU exits.
        Quit = "quit",
    }
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // The vocabulary's types serialize to JSON objects without fallible steps (no non-string
    // keys, no custom errors), so the error arm is unreachable in practice; Null keeps it total.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn typed_arguments<T: serde::de::DeserializeOwned>(
    execute: &str,
    arguments: Option<Value>,
) -> Result<T, DecodeError> {
    let arguments = arguments.unwrap_or_else(|| Value::Object(Map::new()));
    serde_json::from_value(arguments)
        .map_err(|err| DecodeError::invalid(format!("arguments of {execute}"), err))
}

fn no_arguments(execute: &str, arguments: Option<Value>) -> Result<(), DecodeError> {
    match arguments {
        None => Ok(()),
        Some(Value::Object(map)) if map.is_empty() => Ok(()),
        Some(other) => Err(DecodeError::invalid(
            format!("arguments of {execute}"),
            format!("the command takes no arguments, got {other}"),
        )),
    }
}

/// The `arguments` member of a command, serialized from the typed form.
struct ArgumentsOf<'a>(&'a QmpCommand);

impl Serialize for ArgumentsOf<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_arguments(serializer)
    }
}

/// The wire form of a command: `execute`, `arguments` (left out when empty), `id`.
struct WireCommand<'a> {
    command: &'a QmpCommand,
    id: Option<&'a CommandId>,
}

impl Serialize for WireCommand<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("execute", self.command.name())?;
        if self.command.arguments().is_some() {
            map.serialize_entry("arguments", &ArgumentsOf(self.command))?;
        }
        if let Some(id) = self.id {
            map.serialize_entry("id", id)?;
        }
        map.end()
    }
}

/// Shorthands for the commands the core sends most, in the form libvirt sends them.
impl QmpCommand {
    /// `query-named-block-nodes {"flat": true}`.
    pub fn query_named_block_nodes() -> Self {
        QmpCommand::QueryNamedBlockNodes(QueryNamedBlockNodes { flat: Some(true) })
    }

    /// `job-dismiss {"id": id}`.
    pub fn job_dismiss(id: impl Into<String>) -> Self {
        QmpCommand::JobDismiss(JobRef::new(id))
    }

    /// `job-cancel {"id": id}`.
    pub fn job_cancel(id: impl Into<String>) -> Self {
        QmpCommand::JobCancel(JobRef::new(id))
    }

    /// `job-finalize {"id": id}`.
    pub fn job_finalize(id: impl Into<String>) -> Self {
        QmpCommand::JobFinalize(JobRef::new(id))
    }

    /// `block-job-cancel {"device": job_id, "force": force}`.
    pub fn block_job_cancel(job_id: impl Into<String>, force: bool) -> Self {
        QmpCommand::BlockJobCancel(BlockJobCancel {
            device: job_id.into(),
            force: Some(force),
        })
    }

    /// `blockdev-del {"node-name": node_name}`.
    pub fn blockdev_del(node_name: impl Into<String>) -> Self {
        QmpCommand::BlockdevDel(BlockdevDel {
            node_name: node_name.into(),
        })
    }

    /// `block-dirty-bitmap-remove {"node": node, "name": name}`.
    pub fn bitmap_remove(node: impl Into<String>, name: impl Into<String>) -> Self {
        QmpCommand::BlockDirtyBitmapRemove(BlockDirtyBitmap::new(node, name))
    }

    /// `block-export-del {"id": id}`.
    pub fn block_export_del(id: impl Into<String>) -> Self {
        QmpCommand::BlockExportDel(BlockExportDel {
            id: id.into(),
            mode: None,
        })
    }

    /// `object-del {"id": id}`.
    pub fn object_del(id: impl Into<String>) -> Self {
        QmpCommand::ObjectDel(ObjectDel { id: id.into() })
    }
}

impl QmpCommand {
    /// The wire form as a JSON value: `{"execute", "arguments"?, "id"?}`.
    pub fn to_wire(&self, id: Option<&CommandId>) -> Value {
        let mut map = Map::new();
        map.insert("execute".to_owned(), Value::from(self.name()));
        if let Some(arguments) = self.arguments() {
            map.insert("arguments".to_owned(), arguments);
        }
        if let Some(id) = id {
            map.insert("id".to_owned(), to_json(id));
        }
        Value::Object(map)
    }

    /// The wire form as compact JSON text, members in the order `execute`, `arguments`, `id`
    /// (arguments in the declaration order of their struct), without a line terminator.
    pub fn encode(&self, id: Option<&CommandId>) -> String {
        let wire = WireCommand { command: self, id };
        // Serializing strings, JSON values and ids into a String cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Reads a command from its wire form (a JSON object with `execute`, optional `arguments`
    /// and `id`). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<(Option<CommandId>, QmpCommand), DecodeError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| DecodeError::from_json(&err))?;
        Self::from_wire(value)
    }

    /// Like [`QmpCommand::decode`], from a JSON value.
    pub fn from_wire(value: Value) -> Result<(Option<CommandId>, QmpCommand), DecodeError> {
        let Value::Object(mut map) = value else {
            return Err(DecodeError::NotAnObject);
        };
        let execute = match map.remove("execute") {
            Some(Value::String(name)) => name,
            Some(other) => {
                return Err(DecodeError::invalid(
                    "command",
                    format!("'execute' must be a string, got {other}"),
                ));
            }
            None => {
                return Err(DecodeError::Unrecognized {
                    keys: map.keys().cloned().collect(),
                });
            }
        };
        let id = match map.remove("id") {
            None => None,
            Some(id) => Some(
                serde_json::from_value::<CommandId>(id)
                    .map_err(|err| DecodeError::invalid("command id", err))?,
            ),
        };
        let arguments = map.remove("arguments");
        if let Some(key) = map.keys().next() {
            return Err(DecodeError::invalid(
                format!("command {execute}"),
                format!("unexpected member '{key}'"),
            ));
        }
        if let Some(arguments) = &arguments
            && !arguments.is_object()
        {
            return Err(DecodeError::invalid(
                format!("arguments of {execute}"),
                "arguments must be an object",
            ));
        }
        Ok((id, QmpCommand::from_parts(&execute, arguments)?))
    }
}

/// Serializes as the wire form without an id (`{"execute", "arguments"?}`), so structures that
/// hold commands (plans, journals, snapshots) show exactly what goes to QEMU.
impl Serialize for QmpCommand {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireCommand {
            command: self,
            id: None,
        }
        .serialize(serializer)
    }
}

/// Reads the wire form; an `id` member, if present, is ignored (use [`QmpCommand::decode`] to
/// read it).
impl<'de> serde::Deserialize<'de> for QmpCommand {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        QmpCommand::from_wire(value)
            .map(|(_, command)| command)
            .map_err(serde::de::Error::custom)
    }
}
