//! HTTP: the REST API under `/v1`, the signalling WebSocket, the embedded
//! web assets and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use sfu_core::signal::{ClientMessage, ErrorCode, LeaveReason, ServerMessage};
use sfu_core::JoinRequest;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{join_claims, unix_now, AuthError, Claims, Keys};
use crate::limits::{Bucket, Rate, RateLimiter};
use crate::metrics::Metrics;
use crate::rooms::{CreateError, RoomCmd, RoomHandle, Rooms, ToClient, CLIENT_QUEUE};

#[derive(Clone)]
pub struct AppState {
    pub keys: Keys,
    pub rooms: Rooms,
    pub dev_mode: bool,
    pub metrics: Arc<Metrics>,
    /// REST requests per client address.
    pub rest_limiter: Arc<RateLimiter>,
    /// Signalling connects per client address.
    pub connect_limiter: Arc<RateLimiter>,
    /// Signalling messages per session.
    pub signal_rate: Rate,
    /// Redirect requests a proxy marks `X-Forwarded-Proto: http`.
    pub https_redirect: bool,
    /// Origins allowed cross-origin REST calls (`*`: any).
    pub cors_origins: Vec<String>,
    /// STUN/TURN servers for clients.
    pub ice: crate::turn::IceConfig,
}

/// An error in the documented shape `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn unauthorized(e: AuthError) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "permission_denied", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::info!(status = %self.status, code = self.code, message = %self.message, "request refused");
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request bodies are limited to {REST_BODY_LIMIT} bytes"),
            );
        }
        ApiError::bad_request(e.body_text())
    }
}

/// Largest REST request body: room and token requests are a few hundred
/// bytes.
const REST_BODY_LIMIT: usize = 64 * 1024;

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: AppState) -> Router {
    let mut rest = Router::new()
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{name}", get(get_room).delete(delete_room))
        .route("/v1/rooms/{name}/participants", get(list_participants))
        .route(
            "/v1/rooms/{name}/participants/{identity}",
            delete(remove_participant),
        )
        .route("/v1/tokens", post(mint_token))
        .route("/v1/turn-credentials", get(turn_credentials));
    if state.dev_mode {
        rest = rest.route("/dev/token", get(dev_token));
    }
    let rest = rest.layer(DefaultBodyLimit::max(REST_BODY_LIMIT));
    let rest = rest.route_layer(middleware::from_fn_with_state(
        state.clone(),
        |State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req, next| async move {
            limited(&s.rest_limiter, &s.metrics, peer, req, next).await
        },
    ));
    let signalling =
        Router::new()
            .route("/v1/rtc", get(rtc))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                |State(s): State<AppState>,
                 ConnectInfo(peer): ConnectInfo<SocketAddr>,
                 req,
                 next| async move {
                    limited(&s.connect_limiter, &s.metrics, peer, req, next).await
                },
            ));
    let router = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route("/", get(|| asset("index.html")))
        .route("/diagnostics", get(|| asset("diagnostics.html")))
        .route(
            "/sdk/{file}",
            get(|Path(file): Path<String>| asset_owned(file)),
        )
        .route(
            "/assets/{file}",
            get(|Path(file): Path<String>| asset_owned(file)),
        )
        .merge(rest)
        .merge(signalling)
        .fallback(fallback);
    let mut app = match cors(&state.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    if state.https_redirect {
        app = app.layer(middleware::from_fn(redirect_to_https));
    }
    app.with_state(state)
}

/// CORS for the configured origins; `None` when there are none (browsers
/// then refuse cross-origin calls, as by default).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::DELETE,
            ])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// Behind a TLS-terminating proxy: a request that reached the proxy over
