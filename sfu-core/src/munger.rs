//! Rewriting a forwarded stream so the subscriber sees one continuous
//! stream: sequence numbers without holes where the forwarder dropped
//! packets, timestamps that move forward across layer switches, and VP8
//! picture ids and TL0PICIDX that continue from the previous layer.
//!
//! The munger works on extended (64-bit) input sequence numbers, so wrap
//! is handled once, by the caller's extender.

use std::collections::VecDeque;

use crate::seq::Extender;
use std::time::{Duration, Instant};

/// Input packets this far behind the newest are too late to place.
const REORDER_WINDOW: u64 = 1000;

/// What the munger needs to know of an input packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MungeInput {
    pub ext_seq: u64,
    pub timestamp: u32,
    /// When the packet's frame was captured, in the publisher's NTP clock
    /// (64-bit NTP format), from its layer's sender report.
    pub capture_ntp: Option<u64>,
    /// VP8 picture id (15-bit space) and TL0PICIDX, when present.
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
}

/// The output values for one forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MungeOutput {
    pub seq: u16,
    pub timestamp: u32,
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
}

/// Why the munger refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MungeRefusal {
    /// Older than the switch to the current layer, or than the reorder window.
    TooOld,
    /// Marked dropped before; it must not now take a place.
    AlreadyDropped,
    /// No layer has been switched to yet.
    NotStarted,
}

const PICTURE_ID_BITS: u32 = 15;

/// Maps an extended input counter (sequence numbers, picture ids) of the
/// current source to a continuous output counter: output continues where
/// the previous source left off, and inputs the forwarder dropped leave no
/// gap.
#[derive(Debug, Clone, Default)]
struct Renumber {
    started: bool,
    /// Inputs below this belong to a previous source or are too late.
    base_in: u64,
    highest_in: u64,
    offset: u64,
    /// Dropped inputs at or above `base_in`, ascending.
    dropped: VecDeque<u64>,
    highest_out: u64,
}

impl Renumber {
    /// Maps `first` (the new source's first input) to one past the last
    /// output, or to itself if nothing was output yet.
    fn start(&mut self, first: u64) {
        let out = if self.started {
            self.highest_out + 1
        } else {
            first
        };
        self.offset = first.wrapping_sub(out);
        self.base_in = first;
        self.highest_in = first;
        self.dropped.clear();
        self.started = true;
    }

    fn drop_input(&mut self, input: u64) {
        if !self.started || input < self.base_in {
            return;
        }
        if let Err(at) = self.dropped.binary_search(&input) {
            self.dropped.insert(at, input);
        }
        self.note_highest(input);
    }

    fn note_highest(&mut self, input: u64) {
        if input > self.highest_in {
            self.highest_in = input;
        }
        // Drops that no reordered input can precede any more are folded
        // into the offset.
        let floor = self.highest_in.saturating_sub(REORDER_WINDOW);
        while self.dropped.front().is_some_and(|d| *d < floor) {
            self.dropped.pop_front();
            self.offset = self.offset.wrapping_add(1);
        }
        self.base_in = self.base_in.max(floor);
    }

    fn is_dropped(&self, input: u64) -> bool {
        self.dropped.binary_search(&input).is_ok()
    }

