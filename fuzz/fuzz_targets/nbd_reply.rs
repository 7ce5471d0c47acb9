//! Fuzz target: arbitrary server bytes fed to the NBD handshake and to the transmission codec.
//! The first input byte selects the machine; decoding must never panic and must stay bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_qemu::nbd::robustness::{fuzz_handshake, fuzz_replies};

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => {
            fuzz_handshake(rest);
        }
        Some((_, rest)) => {
            fuzz_replies(rest);
        }
        None => {}
    }
});
