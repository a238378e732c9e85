//! A room with in-memory client peers on a virtual clock: media flows
//! between publishers and subscribers, late joiners receive, leavers'
//! tracks are removed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::Harness;
use sfu_core::signal::{ServerMessage, Target};

/// Sends `n` packets per track from each publisher, 20 ms apart.
fn pump(h: &mut Harness, publishers: &[usize], n: usize) {
    for _ in 0..n {
        for &p in publishers {
            h.send_media(p);
        }
        h.run_for(Duration::from_millis(20));
    }
}

/// An `updateSubscription` for quality and pause only.
fn wish(
    track_sid: String,
    quality: Option<sfu_core::signal::Quality>,
    paused: Option<bool>,
) -> sfu_core::signal::ClientMessage {
    sfu_core::signal::ClientMessage::UpdateSubscription {
        track_sid,
        quality,
        max_width: None,
        max_height: None,
        max_fps: None,
        paused,
    }
}

fn connected(h: &Harness, to: usize, from: usize) -> bool {
    let (v, a) = h.received_from(to, from);
    v > 0 && a > 0
}

/// Pumps media from `publishers` until every (to, from) pair receives
/// both audio and video, failing after 10 s of virtual time.
fn connect_all(h: &mut Harness, publishers: &[usize], pairs: &[(usize, usize)]) {
    let mut waited = Duration::ZERO;
    while !pairs.iter().all(|(to, from)| connected(h, *to, *from)) {
        assert!(waited < Duration::from_secs(10), "no media within 10 s");
        pump(h, publishers, 1);
        waited += Duration::from_millis(20);
    }
}

#[test]
fn media_flows_between_two_peers() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", true);
    // Connect: send media until each side sees the other.
    connect_all(&mut h, &[a, b], &[(a, b), (b, a)]);
    let before = (h.received_from(b, a), h.received_from(a, b));
    pump(&mut h, &[a, b], 100);
    let after = (h.received_from(b, a), h.received_from(a, b));
    // Once connected, every packet arrives: no loss on an in-memory path.
    assert_eq!(after.0 .0 - before.0 .0, 100, "bob video from alice");
    assert_eq!(after.0 .1 - before.0 .1, 100, "bob audio from alice");
    assert_eq!(after.1 .0 - before.1 .0, 100, "alice video from bob");
    assert_eq!(after.1 .1 - before.1 .1, 100, "alice audio from bob");
    let stats = h.room.stats();
    assert!(stats.rtp_forwarded >= 400, "{stats:?}");
    // Once DTLS is up, the room encrypts forwarded media itself; the
    // clients above decrypted every packet.
    assert!(
        stats.rtp_sent_by_room >= 400 && stats.rtp_sent_by_room <= stats.rtp_forwarded,
        "{stats:?}"
    );
    // After each stream's first packets (through the engine, which
    // announces the stream), the room decrypts inbound media itself.
    assert!(
        stats.rtp_received_by_room >= 400 && stats.rtp_received_by_room <= stats.rtp_in,
        "{stats:?}"
    );
    // The server's receiver reports cover those packets: its report
    // interceptor saw them although the engine did not decrypt them.
    let before_reports = h.clients[a].receiver_reports.len();
    h.run_for(Duration::from_secs(2));
    let video_ssrc = h.clients[a].senders[0].1;
    let last_sent = h.clients[a].seq;
    let reported = h.clients[a].receiver_reports[before_reports..]
        .iter()
        .filter(|(ssrc, _)| *ssrc == video_ssrc)
        .map(|(_, highest)| *highest as u16)
        .next_back();
    assert_eq!(
        reported,
        Some(last_sent),
        "{:?}",
        h.clients[a].receiver_reports
    );
    // Each publisher's own media never comes back to it.
    assert_eq!(h.received_from(a, a), (0, 0));
}

#[test]
fn late_joiner_receives_existing_tracks() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let c = h.join("carol", false);
    // Carol's joined message lists alice's tracks.
    let joined = h.clients[c]
        .signals
        .iter()
        .find_map(|s| match s {
            ServerMessage::Joined { participants, .. } => Some(participants.clone()),
            _ => None,
        })
        .expect("joined");
    let alice = joined
        .iter()
        .find(|p| p.identity == "alice")
        .expect("alice listed");
    assert_eq!(alice.tracks.len(), 2);
    connect_all(&mut h, &[a], &[(c, a)]);
}

#[test]
fn leaver_tracks_are_removed_from_others() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", true);
    connect_all(&mut h, &[a, b], &[(a, b), (b, a)]);
    let alice_sid = h.client_sid(a);
    let offers_before = count_offers(&h, b);
    h.leave(a);
    let signals = &h.clients[b].signals;
    let unpublished = signals
        .iter()
        .filter(|s| matches!(s, ServerMessage::TrackUnpublished { participant_sid, .. } if *participant_sid == alice_sid))
        .count();
    assert_eq!(unpublished, 2, "both of alice's tracks unpublished");
    assert!(signals
        .iter()
        .any(|s| matches!(s, ServerMessage::ParticipantLeft { sid, .. } if *sid == alice_sid)));
    // Bob's subscriber connection is renegotiated without alice's tracks.
    assert!(count_offers(&h, b) > offers_before);
    assert_eq!(h.removed, vec![h.clients[a].id]);
    assert_eq!(h.room.participant_count(), 1);
    assert!(h.room.participants()[0].identity == "bob");
}

