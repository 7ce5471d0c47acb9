//! Errors: the error replies QEMU sends (`QmpError`) and the failures of decoding what arrives
//! (`DecodeError`).

use serde::{Deserialize, Serialize};

wire_enum! {
    /// QEMU's error classes. Nearly every block-layer failure is `GenericError`; the `desc` text is
    /// what tells them apart.
    pub enum ErrorClass {
        /// Any failure without a more specific class.
        GenericError = "GenericError",
        /// The command does not exist, or capabilities negotiation is pending or already done.
        CommandNotFound = "CommandNotFound",
        /// A device exists but has no medium or is not active.
        DeviceNotActive = "DeviceNotActive",
        /// A device or node named in the arguments does not exist.
        DeviceNotFound = "DeviceNotFound",
        /// KVM lacks a capability the command needs.
        KvmMissingCap = "KVMMissingCap",
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// QEMU's human-readable description; the only way to tell most block-layer errors apart.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given description (what the simulator answers most failures
    /// with, as QEMU does).
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// True for QEMU's answer to a command sent before `qmp_capabilities`.
    pub fn is_negotiation_pending(&self) -> bool {
        self.class == ErrorClass::CommandNotFound
            && self.desc.starts_with("Expecting capabilities negotiation")
    }
}

/// Why bytes or a JSON value could not be decoded into a QMP message. Decoding never panics;
/// every malformed input ends here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is not a JSON document.
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    Json {
        /// 1-based line of the error within the input.
        line: usize,
        /// 1-based column of the error within the input.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// The input is JSON but not an object.
    #[error("a QMP message must be a JSON object")]
    NotAnObject,
    /// An object that is none of greeting, reply, event (or command, where commands are read).
    #[error("unrecognised QMP message with keys [{}]", keys.join(", "))]
    Unrecognized {
        /// The top-level keys of the object, sorted.
        keys: Vec<String>,
    },
    /// A known message whose content does not have the expected shape.
    #[error("invalid {context}: {message}")]
    Invalid {
        /// What was being decoded (`arguments of blockdev-backup`, `JOB_STATUS_CHANGE data`...).
        context: String,
        /// What is wrong with it.
        message: String,
    },
    /// A frame exceeded the decoder's size bound.
    #[error("QMP message longer than {limit_bytes} bytes")]
    TooLong {
        /// The bound that was exceeded.
        limit_bytes: usize,
    },
}

impl DecodeError {
    pub(crate) fn from_json(err: &serde_json::Error) -> Self {
        DecodeError::Json {
            line: err.line(),
            column: err.column(),
            message: err.to_string(),
        }
    }

    pub(crate) fn invalid(context: impl Into<String>, message: impl ToString) -> Self {
        DecodeError::Invalid {
            context: context.into(),
            message: message.to_string(),
        }
    }
}
