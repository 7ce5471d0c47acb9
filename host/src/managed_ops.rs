//! The managed-backup commands on this host, one function each: they find the domain a backup
//! belongs to, build the request (the `<domainbackup>` aligned with the domain, the checkpoint,
//! the disks an overwrite replaces), ask the core's managed-backup machine through
//! [`ManagedHost`] and return its typed answer. Nothing here prints.
//!
//! Contract: every rule of managed backups is the machine's; the only checks made here name a
//! missing chain image before anything starts, and refuse an overwrite of a running domain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vbackup_core::backup::{BackupMode, BackupSpec};
use vbackup_core::catalogue::{
    BackupImage, BackupListFilter, Catalogue, CatalogueError, ManagedBackup, validate_uuid,
};
use vbackup_core::error::{Error as EngineError, RequestError};
use vbackup_core::managed::{
    CreateRequest, DiskVerdict, Journal, Managed, ManagedError, ManagedReply, ManagedRequest,
    RestoreRequest, RestoreTarget, RestoredDisk,
};
use vbackup_core::xml::{
    BackupDef, BackupDisk, BackupModeAttr, BackupStoreDef, DiskBackup, Origin, align_backup,
};
use vbackup_qemu::store::{DomainStore, Store, StoreError};

use crate::domains::{daemon_running, esc};
use crate::error::Error;
use crate::jobs::{checkpoint_for_backup, parse_new_checkpoint};
use crate::layout::{MANAGED_JOURNAL_FILE, domain_dir};
use crate::managed_runtime::{CopyObserver, ManagedHost, load_machine};
use crate::session::{self, Attachment, Loaded};

/// The machine of a locked domain, rebuilt from its store (a damaged record affects only
/// itself: the intact backups load).
pub fn machine(store: &DomainStore) -> Result<Managed, Error> {
    load_machine(store)
}

/// The catalogue of a locked domain.
pub fn catalogue(store: &DomainStore) -> Result<Catalogue, Error> {
    Ok(machine(store)?.catalogue().clone())
}

/// The uuid of a managed backup of the domain in `dir` that is started but not recorded yet.
pub fn pending_uuid(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(MANAGED_JOURNAL_FILE)).ok()?;
    match Journal::parse(&text).ok()? {
        Journal::Create(p) => Some(p.uuid),
        _ => None,
    }
}

/// The uuid of a managed backup of domain `name` that is started but not recorded yet (read
/// without the domain's lock).
pub fn pending_backup(store: &Store, name: &str) -> Option<String> {
    pending_uuid(&domain_dir(store.root(), name))
}

