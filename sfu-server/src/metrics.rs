//! Server-wide counters, exposed in Prometheus text format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use sfu_core::DropReason;

#[derive(Default)]
pub struct Metrics {
    pub rooms: AtomicUsize,
    pub participants: AtomicUsize,
    pub peer_connections: AtomicUsize,
    pub datagrams_in: AtomicUsize,
    pub datagrams_unrouted: AtomicUsize,
    /// Client addresses no longer routed: checks came from too many.
    pub addresses_unrouted: AtomicUsize,
    pub rtp_in: AtomicUsize,
    pub rtp_forwarded: AtomicUsize,
    pub bytes_forwarded: AtomicUsize,
    /// Forwarded packets the rooms encrypted themselves.
    pub rtp_encrypted_by_room: AtomicUsize,
    /// Inbound RTP the rooms decrypted themselves.
    pub rtp_received_by_room: AtomicUsize,
    /// Clients' RTCP the rooms decrypted themselves.
    pub rtcp_received_by_room: AtomicUsize,
    pub datagrams_sent: AtomicUsize,
    pub gso_messages: AtomicUsize,
    pub gso_datagrams: AtomicUsize,
    pub datagrams_send_buffer_full: AtomicUsize,
    /// Packets the rooms did not forward, indexed like `DropReason::ALL`.
    pub drops: [AtomicUsize; DropReason::ALL.len()],
    /// REST requests and signalling connects refused with 429.
    pub requests_rate_limited: AtomicUsize,
    /// Signalling messages ignored over a session's rate.
    pub signals_rate_limited: AtomicUsize,
    /// Times closed rooms' memory was handed back to the system.
    pub memory_releases: AtomicUsize,
    /// Bare STUN binding requests the media port answered.
    pub stun_binding_answered: AtomicUsize,
    /// The embedded TURN server's counters.
    pub turn: crate::turn_server::TurnMetrics,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let rows: [(&str, &str, &str, &AtomicUsize); 20] = [
            ("sfu_rooms", "gauge", "Rooms open", &self.rooms),
            (
                "sfu_participants",
                "gauge",
                "Participants connected",
                &self.participants,
            ),
            (
                "sfu_peer_connections",
                "gauge",
                "Peer connections open",
                &self.peer_connections,
            ),
            (
                "sfu_datagrams_received_total",
                "counter",
                "Datagrams read from the media port",
                &self.datagrams_in,
            ),
            (
                "sfu_datagrams_unrouted_total",
                "counter",
                "Datagrams from unknown sources, dropped",
                &self.datagrams_unrouted,
            ),
            (
                "sfu_addresses_unrouted_total",
                "counter",
                "Client addresses no longer routed because checks for one connection came from too many",
                &self.addresses_unrouted,
            ),
            (
                "sfu_rtp_packets_received_total",
                "counter",
                "RTP packets received from publishers",
                &self.rtp_in,
            ),
            (
                "sfu_rtp_packets_forwarded_total",
                "counter",
                "RTP packets forwarded to subscribers",
                &self.rtp_forwarded,
            ),
            (
                "sfu_rtp_packets_encrypted_by_room_total",
                "counter",
                "Forwarded RTP packets the room encrypted itself (the rest went through the engine's send path)",
                &self.rtp_encrypted_by_room,
            ),
            (
                "sfu_rtp_packets_received_by_room_total",
                "counter",
                "Inbound RTP packets the room decrypted itself (the rest went through the engine's read path)",
                &self.rtp_received_by_room,
            ),
            (
                "sfu_rtcp_packets_received_by_room_total",
                "counter",
                "Clients' RTCP packets (compound) the room decrypted itself (the rest went through the engine's read path)",
                &self.rtcp_received_by_room,
            ),
            (
                "sfu_datagrams_sent_total",
                "counter",
                "Datagrams sent from the media port by rooms",
                &self.datagrams_sent,
            ),
            (
                "sfu_datagrams_send_buffer_full_total",
                "counter",
                "Datagrams dropped because the media socket's send buffer was full",
                &self.datagrams_send_buffer_full,
            ),
            (
                "sfu_udp_gso_messages_total",
                "counter",
                "UDP GSO messages sent, each carrying several datagrams to one client",
                &self.gso_messages,
            ),
            (
                "sfu_udp_gso_datagrams_total",
                "counter",
                "Datagrams sent inside UDP GSO messages",
                &self.gso_datagrams,
            ),
            (
                "sfu_rtp_payload_bytes_forwarded_total",
                "counter",
                "RTP payload bytes forwarded",
                &self.bytes_forwarded,
            ),
            (
                "sfu_http_requests_rate_limited_total",
                "counter",
                "REST requests and signalling connects refused with 429",
                &self.requests_rate_limited,
            ),
            (
                "sfu_signal_messages_rate_limited_total",
                "counter",
                "Signalling messages ignored over a session's rate",
                &self.signals_rate_limited,
            ),
            (
                "sfu_stun_binding_answered_total",
                "counter",
                "Bare STUN binding requests the media port answered (server-reflexive discovery)",
                &self.stun_binding_answered,
            ),
            (
                "sfu_memory_releases_total",
                "counter",
                "Times a closed room's memory was handed back to the system",
                &self.memory_releases,
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        if let Some(rss) = resident_memory_bytes() {
            let _ = writeln!(
                out,
                "# HELP process_resident_memory_bytes Resident memory of the server process\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
            );
        }
        let t = &self.turn;
        let turn_rows: [(&str, &str, &str, &AtomicUsize); 9] = [
            ("sfu_turn_requests_total", "counter", "TURN messages from clients", &t.requests),
            ("sfu_turn_allocations", "gauge", "TURN allocations open", &t.allocations),
            ("sfu_turn_allocations_total", "counter", "TURN allocations made", &t.allocations_total),
            ("sfu_turn_allocations_refused_total", "counter", "TURN allocations refused (quota, family, no port)", &t.allocations_refused),
            ("sfu_turn_relayed_bytes_total", "counter", "Bytes relayed between clients and peers", &t.relayed_bytes),
            ("sfu_turn_relay_denied_total", "counter", "Relayed packets refused: the peer address is private, loopback or otherwise not allowed", &t.relay_denied),
            ("sfu_turn_over_bitrate_total", "counter", "Relayed packets dropped over an allocation's bitrate", &t.over_bitrate),
            ("sfu_turn_expired_credentials_total", "counter", "TURN requests dropped for an expired username", &t.expired_credentials),
            ("sfu_turn_unauthorized_total", "counter", "TURN 401 answers (the first challenge, and refused credentials)", &t.unauthorized),
        ];
        for (name, kind, help, value) in turn_rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP sfu_rtp_packets_dropped_total Packets not forwarded, by reason\n# TYPE sfu_rtp_packets_dropped_total counter\n");
        for (reason, value) in DropReason::ALL.iter().zip(&self.drops) {
            let _ = writeln!(
                out,
                "sfu_rtp_packets_dropped_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The process's resident memory, from `/proc/self/statm` (Linux only).
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| pages * page as u64)
}

/// Hands memory that closed rooms freed back to the operating system.
/// glibc's malloc keeps freed memory in its arenas (one per thread that
/// allocated), so without this a server whose rooms have all closed stays
/// at its peak resident size although nothing is in use. A no-op elsewhere.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
