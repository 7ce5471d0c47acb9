//! `history-sweep sweep --seeds A..B [--steps N] [--no-faults] [--faults KIND,..] [--engine-faults-anywhere] [--abort-during-setup]`: runs seeded histories of the
//! core against the simulated QEMU and prints failures (one reproducing line each), seeds per
//! second and the fault mix. Exits 1 when a seed fails, 2 on bad arguments.

use std::process::ExitCode;
use std::time::Instant;

use vbackup_sim::world::{FaultKind, HistoryConfig, HistoryStats, run_history};

fn usage() -> ExitCode {
    eprintln!(
        "usage: history-sweep sweep --seeds A..B [--steps N] [--no-faults] [--faults KIND,..] [--engine-faults-anywhere] [--abort-during-setup]"
    );
    ExitCode::from(2)
}

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once("..")?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b).then_some((a, b))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("sweep") {
        return usage();
    }
    let mut seeds = None;
    let mut steps = 200;
    let mut faults = true;
    let mut anywhere = false;
    let mut abort_setup = false;
    let mut kinds = FaultKind::ALL.to_vec();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--seeds" => {
                seeds = args.get(i + 1).and_then(|s| parse_range(s));
                i += 2;
            }
            "--steps" => {
                match args.get(i + 1).and_then(|s| s.parse().ok()) {
                    Some(n) => steps = n,
                    None => return usage(),
                }
                i += 2;
            }
            "--faults" => {
                let parsed: Option<Vec<FaultKind>> = args
                    .get(i + 1)
                    .map(|s| s.split(',').map(FaultKind::from_name).collect())
                    .unwrap_or(None);
                match parsed {
                    Some(k) => kinds = k,
                    None => return usage(),
                }
                i += 2;
            }
            "--abort-during-setup" => {
                abort_setup = true;
                i += 1;
            }
            "--engine-faults-anywhere" => {
                anywhere = true;
                i += 1;
            }
            "--no-faults" => {
                faults = false;
                i += 1;
            }
            _ => return usage(),
        }
    }
    let Some((a, b)) = seeds else {
        return usage();
    };
    let started = Instant::now();
    let mut total = HistoryStats::default();
    let mut failed = 0u64;
    for seed in a..b {
        let out = run_history(&HistoryConfig {
            seed,
            steps,
            faults,
            trace: false,
            engine_faults_anywhere: anywhere,
            fault_kinds: kinds.clone(),
            abort_during_setup: abort_setup,
        });
        total.add(&out.stats);
        if let Some(f) = out.failure {
            failed += 1;
            println!("FAIL {f}");
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let n = b - a;
    println!(
        "{n} seeds, {failed} failed, {:.1} s: {:.0} seeds/s, {:.0} steps/s ({} steps)",
        secs,
        n as f64 / secs,
        total.steps as f64 / secs,
        total.steps
    );
    println!(
        "requests {} ({} ok), guest writes {}, backups verified byte for byte {}",
        total.requests, total.requests_ok, total.guest_writes, total.backups_verified
    );
    let mix: Vec<String> = FaultKind::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), total.faults.get(k).copied().unwrap_or(0)))
        .collect();
    println!("faults: {}", mix.join(", "));
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