/// The domain holding backup `uuid` (with `damaged`, also as a damaged record), locked, with
/// its machine. A domain another vbackup holds is skipped, so one running backup does not
/// block lookups in the others; it is named if the backup is found nowhere else.
fn locate(store: &Store, uuid: &str, damaged: bool) -> Result<(DomainStore, Managed), Error> {
    validate_uuid(uuid)?;
    let mut busy = Vec::new();
    for name in store.list_domains()? {
        let ds = match store.lock_domain(&name) {
            Ok(ds) => ds,
            Err(StoreError::Locked { .. }) => {
                busy.push(name);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let m = machine(&ds)?;
        let is_damaged = || m.damaged().iter().any(|d| d.uuid.as_deref() == Some(uuid));
        if m.catalogue().get(uuid).is_some() || (damaged && is_damaged()) {
            return Ok((ds, m));
        }
    }
    Err(Error::Other(if busy.is_empty() {
        format!("Domain backup not found: no backup with uuid '{uuid}'")
    } else {
        format!(
            "Domain backup not found: no backup with uuid '{uuid}' (domains busy with another vbackup command, not searched: {})",
            busy.join(", ")
        )
    }))
}

/// The domain holding backup `uuid`, intact or with a damaged record.
pub fn find_domain(store: &Store, uuid: &str) -> Result<String, Error> {
    Ok(locate(store, uuid, true)?.0.name().to_owned())
}

/// Backup `uuid` and the catalogue it is in (for its children).
pub fn find(store: &Store, uuid: &str) -> Result<(ManagedBackup, Catalogue), Error> {
    let (_ds, m) = locate(store, uuid, false)?;
    let cat = m.catalogue().clone();
    let b = cat.get(uuid).cloned();
    Ok((
        b.ok_or_else(|| CatalogueError::NotFound(uuid.to_owned()))?,
        cat,
    ))
}

/// Asks the managed-backup machine of `loaded`'s domain; its answer and catalogue after.
fn ask(
    store: &Store,
    loaded: Loaded,
    request: ManagedRequest,
) -> Result<(ManagedReply, Catalogue), Error> {
    ask_observed(store, loaded, request, None)
}

/// [`ask`], telling `observer` how reads and copies progress.
fn ask_observed(
    store: &Store,
    loaded: Loaded,
    request: ManagedRequest,
    observer: Option<CopyObserver>,
) -> Result<(ManagedReply, Catalogue), Error> {
    ask_host(ManagedHost::open(store, loaded)?, request, observer)
}

/// [`ask_observed`] of a host opened already.
fn ask_host(
    mut host: ManagedHost,
    request: ManagedRequest,
    observer: Option<CopyObserver>,
) -> Result<(ManagedReply, Catalogue), Error> {
    if let Some(o) = observer {
        host.observe_copies(o);
    }
    let answer = host.run(request);
    let catalogue = host.machine().catalogue().clone();
    host.close()?;
    Ok((answer??, catalogue))
}

fn unexpected(what: &str) -> Error {
    Error::Other(format!("unexpected answer to {what}"))
}

/// The first of `images` whose file is gone.
pub fn missing_image(images: &[BackupImage]) -> Option<&BackupImage> {
    images.iter().find(|i| !Path::new(&i.path).exists())
}

/// A domain's catalogue as listed: the machine holds its backups and damaged records.
pub struct Listing {
    /// The backups and damaged records.
    pub machine: Managed,
    /// A backup started but not recorded yet, and whether its job runs.
    pub pending: Option<(String, bool)>,
}

/// What `backup-list` lists: only full backups, only the latest backup's chain, or all.
pub fn list_filter(full: bool, latest: bool) -> BackupListFilter {
    match (full, latest) {
        (true, _) => BackupListFilter::Full,
        (_, true) => BackupListFilter::LatestChain,
        _ => BackupListFilter::All,
    }
}

/// The managed backups of domain `name`.
pub fn list(store: &Store, name: &str) -> Result<Listing, Error> {
    let loaded = session::load(store, name)?;
    let pending = pending_uuid(loaded.store.dir()).map(|u| (u, loaded.journal.is_some()));
    Ok(Listing {
        machine: machine(&loaded.store)?,
        pending,
    })
}

/// What `backup-create` was asked.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The `<domainbackup>` document (default: every disk into the default target).
    pub xml: Option<String>,
    /// The checkpoint's name (default: the backup's uuid).
    pub checkpoint: Option<String>,
    /// The backup this one is incremental to.
    pub parent: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Read the disks over NBD instead of letting QEMU push them.
    pub pull: bool,
    /// Wait for a push backup to finish and record it.
    pub wait: bool,
}

/// A backup ready to start: [`Create::run`] starts it.
pub struct Create {
    /// The new backup's uuid.
    pub uuid: String,
    /// A pull's exports, as NBD URIs (empty for a push).
    pub export_uris: Vec<String>,
    host: ManagedHost,
    request: CreateRequest,
}

impl Create {
    /// Reports the progress of a pull's copies to `observer`.
    pub fn observe_copies(&mut self, observer: CopyObserver) {
        self.host.observe_copies(observer);
    }

    /// Starts the backup: `Started` (a push not waited for) or `Created`.
    pub fn run(mut self) -> Result<ManagedReply, Error> {
        let answer = self
            .host
            .run(ManagedRequest::Create(Box::new(self.request)));
        self.host.close()?;
        Ok(answer??)
    }
}

/// Refuses an incremental on `parent` when an image of `disk` in its chain is gone: the new
/// backup could never be restored.
fn check_chain_images(cat: &Catalogue, parent: &str, disk: &str) -> Result<(), Error> {
    for b in cat.chain(parent)? {
        if let Some(img) = b.image(disk)
            && !Path::new(&img.path).exists()
        {
            return Err(Error::Other(format!(
                "invalid argument: the image of disk '{disk}' of backup '{}' ('{}') is missing, so a backup built on '{parent}' could never be restored; take a full backup (without --parent)",
                b.uuid, img.path
            )));
        }
    }
    Ok(())
}

/// Prepares a managed backup of domain `name`: the `<domainbackup>` aligned with the domain,
/// every disk incremental from the parent's checkpoint (or full), a checkpoint tracking
/// exactly the disks copied, and push targets the machine chooses unless the document names
/// them.
pub fn prepare_create(store: &Store, name: &str, opts: &CreateOptions) -> Result<Create, Error> {
    let loaded = session::load(store, name)?;
    // The records are read once: this machine checks the parent, then runs the backup.
    let managed = machine(&loaded.store)?;
    let cat = managed.catalogue();
    let uuid = uuid::Uuid::new_v4().to_string();
    let parent = match &opts.parent {
        Some(p) => Some(
            cat.get(p)
                .cloned()
                .ok_or_else(|| CatalogueError::NotFound(p.clone()))?,
        ),
        None => None,
    };
    let from = match &parent {
        Some(p) => Some(p.checkpoint.clone().ok_or_else(|| {
            Error::Other(format!(
                "invalid argument: backup '{}' has no checkpoint to be incremental from",
                p.uuid
            ))
        })?),
        None => None,
    };
    let checkpoint_name = opts.checkpoint.clone().unwrap_or_else(|| uuid.clone());
    let checkpoint_xml = format!(
        "<domaincheckpoint><name>{}</name></domaincheckpoint>",
        esc(&checkpoint_name)
    );
    let mut def = BackupDef::parse(opts.xml.as_deref().unwrap_or("<domainbackup/>"))?;
    if opts.pull {
        def.mode = BackupModeAttr::Pull;
    }
    if def.mode == BackupModeAttr::Pull && loaded.attachment != Attachment::Managed {
        return Err(Error::Other(
            "Requested operation is not supported: managed pull backups read the exports of a managed domain's daemon".into(),
        ));
    }
    def.incremental = from;
    if def.disks.is_empty() {
        def.disks = loaded
            .def
            .disks
            .iter()
            .filter(|d| !d.is_empty() && !d.readonly)
            .map(|d| BackupDisk {
                name: d.target.clone(),
                backup: Some(DiskBackup::default()),
                origin: Origin::default(),
            })
            .collect();
    }
    // The disks whose target the definition names; the others go to the target directory.
    let mut explicit = Vec::new();
    for disk in &mut def.disks {
        let Some(backup) = &mut disk.backup else {
            continue;
        };
        // Every disk is incremental from the parent's checkpoint, or full.
        backup.incremental = None;
        backup.mode = None;
        if let Some(parent) = &parent {
            check_chain_images(cat, &parent.uuid, &disk.name)?;
        }
        if def.mode == BackupModeAttr::Push && backup.store.is_some() {
            explicit.push(disk.name.clone());
        } else if def.mode == BackupModeAttr::Push {
            // A placeholder for alignment; the machine chooses the path.
            backup.store = Some(BackupStoreDef {
                path: format!("/{}.qcow2", disk.name),
                seclabels: Vec::new(),
                encryption: None,
            });
        }
    }
    let aligned = align_backup(&def, &loaded.def, &checkpoint_name)?;
    // The checkpoint tracks exactly the disks the backup copies.
    let checkpoint =
        checkpoint_for_backup(parse_new_checkpoint(&checkpoint_xml)?, &loaded, &aligned)?;
    let mut spec = BackupSpec::from_def(&aligned).map_err(EngineError::from)?;
    for d in &mut spec.disks {
        if !explicit.contains(&d.target)
            && let Some(store) = &mut d.store
            && spec.mode == BackupMode::Push
        {
            store.path = None;
        }
    }
    let mut export_uris = Vec::new();
    if opts.pull {
        // A managed pull is served on the daemon's own NBD server, one export per disk.
        let server = session::daemon_nbd_server(&loaded.store.run_dir());
        export_uris = spec
            .disks
            .iter()
            .filter(|d| d.backup)
            .map(|d| server.export_uri(d.export_name.as_deref().unwrap_or(&d.target)))
            .collect();
    }
    let request = CreateRequest {
        uuid: uuid.clone(),
        checkpoint,
        spec,
        parent: parent.map(|p| p.uuid),
        description: opts.description.clone(),
        target: None,
        wait: opts.wait || opts.pull,
    };
    Ok(Create {
        uuid,
        export_uris,
        host: ManagedHost::with_machine(store, loaded, managed),
        request,
    })
}

/// Concludes domain `name`'s backup in flight (see [`ManagedRequest::Finish`]).
pub fn finish(store: &Store, name: &str, cancel: bool, check: bool) -> Result<ManagedReply, Error> {
    let loaded = session::load(store, name)?;
    let m = machine(&loaded.store)?;
    if m.pending().is_none() && m.journal().is_none() && loaded.journal.is_none() {
        return Err(EngineError::from(RequestError::NoJob).into());
    }
    let host = ManagedHost::with_machine(store, loaded, m);
    Ok(ask_host(host, ManagedRequest::Finish { cancel, check }, None)?.0)
}

/// One disk's outcome of a verification: `Err` says what is wrong with it.
pub type DiskCheck = (String, Result<(), String>);

/// Backup `uuid`'s verification as a result: an error counting the disks that failed.
pub fn verdict(uuid: &str, report: &[DiskCheck]) -> Result<(), Error> {
    match report.iter().filter(|(_, r)| r.is_err()).count() {
        0 => Ok(()),
        failed => Err(Error::Other(format!(
            "operation failed: backup '{uuid}': {failed} disk(s) failed verification"
        ))),
    }
}

/// Checks backup `uuid`'s disks against their recorded digests, naming a missing chain image;
/// `observer` hears how the reads progress.
pub fn verify(
    store: &Store,
    uuid: &str,
    observer: Option<CopyObserver>,
) -> Result<Vec<DiskCheck>, Error> {
    let loaded = session::load(store, &find_domain(store, uuid)?)?;
    let request = ManagedRequest::Verify { uuid: uuid.into() };
    let (answer, cat) = ask_observed(store, loaded, request, observer)?;
    let ManagedReply::Verified { disks, .. } = answer else {
        return Err(unexpected("a verification"));
    };
    let plan = cat.plan_restore(uuid, &[])?;
    let check = |v: &DiskVerdict| match &v.found {
        Ok(found) if *found == v.recorded => Ok(()),
        Ok(found) => Err(format!(
            "content digest {} differs from the recorded {}",
            found.as_str(),
            v.recorded.as_str()
        )),
        Err(e) => {
            let chain = plan.disks.iter().find(|d| d.disk == v.disk);
            match chain.and_then(|d| missing_image(&d.images)) {
                Some(img) => Err(format!("image '{}' of its chain is missing", img.path)),
                None => Err(format!("cannot read it: {e}")),
            }
        }
    };
    Ok(disks.iter().map(|v| (v.disk.clone(), check(v))).collect())
}

/// What a deletion removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The domain.
    pub domain: String,
    /// The backups deleted.
    pub uuids: Vec<String>,
    /// How many backups the domain had.
    pub had: usize,
}

