//! The synthetic media payload: enough of a VP8 payload descriptor for the
//! server to find frames and keyframes, then who sent it, its sequence
//! number and when, then a fixed fill so corruption shows.

/// The kind of the lowest simulcast layer's packets when it is not the
/// measured one; the next layer up is one more.
pub const LOWER_LAYER: u8 = 2;

/// Bytes before the fill.
pub const HEADER: usize = 16;
const FILL: u8 = 0xCD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The publisher's index in the run.
    pub index: u8,
    /// Per publisher and kind, from 1.
    pub seq: u32,
    /// 0 video (its measured simulcast layer, or its only one), 1 audio,
    /// [`LOWER_LAYER`] + layer for the other simulcast layers (0 q, 1 h,
    /// 2 f).
    pub kind: u8,
    pub keyframe: bool,
    pub frame_start: bool,
    /// Microseconds since the Unix epoch, by the sender's clock (the load
    /// tester runs senders and receivers on one machine).
    pub sent_us: u64,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A payload of `size` bytes (at least [`HEADER`]) carrying `tag`.
pub fn build(tag: Tag, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(HEADER));
    // VP8 descriptor: S bit on the first packet of a frame; frame tag: P bit
    // clear for keyframes.
    p.push(if tag.frame_start { 0x10 } else { 0x00 });
    p.push(if tag.keyframe { 0x10 } else { 0x11 });
    p.push(tag.index);
    p.extend_from_slice(&tag.seq.to_be_bytes());
    p.push(tag.kind);
    p.extend_from_slice(&tag.sent_us.to_be_bytes());
    p.resize(size.max(HEADER), FILL);
    p
}

/// The tag of a payload built by [`build`]; `None` if it was altered.
pub fn parse(p: &[u8]) -> Option<Tag> {
    if p.len() < HEADER || !all_fill(&p[HEADER..]) {
        return None;
    }
    Some(Tag {
        frame_start: p[0] & 0x10 != 0,
        keyframe: p[1] & 0x01 == 0,
        index: p[2],
        seq: u32::from_be_bytes([p[3], p[4], p[5], p[6]]),
        kind: p[7],
        sent_us: u64::from_be_bytes([p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]]),
    })
}

/// Whether every byte is [`FILL`]: compared a block at a time (a
/// vectorised compare, where a byte loop with an early exit is not), as
/// every packet received is checked whole.
fn all_fill(mut bytes: &[u8]) -> bool {
    const BLOCK: [u8; 64] = [FILL; 64];
    while bytes.len() >= BLOCK.len() {
        let (block, rest) = bytes.split_at(BLOCK.len());
        if block != BLOCK {
            return false;
        }
        bytes = rest;
    }
    bytes == &BLOCK[..bytes.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let tag = Tag {
            index: 3,
            seq: 70_000,
            kind: 0,
            keyframe: true,
            frame_start: true,
            sent_us: 1_700_000_000_123_456,
        };
        let mut p = build(tag, 200);
        assert_eq!(p.len(), 200);
        assert_eq!(parse(&p), Some(tag));
        p[150] ^= 1;
        assert_eq!(parse(&p), None);
        assert_eq!(parse(&[0u8; 5]), None);
    }

    /// A changed byte anywhere in the fill is seen, whatever the size,
    /// in a whole block or in the tail after the last one.
    #[test]
    fn corruption_anywhere_in_the_fill() {
        let tag = Tag {
            index: 1,
            seq: 9,
            kind: 1,
            keyframe: false,
            frame_start: false,
            sent_us: 5,
        };
        for size in [HEADER, HEADER + 1, 79, 80, 81, 143, 144, 145, 1100] {
            let clean = build(tag, size);
            assert_eq!(parse(&clean), Some(tag), "size {size}");
            for at in HEADER..size {
                let mut p = clean.clone();
                p[at] = 0;
                assert_eq!(parse(&p), None, "size {size}, byte {at}");
            }
        }
    }
}
