//! Any bytes through the backup parser, then format and re-parse: the parser must never panic,
//! and whatever it accepts must survive format then parse unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::xml::BackupDef;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(def) = BackupDef::parse(text) {
        let formatted = def.format();
        let again = BackupDef::parse(&formatted)
            .unwrap_or_else(|e| panic!("formatted output rejected: {e}\n{formatted}"));
        assert_eq!(again, def);
    }
});
