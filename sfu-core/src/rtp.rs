//! Reading an RTP header where it lies (RFC 3550 5.1, header extensions in
//! the forms of RFC 8285), without allocating.
//!
//! The engine's parser copies every header extension into an allocation of
//! its own. The room's receive path needs the fixed fields, the header's
//! length (the SRTP AAD) and at most one extension's value (the
//! transport-wide sequence number); everything else of the extensions is
//! dropped before forwarding anyway.

use std::ops::Range;

/// The fields of one RTP header, and where its parts lie in the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpView {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// The packet ends in padding (its last byte counts the padding).
    pub padding: bool,
    /// Fixed header, CSRCs and the extension block.
    pub header_len: usize,
    csrc_count: u8,
    /// The extension block's profile and the bytes of its elements.
    extensions: Option<(u16, Range<usize>)>,
}

/// RFC 8285 4.2: one-byte header form.
const ONE_BYTE_PROFILE: u16 = 0xBEDE;
/// RFC 8285 4.3: two-byte header form (the low four bits are app bits).
const TWO_BYTE_PROFILE: u16 = 0x1000;

impl RtpView {
    /// The header of `packet`, if it is a well-formed RTP version 2 header
    /// that fits in it.
    pub fn parse(packet: &[u8]) -> Option<RtpView> {
        if packet.len() < 12 || packet[0] >> 6 != 2 {
            return None;
        }
        let csrc_count = packet[0] & 0x0F;
        let mut header_len = 12 + 4 * csrc_count as usize;
        let mut extensions = None;
        if packet[0] & 0x10 != 0 {
            let at = header_len;
            let fixed = packet.get(at..at + 4)?;
            let profile = u16::from_be_bytes([fixed[0], fixed[1]]);
            let words = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
            header_len = at + 4 + 4 * words;
            extensions = Some((profile, at + 4..header_len));
        }
        if header_len > packet.len() {
            return None;
        }
        Some(RtpView {
            marker: packet[1] & 0x80 != 0,
            payload_type: packet[1] & 0x7F,
            sequence_number: u16::from_be_bytes([packet[2], packet[3]]),
            timestamp: u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]),
            ssrc: u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]),
            padding: packet[0] & 0x20 != 0,
            header_len,
            csrc_count,
            extensions,
        })
    }

    /// The value of header extension `id` in `packet` (the packet this
    /// view was parsed from), in either form of RFC 8285.
    pub fn extension<'a>(&self, packet: &'a [u8], id: u8) -> Option<&'a [u8]> {
        let (profile, range) = self.extensions.clone()?;
        let block = packet.get(range)?;
        let two_byte = profile & 0xFFF0 == TWO_BYTE_PROFILE;
        if profile != ONE_BYTE_PROFILE && !two_byte {
            return None;
        }
        let mut at = 0;
        while at < block.len() {
            let (element_id, len, value_at) = if two_byte {
                let element_id = block[at];
                if element_id == 0 {
                    at += 1;
                    continue;
                }
                let len = *block.get(at + 1)? as usize;
                (element_id, len, at + 2)
            } else {
                if block[at] == 0 {
                    // Padding between elements.
                    at += 1;
                    continue;
                }
                let element_id = block[at] >> 4;
                if element_id == 15 {
                    // Reserved: stop reading (RFC 8285 4.2).
                    return None;
                }
                (element_id, (block[at] & 0x0F) as usize + 1, at + 1)
            };
            let value = block.get(value_at..value_at + len)?;
            if element_id == id {
                return Some(value);
            }
            at = value_at + len;
        }
        None
    }

    /// The header as the engine's type, without its extensions: what the
    /// room forwards. `packet` is the packet this view was parsed from.
    /// Padding is not marked, as the payload it goes with excludes it.
    pub fn header(&self, packet: &[u8]) -> rtc::rtp::Header {
        rtc::rtp::Header {
            version: 2,
            padding: false,
            extension: false,
            marker: self.marker,
            payload_type: self.payload_type,
            sequence_number: self.sequence_number,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
            csrc: packet[12..12 + 4 * self.csrc_count as usize]
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            ..Default::default()
        }
    }

    /// Where the payload of `packet` (decrypted, without SRTP tag) lies:
    /// after the header, before any padding. None if the padding count
    /// does not fit.
    pub fn payload_range(&self, packet: &[u8]) -> Option<Range<usize>> {
        let body = packet.len().checked_sub(self.header_len)?;
        if !self.padding {
            return Some(self.header_len..packet.len());
        }
        let padding = *packet.last()? as usize;
        if padding == 0 || padding > body {
            return None;
        }
        Some(self.header_len..packet.len() - padding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rtc::shared::marshal::{Marshal, Unmarshal};

    fn header(extensions: Vec<(u8, Vec<u8>)>, profile: u16, csrc: Vec<u32>) -> rtc::rtp::Header {
        let mut h = rtc::rtp::Header {
            version: 2,
            marker: true,
            payload_type: 96,
            sequence_number: 65_000,
            timestamp: 0xDEAD_BEEF,
            ssrc: 0x0102_0304,
            csrc,
            ..Default::default()
        };
        if !extensions.is_empty() {
            h.extension = true;
            h.extension_profile = profile;
            for (id, value) in extensions {
                h.set_extension(id, Bytes::from(value)).unwrap();
            }
        }
        h
    }

    /// What the engine's own parser reads, this view reads, in both
    /// extension forms, with CSRCs.
    #[test]
    fn reads_what_the_engine_s_parser_reads() {
        for (profile, ids) in [(ONE_BYTE_PROFILE, [1u8, 3, 14]), (0x1000, [1, 200, 255])] {
            let h = header(
                vec![
                    (ids[0], vec![0xAA]),
                    (ids[1], vec![0x12, 0x34]),
                    (ids[2], vec![7; 5]),
                ],
                profile,
                vec![11, 22],
            );
            let mut raw = h.marshal().unwrap().to_vec();
            raw.extend_from_slice(b"payload");
            let parsed = rtc::rtp::Header::unmarshal(&mut &raw[..]).unwrap();
            let view = RtpView::parse(&raw).unwrap();
            assert_eq!(view.header_len, raw.len() - 7);
            assert_eq!(view.sequence_number, 65_000);
            assert_eq!(view.timestamp, 0xDEAD_BEEF);
            assert_eq!(view.ssrc, 0x0102_0304);
            assert!(view.marker && !view.padding);
            for e in &parsed.extensions {
                assert_eq!(
                    view.extension(&raw, e.id),
                    Some(&e.payload[..]),
                    "id {}",
                    e.id
                );
            }
            assert_eq!(view.extension(&raw, ids[1]), Some(&[0x12, 0x34][..]));
            assert_eq!(view.extension(&raw, 9), None);
            let forwarded = view.header(&raw);
            assert_eq!(forwarded.csrc, vec![11, 22]);
            assert!(!forwarded.extension && forwarded.extensions.is_empty());
            assert_eq!(forwarded.payload_type, 96);
        }
    }

    #[test]
    fn refuses_headers_that_do_not_fit_and_reads_padding() {
        let h = header(vec![(1, vec![1, 2])], ONE_BYTE_PROFILE, vec![]);
        let raw = h.marshal().unwrap().to_vec();
        assert!(RtpView::parse(&raw).is_some());
        assert!(
            RtpView::parse(&raw[..raw.len() - 1]).is_none(),
            "extension cut"
        );
        assert!(RtpView::parse(&raw[..11]).is_none());
        let mut v1 = raw.clone();
        v1[0] = (v1[0] & 0x3F) | 0x40;
        assert!(RtpView::parse(&v1).is_none(), "version 1");
        // Twelve-byte header, padding bit, 3 payload bytes + 2 of padding.
        let mut padded = vec![0xA0, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9];
        padded.extend_from_slice(&[1, 2, 3, 0, 2]);
        let view = RtpView::parse(&padded).unwrap();
        assert_eq!(view.payload_range(&padded), Some(12..15));
        *padded.last_mut().unwrap() = 6;
        assert_eq!(
            view.payload_range(&padded),
            None,
            "more padding than payload"
        );
        // An extension element running past its block is not read.
        let mut cut = vec![0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 0xBE, 0xDE, 0, 1];
        cut.extend_from_slice(&[0x13, 1, 2, 3]);
        let view = RtpView::parse(&cut).unwrap();
        assert_eq!(view.extension(&cut, 1), None);
    }
}
