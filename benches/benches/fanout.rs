//! One publisher packet fanned out to N subscribers through the whole
//! sans-I/O path: SRTP decrypt of the publisher's datagram, the forwarding
//! decision, rewrite, the engine's send path and SRTP encryption for every
//! subscriber. Peers are in-memory `rtc` clients on a virtual clock; only
//! the server side (`Room::handle_datagram` + draining its output) is timed.
//!
//! `FANOUT_N=20,100` sets the room sizes (default 10, 100 and 1000); each
//! room is built before its measurement, so a smaller set starts sooner
//! (under `valgrind --tool=callgrind`, say).

#[path = "../../sfu-core/tests/common/mod.rs"]
#[allow(clippy::all)]
mod common;

use std::time::{Duration, Instant};

use common::Harness;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sfu_core::Output;

/// A room with one publisher and `n` connected subscribers.
fn room_with(n: usize) -> (Harness, usize) {
    let mut h = Harness::new();
    let a = h.join("publisher", true);
    let subs: Vec<usize> = (0..n).map(|i| h.join(&format!("s{i}"), false)).collect();
    let deadline = Duration::from_secs(30);
    let mut waited = Duration::ZERO;
    while !subs.iter().all(|s| h.received_from(*s, a).0 > 0) {
        assert!(waited < deadline, "subscribers did not connect");
        h.send_media(a);
        h.run_for(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    }
    (h, a)
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let sizes: Vec<usize> = match std::env::var("FANOUT_N") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("FANOUT_N: room sizes, comma-separated")
            })
            .collect(),
        Err(_) => vec![10, 100, 1000],
    };
    for n in sizes {
        let (mut h, a) = room_with(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                // The publisher's encrypted datagrams, made outside the timing.
                let datagrams = h.capture_media(a, iters as usize);
                let from = h.clients[a].pub_addr;
                let mut now = h.now;
                #[allow(clippy::disallowed_methods)]
                let start = Instant::now();
                for d in datagrams {
                    now += Duration::from_micros(100);
                    h.room.handle_datagram(now, from, d);
                    loop {
                        match h.room.poll_output() {
                            Output::Transmit(t) => {
                                criterion::black_box(t.contents.len());
                            }
                            Output::Timeout(_) => break,
                            _ => {}
                        }
                    }
                }
                let elapsed = start.elapsed();
                h.now = now;
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
