//! Signalling messages as a client may send them: parsing must refuse or
//! accept, never panic; what parses must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sfu_signal::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(message) = ClientMessage::parse(text) {
        let again = serde_json::to_string(&message).expect("a parsed message serialises");
        let back = ClientMessage::parse(&again).expect("what was serialised parses");
        assert_eq!(back, message);
    }
});
