//! The one UDP port all media shares, and the thread that serves it.
//!
//! One thread owns the media socket and every room. It blocks in the
//! kernel (`ppoll`) until a datagram or a command arrives or a room's timer
//! is due; reads what has arrived (on Linux many datagrams per `recvmmsg`,
//! into slices of one buffer, each with the time the kernel received it);
//! hands each datagram to the room that owns its sender by calling it;
//! lets every room it touched produce its output; and sends all of it
//! with one `sendmmsg` (see [`crate::batch`]). No task switch, queue or
//! reactor stands between the socket and a room: on a small room each
//! wake carries a few datagrams, and what the wake costs beyond the
//! kernel's part is the server's per-packet overhead.
//!
//! Routing: the first datagram from a client is a STUN binding request
//! whose USERNAME names the server-side ufrag; after that the source
//! address does. Bare binding requests (no USERNAME) are answered with the
//! sender's address, so the port doubles as a STUN server. The routing
//! tables belong to this thread alone: the rooms it runs update them
//! directly, so the per-packet path takes no lock.
//!
//! Signalling (joins, SDP, leaves) reaches a room over the room's own
//! bounded queue ([`crate::rooms::RoomSender`]); a send also tells this
//! thread which room has work, and wakes it through a socket pair if it
//! sleeps.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use rustc_hash::FxHashMap;
use sfu_core::demux::{binding_request_ufrag, reflexive_response};
use tokio::sync::mpsc;

use crate::batch::{SendBatch, Sent};
use crate::metrics::Metrics;
use crate::rooms::Worker;

/// A room's number on this server, never reused.
pub type RoomId = u64;

/// What the media thread is told besides datagrams.
pub(crate) enum Control {
    /// A new room, to run from now on.
    Add(RoomId, Box<Worker>),
    /// The room has commands queued.
    Ready(RoomId),
    /// End the thread (the server is going away).
    Stop,
}

/// Wakes the media thread out of its wait, once per wait however many
/// ask.
struct Wake {
    /// Set by the first waker since the thread last looked.
    pending: AtomicBool,
    tx: UnixDatagram,
}

impl Wake {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // Non-blocking: a full pair already has a wake in it.
            let _ = self.tx.send(&[1]);
        }
    }
}

/// How the rest of the server reaches the media thread.
#[derive(Clone)]
pub struct MediaHandle {
    control: mpsc::UnboundedSender<Control>,
    wake: Arc<Wake>,
}

impl MediaHandle {
    /// Queues `control` and wakes the thread; false once it has ended.
    pub(crate) fn send(&self, control: Control) -> bool {
        let sent = self.control.send(control).is_ok();
        self.wake.wake();
        sent
    }

    /// Ends the media thread; its rooms end with it, unclosed.
    pub fn stop(&self) {
        self.send(Control::Stop);
    }
}

