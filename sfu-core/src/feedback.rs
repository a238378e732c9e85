//! What a publisher connection tells its client about reception: receiver
//! reports (RFC 3550 6.4.2), NACKs for lost packets (RFC 4585 6.2.1) and
//! transport-wide congestion control feedback
//! (draft-holmer-rmcat-transport-wide-cc-extensions-01).
//!
//! Fed the header of every inbound RTP packet, by reference, and run on
//! the room's beat. Per packet that is a short scan of the connection's few
//! streams, two bitmap updates and one push; the RTCP is built on the beat,
//! for all of a connection's streams in one compound packet.

use std::time::{Duration, Instant};

use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, StatusVectorChunk,
    SymbolSizeTypeTcc, SymbolTypeTcc, TransportLayerCc,
};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
    nack_pairs_from_sequence_numbers, TransportLayerNack,
};

use crate::seq::SeqExtender;

/// TWCC feedback and NACKs go out at most this often (a floor under the
/// room's beat, shorter than it by more than a late wake).
const FAST_FLOOR: Duration = Duration::from_millis(50);
/// Receiver reports: on the first beat a second after the last.
const REPORT_FLOOR: Duration = Duration::from_millis(950);

/// Sequence numbers a NACK log remembers, per stream.
const NACK_WINDOW: u16 = 512;
/// A lost packet is asked for at most this many times (once a beat).
const MAX_NACKS_PER_PACKET: u8 = 10;
/// Lost packets tracked per stream for NACKing; beyond, the oldest go.
const MAX_NACK_TRACKED: usize = 256;

/// TWCC arrivals held between two feedbacks; a flood beyond is not
/// reported (and so looks lost to its sender).
const MAX_TWCC_PENDING: usize = 8192;
/// Packets reported received in one feedback packet (about 600 bytes).
const MAX_TWCC_PER_FEEDBACK: usize = 400;
/// Most sequence numbers a feedback spans before its first reported packet.
const MAX_TWCC_MISSING: u64 = 0x7FFE;
const TWCC_DELTA_US: i64 = 250;
const TWCC_REFERENCE_US: i64 = 64_000;

/// The reception side of one publisher connection.
pub struct InboundFeedback {
    /// The SSRC the connection's RTCP is sent from.
    sender_ssrc: u32,
    streams: Vec<Stream>,
    /// Header extension id of the transport-wide sequence number.
    twcc_ext: Option<u8>,
    twcc: TwccRecorder,
    /// Set by the first packet; instants are measured from it.
    epoch: Option<Instant>,
    last_fast: Option<Instant>,
    last_report: Option<Instant>,
}

/// What the feedback takes of one inbound RTP packet.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub ssrc: u32,
    pub sequence_number: u16,
    pub timestamp: u32,
    /// The transport-wide sequence number, if the packet carries one.
    pub transport_seq: Option<u16>,
}

/// The transport-wide sequence number in the value of its header
/// extension.
pub fn transport_seq(value: &[u8]) -> Option<u16> {
    (value.len() >= 2).then(|| u16::from_be_bytes([value[0], value[1]]))
}

/// A remote stream, as [`InboundFeedback::bind`] describes it.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub ssrc: u32,
    pub clock_rate: u32,
    /// The stream negotiated generic NACK.
    pub nack: bool,
    /// Header extension id of the transport-wide sequence number, if the
    /// stream negotiated it.
    pub twcc_ext: Option<u8>,
}

struct Stream {
    ssrc: u32,
    clock_rate: u32,
    seq: SeqExtender,
    stats: ReceptionStats,
    nack: Option<NackLog>,
}

impl InboundFeedback {
    pub fn new(sender_ssrc: u32) -> Self {
        Self {
            sender_ssrc,
            streams: Vec::new(),
            twcc_ext: None,
            twcc: TwccRecorder::default(),
            epoch: None,
            last_fast: None,
            last_report: None,
        }
    }

    /// Starts tracking a remote stream (again: a rebind starts afresh).
    pub fn bind(&mut self, spec: StreamSpec) {
        self.unbind(spec.ssrc);
        if let Some(id) = spec.twcc_ext.filter(|&id| id != 0) {
            self.twcc_ext = Some(id);
        }
        self.streams.push(Stream {
            ssrc: spec.ssrc,
            clock_rate: spec.clock_rate.max(1),
            seq: SeqExtender::new(),
            stats: ReceptionStats::default(),
            nack: spec.nack.then(NackLog::default),
        });
    }

