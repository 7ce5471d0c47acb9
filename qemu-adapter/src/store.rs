//! The on-disk store: domain definitions, checkpoint and backup metadata, and the job journal.
//!
//! Layout under the root (default `$XDG_DATA_HOME/vbackup`, else `~/.local/share/vbackup`):
//!
//! ```text
//! domains/<domain>/domain.xml
//! domains/<domain>/checkpoints/<checkpoint>.xml
//! domains/<domain>/backups/<uuid>.xml
//! domains/<domain>/journal.json
//! locks/<domain>.lock
//! run/<domain>/                 (a managed domain's qemu-storage-daemon files, see `qsd`)
//! ```
//!
//! Contract:
//! - Every name that becomes a path component is validated first ([`validate_name`]), so no
//!   domain, checkpoint or backup name can reach outside its directory.
//! - Every write is atomic: the bytes go to a temporary file (a dot-file), which is fsynced,
//!   renamed over the destination, and the destination's directory is fsynced. A crash at any
//!   point leaves either the old or the new content, never a mix. Temporary files live in the
//!   domain's directory, also for the documents of `checkpoints/` and `backups/` (a rename
//!   within one file system may cross directories), so that locking a domain sweeps leftovers
//!   from one small directory and never lists a collection. Leftover temporary files are
//!   ignored by every listing and removed when the domain is next locked.
//! - Every change to a domain goes through a [`DomainStore`], which holds an exclusive advisory
//!   lock (`flock`) on `locks/<domain>.lock` for as long as it lives. A second holder, in this
//!   process or another, gets [`StoreError::Locked`] at once ([`Store::lock_domain`]) or after
//!   waiting a bounded time ([`Store::lock_domain_wait`]). The holder writes its pid and what it
//!   is doing ([`Store::with_operation`]) into the lock file, so the error names it
//!   ([`LockHolder`]). Lock files live outside the domain directory so removing a domain never
//!   removes a lock someone else may be waiting on.
//! - Readers need no lock: [`Store::read_domain`] takes a [`DomainSnapshot`] of the files as
//!   they are. Each file is whole (writes are atomic renames); to see several files from one
//!   moment (a checkpoint deletion rewrites the children and the current checkpoint), the
//!   snapshot is read again until two reads agree, a bounded number of times. A snapshot never
//!   changes anything, not even leftover temporary files.
//! - Listings are in byte order of the names.
//! - Every failure is a [`StoreError`] naming the operation and the path.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest accepted name, in bytes. File names are limited to 255 bytes; the margin leaves
/// room for the `.xml` suffix and the temporary-file decoration.
pub const MAX_NAME_BYTES: usize = 200;

/// Marker inside temporary file names (`.<final name>.tmp-<pid>-<n>`).
const TEMP_MARKER: &str = ".tmp-";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name that cannot be used as a path component.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What the name names (`domain`, `checkpoint`, `backup`).
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Another holder (this process or another one) has the domain locked.
    #[error("domain {domain:?} is locked by {}", holder_text(.holder))]
    Locked {
        /// The domain.
        domain: String,
        /// Who holds it, when the lock file says.
        holder: Option<LockHolder>,
    },
    /// Neither `XDG_DATA_HOME` nor `HOME` is set, so there is no default location.
    #[error("no store location: set XDG_DATA_HOME or HOME, or pass a state directory")]
    NoDefaultRoot,
    /// A stored file is not UTF-8.
    #[error("{path} is not valid UTF-8")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("store {op} failed on {path}: {source}")]
    Io {
        /// The operation (`write`, `rename`, `fsync`, `read`, `lock`...).
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Who holds a domain's lock, as its lock file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The holder's process id.
    pub pid: u32,
    /// What it is doing (its command line, for vbackup).
    pub operation: String,
}

fn holder_text(holder: &Option<LockHolder>) -> String {
    match holder {
        Some(h) if h.operation.is_empty() => format!("vbackup process {}", h.pid),
        Some(h) => format!("vbackup process {} ({})", h.pid, h.operation),
        None => "another vbackup operation".to_owned(),
    }
}

impl LockHolder {
    /// Parses a lock file's content: the pid on the first line, the operation on the second.
    /// `None` for an empty or partly written file.
    pub fn parse(text: &str) -> Option<LockHolder> {
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let operation = lines.next().unwrap_or("").trim().to_owned();
        Some(LockHolder { pid, operation })
    }
}

