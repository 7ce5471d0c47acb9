//! The NBD client against a real qemu-storage-daemon, checked with libnbd's `nbdinfo` and
//! `nbdcopy` and with `qemu-img compare`.
//!
//! Each test builds its own lab: a small qcow2 image with known data, a dirty bitmap that
//! records known "guest" writes made by `qemu-io` through a writable export, and a read-only
//! pull export carrying the (disabled) bitmap.

mod nbd_support;

use std::fs::File;
use std::path::PathBuf;

use nbd_support::{Qsd, merge_map, nbd_uri, nbdinfo_map, run};
use serde_json::json;
use vbackup_core::export::ExportReader;
use vbackup_qemu::nbd::copy::{copy_allocated, copy_dirty, select_ranges};
use vbackup_qemu::nbd::{
    BASE_ALLOCATION, ExtentSink, FileSink, HandshakeError, NbdClient, NbdError, NbdSink,
    RequestError, dirty_bitmap_context,
};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 24 * MIB;
const GRANULE: u64 = 64 * KIB;
const BITMAP: &str = "b0";

/// Data written before the bitmap exists: (pattern, offset, length); pattern 0 = write zeroes.
const BASE_WRITES: &[(u8, u64, u64)] = &[
    (0x11, 0, MIB),
    (0x22, 4 * MIB, 192 * KIB),
    (0x12, 15 * MIB, 3 * MIB),
];
/// Guest writes recorded by the bitmap.
const GUEST_WRITES: &[(u8, u64, u64)] = &[
    (0x33, MIB - 64 * KIB, 128 * KIB),
    (0x44, 10 * MIB + 512, 64 * KIB + 100),
    (0x55, 20 * MIB, MIB),
    (0, 4 * MIB, 64 * KIB),
    (0x66, 16 * MIB, 4 * KIB),
];

struct Lab {
    qsd: Qsd,
    nbd: PathBuf,
    _dir: tempfile::TempDir,
}

fn io_commands(writes: &[(u8, u64, u64)]) -> Vec<String> {
    writes
        .iter()
        .flat_map(|&(p, o, l)| {
            let c = if p == 0 {
                format!("write -z {o} {l}")
            } else {
                format!("write -P {p:#x} {o} {l}")
            };
            ["-c".to_string(), c]
        })
        .collect()
}

fn apply(image: &mut [u8], writes: &[(u8, u64, u64)]) {
    for &(p, o, l) in writes {
        image[o as usize..(o + l) as usize].fill(p);
    }
}

fn base_image() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    apply(&mut v, BASE_WRITES);
    v
}

fn final_image() -> Vec<u8> {
    let mut v = base_image();
    apply(&mut v, GUEST_WRITES);
    v
}

/// Dirty ranges as the bitmap must hold them: every touched granule, merged.
fn expected_dirty() -> Vec<(u64, u64)> {
    let mut granules: Vec<u64> = GUEST_WRITES
        .iter()
        .flat_map(|&(_, o, l)| (o / GRANULE..(o + l).div_ceil(GRANULE)).collect::<Vec<_>>())
        .collect();
    granules.sort_unstable();
    granules.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for g in granules {
        match out.last_mut() {
            Some((o, l)) if *o + *l == g * GRANULE => *l += GRANULE,
            _ => out.push((g * GRANULE, GRANULE)),
        }
    }
    out
}

