//! A room with in-memory client peers on a virtual clock: media flows
//! between publishers and subscribers, late joiners receive, leavers'
//! tracks are removed.

mod common;

use std::time::Duration;

use common::Harness;
use sfu_core::signal::ServerMessage;

/// Sends `n` packets per track from each publisher, 20 ms apart.
fn pump(h: &mut Harness, publishers: &[usize], n: usize) {
    for _ in 0..n {
        for &p in publishers {
            h.send_media(p);
        }
        h.run_for(Duration::from_millis(20));
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

fn count_offers(h: &Harness, i: usize) -> usize {
    h.clients[i]
        .signals
        .iter()
        .filter(|s| matches!(s, ServerMessage::Offer { .. }))
        .count()
}

#[test]
fn simulcast_publisher_is_forwarded_as_one_consistent_layer() {
    let mut h = Harness::new();
    let a = h.join_with("alice", true, true);
    let b = h.join("bob", false);
    connect_all(&mut h, &[a], &[(b, a)]);
    let c = h.join("carol", false);
    connect_all(&mut h, &[a], &[(c, a)]);
    let before = h.received_from(b, a);
    pump(&mut h, &[a], 100);
    let after = h.received_from(b, a);
    // One layer's 100 packets, not three layers' 300.
    assert_eq!(after.0 - before.0, 100);
    assert_eq!(after.1 - before.1, 100);
    let layers_b = h.video_layers_from(b, a);
    assert_eq!(layers_b.len(), 1, "bob got layers {layers_b:?}");
    assert_eq!(
        h.video_layers_from(c, a),
        layers_b,
        "both subscribers get the same layer"
    );
    let drops = &h.room.stats().drops;
    let not_selected = drops
        .get(&sfu_core::DropReason::LayerNotSelected)
        .copied()
        .unwrap_or(0);
    assert!(not_selected >= 200, "{drops:?}");
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
    h.send_pli(b, a);
    let got = &h.clients[a].keyframe_requests[before..];
    assert_eq!(got, &[video_ssrc], "PLI names alice's video SSRC");
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
