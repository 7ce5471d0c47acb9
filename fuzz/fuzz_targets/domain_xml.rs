//! Any bytes through the `<domain>` reader and, when it reads, through alignment of an empty
//! backup and checkpoint with it: nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::xml::{BackupDef, CheckpointDef, align_backup, align_checkpoint, parse_domain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(domain) = parse_domain(text) {
        let _ = align_backup(&BackupDef::default(), &domain, "fuzz");
        let checkpoint = CheckpointDef {
            name: Some("fuzz".to_owned()),
            ..CheckpointDef::default()
        };
        let _ = align_checkpoint(&checkpoint, &domain);
    }
});
