//! The managed-backup record: its XML form, the catalogue's refusals, deletion operations and
//! restore plans.

use vbackup_core::catalogue::{
    BackupImage, BackupKind, BackupListFilter, Catalogue, CatalogueError, CatalogueOp, DeleteMode,
    Digest, ManagedBackup, find_backup,
};
use vbackup_core::model::ImageFormat;
use vbackup_core::xml::XmlErrorKind;

const FULL: &str = "11111111-1111-4111-8111-111111111111";
const INC1: &str = "22222222-2222-4222-8222-222222222222";
const INC2: &str = "33333333-3333-4333-8333-333333333333";

fn image(disk: &str, uuid: &str, digest_byte: u8) -> BackupImage {
    BackupImage {
        disk: disk.into(),
        path: format!("/backups/vm1/{uuid}/{disk}.qcow2"),
        format: ImageFormat::Qcow2,
        virtual_size_bytes: 1 << 30,
        allocated_size_bytes: 196_608,
        digest: Digest::sha256(&[digest_byte; 32]),
    }
}

fn backup(uuid: &str, parent: Option<&str>, time: u64, disks: &[&str]) -> ManagedBackup {
    ManagedBackup {
        uuid: uuid.into(),
        domain: "vm1".into(),
        parent: parent.map(str::to_owned),
        checkpoint: Some(format!("c{time}")),
        creation_time: time,
        sequence: None,
        description: None,
        kind: if parent.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        disks: disks.iter().map(|d| image(d, uuid, time as u8)).collect(),
    }
}

/// The operations making backup `uuid`'s two images (vda, vdb) standalone.
fn made_standalone(uuid: &str) -> [CatalogueOp; 2] {
    ["vda", "vdb"].map(|disk| CatalogueOp::RebaseImage {
        path: format!("/backups/vm1/{uuid}/{disk}.qcow2"),
        backing: None,
    })
}

fn chain_of_three() -> Catalogue {
    let mut c = Catalogue::new("vm1");
    c.insert(backup(FULL, None, 100, &["vda", "vdb"])).unwrap();
    c.insert(backup(INC1, Some(FULL), 200, &["vda", "vdb"]))
        .unwrap();
    c.insert(backup(INC2, Some(INC1), 300, &["vda"])).unwrap();
    c
}

#[test]
fn managed_backup_formats_canonically_and_round_trips() {
    let mut b = backup(INC1, Some(FULL), 1_700_000_000, &["vda"]);
    b.description = Some("nightly <&> 'run'".into());
    let text = b.format();
    let digest = format!("sha256:{}", "00".repeat(32));
    let expected = format!(
        "<managedbackup>
  <uuid>{INC1}</uuid>
  <domain>vm1</domain>
  <parent>
    <uuid>{FULL}</uuid>
  </parent>
  <checkpoint>c1700000000</checkpoint>
  <description>nightly &lt;&amp;&gt; &apos;run&apos;</description>
  <creationTime>1700000000</creationTime>
  <mode>incremental</mode>
  <disks>
    <disk name='vda' path='/backups/vm1/{INC1}/vda.qcow2' format='qcow2' virtualSize='1073741824' allocatedSize='196608' digest='{digest}'/>
  </disks>
</managedbackup>
"
    );
    assert_eq!(text, expected);
    let parsed = ManagedBackup::parse(&text).unwrap();
    assert_eq!(parsed, b);
    assert_eq!(parsed.format(), text);
}