/// Starts the media thread on `socket` (made non-blocking here). Rooms it
/// ends give their memory back on `runtime`'s blocking threads.
pub fn start(
    socket: UdpSocket,
    udp_gso: bool,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<MediaHandle> {
    socket.set_nonblocking(true)?;
    let (wake_tx, wake_rx) = UnixDatagram::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let handle = MediaHandle {
        control: control_tx,
        wake: Arc::new(Wake {
            pending: AtomicBool::new(false),
            tx: wake_tx,
        }),
    };
    let media = MediaThread {
        router: Router {
            by_ufrag: HashMap::new(),
            by_addr: FxHashMap::default(),
        },
        rooms: FxHashMap::default(),
        touched: Vec::new(),
        receiver: Receiver::default(),
        control: control_rx,
        wake_rx,
        wake: handle.wake.clone(),
        batch: SendBatch::new(udp_gso),
        reported_sent: Sent::default(),
        last_report: Instant::now(),
        metrics,
        runtime,
        socket,
    };
    std::thread::Builder::new()
        .name("media".into())
        .spawn(move || media.run())?;
    Ok(handle)
}

/// Longest wait without looking at the control queue.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Reads per wake at most before the rooms' output goes out.
const MAX_READS_PER_WAKE: usize = 8;
/// How often the thread adds its send counters to the server's.
const SENT_REPORT_INTERVAL: Duration = Duration::from_secs(1);

struct MediaThread {
    socket: UdpSocket,
    router: Router,
    rooms: FxHashMap<RoomId, Box<Worker>>,
    /// Rooms with work done since their last flush.
    touched: Vec<RoomId>,
    receiver: Receiver,
    control: mpsc::UnboundedReceiver<Control>,
    wake_rx: UnixDatagram,
    wake: Arc<Wake>,
    /// The datagrams of every room touched in one wake, sent together.
    batch: SendBatch,
    reported_sent: Sent,
    last_report: Instant,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
}

impl MediaThread {
    fn run(mut self) {
        loop {
            if !self.take_control() {
                return;
            }
            let now = Instant::now();
            // Every room's deadline is looked at twice a wake: a few
            // microseconds at a thousand rooms, against a wake's hundred
            // or more.
            for (id, worker) in self.rooms.iter_mut() {
                if worker.deadline() <= now {
                    worker.on_timer(now);
                    touch(&mut self.touched, *id, worker);
                }
            }
            self.flush();
            let next = self.rooms.values().map(|w| w.deadline()).min();
            let (readable, woken) = self.wait(next);
            if woken {
                let mut sink = [0u8; 64];
                while self.wake_rx.recv(&mut sink).is_ok() {}
                self.wake.pending.store(false, Ordering::SeqCst);
            }
            if readable {
                self.receive();
            }
        }
    }

    /// Acts on queued controls; false when the thread is to end.
    fn take_control(&mut self) -> bool {
        loop {
            match self.control.try_recv() {
                Ok(Control::Add(id, worker)) => {
                    self.rooms.insert(id, worker);
                    if let Some(worker) = self.rooms.get_mut(&id) {
                        touch(&mut self.touched, id, worker);
                    }
                }
                Ok(Control::Ready(id)) => {
                    if let Some(worker) = self.rooms.get_mut(&id) {
                        worker.take_commands();
                        touch(&mut self.touched, id, worker);
                    }
                }
                Ok(Control::Stop) => return false,
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Carries out what the touched rooms produced, sends it, and lets go
    /// of the rooms that closed.
    fn flush(&mut self) {
        for id in std::mem::take(&mut self.touched) {
            let Some(worker) = self.rooms.get_mut(&id) else {
                continue;
            };
            worker.flush(&mut self.router, &mut self.batch, id);
            if worker.closed() {
                self.rooms.remove(&id);
                // Routes a room did not take back itself go with it.
                self.router.by_ufrag.retain(|_, r| *r != id);
                self.router.by_addr.retain(|_, r| *r != id);
                // The room's memory back to the system, off this thread.
                let metrics = self.metrics.clone();
                self.runtime.spawn_blocking(move || {
                    crate::metrics::release_freed_memory();
                    metrics.memory_releases.fetch_add(1, Ordering::Relaxed);
                });
            }
        }
        if !self.batch.is_empty() {
            self.batch.flush(&self.socket);
        }
        self.report_sent();
    }

    /// Adds what the batch sent to the server's counters, at most once a
    /// second.
    fn report_sent(&mut self) {
        let now = Instant::now();
        if now < self.last_report + SENT_REPORT_INTERVAL {
            return;
        }
        self.last_report = now;
        let (sent, had, m) = (self.batch.sent, self.reported_sent, &self.metrics);
        let add = |counter: &std::sync::atomic::AtomicUsize, now: u64, before: u64| {
            counter.fetch_add((now - before) as usize, Ordering::Relaxed);
        };
        add(&m.datagrams_sent, sent.datagrams, had.datagrams);
        add(&m.gso_messages, sent.gso_messages, had.gso_messages);
        add(&m.gso_datagrams, sent.gso_datagrams, had.gso_datagrams);
        add(
            &m.datagrams_send_buffer_full,
            sent.dropped_full,
            had.dropped_full,
        );
        self.reported_sent = sent;
    }

    /// Sleeps until the media socket is readable, the thread is woken, or
    /// `until` (at most [`MAX_WAIT`]); says which of the first two.
    fn wait(&self, until: Option<Instant>) -> (bool, bool) {
        let timeout = until
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT);
        let mut fds = [
            libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if poll(&mut fds, timeout) <= 0 {
            return (false, false);
        }
        (fds[0].revents != 0, fds[1].revents != 0)
    }

    /// Reads what has arrived and hands each datagram to its room.
    fn receive(&mut self) {
        for _ in 0..MAX_READS_PER_WAKE {
            let full = match self.receiver.try_receive(&self.socket) {
                Ok(datagrams) => {
                    let full = datagrams.len() >= RECV_BATCH;
                    let read = (SystemTime::now(), Instant::now());
                    for (source, contents, stamp) in datagrams {
                        route(
                            &mut self.router,
                            &mut self.rooms,
                            &mut self.touched,
                            &self.socket,
                            &self.metrics,
                            source,
                            contents,
                            arrival(stamp, read),
                        );
                    }
                    full
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                // ICMP errors from departed clients surface here on some
                // systems; the next read goes on.
                Err(e) => {
                    tracing::trace!(error = %e, "media recv");
                    true
                }
            };
            if !full {
                return;
            }
        }
    }
}

/// Notes that `worker` has work to flush.
fn touch(touched: &mut Vec<RoomId>, id: RoomId, worker: &mut Worker) {
    if worker.touch() {
        touched.push(id);
    }
}

/// `ppoll` with a nanosecond timeout where there is one; the number of
/// ready descriptors, 0 on timeout, negative on an error (EINTR).
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> i32 {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: valid pollfds and timespec for the duration of the call.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Rounded up: waking early would only spin.
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: valid pollfds for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }
    }
}

/// Kernel arrival stamps further behind the read than this are not
/// believed: the wall clock they are taken on has stepped.
const MAX_READ_DELAY: Duration = Duration::from_secs(1);

/// When a datagram arrived, on the monotonic clock, from the kernel's
/// wall-clock stamp and the moment it was read (`read`, on both clocks).
/// Transport-wide feedback reports these times to the sender, whose
/// bandwidth estimate reads growing delay as congestion: the time this
/// server took to get to its socket is not the network's, and must not
/// count as such.
fn arrival(stamp: Option<SystemTime>, (wall, mono): (SystemTime, Instant)) -> Instant {
    match stamp.and_then(|s| wall.duration_since(s).ok()) {
        Some(ago) if ago < MAX_READ_DELAY => mono.checked_sub(ago).unwrap_or(mono),
        _ => mono,
    }
}

/// The routing tables, owned by the media thread.
pub(crate) struct Router {
    by_ufrag: HashMap<String, RoomId>,
    /// Keys are client addresses, added only for checks naming a known
    /// ufrag and bounded per connection by the rooms, so the fast hash
    /// cannot be made to degrade by the sources anyone may send from.
    by_addr: FxHashMap<SocketAddr, RoomId>,
}

impl Router {
    pub(crate) fn add_ufrag(&mut self, ufrag: String, room: RoomId) {
        self.by_ufrag.insert(ufrag, room);
    }

    pub(crate) fn remove(&mut self, ufrags: Vec<String>, addrs: Vec<SocketAddr>) {
        for u in ufrags {
            self.by_ufrag.remove(&u);
        }
        for a in addrs {
            self.by_addr.remove(&a);
        }
    }
}

/// Hands one datagram to the room that owns its sender.
#[allow(clippy::too_many_arguments)]
fn route(
    router: &mut Router,
    rooms: &mut FxHashMap<RoomId, Box<Worker>>,
    touched: &mut Vec<RoomId>,
    socket: &UdpSocket,
    metrics: &Metrics,
    source: SocketAddr,
    contents: BytesMut,
    at: Instant,
) {
    metrics.datagrams_in.fetch_add(1, Ordering::Relaxed);
    let room = match binding_request_ufrag(&contents) {
        Some(ufrag) => match router.by_ufrag.get(ufrag) {
            Some(&room) => {
                router.by_addr.insert(source, room);
                Some(room)
            }
            None => None,
        },
        None => router.by_addr.get(&source).copied(),
    };
    let Some(worker) = room.and_then(|id| Some((id, rooms.get_mut(&id)?))) else {
        // A bare binding request: a client learning its
        // server-reflexive address, as from any STUN server.
        if let Some(response) = reflexive_response(&contents, source) {
            metrics
                .stun_binding_answered
                .fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&response, source);
            return;
        }
        // Unknown sources are dropped without allocating or logging.
        metrics.datagrams_unrouted.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let (id, worker) = worker;
    worker.datagram(source, contents, at);
    touch(touched, id, worker);
}

/// Largest datagram read; anything larger is truncated and then rejected
/// by the connection it reaches.
const MAX_DATAGRAM: usize = 1500;

/// Datagrams read with one system call at most.
#[cfg(target_os = "linux")]
const RECV_BATCH: usize = 32;
#[cfg(not(target_os = "linux"))]
const RECV_BATCH: usize = 1;
/// Receive slots per buffer; datagrams are handed on as slices of it, so
/// receiving allocates and copies nothing per datagram.
#[cfg(target_os = "linux")]
const ARENA_SLOTS: usize = 128;
/// Arena buffers kept beside the one in use, for when a datagram of the
/// last one is still queued for a room.
const SPARE_ARENAS: usize = 3;

/// Reads datagrams from the media socket: many per `recvmmsg` on Linux,
/// one `recv_from` elsewhere.
#[derive(Default)]
struct Receiver {
    arena: BytesMut,
    /// Earlier arena buffers, oldest first, kept to be taken back.
    spares: Vec<BytesMut>,
    #[cfg(target_os = "linux")]
    addrs: Vec<socket2::SockAddrStorage>,
    #[cfg(target_os = "linux")]
    iovs: Vec<libc::iovec>,
    #[cfg(target_os = "linux")]
    msgs: Vec<libc::mmsghdr>,
    /// Ancillary data of each message: the kernel's arrival stamp.
    #[cfg(target_os = "linux")]
    controls: Vec<[u64; CONTROL_WORDS]>,
    /// Datagrams read, with their arrival stamps where the kernel gave one.
    received: Vec<Datagram>,
}

type Datagram = (SocketAddr, BytesMut, Option<SystemTime>);

/// Room for one `SCM_TIMESTAMPNS` control message (a header and a
/// timespec, 32 bytes on 64-bit Linux), in 8-byte words for alignment.
#[cfg(target_os = "linux")]
const CONTROL_WORDS: usize = 8;

// SAFETY: the raw pointers inside point into the receiver's own vectors,
// which are filled once and never grow afterwards, and are used only by
// `recvmmsg` calls made through `&mut self`.
unsafe impl Send for Receiver {}

/// Takes `buffer` (emptied) back whole with `size` bytes of initialised
/// memory, if no datagram cut from it is still held.
fn reclaim(buffer: &mut BytesMut, size: usize) -> bool {
    buffer.clear();
    if !buffer.try_reclaim(size) {
        return false;
    }
    // SAFETY: every buffer the arena uses is one `BytesMut::zeroed` made
    // (reclaiming never reallocates), and its capacity is no more than
    // the zeroed length: every byte of it has been initialised since. It
    // has room for `size`.
    unsafe { buffer.set_len(size) };
    true
}

impl Receiver {
    /// Gives the arena `size` bytes of initialised memory to receive into.
    ///
    /// Once every datagram handed on from a buffer has been dropped (the
    /// rooms are done with them soon after they are read), the buffer is
    /// taken back as it is: no allocation, no page faults, no zeroing. The
    /// arena tries its own buffer first, then the spares: buffers that
    /// still had a datagram out (queued for a busy room) when they were
    /// last tried. Only when none is free is a fresh one made, zeroed
    /// once, so every slot handed on is initialised memory; the spare
    /// held longest makes way for it when there are already
    /// [`SPARE_ARENAS`].
    fn refill_arena(&mut self, size: usize) {
        if reclaim(&mut self.arena, size) {
            return;
        }
        if let Some(i) = self.spares.iter_mut().position(|b| reclaim(b, size)) {
            let free = self.spares.remove(i);
            let busy = std::mem::replace(&mut self.arena, free);
            self.spares.push(busy);
            return;
        }
        if self.spares.len() >= SPARE_ARENAS {
            self.spares.remove(0);
        }
        let busy = std::mem::replace(&mut self.arena, BytesMut::zeroed(size));
        self.spares.push(busy);
    }

    /// The datagrams that can be read now (at most [`RECV_BATCH`]); a
    /// would-block error when there are none.
    #[cfg(target_os = "linux")]
    fn try_receive(
        &mut self,
        socket: &UdpSocket,
    ) -> std::io::Result<std::vec::Drain<'_, Datagram>> {
        self.recvmmsg(socket.as_raw_fd())?;
        Ok(self.received.drain(..))
    }

    #[cfg(not(target_os = "linux"))]
    fn try_receive(
        &mut self,
        socket: &UdpSocket,
    ) -> std::io::Result<std::vec::Drain<'_, Datagram>> {
        if self.arena.len() < MAX_DATAGRAM {
            self.refill_arena(MAX_DATAGRAM * 64);
        }
        let (n, source) = socket.recv_from(&mut self.arena[..MAX_DATAGRAM])?;
        let mut contents = self.arena.split_to(MAX_DATAGRAM);
        contents.truncate(n);
        self.received.push((source, contents, None));
        Ok(self.received.drain(..))
    }

    #[cfg(target_os = "linux")]
    fn recvmmsg(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        use socket2::{SockAddr, SockAddrStorage};
        if self.arena.len() < RECV_BATCH * MAX_DATAGRAM {
            self.refill_arena(ARENA_SLOTS * MAX_DATAGRAM);
        }
        if self.msgs.is_empty() {
            // Ask for arrival stamps; without them (an old kernel) the
            // time of the read stands in.
            let on: libc::c_int = 1;
            // SAFETY: a valid socket and an int option value.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    &on as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            self.controls = vec![[0; CONTROL_WORDS]; RECV_BATCH];
            // The headers point into these vectors, which never grow again.
            self.addrs = (0..RECV_BATCH).map(|_| SockAddrStorage::zeroed()).collect();
            self.iovs = (0..RECV_BATCH)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: MAX_DATAGRAM,
                })
                .collect();
            for i in 0..RECV_BATCH {
                // SAFETY: all-zero is a valid value for this plain C struct.
                let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
                msg.msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
                msg.msg_hdr.msg_iov = &mut self.iovs[i];
                msg.msg_hdr.msg_iovlen = 1;
                msg.msg_hdr.msg_control = self.controls[i].as_mut_ptr() as *mut libc::c_void;
                self.msgs.push(msg);
            }
        }
        // Per call, only where each slot is and how much room the
        // kernel has for the sender's address.
        let base = self.arena.as_mut_ptr();
        for i in 0..RECV_BATCH {
            // SAFETY: slot i lies within the arena (checked above).
            self.iovs[i].iov_base = unsafe { base.add(i * MAX_DATAGRAM) } as *mut libc::c_void;
            self.msgs[i].msg_hdr.msg_namelen = self.addrs[i].size_of();
            self.msgs[i].msg_hdr.msg_controllen = CONTROL_WORDS * 8;
        }
        // SAFETY: msgs, addrs and iovs describe valid, writable buffers
        // that live until the call returns.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for i in 0..n as usize {
            let len = (self.msgs[i].msg_len as usize).min(MAX_DATAGRAM);
            let mut contents = self.arena.split_to(MAX_DATAGRAM);
            contents.truncate(len);
            let storage = std::mem::replace(&mut self.addrs[i], SockAddrStorage::zeroed());
            // SAFETY: the kernel wrote the sender's address and its length.
            let source = unsafe { SockAddr::new(storage, self.msgs[i].msg_hdr.msg_namelen) };
            if let Some(source) = source.as_socket() {
                let stamp = arrival_stamp(&self.msgs[i].msg_hdr);
                self.received.push((source, contents, stamp));
            }
        }
        Ok(())
    }
}

