//! `vbackup-sim sweep --seeds A..B [--steps N]`: runs seeded random histories of the core over
//! the simulator and prints every failure (one line each, with the seed that reproduces it),
//! the outcome totals and seeds per second. `SIM_SEED=N` runs that one seed; `--refusals` adds
//! QEMU refusals of single commands to the faults.

use std::process::ExitCode;
use std::time::Instant;

use vbackup_sim::sweep::{SeedReport, run_seed_with};

const USAGE: &str =
    "usage: vbackup-sim sweep --seeds A..B [--steps N]   (or SIM_SEED=N vbackup-sim sweep)";

fn parse_range(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text.split_once("..")?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a < b).then_some((a, b))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("sweep") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut seeds = (0u64, 100u64);
    let mut steps = 200usize;
    let mut refusals = false;
    let mut i = 1;
    while i < args.len() {
        if args[i] == "--refusals" {
            refusals = true;
            i += 1;
            continue;
        }
        match (args[i].as_str(), args.get(i + 1)) {
            ("--seeds", Some(v)) => match parse_range(v) {
                Some(r) => seeds = r,
                None => {
                    eprintln!("bad seed range '{v}'\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            ("--steps", Some(v)) => match v.parse() {
                Ok(n) => steps = n,
                Err(_) => {
                    eprintln!("bad step count '{v}'\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    if let Some(seed) = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        seeds = (seed, seed + 1);
    }
    let start = Instant::now();
    let mut total = SeedReport::default();
    let mut failures = 0;
    for seed in seeds.0..seeds.1 {
        match run_seed_with(seed, steps, refusals) {
            Ok(r) => {
                total.backups_verified += r.backups_verified;
                total.pulls_verified += r.pulls_verified;
                total.refused += r.refused;
                total.crashes += r.crashes;
                total.writes += r.writes;
                total.faults += r.faults;
            }
            Err(f) => {
                failures += 1;
                let flag = if refusals { " --refusals" } else { "" };
                println!(
                    "FAIL {f}   (reproduce: SIM_SEED={} cargo run --release -p vbackup-sim -- sweep --steps {steps}{flag})",
                    f.seed
                );
            }
        }
    }
    let n = seeds.1 - seeds.0;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} seeds x {steps} steps: {failures} failed; {} backups and {} pulls verified; {} requests refused by the core; faults: {} crashes, {} job errors or command refusals; {} guest writes; {:.1} seeds/s",
        total.backups_verified,
        total.pulls_verified,
        total.refused,
        total.crashes,
        total.faults,
        total.writes,
        n as f64 / secs
    );
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
