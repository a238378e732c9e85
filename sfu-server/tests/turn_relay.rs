//! The server's TURN credentials work with a real coturn sharing the
//! secret: two clients that may use relays only (no host candidates) reach
//! the server through coturn on loopback, and media flows.
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

/// ICE settings from the server's `/v1/turn-credentials`, relays only.
async fn relay_settings(server: &sfu_server::RunningServer, identity: &str) -> IceSettings {
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
    }
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
    let ws = format!("ws://{}", server.http_addr);

    let alice_ice = relay_settings(&server, "alice").await;
    let bob_ice = relay_settings(&server, "bob").await;
    let publish = PublishOptions {
        publish: true,
        ..Default::default()
    };
    let token = |who: &str| common::join_token(&server, "relayed", who);
    let mut alice = Client(
        loadtest::client::Client::join_with_ice(
            &ws,
            &token("alice"),
            "alice",
            1,
            publish,
            &alice_ice,
        )
        .await
        .expect("alice joins"),
    );
    let bob = Client(
        loadtest::client::Client::join_with_ice(
            &ws,
            &token("bob"),
            "bob",
            2,
            PublishOptions::default(),
            &bob_ice,
        )
        .await
        .expect("bob joins"),
    );
    let (alice_sid, bob_view) = (alice.sid.clone(), bob.view());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut frames = tokio::time::interval(Duration::from_millis(20));
    while bob_view.received(&alice_sid, "video").len() < 50
        || bob_view.received(&alice_sid, "audio").len() < 50
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no media through the relay within 20 s (video {}, audio {})",
            bob_view.received(&alice_sid, "video").len(),
            bob_view.received(&alice_sid, "audio").len()
        );
        frames.tick().await;
        alice.send_media().await;
    }
    assert_eq!(bob_view.inbox.lock().unwrap().corrupted, 0);
    alice.close().await;
    bob.close().await;
    let _ = coturn.kill().await;
}
