//! Datagrams on the shared media port: the demultiplexer's STUN reading,
//! and a room taking arbitrary datagrams from a known and an unknown
//! source. Nothing may panic; an unknown source is only counted.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ufrag) = sfu_core::demux::binding_request_ufrag(data) {
        assert!(sfu_core::demux::is_stun(data));
        assert!(ufrag.len() <= data.len());
    }
    let now = Instant::now();
    let mut room = sfu_fuzz::room(now, 0);
    let stranger: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    room.handle_datagram(now, stranger, BytesMut::from(data));
    assert_eq!(room.stats().datagrams_in, 1);
    while let sfu_core::Output::Transmit(_)
    | sfu_core::Output::Signal { .. }
    | sfu_core::Output::Event(_) = room.poll_output()
    {}
});
