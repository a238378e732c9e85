//! The room: participants, their peer connections, published tracks and the
//! down tracks that carry them to subscribers.
//!
//! Each participant has up to two peer connections, as the signalling
//! protocol describes: a publisher connection offered by the client and a
//! subscriber connection offered by the room and renegotiated as tracks come
//! and go.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use rtc::shared::marshal::{Marshal, MarshalSize};
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rustc_hash::FxHashMap;
use sfu_signal::negotiation::{Negotiator, State as NegotiationState};
use sfu_signal::{
    ClientMessage, ErrorCode, IceCandidate, IceServer, LayerState, LeaveReason, ParticipantInfo,
    Quality, RoomRef, ServerMessage, Target, TrackInfo, TrackKind, PROTOCOL_VERSION,
};

use crate::allocator::{self, LossEstimator, RateMeter, VideoDemand};
use crate::cache::{PacketCache, SentEntry, SentLog};
use crate::engine::{
    build_peer_connection, opus_codec, vp8_codec, BuiltConnection, ConnRole, SharedFeedback,
    FEEDBACK_TICK, INITIAL_DOWNLINK_ESTIMATE, MAX_DOWNLINK_ESTIMATE,
};
use crate::feedback::transport_seq;
use crate::forwarder::{Forwarder, Layer, PacketInfo, Preference, Verdict};
use crate::ids::{ConnId, ParticipantId, SeededRng, TrackKey};
use crate::rtp::RtpView;
use crate::seq::SeqExtender;
use crate::slots::{SlotKey, Slots};
use crate::srtp::{KeyCapture, MasterKeys, SrtcpReceiver, SrtpReceiver, SrtpSender, SrtpStream};
use crate::vp8;

/// Keyframe requests to one publisher track are sent at most this often.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// A layer with no packet for this long, while another layer of its track
/// still arrives, is taken as stopped by the publisher.
const LAYER_TIMEOUT: Duration = Duration::from_millis(1000);
/// A simulcast layer nobody has wanted for this long is switched off at
/// the publisher.
const DYNACAST_GRACE: Duration = Duration::from_secs(3);
/// Loss alone never takes a subscriber below this: enough for the low
/// layers of a few tracks. Loss can come from a receiver's own trouble as
/// much as from the link; pausing video takes an explicit estimate (REMB).
const MIN_LOSS_ESTIMATE: u64 = 300_000;
/// How often each down track gets a sender report.
const SENDER_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Source addresses routed to one connection at most: a client's host,
/// reflexive and relayed candidates on both address families and several
/// interfaces, with room to spare for a change of network. Any holder of
/// a ufrag can send checks naming it from as many addresses as it likes;
/// past this, the oldest address (never the one media goes to) stops
/// being routed, so the routing tables stay bounded. An address evicted
/// while still in use comes back with its next check.
pub const MAX_ADDRS_PER_CONN: usize = 16;
/// How often subscribers' allocations are revisited.
const ALLOCATION_INTERVAL: Duration = Duration::from_millis(500);
/// Requests for a newly connected subscriber wait at most this long.
const URGENT_KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(100);

/// Errors from misusing the room's API (not from bad client input, which
/// gets an `error` message on the wire instead).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("room is full ({0} participants)")]
    RoomFull(usize),
    #[error("unknown participant")]
    UnknownParticipant,
    #[error("peer connection: {0}")]
    Engine(#[from] rtc::shared::error::Error),
}

/// Why a datagram or packet was not forwarded. Drops are outcomes, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A datagram from an address that no ICE check has introduced.
    UnknownSource,
    /// A STUN binding request naming a ufrag this room does not own.
    UnknownUfrag,
    /// RTP for a track the room does not know.
    UnknownTrack,
    /// The subscriber paused the track.
    Paused,
    /// The subscriber's bandwidth does not fit even the lowest layer.
    Bandwidth,
    /// The publisher sends no layer the subscriber could take.
    NoLayerAvailable,
    /// A layer other than the one being forwarded (or switched to).
    LayerNotSelected,
    /// The target layer has not sent a keyframe since it was chosen.
    WaitingForKeyframe,
    /// A packet with no media (padding).
    Padding,
    /// A frame of a temporal layer above what the subscriber wants.
    TemporalLayer,
    /// From before the last layer switch or too late to place.
    TooOld,
    /// Already dropped once and not to be forwarded now.
    Duplicate,
    /// The subscriber's connection has not yet negotiated this track.
    NotNegotiated,
    /// The subscriber's connection is not up (ICE/DTLS) yet, or any more.
    NotConnected,
    /// The engine refused the packet.
    EngineRejected,
    /// Inbound RTP that failed SRTP authentication, or a replay.
    SrtpRejected,
}

impl DropReason {
    pub const ALL: [DropReason; 16] = [
        DropReason::UnknownSource,
        DropReason::UnknownUfrag,
        DropReason::UnknownTrack,
        DropReason::Paused,
        DropReason::Bandwidth,
        DropReason::NoLayerAvailable,
        DropReason::LayerNotSelected,
        DropReason::WaitingForKeyframe,
        DropReason::Padding,
        DropReason::TemporalLayer,
        DropReason::TooOld,
        DropReason::Duplicate,
        DropReason::NotNegotiated,
        DropReason::NotConnected,
        DropReason::EngineRejected,
        DropReason::SrtpRejected,
    ];

    /// Stable name for metrics labels. (`ALL` lists the reasons in
    /// declaration order, so `reason as usize` indexes it.)
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::UnknownUfrag => "unknown_ufrag",
            DropReason::UnknownTrack => "unknown_track",
            DropReason::Paused => "paused",
            DropReason::Bandwidth => "bandwidth",
            DropReason::NoLayerAvailable => "no_layer_available",
            DropReason::LayerNotSelected => "layer_not_selected",
            DropReason::WaitingForKeyframe => "waiting_for_keyframe",
            DropReason::Padding => "padding",
            DropReason::TemporalLayer => "temporal_layer",
            DropReason::TooOld => "too_old",
            DropReason::Duplicate => "duplicate",
            DropReason::NotNegotiated => "not_negotiated",
            DropReason::NotConnected => "not_connected",
            DropReason::EngineRejected => "engine_rejected",
            DropReason::SrtpRejected => "srtp_rejected",
        }
    }
}

/// Static settings of one room.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub name: String,
    pub sid: String,
    /// The media socket's address as clients reach it: advertised as the
    /// host candidate and used as the local address of every connection.
    pub media_addr: SocketAddr,
    pub seed: u64,
    pub ice_servers: Vec<IceServer>,
    /// 0 means no limit.
    pub max_participants: usize,
    /// Media sections a publisher offer may carry (its tracks); 0 means
    /// no limit.
    pub max_tracks: usize,
}

/// What a join token grants, as checked by the server.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub identity: String,
    pub name: String,
    pub can_publish: bool,
    pub can_subscribe: bool,
    /// Unix seconds, for display only.
    pub joined_at_unix: u64,
    /// ICE servers for this participant (with its own TURN credentials);
    /// empty: the room's.
    pub ice_servers: Vec<IceServer>,
}

/// A datagram to send from the media socket.
#[derive(Debug)]
pub struct Transmit {
    pub destination: SocketAddr,
    pub contents: BytesMut,
}

/// Things the I/O shell must act on besides sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEvent {
    /// STUN binding requests naming this ufrag belong to this room.
    UfragAdded(String),
    /// These ufrags and source addresses no longer belong to this room.
    Unrouted {
        ufrags: Vec<String>,
        addrs: Vec<SocketAddr>,
    },
    /// The participant is gone; close its signalling connection once the
    /// signals queued before this event are sent.
    ParticipantRemoved {
        participant: ParticipantId,
        reason: LeaveReason,
    },
}

/// One thing the room wants done.
#[derive(Debug)]
pub enum Output {
    Transmit(Transmit),
    Signal {
        participant: ParticipantId,
        message: ServerMessage,
    },
    Event(RoomEvent),
    /// Nothing more to do until this instant (or the next input).
    Timeout(Instant),
}

/// Counters of what the room has done, for metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct RoomStats {
    pub datagrams_in: u64,
    pub rtp_in: u64,
    pub rtp_forwarded: u64,
    /// Forwarded packets (and retransmissions) the room encrypted itself;
    /// the rest went through the engine's send path.
    pub rtp_sent_by_room: u64,
    /// Inbound RTP the room decrypted itself, past the engine's read
    /// path; the rest of `rtp_in` came through the engine.
    pub rtp_received_by_room: u64,
    pub bytes_forwarded: u64,
    pub keyframe_requests_sent: u64,
    /// Packets sent again from the cache in answer to NACKs.
    pub retransmissions: u64,
    /// NACKed packets no longer (or never) in the cache.
    pub retransmissions_missed: u64,
    /// Clients' RTCP packets (compound) the room decrypted itself, past
    /// the engine's read path.
    pub rtcp_received_by_room: u64,
    /// Source addresses no longer routed to a connection because checks
    /// came from more than [`MAX_ADDRS_PER_CONN`] of them.
    pub addresses_unrouted: u64,
    /// Indexed like [`DropReason::ALL`]; see [`RoomStats::dropped`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl RoomStats {
    /// Packets dropped for this reason so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
}

struct Conn {
    pc: RTCPeerConnection,
    participant: ParticipantId,
    target: Target,
    /// Every local ufrag the connection has had (a new one per ICE
    /// restart), each routed to it until it closes.
    ufrags: Vec<String>,
    addrs: Vec<SocketAddr>,
    dirty: bool,
    /// ICE and DTLS are up: media written now reaches the client.
    connected: bool,
    /// Something other than our own writes touched the connection since it
    /// was last drained (input, timers, signalling).
    fed: bool,
    /// The engine's next timer, as of the last time this connection was
    /// drained (every change to a connection drains it).
    next_timeout: Option<Instant>,
    /// When the room runs the engine's timers next: `next_timeout`, or
    /// once connected, the first beat of the room at or after it.
    wake: Option<Instant>,
    /// When the engine's timers last ran.
    engine_ran: Instant,
    /// The connection's crypto, which notes its SRTP keys.
    keys: Arc<KeyCapture>,
    /// Forwarded RTP is encrypted here, not by the engine, once DTLS is up
    /// (subscriber connections), with the keys it was built from.
    srtp: Option<(SrtpSender, MasterKeys)>,
    /// Where the engine last sent something other than STUN: the remote
    /// end of the selected candidate pair.
    media_dest: Option<SocketAddr>,
    /// Publisher connections: inbound RTP of the streams in `inbound` is
    /// decrypted here, with the keys it was built from, and recorded for
    /// this reception feedback, past the engine (which saw each stream's
    /// first packet and announced it).
    feedback: Option<SharedFeedback>,
    srtp_in: Option<(SrtpReceiver, MasterKeys)>,
    inbound: FxHashMap<u32, TrackKey>,
    /// The client's RTCP (a publisher's sender reports; a subscriber's
    /// NACKs, keyframe requests and estimates) is decrypted here, past
    /// the engine, with the keys it was built from.
    srtcp_in: Option<(SrtcpReceiver, MasterKeys)>,
}

/// Puts what `build` makes of `keys` in `slot`, unless the slot already
/// holds what was built from them. When it fails, the slot is left as it
/// was and that traffic goes through the engine.
fn take_keys<T>(
    slot: &mut Option<(T, MasterKeys)>,
    keys: Option<MasterKeys>,
    build: impl FnOnce(&MasterKeys) -> Result<T, rtc::crypto::CryptoError>,
    what: &str,
) {
    let Some(keys) = keys else {
        return;
    };
    if slot.as_ref().is_some_and(|(_, k)| *k == keys) {
        return;
    }
    match build(&keys) {
        Ok(built) => *slot = Some((built, keys)),
        Err(e) => tracing::warn!(error = %e, what, "keys not usable; through the engine"),
    }
}

/// What became of a datagram offered to a connection's inbound fast path.
enum Inbound {
    /// Not RTP of a stream the room decrypts itself: for the engine.
    ForEngine,
    Dropped(DropReason),
    Rtp {
        key: TrackKey,
        packet: rtc::rtp::Packet,
    },
}

/// Where sending on a connection leaves its traces: datagrams ready to go,
/// and connections the engine has output waiting on.
struct Sink<'a> {
    outputs: &'a mut VecDeque<Output>,
    dirty: &'a mut Vec<ConnId>,
    buffer: &'a mut BytesMut,
}

/// Room for this many full-size datagrams per allocation of the buffer
/// forwarded packets are built in.
const OUT_BUFFER_PACKETS: usize = 32;

/// The room's beat: instants a whole number of [`FEEDBACK_TICK`]s after
/// its creation. Timers that can wait a little are run on it, so a room
/// wakes once for many of them.
#[derive(Debug, Clone, Copy)]
struct Beats {
    epoch: Instant,
}