    pub fn unbind(&mut self, ssrc: u32) {
        self.streams.retain(|s| s.ssrc != ssrc);
    }

    /// Whether anything has been received, so the beat has work.
    pub fn started(&self) -> bool {
        self.epoch.is_some()
    }

    /// One inbound RTP packet, of a bound stream or not (an unbound one
    /// counts for transport-wide feedback only).
    pub fn record(&mut self, now: Instant, header: &rtc::rtp::Header) {
        let twcc = self.twcc_ext.and_then(|id| {
            header
                .extension
                .then(|| header.extensions.iter().find(|e| e.id == id))
                .flatten()
                .map(|e| &e.payload[..])
        });
        self.record_arrival(
            now,
            Arrival {
                ssrc: header.ssrc,
                sequence_number: header.sequence_number,
                timestamp: header.timestamp,
                transport_seq: twcc.and_then(transport_seq),
            },
        );
    }

    /// The header extension id the transport-wide sequence number comes
    /// in, once a stream negotiated it.
    pub fn twcc_ext(&self) -> Option<u8> {
        self.twcc_ext
    }

    /// One inbound RTP packet, as [`record`](Self::record) takes it, from
    /// its fields.
    pub fn record_arrival(&mut self, now: Instant, arrival: Arrival) {
        let epoch = *self.epoch.get_or_insert(now);
        let since = now.saturating_duration_since(epoch);
        if let Some(seq) = arrival.transport_seq {
            self.twcc.record(seq, since.as_micros() as i64);
        }
        if let Some(s) = self.streams.iter_mut().find(|s| s.ssrc == arrival.ssrc) {
            let seq = s.seq.extend(arrival.sequence_number as u64);
            s.stats.record(seq, arrival.timestamp, since, s.clock_rate);
            if let Some(log) = s.nack.as_mut() {
                log.add(seq);
            }
        }
    }

    /// A sender report from the client: its time goes back in the next
    /// receiver report (LSR/DLSR), for the client's round-trip time.
    pub fn sender_report(&mut self, now: Instant, ssrc: u32, ntp_time: u64) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.ssrc == ssrc) {
            s.stats.last_sr = Some(((ntp_time >> 16) as u32, now));
        }
    }

    /// Runs on the room's beat: whatever is due goes into `out` (receiver
    /// report first, then NACKs, then TWCC feedback), for one compound
    /// packet.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Box<dyn rtc::rtcp::Packet>>) {
        if self.epoch.is_none() {
            return;
        }
        if self
            .last_report
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_FLOOR)
        {
            self.last_report = Some(now);
            let reports: Vec<ReceptionReport> = self
                .streams
                .iter_mut()
                .filter_map(|s| s.stats.report(s.ssrc, now))
                .collect();
            if !reports.is_empty() {
                out.push(Box::new(ReceiverReport {
                    ssrc: self.sender_ssrc,
                    reports,
                    ..Default::default()
                }));
            }
        }
        if self
            .last_fast
            .is_some_and(|t| now.saturating_duration_since(t) < FAST_FLOOR)
        {
            return;
        }
        self.last_fast = Some(now);
        for s in &mut self.streams {
            let Some(log) = s.nack.as_mut() else { continue };
            let missing = log.due();
            if !missing.is_empty() {
                out.push(Box::new(TransportLayerNack {
                    sender_ssrc: self.sender_ssrc,
                    media_ssrc: s.ssrc,
                    nacks: nack_pairs_from_sequence_numbers(&missing),
                }));
            }
        }
        let media_ssrc = self.streams.first().map_or(0, |s| s.ssrc);
        for fb in self.twcc.feedback(self.sender_ssrc, media_ssrc) {
            out.push(Box::new(fb));
        }
    }
}

/// RFC 3550 A.3 and A.8: highest sequence number, loss and jitter, on
/// extended sequence numbers ([`SeqExtender`]).
#[derive(Default)]
struct ReceptionStats {
    /// The first and the highest sequence number received.
    base: Option<u64>,
    highest: u64,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    /// Arrival minus RTP time of the last packet, in clock ticks.
    last_transit: Option<f64>,
    jitter: f64,
    /// Middle 32 bits of the last sender report's NTP time, and when it came.
    last_sr: Option<(u32, Instant)>,
}

