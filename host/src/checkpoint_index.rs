//! The checkpoint index: one file beside `domain.xml` holding every stored checkpoint already
//! parsed, so loading a domain reads one file instead of parsing and validating every
//! `checkpoints/<name>.xml`.
//!
//! Contract:
//! - The XML files stay the truth; the index is a cache of them. It records the checkpoint
//!   directory's modification time and is used only while that still matches (any file
//!   created, replaced, renamed or removed there changes the directory's time).
//! - Every writer of checkpoint files holds the domain's lock and removes the index before its
//!   first change, then writes it once when it is done (a crash in between leaves no index, so
//!   the next load rebuilds it). The modification time therefore only has to catch changes
//!   made by hand; the directory is not listed on load, so loading costs one file read
//!   however many checkpoints there are. The index is written by rename but not synced: an
//!   index lost or torn by a crash fails to parse or to match and is rebuilt.
//! - A checkpoint read from the index equals the one parsed from its XML file (sizes are never
//!   stored in either).
//! - Each checkpoint is one JSON array (name, parent, creation time, description, position of
//!   its `<domain>` definition, and `[target, bitmap]` per disk), which parses several times
//!   faster than an object per field.

pub use crate::layout::INDEX_FILE;
use std::collections::BTreeMap;
use std::fs;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use vbackup_core::checkpoint::{Checkpoint, CheckpointDisk};
use vbackup_qemu::store::DomainStore;

/// Format version; an index of another version is rebuilt.
const VERSION: u32 = 2;

/// What a directory looked like when an index of its files was written: its modification
/// time (shared with the backup index, `crate::catalogue_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    mtime_s: u64,
    mtime_ns: u32,
}

