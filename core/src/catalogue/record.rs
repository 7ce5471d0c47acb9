//! The record of one managed backup and its per-disk images.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::CatalogueError;
use crate::model::ImageFormat;

/// Whether a backup holds everything or only what changed since its parent (its serde form,
/// `full` or `incremental`, serves caches of parsed records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// A complete copy; the root of a chain.
    Full,
    /// The changes since the parent backup, as qcow2 overlays of the parent's images.
    Incremental,
}

impl BackupKind {
    /// The XML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }

    /// Reads the XML spelling.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "full" => Some(Self::Full),
            "incremental" => Some(Self::Incremental),
            _ => None,
        }
    }
}

/// A content digest of a disk's logical (guest-visible) content: a [`DigestKind`] prefix and 64
/// lowercase hex digits. Two images with the same guest-visible bytes have the same digest of
/// one kind, whatever their format, allocation or backing chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// How a [`Digest`] is computed from the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DigestKind {
    /// `sha256:`: SHA-256 of the whole content, byte by byte. Computing it reads everything.
    Sha256,
    /// `sha256-tree:`: SHA-256 of the content's size (8 bytes, little-endian) followed by the
    /// SHA-256 of each [`TREE_BLOCK_BYTES`] block in order (the last one as long as what
    /// remains). A block known to be zero needs no read, and a block an incremental image
    /// shares with its parent takes the parent's block hash, so computing it costs what
    /// changed. Records made before [`DigestKind::Blake3Tree`] keep it.
    Sha256Tree,
    /// `blake3-tree:`: as [`DigestKind::Sha256Tree`], with BLAKE3 for the block hashes and
    /// for the hash of the size and block hashes. BLAKE3 hashes several times faster than
    /// SHA-256 on one core, so that hashing a full image keeps up with writing it. Every new
    /// backup image gets this kind ([`DigestKind::NEW_IMAGES`]); older records keep theirs.
    Blake3Tree,
}

impl DigestKind {
    /// The kind of the digest of every new backup image.
    pub const NEW_IMAGES: Self = Self::Blake3Tree;

    /// Every kind, the longest prefix first.
    const ALL: [Self; 3] = [Self::Sha256Tree, Self::Blake3Tree, Self::Sha256];

    /// The text before the hex digits.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256:",
            Self::Sha256Tree => "sha256-tree:",
            Self::Blake3Tree => "blake3-tree:",
        }
    }

    /// Whether it is computed from block hashes ([`super::BlockHashes`]).
    pub fn is_tree(self) -> bool {
        matches!(self, Self::Sha256Tree | Self::Blake3Tree)
    }
}

/// Block size of the tree digests ([`DigestKind::is_tree`]).
pub const TREE_BLOCK_BYTES: u64 = 1 << 20;