impl ReceptionStats {
    fn record(&mut self, seq: u64, timestamp: u32, since: Duration, clock_rate: u32) {
        self.base.get_or_insert(seq);
        self.highest = self.highest.max(seq);
        self.received += 1;
        let arrival = since.as_secs_f64() * clock_rate as f64;
        let transit = arrival - timestamp as f64;
        if let Some(last) = self.last_transit {
            let mut d = (transit - last).abs();
            // A timestamp wrap shows as a jump of 2^32 ticks.
            if d > (1u64 << 31) as f64 {
                d = (d - (1u64 << 32) as f64).abs();
            }
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit);
    }

    fn report(&mut self, ssrc: u32, now: Instant) -> Option<ReceptionReport> {
        let base = self.base?;
        let expected = self.highest.saturating_sub(base) + 1;
        let total_lost = expected.saturating_sub(self.received).min(0x7F_FFFF) as u32;
        let expected_interval = expected.saturating_sub(self.expected_prior);
        let received_interval = self.received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        let fraction_lost = (lost_interval * 256)
            .checked_div(expected_interval)
            .map_or(0, |f| f.min(255) as u8);
        let (last_sender_report, delay) = match self.last_sr {
            Some((lsr, at)) => (
                lsr,
                (now.saturating_duration_since(at).as_secs_f64() * 65536.0) as u32,
            ),
            None => (0, 0),
        };
        Some(ReceptionReport {
            ssrc,
            fraction_lost,
            total_lost,
            // The extender's first cycle is 1; the report's is 0.
            last_sequence_number: self.highest.saturating_sub(1 << 16) as u32,
            jitter: self.jitter as u32,
            last_sender_report,
            delay,
        })
    }
}

/// Which of the last [`NACK_WINDOW`] (extended) sequence numbers arrived,
/// and how often each missing one was asked for.
struct NackLog {
    bits: [u64; NACK_WINDOW as usize / 64],
    /// Highest sequence number received.
    end: Option<u64>,
    /// Lost packets still asked for: (sequence number, times asked).
    missing: Vec<(u64, u8)>,
}

impl Default for NackLog {
    fn default() -> Self {
        Self {
            bits: [0; NACK_WINDOW as usize / 64],
            end: None,
            missing: Vec::new(),
        }
    }
}

impl NackLog {
    fn set(&mut self, seq: u64, on: bool) {
        let pos = (seq % NACK_WINDOW as u64) as usize;
        let mask = 1u64 << (pos % 64);
        if on {
            self.bits[pos / 64] |= mask;
        } else {
            self.bits[pos / 64] &= !mask;
        }
    }

    fn add(&mut self, seq: u64) {
        let Some(end) = self.end else {
            self.end = Some(seq);
            self.set(seq, true);
            return;
        };
        if seq > end {
            // What lies between is missing, as far as the window reaches.
            let first = (end + 1).max(seq.saturating_sub(NACK_WINDOW as u64 - 1));
            for s in first..seq {
                self.set(s, false);
                self.missing.push((s, 0));
            }
            if self.missing.len() > MAX_NACK_TRACKED {
                let excess = self.missing.len() - MAX_NACK_TRACKED;
                self.missing.drain(..excess);
            }
            self.end = Some(seq);
            self.set(seq, true);
        } else if end - seq < NACK_WINDOW as u64 {
            // Late or retransmitted: no longer missing.
            self.set(seq, true);
            if let Some(i) = self.missing.iter().position(|&(s, _)| s == seq) {
                self.missing.remove(i);
            }
        }
    }

    /// The sequence numbers to ask for now; each counts one more ask.
    fn due(&mut self) -> Vec<u16> {
        let end = self.end.unwrap_or(0);
        self.missing
            .retain(|&(s, asked)| asked < MAX_NACKS_PER_PACKET && end - s < NACK_WINDOW as u64);
        self.missing
            .iter_mut()
            .map(|(s, asked)| {
                *asked += 1;
                *s as u16
            })
            .collect()
    }
}

/// Arrival times by transport-wide sequence number, since the last
/// feedback.
#[derive(Default)]
struct TwccRecorder {
    seq: SeqExtender,
    /// (extended sequence number, arrival in µs).
    pending: Vec<(u64, i64)>,
    /// The first sequence number not yet covered by a feedback; a packet
    /// before it comes too late, and was reported lost.
    next: Option<u64>,
    count: u8,
}

impl TwccRecorder {
    fn record(&mut self, seq: u16, arrival_us: i64) {
        let seq = self.seq.extend(seq as u64);
        if self.next.is_some_and(|n| seq < n) || self.pending.len() >= MAX_TWCC_PENDING {
            return;
        }
        self.pending.push((seq, arrival_us));
    }