/// plain HTTP is sent to the same URL over HTTPS.
async fn redirect_to_https(req: Request, next: Next) -> Response {
    let plain = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("http"));
    if !plain {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get("x-forwarded-host")
        .or_else(|| req.headers().get(header::HOST))
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', ' ', '@']));
    let Some(host) = host else {
        return ApiError::bad_request("no Host header to redirect to").into_response();
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, format!("https://{host}{path}"))],
    )
        .into_response()
}

/// Passes the request on if `peer`'s address is within its rate; otherwise
/// answers 429 with Retry-After. Refusals are counted, not logged one by
/// one: a flood must not become a flood of log lines.
async fn limited(
    limiter: &RateLimiter,
    metrics: &Metrics,
    peer: SocketAddr,
    req: Request,
    next: Next,
) -> Response {
    match limiter.check(peer.ip(), std::time::Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            metrics
                .requests_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, path = %req.uri().path(), "rate limited");
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(json!({"error": {
                    "code": "rate_limited",
                    "message": format!("too many requests from this address; retry in {secs} s"),
                }})),
            )
                .into_response()
        }
    }
}

/// Top-level paths name web assets (`/demo.js`); anything else is a 404
/// in the API's error shape.
async fn fallback(uri: axum::http::Uri) -> Response {
    let name = uri.path().trim_start_matches('/');
    if ASSETS.iter().any(|(n, _)| *n == name) || (WEB_DIR.get().is_some() && plain_name(name)) {
        return asset(name).await;
    }
    ApiError::not_found("no such endpoint").into_response()
}

const ASSETS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

async fn asset_owned(name: String) -> Response {
    asset(&name).await
}

/// When set (`--web-dir`), web assets are read from this directory on each
/// request instead of the copies built into the binary: for working on the
/// SDK and demo without rebuilding.
pub static WEB_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// A file name with no directory part, so it cannot leave the web directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\'])
}

async fn asset(name: &str) -> Response {
    let from_disk = match WEB_DIR.get() {
        Some(dir) if plain_name(name) => tokio::fs::read(dir.join(name)).await.ok(),
        _ => None,
    };
    let body: std::borrow::Cow<'static, [u8]> = match from_disk {
        Some(bytes) => bytes.into(),
        None => match ASSETS.iter().find(|(n, _)| *n == name) {
            Some((_, body)) => (*body).into(),
            None => return ApiError::not_found(format!("no asset {name}")).into_response(),
        },
    };
    let mime = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

fn bearer(state: &AppState, headers: &HeaderMap) -> ApiResult<Claims> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::unauthorized(AuthError::Missing))?
        .to_str()
        .map_err(|_| ApiError::unauthorized(AuthError::Invalid("not text".into())))?;
    let token = value.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::unauthorized(AuthError::Invalid("expected \"Bearer <token>\"".into()))
    })?;
    state
        .keys
        .verify(token.trim())
        .map_err(ApiError::unauthorized)
}

fn room_json(h: &RoomHandle) -> serde_json::Value {
    json!({
        "name": h.name,
        "sid": h.sid,
        "createdAt": h.created_at,
        "numParticipants": h.participants.load(Ordering::Relaxed),
        "maxParticipants": h.max_participants,
    })
}

fn valid_name(kind: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{kind} must be 1-128 characters of letters, digits, '-', '_', '.', '@'"
        )))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateRoom {
    name: String,
    #[serde(default)]
    max_participants: Option<usize>,
    #[serde(default)]
    empty_timeout_secs: Option<u64>,
}

async fn create_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateRoom>, JsonRejection>,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    if !claims.video.room_create {
        return Err(ApiError::forbidden("token lacks the roomCreate grant"));
    }
    let Json(body) = body?;
    valid_name("room name", &body.name)?;
    let empty_timeout = body.empty_timeout_secs.map(std::time::Duration::from_secs);
    match state
        .rooms
        .create(&body.name, body.max_participants, empty_timeout)
    {
        Ok(handle) => Ok((StatusCode::CREATED, Json(room_json(&handle))).into_response()),
        Err(CreateError::Exists) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("room {} already exists", body.name),
        )),
        Err(CreateError::Limit(max)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "limit_reached",
            format!("this server has its maximum of {max} rooms open"),
        )),
    }
}

