//! The signalling protocol: versioned JSON messages exchanged over the
//! WebSocket at `/v1/rtc`, and the rules for parsing them.
//!
//! This crate owns the wire format only; it has no I/O. `docs/protocol.md`
//! documents every message with an example. The server parses client text
//! frames with [`ClientMessage::parse`], which turns every malformed input into
//! a [`SignalError`] that maps to an `error` message for that client alone.

pub mod negotiation;

use serde::{Deserialize, Serialize};

/// Protocol version announced in the `joined` message.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest text frame a client may send.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Which of a participant's two peer connections a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The connection the client publishes on; the client offers.
    Publisher,
    /// The connection the client receives on; the server offers.
    Subscriber,
}

/// An ICE candidate as the browser's `RTCIceCandidateInit` spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_m_line_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// An ICE server as the browser's `RTCIceServer` spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Kind of media a track carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    Audio,
    Video,
}

/// A published track as other participants see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackInfo {
    /// Server-assigned track id (`TR_...`).
    pub sid: String,
    /// The publisher's own id for the track (the msid track id in its SDP).
    pub cid: String,
    pub kind: TrackKind,
    pub muted: bool,
    pub mime_type: String,
    pub simulcast: bool,
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantInfo {
    pub sid: String,
    pub identity: String,
    #[serde(default)]
    pub name: String,
    /// Unix seconds.
    #[serde(default)]
    pub joined_at: u64,
    #[serde(default)]
    pub tracks: Vec<TrackInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRef {
    pub name: String,
    pub sid: String,
}

/// Why the server ends a participant's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    ClientLeave,
    Removed,
    RoomDeleted,
    ServerShutdown,
    DuplicateIdentity,
    /// The signalling connection was lost and not resumed within the
    /// reconnect grace period.
    ConnectionLost,
}

/// Error codes carried by the `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    UnknownType,
    BadSdp,
    NotAllowed,
    BadState,
    /// Too many messages: this one was not acted on.
    RateLimited,
    /// A reconnect named a session this room no longer has (the grace
    /// period ran out, or the participant left): join afresh.
    SessionNotFound,
    Internal,
}

/// Messages the client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientMessage {
    Offer {
        target: Target,
        sdp: String,
    },
    Answer {
        target: Target,
        sdp: String,
    },
    Candidate {
        target: Target,
        /// `null` marks the end of candidates.
        candidate: Option<IceCandidate>,
    },
    #[serde(rename_all = "camelCase")]
    Mute {
        track_sid: String,
        muted: bool,
    },
    /// What this subscriber wants of one track it receives. Absent
    /// fields keep their current value.
    #[serde(rename_all = "camelCase")]
    UpdateSubscription {
        track_sid: String,
        #[serde(default)]
        quality: Option<Quality>,
        #[serde(default)]
        max_width: Option<u32>,
        #[serde(default)]
        max_height: Option<u32>,
        /// Frame-rate limit, met by dropping VP8 temporal layers.
        #[serde(default)]
        max_fps: Option<u32>,
        #[serde(default)]
        paused: Option<bool>,
    },
    Ping {
        #[serde(default)]
        ts: f64,
    },
    /// Restart ICE on the subscriber connection (after a change of
    /// network): the server sends a new offer with fresh ICE credentials.
    /// The publisher connection restarts with an offer of the client's.
    RestartIce,
    Leave,
}

/// Whether one simulcast layer (by rid) should be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerState {
    pub rid: String,
    pub active: bool,
}

/// Simulcast quality a subscriber asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Low,
    Medium,
    High,
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    #[serde(rename_all = "camelCase")]
    Joined {
        protocol: u32,
        room: RoomRef,
        participant: ParticipantInfo,
        participants: Vec<ParticipantInfo>,
        ice_servers: Vec<IceServer>,
        can_publish: bool,
        can_subscribe: bool,
    },
    /// The reply to a reconnect: the same participant session goes on.
    /// Messages the client missed while away follow, in order.
    #[serde(rename_all = "camelCase")]
    Reconnected {
        participant: ParticipantInfo,
        /// Fresh credentials, for an ICE restart.
        ice_servers: Vec<IceServer>,
    },
    Offer {
        target: Target,
        sdp: String,
    },
    Answer {
        target: Target,
        sdp: String,
    },
    Candidate {
        target: Target,
        candidate: IceCandidate,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        sid: String,
        identity: String,
    },
    #[serde(rename_all = "camelCase")]
    TrackPublished {
        participant_sid: String,
        track: TrackInfo,
    },
    #[serde(rename_all = "camelCase")]
    TrackUnpublished {
        participant_sid: String,
        track_sid: String,
    },
    #[serde(rename_all = "camelCase")]
    TrackMuted {
        participant_sid: String,
        track_sid: String,
        muted: bool,
    },
    /// To a publisher: which simulcast layers of its track anyone receives.
    /// The client should stop encoding inactive ones (dynacast).
    #[serde(rename_all = "camelCase")]
    PublishedLayers {
        track_sid: String,
        layers: Vec<LayerState>,
    },
    Pong {
        ts: f64,
    },
    /// A fresh join token with the same grants and a later expiry, to join
    /// again with if the connection is lost after the first one expired.
    TokenRefresh {
        token: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Leave {
        reason: LeaveReason,
    },
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising these plain data types cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Why a client frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("message has no string field \"type\"")]
    MissingType,
    #[error("unknown message type \"{0}\"")]
    UnknownType(String),
    #[error("invalid \"{kind}\" message: {detail}")]
    InvalidFields { kind: String, detail: String },
}