    fn feedback(&mut self, sender_ssrc: u32, media_ssrc: u32) -> Vec<TransportLayerCc> {
        let mut out = Vec::new();
        if self.pending.is_empty() {
            return out;
        }
        if !self.pending.is_sorted_by_key(|p| p.0) {
            self.pending.sort_by_key(|p| p.0);
        }
        self.pending.dedup_by_key(|p| p.0);
        let pending = std::mem::take(&mut self.pending);
        let mut next = self.next.unwrap_or(pending[0].0);
        let mut i = 0;
        while i < pending.len() {
            let base = next.max(pending[i].0.saturating_sub(MAX_TWCC_MISSING));
            let reference = pending[i].1.div_euclid(TWCC_REFERENCE_US);
            let mut last_us = reference * TWCC_REFERENCE_US;
            let mut symbols = Vec::new();
            let mut deltas = Vec::new();
            let mut cursor = base;
            while let Some(&(seq, arrival)) = pending.get(i) {
                if deltas.len() >= MAX_TWCC_PER_FEEDBACK || seq - base > 0xFFFE {
                    break;
                }
                let units = (arrival - last_us + TWCC_DELTA_US / 2).div_euclid(TWCC_DELTA_US);
                if units < i16::MIN as i64 || units > i16::MAX as i64 {
                    break;
                }
                symbols.extend((cursor..seq).map(|_| SymbolTypeTcc::PacketNotReceived));
                let symbol = if (0..=255).contains(&units) {
                    SymbolTypeTcc::PacketReceivedSmallDelta
                } else {
                    SymbolTypeTcc::PacketReceivedLargeDelta
                };
                symbols.push(symbol);
                deltas.push(RecvDelta {
                    type_tcc_packet: symbol,
                    delta: units * TWCC_DELTA_US,
                });
                last_us += units * TWCC_DELTA_US;
                cursor = seq + 1;
                i += 1;
            }
            next = cursor;
            out.push(TransportLayerCc {
                sender_ssrc,
                media_ssrc,
                base_sequence_number: base as u16,
                packet_status_count: symbols.len() as u16,
                reference_time: (reference as u32) & 0xFF_FFFF,
                fb_pkt_count: self.count,
                packet_chunks: encode_chunks(&symbols),
                recv_deltas: deltas,
            });
            self.count = self.count.wrapping_add(1);
        }
        self.next = Some(next);
        self.pending = pending;
        self.pending.clear();
        out
    }
}

