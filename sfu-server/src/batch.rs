//! Sending many datagrams with one system call.
//!
//! One publisher packet becomes a datagram per subscriber; sending them one
//! `sendto` at a time costs a system call each. On Linux the room worker
//! hands the whole batch to `sendmmsg`; elsewhere it falls back to one
//! `send_to` per datagram.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::net::UdpSocket;

/// Datagrams waiting to go out of the media socket.
#[derive(Default)]
pub struct SendBatch {
    items: Vec<(SocketAddr, BytesMut)>,
}

/// At most this many datagrams per system call.
const MAX_BATCH: usize = 64;

impl SendBatch {
    pub fn push(&mut self, to: SocketAddr, contents: BytesMut) {
        self.items.push((to, contents));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends everything queued. Errors for single datagrams (an ICMP error
    /// from a departed client, say) are logged at debug level and skipped.
    pub async fn flush(&mut self, socket: &UdpSocket) {
        let mut start = 0;
        while start < self.items.len() {
            let end = (start + MAX_BATCH).min(self.items.len());
            match send_some(socket, &self.items[start..end]).await {
                Ok(sent) => start += sent.max(1),
                Err(e) => {
                    tracing::debug!(error = %e, to = %self.items[start].0, "media send failed");
                    start += 1;
                }
            }
        }
        self.items.clear();
    }
}

#[cfg(target_os = "linux")]
async fn send_some(socket: &UdpSocket, items: &[(SocketAddr, BytesMut)]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        socket.writable().await?;
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            sendmmsg(socket.as_raw_fd(), items)
        }) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn send_some(socket: &UdpSocket, items: &[(SocketAddr, BytesMut)]) -> std::io::Result<usize> {
    let (to, contents) = &items[0];
    socket.send_to(contents, to).await?;
    Ok(1)
}

/// One `sendmmsg` call; returns how many datagrams the kernel took.
#[cfg(target_os = "linux")]
fn sendmmsg(fd: std::os::fd::RawFd, items: &[(SocketAddr, BytesMut)]) -> std::io::Result<usize> {
    use std::mem::zeroed;

    let n = items.len();
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut addrs: Vec<libc::sockaddr_storage> = (0..n).map(|_| unsafe { zeroed() }).collect();
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(n);
    let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { zeroed() }).collect();
    for (i, (to, contents)) in items.iter().enumerate() {
        let len = match to {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
                unsafe { std::ptr::write(&mut addrs[i] as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: as above.
                unsafe {
                    std::ptr::write(&mut addrs[i] as *mut _ as *mut libc::sockaddr_in6, sin6)
                };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        iovs.push(libc::iovec {
            iov_base: contents.as_ptr() as *mut libc::c_void,
            iov_len: contents.len(),
        });
        msgs[i].msg_hdr.msg_namelen = len as libc::socklen_t;
    }
    for i in 0..n {
        msgs[i].msg_hdr.msg_name = &mut addrs[i] as *mut _ as *mut libc::c_void;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: msgs, addrs and iovs live until the call returns and describe
    // valid buffers; the kernel only reads them.
    let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_reaches_every_destination_in_order() {
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut batch = SendBatch::default();
        for i in 0..150u8 {
            let to = if i % 2 == 0 {
                a.local_addr().unwrap()
            } else {
                b.local_addr().unwrap()
            };
            batch.push(to, BytesMut::from(&[i; 20][..]));
        }
        batch.flush(&sender).await;
        assert!(batch.is_empty());
        let mut buf = [0u8; 64];
        for i in (0..150u8).step_by(2) {
            let (n, _) = a.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[i; 20]);
            let (n, _) = b.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[i + 1; 20]);
        }
    }
}