impl SignalError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignalError::UnknownType(_) => ErrorCode::UnknownType,
            _ => ErrorCode::BadMessage,
        }
    }

    /// The `error` message this rejection gets on the wire.
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::error(self.code(), self.to_string())
    }
}

const CLIENT_TYPES: &[&str] = &[
    "offer",
    "answer",
    "candidate",
    "mute",
    "updateSubscription",
    "ping",
    "restartIce",
    "leave",
];

impl ClientMessage {
    /// Parses one text frame, telling apart oversized frames, broken JSON,
    /// unknown types and known types with wrong fields.
    pub fn parse(text: &str) -> Result<ClientMessage, SignalError> {
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(SignalError::TooLarge(text.len()));
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| SignalError::MalformedJson(e.to_string()))?;
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or(SignalError::MissingType)?
            .to_owned();
        if !CLIENT_TYPES.contains(&kind.as_str()) {
            return Err(SignalError::UnknownType(kind));
        }
        serde_json::from_value(value).map_err(|e| SignalError::InvalidFields {
            kind,
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_message() {
        let cases = [
            r#"{"type":"offer","target":"publisher","sdp":"v=0"}"#,
            r#"{"type":"answer","target":"subscriber","sdp":"v=0"}"#,
            r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
            r#"{"type":"candidate","target":"subscriber","candidate":null}"#,
            r#"{"type":"mute","trackSid":"TR_1","muted":true}"#,
            r#"{"type":"updateSubscription","trackSid":"TR_1","quality":"low"}"#,
            r#"{"type":"updateSubscription","trackSid":"TR_1","maxWidth":640,"maxHeight":360,"paused":false}"#,
            r#"{"type":"updateSubscription","trackSid":"TR_1","maxFps":15}"#,
            r#"{"type":"ping","ts":12.5}"#,
            r#"{"type":"leave"}"#,
        ];
        for case in cases {
            ClientMessage::parse(case).unwrap_or_else(|e| panic!("{case}: {e}"));
        }
        assert_eq!(
            ClientMessage::parse(r#"{"type":"mute","trackSid":"TR_1","muted":false}"#).unwrap(),
            ClientMessage::Mute {
                track_sid: "TR_1".into(),
                muted: false
            }
        );
    }

    #[test]
    fn rejects_bad_input_with_distinct_errors() {
        assert!(matches!(
            ClientMessage::parse("{not json"),
            Err(SignalError::MalformedJson(_))
        ));
        assert_eq!(
            ClientMessage::parse(r#"{"sdp":"x"}"#),
            Err(SignalError::MissingType)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"dance"}"#),
            Err(SignalError::UnknownType("dance".into()))
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"offer","target":"elsewhere","sdp":"v=0"}"#),
            Err(SignalError::InvalidFields { .. })
        ));
        assert!(matches!(
            ClientMessage::parse(
                r#"{"type":"updateSubscription","trackSid":"TR_1","quality":"ultra"}"#
            ),
            Err(SignalError::InvalidFields { .. })
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"offer","target":"publisher","sdp":5}"#),
            Err(SignalError::InvalidFields { .. })
        ));
        let huge = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert!(matches!(
            ClientMessage::parse(&huge),
            Err(SignalError::TooLarge(_))
        ));
        assert_eq!(
            SignalError::UnknownType("x".into()).code(),
            ErrorCode::UnknownType
        );
    }

    #[test]
    fn server_messages_use_documented_field_names() {
        let msg = ServerMessage::TrackPublished {
            participant_sid: "PA_1".into(),
            track: TrackInfo {
                sid: "TR_1".into(),
                cid: "abc".into(),
                kind: TrackKind::Video,
                muted: false,
                mime_type: "video/VP8".into(),
                simulcast: false,
            },
        };
        let v: serde_json::Value = serde_json::from_str(&msg.to_json()).unwrap();
        assert_eq!(v["type"], "trackPublished");
        assert_eq!(v["participantSid"], "PA_1");
        assert_eq!(v["track"]["mimeType"], "video/VP8");
        let leave = ServerMessage::Leave {
            reason: LeaveReason::RoomDeleted,
        };
        assert_eq!(
            leave.to_json(),
            r#"{"type":"leave","reason":"room_deleted"}"#
        );
        let err = ServerMessage::error(ErrorCode::BadSdp, "x");
        assert_eq!(
            err.to_json(),
            r#"{"type":"error","code":"bad_sdp","message":"x"}"#
        );
    }
}
