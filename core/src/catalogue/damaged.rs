//! Loading a catalogue from stored record files when some of them are damaged: the intact
//! backups load, each damaged record is reported on its own, naming its file.

use std::collections::BTreeMap;

use super::index::Catalogue;
use super::record::{ManagedBackup, validate_uuid};

/// One stored record file, as read from the store (`backups/<uuid>.xml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The file's name or path, as the store names it (used in messages).
    pub file: String,
    /// The uuid the file name gives (`<uuid>.xml`), when it is one.
    pub uuid: Option<String>,
    /// The file's content.
    pub text: String,
    /// The record already parsed from `text` (or from a cache of parsed records the host
    /// keeps): then `text` is not read.
    pub parsed: Option<Box<ManagedBackup>>,
}

impl StoredRecord {
    /// A record read from `file`; the uuid is taken from the file name when it is
    /// `<uuid>.xml`.
    pub fn new(file: impl Into<String>, text: impl Into<String>) -> Self {
        let file = file.into();
        let name = file.rsplit('/').next().unwrap_or(&file);
        let uuid = name
            .strip_suffix(".xml")
            .filter(|u| validate_uuid(u).is_ok())
            .map(str::to_owned);
        Self {
            file,
            uuid,
            text: text.into(),
            parsed: None,
        }
    }

    /// The record: the one parsed already, else `text` parsed now.
    pub fn take_record(&mut self) -> Result<ManagedBackup, crate::xml::XmlError> {
        match self.parsed.take() {
            Some(b) => Ok(*b),
            None => ManagedBackup::parse(&self.text),
        }
    }

    /// A record read from `file` and parsed already.
    pub fn parsed(file: impl Into<String>, record: ManagedBackup) -> Self {
        let mut stored = Self::new(file, String::new());
        stored.parsed = Some(Box::new(record));
        stored
    }
}

/// A record that could not join the catalogue. It affects nothing but itself (and the
/// backups built on it, which cannot be restored without it): the other backups list,
/// verify, restore and delete; this one is listed as damaged and can be deleted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DamagedRecord {
    /// The backup's uuid, from the file name, when it has one.
    pub uuid: Option<String>,
    /// The file, as the store named it.
    pub file: String,
    /// Why it could not be loaded, in a sentence.
    pub reason: String,
}

impl Catalogue {
    /// Rebuilds a catalogue from stored record files, keeping every intact backup. A record
    /// that does not parse, names another uuid than its file, fails the checks of
    /// [`Catalogue::insert`], or is built on a record that is missing or damaged is reported
    /// in the second list instead (in file order). A default target that is not absolute is
    /// ignored.
    pub fn load_tolerant(
        domain: impl Into<String>,
        records: impl IntoIterator<Item = StoredRecord>,
        default_target: Option<String>,
    ) -> (Self, Vec<DamagedRecord>) {
        let mut unparsed = Vec::new();
        let parsed: Vec<(StoredRecord, ManagedBackup)> = records
            .into_iter()
            .filter_map(|mut stored| match stored.take_record() {
                Ok(b) => Some((stored, b)),
                Err(e) => {
                    unparsed.push(DamagedRecord {
                        uuid: stored.uuid,
                        file: stored.file,
                        reason: format!("it does not parse: {e}"),
                    });
                    None
                }
            })
            .collect();
        let (catalogue, mut damaged) = Self::load_parsed(domain, parsed, default_target);
        damaged.extend(unparsed);
        damaged.sort_by(|a, b| a.file.cmp(&b.file));
        (catalogue, damaged)
    }

