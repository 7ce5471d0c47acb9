//! Where a pull backup's exports are served, with the real `vbackup` binary: a client that
//! connects where the backup XML said, with the security it asked for, reaches the exports;
//! anything else is refused before the backup starts.
//!
//! - A managed domain's qemu-storage-daemon runs the one NBD server it may use: a pull naming
//!   it (or `backup-create --pull`, which names none) works; one naming another socket, TCP or
//!   TLS is refused naming both servers, and changes nothing.
//! - A domain attached to a real running VM (`qemu-system-x86_64`, no guest OS; its disk
//!   changes through HMP `qemu-io` on a second monitor) gets its NBD server exactly where the
//!   XML says: a unix socket, a TCP port, and TCP with TLS using certificates made here with
//!   openssl and configured with `vbackup config-set`. Clients without TLS or without the CA
//!   are refused.
//!
//! These tests fail (never skip) when qemu-system-x86_64, the QEMU tools, openssl or nbdinfo
//! are missing. Only loopback addresses are used.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use vbackup_qemu::live::tools_available;
use vbackup_qemu::qmp_socket::QmpSocket;
use vbackup_qemu::qsd::{RunDir, daemon_alive};

/// A lab whose tools must all be there.
fn lab(extra: &[&str]) -> Lab {
    assert!(
        tools_available(),
        "the QEMU tools (qemu-img, qemu-io, qemu-storage-daemon, qemu-nbd) are needed"
    );
    for tool in extra {
        // openssl has no --version; `version` is its subcommand.
        let probe = if *tool == "openssl" {
            "version"
        } else {
            "--version"
        };
        let found = Command::new(tool)
            .arg(probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "{tool} is needed by this test");
    }
    Lab {
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

fn daemon_socket(lab: &Lab) -> String {
    RunDir::new(lab.state().join("run/vm"))
        .nbd_socket
        .display()
        .to_string()
}

fn pull_xml(server: &str, incremental: Option<&str>) -> String {
    let inc = incremental
        .map(|i| format!("<incremental>{i}</incremental>"))
        .unwrap_or_default();
    format!("<domainbackup mode='pull'>{inc}{server}</domainbackup>")
}

fn unix_server(socket: &str) -> String {
    format!("<server transport='unix' socket='{socket}'/>")
}

fn tcp_server(port: u16, tls: bool) -> String {
    let tls = if tls { " tls='yes'" } else { "" };
    format!("<server transport='tcp' name='127.0.0.1' port='{port}'{tls}/>")
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("address").port()
}

/// Every path under `dir` (relative, sorted), sockets and directories included.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            names.push(
                path.strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            }
        }
    }
    names.sort();
    names
}

/// What a refused request must leave as it was: no job, no checkpoint, the same files.
/// (The lab's files outside the state directory, and the domain's store, are compared; the
/// daemon's run directory holds its own logs.)
struct Unchanged {
    files: Vec<String>,
    state: Vec<String>,
    checkpoints: String,
}

/// The lab's files, the state directory left out.
fn lab_files(lab: &Lab) -> Vec<String> {
    files_in(lab.dir.path())
        .into_iter()
        .filter(|f| !f.starts_with("st"))
        .collect()
}

impl Unchanged {
    fn now(lab: &Lab, domain: &str) -> Unchanged {
        Unchanged {
            files: lab_files(lab),
            state: files_in(&lab.state().join("domains").join(domain)),
            checkpoints: lab.ok(&["checkpoint-list", domain, "--name"]),
        }
    }

    fn check(&self, lab: &Lab, domain: &str) {
        assert_eq!(lab_files(lab), self.files, "no file appeared");
        assert_eq!(
            files_in(&lab.state().join("domains").join(domain)),
            self.state,
            "the store is as it was"
        );
        assert_eq!(
            lab.ok(&["checkpoint-list", domain, "--name"]),
            self.checkpoints
        );
        assert_eq!(
            lab.json(&["domjobinfo", domain, "--json"])["status"],
            "none"
        );
    }
}

fn nbdinfo(args: &[&str]) -> Output {
    Command::new("nbdinfo")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nbdinfo")
}

