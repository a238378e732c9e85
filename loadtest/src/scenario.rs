//! A run: rooms, publishers and subscribers, media for a while, then the
//! figures.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use crate::client::{Client, PublishOptions, MEASURED_LAYER};

/// Which server the scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// This project's server, over its REST and WebSocket API.
    #[default]
    Sfu,
    /// Janus VideoRoom over Janus's WebSocket API (`url` is then
    /// `ws://host:port` of Janus's WebSocket transport), for side-by-side
    /// comparison.
    Janus,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub target: Target,
    /// `http://host:port` of the server (`ws://host:port` for Janus).
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
    pub rooms: usize,
    /// Per room; each also receives the others.
    pub publishers: usize,
    /// Per room, receive only.
    pub subscribers: usize,
    pub duration: Duration,
    /// Video bits per second per publisher.
    pub video_bitrate: u64,
    pub fps: u32,
    pub audio_only: bool,
    /// Publish video as three simulcast layers (the top one is measured).
    pub simulcast: bool,
    pub uplink_loss: f64,
    /// Seconds between joins (0: all at once).
    pub ramp: Duration,
    /// Janus only: the address clients bind their media sockets to
    /// (default: [`crate::janus::local_ip`]).
    pub bind_ip: Option<std::net::IpAddr>,
    /// With simulcast: every receiver asks for this quality of every video
    /// track (`updateSubscription`), as a grid of thumbnails does, and
    /// that layer is the one measured. `None`: the server's choice, the
    /// top layer measured.
    pub subscriber_quality: Option<Quality>,
    /// Join (or create) the rooms `PREFIX-0`, `PREFIX-1`, ... instead of
    /// fresh ones, with identities of this run's own: load testers on
    /// several machines then share rooms, each measuring loss and latency
    /// of its own publishers. This server only.
    pub room_prefix: Option<String>,
    /// Publishers send their frames spread over the frame interval, as
    /// browsers out of step with each other do, instead of all on one
    /// tick.
    pub spread: bool,
}

/// The highest simulcast layer a subscriber asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    Low,
    Medium,
    High,
}

impl Quality {
    pub fn parse(text: &str) -> Option<Quality> {
        match text {
            "low" => Some(Quality::Low),
            "medium" => Some(Quality::Medium),
            "high" => Some(Quality::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Low => "low",
            Quality::Medium => "medium",
            Quality::High => "high",
        }
    }

    /// The simulcast layer it names: 0 q, 1 h, 2 f.
    pub fn layer(self) -> usize {
        self as usize
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            target: Target::Sfu,
            url: "http://127.0.0.1:7880".into(),
            api_key: "devkey".into(),
            api_secret: "devsecret".into(),
            rooms: 1,
            publishers: 2,
            subscribers: 2,
            duration: Duration::from_secs(10),
            video_bitrate: 500_000,
            fps: 30,
            audio_only: false,
            simulcast: false,
            uplink_loss: 0.0,
            ramp: Duration::ZERO,
            bind_ip: None,
            subscriber_quality: None,
            room_prefix: None,
            spread: false,
        }
    }
}

/// Figures for one stream at one receiver.
#[derive(Debug, Clone, Serialize)]
pub struct TrackReport {
    pub room: String,
    pub publisher: String,
    pub receiver: String,
    pub kind: String,
    /// Packets the publisher sent from the first one this receiver got.
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_p99_ms: f64,
    /// Interarrival jitter (RFC 3550) of the measured packets.
    pub jitter_ms: f64,
    pub first_packet_ms: f64,
    /// Payload bitrate received over the run, all simulcast layers.
    pub bitrate_bps: f64,
    /// With `--simulcast`, video: the layer (q, h, f) received last.
    pub layer: Option<String>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Clients the scenario has.
    pub participants: usize,
    /// Clients that joined and took part.
    pub connected: usize,
    /// Why each of the others did not join.
    pub join_failures: Vec<String>,
    pub seconds: f64,
    pub packets_sent: u64,
    /// Distinct packets received, of those counted (sent within the run).
    pub packets_received: u64,
    /// Every packet that arrived, tail and duplicates included (what the
    /// server's forwarded counter should show).
    pub packets_delivered: u64,
    /// Of those, packets of publishers not in this run (another load
    /// tester's, in shared rooms): delivered, not measured.
    pub foreign_packets: u64,
    pub loss_pct: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_p99_ms: f64,
    pub received_bitrate_bps: f64,
    pub tracks: Vec<TrackReport>,
    /// One sample a second.
    pub timeline: Vec<Progress>,
}