/// How often [`Store::lock_domain_wait`] tries again.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// How many times [`Store::read_domain`] reads before it settles for the last read.
const SNAPSHOT_ATTEMPTS: usize = 20;

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Checks that `name` can be used as one path component: not empty, at most
/// [`MAX_NAME_BYTES`] bytes, no `/`, no NUL or other control character, and not starting with
/// `.` (which excludes `.` and `..` and keeps names apart from temporary files).
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), StoreError> {
    let reject = |reason| {
        Err(StoreError::InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return reject("empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return reject("too long");
    }
    if name.starts_with('.') {
        return reject("starts with '.'");
    }
    if name.contains('/') {
        return reject("contains '/'");
    }
    if name.chars().any(char::is_control) {
        return reject("contains a control character");
    }
    Ok(())
}

/// The default store root: `$XDG_DATA_HOME/vbackup` when that is set to an absolute path, else
/// `$HOME/.local/share/vbackup` (the XDG base directory rule). Takes the variables as
/// arguments so the rule can be tested; [`default_root_from_env`] reads them.
pub fn default_root(
    xdg_data_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Result<PathBuf, StoreError> {
    if let Some(xdg) = xdg_data_home.map(Path::new).filter(|p| p.is_absolute()) {
        return Ok(xdg.join("vbackup"));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => Ok(Path::new(home).join(".local/share/vbackup")),
        None => Err(StoreError::NoDefaultRoot),
    }
}

/// [`default_root`] with the process environment.
pub fn default_root_from_env() -> Result<PathBuf, StoreError> {
    let xdg = std::env::var_os("XDG_DATA_HOME");
    let home = std::env::var_os("HOME");
    default_root(xdg.as_deref(), home.as_deref())
}

/// A store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    operation: String,
}

impl Store {
    /// Opens (creating if needed) the store at `root`. The operation recorded in lock files is
    /// empty until [`Store::with_operation`] sets it.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for dir in [root.join("domains"), root.join("locks")] {
            fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        }
        Ok(Store {
            root,
            operation: String::new(),
        })
    }

    /// The same store; locks taken through it record `operation` (one line) as what their
    /// holder does.
    pub fn with_operation(mut self, operation: &str) -> Store {
        self.operation = operation.replace(['\n', '\r'], " ");
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of the domains that have a directory, sorted.
    pub fn list_domains(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("domains");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
            let entry = entry.map_err(io_error("list", &dir))?;
            let is_dir = entry
                .file_type()
                .map_err(io_error("stat", &entry.path()))?
                .is_dir();
            if let (true, Some(name)) = (is_dir, entry.file_name().to_str())
                && validate_name("domain", name).is_ok()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Locks domain `name` exclusively and returns its handle. Fails at once with
    /// [`StoreError::Locked`] if another handle holds it. The domain's directories are created
    /// if missing, and temporary files left by an interrupted write are removed.
    pub fn lock_domain(&self, name: &str) -> Result<DomainStore, StoreError> {
        validate_name("domain", name)?;
        let lock_path = self.root.join("locks").join(format!("{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open lock", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|t| LockHolder::parse(&t));
                return Err(StoreError::Locked {
                    domain: name.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    op: "lock",
                    path: lock_path,
                    source,
                });
            }
        }
        // Name the holder for whoever finds the domain locked. Not fsynced: it only matters
        // while this process lives.
        let mut lock = lock;
        let note = format!("{}\n{}\n", std::process::id(), self.operation);
        lock.set_len(0)
            .and_then(|()| lock.write_all(note.as_bytes()))
            .map_err(io_error("write lock", &lock_path))?;
        let domain = DomainStore {
            name: name.to_owned(),
            dir: self.root.join("domains").join(name),
            _lock: lock,
        };
        domain.remove_leftover_temp_files()?;
        Ok(domain)
    }
}

impl Store {
    /// [`Store::lock_domain`], but while another holder has the lock, tries again until
    /// `timeout` has passed; then fails with [`StoreError::Locked`] naming the holder.
    pub fn lock_domain_wait(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<DomainStore, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lock_domain(name) {
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(left.min(LOCK_POLL));
                }
                other => return other,
            }
        }
    }

    /// Reads domain `name`'s files without locking (see the module contract); `None` if the
    /// domain has no directory.
    pub fn read_domain(&self, name: &str) -> Result<Option<DomainSnapshot>, StoreError> {
        validate_name("domain", name)?;
        let dir = self.root.join("domains").join(name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut last = DomainSnapshot::read(name, &dir)?;
        for _ in 1..SNAPSHOT_ATTEMPTS {
            let again = DomainSnapshot::read(name, &dir)?;
            if again == last {
                break;
            }
            last = again;
        }
        Ok(Some(last))
    }
}