/// The ICE ufrag of the last subscriber offer client `i` received.
fn last_subscriber_ufrag(h: &Harness, i: usize) -> Option<String> {
    h.clients[i].signals.iter().rev().find_map(|s| match s {
        ServerMessage::Offer {
            target: Target::Subscriber,
            sdp,
        } => sdp
            .lines()
            .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
            .map(|u| u.trim().to_owned()),
        _ => None,
    })
}

/// A subscriber whose path to the server goes silent gets a new offer with
/// fresh ICE credentials once the server's connection fails.
#[test]
fn a_failed_subscriber_connection_is_restarted_by_the_server() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let ufrag = last_subscriber_ufrag(&h, b).expect("an offer");
    let offers = count_offers(&h, b);
    // Nothing from bob's subscriber connection reaches the server.
    let sub_addr = h.clients[b].sub_addr;
    h.uplink_loss.insert(sub_addr, 1.0);
    // Alice keeps publishing, 50 packets a second of virtual time.
    let mut waited = 0;
    while count_offers(&h, b) == offers {
        assert!(waited < 60 * 50, "no new subscriber offer within 60 s");
        pump(&mut h, &[a], 1);
        waited += 1;
    }
    let restarted = last_subscriber_ufrag(&h, b).expect("an offer");
    assert_ne!(restarted, ufrag, "fresh ICE credentials");
    eprintln!("restarted after {:.1} s of silence", waited as f64 / 50.0);
    // The server side of the restart is the one a client's `restartIce`
    // asks for; sfu-server's reconnect test carries media across it with
    // real clients.
}

/// A STUN binding request with `username` and no valid integrity, as
/// anyone who has seen the ufrag can send from any address.
fn forged_check(username: &str) -> BytesMut {
    let mut attr = Vec::new();
    attr.extend_from_slice(&0x0006u16.to_be_bytes());
    attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attr.extend_from_slice(username.as_bytes());
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    let mut m = BytesMut::new();
    m.extend_from_slice(&0x0001u16.to_be_bytes());
    m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[7u8; 12]);
    m.extend_from_slice(&attr);
    m
}

/// Checks naming a connection's ufrag from ever more source addresses
/// leave the room's routes bounded, and media goes on reaching the client
/// at the address it uses.
#[test]
fn checks_from_ever_more_addresses_keep_routes_bounded() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let ufrag = last_subscriber_ufrag(&h, b).expect("an offer");
    let routed = h.room.routed_addresses();
    let spoofed: usize = 300;
    let sources: Vec<SocketAddr> = (0..spoofed)
        .map(|i| {
            format!("10.9.{}.{}:{}", i / 200, i % 200, 20_000 + i)
                .parse()
                .unwrap()
        })
        .collect();
    for &from in &sources {
        let now = h.now;
        h.room
            .handle_datagram(now, from, forged_check(&format!("{ufrag}:mallory")));
    }
    let (before, _) = h.received_from(b, a);
    pump(&mut h, &[a], 50);
    let routes = h.room.routed_addresses();
    assert!(
        routes < routed + sfu_core::MAX_ADDRS_PER_CONN,
        "{routes} routes, {routed} before the checks"
    );
    let evicted = spoofed + 1 - sfu_core::MAX_ADDRS_PER_CONN;
    assert_eq!(h.room.stats().addresses_unrouted as usize, evicted);
    // The media socket is told of each, oldest first.
    assert_eq!(h.unrouted.len(), evicted);
    assert_eq!(h.unrouted[..], sources[..evicted]);
    // Bob's own address was never given up: alice's video reaches him.
    let (after, _) = h.received_from(b, a);
    assert!(
        after >= before + 45,
        "bob received {} packets",
        after - before
    );
}

/// A publisher's sender reports are decrypted by the room itself, and the
/// receiver reports it gets back echo them (its round-trip time).
#[test]
fn publisher_sender_reports_reach_the_room_and_are_echoed() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    connect_all(&mut h, &[a], &[]);
    let rtcp_before = h.room.stats().rtcp_received_by_room;
    let echoes_before = h.clients[a].report_echoes.len();
    pump(&mut h, &[a], 150);
    // Alice is alone: all the RTCP the room decrypted is hers.
    let rtcp = h.room.stats().rtcp_received_by_room - rtcp_before;
    assert!(
        rtcp >= 2,
        "{rtcp} of alice's RTCP packets decrypted by the room"
    );
    let echoes = &h.clients[a].report_echoes[echoes_before..];
    assert!(
        echoes.iter().any(|lsr| *lsr != 0),
        "receiver reports echo no sender report: {echoes:?}"
    );
}

/// A client that checks consent less often than the engine waits before
/// calling it disconnected (5 s; RFC 7675 has clients check every 4-6 s,
/// and a lossy path loses checks) goes on receiving between its checks.
#[test]
fn media_flows_through_the_gaps_between_consent_checks() {
    let mut h = Harness::new();
    h.client_keepalive = Some(Duration::from_secs(7));
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let (before, _) = h.received_from(b, a);
    let offers = count_offers(&h, b);
    let dropped = h.room.stats().dropped(sfu_core::DropReason::NotConnected);
    // 20 s of virtual time: two gaps of 7 s.
    pump(&mut h, &[a], 1000);
    let (after, _) = h.received_from(b, a);
    assert!(
        after >= before + 950,
        "bob received {} of 1000",
        after - before
    );
    assert_eq!(
        h.room.stats().dropped(sfu_core::DropReason::NotConnected),
        dropped,
        "dropped for a connection not up"
    );
    assert_eq!(count_offers(&h, b), offers, "no ICE restart");
}

