//! A signalling + WebRTC client built on the `webrtc` crate, speaking the
//! server's documented protocol: one per synthetic participant.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rtc::interceptor::Slot;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCPeerConnectionIceEvent, RTCSessionDescription, Registry,
};

use crate::loss::UplinkLoss;
use crate::payload::{self, now_us};
use sfu_core::engine::FeedbackTap;
use sfu_core::engine::{
    opus_codec, vp8_codec, OPUS_PAYLOAD_TYPE as OPUS_PT, VP8_PAYLOAD_TYPE as VP8_PT,
};
use std::sync::atomic::{AtomicBool, Ordering};
use webrtc::media_stream::track_local::TrackLocalEvent;

/// A header extension value that is a plain string (mid, rid).
struct Text(String);

impl rtc::shared::marshal::MarshalSize for Text {
    fn marshal_size(&self) -> usize {
        self.0.len()
    }
}

impl rtc::shared::marshal::Marshal for Text {
    fn marshal_to(&self, buf: &mut [u8]) -> rtc::shared::error::Result<usize> {
        let n = self.0.len();
        buf.get_mut(..n)
            .ok_or(rtc::shared::error::Error::ErrBufferTooSmall)?
            .copy_from_slice(self.0.as_bytes());
        Ok(n)
    }
}

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Largest video payload per packet.
pub const MAX_PAYLOAD: usize = 1100;
/// Opus-sized audio payload.
pub const AUDIO_PAYLOAD: usize = 80;

/// What a client publishes.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions {
    pub publish: bool,
    pub audio_only: bool,
    /// Send video as three simulcast layers (rids q, h, f at 1/16, 1/4 and
    /// the whole of the frame size).
    pub simulcast: bool,
    /// Share of outgoing RTP dropped before the wire (after the sender
    /// buffered it), so the server's NACKs and our retransmissions are
    /// exercised.
    pub uplink_loss: f64,
    /// With simulcast, the layer whose packets carry the measured
    /// sequence (0 q, 1 h, 2 f); the top one if not given. The others are
    /// counted but not measured.
    pub measured_layer: Option<usize>,
}

/// What a subscriber has received, by publisher participant sid.
#[derive(Default, Debug)]
pub struct Inbox {
    pub messages: Vec<serde_json::Value>,
    /// (publisher sid, kind) -> what arrived on that track.
    pub tracks: HashMap<(String, String), TrackInbox>,
    /// Payload bytes received.
    pub bytes: u64,
    /// Track sids of the video tracks received.
    pub video_tracks: Vec<String>,
    /// Packets of simulcast layers not measured.
    pub other_layers: u64,
    /// Sum of all one-way latencies recorded, µs.
    pub latency_sum_us: u64,
    pub corrupted: usize,
    pub open_tracks: HashMap<String, String>,
}

/// What one subscriber received of one publisher's track.
#[derive(Default, Debug)]
pub struct TrackInbox {
    /// Payload sequence numbers of the measured packets.
    pub seqs: Vec<u32>,
    /// One-way latency of each measured packet, µs.
    pub latency_us: Vec<u64>,
    /// When the first measured packet arrived (µs since the Unix epoch).
    pub first_at_us: Option<u64>,
    /// Payload bytes received, all layers.
    pub bytes: u64,
    /// Interarrival jitter of the measured packets (RFC 3550, from the
    /// send times they carry), µs.
    pub jitter: Jitter,
    /// Simulcast layer of the last packet (0 q, 1 h, 2 f), or
    /// [`MEASURED_LAYER`] for the publisher's measured one.
    pub last_layer: Option<u8>,
    /// The first measured sequence number since another simulcast layer
    /// last arrived: loss counts from there, as a layer switch is no loss.
    pub measured_from: Option<u32>,
    /// When that packet arrived (µs since the Unix epoch).
    pub measured_since_us: Option<u64>,
    /// Measured packets received, by the Unix second they were sent in.
    pub by_second: BTreeMap<u64, u32>,
}

/// In [`TrackInbox::last_layer`]: the layer the publisher measures,
/// whichever it is.
pub const MEASURED_LAYER: u8 = u8::MAX;

/// RFC 3550 interarrival jitter over packets' send and arrival times.
#[derive(Default, Debug, Clone, Copy)]
pub struct Jitter {
    last: Option<(u64, u64)>,
    /// The estimate, µs.
    pub value: f64,
}

impl Jitter {
    /// Adds a packet sent at `sent_us` that arrived at `at_us`.
    pub fn add(&mut self, sent_us: u64, at_us: u64) {
        if let Some((sent, at)) = self.last {
            let d = (at_us as f64 - at as f64) - (sent_us as f64 - sent as f64);
            self.value += (d.abs() - self.value) / 16.0;
        }
        self.last = Some((sent_us, at_us));
    }
}

/// Counts a measured packet (kind 0 video, 1 audio) sent at `sent_us`.
fn count_sent(by_second: &mut BTreeMap<u64, [u32; 2]>, sent_us: u64, kind: usize) {
    by_second.entry(sent_us / 1_000_000).or_default()[kind] += 1;
}

