//! Live: restoring a backup chain gives the disk's content at the backup's moment, verified
//! against the stored digest; corrupt chains, busy disks and existing files are refused.

mod images_support;

use std::collections::BTreeMap;

use images_support::{Lab, guest, tools, uuid};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::images::{self, NbdExport};
use vbackup_qemu::live::images_identical;
use vbackup_qemu::restore::{RestoreError, RestoreTarget, restore};

#[test]
fn restore_of_the_third_increment_equals_the_disk_at_that_moment() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    for n in [3, 1] {
        let out = lab.path(&format!("restored{n}"));
        std::fs::create_dir(&out).unwrap();
        let plan = lab.catalogue.plan_restore(&uuid(n), &[]).unwrap();
        let done = restore(&plan, &RestoreTarget::NewImages { dir: out.clone() }).unwrap();
        assert_eq!(done.len(), 1);
        let restored = out.join("vda.qcow2");
        assert_eq!(done[0].path, restored);
        assert!(
            images_identical(
                &lab.backups[n].1,
                &ImageFormat::Raw,
                &restored,
                &ImageFormat::Qcow2
            )
            .unwrap()
        );
        assert_eq!(
            images::backing_chain(&restored).unwrap().len(),
            1,
            "a restored image stands alone"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}

#[test]
fn corrupted_backup_is_detected_by_its_digest_and_nothing_is_written() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    guest(&lab.image_of(2), &["write -P 0x66 20M 4k"]);
    let out = lab.path("restored");
    std::fs::create_dir(&out).unwrap();
    let plan = lab.catalogue.plan_restore(&uuid(3), &[]).unwrap();
    let err = restore(&plan, &RestoreTarget::NewImages { dir: out.clone() }).unwrap_err();
    assert!(
        matches!(&err, RestoreError::DigestMismatch { disk, expected, .. }
            if disk == "vda" && *expected == plan.disks[0].digest),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn a_chain_changed_behind_the_catalogue_is_refused() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    images::rebase(&lab.image_of(3), Some(&lab.image_of(1))).unwrap();
    let plan = lab.catalogue.plan_restore(&uuid(3), &[]).unwrap();
    let err = restore(&plan, &RestoreTarget::NewImages { dir: lab.path("") }).unwrap_err();
    assert!(matches!(err, RestoreError::ChainMismatch { .. }), "{err}");
}

#[test]
fn restore_over_a_disk_is_refused_while_it_is_served_and_keeps_its_format() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    let disk = lab.path("live.raw");
    std::fs::write(&disk, vec![0x5a; 1 << 20]).unwrap();
    let plan = lab.catalogue.plan_restore(&uuid(2), &["vda"]).unwrap();
    let target = RestoreTarget::Overwrite {
        disks: BTreeMap::from([("vda".to_owned(), disk.clone())]),
    };
    let mut daemon = NbdExport::start(&disk, &ImageFormat::Raw, true).unwrap();
    let err = restore(&plan, &target).unwrap_err();
    assert!(matches!(err, RestoreError::InUse { .. }), "{err}");
    daemon.stop();
    let done = restore(&plan, &target).unwrap();
    assert_eq!(done[0].format, ImageFormat::Raw);
    assert!(
        images_identical(
            &lab.backups[2].1,
            &ImageFormat::Raw,
            &disk,
            &ImageFormat::Raw
        )
        .unwrap()
    );
}

#[test]
fn restore_to_new_images_never_replaces_a_file() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    let out = lab.path("restored");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("vda.qcow2"), b"precious").unwrap();
    let plan = lab.catalogue.plan_restore(&uuid(0), &[]).unwrap();
    let err = restore(&plan, &RestoreTarget::NewImages { dir: out.clone() }).unwrap_err();
    assert!(matches!(err, RestoreError::Exists { .. }), "{err}");
    assert_eq!(std::fs::read(out.join("vda.qcow2")).unwrap(), b"precious");
}

#[test]
fn restore_until_an_earlier_or_later_backup_of_the_chain_gives_that_backups_moment() {
    if !tools() {
        return;
    }
    let lab = Lab::chain_of_four();
    // From the top down to the second backup, and from the full one up to the third.
    for (named, until) in [(3, 1), (0, 2)] {
        let out = lab.path(&format!("until{until}"));
        std::fs::create_dir(&out).unwrap();
        let plan = lab
            .catalogue
            .plan_restore_until(&uuid(named), &uuid(until), &[])
            .unwrap();
        assert_eq!(plan.backup, uuid(until));
        assert_eq!(plan.disks[0].images.len(), until + 1, "the chain up to it");
        restore(&plan, &RestoreTarget::NewImages { dir: out.clone() }).unwrap();
        assert!(
            images_identical(
                &lab.backups[until].1,
                &ImageFormat::Raw,
                &out.join("vda.qcow2"),
                &ImageFormat::Qcow2
            )
            .unwrap()
        );
    }
}
