//! In-memory harness: client peers (webrtc-rs `rtc` peer connections, as a
//! browser-like full-ICE client) connected to a `Room` by plain function
//! calls on a virtual clock. No sockets, no sleeps.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::interceptor::{Registry, Slot, TwccSenderBuilder};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use sfu_core::engine::{
    media_engine, opus_codec, vp8_codec, FeedbackTap, OPUS_PAYLOAD_TYPE, VP8_PAYLOAD_TYPE,
};
use sfu_core::signal::{ClientMessage, IceCandidate, ServerMessage, Target};
use sfu_core::{JoinRequest, Output, ParticipantId, Room, RoomConfig, RoomEvent};

pub const SERVER: &str = "127.0.0.1:7882";

/// Offsets in the test payload: after a 5-byte VP8 descriptor and the frame
/// tag come the sender index, the stream slot, the sender's sequence number
/// and a fixed body.
pub const PAYLOAD_INDEX: usize = 6;
pub const PAYLOAD_SLOT: usize = 7;
pub const PAYLOAD_SEQ: usize = 8;
pub const PAYLOAD_BODY: usize = 10;

/// The virtual clock starts at one real instant and only moves by steps.
#[allow(clippy::disallowed_methods)]
pub fn epoch() -> Instant {
    Instant::now()
}

fn client_pc(
    epoch: Instant,
    now: Instant,
    addr: SocketAddr,
    twcc: bool,
    keepalive: Option<Duration>,
) -> RTCPeerConnection {
    let mut engine = media_engine().unwrap();
    let mut registry = register_default_interceptors(Registry::new(), &mut engine)
        .unwrap()
        // The engine's own sender reports read the wall clock at each
        // frame; on the virtual clock they would drift by however long the
        // machine takes to run the test.
        .with(Slot::SenderReport, VirtualSenderReports::new(epoch))
        .with(Slot::Custom(14_000), FeedbackTap::default())
        .with(Slot::Custom(14_001), ReportTap::default());
    if twcc {
        // Numbered for transport-wide feedback, as a browser's packets are.
        registry = registry.with(Slot::TwccSender, TwccSenderBuilder::new().build());
    }
    let mut settings = SettingEngineBuilder::new();
    if keepalive.is_some() {
        settings = settings.with_ice_timeouts(None, None, keepalive);
    }
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(settings.build())
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .build(now)
        .unwrap();
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
    .new_candidate_host()
    .unwrap();
    pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json().unwrap())
        .unwrap();
    pc
}

/// Lets receiver reports reach the client application, so tests can read
/// what the server reports of a publisher's streams.
#[derive(Default)]
struct ReportTap {
    read: VecDeque<rtc::interceptor::TaggedPacket>,
    write: VecDeque<rtc::interceptor::TaggedPacket>,
}

impl Protocol<rtc::interceptor::TaggedPacket, rtc::interceptor::TaggedPacket, ()> for ReportTap {
    type Rout = rtc::interceptor::TaggedPacket;
    type Wout = rtc::interceptor::TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: rtc::interceptor::TaggedPacket) -> Result<(), Self::Error> {
        if let rtc::interceptor::Packet::Rtcp(packets) = &msg.message.packet {
            if packets
                .iter()
                .any(|p| p.as_any().is::<ReceiverReport>() || p.as_any().is::<TransportLayerCc>())
            {
                msg.message
                    .add(rtc::interceptor::Attribute::DeliverToApplication);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<rtc::interceptor::TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: rtc::interceptor::TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<rtc::interceptor::TaggedPacket> {
        self.write.pop_front()
    }
}

impl rtc::interceptor::Interceptor for ReportTap {
    fn bind_local_stream(&mut self, _: &rtc::interceptor::StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &rtc::interceptor::StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &rtc::interceptor::StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &rtc::interceptor::StreamInfo) {}
}

/// A client's sender reports, once a second, timed by the virtual clock
/// alone: NTP time is a fixed wall-clock origin plus the virtual time since
/// the harness's epoch, and each stream's RTP time is extrapolated from the
/// first packet of its latest frame, as a browser does. Tests that check
/// how the server aligns streams by their reports get the same reports on
/// any machine.
struct VirtualSenderReports {
    epoch: Instant,
    next: Option<Instant>,
    /// SSRC -> (clock rate, RTP time and instant of the latest frame's first packet).
    streams: HashMap<u32, (u32, Option<(u32, Instant)>)>,
    queue: VecDeque<rtc::interceptor::TaggedPacket>,
    read: VecDeque<rtc::interceptor::TaggedPacket>,
}

impl VirtualSenderReports {
    /// 2026-01-01T00:00:00Z in NTP seconds.
    const NTP_ORIGIN_SECS: u64 = 3_976_214_400;
    const INTERVAL: Duration = Duration::from_secs(1);

    fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            next: None,
            streams: HashMap::new(),
            queue: VecDeque::new(),
            read: VecDeque::new(),
        }
    }

    fn ntp(&self, now: Instant) -> u64 {
        let since = now.duration_since(self.epoch).as_nanos();
        (Self::NTP_ORIGIN_SECS << 32) + ((since << 32) / 1_000_000_000) as u64
    }
}

