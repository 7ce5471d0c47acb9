//! virsh's two ways of giving arguments: one scripted session, run once with positional
//! arguments and once with virsh's named ones (`--domain`, `--checkpointname`, `--xmlfile`,
//! `--name`, `--description`, `--backupxml`, `--checkpointxml`, `--file`), against a managed
//! domain on real qemu-storage-daemon. Both runs must print the same, once the lab's path,
//! uuids and clock readings are masked. The test fails when the QEMU tools are missing.

mod support;

use support::Lab;

/// One step: the positional form and the named form of the same command line. `{lab}` stands
/// for the lab directory.
type Step = (&'static [&'static str], &'static [&'static str]);

const SESSION: &[Step] = &[
    (
        &["define", "vm", "--disk", "vda={lab}/vda.qcow2"],
        &["define", "--file", "vm", "--disk", "vda={lab}/vda.qcow2"],
    ),
    (&["domblklist", "vm"], &["domblklist", "--domain", "vm"]),
    (&["start", "vm"], &["start", "--domain", "vm"]),
    (
        &["checkpoint-create-as", "vm", "c1", "first one"],
        &[
            "checkpoint-create-as",
            "--domain",
            "vm",
            "--name",
            "c1",
            "--description",
            "first one",
        ],
    ),
    (
        &["checkpoint-create-as", "vm", "c2", "--print-xml"],
        &[
            "checkpoint-create-as",
            "--name",
            "c2",
            "--domain",
            "vm",
            "--print-xml",
        ],
    ),
    (
        &["checkpoint-create", "vm", "{lab}/c2.xml"],
        &[
            "checkpoint-create",
            "--xmlfile",
            "{lab}/c2.xml",
            "--domain",
            "vm",
        ],
    ),
    (
        &["checkpoint-list", "vm", "--parent"],
        &["checkpoint-list", "--domain", "vm", "--parent"],
    ),
    (
        &["checkpoint-parent", "vm", "c2"],
        &[
            "checkpoint-parent",
            "--domain",
            "vm",
            "--checkpointname",
            "c2",
        ],
    ),
    // A mix: the domain by name, the checkpoint by position, as virsh allows.
    (
        &["checkpoint-info", "vm", "c1"],
        &["checkpoint-info", "--domain", "vm", "c1"],
    ),
    (
        &["checkpoint-dumpxml", "vm", "c1", "--no-domain"],
        &[
            "checkpoint-dumpxml",
            "--checkpointname",
            "c1",
            "vm",
            "--no-domain",
        ],
    ),
    (
        &[
            "backup-begin",
            "vm",
            "{lab}/push.xml",
            "{lab}/c3.xml",
            "--wait",
        ],
        &[
            "backup-begin",
            "--domain",
            "vm",
            "--backupxml",
            "{lab}/push.xml",
            "--checkpointxml",
            "{lab}/c3.xml",
            "--wait",
        ],
    ),
    (
        &["domjobinfo", "vm", "--completed"],
        &["domjobinfo", "--domain", "vm", "--completed"],
    ),
    (
        &["backup-begin", "vm", "{lab}/pull.xml"],
        &[
            "backup-begin",
            "--backupxml",
            "{lab}/pull.xml",
            "--domain",
            "vm",
        ],
    ),
    (
        &["backup-dumpxml", "vm"],
        &["backup-dumpxml", "--domain", "vm"],
    ),
    (&["domjobabort", "vm"], &["domjobabort", "--domain", "vm"]),
    (
        &["checkpoint-delete", "vm", "c2"],
        &[
            "checkpoint-delete",
            "--domain",
            "vm",
            "--checkpointname",
            "c2",
        ],
    ),
    (
        &["checkpoint-list", "vm", "--name"],
        &["checkpoint-list", "--name", "--domain", "vm"],
    ),
    (
        &["backup-set-default-target", "vm", "{lab}/backups"],
        &[
            "backup-set-default-target",
            "--domain",
            "vm",
            "{lab}/backups",
        ],
    ),
    (
        &["backup-set-default-target", "vm", "{lab}/backups"],
        &["backup-set-default-target", "--dir", "{lab}/backups", "vm"],
    ),
    (
        &["backup-create", "vm", "--wait"],
        &["backup-create", "--domain", "vm", "--wait"],
    ),
    (&["backup-list", "vm"], &["backup-list", "--domain", "vm"]),
    (&["shutdown", "vm"], &["shutdown", "--domain", "vm"]),
    (
        &[
            "undefine",
            "vm",
            "--checkpoints-metadata",
            "--remove-all-backups",
        ],
        &[
            "undefine",
            "--domain",
            "vm",
            "--checkpoints-metadata",
            "--remove-all-backups",
        ],
    ),
];