/// A domain's files as read without the lock: every top-level file of its directory and its
/// checkpoint documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSnapshot {
    /// The domain's name.
    pub name: String,
    /// The domain's directory.
    pub dir: PathBuf,
    /// Top-level files by name (`domain.xml`, `journal.json`...); temporary files and files
    /// that are not UTF-8 are left out.
    pub files: BTreeMap<String, String>,
    /// `checkpoints/<name>.xml` as `(name, xml)`, sorted by name.
    pub checkpoints: Vec<(String, String)>,
}

impl DomainSnapshot {
    fn read(name: &str, dir: &Path) -> Result<DomainSnapshot, StoreError> {
        let mut files = BTreeMap::new();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(DomainSnapshot {
                    name: name.to_owned(),
                    dir: dir.to_owned(),
                    files,
                    checkpoints: Vec::new(),
                });
            }
            Err(e) => return Err(io_error("list", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("list", dir))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            // A file removed between listing and reading is simply absent from this read.
            match fs::read(entry.path()) {
                Ok(bytes) => {
                    if let Ok(text) = String::from_utf8(bytes) {
                        files.insert(file_name, text);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::IsADirectory
                    ) => {}
                Err(e) => return Err(io_error("read", &entry.path())(e)),
            }
        }
        let cp_dir = dir.join(Collection::Checkpoints.dir_name());
        let mut checkpoints = Vec::new();
        if let Ok(entries) = fs::read_dir(&cp_dir) {
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some(cp) = file_name.to_str().and_then(|n| n.strip_suffix(".xml")) else {
                    continue;
                };
                if validate_name("checkpoint", cp).is_err() {
                    continue;
                }
                if let Ok(text) = fs::read_to_string(entry.path()) {
                    checkpoints.push((cp.to_owned(), text));
                }
            }
        }
        checkpoints.sort();
        Ok(DomainSnapshot {
            name: name.to_owned(),
            dir: dir.to_owned(),
            files,
            checkpoints,
        })
    }

    /// A top-level file's content.
    pub fn file(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }
}

/// Exclusive access to one domain's files. The lock is released when this is dropped.
#[derive(Debug)]
pub struct DomainStore {
    name: String,
    dir: PathBuf,
    _lock: File,
}

/// Which metadata directory a named document lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `checkpoints/<name>.xml`.
    Checkpoints,
    /// `backups/<uuid>.xml`.
    Backups,
}

impl Collection {
    fn dir_name(self) -> &'static str {
        match self {
            Collection::Checkpoints => "checkpoints",
            Collection::Backups => "backups",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Collection::Checkpoints => "checkpoint",
            Collection::Backups => "backup",
        }
    }
}

impl DomainStore {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's directory (`domains/<name>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run directory of the domain's managed qemu-storage-daemon (`run/<name>`). It is
    /// kept apart from `domains/<name>` so undefining a domain never pulls sockets from under a
    /// running daemon. Not created here.
    pub fn run_dir(&self) -> PathBuf {
        let root = self.dir.parent().and_then(Path::parent);
        root.map_or_else(|| PathBuf::from("run"), |r| r.join("run"))
            .join(&self.name)
    }

    /// Whether `domain.xml` exists.
    pub fn is_defined(&self) -> bool {
        self.dir.join("domain.xml").is_file()
    }

    /// Reads `domain.xml`; `None` if the domain is not defined.
    pub fn read_domain_xml(&self) -> Result<Option<String>, StoreError> {
        read_optional(&self.dir.join("domain.xml"))
    }

    /// Atomically writes `domain.xml`.
    pub fn write_domain_xml(&self, xml: &str) -> Result<(), StoreError> {
        write_atomic(&self.dir, "domain.xml", xml.as_bytes())
    }

    /// Reads `journal.json`; `None` if there is none.
    pub fn read_journal(&self) -> Result<Option<String>, StoreError> {
        read_optional(&self.dir.join("journal.json"))
    }

    /// Atomically writes `journal.json`.
    pub fn write_journal(&self, json: &str) -> Result<(), StoreError> {
        write_atomic(&self.dir, "journal.json", json.as_bytes())
    }

    /// Removes `journal.json` durably (the job it journaled has ended); returns whether it
    /// existed.
    pub fn remove_journal(&self) -> Result<bool, StoreError> {
        remove_durably(&self.dir, "journal.json")
    }

