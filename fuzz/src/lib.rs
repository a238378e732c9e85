//! What the fuzz targets share.

use std::time::Instant;

use sfu_core::{Room, RoomConfig};

/// An empty room on a loopback media address, with `max_tracks` tracks per
/// participant.
pub fn room(now: Instant, max_tracks: usize) -> Room {
    Room::new(
        RoomConfig {
            name: "fuzz".into(),
            sid: "RM_fuzz".into(),
            media_addr: "127.0.0.1:7882".parse().expect("literal address"),
            seed: 1,
            ice_servers: vec![],
            max_participants: 0,
            max_tracks,
        },
        now,
    )
}
