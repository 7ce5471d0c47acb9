//! The end-to-end demonstration `vbackup demo` runs: the whole story on two fresh qcow2 disks
//! of a managed domain (define, start, guest writes with `qemu-io`, full, incremental push and
//! incremental pull backups with checkpoints, the pull read with vbackup's own NBD client, the
//! managed commands, a restore to a new domain), each backup compared with `qemu-img compare`
//! to the disk at its point in time.
//!
//! How the point-in-time references are taken: the demo is the guest's only writer, and every
//! guest write is a `qemu-io` process that has exited (its writes flushed into the daemon)
//! before the reference is read. Just before each `backup-begin`, the disk is copied with
//! `qemu-img convert` reading the guest export itself, so the copy is exactly what the guest
//! sees at the backup's point in time, with the daemon still holding the image (no second
//! opener, no image locking issue). The pull backup's reference is taken before it begins and
//! the guest writes again while the backup is read: the backup must still equal the reference.
//!
//! Every vbackup step runs the `vbackup` binary itself as a child process, as a user would;
//! what the steps print goes to the [`Demo::narrate`] function.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vbackup_qemu::nbd::{ExtentSink, NbdClient, copy::copy_dirty, dirty_bitmap_context};

use crate::error::Error;
use crate::units::human_bytes;

/// The demonstration's domain.
pub const DOMAIN: &str = "demo";
const DISKS: [&str; 2] = ["vda", "vdb"];

/// One run of the demonstration.
pub struct Demo {
    /// Where it writes disks, backups and its state directory.
    pub dir: PathBuf,
    /// The state directory (`DIR/state`).
    pub state: PathBuf,
    /// The `vbackup` binary each step runs, as a user would.
    pub exe: PathBuf,
    nbd_socket: PathBuf,
    /// Where what the steps print goes (the command line's stdout).
    pub narrate: fn(&str),
}

fn tool(cmd: &mut Command) -> Result<String, Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io(format!("cannot run {:?}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "{:?} {:?} failed: {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Demo {
    /// A demonstration in `dir` (created; by default a new directory under the temporary
    /// directory, kept) running the steps with this very binary; refused when `dir` holds
    /// one already.
    pub fn prepare(dir: Option<&Path>, narrate: fn(&str)) -> Result<Self, Error> {
        let dir = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(Error::io("cannot create the demo directory"))?;
                std::fs::canonicalize(d).map_err(Error::io("demo directory"))?
            }
            None => tempfile::Builder::new()
                .prefix("vbackup-demo-")
                .tempdir()
                .map_err(Error::io("cannot create a temporary directory"))?
                .keep(),
        };
        let exe = std::env::current_exe().map_err(Error::io("cannot find the vbackup binary"))?;
        let demo = Demo::new(dir, exe, narrate);
        if demo.exists() {
            return Err(Error::Other(format!(
                "{} already holds a demo; use another --dir",
                demo.dir.display()
            )));
        }
        Ok(demo)
    }

    /// A demonstration in `dir` (its state in `DIR/state`) running the steps with `exe`.
    pub fn new(dir: PathBuf, exe: PathBuf, narrate: fn(&str)) -> Self {
        let state = dir.join("state");
        Demo {
            nbd_socket: state.join("run").join(DOMAIN).join("nbd.sock"),
            dir,
            state,
            exe,
            narrate,
        }
    }

    /// Whether the directory already holds a demonstration.
    pub fn exists(&self) -> bool {
        self.state
            .join("domains")
            .join(DOMAIN)
            .join("domain.xml")
            .is_file()
    }

    /// Stops whatever the steps left running: the job, the daemon.
    pub fn stop(&self) {
        let _ = self.vbackup(&["domjobabort", DOMAIN]);
        let _ = self.vbackup(&["shutdown", DOMAIN]);
    }

    fn say(&self, text: &str) {
        (self.narrate)(text);
    }

    fn line(&self, text: &str) {
        (self.narrate)(text);
        (self.narrate)("\n");
    }

    fn vbackup(&self, args: &[&str]) -> Result<String, Error> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--state-dir").arg(&self.state).args(args);
        tool(&mut cmd)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn guest_uri(&self, disk: &str) -> String {
        format!(
            "nbd+unix:///guest-{disk}?socket={}",
            self.nbd_socket.display()
        )
    }

    /// Guest writes: `(pattern, offset MiB, length MiB)` on `disk`.
    fn write(&self, disk: &str, writes: &[(u8, u64, u64)]) -> Result<(), Error> {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for (p, off, len) in writes {
            cmd.arg("-c").arg(format!("write -P {p} {off}M {len}M"));
        }
        cmd.arg(self.guest_uri(disk));
        tool(&mut cmd).map(|_| ())
    }

    /// The disk as the guest sees it now, copied to `name`.
    fn reference(&self, disk: &str, name: &str) -> Result<PathBuf, Error> {
        let out = self.path(name);
        tool(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(self.guest_uri(disk))
                .arg(&out),
        )?;
        Ok(out)
    }

    fn compare(&self, a: &Path, b: &Path) -> Result<bool, Error> {
        let status = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
            .arg(a)
            .arg(b)
            .status()
            .map_err(Error::io("cannot run qemu-img compare"))?;
        Ok(status.success())
    }
}

/// Allocated bytes of a file.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(Error::io(format!("cannot write {}", path.display())))
}

