//! Construction of the webrtc-rs `rtc` peer connections the room drives:
//! codecs with the RTCP feedback browsers need, the interceptor chain, and
//! the interceptor that lets keyframe requests and NACKs reach the room.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::transport::RTCDtlsRole;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::error::Error as RtcError;

use crate::feedback::{Arrival, InboundFeedback, StreamSpec};
use crate::srtp::{KeyCapture, PROFILES};

/// Payload type the server uses for VP8 in its own offers.
pub const VP8_PAYLOAD_TYPE: u8 = 96;
/// Payload type the server uses for Opus in its own offers.
pub const OPUS_PAYLOAD_TYPE: u8 = 111;

fn video_feedback() -> Vec<RTCPFeedback> {
    [
        ("goog-remb", ""),
        ("ccm", "fir"),
        ("nack", ""),
        ("nack", "pli"),
        ("transport-cc", ""),
    ]
    .into_iter()
    .map(|(typ, parameter)| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    })
    .collect()
}

/// The VP8 codec as the room registers and forwards it.
pub fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: video_feedback(),
    }
}

/// The Opus codec as the room registers and forwards it.
pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![RTCPFeedback {
            typ: "transport-cc".to_owned(),
            parameter: String::new(),
        }],
    }
}

/// A media engine with exactly the codecs the room forwards.
pub fn media_engine() -> Result<MediaEngine, RtcError> {
    let mut engine = MediaEngine::default();
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(),
            payload_type: VP8_PAYLOAD_TYPE,
        },
        RtpCodecKind::Video,
    )?;
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus_codec(),
            payload_type: OPUS_PAYLOAD_TYPE,
        },
        RtpCodecKind::Audio,
    )?;
    Ok(engine)
}

/// How often the room runs the reception feedback of its publisher
/// connections: TWCC feedback and NACKs go out on this beat, for every
/// publisher of a room at once (see [`SharedFeedback::tick`]).
pub const FEEDBACK_TICK: Duration = Duration::from_millis(100);

/// What a connection is for; decides the DTLS role and nothing else here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRole {
    /// The client offers, the server answers (as DTLS server).
    Answering,
    /// The server offers.
    Offering,
}

/// A server-side peer connection and what the room reaches it by besides
/// its API.
pub struct BuiltConnection {
    pub pc: RTCPeerConnection,
    /// The connection's crypto provider, which notes its SRTP keys.
    pub keys: Arc<KeyCapture>,
    /// Publisher connections: their reception feedback, which records
    /// inbound RTP whether the engine or the room decrypts it.
    pub feedback: Option<SharedFeedback>,
}

/// Builds one server-side peer connection: ICE-lite with credentials of
/// its own (new ones at each ICE restart), VP8 + Opus, RTCP reports, TWCC feedback, NACK generation on
/// publisher connections, and delivery of the feedback the room acts on.
///
/// The connection's crypto goes through the returned [`KeyCapture`], from
/// which the room takes the SRTP keys once DTLS is up.
///
/// `rtcp_ssrc`: the SSRC a publisher connection's reception feedback is
/// sent from.
pub fn build_peer_connection(
    now: Instant,
    role: ConnRole,
    rtcp_ssrc: u32,
) -> Result<BuiltConnection, RtcError> {
    let mut engine = media_engine()?;
    configure_simulcast_extension_headers(&mut engine)?;
    let twcc = configure_twcc_receiver_only(Registry::new(), &mut engine)?;
    let (registry, feedback) = match role {
        // Publisher connections report reception (TWCC feedback, receiver
        // reports) and ask the client to resend what got lost, for every
        // inbound packet: those the engine decrypts and those the room
        // does (see `SharedFeedback`).
        ConnRole::Answering => {
            // The TWCC receiver `twcc` came with is left: reception
            // feedback is the room's, on its beat (`SharedFeedback`).
            // No sender-report generator: a publisher connection sends no
            // media, and the generator's timer would wake the room every
            // second for nothing.
            drop(twcc);
            let shared = SharedFeedback::new(rtcp_ssrc);
            (
                Registry::new().with(Slot::Custom(7_500), shared.clone()),
                Some(shared),
            )
        }
        // Subscriber connections have no NACK responder of their own (the
        // room answers NACKs from its shared per-layer packet cache) and no
        // sender-report generator (the room sends reports that carry the
        // publisher's clock through its timestamp rewriting). Their
        // bandwidth estimate comes from the loss their NACKs report, and
        // REMB, at no per-packet cost.
        ConnRole::Offering => (
            twcc.with(Slot::Custom(14_000), FeedbackTap::default()),
            None,
        ),
    };
    // No fixed ICE credentials: an ICE restart then gets fresh ones, as
    // it must (RFC 8445 9), and the room learns each ufrag from the
    // connection's local description.
    let keys =
        Arc::new(KeyCapture::with_default_provider().map_err(|e| RtcError::Crypto(e.to_string()))?);
    let mut settings = SettingEngineBuilder::new()
        .with_lite(true)
        .with_crypto_provider(keys.clone())
        .with_srtp_protection_profiles(PROFILES.to_vec());
    if role == ConnRole::Answering {
        settings = settings.with_answering_dtls_role(RTCDtlsRole::Server);
    }
    let pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(settings.build())
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .build(now)?;
    Ok(BuiltConnection { pc, keys, feedback })
}

