//! The load tester against the real server (started here on port 0): its
//! counts agree with the server's own counters, and injected uplink loss is
//! recovered by retransmission.

use std::time::Duration;

use loadtest::scenario::{run, Report, Scenario};

async fn server() -> sfu_server::RunningServer {
    let config = sfu_server::config::Config::ephemeral();
    sfu_server::start(&config).await.expect("server starts")
}

fn scenario(server: &sfu_server::RunningServer, uplink_loss: f64) -> Scenario {
    Scenario {
        url: server.base_url(),
        publishers: 2,
        subscribers: 1,
        duration: Duration::from_secs(3),
        video_bitrate: 300_000,
        uplink_loss,
        ..Default::default()
    }
}

async fn metric(server: &sfu_server::RunningServer, series: &str) -> u64 {
    let m = loadtest::metrics::scrape(&server.base_url())
        .await
        .expect("metrics");
    m.get(series).copied().unwrap_or(0.0) as u64
}

fn print(report: &Report) {
    for t in &report.tracks {
        eprintln!(
            "{} -> {} {}: {}/{} lost {:.2}% p99 {:.1} ms",
            t.publisher, t.receiver, t.kind, t.received, t.expected, t.loss_pct, t.latency_p99_ms
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_match_the_server_and_nothing_is_lost() {
    let server = server().await;
    // Long enough for the live loss figure, which looks two seconds back.
    let mut s = scenario(&server, 0.0);
    s.duration = Duration::from_secs(5);
    let report = run(&s, |_| {}).await.expect("runs");
    print(&report);
    // Each publisher reaches the other publisher and the subscriber, audio
    // and video: 2 x 2 x 2 streams.
    assert_eq!(report.tracks.len(), 8);
    for t in &report.tracks {
        assert!(t.received > 0, "{t:?}");
        assert_eq!(t.lost, 0, "{t:?}");
        assert!(t.latency_p99_ms < 100.0, "{t:?}");
        assert!(t.jitter_ms >= 0.0 && t.jitter_ms < 50.0, "{t:?}");
        assert_eq!(t.layer, None, "one layer published: {t:?}");
    }
    // Second by second nothing was lost either, from the first second
    // wholly after the streams started: the live figure and the final
    // count agree.
    let measured: Vec<f64> = report.timeline.iter().filter_map(|p| p.loss_pct).collect();
    assert!(
        measured.len() + 2 >= report.timeline.len(),
        "{:?}",
        report.timeline
    );
    assert!(measured.iter().all(|l| *l == 0.0), "{measured:?}");
    let live: Vec<f64> = report
        .timeline
        .iter()
        .filter_map(|p| p.recent_loss_pct)
        .collect();
    assert!(
        !live.is_empty() && live.iter().all(|l| *l == 0.0),
        "{live:?}"
    );
    // Video arrives at about the rate it is sent (300 kbit/s).
    for t in report.tracks.iter().filter(|t| t.kind == "video") {
        assert!((150_000.0..450_000.0).contains(&t.bitrate_bps), "{t:?}");
    }
    // What the clients counted is what the server says it forwarded (the
    // server reports its counters once a second: poll until it has).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let f = metric(&server, "sfu_rtp_packets_forwarded_total").await;
        if f.abs_diff(report.packets_delivered) * 100 <= report.packets_delivered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server forwarded {f}, clients received {}",
            report.packets_delivered
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_uplink_loss_is_recovered_for_video() {
    let server = server().await;
    // Seconds enough for a few of them to be measured one by one.
    let mut s = scenario(&server, 0.05);
    s.duration = Duration::from_secs(6);
    let report = run(&s, |_| {}).await.expect("runs");
    print(&report);
    if report
        .tracks
        .iter()
        .any(|t| t.kind == "video" && t.lost > 0)
    {
        let m = loadtest::metrics::scrape(&server.base_url())
            .await
            .expect("metrics");
        let mut keys: Vec<_> = m
            .iter()
            .filter(|(k, v)| k.contains("drop") && **v > 0.0)
            .collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        eprintln!("{keys:?}");
    }
    for t in report.tracks.iter().filter(|t| t.kind == "video") {
        assert!(t.loss_pct < 1.0, "video not recovered: {t:?}");
    }
    // Audio has no retransmission: its loss shows the loss was real.
    let audio_lost: u64 = report
        .tracks
        .iter()
        .filter(|t| t.kind == "audio")
        .map(|t| t.lost)
        .sum();
    assert!(audio_lost > 0, "no loss was injected");
    // The audio's loss shows second by second too: the seconds' figures
    // average out near the run's (audio is a third of the packets, so
    // about 5% / 3).
    let seconds: Vec<f64> = report.timeline.iter().filter_map(|p| p.loss_pct).collect();
    assert!(seconds.len() >= 3, "{:?}", report.timeline);
    let mean = seconds.iter().sum::<f64>() / seconds.len() as f64;
    assert!(mean > 0.0, "{seconds:?}");
    assert!(
        (mean - report.loss_pct).abs() < 1.5,
        "seconds {seconds:?}, run {:.2}%",
        report.loss_pct
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_publishers_reach_subscribers_on_the_top_layer() {
    let server = server().await;
    let mut s = scenario(&server, 0.0);
    s.simulcast = true;
    s.video_bitrate = 800_000;
    let report = run(&s, |_| {}).await.expect("runs");
    print(&report);
    for t in report.tracks.iter().filter(|t| t.kind == "video") {
        assert!(t.received > 0 && t.lost == 0, "{t:?}");
        // Nothing limits the loopback: every subscriber ends on the top layer.
        assert_eq!(t.layer.as_deref(), Some("f"), "{t:?}");
    }
    // The server picked one layer per subscriber and dropped the others.
    let not_selected = metric(
        &server,
        "sfu_rtp_packets_dropped_total{reason=\"layer_not_selected\"}",
    )
    .await;
    assert!(not_selected > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_leaves_no_connection_behind() {
    let server = server().await;
    let soak = loadtest::soak::Soak {
        url: server.base_url(),
        api_key: "devkey".into(),
        api_secret: "devsecret".into(),
        participants: 6,
        duration: Duration::from_secs(6),
        stay: (Duration::from_millis(800), Duration::from_millis(2000)),
        video_bitrate: 100_000,
        seed: 7,
    };
    let report = loadtest::soak::run_soak(&soak, |line| eprintln!("{line}"))
        .await
        .expect("soak runs");
    eprintln!("{report:?}");
    // Every slot came and went more than once.
    assert!(report.joins >= 12, "{report:?}");
    assert_eq!(report.failed_joins, 0, "{report:?}");
    assert!(report.peer_connections_peak >= 6, "{report:?}");
    assert!(report.clean(), "{report:?}");
    assert!(report.rss_before > 0, "the server reports its memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_tls_is_driven_over_https_and_wss() {
    let dir = std::env::temp_dir().join(format!("loadtest-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let identity =
        sfu_server::tls::Identity::self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &identity.cert_pem).expect("cert written");
    std::fs::write(&key, &identity.key_pem).expect("key written");
    let mut config = sfu_server::config::Config::ephemeral();
    config.tls_cert = Some(cert.clone());
    config.tls_key = Some(key);
    let server = sfu_server::start(&config).await.expect("server starts");
    assert!(server.base_url().starts_with("https://"));
    let mut s = scenario(&server, 0.0);
    s.publishers = 1;
    s.duration = Duration::from_secs(2);

    // Not trusted yet: the run fails, and says what to do.
    let refused = run(&s, |_| {}).await.expect_err("untrusted certificate");
    let message = format!("{:#}", loadtest::tls::explain(refused));
    assert!(message.contains("invalid peer certificate"), "{message}");
    assert!(message.contains("--ca-cert"), "{message}");

    loadtest::tls::trust(&cert).expect("certificate trusted");
    let report = run(&s, |_| {}).await.expect("runs over TLS");
    print(&report);
    assert_eq!(report.tracks.len(), 2, "audio and video to the subscriber");
    for t in &report.tracks {
        assert!(t.received > 0 && t.lost == 0, "{t:?}");
    }
    // The metrics page is read over HTTPS too.
    assert!(
        metric(&server, "sfu_rtp_packets_forwarded_total").await >= report.packets_delivered / 2
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_without_certificates_is_refused() {
    let path = std::env::temp_dir().join(format!("loadtest-nocert-{}.pem", std::process::id()));
    std::fs::write(&path, "not a certificate\n").expect("written");
    let e = loadtest::tls::trust(&path).expect_err("refused");
    assert!(format!("{e:#}").contains("no certificate"), "{e:#}");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_the_server_turns_away_are_counted_and_the_rest_run() {
    // Rooms hold two participants: of two publishers and a subscriber,
    // the subscriber is refused.
    let mut config = sfu_server::config::Config::ephemeral();
    config.max_participants = 2;
    let server = sfu_server::start(&config).await.expect("server starts");
    let mut s = scenario(&server, 0.0);
    s.duration = Duration::from_secs(2);
    let report = run(&s, |_| {}).await.expect("runs without the third");
    print(&report);
    eprintln!("{:?}", report.join_failures);
    assert_eq!((report.participants, report.connected), (3, 2));
    assert_eq!(report.join_failures.len(), 1, "{:?}", report.join_failures);
    assert!(
        report.join_failures[0].contains("sub2"),
        "{:?}",
        report.join_failures
    );
    // The two publishers receive each other, audio and video.
    assert_eq!(report.tracks.len(), 4);
    for t in &report.tracks {
        assert!(t.received > 0 && t.lost == 0, "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_asking_for_low_quality_get_and_measure_the_low_layer() {
    let server = server().await;
    let mut s = scenario(&server, 0.0);
    s.simulcast = true;
    s.video_bitrate = 800_000;
    s.duration = Duration::from_secs(4);
    s.subscriber_quality = Some(loadtest::scenario::Quality::Low);
    let report = run(&s, |_| {}).await.expect("runs");
    print(&report);
    for t in report.tracks.iter().filter(|t| t.kind == "video") {
        assert_eq!(t.layer.as_deref(), Some("q"), "{t:?}");
        assert!(t.received > 0 && t.lost == 0, "{t:?}");
        // The low layer is a sixteenth of the top one's 800 kbit/s: the
        // track's bitrate is well under it, though it started on the top.
        assert!(t.bitrate_bps < 600_000.0, "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_load_testers_share_a_room_and_each_measures_its_own() {
    let server = server().await;
    let mut s = scenario(&server, 0.0);
    s.publishers = 1;
    s.subscribers = 1;
    s.duration = Duration::from_secs(4);
    s.room_prefix = Some("shared".into());
    // As from two machines: two runs, same rooms, neither knowing the other.
    let (a, b) = tokio::join!(run(&s, |_| {}), run(&s, |_| {}));
    let (a, b) = (a.expect("first runs"), b.expect("second runs"));
    for report in [&a, &b] {
        print(report);
        // Both publishers stayed in: a shared identity would have put one
        // out of the room.
        assert_eq!((report.participants, report.connected), (2, 2));
        // Measured: its own publisher at its own subscriber.
        assert_eq!(report.tracks.len(), 2, "{:?}", report.tracks);
        for t in &report.tracks {
            assert!(t.received > 0 && t.lost == 0, "{t:?}");
        }
        // Received besides: the other run's publisher, at both clients.
        assert!(report.foreign_packets > 0, "nothing from the other run");
        assert!(report.foreign_packets < report.packets_delivered);
    }
    // Between them, every packet the server forwarded.
    let delivered = a.packets_delivered + b.packets_delivered;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let f = metric(&server, "sfu_rtp_packets_forwarded_total").await;
        if f.abs_diff(delivered) * 100 <= delivered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server forwarded {f}, the two runs received {delivered}"
        );
    }
    // Receivers only, for the others' publishers: nothing of its own to
    // measure, so no loss, and everything it got counted as delivered.
    s.publishers = 0;
    s.subscribers = 2;
    let mut with_publisher = scenario(&server, 0.0);
    with_publisher.publishers = 1;
    with_publisher.subscribers = 0;
    with_publisher.duration = s.duration;
    with_publisher.room_prefix = Some("shared2".into());
    s.room_prefix = Some("shared2".into());
    let (p, r) = tokio::join!(run(&with_publisher, |_| {}), run(&s, |_| {}));
    let (p, r) = (p.expect("publisher's run"), r.expect("receivers' run"));
    assert!(r.tracks.is_empty(), "{:?}", r.tracks);
    assert_eq!(r.loss_pct, 0.0);
    assert!(r.foreign_packets > 0);
    assert_eq!(r.foreign_packets, r.packets_delivered);
    assert_eq!(p.foreign_packets, 0, "its publisher is its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_spread_over_the_frame_interval_each_send_at_full_rate() {
    let server = server().await;
    let mut s = scenario(&server, 0.0);
    s.publishers = 3;
    s.subscribers = 0;
    s.spread = true;
    let report = run(&s, |_| {}).await.expect("runs");
    print(&report);
    // Three publishers, each received by the other two, audio and video.
    assert_eq!(report.tracks.len(), 12);
    for t in &report.tracks {
        assert!(t.received > 0 && t.lost == 0, "{t:?}");
    }
    // Every publisher on its own slot still sends every frame.
    for t in report.tracks.iter().filter(|t| t.kind == "video") {
        assert!((150_000.0..450_000.0).contains(&t.bitrate_bps), "{t:?}");
    }
}
