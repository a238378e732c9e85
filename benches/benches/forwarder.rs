//! Forwarding decision + header rewrite, per packet per subscriber.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sfu_core::forwarder::{Forwarder, PacketInfo, Verdict};

fn decide_and_rewrite(c: &mut Criterion) {
    #[allow(clippy::disallowed_methods)]
    let start = Instant::now();
    let packet = rtc::rtp::Packet {
        header: rtc::rtp::Header {
            version: 2,
            payload_type: 96,
            sequence_number: 1,
            timestamp: 1,
            ssrc: 1,
            ..Default::default()
        },
        payload: Bytes::from(vec![0u8; 1100]),
    };
    c.bench_function("forwarder/decide_and_rewrite", |b| {
        let mut f = Forwarder::new(90_000);
        f.set_available(&[0, 1, 2]);
        let mut seq = 65_536u64;
        b.iter(|| {
            seq += 1;
            let info = PacketInfo {
                layer: 2,
                ext_seq: seq,
                timestamp: (seq as u32).wrapping_mul(3000),
                capture_ntp: None,
                keyframe: seq == 65_537,
                padding_only: false,
                picture_id: Some((seq & 0x7FFF) as u16),
                tl0_pic_idx: Some(seq as u8),
                tid: Some(0),
                frame_start: true,
            };
            let now = start + Duration::from_micros(seq);
            match f.decide(black_box(&info), now) {
                Verdict::Forward(r) => {
                    let mut out = packet.clone();
                    out.header.ssrc = 0x1234;
                    out.header.sequence_number = r.seq;
                    out.header.timestamp = r.timestamp;
                    black_box(out);
                }
                Verdict::Drop(reason) => {
                    black_box(reason);
                }
            }
        })
    });
    c.bench_function("forwarder/drop_other_layer", |b| {
        let mut f = Forwarder::new(90_000);
        f.set_available(&[0, 1, 2]);
        let mut seq = 65_536u64;
        b.iter(|| {
            seq += 1;
            let info = PacketInfo {
                layer: 0,
                ext_seq: seq,
                timestamp: 0,
                capture_ntp: None,
                keyframe: false,
                padding_only: false,
                picture_id: None,
                tl0_pic_idx: None,
                tid: None,
                frame_start: true,
            };
            black_box(f.decide(black_box(&info), start))
        })
    });
}

criterion_group!(benches, decide_and_rewrite);
criterion_main!(benches);
