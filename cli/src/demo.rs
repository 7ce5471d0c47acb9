//! `vbackup demo`: the whole story on two fresh qcow2 disks of a managed domain
//! (`vbackup_host::demo` runs the steps), ending with a summary table.

use clap::ArgMatches;
use vbackup_host::demo::{Demo, run_steps};

use crate::output::{CliError, human_bytes, table};
use crate::spec::path;

/// Runs the demo.
pub fn run(m: &ArgMatches) -> Result<(), CliError> {
    let d = Demo::prepare(path(m, "dir").as_deref(), |text| print!("{text}"))?;
    println!("Demo directory: {}", d.dir.display());
    let size_mib = *m.get_one::<u64>("size_mib").expect("a default");
    let result = run_steps(&d, size_mib);
    // Whatever happened, leave no daemon behind.
    d.stop();
    let rows = result?;
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let compared = if r.verified { "identical" } else { "DIFFERENT" };
            let (size, time) = (human_bytes(r.size), format!("{:.2} s", r.secs));
            vec![
                r.backup.clone(),
                r.disk.clone(),
                size,
                time,
                compared.into(),
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
