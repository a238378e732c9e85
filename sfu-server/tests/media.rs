//! The real server on loopback with `webrtc`-crate clients publishing
//! synthetic VP8 + Opus and subscribing to each other.

mod common;

use std::time::Duration;

use common::{eventually, start_server, wait_for, Client, View};

const KINDS: [&str; 2] = ["video", "audio"];

/// Sends media from every publisher until every subscriber receives every
/// other publisher's audio and video.
async fn warm_up(publishers: &mut [&mut Client], subscribers: &[View]) {
    let sids: Vec<String> = publishers.iter().map(|p| p.sid.clone()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    // Frames go out at a steady cadence, as a camera's would.
    let mut frames = tokio::time::interval(Duration::from_millis(20));
    loop {
        frames.tick().await;
        for p in publishers.iter_mut() {
            p.send_media().await;
        }
        let all = subscribers.iter().all(|s| {
            sids.iter()
                .filter(|p| **p != s.sid)
                .all(|p| KINDS.iter().all(|k| !s.received(p, k).is_empty()))
        });
        if all {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "media did not start flowing within 15 s"
        );
    }
}

/// Sends `n` packets per track from each publisher, 10 ms apart, and
/// asserts every subscriber got at least 95% of each with payloads intact.
async fn measure(publishers: &mut [&mut Client], subscribers: &[View], n: u32) {
    let starts: Vec<(String, String, u32)> = publishers
        .iter()
        .map(|p| (p.sid.clone(), p.identity.clone(), p.seq_now()))
        .collect();
    let mut frames = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..n {
        frames.tick().await;
        for p in publishers.iter_mut() {
            p.send_media().await;
        }
    }
    let got = |s: &View, sid: &str, kind: &str, start: u32| {
        s.received(sid, kind).iter().filter(|q| **q > start).count() as u32
    };
    let enough = |s: &View| {
        starts
            .iter()
            .filter(|(sid, _, _)| *sid != s.sid)
            .all(|(sid, _, start)| KINDS.iter().all(|k| got(s, sid, k, *start) >= n * 95 / 100))
    };
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        wait_for(Duration::from_secs(10), "95% of packets", || {
            subscribers.iter().all(enough)
        }),
    )
    .await;
    for s in subscribers {
        for (sid, who, start) in &starts {
            if *sid != s.sid {
                for k in KINDS {
                    eprintln!(
                        "{} <- {who} {k}: {}/{n}",
                        s.identity,
                        got(s, sid, k, *start)
                    );
                }
            }
        }
        assert_eq!(
            s.inbox.lock().unwrap().corrupted,
            0,
            "corrupted payloads at {}",
            s.identity
        );
    }
    result.expect("every subscriber received at least 95% of every publisher's packets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_exchange_media_late_joiner_receives_and_leave_is_seen() {
    let server = start_server().await;
    let room = "media-test";
    let mut a = Client::join(&server, room, "alice", 1, true).await;
    let mut b = Client::join(&server, room, "bob", 2, true).await;
    let mut c = Client::join(&server, room, "carol", 3, true).await;
    let views = [a.view(), b.view(), c.view()];

    warm_up(&mut [&mut a, &mut b, &mut c], &views).await;
    measure(&mut [&mut a, &mut b, &mut c], &views, 200).await;

    // A late joiner is told about everyone and receives everyone.
    let d = Client::join(&server, room, "dave", 4, false).await;
    let joined = d.view().messages_of("joined");
    assert_eq!(joined[0]["participants"].as_array().unwrap().len(), 3);
    for p in joined[0]["participants"].as_array().unwrap() {
        assert_eq!(p["tracks"].as_array().unwrap().len(), 2, "{p}");
    }
    warm_up(&mut [&mut a, &mut b, &mut c], &[d.view()]).await;
    measure(&mut [&mut a, &mut b, &mut c], &[d.view()], 100).await;

    // Carol leaves: the others see her two tracks unpublished and her leave.
    let carol = c.sid.clone();
    c.send(serde_json::json!({"type": "leave"}));
    for other in [a.view(), b.view(), d.view()] {
        wait_for(Duration::from_secs(5), "participantLeft", || {
            other.has_message(|m| m["type"] == "participantLeft" && m["sid"] == carol.as_str())
        })
        .await;
        let unpublished = other
            .messages_of("trackUnpublished")
            .iter()
            .filter(|m| m["participantSid"] == carol.as_str())
            .count();
        assert_eq!(unpublished, 2, "{} saw carol's tracks go", other.identity);
    }
    // Those who stayed keep receiving each other.
    let stayed = [a.view(), b.view(), d.view()];
    measure(&mut [&mut a, &mut b], &stayed, 50).await;
    let carol_view = c.view();
    c.close().await;

    // The server's counters account for at least what the clients received.
    let received: usize = [a.view(), b.view(), carol_view, d.view()]
        .iter()
        .map(|v| {
            v.inbox
                .lock()
                .unwrap()
                .tracks
                .values()
                .map(|t| t.seqs.len())
                .sum::<usize>()
        })
        .sum();
    let base = server.base_url();
    eventually(Duration::from_secs(5), || async {
        let m = loadtest::metrics::scrape(&base)
            .await
            .map_err(|e| e.to_string())?;
        let forwarded = m["sfu_rtp_packets_forwarded_total"] as usize;
        let by_room = m["sfu_rtp_packets_encrypted_by_room_total"] as usize;
        let sent = m["sfu_datagrams_sent_total"] as usize;
        let rtp_in = m["sfu_rtp_packets_received_total"] as usize;
        let received_by_room = m["sfu_rtp_packets_received_by_room_total"] as usize;
        assert!(m.contains_key("sfu_rtp_packets_dropped_total{reason=\"not_negotiated\"}"));
        // Forwarded media is encrypted by the room, not the engine, and
        // every forwarded packet left as a datagram of its own. Inbound
        // media is decrypted by the room too, once the engine has seen
        // each stream's first packet.
        (forwarded >= received
            && by_room * 10 >= forwarded * 9
            && sent >= forwarded
            && received_by_room * 10 >= rtp_in * 9
            && received_by_room <= rtp_in)
            .then_some(())
            .ok_or(format!(
                "metrics report {forwarded} forwarded ({by_room} encrypted by the room, \
                 {sent} datagrams sent), {rtp_in} received ({received_by_room} decrypted \
                 by the room), clients received {received}"
            ))
    })
    .await;
}

/// The media port answers a bare STUN binding request (no USERNAME, as a
/// client asks a STUN server) with the address it came from.
#[tokio::test]
async fn the_media_port_tells_clients_their_reflexive_address() {
    let server = common::start_server().await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = udp.local_addr().unwrap();
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(b"abcdefghijkl");
    udp.send_to(&request, server.media_addr).await.unwrap();
    let mut buf = [0u8; 128];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    assert_eq!(from, server.media_addr);
    let response = &buf[..n];
    assert_eq!(&response[..2], &[0x01, 0x01], "binding success");
    assert_eq!(&response[8..20], b"abcdefghijkl");
    assert_eq!(&response[20..22], &[0x00, 0x20], "XOR-MAPPED-ADDRESS");
    let port = u16::from_be_bytes([response[26], response[27]]) ^ 0x2112;
    let ip: Vec<u8> = response[28..32]
        .iter()
        .zip([0x21, 0x12, 0xA4, 0x42])
        .map(|(b, m)| b ^ m)
        .collect();
    assert_eq!(port, me.port());
    assert_eq!(ip, vec![127, 0, 0, 1]);
}