impl Beats {
    fn since(self, t: Instant) -> Duration {
        t.saturating_duration_since(self.epoch)
    }

    /// The first beat at or after `t`.
    fn at_or_after(self, t: Instant) -> Instant {
        self.epoch + beat_at_or_after(self.since(t))
    }

    /// The first beat after `t`.
    fn after(self, t: Instant) -> Instant {
        self.epoch + beat_after(self.since(t))
    }

    /// The beat `interval` (whole ticks) after the last beat at or before
    /// `now`: a periodic timer run late keeps its phase.
    fn later(self, now: Instant, interval: Duration) -> Instant {
        self.epoch + beat_later(self.since(now), interval)
    }
}

/// The first beat at or after `since` the epoch, as time since it.
fn beat_at_or_after(since: Duration) -> Duration {
    let (since, tick) = (since.as_nanos(), FEEDBACK_TICK.as_nanos());
    Duration::from_nanos((since.div_ceil(tick) * tick) as u64)
}

/// The first beat after `since` the epoch.
fn beat_after(since: Duration) -> Duration {
    let (since, tick) = (since.as_nanos(), FEEDBACK_TICK.as_nanos());
    Duration::from_nanos(((since / tick + 1) * tick) as u64)
}

/// The beat `interval` after the last beat at or before `since`.
fn beat_later(since: Duration, interval: Duration) -> Duration {
    beat_after(since + interval.saturating_sub(FEEDBACK_TICK))
}

/// Who encrypted and queued a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SentBy {
    Room,
    Engine,
}

/// How a packet goes out on one down track: its header fields, and the
/// VP8 fields to write into the payload where they differ from the
/// source's (after a layer switch).
struct Outgoing<'a> {
    ssrc: u32,
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    vp8: Option<(&'a vp8::Vp8Descriptor, u16, u8)>,
}

impl Outgoing<'_> {
    /// Writes the fields over a marshalled RTP header (RFC 3550 5.1): the
    /// marker bit stays, the payload type, sequence number, timestamp and
    /// SSRC are this down track's.
    fn write_header(&self, header: &mut [u8]) {
        header[1] = (header[1] & 0x80) | (self.payload_type & 0x7F);
        header[2..4].copy_from_slice(&self.seq.to_be_bytes());
        header[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        header[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
    }

    /// The rewritten packet as the engine takes it.
    fn packet(&self, source: &rtc::rtp::Packet) -> rtc::rtp::Packet {
        let mut packet = source.clone();
        packet.header.ssrc = self.ssrc;
        packet.header.payload_type = self.payload_type;
        packet.header.sequence_number = self.seq;
        packet.header.timestamp = self.timestamp;
        if let Some((d, picture_id, tl0_pic_idx)) = self.vp8 {
            let mut payload = BytesMut::from(&source.payload[..]);
            vp8::rewrite(&mut payload, d, picture_id, tl0_pic_idx);
            packet.payload = payload.freeze();
        }
        packet
    }
}

impl Conn {
    /// Sends `source` on `sender`, rewritten as `out` says: encrypted here
    /// (as part of `stream`, the down track's SRTP stream) and queued
    /// straight to the selected path when the connection's keys are known,
    /// else through the engine. Returns how it was sent, if it was.
    #[allow(clippy::too_many_arguments)]
    fn send_rtp(
        &mut self,
        id: ConnId,
        sender: RTCRtpSenderId,
        stream: &mut SrtpStream,
        now: Instant,
        source: &rtc::rtp::Packet,
        out: &Outgoing<'_>,
        sink: &mut Sink<'_>,
    ) -> Option<SentBy> {
        if let (Some((srtp, _)), Some(destination)) = (self.srtp.as_mut(), self.media_dest) {
            let header_len = source.header.marshal_size();
            let size = header_len + source.payload.len() + srtp.profile().overhead();
            // Built at the end of the shared buffer (empty between
            // packets), then split off it with exactly its own bytes: the
            // source's header with this down track's fields written over
            // it, and the source's payload.
            let buffer = &mut *sink.buffer;
            debug_assert!(buffer.is_empty());
            // Once every datagram cut from it has been sent and dropped,
            // the buffer is taken back whole: the same memory, still in
            // the cache, for the next packets.
            let chunk = size.max(OUT_BUFFER_PACKETS * 1500);
            if buffer.capacity() < size && !buffer.try_reclaim(chunk) {
                *buffer = BytesMut::with_capacity(chunk);
            }
            buffer.resize(header_len, 0);
            if let Err(e) = source.header.marshal_to(&mut buffer[..]) {
                tracing::trace!(error = %e, "rtp header");
                buffer.clear();
                return None;
            }
            out.write_header(&mut buffer[..header_len]);
            buffer.extend_from_slice(&source.payload);
            if let Some((d, picture_id, tl0_pic_idx)) = out.vp8 {
                vp8::rewrite(&mut buffer[header_len..], d, picture_id, tl0_pic_idx);
            }
            if let Err(e) = srtp.protect(stream, buffer, header_len) {
                tracing::trace!(error = %e, "srtp");
                buffer.clear();
                return None;
            }
            sink.outputs.push_back(Output::Transmit(Transmit {
                destination,
                contents: buffer.split(),
            }));
            return Some(SentBy::Room);
        }
        let mut rtp_sender = self.pc.rtp_sender(sender)?;
        if let Err(e) = rtp_sender.write_rtp(now, out.packet(source)) {
            tracing::trace!(error = %e, "write_rtp");
            return None;
        }
        if !self.dirty {
            self.dirty = true;
            sink.dirty.push(id);
        }
        Some(SentBy::Engine)
    }

    /// Takes the outbound SRTP keys of a newly connected subscriber
    /// connection, unless they are the ones already in use (the state of
    /// each stream's rollover counter goes on with them).
    fn take_srtp_keys(&mut self) {
        let (keys, crypto) = (self.keys.outbound(), self.keys.inner_crypto());
        take_keys(&mut self.srtp, keys, |k| SrtpSender::new(k, crypto), "srtp");
    }

    /// Takes the inbound SRTP keys of a newly connected publisher
    /// connection, unless they are the ones already in use.
    fn take_inbound_keys(&mut self) {
        let (keys, crypto) = (self.keys.inbound(), self.keys.inner_crypto());
        take_keys(
            &mut self.srtp_in,
            keys,
            |k| SrtpReceiver::new(k, crypto),
            "srtp",
        );
    }

    /// Takes the inbound SRTCP keys of a newly connected connection,
    /// unless they are the ones already in use.
    fn take_srtcp_keys(&mut self) {
        let (keys, crypto) = (self.keys.inbound(), self.keys.inner_crypto());
        take_keys(
            &mut self.srtcp_in,
            keys,
            |k| SrtcpReceiver::new(k, crypto),
            "srtcp",
        );
    }

    /// A client's SRTCP, decrypted and parsed without the engine's read
    /// path: the interceptor chain of a connection only hands the same
    /// packets to the room, and takes note of a publisher's sender
    /// reports, as this does. `None` for anything else, and for what does
    /// not decrypt or parse: the engine has it.
    fn receive_rtcp(
        &mut self,
        now: Instant,
        contents: &[u8],
        buffer: &mut BytesMut,
    ) -> Option<Vec<Box<dyn rtc::rtcp::Packet>>> {
        if contents.len() < 8 || contents[0] >> 6 != 2 || !(192..=223).contains(&contents[1]) {
            return None;
        }
        let (srtcp, _) = self.srtcp_in.as_mut()?;
        let mut plain = match srtcp.unprotect(contents, buffer) {
            Ok(plain) => plain.freeze(),
            Err(e) => {
                tracing::trace!(error = %e, "srtcp");
                return None;
            }
        };
        let packets = rtc::rtcp::packet::unmarshal(&mut plain).ok()?;
        if let Some(feedback) = &self.feedback {
            for p in &packets {
                if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                    feedback.sender_report(now, sr.ssrc, sr.ntp_time);
                }
            }
        }
        Some(packets)
    }

    /// Inbound RTP of a known stream: decrypted and recorded for the
    /// connection's reception feedback here, without the engine's read
    /// path (its demultiplexing, generic SRTP handling, interceptor chain,
    /// queues and copies).
    fn receive_rtp(&mut self, now: Instant, contents: &[u8], buffer: &mut BytesMut) -> Inbound {
        // RTP (version 2), not RTCP (RFC 5761: packet types 192-223).
        if contents.len() < 12 || contents[0] >> 6 != 2 || (192..=223).contains(&contents[1]) {
            return Inbound::ForEngine;
        }
        let ssrc = u32::from_be_bytes([contents[8], contents[9], contents[10], contents[11]]);
        let (Some(key), Some((srtp, _)), Some(feedback)) = (
            self.inbound.get(&ssrc).copied(),
            self.srtp_in.as_mut(),
            self.feedback.as_ref(),
        ) else {
            return Inbound::ForEngine;
        };
        let Some(view) = RtpView::parse(contents) else {
            return Inbound::ForEngine;
        };
        let plain = match srtp.unprotect(contents, &view, buffer) {
            Ok(plain) => plain.freeze(),
            Err(e) => {
                tracing::trace!(error = %e, ssrc, "srtp");
                return Inbound::Dropped(DropReason::SrtpRejected);
            }
        };
        let Some(payload) = view.payload_range(&plain) else {
            return Inbound::Dropped(DropReason::SrtpRejected);
        };
        feedback.feed(now, ssrc, view.sequence_number, view.timestamp, |id| {
            view.extension(contents, id).and_then(transport_seq)
        });
        Inbound::Rtp {
            key,
            packet: rtc::rtp::Packet {
                header: view.header(&plain),
                payload: plain.slice(payload),
            },
        }
    }

    /// Takes the engine's next timer and works out when the room runs it.
    ///
    /// Once connected, all that is left of the engine's own timers is the
    /// ICE agent's watch over the selected path (a wake every 200 ms): it
    /// runs on the room's next beat, so the connections of a room share
    /// their wakes, each about every 300 ms. (Held to once a second, a
    /// moved client's recovery took twice as long, sometimes failed, in
    /// the NAT matrix test.) A timer due no later than the engine's last
    /// run is work it deferred to its next wake (as the ICE agent does
    /// with a check a new candidate or a restart asks for): it runs at
    /// once, connected or not.
    fn set_engine_timeout(&mut self, next: Option<Instant>, beats: Beats) {
        self.next_timeout = next;
        self.wake = next.map(|t| {
            if self.connected && t > self.engine_ran {
                beats.at_or_after(t)
            } else {
                t
            }
        });
    }

    /// Notes where a datagram the engine sends goes, if it is not STUN
    /// (which answers any address that checked).
    fn note_path(&mut self, destination: SocketAddr, contents: &[u8]) {
        if contents.first().is_some_and(|b| *b > 3) {
            self.media_dest = Some(destination);
        }
    }
}

/// A subscriber's wishes for one track, as last sent.
#[derive(Debug, Clone, Copy, Default)]
struct SubscriptionPref {
    quality: Option<Layer>,
    max_dimensions: Option<(u32, u32)>,
    max_fps: Option<u32>,
    paused: bool,
}

/// The highest VP8 temporal layer that keeps a camera stream (30 fps, three
/// temporal layers at 7.5 / 15 / 30 fps) within a frame-rate limit.
fn temporal_for_fps(fps: u32) -> u8 {
    match fps {
        0..=10 => 0,
        11..=20 => 1,
        _ => u8::MAX,
    }
}

/// Where a down track lives in the room's slots, for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DownId(usize);

impl SlotKey for DownId {
    fn from_index(index: usize) -> Self {
        DownId(index)
    }
    fn index(self) -> usize {
        self.0
    }
}

impl SlotKey for ConnId {
    fn from_index(index: usize) -> Self {
        ConnId(index)
    }
    fn index(self) -> usize {
        self.0
    }
}

/// Every down track of the room, each in a slot of its own: the forwarding
/// loop reaches a subscriber's down track from the published track's list
/// without a map lookup, and the down tracks of one track, made one after
/// another, mostly lie together.
type Downs = Slots<DownId, DownTrack>;

/// The room's peer connections; a closed connection's slot is reused.
type Conns = Slots<ConnId, Box<Conn>>;

struct DownTrack {
    sender: RTCRtpSenderId,
    ssrc: u32,
    forwarder: Forwarder,
    pref: SubscriptionPref,
    /// What went out under which sequence number, for NACKs.
    sent: SentLog,
    /// The SRTP state of this track's SSRC on the subscriber connection.
    srtp: SrtpStream,
    /// When the allocator last changed this track's allocation.
    last_upgrade: Option<Instant>,
    /// Since when the estimate has been too small for the lowest layer.
    short_since: Option<Instant>,
    /// Sent so far, for sender reports.
    packets_sent: u32,
    octets_sent: u32,
    payload_type: Option<u8>,
    /// The subscriber offer that first carried this track.
    offer_gen: Option<u64>,
    negotiated: bool,
}

