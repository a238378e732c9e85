//! REST API and signalling auth against the real server on port 0: every
//! endpoint's success path and its 400/401/403/404 paths.

mod common;

use std::time::Duration;

use common::admin_token;
use common::{eventually, next_json, start_server, wait_for, Client};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sfu_server::auth::{join_claims, unix_now, Keys};
use sfu_server::RunningServer;
use tokio_tungstenite::tungstenite::Message;

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(server: &RunningServer) -> Api {
        Api {
            base: server.base_url(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn assert_error(got: (StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(got.1["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn rooms_crud_and_auth() {
    use reqwest::Method;
    let server = start_server().await;
    let api = Api::new(&server);
    let all = admin_token(&server, "", true, true, true);

    assert_eq!(
        api.call(Method::GET, "/healthz", None, None).await.0,
        StatusCode::OK
    );

    // 401: no token, garbage, wrong secret, expired.
    assert_error(
        api.call(Method::GET, "/v1/rooms", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        api.call(Method::GET, "/v1/rooms", Some("garbage"), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let forged = Keys::new(server.keys.api_key.clone(), "some-other-secret-entirely");
    let mut claims = join_claims(&forged, "r", "x", "", 60);
    claims.video.room_list = true;
    assert_error(
        api.call(Method::GET, "/v1/rooms", Some(&forged.sign(&claims)), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let mut expired = join_claims(&server.keys, "r", "x", "", 60);
    expired.video.room_list = true;
    expired.exp = unix_now() - 3600;
    assert_error(
        api.call(
            Method::GET,
            "/v1/rooms",
            Some(&server.keys.sign(&expired)),
            None,
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    // 403: a join token has no admin grants.
    let join = common::join_token(&server, "r", "x");
    assert_error(
        api.call(Method::GET, "/v1/rooms", Some(&join), None).await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
    assert_error(
        api.call(
            Method::POST,
            "/v1/rooms",
            Some(&join),
            Some(json!({"name":"a"})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );

    // Create: 201, then 409, then 400 for bad bodies.
    let (status, room) = api
        .call(
            Method::POST,
            "/v1/rooms",
            Some(&all),
            Some(json!({"name":"standup","maxParticipants":5})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    assert_eq!(room["name"], "standup");
    assert_eq!(room["maxParticipants"], 5);
    assert!(room["sid"].as_str().unwrap().starts_with("RM_"));
    assert_error(
        api.call(
            Method::POST,
            "/v1/rooms",
            Some(&all),
            Some(json!({"name":"standup"})),
        )
        .await,
        StatusCode::CONFLICT,
        "already_exists",
    );
    assert_error(
        api.call(
            Method::POST,
            "/v1/rooms",
            Some(&all),
            Some(json!({"name":""})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        api.call(
            Method::POST,
            "/v1/rooms",
            Some(&all),
            Some(json!({"nom":"x"})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let raw = api
        .http
        .post(format!("{}/v1/rooms", api.base))
        .bearer_auth(&all)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    // List and get.
    let (status, list) = api.call(Method::GET, "/v1/rooms", Some(&all), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["rooms"].as_array().unwrap().len(), 1);
    let (status, got) = api
        .call(Method::GET, "/v1/rooms/standup", Some(&all), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["numParticipants"], 0);
    assert_error(
        api.call(Method::GET, "/v1/rooms/nope", Some(&all), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let other_admin = admin_token(&server, "elsewhere", false, false, true);
    assert_error(
        api.call(Method::GET, "/v1/rooms/standup", Some(&other_admin), None)
            .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );

    // Participants: a real client joins, is listed, and is removed.
    let client = Client::join(&server, "standup", "alice", 1, false).await;
    let (status, parts) = api
        .call(
            Method::GET,
            "/v1/rooms/standup/participants",
            Some(&all),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(parts["participants"][0]["identity"], "alice");
    assert!(parts["participants"][0]["sid"]
        .as_str()
        .unwrap()
        .starts_with("PA_"));
    let room_admin = admin_token(&server, "standup", false, false, true);
    assert_eq!(
        api.call(
            Method::GET,
            "/v1/rooms/standup/participants",
            Some(&room_admin),
            None
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_error(
        api.call(
            Method::GET,
            "/v1/rooms/standup/participants",
            Some(&other_admin),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
    assert_error(
        api.call(Method::GET, "/v1/rooms/nope/participants", Some(&all), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        api.call(
            Method::DELETE,
            "/v1/rooms/standup/participants/bob",
            Some(&all),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        api.call(
            Method::DELETE,
            "/v1/rooms/standup/participants/alice",
            Some(&join),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
    let (status, _) = api
        .call(
            Method::DELETE,
            "/v1/rooms/standup/participants/alice",
            Some(&all),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let view = client.view();
    wait_for(Duration::from_secs(5), "leave(removed)", || {
        view.has_message(|m| m["type"] == "leave" && m["reason"] == "removed")
    })
    .await;
    eventually(Duration::from_secs(5), || async {
        let (_, got) = api
            .call(Method::GET, "/v1/rooms/standup", Some(&all), None)
            .await;
        (got["numParticipants"] == 0)
            .then_some(())
            .ok_or(format!("participant not removed: {got}"))
    })
    .await;

    // Delete.
    assert_error(
        api.call(Method::DELETE, "/v1/rooms/standup", Some(&room_admin), None)
            .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
    assert_eq!(
        api.call(Method::DELETE, "/v1/rooms/standup", Some(&all), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        api.call(Method::DELETE, "/v1/rooms/standup", Some(&all), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        api.call(Method::GET, "/v1/nothing-here", Some(&all), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    client.close().await;
}

#[tokio::test]
async fn tokens_are_minted_and_checked() {
    use reqwest::Method;
    let server = start_server().await;
    let api = Api::new(&server);
    let all = admin_token(&server, "", true, true, true);
    let (status, minted) = api
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&all),
            Some(json!({"room":"r1","identity":"zoe","canPublish":false,"ttlSecs":120})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let claims = server
        .keys
        .verify(minted["token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.sub, "zoe");
    assert_eq!(claims.video.room, "r1");
    assert!(claims.video.room_join);
    assert_eq!(claims.video.can_publish, Some(false));
    assert_eq!(claims.video.can_subscribe, Some(true));
    assert!(claims.exp <= unix_now() + 121 && claims.exp >= unix_now() + 100);
    assert_eq!(minted["expiresAt"], claims.exp);

    assert_error(
        api.call(
            Method::POST,
            "/v1/tokens",
            None,
            Some(json!({"room":"r1","identity":"z"})),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let join = common::join_token(&server, "r1", "x");
    assert_error(
        api.call(
            Method::POST,
            "/v1/tokens",
            Some(&join),
            Some(json!({"room":"r1","identity":"z"})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
    let other_admin = admin_token(&server, "r2", false, false, true);
    assert_error(
        api.call(
            Method::POST,
            "/v1/tokens",
            Some(&other_admin),
            Some(json!({"room":"r1","identity":"z"})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
    assert_error(
        api.call(
            Method::POST,
            "/v1/tokens",
            Some(&all),
            Some(json!({"room":"r1"})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        api.call(
            Method::POST,
            "/v1/tokens",
            Some(&all),
            Some(json!({"room":"r1","identity":"z","ttlSecs":0})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        api.call(
            Method::POST,
            "/v1/tokens",
            Some(&all),
            Some(json!({"room":"bad room!","identity":"z"})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // The dev-only token endpoint exists in dev mode.
    let (status, dev) = api
        .call(Method::GET, "/dev/token?room=r1&identity=dev", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        server
            .keys
            .verify(dev["token"].as_str().unwrap())
            .unwrap()
            .sub,
        "dev"
    );
}

#[tokio::test]
async fn dev_token_endpoint_is_absent_outside_dev_mode() {
    let mut config = common::test_config();
    config.api_key = Some("prodkey".into());
    config.api_secret = Some(sfu_server::config::Secret(
        "a-production-secret-of-length".into(),
    ));
    let server = sfu_server::start(&config).await.unwrap();
    assert!(!server.dev_mode);
    let resp = reqwest::get(format!("{}/dev/token?room=r", server.base_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

async fn ws_connect(
    server: &RunningServer,
    token: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    u16,
> {
    let url = format!("ws://{}/v1/rtc?access_token={token}", server.http_addr);
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected ws error {e}"),
    }
}

#[tokio::test]
async fn signalling_rejects_bad_tokens_and_bad_messages_without_harm() {
    let server = start_server().await;
    // Bad, expired and admin-only tokens are refused before the upgrade.
    assert_eq!(ws_connect(&server, "nonsense").await.err(), Some(401));
    let mut expired = join_claims(&server.keys, "r", "x", "", 60);
    expired.exp = unix_now() - 3600;
    assert_eq!(
        ws_connect(&server, &server.keys.sign(&expired)).await.err(),
        Some(401)
    );
    let admin = admin_token(&server, "r", true, true, true);
    assert_eq!(ws_connect(&server, &admin).await.err(), Some(403));

    // A watcher in the same room must be unaffected by a misbehaving peer.
    let watcher = Client::join(&server, "r", "watcher", 1, false).await;
    let token = common::join_token(&server, "r", "mallory");
    let mut ws = ws_connect(&server, &token).await.expect("connect");
    let joined = next_json(&mut ws).await;
    assert_eq!(joined["type"], "joined");
    assert_eq!(joined["protocol"], 1);
    let cases = [
        ("{not json", "bad_message"),
        (r#"{"no":"type"}"#, "bad_message"),
        (r#"{"type":"teleport"}"#, "unknown_type"),
        (r#"{"type":"offer","target":"publisher"}"#, "bad_message"),
        (
            r#"{"type":"offer","target":"publisher","sdp":"this is not sdp"}"#,
            "bad_sdp",
        ),
        (
            r#"{"type":"answer","target":"subscriber","sdp":"v=0"}"#,
            "bad_state",
        ),
        (
            r#"{"type":"answer","target":"publisher","sdp":"v=0"}"#,
            "bad_state",
        ),
        (
            r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ host"}}"#,
            "bad_state",
        ),
        (
            r#"{"type":"mute","trackSid":"TR_nope","muted":true}"#,
            "not_allowed",
        ),
    ];
    for (text, code) in cases {
        ws.send(Message::Text(text.into())).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "for {text}: {reply}");
        assert_eq!(reply["code"], code, "for {text}: {reply}");
    }
    let huge = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(70_000));
    ws.send(Message::Text(huge.into())).await.unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["code"], "bad_message", "{reply}");
    // Still connected and served.
    ws.send(Message::Text(r#"{"type":"ping","ts":7}"#.into()))
        .await
        .unwrap();
    let pong = next_json(&mut ws).await;
    assert_eq!(pong, json!({"type":"pong","ts":7.0}));
    // The watcher saw mallory join and nothing else went wrong for it.
    let view = watcher.view();
    assert!(view.has_message(
        |m| m["type"] == "participantJoined" && m["participant"]["identity"] == "mallory"
    ));
    assert!(view.messages_of("error").is_empty());
    // Closing the socket normally is a leave.
    ws.close(None).await.unwrap();
    wait_for(
        Duration::from_secs(5),
        "participantLeft for mallory",
        || view.has_message(|m| m["type"] == "participantLeft" && m["identity"] == "mallory"),
    )
    .await;
    watcher.close().await;
}

#[tokio::test]
async fn room_lifecycle_full_duplicate_delete_and_empty_timeout() {
    use reqwest::Method;
    let server = start_server().await;
    let api = Api::new(&server);
    let all = admin_token(&server, "", true, true, true);

    // A room capped at one participant refuses the second.
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/rooms",
            Some(&all),
            Some(json!({"name":"solo","maxParticipants":1})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let first = Client::join(&server, "solo", "one", 1, false).await;
    let mut ws = ws_connect(&server, &common::join_token(&server, "solo", "two"))
        .await
        .expect("upgrade");
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("full"),
        "{refused}"
    );

    // Joining again with the same identity replaces the old session.
    let again = Client::join(&server, "solo", "one", 2, false).await;
    let old = first.view();
    wait_for(
        Duration::from_secs(5),
        "old session told duplicate_identity",
        || old.has_message(|m| m["type"] == "leave" && m["reason"] == "duplicate_identity"),
    )
    .await;
    let (_, parts) = api
        .call(Method::GET, "/v1/rooms/solo/participants", Some(&all), None)
        .await;
    assert_eq!(parts["participants"].as_array().unwrap().len(), 1);
    assert_eq!(parts["participants"][0]["sid"], again.sid.as_str());

    // Deleting the room tells its participant and the room is gone.
    assert_eq!(
        api.call(Method::DELETE, "/v1/rooms/solo", Some(&all), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let view = again.view();
    wait_for(Duration::from_secs(5), "leave(room_deleted)", || {
        view.has_message(|m| m["type"] == "leave" && m["reason"] == "room_deleted")
    })
    .await;

    // An empty room closes after the empty timeout (1 s here).
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/rooms",
            Some(&all),
            Some(json!({"name":"brief","emptyTimeoutSecs":1})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    eventually(Duration::from_secs(5), || async {
        let (status, _) = api
            .call(Method::GET, "/v1/rooms/brief", Some(&all), None)
            .await;
        (status == StatusCode::NOT_FOUND)
            .then_some(())
            .ok_or("empty room still open".to_owned())
    })
    .await;
    first.close().await;
    again.close().await;
}

#[tokio::test]
async fn shutdown_tells_participants() {
    let server = start_server().await;
    let client = Client::join(&server, "r", "alice", 1, false).await;
    let view = client.view();
    server.shutdown(Duration::from_secs(2)).await;
    wait_for(Duration::from_secs(5), "leave(server_shutdown)", || {
        view.has_message(|m| m["type"] == "leave" && m["reason"] == "server_shutdown")
    })
    .await;
    client.close().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_spare_others() {
    use sfu_server::limits::Rate;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let mut config = common::test_config();
    config.rest_rate_limit = Rate {
        per_second: 1.0,
        burst: 3,
    };
    config.connect_rate_limit = Rate {
        per_second: 1.0,
        burst: 2,
    };
    config.signal_rate_limit = Rate {
        per_second: 5.0,
        burst: 10,
    };
    // Loopback is what this test has: limit it too.
    config.limit_loopback = true;
    let server = sfu_server::start(&config).await.expect("server starts");
    let api = Api::new(&server);
    let admin = admin_token(&server, "", true, true, true);

    // REST: the burst passes, then 429 with Retry-After and the error shape.
    for _ in 0..3 {
        let (status, _) = api
            .call(reqwest::Method::GET, "/v1/rooms", Some(&admin), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let resp = api
        .http
        .get(format!("{}/v1/rooms", api.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Health and metrics are not limited.
    let health = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // Signalling connects: two pass, the third is refused before the
    // upgrade.
    let token = |who: &str| common::join_token(&server, "limits", who);
    let mut flooder = ws_connect(&server, &token("flooder")).await.expect("first");
    let joined = next_json(&mut flooder).await;
    assert_eq!(joined["type"], "joined");
    let watcher = Client::join(&server, "limits", "watcher", 1, false).await;
    assert_eq!(ws_connect(&server, &token("third")).await.err(), Some(429));

    // A session flooding signalling: the burst is read, the rest ignored,
    // with one rate_limited error for the whole stretch.
    let ping = json!({"type": "ping", "ts": 1}).to_string();
    for _ in 0..60 {
        flooder
            .send(Message::Text(ping.clone().into()))
            .await
            .unwrap();
    }
    let (mut pongs, mut limited) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(300), flooder.next()).await
        else {
            break;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if v["code"] == "rate_limited" => limited += 1,
            _ => {}
        }
    }
    assert!((10..=12).contains(&pongs), "{pongs} pongs");
    assert_eq!(limited, 1, "one error for the stretch");
    let metrics = loadtest::metrics::scrape(&server.base_url()).await.unwrap();
    assert!(metrics["sfu_signal_messages_rate_limited_total"] >= 48.0);
    assert!(metrics["sfu_http_requests_rate_limited_total"] >= 2.0);
    // The flooder's session and the room go on: after a pause it is heard
    // again, and the watcher never left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let heard = loop {
        tick.tick().await;
        flooder
            .send(Message::Text(ping.clone().into()))
            .await
            .unwrap();
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(200), flooder.next()).await
        {
            if t.contains("pong") {
                break true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
    };
    assert!(heard, "the flooder is heard again after a pause");
    assert!(!watcher.view().has_message(|m| m["type"] == "leave"));
    watcher.close().await;
}

#[tokio::test]
async fn caps_on_rooms_and_tracks_refuse_clearly() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let mut config = common::test_config();
    config.max_rooms = 1;
    config.max_tracks_per_participant = 2;
    let server = sfu_server::start(&config).await.expect("server starts");
    let api = Api::new(&server);
    let admin = admin_token(&server, "", true, true, true);
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/rooms",
            Some(&admin),
            Some(json!({"name": "one"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_error(
        api.call(
            reqwest::Method::POST,
            "/v1/rooms",
            Some(&admin),
            Some(json!({"name": "two"})),
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "limit_reached",
    );
    // Joining a room that does not exist would open a second one.
    let mut ws = ws_connect(&server, &common::join_token(&server, "two", "x"))
        .await
        .expect("upgrade");
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["type"], "error");
    assert!(refused["message"]
        .as_str()
        .unwrap()
        .contains("maximum of 1 rooms"));

    // An offer with more media sections than the track cap: refused, and
    // the session goes on.
    let mut ws = ws_connect(&server, &common::join_token(&server, "one", "y"))
        .await
        .expect("upgrade");
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    let mut sdp = String::from("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n");
    for i in 0..300 {
        sdp.push_str(&format!(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:{i}\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n"
        ));
    }
    let offer = json!({"type": "offer", "target": "publisher", "sdp": sdp});
    ws.send(Message::Text(offer.to_string().into()))
        .await
        .unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "not_allowed", "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("300 media sections"));
    let ping = json!({"type": "ping", "ts": 7});
    ws.send(Message::Text(ping.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

#[tokio::test]
async fn a_room_closes_after_its_last_participant_leaves_and_an_unjoined_one_waits() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let mut config = common::test_config();
    config.departure_timeout = 1;
    config.empty_room_timeout = 300;
    let server = sfu_server::start(&config).await.expect("server starts");
    let api = Api::new(&server);
    let admin = admin_token(&server, "", true, true, true);
    for name in ["visited", "unvisited"] {
        let (status, _) = api
            .call(
                reqwest::Method::POST,
                "/v1/rooms",
                Some(&admin),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let guest = Client::join(&server, "visited", "guest", 1, false).await;
    guest.send(json!({"type": "leave"}));
    guest.close().await;
    let started = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), || async {
        let (status, _) = api
            .call(
                reqwest::Method::GET,
                "/v1/rooms/visited",
                Some(&admin),
                None,
            )
            .await;
        (status == StatusCode::NOT_FOUND)
            .then_some(())
            .ok_or(format!("visited room still there: {status}"))
    })
    .await;
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900),
        "{closed_after:?}"
    );
    // The room nobody joined keeps its own, longer timeout.
    let (status, _) = api
        .call(
            reqwest::Method::GET,
            "/v1/rooms/unvisited",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn sessions_get_fresh_tokens_before_theirs_expire() {
    let server = start_server().await;
    // A token living 4 s: a fresh one comes after about 2 s, with the same
    // grants and a later expiry, and the session outlives the first token.
    let claims = join_claims(&server.keys, "refresh", "rita", "Rita", 4);
    let mut ws = ws_connect(&server, &server.keys.sign(&claims))
        .await
        .expect("joins");
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    let fresh = loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "tokenRefresh" {
            break m["token"].as_str().unwrap().to_owned();
        }
    };
    let renewed = server
        .keys
        .verify(&fresh)
        .expect("the fresh token verifies");
    assert_eq!(renewed.sub, "rita");
    assert_eq!(renewed.video, claims.video);
    assert!(renewed.exp > claims.exp, "{} > {}", renewed.exp, claims.exp);
    // A second one follows, and after the first token's expiry the
    // session is still served.
    let second = loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "tokenRefresh" {
            break m["token"].as_str().unwrap().to_owned();
        }
    };
    assert!(server.keys.verify(&second).unwrap().exp >= renewed.exp);
    ws.send(Message::Text(r#"{"type":"ping","ts":3}"#.into()))
        .await
        .unwrap();
    loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "pong" {
            break;
        }
    }
    assert!(
        unix_now() + 1 >= claims.exp,
        "the first token has run out by now"
    );
}

#[tokio::test]
async fn turn_credentials_in_the_coturn_rest_form_over_rest_and_in_the_join_reply() {
    let mut config = common::test_config();
    config.stun_urls = vec!["stun:stun.example.com:3478".into()];
    config.turn_urls = vec![
        "turn:turn.example.com:3478?transport=udp".into(),
        "turns:turn.example.com:5349".into(),
    ];
    config.turn_secret = Some(sfu_server::config::Secret("turn-shared-secret".into()));
    config.turn_ttl = 600;
    let server = sfu_server::start(&config).await.expect("server starts");
    let api = Api::new(&server);
    let join = common::join_token(&server, "turn-room", "rita");
    let before = unix_now();
    let (status, body) = api
        .call(
            reqwest::Method::GET,
            "/v1/turn-credentials",
            Some(&join),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ttl"], 600);
    let servers = body["iceServers"].as_array().unwrap();
    assert_eq!(servers[0]["urls"][0], "stun:stun.example.com:3478");
    assert!(servers[0].get("username").is_none());
    let turn = &servers[1];
    assert_eq!(turn["urls"].as_array().unwrap().len(), 2);
    let username = turn["username"].as_str().unwrap();
    let (expiry, identity) = username.split_once(':').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    assert_eq!(identity, "rita");
    assert!(
        (before + 600..=unix_now() + 600).contains(&expiry),
        "{expiry}"
    );
    let (_, password) = sfu_server::turn::credentials("turn-shared-secret", "rita", expiry);
    assert_eq!(turn["credential"], password.as_str());

    // The join reply carries the same servers, with credentials of its own.
    let mut ws = ws_connect(&server, &join).await.expect("joins");
    let joined = next_json(&mut ws).await;
    let ice = joined["iceServers"].as_array().unwrap();
    assert_eq!(ice.len(), 2);
    assert!(ice[1]["username"].as_str().unwrap().ends_with(":rita"));

    // Only a join token gets credentials.
    assert_error(
        api.call(reqwest::Method::GET, "/v1/turn-credentials", None, None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let admin = admin_token(&server, "", true, true, true);
    assert_error(
        api.call(
            reqwest::Method::GET,
            "/v1/turn-credentials",
            Some(&admin),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
    );
}