/// Deletes backup `target` (with `with_children` the backups built on it too), or with `all`
/// every backup of domain `target`; with `keep_checkpoints` their checkpoints stay.
pub fn delete(
    store: &Store,
    target: &str,
    with_children: bool,
    all: bool,
    keep_checkpoints: bool,
) -> Result<Deleted, Error> {
    let domain = if all {
        target.to_owned()
    } else {
        find_domain(store, target)?
    };
    let loaded = session::load(store, &domain)?;
    let m = machine(&loaded.store)?;
    let had = m.catalogue().len();
    let request = ManagedRequest::Delete {
        target: (!all).then(|| target.to_owned()),
        with_children,
        keep_checkpoints,
    };
    match ask_host(ManagedHost::with_machine(store, loaded, m), request, None) {
        Ok((ManagedReply::Deleted { uuids }, _)) => Ok(Deleted { domain, uuids, had }),
        Ok(_) => Err(unexpected("a deletion")),
        Err(Error::Managed(ManagedError::Catalogue(e @ CatalogueError::HasChildren { .. }))) => {
            Err(Error::Other(format!(
                "Requested operation is not valid: {e}; delete them too with 'vbackup backup-delete {target} --children', or make each child self-contained first with 'vbackup backup-consolidate CHILD'"
            )))
        }
        Err(Error::Managed(e @ ManagedError::Effect { .. })) => Err(Error::Other(format!(
            "{e}; the deletion is finished by the next managed-backup command of domain '{domain}' (or run it again, with --keep-checkpoints if QEMU cannot be reached)"
        ))),
        Err(e) => Err(e),
    }
}

