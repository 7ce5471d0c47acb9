//! QEMU's bitmap persistence rules, observed on the real daemon: a clean `quit` writes
//! persistent bitmaps; SIGKILL leaves loaded ones inconsistent and loses new ones.

use std::path::PathBuf;

use serde_json::{Value, json};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::live::{self, LiveLab};
use vbackup_qemu::qsd::{Qsd, QsdDisk, QsdError, format_node};

const MIB: u64 = 1024 * 1024;

fn top() -> String {
    format_node("vda", 0)
}

fn add_bitmap(qsd: &mut Qsd, name: &str) {
    qsd.execute(
        "block-dirty-bitmap-add",
        json!({"node": top(), "name": name, "persistent": true, "granularity": 65536}),
    )
    .unwrap();
}

/// A lab with a 32 MiB qcow2 disk `vda`; panics without QEMU's tools.
fn lab_with_one_disk() -> Option<(LiveLab, PathBuf, QsdDisk)> {
    if !live::tools_available() {
        // A live test fails, never skips, where what it needs is missing.
        panic!(
            "QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon): install qemu-utils 10"
        );
    }
    let lab = LiveLab::new().unwrap();
    let image = lab
        .image("vda.qcow2", ImageFormat::Qcow2, 32 * MIB)
        .unwrap();
    let disk = QsdDisk::single("vda", &image, ImageFormat::Qcow2);
    Some((lab, image, disk))
}

fn bitmap<'a>(bitmaps: &'a [Value], name: &str) -> Option<&'a Value> {
    bitmaps.iter().find(|b| b["name"] == name)
}

/// Writes 1 MiB + 64 KiB + 100 KiB, which dirties 1245184 bytes at 64 KiB granularity.
fn guest_writes(qsd: &Qsd) {
    let guest = qsd.guest_export_uri("vda");
    live::write_pattern(&guest, 0x11, 0, MIB).unwrap();
    live::write_pattern(&guest, 0x12, 8 * MIB, 64 * 1024).unwrap();
    live::write_pattern(&guest, 0x13, 20 * MIB, 100 * 1024).unwrap();
}

#[test]
fn persistent_bitmap_survives_quit_and_restart() {
    let Some((mut lab, image, disk)) = lab_with_one_disk() else {
        return;
    };
    let mut qsd = lab.start_qsd("run", std::slice::from_ref(&disk)).unwrap();
    add_bitmap(&mut qsd, "c1");
    guest_writes(&qsd);
    let before = live::node_bitmaps(&mut qsd, &top()).unwrap();
    assert_eq!(bitmap(&before, "c1").unwrap()["count"], json!(1_245_184));
    // Created in this run: not in the image header until the image is closed.
    assert!(live::on_disk_bitmaps(&image).unwrap().is_empty());
    qsd.quit().unwrap();

    let on_disk = live::on_disk_bitmaps(&image).unwrap();
    assert_eq!(on_disk.len(), 1);
    assert_eq!(on_disk[0].name, "c1");
    assert_eq!(on_disk[0].flags, vec!["auto".to_owned()]);
    assert_eq!(on_disk[0].granularity_bytes, 65536);

    let mut qsd = lab.start_qsd("run", &[disk]).unwrap();
    let after = live::node_bitmaps(&mut qsd, &top()).unwrap();
    let c1 = bitmap(&after, "c1").expect("c1 reloaded");
    assert_eq!(c1["count"], json!(1_245_184));
    assert_eq!(c1["recording"], json!(true));
    assert_eq!(c1["persistent"], json!(true));
    assert!(c1.get("inconsistent").is_none());
    // Open read-write again: the header marks it in use until the next clean close.
    assert!(
        live::on_disk_bitmaps(&image).unwrap()[0]
            .flags
            .contains(&"in-use".to_owned())
    );
    qsd.quit().unwrap();
}

#[test]
fn sigkill_leaves_loaded_bitmaps_inconsistent_and_loses_new_ones() {
    let Some((mut lab, image, disk)) = lab_with_one_disk() else {
        return;
    };

    let mut qsd = lab.start_qsd("run", std::slice::from_ref(&disk)).unwrap();
    add_bitmap(&mut qsd, "old");
    qsd.quit().unwrap();

    let mut qsd = lab.start_qsd("run", std::slice::from_ref(&disk)).unwrap();
    add_bitmap(&mut qsd, "new");
    guest_writes(&qsd);
    let pid = qsd.pid();
    qsd.kill().unwrap();
    assert!(!vbackup_qemu::qsd::daemon_alive(pid));

    let on_disk = live::on_disk_bitmaps(&image).unwrap();
    let names: Vec<&str> = on_disk.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        ["old"],
        "the bitmap created in the killed run is gone"
    );
    assert!(on_disk[0].flags.contains(&"in-use".to_owned()));

    // The pid file outlived the crash; the next start clears the leftovers.
    let reconnected = lab.reconnect("run");
    assert!(
        matches!(
            reconnected,
            Err(live::LiveError::Qsd(QsdError::DaemonGone { pid: p })) if p == pid
        ),
        "{reconnected:?}"
    );
    let mut qsd = lab.start_qsd("run", &[disk]).unwrap();
    let bitmaps = live::node_bitmaps(&mut qsd, &top()).unwrap();
    assert!(bitmap(&bitmaps, "new").is_none());
    let old = bitmap(&bitmaps, "old").expect("old reloaded");
    assert_eq!(old["inconsistent"], json!(true));
    assert_eq!(old["recording"], json!(false));
    assert_eq!(old["count"], json!(0));

    // An inconsistent bitmap can be used for nothing but removal.
    qsd.execute(
        "block-dirty-bitmap-add",
        json!({"node": top(), "name": "tmp", "persistent": false, "disabled": true}),
    )
    .unwrap();
    let err = qsd
        .execute(
            "block-dirty-bitmap-merge",
            json!({"node": top(), "target": "tmp", "bitmaps": ["old"]}),
        )
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("Bitmap 'old' is inconsistent and cannot be used"),
        "{message}"
    );
    qsd.execute(
        "block-dirty-bitmap-remove",
        json!({"node": top(), "name": "old"}),
    )
    .unwrap();
    qsd.quit().unwrap();
    assert!(live::on_disk_bitmaps(&image).unwrap().is_empty());
}
