//! Sending many datagrams with few system calls.
//!
//! One publisher packet becomes a datagram per subscriber; sending them one
//! `sendto` at a time costs a system call each. On Linux the media thread
//! hands the whole batch of a wake, every room's, to `sendmmsg`. Datagrams
//! to the same address that were queued together (the packets of one video frame, say) go as one
//! UDP GSO message (`UDP_SEGMENT`): the kernel routes and builds one
//! buffer for the run and cuts it into datagrams at the end of its path,
//! or in the network card. A run is made of datagrams of one size, the
//! last of which may be shorter, as GSO requires. Elsewhere, or where the
//! kernel refuses GSO, datagrams go one by one.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use std::net::UdpSocket;

use bytes::BytesMut;

/// What a batch has sent so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub datagrams: u64,
    /// Dropped because the socket's send buffer was full.
    pub dropped_full: u64,
    /// GSO messages, and the datagrams they carried.
    pub gso_messages: u64,
    pub gso_datagrams: u64,
}

/// Datagrams waiting to go out of the media socket.
pub struct SendBatch {
    items: Vec<(SocketAddr, BytesMut)>,
    pub sent: Sent,
    /// Runs to one address may be sent as one GSO message.
    gso: bool,
    /// Reused from flush to flush.
    order: Vec<usize>,
    keys: Vec<(u64, usize)>,
    messages: Vec<Message>,
    #[cfg(target_os = "linux")]
    sys: linux::Buffers,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch::new(true)
    }
}

impl SendBatch {
    /// `gso`: runs to one address may go as GSO messages (Linux only).
    pub fn new(gso: bool) -> Self {
        SendBatch {
            items: Vec::new(),
            sent: Sent::default(),
            gso: gso && gso_available(),
            order: Vec::new(),
            keys: Vec::new(),
            messages: Vec::new(),
            #[cfg(target_os = "linux")]
            sys: linux::Buffers::default(),
        }
    }
}

/// A number that orders IPv4 destinations as their addresses do. IPv6
/// ones come after, grouped by a hash: two whose hashes collide only
/// interleave, which splits their runs.
fn order_key(to: &SocketAddr) -> u64 {
    match to {
        SocketAddr::V4(a) => u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()),
        SocketAddr::V6(_) => {
            let mut h = rustc_hash::FxHasher::default();
            to.hash(&mut h);
            1 << 63 | h.finish() >> 1
        }
    }
}

/// One message for the kernel: `count` datagrams from `order[first..]`,
/// all to the same address, cut at `segment` bytes when more than one.
#[derive(Debug, Clone, Copy)]
struct Message {
    first: usize,
    count: usize,
    segment: usize,
}

/// At most this many datagrams per GSO message (older kernels take no
/// more).
const MAX_SEGMENTS: usize = 64;
/// At most this many bytes per GSO message (one IP datagram's worth).
const MAX_GSO_BYTES: usize = 65_000;
/// At most this many messages per system call.
const MAX_BATCH: usize = 64;

