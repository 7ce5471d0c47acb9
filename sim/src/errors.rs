//! QMP error replies with the `class` and `desc` texts real QEMU 10 sends.
//!
//! Every refusal the simulator makes goes through one of these constructors, so the texts live in
//! one place and each has a test. Nearly every block-layer failure is `GenericError`; the text is
//! what tells them apart.

use serde_json::{Value, json};

/// The class QEMU uses for nearly every block-layer failure.
pub const GENERIC_ERROR: &str = "GenericError";
/// The class of an unknown command or a command sent before capabilities negotiation.
pub const COMMAND_NOT_FOUND: &str = "CommandNotFound";
/// The class of `block-job-*` commands naming a job that does not exist.
pub const DEVICE_NOT_ACTIVE: &str = "DeviceNotActive";
/// Not a QEMU class: the reply of the simulator when its QEMU process is down (after `quit` or
/// `crash()`). A driver maps it to a dropped link; real QEMU never sends it.
pub const NOT_RUNNING: &str = "SimulatorNotRunning";

/// An `{"error": {"class", "desc"}}` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// QMP error class, such as `GenericError`.
    pub class: String,
    /// Human readable description, exactly as QEMU words it.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given text.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: GENERIC_ERROR.to_string(),
            desc: desc.into(),
        }
    }

    /// An error of any class.
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            desc: desc.into(),
        }
    }

    /// The wire form `{"class": ..., "desc": ...}`.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class, "desc": self.desc})
    }

    /// Parses the wire form `{"class": ..., "desc": ...}`.
    pub fn from_json(value: &Value) -> Option<Self> {
        Some(Self::new(
            value.get("class")?.as_str()?,
            value.get("desc")?.as_str()?,
        ))
    }

    // --- protocol ---

    /// A command other than `qmp_capabilities` before negotiation.
    pub fn negotiation_expected() -> Self {
        Self::new(
            COMMAND_NOT_FOUND,
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        )
    }
    /// A second `qmp_capabilities`.
    pub fn negotiation_done() -> Self {
        Self::new(
            COMMAND_NOT_FOUND,
            "Capabilities negotiation is already complete, command ignored",
        )
    }
    /// An unknown command name.
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            COMMAND_NOT_FOUND,
            format!("The command {name} has not been found"),
        )
    }
    /// A required argument is missing.
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }
    /// An argument the command does not know.
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }
    /// An argument of the wrong JSON type.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }
    /// An enum argument with a value outside the enum.
    pub fn invalid_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }
    /// The simulator's process is down.
    pub fn not_running() -> Self {
        Self::new(NOT_RUNNING, "QEMU process is not running")
    }
    /// A well-formed request the simulator does not model.
    pub fn unsupported(what: &str) -> Self {
        Self::generic(format!("Not supported by the simulated QEMU: {what}"))
    }

    // --- nodes ---

    /// Lookup by device or node name failed (`blockdev-backup`, `block-dirty-bitmap-add`,
    /// child references in `blockdev-add`).
    pub fn device_or_node_not_found(device: &str, node: &str) -> Self {
        Self::generic(format!(
            "Cannot find device='{device}' nor node-name='{node}'"
        ))
    }
    /// `blockdev-del` or `blockdev-reopen` of an unknown node.
    pub fn node_name_not_found(node: &str) -> Self {
        Self::generic(format!("Failed to find node with node-name='{node}'"))
    }
    /// Bitmap commands naming an unknown node.
    pub fn node_not_found(node: &str) -> Self {
        Self::generic(format!("Node '{node}' not found"))
    }
    /// `blockdev-add` with a node-name already taken.
    pub fn duplicate_node(node: &str) -> Self {
        Self::generic(format!("Duplicate nodes with node-name='{node}'"))
    }
    /// A node name that is not a well-formed identifier.
    pub fn invalid_node_name(node: &str) -> Self {
        Self::generic(format!("Invalid node-name: '{node}'"))
    }
    /// A node name of 32 bytes or more.
    pub fn node_name_too_long() -> Self {
        Self::generic("Node name too long")
    }
    /// Opening a file that does not exist.
    pub fn could_not_open(path: &str) -> Self {
        Self::generic(format!(
            "Could not open '{path}': No such file or directory"
        ))
    }
    /// Opening the backing file named in an image header failed.
    pub fn could_not_open_backing(path: &str) -> Self {
        Self::generic(format!(
            "Could not open backing file: Could not open '{path}': No such file or directory"
        ))
    }
    /// A qcow2 node over a file that holds no qcow2 image.
    pub fn not_qcow2() -> Self {
        Self::generic("Image is not in qcow2 format")
    }
    /// `blockdev-del` of a node a device, an export or a running `blockdev-create` uses.
    pub fn node_in_use(node: &str) -> Self {
        Self::generic(format!("Node {node} is in use"))
    }
    /// `blockdev-del` of a node another node uses as a child.
    pub fn block_device_in_use(node: &str) -> Self {
        Self::generic(format!("Block device {node} is in use"))
    }
    /// `blockdev-del` of a node created inline as a child of another.
    pub fn not_owned_by_monitor(node: &str) -> Self {
        Self::generic(format!("Node {node} is not owned by the monitor"))
    }
    /// An operation on a node a block job holds.
    pub fn node_busy_by_job(node: &str, job_type: &str) -> Self {
        Self::generic(format!(
            "Node '{node}' is busy: block device is in use by block job: {job_type}"
        ))
    }
    /// `blockdev-reopen` trying to change the driver.
    pub fn cannot_change_driver() -> Self {
        Self::generic("Cannot change the option 'driver'")
    }
    /// The graph refusal of a writer next to a snapshot that unshares writes.
    pub fn permission_conflict(
        node: &str,
        writer: &str,
        unsharer: &str,
        unsharer_role: &str,
    ) -> Self {
        Self::generic(format!(
            "Permission conflict on node '{node}': permissions 'write' are both required by {writer} and unshared by node '{unsharer}' (uses node '{node}' as '{unsharer_role}' child)."
        ))
    }

    // --- bitmaps ---

    /// `block-dirty-bitmap-add` with an empty name.
    pub fn bitmap_name_empty() -> Self {
        Self::generic("Bitmap name cannot be empty")
    }
    /// A bitmap name longer than qcow2 allows (1023 bytes).
    pub fn bitmap_name_too_long(name: &str) -> Self {
        Self::generic(format!("Bitmap name is too long: {name}"))
    }
    /// `block-dirty-bitmap-add` with a name already present on the node.
    pub fn bitmap_exists(name: &str) -> Self {
        Self::generic(format!("Bitmap already exists: {name}"))
    }
    /// Adding a persistent bitmap whose name the image already stores.
    pub fn bitmap_already_stored(name: &str, node: &str) -> Self {
        Self::generic(format!(
            "Can't make bitmap '{name}' persistent in '{node}': Bitmap with the same name is already stored"
        ))
    }
    /// Adding a persistent bitmap to a node whose format cannot store bitmaps.
    pub fn cannot_store_bitmaps(node: &str) -> Self {
        Self::generic(format!(
            "Can't store persistent bitmaps to {node}: Operation not supported"
        ))
    }
    /// A granularity that is not a power of two of at least 512.
    pub fn bad_granularity() -> Self {
        Self::generic("Granularity must be power of 2 and at least 512")
    }
    /// Bitmap lookup by name failed (remove, clear, enable, disable, merge).
    pub fn bitmap_not_found(name: &str) -> Self {
        Self::generic(format!("Dirty bitmap '{name}' not found"))
    }
    /// A busy bitmap (used by a job or an export) asked to change.
    pub fn bitmap_busy(name: &str) -> Self {
        Self::generic(format!(
            "Bitmap '{name}' is currently in use by another operation and cannot be used"
        ))
    }
    /// A bitmap on a read-only node asked to change.
    pub fn bitmap_readonly(name: &str) -> Self {
        Self::generic(format!(
            "Bitmap '{name}' is readonly and cannot be modified"
        ))
    }
    /// An inconsistent bitmap (loaded after a crash) asked to do anything but be removed.
    pub fn bitmap_inconsistent(name: &str) -> Self {
        Self::generic(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        ))
    }
    /// Merging bitmaps that cover different sizes.
    pub fn bitmap_size_mismatch(dest: u64, src: u64) -> Self {
        Self::generic(format!(
            "Bitmaps are of different sizes (destination size is {dest}, source size is {src}) and can't be merged"
        ))
    }

    // --- backup ---

    /// `sync: incremental` or `sync: bitmap` without a bitmap.
    pub fn backup_needs_bitmap(sync: &str) -> Self {
        Self::generic(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        ))
    }
    /// `blockdev-backup` naming an unknown bitmap.
    pub fn backup_bitmap_not_found(name: &str) -> Self {
        Self::generic(format!("Bitmap '{name}' could not be found"))
    }
    /// A bitmap given without `bitmap-mode`.
    pub fn backup_bitmap_mode_missing() -> Self {
        Self::generic("Bitmap sync mode must be given when providing a bitmap")
    }
    /// `sync: incremental` with a bitmap-mode other than on-success.
    pub fn backup_incremental_mode(mode: &str) -> Self {
        let _ = mode;
        Self::generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
    }
    /// A bitmap given with `sync: none`.
    pub fn backup_none_with_bitmap() -> Self {
        Self::generic("sync mode 'none' does not produce meaningful bitmap outputs")
    }
    /// `bitmap-mode: never` with a sync that does not read the bitmap.
    pub fn backup_never_useless(sync: &str) -> Self {
        Self::generic(format!(
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'"
        ))
    }
    /// `bitmap-mode` without a bitmap.
    pub fn backup_mode_without_bitmap() -> Self {
        Self::generic("Cannot specify bitmap sync mode without a bitmap")
    }
    /// Source and target of different lengths.
    pub fn backup_size_mismatch() -> Self {
        Self::generic("Source and target image have different sizes")
    }
    /// Source and target are one node.
    pub fn backup_same_node() -> Self {
        Self::generic("Source and target cannot be the same")
    }

    // --- jobs ---

    /// `job-*` commands naming an unknown job.
    pub fn job_not_found() -> Self {
        Self::generic("Job not found")
    }
    /// `block-job-*` commands naming an unknown job.
    pub fn block_job_not_found(id: &str) -> Self {
        Self::new(DEVICE_NOT_ACTIVE, format!("Block job '{id}' not found"))
    }
    /// A job verb the job's state does not accept.
    pub fn job_bad_state(id: &str, status: &str, verb: &str) -> Self {
        Self::generic(format!(
            "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
        ))
    }
    /// A job id already taken.
    pub fn job_id_in_use(id: &str) -> Self {
        Self::generic(format!("Job ID '{id}' already in use"))
    }
    /// A job id that is not a well-formed identifier.
    pub fn invalid_job_id(id: &str) -> Self {
        Self::generic(format!("Invalid job ID '{id}'"))
    }
    /// `block-job-cancel` without force of a job the user paused.
    pub fn block_job_paused(id: &str) -> Self {
        Self::generic(format!(
            "The block job for device '{id}' is currently paused"
        ))
    }

    // --- transactions ---

    /// `completion-mode: grouped` with an action that is not a backup.
    pub fn grouped_unsupported(action: &str) -> Self {
        Self::generic(format!(
            "Action '{action}' does not support transaction property completion-mode = grouped"
        ))
    }
    /// The `abort` transaction action.
    pub fn transaction_aborted() -> Self {
        Self::generic("Transaction aborted using Abort action")
    }

    // --- NBD and exports ---

    /// `nbd-server-start` twice.
    pub fn nbd_running() -> Self {
        Self::generic("NBD server already running")
    }
    /// NBD commands without a server.
    pub fn nbd_not_running() -> Self {
        Self::generic("NBD server not running")
    }
    /// `block-export-add` with a taken id.
    pub fn export_id_in_use(id: &str) -> Self {
        Self::generic(format!("Block export id '{id}' is already in use"))
    }
    /// `block-export-add` with a taken NBD export name.
    pub fn export_name_in_use(name: &str) -> Self {
        Self::generic(format!("NBD server already has export named '{name}'"))
    }
    /// `block-export-del` of an unknown export.
    pub fn export_not_found(id: &str) -> Self {
        Self::generic(format!("Export '{id}' is not found"))
    }
    /// An exported bitmap given by plain name that is not on the node or its backing chain.
    pub fn export_bitmap_not_found(name: &str) -> Self {
        Self::generic(format!("Bitmap '{name}' is not found"))
    }
    /// A recording bitmap in a read-only export.
    pub fn export_enabled_bitmap(name: &str) -> Self {
        Self::generic(format!(
            "Enabled bitmap '{name}' incompatible with readonly export"
        ))
    }
}

/// Job I/O error texts, as `BLOCK_JOB_COMPLETED.error` and `query-jobs[].error` carry them.
pub mod job_error {
    /// EIO.
    pub const IO: &str = "Input/output error";
    /// ENOSPC.
    pub const NO_SPACE: &str = "No space left on device";
    /// A cancelled job.
    pub const CANCELLED: &str = "Operation canceled";
}
