//! The media plane of the SFU, sans-I/O.
//!
//! A [`Room`] owns every participant's peer connections (webrtc-rs `rtc`
//! engine) and forwards each publisher's RTP to every subscriber. It never
//! reads a clock, never touches a socket and never spawns: every input
//! carries `now`, and everything it wants done comes out of
//! [`Room::poll_output`]. Randomness (ids, ICE credentials, SSRCs) comes from
//! a seeded generator.
//!
//! # Run loop
//!
//! 1. Feed inputs as they happen, each with the current time:
//!    [`Room::join`], [`Room::handle_signal`], [`Room::handle_datagram`],
//!    [`Room::leave`].
//! 2. Drain [`Room::poll_output`] until it returns [`Output::Timeout`]:
//!    send each [`Output::Transmit`] from the media socket, deliver each
//!    [`Output::Signal`] to its participant, act on each [`Output::Event`].
//! 3. When the instant of that timeout arrives with no other input, call
//!    [`Room::handle_timeout`] and go back to 2.
//!
//! The server's UDP socket, WebSocket handlers and timers live in
//! `sfu-server`; tests drive a room with in-memory peers on a virtual clock.

pub mod allocator;
pub mod cache;
pub mod demux;
pub mod engine;
pub mod feedback;
pub mod forwarder;
mod ids;
pub mod munger;
mod room;
pub mod rtp;
pub mod sdp;
pub mod seq;
mod slots;
pub mod srtp;
pub mod vp8;

pub use ids::{ConnId, ParticipantId, SeededRng, TrackKey};
pub use room::{
    CoreError, DropReason, JoinRequest, Output, Room, RoomConfig, RoomEvent, RoomStats, Transmit,
    MAX_ADDRS_PER_CONN,
};
pub use sfu_signal as signal;

/// The origin of the virtual clock in unit tests: the one instant read from
/// the real clock; every later instant is this plus a chosen duration.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_epoch() -> std::time::Instant {
    std::time::Instant::now()
}
