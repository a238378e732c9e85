//! The embedded TURN server: listeners for TURN over UDP and TCP on one
//! port and over TLS on another, relaying over UDP.
//!
//! The protocol (allocations, permissions, channels, the long-term
//! credential exchange) is `turn-server-proto`'s sans-I/O server; this
//! module does the sockets and adds what an SFU operator needs:
//!
//! - **Credentials in the coturn REST form.** A username is
//!   `<expiry unix time>:<identity>` and its password
//!   `base64(HMAC-SHA1(secret, username))`, so credentials minted here and
//!   by any other holder of the secret (an external coturn's peers, another
//!   node) work alike. A username is registered with the protocol server
//!   the first time a request carries it, and only while it has not
//!   expired; requests with an expired one are dropped.
//! - **Relay policy.** Relays never send to (or take from) loopback,
//!   private, link-local, unspecified or multicast addresses, except the
//!   SFU's own media address, unless `--turn-allow-private` is given: an
//!   open relay into a private network is an attack tool.
//! - **Quotas.** Allocations per user, a bitrate per allocation, and the
//!   port range relays bind in.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use turn_server_proto::api::{
    SocketAllocateError, TcpConnectError, Transmit, TurnServerApi, TurnServerPollRet,
};
use turn_server_proto::server::TurnServer;
use turn_server_proto::stun::types::attribute::{ErrorCode, Username};
use turn_server_proto::stun::types::message::{LongTermKeyCredentials, Message, MessageClass};
use turn_server_proto::types::{AddressFamily, TransportType};

use crate::metrics::Metrics;

/// How the embedded TURN server runs.
#[derive(Clone)]
pub struct TurnSettings {
    /// TURN over UDP and TCP, on the same port.
    pub listen: SocketAddr,
    /// TURN over TLS, with its TLS configuration.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    /// Where relays bind (may be unspecified: every interface).
    pub relay_ip: IpAddr,
    /// The address clients are told their relays have: the public address
    /// of a host behind 1:1 NAT (cloud instances, containers), whose
    /// interfaces do not carry it.
    pub relay_public_ip: IpAddr,
    /// Inclusive range of relay ports.
    pub relay_ports: (u16, u16),
    pub realm: String,
    pub secret: String,
    /// Longest credential lifetime accepted, seconds from now.
    pub max_ttl: u64,
    /// Relay to private and loopback addresses too.
    pub allow_private: bool,
    /// Always reachable through a relay: the SFU's media address.
    pub media_addr: SocketAddr,
    /// Allocations one username may hold at once (0: no cap).
    pub max_allocations_per_user: usize,
    /// Bits per second one allocation may relay each way (0: no cap).
    pub max_bitrate: u64,
}