/// The lab's image in `dir`, holding [`BASE_WRITES`].
fn make_base_image(dir: &std::path::Path) -> PathBuf {
    let image = dir.join("disk.qcow2");
    let image_s = image.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image_s, &SIZE.to_string()],
    );
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    args.extend(io_commands(BASE_WRITES));
    args.push(image_s.into());
    run(
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    image
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let image = make_base_image(dir.path());

        let mut qsd = Qsd::start(dir.path());
        qsd.add_qcow2("disk", &image);
        qsd.ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": BITMAP, "persistent": false, "granularity": GRANULE}),
        );
        let nbd = qsd.start_nbd_unix();
        qsd.export("guest", "disk", true, &[]);
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        args.extend(io_commands(GUEST_WRITES));
        args.push(nbd_uri("guest", &nbd));
        run(
            "qemu-io",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        // A read-only export may only carry a frozen bitmap.
        qsd.ok(
            "block-dirty-bitmap-disable",
            json!({"node": "disk", "name": BITMAP}),
        );
        qsd.export("pull", "disk", false, &[BITMAP]);
        Lab {
            qsd,
            nbd,
            _dir: dir,
        }
    }

    fn dir(&self) -> PathBuf {
        self.qsd.dir.clone()
    }

    fn uri(&self) -> String {
        nbd_uri("pull", &self.nbd)
    }

    fn connect(&self, contexts: &[&str]) -> NbdClient {
        NbdClient::connect_unix(&self.nbd, "pull", contexts).expect("connect to the pull export")
    }
}

/// Our block status over the whole export, merged like the nbdinfo map.
fn our_map(client: &mut NbdClient, context: &str) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    let mut offset = 0;
    while offset < client.size() {
        // Ask in pieces so several requests and reply sizes are exercised.
        let extents = client.block_status(context, offset, 5 * MIB).unwrap();
        assert!(!extents.is_empty());
        for e in extents {
            map.push((offset, e.length, e.flags));
            offset += e.length;
        }
    }
    assert_eq!(offset, client.size(), "extents never pass the export end");
    merge_map(map)
}

