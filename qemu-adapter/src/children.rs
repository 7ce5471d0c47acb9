//! The processes vbackup starts, and what is left of them when vbackup is killed.
//!
//! Contract:
//! - A helper that serves one command ([`crate::images::NbdExport`]'s `qemu-nbd --persistent`,
//!   every `qemu-img`) is [`tied`] to vbackup: it runs in its own process group (a Ctrl-C
//!   aimed at the terminal reaches vbackup, which stops it in order) and the kernel kills it
//!   when vbackup dies (`PR_SET_PDEATHSIG`), even by `kill -9`.
//! - A helper that keeps a socket or files in a directory of its own records its owner there
//!   ([`record_owner`]): vbackup's pid and start time and the helper's pid. Whatever the
//!   kernel did not clean is found by the next vbackup ([`clean_orphans`]): a directory whose
//!   owner is gone loses its helper (killed by pid, after checking the pid is still that
//!   helper) and then the directory itself.
//! - qemu-storage-daemon, which must outlive a command while a backup job runs, is not tied: it
//!   has its own pid file in the domain's run directory, which every command checks
//!   (`crate::qsd`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The owner record in a helper's directory: `OWNER_PID OWNER_START HELPER_PID` on one line.
pub const OWNER_FILE: &str = "owner";

/// Prefix of the private directories [`crate::images::NbdExport`] serves its socket from,
/// under the temporary directory.
pub const EXPORT_DIR_PREFIX: &str = "vbackup-nbd";

/// Ties `command`'s process to this one: its own process group, and killed by the kernel when
/// this process dies.
pub fn tied(command: &mut Command) -> &mut Command {
    let parent = rustix::process::getpid();
    command.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only makes two system
    // calls (prctl, getppid) that are async-signal-safe; it allocates nothing and takes no
    // lock.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The parent may have died before the signal was armed: then nobody would deliver
            // it, so give up now.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other(
                    "vbackup exited while starting a helper",
                ));
            }
            Ok(())
        })
    }
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/PID/stat`), which
/// tells a process from a later one that reused its pid; `None` when it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `pid` runs and is the process that started at `start` (clock ticks since boot).
fn same_process(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Records in `dir` that this process owns the helper `helper_pid` serving from it (0: none
/// started yet).
pub fn record_owner(dir: &Path, helper_pid: u32) -> std::io::Result<()> {
    let me = std::process::id();
    let start = start_time(me).unwrap_or(0);
    std::fs::write(dir.join(OWNER_FILE), format!("{me} {start} {helper_pid}\n"))
}

/// What [`clean_orphans`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// Helpers killed (their owner was gone).
    pub killed: Vec<u32>,
    /// Directories removed.
    pub removed: Vec<PathBuf>,
}

/// Cleans the export directories under `tmp` (normally [`std::env::temp_dir`]) whose owner is
/// gone: kills the helper recorded there if it still runs with the directory's socket on its
/// command line, then removes the directory. Directories of live owners are left alone; so is
/// anything without an owner record (it may be starting). Best effort.
pub fn clean_orphans(tmp: &Path) -> Cleaned {
    let mut cleaned = Cleaned::default();
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return cleaned;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(EXPORT_DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(record) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let fields: Vec<u64> = record
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        let [owner, owner_start, helper] = fields[..] else {
            continue;
        };
        let (Ok(owner), Ok(helper)) = (u32::try_from(owner), u32::try_from(helper)) else {
            continue;
        };
        if same_process(owner, owner_start) {
            continue;
        }
        if helper != 0 && start_time(helper).is_some() && helper_serves(helper, &dir) {
            if let Some(pid) = rustix::process::Pid::from_raw(helper as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            cleaned.killed.push(helper);
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            cleaned.removed.push(dir);
        }
    }
    cleaned
}

/// Whether process `pid`'s command line names a path inside `dir` (its socket): the pid was
/// not reused by an unrelated process.
fn helper_serves(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let dir = dir.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg.starts_with(dir))
}

/// The leftovers of restores killed before they renamed their copy into place: files named
/// `.<image>.restore-<pid>` in `dir` whose pid no longer runs. Removed; returns what was.
pub fn clean_restore_leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = restore_temp_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || start_time(pid).is_some() {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// The pid in a restore's temporary file name `.<image>.restore-<pid>`.
pub fn restore_temp_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".restore-")?;
    pid.parse().ok()
}

/// Whether the test hook of [`test_pause_in_digest`] is set: digests then go through qemu-nbd
/// (not read from the image files), so that a helper runs while the digest pauses.
pub fn test_pause_requested() -> bool {
    std::env::var_os("VBACKUP_TEST_PAUSE_IN_DIGEST").is_some()
}

/// The hook the live tests use to stop a command inside a digest, at the point where its
/// `qemu-nbd` runs: when `VBACKUP_TEST_PAUSE_IN_DIGEST` names a file, this process writes
/// `VBACKUP_PID HELPER_PID` into it and sleeps (up to a minute) so the test can kill it there.
/// Without the variable it does nothing.
pub fn test_pause_in_digest(helper_pid: u32) {
    let Some(path) = std::env::var_os("VBACKUP_TEST_PAUSE_IN_DIGEST") else {
        return;
    };
    let text = format!("{} {helper_pid}\n", std::process::id());
    if std::fs::write(&path, text).is_ok() {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_temporaries_name_their_pid() {
        assert_eq!(restore_temp_pid(".vda.qcow2.restore-4242"), Some(4242));
        assert_eq!(restore_temp_pid("vda.qcow2.restore-4242"), None);
        assert_eq!(restore_temp_pid(".vda.qcow2.restore-x"), None);
        assert_eq!(restore_temp_pid(".vda.qcow2"), None);
    }

    #[test]
    fn this_process_has_a_start_time_and_a_dead_pid_none() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX - 1).is_none());
    }

    #[test]
    fn a_tied_helper_runs_in_its_own_process_group() {
        // Dying with its parent is checked by the live tests, which kill vbackup.
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = tied(&mut command).spawn().expect("sleep");
        let pid = child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let pgrp: u32 = rest.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(pgrp, pid, "own process group");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn orphaned_export_directories_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(format!("{EXPORT_DIR_PREFIX}dead"));
        std::fs::create_dir(&dead).unwrap();
        // An owner that is not running (pid 0 never is a user process), a helper gone too.
        std::fs::write(dead.join(OWNER_FILE), format!("0 1 {}\n", u32::MAX - 1)).unwrap();
        let live = tmp.path().join(format!("{EXPORT_DIR_PREFIX}live"));
        std::fs::create_dir(&live).unwrap();
        record_owner(&live, u32::MAX - 1).unwrap();
        // An owner killed before it started its helper.
        let early = tmp.path().join(format!("{EXPORT_DIR_PREFIX}early"));
        std::fs::create_dir(&early).unwrap();
        std::fs::write(early.join(OWNER_FILE), "0 1 0\n").unwrap();
        let mut cleaned = clean_orphans(tmp.path());
        cleaned.removed.sort();
        assert_eq!(cleaned.removed, vec![dead.clone(), early.clone()]);
        assert!(cleaned.killed.is_empty());
        assert!(!dead.exists() && !early.exists() && live.exists());
    }
}
