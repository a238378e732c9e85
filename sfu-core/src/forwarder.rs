//! Per down track: which spatial layer to forward, and how to rewrite each
//! packet of it. Deciding is separate from sending: [`Forwarder::decide`]
//! returns a [`Verdict`] value that the room applies and tests compare.
//!
//! Three layer levels, as in the best SFUs: **max** (the subscriber's
//! preference), **target** (what fits: the max, limited to what the
//! publisher sends and, later, to the bandwidth allocation) and **current**
//! (what is forwarded now). Current moves to target only at a keyframe of
//! the target layer; until then the old layer keeps flowing.

use std::time::Instant;

use crate::munger::{MungeInput, MungeOutput, MungeRefusal, Munger};
use crate::room::DropReason;

/// A spatial layer index: 0 is the lowest resolution.
pub type Layer = u8;

/// The facts of one packet the forwarder decides on.
#[derive(Debug, Clone, Copy)]
pub struct PacketInfo {
    pub layer: Layer,
    pub ext_seq: u64,
    pub timestamp: u32,
    /// Capture time from the layer's sender report (NTP format), if known.
    pub capture_ntp: Option<u64>,
    /// First packet of a keyframe.
    pub keyframe: bool,
    /// No media payload (padding only).
    pub padding_only: bool,
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
    /// VP8 temporal layer of the frame, when the stream has them.
    pub tid: Option<u8>,
    /// First packet of a frame.
    pub frame_start: bool,
}

/// How to rewrite a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    pub seq: u16,
    pub timestamp: u32,
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
    /// This packet starts a new layer.
    pub switched: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward(Rewrite),
    Drop(DropReason),
}

/// What the subscriber wants of this track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// At most this layer.
    MaxLayer(Layer),
    /// Nothing (the subscriber paused the track).
    Paused,
}

#[derive(Debug, Clone)]
pub struct Forwarder {
    clock_rate: u32,
    preference: Preference,
    /// The bandwidth allocator's limit: at most this layer, or nothing.
    allocation: Preference,
    /// Layers the publisher is sending, ascending.
    available: Vec<Layer>,
    target: Option<Layer>,
    current: Option<Layer>,
    /// Highest temporal layer wanted, and the one forwarded now (moves up
    /// only at a base-layer frame, down at any frame).
    max_temporal: u8,
    current_temporal: u8,
    munger: Munger,
}

impl Forwarder {
    pub fn new(clock_rate: u32) -> Forwarder {
        Forwarder {
            clock_rate,
            preference: Preference::MaxLayer(Layer::MAX),
            allocation: Preference::MaxLayer(Layer::MAX),
            available: Vec::new(),
            target: None,
            current: None,
            max_temporal: u8::MAX,
            current_temporal: u8::MAX,
            munger: Munger::new(),
        }
    }

    pub fn preference(&self) -> Preference {
        self.preference
    }

    pub fn target(&self) -> Option<Layer> {
        self.target
    }

    pub fn current(&self) -> Option<Layer> {
        self.current
    }

    pub fn set_preference(&mut self, preference: Preference) {
        self.preference = preference;
        if preference == Preference::Paused {
            // The decoder misses everything from here on: resuming must
            // start at a keyframe, as a switch does.
            self.current = None;
        }
        self.retarget();
    }

    /// The output timestamp an input timestamp of the current layer maps
    /// to (for sender reports), if a layer is being forwarded.
    pub fn output_timestamp(&self, input: u32) -> Option<u32> {
        self.current.map(|_| self.munger.output_timestamp(input))
    }

    /// The highest VP8 temporal layer to forward (frame rate limit).
    pub fn set_max_temporal(&mut self, max: u8) {
        self.max_temporal = max;
    }

    pub fn max_temporal(&self) -> u8 {
        self.max_temporal
    }

    pub fn allocation(&self) -> Preference {
        self.allocation
    }

    /// The bandwidth allocator's limit, applied on top of the preference.
    pub fn set_allocation(&mut self, allocation: Preference) {
        if allocation == self.allocation {
            return;
        }
        self.allocation = allocation;
        if allocation == Preference::Paused {
            self.current = None;
        }
        self.retarget();
    }

    /// The highest layer the subscriber wants (preference only, ignoring
    /// the allocation), among those sent.
    pub fn wanted(&self) -> Option<Layer> {
        self.pick(self.preference)
    }

    /// Layers the publisher sends, ascending.
    pub fn available(&self) -> &[Layer] {
        &self.available
    }

