//! Publisher RTP as it arrives: the RTP and VP8 descriptor parsers, the
//! descriptor rewrite, and the forwarder deciding on a sequence of packets
//! (layers, gaps, reordering, keyframes, padding) built from the input.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rtc::shared::marshal::Unmarshal;
use sfu_core::forwarder::{Forwarder, PacketInfo, Verdict};

fuzz_target!(|data: &[u8]| {
    // Whole packets, as the engine would hand them over.
    let mut buf = data;
    if let Ok(packet) = rtc::rtp::Packet::unmarshal(&mut buf) {
        if let Some(d) = sfu_core::vp8::parse(&packet.payload) {
            assert!(d.header_len <= packet.payload.len());
            let mut copy = packet.payload.to_vec();
            sfu_core::vp8::rewrite(&mut copy, &d, 0x1234, 7);
            let again = sfu_core::vp8::parse(&copy).expect("a rewritten descriptor parses");
            assert_eq!(again.header_len, d.header_len);
            assert_eq!(again.keyframe, d.keyframe);
        }
    }
    // A stream of packet facts, five bytes each, through one forwarder.
    let start = Instant::now();
    let mut f = Forwarder::new(90_000);
    f.set_available(&[0, 1, 2]);
    let mut seqs = [1u64 << 20; 3];
    let mut last_out: Option<u16> = None;
    for (i, c) in data.chunks_exact(5).enumerate() {
        let layer = c[0] % 3;
        let l = layer as usize;
        // Mostly forward, sometimes back (reordering) or far ahead (loss).
        let step = i16::from_be_bytes([c[1], c[2]]) % 64;
        seqs[l] = seqs[l].saturating_add_signed(step as i64).max(1);
        let info = PacketInfo {
            layer,
            ext_seq: seqs[l],
            timestamp: (seqs[l] as u32).wrapping_mul(3000),
            capture_ntp: None,
            keyframe: c[3] & 1 != 0,
            padding_only: c[3] & 2 != 0,
            picture_id: (c[3] & 4 != 0).then_some((seqs[l] & 0x7FFF) as u16),
            tl0_pic_idx: (c[3] & 8 != 0).then_some(seqs[l] as u8),
            tid: (c[3] & 16 != 0).then_some(c[4] % 3),
            frame_start: c[3] & 32 != 0,
        };
        if c[4] & 0x80 != 0 {
            f.set_preference(sfu_core::forwarder::Preference::MaxLayer(c[4] % 3));
        }
        let now = start + Duration::from_millis(i as u64 * 5);
        if let Verdict::Forward(r) = f.decide(&info, now) {
            if r.switched {
                assert!(info.keyframe, "a switch happens only on a keyframe");
            }
            last_out = Some(r.seq);
        }
    }
    let _ = last_out;
});
