//! Property tests: any checkpoint or backup definition the parser can produce survives
//! format-then-parse unchanged, and formatting is a fixpoint.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use vbackup_core::model::ImageFormat;
use vbackup_core::xml::STORAGE_FORMATS;
use vbackup_core::xml::{
    BackupDef, BackupDisk, BackupDiskMode, BackupModeAttr, BackupStorage, BackupStoreDef,
    CheckpointDef, CheckpointDiskDef, CheckpointFormat, CheckpointKind, CheckpointMode, Cipher,
    DiskBackup, Encryption, Ivgen, Origin, Seclabel, SecretRef, ServerDef, Transport,
};

fn checkpoint_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,16}"
}

/// Free text: any printable characters plus the ones XML must escape or may normalise.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["\\PC{0,16}", "[ a-z<>&'\"\t\n\r]{0,16}",]
}

fn nonempty_text() -> impl Strategy<Value = String> {
    prop_oneof!["\\PC{1,16}", "[a-z<>&'\"\t\n ]{1,16}"]
}

fn disk_target() -> impl Strategy<Value = String> {
    "(vd|sd|hd|xvd|fd|ubd)[a-z0-9_]{1,3}"
}

fn abs_path() -> impl Strategy<Value = String> {
    "(/[a-zA-Z0-9._ &'<-]{1,8}){1,4}"
}

fn embedded_domain() -> impl Strategy<Value = String> {
    // Raw markup: only characters that need no escaping.
    let path = "(/[a-z0-9._-]{1,8}){1,4}";
    ("[a-z][a-z0-9 _-]{0,10}", option::of(disk_target()), path).prop_map(|(name, disk, path)| {
        match disk {
            None => format!("<domain type='kvm'>\n  <name>{name}</name>\n</domain>"),
            Some(dev) => format!(
                "<domain type='kvm'>\n  <name>{name}</name>\n  <devices>\n    \
                 <disk type='file' device='disk'>\n      <source file='{path}'/>\n      \
                 <target dev='{dev}'/>\n    </disk>\n  </devices>\n</domain>"
            ),
        }
    })
}

fn checkpoint_disk() -> impl Strategy<Value = CheckpointDiskDef> {
    (
        prop_oneof![disk_target(), abs_path()],
        any::<bool>(),
        option::of("\\PC{1,12}"),
        option::of(any::<u64>()),
    )
        .prop_map(|(name, tracked, bitmap, size_bytes)| CheckpointDiskDef {
            name,
            checkpoint: if tracked {
                CheckpointKind::Bitmap
            } else {
                CheckpointKind::No
            },
            bitmap: bitmap.filter(|_| tracked),
            size_bytes: size_bytes.filter(|_| tracked),
            origin: Origin::default(),
        })
}

fn checkpoint_def() -> impl Strategy<Value = CheckpointDef> {
    (
        option::of(checkpoint_name()),
        option::of(text()),
        option::of(checkpoint_name()),
        option::of(any::<u64>()),
        vec(checkpoint_disk(), 0..4),
        option::of(embedded_domain()),
    )
        .prop_map(
            |(name, description, parent, creation_time, disks, domain_xml)| CheckpointDef {
                name,
                description,
                parent,
                creation_time,
                disks,
                domain_xml,
                origin: Origin::default(),
            },
        )
}

fn yes_no() -> impl Strategy<Value = Option<bool>> {
    option::of(any::<bool>())
}

/// The grammar's three forms of a seclabel.
fn seclabel() -> impl Strategy<Value = Seclabel> {
    let no_relabel = Just((Some(false), None, None));
    let relabel = (
        prop_oneof![Just(None), Just(Some(true))],
        option::of(text()),
    )
        .prop_map(|(relabel, label)| (relabel, None, label));
    let skip = any::<bool>().prop_map(|skip| (None, Some(skip), None));
    (
        option::of("[a-z]{1,8}"),
        prop_oneof![no_relabel, relabel, skip],
    )
        .prop_map(|(model, (relabel, labelskip, label))| Seclabel {
            model,
            relabel,
            labelskip,
            label,
        })
}

fn encryption() -> impl Strategy<Value = Encryption> {
    let secret = prop_oneof![
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".prop_map(SecretRef::Uuid),
        nonempty_text().prop_map(SecretRef::Usage),
    ];
    let cipher = (
        nonempty_text(),
        any::<u32>(),
        option::of(nonempty_text()),
        option::of(nonempty_text()),
        nonempty_text(),
        option::of(nonempty_text()),
    )
        .prop_map(|(name, size_bits, mode, hash, ivname, ivhash)| {
            (
                Cipher {
                    name,
                    size_bits,
                    mode,
                    hash,
                },
                Ivgen {
                    name: ivname,
                    hash: ivhash,
                },
            )
        });
    (
        prop::sample::select(&["default", "qcow", "luks", "luks2", "luks-any"][..]),
        option::of(prop::sample::select(&["qemu", "librbd"][..])),
        secret,
        option::of(cipher),
    )
        .prop_map(|(format, engine, secret, cipher)| Encryption {
            format: format.to_owned(),
            engine: engine.map(str::to_owned),
            secret,
            cipher,
        })
}

