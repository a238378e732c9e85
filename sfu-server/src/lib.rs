//! The SFU server: configuration, the REST API and signalling over HTTP,
//! the shared media UDP port, and the room workers that drive
//! `sfu_core::Room`.

pub mod auth;
pub mod batch;
pub mod config;
pub mod http;
pub mod limits;
pub mod media;
pub mod metrics;
pub mod rooms;
pub mod tls;
pub mod turn;
pub mod turn_server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use config::Config;

/// A running server, as tests and `main` see it.
pub struct RunningServer {
    pub http_addr: SocketAddr,
    /// The media address clients are told to send to.
    pub media_addr: SocketAddr,
    pub keys: auth::Keys,
    pub dev_mode: bool,
    /// Whether HTTP is served over TLS (HTTPS/WSS).
    pub tls: bool,
    /// The certificate in use, PEM (for clients that must trust a
    /// self-signed one, such as tests).
    pub tls_cert_pem: Option<Vec<u8>>,
    /// Where the embedded TURN server listens, if it runs.
    pub turn: Option<turn_server::TurnAddrs>,
    rooms: rooms::Rooms,
    media: media::MediaHandle,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    /// Serves until the process ends.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("server task")
    }

    /// Stops serving at once: HTTP, signalling and media.
    pub fn abort(&self) {
        self.task.abort();
        self.media.stop();
    }

    /// Tells every participant the server is going away, closes the rooms
    /// (waiting at most `limit`), then stops serving.
    pub async fn shutdown(self, limit: Duration) {
        self.rooms.shutdown(limit).await;
        self.task.abort();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.task.abort();
        self.media.stop();
    }
}

/// Binds the sockets and starts serving in the background.
pub async fn start(config: &Config) -> anyhow::Result<RunningServer> {
    let (keys, dev_mode) = config.keys()?;
    if let Some(dir) = &config.web_dir {
        let _ = http::WEB_DIR.set(dir.clone());
    }
    let socket = std::net::UdpSocket::bind(config.media_addr)
        .with_context(|| format!("binding media UDP socket {}", config.media_addr))?;
    batch::enlarge_buffers(&socket);
    let bound = socket.local_addr()?;
    let advertised_ip = match (config.public_ip, bound.ip()) {
        (Some(ip), _) => ip,
        (None, ip) if ip.is_unspecified() => {
            tracing::warn!("media socket bound to an unspecified address and no --public-ip set; advertising 127.0.0.1");
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        }
        (None, ip) => ip,
    };
    let media_addr = SocketAddr::new(advertised_ip, bound.port());
    let metrics = Arc::new(metrics::Metrics::default());
    let media = media::start(
        socket,
        config.udp_gso,
        metrics.clone(),
        tokio::runtime::Handle::current(),
    )
    .context("starting the media thread")?;
    let rooms = rooms::Rooms::new(
        media.clone(),
        rooms::RoomDefaults {
            media_addr,
            ice_servers: Vec::new(),
            empty_timeout: Duration::from_secs(config.empty_room_timeout),
            departure_timeout: Duration::from_secs(config.departure_timeout),
            reconnect_grace: Duration::from_secs(config.reconnect_grace),
            max_participants: config.max_participants,
            max_tracks: config.max_tracks_per_participant,
            max_rooms: config.max_rooms,
        },
        metrics.clone(),
    );

    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP listener {}", config.http_addr))?;
    let http_addr = listener.local_addr()?;
    // Load tests and browser tests run on loopback: in development mode
    // it is exempt from the per-address limits unless asked otherwise.
    let exempt_loopback = dev_mode && !config.limit_loopback;
    let turn_secret = match (&config.turn_secret, dev_mode) {
        (Some(s), _) => Some(s.0.clone()),
        (None, true) => Some(config::DEV_API_SECRET.to_owned()),
        (None, false) => None,
    };
    let identity = match (&config.tls_cert, &config.tls_key, config.tls_self_signed) {
        (Some(cert), Some(key), false) => Some(tls::Identity::from_files(cert, key)?),
        (None, None, true) => Some(self_signed_identity(config, http_addr)?),
        (None, None, false) => None,
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key, or --tls-self-signed alone"),
    };
    let turn = match config.turn_listen {
        Some(listen) => {
            let secret = turn_secret
                .clone()
                .context("the embedded TURN server needs --turn-secret (SFU_TURN_SECRET)")?;
            let tls = match config.turn_tls_listen {
                Some(addr) => {
                    let mut tls = match &identity {
                        Some(identity) => identity.server_config()?,
                        None => self_signed_identity(config, http_addr)?.server_config()?,
                    };
                    // TURN clients may offer ALPN "stun.turn" or none.
                    tls.alpn_protocols.clear();
                    Some((addr, Arc::new(tls)))
                }
                None => None,
            };
            // Relays bind where asked (else where TURN listens) and are
            // announced at the public address (else the bind address, else
            // the media address).
            let relay_ip = config.turn_relay_ip.unwrap_or(listen.ip());
            let relay_public_ip = match (config.public_ip, relay_ip) {
                (Some(ip), _) => ip,
                (None, ip) if ip.is_unspecified() => advertised_ip,
                (None, ip) => ip,
            };
            let addrs = turn_server::start(
                turn_server::TurnSettings {
                    listen,
                    tls,
                    relay_ip,
                    relay_public_ip,
                    relay_ports: config.turn_relay_ports,
                    realm: config.turn_realm.clone(),
                    secret,
                    max_ttl: config.turn_ttl,
                    allow_private: config.turn_allow_private,
                    media_addr,
                    max_allocations_per_user: config.turn_max_allocations,
                    max_bitrate: config.turn_max_bitrate,
                },
                metrics.clone(),
            )
            .await?;
            Some(addrs)
        }
        None if config.turn_tls_listen.is_some() => {
            anyhow::bail!("--turn-tls-listen needs --turn-listen (the embedded TURN server)")
        }
        None => None,
    };
    let ice = turn::IceConfig {
        stun_urls: config.stun_urls.clone(),
        provider: turn_provider(config, turn.as_ref(), turn_secret, advertised_ip)?,
        ttl: config.turn_ttl,
    };
    tracing::info!(provider = ?ice.provider, "ICE servers for clients");
    let app = http::router(http::AppState {
        keys: keys.clone(),
        rooms: rooms.clone(),
        dev_mode,
        metrics,
        rest_limiter: Arc::new(limits::RateLimiter::new(
            config.rest_rate_limit,
            exempt_loopback,
        )),
        connect_limiter: Arc::new(limits::RateLimiter::new(
            config.connect_rate_limit,
            exempt_loopback,
        )),
        signal_rate: config.signal_rate_limit,
        https_redirect: config.https_redirect,
        ice,
        cors_origins: config.cors_origins.clone(),
    });
    let tls_cert_pem = identity.as_ref().map(|i| i.cert_pem.clone());
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    let task = match identity {
        Some(identity) => {
            use axum::serve::ListenerExt as _;
            // tap_io: the wrapper axum gives client addresses for.
            let listener = tls::TlsListener::new(listener, &identity)?.tap_io(|_| {});
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, service).await {
                    tracing::error!(error = %e, "HTTPS server stopped");
                }
            })
        }
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, service).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }),
    };
    Ok(RunningServer {
        http_addr,
        media_addr,
        keys,
        dev_mode,
        tls: tls_cert_pem.is_some(),
        tls_cert_pem,
        turn,
        rooms,
        media,
        task,
    })
}

