//! Live: backup images written through NBD form a qcow2 chain holding only the dirty extents,
//! zero extents stay unallocated, and digests follow the guest-visible content.

mod images_support;

use images_support::{DISK_BYTES, Lab, MIB, extent_at, tools};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::images;

#[test]
fn incremental_images_hold_only_dirty_extents_over_their_parent() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    let chain = images::backing_chain(&lab.image_of(3)).unwrap();
    let paths: Vec<String> = chain.iter().map(|l| l.path.clone()).collect();
    let want: Vec<String> = (0..4)
        .rev()
        .map(|n| lab.image_of(n).to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        paths, want,
        "each increment is an overlay of the previous backup"
    );
    assert!(chain.iter().all(|l| l.virtual_size_bytes == DISK_BYTES));
    // Extents written into the third increment are in it (depth 0); the rest reads through.
    let top = lab.image_of(3);
    assert_eq!(extent_at(&top, 2 * MIB)["depth"], 0);
    assert_eq!(extent_at(&top, 63 * MIB)["depth"], 0);
    assert_eq!(
        extent_at(&top, 0)["depth"].as_u64().unwrap(),
        2,
        "zeroed in increment 1"
    );
    assert!(extent_at(&top, 10 * MIB)["depth"].as_u64().unwrap() > 0);
    // An increment occupies about what it copied, not the disk's size.
    let inc = lab.catalogue.get(&images_support::uuid(3)).unwrap();
    assert!(
        inc.disks[0].allocated_size_bytes < 4 * MIB,
        "increment 3 occupies {} bytes",
        inc.disks[0].allocated_size_bytes
    );
}

#[test]
fn zero_extents_stay_unallocated_in_full_and_incremental_images() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    // Never written: not allocated in the full image.
    let full = lab.image_of(0);
    let e = extent_at(&full, 10 * MIB);
    assert_eq!(
        (e["data"].as_bool(), e["zero"].as_bool()),
        (Some(false), Some(true)),
        "{e}"
    );
    // Zeroed over older data: a zero cluster in the increment, with no data behind it.
    let inc1 = lab.image_of(1);
    let e = extent_at(&inc1, 0);
    assert_eq!(e["depth"], 0, "{e}");
    assert_eq!(
        (e["data"].as_bool(), e["zero"].as_bool()),
        (Some(false), Some(true)),
        "{e}"
    );
    let inc2 = lab.image_of(2);
    let e = extent_at(&inc2, 32 * MIB + 256 * 1024);
    assert_eq!(
        (e["depth"].as_u64(), e["data"].as_bool()),
        (Some(0), Some(false)),
        "{e}"
    );
}

#[test]
fn digest_is_the_content_through_the_chain_and_changes_with_one_byte() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    for (n, (uuid, frozen)) in lab.backups.iter().enumerate() {
        let stored = &lab.catalogue.get(uuid).unwrap().disks[0].digest;
        let expected = images::content_digest(frozen, &ImageFormat::Raw).unwrap();
        assert_eq!(
            stored, &expected,
            "backup {n} digest equals the disk's at that moment"
        );
    }
    let top = lab.image_of(3);
    let before = images::content_digest(&top, &ImageFormat::Qcow2).unwrap();
    images_support::guest(&lab.image_of(1), &["write -P 0x77 20M 1"]);
    let after = images::content_digest(&top, &ImageFormat::Qcow2).unwrap();
    assert_ne!(
        before, after,
        "a changed byte deep in the chain changes the digest"
    );
}

#[test]
fn rebasing_an_increment_onto_its_grandparent_keeps_its_content() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    let top = lab.image_of(2);
    let before = images::content_digest(&top, &ImageFormat::Qcow2).unwrap();
    images::rebase(&top, Some(&lab.image_of(0))).unwrap();
    assert_eq!(images::backing_chain(&top).unwrap().len(), 2);
    assert_eq!(
        images::content_digest(&top, &ImageFormat::Qcow2).unwrap(),
        before
    );
    images::rebase(&top, None).unwrap();
    assert_eq!(images::backing_chain(&top).unwrap().len(), 1);
    assert_eq!(
        images::content_digest(&top, &ImageFormat::Qcow2).unwrap(),
        before
    );
}

#[test]
fn storing_into_an_existing_image_is_refused_and_leaves_it_intact() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    let existing = lab.image_of(1);
    let before = images::content_digest(&existing, &ImageFormat::Qcow2).unwrap();
    let export = images::NbdExport::start(&lab.disk, &ImageFormat::Qcow2, false).unwrap();
    let mut source = export.connect(&[]).unwrap();
    let err = images::store_extents(&mut source, &[(0, MIB)], &existing, None).unwrap_err();
    assert!(matches!(err, images::ImageError::TargetExists(_)), "{err}");
    assert_eq!(
        images::content_digest(&existing, &ImageFormat::Qcow2).unwrap(),
        before
    );
    // A missing directory (the default target's <uuid>/ level) is created.
    let nested = lab.path("new/uuid/vda.qcow2");
    images::store_extents(&mut source, &[(0, MIB)], &nested, None).unwrap();
    assert!(nested.exists());
}
