//! Room workers and the registry of rooms.
//!
//! Each room's worker owns its `sfu_core::Room` and runs on the media
//! thread (see [`crate::media`]), which hands it its datagrams directly
//! and runs its timers: nothing on the packet path takes a lock or
//! switches tasks. Signalling commands (joins, SDP, leaves) arrive over
//! the room's own bounded queue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;
use sfu_core::signal::{ClientMessage, IceServer, LeaveReason, ParticipantInfo, ServerMessage};
use sfu_core::{DropReason, JoinRequest, Output, ParticipantId, Room, RoomConfig, RoomEvent};
use tokio::sync::{mpsc, oneshot};

use crate::batch::SendBatch;
use crate::media::{Control, MediaHandle, RoomId, Router};
use crate::metrics::Metrics;

/// Messages queued for one participant's WebSocket.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // nearly every value is a Message; boxing would only add an allocation
pub enum ToClient {
    Message(ServerMessage),
    /// Send nothing more; close the socket.
    Close,
}

/// Signals waiting for a participant beyond this are a client that cannot
/// keep up; it is disconnected rather than allowed to stall the room.
pub const CLIENT_QUEUE: usize = 512;
const ROOM_QUEUE: usize = 4096;
/// How often a room adds its counters to the server's metrics.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

pub enum RoomCmd {
    Join {
        request: JoinRequest,
        /// The signalling session (unique on this server) joining.
        session: u64,
        to_client: mpsc::Sender<ToClient>,
        reply: oneshot::Sender<Result<ParticipantId, String>>,
    },
    /// A client reconnecting to its participant session `sid`.
    Resume {
        sid: String,
        identity: String,
        session: u64,
        ice_servers: Vec<IceServer>,
        to_client: mpsc::Sender<ToClient>,
        reply: oneshot::Sender<Result<ParticipantId, String>>,
    },
    /// Signalling session `session` of a participant ended without a
    /// `leave`: the participant stays for the reconnect grace.
    Disconnected {
        participant: ParticipantId,
        session: u64,
    },
    Signal {
        participant: ParticipantId,
        message: ClientMessage,
    },
    Leave {
        participant: ParticipantId,
        reason: LeaveReason,
    },
    /// A message for one client that did not come from the room itself
    /// (an error about a frame that could not be parsed).
    Reply {
        participant: ParticipantId,
        message: ServerMessage,
    },
    Participants {
        reply: oneshot::Sender<Vec<ParticipantInfo>>,
    },
    RemoveIdentity {
        identity: String,
        reply: oneshot::Sender<bool>,
    },
    /// Close the room, telling everyone why.
    Close(LeaveReason),
}

/// Sends commands to one room: into its queue, telling the media thread.
#[derive(Clone)]
pub struct RoomSender {
    id: RoomId,
    tx: mpsc::Sender<RoomCmd>,
    media: MediaHandle,
}

impl RoomSender {
    /// Queues `cmd`, waiting for room in the queue; fails once the room
    /// has closed.
    pub async fn send(&self, cmd: RoomCmd) -> Result<(), mpsc::error::SendError<RoomCmd>> {
        self.tx.send(cmd).await?;
        self.media.send(Control::Ready(self.id));
        Ok(())
    }

    /// Queues `cmd` if there is room; says whether it did.
    pub fn try_send(&self, cmd: RoomCmd) -> bool {
        if self.tx.try_send(cmd).is_err() {
            return false;
        }
        self.media.send(Control::Ready(self.id));
        true
    }
}

/// What the registry keeps of a running room.
#[derive(Clone)]
pub struct RoomHandle {
    pub name: String,
    pub sid: String,
    pub created_at: u64,
    pub max_participants: usize,
    pub participants: Arc<AtomicUsize>,
    pub tx: RoomSender,
}

/// Settings shared by every room.
#[derive(Clone)]
pub struct RoomDefaults {
    pub media_addr: SocketAddr,
    pub ice_servers: Vec<IceServer>,
    pub empty_timeout: Duration,
    /// How long a room stays open after its last participant leaves.
    pub departure_timeout: Duration,
    /// How long a participant without a signalling connection stays.
    pub reconnect_grace: Duration,
    pub max_participants: usize,
    /// Tracks per participant; 0 = no cap.
    pub max_tracks: usize,
    /// Rooms open at once; 0 = no cap.
    pub max_rooms: usize,
}

