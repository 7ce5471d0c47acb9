//! Carries out the effects of the core's managed-backup machine
//! ([`vbackup_core::managed::Managed`]) on this host: images with `qemu-img`, digests through
//! a read-only `qemu-nbd` export, renames that keep owner, group, mode and qcow2 options,
//! durable writes, records and the journal in the domain's store, and domain requests
//! through a session opened when the first one is needed.
//!
//! Contract: [`ManagedHost::run`] feeds one request to the machine and carries out every
//! effect it emits, in order, until it answers; the machine decides everything (what to
//! check, what to write, what to undo). A failure of an effect goes back to the machine as
//! an [`EffectError`], which cleans up and answers; only a failure of the store lock or the
//! clock ends a run with an [`Error`].

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vbackup_core::backup::{DomainJobStatus, JobStats};
use vbackup_core::catalogue::{BackupListFilter, BlockHashes, Digest, DigestKind, StoredRecord};
use vbackup_core::domain::{Reply, Request};
use vbackup_core::export::{STATE_DIRTY, STATE_ZERO};
use vbackup_core::link::{Link, Timestamp};
use vbackup_core::managed::{
    CallId, DigestBase, Effect, EffectError, ImageFacts, Managed, ManagedError, ManagedInput,
    ManagedOutput, ManagedReply, ManagedRequest, Outcome, StoredManaged,
};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::digest::{self, HashStore};
use vbackup_qemu::images::{self, DEFAULT_TARGET_FILE};
use vbackup_qemu::nbd::{BASE_ALLOCATION, NbdClient, copy::select_ranges, dirty_bitmap_context};
use vbackup_qemu::qcow2_writer;
use vbackup_qemu::qsd::RunDir;
use vbackup_qemu::store::{Collection, DomainStore, Store, write_atomic};
use vbackup_qemu::writeout::WriteBehind;

use crate::catalogue_index;
use crate::error::Error;
use crate::layout::{BLOCK_HASHES_DIR, COMPLETED_FILE, MANAGED_JOURNAL_FILE};
use crate::session::{Loaded, Session};
use crate::target_hashes::TargetHashes;

/// Bound on the machine's rounds for one request.
const ROUNDS: usize = 1_000_000;

/// The managed-backup machine of a locked domain, rebuilt from its store: the records from
/// the backup index when it matches their files, else parsed from the files (and the index
/// written again when none of them is damaged).
pub fn load_machine(store: &DomainStore) -> Result<Managed, Error> {
    let stored = stored_managed(store)?;
    let indexed = stored.records.iter().all(|r| r.parsed.is_some());
    let machine = Managed::new(store.name(), stored);
    if !indexed && machine.damaged().is_empty() {
        catalogue_index::write(store, machine.catalogue().list(BackupListFilter::All));
    }
    Ok(machine)
}

/// What the store holds of a domain's managed backups, for [`Managed::new`]: the records
/// parsed already when the backup index matches them ([`catalogue_index`]).
fn stored_managed(store: &DomainStore) -> Result<StoredManaged, Error> {
    let records = match catalogue_index::read(store) {
        Some(records) => records,
        None => store
            .load_entries(Collection::Backups)?
            .into_iter()
            .map(|(uuid, text)| StoredRecord::new(catalogue_index::record_file(store, &uuid), text))
            .collect(),
    };
    let default_target = match std::fs::read_to_string(store.dir().join(DEFAULT_TARGET_FILE)) {
        Ok(text) => Some(text.trim_end_matches('\n').to_owned()).filter(|t| !t.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("cannot read the default target")(e)),
    };
    let journal_path = store.dir().join(MANAGED_JOURNAL_FILE);
    let journal = match std::fs::read_to_string(&journal_path) {
        Ok(text) => Some((journal_path.display().to_string(), text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("cannot read the managed-backup journal")(e)),
    };
    Ok(StoredManaged {
        records,
        default_target,
        journal,
    })
}

/// The domain's side: loaded and locked, or with a session open.
enum Side {
    Loaded(Box<Loaded>),
    Session(Box<Session>),
    Gone,
}

/// What a pull copy reports while it runs (for a progress display).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEvent<'a> {
    /// The copy of one export begins.
    Started {
        /// The export (the disk target for a managed pull).
        export: &'a str,
        /// Bytes it will copy.
        total_bytes: u64,
    },
    /// Bytes copied (or, while checking, hashed) since the last event.
    Copied(u64),
    /// An image is read to compute or check its digest.
    Checking {
        /// The image.
        image: &'a str,
        /// Bytes of its content.
        total_bytes: u64,
    },
    /// The image is read.
    Checked {
        /// The image.
        image: &'a str,
    },
    /// The copy of one export is complete.
    Finished {
        /// The export.
        export: &'a str,
        /// Bytes copied.
        bytes_copied: u64,
        /// Extents copied.
        ranges: u64,
    },
}

