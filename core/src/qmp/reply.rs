//! Replies: `{"return": VALUE, "id": ID}` or `{"error": {...}, "id": ID}`, and typed decoding of
//! the query results the core reads.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{DecodeError, QmpError};
use super::job::JobInfo;
use super::query::{BlockDeviceInfo, BlockInfo, StatusInfo, direct};

/// What a reply carries: the `return` value, or QEMU's error.
pub type QmpResult = Result<Value, QmpError>;

/// Decodes a `return` value into `T`; `context` names the command for the error message.
pub fn decode_return<T: DeserializeOwned>(context: &str, value: &Value) -> Result<T, DecodeError> {
    T::deserialize(value).map_err(|err| DecodeError::invalid(format!("reply to {context}"), err))
}

/// The jobs of a `query-jobs` reply.
pub fn query_jobs(value: &Value) -> Result<Vec<JobInfo>, DecodeError> {
    decode_return("query-jobs", value)
}

/// The nodes of a `query-named-block-nodes` reply.
pub fn query_named_block_nodes(value: &Value) -> Result<Vec<BlockDeviceInfo>, DecodeError> {
    // The direct reader builds what serde would, without copying parts of the value first;
    // whatever it does not take is decoded by serde, whose error then names the problem.
    let direct: Option<Vec<BlockDeviceInfo>> = value
        .as_array()
        .and_then(|nodes| nodes.iter().map(direct::block_device_info).collect());
    match direct {
        Some(nodes) => Ok(nodes),
        None => decode_return("query-named-block-nodes", value),
    }
}

/// The devices of a `query-block` reply.
pub fn query_block(value: &Value) -> Result<Vec<BlockInfo>, DecodeError> {
    decode_return("query-block", value)
}

/// The status of a `query-status` reply.
pub fn query_status(value: &Value) -> Result<StatusInfo, DecodeError> {
    decode_return("query-status", value)
}

/// Checks the `{}` that commands without a result return. Members are tolerated (a newer QEMU
/// may add some); anything but an object is an error.
pub fn empty_return(context: &str, value: &Value) -> Result<(), DecodeError> {
    if value.is_object() {
        Ok(())
    } else {
        Err(DecodeError::invalid(
            format!("reply to {context}"),
            format!("expected an object, got {value}"),
        ))
    }
}
