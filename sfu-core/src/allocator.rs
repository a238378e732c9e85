//! Fitting a subscriber's video tracks into its downlink estimate.
//!
//! Audio is served first. Every video track then gets its lowest layer while
//! they fit (tracks that do not fit are paused), and the remaining budget
//! buys upgrades one layer at a time, round robin, up to what each
//! subscriber wants. Downgrades apply at once; upgrades need headroom and
//! come at most one step per interval, so the choice does not flap.

use std::time::{Duration, Instant};

use crate::forwarder::{Layer, Preference};

/// Upgrades need this share of the estimate to spare.
pub const UPGRADE_HEADROOM: f64 = 0.85;
/// At most one upgrade step per track per this interval.
pub const UPGRADE_INTERVAL: Duration = Duration::from_millis(1000);
/// A track is paused for bandwidth only once the estimate has been short
/// of its lowest layer this long; until then it keeps the lowest layer. A
/// single low sample (a receiver's estimator dipping while its machine is
/// busy) must not freeze video.
pub const PAUSE_AFTER: Duration = Duration::from_millis(2000);
/// Video paused for bandwidth resumes no sooner than this after the pause,
/// so a link at the edge does not flap between frozen and moving.
pub const RESUME_INTERVAL: Duration = Duration::from_millis(3000);

const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_millis(100);

/// Bits per second over the last second, in ten 100 ms buckets.
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    buckets: [u64; BUCKETS],
    /// When the current bucket ends: one comparison per sample while
    /// samples fall in it.
    current_end: Option<Instant>,
    index: usize,
}

impl RateMeter {
    fn advance(&mut self, now: Instant) {
        let Some(mut end) = self.current_end else {
            self.current_end = Some(now + BUCKET);
            return;
        };
        if now < end {
            return;
        }
        let mut steps = 0;
        while now >= end && steps <= BUCKETS {
            end += BUCKET;
            self.index = (self.index + 1) % BUCKETS;
            self.buckets[self.index] = 0;
            steps += 1;
        }
        if steps > BUCKETS {
            // Idle for longer than the window: start afresh.
            end = now + BUCKET;
        }
        self.current_end = Some(end);
    }

    pub fn add(&mut self, now: Instant, bytes: usize) {
        self.advance(now);
        self.buckets[self.index] += bytes as u64;
    }

    pub fn bps(&mut self, now: Instant) -> u64 {
        self.advance(now);
        self.buckets.iter().sum::<u64>() * 8
    }
}

/// A downlink estimate from the loss subscribers report in their receiver
/// reports (the loss-based half of GCC): heavy loss cuts the estimate below
/// what was being sent, low loss lets it grow from there. It costs nothing
/// per packet, unlike a delay-based estimator fed by per-packet feedback.
#[derive(Debug, Clone)]
pub struct LossEstimator {
    estimate: u64,
}

/// Loss above this fraction means the link is congested.
pub const LOSS_CONGESTED: f64 = 0.10;
/// Loss below this fraction lets the estimate grow.
pub const LOSS_CLEAR: f64 = 0.02;
/// Growth per clear report (about one a second).
pub const LOSS_GROWTH: f64 = 1.08;

impl LossEstimator {
    pub fn new(initial: u64) -> LossEstimator {
        LossEstimator { estimate: initial }
    }

    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// A receiver report's loss fraction (0..1), with the rate we were
    /// sending to this subscriber; returns the new estimate.
    pub fn on_report(&mut self, loss: f64, sending: u64, min: u64, max: u64) -> u64 {
        if loss > LOSS_CONGESTED {
            let cut = (sending as f64 * (1.0 - 0.5 * loss)) as u64;
            self.estimate = self.estimate.min(cut);
        } else if loss < LOSS_CLEAR {
            let grown = (self.estimate.max(sending) as f64 * LOSS_GROWTH) as u64;
            self.estimate = self.estimate.max(grown);
        }
        self.estimate = self.estimate.clamp(min, max);
        self.estimate
    }
}

