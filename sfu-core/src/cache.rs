//! Retransmission: published packets are cached once per published layer;
//! each down track keeps only a small log of which input packet went out
//! under which output sequence number. A subscriber's NACK is answered by
//! looking the output sequence number up in the log and the packet up in
//! the layer's cache.

use std::time::{Duration, Instant};

use crate::forwarder::{Layer, Rewrite};

/// Packets kept per published layer (a power of two).
pub const CACHE_PACKETS: usize = 1024;
/// Packets older than this (by arrival) are not retransmitted: the
/// receiver's jitter buffer has given up on them.
pub const CACHE_MAX_AGE: Duration = Duration::from_millis(1500);
/// At most this many slots are looked at for expiry per insert (more than
/// one, so the cache keeps up after a burst or across lost packets).
const EXPIRE_PER_INSERT: usize = 4;
/// Output packets remembered per down track (a power of two).
pub const SENT_LOG: usize = 1024;

struct Cached {
    ext_seq: u64,
    at: Instant,
    packet: rtc::rtp::Packet,
}

/// A ring of the most recent packets of one published layer, by extended
/// sequence number. Storing is a reference-count increment of the payload.
pub struct PacketCache {
    slots: Vec<Option<Cached>>,
    /// No packet before this one is held.
    oldest: Option<u64>,
}

impl Default for PacketCache {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketCache {
    pub fn new() -> PacketCache {
        PacketCache {
            slots: (0..CACHE_PACKETS).map(|_| None).collect(),
            oldest: None,
        }
    }

    pub fn insert(&mut self, ext_seq: u64, at: Instant, packet: &rtc::rtp::Packet) {
        let slot = &mut self.slots[ext_seq as usize % CACHE_PACKETS];
        // A retransmission of an older packet must not evict a newer one.
        if slot.as_ref().is_some_and(|c| c.ext_seq > ext_seq) {
            return;
        }
        *slot = Some(Cached {
            ext_seq,
            at,
            packet: packet.clone(),
        });
        self.expire(ext_seq, at);
    }

    /// Lets go of packets too old to be sent again, oldest first, a few
    /// per insert: a slow stream (audio, a low layer) does not hold a
    /// thousand payloads, and the buffers they share with other packets,
    /// for half a minute.
    fn expire(&mut self, newest: u64, now: Instant) {
        let oldest = self.oldest.get_or_insert(newest);
        *oldest = (*oldest)
            .min(newest)
            .max((newest + 1).saturating_sub(CACHE_PACKETS as u64));
        for _ in 0..EXPIRE_PER_INSERT {
            if *oldest >= newest {
                break;
            }
            let slot = &mut self.slots[*oldest as usize % CACHE_PACKETS];
            if let Some(c) = slot.as_ref().filter(|c| c.ext_seq == *oldest) {
                if now.saturating_duration_since(c.at) <= CACHE_MAX_AGE {
                    break;
                }
                *slot = None;
            }
            *oldest += 1;
        }
    }

    /// The packet with this extended sequence number, if still held and
    /// young enough at `now`.
    pub fn get(&self, ext_seq: u64, now: Instant) -> Option<&rtc::rtp::Packet> {
        let c = self.slots[ext_seq as usize % CACHE_PACKETS].as_ref()?;
        (c.ext_seq == ext_seq && now.saturating_duration_since(c.at) <= CACHE_MAX_AGE)
            .then_some(&c.packet)
    }
}

/// What one forwarded packet was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentEntry {
    pub layer: Layer,
    pub ext_seq: u64,
    pub rewrite: Rewrite,
}

/// A ring of the most recent packets a down track sent, by output
/// sequence number.
pub struct SentLog {
    slots: Vec<Option<SentEntry>>,
    nacked: Vec<bool>,
}

impl Default for SentLog {
    fn default() -> Self {
        Self::new()
    }
}

impl SentLog {
    pub fn new() -> SentLog {
        SentLog {
            slots: vec![None; SENT_LOG],
            nacked: vec![false; SENT_LOG],
        }
    }

    pub fn record(&mut self, entry: SentEntry) {
        let i = entry.rewrite.seq as usize % SENT_LOG;
        self.slots[i] = Some(entry);
        self.nacked[i] = false;
    }

