//! Entry points for fuzzing the sans-IO parts with arbitrary server bytes.
//!
//! Both functions must return (never panic) for any input; they are called by the fuzz target
//! and by the deterministic random-input tests below.

use super::client::{Event, Transmission};
use super::handshake::{ExportInfo, Handshake, HandshakeConfig, MetaContext};
use super::proto;

/// Feeds `input` as server bytes to a handshake asking for two contexts, in pieces whose sizes
/// come from the input itself. Returns whether the handshake completed.
pub fn fuzz_handshake(input: &[u8]) -> bool {
    let Ok(mut hs) = Handshake::new(HandshakeConfig {
        export: "vda".into(),
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b".into()],
    }) else {
        return false;
    };
    let split = usize::from(input.first().copied().unwrap_or(1)).max(1);
    for piece in input.chunks(split) {
        if hs.receive(piece).is_err() {
            return false;
        }
        // Output must stay bounded: one option at a time.
        assert!(hs.take_output().len() < 3 * proto::MAX_STRING_LEN + 64);
    }
    hs.is_done() && hs.finish().is_ok()
}

/// A negotiated export with structured replies and two meta contexts: `base:allocation`
/// (id 1) and `qemu:dirty-bitmap:b` (id 2), the ones [`fuzz_handshake`] asks for.
pub(crate) fn export_with_two_contexts(
    name: &str,
    size: u64,
    transmission_flags: u16,
) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        size,
        transmission_flags,
        block_size: None,
        structured_replies: true,
        contexts: vec![
            MetaContext {
                id: 1,
                name: "base:allocation".into(),
            },
            MetaContext {
                id: 2,
                name: "qemu:dirty-bitmap:b".into(),
            },
        ],
        available_contexts: vec![],
    }
}

/// Sends a few requests of every kind, then decodes `input` as the server's replies. Returns
/// the number of events decoded.
pub fn fuzz_replies(input: &[u8]) -> usize {
    let info = export_with_two_contexts(
        "vda",
        1 << 30,
        proto::tflag::HAS_FLAGS | proto::tflag::SEND_FLUSH,
    );
    let mut t = Transmission::new(&info, 8);
    let mut out = Vec::new();
    // Cookies 1..=5: two reads, block status, write, flush. Their values are predictable so
    // the fuzzer can find them.
    let _ = t.read(0, 4096, &mut out);
    let _ = t.read(1 << 20, 65536, &mut out);
    let _ = t.block_status(0, 1 << 30, &mut out);
    let _ = t.write(4096, &[1, 2, 3], &mut out);
    let _ = t.flush(&mut out);
    let split = usize::from(input.first().copied().unwrap_or(1)).max(1);
    let mut events = 0;
    for piece in input.chunks(split) {
        let mut at = 0;
        loop {
            match t.decode(&piece[at..]) {
                Ok((n, ev)) => {
                    at += n;
                    match ev {
                        Some(Event::ReadData { offset, data, .. }) => {
                            assert!(offset + data.len() as u64 <= info.size);
                            events += 1;
                        }
                        Some(_) => events += 1,
                        None => break,
                    }
                }
                Err(_) => return events,
            }
            assert!(at <= piece.len());
        }
    }
    events
}

/// xorshift64*: a fast deterministic source of varied bytes for the random-input tests and
/// the benchmarks' disk data. Not for anything that must be unpredictable. The seed must not be
/// zero (a zero state stays zero).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::handshake::tests::server_script;

    #[test]
    fn valid_handshake_script_completes_in_the_fuzz_harness() {
        assert!(fuzz_handshake(&server_script(
            1 << 30,
            proto::tflag::HAS_FLAGS
        )));
    }

    #[test]
    fn mutated_handshakes_never_panic() {
        let base = server_script(1 << 30, proto::tflag::HAS_FLAGS);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut s = base.clone();
            for _ in 0..(rng.next_u64() % 4 + 1) {
                let i = (rng.next_u64() as usize) % s.len();
                s[i] = rng.next_u64() as u8;
            }
            let cut = (rng.next_u64() as usize) % (s.len() + 1);
            fuzz_handshake(&s[..cut]);
        }
    }

    #[test]
    fn random_replies_never_panic() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // Valid-looking structured headers with random fields reach deeper states than pure
        // noise does.
        for _ in 0..20_000 {
            let mut s = Vec::new();
            for _ in 0..(rng.next_u64() % 6 + 1) {
                let r = rng.next_u64();
                let magic = if r & 1 == 0 {
                    proto::STRUCTURED_REPLY_MAGIC
                } else {
                    proto::SIMPLE_REPLY_MAGIC
                };
                s.extend_from_slice(&magic.to_be_bytes());
                s.extend_from_slice(&((r >> 8) as u16 & 1).to_be_bytes());
                let kinds = [0u16, 1, 2, 5, 0x8001, 0x8002, 0x8003, 7];
                s.extend_from_slice(&kinds[(r >> 16) as usize % kinds.len()].to_be_bytes());
                s.extend_from_slice(&(1 + (r >> 24) % 6).to_be_bytes());
                let len = (rng.next_u64() % 40) as u32;
                s.extend_from_slice(&len.to_be_bytes());
                for _ in 0..len {
                    s.push(if rng.next_u64().is_multiple_of(3) {
                        0
                    } else {
                        rng.next_u64() as u8
                    });
                }
            }
            fuzz_replies(&s);
            let noise: Vec<u8> = (0..(rng.next_u64() % 64))
                .map(|_| rng.next_u64() as u8)
                .collect();
            fuzz_replies(&noise);
        }
    }
}
