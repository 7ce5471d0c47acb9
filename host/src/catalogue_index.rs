//! The backup index: one file beside `domain.xml` holding every managed-backup record of the
//! domain already parsed, so a managed command reads one file instead of parsing and
//! validating every `backups/<uuid>.xml`.
//!
//! Contract (the checkpoint index's, `crate::checkpoint_index`, for records):
//! - The record files stay the truth; the index is a cache of them, used only while the
//!   modification time of `backups/` is the one it records (any record written by rename or
//!   removed changes it) and each record file still has the modification time and length
//!   it records (a record changed in place, say truncated, shows as damaged as it would
//!   without the index). That costs one `stat` per record, no read and no parse.
//! - It is written only from a catalogue without damaged records, so it holds every file.
//! - Every writer of records holds the domain's lock and removes the index before its first
//!   change, then writes it once when it is done; a crash in between leaves none, and the
//!   next load parses the files and writes it again. It is written by rename but not synced:
//!   an index lost or torn by a crash fails to parse or to match and is rebuilt.

use std::fs;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use vbackup_core::catalogue::{BackupImage, BackupKind, Digest, ManagedBackup, StoredRecord};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::store::DomainStore;

use crate::checkpoint_index::{Stamp, dir_stamp};
pub use crate::layout::BACKUP_INDEX_FILE;

/// Format version; an index of another version is rebuilt.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct IndexFile<S, E> {
    version: u32,
    stamp: Stamp,
    /// The domain every record names.
    domain: S,
    records: Vec<E>,
}

/// One record as read, as one JSON array (parsed several times faster than an object per
/// field): uuid, parent, checkpoint, creation time, sequence number, description, kind,
/// `[disk, path, format, virtual size, allocated size, digest]` per image, and its file's
/// stamp.
type Entry = (
    String,
    Option<String>,
    Option<String>,
    u64,
    Option<u64>,
    Option<String>,
    BackupKind,
    Vec<(String, String, ImageFormat, u64, u64, Digest)>,
    FileStamp,
);

/// One record as written: [`Entry`], borrowed.
type EntryRef<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    u64,
    Option<u64>,
    Option<&'a str>,
    BackupKind,
    Vec<(&'a str, &'a str, &'a ImageFormat, u64, u64, &'a Digest)>,
    FileStamp,
);

/// A record file's modification time and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    mtime_s: u64,
    mtime_ns: u32,
    len: u64,
}

fn file_stamp(path: &str) -> Option<FileStamp> {
    let meta = fs::metadata(path).ok()?;
    let since = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(FileStamp {
        mtime_s: since.as_secs(),
        mtime_ns: since.subsec_nanos(),
        len: meta.len(),
    })
}

fn stamp(store: &DomainStore) -> Option<Stamp> {
    dir_stamp(&store.dir().join("backups"))
}

/// The file of record `uuid`, as the record's messages name it.
pub fn record_file(store: &DomainStore, uuid: &str) -> String {
    store
        .dir()
        .join("backups")
        .join(format!("{uuid}.xml"))
        .display()
        .to_string()
}

/// The stored records as the index has them (parsed), or `None` when it is missing,
/// unreadable or does not match `backups/` (the caller then reads the files).
pub fn read(store: &DomainStore) -> Option<Vec<StoredRecord>> {
    let text = fs::read(store.dir().join(BACKUP_INDEX_FILE)).ok()?;
    let index: IndexFile<String, Entry> = serde_json::from_slice(&text).ok()?;
    if index.version != VERSION || Some(index.stamp) != stamp(store) {
        return None;
    }
    let domain = index.domain;
    index
        .records
        .into_iter()
        .map(
            |(
                uuid,
                parent,
                checkpoint,
                creation_time,
                sequence,
                description,
                kind,
                disks,
                file,
            )| {
                let path = record_file(store, &uuid);
                if file_stamp(&path) != Some(file) {
                    return None;
                }
                let disks = disks
                    .into_iter()
                    .map(
                        |(disk, path, format, virtual_size_bytes, allocated_size_bytes, digest)| {
                            BackupImage {
                                disk,
                                path,
                                format,
                                virtual_size_bytes,
                                allocated_size_bytes,
                                digest,
                            }
                        },
                    )
                    .collect();
                let record = ManagedBackup {
                    uuid,
                    domain: domain.clone(),
                    parent,
                    checkpoint,
                    creation_time,
                    sequence,
                    description,
                    kind,
                    disks,
                };
                Some(StoredRecord::parsed(path, record))
            },
        )
        .collect()
}