/// The stamp of `dir` as it is now; `None` when it cannot be read.
pub(crate) fn dir_stamp(dir: &std::path::Path) -> Option<Stamp> {
    let modified = fs::metadata(dir).ok()?.modified().ok()?;
    let since = modified.duration_since(UNIX_EPOCH).ok()?;
    Some(Stamp {
        mtime_s: since.as_secs(),
        mtime_ns: since.subsec_nanos(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexFile<D, E> {
    version: u32,
    stamp: Stamp,
    /// Distinct `<domain>` definitions, referred to by position: every checkpoint of a domain
    /// usually records the same one, which would otherwise be repeated in every entry.
    domains: Vec<D>,
    checkpoints: Vec<E>,
}

/// One checkpoint as read: name, parent, creation time, description, position in `domains`,
/// and `(target, bitmap)` per disk.
#[derive(Debug, Deserialize)]
struct Entry(
    String,
    Option<String>,
    i64,
    Option<String>,
    Option<usize>,
    Vec<(String, Option<String>)>,
);

/// One checkpoint as written: the same array as [`Entry`], borrowed.
#[derive(Debug, Serialize)]
struct EntryRef<'a>(
    &'a str,
    Option<&'a str>,
    i64,
    Option<&'a str>,
    Option<usize>,
    Vec<(&'a str, Option<&'a str>)>,
);

fn stamp(store: &DomainStore) -> Option<Stamp> {
    // The directory `Collection::Checkpoints` lives in.
    dir_stamp(&store.dir().join("checkpoints"))
}

/// The stored checkpoints as the index has them, or `None` when it is missing, unreadable or
/// does not match the checkpoint directory (the caller then parses the XML files).
pub fn read(store: &DomainStore) -> Option<Vec<Checkpoint>> {
    let text = fs::read(store.dir().join(INDEX_FILE)).ok()?;
    let index: IndexFile<String, Entry> = serde_json::from_slice(&text).ok()?;
    if index.version != VERSION || Some(index.stamp) != stamp(store) {
        return None;
    }
    let mut checkpoints = Vec::with_capacity(index.checkpoints.len());
    for Entry(name, parent, creation_time_s, description, domain, disks) in index.checkpoints {
        let domain_xml = match domain {
            Some(i) => Some(index.domains.get(i)?.clone()),
            None => None,
        };
        checkpoints.push(Checkpoint {
            name,
            description,
            parent,
            creation_time_s,
            disks: disks
                .into_iter()
                .map(|(target, bitmap)| CheckpointDisk {
                    target,
                    bitmap,
                    size_bytes: None,
                })
                .collect(),
            domain_xml,
        });
    }
    Some(checkpoints)
}

/// Writes the index of `checkpoints` (by name) as the checkpoint directory is now. Best
/// effort: an index that cannot be written is rebuilt by a later load.
pub fn write<'a>(store: &DomainStore, checkpoints: impl IntoIterator<Item = &'a Checkpoint>) {
    let Some(stamp) = stamp(store) else {
        remove(store);
        return;
    };
    let mut domains: Vec<&str> = Vec::new();
    let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
    let mut entries = Vec::new();
    for c in checkpoints {
        let domain = c.domain_xml.as_deref().map(|xml| {
            *positions.entry(xml).or_insert_with(|| {
                domains.push(xml);
                domains.len() - 1
            })
        });
        entries.push(EntryRef(
            &c.name,
            c.parent.as_deref(),
            c.creation_time_s,
            c.description.as_deref(),
            domain,
            c.disks
                .iter()
                .map(|d| (d.target.as_str(), d.bitmap.as_deref()))
                .collect(),
        ));
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let index = IndexFile {
        version: VERSION,
        stamp,
        domains,
        checkpoints: entries,
    };
    let Ok(json) = serde_json::to_vec(&index) else {
        remove(store);
        return;
    };
    let tmp = store.dir().join(format!(".{INDEX_FILE}.tmp"));
    if fs::write(&tmp, json).is_err() || fs::rename(&tmp, store.dir().join(INDEX_FILE)).is_err() {
        let _ = fs::remove_file(&tmp);
        remove(store);
    }
}

/// Removes the index (before checkpoints change).
pub fn remove(store: &DomainStore) {
    let _ = fs::remove_file(store.dir().join(INDEX_FILE));
}

/// Whether `dir` holds an index file (for tests).
#[cfg(test)]
fn exists(dir: &std::path::Path) -> bool {
    dir.join(INDEX_FILE).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vbackup_core::checkpoint::CheckpointDisk;
    use vbackup_qemu::store::{Collection, Store};

    fn cp(name: &str, parent: Option<&str>, domain: &str) -> Checkpoint {
        Checkpoint {
            name: name.into(),
            description: Some(format!("about {name}")),
            parent: parent.map(Into::into),
            creation_time_s: 1_700_000_000,
            disks: vec![CheckpointDisk {
                target: "vda".into(),
                bitmap: Some(name.into()),
                size_bytes: None,
            }],
            domain_xml: Some(domain.into()),
        }
    }

    #[test]
    fn index_round_trips_and_is_refused_once_the_checkpoint_directory_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let ds = store.lock_domain("vm").unwrap();
        ds.write_entry(Collection::Checkpoints, "a", "<x/>")
            .unwrap();
        ds.write_entry(Collection::Checkpoints, "b", "<x/>")
            .unwrap();
        let stored = vec![
            cp("b", Some("a"), "<domain>1</domain>"),
            cp("a", None, "<domain>1</domain>"),
        ];
        write(&ds, &stored);
        assert!(exists(ds.dir()));
        let mut read_back = read(&ds).expect("index matches");
        read_back.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(read_back, vec![stored[1].clone(), stored[0].clone()]);

        // A checkpoint file written behind the index's back makes it stale.
        std::thread::sleep(std::time::Duration::from_millis(20));
        ds.write_entry(Collection::Checkpoints, "c", "<x/>")
            .unwrap();
        assert!(read(&ds).is_none());
        // So does a torn file.
        write(&ds, &stored);
        fs::write(ds.dir().join(INDEX_FILE), b"{\"vers").unwrap();
        assert!(read(&ds).is_none());
        remove(&ds);
        assert!(!exists(ds.dir()));
        assert!(read(&ds).is_none());
    }
}
