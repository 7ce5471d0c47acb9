//! A source disk and a chain of backups written through NBD, for the image and restore tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vbackup_core::catalogue::{BackupKind, Catalogue, ManagedBackup};
use vbackup_core::export::STATE_ZERO;
use vbackup_core::model::ImageFormat;
use vbackup_qemu::images::{self, NbdExport, run_tool};
use vbackup_qemu::nbd::BASE_ALLOCATION;
use vbackup_qemu::nbd::copy::select_ranges;

pub const MIB: u64 = 1 << 20;
pub const DISK_BYTES: u64 = 64 * MIB;

/// Checks that qemu-img, qemu-io and qemu-nbd can be run: a live test fails, never skips,
/// where what it needs is missing. Always `true` when it returns.
pub fn tools() -> bool {
    for t in ["qemu-img", "qemu-io", "qemu-nbd"] {
        let ok = Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "{t} is missing: this live test needs qemu-utils 10");
    }
    true
}

/// Runs qemu-io commands on a qcow2 image, as a guest writing to its disk.
pub fn guest(disk: &Path, ops: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for op in ops {
        c.args(["-c", op]);
    }
    let out = c.arg(disk).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {ops:?}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A frozen copy of the disk's content at one moment (raw).
pub fn snapshot(disk: &Path, to: &Path) {
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(disk)
            .arg(to),
    )
    .unwrap();
}

/// The extents of `qemu-img map --output=json` of an image.
pub fn map(image: &Path) -> Vec<serde_json::Value> {
    let out = run_tool(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(image),
    )
    .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The map extent covering `offset`.
pub fn extent_at(image: &Path, offset: u64) -> serde_json::Value {
    map(image)
        .into_iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            start <= offset && offset < start + e["length"].as_u64().unwrap()
        })
        .unwrap()
}

/// A disk, its backups and the disk's content at each backup.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub catalogue: Catalogue,
    /// uuid and raw snapshot of the disk, per backup in order.
    pub backups: Vec<(String, PathBuf)>,
}

pub fn uuid(n: usize) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

impl Lab {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        images::create_full(&disk, DISK_BYTES).unwrap();
        Self {
            disk,
            dir,
            catalogue: Catalogue::new("vm"),
            backups: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Backs up the disk: a full backup copies its allocated extents; an incremental one
    /// copies `dirty` into an overlay of the previous backup's image.
    pub fn backup(&mut self, dirty: Option<&[(u64, u64)]>) -> images::StoreReport {
        let n = self.backups.len();
        let target = self.path(&format!("b{n}.qcow2"));
        let parent = self.backups.last().map(|(u, _)| u.clone());
        let parent_image = parent
            .as_ref()
            .map(|u| PathBuf::from(&self.catalogue.get(u).unwrap().image("vda").unwrap().path));
        let export = NbdExport::start(&self.disk, &ImageFormat::Qcow2, false).unwrap();
        let mut source = export.connect(&[BASE_ALLOCATION]).unwrap();
        let ranges = match dirty {
            Some(r) => r.to_vec(),
            None => select_ranges(&mut source, BASE_ALLOCATION, |f| f & STATE_ZERO == 0).unwrap(),
        };
        let report =
            images::store_extents(&mut source, &ranges, &target, parent_image.as_deref()).unwrap();
        drop(export);
        let image = images::describe("vda", &target).unwrap();
        let record = ManagedBackup {
            uuid: uuid(n),
            domain: "vm".into(),
            parent: parent.clone(),
            checkpoint: None,
            creation_time: 1000 + n as u64,
            sequence: Some(n as u64 + 1),
            description: None,
            kind: if parent.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            disks: vec![image],
        };
        self.catalogue.insert(record).unwrap();
        let frozen = self.path(&format!("expected{n}.raw"));
        snapshot(&self.disk, &frozen);
        self.backups.push((uuid(n), frozen));
        report
    }

    /// A full backup, then three incrementals with data and zero writes in between.
    pub fn chain_of_four() -> Self {
        let mut lab = Self::new();
        guest(&lab.disk, &["write -P 0x11 0 4M", "write -P 0x12 32M 1M"]);
        lab.backup(None);
        guest(&lab.disk, &["write -P 0x21 1M 256k", "write -z 0 64k"]);
        lab.backup(Some(&[(0, 64 * 1024), (MIB, 256 * 1024)]));
        guest(&lab.disk, &["write -P 0x31 40M 128k", "write -z 32M 512k"]);
        lab.backup(Some(&[(32 * MIB, 512 * 1024), (40 * MIB, 128 * 1024)]));
        guest(&lab.disk, &["write -P 0x41 2M 64k", "write -P 0x42 63M 1M"]);
        lab.backup(Some(&[(2 * MIB, 64 * 1024), (63 * MIB, MIB)]));
        lab
    }

    pub fn image_of(&self, n: usize) -> PathBuf {
        PathBuf::from(&self.catalogue.get(&uuid(n)).unwrap().disks[0].path)
    }
}
