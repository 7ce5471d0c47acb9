//! The `vbackup` binary against real qemu-storage-daemon: a lab per test with its own state
//! directory, helpers to run the binary and the QEMU tools, and a drop that stops every daemon
//! and qemu-nbd the test caused, even when it fails. Each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vbackup_qemu::live::tools_available;
use vbackup_qemu::qsd::{RunDir, daemon_alive, kill_pid};

pub const BIN: &str = env!("CARGO_BIN_EXE_vbackup");

pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// A lab in a fresh temp dir; panics, naming `what`, when the QEMU tools are missing (a
    /// live test fails, never skips). Always `Some`: callers keep their `let Some(..) else`.
    pub fn new(what: &str) -> Option<Lab> {
        if !tools_available() {
            // A live test fails, never skips, where what it needs is missing.
            panic!(
                "QEMU tools missing (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon) for {what}: install qemu-utils 10"
            );
        }
        Some(Lab {
            dir: tempfile::tempdir().expect("tempdir"),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state(&self) -> PathBuf {
        self.path("st")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--state-dir").arg(self.state()).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Starts the binary in the background, its output discarded.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run vbackup")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vbackup {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs and requires failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "vbackup {args:?} succeeded");
        String::from_utf8(out.stderr).expect("utf-8")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("--json output parses")
    }

    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.path(name);
        tool(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&p)
                .arg(format!("{mib}M")),
        );
        p
    }

    /// Defines domain `vm` with one disk `vda` on a fresh qcow2 image `image`; returns its path.
    pub fn define_vm(&self, image: &str, mib: u64) -> PathBuf {
        let img = self.image(image, mib);
        self.ok(&["define", "vm", "--disk", &format!("vda={}", img.display())]);
        img
    }

    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    pub fn guest_uri(&self, domain: &str, disk: &str) -> String {
        let sock = RunDir::new(self.state().join("run").join(domain)).nbd_socket;
        format!("nbd+unix:///guest-{disk}?socket={}", sock.display())
    }

    /// A guest write through the running daemon's guest export.
    pub fn guest_write(&self, domain: &str, disk: &str, pattern: u8, offset: &str, len: &str) {
        tool(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c"])
                .arg(format!("write -P {pattern} {offset} {len}"))
                .arg(self.guest_uri(domain, disk)),
        );
    }

    /// The guest's view of a disk now, as a qcow2 copy.
    pub fn snapshot(&self, domain: &str, disk: &str, name: &str) -> PathBuf {
        let p = self.path(name);
        tool(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(self.guest_uri(domain, disk))
                .arg(&p),
        );
        p
    }

    /// Live daemons of this lab's state directories (the tests' and the demo's).
    pub fn daemon_pids(&self) -> Vec<u32> {
        [self.state().join("run"), self.path("demo/state/run")]
            .iter()
            .filter_map(|run| std::fs::read_dir(run).ok())
            .flat_map(|entries| entries.flatten())
            .filter_map(|e| RunDir::new(e.path()).read_pid().ok().flatten())
            .filter(|pid| daemon_alive(*pid))
            .collect()
    }
    /// qemu-nbd processes serving files of this lab.
    pub fn nbd_pids(&self) -> Vec<u32> {
        let marker = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let text = String::from_utf8_lossy(&cmdline);
                text.starts_with("qemu-nbd") && text.contains(&marker)
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for pid in self.daemon_pids().into_iter().chain(self.nbd_pids()) {
            let _ = kill_pid(pid);
            wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                !daemon_alive(pid)
            });
        }
    }
}

/// Polls `done` every `step` until it holds or `limit` has passed; returns whether it held.
pub fn wait_until(limit: Duration, step: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(step);
    }
    true
}

/// Kills process `pid` and waits (up to ten seconds) until it is gone.
pub fn kill_and_wait(pid: u32) {
    kill_pid(pid).expect("kill");
    wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
        !daemon_alive(pid)
    });
}

pub fn tool(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b)
        .status()
        .expect("qemu-img compare")
        .success()
}