struct Participant {
    sid: String,
    identity: String,
    name: String,
    joined_at: u64,
    can_publish: bool,
    can_subscribe: bool,
    publisher: Option<ConnId>,
    subscriber: Option<ConnId>,
    /// Engine track id on the publisher connection -> published track.
    published: HashMap<String, TrackKey>,
    /// The tracks subscribed to, and where their down tracks are.
    down_tracks: BTreeMap<TrackKey, DownId>,
    negotiation: Negotiator,
    /// Downlink estimate of the subscriber connection, bits per second:
    /// the lower of the receiver's REMB and the loss-based estimate.
    estimate: Option<u64>,
    remb: Option<u64>,
    loss: LossEstimator,
    loss_estimate: Option<u64>,
    /// The share of packets the subscriber NACKed in the last second.
    recent_loss: f64,
    /// What the room sends this subscriber (bits), and packets sent and
    /// NACKed in the last second (counted as 8-bit "bytes" in the meters).
    sent_rate: RateMeter,
    sent_packets: RateMeter,
    nacked_packets: RateMeter,
}

/// One simulcast layer (or the only stream) of a published track.
struct PubLayer {
    rid: Option<String>,
    ssrc: u32,
    layer: Layer,
    seq: SeqExtender,
    /// Frame size, from the layer's last keyframe.
    dimensions: Option<(u16, u16)>,
    last_keyframe_request: Option<Instant>,
    /// Recent packets, for answering subscribers' NACKs.
    cache: PacketCache,
    /// Bitrate the layer arrives at.
    rate: RateMeter,
    /// When the layer's last packet arrived, and whether it counts as sent:
    /// a publisher drops its top layers when short of bandwidth or CPU, and
    /// subscribers on a layer that stopped must move to one that did not.
    last_packet_at: Option<Instant>,
    active: bool,
    /// The highest bitrate measured while the layer was sent, for
    /// allocating it while dynacast has it switched off.
    last_bitrate: u64,
    /// The publisher's last sender report for this layer: NTP time, RTP
    /// time, and when it arrived.
    sender_report: Option<(u64, u32, Instant)>,
}

/// Spatial layer of a simulcast stream from its rid: the usual names for
/// low/medium/high, digits, else in order of appearance.
fn layer_of_rid(rid: Option<&str>, known: usize) -> Layer {
    match rid {
        None | Some("q" | "l" | "lo" | "low" | "0") => 0,
        Some("h" | "m" | "mid" | "medium" | "1") => 1,
        Some("f" | "hi" | "high" | "full" | "2") => 2,
        Some(_) => known.min(Layer::MAX as usize) as Layer,
    }
}

struct PublishedTrack {
    sid: String,
    cid: String,
    publisher: ParticipantId,
    kind: TrackKind,
    codec: RTCRtpCodec,
    receiver: RTCRtpReceiverId,
    /// The layers seen so far.
    layers: Vec<PubLayer>,
    muted: bool,
    /// Subscribers, with their down track of this track.
    subscribers: Vec<(ParticipantId, DownId)>,
    /// Dynacast: layers the publisher was told not to send, and since when
    /// each active layer has been wanted by nobody.
    disabled: Vec<Layer>,
    unwanted_since: Vec<(Layer, Instant)>,
}

impl PublishedTrack {
    fn info(&self) -> TrackInfo {
        TrackInfo {
            sid: self.sid.clone(),
            cid: self.cid.clone(),
            kind: self.kind,
            muted: self.muted,
            mime_type: self.codec.mime_type.clone(),
            simulcast: self.layers.iter().any(|l| l.rid.is_some()),
        }
    }

    fn available(&self) -> Vec<Layer> {
        self.layers
            .iter()
            .filter(|l| l.active)
            .map(|l| l.layer)
            .collect()
    }
}

/// A room: see the crate documentation for its run loop.
pub struct Room {
    config: RoomConfig,
    rng: SeededRng,
    participants: BTreeMap<ParticipantId, Participant>,
    next_participant: u64,
    conns: Conns,
    by_ufrag: HashMap<String, ConnId>,
    by_addr: FxHashMap<SocketAddr, ConnId>,
    tracks: BTreeMap<TrackKey, PublishedTrack>,
    next_track: u64,
    downs: Downs,
    down_by_ssrc: FxHashMap<u32, (ParticipantId, TrackKey)>,
    dirty: Vec<ConnId>,
    outputs: VecDeque<Output>,
    /// Forwarded datagrams are built in slices of this buffer: one
    /// allocation for many packets.
    out_buffer: BytesMut,
    /// Likewise the plaintext of published packets the room decrypts.
    in_buffer: BytesMut,
    /// Where clients' RTCP is decrypted.
    rtcp_buffer: BytesMut,
    stats: RoomStats,
    last_now: Instant,
    /// When subscribers with an estimate are next reallocated (upgrades
    /// wait for this tick; downgrades happen as estimates arrive).
    next_allocation: Instant,
    /// When down tracks next get sender reports.
    next_sender_reports: Instant,
    beats: Beats,
    /// When the publisher connections' reception feedback next runs (TWCC
    /// feedback, NACKs, receiver reports), all at once; none until a
    /// publisher has sent something.
    next_feedback: Option<Instant>,
}

impl Room {
    pub fn new(config: RoomConfig, now: Instant) -> Room {
        Room {
            rng: SeededRng::new(config.seed),
            config,
            participants: BTreeMap::new(),
            next_participant: 1,
            conns: Conns::default(),
            by_ufrag: HashMap::new(),
            by_addr: FxHashMap::default(),
            tracks: BTreeMap::new(),
            downs: Downs::default(),
            next_track: 1,
            down_by_ssrc: FxHashMap::default(),
            dirty: Vec::new(),
            outputs: VecDeque::new(),
            out_buffer: BytesMut::new(),
            in_buffer: BytesMut::new(),
            rtcp_buffer: BytesMut::new(),
            stats: RoomStats::default(),
            last_now: now,
            next_allocation: now + ALLOCATION_INTERVAL,
            next_sender_reports: now + SENDER_REPORT_INTERVAL,
            beats: Beats { epoch: now },
            next_feedback: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn sid(&self) -> &str {
        &self.config.sid
    }

    pub fn stats(&self) -> &RoomStats {
        &self.stats
    }

    /// Peer connections currently open.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Connection slots held, open or free for reuse.
    pub fn connection_slots(&self) -> usize {
        self.conns.capacity()
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    /// The participants as the REST API and `joined` show them.
    pub fn participants(&self) -> Vec<ParticipantInfo> {
        self.participants
            .keys()
            .map(|id| self.participant_info(*id))
            .collect()
    }

    /// The participant with this identity, if present.
    pub fn find_identity(&self, identity: &str) -> Option<ParticipantId> {
        self.participants
            .iter()
            .find(|(_, p)| p.identity == identity)
            .map(|(id, _)| *id)
    }

    /// The participant session `sid` (`PA_...`) if it belongs to
    /// `identity`: what a reconnecting client names to resume.
    pub fn find_session(&self, sid: &str, identity: &str) -> Option<ParticipantId> {
        self.participants
            .iter()
            .find(|(_, p)| p.sid == sid && p.identity == identity)
            .map(|(id, _)| *id)
    }

    /// How others see the participant, if present.
    pub fn participant(&self, id: ParticipantId) -> Option<ParticipantInfo> {
        self.participants
            .contains_key(&id)
            .then(|| self.participant_info(id))
    }

    /// The participant's server id (`PA_...`).
    pub fn participant_sid(&self, id: ParticipantId) -> Option<&str> {
        self.participants.get(&id).map(|p| p.sid.as_str())
    }

    fn participant_info(&self, id: ParticipantId) -> ParticipantInfo {
        let p = &self.participants[&id];
        let mut tracks: Vec<TrackInfo> = p
            .published
            .values()
            .filter_map(|k| self.tracks.get(k))
            .map(PublishedTrack::info)
            .collect();
        tracks.sort_by(|a, b| a.sid.cmp(&b.sid));
        ParticipantInfo {
            sid: p.sid.clone(),
            identity: p.identity.clone(),
            name: p.name.clone(),
            joined_at: p.joined_at,
            tracks,
        }
    }

    fn signal(&mut self, participant: ParticipantId, message: ServerMessage) {
        self.outputs.push_back(Output::Signal {
            participant,
            message,
        });
    }

    fn broadcast(&mut self, except: Option<ParticipantId>, message: ServerMessage) {
        let ids: Vec<ParticipantId> = self
            .participants
            .keys()
            .copied()
            .filter(|id| Some(*id) != except)
            .collect();
        for id in ids {
            self.signal(id, message.clone());
        }
    }

    /// Admits a participant. Sends it `joined`, tells the others, and opens
    /// its subscriber connection to every track already published.
    pub fn join(&mut self, now: Instant, request: JoinRequest) -> Result<ParticipantId, CoreError> {
        self.last_now = now;
        if let Some(old) = self.find_identity(&request.identity) {
            self.remove_participant(now, old, LeaveReason::DuplicateIdentity);
        }
        if self.config.max_participants > 0
            && self.participants.len() >= self.config.max_participants
        {
            return Err(CoreError::RoomFull(self.config.max_participants));
        }
        let id = ParticipantId(self.next_participant);
        self.next_participant += 1;
        let sid = self.rng.sid("PA");
        self.participants.insert(
            id,
            Participant {
                sid,
                identity: request.identity,
                name: request.name,
                joined_at: request.joined_at_unix,
                can_publish: request.can_publish,
                can_subscribe: request.can_subscribe,
                publisher: None,
                subscriber: None,
                published: HashMap::new(),
                down_tracks: BTreeMap::new(),
                negotiation: Negotiator::default(),
                estimate: None,
                remb: None,
                loss: LossEstimator::new(INITIAL_DOWNLINK_ESTIMATE),
                loss_estimate: None,
                recent_loss: 0.0,
                sent_rate: RateMeter::default(),
                sent_packets: RateMeter::default(),
                nacked_packets: RateMeter::default(),
            },
        );

        let others: Vec<ParticipantInfo> = self
            .participants
            .keys()
            .filter(|other| **other != id)
            .map(|other| self.participant_info(*other))
            .collect();
        let me = self.participant_info(id);
        self.signal(
            id,
            ServerMessage::Joined {
                protocol: PROTOCOL_VERSION,
                room: RoomRef {
                    name: self.config.name.clone(),
                    sid: self.config.sid.clone(),
                },
                participant: me.clone(),
                participants: others,
                ice_servers: if request.ice_servers.is_empty() {
                    self.config.ice_servers.clone()
                } else {
                    request.ice_servers.clone()
                },
                can_publish: request.can_publish,
                can_subscribe: request.can_subscribe,
            },
        );
        self.broadcast(
            Some(id),
            ServerMessage::ParticipantJoined { participant: me },
        );

        if request.can_subscribe {
            let conn = self.open_conn(now, id, Target::Subscriber)?;
            self.participants
                .get_mut(&id)
                .ok_or(CoreError::UnknownParticipant)?
                .subscriber = Some(conn);
            let existing: Vec<TrackKey> = self
                .tracks
                .iter()
                .filter(|(_, t)| t.publisher != id)
                .map(|(k, _)| *k)
                .collect();
            for track in existing {
                self.subscribe(id, track);
            }
            self.maybe_offer(now, id);
        }
        self.drain(now);
        Ok(id)
    }

    /// Removes a participant at its own request or the server's.
    pub fn leave(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) {
        self.last_now = now;
        self.remove_participant(now, id, reason);
        self.drain(now);
    }

    fn open_conn(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        target: Target,
    ) -> Result<ConnId, CoreError> {
        let role = match target {
            Target::Publisher => ConnRole::Answering,
            Target::Subscriber => ConnRole::Offering,
        };
        let BuiltConnection {
            mut pc,
            keys,
            feedback,
        } = build_peer_connection(now, role, self.rng.next_u32())?;
        let addr = self.config.media_addr;
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: addr.ip().to_string(),
                port: addr.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()?;
        pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)?;
        let next_timeout = pc.poll_timeout();
        let conn = Box::new(Conn {
            next_timeout,
            wake: next_timeout,
            engine_ran: now,
            pc,
            participant,
            target,
            ufrags: Vec::new(),
            addrs: Vec::new(),
            dirty: false,
            connected: false,
            fed: false,
            keys,
            srtp: None,
            media_dest: None,
            feedback,
            srtp_in: None,
            srtcp_in: None,
            inbound: FxHashMap::default(),
        });
        Ok(self.conns.insert(conn))
    }

    /// Routes STUN for the ufrag of the connection's local description,
    /// if it is new (the first description, or one after an ICE restart).
    /// Called after every local description is set: the client can check
    /// a ufrag only once it has seen it.
    fn learn_local_ufrag(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Some(sdp) = c.pc.local_description().map(|d| d.sdp) else {
            return;
        };
        let Some(ufrag) = sdp
            .lines()
            .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
            .map(|u| u.trim().to_owned())
        else {
            return;
        };
        if c.ufrags.contains(&ufrag) {
            return;
        }
        c.ufrags.push(ufrag.clone());
        self.by_ufrag.insert(ufrag.clone(), id);
        self.outputs
            .push_back(Output::Event(RoomEvent::UfragAdded(ufrag)));
    }

    /// The down track of `sub` for `key`, if subscribed.
    fn down(&self, sub: ParticipantId, key: TrackKey) -> Option<&DownTrack> {
        let id = *self.participants.get(&sub)?.down_tracks.get(&key)?;
        self.downs.get(id)
    }

    fn down_mut(&mut self, sub: ParticipantId, key: TrackKey) -> Option<&mut DownTrack> {
        let id = *self.participants.get(&sub)?.down_tracks.get(&key)?;
        self.downs.get_mut(id)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id).map(|c| &mut **c)
    }

    /// Schedules a connection for a full drain (events, application
    /// messages and datagrams). Paths that only write media to a connection
    /// mark it dirty without `fed`, and its drain only collects datagrams.
    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.conn_mut(id) {
            conn.fed = true;
        }
        self.mark_written(id);
    }