pub struct Client {
    pub identity: String,
    pub sid: String,
    pub index: u8,
    ws_tx: mpsc::UnboundedSender<String>,
    pub inbox: Arc<Mutex<Inbox>>,
    publisher: Arc<dyn PeerConnection>,
    subscriber: Arc<dyn PeerConnection>,
    video: Option<Arc<TrackLocalStaticRTP>>,
    audio: Option<Arc<TrackLocalStaticRTP>>,
    /// Frames sent (also the audio sequence).
    seq: u32,
    /// The server asked for a keyframe (PLI/FIR) since the last frame.
    keyframe_wanted: Arc<AtomicBool>,
    /// Video streams: rid (empty without simulcast) and SSRC, lowest first.
    video_ssrcs: Vec<(String, u32)>,
    /// Sequence numbers per simulcast layer.
    layer_seq: Vec<u16>,
    video_seq: u32,
    /// Measured packets sent, video and audio, by the Unix second of their
    /// send time (as their payloads carry it).
    pub sent_by_second: BTreeMap<u64, [u32; 2]>,
    /// With simulcast, the index of the layer measured.
    measured_layer: usize,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Our server's signalling: new sockets for the writer (on reconnect),
    /// the task reading the current socket, and the writer.
    signalling: Option<Signalling>,
    /// Set when the target is Janus VideoRoom.
    janus: Option<JanusPeer>,
}

/// The writer half of a signalling socket.
type WsSink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;
type WsStream = futures::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

struct Signalling {
    sinks: mpsc::UnboundedSender<WsSink>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

/// Queued in place of a message: close the socket normally (a leave).
const CLOSE_SOCKET: &str = "\0close";

/// Writes queued messages to the current socket. Messages queued while
/// there is none (the socket dropped) wait for the next one.
async fn write_signals(
    mut queue: mpsc::UnboundedReceiver<String>,
    mut sinks: mpsc::UnboundedReceiver<WsSink>,
) {
    let mut sink: Option<WsSink> = None;
    let mut pending: Option<String> = None;
    loop {
        let Some(current) = sink.as_mut() else {
            match sinks.recv().await {
                Some(s) => sink = Some(s),
                None => return,
            }
            continue;
        };
        let text = match pending.take() {
            Some(text) => text,
            None => tokio::select! {
                text = queue.recv() => match text {
                    Some(text) => text,
                    None => return,
                },
                fresh = sinks.recv() => {
                    if let Some(fresh) = fresh {
                        sink = Some(fresh);
                    }
                    continue;
                }
            },
        };
        if text == CLOSE_SOCKET {
            let _ = current
                .send(Message::Close(Some(
                    tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                        reason: "".into(),
                    },
                )))
                .await;
            return;
        }
        if current
            .send(Message::Text(text.clone().into()))
            .await
            .is_err()
        {
            pending = Some(text);
            sink = None;
        }
    }
}

/// Reads one signalling socket: applies answers, offers and candidates,
/// keeps every message, and hands `joined`, `reconnected` and `error`
/// messages to `first` (the connect path waits for one of them).
async fn read_signals(
    mut stream: WsStream,
    inbox: Arc<Mutex<Inbox>>,
    publisher: Arc<dyn PeerConnection>,
    subscriber: Arc<dyn PeerConnection>,
    ws_tx: mpsc::UnboundedSender<String>,
    first: mpsc::UnboundedSender<serde_json::Value>,
) {
    while let Some(Ok(Message::Text(text))) = stream.next().await {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        inbox.lock().unwrap().messages.push(v.clone());
        let sdp = v["sdp"].as_str().unwrap_or_default().to_owned();
        match (v["type"].as_str(), v["target"].as_str()) {
            (Some("joined" | "reconnected" | "error"), _) => {
                let _ = first.send(v.clone());
            }
            (Some("answer"), Some("publisher")) => {
                if let Ok(answer) = RTCSessionDescription::answer(sdp) {
                    let _ = publisher.set_remote_description(answer).await;
                }
            }
            (Some("offer"), Some("subscriber")) => {
                let Ok(offer) = RTCSessionDescription::offer(sdp) else {
                    continue;
                };
                if subscriber.set_remote_description(offer).await.is_err() {
                    continue;
                }
                let Ok(answer) = subscriber.create_answer(None).await else {
                    continue;
                };
                if subscriber.set_local_description(answer).await.is_err() {
                    continue;
                }
                if let Some(local) = subscriber.local_description().await {
                    let msg =
                        serde_json::json!({"type":"answer","target":"subscriber","sdp":local.sdp});
                    let _ = ws_tx.send(msg.to_string());
                }
            }
            (Some("candidate"), Some(target)) => {
                let init = candidate_init(&v["candidate"]);
                let pc = if target == "publisher" {
                    &publisher
                } else {
                    &subscriber
                };
                let _ = pc.add_ice_candidate(init).await;
            }
            _ => {}
        }
    }
}

