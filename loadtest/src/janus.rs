//! Janus VideoRoom as a load-test target, so the same scenarios run
//! against Janus and against this server in one benchmark run.
//!
//! It speaks Janus's own WebSocket API (subprotocol `janus-protocol`): a
//! session per client, a `janus.plugin.videoroom` handle to publish on and
//! one to subscribe on (Janus 1.x multistream: one subscriber connection
//! carries every feed). Media and measurement are the same synthetic
//! publishers and subscribers as for our server ([`crate::client`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How long a request may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;
/// Per handle: where Janus's messages about it that answer no request go
/// (`trickle`, `webrtcup`, `media`, `hangup`, ...).
type Trickles = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Value>>>>;

/// One Janus session over one WebSocket.
pub struct Session {
    pub id: u64,
    tx: mpsc::UnboundedSender<String>,
    pending: Pending,
    trickles: Trickles,
    next: AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// Connects to `url` (`ws://host:port`) and creates a session.
    pub async fn connect(url: &str) -> anyhow::Result<Session> {
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "janus-protocol".parse()?);
        let (ws, _) = crate::tls::connect(request)
            .await
            .with_context(|| format!("connecting to Janus at {url}"))?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let pending: Pending = Arc::default();
        let trickles: Trickles = Arc::default();
        let writer = tokio::spawn(async move {
            while let Some(text) = rx.recv().await {
                // An empty message (see `close`): everything before it is
                // sent; close the socket.
                if text.is_empty() {
                    let _ = sink.close().await;
                    break;
                }
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let reader = {
            let pending = pending.clone();
            let trickles = trickles.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    route(&v, &pending, &trickles);
                }
            })
        };
        let mut session = Session {
            id: 0,
            tx,
            pending,
            trickles,
            next: AtomicU64::new(1),
            tasks: vec![writer, reader],
        };
        let reply = session.call(json!({"janus": "create"})).await?;
        session.id = reply["data"]["id"]
            .as_u64()
            .context("session id in Janus's reply")?;
        // Janus drops sessions silent for `session_timeout` (60 s by
        // default).
        let (tx, id) = (session.tx.clone(), session.id);
        session.tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(20));
            tick.tick().await;
            loop {
                tick.tick().await;
                let msg = json!({"janus": "keepalive", "session_id": id, "transaction": "ka"});
                if tx.send(msg.to_string()).is_err() {
                    break;
                }
            }
        }));
        Ok(session)
    }

    /// Sends `msg` with a fresh transaction and waits for its final reply
    /// (`success`, `event` or `error`; an `ack` only says an event follows).
    async fn call(&self, mut msg: Value) -> anyhow::Result<Value> {
        let transaction = format!("t{}", self.next.fetch_add(1, Ordering::Relaxed));
        msg["transaction"] = json!(transaction);
        if self.id != 0 {
            msg["session_id"] = json!(self.id);
        }
        let (done, reply) = oneshot::channel();
        self.pending
            .lock()
            .unwrap()
            .insert(transaction.clone(), done);
        self.tx
            .send(msg.to_string())
            .map_err(|_| anyhow::anyhow!("Janus connection closed"))?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, reply)
            .await
            .map_err(|_| {
                self.pending.lock().unwrap().remove(&transaction);
                anyhow::anyhow!("no reply from Janus within {REPLY_TIMEOUT:?} to {msg}")
            })?
            .map_err(|_| anyhow::anyhow!("Janus connection closed"))?;
        if reply["janus"] == "error" {
            bail!("Janus error: {}", reply["error"]);
        }
        if let Some(err) = reply["plugindata"]["data"]["error"].as_str() {
            bail!("VideoRoom error: {err}");
        }
        Ok(reply)
    }

    /// Attaches a VideoRoom handle; Janus's messages about it that answer no
    /// request (trickled candidates, `webrtcup`, ...) go to the returned
    /// receiver.
    pub async fn attach(&self) -> anyhow::Result<(u64, mpsc::UnboundedReceiver<Value>)> {
        let reply = self
            .call(json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}))
            .await?;
        let handle = reply["data"]["id"].as_u64().context("handle id")?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.trickles.lock().unwrap().insert(handle, tx);
        Ok((handle, rx))
    }

    /// A VideoRoom request on `handle`, with an optional JSEP; the plugin's
    /// data and JSEP from the reply.
    pub async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<(Value, Option<Value>)> {
        let mut msg = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(jsep) = jsep {
            msg["jsep"] = jsep;
        }
        let reply = self.call(msg).await?;
        let jsep = reply.get("jsep").cloned();
        Ok((reply["plugindata"]["data"].clone(), jsep))
    }

    /// A sender of trickled candidates for `handle` (Janus's format).
    pub fn trickler(&self, handle: u64) -> impl Fn(Value) + Send + Sync + 'static {
        let (tx, session) = (self.tx.clone(), self.id);
        move |candidate: Value| {
            let msg = json!({
                "janus": "trickle", "session_id": session, "handle_id": handle,
                "transaction": "trickle", "candidate": candidate,
            });
            let _ = tx.send(msg.to_string());
        }
    }

    pub async fn close(mut self) {
        let _ = self.tx.send(
            json!({"janus": "destroy", "session_id": self.id, "transaction": "bye"}).to_string(),
        );
        let _ = self.tx.send(String::new());
        // The writer ends once it has sent the destroy and closed the
        // socket (bounded, should Janus stop reading).
        let mut writer = self.tasks.remove(0);
        if tokio::time::timeout(REPLY_TIMEOUT, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Hands a message from Janus to whoever waits for it.
fn route(v: &Value, pending: &Pending, trickles: &Trickles) {
    match v["janus"].as_str() {
        Some("ack") => {}
        Some("success" | "error" | "event")
            if v["transaction"]
                .as_str()
                .is_some_and(|t| pending.lock().unwrap().contains_key(t)) =>
        {
            let t = v["transaction"].as_str().unwrap_or_default();
            if let Some(done) = pending.lock().unwrap().remove(t) {
                let _ = done.send(v.clone());
            }
        }
        _ => {
            let handle = v["sender"].as_u64().unwrap_or_default();
            if let Some(tx) = trickles.lock().unwrap().get(&handle) {
                let _ = tx.send(v.clone());
            }
        }
    }
}

/// Creates a VideoRoom room for a run (no secret, no recording, VP8 and
/// Opus, no bitrate cap, no periodic keyframe requests).
pub async fn create_room(url: &str, room: u64, publishers: usize) -> anyhow::Result<()> {
    let session = Session::connect(url).await?;
    let (handle, _) = session.attach().await?;
    let (data, _) = session
        .message(
            handle,
            json!({
                "request": "create", "room": room, "publishers": publishers.max(1),
                "videocodec": "vp8", "audiocodec": "opus", "bitrate": 0,
                "fir_freq": 0, "permanent": false, "description": "loadtest",
            }),
            None,
        )
        .await?;
    anyhow::ensure!(
        data["videoroom"] == "created",
        "creating Janus room {room}: {data}"
    );
    session.close().await;
    Ok(())
}

/// This machine's address on the interface of its default route (no packet
/// is sent), or loopback when there is none: where Janus gathers host
/// candidates.
pub fn local_ip() -> std::net::IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")
                .or_else(|_| s.connect("10.255.255.255:9"))?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}
