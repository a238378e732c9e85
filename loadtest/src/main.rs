//! `loadtest`: synthetic publishers and subscribers against a running
//! server. See `loadtest --help`.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Parser;
use loadtest::scenario::{run, Quality, Scenario, Target};

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    about = "Load test an SFU server over its public API"
)]
struct Args {
    /// Server base URL: `http://` or `https://` (`ws://host:8188` for
    /// `--target janus`).
    #[arg(long, default_value = "http://127.0.0.1:7880")]
    url: String,
    /// Trust the certificates in this PEM file for HTTPS and WSS, besides
    /// the web PKI's roots: a private certificate authority, or the
    /// server's own self-signed certificate.
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
    /// What to drive: `sfu` (this server) or `janus` (Janus VideoRoom over
    /// its WebSocket API, for comparison).
    #[arg(long, default_value = "sfu")]
    target: String,
    /// With `--target janus`: the address clients bind media sockets to
    /// (default: this machine's address on its default route).
    #[arg(long)]
    bind_ip: Option<std::net::IpAddr>,
    #[arg(long, env = "SFU_API_KEY", default_value = "devkey")]
    api_key: String,
    #[arg(
        long,
        env = "SFU_API_SECRET",
        default_value = "devsecret",
        hide_env_values = true
    )]
    api_secret: String,
    /// A named scenario: meeting (N publishers), livestream (1 -> N), audio (1 -> N, audio only).
    #[arg(long)]
    preset: Option<String>,
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Join (or create) the rooms PREFIX-0, PREFIX-1, ... instead of fresh
    /// ones, so load testers on several machines share them (run each
    /// with the same prefix). Each measures loss and latency of its own
    /// publishers and counts the others' packets as delivered; the live
    /// line's figures take in every packet received.
    #[arg(long)]
    room_prefix: Option<String>,
    /// Publishers send their frames spread over the frame interval, as
    /// browsers out of step with each other do, instead of all at once.
    #[arg(long)]
    spread: bool,
    /// Publishers per room (they also receive each other).
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Receive-only participants per room.
    #[arg(long, default_value_t = 2)]
    subscribers: usize,
    /// Seconds of media.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Video bitrate per publisher, e.g. 500k or 1.5M.
    #[arg(long, default_value = "500k")]
    video_bitrate: String,
    #[arg(long)]
    audio_only: bool,
    /// Publish video as three simulcast layers (q, h, f); the top layer is measured.
    #[arg(long)]
    simulcast: bool,
    /// With simulcast: every receiver asks for this quality of every video
    /// track (`low`, `medium`, `high`), as a grid of thumbnails does, and
    /// that layer is the one measured.
    #[arg(long)]
    subscriber_quality: Option<String>,
    /// Drop this share of outgoing RTP before the wire, e.g. 5%.
    #[arg(long, default_value = "0%")]
    uplink_loss: String,
    /// Milliseconds between joins.
    #[arg(long, default_value_t = 0)]
    ramp_ms: u64,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write an HTML report with time-series charts here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Exit non-zero when total loss exceeds this percentage.
    #[arg(long)]
    max_loss: Option<f64>,
    /// Soak instead of a scenario: `--publishers` participants (default
    /// 30) join a room, stay 2-8 s with media, leave and join again until
    /// `--duration` ends; then everyone leaves and the server must let go
    /// of every participant and peer connection. Prints server memory
    /// before, at peak and after.
    #[arg(long)]
    soak: bool,
    /// Exit non-zero when p99 one-way latency exceeds this.
    #[arg(long)]
    max_p99_ms: Option<f64>,
}

fn parse_rate(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000.0),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000.0),
        _ => (t, 1.0),
    };
    Ok((num.parse::<f64>()? * mult) as u64)
}