/// Writes copied extents to a writable NBD export (qemu-nbd over the overlay).
struct NbdSink<'a>(&'a mut NbdClient);

impl ExtentSink for NbdSink<'_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0
            .write_at(offset, data)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        // A dirty extent that reads as zeroes must hide the older data below the overlay.
        let chunk = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(chunk.len() as u64);
            self.write_data(offset + done, &chunk[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// One verified backup of one disk.
pub struct Row {
    /// Which backup.
    pub backup: String,
    /// Which disk.
    pub disk: String,
    /// The backup image's allocated bytes.
    pub size: u64,
    /// How long it took.
    pub secs: f64,
    /// Whether it equals the disk at its point in time.
    pub verified: bool,
}

/// A `<domainbackup>`; a pull names `server`, the managed daemon's own NBD socket.
fn backup_xml(
    mode: &str,
    incremental: Option<&str>,
    targets: &[(String, PathBuf)],
    server: &Path,
) -> String {
    let mut xml = format!("<domainbackup mode='{mode}'>\n");
    if let Some(i) = incremental {
        xml.push_str(&format!("  <incremental>{i}</incremental>\n"));
    }
    if mode == "pull" {
        // The daemon's one NBD server, which also serves the guest's exports.
        xml.push_str(&format!(
            "  <server transport='unix' socket='{}'/>\n",
            server.display()
        ));
    }
    xml.push_str("  <disks>\n");
    for (disk, path) in targets {
        let element = if mode == "pull" { "scratch" } else { "target" };
        xml.push_str(&format!(
            "    <disk name='{disk}' type='file'>\n      <{element} file='{}'/>\n      <driver type='qcow2'/>\n    </disk>\n",
            path.display()
        ));
    }
    xml.push_str("  </disks>\n</domainbackup>\n");
    xml
}

/// Runs every step on disks of `size_mib` MiB; returns each backup of each disk.
pub fn run_steps(d: &Demo, size_mib: u64) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    std::fs::create_dir_all(d.path("disks")).map_err(Error::io("mkdir"))?;
    std::fs::create_dir_all(d.path("backups")).map_err(Error::io("mkdir"))?;
    std::fs::create_dir_all(d.path("refs")).map_err(Error::io("mkdir"))?;
    let mut define = vec!["define".to_owned(), DOMAIN.to_owned()];
    for disk in DISKS {
        let img = d.path(&format!("disks/{disk}.qcow2"));
        tool(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg(format!("{size_mib}M")),
        )?;
        define.push("--disk".into());
        define.push(format!("{disk}={}", img.display()));
    }
    let define: Vec<&str> = define.iter().map(String::as_str).collect();
    d.say(&d.vbackup(&define)?);
    d.say(&d.vbackup(&["start", DOMAIN])?);

    d.line("Guest writes its first data");
    d.write("vda", &[(0x11, 0, 4), (0x12, 20, 2)])?;
    d.write("vdb", &[(0x21, 1, 3)])?;

    // Full push backup with checkpoint c1.
    let full: Vec<(String, PathBuf)> = DISKS
        .iter()
        .map(|k| (k.to_string(), d.path(&format!("backups/full-{k}.qcow2"))))
        .collect();
    let refs0: Vec<PathBuf> = DISKS
        .iter()
        .map(|k| d.reference(k, &format!("refs/t0-{k}.qcow2")))
        .collect::<Result<_, _>>()?;
    write_file(
        &d.path("full.xml"),
        &backup_xml("push", None, &full, &d.nbd_socket),
    )?;
    write_file(
        &d.path("c1.xml"),
        "<domaincheckpoint><name>c1</name></domaincheckpoint>\n",
    )?;
    let t = Instant::now();
    let full_xml = d.path("full.xml").display().to_string();
    let c1_xml = d.path("c1.xml").display().to_string();
    d.say(&d.vbackup(&["backup-begin", DOMAIN, &full_xml, &c1_xml, "--wait"])?);
    let secs = t.elapsed().as_secs_f64();
    for (i, (disk, path)) in full.iter().enumerate() {
        rows.push(Row {
            backup: "full push (c1)".into(),
            disk: disk.clone(),
            size: allocated(path),
            secs,
            verified: d.compare(path, &refs0[i])?,
        });
    }

    d.line("Guest writes more");
    d.write("vda", &[(0x13, 2, 1), (0x14, 40, 4)])?;
    d.write("vdb", &[(0x22, 30, 1)])?;

    // Incremental push backup since c1, with checkpoint c2.
    let inc: Vec<(String, PathBuf)> = DISKS
        .iter()
        .map(|k| (k.to_string(), d.path(&format!("backups/inc1-{k}.qcow2"))))
        .collect();
    let refs1: Vec<PathBuf> = DISKS
        .iter()
        .map(|k| d.reference(k, &format!("refs/t1-{k}.qcow2")))
        .collect::<Result<_, _>>()?;
    write_file(
        &d.path("inc1.xml"),
        &backup_xml("push", Some("c1"), &inc, &d.nbd_socket),
    )?;
    write_file(
        &d.path("c2.xml"),
        "<domaincheckpoint><name>c2</name></domaincheckpoint>\n",
    )?;
    let t = Instant::now();
    let inc_xml = d.path("inc1.xml").display().to_string();
    let c2_xml = d.path("c2.xml").display().to_string();
    d.say(&d.vbackup(&["backup-begin", DOMAIN, &inc_xml, &c2_xml, "--wait"])?);
    let secs = t.elapsed().as_secs_f64();
    for (i, (disk, path)) in inc.iter().enumerate() {
        // The incremental image holds the changed clusters only: chain it onto the full one.
        tool(
            Command::new("qemu-img")
                .args(["rebase", "-u", "-F", "qcow2", "-b"])
                .arg(&full[i].1)
                .arg(path),
        )?;
        rows.push(Row {
            backup: "incremental push (c1..c2)".into(),
            disk: disk.clone(),
            size: allocated(path),
            secs,
            verified: d.compare(path, &refs1[i])?,
        });
    }

    d.line("Guest writes more");
    d.write("vda", &[(0x15, 8, 2)])?;
    d.write("vdb", &[(0x23, 50, 2)])?;

    // Incremental pull backup since c2, with checkpoint c3, read by vbackup's NBD client.
    let scratch: Vec<(String, PathBuf)> = DISKS
        .iter()
        .map(|k| (k.to_string(), d.path(&format!("scratch-{k}.qcow2"))))
        .collect();
    let refs2: Vec<PathBuf> = DISKS
        .iter()
        .map(|k| d.reference(k, &format!("refs/t2-{k}.qcow2")))
        .collect::<Result<_, _>>()?;
    write_file(
        &d.path("pull.xml"),
        &backup_xml("pull", Some("c2"), &scratch, &d.nbd_socket),
    )?;
    write_file(
        &d.path("c3.xml"),
        "<domaincheckpoint><name>c3</name></domaincheckpoint>\n",
    )?;
    let t = Instant::now();
    let pull_xml = d.path("pull.xml").display().to_string();
    let c3_xml = d.path("c3.xml").display().to_string();
    d.say(&d.vbackup(&["backup-begin", DOMAIN, &pull_xml, &c3_xml])?);
    d.line("Guest writes during the pull backup");
    d.write("vda", &[(0x16, 8, 1), (0x17, 0, 1)])?;
    d.write("vdb", &[(0x24, 50, 1)])?;
    let plan: Value = serde_json::from_str(&d.vbackup(&["backup-dumpxml", DOMAIN, "--json"])?)
        .map_err(|e| Error::Other(format!("backup-dumpxml --json: {e}")))?;
    let mut pulled = Vec::new();
    for (i, (disk, _)) in scratch.iter().enumerate() {
        let entry = plan["disks"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["target"] == disk.as_str()))
            .cloned()
            .unwrap_or(Value::Null);
        let export = entry["exportName"].as_str().unwrap_or(disk).to_owned();
        let bitmap = entry["tempBitmap"].as_str().unwrap_or_default().to_owned();
        let overlay = d.path(&format!("backups/inc2-{disk}.qcow2"));
        tool(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&inc[i].1)
                .arg(&overlay),
        )?;
        pull_into(d, &export, &bitmap, &overlay)?;
        pulled.push(overlay);
    }
    d.say(&d.vbackup(&["domjobabort", DOMAIN])?);
    let secs = t.elapsed().as_secs_f64();
    for (i, (disk, _)) in scratch.iter().enumerate() {
        rows.push(Row {
            backup: "incremental pull (c2..c3)".into(),
            disk: disk.clone(),
            size: allocated(&pulled[i]),
            secs,
            verified: d.compare(&pulled[i], &refs2[i])?,
        });
    }
    d.say(&d.vbackup(&["checkpoint-list", DOMAIN, "--tree"])?);
    rows.extend(managed_steps(d)?);
    Ok(rows)
}