#[derive(Clone)]
pub struct Rooms {
    inner: Arc<DashMap<String, RoomHandle>>,
    media: MediaHandle,
    next_id: Arc<AtomicU64>,
    defaults: RoomDefaults,
    metrics: Arc<Metrics>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CreateError {
    Exists,
    /// The server has as many rooms open as it may.
    Limit(usize),
}

impl Rooms {
    pub fn new(media: MediaHandle, defaults: RoomDefaults, metrics: Arc<Metrics>) -> Rooms {
        Rooms {
            inner: Arc::new(DashMap::new()),
            media,
            next_id: Arc::new(AtomicU64::new(1)),
            defaults,
            metrics,
        }
    }

    pub fn get(&self, name: &str) -> Option<RoomHandle> {
        self.inner.get(name).map(|h| h.clone())
    }

    pub fn list(&self) -> Vec<RoomHandle> {
        let mut rooms: Vec<RoomHandle> = self.inner.iter().map(|e| e.value().clone()).collect();
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        rooms
    }

    /// Creates a room; fails if one of that name exists.
    pub fn create(
        &self,
        name: &str,
        max_participants: Option<usize>,
        empty_timeout: Option<Duration>,
    ) -> Result<RoomHandle, CreateError> {
        if self.at_limit() {
            return Err(CreateError::Limit(self.defaults.max_rooms));
        }
        match self.inner.entry(name.to_owned()) {
            dashmap::mapref::entry::Entry::Occupied(_) => Err(CreateError::Exists),
            dashmap::mapref::entry::Entry::Vacant(slot) => {
                let handle = self.spawn(name, max_participants, empty_timeout);
                slot.insert(handle.clone());
                Ok(handle)
            }
        }
    }

    /// Whether a new room would pass the server's cap. (Checked before the
    /// insert, so racing creations may pass it by the number that raced.)
    fn at_limit(&self) -> bool {
        self.defaults.max_rooms > 0 && self.inner.len() >= self.defaults.max_rooms
    }

    /// The named room, created if it does not exist and the cap allows.
    pub fn get_or_create(&self, name: &str) -> Result<RoomHandle, CreateError> {
        if let Some(h) = self.get(name) {
            return Ok(h);
        }
        if self.at_limit() {
            return Err(CreateError::Limit(self.defaults.max_rooms));
        }
        Ok(self
            .inner
            .entry(name.to_owned())
            .or_insert_with(|| self.spawn(name, None, None))
            .clone())
    }

    /// Closes a room: everyone in it is told and disconnected.
    pub fn delete(&self, name: &str) -> bool {
        match self.inner.remove(name) {
            Some((_, handle)) => {
                let _ = handle.tx.try_send(RoomCmd::Close(LeaveReason::RoomDeleted));
                true
            }
            None => false,
        }
    }