/// One line of progress, once a second.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub elapsed_s: f64,
    pub connected: usize,
    /// Packets received so far.
    pub packets_received: u64,
    /// Over the last second: received bitrate, packets, and mean one-way
    /// latency.
    pub received_bitrate_bps: f64,
    pub packets_per_s: f64,
    pub mean_latency_ms: f64,
    /// Loss of the measured packets sent in the second that ended two to
    /// three seconds before this sample, as it stood at the sample
    /// (retransmissions have had that long).
    pub recent_loss_pct: Option<f64>,
    /// Loss of the measured packets sent in the second this sample closes,
    /// counted at the end of the run (after every retransmission).
    pub loss_pct: Option<f64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Most ticks a frame interval is cut into with `Scenario::spread`.
const MAX_SLOTS: usize = 32;

/// Sends a frame for the publishers of one slot of the frame interval.
async fn send_slot(
    members: &mut [Member],
    slot: usize,
    slots: usize,
    frame_bytes: usize,
    keyframe_every: u32,
) {
    for (k, m) in members.iter_mut().filter(|m| m.publisher).enumerate() {
        if k % slots == slot {
            m.client.send_media(frame_bytes, keyframe_every).await;
        }
    }
}

/// Loss of the measured packets sent in each Unix second of `seconds`,
/// over every stream a receiver was measuring by then: what the
/// publishers sent in that second against what their receivers got of
/// it. `None` for a second in which nothing was expected. One walk over
/// the streams serves every second asked for.
fn loss_by_second(
    members: &[Member],
    audio_only: bool,
    seconds: std::ops::Range<u64>,
) -> Vec<Option<f64>> {
    let n = seconds.end.saturating_sub(seconds.start) as usize;
    let (mut expected, mut received) = (vec![0u64; n], vec![0u64; n]);
    let mut publishers: HashMap<&str, Vec<&Member>> = HashMap::new();
    for m in members.iter().filter(|m| m.publisher) {
        publishers.entry(m.room.as_str()).or_default().push(m);
    }
    for receiver in members {
        let Some(senders) = publishers.get(receiver.room.as_str()) else {
            continue;
        };
        let Ok(inbox) = receiver.client.inbox.lock() else {
            continue;
        };
        for sender in senders
            .iter()
            .filter(|m| m.client.sid != receiver.client.sid)
        {
            for (kind, k) in [("video", 0), ("audio", 1)] {
                if kind == "video" && audio_only {
                    continue;
                }
                let key = (sender.client.sid.clone(), kind.to_owned());
                let Some(t) = inbox.tracks.get(&key) else {
                    continue;
                };
                // Seconds wholly after the receiver's first measured packet
                // (since its last switch onto the measured layer): what was
                // sent before the stream reached it is not lost. And none
                // while it receives another layer.
                let (Some(since), true) = (
                    t.measured_since_us.or(t.first_at_us),
                    t.last_layer.is_none_or(|l| l == MEASURED_LAYER),
                ) else {
                    continue;
                };
                let from = since / 1_000_000 + 1;
                for (i, second) in seconds.clone().enumerate().filter(|(_, s)| *s >= from) {
                    let Some(sent) = sender.client.sent_by_second.get(&second) else {
                        continue;
                    };
                    let got = t.by_second.get(&second).copied().unwrap_or(0);
                    expected[i] += u64::from(sent[k]);
                    // Retransmissions of packets already received count once.
                    received[i] += u64::from(got.min(sent[k]));
                }
            }
        }
    }
    expected
        .iter()
        .zip(&received)
        .map(|(&e, &r)| (e > 0).then(|| (e - r) as f64 * 100.0 / e as f64))
        .collect()
}