/// One video track as the allocator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoDemand {
    /// Layers sent, ascending, with their measured bitrates.
    pub layers: Vec<(Layer, u64)>,
    /// The highest layer the subscriber wants; `None` if it paused the track.
    pub wanted: Option<Layer>,
    /// The allocation in force.
    pub current: Preference,
    /// When this track's allocation last changed.
    pub last_upgrade: Option<Instant>,
    /// Since when the estimate has been too small for even this track's
    /// lowest layer (see [`short_of_lowest`]), as the caller recorded it.
    pub short_since: Option<Instant>,
}

/// The best allocation fitting `budget`, ignoring the one in force.
fn ideal(budget: u64, tracks: &[VideoDemand]) -> Vec<Preference> {
    let mut left = budget;
    let mut alloc: Vec<Option<usize>> = vec![None; tracks.len()];
    // Candidate layers per track: those sent, up to what is wanted.
    let candidates: Vec<Vec<(Layer, u64)>> = tracks
        .iter()
        .map(|t| match t.wanted {
            None => Vec::new(),
            Some(w) => {
                let mut c: Vec<(Layer, u64)> =
                    t.layers.iter().copied().filter(|(l, _)| *l <= w).collect();
                if c.is_empty() {
                    c.extend(t.layers.first().copied());
                }
                c
            }
        })
        .collect();
    for (i, c) in candidates.iter().enumerate() {
        if let Some((_, rate)) = c.first() {
            if *rate <= left {
                left -= rate;
                alloc[i] = Some(0);
            }
        }
    }
    loop {
        let mut upgraded = false;
        for (i, c) in candidates.iter().enumerate() {
            let Some(at) = alloc[i] else { continue };
            if at + 1 >= c.len() {
                continue;
            }
            let cost = c[at + 1].1.saturating_sub(c[at].1);
            if cost <= left {
                left -= cost;
                alloc[i] = Some(at + 1);
                upgraded = true;
            }
        }
        if !upgraded {
            break;
        }
    }
    alloc
        .iter()
        .zip(&candidates)
        .map(|(a, c)| match a {
            Some(at) => Preference::MaxLayer(c[*at].0),
            None => Preference::Paused,
        })
        .collect()
}

fn rank(p: Preference) -> i32 {
    match p {
        Preference::Paused => -1,
        Preference::MaxLayer(l) => l as i32,
    }
}

/// For each track: whether the estimate leaves no room even for its lowest
/// layer (the best allocation pauses it). The caller records since when,
/// for [`VideoDemand::short_since`].
pub fn short_of_lowest(estimate: u64, audio: u64, tracks: &[VideoDemand]) -> Vec<bool> {
    ideal(estimate.saturating_sub(audio), tracks)
        .into_iter()
        .zip(tracks)
        .map(|(p, t)| t.wanted.is_some() && p == Preference::Paused)
        .collect()
}

