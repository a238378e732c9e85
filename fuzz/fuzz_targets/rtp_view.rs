//! The room's RTP header reader on arbitrary bytes (it runs before SRTP
//! authentication): nothing may panic, and a header the engine's parser
//! reads is read the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtc::shared::marshal::Unmarshal;
use sfu_core::rtp::RtpView;

fuzz_target!(|data: &[u8]| {
    let Some(view) = RtpView::parse(data) else {
        return;
    };
    assert!(view.header_len <= data.len());
    for id in 0..=255u8 {
        if let Some(value) = view.extension(data, id) {
            assert!(value.len() <= view.header_len);
        }
    }
    let header = view.header(data);
    if let Some(range) = view.payload_range(data) {
        assert!(range.start == view.header_len && range.end <= data.len());
    }
    let mut rest = data;
    if let Ok(engine) = rtc::rtp::Header::unmarshal(&mut rest) {
        if data.len() - rest.len() != view.header_len {
            // The engine's parser lets an extension element run past the
            // extension block into the payload; the view stops at the
            // block's end, as RFC 8285 has it.
            return;
        }
        assert_eq!(engine.sequence_number, view.sequence_number);
        assert_eq!(engine.timestamp, view.timestamp);
        assert_eq!(engine.ssrc, view.ssrc);
        assert_eq!(engine.payload_type, view.payload_type);
        assert_eq!(engine.csrc, header.csrc);
        // Id 0 is the engine's name for the whole block of a profile
        // other than RFC 8285's; no element has it. Of elements repeating
        // an id, the first counts, as in the engine's lookup.
        for (i, e) in engine.extensions.iter().enumerate() {
            let first = engine.extensions[..i].iter().all(|x| x.id != e.id);
            if e.id != 0 && first {
                assert_eq!(view.extension(data, e.id), Some(&e.payload[..]), "id {}", e.id);
            }
        }
    }
});