impl SendBatch {
    pub fn push(&mut self, to: SocketAddr, contents: BytesMut) {
        self.items.push((to, contents));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Groups the queued datagrams into messages: by destination (keeping
    /// each destination's own order), then into runs GSO can carry.
    fn plan(&mut self) {
        self.order.clear();
        self.messages.clear();
        if self.gso {
            // Grouped by destination in address order, each destination's
            // datagrams in their order, sorted on a number: cheaper than
            // comparing addresses. (Address order, not any grouping: a hashed
            // order cost 3-5% more server CPU in a livestream, in
            // alternated runs.)
            self.keys.clear();
            self.keys.extend(
                self.items
                    .iter()
                    .enumerate()
                    .map(|(i, (to, _))| (order_key(to), i)),
            );
            self.keys.sort_unstable();
            self.order.extend(self.keys.iter().map(|&(_, i)| i));
        } else {
            self.order.extend(0..self.items.len());
        }
        let mut i = 0;
        while i < self.order.len() {
            let (to, first) = &self.items[self.order[i]];
            let segment = first.len();
            let mut count = 1;
            let mut bytes = segment;
            if self.gso && segment > 0 {
                while i + count < self.order.len() && count < MAX_SEGMENTS {
                    let (next_to, next) = &self.items[self.order[i + count]];
                    if next_to != to
                        || next.len() > segment
                        || next.is_empty()
                        || bytes + next.len() > MAX_GSO_BYTES
                    {
                        break;
                    }
                    count += 1;
                    bytes += next.len();
                    if next.len() < segment {
                        // A shorter datagram can only end a run.
                        break;
                    }
                }
            }
            self.messages.push(Message {
                first: i,
                count,
                segment,
            });
            i += count;
        }
    }

    /// Sends everything queued on `socket` (non-blocking). Errors for
    /// single datagrams (an ICMP error from a departed client, say) are
    /// logged at debug level and skipped.
    pub fn flush(&mut self, socket: &UdpSocket) {
        self.plan();
        self.send_planned(socket);
    }

    fn send_planned(&mut self, socket: &UdpSocket) {
        let mut start = 0;
        while start < self.messages.len() {
            let end = (start + MAX_BATCH).min(self.messages.len());
            match self.send_some(socket, start, end) {
                Ok(sent) => {
                    for m in &self.messages[start..start + sent] {
                        self.sent.datagrams += m.count as u64;
                        if m.count > 1 {
                            self.sent.gso_messages += 1;
                            self.sent.gso_datagrams += m.count as u64;
                        }
                    }
                    start += sent.max(1);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The socket's send buffer is full. It is shared by
                    // every room, and datagrams to a path that died wait
                    // in a router's neighbour queue holding their share
                    // of it; waiting here would stall the whole room
                    // (its checks unanswered, its media late). UDP drops.
                    let dropped: usize = self.messages[start..].iter().map(|m| m.count).sum();
                    self.sent.dropped_full += dropped as u64;
                    tracing::debug!(dropped, "media socket send buffer full; dropping");
                    break;
                }
                Err(e) if self.messages[start].count > 1 => {
                    // The kernel refused a GSO message: a datagram too
                    // large for the route (EINVAL), or no GSO on this
                    // kernel or device, after which it is not tried again.
                    if gso_unsupported(&e) {
                        tracing::info!(error = %e, "UDP GSO refused; sending datagrams one by one");
                        self.gso = false;
                    } else {
                        tracing::debug!(error = %e, "GSO message refused; sending its datagrams one by one");
                    }
                    let m = self.messages[start];
                    let singles = (m.first..m.first + m.count).map(|first| Message {
                        first,
                        count: 1,
                        segment: self.items[self.order[first]].1.len(),
                    });
                    self.messages.splice(start..start + 1, singles);
                }
                Err(e) => {
                    let to = self.items[self.order[self.messages[start].first]].0;
                    tracing::debug!(error = %e, %to, "media send failed");
                    start += 1;
                }
            }
        }
        self.items.clear();
    }

    #[cfg(target_os = "linux")]
    fn send_some(
        &mut self,
        socket: &UdpSocket,
        start: usize,
        end: usize,
    ) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        // A full send buffer gets a millisecond to drain; one still full
        // after that is the caller's to drop.
        for attempt in 0..2 {
            let SendBatch {
                items,
                order,
                messages,
                sys,
                ..
            } = &mut *self;
            match sys.sendmmsg(fd, items, order, &messages[start..end]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && attempt == 0 => {
                    let mut poll = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut poll, 1, 1) };
                }
                result => return result,
            }
        }
        Err(std::io::ErrorKind::WouldBlock.into())
    }

    #[cfg(not(target_os = "linux"))]
    fn send_some(
        &mut self,
        socket: &UdpSocket,
        start: usize,
        _end: usize,
    ) -> std::io::Result<usize> {
        let m = self.messages[start];
        let (to, contents) = &self.items[self.order[m.first]];
        socket.send_to(contents, to)?;
        Ok(1)
    }
}

/// The media socket's buffers, as large as the system allows up to 4 MiB
/// each (beyond `net.core.wmem_max` / `rmem_max` only with
/// CAP_NET_ADMIN): room for bursts to many clients, and for datagrams
/// that wait in the network on a dead path.
pub fn enlarge_buffers(socket: &UdpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        const SIZE: libc::c_int = 4 << 20;
        let fd = socket.as_raw_fd();
        for (force, plain) in [
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ] {
            let set = |option| {
                // SAFETY: a valid socket and a pointer to a c_int of the given size.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        option,
                        &SIZE as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                }
            };
            if set(force) != 0 {
                set(plain);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Whether a send failed because GSO is not available here (EIO: the
/// device cannot checksum the segments).
fn gso_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT)
    )
}