/// The reception feedback of a publisher connection ([`InboundFeedback`]),
/// as an interceptor in the engine's chain and reachable by the room as
/// well.
///
/// The engine binds each inbound stream to it (with the stream's
/// negotiated header extensions and feedback), passes it what it decrypts
/// itself and sends the RTCP it makes. The room decrypts RTP of streams it
/// knows itself, past the engine's generic read path, and records each
/// packet's header here, so NACKs, receiver reports and TWCC feedback cover
/// every packet whichever way it came in. Both sides run on the room's
/// thread, one after the other: the lock is never contended.
///
/// Its timer is the room's, not the engine's: the engine sees none (it
/// would wake the room on a phase of its own and run the engine's whole
/// pipeline), and the room ticks every publisher connection together,
/// every [`FEEDBACK_TICK`].
///
/// It also marks the inbound RTCP the room acts on for delivery past the
/// engine's chain, as [`FeedbackTap`] does on subscriber connections.
#[derive(Clone)]
pub struct SharedFeedback(Arc<Mutex<Shared>>);

struct Shared {
    feedback: InboundFeedback,
    read: VecDeque<TaggedPacket>,
    /// RTCP made on the room's tick, and what the engine wrote through,
    /// for the engine's next poll.
    write: VecDeque<TaggedPacket>,
    /// Reused for each tick's RTCP.
    made: Vec<Box<dyn rtc::rtcp::Packet>>,
}

/// What a tick of the feedback gave.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ticked {
    /// It made RTCP, waiting for the engine to send it.
    pub made_rtcp: bool,
    /// It has work on later beats.
    pub ticking: bool,
}

/// RTCP made on one tick goes out as compound packets of at most this many
/// bytes (one datagram each).
const MAX_COMPOUND_BYTES: usize = 1_100;

