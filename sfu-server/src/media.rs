//! The one UDP port all media shares.
//!
//! A single task reads the socket and hands each datagram to the room that
//! owns its sender: the first datagram from a client is a STUN binding
//! request whose USERNAME names the server-side ufrag; after that the source
//! address does. Bare binding requests (no USERNAME) are answered with the
//! sender's address, so the port doubles as a STUN server. The routing tables belong to this task alone (rooms send
//! updates over a channel), so the per-packet path takes no lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use sfu_core::demux::{binding_request_ufrag, reflexive_response};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::rooms::RoomCmd;

pub enum RouteUpdate {
    AddUfrag(String, mpsc::Sender<RoomCmd>),
    Remove {
        ufrags: Vec<String>,
        addrs: Vec<SocketAddr>,
    },
}

/// Largest datagram read; anything larger is truncated and then rejected
/// by the connection it reaches.
const MAX_DATAGRAM: usize = 1500;

pub async fn run(
    socket: Arc<UdpSocket>,
    mut updates: mpsc::UnboundedReceiver<RouteUpdate>,
    metrics: Arc<Metrics>,
) {
    let mut by_ufrag: HashMap<String, mpsc::Sender<RoomCmd>> = HashMap::new();
    let mut by_addr: HashMap<SocketAddr, mpsc::Sender<RoomCmd>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            biased;
            update = updates.recv() => match update {
                Some(RouteUpdate::AddUfrag(ufrag, tx)) => { by_ufrag.insert(ufrag, tx); }
                Some(RouteUpdate::Remove { ufrags, addrs }) => {
                    for u in ufrags { by_ufrag.remove(&u); }
                    for a in addrs { by_addr.remove(&a); }
                }
                None => return,
            },
            received = socket.recv_from(&mut buf) => {
                let (n, source) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors from departed clients surface here on some systems.
                        tracing::trace!(error = %e, "media recv");
                        continue;
                    }
                };
                let data = &buf[..n];
                metrics.datagrams_in.fetch_add(1, Ordering::Relaxed);
                let room = match binding_request_ufrag(data) {
                    Some(ufrag) => match by_ufrag.get(ufrag) {
                        Some(tx) => {
                            by_addr.insert(source, tx.clone());
                            Some(tx)
                        }
                        None => None,
                    },
                    None => by_addr.get(&source),
                };
                let Some(room) = room else {
                    // A bare binding request: a client learning its
                    // server-reflexive address, as from any STUN server.
                    if let Some(response) = reflexive_response(data, source) {
                        metrics.stun_binding_answered.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.try_send_to(&response, source);
                        continue;
                    }
                    // Unknown sources are dropped without allocating or logging.
                    metrics.datagrams_unrouted.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let cmd = RoomCmd::Datagram { source, contents: BytesMut::from(data), at: Instant::now() };
                if room.try_send(cmd).is_err() {
                    metrics.datagrams_room_busy.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
