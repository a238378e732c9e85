//! Reconnection: a participant whose signalling socket is cut (a TCP proxy
//! between it and the server drops both connections, no WebSocket close)
//! reconnects to the same session, restarts ICE on both connections (fresh
//! credentials on both sides), and media goes on; the others never see it
//! leave, and it gets what happened while it was away.
//! One that does not come back within the grace is removed.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{join_token, wait_for, Client};
use loadtest::client::PublishOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to the server whose connections can be cut at once.
struct Proxy {
    addr: SocketAddr,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                held.lock().unwrap().push(link);
            }
        });
        Proxy {
            addr,
            links,
            accept,
        }
    }

    fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Drops every connection through the proxy, both ways, with no
    /// WebSocket close: what the server sees of a client whose network went.
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn join_via(ws_base: &str, token: &str, identity: &str, index: u8) -> Client {
    let options = PublishOptions {
        publish: true,
        ..Default::default()
    };
    Client(
        loadtest::client::Client::join(ws_base, token, identity, index, options)
            .await
            .expect("joins"),
    )
}

/// Sends media from every client in `senders` until `cond` holds, failing
/// after `limit`.
async fn pump_until(
    senders: &mut [&mut Client],
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tick.tick().await;
        for c in senders.iter_mut() {
            c.send_media().await;
        }
    }
}

fn left(view: &common::View, identity: &str) -> bool {
    view.has_message(|m| m["type"] == "participantLeft" && m["identity"] == identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_socket_resumes_the_same_session_and_media_goes_on() {
    let server = common::start_server().await;
    let proxy = Proxy::start(server.http_addr).await;
    let token = join_token(&server, "flaky", "alice");
    let mut alice = join_via(&proxy.ws_base(), &token, "alice", 0).await;
    let mut bob = Client::join(&server, "flaky", "bob", 1, true).await;
    let (alice_view, bob_view) = (alice.view(), bob.view());
    let (alice_sid, bob_sid) = (alice.sid.clone(), bob.sid.clone());
    pump_until(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(10),
        "media both ways",
        || {
            !bob_view.received(&alice_sid, "video").is_empty()
                && !alice_view.received(&bob_sid, "video").is_empty()
        },
    )
    .await;

    proxy.cut();
    // While alice is away: media keeps flowing (ICE is untouched), and
    // carol joins.
    let before = bob_view.received(&alice_sid, "video").len();
    pump_until(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(5),
        "alice's media while her signalling is down",
        || bob_view.received(&alice_sid, "video").len() >= before + 20,
    )
    .await;
    let carol = Client::join(&server, "flaky", "carol", 2, false).await;

    let reply = alice
        .reconnect(&proxy.ws_base(), &token)
        .await
        .expect("resumes");
    assert_eq!(reply["participant"]["sid"], alice_sid.as_str(), "{reply}");
    assert!(reply["iceServers"].is_array(), "{reply}");
    // What alice missed comes after `reconnected`.
    wait_for(Duration::from_secs(5), "carol's join replayed", || {
        let messages = alice_view.messages_of("participantJoined");
        messages
            .iter()
            .any(|m| m["participant"]["identity"] == "carol")
    })
    .await;

    // A new network: restart ICE on both connections (the publisher one
    // with an offer of the client's, the subscriber one by asking the
    // server for an offer); both sides take fresh credentials, and media
    // flows again both ways.
    let answers = alice_view.messages_of("answer").len();
    let offers = alice_view.messages_of("offer").len();
    alice.restart_ice().await.expect("ICE restart offer");
    alice.restart_subscriber_ice();
    wait_for(
        Duration::from_secs(5),
        "answer and offer of the ICE restarts",
        || {
            alice_view.messages_of("answer").len() > answers
                && alice_view.messages_of("offer").len() > offers
        },
    )
    .await;
    let ufrag = |m: &serde_json::Value| {
        m["sdp"]
            .as_str()
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
            .unwrap()
            .trim()
            .to_owned()
    };
    let all_answers = alice_view.messages_of("answer");
    let all_offers = alice_view.messages_of("offer");
    assert_ne!(
        ufrag(&all_answers[0]),
        ufrag(all_answers.last().unwrap()),
        "the server's publisher credentials changed"
    );
    assert_ne!(
        ufrag(&all_offers[0]),
        ufrag(all_offers.last().unwrap()),
        "the server's subscriber credentials changed"
    );
    let from_alice = bob_view.received(&alice_sid, "video").len();
    let from_bob = alice_view.received(&bob_sid, "video").len();
    pump_until(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(10),
        "media both ways after the ICE restart",
        || {
            bob_view.received(&alice_sid, "video").len() >= from_alice + 50
                && alice_view.received(&bob_sid, "video").len() >= from_bob + 50
        },
    )
    .await;

    // Nobody saw alice leave, and the server has her once.
    assert!(!left(&bob_view, "alice"));
    assert!(!left(&carol.view(), "alice"));
    let admin = common::admin_token(&server, "flaky", false, false, true);
    let participants = common::get_json(&server, "/v1/rooms/flaky/participants", &admin).await;
    let alices = participants["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["identity"] == "alice")
        .count();
    assert_eq!(alices, 1, "{participants}");
    assert!(
        alice_view.messages_of("error").is_empty(),
        "{:?}",
        alice_view.messages_of("error")
    );

    // Leaving for real is seen at once.
    alice.close().await;
    wait_for(Duration::from_secs(5), "alice's leave", || {
        left(&bob_view, "alice")
    })
    .await;
    bob.close().await;
    carol.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_come_back_is_removed_after_the_grace() {
    let mut config = common::test_config();
    config.reconnect_grace = 1;
    let server = sfu_server::start(&config).await.expect("server starts");
    let proxy = Proxy::start(server.http_addr).await;
    let token = join_token(&server, "flaky", "alice");
    let mut alice = join_via(&proxy.ws_base(), &token, "alice", 0).await;
    let bob = Client::join(&server, "flaky", "bob", 1, false).await;
    let bob_view = bob.view();
    wait_for(Duration::from_secs(5), "bob sees alice", || {
        bob_view.has_message(|m| {
            m["type"] == "participantJoined" && m["participant"]["identity"] == "alice"
        }) || bob_view.has_message(|m| {
            m["type"] == "joined"
                && m["participants"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["identity"] == "alice"))
        })
    })
    .await;
    let cut_at = tokio::time::Instant::now();
    proxy.cut();
    wait_for(Duration::from_secs(5), "alice removed", || {
        left(&bob_view, "alice")
    })
    .await;
    // Held for the grace first, not removed at once.
    assert!(
        cut_at.elapsed() >= Duration::from_millis(900),
        "{:?}",
        cut_at.elapsed()
    );
    // Too late to resume: the server says so.
    let err = alice
        .reconnect(&proxy.ws_base(), &token)
        .await
        .expect_err("no session to resume");
    assert!(err.to_string().contains("session_not_found"), "{err}");
    alice.close().await;
    bob.close().await;
}