    /// [`Catalogue::load_tolerant`] of records already parsed, each with the stored file it
    /// came from (whose `text` is not read again).
    pub fn load_parsed(
        domain: impl Into<String>,
        records: impl IntoIterator<Item = (StoredRecord, ManagedBackup)>,
        default_target: Option<String>,
    ) -> (Self, Vec<DamagedRecord>) {
        let mut catalogue = Self::new(domain);
        if let Some(target) = default_target {
            let _ = catalogue.set_default_target(Some(target));
        }
        let mut damaged = Vec::new();
        let mut pending: BTreeMap<String, (String, ManagedBackup)> = BTreeMap::new();
        for (stored, parsed) in records {
            if let Some(u) = &stored.uuid
                && *u != parsed.uuid
            {
                damaged.push(DamagedRecord {
                    uuid: stored.uuid.clone(),
                    file: stored.file,
                    reason: format!("it describes backup '{}', not '{u}'", parsed.uuid),
                });
                continue;
            }
            if pending.contains_key(&parsed.uuid) {
                damaged.push(DamagedRecord {
                    uuid: Some(parsed.uuid.clone()),
                    file: stored.file,
                    reason: format!("backup '{}' is recorded twice", parsed.uuid),
                });
                continue;
            }
            pending.insert(parsed.uuid.clone(), (stored.file, parsed));
        }
        // Parents before children, as `load` does; what cannot be inserted is damaged.
        let mut rounds = 0usize;
        while !pending.is_empty() && rounds <= super::MAX_CHAIN_LENGTH {
            rounds += 1;
            let ready: Vec<String> = pending
                .values()
                .filter(|(_, b)| b.parent.as_ref().is_none_or(|p| catalogue.get(p).is_some()))
                .map(|(_, b)| b.uuid.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            for uuid in ready {
                if let Some((file, record)) = pending.remove(&uuid)
                    && let Err(e) = catalogue.insert(record)
                {
                    damaged.push(DamagedRecord {
                        uuid: Some(uuid),
                        file,
                        reason: e.to_string(),
                    });
                }
            }
        }
        for (uuid, (file, record)) in pending {
            let parent = record.parent.unwrap_or_default();
            damaged.push(DamagedRecord {
                uuid: Some(uuid),
                file,
                reason: format!("its parent backup '{parent}' is missing or its record is damaged"),
            });
        }
        damaged.sort_by(|a, b| a.file.cmp(&b.file));
        (catalogue, damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{BackupImage, BackupKind, Digest};
    use crate::model::ImageFormat;

    fn backup(uuid: &str, parent: Option<&str>) -> ManagedBackup {
        ManagedBackup {
            uuid: uuid.into(),
            domain: "d".into(),
            parent: parent.map(str::to_owned),
            checkpoint: Some(format!("c-{uuid}")),
            creation_time: 1,
            sequence: None,
            description: None,
            kind: if parent.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            disks: vec![BackupImage {
                disk: "vda".into(),
                path: format!("/b/{uuid}/vda.qcow2"),
                format: ImageFormat::Qcow2,
                virtual_size_bytes: 1,
                allocated_size_bytes: 1,
                digest: Digest::sha256(&[0; 32]),
            }],
        }
    }

    const A: &str = "00000000-0000-4000-8000-00000000000a";
    const B: &str = "00000000-0000-4000-8000-00000000000b";
    const C: &str = "00000000-0000-4000-8000-00000000000c";

    #[test]
    fn a_truncated_record_is_reported_by_file_and_the_others_load() {
        let a = backup(A, None).format();
        let b = backup(B, Some(A)).format();
        let c = backup(C, None).format();
        let (cat, damaged) = Catalogue::load_tolerant(
            "d",
            [
                StoredRecord::new(format!("backups/{A}.xml"), a),
                StoredRecord::new(format!("backups/{B}.xml"), b),
                StoredRecord::new(format!("backups/{C}.xml"), &c[..c.len() / 2]),
            ],
            None,
        );
        assert_eq!(cat.len(), 2);
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].file, format!("backups/{C}.xml"));
        assert_eq!(damaged[0].uuid.as_deref(), Some(C));
    }

    #[test]
    fn a_child_of_a_damaged_record_is_reported_with_it() {
        let b = backup(B, Some(A)).format();
        let (cat, damaged) = Catalogue::load_tolerant(
            "d",
            [
                StoredRecord::new(format!("{A}.xml"), "<managedbackup"),
                StoredRecord::new(format!("{B}.xml"), b),
            ],
            None,
        );
        assert!(cat.is_empty());
        assert_eq!(damaged.len(), 2);
        assert!(damaged[1].reason.contains(A), "{damaged:?}");
    }
}