#[test]
fn block_status_equals_nbdinfo_for_allocation_and_dirty_bitmap() {
    let lab = Lab::new();
    let bitmap = dirty_bitmap_context(BITMAP);
    let mut c = lab.connect(&[BASE_ALLOCATION, &bitmap]);

    let ours = our_map(&mut c, BASE_ALLOCATION);
    assert_eq!(ours, nbdinfo_map(&lab.uri(), BASE_ALLOCATION));
    assert!(ours.iter().any(|&(_, _, f)| f == 0), "some data");
    assert!(ours.iter().any(|&(_, _, f)| f & 2 != 0), "some zeroes");

    let ours = our_map(&mut c, &bitmap);
    assert_eq!(ours, nbdinfo_map(&lab.uri(), &bitmap));
    let dirty: Vec<(u64, u64)> = ours
        .iter()
        .filter(|e| e.2 & 1 != 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(dirty, expected_dirty());
    c.disconnect().unwrap();
    lab.qsd.quit();
}

#[test]
fn meta_contexts_list_what_the_export_offers() {
    let lab = Lab::new();
    let c = lab.connect(&[]);
    let contexts = c.meta_contexts();
    for wanted in [
        BASE_ALLOCATION,
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
    ] {
        assert!(
            contexts.iter().any(|c| c == wanted),
            "{wanted} in {contexts:?}"
        );
    }
    assert_eq!(c.size(), SIZE);
    assert!(c.info().read_only());
    assert!(c.info().structured_replies);
    assert!(
        c.info().contexts.is_empty(),
        "nothing negotiated when nothing asked"
    );
    c.disconnect().unwrap();
    lab.qsd.quit();
}

#[test]
fn reads_return_the_image_bytes() {
    let lab = Lab::new();
    let mut c = lab.connect(&[]);
    let expected = final_image();
    // Small requests and a deep window: many interleaved replies.
    c.set_pipeline(32, 256 * 1024);
    let mut all = vec![0xffu8; SIZE as usize];
    c.read_at(0, &mut all).unwrap();
    assert!(all == expected, "whole-export read differs from the image");
    for (o, l) in [
        (0u64, 1usize),
        (MIB - 3, 10),
        (10 * MIB + 511, 70_000),
        (SIZE - 1, 1),
    ] {
        let mut buf = vec![0xffu8; l];
        c.read_at(o, &mut buf).unwrap();
        assert_eq!(buf, expected[o as usize..o as usize + l], "read at {o}");
    }
    let mut past = [0u8; 2];
    match c.read_at(SIZE - 1, &mut past) {
        Err(NbdError::Request(RequestError::OutOfRange { .. })) => {}
        other => panic!("read past the end: {other:?}"),
    }
    // The connection is still usable after a refused request.
    let mut one = [0u8; 1];
    c.read_at(0, &mut one).unwrap();
    assert_eq!(one[0], 0x11);
    c.disconnect().unwrap();
    lab.qsd.quit();
}

#[test]
fn copying_dirty_extents_onto_the_base_reproduces_the_export() {
    let lab = Lab::new();
    let bitmap = dirty_bitmap_context(BITMAP);
    let mut c = lab.connect(&[&bitmap]);
    let dest = lab.dir().join("incremental.raw");
    std::fs::write(&dest, base_image()).unwrap();
    let file = File::options().write(true).open(&dest).unwrap();
    let report = copy_dirty(&mut c, BITMAP, &mut FileSink::overwrite(&file)).unwrap();
    drop(file);
    let dirty = expected_dirty();
    assert_eq!(report.ranges, dirty.len());
    assert_eq!(report.bytes_copied, dirty.iter().map(|r| r.1).sum::<u64>());
    c.disconnect().unwrap();

    let reference = assert_same_as_nbdcopy(&lab, &dest);
    let ours = std::fs::read(&dest).unwrap();
    assert!(
        ours == std::fs::read(&reference).unwrap(),
        "differs from nbdcopy"
    );
    assert!(ours == final_image());
    lab.qsd.quit();
}

/// Copies the lab's export with `nbdcopy` and checks with `qemu-img compare` that `dest` (a
/// raw image) holds the same; returns the `nbdcopy` copy.
fn assert_same_as_nbdcopy(lab: &Lab, dest: &std::path::Path) -> PathBuf {
    let reference = lab.dir().join("nbdcopy.raw");
    run("nbdcopy", &[&lab.uri(), reference.to_str().unwrap()]);
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            dest.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    reference
}

#[test]
fn copying_allocated_extents_into_a_sparse_file_matches_nbdcopy() {
    let lab = Lab::new();
    let mut c = lab.connect(&[BASE_ALLOCATION]);
    let allocated = select_ranges(&mut c, BASE_ALLOCATION, |f| f & 2 == 0).unwrap();
    let dest = lab.dir().join("full.raw");
    let file = File::create(&dest).unwrap();
    file.set_len(SIZE).unwrap();
    let report = copy_allocated(&mut c, &mut FileSink::sparse(&file)).unwrap();
    drop(file);
    assert_eq!(
        report.bytes_copied,
        allocated.iter().map(|r| r.1).sum::<u64>()
    );
    assert!(report.bytes_copied < SIZE / 2, "zero areas were skipped");
    c.disconnect().unwrap();

    assert_same_as_nbdcopy(&lab, &dest);
    lab.qsd.quit();
}

#[test]
fn missing_export_and_missing_bitmap_are_typed_errors() {
    let lab = Lab::new();
    match NbdClient::connect_unix(&lab.nbd, "nope", &[]) {
        Err(NbdError::Handshake(HandshakeError::UnknownExport { export, .. })) => {
            assert_eq!(export, "nope")
        }
        other => panic!("unknown export: {other:?}"),
    }
    match NbdClient::connect_unix(&lab.nbd, "pull", &["qemu:dirty-bitmap:missing"]) {
        Err(NbdError::Handshake(HandshakeError::MetaContextUnavailable { context, offered })) => {
            assert_eq!(context, "qemu:dirty-bitmap:missing");
            assert!(offered.iter().any(|o| o == "qemu:dirty-bitmap:b0"));
        }
        other => panic!("missing bitmap: {other:?}"),
    }
    // A context not negotiated at connect time is refused before anything is sent.
    let mut c = lab.connect(&[BASE_ALLOCATION]);
    match c.block_status("qemu:dirty-bitmap:b0", 0, MIB) {
        Err(NbdError::Request(RequestError::ContextNotNegotiated(_))) => {}
        other => panic!("unnegotiated context: {other:?}"),
    }
    match c.write_at(0, b"x") {
        Err(NbdError::Request(RequestError::ReadOnly)) => {}
        other => panic!("write to read-only export: {other:?}"),
    }
    c.disconnect().unwrap();
    lab.qsd.quit();
}

#[test]
fn writes_through_a_writable_export_read_back_and_disconnect_cleanly() {
    let mut lab = Lab::new();
    let mut c = NbdClient::connect_unix(&lab.nbd, "guest", &[]).unwrap();
    assert!(!c.info().read_only());
    // Larger than one request, unaligned: exercises splitting and pipelined writes.
    let data: Vec<u8> = (0..3 * MIB + 777).map(|i| (i * 7 % 251) as u8).collect();
    let at = 2 * MIB + 123;
    c.set_pipeline(8, 1 << 20);
    c.write_at(at, &data).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(at, &mut back).unwrap();
    assert!(back == data);
    c.disconnect().unwrap();

    // Another tool sees the data, and the server still serves new sessions after ours ended.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("read -P 0x07 {} 1", at + 1),
            &nbd_uri("guest", &lab.nbd),
        ],
    );
    let mut again = NbdClient::connect_unix(&lab.nbd, "guest", &[]).unwrap();
    let mut first = [0u8; 3];
    again.read_at(at, &mut first).unwrap();
    assert_eq!(first, [0, 7, 14]);
    again.disconnect().unwrap();
    let exports = lab.qsd.ok("query-block-exports", json!({}));
    assert_eq!(
        exports.as_array().unwrap().len(),
        2,
        "both exports still served"
    );
    lab.qsd.quit();
}