/// The first of `joined`, `reconnected` or `error` on a fresh socket.
async fn first_reply(
    first: &mut mpsc::UnboundedReceiver<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    tokio::time::timeout(Duration::from_secs(10), first.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no reply to the join within 10 s"))?
        .ok_or_else(|| anyhow::anyhow!("signalling closed before the server replied"))
}

/// A client's Janus session and its two VideoRoom handles.
struct JanusPeer {
    session: crate::janus::Session,
    room: u64,
    subscribe_handle: u64,
}

/// Applies candidates Janus trickles for one handle to `pc`, and says when
/// Janus reports the connection up (`webrtcup`).
fn follow_janus_handle(
    pc: Arc<dyn PeerConnection>,
    mut rx: mpsc::UnboundedReceiver<serde_json::Value>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<bool>,
) {
    let (up_tx, up_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            match v["janus"].as_str() {
                Some("trickle") if v["candidate"].get("candidate").is_some() => {
                    let _ = pc.add_ice_candidate(candidate_init(&v["candidate"])).await;
                }
                Some("webrtcup") => {
                    let _ = up_tx.send(true);
                }
                _ => {}
            }
        }
    });
    (task, up_rx)
}

/// Where this client's ICE candidates go: `{candidate, sdpMid,
/// sdpMLineIndex}` in, the target's signalling format out.
type CandidateSink = Box<dyn Fn(serde_json::Value) + Send + Sync>;

struct Trickle {
    send: CandidateSink,
    inbox: Arc<Mutex<Inbox>>,
    receive: bool,
    /// Key received media by the publisher index in the payload rather than
    /// by the track's stream id (targets that do not carry the publisher's
    /// identity in the stream id, such as Janus).
    key_by_index: bool,
}

impl Trickle {
    fn new(
        send: CandidateSink,
        inbox: &Arc<Mutex<Inbox>>,
        receive: bool,
        key_by_index: bool,
    ) -> Arc<Trickle> {
        Arc::new(Trickle {
            send,
            inbox: inbox.clone(),
            receive,
            key_by_index,
        })
    }
}

/// Candidates of a connection the server does not know yet (the publish
/// connection before its first offer went out) wait here; `None` once they
/// flow.
type Held = Arc<Mutex<Option<Vec<String>>>>;

/// Our server's candidate message for one of the two connections; with
/// `held`, kept back until the gate opens.
fn sfu_candidates(
    target: &'static str,
    ws_tx: &mpsc::UnboundedSender<String>,
    held: Option<Held>,
) -> CandidateSink {
    let ws_tx = ws_tx.clone();
    Box::new(move |candidate| {
        let msg =
            serde_json::json!({"type": "candidate", "target": target, "candidate": candidate})
                .to_string();
        if let Some(held) = &held {
            if let Some(queue) = held.lock().unwrap().as_mut() {
                queue.push(msg);
                return;
            }
        }
        let _ = ws_tx.send(msg);
    })
}

/// A candidate as the signalling messages carry it.
fn candidate_init(c: &serde_json::Value) -> RTCIceCandidateInit {
    RTCIceCandidateInit {
        candidate: c["candidate"].as_str().unwrap_or_default().to_owned(),
        sdp_mid: c["sdpMid"].as_str().map(str::to_owned),
        sdp_mline_index: c["sdpMLineIndex"].as_u64().map(|i| i as u16),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Trickle {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            (self.send)(serde_json::json!({
                "candidate": init.candidate, "sdpMid": init.sdp_mid, "sdpMLineIndex": init.sdp_mline_index
            }));
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if !self.receive {
            return;
        }
        let inbox = self.inbox.clone();
        let key_by_index = self.key_by_index;
        tokio::spawn(async move {
            let stream = track.stream_id().await;
            let kind = track.kind().await.to_string();
            let track_id = track.track_id().await;
            {
                let mut inbox = inbox.lock().unwrap();
                if kind == "video" {
                    inbox.video_tracks.push(track_id.clone());
                }
                inbox.open_tracks.insert(track_id, stream.clone());
            }
            // The key this track's packets are counted under, made once
            // (again only if a Janus track's publisher index changes).
            let mut key: Option<(u8, (String, String))> = None;
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    let now = now_us();
                    let Some(tag) = payload::parse(&packet.payload) else {
                        inbox.lock().unwrap().corrupted += 1;
                        continue;
                    };
                    let index = if key_by_index { tag.index } else { 0 };
                    let key = match &key {
                        Some((i, k)) if *i == index => k,
                        _ => {
                            let name = if key_by_index {
                                tag.index.to_string()
                            } else {
                                stream.clone()
                            };
                            &key.insert((index, (name, kind.clone()))).1
                        }
                    };
                    let mut guard = inbox.lock().unwrap();
                    let inbox = &mut *guard;
                    if !inbox.tracks.contains_key(key) {
                        inbox.tracks.insert(key.clone(), TrackInbox::default());
                    }
                    let Some(t) = inbox.tracks.get_mut(key) else {
                        continue;
                    };
                    let bytes = packet.payload.len() as u64;
                    t.bytes += bytes;
                    if tag.kind >= payload::LOWER_LAYER {
                        // A simulcast layer the publisher does not measure.
                        inbox.other_layers += 1;
                        t.last_layer = Some(tag.kind - payload::LOWER_LAYER);
                        continue;
                    }
                    if tag.kind == 0 && t.last_layer.replace(MEASURED_LAYER) != Some(MEASURED_LAYER)
                    {
                        t.measured_from = Some(tag.seq);
                        t.measured_since_us = Some(now);
                    }
                    *t.by_second.entry(tag.sent_us / 1_000_000).or_default() += 1;
                    inbox.bytes += bytes;
                    t.jitter.add(tag.sent_us, now);
                    t.first_at_us.get_or_insert(now);
                    let latency = now.saturating_sub(tag.sent_us);
                    inbox.latency_sum_us += latency;
                    t.latency_us.push(latency);
                    t.seqs.push(tag.seq);
                }
            }
        });
    }
}

