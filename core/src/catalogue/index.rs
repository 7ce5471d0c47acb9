//! [`Catalogue`]: the managed backups of one domain, their chains and the operations that
//! change them.

use std::collections::{BTreeMap, BTreeSet};

use super::record::{BackupKind, ManagedBackup, validate_uuid};
use super::{CatalogueError, MAX_CHAIN_LENGTH};

/// A change the caller must carry out, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogueOp {
    /// Rebase an image onto a new backing file (`None`: make it standalone) keeping its
    /// guest-visible content (`qemu-img rebase`, safe mode). Comes before the record rewrite
    /// that follows from it.
    RebaseImage {
        /// The image to rebase.
        path: String,
        /// Its new backing image, qcow2.
        backing: Option<String>,
    },
    /// Write (or rewrite) a backup's record (`backups/<uuid>.xml`, [`ManagedBackup::format`]).
    PutBackup(Box<ManagedBackup>),
    /// Delete a backup's record.
    DeleteBackup {
        /// The backup.
        uuid: String,
    },
    /// Remove an image file (after the records no longer name it).
    RemoveImage {
        /// Absolute path.
        path: String,
    },
    /// Record the domain's default target directory for new backups.
    SetDefaultTarget(Option<String>),
    /// Delete a checkpoint no remaining backup needs (its metadata and its bitmaps, through
    /// the engine's checkpoint deletion of that checkpoint alone). A checkpoint that no longer
    /// exists is skipped, so an interrupted deletion can be repeated. Comes before the
    /// deletion of the records naming it: an interruption leaves those backups catalogued and
    /// restorable, never a checkpoint nothing refers to.
    DeleteCheckpoint {
        /// The checkpoint's name.
        name: String,
    },
}

/// Which backups [`Catalogue::list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackupListFilter {
    /// Every backup.
    #[default]
    All,
    /// Only full backups (chain roots).
    Full,
    /// The chain of the most recent backup, from its full backup to it.
    LatestChain,
}

/// What to do with the backups built on one being deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteMode {
    /// Delete it alone; refused while other backups depend on it.
    Alone,
    /// Delete it alone and keep its children: each child's images are rebased onto this
    /// backup's parent images (or made standalone, and the child made full, when this backup
    /// is a full one).
    RebaseChildren,
    /// Delete it and every backup built on it.
    WithChildren,
}

/// The managed backups of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    domain: String,
    backups: BTreeMap<String, ManagedBackup>,
    /// Which backup each image path belongs to, and each sequence number: kept with
    /// `backups` ([`Catalogue::put`], [`Catalogue::take`]) so that an insert checks them
    /// without a pass over every backup (a load of N records is then not N^2).
    paths: BTreeMap<String, String>,
    sequences: BTreeMap<u64, String>,
    default_target: Option<String>,
}

