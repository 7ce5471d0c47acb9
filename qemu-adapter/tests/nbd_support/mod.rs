//! A minimal qemu-storage-daemon harness for the NBD client's live tests and benchmark: it
//! starts the daemon in a temp dir, speaks the few QMP lines needed as raw JSON, and stops the
//! daemon it started (by its own pid, through `Child`) even when a test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running qemu-storage-daemon with a QMP connection.
pub struct Qsd {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    pub dir: PathBuf,
}

impl Qsd {
    /// Starts the daemon with a QMP socket in `dir` and negotiates capabilities.
    pub fn start(dir: &Path) -> Qsd {
        let qmp = dir.join("qmp.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon must be installed (qemu-utils >= 7)");
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&qmp) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("QMP socket never appeared: {e}"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qsd {
            child,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next_id: 1,
            dir: dir.to_path_buf(),
        };
        let greeting = q.read_message();
        assert!(!greeting.is_null(), "no QMP greeting");
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line).expect("QMP sends JSON lines"),
            // The daemon closed the monitor (after `quit`); callers see no reply.
            _ => Value::Null,
        }
    }

    /// Runs a command; `Err(desc)` when QEMU refuses it. Events in between are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        // One write per command: QEMU parses a command as soon as its closing brace arrives,
        // so after `quit` a separate newline write could meet a closed socket.
        let line = format!(
            "{}\n",
            json!({"execute": command, "arguments": arguments, "id": id})
        );
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let m = self.read_message();
            if m.is_null() {
                return Err("QMP connection closed".into());
            }
            if m.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            return Err(m["error"]["desc"].as_str().unwrap_or("?").to_string());
        }
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("{command} failed: {e}"))
    }

    /// Opens a qcow2 image as node `node`.
    pub fn add_qcow2(&mut self, node: &str, path: &Path) {
        self.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": path, "node-name": format!("{node}-file")}}),
        );
    }

    /// Starts the NBD server on a unix socket in the temp dir and returns its path.
    pub fn start_nbd_unix(&mut self) -> PathBuf {
        let sock = self.dir.join("nbd.sock");
        self.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        sock
    }

    /// Adds an NBD export of `node` named `name`.
    pub fn export(&mut self, name: &str, node: &str, writable: bool, bitmaps: &[&str]) {
        let mut args = json!({"type": "nbd", "id": name, "node-name": node, "name": name,
                              "writable": writable, "allocation-depth": true});
        if !bitmaps.is_empty() {
            args["bitmaps"] = json!(bitmaps);
        }
        self.ok("block-export-add", args);
    }

    /// Kills the daemon at once (SIGKILL to the child this harness started) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the daemon to quit and waits for it; kills it if it does not exit in time.
    pub fn quit(mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("qemu-storage-daemon exited early: {status}");
        }
        let _ = self.execute("quit", json!({}));
        self.wait_or_kill();
    }

    fn wait_or_kill(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a tool and panics with its stderr when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The URI libnbd tools and qemu-io use for an export on a unix socket.
pub fn nbd_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// `nbdinfo --map=CONTEXT --json` as (offset, length, type) triples, adjacent equal types merged.
pub fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), "--json", uri]);
    let v: Value = serde_json::from_str(&out).expect("nbdinfo --json output");
    let triples = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    merge_map(triples)
}

/// Merges adjacent runs with equal flags, so maps compare regardless of how a server split them.
pub fn merge_map(map: Vec<(u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (o, l, t) in map {
        match out.last_mut() {
            Some((lo, ll, lt)) if *lt == t && *lo + *ll == o => *ll += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}