    /// Atomically writes `<collection>/<name>.xml`.
    pub fn write_entry(
        &self,
        collection: Collection,
        name: &str,
        xml: &str,
    ) -> Result<(), StoreError> {
        self.stage_entry(collection, name, xml)?.commit()
    }

    /// Reads `<collection>/<name>.xml`; `None` if it does not exist.
    pub fn read_entry(
        &self,
        collection: Collection,
        name: &str,
    ) -> Result<Option<String>, StoreError> {
        validate_name(collection.kind(), name)?;
        read_optional(
            &self
                .dir
                .join(collection.dir_name())
                .join(format!("{name}.xml")),
        )
    }

    /// Removes `<collection>/<name>.xml` durably; returns whether it existed.
    pub fn remove_entry(&self, collection: Collection, name: &str) -> Result<bool, StoreError> {
        validate_name(collection.kind(), name)?;
        remove_durably(
            &self.dir.join(collection.dir_name()),
            &format!("{name}.xml"),
        )
    }

    /// Names in a collection, sorted; temporary files and foreign files are skipped.
    pub fn list_entries(&self, collection: Collection) -> Result<Vec<String>, StoreError> {
        let dir = self.dir.join(collection.dir_name());
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &dir))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".xml")) else {
                continue;
            };
            if validate_name(collection.kind(), name).is_ok() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every document of a collection as `(name, xml)`, sorted by name.
    pub fn load_entries(
        &self,
        collection: Collection,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut loaded = Vec::new();
        for name in self.list_entries(collection)? {
            // An entry removed between listing and reading cannot happen under the lock, but a
            // hand-edited store might; skip it rather than fail the whole load.
            if let Some(xml) = self.read_entry(collection, &name)? {
                loaded.push((name, xml));
            }
        }
        Ok(loaded)
    }

    /// Removes the domain's whole directory (`undefine`). The lock stays held until the handle
    /// is dropped.
    pub fn remove_all(&self) -> Result<(), StoreError> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("remove", &self.dir)(e)),
        }
        match self.dir.parent() {
            Some(parent) => fsync_dir(parent),
            None => Ok(()),
        }
    }

    /// Writes `bytes` to a temporary file in the domain's directory and fsyncs it, but does
    /// not rename it to `<collection>/<name>.xml` yet: [`StagedWrite::commit`] finishes the write. This is the first
    /// half of every write, exposed so a crash between the halves can be tested.
    pub fn stage_entry(
        &self,
        collection: Collection,
        name: &str,
        xml: &str,
    ) -> Result<StagedWrite, StoreError> {
        validate_name(collection.kind(), name)?;
        let dir = self.dir.join(collection.dir_name());
        let file_name = format!("{name}.xml");
        let stem = format!("{}.{file_name}", collection.dir_name());
        StagedWrite::create_in(&self.dir, &stem, &dir, &file_name, xml.as_bytes())
    }

    fn remove_leftover_temp_files(&self) -> Result<(), StoreError> {
        // Temporary files are all made in the domain's directory (see the module contract);
        // older stores' leftovers inside the collections are dot-files no listing reads.
        let dir = &self.dir;
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("list", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("list", dir))?;
            let name = entry.file_name();
            let is_temp = name
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.contains(TEMP_MARKER));
            if is_temp {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_error("remove", &path))?;
            }
        }
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| StoreError::NotUtf8 {
                path: path.to_owned(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

/// Removes `dir/file_name` and fsyncs `dir`; `Ok(false)` if there was nothing to remove.
fn remove_durably(dir: &Path, file_name: &str) -> Result<bool, StoreError> {
    let path = dir.join(file_name);
    match fs::remove_file(&path) {
        Ok(()) => {
            fsync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("remove", &path)(e)),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// Creates `dir` (and missing parents) so that the new entries are durable: each created
/// directory's parent is fsynced. `depth` bounds the walk up the tree.
fn ensure_dir(dir: &Path, depth: usize) -> Result<(), StoreError> {
    const MAX_DEPTH: usize = 64;
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent
        && depth < MAX_DEPTH
    {
        ensure_dir(parent, depth + 1)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another process (of another domain) may have created a shared parent meanwhile.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(io_error("create directory", dir)(e)),
    }
    match parent {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

/// Writes `bytes` to `dir/file_name` atomically (see the module contract).
pub fn write_atomic(dir: &Path, file_name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    StagedWrite::create_in(dir, file_name, dir, file_name, bytes)?.commit()
}

/// A write whose temporary file is complete and durable but not yet renamed into place.
/// Dropping it without [`StagedWrite::commit`] removes the temporary file.
#[derive(Debug)]
pub struct StagedWrite {
    dir: PathBuf,
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedWrite {
    /// Stages `dir/file_name` in `stage_dir` (on the same file system) as
    /// `.<stem>.tmp-<pid>-<n>`.
    fn create_in(
        stage_dir: &Path,
        stem: &str,
        dir: &Path,
        file_name: &str,
        bytes: &[u8],
    ) -> Result<StagedWrite, StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        ensure_dir(dir, 0)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = stage_dir.join(format!(".{stem}{TEMP_MARKER}{}-{n}", std::process::id()));
        let staged = StagedWrite {
            dir: dir.to_owned(),
            temp,
            target: dir.join(file_name),
            committed: false,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged.temp)
            .map_err(io_error("create", &staged.temp))?;
        file.write_all(bytes)
            .map_err(io_error("write", &staged.temp))?;
        file.sync_all().map_err(io_error("fsync", &staged.temp))?;
        Ok(staged)
    }

    /// The temporary file.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Renames the temporary file over the target and fsyncs the directory.
    pub fn commit(mut self) -> Result<(), StoreError> {
        fs::rename(&self.temp, &self.target).map_err(io_error("rename", &self.target))?;
        self.committed = true;
        fsync_dir(&self.dir)
    }
}

impl Drop for StagedWrite {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a temporary file that survives is removed at the next lock.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_rejected() {
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "nul\0", "tab\t", "/abs",
        ] {
            assert!(validate_name("domain", bad).is_err(), "{bad:?} accepted");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(validate_name("domain", &long).is_err());
        for good in [
            "vm1",
            "web-01",
            "c 1",
            "ä",
            "a..b",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            assert!(validate_name("domain", good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn a_second_lock_fails_at_once_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path())
            .unwrap()
            .with_operation("backup-begin vm --wait");
        let held = store.lock_domain("vm").unwrap();
        let started = Instant::now();
        let err = store.lock_domain("vm").unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        let StoreError::Locked { domain, holder } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(domain, "vm");
        assert_eq!(
            holder.as_ref(),
            Some(&LockHolder {
                pid: std::process::id(),
                operation: "backup-begin vm --wait".to_owned()
            })
        );
        assert_eq!(
            err.to_string(),
            format!(
                "domain \"vm\" is locked by vbackup process {} (backup-begin vm --wait)",
                std::process::id()
            )
        );
        drop(held);
        assert!(store.lock_domain("vm").is_ok());
    }

    #[test]
    fn waiting_for_a_lock_gets_it_when_released_and_gives_up_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let held = store.lock_domain("vm").unwrap();
        let err = store
            .lock_domain_wait("vm", Duration::from_millis(120))
            .unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let started = Instant::now();
        let got = store.lock_domain_wait("vm", Duration::from_secs(10));
        assert!(got.is_ok(), "{got:?}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        releaser.join().unwrap();
    }

    #[test]
    fn a_snapshot_reads_a_locked_domain_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read_domain("vm").unwrap(), None);
        let held = store.lock_domain("vm").unwrap();
        held.write_domain_xml("<domain/>").unwrap();
        held.write_journal("{}").unwrap();
        held.write_entry(Collection::Checkpoints, "c1", "<c1/>")
            .unwrap();
        // An interrupted write's leftover is neither read nor removed by a reader.
        let staged = held
            .stage_entry(Collection::Checkpoints, "c2", "<c2/>")
            .unwrap();
        let temp = staged.temp_path().to_owned();
        std::mem::forget(staged);
        let snap = store.read_domain("vm").unwrap().unwrap();
        assert_eq!(snap.file("domain.xml"), Some("<domain/>"));
        assert_eq!(snap.file("journal.json"), Some("{}"));
        assert_eq!(snap.checkpoints, [("c1".to_owned(), "<c1/>".to_owned())]);
        assert!(temp.is_file());
        drop(held);
    }

    #[test]
    fn default_root_prefers_absolute_xdg_data_home() {
        let xdg = OsStr::new("/data");
        let home = OsStr::new("/home/u");
        assert_eq!(
            default_root(Some(xdg), Some(home)).unwrap(),
            Path::new("/data/vbackup")
        );
        // A relative XDG_DATA_HOME is invalid per the XDG rules and is ignored.
        assert_eq!(
            default_root(Some(OsStr::new("rel")), Some(home)).unwrap(),
            Path::new("/home/u/.local/share/vbackup")
        );
        assert!(matches!(
            default_root(None, None),
            Err(StoreError::NoDefaultRoot)
        ));
    }
}
