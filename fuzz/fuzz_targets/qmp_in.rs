//! Arbitrary bytes from a QMP peer: the frame decoder splits them, every frame decodes to a
//! message or a typed error, and any decoded command or message re-encodes and decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::qmp::{FrameDecoder, QmpCommand, QmpIn};

fuzz_target!(|data: &[u8]| {
    let mut frames = FrameDecoder::default();
    for chunk in data.chunks(61) {
        frames.push(chunk);
        while let Some(frame) = frames.next_frame() {
            let Ok(frame) = frame else { continue };
            if let Ok(msg) = QmpIn::decode(&frame) {
                let again = QmpIn::decode(msg.encode().as_bytes()).expect("re-encoded message decodes");
                assert_eq!(again, msg);
            }
            if let Ok((id, cmd)) = QmpCommand::decode(&frame) {
                let text = cmd.encode(id.as_ref());
                let (_, again) = QmpCommand::decode(text.as_bytes()).expect("re-encoded command decodes");
                assert_eq!(again, cmd);
            }
        }
    }
});