/// Begins the pull backup of `xml`, which must say its exports are served at `uri`, and reads
/// the 16 MiB disk's size there.
fn begin_serves_at(lab: &Lab, xml: &str, uri: &str) {
    assert_eq!(
        lab.ok(&["backup-begin", "vm", xml]),
        format!("Backup started; exports served at {uri}\n")
    );
    assert_eq!(
        nbdinfo_ok(&["--size", uri]).trim(),
        (16u64 << 20).to_string()
    );
}

fn nbdinfo_ok(args: &[&str]) -> String {
    let out = nbdinfo(args);
    assert!(
        out.status.success(),
        "nbdinfo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn managed_pull_is_served_only_on_the_daemons_server_and_other_servers_are_refused_naming_both() {
    let lab = lab(&["nbdinfo"]);
    lab.define_vm("a.qcow2", 16);
    let target = lab.path("backups").display().to_string();
    lab.ok(&["backup-set-default-target", "vm", &target]);
    lab.ok(&["start", "vm"]);
    lab.guest_write("vm", "vda", 0x41, "0", "1M");
    let own = daemon_socket(&lab);

    // Without <server> (backup-create names none) the daemon's server carries the exports.
    let out = lab.ok(&["backup-create", "vm", "--pull"]);
    assert!(
        out.contains(&format!("exports served at nbd+unix:///vda?socket={own}")),
        "{out}"
    );
    assert!(out.contains("created (full"), "{out}");
    let checkpoints = lab.ok(&["checkpoint-list", "vm", "--name"]);

    // Naming the daemon's own socket works, and the export is where the output says.
    let px = lab.file("own.xml", &pull_xml(&unix_server(&own), None));
    let uri = format!("nbd+unix:///vda?socket={own}");
    begin_serves_at(&lab, &px, &uri);
    lab.ok(&["domjobabort", "vm"]);

    // Anything else is refused before it starts, naming both servers, and changes nothing.
    let other = lab.path("x/pull.sock").display().to_string();
    let port = free_port();
    let refused = [
        (unix_server(&other), format!("unix:{other}")),
        (tcp_server(port, false), format!("tcp:127.0.0.1:{port}")),
        (
            tcp_server(port, true),
            format!("tcp:127.0.0.1:{port} with TLS"),
        ),
        (
            format!("<server transport='unix' socket='{own}' tls='yes'/>"),
            format!("unix:{own} with TLS"),
        ),
    ];
    let cx = lab.file(
        "c9.xml",
        "<domaincheckpoint><name>c9</name></domaincheckpoint>",
    );
    for (i, (server, requested)) in refused.iter().enumerate() {
        let px = lab.file(&format!("refused-{i}.xml"), &pull_xml(server, None));
        let before = Unchanged::now(&lab, "vm");
        let err = lab.fails(&["backup-begin", "vm", &px, &cx]);
        assert_eq!(
            err,
            format!(
                "error: unsupported configuration: the domain's NBD server already runs at unix:{own}, but the backup asks for {requested}; name that server in <server> (or give none)\n"
            )
        );
        before.check(&lab, "vm");
        assert!(!lab.path("x").exists(), "no socket was made");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens on the TCP port"
        );
    }
    assert_eq!(lab.ok(&["checkpoint-list", "vm", "--name"]), checkpoints);

    // A managed backup given such an XML is refused the same way, and records nothing.
    let px = lab.file("managed.xml", &pull_xml(&unix_server(&other), None));
    let backups = lab.json(&["backup-list", "vm", "--json"]);
    let before = Unchanged::now(&lab, "vm");
    let err = lab.fails(&["backup-create", "vm", &px, "--pull"]);
    assert!(
        err.contains(&format!("already runs at unix:{own}"))
            && err.contains(&format!("asks for unix:{other}")),
        "{err}"
    );
    before.check(&lab, "vm");
    assert_eq!(lab.json(&["backup-list", "vm", "--json"]), backups);
    lab.ok(&["shutdown", "vm"]);
}

/// A real VM with no guest OS: one qcow2 disk `vda` (a virtio-blk device of that id), a QMP
/// monitor for vbackup and a second one for the test's guest writes. Stopped by its pid.
struct Vm {
    pid: u32,
    qmp: PathBuf,
    monitor: PathBuf,
}

