//! Live: catalogue operations carried out on a real chain and store: records persist and load
//! back, deleting a backup in the middle with rebase keeps later backups restorable, deleting
//! everything removes every image.

mod images_support;

use images_support::{Lab, tools, uuid};
use vbackup_core::catalogue::{BackupListFilter, CatalogueOp, DeleteMode};
use vbackup_qemu::images::{apply_ops, load_catalogue};
use vbackup_qemu::restore::{RestoreTarget, restore};
use vbackup_qemu::store::Store;

#[test]
fn catalogue_operations_persist_rebase_and_remove_real_images() {
    if !tools() {
        return;
    }
    let mut lab = Lab::chain_of_four();
    let store = Store::open(lab.path("state")).unwrap();
    let domain = store.lock_domain("vm").unwrap();
    let puts: Vec<CatalogueOp> = lab
        .catalogue
        .list(BackupListFilter::All)
        .into_iter()
        .map(|b| CatalogueOp::PutBackup(Box::new(b.clone())))
        .collect();
    apply_ops(&domain, &puts).unwrap();
    let target = lab
        .catalogue
        .set_default_target(Some("/srv/backups".into()))
        .unwrap();
    apply_ops(&domain, &target).unwrap();
    assert_eq!(load_catalogue(&domain).unwrap(), lab.catalogue);

    // Delete the first increment but keep the two built on it.
    let gone = lab.image_of(1);
    let ops = lab
        .catalogue
        .delete(&uuid(1), DeleteMode::RebaseChildren)
        .unwrap();
    apply_ops(&domain, &ops).unwrap();
    assert!(!gone.exists());
    assert_eq!(load_catalogue(&domain).unwrap(), lab.catalogue);
    let out = lab.path("restored");
    std::fs::create_dir(&out).unwrap();
    let plan = lab.catalogue.plan_restore(&uuid(3), &[]).unwrap();
    assert_eq!(plan.disks[0].images.len(), 3);
    restore(&plan, &RestoreTarget::NewImages { dir: out }).unwrap();

    let images: Vec<_> = [0, 2, 3].iter().map(|&n| lab.image_of(n)).collect();
    let ops = lab.catalogue.delete_all();
    apply_ops(&domain, &ops).unwrap();
    assert!(images.iter().all(|p| !p.exists()));
    assert!(load_catalogue(&domain).unwrap().is_empty());
    // Repeating the deletion after an interruption is harmless.
    apply_ops(&domain, &ops).unwrap();
}