/// The addresses the TURN listeners are bound to.
#[derive(Debug, Clone, Copy)]
pub struct TurnAddrs {
    pub udp_tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct TurnMetrics {
    pub requests: AtomicUsize,
    pub allocations: AtomicUsize,
    pub allocations_total: AtomicUsize,
    pub allocations_refused: AtomicUsize,
    pub relayed_bytes: AtomicUsize,
    pub relay_denied: AtomicUsize,
    pub over_bitrate: AtomicUsize,
    pub expired_credentials: AtomicUsize,
    /// 401 answers: the challenge every first request gets, and refused
    /// credentials.
    pub unauthorized: AtomicUsize,
}

/// The password for a username in the coturn REST form.
pub fn password_for(secret: &str, username: &str) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether a relay may exchange packets with `addr`.
pub fn relay_allowed(addr: SocketAddr, allow_private: bool, media_addr: SocketAddr) -> bool {
    if addr == media_addr {
        return true;
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
        return false;
    }
    if allow_private {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                // 100.64.0.0/10, carrier-grade NAT
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64)
                || v4.octets()[0] == 0)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                // fc00::/7 unique local, fe80::/10 link local
                || (first & 0xFE00) == 0xFC00
                || (first & 0xFFC0) == 0xFE80
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

enum Event {
    /// A datagram on the listener or on a relay socket.
    Udp {
        local: SocketAddr,
        from: SocketAddr,
        data: Vec<u8>,
    },
    TcpOpen {
        local: SocketAddr,
        remote: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    Tcp {
        local: SocketAddr,
        remote: SocketAddr,
        data: Vec<u8>,
    },
    TcpClosed {
        local: SocketAddr,
        remote: SocketAddr,
    },
}

/// Starts the listeners and the worker; returns where they listen.
pub async fn start(settings: TurnSettings, metrics: Arc<Metrics>) -> anyhow::Result<TurnAddrs> {
    use anyhow::Context as _;
    // One port for UDP and TCP: with port 0, find one free for both.
    let (udp, tcp) = bind_pair(settings.listen)
        .await
        .with_context(|| format!("binding TURN listeners {}", settings.listen))?;
    let listen = udp.local_addr()?;
    let (events_tx, events) = mpsc::channel::<Event>(4096);
    let udp = Arc::new(udp);
    tokio::spawn(read_udp(udp.clone(), listen, events_tx.clone()));
    tokio::spawn(accept_tcp(tcp, None, events_tx.clone()));
    let mut tls_addr = None;
    let mut servers = vec![Instance::new(TransportType::Udp, listen, &settings.realm)];
    servers.push(Instance::new(TransportType::Tcp, listen, &settings.realm));
    if let Some((addr, config)) = &settings.tls {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TURN over TLS listener {addr}"))?;
        let local = listener.local_addr()?;
        tls_addr = Some(local);
        servers.push(Instance::new(TransportType::Tcp, local, &settings.realm));
        let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
        tokio::spawn(accept_tcp(listener, Some(acceptor), events_tx.clone()));
    }
    tracing::info!(%listen, tls = ?tls_addr, relay_ip = %settings.relay_ip, relay_public_ip = %settings.relay_public_ip, "TURN server listening");
    let worker = Worker {
        base: Instant::now(),
        settings,
        metrics,
        listener: udp,
        listen,
        servers,
        relays: HashMap::new(),
        tcp_writers: HashMap::new(),
        tcp_frames: HashMap::new(),
        user_by_client: HashMap::new(),
        allocations_by_user: HashMap::new(),
        next_port: 0,
        next_prune: Instant::now(),
        events_tx,
    };
    tokio::spawn(worker.run(events));
    Ok(TurnAddrs {
        udp_tcp: listen,
        tls: tls_addr,
    })
}

async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port for TURN")))
}

async fn read_udp(socket: Arc<UdpSocket>, local: SocketAddr, events: mpsc::Sender<Event>) {
    let mut buf = vec![0u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let event = Event::Udp {
                    local,
                    from,
                    data: buf[..n].to_vec(),
                };
                // A full queue drops the datagram, as a full socket buffer would.
                if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(event) {
                    return;
                }
            }
            Err(e) => tracing::trace!(error = %e, "TURN recv"),
        }
    }
}

async fn accept_tcp(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: mpsc::Sender<Event>,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "TURN accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_stream(stream, local, remote, events).await,
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => serve_stream(stream, local, remote, events).await,
                        _ => tracing::debug!(%remote, "TURN TLS handshake failed"),
                    }
                }
            }
        });
    }
}

/// Carries one TCP (or TLS) client connection's bytes to and from the worker.
async fn serve_stream<S>(
    stream: S,
    local: SocketAddr,
    remote: SocketAddr,
    events: mpsc::Sender<Event>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    if events
        .send(Event::TcpOpen {
            local,
            remote,
            writer: tx,
        })
        .await
        .is_err()
    {
        return;
    }
    let write = tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if writer.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let event = Event::Tcp {
                    local,
                    remote,
                    data: buf[..n].to_vec(),
                };
                if events.send(event).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = events.send(Event::TcpClosed { local, remote }).await;
    write.abort();
}

/// One protocol server: per listener and transport.
struct Instance {
    transport: TransportType,
    listen: SocketAddr,
    server: TurnServer,
    /// Usernames registered with `server`.
    registered: HashSet<String>,
}

impl Instance {
    fn new(transport: TransportType, listen: SocketAddr, realm: &str) -> Instance {
        Instance {
            transport,
            listen,
            server: TurnServer::new(transport, listen, realm.to_owned()),
            registered: HashSet::new(),
        }
    }
}

