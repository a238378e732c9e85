//! Properties of the forwarder over random streams: three layers with their
//! own numbering and clocks, random loss, padding, keyframes, preference
//! changes and an L1T3 temporal pattern with random frame-rate limits. Whatever happens, the subscriber's stream is continuous except
//! where input was lost, timestamps never go backwards, picture ids
//! continue across switches, and no switch happens on a non-keyframe.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use sfu_core::forwarder::{Forwarder, Layer, PacketInfo, Preference, Verdict};
use sfu_core::seq::TsExtender;
use sfu_core::DropReason;

#[derive(Debug, Clone)]
struct Event {
    layer: Layer,
    keyframe: bool,
    lost: bool,
    padding: bool,
    preference: Option<Option<Layer>>,
    /// A new highest temporal layer wanted.
    temporal: Option<u8>,
}

fn event() -> impl Strategy<Value = Event> {
    (
        0u8..3,
        prop::bool::weighted(0.08),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.03),
        prop::option::weighted(0.03, prop::option::weighted(0.9, 0u8..3)),
        prop::option::weighted(0.03, 0u8..3),
    )
        .prop_map(
            |(layer, keyframe, lost, padding, preference, temporal)| Event {
                layer,
                keyframe,
                lost,
                padding,
                preference,
                temporal,
            },
        )
}

#[derive(Clone, Copy)]
struct LayerState {
    seq: u64,
    ts: u32,
    pid: u16,
    /// Frames sent, for the L1T3 temporal pattern 0, 2, 1, 2.
    frames: u64,
}

struct Last {
    layer: Layer,
    in_seq: u64,
    in_ts: u32,
    in_pid: u16,
    out_seq: u16,
    out_ts: u64,
    out_pid: u16,
    /// Packets of this layer the forwarder dropped since (padding and
    /// temporal-layer frames), and pictures among them.
    dropped_since: u64,
    pictures_dropped_since: u16,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn forwarded_stream_is_continuous(
        events in prop::collection::vec(event(), 1..600),
        seq_bases in prop::array::uniform3(0u64..65_536),
        ts_bases in prop::array::uniform3(any::<u32>()),
        pid_bases in prop::array::uniform3(0u16..32_768),
    ) {
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_available(&[0, 1, 2]);
        let mut layers: Vec<LayerState> = (0..3)
            .map(|i| LayerState { seq: 65_536 + seq_bases[i], ts: ts_bases[i], pid: pid_bases[i], frames: 0 })
            .collect();
        let mut out_ts = TsExtender::new();
        let mut last: Option<Last> = None;
        for (i, e) in events.iter().enumerate() {
            let now = start + Duration::from_millis(10 * i as u64);
            if let Some(p) = e.preference {
                f.set_preference(p.map_or(Preference::Paused, Preference::MaxLayer));
            }
            if let Some(t) = e.temporal {
                f.set_max_temporal(t);
            }
            let l = &mut layers[e.layer as usize];
            l.seq += 1;
            // Keyframes restart the temporal pattern (they are base layer).
            if e.keyframe && !e.padding {
                l.frames = 0;
            }
            let tid = [0u8, 2, 1, 2][(l.frames % 4) as usize];
            if !e.padding {
                l.ts = l.ts.wrapping_add(900);
                l.pid = (l.pid + 1) % 32_768;
                l.frames += 1;
            }
            let info = PacketInfo {
                layer: e.layer,
                ext_seq: l.seq,
                timestamp: l.ts,
                capture_ntp: None,
                keyframe: e.keyframe && !e.padding,
                padding_only: e.padding,
                picture_id: (!e.padding).then_some(l.pid),
                tl0_pic_idx: None,
                tid: (!e.padding).then_some(tid),
                frame_start: true,
            };
            if e.lost {
                continue;
            }
            let before = f.current();
            let verdict = f.decide(&info, now);
            let Verdict::Forward(r) = verdict else {
                let closed = matches!(verdict, Verdict::Drop(DropReason::Padding | DropReason::TemporalLayer));
                if let Some(last) = last.as_mut() {
                    if closed && last.layer == e.layer {
                        last.dropped_since += 1;
                        if !e.padding {
                            last.pictures_dropped_since += 1;
                        }
                    }
                }
                continue;
            };
            prop_assert!(!e.padding, "padding forwarded");
            prop_assert!(tid <= f.max_temporal(), "temporal layer {} above the limit {}", tid, f.max_temporal());
            if r.switched {
                prop_assert!(info.keyframe, "switched on a non-keyframe at event {}", i);
                prop_assert_ne!(before, Some(e.layer));
            }
            let ts = out_ts.extend(r.timestamp as u64);
            if let Some(prev) = &last {
                if r.switched || prev.layer != e.layer {
                    prop_assert!(r.switched, "layer changed without a switch");
                    prop_assert_eq!(r.seq, prev.out_seq.wrapping_add(1), "hole at switch (event {})", i);
                    prop_assert!(ts > prev.out_ts, "timestamp went back at switch (event {})", i);
                    prop_assert_eq!(r.picture_id, Some((prev.out_pid + 1) % 32_768), "picture id jump at switch");
                } else {
                    let gap_in = info.ext_seq - prev.in_seq - prev.dropped_since;
                    prop_assert_eq!(r.seq, prev.out_seq.wrapping_add(gap_in as u16), "seq gap differs from input loss (event {})", i);
                    prop_assert_eq!(ts - prev.out_ts, info.timestamp.wrapping_sub(prev.in_ts) as u64);
                    let pid_gap = (info.picture_id.unwrap() + 32_768 - prev.in_pid) % 32_768
                        - prev.pictures_dropped_since;
                    prop_assert_eq!(r.picture_id, Some((prev.out_pid + pid_gap) % 32_768));
                }
            }
            last = Some(Last {
                layer: e.layer,
                in_seq: info.ext_seq,
                in_ts: info.timestamp,
                in_pid: info.picture_id.unwrap(),
                out_seq: r.seq,
                out_ts: ts,
                out_pid: r.picture_id.unwrap(),
                dropped_since: 0,
                pictures_dropped_since: 0,
            });
        }
    }
}