/// Deletes every backup of a loaded domain through the machine, keeping their checkpoints
/// (for `undefine`, which removes their metadata with the domain); returns the domain, still
/// locked, and how many backups were deleted.
pub fn delete_all_keeping_checkpoints(
    store: &Store,
    loaded: Loaded,
) -> Result<(Loaded, usize), Error> {
    let name = loaded.store.name().to_owned();
    let mut host = ManagedHost::open(store, loaded)?;
    let answer = host.run(ManagedRequest::Delete {
        target: None,
        with_children: true,
        keep_checkpoints: true,
    });
    // Finishing an interrupted operation first may have needed QEMU: the domain is then
    // locked again.
    let loaded = host.into_loaded()?;
    let n = match answer?? {
        ManagedReply::Deleted { uuids } => uuids.len(),
        _ => return Err(unexpected("a deletion")),
    };
    let loaded = match loaded {
        Some(loaded) => loaded,
        None => session::load(store, &name)?,
    };
    Ok((loaded, n))
}

/// Makes backup `uuid` a full backup of its own: the backup after, and whether it changed;
/// `observer` hears how the reads progress.
pub fn consolidate(
    store: &Store,
    uuid: &str,
    observer: Option<CopyObserver>,
) -> Result<(ManagedBackup, bool), Error> {
    let domain = find_domain(store, uuid)?;
    let loaded = session::load(store, &domain)?;
    if loaded.journal.is_some() {
        return Err(Error::Other(format!(
            "Requested operation is not valid: a backup of domain '{domain}' is running; consolidate once it ended"
        )));
    }
    match ask_observed(
        store,
        loaded,
        ManagedRequest::Consolidate { uuid: uuid.into() },
        observer,
    )?
    .0
    {
        ManagedReply::Consolidated { backup, changed } => Ok((*backup, changed)),
        _ => Err(unexpected("a consolidation")),
    }
}