/// Runs the session in a fresh lab with one form of each step; returns what each step printed
/// (status, stdout, stderr), masked.
fn run_session(named: bool) -> Vec<String> {
    let lab = Lab::new("virsh argument forms").expect("the QEMU tools are installed");
    lab.image("vda.qcow2", 16);
    let root = lab.dir.path().display().to_string();
    lab.file(
        "c2.xml",
        "<domaincheckpoint><name>c2</name></domaincheckpoint>",
    );
    lab.file(
        "c3.xml",
        "<domaincheckpoint><name>c3</name></domaincheckpoint>",
    );
    lab.file(
        "push.xml",
        &format!(
            "<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='{root}/full.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>"
        ),
    );
    let socket = vbackup_qemu::qsd::RunDir::new(lab.state().join("run/vm")).nbd_socket;
    lab.file(
        "pull.xml",
        &format!(
            "<domainbackup mode='pull'><incremental>c3</incremental><server transport='unix' socket='{}'/></domainbackup>",
            socket.display()
        ),
    );
    let mut printed = Vec::new();
    for (positional, by_name) in SESSION {
        let form = if named { by_name } else { positional };
        let args: Vec<String> = form.iter().map(|a| a.replace("{lab}", &root)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lab.run(&args);
        let text = format!(
            "$ {}\nstatus {}\n{}{}",
            positional.join(" "),
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        printed.push(mask(&text.replace(&root, "LAB")));
    }
    printed
}

/// Masks what differs from run to run: uuids, clock readings, and the time-derived suffixes of
/// generated file names (runs of nine digits or more).
fn mask(text: &str) -> String {
    // Uuids first: one may hold a run of nine digits or more, which the next step would mask
    // in part, leaving a word no longer recognised as a uuid.
    let text: String = text
        .lines()
        .map(|line| {
            let words: Vec<&str> = line
                .split(' ')
                .map(|w| if is_uuid(w) { "UUID" } else { w })
                .collect();
            words.join(" ") + "\n"
        })
        .collect();
    let text = mask_long_numbers(&text);
    let mut out = String::new();
    for line in text.lines() {
        let clock = line.contains("+0000")
            || line.contains("Time elapsed")
            || line.contains("creationTime")
            || line.contains("<uuid>");
        if clock {
            // Digit runs of any length become one mark, and the padding after them one space,
            // so a clock reading's width does not show either.
            let mut last = ' ';
            for c in line.chars() {
                let c = if c.is_ascii_digit() { '#' } else { c };
                if !(c == last && (c == '#' || c == ' ')) {
                    out.push(c);
                }
                last = c;
            }
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn mask_long_numbers(text: &str) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    for c in text.chars().chain(std::iter::once('\n')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if digits.len() >= 9 {
            out.push('N');
        } else {
            out.push_str(&digits);
        }
        digits.clear();
        out.push(c);
    }
    out.pop();
    out
}

fn is_uuid(word: &str) -> bool {
    let word = word.trim_matches(|c: char| !c.is_ascii_hexdigit());
    let groups: Vec<&str> = word.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[test]
fn a_session_with_virshs_named_arguments_prints_what_the_positional_one_prints() {
    let positional = run_session(false);
    let named = run_session(true);
    for (p, n) in positional.iter().zip(&named) {
        assert_eq!(p, n, "the two forms differ");
    }
    // The session did what it says: every step but none failed.
    for step in &positional {
        assert!(step.contains("\nstatus 0\n"), "{step}");
    }
    assert!(positional[3].contains("Domain checkpoint c1 created"));
    assert!(positional[9].contains("<description>first one</description>"));
    assert!(positional[10].contains("Backup complete"));
}
