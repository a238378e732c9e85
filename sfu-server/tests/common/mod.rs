//! A signalling + WebRTC client built on the `webrtc` crate, speaking the
//! documented protocol to a real server on loopback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use sfu_server::config::Config;
use sfu_server::RunningServer;
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

pub const PAYLOAD_FILL: u8 = 0xCD;

pub fn test_config() -> Config {
    Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        media_addr: "127.0.0.1:0".parse().unwrap(),
        public_ip: None,
        api_key: None,
        api_secret: None,
        empty_room_timeout: 300,
        max_participants: 0,
        web_dir: None,
        log: "warn".into(),
    }
}

pub async fn start_server() -> RunningServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    sfu_server::start(&test_config())
        .await
        .expect("server starts")
}

pub fn join_token(server: &RunningServer, room: &str, identity: &str) -> String {
    let claims = sfu_server::auth::join_claims(&server.keys, room, identity, identity, 600);
    server.keys.sign(&claims)
}

/// Polls `cond` until it holds or `limit` passes.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a subscriber has received, by publisher participant sid.
#[derive(Default, Debug)]
pub struct Inbox {
    pub messages: Vec<serde_json::Value>,
    /// (publisher sid, kind) -> payload sequence numbers received.
    pub media: HashMap<(String, String), Vec<u32>>,
    pub corrupted: usize,
    pub open_tracks: HashMap<String, String>,
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
    seq: u32,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Trickle {
    target: &'static str,
    ws_tx: mpsc::UnboundedSender<String>,
    inbox: Arc<Mutex<Inbox>>,
    receive: bool,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Trickle {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let msg = serde_json::json!({
                "type": "candidate", "target": self.target,
                "candidate": {"candidate": init.candidate, "sdpMid": init.sdp_mid, "sdpMLineIndex": init.sdp_mline_index}
            });
            let _ = self.ws_tx.send(msg.to_string());
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if !self.receive {
            return;
        }
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let stream = track.stream_id().await;
            let kind = track.kind().await.to_string();
            let track_id = track.track_id().await;
            inbox
                .lock()
                .unwrap()
                .open_tracks
                .insert(track_id, stream.clone());
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    let p = &packet.payload;
                    let mut inbox = inbox.lock().unwrap();
                    if p.len() != 108 || p[8..].iter().any(|b| *b != PAYLOAD_FILL) {
                        inbox.corrupted += 1;
                        continue;
                    }
                    let seq = u32::from_be_bytes([p[3], p[4], p[5], p[6]]);
                    inbox
                        .media
                        .entry((stream.clone(), kind.clone()))
                        .or_default()
                        .push(seq);
                }
            }
        });
    }
}

async fn peer(handler: Arc<Trickle>) -> Arc<dyn PeerConnection> {
    let mut engine = MediaEngine::default();
    engine
        .register_codec(
            rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters {
                rtp_codec: sfu_core::engine::vp8_codec(),
                payload_type: 96,
            },
            RtpCodecKind::Video,
        )
        .unwrap();
    engine
        .register_codec(
            rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters {
                rtp_codec: sfu_core::engine::opus_codec(),
                payload_type: 111,
            },
            RtpCodecKind::Audio,
        )
        .unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut engine).unwrap();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await
        .expect("peer connection");
    Arc::new(pc)
}

