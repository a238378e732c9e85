//! What the room reads from a publisher's SDP itself: which tracks an
//! offer still sends (the engine applies the offer; this tells the room
//! which published tracks ended with it).

/// Track ids (the second part of `a=msid`) of the media sections that
/// send: not rejected (port 0), direction `sendonly` or `sendrecv`.
pub fn sending_track_ids(sdp: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut section: Option<(bool, bool, Option<String>)> = None; // (port ok, sends, msid)
    let flush = |section: &mut Option<(bool, bool, Option<String>)>, ids: &mut Vec<String>| {
        if let Some((true, true, Some(id))) = section.take() {
            ids.push(id);
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(m) = line.strip_prefix("m=") {
            flush(&mut section, &mut ids);
            let port_ok = m.split_whitespace().nth(1).is_some_and(|p| p != "0");
            let media = m.starts_with("audio") || m.starts_with("video");
            // Sections send unless they say otherwise (RFC 4566 default).
            section = Some((port_ok && media, true, None));
            continue;
        }
        let Some((_, sends, msid)) = section.as_mut() else {
            continue;
        };
        match line {
            "a=sendonly" | "a=sendrecv" => *sends = true,
            "a=recvonly" | "a=inactive" => *sends = false,
            _ => {
                if let Some(value) = line.strip_prefix("a=msid:") {
                    if let Some(track) = value.split_whitespace().nth(1) {
                        *msid = Some(track.to_owned());
                    }
                }
            }
        }
    }
    flush(&mut section, &mut ids);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tracks_still_sent() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=msid:s1 mic\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=inactive\r\na=msid:s1 cam\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=msid:s1 screen\r\na=sendrecv\r\n\
            m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=sendonly\r\na=msid:s1 old\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:4\r\na=recvonly\r\n\
            m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:5\r\n";
        assert_eq!(sending_track_ids(sdp), vec!["mic", "screen"]);
        assert!(sending_track_ids("not sdp").is_empty());
        assert!(sending_track_ids("").is_empty());
    }
}
