//! TURN providers chosen by configuration: Twilio's Network Traversal
//! Service and a static list. What clients get comes from
//! `/v1/turn-credentials` and the join reply.
//!
//! Twilio cannot be reached from here: its Tokens endpoint is played by a
//! local HTTP stand-in. The stand-in checks the request as Twilio documents
//! it (POST, HTTP basic auth with the account SID and auth token, a form
//! body with `Ttl`) and answers with a response in Twilio's recorded
//! format, or 401 for a wrong token.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use serde_json::{json, Value};

const SID: &str = "AC00000000000000000000000000000001";
const TOKEN: &str = "twilio-auth-token";

#[derive(Clone, Default)]
struct StandIn {
    requests: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

async fn tokens(
    State(stand_in): State<StandIn>,
    Path(sid): Path<String>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    stand_in.requests.fetch_add(1, Ordering::SeqCst);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{SID}:{TOKEN}"))
    );
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if sid != SID || !authorized {
        stand_in.refused.fetch_add(1, Ordering::SeqCst);
        let error = json!({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401});
        return (StatusCode::UNAUTHORIZED, axum::Json(error)).into_response();
    }
    let form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let ttl = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("Ttl="))
        .and_then(|t| t.parse::<u64>().ok());
    let (true, Some(ttl)) = (form, ttl) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("bad request body {body:?}"),
        )
            .into_response();
    };
    // The shape of Twilio's answer; the values are made up.
    axum::Json(json!({
        "account_sid": SID,
        "date_created": "Wed, 25 Nov 2026 10:00:00 +0000",
        "date_updated": "Wed, 25 Nov 2026 10:00:00 +0000",
        "ice_servers": [
            {"url": "stun:global.stun.twilio.com:3478", "urls": "stun:global.stun.twilio.com:3478"},
            {"credential": "pw-1", "url": "turn:global.turn.twilio.com:3478?transport=udp", "urls": "turn:global.turn.twilio.com:3478?transport=udp", "username": "user-1"},
            {"credential": "pw-1", "url": "turn:global.turn.twilio.com:3478?transport=tcp", "urls": "turn:global.turn.twilio.com:3478?transport=tcp", "username": "user-1"},
            {"credential": "pw-1", "url": "turn:global.turn.twilio.com:443?transport=tcp", "urls": "turn:global.turn.twilio.com:443?transport=tcp", "username": "user-1"}
        ],
        "password": "pw-1",
        "ttl": ttl.to_string(),
        "username": "user-1"
    }))
    .into_response()
}

async fn start_stand_in() -> (String, StandIn) {
    let stand_in = StandIn::default();
    let app = axum::Router::new()
        .route(
            "/2010-04-01/Accounts/{sid}/Tokens.json",
            axum::routing::post(tokens),
        )
        .with_state(stand_in.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, stand_in)
}

async fn twilio_server(api_base: &str, token: &str) -> sfu_server::RunningServer {
    let mut config = common::test_config();
    config.ice_provider = "twilio".into();
    config.twilio_api_base = api_base.into();
    config.twilio_account_sid = Some(SID.into());
    config.twilio_auth_token = Some(sfu_server::config::Secret(token.into()));
    sfu_server::start(&config).await.expect("server starts")
}

async fn credentials(server: &sfu_server::RunningServer, who: &str) -> Value {
    let token = common::join_token(server, "room", who);
    common::get_json(server, "/v1/turn-credentials", &token).await
}

#[tokio::test]
async fn twilio_servers_reach_clients_and_one_token_serves_many() {
    let (base, stand_in) = start_stand_in().await;
    let server = twilio_server(&base, TOKEN).await;
    for who in ["alice", "bob"] {
        let body = credentials(&server, who).await;
        let servers = body["iceServers"].as_array().unwrap();
        assert_eq!(servers.len(), 4, "{body}");
        let turn = servers
            .iter()
            .find(|s| s["urls"][0] == "turn:global.turn.twilio.com:3478?transport=udp")
            .expect("Twilio's TURN server");
        assert_eq!(turn["username"], "user-1");
        assert_eq!(turn["credential"], "pw-1");
    }
    // The join reply carries the same list.
    let client = common::Client::join(&server, "room", "carol", 1, false).await;
    let joined = client.view().messages_of("joined");
    assert!(
        joined[0]["iceServers"]
            .to_string()
            .contains("global.turn.twilio.com"),
        "{}",
        joined[0]
    );
    client.close().await;
    // One token, fetched once, for all three.
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1);
    assert_eq!(stand_in.refused.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refused_twilio_token_leaves_turn_out_without_failing_the_client() {
    let (base, stand_in) = start_stand_in().await;
    let server = twilio_server(&base, "a-wrong-token").await;
    let body = credentials(&server, "alice").await;
    assert_eq!(body["iceServers"], json!([]), "{body}");
    assert_eq!(stand_in.refused.load(Ordering::SeqCst), 1);
    // A refusal is remembered for a while: the next client does not ask.
    let body = credentials(&server, "carol").await;
    assert_eq!(body["iceServers"], json!([]), "{body}");
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1);
    // Joining still works.
    let client = common::Client::join(&server, "room", "bob", 1, false).await;
    client.close().await;
}

#[tokio::test]
async fn a_static_list_is_given_as_it_is() {
    let path = std::env::temp_dir().join(format!("ice-servers-{}.json", std::process::id()));
    let list = json!([
        {"urls": ["stun:stun.example.net:3478"]},
        {"urls": ["turns:turn.example.net:443?transport=tcp"], "username": "fixed", "credential": "secret"}
    ]);
    std::fs::write(&path, list.to_string()).unwrap();
    let mut config = common::test_config();
    config.ice_provider = "static".into();
    config.ice_servers_file = Some(path.clone());
    let server = sfu_server::start(&config).await.expect("server starts");
    let body = credentials(&server, "alice").await;
    assert_eq!(body["iceServers"], list);
    let _ = std::fs::remove_file(path);
    // A provider without what it needs is refused at start.
    let mut config = common::test_config();
    config.ice_provider = "twilio".into();
    let err = sfu_server::start(&config).await.err().expect("refused");
    assert!(err.to_string().contains("TWILIO_ACCOUNT_SID"), "{err}");
}