    /// Schedules a connection for a drain of its datagrams only: what was
    /// written to it needs nothing else from the engine.
    fn mark_written(&mut self, id: ConnId) {
        if let Some(conn) = self.conn_mut(id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn close_conn(&mut self, id: ConnId) -> Option<(Vec<String>, Vec<SocketAddr>)> {
        let mut conn = self.conns.remove(id)?;
        let _ = conn.pc.close();
        for ufrag in &conn.ufrags {
            self.by_ufrag.remove(ufrag);
        }
        for addr in &conn.addrs {
            if self.by_addr.get(addr) == Some(&id) {
                self.by_addr.remove(addr);
            }
        }
        Some((conn.ufrags, conn.addrs))
    }

    fn remove_participant(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) {
        let Some(p) = self.participants.get(&id) else {
            return;
        };
        let published: Vec<TrackKey> = p.published.values().copied().collect();
        for track in published {
            self.unpublish(now, track);
        }
        let Some(p) = self.participants.remove(&id) else {
            return;
        };
        for (key, down) in &p.down_tracks {
            if let Some(down) = self.downs.remove(*down) {
                self.down_by_ssrc.remove(&down.ssrc);
            }
            if let Some(track) = self.tracks.get_mut(key) {
                track.subscribers.retain(|(s, _)| *s != id);
            }
        }
        let mut ufrags = Vec::new();
        let mut addrs = Vec::new();
        for conn in [p.publisher, p.subscriber].into_iter().flatten() {
            if let Some((u, a)) = self.close_conn(conn) {
                ufrags.extend(u);
                addrs.extend(a);
            }
        }
        self.outputs
            .push_back(Output::Event(RoomEvent::Unrouted { ufrags, addrs }));
        if reason != LeaveReason::ClientLeave {
            self.signal(id, ServerMessage::Leave { reason });
        }
        self.outputs
            .push_back(Output::Event(RoomEvent::ParticipantRemoved {
                participant: id,
                reason,
            }));
        self.broadcast(
            None,
            ServerMessage::ParticipantLeft {
                sid: p.sid,
                identity: p.identity,
            },
        );
    }

    /// Handles one message from a participant's signalling connection. Bad
    /// messages get an `error` reply to that participant only.
    pub fn handle_signal(&mut self, now: Instant, id: ParticipantId, message: ClientMessage) {
        self.last_now = now;
        if !self.participants.contains_key(&id) {
            return;
        }
        if let Err((code, text)) = self.apply_signal(now, id, message) {
            tracing::info!(room = %self.config.name, participant = ?id, ?code, "signal refused: {text}");
            self.signal(id, ServerMessage::error(code, text));
        }
        self.drain(now);
    }

    fn apply_signal(
        &mut self,
        now: Instant,
        id: ParticipantId,
        message: ClientMessage,
    ) -> Result<(), (ErrorCode, String)> {
        match message {
            ClientMessage::Offer {
                target: Target::Publisher,
                sdp,
            } => self.publisher_offer(now, id, sdp),
            ClientMessage::Answer {
                target: Target::Subscriber,
                sdp,
            } => self.subscriber_answer(now, id, sdp),
            ClientMessage::Offer {
                target: Target::Subscriber,
                ..
            } => Err((
                ErrorCode::BadState,
                "the server offers on the subscriber connection; send an answer".into(),
            )),
            ClientMessage::Answer {
                target: Target::Publisher,
                ..
            } => Err((
                ErrorCode::BadState,
                "the client offers on the publisher connection; send an offer".into(),
            )),
            ClientMessage::Candidate { target, candidate } => {
                let Some(candidate) = candidate.filter(|c| !c.candidate.is_empty()) else {
                    return Ok(()); // end of candidates
                };
                let p = &self.participants[&id];
                let conn = match target {
                    Target::Publisher => p.publisher,
                    Target::Subscriber => p.subscriber,
                }
                .ok_or((
                    ErrorCode::BadState,
                    format!("no {target:?} connection for this candidate").to_lowercase(),
                ))?;
                let c = self
                    .conn_mut(conn)
                    .ok_or((ErrorCode::BadState, "connection is closed".to_owned()))?;
                c.pc.add_remote_candidate(RTCIceCandidateInit {
                    candidate: candidate.candidate,
                    sdp_mid: candidate.sdp_mid,
                    sdp_mline_index: candidate.sdp_m_line_index,
                    username_fragment: candidate.username_fragment,
                    ..Default::default()
                })
                .map_err(|e| (ErrorCode::BadMessage, format!("bad candidate: {e}")))?;
                self.mark_dirty(conn);
                Ok(())
            }
            ClientMessage::Mute { track_sid, muted } => {
                let key = self.participants[&id]
                    .published
                    .values()
                    .copied()
                    .find(|k| self.tracks.get(k).is_some_and(|t| t.sid == track_sid))
                    .ok_or((
                        ErrorCode::NotAllowed,
                        format!("no track {track_sid} published by this participant"),
                    ))?;
                if let Some(track) = self.tracks.get_mut(&key) {
                    track.muted = muted;
                }
                let participant_sid = self.participants[&id].sid.clone();
                self.broadcast(
                    None,
                    ServerMessage::TrackMuted {
                        participant_sid,
                        track_sid,
                        muted,
                    },
                );
                Ok(())
            }
            ClientMessage::UpdateSubscription {
                track_sid,
                quality,
                max_width,
                max_height,
                max_fps,
                paused,
            } => {
                let key = self
                    .tracks
                    .iter()
                    .find(|(_, t)| t.sid == track_sid)
                    .map(|(k, _)| *k)
                    .filter(|k| self.participants[&id].down_tracks.contains_key(k))
                    .ok_or((
                        ErrorCode::NotAllowed,
                        format!("not subscribed to track {track_sid}"),
                    ))?;
                if let Some(down) = self.down_mut(id, key) {
                    if let Some(q) = quality {
                        down.pref.quality = Some(match q {
                            Quality::Low => 0,
                            Quality::Medium => 1,
                            Quality::High => 2,
                        });
                    }
                    if let (Some(w), Some(h)) = (max_width, max_height) {
                        down.pref.max_dimensions = Some((w, h));
                    }
                    if let Some(paused) = paused {
                        down.pref.paused = paused;
                    }
                    if let Some(fps) = max_fps {
                        down.pref.max_fps = Some(fps);
                        down.forwarder.set_max_temporal(temporal_for_fps(fps));
                    }
                }
                self.apply_preference(id, key);
                self.update_dynacast(now, key);
                self.keyframe_for_subscriber(now, id, key, true);
                Ok(())
            }
            ClientMessage::RestartIce => {
                let p = &self.participants[&id];
                let conn = p.subscriber.ok_or((
                    ErrorCode::NotAllowed,
                    "this token does not allow subscribing".to_owned(),
                ))?;
                if p.negotiation.generation() == 0 {
                    return Err((
                        ErrorCode::BadState,
                        "the subscriber connection has not been negotiated yet".to_owned(),
                    ));
                }
                self.restart_subscriber_ice(now, id, conn);
                Ok(())
            }
            ClientMessage::Ping { ts } => {
                self.signal(id, ServerMessage::Pong { ts });
                Ok(())
            }
            ClientMessage::Leave => {
                self.remove_participant(now, id, LeaveReason::ClientLeave);
                Ok(())
            }
        }
    }

    fn publisher_offer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        sdp: String,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.participants[&id].can_publish {
            return Err((
                ErrorCode::NotAllowed,
                "this token does not allow publishing".into(),
            ));
        }
        let sections = sdp.lines().filter(|l| l.starts_with("m=")).count();
        if self.config.max_tracks > 0 && sections > self.config.max_tracks {
            return Err((
                ErrorCode::NotAllowed,
                format!(
                    "offer has {sections} media sections; at most {} tracks per participant",
                    self.config.max_tracks
                ),
            ));
        }
        let sending = crate::sdp::sending_track_ids(&sdp);
        let offer = RTCSessionDescription::offer(sdp)
            .map_err(|e| (ErrorCode::BadSdp, format!("cannot parse offer: {e}")))?;
        let conn = match self.participants[&id].publisher {
            Some(conn) => conn,
            None => {
                let conn = self
                    .open_conn(now, id, Target::Publisher)
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                if let Some(p) = self.participants.get_mut(&id) {
                    p.publisher = Some(conn);
                }
                conn
            }
        };
        let c = self
            .conn_mut(conn)
            .ok_or((ErrorCode::BadState, "connection is closed".to_owned()))?;
        c.pc.set_remote_description(now, offer)
            .map_err(|e| (ErrorCode::BadSdp, format!("offer rejected: {e}")))?;
        let answer =
            c.pc.create_answer(None)
                .map_err(|e| (ErrorCode::BadSdp, format!("cannot answer offer: {e}")))?;
        c.pc.set_local_description(now, answer)
            .map_err(|e| (ErrorCode::Internal, format!("cannot apply answer: {e}")))?;
        let sdp =
            c.pc.local_description()
                .map(|d| d.sdp)
                .ok_or((ErrorCode::Internal, "no local description".to_owned()))?;
        self.learn_local_ufrag(conn);
        self.signal(
            id,
            ServerMessage::Answer {
                target: Target::Publisher,
                sdp,
            },
        );
        // Tracks the new offer no longer sends are unpublished.
        let stopped: Vec<TrackKey> = self.participants[&id]
            .published
            .iter()
            .filter(|(cid, _)| !sending.contains(cid))
            .map(|(_, key)| *key)
            .collect();
        for key in stopped {
            self.unpublish(now, key);
        }
        self.mark_dirty(conn);
        Ok(())
    }

    fn subscriber_answer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        sdp: String,
    ) -> Result<(), (ErrorCode, String)> {
        let p = &self.participants[&id];
        let Some(conn) = p.subscriber else {
            return Err((
                ErrorCode::NotAllowed,
                "this token does not allow subscribing".into(),
            ));
        };
        if !matches!(p.negotiation.state(), NegotiationState::HaveLocalOffer(_)) {
            return Err((
                ErrorCode::BadState,
                "no subscriber offer is awaiting an answer".into(),
            ));
        }
        let answer = RTCSessionDescription::answer(sdp)
            .map_err(|e| (ErrorCode::BadSdp, format!("cannot parse answer: {e}")))?;
        let c = self
            .conn_mut(conn)
            .ok_or((ErrorCode::BadState, "connection is closed".to_owned()))?;
        c.pc.set_remote_description(now, answer)
            .map_err(|e| (ErrorCode::BadSdp, format!("answer rejected: {e}")))?;
        self.mark_dirty(conn);

        // Every track carried by the answered offer can now be forwarded.
        let mut fresh = Vec::new();
        let p = self
            .participants
            .get_mut(&id)
            .ok_or((ErrorCode::Internal, "participant vanished".to_owned()))?;
        let generation = p
            .negotiation
            .on_answer()
            .map_err(|e| (ErrorCode::BadState, e.to_string()))?;
        let conn_slot = self.conns.get_mut(conn);
        if let Some(c) = conn_slot {
            for (key, &down_id) in p.down_tracks.iter() {
                let Some(down) = self.downs.get_mut(down_id) else {
                    continue;
                };
                if down.negotiated || down.offer_gen.is_none_or(|g| g > generation) {
                    continue;
                }
                down.negotiated = true;
                let mime = self.tracks.get(key).map(|t| t.codec.mime_type.clone());
                if let (Some(mut sender), Some(mime)) = (c.pc.rtp_sender(down.sender), mime) {
                    down.payload_type = sender
                        .get_parameters()
                        .rtp_parameters
                        .codecs
                        .iter()
                        .find(|codec| codec.rtp_codec.mime_type.eq_ignore_ascii_case(&mime))
                        .map(|codec| codec.payload_type);
                }
                fresh.push(*key);
            }
        }
        // A keyframe is useful only once media can reach the subscriber;
        // on a connection still coming up, it is asked for when connected.
        if self.conns.get(conn).is_some_and(|c| c.connected) {
            for key in fresh {
                self.keyframe_for_subscriber(now, id, key, true);
            }
        }
        self.maybe_offer(now, id);
        Ok(())
    }

