//! Any bytes through the checkpoint parser (all modes), then format and re-parse: the parser
//! must never panic, and whatever it accepts must survive format then parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::xml::{CheckpointDef, CheckpointFormat, CheckpointMode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [
        CheckpointMode::Create,
        CheckpointMode::Redefine,
        CheckpointMode::Document,
    ] {
        if let Ok(def) = CheckpointDef::parse(text, mode) {
            let options = CheckpointFormat {
                no_domain: false,
                include_size: true,
            };
            let formatted = def.format(options);
            let again = CheckpointDef::parse(&formatted, mode)
                .unwrap_or_else(|e| panic!("formatted output rejected: {e}\n{formatted}"));
            assert_eq!(again.format(options), formatted);
        }
    }
});
