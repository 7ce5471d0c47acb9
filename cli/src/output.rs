//! Errors as the command line reports them (virsh's `error: <category>: <detail>` on stderr,
//! exit code 1), tables in virsh's layout, and times.

use vbackup_core::error::{ConflictError, Error as EngineError, RequestError};

/// Everything a command can fail with: the host runtime's errors, which [`message`] words.
pub use vbackup_host::Error as CliError;

/// An error as the command line words it: an engine error after virsh's category prefix.
pub fn message(e: &CliError) -> String {
    match e {
        CliError::Engine(e) => engine_message(e),
        other => other.to_string(),
    }
}

/// virsh's category prefix for an engine error, then the detail.
fn engine_message(e: &EngineError) -> String {
    let prefix = match e {
        EngineError::Request(r) => match r {
            RequestError::NoCheckpoint(_) | RequestError::IncrementalCheckpointMissing { .. } => {
                "Domain checkpoint not found: "
            }
            RequestError::CheckpointExists(_) => "operation failed: ",
            RequestError::CheckpointInconsistent { .. } => "checkpoint inconsistent: ",
            RequestError::NoJob | RequestError::NotRunning => "Requested operation is not valid: ",
            RequestError::NoBackup => "Domain backup job id not found: ",
            RequestError::Unsupported(_) | RequestError::NbdServerInUse { .. } => "",
            RequestError::InvalidFlags(_) => "",
            _ => "invalid argument: ",
        },
        EngineError::Conflict(ConflictError::DomainJob { .. }) => "Timed out during operation: ",
        EngineError::Conflict(_) => "Requested operation is not valid: ",
        EngineError::QemuRefused { .. } | EngineError::QemuMisbehaved(_) => "internal error: ",
        EngineError::LinkLost(_) | EngineError::Store(_) => "operation failed: ",
    };
    format!("{prefix}{e}")
}

/// The JSON style of every `--json` output: object keys in camelCase, as libvirt spells its XML
/// attributes (`creationTime`, `allocatedBytes`). Values are left alone.
pub fn camel_case(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (camel_key(&k), camel_case(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(camel_case).collect()),
        other => other,
    }
}

/// Prints a `--json` answer on one line, in the one JSON style ([`camel_case`]).
pub fn print_json(value: serde_json::Value) {
    println!("{}", camel_case(value));
}

/// `creation_time` → `creationTime`; keys without underscores stay as they are.
fn camel_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A table in virsh's layout: a header, a dashed rule, one-space indented columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push(' ');
            s.push_str(c);
            if i + 1 < cells.len() {
                let pad = widths[i] - c.chars().count() + 2;
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 3 * widths.len();
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

pub use vbackup_host::units::{format_time, human_bytes, virsh_bytes};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_under_a_rule() {
        let t = table(&["Name", "Creation Time"], &[vec!["c1".into(), "x".into()]]);
        assert_eq!(
            t,
            " Name   Creation Time\n-----------------------\n c1     x\n"
        );
    }
}