impl Protocol<rtc::interceptor::TaggedPacket, rtc::interceptor::TaggedPacket, ()>
    for VirtualSenderReports
{
    type Rout = rtc::interceptor::TaggedPacket;
    type Wout = rtc::interceptor::TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: rtc::interceptor::TaggedPacket) -> Result<(), Self::Error> {
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<rtc::interceptor::TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: rtc::interceptor::TaggedPacket) -> Result<(), Self::Error> {
        if let rtc::interceptor::Packet::Rtp(p) = &msg.message.packet {
            if let Some((_, last)) = self.streams.get_mut(&p.header.ssrc) {
                if last.is_none_or(|(ts, _)| ts != p.header.timestamp) {
                    *last = Some((p.header.timestamp, msg.now));
                }
                self.next.get_or_insert(msg.now + Self::INTERVAL);
            }
        }
        self.queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<rtc::interceptor::TaggedPacket> {
        self.queue.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        let Some(next) = self.next.filter(|next| now >= *next) else {
            return Ok(());
        };
        self.next = Some(next + Self::INTERVAL);
        let ntp_time = self.ntp(now);
        for (&ssrc, &(clock, last)) in &self.streams {
            let Some((ts, at)) = last else { continue };
            let ticks = (now.duration_since(at).as_nanos() * clock as u128 / 1_000_000_000) as u32;
            let report = SenderReport {
                ssrc,
                ntp_time,
                rtp_time: ts.wrapping_add(ticks),
                ..Default::default()
            };
            self.queue.push_back(rtc::interceptor::TaggedPacket {
                now,
                transport: TransportContext::default(),
                message: rtc::interceptor::AttributedPacket::new(rtc::interceptor::Packet::Rtcp(
                    vec![Box::new(report)],
                )),
            });
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.next
    }
}

impl rtc::interceptor::Interceptor for VirtualSenderReports {
    fn bind_local_stream(&mut self, info: &rtc::interceptor::StreamInfo) {
        self.streams.insert(info.ssrc, (info.clock_rate, None));
    }
    fn unbind_local_stream(&mut self, info: &rtc::interceptor::StreamInfo) {
        self.streams.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _: &rtc::interceptor::StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &rtc::interceptor::StreamInfo) {}
}

/// What a subscriber received from one publisher's track.
#[derive(Default, Debug)]
pub struct Received {
    pub payloads: Vec<Bytes>,
    /// RTP sequence numbers as received.
    pub seqs: Vec<u16>,
    pub timestamps: Vec<u32>,
}

pub struct Client {
    pub name: String,
    pub id: ParticipantId,
    pub publisher: Option<RTCPeerConnection>,
    pub subscriber: RTCPeerConnection,
    pub pub_addr: SocketAddr,
    pub sub_addr: SocketAddr,
    pub senders: Vec<(RTCRtpSenderId, u32, u8)>,
    pub signals: Vec<ServerMessage>,
    /// Received RTP by the msid track id (= server track sid).
    pub received: HashMap<String, Received>,
    /// Track sid -> stream id (publisher participant sid).
    pub track_streams: HashMap<String, String>,
    /// Receiver and SSRC of each received track, by track id.
    pub track_receivers: HashMap<String, (RTCRtpReceiverId, u32)>,
    /// Media SSRCs named by keyframe requests this client received.
    pub keyframe_requests: Vec<u32>,
    /// Keyframe requests already answered with a keyframe.
    pub keyframes_sent_for: usize,
    /// Sender reports received on the subscriber connection:
    /// (SSRC, NTP time, RTP time).
    pub sender_reports: Vec<(u32, u64, u32)>,
    /// Receiver reports the server sent about this client's streams:
    /// (SSRC, extended highest sequence number received).
    pub receiver_reports: Vec<(u32, u32)>,
    /// The last-sender-report field of each reception report received.
    pub report_echoes: Vec<u32>,
    /// Transport-wide congestion control feedback the server sent this
    /// client.
    pub twcc_feedback: usize,
    /// Stream slots (simulcast layers) this publisher has stopped sending.
    pub stopped_slots: Vec<u8>,
    pub seq: u16,
    /// Video packets carry RTP padding (the P bit, a count in the last byte).
    pub pad_video: bool,
}

pub struct Harness {
    /// Where the virtual clock started.
    pub epoch: Instant,
    pub now: Instant,
    pub room: Room,
    pub clients: Vec<Client>,
    pub removed: Vec<ParticipantId>,
    /// Source addresses the room said it no longer routes.
    pub unrouted: Vec<SocketAddr>,
    next_port: u16,
    pending: VecDeque<(ParticipantId, ClientMessage)>,
    /// Random loss on the path from these client addresses to the server
    /// (uplink) and from the server to them (downlink), as a fraction.
    pub uplink_loss: HashMap<SocketAddr, f64>,
    pub downlink_loss: HashMap<SocketAddr, f64>,
    /// Datagrams the loss dropped: (uplink, downlink).
    pub lost: (u64, u64),
    /// The instants the room's own timers woke it.
    pub room_wakes: Vec<Instant>,
    /// Clients joining from now on number their packets for
    /// transport-wide congestion control feedback, as browsers do (on by
    /// default).
    pub client_twcc: bool,
    /// Clients joining from now on check consent this often once
    /// connected (the engine's default, 2 s, when `None`).
    pub client_keepalive: Option<Duration>,
    rng: sfu_core::SeededRng,
}

impl Harness {
    pub fn new() -> Harness {
        let now = epoch();
        let room = Room::new(
            RoomConfig {
                name: "test".into(),
                sid: "RM_test".into(),
                media_addr: SERVER.parse().unwrap(),
                seed: 42,
                ice_servers: vec![],
                max_participants: 0,
                max_tracks: 0,
            },
            now,
        );
        Harness {
            epoch: now,
            now,
            room,
            clients: Vec::new(),
            removed: Vec::new(),
            unrouted: Vec::new(),
            next_port: 10_000,
            pending: VecDeque::new(),
            uplink_loss: HashMap::new(),
            downlink_loss: HashMap::new(),
            lost: (0, 0),
            room_wakes: Vec::new(),
            client_twcc: true,
            client_keepalive: None,
            rng: sfu_core::SeededRng::new(42),
        }
    }

    fn addr(&mut self) -> SocketAddr {
        self.next_port += 1;
        format!("127.0.0.1:{}", self.next_port).parse().unwrap()
    }

    /// Joins a client; if `publish`, it offers a VP8 and an Opus track.
    pub fn join(&mut self, name: &str, publish: bool) -> usize {
        self.join_with(name, publish, false)
    }

    /// Like [`Harness::join`], with the video sent as three simulcast
    /// layers (rids q, h, f) when `simulcast`.
    pub fn join_with(&mut self, name: &str, publish: bool, simulcast: bool) -> usize {
        let pub_addr = self.addr();
        let sub_addr = self.addr();
        let id = self
            .room
            .join(
                self.now,
                JoinRequest {
                    identity: name.into(),
                    name: name.into(),
                    can_publish: true,
                    can_subscribe: true,
                    joined_at_unix: 0,
                    ice_servers: vec![],
                },
            )
            .unwrap();
        let mut client = Client {
            name: name.into(),
            id,
            publisher: None,
            subscriber: client_pc(
                self.epoch,
                self.now,
                sub_addr,
                self.client_twcc,
                self.client_keepalive,
            ),
            pub_addr,
            sub_addr,
            senders: Vec::new(),
            signals: Vec::new(),
            received: HashMap::new(),
            track_streams: HashMap::new(),
            track_receivers: HashMap::new(),
            keyframe_requests: Vec::new(),
            keyframes_sent_for: 0,
            sender_reports: Vec::new(),
            receiver_reports: Vec::new(),
            report_echoes: Vec::new(),
            twcc_feedback: 0,
            stopped_slots: Vec::new(),
            pad_video: false,
            seq: 0,
        };
        if publish {
            let mut pc = client_pc(
                self.epoch,
                self.now,
                pub_addr,
                self.client_twcc,
                self.client_keepalive,
            );
            let video_rids: &[&str] = if simulcast { &["q", "h", "f"] } else { &[""] };
            for (kind, codec, pt, base, rids) in [
                (
                    RtpCodecKind::Video,
                    vp8_codec(),
                    VP8_PAYLOAD_TYPE,
                    0x1000,
                    video_rids,
                ),
                (
                    RtpCodecKind::Audio,
                    opus_codec(),
                    OPUS_PAYLOAD_TYPE,
                    0x2000,
                    &[""][..],
                ),
            ] {
                let ssrcs: Vec<u32> = (0..rids.len() as u32)
                    .map(|layer| base + 0x100 * layer + id.0 as u32)
                    .collect();
                let codings = rids
                    .iter()
                    .zip(&ssrcs)
                    .map(|(rid, ssrc)| RTCRtpEncodingParameters {
                        rtp_coding_parameters: RTCRtpCodingParameters {
                            rid: rid.to_string(),
                            ssrc: Some(*ssrc),
                            ..Default::default()
                        },
                        codec: codec.clone(),
                        ..Default::default()
                    })
                    .collect();
                let track = MediaStreamTrack::new(
                    format!("stream-{name}"),
                    format!("{name}-{kind}"),
                    format!("{name}-{kind}"),
                    kind,
                    codings,
                );
                let sender = pc.add_track(track).unwrap();
                for ssrc in ssrcs {
                    client.senders.push((sender, ssrc, pt));
                }
            }
            let offer = pc.create_offer(None).unwrap();
            pc.set_local_description(self.now, offer).unwrap();
            let sdp = pc.local_description().unwrap().sdp;
            client.publisher = Some(pc);
            self.pending.push_back((
                id,
                ClientMessage::Offer {
                    target: Target::Publisher,
                    sdp,
                },
            ));
        }
        self.clients.push(client);
        self.settle();
        self.clients.len() - 1
    }

    pub fn leave(&mut self, index: usize) {
        let id = self.clients[index].id;
        self.pending.push_back((id, ClientMessage::Leave));
        self.settle();
    }

    fn client_by_addr(&mut self, addr: SocketAddr) -> Option<(&mut RTCPeerConnection, SocketAddr)> {
        for c in &mut self.clients {
            if c.sub_addr == addr {
                return Some((&mut c.subscriber, addr));
            }
            if c.pub_addr == addr {
                return c.publisher.as_mut().map(|p| (p, addr));
            }
        }
        None
    }

    /// Delivers everything in flight until nothing moves at this instant.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some((id, msg)) = self.pending.pop_front() {
                self.room.handle_signal(self.now, id, msg);
                moved = true;
            }
            loop {
                match self.room.poll_output() {
                    Output::Transmit(t) => {
                        moved = true;
                        let now = self.now;
                        if self.lose(self.downlink_loss.get(&t.destination).copied()) {
                            self.lost.1 += 1;
                            continue;
                        }
                        if let Some((pc, addr)) = self.client_by_addr(t.destination) {
                            let _ = pc.handle_read(TaggedBytesMut {
                                now,
                                transport: TransportContext {
                                    local_addr: addr,
                                    peer_addr: SERVER.parse().unwrap(),
                                    ecn: None,
                                    transport_protocol: TransportProtocol::UDP,
                                },
                                message: t.contents,
                            });
                        }
                    }
                    Output::Signal {
                        participant,
                        message,
                    } => {
                        moved = true;
                        self.on_signal(participant, message);
                    }
                    Output::Event(RoomEvent::ParticipantRemoved { participant, .. }) => {
                        self.removed.push(participant);
                    }
                    Output::Event(RoomEvent::Unrouted { addrs, .. }) => {
                        self.unrouted.extend(addrs);
                    }
                    Output::Event(_) => {}
                    Output::Timeout(_) => break,
                }
            }
            let server: SocketAddr = SERVER.parse().unwrap();
            let mut datagrams = Vec::new();
            for c in &mut self.clients {
                let pcs = [(&mut c.subscriber, c.sub_addr)]
                    .into_iter()
                    .chain(c.publisher.as_mut().map(|p| (p, c.pub_addr)));
                for (pc, addr) in pcs {
                    while let Some(out) = pc.poll_write() {
                        if out.transport.peer_addr == server {
                            datagrams.push((addr, out.message));
                        }
                    }
                    while let Some(event) = pc.poll_event() {
                        if let RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) = event
                        {
                            if let Some(stream) = init.stream_ids.first() {
                                c.track_streams
                                    .insert(init.track_id.clone(), stream.clone());
                            }
                            c.track_receivers
                                .insert(init.track_id.clone(), (init.receiver_id, init.ssrc));
                        }
                    }
                    while let Some(msg) = pc.poll_read() {
                        match msg.message {
                            RTCMessage::RtpPacket(track_id, packet) => {
                                let r = c.received.entry(track_id).or_default();
                                r.seqs.push(packet.header.sequence_number);
                                r.timestamps.push(packet.header.timestamp);
                                r.payloads.push(packet.payload);
                            }
                            RTCMessage::RtcpPacket(_, packets) => {
                                for p in packets {
                                    if let Some(pli) =
                                        p.as_any().downcast_ref::<PictureLossIndication>()
                                    {
                                        c.keyframe_requests.push(pli.media_ssrc);
                                    }
                                    if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                                        c.sender_reports.push((sr.ssrc, sr.ntp_time, sr.rtp_time));
                                    }
                                    if p.as_any().is::<TransportLayerCc>() {
                                        c.twcc_feedback += 1;
                                    }
                                    if let Some(rr) = p.as_any().downcast_ref::<ReceiverReport>() {
                                        c.receiver_reports.extend(
                                            rr.reports
                                                .iter()
                                                .map(|r| (r.ssrc, r.last_sequence_number)),
                                        );
                                        c.report_echoes.extend(
                                            rr.reports.iter().map(|r| r.last_sender_report),
                                        );
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            for (from, data) in datagrams {
                moved = true;
                if self.lose(self.uplink_loss.get(&from).copied()) {
                    self.lost.0 += 1;
                    continue;
                }
                self.room.handle_datagram(self.now, from, data);
            }
            if !moved {
                return;
            }
        }
        panic!("harness did not settle");
    }

    /// Draws whether a datagram on a path with this loss rate is lost.
    fn lose(&mut self, rate: Option<f64>) -> bool {
        match rate {
            Some(rate) => (self.rng.next_u64() % 1_000_000) as f64 / 1_000_000.0 < rate,
            None => false,
        }
    }

    fn on_signal(&mut self, participant: ParticipantId, message: ServerMessage) {
        let now = self.now;
        let Some(client) = self.clients.iter_mut().find(|c| c.id == participant) else {
            return;
        };
        client.signals.push(message.clone());
        match message {
            ServerMessage::Answer { sdp, .. } => {
                if let Some(pc) = client.publisher.as_mut() {
                    pc.set_remote_description(now, RTCSessionDescription::answer(sdp).unwrap())
                        .unwrap();
                }
            }
            ServerMessage::Offer { sdp, .. } => {
                let pc = &mut client.subscriber;
                pc.set_remote_description(now, RTCSessionDescription::offer(sdp).unwrap())
                    .unwrap();
                let answer = pc.create_answer(None).unwrap();
                pc.set_local_description(now, answer).unwrap();
                let sdp = pc.local_description().unwrap().sdp;
                self.pending.push_back((
                    participant,
                    ClientMessage::Answer {
                        target: Target::Subscriber,
                        sdp,
                    },
                ));
            }
            ServerMessage::PublishedLayers { layers, .. } => {
                // Like the SDK: stop encoding the layers nobody receives.
                client.stopped_slots = layers
                    .iter()
                    .filter(|l| !l.active)
                    .filter_map(|l| ["q", "h", "f"].iter().position(|r| *r == l.rid))
                    .map(|slot| slot as u8)
                    .collect();
            }
            ServerMessage::Candidate { target, candidate } => {
                let pc = match target {
                    Target::Subscriber => Some(&mut client.subscriber),
                    Target::Publisher => client.publisher.as_mut(),
                };
                if let Some(pc) = pc {
                    let IceCandidate {
                        candidate,
                        sdp_mid,
                        sdp_m_line_index,
                        username_fragment,
                    } = candidate;
                    let _ = pc.add_remote_candidate(RTCIceCandidateInit {
                        candidate,
                        sdp_mid,
                        sdp_mline_index: sdp_m_line_index,
                        username_fragment,
                        ..Default::default()
                    });
                }
            }
            _ => {}
        }
    }

    /// Moves the clock to the next timer of anyone (at most `max`), fires it.
    pub fn step(&mut self, max: Duration) {
        let limit = self.now + max;
        let mut next = limit;
        let mut room_due = None;
        if let Output::Timeout(t) = self.room.poll_output() {
            next = next.min(t);
            room_due = Some(t);
        }
        for c in &mut self.clients {
            if let Some(t) = c.subscriber.poll_timeout() {
                next = next.min(t);
            }
            if let Some(t) = c.publisher.as_mut().and_then(|p| p.poll_timeout()) {
                next = next.min(t);
            }
        }
        self.now = next.max(self.now);
        let now = self.now;
        if room_due.is_some_and(|t| t <= now) {
            self.room_wakes.push(now);
        }
        self.room.handle_timeout(now);
        for c in &mut self.clients {
            if c.subscriber.poll_timeout().is_some_and(|t| t <= now) {
                let _ = c.subscriber.handle_timeout(now);
            }
            if let Some(p) = c.publisher.as_mut() {
                if p.poll_timeout().is_some_and(|t| t <= now) {
                    let _ = p.handle_timeout(now);
                }
            }
        }
        self.settle();
    }

    /// Client `index` asks for a keyframe of every video track it receives
    /// from client `from`, as a decoder that lost a frame would.
    pub fn send_pli(&mut self, index: usize, from: usize) {
        let from_sid = self.client_sid(from);
        let now = self.now;
        let c = &mut self.clients[index];
        let targets: Vec<(RTCRtpReceiverId, u32)> = c
            .track_receivers
            .iter()
            .filter(|(track, _)| c.track_streams.get(*track) == Some(&from_sid))
            .map(|(_, r)| *r)
            .collect();
        for (receiver, ssrc) in targets {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            };
            c.subscriber
                .rtp_receiver(receiver)
                .unwrap()
                .write_rtcp(now, vec![Box::new(pli)])
                .unwrap();
        }
        self.settle();
    }

    /// The server sid of client `of`'s video track.
    pub fn video_track_sid(&self, of: usize) -> String {
        let sid = self.client_sid(of);
        self.room
            .participants()
            .into_iter()
            .find(|p| p.sid == sid)
            .and_then(|p| {
                p.tracks
                    .into_iter()
                    .find(|t| t.kind == sfu_core::signal::TrackKind::Video)
            })
            .map(|t| t.sid)
            .expect("video track published")
    }

    /// Sends a signalling message as client `index`.
    pub fn signal(&mut self, index: usize, message: ClientMessage) {
        let id = self.clients[index].id;
        self.pending.push_back((id, message));
        self.settle();
    }

    /// RTP sequence numbers and timestamps of the video client `to`
    /// received from client `from`, in order.
    pub fn video_rtp_from(&self, to: usize, from: usize) -> (Vec<u16>, Vec<u32>) {
        let from_sid = self.client_sid(from);
        let c = &self.clients[to];
        c.received
            .iter()
            .filter(|(track, _)| c.track_streams.get(*track) == Some(&from_sid))
            .find(|(_, r)| r.payloads.iter().any(|p| p[PAYLOAD_SLOT] != 0xA0))
            .map(|(_, r)| (r.seqs.clone(), r.timestamps.clone()))
            .unwrap_or_default()
    }

    /// Video payloads client `to` received from client `from`, in order.
    pub fn video_payloads_from(&self, to: usize, from: usize) -> Vec<Bytes> {
        let from_sid = self.client_sid(from);
        let c = &self.clients[to];
        c.received
            .iter()
            .filter(|(track, _)| c.track_streams.get(*track) == Some(&from_sid))
            .flat_map(|(_, r)| r.payloads.iter().cloned())
            .filter(|p| p[PAYLOAD_SLOT] != 0xA0)
            .collect()
    }

    /// Client `index` stops publishing its video track: removes the sender
    /// and sends a new publisher offer, as a browser's `removeTrack` does.
    pub fn unpublish_video(&mut self, index: usize) {
        let now = self.now;
        let c = &mut self.clients[index];
        let Some(pc) = c.publisher.as_mut() else {
            return;
        };
        let (sender, _, _) = c.senders[0];
        pc.remove_track(sender).unwrap();
        c.senders.retain(|(s, _, _)| *s != sender);
        let offer = pc.create_offer(None).unwrap();
        pc.set_local_description(now, offer).unwrap();
        let sdp = pc.local_description().unwrap().sdp;
        let id = c.id;
        self.pending.push_back((
            id,
            ClientMessage::Offer {
                target: Target::Publisher,
                sdp,
            },
        ));
        self.settle();
    }

    /// Client `index`'s subscriber connection reports a downlink estimate
    /// (REMB), as a browser's receive-side bandwidth estimator does.
    pub fn send_remb(&mut self, index: usize, bps: u64) {
        let now = self.now;
        let c = &mut self.clients[index];
        let receiver = c.track_receivers.values().next().map(|(r, _)| *r);
        let ssrcs: Vec<u32> = c.track_receivers.values().map(|(_, s)| *s).collect();
        if let Some(receiver) = receiver {
            let remb = ReceiverEstimatedMaximumBitrate {
                sender_ssrc: 0,
                bitrate: bps as f32,
                ssrcs,
            };
            c.subscriber
                .rtp_receiver(receiver)
                .unwrap()
                .write_rtcp(now, vec![Box::new(remb)])
                .unwrap();
        }
        self.settle();
    }

    /// Runs the clock forward by `duration`.
    pub fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.step(end - self.now);
        }
    }

    /// Runs until `cond` holds, failing after `limit` of virtual time.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut cond: impl FnMut(&Harness) -> bool,
    ) -> Duration {
        let start = self.now;
        while !cond(self) {
            assert!(
                self.now - start < limit,
                "condition not met within {limit:?}"
            );
            self.step(Duration::from_millis(20));
        }
        self.now - start
    }

    /// Sends one video (per layer) and one audio packet from client
    /// `index`. Each video packet is a whole frame with a VP8 descriptor
    /// (picture id, TL0PICIDX); keyframes come every 30 frames and, like a
    /// real encoder, right after a keyframe request. Payloads carry the
    /// sender's index, the stream slot and a sequence number.
    pub fn send_media(&mut self, index: usize) {
        self.write_media(index, false);
        self.settle();
    }

    /// The encrypted datagrams of `count` video frames from client `index`,
    /// made but not delivered (for benchmarks that feed the room directly).
    pub fn capture_media(&mut self, index: usize, count: usize) -> Vec<BytesMut> {
        let server: SocketAddr = SERVER.parse().unwrap();
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            self.write_media(index, true);
            if let Some(pc) = self.clients[index].publisher.as_mut() {
                while let Some(d) = pc.poll_write() {
                    if d.transport.peer_addr == server {
                        out.push(d.message);
                    }
                }
            }
        }
        out
    }

    /// Writes one frame per stream (or only video) into client `index`'s
    /// publisher connection without delivering anything.
    fn write_media(&mut self, index: usize, video_only: bool) {
        let now = self.now;
        let c = &mut self.clients[index];
        c.seq = c.seq.wrapping_add(1);
        let seq = c.seq;
        let requested = c.keyframe_requests.len() > c.keyframes_sent_for;
        c.keyframes_sent_for = c.keyframe_requests.len();
        let keyframe = seq % 30 == 1 || requested;
        let pad_video = c.pad_video;
        let Some(pc) = c.publisher.as_mut() else {
            return;
        };
        for (i, (sender, ssrc, pt)) in c.senders.iter().enumerate() {
            if video_only && *pt == OPUS_PAYLOAD_TYPE {
                continue;
            }
            if *pt != OPUS_PAYLOAD_TYPE && c.stopped_slots.contains(&(i as u8)) {
                continue;
            }
            // VP8 payload descriptor (start of partition) + tagged body:
            // sender index, stream slot (video layers 0.., audio 0xA0).
            let slot = if *pt == OPUS_PAYLOAD_TYPE {
                0xA0
            } else {
                i as u8
            };
            // Each layer numbers its pictures from a base of its own, as
            // a browser's encoders do: a subscriber moved between layers
            // sees continuous numbers only if the room rewrites them.
            let pid = seq.wrapping_add(1000 * i as u16) & 0x7FFF;
            let mut payload = vec![
                0x90,                    // X, S, partition 0
                0xC0,                    // I, L
                0x80 | (pid >> 8) as u8, // 15-bit picture id
                pid as u8,
                seq.wrapping_add(50 * i as u16) as u8, // TL0PICIDX
                if keyframe { 0x10 } else { 0x11 },    // VP8 frame tag: P bit
                index as u8,
                slot,
            ];
            payload.extend_from_slice(&seq.to_be_bytes());
            // Higher layers are bigger, as real ones are: 100, 400 and
            // 1100 bytes of body (about 60, 180 and 460 kbit/s at 50 fps).
            let body = match slot {
                1 => 400,
                2 => 1100,
                _ => 100,
            };
            payload.resize(payload.len() + body, 0xAB);
            let mut header = rtc::rtp::Header {
                version: 2,
                marker: true,
                payload_type: *pt,
                padding: pad_video && *pt != OPUS_PAYLOAD_TYPE,
                sequence_number: seq,
                // One frame per 20 ms on the codec's clock, from a base of
                // its own per stream (as encoders pick random ones).
                timestamp: ssrc
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seq as u32 * if *pt == OPUS_PAYLOAD_TYPE { 960 } else { 1800 }),
                ssrc: *ssrc,
                ..Default::default()
            };
            let mut rtp_sender = pc.rtp_sender(*sender).unwrap();
            let rid = rtp_sender
                .get_parameters()
                .encodings
                .iter()
                .find(|e| e.rtp_coding_parameters.ssrc == Some(*ssrc))
                .map(|e| e.rtp_coding_parameters.rid.clone())
                .unwrap_or_default();
            if !rid.is_empty() {
                // Simulcast layers are told apart by the mid and rid header
                // extensions, as a browser sends them.
                let ids: Vec<(String, u8)> = rtp_sender
                    .get_parameters()
                    .rtp_parameters
                    .header_extensions
                    .iter()
                    .map(|e| (e.uri.clone(), e.id as u8))
                    .collect();
                header.extension = true;
                header.extension_profile = 0xBEDE;
                for (uri, id) in ids {
                    if uri == "urn:ietf:params:rtp-hdrext:sdes:mid" {
                        header.set_extension(id, Bytes::from_static(b"0")).unwrap();
                    } else if uri == "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id" {
                        header.set_extension(id, Bytes::from(rid.clone())).unwrap();
                    }
                }
            }
            let packet = rtc::rtp::Packet {
                header,
                payload: Bytes::from(payload),
            };
            rtp_sender.write_rtp(now, packet).unwrap();
        }
    }

    pub fn client_sid(&self, index: usize) -> String {
        self.room
            .participant_sid(self.clients[index].id)
            .unwrap()
            .to_owned()
    }

    /// Packets client `to` received from client `from`'s tracks: (video, audio).
    /// The video stream slots (simulcast layers) client `to` received from `from`.
    pub fn video_layers_from(&self, to: usize, from: usize) -> Vec<u8> {
        let from_sid = self.client_sid(from);
        let c = &self.clients[to];
        let mut layers: Vec<u8> = c
            .received
            .iter()
            .filter(|(track, _)| c.track_streams.get(*track) == Some(&from_sid))
            .flat_map(|(_, r)| r.payloads.iter().map(|p| p[PAYLOAD_SLOT]))
            .filter(|slot| *slot != 0xA0)
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    pub fn received_from(&self, to: usize, from: usize) -> (usize, usize) {
        let from_sid = self.client_sid(from);
        let c = &self.clients[to];
        let mut video = 0;
        let mut audio = 0;
        for (track, received) in &c.received {
            if c.track_streams.get(track) != Some(&from_sid) {
                continue;
            }
            for p in &received.payloads {
                // Payload tag: [descriptor, sender index, track index, seq..]
                assert_eq!(
                    p[PAYLOAD_INDEX] as usize, from,
                    "payload from the wrong publisher"
                );
                match p[PAYLOAD_SLOT] {
                    0xA0 => audio += 1,
                    _ => video += 1,
                }
                assert!(
                    p.len() > PAYLOAD_BODY && p[PAYLOAD_BODY..].iter().all(|b| *b == 0xAB),
                    "payload corrupted"
                );
            }
        }
        (video, audio)
    }
}
