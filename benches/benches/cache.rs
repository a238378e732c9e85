//! The retransmission cache: storing each published packet once, and
//! answering a NACK (sent-log lookup + cache lookup).

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sfu_core::cache::{PacketCache, SentEntry, SentLog};
use sfu_core::forwarder::Rewrite;

fn cache(c: &mut Criterion) {
    #[allow(clippy::disallowed_methods)]
    let start = Instant::now();
    let packet = rtc::rtp::Packet {
        header: rtc::rtp::Header {
            version: 2,
            payload_type: 96,
            ..Default::default()
        },
        payload: Bytes::from(vec![0u8; 1100]),
    };
    c.bench_function("cache/insert", |b| {
        let mut cache = PacketCache::new();
        let mut seq = 65_536u64;
        b.iter(|| {
            seq += 1;
            cache.insert(seq, start, black_box(&packet));
        })
    });
    c.bench_function("cache/nack_lookup", |b| {
        let mut cache = PacketCache::new();
        let mut log = SentLog::new();
        for i in 0..1024u64 {
            cache.insert(65_536 + i, start, &packet);
            log.record(SentEntry {
                layer: 2,
                ext_seq: 65_536 + i,
                rewrite: Rewrite {
                    seq: i as u16,
                    timestamp: 0,
                    picture_id: None,
                    tl0_pic_idx: None,
                    switched: false,
                },
            });
        }
        let now = start + Duration::from_millis(100);
        let mut i = 0u16;
        b.iter(|| {
            i = (i + 7) % 1024;
            let entry = log.lookup(black_box(i)).expect("logged");
            black_box(cache.get(entry.ext_seq, now).cloned())
        })
    });
}

criterion_group!(benches, cache);
criterion_main!(benches);