impl Digest {
    /// Parses `sha256:`, `sha256-tree:` or `blake3-tree:` followed by 64 lowercase hex
    /// digits.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = DigestKind::ALL
            .iter()
            .find_map(|k| text.strip_prefix(k.prefix()))?;
        let ok = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| Self(text.to_owned()))
    }

    /// A SHA-256 digest of the whole content from its 32 bytes.
    pub fn sha256(bytes: &[u8; 32]) -> Self {
        Self::of_kind(DigestKind::Sha256, bytes)
    }

    /// A digest of `kind` from its 32 bytes.
    pub fn of_kind(kind: DigestKind, bytes: &[u8; 32]) -> Self {
        let prefix = kind.prefix();
        let mut text = String::with_capacity(prefix.len() + 64);
        text.push_str(prefix);
        for b in bytes {
            text.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            text.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        Self(text)
    }

    /// How it was computed.
    pub fn kind(&self) -> DigestKind {
        DigestKind::ALL
            .into_iter()
            .find(|k| self.0.starts_with(k.prefix()))
            .unwrap_or(DigestKind::Sha256)
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[self.kind().prefix().len()..]
    }

    /// The full text, e.g. `sha256-tree:...`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = String;

    /// [`Digest::parse`], for reading a digest back from a cache.
    fn try_from(text: String) -> Result<Self, String> {
        Digest::parse(&text).ok_or_else(|| format!("'{text}' is no digest"))
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The image holding one disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupImage {
    /// The disk target (`vda`).
    pub disk: String,
    /// Absolute path of the image.
    pub path: String,
    /// Its format (qcow2 for every image the adapter writes).
    pub format: ImageFormat,
    /// Guest-visible size.
    pub virtual_size_bytes: u64,
    /// Bytes the image file itself occupies on the host (not counting backing files).
    pub allocated_size_bytes: u64,
    /// Digest of the disk's content at the backup's point in time, read through the backing
    /// chain.
    pub digest: Digest,
}

/// One finished backup of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedBackup {
    /// Canonical lowercase uuid (see [`validate_uuid`]); also the record's file name.
    pub uuid: String,
    /// The domain's name.
    pub domain: String,
    /// The backup this one is incremental to; `None` for a full backup.
    pub parent: Option<String>,
    /// The checkpoint created with the backup, if any (the next incremental starts there).
    pub checkpoint: Option<String>,
    /// Seconds since the Unix epoch when the backup's point in time was taken.
    pub creation_time: u64,
    /// The backup's rank among its domain's backups, given by [`Catalogue::next_sequence`]
    /// when it is recorded: it orders backups taken within the same second. `None` for
    /// records written before sequence numbers existed; those order before every numbered
    /// one, by creation time and then by depth in their chain (see [`Catalogue::list`]).
    ///
    /// [`Catalogue::next_sequence`]: super::Catalogue::next_sequence
    /// [`Catalogue::list`]: super::Catalogue::list
    pub sequence: Option<u64>,
    /// Free-form description.
    pub description: Option<String>,
    /// Full or incremental.
    pub kind: BackupKind,
    /// One image per disk, in disk order as given.
    pub disks: Vec<BackupImage>,
}

impl ManagedBackup {
    /// The image of `disk`, if the backup has one.
    pub fn image(&self, disk: &str) -> Option<&BackupImage> {
        self.disks.iter().find(|d| d.disk == disk)
    }

    /// Sum of the images' allocated sizes.
    pub fn allocated_size_bytes(&self) -> u64 {
        self.disks
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.allocated_size_bytes))
    }

    /// Checks what a record must satisfy by itself, whatever the catalogue holds: a canonical
    /// uuid, a parent exactly when incremental, at least one disk, no disk or path twice,
    /// absolute paths.
    pub fn check(&self) -> Result<(), CatalogueError> {
        validate_uuid(&self.uuid)?;
        let inconsistent = |reason: String| CatalogueError::Inconsistent {
            uuid: self.uuid.clone(),
            reason,
        };
        match (&self.parent, self.kind) {
            (Some(parent), BackupKind::Incremental) => {
                validate_uuid(parent)?;
                if *parent == self.uuid {
                    return Err(inconsistent("it names itself as parent".into()));
                }
            }
            (None, BackupKind::Full) => {}
            (Some(_), BackupKind::Full) => {
                return Err(inconsistent("a full backup has no parent".into()));
            }
            (None, BackupKind::Incremental) => {
                return Err(inconsistent("an incremental backup needs a parent".into()));
            }
        }
        if self.domain.is_empty() {
            return Err(inconsistent("the domain name is empty".into()));
        }
        if self.disks.is_empty() {
            return Err(inconsistent("it has no disk image".into()));
        }
        for (i, image) in self.disks.iter().enumerate() {
            if image.disk.is_empty() {
                return Err(inconsistent("a disk has an empty name".into()));
            }
            if !image.path.starts_with('/') {
                return Err(inconsistent(format!(
                    "image '{}' of disk '{}' is not an absolute path",
                    image.path, image.disk
                )));
            }
            for other in &self.disks[..i] {
                if other.disk == image.disk {
                    return Err(inconsistent(format!(
                        "disk '{}' is listed twice",
                        image.disk
                    )));
                }
                if other.path == image.path {
                    return Err(inconsistent(format!(
                        "image '{}' is listed twice",
                        image.path
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks that `uuid` is a canonical lowercase uuid (`8-4-4-4-12` hex digits), which also makes
/// it a safe file name.
pub fn validate_uuid(uuid: &str) -> Result<(), CatalogueError> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let ok = groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(CatalogueError::InvalidUuid(uuid.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_must_be_canonical_lowercase() {
        assert!(validate_uuid("01234567-89ab-cdef-0123-456789abcdef").is_ok());
        assert!(validate_uuid("01234567-89AB-cdef-0123-456789abcdef").is_err());
        assert!(validate_uuid("0123456789abcdef0123456789abcdef").is_err());
        assert!(validate_uuid("../../etc/passwd").is_err());
        assert!(validate_uuid("").is_err());
    }

    #[test]
    fn digests_print_as_lowercase_hex_and_parse_back() {
        let d = Digest::sha256(&[0xab; 32]);
        assert_eq!(d.as_str(), format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(Digest::parse(d.as_str()), Some(d));
        assert_eq!(Digest::parse("sha256:AB"), None);
        assert_eq!(Digest::parse(&format!("md5:{}", "ab".repeat(32))), None);
    }
}
