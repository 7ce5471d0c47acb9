//! `vbackup`: incremental backups of QEMU virtual machines, with virsh-like commands.

use clap::Parser;

/// Incremental backup for QEMU virtual machines.
#[derive(Debug, Parser)]
#[command(name = "vbackup", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
