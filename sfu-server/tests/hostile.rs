//! Hostile and malformed input, thrown at the real server while a call runs
//! in the same room: REST bodies and headers, signalling messages, SDP and
//! media-port datagrams. Each gets its clear error or a silent drop; the
//! server never panics; the call's media keeps flowing throughout.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{start_server, wait_for, Client, View};
use futures::SinkExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sfu_server::auth::{unix_now, Claims, VideoGrant};
use sfu_server::RunningServer;
use tokio_tungstenite::tungstenite::Message;

fn admin(server: &RunningServer) -> String {
    let now = unix_now();
    server.keys.sign(&Claims {
        iss: server.keys.api_key.clone(),
        sub: "backend".into(),
        name: String::new(),
        exp: now + 600,
        nbf: now - 1,
        video: VideoGrant {
            room_create: true,
            room_list: true,
            room_admin: true,
            ..Default::default()
        },
    })
}

/// Video packets `view` has received from `publisher`.
fn video_from(view: &View, publisher: &str) -> usize {
    view.received(publisher, "video").len()
}

/// What is sent, and the status it must get: (what, method, path, headers,
/// body, status).
type RestCase<'a> = (
    &'a str,
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<Vec<u8>>,
    StatusCode,
);

/// A raw REST request; the status and the error code of the body, if any.
async fn rest(
    http: &reqwest::Client,
    server: &RunningServer,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, Option<String>) {
    let mut req = http.request(method, format!("{}{path}", server.base_url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.expect("the server answers");
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().map(str::to_owned))
}

/// POSTs a body of `size` bytes, over the 64 KiB limit, on a raw
/// connection whose reply is read while the body is still being written:
/// the server answers as soon as the limit is passed and closes, so a
/// client that writes the whole body before reading (as reqwest does) may
/// see a broken pipe instead of the answer. Returns the status and error
/// code.
async fn oversized_post(
    server: &RunningServer,
    path: &str,
    authorization: &str,
    size: usize,
) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connects");
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: {authorization}\r\n\
         content-type: application/json\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n",
        server.http_addr
    );
    let writer = tokio::spawn(async move {
        let chunk = vec![b' '; 16 << 10];
        let mut left = size;
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while left > 0 {
            let n = left.min(chunk.len());
            if wr.write_all(&chunk[..n]).await.is_err() {
                return; // the server has answered and closed
            }
            left -= n;
        }
    });
    let mut reply = Vec::new();
    // Ends at the server's close, or in a reset after the reply; what was
    // read is kept either way.
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut reply)).await;
    writer.abort();
    let text = String::from_utf8_lossy(&reply);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let code = text
        .find('{')
        .zip(text.rfind('}'))
        .and_then(|(a, b)| serde_json::from_str::<Value>(&text[a..=b]).ok())
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    (status, code)
}

/// The server's next reply to what this client sent (`joined`, `error`,
/// `pong` or a publisher `answer`), within 5 s each. What the room sends on
/// its own (the subscriber offer for the call's tracks, candidates, events)
/// is passed over.
async fn next<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let v = common::next_json(ws).await;
        let reply = matches!(v["type"].as_str(), Some("joined" | "error" | "pong"))
            || (v["type"] == "answer" && v["target"] == "publisher");
        if reply {
            return v;
        }
    }
}

