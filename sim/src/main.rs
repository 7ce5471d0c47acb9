//! `vbackup-sim sweep --seeds A..B [--faults KIND,..|none] [--steps N] [--per-kind]
//! [--engine-faults-between-backups] [--no-abort-during-setup] [--stall STALL]`: runs seeded
//! histories of the core
//! against the simulated QEMU ([`vbackup_sim::world`]) and prints every failure (one line
//! each, which reproduces it), seeds per second and the fault mix. `--per-kind` runs the range
//! once per fault kind alone and prints a line per kind. Every history ends with a liveness
//! phase (faults off, everything must settle within a bound of virtual time); `--stall
//! job-events` or `--stall reply:COMMAND` stalls the simulated peer for that phase, to show
//! that it catches a stalled engine. `SIM_SEED=N` runs that one seed. `--jobs N` runs N
//! histories at a time (default: the machine's cores); the output does not depend on it.
//! Exits 1 when a seed fails, 2 on bad arguments.

use std::process::ExitCode;
use std::time::Instant;

use vbackup_sim::world::link::Stall;
use vbackup_sim::world::{FaultKind, HistoryConfig, HistoryStats, liveness_bound_ms, run_history};

// A history allocates and frees hundreds of thousands of small objects (QMP values above all)
// next to 64 KiB cluster buffers; glibc's allocator spends a quarter of a sweep on that mix.
// The allocator changes no result: a history is a pure function of its configuration.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that ignores a closed stdout (`| head`) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const USAGE: &str = "usage: vbackup-sim sweep --seeds A..B [--faults KIND,..|none] [--steps N] [--per-kind] [--engine-faults-between-backups] [--no-abort-during-setup] [--stall job-events|reply:COMMAND] [--jobs N]
fault kinds: command-refused, job-io-error, target-no-space, qemu-crash, link-drop, engine-restart, store-write-failed
SIM_SEED=N runs that one seed";

fn usage(why: &str) -> ExitCode {
    if !why.is_empty() {
        eprintln!("{why}");
    }
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn parse_range(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text.split_once("..")?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a < b).then_some((a, b))
}

/// What a sweep runs besides the seeds.
struct Options {
    seeds: (u64, u64),
    base: HistoryConfig,
    per_kind: bool,
    jobs: usize,
}

fn parse(args: &[String]) -> Result<Options, String> {
    if args.first().map(String::as_str) != Some("sweep") {
        return Err(String::new());
    }
    let mut seeds = (0u64, 100u64);
    let mut base = HistoryConfig::seed(0);
    let mut per_kind = false;
    let mut jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1);
        match (args[i].as_str(), value) {
            ("--per-kind", _) => per_kind = true,
            ("--engine-faults-between-backups", _) => base.engine_faults_anywhere = false,
            ("--no-abort-during-setup", _) => base.abort_during_setup = false,
            ("--no-faults", _) => base.faults = false,
            ("--seeds", Some(v)) => {
                seeds = parse_range(v).ok_or_else(|| format!("bad seed range '{v}'"))?;
                i += 1;
            }
            ("--stall", Some(v)) => {
                base.stall = Some(Stall::from_name(v).ok_or_else(|| format!("no stall '{v}'"))?);
                i += 1;
            }
            ("--jobs", Some(v)) => {
                jobs = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("bad job count '{v}'"))?;
                i += 1;
            }
            ("--steps", Some(v)) => {
                base.steps = v.parse().map_err(|_| format!("bad step count '{v}'"))?;
                i += 1;
            }
            ("--faults", Some(v)) if v == "none" => {
                base.faults = false;
                i += 1;
            }
            ("--faults", Some(v)) => {
                base.fault_kinds = v
                    .split(',')
                    .map(|n| FaultKind::from_name(n).ok_or_else(|| format!("no fault kind '{n}'")))
                    .collect::<Result<_, _>>()?;
                i += 1;
            }
            (other, _) => return Err(format!("unexpected argument '{other}'")),
        }
        i += 1;
    }
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let seed: u64 = seed
            .parse()
            .map_err(|_| format!("SIM_SEED '{seed}' is not a number"))?;
        seeds = (seed, seed + 1);
    }
    Ok(Options {
        seeds,
        base,
        per_kind,
        jobs,
    })
}

/// Runs the seed range with `base`; prints failures as they come. Returns the totals, the
/// number of failed seeds and the seconds taken.
fn sweep(seeds: (u64, u64), base: &HistoryConfig, jobs: usize) -> (HistoryStats, u64, f64) {
    let started = Instant::now();
    // Histories are independent: `jobs` threads take the next seed until none is left, and
    // the results are added up (and failures printed) in seed order.
    let next = std::sync::atomic::AtomicU64::new(seeds.0);
    let mut results: Vec<(u64, HistoryStats, Option<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= seeds.1 {
                            return done;
                        }
                        let out = run_history(&HistoryConfig {
                            seed,
                            ..base.clone()
                        });
                        done.push((seed, out.stats, out.failure.map(|f| f.to_string())));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    results.sort_by_key(|(seed, _, _)| *seed);
    let mut total = HistoryStats::default();
    let mut failed = 0;
    for (_, stats, failure) in &results {
        total.add(stats);
        if let Some(f) = failure {
            failed += 1;
            say!("FAIL {f}");
        }
    }
    (total, failed, started.elapsed().as_secs_f64().max(1e-9))
}

fn fault_mix(total: &HistoryStats) -> String {
    FaultKind::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), total.faults.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(why) => return usage(&why),
    };
    let n = opts.seeds.1 - opts.seeds.0;
    let mut any_failed = false;
    if opts.per_kind {
        for kind in FaultKind::ALL {
            let base = HistoryConfig {
                fault_kinds: vec![kind],
                ..opts.base.clone()
            };
            let (total, failed, secs) = sweep(opts.seeds, &base, opts.jobs);
            any_failed |= failed > 0;
            say!(
                "{:<20} {n} seeds, {failed} failed, {} injected, {} backups verified, {:.0} seeds/s",
                kind.name(),
                total.faults.get(&kind).copied().unwrap_or(0),
                total.backups_verified,
                n as f64 / secs
            );
        }
    } else {
        let (total, failed, secs) = sweep(opts.seeds, &opts.base, opts.jobs);
        any_failed = failed > 0;
        say!(
            "{n} seeds x {} steps: {failed} failed in {secs:.1} s, {:.0} seeds/s ({:.2} ms per seed), {:.0} steps/s, {} thread(s)",
            opts.base.steps,
            n as f64 / secs,
            secs * 1000.0 / n as f64,
            total.steps as f64 / secs,
            opts.jobs
        );
        say!(
            "requests {} ({} ok), guest writes {}, backups verified byte for byte {}",
            total.requests,
            total.requests_ok,
            total.guest_writes,
            total.backups_verified
        );
        say!("faults: {}", fault_mix(&total));
        say!(
            "liveness: slowest settle {:.1} s of virtual time after faults stopped (bound {} s){}",
            total.settle_ms_max as f64 / 1000.0,
            liveness_bound_ms() / 1000,
            match &opts.base.stall {
                Some(s) => format!(", stall {}: {} messages withheld", s.name(), total.withheld),
                None => String::new(),
            }
        );
    }
    if any_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
