//! The real server started in this process, and participants that speak
//! its protocol (the load tester's `webrtc`-crate client).

#![allow(dead_code)]

use std::time::Duration;

#[allow(unused_imports)]
pub use loadtest::client::{PublishOptions, View};
use sfu_server::config::Config;
use sfu_server::RunningServer;

pub fn test_config() -> Config {
    Config::ephemeral()
}

pub async fn start_server() -> RunningServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    sfu_server::start(&test_config())
        .await
        .expect("server starts")
}

pub fn join_token(server: &RunningServer, room: &str, identity: &str) -> String {
    let claims = sfu_server::auth::join_claims(&server.keys, room, identity, identity, 600);
    server.keys.sign(&claims)
}

/// A REST token for `room` (empty: any room) with the given rights.
pub fn admin_token(
    server: &RunningServer,
    room: &str,
    create: bool,
    list: bool,
    admin: bool,
) -> String {
    let now = sfu_server::auth::unix_now();
    server.keys.sign(&sfu_server::auth::Claims {
        iss: server.keys.api_key.clone(),
        sub: "backend".into(),
        name: String::new(),
        exp: now + 600,
        nbf: now - 1,
        video: sfu_server::auth::VideoGrant {
            room: room.into(),
            room_create: create,
            room_list: list,
            room_admin: admin,
            ..Default::default()
        },
    })
}

/// `GET path` on the server's REST API with a bearer token, as JSON.
pub async fn get_json(server: &RunningServer, path: &str, token: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}{path}", server.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `cond` until it holds or `limit` passes.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    eventually(limit, || {
        let ok = cond();
        async move {
            if ok {
                Ok(())
            } else {
                Err(what.to_owned())
            }
        }
    })
    .await
}

/// Polls an asynchronous check every 20 ms until it passes; after `limit`
/// fails with the check's last complaint.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        match check().await {
            Ok(()) => return,
            Err(why) if tokio::time::Instant::now() >= deadline => {
                panic!("not within {limit:?}: {why}")
            }
            Err(_) => {}
        }
    }
}

/// A test participant: the load tester's client, joined to a server
/// started in this process.
pub struct Client(pub loadtest::client::Client);

impl std::ops::Deref for Client {
    type Target = loadtest::client::Client;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Client {
    /// Joins `room` as `identity`; if `publish`, offers a VP8 and an Opus
    /// track.
    pub async fn join(
        server: &RunningServer,
        room: &str,
        identity: &str,
        index: u8,
        publish: bool,
    ) -> Client {
        let token = join_token(server, room, identity);
        let options = PublishOptions {
            publish,
            ..Default::default()
        };
        let ws = format!("ws://{}", server.http_addr);
        Client(
            loadtest::client::Client::join(&ws, &token, identity, index, options)
                .await
                .expect("joins"),
        )
    }

    /// One small video frame (one packet, a keyframe every 10) and one
    /// audio packet.
    pub async fn send_media(&mut self) {
        self.0.send_media(100, 10).await;
    }

    pub async fn close(self) {
        self.0.close().await;
    }
}

/// The next JSON message on a signalling socket, within 5 s.
pub async fn next_json<S>(ws: &mut S) -> serde_json::Value
where
    S: futures::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures::StreamExt as _;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("message within 5 s")
            .expect("open")
            .expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}