/// A self-signed certificate for localhost, loopback and the server's own
/// addresses.
fn self_signed_identity(config: &Config, http_addr: SocketAddr) -> anyhow::Result<tls::Identity> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for ip in [Some(http_addr.ip()), config.public_ip]
        .into_iter()
        .flatten()
    {
        if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
            names.push(ip.to_string());
        }
    }
    tls::Identity::self_signed(names)
}

/// The TURN provider `--ice-provider` names (`auto`: the embedded server,
/// else shared-secret URLs, else none).
fn turn_provider(
    config: &Config,
    embedded: Option<&turn_server::TurnAddrs>,
    secret: Option<String>,
    advertised_ip: IpAddr,
) -> anyhow::Result<turn::TurnProvider> {
    let embedded_urls = |addrs: &turn_server::TurnAddrs| {
        let host = match (config.public_ip, addrs.udp_tcp.ip()) {
            (Some(ip), _) => ip,
            (None, ip) if ip.is_unspecified() => advertised_ip,
            (None, ip) => ip,
        };
        let port = addrs.udp_tcp.port();
        let mut urls = vec![
            format!("turn:{host}:{port}?transport=udp"),
            format!("turn:{host}:{port}?transport=tcp"),
        ];
        if let Some(tls) = addrs.tls {
            urls.push(format!("turns:{host}:{}?transport=tcp", tls.port()));
        }
        urls
    };
    let shared = |urls: Vec<String>| -> anyhow::Result<turn::TurnProvider> {
        let secret = secret
            .clone()
            .context("TURN with a shared secret needs --turn-secret (SFU_TURN_SECRET)")?;
        Ok(turn::TurnProvider::SharedSecret { urls, secret })
    };
    Ok(match config.ice_provider.as_str() {
        "none" => turn::TurnProvider::None,
        "embedded" => {
            let addrs = embedded.context("--ice-provider embedded needs --turn-listen")?;
            shared(embedded_urls(addrs))?
        }
        "coturn" => {
            anyhow::ensure!(
                !config.turn_urls.is_empty(),
                "--ice-provider coturn needs --turn-urls"
            );
            shared(config.turn_urls.clone())?
        }
        "static" => {
            let path = config
                .ice_servers_file
                .as_ref()
                .context("--ice-provider static needs --ice-servers-file")?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let servers: Vec<sfu_core::signal::IceServer> = serde_json::from_str(&text)
                .with_context(|| format!("{}: a JSON list of ICE servers", path.display()))?;
            turn::TurnProvider::Static(servers)
        }
        "twilio" => {
            let sid = config
                .twilio_account_sid
                .clone()
                .filter(|s| !s.is_empty())
                .context("--ice-provider twilio needs TWILIO_ACCOUNT_SID")?;
            let token = config
                .twilio_auth_token
                .as_ref()
                .map(|s| s.0.clone())
                .filter(|s| !s.is_empty())
                .context("--ice-provider twilio needs TWILIO_AUTH_TOKEN")?;
            turn::TurnProvider::Twilio(Arc::new(turn::Twilio::new(
                &config.twilio_api_base,
                &sid,
                &token,
                config.turn_ttl,
            )))
        }
        _ => match (embedded, config.turn_urls.is_empty()) {
            (_, false) => shared(config.turn_urls.clone())?,
            (Some(addrs), true) => shared(embedded_urls(addrs))?,
            (None, true) => turn::TurnProvider::None,
        },
    })
}