/// `dir` made absolute against the current directory.
pub fn absolute(dir: &Path) -> Result<PathBuf, Error> {
    if dir.is_absolute() {
        return Ok(dir.to_owned());
    }
    let cwd = std::env::current_dir().map_err(Error::io("cannot read the current directory"))?;
    Ok(cwd.join(dir))
}

/// Domain `name`'s default target directory, if one is set.
pub fn default_target(store: &Store, name: &str) -> Result<Option<String>, Error> {
    let loaded = session::load(store, name)?;
    Ok(catalogue(&loaded.store)?
        .default_target()
        .map(str::to_owned))
}

/// Sets domain `name`'s default target to `dir` (created if missing); returns it, canonical.
pub fn set_default_target(store: &Store, name: &str, dir: &Path) -> Result<PathBuf, Error> {
    let loaded = session::load(store, name)?;
    let dir = absolute(dir)?;
    std::fs::create_dir_all(&dir)
        .map_err(Error::io(format!("cannot create '{}'", dir.display())))?;
    let dir = std::fs::canonicalize(&dir).map_err(Error::io(format!("'{}'", dir.display())))?;
    let request = ManagedRequest::SetDefaultTarget(Some(dir.display().to_string()));
    ask(store, loaded, request)?;
    Ok(dir)
}