#[test]
fn malformed_managed_backup_documents_fail_with_positions() {
    let good = backup(FULL, None, 5, &["vda"]).format();
    let cases = [
        (
            good.replace("<mode>full</mode>", "<mode>partial</mode>"),
            "/managedbackup/mode",
            "partial",
        ),
        (
            good.replace("digest='sha256:", "digest='md5:"),
            "/managedbackup/disks/disk",
            "digest",
        ),
        (
            good.replace("virtualSize='1073741824'", "virtualSize='big'"),
            "/managedbackup/disks/disk",
            "virtualSize",
        ),
        (
            good.replace("  <creationTime>5</creationTime>\n", ""),
            "/managedbackup",
            "creationTime",
        ),
        (
            good.replace(
                "<domain>vm1</domain>",
                "<domain>vm1</domain>\n  <domain>vm2</domain>",
            ),
            "/managedbackup/domain",
            "",
        ),
        (
            good.replace("<mode>", "<bogus/>\n  <mode>"),
            "/managedbackup/bogus",
            "",
        ),
    ];
    for (text, path, needle) in cases {
        let err = ManagedBackup::parse(&text).unwrap_err();
        assert!(err.position.is_some(), "{err}");
        assert_eq!(err.path, path, "{err}");
        assert!(err.message.contains(needle), "{err}");
    }
    // A full backup with a parent parses as XML but breaks the record's rules.
    let inconsistent = good.replace(
        "<domain>vm1</domain>",
        &format!("<domain>vm1</domain>\n  <parent>\n    <uuid>{INC1}</uuid>\n  </parent>"),
    );
    let err = ManagedBackup::parse(&inconsistent).unwrap_err();
    assert_eq!(err.kind, XmlErrorKind::Invalid);
    assert!(err.message.contains("a full backup has no parent"), "{err}");
    let bad_uuid = good.replace(FULL, "../../etc");
    let err = ManagedBackup::parse(&bad_uuid).unwrap_err();
    assert_eq!(err.path, "/managedbackup/uuid", "{err}");
}

#[test]
fn insert_refuses_orphans_duplicates_foreign_domains_shared_images_and_new_disks() {
    let mut c = Catalogue::new("vm1");
    assert!(matches!(
        c.insert(backup(INC1, Some(FULL), 2, &["vda"])),
        Err(CatalogueError::MissingParent { .. })
    ));
    let ops = c.insert(backup(FULL, None, 1, &["vda"])).unwrap();
    assert!(matches!(ops.as_slice(), [CatalogueOp::PutBackup(b)] if b.uuid == FULL));
    assert_eq!(
        c.insert(backup(FULL, None, 1, &["vda"])),
        Err(CatalogueError::Duplicate(FULL.into()))
    );
    let mut foreign = backup(INC1, None, 2, &["vda"]);
    foreign.domain = "vm2".into();
    assert!(matches!(
        c.insert(foreign),
        Err(CatalogueError::WrongDomain { .. })
    ));
    let mut shared = backup(INC1, Some(FULL), 2, &["vda"]);
    shared.disks[0].path = c.get(FULL).unwrap().disks[0].path.clone();
    assert!(matches!(
        c.insert(shared),
        Err(CatalogueError::ImageInUse { .. })
    ));
    let err = c
        .insert(backup(INC1, Some(FULL), 2, &["vda", "vdb"]))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("disk 'vdb' has no image in parent"),
        "{err}"
    );
    assert_eq!(c.len(), 1, "refused inserts change nothing");
}

#[test]
fn lists_children_chains_and_lookup_follow_the_parents() {
    let mut c = chain_of_three();
    let other_full = "44444444-4444-4444-8444-444444444444";
    c.insert(backup(other_full, None, 50, &["vda"])).unwrap();
    let uuids = |v: Vec<&ManagedBackup>| v.into_iter().map(|b| b.uuid.clone()).collect::<Vec<_>>();
    assert_eq!(
        uuids(c.list(BackupListFilter::All)),
        [other_full, FULL, INC1, INC2]
    );
    assert_eq!(uuids(c.list(BackupListFilter::Full)), [other_full, FULL]);
    assert_eq!(
        uuids(c.list(BackupListFilter::LatestChain)),
        [FULL, INC1, INC2]
    );
    assert_eq!(uuids(c.children(FULL).unwrap()), [INC1]);
    assert_eq!(uuids(c.chain(INC2).unwrap()), [FULL, INC1, INC2]);
    assert_eq!(
        c.children("55555555-5555-4555-8555-555555555555"),
        Err(CatalogueError::NotFound(
            "55555555-5555-4555-8555-555555555555".into()
        ))
    );
    let other = Catalogue::new("vm2");
    let found = find_backup([&other, &c], INC1).unwrap();
    assert_eq!(found.0, "vm1");
    assert_eq!(found.1.uuid, INC1);
}