impl Vm {
    fn start(lab: &Lab) -> Vm {
        let disk = lab.image("vda.qcow2", 16);
        let (qmp, monitor, pidfile) = (
            lab.path("qmp.sock"),
            lab.path("mon2.sock"),
            lab.path("qemu.pid"),
        );
        // KVM when this process may open it, else the emulator.
        let accel = if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            "kvm"
        } else {
            "tcg"
        };
        let out = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                accel,
                "-m",
                "64",
                "-display",
                "none",
                "-nodefaults",
            ])
            .args(["-daemonize", "-pidfile"])
            .arg(&pidfile)
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=libvirt-1-storage",
                disk.display()
            ))
            .args([
                "-blockdev",
                "driver=qcow2,file=libvirt-1-storage,node-name=libvirt-1-format",
                "-device",
                "virtio-blk-pci,drive=libvirt-1-format,id=vda",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .stdin(Stdio::null())
            .output()
            .expect("run qemu-system-x86_64");
        assert!(
            out.status.success(),
            "qemu-system-x86_64: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        Vm { pid, qmp, monitor }
    }

    /// A guest write through the virtio device's own block backend.
    fn guest_write(&self, pattern: u8, offset: &str, len: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut mon = QmpSocket::connect(&self.monitor, deadline).expect("second monitor");
        let line = format!(
            "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
        );
        let out = mon
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": line})),
                deadline,
            )
            .expect("hmp qemu-io");
        assert_eq!(out, Value::String(String::new()), "qemu-io said {out}");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            !daemon_alive(self.pid)
        });
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir` (`ca-cert.pem`, `ca-key.pem`).
fn make_ca(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
        ],
    );
}

/// A certificate `<role>-cert.pem` / `<role>-key.pem` in `out`, signed by the CA in `ca`, with
/// `ca-cert.pem` beside it (the layout QEMU and libnbd read).
fn make_cert(ca: &Path, out: &Path, role: &str, extensions: &str) {
    std::fs::create_dir_all(out).expect("mkdir");
    let ext = out.join(format!("{role}.ext"));
    std::fs::write(&ext, extensions).expect("write extensions");
    let key = out.join(format!("{role}-key.pem"));
    let csr = out.join(format!("{role}.csr"));
    let cert = out.join(format!("{role}-cert.pem"));
    let s = |p: &Path| p.display().to_string();
    openssl(
        out,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=vbackup-{role}"),
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
        ],
    );
    openssl(
        out,
        &[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&ca.join("ca-cert.pem")),
            "-CAkey",
            &s(&ca.join("ca-key.pem")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &s(&ext),
            "-out",
            &s(&cert),
        ],
    );
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy the CA");
    for extra in [ext, csr] {
        let _ = std::fs::remove_file(extra);
    }
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

#[test]
fn attached_vm_pull_is_served_exactly_where_the_xml_says_over_unix_tcp_and_tls() {
    let lab = lab(&["qemu-system-x86_64", "openssl", "nbdinfo"]);
    let vm = Vm::start(&lab);
    let out = lab.ok(&["define", "vm", "--qmp", &vm.qmp.display().to_string()]);
    assert_eq!(out, "Domain 'vm' defined\n");
    assert!(lab.ok(&["domblklist", "vm"]).contains("vda"));
    vm.guest_write(0x11, "0", "64k");
    lab.ok(&["checkpoint-create-as", "vm", "c1"]);

    // A unix socket of the test's choosing.
    let socket = lab.path("pull.sock").display().to_string();
    let px = lab.file("unix.xml", &pull_xml(&unix_server(&socket), None));
    let uri = format!("nbd+unix:///vda?socket={socket}");
    begin_serves_at(&lab, &px, &uri);
    lab.ok(&["domjobabort", "vm"]);
    assert!(
        nbdinfo(&["--size", &uri]).status.code() != Some(0),
        "the server stops with the backup"
    );

    // A TCP port of the test's choosing.
    let port = free_port();
    let px = lab.file("tcp.xml", &pull_xml(&tcp_server(port, false), None));
    let uri = format!("nbd://127.0.0.1:{port}/vda");
    begin_serves_at(&lab, &px, &uri);
    lab.ok(&["domjobabort", "vm"]);

    // TCP without a port: the first free port of the configured range.
    let port = free_port();
    let p = port.to_string();
    let err = lab.fails(&["config-set", "backup_port_min", "65535"]);
    assert!(err.contains("needs backup_port_max set first"), "{err}");
    if port > 10872 {
        lab.ok(&["config-set", "backup_port_max", &p]);
    }
    assert_eq!(
        lab.ok(&["config-set", "backup_port_min", &p]),
        format!("backup_port_min = {port}\n")
    );
    lab.ok(&["config-set", "backup_port_max", &p]);
    let px = lab.file(
        "tcp-any.xml",
        &pull_xml("<server transport='tcp' name='127.0.0.1'/>", None),
    );
    let uri = format!("nbd://127.0.0.1:{port}/vda");
    begin_serves_at(&lab, &px, &uri);
    lab.ok(&["domjobabort", "vm"]);
    lab.ok(&["config-unset", "backup_port_min"]);
    lab.ok(&["config-unset", "backup_port_max"]);

    // TLS without certificates configured: refused before anything starts, saying what to set.
    let port = free_port();
    let px = lab.file("tls.xml", &pull_xml(&tcp_server(port, true), Some("c1")));
    let before = Unchanged::now(&lab, "vm");
    let err = lab.fails(&["backup-begin", "vm", &px]);
    assert_eq!(
        err,
        "error: Requested operation is not valid: backup TLS directory not configured; set it with `vbackup config-set backup_tls_x509_cert_dir DIR`, a directory holding ca-cert.pem, server-cert.pem, server-key.pem\n"
    );
    before.check(&lab, "vm");

    // Certificates: the server's and a client's from one CA, a stranger's from another.
    let pki = lab.path("pki");
    make_ca(&pki.join("ca"), "vbackup test CA");
    make_cert(&pki.join("ca"), &pki.join("server"), "server", SERVER_EXT);
    make_cert(&pki.join("ca"), &pki.join("client"), "client", CLIENT_EXT);
    make_ca(&pki.join("other-ca"), "another CA");
    make_cert(
        &pki.join("other-ca"),
        &pki.join("stranger"),
        "client",
        CLIENT_EXT,
    );
    let err = lab.fails(&[
        "config-set",
        "backup_tls_x509_cert_dir",
        &pki.join("client").display().to_string(),
    ]);
    assert!(
        err.contains("lacks server-cert.pem, server-key.pem"),
        "{err}"
    );
    let server_dir = pki.join("server").display().to_string();
    assert_eq!(
        lab.ok(&["config-set", "backup_tls_x509_cert_dir", &server_dir]),
        format!("backup_tls_x509_cert_dir = \"{server_dir}\"\n")
    );
    assert_eq!(
        lab.ok(&["config-get", "backup_tls_x509_cert_dir"]),
        format!("{server_dir}\n")
    );
    assert_eq!(
        lab.json(&["config-get", "--json"])["backup_tls_x509_verify"]["value"],
        1
    );

    // The guest writes after c1; the TLS export's dirty map shows exactly that write.
    vm.guest_write(0x21, "1M", "64k");
    let uri = format!("nbds://127.0.0.1:{port}/vda");
    assert_eq!(
        lab.ok(&["backup-begin", "vm", &px]),
        format!("Backup started; exports served at {uri}\n")
    );
    let client = format!("{uri}?tls-certificates={}", pki.join("client").display());
    let map = nbdinfo_ok(&["--map=qemu:dirty-bitmap:backup-vda", &client]);
    let dirty: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.last() == Some(&"dirty"))
        .collect();
    assert_eq!(dirty, vec![vec!["1048576", "65536", "1", "dirty"]], "{map}");

    // Without TLS, or with a certificate another CA signed, the server refuses the client.
    let plain = nbdinfo(&["--size", &format!("nbd://127.0.0.1:{port}/vda")]);
    assert!(!plain.status.success(), "a client without TLS got in");
    let stranger = format!("{uri}?tls-certificates={}", pki.join("stranger").display());
    let out = nbdinfo(&["--size", &stranger]);
    assert!(!out.status.success(), "a client without the CA got in");
    // The right client still reads after the refusals.
    assert_eq!(
        nbdinfo_ok(&["--size", &client]).trim(),
        (16u64 << 20).to_string()
    );
    lab.ok(&["domjobabort", "vm"]);
    assert_eq!(
        lab.json(&["domjobinfo", "vm", "--completed", "--json"])["status"],
        "completed"
    );
}