/// Packet status chunks for `symbols`: a run-length chunk for 14 or more
/// equal statuses, else a status vector (14 one-bit symbols, or 7 two-bit
/// ones when a large delta is among them).
fn encode_chunks(symbols: &[SymbolTypeTcc]) -> Vec<PacketStatusChunk> {
    let mut chunks = Vec::new();
    let mut i = 0;
    while i < symbols.len() {
        let rest = &symbols[i..];
        let run = rest
            .iter()
            .take(0x1FFF)
            .take_while(|&&s| s == rest[0])
            .count();
        if run >= 14 {
            chunks.push(PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                packet_status_symbol: rest[0],
                run_length: run as u16,
            }));
            i += run;
            continue;
        }
        let one_bit = &rest[..rest.len().min(14)];
        let (symbol_size, list) = if one_bit
            .iter()
            .all(|&s| s != SymbolTypeTcc::PacketReceivedLargeDelta)
        {
            (SymbolSizeTypeTcc::OneBit, one_bit)
        } else {
            (SymbolSizeTypeTcc::TwoBit, &rest[..rest.len().min(7)])
        };
        chunks.push(PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
            type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
            symbol_size,
            symbol_list: list.to_vec(),
        }));
        i += list.len();
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::packet::unmarshal;
    use rtc::shared::marshal::Marshal;

    /// Marshals feedback and reads it back the way a sender would: the
    /// arrival time (µs from the first reference) of each sequence number
    /// reported received, and the sequence numbers reported lost.
    fn decode(fbs: &[TransportLayerCc]) -> (Vec<(u16, i64)>, Vec<u16>) {
        let (mut received, mut lost) = (Vec::new(), Vec::new());
        for fb in fbs {
            let raw = fb.marshal().unwrap();
            let back = unmarshal(&mut raw.clone()).unwrap();
            let fb = back[0]
                .as_any()
                .downcast_ref::<TransportLayerCc>()
                .expect("a TWCC feedback");
            let mut statuses = Vec::new();
            for chunk in &fb.packet_chunks {
                match chunk {
                    PacketStatusChunk::RunLengthChunk(c) => {
                        statuses.extend((0..c.run_length).map(|_| c.packet_status_symbol))
                    }
                    PacketStatusChunk::StatusVectorChunk(c) => {
                        statuses.extend(c.symbol_list.iter().copied())
                    }
                }
            }
            statuses.truncate(fb.packet_status_count as usize);
            assert_eq!(statuses.len(), fb.packet_status_count as usize);
            let mut t = fb.reference_time as i64 * TWCC_REFERENCE_US;
            let mut deltas = fb.recv_deltas.iter();
            for (k, s) in statuses.iter().enumerate() {
                let seq = fb.base_sequence_number.wrapping_add(k as u16);
                if *s == SymbolTypeTcc::PacketNotReceived {
                    lost.push(seq);
                } else {
                    t += deltas.next().expect("a delta per received packet").delta;
                    received.push((seq, t));
                }
            }
            assert!(deltas.next().is_none(), "no delta left over");
        }
        (received, lost)
    }

    #[test]
    fn twcc_feedback_reports_each_arrival_and_each_gap() {
        let mut r = TwccRecorder::default();
        // Across a wrap of the sequence number, with a loss burst, a
        // reordered pair, a duplicate and a pause longer than a small
        // delta holds (64 ms).
        let mut arrivals = vec![];
        let mut t = 1_000_000;
        for seq in (65_500u16..=65_535).chain(0..40) {
            t += 1_300;
            if (10..15).contains(&seq) {
                continue;
            }
            if seq == 30 {
                t += 90_000;
            }
            arrivals.push((seq, t));
        }
        arrivals.swap(3, 4);
        arrivals.push(arrivals[7]);
        for &(seq, t) in &arrivals {
            r.record(seq, t);
        }
        let fbs = r.feedback(1, 2);
        let (received, lost) = decode(&fbs);
        arrivals.pop();
        arrivals.sort_by_key(|&(seq, _)| seq.wrapping_sub(65_500));
        assert_eq!(received.len(), arrivals.len());
        for ((seq, at), (want_seq, want_at)) in received.iter().zip(&arrivals) {
            assert_eq!(seq, want_seq);
            // Rounded to 250 µs, without drift.
            assert!((at - want_at).abs() <= 125, "{seq}: {at} vs {want_at}");
        }
        assert_eq!(lost, vec![10, 11, 12, 13, 14]);

        // The next feedback starts where this one ended: a gap across the
        // two is reported lost once, and a packet from before it is too late.
        r.record(45, t + 5_000);
        r.record(20, t + 5_100);
        let (received, lost) = decode(&r.feedback(1, 2));
        assert_eq!(received.iter().map(|r| r.0).collect::<Vec<_>>(), vec![45]);
        assert_eq!(lost, vec![40, 41, 42, 43, 44]);
        assert!(r.feedback(1, 2).is_empty(), "nothing new, nothing sent");
    }

    #[test]
    fn twcc_feedback_splits_when_it_grows_large() {
        let mut r = TwccRecorder::default();
        for seq in 0..1_000u16 {
            r.record(seq, seq as i64 * 100);
        }
        let fbs = r.feedback(1, 2);
        assert_eq!(fbs.len(), 3);
        for fb in &fbs {
            assert!(fb.marshal().unwrap().len() <= 1_000);
        }
        let counts: Vec<u8> = fbs.iter().map(|f| f.fb_pkt_count).collect();
        assert_eq!(counts, vec![0, 1, 2]);
        let (received, lost) = decode(&fbs);
        assert_eq!(received.len(), 1_000);
        assert!(lost.is_empty());
    }

    #[test]
    fn run_length_and_vectors_cover_each_symbol_once() {
        use SymbolTypeTcc::*;
        let mut symbols = vec![PacketReceivedSmallDelta; 20];
        symbols.extend([
            PacketNotReceived,
            PacketReceivedLargeDelta,
            PacketReceivedSmallDelta,
        ]);
        symbols.extend(vec![PacketNotReceived; 3]);
        let chunks = encode_chunks(&symbols);
        let mut back = Vec::new();
        for c in &chunks {
            match c {
                PacketStatusChunk::RunLengthChunk(c) => {
                    back.extend((0..c.run_length).map(|_| c.packet_status_symbol))
                }
                PacketStatusChunk::StatusVectorChunk(c) => {
                    assert!(c.symbol_list.len() <= 14);
                    if c.symbol_size == SymbolSizeTypeTcc::OneBit {
                        assert!(!c.symbol_list.contains(&PacketReceivedLargeDelta));
                    } else {
                        assert!(c.symbol_list.len() <= 7);
                    }
                    back.extend(c.symbol_list.iter().copied())
                }
            }
        }
        assert_eq!(back, symbols);
        assert!(matches!(chunks[0], PacketStatusChunk::RunLengthChunk(_)));
    }

    #[test]
    fn nacks_ask_for_each_lost_packet_until_it_comes_or_ten_times() {
        let mut log = NackLog::default();
        // Wire sequence numbers, extended as `InboundFeedback::record` does.
        let mut ext = SeqExtender::new();
        let mut add = |log: &mut NackLog, seq: u16| log.add(ext.extend(seq as u64));
        for seq in (65_530u16..=65_535).chain(0..10) {
            if seq != 65_534 && seq != 3 {
                add(&mut log, seq);
            }
        }
        assert_eq!(log.due(), vec![65_534, 3]);
        add(&mut log, 65_534);
        for _ in 1..MAX_NACKS_PER_PACKET {
            assert_eq!(log.due(), vec![3]);
        }
        assert!(log.due().is_empty(), "given up on after ten asks");
        // A jump past the window asks for no more than the window holds.
        add(&mut log, 2_000);
        assert_eq!(log.due().len(), MAX_NACK_TRACKED);
    }

    fn header(ssrc: u32, seq: u16, ts: u32) -> rtc::rtp::Header {
        rtc::rtp::Header {
            ssrc,
            sequence_number: seq,
            timestamp: ts,
            ..Default::default()
        }
    }

    #[test]
    fn receiver_reports_count_loss_and_echo_the_last_sender_report() {
        let t0 = crate::test_epoch();
        let mut f = InboundFeedback::new(7);
        f.bind(StreamSpec {
            ssrc: 100,
            clock_rate: 90_000,
            nack: true,
            twcc_ext: None,
        });
        // 200 packets from 65_436 (wrapping), 20 lost, one every 10 ms at
        // an exact media clock: no jitter.
        for k in 0..200u32 {
            if k % 10 == 5 {
                continue;
            }
            let seq = 65_436u16.wrapping_add(k as u16);
            f.record(
                t0 + Duration::from_millis(10 * k as u64),
                &header(100, seq, 900 * k),
            );
        }
        f.sender_report(
            t0 + Duration::from_millis(1_500),
            100,
            0x1234_5678_9abc_def0,
        );
        let mut out = Vec::new();
        f.tick(t0 + Duration::from_millis(2_000), &mut out);
        let rr = out[0]
            .as_any()
            .downcast_ref::<ReceiverReport>()
            .expect("the receiver report comes first");
        assert_eq!(rr.ssrc, 7);
        let r = &rr.reports[0];
        assert_eq!(r.ssrc, 100);
        assert_eq!(r.last_sequence_number, 0x1_0000 + 99);
        assert_eq!(r.total_lost, 20);
        assert_eq!(r.fraction_lost, (20 * 256 / 200) as u8);
        assert_eq!(r.jitter, 0);
        assert_eq!(r.last_sender_report, 0x5678_9abc);
        assert_eq!(r.delay, 65536 / 2);
        let nack = out[1]
            .as_any()
            .downcast_ref::<TransportLayerNack>()
            .expect("NACKs next");
        assert_eq!(nack.media_ssrc, 100);
        // Nothing lost since: the next report says so.
        for k in 200..300u32 {
            let seq = 65_436u16.wrapping_add(k as u16);
            f.record(
                t0 + Duration::from_millis(10 * k as u64),
                &header(100, seq, 900 * k),
            );
        }
        out.clear();
        f.tick(t0 + Duration::from_millis(3_000), &mut out);
        let rr = out[0].as_any().downcast_ref::<ReceiverReport>().unwrap();
        assert_eq!(rr.reports[0].fraction_lost, 0);
        assert_eq!(rr.reports[0].total_lost, 20);
        // A tick sooner than a second after the last report has no report.
        out.clear();
        f.tick(t0 + Duration::from_millis(3_100), &mut out);
        assert!(out.iter().all(|p| !p.as_any().is::<ReceiverReport>()));
    }
}
