//! Benchmark: copy the dirty extents of a qemu-storage-daemon export through vbackup's NBD
//! client, against `nbdcopy` copying the same data from the same export in the same run.
//!
//! Setup: a 1 GiB qcow2 image, a dirty bitmap, then random data written to about 30% of the
//! image in random runs through a writable export (so exactly the written runs are both dirty
//! and allocated). The bitmap is frozen and exported read-only with the image. Each round
//! copies into a fresh sparse raw file:
//! - ours, dirty: `copy_dirty` (block status of `qemu:dirty-bitmap:b0`, then pipelined reads);
//! - ours, allocated: `copy_allocated` (the same selection nbdcopy makes, from `base:allocation`);
//! - `nbdcopy --destination-is-zero` with its defaults (it skips unallocated areas itself).
//!
//! Run: `cargo bench -p vbackup-qemu --bench nbd_copy -- [--size-mib N] [--dirty-percent P]
//! [--rounds R] [--window W] [--request-kib K] [--dir PATH]`.

#[path = "../tests/nbd_support/mod.rs"]
mod nbd_support;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbd_support::{Qsd, nbd_uri, run};
use serde_json::json;
use vbackup_qemu::nbd::copy::{copy_allocated, copy_dirty};
use vbackup_qemu::nbd::robustness::Rng;
use vbackup_qemu::nbd::{BASE_ALLOCATION, FileSink, NbdClient, dirty_bitmap_context};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GRANULE: u64 = 64 * KIB;

struct Options {
    size_mib: u64,
    dirty_percent: u64,
    rounds: usize,
    window: usize,
    request_kib: u32,
    dir: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        size_mib: 1024,
        dirty_percent: 30,
        rounds: 3,
        window: 16,
        request_kib: 1024,
        dir: None,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--size-mib" => o.size_mib = value.parse().expect("--size-mib N"),
            "--dirty-percent" => o.dirty_percent = value.parse().expect("--dirty-percent P"),
            "--rounds" => o.rounds = value.parse().expect("--rounds R"),
            "--window" => o.window = value.parse().expect("--window W"),
            "--request-kib" => o.request_kib = value.parse().expect("--request-kib K"),
            "--dir" => o.dir = Some(PathBuf::from(value)),
            // `cargo bench` passes `--bench`; anything else unknown is ignored too.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// Random runs of 64 KiB..2 MiB with gaps sized so about `percent`% of the image is covered.
fn random_runs(rng: &mut Rng, size: u64, percent: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut at = 0;
    loop {
        let granules = 1 + rng.next_u64() % 32;
        let gap_mean = granules * (100 - percent) / percent.max(1);
        let gap = rng.next_u64() % (2 * gap_mean + 1);
        at += gap * GRANULE;
        let len = granules * GRANULE;
        if at + len > size {
            break;
        }
        runs.push((at, len));
        at += len;
    }
    runs
}

fn fresh_sparse(path: &Path, size: u64) -> File {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    f
}

fn same_contents(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na]).unwrap();
            if n == 0 {
                return false;
            }
            nb += n;
        }
        if na == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        if ba[..na] != bb[..na] {
            return false;
        }
    }
}