/// ICE servers for a client's connections, and whether to use relays
/// only (`iceTransportPolicy: "relay"`).
#[derive(Debug, Clone, Default)]
pub struct IceSettings {
    /// (urls, username, credential)
    pub servers: Vec<(Vec<String>, String, String)>,
    pub relay_only: bool,
    /// Address the connections' sockets bind to (default: loopback).
    pub bind_ip: Option<std::net::IpAddr>,
}

async fn peer(
    handler: Arc<Trickle>,
    uplink_loss: f64,
    seed: u64,
    bind_ip: std::net::IpAddr,
    ice: &IceSettings,
) -> Arc<dyn PeerConnection> {
    let mut engine = MediaEngine::default();
    engine
        .register_codec(
            rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters {
                rtp_codec: vp8_codec(),
                payload_type: 96,
            },
            RtpCodecKind::Video,
        )
        .unwrap();
    engine
        .register_codec(
            rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: 111,
            },
            RtpCodecKind::Audio,
        )
        .unwrap();
    let mut registry = register_default_interceptors(Registry::new(), &mut engine)
        .unwrap()
        // Keyframe requests reach the application, which answers them.
        .with(Slot::Custom(14_000), FeedbackTap::default());
    if uplink_loss > 0.0 {
        registry = registry.with(Slot::Custom(500), UplinkLoss::new(uplink_loss, seed));
    }
    let mut configuration = RTCConfigurationBuilder::new().with_ice_servers(
        ice.servers
            .iter()
            .map(
                |(urls, username, credential)| webrtc::peer_connection::RTCIceServer {
                    urls: urls.clone(),
                    username: username.clone(),
                    credential: credential.clone(),
                },
            )
            .collect(),
    );
    if ice.relay_only {
        configuration = configuration
            .with_ice_transport_policy(webrtc::peer_connection::RTCIceTransportPolicy::Relay);
    }
    // No mDNS: the load tester never resolves `.local` candidates, and its
    // multicast socket cannot join where there is no multicast route (a
    // network namespace with no default route).
    let settings = webrtc::peer_connection::SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(configuration.build())
        .with_setting_engine(settings)
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec![std::net::SocketAddr::new(bind_ip, 0).to_string()])
        .build()
        .await
        .expect("peer connection");
    Arc::new(pc)
}

/// Simulcast rids, lowest first, and each layer's share of the frame size.
const LAYERS: [(&str, usize); 3] = [("q", 16), ("h", 4), ("f", 1)];

fn local_track(
    kind: RtpCodecKind,
    identity: &str,
    ssrcs: &[(String, u32)],
) -> Arc<TrackLocalStaticRTP> {
    let codec = match kind {
        RtpCodecKind::Video => vp8_codec(),
        _ => opus_codec(),
    };
    let codings = ssrcs
        .iter()
        .map(|(rid, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: rid.clone(),
                ssrc: Some(*ssrc),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        })
        .collect();
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("{identity}-stream"),
        format!("{identity}-{kind}"),
        format!("{identity}-{kind}"),
        kind,
        codings,
    )))
}

/// A read-only handle on what a client received.
#[derive(Clone)]
pub struct View {
    pub sid: String,
    pub identity: String,
    pub inbox: Arc<Mutex<Inbox>>,
}

impl View {
    pub fn received(&self, publisher_sid: &str, kind: &str) -> Vec<u32> {
        self.inbox
            .lock()
            .unwrap()
            .tracks
            .get(&(publisher_sid.to_owned(), kind.to_owned()))
            .map(|t| t.seqs.clone())
            .unwrap_or_default()
    }

    pub fn has_message(&self, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
        self.inbox.lock().unwrap().messages.iter().any(pred)
    }

    pub fn messages_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.inbox
            .lock()
            .unwrap()
            .messages
            .iter()
            .filter(|m| m["type"] == kind)
            .cloned()
            .collect()
    }
}

impl Client {
    pub fn view(&self) -> View {
        View {
            sid: self.sid.clone(),
            identity: self.identity.clone(),
            inbox: self.inbox.clone(),
        }
    }

    pub fn seq_now(&self) -> u32 {
        self.seq
    }