impl SharedFeedback {
    fn new(rtcp_ssrc: u32) -> SharedFeedback {
        SharedFeedback(Arc::new(Mutex::new(Shared {
            feedback: InboundFeedback::new(rtcp_ssrc),
            read: VecDeque::new(),
            write: VecDeque::new(),
            made: Vec::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while recording leaves nothing half-done that the next
        // packet cannot work with.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one inbound RTP packet the room decrypted. From the first
    /// packet on, the feedback has work on every beat.
    ///
    /// `transport_seq` reads the packet's transport-wide sequence number,
    /// given the extension id it was negotiated under.
    pub fn feed(
        &self,
        now: Instant,
        ssrc: u32,
        sequence_number: u16,
        timestamp: u32,
        transport_seq: impl FnOnce(u8) -> Option<u16>,
    ) {
        let mut inner = self.lock();
        let transport_seq = inner.feedback.twcc_ext().and_then(transport_seq);
        inner.feedback.record_arrival(
            now,
            Arrival {
                ssrc,
                sequence_number,
                timestamp,
                transport_seq,
            },
        );
    }

    /// Notes a sender report the room decrypted, for the receiver
    /// reports' echo of it (the sender's round-trip time).
    pub fn sender_report(&self, now: Instant, ssrc: u32, ntp_time: u64) {
        self.lock().feedback.sender_report(now, ssrc, ntp_time);
    }

    /// Runs the feedback at the room's tick: what is due goes to the
    /// engine as compound RTCP.
    pub fn tick(&self, now: Instant) -> Ticked {
        let mut inner = self.lock();
        let Shared {
            feedback,
            write,
            made,
            ..
        } = &mut *inner;
        if !feedback.started() {
            return Ticked::default();
        }
        feedback.tick(now, made);
        let made_rtcp = !made.is_empty();
        let mut compound: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::new();
        let mut size = 0;
        for p in made.drain(..) {
            let len = p.marshal_size();
            if !compound.is_empty() && size + len > MAX_COMPOUND_BYTES {
                write.push_back(rtcp_out(now, std::mem::take(&mut compound)));
                size = 0;
            }
            size += len;
            compound.push(p);
        }
        if !compound.is_empty() {
            write.push_back(rtcp_out(now, compound));
        }
        Ticked {
            made_rtcp,
            ticking: true,
        }
    }

    /// Whether the feedback has work on the beat (it starts with the
    /// first packet).
    pub fn ticking(&self) -> bool {
        self.lock().feedback.started()
    }
}

fn rtcp_out(now: Instant, packets: Vec<Box<dyn rtc::rtcp::Packet>>) -> TaggedPacket {
    TaggedPacket {
        now,
        transport: Default::default(),
        message: rtc::interceptor::AttributedPacket::new(Packet::Rtcp(packets)),
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SharedFeedback {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = RtcError;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), RtcError> {
        let mut inner = self.lock();
        match &msg.message.packet {
            Packet::Rtp(rtp) => inner.feedback.record(msg.now, &rtp.header),
            Packet::Rtcp(packets) => {
                let mut for_room = false;
                for p in packets {
                    if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                        inner.feedback.sender_report(msg.now, sr.ssrc, sr.ntp_time);
                    }
                    for_room |= is_for_the_room(p.as_ref());
                }
                if for_room {
                    msg.message.add(Attribute::DeliverToApplication);
                }
            }
            _ => {}
        }
        inner.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.lock().read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), RtcError> {
        self.lock().write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.lock().write.pop_front()
    }

    // The room runs the timer (`tick`); the engine's wakes leave it.
    fn handle_timeout(&mut self, _now: Instant) -> Result<(), RtcError> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for SharedFeedback {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.lock().feedback.bind(StreamSpec {
            ssrc: info.ssrc,
            clock_rate: info.clock_rate,
            nack: info
                .rtcp_feedback
                .iter()
                .any(|fb| fb.typ == "nack" && fb.parameter.is_empty()),
            twcc_ext: info
                .rtp_header_extensions
                .iter()
                .find(|ext| ext.uri == rtc::sdp::extmap::TRANSPORT_CC_URI)
                .map(|ext| ext.id as u8),
        });
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.lock().feedback.unbind(info.ssrc);
    }
}

/// Marks inbound PLI, FIR, NACK, REMB and sender reports for delivery to the
/// application. The
/// engine stops all inbound RTCP at the end of its chain unless told
/// otherwise; the room passes keyframe requests to publishers and answers
/// NACKs from its packet cache.
#[derive(Default)]
pub struct FeedbackTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

/// A subscriber's downlink estimate starts here, so it is not held at low
/// quality while it ramps up, and falls when its receiver reports loss.
pub const INITIAL_DOWNLINK_ESTIMATE: u64 = 4_000_000;
pub const MAX_DOWNLINK_ESTIMATE: u64 = 50_000_000;

fn is_for_the_room(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>()
        || any.is::<FullIntraRequest>()
        || any.is::<TransportLayerNack>()
        || any.is::<ReceiverEstimatedMaximumBitrate>()
        || any.is::<SenderReport>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = RtcError;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), RtcError> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if packets.iter().any(|p| is_for_the_room(p.as_ref())) {
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), RtcError> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for FeedbackTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
