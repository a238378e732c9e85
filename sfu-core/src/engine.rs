//! Construction of the webrtc-rs `rtc` peer connections the room drives:
//! codecs with the RTCP feedback browsers need, the interceptor chain, and
//! the interceptor that lets keyframe requests and NACKs reach the room.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    Attribute, Interceptor, NackGeneratorBuilder, Packet, ReceiverReportBuilder, Registry, Slot,
    StreamInfo, TaggedPacket, TwccReceiverBuilder,
};
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

/// How often the room runs the interceptors of its publisher connections:
/// TWCC feedback and NACKs go out on this beat, for every publisher of a
/// room at once (see [`SharedInterceptors::tick`]).
pub const FEEDBACK_TICK: Duration = Duration::from_millis(100);

/// The interceptors' own intervals are only a floor under the room's beat:
/// shorter than it by more than a late wake, so each tick finds them due.
const TWCC_FEEDBACK_FLOOR: Duration = Duration::from_millis(50);
const NACK_FLOOR: Duration = Duration::from_millis(50);
/// Receiver reports go out on the first tick a second after the last.
const RECEIVER_REPORT_FLOOR: Duration = Duration::from_millis(950);

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
    /// Publisher connections: the interceptors inbound RTP passes through,
    /// shared with the room so RTP it decrypts itself passes them too.
    pub interceptors: Option<SharedInterceptors>,
}