/// Receives [`CopyEvent`]s.
pub type CopyObserver = Box<dyn FnMut(CopyEvent<'_>)>;

/// One domain's managed backups on this host: the machine and what carries out its effects.
pub struct ManagedHost {
    machine: Managed,
    side: Side,
    store_root: PathBuf,
    next_call: u64,
    observer: Option<CopyObserver>,
    /// Block hashes of full images this run copied, taken from the data as it was copied:
    /// their digest needs no second read.
    copied: BTreeMap<String, BlockHashes>,
    /// Push targets hashed beside their fsync (the session's effects start them).
    target_hashes: TargetHashes,
    /// The push targets of the backup in flight, written out while its job copies (their
    /// pages kept for the digest), so that their final fsync waits for little.
    write_behind: WriteBehind,
    /// A record file was written or removed (the backup index was removed first).
    records_changed: bool,
    /// A record file could not be written or removed: the files may not say what the
    /// machine holds, so no index is written for them.
    records_failed: bool,
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Timestamp::from_ms(ms)
}

fn failed(what: impl std::fmt::Display) -> EffectError {
    EffectError::Failed(what.to_string())
}

fn io_failed(path: &str, e: &std::io::Error) -> EffectError {
    if e.kind() == std::io::ErrorKind::NotFound {
        EffectError::NotFound(path.to_owned())
    } else {
        failed(format!("'{path}': {e}"))
    }
}

/// Runs a tool; its failure (with its stderr) is the effect's failure.
fn tool(command: &mut Command) -> Result<Vec<u8>, EffectError> {
    let out = images::run_tool(command).map_err(failed)?;
    if !out.status.success() {
        return Err(failed(images::tool_failure(command, &out)));
    }
    Ok(out.stdout)
}

fn sync_dir_of(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// The qcow2 creation options of an existing image, as `qemu-img create -o` takes them.
fn creation_options(like: &str) -> Result<(String, Vec<String>), EffectError> {
    let json = tool(Command::new("qemu-img").args(["info", "--output=json", "-U", like]))?;
    let info: Value = serde_json::from_slice(&json).map_err(failed)?;
    let format = info["format"].as_str().unwrap_or("qcow2").to_owned();
    let mut options = Vec::new();
    if format == "qcow2" {
        if let Some(c) = info["cluster-size"].as_u64() {
            options.push(format!("cluster_size={c}"));
        }
        let data = &info["format-specific"]["data"];
        if let Some(compat) = data["compat"].as_str() {
            options.push(format!("compat={compat}"));
        }
        if let Some(lazy) = data["lazy-refcounts"].as_bool() {
            options.push(format!(
                "lazy_refcounts={}",
                if lazy { "on" } else { "off" }
            ));
        }
        if let Some(bits) = data["refcount-bits"].as_u64() {
            options.push(format!("refcount_bits={bits}"));
        }
        if data["extended-l2"].as_bool() == Some(true) {
            options.push("extended_l2=on".into());
        }
    }
    Ok((format, options))
}

/// The last finished job's outcome as the host recorded it ([`COMPLETED_FILE`]).
fn recorded_completion(dir: &Path) -> Option<JobStats> {
    let text = std::fs::read_to_string(dir.join(COMPLETED_FILE)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let success = v["success"].as_bool()?;
    Some(JobStats {
        operation: "backup",
        status: if success {
            DomainJobStatus::Completed
        } else {
            DomainJobStatus::Failed
        },
        time_elapsed_ms: v["time_elapsed_ms"].as_u64().unwrap_or(0),
        disk_total_bytes: None,
        disk_processed_bytes: None,
        disk_remaining_bytes: None,
        disk_temp_used_bytes: None,
        disk_temp_total_bytes: None,
        success: Some(success),
        errmsg: v["errmsg"].as_str().map(str::to_owned),
        waiting_for: None,
    })
}

/// An image's facts with a digest of `kind`. For a tree kind ([`DigestKind::is_tree`]): `known` are
/// the block hashes taken while this run copied the image (nothing is read then); otherwise,
/// for an image written on `base` (its backing file), the blocks it does not hold take the
/// hashes `kept` has of that parent. The image's block hashes are kept in turn.
fn facts(
    path: &str,
    kind: DigestKind,
    base: Option<&DigestBase>,
    kept: Option<&HashStore>,
    known: Option<BlockHashes>,
    observer: &mut Option<CopyObserver>,
) -> Result<Outcome, EffectError> {
    let image_path = Path::new(path);
    if !image_path.exists() {
        return Err(EffectError::NotFound(path.to_owned()));
    }
    if kind == DigestKind::Sha256 {
        let image = images::describe("", image_path).map_err(failed)?;
        return Ok(Outcome::Facts(ImageFacts {
            virtual_size_bytes: image.virtual_size_bytes,
            allocated_size_bytes: image.allocated_size_bytes,
            digest: image.digest,
            format: image.format,
        }));
    }
    let chain = images::chain_layers(image_path).map_err(failed)?;
    let Some(top) = chain.first() else {
        return Err(failed(format!("'{path}': qemu-img shows no image")));
    };
    // The parent's hashes describe the image's backing content only when the backing file
    // is that parent.
    let parent = base
        .filter(|b| {
            top.backing
                .as_deref()
                .is_some_and(|f| same_file(f, &b.path))
        })
        .and_then(|b| kept.and_then(|k| k.load(&b.digest)));
    let known = known.filter(|h| h.size() == top.virtual_size_bytes && h.kind() == kind);
    let hashes = match known {
        Some(h) => h,
        None => hash_observed(image_path, top, kind, parent.as_ref(), observer)?,
    };
    let digest = hashes.digest();
    if let Some(k) = kept {
        k.keep_as(&hashes, &digest);
    }
    Ok(Outcome::Facts(ImageFacts {
        virtual_size_bytes: top.virtual_size_bytes,
        allocated_size_bytes: top.actual_size_bytes,
        digest,
        format: top.format.clone(),
    }))
}

/// [`digest::block_hashes`], told to `observer` ([`CopyEvent::Checking`]).
fn hash_observed(
    path: &Path,
    layer: &images::ChainLayer,
    kind: DigestKind,
    base: Option<&BlockHashes>,
    observer: &mut Option<CopyObserver>,
) -> Result<BlockHashes, EffectError> {
    let shown = path.display().to_string();
    let total = layer.virtual_size_bytes;
    checking(observer, &shown, total, |progress| {
        digest::block_hashes(path, &layer.format, kind, base, progress)
    })
    .map_err(failed)
}

/// Runs `work` on `image` (of `total` guest bytes) told to `observer` as a check: the check
/// starts, `work`'s progress counts the bytes, the check ends.
fn checking<T>(
    observer: &mut Option<CopyObserver>,
    image: &str,
    total: u64,
    work: impl FnOnce(&mut dyn FnMut(u64)) -> T,
) -> T {
    if let Some(o) = observer.as_mut() {
        o(CopyEvent::Checking {
            image,
            total_bytes: total,
        });
    }
    let done = work(&mut |bytes| {
        if let Some(o) = observer.as_mut() {
            o(CopyEvent::Copied(bytes));
        }
    });
    if let Some(o) = observer.as_mut() {
        o(CopyEvent::Checked { image });
    }
    done
}

/// Whether two paths name one file.
fn same_file(a: &str, b: &str) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

impl ManagedHost {
    /// The machine of a loaded (locked) domain, rebuilt from its store.
    pub fn open(store: &Store, loaded: Loaded) -> Result<Self, Error> {
        let machine = load_machine(&loaded.store)?;
        Ok(Self::with_machine(store, loaded, machine))
    }

    /// [`ManagedHost::open`] with the machine already rebuilt from the loaded domain's store
    /// (by [`load_machine`]), so that the records are read once.
    pub fn with_machine(store: &Store, loaded: Loaded, machine: Managed) -> Self {
        Self {
            machine,
            side: Side::Loaded(Box::new(loaded)),
            store_root: store.root().to_owned(),
            next_call: 0,
            observer: None,
            copied: BTreeMap::new(),
            target_hashes: TargetHashes::new(),
            write_behind: WriteBehind::keeping_pages(),
            records_changed: false,
            records_failed: false,
        }
    }

    /// Notes a record file about to change: the backup index no longer describes the files.
    fn records_changing(&mut self) {
        if !self.records_changed {
            self.records_changed = true;
            if let Some(store) = self.store() {
                catalogue_index::remove(store);
            }
        }
    }

    /// Writes the backup index again once this run changed record files and the machine's
    /// catalogue holds every record (nothing damaged, no write failed).
    fn settle_index(&self) {
        if self.records_changed
            && !self.records_failed
            && self.machine.damaged().is_empty()
            && let Some(store) = self.store()
        {
            catalogue_index::write(store, self.machine.catalogue().list(BackupListFilter::All));
        }
    }

    /// Reports the progress of pull copies to `observer`.
    pub fn observe_copies(&mut self, observer: CopyObserver) {
        self.observer = Some(observer);
    }

    /// The machine: the catalogue, the damaged records, the backup in flight.
    pub fn machine(&self) -> &Managed {
        &self.machine
    }

    /// The push targets of the full backup in flight are hashed beside their fsync.
    fn want_full_targets(&self) {
        let full = self
            .machine
            .pending()
            .filter(|p| p.parent.is_none() && !p.pull);
        let targets = full
            .iter()
            .flat_map(|p| p.images.iter().map(|(_, i)| i.clone()));
        self.target_hashes.want(targets);
    }

    /// [`digest::copy_hashed`] of `source` into `into`, told to the observer as a check of
    /// `source`.
    fn copy_hashed(
        &mut self,
        source: &str,
        into: &str,
        kind: DigestKind,
    ) -> Result<Option<BlockHashes>, EffectError> {
        let layers = images::chain_layers(Path::new(source)).map_err(failed)?;
        let Some(top) = layers.first() else {
            return Err(failed(format!("'{source}': qemu-img shows no image")));
        };
        let (from, to) = (Path::new(source), Path::new(into));
        let total = top.virtual_size_bytes;
        checking(&mut self.observer, source, total, |progress| {
            digest::copy_hashed(from, &top.format, to, kind, progress)
        })
        .map_err(failed)
    }

    /// Where the block hashes of the domain's backup images are kept.
    fn kept_hashes(&self) -> Option<HashStore> {
        self.store()
            .map(|s| HashStore::new(s.dir().join(BLOCK_HASHES_DIR)))
    }

    /// Drops the kept block hashes no recorded image has any more.
    fn prune_hashes(&self) {
        if let Some(kept) = self.kept_hashes() {
            let backups = self.machine.catalogue().list(BackupListFilter::All);
            let wanted: Vec<&Digest> = backups
                .iter()
                .flat_map(|b| b.disks.iter().map(|d| &d.digest))
                .collect();
            kept.retain(&wanted);
        }
    }

    fn store(&self) -> Option<&DomainStore> {
        match &self.side {
            Side::Loaded(l) => Some(&l.store),
            Side::Session(s) => Some(s.driver.effects().store()),
            Side::Gone => None,
        }
    }

    fn session(&mut self) -> Result<&mut Session, EffectError> {
        if let Side::Loaded(_) = self.side {
            let Side::Loaded(loaded) = std::mem::replace(&mut self.side, Side::Gone) else {
                return Err(failed("no domain"));
            };
            let mut session =
                Session::connect(*loaded).map_err(|e| EffectError::Domain(e.to_string()))?;
            let hashes = self.target_hashes.clone();
            session.driver.effects_mut().hash_targets(hashes);
            self.side = Side::Session(Box::new(session));
        }
        match &mut self.side {
            Side::Session(s) => Ok(s),
            _ => Err(failed("the domain's session is gone")),
        }
    }

    /// Asks the machine and carries out its effects until it answers.
    pub fn run(
        &mut self,
        request: ManagedRequest,
    ) -> Result<Result<ManagedReply, ManagedError>, Error> {
        self.next_call += 1;
        let mut outputs = self.machine.handle(
            now(),
            ManagedInput::Request(CallId(self.next_call), request),
        );
        for _ in 0..ROUNDS {
            let mut next = Vec::new();
            for output in outputs {
                match output {
                    ManagedOutput::Respond(_, answer) => return Ok(answer),
                    ManagedOutput::Effect(id, effect) => {
                        self.want_full_targets();
                        let result = self.execute(&effect);
                        next.extend(self.machine.handle(now(), ManagedInput::Done(id, result)));
                    }
                }
            }
            if next.is_empty() {
                let Some(at) = self.machine.next_deadline() else {
                    return Err(Error::Other(
                        "internal error: the managed-backup machine neither answers nor waits"
                            .into(),
                    ));
                };
                // Waiting for a job: the session is driven meanwhile so its events arrive, and
                // the machine hears at once when they end the job (not at its next poll).
                let mut ended = false;
                self.want_full_targets();
                if let Some(p) = self.machine.pending().filter(|p| !p.pull) {
                    self.write_behind
                        .kick(p.images.iter().map(|(_, i)| i.as_str()));
                }
                match &mut self.side {
                    Side::Session(s) => {
                        let until = s.driver.link().now().plus_ms(at.ms_since(now()).max(1));
                        let was_running = s.job_running();
                        s.driver.step(Some(until))?;
                        ended = was_running && !s.job_running();
                    }
                    _ => std::thread::sleep(Duration::from_millis(at.ms_since(now()).max(1))),
                }
                let input = if ended {
                    ManagedInput::JobEnded
                } else {
                    ManagedInput::Tick
                };
                next = self.machine.handle(now(), input);
            }
            outputs = next;
        }
        Err(Error::Other(
            "internal error: a managed-backup request never ended".into(),
        ))
    }

    /// The domain, still loaded and locked, when no session was opened; `None` when one was
    /// (it is closed, and the domain unlocked).
    pub fn into_loaded(self) -> Result<Option<Loaded>, Error> {
        self.settle_index();
        match self.side {
            Side::Loaded(l) => Ok(Some(*l)),
            Side::Session(s) => s.close().map(|()| None),
            Side::Gone => Ok(None),
        }
    }

    /// Ends the session, if one was opened.
    pub fn close(self) -> Result<(), Error> {
        self.settle_index();
        self.prune_hashes();
        match self.side {
            Side::Session(s) => s.close(),
            _ => Ok(()),
        }
    }

    fn execute(&mut self, effect: &Effect) -> Result<Outcome, EffectError> {
        let done = Ok(Outcome::Done);
        match effect {
            Effect::CreateDir { path, parents } => {
                let r = if *parents {
                    std::fs::create_dir_all(path)
                } else {
                    std::fs::create_dir(path)
                };
                match r {
                    Ok(()) => done,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(EffectError::NotFound(
                            Path::new(path)
                                .parent()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                        ))
                    }
                    Err(e) => Err(io_failed(path, &e)),
                }
            }
            Effect::RemoveDir { path } => match std::fs::remove_dir(path) {
                Ok(()) => done,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => done,
                Err(e) => Err(io_failed(path, &e)),
            },
            Effect::CreateImage {
                path,
                format,
                size_bytes,
                like,
            } => {
                let (format, options) = match like {
                    Some(l) => creation_options(l)?,
                    None => (format.name().to_owned(), Vec::new()),
                };
                let mut cmd = Command::new("qemu-img");
                cmd.args(["create", "-q", "-f", &format]);
                if !options.is_empty() {
                    cmd.args(["-o", &options.join(",")]);
                }
                cmd.arg(path).arg(size_bytes.to_string());
                tool(&mut cmd)?;
                if let Some(l) = like {
                    // The new file takes the old one's owner, group and mode.
                    let meta = std::fs::metadata(l).map_err(|e| io_failed(l, &e))?;
                    let _ = std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()));
                    std::fs::set_permissions(
                        path,
                        std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                    )
                    .map_err(|e| io_failed(path, &e))?;
                }
                done
            }
            Effect::Rebase {
                path,
                backing,
                unsafe_rebase,
            } => {
                // Only the header changes: rewritten here when it can be.
                if *unsafe_rebase {
                    let backing = backing.as_deref().map(Path::new);
                    let set = qcow2_writer::set_backing(Path::new(path), backing);
                    if set.map_err(|e| io_failed(path, &e))? {
                        return done;
                    }
                }
                let mut cmd = Command::new("qemu-img");
                cmd.args(["rebase", "-q"]);
                if *unsafe_rebase {
                    cmd.arg("-u");
                }
                cmd.args(["-f", "qcow2"]);
                match backing {
                    Some(b) => cmd.args(["-F", "qcow2", "-b", b]),
                    None => cmd.args(["-b", ""]),
                };
                cmd.arg(path);
                tool(&mut cmd).map(|_| Outcome::Done)
            }
            Effect::Digest { path, kind, base } => {
                let kept = self.kept_hashes();
                let known = self
                    .copied
                    .remove(path)
                    .or_else(|| self.target_hashes.take(path));
                facts(
                    path,
                    *kind,
                    base.as_ref(),
                    kept.as_ref(),
                    known,
                    &mut self.observer,
                )
            }
            Effect::DigestCopy {
                source,
                into,
                format,
                existing,
                kind,
            } => {
                if !Path::new(source).exists() {
                    return Err(EffectError::NotFound(source.clone()));
                }
                let kept = self.kept_hashes();
                // A new qcow2 image is written and hashed from one read of the source, here.
                if !*existing && *format == ImageFormat::Qcow2 && kind.is_tree() {
                    let copied = self.copy_hashed(source, into, *kind)?;
                    if let Some(hashes) = copied {
                        return facts(into, *kind, None, kept.as_ref(), Some(hashes), &mut None);
                    }
                }
                let mut cmd = Command::new("qemu-img");
                cmd.args(["convert", "-q", "-O", format.name()]);
                if *existing {
                    cmd.arg("-n");
                }
                cmd.arg(source).arg(into);
                if !kind.is_tree() {
                    tool(&mut cmd)?;
                    return facts(into, *kind, None, kept.as_ref(), None, &mut self.observer);
                }
                // qemu-img convert copies while the source is read and hashed beside it: the
                // copy is checked against the recorded digest without reading it back.
                let copying = std::thread::spawn(move || tool(&mut cmd));
                let chain = images::chain_layers(Path::new(source)).map_err(failed);
                let hashes = chain.and_then(|chain| match chain.first() {
                    Some(top) => {
                        hash_observed(Path::new(source), top, *kind, None, &mut self.observer)
                    }
                    None => Err(failed(format!("'{source}': qemu-img shows no image"))),
                });
                let copied = copying
                    .join()
                    .unwrap_or_else(|_| Err(failed("the copy's thread failed")));
                copied?;
                facts(
                    into,
                    *kind,
                    None,
                    kept.as_ref(),
                    Some(hashes?),
                    &mut self.observer,
                )
            }
            Effect::CopyPull {
                export,
                dirty_bitmap,
                into,
                backing,
            } => {
                let session = self.session()?;
                let socket = RunDir::new(&session.run_dir).nbd_socket;
                let (context, dirty) = match dirty_bitmap {
                    Some(bitmap) => (dirty_bitmap_context(bitmap), true),
                    None => (BASE_ALLOCATION.to_owned(), false),
                };
                let mut client = NbdClient::connect_unix(&socket, export, &[context.as_str()])
                    .map_err(failed)?;
                client
                    .set_io_timeout(Some(images::NBD_IO_TIMEOUT))
                    .map_err(failed)?;
                let ranges = select_ranges(&mut client, &context, |flags| {
                    if dirty {
                        flags & STATE_DIRTY != 0
                    } else {
                        flags & STATE_ZERO == 0
                    }
                })
                .map_err(failed)?;
                let total_bytes = ranges
                    .iter()
                    .fold(0u64, |t, (_, len)| t.saturating_add(*len));
                let mut observer = self.observer.take();
                if let Some(o) = observer.as_mut() {
                    o(CopyEvent::Started {
                        export,
                        total_bytes,
                    });
                }
                let report = images::store_extents_observed(
                    &mut client,
                    &ranges,
                    Path::new(into),
                    backing.as_deref().map(Path::new),
                    &mut |bytes| {
                        if let Some(o) = observer.as_mut() {
                            o(CopyEvent::Copied(bytes));
                        }
                    },
                );
                let _ = client.disconnect();
                if let (Some(o), Ok(r)) = (observer.as_mut(), &report) {
                    o(CopyEvent::Finished {
                        export,
                        bytes_copied: r.copy.bytes_copied,
                        ranges: r.copy.ranges as u64,
                    });
                }
                self.observer = observer;
                if let Some(hashes) = report.map_err(failed)?.hashes {
                    self.copied.insert(into.clone(), hashes);
                }
                done
            }
            Effect::Rename { from, to, replace } => {
                if !Path::new(from).exists() {
                    return Err(EffectError::NotFound(from.clone()));
                }
                if !replace && Path::new(to).exists() {
                    return Err(failed(format!("'{to}' exists")));
                }
                std::fs::rename(from, to).map_err(|e| io_failed(from, &e))?;
                sync_dir_of(Path::new(to));
                done
            }
            Effect::Sync { path } => {
                let f = std::fs::File::open(path).map_err(|e| io_failed(path, &e))?;
                f.sync_all().map_err(|e| io_failed(path, &e))?;
                sync_dir_of(Path::new(path));
                done
            }
            Effect::Remove { path } => match std::fs::remove_file(path) {
                Ok(()) => {
                    sync_dir_of(Path::new(path));
                    done
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => done,
                Err(e) => Err(io_failed(path, &e)),
            },
            Effect::Exists { path } => Ok(Outcome::Exists(Path::new(path).exists())),
            Effect::PutRecord(b) => {
                self.records_changing();
                let store = self.store().ok_or_else(|| failed("no store"))?;
                let r = store.write_entry(Collection::Backups, &b.uuid, &b.format());
                self.records_failed |= r.is_err();
                r.map(|_| Outcome::Done).map_err(failed)
            }
            Effect::DeleteRecord { uuid } => {
                self.records_changing();
                let store = self.store().ok_or_else(|| failed("no store"))?;
                let r = store.remove_entry(Collection::Backups, uuid);
                self.records_failed |= r.is_err();
                r.map(|_| Outcome::Done).map_err(failed)
            }
            Effect::SetDefaultTarget(t) => {
                let store = self.store().ok_or_else(|| failed("no store"))?;
                let text = t.as_deref().unwrap_or("");
                write_atomic(store.dir(), DEFAULT_TARGET_FILE, text.as_bytes())
                    .map(|()| Outcome::Done)
                    .map_err(failed)
            }
            Effect::PutJournal(j) => {
                let store = self.store().ok_or_else(|| failed("no store"))?;
                write_atomic(store.dir(), MANAGED_JOURNAL_FILE, j.format().as_bytes())
                    .map(|()| Outcome::Done)
                    .map_err(failed)
            }
            Effect::ClearJournal => {
                let store = self.store().ok_or_else(|| failed("no store"))?;
                let path = store.dir().join(MANAGED_JOURNAL_FILE);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        sync_dir_of(&path);
                        done
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => done,
                    Err(e) => Err(io_failed(&path.display().to_string(), &e)),
                }
            }
            Effect::DomainExists { name } => {
                let store = Store::open(&self.store_root).map_err(failed)?;
                let exists = store.list_domains().map_err(failed)?.contains(name);
                Ok(Outcome::Exists(exists))
            }
            Effect::DefineDomain { name, disks } => {
                let store = Store::open(&self.store_root).map_err(failed)?;
                let specs: Vec<String> = disks
                    .iter()
                    .map(|(d, p, f)| format!("{d}={p},format={}", f.name()))
                    .collect();
                crate::domains::define(&store, name, &specs, None)
                    .map(|_| Outcome::Done)
                    .map_err(failed)
            }
            Effect::Domain(request) => {
                let session = self.session()?;
                let reply = session
                    .call(request.clone())
                    .map_err(|e| EffectError::Domain(e.to_string()))?;
                // A job that ended while no vbackup followed it was concluded by an earlier
                // session: the host's record of the last finished job answers for it.
                if let (
                    Request::JobStats {
                        completed: true, ..
                    },
                    Reply::Stats(None),
                ) = (request, &reply)
                {
                    let dir = session.driver.effects().store().dir().to_owned();
                    return Ok(Outcome::Reply(Reply::Stats(recorded_completion(&dir))));
                }
                Ok(Outcome::Reply(reply))
            }
        }
    }
}
