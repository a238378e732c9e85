//! Cost of classifying a datagram on the shared media port.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sfu_core::demux::binding_request_ufrag;

fn binding_request() -> Vec<u8> {
    let username = b"0123456789abcdef:clientufrag";
    let mut msg = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    msg.extend_from_slice(&[7u8; 12]);
    msg.extend_from_slice(&[0x00, 0x06, 0x00, username.len() as u8]);
    msg.extend_from_slice(username);
    while msg.len() % 4 != 0 {
        msg.push(0);
    }
    let body = (msg.len() - 20) as u16;
    msg[2..4].copy_from_slice(&body.to_be_bytes());
    msg
}

fn demux(c: &mut Criterion) {
    let stun = binding_request();
    let rtp = vec![0x80u8; 1200];
    c.bench_function("demux/stun_binding_request", |b| {
        b.iter(|| binding_request_ufrag(black_box(&stun)))
    });
    c.bench_function("demux/rtp_passthrough", |b| {
        b.iter(|| binding_request_ufrag(black_box(&rtp)))
    });
}

criterion_group!(benches, demux);
criterion_main!(benches);