    fn pick(&self, limit: Preference) -> Option<Layer> {
        match limit {
            Preference::Paused => None,
            Preference::MaxLayer(max) => self
                .available
                .iter()
                .rev()
                .find(|l| **l <= max)
                .or(self.available.first())
                .copied(),
        }
    }

    /// The publisher's layers changed (a layer started or stopped).
    pub fn set_available(&mut self, layers: &[Layer]) {
        self.available = layers.to_vec();
        self.available.sort_unstable();
        self.available.dedup();
        if self.current.is_some_and(|c| !self.available.contains(&c)) {
            self.current = None;
        }
        self.retarget();
    }

    /// Target: the highest available layer within both the preference and
    /// the allocation, else the lowest available one.
    fn retarget(&mut self) {
        let limit = match (self.preference, self.allocation) {
            (Preference::Paused, _) | (_, Preference::Paused) => Preference::Paused,
            (Preference::MaxLayer(a), Preference::MaxLayer(b)) => Preference::MaxLayer(a.min(b)),
        };
        self.target = self.pick(limit);
    }

    /// The layer whose keyframe this forwarder waits for, if any: the room
    /// asks the publisher for one.
    pub fn awaiting_keyframe(&self) -> Option<Layer> {
        match (self.target, self.current) {
            (Some(t), c) if c != Some(t) => Some(t),
            _ => None,
        }
    }