/// Runs `backup-create` with `args`, echoes its output and returns the new backup's uuid.
fn create_backup(d: &Demo, args: &[&str]) -> Result<String, Error> {
    let out = d.vbackup(args)?;
    d.say(&out);
    out.lines()
        .find_map(|l| l.strip_prefix("Backup ")?.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| Error::Other(format!("backup-create printed no uuid: {out}")))
}

/// Managed backups: a full push and an incremental pull recorded in the catalogue, then the
/// last one restored to new images of a new domain and compared with the disks at its point
/// in time.
fn managed_steps(d: &Demo) -> Result<Vec<Row>, Error> {
    let target = d.path("managed").display().to_string();
    d.say(&d.vbackup(&["backup-set-default-target", DOMAIN, &target])?);
    let full = create_backup(
        d,
        &[
            "backup-create",
            DOMAIN,
            "--wait",
            "--description",
            "demo full",
        ],
    )?;
    d.line("Guest writes before the managed incremental backup");
    d.write("vda", &[(0x31, 20, 2)])?;
    d.write("vdb", &[(0x32, 0, 1), (0x33, 60, 1)])?;
    let refs: Vec<PathBuf> = DISKS
        .iter()
        .map(|k| d.reference(k, &format!("refs/t3-{k}.qcow2")))
        .collect::<Result<_, _>>()?;
    let last = create_backup(d, &["backup-create", DOMAIN, "--pull", "--parent", &full])?;
    d.say(&d.vbackup(&["backup-list", DOMAIN, "--tree"])?);
    let restored = d.path("restored");
    let t = Instant::now();
    d.say(&d.vbackup(&[
        "backup-restore",
        &last,
        "--new-domain",
        "demo-restored",
        "--dir",
        &restored.display().to_string(),
    ])?);
    let secs = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (disk, reference) in DISKS.iter().zip(&refs) {
        let image = restored.join(format!("{disk}.qcow2"));
        rows.push(Row {
            backup: "restore of managed pull".into(),
            disk: (*disk).to_owned(),
            size: allocated(&image),
            secs,
            verified: d.compare(&image, reference)?,
        });
    }
    Ok(rows)
}