fn count_offers(h: &Harness, i: usize) -> usize {
    h.clients[i]
        .signals
        .iter()
        .filter(|s| matches!(s, ServerMessage::Offer { .. }))
        .count()
}

#[test]
fn simulcast_publisher_reaches_each_subscriber_as_one_layer() {
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let c = h.join("carol", false);
    connect_all(&mut h, &[a], &[(c, a)]);
    // Settled (a subscriber may start on a lower layer's keyframe and
    // climb), each gets exactly one layer: the highest, by default.
    pump(&mut h, &[a], 30);
    let before = h.received_from(b, a);
    let (skip_b, skip_c) = (
        h.video_payloads_from(b, a).len(),
        h.video_payloads_from(c, a).len(),
    );
    pump(&mut h, &[a], 100);
    let after = h.received_from(b, a);
    // One layer's 100 packets, not three layers' 300.
    assert_eq!(after.0 - before.0, 100);
    assert_eq!(after.1 - before.1, 100);
    assert_eq!(layers_since(&h, b, a, skip_b).0, vec![2], "bob's layers");
    assert_eq!(layers_since(&h, c, a, skip_c).0, vec![2], "carol's layers");
    assert!(
        layers_since(&h, b, a, 0).1,
        "a switch landed on a delta frame"
    );
    let not_selected = h
        .room
        .stats()
        .dropped(sfu_core::DropReason::LayerNotSelected);
    assert!(not_selected >= 200, "{not_selected}");
    // The announced track says it is simulcast.
    let published = h.clients[b].signals.iter().find_map(|s| match s {
        ServerMessage::TrackPublished { track, .. }
            if track.kind == sfu_core::signal::TrackKind::Video =>
        {
            Some(track.clone())
        }
        _ => None,
    });
    assert!(published.expect("video announced").simulcast);
}

#[test]
fn subscriber_keyframe_request_reaches_publisher_throttled() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    // Let the request made when bob's track was negotiated age out.
    h.run_for(Duration::from_secs(1));
    let video_ssrc = h.clients[a].senders[0].1;
    let before = h.clients[a].keyframe_requests.len();
    let rtcp_before = h.room.stats().rtcp_received_by_room;
    h.send_pli(b, a);
    let got = &h.clients[a].keyframe_requests[before..];
    assert_eq!(got, &[video_ssrc], "PLI names alice's video SSRC");
    // Decrypted by the room itself, not the engine.
    assert!(h.room.stats().rtcp_received_by_room > rtcp_before);
    // A burst of requests within the throttle window reaches alice once.
    for _ in 0..5 {
        h.send_pli(b, a);
    }
    assert_eq!(h.clients[a].keyframe_requests.len(), before + 1);
    // After the window another request goes through.
    h.run_for(Duration::from_millis(600));
    h.send_pli(b, a);
    assert_eq!(h.clients[a].keyframe_requests.len(), before + 2);
}

#[test]
fn joins_and_leaves_release_connections() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    for round in 0..10 {
        let b = h.join(&format!("guest{round}"), true);
        connect_all(&mut h, &[a, b], &[(a, b), (b, a)]);
        assert_eq!(h.room.connection_count(), 4);
        h.leave(b);
        assert_eq!(h.room.connection_count(), 2);
    }
    // Slots of closed connections are reused, not accumulated.
    assert!(
        h.room.connection_slots() <= 4,
        "{} slots",
        h.room.connection_slots()
    );
    h.leave(a);
    assert_eq!(h.room.connection_count(), 0);
    assert!(h.room.is_empty());
}

/// Slots (layers) of the video packets received since `from_index`, and
/// whether every change of layer happened on a keyframe.
fn layers_since(h: &Harness, to: usize, from: usize, skip: usize) -> (Vec<u8>, bool) {
    let payloads = h.video_payloads_from(to, from);
    let mut clean = true;
    for pair in payloads.windows(2) {
        if pair[0][common::PAYLOAD_SLOT] != pair[1][common::PAYLOAD_SLOT] && pair[1][5] != 0x10 {
            clean = false;
        }
    }
    let mut layers: Vec<u8> = payloads[skip.min(payloads.len())..]
        .iter()
        .map(|p| p[common::PAYLOAD_SLOT])
        .collect();
    layers.sort_unstable();
    layers.dedup();
    (layers, clean)
}