/// A child process killed and reaped on drop, so a failing test leaves nothing behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcp_connection_reads_and_maps_like_unix() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_base_image(dir.path());

    // A free port: bind, note it, release it for qemu-nbd.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Reaped(
        std::process::Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=2",
                "-f",
                "qcow2",
                "-x",
                "tcp",
                "-b",
                "127.0.0.1",
            ])
            .args(["-p", &port.to_string()])
            .arg(&image)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd must be installed"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut c = loop {
        match NbdClient::connect_tcp("127.0.0.1", port, "tcp", &[BASE_ALLOCATION]) {
            Ok(c) => break c,
            Err(NbdError::Io(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("connect over TCP: {e}"),
        }
    };
    let mut all = vec![0u8; SIZE as usize];
    c.read_at(0, &mut all).unwrap();
    assert!(all == base_image());
    let uri = format!("nbd://127.0.0.1:{port}/tcp");
    assert_eq!(
        our_map(&mut c, BASE_ALLOCATION),
        nbdinfo_map(&uri, BASE_ALLOCATION)
    );
    c.disconnect().unwrap();
}

/// A sink that fails once it has received `limit` bytes.
struct FailingSink {
    received: u64,
    limit: u64,
}

impl ExtentSink for FailingSink {
    fn write_data(&mut self, _: u64, data: &[u8]) -> std::io::Result<()> {
        self.received += data.len() as u64;
        if self.received >= self.limit {
            return Err(std::io::Error::other("destination full"));
        }
        Ok(())
    }

    fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn failing_destination_stops_the_copy_and_leaves_the_connection_usable() {
    let lab = Lab::new();
    let mut c = lab.connect(&[]);
    c.set_pipeline(16, 64 * 1024);
    let mut sink = FailingSink {
        received: 0,
        limit: 3 * MIB,
    };
    match c.copy_extents(&[(0, SIZE)], &mut sink) {
        Err(NbdError::Sink(e)) => assert_eq!(e.to_string(), "destination full"),
        other => panic!("sink failure: {other:?}"),
    }
    // The replies still in flight were drained, so the next read sees its own data.
    let mut buf = vec![0u8; 100];
    c.read_at(20 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55));
    c.disconnect().unwrap();
    lab.qsd.quit();
}

/// A sink that kills the daemon once it has received `after` bytes and accepts everything.
struct KillingSink<'a> {
    qsd: &'a mut Qsd,
    received: u64,
    after: u64,
}

impl ExtentSink for KillingSink<'_> {
    fn write_data(&mut self, _: u64, data: &[u8]) -> std::io::Result<()> {
        let before = self.received;
        self.received += data.len() as u64;
        if before < self.after && self.received >= self.after {
            self.qsd.kill();
        }
        Ok(())
    }

    fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn server_dying_mid_copy_is_a_typed_error() {
    let mut lab = Lab::new();
    let mut c = lab.connect(&[]);
    c.set_io_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    c.set_pipeline(4, 64 * 1024);
    let mut sink = KillingSink {
        qsd: &mut lab.qsd,
        received: 0,
        after: MIB,
    };
    match c.copy_extents(&[(0, SIZE)], &mut sink) {
        Err(NbdError::Closed { .. }) | Err(NbdError::Io(_)) => {}
        other => panic!("dead server: {other:?}"),
    }
    let mut one = [0u8; 1];
    assert!(matches!(
        c.read_at(0, &mut one),
        Err(NbdError::Request(RequestError::Closed))
    ));
}

#[test]
fn dirty_extents_copied_into_a_qcow2_overlay_give_the_export_at_its_point_in_time() {
    let mut lab = Lab::new();
    let dir = lab.dir();
    // The previous backup: the image as it was when the bitmap started recording.
    let base_raw = dir.join("base.raw");
    std::fs::write(&base_raw, base_image()).unwrap();
    let base = dir.join("base.qcow2");
    let inc = dir.join("inc.qcow2");
    let (base_s, inc_s) = (base.to_str().unwrap(), inc.to_str().unwrap());
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            base_raw.to_str().unwrap(),
            base_s,
        ],
    );
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", base_s, "-F", "qcow2", inc_s,
        ],
    );
    lab.qsd.add_qcow2("inc", &inc);
    lab.qsd.export("inc", "inc", true, &[]);

    let bitmap = dirty_bitmap_context(BITMAP);
    let mut source = lab.connect(&[&bitmap]);
    let mut target = NbdClient::connect_unix(&lab.nbd, "inc", &[]).unwrap();
    let report = copy_dirty(&mut source, BITMAP, &mut NbdSink::new(&mut target)).unwrap();
    target.wait_writes().unwrap();
    target.flush().unwrap();
    target.disconnect().unwrap();
    source.disconnect().unwrap();
    assert_eq!(
        report.bytes_copied,
        expected_dirty().iter().map(|r| r.1).sum::<u64>()
    );

    let reference = dir.join("nbdcopy.raw");
    run("nbdcopy", &[&lab.uri(), reference.to_str().unwrap()]);
    // Quitting closes the overlay, so qemu-img may open it.
    lab.qsd.quit();
    let out = run(
        "qemu-img",
        &["compare", "-F", "raw", inc_s, reference.to_str().unwrap()],
    );
    assert!(out.contains("Images are identical"), "{out}");

    // Only the dirty granules live in the overlay; everything else comes from the backing file.
    let map: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", inc_s])).unwrap();
    let mut top: Vec<(u64, u64)> = Vec::new();
    for e in map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
    {
        let (o, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match top.last_mut() {
            Some((to, tl)) if *to + *tl == o => *tl += l,
            _ => top.push((o, l)),
        }
    }
    assert_eq!(top, expected_dirty());
}