/// The kernel's `SCM_TIMESTAMPNS` stamp of a received message, if any.
#[cfg(target_os = "linux")]
fn arrival_stamp(hdr: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: the kernel filled the control buffer and set its length;
    // the CMSG macros stay within it, and the timespec is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                let since_epoch = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                return SystemTime::UNIX_EPOCH.checked_add(since_epoch);
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A media socket as the media thread has it: non-blocking.
    fn bind(addr: &str) -> UdpSocket {
        let socket = UdpSocket::bind(addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket
    }

    /// Waits (at most 10 s) for datagrams, as the media thread does, and
    /// reads what is there.
    fn receive(receiver: &mut Receiver, socket: &UdpSocket) -> Vec<Datagram> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match receiver.try_receive(socket) {
                Ok(datagrams) => return datagrams.collect(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no datagram within 10 s");
            let mut fds = [libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            poll(&mut fds, left);
        }
    }

    /// More datagrams than one read takes, over more than one buffer:
    /// each comes out whole, in order, with its sender.
    #[test]
    fn bursts_are_read_whole_and_in_order() {
        let socket = bind("127.0.0.1:0");
        let to = socket.local_addr().unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut receiver = Receiver::default();
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        // Rounds of 50, within the socket's receive buffer.
        let (rounds, per_round) = (6, 50);
        let total = rounds * per_round;
        for round in 0..rounds {
            for i in 0..per_round {
                let n = round * per_round + i;
                let from = if n % 2 == 0 { &a } else { &b };
                let size = 1 + (n * 37) % MAX_DATAGRAM;
                from.send_to(&vec![n as u8; size], to).unwrap();
            }
            while got.len() < (round + 1) * per_round {
                let batch = receive(&mut receiver, &socket);
                got.extend(batch.into_iter().map(|(s, c, _)| (s, c.to_vec())));
            }
        }
        assert_eq!(got.len(), total);
        for (n, (source, contents)) in got.iter().enumerate() {
            let from = if n % 2 == 0 { &a } else { &b };
            assert_eq!(*source, from.local_addr().unwrap(), "datagram {n}");
            assert_eq!(contents.len(), 1 + (n * 37) % MAX_DATAGRAM, "datagram {n}");
            assert!(contents.iter().all(|x| *x == n as u8), "datagram {n}");
        }
    }

    /// Once every slot handed on from the arena has been dropped, the next
    /// refill takes the same buffer back; while one is still held, a
    /// fresh, zeroed one.
    #[test]
    fn a_drained_arena_is_reused_and_a_held_one_is_not() {
        let size = 4 * MAX_DATAGRAM;
        let mut r = Receiver::default();
        r.refill_arena(size);
        let first = r.arena.as_ptr();
        let slots: Vec<BytesMut> = (0..4).map(|_| r.arena.split_to(MAX_DATAGRAM)).collect();
        drop(slots);
        r.refill_arena(size);
        assert_eq!(r.arena.as_ptr(), first, "taken back");
        assert_eq!(r.arena.len(), size);
        let mut held: Vec<BytesMut> = (0..4).map(|_| r.arena.split_to(MAX_DATAGRAM)).collect();
        held[2][..5].copy_from_slice(b"held!");
        let kept = held.swap_remove(2);
        drop(held);
        r.refill_arena(size);
        assert_ne!(r.arena.as_ptr(), first, "one slot still in use");
        assert!(r.arena.iter().all(|&b| b == 0));
        assert_eq!(&kept[..5], b"held!");
        // The second buffer's slots are all still held when it runs out;
        // the first is free again by then: it comes back, not a third.
        let second = r.arena.as_ptr();
        let held: Vec<BytesMut> = (0..4).map(|_| r.arena.split_to(MAX_DATAGRAM)).collect();
        drop(kept);
        r.refill_arena(size);
        assert_eq!(r.arena.as_ptr(), first, "the spare taken back");
        assert_eq!(r.arena.len(), size);
        drop(held);
        r.refill_arena(size);
        assert_eq!(r.arena.as_ptr(), first, "its own buffer first");
        let _taken = r.arena.split_to(size);
        r.refill_arena(size);
        assert_eq!(r.arena.as_ptr(), second, "then the other spare");
    }

    /// Spares that never come free are let go, oldest first: the arena
    /// holds no more than its own buffer and [`SPARE_ARENAS`] others.
    #[test]
    fn held_spares_are_bounded() {
        let size = 2 * MAX_DATAGRAM;
        let mut r = Receiver::default();
        let mut held = Vec::new();
        for _ in 0..10 {
            r.refill_arena(size);
            held.push(r.arena.split_to(size));
            assert!(r.spares.len() <= SPARE_ARENAS);
        }
        assert_eq!(r.spares.len(), SPARE_ARENAS);
    }

    /// IPv6 senders come out with their address.
    #[test]
    fn ipv6_senders_are_named() {
        let socket = bind("[::1]:0");
        let to = socket.local_addr().unwrap();
        let from = std::net::UdpSocket::bind("[::1]:0").unwrap();
        from.send_to(b"hello", to).unwrap();
        let mut receiver = Receiver::default();
        let got: Vec<(SocketAddr, Vec<u8>)> = receive(&mut receiver, &socket)
            .into_iter()
            .map(|(s, c, _)| (s, c.to_vec()))
            .collect();
        assert_eq!(got, vec![(from.local_addr().unwrap(), b"hello".to_vec())]);
    }

    /// A datagram read well after it arrived carries the time it arrived,
    /// not the time it was read.
    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_carry_the_kernels_arrival_time() {
        let socket = bind("127.0.0.1:0");
        let to = socket.local_addr().unwrap();
        let from = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut receiver = Receiver::default();
        // The server busy elsewhere between arrival and read: the delay
        // whose measure is under test.
        let busy = Duration::from_millis(20);
        // Linux turns arrival stamping on a moment after the first socket
        // asks for it (until then it stamps at the read), so datagrams go
        // until one carries its arrival, within a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = Duration::ZERO;
        while Instant::now() < deadline {
            let sent = SystemTime::now();
            from.send_to(b"datagram", to).unwrap();
            std::thread::sleep(busy);
            let got = receive(&mut receiver, &socket);
            let read = SystemTime::now();
            let Some(stamp) = got[0].2 else {
                continue;
            };
            assert!(stamp >= sent, "{stamp:?} before the send at {sent:?}");
            last = read.duration_since(stamp).unwrap();
            if last >= busy {
                // On the monotonic clock, as the room takes it.
                let now = Instant::now();
                assert_eq!(now - arrival(Some(stamp), (read, now)), last);
                return;
            }
        }
        panic!("no datagram stamped at arrival; the last one {last:?} before its read");
    }

    /// Stamps the wall clock cannot vouch for give way to the read time.
    #[test]
    fn arrival_falls_back_to_the_read_time() {
        let (wall, mono) = (SystemTime::now(), Instant::now());
        let ms = Duration::from_millis;
        assert_eq!(arrival(Some(wall - ms(5)), (wall, mono)), mono - ms(5));
        assert_eq!(arrival(None, (wall, mono)), mono);
        assert_eq!(
            arrival(Some(wall + ms(5)), (wall, mono)),
            mono,
            "stamp after the read"
        );
        assert_eq!(
            arrival(Some(wall - ms(5000)), (wall, mono)),
            mono,
            "clock stepped"
        );
    }
}