/// An admin token for the REST API, signed with the API secret.
pub fn admin_token(key: &str, secret: &str) -> anyhow::Result<String> {
    let now = crate::payload::now_us() / 1_000_000;
    let claims = json!({
        "iss": key, "sub": "loadtest", "exp": now + 3600, "nbf": now.saturating_sub(10),
        "video": {"roomCreate": true, "roomList": true, "roomAdmin": true}
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

struct Member {
    room: String,
    client: Client,
    publisher: bool,
    /// Video tracks asked for `Scenario::subscriber_quality` so far.
    asked: usize,
    /// Measured packets sent when the run ended (video, audio): what
    /// receivers are expected to get.
    counted: (u32, u32),
}

/// The pause between joins, if the scenario asks for one.
async fn ramp(s: &Scenario) {
    if !s.ramp.is_zero() {
        tokio::time::sleep(s.ramp).await;
    }
}

/// Who joined, and why the others did not.
type Joined = (Vec<Member>, Vec<String>);

/// Creates the rooms on our server and joins everyone. A client that
/// cannot join (the server refused it, or its connection did not come up)
/// is counted and the run goes on without it: at a server's capacity some
/// do not get in, and that is a figure of the run.
async fn join_sfu(s: &Scenario) -> anyhow::Result<Joined> {
    let http = crate::tls::http()?;
    let admin = admin_token(&s.api_key, &s.api_secret)?;
    let ws_base = s.url.replacen("http", "ws", 1);
    let run_id = crate::payload::now_us() % 1_000_000;
    // In shared rooms, identities carry this run's own tag: a second
    // `pub0` would take the first one's place.
    let (prefix, tag) = match &s.room_prefix {
        Some(prefix) => (prefix.clone(), format!("-{}", instance_tag())),
        None => (format!("loadtest-{run_id}"), String::new()),
    };
    let mut members: Vec<Member> = Vec::new();
    let mut failures = Vec::new();
    let mut index: u8 = 0;
    for r in 0..s.rooms {
        let room = format!("{prefix}-{r}");
        let resp = http
            .post(format!("{}/v1/rooms", s.url))
            .bearer_auth(&admin)
            .json(&json!({ "name": room }))
            .send()
            .await
            .context("creating a room")?;
        anyhow::ensure!(
            resp.status().is_success() || resp.status().as_u16() == 409,
            "creating room {room}: HTTP {}",
            resp.status()
        );
        for p in 0..s.publishers + s.subscribers {
            let publisher = p < s.publishers;
            let identity = format!("{}{p}{tag}", if publisher { "pub" } else { "sub" });
            let minted: serde_json::Value = http
                .post(format!("{}/v1/tokens", s.url))
                .bearer_auth(&admin)
                .json(&json!({"room": room, "identity": identity, "canPublish": publisher}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let token = minted["token"].as_str().context("token in reply")?;
            let options = PublishOptions {
                publish: publisher,
                audio_only: s.audio_only,
                simulcast: s.simulcast,
                uplink_loss: s.uplink_loss,
                measured_layer: s.subscriber_quality.map(Quality::layer),
            };
            let joined = Client::join(&ws_base, token, &identity, index, options).await;
            index = index.wrapping_add(1);
            match joined {
                Ok(client) => members.push(Member {
                    room: room.clone(),
                    client,
                    publisher,
                    asked: 0,
                    counted: (0, 0),
                }),
                Err(e) => failures.push(format!("{room} {identity}: {e:#}")),
            }
            ramp(s).await;
        }
    }
    Ok((members, failures))
}

/// Six hex digits that tell this run's clients from another's: the
/// process id and the clock.
fn instance_tag() -> String {
    let mixed = (crate::payload::now_us() ^ ((std::process::id() as u64) << 24))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:06x}", mixed >> 40)
}

/// Creates Janus VideoRoom rooms and joins everyone: publishers publish
/// first, then every participant subscribes to the room's other feeds.
/// Clients that cannot join are counted, as with our server.
async fn join_janus(s: &Scenario) -> anyhow::Result<Joined> {
    let run_id = crate::payload::now_us() % 1_000_000;
    let bind_ip = s.bind_ip.unwrap_or_else(crate::janus::local_ip);
    let mut members: Vec<Member> = Vec::new();
    let mut failures = Vec::new();
    let mut index: u8 = 0;
    for r in 0..s.rooms {
        let room_id = run_id * 1000 + r as u64 + 1;
        let room = room_id.to_string();
        crate::janus::create_room(&s.url, room_id, s.publishers).await?;
        let first = members.len();
        let mut feeds = Vec::new();
        for p in 0..s.publishers + s.subscribers {
            let publisher = p < s.publishers;
            let identity = format!("{}{p}", if publisher { "pub" } else { "sub" });
            let options = PublishOptions {
                publish: publisher,
                audio_only: s.audio_only,
                simulcast: s.simulcast,
                uplink_loss: s.uplink_loss,
                measured_layer: s.subscriber_quality.map(Quality::layer),
            };
            let feed = index as u64 + 1;
            let joined =
                Client::join_janus(&s.url, bind_ip, room_id, &identity, index, feed, options).await;
            index = index.wrapping_add(1);
            match joined {
                Ok(client) => {
                    if publisher {
                        feeds.push((client.sid.clone(), feed));
                    }
                    members.push(Member {
                        room: room.clone(),
                        client,
                        publisher,
                        asked: 0,
                        counted: (0, 0),
                    });
                }
                Err(e) => failures.push(format!("Janus room {room} {identity}: {e:#}")),
            }
            ramp(s).await;
        }
        for m in members.split_off(first) {
            let others: Vec<u64> = feeds
                .iter()
                .filter(|(sid, _)| *sid != m.client.sid)
                .map(|(_, feed)| *feed)
                .collect();
            if others.is_empty() {
                members.push(m);
                continue;
            }
            match m.client.subscribe_janus(&others).await {
                Ok(()) => members.push(m),
                Err(e) => {
                    failures.push(format!(
                        "Janus room {room} {}: subscribing: {e:#}",
                        m.client.identity
                    ));
                    m.client.close().await;
                }
            }
        }
    }
    Ok((members, failures))
}

/// Runs the scenario, reporting progress once a second.
pub async fn run(s: &Scenario, mut progress: impl FnMut(&Progress)) -> anyhow::Result<Report> {
    if s.subscriber_quality.is_some() {
        anyhow::ensure!(s.simulcast, "a subscriber quality needs simulcast");
        anyhow::ensure!(
            s.target == Target::Sfu,
            "a subscriber quality is asked for with this server's updateSubscription"
        );
    }
    anyhow::ensure!(
        s.target == Target::Sfu || s.publishers <= 256,
        "with Janus, publishers are told apart by a one-byte index: at most 256 a room"
    );
    anyhow::ensure!(
        s.room_prefix.is_none() || s.target == Target::Sfu,
        "shared rooms (a room prefix) are for this server only"
    );
    let (mut members, join_failures) = match s.target {
        Target::Sfu => join_sfu(s).await?,
        Target::Janus => join_janus(s).await?,
    };
    if members.is_empty() {
        let first = join_failures.first().map_or("no clients", String::as_str);
        anyhow::bail!("nobody joined: {first}");
    }

    // Media: every publisher sends a frame per frame interval, all paced by
    // one timer: on the same tick, or with `spread` on ticks spread over
    // the interval (publisher k on slot k mod slots).
    let frame_bytes = (s.video_bitrate / 8 / s.fps.max(1) as u64) as usize;
    let keyframe_every = s.fps * 2;
    let start = Instant::now();
    // Sample i closes the Unix second first_second + i.
    let first_second = crate::payload::now_us() / 1_000_000;
    let slots = if s.spread {
        members
            .iter()
            .filter(|m| m.publisher)
            .count()
            .clamp(1, MAX_SLOTS)
    } else {
        1
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1) / s.fps.max(1) / slots as u32);
    let mut slot = 0;
    let mut next_report = start + Duration::from_secs(1);
    // (when, packets, bytes, latency sum) at the last progress sample.
    let mut last = (start, 0u64, 0u64, 0u64);
    let mut timeline: Vec<Progress> = Vec::new();
    while start.elapsed() < s.duration {
        tick.tick().await;
        send_slot(&mut members, slot, slots, frame_bytes, keyframe_every).await;
        slot = (slot + 1) % slots;
        if let Some(quality) = s.subscriber_quality {
            for m in &mut members {
                ask_quality(m, quality);
            }
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let (mut received, mut bytes, mut latency_us) = (0u64, 0u64, 0u64);
            for m in &members {
                if let Ok(i) = m.client.inbox.lock() {
                    received += i.tracks.values().map(|t| t.seqs.len() as u64).sum::<u64>();
                    bytes += i.bytes;
                    latency_us += i.latency_sum_us;
                }
            }
            let seconds = last.0.elapsed().as_secs_f64().max(1e-3);
            let packets = received - last.1;
            let sample = Progress {
                elapsed_s: start.elapsed().as_secs_f64(),
                connected: members.len(),
                packets_received: received,
                received_bitrate_bps: (bytes - last.2) as f64 * 8.0 / seconds,
                packets_per_s: packets as f64 / seconds,
                mean_latency_ms: if packets > 0 {
                    (latency_us - last.3) as f64 / packets as f64 / 1000.0
                } else {
                    0.0
                },
                recent_loss_pct: (timeline.len() as u64).checked_sub(2).and_then(|i| {
                    let second = first_second + i;
                    loss_by_second(&members, s.audio_only, second..second + 1)[0]
                }),
                loss_pct: None,
            };
            last = (Instant::now(), received, bytes, latency_us);
            progress(&sample);
            timeline.push(sample);
        }
    }
    // What counts is what was sent up to now. Media goes on a little longer
    // so that losses near the end are noticed (a gap shows only when a
    // later packet arrives) and retransmitted, then the stragglers land.
    let seconds = start.elapsed().as_secs_f64();
    // Per member, not by sid: with Janus, publishers in different rooms
    // may share an index.
    for m in members.iter_mut() {
        m.counted = (m.client.video_packets_sent(), m.client.seq_now());
    }
    let tail = Instant::now();
    while tail.elapsed() < Duration::from_millis(300) {
        tick.tick().await;
        send_slot(&mut members, slot, slots, frame_bytes, keyframe_every).await;
        slot = (slot + 1) % slots;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let sampled = first_second..first_second + timeline.len() as u64;
    for (sample, loss) in timeline
        .iter_mut()
        .zip(loss_by_second(&members, s.audio_only, sampled))
    {
        sample.loss_pct = loss;
    }

    let mut tracks = Vec::new();
    let mut all_latency: Vec<u64> = Vec::new();
    let mut packets_sent = 0;
    let mut total_bytes = 0;
    let mut packets_delivered = 0;
    let mut foreign_packets = 0;
    // Tracks are keyed by the publisher's sid with this server (by its
    // index in the run with Janus, where every publisher is this run's).
    let own: HashSet<&str> = members
        .iter()
        .filter(|m| m.publisher)
        .map(|m| m.client.sid.as_str())
        .collect();
    for m in members.iter().filter(|m| m.publisher) {
        let (video, audio) = m.counted;
        packets_sent += video as u64 + audio as u64;
    }
    for receiver in &members {
        let inbox = receiver
            .client
            .inbox
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        total_bytes += inbox.bytes;
        packets_delivered += inbox
            .tracks
            .values()
            .map(|t| t.seqs.len() as u64)
            .sum::<u64>();
        if s.target == Target::Sfu {
            foreign_packets += inbox
                .tracks
                .iter()
                .filter(|((sid, _), _)| !own.contains(sid.as_str()))
                .map(|(_, t)| t.seqs.len() as u64)
                .sum::<u64>();
        }
        for sender in members
            .iter()
            .filter(|m| m.publisher && m.room == receiver.room)
        {
            if sender.client.sid == receiver.client.sid {
                continue;
            }
            let (video_sent, audio_sent) = sender.counted;
            for (kind, sent) in [("video", video_sent), ("audio", audio_sent)] {
                if kind == "video" && s.audio_only {
                    continue;
                }
                let key = (sender.client.sid.clone(), kind.to_owned());
                let track = inbox.tracks.get(&key);
                // Counted from the last switch onto the measured layer.
                let from = track.and_then(|t| t.measured_from).unwrap_or(0);
                let seqs: HashSet<u32> = track
                    .map(|t| {
                        t.seqs
                            .iter()
                            .copied()
                            .filter(|q| (from..=sent).contains(q))
                            .collect()
                    })
                    .unwrap_or_default();
                let first = seqs.iter().min().copied().unwrap_or(sent + 1);
                let expected = (sent + 1).saturating_sub(first) as u64;
                let received = seqs.len() as u64;
                let lost = expected.saturating_sub(received);
                if lost > 0 && std::env::var("LOADTEST_DEBUG").is_ok() {
                    let missing: Vec<u32> = (first..=sent).filter(|q| !seqs.contains(q)).collect();
                    eprintln!(
                        "{} -> {} {kind}: missing {missing:?} of {first}..={sent}",
                        sender.client.identity, receiver.client.identity
                    );
                }
                let mut latency = track.map(|t| t.latency_us.clone()).unwrap_or_default();
                latency.sort_unstable();
                all_latency.extend_from_slice(&latency);
                tracks.push(TrackReport {
                    room: receiver.room.clone(),
                    publisher: sender.client.identity.clone(),
                    receiver: receiver.client.identity.clone(),
                    kind: kind.to_owned(),
                    expected,
                    received,
                    lost,
                    loss_pct: if expected > 0 {
                        lost as f64 * 100.0 / expected as f64
                    } else {
                        100.0
                    },
                    latency_p50_ms: percentile(&latency, 0.50),
                    latency_p95_ms: percentile(&latency, 0.95),
                    latency_p99_ms: percentile(&latency, 0.99),
                    jitter_ms: track.map_or(0.0, |t| t.jitter.value / 1000.0),
                    bitrate_bps: track.map_or(0, |t| t.bytes) as f64 * 8.0 / seconds,
                    layer: if s.simulcast && kind == "video" {
                        let measured = s.subscriber_quality.map_or(2, Quality::layer);
                        track
                            .and_then(|t| t.last_layer)
                            .map(|l| {
                                if l == MEASURED_LAYER {
                                    measured
                                } else {
                                    l as usize
                                }
                            })
                            .and_then(|l| ["q", "h", "f"].get(l))
                            .map(|l| (*l).to_owned())
                    } else {
                        None
                    },
                    first_packet_ms: track
                        .and_then(|t| t.first_at_us)
                        .map(|t| t.saturating_sub(start_us(start)) as f64 / 1000.0)
                        .unwrap_or(f64::NAN),
                });
            }
        }
    }
    all_latency.sort_unstable();
    let expected: u64 = tracks.iter().map(|t| t.expected).sum();
    let lost: u64 = tracks.iter().map(|t| t.lost).sum();
    let report = Report {
        participants: members.len() + join_failures.len(),
        connected: members.len(),
        join_failures,
        seconds,
        packets_sent,
        packets_received: tracks.iter().map(|t| t.received).sum(),
        packets_delivered,
        foreign_packets,
        // A run with no publishers of its own (receivers for another load
        // tester's, in shared rooms) measures no loss.
        loss_pct: if expected > 0 {
            lost as f64 * 100.0 / expected as f64
        } else if tracks.is_empty() {
            0.0
        } else {
            100.0
        },
        latency_p50_ms: percentile(&all_latency, 0.50),
        latency_p95_ms: percentile(&all_latency, 0.95),
        latency_p99_ms: percentile(&all_latency, 0.99),
        received_bitrate_bps: total_bytes as f64 * 8.0 / seconds,
        tracks,
        timeline,
    };
    for m in members {
        m.client.close().await;
    }
    Ok(report)
}

/// Asks for `quality` of the video tracks `m` has started receiving since
/// it last asked.
fn ask_quality(m: &mut Member, quality: Quality) {
    let tracks: Vec<String> = match m.client.inbox.lock() {
        Ok(inbox) => inbox.video_tracks[m.asked.min(inbox.video_tracks.len())..].to_vec(),
        Err(_) => return,
    };
    for sid in tracks {
        m.client.send(json!({
            "type": "updateSubscription",
            "trackSid": sid,
            "quality": quality.as_str(),
        }));
        m.asked += 1;
    }
}

/// The Unix time in µs of an `Instant` taken during this run.
fn start_us(start: Instant) -> u64 {
    crate::payload::now_us().saturating_sub(start.elapsed().as_micros() as u64)
}