impl Catalogue {
    /// An empty catalogue for `domain`.
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            backups: BTreeMap::new(),
            paths: BTreeMap::new(),
            sequences: BTreeMap::new(),
            default_target: None,
        }
    }

    /// Rebuilds a catalogue from stored records, in any order. Every record must pass the same
    /// checks as [`Catalogue::insert`], so a store edited by hand cannot produce a cycle or an
    /// orphan.
    pub fn load(
        domain: impl Into<String>,
        records: impl IntoIterator<Item = ManagedBackup>,
        default_target: Option<String>,
    ) -> Result<Self, CatalogueError> {
        let mut catalogue = Self::new(domain);
        if let Some(target) = default_target {
            catalogue.set_default_target(Some(target))?;
        }
        let mut pending: BTreeMap<String, ManagedBackup> = BTreeMap::new();
        for record in records {
            if pending.contains_key(&record.uuid) {
                return Err(CatalogueError::Duplicate(record.uuid));
            }
            pending.insert(record.uuid.clone(), record);
        }
        // Parents before children: each pass inserts every record whose parent is present. A
        // pass that inserts nothing leaves only orphans or cycles, reported on the first one.
        while !pending.is_empty() {
            let ready: Vec<String> = pending
                .values()
                .filter(|b| {
                    b.parent
                        .as_ref()
                        .is_none_or(|p| catalogue.backups.contains_key(p))
                })
                .map(|b| b.uuid.clone())
                .collect();
            if ready.is_empty() {
                let (uuid, b) = pending.pop_first().expect("pending is not empty");
                return Err(CatalogueError::MissingParent {
                    uuid,
                    parent: b.parent.unwrap_or_default(),
                });
            }
            for uuid in ready {
                if let Some(record) = pending.remove(&uuid) {
                    catalogue.insert(record)?;
                }
            }
        }
        Ok(catalogue)
    }

    /// The domain this catalogue belongs to.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Number of backups.
    pub fn len(&self) -> usize {
        self.backups.len()
    }

    /// Whether there is no backup (`undefine` needs no confirmation then).
    pub fn is_empty(&self) -> bool {
        self.backups.is_empty()
    }

    /// The backup with this uuid.
    pub fn get(&self, uuid: &str) -> Option<&ManagedBackup> {
        self.backups.get(uuid)
    }

    fn require(&self, uuid: &str) -> Result<&ManagedBackup, CatalogueError> {
        self.backups
            .get(uuid)
            .ok_or_else(|| CatalogueError::NotFound(uuid.to_owned()))
    }

    /// Adds a finished backup. Refused when the record is inconsistent, belongs to another
    /// domain, reuses a uuid, an image path or a sequence number, names a missing parent, has a
    /// disk its parent lacks, ranks before its parent (a sequence number not greater than the
    /// parent's, or none under a numbered parent), or would make the chain too long. A new
    /// backup takes [`Catalogue::next_sequence`].
    pub fn insert(&mut self, backup: ManagedBackup) -> Result<Vec<CatalogueOp>, CatalogueError> {
        backup.check()?;
        if backup.domain != self.domain {
            return Err(CatalogueError::WrongDomain {
                uuid: backup.uuid,
                expected: self.domain.clone(),
                found: backup.domain,
            });
        }
        if self.backups.contains_key(&backup.uuid) {
            return Err(CatalogueError::Duplicate(backup.uuid));
        }
        for image in &backup.disks {
            if let Some(owner) = self.owner_of_path(&image.path) {
                return Err(CatalogueError::ImageInUse {
                    path: image.path.clone(),
                    owner: owner.to_owned(),
                });
            }
        }
        if let Some(parent_uuid) = &backup.parent {
            let parent =
                self.backups
                    .get(parent_uuid)
                    .ok_or_else(|| CatalogueError::MissingParent {
                        uuid: backup.uuid.clone(),
                        parent: parent_uuid.clone(),
                    })?;
            if let Some(image) = backup
                .disks
                .iter()
                .find(|d| parent.image(&d.disk).is_none())
            {
                return Err(CatalogueError::Inconsistent {
                    uuid: backup.uuid.clone(),
                    reason: format!(
                        "disk '{}' has no image in parent backup '{parent_uuid}'",
                        image.disk
                    ),
                });
            }
            if self.chain(parent_uuid)?.len() >= MAX_CHAIN_LENGTH {
                return Err(CatalogueError::ChainTooLong(backup.uuid));
            }
            // A child is recorded after its parent, so it ranks after it.
            match (parent.sequence, backup.sequence) {
                (Some(p), Some(c)) if c <= p => {
                    return Err(CatalogueError::Inconsistent {
                        uuid: backup.uuid.clone(),
                        reason: format!(
                            "its sequence number {c} is not greater than its parent's ({p})"
                        ),
                    });
                }
                (Some(_), None) => {
                    return Err(CatalogueError::Inconsistent {
                        uuid: backup.uuid.clone(),
                        reason: "it has no sequence number while its parent has one".into(),
                    });
                }
                _ => {}
            }
        }
        if let Some(sequence) = backup.sequence
            && let Some(other) = self.sequences.get(&sequence)
        {
            return Err(CatalogueError::Inconsistent {
                uuid: backup.uuid.clone(),
                reason: format!("sequence number {sequence} is already used by backup '{other}'"),
            });
        }
        self.put(backup.clone());
        Ok(vec![CatalogueOp::PutBackup(Box::new(backup))])
    }

    fn owner_of_path(&self, path: &str) -> Option<&str> {
        self.paths.get(path).map(String::as_str)
    }

    /// Stores `backup` (replacing the one of its uuid) with its paths and sequence number.
    fn put(&mut self, backup: ManagedBackup) {
        self.take(&backup.uuid);
        for d in &backup.disks {
            self.paths.insert(d.path.clone(), backup.uuid.clone());
        }
        if let Some(s) = backup.sequence {
            self.sequences.insert(s, backup.uuid.clone());
        }
        self.backups.insert(backup.uuid.clone(), backup);
    }

    /// Removes backup `uuid` with its paths and sequence number.
    fn take(&mut self, uuid: &str) -> Option<ManagedBackup> {
        let backup = self.backups.remove(uuid)?;
        for d in &backup.disks {
            if self
                .paths
                .get(&d.path)
                .is_some_and(|owner| *owner == backup.uuid)
            {
                self.paths.remove(&d.path);
            }
        }
        if let Some(s) = backup.sequence
            && self
                .sequences
                .get(&s)
                .is_some_and(|owner| *owner == backup.uuid)
        {
            self.sequences.remove(&s);
        }
        Some(backup)
    }

    /// Backups from oldest to newest. The order is total and the same on every load:
    /// numbered backups (see [`ManagedBackup::sequence`]) come after unnumbered ones, in
    /// sequence order; unnumbered ones (older records) order by creation time, then by depth
    /// in their chain (so a parent precedes a child taken in the same second), then by uuid.
    pub fn list(&self, filter: BackupListFilter) -> Vec<&ManagedBackup> {
        match filter {
            BackupListFilter::All => self.sorted(self.backups.values()),
            BackupListFilter::Full => {
                self.sorted(self.backups.values().filter(|b| b.kind == BackupKind::Full))
            }
            BackupListFilter::LatestChain => match self.latest() {
                Some(latest) => self.chain(&latest.uuid).unwrap_or_default(),
                None => Vec::new(),
            },
        }
    }

    fn sorted<'a>(&self, it: impl Iterator<Item = &'a ManagedBackup>) -> Vec<&'a ManagedBackup> {
        let mut v: Vec<&ManagedBackup> = it.collect();
        v.sort_by(|a, b| self.order(a, b));
        v
    }

    /// The catalogue's order (see [`Catalogue::list`]): by sequence number (numbered after
    /// unnumbered), creation time, depth in the chain, then uuid. Uuids are unique, so it is
    /// total. The depth, a walk up the chain, is only looked at between backups equal in the
    /// rest, so ordering a long chain of numbered backups walks no chain.
    fn order(&self, a: &ManagedBackup, b: &ManagedBackup) -> std::cmp::Ordering {
        let key = |x: &ManagedBackup| {
            (
                x.sequence.is_some(),
                x.sequence.unwrap_or(0),
                x.creation_time,
            )
        };
        // Every catalogued backup has a chain (insert checks it); the fallback only keeps
        // the order total for a record that is not in this catalogue.
        let depth = |x: &ManagedBackup| self.chain(&x.uuid).map_or(0, |c| c.len());
        key(a)
            .cmp(&key(b))
            .then_with(|| depth(a).cmp(&depth(b)))
            .then_with(|| a.uuid.cmp(&b.uuid))
    }

    /// The most recent backup: the last one in the order of [`Catalogue::list`].
    pub fn latest(&self) -> Option<&ManagedBackup> {
        self.backups.values().max_by(|a, b| self.order(a, b))
    }

    /// The sequence number of the next backup recorded: one more than the greatest so far
    /// (1 in a catalogue without numbered backups).
    pub fn next_sequence(&self) -> u64 {
        self.sequences
            .last_key_value()
            .map_or(1, |(s, _)| s.saturating_add(1))
    }

    /// The backups whose parent is `uuid`, oldest first.
    pub fn children(&self, uuid: &str) -> Result<Vec<&ManagedBackup>, CatalogueError> {
        self.require(uuid)?;
        Ok(self.sorted(
            self.backups
                .values()
                .filter(|b| b.parent.as_deref() == Some(uuid)),
        ))
    }

    /// `uuid` and every backup built on it, directly or not, children before their parents.
    pub fn descendants(&self, uuid: &str) -> Result<Vec<&ManagedBackup>, CatalogueError> {
        let root = self.require(uuid)?;
        let mut order = vec![root];
        let mut i = 0;
        // Breadth-first from the root; uuids are unique and parents exist, so each backup is
        // reached once and the walk is bounded by the catalogue's size.
        while i < order.len() {
            let current = order[i].uuid.as_str();
            order.extend(
                self.sorted(
                    self.backups
                        .values()
                        .filter(|b| b.parent.as_deref() == Some(current)),
                ),
            );
            i += 1;
        }
        order.reverse();
        Ok(order)
    }

    /// The chain from the full backup at its root down to `uuid` (root first).
    pub fn chain(&self, uuid: &str) -> Result<Vec<&ManagedBackup>, CatalogueError> {
        let mut chain = vec![self.require(uuid)?];
        while let Some(parent) = chain.last().and_then(|b| b.parent.as_deref()) {
            if chain.len() >= MAX_CHAIN_LENGTH {
                return Err(CatalogueError::ChainTooLong(uuid.to_owned()));
            }
            chain.push(self.require(parent)?);
        }
        chain.reverse();
        Ok(chain)
    }

    /// Deletes a backup as `mode` says and returns the operations to carry out.
    pub fn delete(
        &mut self,
        uuid: &str,
        mode: DeleteMode,
    ) -> Result<Vec<CatalogueOp>, CatalogueError> {
        let target = self.require(uuid)?.clone();
        let children: Vec<ManagedBackup> = self.children(uuid)?.into_iter().cloned().collect();
        let mut ops = Vec::new();
        let doomed: Vec<ManagedBackup> = match mode {
            DeleteMode::Alone if !children.is_empty() => {
                return Err(CatalogueError::HasChildren {
                    uuid: uuid.to_owned(),
                    children: children.into_iter().map(|c| c.uuid).collect(),
                });
            }
            DeleteMode::Alone => vec![target],
            DeleteMode::RebaseChildren => {
                for mut child in children {
                    for image in &mut child.disks {
                        let backing = target
                            .parent
                            .as_deref()
                            .and_then(|p| self.backups.get(p))
                            .and_then(|p| p.image(&image.disk))
                            .map(|i| i.path.clone());
                        ops.push(CatalogueOp::RebaseImage {
                            path: image.path.clone(),
                            backing,
                        });
                    }
                    child.parent = target.parent.clone();
                    if child.parent.is_none() {
                        child.kind = BackupKind::Full;
                    }
                    ops.push(CatalogueOp::PutBackup(Box::new(child.clone())));
                    self.put(child);
                }
                vec![target]
            }
            DeleteMode::WithChildren => self.descendants(uuid)?.into_iter().cloned().collect(),
        };
        Ok(self.remove_records(doomed, ops))
    }

    /// Makes backup `uuid` a full backup of its own (a synthetic full): each of its images is
    /// rebased onto nothing, keeping its content, and then its record loses its parent. Its
    /// ancestors stay a chain without it and can be deleted without touching it or its
    /// descendants, whose images keep naming its (unchanged) image paths. A backup that is
    /// already full gives no operations. An interruption leaves the record naming its parent
    /// over images that read the same; running it again finishes it.
    pub fn consolidate(&mut self, uuid: &str) -> Result<Vec<CatalogueOp>, CatalogueError> {
        let mut backup = self.require(uuid)?.clone();
        if backup.parent.is_none() {
            return Ok(Vec::new());
        }
        let mut ops: Vec<CatalogueOp> = backup
            .disks
            .iter()
            .map(|i| CatalogueOp::RebaseImage {
                path: i.path.clone(),
                backing: None,
            })
            .collect();
        backup.parent = None;
        backup.kind = BackupKind::Full;
        ops.push(CatalogueOp::PutBackup(Box::new(backup.clone())));
        self.put(backup);
        Ok(ops)
    }

    /// Deletes every backup of the domain.
    pub fn delete_all(&mut self) -> Vec<CatalogueOp> {
        let mut doomed: Vec<ManagedBackup> = Vec::new();
        let roots: Vec<String> = self
            .list(BackupListFilter::Full)
            .into_iter()
            .map(|b| b.uuid.clone())
            .collect();
        for root in roots {
            if let Ok(d) = self.descendants(&root) {
                doomed.extend(d.into_iter().cloned());
            }
        }
        self.remove_records(doomed, Vec::new())
    }

    /// Removes `doomed` (children listed before parents) and appends the deletions of the
    /// checkpoints they release, then the record deletions, then the file removals.
    ///
    /// A backup's checkpoint exists so that a later backup can be incremental from it; once
    /// the backup is gone nothing can be built on it any more (the backups already built on
    /// it hold their data), so its checkpoint goes too, unless a remaining backup names the
    /// same checkpoint.
    fn remove_records(
        &mut self,
        doomed: Vec<ManagedBackup>,
        mut ops: Vec<CatalogueOp>,
    ) -> Vec<CatalogueOp> {
        let mut records = Vec::new();
        let mut files = Vec::new();
        let mut released: Vec<String> = Vec::new();
        let mut seen = BTreeSet::new();
        for backup in doomed {
            if !seen.insert(backup.uuid.clone()) {
                continue;
            }
            self.take(&backup.uuid);
            records.push(CatalogueOp::DeleteBackup {
                uuid: backup.uuid.clone(),
            });
            if let Some(checkpoint) = backup.checkpoint
                && !released.contains(&checkpoint)
            {
                released.push(checkpoint);
            }
            files.extend(
                backup
                    .disks
                    .into_iter()
                    .map(|d| CatalogueOp::RemoveImage { path: d.path }),
            );
        }
        released.retain(|name| {
            !self
                .backups
                .values()
                .any(|b| b.checkpoint.as_deref() == Some(name.as_str()))
        });
        ops.extend(
            released
                .into_iter()
                .map(|name| CatalogueOp::DeleteCheckpoint { name }),
        );
        ops.extend(records);
        ops.extend(files);
        ops
    }

    /// The directory new backups go to when their definition names no target.
    pub fn default_target(&self) -> Option<&str> {
        self.default_target.as_deref()
    }

    /// Sets (or clears) the default target directory; it must be absolute.
    pub fn set_default_target(
        &mut self,
        target: Option<String>,
    ) -> Result<Vec<CatalogueOp>, CatalogueError> {
        if let Some(t) = &target
            && (!t.starts_with('/') || t.split('/').any(|c| c == ".."))
        {
            return Err(CatalogueError::RelativeTarget(t.clone()));
        }
        self.default_target = target.clone();
        Ok(vec![CatalogueOp::SetDefaultTarget(target)])
    }

    /// Where the image of `disk` for backup `uuid` goes under the default target:
    /// `<target>/<uuid>/<disk>.qcow2`. `None` without a default target.
    pub fn default_image_path(
        &self,
        uuid: &str,
        disk: &str,
    ) -> Result<Option<String>, CatalogueError> {
        validate_uuid(uuid)?;
        if disk.is_empty() || disk.contains('/') || disk.starts_with('.') {
            return Err(CatalogueError::NoSuchDisk {
                uuid: uuid.to_owned(),
                disk: disk.to_owned(),
            });
        }
        Ok(self
            .default_target
            .as_deref()
            .map(|t| format!("{}/{uuid}/{disk}.qcow2", t.trim_end_matches('/'))))
    }
}

/// The domain holding backup `uuid` among several domains' catalogues, with the record.
pub fn find_backup<'a>(
    catalogues: impl IntoIterator<Item = &'a Catalogue>,
    uuid: &str,
) -> Option<(&'a str, &'a ManagedBackup)> {
    catalogues
        .into_iter()
        .find_map(|c| c.get(uuid).map(|b| (c.domain(), b)))
}