#[test]
fn delete_alone_is_refused_while_children_depend_on_the_backup() {
    let mut c = chain_of_three();
    assert_eq!(
        c.delete(FULL, DeleteMode::Alone),
        Err(CatalogueError::HasChildren {
            uuid: FULL.into(),
            children: vec![INC1.into()]
        })
    );
    let ops = c.delete(INC2, DeleteMode::Alone).unwrap();
    assert_eq!(
        ops,
        vec![
            CatalogueOp::DeleteCheckpoint {
                name: "c300".into()
            },
            CatalogueOp::DeleteBackup { uuid: INC2.into() },
            CatalogueOp::RemoveImage {
                path: format!("/backups/vm1/{INC2}/vda.qcow2")
            },
        ]
    );
}

#[test]
fn delete_with_children_removes_leaves_first_and_files_last() {
    let mut c = chain_of_three();
    let ops = c.delete(FULL, DeleteMode::WithChildren).unwrap();
    let records: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            CatalogueOp::DeleteBackup { uuid } => Some(uuid.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(records, [INC2, INC1, FULL]);
    let checkpoints: Vec<&str> = ops
        .iter()
        .take_while(|op| matches!(op, CatalogueOp::DeleteCheckpoint { .. }))
        .filter_map(|op| match op {
            CatalogueOp::DeleteCheckpoint { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        checkpoints,
        ["c300", "c200", "c100"],
        "checkpoints go first, leaves first"
    );
    let first_file = ops
        .iter()
        .position(|op| matches!(op, CatalogueOp::RemoveImage { .. }))
        .unwrap();
    assert_eq!(first_file, 6, "every record goes before any file");
    assert_eq!(ops.len() - first_file, 5, "2 + 2 + 1 images");
    assert!(c.is_empty());
}

#[test]
fn deleting_a_full_backup_with_rebase_makes_its_child_a_standalone_full_backup() {
    let mut c = chain_of_three();
    let ops = c.delete(FULL, DeleteMode::RebaseChildren).unwrap();
    assert_eq!(ops[..2], made_standalone(INC1));
    assert!(
        matches!(&ops[2], CatalogueOp::PutBackup(b) if b.uuid == INC1 && b.kind == BackupKind::Full && b.parent.is_none())
    );
    assert_eq!(
        ops[3..5],
        [
            CatalogueOp::DeleteCheckpoint {
                name: "c100".into()
            },
            CatalogueOp::DeleteBackup { uuid: FULL.into() },
        ],
        "the rebased child keeps its own checkpoint"
    );
    assert_eq!(c.chain(INC2).unwrap().len(), 2);

    // In the middle of a chain, the child is rebased onto the grandparent's images.
    let mut c = chain_of_three();
    let ops = c.delete(INC1, DeleteMode::RebaseChildren).unwrap();
    assert_eq!(
        ops[0],
        CatalogueOp::RebaseImage {
            path: format!("/backups/vm1/{INC2}/vda.qcow2"),
            backing: Some(format!("/backups/vm1/{FULL}/vda.qcow2")),
        }
    );
    assert_eq!(c.get(INC2).unwrap().parent.as_deref(), Some(FULL));
}

#[test]
fn consolidating_an_incremental_makes_it_a_full_and_frees_its_ancestors() {
    let mut c = chain_of_three();
    let ops = c.consolidate(INC1).unwrap();
    assert_eq!(
        ops[..2],
        made_standalone(INC1),
        "images first, the record after them"
    );
    assert!(
        matches!(&ops[2], CatalogueOp::PutBackup(b) if b.uuid == INC1 && b.kind == BackupKind::Full && b.parent.is_none() && b.checkpoint.as_deref() == Some("c200"))
    );
    assert_eq!(ops.len(), 3);
    assert_eq!(
        c.chain(INC2).unwrap().len(),
        2,
        "INC2 now hangs off INC1 alone"
    );
    // The old full has no child left: it goes alone, and nothing of INC1 goes with it.
    let ops = c.delete(FULL, DeleteMode::Alone).unwrap();
    assert!(ops.iter().all(|o| match o {
        CatalogueOp::RemoveImage { path } => path.contains(FULL),
        CatalogueOp::DeleteBackup { uuid } => uuid == FULL,
        _ => true,
    }));
    assert!(c.get(INC1).is_some() && c.get(INC2).is_some());
    // A full backup has nothing to consolidate; an unknown one is an error.
    assert_eq!(c.consolidate(INC1).unwrap(), Vec::new());
    assert!(
        c.consolidate("01234567-89ab-cdef-0123-456789abcdef")
            .is_err()
    );
}

#[test]
fn delete_all_empties_the_catalogue() {
    let mut c = chain_of_three();
    let ops = c.delete_all();
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, CatalogueOp::DeleteBackup { .. }))
            .count(),
        3
    );
    assert!(c.is_empty());
}

