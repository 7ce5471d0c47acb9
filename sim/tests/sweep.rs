//! The fixed seed range of the sweep: the core's domain over the simulator, with the restore
//! checker. CI runs the suite optimized and covers 500 seeds; an unoptimized run covers fewer so
//! the debug suite stays quick. `SIM_SEED=N cargo test -p vbackup-sim --test sweep` reruns one.

use vbackup_sim::sweep::run_seed;

const STEPS: usize = 200;

#[test]
fn seeded_histories_of_the_core_over_the_simulator_keep_every_backup_restorable() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None if cfg!(debug_assertions) => (0..50).collect(),
        None => (0..500).collect(),
    };
    let mut verified = 0;
    let mut failures = Vec::new();
    for seed in seeds.iter().copied() {
        match run_seed(seed, STEPS) {
            Ok(r) => verified += r.backups_verified + r.pulls_verified,
            Err(f) => failures.push(format!(
                "{f} (SIM_SEED={} cargo test -p vbackup-sim --test sweep)",
                f.seed
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        verified >= seeds.len(),
        "too few backups verified: {verified} over {} seeds",
        seeds.len()
    );
}