    /// The output for an input of the current source.
    fn map(&mut self, input: u64) -> Result<u64, MungeRefusal> {
        if !self.started {
            return Err(MungeRefusal::NotStarted);
        }
        if input < self.base_in {
            return Err(MungeRefusal::TooOld);
        }
        if self.is_dropped(input) {
            return Err(MungeRefusal::AlreadyDropped);
        }
        self.note_highest(input);
        let before = self.dropped.partition_point(|d| *d < input) as u64;
        // The offset may be "negative" (a new source numbered below the
        // output): wrapping arithmetic keeps the difference exact.
        let out = input.wrapping_sub(self.offset).wrapping_sub(before);
        if out > self.highest_out {
            self.highest_out = out;
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Munger {
    seq: Renumber,
    /// Picture ids, extended from 15 bits per source.
    pid: Renumber,
    pid_in: Extender<PICTURE_ID_BITS>,
    ts_offset: u32,
    last_out_ts: u32,
    highest_out_seq: u64,
    last_out_at: Option<Instant>,
    last_out_ntp: Option<u64>,
    tl0_offset: u8,
    last_out_tl0: u8,
}

impl Munger {
    pub fn new() -> Munger {
        Munger::default()
    }

    pub fn is_started(&self) -> bool {
        self.seq.started
    }

    /// Starts mapping a new source (the first layer, or a switch to another)
    /// at `first`, which must be that source's next packet to forward. The
    /// output continues one past the last packet sent; the timestamp moves
    /// forward by the time elapsed since then.
    pub fn switch(&mut self, first: &MungeInput, now: Instant, clock_rate: u32) {
        let started = self.seq.started;
        self.seq.start(first.ext_seq);
        let out_ts = match (started, self.last_out_at) {
            // Both sources' sender reports place the frames on one clock:
            // the new frame goes exactly as far after the last one as it
            // was captured.
            (true, _)
                if first
                    .capture_ntp
                    .zip(self.last_out_ntp)
                    .is_some_and(|(new, last)| new > last) =>
            {
                let gap = first.capture_ntp.unwrap_or(0) - self.last_out_ntp.unwrap_or(0);
                let ticks = ((gap as u128 * clock_rate as u128 + (1 << 31)) >> 32).max(1);
                self.last_out_ts.wrapping_add(ticks as u32)
            }
            (true, Some(at)) => {
                let elapsed = now
                    .saturating_duration_since(at)
                    .max(Duration::from_millis(1));
                let ticks = (elapsed.as_micros() * clock_rate as u128 / 1_000_000).max(1);
                self.last_out_ts.wrapping_add(ticks as u32)
            }
            _ => first.timestamp,
        };
        self.ts_offset = first.timestamp.wrapping_sub(out_ts);
        if let Some(pid) = first.picture_id {
            self.pid_in = Extender::new();
            let ext = self.pid_in.extend(pid as u64);
            self.pid.start(ext);
        }
        if let Some(tl0) = first.tl0_pic_idx {
            let out = if started {
                self.last_out_tl0.wrapping_add(1)
            } else {
                tl0
            };
            self.tl0_offset = tl0.wrapping_sub(out);
        }
    }

    /// The output timestamp an input timestamp of the current source maps to.
    pub fn output_timestamp(&self, input: u32) -> u32 {
        input.wrapping_sub(self.ts_offset)
    }

    /// Records that the forwarder dropped this input packet of the current
    /// source: later packets close the gap it leaves.
    pub fn drop_packet(&mut self, ext_seq: u64) {
        self.seq.drop_input(ext_seq);
    }

    /// Records that the forwarder dropped a whole picture (a frame of a
    /// temporal layer not forwarded): later picture ids close the gap.
    pub fn drop_picture(&mut self, picture_id: u16) {
        if self.pid.started {
            let ext = self.pid_in.extend(picture_id as u64);
            self.pid.drop_input(ext);
        }
    }

    /// Output values for a packet of the current source.
    pub fn rewrite(
        &mut self,
        input: &MungeInput,
        now: Instant,
    ) -> Result<MungeOutput, MungeRefusal> {
        let out_seq = self.seq.map(input.ext_seq)?;
        let out_ts = input.timestamp.wrapping_sub(self.ts_offset);
        let newest = out_seq > self.highest_out_seq || self.last_out_at.is_none();
        if newest {
            self.highest_out_seq = out_seq;
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
            self.last_out_ntp = input.capture_ntp;
        }
        let picture_id = match input.picture_id {
            Some(pid) if self.pid.started => {
                let ext = self.pid_in.extend(pid as u64);
                Some((self.pid.map(ext)? & ((1 << PICTURE_ID_BITS) - 1)) as u16)
            }
            _ => input.picture_id,
        };
        let tl0_pic_idx = input.tl0_pic_idx.map(|tl0| {
            let out = tl0.wrapping_sub(self.tl0_offset);
            if newest {
                self.last_out_tl0 = out;
            }
            out
        });
        Ok(MungeOutput {
            seq: out_seq as u16,
            timestamp: out_ts,
            picture_id,
            tl0_pic_idx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(ext_seq: u64, timestamp: u32, pid: u16, tl0: u8) -> MungeInput {
        MungeInput {
            ext_seq,
            timestamp,
            capture_ntp: None,
            picture_id: Some(pid),
            tl0_pic_idx: Some(tl0),
        }
    }

    use crate::test_epoch as t0;

    /// One row: an action on the munger and what it must answer.
    enum Row {
        /// Switch to a source starting at this packet (seq, ts).
        Switch(u64, u32),
        /// Forward (input seq) expecting (output seq), or a refusal.
        Fwd(u64, Result<u16, MungeRefusal>),
        /// The forwarder dropped this input.
        Drop(u64),
    }
    use Row::*;

    fn run(rows: &[Row]) -> Munger {
        let mut m = Munger::new();
        let now = t0();
        for (i, row) in rows.iter().enumerate() {
            match *row {
                Switch(seq, ts) => m.switch(&input(seq, ts, 0, 0), now, 90_000),
                Fwd(seq, ref want) => {
                    let got = m.rewrite(&input(seq, 0, 0, 0), now).map(|o| o.seq);
                    assert_eq!(&got, want, "row {i}");
                }
                Drop(seq) => m.drop_packet(seq),
            }
        }
        m
    }

    const W: u64 = 65_536; // extended values start in cycle 1

    #[test]
    fn sequence_table() {
        // In sequence: unchanged.
        run(&[
            Switch(W + 10, 0),
            Fwd(W + 10, Ok(10)),
            Fwd(W + 11, Ok(11)),
            Fwd(W + 12, Ok(12)),
        ]);
        // Loss is passed on as loss (a hole the receiver will NACK).
        run(&[Switch(W + 10, 0), Fwd(W + 10, Ok(10)), Fwd(W + 13, Ok(13))]);
        // Reorder and duplicates map to the same output.
        run(&[
            Switch(W + 10, 0),
            Fwd(W + 10, Ok(10)),
            Fwd(W + 12, Ok(12)),
            Fwd(W + 11, Ok(11)),
            Fwd(W + 12, Ok(12)),
        ]);
        // Dropped packets leave no hole.
        run(&[
            Switch(W + 10, 0),
            Fwd(W + 10, Ok(10)),
            Drop(W + 11),
            Fwd(W + 12, Ok(11)),
            Drop(W + 13),
            Drop(W + 14),
            Fwd(W + 15, Ok(12)),
        ]);
        // A packet reordered before a drop keeps its place; the dropped one
        // is refused if it shows up (as a retransmission) later.
        run(&[
            Switch(W + 10, 0),
            Fwd(W + 10, Ok(10)),
            Drop(W + 12),
            Fwd(W + 11, Ok(11)),
            Fwd(W + 13, Ok(12)),
            Fwd(W + 12, Err(MungeRefusal::AlreadyDropped)),
        ]);
        // Wrap of the output: 65535 -> 0.
        run(&[
            Switch(W + 65_534, 0),
            Fwd(W + 65_534, Ok(65_534)),
            Fwd(W + 65_535, Ok(65_535)),
            Fwd(2 * W, Ok(0)),
            Fwd(2 * W + 1, Ok(1)),
        ]);
        // Switch to another source continues the output sequence.
        run(&[
            Switch(W + 10, 0),
            Fwd(W + 10, Ok(10)),
            Fwd(W + 11, Ok(11)),
            Switch(W + 5000, 0),
            Fwd(W + 5000, Ok(12)),
            Fwd(W + 5001, Ok(13)),
            Fwd(W + 4999, Err(MungeRefusal::TooOld)),
        ]);
        // Switch across the output wrap.
        run(&[
            Switch(W + 65_535, 0),
            Fwd(W + 65_535, Ok(65_535)),
            Switch(W + 7, 0),
            Fwd(W + 7, Ok(0)),
        ]);
        // Before any switch nothing is forwarded.
        run(&[Fwd(W, Err(MungeRefusal::NotStarted))]);
    }

    #[test]
    fn timestamps_continue_forward_across_a_switch() {
        let mut m = Munger::new();
        let now = t0();
        m.switch(&input(W, 1_000, 100, 5), now, 90_000);
        let a = m.rewrite(&input(W, 1_000, 100, 5), now).unwrap();
        assert_eq!(
            (a.timestamp, a.picture_id, a.tl0_pic_idx),
            (1_000, Some(100), Some(5))
        );
        let b = m
            .rewrite(
                &input(W + 1, 4_000, 101, 5),
                now + Duration::from_millis(33),
            )
            .unwrap();
        assert_eq!(b.timestamp, 4_000);
        // The new layer's clock is unrelated (random base): output moves on
        // by the 40 ms that passed, 3600 ticks at 90 kHz.
        let later = now + Duration::from_millis(73);
        m.switch(&input(W + 900, 3_000_000_000, 7000, 200), later, 90_000);
        let c = m
            .rewrite(&input(W + 900, 3_000_000_000, 7000, 200), later)
            .unwrap();
        assert_eq!(c.seq, (W + 2) as u16);
        assert_eq!(c.timestamp, 4_000 + 3_600);
        assert_eq!(c.picture_id, Some(102));
        assert_eq!(c.tl0_pic_idx, Some(6));
        let d = m
            .rewrite(&input(W + 901, 3_000_003_000, 7001, 201), later)
            .unwrap();
        assert_eq!(
            (d.timestamp, d.picture_id, d.tl0_pic_idx),
            (4_000 + 6_600, Some(103), Some(7))
        );
    }

    #[test]
    fn picture_id_and_tl0_wrap() {
        let mut m = Munger::new();
        let now = t0();
        m.switch(&input(W, 0, 32_767, 255), now, 90_000);
        m.rewrite(&input(W, 0, 32_767, 255), now).unwrap();
        let b = m.rewrite(&input(W + 1, 0, 0, 0), now).unwrap();
        assert_eq!((b.picture_id, b.tl0_pic_idx), (Some(0), Some(0)));
        m.switch(&input(W + 50, 0, 12, 99), now, 90_000);
        let c = m.rewrite(&input(W + 50, 0, 12, 99), now).unwrap();
        assert_eq!((c.picture_id, c.tl0_pic_idx), (Some(1), Some(1)));
    }

    #[test]
    fn old_drops_fold_into_the_offset() {
        let mut m = Munger::new();
        let now = t0();
        m.switch(&input(W, 0, 0, 0), now, 90_000);
        for s in 0..5000u64 {
            let seq = W + s;
            if s % 2 == 1 {
                m.drop_packet(seq);
            } else {
                let out = m.rewrite(&input(seq, 0, 0, 0), now).unwrap();
                assert_eq!(out.seq as u64, (W + s / 2) & 0xFFFF);
            }
        }
        assert!(m.seq.dropped.len() <= REORDER_WINDOW as usize);
    }

    #[test]
    fn sender_reports_align_timestamps_across_a_switch() {
        let mut m = Munger::new();
        let now = t0();
        let ntp = |ms: u64| (ms << 32) / 1000;
        let mut a = input(W, 90_000, 1, 1);
        a.capture_ntp = Some(ntp(10_000));
        m.switch(&a, now, 90_000);
        assert_eq!(m.rewrite(&a, now).unwrap().timestamp, 90_000);
        // The next layer's first frame was captured 100 ms later; it arrives
        // 400 ms later (the elapsed-time guess would say 36 000 ticks).
        let mut b = input(W + 500, 5_000_000, 77, 9);
        b.capture_ntp = Some(ntp(10_100));
        let later = now + Duration::from_millis(400);
        m.switch(&b, later, 90_000);
        let out = m.rewrite(&b, later).unwrap();
        assert!(
            (out.timestamp as i64 - (90_000 + 9_000)).abs() <= 1,
            "{}",
            out.timestamp
        );
        // Without sender reports, elapsed time is the guess.
        let mut c = input(W + 900, 7_000_000, 5, 5);
        c.capture_ntp = None;
        let much_later = later + Duration::from_millis(200);
        m.switch(&c, much_later, 90_000);
        let out_c = m.rewrite(&c, much_later).unwrap();
        assert_eq!(out_c.timestamp, out.timestamp.wrapping_add(18_000));
    }
}
