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
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(CliError::io("cannot create the demo directory"))?;
            std::fs::canonicalize(d).map_err(CliError::io("demo directory"))?
        }
        None => tempfile::Builder::new()
            .prefix("vbackup-demo-")
            .tempdir()
            .map_err(CliError::io("cannot create a temporary directory"))?
            .keep(),
    };
    let exe = std::env::current_exe().map_err(CliError::io("cannot find the vbackup binary"))?;
    let d = Demo::new(dir.clone(), exe, |text| print!("{text}"));
    if d.exists() {
        return Err(CliError::Other(format!(
            "{} already holds a demo; use another --dir",
            dir.display()
        )));
    }
    println!("Demo directory: {}", dir.display());
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