#[test]
fn subscribers_get_the_layer_they_ask_for_switching_only_on_keyframes() {
    use sfu_core::signal::Quality;
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    let c = h.join("carol", false);
    connect_all(&mut h, &[a], &[(b, a), (c, a)]);
    let track = h.video_track_sid(a);
    let ask = |quality| wish(track.clone(), Some(quality), None);
    h.signal(b, ask(Quality::Low));
    h.signal(c, ask(Quality::High));
    // The switch waits for a keyframe, which the request brings at once.
    let switch_started = h.now;
    let mut switched_after = None;
    for _ in 0..100 {
        pump(&mut h, &[a], 1);
        let last = h
            .video_payloads_from(b, a)
            .last()
            .map(|p| p[common::PAYLOAD_SLOT]);
        if switched_after.is_none() && last == Some(0) {
            switched_after = Some(h.now - switch_started);
        }
    }
    let switched_after = switched_after.expect("bob moved to the low layer");
    assert!(
        switched_after <= Duration::from_millis(100),
        "switch took {switched_after:?}"
    );
    let skip_b = h.video_payloads_from(b, a).len();
    let skip_c = h.video_payloads_from(c, a).len();
    pump(&mut h, &[a], 60);
    assert_eq!(
        layers_since(&h, b, a, skip_b).0,
        vec![0],
        "bob gets only low"
    );
    assert_eq!(
        layers_since(&h, c, a, skip_c).0,
        vec![2],
        "carol gets only high"
    );
    // Now up: bob asks for medium.
    h.signal(b, ask(Quality::Medium));
    pump(&mut h, &[a], 10);
    let skip_b = h.video_payloads_from(b, a).len();
    pump(&mut h, &[a], 30);
    assert_eq!(
        layers_since(&h, b, a, skip_b).0,
        vec![1],
        "bob moved up to medium"
    );
    // Every change of layer happened on a keyframe, and no sequence hole
    // was opened by a switch (counted: one packet per frame each way).
    for s in [b, c] {
        assert!(
            layers_since(&h, s, a, 0).1,
            "a switch landed on a delta frame"
        );
    }
    // Pausing stops the video; resuming brings it back.
    let pause = wish(track.clone(), None, Some(true));
    h.signal(b, pause);
    let before = h.video_payloads_from(b, a).len();
    pump(&mut h, &[a], 20);
    assert_eq!(
        h.video_payloads_from(b, a).len(),
        before,
        "paused track still flows"
    );
    let resume = wish(track, None, Some(false));
    h.signal(b, resume);
    pump(&mut h, &[a], 20);
    assert!(
        h.video_payloads_from(b, a).len() > before + 10,
        "resumed track flows"
    );
    // Through every switch and the pause, bob's RTP sequence has no hole
    // and the timestamps never go back.
    let (seqs, timestamps) = h.video_rtp_from(b, a);
    for (i, w) in seqs.windows(2).enumerate() {
        assert_eq!(w[1], w[0].wrapping_add(1), "hole after packet {i}");
    }
    for w in timestamps.windows(2) {
        assert!(
            w[1].wrapping_sub(w[0]) < u32::MAX / 2,
            "timestamp went back: {w:?}"
        );
    }
    // The layers number their pictures from different bases; bob's
    // picture ids and TL0PICIDX still go up by one a frame (a frame per
    // packet here), so his decoder sees no gap.
    let payloads = h.video_payloads_from(b, a);
    let pictures: Vec<(u16, u8)> = payloads
        .iter()
        .map(|p| (u16::from_be_bytes([p[2] & 0x7F, p[3]]), p[4]))
        .collect();
    for (i, w) in pictures.windows(2).enumerate() {
        assert_eq!(
            w[1].0,
            (w[0].0 + 1) & 0x7FFF,
            "picture id gap after packet {i}"
        );
        assert_eq!(
            w[1].1,
            w[0].1.wrapping_add(1),
            "TL0PICIDX gap after packet {i}"
        );
    }
}

/// Distinct video frames (by the sender's sequence tag) `to` received from
/// `from` with tag greater than `after`.
fn distinct_video_frames(h: &Harness, to: usize, from: usize, after: u16) -> usize {
    let mut tags: Vec<u16> = h
        .video_payloads_from(to, from)
        .iter()
        .map(|p| u16::from_be_bytes([p[common::PAYLOAD_SEQ], p[common::PAYLOAD_SEQ + 1]]))
        .filter(|t| *t > after)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    tags.len()
}

/// Residual video loss at a subscriber after retransmission, with `up` loss
/// from publisher to server and `down` loss from server to subscriber.
fn residual_loss(up: f64, down: f64) -> (f64, (u64, u64)) {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let pub_addr = h.clients[a].pub_addr;
    let sub_addr = h.clients[b].sub_addr;
    h.uplink_loss.insert(pub_addr, up);
    h.downlink_loss.insert(sub_addr, down);
    let start = h.clients[a].seq;
    let n = 1000;
    pump(&mut h, &[a], n);
    // Let the last retransmissions land.
    h.uplink_loss.clear();
    h.downlink_loss.clear();
    h.run_for(Duration::from_secs(2));
    let got = distinct_video_frames(&h, b, a, start);
    RETRANSMISSIONS.with(|r| r.set(h.room.stats().retransmissions));
    RECEIVED_BY_ROOM.with(|r| r.set(h.room.stats().rtp_received_by_room));
    (1.0 - got as f64 / n as f64, h.lost)
}

