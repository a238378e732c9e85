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
/// sequence number. It is written for every packet every down track
/// forwards, so each entry is packed into 16 bytes: a log is 16 KB, not
/// twice that, and a packet touches a new cache line of it every fourth
/// time.
pub struct SentLog {
    slots: Vec<Slot>,
    /// The source sequence number of the last entry recorded: entries keep
    /// only the low 32 bits of theirs, and get the rest from it.
    last_ext_seq: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    ext_seq_low: u32,
    timestamp: u32,
    seq: u16,
    picture_id: u16,
    tl0_pic_idx: u8,
    layer: Layer,
    flags: u8,
}

const USED: u8 = 1;
const NACKED: u8 = 2;
const HAS_PICTURE_ID: u8 = 4;
const HAS_TL0_PIC_IDX: u8 = 8;
const SWITCHED: u8 = 16;

impl Slot {
    fn holds(&self, seq: u16) -> bool {
        self.flags & USED != 0 && self.seq == seq
    }
}

impl Default for SentLog {
    fn default() -> Self {
        Self::new()
    }
}

impl SentLog {
    pub fn new() -> SentLog {
        SentLog {
            slots: vec![Slot::default(); SENT_LOG],
            last_ext_seq: 0,
        }
    }

    pub fn record(&mut self, entry: SentEntry) {
        let r = entry.rewrite;
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        self.slots[r.seq as usize % SENT_LOG] = Slot {
            ext_seq_low: entry.ext_seq as u32,
            timestamp: r.timestamp,
            seq: r.seq,
            picture_id: r.picture_id.unwrap_or(0),
            tl0_pic_idx: r.tl0_pic_idx.unwrap_or(0),
            layer: entry.layer,
            flags: USED
                | flag(r.picture_id.is_some(), HAS_PICTURE_ID)
                | flag(r.tl0_pic_idx.is_some(), HAS_TL0_PIC_IDX)
                | flag(r.switched, SWITCHED),
        };
        self.last_ext_seq = entry.ext_seq;
    }

    /// What went out as output sequence number `seq`, if still logged.
    pub fn lookup(&self, seq: u16) -> Option<SentEntry> {
        let slot = self.slots[seq as usize % SENT_LOG];
        if !slot.holds(seq) {
            return None;
        }
        // The 64-bit value nearest the last recorded one with these low
        // bits (the layers' sequence numbers all start in the same cycle).
        const CYCLE: u64 = 1 << 32;
        let last = self.last_ext_seq;
        let mut ext_seq = (last & !(CYCLE - 1)) | slot.ext_seq_low as u64;
        if ext_seq > last + CYCLE / 2 && ext_seq >= CYCLE {
            ext_seq -= CYCLE;
        } else if ext_seq + CYCLE / 2 < last {
            ext_seq += CYCLE;
        }
        let has = |f: u8| slot.flags & f != 0;
        Some(SentEntry {
            layer: slot.layer,
            ext_seq,
            rewrite: Rewrite {
                seq,
                timestamp: slot.timestamp,
                picture_id: has(HAS_PICTURE_ID).then_some(slot.picture_id),
                tl0_pic_idx: has(HAS_TL0_PIC_IDX).then_some(slot.tl0_pic_idx),
                switched: has(SWITCHED),
            },
        })
    }

    /// Notes a NACK for `seq`; true the first time that packet is NACKed
    /// (receivers repeat NACKs until the packet arrives; loss counts once).
    pub fn first_nack(&mut self, seq: u16) -> bool {
        let slot = &mut self.slots[seq as usize % SENT_LOG];
        if !slot.holds(seq) || slot.flags & NACKED != 0 {
            return false;
        }
        slot.flags |= NACKED;
        true
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
        assert_eq!(log.lookup(0).unwrap(), entry(0, 11), "every field back");
        assert_eq!(log.lookup(1), None);
        log.record(entry(1024, 12)); // same slot as 0
        assert_eq!(log.lookup(0), None);
        assert_eq!(log.lookup(1024).unwrap().ext_seq, 12);
        // Repeated NACKs for one packet count once; unknown ones not at all.
        assert!(log.first_nack(1024));
        assert!(!log.first_nack(1024));
        assert!(!log.first_nack(5));
        // A re-recorded slot is NACKable again.
        log.record(entry(1024, 13));
        assert!(log.first_nack(1024));
    }

    #[test]
    fn sent_log_keeps_every_field_and_sequence_numbers_past_32_bits() {
        let mut log = SentLog::new();
        let rewrite = Rewrite {
            seq: 7,
            timestamp: 0xFFFF_FFF0,
            picture_id: Some(0x7FFF),
            tl0_pic_idx: Some(0),
            switched: true,
        };
        let near_cycle = (5u64 << 32) - 3;
        let sent = SentEntry {
            layer: 2,
            ext_seq: near_cycle,
            rewrite,
        };
        log.record(sent);
        let plain = |seq: u16, ext_seq: u64| SentEntry {
            layer: 0,
            ext_seq,
            rewrite: Rewrite {
                seq,
                timestamp: 1,
                picture_id: None,
                tl0_pic_idx: None,
                switched: false,
            },
        };
        // Later packets cross into the next 2^32 cycle.
        log.record(plain(8, near_cycle + 10));
        assert_eq!(log.lookup(7), Some(sent));
        assert_eq!(log.lookup(8), Some(plain(8, near_cycle + 10)));
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }
}