#[test]
fn restore_plan_lists_the_backing_chain_top_first_for_the_chosen_disks() {
    let c = chain_of_three();
    let plan = c.plan_restore(INC1, &["vdb"]).unwrap();
    assert_eq!(plan.disks.len(), 1);
    let vdb = &plan.disks[0];
    assert_eq!(vdb.disk, "vdb");
    let paths: Vec<&str> = vdb.images.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("/backups/vm1/{INC1}/vdb.qcow2"),
            format!("/backups/vm1/{FULL}/vdb.qcow2")
        ]
    );
    assert_eq!(
        vdb.digest,
        c.get(INC1).unwrap().image("vdb").unwrap().digest
    );
    assert_eq!(c.plan_restore(INC1, &[]).unwrap().disks.len(), 2);
    assert_eq!(
        c.plan_restore(INC2, &["vdb"]),
        Err(CatalogueError::NoSuchDisk {
            uuid: INC2.into(),
            disk: "vdb".into()
        })
    );
}

#[test]
fn load_accepts_records_in_any_order_and_refuses_orphans() {
    let records = vec![
        backup(INC2, Some(INC1), 300, &["vda"]),
        backup(FULL, None, 100, &["vda"]),
        backup(INC1, Some(FULL), 200, &["vda"]),
    ];
    let c = Catalogue::load("vm1", records, Some("/srv/backups".into())).unwrap();
    assert_eq!(c.chain(INC2).unwrap().len(), 3);
    assert_eq!(
        c.default_image_path(INC2, "vda").unwrap().as_deref(),
        Some(format!("/srv/backups/{INC2}/vda.qcow2").as_str())
    );
    let orphan = vec![backup(INC2, Some(INC1), 300, &["vda"])];
    assert!(matches!(
        Catalogue::load("vm1", orphan, None),
        Err(CatalogueError::MissingParent { .. })
    ));
}

#[test]
fn default_target_must_be_absolute() {
    let mut c = Catalogue::new("vm1");
    assert!(matches!(
        c.set_default_target(Some("rel/dir".into())),
        Err(CatalogueError::RelativeTarget(_))
    ));
    assert!(matches!(
        c.set_default_target(Some("/a/../b".into())),
        Err(CatalogueError::RelativeTarget(_))
    ));
    assert_eq!(
        c.set_default_target(Some("/srv".into())).unwrap(),
        vec![CatalogueOp::SetDefaultTarget(Some("/srv".into()))]
    );
    assert_eq!(c.default_target(), Some("/srv"));
    assert_eq!(
        c.default_image_path(FULL, "vda").unwrap().as_deref(),
        Some(format!("/srv/{FULL}/vda.qcow2").as_str())
    );
}