thread_local! {
    static RETRANSMISSIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static RECEIVED_BY_ROOM: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[test]
fn five_percent_uplink_loss_is_recovered_by_retransmission() {
    let (residual, lost) = residual_loss(0.05, 0.0);
    eprintln!(
        "5% uplink loss: {} datagrams lost, residual video loss {:.3}%",
        lost.0,
        residual * 100.0
    );
    assert!(lost.0 >= 60, "the loss was applied ({lost:?})");
    assert!(residual < 0.005, "residual loss {:.3}%", residual * 100.0);
    // The gaps were seen, and NACKed, in packets the room decrypted past
    // the engine: its NACK generator runs on them too.
    let by_room = RECEIVED_BY_ROOM.with(|r| r.get());
    assert!(by_room >= 1500, "{by_room} packets received by the room");
}

#[test]
fn five_percent_downlink_loss_is_recovered_by_retransmission() {
    let (residual, lost) = residual_loss(0.0, 0.05);
    // Answered by the room from its packet cache (subscriber connections
    // have no NACK responder of their own).
    let retransmitted = RETRANSMISSIONS.with(|r| r.get());
    eprintln!("answered {retransmitted} NACKed packets from the cache");
    assert!(retransmitted >= 30, "{retransmitted} retransmissions");
    eprintln!(
        "5% downlink loss: {} datagrams lost, residual video loss {:.3}%",
        lost.1,
        residual * 100.0
    );
    assert!(lost.1 >= 60, "the loss was applied ({lost:?})");
    assert!(residual < 0.005, "residual loss {:.3}%", residual * 100.0);
}

/// A subscriber waiting for a keyframe whose first packet was lost and
/// comes back by retransmission after the packets that follow it: it must
/// get those packets too (they arrived while it still waited), not only
/// the late keyframe packet and whatever comes after it.
#[test]
fn a_keyframe_recovered_after_its_successors_is_followed_by_them() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let video = h.video_track_sid(a);
    h.signal(b, wish(video.clone(), None, Some(true)));
    // Paused for over a second, so the next keyframe request is not held
    // back, and far from the publisher's periodic keyframes (every 30).
    pump(&mut h, &[a], 50);
    while h.clients[a].seq % 30 != 10 {
        pump(&mut h, &[a], 1);
    }
    // Resuming asks the publisher for a keyframe: its next frame is one.
    let requests = h.clients[a].keyframe_requests.len();
    h.signal(b, wish(video, None, Some(false)));
    assert!(h.clients[a].keyframe_requests.len() > requests, "no PLI");
    let start = h.clients[a].seq;
    // A keyframe and three frames after it; the keyframe lands last.
    let mut frames = h.capture_media(a, 4);
    assert_eq!(frames.len(), 4);
    frames.rotate_left(1);
    let from = h.clients[a].pub_addr;
    for d in frames {
        let now = h.now;
        h.room.handle_datagram(now, from, d);
        h.settle();
    }
    assert_eq!(distinct_video_frames(&h, b, a, start), 4);
}

/// The layer (slot) of the last five video packets `to` received from
/// `from`, if they agree (a late retransmission of an older layer's packet
/// does not count as a change of layer).
fn last_layer(h: &Harness, to: usize, from: usize) -> Option<u8> {
    let payloads = h.video_payloads_from(to, from);
    let recent = &payloads[payloads.len().saturating_sub(5)..];
    let layer = recent.last()?[common::PAYLOAD_SLOT];
    recent
        .iter()
        .all(|p| p[common::PAYLOAD_SLOT] == layer)
        .then_some(layer)
}

/// Pumps media until `to` receives layer `want` from `from`; the virtual
/// time it took.
fn time_to_layer(h: &mut Harness, to: usize, from: usize, want: u8, limit: Duration) -> Duration {
    let start = h.now;
    while last_layer(h, to, from) != Some(want) {
        assert!(
            h.now - start < limit,
            "layer {want} not reached within {limit:?} (at {:?})",
            last_layer(h, to, from)
        );
        pump(h, &[from], 1);
    }
    h.now - start
}

#[test]
fn downlink_estimate_moves_the_subscriber_down_and_back_up() {
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    // Layers measured at about 60 / 180 / 460 kbit/s, audio about 60.
    h.send_remb(b, 3_000_000);
    let up = time_to_layer(&mut h, b, a, 2, Duration::from_secs(3));
    pump(&mut h, &[a], 50);
    assert_eq!(last_layer(&h, b, a), Some(2));
    // The estimate falls below what the high layer needs.
    h.send_remb(b, 350_000);
    let down = time_to_layer(&mut h, b, a, 1, Duration::from_secs(2));
    eprintln!("estimate cut: medium after {down:?} (high reached first after {up:?})");
    pump(&mut h, &[a], 100);
    assert_eq!(
        last_layer(&h, b, a),
        Some(1),
        "stays down while the estimate is low"
    );
    // Too little even for the lowest layer, and packets are being lost:
    // after the shortage has lasted (a single dip does not freeze video),
    // video pauses and audio goes on.
    let sub_addr = h.clients[b].sub_addr;
    h.downlink_loss.insert(sub_addr, 0.2);
    h.send_remb(b, 70_000);
    let cut = h.now;
    let mut before = h.video_payloads_from(b, a).len();
    loop {
        pump(&mut h, &[a], 10);
        let now = h.video_payloads_from(b, a).len();
        if now == before {
            break;
        }
        before = now;
        assert!(h.now - cut < Duration::from_secs(4), "video not paused");
    }
    let paused_after = h.now - cut;
    assert!(
        paused_after >= Duration::from_secs(2),
        "paused after {paused_after:?}"
    );
    eprintln!("estimate below the lowest layer: video paused after {paused_after:?}");
    let audio_before = h.received_from(b, a).1;
    pump(&mut h, &[a], 50);
    assert_eq!(h.video_payloads_from(b, a).len(), before, "video paused");
    assert!(
        h.received_from(b, a).1 >= audio_before + 35,
        "audio continues"
    );
    h.downlink_loss.clear();
    // Recovery: back up, one layer at a time.
    h.send_remb(b, 3_000_000);
    let recovered = time_to_layer(&mut h, b, a, 2, Duration::from_secs(8));
    eprintln!("estimate recovered: high again after {recovered:?}");
    // Across downgrades, the pause and the lossy stretch (retransmissions
    // arrive late, so in arrival order there are jumps): no sequence
    // number is missing from what bob holds.
    let (seqs, _) = h.video_rtp_from(b, a);
    let mut ext = sfu_core::seq::SeqExtender::new();
    let mut got: Vec<u64> = seqs.iter().map(|s| ext.extend(*s as u64)).collect();
    got.sort_unstable();
    got.dedup();
    for w in got.windows(2) {
        assert_eq!(w[1], w[0] + 1, "hole in bob's stream");
    }
    assert!(h.room.stats().dropped(sfu_core::DropReason::Bandwidth) > 0);
}