    /// Adds a down track for `track` to the subscriber's connection (the
    /// caller renegotiates).
    fn subscribe(&mut self, subscriber: ParticipantId, key: TrackKey) {
        let Some(track) = self.tracks.get(&key) else {
            return;
        };
        let Some(p) = self.participants.get(&subscriber) else {
            return;
        };
        let Some(conn) = p.subscriber else {
            return;
        };
        if p.down_tracks.contains_key(&key) {
            return;
        }
        let publisher_sid = self
            .participants
            .get(&track.publisher)
            .map(|p| p.sid.clone())
            .unwrap_or_default();
        let ssrc = loop {
            let s = self.rng.next_u32();
            if s != 0 && !self.down_by_ssrc.contains_key(&s) {
                break s;
            }
        };
        let kind = match track.kind {
            TrackKind::Audio => RtpCodecKind::Audio,
            TrackKind::Video => RtpCodecKind::Video,
        };
        let clock_rate = track.codec.clock_rate;
        let media_track = MediaStreamTrack::new(
            publisher_sid,
            track.sid.clone(),
            track.sid.clone(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: track.codec.clone(),
                ..Default::default()
            }],
        );
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        let sender = match c.pc.add_track(media_track) {
            Ok(sender) => sender,
            Err(e) => {
                tracing::warn!(error = %e, "cannot add down track");
                return;
            }
        };
        self.down_by_ssrc.insert(ssrc, (subscriber, key));
        let mut forwarder = Forwarder::new(clock_rate);
        if let Some(track) = self.tracks.get(&key) {
            forwarder.set_available(&track.available());
        }
        if let Some(p) = self.participants.get_mut(&subscriber) {
            let id = self.downs.insert(DownTrack {
                sender,
                ssrc,
                forwarder,
                pref: SubscriptionPref::default(),
                sent: SentLog::new(),
                srtp: SrtpStream::default(),
                last_upgrade: None,
                short_since: None,
                packets_sent: 0,
                octets_sent: 0,
                payload_type: None,
                offer_gen: None,
                negotiated: false,
            });
            p.down_tracks.insert(key, id);
            p.negotiation.request();
            if let Some(track) = self.tracks.get_mut(&key) {
                track.subscribers.push((subscriber, id));
            }
        }
    }

    fn unsubscribe(&mut self, subscriber: ParticipantId, key: TrackKey) {
        let Some(p) = self.participants.get_mut(&subscriber) else {
            return;
        };
        let Some(id) = p.down_tracks.remove(&key) else {
            return;
        };
        p.negotiation.request();
        let conn = p.subscriber;
        if let Some(track) = self.tracks.get_mut(&key) {
            track.subscribers.retain(|(s, _)| *s != subscriber);
        }
        let Some(down) = self.downs.remove(id) else {
            return;
        };
        self.down_by_ssrc.remove(&down.ssrc);
        if let Some(c) = conn.and_then(|c| self.conn_mut(c)) {
            if let Err(e) = c.pc.remove_track(down.sender) {
                tracing::debug!(error = %e, "remove_track");
            }
        }
    }

    /// Sends a new subscriber offer if one is needed and none is outstanding.
    fn maybe_offer(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let Some(conn) = p.subscriber else {
            return;
        };
        // An empty first offer would open a connection with nothing on it.
        if p.negotiation.generation() == 0 && p.down_tracks.is_empty() {
            return;
        }
        let Some(generation) = p.negotiation.begin_offer() else {
            return;
        };
        for id in p.down_tracks.values() {
            if let Some(down) = self.downs.get_mut(*id) {
                down.offer_gen.get_or_insert(generation);
            }
        }
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        let sdp =
            c.pc.create_offer(None)
                .and_then(|offer| c.pc.set_local_description(now, offer))
                .map(|_| c.pc.local_description().map(|d| d.sdp));
        match sdp {
            Ok(Some(sdp)) => {
                self.learn_local_ufrag(conn);
                self.signal(
                    id,
                    ServerMessage::Offer {
                        target: Target::Subscriber,
                        sdp,
                    },
                );
                self.mark_dirty(conn);
            }
            other => {
                tracing::warn!(?other, "cannot create subscriber offer");
                if let Some(p) = self.participants.get_mut(&id) {
                    p.negotiation.abandon_offer();
                }
            }
        }
    }

    fn unpublish(&mut self, now: Instant, key: TrackKey) {
        let Some(track) = self.tracks.remove(&key) else {
            return;
        };
        // Keep the entry until subscribers are detached so unsubscribe works.
        let subscribers: Vec<ParticipantId> = track.subscribers.iter().map(|(s, _)| *s).collect();
        let track_sid = track.sid.clone();
        let publisher = track.publisher;
        self.tracks.insert(key, track);
        for sub in &subscribers {
            self.unsubscribe(*sub, key);
        }
        self.tracks.remove(&key);
        let (participant_sid, publisher_conn) = match self.participants.get_mut(&publisher) {
            Some(p) => {
                p.published.retain(|_, k| *k != key);
                (p.sid.clone(), p.publisher)
            }
            None => (String::new(), None),
        };
        // Its streams go back to the engine, which announces them anew if
        // they come back (a transceiver reused with its SSRC).
        if let Some(c) = publisher_conn.and_then(|id| self.conn_mut(id)) {
            c.inbound.retain(|_, k| *k != key);
        }
        self.broadcast(
            None,
            ServerMessage::TrackUnpublished {
                participant_sid,
                track_sid,
            },
        );
        for sub in subscribers {
            self.maybe_offer(now, sub);
        }
    }

    /// Feeds one datagram that arrived on the media socket.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, contents: BytesMut) {
        self.last_now = now;
        self.stats.datagrams_in += 1;
        let check = crate::demux::binding_request_ufrag(&contents);
        let is_check = check.is_some();
        let conn = match check {
            Some(ufrag) => match self.by_ufrag.get(ufrag).copied() {
                Some(conn) => {
                    if self.by_addr.insert(source, conn) != Some(conn) {
                        self.add_route(conn, source);
                    }
                    conn
                }
                None => {
                    self.stats.drop(DropReason::UnknownUfrag);
                    return;
                }
            },
            None => match self.by_addr.get(&source) {
                Some(conn) => *conn,
                None => {
                    self.stats.drop(DropReason::UnknownSource);
                    return;
                }
            },
        };
        let local_addr = self.config.media_addr;
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        let transport = TransportContext {
            local_addr,
            peer_addr: source,
            ecn: None,
            transport_protocol: TransportProtocol::UDP,
        };
        if !is_check {
            if let Some(packets) = c.receive_rtcp(now, &contents, &mut self.rtcp_buffer) {
                self.stats.rtcp_received_by_room += 1;
                let participant = c.participant;
                self.on_rtcp(now, conn, participant, &packets);
                self.drain(now);
                return;
            }
            match c.receive_rtp(now, &contents, &mut self.in_buffer) {
                Inbound::ForEngine => {}
                Inbound::Dropped(reason) => {
                    self.stats.drop(reason);
                    return;
                }
                Inbound::Rtp { key, packet } => {
                    self.stats.rtp_in += 1;
                    self.stats.rtp_received_by_room += 1;
                    if self.next_feedback.is_none() {
                        self.next_feedback = Some(self.beats.after(now));
                    }
                    self.forward(now, key, packet);
                    self.drain(now);
                    return;
                }
            }
        }
        let result = c.pc.handle_read(TaggedBytesMut {
            now,
            transport,
            message: contents,
        });
        if let Err(e) = result {
            tracing::trace!(error = %e, "datagram rejected by peer connection");
        }
        if is_check && c.srtp.is_some() && c.media_dest != Some(source) {
            // A check from another address may have moved the selected
            // pair (a new network, a nomination): media sent past the
            // engine follows where the engine sends this empty report.
            let first = c.pc.get_senders().next();
            if let Some(id) = first {
                if let Some(mut sender) = c.pc.rtp_sender(id) {
                    let _ = sender.write_rtcp(now, vec![Box::new(ReceiverReport::default())]);
                }
            }
        }
        self.mark_dirty(conn);
        self.drain(now);
    }

    /// Notes that checks from `source` reach connection `id`. Past
    /// [`MAX_ADDRS_PER_CONN`] the connection's oldest address other than
    /// the one its media goes to stops being routed, here and (through
    /// [`RoomEvent::Unrouted`]) at the media socket.
    fn add_route(&mut self, id: ConnId, source: SocketAddr) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.addrs.contains(&source) {
            return;
        }
        let mut evicted = None;
        if c.addrs.len() >= MAX_ADDRS_PER_CONN {
            let media = c.media_dest;
            if let Some(i) = c.addrs.iter().position(|a| Some(*a) != media) {
                evicted = Some(c.addrs.remove(i));
            }
        }
        c.addrs.push(source);
        let Some(old) = evicted else {
            return;
        };
        // The address may have moved on to another connection since.
        if self.by_addr.get(&old) == Some(&id) {
            self.by_addr.remove(&old);
            self.stats.addresses_unrouted += 1;
            self.outputs.push_back(Output::Event(RoomEvent::Unrouted {
                ufrags: Vec::new(),
                addrs: vec![old],
            }));
        }
    }

    /// Source addresses routed to the room's connections.
    pub fn routed_addresses(&self) -> usize {
        self.by_addr.len()
    }

    /// Advances every connection's timers to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        for index in 0..self.conns.capacity() {
            let Some(c) = self.conns.get_mut(ConnId(index)) else {
                continue;
            };
            if c.wake.is_some_and(|t| t <= now) {
                if let Err(e) = c.pc.handle_timeout(now) {
                    tracing::debug!(error = %e, "peer connection timeout handling");
                }
                c.engine_ran = now;
                self.mark_dirty(ConnId(index));
            }
        }
        if self.next_feedback.is_some_and(|t| t <= now) {
            let mut ticking = false;
            for index in 0..self.conns.capacity() {
                let Some(i) = self
                    .conns
                    .get(ConnId(index))
                    .and_then(|c| c.feedback.as_ref())
                else {
                    continue;
                };
                let ticked = i.tick(now);
                ticking |= ticked.ticking;
                if ticked.made_rtcp {
                    self.mark_written(ConnId(index));
                }
            }
            self.next_feedback = ticking.then(|| self.beats.after(now));
        }
        if now >= self.next_allocation {
            self.next_allocation = self.beats.later(now, ALLOCATION_INTERVAL);
            self.retire_stopped_layers(now);
            let keys: Vec<TrackKey> = self.tracks.keys().copied().collect();
            for key in keys {
                self.update_dynacast(now, key);
            }
            if now >= self.next_sender_reports {
                self.next_sender_reports = self.beats.later(now, SENDER_REPORT_INTERVAL);
                self.send_sender_reports(now);
                self.update_loss_estimates(now);
            }
            let estimated: Vec<ParticipantId> = self
                .participants
                .iter()
                .filter(|(_, p)| p.estimate.is_some())
                .map(|(id, _)| *id)
                .collect();
            for sub in estimated {
                self.allocate(now, sub);
            }
        }
        self.drain(now);
    }

    /// Next thing for the I/O shell to do. Ends with [`Output::Timeout`].
    pub fn poll_output(&mut self) -> Output {
        if let Some(output) = self.outputs.pop_front() {
            return output;
        }
        let mut next = self.last_now + Duration::from_secs(3600);
        if !self.tracks.is_empty() {
            next = next.min(self.next_allocation);
        }
        if let Some(t) = self.next_feedback {
            next = next.min(t);
        }
        for (_, c) in self.conns.iter() {
            if let Some(t) = c.wake {
                next = next.min(t);
            }
        }
        Output::Timeout(next)
    }

    /// Moves everything the touched connections produced into the output
    /// queue, acting on their events and application messages.
    fn drain(&mut self, now: Instant) {
        while let Some(id) = self.dirty.pop() {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            c.dirty = false;
            let participant = c.participant;
            let target = c.target;
            let mut events = Vec::new();
            let mut messages = Vec::new();
            if !std::mem::take(&mut c.fed) {
                // Only our writes: the forwarding fast path. Sending media
                // sets no timer on a subscriber connection (it runs no
                // per-packet interceptors), so its next timeout stands.
                while let Some(out) = c.pc.poll_write() {
                    c.note_path(out.transport.peer_addr, &out.message);
                    self.outputs.push_back(Output::Transmit(Transmit {
                        destination: out.transport.peer_addr,
                        contents: out.message,
                    }));
                }
                continue;
            }
            loop {
                let mut progressed = false;
                while let Some(event) = c.pc.poll_event() {
                    events.push(event);
                    progressed = true;
                }
                while let Some(msg) = c.pc.poll_read() {
                    messages.push(msg.message);
                    progressed = true;
                }
                while let Some(out) = c.pc.poll_write() {
                    c.note_path(out.transport.peer_addr, &out.message);
                    self.outputs.push_back(Output::Transmit(Transmit {
                        destination: out.transport.peer_addr,
                        contents: out.message,
                    }));
                    progressed = true;
                }
                if !progressed {
                    break;
                }
            }
            let next = c.pc.poll_timeout();
            c.set_engine_timeout(next, self.beats);
            if self.next_feedback.is_none() && c.feedback.as_ref().is_some_and(|i| i.ticking()) {
                self.next_feedback = Some(self.beats.after(now));
            }
            for event in events {
                self.on_event(now, id, participant, target, event);
            }
            for message in messages {
                self.on_message(now, id, participant, message);
            }
        }
    }

    fn on_event(
        &mut self,
        now: Instant,
        conn: ConnId,
        participant: ParticipantId,
        target: Target,
        event: RTCPeerConnectionEvent,
    ) {
        match event {
            RTCPeerConnectionEvent::OnIceCandidateEvent(e) => {
                if let Ok(init) = e.candidate.to_json() {
                    self.signal(
                        participant,
                        ServerMessage::Candidate {
                            target,
                            candidate: IceCandidate {
                                candidate: init.candidate,
                                sdp_mid: init.sdp_mid,
                                sdp_m_line_index: init.sdp_mline_index,
                                username_fragment: init.username_fragment,
                            },
                        },
                    );
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init))
                if target == Target::Publisher =>
            {
                self.on_track_open(now, conn, participant, init);
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id))
                if target == Target::Publisher =>
            {
                let key = self
                    .participants
                    .get(&participant)
                    .and_then(|p| p.published.get(&track_id).copied());
                if let Some(key) = key {
                    self.unpublish(now, key);
                }
            }
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                tracing::debug!(?participant, ?target, %state, "connection state");
                let was = self.conns.get(conn).is_some_and(|c| c.connected);
                // Disconnected is the engine not having heard a check from
                // the client for 5 s: a lost check or two on a lossy path,
                // or a client that checks every 4-6 s (RFC 7675). The path
                // is still the client's, and media goes on to it until it
                // checks again or the engine gives it up (failed).
                let connected = match state {
                    RTCPeerConnectionState::Connected => true,
                    RTCPeerConnectionState::Disconnected => was,
                    _ => false,
                };
                let came_up = connected && !was;
                if state == RTCPeerConnectionState::Failed && target == Target::Subscriber {
                    // No check from the client on the selected path for the
                    // engine's failure timeout: restart ICE from this side
                    // rather than wait for the client to notice (a browser
                    // whose checks still get answered on another path may
                    // never do so).
                    let negotiated = self
                        .participants
                        .get(&participant)
                        .is_some_and(|p| p.negotiation.generation() > 0);
                    if negotiated {
                        tracing::info!(
                            ?participant,
                            "subscriber connection failed; restarting ICE"
                        );
                        self.restart_subscriber_ice(now, participant, conn);
                    }
                }
                let beats = self.beats;
                if let Some(c) = self.conn_mut(conn) {
                    c.connected = connected;
                    c.set_engine_timeout(c.next_timeout, beats);
                    if came_up && target == Target::Subscriber {
                        c.take_srtp_keys();
                        c.take_srtcp_keys();
                    }
                    if came_up && target == Target::Publisher {
                        c.take_inbound_keys();
                        c.take_srtcp_keys();
                    }
                }
                if came_up && target == Target::Subscriber {
                    let keys: Vec<TrackKey> = self
                        .participants
                        .get(&participant)
                        .map(|p| {
                            p.down_tracks
                                .iter()
                                .filter(|(_, d)| self.downs.get(**d).is_some_and(|d| d.negotiated))
                                .map(|(k, _)| *k)
                                .collect()
                        })
                        .unwrap_or_default();
                    for key in keys {
                        self.keyframe_for_subscriber(now, participant, key, true);
                    }
                }
            }
            _ => {}
        }
    }

    /// Re-offers the subscriber connection with fresh ICE credentials.
    fn restart_subscriber_ice(&mut self, now: Instant, id: ParticipantId, conn: ConnId) {
        if let Some(c) = self.conn_mut(conn) {
            c.pc.restart_ice();
        }
        if let Some(p) = self.participants.get_mut(&id) {
            p.negotiation.request();
        }
        self.maybe_offer(now, id);
    }

    fn on_track_open(
        &mut self,
        now: Instant,
        conn: ConnId,
        participant: ParticipantId,
        init: rtc::peer_connection::event::RTCTrackEventInit,
    ) {
        let existing = self
            .participants
            .get(&participant)
            .and_then(|p| p.published.get(&init.track_id).copied());
        if let Some(key) = existing {
            self.add_layer(key, init.rid.as_deref(), init.ssrc);
            if let Some(c) = self.conn_mut(conn) {
                c.inbound.insert(init.ssrc, key);
            }
            return;
        }
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        let Some(receiver) = c.pc.rtp_receiver(init.receiver_id) else {
            return;
        };
        let (kind, codec) = match receiver.track().kind() {
            RtpCodecKind::Audio => (TrackKind::Audio, opus_codec()),
            RtpCodecKind::Video => (TrackKind::Video, vp8_codec()),
            _ => return,
        };
        let key = TrackKey(self.next_track);
        self.next_track += 1;
        let sid = self.rng.sid("TR");
        let track = PublishedTrack {
            sid,
            cid: init.track_id.clone(),
            publisher: participant,
            kind,
            codec,
            receiver: init.receiver_id,
            layers: Vec::new(),
            muted: false,
            subscribers: Vec::new(),
            disabled: Vec::new(),
            unwanted_since: Vec::new(),
        };
        self.tracks.insert(key, track);
        self.add_layer(key, init.rid.as_deref(), init.ssrc);
        if let Some(c) = self.conn_mut(conn) {
            c.inbound.insert(init.ssrc, key);
        }
        let Some(info) = self.tracks.get(&key).map(PublishedTrack::info) else {
            return;
        };
        let Some(p) = self.participants.get_mut(&participant) else {
            return;
        };
        p.published.insert(init.track_id, key);
        let participant_sid = p.sid.clone();
        self.broadcast(
            None,
            ServerMessage::TrackPublished {
                participant_sid,
                track: info,
            },
        );
        let subscribers: Vec<ParticipantId> = self
            .participants
            .iter()
            .filter(|(id, p)| **id != participant && p.can_subscribe)
            .map(|(id, _)| *id)
            .collect();
        for sub in subscribers {
            self.subscribe(sub, key);
            self.maybe_offer(now, sub);
        }
    }

    /// Turns a subscriber's wishes into its forwarder's preference: the
    /// quality asked for, further limited to the largest layer (by the
    /// sizes seen in keyframes) that fits the dimensions asked for.
    fn apply_preference(&mut self, sub: ParticipantId, key: TrackKey) {
        let Some(track) = self.tracks.get(&key) else {
            return;
        };
        let Some(down) = self
            .participants
            .get(&sub)
            .and_then(|p| p.down_tracks.get(&key))
            .and_then(|id| self.downs.get_mut(*id))
        else {
            return;
        };
        let pref = down.pref;
        let preference = if pref.paused {
            Preference::Paused
        } else {
            let mut max = pref.quality.unwrap_or(Layer::MAX);
            if let Some((w, h)) = pref.max_dimensions {
                let sized: Vec<(Layer, (u16, u16))> = track
                    .layers
                    .iter()
                    .filter_map(|l| l.dimensions.map(|d| (l.layer, d)))
                    .collect();
                if !sized.is_empty() {
                    let fits = sized
                        .iter()
                        .filter(|(_, (lw, lh))| *lw as u32 <= w && *lh as u32 <= h)
                        .map(|(l, _)| *l)
                        .max()
                        .unwrap_or(0);
                    max = max.min(fits);
                }
            }
            Preference::MaxLayer(max)
        };
        if down.forwarder.preference() != preference {
            down.forwarder.set_preference(preference);
        }
    }

    /// Records a layer of a published track and tells every subscriber's
    /// forwarder what is now available.
    fn add_layer(&mut self, key: TrackKey, rid: Option<&str>, ssrc: u32) {
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        if track.layers.iter().any(|l| l.ssrc == ssrc) {
            return;
        }
        let layer = layer_of_rid(rid, track.layers.len());
        tracing::debug!(track = %track.sid, ?rid, layer, ssrc, "layer opened");
        track.layers.push(PubLayer {
            rid: rid.map(str::to_owned),
            ssrc,
            layer,
            seq: SeqExtender::new(),
            dimensions: None,
            last_keyframe_request: None,
            cache: PacketCache::new(),
            rate: RateMeter::default(),
            last_packet_at: None,
            active: true,
            last_bitrate: 0,
            sender_report: None,
        });
        let available = track.available();
        for (_, id) in &track.subscribers {
            if let Some(down) = self.downs.get_mut(*id) {
                down.forwarder.set_available(&available);
            }
        }
    }

    fn on_message(
        &mut self,
        now: Instant,
        conn: ConnId,
        participant: ParticipantId,
        message: RTCMessage,
    ) {
        match message {
            RTCMessage::RtpPacket(track_id, packet) => {
                self.stats.rtp_in += 1;
                let key = self
                    .participants
                    .get(&participant)
                    .and_then(|p| p.published.get(&track_id).copied());
                match key {
                    Some(key) => self.forward(now, key, packet),
                    None => self.stats.drop(DropReason::UnknownTrack),
                }
            }
            RTCMessage::RtcpPacket(_, packets) => self.on_rtcp(now, conn, participant, &packets),
            _ => {}
        }
    }

    /// Acts on RTCP from a client: a publisher's sender reports, a
    /// subscriber's estimates, NACKs and keyframe requests.
    fn on_rtcp(
        &mut self,
        now: Instant,
        conn: ConnId,
        participant: ParticipantId,
        packets: &[Box<dyn rtc::rtcp::Packet>],
    ) {
        let mut wanted = Vec::new();
        for packet in packets {
            let any = packet.as_any();
            if let Some(sr) = any.downcast_ref::<SenderReport>() {
                let published = self
                    .participants
                    .get(&participant)
                    .filter(|p| p.publisher == Some(conn))
                    .map(|p| p.published.values().copied().collect::<Vec<_>>())
                    .unwrap_or_default();
                for key in published {
                    if let Some(layer) = self
                        .tracks
                        .get_mut(&key)
                        .and_then(|t| t.layers.iter_mut().find(|l| l.ssrc == sr.ssrc))
                    {
                        layer.sender_report = Some((sr.ntp_time, sr.rtp_time, now));
                    }
                }
                continue;
            }
            if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
                let from_subscriber = self
                    .participants
                    .get(&participant)
                    .is_some_and(|p| p.subscriber == Some(conn));
                if from_subscriber {
                    self.set_estimate(now, participant, remb.bitrate as u64);
                }
                continue;
            }
            if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                if let Some((sub, key)) = self.down_by_ssrc.get(&nack.media_ssrc).copied() {
                    if sub == participant {
                        let mut count = 0;
                        for pair in &nack.nacks {
                            for seq in pair.packet_list() {
                                self.retransmit(now, sub, key, seq);
                                let first = self
                                    .down_mut(sub, key)
                                    .is_some_and(|d| d.sent.first_nack(seq));
                                count += usize::from(first);
                            }
                        }
                        if let Some(p) = self.participants.get_mut(&sub) {
                            p.nacked_packets.add(now, count);
                        }
                    }
                }
                continue;
            }
            if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                wanted.push(pli.media_ssrc);
            } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                wanted.extend(fir.fir.iter().map(|e| e.ssrc));
                wanted.push(fir.media_ssrc);
            }
        }
        for ssrc in wanted {
            if let Some((sub, key)) = self.down_by_ssrc.get(&ssrc).copied() {
                if sub == participant {
                    self.keyframe_for_subscriber(now, sub, key, false);
                }
            }
        }
    }

    fn forward(&mut self, now: Instant, key: TrackKey, mut packet: rtc::rtp::Packet) {
        let Room {
            tracks,
            participants,
            downs,
            conns,
            dirty,
            outputs,
            out_buffer,
            stats,
            ..
        } = self;
        let Some(track) = tracks.get_mut(&key) else {
            stats.drop(DropReason::UnknownTrack);
            return;
        };
        let ssrc = packet.header.ssrc;
        let Some(source) = track.layers.iter_mut().find(|l| l.ssrc == ssrc) else {
            stats.drop(DropReason::UnknownTrack);
            return;
        };
        let ext_seq = source.seq.extend(packet.header.sequence_number as u64);
        let highest = source.seq.highest().unwrap_or(ext_seq);
        source.last_packet_at = Some(now);
        let resumed = !source.active;
        source.active = true;
        let (info, vp8) = packet_info(track.kind, track.codec.clock_rate, source, &packet, ext_seq);
        let mut resized = false;
        if let Some(d) = &vp8 {
            if d.dimensions.is_some() && source.dimensions != d.dimensions {
                source.dimensions = d.dimensions;
                resized = true;
            }
        }
        // The subscriber negotiated its own extension ids; the publisher's
        // (mid, rid, ...) must not leak through. Stripped once, before
        // caching, so the per-subscriber copies and retransmissions
        // allocate nothing for the header.
        packet.header.extension = false;
        packet.header.extensions.clear();
        packet.header.extension_profile = 0;
        packet.header.extensions_padding = 0;
        // The payload excludes any padding the publisher added; the header
        // must not claim it.
        packet.header.padding = false;
        source.cache.insert(ext_seq, now, &packet);
        // Payload plus RTP/UDP/IP headers, as the subscriber's link sees it.
        source.rate.add(now, packet.payload.len() + 40);
        // Layers some subscriber waits for a keyframe of (and whether it
        // receives nothing meanwhile).
        let mut wanted: Vec<(Layer, bool)> = Vec::new();
        // Subscribers that started on this packet although later packets
        // of the layer came before it (a keyframe recovered by
        // retransmission): those later packets were dropped while the
        // subscriber waited, and are sent now from the cache, in order.
        let mut catch_up: Vec<(ParticipantId, DownId)> = Vec::new();
        let mut sink = Sink {
            outputs,
            dirty,
            buffer: out_buffer,
        };
        for &(sub, id) in &track.subscribers {
            let (Some(p), Some(down)) = (participants.get_mut(&sub), downs.get_mut(id)) else {
                continue;
            };
            let switched = deliver(
                Delivery {
                    now,
                    track_sid: &track.sid,
                    packet: &packet,
                    info: &info,
                    vp8: vp8.as_ref(),
                },
                sub,
                p,
                down,
                conns,
                &mut sink,
                stats,
                &mut wanted,
            );
            if switched && ext_seq < highest {
                catch_up.push((sub, id));
            }
        }
        for (sub, id) in catch_up {
            for later in ext_seq + 1..=highest {
                let Some(cached) = source.cache.get(later, now).cloned() else {
                    continue;
                };
                let (info, vp8) =
                    packet_info(track.kind, track.codec.clock_rate, source, &cached, later);
                let (Some(p), Some(down)) = (participants.get_mut(&sub), downs.get_mut(id)) else {
                    break;
                };
                deliver(
                    Delivery {
                        now,
                        track_sid: &track.sid,
                        packet: &cached,
                        info: &info,
                        vp8: vp8.as_ref(),
                    },
                    sub,
                    p,
                    down,
                    conns,
                    &mut sink,
                    stats,
                    &mut wanted,
                );
            }
        }
        if resumed {
            tracing::debug!(track = %track.sid, layer = info.layer, "layer resumed");
            let available = track.available();
            for (_, id) in &track.subscribers {
                if let Some(down) = downs.get_mut(*id) {
                    down.forwarder.set_available(&available);
                }
            }
        }
        let sized_subscribers: Vec<ParticipantId> = if resized {
            track.subscribers.iter().map(|(s, _)| *s).collect()
        } else {
            Vec::new()
        };
        for (layer, starving) in wanted {
            self.request_keyframe(now, key, layer, starving);
        }
        for sub in sized_subscribers {
            self.apply_preference(sub, key);
        }
    }

    /// Sends every down track a sender report that maps its (rewritten)
    /// timestamps to the publisher's NTP clock, extrapolated from the
    /// publisher's last report for the layer it forwards. Audio and video
    /// of one publisher then line up at the subscriber (lip sync) across
    /// layer switches.
    fn send_sender_reports(&mut self, now: Instant) {
        let Room {
            tracks,
            participants,
            downs,
            conns,
            dirty,
            ..
        } = self;
        for p in participants.values_mut() {
            let Some(conn) = p.subscriber else {
                continue;
            };
            let Some(c) = conns.get_mut(conn) else {
                continue;
            };
            if !c.connected {
                continue;
            }
            let mut wrote = false;
            for (key, id) in p.down_tracks.iter() {
                let (Some(track), Some(down)) = (tracks.get(key), downs.get(*id)) else {
                    continue;
                };
                let Some(layer) = down.forwarder.current() else {
                    continue;
                };
                let Some((ntp, rtp, at)) = track
                    .layers
                    .iter()
                    .find(|l| l.layer == layer)
                    .and_then(|l| l.sender_report)
                else {
                    continue;
                };
                let elapsed = now.saturating_duration_since(at);
                let clock = track.codec.clock_rate as u128;
                let rtp_now = rtp.wrapping_add((elapsed.as_micros() * clock / 1_000_000) as u32);
                let ntp_now = ntp.wrapping_add(((elapsed.as_nanos() << 32) / 1_000_000_000) as u64);
                let Some(rtp_out) = down.forwarder.output_timestamp(rtp_now) else {
                    continue;
                };
                let report = SenderReport {
                    ssrc: down.ssrc,
                    ntp_time: ntp_now,
                    rtp_time: rtp_out,
                    packet_count: down.packets_sent,
                    octet_count: down.octets_sent,
                    ..Default::default()
                };
                if let Some(mut sender) = c.pc.rtp_sender(down.sender) {
                    wrote |= sender.write_rtcp(now, vec![Box::new(report)]).is_ok();
                }
            }
            if wrote && !c.dirty {
                c.dirty = true;
                dirty.push(conn);
            }
        }
    }

    /// Dynacast: tells the publisher of a simulcast track which layers
    /// anyone receives. A layer someone wants is enabled at once; one nobody
    /// wants is disabled after [`DYNACAST_GRACE`]. The lowest layer always
    /// stays on, so a new subscriber starts fast.
    fn update_dynacast(&mut self, now: Instant, key: TrackKey) {
        let Some(track) = self.tracks.get(&key) else {
            return;
        };
        if track.kind != TrackKind::Video || !track.layers.iter().any(|l| l.rid.is_some()) {
            return;
        }
        let mut sent: Vec<Layer> = track.layers.iter().map(|l| l.layer).collect();
        sent.sort_unstable();
        let Some(lowest) = sent.first().copied() else {
            return;
        };
        let mut wanted = vec![lowest];
        for (_, id) in &track.subscribers {
            let Some(down) = self.downs.get(*id) else {
                continue;
            };
            let limit = match (down.forwarder.preference(), down.forwarder.allocation()) {
                (Preference::MaxLayer(a), Preference::MaxLayer(b)) => a.min(b),
                _ => continue,
            };
            let layer = sent.iter().rev().find(|l| **l <= limit).unwrap_or(&lowest);
            if !wanted.contains(layer) {
                wanted.push(*layer);
            }
        }
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        let mut changed = false;
        for layer in sent {
            let disabled = track.disabled.contains(&layer);
            if wanted.contains(&layer) {
                track.unwanted_since.retain(|(l, _)| *l != layer);
                if disabled {
                    track.disabled.retain(|l| *l != layer);
                    changed = true;
                }
            } else if !disabled {
                match track.unwanted_since.iter().find(|(l, _)| *l == layer) {
                    None => track.unwanted_since.push((layer, now)),
                    Some((_, since)) if now.saturating_duration_since(*since) >= DYNACAST_GRACE => {
                        track.unwanted_since.retain(|(l, _)| *l != layer);
                        track.disabled.push(layer);
                        changed = true;
                    }
                    Some(_) => {}
                }
            }
        }
        if !changed {
            return;
        }
        let layers = track
            .layers
            .iter()
            .filter_map(|l| {
                l.rid.as_ref().map(|rid| LayerState {
                    rid: rid.clone(),
                    active: !track.disabled.contains(&l.layer),
                })
            })
            .collect();
        let message = ServerMessage::PublishedLayers {
            track_sid: track.sid.clone(),
            layers,
        };
        tracing::debug!(track = %track.sid, disabled = ?track.disabled, "dynacast");
        let publisher = track.publisher;
        self.signal(publisher, message);
    }

    /// Takes layers that stopped arriving out of what subscribers may get,
    /// while another layer of the same track still arrives (if all stop,
    /// the publisher paused and there is nothing better to move to).
    fn retire_stopped_layers(&mut self, now: Instant) {
        let Room { tracks, downs, .. } = self;
        for track in tracks.values_mut() {
            let fresh = |l: &PubLayer| {
                l.last_packet_at
                    .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT)
            };
            if !track.layers.iter().any(fresh) {
                continue;
            }
            let mut changed = false;
            for layer in track.layers.iter_mut() {
                if layer.active && layer.last_packet_at.is_some() && !fresh(layer) {
                    layer.active = false;
                    changed = true;
                    tracing::debug!(track = %track.sid, layer = layer.layer, "layer stopped");
                }
            }
            if changed {
                let available = track.available();
                for (_, id) in &track.subscribers {
                    if let Some(down) = downs.get_mut(*id) {
                        down.forwarder.set_available(&available);
                    }
                }
            }
        }
    }

    /// A new downlink estimate for a subscriber: reallocate at once (so a
    /// drop takes effect without waiting for the next allocation tick).
    fn set_estimate(&mut self, now: Instant, sub: ParticipantId, bps: u64) {
        if let Some(p) = self.participants.get_mut(&sub) {
            // A receiver's delay-based estimate cannot rise far above what
            // it receives (Chromium caps it at 1.5x its incoming rate), so
            // one at or above about what we send says only "no
            // congestion": taken as a limit it would pin a subscriber on a
            // low layer, or keep paused video paused, for good. It neither
            // caps nor lowers the allocation then; the loss-based estimate
            // governs. One clearly below what we send is congestion.
            let sending = p.sent_rate.bps(now);
            p.remb = (bps < sending / 10 * 9).then_some(bps);
            p.estimate = p.remb.into_iter().chain(p.loss_estimate).min();
        }
        self.allocate(now, sub);
    }

    /// Once a second: the share of packets each subscriber NACKed in the
    /// last second is its downlink loss, which moves its loss-based
    /// estimate.
    fn update_loss_estimates(&mut self, now: Instant) {
        let subs: Vec<(ParticipantId, f64)> = self
            .participants
            .iter_mut()
            .filter_map(|(id, p)| {
                // The meters count one "byte" per packet, so bps / 8 is packets.
                let sent = p.sent_packets.bps(now) / 8;
                let nacked = p.nacked_packets.bps(now) / 8;
                (sent >= 10).then(|| (*id, (nacked as f64 / sent as f64).min(1.0)))
            })
            .collect();
        for (sub, loss) in subs {
            self.on_receiver_loss(now, sub, loss);
        }
    }

    /// New loss figure for a subscriber's downlink.
    fn on_receiver_loss(&mut self, now: Instant, sub: ParticipantId, loss: f64) {
        let Room {
            tracks,
            participants,
            ..
        } = self;
        if let Some(p) = participants.get_mut(&sub) {
            // Loss alone never pauses video: the floor is at least what the
            // lowest layer of every track (and all audio) takes.
            let mut lowest: u64 = 0;
            for key in p.down_tracks.keys() {
                if let Some(t) = tracks.get_mut(key) {
                    lowest += t
                        .layers
                        .iter_mut()
                        .filter(|l| l.active)
                        .map(|l| l.rate.bps(now))
                        .min()
                        .unwrap_or(0);
                }
            }
            let floor = MIN_LOSS_ESTIMATE.max(lowest * 12 / 10);
            let sending = p.sent_rate.bps(now);
            let estimate = p
                .loss
                .on_report(loss, sending, floor, MAX_DOWNLINK_ESTIMATE);
            p.loss_estimate = Some(estimate);
            p.recent_loss = loss;
            tracing::debug!(subscriber = ?sub, loss, sending, estimate, "loss estimate");
            p.estimate = p.remb.into_iter().chain(p.loss_estimate).min();
        }
        self.allocate(now, sub);
    }

    /// Fits the subscriber's video tracks into its estimate.
    fn allocate(&mut self, now: Instant, sub: ParticipantId) {
        let Room {
            tracks,
            participants,
            downs,
            ..
        } = self;
        let Some(p) = participants.get_mut(&sub) else {
            return;
        };
        let Some(estimate) = p.estimate else {
            return;
        };
        let mut audio = 0;
        let mut keys = Vec::new();
        let mut demands = Vec::new();
        for (key, id) in p.down_tracks.iter() {
            let (Some(track), Some(down)) = (tracks.get_mut(key), downs.get(*id)) else {
                continue;
            };
            if track.kind == TrackKind::Audio {
                audio += track
                    .layers
                    .iter_mut()
                    .map(|l| l.rate.bps(now))
                    .sum::<u64>();
                continue;
            }
            // Layers sent, and layers switched off by dynacast (they come
            // back when allocated), at the bitrate last seen.
            let disabled = &track.disabled;
            let mut layers: Vec<(Layer, u64)> = track
                .layers
                .iter_mut()
                .filter(|l| l.active || disabled.contains(&l.layer))
                .map(|l| {
                    if l.active {
                        let bps = l.rate.bps(now);
                        l.last_bitrate = l.last_bitrate.max(bps);
                        (l.layer, bps.max(l.last_bitrate / 2))
                    } else {
                        (l.layer, l.last_bitrate)
                    }
                })
                .collect();
            layers.sort_unstable();
            let wanted = match down.forwarder.preference() {
                Preference::Paused => None,
                Preference::MaxLayer(max) => layers
                    .iter()
                    .rev()
                    .map(|(l, _)| *l)
                    .find(|l| *l <= max)
                    .or(layers.first().map(|(l, _)| *l)),
            };
            keys.push(*key);
            demands.push(VideoDemand {
                layers,
                wanted,
                current: down.forwarder.allocation(),
                last_upgrade: down.last_upgrade,
                short_since: down.short_since,
            });
        }
        let allocation = allocator::allocate(estimate, audio, &demands, now);
        // Only a downlink that also loses packets is short enough to pause
        // video: a delay-based estimate dips whenever the receiver's
        // machine is busy, and the lowest layer is small. Until loss
        // shows, the lowest layer stays.
        let losing = p.recent_loss >= allocator::LOSS_CLEAR;
        let short = allocator::short_of_lowest(estimate, audio, &demands)
            .into_iter()
            .map(|s| s && losing);
        for (((key, demand), new), short) in keys.iter().zip(&demands).zip(allocation).zip(short) {
            let Some(down) = p.down_tracks.get(key).and_then(|id| downs.get_mut(*id)) else {
                continue;
            };
            down.short_since = match (short, down.short_since) {
                (false, _) => None,
                (true, since) => Some(since.unwrap_or(now)),
            };
            // Any change, down or up, starts the interval before the next
            // step up; only a subscription never changed may jump.
            if new != demand.current {
                down.last_upgrade = Some(now);
            }
            if new != down.forwarder.allocation() {
                tracing::debug!(subscriber = ?sub, ?new, estimate, "allocation");
                down.forwarder.set_allocation(new);
            }
        }
    }

    /// Sends again what a down track sent as `seq`, from the layer's cache,
    /// rewritten exactly as the first time.
    fn retransmit(&mut self, now: Instant, sub: ParticipantId, key: TrackKey, seq: u16) {
        let Room {
            tracks,
            participants,
            downs,
            conns,
            dirty,
            outputs,
            out_buffer,
            stats,
            ..
        } = self;
        let Some(p) = participants.get(&sub) else {
            return;
        };
        let (Some(conn), Some(down)) = (
            p.subscriber,
            p.down_tracks.get(&key).and_then(|id| downs.get_mut(*id)),
        ) else {
            return;
        };
        let found = down.sent.lookup(seq).and_then(|entry| {
            let track = tracks.get(&key)?;
            let layer = track.layers.iter().find(|l| l.layer == entry.layer)?;
            Some((entry, layer.cache.get(entry.ext_seq, now)?))
        });
        let (Some((entry, packet)), Some(pt)) = (found, down.payload_type) else {
            stats.retransmissions_missed += 1;
            return;
        };
        let descriptor =
            if entry.rewrite.picture_id.is_some() || entry.rewrite.tl0_pic_idx.is_some() {
                vp8::parse(&packet.payload).filter(|d| {
                    d.picture_id.map(|(id, _)| id) != entry.rewrite.picture_id
                        || d.tl0_pic_idx != entry.rewrite.tl0_pic_idx
                })
            } else {
                None
            };
        let out = Outgoing {
            ssrc: down.ssrc,
            payload_type: pt,
            seq: entry.rewrite.seq,
            timestamp: entry.rewrite.timestamp,
            vp8: descriptor.as_ref().map(|d| {
                (
                    d,
                    entry.rewrite.picture_id.unwrap_or(0),
                    entry.rewrite.tl0_pic_idx.unwrap_or(0),
                )
            }),
        };
        let Some(c) = conns.get_mut(conn) else {
            return;
        };
        let mut sink = Sink {
            outputs,
            dirty,
            buffer: out_buffer,
        };
        if let Some(by) = c.send_rtp(
            conn,
            down.sender,
            &mut down.srtp,
            now,
            packet,
            &out,
            &mut sink,
        ) {
            stats.retransmissions += 1;
            stats.rtp_sent_by_room += u64::from(by == SentBy::Room);
        }
    }

    /// Asks for a keyframe of the layer a subscriber's down track forwards
    /// (or waits for).
    fn keyframe_for_subscriber(
        &mut self,
        now: Instant,
        sub: ParticipantId,
        key: TrackKey,
        urgent: bool,
    ) {
        let layer = self
            .down(sub, key)
            .and_then(|d| d.forwarder.current().or(d.forwarder.target()));
        if let Some(layer) = layer {
            self.request_keyframe(now, key, layer, urgent);
        }
    }

    /// Asks the publisher of `key` for a keyframe of `layer`, at most once
    /// per [`KEYFRAME_REQUEST_INTERVAL`] (or the shorter urgent interval).
    fn request_keyframe(&mut self, now: Instant, key: TrackKey, layer: Layer, urgent: bool) {
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        if track.kind != TrackKind::Video {
            return;
        }
        let Some(source) = track.layers.iter_mut().find(|l| l.layer == layer) else {
            return;
        };
        // A subscriber receiving nothing needs a keyframe now; one that
        // reports loss can share the next one with others.
        let interval = if urgent {
            URGENT_KEYFRAME_REQUEST_INTERVAL
        } else {
            KEYFRAME_REQUEST_INTERVAL
        };
        if source
            .last_keyframe_request
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return;
        }
        source.last_keyframe_request = Some(now);
        let (receiver, media_ssrc, publisher) = (track.receiver, source.ssrc, track.publisher);
        let track_sid = track.sid.clone();
        let Some(conn) = self.participants.get(&publisher).and_then(|p| p.publisher) else {
            return;
        };
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        if let Some(mut r) = c.pc.rtp_receiver(receiver) {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            };
            if r.write_rtcp(now, vec![Box::new(pli)]).is_ok() {
                self.stats.keyframe_requests_sent += 1;
                tracing::debug!(track = %track_sid, layer, ssrc = media_ssrc, "keyframe requested");
            }
        }
        self.mark_dirty(conn);
    }
}