async fn list_rooms(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    if !claims.video.room_list {
        return Err(ApiError::forbidden("token lacks the roomList grant"));
    }
    let rooms: Vec<_> = state.rooms.list().iter().map(room_json).collect();
    Ok(Json(json!({ "rooms": rooms })).into_response())
}

/// Admin rights over one room: `roomAdmin` for that room or for all rooms.
fn admin_of(claims: &Claims, room: &str) -> ApiResult<()> {
    if claims.video.room_admin && (claims.video.room.is_empty() || claims.video.room == room) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "token lacks the roomAdmin grant for room {room}"
        )))
    }
}

fn find_room(state: &AppState, name: &str) -> ApiResult<RoomHandle> {
    state
        .rooms
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("room {name} does not exist")))
}

/// Sends the named room a command carrying a reply channel; awaits the reply.
async fn ask_room<T>(
    state: &AppState,
    name: &str,
    command: impl FnOnce(oneshot::Sender<T>) -> RoomCmd,
) -> ApiResult<T> {
    let handle = find_room(state, name)?;
    let (reply, rx) = oneshot::channel();
    handle
        .tx
        .send(command(reply))
        .await
        .map_err(|_| ApiError::not_found(format!("room {name} has closed")))?;
    rx.await
        .map_err(|_| ApiError::internal("room did not answer"))
}

async fn get_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    if !claims.video.room_list {
        admin_of(&claims, &name)?;
    }
    let handle = find_room(&state, &name)?;
    Ok(Json(room_json(&handle)).into_response())
}

async fn delete_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    if !claims.video.room_create {
        return Err(ApiError::forbidden("token lacks the roomCreate grant"));
    }
    if state.rooms.delete(&name) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("room {name} does not exist")))
    }
}

async fn list_participants(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    admin_of(&claims, &name)?;
    let participants = ask_room(&state, &name, |reply| RoomCmd::Participants { reply }).await?;
    Ok(Json(json!({ "participants": participants })).into_response())
}

async fn remove_participant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, identity)): Path<(String, String)>,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    admin_of(&claims, &name)?;
    let found = ask_room(&state, &name, |reply| RoomCmd::RemoveIdentity {
        identity: identity.clone(),
        reply,
    })
    .await?;
    if found {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!(
            "no participant {identity} in room {name}"
        )))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MintToken {
    room: String,
    identity: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    can_publish: Option<bool>,
    #[serde(default)]
    can_subscribe: Option<bool>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// Longest join-token lifetime the API mints.
const MAX_TTL_SECS: u64 = 7 * 86_400;
const DEFAULT_TTL_SECS: u64 = 6 * 3600;

async fn mint_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<MintToken>, JsonRejection>,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    let Json(body) = body?;
    if !(claims.video.room_create || claims.video.room_admin) {
        return Err(ApiError::forbidden(
            "token lacks the roomAdmin or roomCreate grant",
        ));
    }
    if !claims.video.room_create {
        admin_of(&claims, &body.room)?;
    }
    valid_name("room", &body.room)?;
    valid_name("identity", &body.identity)?;
    let ttl = body.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(ApiError::bad_request(format!(
            "ttlSecs must be between 1 and {MAX_TTL_SECS}"
        )));
    }
    let mut join = join_claims(&state.keys, &body.room, &body.identity, &body.name, ttl);
    join.video.can_publish = Some(body.can_publish.unwrap_or(true));
    join.video.can_subscribe = Some(body.can_subscribe.unwrap_or(true));
    let token = state.keys.sign(&join);
    Ok(Json(json!({"token": token, "expiresAt": join.exp})).into_response())
}

#[derive(Deserialize)]
struct DevTokenQuery {
    room: Option<String>,
    identity: Option<String>,
}