/// Payload bytes `to` has received from `from`, audio and video.
fn bytes_from(h: &Harness, to: usize, from: usize) -> usize {
    let from_sid = h.client_sid(from);
    let c = &h.clients[to];
    c.received
        .iter()
        .filter(|(track, _)| c.track_streams.get(*track) == Some(&from_sid))
        .map(|(_, r)| r.payloads.iter().map(|p| p.len()).sum::<usize>())
        .sum()
}

#[test]
fn a_receiver_estimate_capped_by_what_it_receives_neither_pauses_nor_pins_video() {
    use sfu_core::signal::Quality;
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let track = h.video_track_sid(a);
    h.signal(b, wish(track.clone(), Some(Quality::Low), None));
    time_to_layer(&mut h, b, a, 0, Duration::from_secs(2));
    // Bob wants high again. His estimate behaves as a receive-side
    // delay-based estimator does with no congestion: never above 1.5x
    // what arrived in the last half second. Taken as a limit, it would
    // keep him on the low layer (the next layer is four times larger), or
    // pause him when audio alone arrives.
    let mut last = bytes_from(&h, b, a);
    let mut frames = h.video_payloads_from(b, a).len();
    let start = h.now;
    let mut asked = false;
    while last_layer(&h, b, a) != Some(2) {
        if !asked && h.now - start >= Duration::from_secs(2) {
            h.signal(b, wish(track.clone(), Some(Quality::High), None));
            asked = true;
        }
        assert!(
            h.now - start < Duration::from_secs(10),
            "stuck on layer {:?}",
            last_layer(&h, b, a)
        );
        pump(&mut h, &[a], 25);
        let now = bytes_from(&h, b, a);
        let bps = ((now - last) * 8 * 2) as u64;
        h.send_remb(b, bps * 3 / 2);
        last = now;
        let shown = h.video_payloads_from(b, a).len();
        assert!(
            shown > frames,
            "video paused under a receiver-capped estimate"
        );
        frames = shown;
    }
    eprintln!(
        "high layer under a receiver-capped estimate after {:?}",
        h.now - start
    );
}

#[test]
fn subscriber_on_a_layer_the_publisher_stops_moves_to_one_still_sent() {
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    time_to_layer(&mut h, b, a, 2, Duration::from_secs(2));
    // The publisher drops its top layer (as a browser short of CPU does).
    h.clients[a].stopped_slots.push(2);
    let moved = time_to_layer(&mut h, b, a, 1, Duration::from_secs(3));
    eprintln!("top layer stopped: medium after {moved:?}");
    assert!(moved <= Duration::from_millis(1600), "took {moved:?}");
    // It comes back: the subscriber returns to it.
    h.clients[a].stopped_slots.clear();
    time_to_layer(&mut h, b, a, 2, Duration::from_secs(3));
    let (seqs, _) = h.video_rtp_from(b, a);
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "hole in bob's stream");
    }
}