/// What a packet is, for the forwarder: from its layer, its VP8 payload
/// descriptor and the layer's last sender report.
fn packet_info(
    kind: TrackKind,
    clock_rate: u32,
    source: &PubLayer,
    packet: &rtc::rtp::Packet,
    ext_seq: u64,
) -> (PacketInfo, Option<vp8::Vp8Descriptor>) {
    let (keyframe, vp8) = match kind {
        // Every audio packet can start a stream.
        TrackKind::Audio => (true, None),
        TrackKind::Video => match vp8::parse(&packet.payload) {
            Some(d) => (d.keyframe, Some(d)),
            None => (false, None),
        },
    };
    let capture_ntp = source.sender_report.map(|(ntp, rtp, _)| {
        let ticks = packet.header.timestamp.wrapping_sub(rtp) as i32 as i64;
        let offset = (ticks << 32) / clock_rate.max(1) as i64;
        ntp.wrapping_add(offset as u64)
    });
    let info = PacketInfo {
        layer: source.layer,
        ext_seq,
        timestamp: packet.header.timestamp,
        capture_ntp,
        keyframe,
        padding_only: packet.payload.is_empty(),
        picture_id: vp8.and_then(|d| d.picture_id.map(|(id, _)| id)),
        tl0_pic_idx: vp8.and_then(|d| d.tl0_pic_idx),
        tid: vp8.and_then(|d| d.tid),
        frame_start: vp8.is_none_or(|d| d.frame_start),
    };
    (info, vp8)
}