struct Relay {
    socket: Arc<UdpSocket>,
    reader: tokio::task::JoinHandle<()>,
    /// The instance and client 5-tuple that own the allocation.
    owner: usize,
    user: Option<String>,
    /// Token buckets, bytes, for each direction.
    out_bucket: (f64, Instant),
    in_bucket: (f64, Instant),
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

type ClientKey = (usize, SocketAddr);

struct Worker {
    base: Instant,
    settings: TurnSettings,
    metrics: Arc<Metrics>,
    listener: Arc<UdpSocket>,
    listen: SocketAddr,
    servers: Vec<Instance>,
    relays: HashMap<SocketAddr, Relay>,
    tcp_writers: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Vec<u8>>>,
    /// Bytes of a TCP client's stream not yet framed, for reading the
    /// username of each request.
    tcp_frames: HashMap<(SocketAddr, SocketAddr), Vec<u8>>,
    user_by_client: HashMap<ClientKey, String>,
    allocations_by_user: HashMap<String, usize>,
    next_port: u32,
    /// When to look for protocol servers to rebuild next.
    next_prune: Instant,
    events_tx: mpsc::Sender<Event>,
}

fn unix_now() -> u64 {
    crate::auth::unix_now()
}

impl Worker {
    fn now(&self, at: Instant) -> turn_server_proto::types::Instant {
        turn_server_proto::types::Instant::from_nanos(
            at.saturating_duration_since(self.base).as_nanos() as i64,
        )
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut wake = Instant::now() + Duration::from_secs(1);
        loop {
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => Some(event),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => None,
            };
            let at = Instant::now();
            if let Some(event) = event {
                self.handle(event, at);
            }
            wake = self.drive(at);
        }
    }

    fn handle(&mut self, event: Event, at: Instant) {
        let now = self.now(at);
        match event {
            Event::Udp { local, from, data } => {
                if local == self.listen {
                    self.metrics.turn.requests.fetch_add(1, Ordering::Relaxed);
                    if !self.admit(0, from, &data) {
                        return;
                    }
                    let transmit = Transmit {
                        data: data.as_slice(),
                        transport: TransportType::Udp,
                        from,
                        to: local,
                    };
                    if let Some(out) = self.servers[0].server.recv(transmit, now) {
                        self.send(out.build());
                    }
                    return;
                }
                // From a peer to a relayed address.
                let Some(relay) = self.relays.get_mut(&local) else {
                    return;
                };
                if !admit_relayed(
                    &self.settings,
                    &self.metrics,
                    &mut relay.in_bucket,
                    from,
                    data.len(),
                    at,
                ) {
                    return;
                }
                let owner = relay.owner;
                let transmit = Transmit {
                    data: data.as_slice(),
                    transport: TransportType::Udp,
                    from,
                    to: local,
                };
                if let Some(out) = self.servers[owner].server.recv(transmit, now) {
                    self.send(out.build());
                }
            }
            Event::TcpOpen {
                local,
                remote,
                writer,
            } => {
                self.tcp_writers.insert((local, remote), writer);
            }
            Event::Tcp {
                local,
                remote,
                data,
            } => {
                let Some(index) = self
                    .servers
                    .iter()
                    .position(|s| s.transport == TransportType::Tcp && s.listen == local)
                else {
                    return;
                };
                // Frame the stream here and hand the protocol server one
                // whole message at a time: ChannelData over TCP is padded
                // to 4 bytes (RFC 8656 12.5), which it does not expect.
                let mut frames = self.tcp_frames.remove(&(local, remote)).unwrap_or_default();
                frames.extend_from_slice(&data);
                let mut at_byte = 0;
                while let Some(len) = frame_len(&frames[at_byte..]) {
                    if frames.len() - at_byte < len {
                        break;
                    }
                    let frame = &frames[at_byte..at_byte + len];
                    at_byte += len;
                    if frame.len() < 4 {
                        continue; // a byte of garbage
                    }
                    let message = if frame[0] >> 6 == 1 {
                        &frame[..4 + u16::from_be_bytes([frame[2], frame[3]]) as usize]
                    } else {
                        self.metrics.turn.requests.fetch_add(1, Ordering::Relaxed);
                        if !self.admit(index, remote, frame) {
                            continue;
                        }
                        frame
                    };
                    let transmit = Transmit {
                        data: message,
                        transport: TransportType::Tcp,
                        from: remote,
                        to: local,
                    };
                    if let Some(out) = self.servers[index].server.recv(transmit, now) {
                        self.send(out.build());
                    }
                }
                frames.drain(..at_byte);
                if frames.len() > 70_000 {
                    // Not TURN framing: give up on this connection.
                    self.tcp_writers.remove(&(local, remote));
                    return;
                }
                self.tcp_frames.insert((local, remote), frames);
            }
            Event::TcpClosed { local, remote } => {
                self.tcp_writers.remove(&(local, remote));
                self.tcp_frames.remove(&(local, remote));
            }
        }
    }

