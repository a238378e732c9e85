//! Soak: participants joining and leaving a room over and over for a long
//! time, with media, and then everyone leaving. The server's participants,
//! peer connections and memory are read from its `/metrics` before, during
//! and after: a server that leaks keeps connections or memory it should
//! have let go.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use crate::client::{Client, PublishOptions};
use crate::scenario::admin_token;

#[derive(Debug, Clone)]
pub struct Soak {
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
    /// Participants churning at once.
    pub participants: usize,
    pub duration: Duration,
    /// How long each stays, chosen evenly in this range.
    pub stay: (Duration, Duration),
    pub video_bitrate: u64,
    pub seed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub joins: u64,
    pub leaves: u64,
    pub failed_joins: u64,
    pub rss_before: u64,
    pub rss_peak: u64,
    pub rss_after: u64,
    pub peer_connections_peak: u64,
    pub peer_connections_after: u64,
    pub participants_after: u64,
    /// Seconds from the last leave until the server showed no participants
    /// and no peer connections.
    pub settle_seconds: f64,
}

impl SoakReport {
    /// Everyone left and the server let go of every connection.
    pub fn clean(&self) -> bool {
        self.peer_connections_after == 0 && self.participants_after == 0
    }
}

struct Gauges {
    participants: u64,
    peer_connections: u64,
    rss: u64,
    /// Rooms whose memory the server has handed back since it started.
    memory_releases: u64,
}

async fn gauges(url: &str) -> anyhow::Result<Gauges> {
    let m = crate::metrics::scrape(url).await?;
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
    Ok(Gauges {
        participants: get("sfu_participants"),
        peer_connections: get("sfu_peer_connections"),
        rss: get("process_resident_memory_bytes"),
        memory_releases: get("sfu_memory_releases_total"),
    })
}

/// A small deterministic generator for stay times.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs the soak, reporting a line every few seconds through `progress`.
pub async fn run_soak(s: &Soak, mut progress: impl FnMut(&str)) -> anyhow::Result<SoakReport> {
    let http = crate::tls::http()?;
    let admin = admin_token(&s.api_key, &s.api_secret)?;
    let room = format!("soak-{}", crate::payload::now_us() % 1_000_000);
    http.post(format!("{}/v1/rooms", s.url))
        .bearer_auth(&admin)
        .json(&json!({ "name": room, "emptyTimeoutSecs": 5 }))
        .send()
        .await?
        .error_for_status()
        .context("creating the soak room")?;
    let before = gauges(&s.url).await?;
    let mut report = SoakReport {
        rss_before: before.rss,
        rss_peak: before.rss,
        ..Default::default()
    };
    let joins = Arc::new(AtomicU64::new(0));
    let leaves = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + s.duration;
    let ws_base = s.url.replacen("http", "ws", 1);
    let frame_bytes = (s.video_bitrate / 8 / 30) as usize;
    let mut slots = Vec::new();
    for slot in 0..s.participants {
        let (http, admin, room, ws_base) =
            (http.clone(), admin.clone(), room.clone(), ws_base.clone());
        let (joins, leaves, failed) = (joins.clone(), leaves.clone(), failed.clone());
        let url = s.url.clone();
        let stay = s.stay;
        let mut rng = s.seed ^ (slot as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        slots.push(tokio::spawn(async move {
            let mut round = 0u64;
            while Instant::now() < deadline {
                round += 1;
                let identity = format!("soak{slot}-{round}");
                let minted: anyhow::Result<String> = async {
                    let v: serde_json::Value = http
                        .post(format!("{url}/v1/tokens"))
                        .bearer_auth(&admin)
                        .json(&json!({"room": room, "identity": identity}))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    Ok(v["token"].as_str().unwrap_or_default().to_owned())
                }
                .await;
                let options = PublishOptions {
                    publish: true,
                    ..Default::default()
                };
                let client = match minted {
                    Ok(token) => {
                        Client::join(&ws_base, &token, &identity, slot as u8, options).await
                    }
                    Err(e) => Err(e),
                };
                let mut client = match client {
                    Ok(c) => c,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                joins.fetch_add(1, Ordering::Relaxed);
                let span = (stay.1 - stay.0).as_millis().max(1) as u64;
                let until =
                    Instant::now() + stay.0 + Duration::from_millis(next_random(&mut rng) % span);
                let mut frames = tokio::time::interval(Duration::from_millis(33));
                while Instant::now() < until.min(deadline) {
                    frames.tick().await;
                    client.send_media(frame_bytes, 60).await;
                }
                client.send(json!({"type": "leave"}));
                client.close().await;
                leaves.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Watch the server while the slots churn.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_line = start;
    while slots.iter().any(|t| !t.is_finished()) {
        tick.tick().await;
        if let Ok(g) = gauges(&s.url).await {
            report.rss_peak = report.rss_peak.max(g.rss);
            report.peer_connections_peak = report.peer_connections_peak.max(g.peer_connections);
            if last_line.elapsed() >= Duration::from_secs(5) {
                last_line = Instant::now();
                progress(&format!(
                    "{:>6.0}s  joins {:>5}  leaves {:>5}  failed {:>3}  participants {:>3}  peer connections {:>3}  server RSS {:>6.1} MB",
                    start.elapsed().as_secs_f64(),
                    joins.load(Ordering::Relaxed),
                    leaves.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    g.participants,
                    g.peer_connections,
                    g.rss as f64 / 1e6
                ));
            }
        }
    }
    for t in slots {
        let _ = t.await;
    }
    // Everyone has left: the server should let go of everything, and
    // close the room after its empty timeout (5 s here).
    let left_at = Instant::now();
    let room_url = format!("{}/v1/rooms/{room}", s.url);
    let mut after = gauges(&s.url).await?;
    let mut settled_at = None;
    loop {
        let room_open = http
            .get(&room_url)
            .bearer_auth(&admin)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(true);
        let settled = after.participants == 0 && after.peer_connections == 0;
        if settled && settled_at.is_none() {
            settled_at = Some(left_at.elapsed().as_secs_f64());
        }
        if (settled && !room_open) || left_at.elapsed() > Duration::from_secs(30) {
            break;
        }
        tick.tick().await;
        after = gauges(&s.url).await?;
    }
    report.settle_seconds = settled_at.unwrap_or(f64::NAN);
    // Memory once the server has handed back what the closed room held.
    while after.memory_releases <= before.memory_releases
        && left_at.elapsed() < Duration::from_secs(40)
    {
        tick.tick().await;
        after = gauges(&s.url).await?;
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.joins = joins.load(Ordering::Relaxed);
    report.leaves = leaves.load(Ordering::Relaxed);
    report.failed_joins = failed.load(Ordering::Relaxed);
    report.rss_after = after.rss;
    report.peer_connections_after = after.peer_connections;
    report.participants_after = after.participants;
    Ok(report)
}
