//! The tree digests ([`DigestKind::Sha256Tree`], [`DigestKind::Blake3Tree`]): content digests
//! built from block hashes, so that blocks known to be zero or shared with a parent image need
//! no read.

use sha2::{Digest as _, Sha256};

use super::record::{Digest, DigestKind, TREE_BLOCK_BYTES};

/// The block hashes of one content: what a tree digest is computed from, kept beside a backup
/// so that the next incremental reuses the hashes of the blocks it shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    kind: DigestKind,
    size: u64,
    hashes: Vec<[u8; 32]>,
}

/// The first 8 bytes of the run-length stored form of [`BlockHashes`]: no content is that
/// large, so the older plain form (which starts with the size) never starts so.
const RUNS_MARK: u64 = u64::MAX;

/// Number of blocks of a content of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(TREE_BLOCK_BYTES)
}

/// Length of block `index` of a content of `size` bytes.
pub fn block_len(size: u64, index: u64) -> u64 {
    TREE_BLOCK_BYTES.min(size.saturating_sub(index * TREE_BLOCK_BYTES))
}

/// The hash function of a tree digest kind, fed piece by piece.
enum Hasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// SHA-256 for [`DigestKind::Sha256Tree`] (and the plain [`DigestKind::Sha256`]), BLAKE3
    /// for [`DigestKind::Blake3Tree`].
    fn new(kind: DigestKind) -> Self {
        match kind {
            DigestKind::Blake3Tree => Self::Blake3(Box::new(blake3::Hasher::new())),
            DigestKind::Sha256 | DigestKind::Sha256Tree => Self::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Blake3(h) => {
                h.update(data);
            }
        }
    }

    fn finish(self) -> [u8; 32] {
        match self {
            Self::Sha256(h) => h.finalize().into(),
            Self::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// The hash of one block's bytes, for a digest of `kind`.
pub fn block_hash(kind: DigestKind, data: &[u8]) -> [u8; 32] {
    match kind {
        DigestKind::Blake3Tree => *blake3::hash(data).as_bytes(),
        DigestKind::Sha256 | DigestKind::Sha256Tree => Sha256::digest(data).into(),
    }
}

/// The hash of a block of `len` zero bytes, for a digest of `kind`.
pub fn zero_block_hash(kind: DigestKind, len: u64) -> [u8; 32] {
    let mut hasher = Hasher::new(kind);
    let zeros = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        hasher.update(&zeros[..n]);
        left -= n as u64;
    }
    hasher.finish()
}

impl BlockHashes {
    /// The hashes of `kind` (a tree kind) of a content of `size` bytes, one per block in
    /// order; `None` when their number does not match the size or the kind is no tree kind.
    pub fn new(kind: DigestKind, size: u64, hashes: Vec<[u8; 32]>) -> Option<Self> {
        (kind.is_tree() && hashes.len() as u64 == block_count(size)).then_some(Self {
            kind,
            size,
            hashes,
        })
    }

    /// The kind of digest they make.
    pub fn kind(&self) -> DigestKind {
        self.kind
    }

    /// The content's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hash of block `index`.
    pub fn get(&self, index: u64) -> Option<&[u8; 32]> {
        self.hashes.get(usize::try_from(index).ok()?)
    }

    /// The digest these hashes make: the hash of the size (8 bytes, little-endian) followed
    /// by the block hashes in order.
    pub fn digest(&self) -> Digest {
        // The hashes in one piece: BLAKE3 hashes a long input several chunks at a time.
        let mut hasher = Hasher::new(self.kind);
        hasher.update(&self.size.to_le_bytes());
        hasher.update(self.hashes.as_flattened());
        Digest::of_kind(self.kind, &hasher.finish())
    }

    /// The stored form, run-length coded (a sparse disk's blocks mostly share the zero
    /// block's hash): eight bytes 0xff (a size no content has), the size, then per run of
    /// equal hashes its length and the hash (8-byte little-endian integers). The kind is not
    /// in it: files are kept by digest, which names it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 40 * 16);
        out.extend_from_slice(&RUNS_MARK.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        let mut i = 0;
        while i < self.hashes.len() {
            let hash = &self.hashes[i];
            let run = self.hashes[i..].iter().take_while(|h| *h == hash).count();
            out.extend_from_slice(&(run as u64).to_le_bytes());
            out.extend_from_slice(hash);
            i += run;
        }
        out
    }

    /// Reads a stored form of hashes of `kind` back: the run-length form of
    /// [`BlockHashes::encode`], or the older plain one (the size, then every hash); `None`
    /// when it is torn or inconsistent.
    pub fn decode(kind: DigestKind, bytes: &[u8]) -> Option<Self> {
        let (first, rest) = bytes.split_first_chunk::<8>()?;
        if u64::from_le_bytes(*first) != RUNS_MARK {
            let size = u64::from_le_bytes(*first);
            if rest.len() % 32 != 0 {
                return None;
            }
            let hashes = rest
                .chunks_exact(32)
                .map(|c| <[u8; 32]>::try_from(c).unwrap_or([0; 32]))
                .collect();
            return Self::new(kind, size, hashes);
        }
        let (size, mut rest) = rest.split_first_chunk::<8>()?;
        let size = u64::from_le_bytes(*size);
        let blocks = usize::try_from(block_count(size)).ok()?;
        let mut hashes: Vec<[u8; 32]> = Vec::with_capacity(blocks);
        while !rest.is_empty() {
            let (run, after) = rest.split_first_chunk::<8>()?;
            let (hash, after) = after.split_first_chunk::<32>()?;
            let run = usize::try_from(u64::from_le_bytes(*run)).ok()?;
            if run == 0 || run > blocks - hashes.len() {
                return None;
            }
            hashes.resize(hashes.len() + run, *hash);
            rest = after;
        }
        Self::new(kind, size, hashes)
    }

    /// The hashes of `kind` of `content` itself (a whole content held in memory).
    pub fn of_content(kind: DigestKind, content: &[u8]) -> Self {
        let size = content.len() as u64;
        let hashes = content
            .chunks(TREE_BLOCK_BYTES as usize)
            .map(|block| block_hash(kind, block))
            .collect();
        Self { kind, size, hashes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_hash_as_their_bytes_and_the_stored_form_reads_back() {
        let content = vec![0u8; (TREE_BLOCK_BYTES + 4096) as usize];
        for kind in [DigestKind::Sha256Tree, DigestKind::Blake3Tree] {
            let hashes = BlockHashes::of_content(kind, &content);
            assert_eq!(
                hashes.get(0),
                Some(&zero_block_hash(kind, TREE_BLOCK_BYTES))
            );
            assert_eq!(hashes.get(1), Some(&zero_block_hash(kind, 4096)));
            assert_eq!(block_len(content.len() as u64, 1), 4096);
            let back = BlockHashes::decode(kind, &hashes.encode()).expect("reads back");
            assert_eq!(back, hashes);
            assert_eq!(back.digest(), hashes.digest());
            assert_eq!(back.digest().kind(), kind);
            assert!(Digest::parse(back.digest().as_str()).is_some());
            assert!(BlockHashes::decode(kind, &hashes.encode()[..40]).is_none());
            // The older plain form still reads back.
            let mut plain = hashes.size().to_le_bytes().to_vec();
            plain.extend_from_slice(hashes.hashes.as_flattened());
            assert_eq!(BlockHashes::decode(kind, &plain), Some(hashes.clone()));
        }
        // The kinds differ, and a plain digest kind makes no block hashes.
        let sha = BlockHashes::of_content(DigestKind::Sha256Tree, &content).digest();
        let blake = BlockHashes::of_content(DigestKind::Blake3Tree, &content).digest();
        assert_ne!(sha.hex(), blake.hex());
        assert!(BlockHashes::new(DigestKind::Sha256, 0, Vec::new()).is_none());
    }

    #[test]
    fn runs_of_equal_hashes_are_stored_once_and_a_bad_run_is_refused() {
        let kind = DigestKind::NEW_IMAGES;
        // 64 blocks: zeros, one written block, zeros again.
        let mut content = vec![0u8; (64 * TREE_BLOCK_BYTES) as usize];
        content[(10 * TREE_BLOCK_BYTES) as usize] = 7;
        let hashes = BlockHashes::of_content(kind, &content);
        let stored = hashes.encode();
        assert_eq!(stored.len(), 16 + 3 * 40, "three runs");
        assert_eq!(BlockHashes::decode(kind, &stored), Some(hashes.clone()));
        // A run past the end, an empty run, or runs that fall short are refused.
        let mut long = stored.clone();
        long[16..24].copy_from_slice(&100u64.to_le_bytes());
        assert!(BlockHashes::decode(kind, &long).is_none());
        let mut empty = stored.clone();
        empty[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert!(BlockHashes::decode(kind, &empty).is_none());
        assert!(BlockHashes::decode(kind, &stored[..16 + 40]).is_none());
    }

    #[test]
    fn the_digest_depends_on_every_byte_and_on_the_size() {
        let a = vec![1u8; 3 << 20];
        let mut b = a.clone();
        b[(2 << 20) + 5] = 2;
        let mut c = a.clone();
        c.push(0);
        let d = |x: &[u8]| BlockHashes::of_content(DigestKind::NEW_IMAGES, x).digest();
        assert_ne!(d(&a), d(&b));
        assert_ne!(d(&a), d(&c));
        assert_eq!(d(&a), d(&a.clone()));
        assert!(Digest::parse(d(&a).as_str()).is_some());
    }
}