/// Copies the dirty extents of a pull export into `overlay` through qemu-nbd.
fn pull_into(d: &Demo, export: &str, bitmap: &str, overlay: &Path) -> Result<(), Error> {
    let context = dirty_bitmap_context(bitmap);
    let mut reader = NbdClient::connect_unix(&d.nbd_socket, export, &[context.as_str()])?;
    let sock = d.path("overlay.sock");
    let _ = std::fs::remove_file(&sock);
    let log = File::create(d.path("qemu-nbd.log")).map_err(Error::io("qemu-nbd log"))?;
    let mut child = vbackup_qemu::children::tied(&mut Command::new("qemu-nbd"))
        .args(["-f", "qcow2", "--cache=unsafe", "-k"])
        .arg(&sock)
        .arg(overlay)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(Error::io("qemu-nbd log"))?)
        .stderr(log)
        .spawn()
        .map_err(Error::io("cannot run qemu-nbd"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut writer = loop {
        match NbdClient::connect_unix(&sock, "", &[]) {
            Ok(w) => break w,
            Err(e) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let copied = copy_dirty(&mut reader, bitmap, &mut NbdSink(&mut writer));
    let flushed = writer.flush();
    let _ = writer.disconnect();
    let _ = reader.disconnect();
    // qemu-nbd ends by itself once its only client left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = copied?;
    flushed?;
    d.line(&format!(
        "Pulled {} in {} extents from export '{export}'",
        human_bytes(report.bytes_copied),
        report.ranges
    ));
    Ok(())
}