/// Writes the index of `records`, every record file of `backups/` as it is now. Best effort:
/// an index that cannot be written is rebuilt by a later load.
pub fn write<'a>(store: &DomainStore, records: impl IntoIterator<Item = &'a ManagedBackup>) {
    let Some(stamp) = stamp(store) else {
        remove(store);
        return;
    };
    let domain = store.name();
    let entries: Option<Vec<EntryRef<'_>>> = records
        .into_iter()
        .map(|r| {
            if r.domain != domain {
                return None;
            }
            let file = file_stamp(&record_file(store, &r.uuid))?;
            let disks = r
                .disks
                .iter()
                .map(|d| {
                    let sizes = (d.virtual_size_bytes, d.allocated_size_bytes);
                    (
                        d.disk.as_str(),
                        d.path.as_str(),
                        &d.format,
                        sizes.0,
                        sizes.1,
                        &d.digest,
                    )
                })
                .collect();
            Some((
                r.uuid.as_str(),
                r.parent.as_deref(),
                r.checkpoint.as_deref(),
                r.creation_time,
                r.sequence,
                r.description.as_deref(),
                r.kind,
                disks,
                file,
            ))
        })
        .collect();
    let Some(records) = entries else {
        remove(store);
        return;
    };
    let index = IndexFile {
        version: VERSION,
        stamp,
        domain,
        records,
    };
    let Ok(json) = serde_json::to_vec(&index) else {
        remove(store);
        return;
    };
    let tmp = store.dir().join(format!(".{BACKUP_INDEX_FILE}.tmp"));
    if fs::write(&tmp, json).is_err()
        || fs::rename(&tmp, store.dir().join(BACKUP_INDEX_FILE)).is_err()
    {
        let _ = fs::remove_file(&tmp);
        remove(store);
    }
}

/// Removes the index (before records change).
pub fn remove(store: &DomainStore) {
    let _ = fs::remove_file(store.dir().join(BACKUP_INDEX_FILE));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vbackup_core::catalogue::DigestKind;
    use vbackup_qemu::store::{Collection, Store};

    fn record(uuid: &str) -> ManagedBackup {
        ManagedBackup {
            uuid: uuid.into(),
            domain: "vm".into(),
            parent: None,
            checkpoint: Some("c1".into()),
            creation_time: 1_700_000_000,
            sequence: Some(3),
            description: Some("about it".into()),
            kind: BackupKind::Full,
            disks: vec![BackupImage {
                disk: "vda".into(),
                path: format!("/b/{uuid}/vda.qcow2"),
                format: ImageFormat::Qcow2,
                virtual_size_bytes: 1 << 30,
                allocated_size_bytes: 1 << 20,
                digest: Digest::of_kind(DigestKind::NEW_IMAGES, &[7; 32]),
            }],
        }
    }

    #[test]
    fn index_round_trips_and_is_refused_once_a_record_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let ds = store.lock_domain("vm").unwrap();
        let a = record("0f6b5b4e-53b6-4d8c-9a43-7e2d8b1c9f01");
        ds.write_entry(Collection::Backups, &a.uuid, &a.format())
            .unwrap();
        write(&ds, [&a]);
        let back = read(&ds).expect("index matches");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].parsed.as_deref(), Some(&a));
        assert_eq!(back[0].uuid.as_deref(), Some(a.uuid.as_str()));
        assert_eq!(back[0].file, record_file(&ds, &a.uuid));

        // A record changed in place (the directory's time stays) makes it stale.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let path = record_file(&ds, &a.uuid);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(read(&ds).is_none());
        ds.write_entry(Collection::Backups, &a.uuid, &a.format())
            .unwrap();
        write(&ds, [&a]);
        assert!(read(&ds).is_some());

        // A record file written behind the index's back makes it stale.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = record("1a2b3c4d-0000-4000-8000-000000000002");
        ds.write_entry(Collection::Backups, &b.uuid, &b.format())
            .unwrap();
        assert!(read(&ds).is_none());
        // So does a torn or foreign file, and a digest that is no digest.
        write(&ds, [&a, &b]);
        assert_eq!(read(&ds).map(|r| r.len()), Some(2));
        let text = fs::read_to_string(ds.dir().join(BACKUP_INDEX_FILE)).unwrap();
        fs::write(
            ds.dir().join(BACKUP_INDEX_FILE),
            text.replace("blake3-tree:", "blake3-tree:zz"),
        )
        .unwrap();
        assert!(read(&ds).is_none());
        fs::write(ds.dir().join(BACKUP_INDEX_FILE), b"{\"vers").unwrap();
        assert!(read(&ds).is_none());
        remove(&ds);
        assert!(!ds.dir().join(BACKUP_INDEX_FILE).exists());
    }
}