/// CPU seconds (user + system) of this process and of its waited-for children, from
/// `/proc/self/stat`; a measure that the machine's other load does not distort much.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17, i.e. 11..=14 after the name; the kernel
    // reports them in clock ticks of 1/100 s on Linux.
    let tick = 100.0;
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    ((f[11] + f[12]) / tick, (f[13] + f[14]) / tick)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn main() {
    let o = options();
    let size = o.size_mib * MIB;
    let dir = match &o.dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let image = dir.path().join("src.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let mut qsd = Qsd::start(dir.path());
    qsd.add_qcow2("disk", &image);
    qsd.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0", "persistent": false, "granularity": GRANULE}),
    );
    let sock = qsd.start_nbd_unix();
    qsd.export("guest", "disk", true, &[]);

    // Random data through our own client's write path.
    let mut rng = Rng(0x5eed_0f0b_acc0_u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let runs = random_runs(&mut rng, size, o.dirty_percent);
    let dirty_bytes: u64 = runs.iter().map(|r| r.1).sum();
    let t = Instant::now();
    let mut writer = NbdClient::connect_unix(&sock, "guest", &[]).unwrap();
    let mut buf = vec![0u8; (32 * GRANULE) as usize];
    for &(at, len) in &runs {
        rng.fill(&mut buf[..len as usize]);
        writer.write_at(at, &buf[..len as usize]).unwrap();
    }
    writer.flush().unwrap();
    writer.disconnect().unwrap();
    let write_time = t.elapsed();
    qsd.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk", "name": "b0"}),
    );
    qsd.export("pull", "disk", false, &["b0"]);
    println!(
        "export: {} MiB, {} runs, {} MiB dirty ({:.1}%), written by our client in {:.2}s ({:.0} MiB/s)",
        o.size_mib,
        runs.len(),
        dirty_bytes / MIB,
        dirty_bytes as f64 * 100.0 / size as f64,
        write_time.as_secs_f64(),
        mib_per_s(dirty_bytes, write_time)
    );
    println!(
        "client pipeline: window {} requests of {} KiB; nbdcopy with its defaults",
        o.window, o.request_kib
    );

    let uri = nbd_uri("pull", &sock);
    let bitmap = dirty_bitmap_context("b0");
    let ours_path = dir.path().join("ours.raw");
    let ours_alloc_path = dir.path().join("ours-allocated.raw");
    let theirs_path = dir.path().join("nbdcopy.raw");
    let (mut ours, mut ours_alloc, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_cpu, mut theirs_cpu) = (0.0f64, 0.0f64);
    for round in 0..o.rounds {
        // Alternate the order so neither side always runs on a warmer cache.
        let order: [u8; 3] = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for which in order {
            match which {
                0 => {
                    let f = fresh_sparse(&ours_path, size);
                    let cpu = cpu_seconds().0;
                    let t = Instant::now();
                    let mut c = NbdClient::connect_unix(&sock, "pull", &[&bitmap]).unwrap();
                    c.set_pipeline(o.window, o.request_kib * 1024);
                    let r = copy_dirty(&mut c, "b0", &mut FileSink::sparse(&f)).unwrap();
                    c.disconnect().unwrap();
                    ours.push(t.elapsed());
                    ours_cpu += cpu_seconds().0 - cpu;
                    assert_eq!(
                        r.bytes_copied, dirty_bytes,
                        "copied exactly the dirty bytes"
                    );
                }
                1 => {
                    let f = fresh_sparse(&ours_alloc_path, size);
                    let t = Instant::now();
                    let mut c = NbdClient::connect_unix(&sock, "pull", &[BASE_ALLOCATION]).unwrap();
                    c.set_pipeline(o.window, o.request_kib * 1024);
                    copy_allocated(&mut c, &mut FileSink::sparse(&f)).unwrap();
                    c.disconnect().unwrap();
                    ours_alloc.push(t.elapsed());
                }
                _ => {
                    drop(fresh_sparse(&theirs_path, size));
                    let cpu = cpu_seconds().1;
                    let t = Instant::now();
                    run(
                        "nbdcopy",
                        &["--destination-is-zero", &uri, theirs_path.to_str().unwrap()],
                    );
                    theirs.push(t.elapsed());
                    theirs_cpu += cpu_seconds().1 - cpu;
                }
            }
        }
    }
    assert!(
        same_contents(&ours_path, &theirs_path),
        "our copy differs from nbdcopy's"
    );
    assert!(
        same_contents(&ours_alloc_path, &theirs_path),
        "allocated copy differs"
    );
    qsd.quit();

    let secs = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "per round (s): dirty [{}] allocated [{}] nbdcopy [{}]",
        secs(&ours),
        secs(&ours_alloc),
        secs(&theirs)
    );
    let rounds = o.rounds as f64;
    println!(
        "client CPU per copy (user+sys): vbackup copy_dirty {:.3}s, nbdcopy {:.3}s",
        ours_cpu / rounds,
        theirs_cpu / rounds
    );
    let (a, b, c) = (median(ours), median(ours_alloc), median(theirs));
    println!("rounds: {}, medians:", o.rounds);
    println!(
        "  vbackup copy_dirty      {:>7.3}s  {:>6.0} MiB/s",
        a.as_secs_f64(),
        mib_per_s(dirty_bytes, a)
    );
    println!(
        "  vbackup copy_allocated  {:>7.3}s  {:>6.0} MiB/s",
        b.as_secs_f64(),
        mib_per_s(dirty_bytes, b)
    );
    println!(
        "  nbdcopy                 {:>7.3}s  {:>6.0} MiB/s",
        c.as_secs_f64(),
        mib_per_s(dirty_bytes, c)
    );
    println!(
        "throughput ratio vbackup/nbdcopy: dirty {:.2}, allocated {:.2} (target >= 0.9)",
        c.as_secs_f64() / a.as_secs_f64(),
        c.as_secs_f64() / b.as_secs_f64()
    );
}
