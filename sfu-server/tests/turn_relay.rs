//! Relays: clients that may use relays only (no host candidates) reach the
//! server through TURN on loopback, and media flows. Through a real coturn
//! sharing the secret (the server's credentials work there), and through
//! the embedded TURN server (its credentials, quotas and refusals).
//!
//! Needs `turnserver` (Debian's `coturn`); the test command installs it. A
//! missing binary fails the test, it does not skip.

mod common;

use std::time::Duration;

use common::{wait_for, Client};
use loadtest::client::{IceSettings, PublishOptions};
use serde_json::Value;

const SECRET: &str = "a-turn-secret-shared-with-coturn";

/// A free port on loopback (UDP and TCP both, as coturn listens on both).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// ICE settings from the server's `/v1/turn-credentials`, relays only,
/// keeping the TURN URLs that contain `keep`.
async fn relay_settings(
    server: &sfu_server::RunningServer,
    identity: &str,
    keep: &str,
) -> IceSettings {
    let token = common::join_token(server, "relayed", identity);
    let body: Value = common::get_json(server, "/v1/turn-credentials", &token).await;
    let servers = body["iceServers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("username").is_some())
        .map(|s| {
            (
                s["urls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|u| u.as_str().unwrap().to_owned())
                    .filter(|u| u.contains(keep))
                    .collect(),
                s["username"].as_str().unwrap().to_owned(),
                s["credential"].as_str().unwrap().to_owned(),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(servers.len(), 1, "one TURN entry: {body}");
    IceSettings {
        servers,
        relay_only: true,
        bind_ip: None,
    }
}

/// Joins room "relayed" as `who` with these ICE settings.
async fn join_relayed(
    server: &sfu_server::RunningServer,
    who: &str,
    index: u8,
    publish: bool,
    ice: &IceSettings,
) -> Client {
    let ws = format!("ws://{}", server.http_addr);
    let token = common::join_token(server, "relayed", who);
    let options = PublishOptions {
        publish,
        ..Default::default()
    };
    Client(
        loadtest::client::Client::join_with_ice(&ws, &token, who, index, options, ice)
            .await
            .expect("joins"),
    )
}

/// Alice publishes and Bob receives, both through relays only; returns
/// once Bob has 50 video and 50 audio packets from Alice, failing after
/// `limit`.
async fn relayed_call(
    server: &sfu_server::RunningServer,
    alice_ice: &IceSettings,
    bob_ice: &IceSettings,
    limit: Duration,
) -> Result<(), String> {
    let mut alice = join_relayed(server, "alice", 1, true, alice_ice).await;
    let bob = join_relayed(server, "bob", 2, false, bob_ice).await;
    let (alice_sid, bob_view) = (alice.sid.clone(), bob.view());
    let deadline = tokio::time::Instant::now() + limit;
    let mut frames = tokio::time::interval(Duration::from_millis(20));
    let mut outcome = Ok(());
    while bob_view.received(&alice_sid, "video").len() < 50
        || bob_view.received(&alice_sid, "audio").len() < 50
    {
        if tokio::time::Instant::now() >= deadline {
            outcome = Err(format!(
                "no media through the relay within {limit:?} (video {}, audio {})",
                bob_view.received(&alice_sid, "video").len(),
                bob_view.received(&alice_sid, "audio").len()
            ));
            break;
        }
        frames.tick().await;
        alice.send_media().await;
    }
    if outcome.is_ok() {
        assert_eq!(bob_view.inbox.lock().unwrap().corrupted, 0);
        // Both connections in use go through a UDP relay.
        let (publishing, _) = alice.selected_paths().await;
        let (_, receiving) = bob.selected_paths().await;
        assert_eq!(publishing.as_deref(), Some("relay/udp"));
        assert_eq!(receiving.as_deref(), Some("relay/udp"));
    }
    alice.close().await;
    bob.close().await;
    outcome
}

async fn metric(server: &sfu_server::RunningServer, name: &str) -> f64 {
    let m = loadtest::metrics::scrape(&server.base_url()).await.unwrap();
    m.get(name).copied().unwrap_or(0.0)
}

fn embedded_turn_config() -> sfu_server::config::Config {
    let mut config = common::test_config();
    config.turn_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_limited_to_relays_reach_the_server_through_the_embedded_turn() {
    let server = sfu_server::start(&embedded_turn_config())
        .await
        .expect("server starts");
    let turn = server.turn.expect("embedded TURN runs");
    // The join reply and /v1/turn-credentials name it (UDP and TCP).
    let token = common::join_token(&server, "relayed", "alice");
    let body = common::get_json(&server, "/v1/turn-credentials", &token).await;
    let urls = body["iceServers"].to_string();
    for want in [
        format!("turn:127.0.0.1:{}?transport=udp", turn.udp_tcp.port()),
        format!("turn:127.0.0.1:{}?transport=tcp", turn.udp_tcp.port()),
    ] {
        assert!(urls.contains(&want), "{want} in {urls}");
    }
    let alice_ice = relay_settings(&server, "alice", "transport=udp").await;
    let bob_ice = relay_settings(&server, "bob", "transport=udp").await;
    relayed_call(&server, &alice_ice, &bob_ice, Duration::from_secs(20))
        .await
        .expect("media through the embedded relay");
    // Each client's two connections took an allocation; bytes went through.
    assert!(metric(&server, "sfu_turn_allocations_total").await >= 2.0);
    assert!(metric(&server, "sfu_turn_relayed_bytes_total").await > 50_000.0);
    assert_eq!(metric(&server, "sfu_turn_relay_denied_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_turn_refuses_credentials_from_another_secret() {
    let server = sfu_server::start(&embedded_turn_config())
        .await
        .expect("server starts");
    let mut ice = relay_settings(&server, "mallory", "transport=udp").await;
    let (_, username, _) = ice.servers[0].clone();
    let expiry: u64 = username.split_once(':').unwrap().0.parse().unwrap();
    let (username, password) = sfu_server::turn::credentials("not-the-secret", "mallory", expiry);
    ice.servers[0].1 = username;
    ice.servers[0].2 = password;
    let mallory = join_relayed(&server, "mallory", 1, true, &ice).await;
    // Each allocation attempt is challenged once, then refused: more 401s
    // than there are attempts' challenges, and no allocation.
    common::eventually(Duration::from_secs(10), || async {
        let unauthorized = metric(&server, "sfu_turn_unauthorized_total").await;
        let requests = metric(&server, "sfu_turn_requests_total").await;
        if unauthorized >= 2.0 && requests >= 2.0 && unauthorized >= requests {
            Ok(())
        } else {
            Err(format!("{requests} requests, {unauthorized} refused"))
        }
    })
    .await;
    assert_eq!(metric(&server, "sfu_turn_allocations_total").await, 0.0);
    mallory.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_turn_holds_users_to_their_allocation_quota() {
    let mut config = embedded_turn_config();
    config.turn_max_allocations = 1;
    let server = sfu_server::start(&config).await.expect("server starts");
    // Two connections with one user's credentials (Alice's publisher, and
    // Bob's subscriber given Alice's): the second allocation is refused.
    let ice = relay_settings(&server, "alice", "transport=udp").await;
    let mut alice = join_relayed(&server, "alice", 1, true, &ice).await;
    let bob = join_relayed(&server, "bob", 2, false, &ice).await;
    // Alice sends (her tracks open, Bob is offered them and gathers)
    // until Bob's allocation has been refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut frames = tokio::time::interval(Duration::from_millis(20));
    loop {
        let refused = metric(&server, "sfu_turn_allocations_refused_total").await;
        let made = metric(&server, "sfu_turn_allocations_total").await;
        if refused >= 1.0 && made >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{made} allocations, {refused} refused"
        );
        frames.tick().await;
        alice.send_media().await;
    }
    assert_eq!(metric(&server, "sfu_turn_allocations").await, 1.0);
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_limited_to_relays_reach_the_server_through_coturn() {
    let port = free_port();
    let relay_min = 50_000 + (port % 1000) * 10;
    let mut coturn = tokio::process::Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip=127.0.0.1",
            &format!("--listening-port={port}"),
            "--relay-ip=127.0.0.1",
            &format!("--min-port={relay_min}"),
            &format!("--max-port={}", relay_min + 9),
            "--use-auth-secret",
            &format!("--static-auth-secret={SECRET}"),
            "--realm=sfu.test",
            // The server's media port is on loopback too.
            "--allow-loopback-peers",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--fingerprint",
            "--log-file=stdout",
            "--simple-log",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("turnserver (Debian package coturn) runs");
    wait_for(Duration::from_secs(10), "coturn listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;

    let mut config = common::test_config();
    config.turn_urls = vec![format!("turn:127.0.0.1:{port}?transport=udp")];
    config.turn_secret = Some(sfu_server::config::Secret(SECRET.into()));
    let server = sfu_server::start(&config).await.expect("server starts");
    let alice_ice = relay_settings(&server, "alice", "turn:").await;
    let bob_ice = relay_settings(&server, "bob", "turn:").await;
    relayed_call(&server, &alice_ice, &bob_ice, Duration::from_secs(20))
        .await
        .expect("media through coturn");
    let _ = coturn.kill().await;
}
