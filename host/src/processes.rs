//! Processes on this host: who holds an image open.

use std::path::Path;

use vbackup_qemu::store::Store;

use crate::error::Error;
use crate::layout::DOMAIN_FILE;

/// A process that has an image open.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageHolder {
    /// The image.
    pub image: String,
    /// The process.
    pub pid: u32,
    /// Its command line, arguments joined by spaces.
    pub command: String,
}

/// When `e` is QEMU refusing an image another process holds locked, one line per process
/// holding an image of the domains named in `names` (see [`image_holders`]), saying what to
/// do; empty for any other error, or when no holder is found.
pub fn lock_holder_lines(store: &Store, names: &[String], e: &Error) -> Vec<String> {
    let message = e.to_string();
    if !message.contains("lock") || !message.contains("Failed to get") {
        return Vec::new();
    }
    image_holders(store, names)
        .into_iter()
        .map(|h| format!(
            "image '{}' is in use by process {} ({}); stop it, or wait for it to end, and run the command again",
            h.image, h.pid, h.command
        ))
        .collect()
}

/// For each disk image of the domains named in `names` (any of a command line's words: those
/// that name no domain are skipped), the other processes that have it open: whoever holds
/// QEMU's lock on an image has it open. Sorted, without duplicates.
pub fn image_holders(store: &Store, names: &[String]) -> Vec<ImageHolder> {
    let mut images = Vec::new();
    for name in names {
        let xml = store.root().join("domains").join(name).join(DOMAIN_FILE);
        if let Ok(def) = std::fs::read_to_string(xml)
            .map_err(|_| ())
            .and_then(|t| vbackup_core::xml::parse_domain(&t).map_err(|_| ()))
        {
            images.extend(
                def.disks
                    .iter()
                    .flat_map(|d| d.layers.iter())
                    .filter_map(|l| l.path.clone()),
            );
        }
    }
    let own = std::process::id();
    let mut found = Vec::new();
    for pid in pids().into_iter().filter(|p| *p != own) {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
            continue;
        };
        let open: Vec<String> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        for image in images.iter().filter(|i| open.contains(i)) {
            found.push(ImageHolder {
                image: image.clone(),
                pid,
                command: command_line(pid).join(" "),
            });
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Every process id in `/proc`.
pub fn pids() -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's arguments (empty when it is gone or hides them).
pub fn command_line(pid: u32) -> Vec<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}