    /// Decides one packet, in a fixed order: paused, no target, padding,
    /// not a selected layer, waiting for a keyframe, too old.
    pub fn decide(&mut self, p: &PacketInfo, now: Instant) -> Verdict {
        let Some(target) = self.target else {
            return Verdict::Drop(if self.preference == Preference::Paused {
                DropReason::Paused
            } else if self.allocation == Preference::Paused {
                DropReason::Bandwidth
            } else {
                DropReason::NoLayerAvailable
            });
        };
        let input = MungeInput {
            ext_seq: p.ext_seq,
            timestamp: p.timestamp,
            capture_ntp: p.capture_ntp,
            picture_id: p.picture_id,
            tl0_pic_idx: p.tl0_pic_idx,
        };
        let mut switched = false;
        if self.current.is_none() && p.keyframe && p.layer < target {
            // Nothing flows yet: start on the first keyframe of any layer up
            // to the target, for the fastest first frame, and climb to the
            // target at its next keyframe.
            self.munger.switch(&input, now, self.clock_rate);
            self.current = Some(p.layer);
            self.current_temporal = self.max_temporal;
            switched = true;
        } else if p.layer == target && self.current != Some(target) {
            if !p.keyframe {
                if self.current.is_none() {
                    return Verdict::Drop(DropReason::WaitingForKeyframe);
                }
                return Verdict::Drop(DropReason::LayerNotSelected);
            }
            self.munger.switch(&input, now, self.clock_rate);
            self.current = Some(target);
            self.current_temporal = self.max_temporal;
            switched = true;
        } else if Some(p.layer) != self.current {
            return Verdict::Drop(DropReason::LayerNotSelected);
        }
        if p.padding_only {
            self.munger.drop_packet(p.ext_seq);
            return Verdict::Drop(DropReason::Padding);
        }
        if let Some(tid) = p.tid {
            if p.frame_start && !switched {
                if self.max_temporal < self.current_temporal {
                    self.current_temporal = self.max_temporal;
                } else if self.max_temporal > self.current_temporal && tid == 0 {
                    // Base-layer frames reference only base-layer frames:
                    // from here on the higher layers decode.
                    self.current_temporal = self.max_temporal;
                }
            }
            if tid > self.current_temporal {
                self.munger.drop_packet(p.ext_seq);
                if let Some(pid) = p.picture_id {
                    self.munger.drop_picture(pid);
                }
                return Verdict::Drop(DropReason::TemporalLayer);
            }
        }
        match self.munger.rewrite(&input, now) {
            Ok(MungeOutput {
                seq,
                timestamp,
                picture_id,
                tl0_pic_idx,
            }) => Verdict::Forward(Rewrite {
                seq,
                timestamp,
                picture_id,
                tl0_pic_idx,
                switched,
            }),
            Err(MungeRefusal::TooOld | MungeRefusal::NotStarted) => {
                Verdict::Drop(DropReason::TooOld)
            }
            Err(MungeRefusal::AlreadyDropped) => Verdict::Drop(DropReason::Duplicate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_epoch as t0;

    /// Per-layer packet source: each layer numbers its own packets.
    struct Source {
        seq: [u64; 3],
    }

    impl Source {
        fn new() -> Source {
            Source {
                seq: [65_536 + 100, 65_536 + 20_000, 65_536 + 40_000],
            }
        }
        fn packet(&mut self, layer: Layer, keyframe: bool) -> PacketInfo {
            let l = layer as usize;
            self.seq[l] += 1;
            PacketInfo {
                layer,
                ext_seq: self.seq[l],
                timestamp: (self.seq[l] as u32).wrapping_mul(3000),
                capture_ntp: None,
                keyframe,
                padding_only: false,
                picture_id: Some((self.seq[l] % 32_768) as u16),
                tl0_pic_idx: Some(self.seq[l] as u8),
                tid: None,
                frame_start: true,
            }
        }
    }

    fn fwd(v: Verdict) -> Rewrite {
        match v {
            Verdict::Forward(r) => r,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn starts_on_the_first_keyframe_up_to_the_target_then_climbs() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0, 1, 2]);
        assert_eq!(f.target(), Some(2));
        assert_eq!(f.awaiting_keyframe(), Some(2));
        let mut s = Source::new();
        assert_eq!(
            f.decide(&s.packet(2, false), now),
            Verdict::Drop(DropReason::WaitingForKeyframe)
        );
        assert_eq!(
            f.decide(&s.packet(0, false), now),
            Verdict::Drop(DropReason::LayerNotSelected)
        );
        // A low keyframe arrives first: start there.
        let r = fwd(f.decide(&s.packet(0, true), now));
        assert!(r.switched);
        assert_eq!(f.current(), Some(0));
        assert_eq!(
            f.awaiting_keyframe(),
            Some(2),
            "still climbing to the target"
        );
        let r1 = fwd(f.decide(&s.packet(0, false), now));
        assert_eq!(r1.seq, r.seq.wrapping_add(1));
        // A medium keyframe does not interrupt: only the target is switched to.
        assert_eq!(
            f.decide(&s.packet(1, true), now),
            Verdict::Drop(DropReason::LayerNotSelected)
        );
        let r2 = fwd(f.decide(&s.packet(2, true), now));
        assert!(r2.switched);
        assert_eq!(r2.seq, r1.seq.wrapping_add(1));
        assert_eq!(f.current(), Some(2));
        assert_eq!(f.awaiting_keyframe(), None);
        let r3 = fwd(f.decide(&s.packet(2, false), now));
        assert_eq!(r3.seq, r2.seq.wrapping_add(1));
        assert!(!r3.switched);
    }

    #[test]
    fn switches_down_and_up_only_at_keyframes_without_gaps() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0, 1, 2]);
        let mut s = Source::new();
        let mut last = fwd(f.decide(&s.packet(2, true), now)).seq;
        // Subscriber asks for low: high keeps flowing until low's keyframe.
        f.set_preference(Preference::MaxLayer(0));
        assert_eq!(f.awaiting_keyframe(), Some(0));
        for _ in 0..3 {
            assert_eq!(
                f.decide(&s.packet(0, false), now),
                Verdict::Drop(DropReason::LayerNotSelected)
            );
            let r = fwd(f.decide(&s.packet(2, false), now));
            assert_eq!(r.seq, last.wrapping_add(1));
            last = r.seq;
        }
        let r = fwd(f.decide(&s.packet(0, true), now));
        assert!(r.switched);
        assert_eq!(r.seq, last.wrapping_add(1), "no hole at the switch");
        last = r.seq;
        assert_eq!(
            f.decide(&s.packet(2, false), now),
            Verdict::Drop(DropReason::LayerNotSelected)
        );
        // Back up to medium.
        f.set_preference(Preference::MaxLayer(1));
        assert_eq!(
            f.decide(&s.packet(1, false), now),
            Verdict::Drop(DropReason::LayerNotSelected)
        );
        last = fwd(f.decide(&s.packet(0, false), now)).seq.max(last);
        let r = fwd(f.decide(&s.packet(1, true), now));
        assert!(r.switched && r.seq == last.wrapping_add(1));
        assert_eq!(f.current(), Some(1));
    }

    #[test]
    fn preference_clamps_to_what_is_sent_and_pause_drops_everything() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0, 1]);
        assert_eq!(f.target(), Some(1), "high falls back to the best sent");
        f.set_available(&[2]);
        f.set_preference(Preference::MaxLayer(0));
        assert_eq!(
            f.target(),
            Some(2),
            "nothing at or below low: the lowest sent"
        );
        f.set_preference(Preference::Paused);
        assert_eq!(f.target(), None);
        let mut s = Source::new();
        assert_eq!(
            f.decide(&s.packet(2, true), now),
            Verdict::Drop(DropReason::Paused)
        );
        assert_eq!(f.awaiting_keyframe(), None);
        let mut g = Forwarder::new(90_000);
        assert_eq!(
            g.decide(&s.packet(0, true), now),
            Verdict::Drop(DropReason::NoLayerAvailable)
        );
    }

    #[test]
    fn padding_is_dropped_without_a_hole() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0]);
        let mut s = Source::new();
        let a = fwd(f.decide(&s.packet(0, true), now)).seq;
        let mut pad = s.packet(0, false);
        pad.padding_only = true;
        assert_eq!(f.decide(&pad, now), Verdict::Drop(DropReason::Padding));
        let b = fwd(f.decide(&s.packet(0, false), now)).seq;
        assert_eq!(b, a.wrapping_add(1));
        // The padding packet retransmitted later is not forwarded.
        assert_eq!(f.decide(&pad, now), Verdict::Drop(DropReason::Padding));
    }

    #[test]
    fn a_vanished_current_layer_is_replaced() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0, 1, 2]);
        let mut s = Source::new();
        fwd(f.decide(&s.packet(2, true), now));
        f.set_available(&[0, 1]);
        assert_eq!(f.current(), None);
        assert_eq!(f.target(), Some(1));
        assert_eq!(
            f.decide(&s.packet(1, false), now),
            Verdict::Drop(DropReason::WaitingForKeyframe)
        );
        assert!(fwd(f.decide(&s.packet(1, true), now)).switched);
    }

    #[test]
    fn resume_after_pause_waits_for_a_keyframe_and_continues_the_sequence() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0]);
        let mut s = Source::new();
        let a = fwd(f.decide(&s.packet(0, true), now)).seq;
        f.set_preference(Preference::Paused);
        for _ in 0..5 {
            assert_eq!(
                f.decide(&s.packet(0, false), now),
                Verdict::Drop(DropReason::Paused)
            );
        }
        f.set_preference(Preference::MaxLayer(0));
        assert_eq!(
            f.decide(&s.packet(0, false), now),
            Verdict::Drop(DropReason::WaitingForKeyframe)
        );
        let b = fwd(f.decide(&s.packet(0, true), now));
        assert!(b.switched);
        assert_eq!(b.seq, a.wrapping_add(1), "the pause leaves no hole");
    }

    #[test]
    fn temporal_layers_drop_down_at_once_and_climb_at_a_base_frame() {
        let mut f = Forwarder::new(90_000);
        let now = t0();
        f.set_available(&[0]);
        let mut s = Source::new();
        let pattern = [0u8, 2, 1, 2];
        let frame = |s: &mut Source, n: usize| {
            let mut p = s.packet(0, n == 0);
            p.tid = Some(pattern[n % 4]);
            p
        };
        let first = fwd(f.decide(&frame(&mut s, 0), now));
        let mut last = first;
        for n in 1..4 {
            last = fwd(f.decide(&frame(&mut s, n), now));
        }
        // 15 fps: only temporal layers 0 and 1.
        f.set_max_temporal(1);
        let mut forwarded = Vec::new();
        for n in 4..12 {
            let p = frame(&mut s, n);
            match f.decide(&p, now) {
                Verdict::Forward(r) => {
                    assert_eq!(
                        r.seq,
                        last.seq.wrapping_add(1),
                        "no hole for dropped frames"
                    );
                    assert_eq!(r.picture_id, Some((last.picture_id.unwrap() + 1) % 32_768));
                    last = r;
                    forwarded.push(p.tid.unwrap());
                }
                Verdict::Drop(reason) => {
                    assert_eq!(reason, DropReason::TemporalLayer);
                    assert_eq!(p.tid, Some(2));
                }
            }
        }
        assert_eq!(forwarded, vec![0, 1, 0, 1]);
        // Back to full rate: T2 frames come back only after the next
        // base-layer frame (frames 12..: tids 0, 2, 1, 2, 0, 2).
        f.set_max_temporal(u8::MAX);
        let tids: Vec<(u8, bool)> = (12..18)
            .map(|n| {
                let p = frame(&mut s, n);
                (
                    p.tid.unwrap(),
                    matches!(f.decide(&p, now), Verdict::Forward(_)),
                )
            })
            .collect();
        assert_eq!(
            tids,
            vec![
                (0, true),
                (2, true),
                (1, true),
                (2, true),
                (0, true),
                (2, true)
            ],
            "frame 12 is a base frame: full rate from there"
        );
    }
}