fn parse_share(text: &str) -> anyhow::Result<f64> {
    let t = text.trim();
    match t.strip_suffix('%') {
        Some(p) => Ok(p.parse::<f64>()? / 100.0),
        None => Ok(t.parse::<f64>()?),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(path) = &a.ca_cert {
        loadtest::tls::trust(path)?;
    }
    if a.soak {
        return soak(&a).await;
    }
    let target = match a.target.as_str() {
        "sfu" => Target::Sfu,
        "janus" => Target::Janus,
        other => anyhow::bail!("unknown target {other} (sfu, janus)"),
    };
    let mut s = Scenario {
        target,
        url: a.url.trim_end_matches('/').to_owned(),
        api_key: a.api_key,
        api_secret: a.api_secret,
        rooms: a.rooms,
        publishers: a.publishers,
        subscribers: a.subscribers,
        duration: Duration::from_secs(a.duration),
        video_bitrate: parse_rate(&a.video_bitrate)?,
        audio_only: a.audio_only,
        simulcast: a.simulcast,
        uplink_loss: parse_share(&a.uplink_loss)?,
        ramp: Duration::from_millis(a.ramp_ms),
        bind_ip: a.bind_ip,
        subscriber_quality: match a.subscriber_quality.as_deref() {
            None => None,
            Some(q) => Some(Quality::parse(q).ok_or_else(|| {
                anyhow::anyhow!("unknown subscriber quality {q} (low, medium, high)")
            })?),
        },
        room_prefix: a.room_prefix,
        spread: a.spread,
        ..Default::default()
    };
    match a.preset.as_deref() {
        None => {}
        Some("meeting") => {
            s.subscribers = 0;
            s.simulcast = true;
        }
        Some("livestream") => s.publishers = 1,
        Some("audio") => {
            s.publishers = 1;
            s.audio_only = true;
        }
        Some(other) => anyhow::bail!("unknown preset {other} (meeting, livestream, audio)"),
    }
    let tty = std::io::stderr().is_terminal();
    let report = run(&s, |p| {
        // Loss of what was sent two to three seconds ago (retransmissions
        // have had that long); none before then.
        let loss = p
            .recent_loss_pct
            .map_or_else(|| "    -".to_owned(), |l| format!("{l:>5.2}"));
        let line = format!(
            "{:>5.1}s  clients {:>4}  received {:>9} packets  {:>8.0} kbit/s  latency {:>6.1} ms  loss {loss}%",
            p.elapsed_s,
            p.connected,
            p.packets_received,
            p.received_bitrate_bps / 1000.0,
            p.mean_latency_ms
        );
        if tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    })
    .await
    .map_err(loadtest::tls::explain)?;
    if tty {
        eprintln!();
    }
    println!(
        "{:<12} {:<12} {:<6} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>5}",
        "publisher",
        "receiver",
        "kind",
        "expected",
        "received",
        "loss%",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "jitter ms",
        "first ms",
        "kbit/s",
        "layer"
    );
    for t in &report.tracks {
        println!(
            "{:<12} {:<12} {:<6} {:>8} {:>8} {:>7.2} {:>8.1} {:>8.1} {:>8.1} {:>9.2} {:>9.0} {:>9.0} {:>5}",
            t.publisher,
            t.receiver,
            t.kind,
            t.expected,
            t.received,
            t.loss_pct,
            t.latency_p50_ms,
            t.latency_p95_ms,
            t.latency_p99_ms,
            t.jitter_ms,
            t.first_packet_ms,
            t.bitrate_bps / 1000.0,
            t.layer.as_deref().unwrap_or("-")
        );
    }
    println!(
        "total: {} of {} participants joined, {} packets sent, {} received, loss {:.2}%, latency p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms, {:.0} kbit/s received",
        report.connected,
        report.participants,
        report.packets_sent,
        report.packets_received,
        report.loss_pct,
        report.latency_p50_ms,
        report.latency_p95_ms,
        report.latency_p99_ms,
        report.received_bitrate_bps / 1000.0
    );
    if report.foreign_packets > 0 {
        println!(
            "also received: {} packets of other load testers' publishers in the shared rooms (not measured)",
            report.foreign_packets
        );
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = a.report {
        std::fs::write(&path, loadtest::html::render(&report))?;
    }
    let mut failed = false;
    if !report.join_failures.is_empty() {
        eprintln!(
            "{} of {} clients did not join:",
            report.join_failures.len(),
            report.participants
        );
        for f in report.join_failures.iter().take(10) {
            eprintln!("  {f}");
        }
        failed = true;
    }
    if let Some(max) = a.max_loss {
        if report.loss_pct > max {
            eprintln!("loss {:.2}% exceeds --max-loss {max}%", report.loss_pct);
            failed = true;
        }
    }
    if let Some(max) = a.max_p99_ms {
        if report.latency_p99_ms > max {
            eprintln!(
                "p99 latency {:.1} ms exceeds --max-p99-ms {max}",
                report.latency_p99_ms
            );
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

async fn soak(a: &Args) -> anyhow::Result<()> {
    let s = loadtest::soak::Soak {
        url: a.url.trim_end_matches('/').to_owned(),
        api_key: a.api_key.clone(),
        api_secret: a.api_secret.clone(),
        participants: if a.publishers == 2 { 30 } else { a.publishers },
        duration: Duration::from_secs(a.duration),
        stay: (Duration::from_secs(2), Duration::from_secs(8)),
        video_bitrate: parse_rate(&a.video_bitrate)?,
        seed: 42,
    };
    let r = loadtest::soak::run_soak(&s, |line| eprintln!("{line}"))
        .await
        .map_err(loadtest::tls::explain)?;
    println!(
        "soak: {:.0} s, {} joins, {} leaves, {} failed joins; server RSS {:.1} MB before, {:.1} MB at peak, {:.1} MB after; peer connections at peak {}, after {}; participants after {}; settled in {:.1} s",
        r.seconds,
        r.joins,
        r.leaves,
        r.failed_joins,
        r.rss_before as f64 / 1e6,
        r.rss_peak as f64 / 1e6,
        r.rss_after as f64 / 1e6,
        r.peer_connections_peak,
        r.peer_connections_after,
        r.participants_after,
        r.settle_seconds
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    }
    if !r.clean() {
        eprintln!("the server kept participants or peer connections after everyone left");
        std::process::exit(1);
    }
    Ok(())
}