    /// What went out as output sequence number `seq`, if still logged.
    pub fn lookup(&self, seq: u16) -> Option<SentEntry> {
        self.slots[seq as usize % SENT_LOG].filter(|e| e.rewrite.seq == seq)
    }

    /// Notes a NACK for `seq`; true the first time that packet is NACKed
    /// (receivers repeat NACKs until the packet arrives; loss counts once).
    pub fn first_nack(&mut self, seq: u16) -> bool {
        let i = seq as usize % SENT_LOG;
        match (&self.slots[i], self.nacked[i]) {
            (Some(e), false) if e.rewrite.seq == seq => {
                self.nacked[i] = true;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn packet(seq: u16) -> rtc::rtp::Packet {
        rtc::rtp::Packet {
            header: rtc::rtp::Header {
                sequence_number: seq,
                ..Default::default()
            },
            payload: Bytes::from(vec![seq as u8; 10]),
        }
    }

    use crate::test_epoch as t0;

    #[test]
    fn cache_holds_recent_packets_and_forgets_old_ones() {
        let mut c = PacketCache::new();
        let now = t0();
        for s in 0..2000u64 {
            c.insert(65_536 + s, now, &packet(s as u16));
        }
        assert_eq!(
            c.get(65_536 + 1999, now).unwrap().header.sequence_number,
            1999
        );
        assert_eq!(
            c.get(65_536 + 1999 - 1023, now)
                .unwrap()
                .header
                .sequence_number,
            976
        );
        assert!(
            c.get(65_536 + 1999 - 1024, now).is_none(),
            "evicted by count"
        );
        assert!(c.get(65_536 + 5000, now).is_none(), "never seen");
        let later = now + CACHE_MAX_AGE + Duration::from_millis(1);
        assert!(c.get(65_536 + 1999, later).is_none(), "too old by age");
        // A late duplicate of an evicted packet does not displace the newer one.
        c.insert(65_536 + 1999 - 1024, now, &packet(0));
        assert_eq!(
            c.get(65_536 + 1999, now).unwrap().header.sequence_number,
            1999
        );
    }

    /// A slow stream's cache lets go of payloads once they are too old to
    /// be sent again, not only when a thousand newer ones push them out.
    #[test]
    fn expired_payloads_are_let_go() {
        let mut c = PacketCache::new();
        let now = t0();
        let first = packet(0);
        c.insert(65_536, now, &first);
        assert!(!first.payload.is_unique(), "held by the cache");
        // Audio-like: 50 packets a second for three seconds.
        for s in 1..150u64 {
            c.insert(
                65_536 + s,
                now + Duration::from_millis(20 * s),
                &packet(s as u16),
            );
        }
        assert!(first.payload.is_unique(), "let go once expired");
        let newest = now + Duration::from_millis(20 * 149);
        assert!(c.get(65_536 + 149, newest).is_some());
        assert!(c.get(65_536 + 149 - 70, newest).is_some(), "1.4 s old");
        let held = c.slots.iter().filter(|s| s.is_some()).count();
        assert!((75..=80).contains(&held), "{held} held, about 1.5 s worth");
    }

    #[test]
    fn sent_log_maps_output_sequence_numbers_across_wrap() {
        let mut log = SentLog::new();
        let entry = |seq: u16, ext: u64| SentEntry {
            layer: 1,
            ext_seq: ext,
            rewrite: Rewrite {
                seq,
                timestamp: 0,
                picture_id: None,
                tl0_pic_idx: None,
                switched: false,
            },
        };
        log.record(entry(65_535, 10));
        log.record(entry(0, 11));
        assert_eq!(log.lookup(65_535).unwrap().ext_seq, 10);
        assert_eq!(log.lookup(0).unwrap().ext_seq, 11);
        assert_eq!(log.lookup(1), None);
        log.record(entry(1024, 12)); // same slot as 0
        assert_eq!(log.lookup(0), None);
        assert_eq!(log.lookup(1024).unwrap().ext_seq, 12);
        // Repeated NACKs for one packet count once; unknown ones not at all.
        assert!(log.first_nack(1024));
        assert!(!log.first_nack(1024));
        assert!(!log.first_nack(5));
    }
}