#[test]
fn a_track_removed_by_renegotiation_is_unpublished() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let video = h.video_track_sid(a);
    let alice = h.client_sid(a);
    h.unpublish_video(a);
    let unpublished: Vec<String> = h.clients[b]
        .signals
        .iter()
        .filter_map(|s| match s {
            ServerMessage::TrackUnpublished {
                participant_sid,
                track_sid,
            } if *participant_sid == alice => Some(track_sid.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(unpublished, vec![video], "only the video track ends");
    // Audio goes on.
    let audio_before = h.received_from(b, a).1;
    pump(&mut h, &[a], 20);
    assert!(h.received_from(b, a).1 >= audio_before + 20);
    assert_eq!(h.room.participants()[0].tracks.len(), 1);
}

#[test]
fn dynacast_switches_off_layers_nobody_receives_and_back_on_when_wanted() {
    use sfu_core::signal::Quality;
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let track = h.video_track_sid(a);
    let ask = |quality| wish(track.clone(), Some(quality), None);
    let layer_messages = |h: &Harness| {
        h.clients[a]
            .signals
            .iter()
            .filter_map(|s| match s {
                ServerMessage::PublishedLayers { layers, .. } => Some(
                    layers
                        .iter()
                        .map(|l| (l.rid.clone(), l.active))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    h.signal(b, ask(Quality::Low));
    pump(&mut h, &[a], 100); // 2 s: within the grace period nothing changes
    assert!(layer_messages(&h).is_empty(), "{:?}", layer_messages(&h));
    pump(&mut h, &[a], 100); // past 3 s
    let off = vec![
        ("q".to_string(), true),
        ("h".to_string(), false),
        ("f".to_string(), false),
    ];
    assert_eq!(layer_messages(&h).last(), Some(&off));
    assert_eq!(h.clients[a].stopped_slots, vec![1, 2]);
    // The low layer still reaches bob.
    assert_eq!(last_layer(&h, b, a), Some(0));
    // Bob wants high again: it is switched back on at once.
    h.signal(b, ask(Quality::High));
    let on = vec![
        ("q".to_string(), true),
        ("h".to_string(), false),
        ("f".to_string(), true),
    ];
    assert_eq!(layer_messages(&h).last(), Some(&on));
    let back = time_to_layer(&mut h, b, a, 2, Duration::from_secs(2));
    eprintln!("dynacast: high layer back at the subscriber after {back:?}");
    let (seqs, _) = h.video_rtp_from(b, a);
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "hole in bob's stream");
    }
}

/// At subscriber `to`, the capture times (per the sender reports it got)
/// of the latest frame present in both `from`'s audio and video: their
/// difference in milliseconds.
fn av_offset_ms(h: &Harness, to: usize, from: usize) -> f64 {
    let from_sid = h.client_sid(from);
    let c = &h.clients[to];
    let mut per_kind: Vec<(u32, std::collections::HashMap<u16, u32>, u32)> = Vec::new();
    for (track, r) in &c.received {
        if c.track_streams.get(track) != Some(&from_sid) {
            continue;
        }
        let ssrc = c.track_receivers[track].1;
        let audio = r
            .payloads
            .first()
            .is_some_and(|p| p[common::PAYLOAD_SLOT] == 0xA0);
        let clock = if audio { 48_000 } else { 90_000 };
        let tags = r
            .payloads
            .iter()
            .zip(&r.timestamps)
            .map(|(p, ts)| {
                let tag = u16::from_be_bytes([p[common::PAYLOAD_SEQ], p[common::PAYLOAD_SEQ + 1]]);
                (tag, *ts)
            })
            .collect();
        per_kind.push((ssrc, tags, clock));
    }
    assert_eq!(per_kind.len(), 2, "audio and video received");
    let common_tag = per_kind[0]
        .1
        .keys()
        .filter(|t| per_kind[1].1.contains_key(t))
        .max()
        .copied()
        .expect("a frame in both");
    let capture = |(ssrc, tags, clock): &(u32, std::collections::HashMap<u16, u32>, u32)| {
        let (_, ntp, rtp) = *c
            .sender_reports
            .iter()
            .rev()
            .find(|(s, _, _)| s == ssrc)
            .expect("a sender report for the stream");
        let ticks = tags[&common_tag].wrapping_sub(rtp) as i32 as f64;
        ntp as f64 / 4_294_967_296.0 + ticks / *clock as f64
    };
    (capture(&per_kind[0]) - capture(&per_kind[1])).abs() * 1000.0
}

#[test]
fn sender_reports_keep_audio_and_video_in_sync_across_layer_switches() {
    use sfu_core::signal::Quality;
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    pump(&mut h, &[a], 150);
    let before = av_offset_ms(&h, b, a);
    let track = h.video_track_sid(a);
    h.signal(b, wish(track, Some(Quality::Low), None));
    pump(&mut h, &[a], 150);
    assert_eq!(last_layer(&h, b, a), Some(0));
    let after = av_offset_ms(&h, b, a);
    eprintln!("audio/video capture-time offset at the subscriber: {before:.2} ms, after a layer switch {after:.2} ms");
    // Output timestamps follow capture time, across the switch too
    // (aligned by the sender reports of both layers): 1800 ticks a frame.
    // Within a layer that is exact. At the switch the two layers' reports
    // each map NTP to RTP time rounded to a whole tick at the publisher, so
    // the aligned gap may be one tick (11 µs) off.
    let payloads = h.video_payloads_from(b, a);
    let (_, timestamps) = h.video_rtp_from(b, a);
    let tag =
        |p: &bytes::Bytes| u16::from_be_bytes([p[common::PAYLOAD_SEQ], p[common::PAYLOAD_SEQ + 1]]);
    let mut switches = 0;
    for i in 100..payloads.len() {
        let frames = tag(&payloads[i]).wrapping_sub(tag(&payloads[i - 1])) as u32;
        let (from, to) = (
            payloads[i - 1][common::PAYLOAD_SLOT],
            payloads[i][common::PAYLOAD_SLOT],
        );
        let step = timestamps[i].wrapping_sub(timestamps[i - 1]);
        if from == to {
            assert_eq!(step, frames * 1800, "packet {i}: layer {from}");
        } else {
            switches += 1;
            assert!(
                step.abs_diff(frames * 1800) <= 1,
                "packet {i}: layer {from} -> {to}: {step} ticks for {frames} frames"
            );
        }
    }
    assert_eq!(switches, 1, "one layer switch");
    assert!(before < 5.0, "{before} ms");
    assert!(after < 5.0, "{after} ms");
}

#[test]
fn heavy_downlink_loss_moves_the_subscriber_down_and_it_recovers() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("SFU_TEST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    time_to_layer(&mut h, b, a, 2, Duration::from_secs(2));
    // A congested path: a third of what goes to bob is lost.
    let sub_addr = h.clients[b].sub_addr;
    h.downlink_loss.insert(sub_addr, 0.33);
    let down = time_to_layer(&mut h, b, a, 1, Duration::from_secs(6));
    eprintln!("33% downlink loss: medium after {down:?}");
    h.downlink_loss.clear();
    let up = time_to_layer(&mut h, b, a, 2, Duration::from_secs(20));
    eprintln!("loss gone: high again after {up:?}");
}

/// Inbound RTP that the room decrypts itself is authenticated: a packet
/// with a damaged payload, and a replay of one already received, are
/// dropped (counted as `srtp_rejected`) and the stream goes on.
#[test]
fn forged_and_replayed_inbound_rtp_is_rejected() {
    use sfu_core::DropReason;
    let mut h = Harness::new();
    let a = h.join("alice", true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let from = h.clients[a].pub_addr;
    let frames = h.capture_media(a, 2);
    let stats = h.room.stats().clone();
    let now = h.now;
    let mut damaged = frames[0].clone();
    let at = damaged.len() - 20;
    damaged[at] ^= 0x01;
    h.room.handle_datagram(now, from, damaged);
    assert_eq!(h.room.stats().dropped(DropReason::SrtpRejected), 1);
    assert_eq!(h.room.stats().rtp_forwarded, stats.rtp_forwarded);
    // The genuine packet is taken once, its replay is not.
    h.room.handle_datagram(now, from, frames[0].clone());
    h.room.handle_datagram(now, from, frames[0].clone());
    assert_eq!(h.room.stats().dropped(DropReason::SrtpRejected), 2);
    assert_eq!(h.room.stats().rtp_forwarded, stats.rtp_forwarded + 1);
    // And the stream goes on.
    h.room.handle_datagram(now, from, frames[1].clone());
    assert_eq!(h.room.stats().rtp_forwarded, stats.rtp_forwarded + 2);
    assert_eq!(
        h.room.stats().rtp_received_by_room,
        stats.rtp_received_by_room + 2
    );
    h.settle();
    let before = h.received_from(b, a).0;
    pump(&mut h, &[a], 10);
    assert_eq!(h.received_from(b, a).0, before + 10);
}

#[test]
fn a_rooms_timers_keep_one_beat_and_feedback_keeps_its_pace() {
    let mut h = Harness::new();
    let epoch = h.now;
    // Joined, and so connected and publishing, at moments off the beat:
    // left to themselves, their timers would each keep a phase of their
    // own.
    let mut clients = Vec::new();
    for name in ["alice", "bob", "carol"] {
        clients.push(h.join(name, true));
        h.run_for(Duration::from_millis(37));
    }
    let pairs: Vec<(usize, usize)> = clients
        .iter()
        .flat_map(|&to| clients.iter().map(move |&from| (to, from)))
        .filter(|(to, from)| to != from)
        .collect();
    connect_all(&mut h, &clients, &pairs);
    pump(&mut h, &clients, 50);
    let start = h.now;
    let wakes_before = h.room_wakes.len();
    let before: Vec<(usize, usize)> = clients
        .iter()
        .map(|&c| {
            (
                h.clients[c].twcc_feedback,
                h.clients[c].receiver_reports.len(),
            )
        })
        .collect();
    pump(&mut h, &clients, 150);
    let seconds = (h.now - start).as_secs_f64();
    // Every timer of the room (its connections' engines, their
    // interceptors, allocation and sender reports) ran on the 100 ms beat:
    // six connections, one wake per beat at most.
    let wakes = &h.room_wakes[wakes_before..];
    let tick = Duration::from_millis(100).as_nanos();
    let off_beat: Vec<u128> = wakes
        .iter()
        .map(|w| (*w - epoch).as_nanos() % tick)
        .filter(|r| *r != 0)
        .collect();
    assert!(off_beat.is_empty(), "wakes off the beat by {off_beat:?} ns");
    assert!(
        wakes.len() as f64 <= seconds * 10.0 + 1.0,
        "{} wakes in {seconds} s",
        wakes.len()
    );
    // Each publisher still gets TWCC feedback about every 100 ms and a
    // receiver report for each of its streams about every second.
    for (&c, (twcc, reports)) in clients.iter().zip(before) {
        let twcc = (h.clients[c].twcc_feedback - twcc) as f64 / seconds;
        assert!((8.0..=11.0).contains(&twcc), "{twcc} TWCC feedback/s");
        let video = h.clients[c].senders[0].1;
        let rr = h.clients[c].receiver_reports[reports..]
            .iter()
            .filter(|(ssrc, _)| *ssrc == video)
            .count() as f64
            / seconds;
        assert!((0.6..=1.1).contains(&rr), "{rr} receiver reports/s");
    }
}

/// RTP padding on published packets (the P bit, its count in the last
/// byte) is not forwarded: a subscriber gets each payload whole and no P
/// bit, whether the engine or the room decrypted the packet.
#[test]
fn padded_media_reaches_subscribers_without_its_padding() {
    let mut h = Harness::new();
    let a = h.join("alice", true);
    h.clients[a].pad_video = true;
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    pump(&mut h, &[a], 30);
    let payloads = h.video_payloads_from(b, a);
    assert!(
        payloads.len() >= 30,
        "{} video packets arrived",
        payloads.len()
    );
    for (i, p) in payloads.iter().enumerate() {
        assert_eq!(p.len(), common::PAYLOAD_BODY + 100, "packet {i}");
        assert!(
            p[common::PAYLOAD_BODY..].iter().all(|b| *b == 0xAB),
            "packet {i}"
        );
    }
}