/// Development only: a join token for anyone who asks.
async fn dev_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DevTokenQuery>,
) -> ApiResult<Response> {
    let room = q.room.unwrap_or_else(|| "demo".into());
    let identity = q
        .identity
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| format!("guest-{}", rand::random::<u32>() % 100_000));
    valid_name("room", &room)?;
    valid_name("identity", &identity)?;
    let claims = join_claims(&state.keys, &room, &identity, &identity, DEFAULT_TTL_SECS);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:7880");
    Ok(Json(json!({
        "token": state.keys.sign(&claims),
        "url": format!("ws://{host}/v1/rtc"),
        "identity": identity,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct RtcQuery {
    access_token: Option<String>,
    /// `1` (or `true`) to resume the participant session `sid` after the
    /// signalling connection dropped.
    reconnect: Option<String>,
    sid: Option<String>,
}

/// Numbers signalling sessions, so a room tells a resumed participant's
/// new socket from its old one.
static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A signalling connection with no frame for this long is closed.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);

/// Largest WebSocket frame accepted at all; frames over the protocol limit
/// but under this get a clear `error` message instead of a dropped socket.
const WS_FRAME_LIMIT: usize = 1024 * 1024;

async fn rtc(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<RtcQuery>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let token = q.access_token.unwrap_or_default();
    let claims = state.keys.verify(&token).map_err(ApiError::unauthorized)?;
    if !claims.video.room_join || claims.video.room.is_empty() {
        return Err(ApiError::forbidden(
            "token does not grant joining a room (roomJoin with room)",
        ));
    }
    if claims.sub.is_empty() {
        return Err(ApiError::unauthorized(AuthError::Invalid(
            "token has no identity (sub)".into(),
        )));
    }
    let resume = match (q.reconnect.as_deref(), q.sid) {
        (Some("1" | "true"), Some(sid)) if !sid.is_empty() => Some(sid),
        (Some("1" | "true"), _) => {
            return Err(ApiError::bad_request(
                "reconnect needs the sid of the participant session to resume",
            ))
        }
        _ => None,
    };
    Ok(ws
        .max_message_size(WS_FRAME_LIMIT)
        .on_upgrade(move |socket| session(state, claims, peer, socket, resume)))
}

/// ICE servers with fresh TURN credentials for the holder of a join token.
async fn turn_credentials(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let claims = bearer(&state, &headers)?;
    if !claims.video.room_join || claims.sub.is_empty() {
        return Err(ApiError::forbidden(
            "TURN credentials need a join token (roomJoin, with an identity)",
        ));
    }
    let servers = state.ice.servers_for(&claims.sub, unix_now()).await;
    Ok(Json(json!({ "iceServers": servers, "ttl": state.ice.ttl })).into_response())
}

/// Reattaches a reconnecting client to its participant session `sid`.
async fn resume_session(
    state: &AppState,
    claims: &Claims,
    sid: String,
    session: u64,
    to_client: mpsc::Sender<ToClient>,
) -> Result<(RoomHandle, sfu_core::ParticipantId), String> {
    let handle = state
        .rooms
        .get(&claims.video.room)
        .ok_or_else(|| format!("room {} is not open", claims.video.room))?;
    let (reply, rx) = oneshot::channel();
    let cmd = RoomCmd::Resume {
        sid,
        identity: claims.sub.clone(),
        session,
        ice_servers: state.ice.servers_for(&claims.sub, unix_now()).await,
        to_client,
        reply,
    };
    handle
        .tx
        .send(cmd)
        .await
        .map_err(|_| "room closed".to_owned())?;
    match rx.await {
        Ok(Ok(id)) => Ok((handle, id)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("room closed".into()),
    }
}

async fn join_room(
    state: &AppState,
    claims: &Claims,
    session: u64,
    to_client: mpsc::Sender<ToClient>,
) -> Result<(RoomHandle, sfu_core::ParticipantId), String> {
    let request = JoinRequest {
        identity: claims.sub.clone(),
        name: claims.name.clone(),
        can_publish: claims.video.can_publish.unwrap_or(true),
        can_subscribe: claims.video.can_subscribe.unwrap_or(true),
        joined_at_unix: unix_now(),
        ice_servers: state.ice.servers_for(&claims.sub, unix_now()).await,
    };
    // A room closing at this moment rejects the join; the second attempt
    // finds or creates a fresh one.
    let mut last_error = String::new();
    for _ in 0..2 {
        let handle = match state.rooms.get_or_create(&claims.video.room) {
            Ok(h) => h,
            Err(CreateError::Limit(max)) => {
                return Err(format!("this server has its maximum of {max} rooms open"))
            }
            Err(CreateError::Exists) => continue,
        };
        let (reply, rx) = oneshot::channel();
        let cmd = RoomCmd::Join {
            request: request.clone(),
            session,
            to_client: to_client.clone(),
            reply,
        };
        if handle.tx.send(cmd).await.is_err() {
            last_error = "room closed".into();
            continue;
        }
        match rx.await {
            Ok(Ok(id)) => return Ok((handle, id)),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "room closed".into(),
        }
        if last_error != "room closed" {
            break;
        }
    }
    Err(last_error)
}

/// One participant's signalling session.
async fn session(
    state: AppState,
    claims: Claims,
    peer: SocketAddr,
    socket: WebSocket,
    resume: Option<String>,
) {
    let (mut sink, mut stream) = socket.split();
    let (to_client, mut from_room) = mpsc::channel::<ToClient>(CLIENT_QUEUE);
    let session = SESSIONS.fetch_add(1, Ordering::Relaxed);
    let resuming = resume.is_some();
    let attached = match resume {
        Some(sid) => resume_session(&state, &claims, sid, session, to_client)
            .await
            .map_err(|e| (ErrorCode::SessionNotFound, format!("cannot resume: {e}"))),
        None => join_room(&state, &claims, session, to_client)
            .await
            .map_err(|e| (ErrorCode::NotAllowed, format!("cannot join: {e}"))),
    };
    let (room, participant) = match attached {
        Ok(attached) => attached,
        Err((code, e)) => {
            tracing::info!(%peer, room = %claims.video.room, error = %e, "join refused");
            let msg = ServerMessage::error(code, e);
            let _ = sink.send(Message::Text(msg.to_json().into())).await;
            let _ = sink.close().await;
            return;
        }
    };
    tracing::info!(%peer, room = %room.name, identity = %claims.sub, resuming, "joined");

    // Writer: room -> socket.
    let writer = tokio::spawn(async move {
        while let Some(out) = from_room.recv().await {
            match out {
                ToClient::Message(msg) => {
                    if sink
                        .send(Message::Text(msg.to_json().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                ToClient::Close => break,
            }
        }
        let _ = sink.close().await;
    });

    // Fresh tokens before this one expires, for rejoining later.
    let (mut refresh, mut refresh_at) = refresh_schedule(&claims);

    // Reader: socket -> room. Bad frames get an error on this socket only.
    let mut left = false;
    let rate = state.signal_rate;
    let mut bucket = Bucket::full(rate.burst as f64, std::time::Instant::now());
    // Whether this stretch of refused messages has been answered yet: one
    // error per stretch, not one per message.
    let mut told = false;
    loop {
        // A client sends at least a ping every 10 s; silence this long
        // means the connection is dead even if TCP has not noticed.
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => next,
            _ = tokio::time::sleep_until(refresh_at.into()), if refresh.is_some() => {
                if let Some(ttl) = refresh {
                    let mut fresh = claims.clone();
                    let now = unix_now();
                    fresh.nbf = now.saturating_sub(1);
                    fresh.exp = now + ttl;
                    let message = ServerMessage::TokenRefresh { token: state.keys.sign(&fresh) };
                    let _ = room.tx.send(RoomCmd::Reply { participant, message }).await;
                }
                (refresh, refresh_at) = refresh_schedule_after(refresh);
                continue;
            }
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                tracing::info!(%peer, "signalling idle timeout");
                break;
            }
        };
        let text = match frame {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(_)) => {
                report_bad(
                    &room,
                    participant,
                    "binary frames are not part of the protocol",
                )
                .await;
                continue;
            }
            // Closing with 1000 (normal), 1001 (going away: the page
            // closed) or no code is leaving; any other code, or a socket
            // that just ends, keeps the session for the reconnect grace.
            Ok(Message::Close(frame))
                if frame.as_ref().is_none_or(|f| matches!(f.code, 1000 | 1001)) =>
            {
                let _ = room
                    .tx
                    .send(RoomCmd::Leave {
                        participant,
                        reason: LeaveReason::ClientLeave,
                    })
                    .await;
                left = true;
                break;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        if !rate.is_off() {
            let now = std::time::Instant::now();
            if bucket
                .take(rate.per_second, rate.burst as f64, now)
                .is_err()
            {
                state
                    .metrics
                    .signals_rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                if !told {
                    told = true;
                    tracing::info!(%peer, identity = %claims.sub, "signalling rate limit reached");
                    let msg = ServerMessage::error(
                        ErrorCode::RateLimited,
                        format!(
                            "too many messages: at most {} a second (bursts of {}); messages over the limit are ignored",
                            rate.per_second, rate.burst
                        ),
                    );
                    send_error(&room, participant, msg).await;
                }
                continue;
            }
            told = false;
        }
        match ClientMessage::parse(&text) {
            Ok(message) => {
                left = matches!(message, ClientMessage::Leave);
                if room
                    .tx
                    .send(RoomCmd::Signal {
                        participant,
                        message,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                if left {
                    break;
                }
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "bad signalling message");
                send_error(&room, participant, e.to_message()).await;
            }
        }
    }
    if !left {
        // The client may come back: the room holds the session for the
        // reconnect grace.
        let _ = room
            .tx
            .send(RoomCmd::Disconnected {
                participant,
                session,
            })
            .await;
    }
    let _ = writer.await;
    tracing::info!(%peer, identity = %claims.sub, left, "signalling closed");
}

/// When to send a session its next fresh token: halfway through the
/// lifetime of the token it joined with (at most every 10 minutes, at
/// least a second apart); `None` for a token with no lifetime left.
fn refresh_schedule(claims: &Claims) -> (Option<u64>, std::time::Instant) {
    // The token's whole lifetime when it says when it became valid;
    // otherwise what is left of it.
    let now = unix_now();
    let issued = if claims.nbf > 0 && claims.nbf <= now {
        claims.nbf
    } else {
        now
    };
    let ttl = claims.exp.saturating_sub(issued);
    refresh_schedule_after((ttl > 0).then_some(ttl))
}

fn refresh_schedule_after(ttl: Option<u64>) -> (Option<u64>, std::time::Instant) {
    let every = ttl.map(|t| (t / 2).clamp(1, 600)).unwrap_or(600);
    (
        ttl,
        std::time::Instant::now() + std::time::Duration::from_secs(every),
    )
}

async fn report_bad(room: &RoomHandle, participant: sfu_core::ParticipantId, text: &str) {
    send_error(
        room,
        participant,
        ServerMessage::error(ErrorCode::BadMessage, text),
    )
    .await;
}

/// Errors found before the room sees a message go out through the room's
/// queue so they keep their order with everything else sent to the client.
async fn send_error(room: &RoomHandle, participant: sfu_core::ParticipantId, msg: ServerMessage) {
    let _ = room
        .tx
        .send(RoomCmd::Reply {
            participant,
            message: msg,
        })
        .await;
}