#[test]
fn a_checkpoint_another_backup_still_names_is_kept_when_a_backup_goes() {
    let mut c = Catalogue::new("vm1");
    c.insert(backup(FULL, None, 100, &["vda"])).unwrap();
    let mut twin = backup(INC1, None, 200, &["vda"]);
    twin.checkpoint = Some("c100".into());
    c.insert(twin).unwrap();
    let ops = c.delete(FULL, DeleteMode::Alone).unwrap();
    assert!(
        !ops.iter()
            .any(|o| matches!(o, CatalogueOp::DeleteCheckpoint { .. })),
        "{ops:?}"
    );
    let ops = c.delete_all();
    assert_eq!(
        ops[0],
        CatalogueOp::DeleteCheckpoint {
            name: "c100".into()
        }
    );
    // A backup without checkpoint releases none.
    let mut c = Catalogue::new("vm1");
    let mut bare = backup(FULL, None, 100, &["vda"]);
    bare.checkpoint = None;
    c.insert(bare).unwrap();
    let ops = c.delete(FULL, DeleteMode::Alone).unwrap();
    assert!(
        matches!(ops[0], CatalogueOp::DeleteBackup { .. }),
        "{ops:?}"
    );
}

/// A chain FULL <- INC1 <- INC2 and a second chain FULL2 <- INC3, all taken in one second.
fn two_chains_in_one_second(numbered: bool) -> Catalogue {
    const FULL2: &str = "00000000-0000-4000-8000-000000000001";
    const INC3: &str = "00000000-0000-4000-8000-000000000002";
    let mut c = Catalogue::new("vm1");
    let order = [
        (FULL, None),
        (INC1, Some(FULL)),
        (FULL2, None),
        (INC2, Some(INC1)),
        (INC3, Some(FULL2)),
    ];
    for (uuid, parent) in order {
        let mut b = backup(uuid, parent, 500, &["vda"]);
        b.checkpoint = Some(format!("c-{uuid}"));
        if numbered {
            b.sequence = Some(c.next_sequence());
        }
        c.insert(b).unwrap();
    }
    c
}

#[test]
fn backups_taken_in_the_same_second_order_by_sequence_number() {
    let c = two_chains_in_one_second(true);
    let order: Vec<&str> = c
        .list(BackupListFilter::All)
        .iter()
        .map(|b| &b.uuid[..])
        .collect();
    assert_eq!(
        order,
        [
            FULL,
            INC1,
            "00000000-0000-4000-8000-000000000001",
            INC2,
            "00000000-0000-4000-8000-000000000002"
        ]
    );
    // The last recorded backup is the latest, whatever the uuids say.
    assert_eq!(
        c.latest().unwrap().uuid,
        "00000000-0000-4000-8000-000000000002"
    );
    let latest: Vec<&str> = c
        .list(BackupListFilter::LatestChain)
        .iter()
        .map(|b| &b.uuid[..])
        .collect();
    assert_eq!(
        latest,
        [
            "00000000-0000-4000-8000-000000000001",
            "00000000-0000-4000-8000-000000000002"
        ]
    );
    assert_eq!(c.next_sequence(), 6);
    // The order survives a reload in any record order.
    let mut records: Vec<ManagedBackup> =
        c.list(BackupListFilter::All).into_iter().cloned().collect();
    records.reverse();
    let reloaded = Catalogue::load("vm1", records, None).unwrap();
    assert_eq!(
        reloaded.list(BackupListFilter::All),
        c.list(BackupListFilter::All)
    );
}

#[test]
fn unnumbered_records_of_one_second_order_parents_before_children() {
    // Records written before sequence numbers: the deepest chain wins a tie in time, so a
    // child is never older than its parent, and the order is the same on every load.
    let c = two_chains_in_one_second(false);
    let order: Vec<&str> = c
        .list(BackupListFilter::All)
        .iter()
        .map(|b| &b.uuid[..])
        .collect();
    assert_eq!(
        order,
        [
            "00000000-0000-4000-8000-000000000001",
            FULL,
            "00000000-0000-4000-8000-000000000002",
            INC1,
            INC2
        ]
    );
    assert_eq!(c.latest().unwrap().uuid, INC2);
    assert_eq!(c.list(BackupListFilter::LatestChain).len(), 3);
    // A numbered backup recorded after them is the latest.
    let mut c = c;
    let mut next = backup(
        "44444444-4444-4444-8444-444444444444",
        Some(FULL),
        400,
        &["vda"],
    );
    next.sequence = Some(c.next_sequence());
    assert_eq!(next.sequence, Some(1));
    c.insert(next).unwrap();
    assert_eq!(
        c.latest().unwrap().uuid,
        "44444444-4444-4444-8444-444444444444"
    );
}

