//! Properties of the forwarder over random streams: three layers with their
//! own numbering and clocks, random loss, padding, keyframes and preference
//! changes. Whatever happens, the subscriber's stream is continuous except
//! where input was lost, timestamps never go backwards, picture ids
//! continue across switches, and no switch happens on a non-keyframe.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use sfu_core::forwarder::{Forwarder, Layer, PacketInfo, Preference, Verdict};
use sfu_core::seq::TsExtender;

#[derive(Debug, Clone)]
struct Event {
    layer: Layer,
    keyframe: bool,
    lost: bool,
    padding: bool,
    preference: Option<Option<Layer>>,
}

fn event() -> impl Strategy<Value = Event> {
    (
        0u8..3,
        prop::bool::weighted(0.08),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.03),
        prop::option::weighted(0.03, prop::option::weighted(0.9, 0u8..3)),
    )
        .prop_map(|(layer, keyframe, lost, padding, preference)| Event {
            layer,
            keyframe,
            lost,
            padding,
            preference,
        })
}

#[derive(Clone, Copy)]
struct LayerState {
    seq: u64,
    ts: u32,
    pid: u16,
}

struct Last {
    layer: Layer,
    in_seq: u64,
    in_ts: u32,
    in_pid: u16,
    out_seq: u16,
    out_ts: u64,
    out_pid: u16,
    paddings_since: u64,
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
            .map(|i| LayerState { seq: 65_536 + seq_bases[i], ts: ts_bases[i], pid: pid_bases[i] })
            .collect();
        let mut out_ts = TsExtender::new();
        let mut last: Option<Last> = None;
        for (i, e) in events.iter().enumerate() {
            let now = start + Duration::from_millis(10 * i as u64);
            if let Some(p) = e.preference {
                f.set_preference(p.map_or(Preference::Paused, Preference::MaxLayer));
            }
            let l = &mut layers[e.layer as usize];
            l.seq += 1;
            if !e.padding {
                l.ts = l.ts.wrapping_add(900);
                l.pid = (l.pid + 1) % 32_768;
            }
            let info = PacketInfo {
                layer: e.layer,
                ext_seq: l.seq,
                timestamp: l.ts,
                keyframe: e.keyframe && !e.padding,
                padding_only: e.padding,
                picture_id: (!e.padding).then_some(l.pid),
                tl0_pic_idx: None,
            };
            if e.lost {
                continue;
            }
            let before = f.current();
            let verdict = f.decide(&info, now);
            let Verdict::Forward(r) = verdict else {
                if e.padding {
                    if let Some(last) = last.as_mut() {
                        if last.layer == e.layer {
                            last.paddings_since += 1;
                        }
                    }
                }
                continue;
            };
            prop_assert!(!e.padding, "padding forwarded");
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
                    let gap_in = info.ext_seq - prev.in_seq - prev.paddings_since;
                    prop_assert_eq!(r.seq, prev.out_seq.wrapping_add(gap_in as u16), "seq gap differs from input loss (event {})", i);
                    prop_assert_eq!(ts - prev.out_ts, info.timestamp.wrapping_sub(prev.in_ts) as u64);
                    let pid_gap = (info.picture_id.unwrap() + 32_768 - prev.in_pid) % 32_768;
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
                paddings_since: 0,
            });
        }
    }
}