/// Whether this kernel knows UDP GSO (Linux 4.18 and later); asked once,
/// by setting the option on a socket of our own. Older kernels would not
/// refuse the control message but ignore it, sending each run as one
/// oversized datagram.
fn gso_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(linux::probe_gso)
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::mem::zeroed;
    use std::net::SocketAddr;

    use bytes::BytesMut;
    use socket2::SockAddr;

    use super::Message;

    /// `SOL_UDP` / `UDP_SEGMENT` from linux/udp.h.
    const SOL_UDP: libc::c_int = 17;
    const UDP_SEGMENT: libc::c_int = 103;
    /// Room for one control message carrying a u16, 8-byte aligned.
    type Control = [u64; 4];

    /// The C structures of one `sendmmsg` call, kept between calls.
    #[derive(Default)]
    pub(super) struct Buffers {
        addrs: Vec<SockAddr>,
        iovs: Vec<libc::iovec>,
        controls: Vec<Control>,
        msgs: Vec<libc::mmsghdr>,
    }

    // SAFETY: the raw pointers inside are only meaningful during one
    // `sendmmsg` call, which fills them in first; between calls they are
    // stale and never read.
    unsafe impl Send for Buffers {}

    /// Whether `setsockopt(UDP_SEGMENT)` works on a fresh UDP socket.
    pub(super) fn probe_gso() -> bool {
        let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else {
            return false;
        };
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 1200;
        // SAFETY: a valid socket and a pointer to a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                SOL_UDP,
                UDP_SEGMENT,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }

    impl Buffers {
        /// One `sendmmsg` call for `messages`; returns how many messages the
        /// kernel took.
        pub(super) fn sendmmsg(
            &mut self,
            fd: std::os::fd::RawFd,
            items: &[(SocketAddr, BytesMut)],
            order: &[usize],
            messages: &[Message],
        ) -> std::io::Result<usize> {
            let n = messages.len();
            self.addrs.clear();
            self.iovs.clear();
            self.controls.clear();
            self.msgs.clear();
            // Fill every vector before taking pointers into them.
            for m in messages {
                self.addrs.push(SockAddr::from(items[order[m.first]].0));
                self.controls.push([0; 4]);
                // SAFETY: all-zero is a valid value for this plain C struct.
                self.msgs.push(unsafe { zeroed() });
                for &index in &order[m.first..m.first + m.count] {
                    let contents = &items[index].1;
                    self.iovs.push(libc::iovec {
                        iov_base: contents.as_ptr() as *mut libc::c_void,
                        iov_len: contents.len(),
                    });
                }
            }
            let mut iov = 0;
            for (k, m) in messages.iter().enumerate() {
                let hdr = &mut self.msgs[k].msg_hdr;
                hdr.msg_name = self.addrs[k].as_ptr() as *mut libc::c_void;
                hdr.msg_namelen = self.addrs[k].len();
                hdr.msg_iov = &mut self.iovs[iov];
                hdr.msg_iovlen = m.count as _;
                iov += m.count;
                if m.count > 1 {
                    let control = &mut self.controls[k];
                    hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                    // SAFETY: CMSG_SPACE only computes a size.
                    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
                    // SAFETY: the control buffer is 32 bytes, 8-byte
                    // aligned, more than CMSG_SPACE(2); the header points
                    // at it, so CMSG_FIRSTHDR returns its start.
                    unsafe {
                        let cmsg = libc::CMSG_FIRSTHDR(hdr);
                        (*cmsg).cmsg_level = SOL_UDP;
                        (*cmsg).cmsg_type = UDP_SEGMENT;
                        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(cmsg) as *mut u16,
                            m.segment as u16,
                        );
                    }
                }
            }
            // SAFETY: msgs, addrs, iovs and controls live until the call
            // returns and describe valid buffers; the kernel only reads them.
            let sent = unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr(), n as libc::c_uint, 0) };
            if sent < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(sent as usize)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    /// A media socket as the media thread has it: non-blocking.
    fn sender(addr: &str) -> std::net::UdpSocket {
        let socket = std::net::UdpSocket::bind(addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket
    }

    async fn receive_all(socket: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for _ in 0..n {
            let (len, _) = socket.recv_from(&mut buf).await.unwrap();
            got.push(buf[..len].to_vec());
        }
        got
    }

    async fn a_batch_reaches_every_destination_in_order(batch: SendBatch) {
        let mut batch = batch;
        let sender = sender("127.0.0.1:0");
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..150u8 {
            let to = if i % 2 == 0 {
                a.local_addr().unwrap()
            } else {
                b.local_addr().unwrap()
            };
            batch.push(to, BytesMut::from(&[i; 20][..]));
        }
        batch.flush(&sender);
        assert!(batch.is_empty());
        let got_a = receive_all(&a, 75).await;
        let got_b = receive_all(&b, 75).await;
        for (k, i) in (0..150u8).step_by(2).enumerate() {
            assert_eq!(got_a[k], vec![i; 20]);
            assert_eq!(got_b[k], vec![i + 1; 20]);
        }
    }

    /// IPv6 destinations, in runs and alone.
    #[tokio::test]
    async fn ipv6_runs_arrive_whole() {
        let sender = sender("[::1]:0");
        let to = UdpSocket::bind("[::1]:0").await.unwrap();
        let mut batch = SendBatch::default();
        let sizes = [1200, 1200, 1200, 500, 80];
        for (n, size) in sizes.iter().enumerate() {
            batch.push(
                to.local_addr().unwrap(),
                BytesMut::from(&vec![n as u8; *size][..]),
            );
        }
        batch.flush(&sender);
        assert_eq!(batch.sent.datagrams, 5);
        if cfg!(target_os = "linux") {
            assert_eq!((batch.sent.gso_messages, batch.sent.gso_datagrams), (1, 4));
        }
        let got = receive_all(&to, sizes.len()).await;
        for (n, size) in sizes.iter().enumerate() {
            assert_eq!(got[n], vec![n as u8; *size], "datagram {n}");
        }
    }

    /// A GSO message the kernel refuses (here: more segments than it
    /// takes in one) is sent again one datagram at a time.
    #[tokio::test]
    async fn a_refused_gso_message_goes_out_datagram_by_datagram() {
        let sender = sender("127.0.0.1:0");
        let to = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut batch = SendBatch::default();
        if !batch.gso {
            return;
        }
        for i in 0..150u16 {
            batch.push(
                to.local_addr().unwrap(),
                BytesMut::from(&i.to_be_bytes()[..]),
            );
        }
        batch.plan();
        batch.messages = vec![Message {
            first: 0,
            count: 150,
            segment: 2,
        }];
        batch.send_planned(&sender);
        assert_eq!(batch.messages.len(), 150, "split into single datagrams");
        assert!(batch.gso, "EINVAL is about the message, not the kernel");
        let got = receive_all(&to, 150).await;
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d[..], (i as u16).to_be_bytes()[..]);
        }
    }

    #[tokio::test]
    async fn a_batch_reaches_every_destination_in_order_with_gso() {
        a_batch_reaches_every_destination_in_order(SendBatch::default()).await;
    }

    #[tokio::test]
    async fn a_batch_reaches_every_destination_in_order_without_gso() {
        a_batch_reaches_every_destination_in_order(SendBatch::new(false)).await;
    }

    /// Destinations of both families, interleaved: each becomes one run,
    /// its datagrams in their order, IPv4 ones in address order.
    #[test]
    fn runs_group_each_destination_of_either_family() {
        let to: Vec<SocketAddr> = [
            "127.0.0.1:5002",
            "[::1]:5000",
            "127.0.0.1:5001",
            "[::1]:5001",
            "10.0.0.1:9",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let mut batch = SendBatch::default();
        for n in 0..4u8 {
            for t in &to {
                batch.push(*t, BytesMut::from(&[n; 100][..]));
            }
        }
        batch.plan();
        if !cfg!(target_os = "linux") {
            return;
        }
        assert_eq!(batch.messages.len(), to.len(), "{:?}", batch.messages);
        let mut firsts = Vec::new();
        for m in &batch.messages {
            assert_eq!(m.count, 4);
            let run = &batch.order[m.first..m.first + m.count];
            let dest = batch.items[run[0]].0;
            for (n, &i) in run.iter().enumerate() {
                assert_eq!(batch.items[i].0, dest);
                assert_eq!(batch.items[i].1[0], n as u8, "{dest}: in order");
            }
            firsts.push(dest);
        }
        let v4: Vec<SocketAddr> = firsts.iter().filter(|a| a.is_ipv4()).copied().collect();
        let mut sorted = v4.clone();
        sorted.sort();
        assert_eq!(v4, sorted);
        assert!(firsts[..3].iter().all(SocketAddr::is_ipv4));
    }

    /// Frames of unequal packets to several subscribers, interleaved as
    /// the room queues them: each subscriber gets each datagram whole and
    /// in its order, and runs became GSO messages.
    #[tokio::test]
    async fn runs_of_unequal_datagrams_arrive_whole() {
        let sender = sender("127.0.0.1:0");
        let mut subs = Vec::new();
        for _ in 0..3 {
            subs.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let sizes = [1200, 1200, 1200, 700, 90, 1200, 1300, 1300, 40, 1];
        let mut batch = SendBatch::default();
        for (n, size) in sizes.iter().enumerate() {
            for s in &subs {
                batch.push(
                    s.local_addr().unwrap(),
                    BytesMut::from(&vec![n as u8; *size][..]),
                );
            }
        }
        batch.plan();
        if cfg!(target_os = "linux") {
            // Per subscriber: [1200 x3, 700], [90], [1200], [1300 x2, 40],
            // [1]: five messages where ten datagrams went.
            assert_eq!(batch.messages.len(), 15, "{:?}", batch.messages);
        }
        batch.flush(&sender);
        assert_eq!(batch.sent.datagrams, 30);
        if cfg!(target_os = "linux") {
            assert_eq!(batch.sent.gso_messages, 6);
            assert_eq!(batch.sent.gso_datagrams, 21);
        }
        for s in &subs {
            let got = receive_all(s, sizes.len()).await;
            for (n, size) in sizes.iter().enumerate() {
                assert_eq!(got[n], vec![n as u8; *size], "datagram {n}");
            }
        }
    }
}