    /// Reads the username of a client's STUN request: registers a valid
    /// one with the protocol server and remembers whose the 5-tuple is.
    /// Returns false for a request to drop (an expired username).
    fn admit(&mut self, index: usize, client: SocketAddr, data: &[u8]) -> bool {
        // ChannelData and anything not STUN goes straight through.
        if data.first().is_none_or(|b| b & 0xC0 != 0) {
            return true;
        }
        let Ok(msg) = Message::from_bytes(data) else {
            return true;
        };
        let Ok(username) = msg.attribute::<Username>() else {
            return true;
        };
        let name = username.username();
        let expiry = name
            .split_once(':')
            .and_then(|(expiry, _)| expiry.parse::<u64>().ok());
        let now = unix_now();
        match expiry {
            Some(expiry) if expiry > now && expiry <= now + self.settings.max_ttl + 60 => {}
            Some(_) => {
                self.metrics
                    .turn
                    .expired_credentials
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // Not the REST form: never registered, so refused with 401.
            None => return true,
        }
        let instance = &mut self.servers[index];
        if !instance.registered.contains(name) {
            // Registered only once a request proves it holds the password
            // (its MESSAGE-INTEGRITY checks out): a stream of made-up
            // usernames registers nothing.
            let password = password_for(&self.settings.secret, name);
            let key = LongTermKeyCredentials::new(
                name.to_owned(),
                password.clone(),
                self.settings.realm.clone(),
            );
            if msg.validate_integrity(&key.into()).is_err() {
                return true; // refused by the protocol server: unknown user
            }
            instance.server.add_user(name.to_owned(), password);
            instance.registered.insert(name.to_owned());
        }
        self.user_by_client.insert((index, client), name.to_owned());
        true
    }

    /// Sends one transmit the protocol server produced.
    fn send(&mut self, t: Transmit<Vec<u8>>) {
        if t.from == self.listen || self.tcp_writers.contains_key(&(t.from, t.to)) {
            self.count_unauthorized(&t.data);
        }
        match t.transport {
            TransportType::Udp if t.from == self.listen => {
                let _ = self.listener.try_send_to(&t.data, t.to);
            }
            TransportType::Udp => {
                let Some(relay) = self.relays.get_mut(&t.from) else {
                    return;
                };
                if !admit_relayed(
                    &self.settings,
                    &self.metrics,
                    &mut relay.out_bucket,
                    t.to,
                    t.data.len(),
                    Instant::now(),
                ) {
                    return;
                }
                let _ = relay.socket.try_send_to(&t.data, t.to);
            }
            TransportType::Tcp => {
                if let Some(writer) = self.tcp_writers.get(&(t.from, t.to)) {
                    let mut data = t.data;
                    // ChannelData over TCP is padded to 4 bytes.
                    if data.first().is_some_and(|b| b >> 6 == 1) {
                        data.resize(data.len().div_ceil(4) * 4, 0);
                    }
                    let _ = writer.try_send(data);
                }
            }
        }
    }

    fn count_unauthorized(&self, data: &[u8]) {
        if data.first().is_none_or(|b| b & 0xC0 != 0) {
            return;
        }
        let Ok(msg) = Message::from_bytes(data) else {
            return;
        };
        if msg.has_class(MessageClass::Error)
            && msg
                .attribute::<ErrorCode>()
                .is_ok_and(|e| e.code() == ErrorCode::UNAUTHORIZED)
        {
            self.metrics
                .turn
                .unauthorized
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs every protocol server until it waits; returns the next wake.
    fn drive(&mut self, at: Instant) -> Instant {
        let now = self.now(at);
        let mut wake = at + Duration::from_secs(1);
        for index in 0..self.servers.len() {
            loop {
                while let Some(t) = self.servers[index].server.poll_transmit(now) {
                    self.send(t);
                }
                match self.servers[index].server.poll(now) {
                    TurnServerPollRet::WaitUntil(t) => {
                        let t = t.to_std(self.base);
                        wake = wake.min(t.max(at + Duration::from_millis(1)));
                        break;
                    }
                    TurnServerPollRet::AllocateSocket {
                        transport,
                        listen_addr,
                        client_addr,
                        allocation_transport,
                        family,
                    } => {
                        let result =
                            self.allocate(index, client_addr, allocation_transport, family);
                        self.servers[index].server.allocated_socket(
                            transport,
                            listen_addr,
                            client_addr,
                            allocation_transport,
                            family,
                            result,
                            now,
                        );
                    }
                    TurnServerPollRet::TcpConnect {
                        relayed_addr,
                        peer_addr,
                        listen_addr,
                        client_addr,
                    } => {
                        // Relays are UDP only.
                        self.servers[index].server.tcp_connected(
                            relayed_addr,
                            peer_addr,
                            listen_addr,
                            client_addr,
                            Err(TcpConnectError::Forbidden),
                            now,
                        );
                    }
                    TurnServerPollRet::TcpClose {
                        local_addr,
                        remote_addr,
                    } => {
                        self.tcp_writers.remove(&(local_addr, remote_addr));
                    }
                    TurnServerPollRet::SocketClose { listen_addr, .. } => {
                        if let Some(relay) = self.relays.remove(&listen_addr) {
                            self.metrics
                                .turn
                                .allocations
                                .fetch_sub(1, Ordering::Relaxed);
                            if let Some(user) = &relay.user {
                                if let Some(n) = self.allocations_by_user.get_mut(user) {
                                    *n = n.saturating_sub(1);
                                    if *n == 0 {
                                        self.allocations_by_user.remove(user);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if at >= self.next_prune {
            self.next_prune = at + Duration::from_secs(60);
            self.forget_expired_users(index_free(&self.relays, self.servers.len()));
        }
        wake
    }

    /// Binds a relay socket for a client, within the quotas.
    fn allocate(
        &mut self,
        index: usize,
        client: SocketAddr,
        transport: TransportType,
        family: AddressFamily,
    ) -> Result<SocketAddr, SocketAllocateError> {
        let refuse = |m: &Metrics, e| {
            m.turn.allocations_refused.fetch_add(1, Ordering::Relaxed);
            Err(e)
        };
        if transport != TransportType::Udp {
            return refuse(
                &self.metrics,
                SocketAllocateError::AddressFamilyNotSupported,
            );
        }
        let wanted_v4 = family == AddressFamily::IPV4;
        if wanted_v4 != self.settings.relay_public_ip.is_ipv4() {
            return refuse(
                &self.metrics,
                SocketAllocateError::AddressFamilyNotSupported,
            );
        }
        let user = self.user_by_client.get(&(index, client)).cloned();
        if let Some(user) = &user {
            let held = self.allocations_by_user.get(user).copied().unwrap_or(0);
            let cap = self.settings.max_allocations_per_user;
            if cap > 0 && held >= cap {
                tracing::info!(%user, held, "TURN allocation quota reached");
                return refuse(&self.metrics, SocketAllocateError::InsufficientCapacity);
            }
        }
        let Some(socket) = self.bind_relay() else {
            return refuse(&self.metrics, SocketAllocateError::InsufficientCapacity);
        };
        let socket = Arc::new(socket);
        let Ok(bound) = socket.local_addr() else {
            return refuse(&self.metrics, SocketAllocateError::InsufficientCapacity);
        };
        // Known everywhere by its public address: the one the client is
        // told, and the one peers' packets are handed in as arriving at.
        let addr = SocketAddr::new(self.settings.relay_public_ip, bound.port());
        let reader = tokio::spawn(read_udp(socket.clone(), addr, self.events_tx.clone()));
        let full = self.settings.max_bitrate as f64 / 8.0;
        let now = Instant::now();
        self.relays.insert(
            addr,
            Relay {
                socket,
                reader,
                owner: index,
                user: user.clone(),
                out_bucket: (full, now),
                in_bucket: (full, now),
            },
        );
        if let Some(user) = user {
            *self.allocations_by_user.entry(user).or_default() += 1;
        }
        self.metrics
            .turn
            .allocations
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .turn
            .allocations_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(addr)
    }

    /// A UDP socket on the relay address, on a free port of the range.
    fn bind_relay(&mut self) -> Option<UdpSocket> {
        let (lo, hi) = self.settings.relay_ports;
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        for _ in 0..span.min(1000) {
            let port = lo + (self.next_port % span) as u16;
            self.next_port = self.next_port.wrapping_add(1);
            let Ok(socket) = std::net::UdpSocket::bind((self.settings.relay_ip, port)) else {
                continue;
            };
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            if let Ok(socket) = UdpSocket::from_std(socket) {
                return Some(socket);
            }
        }
        None
    }

    /// The protocol server keeps every username it was given. An instance
    /// with no allocation left and many usernames is rebuilt, so they do
    /// not pile up over weeks.
    fn forget_expired_users(&mut self, idle: Vec<bool>) {
        for (index, instance) in self.servers.iter_mut().enumerate() {
            if instance.registered.len() > 10_000 && idle[index] {
                *instance =
                    Instance::new(instance.transport, instance.listen, &self.settings.realm);
                self.user_by_client.retain(|(i, _), _| *i != index);
            }
        }
    }
}

/// Whether a relay may pass `bytes` to or from `peer` now: the relay
/// policy, then the allocation's bitrate. Counts what it refuses and what
/// it lets through.
fn admit_relayed(
    settings: &TurnSettings,
    metrics: &Metrics,
    bucket: &mut (f64, Instant),
    peer: SocketAddr,
    bytes: usize,
    now: Instant,
) -> bool {
    if !relay_allowed(peer, settings.allow_private, settings.media_addr) {
        metrics.turn.relay_denied.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if !take(bucket, bytes, settings.max_bitrate, now) {
        metrics.turn.over_bitrate.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    metrics
        .turn
        .relayed_bytes
        .fetch_add(bytes, Ordering::Relaxed);
    true
}

/// For each instance, whether it owns no relay.
fn index_free(relays: &HashMap<SocketAddr, Relay>, n: usize) -> Vec<bool> {
    let mut idle = vec![true; n];
    for relay in relays.values() {
        if let Some(slot) = idle.get_mut(relay.owner) {
            *slot = false;
        }
    }
    idle
}

/// Takes `bytes` from a token bucket refilled at `bitrate` bits/s holding
/// one second's worth; false when there are not enough. A zero bitrate is
/// no limit.
fn take(bucket: &mut (f64, Instant), bytes: usize, bitrate: u64, now: Instant) -> bool {
    if bitrate == 0 {
        return true;
    }
    let per_second = bitrate as f64 / 8.0;
    let elapsed = now.saturating_duration_since(bucket.1).as_secs_f64();
    bucket.0 = (bucket.0 + elapsed * per_second).min(per_second);
    bucket.1 = now;
    if bucket.0 < bytes as f64 {
        return false;
    }
    bucket.0 -= bytes as f64;
    true
}

/// Length of the first frame of a TURN-over-TCP stream: a STUN message or
/// a ChannelData message padded to 4 bytes. `None` until the header is in.
fn frame_len(data: &[u8]) -> Option<usize> {
    if data.len() < 4 {
        return None;
    }
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    match data[0] >> 6 {
        0 => Some(20 + len),
        1 => Some(4 + len.div_ceil(4) * 4),
        // Not TURN: swallow the byte so framing cannot stall.
        _ => Some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_password_matches_the_coturn_form() {
        // The same function the ICE server list uses.
        let (username, password) = crate::turn::credentials("secret", "alice", 1_700_000_000);
        assert_eq!(password_for("secret", &username), password);
    }

    #[test]
    fn relays_refuse_private_and_loopback_peers_but_the_sfu() {
        let media: SocketAddr = "127.0.0.1:7882".parse().unwrap();
        let allowed = |a: &str| relay_allowed(a.parse().unwrap(), false, media);
        assert!(allowed("127.0.0.1:7882"), "the SFU's own media address");
        assert!(!allowed("203.0.113.9:5000"), "documentation range");
        assert!(allowed("8.8.8.8:53"));
        for denied in [
            "127.0.0.1:7883",
            "10.1.2.3:4000",
            "192.168.1.1:80",
            "172.16.0.1:22",
            "169.254.169.254:80",
            "100.64.0.1:1",
            "0.0.0.0:9",
            "224.0.0.1:5000",
            "[::1]:7882",
            "[fe80::1]:1",
            "[fd00::1]:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert!(!allowed(denied), "{denied}");
        }
        assert!(relay_allowed("10.1.2.3:4000".parse().unwrap(), true, media));
    }

    #[test]
    fn buckets_hold_a_second_and_refill() {
        let t0 = Instant::now();
        let mut bucket = (1000.0, t0);
        assert!(take(&mut bucket, 600, 8000, t0));
        assert!(!take(&mut bucket, 600, 8000, t0));
        assert!(take(
            &mut bucket,
            600,
            8000,
            t0 + Duration::from_millis(300)
        ));
        assert!(take(&mut bucket, 1_000_000, 0, t0), "no cap");
    }

    #[test]
    fn tcp_frames_are_stun_or_padded_channel_data() {
        assert_eq!(frame_len(&[0x00, 0x03, 0x00, 0x08]), Some(28));
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05]), Some(12));
        assert_eq!(frame_len(&[0x40, 0x00]), None);
        assert_eq!(frame_len(&[0xFF, 0, 0, 0]), Some(1));
    }
}
