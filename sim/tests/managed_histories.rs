//! Seeded histories of managed backups over the simulator (see `vbackup_sim::managed`): the
//! core's managed-backup machine driven over the simulated QEMU with guest writes,
//! checkpoints, push and pull backups, deletions, consolidations, restores (into new images
//! and over the stopped domain's own disk), vbackup killed at every kind of step, images and
//! records corrupted, and the catalogue, content and data-safety checkers after every step.
//! The optimized run (CI) covers 200 seeds, an unoptimized one fewer so the debug suite
//! stays quick.
//! `SIM_MANAGED_SEED=N cargo test -p vbackup-sim --release --test managed_histories` reruns one.

use vbackup_sim::managed::{ManagedConfig, ManagedStats, run_managed_history};

#[test]
fn managed_backup_histories_restore_every_backup_to_its_point_in_time() {
    let seeds: Vec<u64> = match std::env::var("SIM_MANAGED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None if cfg!(debug_assertions) => (0..20).collect(),
        None => (0..200).collect(),
    };
    let mut total = ManagedStats::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        match run_managed_history(&ManagedConfig::seed(seed)) {
            Ok(stats) => total.add(&stats),
            Err(f) => failures.push(f.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{} seeds: {total:?}", seeds.len());
    // Every kind of step happened, so the checkers had something to check.
    let n = seeds.len() as u64;
    assert!(
        total.push_backups >= n && total.pull_backups >= n,
        "{total:?}"
    );
    assert!(total.incrementals >= n, "{total:?}");
    assert!(total.restores >= 2 * n, "{total:?}");
    assert!(total.deletions >= n / 2, "{total:?}");
    assert!(total.released_checkpoints >= n / 2, "{total:?}");
    assert!(total.consolidations >= n / 4, "{total:?}");
    assert!(total.overwrites >= n / 4, "{total:?}");
    if n >= 100 {
        // An overwrite from a corrupted chain is refused with the disk untouched.
        assert!(total.refused_corrupt_overwrites > 0, "{total:?}");
    }
    if seeds.len() > 1 {
        assert!(total.discarded_pulls > 0, "{total:?}");
        assert!(total.interrupted_deletions > 0, "{total:?}");
        assert!(total.refused_restores > 0, "{total:?}");
        // The data-safety rules were exercised: kills, corrupted chains refused,
        // damaged records listed and deleted, vanished targets and taken names refused.
        assert!(total.kills >= n, "{total:?}");
        assert!(total.refused_consolidations > 0, "{total:?}");
        assert!(total.refused_corrupt_restores > 0, "{total:?}");
        assert!(
            total.damaged_records > 0 && total.deleted_damaged > 0,
            "{total:?}"
        );
        assert!(total.refused_missing_targets > 0, "{total:?}");
        assert!(
            total.refused_new_domains > 0 && total.new_domains > 0,
            "{total:?}"
        );
    }
}

#[test]
fn a_managed_history_is_a_function_of_its_seed() {
    let config = ManagedConfig::seed(7);
    assert_eq!(run_managed_history(&config), run_managed_history(&config));
}
