//! Load tester for the SFU: drives a running server over its public REST
//! and WebSocket API with synthetic publishers and subscribers (`webrtc`
//! crate peers, many per process) and measures loss, one-way latency, time
//! to first packet and bitrate per track.

pub mod client;
pub mod html;
pub mod janus;
pub mod loss;
pub mod metrics;
pub mod payload;
pub mod scenario;
pub mod soak;
pub mod tls;