/// New allocations for a subscriber's video tracks given its estimate and
/// the bitrate its audio takes.
pub fn allocate(
    estimate: u64,
    audio: u64,
    tracks: &[VideoDemand],
    now: Instant,
) -> Vec<Preference> {
    let budget = estimate.saturating_sub(audio);
    let down = ideal(budget, tracks);
    let up = ideal((budget as f64 * UPGRADE_HEADROOM) as u64, tracks);
    tracks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let Some(wanted) = t.wanted else {
                // Paused by the subscriber: that is its preference's job;
                // the allocation stays as it was for when it resumes.
                return t.current;
            };
            // The highest layer the allocation could matter for.
            let top = t
                .layers
                .iter()
                .rev()
                .map(|(l, _)| *l)
                .find(|l| *l <= wanted)
                .or(t.layers.first().map(|(l, _)| *l))
                .unwrap_or(0);
            // "No limit" counts as everything wanted.
            let current = match t.current {
                Preference::MaxLayer(l) if l >= top => Preference::MaxLayer(top),
                other => other,
            };
            let interval = if current == Preference::Paused {
                RESUME_INTERVAL
            } else {
                UPGRADE_INTERVAL
            };
            let may_step = t
                .last_upgrade
                .is_none_or(|at| now.saturating_duration_since(at) >= interval);
            let chosen = if rank(down[i]) < rank(current) {
                let persistent = t
                    .short_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= PAUSE_AFTER);
                match down[i] {
                    Preference::Paused if !persistent => {
                        // Not yet: hold the lowest layer.
                        let lowest = t
                            .layers
                            .first()
                            .map(|(l, _)| Preference::MaxLayer(*l))
                            .unwrap_or(Preference::Paused);
                        if rank(lowest) < rank(current) {
                            lowest
                        } else {
                            current
                        }
                    }
                    other => other,
                }
            } else if rank(up[i]) > rank(current) && may_step {
                if t.last_upgrade.is_none() {
                    // Never changed yet (a new subscription): go straight
                    // to what fits.
                    up[i]
                } else {
                    // One step: from paused to the lowest layer, or one
                    // layer up.
                    let next = match current {
                        Preference::Paused => t.layers.first().map(|(l, _)| *l),
                        Preference::MaxLayer(l) => {
                            t.layers.iter().map(|(s, _)| *s).find(|s| *s > l)
                        }
                    };
                    match next {
                        Some(n) if rank(Preference::MaxLayer(n)) <= rank(up[i]) => {
                            Preference::MaxLayer(n)
                        }
                        _ => up[i],
                    }
                }
            } else {
                current
            };
            // Everything wanted fits: no limit, so the subscriber can change
            // its mind (or a higher layer can start) without waiting for an
            // upgrade step.
            match chosen {
                Preference::MaxLayer(l) if l >= top => Preference::MaxLayer(Layer::MAX),
                other => other,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_epoch as t0;

    fn track(current: Preference) -> VideoDemand {
        VideoDemand {
            layers: vec![(0, 150_000), (1, 500_000), (2, 1_500_000)],
            wanted: Some(2),
            current,
            last_upgrade: None,
            short_since: None,
        }
    }

    #[test]
    fn loss_cuts_below_the_sending_rate_and_clear_reports_grow_it() {
        let mut e = LossEstimator::new(4_000_000);
        // 20% loss while sending 2 Mbit/s: 10% below that.
        assert_eq!(e.on_report(0.20, 2_000_000, 50_000, 50_000_000), 1_800_000);
        // Moderate loss holds.
        assert_eq!(e.on_report(0.05, 1_800_000, 50_000, 50_000_000), 1_800_000);
        // Clear reports grow it 8% each.
        assert_eq!(e.on_report(0.0, 1_000_000, 50_000, 50_000_000), 1_944_000);
        // Never below the floor.
        assert_eq!(e.on_report(0.9, 10_000, 50_000, 50_000_000), 50_000);
    }

    #[test]
    fn rate_meter_measures_the_last_second() {
        let mut m = RateMeter::default();
        let now = t0();
        for i in 0..100 {
            m.add(now + Duration::from_millis(10 * i), 1250); // 1 Mbit/s
        }
        let bps = m.bps(now + Duration::from_millis(999));
        assert!((900_000..=1_100_000).contains(&bps), "{bps}");
        // Half a second on, the buckets of the first 600 ms are gone: the
        // four from 600 ms to 1 s remain (12,500 bytes each).
        assert_eq!(m.bps(now + Duration::from_millis(1500)), 400_000);
        assert_eq!(m.bps(now + Duration::from_secs(5)), 0);
    }

    const NO_LIMIT: Preference = Preference::MaxLayer(Layer::MAX);

    #[test]
    fn downgrades_at_once_and_pauses_what_does_not_fit() {
        let now = t0();
        let t = [track(NO_LIMIT), track(NO_LIMIT)];
        // Room for everything: no limit.
        assert_eq!(allocate(10_000_000, 40_000, &t, now), vec![NO_LIMIT; 2]);
        // Room for both lows and one medium.
        let a = allocate(800_000 + 40_000, 40_000, &t, now);
        assert_eq!(a, vec![Preference::MaxLayer(1), Preference::MaxLayer(0)]);
        // Room for one low only: the other keeps its lowest layer until
        // the shortage has lasted, then pauses.
        assert_eq!(short_of_lowest(200_000, 0, &t), vec![false, true]);
        let a = allocate(200_000, 0, &t, now);
        assert_eq!(a, vec![Preference::MaxLayer(0), Preference::MaxLayer(0)]);
        let mut t = t;
        t[1].short_since = Some(now - PAUSE_AFTER);
        let a = allocate(200_000, 0, &t, now);
        assert_eq!(a, vec![Preference::MaxLayer(0), Preference::Paused]);
        // Room for nothing, for long enough.
        assert_eq!(short_of_lowest(100_000, 0, &t), vec![true, true]);
        t[0].short_since = Some(now - PAUSE_AFTER);
        assert_eq!(
            allocate(100_000, 0, &t, now),
            vec![Preference::Paused, Preference::Paused]
        );
    }

    #[test]
    fn paused_video_waits_longer_before_resuming() {
        let now = t0();
        let mut t = [track(Preference::Paused)];
        t[0].last_upgrade = Some(now);
        let soon = now + UPGRADE_INTERVAL;
        assert_eq!(allocate(5_000_000, 0, &t, soon), vec![Preference::Paused]);
        let later = now + RESUME_INTERVAL;
        assert_eq!(
            allocate(5_000_000, 0, &t, later),
            vec![Preference::MaxLayer(0)]
        );
    }

    #[test]
    fn upgrades_need_headroom_and_come_one_step_per_interval() {
        let now = t0();
        let mut t = [track(Preference::MaxLayer(0))];
        t[0].last_upgrade = Some(now - UPGRADE_INTERVAL);
        // Exactly enough for high, but not with headroom: medium at best.
        let a = allocate(1_500_000, 0, &t, now);
        assert_eq!(a, vec![Preference::MaxLayer(1)], "one step up");
        t[0].current = a[0];
        t[0].last_upgrade = Some(now);
        assert_eq!(
            allocate(5_000_000, 0, &t, now),
            vec![Preference::MaxLayer(1)],
            "too soon"
        );
        let later = now + UPGRADE_INTERVAL;
        assert_eq!(allocate(5_000_000, 0, &t, later), vec![NO_LIMIT]);
        // 1.5 Mbit/s needs 1.76 Mbit/s of estimate to be reached.
        assert_eq!(
            allocate(1_700_000, 0, &t, later),
            vec![Preference::MaxLayer(1)]
        );
        assert_eq!(allocate(1_800_000, 0, &t, later), vec![NO_LIMIT]);
        // Paused comes back at the lowest layer first.
        t[0].current = Preference::Paused;
        let later = now + RESUME_INTERVAL;
        assert_eq!(
            allocate(5_000_000, 0, &t, later),
            vec![Preference::MaxLayer(0)]
        );
        // A subscription never changed goes straight to what fits.
        t[0].last_upgrade = None;
        assert_eq!(allocate(5_000_000, 0, &t, later), vec![NO_LIMIT]);
    }

    #[test]
    fn an_unlimited_allocation_that_fits_stays_unlimited() {
        let now = t0();
        let mut t = [track(NO_LIMIT)];
        // Only the low layer has started so far.
        t[0].layers.truncate(1);
        assert_eq!(
            allocate(5_000_000, 0, &t, now),
            vec![NO_LIMIT],
            "not capped at the only layer seen yet"
        );
    }

    #[test]
    fn what_the_subscriber_wants_is_not_an_allocation_change() {
        let now = t0();
        let mut t = [track(NO_LIMIT)];
        // Medium is all it wants and it fits: no limit at all, so asking for
        // more later is not held back by upgrade steps.
        t[0].wanted = Some(1);
        assert_eq!(allocate(10_000_000, 0, &t, now), vec![NO_LIMIT]);
        t[0].wanted = Some(0);
        assert_eq!(allocate(10_000_000, 0, &t, now), vec![NO_LIMIT]);
        // Wanting medium on a link with room for low only is limited.
        t[0].wanted = Some(1);
        assert_eq!(allocate(300_000, 0, &t, now), vec![Preference::MaxLayer(0)]);
        // A track the subscriber paused takes no budget and keeps its
        // allocation for when it resumes.
        t[0].wanted = None;
        t[0].current = Preference::MaxLayer(1);
        assert_eq!(
            allocate(10_000_000, 0, &t, now),
            vec![Preference::MaxLayer(1)]
        );
    }
}