/// What `backup-restore` was asked.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The backup restored, or with `until` any backup of the chain.
    pub uuid: String,
    /// Restore the chain only up to this backup.
    pub until: Option<String>,
    /// Define a new domain on the restored images.
    pub new_domain: Option<String>,
    /// Directory of the new images.
    pub dir: Option<PathBuf>,
    /// Only these disks (default: every disk of the backup).
    pub disks: Vec<String>,
    /// Replace the domain's own disk images.
    pub overwrite: bool,
}

/// A restore ready to run: [`Restore::run`] carries it out.
pub struct Restore {
    /// The domain the backup belongs to.
    pub domain: String,
    /// With `until`: the backup whose point in time is restored.
    pub chain_backup: Option<String>,
    host: ManagedHost,
    request: RestoreRequest,
}

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The backup whose point in time was restored.
    pub backup: String,
    /// The restored disks.
    pub disks: Vec<RestoredDisk>,
    /// The domain defined on the new images, if any.
    pub defined: Option<String>,
}

impl Restore {
    /// Reports the progress of the restore's reads to `observer`.
    pub fn observe_copies(&mut self, observer: CopyObserver) {
        self.host.observe_copies(observer);
    }

    /// Restores.
    pub fn run(mut self) -> Result<Restored, Error> {
        let answer = self
            .host
            .run(ManagedRequest::Restore(Box::new(self.request)));
        self.host.close()?;
        match answer?? {
            ManagedReply::Restored {
                backup,
                disks,
                domain,
            } => Ok(Restored {
                backup,
                disks,
                defined: domain,
            }),
            _ => Err(unexpected("a restore")),
        }
    }
}

/// Prepares a restore: the target (new images in a directory, or the domain's own disks when
/// it is not running), and a chain with a missing image refused, naming it, before anything
/// is written.
pub fn prepare_restore(store: &Store, opts: &RestoreOptions) -> Result<Restore, Error> {
    let uuid = &opts.uuid;
    let domain = find_domain(store, uuid)?;
    let loaded = session::load(store, &domain)?;
    let target = if opts.overwrite {
        let running = match loaded.attachment {
            Attachment::Managed => daemon_running(&loaded.store.run_dir()),
            Attachment::Attached(_) => true,
        };
        if running || loaded.journal.is_some() {
            return Err(Error::Other(format!(
                "Requested operation is not valid: domain '{domain}' is running; shut it down before overwriting its disks"
            )));
        }
        let disks: BTreeMap<String, String> = loaded
            .def
            .disks
            .iter()
            .filter_map(|d| Some((d.target.clone(), d.layers.first()?.path.clone()?)))
            .collect();
        RestoreTarget::Overwrite { disks }
    } else {
        let Some(dir) = &opts.dir else {
            return Err(Error::Other(
                "invalid argument: give --dir (and --new-domain) or --overwrite".into(),
            ));
        };
        RestoreTarget::NewImages {
            dir: absolute(dir)?.display().to_string(),
            new_domain: opts.new_domain.clone(),
        }
    };
    if let Some(u) = &opts.until {
        validate_uuid(u)?;
    }
    // The records are read once: this machine plans the restore, then runs it.
    let managed = machine(&loaded.store)?;
    let cat = managed.catalogue();
    let chosen: Vec<&str> = opts.disks.iter().map(String::as_str).collect();
    let plan = match &opts.until {
        Some(u) => cat.plan_restore_until(uuid, u, &chosen),
        None => cat.plan_restore(uuid, &chosen),
    };
    let mut chain_backup = None;
    if let Ok(plan) = &plan {
        for d in &plan.disks {
            if let Some(img) = missing_image(&d.images) {
                return Err(Error::Other(format!(
                    "operation failed: backup '{}' cannot be restored: image '{}' of disk '{}' in its chain is missing",
                    plan.backup, img.path, d.disk
                )));
            }
        }
        chain_backup = opts.until.as_ref().map(|_| plan.backup.clone());
    }
    Ok(Restore {
        domain,
        chain_backup,
        host: ManagedHost::with_machine(store, loaded, managed),
        request: RestoreRequest {
            uuid: uuid.clone(),
            until: opts.until.clone(),
            disks: opts.disks.clone(),
            target,
        },
    })
}
