//! The cost of one seeded history of the world harness ([`vbackup_sim::world`]): 200 steps of
//! the real core against the simulated QEMU with every fault kind, vbackup restarts and the
//! byte-for-byte checkers, then the liveness phase. Prints ms per history and seeds per second,
//! by wall clock and by the CPU time of this thread (on a shared machine the wall clock
//! overstates the cost). A second line runs the histories without faults.
//!
//! Run with `cargo bench -p vbackup-sim --bench history` (`-- N` for another seed count).

use std::time::Instant;

use vbackup_sim::world::{HistoryConfig, HistoryStats, run_history};

// The allocator of the `vbackup-sim` binary (see its `main.rs`), so both measure the same.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU time this thread has run, from Linux's schedstat (None elsewhere).
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn measure(label: &str, seeds: u64, faults: bool) {
    let config = |seed| HistoryConfig {
        faults,
        ..HistoryConfig::seed(seed)
    };
    // Warm up the allocator and caches.
    run_history(&config(1_000_000));
    let cpu_start = cpu_ns();
    let start = Instant::now();
    let mut total = HistoryStats::default();
    let mut failed = 0;
    for seed in 0..seeds {
        let out = run_history(&config(seed));
        total.add(&out.stats);
        failed += u64::from(out.failure.is_some());
    }
    let wall_s = start.elapsed().as_secs_f64();
    let steps = HistoryConfig::seed(0).steps;
    println!(
        "{label}: {seeds} histories of {steps} steps: {:.2} ms per history, {:.0} seeds/s (wall); {} backups verified, {failed} failed",
        wall_s * 1000.0 / seeds as f64,
        seeds as f64 / wall_s,
        total.backups_verified
    );
    if let (Some(a), Some(b)) = (cpu_start, cpu_ns()) {
        let cpu_s = (b - a) as f64 / 1e9;
        println!(
            "{label}: CPU time {:.2} ms per history, {:.0} seeds/s",
            cpu_s * 1000.0 / seeds as f64,
            seeds as f64 / cpu_s
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a number among the arguments sets the seed count.
    let seeds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    measure("with faults", seeds, true);
    measure("without faults", seeds, false);
}