fn store() -> impl Strategy<Value = BackupStoreDef> {
    (abs_path(), vec(seclabel(), 0..3), option::of(encryption())).prop_map(
        |(path, seclabels, encryption)| BackupStoreDef {
            path,
            seclabels,
            encryption,
        },
    )
}

fn disk_backup(mode: BackupModeAttr) -> impl Strategy<Value = DiskBackup> {
    let pull = mode == BackupModeAttr::Pull;
    (
        any::<bool>(),
        option::of(any::<bool>()),
        option::of(checkpoint_name()),
        option::of(nonempty_text()),
        option::of(nonempty_text()),
        option::of(1..=u32::MAX),
        option::of(prop::sample::select(STORAGE_FORMATS)),
        option::of(store()),
    )
        .prop_map(
            move |(block, full, incremental, export_name, export_bitmap, index, format, store)| {
                let storage = if block {
                    BackupStorage::Block
                } else {
                    BackupStorage::File
                };
                let disk_mode = full.map(|f| {
                    if f {
                        BackupDiskMode::Full
                    } else {
                        BackupDiskMode::Incremental
                    }
                });
                // The grammar's rules: a pull block disk needs a scratch, a pull <driver>
                // needs a scratch and is qcow2, export names are pull-only, and a full disk
                // names no checkpoint.
                let store = match store {
                    None if pull && block => Some(BackupStoreDef {
                        path: "/dev/scratch".to_owned(),
                        seclabels: Vec::new(),
                        encryption: None,
                    }),
                    other => other,
                };
                let format = if pull {
                    format
                        .filter(|_| store.is_some())
                        .map(|_| ImageFormat::Qcow2)
                } else {
                    format.map(ImageFormat::from_name)
                };
                DiskBackup {
                    storage,
                    mode: disk_mode,
                    incremental: incremental.filter(|_| disk_mode != Some(BackupDiskMode::Full)),
                    export_name: export_name.filter(|_| pull),
                    export_bitmap: export_bitmap.filter(|_| pull),
                    index,
                    format,
                    store,
                }
            },
        )
}

fn server() -> impl Strategy<Value = ServerDef> {
    prop_oneof![
        ("[a-zA-Z0-9.-]{1,16}", option::of(1..=u16::MAX), yes_no()).prop_map(
            |(name, port, tls)| ServerDef {
                transport: Transport::Tcp,
                name: Some(name),
                port,
                tls,
                ..ServerDef::default()
            }
        ),
        (abs_path(), yes_no()).prop_map(|(socket, tls)| ServerDef {
            transport: Transport::Unix,
            socket: Some(socket),
            tls,
            ..ServerDef::default()
        }),
        (nonempty_text(), yes_no()).prop_map(|(group, tls)| ServerDef {
            transport: Transport::Fd,
            fdgroup: Some(group),
            tls,
            ..ServerDef::default()
        }),
    ]
}

fn backup_def() -> impl Strategy<Value = BackupDef> {
    any::<bool>().prop_flat_map(|pull| {
        let mode = if pull {
            BackupModeAttr::Pull
        } else {
            BackupModeAttr::Push
        };
        let disk =
            (disk_target(), option::of(disk_backup(mode))).prop_map(|(name, backup)| BackupDisk {
                name,
                backup,
                origin: Origin::default(),
            });
        (option::of(checkpoint_name()), server(), vec(disk, 0..4)).prop_map(
            move |(incremental, server, disks)| BackupDef {
                mode,
                incremental,
                server: pull.then_some(server),
                disks,
                origin: Origin::default(),
            },
        )
    })
}

const ALL: CheckpointFormat = CheckpointFormat {
    no_domain: false,
    include_size: true,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn checkpoint_survives_format_then_parse(def in checkpoint_def()) {
        let text = def.format(ALL);
        let parsed = CheckpointDef::parse(&text, CheckpointMode::Document)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&parsed, &def, "{}", text);
        prop_assert_eq!(parsed.format(ALL), text);
    }

    #[test]
    fn backup_survives_format_then_parse(def in backup_def()) {
        let text = def.format();
        let parsed = BackupDef::parse(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&parsed, &def, "{}", text);
        prop_assert_eq!(parsed.format(), text);
    }
}
