//! Block-hash digests of real images: an incremental's digest from its parent's kept hashes
//! equals the one read in full, zero blocks are not read yet count, and a parent's hashes that
//! do not match its image's content are never used (a wrong digest would hide damage).

mod tools_support;

use tools_support::{qemu, raw_content};
use vbackup_core::catalogue::{BlockHashes, DigestKind};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::digest::block_hashes;

const KIND: DigestKind = DigestKind::NEW_IMAGES;

#[test]
fn an_incremental_digest_from_its_parent_hashes_equals_the_digest_read_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.qcow2");
    let inc = dir.path().join("inc.qcow2");
    let (f, i) = (full.to_str().unwrap(), inc.to_str().unwrap());
    // 40 MiB and a half: a partial last block; data in a few places, the rest never written.
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", f, "41472K"]);
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 3M",
            "-c",
            "write -P 2 20M 1M",
            f,
        ],
    );
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f, i],
    );
    // The incremental holds a part of one block, a whole block, and the partial last block.
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 1M 64k",
            "-c",
            "write -P 4 30M 1M",
            "-c",
            "write -P 5 40M 64k",
            i,
        ],
    );

    let mut heard = 0;
    let parent = block_hashes(&full, &ImageFormat::Qcow2, KIND, None, &mut |n| heard += n).unwrap();
    assert_eq!(heard, parent.size(), "progress adds up to the size");
    assert_eq!(
        parent,
        BlockHashes::of_content(KIND, &raw_content(&full, dir.path()))
    );
    assert_eq!(parent.digest().kind(), KIND);

    let read = block_hashes(&inc, &ImageFormat::Qcow2, KIND, None, &mut |_| {}).unwrap();
    let expected = BlockHashes::of_content(KIND, &raw_content(&inc, dir.path()));
    assert_eq!(read, expected);
    let reused = block_hashes(&inc, &ImageFormat::Qcow2, KIND, Some(&parent), &mut |_| {}).unwrap();
    assert_eq!(reused, expected);
    assert_eq!(reused.digest(), read.digest());

    // Hashes of some other content taken for the parent's: the blocks the incremental holds
    // itself are still right, the shared ones come out differently, so the digest differs
    // from the recorded one and the damage shows on the next check.
    let other = BlockHashes::of_content(KIND, &vec![9u8; 41472 << 10]);
    let wrong = block_hashes(&inc, &ImageFormat::Qcow2, KIND, Some(&other), &mut |_| {}).unwrap();
    assert_ne!(wrong.digest(), expected.digest());
    assert_eq!(wrong.get(30), expected.get(30));
}