#[test]
fn sequence_numbers_must_be_unique_and_follow_the_parent() {
    let mut c = Catalogue::new("vm1");
    let mut full = backup(FULL, None, 100, &["vda"]);
    full.sequence = Some(5);
    c.insert(full).unwrap();
    let mut dup = backup(INC2, None, 100, &["vda"]);
    dup.sequence = Some(5);
    assert!(matches!(
        c.insert(dup),
        Err(CatalogueError::Inconsistent { reason, .. }) if reason.contains("already used")
    ));
    let mut early = backup(INC1, Some(FULL), 100, &["vda"]);
    early.sequence = Some(4);
    assert!(matches!(
        c.insert(early.clone()),
        Err(CatalogueError::Inconsistent { reason, .. }) if reason.contains("not greater")
    ));
    early.sequence = None;
    assert!(matches!(
        c.insert(early.clone()),
        Err(CatalogueError::Inconsistent { reason, .. }) if reason.contains("no sequence")
    ));
    early.sequence = Some(6);
    c.insert(early).unwrap();
}

#[test]
fn sequence_numbers_round_trip_and_old_records_without_them_still_parse() {
    let mut b = backup(INC1, Some(FULL), 1_700_000_000, &["vda"]);
    b.sequence = Some(42);
    let text = b.format();
    assert!(text.contains("  <sequence>42</sequence>\n"), "{text}");
    assert_eq!(ManagedBackup::parse(&text).unwrap(), b);
    b.sequence = None;
    let old = b.format();
    assert!(!old.contains("sequence"), "{old}");
    assert_eq!(ManagedBackup::parse(&old).unwrap().sequence, None);
    let bad = text.replace("<sequence>42<", "<sequence>-1<");
    assert!(ManagedBackup::parse(&bad).is_err());
}

#[test]
fn restore_until_plans_the_point_in_time_of_a_backup_on_the_same_chain() {
    let c = chain_of_three();
    // An ancestor, the backup itself, or a descendant: the plan is the restore of `until`.
    assert_eq!(
        c.plan_restore_until(INC2, INC1, &[]).unwrap(),
        c.plan_restore(INC1, &[]).unwrap()
    );
    assert_eq!(
        c.plan_restore_until(FULL, INC2, &[]).unwrap(),
        c.plan_restore(INC2, &[]).unwrap()
    );
    assert_eq!(
        c.plan_restore_until(INC1, INC1, &["vdb"]).unwrap(),
        c.plan_restore(INC1, &["vdb"]).unwrap()
    );
    assert_eq!(
        c.plan_restore_until(INC2, FULL, &[]).unwrap().disks.len(),
        2
    );
    // INC2 holds only vda.
    assert!(matches!(
        c.plan_restore_until(FULL, INC2, &["vdb"]),
        Err(CatalogueError::NoSuchDisk { .. })
    ));
    // A sibling branch is not on the chain.
    let mut c = c;
    const SIBLING: &str = "55555555-5555-4555-8555-555555555555";
    c.insert(backup(SIBLING, Some(FULL), 400, &["vda"]))
        .unwrap();
    let err = c.plan_restore_until(INC2, SIBLING, &[]).unwrap_err();
    assert_eq!(
        err,
        CatalogueError::NotInChain {
            uuid: INC2.into(),
            until: SIBLING.into()
        }
    );
    assert!(err.to_string().contains("not in the chain"), "{err}");
    assert!(matches!(
        c.plan_restore_until(INC2, "66666666-6666-4666-8666-666666666666", &[]),
        Err(CatalogueError::NotFound(_))
    ));
}
