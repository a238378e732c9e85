//! The VP8 RTP payload descriptor (RFC 7741 §4.2) as the forwarder needs
//! it: where a frame starts, whether it is a keyframe (and its size), and
//! the picture id / TL0PICIDX fields to rewrite across layer switches.

/// What one packet's descriptor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp8Descriptor {
    /// Bytes of descriptor before the VP8 payload.
    pub header_len: usize,
    /// Picture id and whether it is the 15-bit form.
    pub picture_id: Option<(u16, bool)>,
    /// Byte offset of the picture id field.
    pub picture_id_at: usize,
    pub tl0_pic_idx: Option<u8>,
    pub tl0_at: usize,
    /// Temporal layer index, when present.
    pub tid: Option<u8>,
    /// First packet of a frame (S=1, partition 0).
    pub frame_start: bool,
    /// First packet of a keyframe.
    pub keyframe: bool,
    /// Width and height, from a keyframe's first packet.
    pub dimensions: Option<(u16, u16)>,
}

/// Parses a VP8 payload's descriptor; `None` if it is truncated or
/// malformed.
pub fn parse(payload: &[u8]) -> Option<Vp8Descriptor> {
    let first = *payload.first()?;
    let mut d = Vp8Descriptor::default();
    let mut at = 1;
    let extended = first & 0x80 != 0;
    let start = first & 0x10 != 0;
    let partition = first & 0x07;
    if extended {
        let x = *payload.get(at)?;
        at += 1;
        let (i, l, t, k) = (x & 0x80 != 0, x & 0x40 != 0, x & 0x20 != 0, x & 0x10 != 0);
        if i {
            let b = *payload.get(at)?;
            d.picture_id_at = at;
            if b & 0x80 != 0 {
                let b2 = *payload.get(at + 1)?;
                d.picture_id = Some(((((b & 0x7F) as u16) << 8) | b2 as u16, true));
                at += 2;
            } else {
                d.picture_id = Some(((b & 0x7F) as u16, false));
                at += 1;
            }
        }
        if l {
            d.tl0_at = at;
            d.tl0_pic_idx = Some(*payload.get(at)?);
            at += 1;
        }
        if t || k {
            let b = *payload.get(at)?;
            if t {
                d.tid = Some(b >> 6);
            }
            at += 1;
        }
    }
    d.header_len = at;
    d.frame_start = start && partition == 0;
    if d.frame_start {
        // VP8 frame tag: bit 0 of the first byte is 0 for keyframes.
        let tag = *payload.get(at)?;
        d.keyframe = tag & 0x01 == 0;
        if d.keyframe {
            let body = payload.get(at + 3..at + 10);
            if let Some(b) = body {
                if b[0..3] == [0x9D, 0x01, 0x2A] {
                    let w = u16::from_le_bytes([b[3], b[4]]) & 0x3FFF;
                    let h = u16::from_le_bytes([b[5], b[6]]) & 0x3FFF;
                    d.dimensions = Some((w, h));
                }
            }
        }
    }
    Some(d)
}

/// Writes a new picture id and TL0PICIDX into a payload whose descriptor
/// `d` describes (fields it does not carry are left alone).
pub fn rewrite(payload: &mut [u8], d: &Vp8Descriptor, picture_id: u16, tl0_pic_idx: u8) {
    if let Some((_, long)) = d.picture_id {
        if long {
            payload[d.picture_id_at] = 0x80 | ((picture_id >> 8) as u8 & 0x7F);
            payload[d.picture_id_at + 1] = picture_id as u8;
        } else {
            payload[d.picture_id_at] = picture_id as u8 & 0x7F;
        }
    }
    if d.tl0_pic_idx.is_some() {
        payload[d.tl0_at] = tl0_pic_idx;
    }
}

/// Builds a descriptor + frame start for tests and benchmarks: 15-bit
/// picture id, TL0PICIDX, TID; a keyframe carries `dims`.
pub fn build_payload(
    picture_id: u16,
    tl0: u8,
    tid: u8,
    keyframe: bool,
    dims: (u16, u16),
    body: usize,
) -> Vec<u8> {
    let mut p = vec![
        0x90, // X, S, partition 0
        0xE0, // I, L, T
        0x80 | ((picture_id >> 8) as u8 & 0x7F),
        picture_id as u8,
        tl0,
        tid << 6,
    ];
    if keyframe {
        p.extend_from_slice(&[0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A]);
        p.extend_from_slice(&dims.0.to_le_bytes());
        p.extend_from_slice(&dims.1.to_le_bytes());
    } else {
        p.extend_from_slice(&[0x11, 0x02, 0x00]);
    }
    p.resize(p.len() + body, 0xAB);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keyframe_with_all_fields() {
        let p = build_payload(0x1234, 7, 2, true, (1280, 720), 10);
        let d = parse(&p).unwrap();
        assert_eq!(d.picture_id, Some((0x1234, true)));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert_eq!(d.tid, Some(2));
        assert!(d.frame_start && d.keyframe);
        assert_eq!(d.dimensions, Some((1280, 720)));
        assert_eq!(d.header_len, 6);
    }

    #[test]
    fn parses_delta_frames_continuations_and_short_forms() {
        let p = build_payload(5, 1, 0, false, (0, 0), 10);
        let d = parse(&p).unwrap();
        assert!(d.frame_start && !d.keyframe && d.dimensions.is_none());
        // Continuation packet: S=0.
        let mut c = p.clone();
        c[0] = 0x80;
        let d = parse(&c).unwrap();
        assert!(!d.frame_start && !d.keyframe);
        // 7-bit picture id, no L/T.
        let short = [0x90, 0x80, 0x05, 0x10, 0x02, 0x00];
        let d = parse(&short).unwrap();
        assert_eq!(d.picture_id, Some((5, false)));
        assert_eq!(d.tl0_pic_idx, None);
        assert!(d.keyframe);
        // No extension byte at all.
        let d = parse(&[0x10, 0x11]).unwrap();
        assert_eq!(d.header_len, 1);
        assert!(d.frame_start && !d.keyframe);
    }

    #[test]
    fn truncated_descriptors_are_rejected() {
        for bad in [
            &[][..],
            &[0x90],
            &[0x90, 0x80],
            &[0x90, 0x80, 0x80],
            &[0x90, 0x40],
            &[0x90, 0x20],
            &[0x90, 0x00],
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rewrite_changes_only_picture_id_and_tl0() {
        let mut p = build_payload(0x7FFF, 255, 1, false, (0, 0), 4);
        let d = parse(&p).unwrap();
        let before = p.clone();
        rewrite(&mut p, &d, 3, 9);
        let r = parse(&p).unwrap();
        assert_eq!(r.picture_id, Some((3, true)));
        assert_eq!(r.tl0_pic_idx, Some(9));
        assert_eq!(r.tid, Some(1));
        assert_eq!(p[d.header_len..], before[d.header_len..]);
        let mut s = [0x90u8, 0x80, 0x05, 0x11];
        let d = parse(&s).unwrap();
        rewrite(&mut s, &d, 200, 0);
        assert_eq!(parse(&s).unwrap().picture_id, Some((200 & 0x7F, false)));
    }
}
