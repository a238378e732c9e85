//! A publisher's offer, whatever its SDP: the room answers or refuses with
//! an error message to that participant, and never panics.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sfu_core::signal::{ClientMessage, ServerMessage, Target};
use sfu_core::{JoinRequest, Output};

fuzz_target!(|data: &[u8]| {
    let Ok(sdp) = std::str::from_utf8(data) else {
        return;
    };
    let _ = sfu_core::sdp::sending_track_ids(sdp);
    let now = Instant::now();
    let mut room = sfu_fuzz::room(now, 16);
    let id = room
        .join(
            now,
            JoinRequest {
                identity: "fuzzer".into(),
                name: String::new(),
                can_publish: true,
                can_subscribe: true,
                joined_at_unix: 0,
                ice_servers: vec![],
            },
        )
        .expect("joins an empty room");
    room.handle_signal(
        now,
        id,
        ClientMessage::Offer {
            target: Target::Publisher,
            sdp: sdp.to_owned(),
        },
    );
    let mut replied = false;
    loop {
        match room.poll_output() {
            Output::Signal {
                message: ServerMessage::Answer { .. } | ServerMessage::Error { .. },
                ..
            } => replied = true,
            Output::Timeout(_) => break,
            _ => {}
        }
    }
    assert!(replied, "an offer gets an answer or an error");
});
