//! `vbackup demo`: the whole story on two fresh qcow2 disks of a managed domain
//! (`vbackup_host::demo` runs the steps), ending with a summary table.

use std::path::PathBuf;

use clap::Args;
use vbackup_host::demo::{Demo, run_steps};

use crate::output::{CliError, human_bytes, table};

/// Options of `vbackup demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (created; default: a new directory under /tmp, kept).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of each disk in MiB (the guest writes reach up to 54 MiB).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(64..))]
    pub size_mib: u64,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<(), CliError> {
    let d = Demo::prepare(args.dir.as_deref(), |text| print!("{text}"))?;
    println!("Demo directory: {}", d.dir.display());
    let result = run_steps(&d, args.size_mib);
    // Whatever happened, leave no daemon behind.
    d.stop();
    let rows = result?;
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.backup.clone(),
                r.disk.clone(),
                human_bytes(r.size),
                format!("{:.2} s", r.secs),
                if r.verified {
                    "identical".into()
                } else {
                    "DIFFERENT".into()
                },
            ]
        })
        .collect();
    println!();
    print!(
        "{}",
        table(
            &["Backup", "Disk", "Size", "Time", "qemu-img compare"],
            &table_rows
        )
    );
    if rows.iter().all(|r| r.verified) {
        println!("\nAll backups match the disks at their point in time.");
        Ok(())
    } else {
        Err(CliError::Other(
            "a backup differs from its point in time".into(),
        ))
    }
}
