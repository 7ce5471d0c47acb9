//! Writing push backup targets out to storage.
//!
//! With [`PushWrite::Deferred`](vbackup_core::domain::PushWrite) QEMU never flushes a push
//! target: the engine asks for [`sync_target`] once QEMU closed it. [`WriteBehind`] lets the
//! host write the targets out while the job still copies, so that sync only waits for the
//! tail, and keeps the backup's pages from crowding the page cache.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use rustix::fs::{Advice, fadvise};

/// Makes a target durable: its data and metadata (fsync), and for a regular file the
/// directory entry too.
pub fn sync_target(path: &str) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open '{path}': {e}"))?;
    file.sync_all()
        .map_err(|e| format!("cannot sync '{path}': {e}"))?;
    let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    if is_file && let Some(dir) = Path::new(path).parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync directory '{}': {e}", dir.display()))?;
    }
    Ok(())
}

/// Starts the write-out of files being written by someone else (QEMU), without waiting.
/// Each [`WriteBehind::kick`] starts writing the files' dirty pages to storage and drops the
/// pages already written from the page cache (`POSIX_FADV_DONTNEED`). Purely an optimisation:
/// errors are ignored, durability comes from [`sync_target`].
#[derive(Debug, Default)]
pub struct WriteBehind {
    files: BTreeMap<String, Option<File>>,
    /// Keep the pages written in the page cache (they are read again soon).
    keep_pages: bool,
}

impl WriteBehind {
    /// Nothing to write out yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A write-behind that keeps the pages it writes out in the page cache, for targets read
    /// again right after the job (a managed backup's digest): each kick only starts the
    /// write-out of the dirty pages (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`).
    pub fn keeping_pages() -> Self {
        Self {
            files: BTreeMap::new(),
            keep_pages: true,
        }
    }

    /// Starts writing out `paths` (files opened on first sight; one that cannot be opened is
    /// not tried again).
    pub fn kick<'a>(&mut self, paths: impl IntoIterator<Item = &'a str>) {
        for path in paths {
            let file = self
                .files
                .entry(path.to_owned())
                .or_insert_with(|| File::open(path).ok());
            match file {
                Some(f) if self.keep_pages => start_writeout(f),
                Some(f) => {
                    let _ = fadvise(&*f, 0, None, Advice::DontNeed);
                }
                None => {}
            }
        }
    }
}

/// Starts writing `file`'s dirty pages to storage without waiting and without dropping them.
#[allow(unsafe_code)]
fn start_writeout(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for the
    // duration of the call (borrowed from `file`). Failure is ignored: this is an optimisation.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sync_target_syncs_an_existing_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let p = path.to_str().unwrap();
        sync_target(p).unwrap();
        let missing = dir.path().join("missing").display().to_string();
        let err = sync_target(&missing).unwrap_err();
        assert!(
            err.contains("cannot open") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn write_behind_keeps_the_data_and_skips_files_it_cannot_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.raw");
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut wb = WriteBehind::new();
        let p = path.to_str().unwrap();
        wb.kick([p, "/nonexistent/x"]);
        wb.kick([p]);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(wb.files["/nonexistent/x"].is_none());
    }
}