    /// Closes every room, telling participants the server is shutting
    /// down, and waits (at most `limit`) for the rooms to finish.
    pub async fn shutdown(&self, limit: Duration) {
        for room in self.list() {
            let _ = room
                .tx
                .send(RoomCmd::Close(LeaveReason::ServerShutdown))
                .await;
        }
        let deadline = tokio::time::Instant::now() + limit;
        while !self.inner.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn(
        &self,
        name: &str,
        max_participants: Option<usize>,
        empty_timeout: Option<Duration>,
    ) -> RoomHandle {
        let seed = rand::random::<u64>();
        let sid = format!("RM_{}", sfu_core::SeededRng::new(seed ^ 0x5EED).string(12));
        let max_participants = max_participants.unwrap_or(self.defaults.max_participants);
        let (tx, rx) = mpsc::channel(ROOM_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tx = RoomSender {
            id,
            tx,
            media: self.media.clone(),
        };
        let handle = RoomHandle {
            name: name.to_owned(),
            sid: sid.clone(),
            created_at: crate::auth::unix_now(),
            max_participants,
            participants: Arc::new(AtomicUsize::new(0)),
            tx: tx.clone(),
        };
        let room = Room::new(
            RoomConfig {
                name: name.to_owned(),
                sid,
                media_addr: self.defaults.media_addr,
                seed,
                ice_servers: self.defaults.ice_servers.clone(),
                max_participants,
                max_tracks: self.defaults.max_tracks,
            },
            Instant::now(),
        );
        let worker = Worker {
            room,
            rx,
            tx,
            clients: HashMap::new(),
            registry: self.inner.clone(),
            handle: handle.clone(),
            empty_timeout: empty_timeout.unwrap_or(self.defaults.empty_timeout),
            departure_timeout: self.defaults.departure_timeout,
            reconnect_grace: self.defaults.reconnect_grace,
            ever_joined: false,
            empty_since: Some(Instant::now()),
            metrics: self.metrics.clone(),
            reported: Default::default(),
            last_report: Instant::now(),
            reported_conns: 0,
            touched: false,
            closed: false,
            deadline: Instant::now(),
        };
        self.metrics.rooms.fetch_add(1, Ordering::Relaxed);
        if !self.media.send(Control::Add(id, Box::new(worker))) {
            tracing::error!(
                room = name,
                "the media thread has ended; the room cannot run"
            );
        }
        handle
    }
}

/// A participant's signalling link: the socket it has now, or since when
/// it has had none and what it missed meanwhile.
struct ClientLink {
    session: u64,
    tx: Option<mpsc::Sender<ToClient>>,
    away_since: Option<Instant>,
    missed: Vec<ServerMessage>,
}

impl ClientLink {
    fn new(session: u64, tx: mpsc::Sender<ToClient>) -> ClientLink {
        ClientLink {
            session,
            tx: Some(tx),
            away_since: None,
            missed: Vec::new(),
        }
    }
}

pub(crate) struct Worker {
    room: Room,
    rx: mpsc::Receiver<RoomCmd>,
    tx: RoomSender,
    clients: HashMap<ParticipantId, ClientLink>,
    reconnect_grace: Duration,
    registry: Arc<DashMap<String, RoomHandle>>,
    handle: RoomHandle,
    empty_timeout: Duration,
    departure_timeout: Duration,
    /// Whether anyone has joined: an empty room that never had anyone
    /// waits `empty_timeout`, one whose last participant left waits
    /// `departure_timeout`.
    ever_joined: bool,
    empty_since: Option<Instant>,
    metrics: Arc<Metrics>,
    reported: sfu_core::RoomStats,
    last_report: Instant,
    reported_conns: usize,
    /// Work done since the last flush.
    touched: bool,
    /// Closed: the media thread lets go of it after its last flush.
    closed: bool,
    /// When the room next needs its timer run.
    deadline: Instant,
}

impl Worker {
    /// How long this room may stay empty before it closes.
    fn idle_limit(&self) -> Duration {
        if self.ever_joined {
            self.departure_timeout.min(self.empty_timeout)
        } else {
            self.empty_timeout
        }
    }

    /// When the media thread is to run [`Worker::on_timer`].
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Marks the worker as having work to flush; true if it had none.
    pub(crate) fn touch(&mut self) -> bool {
        !std::mem::replace(&mut self.touched, true)
    }

    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    /// The room's timer: closes a room empty for too long, ends sessions
    /// whose clients did not come back, and runs the room's own timers.
    pub(crate) fn on_timer(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self
            .empty_since
            .is_some_and(|s| now >= s + self.idle_limit())
        {
            tracing::info!(room = %self.handle.name, "closing empty room");
            self.close(LeaveReason::RoomDeleted);
            return;
        }
        self.expire_away(now);
        self.room.handle_timeout(now);
    }

    /// One datagram from a client of this room.
    pub(crate) fn datagram(&mut self, source: SocketAddr, contents: BytesMut, at: Instant) {
        if !self.closed {
            self.room.handle_datagram(at, source, contents);
        }
    }

    /// Handles the commands queued for the room.
    pub(crate) fn take_commands(&mut self) {
        while !self.closed {
            match self.rx.try_recv() {
                Ok(RoomCmd::Close(reason)) => self.close(reason),
                Ok(cmd) => self.handle(cmd),
                Err(_) => break,
            }
        }
    }

    fn handle(&mut self, cmd: RoomCmd) {
        let now = Instant::now();
        match cmd {
            RoomCmd::Join {
                request,
                session,
                to_client,
                reply,
            } => match self.room.join(now, request) {
                Ok(id) => {
                    self.metrics.participants.fetch_add(1, Ordering::Relaxed);
                    self.clients.insert(id, ClientLink::new(session, to_client));
                    self.empty_since = None;
                    self.ever_joined = true;
                    let _ = reply.send(Ok(id));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            },
            RoomCmd::Signal {
                participant,
                message,
            } => self.room.handle_signal(now, participant, message),
            RoomCmd::Resume {
                sid,
                identity,
                session,
                ice_servers,
                to_client,
                reply,
            } => {
                let found = self.room.find_session(&sid, &identity).and_then(|id| {
                    let info = self.room.participant(id)?;
                    let link = self.clients.get_mut(&id)?;
                    Some((id, info, link))
                });
                let Some((id, participant, link)) = found else {
                    let _ = reply.send(Err(format!(
                        "no session {sid} for this identity in this room"
                    )));
                    return;
                };
                // A socket the server still thinks open is the one the
                // client gave up on: close it.
                if let Some(old) = link.tx.take() {
                    let _ = old.try_send(ToClient::Close);
                }
                let missed = std::mem::take(&mut link.missed);
                tracing::info!(room = %self.handle.name, %sid, missed = missed.len(), "session resumed");
                let _ = to_client.try_send(ToClient::Message(ServerMessage::Reconnected {
                    participant,
                    ice_servers,
                }));
                for message in missed {
                    let _ = to_client.try_send(ToClient::Message(message));
                }
                link.session = session;
                link.tx = Some(to_client);
                link.away_since = None;
                let _ = reply.send(Ok(id));
            }
            RoomCmd::Disconnected {
                participant,
                session,
            } => {
                let Some(link) = self.clients.get_mut(&participant) else {
                    return;
                };
                if link.session != session {
                    return; // an older socket of a resumed session
                }
                if self.reconnect_grace.is_zero() {
                    self.room.leave(now, participant, LeaveReason::ClientLeave);
                    return;
                }
                tracing::info!(room = %self.handle.name, ?participant, "signalling lost; holding the session");
                link.tx = None;
                link.away_since = Some(now);
            }
            RoomCmd::Leave {
                participant,
                reason,
            } => self.room.leave(now, participant, reason),
            RoomCmd::Reply {
                participant,
                message,
            } => {
                if let Some(tx) = self.clients.get(&participant).and_then(|l| l.tx.as_ref()) {
                    let _ = tx.try_send(ToClient::Message(message));
                }
            }
            RoomCmd::Participants { reply } => {
                let _ = reply.send(self.room.participants());
            }
            RoomCmd::RemoveIdentity { identity, reply } => {
                let found = self.room.find_identity(&identity);
                if let Some(id) = found {
                    self.room.leave(now, id, LeaveReason::Removed);
                }
                let _ = reply.send(found.is_some());
            }
            RoomCmd::Close(_) => {}
        }
    }

    /// Ends the sessions whose clients did not come back within the grace.
    fn expire_away(&mut self, now: Instant) {
        let expired: Vec<ParticipantId> = self
            .clients
            .iter()
            .filter(|(_, l)| {
                l.away_since
                    .is_some_and(|t| now >= t + self.reconnect_grace)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            tracing::info!(room = %self.handle.name, participant = ?id, "not back within the reconnect grace; removing");
            self.room.leave(now, id, LeaveReason::ConnectionLost);
        }
    }

    /// Carries out everything the room produced: its datagrams into
    /// `batch`, its signals to the clients' queues, its routes into
    /// `router` (as room `id`); then works out its next deadline.
    pub(crate) fn flush(&mut self, router: &mut Router, batch: &mut SendBatch, id: RoomId) {
        self.touched = false;
        let deadline;
        loop {
            match self.room.poll_output() {
                Output::Transmit(t) => batch.push(t.destination, t.contents),
                Output::Signal {
                    participant,
                    message,
                } => {
                    // A closed queue means the session already ended and
                    // sent its own leave; only a full one is a slow client.
                    let overflow = match self.clients.get_mut(&participant) {
                        Some(ClientLink { tx: Some(tx), .. }) => matches!(
                            tx.try_send(ToClient::Message(message)),
                            Err(mpsc::error::TrySendError::Full(_))
                        ),
                        // Away: kept for when it comes back.
                        Some(link) => {
                            link.missed.push(message);
                            link.missed.len() > CLIENT_QUEUE
                        }
                        None => false,
                    };
                    if overflow {
                        tracing::warn!(?participant, "signalling queue full; disconnecting");
                        // Handled after this flush so the room is not re-entered here.
                        let _ = self.tx.try_send(RoomCmd::Leave {
                            participant,
                            reason: LeaveReason::Removed,
                        });
                        self.clients.remove(&participant);
                    }
                }
                Output::Event(RoomEvent::UfragAdded(ufrag)) => {
                    if !self.closed {
                        router.add_ufrag(ufrag, id);
                    }
                }
                Output::Event(RoomEvent::Unrouted { ufrags, addrs }) => {
                    router.remove(ufrags, addrs)
                }
                Output::Event(RoomEvent::ParticipantRemoved { participant, .. }) => {
                    self.metrics.participants.fetch_sub(1, Ordering::Relaxed);
                    if let Some(tx) = self.clients.remove(&participant).and_then(|l| l.tx) {
                        let _ = tx.try_send(ToClient::Close);
                    }
                }
                Output::Timeout(t) => {
                    deadline = t;
                    break;
                }
            }
        }
        let count = self.room.participant_count();
        self.handle.participants.store(count, Ordering::Relaxed);
        if count == 0 && self.empty_since.is_none() {
            self.empty_since = Some(Instant::now());
        }
        if self.closed {
            // The last report, whenever the one before was.
            self.last_report = Instant::now() - STATS_INTERVAL;
            self.report_stats();
            self.metrics.rooms.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.report_stats();
        let mut wake = match self.empty_since {
            Some(since) => deadline.min(since + self.idle_limit()),
            None => deadline,
        };
        if let Some(away) = self.clients.values().filter_map(|c| c.away_since).min() {
            wake = wake.min(away + self.reconnect_grace);
        }
        // A change in open connections reaches the gauges within a
        // report interval even when nothing else wakes the room.
        if self.reported_conns != self.room.connection_count() {
            wake = wake.min(self.last_report + STATS_INTERVAL);
        }
        self.deadline = wake;
    }

    /// Adds the room's counters to the server's, at most once a second so
    /// the packet path does not pay for it.
    fn report_stats(&mut self) {
        let now = Instant::now();
        if now < self.last_report + STATS_INTERVAL {
            return;
        }
        self.last_report = now;
        let stats = self.room.stats();
        let m = &self.metrics;
        // Counters grow by what the room and its batch did since the last report.
        let add = |counter: &std::sync::atomic::AtomicUsize, now: u64, before: u64| {
            counter.fetch_add((now - before) as usize, Ordering::Relaxed);
        };
        let was = &self.reported;
        add(&m.rtp_in, stats.rtp_in, was.rtp_in);
        add(&m.rtp_forwarded, stats.rtp_forwarded, was.rtp_forwarded);
        add(
            &m.bytes_forwarded,
            stats.bytes_forwarded,
            was.bytes_forwarded,
        );
        add(
            &m.rtp_encrypted_by_room,
            stats.rtp_sent_by_room,
            was.rtp_sent_by_room,
        );
        add(
            &m.rtp_received_by_room,
            stats.rtp_received_by_room,
            was.rtp_received_by_room,
        );
        add(
            &m.rtcp_received_by_room,
            stats.rtcp_received_by_room,
            was.rtcp_received_by_room,
        );
        add(
            &m.addresses_unrouted,
            stats.addresses_unrouted,
            was.addresses_unrouted,
        );
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            add(&m.drops[i], stats.dropped(*reason), was.dropped(*reason));
        }
        self.reported = stats.clone();
        let conns = self.room.connection_count();
        if conns >= self.reported_conns {
            m.peer_connections
                .fetch_add(conns - self.reported_conns, Ordering::Relaxed);
        } else {
            m.peer_connections
                .fetch_sub(self.reported_conns - conns, Ordering::Relaxed);
        }
        self.reported_conns = conns;
    }

    /// Closes the room: everyone leaves (told why), joins still queued
    /// are refused, and the media thread lets go of the room after its
    /// next flush.
    fn close(&mut self, reason: LeaveReason) {
        // Only remove our own entry: a new room of the same name may exist.
        self.registry
            .remove_if(&self.handle.name, |_, h| h.sid == self.handle.sid);
        let now = Instant::now();
        let ids: Vec<ParticipantId> = self.clients.keys().copied().collect();
        for id in ids {
            self.room.leave(now, id, reason);
        }
        // Joins that raced with closing learn the room is gone.
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let RoomCmd::Join { reply, .. } = cmd {
                let _ = reply.send(Err("room closed".into()));
            }
        }
        self.closed = true;
    }
}
