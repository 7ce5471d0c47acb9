//! The QMP vocabulary: typed commands, transaction actions, replies and query results, events,
//! errors, the greeting, and the wire framing.
//!
//! Contract:
//! - Every type serializes to exactly the JSON QEMU expects; QMP spellings live only in serde
//!   renames and `as_str` tables. Optional members are `Option`s left out when `None`.
//! - Commands decode strictly (unknown arguments are an error, as in QEMU), so a decoded command
//!   re-encodes to equal JSON; commands outside the vocabulary are kept verbatim.
//! - What QEMU sends decodes tolerantly: unknown members are ignored, unknown enum values land in
//!   `Unknown(String)` catch-alls, unknown events in [`QmpEvent::Unknown`], anonymous bitmaps
//!   (no `name`) are accepted. Nothing here panics on input.

#[macro_use]
mod macros;
mod fields;

pub mod backup;
pub mod bitmap;
pub mod blockdev;
pub mod command;
pub mod error;
pub mod event;
pub mod greeting;
pub mod job;
pub mod nbd;
pub mod object;
pub mod query;
pub mod reply;
pub mod transaction;
pub mod wire;

pub use backup::{BackupPerf, BitmapSyncMode, BlockdevBackup, BlockdevOnError, SyncMode};
pub use bitmap::{BitmapRef, BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge};
pub use blockdev::{
    BlockdevCreate, BlockdevCreateOptions, BlockdevDel, BlockdevDiscard, BlockdevDriver,
    BlockdevOptions, BlockdevRef, BlockdevRefOrNull, BlockdevReopen, CreateFileOptions,
    CreateQcow2Options, Qcow2Version,
};
pub use command::QmpCommand;
pub use error::{DecodeError, ErrorClass, QmpError};
pub use event::{
    BlockErrorAction, BlockExportDeleted, BlockJobCancelled, BlockJobCompleted, BlockJobError,
    BlockJobPending, BlockJobReady, IoOperation, JobStatusChange, QmpEvent, Shutdown,
    ShutdownCause,
};
pub use greeting::{Greeting, QemuVersion, QmpCapabilities, QmpCapability, QmpVersion};
pub use job::{BlockJobCancel, BlockJobSetSpeed, JobInfo, JobRef, JobStatus, JobType};
pub use nbd::{
    BlockExportAdd, BlockExportDel, BlockExportRemoveMode, BlockExportType, FdSocketAddress,
    InetSocketAddress, NbdServerStart, SocketAddressLegacy, UnixSocketAddress,
};
pub use object::{ObjectAdd, ObjectDel, Secret, SecretFormat, TlsCredsX509, TlsEndpoint};
pub use query::{
    BlockDeviceInfo, BlockDirtyInfo, BlockInfo, ImageInfo, ImageInfoSpecific, Qcow2BitmapFlag,
    Qcow2BitmapInfo, Qcow2Info, QueryNamedBlockNodes, RunState, StatusInfo,
};
pub use reply::{
    QmpResult, decode_return, empty_return, query_block, query_jobs, query_named_block_nodes,
    query_status,
};
pub use transaction::{CompletionMode, Transaction, TransactionAction, TransactionProperties};
pub use wire::{FrameDecoder, QmpIn};