fn local_track(kind: RtpCodecKind, identity: &str, ssrc: u32) -> Arc<TrackLocalStaticRTP> {
    let codec = match kind {
        RtpCodecKind::Video => sfu_core::engine::vp8_codec(),
        _ => sfu_core::engine::opus_codec(),
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("{identity}-stream"),
        format!("{identity}-{kind}"),
        format!("{identity}-{kind}"),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
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
            .media
            .get(&(publisher_sid.to_owned(), kind.to_owned()))
            .cloned()
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

    /// Connects, waits for `joined`, and if `publish` offers a VP8 and an
    /// Opus track.
    pub async fn join(
        server: &RunningServer,
        room: &str,
        identity: &str,
        index: u8,
        publish: bool,
    ) -> Client {
        let url = format!(
            "ws://{}/v1/rtc?access_token={}",
            server.http_addr,
            join_token(server, room, identity)
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        let (mut sink, mut stream) = ws.split();
        let (ws_tx, mut ws_rx) = mpsc::unbounded_channel::<String>();
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let writer = tokio::spawn(async move {
            while let Some(text) = ws_rx.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let publisher = peer(Arc::new(Trickle {
            target: "publisher",
            ws_tx: ws_tx.clone(),
            inbox: inbox.clone(),
            receive: false,
        }))
        .await;
        let subscriber = peer(Arc::new(Trickle {
            target: "subscriber",
            ws_tx: ws_tx.clone(),
            inbox: inbox.clone(),
            receive: true,
        }))
        .await;

        // Reader: apply answers/offers/candidates, keep every message.
        let (joined_tx, mut joined_rx) = mpsc::unbounded_channel::<String>();
        let reader = {
            let inbox = inbox.clone();
            let publisher = publisher.clone();
            let subscriber = subscriber.clone();
            let ws_tx = ws_tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(Message::Text(text))) = stream.next().await {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                        continue;
                    };
                    inbox.lock().unwrap().messages.push(v.clone());
                    let sdp = v["sdp"].as_str().unwrap_or_default().to_owned();
                    match (v["type"].as_str(), v["target"].as_str()) {
                        (Some("joined"), _) => {
                            let _ = joined_tx.send(
                                v["participant"]["sid"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                            );
                        }
                        (Some("answer"), Some("publisher")) => {
                            publisher
                                .set_remote_description(RTCSessionDescription::answer(sdp).unwrap())
                                .await
                                .expect("apply publisher answer");
                        }
                        (Some("offer"), Some("subscriber")) => {
                            subscriber
                                .set_remote_description(RTCSessionDescription::offer(sdp).unwrap())
                                .await
                                .expect("apply subscriber offer");
                            let answer = subscriber.create_answer(None).await.unwrap();
                            subscriber.set_local_description(answer).await.unwrap();
                            let sdp = subscriber.local_description().await.unwrap().sdp;
                            let msg = serde_json::json!({"type":"answer","target":"subscriber","sdp":sdp});
                            let _ = ws_tx.send(msg.to_string());
                        }
                        (Some("candidate"), Some(target)) => {
                            let c = &v["candidate"];
                            let init = RTCIceCandidateInit {
                                candidate: c["candidate"].as_str().unwrap_or_default().to_owned(),
                                sdp_mid: c["sdpMid"].as_str().map(str::to_owned),
                                sdp_mline_index: c["sdpMLineIndex"].as_u64().map(|i| i as u16),
                                ..Default::default()
                            };
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
            })
        };
        let sid = tokio::time::timeout(Duration::from_secs(5), joined_rx.recv())
            .await
            .expect("joined within 5 s")
            .expect("joined");

        let mut client = Client {
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
            tasks: vec![writer, reader],
        };
        if publish {
            let video = local_track(RtpCodecKind::Video, identity, 0x1000 + index as u32);
            let audio = local_track(RtpCodecKind::Audio, identity, 0x2000 + index as u32);
            client
                .publisher
                .add_track(video.clone() as Arc<dyn TrackLocal>)
                .await
                .unwrap();
            client
                .publisher
                .add_track(audio.clone() as Arc<dyn TrackLocal>)
                .await
                .unwrap();
            let offer = client.publisher.create_offer(None).await.unwrap();
            client.publisher.set_local_description(offer).await.unwrap();
            let sdp = client.publisher.local_description().await.unwrap().sdp;
            client.send(serde_json::json!({"type":"offer","target":"publisher","sdp":sdp}));
            client.video = Some(video);
            client.audio = Some(audio);
        }
        client
    }

    pub fn send(&self, v: serde_json::Value) {
        let _ = self.ws_tx.send(v.to_string());
    }

    pub fn send_raw(&self, text: &str) {
        let _ = self.ws_tx.send(text.to_owned());
    }

    /// Sends one VP8 and one Opus packet whose payload carries this
    /// client's index and a sequence number.
    pub async fn send_media(&mut self) {
        self.seq += 1;
        let seq = self.seq;
        for (i, track) in [&self.video, &self.audio].into_iter().enumerate() {
            let Some(track) = track else { continue };
            // VP8 descriptor (start of frame) and frame tag: a keyframe
            // every 10 frames. Then index, sequence, kind and a fixed body.
            let tag = if seq % 10 == 1 { 0x10 } else { 0x11 };
            let mut payload = vec![0x10, tag, self.index];
            payload.extend_from_slice(&seq.to_be_bytes());
            payload.push(i as u8);
            payload.extend_from_slice(&[PAYLOAD_FILL; 100]);
            let packet = rtc::rtp::Packet {
                header: rtc::rtp::Header {
                    version: 2,
                    marker: true,
                    payload_type: if i == 0 { 96 } else { 111 },
                    sequence_number: seq as u16,
                    timestamp: seq * 3000,
                    ssrc: 0x1000 * (i as u32 + 1) + self.index as u32,
                    ..Default::default()
                },
                payload: Bytes::from(payload),
            };
            let _ = track.write_rtp(packet).await;
        }
    }

    pub async fn close(self) {
        let _ = self.publisher.close().await;
        let _ = self.subscriber.close().await;
        for t in self.tasks {
            t.abort();
        }
    }
}