/// A STUN binding request naming `username`, with no valid integrity.
fn stun_binding(username: &str, truncate_to: Option<usize>) -> Vec<u8> {
    let mut attr = Vec::new();
    attr.extend_from_slice(&0x0006u16.to_be_bytes());
    attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attr.extend_from_slice(username.as_bytes());
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    let mut m = Vec::new();
    m.extend_from_slice(&0x0001u16.to_be_bytes());
    m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[7u8; 12]);
    m.extend_from_slice(&attr);
    if let Some(n) = truncate_to {
        m.truncate(n);
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_errors_and_the_call_goes_on() {
    let server = start_server().await;
    let room = "besieged";
    let mut alice = Client::join(&server, room, "alice", 1, true).await;
    let bob = Client::join(&server, room, "bob", 2, false).await;
    let (alice_sid, bob_view) = (alice.sid.clone(), bob.view());

    // Alice sends media at a camera's cadence for the whole test.
    let running = Arc::new(AtomicBool::new(true));
    let sender = {
        let running = running.clone();
        tokio::spawn(async move {
            let mut frames = tokio::time::interval(Duration::from_millis(20));
            while running.load(Ordering::Relaxed) {
                frames.tick().await;
                alice.send_media().await;
            }
            alice
        })
    };
    wait_for(Duration::from_secs(15), "bob receives alice", || {
        video_from(&bob_view, &alice_sid) > 10
    })
    .await;
    let mut checked = 0;

    // --- REST ---------------------------------------------------------
    let http = reqwest::Client::new();
    let token = admin(&server);
    let bearer = format!("Bearer {token}");
    let auth = ("authorization", bearer.as_str());
    let json_type = ("content-type", "application/json");
    let join_bearer = format!("Bearer {}", common::join_token(&server, room, "x"));
    let unsigned = format!(
        "Bearer {}.{}.",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            json!({"iss": server.keys.api_key, "exp": unix_now() + 600,
                   "video": {"roomCreate": true, "roomList": true, "roomAdmin": true}})
            .to_string()
        )
    );
    let long_name = json!({ "name": "a".repeat(10_000) }).to_string();
    let rest_cases: Vec<RestCase> = vec![
        (
            "malformed JSON body",
            Method::POST,
            "/v1/rooms",
            vec![auth, json_type],
            Some(b"{not json".to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a JSON array for an object",
            Method::POST,
            "/v1/rooms",
            vec![auth, json_type],
            Some(b"[1,2]".to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a 10,000-character room name",
            Method::POST,
            "/v1/rooms",
            vec![auth, json_type],
            Some(long_name.into_bytes()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "an unknown field",
            Method::POST,
            "/v1/rooms",
            vec![auth, json_type],
            Some(br#"{"name":"r","admin":true}"#.to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no content type",
            Method::POST,
            "/v1/rooms",
            vec![auth],
            Some(br#"{"name":"r"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a wrong field type",
            Method::POST,
            "/v1/rooms",
            vec![auth, json_type],
            Some(br#"{"name":5}"#.to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a garbage bearer token",
            Method::GET,
            "/v1/rooms",
            vec![("authorization", "Bearer garbage")],
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "basic auth instead of a bearer token",
            Method::GET,
            "/v1/rooms",
            vec![("authorization", "Basic Zm9vOmJhcg==")],
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "an unsigned (alg none) token",
            Method::GET,
            "/v1/rooms",
            vec![("authorization", unsigned.as_str())],
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "a join token on the admin API",
            Method::GET,
            "/v1/rooms",
            vec![("authorization", join_bearer.as_str())],
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            "a missing room",
            Method::DELETE,
            "/v1/rooms/no-such-room",
            vec![auth],
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "path traversal in a room name",
            Method::GET,
            "/v1/rooms/..%2F..%2Fetc%2Fpasswd",
            vec![auth],
            None,
            StatusCode::NOT_FOUND,
        ),
    ];
    for (what, method, path, headers, body, want) in rest_cases {
        let (status, code) = rest(&http, &server, method, path, &headers, body).await;
        assert_eq!(status, want, "{what}: got {status} {code:?}");
        assert!(code.is_some(), "{what}: an error body with a code");
        checked += 1;
    }
    for size in [200 << 10, 3 << 20] {
        let (status, code) = oversized_post(&server, "/v1/rooms", &bearer, size).await;
        assert_eq!(status, 413, "a {size}-byte body: got {status} {code:?}");
        assert_eq!(
            code.as_deref(),
            Some("payload_too_large"),
            "a {size}-byte body"
        );
        checked += 1;
    }

    // --- Signalling ---------------------------------------------------
    let url = format!(
        "ws://{}/v1/rtc?access_token={}",
        server.http_addr,
        common::join_token(&server, room, "mallory")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "joined");
    let garbage_sdp = "v=0\r\nthis is not sdp at all\r\n\0\0\0";
    let no_ice = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\na=fingerprint:sha-256 00:11\r\na=setup:actpass\r\n";
    let many_sections: String =
        std::iter::once("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n".to_owned())
            .chain((0..400).map(|i| format!("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{i}\r\n")))
            .collect();
    let offer = |sdp: &str| json!({"type": "offer", "target": "publisher", "sdp": sdp}).to_string();
    let ws_cases: Vec<(&str, Message, &str)> = vec![
        ("invalid JSON", Message::Text("{\"type\":".into()), "bad_message"),
        ("a number for a type", Message::Text(r#"{"type":1}"#.into()), "bad_message"),
        ("a wrong field type", Message::Text(r#"{"type":"offer","target":5,"sdp":"x"}"#.into()), "bad_message"),
        ("an unknown type", Message::Text(r#"{"type":"selfDestruct"}"#.into()), "unknown_type"),
        ("a 70 KB message", Message::Text(format!(r#"{{"type":"ping","x":"{}"}}"#, "x".repeat(70_000)).into()), "bad_message"),
        ("a binary frame", Message::Binary(vec![0u8; 64].into()), "bad_message"),
        ("an answer where the server never offers", Message::Text(r#"{"type":"answer","target":"publisher","sdp":"v=0"}"#.into()), "bad_state"),
        ("an unparseable answer to the server's offer", Message::Text(r#"{"type":"answer","target":"subscriber","sdp":"v=0"}"#.into()), "bad_sdp"),
        ("a candidate for a connection that does not exist", Message::Text(r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ host","sdpMid":"0"}}"#.into()), "bad_state"),
        ("muting another's track", Message::Text(r#"{"type":"mute","trackSid":"TR_notyours","muted":true}"#.into()), "not_allowed"),
        ("a subscription to an unknown track", Message::Text(r#"{"type":"updateSubscription","trackSid":"TR_nope","quality":"low"}"#.into()), "not_allowed"),
        ("garbage SDP with NULs", Message::Text(offer(garbage_sdp).into()), "bad_sdp"),
        ("an SDP without ICE credentials", Message::Text(offer(no_ice).into()), "bad_sdp"),
        ("an SDP with 400 media sections", Message::Text(offer(&many_sections).into()), "not_allowed"),
    ];
    for (what, msg, code) in ws_cases {
        ws.send(msg).await.unwrap();
        let reply = next(&mut ws).await;
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], code, "{what}: {reply}");
        checked += 1;
    }
    // An offer of codecs the server does not forward: answered with every
    // section rejected, or refused; either way nothing else changes.
    let h265_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 98\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99\r\na=setup:actpass\r\na=rtpmap:98 H265/90000\r\n";
    ws.send(Message::Text(offer(h265_only).into()))
        .await
        .unwrap();
    let reply = next(&mut ws).await;
    match reply["type"].as_str() {
        Some("error") => assert_eq!(reply["code"], "bad_sdp", "{reply}"),
        Some("answer") => assert!(
            !reply["sdp"].as_str().unwrap().contains("H265"),
            "no codec the server cannot forward is accepted: {reply}"
        ),
        _ => panic!("unsupported codecs only: {reply}"),
    }
    checked += 1;
    // Still served.
    ws.send(Message::Text(r#"{"type":"ping","ts":1}"#.into()))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await["type"], "pong");
    // Reconnects that name no session of theirs: bob's sid with mallory's
    // token, and a made-up sid.
    let bob_sid = bob.sid.clone();
    let mallory = common::join_token(&server, room, "mallory");
    for (what, sid) in [
        ("another's session", bob_sid.as_str()),
        ("an unknown session", "PA_nothere"),
    ] {
        let url = format!(
            "ws://{}/v1/rtc?access_token={mallory}&reconnect=1&sid={sid}",
            server.http_addr
        );
        let (mut resume, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let reply = next(&mut resume).await;
        assert_eq!(reply["code"], "session_not_found", "{what}: {reply}");
        checked += 1;
    }
    let no_sid = format!(
        "ws://{}/v1/rtc?access_token={mallory}&reconnect=1",
        server.http_addr
    );
    match tokio_tungstenite::connect_async(no_sid).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::BAD_REQUEST)
        }
        other => panic!("a reconnect without a sid: {other:?}"),
    }
    checked += 1;

    // --- Media port ---------------------------------------------------
    let before = loadtest::metrics::scrape(&server.base_url()).await.unwrap();
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rtp_v0 = vec![0u8; 200];
    rtp_v0[1] = 96;
    let mut rtcp_garbage = vec![0x80u8, 200, 0, 40];
    rtcp_garbage.extend_from_slice(&[0xAB; 160]);
    let datagrams: Vec<(&str, Vec<u8>)> = vec![
        ("an empty datagram", Vec::new()),
        ("truncated RTP", vec![0x80, 96, 0, 1, 0]),
        ("RTP with version 0", rtp_v0),
        ("RTCP-shaped garbage", rtcp_garbage),
        (
            "1200 random bytes",
            (0..1200u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("1500 bytes of 0xFF", vec![0xFF; 1500]),
        (
            "a STUN binding request with a wrong ufrag",
            stun_binding("nope:x", None),
        ),
        (
            "a truncated STUN binding request",
            stun_binding("nope:x", Some(23)),
        ),
        (
            "a STUN request naming a huge username",
            stun_binding(&"u".repeat(500), None),
        ),
    ];
    for (_, d) in &datagrams {
        udp.send_to(d, server.media_addr).await.unwrap();
        checked += 1;
    }
    // Dropped without a connection ever seeing them.
    let base = server.base_url();
    let sent = datagrams.len() as f64;
    common::eventually(Duration::from_secs(5), || {
        let base = base.clone();
        let before = before.clone();
        async move {
            let now = loadtest::metrics::scrape(&base)
                .await
                .map_err(|e| e.to_string())?;
            let key = "sfu_datagrams_unrouted_total";
            let dropped = now[key] - before[key];
            (dropped >= sent)
                .then_some(())
                .ok_or(format!("{dropped} of {sent} counted as unrouted"))
        }
    })
    .await;

    assert!(checked >= 30, "{checked} hostile inputs");

    // The call went on: bob keeps receiving alice, alice's video and audio
    // arrive intact, and nobody was told anyone left.
    let mark = video_from(&bob_view, &alice_sid);
    wait_for(Duration::from_secs(5), "bob still receives alice", || {
        video_from(&bob_view, &alice_sid) >= mark + 50
    })
    .await;
    assert_eq!(bob_view.inbox.lock().unwrap().corrupted, 0);
    assert!(!bob_view.has_message(|m| m["type"] == "participantLeft" && m["identity"] == "alice"));
    let health = http
        .get(format!("{}/healthz", server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    running.store(false, Ordering::Relaxed);
    let alice = sender.await.unwrap();
    alice.close().await;
    bob.close().await;
}