    /// Connects to `ws_base` (`ws://host:port`) with a join token, waits for
    /// `joined`, and if `publish.publish` offers a VP8 and an Opus track.
    pub async fn join(
        ws_base: &str,
        token: &str,
        identity: &str,
        index: u8,
        publish: PublishOptions,
    ) -> anyhow::Result<Client> {
        Self::join_with_ice(
            ws_base,
            token,
            identity,
            index,
            publish,
            &IceSettings::default(),
        )
        .await
    }

    /// [`Client::join`] with ICE servers (TURN, say) for both connections.
    pub async fn join_with_ice(
        ws_base: &str,
        token: &str,
        identity: &str,
        index: u8,
        publish: PublishOptions,
        ice: &IceSettings,
    ) -> anyhow::Result<Client> {
        let url = format!("{ws_base}/v1/rtc?access_token={token}");
        let (ws, _) = crate::tls::connect(url).await?;
        let (sink, stream) = ws.split();
        let (ws_tx, ws_rx) = mpsc::unbounded_channel::<String>();
        let (sinks, sinks_rx) = mpsc::unbounded_channel::<WsSink>();
        let _ = sinks.send(sink);
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let writer = tokio::spawn(write_signals(ws_rx, sinks_rx));
        // The server learns of the publish connection from its first
        // offer: candidates gathered before it went out wait for it.
        let held: Held = Arc::new(Mutex::new(Some(Vec::new())));
        let publisher = peer(
            Trickle::new(
                sfu_candidates("publisher", &ws_tx, Some(held.clone())),
                &inbox,
                false,
                false,
            ),
            publish.uplink_loss,
            index as u64 + 1,
            ice.bind_ip.unwrap_or(LOOPBACK),
            ice,
        )
        .await;
        let subscriber = peer(
            Trickle::new(
                sfu_candidates("subscriber", &ws_tx, None),
                &inbox,
                true,
                false,
            ),
            0.0,
            0,
            ice.bind_ip.unwrap_or(LOOPBACK),
            ice,
        )
        .await;
        let (first_tx, mut first_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_signals(
            stream,
            inbox.clone(),
            publisher.clone(),
            subscriber.clone(),
            ws_tx.clone(),
            first_tx,
        ));
        let first = first_reply(&mut first_rx).await?;
        if first["type"] != "joined" {
            anyhow::bail!("join refused: {first}");
        }
        let sid = first["participant"]["sid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();

        let mut client = Client::assemble(
            identity,
            sid,
            index,
            ws_tx,
            inbox,
            (publisher, subscriber),
            Vec::new(),
        );
        client.signalling = Some(Signalling {
            sinks,
            reader,
            writer,
        });
        if publish.publish {
            let sdp = client.offer_tracks(publish).await?;
            client.send(serde_json::json!({"type":"offer","target":"publisher","sdp":sdp}));
        }
        // The offer is queued ahead of them: let the candidates go.
        let queued = held.lock().unwrap().take().unwrap_or_default();
        for msg in queued {
            client.send_raw(&msg);
        }
        Ok(client)
    }

    /// A client with its connections set up and nothing published yet.
    fn assemble(
        identity: &str,
        sid: String,
        index: u8,
        ws_tx: mpsc::UnboundedSender<String>,
        inbox: Arc<Mutex<Inbox>>,
        (publisher, subscriber): (Arc<dyn PeerConnection>, Arc<dyn PeerConnection>),
        tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Client {
        Client {
            identity: identity.to_owned(),
            sid,
            index,
            ws_tx,
            inbox,
            publisher,
            subscriber,
            video: None,
            audio: None,
            seq: 0,
            video_seq: 0,
            sent_by_second: BTreeMap::new(),
            measured_layer: LAYERS.len() - 1,
            keyframe_wanted: Arc::new(AtomicBool::new(false)),
            video_ssrcs: Vec::new(),
            layer_seq: vec![0; LAYERS.len()],
            tasks,
            signalling: None,
            janus: None,
        }
    }

    /// Resumes this participant session over a new signalling socket
    /// (`reconnect=1&sid=...`), as a client does after its socket dropped;
    /// returns the server's `reconnected` message. Messages sent meanwhile
    /// go out on the new socket.
    pub async fn reconnect(
        &mut self,
        ws_base: &str,
        token: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let signalling = self
            .signalling
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("only clients of our server reconnect"))?;
        signalling.reader.abort();
        let url = format!(
            "{ws_base}/v1/rtc?access_token={token}&reconnect=1&sid={}",
            self.sid
        );
        let (ws, _) = crate::tls::connect(url).await?;
        let (sink, stream) = ws.split();
        let (first_tx, mut first_rx) = mpsc::unbounded_channel();
        signalling.reader = tokio::spawn(read_signals(
            stream,
            self.inbox.clone(),
            self.publisher.clone(),
            self.subscriber.clone(),
            self.ws_tx.clone(),
            first_tx,
        ));
        let first = first_reply(&mut first_rx).await?;
        if first["type"] != "reconnected" {
            anyhow::bail!("resume refused: {first}");
        }
        let _ = signalling.sinks.send(sink);
        Ok(first)
    }

    /// The local candidate of each connection's selected pair (publisher,
    /// subscriber) as `type/protocol`, `relay/udp` say; `None` while a
    /// connection has none.
    pub async fn selected_paths(&self) -> (Option<String>, Option<String>) {
        async fn path(pc: &Arc<dyn PeerConnection>) -> Option<String> {
            use rtc::statistics::report::RTCStatsReportEntry;
            let report = pc
                .get_stats(
                    std::time::Instant::now(),
                    rtc::statistics::StatsSelector::None,
                )
                .await;
            let pair = report.candidate_pairs().find(|p| {
                p.nominated
                    && p.state
                        == rtc::statistics::stats::ice_candidate_pair::RTCStatsIceCandidatePairState::Succeeded
            })?;
            // The pair names its local candidate without the prefix the
            // candidate's own entry has: match on the end of the id.
            let found = report.iter().find_map(|entry| match entry {
                RTCStatsReportEntry::LocalCandidate(c)
                    if c.stats.id.ends_with(pair.local_candidate_id.as_str()) =>
                {
                    let kind = c.candidate_type.to_string();
                    // The way to the relay, where the stats say (this
                    // client's TURN is over UDP when they do not).
                    let relay = format!("{:?}", c.relay_protocol).to_lowercase();
                    let protocol = if kind == "relay" && relay != "unspecified" {
                        relay
                    } else {
                        c.protocol.to_lowercase()
                    };
                    Some(format!("{kind}/{protocol}"))
                }
                _ => None,
            });
            found
        }
        (path(&self.publisher).await, path(&self.subscriber).await)
    }

    /// Asks the server to restart ICE on the subscribe connection (it
    /// sends a new offer with fresh credentials).
    pub fn restart_subscriber_ice(&self) {
        self.send(serde_json::json!({"type": "restartIce"}));
    }

    /// Restarts ICE on the publish connection: a new offer with fresh
    /// credentials, as after a change of network.
    pub async fn restart_ice(&self) -> anyhow::Result<()> {
        let offer = self
            .publisher
            .create_offer(Some(rtc::peer_connection::configuration::RTCOfferOptions {
                ice_restart: true,
            }))
            .await?;
        self.publisher.set_local_description(offer).await?;
        let sdp = self
            .publisher
            .local_description()
            .await
            .ok_or_else(|| anyhow::anyhow!("no local description"))?
            .sdp;
        self.send(serde_json::json!({"type":"offer","target":"publisher","sdp":sdp}));
        Ok(())
    }

    /// Adds the synthetic video (unless audio only) and audio tracks to the
    /// publish connection and returns its offer.
    async fn offer_tracks(&mut self, publish: PublishOptions) -> anyhow::Result<String> {
        let (identity, index) = (self.identity.clone(), self.index);
        let client = self;
        let video_ssrcs: Vec<(String, u32)> = if publish.simulcast {
            LAYERS
                .iter()
                .enumerate()
                .map(|(i, (rid, _))| (rid.to_string(), 0x1000 + 0x100 * i as u32 + index as u32))
                .collect()
        } else {
            vec![(String::new(), 0x1000 + index as u32)]
        };
        let video = local_track(RtpCodecKind::Video, &identity, &video_ssrcs);
        let audio = local_track(
            RtpCodecKind::Audio,
            &identity,
            &[(String::new(), 0x2000 + index as u32)],
        );
        client.video_ssrcs = video_ssrcs;
        client.measured_layer = publish
            .measured_layer
            .unwrap_or(LAYERS.len() - 1)
            .min(LAYERS.len() - 1);
        if !publish.audio_only {
            client
                .publisher
                .add_track(video.clone() as Arc<dyn TrackLocal>)
                .await?;
            // Answer keyframe requests as an encoder would.
            let wanted = client.keyframe_wanted.clone();
            let track = video.clone();
            client.tasks.push(tokio::spawn(async move {
                while let Some(event) = track.poll().await {
                    if let TrackLocalEvent::OnRtcpPacket(packets) = event {
                        let pli = packets.iter().any(|p| {
                            let any = p.as_any();
                            any.is::<rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>()
                                || any.is::<rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest>()
                        });
                        if pli {
                            wanted.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }));
            client.video = Some(video);
        }
        client
            .publisher
            .add_track(audio.clone() as Arc<dyn TrackLocal>)
            .await?;
        client.audio = Some(audio);
        let offer = client.publisher.create_offer(None).await?;
        client.publisher.set_local_description(offer).await?;
        Ok(client
            .publisher
            .local_description()
            .await
            .ok_or_else(|| anyhow::anyhow!("no local description"))?
            .sdp)
    }

    /// Joins Janus VideoRoom `room` at `url` (`ws://host:port`) with its own
    /// session, and if `publish.publish` publishes VP8 and Opus as feed
    /// `feed`. Received media is keyed by publisher index (this client's
    /// `sid` is its index). Its connections use host candidates on
    /// `bind_ip`: Janus (libnice) gathers no loopback candidates, so that
    /// must be an address of an interface Janus uses.
    #[allow(clippy::too_many_arguments)]
    pub async fn join_janus(
        url: &str,
        bind_ip: std::net::IpAddr,
        room: u64,
        identity: &str,
        index: u8,
        feed: u64,
        publish: PublishOptions,
    ) -> anyhow::Result<Client> {
        anyhow::ensure!(
            !publish.simulcast,
            "simulcast is not supported with the Janus target"
        );
        let session = crate::janus::Session::connect(url).await?;
        let (publish_handle, publish_trickles) = session.attach().await?;
        let (subscribe_handle, subscribe_trickles) = session.attach().await?;
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let publisher = peer(
            Trickle::new(
                Box::new(session.trickler(publish_handle)),
                &inbox,
                false,
                true,
            ),
            publish.uplink_loss,
            index as u64 + 1,
            bind_ip,
            &IceSettings::default(),
        )
        .await;
        let subscriber = peer(
            Trickle::new(
                Box::new(session.trickler(subscribe_handle)),
                &inbox,
                true,
                true,
            ),
            0.0,
            0,
            bind_ip,
            &IceSettings::default(),
        )
        .await;
        let (publish_task, mut publish_up) =
            follow_janus_handle(publisher.clone(), publish_trickles);
        let (subscribe_task, _) = follow_janus_handle(subscriber.clone(), subscribe_trickles);
        let tasks = vec![publish_task, subscribe_task];
        // A publisher is known by its index, which its payloads carry; a
        // receiver's name must not be one (the index wraps past 255).
        let sid = if publish.publish {
            index.to_string()
        } else {
            format!("receiver {identity}")
        };
        let mut client = Client::assemble(
            identity,
            sid,
            index,
            // Nothing is sent in our protocol to Janus.
            mpsc::unbounded_channel().0,
            inbox,
            (publisher, subscriber),
            tasks,
        );
        if publish.publish {
            let (joined, _) = session
                .message(
                    publish_handle,
                    serde_json::json!({
                        "request": "join", "ptype": "publisher", "room": room,
                        "id": feed, "display": identity,
                    }),
                    None,
                )
                .await?;
            anyhow::ensure!(
                joined["videoroom"] == "joined",
                "joining Janus room {room}: {joined}"
            );
            let sdp = client.offer_tracks(publish).await?;
            let (_, answer) = session
                .message(
                    publish_handle,
                    serde_json::json!({"request": "publish"}),
                    Some(serde_json::json!({"type": "offer", "sdp": sdp})),
                )
                .await?;
            let answer = answer
                .and_then(|j| j["sdp"].as_str().map(str::to_owned))
                .ok_or_else(|| anyhow::anyhow!("Janus sent no answer to the publish offer"))?;
            client
                .publisher
                .set_remote_description(RTCSessionDescription::answer(answer)?)
                .await?;
            // Janus lets subscribers attach to a feed only once its
            // connection is up.
            tokio::time::timeout(Duration::from_secs(10), publish_up.wait_for(|up| *up))
                .await
                .map_err(|_| anyhow::anyhow!("Janus publish connection not up within 10 s"))??;
        }
        client.janus = Some(JanusPeer {
            session,
            room,
            subscribe_handle,
        });
        Ok(client)
    }

    /// Subscribes to Janus feeds (all on one connection): Janus offers,
    /// this client answers and starts.
    pub async fn subscribe_janus(&self, feeds: &[u64]) -> anyhow::Result<()> {
        let janus = self
            .janus
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not a Janus client"))?;
        let streams: Vec<serde_json::Value> = feeds
            .iter()
            .map(|f| serde_json::json!({"feed": f}))
            .collect();
        let (attached, offer) = janus
            .session
            .message(
                janus.subscribe_handle,
                serde_json::json!({
                    "request": "join", "ptype": "subscriber", "room": janus.room,
                    "streams": streams,
                }),
                None,
            )
            .await?;
        let offer = offer
            .and_then(|j| j["sdp"].as_str().map(str::to_owned))
            .ok_or_else(|| anyhow::anyhow!("Janus sent no subscriber offer: {attached}"))?;
        self.subscriber
            .set_remote_description(RTCSessionDescription::offer(offer)?)
            .await?;
        let answer = self.subscriber.create_answer(None).await?;
        self.subscriber.set_local_description(answer).await?;
        let sdp = self
            .subscriber
            .local_description()
            .await
            .ok_or_else(|| anyhow::anyhow!("no local description"))?
            .sdp;
        let (started, _) = janus
            .session
            .message(
                janus.subscribe_handle,
                serde_json::json!({"request": "start"}),
                Some(serde_json::json!({"type": "answer", "sdp": sdp})),
            )
            .await?;
        anyhow::ensure!(
            started["started"] == "ok",
            "starting Janus subscription: {started}"
        );
        Ok(())
    }

    pub fn send(&self, v: serde_json::Value) {
        let _ = self.ws_tx.send(v.to_string());
    }

    pub fn send_raw(&self, text: &str) {
        let _ = self.ws_tx.send(text.to_owned());
    }

    /// Sends one video frame of `video_bytes` (split into packets of at
    /// most 1100 bytes; a keyframe every `keyframe_every` frames) and one
    /// audio packet. Every payload carries this client's index, a sequence
    /// number and the send time.
    pub async fn send_media(&mut self, video_bytes: usize, keyframe_every: u32) {
        self.seq += 1;
        let frame = self.seq;
        if let Some(track) = &self.video {
            let keyframe = (keyframe_every > 0 && frame % keyframe_every == 1)
                || self.keyframe_wanted.swap(false, Ordering::Relaxed);
            let simulcast = self.video_ssrcs.len() > 1;
            for (layer, (rid, ssrc)) in self.video_ssrcs.iter().enumerate() {
                let share = if simulcast { LAYERS[layer].1 } else { 1 };
                let bytes = video_bytes / share;
                let packets = bytes.div_ceil(MAX_PAYLOAD).max(1);
                for i in 0..packets {
                    // One layer (the only one, unless simulcast) is measured.
                    let measured = !simulcast || layer == self.measured_layer;
                    if measured {
                        self.video_seq = self.video_seq.wrapping_add(1);
                    }
                    self.layer_seq[layer] = self.layer_seq[layer].wrapping_add(1);
                    let size = (bytes / packets).max(payload::HEADER + 1);
                    let sent_us = now_us();
                    if measured {
                        count_sent(&mut self.sent_by_second, sent_us, 0);
                    }
                    let body = payload::build(
                        payload::Tag {
                            index: self.index,
                            seq: if measured { self.video_seq } else { 0 },
                            kind: if measured {
                                0
                            } else {
                                payload::LOWER_LAYER + layer as u8
                            },
                            keyframe,
                            frame_start: i == 0,
                            sent_us,
                        },
                        size,
                    );
                    let packet = rtc::rtp::Packet {
                        header: rtc::rtp::Header {
                            version: 2,
                            marker: i + 1 == packets,
                            payload_type: VP8_PT,
                            sequence_number: self.layer_seq[layer],
                            timestamp: frame.wrapping_mul(3000),
                            ssrc: *ssrc,
                            ..Default::default()
                        },
                        payload: Bytes::from(body),
                    };
                    if simulcast {
                        // Layers are told apart by the mid and rid
                        // extensions, as a browser sends them.
                        let ext = |uri: &'static str, value: &str| HeaderExtension::Custom {
                            uri: uri.into(),
                            extension: Box::new(Text(value.to_owned())),
                        };
                        let _ = track
                            .write_rtp_with_extensions(
                                packet,
                                &[
                                    ext("urn:ietf:params:rtp-hdrext:sdes:mid", "0"),
                                    ext("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id", rid),
                                ],
                            )
                            .await;
                    } else {
                        let _ = track.write_rtp(packet).await;
                    }
                }
            }
        }
        if self.audio.is_some() {
            let sent_us = now_us();
            count_sent(&mut self.sent_by_second, sent_us, 1);
            let body = payload::build(
                payload::Tag {
                    index: self.index,
                    seq: frame,
                    kind: 1,
                    keyframe: false,
                    frame_start: true,
                    sent_us,
                },
                AUDIO_PAYLOAD,
            );
            let packet = rtc::rtp::Packet {
                header: rtc::rtp::Header {
                    version: 2,
                    marker: true,
                    payload_type: OPUS_PT,
                    sequence_number: frame as u16,
                    timestamp: frame.wrapping_mul(960),
                    ssrc: 0x2000 + self.index as u32,
                    ..Default::default()
                },
                payload: Bytes::from(body),
            };
            if let Some(track) = &self.audio {
                let _ = track.write_rtp(packet).await;
            }
        }
    }

    /// Video packets sent so far.
    pub fn video_packets_sent(&self) -> u32 {
        self.video_seq
    }

    pub async fn close(self) {
        if let Some(signalling) = self.signalling {
            // Leave, then close the socket normally.
            let _ = self
                .ws_tx
                .send(serde_json::json!({"type": "leave"}).to_string());
            let _ = self.ws_tx.send(CLOSE_SOCKET.to_owned());
            let _ = tokio::time::timeout(Duration::from_secs(2), signalling.writer).await;
            signalling.reader.abort();
        }
        let _ = self.publisher.close().await;
        let _ = self.subscriber.close().await;
        if let Some(janus) = self.janus {
            janus.session.close().await;
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod jitter_tests {
    use super::Jitter;

    #[test]
    fn steady_delay_is_no_jitter_and_alternating_delay_is() {
        let mut steady = Jitter::default();
        let mut alternating = Jitter::default();
        for i in 0..200u64 {
            let sent = 1_000_000 + i * 20_000;
            steady.add(sent, sent + 5_000);
            // 1 ms and 3 ms of delay in turn: each gap is 2 ms off.
            alternating.add(sent, sent + if i % 2 == 0 { 1_000 } else { 3_000 });
        }
        assert_eq!(steady.value, 0.0);
        assert!(
            (alternating.value - 2_000.0).abs() < 1.0,
            "{}",
            alternating.value
        );
    }
}