/// Builds one server-side peer connection: ICE-lite with credentials of
/// its own (new ones at each ICE restart), VP8 + Opus, RTCP reports, TWCC feedback, NACK generation on
/// publisher connections, and delivery of the feedback the room acts on.
///
/// The connection's crypto goes through the returned [`KeyCapture`], from
/// which the room takes the SRTP keys once DTLS is up.
pub fn build_peer_connection(now: Instant, role: ConnRole) -> Result<BuiltConnection, RtcError> {
    let mut engine = media_engine()?;
    configure_simulcast_extension_headers(&mut engine)?;
    let twcc = configure_twcc_receiver_only(Registry::new(), &mut engine)?;
    let (registry, interceptors) = match role {
        // Publisher connections report reception (TWCC feedback, receiver
        // reports) and ask the client to resend what got lost, for every
        // inbound packet: those the engine decrypts and those the room
        // does (see `SharedInterceptors`).
        ConnRole::Answering => {
            // The tap sits inside: the chain's end drops RTCP not marked
            // for the application by then. No sender-report generator: a
            // publisher connection sends no media, and the generator's
            // timer would wake the room every second for nothing. (The
            // registry `twcc` came with is left: its receiver would run
            // on its own 100 ms timer, this one on the room's beat.)
            drop(twcc);
            let chain = Registry::new()
                .with(
                    Slot::TwccReceiver,
                    TwccReceiverBuilder::new()
                        .with_interval(TWCC_FEEDBACK_FLOOR)
                        .build(),
                )
                .with(
                    Slot::ReceiverReport,
                    ReceiverReportBuilder::new()
                        .with_interval(RECEIVER_REPORT_FLOOR)
                        .build(),
                )
                .with(
                    Slot::NackGenerator,
                    NackGeneratorBuilder::new()
                        .with_interval(NACK_FLOOR)
                        .build(),
                )
                .with(Slot::Custom(14_000), FeedbackTap::default())
                .build();
            let shared = SharedInterceptors::new(Box::new(chain));
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
    Ok(BuiltConnection {
        pc,
        keys,
        interceptors,
    })
}

/// The interceptors of a publisher connection, in the engine's chain and
/// reachable by the room as well.
///
/// The engine binds each inbound stream to them (with the stream's
/// negotiated header extensions and feedback) and sends the RTCP they
/// make. The room decrypts RTP of streams it knows itself, past the
/// engine's generic read path, and hands each packet to the same
/// interceptors, so NACKs, receiver reports and TWCC feedback cover every
/// packet whichever way it came in. Both sides run on the room's thread,
/// one after the other: the lock is never contended.
///
/// Their timers are the room's, not the engine's: the engine sees none
/// (each would wake the room on its own phase and run the engine's whole
/// pipeline), and the room ticks every publisher connection's interceptors
/// together, every [`FEEDBACK_TICK`].
#[derive(Clone)]
pub struct SharedInterceptors(Arc<Mutex<SharedChain>>);

struct SharedChain {
    chain: Box<dyn Interceptor>,
    /// RTCP the chain made while the room fed it, for the engine's next
    /// poll.
    made: VecDeque<TaggedPacket>,
}

/// What feeding one packet to the interceptors gave.
pub struct Fed {
    /// The packet, as it came out of the chain.
    pub packet: Option<rtc::rtp::Packet>,
    /// The chain has timers running, for the room to tick (asked for).
    pub ticking: bool,
}

/// What a tick of the interceptors' timers gave.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ticked {
    /// They made RTCP, waiting for the engine to send it.
    pub made_rtcp: bool,
    /// They still have timers running.
    pub ticking: bool,
}

impl SharedInterceptors {
    fn new(chain: Box<dyn Interceptor>) -> SharedInterceptors {
        SharedInterceptors(Arc::new(Mutex::new(SharedChain {
            chain,
            made: VecDeque::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, SharedChain> {
        // A panic inside an interceptor leaves nothing half-done that the
        // next packet cannot work with.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one inbound RTP packet the room decrypted through the chain.
    /// `ticking`: whether to find out if the chain's timers run (a walk of
    /// the chain, needed only until they do).
    ///
    /// The chain's interceptors make RTCP only on their timers, not on
    /// reading a packet: their output is collected at [`Self::tick`] (and
    /// anything else the engine finds when it next polls the connection).
    pub fn feed(&self, packet: TaggedPacket, ticking: bool) -> Fed {
        let mut inner = self.lock();
        let chain = &mut inner.chain;
        if let Err(e) = chain.handle_read(packet) {
            tracing::trace!(error = %e, "interceptors refused a packet");
        }
        let mut out = None;
        while let Some(p) = chain.poll_read() {
            if let Packet::Rtp(rtp) = p.message.packet {
                out = Some(rtp);
            }
        }
        Fed {
            packet: out,
            ticking: ticking && chain.poll_timeout().is_some(),
        }
    }

    /// Runs the interceptors' timers at the room's tick.
    pub fn tick(&self, now: Instant) -> Ticked {
        let mut inner = self.lock();
        let SharedChain { chain, made } = &mut *inner;
        let Some(due) = chain.poll_timeout() else {
            return Ticked::default();
        };
        if due > now {
            return Ticked {
                made_rtcp: false,
                ticking: true,
            };
        }
        if let Err(e) = chain.handle_timeout(now) {
            tracing::trace!(error = %e, "interceptor timers");
        }
        let before = made.len();
        while let Some(p) = chain.poll_write() {
            made.push_back(p);
        }
        Ticked {
            made_rtcp: made.len() > before,
            ticking: chain.poll_timeout().is_some(),
        }
    }

    /// Whether the interceptors have timers running (they start with a
    /// stream's first packet).
    pub fn ticking(&self) -> bool {
        self.lock().chain.poll_timeout().is_some()
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SharedInterceptors {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = RtcError;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), RtcError> {
        self.lock().chain.handle_read(msg)
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.lock().chain.poll_read()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), RtcError> {
        self.lock().chain.handle_write(msg)
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        let mut inner = self.lock();
        match inner.made.pop_front() {
            Some(p) => Some(p),
            None => inner.chain.poll_write(),
        }
    }

    // The room runs the timers (`tick`); the engine's wakes leave them.
    fn handle_timeout(&mut self, _now: Instant) -> Result<(), RtcError> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }

    fn close(&mut self) -> Result<(), RtcError> {
        self.lock().chain.close()
    }
}

impl Interceptor for SharedInterceptors {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.lock().chain.bind_local_stream(info);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.lock().chain.unbind_local_stream(info);
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.lock().chain.bind_remote_stream(info);
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.lock().chain.unbind_remote_stream(info);
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