/// One published packet on its way to subscribers.
struct Delivery<'a> {
    now: Instant,
    track_sid: &'a str,
    /// With the publisher's header extensions already stripped.
    packet: &'a rtc::rtp::Packet,
    info: &'a PacketInfo,
    vp8: Option<&'a vp8::Vp8Descriptor>,
}

/// Decides and, if forwarded, writes one packet to one subscriber. Adds
/// to `wanted` the layer the subscriber waits for a keyframe of. Returns
/// whether the packet started a layer for this subscriber.
#[allow(clippy::too_many_arguments)]
fn deliver(
    d: Delivery<'_>,
    sub: ParticipantId,
    p: &mut Participant,
    down: &mut DownTrack,
    conns: &mut Conns,
    sink: &mut Sink<'_>,
    stats: &mut RoomStats,
    wanted: &mut Vec<(Layer, bool)>,
) -> bool {
    let Delivery {
        now,
        track_sid,
        packet,
        info,
        vp8,
    } = d;
    let conn = p.subscriber;
    let (Some(conn), true, Some(pt)) = (conn, down.negotiated, down.payload_type) else {
        stats.drop(DropReason::NotNegotiated);
        return false;
    };
    let Some(c) = conns.get_mut(conn) else {
        return false;
    };
    if !c.connected {
        // Until DTLS is up the engine cannot encrypt; deciding now would
        // number packets that never leave.
        stats.drop(DropReason::NotConnected);
        return false;
    }
    let verdict = down.forwarder.decide(info, now);
    if let Some(layer) = down.forwarder.awaiting_keyframe() {
        let starving = down.forwarder.current().is_none();
        if !wanted.contains(&(layer, starving)) {
            wanted.push((layer, starving));
        }
    }
    let rewrite = match verdict {
        Verdict::Forward(rewrite) => {
            if rewrite.switched {
                tracing::debug!(track = %track_sid, subscriber = ?sub, layer = info.layer, "layer switch");
            }
            rewrite
        }
        Verdict::Drop(reason) => {
            stats.drop(reason);
            return false;
        }
    };
    let bytes = packet.payload.len() as u64;
    let out = Outgoing {
        ssrc: down.ssrc,
        payload_type: pt,
        seq: rewrite.seq,
        timestamp: rewrite.timestamp,
        // Only after a switch do the VP8 fields differ from the source's.
        vp8: vp8
            .filter(|_| {
                rewrite.picture_id != info.picture_id || rewrite.tl0_pic_idx != info.tl0_pic_idx
            })
            .map(|d| {
                (
                    d,
                    rewrite.picture_id.unwrap_or(0),
                    rewrite.tl0_pic_idx.unwrap_or(0),
                )
            }),
    };
    if let Some(by) = c.send_rtp(conn, down.sender, &mut down.srtp, now, packet, &out, sink) {
        stats.rtp_forwarded += 1;
        stats.rtp_sent_by_room += u64::from(by == SentBy::Room);
        stats.bytes_forwarded += bytes;
        down.sent.record(SentEntry {
            layer: info.layer,
            ext_seq: info.ext_seq,
            rewrite,
        });
        down.packets_sent = down.packets_sent.wrapping_add(1);
        down.octets_sent = down.octets_sent.wrapping_add(bytes as u32);
        p.sent_rate.add(now, bytes as usize + 40);
        p.sent_packets.add(now, 1);
        rewrite.switched
    } else {
        stats.drop(DropReason::EngineRejected);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::{beat_after, beat_at_or_after, beat_later, DropReason};
    use std::time::Duration;

    #[test]
    fn beats_round_to_the_room_s_tick_and_periodic_timers_keep_their_phase() {
        let ms = Duration::from_millis;
        assert_eq!(beat_at_or_after(ms(0)), ms(0));
        assert_eq!(beat_at_or_after(ms(200)), ms(200));
        assert_eq!(beat_at_or_after(ms(201)), ms(300));
        assert_eq!(beat_after(ms(200)), ms(300));
        assert_eq!(beat_after(ms(299)), ms(300));
        // Run on the beat or a little late, a 500 ms timer comes back on
        // the beat 500 ms after the one it was due on.
        assert_eq!(beat_later(ms(1000), ms(500)), ms(1500));
        assert_eq!(beat_later(ms(1003), ms(500)), ms(1500));
        assert_eq!(beat_later(ms(1003), ms(100)), ms(1100));
    }

    #[test]
    fn drop_reasons_index_all_in_order() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
    }
}
